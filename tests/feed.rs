//! The change feed against a real MongoDB wire-protocol server: scripted APIv3-shaped and
//! APIv1-shaped writes through the Rust driver give exactly the expected bridge events,
//! in order, and nothing else.

mod support;

use std::num::NonZeroUsize;
use std::time::Duration;

use mongodb::Database;
use mongodb::bson::{Document, doc, oid::ObjectId};
use mongodb::options::ReplaceOptions;
use nsbridge::collections::CollectionNames;
use nsbridge::delivery::DeliveryWindow;
use nsbridge::feed::{Feed, FeedEvent, FeedStatus};
use nsbridge::mapping::{Mapper, MappingRules, RelayMode};
use support::data::{now_ms, write_entries};
use support::store::TestStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct RunningFeed {
    events: mpsc::Receiver<FeedEvent>,
    shutdown: CancellationToken,
}

impl Drop for RunningFeed {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_feed(db: &Database, relay: RelayMode) -> RunningFeed {
    let rules = MappingRules {
        relay,
        replace_window_ms: 60_000,
        names: CollectionNames::default(),
    };
    let feed = Feed::for_database(db, Mapper::new(rules, NonZeroUsize::new(1000).unwrap()), false);
    let mut status = feed.status();
    let (tx, events) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    tokio::spawn(feed.run(tx, DeliveryWindow::new(1024), shutdown.clone()));
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| *s == FeedStatus::Open),
    )
    .await
    .expect("change stream did not open")
    .unwrap();
    RunningFeed { events, shutdown }
}

/// `(event name, payload JSON)` of every event up to and including the sentinel, the
/// devicestatus document with identifier `sentinel`.
async fn events_until_sentinel(feed: &mut RunningFeed) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), feed.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no sentinel; events so far: {seen:#?}"))
            .expect("feed stopped")
            .event;
        let item = (event.kind.name().to_string(), event.payload_json());
        let done = item
            .1
            .starts_with(r#"{"colName":"devicestatus","doc":{"identifier":"sentinel""#);
        seen.push(item);
        if done {
            return seen;
        }
    }
}
async fn write_sentinel(db: &Database) -> i64 {
    let now = now_ms();
    db.collection::<Document>("devicestatus")
        .insert_one(doc! { "identifier": "sentinel", "srvModified": now, "srvCreated": now })
        .await
        .unwrap();
    now
}

fn sentinel_event(now: i64) -> (String, String) {
    (
        "create".into(),
        format!(
            r#"{{"colName":"devicestatus","doc":{{"identifier":"sentinel","srvModified":{now},"srvCreated":{now}}}}}"#
        ),
    )
}

/// The series of writes APIv3 and APIv1 make for one treatment's life, plus an entry,
/// a write to an unwatched collection and the sentinel. Returns the `now` it stamped.
async fn scripted_writes(db: &Database) -> (i64, ObjectId) {
    let treatments = db.collection::<Document>("treatments");
    let now = now_ms();
    let v1_id = ObjectId::new();
    let upsert = ReplaceOptions::builder().upsert(true).build();

    // APIv3 create.
    treatments
        .insert_one(doc! {
            "identifier": "t1", "date": 1_700_000_000_000_i64, "utcOffset": 0, "app": "AAPS",
            "eventType": "Note", "created_at": "2023-11-14T22:13:20.000Z",
            "srvModified": now, "srvCreated": now, "subject": "apiAll",
        })
        .await
        .unwrap();
    // APIv1 insert: no srv fields, no identifier.
    treatments
        .insert_one(doc! { "_id": v1_id, "eventType": "Note", "notes": "v1", "created_at": "2023-11-14T22:13:20.000Z" })
        .await
        .unwrap();
    // APIv3 update (PUT) of the existing document: replace with a fresh srvModified.
    treatments
        .replace_one(
            doc! { "identifier": "t1" },
            doc! {
                "identifier": "t1", "date": 1_700_000_000_000_i64, "utcOffset": 0, "app": "AAPS",
                "eventType": "Note", "notes": "put", "created_at": "2023-11-14T22:13:20.000Z",
                "srvModified": now + 1, "srvCreated": now, "subject": "apiAll",
            },
        )
        .with_options(upsert.clone())
        .await
        .unwrap();
    // APIv1 replace writing back a stale srvModified it read an hour ago.
    treatments
        .replace_one(
            doc! { "identifier": "t1" },
            doc! {
                "identifier": "t1", "date": 1_700_000_000_000_i64, "utcOffset": 0, "app": "AAPS",
                "eventType": "Note", "notes": "v1 put", "created_at": "2023-11-14T22:13:20.000Z",
                "srvModified": now - 3_600_000, "srvCreated": now, "subject": "apiAll",
            },
        )
        .await
        .unwrap();
    // APIv3 patch.
    treatments
        .update_one(
            doc! { "identifier": "t1" },
            doc! { "$set": { "notes": "patched", "srvModified": now + 2, "modifiedBy": "apiAll" } },
        )
        .await
        .unwrap();
    // APIv1 $set without srvModified.
    treatments
        .update_one(doc! { "_id": v1_id }, doc! { "$set": { "notes": "v1 edit" } })
        .await
        .unwrap();
    // APIv3 soft delete.
    treatments
        .update_one(
            doc! { "identifier": "t1" },
            doc! { "$set": { "isValid": false, "srvModified": now + 3, "modifiedBy": "apiAll" } },
        )
        .await
        .unwrap();
    // APIv3 update (PUT) of a missing document: the upsert inserts.
    treatments
        .replace_one(
            doc! { "identifier": "t2" },
            doc! { "identifier": "t2", "eventType": "Note", "srvModified": now + 4, "srvCreated": now + 4, "subject": "apiAll" },
        )
        .with_options(upsert)
        .await
        .unwrap();
    // APIv3 permanent delete, and an APIv1 delete (origin cannot be told: relayed).
    treatments.delete_one(doc! { "identifier": "t2" }).await.unwrap();
    treatments.delete_one(doc! { "_id": v1_id }).await.unwrap();
    // An entry through APIv3, and a write to a collection the bridge does not watch.
    db.collection::<Document>("entries")
        .insert_one(doc! {
            "identifier": "e1", "type": "sgv", "sgv": 120, "date": 1_700_000_000_000_i64,
            "srvModified": now, "srvCreated": now,
        })
        .await
        .unwrap();
    db.collection::<Document>("activity")
        .insert_one(doc! { "identifier": "a1", "srvModified": now, "srvCreated": now })
        .await
        .unwrap();
    (now, v1_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiv3_writes_become_events_and_apiv1_writes_do_not() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("feed_apiv3"));
    let mut feed = start_feed(&db, RelayMode::Apiv3).await;

    let (now, v1_id) = scripted_writes(&db).await;
    let sentinel_now = write_sentinel(&db).await;
    let mut got = events_until_sentinel(&mut feed).await;
    assert_eq!(got.pop(), Some(sentinel_event(sentinel_now)));

    let t1 = |notes: Option<&str>, srv_modified: i64, extra: &str| {
        let notes = notes.map(|n| format!(r#""notes":"{n}","#)).unwrap_or_default();
        format!(
            r#"{{"colName":"treatments","doc":{{"identifier":"t1","date":1700000000000,"utcOffset":0,"app":"AAPS","eventType":"Note",{notes}"created_at":"2023-11-14T22:13:20.000Z","srvModified":{srv_modified},"srvCreated":{now},"subject":"apiAll"{extra}}}}}"#
        )
    };
    let expected: Vec<(String, String)> = vec![
        ("create".into(), t1(None, now, "")),
        ("update".into(), t1(Some("put"), now + 1, "")),
        (
            "update".into(),
            t1(Some("patched"), now + 2, r#","modifiedBy":"apiAll""#),
        ),
        (
            "delete".into(),
            r#"{"colName":"treatments","identifier":"t1"}"#.into(),
        ),
        (
            "create".into(),
            format!(
                r#"{{"colName":"treatments","doc":{{"identifier":"t2","eventType":"Note","srvModified":{},"srvCreated":{},"subject":"apiAll"}}}}"#,
                now + 4,
                now + 4
            ),
        ),
        (
            "delete".into(),
            r#"{"colName":"treatments","identifier":"t2"}"#.into(),
        ),
        (
            "delete".into(),
            format!(r#"{{"colName":"treatments","identifier":"{}"}}"#, v1_id.to_hex()),
        ),
        (
            "create".into(),
            format!(
                r#"{{"colName":"entries","doc":{{"identifier":"e1","type":"sgv","sgv":120,"date":1700000000000,"srvModified":{now},"srvCreated":{now}}}}}"#
            ),
        ),
    ];
    assert_eq!(got, expected);
    assert!(feed.events.try_recv().is_err(), "nothing after the sentinel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_all_relays_apiv1_writes_with_identifier_and_srv_modified() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("feed_all"));
    let mut feed = start_feed(&db, RelayMode::All).await;

    let (_now, v1_id) = scripted_writes(&db).await;
    write_sentinel(&db).await;
    let got = events_until_sentinel(&mut feed).await;
    let names: Vec<&str> = got.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "create", "create", "update", "update", "update", "update", "delete", "create", "delete",
            "delete", "create", "create"
        ],
        "{got:#?}"
    );
    // The APIv1 insert gains its _id as identifier and the write's time as srvModified.
    let v1_create: serde_json::Value = serde_json::from_str(&got[1].1).unwrap();
    let doc = &v1_create["doc"];
    assert_eq!(doc["identifier"], v1_id.to_hex());
    assert_eq!(doc["notes"], "v1");
    let srv_modified = doc["srvModified"].as_i64().expect("numeric srvModified");
    assert!(
        (srv_modified - now_ms()).abs() < 60_000,
        "srvModified {srv_modified} is the write's wall time"
    );
    assert!(doc.get("_id").is_none());
    // The stale APIv1 replace and the APIv1 $set are updates in this mode.
    assert!(got[3].1.contains(r#""notes":"v1 put""#), "{}", got[3].1);
    assert!(got[5].1.contains(r#""notes":"v1 edit""#), "{}", got[5].1);
    assert_eq!(
        got[9].1,
        format!(r#"{{"colName":"treatments","identifier":"{}"}}"#, v1_id.to_hex())
    );
    assert!(feed.events.try_recv().is_err(), "nothing after the sentinel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_collection_names_are_watched_under_logical_names() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("feed_names"));
    let rules = MappingRules {
        relay: RelayMode::Apiv3,
        replace_window_ms: 60_000,
        names: CollectionNames {
            entries: "sgv_data".into(),
            ..Default::default()
        },
    };
    let feed = Feed::for_database(&db, Mapper::new(rules, NonZeroUsize::new(10).unwrap()), false);
    let mut status = feed.status();
    let (tx, mut events) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    tokio::spawn(feed.run(tx, DeliveryWindow::new(16), shutdown.clone()));
    status.wait_for(|s| *s == FeedStatus::Open).await.unwrap();

    let now = now_ms();
    for coll in ["entries", "sgv_data"] {
        db.collection::<Document>(coll)
            .insert_one(doc! { "identifier": coll, "srvModified": now, "srvCreated": now })
            .await
            .unwrap();
    }
    write_sentinel(&db).await;
    let first = tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.event.payload_json(),
        format!(
            r#"{{"colName":"entries","doc":{{"identifier":"sgv_data","srvModified":{now},"srvCreated":{now}}}}}"#
        )
    );
    let second = tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(second.event.payload_json().contains("sentinel"));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_read_no_faster_than_the_window_admits() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("feed_window"));
    let rules = MappingRules {
        relay: RelayMode::Apiv3,
        replace_window_ms: 60_000,
        names: CollectionNames::default(),
    };
    let feed = Feed::for_database(&db, Mapper::new(rules, NonZeroUsize::new(10).unwrap()), false);
    let mut status = feed.status();
    let window = DeliveryWindow::new(3);
    let (tx, mut events) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    tokio::spawn(feed.run(tx, window.clone(), shutdown.clone()));
    status.wait_for(|s| *s == FeedStatus::Open).await.unwrap();

    let identifiers: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    let names: Vec<&str> = identifiers.iter().map(String::as_str).collect();
    write_entries(&db, &names).await;
    let next = |events: &mut mpsc::Receiver<FeedEvent>| events.try_recv().ok();
    // Three events are admitted; the slots are held, as by sockets that have not written.
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while held.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} events",
            held.len()
        );
        if let Some(event) = next(&mut events) {
            held.push(event);
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(next(&mut events).is_none(), "read past a full window");
    assert_eq!(window.in_flight(), 3);
    // The backlog stays in MongoDB and arrives, in order, as slots come back.
    let identifier = |event: &FeedEvent| {
        let json: serde_json::Value = serde_json::from_str(&event.event.payload_json()).unwrap();
        json["doc"]["identifier"].as_str().unwrap().to_string()
    };
    let mut received = held.len();
    let mut order = Vec::new();
    while !held.is_empty() {
        let event = held.remove(0);
        order.push(identifier(&event));
        drop(event);
        if received < identifiers.len() {
            let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .expect("a freed slot admits the next event")
                .unwrap();
            received += 1;
            held.push(event);
            assert!(window.in_flight() <= 3);
        }
    }
    assert_eq!(order, identifiers);
    // Readiness is not affected by the wait.
    assert_eq!(*status.borrow(), FeedStatus::Open);
    shutdown.cancel();
}

/// Spec §3: the APIv3 PATCH of a document that APIv1 wrote, addressed by its `_id`, sends
/// the document as APIv3 normalises it: with `identifier` (the `_id`) and `srvCreated`
/// (from `created_at`), which AndroidAPS needs to match it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiv3_patch_of_an_apiv1_document_is_sent_normalised() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("feed_normalised"));
    let mut feed = start_feed(&db, RelayMode::Apiv3).await;

    let treatments = db.collection::<Document>("treatments");
    let id = ObjectId::new();
    treatments
        .insert_one(
            doc! { "_id": id, "eventType": "Note", "created_at": "2023-11-14T22:13:20.000Z", "notes": "v1" },
        )
        .await
        .unwrap();
    let now = now_ms();
    treatments
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "notes": "patched", "srvModified": now, "modifiedBy": "apiAll" } },
        )
        .await
        .unwrap();
    let sentinel_now = write_sentinel(&db).await;
    let mut got = events_until_sentinel(&mut feed).await;
    assert_eq!(got.pop(), Some(sentinel_event(sentinel_now)));
    let hex = id.to_hex();
    assert_eq!(
        got,
        vec![(
            "update".to_string(),
            format!(
                r#"{{"colName":"treatments","doc":{{"eventType":"Note","created_at":"2023-11-14T22:13:20.000Z","notes":"patched","srvModified":{now},"modifiedBy":"apiAll","identifier":"{hex}","srvCreated":1700000000000}}}}"#
            )
        )]
    );
}
