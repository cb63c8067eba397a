//! Plain HTTP on the bridge's listener: health, readiness, and the Socket.IO mount.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::store::SnapshotReceiver;
use crate::feed::FeedStatus;

#[derive(Clone)]
pub struct HttpState {
    pub feed: watch::Receiver<FeedStatus>,
    pub auth: SnapshotReceiver,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    change_stream: String,
    auth_loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// 200 only while the change stream is open and the auth data has been read.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let feed = state.feed.borrow().clone();
    let auth_loaded = state.auth.borrow().is_some();
    let (change_stream, reason) = match feed {
        FeedStatus::Open => ("open".to_string(), None),
        FeedStatus::Starting => (
            "starting".to_string(),
            Some("change stream not open yet".to_string()),
        ),
        FeedStatus::Down { reason } => ("down".to_string(), Some(reason)),
    };
    let reason = reason.or_else(|| (!auth_loaded).then(|| "auth collections not read yet".to_string()));
    let ready = reason.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            change_stream,
            auth_loaded,
            reason,
        }),
    )
}
