//! The store contract as executable tests, run against every backend.
//!
//! A backend's test file implements [`StoreFactory`] and instantiates every case with
//! [`conformance_suite!`](crate::conformance_suite). Each case gets a factory of its own, so
//! cases never share data.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use sessiond_core::api::{self, DeliveryState, OnLimit, PolicyDocument};
use sessiond_core::events::{Audit, EventKind};
use sessiond_core::policy::Policy;
use sessiond_core::session::{
    self, AuthRecord, DeviceRecord, Liveness, SessionRecord, StoredState,
};
use sessiond_core::store::{
    DataUpdate, DeliveryQuery, EventQuery, Expect, InsertOutcome, ListQuery, Rekey, RotateOutcome,
    SessionStore,
};
use sessiond_core::time::Timestamp;
use sessiond_core::token::{SessionHandle, TenantId, TokenFormat, TokenHash, UserId};

/// Opens stores on one namespace (a directory, a database schema, a key prefix).
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// Opens the namespace: empty the first time, with everything acknowledged so far after.
    /// A previous store from this factory may still be open (as after a crash of its process).
    async fn open(&self) -> Arc<dyn SessionStore>;
}

/// Start of time in the cases.
pub const T0: i64 = 1_700_000_000_000;

pub fn t(secs: i64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

pub fn record(user: &str, tenant: &str, at: Timestamp) -> (SessionRecord, TokenHash) {
    let (_, hash) = TokenFormat::default().generate().unwrap();
    let rec = SessionRecord {
        handle: SessionHandle::generate().unwrap(),
        token_hash: hash,
        user_id: UserId::parse(user).unwrap(),
        tenant: TenantId::parse(tenant).unwrap(),
        created_at: at,
        last_seen_at: at,
        remember_me: false,
        auth: AuthRecord {
            method: "password".into(),
            aal: 1,
            authenticated_at: at,
        },
        device: DeviceRecord {
            ip: Some("203.0.113.7".parse().unwrap()),
            user_agent: Some("Mozilla/5.0 Firefox/128.0".into()),
            browser: Some("Firefox".into()),
            os: Some("Linux".into()),
        },
        data: r#"{"cart":1}"#.into(),
        state: StoredState::Active,
        refresh: None,
        flags: Vec::new(),
        expires_at: None,
        idle_timeout_s: None,
        rotations: 0,
    };
    (rec, hash)
}

/// The context of the cases' operations.
pub fn audit() -> Audit {
    let mut a = Audit::new("api_key:test");
    a.request_id = Some("req-1".into());
    a
}

/// A token change expecting `old`.
fn rekey(old: TokenHash, new: TokenHash, auth: Option<AuthRecord>) -> Rekey {
    Rekey {
        expect: Expect::Token(old),
        token_hash: Some(new),
        refresh: None,
        auth,
        event: EventKind::SessionRotated,
        reason: None,
        flag: None,
        device: None,
        details: Map::new(),
    }
}

/// A refresh-state change expecting `old`.
fn swap(old: &str, new: &str) -> Rekey {
    Rekey {
        expect: Expect::Refresh(old.into()),
        token_hash: None,
        refresh: Some(new.into()),
        auth: None,
        event: EventKind::SessionRefreshed,
        reason: None,
        flag: None,
        device: None,
        details: Map::new(),
    }
}

async fn insert(s: &dyn SessionStore, rec: &SessionRecord, now: Timestamp) -> Vec<SessionHandle> {
    match s.insert(rec.clone(), now, &audit()).await.unwrap() {
        InsertOutcome::Inserted { evicted } => evicted,
        InsertOutcome::LimitReached => panic!("unexpected limit"),
    }
}

fn policy(f: impl FnOnce(&mut PolicyDocument)) -> Policy {
    let mut d = PolicyDocument::default();
    f(&mut d);
    Policy::new(d).unwrap()
}

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

pub async fn insert_and_find(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, hash) = record("alice", "default", t(0));
    assert!(insert(&*s, &rec, t(0)).await.is_empty());
    let by_token = s
        .find_by_token(&hash)
        .await
        .unwrap()
        .expect("found by token");
    assert_eq!(*by_token.record, rec);
    let by_handle = s
        .find_by_handle(&rec.handle)
        .await
        .unwrap()
        .expect("found by handle");
    assert_eq!(*by_handle.record, rec);
    let (other, _) = record("alice", "default", t(0));
    assert!(s.find_by_token(&other.token_hash).await.unwrap().is_none());
    assert!(s.find_by_handle(&other.handle).await.unwrap().is_none());
}

pub async fn acknowledged_writes_survive_reopen(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (a, ha) = record("bob", "default", t(0));
    let (b, hb) = record("bob", "default", t(0));
    insert(&*s, &a, t(0)).await;
    insert(&*s, &b, t(0)).await;
    s.revoke(&b.handle, "logout", t(1), &audit())
        .await
        .unwrap()
        .unwrap();
    s.put_policy(
        &tenant("acme"),
        policy(|d| d.idle_timeout_s = 77),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let s2 = f.open().await;
    assert_eq!(*s2.find_by_token(&ha).await.unwrap().unwrap().record, a);
    let rb = s2.find_by_token(&hb).await.unwrap().unwrap();
    assert!(
        matches!(&rb.record.state, StoredState::Revoked { reason, .. } if &**reason == "logout")
    );
    assert_eq!(
        s2.policy(&tenant("acme"))
            .await
            .unwrap()
            .document()
            .idle_timeout_s,
        77
    );
}

pub async fn rotate_replaces_the_token(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, old) = record("carol", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    let (_, new) = TokenFormat::default().generate().unwrap();
    let auth = AuthRecord {
        method: "webauthn".into(),
        aal: 2,
        authenticated_at: t(5),
    };
    let out = s
        .rotate(
            &rec.handle,
            &rekey(old, new, Some(auth.clone())),
            t(5),
            &audit(),
        )
        .await
        .unwrap();
    let RotateOutcome::Rotated(r) = out else {
        panic!("not rotated")
    };
    assert_eq!(r.record.auth, auth);
    assert!(
        s.find_by_token(&old).await.unwrap().is_none(),
        "old token is dead at once"
    );
    let found = s.find_by_token(&new).await.unwrap().unwrap();
    assert_eq!(found.record.handle, rec.handle);
    assert_eq!(found.last_seen_at, t(5));
    // A second rotation presenting the old token loses.
    let (_, newer) = TokenFormat::default().generate().unwrap();
    assert!(matches!(
        s.rotate(&rec.handle, &rekey(old, newer, None), t(6), &audit())
            .await
            .unwrap(),
        RotateOutcome::Stale
    ));
    // Survives reopen.
    let s2 = f.open().await;
    assert!(s2.find_by_token(&old).await.unwrap().is_none());
    assert_eq!(
        s2.find_by_token(&new)
            .await
            .unwrap()
            .unwrap()
            .record
            .auth
            .aal,
        2
    );
}

pub async fn rotate_refuses_ended_sessions(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, old) = record("dave", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    s.revoke(&rec.handle, "revoked", t(1), &audit())
        .await
        .unwrap();
    let (_, new) = TokenFormat::default().generate().unwrap();
    assert!(matches!(
        s.rotate(&rec.handle, &rekey(old, new, None), t(2), &audit())
            .await
            .unwrap(),
        RotateOutcome::Stale
    ));
    // Expired by idle timeout (default policy: 1800 s).
    let (rec, old) = record("dave", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    assert!(matches!(
        s.rotate(&rec.handle, &rekey(old, new, None), t(1800), &audit())
            .await
            .unwrap(),
        RotateOutcome::Stale
    ));
}

pub async fn refresh_state_swaps_atomically(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (mut rec, hash) = record("erin", "default", t(0));
    rec.refresh = Some(r#"{"g":0}"#.into());
    insert(&*s, &rec, t(0)).await;
    let RotateOutcome::Rotated(r) = s
        .rotate(
            &rec.handle,
            &swap(r#"{"g":0}"#, r#"{"g":1}"#),
            t(3),
            &audit(),
        )
        .await
        .unwrap()
    else {
        panic!("not swapped")
    };
    assert_eq!(r.record.refresh.as_deref(), Some(r#"{"g":1}"#));
    assert_eq!(r.record.token_hash, hash, "the session token is unchanged");
    let found = s.find_by_token(&hash).await.unwrap().unwrap();
    assert_eq!(found.record.refresh.as_deref(), Some(r#"{"g":1}"#));
    assert_eq!(found.last_seen_at, t(3), "a refresh is a use");
    // The old state no longer matches.
    assert!(matches!(
        s.rotate(
            &rec.handle,
            &swap(r#"{"g":0}"#, r#"{"g":9}"#),
            t(4),
            &audit()
        )
        .await
        .unwrap(),
        RotateOutcome::Stale
    ));
    // Racing swaps from the same state: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        let h = rec.handle.clone();
        tasks.push(tokio::spawn(async move {
            let new = format!(r#"{{"g":2,"n":{i}}}"#);
            matches!(
                s.rotate(&h, &swap(r#"{"g":1}"#, &new), t(5), &audit())
                    .await
                    .unwrap(),
                RotateOutcome::Rotated(_)
            )
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
    // Durable, and ended sessions refuse.
    let s2 = f.open().await;
    let now = s2.find_by_handle(&rec.handle).await.unwrap().unwrap();
    let text = now.record.refresh.clone().unwrap();
    assert!(text.starts_with(r#"{"g":2"#));
    s2.revoke(&rec.handle, "revoked", t(6), &audit())
        .await
        .unwrap();
    assert!(matches!(
        s2.rotate(&rec.handle, &swap(&text, r#"{"g":3}"#), t(7), &audit())
            .await
            .unwrap(),
        RotateOutcome::Stale
    ));
    assert!(s2.find_by_token(&hash).await.unwrap().is_some());
}

pub async fn documents_are_compare_and_set(f: &dyn StoreFactory) {
    let s = f.open().await;
    assert_eq!(s.document("keyring").await.unwrap(), None);
    assert!(!s.put_document("keyring", Some(1), "nope").await.unwrap());
    assert!(s.put_document("keyring", None, "one").await.unwrap());
    assert!(
        !s.put_document("keyring", None, "other").await.unwrap(),
        "a second first writer loses"
    );
    assert_eq!(
        s.document("keyring").await.unwrap(),
        Some((1, "one".to_owned()))
    );
    assert!(s.put_document("keyring", Some(1), "two").await.unwrap());
    assert!(!s.put_document("keyring", Some(1), "stale").await.unwrap());
    // Names are independent.
    assert_eq!(s.document("webhooks").await.unwrap(), None);
    assert!(s.put_document("webhooks", None, "w").await.unwrap());
    let s2 = f.open().await;
    assert_eq!(
        s2.document("keyring").await.unwrap(),
        Some((2, "two".to_owned()))
    );
    assert_eq!(
        s2.document("webhooks").await.unwrap(),
        Some((1, "w".to_owned()))
    );
}

pub async fn revoke_is_idempotent(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, _) = record("erin", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    let first = s
        .revoke(&rec.handle, "revoked", t(1), &audit())
        .await
        .unwrap()
        .unwrap();
    assert!(first.revoked_now);
    let second = s
        .revoke(&rec.handle, "logout", t(2), &audit())
        .await
        .unwrap()
        .unwrap();
    assert!(!second.revoked_now);
    assert!(
        matches!(&second.session.record.state, StoredState::Revoked { reason, at } if &**reason == "revoked" && *at == t(1)),
        "the first revocation's reason and time stay"
    );
    let (unknown, _) = record("erin", "default", t(0));
    assert!(
        s.revoke(&unknown.handle, "revoked", t(1), &audit())
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn revoke_user_spares_the_exception_and_other_users(f: &dyn StoreFactory) {
    let s = f.open().await;
    let mine: Vec<_> = (0..4).map(|_| record("frank", "default", t(0)).0).collect();
    let other_tenant = record("frank", "acme", t(0)).0;
    let someone_else = record("grace", "default", t(0)).0;
    for r in mine.iter().chain([&other_tenant, &someone_else]) {
        insert(&*s, r, t(0)).await;
    }
    s.revoke(&mine[3].handle, "logout", t(1), &audit())
        .await
        .unwrap();
    let revoked = s
        .revoke_user(
            &mine[0].user_id,
            Some(&tenant("default")),
            Some(&mine[0].handle),
            "force_logout",
            t(2),
            &audit(),
        )
        .await
        .unwrap();
    let mut want = vec![mine[1].handle.clone(), mine[2].handle.clone()];
    let mut got = revoked.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "only the active ones, not the exception");
    assert!(matches!(
        s.find_by_handle(&mine[0].handle)
            .await
            .unwrap()
            .unwrap()
            .record
            .state,
        StoredState::Active
    ));
    assert!(matches!(
        &s.find_by_handle(&mine[1].handle).await.unwrap().unwrap().record.state,
        StoredState::Revoked { reason, .. } if &**reason == "force_logout"
    ));
    assert!(matches!(
        s.find_by_handle(&other_tenant.handle)
            .await
            .unwrap()
            .unwrap()
            .record
            .state,
        StoredState::Active
    ));
    assert!(matches!(
        s.find_by_handle(&someone_else.handle)
            .await
            .unwrap()
            .unwrap()
            .record
            .state,
        StoredState::Active
    ));
    // Without a tenant: every tenant.
    let all = s
        .revoke_user(&mine[0].user_id, None, None, "force_logout", t(3), &audit())
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
}

pub async fn limit_evicts_least_recently_used(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("lim"),
        policy(|d| d.max_sessions_per_user = Some(2)),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let (a, _) = record("heidi", "lim", t(0));
    let (b, _) = record("heidi", "lim", t(1));
    insert(&*s, &a, t(0)).await;
    insert(&*s, &b, t(1)).await;
    // a is used after b, so b is the least recently used.
    let sa = s.find_by_handle(&a.handle).await.unwrap().unwrap();
    let p = s.policy(&tenant("lim")).await.unwrap();
    s.touch(&sa, &p, t(5)).await.unwrap();
    let (c, _) = record("heidi", "lim", t(6));
    let evicted = insert(&*s, &c, t(6)).await;
    assert_eq!(evicted, vec![b.handle.clone()]);
    assert!(matches!(
        &s.find_by_handle(&b.handle).await.unwrap().unwrap().record.state,
        StoredState::Revoked { reason, .. } if &**reason == "limit_evicted"
    ));
    // Other tenants do not count towards this tenant's limit.
    let (x, _) = record("heidi", "default", t(6));
    assert!(insert(&*s, &x, t(6)).await.is_empty());
}

pub async fn limit_deny_refuses(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("deny"),
        policy(|d| {
            d.max_sessions_per_user = Some(1);
            d.on_limit = OnLimit::Deny;
        }),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let (a, _) = record("ivan", "deny", t(0));
    insert(&*s, &a, t(0)).await;
    let (b, hb) = record("ivan", "deny", t(1));
    assert_eq!(
        s.insert(b, t(1), &audit()).await.unwrap(),
        InsertOutcome::LimitReached
    );
    assert!(
        s.find_by_token(&hb).await.unwrap().is_none(),
        "nothing stored"
    );
    // Expired sessions do not count: after the idle timeout there is room again.
    let (c, _) = record("ivan", "deny", t(1800));
    assert!(insert(&*s, &c, t(1800)).await.is_empty());
}

pub async fn limit_holds_under_concurrent_creates(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("race"),
        policy(|d| {
            d.max_sessions_per_user = Some(3);
            d.on_limit = OnLimit::Deny;
        }),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (r, _) = record("judy", "race", t(0));
            s.insert(r, t(0), &audit()).await.unwrap()
        }));
    }
    let mut ok = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), InsertOutcome::Inserted { .. }) {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "exactly the limit got in");
    let q = ListQuery {
        user_id: UserId::parse("judy").unwrap(),
        tenant: None,
        include_ended: true,
        after: None,
        limit: 100,
    };
    assert_eq!(s.list_user(&q, t(0)).await.unwrap().len(), 3);
}

pub async fn evict_oldest_holds_under_concurrent_creates(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("race2"),
        policy(|d| d.max_sessions_per_user = Some(2)),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (r, _) = record("kim", "race2", t(i));
            s.insert(r, t(i), &audit()).await.unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let q = ListQuery {
        user_id: UserId::parse("kim").unwrap(),
        tenant: Some(tenant("race2")),
        include_ended: false,
        after: None,
        limit: 100,
    };
    assert_eq!(
        s.list_user(&q, t(20)).await.unwrap().len(),
        2,
        "never over the limit"
    );
}

pub async fn update_data_records_its_event_with_the_change(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, _) = record("kim", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    let patch: Map<String, Value> =
        serde_json::from_value(json!({"role": "admin", "cart": null})).unwrap();
    assert!(matches!(
        s.update_data(&rec.handle, &patch, 1000, t(1), &audit())
            .await
            .unwrap(),
        DataUpdate::Updated(_)
    ));
    // A refused change records nothing.
    let big: Map<String, Value> = serde_json::from_value(json!({"blob": "x".repeat(100)})).unwrap();
    assert!(matches!(
        s.update_data(&rec.handle, &big, 50, t(2), &audit())
            .await
            .unwrap(),
        DataUpdate::TooLarge { .. }
    ));
    let events = s
        .events(&EventQuery {
            event_type: Some("session.data_updated".into()),
            handle: Some(rec.handle.clone()),
            limit: 10,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "one session.data_updated with the change");
    let e = &events[0];
    assert_eq!(e.user_id.as_deref(), Some("kim"));
    assert_eq!(e.actor.as_deref(), Some("api_key:test"));
    assert_eq!(e.request_id.as_deref(), Some("req-1"));
    assert_eq!(e.details["keys_set"], json!(["role"]));
    assert_eq!(e.details["keys_removed"], json!(["cart"]));
    assert!(
        !serde_json::to_string(e).unwrap().contains("admin"),
        "names, never values"
    );
    // The user's log has it too.
    let mine = s
        .events(&EventQuery {
            user_id: Some(rec.user_id.clone()),
            event_type: Some("session.data_updated".into()),
            limit: 10,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
}

pub async fn update_data_merges_and_checks(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, _) = record("ken", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    let patch: Map<String, Value> =
        serde_json::from_value(json!({"theme": "dark", "cart": null})).unwrap();
    let DataUpdate::Updated(u) = s
        .update_data(&rec.handle, &patch, 1000, t(1), &audit())
        .await
        .unwrap()
    else {
        panic!("not updated")
    };
    assert_eq!(
        serde_json::from_str::<Value>(&u.record.data).unwrap(),
        json!({"theme": "dark"})
    );
    let big: Map<String, Value> = serde_json::from_value(json!({"blob": "x".repeat(100)})).unwrap();
    assert!(matches!(
        s.update_data(&rec.handle, &big, 50, t(1), &audit())
            .await
            .unwrap(),
        DataUpdate::TooLarge { limit: 50, .. }
    ));
    let again = s.find_by_handle(&rec.handle).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&again.record.data).unwrap(),
        json!({"theme": "dark"})
    );
    s.revoke(&rec.handle, "logout", t(2), &audit())
        .await
        .unwrap();
    assert!(matches!(
        s.update_data(&rec.handle, &patch, 1000, t(3), &audit())
            .await
            .unwrap(),
        DataUpdate::NotActive
    ));
    let (unknown, _) = record("ken", "default", t(0));
    assert!(matches!(
        s.update_data(&unknown.handle, &patch, 1000, t(3), &audit())
            .await
            .unwrap(),
        DataUpdate::NotFound
    ));
    let s2 = f.open().await;
    let reopened = s2.find_by_handle(&rec.handle).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&reopened.record.data).unwrap(),
        json!({"theme": "dark"})
    );
}

pub async fn list_orders_filters_and_pages(f: &dyn StoreFactory) {
    let s = f.open().await;
    let recs: Vec<_> = (0..5)
        .map(|i| record("liz", if i == 4 { "acme" } else { "default" }, t(i)).0)
        .collect();
    for (i, r) in recs.iter().enumerate() {
        insert(&*s, r, t(i as i64)).await;
    }
    s.revoke(&recs[1].handle, "logout", t(10), &audit())
        .await
        .unwrap();
    let user = UserId::parse("liz").unwrap();
    let q = |include_ended, tenant: Option<&str>, after, limit| ListQuery {
        user_id: user.clone(),
        tenant: tenant.map(|x| TenantId::parse(x).unwrap()),
        include_ended,
        after,
        limit,
    };
    let active = s
        .list_user(&q(false, None, None, 100), t(11))
        .await
        .unwrap();
    let hs: Vec<_> = active.iter().map(|s| s.record.handle.clone()).collect();
    assert_eq!(
        hs,
        vec![
            recs[4].handle.clone(),
            recs[3].handle.clone(),
            recs[2].handle.clone(),
            recs[0].handle.clone()
        ]
    );
    let all = s
        .list_user(&q(true, Some("default"), None, 100), t(11))
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    let page1 = s.list_user(&q(true, None, None, 2), t(11)).await.unwrap();
    assert_eq!(page1.len(), 2);
    let last = page1.last().unwrap();
    let page2 = s
        .list_user(
            &q(
                true,
                None,
                Some((last.last_seen_at, last.record.handle.clone())),
                10,
            ),
            t(11),
        )
        .await
        .unwrap();
    assert_eq!(page2.len(), 3);
    assert!(
        page2
            .iter()
            .all(|p| page1.iter().all(|q| q.record.handle != p.record.handle))
    );
    let nobody = s
        .list_user(
            &ListQuery {
                user_id: UserId::parse("nobody").unwrap(),
                ..q(true, None, None, 10)
            },
            t(11),
        )
        .await
        .unwrap();
    assert!(nobody.is_empty());
}

pub async fn policies_default_and_replace(f: &dyn StoreFactory) {
    let s = f.open().await;
    assert_eq!(
        *s.policy(&tenant("fresh")).await.unwrap(),
        Policy::default()
    );
    let p = policy(|d| {
        d.idle_timeout_s = 60;
        d.absolute_timeout_s = 120;
    });
    s.put_policy(&tenant("fresh"), p.clone(), t(0), &audit())
        .await
        .unwrap();
    assert_eq!(*s.policy(&tenant("fresh")).await.unwrap(), p);
    assert_eq!(
        *s.policy(&tenant("other")).await.unwrap(),
        Policy::default()
    );
}

pub async fn find_with_policy_follows_policy_changes(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, hash) = record("olga", "pol", t(0));
    insert(&*s, &rec, t(0)).await;
    let (found, p) = s.find_by_token_with_policy(&hash).await.unwrap().unwrap();
    assert_eq!(found.record.handle, rec.handle);
    assert_eq!(*p, Policy::default(), "no stored policy: the default");
    for idle in [60, 61, 60] {
        let stored = policy(|d| {
            d.idle_timeout_s = idle;
            d.absolute_timeout_s = 120;
        });
        s.put_policy(&tenant("pol"), stored.clone(), t(0), &audit())
            .await
            .unwrap();
        let (_, p) = s.find_by_token_with_policy(&hash).await.unwrap().unwrap();
        assert_eq!(*p, stored, "every change is seen at the next lookup");
    }
    let (_, unknown) = TokenFormat::default().generate().unwrap();
    assert!(
        s.find_by_token_with_policy(&unknown)
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn touch_slides_and_is_written_back(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, hash) = record("mia", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    let found = s.find_by_token(&hash).await.unwrap().unwrap();
    let p = s.policy(&tenant("default")).await.unwrap();
    s.touch(&found, &p, t(100)).await.unwrap();
    s.touch(&found, &p, t(50)).await.unwrap();
    assert_eq!(
        s.find_by_token(&hash).await.unwrap().unwrap().last_seen_at,
        t(100),
        "never backwards"
    );
    s.flush().await.unwrap();
    let s2 = f.open().await;
    assert_eq!(
        s2.find_by_token(&hash).await.unwrap().unwrap().last_seen_at,
        t(100)
    );
}

/// A session's deadlines are stored with it: a relaxed policy does not revive a timed-out
/// session, on any node and after a restart; a session stored without them (older data) is
/// judged by the policy as before. The rotation count is stored too.
pub async fn stored_deadlines_outlast_a_relaxed_policy(f: &dyn StoreFactory) {
    let s = f.open().await;
    let short = policy(|d| {
        d.idle_timeout_s = 2;
        d.absolute_timeout_s = 3;
    });
    s.put_policy(&tenant("fin"), short.clone(), t(0), &audit())
        .await
        .unwrap();
    let pinned = |user: &str| {
        let (mut r, h) = record(user, "fin", t(0));
        session::pin(&mut r, &short);
        (r, h)
    };
    let (idle, hi) = pinned("ivy");
    let (abs, ha) = pinned("ivy");
    let (old, ho) = record("ivy", "fin", t(0));
    for r in [&idle, &abs, &old] {
        insert(&*s, r, t(0)).await;
    }
    let a = s.find_by_token(&ha).await.unwrap().unwrap();
    s.touch(&a, &short, t(1)).await.unwrap();
    s.flush().await.unwrap();
    s.put_policy(&tenant("fin"), Policy::default(), t(4), &audit())
        .await
        .unwrap();
    let s2 = f.open().await;
    for st in [&s, &s2] {
        let relaxed = st.policy(&tenant("fin")).await.unwrap();
        assert_eq!(*relaxed, Policy::default());
        for (h, want) in [(&hi, t(2)), (&ha, t(3))] {
            let (found, p) = st.find_by_token_with_policy(h).await.unwrap().unwrap();
            assert_eq!(
                session::liveness(&found.record, found.last_seen_at, &p, t(4)),
                Liveness::Expired(want),
                "a relaxed policy revived a timed-out session"
            );
        }
        let o = st.find_by_token(&ho).await.unwrap().unwrap();
        assert_eq!(o.record.expires_at, None);
        assert_eq!(
            session::liveness(&o.record, o.last_seen_at, &relaxed, t(4)),
            Liveness::Active,
            "no stored deadlines: the policy decides"
        );
    }
    let (_, next) = TokenFormat::default().generate().unwrap();
    assert!(matches!(
        s.rotate(&idle.handle, &rekey(hi, next, None), t(4), &audit())
            .await
            .unwrap(),
        RotateOutcome::Stale
    ));
    assert!(matches!(
        s.rotate(&old.handle, &rekey(ho, next, None), t(4), &audit())
            .await
            .unwrap(),
        RotateOutcome::Rotated(_)
    ));
    let report = s.sweep(t(4), 3600, &audit()).await.unwrap();
    let mut swept: Vec<_> = report.expired.iter().map(|e| e.handle.clone()).collect();
    swept.sort();
    let mut want = vec![idle.handle.clone(), abs.handle.clone()];
    want.sort();
    assert_eq!(swept, want);
    let s3 = f.open().await;
    let rotated = s3.find_by_token(&next).await.unwrap().unwrap();
    assert_eq!(rotated.record.rotations, 1);
}

pub async fn sweep_expires_then_purges(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("short"),
        policy(|d| {
            d.idle_timeout_s = 10;
            d.absolute_timeout_s = 100;
        }),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let (idle, _) = record("nina", "short", t(0));
    let (live, hl) = record("nina", "short", t(0));
    let (revoked, _) = record("nina", "short", t(0));
    for r in [&idle, &live, &revoked] {
        insert(&*s, r, t(0)).await;
    }
    let l = s.find_by_token(&hl).await.unwrap().unwrap();
    let p = s.policy(&tenant("short")).await.unwrap();
    s.touch(&l, &p, t(8)).await.unwrap();
    s.revoke(&revoked.handle, "logout", t(1), &audit())
        .await
        .unwrap();
    let report = s.sweep(t(12), 3600, &audit()).await.unwrap();
    assert_eq!(report.expired.len(), 1);
    assert_eq!(report.expired[0].handle, idle.handle);
    assert_eq!(report.expired[0].at, t(10));
    assert_eq!(report.purged, 0);
    let expired = s
        .events(&EventQuery {
            event_type: Some("session.expired".into()),
            handle: Some(idle.handle.clone()),
            limit: 10,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(expired.len(), 1, "one session.expired with the change");
    assert_eq!(expired[0].time, t(10).to_datetime());
    assert!(matches!(
        s.find_by_handle(&idle.handle)
            .await
            .unwrap()
            .unwrap()
            .record
            .state,
        StoredState::Expired { .. }
    ));
    assert!(matches!(
        s.find_by_handle(&live.handle)
            .await
            .unwrap()
            .unwrap()
            .record
            .state,
        StoredState::Active
    ));
    // After the retention, ended sessions are purged; the live one (until 18 s) is now expired too.
    let report = s.sweep(t(12 + 3600), 3600, &audit()).await.unwrap();
    assert_eq!(report.expired.len(), 1);
    assert_eq!(report.purged, 2);
    assert!(s.find_by_handle(&idle.handle).await.unwrap().is_none());
    assert!(s.find_by_handle(&revoked.handle).await.unwrap().is_none());
    let s2 = f.open().await;
    assert!(
        s2.find_by_handle(&idle.handle).await.unwrap().is_none(),
        "purge is durable"
    );
    assert!(s2.find_by_handle(&live.handle).await.unwrap().is_some());
}

async fn user_events(s: &dyn SessionStore, user: &str) -> Vec<api::Event> {
    let mut evs = s
        .events(&EventQuery {
            user_id: Some(UserId::parse(user).unwrap()),
            limit: 1000,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    evs.reverse();
    evs
}

fn kinds(evs: &[api::Event]) -> Vec<(String, Option<String>, Option<String>)> {
    evs.iter()
        .map(|e| (e.event_type.clone(), e.handle.clone(), e.reason.clone()))
        .collect()
}

fn ev(
    kind: &str,
    h: &SessionRecord,
    reason: Option<&str>,
) -> (String, Option<String>, Option<String>) {
    (
        kind.to_owned(),
        Some(h.handle.as_str().to_owned()),
        reason.map(str::to_owned),
    )
}

pub async fn each_change_records_exactly_its_events(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("default"),
        policy(|d| {
            d.max_sessions_per_user = Some(2);
            d.on_limit = OnLimit::EvictOldest;
        }),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let (a, _) = record("ivy", "default", t(0));
    let (mut b, _) = record("ivy", "default", t(1));
    b.device.ip = Some("198.51.100.9".parse().unwrap());
    b.device.browser = Some("Chrome".into());
    let (c, ch) = record("ivy", "default", t(2));
    insert(&*s, &a, t(0)).await;
    insert(&*s, &b, t(1)).await;
    assert_eq!(insert(&*s, &c, t(2)).await, vec![a.handle.clone()]);
    let (_, new) = TokenFormat::default().generate().unwrap();
    let (_, other) = TokenFormat::default().generate().unwrap();
    assert!(matches!(
        s.rotate(&c.handle, &rekey(ch, new, None), t(3), &audit())
            .await
            .unwrap(),
        RotateOutcome::Rotated(_)
    ));
    assert!(
        matches!(
            s.rotate(&c.handle, &rekey(ch, other, None), t(3), &audit())
                .await
                .unwrap(),
            RotateOutcome::Stale
        ),
        "a stale rotation changes nothing and records nothing"
    );
    s.revoke(&b.handle, "logout", t(4), &audit()).await.unwrap();
    s.revoke(&b.handle, "revoked", t(4), &audit())
        .await
        .unwrap();
    let (d, _) = record("ivy", "default", t(5));
    insert(&*s, &d, t(5)).await;
    s.revoke_user(
        &d.user_id,
        None,
        Some(&d.handle),
        "force_logout",
        t(6),
        &audit(),
    )
    .await
    .unwrap();
    let expected = vec![
        ev("session.created", &a, None),
        ev("session.created", &b, None),
        ev("session.revoked", &a, Some("limit_evicted")),
        ev("session.created", &c, None),
        ev("session.rotated", &c, None),
        ev("session.revoked", &b, Some("logout")),
        ev("session.created", &d, None),
        ev("session.revoked", &c, Some("force_logout")),
    ];
    let evs = user_events(&*s, "ivy").await;
    assert_eq!(kinds(&evs), expected);
    // New-device detection: a and b are new; c and d come from a's device again.
    let new_device: Vec<_> = evs
        .iter()
        .filter(|e| e.event_type == "session.created")
        .map(|e| e.details.get("new_device").cloned())
        .collect();
    assert_eq!(
        new_device,
        vec![
            Some(json!(true)),
            Some(json!(true)),
            Some(json!(false)),
            Some(json!(false))
        ]
    );
    let first = &evs[0];
    assert_eq!(first.user_id.as_deref(), Some("ivy"));
    assert_eq!(first.tenant, "default");
    assert_eq!(first.actor.as_deref(), Some("api_key:test"));
    assert_eq!(first.request_id.as_deref(), Some("req-1"));
    assert_eq!(first.ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(first.time, t(0).to_datetime());
    assert!(
        first.details["device_id"]
            .as_str()
            .unwrap()
            .starts_with("dev_")
    );
    let policy_events = s
        .events(&EventQuery {
            event_type: Some("policy.updated".into()),
            limit: 10,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(policy_events.len(), 1);
    assert_eq!(policy_events[0].tenant, "default");
    // Durable.
    let s2 = f.open().await;
    assert_eq!(kinds(&user_events(&*s2, "ivy").await), expected);
}

pub async fn refused_changes_record_nothing(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.put_policy(
        &tenant("deny"),
        policy(|d| {
            d.max_sessions_per_user = Some(1);
            d.on_limit = OnLimit::Deny;
        }),
        t(0),
        &audit(),
    )
    .await
    .unwrap();
    let (a, _) = record("jack", "deny", t(0));
    let (b, _) = record("jack", "deny", t(1));
    insert(&*s, &a, t(0)).await;
    assert_eq!(
        s.insert(b, t(1), &audit()).await.unwrap(),
        InsertOutcome::LimitReached
    );
    let (gone, _) = record("jack", "deny", t(0));
    assert!(
        s.revoke(&gone.handle, "revoked", t(2), &audit())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        kinds(&user_events(&*s, "jack").await),
        vec![ev("session.created", &a, None)]
    );
}

pub async fn event_queries_filter_and_page(f: &dyn StoreFactory) {
    let s = f.open().await;
    let audit = audit();
    let (r1, _) = record("kim", "default", t(0));
    let (r2, _) = record("kim", "default", t(0));
    let mut evs = Vec::new();
    for i in 1..=6 {
        let rec = if i % 2 == 0 { &r2 } else { &r1 };
        let kind = if i <= 3 {
            EventKind::SessionRotated
        } else {
            EventKind::SessionRefreshed
        };
        evs.push(audit.session_event(kind, t(i), rec, None));
    }
    let (other, _) = record("lee", "default", t(0));
    evs.push(audit.session_event(EventKind::SessionRotated, t(7), &other, None));
    s.append_events(&evs).await.unwrap();
    let q = |f: &dyn Fn(&mut EventQuery)| {
        let mut q = EventQuery {
            user_id: Some(UserId::parse("kim").unwrap()),
            limit: 100,
            ..EventQuery::default()
        };
        f(&mut q);
        q
    };
    let times = |v: Vec<api::Event>| -> Vec<i64> {
        v.iter()
            .map(|e| (Timestamp::from_datetime(e.time).as_millis() - T0) / 1000)
            .collect()
    };
    assert_eq!(
        times(s.events(&q(&|_| ())).await.unwrap()),
        vec![6, 5, 4, 3, 2, 1]
    );
    // Pages by cursor.
    let p1 = s.events(&q(&|q| q.limit = 4)).await.unwrap();
    assert_eq!(times(p1.clone()), vec![6, 5, 4, 3]);
    let cursor = p1.last().unwrap().id.clone();
    let p2 = s
        .events(&q(&|q| {
            q.limit = 4;
            q.before_id = Some(cursor.clone());
        }))
        .await
        .unwrap();
    assert_eq!(times(p2), vec![2, 1]);
    let h = r2.handle.clone();
    assert_eq!(
        times(s.events(&q(&|q| q.handle = Some(h.clone()))).await.unwrap()),
        vec![6, 4, 2]
    );
    assert_eq!(
        times(
            s.events(&q(&|q| q.event_type = Some("session.refreshed".into())))
                .await
                .unwrap()
        ),
        vec![6, 5, 4]
    );
    assert_eq!(
        times(
            s.events(&q(&|q| {
                q.since = Some(t(2));
                q.until = Some(t(5));
            }))
            .await
            .unwrap()
        ),
        vec![4, 3, 2]
    );
    // Without a user: everyone's.
    let all = s
        .events(&EventQuery {
            limit: 100,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(times(all), vec![7, 6, 5, 4, 3, 2, 1]);
    // Retention.
    assert!(s.purge_events(t(3)).await.unwrap() >= 2);
    assert_eq!(
        times(s.events(&q(&|_| ())).await.unwrap()),
        vec![6, 5, 4, 3]
    );
    let s2 = f.open().await;
    assert_eq!(
        times(s2.events(&q(&|_| ())).await.unwrap()),
        vec![6, 5, 4, 3]
    );
}

fn delivery(e: &api::Event, webhook: &str, next: Timestamp) -> api::Delivery {
    api::Delivery {
        id: format!("{}.{webhook}", e.id),
        webhook: webhook.to_owned(),
        event: e.clone(),
        state: DeliveryState::Pending,
        attempts: 0,
        next_attempt_at: Some(next.to_datetime()),
        last_status: None,
        last_error: None,
        created_at: e.time,
        updated_at: e.time,
    }
}

pub async fn outbox_fans_out_to_deliveries(f: &dyn StoreFactory) {
    let s = f.open().await;
    let mut on = audit();
    on.deliver = true;
    let (a, _) = record("mia", "default", t(1));
    insert(&*s, &a, t(1)).await;
    assert!(
        s.pending_events(10).await.unwrap().is_empty(),
        "deliver was off"
    );
    s.revoke(&a.handle, "logout", t(2), &on).await.unwrap();
    let extra = on.event(EventKind::AuthFailed, t(3), &tenant("default"));
    s.append_events(&[extra]).await.unwrap();
    let pending = s.pending_events(10).await.unwrap();
    let types: Vec<_> = pending.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        vec!["session.revoked", "auth.failed"],
        "oldest first"
    );
    assert_eq!(s.pending_events(1).await.unwrap().len(), 1);
    let d1 = delivery(&pending[0], "w1", t(10));
    let d2 = delivery(&pending[1], "w1", t(100));
    let d3 = delivery(&pending[1], "w2", t(10));
    s.fan_out(
        &[pending[0].id.clone(), pending[1].id.clone()],
        &[d1.clone(), d2.clone(), d3.clone()],
    )
    .await
    .unwrap();
    assert!(s.pending_events(10).await.unwrap().is_empty());
    let due: Vec<_> = s
        .due_deliveries(t(50), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(due.len(), 2);
    assert!(due.contains(&d1.id) && due.contains(&d3.id));
    let mut done = d1.clone();
    done.state = DeliveryState::Delivered;
    done.attempts = 1;
    done.next_attempt_at = None;
    done.last_status = Some(204);
    done.updated_at = t(11).to_datetime();
    s.put_delivery(&done).await.unwrap();
    let mut dead = d3.clone();
    dead.state = DeliveryState::Dead;
    dead.attempts = 8;
    dead.next_attempt_at = None;
    dead.last_error = Some("connection refused".into());
    dead.updated_at = t(12).to_datetime();
    s.put_delivery(&dead).await.unwrap();
    let due: Vec<_> = s
        .due_deliveries(t(1000), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(due, vec![d2.id.clone()]);
    let s2 = f.open().await;
    let w1 = s2
        .deliveries(&DeliveryQuery {
            webhook: "w1".into(),
            limit: 10,
            ..DeliveryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(w1, vec![d2.clone(), done.clone()], "newest first, durable");
    let dead_w2 = s2
        .deliveries(&DeliveryQuery {
            webhook: "w2".into(),
            state: Some(DeliveryState::Dead),
            limit: 10,
            ..DeliveryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(dead_w2, vec![dead.clone()]);
    // Retention drops finished deliveries, never pending ones.
    s2.purge_events(t(5000)).await.unwrap();
    let left: Vec<_> = s2
        .deliveries(&DeliveryQuery {
            webhook: "w1".into(),
            limit: 10,
            ..DeliveryQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, vec![d2.id.clone()]);
}

pub async fn flags_and_rebinding_persist_with_their_event(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (rec, hash) = record("pia", "default", t(0));
    insert(&*s, &rec, t(0)).await;
    let mut moved = rec.device.clone();
    moved.ip = Some("198.51.100.4".parse().unwrap());
    moved.browser = Some("Safari".into());
    let change = Rekey {
        expect: Expect::Token(hash),
        token_hash: None,
        refresh: None,
        auth: None,
        event: EventKind::SecurityBindingMismatch,
        reason: Some("ip".into()),
        flag: Some("binding_mismatch".into()),
        device: Some(moved.clone()),
        details: Map::new(),
    };
    assert!(matches!(
        s.rotate(&rec.handle, &change, t(1), &audit())
            .await
            .unwrap(),
        RotateOutcome::Rotated(_)
    ));
    // The same flag again is kept once.
    assert!(matches!(
        s.rotate(&rec.handle, &change, t(2), &audit())
            .await
            .unwrap(),
        RotateOutcome::Rotated(_)
    ));
    let s2 = f.open().await;
    let found = s2.find_by_token(&hash).await.unwrap().unwrap();
    assert_eq!(
        found.record.flags,
        vec![std::sync::Arc::<str>::from("binding_mismatch")]
    );
    assert_eq!(found.record.device, moved);
    let evs = user_events(&*s2, "pia").await;
    assert_eq!(evs.len(), 3);
    assert_eq!(evs[1].event_type, "security.binding_mismatch");
    assert_eq!(evs[1].reason.as_deref(), Some("ip"));
}

pub async fn active_sessions_are_counted_per_tenant(f: &dyn StoreFactory) {
    let s = f.open().await;
    let (a, _) = record("nia", "default", t(0));
    let (b, _) = record("nia", "default", t(0));
    let (c, _) = record("oli", "acme", t(0));
    for r in [&a, &b, &c] {
        insert(&*s, r, t(0)).await;
    }
    s.revoke(&b.handle, "logout", t(1), &audit()).await.unwrap();
    // A store that cannot count (Redis) says so.
    if let Some(mut counts) = s.active_sessions(t(2)).await.unwrap() {
        counts.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(counts, vec![(tenant("acme"), 1), (tenant("default"), 1)]);
    }
}

pub async fn ping_answers(f: &dyn StoreFactory) {
    let s = f.open().await;
    s.ping().await.unwrap();
}

/// Instantiates every conformance case as a `#[tokio::test]` for a backend.
/// `$factory` is an expression that makes a fresh [`StoreFactory`].
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory;
            insert_and_find,
            acknowledged_writes_survive_reopen,
            rotate_replaces_the_token,
            rotate_refuses_ended_sessions,
            refresh_state_swaps_atomically,
            documents_are_compare_and_set,
            revoke_is_idempotent,
            revoke_user_spares_the_exception_and_other_users,
            limit_evicts_least_recently_used,
            limit_deny_refuses,
            limit_holds_under_concurrent_creates,
            evict_oldest_holds_under_concurrent_creates,
            update_data_merges_and_checks,
            update_data_records_its_event_with_the_change,
            list_orders_filters_and_pages,
            policies_default_and_replace,
            find_with_policy_follows_policy_changes,
            touch_slides_and_is_written_back,
            sweep_expires_then_purges,
            each_change_records_exactly_its_events,
            refused_changes_record_nothing,
            event_queries_filter_and_page,
            outbox_fans_out_to_deliveries,
            active_sessions_are_counted_per_tenant,
            flags_and_rebinding_persist_with_their_event,
            stored_deadlines_outlast_a_relaxed_policy,
            ping_answers
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::conformance::$case(&factory).await;
            }
        )*
    };
}

/// Cache coherence across nodes: `a` (a node with a session cache) warms its cache, `b` (another
/// node on the same backend) changes things; `a` must stop answering the old state once the
/// change feed delivers (each wait is bounded; nothing is asserted on timing).
pub mod coherence {
    use std::future::Future;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::cache::CachedStore;
    use sessiond_core::session::StoredSession;

    /// How long a change may take to reach the other node.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// Polls `check` until it holds (or panics with `what` after [`PATIENCE`]).
    pub async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let until = tokio::time::Instant::now() + PATIENCE;
        loop {
            if check().await {
                return;
            }
            assert!(tokio::time::Instant::now() < until, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the node's cache is trusted.
    pub async fn trusted(a: &CachedStore) {
        eventually("the cache's feed is subscribed", || async {
            a.cache().is_trusted()
        })
        .await;
    }

    async fn lookup(a: &CachedStore, hash: &TokenHash) -> Option<(StoredSession, Arc<Policy>)> {
        a.find_by_token_with_policy(hash).await.unwrap()
    }

    /// Looks the token up until the answer comes from the cache.
    pub async fn warm(a: &CachedStore, hash: &TokenHash) {
        eventually("the session is served from the cache", || async {
            let hits = a.cache().stats().hits.load(Ordering::Relaxed);
            assert!(lookup(a, hash).await.is_some());
            a.cache().stats().hits.load(Ordering::Relaxed) > hits
        })
        .await;
    }

    fn revoked(s: &Option<(StoredSession, Arc<Policy>)>) -> bool {
        s.as_ref()
            .is_some_and(|(s, _)| matches!(s.record.state, StoredState::Revoked { .. }))
    }

    pub async fn changes_through_another_node_reach_the_cache(
        a: &CachedStore,
        b: &dyn SessionStore,
    ) {
        trusted(a).await;
        // Revocation.
        let (r1, h1) = record("coh-ann", "coh", t(0));
        insert(b, &r1, t(0)).await;
        warm(a, &h1).await;
        b.revoke(&r1.handle, "logout", t(1), &audit())
            .await
            .unwrap();
        eventually("a revocation through B reaches A", || async {
            revoked(&lookup(a, &h1).await)
        })
        .await;

        // Rotation: the old token stops working.
        let (r2, h2) = record("coh-ann", "coh", t(0));
        insert(b, &r2, t(0)).await;
        warm(a, &h2).await;
        let (_, new) = TokenFormat::default().generate().unwrap();
        let change = rekey(h2, new, None);
        assert!(matches!(
            b.rotate(&r2.handle, &change, t(2), &audit()).await.unwrap(),
            RotateOutcome::Rotated(_)
        ));
        eventually("a rotation through B reaches A", || async {
            lookup(a, &h2).await.is_none()
        })
        .await;
        warm(a, &new).await;

        // A flag (a detector's finding) and a fresh authentication.
        let mut flagged = rekey(
            new,
            new,
            Some(AuthRecord {
                method: "webauthn".into(),
                aal: 2,
                authenticated_at: t(3),
            }),
        );
        flagged.flag = Some("suspicious".into());
        assert!(matches!(
            b.rotate(&r2.handle, &flagged, t(3), &audit())
                .await
                .unwrap(),
            RotateOutcome::Rotated(_)
        ));
        eventually(
            "a flag and a reauthentication through B reach A",
            || async {
                lookup(a, &new).await.is_some_and(|(s, _)| {
                    s.record.auth.aal == 2 && s.record.flags.iter().any(|f| &**f == "suspicious")
                })
            },
        )
        .await;

        // Data.
        warm(a, &new).await;
        let mut patch = Map::new();
        patch.insert("cart".into(), json!(2));
        assert!(matches!(
            b.update_data(&r2.handle, &patch, 4096, t(4), &audit())
                .await
                .unwrap(),
            DataUpdate::Updated(_)
        ));
        eventually("a data update through B reaches A", || async {
            lookup(a, &new)
                .await
                .is_some_and(|(s, _)| s.record.data.contains("\"cart\":2"))
        })
        .await;

        // Policy.
        warm(a, &new).await;
        let stored = policy(|d| {
            d.idle_timeout_s = 3600;
            d.absolute_timeout_s = 7200;
        });
        b.put_policy(&tenant("coh"), stored.clone(), t(5), &audit())
            .await
            .unwrap();
        eventually("a policy change through B reaches A", || async {
            lookup(a, &new).await.is_some_and(|(_, p)| *p == stored)
        })
        .await;

        // Every session of a user.
        let (r3, h3) = record("coh-bob", "coh", t(6));
        let (r4, h4) = record("coh-bob", "coh", t(6));
        insert(b, &r3, t(6)).await;
        insert(b, &r4, t(6)).await;
        warm(a, &h3).await;
        warm(a, &h4).await;
        let gone = b
            .revoke_user(&r3.user_id, None, None, "password_changed", t(7), &audit())
            .await
            .unwrap();
        assert_eq!(gone.len(), 2);
        eventually("a force logout through B reaches A", || async {
            revoked(&lookup(a, &h3).await) && revoked(&lookup(a, &h4).await)
        })
        .await;

        // Eviction at the limit.
        let limited = policy(|d| {
            d.max_sessions_per_user = Some(1);
            d.on_limit = OnLimit::EvictOldest;
        });
        b.put_policy(&tenant("coh-limit"), limited, t(8), &audit())
            .await
            .unwrap();
        let (r5, h5) = record("coh-cy", "coh-limit", t(8));
        insert(b, &r5, t(8)).await;
        warm(a, &h5).await;
        let (r6, _) = record("coh-cy", "coh-limit", t(9));
        insert(b, &r6, t(9)).await;
        eventually("an eviction through B reaches A", || async {
            revoked(&lookup(a, &h5).await)
        })
        .await;

        // Expiry by the sweeper, then the purge.
        let short = policy(|d| {
            d.idle_timeout_s = 60;
            d.absolute_timeout_s = 120;
        });
        b.put_policy(&tenant("coh-short"), short, t(10), &audit())
            .await
            .unwrap();
        let (r7, h7) = record("coh-dee", "coh-short", t(10));
        insert(b, &r7, t(10)).await;
        warm(a, &h7).await;
        let report = b.sweep(t(200), 3600, &audit()).await.unwrap();
        assert!(report.expired.iter().any(|e| e.handle == r7.handle));
        eventually("an expiry through B reaches A", || async {
            lookup(a, &h7)
                .await
                .is_some_and(|(s, _)| matches!(s.record.state, StoredState::Expired { .. }))
        })
        .await;
    }

    /// `kill` cuts A's feed connection on the server side; A must stop serving from its cache
    /// at once, answer a change made meanwhile (whose announcement it cannot have heard)
    /// correctly, and serve from its cache again once it has subscribed anew.
    pub async fn a_lost_feed_is_distrusted_at_once<K, Fut>(
        a: &CachedStore,
        b: &dyn SessionStore,
        kill: K,
    ) where
        K: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        trusted(a).await;
        let (r1, h1) = record("loss-ann", "loss", t(0));
        insert(b, &r1, t(0)).await;
        warm(a, &h1).await;
        let losses = a.cache().stats().feed_losses.load(Ordering::Relaxed);
        kill().await;
        eventually("A notices that its feed is gone", || async {
            a.cache().stats().feed_losses.load(Ordering::Relaxed) > losses
        })
        .await;
        b.revoke(&r1.handle, "logout", t(1), &audit())
            .await
            .unwrap();
        assert!(
            revoked(&lookup(a, &h1).await),
            "no cached session is served once the feed was lost"
        );
        trusted(a).await;
        assert!(revoked(&lookup(a, &h1).await));
        let (r2, h2) = record("loss-ann", "loss", t(2));
        insert(b, &r2, t(2)).await;
        warm(a, &h2).await;
        b.revoke(&r2.handle, "logout", t(3), &audit())
            .await
            .unwrap();
        eventually("the new subscription delivers", || async {
            revoked(&lookup(a, &h2).await)
        })
        .await;
    }
}
