//! Wire types of the sessiond HTTP API v1.
//!
//! Requests, responses, the session object, the tenant policy document and the problem
//! (RFC 9457) error body, with their stable error codes. Serde only, no logic: the server and
//! the client SDK share these types so that they cannot drift apart.
//!
//! Every request type rejects unknown fields, so that a typo in a client is a `400` and not a
//! silently ignored setting.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object: the application's session data, or a merge patch for it.
pub type JsonObject = Map<String, Value>;

/// How the user proved who they are, as told by the application at create or step-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuthInput {
    /// The authentication method, for example `password`, `webauthn`, `oidc`.
    #[serde(default)]
    pub method: Option<String>,
    /// Authenticator assurance level (NIST SP 800-63B): 1, 2 or 3.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3))]
    pub aal: Option<u8>,
    /// When the user authenticated; defaults to now. Not accepted in the future.
    #[serde(default)]
    pub authenticated_at: Option<DateTime<Utc>>,
}

/// The end user's client, as seen by the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClientInput {
    /// The client's IP address (IPv4 or IPv6).
    #[serde(default)]
    pub ip: Option<String>,
    /// The client's `User-Agent` header.
    #[serde(default)]
    pub user_agent: Option<String>,
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// The authenticated user's id (required, non-empty).
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub user_id: String,
    /// The tenant whose policy applies; `default` when absent.
    #[serde(default)]
    pub tenant: Option<String>,
    /// A long-lived "remember me" session with the policy's remember-me timeouts.
    #[serde(default)]
    pub remember_me: bool,
    /// How the user authenticated.
    #[serde(default)]
    pub auth: Option<AuthInput>,
    /// The user's client.
    #[serde(default)]
    pub client: Option<ClientInput>,
    /// Initial application session data.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub data: Option<JsonObject>,
    /// Application claims to put into every access token of this session (token mode only).
    /// Registered and sessiond claim names (`iss`, `sub`, `aud`, `exp`, `nbf`, `iat`, `jti`, `sid`,
    /// `auth_time`, `aal`, `tenant`, ...) are refused.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub access_token_claims: Option<JsonObject>,
}

/// Step-up requirements a verify can ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// The user must have authenticated at most this many seconds ago.
    #[serde(default)]
    pub max_auth_age_s: Option<u64>,
    /// The session's assurance level must be at least this.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3))]
    pub min_aal: Option<u8>,
}

/// `POST /v1/sessions/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The session token presented by the user. Exactly one of `token` and `access_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// An access token (JWT) issued in token mode. Exactly one of `token` and `access_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// The client presenting it.
    #[serde(default)]
    pub client: Option<ClientInput>,
    /// Step-up requirements for this request.
    #[serde(default)]
    pub require: Option<Requirements>,
}

/// `POST /v1/sessions/rotate` and `POST /v1/sessions/logout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The session token.
    pub token: String,
}

/// `POST /v1/sessions/reauthenticate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReauthenticateRequest {
    /// The session token.
    pub token: String,
    /// The fresh authentication.
    pub auth: AuthInput,
    /// The client the user re-authenticated from: the session is bound to it from now on (see
    /// the policy's `binding`).
    #[serde(default)]
    pub client: Option<ClientInput>,
}

/// `POST /v1/tokens/refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token.
    pub refresh_token: String,
}

/// `PATCH /v1/sessions/{handle}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PatchSessionRequest {
    /// A JSON merge patch (RFC 7396) for the session data: a key set to `null` is removed.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: JsonObject,
}

/// How a session was authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuthInfo {
    /// The authentication method.
    pub method: String,
    /// Authenticator assurance level, 1 to 3.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3))]
    pub aal: u8,
    /// When the user last authenticated (at create or step-up).
    #[serde(with = "timestamp")]
    pub authenticated_at: DateTime<Utc>,
}

/// Where a session is used from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Location {
    /// ISO 3166-1 alpha-2 country code.
    pub country: Option<String>,
    /// City name.
    pub city: Option<String>,
    /// Latitude, in degrees (city-level precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    /// Longitude, in degrees (city-level precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
}

/// The device a session was created on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    /// The client IP address at create.
    pub ip: Option<String>,
    /// The raw user agent.
    pub user_agent: Option<String>,
    /// The browser family parsed from the user agent.
    pub browser: Option<String>,
    /// The operating system parsed from the user agent.
    pub os: Option<String>,
    /// The location, when geolocation data is configured.
    pub location: Option<Location>,
}

/// A session's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Valid until its idle or absolute expiry.
    Active,
    /// Ended by logout, revocation, eviction or a detector.
    Revoked,
    /// Ended by its idle or absolute timeout.
    Expired,
}

/// The session object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Session {
    /// The public, non-secret id of the session.
    pub handle: String,
    /// The user's id.
    pub user_id: String,
    /// The tenant.
    pub tenant: String,
    /// Active, revoked or expired.
    pub status: SessionStatus,
    /// When the session was created.
    #[serde(with = "timestamp")]
    pub created_at: DateTime<Utc>,
    /// When the session was last used.
    #[serde(with = "timestamp")]
    pub last_seen_at: DateTime<Utc>,
    /// Sliding expiry: `last_seen_at` plus the idle timeout.
    #[serde(with = "timestamp")]
    pub idle_expires_at: DateTime<Utc>,
    /// Absolute expiry: `created_at` plus the absolute timeout; never slides.
    #[serde(with = "timestamp")]
    pub expires_at: DateTime<Utc>,
    /// Whether this is a remember-me session.
    pub remember_me: bool,
    /// How the user authenticated.
    pub auth: AuthInfo,
    /// The device.
    pub device: Device,
    /// Application session data.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: JsonObject,
    /// Why the session was revoked; `null` unless revoked.
    pub revoked_reason: Option<String>,
    /// What detectors found about the session, for example `binding_mismatch`.
    #[serde(default)]
    pub flags: Vec<String>,
}

/// A cookie ready for the application to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cookie {
    /// The cookie name.
    pub name: String,
    /// The cookie value (the session token).
    pub value: String,
    /// A complete `Set-Cookie` header value.
    pub set_cookie: String,
}

/// `201` of create, `200` of rotate and reauthenticate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionWithToken {
    /// The session.
    pub session: Session,
    /// The secret session token. Returned only here.
    pub token: String,
    /// The session cookie.
    pub cookie: Cookie,
    /// A signed access token (JWT), when the tenant's policy has token mode on. Rotate and
    /// reauthenticate answer a new one: access tokens issued before no longer verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// When the access token expires.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "timestamp::option"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub access_token_expires_at: Option<DateTime<Utc>>,
    /// The refresh token, when the tenant's policy has token mode on (and refresh tokens are
    /// on). Rotate and reauthenticate answer a new one: every refresh token issued before is
    /// refused (`session_unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// `200` of `POST /v1/tokens/refresh`: a new access token and a new refresh token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenPair {
    /// The session, its idle expiry slid.
    pub session: Session,
    /// The new access token (JWT).
    pub access_token: String,
    /// When the access token expires.
    #[serde(with = "timestamp")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub access_token_expires_at: DateTime<Utc>,
    /// The new refresh token; the one presented is spent.
    pub refresh_token: String,
}

/// One public key of `GET /.well-known/jwks.json` (RFC 7517): an Ed25519 (`OKP`) or P-256
/// (`EC`) signature key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Jwk {
    /// Key type: `OKP` (Ed25519) or `EC` (P-256).
    pub kty: String,
    /// Curve: `Ed25519` or `P-256`.
    pub crv: String,
    /// Public key (Ed25519), or the x coordinate (P-256), base64url.
    pub x: String,
    /// The y coordinate (P-256), base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// Key id: the `kid` of the tokens it signs.
    pub kid: String,
    /// Algorithm: `EdDSA` or `ES256`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

/// `GET /.well-known/jwks.json`: every key that may have signed a live access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// The claims of a sessiond access token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccessClaims {
    /// Issuer (the tenant policy's `tokens.issuer`).
    pub iss: String,
    /// Audience (the tenant policy's `tokens.audience`).
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// The session handle.
    pub sid: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not before (Unix seconds).
    pub nbf: i64,
    /// Expires (Unix seconds).
    pub exp: i64,
    /// When the user last authenticated (Unix seconds).
    pub auth_time: i64,
    /// Authenticator assurance level.
    pub aal: u8,
    /// The tenant.
    pub tenant: String,
    /// Token id.
    pub jti: String,
    /// How many times the session's token had been rotated (rotate, reauthenticate) when this
    /// access token was issued; absent for none. The server refuses an access token issued
    /// before the session's last rotation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rot: u32,
    /// The application's claims given at create.
    #[serde(flatten)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub extra: JsonObject,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The claim names sessiond sets itself; `access_token_claims` may not use them.
pub const RESERVED_CLAIMS: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "sid",
    "auth_time",
    "aal",
    "tenant",
    "rot",
    "amr",
    "acr",
    "azp",
    "scope",
    "cnf",
    "typ",
    "kid",
    "alg",
];

/// `PATCH /v1/sessions/{handle}`.
/// `200` of verify, get, patch and delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionResponse {
    /// The session.
    pub session: Session,
}

/// `200` of logout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogoutResponse {
    /// The session, now revoked (or already ended).
    pub session: Session,
    /// A `Set-Cookie` value that deletes the session cookie.
    pub clear_cookie: String,
}

/// `GET /v1/users/{user_id}/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionList {
    /// The sessions of this page, most recently seen first.
    pub sessions: Vec<Session>,
    /// The cursor of the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// `DELETE /v1/users/{user_id}/sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForceLogoutResponse {
    /// How many sessions were revoked.
    pub revoked: u64,
}

/// An audit event: one state change of a session, a policy or the API's access.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Sortable id: later events of one node have greater ids.
    pub id: String,
    /// When it happened.
    #[serde(with = "timestamp")]
    pub time: DateTime<Utc>,
    /// `session.created`, `session.rotated`, `session.reauthenticated`, `session.refreshed`,
    /// `session.revoked`, `session.aal_lowered`, `session.expired`, `session.data_updated`,
    /// `policy.updated`, `webhook.created`, `webhook.updated`, `webhook.deleted`, `keys.rotated`,
    /// `auth.failed`, `security.brute_force`, `security.invalid_token`,
    /// `security.create_throttled`, `security.step_up_denied`, `security.binding_mismatch`,
    /// `security.impossible_travel`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The tenant.
    pub tenant: String,
    /// The user, for session events.
    pub user_id: Option<String>,
    /// The session, for session events.
    pub handle: Option<String>,
    /// The end user's client IP, when known.
    pub ip: Option<String>,
    /// The end user's user agent, when known.
    pub user_agent: Option<String>,
    /// Who made the change: `api_key:<fingerprint>`, `system` (the sweeper) or `anonymous`.
    pub actor: Option<String>,
    /// The request that made the change (`X-Request-Id`).
    pub request_id: Option<String>,
    /// Why, for revocations and failures.
    pub reason: Option<String>,
    /// Type-specific details, for example `new_device` and `device_id` of `session.created`.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub details: JsonObject,
}

/// The query of `GET /v1/events` (and of `GET /v1/users/{user_id}/events`, which sets
/// `user_id` from the path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct EventQueryParams {
    /// Only this user's events.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Only this session's events.
    #[serde(default)]
    pub handle: Option<String>,
    /// Only this type, for example `session.revoked`.
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    /// Only at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// Only before this time (RFC 3339).
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1 to 500 (default 50).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `GET /v1/events` and `GET /v1/users/{user_id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventList {
    /// The events of this page, newest first.
    pub events: Vec<Event>,
    /// The cursor of the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// `PUT /v1/webhooks/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WebhookInput {
    /// Where events are POSTed: `https://...` (or `http://` to a loopback address).
    pub url: String,
    /// Event types to deliver; `security.*` matches every type with that prefix, `*` all.
    pub events: Vec<String>,
    /// The signing secret, `whsec_` followed by base64 of 24 to 64 random bytes.
    pub secret: String,
}

/// A webhook endpoint. The secret is never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Webhook {
    /// The name (the path segment).
    pub name: String,
    /// Where events are POSTed.
    pub url: String,
    /// The event types delivered.
    pub events: Vec<String>,
    /// `config` (from the configuration file, read-only here) or `api`.
    pub source: String,
}

/// `GET /v1/webhooks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookList {
    /// Every endpoint, by name.
    pub webhooks: Vec<Webhook>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not yet accepted by the receiver; retried at `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed: dead-lettered, not retried.
    Dead,
}

impl DeliveryState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }
}

/// One event on its way to one webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivery {
    /// `<event id>.<webhook name>`; also the `webhook-id` header, the same on every attempt.
    pub id: String,
    /// The webhook.
    pub webhook: String,
    /// The event delivered.
    pub event: Event,
    /// Pending, delivered or dead.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (pending only).
    #[serde(with = "timestamp::option")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The HTTP status of the last attempt, if the receiver answered.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the delivery was queued.
    #[serde(with = "timestamp")]
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(with = "timestamp")]
    pub updated_at: DateTime<Utc>,
}

/// `GET /v1/webhooks/{name}/deliveries`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryList {
    /// The deliveries of this page, newest first.
    pub deliveries: Vec<Delivery>,
    /// The cursor of the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// What happens when a user is at the session limit and creates another session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Revoke the least recently used session (reason `limit_evicted`).
    #[default]
    EvictOldest,
    /// Refuse the new session (`409 session_limit_reached`).
    Deny,
}

/// The cookie's `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SameSite {
    /// `SameSite=Strict`.
    Strict,
    /// `SameSite=Lax`.
    #[default]
    Lax,
    /// `SameSite=None` (requires `Secure`).
    None,
}

/// How the session cookie is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CookiePolicy {
    /// Cookie name; `__Host-` names need `secure`, path `/` and no domain.
    #[serde(default = "default_cookie_name")]
    pub name: String,
    /// `Domain` attribute; `null` for a host-only cookie.
    #[serde(default)]
    pub domain: Option<String>,
    /// `Path` attribute.
    #[serde(default = "default_cookie_path")]
    pub path: String,
    /// `SameSite` attribute.
    #[serde(default)]
    pub same_site: SameSite,
    /// `Secure` attribute.
    #[serde(default = "default_true")]
    pub secure: bool,
}

impl Default for CookiePolicy {
    fn default() -> Self {
        Self {
            name: default_cookie_name(),
            domain: None,
            path: default_cookie_path(),
            same_site: SameSite::Lax,
            secure: true,
        }
    }
}

fn default_cookie_name() -> String {
    "__Host-session".to_owned()
}
fn default_cookie_path() -> String {
    "/".to_owned()
}
fn default_true() -> bool {
    true
}

/// A tenant's session policy: the document of `GET`/`PUT /v1/tenants/{tenant}/policy`.
///
/// Absent fields take their defaults, so `{}` is the default policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Idle timeout of a plain session.
    #[serde(default = "d_idle")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub idle_timeout_s: u64,
    /// Absolute timeout of a plain session.
    #[serde(default = "d_abs")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub absolute_timeout_s: u64,
    /// Idle timeout of a remember-me session.
    #[serde(default = "d_rm_idle")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub remember_me_idle_timeout_s: u64,
    /// Absolute timeout of a remember-me session: at most 400 days, the longest cookie
    /// `Max-Age` browsers keep.
    #[serde(default = "d_rm_abs")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 34_560_000))]
    pub remember_me_absolute_timeout_s: u64,
    /// At most this many active sessions per user (100 when absent); `null` for no limit.
    #[serde(default = "d_max_sessions")]
    pub max_sessions_per_user: Option<u32>,
    /// What happens at the limit.
    #[serde(default)]
    pub on_limit: OnLimit,
    /// The session cookie.
    #[serde(default)]
    pub cookie: CookiePolicy,
    /// Token mode: signed access tokens and rotating refresh tokens. Absent or `null`: opaque
    /// session tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensPolicy>,
    /// Client binding: what verify does when the client differs from the one at create.
    /// Absent or `null`: no binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingPolicy>,
    /// Impossible travel: what verify does when a user's sessions are used from places too
    /// far apart for the time between the uses. Needs a geolocation database. Absent or
    /// `null`: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impossible_travel: Option<TravelPolicy>,
    /// Refuse to create a session without an authentication event: a create must name
    /// `auth.method`. Off by default (an omitted `auth` is recorded as method `unknown`, AAL 1).
    #[serde(default)]
    pub require_auth: bool,
    /// How long an authentication keeps its assurance level (NIST SP 800-63B): past these
    /// limits a session still alive under its timeouts counts as AAL 1 (`require.min_aal`,
    /// access tokens' `aal`) until it is reauthenticated.
    #[serde(default)]
    pub aal_timeouts: AalTimeouts,
}

/// Per-assurance-level reauthentication limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AalTimeouts {
    /// AAL 2: reauthentication every 12 hours and after 30 minutes without use by default.
    #[serde(default = "d_aal2")]
    pub aal2: AalLimits,
    /// AAL 3: reauthentication every 12 hours and after 15 minutes without use by default.
    /// No looser than `aal2`.
    #[serde(default = "d_aal3")]
    pub aal3: AalLimits,
}

impl Default for AalTimeouts {
    fn default() -> Self {
        Self {
            aal2: d_aal2(),
            aal3: d_aal3(),
        }
    }
}

/// How long an authentication at one assurance level counts as that level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AalLimits {
    /// Longest time without use of the session, in seconds.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub idle_timeout_s: u64,
    /// Longest time since the authentication (`auth.authenticated_at`), in seconds.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub absolute_timeout_s: u64,
}

fn d_aal2() -> AalLimits {
    AalLimits {
        idle_timeout_s: 1800,
        absolute_timeout_s: 43_200,
    }
}
fn d_aal3() -> AalLimits {
    AalLimits {
        idle_timeout_s: 900,
        absolute_timeout_s: 43_200,
    }
}

/// The impossible-travel detector's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TravelPolicy {
    /// Fastest believable travel between two uses, in km/h (1 to 100000; default 1000).
    #[serde(default = "d_speed")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100_000))]
    pub max_speed_kmh: u32,
    /// What a finding does: `flag` (`impossible_travel`), `reauthenticate` or `revoke`.
    #[serde(default)]
    pub action: BindingAction,
}

fn d_speed() -> u32 {
    1000
}

/// How a session is bound to the client it was created from. Verify compares the `client` it
/// is given with the session's device; without a `client` there is nothing to compare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BindingPolicy {
    /// `off`, `subnet` (the same /24 for IPv4, /64 for IPv6) or `exact`.
    #[serde(default)]
    pub ip: IpBinding,
    /// `off`, `family` (the same browser and OS family) or `exact`.
    #[serde(default)]
    pub user_agent: UserAgentBinding,
    /// On a mismatch: `flag` the session (it stays valid), demand `reauthenticate`
    /// (`403 reauthentication_required`), or `revoke` it (`401 session_revoked`, reason
    /// `anomaly`). Each mismatch is recorded as `security.binding_mismatch`.
    #[serde(default)]
    pub action: BindingAction,
}

/// IP binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum IpBinding {
    /// Not compared.
    #[default]
    Off,
    /// The same network: /24 for IPv4, /64 for IPv6.
    Subnet,
    /// The same address.
    Exact,
}

/// User-agent binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UserAgentBinding {
    /// Not compared.
    #[default]
    Off,
    /// The same browser and OS family (a browser update is not a mismatch).
    Family,
    /// The same user agent, byte for byte.
    Exact,
}

/// What a binding mismatch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BindingAction {
    /// Mark the session (`flags` gains `binding_mismatch`); it stays valid.
    #[default]
    Flag,
    /// Answer `403 reauthentication_required` until the session is reauthenticated.
    Reauthenticate,
    /// Revoke the session (reason `anomaly`).
    Revoke,
}

/// `POST /v1/users/{user_id}/sessions/revoke`: which of the user's active sessions to revoke.
/// Every given criterion must hold; at least one must be given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RevokeSessionsRequest {
    /// Only these sessions (handles).
    #[serde(default)]
    pub handles: Option<Vec<String>>,
    /// Only sessions created before this time.
    #[serde(default, with = "timestamp::option")]
    pub created_before: Option<DateTime<Utc>>,
    /// Only sessions located in this country (ISO 3166-1 alpha-2; needs geolocation data).
    #[serde(default)]
    pub country: Option<String>,
    /// Only sessions a detector flagged (`true`), or only unflagged ones (`false`).
    #[serde(default)]
    pub flagged: Option<bool>,
    /// Only this tenant's sessions.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The revocation reason (1 to 64 of `a-z 0-9 _`); `revoked` when absent.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer of `POST /v1/users/{user_id}/sessions/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokeSessionsResponse {
    /// How many sessions this call revoked.
    pub revoked: u64,
    /// Their handles.
    pub handles: Vec<String>,
}

/// Token mode of a tenant: JWT access tokens beside the session token, and refresh tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokensPolicy {
    /// Lifetime of an access token, 1 to 3600 seconds; never beyond the session's absolute expiry.
    #[serde(default = "d_access_ttl")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 3600))]
    pub access_token_ttl_s: u64,
    /// Issue a refresh token at create.
    #[serde(default = "default_true")]
    pub refresh_token: bool,
    /// For how long a spent refresh token still returns the pair it was exchanged for (concurrent
    /// tabs), 0 to 60 seconds. Later reuse revokes the session (`theft_detected`).
    #[serde(default = "d_grace")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 60))]
    pub refresh_reuse_grace_s: u64,
    /// The `iss` claim.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub issuer: String,
    /// The `aud` claim.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub audience: String,
}

impl TokensPolicy {
    /// Token mode for this issuer and audience, with the defaults a `PUT` fills in for absent
    /// fields.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            access_token_ttl_s: d_access_ttl(),
            refresh_token: default_true(),
            refresh_reuse_grace_s: d_grace(),
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }
}

fn d_access_ttl() -> u64 {
    300
}
fn d_grace() -> u64 {
    10
}

fn d_idle() -> u64 {
    1800
}
fn d_abs() -> u64 {
    43_200
}
fn d_rm_idle() -> u64 {
    1_209_600
}
fn d_rm_abs() -> u64 {
    2_592_000
}

/// The default per-user session limit: more than real applications reach, so that a flood of
/// logins for one account cannot grow without bound.
pub const DEFAULT_MAX_SESSIONS_PER_USER: u32 = 100;

#[allow(clippy::unnecessary_wraps)]
fn d_max_sessions() -> Option<u32> {
    Some(DEFAULT_MAX_SESSIONS_PER_USER)
}

impl Default for PolicyDocument {
    fn default() -> Self {
        Self {
            idle_timeout_s: d_idle(),
            absolute_timeout_s: d_abs(),
            remember_me_idle_timeout_s: d_rm_idle(),
            remember_me_absolute_timeout_s: d_rm_abs(),
            max_sessions_per_user: d_max_sessions(),
            on_limit: OnLimit::EvictOldest,
            cookie: CookiePolicy::default(),
            tokens: None,
            binding: None,
            impossible_travel: None,
            require_auth: false,
            aal_timeouts: AalTimeouts::default(),
        }
    }
}

/// An RFC 9457 problem: the body of every error response (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for humans.
    pub detail: String,
    /// The stable error code clients branch on (see [`codes`]).
    pub code: String,
}

/// The stable error codes of problem responses.
pub mod codes {
    /// `401`: missing or wrong API key.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// `400`: malformed or invalid request.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// `413`: request body over the limit.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// `413`: session data over the limit.
    pub const DATA_TOO_LARGE: &str = "data_too_large";
    /// `415`: request body is not JSON.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// `401`: no session has this token.
    pub const SESSION_UNKNOWN: &str = "session_unknown";
    /// `401`: the session timed out.
    pub const SESSION_EXPIRED: &str = "session_expired";
    /// `401`: the session was revoked.
    pub const SESSION_REVOKED: &str = "session_revoked";
    /// `403`: the session is valid but the request needs a fresher or stronger authentication.
    pub const REAUTHENTICATION_REQUIRED: &str = "reauthentication_required";
    /// `409`: the user is at the session limit and the policy denies more.
    pub const SESSION_LIMIT_REACHED: &str = "session_limit_reached";
    /// `409`: the session is not active.
    pub const SESSION_NOT_ACTIVE: &str = "session_not_active";
    /// `404`: no such resource.
    pub const NOT_FOUND: &str = "not_found";
    /// `405`: method not allowed on this path.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// `400`: the policy document is invalid.
    pub const INVALID_POLICY: &str = "invalid_policy";
    /// `409`: a concurrent change to the same session won; retry.
    pub const CONFLICT: &str = "conflict";
    /// `401`: a spent refresh token was presented again after the grace period; the session was
    /// revoked (`theft_detected`).
    pub const TOKEN_REUSED: &str = "token_reused";
    /// `401`: the access or refresh token is malformed, has a bad signature, an unknown key, a
    /// wrong issuer or audience, is not yet valid, or the tenant's token mode is off.
    pub const TOKEN_INVALID: &str = "token_invalid";
    /// `401`: the access token has expired; refresh it.
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// `429`: too many failed verifications from this client network, or too many sessions
    /// created for this user or from this network; retry after the `Retry-After` seconds.
    pub const TOO_MANY_ATTEMPTS: &str = "too_many_attempts";
    /// `507`: the server holds as many live sessions as it is configured to
    /// (`limits.max_sessions`); no session can be created until some end.
    pub const SESSION_CAPACITY_REACHED: &str = "session_capacity_reached";
    /// `429`: the tenant holds as many live sessions as it may
    /// (`limits.max_sessions_per_tenant`).
    pub const TENANT_SESSION_LIMIT: &str = "tenant_session_limit";
    /// `503`: the store cannot be reached; the server fails closed.
    pub const STORE_UNAVAILABLE: &str = "store_unavailable";
    /// `500`: an internal error (details are in the server log under the request id).
    pub const INTERNAL: &str = "internal";
    /// `503`: the server is at its concurrency cap; retry after the `Retry-After` seconds.
    pub const OVERLOADED: &str = "overloaded";
    /// `503`: the request did not finish within the server's request timeout.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// `400`: the webhook URL is, or resolves to, an address deliveries may not go to
    /// (loopback over https, private, link-local, shared, unique-local, special-purpose) and
    /// is not listed in the server's `webhooks.allowed_hosts`.
    pub const WEBHOOK_URL_REFUSED: &str = "webhook_url_refused";
    /// `409`: signing keys (token mode) or webhook secrets cannot be stored sealed: the server
    /// has no keyring key and is not configured to store them unsealed.
    pub const KEYRING_KEY_REQUIRED: &str = "keyring_key_required";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_policy_document_is_the_default() {
        let p: PolicyDocument = serde_json::from_str("{}").unwrap();
        assert_eq!(p, PolicyDocument::default());
    }

    #[test]
    fn policy_document_round_trips() {
        let p = PolicyDocument::default();
        let text = serde_json::to_string(&p).unwrap();
        let back: PolicyDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(p, back);
        assert!(text.contains("\"on_limit\":\"evict_oldest\""));
        assert!(text.contains("\"same_site\":\"Lax\""));
    }

    #[test]
    fn requests_reject_unknown_fields() {
        let err = serde_json::from_str::<CreateSessionRequest>(r#"{"user_id":"u","usr":"x"}"#);
        assert!(err.is_err());
        let err = serde_json::from_str::<PolicyDocument>(r#"{"idle_timeout":5}"#);
        assert!(err.is_err());
    }
}

/// Timestamps on the wire: RFC 3339 UTC with exactly three fractional digits
/// (`2026-01-02T03:04:05.000Z`), so that every timestamp has the same width and two of them
/// compare as strings in time order. Any RFC 3339 timestamp is accepted on input.
pub mod timestamp {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Formats `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Serializes with [`format`].
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    /// Accepts any RFC 3339 timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }

    /// The same for an optional timestamp.
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes with [`super::format`], `null` for `None`.
        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        /// Accepts any RFC 3339 timestamp or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<DateTime<Utc>>::deserialize(d)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::format;
        use chrono::{TimeZone, Utc};

        #[test]
        fn whole_seconds_keep_their_millis_so_strings_sort_in_time_order() {
            let whole = Utc.timestamp_millis_opt(1_800_000_000_000).unwrap();
            let later = Utc.timestamp_millis_opt(1_800_000_000_015).unwrap();
            assert_eq!(format(&whole), "2027-01-15T08:00:00.000Z");
            assert_eq!(format(&later), "2027-01-15T08:00:00.015Z");
            assert!(format(&whole) < format(&later));
        }
    }
}
