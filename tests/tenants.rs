//! Many sites on one bridge (a tenants file, connections routed by Host), and many bridges
//! for one site; against the bridge binary and the test store, with raw Engine.IO 4
//! subscribers that name their site in the Host header.

mod support;

use std::time::{Duration, Instant};

use mongodb::Database;
use mongodb::bson::{Document, doc, oid::ObjectId};
use nsbridge::auth::token::{access_token, api_secret_hash, subject_digest};
use support::bridge::{TestBridge, http_get};
use support::data::now_ms;
use support::prometheus;
use support::store::TestStore;
use support::ws::{WsSubscriber, identifier_of};

const BAD_TOKEN: &str = r#"[{"success":false,"message":"Missing or bad accessToken"}]"#;

/// One site: the same subject (same id, same name) in each, with its own secret.
struct Tenant {
    name: String,
    host: String,
    db: Database,
    secret: String,
    token: String,
}

const SUBJECT: &str = "Follower";

async fn tenant(store: &TestStore, subject: ObjectId, name: &str) -> Tenant {
    let client = store.client().await;
    let db = client.database(&store.database(name));
    let secret = format!("{name}'s own long pass phrase");
    db.collection::<Document>("auth_subjects")
        .insert_one(doc! { "_id": subject, "name": SUBJECT, "roles": ["readable"] })
        .await
        .unwrap();
    Tenant {
        name: name.to_string(),
        host: format!("{name}.example.org"),
        token: access_token(
            SUBJECT,
            &subject_digest(&api_secret_hash(&secret), &subject.to_hex()),
        ),
        db,
        secret,
    }
}

fn tenants_file(tenants: &[&Tenant]) -> String {
    tenants
        .iter()
        .map(|t| {
            format!(
                "[[tenant]]\nname = \"{}\"\nhosts = [\"{}\"]\ndatabase = \"{}\"\napi_secret = \"{}\"\n\n",
                t.name,
                t.host,
                t.db.name(),
                t.secret
            )
        })
        .collect()
}

/// The bridge on `store` with the sites of `file`, ready.
async fn bridge_with(store: &TestStore, file: &std::path::Path) -> TestBridge {
    let path = file.to_str().unwrap().to_string();
    let bridge = TestBridge::start(store, "unused", &[("NSBRIDGE_TENANTS", &path)]).await;
    bridge.ready().await;
    bridge
}

async fn write_entries(db: &Database, identifiers: &[String]) {
    for identifier in identifiers {
        let now = now_ms();
        db.collection::<Document>("entries")
            .insert_one(doc! { "identifier": identifier, "sgv": 100, "srvModified": now, "srvCreated": now })
            .await
            .unwrap();
    }
}

/// The identifiers `subscriber` receives up to and including `last`, waiting at most 20 s.
async fn received_until(subscriber: &mut WsSubscriber, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let packet = tokio::time::timeout(remaining, subscriber.next_event())
            .await
            .unwrap_or_else(|_| panic!("{last} not received; got {got:?}"))
            .unwrap_or_else(|| panic!("disconnected; got {got:?}"));
        let identifier = identifier_of(&packet).unwrap().to_string();
        let done = identifier == last;
        got.push(identifier);
        if done {
            return got;
        }
    }
}

/// Nothing more arrives within `quiet`.
async fn nothing_more(subscriber: &mut WsSubscriber, quiet: Duration) {
    if let Ok(Some(packet)) = tokio::time::timeout(quiet, subscriber.next_event()).await {
        panic!("unexpected event: {packet}");
    }
}

async fn metric(bridge: &TestBridge, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = http_get(bridge.port, "/metrics").await.unwrap();
    prometheus::value(&prometheus::parse(&text).unwrap(), name, labels)
}

/// Alice, Bob and Carol: three sites whose subjects share one id and one name.
async fn three_tenants(store: &TestStore) -> (Tenant, Tenant, Tenant) {
    let subject = ObjectId::new();
    (
        tenant(store, subject, "alice").await,
        tenant(store, subject, "bob").await,
        tenant(store, subject, "carol").await,
    )
}

fn identifiers(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_on_one_bridge_each_get_only_their_own() {
    let store = TestStore::start().await;
    let (alice, bob, carol) = three_tenants(&store).await;
    let sites = [&alice, &bob, &carol];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    std::fs::write(&file, tenants_file(&sites)).unwrap();
    let bridge = bridge_with(&store, &file).await;

    // The same subject's token of one site is refused by every other.
    let distinct: std::collections::HashSet<&str> = sites.iter().map(|t| t.token.as_str()).collect();
    assert_eq!(distinct.len(), 3, "one subject, three secrets: three tokens");
    for site in sites {
        for other in sites.iter().filter(|o| o.name != site.name) {
            let refused =
                WsSubscriber::connect_host(bridge.port, &site.host, &other.token, &["entries"]).await;
            assert_eq!(
                refused.err().as_deref(),
                Some(BAD_TOKEN),
                "{}'s token at {}",
                other.name,
                site.host
            );
        }
    }
    // A host that is no site's is refused at the handshake.
    let unknown =
        WsSubscriber::connect_host(bridge.port, "mallory.example.org", &alice.token, &["entries"]).await;
    let error = unknown.err().unwrap();
    assert!(
        error.starts_with("HTTP 404")
            && error.contains(r#"no Nightscout site at host \"mallory.example.org\""#),
        "{error}"
    );

    let mut subscribers = Vec::new();
    for site in sites {
        for _ in 0..2 {
            let (subscriber, ack) =
                WsSubscriber::connect_host(bridge.port, &site.host, &site.token, &["entries"])
                    .await
                    .unwrap();
            assert_eq!(ack, r#"[{"success":true,"collections":["entries"]}]"#);
            subscribers.push((site.name.clone(), subscriber));
        }
    }
    for site in sites {
        let mut written = identifiers(&site.name, 5);
        written.push(format!("{}-sentinel", site.name));
        write_entries(&site.db, &written).await;
    }
    for (name, subscriber) in &mut subscribers {
        let mut expected = identifiers(name, 5);
        expected.push(format!("{name}-sentinel"));
        assert_eq!(
            received_until(subscriber, &format!("{name}-sentinel")).await,
            expected
        );
    }
    for (_, subscriber) in &mut subscribers {
        nothing_more(subscriber, Duration::from_millis(300)).await;
    }
    // One change stream for the three, and the sites named in the metrics.
    assert_eq!(metric(&bridge, "nsbridge_change_streams", &[]).await, 1.0);
    assert_eq!(metric(&bridge, "nsbridge_tenants", &[]).await, 3.0);
    assert_eq!(
        metric(
            &bridge,
            "nsbridge_subscriptions",
            &[("tenant", "bob"), ("collection", "entries")]
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(&bridge, "nsbridge_events_sent_total", &[("tenant", "carol")]).await,
        6.0
    );
    // Failures are counted (and throttled) per site.
    assert_eq!(
        metric(&bridge, "nsbridge_auth_failures_total", &[("tenant", "alice")]).await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_are_added_and_removed_while_running() {
    let store = TestStore::start().await;
    let (alice, bob, carol) = three_tenants(&store).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    std::fs::write(&file, tenants_file(&[&alice, &bob])).unwrap();
    let bridge = bridge_with(&store, &file).await;
    let (mut at_alice, _) = WsSubscriber::connect_host(bridge.port, &alice.host, &alice.token, &["entries"])
        .await
        .unwrap();
    let (mut at_bob, _) = WsSubscriber::connect_host(bridge.port, &bob.host, &bob.token, &["entries"])
        .await
        .unwrap();
    assert!(
        WsSubscriber::connect_host(bridge.port, &carol.host, &carol.token, &["entries"])
            .await
            .is_err()
    );

    // A file that cannot be used changes nothing.
    std::fs::write(&file, tenants_file(&[&alice, &bob]) + &tenants_file(&[&bob])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bridge.logs().contains("tenants file not applied") {
        assert!(Instant::now() < deadline, "{}", bridge.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        bridge.logs().contains(r#"its name is used twice"#),
        "{}",
        bridge.logs()
    );

    // Carol added, Bob removed.
    std::fs::write(&file, tenants_file(&[&alice, &carol])).unwrap();
    let written = Instant::now();
    let mut at_carol = loop {
        match WsSubscriber::connect_host(bridge.port, &carol.host, &carol.token, &["entries"]).await {
            Ok((subscriber, _)) => break subscriber,
            Err(e) => assert!(
                written.elapsed() < Duration::from_secs(5),
                "carol never served: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let serving = written.elapsed();
    assert!(serving < Duration::from_secs(2), "carol served after {serving:?}");
    // Bob's clients are disconnected, and his host refused.
    let closed = tokio::time::timeout(Duration::from_secs(5), at_bob.next_event()).await;
    assert!(
        matches!(closed, Ok(None)),
        "bob's subscriber still connected: {closed:?}"
    );
    let refused = WsSubscriber::connect_host(bridge.port, &bob.host, &bob.token, &["entries"]).await;
    assert!(refused.err().unwrap().starts_with("HTTP 404"));

    write_entries(&carol.db, &identifiers("carol", 3)).await;
    write_entries(&bob.db, &identifiers("bob", 3)).await;
    write_entries(&alice.db, &identifiers("alice", 3)).await;
    assert_eq!(
        received_until(&mut at_carol, "carol-2").await,
        identifiers("carol", 3)
    );
    assert_eq!(
        received_until(&mut at_alice, "alice-2").await,
        identifiers("alice", 3)
    );
    nothing_more(&mut at_carol, Duration::from_millis(300)).await;
    assert_eq!(metric(&bridge, "nsbridge_change_streams", &[]).await, 1.0);
    assert_eq!(metric(&bridge, "nsbridge_tenants", &[]).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_that_refuses_a_deployment_stream_gets_one_per_database() {
    let store = TestStore::start_compat(&["--refuse-cluster-streams"]).await;
    let subject = ObjectId::new();
    let (alice, bob) = (
        tenant(&store, subject, "alice").await,
        tenant(&store, subject, "bob").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    std::fs::write(&file, tenants_file(&[&alice, &bob])).unwrap();
    let bridge = bridge_with(&store, &file).await;
    let mut subscribers = Vec::new();
    for site in [&alice, &bob] {
        let (subscriber, _) = WsSubscriber::connect_host(bridge.port, &site.host, &site.token, &["entries"])
            .await
            .unwrap();
        subscribers.push((site, subscriber));
    }
    for (site, subscriber) in &mut subscribers {
        write_entries(&site.db, &identifiers(&site.name, 3)).await;
        let last = format!("{}-2", site.name);
        assert_eq!(
            received_until(subscriber, &last).await,
            identifiers(&site.name, 3)
        );
    }
    assert_eq!(metric(&bridge, "nsbridge_change_streams", &[]).await, 2.0);
    assert_eq!(
        metric(&bridge, "nsbridge_change_stream_fallbacks_total", &[]).await,
        1.0
    );
    let said = bridge
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the deployment refuses a deployment-level change stream"))
        })
        .count();
    assert_eq!(said, 1, "said once:\n{}", bridge.logs());
}

/// Two replicas of the bridge on one site, clients split between them: every client gets
/// every event of a burst once, in order. The replicas share nothing but MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_give_every_client_every_event_once_in_order() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let database = store.database("replicas");
    let db = client.database(&database);
    let reader = support::bridge::add_subject(&db, "Follower", &["readable"]).await;
    let replicas = [
        TestBridge::start(&store, &database, &[]).await,
        TestBridge::start(&store, &database, &[]).await,
    ];
    for replica in &replicas {
        replica.ready().await;
    }
    let mut subscribers = Vec::new();
    for i in 0..40 {
        let port = replicas[i % 2].port;
        subscribers.push(
            WsSubscriber::connect(port, &reader.token, &["entries"])
                .await
                .unwrap(),
        );
    }
    let burst: Vec<String> = identifiers("burst", 300);
    let now = now_ms();
    let documents: Vec<Document> = burst
        .iter()
        .map(
            |identifier| doc! { "identifier": identifier, "sgv": 100, "srvModified": now, "srvCreated": now },
        )
        .collect();
    db.collection::<Document>("entries")
        .insert_many(documents)
        .await
        .unwrap();
    let receiving = subscribers.into_iter().map(|mut subscriber| {
        tokio::spawn(async move {
            let got = received_until(&mut subscriber, "burst-299").await;
            nothing_more(&mut subscriber, Duration::from_millis(200)).await;
            got
        })
    });
    for (i, got) in futures::future::join_all(receiving).await.into_iter().enumerate() {
        assert_eq!(got.unwrap(), burst, "client {i}");
    }
}
