//! The core's error type: every way a lifecycle operation can fail.

use crate::store::StoreError;

/// Why an operation failed. The server maps each variant to one HTTP status and stable code.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request is malformed or has an invalid value.
    #[error("{0}")]
    InvalidRequest(String),
    /// The policy document is invalid.
    #[error("{0}")]
    InvalidPolicy(String),
    /// No session has this token.
    #[error("no session has this token")]
    SessionUnknown,
    /// The session timed out.
    #[error("the session has expired")]
    SessionExpired,
    /// The session was revoked.
    #[error("the session has been revoked")]
    SessionRevoked,
    /// The session is valid, but the request needs a fresher or stronger authentication.
    #[error("{0}")]
    ReauthenticationRequired(String),
    /// The user is at the session limit and the policy denies more.
    #[error("the user has reached the maximum number of sessions")]
    SessionLimitReached,
    /// The node holds as many live sessions as it is configured to.
    #[error("the server holds as many sessions as it is configured to; try again later")]
    SessionCapacityReached,
    /// The tenant holds as many live sessions as it may.
    #[error("the tenant holds as many sessions as it may")]
    TenantSessionLimit,
    /// The session is not active.
    #[error("the session is not active")]
    SessionNotActive,
    /// The session data would exceed the limit.
    #[error("session data would be {size} bytes, over the limit of {limit}")]
    DataTooLarge {
        /// The size the data would have.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// No such session.
    #[error("no such session")]
    NotFound,
    /// A concurrent change to the same session won.
    #[error("the session was changed concurrently; retry")]
    Conflict,
    /// A spent refresh token was presented after the grace period; the session was revoked.
    #[error("this refresh token has already been used; the session has been revoked")]
    TokenReused,
    /// The access or refresh token is not acceptable (the reason, never the token).
    #[error("{0}")]
    TokenInvalid(String),
    /// The access token has expired.
    #[error("the access token has expired")]
    TokenExpired,
    /// Too many attempts from this client or for this user: retry after this many seconds.
    #[error("too many attempts; retry after {0} s")]
    TooManyAttempts(u64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An internal failure (for example the OS random source).
    #[error("internal error: {0}")]
    Internal(String),
}
