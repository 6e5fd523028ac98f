//! Configuration, in layers: defaults, then a TOML file, then `SESSIOND_*` environment
//! variables, then command-line flags. Unknown keys are refused, and the whole configuration is
//! validated once at start-up with a message that names the bad key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use sessiond_api::PolicyDocument;
use sessiond_core::jwt::{SealingKey, SigningAlg};
use sessiond_core::policy::Policy;
use sessiond_core::token::TokenFormat;

/// Shortest API key accepted.
pub const MIN_API_KEY_LEN: usize = 24;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The server's configuration. See the README's configuration reference.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the embedded store (and of a generated API key).
    pub data_dir: PathBuf,
    /// The store: absent or `embedded` for the embedded store in `data_dir`, a `postgres://`
    /// URL, or a `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL.
    pub store: Option<String>,
    /// PostgreSQL schema for sessiond's tables (the connection's default when absent).
    pub store_schema: Option<String>,
    /// Prefix of every Redis key.
    pub store_prefix: String,
    /// Milliseconds a request waits for a PostgreSQL connection or a Redis answer before the
    /// store counts as unavailable (`503 store_unavailable`).
    pub store_timeout_ms: u64,
    /// Apply pending migrations when `serve` starts (otherwise run `sessiond migrate`).
    pub migrate_on_start: bool,
    /// The API key (prefer `api_key_file` or the `SESSIOND_API_KEY` variable).
    pub api_key: Option<String>,
    /// A file holding the API key(s), one per line (`#` comments and blank lines ignored).
    pub api_key_file: Option<PathBuf>,
    /// Prefix of session tokens.
    pub token_prefix: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest session data, in bytes of JSON.
    pub max_data_bytes: usize,
    /// Seconds between sweeps for expired sessions.
    pub sweep_interval_s: u64,
    /// Seconds an ended (revoked or expired) session is kept before it is purged.
    pub retention_s: u64,
    /// Milliseconds between write-backs of last-seen times.
    pub flush_interval_ms: u64,
    /// Seconds to let in-flight requests finish on shutdown.
    pub shutdown_timeout_s: u64,
    /// Requests in progress at once; past it requests are refused with `503 overloaded`.
    pub max_concurrent_requests: usize,
    /// Milliseconds a request may take before it is answered `503 request_timeout`.
    pub request_timeout_ms: u64,
    /// Open client connections at once on the API listener; past it new connections are
    /// closed as soon as accepted.
    pub max_connections: usize,
    /// Open client connections at once from one peer address on the API listener; past it
    /// that address's new connections are closed as soon as accepted.
    pub max_connections_per_peer: usize,
    /// Milliseconds a connection has to send a complete request head, from being accepted
    /// (TLS handshake included) or, on HTTP/1.1 keep-alive, from the end of the last response.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a connection may stay open with no request in progress and no traffic.
    pub idle_timeout_ms: u64,
    /// Largest request head, in bytes (HTTP/1.1 answers `431` past it).
    pub max_header_bytes: usize,
    /// Accept cleartext HTTP/2 with prior knowledge (HTTP/2 over TLS is negotiated by ALPN).
    pub http2_cleartext: bool,
    /// A second listener serving only `/healthz`, `/readyz` and `/metrics`, outside the API
    /// listener's connection caps.
    pub health_listen: Option<SocketAddr>,
    /// TLS of the listeners (`[tls]`).
    pub tls: TlsConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// The policy of tenants that have none of their own.
    pub default_policy: PolicyDocument,
    /// Token mode: the keyring of access-token signing keys.
    pub jwt: JwtConfig,
    /// The audit log (`[events]`).
    pub events: EventsConfig,
    /// Webhook delivery, and endpoints fixed by the configuration (`[webhooks]`).
    pub webhooks: WebhooksConfig,
    /// Brute-force and creation limits (`[protection]`).
    pub protection: ProtectionConfig,
    /// Caps on live sessions (`[limits]`).
    pub limits: LimitsConfig,
    /// The node-local session cache of the shared stores (`[cache]`).
    pub cache: CacheConfig,
    /// A MaxMind-format city database (`.mmdb`, such as GeoLite2 City): sessions show their
    /// location, and policies may enable impossible-travel detection. Off without one.
    pub geoip_db: Option<PathBuf>,
}

/// TLS of the listeners (`[tls]`): on when both files are set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// Seconds between checks of the files' modification times (a change reloads them, as
    /// does `SIGHUP`).
    pub reload_interval_s: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            reload_interval_s: 5,
        }
    }
}

/// Caps on live sessions (`[limits]`): past them, creates are refused. 0 for no cap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Live sessions in the store (`507 session_capacity_reached` past it).
    pub max_sessions: u64,
    /// Live sessions of one tenant (`429 tenant_session_limit` past it).
    pub max_sessions_per_tenant: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1_000_000,
            max_sessions_per_tenant: 0,
        }
    }
}

/// Brute-force and creation limits (`[protection]`), counted per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectionConfig {
    /// Whether the limits apply.
    pub enabled: bool,
    /// Length of the sliding window, in seconds.
    pub window_s: u64,
    /// Unknown or invalid tokens from one client network (an IPv4 address, an IPv6 /64) in a
    /// window before its verifies are refused (`429 too_many_attempts`).
    pub verify_failures: u32,
    /// The first block, in seconds; it doubles with each further multiple of
    /// `verify_failures` in the window.
    pub block_s: u64,
    /// The longest block, in seconds.
    pub block_max_s: u64,
    /// Sessions created per user (and tenant) in a window (0: no limit).
    pub creates_per_user: u32,
    /// Sessions created per client network in a window (0: no limit).
    pub creates_per_ip: u32,
    /// Sessions created per API key in a window by requests naming no `client.ip` (0: no
    /// limit).
    pub creates_per_key: u32,
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        let g = sessiond_core::guard::GuardConfig::default();
        Self {
            enabled: true,
            window_s: g.window_s,
            verify_failures: g.verify_failures,
            block_s: g.block_s,
            block_max_s: g.block_max_s,
            creates_per_user: g.creates_per_user,
            creates_per_ip: g.creates_per_ip,
            creates_per_key: g.creates_per_key,
        }
    }
}

impl ProtectionConfig {
    /// The guard's thresholds, or `None` when the limits are off.
    pub fn guard(&self) -> Option<sessiond_core::guard::GuardConfig> {
        self.enabled.then_some(sessiond_core::guard::GuardConfig {
            window_s: self.window_s,
            verify_failures: self.verify_failures,
            block_s: self.block_s,
            block_max_s: self.block_max_s,
            creates_per_user: self.creates_per_user,
            creates_per_ip: self.creates_per_ip,
            creates_per_key: self.creates_per_key,
        })
    }
}

/// The node-local session cache in front of PostgreSQL and Redis (`[cache]`): verifies are
/// answered from memory, kept coherent across nodes by the store's change feed. Not used with
/// the embedded store, which is in memory already.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Whether the cache is used (with PostgreSQL or Redis).
    pub enabled: bool,
    /// Most sessions cached per node.
    pub capacity: usize,
    /// Seconds a cached session is served before it is read again from the store.
    pub max_age_s: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity: 1_000_000,
            max_age_s: 60,
        }
    }
}

impl CacheConfig {
    /// The cache's options.
    pub fn options(&self) -> sessiond_store::cache::CacheOptions {
        sessiond_store::cache::CacheOptions {
            capacity: self.capacity,
            max_age: std::time::Duration::from_secs(self.max_age_s),
            ..sessiond_store::cache::CacheOptions::default()
        }
    }
}

/// The audit log's settings (`[events]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Days events (and known devices, finished webhook deliveries) are kept.
    pub retention_days: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { retention_days: 90 }
    }
}

/// Webhook settings (`[webhooks]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Milliseconds between two polls of the dispatcher (and reloads of the endpoints).
    pub poll_interval_ms: u64,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Milliseconds to wait after the first failed attempt; doubles after each failure
    /// (with jitter), at most an hour.
    pub retry_base_ms: u64,
    /// Milliseconds one attempt may take.
    pub timeout_ms: u64,
    /// Endpoints by name (`[webhooks.endpoints.NAME]`); read-only through the API.
    pub endpoints: BTreeMap<String, WebhookEndpointConfig>,
    /// Internal receivers deliveries may reach: exact host names and addresses or networks
    /// (CIDR). Every other loopback (over https), private, link-local, shared, unique-local or
    /// special-purpose destination is refused.
    pub allowed_hosts: Vec<String>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1000,
            max_attempts: 8,
            retry_base_ms: 5000,
            timeout_ms: 10_000,
            endpoints: BTreeMap::new(),
            allowed_hosts: Vec::new(),
        }
    }
}

/// A webhook endpoint of the configuration file.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpointConfig {
    /// Where events are POSTed.
    pub url: String,
    /// Event types or patterns (`session.revoked`, `security.*`, `*`).
    pub events: Vec<String>,
    /// The signing secret `whsec_<base64>` (prefer `secret_file`).
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the signing secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

impl std::fmt::Debug for WebhookEndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpointConfig")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

impl WebhooksConfig {
    /// The configured endpoints with their secrets read; the message names the key.
    pub fn endpoints(&self) -> Result<BTreeMap<String, crate::webhooks::Endpoint>, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, e) in &self.endpoints {
            let secret = match (&e.secret, &e.secret_file) {
                (Some(s), None) => s.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|err| {
                        ConfigError(format!(
                            "webhooks.endpoints.{name}.secret_file: cannot read {}: {err}",
                            f.display()
                        ))
                    })?
                    .trim()
                    .to_owned(),
                _ => {
                    return Err(ConfigError(format!(
                        "webhooks.endpoints.{name}: set exactly one of secret and secret_file"
                    )));
                }
            };
            let endpoint = crate::webhooks::Endpoint {
                url: e.url.clone(),
                events: e.events.clone(),
                secret,
            };
            if !crate::webhooks::valid_name(name) {
                return Err(ConfigError(format!(
                    "webhooks.endpoints.{name}: a name is 1 to 64 of a-z, 0-9, '_' and '-'"
                )));
            }
            endpoint
                .validate()
                .map_err(|m| ConfigError(format!("webhooks.endpoints.{name}.{m}")))?;
            out.insert(name.clone(), endpoint);
        }
        Ok(out)
    }

    /// The destination rules of deliveries, with the system resolver.
    pub fn destinations(&self) -> Result<crate::ssrf::Destinations, ConfigError> {
        let allowed = crate::ssrf::AllowedHosts::parse(&self.allowed_hosts).map_err(ConfigError)?;
        Ok(crate::ssrf::Destinations::new(
            allowed,
            crate::ssrf::system_lookup(),
        ))
    }

    /// The configured endpoints, their destinations checked (names resolved): the message
    /// names the endpoint whose destination is refused.
    pub async fn checked_endpoints(
        &self,
        dest: &crate::ssrf::Destinations,
    ) -> Result<BTreeMap<String, crate::webhooks::Endpoint>, ConfigError> {
        let endpoints = self.endpoints()?;
        for (name, e) in &endpoints {
            if let Err(crate::ssrf::Refused(why)) = dest.check(&e.url).await {
                return Err(ConfigError(format!(
                    "webhooks.endpoints.{name}.url: this destination is not permitted ({why}); \
                     list it in webhooks.allowed_hosts if it is a deliberate internal receiver"
                )));
            }
        }
        Ok(endpoints)
    }

    /// The dispatcher's settings.
    pub fn options(&self) -> crate::webhooks::WebhookOptions {
        crate::webhooks::WebhookOptions {
            poll_interval: std::time::Duration::from_millis(self.poll_interval_ms),
            max_attempts: self.max_attempts,
            retry_base: std::time::Duration::from_millis(self.retry_base_ms),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
        }
    }
}

/// Token mode's keyring settings (`[jwt]`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Algorithm of keys generated on first start and by `sessiond keys rotate`: `EdDSA`
    /// (Ed25519, the default) or `ES256`.
    pub algorithm: String,
    /// A 32-byte key (base64) that seals the private signing keys in the store (AES-256-GCM).
    /// Prefer `keyring_key_file` or the `SESSIOND_JWT__KEYRING_KEY` variable.
    pub keyring_key: Option<String>,
    /// A file holding the keyring key.
    pub keyring_key_file: Option<PathBuf>,
    /// Seconds between reloads of the keyring from the store (rotations by other nodes).
    pub reload_interval_s: u64,
    /// On PostgreSQL or Redis without a keyring key: store signing keys and webhook secrets
    /// unsealed (readable by anyone who can read the store or its backups) instead of refusing
    /// token mode and webhook secrets. Logged as a warning at start.
    pub allow_unsealed_keys: bool,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            algorithm: "EdDSA".into(),
            keyring_key: None,
            keyring_key_file: None,
            reload_interval_s: 10,
            allow_unsealed_keys: false,
        }
    }
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field(
                "keyring_key",
                &self.keyring_key.as_ref().map(|_| "<redacted>"),
            )
            .field("keyring_key_file", &self.keyring_key_file)
            .field("reload_interval_s", &self.reload_interval_s)
            .field("allow_unsealed_keys", &self.allow_unsealed_keys)
            .finish()
    }
}

impl JwtConfig {
    /// The signing algorithm.
    pub fn signing_alg(&self) -> Result<SigningAlg, ConfigError> {
        SigningAlg::parse(&self.algorithm)
            .map_err(|_| ConfigError("jwt.algorithm: EdDSA or ES256".into()))
    }

    /// The keyring key, if one is configured.
    pub fn sealing_key(&self) -> Result<Option<SealingKey>, ConfigError> {
        let text = match (&self.keyring_key, &self.keyring_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError(
                    "jwt.keyring_key and jwt.keyring_key_file: set at most one".into(),
                ));
            }
            (Some(k), None) => k.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
                ConfigError(format!(
                    "jwt.keyring_key_file: cannot read {}: {e}",
                    f.display()
                ))
            })?,
            (None, None) => return Ok(None),
        };
        SealingKey::from_base64(&text)
            .map(Some)
            .map_err(|e| ConfigError(format!("jwt.keyring_key: {e}")))
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("store", &self.store.as_deref().map(crate::redact_url))
            .field("store_schema", &self.store_schema)
            .field("store_prefix", &self.store_prefix)
            .field("store_timeout_ms", &self.store_timeout_ms)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_file", &self.api_key_file)
            .field("token_prefix", &self.token_prefix)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_data_bytes", &self.max_data_bytes)
            .field("sweep_interval_s", &self.sweep_interval_s)
            .field("retention_s", &self.retention_s)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("shutdown_timeout_s", &self.shutdown_timeout_s)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("http2_cleartext", &self.http2_cleartext)
            .field("health_listen", &self.health_listen)
            .field("tls", &self.tls)
            .field("log_format", &self.log_format)
            .field("default_policy", &self.default_policy)
            .field("jwt", &self.jwt)
            .field("events", &self.events)
            .field("webhooks", &self.webhooks)
            .field("protection", &self.protection)
            .field("limits", &self.limits)
            .field("cache", &self.cache)
            .field("geoip_db", &self.geoip_db)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("sessiond-data"),
            store: None,
            store_schema: None,
            store_prefix: "sd".into(),
            store_timeout_ms: 2000,
            migrate_on_start: true,
            api_key: None,
            api_key_file: None,
            token_prefix: "sdt_".into(),
            max_body_bytes: 64 * 1024,
            max_data_bytes: 16 * 1024,
            sweep_interval_s: 60,
            retention_s: 7 * 24 * 3600,
            flush_interval_ms: 1000,
            shutdown_timeout_s: 30,
            max_concurrent_requests: 1024,
            request_timeout_ms: 10_000,
            max_connections: 8192,
            max_connections_per_peer: 128,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_header_bytes: 32 * 1024,
            http2_cleartext: false,
            health_listen: None,
            tls: TlsConfig::default(),
            log_format: LogFormat::Text,
            default_policy: PolicyDocument::default(),
            jwt: JwtConfig::default(),
            events: EventsConfig::default(),
            webhooks: WebhooksConfig::default(),
            protection: ProtectionConfig::default(),
            limits: LimitsConfig::default(),
            cache: CacheConfig::default(),
            geoip_db: None,
        }
    }
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Values given on the command line: the last layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--store`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// `--geoip-db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geoip_db: Option<PathBuf>,
}

/// Environment variables read by the command line itself rather than as configuration keys.
const CLI_ENV: &[&str] = &["config", "log"];

/// The `SESSIOND_*` environment layer, less Kubernetes' service-link variables.
fn env_layer() -> Env {
    Env::prefixed("SESSIOND_")
        .ignore(CLI_ENV)
        .filter(|key| {
            let name = format!("SESSIOND_{}", key.as_str().to_ascii_uppercase());
            match std::env::var(&name) {
                Ok(value) if is_service_link(key.as_str(), &value) => {
                    // Logging is not set up yet while the configuration loads.
                    eprintln!("sessiond: ignoring {name}, a Kubernetes service-link variable");
                    false
                }
                _ => true,
            }
        })
        .split("__")
}

/// Whether `key` (a variable's name after `SESSIOND_`, any case) and its value are one of the
/// variables Kubernetes injects for a Service whose name starts with `sessiond` (with service
/// links on, the default): `SESSIOND_SERVICE_HOST=10.0.0.1`, `SESSIOND_SERVICE_PORT=8080`,
/// `SESSIOND_SERVICE_PORT_HTTP=8080`, `SESSIOND_PORT=tcp://10.0.0.1:8080`,
/// `SESSIOND_PORT_8080_TCP=tcp://10.0.0.1:8080`, `SESSIOND_PORT_8080_TCP_PROTO=tcp`,
/// `SESSIOND_PORT_8080_TCP_PORT=8080`, `SESSIOND_PORT_8080_TCP_ADDR=10.0.0.1`, and the same
/// behind a longer service name (`SESSIOND_API_SERVICE_HOST`, ...). Both the name and the value
/// must have that shape, so a real setting, or a typo of one, is still read and checked.
fn is_service_link(key: &str, value: &str) -> bool {
    let key = key.to_ascii_uppercase();
    let is_port = |v: &str| !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit());
    let is_ip = |v: &str| v.parse::<std::net::IpAddr>().is_ok();
    let is_proto = |v: &str| matches!(v, "tcp" | "udp" | "sctp" | "TCP" | "UDP" | "SCTP");
    let is_url = |v: &str| {
        ["tcp://", "udp://", "sctp://"].iter().any(|scheme| {
            v.strip_prefix(scheme)
                .is_some_and(|rest| rest.parse::<std::net::SocketAddr>().is_ok())
        })
    };
    // The service name's own words come first, each followed by '_'.
    let mut starts = vec![0];
    starts.extend(key.match_indices('_').map(|(i, _)| i + 1));
    starts.into_iter().any(|at| {
        let rest = &key[at..];
        if rest == "SERVICE_HOST" {
            return is_ip(value);
        }
        if rest == "SERVICE_PORT" || rest.starts_with("SERVICE_PORT_") {
            return is_port(value);
        }
        if rest == "PORT" {
            return is_url(value);
        }
        let Some(tail) = rest.strip_prefix("PORT_") else {
            return false;
        };
        let mut parts = tail.split('_');
        let (Some(port), Some(proto)) = (parts.next(), parts.next()) else {
            return false;
        };
        if !is_port(port) || !is_proto(proto) {
            return false;
        }
        match (parts.next(), parts.next()) {
            (None, _) => is_url(value),
            (Some("PROTO"), None) => is_proto(value),
            (Some("PORT"), None) => is_port(value),
            (Some("ADDR"), None) => is_ip(value),
            _ => false,
        }
    })
}

impl Config {
    /// Loads the layers: defaults, the TOML file (if any), `SESSIOND_*` variables, overrides.
    /// Nested keys in variables use `__`, for example `SESSIOND_DEFAULT_POLICY__IDLE_TIMEOUT_S`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_layers(file, env_layer(), overrides)
    }

    /// [`Config::load`] with the environment layer given.
    fn load_layers(
        file: Option<&Path>,
        env: Env,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig.merge(env).merge(Serialized::defaults(overrides));
        Self::extract(&fig)
    }

    /// Extracts and validates a configuration from its layers.
    fn extract(fig: &Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            let mut msg = String::from("invalid configuration: ");
            for (i, err) in e.into_iter().enumerate() {
                if i > 0 {
                    msg.push_str("; ");
                }
                msg.push_str(&err.to_string());
            }
            ConfigError(msg)
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if TokenFormat::new(&self.token_prefix).is_err() {
            return bad("token_prefix: at most 32 characters of A-Z, a-z, 0-9, '_' and '-'".into());
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return bad("max_body_bytes: between 1024 and 16777216".into());
        }
        if self.max_data_bytes < 2 || self.max_data_bytes > self.max_body_bytes {
            return bad("max_data_bytes: at least 2 and at most max_body_bytes".into());
        }
        if self.sweep_interval_s == 0 {
            return bad("sweep_interval_s: at least 1".into());
        }
        if !(10..=60_000).contains(&self.flush_interval_ms) {
            return bad("flush_interval_ms: between 10 and 60000".into());
        }
        if !(50..=60_000).contains(&self.store_timeout_ms) {
            return bad("store_timeout_ms: between 50 and 60000".into());
        }
        if !(1..=1_000_000).contains(&self.max_concurrent_requests) {
            return bad("max_concurrent_requests: between 1 and 1000000".into());
        }
        if !(100..=600_000).contains(&self.request_timeout_ms) {
            return bad("request_timeout_ms: between 100 and 600000".into());
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return bad("max_connections: between 1 and 1000000".into());
        }
        if !(1..=1_000_000).contains(&self.max_connections_per_peer) {
            return bad("max_connections_per_peer: between 1 and 1000000".into());
        }
        if !(100..=600_000).contains(&self.header_read_timeout_ms) {
            return bad("header_read_timeout_ms: between 100 and 600000".into());
        }
        if !(100..=3_600_000).contains(&self.idle_timeout_ms) {
            return bad("idle_timeout_ms: between 100 and 3600000".into());
        }
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            return bad("max_header_bytes: between 8192 and 1048576".into());
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls.cert_file and tls.key_file: set both or neither".into());
        }
        if !(1..=3600).contains(&self.tls.reload_interval_s) {
            return bad("tls.reload_interval_s: between 1 and 3600".into());
        }
        crate::StoreUrl::parse(self.store.as_deref())?;
        self.jwt.signing_alg()?;
        if !(1..=3600).contains(&self.jwt.reload_interval_s) {
            return bad("jwt.reload_interval_s: between 1 and 3600".into());
        }
        if let Err(e) = Policy::new(self.default_policy.clone()) {
            return bad(format!("default_policy: {e}"));
        }
        if !(1..=3650).contains(&self.events.retention_days) {
            return bad("events.retention_days: between 1 and 3650".into());
        }
        let w = &self.webhooks;
        if !(10..=60_000).contains(&w.poll_interval_ms) {
            return bad("webhooks.poll_interval_ms: between 10 and 60000".into());
        }
        if !(1..=50).contains(&w.max_attempts) {
            return bad("webhooks.max_attempts: between 1 and 50".into());
        }
        if !(10..=3_600_000).contains(&w.retry_base_ms) {
            return bad("webhooks.retry_base_ms: between 10 and 3600000".into());
        }
        if !(100..=120_000).contains(&w.timeout_ms) {
            return bad("webhooks.timeout_ms: between 100 and 120000".into());
        }
        w.endpoints()?;
        w.destinations()?;
        let p = &self.protection;
        if !(1..=86_400).contains(&p.window_s) {
            return bad("protection.window_s: between 1 and 86400".into());
        }
        if p.verify_failures == 0 {
            return bad("protection.verify_failures: at least 1".into());
        }
        if p.block_s == 0 || p.block_max_s < p.block_s || p.block_max_s > 86_400 {
            return bad(
                "protection.block_s and block_max_s: 1 <= block_s <= block_max_s <= 86400".into(),
            );
        }
        if !(1..=100_000_000).contains(&self.cache.capacity) {
            return bad("cache.capacity: between 1 and 100000000 sessions".into());
        }
        if !(1..=3600).contains(&self.cache.max_age_s) {
            return bad("cache.max_age_s: between 1 and 3600".into());
        }
        Ok(())
    }

    /// The API keys from `api_key` and `api_key_file`; empty if neither is set.
    pub fn configured_api_keys(&self) -> Result<Vec<String>, ConfigError> {
        let mut keys = Vec::new();
        if let Some(k) = &self.api_key {
            keys.push(k.trim().to_owned());
        }
        if let Some(f) = &self.api_key_file {
            keys.extend(read_key_file(f)?);
        }
        validate_keys(&keys)?;
        Ok(keys)
    }

    /// The API keys. With none configured, the key in `<data_dir>/api-key` is used, generated
    /// (256 bits, file mode 0600) on first start: sessiond never runs with its API open.
    /// Answers the keys and, when the data-dir key was used, its path.
    pub fn api_keys(&self) -> Result<(Vec<String>, Option<PathBuf>), ConfigError> {
        let keys = self.configured_api_keys()?;
        if !keys.is_empty() {
            return Ok((keys, None));
        }
        let path = self.data_dir.join(GENERATED_KEY_FILE);
        if !path.exists() {
            write_new_key(&self.data_dir, &path)?;
        }
        let keys = read_key_file(&path)?;
        if keys.is_empty() {
            return Err(ConfigError(format!(
                "{} holds no API key; delete it to have a new one generated, or set SESSIOND_API_KEY",
                path.display()
            )));
        }
        validate_keys(&keys)?;
        Ok((keys, Some(path)))
    }
}

/// How the secrets in the store (signing keys, webhook secrets) are sealed.
#[derive(Debug)]
pub struct Sealing {
    /// The keyring key, if there is one.
    pub key: Option<SealingKey>,
    /// Without a key: refuse to store secrets unsealed.
    pub refuse_unsealed: bool,
}

impl Config {
    /// The keyring key: the configured one; on the embedded store without one, the key in
    /// `<data_dir>/keyring-key`, generated (0600) on first start; on a shared store without
    /// one, none, and secrets are refused unless `jwt.allow_unsealed_keys` is set.
    pub fn sealing(&self) -> Result<Sealing, ConfigError> {
        if let Some(key) = self.jwt.sealing_key()? {
            return Ok(Sealing {
                key: Some(key),
                refuse_unsealed: false,
            });
        }
        if matches!(
            crate::StoreUrl::parse(self.store.as_deref())?,
            crate::StoreUrl::Embedded
        ) {
            let path = self.data_dir.join(GENERATED_KEYRING_KEY_FILE);
            if !path.exists() {
                let (_, text) = SealingKey::generate()
                    .map_err(|e| ConfigError(format!("cannot generate a keyring key: {e}")))?;
                write_secret_file(&self.data_dir, &path, &text).map_err(|e| {
                    ConfigError(format!(
                        "no keyring key is configured and none could be generated into {}: \
                         {e}. Set jwt.keyring_key_file.",
                        path.display()
                    ))
                })?;
                tracing::warn!(
                    path = %path.display(),
                    "no keyring key configured: generated one into this file; it seals the \
                     signing keys and webhook secrets in the database. Keep it, and keep it \
                     out of database backups"
                );
            } else {
                tracing::info!(path = %path.display(), "keyring key: from this file");
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError(format!("keyring key: cannot read {}: {e}", path.display()))
            })?;
            let key = SealingKey::from_base64(&text)
                .map_err(|e| ConfigError(format!("keyring key in {}: {e}", path.display())))?;
            return Ok(Sealing {
                key: Some(key),
                refuse_unsealed: false,
            });
        }
        if self.jwt.allow_unsealed_keys {
            tracing::warn!(
                "jwt.allow_unsealed_keys is set: token signing keys and webhook secrets are \
                 stored UNSEALED in the shared store; anyone who can read the store or a backup \
                 of it can mint access tokens and forge webhook signatures. Set \
                 jwt.keyring_key_file (the same key on every node) instead"
            );
            Ok(Sealing {
                key: None,
                refuse_unsealed: false,
            })
        } else {
            tracing::info!(
                "no keyring key configured: token mode and webhook secrets are refused until \
                 jwt.keyring_key_file is set (the same key on every node)"
            );
            Ok(Sealing {
                key: None,
                refuse_unsealed: true,
            })
        }
    }
}

/// Name of the generated keyring key file in the data directory.
pub const GENERATED_KEYRING_KEY_FILE: &str = "keyring-key";

/// Name of the generated API key file in the data directory.
pub const GENERATED_KEY_FILE: &str = "api-key";

fn read_key_file(f: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(f)
        .map_err(|e| ConfigError(format!("api_key_file: cannot read {}: {e}", f.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn write_new_key(dir: &Path, path: &Path) -> Result<(), ConfigError> {
    use std::io::Write;
    let fail = |e: std::io::Error| {
        ConfigError(format!(
            "no API key is configured and none could be generated into {}: {e}. Set \
             SESSIOND_API_KEY (make one with `sessiond generate-key`) or api_key_file.",
            path.display()
        ))
    };
    sessiond_store::embedded::private_dir(dir).map_err(fail)?;
    let (key, _) = TokenFormat::new("sk_")
        .and_then(|f| f.generate())
        .map_err(|e| ConfigError(format!("cannot generate an API key: {e}")))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(fail)?;
    writeln!(f, "{}", key.expose())
        .and_then(|()| f.sync_all())
        .map_err(fail)
}

fn write_secret_file(dir: &Path, path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    sessiond_store::embedded::private_dir(dir)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    writeln!(f, "{text}")?;
    f.sync_all()
}

fn validate_keys(keys: &[String]) -> Result<(), ConfigError> {
    for k in keys {
        if k.len() < MIN_API_KEY_LEN || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError(format!(
                "api_key: every API key must be at least {MIN_API_KEY_LEN} characters with no \
                     spaces; `sessiond generate-key` makes a strong one"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The example configurations in `deploy/`, loaded as `serve --config FILE` loads them:
    /// every key is a real one, every value valid, and each names the store it is for. The
    /// environment layer is kept but emptied, so neither the test runner's own `SESSIOND_TEST_*`
    /// variables nor a developer's `SESSIOND_STORE` join in. Loading does not read
    /// `api_key_file` (the server reads it when it starts), so the path need not exist here.
    #[test]
    fn the_deploy_examples_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let no_env = env_layer().filter(|_| false);
            let cfg = Config::load_layers(Some(&path), no_env, &Overrides::default())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let kind = crate::StoreUrl::parse(cfg.store.as_deref()).unwrap();
            match name.as_str() {
                "sessiond.postgres.toml" => assert!(matches!(kind, crate::StoreUrl::Postgres(_))),
                "sessiond.redis.toml" => {
                    assert!(matches!(kind, crate::StoreUrl::Redis(u) if u.starts_with("redis://")));
                }
                "sessiond.redis-cluster.toml" => {
                    assert!(
                        matches!(kind, crate::StoreUrl::Redis(u) if u.starts_with("redis+cluster://"))
                    );
                }
                other => panic!("an example nobody checks: {other}"),
            }
            assert!(cfg.api_key.is_none(), "{name}: no inline secrets");
            assert!(cfg.api_key_file.is_some(), "{name}: keys come from a file");
            seen.push(name);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn kubernetes_service_links_are_recognised_by_name_and_value() {
        for (key, value) in [
            ("SERVICE_HOST", "10.0.0.1"),
            ("SERVICE_PORT", "8080"),
            ("SERVICE_PORT_HTTP", "8080"),
            ("PORT", "tcp://10.0.0.1:8080"),
            ("PORT_8080_TCP", "tcp://10.0.0.1:8080"),
            ("PORT_8080_TCP_PROTO", "tcp"),
            ("PORT_8080_TCP_PORT", "8080"),
            ("PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("port_8080_tcp_addr", "fd00::1"),
            ("API_SERVICE_HOST", "10.0.0.2"),
            ("API_PORT", "tcp://[fd00::2]:80"),
            ("METRICS_PORT_9090_UDP_PORT", "9090"),
        ] {
            assert!(is_service_link(key, value), "{key}={value}");
        }
        for (key, value) in [
            // Real settings, and plausible mistakes, stay settings (and are checked as such).
            ("API_KEY", "sk_0123456789abcdefghijklmnop"),
            ("LISTEN", "0.0.0.0:8080"),
            ("STORE", "redis://10.0.0.1:6379"),
            ("PORT", "8080"),
            ("SERVICE_HOST", "sessiond.default.svc"),
            ("SERVICE_PORT", "http"),
            ("PORT_8080_TCP", "10.0.0.1:8080"),
            ("PORT_8080_TCP_ADDR", "example"),
            ("PORT_8080_HTTP_PORT", "8080"),
            ("PORT_8080_TCP_HOST", "10.0.0.1"),
            ("MAX_CONNECTIONS", "8080"),
        ] {
            assert!(!is_service_link(key, value), "{key}={value}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap();
            let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(&f));
            Config::extract(&fig)
        };
        assert!(load("store = \"redis+cluster://127.0.0.1:7000\"").is_ok());
        let e = load("stor = \"embedded\"").unwrap_err().to_string();
        assert!(e.contains("stor"), "{e}");
        let e = load("store = \"mysql://x\"").unwrap_err().to_string();
        assert!(e.contains("store"), "{e}");
        for (text, key) in [
            ("max_concurrent_requests = 0", "max_concurrent_requests"),
            ("request_timeout_ms = 5", "request_timeout_ms"),
            ("max_connections = 0", "max_connections"),
            ("max_connections_per_peer = 0", "max_connections_per_peer"),
            ("header_read_timeout_ms = 5", "header_read_timeout_ms"),
            ("idle_timeout_ms = 5", "idle_timeout_ms"),
            ("max_header_bytes = 1024", "max_header_bytes"),
            ("[tls]\ncert_file = \"c.pem\"", "tls.key_file"),
            ("[tls]\nreload_interval_s = 0", "tls.reload_interval_s"),
            ("store_timeout_ms = 10", "store_timeout_ms"),
            ("[jwt]\nalgorithm = \"HS256\"", "jwt.algorithm"),
            ("[jwt]\nreload_interval_s = 0", "jwt.reload_interval_s"),
            ("[jwt]\nkeyring = \"x\"", "keyring"),
            ("[cache]\ncapacity = 0", "cache.capacity"),
            ("[cache]\nmax_age_s = 0", "cache.max_age_s"),
            ("[cache]\nmax_age_s = 3601", "cache.max_age_s"),
            ("[cache]\nsize = 5", "size"),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert!(load("max_concurrent_requests = 64\nrequest_timeout_ms = 2000").is_ok());
        assert!(load("[jwt]\nalgorithm = \"ES256\"\nreload_interval_s = 5").is_ok());
        let c = load("[cache]\nenabled = false\ncapacity = 5000\nmax_age_s = 10").unwrap();
        assert_eq!(
            c.cache,
            CacheConfig {
                enabled: false,
                capacity: 5000,
                max_age_s: 10
            }
        );
    }

    #[test]
    fn the_keyring_key_is_32_bytes_of_base64_from_one_place_and_never_printed() {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let mut jwt = JwtConfig {
            keyring_key: Some(key.into()),
            ..JwtConfig::default()
        };
        assert!(jwt.sealing_key().unwrap().is_some());
        assert!(!format!("{jwt:?}").contains(key));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, format!("{key}\n")).unwrap();
        jwt.keyring_key_file = Some(f.clone());
        let e = jwt.sealing_key().unwrap_err().to_string();
        assert!(e.contains("at most one"), "{e}");
        jwt.keyring_key = None;
        assert!(jwt.sealing_key().unwrap().is_some());
        jwt.keyring_key = Some("c2hvcnQ=".into());
        jwt.keyring_key_file = None;
        let e = jwt.sealing_key().unwrap_err().to_string();
        assert!(
            e.contains("jwt.keyring_key") && !e.contains("c2hvcnQ"),
            "{e}"
        );
        assert!(JwtConfig::default().sealing_key().unwrap().is_none());
    }
}
