//! Load limits, so that overload turns into fast `503`s instead of a collapse:
//!
//! - a cap on requests in progress: past it, a request is refused at once with `503 overloaded`
//!   and `Retry-After`, without queueing (a queue only converts overload into latency);
//! - a request timeout: a request still running after it is answered `503 request_timeout`;
//! - a cap on open connections: past it, the server stops accepting until one closes (new
//!   connections wait in the kernel's backlog), so file descriptors and per-connection memory
//!   stay bounded.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{BoxError, ServiceBuilder};

use crate::error::ApiError;

/// The limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in progress at once, over all routes it applies to.
    pub max_concurrent_requests: usize,
    /// Longest time a request may take.
    pub request_timeout: Duration,
}

/// Wraps every route of `router` in the concurrency cap and the request timeout.
pub fn apply<S>(router: Router<S>, limits: Limits) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(refusal))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.max_concurrent_requests,
            ))
            .timeout(limits.request_timeout),
    )
}

async fn refusal(e: BoxError) -> Response {
    if e.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded.into_response()
    } else if e.is::<tower::timeout::error::Elapsed>() {
        ApiError::RequestTimeout.into_response()
    } else {
        // The layers above produce no other error; answer as an internal error if one appears.
        tracing::error!(error = %e, "request failed in a load-limit layer");
        ApiError::Core(sessiond_core::CoreError::Internal(
            "load-limit layer".into(),
        ))
        .into_response()
    }
}

/// A TCP listener that keeps at most `max` connections open.
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl LimitedListener {
    /// Accepts from `inner`, at most `max` connections open at once.
    pub fn new(inner: TcpListener, max: usize) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max)),
        }
    }
}

impl Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so acquiring only waits; if it ever failed, accepting
        // without a slot is the lesser evil than stopping the server.
        let slot = self.slots.clone().acquire_owned().await.ok();
        let (stream, addr) = Listener::accept(&mut self.inner).await;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        (
            LimitedStream {
                stream,
                _slot: slot,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection holding its slot until it is dropped.
pub struct LimitedStream {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        "done"
    }

    async fn body_of(res: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_timeout_is_a_503_request_timeout() {
        let app = apply(
            Router::new().route("/slow", get(slow)),
            Limits {
                max_concurrent_requests: 8,
                request_timeout: Duration::from_millis(500),
            },
        );
        let res = app
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_of(res).await["code"], "request_timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_concurrency_cap_requests_are_refused_at_once_across_routes() {
        let app = apply(
            Router::new()
                .route("/slow", get(slow))
                .route("/fast", get(|| async { "ok" })),
            Limits {
                max_concurrent_requests: 2,
                request_timeout: Duration::from_secs(7200),
            },
        );
        // Two slow requests hold both slots.
        let held: Vec<_> = (0..2)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    app.oneshot(Request::get("/slow").body(Body::empty()).unwrap())
                        .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A third, on another route, is refused without waiting.
        let res = app
            .clone()
            .oneshot(Request::get("/fast").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            res.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_eq!(body_of(res).await["code"], "overloaded");
        // Once the slow ones are gone, the route serves again.
        for h in held {
            h.abort();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let res = app
            .oneshot(Request::get("/fast").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn the_listener_holds_connections_at_the_cap() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = LimitedListener::new(tcp, 1);
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (first, _) = listener.accept().await;
        let _c2 = TcpStream::connect(addr).await.unwrap();
        // The second connection waits in the backlog while the first is open...
        let waiting = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(waiting.is_err(), "accepted past the cap");
        // ...and is accepted once the first closes.
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(second.is_ok(), "not accepted after a slot freed");
    }
}
