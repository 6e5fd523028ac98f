//! [`Client`]: the typed async client of the sessiond HTTP API v1, one method per endpoint.

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sessiond_api::{
    AuthInput, ClientInput, CreateSessionRequest, DeliveryList, DeliveryState, EventList,
    EventQueryParams, ForceLogoutResponse, JsonObject, JwkSet, LogoutResponse, PolicyDocument,
    Problem, RevokeSessionsRequest, RevokeSessionsResponse, SessionList, SessionResponse,
    SessionWithToken, TokenPair, VerifyRequest, Webhook, WebhookInput, WebhookList,
};

use crate::error::Error;
use crate::jwks;
use crate::verifier::VerifierBuilder;

/// The timeout of a whole request made by a client built with [`Client::new`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The connect timeout of a client built with [`Client::new`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which sessions [`Client::list_user_sessions`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatusFilter {
    /// Active sessions only (the server's default).
    #[default]
    Active,
    /// Revoked and expired sessions not yet purged too.
    All,
}

impl StatusFilter {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::All => "all",
        }
    }
}

/// The query of [`Client::list_user_sessions`]; every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListOptions {
    /// `?status=`; the server's default (`active`) when `None`.
    pub status: Option<StatusFilter>,
    /// Only the sessions of this tenant; every tenant when `None`.
    pub tenant: Option<String>,
    /// Page size, 1 to 500; the server's default (50) when `None`.
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A typed async client for the sessiond HTTP API v1.
///
/// Cheap to clone (the connection pool is shared). Every `/v1/*` request carries
/// `Authorization: Bearer <api key>`; [`Client::jwks`] is public and carries none. The `Debug`
/// output shows the base URL but never the API key. Redirects are never followed: a `3xx` answer
/// is [`Error::Redirected`], so a body holding a token is only ever sent to the base URL.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    jwks_url: Url,
    auth: HeaderValue,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base.as_str())
            .field("api_key", &"[redacted]")
            .finish()
    }
}

// Request bodies that borrow their secrets instead of copying them into owned request types. The
// wire form is that of `TokenRequest`, `ReauthenticateRequest`, `RefreshRequest` and
// `PatchSessionRequest` of sessiond-api.
#[derive(Serialize)]
struct TokenBody<'a> {
    token: &'a str,
}

#[derive(Serialize)]
struct ReauthenticateBody<'a> {
    token: &'a str,
    auth: &'a AuthInput,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a ClientInput>,
}

#[derive(Serialize)]
struct RefreshBody<'a> {
    refresh_token: &'a str,
}

#[derive(Serialize)]
struct PatchBody<'a> {
    data: &'a JsonObject,
}

impl Client {
    /// A client for the server at `base_url` (for example `http://127.0.0.1:8080`, or
    /// `https://example.com/sessiond/` behind a path prefix) with its own connection pool,
    /// [`DEFAULT_TIMEOUT`] and [`DEFAULT_CONNECT_TIMEOUT`], which follows no redirect.
    pub fn new(base_url: &str, api_key: &str) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_TIMEOUT)
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(Error::Transport)?;
        Self::with_http(base_url, api_key, http)
    }

    /// A client that sends its requests through `http` (to share a pool, or to set timeouts,
    /// proxies or TLS roots). Build `http` with `redirect(reqwest::redirect::Policy::none())`:
    /// this client cannot stop `http` from following a redirect and re-sending a request body
    /// (which may hold a token) to another origin; it only refuses the answer afterwards
    /// ([`Error::Redirected`]).
    pub fn with_http(base_url: &str, api_key: &str, http: reqwest::Client) -> Result<Self, Error> {
        let mut base = Url::parse(base_url)
            .map_err(|_| Error::InvalidArgument("the base URL is not a valid URL"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::InvalidArgument("the base URL is not http or https"));
        }
        if base.cannot_be_a_base() {
            return Err(Error::InvalidArgument("the base URL cannot have paths"));
        }
        base.set_query(None);
        base.set_fragment(None);
        if api_key.is_empty() {
            return Err(Error::InvalidArgument("the API key is empty"));
        }
        let mut auth = HeaderValue::try_from(format!("Bearer {api_key}"))
            .map_err(|_| Error::InvalidArgument("the API key is not a valid header value"))?;
        auth.set_sensitive(true);
        let mut jwks_url = base.clone();
        jwks_url
            .path_segments_mut()
            .map_err(|()| Error::InvalidArgument("the base URL cannot have paths"))?
            .pop_if_empty()
            .extend([".well-known", "jwks.json"]);
        Ok(Self {
            http,
            base,
            jwks_url,
            auth,
        })
    }

    /// The base URL requests are made against.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The URL of the server's JWKS, `<base>/.well-known/jwks.json`.
    pub fn jwks_url(&self) -> &Url {
        &self.jwks_url
    }

    /// A builder of an [`AccessTokenVerifier`](crate::AccessTokenVerifier) that fetches the JWKS
    /// of this server through this client's connection pool.
    pub fn access_token_verifier(
        &self,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> VerifierBuilder {
        VerifierBuilder::new(Ok(self.jwks_url.clone()), issuer, audience)
            .http_client(self.http.clone())
    }

    /// `POST /v1/sessions`: creates a session for a user the application has authenticated.
    pub async fn create_session(
        &self,
        request: &CreateSessionRequest,
    ) -> Result<SessionWithToken, Error> {
        let url = self.url(&["v1", "sessions"])?;
        self.send(self.authed(Method::POST, url).json(request))
            .await
    }

    /// `POST /v1/sessions/verify`: verifies a session token (or an access token) and slides the
    /// session's idle expiry.
    pub async fn verify(&self, request: &VerifyRequest) -> Result<SessionResponse, Error> {
        let url = self.url(&["v1", "sessions", "verify"])?;
        self.send(self.authed(Method::POST, url).json(request))
            .await
    }

    /// `POST /v1/sessions/rotate`: issues a new token for the session; the old one stops working.
    /// In token mode the answer also holds a new access token and refresh token, and the earlier
    /// ones are refused by the server.
    pub async fn rotate(&self, token: &str) -> Result<SessionWithToken, Error> {
        let url = self.url(&["v1", "sessions", "rotate"])?;
        self.send(self.authed(Method::POST, url).json(&TokenBody { token }))
            .await
    }

    /// `POST /v1/sessions/reauthenticate`: records a fresh authentication (step-up) and rotates
    /// the token.
    pub async fn reauthenticate(
        &self,
        token: &str,
        auth: AuthInput,
    ) -> Result<SessionWithToken, Error> {
        let url = self.url(&["v1", "sessions", "reauthenticate"])?;
        let body = ReauthenticateBody {
            token,
            auth: &auth,
            client: None,
        };
        self.send(self.authed(Method::POST, url).json(&body)).await
    }

    /// As [`reauthenticate`](Self::reauthenticate), from `client`: the session is bound to that
    /// client from now on (the tenant's `binding` policy compares verifies with it).
    pub async fn reauthenticate_from(
        &self,
        token: &str,
        auth: AuthInput,
        client: &ClientInput,
    ) -> Result<SessionWithToken, Error> {
        let url = self.url(&["v1", "sessions", "reauthenticate"])?;
        let body = ReauthenticateBody {
            token,
            auth: &auth,
            client: Some(client),
        };
        self.send(self.authed(Method::POST, url).json(&body)).await
    }

    /// `POST /v1/sessions/logout`: revokes the session of `token` (idempotent).
    pub async fn logout(&self, token: &str) -> Result<LogoutResponse, Error> {
        let url = self.url(&["v1", "sessions", "logout"])?;
        self.send(self.authed(Method::POST, url).json(&TokenBody { token }))
            .await
    }

    /// `GET /v1/sessions/{handle}`: the session, whatever its status.
    pub async fn get_session(&self, handle: &str) -> Result<SessionResponse, Error> {
        let url = self.url(&["v1", "sessions", handle])?;
        self.send(self.authed(Method::GET, url)).await
    }

    /// `PATCH /v1/sessions/{handle}`: merges `data` into the session data (a key set to `null`
    /// is removed).
    pub async fn patch_session(
        &self,
        handle: &str,
        data: &JsonObject,
    ) -> Result<SessionResponse, Error> {
        let url = self.url(&["v1", "sessions", handle])?;
        self.send(self.authed(Method::PATCH, url).json(&PatchBody { data }))
            .await
    }

    /// `DELETE /v1/sessions/{handle}`: revokes the session, with `reason` (`revoked` when
    /// `None`). Idempotent.
    pub async fn revoke_session(
        &self,
        handle: &str,
        reason: Option<&str>,
    ) -> Result<SessionResponse, Error> {
        let mut url = self.url(&["v1", "sessions", handle])?;
        if let Some(reason) = reason {
            url.query_pairs_mut().append_pair("reason", reason);
        }
        self.send(self.authed(Method::DELETE, url)).await
    }

    /// `GET /v1/users/{user_id}/sessions`: one page of the user's sessions, most recently seen
    /// first. Pass the returned `next_cursor` as [`ListOptions::cursor`] for the next page.
    pub async fn list_user_sessions(
        &self,
        user_id: &str,
        options: &ListOptions,
    ) -> Result<SessionList, Error> {
        let mut url = self.url(&["v1", "users", user_id, "sessions"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(status) = options.status {
                query.append_pair("status", status.as_str());
            }
            if let Some(tenant) = &options.tenant {
                query.append_pair("tenant", tenant);
            }
            if let Some(limit) = options.limit {
                query.append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = &options.cursor {
                query.append_pair("cursor", cursor);
            }
        }
        strip_empty_query(&mut url);
        self.send(self.authed(Method::GET, url)).await
    }

    /// `DELETE /v1/users/{user_id}/sessions`: revokes all of the user's active sessions (of
    /// `tenant`, or of every tenant), except the one whose handle is `except`.
    pub async fn force_logout(
        &self,
        user_id: &str,
        except: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<ForceLogoutResponse, Error> {
        let mut url = self.url(&["v1", "users", user_id, "sessions"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(except) = except {
                query.append_pair("except", except);
            }
            if let Some(tenant) = tenant {
                query.append_pair("tenant", tenant);
            }
        }
        strip_empty_query(&mut url);
        self.send(self.authed(Method::DELETE, url)).await
    }

    /// `POST /v1/users/{user_id}/sessions/revoke`: revokes the user's active sessions that
    /// match every criterion given (handles, creation time, country, flagged).
    pub async fn revoke_sessions(
        &self,
        user_id: &str,
        request: &RevokeSessionsRequest,
    ) -> Result<RevokeSessionsResponse, Error> {
        let url = self.url(&["v1", "users", user_id, "sessions", "revoke"])?;
        self.send(self.authed(Method::POST, url).json(request))
            .await
    }

    /// `GET /v1/tenants/{tenant}/policy`: the tenant's policy (the default one until a
    /// [`put_policy`](Self::put_policy)).
    pub async fn get_policy(&self, tenant: &str) -> Result<PolicyDocument, Error> {
        let url = self.url(&["v1", "tenants", tenant, "policy"])?;
        self.send(self.authed(Method::GET, url)).await
    }

    /// `PUT /v1/tenants/{tenant}/policy`: replaces the tenant's policy; returns it as stored.
    pub async fn put_policy(
        &self,
        tenant: &str,
        policy: &PolicyDocument,
    ) -> Result<PolicyDocument, Error> {
        let url = self.url(&["v1", "tenants", tenant, "policy"])?;
        self.send(self.authed(Method::PUT, url).json(policy)).await
    }

    /// `POST /v1/tokens/refresh` (token mode): exchanges a refresh token for a new access token
    /// and a new refresh token; the one presented is spent.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, Error> {
        let url = self.url(&["v1", "tokens", "refresh"])?;
        self.send(
            self.authed(Method::POST, url)
                .json(&RefreshBody { refresh_token }),
        )
        .await
    }

    /// `GET /v1/events`: one page of the audit log, newest first. Pass the returned
    /// `next_cursor` as `query.cursor` for the next (older) page.
    pub async fn list_events(&self, query: &EventQueryParams) -> Result<EventList, Error> {
        let mut url = self.url(&["v1", "events"])?;
        event_query(&mut url, query, true);
        self.send(self.authed(Method::GET, url)).await
    }

    /// `GET /v1/users/{user_id}/events`: one page of the user's events, newest first
    /// (`query.user_id` is ignored).
    pub async fn list_user_events(
        &self,
        user_id: &str,
        query: &EventQueryParams,
    ) -> Result<EventList, Error> {
        let mut url = self.url(&["v1", "users", user_id, "events"])?;
        event_query(&mut url, query, false);
        self.send(self.authed(Method::GET, url)).await
    }

    /// `GET /v1/webhooks`: every webhook endpoint (without secrets).
    pub async fn list_webhooks(&self) -> Result<WebhookList, Error> {
        let url = self.url(&["v1", "webhooks"])?;
        self.send(self.authed(Method::GET, url)).await
    }

    /// `GET /v1/webhooks/{name}`.
    pub async fn get_webhook(&self, name: &str) -> Result<Webhook, Error> {
        let url = self.url(&["v1", "webhooks", name])?;
        self.send(self.authed(Method::GET, url)).await
    }

    /// `PUT /v1/webhooks/{name}`: creates or replaces an endpoint.
    pub async fn put_webhook(&self, name: &str, input: &WebhookInput) -> Result<Webhook, Error> {
        let url = self.url(&["v1", "webhooks", name])?;
        self.send(self.authed(Method::PUT, url).json(input)).await
    }

    /// `DELETE /v1/webhooks/{name}`.
    pub async fn delete_webhook(&self, name: &str) -> Result<(), Error> {
        let url = self.url(&["v1", "webhooks", name])?;
        let response = self
            .authed(Method::DELETE, url)
            .send()
            .await
            .map_err(Error::Transport)?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(error_from(response).await)
        }
    }

    /// `GET /v1/webhooks/{name}/deliveries`: one page of the endpoint's deliveries, newest
    /// first; `state` `Dead` lists the dead letters.
    pub async fn list_deliveries(
        &self,
        name: &str,
        state: Option<DeliveryState>,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<DeliveryList, Error> {
        let mut url = self.url(&["v1", "webhooks", name, "deliveries"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(state) = state {
                query.append_pair("state", state.as_str());
            }
            if let Some(cursor) = cursor {
                query.append_pair("cursor", cursor);
            }
            if let Some(limit) = limit {
                query.append_pair("limit", &limit.to_string());
            }
        }
        strip_empty_query(&mut url);
        self.send(self.authed(Method::GET, url)).await
    }

    /// `GET /.well-known/jwks.json` (public: sent without the API key): the keys that may have
    /// signed a live access token. Entries that are not sessiond signature keys are skipped.
    pub async fn jwks(&self) -> Result<JwkSet, Error> {
        let response = self.execute(self.http.get(self.jwks_url.clone())).await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        let body = response.bytes().await.map_err(Error::Transport)?;
        jwks::parse_lenient(&body).map_err(|e| Error::decode(status, &e))
    }

    /// `base` plus `segments`, each percent-encoded as one path segment.
    fn url(&self, segments: &[&str]) -> Result<Url, Error> {
        let mut url = self.base.clone();
        for segment in segments {
            if segment.is_empty() || *segment == "." || *segment == ".." {
                return Err(Error::InvalidArgument(
                    "a path segment (user id, handle or tenant) is empty, `.` or `..`",
                ));
            }
        }
        url.path_segments_mut()
            .map_err(|()| Error::InvalidArgument("the base URL cannot have paths"))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn authed(&self, method: Method, url: Url) -> RequestBuilder {
        self.http
            .request(method, url)
            .header(AUTHORIZATION, self.auth.clone())
    }

    /// Sends `request`; a redirect, followed or not, is [`Error::Redirected`].
    async fn execute(&self, request: RequestBuilder) -> Result<Response, Error> {
        let (http, request) = request.build_split();
        let request = request.map_err(Error::Transport)?;
        let url = request.url().clone();
        let response = http.execute(request).await.map_err(Error::Transport)?;
        if response.status().is_redirection() {
            return Err(Error::Redirected {
                status: Some(response.status().as_u16()),
            });
        }
        if response.url() != &url {
            return Err(Error::Redirected { status: None });
        }
        Ok(response)
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, Error> {
        let response = self.execute(request).await?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(Error::Transport)?;
        serde_json::from_slice(&body).map_err(|e| Error::decode(status, &e))
    }
}

/// Appends the parameters of an event listing (absent ones are left out).
fn event_query(url: &mut Url, q: &EventQueryParams, with_user: bool) {
    {
        let mut query = url.query_pairs_mut();
        let pairs = [
            ("user_id", q.user_id.clone().filter(|_| with_user)),
            ("handle", q.handle.clone()),
            ("type", q.event_type.clone()),
            (
                "since",
                q.since.as_ref().map(sessiond_api::timestamp::format),
            ),
            (
                "until",
                q.until.as_ref().map(sessiond_api::timestamp::format),
            ),
            ("limit", q.limit.map(|l| l.to_string())),
            ("cursor", q.cursor.clone()),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                query.append_pair(k, &v);
            }
        }
    }
    strip_empty_query(url);
}

/// `url.query_pairs_mut()` leaves an empty `?` behind when nothing was appended.
fn strip_empty_query(url: &mut Url) {
    if url.query() == Some("") {
        url.set_query(None);
    }
}

/// A problem body with every member optional, so that a problem from a proxy or an older server
/// still becomes [`Error::Api`].
#[derive(serde::Deserialize)]
struct LenientProblem {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

/// The error of a response with an error status.
async fn error_from(response: Response) -> Error {
    let status = response.status().as_u16();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let Ok(body) = response.bytes().await else {
        return Error::UnexpectedStatus { status };
    };
    if !is_json {
        return Error::UnexpectedStatus { status };
    }
    match serde_json::from_slice::<LenientProblem>(&body) {
        Ok(p) if p.code.is_some() || p.title.is_some() || p.kind.is_some() => Error::Api {
            status,
            problem: Problem {
                kind: p.kind.unwrap_or_else(|| "about:blank".to_owned()),
                title: p.title.unwrap_or_default(),
                status: p.status.unwrap_or(status),
                detail: p.detail.unwrap_or_default(),
                code: p.code.unwrap_or_default(),
            },
        },
        _ => Error::UnexpectedStatus { status },
    }
}
