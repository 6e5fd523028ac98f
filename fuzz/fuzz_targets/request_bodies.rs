//! Every request body of the API, deserialized from arbitrary bytes as the server does, and each
//! one that parses taken through the validation the server applies to it: the
//! `SessionService` operation of its endpoint, over an in-memory store and a fixed clock.
//! Nothing may panic; a valid request must get the session the contract promises.

#![no_main]

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use sessiond_api::{
    AuthInput, ClientInput, CreateSessionRequest, PatchSessionRequest, PolicyDocument,
    ReauthenticateRequest, Requirements, SessionStatus, TokenRequest, VerifyRequest,
};
use sessiond_core::CoreError;
use sessiond_core::device::device_from;
use sessiond_core::events::{Audit, Event, EventKind, MemorySink};
use sessiond_core::jwt::{Keyring, SigningAlg};
use sessiond_core::keys::Keys;
use sessiond_core::policy::Policy;
use sessiond_core::service::{ServiceConfig, SessionService};
use sessiond_core::session::{
    self, Liveness, SessionRecord, StoredSession, StoredState, validate_requirements,
};
use sessiond_core::store::{
    DataUpdate, DeliveryQuery, EventQuery, InsertOutcome, ListQuery, Rekey, RevokeOutcome,
    RotateOutcome, SessionStore, StoreError, SweepReport,
};
use sessiond_core::time::{ManualClock, Timestamp};
use sessiond_core::token::{SessionHandle, TenantId, TokenHash, UserId};

/// 2026-06-01T00:00:00Z.
const NOW_MS: i64 = 1_780_272_000_000;
const MAX_DATA_BYTES: usize = 4096;

/// Runs a future that never waits: every store call below answers at once.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[derive(Default)]
struct Inner {
    by_handle: HashMap<SessionHandle, StoredSession>,
    by_hash: HashMap<TokenHash, SessionHandle>,
    policies: HashMap<TenantId, Arc<Policy>>,
    documents: HashMap<String, (u64, String)>,
    events: Vec<sessiond_api::Event>,
}

/// A store in memory with the semantics the service relies on (no limits, no sweeping, no
/// webhook deliveries; events are kept).
#[derive(Default)]
struct MemStore(Mutex<Inner>);

impl MemStore {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().expect("not poisoned")
    }
}

fn active(inner: &Inner, s: &StoredSession, now: Timestamp) -> bool {
    let policy = inner
        .policies
        .get(&s.record.tenant)
        .cloned()
        .unwrap_or_default();
    session::liveness(&s.record, s.last_seen_at, &policy, now) == Liveness::Active
}

fn replace(inner: &mut Inner, rec: SessionRecord, last_seen_at: Timestamp) -> StoredSession {
    let s = StoredSession {
        record: Arc::new(rec),
        last_seen_at,
    };
    inner.by_handle.insert(s.record.handle.clone(), s.clone());
    s
}

#[async_trait]
impl SessionStore for MemStore {
    async fn insert(
        &self,
        record: SessionRecord,
        _now: Timestamp,
        audit: &Audit,
    ) -> Result<InsertOutcome, StoreError> {
        let mut inner = self.lock();
        let e = audit.created(&record, None);
        inner.events.push(e.to_wire());
        audit.committed([e]);
        inner
            .by_hash
            .insert(record.token_hash, record.handle.clone());
        let last_seen_at = record.last_seen_at;
        replace(&mut inner, record, last_seen_at);
        Ok(InsertOutcome::Inserted { evicted: vec![] })
    }

    async fn find_by_token(&self, hash: &TokenHash) -> Result<Option<StoredSession>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .by_hash
            .get(hash)
            .and_then(|h| inner.by_handle.get(h))
            .cloned())
    }

    async fn find_by_handle(
        &self,
        handle: &SessionHandle,
    ) -> Result<Option<StoredSession>, StoreError> {
        Ok(self.lock().by_handle.get(handle).cloned())
    }

    async fn touch(
        &self,
        session: &StoredSession,
        _policy: &Policy,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.lock().by_handle.get_mut(&session.record.handle) {
            s.last_seen_at = s.last_seen_at.max(at);
        }
        Ok(())
    }

    async fn rotate(
        &self,
        handle: &SessionHandle,
        change: &Rekey,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<RotateOutcome, StoreError> {
        let mut inner = self.lock();
        let Some(s) = inner.by_handle.get(handle).cloned() else {
            return Ok(RotateOutcome::Stale);
        };
        if !change.matches(&s.record) || !active(&inner, &s, now) {
            return Ok(RotateOutcome::Stale);
        }
        let rec = change.apply(&s.record, s.last_seen_at, now);
        inner.by_hash.remove(&s.record.token_hash);
        inner.by_hash.insert(rec.token_hash, handle.clone());
        let seen = rec.last_seen_at;
        let e = change.event_for(audit, now, &rec);
        inner.events.push(e.to_wire());
        audit.committed([e]);
        Ok(RotateOutcome::Rotated(replace(&mut inner, rec, seen)))
    }

    async fn revoke(
        &self,
        handle: &SessionHandle,
        reason: &str,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<Option<RevokeOutcome>, StoreError> {
        let mut inner = self.lock();
        let Some(s) = inner.by_handle.get(handle).cloned() else {
            return Ok(None);
        };
        if !active(&inner, &s, now) {
            return Ok(Some(RevokeOutcome {
                session: s,
                revoked_now: false,
            }));
        }
        let mut rec = (*s.record).clone();
        rec.state = StoredState::Revoked {
            reason: reason.into(),
            at: now,
        };
        let e = audit.session_event(EventKind::SessionRevoked, now, &rec, Some(reason));
        inner.events.push(e.to_wire());
        audit.committed([e]);
        Ok(Some(RevokeOutcome {
            session: replace(&mut inner, rec, s.last_seen_at),
            revoked_now: true,
        }))
    }

    async fn revoke_user(
        &self,
        _user_id: &UserId,
        _tenant: Option<&TenantId>,
        _except: Option<&SessionHandle>,
        _reason: &str,
        _now: Timestamp,
        _audit: &Audit,
    ) -> Result<Vec<SessionHandle>, StoreError> {
        Ok(vec![])
    }

    async fn update_data(
        &self,
        handle: &SessionHandle,
        patch: &Map<String, Value>,
        limit: usize,
        now: Timestamp,
        _audit: &Audit,
    ) -> Result<DataUpdate, StoreError> {
        let mut inner = self.lock();
        let Some(s) = inner.by_handle.get(handle).cloned() else {
            return Ok(DataUpdate::NotFound);
        };
        if !active(&inner, &s, now) {
            return Ok(DataUpdate::NotActive);
        }
        match session::patch_data(&s.record.data, patch, limit) {
            Ok(text) => {
                let mut rec = (*s.record).clone();
                rec.data = text.into();
                Ok(DataUpdate::Updated(replace(
                    &mut inner,
                    rec,
                    s.last_seen_at,
                )))
            }
            Err(CoreError::DataTooLarge { size, limit }) => {
                Ok(DataUpdate::TooLarge { size, limit })
            }
            Err(e) => Err(StoreError::Backend(e.to_string())),
        }
    }

    async fn list_user(
        &self,
        _query: &ListQuery,
        _now: Timestamp,
    ) -> Result<Vec<StoredSession>, StoreError> {
        Ok(vec![])
    }

    async fn policy(&self, tenant: &TenantId) -> Result<Arc<Policy>, StoreError> {
        Ok(self
            .lock()
            .policies
            .get(tenant)
            .cloned()
            .unwrap_or_default())
    }

    async fn put_policy(
        &self,
        tenant: &TenantId,
        policy: Policy,
        now: Timestamp,
        audit: &Audit,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.policies.insert(tenant.clone(), Arc::new(policy));
        let e = audit.event(EventKind::PolicyUpdated, now, tenant);
        inner.events.push(e.to_wire());
        audit.committed([e]);
        Ok(())
    }

    async fn sweep(
        &self,
        _now: Timestamp,
        _retention_s: u64,
        _audit: &Audit,
    ) -> Result<SweepReport, StoreError> {
        Ok(SweepReport::default())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn document(&self, name: &str) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.lock().documents.get(name).cloned())
    }

    async fn put_document(
        &self,
        name: &str,
        expected: Option<u64>,
        doc: &str,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if inner.documents.get(name).map(|(v, _)| *v) != expected {
            return Ok(false);
        }
        let v = expected.unwrap_or(0) + 1;
        inner.documents.insert(name.to_owned(), (v, doc.to_owned()));
        Ok(true)
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        self.lock().events.extend(events.iter().map(Event::to_wire));
        Ok(())
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<sessiond_api::Event>, StoreError> {
        let mut out: Vec<_> = self
            .lock()
            .events
            .iter()
            .filter(|e| query.matches(e))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.id.cmp(&a.id));
        out.truncate(query.limit);
        Ok(out)
    }

    async fn purge_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let n = inner.events.len();
        inner
            .events
            .retain(|e| Timestamp::from_datetime(e.time) >= before);
        Ok((n - inner.events.len()) as u64)
    }

    async fn pending_events(&self, _limit: usize) -> Result<Vec<sessiond_api::Event>, StoreError> {
        Ok(vec![])
    }

    async fn fan_out(
        &self,
        _events: &[String],
        _deliveries: &[sessiond_api::Delivery],
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn due_deliveries(
        &self,
        _now: Timestamp,
        _limit: usize,
    ) -> Result<Vec<sessiond_api::Delivery>, StoreError> {
        Ok(vec![])
    }

    async fn put_delivery(&self, _delivery: &sessiond_api::Delivery) -> Result<(), StoreError> {
        Ok(())
    }

    async fn deliveries(
        &self,
        _query: &DeliveryQuery,
    ) -> Result<Vec<sessiond_api::Delivery>, StoreError> {
        Ok(vec![])
    }
}

/// One keyring for every run: key generation is not what is fuzzed here.
fn keyring_doc() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        Keyring::generate(SigningAlg::EdDSA, Timestamp::from_millis(NOW_MS), None)
            .expect("a keyring")
    })
}

fn service() -> SessionService {
    let store = Arc::new(MemStore::default());
    store
        .lock()
        .documents
        .insert("keyring".into(), (1, keyring_doc().to_owned()));
    let keys = block_on(Keys::load_or_init(
        store.clone(),
        None,
        SigningAlg::EdDSA,
        Timestamp::from_millis(NOW_MS),
    ))
    .expect("the keyring loads");
    SessionService::new(
        store,
        Arc::new(ManualClock::new(Timestamp::from_millis(NOW_MS))),
        Arc::new(MemorySink::default()),
        ServiceConfig {
            max_data_bytes: MAX_DATA_BYTES,
            ..ServiceConfig::default()
        },
    )
    .with_keys(Arc::new(keys))
}

/// The only errors validation may answer for a request that parsed.
fn is_client_error(e: &CoreError) -> bool {
    matches!(
        e,
        CoreError::InvalidRequest(_)
            | CoreError::InvalidPolicy(_)
            | CoreError::DataTooLarge { .. }
            | CoreError::NotFound
            | CoreError::SessionUnknown
            | CoreError::SessionExpired
            | CoreError::SessionRevoked
            | CoreError::SessionNotActive
            | CoreError::ReauthenticationRequired(_)
            | CoreError::TokenInvalid(_)
            | CoreError::TokenExpired
    )
}

fn check_data_limit(e: &CoreError) {
    if let CoreError::DataTooLarge { size, limit } = e {
        assert!(size > limit, "{e}");
        assert_eq!(*limit, MAX_DATA_BYTES);
    }
}

/// A plain session to run token- and handle-based requests against: (token, handle).
fn baseline(svc: &SessionService) -> (String, String) {
    let req = CreateSessionRequest {
        user_id: "u-42".into(),
        ..CreateSessionRequest::default()
    };
    let issued = block_on(svc.create(&req, &Audit::default())).expect("a minimal create succeeds");
    (issued.token.expose().to_owned(), issued.session.handle)
}

fn check_create(req: &CreateSessionRequest) {
    let svc = service();
    let issued = match block_on(svc.create(req, &Audit::default())) {
        Ok(i) => i,
        Err(e) => {
            assert!(is_client_error(&e), "create answered {e:?}");
            check_data_limit(&e);
            return;
        }
    };
    let s = &issued.session;
    assert_eq!(s.user_id, req.user_id);
    assert_eq!(s.tenant, req.tenant.as_deref().unwrap_or("default"));
    assert_eq!(s.status, SessionStatus::Active);
    assert_eq!(s.remember_me, req.remember_me);
    assert_eq!(&s.data, req.data.as_ref().unwrap_or(&Map::new()));
    assert!((1..=3).contains(&s.auth.aal));
    assert!(s.auth.authenticated_at <= s.created_at);
    assert!(s.idle_expires_at <= s.expires_at && s.created_at < s.idle_expires_at);
    if let Some(ua) = req.client.as_ref().and_then(|c| c.user_agent.as_deref()) {
        assert_eq!(
            s.device.user_agent.as_deref(),
            (!ua.is_empty()).then_some(ua)
        );
    }
    let token = issued.token.expose().to_owned();
    assert!(
        issued
            .set_cookie
            .starts_with(&format!("{}={token}; ", issued.cookie_name))
    );
    assert!(!issued.set_cookie.contains(['\r', '\n']));

    let verified = block_on(svc.verify(&VerifyRequest {
        token: Some(token.clone()),
        access_token: None,
        client: None,
        require: None,
    }))
    .expect("a fresh session verifies");
    assert_eq!(verified.handle, s.handle);
    assert_eq!(verified.data, s.data);

    let (ended, clear) = block_on(svc.logout(&token, &Audit::default())).expect("logout");
    assert_eq!(ended.status, SessionStatus::Revoked);
    assert!(clear.starts_with(&format!("{}=; ", issued.cookie_name)));
    assert!(matches!(
        block_on(svc.verify(&VerifyRequest {
            token: Some(token),
            access_token: None,
            client: None,
            require: None,
        })),
        Err(CoreError::SessionRevoked)
    ));
}

fn check_verify(req: &VerifyRequest) {
    let svc = service();
    if let Err(e) = block_on(svc.verify(req)) {
        assert!(is_client_error(&e), "verify answered {e:?}");
    }
    // The same request with a live token: only validation or step-up can refuse it.
    let (token, handle) = baseline(&svc);
    let live = VerifyRequest {
        token: Some(token),
        access_token: None,
        ..req.clone()
    };
    match block_on(svc.verify(&live)) {
        Ok(s) => assert_eq!(s.handle, handle),
        Err(CoreError::InvalidRequest(_) | CoreError::ReauthenticationRequired(_)) => {}
        Err(e) => panic!("verify of a live session answered {e:?}"),
    }
}

fn check_token(req: &TokenRequest) {
    let svc = service();
    for r in [
        block_on(svc.rotate(&req.token, &Audit::default())).map(drop),
        block_on(svc.logout(&req.token, &Audit::default())).map(drop),
    ] {
        if let Err(e) = r {
            assert!(is_client_error(&e), "answered {e:?}");
        }
    }
}

fn check_reauthenticate(req: &ReauthenticateRequest) {
    let svc = service();
    if let Err(e) = block_on(svc.reauthenticate(
        &req.token,
        &req.auth,
        req.client.as_ref(),
        &Audit::default(),
    )) {
        assert!(is_client_error(&e), "reauthenticate answered {e:?}");
    }
    let (token, handle) = baseline(&svc);
    match block_on(svc.reauthenticate(&token, &req.auth, req.client.as_ref(), &Audit::default())) {
        Ok(issued) => {
            assert_eq!(issued.session.handle, handle);
            assert_ne!(issued.token.expose(), token);
            assert_eq!(issued.session.auth.aal, req.auth.aal.unwrap_or(1));
            assert!(matches!(
                block_on(svc.rotate(&token, &Audit::default())),
                Err(CoreError::SessionUnknown)
            ));
        }
        Err(CoreError::InvalidRequest(_)) => {}
        Err(e) => panic!("reauthenticate of a live session answered {e:?}"),
    }
}

fn check_patch(req: &PatchSessionRequest) {
    let svc = service();
    let (_, handle) = baseline(&svc);
    let before = block_on(svc.get(&handle)).expect("get").data;
    match block_on(svc.patch_data(&handle, &req.data, &Audit::default())) {
        Ok(s) => {
            let mut expected = before;
            session::merge_patch(&mut expected, &req.data);
            assert_eq!(s.data, expected);
            assert!(serde_json::to_string(&s.data).expect("JSON").len() <= MAX_DATA_BYTES);
        }
        Err(e) => {
            assert!(
                matches!(e, CoreError::DataTooLarge { .. }),
                "patch answered {e:?}"
            );
            check_data_limit(&e);
        }
    }
}

fn check_policy(doc: &PolicyDocument) {
    let svc = service();
    match block_on(svc.put_policy("acme", doc.clone(), &Audit::default())) {
        Ok(stored) => {
            assert_eq!(&stored, doc);
            assert_eq!(&block_on(svc.policy("acme")).expect("get policy"), doc);
            let req = CreateSessionRequest {
                user_id: "u-42".into(),
                tenant: Some("acme".into()),
                remember_me: true,
                ..CreateSessionRequest::default()
            };
            let issued =
                block_on(svc.create(&req, &Audit::default())).expect("create under a valid policy");
            assert!(issued.set_cookie.contains("; Max-Age="));
            assert!(!issued.set_cookie.contains(['\r', '\n']));
        }
        Err(e) => assert!(
            matches!(e, CoreError::InvalidPolicy(_)),
            "put_policy answered {e:?}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<CreateSessionRequest>(data) {
        check_create(&req);
    }
    if let Ok(req) = serde_json::from_slice::<VerifyRequest>(data) {
        check_verify(&req);
    }
    if let Ok(req) = serde_json::from_slice::<TokenRequest>(data) {
        check_token(&req);
    }
    if let Ok(req) = serde_json::from_slice::<ReauthenticateRequest>(data) {
        check_reauthenticate(&req);
    }
    if let Ok(req) = serde_json::from_slice::<PatchSessionRequest>(data) {
        check_patch(&req);
    }
    if let Ok(doc) = serde_json::from_slice::<PolicyDocument>(data) {
        check_policy(&doc);
    }
    // The parts, as they appear inside the bodies above.
    if let Ok(auth) = serde_json::from_slice::<AuthInput>(data) {
        check_create(&CreateSessionRequest {
            user_id: "u-42".into(),
            auth: Some(auth),
            ..CreateSessionRequest::default()
        });
    }
    if let Ok(client) = serde_json::from_slice::<ClientInput>(data)
        && let Err(e) = device_from(Some(&client))
    {
        assert!(matches!(e, CoreError::InvalidRequest(_)), "{e:?}");
    }
    if let Ok(req) = serde_json::from_slice::<Requirements>(data) {
        let valid = req.min_aal.is_none_or(|a| (1..=3).contains(&a));
        assert_eq!(validate_requirements(&req).is_ok(), valid);
    }
});
