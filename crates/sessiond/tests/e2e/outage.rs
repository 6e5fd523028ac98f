//! Store outages: verify fails closed with 503, /readyz turns 503, and the node recovers by
//! itself when the store comes back. The store's connection path runs through a TCP proxy
//! that the test cuts (connections reset), stalls (a black hole: nothing passes, nothing
//! closes, so only the node's own timeouts end a request) and restores.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::harness::{BACKEND, Backend, Server, postgres_url, redis_url};

/// What a [`Proxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards both ways.
    Up,
    /// Every connection dropped, new ones closed at once: the peer sees resets and EOFs.
    Cut,
    /// A black hole: connections stay open but nothing passes either way, like a dropped
    /// network path. Only the peer's own timeouts end a request.
    Stalled,
}

/// A TCP forwarder that can be cut (every connection dropped, new ones refused), stalled
/// (connections held open, nothing forwarded) and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: tokio::sync::watch::Sender<Mode>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = tokio::sync::watch::Sender::new(Mode::Up);
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (mode2, conns2) = (mode.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = mode2.subscribe();
                if *rx.borrow() == Mode::Cut {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    // A connection made during a stall hangs until the path is back.
                    if !wait_until_flowing(&mut rx).await {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    tokio::select! {
                        () = pump(in_r, out_w, rx.clone()) => {}
                        () = pump(out_r, in_w, rx) => {}
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Self {
            addr,
            mode,
            conns,
            accept,
        }
    }

    /// Drops every connection and closes new ones at once.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Holds every connection, and new ones, open without forwarding a byte.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Forwards again: new connections, and those held open through a stall.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Up);
    }
}

/// Waits while the proxy is stalled; answers whether traffic flows again (false once cut).
async fn wait_until_flowing(rx: &mut tokio::sync::watch::Receiver<Mode>) -> bool {
    matches!(
        rx.wait_for(|m| *m != Mode::Stalled).await.as_deref(),
        Ok(Mode::Up)
    )
}

/// Copies one direction of a connection; while stalled, reads nothing and writes nothing, so
/// bytes wait as on a dead network path and flow on once it is restored.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::watch::Receiver<Mode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 16 * 1024];
    loop {
        if !wait_until_flowing(&mut rx).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Stalled while waiting for bytes: wait for the path before reading.
            _ = rx.wait_for(|m| *m == Mode::Stalled) => continue,
        };
        if !wait_until_flowing(&mut rx).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

async fn ready(s: &Server) -> StatusCode {
    s.raw(Method::GET, "/readyz").send().await.unwrap().status()
}

async fn eventually(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// A store whose connection path runs through a [`Proxy`].
struct Proxied {
    proxy: Proxy,
    url: String,
    backend: Backend,
}

impl Proxied {
    /// The local PostgreSQL, or Redis, behind a proxy.
    async fn start(backend: Backend) -> Self {
        let url = match backend {
            Backend::Postgres => postgres_url(),
            Backend::Redis => redis_url(),
            other => panic!("no proxied store for {other:?}"),
        };
        let (_, rest) = url.split_once("://").unwrap();
        let authority = rest.split('/').next().unwrap();
        let host_port = authority.rsplit('@').next().unwrap();
        let target = tokio::net::lookup_host(host_port)
            .await
            .unwrap_or_else(|e| panic!("the store's host:port {host_port}: {e}"))
            .next()
            .unwrap();
        let proxy = Proxy::start(target).await;
        let url = url.replacen(host_port, &proxy.addr.to_string(), 1);
        assert!(
            url.contains(&proxy.addr.to_string()),
            "the proxy sits on the store's path: {url}"
        );
        Self {
            proxy,
            url,
            backend,
        }
    }

    /// A node on the proxied store, with extra environment.
    async fn server(&self, env: &[(&str, &str)]) -> Server {
        let mut env = env.to_vec();
        env.push(("SESSIOND_STORE", &self.url));
        // The bursts come from one address, standing for many clients.
        env.push(("SESSIOND_MAX_CONNECTIONS_PER_PEER", "10000"));
        BACKEND
            .scope(self.backend, async { Server::start_with(&env) })
            .await
    }
}

async fn outage_fails_closed_and_recovers(backend: Backend) {
    let store = Proxied::start(backend).await;
    let s = store.server(&[]).await;
    let (token, handle, _) = s.login("outage").await;
    assert_eq!(s.verify(&token).await.status, StatusCode::OK);
    assert_eq!(ready(&s).await, StatusCode::OK);

    store.proxy.cut();
    // The session cache stops answering as soon as its feed connection breaks (with the cut);
    // from then on, never a 200 for a token that cannot be checked.
    eventually(
        "the cache notices the cut",
        Duration::from_secs(5),
        async || s.verify(&token).await.status == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    // A clear 503, and quickly.
    let started = Instant::now();
    for _ in 0..5 {
        s.verify(&token).await.problem(503, "store_unavailable");
    }
    let per_request = started.elapsed() / 5;
    s.post("/v1/sessions", json!({"user_id": "outage"}))
        .await
        .problem(503, "store_unavailable");
    s.call(Method::DELETE, &format!("/v1/sessions/{handle}"), None)
        .await
        .problem(503, "store_unavailable");
    assert_eq!(ready(&s).await, StatusCode::SERVICE_UNAVAILABLE);
    eprintln!("{backend:?}: 503 after {per_request:?} per verify while the store was cut");

    store.proxy.restore();
    let took = eventually("recovery", Duration::from_secs(10), async || {
        s.verify(&token).await.status == StatusCode::OK
    })
    .await;
    assert_eq!(ready(&s).await, StatusCode::OK);
    eprintln!("{backend:?}: recovered {took:?} after the store came back");
    let (t2, _, _) = s.login("outage").await;
    assert_eq!(s.verify(&t2).await.status, StatusCode::OK);
}

/// A request that must end: a node that waits on a black-holed store without a timeout of its
/// own would hang forever, so the test fails instead (the bound is far above any store timeout).
async fn answers<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f.into_future())
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer while the store was stalled"))
}

/// Concurrent verifies sent while the store is stalled.
const STALL_BURST: usize = 200;

async fn stalled_store_fails_closed_and_recovers(backend: Backend) {
    let store = Proxied::start(backend).await;
    // A store timeout of 1 s instead of the default 2 s: the configured value is the one used.
    let s = store.server(&[("SESSIOND_STORE_TIMEOUT_MS", "1000")]).await;
    let (token, handle, _) = s.login("stall").await;
    let (other, other_handle, _) = s.login("stall").await;
    assert_eq!(s.verify(&token).await.status, StatusCode::OK);

    // Packets vanish: no reset, no EOF; only the node's own timeouts can end a request.
    store.proxy.stall();
    // The session cache stops answering once its feed misses three one-second heartbeats;
    // from then on, never a 200 for a token that cannot be checked.
    let silent = eventually(
        "the cache notices the stall",
        Duration::from_secs(10),
        async || {
            answers("verify", s.verify(&token)).await.status == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;
    eprintln!("{backend:?}: the cache stopped answering {silent:?} into the stall");
    let started = Instant::now();
    for _ in 0..3 {
        answers("verify", s.verify(&token))
            .await
            .problem(503, "store_unavailable");
    }
    let per_request = started.elapsed() / 3;
    assert!(
        per_request < Duration::from_millis(1900),
        "the configured 1 s store timeout was not used: {per_request:?} per verify"
    );
    answers(
        "create",
        s.post("/v1/sessions", json!({"user_id": "stall"})),
    )
    .await
    .problem(503, "store_unavailable");
    answers(
        "revoke",
        s.call(
            Method::DELETE,
            &format!("/v1/sessions/{other_handle}"),
            None,
        ),
    )
    .await
    .problem(503, "store_unavailable");
    assert_eq!(
        answers("readyz", ready(&s)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    eprintln!("{backend:?}: 503 after {per_request:?} per verify while the store was stalled");

    // Under load: many verifies at once against the stalled store all end in a 503, without
    // the process piling up threads or memory.
    let (threads_before, rss_before) = s.threads_and_rss();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..STALL_BURST {
        let req = s
            .raw(Method::POST, "/v1/sessions/verify")
            .bearer_auth(&s.key)
            .json(&json!({"token": token}));
        burst.spawn(async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body["code"].as_str().unwrap_or_default().to_owned())
        });
    }
    let mut peak = (threads_before, rss_before);
    while !burst.is_empty() {
        if let Ok(Some(done)) =
            tokio::time::timeout(Duration::from_millis(100), burst.join_next()).await
        {
            let (status, code) = done.unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{code}");
            assert!(
                code == "store_unavailable" || code == "overloaded",
                "{code}"
            );
        }
        let (t, r) = s.threads_and_rss();
        peak = (peak.0.max(t), peak.1.max(r));
    }
    eprintln!(
        "{backend:?}: {STALL_BURST} concurrent verifies on a stalled store: threads {threads_before} \
         -> peak {}, RSS {} KiB -> peak {} KiB",
        peak.0, rss_before, peak.1
    );
    assert!(peak.0 <= threads_before + 4, "threads piled up: {peak:?}");
    assert!(peak.1 < rss_before * 2, "memory piled up: {peak:?}");

    // The held bytes flow on: answers to requests that timed out arrive late.
    store.proxy.restore();
    let took = eventually("recovery", Duration::from_secs(20), async || {
        s.verify(&token).await.status == StatusCode::OK
    })
    .await;
    eprintln!("{backend:?}: recovered {took:?} after the stall ended");
    assert_eq!(ready(&s).await, StatusCode::OK);
    // A late answer is never taken for the answer to a later request.
    let (fresh, fresh_handle, _) = s.login("stall").await;
    for _ in 0..5 {
        for (t, h) in [(&token, &handle), (&fresh, &fresh_handle)] {
            let r = s.verify(t).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert_eq!(r.body["session"]["handle"], h.as_str(), "{}", r.text);
        }
    }
    // The revoke answered 503, so it may or may not have landed; the node must say which.
    let r = s.verify(&other).await;
    if r.status == StatusCode::OK {
        assert_eq!(r.body["session"]["handle"], other_handle.as_str());
    } else {
        r.problem(401, "session_revoked");
    }
}

async fn a_node_starts_while_its_store_is_down_and_becomes_ready(backend: Backend) {
    let store = Proxied::start(backend).await;
    store.proxy.cut();
    // Without migrations at start, a node needs nothing from the store to start serving.
    let s = store
        .server(&[("SESSIOND_MIGRATE_ON_START", "false")])
        .await;
    assert_eq!(ready(&s).await, StatusCode::SERVICE_UNAVAILABLE);
    let h = s.raw(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK, "alive, though not ready");
    s.verify("sdt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await
        .problem(503, "store_unavailable");
    // The token keyring lives in the store too: unavailable, never made up.
    s.get("/.well-known/jwks.json")
        .await
        .problem(503, "store_unavailable");
    store.proxy.restore();
    eventually("readiness", Duration::from_secs(10), async || {
        ready(&s).await == StatusCode::OK
    })
    .await;
    if backend == Backend::Redis {
        // Redis needs no migrations: the node is fully usable once ready, the keyring included.
        let (t, _, _) = s.login("late").await;
        assert_eq!(s.verify(&t).await.status, StatusCode::OK);
        let jwks = s.get("/.well-known/jwks.json").await;
        assert_eq!(jwks.status, StatusCode::OK, "{}", jwks.text);
        assert_eq!(jwks.body["keys"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_closed_and_recovers() {
    outage_fails_closed_and_recovers(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers() {
    outage_fails_closed_and_recovers(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_while_its_store_is_down_and_becomes_ready_when_it_returns() {
    a_node_starts_while_its_store_is_down_and_becomes_ready(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_while_redis_is_down_and_becomes_ready_when_it_returns() {
    a_node_starts_while_its_store_is_down_and_becomes_ready(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_postgres_fails_closed_and_recovers() {
    stalled_store_fails_closed_and_recovers(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_fails_closed_and_recovers() {
    stalled_store_fails_closed_and_recovers(Backend::Redis).await;
}
