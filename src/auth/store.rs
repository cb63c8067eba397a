//! The subject and role store: reads `<prefix>subjects` and `<prefix>roles` whenever the
//! change stream of its site's database sees them change, and publishes each new
//! [`AuthSnapshot`] to whoever watches (the channel re-checks its subscriptions on every
//! one).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bson::{Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use tokio::sync::{Notify, watch};
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

    /// Reads the auth data now and again whenever `changed` is notified (the change
    /// stream sees a write to either collection, or opens), until shut down. A failed read
    /// is retried with capped backoff; the last snapshot stays published meanwhile.
    pub async fn run(mut self, changed: Arc<Notify>, shutdown: CancellationToken) {
        const INITIAL_DELAY: Duration = Duration::from_millis(200);
        let mut delay = INITIAL_DELAY;
        loop {
            match self.reload().await {
                Ok(()) => {
                    delay = INITIAL_DELAY;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = changed.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the auth collections failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// The names of the two collections, for the change stream that watches them.
    pub fn collections(&self) -> [String; 2] {
        [self.subjects.clone(), self.roles.clone()]
    }
}
