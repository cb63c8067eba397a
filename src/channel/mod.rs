//! The `/storage` Socket.IO channel: `subscribe`, one room per collection, fan-out of
//! bridge events to the rooms, and the protections Nightscout's channel lacks. One
//! Socket.IO server for the bridge; each connection belongs to the site its request was
//! routed to ([`Routed`]), whose [`SiteChannel`] holds its rooms and history.

pub mod recovery;
pub mod replay;
pub mod rooms;
pub mod site;
pub mod slow;
pub mod subscribe;
pub mod transport;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use socketioxide::{ParserConfig, ProtocolVersion, SocketIo};

use crate::auth::throttle::ThrottleConfig;
use crate::auth::token::fingerprint;
use crate::history::HistoryLimits;
use crate::telemetry::metric;
use crate::upstream::Upstream;
use crate::upstream::relay::RelayError;
use recovery::Grants;
use replay::{Plan, ReplayLimits};
use site::Session;
pub use site::{SiteChannel, SiteSetup, Subscriber};
use subscribe::{Ack, Decision, Request, decide};

pub const NAMESPACE: &str = "/storage";

/// Bytes read from a WebSocket at a time (socketioxide's default is 4096).
const WS_READ_BUFFER: usize = 256;

/// Nightscout's `maxHttpBufferSize`: the largest message a client may send, on any transport.
const MAX_PAYLOAD: u64 = 1_000_000;

/// Packets a socket's buffer holds beyond the delivery window: pings, acks, namespace
/// packets. The window bounds the events in any buffer, so the buffer never fills.
const BUFFER_HEADROOM: usize = 64;

/// The bridge's settings of the channel, common to its sites.
#[derive(Clone)]
pub struct ChannelConfig {
    /// Take the client address from X-Forwarded-For (behind a trusted proxy only).
    pub trusted_proxy: bool,
    /// The events in flight between a change stream and the sockets.
    pub window_size: usize,
    /// How long a client may stay half a window behind while others keep up.
    pub slow_client_timeout: Duration,
    pub throttle: ThrottleConfig,
    /// How long a subscribe waits for the auth data to be read at start-up.
    pub auth_wait: Duration,
    /// How much of what was sent is kept for clients that reconnect.
    pub history: HistoryLimits,
    /// How long a disconnected socket may recover its state (0: never).
    pub recovery_window: Duration,
    pub replay: ReplayLimits,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            trusted_proxy: false,
            window_size: 64,
            slow_client_timeout: Duration::from_secs(5),
            throttle: ThrottleConfig::default(),
            auth_wait: Duration::from_secs(10),
            history: HistoryLimits::default(),
            recovery_window: Duration::from_secs(120),
            replay: ReplayLimits::default(),
        }
    }
}

/// The site a request was routed to (by its host), in the request's extensions: its
/// channel, and in front-door mode its Nightscout.
#[derive(Clone)]
pub struct Routed {
    pub site: Arc<SiteChannel>,
    pub upstream: Option<Arc<Upstream>>,
}

/// A namespace a client may not open.
#[derive(Debug, thiserror::Error)]
enum NamespaceError {
    /// socketioxide's own words for a namespace that does not exist.
    #[error("Invalid namespace")]
    Invalid,
    #[error(transparent)]
    Relay(#[from] RelayError),
}

#[derive(Clone)]
pub struct Channel {
    io: SocketIo,
}

impl Channel {
    pub fn new(config: &ChannelConfig) -> (Channel, SocketIoLayer) {
        let (layer, io) = SocketIo::builder()
            // Nightscout's handshake values (socket.io 4.5 defaults).
            .ping_interval(Duration::from_millis(25_000))
            .ping_timeout(Duration::from_millis(20_000))
            .max_payload(MAX_PAYLOAD)
            .ws_max_message_size(MAX_PAYLOAD as usize)
            .ws_max_frame_size(MAX_PAYLOAD as usize)
            // Clients send little (pongs, a subscribe): a small read buffer per WebSocket.
            .ws_read_buffer_size(WS_READ_BUFFER)
            .max_buffer_size(config.window_size + BUFFER_HEADROOM)
            // No client of this channel sends binary: refuse attachments outright.
            .with_parser(ParserConfig::common().max_incoming_binaries(0))
            .build_layer();
        // `/`: Nightscout's, relayed, for a site behind the front door; else the bridge's
        // own, empty (clients of the legacy protocol, socket.io-client 2.x, are closed
        // unless it exists). Any other namespace but `/storage`: Nightscout's or none.
        let on_connect = async |_: SocketRef| {};
        io.ns(
            "/",
            on_connect.with(async move |socket: SocketRef, TryData(auth): TryData<Value>| {
                let routed = routed(&socket).ok_or(NamespaceError::Invalid)?;
                match &routed.upstream {
                    Some(upstream) => crate::upstream::relay::connect(upstream, &socket, auth.ok()).await?,
                    None => connected(&routed.site, &socket),
                }
                Ok::<(), NamespaceError>(())
            }),
        );
        let on_connect = async |_: SocketRef| {};
        let relayed = io.dyn_ns(
            "/{*namespace}",
            on_connect.with(async move |socket: SocketRef, TryData(auth): TryData<Value>| {
                let upstream = routed(&socket)
                    .and_then(|r| r.upstream)
                    .ok_or(NamespaceError::Invalid)?;
                crate::upstream::relay::connect(&upstream, &socket, auth.ok()).await?;
                Ok::<(), NamespaceError>(())
            }),
        );
        if let Err(e) = relayed {
            tracing::error!(error = %e, "cannot relay Nightscout's namespaces");
        }
        // A recovered socket gets its subscriptions back once its CONNECT is answered.
        let on_connect = async move |socket: SocketRef| {
            if let Some(site) = socket.extensions.get::<Arc<SiteChannel>>() {
                drop(site.subscribing(&socket).await);
            }
        };
        // Handlers are registered before the CONNECT reply goes out: a subscribe sent
        // right after `connect` must find them.
        io.ns(
            NAMESPACE,
            on_connect.with(async move |socket: SocketRef, TryData(auth): TryData<Value>| {
                let site = routed(&socket).ok_or(NamespaceError::Invalid)?.site;
                socket.extensions.insert(site.clone());
                connected(&site, &socket);
                site.start_session(&socket, recovery::asked(auth.ok().as_ref()));
                socket.on(
                    "subscribe",
                    async move |socket: SocketRef, TryData(payload): TryData<Value>, ack: AckSender| {
                        on_subscribe(&site, socket, payload.unwrap_or(Value::Null), ack).await;
                    },
                );
                Ok::<(), NamespaceError>(())
            }),
        );
        (Channel { io }, layer)
    }

    /// Disconnects every socket (graceful shutdown).
    pub async fn close(&self) {
        self.io.clone().close().await;
    }

    /// Closes the connections of every socket of `site` on the bridge's own namespaces and
    /// Nightscout's root (the site was removed or replaced).
    pub fn disconnect_site(&self, site: &Arc<SiteChannel>) {
        site.disconnect_all();
        for namespace in [NAMESPACE, "/"] {
            let Some(operators) = self.io.of(namespace) else {
                continue;
            };
            for socket in operators.sockets() {
                if routed(&socket).is_some_and(|r| Arc::ptr_eq(&r.site, site)) {
                    socket.close_connection();
                }
            }
        }
    }
}

fn routed(socket: &SocketRef) -> Option<Routed> {
    socket.req_parts().extensions.get::<Routed>().cloned()
}

fn protocol_label(protocol: ProtocolVersion) -> &'static str {
    match protocol {
        ProtocolVersion::V4 => "eio3",
        ProtocolVersion::V5 => "eio4",
    }
}

fn connected(state: &Arc<SiteChannel>, socket: &SocketRef) {
    let ns = if socket.ns() == "/" { "/" } else { NAMESPACE };
    let protocol = protocol_label(socket.protocol());
    let label = state.label();
    metrics::gauge!(metric::SOCKETS_CONNECTED, "tenant" => label, "namespace" => ns, "protocol" => protocol)
        .increment(1.0);
    tracing::info!(
        sid = %socket.id,
        tenant = state.tenant(),
        namespace = ns,
        protocol,
        transport = ?socket.transport_type(),
        client = %state.client_address(socket),
        "client connected"
    );
    let state = state.clone();
    socket.on_disconnect(async move |socket: SocketRef, reason: DisconnectReason| {
        metrics::gauge!(metric::SOCKETS_CONNECTED, "tenant" => label, "namespace" => ns, "protocol" => protocol)
            .decrement(1.0);
        if ns == NAMESPACE {
            let (grants, removed) = {
                let mut rooms = state.rooms.write().unwrap();
                (rooms.grants_of(socket.id), rooms.remove(socket.id))
            };
            if removed {
                state.update_room_gauges();
            }
            // A transport lost, not a namespace left on purpose: it may come back.
            let recoverable = !matches!(
                reason,
                DisconnectReason::ClientNSDisconnect
                    | DisconnectReason::ServerNSDisconnect
                    | DisconnectReason::ClosingServer
            );
            let joined_after = socket
                .extensions
                .get::<Arc<Session>>()
                .map_or(u64::MAX, |s| s.joined_after.load(Ordering::Relaxed));
            if let Some(pid) = socket.pid().filter(|_| recoverable) {
                state
                    .recoverable
                    .lock()
                    .unwrap()
                    .keep(pid.to_string(), grants, joined_after, Instant::now());
            }
        }
        tracing::info!(sid = %socket.id, tenant = state.tenant(), namespace = ns, ?reason, "client disconnected");
    });
}

async fn on_subscribe(state: &Arc<SiteChannel>, socket: SocketRef, payload: Value, ack: AckSender) {
    let request = Request::parse(&payload);
    let token_fingerprint = request.token.map(fingerprint);
    let Some(snapshot) = state.snapshot().await else {
        tracing::error!(sid = %socket.id, tenant = state.tenant(), "subscribe refused: the auth collections could not be read yet");
        let _ = ack.send(&Ack::for_decision(&Decision::BadToken));
        return;
    };
    let decision = decide(&request, &snapshot);
    match &decision {
        Decision::BadToken => {
            metrics::counter!(metric::AUTH_FAILURES, "tenant" => state.label()).increment(1);
            let address = state.client_address(&socket);
            let Some(wait) = state.throttle.failure(address, Instant::now()) else {
                metrics::counter!(metric::AUTH_THROTTLED, "outcome" => "refused").increment(1);
                tracing::debug!(sid = %socket.id, client = %address, "subscribe dropped: too many failures waiting");
                return;
            };
            metrics::counter!(metric::AUTH_THROTTLED, "outcome" => "delayed").increment(1);
            tracing::info!(
                sid = %socket.id,
                tenant = state.tenant(),
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
                tenant = state.tenant(),
                subject = %subject.name,
                token = token_fingerprint.as_deref().unwrap_or("none"),
                "subscribe refused: no requested collection readable"
            );
            let _ = ack.send(&Ack::for_decision(&decision));
        }
        Decision::Granted { subject, collections } => {
            let Some((subscriber, _subscribing)) = state.subscribing(&socket).await else {
                return;
            };
            let plan = state.plan(request.since, payload.get("since"), collections).await;
            let mut reply = Ack::for_decision(&decision);
            if let Some(info) = plan.info() {
                reply = reply.with_replay(info.clone());
            }
            let subject_id: Arc<str> = Arc::from(subject.id.as_str());
            let grants: Grants = collections.iter().map(|c| (*c, subject_id.clone())).collect();
            tracing::info!(
                sid = %socket.id,
                tenant = state.tenant(),
                subject = %subject.name,
                token = token_fingerprint.as_deref().unwrap_or("none"),
                collections = ?collections.iter().map(|c| c.name()).collect::<Vec<_>>(),
                since = ?request.since,
                "subscribed"
            );
            if let Plan::None(None) = plan {
                // Nightscout's order: in the rooms, then the ack.
                state.join(&subscriber, &grants);
                let _ = ack.send(&reply);
            } else {
                // The ack, then what was missed, then live; a socket subscribed before
                // leaves these rooms meanwhile, so that nothing comes twice or out of order.
                state.rooms.write().unwrap().leave(socket.id, collections);
                let _ = ack.send(&reply);
                let _turn = state.replays.acquire().await;
                state.replay_then_join(&subscriber, &grants, plan).await;
            }
        }
    }
}
