//! The cost of webhooks on the create path: durable creates over HTTP with no webhook endpoint,
//! then with one that subscribes to every event (a local receiver that accepts everything),
//! alternating so that the machine's drift touches both sides alike. With an endpoint, every
//! event is also written to the outbox in the create's transaction, and the dispatcher fans it
//! out and delivers it in the background; the run also reports how long delivery of all of them
//! took after the last create, and the time from each event to its first delivery attempt
//! (p50, p99). With `--handovers`, it then measures how long delivery stops when the node that
//! holds the dispatcher's lease is killed with SIGKILL (two processes on a shared store).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::routing::post;
use tokio::net::TcpListener;

use crate::http::{Servers, Settings, Store};
use crate::loadgen::{self, LoadReport};
use crate::stats::{self, Latencies, Row};

/// One create run.
#[derive(Debug)]
pub struct Run {
    /// Whether a webhook endpoint was configured.
    pub webhooks: bool,
    /// The creates.
    pub create: LoadReport,
    /// With webhooks: time from the last create's answer until every event was delivered.
    pub drain: Option<Duration>,
    /// With webhooks: time from each event to its first delivery attempt (ms), p50 and p99.
    pub first_attempt_ms: Option<(i64, i64)>,
}

/// The outcome.
#[derive(Debug)]
pub struct Report {
    /// Sessions created per run.
    pub sessions: usize,
    /// Connections.
    pub connections: usize,
    /// Runs, alternating without and with.
    pub runs: Vec<Run>,
}

/// What the receiver got: how many requests, and for each, the time from its event to its
/// arrival (ms), with the event's id.
#[derive(Debug, Default)]
struct Received {
    count: AtomicUsize,
    arrivals: std::sync::Mutex<Vec<(String, i64)>>,
}

impl Received {
    /// The arrivals from `from` on.
    fn since(&self, from: usize) -> Vec<(String, i64)> {
        self.lock().get(from..).unwrap_or_default().to_vec()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, i64)>> {
        self.arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn now_ms() -> i64 {
    use sessiond_core::time::Clock as _;
    sessiond_core::time::SystemClock.now().as_millis()
}

#[derive(serde::Deserialize)]
struct Payload {
    data: sessiond_api::Event,
}

/// Starts a receiver that answers 204 to every POST, counts them, and notes how long after its
/// event each arrived (every answer is 2xx, so each arrival is a first attempt).
async fn receiver() -> anyhow::Result<(SocketAddr, Arc<Received>)> {
    let got = Arc::new(Received::default());
    let g = got.clone();
    let app = Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                if let Ok(p) = serde_json::from_slice::<Payload>(&body) {
                    let late = now_ms() - p.data.time.timestamp_millis();
                    g.lock().push((p.data.id, late));
                }
                g.count.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, got))
}

/// The `q` quantile of `ms` (sorted in place), in ms.
fn quantile(ms: &mut [i64], q: f64) -> i64 {
    if ms.is_empty() {
        return 0;
    }
    ms.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
    ms[i.min(ms.len() - 1)]
}

/// Runs `rounds` pairs of create runs (without, then with a webhook endpoint).
pub fn run(settings: &Settings, rounds: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(settings.sessions > 0 && rounds > 0, "nothing to run");
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("bench-loadgen")
        .on_thread_start(crate::pin::client_thread)
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let (hook, delivered) = client.block_on(receiver())?;
    let mut runs = Vec::new();
    for _ in 0..rounds {
        for webhooks in [false, true] {
            let before = delivered.count.load(Ordering::Relaxed);
            let arrivals_before = delivered.lock().len();
            let servers = Servers::start_with(settings.server_threads, &Store::Embedded, |c| {
                if webhooks {
                    c.webhooks.poll_interval_ms = 50;
                    c.webhooks.endpoints.insert(
                        "bench".into(),
                        sessiond_server::config::WebhookEndpointConfig {
                            url: format!("http://{hook}/hook"),
                            events: vec!["*".into()],
                            // 33 zero bytes: a benchmark needs a valid secret, not a good one.
                            secret: Some(format!("whsec_{}", "A".repeat(44))),
                            secret_file: None,
                        },
                    );
                }
            })?;
            let result = client.block_on(async {
                let (_, create) = loadgen::create_sessions(
                    servers.sessiond,
                    &servers.api_key,
                    settings.sessions,
                    settings.connections,
                )
                .await?;
                let drain = if webhooks {
                    let done = Instant::now();
                    let deadline = done + Duration::from_secs(300);
                    while delivered.count.load(Ordering::Relaxed) - before < settings.sessions {
                        anyhow::ensure!(Instant::now() < deadline, "deliveries did not finish");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Some(done.elapsed())
                } else {
                    None
                };
                let first_attempt_ms = webhooks.then(|| {
                    let mut ms: Vec<i64> = delivered
                        .since(arrivals_before)
                        .into_iter()
                        .map(|(_, ms)| ms)
                        .collect();
                    (quantile(&mut ms, 0.5), quantile(&mut ms, 0.99))
                });
                anyhow::Ok(Run {
                    webhooks,
                    create,
                    drain,
                    first_attempt_ms,
                })
            });
            servers.stop()?;
            runs.push(result?);
        }
    }
    client.shutdown_timeout(Duration::from_secs(5));
    Ok(Report {
        sessions: settings.sessions,
        connections: settings.connections,
        runs,
    })
}

impl Report {
    fn mean(&self, webhooks: bool) -> f64 {
        let r: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.webhooks == webhooks)
            .map(|r| r.create.throughput())
            .collect();
        r.iter().sum::<f64>() / r.len().max(1) as f64
    }

    /// Prints every run and the ratio of the means.
    pub fn print(&self) {
        println!(
            "Create over HTTP on the embedded store, {} sessions per run, {} connections \
             (at most {}), runs alternating without and with a webhook endpoint for every event",
            self.sessions,
            self.connections,
            loadgen::CREATE_CONNECTIONS
        );
        for r in &self.runs {
            let drain = r.drain.map_or(String::new(), |d| {
                format!(
                    "; all {} delivered {:.2} s after the last create",
                    self.sessions,
                    d.as_secs_f64()
                )
            });
            let first = r.first_attempt_ms.map_or(String::new(), |(p50, p99)| {
                format!("; event to first attempt p50 {p50} ms, p99 {p99} ms")
            });
            let drain = format!("{drain}{first}");
            println!(
                "  {:<13} {}{drain}",
                if r.webhooks {
                    "with webhook"
                } else {
                    "no webhook"
                },
                r.create.line()
            );
        }
        let off = self.mean(false);
        let rows: Vec<Row> = self
            .runs
            .iter()
            .map(|r| Row {
                scenario: format!(
                    "HTTP create, {}",
                    if r.webhooks {
                        "webhook on every event"
                    } else {
                        "no webhook"
                    }
                ),
                throughput: r.create.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&r.create.histogram),
                ratio: Some(r.create.throughput() / off.max(1e-9)),
            })
            .collect();
        println!();
        print!("{}", stats::table(&rows));
        let on = self.mean(true);
        println!(
            "\nmean create/s: no webhook {}, with webhook {}: ratio {:.2}",
            stats::fmt_rate(off),
            stats::fmt_rate(on),
            on / off.max(1e-9)
        );
    }

    /// Failed or non-2xx creates.
    pub fn failures(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.create.non_200 + r.create.errors)
            .sum()
    }
}

/// Lease handover: two `sessiond` processes on one shared store, the holder of the dispatcher's
/// lease killed with SIGKILL `kills` times (restarted each time, so the two take turns); each
/// time, a session is created on the survivor at once and the time until its event reaches the
/// receiver is measured: the rest of the dead holder's lease, then the survivor's next poll.
pub fn handover(
    bin: &std::path::Path,
    store: &Store,
    poll_ms: u64,
    kills: usize,
) -> anyhow::Result<Vec<Duration>> {
    anyhow::ensure!(
        !matches!(store, Store::Embedded),
        "the handover needs a shared store (--postgres or --redis)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut config = sessiond_server::config::Config::default();
    let cleanup = crate::cleanup::Cleanup::configure(&mut config, store)?;
    let mut env = crate::crash::store_env(&config);
    env.push((
        "SESSIOND_WEBHOOKS__POLL_INTERVAL_MS".into(),
        poll_ms.to_string(),
    ));
    env.push(("SESSIOND_PROTECTION__ENABLED".into(), "false".into()));
    // Nodes on a shared store keep webhook secrets sealed with a key they share.
    let (_, keyring_key) = sessiond_core::jwt::SealingKey::generate()?;
    env.push((
        "SESSIOND_JWT__KEYRING_KEY".into(),
        keyring_key.as_str().to_owned(),
    ));
    let result = runtime.block_on(handovers(bin, &env, kills));
    let cleaned = runtime.block_on(cleanup.run());
    let out = result?;
    cleaned?;
    Ok(out)
}

async fn handovers(
    bin: &std::path::Path,
    env: &[(String, String)],
    kills: usize,
) -> anyhow::Result<Vec<Duration>> {
    use crate::crash::{Api, start};
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (key, _) = sessiond_core::token::TokenFormat::new("sk_")?.generate()?;
    let key = key.expose().to_owned();
    let (hook, got) = receiver().await?;
    let http = reqwest::Client::new();
    let node = |i: usize| -> anyhow::Result<crate::crash::Proc> {
        start(
            bin,
            &tmp.path().join(format!("data{i}")),
            &key,
            env,
            &tmp.path().join(format!("sessiond{i}.log")),
        )
    };
    let api = |p: &crate::crash::Proc| Api {
        http: http.clone(),
        base: p.base.clone(),
        key: key.clone(),
    };
    // Waits until the event of a session created now on `p` arrives; answers how long it took.
    let deliver_one = |p: &crate::crash::Proc, user: String| {
        let api = api(p);
        let got = got.clone();
        async move {
            let from = got.count.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let made = api
                .post("/v1/sessions", serde_json::json!({ "user_id": user }))
                .await;
            anyhow::ensure!(made.is_some_and(|(s, _)| s.is_success()), "a create failed");
            while got.count.load(Ordering::Relaxed) <= from {
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(60),
                    "no delivery within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(t0.elapsed())
        }
    };
    // The first node takes the lease alone; the second starts once it delivers.
    let mut holder = node(0)?;
    let put = api(&holder)
        .call(
            reqwest::Method::PUT,
            "/v1/webhooks/bench",
            Some(serde_json::json!({
                "url": format!("http://{hook}/hook"),
                "events": ["session.created"],
                "secret": format!("whsec_{}", "A".repeat(44)),
            })),
        )
        .await;
    anyhow::ensure!(
        put.is_some_and(|(s, _)| s.is_success()),
        "cannot make the webhook endpoint"
    );
    deliver_one(&holder, "handover-0".into()).await?;
    let mut standby = node(1)?;
    // The standby sees the endpoint at its next poll.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut out = Vec::new();
    for i in 0..kills {
        holder.child.kill().ok();
        holder.child.wait().ok();
        out.push(deliver_one(&standby, format!("handover-{}", i + 1)).await?);
        // The killed node comes back as the standby.
        holder = standby;
        standby = node(i % 2)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for mut p in [holder, standby] {
        p.child.kill().ok();
        p.child.wait().ok();
    }
    Ok(out)
}
