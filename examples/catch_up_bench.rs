//! Catch-up (`scripts/bench catch-up`): how fast a client that reconnects gets what it
//! missed, and what the history costs, with the default settings.
//!
//! 1. **The history's memory.** 10,000 events of a typical AndroidAPS mix (per five
//!    minutes: an entry, a device status, and a treatment every third time), encoded and
//!    recorded in a `History` with the default limits, in this process: the bytes it
//!    holds, measured by a counting allocator, of which the packets themselves.
//! 2. **Replay rate.** The bridge (release build, default settings) on the compatibility
//!    store; 5,000 entries written before it starts, 10,000 after. Side by side in one run:
//!    a live subscriber receiving the 10,000 as they are written (live rate), a subscriber
//!    with `since` before them (replay from the history), and one with `since` before the
//!    first 5,000 (replay from the collections: 5,000 documents, the default
//!    `replay.max_documents`, then the history). Events per second from the subscribe to
//!    the last event; repeated, medians reported. The bridge's resident memory with the
//!    history full, less before the writes, is reported too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bson::{Document, doc, oid::ObjectId};
use nsbridge::collections::Collection;
use nsbridge::delivery::packet_text;
use nsbridge::history::{History, HistoryLimits};
use nsbridge::mapping::{BridgeEvent, EventBody, EventKind};

mod common;
use common::{Killed, bridge_command, free_port, repo, rss_kib, start_store};

#[path = "../tests/support/http.rs"]
#[allow(dead_code)]
mod http;
#[path = "../tests/support/ws.rs"]
#[allow(dead_code)]
mod ws;
use ws::WsSubscriber;

const API_SECRET: &str = "benchmark secret phrase";
const EVENTS: usize = 10_000;
const BEFORE_START: usize = 5_000;
const RUNS: usize = 3;

/// Counts the bytes allocated and not yet freed.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn now_ms() -> i64 {
    nsbridge::feed::now_ms()
}

/// The i-th event of a typical AndroidAPS stream.
fn typical_event(i: usize, at: i64) -> BridgeEvent {
    let identifier = ObjectId::new().to_hex();
    let (collection, document) = match i % 7 {
        0 | 3 | 5 => (
            Collection::Entries,
            doc! { "identifier": identifier, "type": "sgv", "sgv": 100 + (i % 90) as i32, "direction": "Flat",
            "device": "AndroidAPS-DexcomG6", "date": at, "dateString": "2026-11-30T20:00:00.000Z",
            "utcOffset": 60, "isValid": true, "srvModified": at, "srvCreated": at, "subject": "AndroidAPS" },
        ),
        1 | 4 | 6 => (
            Collection::Devicestatus,
            doc! { "identifier": identifier, "device": "openaps://samsung SM-G973F", "created_at": "2026-11-30T20:00:00.000Z",
            "pump": { "battery": { "percent": 75 }, "status": { "status": "normal", "timestamp": "2026-11-30T20:00:00.000Z" },
                "extended": { "Version": "3.2.0.4", "ActiveProfile": "Default", "BaseBasalRate": 0.85, "TempBasalAbsoluteRate": 1.2 },
                "reservoir": 143.5, "clock": "2026-11-30T20:00:00.000Z" },
            "openaps": { "suggested": { "temp": "absolute", "bg": 121, "tick": "+2", "eventualBG": 118, "targetBG": 100,
                "insulinReq": 0.05, "reason": "COB: 12, Dev: 8, BGI: -1.2, ISF: 45, CR: 10, Target: 100, minPredBG 101, minGuardBG 98, IOBpredBG 104, COBpredBG 118; Eventual BG 118 >= 100, adj. req. rate: 1.2 to maxSafeBasal: 3.4, temp 0.9 < 1.2U/hr.",
                "predBGs": { "IOB": (0..48).map(|k| 121 - k / 2).collect::<Vec<i32>>(), "COB": (0..48).map(|k| 121 + k / 4).collect::<Vec<i32>>() },
                "COB": 12, "IOB": 1.1, "timestamp": "2026-11-30T20:00:00.000Z" },
              "iob": { "iob": 1.1, "basaliob": 0.3, "activity": 0.012, "time": "2026-11-30T20:00:00.000Z" } },
            "uploaderBattery": 64, "isCharging": false, "srvModified": at, "srvCreated": at, "subject": "AndroidAPS" },
        ),
        _ => (
            Collection::Treatments,
            doc! { "identifier": identifier, "eventType": "Correction Bolus", "insulin": 0.5, "created_at": "2026-11-30T20:00:00.000Z",
            "date": at, "utcOffset": 60, "type": "NORMAL", "isValid": true, "isSMB": true, "pumpId": 4_102_i64 + i as i64,
            "pumpType": "ACCU_CHEK_INSIGHT", "pumpSerial": "33013206", "app": "AAPS", "srvModified": at, "srvCreated": at, "subject": "AndroidAPS" },
        ),
    };
    BridgeEvent {
        collection,
        kind: EventKind::Create,
        body: EventBody::Doc(document),
        wall_time_ms: Some(at),
        modified_ms: Some(at),
    }
}

/// Bytes held by a default history of 10,000 typical events, and of them the packets.
fn history_memory() -> (usize, usize) {
    let start = now_ms();
    let events: Vec<BridgeEvent> = (0..EVENTS).map(|i| typical_event(i, start + i as i64)).collect();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut history = History::new(HistoryLimits::default(), start - 1);
    let mut packets = 0;
    for (i, event) in events.iter().enumerate() {
        let text = packet_text("/storage", event);
        packets += text.len();
        let packet = socketioxide_core::Str::from(String::from_utf8(text).unwrap());
        let token =
            bson::Bson::Document(doc! { "_data": format!("8267A1B2C3{i:016X}2B022C0100296E5A10041234") });
        history.push(event, packet, Some(token), start + i as i64);
    }
    assert_eq!(history.len(), EVENTS);
    let held = LIVE_BYTES.load(Ordering::Relaxed) - before;
    drop(history);
    (held, packets)
}

struct Bridge(Killed, u16);

async fn start_bridge(uri: &str) -> Bridge {
    let port = free_port();
    let child = bridge_command(port)
        .env("MONGODB_URI", uri)
        .env("API_SECRET", API_SECRET)
        .spawn()
        .expect("nsbridge");
    let bridge = Bridge(Killed(child), port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http::http_get(port, "/readyz").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "nsbridge never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bridge
}

async fn write_entries(db: &mongodb::Database, prefix: &str, count: usize) {
    let entries = db.collection::<Document>("entries");
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|i| {
                let at = now_ms();
                doc! { "identifier": format!("{prefix}{i}"), "type": "sgv", "sgv": 120, "date": at,
                "srvModified": at, "srvCreated": at }
            })
            .collect();
        entries.insert_many(docs).await.unwrap();
    }
}

/// Events per second a subscriber receives until `last`; the subscribe's ack too.
async fn receive_until(mut subscriber: WsSubscriber, last: &str, started: Instant) -> (f64, usize) {
    let mut count = 0;
    while let Some(packet) = subscriber.next_event().await {
        count += 1;
        if ws::identifier_of(&packet) == Some(last) {
            return (count as f64 / started.elapsed().as_secs_f64(), count);
        }
    }
    panic!("disconnected after {count} events");
}

struct Run {
    live: f64,
    from_history: f64,
    from_collections: f64,
    rss_kib: i64,
}

async fn run(store_uri: &str, database: &str) -> Run {
    let uri = format!("{store_uri}/{database}?directConnection=true");
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = client.database(database);
    let id = ObjectId::new();
    db.collection::<Document>("auth_subjects")
        .insert_one(doc! { "_id": id, "name": "bench", "roles": ["readable"] })
        .await
        .unwrap();
    let token = nsbridge::auth::token::access_token(
        "bench",
        &nsbridge::auth::token::subject_digest(
            &nsbridge::auth::token::api_secret_hash(API_SECRET),
            &id.to_hex(),
        ),
    );
    let before_start = now_ms() - 1;
    write_entries(&db, "old-", BEFORE_START).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let bridge = start_bridge(&uri).await;
    let port = bridge.1;
    let since = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rss_before = rss_kib(bridge.0.0.id()) as i64;

    // Live: the 10,000 as they are written.
    let live = WsSubscriber::connect(port, &token, &["entries"]).await.unwrap();
    let last = format!("new-{}", EVENTS - 1);
    let started = Instant::now();
    let receiving = tokio::spawn({
        let last = last.clone();
        async move { receive_until(live, &last, started).await }
    });
    write_entries(&db, "new-", EVENTS).await;
    let (live_rate, count) = receiving.await.unwrap();
    assert_eq!(count, EVENTS);
    let rss_after = rss_kib(bridge.0.0.id()) as i64;

    // From the history: everything after the bridge started.
    let started = Instant::now();
    let (subscriber, ack) = WsSubscriber::connect_since(port, &token, &["entries"], since)
        .await
        .unwrap();
    assert!(
        ack.contains(r#""from":"history""#) && ack.contains(r#""complete":true"#),
        "{ack}"
    );
    let (history_rate, count) = receive_until(subscriber, &last, started).await;
    assert_eq!(count, EVENTS);

    // From the collections: the 5,000 older documents first, then the history.
    let started = Instant::now();
    let (mut subscriber, ack) = WsSubscriber::connect_since(port, &token, &["entries"], before_start)
        .await
        .unwrap();
    assert!(ack.contains(r#""from":"collections""#), "{ack}");
    let mut count = 0;
    let mut collections_rate = 0.0;
    while let Some(packet) = subscriber.next_event().await {
        count += 1;
        if count == BEFORE_START {
            assert_eq!(
                ws::identifier_of(&packet),
                Some(format!("old-{}", BEFORE_START - 1).as_str())
            );
            collections_rate = count as f64 / started.elapsed().as_secs_f64();
        }
        if ws::identifier_of(&packet) == Some(last.as_str()) {
            break;
        }
    }
    assert_eq!(count, BEFORE_START + EVENTS, "each document once");
    drop(bridge);
    Run {
        live: live_rate,
        from_history: history_rate,
        from_collections: collections_rate,
        rss_kib: rss_after - rss_before,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    for needed in ["target/release/nsbridge", "target/test-store/venv"] {
        assert!(
            repo().join(needed).exists(),
            "{needed} missing: run scripts/bench catch-up"
        );
    }
    let (held, packets) = history_memory();
    let mut out = String::from("### The history's memory\n\n");
    out.push_str(&format!(
        "| events | held | of which packets | per event, beyond its packet |\n| --- | --- | --- | --- |\n| {EVENTS} | {:.1} MiB | {:.1} MiB | {} bytes |\n",
        held as f64 / 1048576.0,
        packets as f64 / 1048576.0,
        (held - packets) / EVENTS,
    ));

    let dir = tempfile::tempdir().unwrap();
    let store_port = free_port();
    let _store = start_store(store_port, dir.path());
    let store_uri = format!("mongodb://127.0.0.1:{store_port}");
    let mut runs = Vec::new();
    for i in 0..RUNS {
        let r = run(&store_uri, &format!("catch_up_bench_{i}")).await;
        eprintln!(
            "run {}: live {:.0}/s, from the history {:.0}/s, from the collections {:.0}/s, RSS +{} KiB",
            i + 1,
            r.live,
            r.from_history,
            r.from_collections,
            r.rss_kib
        );
        runs.push(r);
    }
    let live = median(runs.iter().map(|r| r.live).collect());
    let history = median(runs.iter().map(|r| r.from_history).collect());
    let collections = median(runs.iter().map(|r| r.from_collections).collect());
    let rss = median(runs.iter().map(|r| r.rss_kib as f64).collect());
    out.push_str(&format!(
        "\n### Replay rate\n\nMedians of {RUNS} runs; one subscriber of `entries` each.\n\n| delivery | events/s | ratio to live |\n| --- | --- | --- |\n| live, as {EVENTS} entries are written | {live:.0} | 1 |\n| replay from the history ({EVENTS} events) | {history:.0} | {:.1} |\n| replay from the collections ({BEFORE_START} documents) | {collections:.0} | {:.1} |\n\nThe bridge's resident memory after the {EVENTS} events, less before: {:.1} MiB.\n",
        history / live,
        collections / live,
        rss / 1024.0,
    ));
    println!("{out}");
}
