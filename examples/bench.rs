//! nsbridge against Nightscout's Node channel, side by side on one store and one load,
//! both with their default settings.
//!
//! Run it with `scripts/bench` (which builds both, installs the Node peer and the test
//! store); see BENCHMARKS.md for what it measures and the figures of this machine.
//!
//! Each scenario is a number of subscribers and a burst: one `insert_many` of that many
//! APIv3-shaped entries, as an uploader's backlog after a dead zone. For each scenario,
//! each server in turn (alternating which goes first): start it, open and subscribe the
//! clients (set-up rate), let them idle (resident memory per connection), write at a
//! steady pace (write → client latency, the server's own share), write the burst
//! (delivered messages per second, latency of the burst's messages, server CPU time per
//! delivered message), then write at a steady pace again: every message must arrive and
//! no client may be disconnected. Runs are repeated and the medians reported, with
//! nsbridge/Node ratios: the machine is shared and noisy, ratios within one run are what
//! compare.
//!
//! The clients are raw Engine.IO 4 over WebSocket in this one process, on one thread, so
//! that they cost less than the server they measure; their own CPU time is reported.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mongodb::Client;
use mongodb::bson::{Document, doc, oid::ObjectId};

mod common;
use common::{
    Killed, bucket_quantile, free_port, histogram_buckets, histogram_delta, process_cpu_ns, repo, start_store,
};

#[path = "../tests/support/http.rs"]
#[allow(dead_code)]
mod http;
#[path = "../tests/support/ws.rs"]
#[allow(dead_code)]
mod ws;
use http::http_get;
use tokio::sync::{Semaphore, mpsc};
use ws::WsSubscriber;

const API_SECRET: &str = "benchmark secret phrase";
const DATABASE: &str = "bench";
/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 200;
/// With `pin`: the server's CPU; the load generator and the store get the other one.
const SERVER_CPU: &str = "0";
const LOAD_CPU: &str = "1";

/// Subscribers and the size of the burst written to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Scenario {
    subscribers: usize,
    burst: usize,
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} subscribers × a {}-document burst",
            self.subscribers, self.burst
        )
    }
}

#[derive(Debug, Clone)]
struct Args {
    scenarios: Vec<Scenario>,
    repeats: usize,
    servers: Vec<ServerKind>,
    /// Steady phases: writes per second and seconds, before and after the burst.
    rate: u32,
    steady_secs: u64,
    markdown: Option<PathBuf>,
    /// Server on CPU 0, load generator and store on CPU 1; off by default, as deployed.
    pin: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        scenarios: vec![
            Scenario {
                subscribers: 1_000,
                burst: 300,
            },
            Scenario {
                subscribers: 100,
                burst: 3_000,
            },
            Scenario {
                subscribers: 10_000,
                burst: 30,
            },
        ],
        repeats: 3,
        servers: vec![ServerKind::Nsbridge, ServerKind::Node],
        rate: 10,
        steady_secs: 10,
        markdown: None,
        pin: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--scenarios" => {
                args.scenarios = value()?
                    .split(',')
                    .map(|s| {
                        let (subscribers, burst) =
                            s.trim().split_once('x').ok_or(format!("bad scenario {s}"))?;
                        Ok(Scenario {
                            subscribers: subscribers.parse().map_err(|_| format!("bad scenario {s}"))?,
                            burst: burst.parse().map_err(|_| format!("bad scenario {s}"))?,
                        })
                    })
                    .collect::<Result<_, String>>()?
            }
            "--repeats" => args.repeats = value()?.parse().map_err(|_| "bad --repeats")?,
            "--rate" => args.rate = value()?.parse().map_err(|_| "bad --rate")?,
            "--steady-secs" => args.steady_secs = value()?.parse().map_err(|_| "bad --steady-secs")?,
            "--servers" => {
                args.servers = value()?
                    .split(',')
                    .map(|s| match s {
                        "nsbridge" => Ok(ServerKind::Nsbridge),
                        "node" => Ok(ServerKind::Node),
                        other => Err(format!("unknown server {other}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--markdown" => args.markdown = Some(PathBuf::from(value()?)),
            "--pin" => args.pin = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
            "-h" | "--help" => {
                return Err(
                    "usage: bench [--scenarios 1000x300,100x3000,10000x30] [--repeats 3] \
                    [--servers nsbridge,node] [--rate 10] [--steady-secs 10] [--markdown FILE] [--pin]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

// ------------------------------------------------------------------------- the store

struct Store {
    uri_base: String,
    /// Killed before its data directory goes.
    _store: Option<Killed>,
    _dir: tempfile::TempDir,
}

impl Store {
    /// `MONGODB_URI` when set, else the compatibility store of the tests.
    async fn start() -> Store {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(uri) = std::env::var("MONGODB_URI") {
            // The same server, this benchmark's own database.
            let (base, query) = uri.split_once('?').unwrap_or((&uri, ""));
            let scheme_end = base.find("://").map_or(0, |i| i + 3);
            let authority_end = base[scheme_end..]
                .find('/')
                .map_or(base.len(), |i| scheme_end + i);
            return Store {
                uri_base: format!("{}/{DATABASE}?{query}", &base[..authority_end]),
                _store: None,
                _dir: dir,
            };
        }
        let port = free_port();
        let store = start_store(port, dir.path());
        Store {
            uri_base: format!("mongodb://127.0.0.1:{port}/{DATABASE}?directConnection=true"),
            _store: Some(store),
            _dir: dir,
        }
    }
}

// ------------------------------------------------------------------------ the servers

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ServerKind {
    Nsbridge,
    Node,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Nsbridge => "nsbridge",
            ServerKind::Node => "Node",
        }
    }
}

struct Server {
    kind: ServerKind,
    child: Child,
    port: u16,
}

impl Server {
    async fn start(kind: ServerKind, uri: &str, pin: bool) -> Server {
        let port = free_port();
        // `taskset -c 0 PROGRAM` execs PROGRAM: the pid stays the server's.
        let program = |path: PathBuf| {
            if pin {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(SERVER_CPU).arg(path);
                c
            } else {
                Command::new(path)
            }
        };
        let mut command = match kind {
            ServerKind::Nsbridge => {
                // The default settings, as users get them.
                let mut c = program(repo().join("target/release/nsbridge"));
                c.env("NSBRIDGE_LISTEN", format!("127.0.0.1:{port}"))
                    .env("NSBRIDGE_LOG__LEVEL", "warn");
                c
            }
            ServerKind::Node => {
                let mut c = program(PathBuf::from("node"));
                c.arg(repo().join("bench/node-peer/server.js"))
                    .env("PORT", port.to_string());
                c
            }
        };
        let child = command
            .env("MONGODB_URI", uri)
            .env("API_SECRET", API_SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", kind.name()));
        let server = Server { kind, child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = if kind == ServerKind::Nsbridge {
                "/readyz"
            } else {
                "/stats"
            };
            if let Ok((200, _)) = http_get(port, path).await {
                break;
            }
            assert!(Instant::now() < deadline, "{} never ready", kind.name());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.pid())
    }

    async fn reset_own_share(&self) -> OwnShare {
        match self.kind {
            ServerKind::Nsbridge => OwnShare::Histograms {
                fanout: buckets(self.port, FANOUT).await,
                delivery: buckets(self.port, DELIVERY).await,
            },
            ServerKind::Node => {
                let _ = http_get(self.port, "/stats?reset=1").await;
                OwnShare::Reset
            }
        }
    }

    /// p50 and p99 of the server's own share (change event in → queued to the last
    /// socket), and for nsbridge of the time until every socket's transport took it, ms.
    async fn own_share(&self, since: &OwnShare) -> [f64; 4] {
        match (self.kind, since) {
            (ServerKind::Nsbridge, OwnShare::Histograms { fanout, delivery }) => {
                let quantiles = |before: &[(f64, f64)], after: Vec<(f64, f64)>| {
                    let delta = histogram_delta(before, &after);
                    (
                        bucket_quantile(&delta, 0.5) * 1000.0,
                        bucket_quantile(&delta, 0.99) * 1000.0,
                    )
                };
                let (fanout_p50, fanout_p99) = quantiles(fanout, buckets(self.port, FANOUT).await);
                let (delivery_p50, delivery_p99) = quantiles(delivery, buckets(self.port, DELIVERY).await);
                [fanout_p50, fanout_p99, delivery_p50, delivery_p99]
            }
            _ => {
                let (_, body) = http_get(self.port, "/stats").await.unwrap();
                let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
                [
                    stats["fanout_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                    stats["fanout_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                    f64::NAN,
                    f64::NAN,
                ]
            }
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum OwnShare {
    Histograms {
        fanout: Vec<(f64, f64)>,
        delivery: Vec<(f64, f64)>,
    },
    Reset,
}

const FANOUT: &str = "nsbridge_fanout_duration_seconds";
const DELIVERY: &str = "nsbridge_delivery_duration_seconds";

/// The cumulative buckets of histogram `name` on the bridge's /metrics.
async fn buckets(port: u16, name: &str) -> Vec<(f64, f64)> {
    let (_, text) = http_get(port, "/metrics").await.unwrap();
    histogram_buckets(&text, name)
}

// --------------------------------------------------------------------- the load

/// The phases of a run, as written in each document's `p` field.
const STEADY: usize = 1;
const BURST: usize = 2;
const AFTER: usize = 3;

/// What the clients saw, per phase.
#[derive(Default)]
struct Recorder {
    received: [AtomicU64; 4],
    /// Write → client latencies, µs, of the steady and burst phases.
    latencies: [Mutex<Vec<u32>>; 4],
    /// When the last message of each phase arrived, µs since the epoch.
    last_arrival: [AtomicU64; 4],
    disconnected: AtomicU64,
}

impl Recorder {
    fn on_event(&self, text: &str) {
        let Some(phase) = number_after(text, "\"p\":") else {
            return;
        };
        let phase = (phase as usize).min(AFTER);
        let now = now_us();
        self.received[phase].fetch_add(1, Ordering::Relaxed);
        self.last_arrival[phase].fetch_max(now, Ordering::Relaxed);
        if (phase == STEADY || phase == BURST)
            && let Some(t0) = number_after(text, "\"t0\":")
        {
            let latency = now.saturating_sub(t0);
            self.latencies[phase]
                .lock()
                .unwrap()
                .push(latency.min(u32::MAX as u64) as u32);
        }
    }

    fn latency_quantiles(&self, phase: usize) -> (f64, f64, f64) {
        let mut latencies = std::mem::take(&mut *self.latencies[phase].lock().unwrap());
        if latencies.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        (at(0.5), at(0.99), at(1.0))
    }
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: &str = &text[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// One subscribed client, recording every event until its connection ends.
async fn client(
    port: u16,
    token: Arc<str>,
    recorder: Arc<Recorder>,
    gate: Arc<Semaphore>,
    ready: mpsc::Sender<bool>,
) {
    let permit = gate.acquire_owned().await.unwrap();
    let subscriber = WsSubscriber::connect(port, &token, &["entries"]).await;
    drop(permit);
    let Ok(mut subscriber) = subscriber else {
        let _ = ready.send(false).await;
        return;
    };
    let _ = ready.send(true).await;
    while let Some(event) = subscriber.next_event().await {
        recorder.on_event(&event);
    }
    recorder.disconnected.fetch_add(1, Ordering::Relaxed);
}

// ----------------------------------------------------------------------- one run

#[derive(Debug, Clone, Default)]
struct RunResult {
    setup_rate: f64,
    rss_per_conn_kib: f64,
    steady_p50_ms: f64,
    steady_p99_ms: f64,
    own_p50_ms: f64,
    own_p99_ms: f64,
    written_p50_ms: f64,
    written_p99_ms: f64,
    burst_msgs_per_s: f64,
    burst_cpu_us_per_msg: f64,
    burst_p50_ms: f64,
    burst_p99_ms: f64,
    burst_max_ms: f64,
    lost: i64,
    disconnected: u64,
    loadgen_cpu_us_per_msg: f64,
}

/// Writes `count` APIv3-shaped entries of `phase`, one every `1 / rate` s.
async fn paced_writes(entries: &mongodb::Collection<Document>, phase: usize, count: u64, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    for i in 0..count {
        tick.tick().await;
        let t0 = now_us() as i64;
        entries
            .insert_one(entry(format!("p{phase}-{i}"), phase, t0))
            .await
            .unwrap();
    }
}

fn entry(identifier: String, phase: usize, t0: i64) -> Document {
    doc! { "identifier": identifier, "p": phase as i32, "t0": t0, "type": "sgv", "sgv": 100, "date": t0 / 1000,
    "srvModified": t0 / 1000, "srvCreated": t0 / 1000 }
}

async fn run_one(
    kind: ServerKind,
    scenario: Scenario,
    store: &Store,
    token: &Arc<str>,
    db: &mongodb::Database,
    args: &Args,
) -> RunResult {
    let n = scenario.subscribers;
    let server = Server::start(kind, &store.uri_base, args.pin).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_kib();

    // Set-up: N clients connected and subscribed.
    let recorder = Arc::new(Recorder::default());
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel(1024);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        tasks.push(tokio::spawn(client(
            server.port,
            token.clone(),
            recorder.clone(),
            gate.clone(),
            ready_tx.clone(),
        )));
    }
    let mut subscribed = 0;
    for _ in 0..n {
        if ready_rx.recv().await == Some(true) {
            subscribed += 1;
        }
    }
    let setup = started.elapsed();
    assert_eq!(
        subscribed,
        n,
        "{}: only {subscribed} of {n} clients subscribed",
        kind.name()
    );

    // Idle memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = server.rss_kib();

    // Steady writes: latency and the server's own share.
    let entries = db.collection::<Document>("entries");
    let own_since = server.reset_own_share().await;
    let steady_writes = args.steady_secs * args.rate as u64;
    paced_writes(&entries, STEADY, steady_writes, args.rate).await;
    wait_for(
        &recorder,
        STEADY,
        steady_writes * n as u64,
        Duration::from_secs(10),
    )
    .await;
    let [own_p50, own_p99, written_p50, written_p99] = server.own_share(&own_since).await;
    let (steady_p50, steady_p99, _) = recorder.latency_quantiles(STEADY);

    // The burst: one insert_many.
    let cpu_before = server.cpu_ns();
    let loadgen_before = process_cpu_ns(std::process::id());
    let t0 = now_us();
    let documents: Vec<Document> = (0..scenario.burst)
        .map(|i| entry(format!("burst-{i}"), BURST, t0 as i64))
        .collect();
    entries.insert_many(documents).await.unwrap();
    let burst_expected = (scenario.burst * n) as u64;
    wait_for(&recorder, BURST, burst_expected, Duration::from_secs(30)).await;
    let cpu_used = server.cpu_ns() - cpu_before;
    let loadgen_used = process_cpu_ns(std::process::id()) - loadgen_before;
    let burst_received = recorder.received[BURST].load(Ordering::Relaxed);
    let burst_elapsed_us = recorder.last_arrival[BURST]
        .load(Ordering::Relaxed)
        .saturating_sub(t0)
        .max(1);
    let (burst_p50, burst_p99, burst_max) = recorder.latency_quantiles(BURST);

    // Steady again: the channel still delivers to everyone.
    let after_writes = (args.rate as u64 * 2).max(10);
    paced_writes(&entries, AFTER, after_writes, args.rate).await;
    wait_for(&recorder, AFTER, after_writes * n as u64, Duration::from_secs(10)).await;

    let expected = (steady_writes + after_writes) * n as u64 + burst_expected;
    let received: u64 = [STEADY, BURST, AFTER]
        .iter()
        .map(|&p| recorder.received[p].load(Ordering::Relaxed))
        .sum();
    let disconnected = recorder.disconnected.load(Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    server.stop();
    RunResult {
        setup_rate: n as f64 / setup.as_secs_f64(),
        rss_per_conn_kib: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        steady_p50_ms: steady_p50,
        steady_p99_ms: steady_p99,
        own_p50_ms: own_p50,
        own_p99_ms: own_p99,
        written_p50_ms: written_p50,
        written_p99_ms: written_p99,
        burst_msgs_per_s: burst_received as f64 / (burst_elapsed_us as f64 / 1e6),
        burst_cpu_us_per_msg: cpu_used as f64 / 1000.0 / burst_received.max(1) as f64,
        burst_p50_ms: burst_p50,
        burst_p99_ms: burst_p99,
        burst_max_ms: burst_max,
        lost: expected as i64 - received as i64,
        disconnected,
        loadgen_cpu_us_per_msg: loadgen_used as f64 / 1000.0 / burst_received.max(1) as f64,
    }
}

/// Waits until phase `phase` has `expected` deliveries, or until `quiet` passes without
/// any new one.
async fn wait_for(recorder: &Recorder, phase: usize, expected: u64, quiet: Duration) {
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        let now = recorder.received[phase].load(Ordering::Relaxed);
        if now >= expected {
            return;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > quiet {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ----------------------------------------------------------------------- report

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Name, value, decimals.
type Metric = (&'static str, fn(&RunResult) -> f64, usize);

const METRICS: [Metric; 16] = [
    ("messages lost", |r| r.lost as f64, 0),
    ("clients disconnected", |r| r.disconnected as f64, 0),
    ("burst: delivered messages/s", |r| r.burst_msgs_per_s, 0),
    (
        "burst: server CPU µs per delivered message",
        |r| r.burst_cpu_us_per_msg,
        2,
    ),
    ("burst: write → client p50 (ms)", |r| r.burst_p50_ms, 1),
    ("burst: write → client p99 (ms)", |r| r.burst_p99_ms, 1),
    ("burst: write → client max (ms)", |r| r.burst_max_ms, 1),
    ("steady: write → client p50 (ms)", |r| r.steady_p50_ms, 2),
    ("steady: write → client p99 (ms)", |r| r.steady_p99_ms, 2),
    ("steady: server's own share p50 (ms)", |r| r.own_p50_ms, 3),
    ("steady: server's own share p99 (ms)", |r| r.own_p99_ms, 3),
    (
        "steady: until every socket's transport took it p50 (ms)",
        |r| r.written_p50_ms,
        3,
    ),
    (
        "steady: until every socket's transport took it p99 (ms)",
        |r| r.written_p99_ms,
        3,
    ),
    (
        "resident memory per idle subscribed connection (KiB)",
        |r| r.rss_per_conn_kib,
        1,
    ),
    (
        "connection set-up rate (subscribed clients/s)",
        |r| r.setup_rate,
        0,
    ),
    (
        "load generator CPU µs per delivered message (burst)",
        |r| r.loadgen_cpu_us_per_msg,
        2,
    ),
];

fn report(args: &Args, results: &HashMap<(ServerKind, Scenario), Vec<RunResult>>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Medians of {} runs; default settings; steady phases {} writes/s for {} s; {}.\n",
        args.repeats,
        args.rate,
        args.steady_secs,
        if args.pin {
            "server pinned to CPU 0, load generator and store to CPU 1"
        } else {
            "not pinned"
        }
    );
    for &scenario in &args.scenarios {
        let _ = writeln!(out, "### {scenario}\n");
        let _ = writeln!(out, "| metric | nsbridge | Node | nsbridge/Node |");
        let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
        for (name, get, decimals) in METRICS {
            let value_of = |kind| {
                results
                    .get(&(kind, scenario))
                    .map(|runs| median(&mut runs.iter().map(get).collect::<Vec<_>>()))
                    .unwrap_or(f64::NAN)
            };
            let ours = value_of(ServerKind::Nsbridge);
            let node = value_of(ServerKind::Node);
            let ratio = if node != 0.0 && !node.is_nan() && !ours.is_nan() {
                format!("{:.3}", ours / node)
            } else {
                "n/a".into()
            };
            let show = |v: f64| {
                if v.is_nan() {
                    "n/a".to_string()
                } else {
                    format!("{v:.decimals$}")
                }
            };
            let _ = writeln!(out, "| {name} | {} | {} | {ratio} |", show(ours), show(node));
        }
        let _ = writeln!(out);
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    for binary in [
        repo().join("target/release/nsbridge"),
        repo().join("bench/node-peer/node_modules"),
    ] {
        assert!(
            Path::new(&binary).exists(),
            "{} missing: run scripts/bench",
            binary.display()
        );
    }
    if args.pin {
        // This process (the load generator) and the store it starts on the other CPU.
        let status = Command::new("taskset")
            .args(["-a", "-cp", LOAD_CPU, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "taskset failed: run without --pin"
        );
    }
    let store = Store::start().await;
    let client = Client::with_uri_str(&store.uri_base).await.unwrap();
    let db = client.database(DATABASE);
    db.drop().await.unwrap();
    let id = ObjectId::new();
    db.collection::<Document>("auth_subjects")
        .insert_one(doc! { "_id": id, "name": "bench", "roles": ["readable"] })
        .await
        .unwrap();
    let token: Arc<str> = Arc::from(nsbridge::auth::token::access_token(
        "bench",
        &nsbridge::auth::token::subject_digest(
            &nsbridge::auth::token::api_secret_hash(API_SECRET),
            &id.to_hex(),
        ),
    ));

    let mut results: HashMap<(ServerKind, Scenario), Vec<RunResult>> = HashMap::new();
    for repeat in 0..args.repeats {
        for &scenario in &args.scenarios {
            let mut order = args.servers.clone();
            if repeat % 2 == 1 {
                order.reverse();
            }
            for kind in order {
                let r = run_one(kind, scenario, &store, &token, &db, &args).await;
                eprintln!(
                    "run {} {:>6}×{:<5} {:>8}: lost {} disconnected {}; burst {:>8.0} msg/s, {:>5.2} µs CPU/msg, p50 {:>7.1} p99 {:>7.1} max {:>7.1} ms; steady p99 {:>6.2} ms, own p99 {:>6.3} ms; {:>5.1} KiB/conn; {:>5.0} conn/s",
                    repeat + 1,
                    scenario.subscribers,
                    scenario.burst,
                    kind.name(),
                    r.lost,
                    r.disconnected,
                    r.burst_msgs_per_s,
                    r.burst_cpu_us_per_msg,
                    r.burst_p50_ms,
                    r.burst_p99_ms,
                    r.burst_max_ms,
                    r.steady_p99_ms,
                    r.own_p99_ms,
                    r.rss_per_conn_kib,
                    r.setup_rate,
                );
                results.entry((kind, scenario)).or_default().push(r);
                // Let the store's change log and the kernel's sockets settle between runs.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let table = report(&args, &results);
    print!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).unwrap();
    }
}
