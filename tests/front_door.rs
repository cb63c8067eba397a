//! The bridge as Nightscout's origin (`NSBRIDGE_UPSTREAM`): `/storage` served by the bridge,
//! Nightscout's other namespaces relayed, every other request proxied; against a
//! Nightscout-shaped socket.io 4.5.4 server (`tests/compat/upstream.js`), with the real
//! Node clients.

mod support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use serde_json::{Value, json};
use support::bridge::{Setup, http_get};
use support::data::{identifiers, is_sentinel, write_entries};
use support::http::http_exchange;
use support::puppet::{ClientKind, MATRIX, Puppet};
use support::upstream::TestUpstream;

async fn front_door(name: &str) -> (TestUpstream, Setup) {
    let upstream = TestUpstream::start().await;
    let setup = Setup::start(name, &[("NSBRIDGE_UPSTREAM", &upstream.url())]).await;
    (upstream, setup)
}

fn id_of(kind: ClientKind) -> String {
    format!(
        "{}-{}",
        kind.client,
        if kind.websocket_only { "ws" } else { "default" }
    )
}

/// The next event `name` on namespace `ns` of client `id`: its arguments.
async fn event(puppet: &mut Puppet, id: &str, ns: &str, name: &str) -> Vec<Value> {
    let report = puppet
        .expect(|r| r["id"] == id && r["ns"] == ns && r["type"] == "event" && r["name"] == name)
        .await;
    report["args"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_androidaps_shaped_session_gets_storage_from_the_bridge_and_alarms_from_nightscout() {
    let (upstream, s) = front_door("front_aaps").await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    // One manager, /storage and /alarm on one connection, as AndroidAPS opens them.
    let kinds = [MATRIX[2], MATRIX[3]];
    for kind in kinds {
        let id = id_of(kind);
        puppet
            .open(&id, kind, &url, &["/storage", "/alarm"], json!({}))
            .await;
        puppet.expect_connected(&id, "/storage").await;
        puppet.expect_connected(&id, "/alarm").await;
        puppet.subscribe_ok(&id, &s.reader.token, &["entries"]).await;
        let ack = puppet
            .emit_with_ack_in(
                &id,
                "/alarm",
                "subscribe",
                json!([{"accessToken": s.reader.token}]),
            )
            .await;
        assert_eq!(ack, vec![json!({"success": true, "read": true})], "{id}");
        assert_eq!(
            event(&mut puppet, &id, "/alarm", "alarm").await,
            vec![json!({"level": 1, "title": "Warning HIGH", "message": "BG Now: 250"})],
            "{id}"
        );
    }
    write_entries(&s.db, &["e1", "sentinel"]).await;
    assert_eq!(upstream.emit("/alarm", "alarm", json!([{"level": 2}])).await, 2);
    for kind in kinds {
        let id = id_of(kind);
        assert_eq!(
            identifiers(&puppet.events_until(&id, is_sentinel).await),
            ["e1", "sentinel"]
        );
        assert_eq!(
            event(&mut puppet, &id, "/alarm", "alarm").await,
            vec![json!({"level": 2})]
        );
    }
    puppet.wait_for_websocket("v4-default").await;
    // Nightscout saw the two /alarm connections, and never its own /storage.
    let handshakes = upstream.handshakes().await;
    let namespaces: Vec<&str> = handshakes.iter().map(|h| h["ns"].as_str().unwrap()).collect();
    assert_eq!(namespaces, ["/alarm", "/alarm"], "{handshakes:#?}");
    let rest = puppet.drain(Duration::from_millis(200)).await;
    assert!(
        rest.iter()
            .all(|r| r["type"] != "disconnect" && r["type"] != "event"),
        "{rest:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_namespace_is_relayed_to_both_client_versions_with_the_handshake() {
    let (upstream, s) = front_door("front_root").await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    let kinds = [MATRIX[0], MATRIX[1], MATRIX[2], MATRIX[3]];
    for kind in kinds {
        let id = id_of(kind);
        puppet
            .open(&id, kind, &url, &["/"], json!({"query": {"token": "q-token"}}))
            .await;
        puppet.expect_connected(&id, "/").await;
        let ack = puppet
            .emit_with_ack_in(&id, "/", "authorize", json!([{"client": id}]))
            .await;
        assert_eq!(
            ack,
            vec![json!({"read": true, "write": false, "client": id})],
            "{id}"
        );
        let update = event(&mut puppet, &id, "/", "dataUpdate").await;
        assert_eq!(update[0]["sgvs"][0]["mgdl"], 123, "{id}: {update:?}");
    }
    // Each client's handshake reached Nightscout with its address, as Engine.IO 4.
    let handshakes = upstream.handshakes().await;
    assert_eq!(handshakes.len(), kinds.len(), "{handshakes:#?}");
    for handshake in &handshakes {
        assert_eq!(handshake["ns"], "/");
        assert_eq!(
            handshake["headers"]["x-forwarded-for"], "127.0.0.1",
            "{handshake}"
        );
        assert_eq!(handshake["headers"]["x-forwarded-proto"], "http", "{handshake}");
        assert_eq!(
            handshake["headers"]["host"],
            format!("127.0.0.1:{}", s.bridge.port)
        );
        assert_eq!(handshake["query"]["EIO"], "4", "{handshake}");
    }
    // The v4 clients' Manager query is the handshake's (2.x puts it in CONNECT).
    let with_token = handshakes
        .iter()
        .filter(|h| h["query"]["token"] == "q-token")
        .count();
    assert_eq!(with_token, 2, "{handshakes:#?}");

    // A browser's handshake: its cookies, user agent and query reach Nightscout.
    let url = format!(
        "ws://127.0.0.1:{}/socket.io/?EIO=4&transport=websocket&token=browser",
        s.bridge.port
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", "session=abc".parse().unwrap());
    request
        .headers_mut()
        .insert("user-agent", "Mozilla/5.0 (test)".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text("40")).await.unwrap();
    let connected = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message
                && text.as_str().starts_with("40")
            {
                return text.as_str().to_string();
            }
        }
        String::new()
    })
    .await
    .unwrap();
    assert!(connected.starts_with("40{\"sid\""), "{connected}");
    let handshakes = upstream.handshakes().await;
    let browser = handshakes.last().unwrap();
    assert_eq!(browser["headers"]["cookie"], "session=abc", "{browser}");
    assert_eq!(
        browser["headers"]["user-agent"], "Mozilla/5.0 (test)",
        "{browser}"
    );
    assert_eq!(browser["query"]["token"], "browser", "{browser}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_acks_on_two_relayed_namespaces_each_get_their_own_answer() {
    let (_upstream, s) = front_door("front_acks").await;
    let mut puppet = Puppet::start().await;
    let id = "acks";
    puppet
        .open(id, MATRIX[2], &s.bridge.url(), &["/", "/alarm"], json!({}))
        .await;
    puppet.expect_connected(id, "/").await;
    puppet.expect_connected(id, "/alarm").await;
    let mut sent = Vec::new();
    for n in 0..100u64 {
        let ns = if n % 2 == 0 { "/" } else { "/alarm" };
        // Nightscout answers after a delay that varies, so the answers come out of order.
        let args = json!([{"n": n, "delay": (n * 7) % 50}, "second", n]);
        let tag = puppet.emit_acked(id, ns, "echo", args.clone()).await;
        sent.push((tag, ns, args));
    }
    for (tag, ns, args) in sent {
        let ack = puppet.expect(|r| r["type"] == "ack" && r["tag"] == tag).await;
        assert_eq!(ack["ns"], ns);
        assert_eq!(ack["args"], args, "ack {tag}");
    }
    let rest = puppet.drain(Duration::from_millis(200)).await;
    assert!(rest.iter().all(|r| r["type"] != "ack"), "no ack twice: {rest:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_and_auth_payloads_are_relayed() {
    let (upstream, s) = front_door("front_connect").await;
    let mut puppet = Puppet::start().await;
    let url = s.bridge.url();
    puppet
        .open("private", MATRIX[3], &url, &["/private"], json!({}))
        .await;
    let refused = puppet
        .expect(|r| r["id"] == "private" && (r["type"] == "connect" || r["type"] == "connect_error"))
        .await;
    assert_eq!(refused["type"], "connect_error", "{refused}");
    assert_eq!(refused["message"], "not allowed", "{refused}");

    puppet
        .open(
            "good",
            MATRIX[3],
            &url,
            &["/auth"],
            json!({"auth": {"token": "letmein"}}),
        )
        .await;
    puppet.expect_connected("good", "/auth").await;
    let ack = puppet
        .emit_with_ack_in("good", "/auth", "echo", json!(["hi"]))
        .await;
    assert_eq!(ack, vec![json!("hi")]);
    puppet
        .open(
            "bad",
            MATRIX[3],
            &url,
            &["/auth"],
            json!({"auth": {"token": "nope"}}),
        )
        .await;
    let refused = puppet
        .expect(|r| r["id"] == "bad" && (r["type"] == "connect" || r["type"] == "connect_error"))
        .await;
    assert_eq!(refused["message"], "bad token", "{refused}");
    let auths: Vec<Value> = upstream
        .handshakes()
        .await
        .iter()
        .map(|h| h["auth"].clone())
        .collect();
    assert_eq!(auths, vec![json!({"token": "letmein"})]);
}

fn request(port: u16, head: &str) -> Vec<u8> {
    format!("{head}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_is_proxied_to_nightscout_and_the_bridge_keeps_its_own_endpoints_apart() {
    let (_upstream, s) = front_door("front_http").await;
    let port = s.bridge.port;

    // Method, path, query and headers go through; hop-by-hop ones do not; the forwarding
    // headers are the bridge's.
    let raw = format!(
        "GET /api/echo/x?count=2&a=%20b HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: s=1\r\n\
         User-Agent: AndroidAPS/3.3\r\nX-Forwarded-For: 10.9.9.9\r\nKeep-Alive: timeout=5\r\n\
         Connection: close, x-private\r\nX-Private: secret\r\napi-secret: abcdef\r\n\r\n"
    );
    let echo = http_exchange(port, raw.as_bytes()).await.unwrap();
    assert_eq!(echo.status, 200);
    let echo: Value = serde_json::from_slice(&echo.body).unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["url"], "/api/echo/x?count=2&a=%20b");
    let headers = &echo["headers"];
    assert_eq!(headers["cookie"], "s=1");
    assert_eq!(headers["user-agent"], "AndroidAPS/3.3");
    assert_eq!(headers["api-secret"], "abcdef");
    assert_eq!(
        headers["x-forwarded-for"], "127.0.0.1",
        "a client cannot forge it: {headers}"
    );
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], format!("127.0.0.1:{port}"));
    assert_eq!(headers["host"], format!("127.0.0.1:{port}"));
    for hop in ["x-private", "keep-alive"] {
        assert!(headers.get(hop).is_none(), "{hop} forwarded: {headers}");
    }

    // A 1 MB body, streamed.
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut post = format!(
        "POST /api/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(&body);
    let echo = http_exchange(port, &post).await.unwrap();
    let echo: Value = serde_json::from_slice(&echo.body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["bodyLength"], 1_000_000);
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    assert_eq!(echo["bodySha256"], expected);

    // Errors pass through as they are, headers included.
    for code in [401, 404, 500] {
        let answer = http_exchange(port, &request(port, &format!("GET /api/status/{code} HTTP/1.1")))
            .await
            .unwrap();
        assert_eq!(answer.status, code);
        assert_eq!(answer.text(), format!("status {code}"));
        assert_eq!(answer.header("x-upstream"), Some("stand-in"));
    }
    // Compressed stays compressed.
    let gzip = http_exchange(
        port,
        b"GET /api/gzip HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(&gzip.body[..2], &[0x1f, 0x8b]);
    assert_eq!(
        gzip.header("content-length"),
        Some(gzip.body.len().to_string().as_str())
    );

    // Nightscout's page, and its Socket.IO client script with its map.
    let page = http_exchange(port, &request(port, "GET / HTTP/1.1"))
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.text().contains("Nightscout stand-in"));
    for file in ["/socket.io/socket.io.js", "/socket.io/socket.io.js.map"] {
        let answer = http_exchange(port, &request(port, &format!("GET {file} HTTP/1.1")))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{file}");
        assert!(answer.text().contains("io"), "{file}");
    }
    // The bridge's own endpoints are under /nsbridge; /healthz is Nightscout's.
    assert_eq!(
        http_get(port, "/nsbridge/healthz").await.unwrap(),
        (200, "ok\n".to_string())
    );
    let (status, body) = http_get(port, "/nsbridge/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["nightscout"], "reachable");
    assert_eq!(http_get(port, "/nsbridge/metrics").await.unwrap().0, 200);
    assert!(http_get(port, "/nsbridge/").await.unwrap().1.contains("<html"));
    assert_eq!(
        http_get(port, "/healthz").await.unwrap(),
        (404, "not found".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_nightscout_goes_away_storage_stays_and_relayed_namespaces_come_back_with_it() {
    let (mut upstream, s) = front_door("front_outage").await;
    let port = s.bridge.port;
    let mut puppet = Puppet::start().await;
    let id = "aaps";
    puppet
        .open(
            id,
            MATRIX[3],
            &s.bridge.url(),
            &["/storage", "/alarm"],
            json!({"reconnection": true}),
        )
        .await;
    puppet.expect_connected(id, "/storage").await;
    puppet.expect_connected(id, "/alarm").await;

    upstream.stop().await;
    // The relayed namespace's connection ends; the client reconnects; /storage is served
    // while /alarm waits for Nightscout.
    for ns in ["/storage", "/alarm"] {
        let gone = puppet
            .expect(|r| r["id"] == id && r["ns"] == ns && r["type"] == "disconnect")
            .await;
        assert_eq!(gone["reason"], "transport close", "{gone}");
    }
    puppet.expect_connected(id, "/storage").await;
    puppet.subscribe_ok(id, &s.reader.token, &["entries"]).await;
    write_entries(&s.db, &["during", "sentinel"]).await;
    assert_eq!(
        identifiers(&puppet.events_until(id, is_sentinel).await),
        ["during", "sentinel"]
    );

    // Meanwhile HTTP gets a 502, readiness says why, and the outage is logged once.
    for _ in 0..3 {
        let answer = http_exchange(port, &request(port, "GET /api/echo HTTP/1.1"))
            .await
            .unwrap();
        assert_eq!(answer.status, 502);
        assert!(
            answer.text().contains("Nightscout is not reachable"),
            "{}",
            answer.text()
        );
    }
    let started = Instant::now();
    loop {
        let (status, body) = http_get(port, "/nsbridge/readyz").await.unwrap();
        if status == 503 {
            let ready: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(ready["reason"], "Nightscout not reachable", "{ready}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    upstream.restart().await;
    puppet.expect_connected(id, "/alarm").await;
    let ack = puppet
        .emit_with_ack_in(id, "/alarm", "subscribe", json!([{}]))
        .await;
    assert_eq!(ack, vec![json!({"success": true, "read": true})]);
    assert_eq!(event(&mut puppet, id, "/alarm", "alarm").await[0]["level"], 1);
    let answer = http_exchange(port, &request(port, "GET /api/status/200 HTTP/1.1"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    s.bridge.ready().await;
    let outages = s
        .bridge
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Nightscout not reachable"))
        })
        .count();
    assert_eq!(outages, 1, "{}", s.bridge.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nightscouts_page_loads_through_the_bridge_and_its_socket_is_relayed() {
    let (upstream, s) = front_door("front_page").await;
    let browser_dir = support::store::repo_path("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "Chromium or playwright-core missing: run scripts/test (it runs tests/browser/setup.sh)"
    );
    let artifacts = support::store::repo_path("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("front-door-page.png");
    let output = tokio::process::Command::new("node")
        .current_dir(&browser_dir)
        .arg("page_text.js")
        .args(["--url", &format!("{}/", s.bridge.url())])
        .args([
            "--expect",
            "#state=^authorized",
            "--expect",
            "#data=^sgv 123$",
            "--screenshot",
        ])
        .arg(&screenshot)
        .kill_on_drop(true)
        .output()
        .await
        .expect("starting node");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("driver printed {:?}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(report["type"], "done", "{report}\n{}", s.bridge.logs());
    assert!(screenshot.is_file());
    // The page's socket went through the bridge to Nightscout's root namespace.
    let handshakes = upstream.handshakes().await;
    let browser = handshakes
        .iter()
        .find(|h| {
            h["headers"]["user-agent"]
                .as_str()
                .is_some_and(|ua| ua.contains("Chrome"))
        })
        .unwrap_or_else(|| panic!("{handshakes:#?}"));
    assert_eq!(browser["ns"], "/");
    assert_eq!(browser["headers"]["x-forwarded-for"], "127.0.0.1");
}
