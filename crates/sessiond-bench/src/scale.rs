//! The scale scenario: in-process verify and resident memory with N stored sessions.
//!
//! Each size runs in a fresh child process (this program re-executed with the hidden
//! `scale-child` subcommand), so that one size's memory does not count in the next one's. The
//! child opens the embedded store in a temporary directory, creates N sessions through
//! `SessionService::create` (the durable path: many concurrent creates on a multi-thread
//! runtime, which the store's writer commits in groups), reads its resident memory before and
//! after, then verifies random sessions among the N on T OS threads as the in-process scenario
//! does. It prints one line of JSON on stdout, which the parent reads.
//!
//! Before a size larger than those measured, the parent estimates the child's memory from the
//! largest size measured so far (or a prior of [`PRIOR_BYTES_PER_SESSION`]) and skips the size,
//! saying why, if it would not fit in a fraction of the memory the kernel reports available.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use sessiond_api::{CreateSessionRequest, PolicyDocument, VerifyRequest};
use sessiond_core::events::Audit;
use sessiond_core::service::{ServiceConfig, SessionService};
use sessiond_core::session::SessionRecord;
use sessiond_core::time::SystemClock;
use sessiond_store::{EmbeddedOptions, EmbeddedStore};

use crate::inprocess::NoopSink;
use crate::stats::{self, Latencies, Row};

/// Bytes per stored session assumed before any size has been measured.
pub const PRIOR_BYTES_PER_SESSION: f64 = 2048.0;
/// Resident memory of a child before it loads anything, assumed before any has been measured.
const PRIOR_BASE_RSS: u64 = 64 << 20;
/// The goal for resident memory per stored session.
pub const GOAL_BYTES_PER_SESSION: f64 = 1024.0;
/// Sizes from which the memory goal applies (below, fixed costs dominate the figure).
pub const GOAL_MEMORY_MIN_SESSIONS: usize = 1_000_000;
/// The goal for verify latency (p50 and p99) at a larger size over the smallest size's.
pub const GOAL_LATENCY_RATIO: f64 = 1.3;
/// Sizes the latency goal applies to (larger ones are reported without a goal).
pub const GOAL_LATENCY_MAX_SESSIONS: usize = 1_000_000;
/// The marker of the child's result line on its stdout.
const RESULT_MARKER: &str = "scale-result ";

/// Flags of `scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Stored sessions of each run, comma-separated; a size is skipped, saying why, if it is
    /// not estimated to fit in --memory-fraction of the available memory.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_SIZES)]
    pub sizes: Vec<usize>,
    /// Measured seconds of verify per size.
    #[arg(long, default_value_t = 5.0, value_parser = crate::positive_seconds)]
    pub seconds: f64,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Flags of `scale` that `all` shares.
#[derive(Debug, Args)]
pub struct Tuning {
    /// Verifying OS threads, and worker threads of the loading runtime [default: number of
    /// cores].
    #[arg(long = "scale-threads", id = "scale_threads", value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: Option<u64>,
    /// Creates in flight while loading the sessions.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub load_concurrency: u64,
    /// Largest share of the available memory (MemAvailable) a size may be estimated to need.
    #[arg(long, default_value_t = 0.7)]
    pub memory_fraction: f64,
    /// Where each size's database goes, in a temporary directory of its own [default: the
    /// system's temporary directory]. On a tmpfs (`/dev/shm`) commits cost no disk flush, and
    /// the database counts in the memory estimate.
    #[arg(long, value_name = "DIR")]
    pub db_dir: Option<PathBuf>,
    /// The store's write-back interval of last-use times, in seconds.
    #[arg(long, default_value_t = 1.0, value_parser = crate::positive_seconds)]
    pub flush_seconds: f64,
}

/// Flags of `all` for its scale part.
#[derive(Debug, Args)]
pub struct AllScaleArgs {
    /// Stored sessions of each scale run [default: 10000,1000000,10000000, or 1000,10000 with
    /// --quick].
    #[arg(long, value_delimiter = ',')]
    pub scale_sizes: Option<Vec<usize>>,
    /// Leave out the scale scenario.
    #[arg(long)]
    pub no_scale: bool,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Flags of the hidden `scale-child` subcommand (one size, run by `scale`).
#[derive(Debug, Args)]
pub struct ChildArgs {
    #[arg(long)]
    pub sessions: usize,
    #[arg(long, value_parser = crate::positive_seconds)]
    pub seconds: f64,
    #[arg(long)]
    pub threads: usize,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub db_dir: Option<PathBuf>,
    #[arg(long, value_parser = crate::positive_seconds)]
    pub flush_seconds: f64,
}

/// Sizes of `scale` by default.
pub const DEFAULT_SIZES: [usize; 3] = [10_000, 1_000_000, 10_000_000];
/// Sizes of `all --quick` by default.
pub const QUICK_SIZES: [usize; 2] = [1_000, 10_000];

impl Tuning {
    /// The settings for these sizes and this verify time.
    pub fn settings(&self, sizes: Vec<usize>, duration: Duration) -> anyhow::Result<Settings> {
        anyhow::ensure!(
            sizes.iter().all(|&n| n > 0),
            "every size must be at least 1 session"
        );
        anyhow::ensure!(
            self.memory_fraction > 0.0 && self.memory_fraction <= 1.0,
            "--memory-fraction must be in (0, 1]"
        );
        Ok(Settings {
            sizes,
            duration,
            threads: self.threads.map_or(Ok(crate::cores()), crate::count)?,
            concurrency: crate::count(self.load_concurrency)?,
            memory_fraction: self.memory_fraction,
            db_dir: self.db_dir.clone(),
            flush_interval: Duration::from_secs_f64(self.flush_seconds),
        })
    }
}

/// Settings of the scale scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Stored sessions of each run, in order.
    pub sizes: Vec<usize>,
    /// Measured verify time per size.
    pub duration: Duration,
    /// Verifying OS threads (and worker threads of the loading runtime).
    pub threads: usize,
    /// Creates in flight while loading.
    pub concurrency: usize,
    /// Largest share of available memory a child may be estimated to need.
    pub memory_fraction: f64,
    /// Where the databases go (a temporary directory in it per size).
    pub db_dir: Option<PathBuf>,
    /// The store's write-back interval of last-use times.
    pub flush_interval: Duration,
}

/// What one child measured, as it reports it on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SizeResult {
    /// Stored sessions.
    pub sessions: usize,
    /// Time to create them.
    pub load_secs: f64,
    /// Resident bytes before loading (the token list the bench keeps is already resident).
    pub rss_before: u64,
    /// Resident bytes once loaded.
    pub rss_loaded: u64,
    /// Resident bytes after the verify run.
    pub rss_after_verify: u64,
    /// Verifying threads.
    pub threads: usize,
    /// Verifies completed.
    pub ops: u64,
    /// Verifies that did not answer valid.
    pub errors: u64,
    /// The longest thread's measured time.
    pub elapsed_secs: f64,
    /// Latency quantiles, in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: u64,
    /// `size_of::<SessionRecord>()`, the fixed part of each record.
    pub record_size: usize,
    /// Bytes of each token the bench keeps (resident before the baseline).
    pub token_len: usize,
    /// Bytes of the database files once loaded.
    pub db_bytes: u64,
}

impl SizeResult {
    /// Creates per second while loading.
    pub fn load_rate(&self) -> f64 {
        stats::rate(
            self.sessions as u64,
            Duration::from_secs_f64(self.load_secs),
        )
    }

    /// Resident bytes per stored session, after loading.
    pub fn bytes_per_session(&self) -> f64 {
        // Byte counts and sizes stay far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        let (grown, n) = (
            self.rss_loaded.saturating_sub(self.rss_before) as f64,
            self.sessions.max(1) as f64,
        );
        grown / n
    }

    /// For a larger size's estimate: the base resident memory without the token list, and the
    /// bytes per session with its token and what verifying added (write-back queues).
    /// With `db_in_memory`, the database's bytes per session count too.
    pub fn estimate(&self, db_in_memory: bool) -> (u64, f64) {
        let tokens = (self.sessions.saturating_mul(self.token_len)) as u64;
        let db = if db_in_memory { self.db_bytes } else { 0 };
        // Byte counts and sizes stay far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        let per = (self
            .rss_after_verify
            .max(self.rss_loaded)
            .saturating_sub(self.rss_before)
            + db) as f64
            / self.sessions.max(1) as f64
            + self.token_len as f64;
        (self.rss_before.saturating_sub(tokens), per)
    }

    /// Verifies per second.
    pub fn throughput(&self) -> f64 {
        stats::rate(self.ops, Duration::from_secs_f64(self.elapsed_secs))
    }

    /// The latency quantiles.
    pub fn latencies(&self) -> Latencies {
        Latencies {
            p50: Duration::from_nanos(self.p50_ns),
            p99: Duration::from_nanos(self.p99_ns),
            p999: Duration::from_nanos(self.p999_ns),
            max: Duration::from_nanos(self.max_ns),
            mean: Duration::from_nanos(self.mean_ns),
        }
    }

    /// The summary row.
    pub fn row(&self) -> Row {
        Row {
            scenario: format!(
                "in-process verify among {} stored sessions, {} threads",
                stats::fmt_rate(self.sessions as f64),
                self.threads
            ),
            throughput: self.throughput(),
            unit: "verifies/s",
            latencies: self.latencies(),
            ratio: None,
        }
    }
}

/// A size measured, or skipped and why.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Measured.
    Measured(SizeResult),
    /// Not run.
    Skipped {
        /// Stored sessions it would have had.
        sessions: usize,
        /// Why not.
        reason: String,
    },
}

/// The outcome of the scale scenario.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per size, in order.
    pub outcomes: Vec<Outcome>,
}

impl Report {
    /// The sizes measured.
    pub fn measured(&self) -> impl Iterator<Item = &SizeResult> {
        self.outcomes.iter().filter_map(|o| match o {
            Outcome::Measured(r) => Some(r),
            Outcome::Skipped { .. } => None,
        })
    }

    /// Verifies of all sizes that did not answer valid.
    pub fn errors(&self) -> u64 {
        self.measured().map(|r| r.errors).sum()
    }

    /// One summary row per size measured.
    pub fn rows(&self) -> Vec<Row> {
        self.measured().map(SizeResult::row).collect()
    }

    /// The scale table and the goals, in markdown.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| stored sessions | load (durable creates) | verify | p50 | p99 | p99.9 | RSS per session | p50 / smallest | p99 / smallest |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let base = self.measured().next().cloned();
        for o in &self.outcomes {
            match o {
                Outcome::Measured(r) => {
                    let (p50, p99) = base.as_ref().map_or((1.0, 1.0), |b| ratios(b, r));
                    out.push_str(&format!(
                        "| {} | {} creates/s | {} verifies/s | {} | {} | {} | {:.0} B | {:.2} | {:.2} |\n",
                        stats::fmt_rate(r.sessions as f64),
                        stats::fmt_rate(r.load_rate()),
                        stats::fmt_rate(r.throughput()),
                        stats::fmt_duration(r.latencies().p50),
                        stats::fmt_duration(r.latencies().p99),
                        stats::fmt_duration(r.latencies().p999),
                        r.bytes_per_session(),
                        p50,
                        p99,
                    ));
                }
                Outcome::Skipped { sessions, reason } => out.push_str(&format!(
                    "| {} | skipped: {reason} | | | | | | | |\n",
                    stats::fmt_rate(*sessions as f64)
                )),
            }
        }
        out.push('\n');
        for line in self.goals() {
            out.push_str(&format!("- {line}\n"));
        }
        out
    }

    /// The goals, one line each: met or missed, with the figures.
    pub fn goals(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Some(base) = self.measured().next() else {
            return out;
        };
        for r in self.measured().skip(1) {
            let (p50, p99) = ratios(base, r);
            let verdict = if r.sessions > GOAL_LATENCY_MAX_SESSIONS {
                "no goal at this size"
            } else if p50 <= GOAL_LATENCY_RATIO && p99 <= GOAL_LATENCY_RATIO {
                "goal met"
            } else {
                "GOAL MISSED"
            };
            out.push(format!(
                "verify latency at {} sessions over {}: p50 {p50:.2}x, p99 {p99:.2}x (goal: \
                 both within {GOAL_LATENCY_RATIO}x up to {} sessions): {verdict}",
                stats::fmt_rate(r.sessions as f64),
                stats::fmt_rate(base.sessions as f64),
                stats::fmt_rate(GOAL_LATENCY_MAX_SESSIONS as f64),
            ));
        }
        for r in self.measured() {
            let b = r.bytes_per_session();
            let verdict = if r.sessions < GOAL_MEMORY_MIN_SESSIONS {
                "no goal at this size (the process's fixed costs dominate)"
            } else if b <= GOAL_BYTES_PER_SESSION {
                "goal met"
            } else {
                "GOAL MISSED"
            };
            out.push(format!(
                "resident memory at {} sessions: {b:.0} bytes per session (goal: at most \
                 {GOAL_BYTES_PER_SESSION:.0}): {verdict}",
                stats::fmt_rate(r.sessions as f64),
            ));
        }
        out
    }

    /// Prints the details.
    pub fn print(&self) {
        println!("scale: in-process verify and resident memory by stored sessions");
        for o in &self.outcomes {
            match o {
                Outcome::Measured(r) => {
                    println!(
                        "  {} sessions: loaded in {:.1} s ({} creates/s); RSS {} -> {} MiB \
                         ({:.0} B per session; {} MiB after verifying); database {} MiB; {} \
                         verifies/s on {} threads, {}; errors {}; size_of::<SessionRecord>() \
                         = {} B",
                        stats::fmt_rate(r.sessions as f64),
                        r.load_secs,
                        stats::fmt_rate(r.load_rate()),
                        r.rss_before >> 20,
                        r.rss_loaded >> 20,
                        r.bytes_per_session(),
                        r.rss_after_verify >> 20,
                        r.db_bytes >> 20,
                        stats::fmt_rate(r.throughput()),
                        r.threads,
                        r.latencies().line(),
                        r.errors,
                        r.record_size,
                    );
                }
                Outcome::Skipped { sessions, reason } => {
                    println!(
                        "  {} sessions: skipped: {reason}",
                        stats::fmt_rate(*sessions as f64)
                    );
                }
            }
        }
        for g in self.goals() {
            println!("  {g}");
        }
    }
}

/// A larger size's p50 and p99 over the base size's.
fn ratios(base: &SizeResult, r: &SizeResult) -> (f64, f64) {
    // Nanosecond latencies stay far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let ratio = |a: u64, b: u64| a as f64 / (b.max(1) as f64);
    (ratio(r.p50_ns, base.p50_ns), ratio(r.p99_ns, base.p99_ns))
}

/// The `VmRSS` of a `/proc/PID/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS:")
}

/// The `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    kib_field(meminfo, "MemAvailable:")
}

/// A `Name:   123 kB` line's value, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

/// This process's resident memory, in bytes.
fn rss() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    parse_vm_rss(&status).context("no VmRSS in /proc/self/status")
}

/// The memory the kernel reports available, in bytes.
fn mem_available() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    parse_mem_available(&meminfo).context("no MemAvailable in /proc/meminfo")
}

/// The bytes of the files in `dir` (not recursive).
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let meta = e
            .and_then(|e| e.metadata())
            .context("cannot read a database file's size")?;
        total += meta.len();
    }
    Ok(total)
}

/// Whether `path` is on a tmpfs (so files there take memory), from `/proc/mounts`.
fn on_tmpfs(path: &Path) -> anyhow::Result<bool> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(fs_type(&mounts, &path).is_some_and(|t| t == "tmpfs"))
}

/// The file system type of the longest mount point of `mounts` (`/proc/mounts`) that holds
/// `path`.
pub fn fs_type<'a>(mounts: &'a str, path: &Path) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_, point, kind) = (w.next()?, w.next()?, w.next()?);
            path.starts_with(point).then_some((point.len(), kind))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// Whether a child with `sessions` stored sessions is estimated to fit: `Err` says why not.
///
/// The estimate is the base resident memory plus `bytes_per_session` for each session, both
/// from the largest size measured so far; it must stay within `fraction` of `available`.
pub fn fits(
    sessions: usize,
    base_rss: u64,
    bytes_per_session: f64,
    available: u64,
    fraction: f64,
) -> Result<u64, String> {
    // Estimates: sizes and byte counts far below 2^53, rounding is intended.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let (need, allowed) = (
        base_rss.saturating_add((sessions as f64 * bytes_per_session.max(0.0)).ceil() as u64),
        (available as f64 * fraction.clamp(0.0, 1.0)) as u64,
    );
    if need <= allowed {
        Ok(need)
    } else {
        Err(format!(
            "estimated {} MiB ({bytes_per_session:.0} B per session), more than {:.0}% of the \
             {} MiB available",
            need >> 20,
            fraction * 100.0,
            available >> 20
        ))
    }
}

/// Runs every size, each in a child process.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.threads > 0, "--threads must be at least 1");
    let exe = std::env::current_exe().context("cannot tell where this program is")?;
    let mut outcomes = Vec::new();
    let mut largest: Option<SizeResult> = None;
    let db_in_memory = match &settings.db_dir {
        Some(d) => on_tmpfs(d)?,
        None => on_tmpfs(&std::env::temp_dir())?,
    };
    for &n in &settings.sizes {
        let (base, per) = largest
            .as_ref()
            .map_or((PRIOR_BASE_RSS, PRIOR_BYTES_PER_SESSION), |r| {
                r.estimate(db_in_memory)
            });
        let skip = match largest.as_ref() {
            Some(r) if n <= r.sessions => None,
            _ => fits(n, base, per, mem_available()?, settings.memory_fraction).err(),
        };
        if let Some(reason) = skip {
            println!("scale: {n} sessions skipped: {reason}");
            outcomes.push(Outcome::Skipped {
                sessions: n,
                reason,
            });
            continue;
        }
        let r = run_child(&exe, n, settings)?;
        if largest.as_ref().is_none_or(|l| r.sessions > l.sessions) {
            largest = Some(r.clone());
        }
        outcomes.push(Outcome::Measured(r));
    }
    Ok(Report { outcomes })
}

/// Runs one size in a child process and reads its result.
fn run_child(exe: &std::path::Path, n: usize, s: &Settings) -> anyhow::Result<SizeResult> {
    eprintln!("scale: {n} sessions, in a child process");
    let out = std::process::Command::new(exe)
        .arg("scale-child")
        .args(["--sessions", &n.to_string()])
        .args(["--seconds", &s.duration.as_secs_f64().to_string()])
        .args(["--threads", &s.threads.to_string()])
        .args(["--concurrency", &s.concurrency.to_string()])
        .args([
            "--flush-seconds",
            &s.flush_interval.as_secs_f64().to_string(),
        ])
        .args(
            s.db_dir
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--db-dir"), d.as_os_str()]),
        )
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run the scale child process")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the scale child process for {n} sessions failed ({}): {stdout}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_MARKER))
        .context("the scale child process printed no result")?;
    serde_json::from_str(line).context("the scale child process's result is not valid")
}

/// The child: loads `sessions`, measures, and prints its result line.
pub fn child(a: &ChildArgs) -> anyhow::Result<()> {
    let r = measure(
        a.sessions,
        Duration::from_secs_f64(a.seconds),
        a.threads,
        a.concurrency,
        a.db_dir.as_deref(),
        Duration::from_secs_f64(a.flush_seconds),
    )?;
    let json = serde_json::to_string(&r).context("cannot encode the result")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{RESULT_MARKER}{json}").context("cannot write the result")?;
    stdout.flush().context("cannot write the result")
}

/// Tokens of equal length, back to back in one buffer: its size is known and resident before
/// the load, so it does not count as the store's memory.
struct Tokens {
    buf: Vec<u8>,
    len: usize,
}

impl Tokens {
    fn get(&self, i: usize) -> &[u8] {
        &self.buf[i * self.len..(i + 1) * self.len]
    }
}

/// Loads the store, measures memory, then verifies.
fn measure(
    n: usize,
    duration: Duration,
    threads: usize,
    concurrency: usize,
    db_dir: Option<&Path>,
    flush_interval: Duration,
) -> anyhow::Result<SizeResult> {
    anyhow::ensure!(
        n > 0 && threads > 0 && concurrency > 0,
        "sizes must be at least 1"
    );
    let dir = match db_dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("cannot create a temporary directory")?;
    let store: Arc<dyn sessiond_core::store::SessionStore> = Arc::new(
        EmbeddedStore::open(
            dir.path(),
            EmbeddedOptions {
                flush_interval,
                ..EmbeddedOptions::default()
            },
        )
        .context("cannot open the embedded store")?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the loading runtime")?;
    let service = Arc::new(SessionService::new(
        store,
        Arc::new(SystemClock),
        Arc::new(NoopSink),
        ServiceConfig::default(),
    ));
    // Sessions must outlive a long load: idle expiry as long as the absolute timeout (12 h by
    // default), and no per-user limit.
    let defaults = PolicyDocument::default();
    let policy = PolicyDocument {
        idle_timeout_s: defaults.absolute_timeout_s,
        max_sessions_per_user: None,
        ..defaults
    };
    rt.block_on(service.put_policy("default", policy, &Audit::new("bench")))
        .context("cannot set the scale policy")?;
    // One create first, for the token length; the buffer is filled (so resident) before the
    // baseline is read.
    let first = rt.block_on(create_one(&service, 0))?;
    let len = first.len();
    let mut tokens = Tokens {
        buf: vec![b'-'; n.checked_mul(len).context("too many sessions")?],
        len,
    };
    tokens.buf[..len].copy_from_slice(first.as_bytes());
    let rss_before = rss()?;

    let started = Instant::now();
    rt.block_on(load(&service, &mut tokens, n, concurrency))?;
    let load_secs = started.elapsed().as_secs_f64();
    let rss_loaded = rss()?;
    let db_bytes = dir_bytes(dir.path())?;
    eprintln!(
        "scale: {n} sessions loaded in {load_secs:.1} s ({} creates/s)",
        stats::fmt_rate(stats::rate(n as u64, started.elapsed()))
    );

    let barrier = Barrier::new(threads);
    let results: Vec<anyhow::Result<ThreadResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (service, tokens, barrier) = (&service, &tokens, &barrier);
                std::thread::Builder::new()
                    .name(format!("verify-{i}"))
                    .spawn_scoped(scope, move || {
                        verify_loop(service, tokens, n, duration, barrier)
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a verify thread panicked"))),
                Err(e) => Err(anyhow::anyhow!("cannot start a verify thread: {e}")),
            })
            .collect()
    });
    let mut histogram = stats::new_histogram()?;
    let (mut ops, mut errors, mut elapsed) = (0, 0, Duration::ZERO);
    for r in results {
        let (o, e, d, h) = r?;
        ops += o;
        errors += e;
        elapsed = elapsed.max(d);
        stats::merge(&mut histogram, &h)?;
    }
    let rss_after_verify = rss()?;
    let l = Latencies::of(&histogram);
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    rt.block_on(service.store().flush())
        .context("final flush of the embedded store")?;
    Ok(SizeResult {
        sessions: n,
        load_secs,
        rss_before,
        rss_loaded,
        rss_after_verify,
        threads,
        ops,
        errors,
        elapsed_secs: elapsed.as_secs_f64(),
        p50_ns: ns(l.p50),
        p99_ns: ns(l.p99),
        p999_ns: ns(l.p999),
        max_ns: ns(l.max),
        mean_ns: ns(l.mean),
        record_size: std::mem::size_of::<SessionRecord>(),
        token_len: len,
        db_bytes,
    })
}

/// Creates the `i`th session (its own user) and answers its token.
async fn create_one(service: &SessionService, i: usize) -> anyhow::Result<String> {
    let req = CreateSessionRequest {
        user_id: format!("bench-user-{i}"),
        ..CreateSessionRequest::default()
    };
    let issued = service
        .create(&req, &Audit::new("bench"))
        .await
        .with_context(|| format!("create {i} failed"))?;
    Ok(issued.token.expose().to_owned())
}

/// Creates sessions 1..n with `concurrency` creates in flight, storing their tokens, and
/// prints progress to stderr every few seconds.
async fn load(
    service: &Arc<SessionService>,
    tokens: &mut Tokens,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut reported = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let (mut next, mut done) = (1, 1);
    while done < n {
        while next < n && tasks.len() < concurrency {
            let (service, i) = (service.clone(), next);
            tasks.spawn(async move { create_one(&service, i).await.map(|t| (i, t)) });
            next += 1;
        }
        let Some(finished) = tasks.join_next().await else {
            break;
        };
        let (i, token) = finished.context("a create task failed")??;
        anyhow::ensure!(
            token.len() == tokens.len,
            "tokens of different lengths ({} and {})",
            token.len(),
            tokens.len
        );
        tokens.buf[i * tokens.len..(i + 1) * tokens.len].copy_from_slice(token.as_bytes());
        done += 1;
        if reported.elapsed() >= Duration::from_secs(5) {
            reported = Instant::now();
            eprintln!(
                "scale: loaded {} of {} ({} creates/s)",
                stats::fmt_rate(done as f64),
                stats::fmt_rate(n as f64),
                stats::fmt_rate(stats::rate(done as u64, started.elapsed())),
            );
        }
    }
    Ok(())
}

/// What one verifying thread did: verifies, errors, its measured time and latencies.
type ThreadResult = (u64, u64, Duration, hdrhistogram::Histogram<u64>);

/// One verifying thread: a current-thread runtime verifying random sessions until `duration`
/// has passed, reusing one request whose token is overwritten in place.
fn verify_loop(
    service: &SessionService,
    tokens: &Tokens,
    n: usize,
    duration: Duration,
    barrier: &Barrier,
) -> anyhow::Result<ThreadResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a current-thread runtime")?;
    let mut rng = fastrand::Rng::new();
    let mut histogram = stats::new_histogram()?;
    let (mut ops, mut errors) = (0u64, 0u64);
    let mut req = VerifyRequest {
        token: Some(String::with_capacity(tokens.len)),
        access_token: None,
        client: None,
        require: None,
    };
    barrier.wait();
    let start = Instant::now();
    let deadline = start + duration;
    let mut last = start;
    rt.block_on(async {
        loop {
            if let Some(t) = req.token.as_mut() {
                t.clear();
                t.push_str(&String::from_utf8_lossy(tokens.get(rng.usize(..n))));
            }
            if service.verify(&req).await.is_err() {
                errors += 1;
            }
            ops += 1;
            let now = Instant::now();
            stats::record(&mut histogram, now - last);
            last = now;
            if now >= deadline {
                break;
            }
        }
    });
    Ok((ops, errors, last - start, histogram))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_and_available_memory_are_parsed_in_bytes() {
        let status =
            "Name:\tsessiond-bench\nVmPeak:\t  20000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20_000_000 * 1024));
    }

    #[test]
    fn the_estimate_must_fit_in_the_fraction_of_available_memory() {
        let gib = 1u64 << 30;
        // 10 M sessions at 800 B and a 64 MiB base: about 7.5 GiB.
        let need = fits(10_000_000, 64 << 20, 800.0, 20 * gib, 0.7);
        assert!(need.is_ok_and(|b| b > 7 * gib && b < 8 * gib));
        // The same in 10 GiB available: 7 GiB allowed, so it does not fit.
        let err = fits(10_000_000, 64 << 20, 800.0, 10 * gib, 0.7);
        assert!(err.is_err_and(|e| e.contains("70%")));
    }

    #[test]
    fn file_systems_are_told_by_the_longest_mount_point() {
        let mounts =
            "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\ndevtmpfs /dev devtmpfs rw 0 0\n";
        assert_eq!(fs_type(mounts, Path::new("/dev/shm/x")), Some("tmpfs"));
        assert_eq!(fs_type(mounts, Path::new("/dev/null")), Some("devtmpfs"));
        assert_eq!(fs_type(mounts, Path::new("/tmp/x")), Some("ext4"));
        assert_eq!(fs_type("", Path::new("/tmp")), None);
    }

    #[test]
    fn larger_sizes_are_estimated_from_the_largest_measured() {
        let mut r = result(1_000_000, 1000, 3000, 1_000_000 * 900);
        r.rss_before = (64 << 20) + 47_000_000;
        r.rss_loaded = r.rss_before + 900_000_000;
        r.rss_after_verify = r.rss_loaded;
        r.db_bytes = 500_000_000;
        let (base, per) = r.estimate(false);
        assert_eq!(base, 64 << 20);
        assert!((per - 947.0).abs() < 1e-9);
        let (_, per) = r.estimate(true);
        assert!((per - 1447.0).abs() < 1e-9);
    }

    fn result(sessions: usize, p50_ns: u64, p99_ns: u64, grown: u64) -> SizeResult {
        SizeResult {
            sessions,
            load_secs: 1.0,
            rss_before: 1 << 20,
            rss_loaded: (1 << 20) + grown,
            rss_after_verify: (1 << 20) + grown,
            threads: 2,
            ops: 1000,
            errors: 0,
            elapsed_secs: 1.0,
            p50_ns,
            p99_ns,
            p999_ns: p99_ns * 2,
            max_ns: p99_ns * 4,
            mean_ns: p50_ns,
            record_size: 200,
            token_len: 47,
            db_bytes: 0,
        }
    }

    #[test]
    fn goals_are_checked_against_the_smallest_size() {
        let report = Report {
            outcomes: vec![
                Outcome::Measured(result(10_000, 1000, 3000, 10_000 * 900)),
                Outcome::Measured(result(1_000_000, 1200, 4500, 1_000_000 * 1100)),
                Outcome::Skipped {
                    sessions: 10_000_000,
                    reason: "too big".into(),
                },
            ],
        };
        let goals = report.goals();
        assert_eq!(goals.len(), 3);
        assert!(goals[0].contains("p50 1.20x, p99 1.50x") && goals[0].ends_with("GOAL MISSED"));
        assert!(goals[1].contains("900 bytes") && goals[1].ends_with("dominate)"));
        assert!(goals[2].contains("1100 bytes") && goals[2].ends_with("GOAL MISSED"));
        let table = report.table();
        assert!(table.contains("| 10,000,000 | skipped: too big |"));
        assert_eq!(report.rows().len(), 2);
    }
}
