//! The one place where errors become `application/problem+json` responses (RFC 9457).
//!
//! Internal details (store messages) never reach a client: they are logged with the request id,
//! and the client gets a generic detail and a stable code.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sessiond_api::{Problem, codes};
use sessiond_core::CoreError;
use sessiond_core::store::StoreError;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A lifecycle error from the core.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Missing or wrong API key.
    #[error("a valid API key is required: send 'Authorization: Bearer <key>'")]
    Unauthorized,
    /// The request is malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// The body is over the limit.
    #[error("the request body is over the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The body is not JSON.
    #[error("the request body must be JSON, sent with 'Content-Type: application/json'")]
    UnsupportedMediaType,
    /// No route.
    #[error("no such resource")]
    NotFound,
    /// The route exists, the method does not.
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    /// The server is at its cap of requests in progress.
    #[error("the server is at its limit of requests in progress; retry shortly")]
    Overloaded,
    /// The request conflicts with the resource's state.
    #[error("{0}")]
    Conflict(String),
    /// A webhook URL whose destination is not permitted (the detail never repeats the URL).
    #[error(
        "url: this destination is not permitted: it is, or resolves to, a loopback, private, \
         link-local or other internal or special-purpose address (an operator can allow it \
         with webhooks.allowed_hosts)"
    )]
    WebhookUrlRefused,
    /// A secret cannot be stored sealed: no keyring key is configured (shared store).
    #[error("{0}")]
    KeyringKeyRequired(String),
    /// The request ran past the request timeout.
    #[error("the request did not finish within the server's request timeout")]
    RequestTimeout,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Core(CoreError::Store(e))
    }
}

fn problem(status: StatusCode, code: &str, detail: String) -> Response {
    let body = Problem {
        kind: format!("urn:sessiond:problem:{code}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail,
        code: code.to_owned(),
    };
    let text = serde_json::to_vec(&body).unwrap_or_default();
    let mut res = (status, text).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

/// The status and stable code a core error is answered with.
pub fn core_status(e: &CoreError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        CoreError::InvalidRequest(_) => (S::BAD_REQUEST, codes::INVALID_REQUEST),
        CoreError::InvalidPolicy(_) => (S::BAD_REQUEST, codes::INVALID_POLICY),
        CoreError::SessionUnknown => (S::UNAUTHORIZED, codes::SESSION_UNKNOWN),
        CoreError::SessionExpired => (S::UNAUTHORIZED, codes::SESSION_EXPIRED),
        CoreError::SessionRevoked => (S::UNAUTHORIZED, codes::SESSION_REVOKED),
        CoreError::ReauthenticationRequired(_) => (S::FORBIDDEN, codes::REAUTHENTICATION_REQUIRED),
        CoreError::SessionLimitReached => (S::CONFLICT, codes::SESSION_LIMIT_REACHED),
        CoreError::SessionCapacityReached => {
            (S::INSUFFICIENT_STORAGE, codes::SESSION_CAPACITY_REACHED)
        }
        CoreError::TenantSessionLimit => (S::TOO_MANY_REQUESTS, codes::TENANT_SESSION_LIMIT),
        CoreError::SessionNotActive => (S::CONFLICT, codes::SESSION_NOT_ACTIVE),
        CoreError::DataTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, codes::DATA_TOO_LARGE),
        CoreError::NotFound => (S::NOT_FOUND, codes::NOT_FOUND),
        CoreError::Conflict => (S::CONFLICT, codes::CONFLICT),
        CoreError::TokenReused => (S::UNAUTHORIZED, codes::TOKEN_REUSED),
        CoreError::TokenInvalid(_) => (S::UNAUTHORIZED, codes::TOKEN_INVALID),
        CoreError::TokenExpired => (S::UNAUTHORIZED, codes::TOKEN_EXPIRED),
        CoreError::TooManyAttempts(_) => (S::TOO_MANY_REQUESTS, codes::TOO_MANY_ATTEMPTS),
        CoreError::Store(_) => (S::SERVICE_UNAVAILABLE, codes::STORE_UNAVAILABLE),
        CoreError::Internal(_) => (S::INTERNAL_SERVER_ERROR, codes::INTERNAL),
    }
}

/// The stable code a core error is answered with.
pub fn core_code(e: &CoreError) -> &'static str {
    core_status(e).1
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use StatusCode as S;
        let detail = self.to_string();
        let (status, code, detail) = match self {
            ApiError::Unauthorized => (S::UNAUTHORIZED, codes::UNAUTHORIZED, detail),
            ApiError::InvalidRequest(_) => (S::BAD_REQUEST, codes::INVALID_REQUEST, detail),
            ApiError::PayloadTooLarge(_) => {
                (S::PAYLOAD_TOO_LARGE, codes::PAYLOAD_TOO_LARGE, detail)
            }
            ApiError::UnsupportedMediaType => (
                S::UNSUPPORTED_MEDIA_TYPE,
                codes::UNSUPPORTED_MEDIA_TYPE,
                detail,
            ),
            ApiError::NotFound => (S::NOT_FOUND, codes::NOT_FOUND, detail),
            ApiError::Conflict(_) => (S::CONFLICT, codes::CONFLICT, detail),
            ApiError::WebhookUrlRefused => (S::BAD_REQUEST, codes::WEBHOOK_URL_REFUSED, detail),
            ApiError::KeyringKeyRequired(_) => (S::CONFLICT, codes::KEYRING_KEY_REQUIRED, detail),
            ApiError::MethodNotAllowed => {
                (S::METHOD_NOT_ALLOWED, codes::METHOD_NOT_ALLOWED, detail)
            }
            ApiError::Overloaded => {
                let mut res = problem(S::SERVICE_UNAVAILABLE, codes::OVERLOADED, detail);
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return res;
            }
            ApiError::RequestTimeout => (S::SERVICE_UNAVAILABLE, codes::REQUEST_TIMEOUT, detail),
            ApiError::Core(CoreError::TooManyAttempts(secs)) => {
                let mut res = problem(S::TOO_MANY_REQUESTS, codes::TOO_MANY_ATTEMPTS, detail);
                if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                    res.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return res;
            }
            ApiError::Core(e) => {
                let (status, code) = core_status(&e);
                let detail = match &e {
                    CoreError::Store(err) => {
                        tracing::error!(error = %err, "store failure");
                        "the session store cannot be reached; no session can be verified".to_owned()
                    }
                    CoreError::Internal(m) => {
                        tracing::error!(error = %m, "internal error");
                        "internal error".to_owned()
                    }
                    _ => detail,
                };
                (status, code, detail)
            }
        };
        problem(status, code, detail)
    }
}
