//! Nightscout behind the bridge: in front-door mode (setting `upstream`) the bridge is the
//! origin clients reach, serves `/storage` itself and hands everything else to Nightscout.
//! HTTP requests are proxied ([`Upstream::proxy`]), the Socket.IO namespaces other than
//! `/storage` are relayed ([`relay`]), and whether Nightscout answers is watched, for
//! readiness and for the log.

pub mod forwarded;
pub mod packet;
pub mod relay;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{Extensions, Method, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::net::ConnectionInfo;
use crate::telemetry::metric;
use forwarded::{set_forwarded, strip_hop_by_hop};

/// How long connecting to Nightscout may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often Nightscout is asked whether it answers, and how long it may take.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Nightscout's internal address and the client that talks to it.
pub struct Upstream {
    authority: Authority,
    client: Client<HttpConnector, Body>,
    reachable: watch::Sender<bool>,
    trusted_proxy: bool,
}

impl Upstream {
    /// `base` is Nightscout's internal `http://host:port` (validated by the settings).
    pub fn new(base: &Uri, trusted_proxy: bool) -> Arc<Upstream> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Arc::new(Upstream {
            authority: base.authority().expect("validated upstream URL").clone(),
            client,
            reachable: watch::Sender::new(true),
            trusted_proxy,
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn trusted_proxy(&self) -> bool {
        self.trusted_proxy
    }

    /// Whether Nightscout answered last time it was asked.
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    /// Passes `request` to Nightscout and its answer back, both bodies streamed; `502` when
    /// Nightscout cannot be reached.
    pub async fn proxy(&self, request: Request) -> Response {
        let client = client_address(request.extensions());
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let Ok(uri) = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
        else {
            return (StatusCode::BAD_REQUEST, "bad request target\n").into_response();
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.extensions = Extensions::new();
        strip_hop_by_hop(&mut parts.headers);
        set_forwarded(&mut parts.headers, client, self.trusted_proxy);
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                self.answered(true, None);
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => {
                metrics::counter!(metric::UPSTREAM_ERRORS).increment(1);
                self.answered(false, Some(&e));
                (
                    StatusCode::BAD_GATEWAY,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "Nightscout is not reachable right now; try again in a moment.\n",
                )
                    .into_response()
            }
        }
    }

    /// Asks Nightscout every `interval` whether it answers, until `shutdown`.
    pub async fn watch_reachable(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let probe = Request::builder()
                .method(Method::HEAD)
                .uri(format!("http://{}/", self.authority))
                .header(header::USER_AGENT, "nsbridge")
                .body(Body::empty())
                .expect("a valid probe request");
            match tokio::time::timeout(PROBE_TIMEOUT, self.client.request(probe)).await {
                Ok(Ok(_)) => self.answered(true, None),
                Ok(Err(e)) => self.answered(false, Some(&e)),
                Err(_) => self.answered(false, None),
            }
        }
    }

    /// Records whether Nightscout answered, logging each change once.
    fn answered(&self, now: bool, error: Option<&hyper_util::client::legacy::Error>) {
        let before = self.reachable.send_replace(now);
        if before == now {
            return;
        }
        metrics::gauge!(metric::UPSTREAM_REACHABLE).set(if now { 1.0 } else { 0.0 });
        if now {
            tracing::info!(upstream = %self.authority, "Nightscout reachable again");
        } else {
            let error = error
                .map(|e| format!("{e:#}"))
                .unwrap_or_else(|| "no answer in time".into());
            tracing::warn!(upstream = %self.authority, %error, "Nightscout not reachable: proxied requests get 502, relayed namespaces are closed");
        }
    }
}

/// The client's address, from the connection the server put in the request.
pub fn client_address(extensions: &Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<ConnectionInfo>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.peer.ip())
}
