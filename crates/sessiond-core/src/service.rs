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
use crate::geo::{Locator, Travel};
use crate::guard::Guard;
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
use crate::wire::SessionJson;

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

/// The answer of a verify: the session as stored (its last use slid to `now`), the policy it
/// was judged under, and the device's location when geolocation is on.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The session.
    pub session: StoredSession,
    /// Its tenant's policy.
    pub policy: Arc<Policy>,
    /// When it was verified.
    pub now: Timestamp,
    /// Where its device is, when geolocation is on.
    pub location: Option<api::Location>,
}

impl Verified {
    /// The wire object of the session.
    pub fn to_api(&self) -> api::Session {
        let mut out = to_api(&self.session, &self.policy, self.now);
        out.device.location = self.location.clone();
        out
    }

    /// `{"session": …}`, serializable straight from the record: the same JSON as a
    /// [`api::SessionResponse`] of [`Verified::to_api`].
    pub fn json(&self) -> SessionJson<'_> {
        SessionJson {
            session: &self.session,
            policy: &self.policy,
            now: self.now,
            location: self.location.as_ref(),
        }
    }
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
    guard: Option<Arc<Guard>>,
    capacity: Option<crate::capacity::Capacity>,
    security_events: crate::guard::EventGate,
    invalid_tokens: crate::guard::EventGate,
    throttled: crate::guard::EventGate,
    step_up_denials: crate::guard::EventGate,
    locator: Option<Arc<dyn Locator>>,
    travel: Travel,
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
            guard: None,
            capacity: None,
            security_events: crate::guard::EventGate::default(),
            invalid_tokens: crate::guard::EventGate::default(),
            throttled: crate::guard::EventGate::default(),
            step_up_denials: crate::guard::EventGate::default(),
            locator: None,
            travel: Travel::default(),
        }
    }

    /// The service with token mode's keyring.
    pub fn with_keys(mut self, keys: Arc<Keys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The service with a geolocation database: sessions show their location, and the
    /// impossible-travel detector can be enabled in policies.
    pub fn with_locator(mut self, locator: Arc<dyn Locator>) -> Self {
        self.locator = Some(locator);
        self
    }

    /// The session object, with its location when a geolocation database is configured.
    fn view(&self, s: &StoredSession, policy: &Policy, now: Timestamp) -> api::Session {
        let mut out = to_api(s, policy, now);
        out.device.location = self.location(s.record.device.ip);
        out
    }

    fn location(&self, ip: Option<std::net::IpAddr>) -> Option<api::Location> {
        self.place(ip).map(|p| api::Location {
            country: p.country,
            city: p.city,
            latitude: p.coordinates.map(|c| c.0),
            longitude: p.coordinates.map(|c| c.1),
        })
    }

    fn place(&self, ip: Option<std::net::IpAddr>) -> Option<crate::geo::Place> {
        self.locator
            .as_ref()
            .zip(ip)
            .and_then(|(l, ip)| l.locate(ip))
    }

    /// The service with brute-force and creation limits.
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// The service with caps on live sessions per node and per tenant.
    pub fn with_capacity(mut self, caps: crate::capacity::Caps) -> Self {
        self.capacity = Some(crate::capacity::Capacity::new(caps));
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
        let keys = self.keys_or_err()?;
        if keys.refuses_unsealed() && keys.current().is_none() {
            // No keyring until a keyring key is configured: nothing is published.
            keys.reload(now).await?;
            if keys.current().is_none() {
                return Ok(api::JwkSet { keys: Vec::new() });
            }
        }
        Ok(keys.ensure(now).await?.jwks(now))
    }

    /// Signs an access token for the session, issued at `issued`.
    async fn access_token(
        &self,
        rec: &SessionRecord,
        policy: &Policy,
        issued: Timestamp,
        aal: u8,
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
            aal,
            tenant: rec.tenant.to_string(),
            jti,
            rot: rec.rotations,
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

    /// Whether new events go to the webhook outbox.
    pub fn delivers(&self) -> bool {
        self.deliver.load(AtomicOrdering::Relaxed)
    }

    /// Applies a policy's action to a detector's finding about a session in use.
    async fn finding(
        &self,
        action: api::BindingAction,
        found: StoredSession,
        client: &crate::session::DeviceRecord,
        finding: Finding,
        now: Timestamp,
    ) -> Result<StoredSession, CoreError> {
        let Finding {
            kind,
            flag,
            reason: what,
            details,
        } = finding;
        let audit = &self.scoped(&from_client(&Audit::new(SYSTEM_ACTOR), client));
        let handle = found.record.handle.clone();
        tracing::warn!(
            target: "sessiond::security",
            handle = %handle,
            finding = kind.as_str(),
            reason = what,
            action = ?action,
            "a detector found something about a session in use"
        );
        match action {
            api::BindingAction::Revoke => {
                // The finding, then the revocation (each recorded with its change).
                let mut e = audit.session_event(kind, now, &found.record, Some(what));
                e.details = details;
                self.store.append_events(std::slice::from_ref(&e)).await?;
                audit.committed([e]);
                self.store.revoke(&handle, "anomaly", now, audit).await?;
                self.publish(audit);
                Err(CoreError::SessionRevoked)
            }
            api::BindingAction::Reauthenticate | api::BindingAction::Flag => {
                let flag: Arc<str> = Arc::from(flag);
                let out = if found.record.flags.contains(&flag) {
                    None
                } else {
                    let change = Rekey {
                        expect: Expect::Token(found.record.token_hash),
                        token_hash: None,
                        refresh: None,
                        auth: None,
                        event: kind,
                        reason: Some(what.into()),
                        flag: Some(flag),
                        device: None,
                        details: details.clone(),
                    };
                    match self.store.rotate(&handle, &change, now, audit).await? {
                        RotateOutcome::Rotated(s) => Some(s),
                        RotateOutcome::Stale => None,
                    }
                };
                self.publish(audit);
                if action == api::BindingAction::Reauthenticate {
                    return Err(CoreError::ReauthenticationRequired(format!(
                        "{}: reauthenticate with this client",
                        kind.as_str()
                    )));
                }
                Ok(out.unwrap_or(found))
            }
        }
    }

    /// Records `security.brute_force` for a network just blocked (at most a few per second per
    /// node, so a flood cannot turn into a flood of writes).
    async fn brute_force(
        &self,
        asker: &Audit,
        client: &crate::session::DeviceRecord,
        blocked: &crate::guard::Blocked,
        now: Timestamp,
    ) {
        let network = client.ip.map(crate::guard::network_label);
        tracing::warn!(
            target: "sessiond::security",
            network = network.as_deref().unwrap_or("-"),
            api_key = asker.actor.as_deref().unwrap_or("-"),
            failures = blocked.failures,
            blocked_s = blocked.for_s,
            "too many unknown tokens from one source; it is blocked"
        );
        if !self.security_events.allow(now) {
            return;
        }
        let mut audit = from_client(&Audit::new(SYSTEM_ACTOR), client);
        audit.request_id = asker.request_id.clone();
        let mut e = audit.event(
            EventKind::SecurityBruteForce,
            now,
            &TenantId::default_tenant(),
        );
        e.reason = Some("token_guessing".into());
        if let Some(n) = network {
            e.details.insert("network".into(), Value::String(n));
        }
        if let Some(k) = &asker.actor {
            e.details
                .insert("api_key".into(), Value::String(k.to_string()));
        }
        e.details
            .insert("failures".into(), Value::from(blocked.failures));
        e.details
            .insert("blocked_for_s".into(), Value::from(blocked.for_s));
        if let Err(err) = self.record(vec![e]).await {
            tracing::warn!(error = %err, "cannot record security.brute_force");
        }
    }

    /// Records a finding that changes nothing (an invalid token, a throttled creation, a
    /// step-up denial) through `gate`: at most [`crate::guard::EventGate::PER_SECOND`] a second
    /// per node, each saying how many were not recorded before it.
    async fn gated(&self, gate: &crate::guard::EventGate, mut e: crate::events::Event) {
        let Some(suppressed) = gate.admit(e.at) else {
            return;
        };
        if suppressed > 0 {
            e.details
                .insert("not_recorded_before".into(), Value::from(suppressed));
        }
        let kind = e.kind;
        if let Err(err) = self.record(vec![e]).await {
            tracing::warn!(error = %err, "cannot record {kind}");
        }
    }

    /// Records `security.invalid_token` for a token that matched no live session (never the
    /// token itself): `reason` is the answer's code.
    async fn invalid_token(
        &self,
        asker: &Audit,
        client: &crate::session::DeviceRecord,
        reason: &str,
        kind: &str,
        blocked: bool,
        now: Timestamp,
    ) {
        let audit = from_client(asker, client);
        let mut e = audit.event(
            EventKind::SecurityInvalidToken,
            now,
            &TenantId::default_tenant(),
        );
        e.reason = Some(reason.into());
        e.details.insert("token_kind".into(), Value::from(kind));
        if blocked {
            e.details.insert("blocked".into(), Value::Bool(true));
        }
        self.gated(&self.invalid_tokens, e).await;
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
        let session = self.view(s, policy, now);
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
        // A password alone is one factor: NIST SP 800-63B allows it AAL 1 only. Other method
        // names are the application's to choose, and so is the level they reach.
        if aal > 1 && method.eq_ignore_ascii_case("password") {
            return Err(CoreError::InvalidRequest(
                "auth.aal above 1 needs a second factor: method password alone is AAL 1 \
                 (name the method that was used, for example otp or webauthn)"
                    .into(),
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

    /// Checks a create's authentication against the tenant's policy: an authentication event is
    /// named when the policy requires one, and it is not older than the session could live.
    fn check_auth_for_create(
        input: Option<&api::AuthInput>,
        auth: &AuthRecord,
        policy: &Policy,
        remember_me: bool,
        now: Timestamp,
    ) -> Result<(), CoreError> {
        if policy.require_auth() && input.and_then(|a| a.method.as_ref()).is_none() {
            return Err(CoreError::InvalidRequest(
                "auth.method is required: this tenant's policy (require_auth) refuses sessions \
                 without an authentication event"
                    .into(),
            ));
        }
        let absolute_s = policy.timeouts(remember_me).absolute_s;
        if auth.authenticated_at.plus_secs(absolute_s) <= now {
            return Err(CoreError::InvalidRequest(format!(
                "auth.authenticated_at must be less than the session's absolute timeout \
                 ({absolute_s} seconds) in the past"
            )));
        }
        Ok(())
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
        if let Some(g) = &self.guard {
            let source = crate::guard::Source::new(device.ip, audit.actor.as_deref());
            if let Err(t) = g.check_create(&format!("{tenant}\n{user_id}"), source, now) {
                tracing::warn!(
                    target: "sessiond::security",
                    limit = t.limit,
                    "a session creation was refused by a creation limit"
                );
                let mut audit = audit.clone();
                audit.ip = device.ip;
                audit.user_agent = device.user_agent.clone();
                let mut e = audit.event(EventKind::SecurityCreateThrottled, now, &tenant);
                e.user_id = Some(user_id.clone());
                e.reason = Some(t.limit.into());
                e.details
                    .insert("retry_after_s".into(), Value::from(t.retry_after.0));
                self.gated(&self.throttled, e).await;
                return Err(CoreError::TooManyAttempts(t.retry_after.0));
            }
        }
        let data = encode_data(
            req.data.as_ref().unwrap_or(&Map::new()),
            self.cfg.max_data_bytes,
        )?;
        if let Some(c) = &self.capacity {
            c.check(&*self.store, &tenant, now).await?;
        }
        let policy = self.store.policy(&tenant).await?;
        Self::check_auth_for_create(req.auth.as_ref(), &auth, &policy, req.remember_me, now)?;
        // An earlier authentication may already be past its level's limits.
        let auth = AuthRecord {
            aal: policy.effective_aal(&auth, now, now),
            ..auth
        };
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
        let mut record = SessionRecord {
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
            flags: Vec::new(),
            expires_at: None,
            idle_timeout_s: None,
            rotations: 0,
        };
        session::pin(&mut record, &policy);
        let record = Arc::new(record);
        match self.store.insert((*record).clone(), now, audit).await? {
            InsertOutcome::LimitReached => Err(CoreError::SessionLimitReached),
            InsertOutcome::Inserted { .. } => {
                self.publish(audit);
                if let Some(c) = &self.capacity {
                    c.created(&record.tenant);
                }
                let jti = match &refresh_state {
                    Some(s) => s.jti(&record.handle),
                    None => URL_SAFE_NO_PAD.encode(crate::token::random_bytes::<16>()?),
                };
                let access = self
                    .access_token(&record, &policy, now, record.auth.aal, jti, claims)
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
        self.verify_session(req).await.map(|v| v.to_api())
    }

    /// [`SessionService::verify`], answering the verified session as stored rather than as the
    /// wire object: the hot path serializes it with [`Verified::json`] without building an
    /// [`api::Session`], and a caller in process reads the record directly.
    pub async fn verify_session(&self, req: &api::VerifyRequest) -> Result<Verified, CoreError> {
        self.verify_as(req, &Audit::default()).await
    }

    /// [`SessionService::verify_session`] on behalf of `asker` (the API key and request id):
    /// unknown tokens count against the client network and the key (the key alone when the
    /// request names no client address), and findings name them.
    pub async fn verify_as(
        &self,
        req: &api::VerifyRequest,
        asker: &Audit,
    ) -> Result<Verified, CoreError> {
        if let Some(r) = &req.require {
            validate_requirements(r)?;
        }
        // The client is validated like at create, so a caller learns of a bad value at once.
        let client = device_from(req.client.as_ref())?;
        let now = self.clock.now();
        let token_kind = if req.access_token.is_some() {
            "access"
        } else {
            "session"
        };
        let found = match (&req.token, &req.access_token) {
            (Some(token), None) => self
                .active_by_token(token, now)
                .await
                .map(|(found, policy, _)| (found, policy)),
            (None, Some(jwt)) => self.active_by_access_token(jwt, now).await,
            _ => {
                return Err(CoreError::InvalidRequest(
                    "give exactly one of token and access_token".into(),
                ));
            }
        };
        let (mut found, policy) = match found {
            Ok(f) => f,
            // A token that matches no session (or no key) is a guess: count it. A blocked
            // source is refused only here, so a valid token goes through whatever its source.
            Err(e @ (CoreError::SessionUnknown | CoreError::TokenInvalid(_))) => {
                let code = match &e {
                    CoreError::SessionUnknown => "session_unknown",
                    _ => "token_invalid",
                };
                if let Some(g) = &self.guard {
                    let source = crate::guard::Source::new(client.ip, asker.actor.as_deref());
                    if let Err(r) = g.check_verify(source, now) {
                        self.invalid_token(asker, &client, code, token_kind, true, now)
                            .await;
                        return Err(CoreError::TooManyAttempts(r.0));
                    }
                    if let Some(blocked) = g.verify_failed(source, now) {
                        self.brute_force(asker, &client, &blocked, now).await;
                    }
                }
                self.invalid_token(asker, &client, code, token_kind, false, now)
                    .await;
                return Err(e);
            }
            Err(e @ CoreError::SessionRevoked) => {
                self.invalid_token(asker, &client, "session_revoked", token_kind, false, now)
                    .await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // Past its level's limits, the session counts as a lower level from now on: recorded at
        // once, so that this use does not restart the inactivity the limit measures.
        let aal = policy.effective_aal(&found.record.auth, found.last_seen_at, now);
        if aal < found.record.auth.aal {
            found = self.lower_aal(found, aal, now).await?;
        }
        if let Some(r) = &req.require
            && let Err(e) = check_requirements(&found.record, aal, r, now)
        {
            let audit = from_client(asker, &client);
            let mut ev = audit.session_event(
                EventKind::SecurityStepUpDenied,
                now,
                &found.record,
                Some("reauthentication_required"),
            );
            if let Some(aal) = r.min_aal {
                ev.details.insert("min_aal".into(), Value::from(aal));
            }
            if let Some(age) = r.max_auth_age_s {
                ev.details.insert("max_auth_age_s".into(), Value::from(age));
            }
            ev.details.insert("aal".into(), Value::from(aal));
            self.gated(&self.step_up_denials, ev).await;
            return Err(e);
        }
        if let Some(b) = policy.document().binding.as_ref()
            && let Some(what) = crate::device::binding_mismatch(b, &found.record.device, &client)
        {
            found = self
                .finding(
                    b.action,
                    found,
                    &client,
                    Finding {
                        kind: EventKind::SecurityBindingMismatch,
                        flag: "binding_mismatch",
                        reason: what,
                        details: Map::new(),
                    },
                    now,
                )
                .await?;
        }
        if let Some(t) = policy.document().impossible_travel.as_ref()
            && let Some((lat, lon)) = self.place(client.ip).and_then(|p| p.coordinates)
            && let Some(j) = self.travel.used(
                &format!("{}\n{}", found.record.tenant, found.record.user_id),
                (lat, lon),
                now.as_millis(),
                f64::from(t.max_speed_kmh),
            )
        {
            let mut details = Map::new();
            details.insert("km".into(), Value::from(j.km.round()));
            details.insert("seconds".into(), Value::from(j.seconds.round()));
            details.insert("kmh".into(), Value::from(j.kmh.round()));
            found = self
                .finding(
                    t.action,
                    found,
                    &client,
                    Finding {
                        kind: EventKind::SecurityImpossibleTravel,
                        flag: "impossible_travel",
                        reason: "speed",
                        details,
                    },
                    now,
                )
                .await?;
        }
        self.store.touch(&found, &policy, now).await?;
        found.last_seen_at = found.last_seen_at.max(now);
        let location = self.location(found.record.device.ip);
        Ok(Verified {
            session: found,
            policy,
            now,
            location,
        })
    }

    /// Records that a session counts as assurance level `aal` from now on (below its recorded
    /// level), with a `session.aal_lowered` event. A session changed meanwhile is left as it is.
    async fn lower_aal(
        &self,
        found: StoredSession,
        aal: u8,
        now: Timestamp,
    ) -> Result<StoredSession, CoreError> {
        let rec = &found.record;
        let mut details = Map::new();
        details.insert("from_aal".into(), Value::from(rec.auth.aal));
        details.insert("aal".into(), Value::from(aal));
        let change = Rekey {
            expect: Expect::Token(rec.token_hash),
            token_hash: None,
            refresh: None,
            auth: Some(AuthRecord {
                aal,
                ..rec.auth.clone()
            }),
            event: EventKind::SessionAalLowered,
            reason: None,
            flag: None,
            device: None,
            details,
        };
        let audit = &self.scoped(&Audit::new(SYSTEM_ACTOR));
        let handle = rec.handle.clone();
        let out = match self.store.rotate(&handle, &change, now, audit).await? {
            RotateOutcome::Rotated(s) => s,
            RotateOutcome::Stale => found,
        };
        self.publish(audit);
        Ok(out)
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
        // Compared with the rotation count, not a time: a token issued in the same second (or
        // millisecond) as a rotation, but before it, is still refused.
        if claims.rot != found.record.rotations {
            return Err(invalid(
                "the access token was issued before the session's token was last rotated",
            ));
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
            // The level counts the time since the last use before this refresh.
            let aal = policy.effective_aal(&s.record.auth, s.last_seen_at, now);
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
                        // Lowered past its level's limits, for good (see verify).
                        auth: (aal < s.record.auth.aal).then(|| AuthRecord {
                            aal,
                            ..s.record.auth.clone()
                        }),
                        event: EventKind::SessionRefreshed,
                        reason: None,
                        flag: None,
                        device: None,
                        details: Map::new(),
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
        // The session's level was lowered before this if it had to be.
        let aal = policy.effective_aal(&s.record.auth, s.last_seen_at, issued);
        let (access_token, access_token_expires_at) = self
            .access_token(
                &s.record,
                policy,
                issued,
                aal,
                state.jti(&s.record.handle),
                state.claims.clone(),
            )
            .await?
            .ok_or_else(|| CoreError::TokenInvalid("token mode is off".into()))?;
        Ok(Refreshed {
            session: self.view(s, policy, now),
            access_token,
            access_token_expires_at,
            refresh_token,
        })
    }

    async fn rotate_with(
        &self,
        token: &str,
        auth: Option<&api::AuthInput>,
        client: Option<&api::ClientInput>,
        audit: &Audit,
    ) -> Result<Issued, CoreError> {
        let audit = &self.scoped(audit);
        let now = self.clock.now();
        let auth = match auth {
            Some(a) => Some(Self::auth_from(Some(a), now)?),
            None => None,
        };
        let rebind = match client {
            Some(c) => Some(device_from(Some(c))?),
            None => None,
        };
        let (found, policy, old_hash) = self.active_by_token(token, now).await?;
        let (new_token, new_hash) = self.cfg.token_format.generate()?;
        let handle = found.record.handle.clone();
        // Token mode: the refresh state starts over with a fresh token and no spent ones, so
        // every refresh token issued before is unknown to the session (refused as
        // `session_unknown`, not taken for theft: a token spent by a rotation is no evidence
        // that anyone else holds it).
        let rekeyed = match (&found.record.refresh, policy.tokens()) {
            (Some(text), Some(t)) if t.refresh_token => {
                Some(RefreshState::from_text(text)?.rekeyed(&handle, now)?)
            }
            _ => None,
        };
        let change = Rekey {
            expect: Expect::Token(old_hash),
            token_hash: Some(new_hash),
            refresh: rekeyed.as_ref().map(|(s, _)| s.to_text()).transpose()?,
            event: if auth.is_some() {
                EventKind::SessionReauthenticated
            } else {
                EventKind::SessionRotated
            },
            auth,
            reason: None,
            flag: None,
            device: rebind,
            details: Map::new(),
        };
        match self.store.rotate(&handle, &change, now, audit).await? {
            RotateOutcome::Rotated(s) => {
                self.publish(audit);
                // Token mode: a new pair (access tokens issued before carry an older rotation
                // count and no longer verify).
                let (jti, claims, refresh_token) = match rekeyed {
                    Some((state, tok)) => (state.jti(&handle), state.claims, Some(tok)),
                    None => (
                        URL_SAFE_NO_PAD.encode(crate::token::random_bytes::<16>()?),
                        Map::new(),
                        None,
                    ),
                };
                let access = self
                    .access_token(&s.record, &policy, now, s.record.auth.aal, jti, claims)
                    .await?;
                let mut issued = self.issued(&s, &policy, new_token, now);
                issued.access_token = access;
                issued.refresh_token = refresh_token;
                Ok(issued)
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
        self.rotate_with(token, None, None, audit).await
    }

    /// Records a fresh authentication (step-up) and rotates the token.
    pub async fn reauthenticate(
        &self,
        token: &str,
        auth: &api::AuthInput,
        client: Option<&api::ClientInput>,
        audit: &Audit,
    ) -> Result<Issued, CoreError> {
        if auth.authenticated_at.is_some() {
            return Err(CoreError::InvalidRequest(
                "auth.authenticated_at is set by the server on reauthenticate".into(),
            ));
        }
        self.rotate_with(token, Some(auth), client, audit).await
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
            self.view(&out.session, &policy, now),
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
        Ok(self.view(&s, &policy, now))
    }

    /// Merges a patch into an active session's data.
    pub async fn patch_data(
        &self,
        handle: &str,
        patch: &Map<String, Value>,
        audit: &Audit,
    ) -> Result<api::Session, CoreError> {
        let audit = &self.scoped(audit);
        let handle = SessionHandle::parse(handle)?;
        let now = self.clock.now();
        match self
            .store
            .update_data(&handle, patch, self.cfg.max_data_bytes, now, audit)
            .await?
        {
            DataUpdate::Updated(s) => {
                self.publish(audit);
                let policy = self.store.policy(&s.record.tenant).await?;
                Ok(self.view(&s, &policy, now))
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
        Ok(self.view(&out.session, &policy, now))
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
        let limit = page_size(limit)?;
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
            sessions.push(self.view(s, &policy, now));
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

    /// Revokes the user's active sessions that match every criterion of `req`; answers the
    /// handles this call revoked. Each revocation is its own change with its own event.
    pub async fn revoke_matching(
        &self,
        user_id: &str,
        req: &api::RevokeSessionsRequest,
        audit: &Audit,
    ) -> Result<Vec<String>, CoreError> {
        let audit = &self.scoped(audit);
        let user_id = UserId::parse(user_id)?;
        if req.handles.is_none()
            && req.created_before.is_none()
            && req.country.is_none()
            && req.flagged.is_none()
        {
            return Err(CoreError::InvalidRequest(
                "give at least one of handles, created_before, country and flagged".into(),
            ));
        }
        let handles = match &req.handles {
            Some(hs) if hs.len() > MAX_PAGE => {
                return Err(CoreError::InvalidRequest(format!(
                    "handles: at most {MAX_PAGE}"
                )));
            }
            Some(hs) => Some(
                hs.iter()
                    .map(|h| {
                        SessionHandle::parse(h).map_err(|_| {
                            CoreError::InvalidRequest(
                                "handles: each must be a session handle".into(),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        if let Some(c) = &req.country
            && !(c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(CoreError::InvalidRequest(
                "country: an ISO 3166-1 alpha-2 code such as DE".into(),
            ));
        }
        let tenant = req.tenant.as_deref().map(TenantId::parse).transpose()?;
        let reason = req.reason.as_deref().unwrap_or("revoked");
        validate_reason(reason)?;
        let before = req.created_before.map(Timestamp::from_datetime);
        let now = self.clock.now();
        let mut matching = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_user(
                    &ListQuery {
                        user_id: user_id.clone(),
                        tenant: tenant.clone(),
                        include_ended: false,
                        after: after.clone(),
                        limit: MAX_PAGE,
                    },
                    now,
                )
                .await?;
            for s in &page {
                let r = &s.record;
                let ok = handles.as_ref().is_none_or(|hs| hs.contains(&r.handle))
                    && before.is_none_or(|b| r.created_at < b)
                    // Without geolocation data no session has a country: none matches.
                    && req.country.as_ref().is_none_or(|c| {
                        self.place(r.device.ip)
                            .and_then(|p| p.country)
                            .is_some_and(|pc| &pc == c)
                    })
                    && req.flagged.is_none_or(|flagged| flagged != r.flags.is_empty());
                if ok {
                    matching.push(r.handle.clone());
                }
            }
            match page.last() {
                Some(s) if page.len() == MAX_PAGE => {
                    after = Some((s.last_seen_at, s.record.handle.clone()));
                }
                _ => break,
            }
        }
        let mut revoked = Vec::new();
        for h in matching {
            if let Some(out) = self.store.revoke(&h, reason, now, audit).await?
                && out.revoked_now
            {
                revoked.push(h.as_str().to_owned());
            }
        }
        self.publish(audit);
        Ok(revoked)
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
        if policy.document().impossible_travel.is_some() && self.locator.is_none() {
            return Err(CoreError::InvalidPolicy(
                "impossible_travel needs a geolocation database: start the server with \
                 --geoip-db FILE.mmdb (the detector is off without one)"
                    .into(),
            ));
        }
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
        let limit = page_size(q.limit)?;
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
            handle: q
                .handle
                .as_deref()
                .map(|h| {
                    SessionHandle::parse(h).map_err(|_| {
                        CoreError::InvalidRequest("handle must be a session handle".into())
                    })
                })
                .transpose()?,
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

/// A detector's finding about a session in use.
struct Finding {
    kind: EventKind,
    flag: &'static str,
    reason: &'static str,
    details: Map<String, Value>,
}

/// Whether a session in a listing counts as active (helper for stores).
pub fn is_active(s: &StoredSession, policy: &Policy, now: Timestamp) -> bool {
    liveness(&s.record, s.last_seen_at, policy, now) == Liveness::Active
}

/// The page size of a listing: `limit`, or the default; 1 to [`MAX_PAGE`].
pub fn page_size(limit: Option<usize>) -> Result<usize, CoreError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(CoreError::InvalidRequest(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    Ok(limit)
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

/// `audit` with the end user's address and user agent taken from `client`.
fn from_client(audit: &Audit, client: &crate::session::DeviceRecord) -> Audit {
    let mut a = audit.clone();
    a.ip = client.ip;
    a.user_agent = client.user_agent.clone();
    a
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
