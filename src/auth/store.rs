//! The subject and role store: reads `<prefix>subjects` and `<prefix>roles`, follows their
//! changes with a change stream, and publishes each new [`AuthSnapshot`] to whoever
//! watches (the channel re-checks its subscriptions on every one).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bson::{Document, doc};
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::snapshot::{AuthDataWarning, AuthSnapshot};
use crate::settings::ApiSecret;

/// Warnings remembered so that each bad document is reported once, not on every reload.
const MAX_REMEMBERED_WARNINGS: usize = 10_000;

/// What the channel sees: `None` until the auth collections were read once.
pub type SnapshotReceiver = watch::Receiver<Option<Arc<AuthSnapshot>>>;

pub struct AuthStore {
    db: Database,
    subjects: String,
    roles: String,
    api_secret: ApiSecret,
    default_roles: Vec<String>,
    published: watch::Sender<Option<Arc<AuthSnapshot>>>,
    warned: HashSet<AuthDataWarning>,
}

impl AuthStore {
    pub fn new(db: Database, prefix: &str, api_secret: ApiSecret, default_roles: Vec<String>) -> Self {
        AuthStore {
            db,
            subjects: format!("{prefix}subjects"),
            roles: format!("{prefix}roles"),
            api_secret,
            default_roles,
            published: watch::Sender::new(None),
            warned: HashSet::new(),
        }
    }

    pub fn snapshots(&self) -> SnapshotReceiver {
        self.published.subscribe()
    }

    /// Reads both collections whole (they hold a handful of documents) and publishes.
    pub async fn reload(&mut self) -> Result<(), mongodb::error::Error> {
        let subjects: Vec<Document> = self
            .db
            .collection::<Document>(&self.subjects)
            .find(doc! {})
            .await?
            .try_collect()
            .await?;
        let roles: Vec<Document> = self
            .db
            .collection::<Document>(&self.roles)
            .find(doc! {})
            .await?
            .try_collect()
            .await?;
        let (snapshot, warnings) =
            AuthSnapshot::build(self.api_secret.expose(), &subjects, &roles, &self.default_roles);
        for warning in warnings {
            if self.warned.len() < MAX_REMEMBERED_WARNINGS && self.warned.insert(warning.clone()) {
                tracing::warn!("auth data: {}", warning.0);
            }
        }
        tracing::debug!(subjects = snapshot.len(), "auth data loaded");
        self.published.send_replace(Some(Arc::new(snapshot)));
        Ok(())
    }

    /// Follows changes until shut down: a reload after the stream opens (so nothing
    /// between the read and the stream is missed) and after every change.
    pub async fn run(mut self, shutdown: CancellationToken) {
        const INITIAL_DELAY: Duration = Duration::from_millis(200);
        let mut delay = INITIAL_DELAY;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.follow() => result,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "following the auth collections failed; retrying");
            }
            if started.elapsed() > Duration::from_secs(60) {
                delay = INITIAL_DELAY;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn follow(&mut self) -> Result<(), mongodb::error::Error> {
        let pipeline = [doc! { "$match": { "ns.coll": { "$in": [&self.subjects, &self.roles] } } }];
        let mut stream = self.db.watch().pipeline(pipeline).await?.with_type::<Document>();
        self.reload().await?;
        while let Some(change) = stream.next().await {
            change?;
            self.reload().await?;
        }
        Ok(())
    }
}
