//! HTTP-level care of Engine.IO requests, in front of socketioxide:
//!
//! - The request that opens a session is kept by socketioxide for the session's life;
//!   [`detach_head`] copies the little of it that is read later, so that it does not pin
//!   the connection's read buffer.
//! - A polling payload that Engine.IO refuses as malformed ends its session; that is
//!   logged here, once, with the client's address.
//! - Every request is routed to its site by its host ([`SiteResolver`]); a Socket.IO
//!   request for a host that is no site's is refused here, before any session.
//! - In front-door mode, requests under `/socket.io/` that are not Engine.IO's (no `EIO`
//!   parameter: Nightscout's `socket.io.js` and its map) go to Nightscout, and each new
//!   session gets the slot of its upstream connection.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use socketioxide::socket::Sid;

use super::Routed;
use crate::net::ConnectionInfo;
use crate::telemetry::metric;
use crate::upstream::relay::{FORWARDED_HANDSHAKE_HEADERS, SessionLink};

/// Which site a request is for.
pub trait SiteResolver: Send + Sync {
    /// The site of a request with these headers; else the host it named (as sent, for the
    /// answer).
    fn resolve(&self, headers: &HeaderMap) -> Result<Routed, String>;
}

/// Middleware in front of everything; see the module documentation.
pub async fn guard(State(sites): State<Arc<dyn SiteResolver>>, mut request: Request, next: Next) -> Response {
    let socket_io = request.uri().path().starts_with("/socket.io/");
    let upstream = match sites.resolve(request.headers()) {
        Ok(routed) => {
            let upstream = routed.upstream.clone();
            request.extensions_mut().insert(routed);
            upstream
        }
        Err(host) if socket_io => return unknown_site(&host),
        // The bridge's own endpoints answer any host; nothing else does (see `http`).
        Err(_) => None,
    };
    if !socket_io {
        return next.run(request).await;
    }
    let query = request.uri().query().unwrap_or("");
    if let Some(upstream) = &upstream
        && !query.split('&').any(|pair| pair.starts_with("EIO="))
    {
        return upstream.proxy(request).await;
    }
    let sid = session_id(query);
    let request = if sid.is_none() {
        detach_head(request, upstream.is_some())
    } else {
        request
    };
    let client = request
        .extensions()
        .get::<ConnectInfo<ConnectionInfo>>()
        .map(|c| c.0.peer);
    let is_post = request.method() == Method::POST;
    let response = next.run(request).await;
    // Engine.IO answers a payload it cannot decode with an empty 400 and ends the
    // session; its session errors carry a JSON body.
    if is_post
        && response.status() == StatusCode::BAD_REQUEST
        && !response.headers().contains_key(header::CONTENT_TYPE)
    {
        tracing::info!(
            sid = ?sid,
            client = ?client,
            "malformed polling payload refused; its session ended"
        );
    }
    response
}

/// Engine.IO's error answer (`{"code":4,"message":...}`, Forbidden) to a session asked
/// of a host that is no site's.
pub fn unknown_site(host: &str) -> Response {
    metrics::counter!(metric::UNKNOWN_HOSTS).increment(1);
    let host: String = host.chars().take(100).collect();
    let body = serde_json::json!({"code": 4, "message": format!("no Nightscout site at host {host:?} on this bridge")});
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

const KEPT_HEADERS: [HeaderName; 2] = [
    header::SEC_WEBSOCKET_KEY,
    HeaderName::from_static("x-forwarded-for"),
];

/// Socket.IO keeps the request that opened a session for the session's whole life, and
/// hyper parses a request's URI and headers as slices of its per-connection read buffer
/// (8 to 16 KiB), which they would keep alive: about half of an idle connection's memory.
/// Copies of the few hundred bytes let the buffer go once the request is handled. In
/// front-door mode the headers that Nightscout's own handshake gets are kept too, and the
/// session gets the slot of its upstream connection.
fn detach_head(request: Request, front_door: bool) -> Request {
    let (mut parts, body) = request.into_parts();
    if let Ok(uri) = parts.uri.to_string().parse::<axum::http::Uri>() {
        parts.uri = uri;
    }
    // Of the extensions, only what is read later: the connection (by the channel) and the
    // upgrade to WebSocket (by Engine.IO). The router's own (its copy of the URI, path
    // parameters) would stay for the session's life.
    let mut extensions = Extensions::new();
    if let Some(connection) = parts.extensions.remove::<ConnectInfo<ConnectionInfo>>() {
        extensions.insert(connection);
    }
    if let Some(routed) = parts.extensions.remove::<Routed>() {
        extensions.insert(routed);
    }
    if let Some(upgrade) = parts.extensions.remove::<OnUpgrade>() {
        extensions.insert(upgrade);
    }
    if front_door {
        extensions.insert(SessionLink::default());
    }
    parts.extensions = extensions;
    // Only what is read later: the WebSocket key (by Engine.IO, for its answer) and the
    // forwarded client address (by the channel, behind a trusted proxy).
    let forwarded: &[HeaderName] = if front_door {
        &FORWARDED_HANDSHAKE_HEADERS
    } else {
        &[]
    };
    let mut headers = HeaderMap::with_capacity(KEPT_HEADERS.len() + forwarded.len());
    for name in KEPT_HEADERS.iter().chain(forwarded) {
        if headers.contains_key(name) {
            continue;
        }
        for value in parts.headers.get_all(name) {
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                headers.append(name.clone(), value);
            }
        }
    }
    parts.headers = headers;
    Request::from_parts(parts, body)
}

/// The Engine.IO session a request names in its query string (`sid=`), if any.
pub fn session_id(query: &str) -> Option<Sid> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sid="))
        .and_then(|sid| sid.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[test]
    fn detached_head_keeps_only_what_is_read_later() {
        let request = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("x-forwarded-for", "203.0.113.7")
            .header("cookie", "session=abc")
            .header("user-agent", "okhttp/4.12.0")
            .extension(axum::extract::OriginalUri(
                "/socket.io/?EIO=4&transport=websocket".parse().unwrap(),
            ))
            .body(Body::empty())
            .unwrap();
        let detached = detach_head(request, false);
        assert_eq!(detached.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert!(
            detached.extensions().is_empty(),
            "the router's extensions are dropped"
        );
        let mut names: Vec<&str> = detached.headers().keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["sec-websocket-key", "x-forwarded-for"]);
        assert_eq!(detached.headers()["x-forwarded-for"], "203.0.113.7");
    }

    #[test]
    fn session_id_of_a_query() {
        let sid = session_id("EIO=3&transport=polling&t=N1&sid=3HTwa90JC9hUTU7B");
        assert_eq!(sid.map(|s| s.to_string()).as_deref(), Some("3HTwa90JC9hUTU7B"));
        assert!(session_id("EIO=4&transport=websocket").is_none());
        assert!(session_id("sid=not-a-sid").is_none());
        assert!(session_id("").is_none());
    }
}
