//! The peers: the session layers sessiond is compared with, each a small app of its own in
//! `bench/peers/`, started as a process of its own and loaded by the same generator, with the
//! same connections, warm-up and measured time as sessiond.
//!
//! - tower-sessions (axum) on its memory store, its Redis store (fred) and its PostgreSQL store
//!   (sqlx), from `bench/peers/tower-sessions`, a cargo project outside the workspace;
//! - express-session with connect-redis on Node.js, from `bench/peers/express`.
//!
//! Each one answers `POST /login` by creating a session that holds a user id and setting its
//! cookie, and `GET /whoami` by reading the session its `Cookie` header names (401 without
//! one). The run logs in N users, checks that a request without a session is refused, then
//! loads `GET /whoami` with the cookies of those sessions chosen at random: the peers'
//! equivalent of sessiond's verify.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::SET_COOKIE;
use hyper::{Request, StatusCode};

use crate::cleanup::{self, Cleanup};
use crate::http::Settings;
use crate::loadgen::{self, Item, LoadReport, Sender, Target};
use crate::pin;
use crate::stats::{self, Latencies, Row};

/// The peers' projects: `bench/peers` of the source tree this program was built from.
const PEERS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/peers");

/// How long a peer gets to build its app, connect to its store and listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the load generator's runtime gets to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer and its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// tower-sessions' memory store.
    TowerMemory,
    /// tower-sessions-redis-store at this Redis URL.
    TowerRedis(String),
    /// tower-sessions-sqlx-store at this PostgreSQL URL.
    TowerPostgres(String),
    /// express-session with connect-redis at this Redis URL.
    Express(String),
}

impl Peer {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TowerMemory => "tower-sessions (memory)",
            Self::TowerRedis(_) => "tower-sessions + Redis",
            Self::TowerPostgres(_) => "tower-sessions + PostgreSQL",
            Self::Express(_) => "express-session + connect-redis",
        }
    }

    /// Whether it is the Rust peer.
    fn is_tower(&self) -> bool {
        !matches!(self, Self::Express(_))
    }
}

/// The peers that can run with the stores given: the memory one always, those on Redis and
/// PostgreSQL when their URL is given.
pub fn peers(redis: Option<&str>, postgres: Option<&str>) -> Vec<Peer> {
    let mut out = vec![Peer::TowerMemory];
    if let Some(u) = redis {
        out.push(Peer::TowerRedis(u.to_owned()));
    }
    if let Some(u) = postgres {
        out.push(Peer::TowerPostgres(u.to_owned()));
    }
    if let Some(u) = redis {
        out.push(Peer::Express(u.to_owned()));
    }
    out
}

/// How to build the tower-sessions peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// `cargo build` (quick runs).
    Debug,
    /// `cargo build --release` (figures).
    Release,
}

/// One peer's measurements.
#[derive(Debug)]
pub struct PeerResult {
    /// The peer.
    pub peer: Peer,
    /// `POST /login`: creating the sessions.
    pub login: LoadReport,
    /// `GET /whoami` with the cookie of a session chosen at random.
    pub whoami: LoadReport,
}

/// The outcome of the peers scenario.
#[derive(Debug)]
pub struct Report {
    /// The settings it ran with.
    pub settings: Settings,
    /// How the tower-sessions peer was built.
    pub build: Build,
    /// Each peer, in the order run.
    pub results: Vec<PeerResult>,
}

/// One ratio of throughputs measured in the same run, for tables and charts.
#[derive(Debug, Clone)]
pub struct Ratio {
    /// What over what.
    pub name: String,
    /// The numerator's throughput over the denominator's.
    pub value: f64,
}

/// sessiond's own figures of the same run, which the peers are compared with.
#[derive(Debug, Clone, Copy)]
pub struct Sessiond {
    /// The bare axum hello ceiling, req/s.
    pub hello: f64,
    /// Verify on the embedded store, req/s.
    pub embedded: f64,
    /// Verify on Redis, req/s, where measured.
    pub redis: Option<f64>,
    /// Verify on PostgreSQL, req/s, where measured.
    pub postgres: Option<f64>,
}

impl Report {
    /// Failed, refused or otherwise non-200 responses of every run.
    pub fn failures(&self) -> u64 {
        self.results
            .iter()
            .flat_map(|r| [&r.login, &r.whoami])
            .map(|r| r.non_200 + r.errors)
            .sum()
    }

    /// The whoami throughput of `peer`, if it ran.
    fn whoami(&self, peer: impl Fn(&Peer) -> bool) -> Option<f64> {
        self.results
            .iter()
            .find(|r| peer(&r.peer))
            .map(|r| r.whoami.throughput())
    }

    /// Prints the details.
    pub fn print(&self) {
        let s = &self.settings;
        println!(
            "Peers over HTTP: {} sessions logged in then `GET /whoami` at random, {} \
             connections, {:.1} s per run after {:.1} s warm-up; tower-sessions peer: {} build",
            s.sessions,
            s.connections,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            match self.build {
                Build::Debug => "debug",
                Build::Release => "release",
            },
        );
        println!("  {}", pin::describe());
        for r in &self.results {
            println!("  {} login:  {}", r.peer.name(), r.login.line());
            println!("  {} whoami: {}", r.peer.name(), r.whoami.line());
        }
    }

    /// The summary rows, with the ratio to the `hello` ceiling of the same run.
    pub fn rows(&self, hello: f64) -> Vec<Row> {
        let c = self.settings.connections;
        let mut rows = Vec::new();
        for r in &self.results {
            rows.push(Row {
                scenario: format!("HTTP peer {} `GET /whoami`, {c} conns", r.peer.name()),
                throughput: r.whoami.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&r.whoami.histogram),
                ratio: (hello > 0.0).then(|| r.whoami.throughput() / hello),
            });
            rows.push(Row {
                scenario: format!(
                    "HTTP peer {} `POST /login` (create), {} conns",
                    r.peer.name(),
                    c.min(loadgen::CREATE_CONNECTIONS)
                ),
                throughput: r.login.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&r.login.histogram),
                ratio: None,
            });
        }
        rows
    }

    /// sessiond's throughput over the peers' (and the ceiling's), where both were measured.
    pub fn ratios(&self, sessiond: &Sessiond) -> Vec<Ratio> {
        let memory = self.whoami(|p| *p == Peer::TowerMemory);
        let redis = self.whoami(|p| matches!(p, Peer::TowerRedis(_)));
        let postgres = self.whoami(|p| matches!(p, Peer::TowerPostgres(_)));
        let express = self.whoami(|p| matches!(p, Peer::Express(_)));
        let pairs = [
            (
                "sessiond embedded verify / bare axum hello",
                Some(sessiond.embedded),
                Some(sessiond.hello),
            ),
            (
                "sessiond embedded verify / tower-sessions (memory) whoami",
                Some(sessiond.embedded),
                memory,
            ),
            (
                "sessiond on Redis verify / tower-sessions + Redis whoami",
                sessiond.redis,
                redis,
            ),
            (
                "sessiond on PostgreSQL verify / tower-sessions + PostgreSQL whoami",
                sessiond.postgres,
                postgres,
            ),
            (
                "sessiond on Redis verify / express-session + connect-redis whoami",
                sessiond.redis,
                express,
            ),
            (
                "sessiond embedded verify / express-session + connect-redis whoami",
                Some(sessiond.embedded),
                express,
            ),
        ];
        pairs
            .into_iter()
            .filter_map(|(name, a, b)| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(Ratio {
                    name: name.to_owned(),
                    value: a / b,
                }),
                _ => None,
            })
            .collect()
    }
}

/// The ratios as a markdown table.
pub fn ratio_table(ratios: &[Ratio]) -> String {
    let mut out = String::from("| throughput ratio, same run | ratio |\n|---|---:|\n");
    for r in ratios {
        out.push_str(&format!("| {} | {:.2} |\n", r.name, r.value));
    }
    out
}

/// Builds what `peers` need: the tower-sessions peer with cargo, and the express peer's
/// `node_modules` with `npm ci` when missing. Answers the tower-sessions peer's binary.
fn prepare(peers: &[Peer], build: Build) -> anyhow::Result<Option<PathBuf>> {
    let dir = Path::new(PEERS_DIR);
    if peers.iter().any(|p| !p.is_tower()) {
        let express = dir.join("express");
        if !express.join("node_modules").is_dir() {
            println!("  installing the express peer's packages (npm ci)");
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&express)
                .stdout(Stdio::null())
                .status()
                .context("cannot run npm (is Node.js installed?)")?;
            anyhow::ensure!(status.success(), "npm ci failed in {}", express.display());
        }
    }
    if !peers.iter().any(Peer::is_tower) {
        return Ok(None);
    }
    let project = dir.join("tower-sessions");
    let target = project.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--locked", "--quiet", "--manifest-path"])
        .arg(project.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    let profile = match build {
        Build::Debug => "debug",
        Build::Release => {
            cmd.arg("--release");
            "release"
        }
    };
    println!("  building the tower-sessions peer ({profile})");
    let status = cmd.status().context("cannot run cargo")?;
    anyhow::ensure!(
        status.success(),
        "building the tower-sessions peer failed ({})",
        project.display()
    );
    Ok(Some(target.join(profile).join("tower-sessions-peer")))
}

/// A peer's server process, killed when dropped.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    /// Starts `cmd` and waits until it prints `listening on ADDR`.
    fn start(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {what} peer"))?;
        let stdout = child
            .stdout
            .take()
            .context("the peer's standard output is not piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Every line is read, so that the peer never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut process = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(addr) => {
                process.addr = addr
                    .parse()
                    .with_context(|| format!("the {what} peer listens on {addr:?}"))?;
                Ok(process)
            }
            Err(_) => {
                let exited = process.child.try_wait().ok().flatten();
                anyhow::bail!(
                    "the {what} peer did not start listening ({})",
                    exited.map_or_else(|| "timed out".to_owned(), |s| format!("exited: {s}"))
                )
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one request and answers its status, `Set-Cookie` (the first, up to its first `;`)
/// and body.
async fn send(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Option<String>, Bytes)> {
    sender.ready().await?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let cookie = res
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_owned());
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, cookie, body))
}

/// Logs in `n` users, one session each, over up to [`loadgen::CREATE_CONNECTIONS`]
/// connections; answers the sessions' cookies (`name=value`) and the measurements.
async fn login(
    addr: SocketAddr,
    n: usize,
    connections: usize,
) -> anyhow::Result<(Vec<Bytes>, LoadReport)> {
    let target = Arc::new(Target::anonymous(addr, "/login", Item::JsonBody)?);
    let workers = connections
        .clamp(1, loadgen::CREATE_CONNECTIONS)
        .min(n.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for w in 0..workers {
        let target = target.clone();
        tasks.spawn(async move {
            let mut sender = loadgen::connect(target.addr).await?;
            let mut cookies = Vec::new();
            let mut histogram = stats::new_histogram()?;
            for i in (w..n).step_by(workers) {
                let body = serde_json::to_vec(&serde_json::json!({
                    "user_id": format!("bench-user-{i}"),
                }))?;
                let sent = Instant::now();
                let (status, cookie, body) = send(&mut sender, target.request(body.into())?)
                    .await
                    .context("POST /login failed")?;
                stats::record(&mut histogram, sent.elapsed());
                anyhow::ensure!(
                    status == StatusCode::OK,
                    "POST /login answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                let cookie = cookie
                    .filter(|c| c.contains('='))
                    .context("POST /login set no cookie")?;
                cookies.push(Bytes::from(cookie));
            }
            anyhow::Ok((cookies, histogram))
        });
    }
    let mut cookies = Vec::with_capacity(n);
    let mut histogram = stats::new_histogram()?;
    while let Some(done) = tasks.join_next().await {
        let (c, h) = done.context("a login task failed")??;
        cookies.extend(c);
        stats::merge(&mut histogram, &h)?;
    }
    let report = LoadReport {
        requests: cookies.len() as u64,
        non_200: 0,
        errors: 0,
        elapsed: start.elapsed(),
        histogram,
    };
    Ok((cookies, report))
}

/// The load generator's part of one peer: log in, check that a request without a session is
/// refused, then load `GET /whoami`. Answers the cookies too (for the clean-up).
async fn measure(
    settings: &Settings,
    addr: SocketAddr,
) -> anyhow::Result<(LoadReport, LoadReport, Vec<Bytes>)> {
    let (cookies, login) = login(addr, settings.sessions, settings.connections).await?;
    let target = Arc::new(Target::anonymous(addr, "/whoami", Item::Cookie)?);
    let mut sender = loadgen::connect(addr).await?;
    let (status, _, _) = send(&mut sender, target.request(Bytes::from_static(b"other=1"))?)
        .await
        .context("GET /whoami without a session failed")?;
    anyhow::ensure!(
        status == StatusCode::UNAUTHORIZED,
        "GET /whoami without a session answered {status}, not 401"
    );
    drop(sender);
    let items = Arc::new(cookies);
    if !settings.warmup.is_zero() {
        loadgen::run(&target, &items, settings.connections, settings.warmup).await?;
    }
    let whoami = loadgen::run(&target, &items, settings.connections, settings.duration).await?;
    let cookies = Arc::try_unwrap(items).unwrap_or_else(|shared| shared.as_ref().clone());
    Ok((login, whoami, cookies))
}

/// Deletes the keys of tower-sessions' Redis store: the session ids, which are the values
/// of the cookies (that store has no key prefix).
fn delete_sessions(url: &str, cookies: &[Bytes]) -> anyhow::Result<()> {
    let client = redis::Client::open(url).context("bad Redis URL")?;
    let mut c = client
        .get_connection()
        .context("cannot connect to Redis to delete the peer's sessions")?;
    for chunk in cookies.chunks(500) {
        let mut del = redis::cmd("DEL");
        for cookie in chunk {
            let cookie = String::from_utf8_lossy(cookie);
            if let Some((_, id)) = cookie.split_once('=') {
                del.arg(id);
            }
        }
        let _: () = del.query(&mut c).context("DEL failed")?;
    }
    Ok(())
}

/// Runs one peer: starts it (on the servers' core), measures it, stops it, removes what it
/// stored.
fn run_one(
    settings: &Settings,
    peer: &Peer,
    tower: Option<&Path>,
    client: &tokio::runtime::Runtime,
) -> anyhow::Result<PeerResult> {
    let dir = Path::new(PEERS_DIR);
    let (mut cmd, cleanup) = match peer {
        Peer::Express(url) => {
            let prefix = format!("sdbench-express-{}", cleanup::suffix()?);
            let mut cmd = pin::server_command(Path::new("node"));
            cmd.current_dir(dir.join("express"))
                .env("NODE_ENV", "production")
                .arg("server.js")
                .arg("--redis-url")
                .arg(url)
                .arg("--prefix")
                .arg(format!("{prefix}:"));
            (
                cmd,
                Cleanup::Prefix {
                    url: url.clone(),
                    prefix,
                },
            )
        }
        _ => {
            let bin = tower.context("the tower-sessions peer was not built")?;
            let mut cmd = pin::server_command(bin);
            let cleanup = match peer {
                Peer::TowerRedis(url) => {
                    cmd.args(["--store", "redis", "--redis-url", url]);
                    Cleanup::Nothing
                }
                Peer::TowerPostgres(url) => {
                    let schema = format!("sd_bench_{}", cleanup::suffix()?);
                    cmd.args(["--store", "postgres", "--postgres-url", url])
                        .args(["--postgres-schema", &schema]);
                    Cleanup::Schema {
                        url: url.clone(),
                        schema,
                    }
                }
                _ => {
                    cmd.args(["--store", "memory"]);
                    Cleanup::Nothing
                }
            };
            (cmd, cleanup)
        }
    };
    cmd.args(["--addr", "127.0.0.1:0"]);
    let process = Process::start(cmd, peer.name());
    let result = process.and_then(|p| {
        let measured = client.block_on(measure(settings, p.addr));
        drop(p);
        measured
    });
    let cleaned = match (&result, peer) {
        (Ok((_, _, cookies)), Peer::TowerRedis(url)) => delete_sessions(url, cookies),
        _ => client.block_on(cleanup.run()),
    };
    let (login, whoami, _) = result?;
    cleaned?;
    Ok(PeerResult {
        peer: peer.clone(),
        login,
        whoami,
    })
}

/// Runs `peers` one after the other with the same load as sessiond's runs.
pub fn run(settings: &Settings, peers: &[Peer], build: Build) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(settings.connections > 0, "--connections must be at least 1");
    let tower = prepare(peers, build)?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("bench-loadgen")
        .on_thread_start(pin::client_thread)
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let mut results = Vec::new();
    let mut outcome = Ok(());
    for peer in peers {
        match run_one(settings, peer, tower.as_deref(), &client) {
            Ok(r) => results.push(r),
            Err(e) => {
                outcome = Err(e.context(format!("peer {}", peer.name())));
                break;
            }
        }
    }
    client.shutdown_timeout(STOP_TIMEOUT);
    outcome?;
    Ok(Report {
        settings: settings.clone(),
        build,
        results,
    })
}

impl Sessiond {
    /// sessiond's figures of a run: the ceiling and embedded verify, and verify on Redis and
    /// PostgreSQL from the stores scenario where it ran.
    pub fn of(hello: f64, embedded: f64, stores: Option<&crate::stores::Report>) -> Self {
        let verify = |name: &str| {
            stores.and_then(|r| {
                r.stores
                    .iter()
                    .find(|s| s.store.name() == name)
                    .map(|s| s.verify.throughput())
            })
        };
        Self {
            hello,
            embedded,
            redis: verify("Redis"),
            postgres: verify("PostgreSQL"),
        }
    }
}
