//! The error of [`Client`](crate::Client) calls.
//!
//! No variant ever holds the API key, a session token, a refresh token or an access token:
//! requests carry those in headers and bodies, and neither is copied into an error. Decode errors
//! keep only the position and the category of the failure, never a value from the body.

use sessiond_api::Problem;

/// What went wrong in a call to the sessiond API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error status and an RFC 9457 problem body. Branch on
    /// [`Error::code`] (the stable codes are in [`sessiond_api::codes`]).
    #[error("sessiond answered {status} {}: {}", problem.code, problem.detail)]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The problem body.
        problem: Problem,
    },
    /// The server answered with an error status but without a problem body (for example a
    /// proxy's error page).
    #[error("sessiond answered {status} without a problem body")]
    UnexpectedStatus {
        /// The HTTP status code.
        status: u16,
    },
    /// The server answered with a redirect (3xx), which the client never follows: a request body
    /// holds tokens and must not be sent to another URL. Also when a client given to
    /// [`Client::with_http`](crate::Client::with_http) followed one: its answer is not used.
    #[error("sessiond answered a redirect, which is not followed")]
    Redirected {
        /// The HTTP status code of the redirect; `None` when the client followed it.
        status: Option<u16>,
    },
    /// The request could not be sent or the response could not be read (connection refused,
    /// timeout, TLS failure, ...).
    #[error("request to sessiond failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// The server answered with a success status, but the body is not the expected JSON.
    #[error("could not decode the response of sessiond (status {status}): {reason}")]
    Decode {
        /// The HTTP status code.
        status: u16,
        /// Where and how decoding failed (no value from the body).
        reason: String,
    },
    /// An argument cannot be sent: an invalid base URL, an API key that is not a valid header
    /// value, or a path segment (user id, handle, tenant) that is empty, `.` or `..`.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
}

impl Error {
    /// The problem's stable `code` (for example `session_expired`), for an [`Error::Api`] whose
    /// problem has one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { problem, .. } if !problem.code.is_empty() => Some(&problem.code),
            _ => None,
        }
    }

    /// The HTTP status code, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. }
            | Self::UnexpectedStatus { status }
            | Self::Decode { status, .. } => Some(*status),
            Self::Redirected { status } => *status,
            Self::Transport(e) => e.status().map(|s| s.as_u16()),
            Self::InvalidArgument(_) => None,
        }
    }

    /// The problem body of an [`Error::Api`].
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Api { problem, .. } => Some(problem),
            _ => None,
        }
    }

    pub(crate) fn decode(status: u16, e: &serde_json::Error) -> Self {
        // The serde_json message can quote values of the body (a token, say): keep only the
        // category and the position.
        let category = match e.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "invalid JSON",
            serde_json::error::Category::Data => "unexpected JSON shape",
            serde_json::error::Category::Eof => "truncated JSON",
        };
        Self::Decode {
            status,
            reason: format!("{category} at line {} column {}", e.line(), e.column()),
        }
    }
}
