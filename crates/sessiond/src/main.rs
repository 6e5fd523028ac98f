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
        #[command(flatten)]
        store: StoreArgs,
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
    /// Print the OpenAPI document of the HTTP API (as served at GET /openapi.json).
    Openapi,
    /// Manage the keyring that signs access tokens (token mode).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// The configuration and the store it names (`serve` and the `keys` commands).
#[derive(Debug, clap::Args)]
struct StoreArgs {
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
    /// A MaxMind-format city database (GeoLite2 City .mmdb): session locations and
    /// impossible-travel detection. Also SESSIOND_GEOIP_DB.
    #[arg(long, value_name = "FILE.mmdb")]
    geoip_db: Option<PathBuf>,
}

impl StoreArgs {
    /// The configuration: the file, then the environment, then these flags and `listen`.
    fn load(self, listen: Option<SocketAddr>) -> anyhow::Result<Config> {
        Ok(Config::load(
            self.config.as_deref(),
            &Overrides {
                listen,
                data_dir: self.data_dir,
                store: self.store,
                geoip_db: self.geoip_db,
            },
        )?)
    }
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Add a new signing key and retire the current ones.
    ///
    /// The new key is published in the JWKS at once and signs from --activate-after-s seconds
    /// on, so that every node and verifier can learn it first (nodes reload the keyring every
    /// jwt.reload_interval_s). The old keys stay published, so tokens they signed keep
    /// verifying, for --retire-after-s seconds after that: at least the longest access-token
    /// lifetime.
    Rotate {
        #[command(flatten)]
        store: StoreArgs,
        /// Algorithm of the new key: EdDSA or ES256 [default: jwt.algorithm].
        #[arg(long, value_name = "ALG")]
        algorithm: Option<String>,
        /// Seconds until the new key signs [default: twice jwt.reload_interval_s].
        #[arg(long, value_name = "SECONDS")]
        activate_after_s: Option<u64>,
        /// Seconds the old keys stay published after the new one signs [default: 3660, the
        /// longest access-token lifetime and a minute of clock skew].
        #[arg(long, value_name = "SECONDS")]
        retire_after_s: Option<u64>,
    },
    /// List the keys of the keyring: id, algorithm, when it signs, when it retires.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Loads the configuration and opens its store, for the keys commands.
async fn open_for_keys(
    args: StoreArgs,
) -> anyhow::Result<(
    Config,
    std::sync::Arc<dyn sessiond_core::store::SessionStore>,
)> {
    let cfg = args.load(None)?;
    let policy = Policy::new(cfg.default_policy.clone())?;
    let store = sessiond_server::open_store(&cfg, policy, cfg.migrate_on_start).await?;
    Ok((cfg, store))
}

fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    use sessiond_core::jwt::{Keyring, MAX_ACCESS_TOKEN_TTL_S, Rotation, SigningAlg};
    use sessiond_core::keys::Keys;
    use sessiond_core::time::{Clock, SystemClock};
    runtime()?.block_on(async move {
        let now = SystemClock.now();
        match command {
            KeysCommand::Rotate {
                store,
                algorithm,
                activate_after_s,
                retire_after_s,
            } => {
                let (cfg, store) = open_for_keys(store).await?;
                let alg = match algorithm {
                    Some(a) => SigningAlg::parse(&a)?,
                    None => cfg.jwt.signing_alg()?,
                };
                let r = Rotation {
                    alg,
                    activate_after_s: activate_after_s.unwrap_or(2 * cfg.jwt.reload_interval_s),
                    retire_after_s: retire_after_s.unwrap_or(MAX_ACCESS_TOKEN_TTL_S + 60),
                };
                let sealing = cfg.sealing()?;
                if sealing.refuse_unsealed {
                    anyhow::bail!(
                        "no keyring key: set jwt.keyring_key_file (the key of the servers) or \
                         jwt.allow_unsealed_keys"
                    );
                }
                let kid = Keys::rotate(&*store, sealing.key.as_ref(), r, now).await?;
                store.flush().await?;
                #[allow(clippy::print_stdout)]
                {
                    println!(
                        "added key {kid} ({}): published now, signs from {}",
                        alg.as_str(),
                        now.plus_secs(r.activate_after_s).to_datetime().to_rfc3339()
                    );
                }
            }
            KeysCommand::List { store } => {
                let (cfg, store) = open_for_keys(store).await?;
                let Some((version, doc)) = store.document(sessiond_core::keys::KEYRING_DOC).await?
                else {
                    anyhow::bail!("the store has no keyring yet: it is created when serve starts");
                };
                let ring = Keyring::load(&doc, cfg.sealing()?.key.as_ref())?;
                let signing = ring.signing_kid(now).map(str::to_owned);
                #[allow(clippy::print_stdout)]
                {
                    println!("keyring version {version}");
                    for (kid, alg, activate, retire) in ring.describe() {
                        let state = if Some(&kid) == signing.as_ref() {
                            "signing"
                        } else if retire.is_some_and(|r| r <= now) {
                            "retired"
                        } else if activate > now {
                            "published, not signing yet"
                        } else {
                            "published"
                        };
                        println!(
                            "{kid}  {}  signs from {}  retires {}  ({state})",
                            alg.as_str(),
                            activate.to_datetime().to_rfc3339(),
                            retire.map_or("never".to_owned(), |r| r.to_datetime().to_rfc3339()),
                        );
                    }
                }
            }
        }
        anyhow::Ok(())
    })
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
        Command::Keys { command } => {
            init_logging(LogFormat::Text);
            keys_command(command)
        }
        Command::Openapi => {
            let doc = sessiond_server::openapi::json()?;
            #[allow(clippy::print_stdout)]
            {
                println!("{doc}");
            }
            Ok(())
        }
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
        Command::Serve { listen, store } => {
            let cfg = store.load(listen)?;
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
