use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 3,
        header_read_timeout: Duration::from_secs(10),
        keep_alive_timeout: Duration::from_secs(30),
        request_body_timeout: Duration::from_secs(30),
    }
}

/// A connection for the rules only: its descriptor is never used.
fn connection(id: u64, opened: Instant) -> Arc<Connection> {
    Arc::new(Connection::new(id, PEER, -1, opened))
}

fn registry(connections: &[Arc<Connection>]) -> BTreeMap<u64, Arc<Connection>> {
    connections.iter().map(|c| (c.id, c.clone())).collect()
}

#[test]
fn a_silent_or_half_sent_connection_expires_after_the_header_timeout() {
    let registry = Connections::new(limits());
    let t0 = Instant::now();
    let silent = connection(1, t0);
    assert_eq!(registry.expiry(&silent, t0 + Duration::from_millis(9_999)), None);
    assert_eq!(
        registry.expiry(&silent, t0 + Duration::from_secs(10)),
        Some(CloseReason::HeaderTimeout)
    );
    // Half a request line: the same deadline.
    silent.read_while_idle.store(true, Ordering::Release);
    assert_eq!(
        registry.expiry(&silent, t0 + Duration::from_secs(10)),
        Some(CloseReason::HeaderTimeout)
    );
}

#[test]
fn a_kept_alive_connection_expires_after_the_keep_alive_timeout_from_its_last_response() {
    let registry = Connections::new(limits());
    let t0 = Instant::now();
    let kept = connection(1, t0);
    kept.request_started();
    std::thread::sleep(Duration::from_millis(5));
    kept.request_finished(false);
    let since = kept.idle_since();
    assert!(since > t0);
    assert_eq!(registry.expiry(&kept, since + Duration::from_secs(29)), None);
    assert_eq!(
        registry.expiry(&kept, since + Duration::from_secs(30)),
        Some(CloseReason::KeepAliveTimeout)
    );
    // Its next request head is on its way: the header deadline applies.
    kept.read_while_idle.store(true, Ordering::Release);
    assert_eq!(
        registry.expiry(&kept, since + Duration::from_secs(10)),
        Some(CloseReason::HeaderTimeout)
    );
}

#[test]
fn requests_in_progress_and_websockets_never_expire() {
    let registry = Connections::new(limits());
    let t0 = Instant::now();
    let long_poll = connection(1, t0);
    long_poll.request_started();
    assert_eq!(registry.expiry(&long_poll, t0 + Duration::from_secs(3600)), None);
    let websocket = connection(2, t0);
    websocket.request_started();
    websocket.request_finished(true);
    assert_eq!(registry.expiry(&websocket, t0 + Duration::from_secs(3600)), None);
}

#[test]
fn below_the_limit_everyone_is_admitted() {
    let t0 = Instant::now();
    let open = registry(&[connection(1, t0), connection(2, t0)]);
    assert_eq!(admit(&open, 3, t0), Admission::Accepted);
}

#[test]
fn at_the_limit_the_longest_idle_connection_without_a_request_makes_room() {
    let t0 = Instant::now();
    let kept_alive = connection(1, t0);
    kept_alive.request_started();
    kept_alive.request_finished(false);
    let silent_old = connection(2, t0);
    let silent_new = connection(3, t0 + Duration::from_secs(1));
    let open = registry(&[kept_alive, silent_old, silent_new]);
    // The kept-alive one has waited as long, but it is a client that sent a request.
    assert_eq!(
        admit(&open, 3, t0 + Duration::from_secs(2)),
        Admission::AcceptedEvicting(2)
    );
}

#[test]
fn at_the_limit_a_kept_alive_connection_goes_when_no_other_is_idle() {
    let t0 = Instant::now();
    let busy = connection(1, t0);
    busy.request_started();
    let websocket = connection(2, t0);
    websocket.request_started();
    websocket.request_finished(true);
    let kept_alive = connection(3, t0);
    kept_alive.request_started();
    kept_alive.request_finished(false);
    let open = registry(&[busy, websocket, kept_alive]);
    assert_eq!(
        admit(&open, 3, t0 + Duration::from_secs(1)),
        Admission::AcceptedEvicting(3)
    );
}

#[test]
fn at_the_limit_with_nothing_idle_a_new_connection_is_refused() {
    let t0 = Instant::now();
    let busy = connection(1, t0);
    busy.request_started();
    let websocket = connection(2, t0);
    websocket.request_started();
    websocket.request_finished(true);
    let open = registry(&[busy, websocket]);
    assert_eq!(admit(&open, 2, t0), Admission::Refused);
}

#[test]
fn the_open_files_limit_caps_the_connection_limit() {
    assert_eq!(
        ConnectionLimits::default()
            .within_open_files(1024)
            .max_connections,
        1024 - RESERVED_DESCRIPTORS as usize
    );
    assert_eq!(
        ConnectionLimits::default()
            .within_open_files(1 << 20)
            .max_connections,
        20_000
    );
    assert_eq!(
        ConnectionLimits::default().within_open_files(10).max_connections,
        1
    );
}

#[test]
fn the_reaper_looks_often_enough_for_the_shortest_timeout() {
    assert_eq!(
        ConnectionLimits::default().reap_interval(),
        Duration::from_secs(1)
    );
    let short = ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    assert_eq!(short.reap_interval(), Duration::from_millis(250));
}

/// A connected pair: the client's end and the bridge's registered end.
async fn pair(registry: &Arc<Connections>) -> (TcpStream, Option<TrackedStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (server, peer) = listener.accept().await.unwrap();
    (client, registry.accept(server, peer))
}

#[tokio::test]
async fn reaping_cuts_expired_connections_and_leaves_the_registry() {
    let registry = Connections::new(ConnectionLimits {
        header_read_timeout: Duration::from_millis(100),
        ..limits()
    });
    let (mut client, server) = pair(&registry).await;
    let server = server.unwrap();
    assert_eq!(registry.len(), 1);
    assert_eq!(registry.reap(Instant::now()), 0);
    assert_eq!(registry.reap(Instant::now() + Duration::from_millis(100)), 1);
    assert_eq!(registry.len(), 0);
    // The client sees the end of the stream.
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut sink)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    drop(server);
    assert_eq!(registry.len(), 0);
}

#[tokio::test]
async fn the_registry_follows_streams_and_refuses_at_the_limit() {
    let registry = Connections::new(ConnectionLimits {
        max_connections: 2,
        ..limits()
    });
    let (mut c1, s1) = pair(&registry).await;
    let (_c2, s2) = pair(&registry).await;
    let (s1, s2) = (s1.unwrap(), s2.unwrap());
    // Both are idle and without a request: the third evicts the first.
    let (mut c3, s3) = pair(&registry).await;
    assert!(s3.is_some());
    assert_eq!(registry.len(), 2);
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c1.read_to_end(&mut sink)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the evicted connection is closed: {read:?}"
    );
    drop(s1);
    assert_eq!(registry.len(), 2);
    // Busy ones cannot make room.
    s2.connection().request_started();
    s3.as_ref().unwrap().connection().request_started();
    let (mut c4, s4) = pair(&registry).await;
    assert!(s4.is_none(), "refused at the limit with nothing idle");
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c4.read_to_end(&mut sink)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    c3.write_all(b"still here").await.unwrap();
    drop(s2);
    assert_eq!(registry.len(), 1);
}

#[tokio::test]
async fn cut_wakes_a_blocked_writer_and_the_peer_sees_the_close() {
    let registry = Connections::new(limits());
    let (mut client, server) = pair(&registry).await;
    let mut server = server.unwrap();
    let cut = ConnectionInfo::new(server.connection().clone());
    assert_eq!(cut.peer, client.local_addr().unwrap());
    // The client never reads: the writer blocks once the socket buffers are full.
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        loop {
            if let Err(e) = server.write_all(&chunk).await {
                return e.kind();
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!writer.is_finished(), "writer should be blocked on a full buffer");
    assert!(cut.cut());
    let kind = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{kind:?}"
    );
    // The client drains what was buffered, then sees the end of the stream.
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut sink))
        .await
        .unwrap();
    assert!(!cut.cut(), "the stream is gone: nothing left to cut");
    assert!(!cut.is_open());
}
