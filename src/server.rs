//! The HTTP server: accepts connections within the limits of [`crate::net`], serves each
//! with HTTP/1.1 (and its upgrade to WebSocket), and tells the connection registry when
//! each request starts and ends, so that idle connections can be told from busy ones.
//!
//! Only HTTP/1.1: Socket.IO clients speak it, and a reverse proxy in front speaks it to
//! its upstream. Detecting HTTP/2 would mean waiting for a silent connection's first
//! bytes outside any timeout.

use std::convert::Infallible;
use std::future::Future;
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::net::{Connection, ConnectionInfo, Connections};
use crate::telemetry::metric;

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting, lets each
/// connection finish its request in progress, and returns once all have closed.
pub async fn serve(
    listener: TcpListener,
    connections: Arc<Connections>,
    router: Router,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut out_of_descriptors = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                out_of_descriptors = false;
                accepted
            }
            Err(e) if is_per_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: make room if anything is
                // idle, else wait rather than spin.
                if !out_of_descriptors {
                    out_of_descriptors = true;
                    tracing::error!(error = %e, open = connections.len(), "accepting a connection failed");
                }
                metrics::counter!(metric::CONNECTIONS_REFUSED).increment(1);
                if !connections.evict_one() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let Some(stream) = connections.accept(stream, peer) else {
            continue;
        };
        let connection = stream.connection().clone();
        let service = RequestService {
            router: router.clone(),
            info: ConnectionInfo::new(connection.clone()),
            connection,
            body_timeout: connections.limits().request_body_timeout,
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                // The reaper of `net` bounds the wait for a request head.
                .header_read_timeout(None)
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |r| service.clone().call(r)),
                )
                .with_upgrades();
            tokio::pin!(served);
            let result = tokio::select! {
                result = &mut served => result,
                _ = shutdown.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = result {
                tracing::trace!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// One connection's request handler: the router, with the connection's info in the
/// request and its phase reported to the registry.
#[derive(Clone)]
struct RequestService {
    router: Router,
    info: ConnectionInfo,
    connection: Arc<Connection>,
    body_timeout: Duration,
}

impl RequestService {
    async fn call(self, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let mut phase = RequestPhase::start(self.connection);
        let mut request = request.map(|body| Body::new(DeadlineBody::new(body, self.body_timeout)));
        request.extensions_mut().insert(ConnectInfo(self.info));
        let response = self.router.oneshot(request).await?;
        phase.upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        Ok(response.map(|body| Body::new(ResponseBody { body, _phase: phase })))
    }
}

/// A request in progress on its connection, until its response body is dropped (written
/// out, or abandoned with the connection).
struct RequestPhase {
    connection: Arc<Connection>,
    upgraded: bool,
}

impl RequestPhase {
    fn start(connection: Arc<Connection>) -> RequestPhase {
        connection.request_started();
        RequestPhase {
            connection,
            upgraded: false,
        }
    }
}

impl Drop for RequestPhase {
    fn drop(&mut self) {
        self.connection.request_finished(self.upgraded);
    }
}

pin_project_lite::pin_project! {
    /// The response body, carrying the request's phase until hyper drops it.
    struct ResponseBody {
        #[pin]
        body: Body,
        _phase: RequestPhase,
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request body's deadline passed before its end arrived.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

pin_project_lite::pin_project! {
    /// A request body that must arrive whole within a deadline: a client that trickles
    /// its body cannot hold a connection and its request handler for ever.
    pub struct DeadlineBody<B> {
        #[pin]
        body: B,
        #[pin]
        deadline: tokio::time::Sleep,
        timeout: Duration,
    }
}

impl<B> DeadlineBody<B> {
    pub fn new(body: B, timeout: Duration) -> Self {
        DeadlineBody {
            body,
            deadline: tokio::time::sleep(timeout),
            timeout,
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.deadline.poll(cx).is_ready() {
            metrics::counter!(metric::CONNECTIONS_CLOSED, "reason" => "body_timeout").increment(1);
            return Poll::Ready(Some(Err(BodyTimeout(*this.timeout).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
