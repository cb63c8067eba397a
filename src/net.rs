//! Connections: every accepted TCP connection is registered with its HTTP phase, so that
//! the bridge can bound how many are open and how long one may sit without sending a
//! request, and can cut one from elsewhere (a client that stops reading cannot even be
//! sent a close packet).
//!
//! The rules ([`Connections::expiry`], [`Connections::admit`]) are plain functions of the
//! registry; the HTTP server (`server`) reports each request's start and end, a reaper
//! task applies the timeouts, and the accept loop applies the limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::telemetry::metric;

/// Descriptors kept free of connections: the MongoDB driver's pools and monitors, the
/// listener, the runtime's own, log and state files.
pub const RESERVED_DESCRIPTORS: u64 = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; a new one beyond it closes an idle one or is refused.
    pub max_connections: usize,
    /// From opening, or from the end of the previous response, until a request head is
    /// complete.
    pub header_read_timeout: Duration,
    /// A kept-alive connection that sends nothing for this long after a response.
    pub keep_alive_timeout: Duration,
    /// From a request's head until its whole body has arrived.
    pub request_body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 20_000,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(30),
            request_body_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// The connection limit that the open-files limit `max_open_files` allows.
    pub fn within_open_files(mut self, max_open_files: u64) -> ConnectionLimits {
        let allowed = max_open_files.saturating_sub(RESERVED_DESCRIPTORS).max(1);
        self.max_connections = self.max_connections.min(allowed.try_into().unwrap_or(usize::MAX));
        self
    }

    /// How often the reaper looks: a fraction of the shortest timeout, within [50 ms, 1 s].
    pub fn reap_interval(&self) -> Duration {
        (self.header_read_timeout.min(self.keep_alive_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Why the bridge closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request head in time.
    HeaderTimeout,
    /// Kept alive without a new request for too long.
    KeepAliveTimeout,
    /// Closed to make room for a new connection at the limit.
    Evicted,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::KeepAliveTimeout => "keep_alive_timeout",
            CloseReason::Evicted => "evicted",
        }
    }
}

/// The outcome of a new connection at the door.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// Accepted after closing this idle connection.
    AcceptedEvicting(u64),
    /// At the limit with nothing idle to close: the new connection is closed at once.
    Refused,
}

/// The open connections and the limits they live under.
pub struct Connections {
    limits: ConnectionLimits,
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    /// Set while at the limit, so that reaching it is logged once.
    at_limit: AtomicBool,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Arc<Connections> {
        metrics::gauge!(metric::CONNECTION_LIMIT).set(limits.max_connections as f64);
        Arc::new(Connections {
            limits,
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            at_limit: AtomicBool::new(false),
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers an accepted stream, unless the limit refuses it (the stream is then
    /// dropped, which closes it). Reaching the limit closes the idle connection that has
    /// waited longest, preferring one that never sent a complete request.
    pub fn accept(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Option<TrackedStream> {
        // Events are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        let connection = Arc::new(Connection::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            stream.as_raw_fd(),
            now,
        ));
        let (admission, evicted, open) = {
            let mut open = self.open.lock().unwrap();
            let admission = admit(&open, self.limits.max_connections, now);
            let evicted = match admission {
                Admission::AcceptedEvicting(id) => open.remove(&id),
                _ => None,
            };
            if admission != Admission::Refused {
                open.insert(connection.id, connection.clone());
            }
            (admission, evicted, open.len())
        };
        metrics::gauge!(metric::CONNECTIONS_OPEN).set(open as f64);
        if admission != Admission::Accepted {
            self.limit_reached(open);
        }
        if let Some(evicted) = evicted {
            evicted.cut();
            metrics::counter!(metric::CONNECTIONS_CLOSED, "reason" => CloseReason::Evicted.as_str())
                .increment(1);
        }
        if admission == Admission::Refused {
            metrics::counter!(metric::CONNECTIONS_REFUSED).increment(1);
            return None;
        }
        Some(TrackedStream {
            inner: stream,
            connection,
            connections: self.clone(),
        })
    }

    /// Closes the idle connection that has waited longest, to free a descriptor (after the
    /// system refused one). False when none is idle.
    pub fn evict_one(&self) -> bool {
        let now = Instant::now();
        let victim = {
            let mut open = self.open.lock().unwrap();
            eviction_candidate(&open, now).and_then(|id| open.remove(&id))
        };
        match victim {
            Some(victim) => {
                victim.cut();
                metrics::counter!(metric::CONNECTIONS_CLOSED, "reason" => CloseReason::Evicted.as_str())
                    .increment(1);
                true
            }
            None => false,
        }
    }

    /// Closes the connections whose timeouts have passed; returns how many.
    pub fn reap(&self, now: Instant) -> usize {
        let expired: Vec<(Arc<Connection>, CloseReason)> = {
            let mut open = self.open.lock().unwrap();
            let expired: Vec<(u64, CloseReason)> = open
                .values()
                .filter_map(|c| Some((c.id, self.expiry(c, now)?)))
                .collect();
            expired
                .into_iter()
                .filter_map(|(id, reason)| Some((open.remove(&id)?, reason)))
                .collect()
        };
        for (connection, reason) in &expired {
            connection.cut();
            metrics::counter!(metric::CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
            tracing::debug!(peer = %connection.peer, reason = reason.as_str(), "connection closed");
        }
        if !expired.is_empty() {
            self.opened_or_closed();
        }
        expired.len()
    }

    /// Whether `connection` has outstayed its welcome at `now`, and why. WebSockets and
    /// requests in progress (a long poll waits up to the ping interval) are never expired
    /// here: Engine.IO's heartbeat and the body timeout bound those.
    pub fn expiry(&self, connection: &Connection, now: Instant) -> Option<CloseReason> {
        if connection.upgraded.load(Ordering::Acquire) || connection.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle_for = now.saturating_duration_since(connection.idle_since());
        let kept_alive = connection.requests.load(Ordering::Acquire) > 0
            && !connection.read_while_idle.load(Ordering::Acquire);
        if kept_alive {
            (idle_for >= self.limits.keep_alive_timeout).then_some(CloseReason::KeepAliveTimeout)
        } else {
            (idle_for >= self.limits.header_read_timeout).then_some(CloseReason::HeaderTimeout)
        }
    }

    /// Reaps every [`ConnectionLimits::reap_interval`] until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.limits.reap_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.reap(Instant::now());
        }
    }

    fn remove(&self, id: u64) {
        let removed = self.open.lock().unwrap().remove(&id).is_some();
        if removed {
            self.opened_or_closed();
        }
    }

    fn opened_or_closed(&self) {
        let open = self.len();
        metrics::gauge!(metric::CONNECTIONS_OPEN).set(open as f64);
        // Re-armed once well below the limit, so that a crowd at the door logs once.
        if open < self.limits.max_connections * 9 / 10 && self.at_limit.swap(false, Ordering::Relaxed) {
            tracing::info!(
                open,
                limit = self.limits.max_connections,
                "below the connection limit again"
            );
        }
    }

    fn limit_reached(&self, open: usize) {
        if !self.at_limit.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                open,
                limit = self.limits.max_connections,
                "connection limit reached: closing the longest-idle connections to admit new ones, \
                 refusing new ones while none is idle (see connections.max in the settings)"
            );
        }
    }
}

/// Whether a new connection may come in with `open` already there.
fn admit(open: &BTreeMap<u64, Arc<Connection>>, max: usize, now: Instant) -> Admission {
    if open.len() < max {
        return Admission::Accepted;
    }
    match eviction_candidate(open, now) {
        Some(id) => Admission::AcceptedEvicting(id),
        None => Admission::Refused,
    }
}

/// The idle connection to close first: one that never completed a request (a client that
/// opened a connection and sent nothing, or half a request), else a kept-alive one; the
/// longest waiting of its kind.
fn eviction_candidate(open: &BTreeMap<u64, Arc<Connection>>, now: Instant) -> Option<u64> {
    let idle = || open.values().filter(|c| c.is_idle());
    let longest = |c: &&Arc<Connection>| now.saturating_duration_since(c.idle_since());
    idle()
        .filter(|c| c.requests.load(Ordering::Acquire) == 0)
        .max_by_key(longest)
        .or_else(|| idle().max_by_key(longest))
        .map(|c| c.id)
}

/// One open connection: its HTTP phase, and a handle that can cut it.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    pub peer: SocketAddr,
    opened: Instant,
    /// `None` once the stream is closed: the descriptor may then belong to another.
    fd: Mutex<Option<RawFd>>,
    /// Requests whose head has been read.
    requests: AtomicU64,
    in_flight: AtomicU32,
    /// Switched to another protocol (WebSocket): no HTTP timeouts apply any more.
    upgraded: AtomicBool,
    /// When the last response ended (ms after `opened`); 0 before the first.
    idle_since_ms: AtomicU64,
    /// Bytes arrived since the last response ended: a request head is on its way.
    read_while_idle: AtomicBool,
}

impl Connection {
    fn new(id: u64, peer: SocketAddr, fd: RawFd, opened: Instant) -> Connection {
        Connection {
            id,
            peer,
            opened,
            fd: Mutex::new(Some(fd)),
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            upgraded: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            read_while_idle: AtomicBool::new(false),
        }
    }

    /// A request head was read.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// The request's response was written (or abandoned); `upgraded` when it switched
    /// the connection to another protocol.
    pub fn request_finished(&self, upgraded: bool) {
        if upgraded {
            self.upgraded.store(true, Ordering::Release);
        }
        let since = self.opened.elapsed().as_millis() as u64;
        self.idle_since_ms.store(since, Ordering::Release);
        self.read_while_idle.store(false, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }

    fn is_idle(&self) -> bool {
        !self.upgraded.load(Ordering::Acquire) && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Shuts the connection down in both directions, waking whoever reads or writes it.
    /// False when it was already closed.
    pub fn cut(&self) -> bool {
        let fd = self.fd.lock().unwrap();
        let Some(fd) = *fd else { return false };
        // SAFETY: `fd` is Some only while the TrackedStream owning the descriptor is alive;
        // its Drop takes this same lock and clears it before the descriptor is closed.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        socket2::SockRef::from(&fd)
            .shutdown(std::net::Shutdown::Both)
            .is_ok()
    }

    pub fn is_open(&self) -> bool {
        self.fd.lock().unwrap().is_some()
    }
}

/// A registered TCP stream: records that bytes arrived, and leaves the registry when it
/// closes.
pub struct TrackedStream {
    inner: TcpStream,
    connection: Arc<Connection>,
    connections: Arc<Connections>,
}

impl TrackedStream {
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        *self.connection.fd.lock().unwrap() = None;
        self.connections.remove(self.connection.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.connection.read_while_idle.store(true, Ordering::Release);
        }
        polled
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What each HTTP request (and so each socket's handshake request) knows about its
/// connection: the server puts it in the request extensions as `ConnectInfo<ConnectionInfo>`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    connection: Arc<Connection>,
}

impl ConnectionInfo {
    pub fn new(connection: Arc<Connection>) -> ConnectionInfo {
        ConnectionInfo {
            peer: connection.peer,
            connection,
        }
    }

    /// See [`Connection::cut`].
    pub fn cut(&self) -> bool {
        self.connection.cut()
    }

    pub fn is_open(&self) -> bool {
        self.connection.is_open()
    }
}

/// Raises the soft limit of open files to the hard limit and returns the limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
        tracing::info!(from = soft, to = hard, "raised the open-files limit");
    }
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

#[cfg(test)]
mod tests;
