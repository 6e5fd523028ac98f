//! Timeouts end to end, with short policy durations.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::Server;

async fn idle_timeout_expires_unused_sessions_and_use_keeps_them_alive() {
    let s = Server::start();
    let p = json!({"idle_timeout_s": 1, "absolute_timeout_s": 60});
    assert_eq!(
        s.call(Method::PUT, "/v1/tenants/short/policy", Some(p))
            .await
            .status,
        StatusCode::OK
    );
    let idle = s
        .post("/v1/sessions", json!({"user_id": "i", "tenant": "short"}))
        .await;
    let busy = s
        .post("/v1/sessions", json!({"user_id": "i", "tenant": "short"}))
        .await;
    let (idle_t, busy_t) = (
        idle.body["token"].as_str().unwrap(),
        busy.body["token"].as_str().unwrap(),
    );
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            s.verify(busy_t).await.status,
            StatusCode::OK,
            "use slides the idle timeout"
        );
    }
    s.verify(idle_t).await.problem(401, "session_expired");
    let h = idle.body["session"]["handle"].as_str().unwrap();
    assert_eq!(
        s.get(&format!("/v1/sessions/{h}")).await.body["session"]["status"],
        "expired"
    );
    s.post("/v1/sessions/rotate", json!({"token": idle_t}))
        .await
        .problem(401, "session_expired");
    let (code, listed) = {
        let r = s.get("/v1/users/i/sessions").await;
        (r.status, r.body["sessions"].as_array().unwrap().len())
    };
    assert_eq!(
        (code, listed),
        (StatusCode::OK, 1),
        "expired sessions are not listed as active"
    );
}

async fn absolute_timeout_ends_a_session_however_busy() {
    let s = Server::start();
    let p = json!({"idle_timeout_s": 1, "absolute_timeout_s": 2});
    s.call(Method::PUT, "/v1/tenants/abs/policy", Some(p)).await;
    let r = s
        .post("/v1/sessions", json!({"user_id": "a", "tenant": "abs"}))
        .await;
    let t = r.body["token"].as_str().unwrap();
    let mut expired = false;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let v = s.verify(t).await;
        if v.status != StatusCode::OK {
            v.problem(401, "session_expired");
            expired = true;
            break;
        }
        assert!(
            v.body["session"]["idle_expires_at"].as_str()
                <= v.body["session"]["expires_at"].as_str()
        );
    }
    assert!(expired, "the absolute timeout never slides");
}

async fn a_policy_change_reaches_existing_sessions_at_their_next_verify() {
    let s = Server::start();
    let r = s
        .post(
            "/v1/sessions",
            json!({"user_id": "pc", "tenant": "tighten"}),
        )
        .await;
    let t = r.body["token"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.verify(t).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.call(
        Method::PUT,
        "/v1/tenants/tighten/policy",
        Some(json!({"idle_timeout_s": 1, "absolute_timeout_s": 60})),
    )
    .await;
    s.verify(t).await.problem(401, "session_expired");
}

async fn expired_sessions_are_swept_and_purged_after_retention() {
    let s = Server::start_with(&[
        ("SESSIOND_SWEEP_INTERVAL_S", "1"),
        ("SESSIOND_RETENTION_S", "1"),
    ]);
    s.call(
        Method::PUT,
        "/v1/tenants/sw/policy",
        Some(json!({"idle_timeout_s": 1, "absolute_timeout_s": 1})),
    )
    .await;
    let r = s
        .post("/v1/sessions", json!({"user_id": "sw", "tenant": "sw"}))
        .await;
    let h = r.body["session"]["handle"].as_str().unwrap().to_owned();
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.get(&format!("/v1/sessions/{h}")).await.status == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
    }
    assert!(gone, "purged after expiry plus retention");
    assert!(
        s.log_text().contains("session.expired"),
        "the sweep reports the expiry"
    );
}

async fn a_relaxed_policy_never_revives_a_timed_out_session() {
    let s = Server::start();
    let put = |p| s.call(Method::PUT, "/v1/tenants/r/policy", Some(p));
    let short = json!({"idle_timeout_s": 2, "absolute_timeout_s": 3,
        "remember_me_idle_timeout_s": 2, "remember_me_absolute_timeout_s": 3});
    assert_eq!(put(short).await.status, StatusCode::OK);
    let mut tokens = Vec::new();
    for remember_me in [false, true] {
        let r = s
            .post(
                "/v1/sessions",
                json!({"user_id": "z", "tenant": "r", "remember_me": remember_me}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        tokens.push(r.body["token"].as_str().unwrap().to_owned());
    }
    // Past the idle timeout and the absolute one, before any sweep.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for t in &tokens {
        s.verify(t).await.problem(401, "session_expired");
    }
    let relaxed = json!({"idle_timeout_s": 1800, "absolute_timeout_s": 43200,
        "remember_me_idle_timeout_s": 1800, "remember_me_absolute_timeout_s": 43200});
    assert_eq!(put(relaxed).await.status, StatusCode::OK);
    for t in &tokens {
        s.verify(t).await.problem(401, "session_expired");
    }
}

crate::on_every_store!(
    a_relaxed_policy_never_revives_a_timed_out_session,
    idle_timeout_expires_unused_sessions_and_use_keeps_them_alive,
    absolute_timeout_ends_a_session_however_busy,
    a_policy_change_reaches_existing_sessions_at_their_next_verify,
    expired_sessions_are_swept_and_purged_after_retention,
);
