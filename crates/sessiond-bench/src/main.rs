#![allow(clippy::print_stdout)]
//! `sessiond-bench`: benchmarks of sessiond's verify path.
//!
//! - `inprocess`: `SessionService::verify_session` on the embedded store, on T OS threads, no HTTP;
//! - `http`: the real server in-process, loaded over HTTP/1.1 keep-alive by a closed-loop
//!   generator, next to a bare axum handler as the ceiling of the HTTP stack;
//! - `stores`: HTTP create and verify on the embedded store and on PostgreSQL, Redis and Redis
//!   Cluster where given, side by side;
//! - `crash`: a mixed load against a real `sessiond` process killed with SIGKILL again and
//!   again; every acknowledged operation is checked after each restart;
//! - `soak`: mixed traffic against a real `sessiond` process for a bounded time, sampling its
//!   memory, open descriptors and latency, then an overload burst past its concurrency cap;
//! - `peers`: the same HTTP load on the session layers users compare with (tower-sessions on
//!   memory, Redis and PostgreSQL; express-session with connect-redis), beside sessiond;
//! - `scale`: in-process verify and resident memory with 10 k, 1 M and 10 M stored sessions,
//!   each size in a child process;
//! - `all`: in-process, HTTP (verify, durable create, and refresh in token mode), the stores
//!   given, the peers and scale, then one markdown table, written with a chart to `--out-dir`
//!   (`--quick` for a few-second smoke run in CI).

mod chart;
mod cleanup;
mod crash;
mod http;
mod inprocess;
mod loadgen;
mod output;
mod peers;
mod pin;
mod refresh;
mod scale;
mod slow_clients;
mod soak;
mod stats;
mod stores;
mod webhooks;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Benchmarks of sessiond's verify path.
#[derive(Debug, Parser)]
#[command(name = "sessiond-bench", version)]
struct Cli {
    /// The benchmark to run.
    #[command(subcommand)]
    command: Command,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
enum Command {
    /// Verify in-process: SessionService on the embedded store, T threads, no HTTP.
    Inprocess(InprocessArgs),
    /// Verify over HTTP against the real server, and a bare axum handler for comparison.
    Http(HttpArgs),
    /// HTTP create and verify on each store given (and the embedded one), side by side.
    Stores(StoresArgs),
    /// In-process, HTTP, the stores given and the peers, then one markdown table.
    All(AllArgs),
    /// The peers (tower-sessions, express-session) beside sessiond on the stores given, with
    /// the same load; the flags are those of `all`.
    Peers(AllArgs),
    /// HTTP create without and with a webhook endpoint for every event, alternating.
    Webhooks(WebhooksArgs),
    /// Kill a real sessiond with SIGKILL under load, again and again, and check that no
    /// acknowledged operation was lost (exits non-zero if one was).
    Crash(CrashArgs),
    /// Mixed traffic against a real sessiond for a bounded time: memory, open descriptors and
    /// latency over time, then an overload burst (exits non-zero on errors or growth).
    Soak(SoakArgs),
    /// Half-open connections held against a real sessiond (one address past the per-peer
    /// cap, then many addresses up to the global cap): /healthz and verify latency from
    /// 127.0.0.1 and resident memory meanwhile (exits non-zero if a legitimate request fails).
    SlowClients(SlowClientsArgs),
    /// In-process verify and resident memory per session with 10 k, 1 M and 10 M stored
    /// sessions, each size in a child process.
    Scale(scale::ScaleArgs),
    /// One size of `scale` (run by `scale` in a child process).
    #[command(hide = true)]
    ScaleChild(scale::ChildArgs),
}

/// Flags of `slow-clients`.
#[derive(Debug, Args)]
struct SlowClientsArgs {
    /// Half-open connections tried from 127.0.0.2.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// The server's `max_connections_per_peer`.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    per_peer: u64,
    /// The server's `max_connections`.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Requests of each kind measured while the connections are held.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    samples: u64,
    /// The sessiond binary (default: `sessiond` beside this one).
    #[arg(long)]
    bin: Option<std::path::PathBuf>,
}

/// Flags of `soak`.
#[derive(Debug, Args)]
struct SoakArgs {
    /// Seconds of mixed traffic.
    #[arg(long, default_value_t = 600.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    sample_seconds: f64,
    /// Concurrent connections of the mixed traffic.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// The server's cap of requests in progress during the run.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_concurrent_requests: u64,
    /// Seconds of the overload burst after the soak (0: none).
    #[arg(long, default_value_t = 5.0, value_parser = non_negative_seconds)]
    overload_seconds: f64,
    /// Concurrent connections of the overload burst.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    overload_connections: u64,
    /// Largest accepted ratio of resident memory at the end to after warm-up.
    #[arg(long, default_value_t = 1.25)]
    max_rss_growth: f64,
    /// The sessiond binary [default: `sessiond` beside this program].
    #[arg(long, value_name = "PATH")]
    bin: Option<std::path::PathBuf>,
    /// Run on PostgreSQL at this URL (a schema of its own, dropped afterwards).
    #[arg(long, value_name = "URL", conflicts_with = "redis")]
    postgres: Option<String>,
    /// Run on Redis at this URL (a key prefix of its own, deleted afterwards).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

/// The sessiond binary: the one given, or the one beside this program.
fn sessiond_bin(given: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    match given {
        Some(b) => Ok(b),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("sessiond"))
            .ok_or_else(|| anyhow::anyhow!("cannot tell where sessiond is; pass --bin")),
    }
}

/// The store named by `--postgres` / `--redis`, or the embedded one.
fn one_store(postgres: Option<String>, redis: Option<String>) -> http::Store {
    match (postgres, redis) {
        (Some(u), _) => http::Store::Postgres(u),
        (None, Some(u)) => http::Store::Redis(u),
        (None, None) => http::Store::Embedded,
    }
}

/// Flags of `crash`.
#[derive(Debug, Args)]
struct CrashArgs {
    /// How many times to kill the server.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    kills: u64,
    /// Concurrent workers, each with its own users and sessions.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    workers: u64,
    /// Shortest time of load before a kill, in milliseconds.
    #[arg(long, default_value_t = 100)]
    min_run_ms: u64,
    /// Longest time of load before a kill, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_run_ms: u64,
    /// Seed of the random choices [default: a random one, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// The sessiond binary [default: `sessiond` beside this program].
    #[arg(long, value_name = "PATH")]
    bin: Option<std::path::PathBuf>,
    /// Run on PostgreSQL at this URL (a schema of its own, dropped afterwards) instead of
    /// the embedded store.
    #[arg(long, value_name = "URL", conflicts_with = "redis")]
    postgres: Option<String>,
    /// Run on Redis at this URL (a key prefix of its own, deleted afterwards).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

/// The shared stores to measure beside the embedded one.
#[derive(Debug, Args)]
struct StoreArgs {
    /// A PostgreSQL URL; the run uses a schema of its own and drops it.
    #[arg(long, value_name = "URL", env = "SESSIOND_BENCH_POSTGRES")]
    postgres: Option<String>,
    /// A Redis URL; the run uses a key prefix of its own and deletes it.
    #[arg(long, value_name = "URL", env = "SESSIOND_BENCH_REDIS")]
    redis: Option<String>,
    /// A Redis Cluster URL (redis+cluster://HOST:PORT,...); as for --redis.
    #[arg(long, value_name = "URL", env = "SESSIOND_BENCH_REDIS_CLUSTER")]
    redis_cluster: Option<String>,
}

impl StoreArgs {
    /// The stores named, in a fixed order.
    fn stores(&self) -> Vec<http::Store> {
        let mut out = Vec::new();
        if let Some(u) = &self.postgres {
            out.push(http::Store::Postgres(u.clone()));
        }
        if let Some(u) = &self.redis {
            out.push(http::Store::Redis(u.clone()));
        }
        if let Some(u) = &self.redis_cluster {
            out.push(http::Store::Redis(u.clone()));
        }
        out
    }
}

/// Flags of `stores`.
#[derive(Debug, Args)]
struct StoresArgs {
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    stores: StoreArgs,
}

/// Flags of `inprocess`.
#[derive(Debug, Args)]
struct InprocessArgs {
    /// Sessions to create and verify at random.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    sessions: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Verifying OS threads, each with a current-thread runtime [default: number of cores].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
    /// Also verify access tokens: at the server, and locally in the SDK.
    #[arg(long)]
    tokens: bool,
    /// Instead: verify with the client's IP, brute-force detection off and on (alternating),
    /// then a flood of unknown tokens from many networks.
    #[arg(long, conflicts_with = "tokens")]
    guard: bool,
}

/// Flags of `http`.
#[derive(Debug, Args)]
struct HttpArgs {
    /// Measured seconds of each run (hello, then sessiond).
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// Sessions to create (over HTTP) and verify at random.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    sessions: u64,
    /// Unmeasured seconds of load before each measured run.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_seconds)]
    warmup_seconds: f64,
    /// Worker threads of the servers' tokio runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    server_threads: u64,
    /// Worker threads of the load generator's tokio runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    client_threads: u64,
    /// Run sessiond on PostgreSQL and Redis without its session cache (every verify reads
    /// the store).
    #[arg(long)]
    no_session_cache: bool,
}

/// Flags of `webhooks`.
#[derive(Debug, Args)]
struct WebhooksArgs {
    #[command(flatten)]
    http: HttpArgs,
    /// Pairs of runs (without, then with).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Then measure the lease handover this many times: two sessiond processes on the shared
    /// store of --postgres or --redis, the holder killed with SIGKILL each time.
    #[arg(long, default_value_t = 0)]
    handovers: usize,
    /// The dispatchers' poll interval in the handover runs (the lease lasts three polls, at
    /// least one second).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    handover_poll_ms: u64,
    /// The sessiond binary of the handover runs [default: `sessiond` beside this program].
    #[arg(long, value_name = "PATH")]
    bin: Option<std::path::PathBuf>,
    /// The handover runs on PostgreSQL at this URL (a schema of its own, dropped afterwards).
    #[arg(long, value_name = "URL", conflicts_with = "redis")]
    postgres: Option<String>,
    /// The handover runs on Redis at this URL (a key prefix of its own, deleted afterwards).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

/// Flags of `all`.
#[derive(Debug, Args)]
struct AllArgs {
    /// Smoke run: 1 second per scenario, 1000 sessions, no warm-up (explicit flags still win).
    #[arg(long)]
    quick: bool,
    /// Measured seconds per scenario [default: 5, or 1 with --quick].
    #[arg(long, value_parser = positive_seconds)]
    seconds: Option<f64>,
    /// Sessions per scenario [default: 10000, or 1000 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    sessions: Option<u64>,
    /// Unmeasured seconds of HTTP load before each measured run [default: 1, or 0 with --quick].
    #[arg(long, value_parser = non_negative_seconds)]
    warmup_seconds: Option<f64>,
    /// In-process verifying threads [default: number of cores].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// Worker threads of the servers' tokio runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    server_threads: u64,
    /// Worker threads of the load generator's tokio runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    client_threads: u64,
    #[command(flatten)]
    stores: StoreArgs,
    /// Also run the peers (the default): tower-sessions on memory, and on Redis and
    /// PostgreSQL when given; express-session + connect-redis when Redis is given.
    #[arg(long, overrides_with = "no_peers")]
    peers: bool,
    /// Do not run the peers.
    #[arg(long, overrides_with = "peers")]
    no_peers: bool,
    #[command(flatten)]
    scale: scale::AllScaleArgs,
    #[command(flatten)]
    output: output::OutputArgs,
}

impl AllArgs {
    /// The HTTP settings, with `--quick`'s defaults where asked.
    fn settings(&self) -> anyhow::Result<http::Settings> {
        let (seconds, sessions, warmup) = if self.quick {
            (1.0, 1_000, 0.0)
        } else {
            (5.0, 10_000, 1.0)
        };
        Ok(http::Settings {
            sessions: count(self.sessions.unwrap_or(sessions))?,
            duration: Duration::from_secs_f64(self.seconds.unwrap_or(seconds)),
            warmup: Duration::from_secs_f64(self.warmup_seconds.unwrap_or(warmup)),
            connections: count(self.connections)?,
            server_threads: count(self.server_threads)?,
            client_threads: count(self.client_threads)?,
            session_cache: true,
        })
    }

    /// Runs the peers that the stores given allow (a debug build of the Rust one with
    /// `--quick`).
    fn run_peers(&self, settings: &http::Settings) -> anyhow::Result<peers::Report> {
        let list = peers::peers(
            self.stores.redis.as_deref(),
            self.stores.postgres.as_deref(),
        );
        let build = if self.quick {
            peers::Build::Debug
        } else {
            peers::Build::Release
        };
        let report = peers::run(settings, &list, build)?;
        report.print();
        Ok(report)
    }
}

/// Prints the ratios of sessiond's throughput to the peers'.
fn print_peer_ratios(report: &peers::Report, sessiond: &peers::Sessiond) {
    println!();
    print!("{}", peers::ratio_table(&report.ratios(sessiond)));
}

/// Fails if any request to a peer failed or answered other than 200.
fn check_peers(r: &peers::Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.failures() == 0,
        "{} HTTP requests to the peers failed or answered other than 200",
        r.failures()
    );
    Ok(())
}

/// Parses a strictly positive number of seconds.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Parses a number of seconds that may be zero.
fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

/// The number of cores, or 1 if it cannot be told.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// A count from the command line as a `usize`.
fn count(n: u64) -> anyhow::Result<usize> {
    usize::try_from(n).map_err(|_| anyhow::anyhow!("{n} is too large"))
}

/// Prints the summary table.
fn print_table(rows: &[stats::Row]) {
    println!();
    print!("{}", stats::table(rows));
}

/// Fails if any verify or request failed: a benchmark of errors measures nothing.
fn check_in_process(r: &inprocess::Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.errors() == 0,
        "{} in-process verifies answered otherwise than expected (valid tokens valid, the \
         flood's unknown tokens refused)",
        r.errors()
    );
    Ok(())
}

/// The HTTP settings of `http` and `stores`.
fn http_settings(a: &HttpArgs) -> anyhow::Result<http::Settings> {
    Ok(http::Settings {
        sessions: count(a.sessions)?,
        duration: Duration::from_secs_f64(a.seconds),
        warmup: Duration::from_secs_f64(a.warmup_seconds),
        connections: count(a.connections)?,
        server_threads: count(a.server_threads)?,
        client_threads: count(a.client_threads)?,
        session_cache: !a.no_session_cache,
    })
}

/// Fails if any request of the stores scenario failed or answered other than expected.
fn check_stores(r: &stores::Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.failures() == 0,
        "{} HTTP requests of the stores scenario failed or answered other than 200",
        r.failures()
    );
    Ok(())
}

/// Fails if any HTTP request failed or answered other than 200.
fn check_http(r: &http::Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.failures() == 0,
        "{} HTTP requests failed or answered other than 200 (hello: {} non-200, {} errors; \
         sessiond: {} non-200, {} errors)",
        r.failures(),
        r.hello.non_200,
        r.hello.errors,
        r.sessiond.non_200,
        r.sessiond.errors,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inprocess(a) => {
            let modes: &[inprocess::Mode] = if a.tokens {
                &inprocess::ALL_MODES
            } else if a.guard {
                &inprocess::GUARD_MODES
            } else {
                &[inprocess::Mode::Opaque]
            };
            let mut reports = Vec::new();
            for &mode in modes {
                let report = inprocess::run(&inprocess::Settings {
                    sessions: count(a.sessions)?,
                    duration: Duration::from_secs_f64(a.seconds),
                    threads: a.threads.map_or(Ok(cores()), count)?,
                    mode,
                })?;
                report.print();
                reports.push(report);
            }
            print_table(
                &reports
                    .iter()
                    .map(inprocess::Report::row)
                    .collect::<Vec<_>>(),
            );
            reports.iter().try_for_each(check_in_process)
        }
        Command::Http(a) => {
            let report = http::run(&http_settings(&a)?)?;
            report.print();
            println!("{}", pin::describe());
            print_table(&report.rows());
            check_http(&report)
        }
        Command::Webhooks(a) => {
            let report = webhooks::run(&http_settings(&a.http)?, a.rounds)?;
            report.print();
            anyhow::ensure!(report.failures() == 0, "some creates failed");
            if a.handovers > 0 {
                let store = one_store(a.postgres, a.redis);
                let times = webhooks::handover(
                    &sessiond_bin(a.bin)?,
                    &store,
                    a.handover_poll_ms,
                    a.handovers,
                )?;
                let ms: Vec<String> = times.iter().map(|t| t.as_millis().to_string()).collect();
                println!(
                    "\nlease handover on {} ({} ms polls), SIGKILL of the holder to the first \
                     delivery by the other node: {} ms",
                    store.name(),
                    a.handover_poll_ms,
                    ms.join(", ")
                );
            }
            Ok(())
        }
        Command::Stores(a) => {
            let report = stores::run(&http_settings(&a.http)?, &a.stores.stores())?;
            report.print();
            println!("{}", pin::describe());
            check_stores(&report)
        }
        Command::Crash(a) => {
            let report = crash::run(&crash::Settings {
                bin: sessiond_bin(a.bin)?,
                store: one_store(a.postgres, a.redis),
                kills: count(a.kills)?,
                workers: count(a.workers)?,
                min_run: Duration::from_millis(a.min_run_ms),
                max_run: Duration::from_millis(a.max_run_ms),
                seed: a.seed.unwrap_or_else(|| fastrand::u64(..)),
            })?;
            report.print();
            anyhow::ensure!(
                report.counts.lost == 0 && report.counts.server_errors == 0,
                "{} acknowledged operations lost, {} unexpected server errors",
                report.counts.lost,
                report.counts.server_errors
            );
            Ok(())
        }
        Command::Soak(a) => {
            let report = soak::run(&soak::Settings {
                bin: sessiond_bin(a.bin)?,
                store: one_store(a.postgres, a.redis),
                duration: Duration::from_secs_f64(a.seconds),
                sample: Duration::from_secs_f64(a.sample_seconds),
                connections: count(a.connections)?,
                max_concurrent_requests: count(a.max_concurrent_requests)?,
                overload: Duration::from_secs_f64(a.overload_seconds),
                overload_connections: count(a.overload_connections)?,
            })?;
            report.print();
            anyhow::ensure!(
                report.errors() == 0,
                "{} requests of the mixed traffic answered other than expected",
                report.errors()
            );
            anyhow::ensure!(
                report.rss_growth() <= a.max_rss_growth,
                "resident memory grew {:.2}x after warm-up (limit {:.2}x)",
                report.rss_growth(),
                a.max_rss_growth
            );
            anyhow::ensure!(
                report.fd_growth() <= 16,
                "open descriptors grew by {} after warm-up",
                report.fd_growth()
            );
            if let Some(o) = &report.overload {
                anyhow::ensure!(
                    o.errors == 0 && o.healthy,
                    "overload burst: {} answers other than 201 or 503 overloaded; /healthz \
                     answered: {}",
                    o.errors,
                    o.healthy
                );
            }
            Ok(())
        }
        Command::SlowClients(a) => {
            let report = slow_clients::run(&slow_clients::Settings {
                bin: sessiond_bin(a.bin)?,
                connections: count(a.connections)?,
                per_peer: count(a.per_peer)?,
                max_connections: count(a.max_connections)?,
                samples: count(a.samples)?,
            })?;
            report.print();
            anyhow::ensure!(
                report.failures == 0,
                "{} legitimate requests failed while the connections were held",
                report.failures
            );
            Ok(())
        }
        Command::Scale(a) => {
            let report = scale::run(
                &a.tuning
                    .settings(a.sizes, Duration::from_secs_f64(a.seconds))?,
            )?;
            report.print();
            print_table(&report.rows());
            println!();
            print!("{}", report.table());
            anyhow::ensure!(report.errors() == 0, "{} verifies failed", report.errors());
            Ok(())
        }
        Command::ScaleChild(a) => scale::child(&a),
        Command::All(a) => {
            let settings = a.settings()?;
            let (seconds, sessions) = (settings.duration, settings.sessions);
            let mut in_process = Vec::new();
            for mode in inprocess::ALL_MODES {
                let r = inprocess::run(&inprocess::Settings {
                    sessions,
                    duration: seconds,
                    threads: a.threads.map_or(Ok(cores()), count)?,
                    mode,
                })?;
                r.print();
                println!();
                in_process.push(r);
            }
            let over_http = http::run(&settings)?;
            over_http.print();
            let refreshed = refresh::run(&settings, &http::Store::Embedded)?;
            println!("refresh over HTTP (token mode): {}", refreshed.line());
            let shared = a.stores.stores();
            let on_stores = if shared.is_empty() {
                None
            } else {
                println!();
                let r = stores::run(&settings, &shared)?;
                r.print();
                Some(r)
            };
            let at_scale = if a.scale.no_scale {
                None
            } else {
                println!();
                let sizes = a.scale.scale_sizes.clone().unwrap_or_else(|| {
                    if a.quick {
                        scale::QUICK_SIZES.to_vec()
                    } else {
                        scale::DEFAULT_SIZES.to_vec()
                    }
                });
                let r = scale::run(&a.scale.tuning.settings(sizes, seconds)?)?;
                r.print();
                Some(r)
            };
            let mut rows: Vec<stats::Row> = in_process.iter().map(inprocess::Report::row).collect();
            rows.extend(over_http.rows());
            rows.push(refresh::row(&settings, &refreshed));
            if let Some(r) = &on_stores {
                // The embedded store's rows are already there, from the HTTP scenario.
                rows.extend(r.rows().into_iter().skip(2));
            }
            let on_peers = if a.no_peers {
                None
            } else {
                println!();
                Some(a.run_peers(&settings)?)
            };
            let hello = over_http.hello.throughput();
            if let Some(p) = &on_peers {
                rows.extend(p.rows(hello));
            }
            if let Some(r) = &at_scale {
                rows.extend(r.rows());
            }
            println!("\n{}", pin::describe());
            print_table(&rows);
            let ratios = on_peers.as_ref().map(|p| {
                let sessiond = over_http.sessiond.throughput();
                peers::ratio_table(&p.ratios(&peers::Sessiond::of(
                    hello,
                    sessiond,
                    on_stores.as_ref(),
                )))
            });
            if let Some(r) = &ratios {
                println!();
                print!("{r}");
            }
            if let Some(r) = &at_scale {
                println!();
                print!("{}", r.table());
            }
            output::write(&a.output, &rows, ratios.as_deref(), at_scale.as_ref())?;
            anyhow::ensure!(
                at_scale.as_ref().map_or(0, scale::Report::errors) == 0,
                "some verifies of the scale scenario failed"
            );
            in_process.iter().try_for_each(check_in_process)?;
            check_http(&over_http)?;
            anyhow::ensure!(
                refreshed.non_200 == 0 && refreshed.errors == 0,
                "refresh over HTTP: {} answers other than 200, {} failed requests",
                refreshed.non_200,
                refreshed.errors
            );
            on_stores.as_ref().map_or(Ok(()), check_stores)?;
            on_peers.as_ref().map_or(Ok(()), check_peers)
        }
        Command::Peers(a) => {
            let settings = a.settings()?;
            let on_stores = stores::run(&settings, &a.stores.stores())?;
            on_stores.print();
            println!();
            let on_peers = a.run_peers(&settings)?;
            let hello = on_stores.hello.throughput();
            let mut rows = vec![on_stores.hello_row()];
            rows.extend(on_stores.rows());
            rows.extend(on_peers.rows(hello));
            println!("\n{}", pin::describe());
            print_table(&rows);
            let embedded = on_stores
                .stores
                .first()
                .map_or(0.0, |s| s.verify.throughput());
            let sessiond = peers::Sessiond::of(hello, embedded, Some(&on_stores));
            print_peer_ratios(&on_peers, &sessiond);
            check_stores(&on_stores)?;
            check_peers(&on_peers)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap checks its definitions (unique argument names, among others) only in debug builds
    /// and only when a command is parsed: check every subcommand here.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
