//! One site's side of the channel: who is subscribed to what, the history of what was
//! sent, replays and recoveries, slow clients, and the fan-out of its events. A bridge
//! of many sites has one of these per site; a single site is one of them.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use socketioxide::SocketError;
use socketioxide::extract::SocketRef;
use socketioxide::socket::{EmitBatch, Sid};
use tokio_util::sync::CancellationToken;

use super::recovery::{Asked, Grants, Recoverable};
use super::replay::{Catalog, ReplayLimits};
use super::rooms::Rooms;
use super::slow::{Observations, SlowClientRule};
use super::{ChannelConfig, NAMESPACE};
use crate::auth::AuthSnapshot;
use crate::auth::store::SnapshotReceiver;
use crate::auth::throttle::{FailureThrottle, client_address};
use crate::collections::Collection;
use crate::delivery::encode;
use crate::feed::{FeedEvent, now_ms};
use crate::history::{Checkpoint, History, position};
use crate::net::ConnectionInfo;
use crate::telemetry::{metric, tenant_label};

/// Disconnected sockets whose subscriptions are kept for connection state recovery; past
/// it, the one closest to expiring is forgotten.
const RECOVERABLE_SOCKETS: usize = 100_000;

/// Replays from the collections (a `since` older than the history) that read MongoDB at
/// once; others wait their turn.
const COLLECTION_READS: usize = 2;

/// Replays sent at once: each is short (paced by its client's buffer, cut after
/// `slow_client_timeout` of no progress), so the queue after a restart drains fast.
const REPLAYS_AT_ONCE: usize = 32;

/// Sockets whose memory is fetched ahead of the fan-out's emits to them (see
/// [`EmitBatch::prefetch`]): enough for the fetches to overlap, few enough that what they
/// bring is still cached when the emits come.
const PREFETCH_AHEAD: usize = 32;

/// What a site's channel is made of, besides the bridge's common settings.
pub struct SiteSetup {
    pub tenant: Arc<str>,
    pub auth: SnapshotReceiver,
    /// Where its history carries on from after a restart (see [`crate::state`]).
    pub resumed: Option<Checkpoint>,
    /// Its collections, for a `since` older than the history.
    pub catalog: Option<Catalog>,
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
pub(super) struct Session {
    pub(super) subscribing: Arc<tokio::sync::Mutex<()>>,
    pub(super) recovers: bool,
    /// A recovered socket's subscriptions and the offset it reconnected at, until restored.
    pub(super) restore: Mutex<Option<(Grants, u64)>>,
    /// The history's position when it first joined a room (`u64::MAX`: never).
    pub(super) joined_after: AtomicU64,
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
pub(super) fn note_joined(socket: &SocketRef, position: u64) {
    if let Some(session) = socket.extensions.get::<Arc<Session>>() {
        let _ =
            session
                .joined_after
                .compare_exchange(u64::MAX, position, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Events read again after a restart, until the stream reaches what was last sent.
struct Resumed {
    /// The refilled history starts after this position: older events are not its.
    from: String,
    /// The events up to this position were sent before the restart: history only.
    sent_until: String,
}

pub struct SiteChannel {
    pub(super) tenant: Arc<str>,
    /// The site's label in metrics (its name, or "other" past the bound).
    label: &'static str,
    pub(super) rooms: RwLock<Rooms<Sid, Subscriber>>,
    /// Taken after `rooms`, never before.
    pub(super) history: Mutex<History>,
    resumed: Mutex<Option<Resumed>>,
    pub(super) recoverable: Mutex<Recoverable>,
    pub(super) replay: ReplayLimits,
    pub(super) catalog: Option<Catalog>,
    /// Replays read from the collections at once.
    pub(super) collection_reads: tokio::sync::Semaphore,
    /// Replays under way at once; others wait their turn.
    pub(super) replays: tokio::sync::Semaphore,
    pub(super) auth: SnapshotReceiver,
    pub(super) throttle: FailureThrottle,
    pub(super) slow_clients: SlowClientRule,
    trusted_proxy: bool,
    auth_wait: Duration,
    /// The room sizes last reported to the metrics.
    reported_rooms: Mutex<[usize; Collection::ALL.len()]>,
}

impl SiteChannel {
    pub fn new(config: &ChannelConfig, setup: SiteSetup) -> Arc<SiteChannel> {
        let history = match &setup.resumed {
            Some(at) => History::resumed(config.history, at.seq, at.complete_after_ms),
            None => History::new(config.history, now_ms()),
        };
        let resumed = setup.resumed.as_ref().and_then(|at| {
            Some(Resumed {
                from: position(&at.token)?.to_string(),
                sent_until: position(&at.sent_token)?.to_string(),
            })
        });
        Arc::new(SiteChannel {
            label: tenant_label(&setup.tenant),
            tenant: setup.tenant,
            rooms: RwLock::new(Rooms::default()),
            history: Mutex::new(history),
            resumed: Mutex::new(resumed),
            recoverable: Mutex::new(Recoverable::new(config.recovery_window, RECOVERABLE_SOCKETS)),
            replay: config.replay,
            catalog: setup.catalog,
            collection_reads: tokio::sync::Semaphore::new(COLLECTION_READS),
            replays: tokio::sync::Semaphore::new(REPLAYS_AT_ONCE),
            auth: setup.auth,
            throttle: FailureThrottle::new(config.throttle.clone()),
            slow_clients: SlowClientRule {
                threshold: (config.window_size / 2).max(1),
                timeout: config.slow_client_timeout,
            },
            trusted_proxy: config.trusted_proxy,
            auth_wait: config.auth_wait,
            reported_rooms: Mutex::new([0; Collection::ALL.len()]),
        })
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn label(&self) -> &'static str {
        self.label
    }

    /// Whether its auth collections were read.
    pub fn auth_loaded(&self) -> bool {
        self.auth.borrow().is_some()
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
            gap_end_ms,
            ..
        } = event;
        let encoded = encode(NAMESPACE, &event, slot, received);
        match self.read_again(token.as_ref(), gap_end_ms.is_some()) {
            ReadAgain::BeforeHistory => return,
            ReadAgain::SentBefore => {
                // Sent before the restart: back into the history, not to the sockets.
                let mut history = self.history.lock().unwrap();
                history.push(&event, encoded.text(), token, now_ms());
                return;
            }
            ReadAgain::New => {}
        }
        let live = socketioxide_core::Value::Str(encoded.live(), None);
        let mut with_offset = None;
        let mut full = Vec::new();
        let (delivered, batch) = {
            // The history and the rooms change together: a socket joining after a replay
            // sees every event either in the history or live, never both.
            let rooms = self.rooms.read().unwrap();
            let seq = {
                let mut history = self.history.lock().unwrap();
                if let Some(gap_end_ms) = gap_end_ms {
                    history.gap(gap_end_ms);
                }
                history.push(&event, encoded.text(), token, now_ms())
            };
            let mut delivered = 0;
            let room: Vec<&Subscriber> = rooms.room(event.collection).map(|(_, s)| s).collect();
            let mut batch = EmitBatch::with_capacity(room.len());
            for sockets in room.chunks(PREFETCH_AHEAD) {
                EmitBatch::prefetch(sockets.iter().map(|s| &*s.socket));
                for subscriber in sockets {
                    let packet = if subscriber.recovers {
                        with_offset
                            .get_or_insert_with(|| {
                                socketioxide_core::Value::Str(encoded.live_with_offset(seq), None)
                            })
                            .clone()
                    } else {
                        live.clone()
                    };
                    match batch.emit(&subscriber.socket, packet) {
                        Ok(()) => delivered += 1,
                        // Cannot happen while the window is smaller than the buffer; if it
                        // does, the client is as far behind as any can be.
                        Err(SocketError::InternalChannelFull) => full.push(subscriber.socket.clone()),
                        // Closed: its disconnect handler removes it.
                        Err(SocketError::Closed) => {}
                    }
                }
            }
            (delivered, batch)
        };
        // No writer runs before the event is in every socket's buffer: woken one by one,
        // they would compete with the rest of the fan-out for the CPU.
        batch.wake();
        // Queued to every socket of the room and their writers woken: the bridge's own
        // share, as Node's `emit`.
        metrics::histogram!(metric::FANOUT_DURATION).record(received.elapsed().as_secs_f64());
        let collection = event.collection.name();
        let name = event.kind.name();
        metrics::counter!(metric::EVENTS_SENT, "tenant" => self.label, "collection" => collection, "type" => name)
            .increment(1);
        metrics::counter!(metric::MESSAGES_DELIVERED, "collection" => collection).increment(delivered as u64);
        for socket in full {
            self.disconnect_slow(&socket, "its buffer is full");
        }
    }

    /// Disconnects the clients that hold back delivery (see [`slow`]), until shut down.
    pub async fn watch_slow_clients(self: Arc<Self>, shutdown: CancellationToken) {
        let period =
            (self.slow_clients.timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut observations = Observations::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let buffered: Vec<(Sid, usize)> = {
                let rooms = self.rooms.read().unwrap();
                rooms
                    .members()
                    .map(|(sid, s)| (*sid, s.socket.buffered()))
                    .collect()
            };
            let now = Instant::now();
            self.recoverable.lock().unwrap().forget_expired(now);
            let held = {
                let mut history = self.history.lock().unwrap();
                history.forget_old(now_ms());
                history.len()
            };
            metrics::gauge!(metric::HISTORY_EVENTS, "tenant" => self.label).set(held as f64);
            let slow = observations.observe(self.slow_clients, now, &buffered);
            if slow.is_empty() {
                continue;
            }
            // Looked up only when someone is slow: this runs every second for every site.
            let sockets: Vec<SocketRef> = {
                let rooms = self.rooms.read().unwrap();
                slow.iter()
                    .filter_map(|sid| rooms.member(*sid).map(|s| s.socket.clone()))
                    .collect()
            };
            for socket in sockets {
                self.disconnect_slow(&socket, "it stayed behind while others kept up");
            }
        }
    }

    /// Re-checks every subscription whenever subjects or roles change, until shut down.
    pub async fn follow_auth(self: Arc<Self>, shutdown: CancellationToken) {
        let mut auth = self.auth.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = auth.changed() => if changed.is_err() { return },
            }
            let Some(snapshot) = auth.borrow_and_update().clone() else {
                continue;
            };
            self.recheck(&snapshot);
        }
    }

    /// Where a restarted bridge would read the stream again from to refill the history.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.history.lock().unwrap().checkpoint()
    }
}

impl SiteChannel {
    /// Answers what a `/storage` CONNECT asked of connection state recovery: a private
    /// session id for a client that opted in, the same one (and its subscriptions, to be
    /// restored) for one that comes back in time, a new one when it is too late.
    pub(super) fn start_session(&self, socket: &SocketRef, asked: Asked) {
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
    pub(super) async fn subscribing(
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

    pub(super) async fn snapshot(&self) -> Option<Arc<AuthSnapshot>> {
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

    pub(super) fn disconnect_slow(&self, socket: &SocketRef, why: &str) {
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

    pub(super) fn client_address(&self, socket: &SocketRef) -> IpAddr {
        let parts = socket.req_parts();
        let Some(ConnectInfo(connection)) = parts.extensions.get::<ConnectInfo<ConnectionInfo>>() else {
            return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        };
        let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        client_address(connection.peer, forwarded, self.trusted_proxy)
    }

    pub(super) fn join(&self, subscriber: &Subscriber, grants: &Grants) {
        {
            let mut rooms = self.rooms.write().unwrap();
            note_joined(&subscriber.socket, self.history.lock().unwrap().last_seq());
            for (collection, subject) in grants {
                rooms.join(subscriber.socket.id, subscriber, subject, &[*collection]);
            }
        }
        self.update_room_gauges();
    }

    /// Reports the rooms' sizes as changes, so that sites sharing a label add up.
    pub(super) fn update_room_gauges(&self) {
        let sizes: Vec<usize> = {
            let rooms = self.rooms.read().unwrap();
            Collection::ALL.iter().map(|c| rooms.room_len(*c)).collect()
        };
        let mut reported = self.reported_rooms.lock().unwrap();
        for (collection, (size, before)) in Collection::ALL.iter().zip(sizes.iter().zip(reported.iter_mut()))
        {
            if size != before {
                metrics::gauge!(metric::SUBSCRIPTIONS, "tenant" => self.label, "collection" => collection.name())
                    .increment(*size as f64 - *before as f64);
                *before = *size;
            }
        }
    }

    /// Where an event of the stream stands for this site after a restart.
    fn read_again(&self, token: Option<&bson::Bson>, after_gap: bool) -> ReadAgain {
        let mut resumed = self.resumed.lock().unwrap();
        let Some(at) = resumed.as_ref() else {
            return ReadAgain::New;
        };
        let Some(here) = token.and_then(position).filter(|_| !after_gap) else {
            *resumed = None;
            return ReadAgain::New;
        };
        if here <= at.from.as_str() {
            ReadAgain::BeforeHistory
        } else if here <= at.sent_until.as_str() {
            ReadAgain::SentBefore
        } else {
            *resumed = None;
            ReadAgain::New
        }
    }

    /// Takes every socket of the site out of its rooms and closes their connections (the
    /// site was removed or replaced).
    pub fn disconnect_all(&self) {
        let sockets: Vec<SocketRef> = {
            let mut rooms = self.rooms.write().unwrap();
            let sockets: Vec<SocketRef> = rooms.members().map(|(_, s)| s.socket.clone()).collect();
            for socket in &sockets {
                rooms.remove(socket.id);
            }
            sockets
        };
        self.update_room_gauges();
        // The site is going away: its history with it.
        metrics::gauge!(metric::HISTORY_EVENTS, "tenant" => self.label).set(0.0);
        for socket in sockets {
            socket.close_connection();
        }
    }
}

enum ReadAgain {
    /// Older than the refilled history: not the site's any more.
    BeforeHistory,
    SentBefore,
    New,
}
