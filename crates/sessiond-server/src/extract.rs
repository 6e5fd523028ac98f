//! Extractors: strict JSON bodies and queries, and the API-key guard.
//!
//! Rejections are turned into problem responses here, so a handler only ever sees valid input.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use sessiond_core::events::Audit;
use sessiond_core::guard::EventGate;
use sessiond_core::service::SessionService;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// A JSON body that must be `application/json`, within the body limit, and free of unknown
/// fields (the wire types deny them).
#[derive(Debug, Clone)]
pub struct StrictJson<T>(pub T);

/// Turns a serde error into a message that never echoes a submitted value (it could be a token).
pub(crate) fn describe_json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = match (msg.split_once(':'), msg.split_once(", expected ")) {
        (Some((kind, _)), Some((_, expected)))
            if msg.starts_with("invalid type") || msg.starts_with("invalid value") =>
        {
            format!("{kind}, expected {expected}")
        }
        _ => msg,
    };
    format!("invalid JSON body: {msg}")
}

impl<T: DeserializeOwned> FromRequest<AppState> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_json(req, state, state.max_body_bytes)
            .await
            .map(StrictJson)
    }
}

/// The configured API keys, kept as SHA-256 digests, each with the public fingerprint that
/// names it as the actor of events (`api_key:<8 hex digits>`).
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<([u8; 32], Arc<str>)>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys from their texts.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self(Arc::new(
            keys.into_iter()
                .map(|k| (Sha256::digest(k.as_bytes()).into(), Self::fingerprint(k)))
                .collect(),
        ))
    }

    /// `api_key:` and 8 hex digits of a domain-separated digest of the key: names the key in
    /// events without revealing anything usable about it.
    pub fn fingerprint(key: &str) -> Arc<str> {
        let d = Sha256::new()
            .chain_update(b"sessiond api key fingerprint\n")
            .chain_update(key.as_bytes())
            .finalize();
        format!("api_key:{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3]).into()
    }

    /// Whether `presented` is one of the keys. Constant time in the key's content: every
    /// configured digest is compared, with no early exit.
    pub fn check(&self, presented: &str) -> bool {
        self.identify(presented).is_some()
    }

    /// The fingerprint of the key `presented` is, if it is one. Every configured digest is
    /// compared, with no early exit.
    pub fn identify(&self, presented: &str) -> Option<Arc<str>> {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (k, fp) in self.0.iter() {
            if bool::from(k.ct_eq(&d)) {
                found = Some(fp.clone());
            }
        }
        found
    }
}

/// Proof that the request carried a valid API key, with the context its changes are recorded
/// under (the key's fingerprint as actor, the request id). A handler that takes it cannot run
/// without. A missing or wrong key is answered `401` and recorded as `auth.failed`.
#[derive(Debug, Clone)]
pub struct Admin(Audit);

impl Admin {
    /// The context of the request's changes.
    pub fn audit(&self) -> &Audit {
        &self.0
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::is_request_id(v))
            .map(Arc::<str>::from);
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .map(str::trim);
        let reason = match presented {
            None => "missing_api_key",
            Some(p) => match state.keys.identify(p) {
                Some(actor) => {
                    let mut audit = Audit::new(&actor);
                    audit.request_id = request_id;
                    return Ok(Admin(audit));
                }
                None => "invalid_api_key",
            },
        };
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or("unmatched", |p| p.as_str())
            .to_owned();
        // The TCP peer (the application's host, or a proxy in front of it).
        let peer = ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
            .await
            .ok()
            .map(|c| c.0.ip());
        state
            .auth_failures
            .record(&state.service, reason, request_id.as_deref(), &route, peer);
        Err(ApiError::Unauthorized)
    }
}

/// Records `auth.failed` events, at most [`EventGate::PER_SECOND`] per second per node so that
/// a flood of bad keys cannot turn into a flood of writes (the rest are only counted in the
/// next recorded one).
#[derive(Debug, Default)]
pub struct AuthFailures {
    gate: EventGate,
    dropped: std::sync::atomic::AtomicU64,
}

impl AuthFailures {
    fn record(
        &self,
        service: &Arc<SessionService>,
        reason: &'static str,
        request_id: Option<&str>,
        route: &str,
        peer: Option<IpAddr>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = service.now();
        if !self.gate.allow(now) {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        let mut event = crate::webhooks::auth_failed(now, reason, request_id, route);
        event.ip = peer;
        let dropped = self.dropped.swap(0, Relaxed);
        if dropped > 0 {
            event
                .details
                .insert("not_recorded_before".into(), dropped.into());
        }
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = service.record(vec![event]).await {
                tracing::warn!(error = %e, "cannot record auth.failed");
            }
        });
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return false };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Reads and parses a strict JSON body.
pub(crate) async fn read_json<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
    limit: usize,
) -> Result<T, ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !is_json(ct) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidRequest("the request body could not be read".into())
        }
    })?;
    // Every request body of the API is a JSON object; serde would otherwise read a struct from
    // an array, by position.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "the request body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidRequest(describe_json_error(&e)))
}

/// A query string whose parameters must all be known (the target types deny unknown fields).
#[derive(Debug, Clone)]
pub struct StrictQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| StrictQuery(v))
            .map_err(|e| {
                ApiError::InvalidRequest(format!("invalid query string: {}", e.body_text()))
            })
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` value; the scheme name is
/// case-insensitive (RFC 9110, section 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(rest)
}
