//! The cost of webhooks on the create path: durable creates over HTTP with no webhook endpoint,
//! then with one that subscribes to every event (a local receiver that accepts everything),
//! alternating so that the machine's drift touches both sides alike. With an endpoint, every
//! event is also written to the outbox in the create's transaction, and the dispatcher fans it
//! out and delivers it in the background; the run also reports how long delivery of all of them
//! took after the last create.

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

/// Starts a receiver that answers 204 to every POST and counts them.
async fn receiver() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let app = Router::new().route(
        "/hook",
        post(move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, count))
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
            let before = delivered.load(Ordering::Relaxed);
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
                    while delivered.load(Ordering::Relaxed) - before < settings.sessions {
                        anyhow::ensure!(Instant::now() < deadline, "deliveries did not finish");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Some(done.elapsed())
                } else {
                    None
                };
                anyhow::Ok(Run {
                    webhooks,
                    create,
                    drain,
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
