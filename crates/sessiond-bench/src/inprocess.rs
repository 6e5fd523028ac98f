//! The in-process scenario: `SessionService::verify_session` on the embedded store, no HTTP.
//!
//! N sessions are created through the service, then T OS threads, each driving its own
//! current-thread tokio runtime, verify random tokens in a closed loop for S seconds. The
//! [`Mode`] says which token: the opaque session token, an access token (JWT) verified by the
//! server (signature and the session's state), or an access token verified locally by the SDK
//! (`sessiond-client`'s `AccessTokenVerifier`, signature and claims only, no store).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use sessiond_api::{
    ClientInput, CreateSessionRequest, PolicyDocument, TokensPolicy, VerifyRequest,
};
use sessiond_client::AccessTokenVerifier;
use sessiond_core::events::{Audit, Event, EventSink};
use sessiond_core::guard::{Guard, GuardConfig};
use sessiond_core::jwt::SigningAlg;
use sessiond_core::keys::Keys;
use sessiond_core::service::{ServiceConfig, SessionService};
use sessiond_core::time::{Clock, SystemClock};
use sessiond_store::{EmbeddedOptions, EmbeddedStore};

use crate::stats::{self, Latencies, Row};

/// Sessions created concurrently per batch while setting up (the store commits a batch's
/// inserts together).
const CREATE_BATCH: usize = 512;

/// Settings of the in-process scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sessions to create and verify at random.
    pub sessions: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Verifying OS threads.
    pub threads: usize,
    /// Which token is verified, and by whom.
    pub mode: Mode,
}

/// Which token the scenario verifies, and by whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The opaque session token, by `SessionService::verify_session`.
    Opaque,
    /// An access token (EdDSA JWT), by `SessionService::verify_session`: signature, claims and the
    /// session's state in the store.
    AccessToken,
    /// An access token, by the SDK's `AccessTokenVerifier` from its JWKS cache: signature and
    /// claims, no store and no network.
    Sdk,
    /// The opaque session token with the client's IP, brute-force detection off.
    ClientIpUnguarded,
    /// The opaque session token with the client's IP, brute-force detection on.
    ClientIpGuarded,
    /// Unknown tokens from [`FLOOD_NETWORKS`] client networks, brute-force detection on: every
    /// answer is an error (`session_unknown`, or `too_many_attempts` once a network is blocked).
    Flood,
}

/// Distinct client networks of the [`Mode::Flood`] scenario.
pub const FLOOD_NETWORKS: usize = 200_000;

impl Mode {
    fn guarded(self) -> bool {
        matches!(self, Self::ClientIpGuarded | Self::Flood)
    }

    /// Whether every verify should succeed (else every verify should fail).
    pub fn valid(self) -> bool {
        self != Self::Flood
    }
}

/// Every mode, in the order of the table.
pub const ALL_MODES: [Mode; 3] = [Mode::Opaque, Mode::AccessToken, Mode::Sdk];

/// The modes of `inprocess --guard`: detection off and on, alternating, then the flood.
pub const GUARD_MODES: [Mode; 5] = [
    Mode::ClientIpUnguarded,
    Mode::ClientIpGuarded,
    Mode::ClientIpUnguarded,
    Mode::ClientIpGuarded,
    Mode::Flood,
];

const ISSUER: &str = "https://bench.sessiond.invalid";
const AUDIENCE: &str = "bench";

/// An event sink that drops every event: the benchmark measures verify, not logging.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSink;

impl EventSink for NoopSink {
    fn record(&self, _event: &Event) {}
}

/// What one verifying thread did.
#[derive(Debug)]
pub struct ThreadResult {
    /// Verifies completed.
    pub ops: u64,
    /// Verifies that answered an error (must be 0: every token is valid).
    pub errors: u64,
    /// Time from the thread's start to its last verify.
    pub elapsed: Duration,
    /// Time of each iteration (one verify plus the loop's own few ns of bookkeeping).
    pub histogram: Histogram<u64>,
}

/// The outcome of the in-process scenario.
#[derive(Debug)]
pub struct Report {
    /// The settings it ran with.
    pub settings: Settings,
    /// How long creating the sessions took.
    pub created_in: Duration,
    /// Per thread.
    pub threads: Vec<ThreadResult>,
    /// All threads' iteration times.
    pub histogram: Histogram<u64>,
}

impl Report {
    /// Verifies completed by all threads.
    pub fn ops(&self) -> u64 {
        self.threads.iter().map(|t| t.ops).sum()
    }

    /// Errors of all threads.
    pub fn errors(&self) -> u64 {
        self.threads.iter().map(|t| t.errors).sum()
    }

    /// The measured wall time: the longest thread's.
    pub fn elapsed(&self) -> Duration {
        self.threads
            .iter()
            .map(|t| t.elapsed)
            .max()
            .unwrap_or_default()
    }

    /// Verifies per second, all threads together.
    pub fn throughput(&self) -> f64 {
        stats::rate(self.ops(), self.elapsed())
    }

    /// Mean thread time per verify: the sum of the threads' times over all verifies.
    pub fn mean_per_op(&self) -> Duration {
        let busy: Duration = self.threads.iter().map(|t| t.elapsed).sum();
        let ops = u32::try_from(self.ops().max(1)).unwrap_or(u32::MAX);
        busy / ops
    }

    /// Prints the details.
    pub fn print(&self) {
        let s = &self.settings;
        println!(
            "in-process verify ({:?}): {} sessions (created in {:.2} s, {} creates/s), {} threads, {:.1} s",
            s.mode,
            s.sessions,
            self.created_in.as_secs_f64(),
            stats::fmt_rate(stats::rate(s.sessions as u64, self.created_in)),
            s.threads,
            self.elapsed().as_secs_f64(),
        );
        for (i, t) in self.threads.iter().enumerate() {
            let per_op = t.elapsed / u32::try_from(t.ops.max(1)).unwrap_or(u32::MAX);
            println!(
                "  thread {i}: {} verifies in {:.2} s = {} verifies/s, mean {} per verify, errors {}",
                t.ops,
                t.elapsed.as_secs_f64(),
                stats::fmt_rate(stats::rate(t.ops, t.elapsed)),
                stats::fmt_duration(per_op),
                t.errors,
            );
        }
        println!(
            "  total: {} verifies = {} verifies/s; mean {} per verify per thread; errors {}",
            self.ops(),
            stats::fmt_rate(self.throughput()),
            stats::fmt_duration(self.mean_per_op()),
            self.errors(),
        );
        println!(
            "  per-verify latency: {}",
            Latencies::of(&self.histogram).line()
        );
    }

    /// The summary row.
    pub fn row(&self) -> Row {
        Row {
            scenario: match self.settings.mode {
                Mode::Opaque => format!(
                    "in-process `SessionService::verify_session`, {} threads",
                    self.settings.threads
                ),
                Mode::AccessToken => format!(
                    "in-process `SessionService::verify_session` of an access token (EdDSA), {} threads",
                    self.settings.threads
                ),
                Mode::Sdk => format!(
                    "SDK local access-token verify (EdDSA, no network), {} threads",
                    self.settings.threads
                ),
                Mode::ClientIpUnguarded => format!(
                    "in-process verify with client IP, brute-force detection off, {} threads",
                    self.settings.threads
                ),
                Mode::ClientIpGuarded => format!(
                    "in-process verify with client IP, brute-force detection on, {} threads",
                    self.settings.threads
                ),
                Mode::Flood => format!(
                    "in-process verify of unknown tokens from {FLOOD_NETWORKS} networks, \
                     detection on, {} threads",
                    self.settings.threads
                ),
            },
            throughput: self.throughput(),
            unit: "verifies/s",
            latencies: Latencies::of(&self.histogram),
            ratio: None,
        }
    }
}

/// Runs the scenario.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(settings.threads > 0, "--threads must be at least 1");
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let store: Arc<dyn sessiond_core::store::SessionStore> = Arc::new(
        EmbeddedStore::open(dir.path(), EmbeddedOptions::default())
            .context("cannot open the embedded store")?,
    );
    let setup = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .enable_all()
        .build()
        .context("cannot start the setup runtime")?;
    let mut service = SessionService::new(
        store.clone(),
        Arc::new(SystemClock),
        Arc::new(NoopSink),
        ServiceConfig::default(),
    );
    if settings.mode.guarded() {
        service = service.with_guard(Arc::new(Guard::new(
            GuardConfig::default(),
            SystemClock.now(),
        )));
    }
    if matches!(settings.mode, Mode::AccessToken | Mode::Sdk) {
        let keys = setup
            .block_on(Keys::load_or_init(
                store,
                None,
                SigningAlg::EdDSA,
                SystemClock.now(),
            ))
            .context("cannot create the keyring")?;
        service = service.with_keys(Arc::new(keys));
        let policy = PolicyDocument {
            tokens: Some(TokensPolicy {
                access_token_ttl_s: 3600,
                ..TokensPolicy::new(ISSUER, AUDIENCE)
            }),
            ..PolicyDocument::default()
        };
        setup
            .block_on(service.put_policy("default", policy, &Audit::new("bench")))
            .context("cannot set the token-mode policy")?;
    }
    let service = Arc::new(service);

    let started = Instant::now();
    let tokens = setup.block_on(create_sessions(&service, settings.sessions, settings.mode))?;
    let created_in = started.elapsed();
    let opaque = !matches!(settings.mode, Mode::AccessToken | Mode::Sdk);
    let ip = |i: usize| {
        Some(ClientInput {
            ip: Some(format!(
                "10.{}.{}.{}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )),
            user_agent: None,
        })
    };
    let requests: Vec<VerifyRequest> = match settings.mode {
        Mode::Flood => (0..FLOOD_NETWORKS)
            .map(|i| VerifyRequest {
                token: Some(format!("sdt_{:0>43}", fastrand::u64(..))),
                access_token: None,
                client: ip(i),
                require: None,
            })
            .collect(),
        _ => tokens
            .iter()
            .enumerate()
            .map(|(i, token)| VerifyRequest {
                token: opaque.then(|| token.clone()),
                access_token: (!opaque).then(|| token.clone()),
                client: matches!(
                    settings.mode,
                    Mode::ClientIpGuarded | Mode::ClientIpUnguarded
                )
                .then(|| ip(i))
                .flatten(),
                require: None,
            })
            .collect(),
    };
    let sdk = if settings.mode == Mode::Sdk {
        Some(setup.block_on(sdk_verifier(&service))?)
    } else {
        None
    };
    let target = match &sdk {
        Some(v) => Target::Sdk(v, &tokens),
        None => Target::Service(&service, &requests, settings.mode.valid()),
    };

    let barrier = Barrier::new(settings.threads);
    let results: Vec<anyhow::Result<ThreadResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..settings.threads)
            .map(|i| {
                let (target, barrier) = (&target, &barrier);
                std::thread::Builder::new()
                    .name(format!("verify-{i}"))
                    .spawn_scoped(scope, move || {
                        verify_loop(target, settings.duration, barrier)
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
    let threads = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let mut histogram = stats::new_histogram()?;
    for t in &threads {
        stats::merge(&mut histogram, &t.histogram)?;
    }

    // Leave the store tidy before its directory goes.
    setup
        .block_on(service.store().flush())
        .context("final flush of the embedded store")?;
    drop(service);
    drop(setup);
    drop(dir);

    Ok(Report {
        settings: settings.clone(),
        created_in,
        threads,
        histogram,
    })
}

/// What the verifying threads call.
enum Target<'a> {
    Service(&'a SessionService, &'a [VerifyRequest], bool),
    Sdk(&'a AccessTokenVerifier, &'a [String]),
}

impl Target<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Service(_, r, _) => r.len(),
            Self::Sdk(_, t) => t.len(),
        }
    }

    /// Verifies the `i`th token; `true` if it answered as expected (valid, or for the flood
    /// refused).
    async fn verify(&self, i: usize) -> bool {
        match self {
            Self::Service(s, r, valid) => s.verify_session(&r[i]).await.is_ok() == *valid,
            Self::Sdk(v, t) => v.verify_cached(&t[i]).is_ok(),
        }
    }
}

/// An SDK verifier whose cache holds the service's keys, served once from a loopback JWKS
/// endpoint as an application would fetch them.
async fn sdk_verifier(service: &Arc<SessionService>) -> anyhow::Result<AccessTokenVerifier> {
    let jwks = service.jwks().await.context("no keyring")?;
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let verifier = AccessTokenVerifier::builder(
        &format!("http://{addr}/.well-known/jwks.json"),
        ISSUER,
        AUDIENCE,
    )
    .build()
    .context("cannot build the SDK verifier")?;
    let n = verifier
        .refresh_keys()
        .await
        .map_err(|e| anyhow::anyhow!("cannot fetch the JWKS: {e:?}"))?;
    anyhow::ensure!(n > 0, "the JWKS holds no key");
    server.abort();
    Ok(verifier)
}

/// Creates `n` sessions through the service, [`CREATE_BATCH`] at a time, and answers their
/// session tokens, or their access tokens in the token modes.
async fn create_sessions(
    service: &Arc<SessionService>,
    n: usize,
    mode: Mode,
) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(n);
    for first in (0..n).step_by(CREATE_BATCH) {
        let mut batch = tokio::task::JoinSet::new();
        for i in first..(first + CREATE_BATCH).min(n) {
            let service = service.clone();
            batch.spawn(async move {
                let req = CreateSessionRequest {
                    user_id: format!("bench-user-{i}"),
                    ..CreateSessionRequest::default()
                };
                service
                    .create(&req, &Audit::new("bench"))
                    .await
                    .map(|issued| match mode {
                        Mode::AccessToken | Mode::Sdk => {
                            issued.access_token.map(|(t, _)| t).unwrap_or_default()
                        }
                        _ => issued.token.expose().to_owned(),
                    })
            });
        }
        while let Some(done) = batch.join_next().await {
            tokens.push(done.context("a create task failed")??);
        }
    }
    Ok(tokens)
}

/// One verifying thread: a current-thread runtime verifying random tokens until `duration`
/// has passed. One clock read per iteration serves both the latency and the deadline.
fn verify_loop(
    target: &Target<'_>,
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
    barrier.wait();
    let start = Instant::now();
    let deadline = start + duration;
    let mut last = start;
    rt.block_on(async {
        let n = target.len();
        if n == 0 {
            return;
        }
        loop {
            if !target.verify(rng.usize(..n)).await {
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
    Ok(ThreadResult {
        ops,
        errors,
        elapsed: last - start,
        histogram,
    })
}
