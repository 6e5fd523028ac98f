//! Thin handlers: extract, call the service, map the result.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sessiond_api::{
    Cookie, CreateSessionRequest, DeliveryList, DeliveryState, EventList, EventQueryParams,
    ForceLogoutResponse, JwkSet, LogoutResponse, PatchSessionRequest, PolicyDocument, Problem,
    ReauthenticateRequest, RefreshRequest, RevokeSessionsRequest, RevokeSessionsResponse,
    SessionList, SessionResponse, SessionWithToken, TokenPair, TokenRequest, VerifyRequest,
    Webhook, WebhookInput, WebhookList,
};
use sessiond_core::error::CoreError;
use sessiond_core::events::{Audit, EventKind};
use sessiond_core::service::{Issued, StatusFilter};
use sessiond_core::token::TenantId;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Admin, StrictJson, StrictQuery};

type ApiResult<T> = Result<Json<T>, ApiError>;

fn with_token(i: Issued) -> SessionWithToken {
    let value = i.token.expose().to_owned();
    SessionWithToken {
        session: i.session,
        token: value.clone(),
        cookie: Cookie {
            name: i.cookie_name,
            value,
            set_cookie: i.set_cookie,
        },
        access_token_expires_at: i.access_token.as_ref().map(|(_, at)| at.to_datetime()),
        access_token: i.access_token.map(|(t, _)| t),
        refresh_token: i.refresh_token.map(|t| t.expose().to_owned()),
    }
}

/// `POST /v1/sessions`
///
/// Creates a session for a user the application has just authenticated; answers the secret token
/// once, with a ready `Set-Cookie` value. At the policy's session limit, `evict_oldest` revokes the
/// least recently used session and `deny` answers `409`.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    request_body(content = CreateSessionRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The session, its token and its cookie.", body = SessionWithToken),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`session_limit_reached`: the user is at the policy's session limit and `on_limit` is `deny`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit; `data_too_large`: the session data would be over its limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too_many_attempts`: too many sessions created for this user, or from this client network through this API key (this API key when the request names no `client.ip`), in the window; retry after `Retry-After` seconds. `tenant_session_limit`: the tenant holds `limits.max_sessions_per_tenant` live sessions.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`session_capacity_reached`: the server holds `limits.max_sessions` live sessions; no session can be created until some end.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn create(
    admin: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<CreateSessionRequest>,
) -> Result<(StatusCode, Json<SessionWithToken>), ApiError> {
    let issued = s.service.create(&req, admin.audit()).await?;
    Ok((StatusCode::CREATED, Json(with_token(issued))))
}

/// `POST /v1/sessions/verify`
///
/// Checks a session token (or, in token mode, an access token) on a request of the application: a
/// valid session's idle expiry slides. `require` asks for a recent or stronger authentication.
#[utoipa::path(
    post,
    path = "/v1/sessions/verify",
    tag = "sessions",
    request_body(content = VerifyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The token is valid: the session, whose idle expiry slid.", body = SessionResponse),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong; `session_unknown`, `session_expired` or `session_revoked`: the token names no active session.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`reauthentication_required`: the session is valid but does not meet `require`.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: a concurrent change to the same session won; retry.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too_many_attempts`: an unknown or invalid token from a source (the client network of `client.ip` with this API key, or this API key when the request names no `client.ip`) that presented too many of them and is blocked; retry after `Retry-After` seconds. A token of a live session is answered whatever its source.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn verify(
    admin: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<VerifyRequest>,
) -> Result<Response, ApiError> {
    let kind = if req.access_token.is_some() {
        "access"
    } else {
        "session"
    };
    let r = s.service.verify_as(&req, admin.audit()).await;
    s.metrics.verified(
        kind,
        match &r {
            Ok(_) => "valid",
            Err(e) => crate::error::core_code(e),
        },
    );
    // The `SessionResponse` JSON, written straight from the record (the hot path).
    let body = r?
        .json()
        .to_vec()
        .map_err(|e| ApiError::Core(CoreError::Internal(format!("cannot write a session: {e}"))))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// `POST /v1/tokens/refresh`
///
/// Token mode: exchanges a refresh token for a new access token and a new refresh token; the old
/// refresh token stops working, and its reuse revokes the session.
#[utoipa::path(
    post,
    path = "/v1/tokens/refresh",
    tag = "tokens",
    request_body(content = RefreshRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "A new access token and refresh token; the presented refresh token is spent (within the tenant's grace period it returns this same pair again). The session's idle expiry slid.", body = TokenPair),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong; `session_unknown`, `session_expired` or `session_revoked`: the refresh token names no active session; `token_reused`: a spent refresh token was presented after the grace period, and the session has been revoked (`theft_detected`); `token_invalid`: the tenant's token mode or refresh tokens are off.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: concurrent refreshes of the same session kept winning; retry.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn refresh(
    admin: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<RefreshRequest>,
) -> ApiResult<TokenPair> {
    let r = s.service.refresh(&req.refresh_token, admin.audit()).await?;
    Ok(Json(TokenPair {
        session: r.session,
        access_token: r.access_token,
        access_token_expires_at: r.access_token_expires_at.to_datetime(),
        refresh_token: r.refresh_token.expose().to_owned(),
    }))
}

/// `GET /metrics`
///
/// The server's metrics for Prometheus, in the OpenMetrics text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(
        (status = 200, description = "Metrics in the OpenMetrics text format (Prometheus scrapes it with `authorization: {credentials: <api key>}`): `sessiond_http_requests_total` and `sessiond_http_request_duration_seconds` by route template (`/v1/sessions/:handle`), `sessiond_verifies_total` by token kind and outcome, `sessiond_events_total` by event type and reason, and for PostgreSQL and Redis `sessiond_store_operation_duration_seconds` and `sessiond_store_errors_total` by operation.", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn metrics(
    _: Admin,
    State(s): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 2], String) {
    s.metrics.count_active(&s.service).await;
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            ),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        s.metrics.render(),
    )
}

/// `GET /.well-known/jwks.json` (public)
///
/// Token mode: the public keys (JWK Set) that verify access tokens offline.
#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "tokens",
    responses(
        (status = 200, description = "The public keys that verify access tokens: every key that may have signed a live token, and a key about to sign. Cacheable for five minutes; refetch on an unknown `kid`.", body = JwkSet),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn jwks(
    State(s): State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], Json<JwkSet>), ApiError> {
    let set = s.service.jwks().await?;
    Ok((
        [(axum::http::header::CACHE_CONTROL, "public, max-age=300")],
        Json(set),
    ))
}

/// `POST /v1/sessions/rotate`
///
/// Issues a new token for the same session (after a privilege change); the old token stops working
/// at once.
#[utoipa::path(
    post,
    path = "/v1/sessions/rotate",
    tag = "sessions",
    request_body(content = TokenRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The session, its new token and cookie; the old token no longer works. In token mode also a new access token and refresh token: earlier access tokens no longer verify at the server and earlier refresh tokens are refused.", body = SessionWithToken),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong; `session_unknown`, `session_expired` or `session_revoked`: the token names no active session.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: a concurrent change to the same session won; retry.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn rotate(
    admin: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<TokenRequest>,
) -> ApiResult<SessionWithToken> {
    Ok(Json(with_token(
        s.service.rotate(&req.token, admin.audit()).await?,
    )))
}

/// `POST /v1/sessions/reauthenticate`
///
/// Records a fresh authentication (step-up) of the session's user and rotates its token.
#[utoipa::path(
    post,
    path = "/v1/sessions/reauthenticate",
    tag = "sessions",
    request_body(content = ReauthenticateRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The step-up is recorded and the token rotated: the session, its new token and cookie. In token mode also a new access token and refresh token: earlier access tokens no longer verify at the server and earlier refresh tokens are refused.", body = SessionWithToken),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong; `session_unknown`, `session_expired` or `session_revoked`: the token names no active session.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: a concurrent change to the same session won; retry.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn reauthenticate(
    admin: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<ReauthenticateRequest>,
) -> ApiResult<SessionWithToken> {
    Ok(Json(with_token(
        s.service
            .reauthenticate(&req.token, &req.auth, req.client.as_ref(), admin.audit())
            .await?,
    )))
}

/// `POST /v1/sessions/logout`
///
/// Revokes the session of a token (reason `logout`) and answers a `Set-Cookie` value that deletes
/// the cookie. Idempotent.
#[utoipa::path(
    post,
    path = "/v1/sessions/logout",
    tag = "sessions",
    request_body(content = TokenRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The session, now revoked (or already ended), and a cookie-clearing `Set-Cookie` value.", body = LogoutResponse),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong; `session_unknown`: no session has this token.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: a concurrent change to the same session won; retry.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn logout(
    admin: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<TokenRequest>,
) -> ApiResult<LogoutResponse> {
    let (session, clear_cookie) = s.service.logout(&req.token, admin.audit()).await?;
    Ok(Json(LogoutResponse {
        session,
        clear_cookie,
    }))
}

/// `GET /v1/sessions/{handle}`
///
/// The session object of a handle, whatever its status.
#[utoipa::path(
    get,
    path = "/v1/sessions/{handle}",
    tag = "sessions",
    params(("handle" = String, Path, pattern = "^ses_[A-Za-z0-9_-]{22}$", description = "The session handle (`ses_...`); any other text is `404`.")),
    responses(
        (status = 200, description = "The session, whatever its status.", body = SessionResponse),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no session has this handle.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn get_session(
    _: Admin,
    State(s): State<AppState>,
    Path(handle): Path<String>,
) -> ApiResult<SessionResponse> {
    Ok(Json(SessionResponse {
        session: s.service.get(&handle).await?,
    }))
}

/// `PATCH /v1/sessions/{handle}`
///
/// Merges keys into an active session's data (a key set to `null` is removed).
#[utoipa::path(
    patch,
    path = "/v1/sessions/{handle}",
    tag = "sessions",
    params(("handle" = String, Path, pattern = "^ses_[A-Za-z0-9_-]{22}$", description = "The session handle (`ses_...`); any other text is `404`.")),
    request_body(content = PatchSessionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The session with its data merged.", body = SessionResponse),
        (status = 400, description = "`invalid_request`: the body is not a JSON object, has an unknown field, a wrong type or an invalid value.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no session has this handle.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`session_not_active`: the session is revoked or expired; `conflict`: a concurrent change won, retry.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit; `data_too_large`: the session data would be over its limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn patch_session(
    admin: Admin,
    State(s): State<AppState>,
    Path(handle): Path<String>,
    StrictJson(req): StrictJson<PatchSessionRequest>,
) -> ApiResult<SessionResponse> {
    Ok(Json(SessionResponse {
        session: s
            .service
            .patch_data(&handle, &req.data, admin.audit())
            .await?,
    }))
}

/// Query of `DELETE /v1/sessions/{handle}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RevokeParams {
    /// The revocation reason recorded on the session (1 to 64 of `a-z 0-9 _`); `revoked` when
    /// absent.
    #[param(pattern = "^[a-z0-9_]{1,64}$")]
    reason: Option<String>,
}

/// `DELETE /v1/sessions/{handle}`
///
/// Revokes a session (reason `revoked`, or the one given). Idempotent.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{handle}",
    tag = "sessions",
    params(("handle" = String, Path, pattern = "^ses_[A-Za-z0-9_-]{22}$", description = "The session handle (`ses_...`); any other text is `404`."), RevokeParams),
    responses(
        (status = 200, description = "The session, now revoked (or already ended).", body = SessionResponse),
        (status = 400, description = "`invalid_request`: an unknown query parameter or an invalid `reason`.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no session has this handle.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: a concurrent change to the same session won; retry.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn revoke_session(
    admin: Admin,
    State(s): State<AppState>,
    Path(handle): Path<String>,
    StrictQuery(q): StrictQuery<RevokeParams>,
) -> ApiResult<SessionResponse> {
    Ok(Json(SessionResponse {
        session: s
            .service
            .revoke(&handle, q.reason.as_deref(), admin.audit())
            .await?,
    }))
}

/// `?status=` of a listing.
#[derive(Debug, Clone, Copy, Deserialize, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusParam {
    /// Active only.
    #[default]
    Active,
    /// All not yet purged.
    All,
}

/// Query of `GET /v1/users/{user_id}/sessions`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `active` (the default) or `all` (revoked and expired sessions not yet purged too).
    #[serde(default)]
    #[param(inline)]
    status: StatusParam,
    /// Only the sessions of this tenant; every tenant when absent.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    tenant: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1 to 500; 50 when absent.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
}

/// `GET /v1/users/{user_id}/sessions`
///
/// A user's sessions, most recently seen first: the active ones, or all.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/sessions",
    tag = "users",
    params(("user_id" = String, Path, min_length = 1, description = "The user's id."), ListParams),
    responses(
        (status = 200, description = "A page of the user's sessions, most recently seen first.", body = SessionList),
        (status = 400, description = "`invalid_request`: an unknown or invalid query parameter (`limit`, `cursor`, `tenant`, `status`) or user id.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn list_user_sessions(
    _: Admin,
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    StrictQuery(q): StrictQuery<ListParams>,
) -> ApiResult<SessionList> {
    let status = match q.status {
        StatusParam::Active => StatusFilter::Active,
        StatusParam::All => StatusFilter::All,
    };
    let list = s
        .service
        .list_user(
            &user_id,
            q.tenant.as_deref(),
            status,
            q.cursor.as_deref(),
            q.limit,
        )
        .await?;
    Ok(Json(list))
}

/// Query of `DELETE /v1/users/{user_id}/sessions`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ForceLogoutParams {
    /// The handle of a session to keep (the one in which the password was just changed).
    #[param(pattern = "^ses_[A-Za-z0-9_-]{22}$")]
    except: Option<String>,
    /// Only the sessions of this tenant; every tenant when absent.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    tenant: Option<String>,
}

/// `DELETE /v1/users/{user_id}/sessions`
///
/// Force logout: revokes every active session of the user, except the one named by `except`.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}/sessions",
    tag = "users",
    params(("user_id" = String, Path, min_length = 1, description = "The user's id."), ForceLogoutParams),
    responses(
        (status = 200, description = "How many sessions were revoked.", body = ForceLogoutResponse),
        (status = 400, description = "`invalid_request`: an unknown or invalid query parameter (`except`, `tenant`) or user id.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn force_logout(
    admin: Admin,
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    StrictQuery(q): StrictQuery<ForceLogoutParams>,
) -> ApiResult<ForceLogoutResponse> {
    let revoked = s
        .service
        .force_logout(
            &user_id,
            q.tenant.as_deref(),
            q.except.as_deref(),
            admin.audit(),
        )
        .await?;
    Ok(Json(ForceLogoutResponse { revoked }))
}

/// `POST /v1/users/{user_id}/sessions/revoke`
///
/// Revokes the user's active sessions that match a filter.
#[utoipa::path(
    post,
    path = "/v1/users/{user_id}/sessions/revoke",
    tag = "users",
    params(("user_id" = String, Path, min_length = 1, description = "The user's id.")),
    request_body(content = RevokeSessionsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The sessions this call revoked.", body = RevokeSessionsResponse),
        (status = 400, description = "`invalid_request`: no criterion, an invalid handle, country, tenant or reason, or an unknown field.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached; `overloaded`, `request_timeout`.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn revoke_sessions(
    admin: Admin,
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    StrictJson(req): StrictJson<RevokeSessionsRequest>,
) -> ApiResult<RevokeSessionsResponse> {
    let handles = s
        .service
        .revoke_matching(&user_id, &req, admin.audit())
        .await?;
    Ok(Json(RevokeSessionsResponse {
        revoked: handles.len() as u64,
        handles,
    }))
}

/// `GET /v1/tenants/{tenant}/policy`
///
/// A tenant's session policy (the default policy until one is stored), exactly as `PUT` accepts it.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/policy",
    tag = "tenants",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "The tenant id: 1 to 64 of `A-Z a-z 0-9 . _ -`.")),
    responses(
        (status = 200, description = "The tenant's policy (the default policy until one is put).", body = PolicyDocument),
        (status = 400, description = "`invalid_request`: the tenant id is invalid.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn get_policy(
    _: Admin,
    State(s): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<PolicyDocument> {
    Ok(Json(s.service.policy(&tenant).await?))
}

/// `PUT /v1/tenants/{tenant}/policy`
///
/// Replaces a tenant's session policy: new sessions follow it at once, existing ones at their next
/// verify.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant}/policy",
    tag = "tenants",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$", description = "The tenant id: 1 to 64 of `A-Z a-z 0-9 . _ -`.")),
    request_body(content = PolicyDocument, content_type = "application/json"),
    responses(
        (status = 200, description = "The tenant's policy as stored.", body = PolicyDocument),
        (status = 400, description = "`invalid_policy`: the document is not a valid policy; `invalid_request`: the body is not a JSON object or the tenant id is invalid.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the API key is missing or wrong.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`keyring_key_required`: the document turns token mode on, and the server (on PostgreSQL or Redis) has no keyring key to seal its signing keys with (`jwt.keyring_key_file`, or `jwt.allow_unsealed_keys`).", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: an internal error (details are in the server log under the request id).", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached (the server fails closed); `overloaded`: too many requests in progress, retry after `Retry-After`; `request_timeout`: the request ran past the server's request timeout.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn put_policy(
    admin: Admin,
    State(s): State<AppState>,
    Path(tenant): Path<String>,
    StrictJson(doc): StrictJson<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<PolicyDocument> {
    // Parsed here rather than by the extractor so that a bad document is `invalid_policy`.
    let doc: PolicyDocument =
        serde_json::from_value(serde_json::Value::Object(doc)).map_err(|e| {
            sessiond_core::CoreError::InvalidPolicy(crate::extract::describe_json_error(&e))
        })?;
    if doc.tokens.is_some() && s.service.keys().is_some_and(|k| k.refuses_unsealed()) {
        return Err(ApiError::KeyringKeyRequired(
            "token mode needs a keyring key to seal its signing keys in the shared store: set \
             jwt.keyring_key_file (the same key on every node), or jwt.allow_unsealed_keys"
                .into(),
        ));
    }
    Ok(Json(
        s.service.put_policy(&tenant, doc, admin.audit()).await?,
    ))
}

const PROBLEM_401: &str = "`unauthorized`: the API key is missing or wrong.";

/// `GET /v1/events`
///
/// The audit log, newest first: every session and policy change and every failed API key, filtered
/// by user, session, type and time.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventQueryParams),
    responses(
        (status = 200, description = "A page of events, newest first.", body = EventList),
        (status = 400, description = "`invalid_request`: an unknown or invalid query parameter.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached; `overloaded`, `request_timeout`.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn list_events(
    _: Admin,
    State(s): State<AppState>,
    StrictQuery(q): StrictQuery<EventQueryParams>,
) -> ApiResult<EventList> {
    Ok(Json(s.service.events(&q).await?))
}

/// Query of `GET /v1/users/{user_id}/events`: that of `GET /v1/events` without `user_id`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UserEventParams {
    /// Only this session's events.
    handle: Option<String>,
    /// Only this type, for example `session.revoked`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
    /// Only at or after this time (RFC 3339).
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only before this time (RFC 3339).
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Page size, 1 to 500 (default 50).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /v1/users/{user_id}/events`
///
/// One user's part of the audit log, newest first.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/events",
    tag = "events",
    params(("user_id" = String, Path, min_length = 1, description = "The user's id."), UserEventParams),
    responses(
        (status = 200, description = "A page of the user's events, newest first.", body = EventList),
        (status = 400, description = "`invalid_request`: an unknown or invalid query parameter.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached; `overloaded`, `request_timeout`.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn list_user_events(
    _: Admin,
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    StrictQuery(q): StrictQuery<UserEventParams>,
) -> ApiResult<EventList> {
    let q = EventQueryParams {
        user_id: Some(user_id),
        handle: q.handle,
        event_type: q.event_type,
        since: q.since,
        until: q.until,
        limit: q.limit,
        cursor: q.cursor,
    };
    Ok(Json(s.service.events(&q).await?))
}

/// `GET /v1/webhooks`
///
/// Every webhook endpoint, from the configuration and from the API.
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    responses(
        (status = 200, description = "Every webhook endpoint (secrets are never returned).", body = WebhookList),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn list_webhooks(_: Admin, State(s): State<AppState>) -> ApiResult<WebhookList> {
    Ok(Json(s.webhooks.list().await?))
}

/// `GET /v1/webhooks/{name}`
///
/// One webhook endpoint (its secret is never returned).
#[utoipa::path(
    get,
    path = "/v1/webhooks/{name}",
    tag = "webhooks",
    params(("name" = String, Path, pattern = "^[a-z0-9_-]{1,64}$", description = "The webhook's name.")),
    responses(
        (status = 200, description = "The endpoint (without its secret).", body = Webhook),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such webhook.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn get_webhook(
    _: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Webhook> {
    Ok(Json(s.webhooks.get(&name).await?))
}

/// `PUT /v1/webhooks/{name}`
///
/// Creates or replaces a webhook endpoint: the event types it receives, where, and the secret that
/// signs them.
#[utoipa::path(
    put,
    path = "/v1/webhooks/{name}",
    tag = "webhooks",
    params(("name" = String, Path, pattern = "^[a-z0-9_-]{1,64}$", description = "The webhook's name.")),
    request_body(content = WebhookInput, content_type = "application/json"),
    responses(
        (status = 200, description = "The endpoint as stored; events from now on are delivered to it.", body = Webhook),
        (status = 400, description = "`invalid_request`: a bad name, URL (https, or http to loopback only), event pattern or secret (`whsec_` + base64 of 24 to 64 bytes); `webhook_url_refused`: the URL is, or resolves to, a loopback, private, link-local or other internal address not listed in `webhooks.allowed_hosts`.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: the webhook comes from the configuration file; `keyring_key_required`: the server (on PostgreSQL or Redis) has no keyring key to seal the secret with.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body is over the configured limit.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not sent as `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn put_webhook(
    admin: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
    StrictJson(input): StrictJson<WebhookInput>,
) -> ApiResult<Webhook> {
    let existed = s.webhooks.get(&name).await.is_ok();
    let hook = s.webhooks.put(&name, input).await?;
    let kind = if existed {
        EventKind::WebhookUpdated
    } else {
        EventKind::WebhookCreated
    };
    record_webhook_change(&s, admin.audit(), kind, &name, Some(&hook.events)).await;
    Ok(Json(hook))
}

/// Records a webhook's change made through the API: its name and event patterns, never its
/// URL (which may carry credentials) or its secret.
async fn record_webhook_change(
    s: &AppState,
    audit: &Audit,
    kind: EventKind,
    name: &str,
    events: Option<&[String]>,
) {
    let mut e = audit.event(kind, s.service.now(), &TenantId::default_tenant());
    e.details
        .insert("webhook".into(), serde_json::Value::from(name));
    if let Some(events) = events {
        e.details
            .insert("events".into(), serde_json::Value::from(events.to_vec()));
    }
    if let Err(err) = s.service.record(vec![e]).await {
        tracing::warn!(error = %err, "cannot record {kind}");
    }
}

/// `DELETE /v1/webhooks/{name}`
///
/// Deletes a webhook endpoint made through the API; its pending deliveries are dead-lettered.
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{name}",
    tag = "webhooks",
    params(("name" = String, Path, pattern = "^[a-z0-9_-]{1,64}$", description = "The webhook's name.")),
    responses(
        (status = 204, description = "Deleted; its pending deliveries are dead-lettered when next due."),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such webhook.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: the webhook comes from the configuration file.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn delete_webhook(
    admin: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.webhooks.delete(&name).await?;
    record_webhook_change(&s, admin.audit(), EventKind::WebhookDeleted, &name, None).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /v1/webhooks/{name}/deliveries`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// Only in this state: `pending`, `delivered` or `dead`.
    #[param(inline)]
    state: Option<DeliveryState>,
    /// Page size, 1 to 500 (default 50).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /v1/webhooks/{name}/deliveries`
///
/// A page of a webhook endpoint's deliveries, newest first: pending, delivered or dead.
#[utoipa::path(
    get,
    path = "/v1/webhooks/{name}/deliveries",
    tag = "webhooks",
    params(("name" = String, Path, pattern = "^[a-z0-9_-]{1,64}$", description = "The webhook's name."), DeliveryParams),
    responses(
        (status = 200, description = "A page of the webhook's deliveries, newest first (`state=dead`: the dead letters).", body = DeliveryList),
        (status = 400, description = "`invalid_request`: an unknown or invalid query parameter, or a name that cannot be a webhook's.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = PROBLEM_401, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: the store cannot be reached.", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])),
)]
pub async fn list_deliveries(
    _: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
    StrictQuery(q): StrictQuery<DeliveryParams>,
) -> ApiResult<DeliveryList> {
    Ok(Json(
        s.webhooks
            .deliveries(&name, q.state, q.cursor.as_deref(), q.limit)
            .await?,
    ))
}

/// The body of `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` (live), `ready`, or `unavailable` (not ready).
    pub status: HealthStatus,
    /// Why the server is not ready: `store_unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The status of `/healthz` and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// The process serves.
    Ok,
    /// The store answers.
    Ready,
    /// The store does not answer.
    Unavailable,
}

/// `GET /healthz` (public)
///
/// Liveness: answers once the process serves.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((status = 200, description = "Live: the process serves.", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: HealthStatus::Ok,
        code: None,
    })
}

/// `GET /readyz` (public)
///
/// Readiness: answers `200` while the store answers, `503` otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Ready: the store answers.", body = Health),
        (status = 503, description = "Not ready: the store does not answer (`code` is `store_unavailable`).", body = Health),
    ),
)]
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<Health>) {
    match s.service.ready().await {
        Ok(()) => (
            StatusCode::OK,
            Json(Health {
                status: HealthStatus::Ready,
                code: None,
            }),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: HealthStatus::Unavailable,
                    code: Some(sessiond_api::codes::STORE_UNAVAILABLE.to_owned()),
                }),
            )
        }
    }
}
