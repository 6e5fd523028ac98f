//! The lifecycle rules through `SessionService` on the embedded store, with a manual clock:
//! time moves by hours in a microsecond.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use sessiond_core::CoreError;
use sessiond_core::api::{
    AuthInput, CreateSessionRequest, PolicyDocument, Requirements, SessionStatus, VerifyRequest,
};
use sessiond_core::events::{Audit, EventKind, MemorySink};
use sessiond_core::service::{ServiceConfig, SessionService, StatusFilter};
use sessiond_core::time::{Clock, ManualClock, Timestamp};
use sessiond_store::{EmbeddedOptions, EmbeddedStore};

struct Fixture {
    svc: SessionService,
    clock: Arc<ManualClock>,
    events: Arc<MemorySink>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap());
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
    let events = Arc::new(MemorySink::default());
    let svc = SessionService::new(
        store,
        clock.clone(),
        events.clone(),
        ServiceConfig::default(),
    );
    Fixture {
        svc,
        clock,
        events,
        _dir: dir,
    }
}

fn create_req(user: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        user_id: user.into(),
        ..Default::default()
    }
}

fn verify_req(token: &str) -> VerifyRequest {
    VerifyRequest {
        token: Some(token.into()),
        access_token: None,
        client: None,
        require: None,
    }
}

async fn login(f: &Fixture, user: &str) -> String {
    f.svc
        .create(&create_req(user), &Audit::default())
        .await
        .unwrap()
        .token
        .expose()
        .to_owned()
}

#[tokio::test]
async fn idle_timeout_slides_with_use() {
    let f = fixture();
    let t = login(&f, "u").await;
    for _ in 0..10 {
        f.clock.advance_secs(1799);
        assert!(
            f.svc.verify(&verify_req(&t)).await.is_ok(),
            "used within the idle timeout"
        );
    }
    f.clock.advance_secs(1800);
    assert!(matches!(
        f.svc.verify(&verify_req(&t)).await,
        Err(CoreError::SessionExpired)
    ));
}

#[tokio::test]
async fn absolute_timeout_never_slides() {
    let f = fixture();
    let t = login(&f, "u").await;
    let mut elapsed = 0;
    while elapsed + 1000 < 43_200 {
        f.clock.advance_secs(1000);
        elapsed += 1000;
        assert!(f.svc.verify(&verify_req(&t)).await.is_ok());
    }
    f.clock.advance_secs(43_200 - elapsed);
    assert!(matches!(
        f.svc.verify(&verify_req(&t)).await,
        Err(CoreError::SessionExpired)
    ));
}

#[tokio::test]
async fn remember_me_sessions_use_their_own_timeouts() {
    let f = fixture();
    let req = CreateSessionRequest {
        remember_me: true,
        ..create_req("u")
    };
    let issued = f.svc.create(&req, &Audit::default()).await.unwrap();
    assert!(issued.set_cookie.ends_with("; Max-Age=2592000"));
    let t = issued.token.expose().to_owned();
    f.clock.advance_secs(7 * 24 * 3600);
    assert!(
        f.svc.verify(&verify_req(&t)).await.is_ok(),
        "a week idle is fine for remember-me"
    );
    f.clock.advance_secs(14 * 24 * 3600);
    assert!(matches!(
        f.svc.verify(&verify_req(&t)).await,
        Err(CoreError::SessionExpired)
    ));
}

#[tokio::test]
async fn rotation_kills_the_old_token_at_once_and_keeps_the_handle() {
    let f = fixture();
    let issued = f
        .svc
        .create(&create_req("u"), &Audit::default())
        .await
        .unwrap();
    let old = issued.token.expose().to_owned();
    let rotated = f.svc.rotate(&old, &Audit::default()).await.unwrap();
    assert_eq!(rotated.session.handle, issued.session.handle);
    assert!(matches!(
        f.svc.verify(&verify_req(&old)).await,
        Err(CoreError::SessionUnknown)
    ));
    assert!(matches!(
        f.svc.rotate(&old, &Audit::default()).await,
        Err(CoreError::SessionUnknown)
    ));
    assert!(
        f.svc
            .verify(&verify_req(rotated.token.expose()))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn step_up_requirements_and_reauthentication() {
    let f = fixture();
    let t = login(&f, "u").await;
    let req = |token: &str, age, aal| VerifyRequest {
        token: Some(token.into()),
        access_token: None,
        client: None,
        require: Some(Requirements {
            max_auth_age_s: age,
            min_aal: aal,
        }),
    };
    assert!(f.svc.verify(&req(&t, Some(300), None)).await.is_ok());
    f.clock.advance_secs(301);
    assert!(matches!(
        f.svc.verify(&req(&t, Some(300), None)).await,
        Err(CoreError::ReauthenticationRequired(_))
    ));
    assert!(matches!(
        f.svc.verify(&req(&t, None, Some(2))).await,
        Err(CoreError::ReauthenticationRequired(_))
    ));
    let auth = AuthInput {
        method: Some("totp".into()),
        aal: Some(2),
        authenticated_at: None,
    };
    let stepped = f
        .svc
        .reauthenticate(&t, &auth, None, &Audit::default())
        .await
        .unwrap();
    let t2 = stepped.token.expose().to_owned();
    assert_eq!(stepped.session.auth.aal, 2);
    assert!(f.svc.verify(&req(&t2, Some(300), Some(2))).await.is_ok());
    assert!(matches!(
        f.svc.verify(&verify_req(&t)).await,
        Err(CoreError::SessionUnknown)
    ));
}

#[tokio::test]
async fn logout_and_revoke_and_force_logout() {
    let f = fixture();
    let a = f
        .svc
        .create(&create_req("u"), &Audit::default())
        .await
        .unwrap();
    let b = login(&f, "u").await;
    let c = login(&f, "u").await;
    let (s, clear) = f
        .svc
        .logout(a.token.expose(), &Audit::default())
        .await
        .unwrap();
    assert_eq!(s.status, SessionStatus::Revoked);
    assert!(clear.contains("Max-Age=0"));
    assert!(matches!(
        f.svc.verify(&verify_req(a.token.expose())).await,
        Err(CoreError::SessionRevoked)
    ));
    // Force logout except c.
    let c_handle = f.svc.verify(&verify_req(&c)).await.unwrap().handle;
    assert_eq!(
        f.svc
            .force_logout("u", None, Some(&c_handle), &Audit::default())
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        f.svc.verify(&verify_req(&b)).await,
        Err(CoreError::SessionRevoked)
    ));
    assert!(f.svc.verify(&verify_req(&c)).await.is_ok());
    let revoked = f
        .svc
        .revoke(&c_handle, Some("admin"), &Audit::default())
        .await
        .unwrap();
    assert_eq!(revoked.revoked_reason.as_deref(), Some("admin"));
    let kinds: Vec<(EventKind, Option<String>)> = f
        .events
        .events()
        .into_iter()
        .map(|e| (e.kind, e.reason))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::SessionCreated, None),
            (EventKind::SessionCreated, None),
            (EventKind::SessionCreated, None),
            (EventKind::SessionRevoked, Some("logout".into())),
            // Presenting a revoked token is recorded (never the token).
            (
                EventKind::SecurityInvalidToken,
                Some("session_revoked".into())
            ),
            (EventKind::SessionRevoked, Some("force_logout".into())),
            (
                EventKind::SecurityInvalidToken,
                Some("session_revoked".into())
            ),
            (EventKind::SessionRevoked, Some("admin".into())),
        ]
    );
}

#[tokio::test]
async fn limits_evict_the_least_recently_used_with_an_event() {
    let f = fixture();
    let doc = PolicyDocument {
        max_sessions_per_user: Some(2),
        ..PolicyDocument::default()
    };
    f.svc
        .put_policy("default", doc, &Audit::default())
        .await
        .unwrap();
    let a = login(&f, "u").await;
    f.clock.advance_secs(1);
    let b = login(&f, "u").await;
    f.clock.advance_secs(1);
    f.svc.verify(&verify_req(&a)).await.unwrap();
    f.clock.advance_secs(1);
    let _c = login(&f, "u").await;
    assert!(f.svc.verify(&verify_req(&a)).await.is_ok());
    assert!(matches!(
        f.svc.verify(&verify_req(&b)).await,
        Err(CoreError::SessionRevoked)
    ));
    assert!(
        f.events
            .events()
            .iter()
            .any(|e| e.reason.as_deref() == Some("limit_evicted"))
    );
    // Sessions that timed out free their place.
    f.clock.advance_secs(1800);
    let _d = login(&f, "u").await;
    let _e = login(&f, "u").await;
    let listed = f
        .svc
        .list_user("u", None, StatusFilter::Active, None, None)
        .await
        .unwrap();
    assert_eq!(listed.sessions.len(), 2);
}

#[tokio::test]
async fn policy_changes_apply_at_the_next_verify() {
    let f = fixture();
    let t = login(&f, "u").await;
    f.clock.advance_secs(600);
    let doc = PolicyDocument {
        idle_timeout_s: 300,
        ..PolicyDocument::default()
    };
    f.svc
        .put_policy("default", doc, &Audit::default())
        .await
        .unwrap();
    assert!(matches!(
        f.svc.verify(&verify_req(&t)).await,
        Err(CoreError::SessionExpired)
    ));
    assert!(
        f.events
            .events()
            .iter()
            .any(|e| e.kind == EventKind::PolicyUpdated)
    );
}

#[tokio::test]
async fn a_relaxed_policy_never_revives_a_timed_out_session() {
    let f = fixture();
    let short = |idle, abs| PolicyDocument {
        idle_timeout_s: idle,
        absolute_timeout_s: abs,
        remember_me_idle_timeout_s: idle,
        remember_me_absolute_timeout_s: abs,
        ..PolicyDocument::default()
    };
    let relaxed = PolicyDocument::default();
    let put = |doc: PolicyDocument| {
        let svc = &f.svc;
        async move {
            svc.put_policy("default", doc, &Audit::default())
                .await
                .unwrap()
        }
    };
    put(short(2, 3)).await;
    // Idle-expired: unused past 2 s.
    let idle = login(&f, "idle").await;
    // Past its absolute expiry: used every second, so never idle.
    let abs = login(&f, "abs").await;
    // Remember-me, idle-expired under its own timeouts.
    let remembered = f
        .svc
        .create(
            &CreateSessionRequest {
                remember_me: true,
                ..create_req("rm")
            },
            &Audit::default(),
        )
        .await
        .unwrap()
        .token
        .expose()
        .to_owned();
    for _ in 0..3 {
        f.clock.advance_millis(1000);
        let _ = f.svc.verify(&verify_req(&abs)).await;
    }
    f.clock.advance_millis(500);
    for t in [&idle, &abs, &remembered] {
        assert!(matches!(
            f.svc.verify(&verify_req(t)).await,
            Err(CoreError::SessionExpired)
        ));
    }
    put(relaxed.clone()).await;
    for t in [&idle, &abs, &remembered] {
        assert!(
            matches!(
                f.svc.verify(&verify_req(t)).await,
                Err(CoreError::SessionExpired)
            ),
            "a relaxed policy revived a timed-out session"
        );
    }

    // A live session keeps its absolute expiry when the policy is relaxed, and takes a
    // stricter one at its next verify.
    put(short(60, 120)).await;
    let live = login(&f, "live").await;
    let before = f.svc.verify(&verify_req(&live)).await.unwrap().expires_at;
    put(relaxed).await;
    assert_eq!(
        f.svc.verify(&verify_req(&live)).await.unwrap().expires_at,
        before
    );
    put(short(30, 30)).await;
    let stricter = f.svc.verify(&verify_req(&live)).await.unwrap().expires_at;
    assert!(stricter < before);
    f.clock.advance_secs(30);
    assert!(matches!(
        f.svc.verify(&verify_req(&live)).await,
        Err(CoreError::SessionExpired)
    ));
}

#[tokio::test]
async fn sweep_marks_expired_with_an_event_and_purges_after_retention() {
    let f = fixture();
    let t = login(&f, "u").await;
    let handle = f.svc.verify(&verify_req(&t)).await.unwrap().handle;
    f.clock.advance_secs(1800);
    let r = f.svc.sweep(3600).await.unwrap();
    assert_eq!(r.expired.len(), 1);
    assert_eq!(
        f.svc.get(&handle).await.unwrap().status,
        SessionStatus::Expired
    );
    assert!(
        f.events
            .events()
            .iter()
            .any(|e| e.kind == EventKind::SessionExpired)
    );
    f.clock.advance_secs(3601);
    assert_eq!(f.svc.sweep(3600).await.unwrap().purged, 1);
    assert!(matches!(f.svc.get(&handle).await, Err(CoreError::NotFound)));
    assert!(matches!(
        f.svc.verify(&verify_req(&t)).await,
        Err(CoreError::SessionUnknown)
    ));
}

#[tokio::test]
async fn authenticated_at_in_the_future_is_refused_and_in_the_past_is_kept() {
    let f = fixture();
    let now = f.clock.now().to_datetime();
    let future = CreateSessionRequest {
        auth: Some(AuthInput {
            authenticated_at: Some(now + chrono::Duration::hours(1)),
            ..Default::default()
        }),
        ..create_req("u")
    };
    assert!(matches!(
        f.svc.create(&future, &Audit::default()).await,
        Err(CoreError::InvalidRequest(_))
    ));
    let past = CreateSessionRequest {
        auth: Some(AuthInput {
            authenticated_at: Some(now - chrono::Duration::hours(1)),
            ..Default::default()
        }),
        ..create_req("u")
    };
    let s = f
        .svc
        .create(&past, &Audit::default())
        .await
        .unwrap()
        .session;
    assert_eq!(s.auth.authenticated_at, now - chrono::Duration::hours(1));
}

fn authed(method: Option<&str>, aal: u8) -> Option<AuthInput> {
    Some(AuthInput {
        method: method.map(str::to_owned),
        aal: Some(aal),
        authenticated_at: None,
    })
}

fn invalid_request(r: Result<sessiond_core::service::Issued, CoreError>, needle: &str) {
    match r {
        Err(CoreError::InvalidRequest(m)) => assert!(m.contains(needle), "{m} / {needle}"),
        other => panic!("{needle}: {other:?}"),
    }
}

#[tokio::test]
async fn authenticated_at_older_than_the_sessions_absolute_timeout_is_refused() {
    let f = fixture();
    let now = f.clock.now().to_datetime();
    let at = |ago_s: i64, remember_me: bool| CreateSessionRequest {
        remember_me,
        auth: Some(AuthInput {
            authenticated_at: Some(now - chrono::Duration::seconds(ago_s)),
            ..Default::default()
        }),
        ..create_req("u")
    };
    // A plain session lives 12 h: an authentication that old could not have started it.
    assert!(
        f.svc
            .create(&at(43_199, false), &Audit::default())
            .await
            .is_ok()
    );
    invalid_request(
        f.svc.create(&at(43_200, false), &Audit::default()).await,
        "auth.authenticated_at",
    );
    invalid_request(
        f.svc
            .create(&at(10 * 365 * 86_400, false), &Audit::default())
            .await,
        "absolute timeout",
    );
    // A remember-me session lives 30 days.
    assert!(
        f.svc
            .create(&at(43_200, true), &Audit::default())
            .await
            .is_ok()
    );
    invalid_request(
        f.svc
            .create(&at(30 * 86_400, true), &Audit::default())
            .await,
        "auth.authenticated_at",
    );
}

#[tokio::test]
async fn require_auth_refuses_sessions_without_an_authentication_event() {
    let f = fixture();
    // Off by default: the API lets auth be omitted.
    assert!(
        f.svc
            .create(&create_req("u"), &Audit::default())
            .await
            .is_ok()
    );
    let doc = PolicyDocument {
        require_auth: true,
        ..PolicyDocument::default()
    };
    f.svc
        .put_policy("default", doc, &Audit::default())
        .await
        .unwrap();
    assert!(f.svc.policy("default").await.unwrap().require_auth);
    invalid_request(
        f.svc.create(&create_req("u"), &Audit::default()).await,
        "auth.method is required",
    );
    let no_method = CreateSessionRequest {
        auth: authed(None, 1),
        ..create_req("u")
    };
    invalid_request(
        f.svc.create(&no_method, &Audit::default()).await,
        "require_auth",
    );
    let ok = CreateSessionRequest {
        auth: authed(Some("webauthn"), 2),
        ..create_req("u")
    };
    let s = f.svc.create(&ok, &Audit::default()).await.unwrap().session;
    assert_eq!((s.auth.method.as_str(), s.auth.aal), ("webauthn", 2));
}

#[tokio::test]
async fn a_password_alone_claims_at_most_aal_1() {
    let f = fixture();
    for (method, aal) in [("password", 2), ("password", 3), ("PASSWORD", 2)] {
        let req = CreateSessionRequest {
            auth: authed(Some(method), aal),
            ..create_req("u")
        };
        invalid_request(f.svc.create(&req, &Audit::default()).await, "second factor");
    }
    for (method, aal) in [("password", 1), ("password.otp", 2), ("webauthn", 3)] {
        let req = CreateSessionRequest {
            auth: authed(Some(method), aal),
            ..create_req("u")
        };
        assert!(
            f.svc.create(&req, &Audit::default()).await.is_ok(),
            "{method}"
        );
    }
    let t = login(&f, "u").await;
    let step = AuthInput {
        method: Some("password".into()),
        aal: Some(3),
        authenticated_at: None,
    };
    invalid_request(
        f.svc
            .reauthenticate(&t, &step, None, &Audit::default())
            .await,
        "second factor",
    );
}

async fn step_up(f: &Fixture, t: String, aal: u8) -> String {
    let auth = AuthInput {
        method: Some("webauthn".into()),
        aal: Some(aal),
        authenticated_at: None,
    };
    f.svc
        .reauthenticate(&t, &auth, None, &Audit::default())
        .await
        .unwrap()
        .token
        .expose()
        .to_owned()
}

#[tokio::test]
async fn assurance_levels_follow_nist_limits_and_remember_me_does_not_extend_them() {
    let f = fixture();
    let need = |token: &str, aal| VerifyRequest {
        require: Some(Requirements {
            max_auth_age_s: None,
            min_aal: Some(aal),
        }),
        ..verify_req(token)
    };
    let reauth = |r: Result<_, CoreError>| matches!(r, Err(CoreError::ReauthenticationRequired(_)));
    let req = CreateSessionRequest {
        remember_me: true,
        auth: authed(Some("webauthn"), 2),
        ..create_req("u")
    };
    let t = f.svc.create(&req, &Audit::default()).await.unwrap();
    let t = t.token.expose().to_owned();
    // AAL 2: 30 minutes without use ends the level, not the remember-me session.
    f.clock.advance_secs(1799);
    assert!(f.svc.verify(&need(&t, 2)).await.is_ok());
    f.clock.advance_secs(1800);
    assert!(reauth(f.svc.verify(&need(&t, 2)).await));
    // The next use, soon after, does not bring the level back: it was lowered for good.
    assert!(f.svc.verify(&need(&t, 1)).await.is_ok());
    assert!(reauth(f.svc.verify(&need(&t, 2)).await));
    let lowered: Vec<_> = f
        .events
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::SessionAalLowered)
        .collect();
    assert_eq!(lowered.len(), 1);
    assert_eq!(lowered[0].details["from_aal"], 2);
    assert_eq!(lowered[0].details["aal"], 1);
    // Reauthenticated: AAL 2 again, kept by use for 12 hours from the authentication.
    let t = step_up(&f, t, 2).await;
    for _ in 0..35 {
        f.clock.advance_secs(1200);
        assert!(f.svc.verify(&need(&t, 2)).await.is_ok());
    }
    f.clock.advance_secs(1200);
    assert!(reauth(f.svc.verify(&need(&t, 2)).await));
    assert!(f.svc.verify(&verify_req(&t)).await.is_ok(), "still alive");
    // AAL 3: 15 minutes without use drop it to AAL 2 (30 minutes), then to 1.
    let t = step_up(&f, t, 3).await;
    f.clock.advance_secs(899);
    assert!(f.svc.verify(&need(&t, 3)).await.is_ok());
    f.clock.advance_secs(900);
    assert!(reauth(f.svc.verify(&need(&t, 3)).await));
    assert!(f.svc.verify(&need(&t, 2)).await.is_ok());
    f.clock.advance_secs(1800);
    assert!(reauth(f.svc.verify(&need(&t, 2)).await));
    assert!(reauth(f.svc.verify(&need(&t, 2)).await));
    // The limits are the tenant's to tighten.
    let mut doc = PolicyDocument::default();
    doc.aal_timeouts.aal2.idle_timeout_s = 60;
    doc.aal_timeouts.aal3.idle_timeout_s = 30;
    f.svc
        .put_policy("default", doc, &Audit::default())
        .await
        .unwrap();
    let t = step_up(&f, t, 2).await;
    f.clock.advance_secs(61);
    assert!(reauth(f.svc.verify(&need(&t, 2)).await));
}

// ---- Token mode: access tokens, refresh rotation, theft detection, key rotation ----

mod tokens {
    use super::*;
    use sessiond_core::api::TokensPolicy;
    use sessiond_core::jwt::{Keyring, Rotation, SigningAlg};
    use sessiond_core::keys::Keys;
    use sessiond_core::store::SessionStore;

    struct TokenFixture {
        f: Fixture,
        store: Arc<dyn SessionStore>,
        keys: Arc<Keys>,
    }

    fn tokens_policy(f: impl FnOnce(&mut TokensPolicy)) -> PolicyDocument {
        let mut t = TokensPolicy::new("https://auth.example", "api");
        f(&mut t);
        PolicyDocument {
            tokens: Some(t),
            ..PolicyDocument::default()
        }
    }

    async fn fixture(alg: SigningAlg) -> TokenFixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> =
            Arc::new(EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap());
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
        let events = Arc::new(MemorySink::default());
        let keys = Arc::new(
            Keys::load_or_init(store.clone(), None, alg, clock.now())
                .await
                .unwrap(),
        );
        let svc = SessionService::new(
            store.clone(),
            clock.clone(),
            events.clone(),
            ServiceConfig::default(),
        )
        .with_keys(keys.clone());
        svc.put_policy("default", tokens_policy(|_| ()), &Audit::default())
            .await
            .unwrap();
        TokenFixture {
            f: Fixture {
                svc,
                clock,
                events,
                _dir: dir,
            },
            store,
            keys,
        }
    }

    fn access_req(jwt: &str) -> VerifyRequest {
        VerifyRequest {
            token: None,
            access_token: Some(jwt.into()),
            client: None,
            require: None,
        }
    }

    struct Pair {
        access: String,
        refresh: String,
        handle: String,
    }

    async fn login(t: &TokenFixture, user: &str) -> Pair {
        let mut claims = serde_json::Map::new();
        claims.insert("role".into(), "editor".into());
        let issued =
            t.f.svc
                .create(
                    &CreateSessionRequest {
                        user_id: user.into(),
                        access_token_claims: Some(claims),
                        ..Default::default()
                    },
                    &Audit::default(),
                )
                .await
                .unwrap();
        Pair {
            access: issued.access_token.unwrap().0,
            refresh: issued.refresh_token.unwrap().expose().to_owned(),
            handle: issued.session.handle,
        }
    }

    fn claims_of(jwt: &str) -> serde_json::Value {
        use base64::Engine;
        let payload = jwt.split('.').nth(1).unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    }

    #[tokio::test]
    async fn access_tokens_carry_the_session_and_verify_at_the_server() {
        for alg in [SigningAlg::EdDSA, SigningAlg::ES256] {
            let t = fixture(alg).await;
            let p = login(&t, "alice").await;
            let c = claims_of(&p.access);
            assert_eq!(c["sub"], "alice");
            assert_eq!(c["sid"], p.handle.as_str());
            assert_eq!(c["iss"], "https://auth.example");
            assert_eq!(c["aud"], "api");
            assert_eq!(c["tenant"], "default");
            assert_eq!(c["aal"], 1);
            assert_eq!(c["role"], "editor");
            assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
            let s = t.f.svc.verify(&access_req(&p.access)).await.unwrap();
            assert_eq!(s.handle, p.handle);
            // Expired at the access token's lifetime, whatever the session does.
            t.f.clock.advance_secs(300);
            assert!(matches!(
                t.f.svc.verify(&access_req(&p.access)).await,
                Err(CoreError::TokenExpired)
            ));
        }
    }

    #[tokio::test]
    async fn issuer_audience_and_revocation_are_checked_at_the_server() {
        let t = fixture(SigningAlg::EdDSA).await;
        let p = login(&t, "bob").await;
        t.f.svc
            .put_policy(
                "default",
                tokens_policy(|x| x.issuer = "https://other".into()),
                &Audit::default(),
            )
            .await
            .unwrap();
        assert!(matches!(
            t.f.svc.verify(&access_req(&p.access)).await,
            Err(CoreError::TokenInvalid(m)) if m.contains("issuer")
        ));
        t.f.svc
            .put_policy(
                "default",
                tokens_policy(|x| x.audience = "web".into()),
                &Audit::default(),
            )
            .await
            .unwrap();
        assert!(matches!(
            t.f.svc.verify(&access_req(&p.access)).await,
            Err(CoreError::TokenInvalid(m)) if m.contains("audience")
        ));
        t.f.svc
            .put_policy("default", tokens_policy(|_| ()), &Audit::default())
            .await
            .unwrap();
        t.f.svc
            .revoke(&p.handle, None, &Audit::default())
            .await
            .unwrap();
        assert!(matches!(
            t.f.svc.verify(&access_req(&p.access)).await,
            Err(CoreError::SessionRevoked)
        ));
        // Exactly one kind of token per verify.
        let both = VerifyRequest {
            token: Some("x".into()),
            access_token: Some(p.access.clone()),
            client: None,
            require: None,
        };
        assert!(matches!(
            t.f.svc.verify(&both).await,
            Err(CoreError::InvalidRequest(_))
        ));
    }

    #[tokio::test]
    async fn access_tokens_never_outlive_the_session() {
        let t = fixture(SigningAlg::EdDSA).await;
        t.f.svc
            .put_policy(
                "default",
                PolicyDocument {
                    idle_timeout_s: 60,
                    absolute_timeout_s: 120,
                    ..tokens_policy(|x| x.access_token_ttl_s = 3600)
                },
                &Audit::default(),
            )
            .await
            .unwrap();
        let p = login(&t, "cap").await;
        let c = claims_of(&p.access);
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 120);
    }

    #[tokio::test]
    async fn rotate_and_reauthenticate_retire_the_old_pair() {
        for step_up in [false, true] {
            let t = fixture(SigningAlg::EdDSA).await;
            let mut claims = serde_json::Map::new();
            claims.insert("role".into(), "editor".into());
            let created =
                t.f.svc
                    .create(
                        &CreateSessionRequest {
                            user_id: "dave".into(),
                            access_token_claims: Some(claims),
                            ..Default::default()
                        },
                        &Audit::default(),
                    )
                    .await
                    .unwrap();
            let old_access = created.access_token.unwrap().0;
            let old_refresh = created.refresh_token.unwrap().expose().to_owned();
            // An access token from a refresh, too, in the same millisecond as the rotation.
            let refreshed =
                t.f.svc
                    .refresh(&old_refresh, &Audit::default())
                    .await
                    .unwrap();
            let token = created.token.expose().to_owned();
            let issued = if step_up {
                let auth = AuthInput {
                    method: Some("webauthn".into()),
                    aal: Some(2),
                    authenticated_at: None,
                };
                t.f.svc
                    .reauthenticate(&token, &auth, None, &Audit::default())
                    .await
                    .unwrap()
            } else {
                t.f.svc.rotate(&token, &Audit::default()).await.unwrap()
            };
            let (new_access, _) = issued.access_token.expect("a new access token");
            let new_refresh = issued
                .refresh_token
                .expect("a new refresh token")
                .expose()
                .to_owned();
            assert_ne!(new_access, old_access);
            for old in [&old_access, &refreshed.access_token] {
                assert!(
                    matches!(
                        t.f.svc.verify(&access_req(old)).await,
                        Err(CoreError::TokenInvalid(m)) if m.contains("rotated")
                    ),
                    "step_up={step_up}"
                );
            }
            // Old refresh tokens, the current one of before and the spent one (within the
            // grace period), are refused, and the session lives on.
            for old in [refreshed.refresh_token.expose(), old_refresh.as_str()] {
                assert!(matches!(
                    t.f.svc.refresh(old, &Audit::default()).await,
                    Err(CoreError::SessionUnknown)
                ));
            }
            let s = t.f.svc.verify(&access_req(&new_access)).await.unwrap();
            assert_eq!(s.auth.aal, if step_up { 2 } else { 1 });
            assert_eq!(claims_of(&new_access)["role"], "editor");
            assert_eq!(claims_of(&new_access)["aal"], if step_up { 2 } else { 1 });
            let next =
                t.f.svc
                    .refresh(&new_refresh, &Audit::default())
                    .await
                    .unwrap();
            assert!(
                t.f.svc
                    .verify(&access_req(&next.access_token))
                    .await
                    .is_ok()
            );
        }
    }

    #[tokio::test]
    async fn refresh_rotates_and_slides_and_the_grace_period_returns_the_same_pair() {
        let t = fixture(SigningAlg::EdDSA).await;
        let p = login(&t, "carol").await;
        t.f.clock.advance_secs(1000);
        let r1 =
            t.f.svc
                .refresh(&p.refresh, &Audit::default())
                .await
                .unwrap();
        assert_ne!(r1.refresh_token.expose(), p.refresh);
        assert_ne!(r1.access_token, p.access);
        // The idle expiry slid to the refresh.
        assert_eq!(
            r1.session.idle_expires_at,
            t.f.clock.now().plus_secs(1800).to_datetime()
        );
        // A second tab presenting the same token within the grace period gets the same pair.
        t.f.clock.advance_secs(5);
        let r2 =
            t.f.svc
                .refresh(&p.refresh, &Audit::default())
                .await
                .unwrap();
        assert_eq!(r2.refresh_token.expose(), r1.refresh_token.expose());
        assert_eq!(r2.access_token, r1.access_token);
        // The new refresh token works and is itself spent by use.
        let r3 =
            t.f.svc
                .refresh(r1.refresh_token.expose(), &Audit::default())
                .await
                .unwrap();
        assert!(t.f.svc.verify(&access_req(&r3.access_token)).await.is_ok());
        assert!(
            t.f.events
                .events()
                .iter()
                .filter(|e| e.kind == EventKind::SessionRefreshed)
                .count()
                == 2,
            "a re-issued pair is not a second refresh"
        );
        // A refresh token that never existed for this session changes nothing.
        // Another last character that still decodes (the last of 43 base64 characters holds 4
        // bits; its low 2 must be 0): the same handle with a secret that was never issued.
        let mut forged = r3.refresh_token.expose().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'E' } else { 'A' });
        assert!(matches!(
            t.f.svc.refresh(&forged, &Audit::default()).await,
            Err(CoreError::SessionUnknown)
        ));
        assert!(
            t.f.svc
                .refresh(r3.refresh_token.expose(), &Audit::default())
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn reuse_after_the_grace_period_revokes_the_session_for_both_parties() {
        let t = fixture(SigningAlg::EdDSA).await;
        let p = login(&t, "dave").await;
        // The legitimate client refreshes; the thief holds the old refresh token.
        let legit =
            t.f.svc
                .refresh(&p.refresh, &Audit::default())
                .await
                .unwrap();
        t.f.clock.advance_secs(11);
        assert!(matches!(
            t.f.svc.refresh(&p.refresh, &Audit::default()).await,
            Err(CoreError::TokenReused)
        ));
        let s = t.f.svc.get(&p.handle).await.unwrap();
        assert_eq!(s.status, SessionStatus::Revoked);
        assert_eq!(s.revoked_reason.as_deref(), Some("theft_detected"));
        assert!(t.f.events.events().iter().any(|e| {
            e.kind == EventKind::SessionRevoked && e.reason.as_deref() == Some("theft_detected")
        }));
        // Neither party can go on.
        assert!(matches!(
            t.f.svc
                .refresh(legit.refresh_token.expose(), &Audit::default())
                .await,
            Err(CoreError::SessionRevoked)
        ));
        assert!(matches!(
            t.f.svc.verify(&access_req(&legit.access_token)).await,
            Err(CoreError::SessionRevoked)
        ));
    }

    #[tokio::test]
    async fn refresh_of_ended_sessions_answers_the_session_code() {
        let t = fixture(SigningAlg::EdDSA).await;
        let p = login(&t, "erin").await;
        t.f.clock.advance_secs(1800);
        assert!(matches!(
            t.f.svc.refresh(&p.refresh, &Audit::default()).await,
            Err(CoreError::SessionExpired)
        ));
        let p = login(&t, "erin").await;
        t.f.svc
            .revoke(&p.handle, None, &Audit::default())
            .await
            .unwrap();
        assert!(matches!(
            t.f.svc.refresh(&p.refresh, &Audit::default()).await,
            Err(CoreError::SessionRevoked)
        ));
        assert!(matches!(
            t.f.svc.refresh("sdr_garbage", &Audit::default()).await,
            Err(CoreError::SessionUnknown)
        ));
    }

    #[tokio::test]
    async fn claims_are_checked_and_need_token_mode() {
        let t = fixture(SigningAlg::EdDSA).await;
        let mut bad = serde_json::Map::new();
        bad.insert("sub".into(), "root".into());
        let req = CreateSessionRequest {
            user_id: "u".into(),
            access_token_claims: Some(bad),
            ..Default::default()
        };
        assert!(matches!(
            t.f.svc.create(&req, &Audit::default()).await,
            Err(CoreError::InvalidRequest(m)) if m.contains("sub")
        ));
        let plain = super::fixture();
        let mut ok = serde_json::Map::new();
        ok.insert("role".into(), "x".into());
        let req = CreateSessionRequest {
            user_id: "u".into(),
            access_token_claims: Some(ok),
            ..Default::default()
        };
        assert!(matches!(
            plain.svc.create(&req, &Audit::default()).await,
            Err(CoreError::InvalidRequest(_))
        ));
        // Without token mode, create hands out no access or refresh token.
        let i = plain
            .svc
            .create(&create_req("u"), &Audit::default())
            .await
            .unwrap();
        assert!(i.access_token.is_none() && i.refresh_token.is_none());
    }

    #[tokio::test]
    async fn tokens_signed_before_a_key_rotation_verify_until_they_expire() {
        let t = fixture(SigningAlg::EdDSA).await;
        let before = login(&t, "frank").await;
        let old_kid = Keyring::kid_of(&before.access).unwrap();
        let rotation = Rotation {
            alg: SigningAlg::ES256,
            activate_after_s: 0,
            retire_after_s: 300,
        };
        let new_kid = Keys::rotate(&*t.store, None, rotation, t.f.clock.now())
            .await
            .unwrap();
        // This node has not reloaded yet; a token of the new key makes it reload.
        let after = login(&t, "frank").await;
        assert_eq!(Keyring::kid_of(&after.access).unwrap(), old_kid);
        t.keys.reload(t.f.clock.now()).await.unwrap();
        let after = login(&t, "frank").await;
        assert_eq!(Keyring::kid_of(&after.access).unwrap(), new_kid);
        let kids: Vec<String> =
            t.f.svc
                .jwks()
                .await
                .unwrap()
                .keys
                .into_iter()
                .map(|k| k.kid)
                .collect();
        assert!(kids.contains(&old_kid) && kids.contains(&new_kid));
        assert!(t.f.svc.verify(&access_req(&before.access)).await.is_ok());
        assert!(t.f.svc.verify(&access_req(&after.access)).await.is_ok());
        // After the old key retires, its tokens (long expired by then) are refused and it
        // leaves the JWKS.
        t.f.clock.advance_secs(300);
        let kids: Vec<String> =
            t.f.svc
                .jwks()
                .await
                .unwrap()
                .keys
                .into_iter()
                .map(|k| k.kid)
                .collect();
        assert_eq!(kids, vec![new_kid]);
        assert!(t.f.svc.verify(&access_req(&before.access)).await.is_err());
    }

    #[tokio::test]
    async fn a_node_reloads_when_it_meets_a_key_it_does_not_know() {
        let t = fixture(SigningAlg::EdDSA).await;
        // A second node on the same store, which rotates and signs with the new key.
        let other_keys = Arc::new(
            Keys::load_or_init(t.store.clone(), None, SigningAlg::EdDSA, t.f.clock.now())
                .await
                .unwrap(),
        );
        assert_eq!(
            other_keys.current().unwrap().signing_kid(t.f.clock.now()),
            t.keys.current().unwrap().signing_kid(t.f.clock.now()),
            "both nodes share one keyring"
        );
        let rotation = Rotation {
            alg: SigningAlg::EdDSA,
            activate_after_s: 0,
            retire_after_s: 300,
        };
        Keys::rotate(&*t.store, None, rotation, t.f.clock.now())
            .await
            .unwrap();
        t.f.clock.advance_secs(2);
        other_keys.reload(t.f.clock.now()).await.unwrap();
        let other = SessionService::new(
            t.store.clone(),
            t.f.clock.clone(),
            t.f.events.clone(),
            ServiceConfig::default(),
        )
        .with_keys(other_keys);
        let issued = other
            .create(&create_req("gina"), &Audit::default())
            .await
            .unwrap();
        let jwt = issued.access_token.unwrap().0;
        assert!(
            !t.keys
                .current()
                .unwrap()
                .knows(&Keyring::kid_of(&jwt).unwrap())
        );
        assert!(t.f.svc.verify(&access_req(&jwt)).await.is_ok());
    }

    #[tokio::test]
    async fn access_tokens_are_typed_and_carry_the_aal_the_session_counts_as() {
        let t = fixture(SigningAlg::EdDSA).await;
        let issued =
            t.f.svc
                .create(
                    &CreateSessionRequest {
                        user_id: "u".into(),
                        remember_me: true,
                        auth: authed(Some("webauthn"), 2),
                        ..Default::default()
                    },
                    &Audit::default(),
                )
                .await
                .unwrap();
        let access = issued.access_token.unwrap().0;
        let header = {
            use base64::Engine;
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(access.split('.').next().unwrap())
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&raw).unwrap()
        };
        assert_eq!(header["typ"], "at+jwt");
        assert_eq!(claims_of(&access)["aal"], 2);
        let refresh = issued.refresh_token.unwrap().expose().to_owned();
        // Refreshed within AAL 2's idle limit: still AAL 2.
        t.f.clock.advance_secs(1000);
        let r = t.f.svc.refresh(&refresh, &Audit::default()).await.unwrap();
        assert_eq!(claims_of(&r.access_token)["aal"], 2);
        // Refreshed after 30 minutes without use: the session lives on, at AAL 1.
        t.f.clock.advance_secs(1800);
        let audit = Audit::default();
        let r2 =
            t.f.svc
                .refresh(r.refresh_token.expose(), &audit)
                .await
                .unwrap();
        assert_eq!(claims_of(&r2.access_token)["aal"], 1);
        assert_eq!(r2.session.auth.aal, 1, "lowered for good");
        let need = VerifyRequest {
            require: Some(Requirements {
                max_auth_age_s: None,
                min_aal: Some(2),
            }),
            ..access_req(&r2.access_token)
        };
        assert!(matches!(
            t.f.svc.verify(&need).await,
            Err(CoreError::ReauthenticationRequired(_))
        ));
    }

    #[tokio::test]
    async fn tokens_minted_with_a_stolen_key_for_too_long_or_from_the_future_are_refused() {
        let t = fixture(SigningAlg::EdDSA).await;
        let p = login(&t, "alice").await;
        let now = t.f.clock.now();
        let ring = t.keys.ensure(now).await.unwrap();
        let mut c: sessiond_core::api::AccessClaims =
            serde_json::from_value(claims_of(&p.access)).unwrap();
        c.aal = 3;
        let iat = c.iat;
        // Ten years, as minted with the private key of the keyring.
        c.exp = iat + 10 * 365 * 86_400;
        let long = ring.sign(&c, now).unwrap();
        match t.f.svc.verify(&access_req(&long)).await {
            Err(CoreError::TokenInvalid(m)) => assert!(m.contains("lifetime"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Issued (and valid from) an hour from now.
        c.iat = iat + 3600;
        c.exp = c.iat + 300;
        let future = ring.sign(&c, now).unwrap();
        match t.f.svc.verify(&access_req(&future)).await {
            Err(CoreError::TokenInvalid(m)) => assert!(m.contains("future"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The longest lifetime a policy may set still verifies.
        c.iat = iat;
        c.exp = iat + 3600;
        let fine = ring.sign(&c, now).unwrap();
        assert!(t.f.svc.verify(&access_req(&fine)).await.is_ok());
    }
}

/// The guard counts unknown tokens per source (network and API key, or the key alone) and
/// refuses only unknown tokens while a source is blocked: a live session's token is answered.
#[tokio::test]
async fn a_blocked_source_still_verifies_valid_tokens() {
    use sessiond_core::guard::{Guard, GuardConfig};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).unwrap());
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_700_000_000_000)));
    let events = Arc::new(MemorySink::default());
    let guard = Guard::new(
        GuardConfig {
            verify_failures: 3,
            ..GuardConfig::default()
        },
        clock.now(),
    );
    let svc = SessionService::new(
        store,
        clock.clone(),
        events.clone(),
        ServiceConfig::default(),
    )
    .with_guard(Arc::new(guard));
    let token = svc
        .create(&create_req("nat-user"), &Audit::new("api_key:app"))
        .await
        .unwrap()
        .token
        .expose()
        .to_owned();
    let app = Audit::new("api_key:app");
    let guess = verify_req("sdt_0000000000000000000000000000000000000000000");
    for _ in 0..3 {
        assert!(matches!(
            svc.verify_as(&guess, &app).await,
            Err(CoreError::SessionUnknown)
        ));
    }
    assert!(matches!(
        svc.verify_as(&guess, &app).await,
        Err(CoreError::TooManyAttempts(_))
    ));
    assert!(svc.verify_as(&verify_req(&token), &app).await.is_ok());
    // Another key is another source.
    assert!(matches!(
        svc.verify_as(&guess, &Audit::new("api_key:other")).await,
        Err(CoreError::SessionUnknown)
    ));
    let kinds: Vec<EventKind> = events.events().iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::SecurityBruteForce), "{kinds:?}");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == EventKind::SecurityInvalidToken)
            .count(),
        5
    );
}
