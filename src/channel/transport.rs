//! HTTP-level care of Engine.IO sessions, in front of socketioxide:
//!
//! - Closing sessions the bridge gave up on. A socket whose queue is full cannot even be
//!   sent a close packet, so the bridge cuts its WebSocket's TCP connection, or refuses
//!   its next polling request as an unknown session. Either way the client sees its
//!   transport fail and reconnects (a namespace-level disconnect would not reconnect).
//! - socket.io-client 2.x sends a namespace query inside CONNECT (`40/storage?x=1,`),
//!   which socket.io 3+ strips and socketioxide answers with "Invalid namespace". The
//!   query is stripped here from polling requests. The same packet over a WebSocket
//!   (`transports: ["websocket"]` with a query) needs the strip in socketioxide's parser.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{ConnectInfo, OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use socketioxide::socket::Sid;
use std::sync::Arc;

use crate::net::ConnectionInfo;

#[derive(Default)]
pub struct Sessions {
    /// The connection each upgraded session moved to (its handshake was on another).
    upgraded: Mutex<HashMap<Sid, ConnectionInfo>>,
    /// Sessions whose further polling requests are refused.
    refused: Mutex<HashSet<Sid>>,
}

impl Sessions {
    /// Makes the client's transport fail. `handshake` is the connection of the request
    /// that opened the session, `websocket` whether the session is on a WebSocket now.
    pub fn close(&self, sid: Sid, handshake: Option<&ConnectionInfo>, websocket: bool) {
        let upgraded = self.upgraded.lock().unwrap().remove(&sid);
        match (upgraded, websocket) {
            (Some(connection), _) => {
                connection.cut();
            }
            (None, true) => {
                if let Some(connection) = handshake {
                    connection.cut();
                }
            }
            (None, false) => {
                self.refused.lock().unwrap().insert(sid);
            }
        }
    }

    /// The session ended: forget it.
    pub fn ended(&self, sid: Sid) {
        self.upgraded.lock().unwrap().remove(&sid);
        self.refused.lock().unwrap().remove(&sid);
    }

    fn record_upgrade(&self, sid: Sid, connection: ConnectionInfo) {
        let mut upgraded = self.upgraded.lock().unwrap();
        // Sessions that end without a namespace never report their end: drop entries
        // whose connection is gone before they pile up.
        if upgraded.len() >= 1024 && upgraded.len().is_power_of_two() {
            upgraded.retain(|_, c| c.is_open());
        }
        upgraded.insert(sid, connection);
    }

    fn is_refused(&self, sid: Sid) -> bool {
        self.refused.lock().unwrap().contains(&sid)
    }
}

/// Largest polling body inspected for the namespace query (Engine.IO's max payload).
const MAX_INSPECTED_BODY: usize = 1_000_000;

/// Middleware on the Socket.IO path; see the module documentation.
pub async fn guard(State(sessions): State<Arc<Sessions>>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/socket.io/") {
        return next.run(request).await;
    }
    let query = EngineQuery::parse(request.uri().query().unwrap_or(""));
    if let Some(sid) = query.sid
        && sessions.is_refused(sid)
    {
        // What Engine.IO answers for a session it does not know.
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"code":1,"message":"Session ID unknown"}"#,
        )
            .into_response();
    }
    let request = if query.sid.is_none() {
        detach_head(request)
    } else if query.eio3 && query.polling && request.method() == Method::POST {
        strip_query_from_polling_body(request).await
    } else {
        request
    };
    let connection = request
        .extensions()
        .get::<ConnectInfo<ConnectionInfo>>()
        .map(|c| c.0.clone());
    let is_post = request.method() == Method::POST;
    let response = next.run(request).await;
    // Engine.IO answers a payload it cannot decode with an empty 400 and ends the
    // session; its session errors carry a JSON body.
    if is_post
        && response.status() == StatusCode::BAD_REQUEST
        && !response.headers().contains_key(header::CONTENT_TYPE)
    {
        tracing::info!(
            sid = ?query.sid,
            client = ?connection.as_ref().map(|c| c.peer),
            "malformed polling payload refused; its session ended"
        );
    }
    let connection = connection.filter(|_| query.websocket && query.sid.is_some());
    if let (Some(sid), Some(connection)) = (query.sid, connection)
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        sessions.record_upgrade(sid, connection);
    }
    response
}

const KEPT_HEADERS: [HeaderName; 2] = [
    header::SEC_WEBSOCKET_KEY,
    HeaderName::from_static("x-forwarded-for"),
];

/// Socket.IO keeps the request that opened a session for the session's whole life, and
/// hyper parses a request's URI and headers as slices of its per-connection read buffer
/// (8 to 16 KiB), which they would keep alive: about half of an idle connection's memory.
/// Copies of the few hundred bytes let the buffer go once the request is handled.
fn detach_head(request: Request) -> Request {
    let (mut parts, body) = request.into_parts();
    if let Ok(uri) = parts.uri.to_string().parse::<axum::http::Uri>() {
        // axum's copy of the URI too.
        parts.extensions.insert(OriginalUri(uri.clone()));
        parts.uri = uri;
    }
    // Only what is read later: the WebSocket key (by Engine.IO, for its answer) and the
    // forwarded client address (by the channel, behind a trusted proxy).
    let mut headers = HeaderMap::with_capacity(KEPT_HEADERS.len());
    for name in KEPT_HEADERS {
        for value in parts.headers.get_all(&name) {
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                headers.append(name.clone(), value);
            }
        }
    }
    parts.headers = headers;
    Request::from_parts(parts, body)
}

/// The Engine.IO parameters of a request's query string.
pub struct EngineQuery {
    pub sid: Option<Sid>,
    pub eio3: bool,
    pub polling: bool,
    pub websocket: bool,
}

impl EngineQuery {
    pub fn parse(query: &str) -> EngineQuery {
        let mut parsed = EngineQuery {
            sid: None,
            eio3: false,
            polling: false,
            websocket: false,
        };
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sid", v)) => parsed.sid = v.parse().ok(),
                Some(("EIO", v)) => parsed.eio3 = v == "3",
                Some(("transport", v)) => {
                    parsed.polling = v == "polling";
                    parsed.websocket = v == "websocket";
                }
                _ => {}
            }
        }
        parsed
    }
}

async fn strip_query_from_polling_body(request: Request) -> Request {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_none_or(|len| len > MAX_INSPECTED_BODY) {
        return request;
    }
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_INSPECTED_BODY).await else {
        // The body failed mid-way: hand on an empty one, which Engine.IO rejects.
        return Request::from_parts(parts, Body::empty());
    };
    let rewritten = std::str::from_utf8(&bytes).ok().and_then(strip_namespace_queries);
    let body = match rewritten {
        Some(text) => {
            parts.headers.insert(header::CONTENT_LENGTH, text.len().into());
            Body::from(text)
        }
        None => Body::from(bytes),
    };
    Request::from_parts(parts, body)
}

/// Rewrites an Engine.IO 3 text payload (`<utf-16 length>:<packet>` repeated) so that
/// CONNECT packets name their namespace without a query. `None` when nothing changes
/// or the payload is not of that form.
pub fn strip_namespace_queries(payload: &str) -> Option<String> {
    let mut out = String::with_capacity(payload.len());
    let mut rest = payload;
    let mut changed = false;
    while !rest.is_empty() {
        let (len, after) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let end = utf16_offset(after, len)?;
        let (packet, tail) = after.split_at(end);
        let packet = match strip_connect_query(packet) {
            Some(stripped) => {
                changed = true;
                stripped
            }
            None => packet.to_string(),
        };
        out.push_str(&packet.encode_utf16().count().to_string());
        out.push(':');
        out.push_str(&packet);
        rest = tail;
    }
    changed.then_some(out)
}

/// `40/storage?x=1,...` → `40/storage,...` (Engine.IO message `4`, Socket.IO CONNECT `0`).
fn strip_connect_query(packet: &str) -> Option<String> {
    let nsp_and_rest = packet.strip_prefix("40/")?;
    let nsp_end = nsp_and_rest.find(',').unwrap_or(nsp_and_rest.len());
    let question = nsp_and_rest[..nsp_end].find('?')?;
    Some(format!(
        "40/{}{}",
        &nsp_and_rest[..question],
        &nsp_and_rest[nsp_end..]
    ))
}

/// Byte offset of the first `units` UTF-16 code units of `s`.
fn utf16_offset(s: &str, units: usize) -> Option<usize> {
    let mut count = 0;
    for (offset, ch) in s.char_indices() {
        if count == units {
            return Some(offset);
        }
        count += ch.len_utf16();
    }
    (count == units).then_some(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_query_is_stripped_and_lengths_follow() {
        assert_eq!(
            strip_namespace_queries("14:40/storage?x=1").as_deref(),
            Some("10:40/storage")
        );
        assert_eq!(
            strip_namespace_queries("19:40/storage?x=1&y=2,").as_deref(),
            Some("11:40/storage,")
        );
        assert_eq!(
            strip_namespace_queries("1:215:40/storage?a=é,").as_deref(),
            Some("1:211:40/storage,")
        );
    }

    #[test]
    fn other_payloads_are_left_alone() {
        for payload in [
            "10:40/storage",
            "1:2",
            "12:40/storage,",
            r#"40:42/storage,0["subscribe",{"accessToken":"?"}]"#,
            "garbage",
            "99:40/storage?x=1",
            "",
        ] {
            assert_eq!(strip_namespace_queries(payload), None, "{payload}");
        }
    }

    #[test]
    fn detached_head_keeps_only_what_is_read_later() {
        let request = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("x-forwarded-for", "203.0.113.7")
            .header("cookie", "session=abc")
            .header("user-agent", "okhttp/4.12.0")
            .extension(OriginalUri(
                "/socket.io/?EIO=4&transport=websocket".parse().unwrap(),
            ))
            .body(Body::empty())
            .unwrap();
        let detached = detach_head(request);
        assert_eq!(detached.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(
            detached.extensions().get::<OriginalUri>().unwrap().0,
            *detached.uri()
        );
        let mut names: Vec<&str> = detached.headers().keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["sec-websocket-key", "x-forwarded-for"]);
        assert_eq!(detached.headers()["x-forwarded-for"], "203.0.113.7");
    }

    #[test]
    fn engine_query() {
        let q = EngineQuery::parse("EIO=3&transport=polling&t=N1&sid=3HTwa90JC9hUTU7B");
        assert!(q.eio3 && q.polling && !q.websocket);
        assert!(q.sid.is_some());
        let q = EngineQuery::parse("EIO=4&transport=websocket");
        assert!(!q.eio3 && q.websocket && q.sid.is_none());
        assert!(EngineQuery::parse("sid=not-a-sid").sid.is_none());
    }
}
