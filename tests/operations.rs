//! Operating the bridge: MongoDB outages, readiness, metrics, graceful shutdown.

mod support;

use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use support::bridge::{Setup, TestBridge, add_subject, http_get};
use support::data::{identifiers, is_sentinel, write_entries};
use support::prometheus::{self, value};
use support::puppet::{ClientKind, MATRIX, Puppet};
use support::store::TestStore;
async fn readyz_status(bridge: &TestBridge) -> u16 {
    http_get(bridge.port, "/readyz")
        .await
        .map(|(status, _)| status)
        .unwrap_or(0)
}

async fn wait_for_readyz(bridge: &TestBridge, status: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while readyz_status(bridge).await != status {
        assert!(
            Instant::now() < deadline,
            "/readyz never {status} ({what}):\n{}",
            bridge.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_around_a_store_crash_arrive_exactly_once_in_order() {
    let mut store = TestStore::start_owned().await;
    let database = store.database("outage");
    let reader = {
        let client = store.client().await;
        add_subject(&client.database(&database), "follower", &["readable"]).await
    };
    // Short server selection: the driver's own one-shot resume gives up during the
    // outage, so the bridge's retry-and-resume path is the one under test.
    let base = store.uri(&database);
    let separator = if base.contains('?') { '&' } else { '?' };
    let uri = format!("{base}{separator}serverSelectionTimeoutMS=1000");
    let bridge = TestBridge::start(&store, &database, &[("MONGODB_URI", &uri)]).await;
    bridge.ready().await;
    let mut puppet = Puppet::start().await;
    let clients = [("during-v4", MATRIX[3]), ("during-v2", MATRIX[0])];
    for (id, kind) in clients {
        puppet.connect(id, kind, &bridge.url()).await;
        puppet.subscribe_ok(id, &reader.token, &["entries"]).await;
    }

    // Written while the bridge is frozen, just before the crash: only a resume from the
    // last event it handled can bring them.
    bridge.signal("STOP");
    {
        let client = store.client().await;
        write_entries(&client.database(&database), &["a1", "a2", "a3", "a4", "a5"]).await;
    }
    store.kill();
    bridge.signal("CONT");
    wait_for_readyz(&bridge, 503, "store killed").await;
    let (_, body) = http_get(bridge.port, "/readyz").await.unwrap();
    let readiness: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readiness["ready"], false, "{readiness}");
    assert!(readiness["reason"].is_string(), "{readiness}");
    // Longer than server selection: reads fail and the bridge backs off and retries.
    tokio::time::sleep(Duration::from_secs(3)).await;

    store.restart().await;
    {
        let client = store.client().await;
        write_entries(&client.database(&database), &["b1", "b2", "b3"]).await;
    }
    wait_for_readyz(&bridge, 200, "store restarted").await;
    {
        let client = store.client().await;
        write_entries(&client.database(&database), &["b4", "b5", "sentinel"]).await;
    }
    let expected = [
        "a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "b5", "sentinel",
    ];
    for (id, _) in clients {
        assert_eq!(
            identifiers(&puppet.events_until(id, is_sentinel).await),
            expected,
            "{id}"
        );
    }
    let rest = puppet.drain(Duration::from_millis(500)).await;
    assert!(
        rest.iter()
            .all(|r| r["type"] != "event" && r["type"] != "disconnect"),
        "clients stayed connected and got nothing twice: {rest:#?}"
    );
    // Resumed by the bridge, not restarted from the present.
    let samples = prometheus::parse(&http_get(bridge.port, "/metrics").await.unwrap().1).unwrap();
    assert!(value(&samples, "nsbridge_stream_restarts_total", &[("reason", "error")]) >= 1.0);
    assert_eq!(value(&samples, "nsbridge_resume_failures_total", &[]), 0.0);
    assert_eq!(value(&samples, "nsbridge_mongodb_reachable", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_events_flow() {
    let Setup {
        store: _store,
        db,
        bridge,
        reader,
        ..
    } = Setup::start("metrics", &[("NSBRIDGE_AUTH__FAILURE_DELAY_MS", "1")]).await;
    let read = || async {
        let (status, text) = http_get(bridge.port, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let before = read().await;
    assert_eq!(
        value(
            &before,
            "nsbridge_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(value(&before, "nsbridge_mongodb_reachable", &[]), 1.0);

    let mut puppet = Puppet::start().await;
    let kind = ClientKind {
        client: "v4",
        websocket_only: true,
    };
    puppet.connect("c", kind, &bridge.url()).await;
    puppet.connect("legacy", MATRIX[1], &bridge.url()).await;
    let ack = puppet
        .subscribe(
            "c",
            json!({"accessToken": reader.token, "collections": ["entries", "treatments"]}),
        )
        .await;
    assert_eq!(ack[0]["success"], true);
    let ack = puppet
        .subscribe("legacy", json!({"accessToken": "nobody-0000000000000000"}))
        .await;
    assert_eq!(ack[0]["success"], false);

    write_entries(&db, &["e1", "e2"]).await;
    // APIv1 writes are counted as skipped.
    db.collection::<Document>("treatments")
        .insert_one(doc! { "eventType": "Note" })
        .await
        .unwrap();
    write_entries(&db, &["sentinel"]).await;
    puppet.events_until("c", is_sentinel).await;

    let after = read().await;
    let entries_create = [("collection", "entries"), ("type", "create")];
    assert_eq!(value(&after, "nsbridge_events_sent_total", &entries_create), 3.0);
    assert_eq!(
        value(
            &after,
            "nsbridge_messages_delivered_total",
            &[("collection", "entries")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "nsbridge_writes_skipped_total",
            &[("collection", "treatments"), ("reason", "not_apiv3")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "nsbridge_sockets_connected",
            &[("namespace", "/storage"), ("protocol", "eio4")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "nsbridge_sockets_connected",
            &[("namespace", "/storage"), ("protocol", "eio3")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "nsbridge_sockets_connected",
            &[("namespace", "/"), ("protocol", "eio3")]
        ),
        1.0
    );
    assert_eq!(
        value(&after, "nsbridge_subscriptions", &[("collection", "entries")]),
        1.0
    );
    assert_eq!(
        value(&after, "nsbridge_subscriptions", &[("collection", "settings")]),
        0.0
    );
    assert_eq!(value(&after, "nsbridge_auth_failures_total", &[]), 1.0);
    assert_eq!(
        value(&after, "nsbridge_auth_throttled_total", &[("outcome", "delayed")]),
        1.0
    );
    assert_eq!(
        value(&after, "nsbridge_change_stream_lag_seconds_count", &[]),
        3.0
    );
    assert_eq!(value(&after, "nsbridge_fanout_duration_seconds_count", &[]), 3.0);
    assert_eq!(value(&after, "nsbridge_slow_client_disconnects_total", &[]), 0.0);

    puppet.request("close", "c").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = read().await;
        let connected = value(
            &now,
            "nsbridge_sockets_connected",
            &[("namespace", "/storage"), ("protocol", "eio4")],
        );
        if connected == 0.0 && value(&now, "nsbridge_subscriptions", &[("collection", "entries")]) == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gauges did not fall after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_clients_and_exits_0_within_5_seconds() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let database = store.database("shutdown");
    let reader = add_subject(&client.database(&database), "follower", &["readable"]).await;
    let mut bridge = TestBridge::start(&store, &database, &[]).await;
    bridge.ready().await;
    let mut puppet = Puppet::start().await;
    for (i, kind) in MATRIX.into_iter().enumerate() {
        let id = format!("c{i}");
        puppet.connect(&id, kind, &bridge.url()).await;
        let ack = puppet.subscribe(&id, json!({"accessToken": reader.token})).await;
        assert_eq!(ack[0]["success"], true);
    }
    let signalled = Instant::now();
    let status = bridge.terminate(Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    assert!(status.is_some(), "still running 5 s after SIGTERM");
    assert_eq!(status.unwrap().code(), Some(0), "took {took:?}");
    for (i, _) in MATRIX.iter().enumerate() {
        let id = format!("c{i}");
        let end = puppet
            .expect(|r| r["id"] == id.as_str() && r["type"] == "disconnect")
            .await;
        assert_eq!(end["reason"], "transport close", "{id}: {end}");
    }
    let lines = bridge.log_lines();
    for message in [
        "shutting down: disconnecting clients, closing the change stream",
        "stopped",
    ] {
        assert!(
            lines.iter().any(|l| l["message"] == message),
            "{message:?} not logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_restarts_from_the_present_and_says_so() {
    // A store that keeps only the last 20 changes, so that a resume token can expire.
    let mut store = TestStore::start_compat(&["--changelog-retention", "20"]).await;
    let database = store.database("history");
    let reader = {
        let client = store.client().await;
        add_subject(&client.database(&database), "follower", &["readable"]).await
    };
    let bridge = TestBridge::start(&store, &database, &[]).await;
    bridge.ready().await;
    let mut puppet = Puppet::start().await;
    puppet.connect("c", MATRIX[3], &bridge.url()).await;
    puppet
        .subscribe(
            "c",
            json!({"accessToken": reader.token, "collections": ["entries"]}),
        )
        .await;
    {
        let client = store.client().await;
        write_entries(&client.database(&database), &["seen"]).await;
    }
    assert_eq!(
        identifiers(
            &puppet
                .events_until("c", |p| p["doc"]["identifier"] == "seen")
                .await
        ),
        ["seen"]
    );

    // While the bridge is frozen, more changes than the store keeps, then a crash.
    bridge.signal("STOP");
    {
        let client = store.client().await;
        let db = client.database(&database);
        let lost: Vec<String> = (0..50).map(|i| format!("lost{i}")).collect();
        write_entries(&db, &lost.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
    store.kill();
    bridge.signal("CONT");
    store.restart().await;
    // Writes made before the bridge gives up resuming would be lost too: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let samples = prometheus::parse(&http_get(bridge.port, "/metrics").await.unwrap().1).unwrap();
        if value(&samples, "nsbridge_resume_failures_total", &[]) == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no resume failure:\n{}", bridge.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_readyz(&bridge, 200, "after the restart").await;
    {
        let client = store.client().await;
        write_entries(&client.database(&database), &["after", "sentinel"]).await;
    }
    // What the frozen bridge had already received (a getMore reply waiting in its socket)
    // arrives; the rest is gone for good; what follows the restart arrives.
    let got = identifiers(&puppet.events_until("c", is_sentinel).await);
    let (before, after) = got.split_at(got.len() - 2);
    assert_eq!(after, ["after", "sentinel"]);
    let lost_prefix: Vec<String> = (0..before.len()).map(|i| format!("lost{i}")).collect();
    assert_eq!(before, lost_prefix.as_slice());
    assert!(before.len() < 50, "{got:?}");
    let samples = prometheus::parse(&http_get(bridge.port, "/metrics").await.unwrap().1).unwrap();
    assert_eq!(value(&samples, "nsbridge_resume_failures_total", &[]), 1.0);
    let errors: Vec<Value> = bridge
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["level"] == "ERROR"
                && l["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("may have been missed")
        })
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_follows_readiness() {
    let store = TestStore::start().await;
    let database = store.database("healthcheck");
    let mut bridge = TestBridge::start(&store, &database, &[]).await;
    bridge.ready().await;
    let healthcheck = |listen: String| {
        let uri = store.uri(&database);
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_nsbridge"))
                .arg("healthcheck")
                .env_clear()
                .env("MONGODB_URI", uri)
                .env("API_SECRET", support::bridge::API_SECRET)
                .env("NSBRIDGE_LISTEN", listen)
                .output()
                .await
                .unwrap()
        }
    };
    // The bridge listens on 127.0.0.1; an unspecified address means the loopback one.
    let ready = healthcheck(format!("127.0.0.1:{}", bridge.port)).await;
    assert_eq!(
        ready.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    let ready = healthcheck(format!("0.0.0.0:{}", bridge.port)).await;
    assert_eq!(
        ready.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    let port = bridge.port;
    bridge.terminate(Duration::from_secs(5)).await.unwrap();
    let gone = healthcheck(format!("127.0.0.1:{port}")).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("did not answer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_within_10_s_when_the_store_stops_answering() {
    let store = TestStore::start_owned().await;
    let database = store.database("frozen");
    let bridge = TestBridge::start(&store, &database, &[]).await;
    bridge.ready().await;
    // Frozen, not gone: connections stay open and nothing answers on them.
    store.signal("STOP");
    let frozen = Instant::now();
    while readyz_status(&bridge).await != 503 {
        assert!(
            frozen.elapsed() < Duration::from_secs(10),
            "/readyz still 200 10 s after the store froze:\n{}",
            bridge.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = http_get(bridge.port, "/readyz").await.unwrap();
    let readiness: Value = serde_json::from_str(&body).unwrap();
    // The change stream may be open still (its read just waits) or already failed.
    assert_eq!(readiness["ready"], false, "{readiness}");
    assert_eq!(readiness["mongodb"], "not answering", "{readiness}");
    assert_eq!(readiness["reason"], "MongoDB not answering", "{readiness}");
    assert_eq!(http_get(bridge.port, "/healthz").await.unwrap().0, 200);
    store.signal("CONT");
    wait_for_readyz(&bridge, 200, "store thawed").await;
    let warned = bridge
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "MongoDB not answering")
        .count();
    assert_eq!(warned, 1, "{}", bridge.logs());
}
