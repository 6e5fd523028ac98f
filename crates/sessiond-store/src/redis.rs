//! The Redis store, on one Redis server or a Redis Cluster, for several stateless nodes.
//!
//! Keys (under a configurable prefix `P`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{u:TAG}:s:HANDLE` | hash | `row` (the session, JSON) and `seen` (latest use, ms) |
//! | `P:{u:TAG}:idx` | set | the user's session handles |
//! | `P:{u:TAG}:ev` | stream | the user's events: `id` (event id) and `doc` (JSON), at most about 10 000 |
//! | `P:{u:TAG}:dev` | sorted set | `TENANT DEVICE_ID` of the user's known devices, by last sign-in (ms) |
//! | `P:t:HASHHEX` | string | `TAG HANDLE`: token hash → session |
//! | `P:h:HANDLE` | string | `TAG`: handle → the user's slot |
//! | `P:policy:TENANT` | string | a tenant's policy document |
//! | `P:keyring`, `P:doc:NAME` | hash | `v` (version) and `doc`: the keyring and the other named documents |
//! | `P:{sweep}:due`, `P:{sweep}:ended` | sorted sets | sessions by next possible expiry, and by end time |
//! | `P:{ev}:all` | stream | every event: `id` and `doc` |
//! | `P:{ev}:pending`, `P:{ev}:pending:doc` | sorted set, hash | the webhook outbox: event ids (by id), and their JSON |
//! | `P:{ev}:d` | hash | delivery id → the delivery (JSON) |
//! | `P:{ev}:due` | sorted set | pending deliveries by next attempt (ms) |
//! | `P:{ev}:fin` | sorted set | delivered and dead deliveries by last change (ms), for the retention |
//! | `P:{ev}:w:WEBHOOK` | sorted set | a webhook's delivery ids (score 0: in id order) |
//!
//! `TAG` is a digest of the user id, so every key of one user shares a hash slot: the limit and
//! force logout are atomic in one Lua script even on a cluster. Every decision is made in Rust
//! with the core's rules, exactly as on the other stores; Redis applies it with an atomic
//! multi-key compare-and-set in the user's slot, retried when another node changed the user's
//! sessions meanwhile. The token and handle keys live in other slots and are only pointers:
//! verify always checks the token hash in the session itself, so a stale pointer never
//! authenticates anything. No command scans the keyspace.
//!
//! Expiry: every key carries a native TTL (absolute expiry plus the retention), refreshed on
//! use; `sweep` additionally marks timed-out sessions expired and purges ended ones after the
//! retention, from the two sorted sets. Last-seen writes are batched per node, written at once
//! when another node could otherwise see the session idle-expire first.
//!
//! Events: a session's events are appended to its user's stream by the same compare-and-set that
//! makes the change, so the user's log is exact: a change is never stored without its events, and a
//! refused change records none. Right after that script succeeded, the events are also appended to
//! the global stream (what `GET /v1/events` without a user reads) and, when they go to webhooks, to
//! the outbox; all global event and webhook keys share the hash tag `{ev}`, so fanning out and
//! updating deliveries is one atomic script. On a cluster that second write is in another slot and
//! not atomic with the change: a crash of this node (or an error from the `{ev}` slot's node)
//! between the two loses the event from the global feed and the outbox, never from the user's log.
//! Policy updates and events that change nothing else (`auth.failed`) have no user slot and are
//! written to the global keys only (events of a user also to the user's stream); a policy's
//! `policy.updated` is written right after the policy itself, which lives in another slot. Event
//! retention: `purge_events` trims the global stream from the oldest entry, trims the streams of
//! the users whose events it removed the same way, drops outbox entries and finished deliveries
//! older than the cutoff; besides, a user's stream and device set expire (key TTL) one retention
//! after the user's last event or sign-in.
//!
//! New devices: `insert` reads the user's device set before its compare-and-set (which then
//! records the device), so two sessions created at the same moment from the same new device
//! may both be reported as a new device; never the other way round.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value as RedisValue};
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
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::cache::Subscriber;
use crate::row::{Row, no_intern};

/// Options of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]`, `rediss://...` (TLS), or
    /// `redis+cluster://HOST:PORT,HOST:PORT,...` (`rediss+cluster://` for TLS).
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// The policy of tenants that have none stored.
    pub default_policy: Policy,
    /// How often batched last-seen times are written.
    pub flush_interval: Duration,
    /// How long ended sessions stay before they are purged (also added to every key's TTL).
    pub retention: Duration,
    /// Connection and response timeout: past it, the store counts as unavailable.
    pub timeout: Duration,
}

impl RedisOptions {
    /// Options for `url` with the defaults.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: "sd".to_owned(),
            default_policy: Policy::default(),
            flush_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Most sessions one sweep looks at, per sorted set.
const SWEEP_CHUNK: isize = 10_000;
/// Attempts of an optimistic change before giving up with a conflict.
const CAS_ATTEMPTS: usize = 32;
/// Stream entries read per command when listing or purging events.
const EVENT_PAGE: usize = 500;
/// Deliveries or outbox entries handled per command.
const DELIVERY_PAGE: usize = 500;
/// Most entries a query answers (as on the other stores).
const MAX_LIMIT: usize = 10_000;

/// Atomic compare-and-set over keys of one slot. ARGV: the number of checks, then per check
/// its kind (`r`: the `row` field of a session hash, `m`: the sorted members of a set) and the
/// expected text (`''` for missing); then the number of writes, then per write: op, index of
/// its key, value, TTL in ms. Answers 1 if applied, 0 if a check failed (nothing written).
///
/// Ops: `row` sets a session's row; `sadd`, `srem` change a set; `del` deletes a key; `xadd`
/// appends `ID DOC` (an event) to a stream capped at about 10 000 entries; `dev` records
/// `MS MEMBER` (a device seen at MS) in a sorted set and drops members older than MS - TTL;
/// `pub` publishes `CHANNEL MESSAGE` (no key: its index is 0), so the change feed announces the
/// change atomically with it. The TTL of `sadd`, `xadd` and `dev` keys only grows.
const CAS_LUA: &str = r"
local n = tonumber(ARGV[1])
local a = 2
for i = 1, n do
  local kind, exp = ARGV[a], ARGV[a + 1]
  a = a + 2
  local cur
  if kind == 'r' then
    cur = redis.call('HGET', KEYS[i], 'row') or ''
  else
    local m = redis.call('SMEMBERS', KEYS[i])
    table.sort(m)
    cur = table.concat(m, ' ')
  end
  if cur ~= exp then return 0 end
end
local w = tonumber(ARGV[a])
a = a + 1
for j = 1, w do
  local op, k, x, ttl = ARGV[a], KEYS[tonumber(ARGV[a + 1])], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  if op == 'row' then
    redis.call('HSET', k, 'row', x)
    redis.call('PEXPIRE', k, ttl)
  elseif op == 'sadd' then
    redis.call('SADD', k, x)
    if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  elseif op == 'srem' then
    redis.call('SREM', k, x)
  elseif op == 'del' then
    redis.call('DEL', k)
  elseif op == 'xadd' then
    local sp = string.find(x, ' ', 1, true)
    redis.call('XADD', k, 'MAXLEN', '~', 10000, '*',
      'id', string.sub(x, 1, sp - 1), 'doc', string.sub(x, sp + 1))
    if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  elseif op == 'pub' then
    local sp = string.find(x, ' ', 1, true)
    redis.call('PUBLISH', string.sub(x, 1, sp - 1), string.sub(x, sp + 1))
  elseif op == 'dev' then
    local sp = string.find(x, ' ', 1, true)
    local at, m = string.sub(x, 1, sp - 1), string.sub(x, sp + 1)
    local cur = redis.call('ZSCORE', k, m)
    if not cur or tonumber(cur) < tonumber(at) then redis.call('ZADD', k, at, m) end
    redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. string.format('%d', tonumber(at) - ttl))
    if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  end
end
return 1
";

/// Stores a tenant's policy and announces it on the change feed. KEYS: the policy. ARGV: the
/// document, the channel.
const POLICY_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], '*')
return 1
";

/// Appends events to the global stream and, those to deliver, to the outbox. KEYS: the global
/// stream, the outbox ids, the outbox documents. ARGV: per event its id, JSON and `1` to deliver.
const PUBLISH_LUA: &str = r"
for i = 1, #ARGV, 3 do
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'doc', ARGV[i + 1])
  if ARGV[i + 2] == '1' then
    redis.call('ZADD', KEYS[2], 0, ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return 1
";

/// Takes events out of the outbox and stores deliveries, atomically. KEYS: the outbox ids, the
/// outbox documents, the deliveries hash, the due set, the finished set, then the webhooks'
/// indexes. ARGV: the number of events, their ids, then per delivery: id, JSON, index of its
/// webhook's key, state, next attempt (ms, `''` for none), last change (ms).
const DELIVERIES_LUA: &str = r"
local n = tonumber(ARGV[1])
local a = 2
for i = 1, n do
  redis.call('ZREM', KEYS[1], ARGV[a])
  redis.call('HDEL', KEYS[2], ARGV[a])
  a = a + 1
end
while a <= #ARGV do
  local id, doc, w, state, nxt, upd =
    ARGV[a], ARGV[a + 1], KEYS[tonumber(ARGV[a + 2])], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  a = a + 6
  redis.call('HSET', KEYS[3], id, doc)
  redis.call('ZADD', w, 0, id)
  if state == 'pending' and nxt ~= '' then
    redis.call('ZADD', KEYS[4], nxt, id)
  else
    redis.call('ZREM', KEYS[4], id)
  end
  if state == 'pending' then
    redis.call('ZREM', KEYS[5], id)
  else
    redis.call('ZADD', KEYS[5], upd, id)
  end
end
return 1
";

/// Deletes finished deliveries that have not changed since before the cutoff. KEYS: the
/// deliveries hash, the finished set, then the webhooks' indexes. ARGV: the cutoff (ms), then
/// per delivery its id and the index of its webhook's key (`0` if unknown). Answers how many.
const PURGE_DELIVERIES_LUA: &str = r"
local cutoff = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local s = redis.call('ZSCORE', KEYS[2], id)
  if s and tonumber(s) < cutoff then
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    local w = tonumber(ARGV[i + 1])
    if w > 0 then redis.call('ZREM', KEYS[w], id) end
    n = n + 1
  end
end
return n
";

/// Drops outbox entries whose id is below a bound (event ids begin with their time). KEYS: the
/// outbox ids, the outbox documents. ARGV: the exclusive bound, the most to drop. Answers how
/// many.
const PURGE_OUTBOX_LUA: &str = r"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], '-', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
return #ids
";

/// Compare-and-set of a document hash. ARGV: the expected version (`''` for none), the document.
const DOC_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if v then return 0 end
  redis.call('HSET', KEYS[1], 'v', 1, 'doc', ARGV[2])
  return 1
end
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(v) + 1, 'doc', ARGV[2])
return 1
";

/// Records a use: `seen` never moves backwards, the TTL only grows, and a purged session is
/// not brought back.
const TOUCH_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local c = tonumber(redis.call('HGET', KEYS[1], 'seen') or '0')
if tonumber(ARGV[1]) > c then redis.call('HSET', KEYS[1], 'seen', ARGV[1]) end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// A connection to one server or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, RedisValue> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<RedisValue>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Target {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

struct Inner {
    target: Target,
    /// Where the change feed subscribes: the server, or each node of a cluster in turn.
    feed_urls: Vec<String>,
    conn: OnceCell<Conn>,
    timeout: Duration,
    prefix: String,
    default_policy: Arc<Policy>,
    retention_ms: i64,
    flush_ms: i64,
    /// Uses not yet written: handle → (user tag, last seen ms, TTL ms, next due ms).
    pending: Mutex<HashMap<SessionHandle, Pending>>,
    cas: Script,
    touch: Script,
    doc: Script,
    publish: Script,
    put_policy: Script,
    deliveries: Script,
    purge_deliveries: Script,
    purge_outbox: Script,
}

#[derive(Debug, Clone)]
struct Pending {
    tag: String,
    seen: i64,
    ttl: i64,
    due: i64,
}

/// The Redis store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// The sweeper's sorted sets share a hash tag, so they can be changed in one pipeline.
fn sweep_key(prefix: &str) -> String {
    format!("{prefix}:{{sweep}}:due")
}

fn err(e: RedisError) -> StoreError {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The hash-slot tag of a user: a digest, so that any user id makes a valid tag.
fn tag(user: &UserId) -> String {
    tag_of(user.as_str())
}

fn tag_of(user: &str) -> String {
    hex(&Sha256::digest(user.as_bytes())[..12])
}

/// A document's name: 1 to 64 of lowercase letters, digits, `_` and `-`.
fn check_doc_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "invalid document name {name:?}: 1 to 64 of a-z 0-9 _ -"
        )))
    }
}

/// An entry of an event stream: its stream id and the event.
type StreamEntry = (String, Vec<String>);

/// The event of a stream entry (fields `id` and `doc`).
fn entry_event(fields: &[String]) -> Result<api::Event, StoreError> {
    let doc = fields
        .chunks(2)
        .find(|kv| kv.first().is_some_and(|k| k == "doc"))
        .and_then(|kv| kv.get(1))
        .ok_or_else(|| StoreError::Backend("stored event without a document".into()))?;
    serde_json::from_str(doc).map_err(|e| StoreError::Backend(format!("stored event: {e}")))
}

/// The stream id just before `id` (`MS-SEQ`), for an exclusive range; `None` before `0-0`.
fn stream_id_before(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    match (ms, seq) {
        (0, 0) => None,
        (ms, 0) => Some(format!("{}-{}", ms - 1, u64::MAX)),
        (ms, seq) => Some(format!("{ms}-{}", seq - 1)),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(e.to_string()))
}

fn parse_doc<T: serde::de::DeserializeOwned>(what: &str, doc: &str) -> Result<T, StoreError> {
    serde_json::from_str(doc).map_err(|e| StoreError::Backend(format!("stored {what}: {e}")))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// A session as read, with the text of its row (what a compare-and-set checks against).
#[derive(Debug, Clone)]
struct Loaded {
    tag: String,
    row_text: String,
    session: StoredSession,
}

/// Sessions a change ended: handle and end time (ms), for the sweeper's sets.
type Ended = Vec<(String, i64)>;

/// One atomic change in a user's slot.
#[derive(Default)]
struct Cas {
    keys: Vec<String>,
    checks: Vec<(String, String)>,
    writes: Vec<(String, usize, String, i64)>,
}

impl Cas {
    fn key(&mut self, k: String) -> usize {
        if let Some(i) = self.keys.iter().position(|x| x == &k) {
            return i + 1;
        }
        self.keys.push(k);
        self.keys.len()
    }

    /// Checks must come first: their keys are KEYS[1..n] in order.
    fn check_row(&mut self, k: String, expected: &str) {
        debug_assert!(self.writes.is_empty());
        self.keys.push(k);
        self.checks.push(("r".into(), expected.to_owned()));
    }

    fn check_members(&mut self, k: String, members: &[String]) {
        debug_assert!(self.writes.is_empty());
        let mut m = members.to_vec();
        m.sort();
        self.keys.push(k);
        self.checks.push(("m".into(), m.join(" ")));
    }

    fn write(&mut self, op: &str, k: String, value: String, ttl: i64) {
        let i = self.key(k);
        self.writes.push((op.to_owned(), i, value, ttl.max(1000)));
    }

    /// Announces a change of a session on the change feed, atomically with the change.
    fn announce(&mut self, channel: &str, handle: &str) {
        self.writes
            .push(("pub".to_owned(), 0, format!("{channel} {handle}"), 1000));
    }

    /// Appends events to a user's stream, keeping it at least `ttl` ms.
    fn events(&mut self, k: &str, events: &[Event], ttl: i64) {
        for e in events {
            self.write(
                "xadd",
                k.to_owned(),
                format!("{} {}", e.id, e.to_json()),
                ttl,
            );
        }
    }
}

impl RedisStore {
    /// Prepares the store. Connections are made on first use (and remade after failures), so a
    /// node can start while Redis is down and report itself not ready.
    pub fn connect(opts: RedisOptions) -> Result<Self, StoreError> {
        let bad = |e: RedisError| StoreError::Backend(format!("invalid Redis URL: {e}"));
        let (target, feed_urls) = if let Some(rest) = opts
            .url
            .strip_prefix("redis+cluster://")
            .map(|r| ("redis", r))
            .or_else(|| {
                opts.url
                    .strip_prefix("rediss+cluster://")
                    .map(|r| ("rediss", r))
            }) {
            let (scheme, nodes) = rest;
            let (auth, hosts) = match nodes.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, nodes),
            };
            let urls: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| match auth {
                    Some(a) => format!("{scheme}://{a}@{h}"),
                    None => format!("{scheme}://{h}"),
                })
                .collect();
            if urls.is_empty() {
                return Err(StoreError::Backend(
                    "redis+cluster:// needs at least one node".into(),
                ));
            }
            let client = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(opts.timeout)
                .response_timeout(opts.timeout)
                .retries(2)
                .build()
                .map_err(bad)?;
            (Target::Cluster(Box::new(client)), urls)
        } else {
            (
                Target::Single(Box::new(
                    redis::Client::open(opts.url.as_str()).map_err(bad)?,
                )),
                vec![opts.url.clone()],
            )
        };
        if opts.prefix.is_empty()
            || opts.prefix.len() > 64
            || !opts
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        {
            return Err(StoreError::Backend(
                "Redis key prefix: 1 to 64 of A-Z a-z 0-9 _ - . :".into(),
            ));
        }
        let inner = Arc::new(Inner {
            target,
            feed_urls,
            conn: OnceCell::new(),
            timeout: opts.timeout,
            prefix: opts.prefix,
            default_policy: Arc::new(opts.default_policy),
            retention_ms: ms(opts.retention),
            flush_ms: ms(opts.flush_interval),
            pending: Mutex::new(HashMap::new()),
            cas: Script::new(CAS_LUA),
            touch: Script::new(TOUCH_LUA),
            doc: Script::new(DOC_LUA),
            publish: Script::new(PUBLISH_LUA),
            put_policy: Script::new(POLICY_LUA),
            deliveries: Script::new(DELIVERIES_LUA),
            purge_deliveries: Script::new(PURGE_DELIVERIES_LUA),
            purge_outbox: Script::new(PURGE_OUTBOX_LUA),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&inner), opts.flush_interval));
        Ok(Self { inner })
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        conn(&self.inner).await
    }

    fn rec_key(&self, tag: &str, handle: &str) -> String {
        format!("{}:{{u:{tag}}}:s:{handle}", self.inner.prefix)
    }

    fn idx_key(&self, tag: &str) -> String {
        format!("{}:{{u:{tag}}}:idx", self.inner.prefix)
    }

    fn tok_key(&self, hash: &TokenHash) -> String {
        format!("{}:t:{}", self.inner.prefix, hex(hash.as_bytes()))
    }

    fn handle_key(&self, handle: &str) -> String {
        format!("{}:h:{handle}", self.inner.prefix)
    }

    fn user_events_key(&self, tag: &str) -> String {
        format!("{}:{{u:{tag}}}:ev", self.inner.prefix)
    }

    fn devices_key(&self, tag: &str) -> String {
        format!("{}:{{u:{tag}}}:dev", self.inner.prefix)
    }

    /// A global event or webhook key: all share the hash tag `{ev}`.
    fn ev_key(&self, name: &str) -> String {
        format!("{}:{{ev}}:{name}", self.inner.prefix)
    }

    fn webhook_key(&self, webhook: &str) -> String {
        format!("{}:{{ev}}:w:{webhook}", self.inner.prefix)
    }

    /// The key of a named document; the keyring keeps its historical key.
    fn doc_key(&self, name: &str) -> Result<String, StoreError> {
        check_doc_name(name)?;
        Ok(if name == "keyring" {
            format!("{}:keyring", self.inner.prefix)
        } else {
            format!("{}:doc:{name}", self.inner.prefix)
        })
    }

    fn policy_key(&self, tenant: &str) -> String {
        format!("{}:policy:{tenant}", self.inner.prefix)
    }

    fn sweep_key(&self) -> String {
        sweep_key(&self.inner.prefix)
    }

    /// The change feed's channel (see [`crate::cache`]).
    fn feed_channel(&self) -> String {
        format!("{}:changes", self.inner.prefix)
    }

    /// The change feed of this store's prefix (see [`crate::cache`]): a subscription to the
    /// channel that every change of a session and of a policy is published on, atomically with
    /// it. On a cluster, a `PUBLISH` reaches every node, so one subscription (to the first node
    /// of the URL that answers, the next one after a failure) hears every change.
    pub fn change_feed(&self) -> Arc<dyn Subscriber> {
        Arc::new(RedisFeed {
            store: self.clone(),
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn ended_key(&self) -> String {
        format!("{}:{{sweep}}:ended", self.inner.prefix)
    }

    /// Sets or deletes keys that may lie in different slots, one command each.
    async fn each(&self, c: &mut Conn, cmds: Vec<Cmd>) -> Result<(), StoreError> {
        for cmd in cmds {
            let _: RedisValue = cmd.query_async(c).await.map_err(err)?;
        }
        Ok(())
    }

    /// TTL of a session's keys at `now`: to its absolute expiry, plus the retention.
    fn ttl(&self, rec: &SessionRecord, policy: &Policy, now: Timestamp) -> i64 {
        let (_, absolute) = session::expiries(rec, rec.last_seen_at, policy);
        let end = match rec.state {
            StoredState::Active => absolute,
            StoredState::Revoked { at, .. } | StoredState::Expired { at } => at.min(absolute),
        };
        (end.as_millis() - now.as_millis())
            .saturating_add(self.inner.retention_ms)
            .max(1000)
    }

    /// When the session could next be found timed out (for the sweeper).
    fn due(rec: &SessionRecord, last_seen: Timestamp, policy: &Policy) -> i64 {
        let (idle, absolute) = session::expiries(rec, last_seen, policy);
        idle.min(absolute).as_millis()
    }

    fn parse(
        &self,
        tag: &str,
        row: Option<String>,
        seen: Option<i64>,
    ) -> Result<Option<Loaded>, StoreError> {
        let Some(row_text) = row else { return Ok(None) };
        let row: Row = serde_json::from_str(&row_text)
            .map_err(|e| StoreError::Backend(format!("stored session: {e}")))?;
        let mut rec = row.into_record(no_intern)?;
        // The record's last seen is what is stored, as every node sees it.
        if let Some(s) = seen {
            rec.last_seen_at = rec.last_seen_at.max(Timestamp::from_millis(s));
        }
        let mut session = StoredSession::new(Arc::new(rec));
        if let Some(p) = self.inner.pending.lock().get(&session.record.handle) {
            session.last_seen_at = session.last_seen_at.max(Timestamp::from_millis(p.seen));
        }
        Ok(Some(Loaded {
            tag: tag.to_owned(),
            row_text,
            session,
        }))
    }

    async fn load(
        &self,
        c: &mut Conn,
        tag: &str,
        handle: &str,
    ) -> Result<Option<Loaded>, StoreError> {
        let (row, seen): (Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.rec_key(tag, handle))
            .arg("row")
            .arg("seen")
            .query_async(c)
            .await
            .map_err(err)?;
        self.parse(tag, row, seen)
    }

    async fn load_by_handle(
        &self,
        c: &mut Conn,
        handle: &SessionHandle,
    ) -> Result<Option<Loaded>, StoreError> {
        let tag: Option<String> = redis::cmd("GET")
            .arg(self.handle_key(handle.as_str()))
            .query_async(c)
            .await
            .map_err(err)?;
        match tag {
            Some(t) => self.load(c, &t, handle.as_str()).await,
            None => Ok(None),
        }
    }

    /// A user's handles and sessions, as of one read.
    async fn load_user(
        &self,
        c: &mut Conn,
        tag: &str,
    ) -> Result<(Vec<String>, Vec<Loaded>), StoreError> {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.idx_key(tag))
            .query_async(c)
            .await
            .map_err(err)?;
        if members.is_empty() {
            return Ok((members, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for h in &members {
            pipe.cmd("HMGET")
                .arg(self.rec_key(tag, h))
                .arg("row")
                .arg("seen");
        }
        let rows: Vec<(Option<String>, Option<i64>)> = pipe.query_async(c).await.map_err(err)?;
        let mut loaded = Vec::with_capacity(rows.len());
        for (row, seen) in rows {
            if let Some(l) = self.parse(tag, row, seen)? {
                loaded.push(l);
            }
        }
        Ok((members, loaded))
    }

    async fn apply(&self, c: &mut Conn, cas: &Cas) -> Result<bool, StoreError> {
        let mut inv = self.inner.cas.prepare_invoke();
        for k in &cas.keys {
            inv.key(k);
        }
        inv.arg(cas.checks.len());
        for (kind, exp) in &cas.checks {
            inv.arg(kind).arg(exp);
        }
        inv.arg(cas.writes.len());
        for (op, i, v, ttl) in &cas.writes {
            inv.arg(op).arg(i).arg(v).arg(ttl);
        }
        let applied: i64 = inv.invoke_async(c).await.map_err(err)?;
        Ok(applied == 1)
    }

    fn row_json(rec: &SessionRecord) -> Result<String, StoreError> {
        serde_json::to_string(&Row::from_record(rec))
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    async fn policy_conn(&self, c: &mut Conn, tenant: &str) -> Result<Arc<Policy>, StoreError> {
        let doc: Option<String> = redis::cmd("GET")
            .arg(self.policy_key(tenant))
            .query_async(c)
            .await
            .map_err(err)?;
        match doc {
            None => Ok(self.inner.default_policy.clone()),
            Some(d) => {
                let doc = serde_json::from_str(&d)
                    .map_err(|e| StoreError::Backend(format!("stored policy: {e}")))?;
                Policy::from_stored(doc)
                    .map(Arc::new)
                    .map_err(|e| StoreError::Backend(format!("stored policy: {e}")))
            }
        }
    }

    /// Notes the end of sessions in the sweeper's sets (best effort: the TTL is the backstop).
    async fn ended(&self, c: &mut Conn, ended: &[(String, i64)]) -> Result<(), StoreError> {
        if ended.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (h, at) in ended {
            pipe.cmd("ZREM").arg(self.sweep_key()).arg(h).ignore();
            pipe.cmd("ZADD")
                .arg(self.ended_key())
                .arg(at)
                .arg(h)
                .ignore();
        }
        let () = pipe.query_async(c).await.map_err(err)?;
        Ok(())
    }

    /// Revokes, in one atomic change, the given live sessions of one user, recording a
    /// `session.revoked` each. Answers the ended sessions (for the sweeper) and the events.
    fn revoke_writes(
        &self,
        cas: &mut Cas,
        victims: &[&Loaded],
        reason: &str,
        now: Timestamp,
        policy_of: &HashMap<String, Arc<Policy>>,
        audit: &Audit,
    ) -> Result<(Ended, Vec<Event>), StoreError> {
        let mut ended = Vec::new();
        let mut events = Vec::new();
        for v in victims {
            let mut rec = (*v.session.record).clone();
            rec.last_seen_at = v.session.last_seen_at;
            rec.state = StoredState::Revoked {
                reason: reason.into(),
                at: now,
            };
            let policy = policy_of
                .get(rec.tenant.as_str())
                .cloned()
                .unwrap_or_else(|| self.inner.default_policy.clone());
            let ttl = self.ttl(&rec, &policy, now);
            cas.write(
                "row",
                self.rec_key(&v.tag, rec.handle.as_str()),
                Self::row_json(&rec)?,
                ttl,
            );
            cas.announce(&self.feed_channel(), rec.handle.as_str());
            ended.push((rec.handle.to_string(), now.as_millis()));
            events.push(audit.session_event(EventKind::SessionRevoked, now, &rec, Some(reason)));
        }
        if let Some(v) = victims.first() {
            let key = self.user_events_key(&v.tag);
            cas.events(&key, &events, self.inner.retention_ms);
        }
        Ok((ended, events))
    }

    /// Appends events to the global stream, and those to deliver to the outbox.
    async fn publish(&self, c: &mut Conn, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut inv = self.inner.publish.prepare_invoke();
        inv.key(self.ev_key("all"))
            .key(self.ev_key("pending"))
            .key(self.ev_key("pending:doc"));
        for e in events {
            inv.arg(&e.id).arg(e.to_json()).arg(u8::from(e.deliver));
        }
        let _: i64 = inv.invoke_async(c).await.map_err(err)?;
        Ok(())
    }

    /// After a change committed with its events in the user's stream: reports the events to
    /// the operation and appends them to the global stream (and the outbox).
    async fn after_commit(
        &self,
        c: &mut Conn,
        audit: &Audit,
        events: Vec<Event>,
    ) -> Result<(), StoreError> {
        let published = self.publish(c, &events).await;
        audit.committed(events);
        published
    }

    /// Events of one stream matching the query, newest first, reading from the newest entry.
    async fn read_events(
        &self,
        c: &mut Conn,
        key: &str,
        q: &EventQuery,
    ) -> Result<Vec<api::Event>, StoreError> {
        let want = q.limit.min(MAX_LIMIT);
        let mut out = Vec::new();
        let mut end = "+".to_owned();
        while out.len() < want {
            let page: Vec<StreamEntry> = redis::cmd("XREVRANGE")
                .arg(key)
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(EVENT_PAGE)
                .query_async(c)
                .await
                .map_err(err)?;
            let mut found = Vec::new();
            for (_, fields) in &page {
                let e = entry_event(fields)?;
                if q.matches(&e) {
                    found.push(e);
                }
            }
            // Append order is id order for events of one node; across nodes, nearly so.
            found.sort_by(|a, b| b.id.cmp(&a.id));
            out.extend(found);
            match page.last().and_then(|(id, _)| stream_id_before(id)) {
                Some(before) if page.len() == EVENT_PAGE => end = before,
                _ => break,
            }
        }
        out.sort_by(|a, b| b.id.cmp(&a.id));
        out.truncate(want);
        Ok(out)
    }

    /// Deletes a stream's entries of events older than `before`, from the oldest up to the
    /// first newer one. Answers how many, and the users of the deleted events.
    async fn trim_events(
        &self,
        c: &mut Conn,
        key: &str,
        before: Timestamp,
    ) -> Result<(u64, BTreeSet<String>), StoreError> {
        let mut n = 0;
        let mut users = BTreeSet::new();
        loop {
            let page: Vec<StreamEntry> = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(EVENT_PAGE)
                .query_async(c)
                .await
                .map_err(err)?;
            let mut old = Vec::new();
            let mut more = page.len() == EVENT_PAGE;
            for (id, fields) in &page {
                let e = entry_event(fields)?;
                if Timestamp::from_datetime(e.time) >= before {
                    more = false;
                    break;
                }
                old.push(id);
                users.extend(e.user_id);
            }
            if old.is_empty() {
                break;
            }
            let deleted: u64 = redis::cmd("XDEL")
                .arg(key)
                .arg(&old)
                .query_async(c)
                .await
                .map_err(err)?;
            n += deleted;
            if !more {
                break;
            }
        }
        Ok((n, users))
    }

    /// Stores deliveries and takes events out of the outbox, in one script.
    async fn put_deliveries(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError> {
        let mut keys = vec![
            self.ev_key("pending"),
            self.ev_key("pending:doc"),
            self.ev_key("d"),
            self.ev_key("due"),
            self.ev_key("fin"),
        ];
        let mut args: Vec<String> = vec![events.len().to_string()];
        args.extend(events.iter().cloned());
        for d in deliveries {
            let w = self.webhook_key(&d.webhook);
            let i = match keys.iter().position(|k| k == &w) {
                Some(i) => i + 1,
                None => {
                    keys.push(w);
                    keys.len()
                }
            };
            args.push(d.id.clone());
            args.push(json(d)?);
            args.push(i.to_string());
            args.push(d.state.as_str().to_owned());
            args.push(
                d.next_attempt_at
                    .map(|t| t.timestamp_millis().to_string())
                    .unwrap_or_default(),
            );
            args.push(d.updated_at.timestamp_millis().to_string());
        }
        let mut c = self.conn().await?;
        let mut inv = self.inner.deliveries.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        let _: i64 = inv.invoke_async(&mut c).await.map_err(err)?;
        Ok(())
    }

    /// Deliveries by id, in the order given; missing ones are skipped.
    async fn load_deliveries(
        &self,
        c: &mut Conn,
        ids: &[String],
    ) -> Result<Vec<api::Delivery>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.ev_key("d"))
            .arg(ids)
            .query_async(c)
            .await
            .map_err(err)?;
        docs.iter()
            .flatten()
            .map(|d| parse_doc("delivery", d))
            .collect()
    }

    /// Deletes finished deliveries last changed before `before`.
    async fn purge_deliveries(&self, c: &mut Conn, before: Timestamp) -> Result<u64, StoreError> {
        let mut n = 0;
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.ev_key("fin"))
                .arg("-inf")
                .arg(format!("({}", before.as_millis()))
                .arg("LIMIT")
                .arg(0)
                .arg(DELIVERY_PAGE)
                .query_async(c)
                .await
                .map_err(err)?;
            if ids.is_empty() {
                break;
            }
            let docs: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(self.ev_key("d"))
                .arg(&ids)
                .query_async(c)
                .await
                .map_err(err)?;
            let mut keys = vec![self.ev_key("d"), self.ev_key("fin")];
            let mut inv = self.inner.purge_deliveries.prepare_invoke();
            inv.arg(before.as_millis());
            for (id, doc) in ids.iter().zip(&docs) {
                let webhook = match doc {
                    Some(d) => Some(parse_doc::<api::Delivery>("delivery", d)?.webhook),
                    None => None,
                };
                let i = match webhook.map(|w| self.webhook_key(&w)) {
                    None => 0,
                    Some(w) => match keys.iter().position(|k| k == &w) {
                        Some(i) => i + 1,
                        None => {
                            keys.push(w);
                            keys.len()
                        }
                    },
                };
                inv.arg(id).arg(i);
            }
            for k in &keys {
                inv.key(k);
            }
            let deleted: u64 = inv.invoke_async(c).await.map_err(err)?;
            n += deleted;
            if ids.len() < DELIVERY_PAGE || deleted == 0 {
                break;
            }
        }
        Ok(n)
    }

    async fn flush_pending(&self) -> Result<(), StoreError> {
        flush(&self.inner).await
    }
}

async fn conn(inner: &Inner) -> Result<Conn, StoreError> {
    let c = inner
        .conn
        .get_or_try_init(|| async {
            match &inner.target {
                Target::Single(client) => {
                    let cfg = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(inner.timeout))
                        .set_response_timeout(Some(inner.timeout))
                        .set_number_of_retries(1);
                    ConnectionManager::new_lazy_with_config((**client).clone(), cfg)
                        .map(Conn::Single)
                        .map_err(err)
                }
                Target::Cluster(client) => {
                    let connect = client.get_async_connection();
                    match tokio::time::timeout(inner.timeout * 3, connect).await {
                        Ok(r) => r.map(Conn::Cluster).map_err(err),
                        Err(_) => Err(StoreError::Unavailable(
                            "Redis Cluster did not answer".into(),
                        )),
                    }
                }
            }
        })
        .await?;
    Ok(c.clone())
}

async fn flush(inner: &Inner) -> Result<(), StoreError> {
    // Entries stay pending (and visible to this node's reads) until their write has landed.
    let batch: Vec<(SessionHandle, Pending)> = inner
        .pending
        .lock()
        .iter()
        .map(|(h, p)| (h.clone(), p.clone()))
        .collect();
    if batch.is_empty() {
        return Ok(());
    }
    let mut c = conn(inner).await?;
    let mut res = Ok(());
    let mut written = Vec::with_capacity(batch.len());
    for (h, p) in batch {
        let key = format!("{}:{{u:{}}}:s:{}", inner.prefix, p.tag, h.as_str());
        let r: Result<i64, RedisError> = inner
            .touch
            .key(&key)
            .arg(p.seen)
            .arg(p.ttl)
            .invoke_async(&mut c)
            .await;
        let r = match r {
            Ok(1) => redis::cmd("ZADD")
                .arg(sweep_key(&inner.prefix))
                .arg("XX")
                .arg(p.due)
                .arg(h.as_str())
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ()),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => written.push((h, p.seen)),
            Err(e) => res = Err(err(e)),
        }
    }
    let mut pending = inner.pending.lock();
    for (h, seen) in written {
        if pending.get(&h).is_some_and(|p| p.seen <= seen) {
            pending.remove(&h);
        }
    }
    res
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

fn is_live(l: &Loaded, policy: &Policy, now: Timestamp) -> bool {
    session::liveness(&l.session.record, l.session.last_seen_at, policy, now) == Liveness::Active
}

/// Waits a random while before retrying a change that lost a race, longer with each attempt,
/// so that contending nodes spread out instead of colliding again.
async fn backoff(attempt: usize) {
    use std::hash::BuildHasher;
    let cap_us = 200u64 << attempt.min(8);
    let r = std::collections::hash_map::RandomState::new().hash_one(attempt) % cap_us;
    tokio::time::sleep(Duration::from_micros(r)).await;
}

fn conflict() -> StoreError {
    StoreError::Backend("too many concurrent changes to one user's sessions; giving up".into())
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn insert(
        &self,
        record: SessionRecord,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError> {
        let mut c = self.conn().await?;
        let tag = tag(&record.user_id);
        let handle = record.handle.to_string();
        let policy = self.policy_conn(&mut c, record.tenant.as_str()).await?;
        let ttl = self.ttl(&record, &policy, now);
        // Pointers first: until the session itself exists they lead nowhere.
        let tok = self.tok_key(&record.token_hash);
        let hkey = self.handle_key(&handle);
        let mut set_tok = redis::cmd("SET");
        set_tok
            .arg(&tok)
            .arg(format!("{tag} {handle}"))
            .arg("PX")
            .arg(ttl);
        let mut set_handle = redis::cmd("SET");
        set_handle.arg(&hkey).arg(&tag).arg("PX").arg(ttl);
        self.each(&mut c, vec![set_tok, set_handle]).await?;
        let row = Self::row_json(&record)?;
        let mut policies = HashMap::new();
        policies.insert(record.tenant.as_str().to_owned(), policy.clone());
        let device = device_id(&record).map(|d| format!("{} {d}", record.tenant.as_str()));
        let (events_key, devices_key) = (self.user_events_key(&tag), self.devices_key(&tag));
        let retention = self.inner.retention_ms;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let mut cas = Cas::default();
            let mut evicted = Vec::new();
            let mut ended = Vec::new();
            let mut events = Vec::new();
            if let Some(max) = policy.max_sessions_per_user() {
                let (members, loaded) = self.load_user(&mut c, &tag).await?;
                let active: Vec<&Loaded> = loaded
                    .iter()
                    .filter(|l| {
                        l.session.record.tenant == record.tenant && is_live(l, &policy, now)
                    })
                    .collect();
                if active.len() >= max as usize
                    && policy.document().on_limit == sessiond_core::api::OnLimit::Deny
                {
                    let (mut a, mut b) = (redis::cmd("DEL"), redis::cmd("DEL"));
                    a.arg(&tok);
                    b.arg(&hkey);
                    self.each(&mut c, vec![a, b]).await?;
                    return Ok(InsertOutcome::LimitReached);
                }
                evicted = session::choose_evictions(
                    active
                        .iter()
                        .map(|l| (l.session.last_seen_at, l.session.record.handle.clone()))
                        .collect(),
                    max,
                );
                let victims: Vec<&Loaded> = active
                    .iter()
                    .copied()
                    .filter(|l| evicted.contains(&l.session.record.handle))
                    .collect();
                cas.check_members(self.idx_key(&tag), &members);
                for v in &victims {
                    cas.check_row(
                        self.rec_key(&tag, v.session.record.handle.as_str()),
                        &v.row_text,
                    );
                }
                (ended, events) =
                    self.revoke_writes(&mut cas, &victims, "limit_evicted", now, &policies, audit)?;
            }
            // Read before the change, not in it: two sessions created at once from the same
            // new device can both count as new, which only repeats a notice.
            let new_device = match &device {
                None => None,
                Some(member) => {
                    let seen: Option<f64> = redis::cmd("ZSCORE")
                        .arg(&devices_key)
                        .arg(member)
                        .query_async(&mut c)
                        .await
                        .map_err(err)?;
                    let cutoff = now.as_millis().saturating_sub(retention);
                    Some(seen.is_none_or(|at| at < cutoff as f64))
                }
            };
            cas.write("row", self.rec_key(&tag, &handle), row.clone(), ttl);
            cas.write("sadd", self.idx_key(&tag), handle.clone(), ttl);
            if let Some(member) = &device {
                let value = format!("{} {member}", now.as_millis());
                cas.write("dev", devices_key.clone(), value, retention);
            }
            let created = audit.created(&record, new_device);
            cas.events(&events_key, std::slice::from_ref(&created), retention);
            events.push(created);
            if self.apply(&mut c, &cas).await? {
                self.after_commit(&mut c, audit, events).await?;
                let due = Self::due(&record, record.last_seen_at, &policy);
                let _: i64 = redis::cmd("ZADD")
                    .arg(self.sweep_key())
                    .arg(due)
                    .arg(&handle)
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
                self.ended(&mut c, &ended).await?;
                return Ok(InsertOutcome::Inserted { evicted });
            }
        }
        Err(conflict())
    }

    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError> {
        let mut c = self.conn().await?;
        let ptr: Option<String> = redis::cmd("GET")
            .arg(self.tok_key(hash))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let Some((tag, handle)) = ptr.as_deref().and_then(|p| p.split_once(' ')) else {
            return Ok(None);
        };
        let found = self.load(&mut c, tag, handle).await?;
        // The pointer is a hint: only the session's own current hash counts.
        Ok(found
            .map(|l| l.session)
            .filter(|s| s.record.token_hash.ct_eq(hash)))
    }

    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError> {
        let mut c = self.conn().await?;
        Ok(self
            .load_by_handle(&mut c, handle)
            .await?
            .map(|l| l.session))
    }

    async fn touch(
        &self,
        s: &StoredSession,
        policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let at_ms = at.as_millis();
        if at_ms <= s.last_seen_at.as_millis() {
            return Ok(());
        }
        let mut rec = (*s.record).clone();
        rec.last_seen_at = at;
        let p = Pending {
            tag: tag(&rec.user_id),
            seen: at_ms,
            ttl: self.ttl(&rec, policy, at),
            due: Self::due(&rec, at, policy),
        };
        let idle_ms = i64::try_from(policy.timeouts(rec.remember_me).idle_s)
            .unwrap_or(i64::MAX / 4)
            .saturating_mul(1000);
        // Other nodes see only the stored value: write now if the batch could land after they
        // would find the session idle-expired.
        if at_ms - s.record.last_seen_at.as_millis() >= idle_ms - 3 * self.inner.flush_ms {
            let mut c = self.conn().await?;
            let key = self.rec_key(&p.tag, rec.handle.as_str());
            let _: i64 = self
                .inner
                .touch
                .key(&key)
                .arg(p.seen)
                .arg(p.ttl)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            return Ok(());
        }
        let mut pending = self.inner.pending.lock();
        let e = pending
            .entry(rec.handle.clone())
            .or_insert_with(|| p.clone());
        if p.seen > e.seen {
            *e = p;
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
        let mut c = self.conn().await?;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let Some(l) = self.load_by_handle(&mut c, handle).await? else {
                return Ok(RotateOutcome::Stale);
            };
            let policy = self
                .policy_conn(&mut c, l.session.record.tenant.as_str())
                .await?;
            if !change.matches(&l.session.record) || !is_live(&l, &policy, now) {
                return Ok(RotateOutcome::Stale);
            }
            let old_hash = l.session.record.token_hash;
            let new = change.apply(&l.session.record, l.session.last_seen_at, now);
            let new_hash = new.token_hash;
            let rekeyed = new_hash != old_hash;
            let ttl = self.ttl(&new, &policy, now);
            // The new pointer before the change: the new token is handed out only after it.
            let _: () = redis::cmd("SET")
                .arg(self.tok_key(&new_hash))
                .arg(format!("{} {}", l.tag, handle.as_str()))
                .arg("PX")
                .arg(ttl)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            let mut cas = Cas::default();
            let key = self.rec_key(&l.tag, handle.as_str());
            cas.check_row(key.clone(), &l.row_text);
            cas.write("row", key, Self::row_json(&new)?, ttl);
            cas.announce(&self.feed_channel(), handle.as_str());
            let event = change.event_for(audit, now, &new);
            cas.events(
                &self.user_events_key(&l.tag),
                std::slice::from_ref(&event),
                self.inner.retention_ms,
            );
            if self.apply(&mut c, &cas).await? {
                self.after_commit(&mut c, audit, vec![event]).await?;
                if rekeyed {
                    let _: i64 = redis::cmd("DEL")
                        .arg(self.tok_key(&old_hash))
                        .query_async(&mut c)
                        .await
                        .map_err(err)?;
                }
                return Ok(RotateOutcome::Rotated(StoredSession::new(Arc::new(new))));
            }
            if rekeyed {
                let _: i64 = redis::cmd("DEL")
                    .arg(self.tok_key(&new_hash))
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
            }
        }
        Err(conflict())
    }

    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError> {
        let mut c = self.conn().await?;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let Some(l) = self.load_by_handle(&mut c, handle).await? else {
                return Ok(None);
            };
            let policy = self
                .policy_conn(&mut c, l.session.record.tenant.as_str())
                .await?;
            if !is_live(&l, &policy, now) {
                let mut rec = (*l.session.record).clone();
                rec.last_seen_at = l.session.last_seen_at;
                return Ok(Some(RevokeOutcome {
                    session: StoredSession::new(Arc::new(rec)),
                    revoked_now: false,
                }));
            }
            let mut cas = Cas::default();
            cas.check_row(self.rec_key(&l.tag, handle.as_str()), &l.row_text);
            let mut policies = HashMap::new();
            policies.insert(l.session.record.tenant.as_str().to_owned(), policy);
            let (ended, events) =
                self.revoke_writes(&mut cas, &[&l], reason, now, &policies, audit)?;
            if self.apply(&mut c, &cas).await? {
                self.after_commit(&mut c, audit, events).await?;
                self.ended(&mut c, &ended).await?;
                let mut rec = (*l.session.record).clone();
                rec.last_seen_at = l.session.last_seen_at;
                rec.state = StoredState::Revoked {
                    reason: reason.into(),
                    at: now,
                };
                return Ok(Some(RevokeOutcome {
                    session: StoredSession::new(Arc::new(rec)),
                    revoked_now: true,
                }));
            }
        }
        Err(conflict())
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
        let mut c = self.conn().await?;
        let tag = tag(user_id);
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let (members, loaded) = self.load_user(&mut c, &tag).await?;
            let mut policies: HashMap<String, Arc<Policy>> = HashMap::new();
            let mut victims = Vec::new();
            for l in &loaded {
                let r = &l.session.record;
                if tenant.is_some_and(|t| t != &r.tenant) || except == Some(&r.handle) {
                    continue;
                }
                let policy = match policies.get(r.tenant.as_str()) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.policy_conn(&mut c, r.tenant.as_str()).await?;
                        policies.insert(r.tenant.as_str().to_owned(), p.clone());
                        p
                    }
                };
                if is_live(l, &policy, now) {
                    victims.push(l);
                }
            }
            if victims.is_empty() {
                return Ok(Vec::new());
            }
            let mut cas = Cas::default();
            cas.check_members(self.idx_key(&tag), &members);
            for v in &victims {
                cas.check_row(
                    self.rec_key(&tag, v.session.record.handle.as_str()),
                    &v.row_text,
                );
            }
            let (ended, events) =
                self.revoke_writes(&mut cas, &victims, reason, now, &policies, audit)?;
            if self.apply(&mut c, &cas).await? {
                self.after_commit(&mut c, audit, events).await?;
                self.ended(&mut c, &ended).await?;
                return Ok(victims
                    .iter()
                    .map(|v| v.session.record.handle.clone())
                    .collect());
            }
        }
        Err(conflict())
    }

    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<DataUpdate, StoreError> {
        let mut c = self.conn().await?;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let Some(l) = self.load_by_handle(&mut c, handle).await? else {
                return Ok(DataUpdate::NotFound);
            };
            let policy = self
                .policy_conn(&mut c, l.session.record.tenant.as_str())
                .await?;
            if !is_live(&l, &policy, now) {
                return Ok(DataUpdate::NotActive);
            }
            let data = match session::patch_data(&l.session.record.data, patch, limit) {
                Ok(d) => d,
                Err(sessiond_core::CoreError::DataTooLarge { size, limit }) => {
                    return Ok(DataUpdate::TooLarge { size, limit });
                }
                Err(e) => return Err(StoreError::Backend(e.to_string())),
            };
            let mut new = (*l.session.record).clone();
            new.data = data.into();
            let ttl = self.ttl(&new, &policy, now);
            let mut cas = Cas::default();
            let key = self.rec_key(&l.tag, handle.as_str());
            cas.check_row(key.clone(), &l.row_text);
            cas.write("row", key, Self::row_json(&new)?, ttl);
            let events = vec![audit.data_updated(now, &new, patch)];
            cas.events(
                &self.user_events_key(&l.tag),
                &events,
                self.inner.retention_ms,
            );
            cas.announce(&self.feed_channel(), handle.as_str());
            if self.apply(&mut c, &cas).await? {
                self.after_commit(&mut c, audit, events).await?;
                new.last_seen_at = l.session.last_seen_at;
                return Ok(DataUpdate::Updated(StoredSession::new(Arc::new(new))));
            }
        }
        Err(conflict())
    }

    async fn list_user(
        &self,
        q: &ListQuery,
        now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError> {
        let mut c = self.conn().await?;
        let (_, loaded) = self.load_user(&mut c, &tag(&q.user_id)).await?;
        let mut policies: HashMap<String, Arc<Policy>> = HashMap::new();
        let mut found = Vec::new();
        for l in loaded {
            if q.tenant
                .as_ref()
                .is_some_and(|t| t != &l.session.record.tenant)
            {
                continue;
            }
            if !q.include_ended {
                let t = l.session.record.tenant.as_str().to_owned();
                let policy = match policies.get(&t) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.policy_conn(&mut c, &t).await?;
                        policies.insert(t, p.clone());
                        p
                    }
                };
                if !is_live(&l, &policy, now) {
                    continue;
                }
            }
            found.push(l.session);
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
        let mut c = self.conn().await?;
        self.policy_conn(&mut c, tenant.as_str()).await
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
        let mut c = self.conn().await?;
        let _: i64 = self
            .inner
            .put_policy
            .key(self.policy_key(tenant.as_str()))
            .arg(doc)
            .arg(self.feed_channel())
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        // The policy key and the event keys are in different slots: written one after the other.
        let event = audit.event(EventKind::PolicyUpdated, now, tenant);
        self.publish(&mut c, std::slice::from_ref(&event)).await?;
        audit.committed([event]);
        Ok(())
    }

    async fn sweep(
        &self,
        now: Timestamp,
        retention_s: u64,
        audit: &Audit,
    ) -> Result<SweepReport, StoreError> {
        self.flush_pending().await?;
        let mut c = self.conn().await?;
        let mut report = SweepReport::default();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.sweep_key())
            .arg("-inf")
            .arg(now.as_millis())
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_CHUNK)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        for h in due {
            let Ok(handle) = SessionHandle::parse(&h) else {
                continue;
            };
            let Some(l) = self.load_by_handle(&mut c, &handle).await? else {
                let _: i64 = redis::cmd("ZREM")
                    .arg(self.sweep_key())
                    .arg(&h)
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
                continue;
            };
            let rec = &l.session.record;
            let policy = self.policy_conn(&mut c, rec.tenant.as_str()).await?;
            match (
                &rec.state,
                session::liveness(rec, l.session.last_seen_at, &policy, now),
            ) {
                (_, Liveness::Active) => {
                    // Used since, or the policy changed: look again when it could expire.
                    let next = Self::due(rec, l.session.last_seen_at, &policy);
                    let _: i64 = redis::cmd("ZADD")
                        .arg(self.sweep_key())
                        .arg(next)
                        .arg(&h)
                        .query_async(&mut c)
                        .await
                        .map_err(err)?;
                }
                (StoredState::Active, Liveness::Expired(at)) => {
                    let mut new = (**rec).clone();
                    new.last_seen_at = l.session.last_seen_at;
                    new.state = StoredState::Expired { at };
                    let mut cas = Cas::default();
                    let key = self.rec_key(&l.tag, &h);
                    cas.check_row(key.clone(), &l.row_text);
                    cas.write(
                        "row",
                        key,
                        Self::row_json(&new)?,
                        self.ttl(&new, &policy, now),
                    );
                    cas.announce(&self.feed_channel(), &h);
                    let event = audit.session_event(EventKind::SessionExpired, at, &new, None);
                    cas.events(
                        &self.user_events_key(&l.tag),
                        std::slice::from_ref(&event),
                        self.inner.retention_ms,
                    );
                    if self.apply(&mut c, &cas).await? {
                        self.after_commit(&mut c, audit, vec![event]).await?;
                        self.ended(&mut c, &[(h.clone(), at.as_millis())]).await?;
                        report.expired.push(ExpiredSession {
                            handle: new.handle,
                            user_id: new.user_id,
                            tenant: new.tenant,
                            at,
                        });
                    }
                }
                (StoredState::Revoked { at, .. } | StoredState::Expired { at }, _) => {
                    self.ended(&mut c, &[(h.clone(), at.as_millis())]).await?;
                }
                (StoredState::Active, Liveness::Revoked(_)) => {}
            }
        }
        let cutoff = now.minus_secs(retention_s).as_millis();
        let old: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.ended_key())
            .arg("-inf")
            .arg(format!("({cutoff}"))
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_CHUNK)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        for h in old {
            let Ok(handle) = SessionHandle::parse(&h) else {
                continue;
            };
            if let Some(l) = self.load_by_handle(&mut c, &handle).await? {
                let mut cas = Cas::default();
                let key = self.rec_key(&l.tag, &h);
                cas.check_row(key.clone(), &l.row_text);
                cas.write("del", key, String::new(), 0);
                cas.write("srem", self.idx_key(&l.tag), h.clone(), 0);
                cas.announce(&self.feed_channel(), &h);
                if !self.apply(&mut c, &cas).await? {
                    continue;
                }
                let (mut a, mut b) = (redis::cmd("DEL"), redis::cmd("DEL"));
                a.arg(self.tok_key(&l.session.record.token_hash));
                b.arg(self.handle_key(&h));
                self.each(&mut c, vec![a, b]).await?;
                report.purged += 1;
            }
            let _: i64 = redis::cmd("ZREM")
                .arg(self.ended_key())
                .arg(&h)
                .query_async(&mut c)
                .await
                .map_err(err)?;
        }
        Ok(report)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.flush_pending().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut c).await.map_err(err)?;
        Ok(())
    }

    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError> {
        let key = self.doc_key(name)?;
        let mut c = self.conn().await?;
        let (v, doc): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg("v")
            .arg("doc")
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(v.zip(doc))
    }

    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError> {
        let key = self.doc_key(name)?;
        let mut c = self.conn().await?;
        let mut inv = self.inner.doc.prepare_invoke();
        inv.key(key)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(doc);
        let applied: i64 = inv.invoke_async(&mut c).await.map_err(err)?;
        Ok(applied == 1)
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        // A user's events go to the user's stream too, in one script per user.
        let mut by_user: HashMap<String, Vec<Event>> = HashMap::new();
        for e in events {
            if let Some(u) = &e.user_id {
                by_user.entry(tag(u)).or_default().push(e.clone());
            }
        }
        for (tag, evs) in by_user {
            let mut cas = Cas::default();
            cas.events(&self.user_events_key(&tag), &evs, self.inner.retention_ms);
            if !self.apply(&mut c, &cas).await? {
                return Err(StoreError::Backend("appending events was refused".into()));
            }
        }
        self.publish(&mut c, events).await
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<api::Event>, StoreError> {
        let key = match &query.user_id {
            Some(u) => self.user_events_key(&tag(u)),
            None => self.ev_key("all"),
        };
        let mut c = self.conn().await?;
        self.read_events(&mut c, &key, query).await
    }

    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let (mut n, users) = self
            .trim_events(&mut c, &self.ev_key("all"), before)
            .await?;
        // The users' copies of the events just removed (the rest expires with the key's TTL).
        for user in users {
            self.trim_events(&mut c, &self.user_events_key(&tag_of(&user)), before)
                .await?;
        }
        // Outbox entries of older events: event ids begin with their time in hex.
        let bound = format!("{:012x}", before.as_millis().clamp(0, 0xffff_ffff_ffff));
        loop {
            let mut inv = self.inner.purge_outbox.prepare_invoke();
            inv.key(self.ev_key("pending"))
                .key(self.ev_key("pending:doc"))
                .arg(&bound)
                .arg(DELIVERY_PAGE);
            let dropped: usize = inv.invoke_async(&mut c).await.map_err(err)?;
            if dropped < DELIVERY_PAGE {
                break;
            }
        }
        n += self.purge_deliveries(&mut c, before).await?;
        Ok(n)
    }

    async fn pending_events(&self, limit: usize) -> Result<Vec<api::Event>, StoreError> {
        let limit = limit.min(MAX_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        // Score 0 for every member: ranks follow the ids.
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.ev_key("pending"))
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.ev_key("pending:doc"))
            .arg(&ids)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        docs.iter()
            .flatten()
            .map(|d| parse_doc("event", d))
            .collect()
    }

    async fn fan_out(
        &self,
        events: &[String],
        deliveries: &[api::Delivery],
    ) -> Result<(), StoreError> {
        if events.is_empty() && deliveries.is_empty() {
            return Ok(());
        }
        self.put_deliveries(events, deliveries).await
    }

    async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<api::Delivery>, StoreError> {
        let limit = limit.min(MAX_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        // Equal scores order by member: soonest first, then by id.
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.ev_key("due"))
            .arg("-inf")
            .arg(now.as_millis())
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let found = self.load_deliveries(&mut c, &ids).await?;
        // A delivery changed between the two reads is left for the next round.
        Ok(found
            .into_iter()
            .filter(|d| {
                d.state == api::DeliveryState::Pending
                    && d.next_attempt_at
                        .is_some_and(|t| Timestamp::from_datetime(t) <= now)
            })
            .collect())
    }

    async fn put_delivery(&self, delivery: &api::Delivery) -> Result<(), StoreError> {
        self.put_deliveries(&[], std::slice::from_ref(delivery))
            .await
    }

    async fn deliveries(&self, query: &DeliveryQuery) -> Result<Vec<api::Delivery>, StoreError> {
        let want = query.limit.min(MAX_LIMIT);
        let key = self.webhook_key(&query.webhook);
        let mut c = self.conn().await?;
        let mut out = Vec::new();
        let mut max = match &query.before_id {
            Some(b) => format!("({b}"),
            None => "+".to_owned(),
        };
        while out.len() < want {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&key)
                .arg(&max)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(DELIVERY_PAGE)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            let found = self.load_deliveries(&mut c, &ids).await?;
            out.extend(found.into_iter().filter(|d| query.matches(d)));
            match ids.last() {
                Some(last) if ids.len() == DELIVERY_PAGE => max = format!("({last}"),
                _ => break,
            }
        }
        out.truncate(want);
        Ok(out)
    }
}

/// The change feed: a subscription to the prefix's channel.
struct RedisFeed {
    store: RedisStore,
    /// Which of the feed URLs to try next.
    next: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Subscriber for RedisFeed {
    async fn subscribe(
        &self,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        use futures_util::StreamExt as _;
        let urls = &self.store.inner.feed_urls;
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % urls.len().max(1);
        let url = urls
            .get(i)
            .ok_or_else(|| StoreError::Backend("no Redis URL".into()))?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| StoreError::Backend(format!("invalid Redis URL: {e}")))?;
        let timeout = self.store.inner.timeout;
        let mut pubsub = match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
            Ok(r) => r.map_err(err)?,
            Err(_) => return Err(StoreError::Unavailable("Redis did not answer".into())),
        };
        match tokio::time::timeout(timeout, pubsub.subscribe(self.store.feed_channel())).await {
            Ok(r) => r.map_err(err)?,
            Err(_) => return Err(StoreError::Unavailable("Redis did not answer".into())),
        }
        // Subscribed: the next attempt (after a loss) starts from this node again.
        self.next.store(i, std::sync::atomic::Ordering::Relaxed);
        let mut messages = pubsub.into_on_message();
        Ok(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let Ok(payload) = m.get_payload::<String>() else {
                    continue;
                };
                if tx.send(payload).is_err() {
                    return;
                }
            }
        }))
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let mut c = self.store.conn().await?;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.store.feed_channel())
            .arg("")
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }
}
