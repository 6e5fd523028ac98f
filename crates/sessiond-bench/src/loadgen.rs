//! A closed-loop HTTP/1.1 load generator on hyper's client connections.
//!
//! C keep-alive connections each send one request, wait for the whole response, record its
//! latency, and send the next, until the deadline. Every request carries the same headers and
//! one of the pre-built items, chosen at random: a JSON body `POST`ed with
//! `Authorization: Bearer` (sessiond), or the value of the `Cookie` header of a `GET` (the
//! cookie-session peers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::stats::{self, Latencies};

/// Sessions created concurrently over HTTP while setting up, at most.
pub const CREATE_CONNECTIONS: usize = 64;

/// The sending half of one HTTP/1.1 connection.
pub type Sender = SendRequest<Full<Bytes>>;

/// Opens a keep-alive HTTP/1.1 connection (no Nagle) and drives it on the current runtime.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake failed")?;
    tokio::spawn(async move {
        // The connection ends when its sender is dropped; an error then is of no interest.
        let _ = conn.await;
    });
    Ok(sender)
}

/// What every request of a run carries.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The request path.
    pub path: Uri,
    /// `Host`.
    pub host: HeaderValue,
    /// `Authorization`, if any.
    pub authorization: Option<HeaderValue>,
    /// What each request's item is.
    pub item: Item,
}

/// What the per-request item of a [`Target`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A JSON body, `POST`ed.
    JsonBody,
    /// The value of the `Cookie` header of a `GET` without a body.
    Cookie,
}

impl Target {
    /// A target at `addr`, with `path`, authorized by the API key `key`, each request a `POST`
    /// of a JSON body.
    pub fn new(addr: SocketAddr, path: &str, key: &str) -> anyhow::Result<Self> {
        let mut t = Self::anonymous(addr, path, Item::JsonBody)?;
        t.authorization = Some(
            HeaderValue::from_str(&format!("Bearer {key}"))
                .context("the API key is not a valid header value")?,
        );
        Ok(t)
    }

    /// A target at `addr`, with `path`, without `Authorization`.
    pub fn anonymous(addr: SocketAddr, path: &str, item: Item) -> anyhow::Result<Self> {
        Ok(Self {
            addr,
            path: path
                .parse()
                .with_context(|| format!("bad request path {path}"))?,
            host: HeaderValue::from_str(&addr.to_string())?,
            authorization: None,
            item,
        })
    }

    /// The request carrying `item`: a `POST` of it as a JSON body, or a `GET` with it as the
    /// `Cookie` header.
    pub fn request(&self, item: Bytes) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = match self.item {
            Item::JsonBody => {
                let mut req = Request::new(Full::new(item));
                *req.method_mut() = Method::POST;
                req.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                req
            }
            Item::Cookie => {
                let cookie = HeaderValue::from_maybe_shared(item)
                    .context("a cookie is not a valid header value")?;
                let mut req = Request::new(Full::new(Bytes::new()));
                req.headers_mut().insert(COOKIE, cookie);
                req
            }
        };
        *req.uri_mut() = self.path.clone();
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        if let Some(a) = &self.authorization {
            h.insert(AUTHORIZATION, a.clone());
        }
        Ok(req)
    }
}

/// Sends one request and reads the whole response.
pub(crate) async fn exchange(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), hyper::Error> {
    sender.ready().await?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// The outcome of a load run.
#[derive(Debug)]
pub struct LoadReport {
    /// Responses received.
    pub requests: u64,
    /// Responses whose status was not 200 (must be 0).
    pub non_200: u64,
    /// Requests that failed without a response (connection errors; must be 0).
    pub errors: u64,
    /// Wall time from the first request to the last response.
    pub elapsed: Duration,
    /// Latency of every response: request sent to response body read.
    pub histogram: Histogram<u64>,
}

impl LoadReport {
    /// Responses per second.
    pub fn throughput(&self) -> f64 {
        stats::rate(self.requests, self.elapsed)
    }

    /// One line of details.
    pub fn line(&self) -> String {
        format!(
            "{} requests in {:.2} s = {} req/s; {}; non-200: {}, errors: {}",
            self.requests,
            self.elapsed.as_secs_f64(),
            stats::fmt_rate(self.throughput()),
            Latencies::of(&self.histogram).line(),
            self.non_200,
            self.errors,
        )
    }
}

/// What one connection did.
pub(crate) struct ConnResult {
    pub(crate) requests: u64,
    pub(crate) non_200: u64,
    pub(crate) errors: u64,
    pub(crate) histogram: Histogram<u64>,
}

impl ConnResult {
    /// Nothing done yet.
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            requests: 0,
            non_200: 0,
            errors: 0,
            histogram: stats::new_histogram()?,
        })
    }
}

/// Waits for every connection of a run and adds up what they did; `elapsed` is the time from
/// `measured_from` to the last connection's end.
pub(crate) async fn gather(
    mut tasks: tokio::task::JoinSet<anyhow::Result<ConnResult>>,
    measured_from: Instant,
) -> anyhow::Result<LoadReport> {
    let mut report = LoadReport {
        requests: 0,
        non_200: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        histogram: stats::new_histogram()?,
    };
    while let Some(done) = tasks.join_next().await {
        let c = done.context("a load connection task failed")??;
        report.requests += c.requests;
        report.non_200 += c.non_200;
        report.errors += c.errors;
        stats::merge(&mut report.histogram, &c.histogram)?;
    }
    report.elapsed = measured_from.elapsed();
    Ok(report)
}

/// Runs the closed loop: `connections` connections for `duration`, items picked at random.
pub async fn run(
    target: &Arc<Target>,
    bodies: &Arc<Vec<Bytes>>,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(connections > 0, "--connections must be at least 1");
    anyhow::ensure!(!bodies.is_empty(), "no request items");
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(target.addr).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for sender in senders {
        tasks.spawn(connection_loop(
            target.clone(),
            bodies.clone(),
            sender,
            deadline,
        ));
    }
    gather(tasks, start).await
}

/// One connection's closed loop. A failed exchange is counted and the connection reopened.
async fn connection_loop(
    target: Arc<Target>,
    bodies: Arc<Vec<Bytes>>,
    mut sender: Sender,
    deadline: Instant,
) -> anyhow::Result<ConnResult> {
    let mut rng = fastrand::Rng::new();
    let mut out = ConnResult::new()?;
    while Instant::now() < deadline {
        let Some(body) = bodies.get(rng.usize(..bodies.len())) else {
            break;
        };
        let req = target.request(body.clone())?;
        let sent = Instant::now();
        match exchange(&mut sender, req).await {
            Ok((status, _)) => {
                stats::record(&mut out.histogram, sent.elapsed());
                out.requests += 1;
                if status != StatusCode::OK {
                    out.non_200 += 1;
                }
            }
            Err(_) => {
                out.errors += 1;
                sender = connect(target.addr).await?;
            }
        }
    }
    Ok(out)
}

/// Creates `n` sessions with `POST /v1/sessions` (one user each) over up to
/// [`CREATE_CONNECTIONS`] connections, and answers their tokens with the measurements of the
/// creates (each one durable before its response).
pub async fn create_sessions(
    addr: SocketAddr,
    key: &str,
    n: usize,
    connections: usize,
) -> anyhow::Result<(Vec<String>, LoadReport)> {
    let target = Arc::new(Target::new(addr, "/v1/sessions", key)?);
    let workers = connections.clamp(1, CREATE_CONNECTIONS).min(n.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for w in 0..workers {
        let target = target.clone();
        tasks.spawn(async move {
            let mut sender = connect(target.addr).await?;
            let mut tokens = Vec::new();
            let mut histogram = stats::new_histogram()?;
            for i in (w..n).step_by(workers) {
                let body = serde_json::to_vec(&serde_json::json!({
                    "user_id": format!("bench-user-{i}"),
                }))?;
                let sent = Instant::now();
                let (status, body) = exchange(&mut sender, target.request(body.into())?)
                    .await
                    .context("POST /v1/sessions failed")?;
                stats::record(&mut histogram, sent.elapsed());
                anyhow::ensure!(
                    status == StatusCode::CREATED,
                    "POST /v1/sessions answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                let created: serde_json::Value = serde_json::from_slice(&body)?;
                let token = created
                    .get("token")
                    .and_then(serde_json::Value::as_str)
                    .context("the create response has no token")?;
                tokens.push(token.to_owned());
            }
            anyhow::Ok((tokens, histogram))
        });
    }
    let mut tokens = Vec::with_capacity(n);
    let mut histogram = stats::new_histogram()?;
    while let Some(done) = tasks.join_next().await {
        let (t, h) = done.context("a create task failed")??;
        tokens.extend(t);
        stats::merge(&mut histogram, &h)?;
    }
    let report = LoadReport {
        requests: tokens.len() as u64,
        non_200: 0,
        errors: 0,
        elapsed: start.elapsed(),
        histogram,
    };
    Ok((tokens, report))
}
