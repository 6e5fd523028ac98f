//! The HTTP scenario: the real sessiond server and a bare axum "hello" server, both in this
//! process on their own multi-thread runtime, loaded by the same closed-loop generator running
//! on a second runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use sessiond_core::token::TokenFormat;
use sessiond_server::Server;
use sessiond_server::config::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cleanup;
use crate::loadgen::{self, LoadReport, Target};
use crate::stats::{Latencies, Row};

/// How long the servers get to stop once the load is over.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the HTTP scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sessions to create (over HTTP) and verify at random.
    pub sessions: usize,
    /// Measured duration of each of the two runs (hello, then sessiond).
    pub duration: Duration,
    /// Unmeasured run before each measured one.
    pub warmup: Duration,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Worker threads of the servers' runtime.
    pub server_threads: usize,
    /// Worker threads of the load generator's runtime.
    pub client_threads: usize,
    /// Whether sessiond on PostgreSQL and Redis answers verifies from its session cache.
    pub session_cache: bool,
}

/// Where the sessiond under test keeps its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// The embedded store, in a temporary directory.
    Embedded,
    /// PostgreSQL at this URL, in a schema of the run's own (dropped afterwards).
    Postgres(String),
    /// Redis (`redis://`) or Redis Cluster (`redis+cluster://`) at this URL, under a key
    /// prefix of the run's own (deleted afterwards).
    Redis(String),
}

impl Store {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Postgres(_) => "PostgreSQL",
            Self::Redis(u) if u.contains("+cluster://") => "Redis Cluster",
            Self::Redis(_) => "Redis",
        }
    }
}

/// The outcome of the HTTP scenario.
#[derive(Debug)]
pub struct Report {
    /// The settings it ran with.
    pub settings: Settings,
    /// Creating the sessions over HTTP (durable creates).
    pub create: LoadReport,
    /// The bare axum handler: the ceiling of this HTTP stack on this machine.
    pub hello: LoadReport,
    /// `POST /v1/sessions/verify` on sessiond.
    pub sessiond: LoadReport,
}

impl Report {
    /// sessiond's throughput over the hello ceiling's.
    pub fn ratio(&self) -> f64 {
        let ceiling = self.hello.throughput();
        if ceiling > 0.0 {
            self.sessiond.throughput() / ceiling
        } else {
            0.0
        }
    }

    /// Failed or non-200 responses of both runs.
    pub fn failures(&self) -> u64 {
        self.hello.non_200 + self.hello.errors + self.sessiond.non_200 + self.sessiond.errors
    }

    /// Prints the details.
    pub fn print(&self) {
        let s = &self.settings;
        println!(
            "HTTP verify: {} connections, {} sessions, server runtime {} worker(s), \
             load-generator runtime {} worker(s), {:.1} s per run after {:.1} s warm-up",
            s.connections,
            s.sessions,
            s.server_threads,
            s.client_threads,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
        );
        println!(
            "  sessiond (POST /v1/sessions), create:   {}",
            self.create.line()
        );
        println!(
            "  bare axum hello (POST /):               {}",
            self.hello.line()
        );
        println!(
            "  sessiond (POST /v1/sessions/verify):    {}",
            self.sessiond.line()
        );
        println!("  ratio sessiond/hello: {:.2}", self.ratio());
    }

    /// The summary rows: the ceiling, then sessiond.
    pub fn rows(&self) -> Vec<Row> {
        let c = self.settings.connections;
        vec![
            Row {
                scenario: format!("HTTP bare axum `POST /` hello (ceiling), {c} conns"),
                throughput: self.hello.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&self.hello.histogram),
                ratio: Some(1.0),
            },
            Row {
                scenario: format!("HTTP sessiond `POST /v1/sessions/verify`, {c} conns"),
                throughput: self.sessiond.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&self.sessiond.histogram),
                ratio: Some(self.ratio()),
            },
            Row {
                scenario: format!(
                    "HTTP sessiond `POST /v1/sessions` (durable create), {} conns",
                    c.min(loadgen::CREATE_CONNECTIONS)
                ),
                throughput: self.create.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&self.create.histogram),
                ratio: None,
            },
        ]
    }
}

/// The bare handler: a small JSON body, whatever the request.
async fn hello() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The two servers, running on their own runtime.
pub(crate) struct Servers {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) sessiond: SocketAddr,
    hello: SocketAddr,
    pub(crate) api_key: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// What to remove from a shared store once the servers stopped.
    cleanup: cleanup::Cleanup,
    /// The embedded store's directory, removed when the servers are dropped.
    _data_dir: tempfile::TempDir,
}

/// A future that completes once `stop` says so.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Servers {
    /// Starts sessiond (on `store`, with a fresh API key, its configuration adjusted by
    /// `tweak`) and the hello server, each on `127.0.0.1:0`.
    pub fn start_with(
        threads: usize,
        store: &Store,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("bench-server")
            .on_thread_start(crate::pin::server_thread)
            .enable_all()
            .build()
            .context("cannot start the server runtime")?;
        let data_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let (key, _) = TokenFormat::new("sk_")?.generate()?;
        let api_key = key.expose().to_owned();
        let mut config = Config {
            api_key: Some(api_key.clone()),
            data_dir: data_dir.path().to_owned(),
            shutdown_timeout_s: STOP_TIMEOUT.as_secs(),
            ..Config::default()
        };
        // The load generator creates sessions from one API key, without client addresses, as
        // fast as the server takes them: the per-key creation limit would refuse it.
        config.protection.creates_per_key = 0;
        let cleanup = cleanup::Cleanup::configure(&mut config, store)?;
        tweak(&mut config);
        let (stop, stop_rx) = watch::channel(false);
        // Started on a worker thread, so that threads the server starts (the embedded store's
        // writer) inherit its core.
        let start = runtime.spawn(async move {
            let server = Server::new(config).await.context("cannot start sessiond")?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let sessiond = listener.local_addr()?;
            let shutdown = stopped(stop_rx.clone());
            let sessiond_task: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
                server.serve(listener, shutdown).await?;
                Ok(())
            });

            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let hello_addr = listener.local_addr()?;
            let app = Router::new().route("/", post(hello));
            let shutdown = stopped(stop_rx.clone());
            let hello_task: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await?;
                Ok(())
            });
            anyhow::Ok((sessiond, hello_addr, vec![sessiond_task, hello_task]))
        });
        let (sessiond, hello, tasks) = runtime
            .block_on(start)
            .context("the server start task failed")??;
        Ok(Self {
            runtime,
            sessiond,
            hello,
            api_key,
            stop,
            tasks,
            cleanup,
            _data_dir: data_dir,
        })
    }

    /// Stops both servers (sessiond drains and flushes) and their runtime.
    pub fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let tasks = self.tasks;
        let cleanup = self.cleanup;
        let result = self.runtime.block_on(async move {
            for t in tasks {
                match tokio::time::timeout(STOP_TIMEOUT * 2, t).await {
                    Ok(joined) => joined.context("a server task failed")??,
                    Err(_) => anyhow::bail!("a server did not stop in time"),
                }
            }
            cleanup.run().await
        });
        self.runtime.shutdown_timeout(STOP_TIMEOUT);
        result
    }
}

/// Runs the scenario on the embedded store: starts the servers, creates the sessions over
/// HTTP, then loads the hello server and sessiond in turn with identical requests.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    let (create, hello, sessiond) = run_on(settings, &Store::Embedded, true)?;
    Ok(Report {
        settings: settings.clone(),
        create,
        hello: hello.context("the hello server was not measured")?,
        sessiond,
    })
}

/// Starts the servers with sessiond on `store`, creates the sessions over HTTP (measured),
/// loads the hello server if `with_hello`, then sessiond's verify. Answers the create, hello
/// and verify measurements.
pub fn run_on(
    settings: &Settings,
    store: &Store,
    with_hello: bool,
) -> anyhow::Result<(LoadReport, Option<LoadReport>, LoadReport)> {
    anyhow::ensure!(settings.sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(settings.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        settings.server_threads > 0 && settings.client_threads > 0,
        "runtimes need at least 1 worker thread"
    );
    let servers = Servers::start_with(settings.server_threads, store, |c| {
        c.cache.enabled = settings.session_cache;
    })?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("bench-loadgen")
        .on_thread_start(crate::pin::client_thread)
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let result = client.block_on(load(settings, &servers, with_hello));
    client.shutdown_timeout(STOP_TIMEOUT);
    let stopped = servers.stop();
    let report = result?;
    stopped?;
    Ok(report)
}

/// The load generator's part of [`run_on`].
async fn load(
    settings: &Settings,
    servers: &Servers,
    with_hello: bool,
) -> anyhow::Result<(LoadReport, Option<LoadReport>, LoadReport)> {
    let (tokens, create) = loadgen::create_sessions(
        servers.sessiond,
        &servers.api_key,
        settings.sessions,
        settings.connections,
    )
    .await?;
    let bodies = tokens
        .iter()
        .map(|token| serde_json::to_vec(&serde_json::json!({ "token": token })).map(Bytes::from))
        .collect::<Result<Vec<_>, _>>()?;
    let bodies = Arc::new(bodies);

    let measure = async |addr: SocketAddr, path: &str| -> anyhow::Result<LoadReport> {
        let target = Arc::new(Target::new(addr, path, &servers.api_key)?);
        if !settings.warmup.is_zero() {
            loadgen::run(&target, &bodies, settings.connections, settings.warmup).await?;
        }
        loadgen::run(&target, &bodies, settings.connections, settings.duration).await
    };
    let hello = if with_hello {
        Some(measure(servers.hello, "/").await?)
    } else {
        None
    };
    let sessiond = measure(servers.sessiond, "/v1/sessions/verify").await?;
    Ok((create, hello, sessiond))
}
