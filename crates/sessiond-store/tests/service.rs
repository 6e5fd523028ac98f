//! The lifecycle rules through `SessionService` on the embedded store, with a manual clock:
//! time moves by hours in a microsecond.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use sessiond_core::CoreError;
use sessiond_core::api::{
    AuthInput, CreateSessionRequest, PolicyDocument, Requirements, SessionStatus, VerifyRequest,
};
use sessiond_core::events::{EventKind, MemorySink};
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
        token: token.into(),
        client: None,
        require: None,
    }
}

async fn login(f: &Fixture, user: &str) -> String {
    f.svc
        .create(&create_req(user))
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
    let issued = f.svc.create(&req).await.unwrap();
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
    let issued = f.svc.create(&create_req("u")).await.unwrap();
    let old = issued.token.expose().to_owned();
    let rotated = f.svc.rotate(&old).await.unwrap();
    assert_eq!(rotated.session.handle, issued.session.handle);
    assert!(matches!(
        f.svc.verify(&verify_req(&old)).await,
        Err(CoreError::SessionUnknown)
    ));
    assert!(matches!(
        f.svc.rotate(&old).await,
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
        token: token.into(),
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
    let stepped = f.svc.reauthenticate(&t, &auth).await.unwrap();
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
    let a = f.svc.create(&create_req("u")).await.unwrap();
    let b = login(&f, "u").await;
    let c = login(&f, "u").await;
    let (s, clear) = f.svc.logout(a.token.expose()).await.unwrap();
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
            .force_logout("u", None, Some(&c_handle))
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        f.svc.verify(&verify_req(&b)).await,
        Err(CoreError::SessionRevoked)
    ));
    assert!(f.svc.verify(&verify_req(&c)).await.is_ok());
    let revoked = f.svc.revoke(&c_handle, Some("admin")).await.unwrap();
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
            (EventKind::SessionRevoked, Some("force_logout".into())),
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
    f.svc.put_policy("default", doc).await.unwrap();
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
    f.svc.put_policy("default", doc).await.unwrap();
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
        f.svc.create(&future).await,
        Err(CoreError::InvalidRequest(_))
    ));
    let past = CreateSessionRequest {
        auth: Some(AuthInput {
            authenticated_at: Some(now - chrono::Duration::hours(1)),
            ..Default::default()
        }),
        ..create_req("u")
    };
    let s = f.svc.create(&past).await.unwrap().session;
    assert_eq!(s.auth.authenticated_at, now - chrono::Duration::hours(1));
}
