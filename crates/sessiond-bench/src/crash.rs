//! The crash scenario: a mixed create/rotate/revoke/logout/force-logout load against a real
//! `sessiond` process, killed with SIGKILL at random moments and restarted on the same store;
//! after every restart, every acknowledged operation is checked.
//!
//! Each worker owns its users and works on its own sessions one request at a time, so its model
//! of what must be true is exact: a session whose create was answered `201` must verify; one
//! whose revocation (by handle, logout or force logout) was answered `200` must be refused as
//! revoked; a token rotated away by an answered rotate must be unknown. A request that was in
//! flight when the process died has an unknown outcome: the session it touched is set aside and
//! no longer checked (it must still never make the server answer 5xx).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sessiond_core::token::TokenFormat;
use sessiond_server::config::Config;

use crate::cleanup::Cleanup;
use crate::http::Store;

/// Settings of the crash scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `sessiond` binary.
    pub bin: PathBuf,
    /// The store.
    pub store: Store,
    /// How many times the server is killed.
    pub kills: usize,
    /// Concurrent workers.
    pub workers: usize,
    /// Shortest and longest time of load before a kill.
    pub min_run: Duration,
    /// Longest time of load before a kill.
    pub max_run: Duration,
    /// Seed of the random choices (operations, kill times).
    pub seed: u64,
}

/// A session as the model knows it.
#[derive(Debug, Clone)]
struct Known {
    token: String,
    handle: String,
    user: usize,
}

/// One worker's model of what must hold.
#[derive(Debug, Default)]
struct Model {
    /// Created, rotated or verified with an answer, and not ended by an answered request.
    live: Vec<Known>,
    /// Ended by an answered revoke, logout or force logout.
    revoked: Vec<Known>,
    /// Tokens replaced by an answered rotate (the session lives on under a new token).
    rotated_away: Vec<String>,
    /// Sessions touched by a request whose outcome is unknown: not checked any more.
    uncertain: usize,
}

/// Counts of answered operations and of checks.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Creates answered 201.
    pub created: u64,
    /// Rotations answered 200.
    pub rotated: u64,
    /// Revocations by handle answered 200.
    pub revoked: u64,
    /// Logouts answered 200.
    pub logged_out: u64,
    /// Force logouts answered 200, and the sessions they ended.
    pub force_logouts: u64,
    /// Verifies answered 200 during the load.
    pub verified: u64,
    /// Requests whose outcome is unknown (in flight at a kill).
    pub unknown: u64,
    /// Checks made after restarts.
    pub checks: u64,
    /// Checks that failed: an acknowledged operation was lost.
    pub lost: u64,
    /// 5xx answers other than while the process was being killed.
    pub server_errors: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.created += o.created;
        self.rotated += o.rotated;
        self.revoked += o.revoked;
        self.logged_out += o.logged_out;
        self.force_logouts += o.force_logouts;
        self.verified += o.verified;
        self.unknown += o.unknown;
        self.checks += o.checks;
        self.lost += o.lost;
        self.server_errors += o.server_errors;
    }
}

/// The outcome.
#[derive(Debug)]
pub struct Report {
    /// The settings it ran with.
    pub settings: Settings,
    /// Kills made.
    pub kills: usize,
    /// The counts.
    pub counts: Counts,
    /// Sessions still checked at the end (live and revoked).
    pub tracked: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// Prints the report.
    pub fn print(&self) {
        let c = &self.counts;
        println!(
            "crash: {} kills (SIGKILL) of sessiond on the {} store, {} workers, seed {}, {:.1} s",
            self.kills,
            self.settings.store.name(),
            self.settings.workers,
            self.settings.seed,
            self.elapsed.as_secs_f64()
        );
        println!(
            "  acknowledged: {} creates, {} rotations, {} revocations, {} logouts, {} force \
             logouts, {} verifies; {} requests in flight at a kill (outcome unknown)",
            c.created, c.rotated, c.revoked, c.logged_out, c.force_logouts, c.verified, c.unknown
        );
        println!(
            "  checks after restarts: {}; sessions tracked at the end: {}; acknowledged \
             operations lost: {}; unexpected 5xx: {}",
            c.checks, self.tracked, c.lost, c.server_errors
        );
    }
}

/// A running server process.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) base: String,
}

/// Starts `sessiond serve` on a free port, and waits until it listens.
pub(crate) fn start(
    bin: &Path,
    dir: &Path,
    key: &str,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<Proc> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let from = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env_clear()
        .env("SESSIOND_API_KEY", key)
        .env("SESSIOND_LOG", "info")
        // Workers create sessions for a few users as fast as they can: past the creation
        // limits, which are not what this checks.
        .env("SESSIOND_PROTECTION__ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut text = String::new();
        std::fs::File::open(log)?.read_to_string(&mut text)?;
        let text = text.get(usize::try_from(from)?..).unwrap_or("");
        if let Some(addr) = text
            .lines()
            .find(|l| l.contains("sessiond listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
        {
            return Ok(Proc {
                child,
                base: format!("http://{addr}"),
            });
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("sessiond exited with {status} before listening:\n{text}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "sessiond did not start in 30 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What an API call answered: a status and a JSON body, or nothing (no answer).
pub(crate) type Answer = Option<(StatusCode, Value)>;

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) key: String,
}

impl Api {
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.ok()?;
        let status = resp.status();
        let body = resp.json::<Value>().await.ok()?;
        Some((status, body))
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

fn token_of(body: &Value) -> Option<String> {
    body.get("token")?.as_str().map(str::to_owned)
}

fn handle_of(body: &Value) -> Option<String> {
    body.get("session")?
        .get("handle")?
        .as_str()
        .map(str::to_owned)
}

/// The worker's user names: its own, so no other worker touches its sessions.
fn user_name(worker: usize, user: usize) -> String {
    format!("crash-w{worker}-u{user}")
}

/// Users per worker.
const USERS: usize = 8;

/// One worker's load until `stop`: one request at a time, updating its model.
async fn work(
    api: &Api,
    worker: usize,
    model: &mut Model,
    rng: &mut fastrand::Rng,
    stop: &AtomicBool,
    counts: &mut Counts,
) {
    while !stop.load(Ordering::Relaxed) {
        let roll = rng.u32(..100);
        if model.live.is_empty() || roll < 35 {
            let user = rng.usize(..USERS);
            let ans = api
                .post("/v1/sessions", json!({"user_id": user_name(worker, user)}))
                .await;
            match ans {
                Some((StatusCode::CREATED, b)) => {
                    if let (Some(token), Some(handle)) = (token_of(&b), handle_of(&b)) {
                        model.live.push(Known {
                            token,
                            handle,
                            user,
                        });
                        counts.created += 1;
                    }
                }
                Some((s, _)) if s.is_server_error() => note_5xx(stop, counts),
                Some(_) => {}
                None => counts.unknown += 1,
            }
            continue;
        }
        let i = rng.usize(..model.live.len());
        let s = model.live.swap_remove(i);
        let outcome = if roll < 55 {
            let ans = api
                .post("/v1/sessions/verify", json!({"token": s.token}))
                .await;
            match ans {
                Some((StatusCode::OK, _)) => {
                    counts.verified += 1;
                    model.live.push(s);
                    continue;
                }
                // A verify changes nothing that must survive: no answer keeps the session.
                None => {
                    counts.unknown += 1;
                    model.live.push(s);
                    continue;
                }
                Some((st, b)) => {
                    // An acknowledged live session refused while the server runs: a loss.
                    if st == StatusCode::UNAUTHORIZED && !stop.load(Ordering::Relaxed) {
                        counts.lost += 1;
                        eprintln!(
                            "LOST (worker {worker}): session {} refused during load: {:?}",
                            s.handle,
                            b.get("code")
                        );
                    }
                    Some(st)
                }
            }
        } else if roll < 70 {
            let ans = api
                .post("/v1/sessions/rotate", json!({"token": s.token}))
                .await;
            match ans {
                Some((StatusCode::OK, b)) => {
                    if let Some(token) = token_of(&b) {
                        model.rotated_away.push(s.token.clone());
                        model.live.push(Known { token, ..s });
                        counts.rotated += 1;
                        continue;
                    }
                    Some(StatusCode::OK)
                }
                other => other.map(|(st, _)| st),
            }
        } else if roll < 82 {
            let ans = api
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/sessions/{}", s.handle),
                    None,
                )
                .await;
            if matches!(ans, Some((StatusCode::OK, _))) {
                counts.revoked += 1;
                model.revoked.push(s);
                continue;
            }
            ans.map(|(st, _)| st)
        } else if roll < 94 {
            let ans = api
                .post("/v1/sessions/logout", json!({"token": s.token}))
                .await;
            if matches!(ans, Some((StatusCode::OK, _))) {
                counts.logged_out += 1;
                model.revoked.push(s);
                continue;
            }
            ans.map(|(st, _)| st)
        } else {
            // Force logout of this session's user, sparing this session.
            let user = s.user;
            let path = format!(
                "/v1/users/{}/sessions?except={}",
                user_name(worker, user),
                s.handle
            );
            let ans = api.call(reqwest::Method::DELETE, &path, None).await;
            if matches!(ans, Some((StatusCode::OK, _))) {
                counts.force_logouts += 1;
                let (ended, kept): (Vec<Known>, Vec<Known>) =
                    model.live.drain(..).partition(|k| k.user == user);
                model.live = kept;
                model.revoked.extend(ended);
                model.live.push(s);
                continue;
            }
            // Unknown outcome: every live session of the user may or may not have ended.
            if ans.is_none() {
                let before = model.live.len();
                model.live.retain(|k| k.user != user);
                model.uncertain += before - model.live.len();
            }
            ans.map(|(st, _)| st)
        };
        // Not the expected answer: the session's fate is unknown from here on.
        match outcome {
            Some(st) if st.is_server_error() => note_5xx(stop, counts),
            Some(_) => {}
            None => counts.unknown += 1,
        }
        model.uncertain += 1;
    }
}

/// A 5xx while the process is being killed is expected; any other is counted.
fn note_5xx(stop: &AtomicBool, counts: &mut Counts) {
    if !stop.load(Ordering::Relaxed) {
        counts.server_errors += 1;
    }
}

/// Checks the model against a freshly restarted server.
async fn check(api: &Api, worker: usize, model: &Model, counts: &mut Counts) {
    let verify = async |token: &str| {
        api.post("/v1/sessions/verify", json!({"token": token}))
            .await
    };
    for s in &model.live {
        counts.checks += 1;
        match verify(&s.token).await {
            Some((StatusCode::OK, _)) => {}
            other => {
                counts.lost += 1;
                eprintln!(
                    "LOST (worker {worker}): session {} acknowledged live answers {:?}",
                    s.handle,
                    other.map(|(st, b)| (st, b.get("code").cloned()))
                );
            }
        }
    }
    for s in &model.revoked {
        counts.checks += 1;
        let ans = verify(&s.token).await;
        let code = ans
            .as_ref()
            .and_then(|(_, b)| b.get("code"))
            .and_then(Value::as_str);
        // A revoked session stays refused: revoked, or unknown once purged.
        if !matches!(code, Some("session_revoked" | "session_unknown")) {
            counts.lost += 1;
            eprintln!(
                "LOST (worker {worker}): session {} acknowledged revoked answers {:?}",
                s.handle,
                ans.map(|(st, b)| (st, b.get("code").cloned()))
            );
        }
    }
    for t in &model.rotated_away {
        counts.checks += 1;
        let ans = verify(t).await;
        let code = ans
            .as_ref()
            .and_then(|(_, b)| b.get("code"))
            .and_then(Value::as_str);
        if code != Some("session_unknown") {
            counts.lost += 1;
            eprintln!(
                "LOST (worker {worker}): a rotated-away token answers {:?}",
                ans.map(|(st, b)| (st, b.get("code").cloned()))
            );
        }
    }
}

/// The environment that points a `sessiond` process at the store `config` names (nothing for
/// the embedded store).
pub(crate) fn store_env(config: &Config) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Some(url) = &config.store {
        env.push(("SESSIOND_STORE".to_owned(), url.clone()));
        env.push((
            "SESSIOND_STORE_PREFIX".to_owned(),
            config.store_prefix.clone(),
        ));
        if let Some(schema) = &config.store_schema {
            env.push(("SESSIOND_STORE_SCHEMA".to_owned(), schema.clone()));
        }
    }
    env
}

/// Runs the scenario.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(
        settings.min_run <= settings.max_run && !settings.max_run.is_zero(),
        "the run times must be positive and ordered"
    );
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = tmp.path().join("data");
    let log = tmp.path().join("sessiond.log");
    let (key, _) = TokenFormat::new("sk_")?.generate()?;
    let key = key.expose().to_owned();
    let mut config = Config::default();
    let cleanup = Cleanup::configure(&mut config, &settings.store)?;
    let env = store_env(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = runtime.block_on(rounds(settings, &dir, &key, &env, &log));
    let cleaned = runtime.block_on(cleanup.run());
    let report = result?;
    cleaned?;
    Ok(report)
}

async fn rounds(
    settings: &Settings,
    dir: &Path,
    key: &str,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(settings.seed);
    let mut models: Vec<Model> = (0..settings.workers).map(|_| Model::default()).collect();
    let mut counts = Counts::default();
    let mut kills = 0;
    let http = reqwest::Client::new();
    let mut proc = start(&settings.bin, dir, key, env, log)?;
    loop {
        let api = Arc::new(Api {
            http: http.clone(),
            base: proc.base.clone(),
            key: key.to_owned(),
        });
        // Every acknowledged operation so far must hold on this (re)started server.
        let mut checks = tokio::task::JoinSet::new();
        for (w, model) in models.drain(..).enumerate() {
            let api = api.clone();
            checks.spawn(async move {
                let mut c = Counts::default();
                check(&api, w, &model, &mut c).await;
                (w, model, c)
            });
        }
        let mut back: Vec<(usize, Model, Counts)> = checks.join_all().await;
        back.sort_by_key(|(w, _, _)| *w);
        for (_, m, c) in back {
            counts.add(&c);
            models.push(m);
        }
        if kills == settings.kills {
            proc.child.kill().ok();
            proc.child.wait().ok();
            break;
        }
        // Load, then SIGKILL at a random moment while requests are in flight.
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = tokio::task::JoinSet::new();
        for (w, mut model) in models.drain(..).enumerate() {
            let (api, stop) = (api.clone(), stop.clone());
            let mut wrng = fastrand::Rng::with_seed(rng.u64(..));
            load.spawn(async move {
                let mut c = Counts::default();
                work(&api, w, &mut model, &mut wrng, &stop, &mut c).await;
                (w, model, c)
            });
        }
        let span = settings.max_run.saturating_sub(settings.min_run);
        let run_for = settings.min_run + span.mul_f64(rng.f64());
        tokio::time::sleep(run_for).await;
        proc.child.kill().context("cannot kill sessiond")?;
        stop.store(true, Ordering::Relaxed);
        proc.child.wait()?;
        kills += 1;
        let mut back: Vec<(usize, Model, Counts)> = load.join_all().await;
        back.sort_by_key(|(w, _, _)| *w);
        for (_, m, c) in back {
            counts.add(&c);
            models.push(m);
        }
        proc = start(&settings.bin, dir, key, env, log)?;
    }
    let tracked = models.iter().map(|m| m.live.len() + m.revoked.len()).sum();
    Ok(Report {
        settings: settings.clone(),
        kills,
        counts,
        tracked,
        elapsed: started.elapsed(),
    })
}
