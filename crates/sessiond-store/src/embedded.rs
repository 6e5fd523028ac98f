//! The embedded store: SQLite in WAL mode for durability, a complete in-memory index for reads.
//!
//! - **Reads** (verify, get, list) are served from memory: every session not yet purged is held
//!   in two concurrent maps (by token hash and by handle) plus a per-user index. No read touches
//!   the disk.
//! - **Writes** go through one writer thread that owns the SQLite connection. It drains every
//!   command waiting in its queue, applies them in one transaction, commits (`synchronous=FULL`:
//!   the WAL is fsynced) and only then answers the callers: group commit, so a burst of creates
//!   costs one fsync, and every acknowledged change survives `kill -9` and power loss.
//!   Commands in a batch apply in order, so a later one sees the earlier ones (per-user limits
//!   stay exact under any concurrency).
//! - **Last seen** is kept live in memory (exact idle expiry) and written back in batches every
//!   `flush_interval`. A crash can lose at most that much of a session's recent use, which can
//!   only make it expire sooner.
//! - If a commit fails, the batch's callers get an error and the memory index is rebuilt from
//!   the database before anything else is served; meanwhile reads answer `Unavailable`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params};
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
use tokio::sync::oneshot;

use crate::row::Row;

/// Name of the database file in the data directory.
pub const DB_FILE: &str = "sessiond.db";
/// Uses closer together than this are not written back again.
const TOUCH_GRANULARITY_MS: i64 = 1000;
/// Most commands in one transaction.
const MAX_BATCH: usize = 1024;
/// Most sessions one sweep expires or purges (the sweeper repeats while there is more).
const SWEEP_CHUNK: usize = 10_000;

/// Options of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// The policy of tenants that have none stored.
    pub default_policy: Policy,
    /// How often batched last-seen times are written back.
    pub flush_interval: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            default_policy: Policy::default(),
            flush_interval: Duration::from_secs(1),
        }
    }
}

/// One session in memory. The entry is stable for the life of the session; its record is
/// replaced on every change.
#[derive(Debug)]
struct Entry {
    record: RwLock<Arc<SessionRecord>>,
    /// Live last use (ms).
    last_seen: AtomicI64,
    /// Last use written to disk (ms).
    persisted: AtomicI64,
    /// Queued for write-back.
    dirty: AtomicBool,
}

impl Entry {
    fn new(rec: SessionRecord) -> Arc<Self> {
        let ls = rec.last_seen_at.as_millis();
        Arc::new(Self {
            record: RwLock::new(Arc::new(rec)),
            last_seen: AtomicI64::new(ls),
            persisted: AtomicI64::new(ls),
            dirty: AtomicBool::new(false),
        })
    }

    fn snapshot(&self) -> StoredSession {
        let record = self.record.read().clone();
        let live = Timestamp::from_millis(self.last_seen.load(Ordering::Acquire));
        StoredSession {
            last_seen_at: live.max(record.last_seen_at),
            record,
        }
    }
}

/// The hasher of the session indexes.
type FastHash = foldhash::fast::RandomState;

/// State shared by the async front and the writer thread.
#[derive(Debug)]
struct Shared {
    // Both keys are made by the server from the OS CSPRNG (the token hash is a SHA-256), so no
    // caller can choose colliding keys: a fast seeded hash instead of SipHash on the hot path.
    by_token: DashMap<TokenHash, Arc<Entry>, FastHash>,
    by_handle: DashMap<SessionHandle, Arc<Entry>, FastHash>,
    by_user: DashMap<UserId, Vec<SessionHandle>>,
    policies: RwLock<HashMap<TenantId, Arc<Policy>>>,
    default_policy: Arc<Policy>,
    dirty: Mutex<Vec<Arc<Entry>>>,
    /// False while the index is being rebuilt after a failed commit, or after the writer died.
    healthy: AtomicBool,
}

impl Shared {
    fn policy_for(&self, tenant: &TenantId) -> Arc<Policy> {
        self.policies
            .read()
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| self.default_policy.clone())
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.healthy.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "embedded store is recovering".into(),
            ))
        }
    }

    fn index(&self, rec: SessionRecord) {
        let entry = Entry::new(rec);
        let rec = entry.record.read().clone();
        self.by_token.insert(rec.token_hash, entry.clone());
        self.by_handle.insert(rec.handle.clone(), entry);
        self.by_user
            .entry(rec.user_id.clone())
            .or_default()
            .push(rec.handle.clone());
    }

    fn unindex(&self, handle: &SessionHandle) {
        if let Some((_, entry)) = self.by_handle.remove(handle) {
            let rec = entry.record.read().clone();
            self.by_token
                .remove_if(&rec.token_hash, |_, e| Arc::ptr_eq(e, &entry));
            let empty = match self.by_user.get_mut(&rec.user_id) {
                Some(mut v) => {
                    v.retain(|h| h != handle);
                    v.is_empty()
                }
                None => false,
            };
            if empty {
                self.by_user.remove_if(&rec.user_id, |_, v| v.is_empty());
            }
        }
    }

    fn clear(&self) {
        self.by_token.clear();
        self.by_handle.clear();
        self.by_user.clear();
        self.dirty.lock().clear();
    }

    fn user_entries(&self, user: &UserId) -> Vec<Arc<Entry>> {
        let handles = self
            .by_user
            .get(user)
            .map(|v| v.clone())
            .unwrap_or_default();
        handles
            .iter()
            .filter_map(|h| self.by_handle.get(h).map(|e| e.clone()))
            .collect()
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Cmd {
    Insert {
        rec: Box<SessionRecord>,
        now: Timestamp,
        audit: Audit,
        reply: Reply<InsertOutcome>,
    },
    Rotate {
        handle: SessionHandle,
        change: Box<Rekey>,
        now: Timestamp,
        audit: Audit,
        reply: Reply<RotateOutcome>,
    },
    Revoke {
        handle: SessionHandle,
        reason: Arc<str>,
        now: Timestamp,
        audit: Audit,
        reply: Reply<Option<RevokeOutcome>>,
    },
    RevokeUser {
        user: UserId,
        tenant: Option<TenantId>,
        except: Option<SessionHandle>,
        reason: Arc<str>,
        now: Timestamp,
        audit: Audit,
        reply: Reply<Vec<SessionHandle>>,
    },
    UpdateData {
        handle: SessionHandle,
        patch: Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: Audit,
        reply: Reply<DataUpdate>,
    },
    PutPolicy {
        tenant: TenantId,
        policy: Policy,
        now: Timestamp,
        audit: Audit,
        reply: Reply<()>,
    },
    Sweep {
        now: Timestamp,
        to_expire: Vec<(SessionHandle, Timestamp)>,
        to_purge: Vec<SessionHandle>,
        audit: Audit,
        reply: Reply<SweepReport>,
    },
    AppendEvents {
        events: Vec<Event>,
        reply: Reply<()>,
    },
    PurgeEvents {
        before: Timestamp,
        reply: Reply<u64>,
    },
    FanOut {
        events: Vec<String>,
        deliveries: Vec<api::Delivery>,
        reply: Reply<()>,
    },
    PutDelivery {
        delivery: Box<api::Delivery>,
        reply: Reply<()>,
    },
    Flush {
        reply: Reply<()>,
    },
    GetDocument {
        name: String,
        reply: Reply<Option<(u64, String)>>,
    },
    PutDocument {
        name: String,
        expected: Option<u64>,
        doc: String,
        reply: Reply<bool>,
    },
    Ping {
        reply: Reply<()>,
    },
}

/// A staged memory change, applied once the transaction committed.
enum Effect {
    Index(SessionRecord),
    Replace(Arc<Entry>, SessionRecord),
    Rekey {
        entry: Arc<Entry>,
        old: TokenHash,
        rec: SessionRecord,
    },
    Unindex(SessionHandle),
    Policy(TenantId, Arc<Policy>),
    Persisted(Arc<Entry>, i64),
    /// Events written in the batch, reported to their operation once committed.
    Committed(Audit, Vec<Event>),
}

/// An answer waiting for the commit.
enum Pending {
    Insert(Reply<InsertOutcome>, Result<InsertOutcome, StoreError>),
    Rotate(Reply<RotateOutcome>, Result<RotateOutcome, StoreError>),
    Revoke(
        Reply<Option<RevokeOutcome>>,
        Result<Option<RevokeOutcome>, StoreError>,
    ),
    RevokeUser(
        Reply<Vec<SessionHandle>>,
        Result<Vec<SessionHandle>, StoreError>,
    ),
    Data(Reply<DataUpdate>, Result<DataUpdate, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Sweep(Reply<SweepReport>, Result<SweepReport, StoreError>),
    GetDocument(
        Reply<Option<(u64, String)>>,
        Result<Option<(u64, String)>, StoreError>,
    ),
    PutDocument(Reply<bool>, Result<bool, StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
}

impl Pending {
    /// The backend error of the command, if it failed: the whole batch then fails, so that no
    /// half of a command (a change without its event) is committed.
    fn error(&self) -> Option<StoreError> {
        fn e<T>(r: &Result<T, StoreError>) -> Option<StoreError> {
            r.as_ref().err().cloned()
        }
        match self {
            Pending::Insert(_, r) => e(r),
            Pending::Rotate(_, r) => e(r),
            Pending::Revoke(_, r) => e(r),
            Pending::RevokeUser(_, r) => e(r),
            Pending::Data(_, r) => e(r),
            Pending::Unit(_, r) => e(r),
            Pending::Sweep(_, r) => e(r),
            Pending::GetDocument(_, r) => e(r),
            Pending::PutDocument(_, r) => e(r),
            Pending::Count(_, r) => e(r),
        }
    }

    fn send(self, fail: Option<&StoreError>) {
        macro_rules! go {
            ($tx:expr, $r:expr) => {{
                let _ = $tx.send(match fail {
                    Some(e) => Err(e.clone()),
                    None => $r,
                });
            }};
        }
        match self {
            Pending::Insert(tx, r) => go!(tx, r),
            Pending::Rotate(tx, r) => go!(tx, r),
            Pending::Revoke(tx, r) => go!(tx, r),
            Pending::RevokeUser(tx, r) => go!(tx, r),
            Pending::Data(tx, r) => go!(tx, r),
            Pending::Unit(tx, r) => go!(tx, r),
            Pending::Sweep(tx, r) => go!(tx, r),
            Pending::GetDocument(tx, r) => go!(tx, r),
            Pending::PutDocument(tx, r) => go!(tx, r),
            Pending::Count(tx, r) => go!(tx, r),
        }
    }
}

/// The embedded store. Cheap to clone; all clones share one database and index.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
    /// A read-only connection for event and delivery queries, which the memory index does not
    /// hold (WAL: readers see committed data and never block the writer).
    reader: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    handle           TEXT PRIMARY KEY,
    token_hash       BLOB NOT NULL,
    user_id          TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    last_seen_at     INTEGER NOT NULL,
    remember_me      INTEGER NOT NULL,
    auth_method      TEXT NOT NULL,
    auth_aal         INTEGER NOT NULL,
    authenticated_at INTEGER NOT NULL,
    ip               TEXT,
    user_agent       TEXT,
    browser          TEXT,
    os               TEXT,
    data             TEXT NOT NULL,
    state            TEXT NOT NULL,
    revoked_reason   TEXT,
    ended_at         INTEGER,
    refresh          TEXT,
    flags            TEXT,
    expires_at       INTEGER,
    idle_timeout_s   INTEGER,
    rotations        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions(ended_at) WHERE ended_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS policies (
    tenant   TEXT PRIMARY KEY,
    document TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name    TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    value   TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id      TEXT PRIMARY KEY,
    at      INTEGER NOT NULL,
    type    TEXT NOT NULL,
    tenant  TEXT NOT NULL,
    user_id TEXT,
    handle  TEXT,
    pending INTEGER NOT NULL,
    doc     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_user ON events(user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_handle ON events(handle, id) WHERE handle IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE INDEX IF NOT EXISTS events_pending ON events(id) WHERE pending = 1;
CREATE TABLE IF NOT EXISTS devices (
    tenant       TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    last_seen_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id         TEXT PRIMARY KEY,
    webhook    TEXT NOT NULL,
    state      TEXT NOT NULL,
    next_at    INTEGER,
    updated_at INTEGER NOT NULL,
    doc        TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_webhook ON deliveries(webhook, id);
";

/// The columns of `sessions`, in the order of [`Row`]'s fields.
pub(crate) const COLUMNS: &str = "handle, token_hash, user_id, tenant, created_at, last_seen_at, \
    remember_me, auth_method, auth_aal, authenticated_at, ip, user_agent, browser, os, data, \
    state, revoked_reason, ended_at, refresh, flags, expires_at, idle_timeout_s, rotations";

/// Creates `dir` (and missing parents) readable by the owner only (0700, whatever the umask),
/// or tightens an existing one that others could read, saying so in the log.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
            tracing::warn!(
                path = %dir.display(),
                was = format!("{mode:o}"),
                "tightened the data directory to owner-only access (0700)"
            );
        }
        Ok(())
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
}

/// Creates `path` empty if it does not exist, readable by the owner only (0600), or
/// tightens it.
fn private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)?;
        }
        tighten_file(path)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(unix)]
fn tighten_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o600))?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{mode:o}"),
            "tightened a data file to owner-only access (0600)"
        );
    }
    Ok(())
}

/// Tightens every regular file directly in `dir` to 0600 (the database, its WAL and
/// shared-memory files, the generated keys).
pub fn tighten_files(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    for entry in std::fs::read_dir(dir)? {
        tighten_file(&entry?.path())?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The schema version this build writes.
const SCHEMA_VERSION: i64 = 5;

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(backend)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this sessiond supports ({SCHEMA_VERSION})"
        )));
    }
    // Version 3 adds events, known devices and webhook deliveries (new tables only).
    if version == 1 {
        // Version 2 adds token mode's refresh state.
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN refresh TEXT")
            .map_err(backend)?;
    }
    if (1..4).contains(&version) {
        // Version 4 adds the detectors' flags.
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN flags TEXT")
            .map_err(backend)?;
    }
    if (1..5).contains(&version) {
        // Version 5 keeps each session's deadlines and its token rotation count (older rows
        // have no deadlines: they are derived from the policy until the session is next used).
        conn.execute_batch(
            "ALTER TABLE sessions ADD COLUMN expires_at INTEGER;
             ALTER TABLE sessions ADD COLUMN idle_timeout_s INTEGER;
             ALTER TABLE sessions ADD COLUMN rotations INTEGER NOT NULL DEFAULT 0;",
        )
        .map_err(backend)?;
    }
    conn.execute_batch(SCHEMA).map_err(backend)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(backend)?;
    Ok(conn)
}

fn load(conn: &Connection, shared: &Shared) -> Result<usize, StoreError> {
    shared.clear();
    let mut policies = HashMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT tenant, document FROM policies")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(backend)?;
        for row in rows {
            let (tenant, doc) = row.map_err(backend)?;
            let tenant = TenantId::parse(&tenant).map_err(backend)?;
            let doc = serde_json::from_str(&doc).map_err(backend)?;
            policies.insert(tenant, Arc::new(Policy::from_stored(doc).map_err(backend)?));
        }
    }
    *shared.policies.write() = policies;
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM sessions"))
        .map_err(backend)?;
    let mut rows = stmt.query([]).map_err(backend)?;
    let mut n = 0;
    let mut interned: HashSet<Arc<str>> = HashSet::new();
    let mut intern = |s: String| -> Arc<str> {
        if let Some(a) = interned.get(s.as_str()) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        interned.insert(a.clone());
        a
    };
    while let Some(r) = rows.next().map_err(backend)? {
        let row = Row {
            handle: r.get(0).map_err(backend)?,
            token_hash: r.get(1).map_err(backend)?,
            user_id: r.get(2).map_err(backend)?,
            tenant: r.get(3).map_err(backend)?,
            created_at: r.get(4).map_err(backend)?,
            last_seen_at: r.get(5).map_err(backend)?,
            remember_me: r.get(6).map_err(backend)?,
            auth_method: r.get(7).map_err(backend)?,
            auth_aal: r.get(8).map_err(backend)?,
            authenticated_at: r.get(9).map_err(backend)?,
            ip: r.get(10).map_err(backend)?,
            user_agent: r.get(11).map_err(backend)?,
            browser: r.get(12).map_err(backend)?,
            os: r.get(13).map_err(backend)?,
            data: r.get(14).map_err(backend)?,
            state: r.get(15).map_err(backend)?,
            revoked_reason: r.get(16).map_err(backend)?,
            ended_at: r.get(17).map_err(backend)?,
            refresh: r.get(18).map_err(backend)?,
            flags: r.get(19).map_err(backend)?,
            expires_at: r.get(20).map_err(backend)?,
            idle_timeout_s: r.get(21).map_err(backend)?,
            rotations: r.get(22).map_err(backend)?,
        };
        shared.index(row.into_record(&mut intern)?);
        n += 1;
    }
    Ok(n)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`, loads it into memory and starts the writer.
    pub fn open(dir: &Path, opts: EmbeddedOptions) -> Result<Self, StoreError> {
        private_dir(dir)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(DB_FILE);
        private_file(&path)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", path.display())))?;
        let conn = open_connection(&path)?;
        // SQLite gives the WAL and shared-memory files the database file's mode; an older
        // version's files are tightened here.
        tighten_files(dir)
            .map_err(|e| StoreError::Backend(format!("cannot secure {}: {e}", dir.display())))?;
        let shared = Arc::new(Shared {
            by_token: DashMap::with_hasher(FastHash::default()),
            by_handle: DashMap::with_hasher(FastHash::default()),
            by_user: DashMap::new(),
            policies: RwLock::new(HashMap::new()),
            default_policy: Arc::new(opts.default_policy),
            dirty: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
        });
        let n = load(&conn, &shared)?;
        let reader = Connection::open(&path).map_err(backend)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(backend)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(backend)?;
        tracing::info!(sessions = n, path = %path.display(), "embedded store loaded");
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            shared: shared.clone(),
            flush_interval: opts.flush_interval,
        };
        std::thread::Builder::new()
            .name("sessiond-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            shared,
            tx,
            path,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many sessions (of any status, not yet purged) are held.
    pub fn len(&self) -> usize {
        self.shared.by_handle.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.shared.by_handle.is_empty()
    }

    /// Runs a query on the reader connection, off the async runtime.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.shared.check()?;
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock()))
            .await
            .map_err(|e| StoreError::Backend(format!("query failed: {e}")))?
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the embedded store's writer has stopped".into())
}

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    flush_interval: Duration,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut last_flush = Instant::now();
        loop {
            let wait = self.flush_interval.saturating_sub(last_flush.elapsed());
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(c) => batch.push(c),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.commit(Vec::new(), true);
                    break;
                }
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let flush_due = last_flush.elapsed() >= self.flush_interval;
            if flush_due {
                last_flush = Instant::now();
            }
            self.commit(batch, flush_due);
        }
        tracing::debug!("embedded store writer stopped");
    }

    /// Applies a batch in one transaction and answers its callers after the commit.
    fn commit(&mut self, batch: Vec<Cmd>, flush_touches: bool) {
        if batch.is_empty() && !flush_touches {
            return;
        }
        let mut effects = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction().map_err(backend)?;
            let mut staged = Staged {
                shared: &self.shared,
                overlay: HashMap::new(),
                new_users: HashMap::new(),
            };
            let mut flush_now = flush_touches;
            for cmd in batch {
                if matches!(cmd, Cmd::Flush { .. }) {
                    flush_now = true;
                }
                let p = apply(&tx, &mut staged, cmd, &mut effects);
                let failed = p.error();
                pending.push(p);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            if flush_now {
                flush_dirty(&tx, &self.shared, &mut effects)?;
            }
            tx.commit().map_err(backend)
        })();
        match result {
            Ok(()) => {
                for e in effects {
                    self.apply_effect(e);
                }
                for p in pending {
                    p.send(None);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded store commit failed; rebuilding the index");
                self.shared.healthy.store(false, Ordering::Release);
                for p in pending {
                    p.send(Some(&e));
                }
                match load(&self.conn, &self.shared) {
                    Ok(_) => self.shared.healthy.store(true, Ordering::Release),
                    Err(e) => {
                        tracing::error!(error = %e, "embedded store cannot reload; staying unavailable")
                    }
                }
            }
        }
    }

    fn apply_effect(&self, e: Effect) {
        let s = &self.shared;
        match e {
            Effect::Index(rec) => s.index(rec),
            Effect::Replace(entry, rec) => *entry.record.write() = Arc::new(rec),
            Effect::Rekey { entry, old, rec } => {
                let new = rec.token_hash;
                *entry.record.write() = Arc::new(rec);
                if new != old {
                    s.by_token.insert(new, entry.clone());
                    s.by_token.remove_if(&old, |_, e| Arc::ptr_eq(e, &entry));
                }
            }
            Effect::Unindex(h) => s.unindex(&h),
            Effect::Policy(t, p) => {
                s.policies.write().insert(t, p);
            }
            Effect::Persisted(entry, ms) => {
                entry.persisted.fetch_max(ms, Ordering::AcqRel);
            }
            Effect::Committed(audit, events) => audit.committed(events),
        }
    }
}

/// A session as the writer sees it during a batch: its memory entry (`None` if inserted in
/// this batch), its record, and its live last-seen time.
type Found = (Option<Arc<Entry>>, SessionRecord, Timestamp);

/// The writer's view during a batch: committed memory plus this batch's staged changes.
struct Staged<'a> {
    shared: &'a Shared,
    /// Handle → the record as this batch left it (`None`: purged in this batch).
    overlay: HashMap<SessionHandle, Option<(Arc<Entry>, SessionRecord)>>,
    /// Users' sessions inserted in this batch.
    new_users: HashMap<UserId, Vec<SessionRecord>>,
}

impl Staged<'_> {
    /// The current record and live last-seen of a session, as this batch sees it.
    fn get(&self, h: &SessionHandle) -> Option<Found> {
        match self.overlay.get(h) {
            Some(Some((entry, rec))) => {
                let live = Timestamp::from_millis(entry.last_seen.load(Ordering::Acquire));
                return Some((Some(entry.clone()), rec.clone(), live.max(rec.last_seen_at)));
            }
            Some(None) => return None,
            None => {}
        }
        if let Some(e) = self.shared.by_handle.get(h) {
            let snap = e.snapshot();
            return Some((Some(e.clone()), (*snap.record).clone(), snap.last_seen_at));
        }
        for recs in self.new_users.values() {
            if let Some(r) = recs.iter().find(|r| &r.handle == h) {
                return Some((None, r.clone(), r.last_seen_at));
            }
        }
        None
    }

    /// Every session of a user, as this batch sees it.
    fn user(&self, user: &UserId) -> Vec<Found> {
        let mut out: Vec<_> = self
            .shared
            .user_entries(user)
            .into_iter()
            .filter_map(|e| {
                let h = e.record.read().handle.clone();
                self.get(&h)
            })
            .collect();
        if let Some(recs) = self.new_users.get(user) {
            for r in recs {
                out.push((None, r.clone(), r.last_seen_at));
            }
        }
        out
    }

    /// Stages a changed record (of a session that is in memory or inserted in this batch).
    fn put(&mut self, entry: Option<Arc<Entry>>, rec: SessionRecord, effects: &mut Vec<Effect>) {
        match entry {
            Some(entry) => {
                effects.push(Effect::Replace(entry.clone(), rec.clone()));
                self.overlay.insert(rec.handle.clone(), Some((entry, rec)));
            }
            None => {
                // Inserted earlier in this batch: change the staged insert itself.
                if let Some(recs) = self.new_users.get_mut(&rec.user_id)
                    && let Some(r) = recs.iter_mut().find(|r| r.handle == rec.handle)
                {
                    *r = rec.clone();
                }
                for e in effects.iter_mut() {
                    if let Effect::Index(r) = e
                        && r.handle == rec.handle
                    {
                        *r = rec.clone();
                    }
                }
            }
        }
    }
}

fn write_state(tx: &rusqlite::Transaction<'_>, rec: &SessionRecord) -> Result<(), StoreError> {
    let r = Row::from_record(rec);
    tx.prepare_cached(
        "UPDATE sessions SET state = ?2, revoked_reason = ?3, ended_at = ?4,
                last_seen_at = MAX(last_seen_at, ?5) WHERE handle = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            r.handle,
            r.state,
            r.revoked_reason,
            r.ended_at,
            r.last_seen_at
        ])
    })
    .map_err(backend)?;
    Ok(())
}

fn revoke_staged(
    tx: &rusqlite::Transaction<'_>,
    staged: &mut Staged<'_>,
    (entry, mut rec, last_seen): Found,
    reason: &Arc<str>,
    now: Timestamp,
    effects: &mut Vec<Effect>,
) -> Result<SessionRecord, StoreError> {
    rec.last_seen_at = last_seen;
    rec.state = StoredState::Revoked {
        reason: reason.clone(),
        at: now,
    };
    write_state(tx, &rec)?;
    staged.put(entry, rec.clone(), effects);
    Ok(rec)
}

fn is_live(staged: &Staged<'_>, rec: &SessionRecord, last_seen: Timestamp, now: Timestamp) -> bool {
    let policy = staged.shared.policy_for(&rec.tenant);
    session::liveness(rec, last_seen, &policy, now) == Liveness::Active
}

fn stored(rec: SessionRecord) -> StoredSession {
    StoredSession::new(Arc::new(rec))
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    staged: &mut Staged<'_>,
    cmd: Cmd,
    effects: &mut Vec<Effect>,
) -> Pending {
    match cmd {
        Cmd::Insert {
            rec,
            now,
            audit,
            reply,
        } => {
            let r = (|| {
                let rec = *rec;
                let mut events = Vec::new();
                let policy = staged.shared.policy_for(&rec.tenant);
                if let Some(max) = policy.max_sessions_per_user() {
                    let active: Vec<_> = staged
                        .user(&rec.user_id)
                        .into_iter()
                        .filter(|(_, r, ls)| r.tenant == rec.tenant && is_live(staged, r, *ls, now))
                        .collect();
                    if active.len() >= max as usize
                        && policy.document().on_limit == sessiond_core::api::OnLimit::Deny
                    {
                        return Ok(InsertOutcome::LimitReached);
                    }
                    let victims = session::choose_evictions(
                        active
                            .iter()
                            .map(|(_, r, ls)| (*ls, r.handle.clone()))
                            .collect(),
                        max,
                    );
                    let reason: Arc<str> = "limit_evicted".into();
                    for v in &victims {
                        if let Some((entry, r, ls)) =
                            active.iter().find(|(_, r, _)| &r.handle == v).cloned()
                        {
                            let r =
                                revoke_staged(tx, staged, (entry, r, ls), &reason, now, effects)?;
                            events.push(audit.session_event(
                                EventKind::SessionRevoked,
                                now,
                                &r,
                                Some(&reason),
                            ));
                        }
                    }
                    insert_row(tx, &rec)?;
                    events.push(audit.created(&rec, known_device(tx, &rec, now)?));
                    record_events(tx, &audit, events, effects)?;
                    staged
                        .new_users
                        .entry(rec.user_id.clone())
                        .or_default()
                        .push(rec.clone());
                    effects.push(Effect::Index(rec));
                    return Ok(InsertOutcome::Inserted { evicted: victims });
                }
                insert_row(tx, &rec)?;
                events.push(audit.created(&rec, known_device(tx, &rec, now)?));
                record_events(tx, &audit, events, effects)?;
                staged
                    .new_users
                    .entry(rec.user_id.clone())
                    .or_default()
                    .push(rec.clone());
                effects.push(Effect::Index(rec));
                Ok(InsertOutcome::Inserted {
                    evicted: Vec::new(),
                })
            })();
            Pending::Insert(reply, r)
        }
        Cmd::Rotate {
            handle,
            change,
            now,
            audit,
            reply,
        } => {
            let r = (|| {
                let Some((entry, rec, ls)) = staged.get(&handle) else {
                    return Ok(RotateOutcome::Stale);
                };
                if !change.matches(&rec) || !is_live(staged, &rec, ls, now) {
                    return Ok(RotateOutcome::Stale);
                }
                let Some(entry) = entry else {
                    return Ok(RotateOutcome::Stale);
                };
                let new = change.apply(&rec, ls, now);
                tx.prepare_cached(
                    "UPDATE sessions SET token_hash = ?2, last_seen_at = ?3, auth_method = ?4,
                            auth_aal = ?5, authenticated_at = ?6, refresh = ?7, ip = ?8,
                            user_agent = ?9, browser = ?10, os = ?11, flags = ?12,
                            rotations = ?13
                     WHERE handle = ?1",
                )
                .and_then(|mut s| {
                    let r = Row::from_record(&new);
                    s.execute(params![
                        handle.as_str(),
                        &new.token_hash.as_bytes()[..],
                        new.last_seen_at.as_millis(),
                        &*new.auth.method,
                        new.auth.aal,
                        new.auth.authenticated_at.as_millis(),
                        new.refresh.as_deref(),
                        r.ip,
                        r.user_agent,
                        r.browser,
                        r.os,
                        r.flags,
                        r.rotations,
                    ])
                })
                .map_err(backend)?;
                entry
                    .last_seen
                    .fetch_max(new.last_seen_at.as_millis(), Ordering::AcqRel);
                effects.push(Effect::Rekey {
                    entry: entry.clone(),
                    old: rec.token_hash,
                    rec: new.clone(),
                });
                staged.overlay.insert(handle, Some((entry, new.clone())));
                let e = change.event_for(&audit, now, &new);
                record_events(tx, &audit, vec![e], effects)?;
                Ok(RotateOutcome::Rotated(stored(new)))
            })();
            Pending::Rotate(reply, r)
        }
        Cmd::Revoke {
            handle,
            reason,
            now,
            audit,
            reply,
        } => {
            let r = (|| {
                let Some((entry, rec, ls)) = staged.get(&handle) else {
                    return Ok(None);
                };
                if !is_live(staged, &rec, ls, now) {
                    let mut rec = rec;
                    rec.last_seen_at = ls;
                    return Ok(Some(RevokeOutcome {
                        session: stored(rec),
                        revoked_now: false,
                    }));
                }
                let rec = revoke_staged(tx, staged, (entry, rec, ls), &reason, now, effects)?;
                let e = audit.session_event(EventKind::SessionRevoked, now, &rec, Some(&reason));
                record_events(tx, &audit, vec![e], effects)?;
                Ok(Some(RevokeOutcome {
                    session: stored(rec),
                    revoked_now: true,
                }))
            })();
            Pending::Revoke(reply, r)
        }
        Cmd::RevokeUser {
            user,
            tenant,
            except,
            reason,
            now,
            audit,
            reply,
        } => {
            let r = (|| {
                let mut revoked = Vec::new();
                let mut events = Vec::new();
                for (entry, rec, ls) in staged.user(&user) {
                    if tenant.as_ref().is_some_and(|t| t != &rec.tenant)
                        || except.as_ref() == Some(&rec.handle)
                        || !is_live(staged, &rec, ls, now)
                    {
                        continue;
                    }
                    let rec = revoke_staged(tx, staged, (entry, rec, ls), &reason, now, effects)?;
                    events.push(audit.session_event(
                        EventKind::SessionRevoked,
                        now,
                        &rec,
                        Some(&reason),
                    ));
                    revoked.push(rec.handle);
                }
                record_events(tx, &audit, events, effects)?;
                Ok(revoked)
            })();
            Pending::RevokeUser(reply, r)
        }
        Cmd::UpdateData {
            handle,
            patch,
            limit,
            now,
            audit,
            reply,
        } => {
            let r = (|| {
                let Some((entry, rec, ls)) = staged.get(&handle) else {
                    return Ok(DataUpdate::NotFound);
                };
                if !is_live(staged, &rec, ls, now) {
                    return Ok(DataUpdate::NotActive);
                }
                let data = match session::patch_data(&rec.data, &patch, limit) {
                    Ok(d) => d,
                    Err(sessiond_core::CoreError::DataTooLarge { size, limit }) => {
                        return Ok(DataUpdate::TooLarge { size, limit });
                    }
                    Err(e) => return Err(backend(e)),
                };
                tx.prepare_cached("UPDATE sessions SET data = ?2 WHERE handle = ?1")
                    .and_then(|mut s| s.execute(params![handle.as_str(), data]))
                    .map_err(backend)?;
                let mut new = rec;
                new.data = data.into();
                new.last_seen_at = ls;
                let e = audit.data_updated(now, &new, &patch);
                record_events(tx, &audit, vec![e], effects)?;
                staged.put(entry, new.clone(), effects);
                Ok(DataUpdate::Updated(stored(new)))
            })();
            Pending::Data(reply, r)
        }
        Cmd::PutPolicy {
            tenant,
            policy,
            now,
            audit,
            reply,
        } => {
            let r = (|| {
                let doc = serde_json::to_string(policy.document()).map_err(backend)?;
                tx.prepare_cached(
                    "INSERT INTO policies (tenant, document) VALUES (?1, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET document = excluded.document",
                )
                .and_then(|mut s| s.execute(params![tenant.as_str(), doc]))
                .map_err(backend)?;
                let e = audit.event(EventKind::PolicyUpdated, now, &tenant);
                record_events(tx, &audit, vec![e], effects)?;
                effects.push(Effect::Policy(tenant, Arc::new(policy)));
                Ok(())
            })();
            Pending::Unit(reply, r)
        }
        Cmd::Sweep {
            now,
            to_expire,
            to_purge,
            audit,
            reply,
        } => {
            let r = sweep(tx, staged, now, to_expire, to_purge, &audit, effects);
            Pending::Sweep(reply, r)
        }
        Cmd::GetDocument { name, reply } => {
            let r = tx
                .query_row(
                    "SELECT version, value FROM meta WHERE name = ?1",
                    params![name],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()
                .map_err(backend)
                .map(|o| o.map(|(v, d)| (v.max(0) as u64, d)));
            Pending::GetDocument(reply, r)
        }
        Cmd::PutDocument {
            name,
            expected,
            doc,
            reply,
        } => {
            let r = match expected {
                None => tx.execute(
                    "INSERT INTO meta (name, version, value) VALUES (?1, 1, ?2)
                     ON CONFLICT (name) DO NOTHING",
                    params![name, doc],
                ),
                Some(v) => tx.execute(
                    "UPDATE meta SET version = version + 1, value = ?3
                     WHERE name = ?1 AND version = ?2",
                    params![name, v as i64, doc],
                ),
            }
            .map(|n| n == 1)
            .map_err(backend);
            Pending::PutDocument(reply, r)
        }
        Cmd::AppendEvents { events, reply } => {
            let r = write_events(tx, &events);
            Pending::Unit(reply, r)
        }
        Cmd::PurgeEvents { before, reply } => {
            let r = (|| {
                let ms = before.as_millis();
                let mut n = tx
                    .execute("DELETE FROM events WHERE at < ?1", params![ms])
                    .map_err(backend)? as u64;
                n += tx
                    .execute("DELETE FROM devices WHERE last_seen_at < ?1", params![ms])
                    .map_err(backend)? as u64;
                n += tx
                    .execute(
                        "DELETE FROM deliveries WHERE state <> 'pending' AND updated_at < ?1",
                        params![ms],
                    )
                    .map_err(backend)? as u64;
                Ok(n)
            })();
            Pending::Count(reply, r)
        }
        Cmd::FanOut {
            events,
            deliveries,
            reply,
        } => {
            let r = (|| {
                let mut done = tx
                    .prepare_cached("UPDATE events SET pending = 0 WHERE id = ?1")
                    .map_err(backend)?;
                for id in &events {
                    done.execute(params![id]).map_err(backend)?;
                }
                for d in &deliveries {
                    put_delivery(tx, d)?;
                }
                Ok(())
            })();
            Pending::Unit(reply, r)
        }
        Cmd::PutDelivery { delivery, reply } => {
            let r = put_delivery(tx, &delivery);
            Pending::Unit(reply, r)
        }
        Cmd::Flush { reply } | Cmd::Ping { reply } => {
            let r = tx.query_row("SELECT 1", [], |_| Ok(())).map_err(backend);
            Pending::Unit(reply, r)
        }
    }
}

fn write_events(tx: &rusqlite::Transaction<'_>, events: &[Event]) -> Result<(), StoreError> {
    let mut st = tx
        .prepare_cached(
            "INSERT INTO events (id, at, type, tenant, user_id, handle, pending, doc)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(backend)?;
    for e in events {
        st.execute(params![
            e.id,
            e.at.as_millis(),
            e.kind.as_str(),
            e.tenant.as_str(),
            e.user_id.as_ref().map(UserId::as_str),
            e.handle.as_ref().map(SessionHandle::as_str),
            i64::from(e.deliver),
            e.to_json(),
        ])
        .map_err(backend)?;
    }
    Ok(())
}

/// Writes an operation's events in the batch; they reach the operation once committed.
fn record_events(
    tx: &rusqlite::Transaction<'_>,
    audit: &Audit,
    events: Vec<Event>,
    effects: &mut Vec<Effect>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    write_events(tx, &events)?;
    effects.push(Effect::Committed(audit.clone(), events));
    Ok(())
}

/// Whether the session's device is new for its user (`None`: no device known), remembering it.
fn known_device(
    tx: &rusqlite::Transaction<'_>,
    rec: &SessionRecord,
    now: Timestamp,
) -> Result<Option<bool>, StoreError> {
    let Some(id) = device_id(rec) else {
        return Ok(None);
    };
    let seen = tx
        .prepare_cached(
            "SELECT 1 FROM devices WHERE tenant = ?1 AND user_id = ?2 AND device_id = ?3",
        )
        .and_then(|mut st| st.exists(params![rec.tenant.as_str(), rec.user_id.as_str(), id]))
        .map_err(backend)?;
    let key = params![
        rec.tenant.as_str(),
        rec.user_id.as_str(),
        id,
        now.as_millis()
    ];
    tx.prepare_cached(
        "INSERT INTO devices (tenant, user_id, device_id, last_seen_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, user_id, device_id)
         DO UPDATE SET last_seen_at = MAX(last_seen_at, excluded.last_seen_at)",
    )
    .and_then(|mut st| st.execute(key))
    .map_err(backend)?;
    Ok(Some(!seen))
}

fn put_delivery(tx: &rusqlite::Transaction<'_>, d: &api::Delivery) -> Result<(), StoreError> {
    let doc = serde_json::to_string(d).map_err(backend)?;
    tx.prepare_cached(
        "INSERT INTO deliveries (id, webhook, state, next_at, updated_at, doc)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, next_at = excluded.next_at,
             updated_at = excluded.updated_at, doc = excluded.doc",
    )
    .and_then(|mut st| {
        st.execute(params![
            d.id,
            d.webhook,
            d.state.as_str(),
            d.next_attempt_at.map(|t| t.timestamp_millis()),
            d.updated_at.timestamp_millis(),
            doc,
        ])
    })
    .map_err(backend)?;
    Ok(())
}

fn insert_row(tx: &rusqlite::Transaction<'_>, r: &SessionRecord) -> Result<(), StoreError> {
    let r = Row::from_record(r);
    tx.prepare_cached(&format!(
        "INSERT INTO sessions ({COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20, ?21, ?22, ?23)"
    ))
    .and_then(|mut s| {
        s.execute(params![
            r.handle,
            r.token_hash,
            r.user_id,
            r.tenant,
            r.created_at,
            r.last_seen_at,
            r.remember_me,
            r.auth_method,
            r.auth_aal,
            r.authenticated_at,
            r.ip,
            r.user_agent,
            r.browser,
            r.os,
            r.data,
            r.state,
            r.revoked_reason,
            r.ended_at,
            r.refresh,
            r.flags,
            r.expires_at,
            r.idle_timeout_s,
            r.rotations,
        ])
    })
    .map_err(backend)?;
    Ok(())
}

fn flush_dirty(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    effects: &mut Vec<Effect>,
) -> Result<(), StoreError> {
    let dirty = std::mem::take(&mut *shared.dirty.lock());
    if dirty.is_empty() {
        return Ok(());
    }
    let mut stmt = tx
        .prepare_cached(
            "UPDATE sessions SET last_seen_at = MAX(last_seen_at, ?2) WHERE handle = ?1",
        )
        .map_err(backend)?;
    for entry in dirty {
        entry.dirty.store(false, Ordering::Release);
        let ms = entry.last_seen.load(Ordering::Acquire);
        let handle = entry.record.read().handle.clone();
        stmt.execute(params![handle.as_str(), ms])
            .map_err(backend)?;
        effects.push(Effect::Persisted(entry, ms));
    }
    Ok(())
}

/// Sessions a sweep should look at: timed out but still marked active (with when they expired),
/// and ended before `now - retention_s`. Runs outside the writer, over the concurrent maps, so a
/// scan of millions of sessions neither stalls verification nor holds up writes.
fn scan(
    shared: &Shared,
    now: Timestamp,
    retention_s: u64,
) -> (Vec<(SessionHandle, Timestamp)>, Vec<SessionHandle>) {
    let cutoff = now.minus_secs(retention_s);
    let mut to_expire = Vec::new();
    let mut to_purge = Vec::new();
    for item in shared.by_handle.iter() {
        if to_expire.len() >= SWEEP_CHUNK && to_purge.len() >= SWEEP_CHUNK {
            break;
        }
        let snap = item.value().snapshot();
        let policy = shared.policy_for(&snap.record.tenant);
        let ended = match (
            &snap.record.state,
            session::liveness(&snap.record, snap.last_seen_at, &policy, now),
        ) {
            (_, Liveness::Active) => continue,
            // Timed out: marked expired now, purged by a later sweep once past the retention.
            (StoredState::Active, Liveness::Expired(at)) => {
                if to_expire.len() < SWEEP_CHUNK {
                    to_expire.push((snap.record.handle.clone(), at));
                }
                continue;
            }
            (StoredState::Revoked { at, .. } | StoredState::Expired { at }, _) => *at,
            (StoredState::Active, Liveness::Revoked(_)) => continue,
        };
        if ended < cutoff && to_purge.len() < SWEEP_CHUNK {
            to_purge.push(snap.record.handle.clone());
        }
    }
    (to_expire, to_purge)
}

/// Applies a sweep's candidates, re-checking each as this batch sees it.
fn sweep(
    tx: &rusqlite::Transaction<'_>,
    staged: &mut Staged<'_>,
    now: Timestamp,
    to_expire: Vec<(SessionHandle, Timestamp)>,
    to_purge: Vec<SessionHandle>,
    audit: &Audit,
    effects: &mut Vec<Effect>,
) -> Result<SweepReport, StoreError> {
    let mut report = SweepReport::default();
    let mut events = Vec::new();
    for (h, at) in to_expire {
        // Re-check as this batch sees it: it may have been used or changed since the scan.
        let Some((e, mut rec, ls)) = staged.get(&h) else {
            continue;
        };
        if rec.state != StoredState::Active || is_live(staged, &rec, ls, now) {
            continue;
        }
        rec.last_seen_at = ls;
        rec.state = StoredState::Expired { at };
        write_state(tx, &rec)?;
        events.push(audit.session_event(EventKind::SessionExpired, at, &rec, None));
        report.expired.push(ExpiredSession {
            handle: rec.handle.clone(),
            user_id: rec.user_id.clone(),
            tenant: rec.tenant.clone(),
            at,
        });
        staged.put(e, rec, effects);
    }
    record_events(tx, audit, events, effects)?;
    let mut del = tx
        .prepare_cached("DELETE FROM sessions WHERE handle = ?1")
        .map_err(backend)?;
    for h in to_purge {
        if del.execute(params![h.as_str()]).map_err(backend)? == 0 {
            continue; // purged by an earlier sweep
        }
        staged.overlay.insert(h.clone(), None);
        effects.push(Effect::Unindex(h));
        report.purged += 1;
    }
    Ok(report)
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn insert(
        &self,
        record: SessionRecord,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError> {
        self.shared.check()?;
        self.call(|reply| Cmd::Insert {
            rec: Box::new(record),
            now,
            audit: audit.clone(),
            reply,
        })
        .await
    }

    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError> {
        self.shared.check()?;
        Ok(self.shared.by_token.get(hash).map(|e| e.snapshot()))
    }

    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError> {
        self.shared.check()?;
        Ok(self.shared.by_handle.get(handle).map(|e| e.snapshot()))
    }

    async fn find_by_token_with_policy(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<(StoredSession, Arc<Policy>)>, StoreError> {
        self.shared.check()?;
        let Some(found) = self.shared.by_token.get(hash).map(|e| e.snapshot()) else {
            return Ok(None);
        };
        let policy = self.shared.policy_for(&found.record.tenant);
        Ok(Some((found, policy)))
    }

    async fn touch(
        &self,
        session: &StoredSession,
        _policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.shared.check()?;
        let Some(entry) = self
            .shared
            .by_handle
            .get(&session.record.handle)
            .map(|e| e.clone())
        else {
            return Ok(());
        };
        let ms = at.as_millis();
        entry.last_seen.fetch_max(ms, Ordering::AcqRel);
        if ms - entry.persisted.load(Ordering::Acquire) >= TOUCH_GRANULARITY_MS
            && !entry.dirty.swap(true, Ordering::AcqRel)
        {
            self.shared.dirty.lock().push(entry);
        }
        Ok(())
    }

    async fn rotate(
        &self,
        handle: &SessionHandle,
        change: &Rekey,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<RotateOutcome, StoreError> {
        self.shared.check()?;
        let (handle, change) = (handle.clone(), Box::new(change.clone()));
        self.call(|reply| Cmd::Rotate {
            handle,
            change,
            now,
            audit: audit.clone(),
            reply,
        })
        .await
    }

    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError> {
        self.shared.check()?;
        let handle = handle.clone();
        self.call(|reply| Cmd::Revoke {
            handle,
            reason: reason.into(),
            now,
            audit: audit.clone(),
            reply,
        })
        .await
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
        self.shared.check()?;
        let (user, tenant, except) = (user_id.clone(), tenant.cloned(), except.cloned());
        self.call(|reply| Cmd::RevokeUser {
            user,
            tenant,
            except,
            reason: reason.into(),
            now,
            audit: audit.clone(),
            reply,
        })
        .await
    }

    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<DataUpdate, StoreError> {
        self.shared.check()?;
        let (handle, patch) = (handle.clone(), patch.clone());
        self.call(|reply| Cmd::UpdateData {
            handle,
            patch,
            limit,
            now,
            audit: audit.clone(),
            reply,
        })
        .await
    }

    async fn list_user(
        &self,
        q: &ListQuery,
        now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError> {
        self.shared.check()?;
        let mut found: Vec<StoredSession> = self
            .shared
            .user_entries(&q.user_id)
            .iter()
            .map(|e| e.snapshot())
            .filter(|s| q.tenant.as_ref().is_none_or(|t| t == &s.record.tenant))
            .filter(|s| {
                q.include_ended || {
                    let policy = self.shared.policy_for(&s.record.tenant);
                    session::liveness(&s.record, s.last_seen_at, &policy, now) == Liveness::Active
                }
            })
            .collect();
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
        Ok(self.shared.policy_for(tenant))
    }

    async fn put_policy(
        &self,
        tenant: &TenantId,
        policy: Policy,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<(), StoreError> {
        self.shared.check()?;
        let tenant = tenant.clone();
        self.call(|reply| Cmd::PutPolicy {
            tenant,
            policy,
            now,
            audit: audit.clone(),
            reply,
        })
        .await
    }

    async fn sweep(
        &self,
        now: Timestamp,
        retention_s: u64,
        audit: &Audit,
    ) -> Result<SweepReport, StoreError> {
        self.shared.check()?;
        let shared = self.shared.clone();
        let (to_expire, to_purge) =
            tokio::task::spawn_blocking(move || scan(&shared, now, retention_s))
                .await
                .map_err(|e| StoreError::Backend(format!("sweep scan failed: {e}")))?;
        if to_expire.is_empty() && to_purge.is_empty() {
            return Ok(SweepReport::default());
        }
        self.call(|reply| Cmd::Sweep {
            now,
            to_expire,
            to_purge,
            audit: audit.clone(),
            reply,
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.call(|reply| Cmd::Flush { reply }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.shared.check()?;
        self.call(|reply| Cmd::Ping { reply }).await
    }

    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError> {
        self.shared.check()?;
        let name = name.to_owned();
        self.call(|reply| Cmd::GetDocument { name, reply }).await
    }

    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError> {
        self.shared.check()?;
        let (name, doc) = (name.to_owned(), doc.to_owned());
        self.call(|reply| Cmd::PutDocument {
            name,
            expected,
            doc,
            reply,
        })
        .await
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        self.shared.check()?;
        let events = events.to_vec();
        self.call(|reply| Cmd::AppendEvents { events, reply }).await
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<api::Event>, StoreError> {
        let q = query.clone();
        self.read(move |c| {
            let mut sql = String::from("SELECT doc FROM events WHERE 1 = 1");
            let mut args: Vec<SqlValue> = Vec::new();
            let mut arg = |sql: &mut String, cond: &str, v: SqlValue| {
                args.push(v);
                sql.push_str(&cond.replace('?', &format!("?{}", args.len())));
            };
            if let Some(u) = &q.user_id {
                arg(&mut sql, " AND user_id = ?", u.as_str().to_owned().into());
            }
            if let Some(h) = &q.handle {
                arg(&mut sql, " AND handle = ?", h.as_str().to_owned().into());
            }
            if let Some(t) = &q.event_type {
                arg(&mut sql, " AND type = ?", t.clone().into());
            }
            if let Some(t) = q.since {
                arg(&mut sql, " AND at >= ?", t.as_millis().into());
            }
            if let Some(t) = q.until {
                arg(&mut sql, " AND at < ?", t.as_millis().into());
            }
            if let Some(b) = &q.before_id {
                arg(&mut sql, " AND id < ?", b.clone().into());
            }
            arg(
                &mut sql,
                " ORDER BY id DESC LIMIT ?",
                (q.limit.min(10_000) as i64).into(),
            );
            query_docs(c, &sql, args)
        })
        .await
    }

    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.shared.check()?;
        self.call(|reply| Cmd::PurgeEvents { before, reply }).await
    }

    async fn pending_events(&self, limit: usize) -> Result<Vec<api::Event>, StoreError> {
        self.read(move |c| {
            query_docs(
                c,
                "SELECT doc FROM events WHERE pending = 1 ORDER BY id LIMIT ?1",
                vec![(limit.min(10_000) as i64).into()],
            )
        })
        .await
    }

    async fn fan_out(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError> {
        self.shared.check()?;
        let (events, deliveries) = (events.to_vec(), deliveries.to_vec());
        self.call(|reply| Cmd::FanOut {
            events,
            deliveries,
            reply,
        })
        .await
    }

    async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<api::Delivery>, StoreError> {
        self.read(move |c| {
            query_docs(
                c,
                "SELECT doc FROM deliveries WHERE state = 'pending' AND next_at <= ?1
                 ORDER BY next_at, id LIMIT ?2",
                vec![now.as_millis().into(), (limit.min(10_000) as i64).into()],
            )
        })
        .await
    }

    async fn put_delivery(&self, delivery: &api::Delivery) -> Result<(), StoreError> {
        self.shared.check()?;
        let delivery = Box::new(delivery.clone());
        self.call(|reply| Cmd::PutDelivery { delivery, reply })
            .await
    }

    async fn active_sessions(
        &self,
        now: Timestamp,
    ) -> Result<Option<Vec<(TenantId, u64)>>, StoreError> {
        self.shared.check()?;
        let shared = self.shared.clone();
        let counts = tokio::task::spawn_blocking(move || {
            let mut counts: HashMap<TenantId, u64> = HashMap::new();
            for item in shared.by_handle.iter() {
                let snap = item.value().snapshot();
                let policy = shared.policy_for(&snap.record.tenant);
                if session::liveness(&snap.record, snap.last_seen_at, &policy, now)
                    == Liveness::Active
                {
                    *counts.entry(snap.record.tenant.clone()).or_default() += 1;
                }
            }
            counts
        })
        .await
        .map_err(|e| StoreError::Backend(format!("count failed: {e}")))?;
        Ok(Some(counts.into_iter().collect()))
    }

    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<api::Delivery>, StoreError> {
        let q = query.clone();
        self.read(move |c| {
            let mut sql = String::from("SELECT doc FROM deliveries WHERE webhook = ?1");
            let mut args: Vec<SqlValue> = vec![q.webhook.clone().into()];
            if let Some(st) = q.state {
                args.push(st.as_str().to_owned().into());
                sql.push_str(&format!(" AND state = ?{}", args.len()));
            }
            if let Some(b) = &q.before_id {
                args.push(b.clone().into());
                sql.push_str(&format!(" AND id < ?{}", args.len()));
            }
            args.push((q.limit.min(10_000) as i64).into());
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
            query_docs(c, &sql, args)
        })
        .await
    }
}

/// Runs a query whose one column is a JSON document, and parses each.
fn query_docs<T: serde::de::DeserializeOwned>(
    c: &Connection,
    sql: &str,
    args: Vec<SqlValue>,
) -> Result<Vec<T>, StoreError> {
    let mut st = c.prepare_cached(sql).map_err(backend)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(serde_json::from_str(&row.map_err(backend)?).map_err(backend)?);
    }
    Ok(out)
}
