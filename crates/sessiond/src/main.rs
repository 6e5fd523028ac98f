//! `sessiond`: the user-session management server.
//!
//! `sessiond serve` runs the HTTP API on the embedded store, PostgreSQL, Redis or a Redis
//! Cluster; `sessiond migrate` applies the store's schema migrations; `sessiond generate-key`
//! prints a fresh API key. Configuration comes in layers: defaults, a TOML file (`--config`),
//! `SESSIOND_*` environment variables, then flags.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sessiond_core::policy::Policy;
use sessiond_core::token::TokenFormat;
use sessiond_server::Server;
use sessiond_server::config::{Config, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

/// User-session management server: create, verify, rotate and revoke sessions over HTTP.
///
/// Applications call sessiond after they have authenticated a user. It creates the session and
/// hands out the secret token with a ready Set-Cookie value, verifies the token on every request
/// (sliding idle timeout, fixed absolute timeout), and revokes sessions on logout, force logout,
/// at the per-user limit, or by an administrator.
#[derive(Debug, Parser)]
#[command(name = "sessiond", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    ///
    /// Every setting can come from the config file, from a SESSIOND_<KEY> environment variable
    /// (nested keys with "__", e.g. SESSIOND_DEFAULT_POLICY__IDLE_TIMEOUT_S=900), or from the
    /// flags below; later layers win. An API key is required: set SESSIOND_API_KEY (make one
    /// with `sessiond generate-key`) or api_key_file. The log level comes from SESSIOND_LOG
    /// (default "info"; e.g. "debug" or "sessiond=debug,tower_http=info").
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Directory of the embedded store [default: ./sessiond-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The store: "embedded" (default), postgres://USER:PASSWORD@HOST:PORT/DB,
        /// redis://HOST:PORT or redis+cluster://HOST1:PORT1,HOST2:PORT2 (rediss:// for TLS).
        /// Also SESSIOND_STORE.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// TOML configuration file.
        #[arg(long, value_name = "FILE", env = "SESSIOND_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply the store's pending schema migrations, then exit.
    ///
    /// `serve` also applies them at start unless migrate_on_start is false. Running this from
    /// several nodes at once is safe: the migrations take a database lock.
    Migrate {
        /// The store URL (as for serve). Also SESSIOND_STORE.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// TOML configuration file.
        #[arg(long, value_name = "FILE", env = "SESSIOND_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print a new random API key (256 bits from the OS CSPRNG).
    GenerateKey,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SESSIOND_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateKey => {
            let (key, _) = TokenFormat::new("sk_")?.generate()?;
            #[allow(clippy::print_stdout)]
            {
                println!("{}", key.expose());
            }
            Ok(())
        }
        Command::Migrate { store, config } => {
            let overrides = Overrides {
                store,
                ..Overrides::default()
            };
            let cfg = Config::load(config.as_deref(), &overrides)?;
            init_logging(cfg.log_format);
            runtime()?.block_on(async move {
                let policy = Policy::new(cfg.default_policy.clone())?;
                sessiond_server::open_store(&cfg, policy, true).await?;
                tracing::info!("migrations applied");
                anyhow::Ok(())
            })
        }
        Command::Serve {
            listen,
            data_dir,
            store,
            config,
        } => {
            let cfg = Config::load(
                config.as_deref(),
                &Overrides {
                    listen,
                    data_dir,
                    store,
                },
            )?;
            init_logging(cfg.log_format);
            runtime()?.block_on(async move {
                let addr = cfg.listen;
                let server = Server::new(cfg).await?;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                tracing::info!(addr = %listener.local_addr()?, "sessiond listening");
                server.serve(listener, shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
    }
}
