//! The exact bytes on the wire, over Engine.IO 3 and 4 long-polling, compared with the
//! frames observed from Nightscout (spec §1–§3).

mod support;

use mongodb::bson::{Document, doc};
use support::bridge::Setup;
use support::http::http_request;

/// A long-polling Engine.IO session, speaking raw frames.
struct Polling {
    port: u16,
    eio: u8,
    sid: String,
}

impl Polling {
    /// Opens a session; returns it and the handshake packet.
    async fn open(port: u16, eio: u8) -> (Polling, String) {
        let (status, body) = http_request(
            port,
            "GET",
            &format!("/socket.io/?EIO={eio}&transport=polling&t=1"),
            "",
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let packets = split(eio, &body);
        let open = packets[0].clone();
        let handshake: serde_json::Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
        let sid = handshake["sid"].as_str().unwrap().to_string();
        (Polling { port, eio, sid }, open)
    }

    async fn send(&self, packet: &str) {
        let body = match self.eio {
            3 => format!("{}:{packet}", packet.encode_utf16().count()),
            _ => packet.to_string(),
        };
        let path = format!("/socket.io/?EIO={}&transport=polling&sid={}", self.eio, self.sid);
        let (status, reply) = http_request(self.port, "POST", &path, &body).await.unwrap();
        assert_eq!((status, reply.as_str()), (200, "ok"));
    }

    /// The packets of as many polls as it takes to bring `count` of them.
    async fn poll_count(&self, count: usize) -> Vec<String> {
        let mut packets = Vec::new();
        while packets.len() < count {
            packets.extend(self.poll().await);
        }
        packets
    }

    /// The packets of the next poll that brings any besides Engine.IO pings (answered;
    /// socketioxide pings Engine.IO 4 clients once right after the handshake).
    async fn poll(&self) -> Vec<String> {
        let path = format!("/socket.io/?EIO={}&transport=polling&sid={}", self.eio, self.sid);
        loop {
            let (status, body) = http_request(self.port, "GET", &path, "").await.unwrap();
            assert_eq!(status, 200, "{body}");
            let (pings, packets): (Vec<String>, Vec<String>) = split(self.eio, &body)
                .into_iter()
                .partition(|p| p == "2" && self.eio == 4);
            if !pings.is_empty() {
                self.send("3").await;
            }
            if !packets.is_empty() {
                return packets;
            }
        }
    }
}

/// Engine.IO 3 payloads are `<length>:<packet>` repeated; Engine.IO 4 separates with 0x1e.
fn split(eio: u8, payload: &str) -> Vec<String> {
    if eio == 4 {
        return payload.split('\x1e').map(str::to_string).collect();
    }
    let mut packets = Vec::new();
    let mut rest = payload;
    while let Some((len, after)) = rest.split_once(':') {
        let len: usize = len.parse().unwrap();
        let end = after.char_indices().nth(len).map_or(after.len(), |(i, _)| i);
        packets.push(after[..end].to_string());
        rest = &after[end..];
    }
    packets
}

fn handshake_values(open: &str) -> serde_json::Value {
    let mut handshake: serde_json::Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    handshake["sid"] = "SID".into();
    handshake
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_io_3_and_4_frames() {
    let Setup {
        store: _store,
        db,
        bridge,
        reader,
        ..
    } = Setup::start("frames", &[]).await;

    // Engine.IO 3, as socket.io-client 2.x speaks it.
    let (v3, open) = Polling::open(bridge.port, 3).await;
    assert_eq!(
        handshake_values(&open),
        serde_json::json!({"sid": "SID", "upgrades": ["websocket"], "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 1000000})
    );
    v3.send("40/storage").await;
    // The root namespace's CONNECT is queued at the handshake, /storage's on our request:
    // one poll may bring both or only the first.
    assert_eq!(v3.poll_count(2).await, ["40", "40/storage,"]);
    v3.send(&format!(
        r#"42/storage,0["subscribe",{{"accessToken":"{}","collections":["entries"]}}]"#,
        reader.token
    ))
    .await;
    assert_eq!(
        v3.poll().await,
        [r#"43/storage,0[{"success":true,"collections":["entries"]}]"#]
    );

    // Engine.IO 4, as socket.io-client 3.x/4.x and AndroidAPS speak it.
    let (v4, open) = Polling::open(bridge.port, 4).await;
    assert_eq!(
        handshake_values(&open),
        serde_json::json!({"sid": "SID", "upgrades": ["websocket"], "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 1000000})
    );
    v4.send("40/storage,").await;
    let connect = v4.poll().await;
    assert_eq!(connect.len(), 1);
    let payload: serde_json::Value =
        serde_json::from_str(connect[0].strip_prefix("40/storage,").unwrap()).unwrap();
    assert!(payload["sid"].is_string(), "{connect:?}");
    v4.send(&format!(
        r#"42/storage,0["subscribe",{{"accessToken":"{}","collections":["treatments","foods","treatments"]}}]"#,
        reader.token
    ))
    .await;
    assert_eq!(
        v4.poll().await,
        [r#"43/storage,0[{"success":true,"collections":["treatments","treatments"]}]"#]
    );
    v4.send(r#"42/storage,1["subscribe",{"accessToken":"nobody-0123456789abcdef"}]"#)
        .await;
    assert_eq!(
        v4.poll().await,
        [r#"43/storage,1[{"success":false,"message":"Missing or bad accessToken"}]"#]
    );

    // The observed create frame, byte for byte (field order included).
    db.collection::<Document>("treatments")
        .insert_one(doc! {
            "identifier": "abc", "date": 1_700_000_000_000_i64, "utcOffset": 0, "app": "AAPS",
            "eventType": "Note", "created_at": "2023-11-14T22:13:20.000Z",
            "srvModified": 1_700_000_001_000_i64, "srvCreated": 1_700_000_001_000_i64, "subject": "apiAll",
        })
        .await
        .unwrap();
    assert_eq!(
        v4.poll().await,
        [
            r#"42/storage,["create",{"colName":"treatments","doc":{"identifier":"abc","date":1700000000000,"utcOffset":0,"app":"AAPS","eventType":"Note","created_at":"2023-11-14T22:13:20.000Z","srvModified":1700000001000,"srvCreated":1700000001000,"subject":"apiAll"}}]"#
        ]
    );
    db.collection::<Document>("entries")
        .insert_one(doc! { "identifier": "e", "sgv": 100, "srvModified": 1_i64, "srvCreated": 1_i64 })
        .await
        .unwrap();
    assert_eq!(
        v3.poll().await,
        [
            r#"42/storage,["create",{"colName":"entries","doc":{"identifier":"e","sgv":100,"srvModified":1,"srvCreated":1}}]"#
        ]
    );
}
