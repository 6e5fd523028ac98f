//! Serving connections: the accept loop, its caps, and each connection's protocols and timeouts.
//!
//! - **Caps.** A listener may hold at most `max_connections` connections, and at most
//!   `max_connections_per_peer` from one peer address. A connection past either cap is
//!   accepted and closed at once (shed), never left in the kernel's backlog, where it would
//!   wait behind whoever holds the slots.
//! - **Header-read timeout.** A connection must deliver a complete request head within
//!   `header_read_timeout` of being accepted (TLS handshake included). On HTTP/1.1, hyper's
//!   header-read timer also starts again whenever a keep-alive connection waits for its next
//!   request, and runs until that request's head is complete; so an HTTP/1.1 connection that
//!   is idle, or sends a head slowly, is closed after `header_read_timeout` as well.
//! - **Idle timeout.** A connection with no request in progress and no bytes read or written
//!   for `idle_timeout` is closed (HTTP/2, where hyper has no header timer, and HTTP/1.1 when
//!   the idle timeout is the shorter).
//! - **Header buffer.** At most `max_header_bytes` of request head are buffered (HTTP/1.1
//!   answers `431` past it; HTTP/2 caps the header list the same).
//! - **Protocols.** HTTP/1.1; HTTP/2 through ALPN on TLS; cleartext HTTP/2 with prior
//!   knowledge only when configured.
//!
//! Handlers can extract `ConnectInfo<SocketAddr>` (the peer's address) on every connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::metrics::Metrics;

/// How a listener serves its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Longest time from accepting a connection (or from the end of a response on a
    /// keep-alive HTTP/1.1 connection) to a complete request head.
    pub header_read_timeout: Duration,
    /// Longest time a connection may stay open with no request in progress and no traffic.
    pub idle_timeout: Duration,
    /// Largest request head buffered (at least 8192).
    pub max_header_bytes: usize,
    /// Connections open at once (`None`: no cap).
    pub max_connections: Option<usize>,
    /// Connections open at once from one peer address (`None`: no cap).
    pub max_connections_per_peer: Option<usize>,
    /// Whether cleartext connections may speak HTTP/2 with prior knowledge.
    pub http2_cleartext: bool,
}

/// A listener with what it serves.
pub struct Endpoint {
    /// The bound listener.
    pub listener: TcpListener,
    /// The app.
    pub app: Router,
    /// Its limits.
    pub limits: ConnLimits,
    /// TLS, if on.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Where connection counts go (`None`: not counted).
    pub metrics: Option<Arc<Metrics>>,
}

/// Counts of open connections, in total and per peer address.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// The caps of one listener.
#[derive(Debug)]
struct Slots {
    counts: parking_lot::Mutex<Counts>,
    max: Option<usize>,
    max_per_peer: Option<usize>,
}

/// A connection's place under the caps, given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    peer: IpAddr,
    metrics: Option<Arc<Metrics>>,
}

impl Slots {
    /// Takes a slot for a connection from `peer`, or answers the cap it would pass.
    fn take(
        self: &Arc<Self>,
        peer: IpAddr,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Slot, &'static str> {
        let mut c = self.counts.lock();
        if self.max.is_some_and(|m| c.total >= m) {
            return Err("max_connections");
        }
        let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
        if self.max_per_peer.is_some_and(|m| mine >= m) {
            return Err("per_peer");
        }
        c.total += 1;
        c.per_peer.insert(peer, mine + 1);
        drop(c);
        if let Some(m) = &metrics {
            m.connections_open(1);
        }
        Ok(Slot {
            slots: self.clone(),
            peer,
            metrics,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
        drop(c);
        if let Some(m) = &self.metrics {
            m.connections_open(-1);
        }
    }
}

/// What a connection has done: when it last read or wrote, and its requests in progress.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds from `opened` to the last byte read or written.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether a complete request head has arrived.
    served: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn since_last(&self) -> Duration {
        self.opened
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A request in progress on a connection.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.served.store(true, Ordering::Relaxed);
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.touch();
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy)]
enum Expired {
    Header,
    Idle,
}

/// Completes when the connection is past its deadline: no request head within
/// `header_read_timeout` of being accepted, or idle for `idle_timeout`.
async fn watchdog(a: Arc<Activity>, limits: ConnLimits) -> Expired {
    let first = limits.header_read_timeout;
    loop {
        if !a.served.load(Ordering::Relaxed) {
            let age = a.opened.elapsed();
            if age >= first {
                return Expired::Header;
            }
            // Wake up in time for the idle rule too, should a request arrive meanwhile.
            tokio::time::sleep((first - age).min(limits.idle_timeout)).await;
            continue;
        }
        let quiet = a.since_last();
        if a.in_flight.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(limits.idle_timeout).await;
        } else if quiet >= limits.idle_timeout {
            return Expired::Idle;
        } else {
            tokio::time::sleep(limits.idle_timeout - quiet).await;
        }
    }
}

/// A stream that records its traffic in an [`Activity`].
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Which protocols a connection may speak.
#[derive(Debug, Clone, Copy)]
enum Protocols {
    Http1,
    Http2,
    Either,
}

fn builder(limits: &ConnLimits, protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(200);
    match protocols {
        Protocols::Http1 => b.http1_only(),
        Protocols::Http2 => b.http2_only(),
        Protocols::Either => b,
    }
}

/// Serves `endpoint` until `stop` turns true, then stops accepting and waits for its open
/// connections to finish their requests (the caller bounds the wait).
pub async fn serve(endpoint: Endpoint, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Endpoint {
        listener,
        app,
        limits,
        tls,
        metrics,
    } = endpoint;
    let slots = Arc::new(Slots {
        counts: parking_lot::Mutex::default(),
        max: limits.max_connections,
        max_per_peer: limits.max_connections_per_peer,
    });
    let builders = Arc::new((
        builder(&limits, Protocols::Http1),
        builder(&limits, Protocols::Http2),
        builder(&limits, Protocols::Either),
    ));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match slots.take(peer.ip(), metrics.clone()) {
            Ok(s) => s,
            Err(reason) => {
                if let Some(m) = &metrics {
                    m.connection_shed(reason);
                }
                tracing::debug!(%peer, reason, "connection shed");
                drop(stream);
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        tokio::spawn(connection(
            stream,
            peer,
            slot,
            app.clone(),
            limits,
            tls.clone(),
            builders.clone(),
            graceful.watcher(),
            metrics.clone(),
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    app: Router,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    builders: Arc<(
        auto::Builder<TokioExecutor>,
        auto::Builder<TokioExecutor>,
        auto::Builder<TokioExecutor>,
    )>,
    watcher: Watcher,
    metrics: Option<Arc<Metrics>>,
) {
    let _slot = slot;
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            let guard = InFlight::new(&activity);
            let app = app.clone();
            async move {
                let res = app.oneshot(req).await;
                drop(guard);
                res
            }
        })
    };
    let timed_out = |why: Expired| {
        let label = match why {
            Expired::Header => "header",
            Expired::Idle => "idle",
        };
        if let Some(m) = &metrics {
            m.connection_timed_out(label);
        }
        tracing::debug!(%peer, timeout = label, "connection closed by a timeout");
    };
    let result = match tls {
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io));
            let tls = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    timed_out(Expired::Header);
                    return;
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let b = if h2 { &builders.1 } else { &builders.0 };
            let conn = watcher.watch(b.serve_connection(TokioIo::new(tls), service).into_owned());
            tokio::select! {
                r = conn => r,
                why = watchdog(activity, limits) => { timed_out(why); return; }
            }
        }
        None => {
            let b = if limits.http2_cleartext {
                &builders.2
            } else {
                &builders.0
            };
            let conn = watcher.watch(b.serve_connection(TokioIo::new(io), service).into_owned());
            tokio::select! {
                r = conn => r,
                why = watchdog(activity, limits) => { timed_out(why); return; }
            }
        }
    };
    if let Err(e) = result {
        let header_timeout = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if header_timeout {
            timed_out(Expired::Header);
        } else {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_connections: Some(3),
            max_connections_per_peer: Some(2),
            http2_cleartext: false,
        }
    }

    #[test]
    fn slots_cap_per_peer_and_in_total_and_come_back() {
        let slots = Arc::new(Slots {
            counts: parking_lot::Mutex::default(),
            max: Some(3),
            max_per_peer: Some(2),
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = slots.take(a, None).unwrap();
        let _a2 = slots.take(a, None).unwrap();
        assert_eq!(slots.take(a, None).err(), Some("per_peer"));
        let _b1 = slots.take(b, None).unwrap();
        assert_eq!(slots.take(b, None).err(), Some("max_connections"));
        drop(a1);
        assert!(slots.take(b, None).is_ok());
    }

    #[tokio::test]
    async fn handlers_see_the_peer_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(
            Endpoint {
                listener,
                app,
                limits: limits(),
                tls: None,
                metrics: None,
            },
            stop_rx,
        ));
        let mut c = TcpStream::connect(addr).await.unwrap();
        let local = c.local_addr().unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut c,
            b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut c, &mut out)
            .await
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with(&local.to_string()), "{out}");
        let _ = stop_tx.send(true);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
    }
}
