//! Events: every state change is recorded durably by the store, in the same transaction as the
//! change where the backend allows it, and then reported to an [`EventSink`] (logs, metrics).
//!
//! Events carry handles, user ids, tenants, client addresses and reasons; never a token, a
//! token hash or a key. An [`Audit`] is the context of one operation (who asked, from where):
//! the service hands it to the store, the store builds the operation's events from it, writes
//! them with the change, and leaves the committed events in it for the sink.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde_json::{Map, Value};

use crate::api;
use crate::session::SessionRecord;
use crate::time::Timestamp;
use crate::token::{SessionHandle, TenantId, UserId};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A session was created.
    SessionCreated,
    /// A session's token was rotated.
    SessionRotated,
    /// A session recorded a fresh authentication (step-up).
    SessionReauthenticated,
    /// A session exchanged its refresh token for a new pair.
    SessionRefreshed,
    /// A session was revoked (the reason says why).
    SessionRevoked,
    /// A session in use was found past its assurance level's reauthentication limits and
    /// counts as a lower level from now on (details: `from_aal`, `aal`).
    SessionAalLowered,
    /// A session timed out and was swept.
    SessionExpired,
    /// A tenant's policy was replaced.
    PolicyUpdated,
    /// A request presented a missing or wrong API key.
    AuthFailed,
    /// A client network guessed too many tokens and is blocked.
    SecurityBruteForce,
    /// A session was used from another client than the one it is bound to.
    SecurityBindingMismatch,
    /// A user's sessions were used from places too far apart for the time between.
    SecurityImpossibleTravel,
    /// A session's data was changed (the details name the keys, never their values).
    SessionDataUpdated,
    /// A webhook was added through the API.
    WebhookCreated,
    /// A webhook was replaced through the API.
    WebhookUpdated,
    /// A webhook was deleted through the API.
    WebhookDeleted,
    /// A signing key was added to the keyring.
    KeysRotated,
    /// A session creation was refused by a creation limit.
    SecurityCreateThrottled,
    /// A valid session was refused for not meeting a step-up requirement.
    SecurityStepUpDenied,
    /// An unknown, tampered or revoked token was presented.
    SecurityInvalidToken,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 20] = [
        Self::SessionCreated,
        Self::SessionRotated,
        Self::SessionReauthenticated,
        Self::SessionRefreshed,
        Self::SessionRevoked,
        Self::SessionAalLowered,
        Self::SessionExpired,
        Self::PolicyUpdated,
        Self::AuthFailed,
        Self::SecurityBruteForce,
        Self::SecurityBindingMismatch,
        Self::SecurityImpossibleTravel,
        Self::SessionDataUpdated,
        Self::WebhookCreated,
        Self::WebhookUpdated,
        Self::WebhookDeleted,
        Self::KeysRotated,
        Self::SecurityCreateThrottled,
        Self::SecurityStepUpDenied,
        Self::SecurityInvalidToken,
    ];

    /// The event type's stable name, for example `session.revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionCreated => "session.created",
            Self::SessionRotated => "session.rotated",
            Self::SessionReauthenticated => "session.reauthenticated",
            Self::SessionRefreshed => "session.refreshed",
            Self::SessionRevoked => "session.revoked",
            Self::SessionAalLowered => "session.aal_lowered",
            Self::SessionExpired => "session.expired",
            Self::PolicyUpdated => "policy.updated",
            Self::AuthFailed => "auth.failed",
            Self::SecurityBruteForce => "security.brute_force",
            Self::SecurityBindingMismatch => "security.binding_mismatch",
            Self::SecurityImpossibleTravel => "security.impossible_travel",
            Self::SessionDataUpdated => "session.data_updated",
            Self::WebhookCreated => "webhook.created",
            Self::WebhookUpdated => "webhook.updated",
            Self::WebhookDeleted => "webhook.deleted",
            Self::KeysRotated => "keys.rotated",
            Self::SecurityCreateThrottled => "security.create_throttled",
            Self::SecurityStepUpDenied => "security.step_up_denied",
            Self::SecurityInvalidToken => "security.invalid_token",
        }
    }

    /// The kind of a type name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sortable event id: 12 hex digits of milliseconds, then 16 of a per-process counter that
/// starts at a random value. Ids of one process grow in creation order (even when the clock
/// stands still, as a test clock does); ids of different processes order by time.
pub fn new_event_id(at: Timestamp) -> String {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let r = crate::token::random_bytes::<4>().unwrap_or([0; 4]);
        AtomicU64::new(u64::from(u32::from_le_bytes(r)) << 24)
    });
    let seq = next.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:012x}{seq:016x}",
        at.as_millis().clamp(0, 0xffff_ffff_ffff)
    )
}

/// Whether `id` has the shape of an event id (the cursor of event lists).
pub fn is_event_id(id: &str) -> bool {
    id.len() == 28
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Sortable id (see [`new_event_id`]).
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// When.
    pub at: Timestamp,
    /// The tenant.
    pub tenant: TenantId,
    /// The user, for session events.
    pub user_id: Option<UserId>,
    /// The session, for session events.
    pub handle: Option<SessionHandle>,
    /// Why, for revocations and failures.
    pub reason: Option<String>,
    /// The end user's client IP.
    pub ip: Option<IpAddr>,
    /// The end user's user agent.
    pub user_agent: Option<Arc<str>>,
    /// Who made the change.
    pub actor: Option<Arc<str>>,
    /// The request that made it.
    pub request_id: Option<Arc<str>>,
    /// Type-specific details.
    pub details: Map<String, Value>,
    /// Whether webhooks should receive it (it goes to the outbox).
    pub deliver: bool,
}

impl Event {
    /// The wire form (what the store keeps and the API answers).
    pub fn to_wire(&self) -> api::Event {
        api::Event {
            id: self.id.clone(),
            time: self.at.to_datetime(),
            event_type: self.kind.as_str().to_owned(),
            tenant: self.tenant.as_str().to_owned(),
            user_id: self.user_id.as_ref().map(|u| u.as_str().to_owned()),
            handle: self.handle.as_ref().map(|h| h.as_str().to_owned()),
            ip: self.ip.map(|ip| ip.to_string()),
            user_agent: self.user_agent.as_deref().map(str::to_owned),
            actor: self.actor.as_deref().map(str::to_owned),
            request_id: self.request_id.as_deref().map(str::to_owned),
            reason: self.reason.clone(),
            details: self.details.clone(),
        }
    }

    /// The wire form as JSON text.
    pub fn to_json(&self) -> String {
        // An api::Event holds only strings, maps and a timestamp: it always serializes.
        serde_json::to_string(&self.to_wire()).unwrap_or_default()
    }
}

/// The actor of background work (the sweeper).
pub const SYSTEM_ACTOR: &str = "system";

/// The context of one operation: who asked and from where, and whether its events go to the
/// webhook outbox. Cheap to clone; clones share the list of committed events.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Who asks (`api_key:<fingerprint>`, `system`).
    pub actor: Option<Arc<str>>,
    /// The end user's client IP, when the request names it.
    pub ip: Option<IpAddr>,
    /// The end user's user agent, when the request names it.
    pub user_agent: Option<Arc<str>>,
    /// The request id.
    pub request_id: Option<Arc<str>>,
    /// Whether the events go to the webhook outbox.
    pub deliver: bool,
    committed: Arc<Mutex<Vec<Event>>>,
}

impl Audit {
    /// A context for `actor`.
    pub fn new(actor: &str) -> Self {
        Self {
            actor: Some(actor.into()),
            ..Self::default()
        }
    }

    /// An event of this operation with no session.
    pub fn event(&self, kind: EventKind, at: Timestamp, tenant: &TenantId) -> Event {
        Event {
            id: new_event_id(at),
            kind,
            at,
            tenant: tenant.clone(),
            user_id: None,
            handle: None,
            reason: None,
            ip: self.ip,
            user_agent: self.user_agent.clone(),
            actor: self.actor.clone(),
            request_id: self.request_id.clone(),
            details: Map::new(),
            deliver: self.deliver,
        }
    }

    /// An event of this operation about a session. The client is the operation's if it names
    /// one, else the session's device.
    pub fn session_event(
        &self,
        kind: EventKind,
        at: Timestamp,
        rec: &SessionRecord,
        reason: Option<&str>,
    ) -> Event {
        let mut e = self.event(kind, at, &rec.tenant);
        e.user_id = Some(rec.user_id.clone());
        e.handle = Some(rec.handle.clone());
        e.reason = reason.map(str::to_owned);
        if self.ip.is_none() && self.user_agent.is_none() {
            e.ip = rec.device.ip;
            e.user_agent = rec.device.user_agent.clone();
        }
        e
    }

    /// The `session.created` event; `new_device` is `None` when the device is unknown.
    pub fn created(&self, rec: &SessionRecord, new_device: Option<bool>) -> Event {
        let mut e = self.session_event(EventKind::SessionCreated, rec.created_at, rec, None);
        if let (Some(new), Some(id)) = (new_device, crate::device::device_id(rec)) {
            e.details.insert("new_device".into(), Value::Bool(new));
            e.details.insert("device_id".into(), Value::String(id));
        }
        e
    }

    /// The `session.data_updated` event of a merge patch: the top-level keys it set and
    /// removed, by name only (values may be secrets).
    pub fn data_updated(
        &self,
        at: Timestamp,
        rec: &SessionRecord,
        patch: &Map<String, Value>,
    ) -> Event {
        let mut e = self.session_event(EventKind::SessionDataUpdated, at, rec, None);
        let (removed, set): (Vec<_>, Vec<_>) = patch.iter().partition(|(_, v)| v.is_null());
        let names = |v: Vec<(&String, &Value)>| {
            Value::Array(
                v.into_iter()
                    .map(|(k, _)| Value::String(k.clone()))
                    .collect(),
            )
        };
        e.details.insert("keys_set".into(), names(set));
        e.details.insert("keys_removed".into(), names(removed));
        e
    }

    /// Records events the store committed.
    pub fn committed(&self, events: impl IntoIterator<Item = Event>) {
        self.lock().extend(events);
    }

    /// Takes the committed events (for the sink).
    pub fn take_committed(&self) -> Vec<Event> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether a webhook's pattern selects an event type: exact, `prefix.*`, or `*`.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some("") => true,
        Some(prefix) if prefix.ends_with('.') => event_type.starts_with(prefix),
        Some(_) => false,
        None => pattern == event_type,
    }
}

/// Where committed events go after the store wrote them: logs and metrics.
pub trait EventSink: Send + Sync + 'static {
    /// Reports an event. Must not block for long: it runs on the request path.
    fn record(&self, event: &Event);
}

/// Writes events to the log (target `sessiond::audit`, level info).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogSink;

impl EventSink for LogSink {
    fn record(&self, e: &Event) {
        tracing::info!(
            target: "sessiond::audit",
            event = e.kind.as_str(),
            id = %e.id,
            at = e.at.as_millis(),
            tenant = %e.tenant,
            user_id = e.user_id.as_ref().map(UserId::as_str),
            handle = e.handle.as_ref().map(SessionHandle::as_str),
            reason = e.reason.as_deref(),
            actor = e.actor.as_deref(),
            request_id = e.request_id.as_deref(),
        );
    }
}

/// Keeps events in memory: for tests.
#[derive(Debug, Default)]
pub struct MemorySink(Mutex<Vec<Event>>);

impl MemorySink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }
}

impl EventSink for MemorySink {
    fn record(&self, event: &Event) {
        self.lock().push(event.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_then_creation() {
        let a = new_event_id(Timestamp::from_millis(5));
        let b = new_event_id(Timestamp::from_millis(5));
        let c = new_event_id(Timestamp::from_millis(6));
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(is_event_id(&a));
        assert!(!is_event_id("zz"));
        assert!(!is_event_id(&a.to_uppercase()));
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "session.created"));
        assert!(pattern_matches("security.*", "security.brute_force"));
        for t in [
            "security.create_throttled",
            "security.step_up_denied",
            "security.invalid_token",
        ] {
            assert!(pattern_matches("security.*", t));
        }
        assert!(pattern_matches("webhook.*", "webhook.deleted"));
        assert!(!pattern_matches("security.*", "session.created"));
        assert!(pattern_matches("session.revoked", "session.revoked"));
        assert!(!pattern_matches("session.revoked", "session.revoked2"));
        assert!(!pattern_matches("sess*", "session.created"));
    }

    #[test]
    fn kinds_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EventKind::parse("nope"), None);
    }
}
