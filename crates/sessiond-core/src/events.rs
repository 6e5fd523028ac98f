//! The event port: every state change is reported to an [`EventSink`].
//!
//! Events carry handles, user ids, tenants and reasons; never a token, a token hash or a key.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use crate::time::Timestamp;
use crate::token::{SessionHandle, TenantId, UserId};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// A session timed out and was swept.
    SessionExpired,
    /// A tenant's policy was replaced.
    PolicyUpdated,
}

impl EventKind {
    /// The event type's stable name, for example `session.revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionCreated => "session.created",
            Self::SessionRotated => "session.rotated",
            Self::SessionReauthenticated => "session.reauthenticated",
            Self::SessionRefreshed => "session.refreshed",
            Self::SessionRevoked => "session.revoked",
            Self::SessionExpired => "session.expired",
            Self::PolicyUpdated => "policy.updated",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
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
    /// Why, for revocations.
    pub reason: Option<String>,
}

/// Where events go.
pub trait EventSink: Send + Sync + 'static {
    /// Records an event. Must not block for long: it runs on the request path.
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
            at = e.at.as_millis(),
            tenant = %e.tenant,
            user_id = e.user_id.as_ref().map(UserId::as_str),
            handle = e.handle.as_ref().map(SessionHandle::as_str),
            reason = e.reason.as_deref(),
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
