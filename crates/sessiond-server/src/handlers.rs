//! Thin handlers: extract, call the service, map the result.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use sessiond_api::{
    Cookie, CreateSessionRequest, ForceLogoutResponse, LogoutResponse, PatchSessionRequest,
    PolicyDocument, ReauthenticateRequest, SessionList, SessionResponse, SessionWithToken,
    TokenRequest, VerifyRequest,
};
use sessiond_core::service::{Issued, StatusFilter};

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
    }
}

/// `POST /v1/sessions`
pub async fn create(
    _: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<CreateSessionRequest>,
) -> Result<(StatusCode, Json<SessionWithToken>), ApiError> {
    let issued = s.service.create(&req).await?;
    Ok((StatusCode::CREATED, Json(with_token(issued))))
}

/// `POST /v1/sessions/verify`
pub async fn verify(
    _: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<VerifyRequest>,
) -> ApiResult<SessionResponse> {
    Ok(Json(SessionResponse {
        session: s.service.verify(&req).await?,
    }))
}

/// `POST /v1/sessions/rotate`
pub async fn rotate(
    _: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<TokenRequest>,
) -> ApiResult<SessionWithToken> {
    Ok(Json(with_token(s.service.rotate(&req.token).await?)))
}

/// `POST /v1/sessions/reauthenticate`
pub async fn reauthenticate(
    _: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<ReauthenticateRequest>,
) -> ApiResult<SessionWithToken> {
    Ok(Json(with_token(
        s.service.reauthenticate(&req.token, &req.auth).await?,
    )))
}

/// `POST /v1/sessions/logout`
pub async fn logout(
    _: Admin,
    State(s): State<AppState>,
    StrictJson(req): StrictJson<TokenRequest>,
) -> ApiResult<LogoutResponse> {
    let (session, clear_cookie) = s.service.logout(&req.token).await?;
    Ok(Json(LogoutResponse {
        session,
        clear_cookie,
    }))
}

/// `GET /v1/sessions/{handle}`
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
pub async fn patch_session(
    _: Admin,
    State(s): State<AppState>,
    Path(handle): Path<String>,
    StrictJson(req): StrictJson<PatchSessionRequest>,
) -> ApiResult<SessionResponse> {
    Ok(Json(SessionResponse {
        session: s.service.patch_data(&handle, &req.data).await?,
    }))
}

/// Query of `DELETE /v1/sessions/{handle}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeParams {
    reason: Option<String>,
}

/// `DELETE /v1/sessions/{handle}`
pub async fn revoke_session(
    _: Admin,
    State(s): State<AppState>,
    Path(handle): Path<String>,
    StrictQuery(q): StrictQuery<RevokeParams>,
) -> ApiResult<SessionResponse> {
    Ok(Json(SessionResponse {
        session: s.service.revoke(&handle, q.reason.as_deref()).await?,
    }))
}

/// `?status=` of a listing.
#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StatusParam {
    /// Active only.
    #[default]
    Active,
    /// All not yet purged.
    All,
}

/// Query of `GET /v1/users/{user_id}/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    status: StatusParam,
    tenant: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/users/{user_id}/sessions`
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceLogoutParams {
    except: Option<String>,
    tenant: Option<String>,
}

/// `DELETE /v1/users/{user_id}/sessions`
pub async fn force_logout(
    _: Admin,
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    StrictQuery(q): StrictQuery<ForceLogoutParams>,
) -> ApiResult<ForceLogoutResponse> {
    let revoked = s
        .service
        .force_logout(&user_id, q.tenant.as_deref(), q.except.as_deref())
        .await?;
    Ok(Json(ForceLogoutResponse { revoked }))
}

/// `GET /v1/tenants/{tenant}/policy`
pub async fn get_policy(
    _: Admin,
    State(s): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<PolicyDocument> {
    Ok(Json(s.service.policy(&tenant).await?))
}

/// `PUT /v1/tenants/{tenant}/policy`
pub async fn put_policy(
    _: Admin,
    State(s): State<AppState>,
    Path(tenant): Path<String>,
    StrictJson(doc): StrictJson<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<PolicyDocument> {
    // Parsed here rather than by the extractor so that a bad document is `invalid_policy`.
    let doc: PolicyDocument =
        serde_json::from_value(serde_json::Value::Object(doc)).map_err(|e| {
            sessiond_core::CoreError::InvalidPolicy(crate::extract::describe_json_error(&e))
        })?;
    Ok(Json(s.service.put_policy(&tenant, doc).await?))
}

/// `GET /healthz` (public)
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz` (public)
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    match s.service.ready().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "unavailable", "code": "store_unavailable"})),
            )
        }
    }
}
