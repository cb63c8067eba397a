//! The Socket.IO namespaces other than `/storage` (Nightscout's `/`, `/alarm`, and whatever
//! it adds), relayed to Nightscout. For each client session that connects to one, the
//! bridge holds one upstream connection (Engine.IO 4 over WebSocket) multiplexing that
//! client's relayed namespaces, as the client multiplexes them, and passes on CONNECT
//! (with its auth payload) and its errors, events both ways, acks both ways (their ids
//! mapped) and disconnects both ways. Packets are relayed as text: their data is never
//! decoded.
//!
//! Engine.IO 3 clients are relayed as well: the upstream connection speaks Engine.IO 4
//! whatever the client speaks, and the Socket.IO packets are the same.
//!
//! Not relayed: binary attachments (the bridge refuses them on every namespace), and acks
//! that Nightscout would ask of the client (it asks none).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use futures::{SinkExt, StreamExt};
use serde_json::Value as Json;
use socketioxide::SocketIo;
use socketioxide::extract::{RawMessage, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use socketioxide_core::{Str, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::Upstream;
use super::forwarded::set_forwarded;
use super::packet::{self, Kind};
use crate::telemetry::metric;

/// How long opening the upstream connection, and a namespace on it, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client's CONNECT to a relayed namespace waits for Nightscout to come back.
const WAIT_FOR_NIGHTSCOUT: Duration = Duration::from_secs(600);
/// How often it tries meanwhile.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Messages from the client waiting to go upstream; a client that sends faster than
/// Nightscout reads is disconnected.
const OUTGOING: usize = 256;
/// Clients send pongs and small events: a small read buffer per upstream connection.
const UPSTREAM_READ_BUFFER: usize = 4096;
/// Headers of the client's handshake passed on to Nightscout's.
pub const FORWARDED_HANDSHAKE_HEADERS: [header::HeaderName; 6] = [
    header::COOKIE,
    header::USER_AGENT,
    header::HOST,
    header::HeaderName::from_static("x-forwarded-for"),
    header::HeaderName::from_static("x-forwarded-proto"),
    header::HeaderName::from_static("x-forwarded-host"),
];

/// Why a relayed namespace could not be connected; the client gets the message.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Refused(String),
    #[error("Nightscout is not reachable")]
    Unreachable,
}

/// The upstream connection of one client session, once one of its namespaces asked for it.
/// Kept in the extensions of the session's handshake request, so that every namespace of
/// the session finds it.
#[derive(Clone, Default)]
pub struct SessionLink(Arc<tokio::sync::Mutex<Option<Arc<Link>>>>);

/// Registers the relayed namespaces: the root one and any other but those already
/// registered (`/storage`).
pub fn register(io: &SocketIo, upstream: Arc<Upstream>) {
    let root_upstream = upstream.clone();
    let on_connect = async |_: SocketRef| {};
    io.ns(
        "/",
        on_connect.with(async move |socket: SocketRef, TryData(auth): TryData<Json>| {
            connect(&root_upstream, &socket, auth.ok()).await
        }),
    );
    let on_connect = async |_: SocketRef| {};
    let registered = io.dyn_ns(
        "/{*namespace}",
        on_connect.with(async move |socket: SocketRef, TryData(auth): TryData<Json>| {
            connect(&upstream, &socket, auth.ok()).await
        }),
    );
    if let Err(e) = registered {
        tracing::error!(error = %e, "cannot relay Nightscout's namespaces");
    }
}

/// Connects the client's namespace upstream, and registers the handlers that relay it.
pub async fn connect(
    upstream: &Arc<Upstream>,
    socket: &SocketRef,
    auth: Option<Json>,
) -> Result<(), RelayError> {
    let connected = open_namespace(upstream, socket, auth).await;
    if let Err(e) = &connected {
        tracing::info!(sid = %socket.id, namespace = socket.ns(), error = %e, "relayed namespace refused");
    }
    connected
}

async fn open_namespace(
    upstream: &Arc<Upstream>,
    socket: &SocketRef,
    auth: Option<Json>,
) -> Result<(), RelayError> {
    let ns = socket.ns().to_string();
    let Some(slot) = socket.req_parts().extensions.get::<SessionLink>().cloned() else {
        return Err(RelayError::Unreachable);
    };
    let link = {
        let mut slot = slot.0.lock().await;
        match slot.as_ref().filter(|link| !link.closed.is_cancelled()) {
            Some(link) => link.clone(),
            None => {
                let link = open_when_reachable(upstream, socket).await?;
                *slot = Some(link.clone());
                link
            }
        }
    };
    let (done_tx, done) = oneshot::channel();
    link.state.lock().unwrap().namespaces.insert(
        ns.clone(),
        Relayed {
            client: None,
            connecting: Some(done_tx),
            acks: HashMap::new(),
        },
    );
    let auth = match auth {
        Some(auth) if auth.as_object().is_some_and(|o| !o.is_empty()) => auth.to_string(),
        _ => String::new(),
    };
    if let Err(e) = link.send(&packet::encode(Kind::Connect, &ns, None, &auth)) {
        link.forget(&ns);
        return Err(e);
    }
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, done).await;
    let accepted = match answer {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(message))) => Err(RelayError::Refused(message)),
        Ok(Err(_)) | Err(_) => Err(RelayError::Unreachable),
    };
    if let Err(e) = accepted {
        link.forget(&ns);
        return Err(e);
    }
    if let Some(relayed) = link.state.lock().unwrap().namespaces.get_mut(&ns) {
        relayed.client = Some(socket.clone());
    }
    metrics::gauge!(metric::RELAYED_SOCKETS).increment(1.0);

    let to_upstream = link.clone();
    socket.on_fallback(async move |socket: SocketRef, message: RawMessage| {
        to_upstream.relay_to_upstream(&socket, message);
    });
    let on_disconnect = link.clone();
    socket.on_disconnect(async move |socket: SocketRef, reason: DisconnectReason| {
        metrics::gauge!(metric::RELAYED_SOCKETS).decrement(1.0);
        on_disconnect.client_left(socket.ns(), reason);
    });
    Ok(())
}

/// Opens the upstream connection of the client's session. While Nightscout does not
/// answer, the client's CONNECT waits (its other namespaces, `/storage` among them, are
/// served meanwhile) and completes once Nightscout is back, as if it had been slow: a
/// CONNECT error or a closed transport would make clients stop or flap.
async fn open_when_reachable(upstream: &Arc<Upstream>, socket: &SocketRef) -> Result<Arc<Link>, RelayError> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_NIGHTSCOUT;
    let mut reachable = upstream.reachable();
    loop {
        match Link::open(upstream, socket.req_parts()).await {
            Ok(link) => return Ok(link),
            Err(e) => {
                tracing::debug!(sid = %socket.id, error = %e, "cannot open the upstream connection yet")
            }
        }
        // Try again when Nightscout is seen back, or after a while.
        reachable.borrow_and_update();
        let wait = tokio::time::sleep(RETRY_INTERVAL);
        tokio::select! {
            _ = wait => {}
            _ = reachable.wait_for(|up| *up) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RelayError::Unreachable);
        }
    }
}

/// One upstream connection and the relayed namespaces on it.
pub struct Link {
    outgoing: mpsc::Sender<Message>,
    state: Mutex<LinkState>,
    closed: CancellationToken,
}

#[derive(Default)]
struct LinkState {
    namespaces: HashMap<String, Relayed>,
    next_ack: i64,
}

struct Relayed {
    /// The client's socket, once Nightscout accepted the namespace.
    client: Option<SocketRef>,
    connecting: Option<oneshot::Sender<Result<(), String>>>,
    /// Ack ids sent upstream → the client's.
    acks: HashMap<i64, i64>,
}

impl Link {
    /// Opens the upstream connection for the client session whose handshake is `handshake`.
    async fn open(upstream: &Arc<Upstream>, handshake: &Parts) -> Result<Arc<Link>, String> {
        let mut request = format!(
            "ws://{}/socket.io/?{}",
            upstream.authority(),
            upstream_query(handshake.uri.query().unwrap_or(""))
        )
        .into_client_request()
        .map_err(|e| e.to_string())?;
        copy_handshake_headers(&handshake.headers, request.headers_mut());
        set_forwarded(
            request.headers_mut(),
            super::client_address(&handshake.extensions),
            upstream.trusted_proxy(),
        );
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let stream = TcpStream::connect(upstream.authority().as_str())
                .await
                .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let config = WebSocketConfig::default().read_buffer_size(UPSTREAM_READ_BUFFER);
            let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(|e| e.to_string())?;
            // The Engine.IO open packet comes first.
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.as_str().starts_with('0') => Ok(ws),
                other => Err(format!("no Engine.IO open packet: {other:?}")),
            }
        })
        .await
        .map_err(|_| "timed out".to_string())??;
        let (outgoing, to_send) = mpsc::channel(OUTGOING);
        let link = Arc::new(Link {
            outgoing,
            state: Mutex::new(LinkState::default()),
            closed: CancellationToken::new(),
        });
        metrics::gauge!(metric::RELAY_LINKS).increment(1.0);
        tokio::spawn(link.clone().run(opened, to_send));
        Ok(link)
    }

    /// Reads and writes the upstream connection until either side ends it.
    async fn run(
        self: Arc<Self>,
        ws: tokio_tungstenite::WebSocketStream<TcpStream>,
        mut to_send: mpsc::Receiver<Message>,
    ) {
        let (mut sink, mut stream) = ws.split();
        let ended_by_upstream = loop {
            tokio::select! {
                _ = self.closed.cancelled() => break false,
                message = to_send.recv() => {
                    let Some(message) = message else { break false };
                    if sink.send(message).await.is_err() {
                        break true;
                    }
                }
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let text = text.as_str();
                        if text == "2" {
                            if sink.send(Message::text("3")).await.is_err() {
                                break true;
                            }
                        } else if let Some(packet) = text.strip_prefix('4') {
                            self.relay_to_client(packet);
                        } else if text == "1" {
                            break true;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break true,
                    Some(Ok(_)) => {}
                },
            }
        };
        self.closed.cancel();
        let _ = sink.close().await;
        metrics::gauge!(metric::RELAY_LINKS).decrement(1.0);
        let namespaces = std::mem::take(&mut self.state.lock().unwrap().namespaces);
        if ended_by_upstream {
            tracing::info!(
                namespaces = namespaces.len(),
                "Nightscout closed a relayed connection: its client reconnects"
            );
            // As when Nightscout goes away: the client's transport closes and it reconnects;
            // a namespace-level disconnect would leave it disconnected for good.
            if let Some(client) = namespaces.values().find_map(|r| r.client.as_ref()) {
                client.close_connection();
            }
        }
        for relayed in namespaces.into_values() {
            if let Some(connecting) = relayed.connecting {
                let _ = connecting.send(Err("Nightscout closed the connection".into()));
            }
        }
    }

    fn send(&self, packet: &str) -> Result<(), RelayError> {
        self.outgoing
            .try_send(Message::text(format!("4{packet}")))
            .map_err(|_| RelayError::Unreachable)
    }

    /// A message from the client on a relayed namespace.
    fn relay_to_upstream(&self, socket: &SocketRef, message: RawMessage) {
        let Value::Str(data, None) = &message.data else {
            // Binary attachments are refused before they get here; nothing else is relayed.
            return;
        };
        let ns = socket.ns();
        let id = message.ack_id.map(|client_id| {
            let mut state = self.state.lock().unwrap();
            state.next_ack += 1;
            let id = state.next_ack;
            if let Some(relayed) = state.namespaces.get_mut(ns) {
                relayed.acks.insert(id, client_id);
            }
            id
        });
        metrics::counter!(metric::RELAYED_MESSAGES, "direction" => "upstream").increment(1);
        if self
            .send(&packet::encode(Kind::Event, ns, id, data.as_str()))
            .is_err()
        {
            tracing::warn!(sid = %socket.id, namespace = ns, "relayed client sends faster than Nightscout reads: closing its connection");
            socket.close_connection();
        }
    }

    /// A packet from Nightscout.
    fn relay_to_client(&self, text: &str) {
        let Some(packet) = packet::parse(text) else {
            tracing::debug!("unreadable packet from Nightscout");
            return;
        };
        let mut state = self.state.lock().unwrap();
        let Some(relayed) = state.namespaces.get_mut(packet.ns) else {
            return;
        };
        let forward = match packet.kind {
            Kind::Connect => {
                if let Some(connecting) = relayed.connecting.take() {
                    let _ = connecting.send(Ok(()));
                }
                None
            }
            Kind::ConnectError => {
                if let Some(connecting) = relayed.connecting.take() {
                    let _ = connecting.send(Err(connect_error_message(packet.data)));
                }
                None
            }
            Kind::Disconnect => {
                let client = relayed.client.clone();
                state.namespaces.remove(packet.ns);
                drop(state);
                if let Some(client) = client {
                    let _ = client.disconnect();
                }
                return;
            }
            // Nightscout asks no acks of clients: an event's ack id, if any, is dropped.
            Kind::Event => Some(packet::encode(Kind::Event, packet.ns, None, packet.data)),
            Kind::Ack => packet
                .id
                .and_then(|id| relayed.acks.remove(&id))
                .map(|client_id| packet::encode(Kind::Ack, packet.ns, Some(client_id), packet.data)),
            Kind::BinaryEvent | Kind::BinaryAck => None,
        };
        let (Some(forward), Some(client)) = (forward, relayed.client.clone()) else {
            return;
        };
        drop(state);
        metrics::counter!(metric::RELAYED_MESSAGES, "direction" => "client").increment(1);
        match client.emit_encoded(Value::Str(Str::from(forward), None)) {
            Ok(()) => {}
            // The client went away while its namespace was being opened.
            Err(socketioxide::SocketError::Closed) => self.forget(client.ns()),
            Err(socketioxide::SocketError::InternalChannelFull) => {
                tracing::warn!(sid = %client.id, namespace = client.ns(), "client cannot keep up with Nightscout's messages: closing its connection");
                client.close_connection();
            }
        }
    }

    /// The client's socket on a relayed namespace went away.
    fn client_left(&self, ns: &str, reason: DisconnectReason) {
        let last = {
            let mut state = self.state.lock().unwrap();
            if state.namespaces.remove(ns).is_none() {
                return;
            }
            state.namespaces.is_empty()
        };
        if reason == DisconnectReason::ClientNSDisconnect {
            let _ = self.send(&packet::encode(Kind::Disconnect, ns, None, ""));
        }
        if last {
            // Nothing of the session is relayed any more.
            self.closed.cancel();
        }
    }

    fn forget(&self, ns: &str) {
        let last = {
            let mut state = self.state.lock().unwrap();
            state.namespaces.remove(ns);
            state.namespaces.is_empty()
        };
        if last {
            self.closed.cancel();
        }
    }
}

/// The message of a CONNECT error's data (`{"message": ...}`, or as sent).
fn connect_error_message(data: &str) -> String {
    match serde_json::from_str::<Json>(data) {
        Ok(Json::Object(o)) => match o.get("message") {
            Some(Json::String(m)) => m.clone(),
            _ => data.to_string(),
        },
        Ok(Json::String(s)) => s,
        _ => data.to_string(),
    }
}

/// The query of the upstream handshake: the client's, but for the Engine.IO parameters,
/// which are the upstream connection's own.
pub fn upstream_query(client_query: &str) -> String {
    let mut query = String::from("EIO=4&transport=websocket");
    for pair in client_query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !matches!(key, "EIO" | "transport" | "sid" | "t" | "b64" | "j") {
            query.push('&');
            query.push_str(pair);
        }
    }
    query
}

fn copy_handshake_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in FORWARDED_HANDSHAKE_HEADERS {
        if name == header::HOST {
            continue;
        }
        for value in from.get_all(&name) {
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                to.append(name.clone(), value);
            }
        }
    }
    // The client's Host, as a proxy that keeps it (Nightscout builds links from it).
    if let Some(host) = from.get(header::HOST) {
        to.insert(header::HOST, host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_query_keeps_the_clients_parameters_but_engine_ios() {
        assert_eq!(upstream_query(""), "EIO=4&transport=websocket");
        assert_eq!(
            upstream_query("EIO=3&transport=polling&t=Nxyz&b64=1&token=abc&sid=S&x"),
            "EIO=4&transport=websocket&token=abc&x"
        );
    }

    #[test]
    fn connect_error_messages() {
        assert_eq!(
            connect_error_message(r#"{"message":"Unauthorized","data":{}}"#),
            "Unauthorized"
        );
        assert_eq!(connect_error_message(r#""plain""#), "plain");
        assert_eq!(connect_error_message("???"), "???");
    }
}
