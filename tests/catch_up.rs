//! Catch-up: a client that reconnects gets what it missed. `subscribe` with `since`
//! (socket.io-client 2.2.0 and 4.x), Socket.IO connection state recovery
//! (socket.io-client 4.8), across a bridge restart with a state directory, and from the
//! collections for a `since` older than the history; with real clients, against the
//! bridge binary on the test store.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use mongodb::Database;
use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};
use support::bridge::{Setup, TestBridge, add_subject};
use support::data::now_ms;
use support::puppet::{ClientKind, Puppet};
use support::store::{TestStore, free_port};

const BOTH: [&str; 2] = ["entries", "treatments"];

/// Writes as APIv3 makes them, each with a `srvModified` later than the one before, and
/// the events a client of `entries` and `treatments` must receive for them, in order.
struct Writer {
    db: Database,
    clock: i64,
    /// The stored documents as JSON, without `_id`, by identifier.
    docs: HashMap<String, Value>,
    events: Vec<(String, Value)>,
}

impl Writer {
    fn new(db: &Database) -> Writer {
        Writer {
            db: db.clone(),
            clock: 0,
            docs: HashMap::new(),
            events: Vec::new(),
        }
    }

    fn stamp(&mut self) -> i64 {
        self.clock = now_ms().max(self.clock + 1);
        self.clock
    }

    fn collection(&self, name: &str) -> mongodb::Collection<Document> {
        self.db.collection::<Document>(name)
    }

    async fn create(&mut self, collection: &str, identifier: &str) {
        let t = self.stamp();
        let stored = match collection {
            "entries" => doc! {
                "identifier": identifier, "type": "sgv", "sgv": 120, "date": t,
                "srvModified": t, "srvCreated": t,
            },
            _ => doc! {
                "identifier": identifier, "eventType": "Note", "date": t, "app": "AAPS",
                "srvModified": t, "srvCreated": t, "subject": "apiAll",
            },
        };
        let json = Bson::Document(stored.clone()).into_relaxed_extjson();
        self.collection(collection).insert_one(stored).await.unwrap();
        self.docs.insert(identifier.to_string(), json.clone());
        self.events
            .push(("create".into(), json!({"colName": collection, "doc": json})));
    }

    /// An APIv3-shaped `$set` of `fields` with a new `srvModified`; returns that time.
    async fn set(&mut self, collection: &str, identifier: &str, mut fields: Document) -> i64 {
        let t = self.stamp();
        fields.insert("srvModified", t);
        fields.insert("modifiedBy", "apiAll");
        self.collection(collection)
            .update_one(doc! { "identifier": identifier }, doc! { "$set": fields })
            .await
            .unwrap();
        t
    }

    async fn patch(&mut self, collection: &str, identifier: &str, notes: &str) {
        let t = self.set(collection, identifier, doc! { "notes": notes }).await;
        let json = self.docs.get_mut(identifier).unwrap();
        json["notes"] = json!(notes);
        json["srvModified"] = json!(t);
        json["modifiedBy"] = json!("apiAll");
        let json = json.clone();
        self.events
            .push(("update".into(), json!({"colName": collection, "doc": json})));
    }

    async fn soft_delete(&mut self, collection: &str, identifier: &str) {
        self.set(collection, identifier, doc! { "isValid": false }).await;
        self.deleted(collection, identifier);
    }

    async fn remove(&mut self, collection: &str, identifier: &str) {
        // A permanent delete carries no srvModified: its time is the write's.
        self.stamp();
        self.collection(collection)
            .delete_one(doc! { "identifier": identifier })
            .await
            .unwrap();
        self.deleted(collection, identifier);
    }

    fn deleted(&mut self, collection: &str, identifier: &str) {
        self.docs.remove(identifier);
        self.events.push((
            "delete".into(),
            json!({"colName": collection, "identifier": identifier}),
        ));
    }

    /// The events written from `from` on.
    fn since(&self, from: usize) -> Vec<(String, Value)> {
        self.events[from..].to_vec()
    }
}

/// Thirteen documents for the gap writes to change.
async fn seed(writer: &mut Writer) {
    for i in 0..3 {
        writer.create("entries", &format!("e{i}")).await;
    }
    for i in 0..10 {
        writer.create("treatments", &format!("t{i}")).await;
    }
}

/// Fifty writes in two collections: creates, patches, soft and permanent deletes.
async fn gap_writes(writer: &mut Writer) {
    for i in 0..15 {
        writer.create("entries", &format!("g-e{i}")).await;
        if i < 10 {
            writer.create("treatments", &format!("g-t{i}")).await;
        }
    }
    for i in 0..5 {
        writer
            .patch("treatments", &format!("t{i}"), "patched in the gap")
            .await;
        writer
            .patch("treatments", &format!("g-t{i}"), "patched in the gap")
            .await;
    }
    for (collection, identifier) in [
        ("treatments", "t5"),
        ("entries", "e0"),
        ("treatments", "g-t5"),
        ("entries", "g-e0"),
        ("treatments", "t6"),
        ("entries", "e1"),
        ("treatments", "g-t6"),
        ("entries", "g-e1"),
    ] {
        writer.soft_delete(collection, identifier).await;
    }
    for (collection, identifier) in [
        ("treatments", "t7"),
        ("entries", "e2"),
        ("treatments", "t8"),
        ("treatments", "g-t7"),
        ("entries", "g-e2"),
        ("treatments", "t9"),
        ("treatments", "g-t8"),
    ] {
        writer.remove(collection, identifier).await;
    }
}

/// The largest `srvModified` among `events`: what a client passes as `since`.
fn largest_srv_modified(events: &[(String, Value)]) -> i64 {
    events
        .iter()
        .filter_map(|(_, p)| p["doc"]["srvModified"].as_i64())
        .max()
        .expect("some event carried a document")
}

fn is_identifier(identifier: &'static str) -> impl Fn(&Value) -> bool {
    move |p: &Value| p["doc"]["identifier"] == identifier || p["identifier"] == identifier
}

/// The permanent delete of `identifier`: the last of the gap writes.
fn is_delete_of(identifier: &'static str) -> impl Fn(&Value) -> bool {
    move |p: &Value| p["identifier"] == identifier
}

fn no_events_for(reports: &[Value], id: &str) {
    let events: Vec<&Value> = reports
        .iter()
        .filter(|r| r["id"] == id && r["type"] == "event")
        .collect();
    assert!(events.is_empty(), "{id} received more than expected: {events:#?}");
}

/// Subscribes `id` to both collections with `since`: the ack must announce `events` from
/// the history, complete.
async fn subscribe_since(puppet: &mut Puppet, id: &str, token: &str, since: i64, events: usize) {
    let ack = puppet
        .subscribe(
            id,
            json!({"accessToken": token, "collections": BOTH, "since": since}),
        )
        .await;
    assert_eq!(
        ack,
        [json!({"success": true, "collections": BOTH,
            "replay": {"since": since, "events": events, "complete": true, "from": "history"}})]
    );
}

fn reconnecting(delay_ms: u64) -> Value {
    json!({"reconnection": true, "reconnectionDelay": delay_ms, "reconnectionDelayMax": delay_ms, "randomizationFactor": 0})
}

/// A client subscribed with `since` loses its transport while 50 writes go in, comes
/// back, subscribes with the last `srvModified` it saw: exactly those events, in order,
/// then live ones, nothing twice.
async fn reconnect_with_since(client: &'static str) {
    let s = Setup::start(&format!("catch_up_since_{client}"), &[]).await;
    let mut puppet = Puppet::start().await;
    let kind = ClientKind {
        client,
        websocket_only: false,
    };
    let id = "phone";
    puppet
        .open(id, kind, &s.bridge.url(), &["/storage"], reconnecting(1500))
        .await;
    let connected = puppet.expect(|r| r["id"] == id && r["type"] == "connect").await;
    if client == "v4" {
        assert_eq!(connected["pid"], false, "no private session id unless asked for");
    }
    puppet.wait_for_websocket(id).await;
    let since = now_ms() - 1;
    subscribe_since(&mut puppet, id, &s.reader.token, since, 0).await;

    let mut writer = Writer::new(&s.db);
    seed(&mut writer).await;
    let seen = puppet.events_until(id, is_identifier("t9")).await;
    assert_eq!(seen, writer.since(0));
    let since = largest_srv_modified(&seen);

    puppet.drop_connection(id).await;
    puppet
        .expect(|r| r["id"] == id && r["type"] == "disconnect")
        .await;
    let gap_start = writer.events.len();
    gap_writes(&mut writer).await;
    let missed = writer.since(gap_start);
    assert_eq!(missed.len(), 50);

    // Reconnected by the client itself; it subscribes again with what it saw last.
    puppet.expect(|r| r["id"] == id && r["type"] == "connect").await;
    subscribe_since(&mut puppet, id, &s.reader.token, since, 50).await;
    let replayed = puppet.events_until(id, is_delete_of("g-t8")).await;
    assert_eq!(replayed, missed);

    let live_start = writer.events.len();
    writer.create("treatments", "live-t").await;
    writer.patch("treatments", "g-t9", "live").await;
    writer.create("entries", "sentinel").await;
    let live = puppet.events_until(id, is_identifier("sentinel")).await;
    assert_eq!(live, writer.since(live_start));
    no_events_for(&puppet.drain(Duration::from_millis(300)).await, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4x_client_that_reconnects_with_since_gets_exactly_what_it_missed() {
    reconnect_with_since("v4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2x_client_that_reconnects_with_since_gets_exactly_what_it_missed() {
    reconnect_with_since("v2").await;
}

/// The bridge is stopped with SIGTERM and started again while writes go on: a client
/// that reconnects with `since` gets every write of the gap, from the refilled history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_written_while_the_bridge_restarts_is_lost() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let database = store.database("catch_up_restart");
    let db = client.database(&database);
    let reader = add_subject(&db, "Follower", &["readable"]).await;
    let state = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let state_dir = state.path().to_str().unwrap().to_string();
    let env = [
        ("NSBRIDGE_STATE_DIR", state_dir.as_str()),
        ("NSBRIDGE_LISTEN", listen.as_str()),
    ];
    let mut bridge = TestBridge::start(&store, &database, &env).await;
    bridge.ready().await;
    let url = bridge.url();

    let mut puppet = Puppet::start().await;
    let id = "follower";
    let kind = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    puppet
        .open(id, kind, &url, &["/storage"], reconnecting(500))
        .await;
    puppet.expect_connected(id, "/storage").await;
    let ack = puppet
        .subscribe(id, json!({"accessToken": reader.token, "collections": BOTH}))
        .await;
    assert_eq!(ack, [json!({"success": true, "collections": BOTH})]);

    let mut writer = Writer::new(&db);
    seed(&mut writer).await;
    let seen = puppet.events_until(id, is_identifier("t9")).await;
    assert_eq!(seen, writer.since(0));

    // Writes go on, every 20 ms, while the bridge stops and starts again.
    let gap_start = writer.events.len();
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    let writing = tokio::spawn(async move {
        let mut i = 0;
        loop {
            match i % 4 {
                0 => writer.create("entries", &format!("r-e{i}")).await,
                1 => writer.create("treatments", &format!("r-t{i}")).await,
                2 => {
                    writer
                        .patch("treatments", &format!("r-t{}", i - 1), "patched")
                        .await
                }
                _ => writer.remove("entries", &format!("r-e{}", i - 3)).await,
            }
            i += 1;
            if i % 4 == 0 && stop.try_recv().is_ok() {
                return writer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = bridge.terminate(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: {status:?}\n{}",
        bridge.logs()
    );
    assert!(
        bridge.logs().contains("resume position saved"),
        "{}",
        bridge.logs()
    );
    puppet
        .expect(|r| r["id"] == id && r["type"] == "disconnect")
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let restarted = TestBridge::start(&store, &database, &env).await;
    restarted.ready().await;
    assert!(
        restarted.logs().contains("resuming the change stream"),
        "{}",
        restarted.logs()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop_tx.send(()).unwrap();
    let mut writer = writing.await.unwrap();
    let gap = writer.since(gap_start);
    assert!(gap.len() >= 40, "only {} writes in the gap", gap.len());

    // What it received live before the bridge stopped: the first of the gap writes.
    let reports = puppet.drain(Duration::ZERO).await;
    let received: Vec<(String, Value)> = reports
        .iter()
        .filter(|r| r["id"] == id && r["type"] == "event")
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["args"][0].clone()))
        .collect();
    assert_eq!(
        received,
        gap[..received.len()],
        "received in order before the stop"
    );
    // It asks from the last srvModified it saw: a permanent delete after it carries none,
    // so it comes again.
    let mut seen: Vec<(String, Value)> = writer.since(0)[..gap_start].to_vec();
    seen.extend(received);
    let since = largest_srv_modified(&seen);
    let resume_from = seen
        .iter()
        .rposition(|(_, p)| p["doc"]["srvModified"].as_i64() == Some(since))
        .unwrap()
        + 1;

    let reconnected = reports.iter().any(|r| r["id"] == id && r["type"] == "connect");
    if !reconnected {
        puppet.expect(|r| r["id"] == id && r["type"] == "connect").await;
    }
    let ack = puppet
        .subscribe(
            id,
            json!({"accessToken": reader.token, "collections": BOTH, "since": since}),
        )
        .await;
    assert_eq!(ack[0]["replay"]["complete"], true, "{ack:?}");
    assert_eq!(ack[0]["replay"]["from"], "history", "{ack:?}");
    writer.create("entries", "sentinel").await;
    let got = puppet.events_until(id, is_identifier("sentinel")).await;
    assert_eq!(got, writer.since(resume_from), "{}", restarted.logs());
    no_events_for(&puppet.drain(Duration::from_millis(300)).await, id);
}

/// A `since` from before the history began: the present state of every document changed
/// since then, oldest first, from the collections; the ack says that permanent deletes
/// could not be replayed. Writes in the history as well are not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_older_than_the_history_replays_from_the_collections() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let database = store.database("catch_up_collections");
    let db = client.database(&database);
    let reader = add_subject(&db, "Follower", &["readable"]).await;
    let hour_ago = now_ms() - 3_600_000;
    let treatments = db.collection::<Document>("treatments");
    let entries = db.collection::<Document>("entries");
    // Before the bridge starts: changed documents from an hour ago on.
    let old = |identifier: &str, created: i64, modified: i64| {
        doc! { "identifier": identifier, "eventType": "Note", "date": created,
        "srvCreated": created, "srvModified": modified }
    };
    treatments
        .insert_one(old("before-since", hour_ago - 60_000, hour_ago - 60_000))
        .await
        .unwrap();
    treatments
        .insert_one(old("created", hour_ago + 1000, hour_ago + 1000))
        .await
        .unwrap();
    treatments
        .insert_one(old("changed", hour_ago - 60_000, hour_ago + 2000))
        .await
        .unwrap();
    let mut deleted = old("soft-deleted", hour_ago - 60_000, hour_ago + 3000);
    deleted.insert("isValid", false);
    treatments.insert_one(deleted).await.unwrap();
    entries
        .insert_one(doc! { "identifier": "entry", "sgv": 99, "date": hour_ago + 4000,
        "srvCreated": hour_ago + 4000, "srvModified": hour_ago + 4000 })
        .await
        .unwrap();

    let bridge = TestBridge::start(&store, &database, &[]).await;
    bridge.ready().await;
    // After the start, so in the history too.
    let mut writer = Writer::new(&db);
    writer.create("treatments", "recent").await;
    writer.patch("treatments", "recent", "patched").await;

    let mut puppet = Puppet::start().await;
    let id = "follower";
    let kind = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    puppet.connect(id, kind, &bridge.url()).await;
    let since = hour_ago;
    let ack = puppet
        .subscribe(
            id,
            json!({"accessToken": reader.token, "collections": BOTH, "since": since}),
        )
        .await;
    assert_eq!(
        ack,
        [json!({"success": true, "collections": BOTH, "replay": {
            "since": since, "events": 5, "complete": false, "from": "collections",
            "note": "permanent deletes after since cannot be replayed"}})]
    );
    let got = puppet.events_until(id, is_identifier("recent")).await;
    let names: Vec<(&str, &str)> = got
        .iter()
        .map(|(name, p)| {
            let identifier = p["doc"]["identifier"]
                .as_str()
                .or(p["identifier"].as_str())
                .unwrap();
            (name.as_str(), identifier)
        })
        .collect();
    assert_eq!(
        names,
        [
            ("create", "created"),
            ("update", "changed"),
            ("delete", "soft-deleted"),
            ("create", "entry"),
            // Created after since: a create, of the document as it is now.
            ("create", "recent")
        ]
    );
    // The present state: the patched document, once.
    assert_eq!(got[4].1["doc"]["notes"], "patched");
    assert_eq!(
        got[1].1,
        json!({"colName": "treatments", "doc": {
        "identifier": "changed", "eventType": "Note", "date": hour_ago - 60_000,
        "srvCreated": hour_ago - 60_000, "srvModified": hour_ago + 2000}})
    );
    writer.create("entries", "sentinel").await;
    let live = puppet.events_until(id, is_identifier("sentinel")).await;
    assert_eq!(live, writer.since(2));
    no_events_for(&puppet.drain(Duration::from_millis(300)).await, id);
}

/// Replays give only what the token may read, however they are asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_never_gives_a_collection_the_token_may_not_read() {
    let s = Setup::start("catch_up_permissions", &[("AUTH_DEFAULT_ROLES", "denied")]).await;
    s.db.collection::<Document>("auth_roles")
        .insert_one(doc! { "name": "treatments-reader", "permissions": ["api:treatments:read"] })
        .await
        .unwrap();
    let limited = add_subject(&s.db, "Treatments Only", &["treatments-reader"]).await;
    let mut writer = Writer::new(&s.db);
    let since = now_ms() - 1;
    seed(&mut writer).await;
    gap_writes(&mut writer).await;
    let treatments_only: Vec<(String, Value)> = writer
        .since(0)
        .into_iter()
        .filter(|(_, p)| p["colName"] == "treatments")
        .collect();

    let mut puppet = Puppet::start().await;
    let kind = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    let url = s.bridge.url();
    // From the history, and from the collections (a since before the bridge started).
    for (id, since, from) in [
        ("history", since, "history"),
        ("collections", since - 600_000, "collections"),
    ] {
        puppet.connect(id, kind, &url).await;
        let ack = puppet
            .subscribe(
                id,
                json!({"accessToken": limited.token, "collections": BOTH, "since": since}),
            )
            .await;
        assert_eq!(ack[0]["collections"], json!(["treatments"]), "{ack:?}");
        assert_eq!(ack[0]["replay"]["from"], from, "{ack:?}");
        let last = treatments_only.last().unwrap().1["identifier"]
            .as_str()
            .unwrap()
            .to_string();
        let got = puppet
            .events_until(id, move |p| p["identifier"] == last.as_str())
            .await;
        assert!(
            got.iter().all(|(_, p)| p["colName"] == "treatments"),
            "{id}: {got:#?}"
        );
        if from == "history" {
            assert_eq!(got, treatments_only);
        }
    }
    writer.create("entries", "entry-sentinel").await;
    writer.create("treatments", "sentinel").await;
    for id in ["history", "collections"] {
        let live = puppet.events_until(id, is_identifier("sentinel")).await;
        assert_eq!(live, writer.since(writer.events.len() - 1), "{id}");
    }
    let rest = puppet.drain(Duration::from_millis(300)).await;
    no_events_for(&rest, "history");
    no_events_for(&rest, "collections");
}

/// `since` values that cannot be replayed get a clear answer and a live subscription,
/// never a scan of the whole database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_since_values_get_a_clear_answer() {
    let s = Setup::start("catch_up_bad_since", &[]).await;
    let mut puppet = Puppet::start().await;
    let kind = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    let url = s.bridge.url();
    let cases = [
        (
            json!("yesterday"),
            "since must be a number of milliseconds (a srvModified)",
        ),
        (
            json!(null),
            "since must be a number of milliseconds (a srvModified)",
        ),
        (json!(-5), "since must not be negative"),
        (json!(now_ms() + 3_600_000), "since is in the future"),
        (
            json!(0),
            "since is older than the replay limit (replay.max_since_age_days): load older data through the REST API",
        ),
    ];
    for (i, (since, note)) in cases.iter().enumerate() {
        let id = format!("c{i}");
        puppet.connect(&id, kind, &url).await;
        let ack = puppet
            .subscribe(
                &id,
                json!({"accessToken": s.reader.token, "collections": ["entries"], "since": since}),
            )
            .await;
        assert_eq!(
            ack,
            [json!({"success": true, "collections": ["entries"],
                "replay": {"since": since, "events": 0, "complete": false, "note": note}})]
        );
    }
    let mut writer = Writer::new(&s.db);
    writer.create("entries", "sentinel").await;
    for i in 0..cases.len() {
        let got = puppet
            .events_until(&format!("c{i}"), is_identifier("sentinel"))
            .await;
        assert_eq!(got, writer.since(0));
    }
}

/// socket.io-client 4.8 with connection state recovery: after a 5-second transport drop
/// it is `recovered`, subscribed as before, and gets what it missed, with offsets; after
/// the window it is not, and subscribes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_recovery_after_a_transport_drop() {
    let s = Setup::start(
        "catch_up_recovery",
        &[("NSBRIDGE_HISTORY__RECOVERY_WINDOW_SECS", "8")],
    )
    .await;
    let mut puppet = Puppet::start().await;
    let kind = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    let url = s.bridge.url();
    let mut options = reconnecting(5000);
    options["auth"] = json!({"recovery": true});
    let id = "recovering";
    puppet.open(id, kind, &url, &["/storage"], options).await;
    let connected = puppet.expect(|r| r["id"] == id && r["type"] == "connect").await;
    assert_eq!(
        (connected["recovered"].clone(), connected["pid"].clone()),
        (json!(false), json!(true))
    );
    // Nightscout's ack, unchanged.
    let ack = puppet
        .subscribe(id, json!({"accessToken": s.reader.token, "collections": BOTH}))
        .await;
    assert_eq!(ack, [json!({"success": true, "collections": BOTH})]);

    let mut writer = Writer::new(&s.db);
    seed(&mut writer).await;
    let seen = puppet.events_with_offsets_until(id, is_identifier("t9")).await;
    let payloads: Vec<(String, Value)> = seen.iter().map(|(n, p, _)| (n.clone(), p.clone())).collect();
    assert_eq!(payloads, writer.since(0));
    let offsets: Vec<u64> = seen.iter().map(|(_, _, o)| o.parse().unwrap()).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets increase: {offsets:?}"
    );

    puppet.drop_connection(id).await;
    let dropped_at = std::time::Instant::now();
    puppet
        .expect(|r| r["id"] == id && r["type"] == "disconnect")
        .await;
    let gap_start = writer.events.len();
    gap_writes(&mut writer).await;
    let connected = puppet.expect(|r| r["id"] == id && r["type"] == "connect").await;
    assert!(dropped_at.elapsed() >= Duration::from_secs(5));
    assert_eq!(connected["recovered"], true, "{connected}");
    // No new subscribe: the missed events, then live ones.
    let missed = puppet.events_with_offsets_until(id, is_delete_of("g-t8")).await;
    let payloads: Vec<(String, Value)> = missed.iter().map(|(n, p, _)| (n.clone(), p.clone())).collect();
    assert_eq!(payloads, writer.since(gap_start));
    let live_start = writer.events.len();
    writer.create("entries", "sentinel").await;
    let live = puppet
        .events_with_offsets_until(id, is_identifier("sentinel"))
        .await;
    assert_eq!(live.len(), 1);
    assert_eq!(
        (live[0].0.clone(), live[0].1.clone()),
        writer.events[live_start].clone()
    );
    no_events_for(&puppet.drain(Duration::from_millis(300)).await, id);

    // Dropped longer than the window: not recovered; it subscribes again.
    let mut options = reconnecting(9000);
    options["auth"] = json!({"recovery": true});
    puppet.open("late", kind, &url, &["/storage"], options).await;
    puppet
        .expect(|r| r["id"] == "late" && r["type"] == "connect")
        .await;
    puppet
        .subscribe(
            "late",
            json!({"accessToken": s.reader.token, "collections": BOTH}),
        )
        .await;
    puppet.drop_connection("late").await;
    puppet
        .expect(|r| r["id"] == "late" && r["type"] == "disconnect")
        .await;
    writer.create("entries", "while-away").await;
    let connected = puppet
        .expect_within(Duration::from_secs(30), |r| {
            r["id"] == "late" && r["type"] == "connect"
        })
        .await
        .expect("reconnected");
    assert_eq!(
        (connected["recovered"].clone(), connected["pid"].clone()),
        (json!(false), json!(true))
    );
    writer.create("entries", "after").await;
    let rest = puppet.drain(Duration::from_millis(500)).await;
    no_events_for(&rest, "late");
}
