//! A node-local session cache in front of a shared store (PostgreSQL, Redis), kept coherent
//! by the store's change feed.
//!
//! [`CachedStore`] wraps a store and answers [`SessionStore::find_by_token_with_policy`] (the
//! verify path) from memory when it can; every other method goes to the store.
//!
//! - **Feed.** Every change to a session (revocation, rotation, refresh, reauthentication, data
//!   update, flag, eviction, sweep expiry, purge) and every policy change is announced by the
//!   store on a channel of its namespace, in the same transaction (PostgreSQL `NOTIFY` from a
//!   trigger) or script (Redis `PUBLISH`) as the change, so a committed change cannot go
//!   unannounced. Every node listens and drops what it cached of the session (or everything, for
//!   a policy change).
//! - **Trust.** The cache answers nothing until its subscription is confirmed. When the feed
//!   connection is lost (or goes quiet past three heartbeats), the cache stops answering at once
//!   and is emptied; lookups go to the store until the subscription is made again, and the cache
//!   is emptied once more when it is. It fails closed: cached data is never served while
//!   announcements could be missed.
//! - **This node's own changes** drop the cached copy as soon as the store answers, so a node is
//!   never stale after its own write returns.
//! - **Fills.** A lookup that misses reads the store and caches the answer only if no
//!   invalidation of that session's stripe (and no flush) happened since before the read, so an
//!   announcement that arrives while the read is in flight always wins.
//! - **Liveness.** A cached session is served only if it is active by the core's rules at the
//!   clock's now; a copy that looks ended or timed out goes to the store, which alone decides
//!   (another node may have used the session since). Entries also age out after `max_age`.
//! - **Bounded.** At most `capacity` sessions; past it, arbitrary entries are dropped.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sessiond_core::api;
use sessiond_core::events::{Audit, Event};
use sessiond_core::policy::Policy;
use sessiond_core::session::{self, Liveness, SessionRecord, StoredSession};
use sessiond_core::store::{
    DataUpdate, DeliveryQuery, EventQuery, InsertOutcome, ListQuery, Rekey, RevokeOutcome,
    RotateOutcome, SessionStore, StoreError, SweepReport,
};
use sessiond_core::time::{Clock, Timestamp};
use sessiond_core::token::{SessionHandle, TenantId, TokenHash, UserId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The message that empties every node's cache (a policy changed).
pub const FLUSH_ALL: &str = "*";

/// Options of the cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Most sessions kept.
    pub capacity: usize,
    /// Longest time an entry is served before it is read again from the store.
    pub max_age: Duration,
    /// How often the feed is checked with a heartbeat through the store; a feed that delivers
    /// nothing (not even its heartbeats) for three of these counts as lost.
    pub heartbeat: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            capacity: 1_000_000,
            max_age: Duration::from_secs(60),
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// How a lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// From the cache.
    Hit,
    /// From the store: not cached, aged out, or the cached copy did not look active.
    Miss,
    /// From the store, because the cache is not trusted (no confirmed feed).
    Bypass,
}

impl Lookup {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Bypass => "bypass",
        }
    }
}

/// Receives what the cache does, for metrics.
pub trait CacheObserver: Send + Sync + 'static {
    /// A lookup was answered.
    fn lookup(&self, outcome: Lookup);
    /// An invalidation (of one session, or a flush) was applied.
    fn invalidated(&self);
    /// The cache became trusted (`true`) or stopped being trusted.
    fn trusted(&self, trusted: bool);
}

/// Counts of what the cache did (also kept without an observer, for tests and logs).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that went to the store while trusted.
    pub misses: AtomicU64,
    /// Lookups that went to the store while not trusted.
    pub bypasses: AtomicU64,
    /// Invalidations applied.
    pub invalidations: AtomicU64,
    /// Times a trusted feed was lost.
    pub feed_losses: AtomicU64,
}

/// Number of stripes (handle → token maps, each with its last invalidation) and of token shards.
const SHARDS: usize = 64;

struct Entry {
    session: StoredSession,
    policy: Arc<Policy>,
    filled_at: Timestamp,
}

#[derive(Default)]
struct Stripe {
    /// Handle → token hash of the cached sessions whose handle falls in this stripe.
    tokens: HashMap<SessionHandle, TokenHash>,
    /// The invalidation counter's value at the last invalidation of this stripe.
    invalidated_at: u64,
}

/// The cache proper: maps, counters and trust, shared by the store wrapper and the feed.
pub struct Cache {
    clock: Arc<dyn Clock>,
    max_age_ms: i64,
    per_stripe: usize,
    hasher: std::collections::hash_map::RandomState,
    stripes: Vec<Mutex<Stripe>>,
    entries: Vec<Mutex<HashMap<TokenHash, Entry>>>,
    /// Incremented by every invalidation and flush.
    counter: AtomicU64,
    /// The counter's value at the last flush.
    flushed_at: AtomicU64,
    trusted: AtomicBool,
    stats: CacheStats,
    observer: Option<Arc<dyn CacheObserver>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("trusted", &self.is_trusted())
            .finish_non_exhaustive()
    }
}

/// A point before a store read: a fill made with it is refused if anything it could be stale
/// for was invalidated after it.
#[derive(Debug, Clone, Copy)]
pub struct FillTicket(u64);

impl Cache {
    /// An empty, untrusted cache.
    pub fn new(options: &CacheOptions, clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            max_age_ms: i64::try_from(options.max_age.as_millis()).unwrap_or(i64::MAX),
            per_stripe: options.capacity.div_ceil(SHARDS).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
            stripes: (0..SHARDS).map(|_| Mutex::new(Stripe::default())).collect(),
            entries: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            counter: AtomicU64::new(0),
            flushed_at: AtomicU64::new(0),
            trusted: AtomicBool::new(false),
            stats: CacheStats::default(),
            observer: None,
        }
    }

    fn shard_of<T: Hash>(&self, key: &T) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Whether the cache may answer.
    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }

    /// What the cache did so far.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// How many sessions are cached.
    pub fn len(&self) -> usize {
        self.entries.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn count(&self, outcome: Lookup) {
        let c = match outcome {
            Lookup::Hit => &self.stats.hits,
            Lookup::Miss => &self.stats.misses,
            Lookup::Bypass => &self.stats.bypasses,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = &self.observer {
            o.lookup(outcome);
        }
    }

    /// The cached session of a token hash with its policy, if trusted, fresh, and active at
    /// now. Answers how it was decided.
    pub fn get(&self, hash: &TokenHash) -> (Option<(StoredSession, Arc<Policy>)>, Lookup) {
        if !self.is_trusted() {
            self.count(Lookup::Bypass);
            return (None, Lookup::Bypass);
        }
        let now = self.clock.now();
        let found = {
            let mut shard = self.entries[self.shard_of(hash)].lock();
            match shard.get(hash) {
                Some(e)
                    if now.as_millis().saturating_sub(e.filled_at.as_millis())
                        >= self.max_age_ms
                        || now < e.filled_at =>
                {
                    shard.remove(hash);
                    None
                }
                Some(e) => Some((e.session.clone(), e.policy.clone())),
                None => None,
            }
        };
        let found = found.filter(|(s, p)| {
            s.record.token_hash == *hash
                && session::liveness(&s.record, s.last_seen_at, p, now) == Liveness::Active
        });
        let outcome = if found.is_some() {
            Lookup::Hit
        } else {
            Lookup::Miss
        };
        self.count(outcome);
        (found, outcome)
    }

    /// Taken before a store read whose answer may be cached with [`Cache::fill`].
    pub fn ticket(&self) -> FillTicket {
        FillTicket(self.counter.load(Ordering::Acquire))
    }

    /// Caches what a store read begun at `ticket` answered, unless the cache is not trusted or
    /// the session's stripe (or everything) was invalidated since the ticket. Answers whether
    /// it was cached.
    pub fn fill(&self, ticket: FillTicket, session: &StoredSession, policy: &Arc<Policy>) -> bool {
        // Only active sessions are worth a place: an ended one is never served.
        if session::liveness(
            &session.record,
            session.last_seen_at,
            policy,
            self.clock.now(),
        ) != Liveness::Active
        {
            return false;
        }
        let handle = &session.record.handle;
        let hash = session.record.token_hash;
        let mut stripe = self.stripes[self.shard_of(handle)].lock();
        if !self.is_trusted()
            || stripe.invalidated_at > ticket.0
            || self.flushed_at.load(Ordering::Acquire) > ticket.0
        {
            return false;
        }
        if let Some(old) = stripe.tokens.get(handle).copied()
            && old != hash
        {
            self.entries[self.shard_of(&old)].lock().remove(&old);
        }
        if !stripe.tokens.contains_key(handle) && stripe.tokens.len() >= self.per_stripe {
            // Full: make room by dropping an arbitrary session of this stripe.
            if let Some((h, t)) = stripe.tokens.iter().next().map(|(h, t)| (h.clone(), *t)) {
                stripe.tokens.remove(&h);
                self.entries[self.shard_of(&t)].lock().remove(&t);
            }
        }
        stripe.tokens.insert(handle.clone(), hash);
        self.entries[self.shard_of(&hash)].lock().insert(
            hash,
            Entry {
                session: session.clone(),
                policy: policy.clone(),
                filled_at: self.clock.now(),
            },
        );
        true
    }

    /// Drops what is cached of a session; fills begun before are refused.
    pub fn invalidate(&self, handle: &SessionHandle) {
        {
            let mut stripe = self.stripes[self.shard_of(handle)].lock();
            stripe.invalidated_at = self.counter.fetch_add(1, Ordering::AcqRel) + 1;
            if let Some(t) = stripe.tokens.remove(handle) {
                self.entries[self.shard_of(&t)].lock().remove(&t);
            }
        }
        self.invalidated();
    }

    fn invalidated(&self) {
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = &self.observer {
            o.invalidated();
        }
    }

    /// Drops everything; fills begun before are refused.
    pub fn flush(&self) {
        self.flushed_at.store(
            self.counter.fetch_add(1, Ordering::AcqRel) + 1,
            Ordering::Release,
        );
        for s in &self.stripes {
            let mut stripe = s.lock();
            for t in stripe.tokens.values() {
                self.entries[self.shard_of(t)].lock().remove(t);
            }
            stripe.tokens.clear();
        }
        for e in &self.entries {
            e.lock().clear();
        }
        self.invalidated();
    }

    /// Applies a message of the feed: a session handle, or [`FLUSH_ALL`]. Anything else (an
    /// empty heartbeat, text that is no handle) changes nothing.
    pub fn apply(&self, message: &str) {
        if message == FLUSH_ALL {
            self.flush();
        } else if let Ok(h) = SessionHandle::parse(message) {
            self.invalidate(&h);
        }
    }

    /// The feed is subscribed: start from empty and serve.
    pub fn subscribed(&self) {
        self.flush();
        self.trusted.store(true, Ordering::Release);
        if let Some(o) = &self.observer {
            o.trusted(true);
        }
    }

    /// The feed is lost: stop serving at once and empty.
    pub fn lost(&self) {
        let was = self.trusted.swap(false, Ordering::AcqRel);
        self.flush();
        if was {
            self.stats.feed_losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("session cache: change feed lost; verifying against the store");
        }
        if let Some(o) = &self.observer {
            o.trusted(false);
        }
    }

    /// Records a use of a cached session: its live last seen moves to `at`, and, since the store
    /// has accepted the use (written or batched, landing within its flush interval), so does
    /// the stored value the store compares the next use with, so that a long-cached copy does
    /// not make every use a synchronous write.
    fn touched(&self, handle: &SessionHandle, hash: &TokenHash, at: Timestamp) {
        let mut shard = self.entries[self.shard_of(hash)].lock();
        if let Some(e) = shard.get_mut(hash)
            && &e.session.record.handle == handle
        {
            if at > e.session.last_seen_at {
                e.session.last_seen_at = at;
            }
            // The record is shared: copy it only when the stored value is a second behind.
            if at.as_millis() - e.session.record.last_seen_at.as_millis() >= 1000 {
                let mut rec: SessionRecord = (*e.session.record).clone();
                rec.last_seen_at = at;
                e.session.record = Arc::new(rec);
            }
        }
    }
}

/// The cache's side of a change feed: a store's listener reports through it. Holds the cache
/// weakly, so the listener ends when the cache is dropped.
#[derive(Clone, Debug)]
pub struct FeedSink {
    cache: Weak<Cache>,
}

impl FeedSink {
    /// The cache, unless it was dropped.
    pub fn cache(&self) -> Option<Arc<Cache>> {
        self.cache.upgrade()
    }
}

/// A connection to a store's change feed.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Subscribes, answering once the subscription is confirmed, with a task that forwards
    /// every message to `tx` and ends (dropping `tx`) when the connection is lost.
    async fn subscribe(
        &self,
        tx: mpsc::UnboundedSender<String>,
    ) -> Result<JoinHandle<()>, StoreError>;

    /// Sends an empty message through the store, which a live subscription receives.
    async fn heartbeat(&self) -> Result<(), StoreError>;
}

/// Keeps a cache subscribed to a feed for as long as the cache exists: trusted while the
/// subscription is confirmed and alive, distrusted and emptied as soon as it is not.
pub async fn run_feed(sink: FeedSink, sub: Arc<dyn Subscriber>, heartbeat: Duration) {
    let heartbeat = heartbeat.max(Duration::from_millis(10));
    let mut failures: u32 = 0;
    loop {
        if sink.cache().is_none() {
            return;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = match tokio::time::timeout(heartbeat * 3, sub.subscribe(tx)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "session cache: cannot subscribe to the change feed");
                failures += 1;
                retry_pause(failures).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("session cache: subscribing to the change feed timed out");
                failures += 1;
                retry_pause(failures).await;
                continue;
            }
        };
        failures = 0;
        match sink.cache() {
            Some(c) => {
                c.subscribed();
                tracing::info!("session cache: change feed subscribed; serving from the cache");
            }
            None => {
                reader.abort();
                return;
            }
        }
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        last = tokio::time::Instant::now();
                        let Some(c) = sink.cache() else {
                            reader.abort();
                            return;
                        };
                        c.apply(&m);
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if sink.cache().is_none() {
                        reader.abort();
                        return;
                    }
                    if last.elapsed() > heartbeat * 3 {
                        tracing::warn!("session cache: change feed silent past its heartbeats");
                        break;
                    }
                    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(heartbeat, sub.heartbeat())
                        .await
                        .map_err(|_| StoreError::Unavailable("heartbeat timed out".into()))
                    {
                        tracing::debug!(error = %e, "session cache: heartbeat not sent");
                    }
                }
            }
        }
        reader.abort();
        if let Some(c) = sink.cache() {
            c.lost();
        }
    }
}

async fn retry_pause(failures: u32) {
    let ms = (100u64 << failures.min(5)).min(3_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A store wrapped with a coherent node-local cache of the verify path. See the module
/// documentation.
pub struct CachedStore {
    inner: Arc<dyn SessionStore>,
    cache: Arc<Cache>,
}

impl std::fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl CachedStore {
    /// Wraps `inner`. The cache serves nothing until a feed reports through
    /// [`CachedStore::sink`] that it is subscribed.
    pub fn new(
        inner: Arc<dyn SessionStore>,
        options: &CacheOptions,
        clock: Arc<dyn Clock>,
        observer: Option<Arc<dyn CacheObserver>>,
    ) -> Self {
        let mut cache = Cache::new(options, clock);
        cache.observer = observer;
        if let Some(o) = &cache.observer {
            o.trusted(false);
        }
        Self {
            inner,
            cache: Arc::new(cache),
        }
    }

    /// Wraps `inner` and keeps the cache subscribed to `feed` (on a task of its own, which
    /// ends when the store is dropped).
    pub fn with_feed(
        inner: Arc<dyn SessionStore>,
        feed: Arc<dyn Subscriber>,
        options: &CacheOptions,
        clock: Arc<dyn Clock>,
        observer: Option<Arc<dyn CacheObserver>>,
    ) -> Self {
        let store = Self::new(inner, options, clock, observer);
        tokio::spawn(run_feed(store.sink(), feed, options.heartbeat));
        store
    }

    /// Where a feed reports.
    pub fn sink(&self) -> FeedSink {
        FeedSink {
            cache: Arc::downgrade(&self.cache),
        }
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }
}

#[async_trait]
impl SessionStore for CachedStore {
    async fn insert(
        &self,
        record: SessionRecord,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError> {
        let r = self.inner.insert(record, now, audit).await;
        match &r {
            Ok(InsertOutcome::Inserted { evicted }) => {
                for h in evicted {
                    self.cache.invalidate(h);
                }
            }
            Ok(InsertOutcome::LimitReached) => {}
            // Whether sessions were evicted is unknown: drop everything.
            Err(_) => self.cache.flush(),
        }
        r
    }

    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError> {
        self.inner.find_by_token(hash).await
    }

    async fn find_by_token_with_policy(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<(StoredSession, Arc<Policy>)>, StoreError> {
        let (found, outcome) = self.cache.get(hash);
        if found.is_some() {
            return Ok(found);
        }
        let ticket = self.cache.ticket();
        let read = self.inner.find_by_token_with_policy(hash).await?;
        if outcome != Lookup::Bypass
            && let Some((s, p)) = &read
            && s.record.token_hash == *hash
        {
            self.cache.fill(ticket, s, p);
        }
        Ok(read)
    }

    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError> {
        self.inner.find_by_handle(handle).await
    }

    async fn touch(
        &self,
        session: &StoredSession,
        policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.touch(session, policy, at).await?;
        self.cache
            .touched(&session.record.handle, &session.record.token_hash, at);
        Ok(())
    }

    async fn rotate(
        &self,
        handle: &SessionHandle,
        change: &Rekey,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<RotateOutcome, StoreError> {
        let r = self.inner.rotate(handle, change, now, audit).await;
        self.cache.invalidate(handle);
        r
    }

    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError> {
        let r = self.inner.revoke(handle, reason, now, audit).await;
        self.cache.invalidate(handle);
        r
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
        let r = self
            .inner
            .revoke_user(user_id, tenant, except, reason, now, audit)
            .await;
        match &r {
            Ok(handles) => {
                for h in handles {
                    self.cache.invalidate(h);
                }
            }
            // Which sessions changed is unknown: drop everything.
            Err(_) => self.cache.flush(),
        }
        r
    }

    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<DataUpdate, StoreError> {
        let r = self
            .inner
            .update_data(handle, patch, limit, now, audit)
            .await;
        self.cache.invalidate(handle);
        r
    }

    async fn list_user(
        &self,
        query: &ListQuery,
        now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError> {
        self.inner.list_user(query, now).await
    }

    async fn policy(&self, tenant: &TenantId) -> Result<Arc<Policy>, StoreError> {
        self.inner.policy(tenant).await
    }

    async fn put_policy(
        &self,
        tenant: &TenantId,
        policy: Policy,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<(), StoreError> {
        let r = self.inner.put_policy(tenant, policy, now, audit).await;
        self.cache.flush();
        r
    }

    async fn sweep(
        &self,
        now: Timestamp,
        retention_s: u64,
        audit: &Audit,
    ) -> Result<SweepReport, StoreError> {
        let r = self.inner.sweep(now, retention_s, audit).await;
        match &r {
            Ok(report) => {
                for e in &report.expired {
                    self.cache.invalidate(&e.handle);
                }
            }
            Err(_) => self.cache.flush(),
        }
        r
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError> {
        self.inner.document(name).await
    }

    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError> {
        self.inner.put_document(name, expected, doc).await
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        self.inner.append_events(events).await
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<api::Event>, StoreError> {
        self.inner.events(query).await
    }

    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.inner.purge_events(before).await
    }

    async fn pending_events(&self, limit: usize) -> Result<Vec<api::Event>, StoreError> {
        self.inner.pending_events(limit).await
    }

    async fn fan_out(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError> {
        self.inner.fan_out(events, deliveries).await
    }

    async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<api::Delivery>, StoreError> {
        self.inner.due_deliveries(now, limit).await
    }

    async fn put_delivery(&self, delivery: &api::Delivery) -> Result<(), StoreError> {
        self.inner.put_delivery(delivery).await
    }

    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<api::Delivery>, StoreError> {
        self.inner.deliveries(query).await
    }

    async fn active_sessions(
        &self,
        now: Timestamp,
    ) -> Result<Option<Vec<(TenantId, u64)>>, StoreError> {
        self.inner.active_sessions(now).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::conformance::{audit, record, t};
    use crate::embedded::{EmbeddedOptions, EmbeddedStore};
    use sessiond_core::time::ManualClock;

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(t(0)))
    }

    fn session(at: Timestamp) -> (StoredSession, Arc<Policy>) {
        let (rec, _) = record("ann", "default", at);
        (
            StoredSession::new(Arc::new(rec)),
            Arc::new(Policy::default()),
        )
    }

    fn trusted_cache(clock: Arc<ManualClock>, options: &CacheOptions) -> Cache {
        let c = Cache::new(options, clock);
        c.subscribed();
        c
    }

    #[test]
    fn an_invalidation_during_the_read_wins_over_the_fill() {
        let c = trusted_cache(clock(), &CacheOptions::default());
        let (s, p) = session(t(0));
        let h = s.record.token_hash;
        // Miss, ticket, store read... the invalidation lands while the read is in flight.
        let ticket = c.ticket();
        c.invalidate(&s.record.handle);
        assert!(!c.fill(ticket, &s, &p), "the stale read must not be cached");
        assert_eq!(c.get(&h).1, Lookup::Miss);
        // A read begun after the invalidation is cached.
        let ticket = c.ticket();
        assert!(c.fill(ticket, &s, &p));
        assert_eq!(c.get(&h).1, Lookup::Hit);
    }

    #[test]
    fn only_the_invalidated_stripe_refuses_fills() {
        let c = trusted_cache(clock(), &CacheOptions::default());
        let sessions: Vec<_> = (0..200).map(|_| session(t(0))).collect();
        let ticket = c.ticket();
        let (victim, _) = &sessions[0];
        c.invalidate(&victim.record.handle);
        let victim_stripe = c.shard_of(&victim.record.handle);
        for (s, p) in &sessions {
            let same = c.shard_of(&s.record.handle) == victim_stripe;
            assert_eq!(c.fill(ticket, s, p), !same);
        }
    }

    #[test]
    fn a_flush_or_a_lost_feed_during_the_read_wins_over_the_fill() {
        let c = trusted_cache(clock(), &CacheOptions::default());
        let (s, p) = session(t(0));
        let ticket = c.ticket();
        c.apply(FLUSH_ALL);
        assert!(!c.fill(ticket, &s, &p));

        let ticket = c.ticket();
        c.lost();
        c.subscribed();
        assert!(!c.fill(ticket, &s, &p), "emptied on resubscription");
        assert!(c.fill(c.ticket(), &s, &p));
        assert_eq!(c.len(), 1);
        c.lost();
        assert!(c.is_empty());
        assert!(
            !c.fill(c.ticket(), &s, &p),
            "nothing is cached while untrusted"
        );
        assert_eq!(c.get(&s.record.token_hash).1, Lookup::Bypass);
    }

    #[test]
    fn invalidation_by_handle_drops_the_session_and_its_old_tokens() {
        let c = trusted_cache(clock(), &CacheOptions::default());
        let (s, p) = session(t(0));
        assert!(c.fill(c.ticket(), &s, &p));
        // Rotated: the same handle with a new token replaces the old entry.
        let (other, _) = session(t(0));
        let mut rotated = (*s.record).clone();
        rotated.token_hash = other.record.token_hash;
        let rotated = StoredSession::new(Arc::new(rotated));
        assert!(c.fill(c.ticket(), &rotated, &p));
        assert_eq!(c.get(&s.record.token_hash).1, Lookup::Miss);
        assert_eq!(c.get(&rotated.record.token_hash).1, Lookup::Hit);
        c.apply(s.record.handle.as_str());
        assert_eq!(c.get(&rotated.record.token_hash).1, Lookup::Miss);
        assert!(c.is_empty());
        // Heartbeats and garbage change nothing.
        assert!(c.fill(c.ticket(), &rotated, &p));
        c.apply("");
        c.apply("not a handle");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn entries_age_out_and_ended_looking_copies_go_to_the_store() {
        let clock = clock();
        let c = trusted_cache(
            clock.clone(),
            &CacheOptions {
                max_age: Duration::from_secs(60),
                ..CacheOptions::default()
            },
        );
        let (s, p) = session(t(0));
        let h = s.record.token_hash;
        assert!(c.fill(c.ticket(), &s, &p));
        clock.advance_secs(59);
        assert_eq!(c.get(&h).1, Lookup::Hit);
        clock.advance_secs(1);
        assert_eq!(c.get(&h).1, Lookup::Miss, "aged out");
        assert!(c.is_empty());

        // Idle past the policy's timeout by the cached copy: only the store may say so.
        let idle = p.timeouts(false).idle_s;
        let cached = Cache::new(
            &CacheOptions {
                max_age: Duration::from_secs(idle * 10),
                ..CacheOptions::default()
            },
            clock.clone(),
        );
        cached.subscribed();
        clock.set(t(0));
        assert!(cached.fill(cached.ticket(), &s, &p));
        clock.set(t(i64::try_from(idle).unwrap()));
        assert_eq!(cached.get(&h).1, Lookup::Miss);
        // A use seen by this node slides the cached copy.
        clock.set(t(0));
        assert!(cached.fill(cached.ticket(), &s, &p));
        cached.touched(&s.record.handle, &h, t(10));
        clock.set(t(i64::try_from(idle).unwrap()));
        let (got, outcome) = cached.get(&h);
        assert_eq!(outcome, Lookup::Hit);
        let (got, _) = got.unwrap();
        assert_eq!(got.last_seen_at, t(10));
        assert_eq!(got.record.last_seen_at, t(10), "the stored value moved too");

        // Past its stored deadlines, a cached copy is not served, whatever the cached policy.
        let mut pinned = (*s.record).clone();
        pinned.idle_timeout_s = Some(5);
        pinned.expires_at = Some(t(100));
        let pinned = StoredSession::new(Arc::new(pinned));
        clock.set(t(0));
        assert!(cached.fill(cached.ticket(), &pinned, &p));
        clock.set(t(4));
        assert_eq!(cached.get(&h).1, Lookup::Hit);
        clock.set(t(5));
        assert_eq!(
            cached.get(&h).1,
            Lookup::Miss,
            "past its stored idle deadline"
        );
    }

    #[test]
    fn capacity_is_bounded() {
        let c = trusted_cache(
            clock(),
            &CacheOptions {
                capacity: 128,
                ..CacheOptions::default()
            },
        );
        for _ in 0..2000 {
            let (s, p) = session(t(0));
            assert!(c.fill(c.ticket(), &s, &p));
        }
        assert!(c.len() <= 128, "{} entries", c.len());
        let held: usize = c.stripes.iter().map(|s| s.lock().tokens.len()).sum();
        assert!(held <= 128);
    }

    struct Counting(Mutex<Vec<String>>);

    impl CacheObserver for Counting {
        fn lookup(&self, outcome: Lookup) {
            self.0.lock().push(outcome.as_str().to_owned());
        }
        fn invalidated(&self) {
            self.0.lock().push("invalidated".to_owned());
        }
        fn trusted(&self, trusted: bool) {
            self.0.lock().push(format!("trusted={trusted}"));
        }
    }

    #[tokio::test]
    async fn lookups_are_counted_hit_miss_or_bypass() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn SessionStore> =
            Arc::new(EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap());
        let observer = Arc::new(Counting(Mutex::new(Vec::new())));
        let store = CachedStore::new(
            inner,
            &CacheOptions::default(),
            clock(),
            Some(observer.clone()),
        );
        let (rec, hash) = record("ann", "default", t(0));
        store.insert(rec.clone(), t(0), &audit()).await.unwrap();

        // Untrusted: the store answers, nothing is cached.
        assert!(
            store
                .find_by_token_with_policy(&hash)
                .await
                .unwrap()
                .is_some()
        );
        assert!(store.cache().is_empty());
        store.cache().subscribed();
        // Miss and fill, then hits.
        assert!(
            store
                .find_by_token_with_policy(&hash)
                .await
                .unwrap()
                .is_some()
        );
        let (s, _) = store
            .find_by_token_with_policy(&hash)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.record.handle, rec.handle);
        assert!(
            store
                .find_by_token_with_policy(&hash)
                .await
                .unwrap()
                .is_some()
        );
        let st = store.cache().stats();
        assert_eq!(st.bypasses.load(Ordering::Relaxed), 1);
        assert_eq!(st.misses.load(Ordering::Relaxed), 1);
        assert_eq!(st.hits.load(Ordering::Relaxed), 2);

        // This node's own revocation is seen at once.
        store
            .revoke(&rec.handle, "logout", t(1), &audit())
            .await
            .unwrap();
        let (s, _) = store
            .find_by_token_with_policy(&hash)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            s.record.state,
            sessiond_core::session::StoredState::Revoked { .. }
        ));
        assert_eq!(st.misses.load(Ordering::Relaxed), 2);
        assert!(store.cache().is_empty(), "an ended session is not cached");

        let seen = observer.0.lock().clone();
        let count = |x: &str| seen.iter().filter(|s| *s == x).count();
        assert_eq!(count("hit"), 2);
        assert_eq!(count("miss"), 2);
        assert_eq!(count("bypass"), 1);
        assert_eq!(count("trusted=true"), 1);
        assert!(count("invalidated") >= 2);
    }

    #[test]
    fn hits_serve_every_cached_entry() {
        let c = trusted_cache(clock(), &CacheOptions::default());
        let entries: Vec<_> = (0..1000).map(|_| session(t(0))).collect();
        for (s, p) in &entries {
            assert!(c.fill(c.ticket(), s, p));
        }
        let rounds = 200_000usize;
        let started = std::time::Instant::now();
        for i in 0..rounds {
            let (s, _) = &entries[i % entries.len()];
            assert!(c.get(&s.record.token_hash).0.is_some());
        }
        let per = started.elapsed() / u32::try_from(rounds).unwrap();
        // The cost, for a look with --nocapture (a debug build on a busy machine is no benchmark).
        eprintln!("cache hit: {per:?}");
    }
}
