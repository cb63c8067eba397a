//! Plain HTTP on the bridge's listener: health, readiness, metrics and the live page. In
//! front-door mode they are under [`FRONT_DOOR_PREFIX`], and every other request goes to
//! Nightscout.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::store::SnapshotReceiver;
use crate::feed::FeedStatus;
use crate::upstream::Upstream;

/// Where the bridge's own endpoints are when it stands in front of Nightscout, whose `/`
/// they must not hide.
pub const FRONT_DOOR_PREFIX: &str = "/nsbridge";

/// The sample client of Nightscout's documentation, made useful; self-contained.
const LIVE_PAGE: &str = include_str!("../static/live.html");

#[derive(Clone)]
pub struct HttpState {
    pub feed: watch::Receiver<FeedStatus>,
    pub auth: SnapshotReceiver,
    pub mongo_reachable: watch::Receiver<bool>,
    /// Whether the deployment answered its last ping in time (see `mongo::watch_answering`).
    pub mongo_answering: watch::Receiver<bool>,
    pub metrics: Option<PrometheusHandle>,
    /// Front-door mode: Nightscout, to which every other request goes.
    pub upstream: Option<Arc<Upstream>>,
}

/// The path prefix of the bridge's own endpoints: none, or [`FRONT_DOOR_PREFIX`].
pub fn endpoint_prefix(front_door: bool) -> &'static str {
    if front_door { FRONT_DOOR_PREFIX } else { "" }
}

pub fn router(state: HttpState) -> Router {
    let prefix = endpoint_prefix(state.upstream.is_some());
    let mut router = Router::new()
        .route(&format!("{prefix}/"), get(live_page))
        .route(&format!("{prefix}/healthz"), get(healthz))
        .route(&format!("{prefix}/readyz"), get(readyz))
        .route(&format!("{prefix}/metrics"), get(metrics));
    if state.upstream.is_some() {
        router = router.route(prefix, get(live_page)).fallback(to_nightscout);
    }
    router.with_state(state)
}

async fn to_nightscout(State(state): State<HttpState>, request: Request) -> Response {
    match &state.upstream {
        Some(upstream) => upstream.proxy(request).await,
        None => StatusCode::NOT_FOUND.into_response(),
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
    let feed = state.feed.borrow().clone();
    let auth_loaded = state.auth.borrow().is_some();
    let nightscout = state.upstream.as_ref().map(|u| *u.reachable().borrow());
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
        Some("auth collections not read yet".to_string())
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
