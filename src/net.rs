//! The TCP listener: each accepted connection carries its peer address and a handle that
//! can cut it, so that a client that stops reading can be disconnected even when its
//! queue is too full to take a close packet.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A listener whose connections can be cut from elsewhere (see [`ConnectionInfo::cut`]).
pub struct TrackedListener {
    inner: TcpListener,
}

impl TrackedListener {
    pub fn new(inner: TcpListener) -> Self {
        TrackedListener { inner }
    }
}

impl Listener for TrackedListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TrackedStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    // Events are small and latency matters more than packet count.
                    let _ = stream.set_nodelay(true);
                    let cut = Arc::new(CutHandle {
                        fd: Mutex::new(Some(stream.as_raw_fd())),
                    });
                    return (TrackedStream { inner: stream, cut }, peer);
                }
                Err(e) if is_per_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors or similar: wait rather than spin.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Cuts one TCP connection, at most while it is open.
#[derive(Debug)]
struct CutHandle {
    /// `None` once the connection is closed: the descriptor may then belong to another.
    fd: Mutex<Option<RawFd>>,
}

impl CutHandle {
    fn cut(&self) -> bool {
        let fd = self.fd.lock().unwrap();
        let Some(fd) = *fd else { return false };
        // SAFETY: `fd` is Some only while the TrackedStream owning the descriptor is alive;
        // its Drop takes this same lock and clears it before the descriptor is closed.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        socket2::SockRef::from(&fd)
            .shutdown(std::net::Shutdown::Both)
            .is_ok()
    }
}

/// A TCP stream that clears its [`CutHandle`] before it closes.
pub struct TrackedStream {
    inner: TcpStream,
    cut: Arc<CutHandle>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        *self.cut.fd.lock().unwrap() = None;
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
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
/// connection: axum puts it in the request extensions as `ConnectInfo<ConnectionInfo>`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    cut: Arc<CutHandle>,
}

impl ConnectionInfo {
    /// Shuts the connection down in both directions, waking whoever reads or writes it.
    /// Returns false when it was already closed.
    pub fn cut(&self) -> bool {
        self.cut.cut()
    }

    pub fn is_open(&self) -> bool {
        self.cut.fd.lock().unwrap().is_some()
    }
}

impl Connected<IncomingStream<'_, TrackedListener>> for ConnectionInfo {
    fn connect_info(stream: IncomingStream<'_, TrackedListener>) -> Self {
        ConnectionInfo {
            peer: *stream.remote_addr(),
            cut: stream.io().cut.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn cut_wakes_a_blocked_writer_and_the_peer_sees_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = TrackedListener::new(listener);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().unwrap());
        let cut = ConnectionInfo {
            peer,
            cut: server.cut.clone(),
        };
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
    }
}
