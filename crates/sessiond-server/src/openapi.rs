//! The OpenAPI document of the HTTP API, served at `GET /openapi.json`.
//!
//! It is generated from the code: the paths, parameters and responses from the
//! `#[utoipa::path]` annotations on the handlers, the schemas from the wire types of
//! `sessiond-api` (built with its `openapi` feature). The document is built once per process and
//! served like a static file: public, cacheable, with an `ETag`.

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sessiond_api::Problem;
use sessiond_core::CoreError;
use sha2::{Digest, Sha256};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::server::ServerBuilder;
use utoipa::{Modify, OpenApi};

use crate::error::ApiError;
use crate::handlers;

/// The name of the API-key security scheme in the document.
pub const API_KEY_SCHEME: &str = "api_key";

/// How long clients and caches may keep the document without asking again.
const CACHE_CONTROL: &str = "public, max-age=3600";

/// The document's root: every operation of the API, and its components.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sessiond",
        description = "The sessiond HTTP API v1: user sessions for applications. Request and \
            response bodies are `application/json`; errors are RFC 9457 \
            `application/problem+json` with a stable `code`. Request bodies reject unknown \
            fields. Every `/v1` operation requires `Authorization: Bearer <api key>`.",
        contact(name = "sessiond", url = "https://github.com/sessiond/sessiond"),
    ),
    paths(
        handlers::create,
        handlers::verify,
        handlers::rotate,
        handlers::reauthenticate,
        handlers::logout,
        handlers::get_session,
        handlers::patch_session,
        handlers::revoke_session,
        handlers::list_user_sessions,
        handlers::force_logout,
        handlers::revoke_sessions,
        handlers::get_policy,
        handlers::put_policy,
        handlers::refresh,
        handlers::list_events,
        handlers::list_user_events,
        handlers::list_webhooks,
        handlers::get_webhook,
        handlers::put_webhook,
        handlers::delete_webhook,
        handlers::list_deliveries,
        handlers::jwks,
        handlers::metrics,
        handlers::healthz,
        handlers::readyz,
        document,
    ),
    components(schemas(Problem)),
    modifiers(&ApiKeyScheme),
    tags(
        (name = "sessions", description = "Create, verify, rotate and end sessions."),
        (name = "users", description = "A user's sessions."),
        (name = "tenants", description = "A tenant's session policy."),
        (name = "tokens", description = "Token mode: refresh tokens and the public keys of access tokens."),
        (name = "events", description = "The audit log: every session and policy change, and failed API keys."),
        (name = "webhooks", description = "Webhook endpoints and their deliveries (signed per Standard Webhooks)."),
        (name = "service", description = "Health, readiness and this document (no API key)."),
    ),
)]
pub struct ApiDoc;

/// Adds the API-key security scheme, as the server checks it: required by default (top-level
/// `security`), and `security: []` on the public operations (every operation whose annotation
/// names no requirement: health, readiness, this document, the JWKS), so that tools can tell
/// "public" from "forgotten". Adds the server (relative: wherever the document was fetched).
struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ]
            .into_iter()
            .flatten()
            {
                op.security.get_or_insert_with(Vec::new);
            }
        }
        openapi.security = Some(vec![SecurityRequirement::new(
            API_KEY_SCHEME,
            Vec::<String>::new(),
        )]);
        openapi.servers = Some(vec![
            ServerBuilder::new()
                .url("/")
                .description(Some(
                    "The server this document was fetched from (`GET /openapi.json`).",
                ))
                .build(),
        ]);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "An API key from the server's configuration (`SESSIOND_API_KEY` or a key file), \
                 sent as `Authorization: Bearer <api key>`. A missing or wrong key is `401` \
                 with code `unauthorized`.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(API_KEY_SCHEME, SecurityScheme::Http(scheme));
    }
}

/// The serialized document and its entity tag.
struct Served {
    body: Bytes,
    etag: HeaderValue,
}

fn served() -> Option<&'static Served> {
    static DOC: OnceLock<Option<Served>> = OnceLock::new();
    DOC.get_or_init(|| {
        let body = match ApiDoc::openapi().to_json() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize the OpenAPI document");
                return None;
            }
        };
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).ok()?;
        Some(Served {
            body: Bytes::from(body),
            etag,
        })
    })
    .as_ref()
}

/// The document, pretty-printed (`sessiond openapi`).
pub fn json() -> Result<String, serde_json::Error> {
    ApiDoc::openapi().to_pretty_json()
}

/// Whether an `If-None-Match` header matches `etag` (weak comparison, `*` matches).
fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// `GET /openapi.json` (public)
///
/// This OpenAPI document, cacheable, with an `ETag`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    params(
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of this document from an earlier response."),
    ),
    responses(
        (status = 200, description = "This OpenAPI document.", body = Object, content_type = "application/json"),
        (status = 304, description = "Not modified: `If-None-Match` names the current `ETag`."),
        (status = 500, description = "`internal`: the document could not be built.", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn document(headers: HeaderMap) -> Response {
    let Some(doc) = served() else {
        return ApiError::Core(CoreError::Internal(
            "the OpenAPI document could not be built".into(),
        ))
        .into_response();
    };
    let cache = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        ),
        (header::ETAG, doc.etag.clone()),
    ];
    if not_modified(&headers, &doc.etag) {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        cache,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        doc.body.clone(),
    )
        .into_response()
}
