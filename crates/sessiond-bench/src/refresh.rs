//! Refresh over HTTP: token mode on, sessions created with their refresh tokens, then each
//! connection refreshes its own share of the sessions in turn with `POST /v1/tokens/refresh`,
//! presenting the refresh token of the previous answer (presenting a spent one would be theft
//! and revoke the session). Every refresh spends a token and writes the session's new refresh
//! state durably, so this is a write path like create.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hyper::StatusCode;

use crate::http::{Servers, Settings, Store};
use crate::loadgen::{self, LoadReport, Target};
use crate::stats::{self, Latencies, Row};

/// Sessions per connection: enough that a connection's consecutive refreshes touch different
/// sessions, few enough that setting up stays short.
const SESSIONS_PER_CONNECTION: usize = 8;

/// Runs the scenario on `store` and answers the measured run.
pub fn run(settings: &Settings, store: &Store) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(settings.connections > 0, "--connections must be at least 1");
    let servers = Servers::start_with(settings.server_threads, store, |_| {})?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("bench-loadgen")
        .on_thread_start(crate::pin::client_thread)
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let result = client.block_on(load(settings, &servers));
    client.shutdown_timeout(Duration::from_secs(5));
    let stopped = servers.stop();
    let report = result?;
    stopped?;
    Ok(report)
}

/// The row of the summary table.
pub fn row(settings: &Settings, r: &LoadReport) -> Row {
    Row {
        scenario: format!(
            "HTTP sessiond `POST /v1/tokens/refresh` (token mode), {} conns",
            settings.connections
        ),
        throughput: r.throughput(),
        unit: "req/s",
        latencies: Latencies::of(&r.histogram),
        ratio: None,
    }
}

async fn load(settings: &Settings, servers: &Servers) -> anyhow::Result<LoadReport> {
    let base = format!("http://{}", servers.sessiond);
    let http = reqwest::Client::new();
    let policy = serde_json::json!({
        "tokens": {
            "access_token_ttl_s": 300,
            "issuer": "https://bench.sessiond.invalid",
            "audience": "bench",
        }
    });
    let res = http
        .put(format!("{base}/v1/tenants/default/policy"))
        .bearer_auth(&servers.api_key)
        .json(&policy)
        .send()
        .await
        .context("cannot turn token mode on")?;
    anyhow::ensure!(
        res.status().is_success(),
        "turning token mode on answered {}",
        res.status()
    );

    // Each connection gets its own sessions, created concurrently.
    let mut setup = tokio::task::JoinSet::new();
    for c in 0..settings.connections {
        let (http, base, key) = (http.clone(), base.clone(), servers.api_key.clone());
        setup.spawn(async move {
            let mut tokens = Vec::with_capacity(SESSIONS_PER_CONNECTION);
            for i in 0..SESSIONS_PER_CONNECTION {
                let res = http
                    .post(format!("{base}/v1/sessions"))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({ "user_id": format!("refresh-user-{c}-{i}") }))
                    .send()
                    .await?;
                anyhow::ensure!(
                    res.status() == reqwest::StatusCode::CREATED,
                    "POST /v1/sessions answered {}",
                    res.status()
                );
                let created: serde_json::Value = res.json().await?;
                tokens.push(refresh_token_of(&created)?);
            }
            anyhow::Ok(tokens)
        });
    }
    let mut shares = Vec::with_capacity(settings.connections);
    while let Some(done) = setup.join_next().await {
        shares.push(done.context("a create task failed")??);
    }

    let target = Arc::new(Target::new(
        servers.sessiond,
        "/v1/tokens/refresh",
        &servers.api_key,
    )?);
    let start = Instant::now();
    let measured_from = start + settings.warmup;
    let deadline = measured_from + settings.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for tokens in shares {
        tasks.spawn(connection_loop(
            target.clone(),
            tokens,
            measured_from,
            deadline,
        ));
    }
    loadgen::gather(tasks, measured_from).await
}

/// The refresh token of a create or refresh answer.
fn refresh_token_of(answer: &serde_json::Value) -> anyhow::Result<String> {
    answer
        .get("refresh_token")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .context("the answer has no refresh_token")
}

/// One connection: refreshes its sessions round-robin until `deadline`, recording from
/// `measured_from` on. A session whose refresh fails leaves the rotation (its chain is broken).
async fn connection_loop(
    target: Arc<Target>,
    mut tokens: Vec<String>,
    measured_from: Instant,
    deadline: Instant,
) -> anyhow::Result<loadgen::ConnResult> {
    let mut sender = loadgen::connect(target.addr).await?;
    let mut out = loadgen::ConnResult::new()?;
    let mut i = 0;
    while Instant::now() < deadline && !tokens.is_empty() {
        i %= tokens.len();
        let body = serde_json::to_vec(&serde_json::json!({ "refresh_token": tokens[i] }))?;
        let sent = Instant::now();
        let measured = sent >= measured_from;
        match loadgen::exchange(&mut sender, target.request(Bytes::from(body))?).await {
            Ok((status, body)) => {
                if measured {
                    stats::record(&mut out.histogram, sent.elapsed());
                    out.requests += 1;
                }
                let next = (status == StatusCode::OK)
                    .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .flatten()
                    .and_then(|v| refresh_token_of(&v).ok());
                match next {
                    Some(t) => {
                        tokens[i] = t;
                        i += 1;
                    }
                    None => {
                        out.non_200 += 1;
                        tokens.swap_remove(i);
                    }
                }
            }
            Err(_) => {
                out.errors += 1;
                sender = loadgen::connect(target.addr).await?;
            }
        }
    }
    Ok(out)
}
