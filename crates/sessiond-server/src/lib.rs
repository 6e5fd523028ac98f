//! The sessiond HTTP server: [`router`] builds the axum app from an [`AppState`]; [`Server`]
//! wires configuration, store, background tasks and graceful shutdown around it.
//!
//! - [`config`]: layered configuration;
//! - [`extract`]: strict JSON/query extractors and the API-key guard;
//! - [`handlers`]: one thin function per endpoint;
//! - [`error`]: the single mapping of errors to problem responses.
//! - [`openapi`]: the OpenAPI document of the API, served at `/openapi.json`.
//! - [`metrics`]: Prometheus metrics, served at `/metrics`.
//! - [`listen`]: the accept loop, connection caps and timeouts; [`tls`]: TLS and its reloads.

pub mod config;
pub mod error;
pub mod extract;
pub mod geoip;
pub mod handlers;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod ssrf;
pub mod tls;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, Request};
use axum::http::{HeaderName, HeaderValue, header};
use axum::routing::{get, post};
use sessiond_core::CoreError;
use sessiond_core::events::{EventSink, LogSink};
use sessiond_core::keys::Keys;
use sessiond_core::policy::Policy;
use sessiond_core::service::{ServiceConfig, SessionService};
use sessiond_core::store::SessionStore;
use sessiond_core::time::{Clock, SystemClock};
use sessiond_core::token::TokenFormat;
use sessiond_store::cache::{CachedStore, Subscriber};
use sessiond_store::postgres::{PostgresOptions, PostgresStore};
use sessiond_store::redis::{RedisOptions, RedisStore};
use sessiond_store::{EmbeddedOptions, EmbeddedStore};
use tokio::net::TcpListener;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::config::{Config, ConfigError};
use crate::error::ApiError;
use crate::extract::ApiKeys;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The lifecycle operations.
    pub service: Arc<SessionService>,
    /// The API keys.
    pub keys: ApiKeys,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// The concurrency cap and request timeout of the API routes.
    pub limits: limits::Limits,
    /// The server's metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Webhook endpoints and their dispatcher.
    pub webhooks: Arc<webhooks::Webhooks>,
    /// The limiter of `auth.failed` events.
    pub auth_failures: Arc<extract::AuthFailures>,
}

impl FromRef<AppState> for ApiKeys {
    fn from_ref(s: &AppState) -> Self {
        s.keys.clone()
    }
}

/// Request ids: a random per-process prefix and a counter, unless the caller sent one.
#[derive(Clone)]
struct RequestIds {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        // Eight random characters (from a fresh handle) tell processes apart in the logs.
        let prefix = sessiond_core::token::SessionHandle::generate()
            .map(|h| h.as_str()[4..12].to_owned())
            .unwrap_or_else(|_| "sessiond".to_owned());
        Self {
            prefix: prefix.into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _req: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// Whether a caller's `X-Request-Id` may be kept: 1 to 64 of `A-Z a-z 0-9 . _ : -`. Any other
/// value is replaced by a generated id, so the header never carries what a caller injected
/// into logs, events or responses.
pub fn is_request_id(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Drops an `X-Request-Id` that is not a safe id (or is sent more than once), so that a
/// generated one takes its place.
async fn sanitize_request_id(mut req: Request) -> Request {
    let headers = req.headers_mut();
    let mut values = headers.get_all("x-request-id").iter();
    let keep = match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().is_ok_and(is_request_id),
        _ => false,
    };
    if !keep {
        headers.remove("x-request-id");
    }
    req
}

/// Builds the app: every route of the API v1, with its layers.
pub fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let v1 = Router::new()
        .route("/v1/sessions", post(handlers::create))
        .route("/v1/sessions/verify", post(handlers::verify))
        .route("/v1/sessions/rotate", post(handlers::rotate))
        .route(
            "/v1/sessions/reauthenticate",
            post(handlers::reauthenticate),
        )
        .route("/v1/sessions/logout", post(handlers::logout))
        .route(
            "/v1/sessions/{handle}",
            get(handlers::get_session)
                .patch(handlers::patch_session)
                .delete(handlers::revoke_session),
        )
        .route(
            "/v1/users/{user_id}/sessions",
            get(handlers::list_user_sessions).delete(handlers::force_logout),
        )
        .route(
            "/v1/users/{user_id}/sessions/revoke",
            post(handlers::revoke_sessions),
        )
        .route(
            "/v1/tenants/{tenant}/policy",
            get(handlers::get_policy).put(handlers::put_policy),
        )
        .route("/v1/tokens/refresh", post(handlers::refresh))
        .route("/v1/events", get(handlers::list_events))
        .route(
            "/v1/users/{user_id}/events",
            get(handlers::list_user_events),
        )
        .route("/v1/webhooks", get(handlers::list_webhooks))
        .route(
            "/v1/webhooks/{name}",
            get(handlers::get_webhook)
                .put(handlers::put_webhook)
                .delete(handlers::delete_webhook),
        )
        .route(
            "/v1/webhooks/{name}/deliveries",
            get(handlers::list_deliveries),
        )
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    let v1 = limits::apply(v1, state.limits);
    Router::new()
        .merge(v1)
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/openapi.json", get(openapi::document))
        .route("/.well-known/jwks.json", get(handlers::jwks))
        .route("/metrics", get(handlers::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::debug_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, RequestIds::new()))
        .layer(axum::middleware::map_request(sanitize_request_id))
}

/// The app of the health listener: `/healthz`, `/readyz` and `/metrics` only.
pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn fallback() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A server start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] sessiond_core::store::StoreError),
    /// Token mode's keyring could not be loaded or created.
    #[error("cannot load the token signing keyring: {0}")]
    Keyring(String),
    /// The listener could not be bound or served.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Opens the store the configuration names, applying migrations first if `migrate` is set
/// (stores without migrations ignore it).
pub async fn open_store(
    config: &Config,
    default_policy: Policy,
    migrate: bool,
) -> Result<Arc<dyn SessionStore>, ServerError> {
    Ok(open_store_with_feed(config, default_policy, migrate)
        .await?
        .0)
}

/// As [`open_store`], with the store's change feed (PostgreSQL and Redis), for a session cache.
pub async fn open_store_with_feed(
    config: &Config,
    default_policy: Policy,
    migrate: bool,
) -> Result<(Arc<dyn SessionStore>, Option<Arc<dyn Subscriber>>), ServerError> {
    let flush_interval = Duration::from_millis(config.flush_interval_ms);
    match StoreUrl::parse(config.store.as_deref())? {
        StoreUrl::Embedded => {
            let store = EmbeddedStore::open(
                &config.data_dir,
                EmbeddedOptions {
                    default_policy,
                    flush_interval,
                },
            )?;
            tracing::info!(dir = %config.data_dir.display(), "store: embedded");
            Ok((Arc::new(store), None))
        }
        StoreUrl::Postgres(url) => {
            let store = PostgresStore::connect(PostgresOptions {
                schema: config.store_schema.clone(),
                default_policy,
                flush_interval,
                acquire_timeout: Duration::from_millis(config.store_timeout_ms),
                ..PostgresOptions::new(url)
            })?;
            if migrate {
                store.migrate(config.store_schema.as_deref()).await?;
            }
            tracing::info!(url = %redact_url(url), "store: postgres");
            let feed = store.change_feed();
            Ok((Arc::new(store), Some(feed)))
        }
        StoreUrl::Redis(url) => {
            let store = RedisStore::connect(RedisOptions {
                prefix: config.store_prefix.clone(),
                default_policy,
                flush_interval,
                retention: Duration::from_secs(config.retention_s),
                timeout: Duration::from_millis(config.store_timeout_ms),
                ..RedisOptions::new(url)
            })?;
            tracing::info!(url = %redact_url(url), prefix = %config.store_prefix, "store: redis");
            let feed = store.change_feed();
            Ok((Arc::new(store), Some(feed)))
        }
    }
}

/// Which store a `store` setting names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl<'a> {
    /// The embedded store in `data_dir`.
    Embedded,
    /// A PostgreSQL URL.
    Postgres(&'a str),
    /// A Redis or Redis Cluster URL.
    Redis(&'a str),
}

impl<'a> StoreUrl<'a> {
    /// Parses the `store` setting: absent or `embedded`, a `postgres://` URL, or a
    /// `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL.
    pub fn parse(s: Option<&'a str>) -> Result<Self, ConfigError> {
        const REDIS: [&str; 4] = [
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
        ];
        match s {
            None | Some("embedded") => Ok(Self::Embedded),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Self::Postgres(u))
            }
            Some(u) if REDIS.iter().any(|p| u.starts_with(p)) => Ok(Self::Redis(u)),
            Some(_) => Err(ConfigError(
                "store: 'embedded', a postgres:// URL, or a redis://, rediss://, \
                 redis+cluster:// or rediss+cluster:// URL"
                    .into(),
            )),
        }
    }
}

/// A store URL with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (authority, tail) = rest.split_once('/').map_or((rest, ""), |(a, t)| (a, t));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = tail.split('?').next().unwrap_or("");
    if tail.is_empty() {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}/{tail}")
    }
}

/// A configured server, ready to serve.
pub struct Server {
    state: AppState,
    store: Arc<dyn SessionStore>,
    config: Config,
    tls: Option<tls::Tls>,
}

impl Server {
    /// Opens the store and builds the app from a validated configuration.
    pub async fn new(config: Config) -> Result<Self, ServerError> {
        Self::with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Server::new`], with a clock of the caller's.
    pub async fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, ServerError> {
        config.validate()?;
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => Some(tls::Tls::new(cert, key)?),
            _ => None,
        };
        let (keys, generated) = config.api_keys()?;
        if let Some(path) = generated {
            tracing::warn!(
                path = %path.display(),
                "no API key configured: using the key in this file (generated on first start); \
                 send it as 'Authorization: Bearer <key>'"
            );
        }
        let default_policy = Policy::new(config.default_policy.clone())
            .map_err(|e| ConfigError(format!("default_policy: {e}")))?;
        let (store, feed) =
            open_store_with_feed(&config, default_policy, config.migrate_on_start).await?;
        let metrics = Arc::new(metrics::Metrics::new());
        // The shared stores' operations are network round trips: time them. The embedded
        // store answers from memory, where timing would cost more than it tells.
        let store: Arc<dyn SessionStore> = match StoreUrl::parse(config.store.as_deref())? {
            StoreUrl::Embedded => store,
            _ => Arc::new(metrics::TimedStore::new(store, metrics.clone())),
        };
        // In front of the timing: only the store's own round trips are timed.
        let store: Arc<dyn SessionStore> = match feed {
            Some(feed) if config.cache.enabled => {
                tracing::info!(
                    capacity = config.cache.capacity,
                    max_age_s = config.cache.max_age_s,
                    "session cache: on (serving once the change feed is subscribed)"
                );
                Arc::new(CachedStore::with_feed(
                    store,
                    feed,
                    &config.cache.options(),
                    clock.clone(),
                    Some(metrics.clone()),
                ))
            }
            Some(_) => {
                tracing::info!("session cache: off (cache.enabled = false)");
                store
            }
            None => {
                tracing::info!("session cache: not used (the embedded store is in memory)");
                store
            }
        };
        let events: Arc<dyn EventSink> = Arc::new(metrics::CountingSink::new(
            metrics.clone(),
            Arc::new(LogSink),
        ));
        let token_format = TokenFormat::new(&config.token_prefix)
            .map_err(|e| ConfigError(format!("token_prefix: {e}")))?;
        let sealing = config.sealing()?;
        let jwt_keys = Keys::new(store.clone(), sealing.key, config.jwt.signing_alg()?);
        let jwt_keys = Arc::new(if sealing.refuse_unsealed {
            jwt_keys.refusing_unsealed()
        } else {
            jwt_keys
        });
        let started = clock.now();
        match jwt_keys.reload(started).await {
            Ok(()) => {}
            // The keyring loads on first need once the store answers (like every request).
            Err(CoreError::Store(e)) => {
                tracing::warn!(error = %e, "the token keyring will load when the store answers");
            }
            // A keyring this configuration cannot read (sealed with another key, damaged) is
            // a configuration error: refuse to start rather than fail every token request.
            Err(e) => return Err(ServerError::Keyring(e.to_string())),
        }
        let service = SessionService::new(
            store.clone(),
            clock,
            events,
            ServiceConfig {
                token_format,
                max_data_bytes: config.max_data_bytes,
            },
        )
        .with_keys(jwt_keys);
        let service = match config.protection.guard() {
            Some(g) => service.with_guard(Arc::new(sessiond_core::guard::Guard::new(g, started))),
            None => service,
        };
        let service = service.with_capacity(sessiond_core::capacity::Caps {
            max_sessions: config.limits.max_sessions,
            max_sessions_per_tenant: config.limits.max_sessions_per_tenant,
        });
        let service = match &config.geoip_db {
            Some(path) => {
                let locator = geoip::MmdbLocator::open(path).map_err(ConfigError)?;
                tracing::info!(db = %path.display(), "geolocation: on");
                service.with_locator(Arc::new(locator))
            }
            None => {
                tracing::info!(
                    "geolocation: off (no geoip_db): sessions show no location and \
                     impossible-travel detection is unavailable"
                );
                service
            }
        };
        let service = Arc::new(service);
        let destinations = config.webhooks.destinations()?;
        let webhooks = webhooks::Webhooks::new(
            service.clone(),
            store.clone(),
            config.webhooks.checked_endpoints(&destinations).await?,
            config.webhooks.options(),
            destinations,
            metrics.clone(),
        )
        .map_err(ConfigError)?;
        if let Err(e) = webhooks.reload().await {
            tracing::warn!(error = %e, "webhooks will load when the store answers");
        } else if let Err(e) = webhooks.seal_stored().await {
            tracing::warn!(error = %e, "could not seal the stored webhook secrets; will retry at next start");
        }
        let state = AppState {
            service,
            webhooks: Arc::new(webhooks),
            auth_failures: Arc::new(extract::AuthFailures::default()),
            keys: ApiKeys::new(keys.iter().map(String::as_str)),
            max_body_bytes: config.max_body_bytes,
            limits: limits::Limits {
                max_concurrent_requests: config.max_concurrent_requests,
                request_timeout: Duration::from_millis(config.request_timeout_ms),
            },
            metrics,
        };
        Ok(Self {
            state,
            store,
            config,
            tls,
        })
    }

    /// The app state (for in-process tests).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves on `listener` until `shutdown` completes, then drains in-flight requests (up to
    /// the shutdown timeout) and makes batched writes durable.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let sweeper = tokio::spawn(sweep_loop(
            self.state.service.clone(),
            self.config.sweep_interval_s,
            self.config.retention_s,
            self.config.events.retention_days.saturating_mul(86_400),
        ));
        let dispatcher = tokio::spawn(self.state.webhooks.clone().run());

        let reloader = tokio::spawn(keyring_loop(
            self.state.service.clone(),
            self.config.jwt.reload_interval_s,
        ));
        let api_addr = listener.local_addr()?;
        // Bound before anything is served, so a bad address stops the start-up.
        let health = match self.config.health_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr).await.map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("health_listen: cannot listen on {addr}: {e}"),
                    )
                })?;
                tracing::info!(addr = %l.local_addr()?, "health checks listening");
                Some(l)
            }
            None => None,
        };
        if self.tls.is_none() && !api_addr.ip().is_loopback() {
            tracing::warn!(
                addr = %api_addr,
                "listening on a non-loopback address without TLS: API keys and session tokens \
                 cross the network in clear; set tls.cert_file and tls.key_file, or keep \
                 sessiond behind a TLS-terminating proxy on a private network"
            );
        }
        let tls_reloader = self.tls.clone().map(|t| {
            tokio::spawn(t.reload_loop(Duration::from_secs(self.config.tls.reload_interval_s)))
        });
        let c = &self.config;
        let api_limits = listen::ConnLimits {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            max_header_bytes: c.max_header_bytes,
            max_connections: Some(c.max_connections),
            max_connections_per_peer: Some(c.max_connections_per_peer),
            http2_cleartext: c.http2_cleartext,
        };
        let acceptor = self.tls.as_ref().map(|t| t.acceptor.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut servers = vec![tokio::spawn(listen::serve(
            listen::Endpoint {
                listener,
                app: router(self.state.clone()),
                limits: api_limits,
                tls: acceptor.clone(),
                metrics: Some(self.state.metrics.clone()),
            },
            stop_rx.clone(),
        ))];
        if let Some(listener) = health {
            servers.push(tokio::spawn(listen::serve(
                listen::Endpoint {
                    listener,
                    app: health_router(self.state.clone()),
                    limits: listen::ConnLimits {
                        max_connections: None,
                        max_connections_per_peer: None,
                        ..api_limits
                    },
                    tls: acceptor,
                    metrics: None,
                },
                stop_rx,
            )));
        }
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        let drain = Duration::from_secs(self.config.shutdown_timeout_s);
        let all = async {
            for s in servers {
                if let Err(e) = s.await {
                    tracing::error!(error = %e, "server task failed");
                }
            }
        };
        if tokio::time::timeout(drain, all).await.is_err() {
            tracing::warn!("in-flight requests did not finish in time");
        }
        if let Some(r) = tls_reloader {
            r.abort();
        }
        sweeper.abort();
        reloader.abort();
        dispatcher.abort();
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Reloads token mode's keyring from the store, so rotations made elsewhere take effect.
async fn keyring_loop(service: Arc<SessionService>, interval_s: u64) {
    let Some(keys) = service.keys().cloned() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = keys.reload(service.now()).await {
            tracing::warn!(error = %e, "keyring reload failed; keeping the loaded keys");
        }
    }
}

/// Most sweeps run back to back in one tick of the sweep interval.
const MAX_SWEEPS_PER_TICK: usize = 100;

async fn sweep_loop(
    service: Arc<SessionService>,
    interval_s: u64,
    retention_s: u64,
    event_retention_s: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match service.purge_events(event_retention_s).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "old events purged"),
            Err(e) => tracing::warn!(error = %e, "purging old events failed"),
        }
        // Stores sweep in bounded chunks: repeat while there is work, so a backlog clears
        // without waiting for the next tick (bounded, so a tick always ends).
        for _ in 0..MAX_SWEEPS_PER_TICK {
            match service.sweep(retention_s).await {
                Ok(r) if r.expired.is_empty() && r.purged == 0 => break,
                Ok(r) => tracing::info!(expired = r.expired.len(), purged = r.purged, "swept"),
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed");
                    break;
                }
            }
        }
    }
}
