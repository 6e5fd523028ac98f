//! Metrics in the Prometheus (OpenMetrics) text format, served at `GET /metrics` behind the API
//! key: requests and their latency per route, verify outcomes, lifecycle events, and the latency
//! and failures of the shared stores' operations.
//!
//! Each [`Metrics`] owns its registry (no global state), so servers in one process do not mix
//! their figures. Label values are bounded: route templates (never raw paths), status codes,
//! stable error codes, event types and reasons.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};
use sessiond_core::api;
use sessiond_core::events::{Audit, Event, EventSink};
use sessiond_core::policy::Policy;
use sessiond_core::session::{SessionRecord, StoredSession};
use sessiond_core::store::{
    DataUpdate, DeliveryQuery, EventQuery, InsertOutcome, ListQuery, Rekey, RevokeOutcome,
    RotateOutcome, SessionStore, StoreError, SweepReport,
};
use sessiond_core::time::Timestamp;
use sessiond_core::token::{SessionHandle, TenantId, TokenHash, UserId};

/// `Content-Type` of the rendered metrics.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<String>,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerifyLabels {
    token: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    r#type: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    webhook: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    timeout: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RouteLabels>,
    verifies: Family<VerifyLabels, Counter>,
    events: Family<EventLabels, Counter>,
    store_seconds: HistogramFamily<OperationLabels>,
    store_errors: Family<OperationLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    outbox: Gauge,
    due: Gauge,
    active: Family<TenantLabels, Gauge>,
    cache_lookups: Family<CacheLabels, Counter>,
    cache_invalidations: Counter,
    cache_trusted: Gauge,
    connections_open: Gauge,
    connections_shed: Family<ShedLabels, Counter>,
    connections_timeouts: Family<TimeoutLabels, Counter>,
    known_tenants: parking_lot::Mutex<std::collections::HashSet<String>>,
    counted_at: std::sync::atomic::AtomicI64,
    /// Route templates and their labels, made once per route rather than once per request.
    route_labels: parking_lot::RwLock<std::collections::HashMap<String, Arc<String>>>,
}

/// Shortest time between two counts of the active sessions, in milliseconds.
pub const COUNT_INTERVAL_MS: i64 = 5_000;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics, registered under `sessiond_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sessiond");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        let verifies = Family::<VerifyLabels, Counter>::default();
        let events = Family::<EventLabels, Counter>::default();
        let store_seconds: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(latency_histogram);
        let store_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            request_seconds.clone(),
        );
        registry.register(
            "verifies",
            "Verifications by token kind (session or access) and outcome (valid or the error code)",
            verifies.clone(),
        );
        registry.register(
            "events",
            "Lifecycle events by type and reason (created, rotated, refreshed, revoked, ...)",
            events.clone(),
        );
        registry.register(
            "store_operation_duration_seconds",
            "Time of a shared store's operations (PostgreSQL, Redis), by operation",
            store_seconds.clone(),
        );
        registry.register(
            "store_errors",
            "Failed operations of a shared store (PostgreSQL, Redis), by operation",
            store_errors.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        let outbox = Gauge::default();
        let due = Gauge::default();
        let active = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "active_sessions",
            "Sessions not ended, per tenant (on PostgreSQL, timed-out ones count until swept), \
             counted at most every 5 s on scrape; absent on Redis",
            active.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by webhook and outcome (delivered, failed, dead)",
            deliveries.clone(),
        );
        registry.register(
            "webhook_outbox_events",
            "Events waiting to be fanned out to webhooks, at the dispatcher's last poll (capped \
             at its batch size)",
            outbox.clone(),
        );
        registry.register(
            "webhook_due_deliveries",
            "Deliveries due for an attempt at the dispatcher's last poll (capped at its batch size)",
            due.clone(),
        );
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        let cache_invalidations = Counter::default();
        let cache_trusted = Gauge::default();
        registry.register(
            "cache_lookups",
            "Verify lookups on PostgreSQL or Redis by how the session cache answered: hit (from \
             memory), miss (from the store), bypass (from the store: the cache's change feed is \
             not subscribed)",
            cache_lookups.clone(),
        );
        registry.register(
            "cache_invalidations",
            "Sessions dropped from the session cache on a change (one per change; a flush counts \
             once)",
            cache_invalidations.clone(),
        );
        registry.register(
            "cache_trusted",
            "1 while the session cache's change feed is subscribed and the cache may answer",
            cache_trusted.clone(),
        );
        let connections_open = Gauge::default();
        let connections_shed = Family::<ShedLabels, Counter>::default();
        let connections_timeouts = Family::<TimeoutLabels, Counter>::default();
        registry.register(
            "connections_open",
            "Client connections open on the API listener",
            connections_open.clone(),
        );
        registry.register(
            "connections_shed",
            "Connections to the API listener closed as soon as accepted, by reason (per_peer: \
             the peer address holds max_connections_per_peer; max_connections: the listener \
             holds max_connections)",
            connections_shed.clone(),
        );
        registry.register(
            "connections_timeouts",
            "Connections closed by a timeout, by timeout (header: no complete request head in \
             header_read_timeout_ms; idle: no traffic and no request in idle_timeout_s)",
            connections_timeouts.clone(),
        );
        Self {
            registry,
            connections_open,
            connections_shed,
            connections_timeouts,
            cache_lookups,
            cache_invalidations,
            cache_trusted,
            requests,
            request_seconds,
            verifies,
            events,
            store_seconds,
            store_errors,
            deliveries,
            outbox,
            due,
            active,
            known_tenants: parking_lot::Mutex::default(),
            counted_at: std::sync::atomic::AtomicI64::new(i64::MIN / 2),
            route_labels: parking_lot::RwLock::default(),
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a verification: `token` is `session` or `access`, `outcome` is `valid` or the
    /// error code answered.
    pub fn verified(&self, token: &'static str, outcome: &'static str) {
        self.verifies
            .get_or_create(&VerifyLabels { token, outcome })
            .inc();
    }

    /// Adds `delta` to the open connections of the API listener.
    pub fn connections_open(&self, delta: i64) {
        self.connections_open.inc_by(delta);
    }

    /// Counts a connection closed at once: `reason` is `per_peer` or `max_connections`.
    pub fn connection_shed(&self, reason: &'static str) {
        self.connections_shed
            .get_or_create(&ShedLabels { reason })
            .inc();
    }

    /// Counts a connection closed by a timeout: `timeout` is `header` or `idle`.
    pub fn connection_timed_out(&self, timeout: &'static str) {
        self.connections_timeouts
            .get_or_create(&TimeoutLabels { timeout })
            .inc();
    }

    /// Counts a webhook delivery attempt (`delivered`, `failed` or `dead`).
    pub fn webhook_attempt(&self, webhook: &str, outcome: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                webhook: webhook.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Sets the dispatcher's queue gauges.
    pub fn webhook_queue(&self, outbox: usize, due: usize) {
        self.outbox.set(i64::try_from(outbox).unwrap_or(i64::MAX));
        self.due.set(i64::try_from(due).unwrap_or(i64::MAX));
    }

    /// Refreshes the active-sessions gauge from the store, at most once per
    /// [`COUNT_INTERVAL_MS`] (called on scrape; a failure keeps the last figures).
    pub async fn count_active(&self, service: &sessiond_core::service::SessionService) {
        let now = service.now().as_millis();
        let last = self.counted_at.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) < COUNT_INTERVAL_MS
            || self
                .counted_at
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        match service.store().active_sessions(service.now()).await {
            Ok(Some(counts)) => self.active_sessions(&counts),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "counting active sessions failed"),
        }
    }

    /// Sets the active-sessions gauge; tenants no longer counted drop to 0.
    fn active_sessions(&self, counts: &[(TenantId, u64)]) {
        let mut seen = std::collections::HashSet::new();
        for (t, n) in counts {
            seen.insert(t.as_str().to_owned());
            self.active
                .get_or_create(&TenantLabels {
                    tenant: t.as_str().to_owned(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let known: Vec<String> = self
            .known_tenants
            .lock()
            .drain()
            .filter(|t| !seen.contains(t))
            .collect();
        for t in known {
            self.active
                .get_or_create(&TenantLabels { tenant: t })
                .set(0);
        }
        *self.known_tenants.lock() = seen;
    }

    fn store_op(&self, operation: &'static str, started: Instant, failed: bool) {
        let labels = OperationLabels { operation };
        self.store_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if failed {
            self.store_errors.get_or_create(&labels).inc();
        }
    }
}

/// A route template as a label: `/v1/sessions/{handle}` becomes `/v1/sessions/:handle`, so that
/// no brace reaches tools that split label values naively.
fn route_label(template: &str) -> String {
    template.replace('{', ":").replace('}', "")
}

/// The method as a label: the standard ones, else `other` (the set stays bounded).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    /// The label of a route template (bounded: templates come from the router).
    fn route_of(&self, template: Option<&str>) -> Arc<String> {
        let template = template.unwrap_or("unmatched");
        if let Some(l) = self.route_labels.read().get(template) {
            return l.clone();
        }
        let label = Arc::new(if template == "unmatched" {
            template.to_owned()
        } else {
            route_label(template)
        });
        self.route_labels
            .write()
            .entry(template.to_owned())
            .or_insert(label)
            .clone()
    }
}

/// Middleware: counts and times every routed request by its route template.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = m.route_of(
        req.extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let method = method_label(req.method());
    let started = Instant::now();
    let res = next.run(req).await;
    m.request_seconds
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// An event sink that counts events, then hands them on.
pub struct CountingSink {
    metrics: Arc<Metrics>,
    next: Arc<dyn EventSink>,
}

impl CountingSink {
    /// Counts into `metrics`, then records with `next`.
    pub fn new(metrics: Arc<Metrics>, next: Arc<dyn EventSink>) -> Self {
        Self { metrics, next }
    }
}

impl EventSink for CountingSink {
    fn record(&self, e: &Event) {
        self.metrics
            .events
            .get_or_create(&EventLabels {
                r#type: e.kind.as_str(),
                reason: e.reason.clone().unwrap_or_default(),
            })
            .inc();
        self.next.record(e);
    }
}

impl sessiond_store::cache::CacheObserver for Metrics {
    fn lookup(&self, outcome: sessiond_store::cache::Lookup) {
        self.cache_lookups
            .get_or_create(&CacheLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    fn invalidated(&self) {
        self.cache_invalidations.inc();
    }

    fn trusted(&self, trusted: bool) {
        self.cache_trusted.set(i64::from(trusted));
    }
}

/// A store that times every operation of the store it wraps (for the shared stores, whose
/// operations are network round trips).
pub struct TimedStore {
    inner: Arc<dyn SessionStore>,
    metrics: Arc<Metrics>,
}

impl TimedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn SessionStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.metrics.store_op($op, started, r.is_err());
        r
    }};
}

#[async_trait]
impl SessionStore for TimedStore {
    async fn insert(
        &self,
        record: SessionRecord,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError> {
        timed!(self, "insert", self.inner.insert(record, now, audit))
    }

    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError> {
        timed!(self, "find_by_token", self.inner.find_by_token(hash))
    }

    async fn find_by_token_with_policy(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<(StoredSession, Arc<Policy>)>, StoreError> {
        timed!(
            self,
            "find_by_token_with_policy",
            self.inner.find_by_token_with_policy(hash)
        )
    }

    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError> {
        timed!(self, "find_by_handle", self.inner.find_by_handle(handle))
    }

    async fn touch(
        &self,
        session: &StoredSession,
        policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        timed!(self, "touch", self.inner.touch(session, policy, at))
    }

    async fn rotate(
        &self,
        handle: &SessionHandle,
        change: &Rekey,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<RotateOutcome, StoreError> {
        timed!(
            self,
            "rotate",
            self.inner.rotate(handle, change, now, audit)
        )
    }

    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError> {
        timed!(
            self,
            "revoke",
            self.inner.revoke(handle, reason, now, audit)
        )
    }

    async fn revoke_user(
        &self,
        user_id: &UserId,
        tenant: Option<&TenantId>,
        except: Option<&SessionHandle>,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Vec<SessionHandle>, StoreError> {
        timed!(
            self,
            "revoke_user",
            self.inner
                .revoke_user(user_id, tenant, except, reason, now, audit)
        )
    }

    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<DataUpdate, StoreError> {
        timed!(
            self,
            "update_data",
            self.inner.update_data(handle, patch, limit, now, audit)
        )
    }

    async fn list_user(
        &self,
        query: &ListQuery,
        now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError> {
        timed!(self, "list_user", self.inner.list_user(query, now))
    }

    async fn policy(&self, tenant: &TenantId) -> Result<Arc<Policy>, StoreError> {
        timed!(self, "policy", self.inner.policy(tenant))
    }

    async fn put_policy(
        &self,
        tenant: &TenantId,
        policy: Policy,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "put_policy",
            self.inner.put_policy(tenant, policy, now, audit)
        )
    }

    async fn sweep(
        &self,
        now: Timestamp,
        retention_s: u64,
        audit: &Audit,
    ) -> Result<SweepReport, StoreError> {
        timed!(self, "sweep", self.inner.sweep(now, retention_s, audit))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        timed!(self, "flush", self.inner.flush())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, "ping", self.inner.ping())
    }

    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError> {
        timed!(self, "document", self.inner.document(name))
    }

    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError> {
        timed!(
            self,
            "put_document",
            self.inner.put_document(name, expected, doc)
        )
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        timed!(self, "append_events", self.inner.append_events(events))
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<api::Event>, StoreError> {
        timed!(self, "events", self.inner.events(query))
    }

    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        timed!(self, "purge_events", self.inner.purge_events(before))
    }

    async fn pending_events(&self, limit: usize) -> Result<Vec<api::Event>, StoreError> {
        timed!(self, "pending_events", self.inner.pending_events(limit))
    }

    async fn fan_out(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError> {
        timed!(self, "fan_out", self.inner.fan_out(events, deliveries))
    }

    async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<api::Delivery>, StoreError> {
        timed!(
            self,
            "due_deliveries",
            self.inner.due_deliveries(now, limit)
        )
    }

    async fn put_delivery(&self, delivery: &api::Delivery) -> Result<(), StoreError> {
        timed!(self, "put_delivery", self.inner.put_delivery(delivery))
    }

    async fn active_sessions(
        &self,
        now: Timestamp,
    ) -> Result<Option<Vec<(TenantId, u64)>>, StoreError> {
        timed!(self, "active_sessions", self.inner.active_sessions(now))
    }

    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<api::Delivery>, StoreError> {
        timed!(self, "deliveries", self.inner.deliveries(query))
    }
}
