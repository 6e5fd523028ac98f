//! The soak scenario: mixed traffic against a real `sessiond` process for a long, bounded time,
//! sampling the process's resident memory, open file descriptors and request latency, then an
//! overload burst past the server's concurrency cap.
//!
//! Each connection loops over a session's life: create, verify, rotate, verify, and logout,
//! except that one session in ten is abandoned and left to its idle timeout (5 s here), to be
//! swept and purged (retention 1 s). So the live set stays bounded and a steady state exists:
//! memory and descriptors after warm-up must not grow.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use reqwest::StatusCode;
use serde_json::json;
use sessiond_core::token::TokenFormat;
use sessiond_server::config::Config;

use crate::cleanup::Cleanup;
use crate::crash::{Api, start, store_env};
use crate::http::Store;
use crate::stats::{self, fmt_duration};

/// Settings of the soak scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `sessiond` binary.
    pub bin: PathBuf,
    /// The store.
    pub store: Store,
    /// How long the mixed traffic runs.
    pub duration: Duration,
    /// Time between samples.
    pub sample: Duration,
    /// Concurrent connections of the mixed traffic.
    pub connections: usize,
    /// The server's cap of requests in progress.
    pub max_concurrent_requests: usize,
    /// How long the overload burst lasts (zero: none).
    pub overload: Duration,
    /// Concurrent connections of the overload burst.
    pub overload_connections: usize,
}

/// What one sample saw.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Time since the start.
    pub at: Duration,
    /// Resident set size of the server, in KiB.
    pub rss_kib: u64,
    /// Open file descriptors of the server.
    pub fds: u64,
    /// Requests answered in the interval.
    pub requests: u64,
    /// Request rate in the interval.
    pub rate: f64,
    /// Median latency in the interval.
    pub p50: Duration,
    /// 99th percentile latency in the interval.
    pub p99: Duration,
    /// Requests answered other than expected (or not at all) in the interval.
    pub errors: u64,
}

/// What the overload burst saw.
#[derive(Debug, Clone, Default)]
pub struct Overload {
    /// Creates answered 201.
    pub served: u64,
    /// Requests refused with `503 overloaded`.
    pub refused: u64,
    /// Any other answer, or none.
    pub errors: u64,
    /// 99th percentile latency of the refusals.
    pub refused_p99: Duration,
    /// 99th percentile latency of the served requests.
    pub served_p99: Duration,
    /// Whether `/healthz` answered during the burst.
    pub healthy: bool,
}

/// The outcome.
#[derive(Debug)]
pub struct Report {
    /// The settings it ran with.
    pub settings: Settings,
    /// The samples, in time order.
    pub samples: Vec<Sample>,
    /// The overload burst, when one ran.
    pub overload: Option<Overload>,
}

impl Report {
    /// The sample that ends the warm-up: the first at or after a quarter of the run.
    fn warm(&self) -> Option<&Sample> {
        let quarter = self.settings.duration / 4;
        self.samples
            .iter()
            .find(|s| s.at >= quarter)
            .or(self.samples.first())
    }

    /// Resident memory at the end over resident memory after warm-up.
    pub fn rss_growth(&self) -> f64 {
        match (self.warm(), self.samples.last()) {
            (Some(w), Some(l)) if w.rss_kib > 0 => l.rss_kib as f64 / w.rss_kib as f64,
            _ => 1.0,
        }
    }

    /// Open descriptors at the end minus after warm-up.
    pub fn fd_growth(&self) -> i64 {
        match (self.warm(), self.samples.last()) {
            (Some(w), Some(l)) => l.fds as i64 - w.fds as i64,
            _ => 0,
        }
    }

    /// Requests of the mixed traffic answered other than expected.
    pub fn errors(&self) -> u64 {
        self.samples.iter().map(|s| s.errors).sum()
    }

    /// Prints the report: one line per sample, then the verdict.
    pub fn print(&self) {
        let s = &self.settings;
        println!(
            "soak: sessiond on the {} store, {} connections, {:.0} s, a sample every {:.0} s",
            s.store.name(),
            s.connections,
            s.duration.as_secs_f64(),
            s.sample.as_secs_f64()
        );
        println!();
        println!("| t (s) | RSS (MiB) | open fds | req/s | p50 | p99 | errors |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for x in &self.samples {
            println!(
                "| {:.0} | {:.1} | {} | {} | {} | {} | {} |",
                x.at.as_secs_f64(),
                x.rss_kib as f64 / 1024.0,
                x.fds,
                stats::fmt_rate(x.rate),
                fmt_duration(x.p50),
                fmt_duration(x.p99),
                x.errors
            );
        }
        let total: u64 = self.samples.iter().map(|x| x.requests).sum();
        println!();
        println!(
            "  {} requests, {} answered other than expected; RSS end / after warm-up: {:.2}; \
             open fds end - after warm-up: {:+}",
            total,
            self.errors(),
            self.rss_growth(),
            self.fd_growth()
        );
        if let Some(o) = &self.overload {
            println!(
                "  overload burst of creates ({} connections, cap {} requests in progress, {:.0} s): {} \
                 served (p99 {}), {} refused with 503 overloaded (p99 {}), {} other; /healthz \
                 answered during the burst: {}",
                s.overload_connections,
                s.max_concurrent_requests,
                s.overload.as_secs_f64(),
                o.served,
                fmt_duration(o.served_p99),
                o.refused,
                fmt_duration(o.refused_p99),
                o.errors,
                if o.healthy { "yes" } else { "no" }
            );
        }
    }
}

/// Requests of one interval, shared by the connections.
struct Interval {
    latency: Histogram<u64>,
    requests: u64,
    errors: u64,
}

impl Interval {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: stats::new_histogram()?,
            requests: 0,
            errors: 0,
        })
    }
}

type Shared = Arc<Mutex<Interval>>;

/// Records one request: its latency and whether it answered as expected.
fn note(shared: &Shared, took: Duration, ok: bool) {
    if let Ok(mut i) = shared.lock() {
        stats::record(&mut i.latency, took);
        i.requests += 1;
        if !ok {
            i.errors += 1;
        }
    }
}

/// One connection's loop over session lives until `stop`.
async fn life_cycles(api: &Api, conn: usize, shared: Shared, stop: Arc<AtomicBool>) {
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let user = format!("soak-c{conn}-u{}", n % 4);
        let body = json!({
            "user_id": user,
            "client": {"ip": format!("10.{}.{}.{}", conn % 256, n % 256, (n / 256) % 256),
                       "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"},
            "data": {"n": n}
        });
        let t = Instant::now();
        let ans = api.post("/v1/sessions", body).await;
        let token = match &ans {
            Some((StatusCode::CREATED, b)) => {
                b.get("token").and_then(|v| v.as_str()).map(str::to_owned)
            }
            _ => None,
        };
        note(&shared, t.elapsed(), token.is_some());
        let Some(mut token) = token else { continue };
        for round in 0..9 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let t = Instant::now();
            if round == 6 {
                let ans = api
                    .post("/v1/sessions/rotate", json!({"token": token}))
                    .await;
                let new = match &ans {
                    Some((StatusCode::OK, b)) => {
                        b.get("token").and_then(|v| v.as_str()).map(str::to_owned)
                    }
                    _ => None,
                };
                note(&shared, t.elapsed(), new.is_some());
                match new {
                    Some(x) => token = x,
                    None => break,
                }
            } else {
                let ans = api
                    .post("/v1/sessions/verify", json!({"token": token}))
                    .await;
                let ok = matches!(ans, Some((StatusCode::OK, _)));
                note(&shared, t.elapsed(), ok);
            }
        }
        // One session in ten is abandoned, to end by its idle timeout and be swept.
        if !n.is_multiple_of(10) {
            let t = Instant::now();
            let ans = api
                .post("/v1/sessions/logout", json!({"token": token}))
                .await;
            note(
                &shared,
                t.elapsed(),
                matches!(ans, Some((StatusCode::OK, _))),
            );
        }
    }
}

/// The server's resident set size (KiB) and open descriptors, from `/proc`.
fn proc_usage(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

/// Runs the scenario.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        !settings.sample.is_zero(),
        "the sample interval must be positive"
    );
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = tmp.path().join("data");
    let log = tmp.path().join("sessiond.log");
    let (key, _) = TokenFormat::new("sk_")?.generate()?;
    let key = key.expose().to_owned();
    let mut config = Config::default();
    let cleanup = Cleanup::configure(&mut config, &settings.store)?;
    let mut env = vec![
        ("SESSIOND_SWEEP_INTERVAL_S".to_owned(), "1".to_owned()),
        ("SESSIOND_RETENTION_S".to_owned(), "1".to_owned()),
        (
            "SESSIOND_DEFAULT_POLICY__IDLE_TIMEOUT_S".to_owned(),
            "5".to_owned(),
        ),
        (
            "SESSIOND_MAX_CONCURRENT_REQUESTS".to_owned(),
            settings.max_concurrent_requests.to_string(),
        ),
        // Each connection creates sessions for a few users as fast as it can: far past the
        // creation limits, which would turn the soak into a measure of the limiter.
        (
            "SESSIOND_PROTECTION__ENABLED".to_owned(),
            "false".to_owned(),
        ),
        // Every load connection comes from 127.0.0.1: one peer, past the default per-peer cap.
        (
            "SESSIOND_MAX_CONNECTIONS_PER_PEER".to_owned(),
            "100000".to_owned(),
        ),
    ];
    env.extend(store_env(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut proc = start(&settings.bin, &dir, &key, &env, &log)?;
    let result = runtime.block_on(soak(settings, &proc.base, proc.child.id(), &key));
    proc.child.kill().ok();
    proc.child.wait().ok();
    let cleaned = runtime.block_on(cleanup.run());
    let report = result?;
    cleaned?;
    Ok(report)
}

async fn soak(settings: &Settings, base: &str, pid: u32, key: &str) -> anyhow::Result<Report> {
    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(settings.connections.max(settings.overload_connections))
            .build()?,
        base: base.to_owned(),
        key: key.to_owned(),
    });
    let shared: Shared = Arc::new(Mutex::new(Interval::new()?));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for conn in 0..settings.connections {
        let (api, shared, stop) = (api.clone(), shared.clone(), stop.clone());
        load.spawn(async move { life_cycles(&api, conn, shared, stop).await });
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.sample,
        settings.sample,
    );
    let mut last = Instant::now();
    while started.elapsed() < settings.duration {
        tick.tick().await;
        let fresh = Interval::new()?;
        let interval = match shared.lock() {
            Ok(mut i) => std::mem::replace(&mut *i, fresh),
            Err(_) => anyhow::bail!("a load task panicked"),
        };
        let took = last.elapsed();
        last = Instant::now();
        let (rss_kib, fds) = proc_usage(pid);
        let l = stats::Latencies::of(&interval.latency);
        samples.push(Sample {
            at: started.elapsed(),
            rss_kib,
            fds,
            requests: interval.requests,
            rate: stats::rate(interval.requests, took),
            p50: l.p50,
            p99: l.p99,
            errors: interval.errors,
        });
    }
    stop.store(true, Ordering::Relaxed);
    load.join_all().await;
    let overload = if settings.overload.is_zero() {
        None
    } else {
        Some(overload(settings, &api).await?)
    };
    Ok(Report {
        settings: settings.clone(),
        samples,
        overload,
    })
}

/// Creates from many connections at once, past the server's cap. Creates wait on the store's
/// durable write, so they pile up in the server; verifies on the embedded store finish within
/// one poll and never hold many slots at once.
async fn overload(settings: &Settings, api: &Arc<Api>) -> anyhow::Result<Overload> {
    let until = Instant::now() + settings.overload;
    let mut burst = tokio::task::JoinSet::new();
    for conn in 0..settings.overload_connections {
        let api = api.clone();
        burst.spawn(async move {
            let mut o = Overload::default();
            let mut served = stats::new_histogram()?;
            let mut refused = stats::new_histogram()?;
            while Instant::now() < until {
                let t = Instant::now();
                let ans = api
                    .post(
                        "/v1/sessions",
                        json!({"user_id": format!("soak-burst-{conn}")}),
                    )
                    .await;
                match ans {
                    Some((StatusCode::CREATED, _)) => {
                        o.served += 1;
                        stats::record(&mut served, t.elapsed());
                    }
                    Some((StatusCode::SERVICE_UNAVAILABLE, b)) if b["code"] == "overloaded" => {
                        o.refused += 1;
                        stats::record(&mut refused, t.elapsed());
                    }
                    _ => o.errors += 1,
                }
            }
            anyhow::Ok((o, served, refused))
        });
    }
    // The health endpoint is outside the cap: it answers during the burst.
    tokio::time::sleep(settings.overload / 2).await;
    let healthy = matches!(
        api.call(reqwest::Method::GET, "/healthz", None).await,
        Some((StatusCode::OK, _))
    );
    let mut total = Overload {
        healthy,
        ..Overload::default()
    };
    let mut served = stats::new_histogram()?;
    let mut refused = stats::new_histogram()?;
    for r in burst.join_all().await {
        let (o, s, f) = r?;
        total.served += o.served;
        total.refused += o.refused;
        total.errors += o.errors;
        stats::merge(&mut served, &s)?;
        stats::merge(&mut refused, &f)?;
    }
    total.served_p99 = stats::Latencies::of(&served).p99;
    total.refused_p99 = stats::Latencies::of(&refused).p99;
    Ok(total)
}
