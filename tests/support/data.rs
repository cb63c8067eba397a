//! APIv3-shaped writes and what clients receive of them, shared by the tests.

use mongodb::Database;
use mongodb::bson::{Document, doc};
use serde_json::Value;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An entry as APIv3 stores it (numeric `srvModified` and `srvCreated`), with `padding`
/// bytes of filler to make its event as large as a test needs.
pub async fn write_entry(db: &Database, identifier: &str, padding: usize) {
    let now = now_ms();
    let mut entry = doc! { "identifier": identifier, "sgv": 100, "srvModified": now, "srvCreated": now };
    if padding > 0 {
        entry.insert("padding", "x".repeat(padding));
    }
    db.collection::<Document>("entries")
        .insert_one(entry)
        .await
        .unwrap();
}

pub async fn write_entries(db: &Database, identifiers: &[&str]) {
    for identifier in identifiers {
        write_entry(db, identifier, 0).await;
    }
}

/// The last write of a test: everything written before it arrives before it.
pub fn is_sentinel(payload: &Value) -> bool {
    payload["doc"]["identifier"] == "sentinel"
}

/// The identifier of each `(event, payload)`: the document's, or the delete's.
pub fn identifiers(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, p)| {
            p["doc"]["identifier"]
                .as_str()
                .or(p["identifier"].as_str())
                .unwrap()
                .to_string()
        })
        .collect()
}
