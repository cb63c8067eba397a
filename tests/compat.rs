//! The `/storage` channel with the real Node clients of its users: socket.io-client
//! 2.2.0 and 4.x, each over default transports and websocket only, against the bridge
//! binary running on the test MongoDB.

mod support;

use std::time::{Duration, Instant};

use mongodb::Database;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use support::bridge::{API_SECRET, Setup, add_subject};
use support::data::{identifiers, is_sentinel, now_ms, write_entry};
use support::puppet::{ClientKind, MATRIX, Puppet};

fn id_of(i: usize, kind: ClientKind) -> String {
    format!(
        "c{i}-{}-{}",
        kind.client,
        if kind.websocket_only { "ws" } else { "default" }
    )
}

const ALL_BUT_SETTINGS: [&str; 5] = ["devicestatus", "entries", "food", "profile", "treatments"];

fn bad_token() -> Value {
    json!({"success": false, "message": "Missing or bad accessToken"})
}

fn unauthorized() -> Value {
    json!({"success": false, "message": "Unauthorized to receive any collection"})
}

/// Asserts nothing in `reports` for `id` is an event.
fn assert_no_events(reports: &[Value], id: &str) {
    let events: Vec<&Value> = reports
        .iter()
        .filter(|r| r["id"] == id && r["type"] == "event")
        .collect();
    assert!(events.is_empty(), "{id} received unexpected events: {events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ack_case_of_subscribe() {
    // Fast failure acks: this test is about their content, not their pace. No default
    // role, so that the uploader's token is valid but reads nothing.
    let s = Setup::start(
        "compat_acks",
        &[
            ("NSBRIDGE_AUTH__FAILURE_DELAY_MS", "1"),
            ("AUTH_DEFAULT_ROLES", "denied"),
        ],
    )
    .await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    for (i, kind) in MATRIX.into_iter().enumerate() {
        let id = id_of(i, kind);
        puppet.connect(&id, kind, &url).await;
        let cases: Vec<(Value, Value)> = vec![
            (json!("just a string"), bad_token()),
            (json!({}), bad_token()),
            (json!({"collections": ["entries"]}), bad_token()),
            (json!({"accessToken": 12345}), bad_token()),
            (json!({"accessToken": ""}), bad_token()),
            (json!({"accessToken": "follower-0123456789abcdef"}), bad_token()),
            (
                json!({"accessToken": &s.reader.token[..s.reader.token.len() - 1]}),
                bad_token(),
            ),
            (json!({"accessToken": "x".repeat(2000)}), bad_token()),
            (
                json!({"accessToken": s.reader.token}),
                json!({"success": true, "collections": ALL_BUT_SETTINGS}),
            ),
            (
                json!({"accessToken": s.admin.token}),
                json!({"success": true, "collections": ["devicestatus", "entries", "food", "profile", "settings", "treatments"]}),
            ),
            (
                json!({"accessToken": s.reader.token, "collections": ["treatments", "foods", "treatments"]}),
                json!({"success": true, "collections": ["treatments", "treatments"]}),
            ),
            (
                json!({"accessToken": s.reader.token, "collections": ["settings"]}),
                unauthorized(),
            ),
            (
                json!({"accessToken": s.reader.token, "collections": []}),
                unauthorized(),
            ),
            (json!({"accessToken": s.uploader.token}), unauthorized()),
            (
                json!({"accessToken": s.reader.token, "collections": "entries"}),
                json!({"success": true, "collections": ALL_BUT_SETTINGS}),
            ),
        ];
        for (payload, expected) in cases {
            let ack = puppet.subscribe(&id, payload.clone()).await;
            assert_eq!(ack, vec![expected], "{id}: subscribe {payload}");
        }
        // No payload at all.
        let ack = puppet.emit_with_ack(&id, "subscribe", json!([])).await;
        assert_eq!(ack, vec![bad_token()], "{id}: subscribe without payload");
    }
    // Failed subscribes never disconnected anyone.
    let reports = puppet.drain(Duration::from_millis(100)).await;
    assert!(reports.iter().all(|r| r["type"] != "disconnect"), "{reports:#?}");
}

/// The writes of one treatment's life through APIv3, with APIv1 writes and writes to
/// other collections around it; ends with the sentinel entry. Returns every event the
/// writes must cause, in order, for all collections (see [`for_collections`]).
async fn scripted_writes(db: &Database) -> Vec<(String, Value)> {
    let now = now_ms();
    let treatments = db.collection::<Document>("treatments");
    treatments
        .insert_one(doc! {
            "identifier": "t1", "date": now, "app": "AAPS", "eventType": "Note",
            "created_at": "2023-11-14T22:13:20.000Z", "srvModified": now, "srvCreated": now, "subject": "apiAll",
        })
        .await
        .unwrap();
    // APIv1: no srv fields.
    treatments
        .insert_one(doc! { "eventType": "Note", "notes": "v1" })
        .await
        .unwrap();
    treatments
        .update_one(
            doc! { "identifier": "t1" },
            doc! { "$set": { "notes": "patched", "srvModified": now + 1, "modifiedBy": "apiAll" } },
        )
        .await
        .unwrap();
    for coll in ["devicestatus", "settings", "profile"] {
        db.collection::<Document>(coll)
            .insert_one(doc! { "identifier": format!("{coll}-1"), "srvModified": now, "srvCreated": now })
            .await
            .unwrap();
    }
    treatments
        .update_one(
            doc! { "identifier": "t1" },
            doc! { "$set": { "isValid": false, "srvModified": now + 2, "modifiedBy": "apiAll" } },
        )
        .await
        .unwrap();
    let entries = db.collection::<Document>("entries");
    for identifier in ["e1", "sentinel"] {
        entries
            .insert_one(doc! {
                "identifier": identifier, "type": "sgv", "sgv": 120, "date": now,
                "dateString": "2023-11-14T22:13:20.000Z", "srvModified": now, "srvCreated": now,
            })
            .await
            .unwrap();
    }
    let treatment = json!({
        "identifier": "t1", "date": now, "app": "AAPS", "eventType": "Note",
        "created_at": "2023-11-14T22:13:20.000Z", "srvModified": now, "srvCreated": now, "subject": "apiAll",
    });
    let mut patched = treatment.clone();
    patched["notes"] = json!("patched");
    patched["srvModified"] = json!(now + 1);
    patched["modifiedBy"] = json!("apiAll");
    let entry = |identifier: &str| {
        json!({"colName": "entries", "doc": {
            "identifier": identifier, "type": "sgv", "sgv": 120, "date": now,
            "dateString": "2023-11-14T22:13:20.000Z", "srvModified": now, "srvCreated": now,
        }})
    };
    let plain = |coll: &str| json!({"colName": coll, "doc": {"identifier": format!("{coll}-1"), "srvModified": now, "srvCreated": now}});
    vec![
        (
            "create".into(),
            json!({"colName": "treatments", "doc": treatment}),
        ),
        ("update".into(), json!({"colName": "treatments", "doc": patched})),
        ("create".into(), plain("devicestatus")),
        ("create".into(), plain("settings")),
        ("create".into(), plain("profile")),
        (
            "delete".into(),
            json!({"colName": "treatments", "identifier": "t1"}),
        ),
        ("create".into(), entry("e1")),
        ("create".into(), entry("sentinel")),
    ]
}

/// The events of `all` a client in the rooms of `collections` receives.
fn for_collections(all: &[(String, Value)], collections: &[&str]) -> Vec<(String, Value)> {
    all.iter()
        .filter(|(_, payload)| collections.contains(&payload["colName"].as_str().unwrap()))
        .cloned()
        .collect()
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiv3_writes_arrive_as_exactly_the_expected_events() {
    let s = Setup::start("compat_events", &[]).await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    let mut subscribed = Vec::new();
    for (i, kind) in MATRIX.into_iter().enumerate() {
        let id = id_of(i, kind);
        puppet.connect(&id, kind, &url).await;
        // settings is requested but not readable: dropped from the grant.
        let ack = puppet
            .subscribe(
                &id,
                json!({"accessToken": s.reader.token, "collections": ["entries", "settings", "treatments"]}),
            )
            .await;
        assert_eq!(
            ack,
            vec![json!({"success": true, "collections": ["entries", "treatments"]})],
            "{id}"
        );
        subscribed.push(id);
    }
    // Clients that must receive nothing: subscribed elsewhere, refused, never subscribed.
    let other = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    puppet.connect("food-only", other, &url).await;
    puppet.subscribe_ok("food-only", &s.reader.token, &["food"]).await;
    puppet.connect("refused", other, &url).await;
    let ack = puppet
        .subscribe("refused", json!({"accessToken": "nobody-0000000000000000"}))
        .await;
    assert_eq!(ack, vec![bad_token()]);
    puppet
        .connect(
            "silent",
            ClientKind {
                client: "v2",
                websocket_only: false,
            },
            &url,
        )
        .await;

    let expected = for_collections(&scripted_writes(&s.db).await, &["entries", "treatments"]);
    for id in &subscribed {
        let got = puppet.events_until(id, is_sentinel).await;
        assert_eq!(got, expected, "{id}");
    }
    let rest = puppet.drain(Duration::from_millis(300)).await;
    for id in subscribed
        .iter()
        .map(String::as_str)
        .chain(["food-only", "refused", "silent"])
    {
        assert_no_events(&rest, id);
    }
    assert!(rest.iter().all(|r| r["type"] != "disconnect"), "{rest:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn androidaps_shaped_session() {
    let s = Setup::start("compat_aaps", &[]).await;
    let mut puppet = Puppet::start().await;
    // AndroidAPS (Java client 2.x, Engine.IO 4) multiplexes /storage and /alarm on one
    // connection. This bridge serves /storage alone: /alarm is refused, /storage works.
    let kind = ClientKind {
        client: "v4",
        websocket_only: false,
    };
    puppet
        .open("aaps", kind, &s.bridge.url(), &["/storage", "/alarm"], json!({}))
        .await;
    puppet.expect_connected("aaps", "/storage").await;
    let alarm = puppet.expect(|r| r["id"] == "aaps" && r["ns"] == "/alarm").await;
    assert_eq!(alarm["type"], "connect_error", "{alarm}");
    assert_eq!(alarm["message"], "Invalid namespace", "{alarm}");
    let requested = json!([
        "devicestatus",
        "entries",
        "profile",
        "treatments",
        "foods",
        "settings"
    ]);
    let ack = puppet
        .subscribe(
            "aaps",
            json!({"accessToken": s.reader.token, "collections": requested}),
        )
        .await;
    assert_eq!(
        ack,
        vec![json!({"success": true, "collections": ["devicestatus", "entries", "profile", "treatments"]})]
    );
    puppet
        .open(
            "aaps-admin",
            kind,
            &s.bridge.url(),
            &["/storage", "/alarm"],
            json!({}),
        )
        .await;
    puppet.expect_connected("aaps-admin", "/storage").await;
    let ack = puppet
        .subscribe(
            "aaps-admin",
            json!({"accessToken": s.admin.token, "collections": requested}),
        )
        .await;
    assert_eq!(
        ack,
        vec![
            json!({"success": true, "collections": ["devicestatus", "entries", "profile", "treatments", "settings"]})
        ]
    );

    let all = scripted_writes(&s.db).await;
    let got = puppet.events_until("aaps", is_sentinel).await;
    assert_eq!(
        got,
        for_collections(&all, &["devicestatus", "entries", "profile", "treatments"])
    );
    // Every create/update carries a numeric srvModified: AndroidAPS reads it as a long.
    for (name, payload) in &got {
        if name != "delete" {
            assert!(payload["doc"]["srvModified"].is_i64(), "{payload}");
        }
    }
    let got = puppet.events_until("aaps-admin", is_sentinel).await;
    assert_eq!(
        got,
        for_collections(
            &all,
            &["devicestatus", "entries", "profile", "settings", "treatments"]
        )
    );
    let rest = puppet.drain(Duration::from_millis(300)).await;
    assert_no_events(&rest, "aaps");
    assert_no_events(&rest, "aaps-admin");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_permissions_and_deleted_subjects_stop_events_within_a_second() {
    // No default role: what a subject may read comes from its own roles alone.
    let s = Setup::start("compat_revoke", &[("AUTH_DEFAULT_ROLES", "denied")]).await;
    let limited = add_subject(&s.db, "Limited Later", &["readable"]).await;
    let doomed = add_subject(&s.db, "Deleted Later", &["readable"]).await;
    s.db.collection::<Document>("auth_roles")
        .insert_one(doc! { "name": "entries-reader", "permissions": ["api:entries:read"] })
        .await
        .unwrap();
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    let both = json!(["entries", "treatments"]);
    for (id, kind, subject) in [
        ("kept", MATRIX[1], &s.admin),
        ("limited", MATRIX[2], &limited),
        ("deleted", MATRIX[3], &doomed),
    ] {
        puppet.connect(id, kind, &url).await;
        let ack = puppet
            .subscribe(id, json!({"accessToken": subject.token, "collections": both}))
            .await;
        assert_eq!(ack, vec![json!({"success": true, "collections": both})], "{id}");
    }

    let changed = Instant::now();
    s.db.collection::<Document>("auth_subjects")
        .update_one(
            doc! { "_id": limited.id },
            doc! { "$set": { "roles": ["entries-reader"] } },
        )
        .await
        .unwrap();
    s.db.collection::<Document>("auth_subjects")
        .delete_one(doc! { "_id": doomed.id })
        .await
        .unwrap();
    // The bound under test: one second after the change, the grants are gone.
    tokio::time::sleep_until((changed + Duration::from_secs(1)).into()).await;

    let now = now_ms();
    s.db.collection::<Document>("treatments")
        .insert_one(doc! { "identifier": "after", "srvModified": now, "srvCreated": now })
        .await
        .unwrap();
    write_entry(&s.db, "sentinel", 0).await;
    assert_eq!(
        identifiers(&puppet.events_until("kept", is_sentinel).await),
        ["after", "sentinel"]
    );
    assert_eq!(
        identifiers(&puppet.events_until("limited", is_sentinel).await),
        ["sentinel"]
    );
    let rest = puppet.drain(Duration::from_millis(300)).await;
    for id in ["kept", "limited", "deleted"] {
        assert_no_events(&rest, id);
    }
    // Sockets stay connected: only their rooms changed.
    assert!(rest.iter().all(|r| r["type"] != "disconnect"), "{rest:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_others_get_everything() {
    let s = Setup::start("compat_slow", &[]).await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    let entries = json!({"accessToken": s.reader.token, "collections": ["entries"]});
    for (id, kind) in [
        ("slow", MATRIX[3]),
        ("normal-v2", MATRIX[0]),
        ("normal-v4", MATRIX[2]),
    ] {
        puppet.connect(id, kind, &url).await;
        assert_eq!(puppet.subscribe(id, entries.clone()).await[0]["success"], true);
    }
    puppet.wait_for_websocket("normal-v2").await;
    assert_eq!(puppet.request("pause", "slow").await["type"], "paused");

    // Enough bytes to fill the socket buffers of the paused connection and its queue.
    const EVENTS: usize = 400;
    const PADDING: usize = 40_000;
    let expected: Vec<String> = (0..EVENTS)
        .map(|i| format!("e{i}"))
        .chain(["sentinel".to_string()])
        .collect();
    for identifier in &expected {
        write_entry(
            &s.db,
            identifier,
            if identifier == "sentinel" { 0 } else { PADDING },
        )
        .await;
    }
    for id in ["normal-v2", "normal-v4"] {
        assert_eq!(
            identifiers(&puppet.events_until(id, is_sentinel).await),
            expected,
            "{id}"
        );
    }
    // The slow client was cut off: once it reads again it sees the end of its connection.
    assert_eq!(puppet.request("resume", "slow").await["type"], "resumed");
    let end = puppet
        .expect(|r| r["id"] == "slow" && r["type"] == "disconnect")
        .await;
    assert!(
        ["transport close", "transport error"].contains(&end["reason"].as_str().unwrap()),
        "{end}"
    );
    let warnings: Vec<Value> = s
        .bridge
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("client cannot keep up"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "logged once: {warnings:#?}");
    let rest = puppet.drain(Duration::from_millis(200)).await;
    for id in ["normal-v2", "normal-v4"] {
        assert_no_events(&rest, id);
        assert!(
            !rest.iter().any(|r| r["id"] == id && r["type"] == "disconnect"),
            "{id} stays connected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_bounded_and_harmless() {
    let s = Setup::start("compat_malformed", &[("NSBRIDGE_AUTH__FAILURE_DELAY_MS", "1")]).await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    for (i, kind) in MATRIX.into_iter().enumerate() {
        let id = id_of(i, kind);
        puppet.connect(&id, kind, &url).await;
        // Unknown events are ignored: no ack, no disconnect.
        puppet
            .emit(&id, "unsubscribe", json!([{"accessToken": s.reader.token}]))
            .await;
        puppet
            .emit(&id, "dbAdd", json!([{"collection": "treatments", "data": {}}]))
            .await;
        // Thousands of collection names and deep nesting: only the first 64 names count.
        let mut names = vec![json!("foods"); 5000];
        names.push(json!("entries"));
        let ack = puppet
            .subscribe(&id, json!({"accessToken": s.reader.token, "collections": names}))
            .await;
        assert_eq!(ack, vec![unauthorized()], "{id}");
        let nested = (0..100).fold(json!("deep"), |v, _| json!({ "a": v }));
        let ack = puppet
            .subscribe(&id, json!({"accessToken": nested, "collections": [nested]}))
            .await;
        assert_eq!(ack, vec![bad_token()], "{id}");
        // Extra arguments are ignored; a subscribe without an ack callback still subscribes.
        let ack = puppet
            .emit_with_ack(
                &id,
                "subscribe",
                json!([{"accessToken": "nobody-0000000000000000"}, "extra", 3]),
            )
            .await;
        assert_eq!(ack, vec![bad_token()], "{id}");
        puppet
            .emit(
                &id,
                "subscribe",
                json!([{"accessToken": s.reader.token, "collections": ["entries"]}]),
            )
            .await;
    }
    // Binary attachments are refused: the connection that sends one is closed.
    let binary = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    puppet.connect("binary", binary, &url).await;
    puppet
        .emit(
            "binary",
            "subscribe",
            json!([{"accessToken": {"$binary": "AQID"}}]),
        )
        .await;
    let end = puppet
        .expect(|r| r["id"] == "binary" && r["type"] == "disconnect")
        .await;
    assert_eq!(end["reason"], "transport close", "{end}");
    // A payload over Engine.IO's 1,000,000-byte limit closes that connection too.
    puppet.connect("huge", binary, &url).await;
    puppet
        .emit(
            "huge",
            "subscribe",
            json!([{"accessToken": "x".repeat(1_100_000)}]),
        )
        .await;
    puppet
        .expect(|r| r["id"] == "huge" && r["type"] == "disconnect")
        .await;

    // Everyone else is still served.
    write_entry(&s.db, "sentinel", 0).await;
    for (i, kind) in MATRIX.into_iter().enumerate() {
        let id = id_of(i, kind);
        assert_eq!(
            identifiers(&puppet.events_until(&id, is_sentinel).await),
            ["sentinel"],
            "{id}"
        );
    }
    let rest = puppet.drain(Duration::from_millis(300)).await;
    assert!(
        rest.iter()
            .all(|r| r["type"] != "ack" && r["type"] != "disconnect" && r["type"] != "event"),
        "{rest:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_subscribes_are_slowed_down_but_never_a_valid_one() {
    // Default throttling: +100 ms per failure within 60 s, up to 2 s; 16 waiting per address.
    let s = Setup::start("compat_burst", &[]).await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    puppet.connect("attacker", MATRIX[3], &url).await;
    puppet.connect("victim", MATRIX[0], &url).await;
    const BURST: usize = 40;
    for i in 0..BURST {
        puppet
            .send(json!({
                "op": "emit", "id": "attacker", "ns": "/storage", "event": "subscribe", "ack": true,
                "tag": format!("burst{i}"), "args": [{"accessToken": format!("guess-{i:016}")}],
            }))
            .await;
    }
    let burst_sent = Instant::now();
    // The valid client, from the same address, is answered before the failures are.
    puppet.subscribe_ok("victim", &s.reader.token, &["entries"]).await;
    let failures_answered_before = puppet.drain(Duration::ZERO).await;
    let early: Vec<&Value> = failures_answered_before
        .iter()
        .filter(|r| r["type"] == "ack")
        .collect();
    assert!(early.len() <= 1, "failures should still be waiting: {early:#?}");
    write_entry(&s.db, "sentinel", 0).await;
    assert_eq!(
        identifiers(&puppet.events_until("victim", is_sentinel).await),
        ["sentinel"]
    );

    // The failures: each answered with the failure ack, more slowly each time, and no
    // more than 16 of them waiting at once (the rest get no answer).
    let mut acks = early.into_iter().cloned().collect::<Vec<_>>();
    while let Some(ack) = puppet
        .expect_within(Duration::from_secs(4), |r| {
            r["id"] == "attacker" && r["type"] == "ack"
        })
        .await
    {
        acks.push(ack);
    }
    let elapsed = burst_sent.elapsed();
    assert_eq!(acks.len(), 16, "{acks:#?}");
    assert!(
        acks.iter().all(|a| a["args"] == json!([bad_token()])),
        "{acks:#?}"
    );
    // 16 failures wait 100 ms, 200 ms, ... 1.6 s.
    assert!(elapsed >= Duration::from_millis(1600), "{elapsed:?}");
    let throttled = s
        .bridge
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "subscribe refused: missing or bad access token")
        .count();
    assert_eq!(throttled, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_2_namespace_query_over_both_transports() {
    let s = Setup::start("compat_query", &[]).await;
    let mut puppet = Puppet::start().await;
    // socket.io-client 2.x sends the query inside CONNECT: `40/storage?client=follower,`.
    let kinds = [MATRIX[0], MATRIX[1]];
    for (i, kind) in kinds.into_iter().enumerate() {
        let id = id_of(i, kind);
        puppet
            .open(
                &id,
                kind,
                &s.bridge.url(),
                &["/storage"],
                json!({"query": {"client": "follower"}}),
            )
            .await;
        puppet.expect_connected(&id, "/storage").await;
        puppet.subscribe_ok(&id, &s.reader.token, &["entries"]).await;
    }
    write_entry(&s.db, "sentinel", 0).await;
    for (i, kind) in kinds.into_iter().enumerate() {
        let id = id_of(i, kind);
        assert_eq!(
            identifiers(&puppet.events_until(&id, is_sentinel).await),
            ["sentinel"],
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_the_secret_never_reach_the_logs() {
    let s = Setup::start("compat_logs", &[("NSBRIDGE_AUTH__FAILURE_DELAY_MS", "1")]).await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    let kind = MATRIX[2];
    puppet.connect("c", kind, &url).await;
    let wrong = format!("{}0", &s.admin.token[..s.admin.token.len() - 1]);
    for token in [&s.reader.token, &s.admin.token, &wrong] {
        puppet.subscribe("c", json!({"accessToken": token})).await;
    }
    let logs = s.bridge.logs();
    assert!(logs.contains("subscribed"), "the subscribes were logged");
    for secret in [
        s.reader.token.as_str(),
        s.admin.token.as_str(),
        wrong.as_str(),
        API_SECRET,
    ] {
        assert!(!logs.contains(secret), "{secret} in logs");
        // Nor the digest part alone, which is the credential.
        let digest = secret.rsplit('-').next().unwrap();
        assert!(!logs.contains(digest), "{digest} in logs");
    }
}
