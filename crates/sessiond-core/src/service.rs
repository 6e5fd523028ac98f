//! [`SessionService`]: the lifecycle operations, each a short sequence of core decisions and
//! store calls. It owns no I/O of its own: storage, time and events come through the ports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sessiond_api as api;

use crate::cookie;
use crate::device::device_from;
use crate::error::CoreError;
use crate::events::{Audit, EventKind, EventSink, SYSTEM_ACTOR};
use crate::jwt::Rejection;
use crate::keys::Keys;
use crate::policy::Policy;
use crate::refresh::{self, Presented, RefreshState, RefreshToken};
use crate::session::{
    self, AuthRecord, Liveness, SessionRecord, StoredSession, StoredState, check_requirements,
    encode_data, liveness, liveness_error, to_api, validate_requirements,
};
use crate::store::{
    DataUpdate, EventQuery, Expect, InsertOutcome, ListQuery, Rekey, RotateOutcome, SessionStore,
    SweepReport,
};
use crate::time::{Clock, Timestamp};
use crate::token::{SessionHandle, SessionToken, TenantId, TokenFormat, TokenHash, UserId};

/// How far in the future a client-supplied `authenticated_at` may be (clock skew).
const MAX_CLOCK_SKEW_S: u64 = 60;
/// Default page size of listings.
pub const DEFAULT_PAGE: usize = 50;
/// Largest page size of listings.
pub const MAX_PAGE: usize = 500;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The token format (prefix).
    pub token_format: TokenFormat,
    /// Largest session data, in bytes of JSON.
    pub max_data_bytes: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            token_format: TokenFormat::default(),
            max_data_bytes: 16 * 1024,
        }
    }
}

/// A session together with its new secret token: the answer of create, rotate, reauthenticate.
#[derive(Debug)]
pub struct Issued {
    /// The session.
    pub session: api::Session,
    /// The secret token.
    pub token: SessionToken,
    /// The session cookie's name.
    pub cookie_name: String,
    /// The complete `Set-Cookie` value.
    pub set_cookie: String,
    /// Token mode: the access token and when it expires.
    pub access_token: Option<(String, Timestamp)>,
    /// Token mode: the refresh token.
    pub refresh_token: Option<RefreshToken>,
}

/// The answer of a refresh: the session and a new token pair.
#[derive(Debug)]
pub struct Refreshed {
    /// The session, its idle expiry slid.
    pub session: api::Session,
    /// The new access token.
    pub access_token: String,
    /// When it expires.
    pub access_token_expires_at: Timestamp,
    /// The new refresh token.
    pub refresh_token: RefreshToken,
}

/// Which sessions a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Active sessions only.
    Active,
    /// Every session not yet purged.
    All,
}

/// The lifecycle operations.
pub struct SessionService {
    store: Arc<dyn SessionStore>,
    clock: Arc<dyn Clock>,
    events: Arc<dyn EventSink>,
    cfg: ServiceConfig,
    keys: Option<Arc<Keys>>,
    deliver: AtomicBool,
}

impl SessionService {
    /// A service over these ports.
    pub fn new(
        store: Arc<dyn SessionStore>,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
        cfg: ServiceConfig,
    ) -> Self {
        Self {
            store,
            clock,
            events,
            cfg,
            keys: None,
            deliver: AtomicBool::new(false),
        }
    }

    /// The service with token mode's keyring.
    pub fn with_keys(mut self, keys: Arc<Keys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Token mode's keyring, if configured.
    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.as_ref()
    }

    fn keys_or_err(&self) -> Result<&Arc<Keys>, CoreError> {
        self.keys
            .as_ref()
            .ok_or_else(|| CoreError::Internal("token mode needs a keyring".into()))
    }

    /// The public keys that verify access tokens.
    pub async fn jwks(&self) -> Result<api::JwkSet, CoreError> {
        let now = self.clock.now();
        Ok(self.keys_or_err()?.ensure(now).await?.jwks(now))
    }

    /// Signs an access token for the session, issued at `issued`.
    async fn access_token(
        &self,
        rec: &SessionRecord,
        policy: &Policy,
        issued: Timestamp,
        jti: String,
        extra: Map<String, Value>,
    ) -> Result<Option<(String, Timestamp)>, CoreError> {
        let Some(tp) = policy.tokens() else {
            return Ok(None);
        };
        let iat = issued.as_millis().div_euclid(1000);
        let (_, absolute) = session::expiries(rec, rec.last_seen_at, policy);
        let exp = (iat + tp.access_token_ttl_s as i64).min(absolute.as_millis().div_euclid(1000));
        let claims = api::AccessClaims {
            iss: tp.issuer.clone(),
            aud: tp.audience.clone(),
            sub: rec.user_id.to_string(),
            sid: rec.handle.to_string(),
            iat,
            nbf: iat,
            exp,
            auth_time: rec.auth.authenticated_at.as_millis().div_euclid(1000),
            aal: rec.auth.aal,
            tenant: rec.tenant.to_string(),
            jti,
            extra,
        };
        let ring = self.keys_or_err()?.ensure(self.clock.now()).await?;
        let token = ring.sign(&claims, issued)?;
        Ok(Some((token, Timestamp::from_millis(exp * 1000))))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The operation's context, with the outbox switch of this service.
    fn scoped(&self, audit: &Audit) -> Audit {
        let mut a = audit.clone();
        a.deliver = self.deliver.load(AtomicOrdering::Relaxed);
        a
    }

    /// Reports the events the store committed for this operation to the sink.
    fn publish(&self, audit: &Audit) {
        for e in audit.take_committed() {
            self.events.record(&e);
        }
    }

    /// Whether new events go to the webhook outbox (set while webhooks are configured).
    pub fn set_deliver(&self, on: bool) {
        self.deliver.store(on, AtomicOrdering::Relaxed);
    }

    /// Records events that change nothing else (`auth.failed`), then reports them.
    pub async fn record(&self, events: Vec<crate::events::Event>) -> Result<(), CoreError> {
        let deliver = self.deliver.load(AtomicOrdering::Relaxed);
        let events: Vec<_> = events
            .into_iter()
            .map(|mut e| {
                e.deliver = deliver;
                e
            })
            .collect();
        self.store.append_events(&events).await?;
        for e in &events {
            self.events.record(e);
        }
        Ok(())
    }

    fn issued(
        &self,
        s: &StoredSession,
        policy: &Policy,
        token: SessionToken,
        now: Timestamp,
    ) -> Issued {
        let session = to_api(s, policy, now);
        let max_age = s.record.remember_me.then(|| {
            let (_, absolute) = session::expiries(&s.record, s.last_seen_at, policy);
            now.secs_until(absolute)
        });
        let set_cookie = cookie::set_cookie(policy.cookie(), token.expose(), max_age);
        Issued {
            session,
            token,
            cookie_name: policy.cookie().name.clone(),
            set_cookie,
            access_token: None,
            refresh_token: None,
        }
    }

    fn auth_from(input: Option<&api::AuthInput>, now: Timestamp) -> Result<AuthRecord, CoreError> {
        let default = api::AuthInput::default();
        let a = input.unwrap_or(&default);
        let method = a.method.as_deref().unwrap_or("unknown");
        let method_ok = !method.is_empty()
            && method.len() <= 64
            && method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !method_ok {
            return Err(CoreError::InvalidRequest(
                "auth.method must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
                    .into(),
            ));
        }
        let aal = a.aal.unwrap_or(1);
        if !(1..=3).contains(&aal) {
            return Err(CoreError::InvalidRequest(
                "auth.aal must be 1, 2 or 3".into(),
            ));
        }
        let authenticated_at = match a.authenticated_at {
            None => now,
            Some(t) => {
                let t = Timestamp::from_datetime(t);
                if t > now.plus_secs(MAX_CLOCK_SKEW_S) {
                    return Err(CoreError::InvalidRequest(
                        "auth.authenticated_at must not be in the future".into(),
                    ));
                }
                t.min(now)
            }
        };
        Ok(AuthRecord {
            method: method.into(),
            aal,
            authenticated_at,
        })
    }

    /// Creates a session for an authenticated user.
    pub async fn create(
        &self,
        req: &api::CreateSessionRequest,
        audit: &Audit,
    ) -> Result<Issued, CoreError> {
        let audit = &self.scoped(audit);
        let now = self.clock.now();
        let user_id = UserId::parse(&req.user_id)?;
        let tenant = match req.tenant.as_deref() {
            Some(t) => TenantId::parse(t)?,
            None => TenantId::default_tenant(),
        };
        let auth = Self::auth_from(req.auth.as_ref(), now)?;
        let device = device_from(req.client.as_ref())?;
        let data = encode_data(
            req.data.as_ref().unwrap_or(&Map::new()),
            self.cfg.max_data_bytes,
        )?;
        let policy = self.store.policy(&tenant).await?;
        let tokens = policy.tokens();
        let claims = match (&req.access_token_claims, tokens) {
            (Some(_), None) => {
                return Err(CoreError::InvalidRequest(
                    "access_token_claims need token mode in the tenant's policy".into(),
                ));
            }
            (Some(c), Some(_)) => {
                refresh::validate_claims(c)?;
                c.clone()
            }
            (None, _) => Map::new(),
        };
        let handle = SessionHandle::generate()?;
        let (refresh_state, refresh_token) = match tokens {
            Some(t) if t.refresh_token => {
                let (s, tok) = RefreshState::issue(&handle, claims.clone(), now)?;
                (Some(s), Some(tok))
            }
            _ => (None, None),
        };
        let (token, token_hash) = self.cfg.token_format.generate()?;
        let record = SessionRecord {
            handle,
            token_hash,
            user_id,
            tenant,
            created_at: now,
            last_seen_at: now,
            remember_me: req.remember_me,
            auth,
            device,
            data: data.into(),
            state: StoredState::Active,
            refresh: refresh_state
                .as_ref()
                .map(RefreshState::to_text)
                .transpose()?,
        };
        let record = Arc::new(record);
        match self.store.insert((*record).clone(), now, audit).await? {
            InsertOutcome::LimitReached => Err(CoreError::SessionLimitReached),
            InsertOutcome::Inserted { .. } => {
                self.publish(audit);
                let jti = match &refresh_state {
                    Some(s) => s.jti(&record.handle),
                    None => URL_SAFE_NO_PAD.encode(crate::token::random_bytes::<16>()?),
                };
                let access = self
                    .access_token(&record, &policy, now, jti, claims)
                    .await?;
                let mut issued = self.issued(&StoredSession::new(record), &policy, token, now);
                issued.access_token = access;
                issued.refresh_token = refresh_token;
                Ok(issued)
            }
        }
    }

    /// Finds the active session of a presented token, or the error that says why there is none.
    async fn active_by_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<(StoredSession, Arc<Policy>, TokenHash), CoreError> {
        let hash = self
            .cfg
            .token_format
            .hash_presented(token)
            .ok_or(CoreError::SessionUnknown)?;
        let (found, policy) = self
            .store
            .find_by_token_with_policy(&hash)
            .await?
            .ok_or(CoreError::SessionUnknown)?;
        if !found.record.token_hash.ct_eq(&hash) {
            return Err(CoreError::SessionUnknown);
        }
        if let Some(e) = liveness_error(&liveness(&found.record, found.last_seen_at, &policy, now))
        {
            return Err(e);
        }
        Ok((found, policy, hash))
    }

    /// Verifies a presented token: valid sessions slide their idle expiry.
    pub async fn verify(&self, req: &api::VerifyRequest) -> Result<api::Session, CoreError> {
        if let Some(r) = &req.require {
            validate_requirements(r)?;
        }
        // The client is validated like at create, so a caller learns of a bad value at once.
        device_from(req.client.as_ref())?;
        let now = self.clock.now();
        let (mut found, policy) = match (&req.token, &req.access_token) {
            (Some(token), None) => {
                let (found, policy, _) = self.active_by_token(token, now).await?;
                (found, policy)
            }
            (None, Some(jwt)) => self.active_by_access_token(jwt, now).await?,
            _ => {
                return Err(CoreError::InvalidRequest(
                    "give exactly one of token and access_token".into(),
                ));
            }
        };
        if let Some(r) = &req.require {
            check_requirements(&found.record, r, now)?;
        }
        self.store.touch(&found, &policy, now).await?;
        found.last_seen_at = found.last_seen_at.max(now);
        Ok(to_api(&found, &policy, now))
    }

    /// Finds the active session of a presented access token: signature, times, issuer and
    /// audience, and the session itself, which must still be active.
    async fn active_by_access_token(
        &self,
        jwt: &str,
        now: Timestamp,
    ) -> Result<(StoredSession, Arc<Policy>), CoreError> {
        let keys = self.keys_or_err()?;
        let ring = keys.ensure(now).await?;
        let claims = match ring.verify(jwt, now) {
            Ok(c) => c,
            // A key this node has not loaded yet (a rotation elsewhere): reload once.
            Err(Rejection::UnknownKey) if keys.reload_soon(now).await? => keys
                .ensure(now)
                .await?
                .verify(jwt, now)
                .map_err(Rejection::into_error)?,
            Err(e) => return Err(e.into_error()),
        };
        let invalid = |why: &str| CoreError::TokenInvalid(why.to_owned());
        let handle = SessionHandle::parse(&claims.sid)
            .map_err(|_| invalid("the access token names no session"))?;
        let (found, policy) = match self.store.find_by_handle(&handle).await? {
            Some(s) => {
                let p = self.store.policy(&s.record.tenant).await?;
                (s, p)
            }
            None => return Err(CoreError::SessionUnknown),
        };
        if found.record.user_id.as_str() != claims.sub
            || found.record.tenant.as_str() != claims.tenant
        {
            return Err(invalid("the access token does not match its session"));
        }
        let tp = policy
            .tokens()
            .ok_or_else(|| invalid("token mode is off for this session's tenant"))?;
        if claims.iss != tp.issuer {
            return Err(invalid("the access token has the wrong issuer"));
        }
        if claims.aud != tp.audience {
            return Err(invalid("the access token has the wrong audience"));
        }
        if let Some(e) = liveness_error(&liveness(&found.record, found.last_seen_at, &policy, now))
        {
            return Err(e);
        }
        Ok((found, policy))
    }

    /// Exchanges a refresh token for a new pair, sliding the session's idle expiry. The presented
    /// token is spent; presenting it again within the tenant's grace period returns the same
    /// pair, later revokes the session (`theft_detected`) and answers [`CoreError::TokenReused`].
    pub async fn refresh(&self, presented: &str, audit: &Audit) -> Result<Refreshed, CoreError> {
        let audit = &self.scoped(audit);
        let (handle, secret) = refresh::parse(presented).ok_or(CoreError::SessionUnknown)?;
        for _ in 0..4 {
            let now = self.clock.now();
            let s = self
                .store
                .find_by_handle(&handle)
                .await?
                .ok_or(CoreError::SessionUnknown)?;
            let Some(text) = s.record.refresh.clone() else {
                return Err(CoreError::SessionUnknown);
            };
            let state = RefreshState::from_text(&text)?;
            let policy = self.store.policy(&s.record.tenant).await?;
            let grace = policy.tokens().map_or(0, |t| t.refresh_reuse_grace_s);
            let class = state.classify(&secret, now, grace);
            if class == Presented::Unknown {
                return Err(CoreError::SessionUnknown);
            }
            if let Some(e) = liveness_error(&liveness(&s.record, s.last_seen_at, &policy, now)) {
                return Err(e);
            }
            if !policy.tokens().is_some_and(|t| t.refresh_token) {
                return Err(CoreError::TokenInvalid(
                    "refresh tokens are off for this session's tenant".into(),
                ));
            }
            let reissued = match class {
                Presented::RecentlySpent => state.reissue(&handle, &secret)?,
                _ => None,
            };
            match (class, reissued) {
                (Presented::Current, _) => {
                    let (next, token) = state.next(&handle, &secret, now)?;
                    let change = Rekey {
                        expect: Expect::Refresh(text),
                        token_hash: None,
                        refresh: Some(next.to_text()?),
                        auth: None,
                        event: EventKind::SessionRefreshed,
                    };
                    match self.store.rotate(&handle, &change, now, audit).await? {
                        RotateOutcome::Rotated(s) => {
                            self.publish(audit);
                            return self.pair(&s, &policy, &next, now, now, token).await;
                        }
                        // Lost a race with another refresh or an end: look again.
                        RotateOutcome::Stale => continue,
                    }
                }
                (Presented::RecentlySpent, Some(token)) => {
                    self.store.touch(&s, &policy, now).await?;
                    let mut s = s;
                    s.last_seen_at = s.last_seen_at.max(now);
                    let issued = Timestamp::from_millis(state.at);
                    return self.pair(&s, &policy, &state, issued, now, token).await;
                }
                _ => {
                    self.store
                        .revoke(&handle, "theft_detected", now, audit)
                        .await?;
                    self.publish(audit);
                    tracing::warn!(
                        target: "sessiond::security",
                        handle = %handle,
                        "a spent refresh token was presented again; the session is revoked"
                    );
                    return Err(CoreError::TokenReused);
                }
            }
        }
        Err(CoreError::Conflict)
    }

    async fn pair(
        &self,
        s: &StoredSession,
        policy: &Policy,
        state: &RefreshState,
        issued: Timestamp,
        now: Timestamp,
        refresh_token: RefreshToken,
    ) -> Result<Refreshed, CoreError> {
        let (access_token, access_token_expires_at) = self
            .access_token(
                &s.record,
                policy,
                issued,
                state.jti(&s.record.handle),
                state.claims.clone(),
            )
            .await?
            .ok_or_else(|| CoreError::TokenInvalid("token mode is off".into()))?;
        Ok(Refreshed {
            session: to_api(s, policy, now),
            access_token,
            access_token_expires_at,
            refresh_token,
        })
    }

    async fn rotate_with(
        &self,
        token: &str,
        auth: Option<&api::AuthInput>,
        audit: &Audit,
    ) -> Result<Issued, CoreError> {
        let audit = &self.scoped(audit);
        let now = self.clock.now();
        let auth = match auth {
            Some(a) => Some(Self::auth_from(Some(a), now)?),
            None => None,
        };
        let (found, policy, old_hash) = self.active_by_token(token, now).await?;
        let (new_token, new_hash) = self.cfg.token_format.generate()?;
        let handle = found.record.handle.clone();
        let change = Rekey {
            expect: Expect::Token(old_hash),
            token_hash: Some(new_hash),
            refresh: None,
            event: if auth.is_some() {
                EventKind::SessionReauthenticated
            } else {
                EventKind::SessionRotated
            },
            auth,
        };
        match self.store.rotate(&handle, &change, now, audit).await? {
            RotateOutcome::Rotated(s) => {
                self.publish(audit);
                Ok(self.issued(&s, &policy, new_token, now))
            }
            // Lost a race: the token was rotated or the session ended meanwhile.
            RotateOutcome::Stale => match self.store.find_by_token(&old_hash).await? {
                None => Err(CoreError::SessionUnknown),
                Some(s) => Err(
                    liveness_error(&liveness(&s.record, s.last_seen_at, &policy, now))
                        .unwrap_or(CoreError::Conflict),
                ),
            },
        }
    }

    /// Issues a new token for the session; the old one stops working at once.
    pub async fn rotate(&self, token: &str, audit: &Audit) -> Result<Issued, CoreError> {
        self.rotate_with(token, None, audit).await
    }

    /// Records a fresh authentication (step-up) and rotates the token.
    pub async fn reauthenticate(
        &self,
        token: &str,
        auth: &api::AuthInput,
        audit: &Audit,
    ) -> Result<Issued, CoreError> {
        if auth.authenticated_at.is_some() {
            return Err(CoreError::InvalidRequest(
                "auth.authenticated_at is set by the server on reauthenticate".into(),
            ));
        }
        self.rotate_with(token, Some(auth), audit).await
    }

    /// Logs out: revokes the token's session (reason `logout`). Idempotent for a session that
    /// has already ended. Returns the session and the cookie-clearing `Set-Cookie` value.
    pub async fn logout(
        &self,
        token: &str,
        audit: &Audit,
    ) -> Result<(api::Session, String), CoreError> {
        let audit = &self.scoped(audit);
        let now = self.clock.now();
        let hash = self
            .cfg
            .token_format
            .hash_presented(token)
            .ok_or(CoreError::SessionUnknown)?;
        let found = self
            .store
            .find_by_token(&hash)
            .await?
            .ok_or(CoreError::SessionUnknown)?;
        if !found.record.token_hash.ct_eq(&hash) {
            return Err(CoreError::SessionUnknown);
        }
        let policy = self.store.policy(&found.record.tenant).await?;
        let out = self
            .store
            .revoke(&found.record.handle, "logout", now, audit)
            .await?
            .ok_or(CoreError::SessionUnknown)?;
        self.publish(audit);
        Ok((
            to_api(&out.session, &policy, now),
            cookie::clear_cookie(policy.cookie()),
        ))
    }

    /// The session with this handle, whatever its status.
    pub async fn get(&self, handle: &str) -> Result<api::Session, CoreError> {
        let handle = SessionHandle::parse(handle)?;
        let now = self.clock.now();
        let s = self
            .store
            .find_by_handle(&handle)
            .await?
            .ok_or(CoreError::NotFound)?;
        let policy = self.store.policy(&s.record.tenant).await?;
        Ok(to_api(&s, &policy, now))
    }

    /// Merges a patch into an active session's data.
    pub async fn patch_data(
        &self,
        handle: &str,
        patch: &Map<String, Value>,
    ) -> Result<api::Session, CoreError> {
        let handle = SessionHandle::parse(handle)?;
        let now = self.clock.now();
        match self
            .store
            .update_data(&handle, patch, self.cfg.max_data_bytes, now)
            .await?
        {
            DataUpdate::Updated(s) => {
                let policy = self.store.policy(&s.record.tenant).await?;
                Ok(to_api(&s, &policy, now))
            }
            DataUpdate::NotActive => Err(CoreError::SessionNotActive),
            DataUpdate::NotFound => Err(CoreError::NotFound),
            DataUpdate::TooLarge { size, limit } => Err(CoreError::DataTooLarge { size, limit }),
        }
    }

    /// Revokes a session by handle. Idempotent.
    pub async fn revoke(
        &self,
        handle: &str,
        reason: Option<&str>,
        audit: &Audit,
    ) -> Result<api::Session, CoreError> {
        let audit = &self.scoped(audit);
        let handle = SessionHandle::parse(handle)?;
        let reason = reason.unwrap_or("revoked");
        validate_reason(reason)?;
        let now = self.clock.now();
        let out = self
            .store
            .revoke(&handle, reason, now, audit)
            .await?
            .ok_or(CoreError::NotFound)?;
        self.publish(audit);
        let policy = self.store.policy(&out.session.record.tenant).await?;
        Ok(to_api(&out.session, &policy, now))
    }

    /// A page of a user's sessions, most recently seen first.
    pub async fn list_user(
        &self,
        user_id: &str,
        tenant: Option<&str>,
        status: StatusFilter,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<api::SessionList, CoreError> {
        let user_id = UserId::parse(user_id)?;
        let tenant = tenant.map(TenantId::parse).transpose()?;
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(CoreError::InvalidRequest(format!(
                "limit must be 1 to {MAX_PAGE}"
            )));
        }
        let after = cursor.map(decode_cursor).transpose()?;
        let now = self.clock.now();
        let query = ListQuery {
            user_id,
            tenant,
            include_ended: status == StatusFilter::All,
            after,
            limit: limit + 1,
        };
        let mut found = self.store.list_user(&query, now).await?;
        let next_cursor = if found.len() > limit {
            found.truncate(limit);
            found
                .last()
                .map(|s| encode_cursor(s.last_seen_at, &s.record.handle))
        } else {
            None
        };
        let mut sessions = Vec::with_capacity(found.len());
        for s in &found {
            let policy = self.store.policy(&s.record.tenant).await?;
            sessions.push(to_api(s, &policy, now));
        }
        Ok(api::SessionList {
            sessions,
            next_cursor,
        })
    }

    /// Force logout: revokes all of a user's active sessions except `except`.
    pub async fn force_logout(
        &self,
        user_id: &str,
        tenant: Option<&str>,
        except: Option<&str>,
        audit: &Audit,
    ) -> Result<u64, CoreError> {
        let audit = &self.scoped(audit);
        let user_id = UserId::parse(user_id)?;
        let tenant = tenant.map(TenantId::parse).transpose()?;
        let except = except
            .map(|h| {
                SessionHandle::parse(h).map_err(|_| {
                    CoreError::InvalidRequest("except must be a session handle".into())
                })
            })
            .transpose()?;
        let now = self.clock.now();
        let revoked = self
            .store
            .revoke_user(
                &user_id,
                tenant.as_ref(),
                except.as_ref(),
                "force_logout",
                now,
                audit,
            )
            .await?;
        self.publish(audit);
        Ok(revoked.len() as u64)
    }

    /// The tenant's policy document.
    pub async fn policy(&self, tenant: &str) -> Result<api::PolicyDocument, CoreError> {
        let tenant = TenantId::parse(tenant)?;
        Ok(self.store.policy(&tenant).await?.document().clone())
    }

    /// Replaces the tenant's policy.
    pub async fn put_policy(
        &self,
        tenant: &str,
        doc: api::PolicyDocument,
        audit: &Audit,
    ) -> Result<api::PolicyDocument, CoreError> {
        let audit = &self.scoped(audit);
        let tenant = TenantId::parse(tenant)?;
        let policy = Policy::new(doc)?;
        let doc = policy.document().clone();
        let now = self.clock.now();
        self.store.put_policy(&tenant, policy, now, audit).await?;
        self.publish(audit);
        Ok(doc)
    }

    /// Marks timed-out sessions expired and purges those ended over `retention_s` ago.
    /// Records a `session.expired` per expired session.
    pub async fn sweep(&self, retention_s: u64) -> Result<SweepReport, CoreError> {
        let audit = &self.scoped(&Audit::new(SYSTEM_ACTOR));
        let now = self.clock.now();
        let report = self.store.sweep(now, retention_s, audit).await?;
        self.publish(audit);
        Ok(report)
    }

    /// Deletes events (and known devices, finished deliveries) older than `retention_s`.
    pub async fn purge_events(&self, retention_s: u64) -> Result<u64, CoreError> {
        let before = self.clock.now().minus_secs(retention_s);
        Ok(self.store.purge_events(before).await?)
    }

    /// A page of events, newest first.
    pub async fn events(&self, q: &api::EventQueryParams) -> Result<api::EventList, CoreError> {
        let limit = q.limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(CoreError::InvalidRequest(format!(
                "limit must be 1 to {MAX_PAGE}"
            )));
        }
        let before_id = match q.cursor.as_deref() {
            None => None,
            Some(c) if crate::events::is_event_id(c) => Some(c.to_owned()),
            Some(_) => return Err(CoreError::InvalidRequest("invalid cursor".into())),
        };
        let event_type = match q.event_type.as_deref() {
            None => None,
            Some(t) if is_event_type(t) => Some(t.to_owned()),
            Some(_) => {
                return Err(CoreError::InvalidRequest(
                    "type must be an event type such as session.revoked".into(),
                ));
            }
        };
        let query = EventQuery {
            user_id: q.user_id.as_deref().map(UserId::parse).transpose()?,
            handle: q.handle.as_deref().map(SessionHandle::parse).transpose()?,
            event_type,
            since: q.since.map(Timestamp::from_datetime),
            until: q.until.map(Timestamp::from_datetime),
            before_id,
            limit: limit + 1,
        };
        let mut events = self.store.events(&query).await?;
        let next_cursor = if events.len() > limit {
            events.truncate(limit);
            events.last().map(|e| e.id.clone())
        } else {
            None
        };
        Ok(api::EventList {
            events,
            next_cursor,
        })
    }

    /// Whether the store answers.
    pub async fn ready(&self) -> Result<(), CoreError> {
        Ok(self.store.ping().await?)
    }
}

/// Whether a session in a listing counts as active (helper for stores).
pub fn is_active(s: &StoredSession, policy: &Policy, now: Timestamp) -> bool {
    liveness(&s.record, s.last_seen_at, policy, now) == Liveness::Active
}

/// Whether `t` looks like an event type: `word.word`, lowercase with underscores.
fn is_event_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.split('.').count() == 2
        && t.split('.')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
}

fn validate_reason(reason: &str) -> Result<(), CoreError> {
    let ok = !reason.is_empty()
        && reason.len() <= 64
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidRequest(
            "reason must be 1 to 64 characters of a-z, 0-9 and '_'".into(),
        ))
    }
}

fn encode_cursor(last_seen: Timestamp, handle: &SessionHandle) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", last_seen.as_millis(), handle.as_str()))
}

fn decode_cursor(c: &str) -> Result<(Timestamp, SessionHandle), CoreError> {
    let bad = || CoreError::InvalidRequest("cursor is not one this server issued".into());
    let raw = URL_SAFE_NO_PAD.decode(c).map_err(|_| bad())?;
    let text = std::str::from_utf8(&raw).map_err(|_| bad())?;
    let (ms, handle) = text.split_once('.').ok_or_else(bad)?;
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    let handle = SessionHandle::parse(handle).map_err(|_| bad())?;
    Ok((Timestamp::from_millis(ms), handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let h = SessionHandle::generate().unwrap();
        let c = encode_cursor(Timestamp::from_millis(42), &h);
        assert_eq!(decode_cursor(&c).unwrap(), (Timestamp::from_millis(42), h));
        assert!(decode_cursor("!!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("12.nope")).is_err());
    }

    #[test]
    fn reasons_are_snake_case() {
        assert!(validate_reason("admin_action").is_ok());
        assert!(validate_reason("Bad Reason").is_err());
        assert!(validate_reason("").is_err());
    }
}
