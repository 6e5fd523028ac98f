//! The storage port: [`SessionStore`], the contract every backend fulfils.
//!
//! A store keeps session records (keyed by handle and by token hash) and tenant policies. Every
//! method that changes state is durable before it returns `Ok`, and atomic: two callers racing
//! cannot leave a user over the session limit or resurrect a revoked session. Stores decide
//! liveness with the core's rules ([`crate::session::liveness`]) under the tenant's current
//! policy, so expiry is exact whatever the backend.
//!
//! Backend failures are narrowed to [`StoreError`]; the server answers `503 store_unavailable`
//! for them and never treats an unverifiable session as valid.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::api;
use crate::events::{Audit, Event, EventKind};
use crate::policy::Policy;
use crate::session::{AuthRecord, DeviceRecord, SessionRecord, StoredSession};
use crate::time::Timestamp;
use crate::token::{SessionHandle, TenantId, TokenHash, UserId};

/// A backend failure. The message is for the server log, never for a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or is not answering.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with an error or with data it should not hold.
    #[error("store error: {0}")]
    Backend(String),
}

/// Result of [`SessionStore::insert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored; these sessions of the same user were revoked (`limit_evicted`) to make room.
    Inserted {
        /// The evicted sessions, least recently used first.
        evicted: Vec<SessionHandle>,
    },
    /// The user is at the limit and the policy says `deny`; nothing was stored.
    LimitReached,
}

/// What [`SessionStore::rotate`] expects of the session before it changes anything.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Its current token has this hash.
    Token(TokenHash),
    /// Its refresh state is exactly this text.
    Refresh(Arc<str>),
}

/// A change of an active session's credentials, applied only if [`Rekey::expect`] holds.
#[derive(Debug, Clone)]
pub struct Rekey {
    /// The condition.
    pub expect: Expect,
    /// A new token hash (the old token stops working at once).
    pub token_hash: Option<TokenHash>,
    /// A new refresh state.
    pub refresh: Option<Arc<str>>,
    /// A fresh authentication.
    pub auth: Option<AuthRecord>,
    /// The event the change records: rotated, reauthenticated, refreshed, or a detector's
    /// finding.
    pub event: EventKind,
    /// The event's reason.
    pub reason: Option<Arc<str>>,
    /// A flag to add to the session (kept once).
    pub flag: Option<Arc<str>>,
    /// A new client to bind the session to.
    pub device: Option<DeviceRecord>,
    /// Details of the event.
    pub details: Map<String, Value>,
}

impl Rekey {
    /// Whether the session is in the expected state (tokens compared in constant time).
    pub fn matches(&self, rec: &SessionRecord) -> bool {
        match &self.expect {
            Expect::Token(h) => rec.token_hash.ct_eq(h),
            Expect::Refresh(text) => rec.refresh.as_deref() == Some(&**text),
        }
    }

    /// The event this change records about the session as changed (`new`).
    pub fn event_for(&self, audit: &Audit, now: Timestamp, new: &SessionRecord) -> Event {
        let mut e = audit.session_event(self.event, now, new, self.reason.as_deref());
        e.details.extend(self.details.clone());
        e
    }

    /// The record after the change; `last_seen_at` becomes `max(last_seen, now)`.
    pub fn apply(
        &self,
        rec: &SessionRecord,
        last_seen: Timestamp,
        now: Timestamp,
    ) -> SessionRecord {
        let mut new = rec.clone();
        if let Some(h) = &self.token_hash {
            new.token_hash = *h;
            new.rotations = new.rotations.saturating_add(1);
        }
        if let Some(r) = &self.refresh {
            new.refresh = Some(r.clone());
        }
        if let Some(a) = &self.auth {
            new.auth = a.clone();
        }
        if let Some(d) = &self.device {
            new.device = d.clone();
        }
        if let Some(f) = &self.flag
            && !new.flags.contains(f)
        {
            new.flags.push(f.clone());
        }
        new.last_seen_at = last_seen.max(now);
        new
    }
}

/// Result of [`SessionStore::rotate`].
#[derive(Debug, Clone)]
pub enum RotateOutcome {
    /// The token was replaced.
    Rotated(StoredSession),
    /// The session no longer has the expected token, is not active, or is gone: nothing changed.
    Stale,
}

/// Result of [`SessionStore::revoke`].
#[derive(Debug, Clone)]
pub struct RevokeOutcome {
    /// The session after the call.
    pub session: StoredSession,
    /// True if this call ended it; false if it had already ended (revoked or expired).
    pub revoked_now: bool,
}

/// Result of [`SessionStore::update_data`].
#[derive(Debug, Clone)]
pub enum DataUpdate {
    /// Patched.
    Updated(StoredSession),
    /// The session is not active; nothing changed.
    NotActive,
    /// No such session.
    NotFound,
    /// The patched data would exceed the limit; nothing changed.
    TooLarge {
        /// The size it would have had.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// Which of a user's sessions to list.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// The user.
    pub user_id: UserId,
    /// Only this tenant's sessions; all tenants when `None`.
    pub tenant: Option<TenantId>,
    /// Include revoked and expired sessions (not yet purged).
    pub include_ended: bool,
    /// Start after this `(last_seen_at, handle)` in the order of the listing.
    pub after: Option<(Timestamp, SessionHandle)>,
    /// At most this many.
    pub limit: usize,
}

/// A session the sweeper marked expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredSession {
    /// The session.
    pub handle: SessionHandle,
    /// Its user.
    pub user_id: UserId,
    /// Its tenant.
    pub tenant: TenantId,
    /// When it expired.
    pub at: Timestamp,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Sessions found timed out and marked expired.
    pub expired: Vec<ExpiredSession>,
    /// Ended sessions deleted after the retention period.
    pub purged: u64,
}

/// The storage contract. See the module documentation for the guarantees every method gives.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session, enforcing the tenant policy's per-user limit atomically: with
    /// `evict_oldest`, revokes the user's least recently used active sessions until the new one
    /// fits; with `deny`, stores nothing and answers [`InsertOutcome::LimitReached`].
    ///
    /// Records `session.created` (with `new_device`, see [`SessionStore::insert`]'s device
    /// rule) and a `session.revoked` (`limit_evicted`) per evicted session, with the change.
    /// A device is new when the user (in the tenant) has no session created from the same
    /// [`crate::device::device_id`] within the event retention.
    async fn insert(
        &self,
        record: SessionRecord,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError>;

    /// The session whose current token has this hash, whatever its status.
    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError>;

    /// The session whose current token has this hash, whatever its status, together with its
    /// tenant's current policy (what [`SessionStore::policy`] answers). The verify path calls
    /// this; a store that can read both at once overrides it to save a round trip.
    async fn find_by_token_with_policy(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<(StoredSession, Arc<Policy>)>, StoreError> {
        let Some(s) = self.find_by_token(hash).await? else {
            return Ok(None);
        };
        let policy = self.policy(&s.record.tenant).await?;
        Ok(Some((s, policy)))
    }

    /// The session with this handle, whatever its status.
    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError>;

    /// Records a use of the session at `at` (last seen never moves backwards). May be batched:
    /// a store that defers the write keeps the live value for reads, and after a crash may only
    /// lose uses, which can make a session expire sooner, never later. `policy` is the tenant's
    /// current policy, which the caller has just read to decide the session is live (a store
    /// uses it to decide how soon the use must be written, and for TTLs), so the hot path
    /// does not read it twice.
    async fn touch(
        &self,
        session: &StoredSession,
        policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError>;

    /// Applies `change` to an active session if its condition holds, atomically, and marks the
    /// session seen at `now`: a new token (the old one stops working at once), a new refresh
    /// state, a fresh authentication. [`RotateOutcome::Stale`] if the condition does not hold or
    /// the session is not active.
    /// Records `change.event` with the change.
    async fn rotate(
        &self,
        handle: &SessionHandle,
        change: &Rekey,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<RotateOutcome, StoreError>;

    /// Revokes the session if it is active; idempotent. `None` if there is no such session.
    /// Records `session.revoked` with the reason when this call ended it.
    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError>;

    /// Revokes every active session of the user (in `tenant`, or in every tenant), except
    /// `except`, atomically. Returns the revoked handles. Records a `session.revoked` per
    /// revoked session.
    #[allow(clippy::too_many_arguments)]
    async fn revoke_user(
        &self,
        user_id: &UserId,
        tenant: Option<&TenantId>,
        except: Option<&SessionHandle>,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Vec<SessionHandle>, StoreError>;

    /// Applies a JSON merge patch to an active session's data, atomically, if the result fits
    /// in `limit` bytes; records `session.data_updated` with the change.
    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<DataUpdate, StoreError>;

    /// A user's sessions, most recently seen first (ties by handle, descending).
    async fn list_user(
        &self,
        query: &ListQuery,
        now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError>;

    /// The tenant's policy: the stored one, or the store's default.
    async fn policy(&self, tenant: &TenantId) -> Result<Arc<Policy>, StoreError>;

    /// Replaces the tenant's policy; records `policy.updated` with the change.
    async fn put_policy(
        &self,
        tenant: &TenantId,
        policy: Policy,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<(), StoreError>;

    /// Marks timed-out sessions expired, and deletes sessions that ended more than
    /// `retention_s` seconds before `now`. Records a `session.expired` per expired session.
    async fn sweep(
        &self,
        now: Timestamp,
        retention_s: u64,
        audit: &Audit,
    ) -> Result<SweepReport, StoreError>;

    /// Makes deferred writes (batched last-seen times) durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// A named document (token mode's `keyring`, the `webhooks`, leases) and its version, if
    /// one was stored. Read from the backend itself (not a cache), so that a change by another
    /// process is seen.
    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError>;

    /// Stores the named document if the stored version is still `expected` (`None`: none
    /// stored yet); the new version is `expected + 1` (or 1). `false` if another writer won.
    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError>;

    /// Records events that change nothing else (`auth.failed`, detectors' findings).
    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError>;

    /// Events matching the query, newest first (by id).
    async fn events(&self, query: &EventQuery) -> Result<Vec<api::Event>, StoreError>;

    /// Deletes events, known devices and finished deliveries older than `before`.
    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError>;

    /// The oldest events written with `deliver` that have not been fanned out to webhooks.
    async fn pending_events(&self, limit: usize) -> Result<Vec<api::Event>, StoreError>;

    /// Queues `deliveries` and takes `events` out of the pending set, atomically.
    async fn fan_out(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError>;

    /// Pending deliveries due at `now`, soonest first.
    async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<api::Delivery>, StoreError>;

    /// Replaces a delivery (after an attempt).
    async fn put_delivery(&self, delivery: &api::Delivery) -> Result<(), StoreError>;

    /// A webhook's deliveries, newest first (by id).
    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<api::Delivery>, StoreError>;

    /// How many sessions each tenant has that no one ended (a timed-out session counts until
    /// the sweeper marks it expired), for the metrics; `None` where the store cannot count
    /// without scanning its keyspace (Redis).
    async fn active_sessions(
        &self,
        _now: Timestamp,
    ) -> Result<Option<Vec<(TenantId, u64)>>, StoreError> {
        Ok(None)
    }
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only this user's.
    pub user_id: Option<UserId>,
    /// Only this session's.
    pub handle: Option<SessionHandle>,
    /// Only this type.
    pub event_type: Option<String>,
    /// Only at or after.
    pub since: Option<Timestamp>,
    /// Only before.
    pub until: Option<Timestamp>,
    /// Only with an id below this (the cursor).
    pub before_id: Option<String>,
    /// At most this many.
    pub limit: usize,
}

impl EventQuery {
    /// Whether an event passes the filters (for backends that filter after reading).
    pub fn matches(&self, e: &api::Event) -> bool {
        let at = Timestamp::from_datetime(e.time);
        self.user_id
            .as_ref()
            .is_none_or(|u| e.user_id.as_deref() == Some(u.as_str()))
            && self
                .handle
                .as_ref()
                .is_none_or(|h| e.handle.as_deref() == Some(h.as_str()))
            && self.event_type.as_ref().is_none_or(|t| &e.event_type == t)
            && self.since.is_none_or(|s| at >= s)
            && self.until.is_none_or(|u| at < u)
            && self
                .before_id
                .as_ref()
                .is_none_or(|b| e.id.as_str() < b.as_str())
    }
}

/// Which deliveries to read.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    /// The webhook.
    pub webhook: String,
    /// Only in this state.
    pub state: Option<api::DeliveryState>,
    /// Only with an id below this (the cursor).
    pub before_id: Option<String>,
    /// At most this many.
    pub limit: usize,
}

impl DeliveryQuery {
    /// Whether a delivery passes the filters.
    pub fn matches(&self, d: &api::Delivery) -> bool {
        d.webhook == self.webhook
            && self.state.is_none_or(|s| d.state == s)
            && self
                .before_id
                .as_ref()
                .is_none_or(|b| d.id.as_str() < b.as_str())
    }
}
