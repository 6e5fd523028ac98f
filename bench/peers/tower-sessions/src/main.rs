//! The tower-sessions peer of `sessiond-bench`: an axum app whose sessions live in
//! tower-sessions' memory store, its Redis store (fred) or its PostgreSQL store (sqlx).
//!
//! - `POST /login` with `{"user_id": "..."}` creates a session holding the user id and answers
//!   its cookie (`Set-Cookie: id=...`);
//! - `GET /whoami` reads the session named by the `Cookie` header and answers its user id, or
//!   401 when there is none.
//!
//! It serves on one tokio worker thread, as sessiond does in the benchmark, and prints
//! `listening on ADDR` once it accepts connections.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use tower_sessions::cookie::time::Duration;
use tower_sessions::{Expiry, MemoryStore, Session, SessionManagerLayer, SessionStore};
use tower_sessions_redis_store::RedisStore;
use tower_sessions_redis_store::fred::prelude::{ClientLike, Config as RedisConfig, Pool};
use tower_sessions_sqlx_store::PostgresStore;
use tower_sessions_sqlx_store::sqlx::postgres::PgPoolOptions;

/// The session key holding the user id.
const USER_ID: &str = "user_id";

/// Where the sessions live.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StoreKind {
    /// tower-sessions' `MemoryStore`.
    Memory,
    /// tower-sessions-redis-store on a fred pool.
    Redis,
    /// tower-sessions-sqlx-store's `PostgresStore`.
    Postgres,
}

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(name = "tower-sessions-peer")]
struct Cli {
    /// The session store.
    #[arg(long, value_enum)]
    store: StoreKind,
    /// Where to listen (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Redis URL, for `--store redis`. Session keys are the session ids (the store has no
    /// key prefix).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Clients in the fred pool.
    #[arg(long, default_value_t = 4)]
    redis_pool: usize,
    /// PostgreSQL URL, for `--store postgres`.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres_url: String,
    /// The schema of the session table (created if missing; the caller drops it).
    #[arg(long, default_value = "tower_sessions_peer")]
    postgres_schema: String,
    /// Connections in the PostgreSQL pool (sessiond's default is 16).
    #[arg(long, default_value_t = 16)]
    postgres_pool: u32,
    /// Lifetime of a session, in seconds.
    #[arg(long, default_value_t = 3600)]
    session_seconds: i64,
}

/// The body of `POST /login` and of `GET /whoami`'s answer.
#[derive(Debug, Deserialize, Serialize)]
struct User {
    user_id: String,
}

/// Creates a session holding the user id; the layer stores it and sets the cookie.
async fn login(session: Session, Json(user): Json<User>) -> Result<Json<User>, StatusCode> {
    session
        .insert(USER_ID, &user.user_id)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(Json(user))
}

/// Answers the user id of the session named by the cookie, 401 when there is none.
async fn whoami(session: Session) -> Result<Json<User>, StatusCode> {
    match session.get::<String>(USER_ID).await {
        Ok(Some(user_id)) => Ok(Json(User { user_id })),
        Ok(None) => Err(StatusCode::UNAUTHORIZED),
        Err(_) => Err(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// The app on `store`.
fn app<S: SessionStore + Clone>(store: S, lifetime: Duration) -> Router {
    let layer = SessionManagerLayer::new(store)
        .with_name("id")
        .with_secure(false)
        .with_expiry(Expiry::OnInactivity(lifetime));
    Router::new()
        .route("/login", post(login))
        .route("/whoami", get(whoami))
        .layer(layer)
}

/// Builds the app on the store asked for.
async fn build(cli: &Cli) -> anyhow::Result<Router> {
    let lifetime = Duration::seconds(cli.session_seconds);
    Ok(match cli.store {
        StoreKind::Memory => app(MemoryStore::default(), lifetime),
        StoreKind::Redis => {
            let config = RedisConfig::from_url(&cli.redis_url).context("bad Redis URL")?;
            let pool = Pool::new(config, None, None, None, cli.redis_pool)
                .context("cannot create the Redis pool")?;
            // The connection task runs for as long as the pool; it ends with the process.
            let _connection = pool.connect();
            pool.wait_for_connect()
                .await
                .context("cannot connect to Redis")?;
            app(RedisStore::new(pool), lifetime)
        }
        StoreKind::Postgres => {
            let pool = PgPoolOptions::new()
                .max_connections(cli.postgres_pool)
                .connect(&cli.postgres_url)
                .await
                .context("cannot connect to PostgreSQL")?;
            let store = PostgresStore::new(pool)
                .with_schema_name(&cli.postgres_schema)
                .map_err(anyhow::Error::msg)?;
            store
                .migrate()
                .await
                .context("cannot create the session table")?;
            app(store, lifetime)
        }
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let app = build(&cli).await?;
        let listener = tokio::net::TcpListener::bind(cli.addr)
            .await
            .with_context(|| format!("cannot listen on {}", cli.addr))?;
        println!("listening on {}", listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("the server failed")
    })
}
