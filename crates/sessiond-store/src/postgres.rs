//! The PostgreSQL store, for several stateless sessiond nodes on one database.
//!
//! - Verify is one indexed lookup (`token_hash` is unique). Nodes may keep a session cache
//!   ([`crate::cache`]) in front of it, kept coherent by the change feed: triggers `NOTIFY` every
//!   change of a session (other than a use) and of a policy in the transaction of the change
//!   ([`PostgresStore::change_feed`]).
//! - Every change runs in a transaction that locks what it decides on: the session row
//!   (`FOR UPDATE`) for rotate/revoke/patch, and a per-user advisory lock for create (limits)
//!   and force logout, so two nodes racing cannot leave a user over the limit.
//! - Last-seen writes are batched per node (one `UPDATE ... FROM unnest(...)` per interval), but
//!   a use is written at once when the stored value is old enough that another node could
//!   otherwise see the session idle-expire before the batch lands: idle expiry stays exact
//!   across nodes (up to clock skew between them).
//! - Connection failures are [`StoreError::Unavailable`]: the server fails closed with `503`.
//!
//! Schema changes are versioned migrations (`migrations/postgres`), applied by
//! `sessiond migrate` or at start.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sessiond_core::api;
use sessiond_core::device::device_id;
use sessiond_core::events::{Audit, Event, EventKind};
use sessiond_core::policy::Policy;
use sessiond_core::session::{self, Liveness, SessionRecord, StoredSession, StoredState};
use sessiond_core::store::{
    DataUpdate, DeliveryQuery, EventQuery, ExpiredSession, InsertOutcome, ListQuery, Rekey,
    RevokeOutcome, RotateOutcome, SessionStore, StoreError, SweepReport,
};
use sessiond_core::time::Timestamp;
use sessiond_core::token::{SessionHandle, TenantId, TokenHash, UserId};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row as _, Transaction};

use crate::cache::Subscriber;
use crate::row::{Row, no_intern};

/// Options of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/database?sslmode=...`
    pub url: String,
    /// Keep the tables in this schema (created if missing); the connection's default otherwise.
    pub schema: Option<String>,
    /// The policy of tenants that have none stored.
    pub default_policy: Policy,
    /// How often batched last-seen times are written.
    pub flush_interval: Duration,
    /// Largest connection pool.
    pub max_connections: u32,
    /// How long a request waits for a connection before the store counts as unavailable.
    pub acquire_timeout: Duration,
}

impl PostgresOptions {
    /// Options for `url` with the defaults.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            schema: None,
            default_policy: Policy::default(),
            flush_interval: Duration::from_secs(1),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(2),
        }
    }
}

/// Most rows one sweep changes.
const SWEEP_CHUNK: i64 = 10_000;

fn err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        other => StoreError::Backend(other.to_string()),
    }
}

/// The migrations, embedded in the binary.
fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![
            Migration::new(
                1,
                "sessions".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(include_str!(
                    "../migrations/postgres/0001_sessions.sql"
                )),
                false,
            ),
            Migration::new(
                2,
                "token mode".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(include_str!(
                    "../migrations/postgres/0002_token_mode.sql"
                )),
                false,
            ),
            Migration::new(
                3,
                "events".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(include_str!(
                    "../migrations/postgres/0003_events.sql"
                )),
                false,
            ),
            Migration::new(
                4,
                "flags".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(include_str!(
                    "../migrations/postgres/0004_flags.sql"
                )),
                false,
            ),
            Migration::new(
                5,
                "change feed".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(include_str!(
                    "../migrations/postgres/0005_change_feed.sql"
                )),
                false,
            ),
            Migration::new(
                6,
                "session deadlines".into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(include_str!(
                    "../migrations/postgres/0006_session_deadlines.sql"
                )),
                false,
            ),
        ]),
        ..Migrator::DEFAULT
    }
}

struct Inner {
    pool: PgPool,
    /// How to connect (for the change feed's own connection).
    connect: PgConnectOptions,
    default_policy: Arc<Policy>,
    /// Uses not yet written: handle → last seen (ms).
    pending: Mutex<HashMap<SessionHandle, i64>>,
    /// The last policy document parsed per tenant, so an unchanged document is not parsed
    /// and validated again on every read. Only a parse cache: the document is always read.
    parsed: Mutex<HashMap<String, (String, Arc<Policy>)>>,
    flush_ms: i64,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

const SELECT: &str = "SELECT handle, token_hash, user_id, tenant, created_at, last_seen_at, \
    remember_me, auth_method, auth_aal, authenticated_at, ip, user_agent, browser, os, data, \
    state, revoked_reason, ended_at, refresh, flags, expires_at, idle_timeout_s, rotations \
    FROM sessions";

/// The session of a token hash and its tenant's stored policy document (column 23), in one
/// indexed lookup: the verify path's only query.
const SELECT_WITH_POLICY: &str = "SELECT s.handle, s.token_hash, s.user_id, s.tenant, \
    s.created_at, s.last_seen_at, s.remember_me, s.auth_method, s.auth_aal, s.authenticated_at, \
    s.ip, s.user_agent, s.browser, s.os, s.data, s.state, s.revoked_reason, s.ended_at, \
    s.refresh, s.flags, s.expires_at, s.idle_timeout_s, s.rotations, p.document \
    FROM sessions s LEFT JOIN policies p ON p.tenant = s.tenant \
    WHERE s.token_hash = $1";

fn to_row(r: &PgRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        handle: r.try_get(0)?,
        token_hash: r.try_get(1)?,
        user_id: r.try_get(2)?,
        tenant: r.try_get(3)?,
        created_at: r.try_get(4)?,
        last_seen_at: r.try_get(5)?,
        remember_me: r.try_get(6)?,
        auth_method: r.try_get(7)?,
        auth_aal: r.try_get(8)?,
        authenticated_at: r.try_get(9)?,
        ip: r.try_get(10)?,
        user_agent: r.try_get(11)?,
        browser: r.try_get(12)?,
        os: r.try_get(13)?,
        data: r.try_get(14)?,
        state: r.try_get(15)?,
        revoked_reason: r.try_get(16)?,
        ended_at: r.try_get(17)?,
        refresh: r.try_get(18)?,
        flags: r.try_get(19)?,
        expires_at: r.try_get(20)?,
        idle_timeout_s: r.try_get(21)?,
        rotations: r.try_get(22)?,
    })
}

fn to_record(r: &PgRow) -> Result<SessionRecord, StoreError> {
    to_row(r).map_err(err)?.into_record(no_intern)
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl PostgresStore {
    /// Connects (lazily: the pool opens connections when first needed, so a node can start
    /// while the database is down and report itself not ready) and starts the batch writer.
    pub fn connect(opts: PostgresOptions) -> Result<Self, StoreError> {
        let mut connect = PgConnectOptions::from_str(&opts.url)
            .map_err(|e| StoreError::Backend(format!("invalid PostgreSQL URL: {e}")))?;
        if let Some(schema) = &opts.schema {
            if !valid_schema(schema) {
                return Err(StoreError::Backend(
                    "schema must be 1 to 63 characters of a-z, 0-9 and '_'".into(),
                ));
            }
            connect = connect.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(connect.clone());
        let inner = Arc::new(Inner {
            pool,
            connect,
            default_policy: Arc::new(opts.default_policy),
            pending: Mutex::new(HashMap::new()),
            parsed: Mutex::new(HashMap::new()),
            flush_ms: i64::try_from(opts.flush_interval.as_millis()).unwrap_or(1000),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&inner), opts.flush_interval));
        Ok(Self { inner })
    }

    /// Applies pending migrations (creating the schema first when one is configured). Safe to
    /// run from several nodes at once: the migrator takes a database lock.
    pub async fn migrate(&self, schema: Option<&str>) -> Result<(), StoreError> {
        if let Some(s) = schema {
            if !valid_schema(s) {
                return Err(StoreError::Backend("invalid schema name".into()));
            }
            let sql = format!("CREATE SCHEMA IF NOT EXISTS {s}");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&self.inner.pool)
                .await
                .map_err(err)?;
        }
        migrator()
            .run(&self.inner.pool)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))
    }

    async fn policy_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        tenant: &str,
    ) -> Result<Arc<Policy>, StoreError> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT document FROM policies WHERE tenant = $1")
                .bind(tenant)
                .fetch_optional(&mut **tx)
                .await
                .map_err(err)?;
        self.parse_policy(tenant, doc)
    }

    fn parse_policy(&self, tenant: &str, doc: Option<String>) -> Result<Arc<Policy>, StoreError> {
        let Some(d) = doc else {
            return Ok(self.inner.default_policy.clone());
        };
        if let Some((seen, p)) = self.inner.parsed.lock().get(tenant)
            && *seen == d
        {
            return Ok(p.clone());
        }
        let doc = serde_json::from_str(&d)
            .map_err(|e| StoreError::Backend(format!("stored policy: {e}")))?;
        let policy = Policy::from_stored(doc)
            .map(Arc::new)
            .map_err(|e| StoreError::Backend(format!("stored policy: {e}")))?;
        self.inner
            .parsed
            .lock()
            .insert(tenant.to_owned(), (d, policy.clone()));
        Ok(policy)
    }

    /// The live last seen: the stored value, or a newer use batched on this node.
    fn live(&self, rec: SessionRecord) -> StoredSession {
        let pending = self.inner.pending.lock().get(&rec.handle).copied();
        let mut s = StoredSession::new(Arc::new(rec));
        if let Some(ms) = pending {
            s.last_seen_at = s.last_seen_at.max(Timestamp::from_millis(ms));
        }
        s
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.inner.pool.begin().await.map_err(err)
    }

    async fn lock_user(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7340))")
            .bind(user.as_str())
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn for_update(
        tx: &mut Transaction<'static, Postgres>,
        handle: &SessionHandle,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE handle = $1 FOR UPDATE"
        )))
        .bind(handle.as_str())
        .fetch_optional(&mut **tx)
        .await
        .map_err(err)?;
        row.as_ref().map(to_record).transpose()
    }

    async fn write_state(
        tx: &mut Transaction<'static, Postgres>,
        rec: &SessionRecord,
    ) -> Result<(), StoreError> {
        let r = Row::from_record(rec);
        sqlx::query(
            "UPDATE sessions SET state = $2, revoked_reason = $3, ended_at = $4,
                    last_seen_at = GREATEST(last_seen_at, $5) WHERE handle = $1",
        )
        .bind(&r.handle)
        .bind(&r.state)
        .bind(&r.revoked_reason)
        .bind(r.ended_at)
        .bind(r.last_seen_at)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
        Ok(())
    }

    /// Marks expired the timed-out active sessions of one tenant (`tenant`), or of every tenant
    /// but `others` (`tenant` = `None`), under `policy`. Answers how many were looked at.
    #[allow(clippy::too_many_arguments)]
    async fn expire(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        tenant: Option<&str>,
        others: &[String],
        policy: &Policy,
        now: Timestamp,
        limit: i64,
        report: &mut SweepReport,
    ) -> Result<i64, StoreError> {
        if limit <= 0 {
            return Ok(0);
        }
        let (plain, rm) = (policy.timeouts(false), policy.timeouts(true));
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE state = 'active'
               AND (($1::text IS NOT NULL AND tenant = $1) OR ($1::text IS NULL AND NOT (tenant = ANY($2))))
               AND ((NOT remember_me AND (last_seen_at <= $3 OR created_at <= $4))
                 OR (remember_me AND (last_seen_at <= $5 OR created_at <= $6))
                 OR expires_at <= $8 OR last_seen_at + idle_timeout_s * 1000 <= $8)
             ORDER BY last_seen_at LIMIT $7 FOR UPDATE SKIP LOCKED"
        )))
        .bind(tenant)
        .bind(others)
        .bind(now.minus_secs(plain.idle_s).as_millis())
        .bind(now.minus_secs(plain.absolute_s).as_millis())
        .bind(now.minus_secs(rm.idle_s).as_millis())
        .bind(now.minus_secs(rm.absolute_s).as_millis())
        .bind(limit)
        .bind(now.as_millis())
        .fetch_all(&mut **tx)
        .await
        .map_err(err)?;
        for r in &rows {
            let live = self.live(to_record(r)?);
            // A use batched on this node may have kept it alive.
            if let Liveness::Expired(at) =
                session::liveness(&live.record, live.last_seen_at, policy, now)
            {
                let mut rec = (*live.record).clone();
                rec.last_seen_at = live.last_seen_at;
                rec.state = StoredState::Expired { at };
                Self::write_state(tx, &rec).await?;
                report.expired.push(ExpiredSession {
                    handle: rec.handle,
                    user_id: rec.user_id,
                    tenant: rec.tenant,
                    at,
                });
            }
        }
        Ok(i64::try_from(rows.len()).unwrap_or(limit))
    }

    /// Writes the batched uses.
    async fn flush_pending(&self) -> Result<(), StoreError> {
        flush(&self.inner).await
    }

    /// The change feed of this store's schema (see [`crate::cache`]): a `LISTEN` on the channel
    /// that the schema's triggers (migration 5) notify, on a connection of its own named
    /// [`FEED_APPLICATION_NAME`].
    pub fn change_feed(&self) -> Arc<dyn Subscriber> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(
                self.inner
                    .connect
                    .clone()
                    .application_name(FEED_APPLICATION_NAME),
            );
        Arc::new(PgFeed {
            pool,
            store: self.inner.pool.clone(),
            channel: Mutex::new(None),
        })
    }
}

/// The `application_name` of the change feed's connection.
pub const FEED_APPLICATION_NAME: &str = "sessiond-cache-feed";

/// The change feed: a listener on the schema's channel.
struct PgFeed {
    /// The listener's own pool (one connection).
    pool: PgPool,
    /// The store's pool, for heartbeats.
    store: PgPool,
    /// The channel, once known.
    channel: Mutex<Option<String>>,
}

#[async_trait]
impl Subscriber for PgFeed {
    async fn subscribe(
        &self,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await.map_err(err)?;
        // A lost connection is reported (Ok(None)), not silently remade.
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        // The channel the triggers notify: named after the schema the sessions table is in.
        let channel: String = sqlx::query_scalar(
            "SELECT left('sdc_' || n.nspname, 63) FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'sessions'::regclass",
        )
        .fetch_one(&mut listener)
        .await
        .map_err(err)?;
        listener.listen(&channel).await.map_err(err)?;
        *self.channel.lock() = Some(channel);
        Ok(tokio::spawn(async move {
            while let Ok(Some(n)) = listener.try_recv().await {
                if tx.send(n.payload().to_owned()).is_err() {
                    return;
                }
            }
        }))
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let Some(channel) = self.channel.lock().clone() else {
            return Ok(());
        };
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(channel)
            .execute(&self.store)
            .await
            .map_err(err)?;
        Ok(())
    }
}

async fn flush(inner: &Inner) -> Result<(), StoreError> {
    // Entries stay pending (and visible to this node's reads) until their write has landed.
    let batch: Vec<(String, i64)> = inner
        .pending
        .lock()
        .iter()
        .map(|(h, t)| (h.to_string(), *t))
        .collect();
    if batch.is_empty() {
        return Ok(());
    }
    let (handles, times): (Vec<String>, Vec<i64>) = batch.iter().cloned().unzip();
    sqlx::query(
        "UPDATE sessions SET last_seen_at = GREATEST(sessions.last_seen_at, v.seen)
         FROM unnest($1::text[], $2::bigint[]) AS v(handle, seen)
         WHERE sessions.handle = v.handle",
    )
    .bind(&handles)
    .bind(&times)
    .execute(&inner.pool)
    .await
    .map_err(err)?;
    let mut pending = inner.pending.lock();
    for (h, t) in batch {
        if let Ok(h) = SessionHandle::parse(&h)
            && pending.get(&h).is_some_and(|p| *p <= t)
        {
            pending.remove(&h);
        }
    }
    Ok(())
}

async fn flush_loop(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = flush(&inner).await {
            tracing::warn!(error = %e, "writing batched last-seen times failed; will retry");
        }
    }
}

/// Writes events in the transaction of their change.
async fn write_events<'c, E>(ex: E, events: &[Event]) -> Result<(), StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let ats: Vec<i64> = events.iter().map(|e| e.at.as_millis()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let tenants: Vec<&str> = events.iter().map(|e| e.tenant.as_str()).collect();
    let users: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.user_id.as_ref().map(UserId::as_str))
        .collect();
    let handles: Vec<Option<&str>> = events
        .iter()
        .map(|e| e.handle.as_ref().map(SessionHandle::as_str))
        .collect();
    let pending: Vec<bool> = events.iter().map(|e| e.deliver).collect();
    let docs: Vec<String> = events.iter().map(Event::to_json).collect();
    sqlx::query(
        "INSERT INTO events (id, at, type, tenant, user_id, handle, pending, doc)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::bool[], $8::text[])",
    )
    .bind(&ids)
    .bind(&ats)
    .bind(&types)
    .bind(&tenants)
    .bind(&users)
    .bind(&handles)
    .bind(&pending)
    .bind(&docs)
    .execute(ex)
    .await
    .map_err(err)?;
    Ok(())
}

/// Whether the session's device is new for its user (`None`: no device known), remembering it.
/// One statement: `xmax = 0` tells an inserted row from an updated one.
async fn known_device(
    tx: &mut Transaction<'static, Postgres>,
    rec: &SessionRecord,
    now: Timestamp,
) -> Result<Option<bool>, StoreError> {
    let Some(id) = device_id(rec) else {
        return Ok(None);
    };
    let inserted: bool = sqlx::query_scalar(
        "INSERT INTO devices (tenant, user_id, device_id, last_seen_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant, user_id, device_id)
         DO UPDATE SET last_seen_at = GREATEST(devices.last_seen_at, excluded.last_seen_at)
         RETURNING (xmax = 0)",
    )
    .bind(rec.tenant.as_str())
    .bind(rec.user_id.as_str())
    .bind(id)
    .bind(now.as_millis())
    .fetch_one(&mut **tx)
    .await
    .map_err(err)?;
    Ok(Some(inserted))
}

async fn put_delivery<'c, E>(ex: E, d: &api::Delivery) -> Result<(), StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let doc = serde_json::to_string(d).map_err(|e| StoreError::Backend(e.to_string()))?;
    sqlx::query(
        "INSERT INTO deliveries (id, webhook, state, next_at, updated_at, doc)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, next_at = excluded.next_at,
             updated_at = excluded.updated_at, doc = excluded.doc",
    )
    .bind(&d.id)
    .bind(&d.webhook)
    .bind(d.state.as_str())
    .bind(d.next_attempt_at.map(|t| t.timestamp_millis()))
    .bind(d.updated_at.timestamp_millis())
    .bind(doc)
    .execute(ex)
    .await
    .map_err(err)?;
    Ok(())
}

fn parse_docs<T: serde::de::DeserializeOwned>(docs: Vec<String>) -> Result<Vec<T>, StoreError> {
    docs.iter()
        .map(|d| serde_json::from_str(d).map_err(|e| StoreError::Backend(e.to_string())))
        .collect()
}

fn live_in(rec: &SessionRecord, policy: &Policy, now: Timestamp) -> bool {
    session::liveness(rec, rec.last_seen_at, policy, now) == Liveness::Active
}

fn stored(rec: SessionRecord) -> StoredSession {
    StoredSession::new(Arc::new(rec))
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn insert(
        &self,
        record: SessionRecord,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError> {
        let mut events = Vec::new();
        let mut tx = self.begin().await?;
        let policy = self.policy_in(&mut tx, record.tenant.as_str()).await?;
        let mut evicted = Vec::new();
        if let Some(max) = policy.max_sessions_per_user() {
            Self::lock_user(&mut tx, &record.user_id).await?;
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "{SELECT} WHERE user_id = $1 AND tenant = $2 AND state = 'active' FOR UPDATE"
            )))
            .bind(record.user_id.as_str())
            .bind(record.tenant.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
            let mut active = Vec::new();
            for r in &rows {
                let rec = self.live(to_record(r)?);
                if session::liveness(&rec.record, rec.last_seen_at, &policy, now)
                    == Liveness::Active
                {
                    active.push(rec);
                }
            }
            if active.len() >= max as usize
                && policy.document().on_limit == sessiond_core::api::OnLimit::Deny
            {
                return Ok(InsertOutcome::LimitReached);
            }
            evicted = session::choose_evictions(
                active
                    .iter()
                    .map(|s| (s.last_seen_at, s.record.handle.clone()))
                    .collect(),
                max,
            );
            for s in active.iter().filter(|s| evicted.contains(&s.record.handle)) {
                let mut rec = (*s.record).clone();
                rec.last_seen_at = s.last_seen_at;
                rec.state = StoredState::Revoked {
                    reason: "limit_evicted".into(),
                    at: now,
                };
                Self::write_state(&mut tx, &rec).await?;
                events.push(audit.session_event(
                    EventKind::SessionRevoked,
                    now,
                    &rec,
                    Some("limit_evicted"),
                ));
            }
        }
        let r = Row::from_record(&record);
        sqlx::query(
            "INSERT INTO sessions (handle, token_hash, user_id, tenant, created_at, last_seen_at,
                remember_me, auth_method, auth_aal, authenticated_at, ip, user_agent, browser, os,
                data, state, revoked_reason, ended_at, refresh, flags, expires_at, idle_timeout_s,
                rotations)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                     $19, $20, $21, $22, $23)",
        )
        .bind(&r.handle)
        .bind(&r.token_hash)
        .bind(&r.user_id)
        .bind(&r.tenant)
        .bind(r.created_at)
        .bind(r.last_seen_at)
        .bind(r.remember_me)
        .bind(&r.auth_method)
        .bind(r.auth_aal)
        .bind(r.authenticated_at)
        .bind(&r.ip)
        .bind(&r.user_agent)
        .bind(&r.browser)
        .bind(&r.os)
        .bind(&r.data)
        .bind(&r.state)
        .bind(&r.revoked_reason)
        .bind(r.ended_at)
        .bind(&r.refresh)
        .bind(&r.flags)
        .bind(r.expires_at)
        .bind(r.idle_timeout_s)
        .bind(r.rotations)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        events.push(audit.created(&record, known_device(&mut tx, &record, now).await?));
        write_events(&mut *tx, &events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(events);
        Ok(InsertOutcome::Inserted { evicted })
    }

    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE token_hash = $1"
        )))
        .bind(&hash.as_bytes()[..])
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(err)?;
        Ok(row
            .as_ref()
            .map(to_record)
            .transpose()?
            .map(|r| self.live(r)))
    }

    async fn find_by_token_with_policy(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<(StoredSession, Arc<Policy>)>, StoreError> {
        let Some(row) = sqlx::query(SELECT_WITH_POLICY)
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(err)?
        else {
            return Ok(None);
        };
        let rec = to_record(&row)?;
        let doc: Option<String> = row.try_get(23).map_err(err)?;
        let policy = self.parse_policy(rec.tenant.as_str(), doc)?;
        Ok(Some((self.live(rec), policy)))
    }

    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE handle = $1")))
            .bind(handle.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(err)?;
        Ok(row
            .as_ref()
            .map(to_record)
            .transpose()?
            .map(|r| self.live(r)))
    }

    async fn touch(
        &self,
        s: &StoredSession,
        policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let stored = s.record.last_seen_at.as_millis();
        let ms = at.as_millis();
        if ms <= stored {
            return Ok(());
        }
        // Another node reads only the stored value. If the batch might land after that value
        // would make the session look idle-expired there, write now.
        let idle_ms = i64::try_from(policy.timeouts(s.record.remember_me).idle_s)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1000);
        if ms - stored >= idle_ms - 3 * self.inner.flush_ms {
            sqlx::query(
                "UPDATE sessions SET last_seen_at = GREATEST(last_seen_at, $2) WHERE handle = $1",
            )
            .bind(s.record.handle.as_str())
            .bind(ms)
            .execute(&self.inner.pool)
            .await
            .map_err(err)?;
            return Ok(());
        }
        let mut pending = self.inner.pending.lock();
        let e = pending.entry(s.record.handle.clone()).or_insert(ms);
        *e = (*e).max(ms);
        Ok(())
    }

    async fn rotate(
        &self,
        handle: &SessionHandle,
        change: &Rekey,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<RotateOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let Some(rec) = Self::for_update(&mut tx, handle).await? else {
            return Ok(RotateOutcome::Stale);
        };
        let live = self.live(rec);
        let policy = self.policy_in(&mut tx, live.record.tenant.as_str()).await?;
        if !change.matches(&live.record)
            || session::liveness(&live.record, live.last_seen_at, &policy, now) != Liveness::Active
        {
            return Ok(RotateOutcome::Stale);
        }
        let new = change.apply(&live.record, live.last_seen_at, now);
        let row = Row::from_record(&new);
        sqlx::query(
            "UPDATE sessions SET token_hash = $2, last_seen_at = GREATEST(last_seen_at, $3),
                    auth_method = $4, auth_aal = $5, authenticated_at = $6, refresh = $7,
                    ip = $8, user_agent = $9, browser = $10, os = $11, flags = $12,
                    rotations = $13
             WHERE handle = $1",
        )
        .bind(handle.as_str())
        .bind(&new.token_hash.as_bytes()[..])
        .bind(new.last_seen_at.as_millis())
        .bind(&*new.auth.method)
        .bind(i16::from(new.auth.aal))
        .bind(new.auth.authenticated_at.as_millis())
        .bind(new.refresh.as_deref())
        .bind(&row.ip)
        .bind(&row.user_agent)
        .bind(&row.browser)
        .bind(&row.os)
        .bind(&row.flags)
        .bind(row.rotations)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let events = vec![change.event_for(audit, now, &new)];
        write_events(&mut *tx, &events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(events);
        Ok(RotateOutcome::Rotated(stored(new)))
    }

    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError> {
        let mut tx = self.begin().await?;
        let Some(rec) = Self::for_update(&mut tx, handle).await? else {
            return Ok(None);
        };
        let live = self.live(rec);
        let policy = self.policy_in(&mut tx, live.record.tenant.as_str()).await?;
        let mut rec = (*live.record).clone();
        rec.last_seen_at = live.last_seen_at;
        if session::liveness(&rec, rec.last_seen_at, &policy, now) != Liveness::Active {
            return Ok(Some(RevokeOutcome {
                session: stored(rec),
                revoked_now: false,
            }));
        }
        rec.state = StoredState::Revoked {
            reason: reason.into(),
            at: now,
        };
        Self::write_state(&mut tx, &rec).await?;
        let events = vec![audit.session_event(EventKind::SessionRevoked, now, &rec, Some(reason))];
        write_events(&mut *tx, &events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(events);
        Ok(Some(RevokeOutcome {
            session: stored(rec),
            revoked_now: true,
        }))
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
        let mut events = Vec::new();
        let mut tx = self.begin().await?;
        Self::lock_user(&mut tx, user_id).await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE user_id = $1 AND ($2::text IS NULL OR tenant = $2) AND state = 'active' FOR UPDATE"
        )))
        .bind(user_id.as_str())
        .bind(tenant.map(TenantId::as_str))
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        let mut policies: HashMap<String, Arc<Policy>> = HashMap::new();
        let mut revoked = Vec::new();
        for r in &rows {
            let live = self.live(to_record(r)?);
            if except == Some(&live.record.handle) {
                continue;
            }
            let tenant = live.record.tenant.as_str().to_owned();
            let policy = match policies.get(&tenant) {
                Some(p) => p.clone(),
                None => {
                    let p = self.policy_in(&mut tx, &tenant).await?;
                    policies.insert(tenant, p.clone());
                    p
                }
            };
            let mut rec = (*live.record).clone();
            rec.last_seen_at = live.last_seen_at;
            if !live_in(&rec, &policy, now) {
                continue;
            }
            rec.state = StoredState::Revoked {
                reason: reason.into(),
                at: now,
            };
            Self::write_state(&mut tx, &rec).await?;
            events.push(audit.session_event(EventKind::SessionRevoked, now, &rec, Some(reason)));
            revoked.push(rec.handle);
        }
        write_events(&mut *tx, &events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(events);
        Ok(revoked)
    }

    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<DataUpdate, StoreError> {
        let mut tx = self.begin().await?;
        let Some(rec) = Self::for_update(&mut tx, handle).await? else {
            return Ok(DataUpdate::NotFound);
        };
        let live = self.live(rec);
        let policy = self.policy_in(&mut tx, live.record.tenant.as_str()).await?;
        if session::liveness(&live.record, live.last_seen_at, &policy, now) != Liveness::Active {
            return Ok(DataUpdate::NotActive);
        }
        let data = match session::patch_data(&live.record.data, patch, limit) {
            Ok(d) => d,
            Err(sessiond_core::CoreError::DataTooLarge { size, limit }) => {
                return Ok(DataUpdate::TooLarge { size, limit });
            }
            Err(e) => return Err(StoreError::Backend(e.to_string())),
        };
        sqlx::query("UPDATE sessions SET data = $2 WHERE handle = $1")
            .bind(handle.as_str())
            .bind(&data)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let mut new = (*live.record).clone();
        new.data = data.into();
        new.last_seen_at = live.last_seen_at;
        let events = vec![audit.data_updated(now, &new, patch)];
        write_events(&mut *tx, &events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(events);
        Ok(DataUpdate::Updated(stored(new)))
    }

    async fn list_user(
        &self,
        q: &ListQuery,
        now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE user_id = $1 AND ($2::text IS NULL OR tenant = $2)"
        )))
        .bind(q.user_id.as_str())
        .bind(q.tenant.as_ref().map(TenantId::as_str))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err)?;
        let mut found = Vec::with_capacity(rows.len());
        let mut policies: HashMap<TenantId, Arc<Policy>> = HashMap::new();
        for r in &rows {
            let s = self.live(to_record(r)?);
            if !q.include_ended {
                let policy = match policies.get(&s.record.tenant) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.policy(&s.record.tenant).await?;
                        policies.insert(s.record.tenant.clone(), p.clone());
                        p
                    }
                };
                if session::liveness(&s.record, s.last_seen_at, &policy, now) != Liveness::Active {
                    continue;
                }
            }
            found.push(s);
        }
        found.sort_by(|a, b| {
            b.last_seen_at
                .cmp(&a.last_seen_at)
                .then_with(|| b.record.handle.cmp(&a.record.handle))
        });
        if let Some((ls, h)) = &q.after {
            found.retain(|s| (s.last_seen_at, &s.record.handle) < (*ls, h));
        }
        found.truncate(q.limit);
        Ok(found)
    }

    async fn policy(&self, tenant: &TenantId) -> Result<Arc<Policy>, StoreError> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT document FROM policies WHERE tenant = $1")
                .bind(tenant.as_str())
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(err)?;
        self.parse_policy(tenant.as_str(), doc)
    }

    async fn put_policy(
        &self,
        tenant: &TenantId,
        policy: Policy,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_string(policy.document())
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO policies (tenant, document) VALUES ($1, $2)
             ON CONFLICT (tenant) DO UPDATE SET document = excluded.document",
        )
        .bind(tenant.as_str())
        .bind(doc)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let events = vec![audit.event(EventKind::PolicyUpdated, now, tenant)];
        write_events(&mut *tx, &events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(events);
        Ok(())
    }

    async fn sweep(
        &self,
        now: Timestamp,
        retention_s: u64,
        audit: &Audit,
    ) -> Result<SweepReport, StoreError> {
        // Uses batched on this node count; other nodes' batches land within their interval.
        self.flush_pending().await?;
        let mut report = SweepReport::default();
        let mut tx = self.begin().await?;
        let docs: Vec<(String, String)> = sqlx::query_as("SELECT tenant, document FROM policies")
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        let mut tenants = Vec::with_capacity(docs.len());
        let mut budget = SWEEP_CHUNK;
        // Each tenant with a policy of its own, then every other tenant under the default.
        for (t, d) in docs {
            let policy = self.parse_policy(&t, Some(d))?;
            budget -= self
                .expire(&mut tx, Some(&t), &[], &policy, now, budget, &mut report)
                .await?;
            tenants.push(t);
        }
        let dp = self.inner.default_policy.clone();
        self.expire(&mut tx, None, &tenants, &dp, now, budget, &mut report)
            .await?;
        let expired_events: Vec<Event> = report
            .expired
            .iter()
            .map(|e| {
                let mut ev = audit.event(EventKind::SessionExpired, e.at, &e.tenant);
                ev.user_id = Some(e.user_id.clone());
                ev.handle = Some(e.handle.clone());
                ev
            })
            .collect();
        let purged = sqlx::query(
            "DELETE FROM sessions WHERE handle IN (
                SELECT handle FROM sessions WHERE ended_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now.minus_secs(retention_s).as_millis())
        .bind(SWEEP_CHUNK)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        report.purged = purged.rows_affected();
        write_events(&mut *tx, &expired_events).await?;
        tx.commit().await.map_err(err)?;
        audit.committed(expired_events);
        Ok(report)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.flush_pending().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.inner.pool)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError> {
        let row = sqlx::query("SELECT version, value FROM meta WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(err)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let v: i64 = r.try_get(0).map_err(err)?;
                Ok(Some((v.max(0) as u64, r.try_get(1).map_err(err)?)))
            }
        }
    }

    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError> {
        let q = match expected {
            None => sqlx::query(
                "INSERT INTO meta (name, version, value) VALUES ($1, 1, $2)
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(doc),
            Some(v) => sqlx::query(
                "UPDATE meta SET version = version + 1, value = $3
                 WHERE name = $1 AND version = $2",
            )
            .bind(name)
            .bind(v as i64)
            .bind(doc),
        };
        let done = q.execute(&self.inner.pool).await.map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        write_events(&self.inner.pool, events).await
    }

    async fn events(&self, q: &EventQuery) -> Result<Vec<api::Event>, StoreError> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM events
             WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR handle = $2)
               AND ($3::text IS NULL OR type = $3) AND ($4::bigint IS NULL OR at >= $4)
               AND ($5::bigint IS NULL OR at < $5) AND ($6::text IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $7",
        )
        .bind(q.user_id.as_ref().map(UserId::as_str))
        .bind(q.handle.as_ref().map(SessionHandle::as_str))
        .bind(q.event_type.as_deref())
        .bind(q.since.map(Timestamp::as_millis))
        .bind(q.until.map(Timestamp::as_millis))
        .bind(q.before_id.as_deref())
        .bind(q.limit.min(10_000) as i64)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err)?;
        parse_docs(docs)
    }

    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        let ms = before.as_millis();
        let mut n = 0;
        for sql in [
            "DELETE FROM events WHERE at < $1",
            "DELETE FROM devices WHERE last_seen_at < $1",
            "DELETE FROM deliveries WHERE state <> 'pending' AND updated_at < $1",
        ] {
            n += sqlx::query(sql)
                .bind(ms)
                .execute(&self.inner.pool)
                .await
                .map_err(err)?
                .rows_affected();
        }
        Ok(n)
    }

    async fn pending_events(&self, limit: usize) -> Result<Vec<api::Event>, StoreError> {
        let docs: Vec<String> =
            sqlx::query_scalar("SELECT doc FROM events WHERE pending ORDER BY id LIMIT $1")
                .bind(limit.min(10_000) as i64)
                .fetch_all(&self.inner.pool)
                .await
                .map_err(err)?;
        parse_docs(docs)
    }

    async fn fan_out(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE events SET pending = false WHERE id = ANY($1)")
            .bind(events)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        for d in deliveries {
            put_delivery(&mut *tx, d).await?;
        }
        tx.commit().await.map_err(err)
    }

    async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<api::Delivery>, StoreError> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM deliveries WHERE state = 'pending' AND next_at <= $1
             ORDER BY next_at, id LIMIT $2",
        )
        .bind(now.as_millis())
        .bind(limit.min(10_000) as i64)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err)?;
        parse_docs(docs)
    }

    async fn put_delivery(&self, delivery: &api::Delivery) -> Result<(), StoreError> {
        put_delivery(&self.inner.pool, delivery).await
    }

    async fn active_sessions(
        &self,
        _now: Timestamp,
    ) -> Result<Option<Vec<(TenantId, u64)>>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT tenant, count(*) FROM sessions WHERE state = 'active' GROUP BY tenant",
        )
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err)?;
        rows.into_iter()
            .map(|(t, n)| {
                let t = TenantId::parse(&t).map_err(|e| StoreError::Backend(e.to_string()))?;
                Ok((t, u64::try_from(n).unwrap_or(0)))
            })
            .collect::<Result<Vec<_>, StoreError>>()
            .map(Some)
    }

    async fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<api::Delivery>, StoreError> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM deliveries
             WHERE webhook = $1 AND ($2::text IS NULL OR state = $2)
               AND ($3::text IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4",
        )
        .bind(&q.webhook)
        .bind(q.state.map(api::DeliveryState::as_str))
        .bind(q.before_id.as_deref())
        .bind(q.limit.min(10_000) as i64)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err)?;
        parse_docs(docs)
    }
}
