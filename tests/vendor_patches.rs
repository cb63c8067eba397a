//! The changes made to the vendored crates (vendor/README.md), tested where the crates'
//! own test suites cannot run here: through their public API, or by compiling a
//! self-contained module of theirs, with its unit tests, into this test binary.

use socketioxide_core::packet::PacketData;
use socketioxide_core::parser::{Parse, ParseConfig, ParserState};
use socketioxide_core::{Str, Value};
use socketioxide_parser_common::CommonParser;

/// engineioxide's session buffer; its own unit tests run as part of this binary.
#[path = "../vendor/engineioxide/src/queue.rs"]
#[allow(dead_code)]
mod engineioxide_queue;

fn decode(packet: &str) -> socketioxide_core::packet::Packet {
    CommonParser
        .decode_str(
            &ParseConfig::default(),
            &ParserState::default(),
            Str::from(packet.to_string()),
        )
        .unwrap()
}

#[test]
fn a_namespace_query_in_a_connect_packet_is_not_part_of_the_namespace() {
    // socket.io-client 2.x, `io("/storage?client=follower")` or the `query` option.
    for packet in [
        "0/storage?client=follower,",
        "0/storage?client=follower",
        "0/storage?a=1&b=?x,",
    ] {
        let decoded = decode(packet);
        assert_eq!(decoded.ns, "/storage", "{packet}");
        assert!(matches!(decoded.inner, PacketData::Connect(None)), "{packet}");
    }
    // With a payload after the comma, and without a query at all.
    let decoded = decode(r#"0/storage?x=1,{"token":"abc"}"#);
    assert_eq!(decoded.ns, "/storage");
    assert!(
        matches!(&decoded.inner, PacketData::Connect(Some(Value::Str(s, None))) if s.as_str() == r#"{"token":"abc"}"#),
        "{:?}",
        decoded.inner
    );
    assert_eq!(decode("0/storage,").ns, "/storage");
    assert_eq!(decode("0").ns, "/");
}

/// A raw Engine.IO 4 WebSocket client of the root namespace, connected.
async fn root_client(
    port: u16,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use futures::{SinkExt, StreamExt};
    let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("40")).await.unwrap();
    // The session's first ping comes at once; the next one not before the test ends.
    let (mut connected, mut pinged) = (false, false);
    while !(connected && pinged) {
        let message = ws.next().await.expect("the connection is open").unwrap();
        let text = message.to_text().unwrap();
        if text.starts_with("40{") {
            connected = true;
        } else if text == "2" {
            pinged = true;
            ws.send(Message::text("3")).await.unwrap();
        }
    }
    ws
}

/// The next text frame.
async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> String {
    use futures::StreamExt;
    let message = ws.next().await.expect("the connection is open").unwrap();
    message.to_text().unwrap().to_string()
}

/// The next text frame, `None` once the connection ends (its closing packets skipped).
async fn next_text_or_end(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> Option<String> {
    use futures::StreamExt;
    loop {
        match ws.next().await? {
            Ok(tokio_tungstenite::tungstenite::Message::Text(text)) if text.as_str() != "1" => {
                return Some(text.as_str().to_string());
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// socketioxide's `EmitBatch` (vendor/README.md): what it queues is written only once the
/// batch wakes the writers, by `wake` or by being dropped.
#[tokio::test]
async fn an_emit_batch_queues_to_every_socket_and_wakes_their_writers_at_the_end() {
    use socketioxide::extract::SocketRef;
    use socketioxide::socket::EmitBatch;
    use std::time::Duration;

    let (layer, io) = socketioxide::SocketIo::builder()
        .ping_interval(Duration::from_secs(120))
        .ping_timeout(Duration::from_secs(120))
        .build_layer();
    let (found, mut connected) = tokio::sync::mpsc::unbounded_channel();
    io.ns("/", async move |socket: SocketRef| {
        let _ = found.send(socket);
    });
    let app = axum::Router::new().fallback(|| async { "" }).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut clients = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        clients.push(root_client(port).await);
        sockets.push(connected.recv().await.unwrap());
    }
    let packet = || Value::Str(Str::from(r#"2["e",1]"#), None);
    // Writers still busy with the handshake's packets would take what is queued without
    // being woken: let them go idle first.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut batch = EmitBatch::with_capacity(sockets.len());
    EmitBatch::prefetch(sockets.iter().map(|s| &**s));
    for socket in &sockets {
        batch.emit(socket, packet()).unwrap();
    }
    for (socket, client) in sockets.iter().zip(&mut clients) {
        assert_eq!(socket.buffered(), 1);
        let early = tokio::time::timeout(Duration::from_millis(200), next_text(client)).await;
        assert!(early.is_err(), "written before the wake-up: {early:?}");
    }
    batch.wake();
    for client in &mut clients {
        assert_eq!(next_text(client).await, r#"42["e",1]"#);
    }

    let mut batch = EmitBatch::default();
    batch.emit(&sockets[1], packet()).unwrap();
    drop(batch);
    assert_eq!(next_text(&mut clients[1]).await, r#"42["e",1]"#);

    // A socket whose connection is gone is refused.
    sockets[2].close_connection();
    assert!(next_text_or_end(&mut clients[2]).await.is_none());
    let mut batch = EmitBatch::default();
    assert!(matches!(
        batch.emit(&sockets[2], packet()),
        Err(socketioxide::SocketError::Closed)
    ));
}
