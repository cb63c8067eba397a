//! nsbridge against Nightscout's Node channel, side by side on one store and one load.
//!
//! Run it with `scripts/bench` (which builds both, installs the Node peer and the test
//! store); see BENCHMARKS.md for what it measures and the figures of this machine.
//!
//! For each number of subscribers, each server in turn (alternating which goes first):
//! start it, open and subscribe the clients (set-up rate), let them idle (resident memory
//! per connection), write at a steady rate (write → client latency, the server's own
//! share, losses), then write a burst (delivered messages per second, server CPU time per
//! delivered message). Runs are repeated and the medians reported, with nsbridge/Node
//! ratios: the machine is shared and noisy, ratios within one run are what compare.
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

use futures::{SinkExt, StreamExt};
use mongodb::Client;
use mongodb::bson::{Document, doc, oid::ObjectId};

#[path = "../tests/support/http.rs"]
mod http;
use http::http_get;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;

const API_SECRET: &str = "benchmark secret phrase";
const DATABASE: &str = "bench";
/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 200;
/// With `pin`: the server's CPU; the load generator and the store get the other one.
const SERVER_CPU: &str = "0";
const LOAD_CPU: &str = "1";

#[derive(Debug, Clone)]
struct Args {
    subscribers: Vec<usize>,
    repeats: usize,
    servers: Vec<ServerKind>,
    latency_secs: u64,
    rate: u32,
    /// Deliveries aimed at in the burst phase (writes = this / subscribers, bounded).
    burst_deliveries: usize,
    markdown: Option<PathBuf>,
    /// Server on CPU 0, load generator and store on CPU 1 (when there are two or more).
    pin: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        subscribers: vec![100, 1_000, 10_000],
        repeats: 3,
        servers: vec![ServerKind::Nsbridge, ServerKind::Node],
        latency_secs: 10,
        rate: 10,
        burst_deliveries: 1_000_000,
        markdown: None,
        pin: std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--subscribers" => {
                args.subscribers = value()?
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|_| format!("bad --subscribers {n}")))
                    .collect::<Result<_, _>>()?
            }
            "--repeats" => args.repeats = value()?.parse().map_err(|_| "bad --repeats")?,
            "--latency-secs" => args.latency_secs = value()?.parse().map_err(|_| "bad --latency-secs")?,
            "--rate" => args.rate = value()?.parse().map_err(|_| "bad --rate")?,
            "--burst-deliveries" => {
                args.burst_deliveries = value()?.parse().map_err(|_| "bad --burst-deliveries")?
            }
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
            "--no-pin" => args.pin = false,
            "-h" | "--help" => {
                return Err("usage: bench [--subscribers 100,1000,10000] [--repeats 3] \
                    [--servers nsbridge,node] [--latency-secs 10] [--rate 10] \
                    [--burst-deliveries 1000000] [--markdown FILE] [--no-pin]"
                    .into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ------------------------------------------------------------------------- the store

struct Store {
    uri_base: String,
    child: Option<Child>,
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
                child: None,
                _dir: dir,
            };
        }
        let python = repo().join("target/test-store/venv/bin/python");
        assert!(
            python.is_file(),
            "no store: run scripts/bench (it installs the compatibility store)"
        );
        let port = free_port();
        let mut child = Command::new(python)
            .arg(repo().join("tests/support/store/nx_launcher.py"))
            .args(["--host", "127.0.0.1", "-p", &port.to_string(), "--data-dir"])
            .arg(dir.path())
            .arg("--pid-file")
            .arg(dir.path().join("pid"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.contains("ready"), "store did not start: {line}");
        Store {
            uri_base: format!("mongodb://127.0.0.1:{port}/{DATABASE}?directConnection=true"),
            child: Some(child),
            _dir: dir,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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
                let mut c = program(repo().join("target/release/nsbridge"));
                // A queue as deep as Node's (unbounded) buffers: the burst would otherwise
                // cut off clients of this one-thread load generator, by design.
                c.env("NSBRIDGE_LISTEN", format!("127.0.0.1:{port}"))
                    .env("NSBRIDGE_LOG__LEVEL", "warn")
                    .env("NSBRIDGE_CHANNEL__QUEUE_SIZE", "65536");
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
            ServerKind::Nsbridge => OwnShare::Histogram(fanout_buckets(self.port).await),
            ServerKind::Node => {
                let _ = http_get(self.port, "/stats?reset=1").await;
                OwnShare::Reset
            }
        }
    }

    /// p50 and p99 of the server's own share (change event in → last socket write), ms.
    async fn own_share(&self, since: &OwnShare) -> (f64, f64) {
        match (self.kind, since) {
            (ServerKind::Nsbridge, OwnShare::Histogram(before)) => {
                let after = fanout_buckets(self.port).await;
                let delta: Vec<(f64, f64)> = after
                    .iter()
                    .map(|(le, count)| {
                        (
                            *le,
                            count - before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c),
                        )
                    })
                    .collect();
                (
                    bucket_quantile(&delta, 0.5) * 1000.0,
                    bucket_quantile(&delta, 0.99) * 1000.0,
                )
            }
            _ => {
                let (_, body) = http_get(self.port, "/stats").await.unwrap();
                let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
                (
                    stats["fanout_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                    stats["fanout_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                )
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
    Histogram(Vec<(f64, f64)>),
    Reset,
}

/// CPU time of every thread of a process, from the scheduler (nanoseconds).
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

async fn fanout_buckets(port: u16) -> Vec<(f64, f64)> {
    let (_, text) = http_get(port, "/metrics").await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("nsbridge_fanout_duration_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Prometheus' `histogram_quantile`: linear within the bucket.
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, c)| *c);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = count - lower.1;
            return lower.0
                + (le - lower.0)
                    * if width > 0.0 {
                        (rank - lower.1) / width
                    } else {
                        1.0
                    };
        }
        lower = (le, count);
    }
    lower.0
}

// --------------------------------------------------------------------- the load

/// What the clients saw, per phase (`p` field of the written documents).
#[derive(Default)]
struct Recorder {
    received: [AtomicU64; 3],
    /// Write → client latencies of the steady phase, µs.
    latencies: Mutex<Vec<u32>>,
    disconnected: AtomicU64,
}

impl Recorder {
    fn on_event(&self, text: &str) {
        let Some(phase) = number_after(text, "\"p\":") else {
            return;
        };
        let phase = (phase as usize).min(2);
        self.received[phase].fetch_add(1, Ordering::Relaxed);
        if phase == 1
            && let Some(t0) = number_after(text, "\"t0\":")
        {
            let latency = now_us().saturating_sub(t0);
            self.latencies
                .lock()
                .unwrap()
                .push(latency.min(u32::MAX as u64) as u32);
        }
    }
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: &str = &text[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// One subscribed client: Engine.IO 4 over WebSocket, spoken raw.
async fn client(
    port: u16,
    token: Arc<str>,
    recorder: Arc<Recorder>,
    gate: Arc<Semaphore>,
    ready: mpsc::Sender<bool>,
) {
    let permit = gate.acquire_owned().await.unwrap();
    let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
        let _ = ready.send(false).await;
        return;
    };
    let mut subscribed = false;
    let _ = ws.send(Message::text("40/storage,")).await;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else { continue };
        let text = text.as_str();
        if text == "2" {
            let _ = ws.send(Message::text("3")).await;
        } else if text.starts_with("42/storage,") {
            recorder.on_event(text);
        } else if text.starts_with("40/storage,") {
            let subscribe =
                format!(r#"42/storage,0["subscribe",{{"accessToken":"{token}","collections":["entries"]}}]"#);
            let _ = ws.send(Message::text(subscribe)).await;
        } else if text.starts_with("43/storage,0") && !subscribed {
            subscribed = text.contains("\"success\":true");
            let _ = ready.send(subscribed).await;
            drop(permit);
            if !subscribed {
                return;
            }
            break;
        }
    }
    if !subscribed {
        return;
    }
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(text) if text.as_str() == "2" => {
                let _ = ws.send(Message::text("3")).await;
            }
            Message::Text(text) => recorder.on_event(text.as_str()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    recorder.disconnected.fetch_add(1, Ordering::Relaxed);
}

// ----------------------------------------------------------------------- one run

#[derive(Debug, Clone, Default)]
struct RunResult {
    setup_rate: f64,
    rss_per_conn_kib: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    own_p50_ms: f64,
    own_p99_ms: f64,
    steady_losses: i64,
    burst_msgs_per_s: f64,
    burst_cpu_us_per_msg: f64,
    burst_losses: i64,
    loadgen_cpu_us_per_msg: f64,
}

async fn run_one(
    kind: ServerKind,
    n: usize,
    store: &Store,
    token: &Arc<str>,
    db: &mongodb::Database,
    args: &Args,
) -> RunResult {
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

    // Steady writes, latency.
    let own_since = server.reset_own_share().await;
    let writes = args.latency_secs * args.rate as u64;
    let entries = db.collection::<Document>("entries");
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate);
    for i in 0..writes {
        tick.tick().await;
        let t0 = now_us() as i64;
        entries
            .insert_one(doc! { "identifier": format!("lat-{i}"), "p": 1, "t0": t0, "sgv": 100, "srvModified": t0 / 1000, "srvCreated": t0 / 1000 })
            .await
            .unwrap();
    }
    let expected = writes * n as u64;
    wait_for(&recorder, 1, expected, Duration::from_secs(10)).await;
    let (own_p50, own_p99) = server.own_share(&own_since).await;
    let mut latencies = std::mem::take(&mut *recorder.latencies.lock().unwrap());
    latencies.sort_unstable();
    let percentile = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
    };
    let steady_losses = expected as i64 - recorder.received[1].load(Ordering::Relaxed) as i64;

    // Burst, throughput and CPU.
    let burst_writes = (args.burst_deliveries / n).clamp(20, 5_000);
    let burst_expected = (burst_writes * n) as u64;
    let cpu_before = server.cpu_ns();
    let loadgen_before = process_cpu_ns(std::process::id());
    let burst_started = Instant::now();
    let docs: Vec<Document> = (0..burst_writes)
        .map(|i| {
            let t0 = now_us() as i64;
            doc! { "identifier": format!("burst-{i}"), "p": 2, "t0": t0, "sgv": 100, "srvModified": t0 / 1000, "srvCreated": t0 / 1000 }
        })
        .collect();
    for chunk in docs.chunks(100) {
        entries.insert_many(chunk.to_vec()).await.unwrap();
    }
    wait_for(&recorder, 2, burst_expected, Duration::from_secs(120)).await;
    let burst_elapsed = burst_started.elapsed();
    let burst_received = recorder.received[2].load(Ordering::Relaxed);
    let cpu_used = server.cpu_ns() - cpu_before;
    let loadgen_used = process_cpu_ns(std::process::id()) - loadgen_before;

    for task in tasks {
        task.abort();
    }
    server.stop();
    RunResult {
        setup_rate: n as f64 / setup.as_secs_f64(),
        rss_per_conn_kib: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        latency_p50_ms: percentile(0.5),
        latency_p99_ms: percentile(0.99),
        own_p50_ms: own_p50,
        own_p99_ms: own_p99,
        steady_losses,
        burst_msgs_per_s: burst_received as f64 / burst_elapsed.as_secs_f64(),
        burst_cpu_us_per_msg: cpu_used as f64 / 1000.0 / burst_received.max(1) as f64,
        burst_losses: burst_expected as i64 - burst_received as i64,
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

type Metric = (&'static str, fn(&RunResult) -> f64, &'static str);

const METRICS: [Metric; 11] = [
    ("delivered messages/s (burst)", |r| r.burst_msgs_per_s, "{:.0}"),
    (
        "server CPU µs per delivered message",
        |r| r.burst_cpu_us_per_msg,
        "{:.2}",
    ),
    ("latency write → client p50 (ms)", |r| r.latency_p50_ms, "{:.2}"),
    ("latency write → client p99 (ms)", |r| r.latency_p99_ms, "{:.2}"),
    ("server's own share p50 (ms)", |r| r.own_p50_ms, "{:.3}"),
    ("server's own share p99 (ms)", |r| r.own_p99_ms, "{:.3}"),
    (
        "resident memory per idle subscribed connection (KiB)",
        |r| r.rss_per_conn_kib,
        "{:.1}",
    ),
    (
        "connection set-up rate (subscribed clients/s)",
        |r| r.setup_rate,
        "{:.0}",
    ),
    (
        "messages lost (steady + burst)",
        |r| (r.steady_losses + r.burst_losses) as f64,
        "{:.0}",
    ),
    (
        "load generator CPU µs per delivered message",
        |r| r.loadgen_cpu_us_per_msg,
        "{:.2}",
    ),
    ("(steady messages lost)", |r| r.steady_losses as f64, "{:.0}"),
];

fn format_value(format: &str, value: f64) -> String {
    if value.is_nan() {
        return "n/a".into();
    }
    let digits: usize = format
        .trim_start_matches("{:.")
        .trim_end_matches("}")
        .parse()
        .unwrap_or(2);
    format!("{value:.digits$}")
}

fn report(args: &Args, results: &HashMap<(ServerKind, usize), Vec<RunResult>>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Medians of {} runs; steady phase {} writes/s for {} s; burst ≈ {} deliveries; {}.\n",
        args.repeats,
        args.rate,
        args.latency_secs,
        args.burst_deliveries,
        if args.pin {
            "server pinned to CPU 0, load generator and store to CPU 1"
        } else {
            "not pinned"
        }
    );
    for &n in &args.subscribers {
        let _ = writeln!(out, "### {n} subscribers\n");
        let _ = writeln!(out, "| metric | nsbridge | Node | nsbridge/Node |");
        let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
        for (name, get, format) in METRICS.iter().take(10) {
            let value_of = |kind| {
                results
                    .get(&(kind, n))
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
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {ratio} |",
                format_value(format, ours),
                format_value(format, node)
            );
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
        assert!(status.is_ok_and(|s| s.success()), "taskset failed: try --no-pin");
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

    let mut results: HashMap<(ServerKind, usize), Vec<RunResult>> = HashMap::new();
    for repeat in 0..args.repeats {
        for &n in &args.subscribers {
            let mut order = args.servers.clone();
            if repeat % 2 == 1 {
                order.reverse();
            }
            for kind in order {
                let result = run_one(kind, n, &store, &token, &db, &args).await;
                eprintln!(
                    "run {} {:>6} subscribers {:>8}: {:>9.0} msg/s, {:>6.2} µs CPU/msg, p50 {:>6.2} ms, p99 {:>6.2} ms, own p99 {:>6.3} ms, {:>5.1} KiB/conn, {:>6.0} conn/s, lost {}",
                    repeat + 1,
                    n,
                    kind.name(),
                    result.burst_msgs_per_s,
                    result.burst_cpu_us_per_msg,
                    result.latency_p50_ms,
                    result.latency_p99_ms,
                    result.own_p99_ms,
                    result.rss_per_conn_kib,
                    result.setup_rate,
                    result.steady_losses + result.burst_losses,
                );
                results.entry((kind, n)).or_default().push(result);
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
