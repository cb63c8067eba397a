//! Plain HTTP on the bridge's listener: health, readiness, metrics and the live page,
//! under [`FRONT_DOOR_PREFIX`] for any host, and at the root too for a host whose site has
//! no Nightscout behind the bridge. For a site in front-door mode, every other request goes
//! to its Nightscout.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;

use crate::channel::Routed;
use crate::deployment::StreamStatuses;
use crate::feed::FeedStatus;

/// Where the bridge's own endpoints are when it stands in front of Nightscout, whose `/`
/// they must not hide.
pub const FRONT_DOOR_PREFIX: &str = "/nsbridge";

/// The sample client of Nightscout's documentation, made useful; self-contained.
const LIVE_PAGE: &str = include_str!("../static/live.html");

/// What readiness asks of the sites.
pub trait SitesHealth: Send + Sync {
    /// How many sites have never had their auth collections read, and a few of their names.
    fn auth_pending(&self) -> (usize, Vec<String>);
    /// Of the sites' Nightscouts (front-door mode), how many there are and how many do
    /// not answer.
    fn upstreams(&self) -> (usize, usize);
}

#[derive(Clone)]
pub struct HttpState {
    pub streams: Arc<StreamStatuses>,
    pub sites: Arc<dyn SitesHealth>,
    pub mongo_reachable: watch::Receiver<bool>,
    /// Whether the deployment answered its last ping in time (see `mongo::watch_answering`).
    pub mongo_answering: watch::Receiver<bool>,
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: HttpState) -> Router {
    let prefix = FRONT_DOOR_PREFIX;
    Router::new()
        .route(&format!("{prefix}/"), get(live_page))
        .route(prefix, get(live_page))
        .route(&format!("{prefix}/healthz"), get(healthz))
        .route(&format!("{prefix}/readyz"), get(readyz))
        .route(&format!("{prefix}/metrics"), get(metrics))
        .fallback(at_the_root)
        .with_state(state)
}

/// A site behind the front door: Nightscout's. Else the bridge's own endpoints at the root.
async fn at_the_root(State(state): State<HttpState>, request: Request) -> Response {
    if let Some(upstream) = request
        .extensions()
        .get::<Routed>()
        .and_then(|r| r.upstream.clone())
    {
        return upstream.proxy(request).await;
    }
    match request.uri().path() {
        "/" => live_page().await.into_response(),
        "/healthz" => healthz().await.into_response(),
        "/readyz" => readyz(State(state)).await.into_response(),
        "/metrics" => metrics(State(state)).await.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn live_page() -> Html<&'static str> {
    Html(LIVE_PAGE)
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    mongodb: &'static str,
    change_stream: &'static str,
    auth: &'static str,
    /// Front-door mode: whether Nightscout answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    nightscout: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// 200 only while MongoDB is reachable and answering, the change stream open and the auth
/// data read.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let reachable = *state.mongo_reachable.borrow();
    let answering = *state.mongo_answering.borrow();
    let feed = state.streams.overall();
    let (auth_pending, pending_names) = state.sites.auth_pending();
    let auth_loaded = auth_pending == 0;
    let (upstreams, unreachable) = state.sites.upstreams();
    let nightscout = (upstreams > 0).then_some(unreachable == 0);
    let (change_stream, stream_problem) = match feed {
        FeedStatus::Open => ("open", None),
        FeedStatus::Starting => ("starting", Some("change stream not open yet".to_string())),
        FeedStatus::Down { reason } => ("down", Some(reason)),
    };
    let reason = if !reachable {
        Some("MongoDB unreachable".to_string())
    } else if !answering {
        Some("MongoDB not answering".to_string())
    } else if let Some(problem) = stream_problem {
        Some(problem)
    } else if !auth_loaded {
        Some(match pending_names.as_slice() {
            [] => "auth collections not read yet".to_string(),
            names => format!("auth collections not read yet: {}", names.join(", ")),
        })
    } else if nightscout == Some(false) {
        Some("Nightscout not reachable".to_string())
    } else {
        None
    };
    let body = Readiness {
        ready: reason.is_none(),
        mongodb: match (reachable, answering) {
            (false, _) => "unreachable",
            (true, false) => "not answering",
            (true, true) => "reachable",
        },
        change_stream,
        auth: if auth_loaded { "loaded" } else { "loading" },
        nightscout: nightscout.map(|up| if up { "reachable" } else { "unreachable" }),
        reason,
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    match &state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            handle.render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics are not recorded in this process\n".to_string(),
        ),
    }
}
