//! The `/storage` Socket.IO channel: `subscribe`, one room per collection, fan-out of
//! bridge events to the rooms, and the protections Nightscout's channel lacks.

pub mod recovery;
pub mod replay;
pub mod rooms;
pub mod slow;
pub mod subscribe;
pub mod transport;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
use crate::feed::{FeedEvent, now_ms};
use crate::history::{Checkpoint, History, HistoryLimits};
use crate::net::ConnectionInfo;
use crate::telemetry::metric;
use crate::upstream::Upstream;
use recovery::{Asked, Grants, Recoverable};
use replay::{Catalog, Plan, ReplayLimits};
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

/// Disconnected sockets whose subscriptions are kept for connection state recovery; past
/// it, the one closest to expiring is forgotten.
const RECOVERABLE_SOCKETS: usize = 100_000;

/// Replays from the collections (a `since` older than the history) that read MongoDB at
/// once; others wait their turn.
const COLLECTION_READS: usize = 2;

/// Replays sent at once: each is short (paced by its client's buffer, cut after
/// `slow_client_timeout` of no progress), so the queue after a restart drains fast.
const REPLAYS_AT_ONCE: usize = 32;

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
    /// How much of what was sent is kept for clients that reconnect.
    pub history: HistoryLimits,
    /// Where the history carries on from after a restart (see [`crate::state`]).
    pub resumed: Option<Checkpoint>,
    /// How long a disconnected socket may recover its state (0: never).
    pub recovery_window: Duration,
    pub replay: ReplayLimits,
    /// The collections, for a `since` older than the history.
    pub catalog: Option<Catalog>,
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
            history: HistoryLimits::default(),
            resumed: None,
            recovery_window: Duration::from_secs(120),
            replay: ReplayLimits::default(),
            catalog: None,
        }
    }
}

/// A socket in the rooms: whether it gets events with their offsets (connection state
/// recovery).
#[derive(Clone)]
pub struct Subscriber {
    pub socket: SocketRef,
    pub recovers: bool,
}

/// Per socket: its subscriptions are changed one at a time, so that a replay and the
/// switch to live are never interleaved with another.
struct Session {
    subscribing: Arc<tokio::sync::Mutex<()>>,
    recovers: bool,
    /// A recovered socket's subscriptions and the offset it reconnected at, until restored.
    restore: Mutex<Option<(Grants, u64)>>,
    /// The history's position when it first joined a room (`u64::MAX`: never).
    joined_after: AtomicU64,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            subscribing: Arc::default(),
            recovers: false,
            restore: Mutex::new(None),
            joined_after: AtomicU64::new(u64::MAX),
        }
    }
}

/// Notes where a socket joined (the first time), for a recovery without an offset; called
/// under the rooms' write lock.
fn note_joined(socket: &SocketRef, position: u64) {
    if let Some(session) = socket.extensions.get::<Arc<Session>>() {
        let _ =
            session
                .joined_after
                .compare_exchange(u64::MAX, position, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct Channel {
    io: SocketIo,
    state: Arc<ChannelState>,
}

struct ChannelState {
    rooms: RwLock<Rooms<Sid, Subscriber>>,
    /// Taken after `rooms`, never before.
    history: Mutex<History>,
    recoverable: Mutex<Recoverable>,
    replay: ReplayLimits,
    catalog: Option<Catalog>,
    /// Replays read from the collections at once.
    collection_reads: tokio::sync::Semaphore,
    /// Replays under way at once; others wait their turn.
    replays: tokio::sync::Semaphore,
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
        let history = match &config.resumed {
            Some(at) => History::resumed(config.history, at.seq, at.complete_after_ms),
            None => History::new(config.history, now_ms()),
        };
        let state = Arc::new(ChannelState {
            rooms: RwLock::new(Rooms::default()),
            history: Mutex::new(history),
            recoverable: Mutex::new(Recoverable::new(config.recovery_window, RECOVERABLE_SOCKETS)),
            replay: config.replay,
            catalog: config.catalog,
            collection_reads: tokio::sync::Semaphore::new(COLLECTION_READS),
            replays: tokio::sync::Semaphore::new(REPLAYS_AT_ONCE),
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
        let restore_state = state.clone();
        // A recovered socket gets its subscriptions back once its CONNECT is answered.
        let on_connect = async move |socket: SocketRef| {
            drop(restore_state.subscribing(&socket).await);
        };
        // Handlers are registered before the CONNECT reply goes out: a subscribe sent
        // right after `connect` must find them.
        io.ns(
            NAMESPACE,
            on_connect.with(async move |socket: SocketRef, TryData(auth): TryData<Value>| {
                connected(&storage_state, &socket);
                storage_state.start_session(&socket, recovery::asked(auth.ok().as_ref()));
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
            token,
            sent_before,
            gap_end_ms,
        } = event;
        let encoded = encode(NAMESPACE, &event, slot, received);
        if sent_before {
            // Read again after a restart: back into the history, not to the sockets.
            let mut history = self.state.history.lock().unwrap();
            history.push(&event, encoded.text(), token, now_ms());
            return;
        }
        let live = socketioxide_core::Value::Str(encoded.live(), None);
        let mut with_offset = None;
        let mut full = Vec::new();
        let delivered = {
            // The history and the rooms change together: a socket joining after a replay
            // sees every event either in the history or live, never both.
            let rooms = self.state.rooms.read().unwrap();
            let seq = {
                let mut history = self.state.history.lock().unwrap();
                if let Some(gap_end_ms) = gap_end_ms {
                    history.gap(gap_end_ms);
                }
                history.push(&event, encoded.text(), token, now_ms())
            };
            let mut delivered = 0;
            for (_, subscriber) in rooms.room(event.collection) {
                let packet = if subscriber.recovers {
                    with_offset
                        .get_or_insert_with(|| {
                            socketioxide_core::Value::Str(encoded.live_with_offset(seq), None)
                        })
                        .clone()
                } else {
                    live.clone()
                };
                match subscriber.socket.emit_encoded(packet) {
                    Ok(()) => delivered += 1,
                    // Cannot happen while the window is smaller than the buffer; if it
                    // does, the client is as far behind as any can be.
                    Err(SocketError::InternalChannelFull) => full.push(subscriber.socket.clone()),
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
                    .map(|(sid, s)| ((*sid, s.socket.buffered()), (*sid, s.socket.clone())))
                    .unzip()
            };
            let now = Instant::now();
            self.state.recoverable.lock().unwrap().forget_expired(now);
            let held = {
                let mut history = self.state.history.lock().unwrap();
                history.forget_old(now_ms());
                history.len()
            };
            metrics::gauge!(metric::HISTORY_EVENTS).set(held as f64);
            let slow = observations.observe(self.state.slow_clients, now, &buffered);
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

    /// Where a restarted bridge would read the stream again from to refill the history.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.state.history.lock().unwrap().checkpoint()
    }

    /// Disconnects every socket (graceful shutdown).
    pub async fn close(&self) {
        self.io.clone().close().await;
    }
}

impl ChannelState {
    /// Answers what a `/storage` CONNECT asked of connection state recovery: a private
    /// session id for a client that opted in, the same one (and its subscriptions, to be
    /// restored) for one that comes back in time, a new one when it is too late.
    fn start_session(&self, socket: &SocketRef, asked: Asked) {
        let recovery_on = !self.recoverable.lock().unwrap().window().is_zero();
        let mut session = Session::default();
        match asked {
            Asked::Recover { pid, offset } if recovery_on => {
                let kept = self.recoverable.lock().unwrap().take(&pid, Instant::now());
                let restorable = kept.and_then(|(grants, joined_after)| {
                    let offset = offset.unwrap_or(joined_after);
                    let history = self.history.lock().unwrap();
                    (offset <= history.last_seq() && history.holds_after(offset)).then_some((grants, offset))
                });
                match restorable {
                    Some((grants, offset)) => {
                        socket.set_pid(pid);
                        *session.restore.get_mut().unwrap() = Some((grants, offset));
                        metrics::counter!(metric::RECOVERIES, "outcome" => "recovered").increment(1);
                    }
                    _ => {
                        socket.set_pid(Sid::new().to_string());
                        metrics::counter!(metric::RECOVERIES, "outcome" => "too_late").increment(1);
                        tracing::info!(sid = %socket.id, "connection state not recovered: too late, or unknown; the client subscribes again");
                    }
                }
                session.recovers = true;
            }
            Asked::Recover { .. } | Asked::OptIn if recovery_on => {
                socket.set_pid(Sid::new().to_string());
                session.recovers = true;
            }
            _ => {}
        }
        socket.extensions.insert(Arc::new(session));
    }

    /// Waits for the socket's turn to change its subscriptions; a recovered socket's
    /// subscriptions are restored first, whoever gets there first.
    async fn subscribing(
        &self,
        socket: &SocketRef,
    ) -> Option<(Subscriber, tokio::sync::OwnedMutexGuard<()>)> {
        let session = socket.extensions.get::<Arc<Session>>()?;
        let guard = session.subscribing.clone().lock_owned().await;
        let subscriber = Subscriber {
            socket: socket.clone(),
            recovers: session.recovers,
        };
        let restore = session.restore.lock().unwrap().take();
        if let Some((grants, offset)) = restore {
            let grants = self.still_granted(grants).await;
            self.recover_then_join(&subscriber, &grants, offset).await;
        }
        Some((subscriber, guard))
    }

    /// The grants a subject still has: permissions may have changed while it was away.
    async fn still_granted(&self, grants: Grants) -> Grants {
        let Some(snapshot) = self.snapshot().await else {
            return Vec::new();
        };
        grants
            .into_iter()
            .filter(|(collection, subject)| {
                snapshot.subject(subject).is_some_and(|s| s.may_read(*collection))
            })
            .collect()
    }

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

    fn join(&self, subscriber: &Subscriber, grants: &Grants) {
        {
            let mut rooms = self.rooms.write().unwrap();
            note_joined(&subscriber.socket, self.history.lock().unwrap().last_seq());
            for (collection, subject) in grants {
                rooms.join(subscriber.socket.id, subscriber, subject, &[*collection]);
            }
        }
        self.update_room_gauges();
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
