//! Extractors: strict JSON bodies and queries, and the API-key guard.
//!
//! Rejections are turned into problem responses here, so a handler only ever sees valid input.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
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

/// The configured API keys, kept as SHA-256 digests.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<[u8; 32]>>);

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
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        ))
    }

    /// Whether `presented` is one of the keys. Constant time in the key's content: every
    /// configured digest is compared, with no early exit.
    pub fn check(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut ok = subtle::Choice::from(0);
        for k in self.0.iter() {
            ok |= k.ct_eq(&d);
        }
        ok.into()
    }
}

/// Proof that the request carried a valid API key. A handler that takes it cannot run without.
#[derive(Debug, Clone, Copy)]
pub struct Admin(());

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    ApiKeys: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = ApiKeys::from_ref(state);
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        if keys.check(presented) {
            Ok(Admin(()))
        } else {
            Err(ApiError::Unauthorized)
        }
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
