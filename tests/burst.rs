//! A burst of writes with the default settings: the bridge paces itself to its
//! subscribers (backpressure to the change stream), every healthy subscriber gets every
//! event once and in order, and only a client that stops reading is cut.

mod support;

use std::time::Duration;

use mongodb::bson::{Document, doc};
use support::bridge::{Setup, http_get};
use support::data::now_ms;
use support::prometheus::{self, value};
use support::ws::{WsSubscriber, identifier_of};
use tokio::task::JoinSet;

const SUBSCRIBERS: usize = 200;
const BURST: usize = 1_000;
/// Makes each event about 1 KB: the burst is 1 MB per subscriber.
const PADDING: usize = 900;
/// Device status for the paused client: more than its connection's buffers take.
const DEVICESTATUS: usize = 60;
const DEVICESTATUS_BYTES: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_every_subscriber_once_in_order_and_only_a_paused_one_is_cut() {
    let s = Setup::start("burst", &[]).await;
    let port = s.bridge.port;
    let token = s.reader.token.clone();
    let mut readers = JoinSet::new();
    for _ in 0..SUBSCRIBERS {
        let mut subscriber = WsSubscriber::connect(port, &token, &["entries"]).await.unwrap();
        readers.spawn(async move {
            let mut seen = Vec::with_capacity(BURST + 1);
            while let Some(packet) = subscriber.next_event().await {
                let identifier = identifier_of(&packet).unwrap_or("?").to_string();
                let done = identifier == "sentinel";
                seen.push(identifier);
                if done {
                    break;
                }
            }
            seen
        });
    }
    // Subscribed, then never reads again. It also follows device status, whose large
    // documents fill its connection's buffers (the kernel's hold megabytes) before the
    // burst comes.
    let mut paused =
        WsSubscriber::connect_with_receive_buffer(port, &token, &["devicestatus", "entries"], 4096)
            .await
            .unwrap();
    let now = now_ms();
    let large = "x".repeat(DEVICESTATUS_BYTES);
    let statuses: Vec<Document> = (0..DEVICESTATUS)
        .map(|i| doc! { "identifier": format!("d{i}"), "srvModified": now, "srvCreated": now, "padding": &large })
        .collect();
    s.db.collection::<Document>("devicestatus")
        .insert_many(statuses)
        .await
        .unwrap();

    // One insert_many, as an uploader's backlog after a dead zone, APIv3-shaped.
    let padding = "x".repeat(PADDING);
    let expected: Vec<String> = (0..BURST)
        .map(|i| format!("b{i}"))
        .chain(["sentinel".to_string()])
        .collect();
    let documents: Vec<Document> = expected
        .iter()
        .map(|identifier| {
            doc! { "identifier": identifier, "type": "sgv", "sgv": 120, "date": now,
            "srvModified": now, "srvCreated": now, "padding": &padding }
        })
        .collect();
    s.db.collection::<Document>("entries")
        .insert_many(documents)
        .await
        .unwrap();

    let received = tokio::time::timeout(Duration::from_secs(120), readers.join_all())
        .await
        .expect("every subscriber got the whole burst");
    assert_eq!(received.len(), SUBSCRIBERS);
    for (i, seen) in received.iter().enumerate() {
        // Once each, in order, and no subscriber was disconnected before the sentinel.
        assert!(
            seen == &expected,
            "subscriber {i} got {} events: {:?}…",
            seen.len(),
            &seen[..seen.len().min(5)]
        );
    }

    // The paused client was cut: reading again, it finds what its buffers held, then the
    // end of its connection.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        let mut events = 0;
        while paused.next_event().await.is_some() {
            events += 1;
        }
        events
    })
    .await
    .expect("the paused client's connection was closed");
    assert!(
        drained < DEVICESTATUS + BURST,
        "the paused client got {drained} events"
    );

    let samples = prometheus::parse(&http_get(port, "/metrics").await.unwrap().1).unwrap();
    assert_eq!(
        value(&samples, "nsbridge_slow_client_disconnects_total", &[]),
        1.0
    );
    // Counted when queued to a socket: the paused client's queue held more than it read.
    let delivered = value(
        &samples,
        "nsbridge_messages_delivered_total",
        &[("collection", "entries")],
    ) + value(
        &samples,
        "nsbridge_messages_delivered_total",
        &[("collection", "devicestatus")],
    );
    assert!(
        delivered >= ((BURST + 1) * SUBSCRIBERS + drained) as f64,
        "{delivered}"
    );
    let cut: Vec<_> = s
        .bridge
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("client cannot keep up"))
        })
        .collect();
    assert_eq!(cut.len(), 1, "{cut:#?}");
}
