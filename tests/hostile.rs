//! The bridge as an attacker without a token meets it: bodies that used to stop it,
//! connections that send nothing or half a request, and more of them than it has open
//! files, against the real binary on real sockets.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::bridge::{Setup, TestBridge, add_subject, http_get};
use support::data::{identifiers, is_sentinel, write_entries};
use support::http::http_raw;
use support::prometheus::{self, value};
use support::puppet::{MATRIX, Puppet};
use support::store::TestStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The body that spun engineioxide-core 0.2.3's Engine.IO 3 decoder for ever: a declared
/// UTF-16 length of 1 that ends inside the surrogate pair of 😀, then more bytes.
const SPIN_BODY: &str = "1:\u{1F600}x";

/// CPU time (user + system) the process has used, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// Opens an Engine.IO polling session without credentials and returns its id.
async fn open_session(port: u16, eio: u8) -> String {
    let (status, body) = http_get(port, &format!("/socket.io/?EIO={eio}&transport=polling"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let start = body.find(r#""sid":""#).expect("an open packet") + 7;
    body[start..start + body[start..].find('"').unwrap()].to_string()
}

fn post_head(sid: &str, framing: &str) -> String {
    format!(
        "POST /socket.io/?EIO=3&transport=polling&sid={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Connection: close\r\nContent-Type: text/plain;charset=UTF-8\r\n{framing}\r\n"
    )
}

/// POSTs `body` to the session, with a Content-Length or chunked in `chunks` pieces.
async fn post_body(port: u16, sid: &str, body: &str, chunked: bool) -> std::io::Result<(u16, String)> {
    if !chunked {
        let head = post_head(sid, &format!("Content-Length: {}\r\n", body.len()));
        return http_raw(port, &[head.as_bytes(), body.as_bytes()]).await;
    }
    let head = post_head(sid, "Transfer-Encoding: chunked\r\n");
    // The character and what follows it in chunks of their own: the decoder meets the
    // straddle with the rest of the body still to come.
    let cut = body.find('\u{1F600}').map_or(body.len(), |i| i + 4);
    let chunk = |part: &str| format!("{:x}\r\n{part}\r\n", part.len()).into_bytes();
    let parts = [
        head.into_bytes(),
        chunk(&body[..cut]),
        chunk(&body[cut..]),
        b"0\r\n\r\n".to_vec(),
    ];
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    http_raw(port, &parts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_bodies_are_refused_and_the_bridge_keeps_serving() {
    let s = Setup::start("hostile_spin", &[]).await;
    let port = s.bridge.port;
    for chunked in [false, true] {
        for body in [SPIN_BODY, "2:4\u{1D54A}2:40", "1:\u{1F600}1:\u{1F600}1:2"] {
            let sid = open_session(port, 3).await;
            let answer = tokio::time::timeout(Duration::from_secs(5), post_body(port, &sid, body, chunked))
                .await
                .unwrap_or_else(|_| panic!("no answer to {body:?} (chunked: {chunked}): the decoder hangs"))
                .unwrap();
            assert_eq!(answer.0, 400, "{body:?} (chunked: {chunked}): {answer:?}");
            // The session ended with the malformed payload.
            let (status, text) = http_get(port, &format!("/socket.io/?EIO=3&transport=polling&sid={sid}"))
                .await
                .unwrap();
            assert_eq!(status, 400, "{text}");
            assert!(text.contains("Session ID unknown"), "{text}");
        }
    }
    // More at once than the runtime has workers: each would have pinned one.
    let mut attacks = JoinSet::new();
    for i in 0..6 {
        let sid = open_session(port, 3).await;
        attacks.spawn(async move { post_body(port, &sid, SPIN_BODY, i % 2 == 1).await });
    }
    let answers = tokio::time::timeout(Duration::from_secs(10), attacks.join_all())
        .await
        .expect("every spin body answered");
    assert!(answers.iter().all(|a| matches!(a, Ok((400, _)))), "{answers:?}");

    // Nothing left running: an idle bridge uses next to no CPU.
    let before = cpu_time(s.bridge.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time(s.bridge.pid()) - before;
    assert!(
        used < Duration::from_millis(300),
        "the bridge used {used:?} of CPU in 1 s while idle"
    );
    assert_eq!(
        http_get(port, "/healthz").await.unwrap(),
        (200, "ok\n".to_string())
    );

    // Subscribers are served as before.
    let mut puppet = Puppet::start().await;
    puppet.connect("after", MATRIX[0], &s.bridge.url()).await;
    puppet.subscribe_ok("after", &s.reader.token, &["entries"]).await;
    write_entries(&s.db, &["e1", "sentinel"]).await;
    assert_eq!(
        identifiers(&puppet.events_until("after", is_sentinel).await),
        ["e1", "sentinel"]
    );
    let rejected = s
        .bridge
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "malformed polling payload refused; its session ended")
        .count();
    assert_eq!(
        rejected,
        12,
        "one log line per refused payload:\n{}",
        s.bridge.logs()
    );

    let mut bridge = s.bridge;
    let status = bridge.terminate(Duration::from_secs(5)).await;
    assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}");
}

/// Reads until the peer closes; returns how long that took.
async fn closed_after(mut stream: TcpStream, started: Instant) -> Duration {
    let mut sink = [0u8; 1024];
    loop {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_sent_idle_and_trickling_connections_are_closed_in_time() {
    let s = Setup::start(
        "hostile_idle",
        &[
            ("NSBRIDGE_CONNECTIONS__HEADER_READ_TIMEOUT_SECS", "2"),
            ("NSBRIDGE_CONNECTIONS__KEEP_ALIVE_TIMEOUT_SECS", "2"),
            ("NSBRIDGE_CONNECTIONS__REQUEST_BODY_TIMEOUT_SECS", "2"),
        ],
    )
    .await;
    let port = s.bridge.port;
    // Subscribers over long polling and over a WebSocket, through the whole flood: the
    // timeouts are not for them.
    let mut puppet = Puppet::start().await;
    let polling_only = json!({"transports": ["polling"]});
    puppet
        .open("poller", MATRIX[2], &s.bridge.url(), &["/storage"], polling_only)
        .await;
    puppet.expect_connected("poller", "/storage").await;
    puppet.connect("ws", MATRIX[3], &s.bridge.url()).await;
    for id in ["poller", "ws"] {
        puppet.subscribe_ok(id, &s.reader.token, &["entries"]).await;
    }
    let sessions: Vec<String> = {
        let mut sessions = Vec::new();
        for _ in 0..20 {
            sessions.push(open_session(port, 4).await);
        }
        sessions
    };
    let started = Instant::now();
    let mut closed = JoinSet::new();
    for i in 0..650 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        match i {
            // Silent.
            0..500 => {}
            // Half a request line, or a head without its end.
            500..600 => {
                let half: &[u8] = if i % 2 == 0 {
                    b"GET /socket.io/?EIO=4&tr"
                } else {
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                };
                stream.write_all(half).await.unwrap();
            }
            // One request answered, then kept alive and silent.
            _ => {
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                let mut response = Vec::new();
                while !response.ends_with(b"ok\n") {
                    let mut buf = [0u8; 256];
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed before answering");
                    response.extend_from_slice(&buf[..n]);
                }
            }
        }
        closed.spawn(closed_after(stream, started));
    }
    // Bodies that trickle: 10 bytes of the 100 announced.
    let mut trickles = JoinSet::new();
    for sid in &sessions {
        let head = format!(
            "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\
             Content-Type: text/plain;charset=UTF-8\r\nContent-Length: 100\r\n\r\n4hello"
        );
        trickles.spawn(async move {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response).await;
            (started.elapsed(), String::from_utf8_lossy(&response).into_owned())
        });
    }
    // The bridge answers throughout.
    let watch = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        while started.elapsed() < Duration::from_secs(4) {
            let asked = Instant::now();
            let answer = http_get(port, "/healthz").await.unwrap();
            assert_eq!(answer, (200, "ok\n".to_string()));
            slowest = slowest.max(asked.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slowest
    });

    let closed = tokio::time::timeout(Duration::from_secs(15), closed.join_all())
        .await
        .expect("every idle connection closed");
    let latest = closed.iter().max().unwrap();
    // 2 s, the reaper's 500 ms tick, and a loaded machine's slack.
    assert!(
        *latest < Duration::from_secs(5),
        "the last idle connection closed after {latest:?}"
    );
    let trickles = tokio::time::timeout(Duration::from_secs(15), trickles.join_all())
        .await
        .expect("every trickling body answered");
    for (after, response) in &trickles {
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        assert!(*after < Duration::from_secs(5), "answered after {after:?}");
    }
    let slowest = watch.await.unwrap();
    assert!(slowest < Duration::from_secs(1), "/healthz took {slowest:?}");

    // Twice the timeouts later, the subscribers are still there and served.
    write_entries(&s.db, &["e1", "sentinel"]).await;
    for id in ["poller", "ws"] {
        assert_eq!(
            identifiers(&puppet.events_until(id, is_sentinel).await),
            ["e1", "sentinel"],
            "{id}"
        );
    }
    assert_eq!(puppet.request("transport", "poller").await["name"], "polling");
    let rest = puppet.drain(Duration::from_millis(200)).await;
    assert!(rest.iter().all(|r| r["type"] != "disconnect"), "{rest:#?}");

    let samples = prometheus::parse(&http_get(port, "/metrics").await.unwrap().1).unwrap();
    let closed_for = |reason| {
        value(
            &samples,
            "nsbridge_connections_closed_total",
            &[("reason", reason)],
        )
    };
    assert!(closed_for("header_timeout") >= 600.0, "{samples:?}");
    assert!(closed_for("keep_alive_timeout") >= 50.0, "{samples:?}");
    assert_eq!(closed_for("body_timeout"), 20.0);
    assert_eq!(closed_for("evicted"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_subscribes_while_1100_idle_connections_are_held_under_1024_open_files() {
    // This process holds the 1,100 connections and needs the descriptors for them.
    rlimit::increase_nofile_limit(8192).unwrap();
    let store = TestStore::start().await;
    let database = store.database("hostile_files");
    let db = store.client().await.database(&database);
    let reader = add_subject(&db, "Follower", &["readable"]).await;
    // Long timeouts: what lets the clients in must be the limit's eviction, not the reaper.
    let bridge = TestBridge::start_with_open_files(
        &store,
        &database,
        &[("NSBRIDGE_CONNECTIONS__HEADER_READ_TIMEOUT_SECS", "120")],
        1024,
    )
    .await;
    bridge.ready().await;
    let listening = bridge
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "nsbridge listening")
        .unwrap();
    assert_eq!(listening["max_connections"], 1024 - 128, "{listening}");

    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(("127.0.0.1", bridge.port)).await.unwrap());
    }
    // A moment for the bridge to accept them all.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut puppet = Puppet::start().await;
    for (id, kind) in [("polling-v4", MATRIX[2]), ("ws-v2", MATRIX[1])] {
        puppet.connect(id, kind, &bridge.url()).await;
        puppet.subscribe_ok(id, &reader.token, &["entries"]).await;
    }
    puppet.wait_for_websocket("polling-v4").await;
    write_entries(&db, &["e1", "sentinel"]).await;
    for id in ["polling-v4", "ws-v2"] {
        assert_eq!(
            identifiers(&puppet.events_until(id, is_sentinel).await),
            ["e1", "sentinel"],
            "{id}"
        );
    }
    assert_eq!(http_get(bridge.port, "/healthz").await.unwrap().0, 200);

    // The idle connections were held, not timed out: all but those that made room.
    let mut held = 0;
    let mut probe = [0u8; 1];
    for stream in &idle {
        if matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            held += 1;
        }
    }
    assert!(
        (800..=896).contains(&held),
        "{held} of 1100 idle connections held"
    );
    let samples = prometheus::parse(&http_get(bridge.port, "/metrics").await.unwrap().1).unwrap();
    assert_eq!(value(&samples, "nsbridge_connection_limit", &[]), 896.0);
    assert!(
        value(
            &samples,
            "nsbridge_connections_closed_total",
            &[("reason", "evicted")]
        ) >= 204.0,
        "{samples:?}"
    );
    let reached = bridge
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("connection limit reached")
        })
        .count();
    assert_eq!(reached, 1, "logged once:\n{}", bridge.logs());
    assert!(
        !bridge.logs().contains("Too many open files"),
        "{}",
        bridge.logs()
    );
}
