//! [`AccessTokenVerifier`]: local verification of sessiond access tokens (JWT, compact JWS)
//! against the server's JWKS, with a cache of its keys.
//!
//! What is checked, in this order:
//!
//! 1. the shape: three base64url parts, at most [`MAX_TOKEN_LEN`] bytes;
//! 2. the header, without trusting it: `alg` must be `EdDSA` or `ES256` (so `none` and HMAC are
//!    refused); `jku`, `x5u`, `jwk`, `x5c`, `crit` and `b64` are refused (keys are never taken or
//!    fetched from a token); `typ`, when present, must be the string `at+jwt` (RFC 9068) or
//!    `JWT` (tokens of servers before explicit typing); `kid` is required;
//! 3. the key: `kid` is looked up in the cache; on a miss the JWKS is fetched again, at most once
//!    per minimum refresh interval whatever the number of callers, and the lookup retried once;
//!    the key's algorithm must be the header's `alg`; keys older than the maximum key age are
//!    refreshed in the background (a withdrawn key stops verifying) while they keep verifying,
//!    but keys not refreshed within the key expiry stop verifying (fail closed) until a fetch
//!    succeeds, so that blocking the JWKS endpoint cannot keep a withdrawn key alive;
//! 4. the signature, with jsonwebtoken, for exactly that algorithm;
//! 5. the claims: `exp` and `nbf` against the verifier's clock with its leeway, `iat` not in the
//!    future (same leeway), `exp - iat` at most the maximum token lifetime, then `iss`, `aud`
//!    and (when configured) `tenant` against the expected values.
//!
//! The JWKS is fetched over `https`, or `http` to a loopback host only, and redirects are never
//! followed: the keys come from the configured URL or not at all.
//!
//! What is not checked: the session's state. A revoked session's access tokens, and access
//! tokens issued before the session's token was rotated (rotate, reauthenticate), verify here
//! until they expire; that is the price of no network call. `POST /v1/sessions/verify` with the
//! access token checks both.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use parking_lot::RwLock;
use reqwest::Url;
use reqwest::header::ACCEPT;
use serde::{Deserialize, Deserializer};
use sessiond_api::AccessClaims;
use tokio::time::Instant;

use crate::error::Error;
use crate::jwks::{self, Key};

/// The default leeway for `exp` and `nbf`: 5 seconds.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);
/// The default minimum interval between two JWKS fetches caused by unknown key ids: 30 seconds.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The default age after which cached keys are refreshed in the background: 5 minutes.
pub const DEFAULT_MAX_KEY_AGE: Duration = Duration::from_secs(300);
/// The default timeout of one JWKS fetch: 10 seconds.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The default key expiry: cached keys not refreshed for an hour (the longest an access token
/// lives) stop verifying. When the maximum key age is set, the default is the longer of one hour
/// and four times that age.
pub const DEFAULT_KEY_EXPIRY: Duration = Duration::from_secs(3600);
/// The default maximum lifetime of an access token, `exp - iat`: 3600 seconds (the server's
/// maximum access token TTL).
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Longer tokens are refused as malformed without being decoded.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// A larger JWKS response is refused.
pub const MAX_JWKS_LEN: usize = 1024 * 1024;

/// A clock: the current time in Unix seconds. Injected in tests to move time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Why an access token was refused. No variant contains any part of the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a compact JWS, bad base64url or JSON, a missing `kid` or `alg`, or claims that are not
    /// sessiond access token claims.
    #[error("malformed access token: {0}")]
    Malformed(&'static str),
    /// A refused algorithm (anything but `EdDSA` and `ES256`) or a refused header (`jku`, `x5u`,
    /// `jwk`, `x5c`, `crit`, `b64`, a foreign `typ`), or an `alg` that is not the key's.
    #[error("refused access token header: {0}")]
    Algorithm(&'static str),
    /// No key of the JWKS has the token's `kid`, even after fetching the JWKS again (or the
    /// last fetch was too recent to fetch again).
    #[error("access token signed by an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("access token signature is invalid")]
    Signature,
    /// `exp` is past (beyond the leeway).
    #[error("access token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("access token is not yet valid")]
    NotYetValid,
    /// `iss` is not the expected issuer.
    #[error("access token has the wrong issuer")]
    Issuer,
    /// `aud` is not the expected audience.
    #[error("access token has the wrong audience")]
    Audience,
    /// `tenant` is not the tenant the verifier was configured for.
    #[error("access token belongs to another tenant")]
    Tenant,
    /// `iat` is in the future (beyond the leeway).
    #[error("access token is issued in the future")]
    IssuedInFuture,
    /// `exp - iat` is longer than the maximum token lifetime, or negative.
    #[error("access token lifetime (exp - iat) is negative or exceeds the maximum")]
    Lifetime,
    /// The token's key is not cached and the JWKS could not be fetched.
    #[error("could not fetch the JWKS: {0}")]
    Jwks(String),
    /// The cached keys were last fetched longer ago than the key expiry and fetching them again
    /// failed: no key verifies until a fetch succeeds.
    #[error("the cached JWKS keys have expired and could not be fetched again: {0}")]
    KeysExpired(String),
}

/// Builds an [`AccessTokenVerifier`]; from [`AccessTokenVerifier::builder`] or
/// [`Client::access_token_verifier`](crate::Client::access_token_verifier).
#[must_use]
pub struct VerifierBuilder {
    jwks_url: Result<Url, ()>,
    issuer: String,
    audience: String,
    leeway: Duration,
    min_refresh_interval: Duration,
    max_key_age: Duration,
    key_expiry: Option<Duration>,
    max_token_lifetime: Duration,
    tenant: Option<String>,
    fetch_timeout: Duration,
    http: Option<reqwest::Client>,
    clock: Option<Clock>,
}

impl fmt::Debug for VerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierBuilder")
            .field("jwks_url", &self.jwks_url.as_ref().map(Url::as_str))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("min_refresh_interval", &self.min_refresh_interval)
            .field("max_key_age", &self.max_key_age)
            .field("key_expiry", &self.key_expiry)
            .field("max_token_lifetime", &self.max_token_lifetime)
            .field("tenant", &self.tenant)
            .field("fetch_timeout", &self.fetch_timeout)
            .finish_non_exhaustive()
    }
}

impl VerifierBuilder {
    pub(crate) fn new(
        jwks_url: Result<Url, ()>,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        Self {
            jwks_url,
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            max_key_age: DEFAULT_MAX_KEY_AGE,
            key_expiry: None,
            max_token_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
            tenant: None,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            http: None,
            clock: None,
        }
    }

    /// The leeway for `exp`, `nbf` and `iat` ([`DEFAULT_LEEWAY`] unless set).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// The minimum interval between two JWKS fetches caused by unknown key ids
    /// ([`DEFAULT_MIN_REFRESH_INTERVAL`] unless set). Within it, a token with an unknown `kid` is
    /// refused from the cache, so a flood of made-up key ids costs at most one fetch per interval.
    pub fn min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    /// How long fetched keys are used before [`AccessTokenVerifier::verify`] refreshes them in the
    /// background ([`DEFAULT_MAX_KEY_AGE`] unless set), so that a key the server withdrew stops
    /// verifying without an unknown key id having to come along. The stale keys keep verifying
    /// while the refresh runs, and when it fails, until the [key expiry](Self::key_expiry).
    pub fn max_key_age(mut self, age: Duration) -> Self {
        self.max_key_age = age;
        self
    }

    /// How long fetched keys may be used at most when they cannot be fetched again
    /// ([`DEFAULT_KEY_EXPIRY`], or four times the maximum key age when that is longer, unless
    /// set). Past it, [`AccessTokenVerifier::verify`] fetches the JWKS before verifying (at most
    /// once per minimum refresh interval) and refuses every token with
    /// [`VerifyError::KeysExpired`] while the fetch fails, so that an endpoint made unreachable
    /// cannot keep a withdrawn key verifying. Must not be shorter than the maximum key age.
    pub fn key_expiry(mut self, expiry: Duration) -> Self {
        self.key_expiry = Some(expiry);
        self
    }

    /// The longest lifetime, `exp - iat`, of an accepted token ([`DEFAULT_MAX_TOKEN_LIFETIME`]
    /// unless set); a longer one is [`VerifyError::Lifetime`].
    pub fn max_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_token_lifetime = lifetime;
        self
    }

    /// Accept only tokens whose `tenant` claim is `tenant` (any tenant unless set). Set it when
    /// tenants may share an issuer, an audience and a signing key: a verifier for one tenant then
    /// refuses the tokens of another with [`VerifyError::Tenant`].
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// The timeout of one JWKS fetch ([`DEFAULT_FETCH_TIMEOUT`] unless set).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Fetch the JWKS through `http` (a new client that follows no redirect when not set). Give
    /// it a client built with `redirect(reqwest::redirect::Policy::none())`: a JWKS answered from
    /// another URL than the configured one is refused as a failed fetch, whatever the client.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// Read the time from `clock` (Unix seconds) rather than from the system clock.
    pub fn clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The verifier. Its key cache starts empty: the first token fetches the JWKS (call
    /// [`AccessTokenVerifier::refresh_keys`] to fetch it up front).
    ///
    /// Fails with [`Error::InvalidArgument`] when the JWKS URL is not an `https` URL (or an
    /// `http` URL whose host is a loopback address: `localhost`, `127.0.0.0/8` or `::1`), the
    /// issuer, the audience or the tenant is empty, or the key expiry is shorter than the
    /// maximum key age.
    pub fn build(self) -> Result<AccessTokenVerifier, Error> {
        let jwks_url = self
            .jwks_url
            .map_err(|()| Error::InvalidArgument("the JWKS URL is not a valid URL"))?;
        match jwks_url.scheme() {
            "https" => {}
            "http" if is_loopback(&jwks_url) => {}
            "http" => {
                return Err(Error::InvalidArgument(
                    "the JWKS URL is http but its host is not a loopback address: use https",
                ));
            }
            _ => return Err(Error::InvalidArgument("the JWKS URL is not https")),
        }
        if self.issuer.is_empty() {
            return Err(Error::InvalidArgument("the expected issuer is empty"));
        }
        if self.audience.is_empty() {
            return Err(Error::InvalidArgument("the expected audience is empty"));
        }
        if self.tenant.as_deref() == Some("") {
            return Err(Error::InvalidArgument("the expected tenant is empty"));
        }
        let key_expiry = match self.key_expiry {
            Some(expiry) if expiry < self.max_key_age => {
                return Err(Error::InvalidArgument(
                    "the key expiry is shorter than the maximum key age",
                ));
            }
            Some(expiry) => expiry,
            None => DEFAULT_KEY_EXPIRY.max(self.max_key_age.saturating_mul(4)),
        };
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(self.fetch_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(Error::Transport)?,
        };
        Ok(AccessTokenVerifier {
            inner: Arc::new(Inner {
                http,
                jwks_url,
                issuer: self.issuer,
                audience: self.audience,
                tenant: self.tenant,
                leeway: i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX),
                max_token_lifetime: i64::try_from(self.max_token_lifetime.as_secs())
                    .unwrap_or(i64::MAX),
                min_refresh_interval: self.min_refresh_interval,
                max_key_age: self.max_key_age,
                key_expiry,
                fetch_timeout: self.fetch_timeout,
                clock: self.clock.unwrap_or_else(|| Arc::new(system_now)),
                keys: RwLock::new(HashMap::new()),
                fetch: tokio::sync::Mutex::new(FetchState::default()),
                fetches: AtomicU64::new(0),
                created: Instant::now(),
                fetched_at_ms: AtomicU64::new(NEVER),
                attempted_at_ms: AtomicU64::new(NEVER),
                background_refresh: AtomicBool::new(false),
            }),
        })
    }
}

/// Verifies sessiond access tokens locally, with the keys of the server's JWKS.
///
/// Cheap to clone: clones share the key cache. Verification of a token whose key is cached
/// takes a read lock on the cache, one signature verification and a few comparisons.
#[derive(Clone)]
pub struct AccessTokenVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    jwks_url: Url,
    issuer: String,
    audience: String,
    tenant: Option<String>,
    leeway: i64,
    max_token_lifetime: i64,
    min_refresh_interval: Duration,
    max_key_age: Duration,
    key_expiry: Duration,
    fetch_timeout: Duration,
    clock: Clock,
    keys: RwLock<HashMap<String, Arc<Key>>>,
    /// Held while fetching, so that concurrent callers share one fetch.
    fetch: tokio::sync::Mutex<FetchState>,
    /// Completed fetch attempts; a caller that waited for the lock sees it change.
    fetches: AtomicU64,
    /// The origin of `fetched_at_ms`.
    created: Instant,
    /// When the keys were last fetched successfully, in milliseconds since `created`; `NEVER`
    /// before the first success.
    fetched_at_ms: AtomicU64,
    /// When a fetch was last started, likewise.
    attempted_at_ms: AtomicU64,
    /// Set while a background refresh of stale keys runs.
    background_refresh: AtomicBool,
}

const NEVER: u64 = u64::MAX;

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    last_error: Option<VerifyError>,
}

impl FetchState {
    fn last_outcome(&self) -> Result<(), VerifyError> {
        match &self.last_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for AccessTokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenVerifier")
            .field("jwks_url", &self.inner.jwks_url.as_str())
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("tenant", &self.inner.tenant)
            .field("leeway_s", &self.inner.leeway)
            .field("min_refresh_interval", &self.inner.min_refresh_interval)
            .field("cached_keys", &self.inner.keys.read().len())
            .finish_non_exhaustive()
    }
}

impl AccessTokenVerifier {
    /// A builder for a verifier of tokens signed by the keys at `jwks_url` (for example
    /// `https://sessiond.example.com/.well-known/jwks.json`) whose `iss` is `issuer` and whose
    /// `aud` is `audience` (the tenant policy's `tokens.issuer` and `tokens.audience`).
    pub fn builder(
        jwks_url: &str,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> VerifierBuilder {
        VerifierBuilder::new(Url::parse(jwks_url).map_err(|_| ()), issuer, audience)
    }

    /// Verifies `token` at the clock's current time; fetches the JWKS when the token's key is not
    /// cached (see [`VerifierBuilder::min_refresh_interval`]), and refreshes it in the background
    /// when the cached keys are older than [`VerifierBuilder::max_key_age`].
    pub async fn verify(&self, token: &str) -> Result<AccessClaims, VerifyError> {
        self.verify_at(token, (self.inner.clock)()).await
    }

    /// [`verify`](Self::verify) at `now` (Unix seconds) instead of the clock's time.
    pub async fn verify_at(&self, token: &str, now: i64) -> Result<AccessClaims, VerifyError> {
        let parts = Parts::parse(token)?;
        let key = match self.lookup(&parts.kid) {
            Lookup::Found(key) => {
                self.refresh_in_background_if_stale();
                key
            }
            Lookup::Missing => {
                self.refresh_after_miss().await?;
                self.lookup(&parts.kid).into_result()?
            }
            Lookup::Expired => {
                self.refresh_after_miss()
                    .await
                    .map_err(|e| VerifyError::KeysExpired(e.to_string()))?;
                self.lookup(&parts.kid).into_result()?
            }
        };
        self.check(&parts, &key, now)
    }

    /// Verifies `token` with the cached keys only, never fetching: a token whose key is not
    /// cached is [`VerifyError::UnknownKey`]. For hot paths outside async code.
    pub fn verify_cached(&self, token: &str) -> Result<AccessClaims, VerifyError> {
        self.verify_cached_at(token, (self.inner.clock)())
    }

    /// [`verify_cached`](Self::verify_cached) at `now` (Unix seconds). Keys past the key expiry
    /// are [`VerifyError::KeysExpired`].
    pub fn verify_cached_at(&self, token: &str, now: i64) -> Result<AccessClaims, VerifyError> {
        let parts = Parts::parse(token)?;
        let key = self.lookup(&parts.kid).into_result()?;
        self.check(&parts, &key, now)
    }

    /// Fetches the JWKS now and replaces the cached keys with its usable keys; returns how many
    /// there are. A set without any usable key is a failed fetch and keeps the cached keys.
    /// Ignores the minimum refresh interval, but a caller that waited for a fetch in
    /// progress shares its outcome instead of fetching again.
    pub async fn refresh_keys(&self) -> Result<usize, VerifyError> {
        let seen = self.inner.fetches.load(Ordering::Acquire);
        let mut state = self.inner.fetch.lock().await;
        if self.inner.fetches.load(Ordering::Acquire) == seen {
            self.fetch_locked(&mut state).await?;
        } else {
            state.last_outcome()?;
        }
        Ok(self.cached_key_count())
    }

    /// How many keys are cached.
    pub fn cached_key_count(&self) -> usize {
        self.inner.keys.read().len()
    }

    /// The expected issuer.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The expected audience.
    pub fn audience(&self) -> &str {
        &self.inner.audience
    }

    /// The expected tenant, when set.
    pub fn tenant(&self) -> Option<&str> {
        self.inner.tenant.as_deref()
    }

    fn lookup(&self, kid: &str) -> Lookup {
        if self.keys_expired() {
            return Lookup::Expired;
        }
        match self.inner.keys.read().get(kid) {
            Some(key) => Lookup::Found(key.clone()),
            None => Lookup::Missing,
        }
    }

    /// Whether the cached keys were fetched longer ago than the key expiry (never when nothing
    /// was fetched yet: the cache is empty then).
    fn keys_expired(&self) -> bool {
        let inner = &self.inner;
        let fetched_at = inner.fetched_at_ms.load(Ordering::Relaxed);
        fetched_at != NEVER
            && millis(inner.created.elapsed()).saturating_sub(fetched_at)
                >= millis(inner.key_expiry)
    }

    /// After a cache miss: fetch the JWKS unless a fetch happened within the minimum interval
    /// (or completed while this caller waited), in which case share that fetch's outcome.
    async fn refresh_after_miss(&self) -> Result<(), VerifyError> {
        let seen = self.inner.fetches.load(Ordering::Acquire);
        let mut state = self.inner.fetch.lock().await;
        if self.inner.fetches.load(Ordering::Acquire) != seen {
            return state.last_outcome();
        }
        if let Some(last) = state.last_attempt
            && last.elapsed() < self.inner.min_refresh_interval
        {
            return state.last_outcome();
        }
        self.fetch_locked(&mut state).await
    }

    /// When the keys are older than the maximum key age, refresh them in a task of its own (one
    /// at a time, within the minimum refresh interval), so that no caller waits for it.
    fn refresh_in_background_if_stale(&self) {
        let inner = &self.inner;
        let fetched_at = inner.fetched_at_ms.load(Ordering::Relaxed);
        if fetched_at == NEVER {
            return;
        }
        let now_ms = millis(inner.created.elapsed());
        if now_ms.saturating_sub(fetched_at) < millis(inner.max_key_age) {
            return;
        }
        // After a failed refresh, wait for the minimum interval before the next one.
        let attempted_at = inner.attempted_at_ms.load(Ordering::Relaxed);
        if attempted_at != NEVER
            && now_ms.saturating_sub(attempted_at) < millis(inner.min_refresh_interval)
        {
            return;
        }
        // Outside a Tokio runtime there is nowhere to run the refresh: keep the keys.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if inner.background_refresh.swap(true, Ordering::AcqRel) {
            return;
        }
        let verifier = self.clone();
        runtime.spawn(async move {
            // A failure keeps the cached keys; it is remembered for unknown key ids.
            let _ = verifier.refresh_after_miss().await;
            verifier
                .inner
                .background_refresh
                .store(false, Ordering::Release);
        });
    }

    async fn fetch_locked(&self, state: &mut FetchState) -> Result<(), VerifyError> {
        state.last_attempt = Some(Instant::now());
        self.inner
            .attempted_at_ms
            .store(millis(self.inner.created.elapsed()), Ordering::Relaxed);
        let outcome = match self.fetch_keys().await {
            // An empty set would withdraw every key at once: more likely a broken or hostile
            // answer than a rotation, so it is a failed fetch and the cache (with its expiry)
            // stays.
            Ok(keys) if keys.is_empty() => {
                Err(VerifyError::Jwks("the JWKS holds no usable key".to_owned()))
            }
            Ok(keys) => {
                *self.inner.keys.write() = keys;
                self.inner
                    .fetched_at_ms
                    .store(millis(self.inner.created.elapsed()), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        };
        state.last_error = outcome.as_ref().err().cloned();
        self.inner.fetches.fetch_add(1, Ordering::Release);
        outcome
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, Arc<Key>>, VerifyError> {
        let inner = &self.inner;
        let mut response = inner
            .http
            .get(inner.jwks_url.clone())
            .header(ACCEPT, "application/json")
            .timeout(inner.fetch_timeout)
            .send()
            .await
            .map_err(|e| VerifyError::Jwks(error_chain(&e)))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(VerifyError::Jwks(format!(
                "the JWKS endpoint answered {}, a redirect, which is not followed",
                status.as_u16()
            )));
        }
        // A client given by the application may follow redirects: keys served from anywhere but
        // the configured URL are refused all the same.
        if response.url() != &inner.jwks_url {
            return Err(VerifyError::Jwks(
                "the JWKS endpoint redirected to another URL, which is refused".to_owned(),
            ));
        }
        if !status.is_success() {
            return Err(VerifyError::Jwks(format!(
                "the JWKS endpoint answered {}",
                status.as_u16()
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| VerifyError::Jwks(error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_LEN {
                return Err(VerifyError::Jwks(format!(
                    "the JWKS is larger than {MAX_JWKS_LEN} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let set = jwks::parse_lenient(&body).map_err(|e| {
            VerifyError::Jwks(format!(
                "the JWKS is not a JSON key set (line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        Ok(jwks::key_map(&set))
    }

    /// Steps 3 (algorithm of the key) to 5 (claims).
    fn check(&self, parts: &Parts<'_>, key: &Key, now: i64) -> Result<AccessClaims, VerifyError> {
        if key.alg != parts.alg {
            return Err(VerifyError::Algorithm(
                "alg is not the algorithm of the key",
            ));
        }
        match jsonwebtoken::crypto::verify(
            parts.signature,
            parts.message.as_bytes(),
            &key.decoding,
            key.alg,
        ) {
            Ok(true) => {}
            Ok(false) => return Err(VerifyError::Signature),
            Err(e) if matches!(e.kind(), ErrorKind::Base64(_)) => {
                return Err(VerifyError::Malformed("signature is not base64url"));
            }
            Err(_) => return Err(VerifyError::Signature),
        }
        let payload = URL_SAFE_NO_PAD
            .decode(parts.payload)
            .map_err(|_| VerifyError::Malformed("payload is not base64url"))?;
        let claims: AccessClaims = serde_json::from_slice(&payload)
            .map_err(|_| VerifyError::Malformed("claims are not sessiond access token claims"))?;
        let leeway = self.inner.leeway;
        if now >= claims.exp.saturating_add(leeway) {
            return Err(VerifyError::Expired);
        }
        if now.saturating_add(leeway) < claims.nbf {
            return Err(VerifyError::NotYetValid);
        }
        if now.saturating_add(leeway) < claims.iat {
            return Err(VerifyError::IssuedInFuture);
        }
        match claims.exp.checked_sub(claims.iat) {
            Some(lifetime) if (0..=self.inner.max_token_lifetime).contains(&lifetime) => {}
            _ => return Err(VerifyError::Lifetime),
        }
        if claims.iss != self.inner.issuer {
            return Err(VerifyError::Issuer);
        }
        if claims.aud != self.inner.audience {
            return Err(VerifyError::Audience);
        }
        if let Some(tenant) = &self.inner.tenant
            && claims.tenant != *tenant
        {
            return Err(VerifyError::Tenant);
        }
        Ok(claims)
    }
}

/// A token split into its parts, with its header checked.
struct Parts<'t> {
    alg: Algorithm,
    kid: String,
    /// `header.payload`, the signed message.
    message: &'t str,
    payload: &'t str,
    signature: &'t str,
}

/// Marks a header member as present, whatever its value (even `null`).
struct Present;

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Present>, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| Some(Present))
}

/// A present member's value, `null` included (a plain `Option` would read `null` as absent).
fn some_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// The `typ` values of an access token: `at+jwt` (RFC 9068; `application/` may prefix it, and
/// media types compare case-insensitively, RFC 7515) and `JWT`, which servers wrote before
/// explicit typing.
const ACCEPTED_TYP: [&str; 3] = ["at+jwt", "application/at+jwt", "JWT"];

/// What the cache holds for a key id.
enum Lookup {
    Found(Arc<Key>),
    Missing,
    /// The cached keys are past the key expiry.
    Expired,
}

impl Lookup {
    fn into_result(self) -> Result<Arc<Key>, VerifyError> {
        match self {
            Self::Found(key) => Ok(key),
            Self::Missing => Err(VerifyError::UnknownKey),
            Self::Expired => Err(VerifyError::KeysExpired(
                "the keys were not refreshed within the key expiry".to_owned(),
            )),
        }
    }
}

/// Whether `url`'s host is `localhost` or a loopback address (`127.0.0.0/8`, `::1`).
fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // The URL parser writes IP hosts canonically (`127.0.0.1`, `[::1]`).
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

#[derive(Deserialize)]
struct RawHeader {
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    /// Absent, or present with any JSON value (`null` included), to be checked.
    #[serde(default, deserialize_with = "some_value")]
    typ: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    jku: Option<Present>,
    #[serde(default, deserialize_with = "present")]
    x5u: Option<Present>,
    #[serde(default, deserialize_with = "present")]
    jwk: Option<Present>,
    #[serde(default, deserialize_with = "present")]
    x5c: Option<Present>,
    #[serde(default, deserialize_with = "present")]
    crit: Option<Present>,
    #[serde(default, deserialize_with = "present")]
    b64: Option<Present>,
}

impl<'t> Parts<'t> {
    fn parse(token: &'t str) -> Result<Self, VerifyError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(VerifyError::Malformed("token is too long"));
        }
        let mut split = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (split.next(), split.next(), split.next(), split.next())
        else {
            return Err(VerifyError::Malformed("not a compact JWS of three parts"));
        };
        let message = &token[..header.len() + 1 + payload.len()];
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| VerifyError::Malformed("header is not base64url"))?;
        // A derived `Deserialize` also accepts a JSON array for a struct: insist on an object.
        if header.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(VerifyError::Malformed("header is not a JSON object"));
        }
        let header: RawHeader = serde_json::from_slice(&header)
            .map_err(|_| VerifyError::Malformed("header is not a JSON object"))?;
        let alg = match header.alg.as_deref() {
            Some("EdDSA") => Algorithm::EdDSA,
            Some("ES256") => Algorithm::ES256,
            Some(_) => return Err(VerifyError::Algorithm("alg is not EdDSA or ES256")),
            None => return Err(VerifyError::Malformed("header has no alg")),
        };
        if header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some()
        {
            return Err(VerifyError::Algorithm(
                "header names a key (jku, x5u, jwk or x5c)",
            ));
        }
        if header.crit.is_some() || header.b64.is_some() {
            return Err(VerifyError::Algorithm("header has crit or b64"));
        }
        if let Some(typ) = &header.typ {
            let accepted = typ
                .as_str()
                .is_some_and(|typ| ACCEPTED_TYP.iter().any(|t| t.eq_ignore_ascii_case(typ)));
            if !accepted {
                return Err(VerifyError::Algorithm("typ is not at+jwt or JWT"));
            }
        }
        // Checked after the header, so that `alg: none` with its empty signature is refused as
        // an algorithm.
        if payload.is_empty() || signature.is_empty() {
            return Err(VerifyError::Malformed("a part of the token is empty"));
        }
        let kid = match header.kid {
            Some(kid) if !kid.is_empty() => kid,
            _ => return Err(VerifyError::Malformed("header has no kid")),
        };
        Ok(Self {
            alg,
            kid,
            message,
            payload,
            signature,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(NEVER - 1)
}

/// The messages of `e` and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The system clock: the SDK's one clock adapter.
#[allow(clippy::disallowed_methods)]
fn system_now() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn parse(header: &str) -> Result<(Algorithm, String), VerifyError> {
        let token = format!("{}.{}.c2ln", b64(header), b64("{}"));
        Parts::parse(&token).map(|p| (p.alg, p.kid))
    }

    #[test]
    fn header_rules() {
        assert_eq!(
            parse(r#"{"alg":"EdDSA","kid":"k","typ":"JWT"}"#).unwrap(),
            (Algorithm::EdDSA, "k".to_owned())
        );
        assert_eq!(
            parse(r#"{"alg":"ES256","kid":"k","typ":"at+jwt"}"#).unwrap(),
            (Algorithm::ES256, "k".to_owned())
        );
        assert_eq!(
            parse(r#"{"alg":"ES256","kid":"k"}"#).unwrap(),
            (Algorithm::ES256, "k".to_owned())
        );
        for (header, want) in [
            (r#"{"alg":"none","kid":"k"}"#, "Algorithm"),
            (r#"{"alg":"HS256","kid":"k"}"#, "Algorithm"),
            (r#"{"alg":"RS256","kid":"k"}"#, "Algorithm"),
            (r#"{"alg":"eddsa","kid":"k"}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","jku":"http://x"}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","jku":null}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","x5u":"http://x"}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","jwk":{}}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","x5c":[]}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","crit":["exp"]}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","b64":false}"#, "Algorithm"),
            (
                r#"{"alg":"EdDSA","kid":"k","typ":"logout+jwt"}"#,
                "Algorithm",
            ),
            (r#"{"alg":"EdDSA","kid":"k","typ":null}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","typ":"JOSE"}"#, "Algorithm"),
            (r#"{"alg":"EdDSA","kid":"k","typ":5}"#, "Algorithm"),
            (r#"{"alg":"EdDSA"}"#, "Malformed"),
            (r#"{"alg":"EdDSA","kid":""}"#, "Malformed"),
            (r#"{"kid":"k"}"#, "Malformed"),
            (r#"{"alg":"EdDSA","alg":"EdDSA","kid":"k"}"#, "Malformed"),
            (r#"["alg"]"#, "Malformed"),
        ] {
            let got = parse(header).unwrap_err();
            let kind = match got {
                VerifyError::Algorithm(_) => "Algorithm",
                VerifyError::Malformed(_) => "Malformed",
                _ => "other",
            };
            assert_eq!(kind, want, "{header}: {got}");
        }
    }

    #[test]
    fn shape_rules() {
        for token in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "..",
            "a..c",
            "*.e30.c2ln",
            &"a".repeat(20_000),
        ] {
            assert!(
                matches!(Parts::parse(token), Err(VerifyError::Malformed(_))),
                "{token}"
            );
        }
        // Padding is not base64url of a JWS.
        let token = format!("{}==.e30.c2ln", b64(r#"{"alg":"EdDSA","kid":"k"}"#));
        assert!(matches!(
            Parts::parse(&token),
            Err(VerifyError::Malformed(_))
        ));
    }
}
