//! The front door's costs (`scripts/bench relay`): what relaying Nightscout's namespaces
//! adds, and what the missing WebSocket compression costs a client.
//!
//! 1. **Relayed events.** A Nightscout-shaped socket.io 4.5.4 server
//!    (`tests/compat/upstream.js`) emits an event to every socket of its root namespace,
//!    ten times a second; the same number of raw Engine.IO 4 clients receive it once
//!    connected to it directly and once through the bridge (`NSBRIDGE_UPSTREAM`), side by
//!    side in one run. Reported: write → client latency p50/p99 of both and the
//!    difference, and the bridge's resident memory per relayed client (each one a socket
//!    on the bridge and a connection to Nightscout).
//! 2. **Compression.** Nightscout's socket.io compresses WebSocket messages over 512 bytes
//!    (permessage-deflate, context kept between messages); the bridge's WebSocket layer does
//!    not. The bytes a `/storage` subscriber of all collections receives for an hour of
//!    typical data (an entry and an AndroidAPS device status every 5 minutes, four
//!    treatments), without and with that compression.

use std::io::Write as _;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{Killed, bridge_command, free_port, repo, rss_kib, spawn_until_ready, start_store};

#[path = "../tests/support/http.rs"]
#[allow(dead_code)]
mod http;

const CLIENTS: usize = 100;
const EVENTS: usize = 100;
const RATE_PER_S: u64 = 10;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// The Nightscout stand-in, on `port`.
fn start_upstream(port: u16) -> Killed {
    let mut command = Command::new("node");
    command
        .arg("upstream.js")
        .current_dir(repo().join("tests/compat"))
        .env("PORT", port.to_string());
    spawn_until_ready(command, "listening")
}

/// The bridge in front of the stand-in. It needs a MongoDB: the compatibility store.
fn start_bridge(port: u16, upstream_port: u16, store_port: u16) -> Killed {
    Killed(
        bridge_command(port)
            .env(
                "MONGODB_URI",
                format!("mongodb://127.0.0.1:{store_port}/relaybench?directConnection=true"),
            )
            .env("API_SECRET", "benchmark secret phrase")
            // What this benchmark measures: the bridge in front of Nightscout.
            .env("NSBRIDGE_UPSTREAM", format!("http://127.0.0.1:{upstream_port}"))
            .spawn()
            .expect("nsbridge"),
    )
}

/// A raw Engine.IO 4 client of the root namespace, recording each `tick` event's latency.
async fn client(port: u16, latencies: Arc<Mutex<Vec<u32>>>, connected: Arc<AtomicU64>) {
    let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    ws.send(Message::text("40")).await.unwrap();
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else { continue };
        let text = text.as_str();
        if text == "2" {
            let _ = ws.send(Message::text("3")).await;
        } else if text.starts_with("40{") {
            connected.fetch_add(1, Ordering::Relaxed);
        } else if let Some(rest) = text.strip_prefix(r#"42["tick",{"t0":"#) {
            let t0: u64 = rest[..rest.find('}').unwrap()].parse().unwrap();
            latencies
                .lock()
                .unwrap()
                .push(now_us().saturating_sub(t0).min(u32::MAX as u64) as u32);
        }
    }
}

async fn emit_ticks(upstream_port: u16) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_S));
    for _ in 0..EVENTS {
        tick.tick().await;
        let body = format!(r#"{{"ns":"/","event":"tick","args":[{{"t0":{}}}]}}"#, now_us());
        http::http_request(upstream_port, "POST", "/__test/emit", &body)
            .await
            .unwrap();
    }
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
}

/// Connects `CLIENTS` clients to `port`, emits the ticks, returns the sorted latencies.
async fn measure(port: u16, upstream_port: u16) -> Vec<u32> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(client(port, latencies.clone(), connected.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected.load(Ordering::Relaxed) < CLIENTS as u64 {
        assert!(Instant::now() < deadline, "clients did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emit_ticks(upstream_port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for task in tasks {
        task.abort();
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    assert_eq!(
        latencies.len(),
        CLIENTS * EVENTS,
        "every tick reached every client"
    );
    latencies.sort_unstable();
    latencies
}

async fn relayed_events(out: &mut String) {
    let dir = tempfile::tempdir().unwrap();
    let (store_port, upstream_port, bridge_port) = (free_port(), free_port(), free_port());
    let _store = start_store(store_port, dir.path());
    let _upstream = start_upstream(upstream_port);
    let bridge = start_bridge(bridge_port, upstream_port, store_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(
        http::http_get(bridge_port, "/nsbridge/readyz").await,
        Ok((200, _))
    ) {
        assert!(Instant::now() < deadline, "the bridge never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let direct = measure(upstream_port, upstream_port).await;
    let rss_before = rss_kib(bridge.0.id());
    let relayed = measure(bridge_port, upstream_port).await;
    // Measured while the clients were connected: resident memory is high-water.
    let rss_after = rss_kib(bridge.0.id());
    let row = |name: &str, direct: f64, relayed: f64| {
        format!(
            "| {name} | {direct:.2} | {relayed:.2} | {:+.2} |\n",
            relayed - direct
        )
    };
    out.push_str(&format!(
        "{CLIENTS} clients of the root namespace, {EVENTS} events at {RATE_PER_S}/s, each to every client.\n\n\
         | emit → client (ms) | directly to Nightscout | through the bridge | added |\n| --- | ---: | ---: | ---: |\n"
    ));
    out.push_str(&row("p50", quantile(&direct, 0.5), quantile(&relayed, 0.5)));
    out.push_str(&row("p99", quantile(&direct, 0.99), quantile(&relayed, 0.99)));
    out.push_str(&format!(
        "\nResident memory of the bridge per relayed client (its socket and its connection to Nightscout, \
         at most): {:.1} KiB.\n",
        rss_after.saturating_sub(rss_before) as f64 / CLIENTS as f64
    ));
}

/// An AndroidAPS-like device status (OpenAPS loop: IOB, suggestion with predictions,
/// pump and uploader state), as APIv3 stores it.
fn devicestatus(i: u64, now: u64) -> String {
    let preds = |base: i64| {
        (0..48)
            .map(|k| (base + (k as i64 * 7 + i as i64 * 3) % 40).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        r#"{{"identifier":"ds-{i}","device":"openaps://samsung SM-G991B","created_at":"2026-11-30T10:{i:02}:00.000Z","date":{now},"utcOffset":60,"uploaderBattery":74,"isCharging":false,"openaps":{{"suggested":{{"temp":"absolute","bg":142,"tick":"+3","eventualBG":128,"targetBG":100,"insulinReq":0.12,"deliverAt":"2026-11-30T10:{i:02}:00.000Z","sensitivityRatio":1,"predBGs":{{"IOB":[{}],"ZT":[{}],"COB":[{}],"UAM":[{}]}},"COB":12,"IOB":1.34,"reason":"COB: 12, Dev: 18, BGI: -2.1, ISF: 45, CR: 10, Target: 100, minPredBG 104, minGuardBG 98, IOBpredBG 118, UAMpredBG 121; Eventual BG 128 >= 100,  insulinReq 0.12; setting 30m low temp of 0.3U/h.","units":0.1,"rate":0.3,"duration":30,"timestamp":"2026-11-30T10:{i:02}:00.000Z"}},"enacted":{{"rate":0.3,"duration":30,"received":true,"timestamp":"2026-11-30T10:{i:02}:01.000Z"}},"iob":{{"iob":1.34,"basaliob":-0.2,"bolusiob":1.54,"activity":0.018,"time":"2026-11-30T10:{i:02}:00.000Z"}}}},"pump":{{"reservoir":143.5,"clock":"2026-11-30T10:{i:02}:00.000Z","battery":{{"percent":75}},"status":{{"status":"normal","timestamp":"2026-11-30T10:{i:02}:00.000Z"}},"extended":{{"Version":"3.3.1-dev","ActiveProfile":"Default","BaseBasalRate":0.8}}}},"srvModified":{now},"srvCreated":{now},"subject":"phone"}}"#,
        preds(120),
        preds(110),
        preds(130),
        preds(125)
    )
}

fn entry(i: u64, now: u64) -> String {
    format!(
        r#"{{"identifier":"e-{i}","type":"sgv","sgv":{},"direction":"Flat","device":"AndroidAPS-DexcomG6","date":{now},"dateString":"2026-11-30T10:{i:02}:00.000Z","utcOffset":60,"noise":1,"srvModified":{now},"srvCreated":{now},"subject":"phone"}}"#,
        120 + i % 30
    )
}

fn treatment(i: u64, now: u64) -> String {
    format!(
        r#"{{"identifier":"t-{i}","eventType":"Meal Bolus","insulin":3.5,"carbs":35,"created_at":"2026-11-30T10:{i:02}:00.000Z","date":{now},"utcOffset":60,"app":"AAPS","isValid":true,"srvModified":{now},"srvCreated":{now},"subject":"phone"}}"#
    )
}

/// Bytes of WebSocket frames (header + payload) for `messages`, raw and with
/// permessage-deflate over `threshold` bytes, the compression context kept between
/// messages as `ws` does by default.
fn frame_bytes(messages: &[String], threshold: usize) -> (usize, usize) {
    let header = |len: usize| {
        if len < 126 {
            2
        } else if len < 65_536 {
            4
        } else {
            10
        }
    };
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
    let (mut raw, mut deflated) = (0, 0);
    for message in messages {
        raw += header(message.len()) + message.len();
        if message.len() <= threshold {
            deflated += header(message.len()) + message.len();
            continue;
        }
        let mut out = Vec::with_capacity(message.len());
        compressor
            .compress_vec(message.as_bytes(), &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        // permessage-deflate drops the sync flush's trailing 00 00 ff ff.
        let len = out.len().saturating_sub(4);
        deflated += header(len) + len;
    }
    (raw, deflated)
}

fn compression(out: &mut String) {
    let now = 1_796_032_800_000u64;
    let mut messages = Vec::new();
    let event = |name: &str, col: &str, doc: String| {
        format!(r#"42/storage,["{name}",{{"colName":"{col}","doc":{doc}}}]"#)
    };
    for i in 0..12 {
        messages.push(event("create", "entries", entry(i * 5, now)));
        messages.push(event("create", "devicestatus", devicestatus(i * 5, now)));
    }
    for i in 0..4 {
        messages.push(event("create", "treatments", treatment(i * 15, now)));
    }
    // Engine.IO pings every 25 s: "2" down, "3" up.
    let pings = 3600 / 25;
    let (raw, deflated) = frame_bytes(&messages, 512);
    let ping_bytes = pings * 3;
    let mut buf = Vec::new();
    let sizes: Vec<usize> = messages.iter().map(String::len).collect();
    writeln!(
        buf,
        "An hour of typical data for a `/storage` subscriber of all collections: 12 entries \
         ({} bytes each), 12 AndroidAPS device statuses (~{} bytes each), 4 treatments ({} bytes \
         each), and {pings} pings.\n\n| | bytes per hour | per day |\n| --- | ---: | ---: |\n\
         | without compression (nsbridge) | {} | {} |\n| permessage-deflate over 512 bytes (Nightscout) | {} | {} |\n\
         | ratio | {:.2} | |",
        sizes[0],
        sizes[1],
        sizes[sizes.len() - 1],
        raw + ping_bytes,
        (raw + ping_bytes) * 24,
        deflated + ping_bytes,
        (deflated + ping_bytes) * 24,
        (raw + ping_bytes) as f64 / (deflated + ping_bytes) as f64,
    )
    .unwrap();
    out.push_str(&String::from_utf8(buf).unwrap());
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    for needed in [
        "target/release/nsbridge",
        "tests/compat/node_modules/socket.io",
        "target/test-store/venv",
    ] {
        assert!(
            repo().join(needed).exists(),
            "{needed} missing: run scripts/bench relay"
        );
    }
    let mut out = String::from("### Relayed events\n\n");
    relayed_events(&mut out).await;
    out.push_str("\n### Compression\n\n");
    compression(&mut out);
    println!("{out}");
}
