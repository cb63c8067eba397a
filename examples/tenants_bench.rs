//! Many sites on one bridge (`scripts/bench tenants`), with the default settings.
//!
//! Three bridges side by side in each run, each a fresh process (release build) on the
//! compatibility store, serving a tenants file:
//!
//! - **1,000 × 3**: 1,000 tenants (1,000 databases, one change stream for them all), three
//!   WebSocket subscribers of `entries` each;
//! - **1 × 3,000**: one tenant, 3,000 subscribers;
//! - **1 × 3**: one tenant, three subscribers (the single site, for reference).
//!
//! For each: the resident memory once ready, before any client (memory per tenant:
//! 1,000 × 3 less 1 × 3, over 999), and per subscriber once all are subscribed; the
//! set-up rate (WebSocket connect, Socket.IO connect and subscribe until its ack, 64 at a
//! time); write → client latency (one document at a time, paced, each to one tenant in
//! turn while the others idle: from just before the insert to its arrival at each of that
//! tenant's subscribers; of it, the insert's own round trip, and the bridge's share from its
//! `nsbridge_delivery_duration_seconds`); the CPU it uses idle with every subscriber
//! connected; its CPU time per delivered message over a batch of 18,000 messages (the same
//! inserts of 6 documents, 8 at a time, each to the next tenant in turn: 6,000 documents
//! spread over the tenants, or 6 to 3,000 subscribers). Every subscriber must get exactly
//! its own tenant's events, each once, and nothing else.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mongodb::bson::{Document, doc, oid::ObjectId};
use tokio::sync::mpsc;

mod common;
use common::{
    Killed, bridge_command, bucket_quantile, free_port, histogram_buckets, histogram_delta, process_cpu_ns,
    repo, rss_kib, start_store,
};

#[path = "../tests/support/http.rs"]
#[allow(dead_code)]
mod http;
#[path = "../tests/support/ws.rs"]
#[allow(dead_code)]
mod ws;
use ws::WsSubscriber;

const TENANTS: usize = 1_000;
const RUNS: usize = 3;
const CONNECTING_AT_ONCE: usize = 64;
const DELIVERED_IN_CPU_BATCH: usize = 18_000;
const WRITE_BATCH: usize = 6;

fn database(tenant: usize) -> String {
    format!("tenants_bench_{tenant}")
}

fn host(tenant: usize) -> String {
    format!("t{tenant}.bench.test")
}

fn secret(tenant: usize) -> String {
    format!("bench secret of tenant {tenant}")
}

/// One bridge configuration: how many tenants, how many subscribers each.
#[derive(Clone, Copy)]
struct Shape {
    tenants: usize,
    subscribers: usize,
    /// Latency phase: writes, and the pause between them.
    paced_writes: usize,
    pace: Duration,
}

impl Shape {
    fn label(&self) -> String {
        format!("{} × {}", thousands(self.tenants), thousands(self.subscribers))
    }
}

const SHAPES: [Shape; 3] = [
    Shape {
        tenants: TENANTS,
        subscribers: 3,
        paced_writes: 200,
        pace: Duration::from_millis(20),
    },
    Shape {
        tenants: 1,
        subscribers: 3_000,
        paced_writes: 20,
        pace: Duration::from_millis(200),
    },
    Shape {
        tenants: 1,
        subscribers: 3,
        paced_writes: 200,
        pace: Duration::from_millis(20),
    },
];

fn thousands(n: usize) -> String {
    if n >= 1000 {
        format!("{},{:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}

/// The subjects the tokens are made from: one per tenant database, created once.
async fn seed_subjects(client: &mongodb::Client) -> Vec<String> {
    let mut tokens = Vec::with_capacity(TENANTS);
    for tenant in 0..TENANTS {
        let db = client.database(&database(tenant));
        let subjects = db.collection::<Document>("auth_subjects");
        subjects.drop().await.unwrap();
        db.collection::<Document>("entries").drop().await.unwrap();
        let id = ObjectId::new();
        subjects
            .insert_one(doc! { "_id": id, "name": "follower", "roles": ["readable"] })
            .await
            .unwrap();
        let hash = nsbridge::auth::token::api_secret_hash(&secret(tenant));
        let digest = nsbridge::auth::token::subject_digest(&hash, &id.to_hex());
        tokens.push(nsbridge::auth::token::access_token("follower", &digest));
    }
    tokens
}

fn write_tenants_file(path: &Path, tenants: usize) {
    let mut text = String::new();
    for tenant in 0..tenants {
        text.push_str(&format!(
            "[[tenant]]\nname = \"t{tenant}\"\nhosts = [\"{}\"]\ndatabase = \"{}\"\napi_secret = \"{}\"\n\n",
            host(tenant),
            database(tenant),
            secret(tenant)
        ));
    }
    std::fs::write(path, text).unwrap();
}

struct Bridge {
    process: Killed,
    port: u16,
}

impl Bridge {
    fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// The bridge on the tenants file, once ready; and how long it took.
async fn start_bridge(store_uri: &str, tenants_file: &Path) -> (Bridge, Duration) {
    let port = free_port();
    let started = Instant::now();
    let child = bridge_command(port)
        .env("MONGODB_URI", store_uri)
        // What this benchmark measures: many sites on one bridge.
        .env("NSBRIDGE_TENANTS", tenants_file)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nsbridge");
    let bridge = Bridge {
        process: Killed(child),
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(http::http_get(port, "/nsbridge/readyz").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "nsbridge never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (bridge, started.elapsed())
}

/// A metric's value on the bridge's /metrics, the sum over its labels.
async fn metric(port: u16, name: &str) -> f64 {
    let (_, text) = http::http_get(port, "/nsbridge/metrics").await.unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const DELIVERY: &str = "nsbridge_delivery_duration_seconds";

async fn buckets(port: u16, name: &str) -> Vec<(f64, f64)> {
    let (_, text) = http::http_get(port, "/nsbridge/metrics").await.unwrap();
    histogram_buckets(&text, name)
}

/// An event's arrival: at which subscriber (of which tenant), its identifier, when.
struct Arrival {
    subscriber: usize,
    tenant: usize,
    identifier: String,
    at: Instant,
}

/// Connects and subscribes every subscriber, `CONNECTING_AT_ONCE` at a time; each then
/// reports its arrivals. Returns the subscribes per second.
async fn subscribe_all(
    bridge: &Bridge,
    shape: Shape,
    tokens: &[String],
    arrivals: mpsc::UnboundedSender<Arrival>,
) -> f64 {
    let port = bridge.port;
    let started = Instant::now();
    let subscribers: Vec<(usize, WsSubscriber)> =
        futures::stream::iter((0..shape.tenants).flat_map(|t| std::iter::repeat_n(t, shape.subscribers)))
            .map(|tenant| {
                let token = tokens[tenant].clone();
                async move {
                    let (subscriber, ack) =
                        WsSubscriber::connect_host(port, &host(tenant), &token, &["entries"])
                            .await
                            .unwrap_or_else(|e| panic!("tenant {tenant}: {e}"));
                    assert_eq!(ack, r#"[{"success":true,"collections":["entries"]}]"#);
                    (tenant, subscriber)
                }
            })
            .buffer_unordered(CONNECTING_AT_ONCE)
            .collect()
            .await;
    let rate = subscribers.len() as f64 / started.elapsed().as_secs_f64();
    assert_eq!(subscribers.len(), shape.tenants * shape.subscribers);
    for (n, (tenant, mut subscriber)) in subscribers.into_iter().enumerate() {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(packet) = subscriber.next_event().await {
                let at = Instant::now();
                let identifier = ws::identifier_of(&packet).unwrap_or("?").to_string();
                let _ = arrivals.send(Arrival {
                    subscriber: n,
                    tenant,
                    identifier,
                    at,
                });
            }
        });
    }
    rate
}

/// Receives `expected` arrivals, each checked to be its own tenant's (identifiers are
/// `<tenant>-...`), then makes sure nothing more comes; the latency of each from `written`.
async fn receive(
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    expected: usize,
    written: &Mutex<HashMap<String, Instant>>,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(expected);
    let mut seen: HashMap<(usize, String), usize> = HashMap::new();
    while latencies.len() < expected {
        let arrival = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {expected} events arrived", latencies.len()))
            .expect("subscribers gone");
        let owner = arrival
            .identifier
            .split('-')
            .next()
            .and_then(|t| t.parse::<usize>().ok());
        assert_eq!(
            owner,
            Some(arrival.tenant),
            "tenant {}'s subscriber got {}",
            arrival.tenant,
            arrival.identifier
        );
        let at = written.lock().unwrap()[&arrival.identifier];
        latencies.push(arrival.at - at);
        let copies = seen.entry((arrival.subscriber, arrival.identifier)).or_default();
        *copies += 1;
        assert_eq!(*copies, 1, "an event twice at one subscriber");
    }
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(500), arrivals.recv()).await {
        panic!(
            "an event too many: {} at tenant {}",
            extra.identifier, extra.tenant
        );
    }
    latencies
}

struct Measured {
    start_up: Duration,
    rss_ready_kib: u64,
    rss_per_subscriber_kib: f64,
    subscribes_per_s: f64,
    p50: Duration,
    p99: Duration,
    /// The store's share: an insert's round trip, median.
    insert_p50_ms: f64,
    /// Change event → taken by the last subscriber's transport (the bridge's share), p99.
    own_p99_ms: f64,
    /// CPU use with every subscriber connected and nothing written, in % of one core.
    idle_cpu_percent: f64,
    cpu_ns_per_message: f64,
    change_streams: f64,
}

async fn measure(
    shape: Shape,
    run: usize,
    store_uri: &str,
    writer: &mongodb::Client,
    tokens: &[String],
    dir: &Path,
) -> Measured {
    let file = dir.join(format!("tenants-{}.toml", shape.tenants));
    write_tenants_file(&file, shape.tenants);
    let (bridge, start_up) = start_bridge(store_uri, &file).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_ready_kib = rss_kib(bridge.pid());
    let change_streams = metric(bridge.port, "nsbridge_change_streams").await;

    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let subscribes_per_s = subscribe_all(&bridge, shape, tokens, arrivals_tx).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let subscribers = shape.tenants * shape.subscribers;
    let rss_per_subscriber_kib = (rss_kib(bridge.pid()) as f64 - rss_ready_kib as f64) / subscribers as f64;
    let idle_from = (Instant::now(), process_cpu_ns(bridge.pid()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cpu_percent =
        (process_cpu_ns(bridge.pid()) - idle_from.1) as f64 / idle_from.0.elapsed().as_nanos() as f64 * 100.0;
    let delivery_before = buckets(bridge.port, DELIVERY).await;

    // Latency: one write at a time, each to one tenant in turn.
    let written = Arc::new(Mutex::new(HashMap::new()));
    let writing = tokio::spawn({
        let written = written.clone();
        let writer = writer.clone();
        async move {
            let mut round_trips = Vec::with_capacity(shape.paced_writes);
            for i in 0..shape.paced_writes {
                let tenant = (i * 7919) % shape.tenants;
                let identifier = format!("{tenant}-r{run}-paced-{i}");
                let entries = writer
                    .database(&database(tenant))
                    .collection::<Document>("entries");
                let now = nsbridge::feed::now_ms();
                let document = doc! { "identifier": &identifier, "type": "sgv", "sgv": 100 + (i % 80) as i32,
                "date": now, "srvModified": now, "srvCreated": now };
                let before = Instant::now();
                written.lock().unwrap().insert(identifier, before);
                entries.insert_one(document).await.unwrap();
                round_trips.push(before.elapsed());
                tokio::time::sleep(shape.pace).await;
            }
            round_trips
        }
    });
    let mut latencies = receive(&mut arrivals, shape.paced_writes * shape.subscribers, &written).await;
    let mut round_trips = writing.await.unwrap();
    round_trips.sort();
    let insert_p50_ms = round_trips[round_trips.len() / 2].as_secs_f64() * 1e3;
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let own = histogram_delta(&delivery_before, &buckets(bridge.port, DELIVERY).await);
    let own_p99_ms = bucket_quantile(&own, 0.99) * 1e3;

    // CPU: a batch that delivers DELIVERED_IN_CPU_BATCH messages, spread over the tenants.
    // The same writes in every shape: inserts of WRITE_BATCH documents, 8 at a time, each
    // to the next tenant in turn.
    let inserts = DELIVERED_IN_CPU_BATCH / shape.subscribers / WRITE_BATCH;
    let cpu_before = process_cpu_ns(bridge.pid());
    let writing = tokio::spawn({
        let written = written.clone();
        let writer = writer.clone();
        async move {
            futures::stream::iter(0..inserts)
                .map(|n| {
                    let tenant = n % shape.tenants;
                    let entries = writer
                        .database(&database(tenant))
                        .collection::<Document>("entries");
                    let now = nsbridge::feed::now_ms();
                    let batch: Vec<Document> = (0..WRITE_BATCH)
                        .map(|k| {
                            let identifier = format!("{tenant}-r{run}-batch-{n}-{k}");
                            written.lock().unwrap().insert(identifier.clone(), Instant::now());
                            doc! { "identifier": identifier, "type": "sgv", "sgv": 120, "date": now,
                            "srvModified": now, "srvCreated": now }
                        })
                        .collect();
                    async move {
                        entries.insert_many(batch).await.unwrap();
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<()>>()
                .await;
        }
    });
    let delivered = inserts * WRITE_BATCH * shape.subscribers;
    assert_eq!(delivered, DELIVERED_IN_CPU_BATCH);
    receive(&mut arrivals, delivered, &written).await;
    writing.await.unwrap();
    let cpu_ns_per_message = (process_cpu_ns(bridge.pid()) - cpu_before) as f64 / delivered as f64;
    drop(bridge);
    Measured {
        start_up,
        rss_ready_kib,
        rss_per_subscriber_kib,
        subscribes_per_s,
        p50,
        p99,
        insert_p50_ms,
        own_p99_ms,
        idle_cpu_percent,
        cpu_ns_per_message,
        change_streams,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    for needed in ["target/release/nsbridge", "target/test-store/venv"] {
        assert!(
            repo().join(needed).exists(),
            "{needed} missing: run scripts/bench tenants"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let store_port = free_port();
    std::fs::create_dir(dir.path().join("store")).unwrap();
    let _store = start_store(store_port, &dir.path().join("store"));
    let store_uri = format!("mongodb://127.0.0.1:{store_port}/?directConnection=true");
    let writer = mongodb::Client::with_uri_str(&store_uri).await.unwrap();
    let tokens = seed_subjects(&writer).await;

    let mut results: Vec<Vec<Measured>> = SHAPES.iter().map(|_| Vec::new()).collect();
    for run in 0..RUNS {
        for (i, shape) in SHAPES.iter().enumerate() {
            let m = measure(*shape, run, &store_uri, &writer, &tokens, dir.path()).await;
            eprintln!(
                "run {} {}: ready in {:.1} s, RSS {:.1} MiB, {:.1} KiB/subscriber, {:.0} subscribes/s, \
                 idle CPU {:.2} %, p50 {:.1} ms, p99 {:.1} ms (insert p50 {:.1} ms, own p99 {:.1} ms), \
                 {:.1} µs CPU/message, {} change streams",
                run + 1,
                shape.label(),
                m.start_up.as_secs_f64(),
                m.rss_ready_kib as f64 / 1024.0,
                m.rss_per_subscriber_kib,
                m.subscribes_per_s,
                m.idle_cpu_percent,
                m.p50.as_secs_f64() * 1e3,
                m.p99.as_secs_f64() * 1e3,
                m.insert_p50_ms,
                m.own_p99_ms,
                m.cpu_ns_per_message / 1e3,
                m.change_streams,
            );
            results[i].push(m);
        }
    }

    let med = |i: usize, f: &dyn Fn(&Measured) -> f64| median(results[i].iter().map(f).collect());
    let mut out = format!(
        "Medians of {RUNS} runs; each row a fresh bridge with the default settings.\n\n\
         | tenants × subscribers | change streams | ready after | RSS ready | per subscriber | subscribes/s | idle CPU | write → client p50 | p99 | of which the insert p50 | bridge's own p99 | CPU per delivered message |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for (i, shape) in SHAPES.iter().enumerate() {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} s | {:.1} MiB | {:.1} KiB | {:.0} | {:.2} % | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} µs |\n",
            shape.label(),
            med(i, &|m| m.change_streams),
            med(i, &|m| m.start_up.as_secs_f64()),
            med(i, &|m| m.rss_ready_kib as f64) / 1024.0,
            med(i, &|m| m.rss_per_subscriber_kib),
            med(i, &|m| m.subscribes_per_s),
            med(i, &|m| m.idle_cpu_percent),
            med(i, &|m| m.p50.as_secs_f64() * 1e3),
            med(i, &|m| m.p99.as_secs_f64() * 1e3),
            med(i, &|m| m.insert_p50_ms),
            med(i, &|m| m.own_p99_ms),
            med(i, &|m| m.cpu_ns_per_message / 1e3),
        ));
    }
    let per_tenant_kib =
        (med(0, &|m| m.rss_ready_kib as f64) - med(2, &|m| m.rss_ready_kib as f64)) / (TENANTS - 1) as f64;
    out.push_str(&format!(
        "\nMemory per tenant, before its clients: {per_tenant_kib:.1} KiB \
         (RSS ready, {} less {}, over {}).\n\
         CPU per delivered message, {} over {}: {:.1}×; write → client p99, {} over {}: {:.2}×.\n",
        SHAPES[0].label(),
        SHAPES[2].label(),
        TENANTS - 1,
        SHAPES[0].label(),
        SHAPES[1].label(),
        med(0, &|m| m.cpu_ns_per_message) / med(1, &|m| m.cpu_ns_per_message),
        SHAPES[0].label(),
        SHAPES[2].label(),
        med(0, &|m| m.p99.as_secs_f64()) / med(2, &|m| m.p99.as_secs_f64()),
    ));
    println!("{out}");
}
