//! The `/storage` Socket.IO channel: `subscribe`, one room per collection, fan-out of
//! bridge events to the rooms, and the protections Nightscout's channel lacks.

pub mod rooms;
pub mod slow;
pub mod subscribe;
pub mod transport;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use serde_json::Value;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::{DisconnectReason, Sid};
use socketioxide::{ParserConfig, ProtocolVersion, SocketError, SocketIo};
use tokio_util::sync::CancellationToken;

use crate::auth::AuthSnapshot;
use crate::auth::store::SnapshotReceiver;
use crate::auth::throttle::{FailureThrottle, ThrottleConfig, client_address};
use crate::auth::token::fingerprint;
use crate::collections::Collection;
use crate::delivery::{DeliveryWindow, encode};
use crate::feed::FeedEvent;
use crate::net::ConnectionInfo;
use crate::telemetry::metric;
use crate::upstream::Upstream;
use rooms::Rooms;
use slow::{Observations, SlowClientRule};
use subscribe::{Ack, Decision, Request, decide};

pub const NAMESPACE: &str = "/storage";

/// Bytes read from a WebSocket at a time (socketioxide's default is 4096).
const WS_READ_BUFFER: usize = 256;

/// Nightscout's `maxHttpBufferSize`: the largest message a client may send, on any transport.
const MAX_PAYLOAD: u64 = 1_000_000;

/// Packets a socket's buffer holds beyond the delivery window: pings, acks, namespace
/// packets. The window bounds the events in any buffer, so the buffer never fills.
const BUFFER_HEADROOM: usize = 64;

#[derive(Clone)]
pub struct ChannelConfig {
    /// Take the client address from X-Forwarded-For (behind a trusted proxy only).
    pub trusted_proxy: bool,
    /// The events in flight between the change stream and the sockets.
    pub window: DeliveryWindow,
    /// How long a client may stay half a window behind while others keep up.
    pub slow_client_timeout: Duration,
    pub throttle: ThrottleConfig,
    /// How long a subscribe waits for the auth data to be read at start-up.
    pub auth_wait: Duration,
    /// Front-door mode: Nightscout, to which the other namespaces are relayed.
    pub upstream: Option<Arc<Upstream>>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            trusted_proxy: false,
            window: DeliveryWindow::new(64),
            slow_client_timeout: Duration::from_secs(5),
            throttle: ThrottleConfig::default(),
            auth_wait: Duration::from_secs(10),
            upstream: None,
        }
    }
}

#[derive(Clone)]
pub struct Channel {
    io: SocketIo,
    state: Arc<ChannelState>,
}

struct ChannelState {
    rooms: RwLock<Rooms<Sid, SocketRef>>,
    auth: SnapshotReceiver,
    throttle: FailureThrottle,
    window: DeliveryWindow,
    slow_clients: SlowClientRule,
    trusted_proxy: bool,
    auth_wait: Duration,
}

impl Channel {
    pub fn new(config: ChannelConfig, auth: SnapshotReceiver) -> (Channel, SocketIoLayer) {
        let (layer, io) = SocketIo::builder()
            // Nightscout's handshake values (socket.io 4.5 defaults).
            .ping_interval(Duration::from_millis(25_000))
            .ping_timeout(Duration::from_millis(20_000))
            .max_payload(MAX_PAYLOAD)
            .ws_max_message_size(MAX_PAYLOAD as usize)
            .ws_max_frame_size(MAX_PAYLOAD as usize)
            // Clients send little (pongs, a subscribe): a small read buffer per WebSocket.
            .ws_read_buffer_size(WS_READ_BUFFER)
            .max_buffer_size(config.window.size() + BUFFER_HEADROOM)
            // No client of this channel sends binary: refuse attachments outright.
            .with_parser(ParserConfig::common().max_incoming_binaries(0))
            .build_layer();
        let state = Arc::new(ChannelState {
            rooms: RwLock::new(Rooms::default()),
            auth,
            throttle: FailureThrottle::new(config.throttle),
            slow_clients: SlowClientRule {
                threshold: (config.window.size() / 2).max(1),
                timeout: config.slow_client_timeout,
            },
            window: config.window,
            trusted_proxy: config.trusted_proxy,
            auth_wait: config.auth_wait,
        });
        match config.upstream {
            // Nightscout's `/`, `/alarm` and any other namespace but `/storage`.
            Some(upstream) => crate::upstream::relay::register(&io, upstream),
            None => {
                // Clients of the legacy protocol (socket.io-client 2.x) are closed unless
                // `/` exists.
                let root_state = state.clone();
                io.ns("/", async move |socket: SocketRef| {
                    connected(&root_state, &socket);
                });
            }
        }
        let storage_state = state.clone();
        let on_connect = async |_: SocketRef| {};
        // Handlers are registered before the CONNECT reply goes out: a subscribe sent
        // right after `connect` must find them.
        io.ns(
            NAMESPACE,
            on_connect.with(async move |socket: SocketRef| {
                connected(&storage_state, &socket);
                let state = storage_state.clone();
                socket.on(
                    "subscribe",
                    async move |socket: SocketRef, TryData(payload): TryData<Value>, ack: AckSender| {
                        on_subscribe(&state, socket, payload.unwrap_or(Value::Null), ack).await;
                    },
                );
                Ok::<(), std::convert::Infallible>(())
            }),
        );
        (Channel { io, state }, layer)
    }

    /// Sends one event to its collection's room: encoded once, the same bytes queued to
    /// every socket. The event's slot in the delivery window goes back when the last
    /// socket has taken it.
    pub fn publish(&self, event: FeedEvent) {
        let FeedEvent {
            event,
            received,
            slot,
        } = event;
        let packet = socketioxide_core::Value::Str(encode(NAMESPACE, &event, slot, received), None);
        let mut full = Vec::new();
        let delivered = {
            let rooms = self.state.rooms.read().unwrap();
            let mut delivered = 0;
            for (_, socket) in rooms.room(event.collection) {
                match socket.emit_encoded(packet.clone()) {
                    Ok(()) => delivered += 1,
                    // Cannot happen while the window is smaller than the buffer; if it
                    // does, the client is as far behind as any can be.
                    Err(SocketError::InternalChannelFull) => full.push(socket.clone()),
                    // Closed: its disconnect handler removes it.
                    Err(SocketError::Closed) => {}
                }
            }
            delivered
        };
        // Queued to every socket of the room: the bridge's own share, as Node's `emit`.
        metrics::histogram!(metric::FANOUT_DURATION).record(received.elapsed().as_secs_f64());
        let collection = event.collection.name();
        let name = event.kind.name();
        metrics::counter!(metric::EVENTS_SENT, "collection" => collection, "type" => name).increment(1);
        metrics::counter!(metric::MESSAGES_DELIVERED, "collection" => collection).increment(delivered as u64);
        for socket in full {
            self.state.disconnect_slow(&socket, "its buffer is full");
        }
    }

    /// Disconnects the clients that hold back delivery (see [`slow`]), until shut down.
    pub async fn watch_slow_clients(self, shutdown: CancellationToken) {
        let period =
            (self.state.slow_clients.timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut observations = Observations::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            metrics::gauge!(metric::EVENTS_IN_FLIGHT).set(self.state.window.in_flight() as f64);
            let (buffered, sockets): (Vec<(Sid, usize)>, HashMap<Sid, SocketRef>) = {
                let rooms = self.state.rooms.read().unwrap();
                rooms
                    .members()
                    .map(|(sid, socket)| ((*sid, socket.buffered()), (*sid, socket.clone())))
                    .unzip()
            };
            let slow = observations.observe(self.state.slow_clients, Instant::now(), &buffered);
            for sid in slow {
                if let Some(socket) = sockets.get(&sid) {
                    self.state
                        .disconnect_slow(socket, "it stayed behind while others kept up");
                }
            }
        }
    }

    /// Re-checks every subscription whenever subjects or roles change, until shut down.
    pub async fn follow_auth(self, shutdown: CancellationToken) {
        let mut auth = self.state.auth.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = auth.changed() => if changed.is_err() { return },
            }
            let Some(snapshot) = auth.borrow_and_update().clone() else {
                continue;
            };
            self.state.recheck(&snapshot);
        }
    }

    /// Disconnects every socket (graceful shutdown).
    pub async fn close(&self) {
        self.io.clone().close().await;
    }
}

impl ChannelState {
    fn snapshot_now(&self) -> Option<Arc<AuthSnapshot>> {
        self.auth.borrow().clone()
    }

    async fn snapshot(&self) -> Option<Arc<AuthSnapshot>> {
        if let Some(snapshot) = self.snapshot_now() {
            return Some(snapshot);
        }
        let mut auth = self.auth.clone();
        let loaded = tokio::time::timeout(self.auth_wait, auth.wait_for(Option::is_some)).await;
        loaded.ok()?.ok()?.clone()
    }

    fn recheck(&self, snapshot: &AuthSnapshot) {
        let left = self.rooms.write().unwrap().recheck(snapshot);
        for (sid, rooms) in &left {
            let rooms: Vec<&str> = rooms.iter().map(|c| c.name()).collect();
            tracing::info!(%sid, ?rooms, "permissions changed: socket left rooms it may no longer read");
        }
        if !left.is_empty() {
            self.update_room_gauges();
        }
    }

    fn disconnect_slow(&self, socket: &SocketRef, why: &str) {
        let rooms = {
            let mut rooms = self.rooms.write().unwrap();
            let joined = rooms.rooms_of(socket.id);
            rooms.remove(socket.id);
            joined
        };
        self.update_room_gauges();
        metrics::counter!(metric::SLOW_CLIENT_DISCONNECTS).increment(1);
        tracing::warn!(
            sid = %socket.id,
            transport = ?socket.transport_type(),
            buffered = socket.buffered(),
            rooms = ?rooms.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "client cannot keep up ({why}): closing its connection so that it reconnects and catches up"
        );
        // Its transport closes: the client reconnects, which a namespace disconnect would
        // not make it do.
        socket.close_connection();
    }

    fn client_address(&self, socket: &SocketRef) -> IpAddr {
        let parts = socket.req_parts();
        let Some(ConnectInfo(connection)) = parts.extensions.get::<ConnectInfo<ConnectionInfo>>() else {
            return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        };
        let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        client_address(connection.peer, forwarded, self.trusted_proxy)
    }

    fn update_room_gauges(&self) {
        let rooms = self.rooms.read().unwrap();
        for collection in Collection::ALL {
            metrics::gauge!(metric::SUBSCRIPTIONS, "collection" => collection.name())
                .set(rooms.room_len(collection) as f64);
        }
    }
}

fn protocol_label(protocol: ProtocolVersion) -> &'static str {
    match protocol {
        ProtocolVersion::V4 => "eio3",
        ProtocolVersion::V5 => "eio4",
    }
}

fn connected(state: &Arc<ChannelState>, socket: &SocketRef) {
    let ns = if socket.ns() == "/" { "/" } else { NAMESPACE };
    let protocol = protocol_label(socket.protocol());
    metrics::gauge!(metric::SOCKETS_CONNECTED, "namespace" => ns, "protocol" => protocol).increment(1.0);
    tracing::info!(
        sid = %socket.id,
        namespace = ns,
        protocol,
        transport = ?socket.transport_type(),
        client = %state.client_address(socket),
        "client connected"
    );
    let state = state.clone();
    socket.on_disconnect(async move |socket: SocketRef, reason: DisconnectReason| {
        metrics::gauge!(metric::SOCKETS_CONNECTED, "namespace" => ns, "protocol" => protocol).decrement(1.0);
        if ns == NAMESPACE && state.rooms.write().unwrap().remove(socket.id) {
            state.update_room_gauges();
        }
        tracing::info!(sid = %socket.id, namespace = ns, ?reason, "client disconnected");
    });
}

async fn on_subscribe(state: &Arc<ChannelState>, socket: SocketRef, payload: Value, ack: AckSender) {
    let request = Request::parse(&payload);
    let token_fingerprint = request.token.map(fingerprint);
    let Some(snapshot) = state.snapshot().await else {
        tracing::error!(sid = %socket.id, "subscribe refused: the auth collections could not be read yet");
        let _ = ack.send(&Ack::for_decision(&Decision::BadToken));
        return;
    };
    let decision = decide(&request, &snapshot);
    match &decision {
        Decision::BadToken => {
            metrics::counter!(metric::AUTH_FAILURES).increment(1);
            let address = state.client_address(&socket);
            let Some(wait) = state.throttle.failure(address, Instant::now()) else {
                metrics::counter!(metric::AUTH_THROTTLED, "outcome" => "refused").increment(1);
                tracing::debug!(sid = %socket.id, client = %address, "subscribe dropped: too many failures waiting");
                return;
            };
            metrics::counter!(metric::AUTH_THROTTLED, "outcome" => "delayed").increment(1);
            tracing::info!(
                sid = %socket.id,
                client = %address,
                token = token_fingerprint.as_deref().unwrap_or("none"),
                delay_ms = wait.delay.as_millis() as u64,
                "subscribe refused: missing or bad access token"
            );
            tokio::time::sleep(wait.delay).await;
            let _ = ack.send(&Ack::for_decision(&decision));
        }
        Decision::NothingReadable { subject } => {
            tracing::info!(
                sid = %socket.id,
                subject = %subject.name,
                token = token_fingerprint.as_deref().unwrap_or("none"),
                "subscribe refused: no requested collection readable"
            );
            let _ = ack.send(&Ack::for_decision(&decision));
        }
        Decision::Granted { subject, collections } => {
            state
                .rooms
                .write()
                .unwrap()
                .join(socket.id, &socket, &subject.id, collections);
            state.update_room_gauges();
            tracing::info!(
                sid = %socket.id,
                subject = %subject.name,
                token = token_fingerprint.as_deref().unwrap_or("none"),
                collections = ?collections.iter().map(|c| c.name()).collect::<Vec<_>>(),
                "subscribed"
            );
            let _ = ack.send(&Ack::for_decision(&decision));
        }
    }
}
