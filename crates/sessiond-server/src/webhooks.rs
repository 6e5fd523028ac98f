//! Webhooks: endpoints, the outbox dispatcher, and Standard Webhooks signing.
//!
//! - **Endpoints** come from the configuration (`[[webhooks]]`, read-only through the API) and
//!   from `PUT /v1/webhooks/{name}`, kept in the store's `webhooks` document (compare-and-set),
//!   so every node sees the same set. Each node reloads it every poll interval.
//! - **Outbox**: while any endpoint exists, every event is written with `deliver`, in the
//!   transaction of its change. The dispatcher turns pending events into one delivery per
//!   matching endpoint (atomically: `fan_out`), then attempts due deliveries: a 2xx answer
//!   delivers; anything else is retried with exponential backoff and jitter, and after the last
//!   attempt the delivery is dead-lettered (`GET /v1/webhooks/{name}/deliveries?state=dead`).
//!   Deliveries live in the store, so a restart resumes them: at-least-once delivery.
//! - **One node delivers**: the dispatcher works only while it holds the store's
//!   `webhook-lease` document (compare-and-set, renewed every poll, expires after three polls
//!   without renewal), so each event is delivered by one node; another node takes over when
//!   the holder stops.
//! - **Signing** (Standard Webhooks): headers `webhook-id` (the delivery id, the same on every
//!   attempt, for the receiver's deduplication), `webhook-timestamp` (Unix seconds of the
//!   attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed by
//!   the bytes of the `whsec_` secret. The body is `{"type", "timestamp", "data": <event>}`.
//!   Redirects are not followed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sessiond_core::api::{self, DeliveryState};
use sessiond_core::events::{EventKind, pattern_matches};
use sessiond_core::service::SessionService;
use sessiond_core::store::{DeliveryQuery, SessionStore, StoreError};
use sessiond_core::time::Timestamp;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ssrf::{Destinations, Refused};

/// The store document holding the endpoints made through the API.
pub const WEBHOOKS_DOC: &str = "webhooks";
/// The store document of the dispatcher's lease.
pub const LEASE_DOC: &str = "webhook-lease";
/// Most events fanned out, and most deliveries attempted, per poll.
const BATCH: usize = 100;
/// Attempts made at once.
const CONCURRENCY: usize = 16;
/// Most polls back to back in one tick while batches come back full.
const MAX_POLLS_PER_TICK: usize = 20;
/// Longest wait between two attempts.
const MAX_BACKOFF_MS: i64 = 3_600_000;
/// Most endpoints.
const MAX_WEBHOOKS: usize = 64;

/// A webhook endpoint, with its secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Where events are POSTed.
    pub url: String,
    /// The event type patterns delivered.
    pub events: Vec<String>,
    /// `whsec_<base64>`.
    pub secret: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Endpoint {
    /// Validates an endpoint; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_url(&self.url)?;
        if self.events.is_empty() || self.events.len() > 32 {
            return Err("events: 1 to 32 event types or patterns".into());
        }
        for p in &self.events {
            if !valid_pattern(p) {
                return Err(format!(
                    "events: '{}' is not an event type (session.revoked), a prefix pattern \
                     (security.*) or '*'",
                    p.escape_debug()
                ));
            }
        }
        secret_bytes(&self.secret).map(|_| ())
    }

    fn wants(&self, event_type: &str) -> bool {
        self.events.iter().any(|p| pattern_matches(p, event_type))
    }
}

/// Whether `name` can name a webhook: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_pattern(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let (prefix, last) = match p.strip_suffix(".*") {
        Some(prefix) => (prefix, None),
        None => match p.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => return false,
        },
    };
    let word = |w: &str| {
        !w.is_empty() && w.len() <= 32 && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    };
    word(prefix) && last.is_none_or(word)
}

fn validate_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|_| "url: not a valid URL".to_owned())?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err("url: must not carry credentials".into());
    }
    let host = u.host_str().ok_or_else(|| "url: needs a host".to_owned())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("url: must be https:// (http:// only to a loopback address)".into()),
    }
}

/// The prefix of a secret sealed in the store.
const SEALED: &str = "sealed:";

/// The associated data a webhook's secret is sealed with: it is bound to its webhook.
fn secret_aad(name: &str) -> String {
    format!("webhook:{name}")
}

fn unseal_secret(
    key: Option<&sessiond_core::jwt::SealingKey>,
    name: &str,
    sealed: &str,
) -> Result<String, StoreError> {
    let key = key.ok_or_else(|| {
        StoreError::Backend(
            "the stored webhook secrets are sealed: configure the keyring key they were sealed \
             with (jwt.keyring_key_file)"
                .into(),
        )
    })?;
    let plain = key
        .open(&secret_aad(name), sealed)
        .map_err(|e| StoreError::Backend(format!("webhook {name}: {e}")))?;
    String::from_utf8(plain.to_vec())
        .map_err(|_| StoreError::Backend(format!("webhook {name}: damaged secret")))
}

/// The key bytes of a `whsec_` secret (24 to 64 bytes).
fn secret_bytes(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| "secret: must start with whsec_".to_owned())?;
    let bytes = STANDARD
        .decode(b64)
        .map_err(|_| "secret: whsec_ must be followed by base64".to_owned())?;
    if !(24..=64).contains(&bytes.len()) {
        return Err("secret: must hold 24 to 64 bytes".into());
    }
    Ok(bytes)
}

/// The Standard Webhooks signature header value of a payload.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, String> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret_bytes(secret)?);
    let tag = hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    Ok(format!("v1,{}", STANDARD.encode(tag.as_ref())))
}

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// How often the dispatcher polls (and endpoints are reloaded).
    pub poll_interval: Duration,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles with each further failure.
    pub retry_base: Duration,
    /// Time limit of one attempt.
    pub timeout: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_attempts: 8,
            retry_base: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    hooks: BTreeMap<String, Endpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    until_ms: i64,
}

/// The webhook endpoints and their dispatcher.
pub struct Webhooks {
    service: Arc<SessionService>,
    store: Arc<dyn SessionStore>,
    configured: BTreeMap<String, Endpoint>,
    loaded: RwLock<Arc<BTreeMap<String, (Endpoint, &'static str)>>>,
    /// The version of the `webhooks` document `loaded` comes from (0: none stored).
    applied: parking_lot::Mutex<u64>,
    http: reqwest::Client,
    dest: Destinations,
    opts: WebhookOptions,
    metrics: Arc<Metrics>,
    node: String,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::from(e)
}

impl Webhooks {
    /// Endpoints from the configuration plus those in the store.
    pub fn new(
        service: Arc<SessionService>,
        store: Arc<dyn SessionStore>,
        configured: BTreeMap<String, Endpoint>,
        opts: WebhookOptions,
        dest: Destinations,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        for (name, e) in &configured {
            if !valid_name(name) {
                return Err(format!("webhooks: '{name}' is not a valid name"));
            }
            e.validate().map_err(|m| format!("webhooks.{name}.{m}"))?;
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Deliveries connect only to the addresses the destination rules permit, resolved
            // at connection time (never through a proxy, which would resolve for itself).
            .no_proxy()
            .dns_resolver(Arc::new(dest.resolver()))
            .timeout(opts.timeout)
            .user_agent(concat!("sessiond-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhooks: cannot build the HTTP client: {e}"))?;
        let node = URL_SAFE_ID.encode(
            sessiond_core::token::SessionHandle::generate()
                .map_err(|e| e.to_string())?
                .as_str(),
        );
        let loaded = configured
            .iter()
            .map(|(n, e)| (n.clone(), (e.clone(), "config")))
            .collect();
        service.set_deliver(!configured.is_empty());
        Ok(Self {
            service,
            store,
            configured,
            loaded: RwLock::new(Arc::new(loaded)),
            applied: parking_lot::Mutex::new(0),
            http,
            dest,
            opts,
            metrics,
            node,
        })
    }

    fn sealing(&self) -> Option<&sessiond_core::jwt::SealingKey> {
        self.service.keys().and_then(|k| k.sealing())
    }

    fn refuses_unsealed(&self) -> bool {
        self.service.keys().is_some_and(|k| k.refuses_unsealed())
    }

    /// The stored document, its secrets unsealed; and whether any was stored unsealed.
    async fn read_stored(&self) -> Result<(Option<u64>, Doc, bool), StoreError> {
        match self.store.document(WEBHOOKS_DOC).await? {
            None => Ok((None, Doc::default(), false)),
            Some((v, text)) => {
                let mut doc: Doc = serde_json::from_str(&text).map_err(|e| {
                    StoreError::Backend(format!("the webhooks document is damaged: {e}"))
                })?;
                let mut unsealed = false;
                for (name, e) in &mut doc.hooks {
                    match e.secret.strip_prefix(SEALED) {
                        Some(sealed) => e.secret = unseal_secret(self.sealing(), name, sealed)?,
                        None => unsealed = true,
                    }
                }
                Ok((Some(v), doc, unsealed))
            }
        }
    }

    async fn read_doc(&self) -> Result<(Option<u64>, Doc), StoreError> {
        self.read_stored().await.map(|(v, d, _)| (v, d))
    }

    /// The document as stored: every secret sealed with the keyring key (when there is one).
    fn stored_text(&self, doc: &Doc) -> Result<String, sessiond_core::CoreError> {
        let mut out = Doc::default();
        for (name, e) in &doc.hooks {
            let mut e = e.clone();
            if let Some(key) = self.sealing() {
                e.secret = format!(
                    "{SEALED}{}",
                    key.seal(&secret_aad(name), e.secret.as_bytes())?
                );
            }
            out.hooks.insert(name.clone(), e);
        }
        serde_json::to_string(&out)
            .map_err(|e| sessiond_core::CoreError::Internal(format!("webhooks document: {e}")))
    }

    /// Seals secrets stored unsealed (by an older version) once a keyring key is available.
    pub async fn seal_stored(&self) -> Result<(), ApiError> {
        if self.sealing().is_none() {
            return Ok(());
        }
        let (_, _, unsealed) = self.read_stored().await.map_err(store_err)?;
        if unsealed {
            self.change(|_| Ok(())).await?;
            tracing::info!("sealed the stored webhook secrets with the keyring key");
        }
        Ok(())
    }

    /// Reloads the endpoints from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let (version, doc) = self.read_doc().await?;
        self.apply(version, doc);
        Ok(())
    }

    /// Makes a document read from the store the endpoints in use, unless a newer version is in
    /// use already. Reloads run concurrently (the dispatcher's every poll, every request to the
    /// webhook endpoints): one that read the document before a change must not, by finishing
    /// after the change's own reload, bring the old endpoints back, nor switch the outbox off
    /// after `PUT` has answered (the events of the sessions created then would never be
    /// delivered).
    fn apply(&self, version: Option<u64>, doc: Doc) {
        let version = version.unwrap_or(0);
        let mut applied = self.applied.lock();
        if version < *applied {
            return;
        }
        *applied = version;
        let mut all: BTreeMap<String, (Endpoint, &'static str)> = doc
            .hooks
            .into_iter()
            .map(|(n, e)| (n, (e, "api")))
            .collect();
        for (n, e) in &self.configured {
            all.insert(n.clone(), (e.clone(), "config"));
        }
        self.service.set_deliver(!all.is_empty());
        *self.loaded.write() = Arc::new(all);
    }

    fn view(name: &str, e: &Endpoint, source: &str) -> api::Webhook {
        api::Webhook {
            name: name.to_owned(),
            url: e.url.clone(),
            events: e.events.clone(),
            source: source.to_owned(),
        }
    }

    /// Every endpoint.
    pub async fn list(&self) -> Result<api::WebhookList, ApiError> {
        self.reload().await.map_err(store_err)?;
        let all = self.loaded.read().clone();
        Ok(api::WebhookList {
            webhooks: all
                .iter()
                .map(|(n, (e, src))| Self::view(n, e, src))
                .collect(),
        })
    }

    /// One endpoint.
    pub async fn get(&self, name: &str) -> Result<api::Webhook, ApiError> {
        self.reload().await.map_err(store_err)?;
        let all = self.loaded.read().clone();
        all.get(name)
            .map(|(e, src)| Self::view(name, e, src))
            .ok_or(ApiError::NotFound)
    }

    fn check_name(&self, name: &str) -> Result<(), ApiError> {
        if !valid_name(name) {
            return Err(ApiError::InvalidRequest(
                "a webhook name is 1 to 64 characters of a-z, 0-9, '_' and '-'".into(),
            ));
        }
        if self.configured.contains_key(name) {
            return Err(ApiError::Conflict(format!(
                "webhook '{name}' comes from the configuration file; change it there"
            )));
        }
        Ok(())
    }

    /// Creates or replaces an endpoint.
    pub async fn put(
        &self,
        name: &str,
        input: api::WebhookInput,
    ) -> Result<api::Webhook, ApiError> {
        self.check_name(name)?;
        let e = Endpoint {
            url: input.url,
            events: input.events,
            secret: input.secret,
        };
        e.validate().map_err(ApiError::InvalidRequest)?;
        if self.refuses_unsealed() {
            return Err(ApiError::KeyringKeyRequired(
                "webhook secrets are sealed with a keyring key, and the server has none: set \
                 jwt.keyring_key_file (the same key on every node), or jwt.allow_unsealed_keys"
                    .into(),
            ));
        }
        if let Err(Refused(why)) = self.dest.check(&e.url).await {
            tracing::info!(
                target: "sessiond::webhooks",
                webhook = %name,
                reason = %why,
                "webhook destination refused"
            );
            return Err(ApiError::WebhookUrlRefused);
        }
        self.change(|doc| {
            if !doc.hooks.contains_key(name) && doc.hooks.len() >= MAX_WEBHOOKS {
                return Err(ApiError::InvalidRequest(format!(
                    "at most {MAX_WEBHOOKS} webhooks"
                )));
            }
            doc.hooks.insert(name.to_owned(), e.clone());
            Ok(())
        })
        .await?;
        Ok(Self::view(name, &e, "api"))
    }

    /// Deletes an endpoint; its pending deliveries are dead-lettered when next due.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        // No webhook can have a name that is not one.
        if !valid_name(name) {
            return Err(ApiError::NotFound);
        }
        self.check_name(name)?;
        let mut found = false;
        self.change(|doc| {
            found = doc.hooks.remove(name).is_some();
            Ok(())
        })
        .await?;
        if found {
            Ok(())
        } else {
            Err(ApiError::NotFound)
        }
    }

    async fn change(
        &self,
        mut f: impl FnMut(&mut Doc) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        for _ in 0..8 {
            let (version, mut doc) = self.read_doc().await.map_err(store_err)?;
            f(&mut doc)?;
            let text = self.stored_text(&doc)?;
            if self
                .store
                .put_document(WEBHOOKS_DOC, version, &text)
                .await
                .map_err(store_err)?
            {
                self.reload().await.map_err(store_err)?;
                return Ok(());
            }
        }
        Err(ApiError::from(sessiond_core::CoreError::Conflict))
    }

    /// A page of an endpoint's deliveries, newest first.
    pub async fn deliveries(
        &self,
        name: &str,
        state: Option<DeliveryState>,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<api::DeliveryList, ApiError> {
        if !valid_name(name) {
            return Err(ApiError::InvalidRequest(
                "a webhook name is 1 to 64 characters of a-z, 0-9, '_' and '-'".into(),
            ));
        }
        let limit = sessiond_core::service::page_size(limit)?;
        if cursor.is_some_and(|c| c.len() > 200 || !c.is_ascii()) {
            return Err(ApiError::InvalidRequest("invalid cursor".into()));
        }
        let mut found = self
            .store
            .deliveries(&DeliveryQuery {
                webhook: name.to_owned(),
                state,
                before_id: cursor.map(str::to_owned),
                limit: limit + 1,
            })
            .await
            .map_err(store_err)?;
        let next_cursor = if found.len() > limit {
            found.truncate(limit);
            found.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(api::DeliveryList {
            deliveries: found,
            next_cursor,
        })
    }

    /// Takes or renews the lease; true while this node holds it.
    async fn lease(&self, now: Timestamp) -> Result<bool, StoreError> {
        let ttl = i64::try_from(self.opts.poll_interval.as_millis())
            .unwrap_or(i64::MAX / 4)
            .saturating_mul(3)
            .max(1000);
        let current = self.store.document(LEASE_DOC).await?;
        let (version, free) = match &current {
            None => (None, true),
            Some((v, text)) => {
                let lease: Option<Lease> = serde_json::from_str(text).ok();
                let free =
                    lease.is_none_or(|l| l.holder == self.node || l.until_ms < now.as_millis());
                (Some(*v), free)
            }
        };
        if !free {
            return Ok(false);
        }
        let doc = serde_json::to_string(&Lease {
            holder: self.node.clone(),
            until_ms: now.as_millis().saturating_add(ttl),
        })
        .map_err(|e| StoreError::Backend(e.to_string()))?;
        self.store.put_document(LEASE_DOC, version, &doc).await
    }

    /// Turns a batch of pending events into deliveries; answers how many events there were.
    async fn fan_out_pending(&self, now: Timestamp) -> Result<usize, StoreError> {
        let pending = self.store.pending_events(BATCH).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        // The endpoints are read after the events: an event written for delivery because an
        // endpoint had just been made (on this node or another) finds that endpoint here, even
        // when the reload at the start of the poll read the document before the change.
        // (Fanned out to no endpoint, the event would never be delivered.)
        self.reload().await?;
        let hooks = self.loaded.read().clone();
        let mut deliveries = Vec::new();
        for e in &pending {
            for (name, (hook, _)) in hooks.iter() {
                if hook.wants(&e.event_type) {
                    deliveries.push(api::Delivery {
                        id: format!("{}.{name}", e.id),
                        webhook: name.clone(),
                        event: e.clone(),
                        state: DeliveryState::Pending,
                        attempts: 0,
                        next_attempt_at: Some(now.to_datetime()),
                        last_status: None,
                        last_error: None,
                        created_at: now.to_datetime(),
                        updated_at: now.to_datetime(),
                    });
                }
            }
        }
        let ids: Vec<String> = pending.iter().map(|e| e.id.clone()).collect();
        self.store.fan_out(&ids, &deliveries).await?;
        Ok(pending.len())
    }

    /// One round: reload, and if this node holds the lease, fan out and attempt what is due.
    /// Answers whether a batch was full (there is probably more to do at once).
    pub async fn poll(&self) -> Result<bool, StoreError> {
        self.reload().await?;
        let now = self.service.now();
        if !self.lease(now).await? {
            return Ok(false);
        }
        let pending = self.fan_out_pending(now).await?;
        let hooks = self.loaded.read().clone();
        let due = self.store.due_deliveries(now, BATCH).await?;
        self.metrics.webhook_queue(pending, due.len());
        let full = pending == BATCH || due.len() == BATCH;
        let mut tasks = tokio::task::JoinSet::new();
        let mut queue = due.into_iter();
        loop {
            while tasks.len() < CONCURRENCY {
                let Some(d) = queue.next() else { break };
                let hook = hooks.get(&d.webhook).map(|(h, _)| h.clone());
                let this = AttemptCtx {
                    http: self.http.clone(),
                    dest: self.dest.clone(),
                    opts: self.opts.clone(),
                };
                tasks.spawn(async move { this.attempt(d, hook.as_ref(), now).await });
            }
            let Some(done) = tasks.join_next().await else {
                break;
            };
            let Ok(d) = done else { continue };
            let outcome = match d.state {
                DeliveryState::Delivered => "delivered",
                DeliveryState::Dead => "dead",
                DeliveryState::Pending => "failed",
            };
            self.metrics.webhook_attempt(&d.webhook, outcome);
            if d.state != DeliveryState::Delivered {
                tracing::warn!(
                    target: "sessiond::webhooks",
                    webhook = %d.webhook,
                    delivery = %d.id,
                    attempts = d.attempts,
                    state = d.state.as_str(),
                    error = d.last_error.as_deref().unwrap_or(""),
                    "webhook delivery failed"
                );
            }
            self.store.put_delivery(&d).await?;
        }
        Ok(full)
    }

    /// Polls until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.opts.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A backlog is worked off batch after batch (bounded, so the lease is renewed in
            // time and a tick always ends).
            for _ in 0..MAX_POLLS_PER_TICK {
                match self.poll().await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook dispatch failed; will retry");
                        break;
                    }
                }
            }
        }
    }
}

const URL_SAFE_ID: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

struct AttemptCtx {
    http: reqwest::Client,
    dest: Destinations,
    opts: WebhookOptions,
}

/// The body POSTed for an event.
pub fn payload(e: &api::Event) -> String {
    serde_json::json!({
        "type": e.event_type,
        "timestamp": api::timestamp::format(&e.time),
        "data": e,
    })
    .to_string()
}

impl AttemptCtx {
    /// One attempt; answers the delivery as it stands afterwards.
    async fn attempt(
        &self,
        mut d: api::Delivery,
        hook: Option<&Endpoint>,
        now: Timestamp,
    ) -> api::Delivery {
        d.attempts = d.attempts.saturating_add(1);
        d.updated_at = now.to_datetime();
        let result = match hook {
            None => Err((None, "the webhook no longer exists".to_owned(), true)),
            Some(h) if !h.wants(&d.event.event_type) => Err((
                None,
                "the webhook no longer subscribes to this event type".to_owned(),
                true,
            )),
            Some(h) => self.send(h, &d, now).await,
        };
        match result {
            Ok(status) => {
                d.state = DeliveryState::Delivered;
                d.next_attempt_at = None;
                d.last_status = Some(status);
                d.last_error = None;
            }
            Err((status, error, permanent)) => {
                d.last_status = status;
                d.last_error = Some(error);
                if permanent || d.attempts >= self.opts.max_attempts {
                    d.state = DeliveryState::Dead;
                    d.next_attempt_at = None;
                } else {
                    let wait = backoff_ms(&self.opts, d.attempts);
                    d.next_attempt_at = Some(
                        Timestamp::from_millis(now.as_millis().saturating_add(wait)).to_datetime(),
                    );
                }
            }
        }
        d
    }

    async fn send(
        &self,
        h: &Endpoint,
        d: &api::Delivery,
        now: Timestamp,
    ) -> Result<u16, (Option<u16>, String, bool)> {
        let body = payload(&d.event);
        let ts = now.as_millis() / 1000;
        let sig = sign(&h.secret, &d.id, ts, &body).map_err(|e| (None, e, true))?;
        // A literal address is not resolved, so the resolver cannot check it: check it here
        // (the rules may have changed since the endpoint was made).
        if let Err(Refused(why)) = self.dest.check_literal(&h.url) {
            tracing::warn!(
                target: "sessiond::webhooks",
                webhook = %d.webhook,
                delivery = %d.id,
                reason = %why,
                "webhook destination refused"
            );
            return Err((None, DELIVERY_FAILED.to_owned(), false));
        }
        let res = self
            .http
            .post(&h.url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => Ok(r.status().as_u16()),
            Ok(r) => Err((
                Some(r.status().as_u16()),
                format!("the receiver answered {}", r.status().as_u16()),
                false,
            )),
            Err(e) => {
                tracing::warn!(
                    target: "sessiond::webhooks",
                    webhook = %d.webhook,
                    delivery = %d.id,
                    error = %describe(e),
                    "webhook attempt failed"
                );
                Err((None, DELIVERY_FAILED.to_owned(), false))
            }
        }
    }
}

/// What a delivery records when no answer came: the same text whether the destination was
/// refused, unreachable, slow or spoke bad TLS, so the deliveries API tells nothing about the
/// network behind the server (the cause is in the server log).
const DELIVERY_FAILED: &str = "delivery failed";

/// A transport error for the server log, without the URL (which may carry a token in its
/// query).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The wait after `attempts` failed attempts: base × 2^(attempts-1), capped, with ±50% jitter.
fn backoff_ms(opts: &WebhookOptions, attempts: u32) -> i64 {
    let base = i64::try_from(opts.retry_base.as_millis()).unwrap_or(MAX_BACKOFF_MS);
    let exp = base
        .saturating_mul(1i64 << attempts.saturating_sub(1).min(30))
        .min(MAX_BACKOFF_MS);
    let jitter = 0.5 + fastrand::f64();
    ((exp as f64) * jitter) as i64
}

/// An `auth.failed` event for a request with a missing or wrong API key.
pub fn auth_failed(
    now: Timestamp,
    reason: &str,
    request_id: Option<&str>,
    route: &str,
) -> sessiond_core::events::Event {
    let mut audit = sessiond_core::events::Audit::new("anonymous");
    audit.request_id = request_id.map(Into::into);
    let mut e = audit.event(
        EventKind::AuthFailed,
        now,
        &sessiond_core::token::TenantId::default_tenant(),
    );
    e.reason = Some(reason.to_owned());
    e.details
        .insert("route".into(), serde_json::Value::String(route.to_owned()));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn validates_endpoints() {
        let ok = Endpoint {
            url: "https://example.com/hook".into(),
            events: vec!["session.revoked".into(), "security.*".into(), "*".into()],
            secret: format!("whsec_{}", STANDARD.encode([7u8; 32])),
        };
        ok.validate().unwrap();
        let bad = |f: &dyn Fn(&mut Endpoint)| {
            let mut e = ok.clone();
            f(&mut e);
            e.validate().unwrap_err()
        };
        assert!(bad(&|e| e.url = "http://example.com/".into()).starts_with("url"));
        assert!(bad(&|e| e.url = "ftp://127.0.0.1/".into()).starts_with("url"));
        assert!(bad(&|e| e.url = "https://u:p@example.com/".into()).starts_with("url"));
        assert!(bad(&|e| e.events = vec![]).starts_with("events"));
        assert!(bad(&|e| e.events = vec!["sess*".into()]).starts_with("events"));
        assert!(bad(&|e| e.events = vec!["Session.x".into()]).starts_with("events"));
        assert!(bad(&|e| e.secret = "nope".into()).starts_with("secret"));
        assert!(bad(&|e| e.secret = "whsec_AAAA".into()).starts_with("secret"));
        let mut local = ok.clone();
        local.url = "http://127.0.0.1:9/x".into();
        local.validate().unwrap();
        assert!(valid_name("audit-1_x"));
        assert!(!valid_name("Audit") && !valid_name("") && !valid_name("a/b"));
    }

    fn store(dir: &std::path::Path) -> Arc<dyn SessionStore> {
        Arc::new(
            sessiond_store::EmbeddedStore::open(dir, sessiond_store::EmbeddedOptions::default())
                .unwrap(),
        )
    }

    fn hooks(dir: &std::path::Path) -> (Webhooks, Arc<SessionService>) {
        node(store(dir))
    }

    /// A node: its own service and dispatcher, on `store`.
    fn node(store: Arc<dyn SessionStore>) -> (Webhooks, Arc<SessionService>) {
        let service = Arc::new(SessionService::new(
            store.clone(),
            Arc::new(sessiond_core::time::ManualClock::new(
                Timestamp::from_millis(1_700_000_000_000),
            )),
            Arc::new(sessiond_core::events::LogSink),
            sessiond_core::service::ServiceConfig::default(),
        ));
        let w = Webhooks::new(
            service.clone(),
            store,
            BTreeMap::new(),
            WebhookOptions::default(),
            crate::ssrf::Destinations::new(
                crate::ssrf::AllowedHosts::default(),
                crate::ssrf::system_lookup(),
            ),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        (w, service)
    }

    #[tokio::test]
    async fn a_reload_that_read_before_a_change_does_not_undo_it() {
        let dir = tempfile::tempdir().unwrap();
        let (w, service) = hooks(dir.path());
        w.reload().await.unwrap();
        assert!(!service.delivers());
        // The dispatcher's poll reads the document (no endpoint yet) and is slow to finish...
        let (version, stale) = w.read_doc().await.unwrap();
        // ...while PUT stores an endpoint and answers (its own reload switched delivery on)...
        let input = api::WebhookInput {
            url: "https://example.com/hook".into(),
            events: vec!["session.created".into()],
            secret: format!("whsec_{}", STANDARD.encode([7u8; 32])),
        };
        w.put("audit", input).await.unwrap();
        assert!(service.delivers());
        // ...then the poll's reload finishes: the sessions created from now on must still be
        // delivered, and the endpoint must stay loaded.
        w.apply(version, stale);
        assert!(
            service.delivers(),
            "the outbox was switched off after PUT answered"
        );
        assert!(w.loaded.read().contains_key("audit"));
        // A newer document still applies.
        w.delete("audit").await.unwrap();
        assert!(!service.delivers());
        assert!(w.loaded.read().is_empty());
    }

    fn audit_hook() -> api::WebhookInput {
        api::WebhookInput {
            url: "http://127.0.0.1:9/hook".into(),
            events: vec!["*".into()],
            secret: format!("whsec_{}", STANDARD.encode([7u8; 32])),
        }
    }

    #[tokio::test]
    async fn an_event_written_for_a_new_endpoint_is_fanned_out_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        // The dispatcher has loaded the endpoints before the first one is made (on another
        // node, or by a PUT that answered while this poll's reload was in flight).
        let (dispatcher, _) = node(store.clone());
        dispatcher.reload().await.unwrap();
        let (api_node, service) = node(store.clone());
        api_node.reload().await.unwrap();
        api_node.put("audit", audit_hook()).await.unwrap();
        assert!(service.delivers());
        let now = service.now();
        service
            .record(vec![auth_failed(now, "missing", None, "/v1/events")])
            .await
            .unwrap();
        assert_eq!(dispatcher.fan_out_pending(now).await.unwrap(), 1);
        let made = store
            .deliveries(&DeliveryQuery {
                webhook: "audit".into(),
                state: None,
                before_id: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(made.len(), 1, "the event was fanned out to no endpoint");
    }

    #[tokio::test]
    async fn the_lease_passes_on_only_when_it_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (a, _) = node(store.clone());
        let (b, _) = node(store.clone());
        // Three polls of one second.
        let ttl = 3000;
        let t0 = Timestamp::from_millis(1_700_000_000_000);
        let at = |ms: i64| Timestamp::from_millis(t0.as_millis() + ms);
        assert!(a.lease(t0).await.unwrap());
        assert!(!b.lease(at(ttl - 1)).await.unwrap());
        // A poll slower than the lease: the holder renews a lapsed lease that nobody took.
        assert!(a.lease(at(ttl + 500)).await.unwrap());
        assert!(!b.lease(at(ttl + 600)).await.unwrap());
        // The holder stops (kill -9): another node takes over once the lease lapses.
        assert!(b.lease(at(2 * ttl + 501)).await.unwrap());
        assert!(!a.lease(at(2 * ttl + 502)).await.unwrap());
        // A restarted node is a new holder: it waits like any other.
        let (restarted, _) = node(store.clone());
        assert!(!restarted.lease(at(2 * ttl + 600)).await.unwrap());
        assert!(restarted.lease(at(3 * ttl + 502)).await.unwrap());
        assert!(b.lease(at(3 * ttl + 503)).await.is_ok_and(|held| !held));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = WebhookOptions {
            retry_base: Duration::from_millis(1000),
            ..WebhookOptions::default()
        };
        for _ in 0..50 {
            let first = backoff_ms(&o, 1);
            assert!((500..=1500).contains(&first), "{first}");
            let third = backoff_ms(&o, 3);
            assert!((2000..=6000).contains(&third), "{third}");
            assert!(backoff_ms(&o, 40) <= MAX_BACKOFF_MS * 3 / 2);
        }
    }
}
