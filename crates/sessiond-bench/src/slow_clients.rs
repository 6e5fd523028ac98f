//! `slow-clients`: a real sessiond while clients hold half-open connections (a request head
//! that never ends), first from one address (up to and past the per-peer cap), then spread over
//! several addresses until the listener's global cap. Measures `/healthz` and verify from
//! 127.0.0.1 meanwhile, and the server's resident memory before, during and after.
//!
//! While only one address holds connections, every legitimate request must succeed. Once the
//! global cap is full, the API listener sheds new connections (legitimate ones too: that is
//! what the cap is for), and `/healthz` is measured on the health listener, which must answer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use sessiond_core::token::TokenFormat;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::crash::{Proc, start};
use crate::stats::{Latencies, new_histogram, record};

/// What `slow-clients` does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `sessiond` binary.
    pub bin: PathBuf,
    /// Half-open connections tried from 127.0.0.2.
    pub connections: usize,
    /// The server's per-peer cap.
    pub per_peer: usize,
    /// The server's global cap.
    pub max_connections: usize,
    /// Requests of each kind measured in each phase.
    pub samples: usize,
}

const HALF_OPEN: &[u8] = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n";

/// One phase's figures.
#[derive(Debug)]
pub struct Phase {
    name: String,
    held: usize,
    refused: usize,
    healthz: Latencies,
    verify: Option<Latencies>,
    api_failures: usize,
    rss_kib: u64,
}

/// The figures of a run.
#[derive(Debug)]
pub struct Report {
    rss_before_kib: u64,
    rss_after_kib: u64,
    phases: Vec<Phase>,
    /// Legitimate requests that failed where they must not.
    pub failures: usize,
}

impl Report {
    /// Prints the figures.
    #[allow(clippy::print_stdout)]
    pub fn print(&self) {
        println!("slow clients: half-open connections held against a real sessiond");
        println!("  RSS before: {} KiB", self.rss_before_kib);
        for p in &self.phases {
            println!(
                "  {}: {} held, {} closed at once by the server; RSS {} KiB",
                p.name, p.held, p.refused, p.rss_kib
            );
            println!("    /healthz: {}", p.healthz.line());
            match &p.verify {
                Some(v) => println!("    verify:   {}", v.line()),
                None => println!(
                    "    API listener full: {} of its requests from 127.0.0.1 shed",
                    p.api_failures
                ),
            }
        }
        println!("  RSS after the holders closed: {} KiB", self.rss_after_kib);
        println!("  legitimate requests failed: {}", self.failures);
    }
}

fn rss_kib(proc: &Proc) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", proc.child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `n` half-open connections from `from`; answers those the server kept open and how
/// many it closed at once.
async fn hold(from: Ipv4Addr, to: SocketAddr, n: usize) -> anyhow::Result<(Vec<TcpStream>, usize)> {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(IpAddr::V4(from), 0))
            .with_context(|| format!("cannot bind to {from}"))?;
        let mut s = sock.connect(to).await.context("cannot connect")?;
        // A connection the server sheds may be reset before or after this write.
        let _ = s.write_all(HALF_OPEN).await;
        open.push(s);
    }
    // Give the server a moment to close the shed ones, then count them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut kept = Vec::with_capacity(n);
    let mut refused = 0;
    for s in open {
        let mut buf = [0u8; 64];
        match s.try_read(&mut buf) {
            Ok(0) => refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => kept.push(s),
            _ => refused += 1,
        }
    }
    Ok((kept, refused))
}

async fn measure(
    http: &reqwest::Client,
    health_base: &str,
    api: Option<(&str, &str, &str)>,
    samples: usize,
) -> anyhow::Result<(Latencies, Option<Latencies>, usize)> {
    let mut h = new_histogram()?;
    let mut v = new_histogram()?;
    let mut failures = 0;
    for _ in 0..samples {
        let t = Instant::now();
        let ok = http
            .get(format!("{health_base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        record(&mut h, t.elapsed());
        if !ok {
            failures += 1;
        }
        if let Some((base, key, token)) = api {
            let t = Instant::now();
            let ok = http
                .post(format!("{base}/v1/sessions/verify"))
                .bearer_auth(key)
                .json(&serde_json::json!({"token": token}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            record(&mut v, t.elapsed());
            if !ok {
                failures += 1;
            }
        }
    }
    Ok((Latencies::of(&h), api.map(|_| Latencies::of(&v)), failures))
}

/// Runs the scenario.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.connections > 0, "--connections must be at least 1");
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let log = tmp.path().join("sessiond.log");
    let (key, _) = TokenFormat::new("sk_")?.generate()?;
    let key = key.expose().to_owned();
    let env = vec![
        (
            "SESSIOND_MAX_CONNECTIONS_PER_PEER".to_owned(),
            settings.per_peer.to_string(),
        ),
        (
            "SESSIOND_MAX_CONNECTIONS".to_owned(),
            settings.max_connections.to_string(),
        ),
        // The holders keep their connections for as long as the server lets them: make that
        // the whole run rather than the default 10 s.
        (
            "SESSIOND_HEADER_READ_TIMEOUT_MS".to_owned(),
            "600000".to_owned(),
        ),
        (
            "SESSIOND_HEALTH_LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
    ];
    let mut proc = start(&settings.bin, &tmp.path().join("data"), &key, &env, &log)?;
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(scenario(settings, &proc, &key, &log));
    let _ = proc.child.kill();
    let _ = proc.child.wait();
    result
}

async fn scenario(
    settings: &Settings,
    proc: &Proc,
    key: &str,
    log: &std::path::Path,
) -> anyhow::Result<Report> {
    let api: SocketAddr = proc.base.trim_start_matches("http://").parse()?;
    let text = std::fs::read_to_string(log)?;
    let health_base = text
        .lines()
        .find(|l| l.contains("health checks listening"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .map(|a| format!("http://{a}"))
        .context("the health listener did not start")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let created = http
        .post(format!("{}/v1/sessions", proc.base))
        .bearer_auth(key)
        .json(&serde_json::json!({"user_id": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json::<serde_json::Value>()
        .await?;
    let token = created["token"]
        .as_str()
        .context("no token in the create answer")?
        .to_owned();
    let rss_before_kib = rss_kib(proc);
    let mut failures = 0;
    let mut phases = Vec::new();

    // One address: up to and past the per-peer cap. Everyone else must be served.
    let (one, refused) = hold(Ipv4Addr::new(127, 0, 0, 2), api, settings.connections).await?;
    let (healthz, verify, failed) = measure(
        &http,
        &proc.base,
        Some((&proc.base, key, &token)),
        settings.samples,
    )
    .await?;
    failures += failed;
    phases.push(Phase {
        name: format!(
            "{} tried from 127.0.0.2 (per-peer cap {})",
            settings.connections, settings.per_peer
        ),
        held: one.len(),
        refused,
        healthz,
        verify,
        api_failures: failed,
        rss_kib: rss_kib(proc),
    });

    // Several addresses, a per-peer cap's worth each, until the global cap and past it.
    let mut spread = Vec::new();
    let mut refused = 0;
    let want = settings.max_connections.saturating_sub(one.len()) + settings.per_peer;
    let mut third = 3u8;
    while spread.len() + refused < want && third < 250 {
        let n = settings.per_peer.min(want - spread.len() - refused);
        let (kept, r) = hold(Ipv4Addr::new(127, 0, 0, third), api, n).await?;
        spread.extend(kept);
        refused += r;
        third += 1;
    }
    let (healthz, _, health_failed) = measure(&http, &health_base, None, settings.samples).await?;
    failures += health_failed;
    // The API listener is full: count what happens to 127.0.0.1's requests (not failures).
    let mut shed = 0;
    for _ in 0..settings.samples.min(20) {
        let ok = http
            .get(format!("{}/healthz", proc.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            shed += 1;
        }
    }
    phases.push(Phase {
        name: format!(
            "{} more over 127.0.0.3-127.0.0.{} (global cap {}; /healthz on the health listener)",
            want,
            third - 1,
            settings.max_connections
        ),
        held: one.len() + spread.len(),
        refused,
        healthz,
        verify: None,
        api_failures: shed,
        rss_kib: rss_kib(proc),
    });

    drop(one);
    drop(spread);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Served again once the holders are gone.
    let (_, _, failed) = measure(&http, &proc.base, Some((&proc.base, key, &token)), 10).await?;
    failures += failed;
    Ok(Report {
        rss_before_kib,
        rss_after_kib: rss_kib(proc),
        phases,
        failures,
    })
}
