//! The bridge's own state: its position in the change stream, kept across restarts so that
//! a restarted bridge reads the stream again from where its history started, refills the
//! history, and goes on live exactly after the last event it sent.
//!
//! Kept per site: a small JSON file in `state_dir` (`position-<site>.json`, written whole
//! to a temporary file, then renamed over the old one), or one document in the site's
//! database's `state_collection`; nothing else is ever written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, doc};
use mongodb::Database;
use mongodb::change_stream::event::ResumeToken;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::channel::SiteChannel;
use crate::history::Checkpoint;
use crate::settings::StateLocation;
use crate::telemetry::metric;

/// How often the position is saved when it has moved.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

const FORMAT_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {dir}: {source}")]
    Directory { dir: PathBuf, source: std::io::Error },
    #[error("state file {file}: {source}")]
    File { file: PathBuf, source: std::io::Error },
    #[error("state file {file}: not a saved position ({reason})")]
    Malformed { file: String, reason: String },
    #[error("state collection {collection}: {source}")]
    Collection {
        collection: String,
        source: mongodb::error::Error,
    },
}

/// The saved form of a [`Checkpoint`].
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Saved {
    version: u32,
    database: String,
    /// The resume token, as MongoDB extended JSON.
    token: serde_json::Value,
    seq: u64,
    /// The resume token after the last event sent.
    sent_token: serde_json::Value,
    complete_after_ms: i64,
}

impl Saved {
    fn of(database: &str, checkpoint: &Checkpoint) -> Saved {
        Saved {
            version: FORMAT_VERSION,
            database: database.to_string(),
            token: checkpoint.token.clone().into_relaxed_extjson(),
            seq: checkpoint.seq,
            sent_token: checkpoint.sent_token.clone().into_relaxed_extjson(),
            complete_after_ms: checkpoint.complete_after_ms,
        }
    }

    fn checkpoint(self, database: &str) -> Result<Checkpoint, String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} (expected {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.database != database {
            return Err(format!("saved for database {:?}", self.database));
        }
        let token = |value: serde_json::Value| {
            let token = Bson::try_from(value).map_err(|e| format!("resume token: {e}"))?;
            if !matches!(token, Bson::Document(_)) {
                return Err("the resume token is not a document".to_string());
            }
            Ok(token)
        };
        let (token, sent_token) = (token(self.token)?, token(self.sent_token)?);
        if crate::history::position(&sent_token) < crate::history::position(&token) {
            return Err("its last event sent is before its checkpoint".into());
        }
        Ok(Checkpoint {
            token,
            seq: self.seq,
            sent_token,
            complete_after_ms: self.complete_after_ms,
        })
    }
}

/// Where a stream serving the sites of `checkpoints` resumes from: the oldest of them.
pub fn resume_token<'a>(checkpoints: impl IntoIterator<Item = &'a Checkpoint>) -> Option<ResumeToken> {
    let oldest = checkpoints
        .into_iter()
        .filter(|c| crate::history::position(&c.token).is_some())
        .min_by(|a, b| crate::history::position(&a.token).cmp(&crate::history::position(&b.token)))?;
    bson::from_bson(oldest.token.clone()).ok()
}

#[derive(Clone)]
pub enum StateStore {
    None,
    Directory { file: PathBuf, database: String },
    Collection { db: Database, name: String },
}

impl StateStore {
    /// The state of site `tenant`, whose database is `db`.
    pub fn new(location: &StateLocation, tenant: &str, db: &Database) -> StateStore {
        match location {
            StateLocation::None => StateStore::None,
            StateLocation::Directory(dir) => StateStore::Directory {
                file: dir.join(file_name(tenant)),
                database: db.name().to_string(),
            },
            StateLocation::Collection(name) => StateStore::Collection {
                db: db.clone(),
                name: name.clone(),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            StateStore::None => "none".into(),
            StateStore::Directory { file, .. } => file.display().to_string(),
            StateStore::Collection { name, .. } => format!("collection {name}"),
        }
    }

    /// Creates the state directory if need be and checks it can be written, so that a
    /// misconfigured volume is reported at start-up rather than at the first save.
    pub fn prepare(&self) -> Result<(), StateError> {
        let StateStore::Directory { file, .. } = self else {
            return Ok(());
        };
        let dir = file.parent().unwrap_or(Path::new("."));
        let fail = |source| StateError::Directory {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        let probe = dir.join(".nsbridge-write-test");
        std::fs::write(&probe, b"").map_err(fail)?;
        std::fs::remove_file(&probe).map_err(fail)
    }

    /// The checkpoint the last run saved, if any. A saved position that cannot be used
    /// is an error: the caller says so and starts from the present.
    pub async fn load(&self) -> Result<Option<Checkpoint>, StateError> {
        match self {
            StateStore::None => Ok(None),
            StateStore::Directory { file, database } => {
                let text = match tokio::fs::read(file).await {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => {
                        return Err(StateError::File {
                            file: file.clone(),
                            source,
                        });
                    }
                };
                let malformed = |reason: String| StateError::Malformed {
                    file: file.display().to_string(),
                    reason,
                };
                let saved: Saved = serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
                saved.checkpoint(database).map(Some).map_err(malformed)
            }
            StateStore::Collection { db, name } => {
                let found = db
                    .collection::<bson::Document>(name)
                    .find_one(doc! { "_id": document_id(db.name()) })
                    .await
                    .map_err(|source| StateError::Collection {
                        collection: name.clone(),
                        source,
                    })?;
                let Some(mut found) = found else {
                    return Ok(None);
                };
                found.remove("_id");
                let malformed = |reason: String| StateError::Malformed {
                    file: format!("collection {name}"),
                    reason,
                };
                let saved: Saved = bson::from_document(found).map_err(|e| malformed(e.to_string()))?;
                saved.checkpoint(db.name()).map(Some).map_err(malformed)
            }
        }
    }

    pub async fn save(&self, checkpoint: &Checkpoint) -> Result<(), StateError> {
        match self {
            StateStore::None => Ok(()),
            StateStore::Directory { file, database } => {
                let text = serde_json::to_vec_pretty(&Saved::of(database, checkpoint))
                    .expect("a saved position serialises");
                let file = file.clone();
                tokio::task::spawn_blocking(move || write_atomically(&file, &text))
                    .await
                    .expect("the state writer does not panic")
            }
            StateStore::Collection { db, name } => {
                let mut saved =
                    bson::to_document(&Saved::of(db.name(), checkpoint)).expect("a saved position is BSON");
                saved.insert("_id", document_id(db.name()));
                db.collection::<bson::Document>(name)
                    .replace_one(doc! { "_id": document_id(db.name()) }, saved)
                    .upsert(true)
                    .await
                    .map(|_| ())
                    .map_err(|source| StateError::Collection {
                        collection: name.clone(),
                        source,
                    })
            }
        }
    }
}

fn file_name(tenant: &str) -> String {
    // Site names are validated, but a single site is named after its database.
    let safe: String = tenant
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("position-{safe}.json")
}

fn document_id(database: &str) -> String {
    format!("position:{database}")
}

fn write_atomically(file: &Path, text: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    let fail = |source| StateError::File {
        file: file.to_path_buf(),
        source,
    };
    let temporary = file.with_extension("json.tmp");
    let mut out = std::fs::File::create(&temporary).map_err(fail)?;
    out.write_all(text).map_err(fail)?;
    out.sync_all().map_err(fail)?;
    std::fs::rename(&temporary, file).map_err(fail)
}

/// Saves the channel's checkpoint whenever it moved, every [`SAVE_INTERVAL`], until shut
/// down; the caller saves once more when the feed has stopped.
pub async fn keep_saving(store: StateStore, channel: Arc<SiteChannel>, shutdown: CancellationToken) {
    if matches!(store, StateStore::None) {
        return;
    }
    let mut tick = tokio::time::interval(SAVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved: Option<Checkpoint> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(checkpoint) = channel.checkpoint() else {
            continue;
        };
        if saved.as_ref() == Some(&checkpoint) {
            continue;
        }
        match store.save(&checkpoint).await {
            Ok(()) => {
                if failing {
                    tracing::info!(state = %store.describe(), "resume position saved again");
                }
                failing = false;
                saved = Some(checkpoint);
            }
            Err(e) => {
                metrics::counter!(metric::STATE_SAVE_FAILURES).increment(1);
                if !failing {
                    tracing::error!(error = %e, "cannot save the resume position: a restart would start from the present");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            token: Bson::Document(doc! { "_data": "8265A1B2C3000000012B022C0100296E5A1004" }),
            seq: 120,
            sent_token: Bson::Document(doc! { "_data": "8265A1B2C3000000452B022C0100296E5A1004" }),
            complete_after_ms: 1_700_000_000_000,
        }
    }

    #[tokio::test]
    async fn a_saved_position_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::Directory {
            file: dir.path().join("state").join(file_name("nightscout")),
            database: "nightscout".into(),
        };
        store.prepare().unwrap();
        assert!(store.load().await.unwrap().is_none(), "nothing saved yet");
        store.save(&checkpoint()).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(checkpoint()));
        // Saved again over the old one, with no temporary file left behind.
        let later = Checkpoint {
            seq: 200,
            token: Bson::Document(doc! { "_data": "8265A1B2C3000000222B022C0100296E5A1004" }),
            ..checkpoint()
        };
        // A stream for both resumes from the older.
        let token = resume_token([&later, &checkpoint()]).unwrap();
        assert_eq!(bson::to_bson(&token).unwrap(), checkpoint().token);
        store.save(&later).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(later));
        let files: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["position-nightscout.json"]);
    }

    #[tokio::test]
    async fn an_unusable_file_is_an_error_not_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("position-ns.json");
        let store = StateStore::Directory {
            file: file.clone(),
            database: "ns".into(),
        };
        for (text, reason) in [
            ("not json", "expected ident"),
            (
                r#"{"version":1,"database":"ns","token":{"_data":"x"},"seq":1,"sent_token":{"_data":"x"},"complete_after_ms":0}"#,
                "format version 1",
            ),
            (
                r#"{"version":2,"database":"other","token":{"_data":"x"},"seq":1,"sent_token":{"_data":"x"},"complete_after_ms":0}"#,
                "saved for database \"other\"",
            ),
            (
                r#"{"version":2,"database":"ns","token":"x","seq":1,"sent_token":{"_data":"x"},"complete_after_ms":0}"#,
                "not a document",
            ),
            (
                r#"{"version":2,"database":"ns","token":{"_data":"b"},"seq":5,"sent_token":{"_data":"a"},"complete_after_ms":0}"#,
                "before its checkpoint",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let error = store.load().await.unwrap_err().to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn an_unwritable_directory_is_reported_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        let store = StateStore::Directory {
            file: blocker.join(file_name("ns")),
            database: "ns".into(),
        };
        let error = store.prepare().unwrap_err().to_string();
        assert!(error.starts_with("state directory"), "{error}");
    }

    #[test]
    fn file_names_are_safe_whatever_the_database_is_called() {
        assert_eq!(file_name("nightscout"), "position-nightscout.json");
        assert_eq!(file_name("../etc"), "position-___etc.json");
    }
}
