//! Plain HTTP on the bridge's listener: health, readiness, metrics and the live page.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::store::SnapshotReceiver;
use crate::feed::FeedStatus;

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
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(live_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
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
