//! A raw Engine.IO 4 WebSocket subscriber of `/storage`, for many clients in one process
//! (the load tests and the benchmark): cheaper than a Socket.IO client library, and it
//! sees the frames exactly as they arrive.

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct WsSubscriber {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsSubscriber {
    /// Connects to `/storage` on 127.0.0.1:`port` and subscribes; the subscribe's ack
    /// must be a success.
    pub async fn connect(port: u16, token: &str, collections: &[&str]) -> Result<WsSubscriber, String> {
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        WsSubscriber::subscribe(ws, token, collections, "")
            .await
            .map(|(s, _)| s)
    }

    /// As [`WsSubscriber::connect`], subscribing with `since`; also returns the ack.
    pub async fn connect_since(
        port: u16,
        token: &str,
        collections: &[&str],
        since: i64,
    ) -> Result<(WsSubscriber, String), String> {
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        WsSubscriber::subscribe(ws, token, collections, &format!(r#","since":{since}"#)).await
    }

    /// Connects to `/storage` on 127.0.0.1:`port` with `host` as its Host header (the site
    /// it is for) and subscribes; `Err` carries the refusal (the ack, or the HTTP answer).
    pub async fn connect_host(
        port: u16,
        host: &str,
        token: &str,
        collections: &[&str],
    ) -> Result<(WsSubscriber, String), String> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        request
            .headers_mut()
            .insert("host", host.parse().map_err(|_| format!("bad host {host}"))?);
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(response) => format!(
                    "HTTP {}: {}",
                    response.status().as_u16(),
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                ),
                e => format!("connect: {e}"),
            })?;
        WsSubscriber::subscribe(ws, token, collections, "").await
    }

    /// Subscribes with `extra` fields in the payload (`,"key":value`).
    async fn subscribe(
        mut ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        token: &str,
        collections: &[&str],
        extra: &str,
    ) -> Result<(WsSubscriber, String), String> {
        let send = |text: String| Message::text(text);
        ws.send(send("40/storage,".into()))
            .await
            .map_err(|e| e.to_string())?;
        let collections = serde_json::to_string(collections).unwrap();
        loop {
            let Some(Ok(message)) = ws.next().await else {
                return Err("closed before the subscribe's ack".into());
            };
            let Message::Text(text) = message else { continue };
            let text = text.as_str();
            if text == "2" {
                ws.send(send("3".into())).await.map_err(|e| e.to_string())?;
            } else if text.starts_with("40/storage,") {
                let subscribe = format!(
                    r#"42/storage,0["subscribe",{{"accessToken":"{token}","collections":{collections}{extra}}}]"#
                );
                ws.send(send(subscribe)).await.map_err(|e| e.to_string())?;
            } else if let Some(ack) = text.strip_prefix("43/storage,0") {
                return if ack.contains(r#""success":true"#) {
                    Ok((WsSubscriber { ws }, ack.to_string()))
                } else {
                    Err(ack.to_string())
                };
            }
        }
    }

    /// The next event's Socket.IO packet (`42/storage,["create",{...}]`), answering
    /// pings on the way; `None` once the connection ends.
    pub async fn next_event(&mut self) -> Option<String> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(text)) if text.as_str() == "2" => {
                    self.ws.send(Message::text("3")).await.ok()?;
                }
                Ok(Message::Text(text)) if text.as_str().starts_with("42/storage,") => {
                    return Some(text.as_str().to_string());
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// The first `"identifier":"..."` of an event packet, found without parsing the JSON.
pub fn identifier_of(packet: &str) -> Option<&str> {
    let start = packet.find(r#""identifier":""#)? + 14;
    let end = start + packet[start..].find('"')?;
    Some(&packet[start..end])
}

impl WsSubscriber {
    /// As [`WsSubscriber::connect`], with a receive buffer of `bytes` on the client's
    /// socket: a client that stops reading then blocks the server's writes soon.
    pub async fn connect_with_receive_buffer(
        port: u16,
        token: &str,
        collections: &[&str],
        bytes: u32,
    ) -> Result<WsSubscriber, String> {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket.set_recv_buffer_size(bytes).map_err(|e| e.to_string())?;
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .map_err(|e| e.to_string())?;
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        WsSubscriber::subscribe(ws, token, collections, "")
            .await
            .map(|(s, _)| s)
    }
}
