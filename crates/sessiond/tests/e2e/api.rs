//! The endpoints of API v1, one by one, on the success path.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::Server;

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

async fn create_answers_session_token_and_cookie() {
    let s = Server::start();
    let r = s
        .post(
            "/v1/sessions",
            json!({
                "user_id": "u-42",
                "tenant": "default",
                "auth": {"method": "password", "aal": 1},
                "client": {"ip": "203.0.113.7", "user_agent": FIREFOX},
                "data": {"cart": 3}
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let b = &r.body;
    let token = b["token"].as_str().unwrap();
    assert!(token.starts_with("sdt_") && token.len() == 47);
    let ses = &b["session"];
    assert!(ses["handle"].as_str().unwrap().starts_with("ses_"));
    assert_eq!(ses["user_id"], "u-42");
    assert_eq!(ses["tenant"], "default");
    assert_eq!(ses["status"], "active");
    assert_eq!(ses["remember_me"], false);
    assert_eq!(ses["auth"]["method"], "password");
    assert_eq!(ses["auth"]["aal"], 1);
    assert_eq!(ses["device"]["ip"], "203.0.113.7");
    assert_eq!(ses["device"]["browser"], "Firefox");
    assert_eq!(ses["device"]["os"], "Linux");
    assert_eq!(ses["data"], json!({"cart": 3}));
    assert_eq!(ses["revoked_reason"], json!(null));
    for k in [
        "created_at",
        "last_seen_at",
        "idle_expires_at",
        "expires_at",
    ] {
        let t = ses[k].as_str().unwrap();
        assert!(chrono_like(t), "{k} = {t} is RFC 3339 UTC");
    }
    assert_eq!(b["cookie"]["name"], "__Host-session");
    assert_eq!(b["cookie"]["value"], token);
    assert_eq!(
        b["cookie"]["set_cookie"],
        format!("__Host-session={token}; Path=/; Secure; HttpOnly; SameSite=Lax")
    );
    assert!(!r.text.contains("token_hash"));
}

fn chrono_like(t: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SS.mmmZ, always three fractional digits.
    t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.'
}

fn instant(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    let t = v.as_str().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(t)
        .unwrap_or_else(|e| panic!("{t:?} is not RFC 3339: {e}"))
        .to_utc()
}

async fn verify_slides_idle_expiry_and_keeps_absolute() {
    let s = Server::start();
    let (token, _, created) = s.login("u-1").await;
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = s.verify(&token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let before = &created["session"];
    let after = &r.body["session"];
    assert!(instant(&after["last_seen_at"]) > instant(&before["last_seen_at"]));
    assert!(instant(&after["idle_expires_at"]) > instant(&before["idle_expires_at"]));
    // Fixed-width timestamps: string order is time order, as clients may rely on.
    assert!(after["last_seen_at"].as_str() > before["last_seen_at"].as_str());
    assert_eq!(after["expires_at"], before["expires_at"]);
    assert_eq!(after["created_at"], before["created_at"]);
}

async fn rotate_issues_a_new_token_and_kills_the_old() {
    let s = Server::start();
    let (old, handle, _) = s.login("u-2").await;
    let r = s.post("/v1/sessions/rotate", json!({"token": old})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let new = r.body["token"].as_str().unwrap();
    assert_ne!(new, old);
    assert_eq!(r.body["session"]["handle"], handle);
    assert_eq!(r.body["cookie"]["value"], new);
    s.verify(&old).await.problem(401, "session_unknown");
    assert_eq!(s.verify(new).await.status, StatusCode::OK);
}

async fn reauthenticate_records_step_up_and_rotates() {
    let s = Server::start();
    let (old, handle, _) = s.login("u-3").await;
    let need = json!({"token": old, "require": {"min_aal": 2}});
    s.post("/v1/sessions/verify", need)
        .await
        .problem(403, "reauthentication_required");
    // The session stays valid when a requirement is not met.
    assert_eq!(s.verify(&old).await.status, StatusCode::OK);
    let r = s
        .post(
            "/v1/sessions/reauthenticate",
            json!({"token": old, "auth": {"method": "webauthn", "aal": 2}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let new = r.body["token"].as_str().unwrap();
    assert_eq!(r.body["session"]["handle"], handle);
    assert_eq!(r.body["session"]["auth"]["method"], "webauthn");
    assert_eq!(r.body["session"]["auth"]["aal"], 2);
    s.verify(&old).await.problem(401, "session_unknown");
    let ok = s
        .post(
            "/v1/sessions/verify",
            json!({"token": new, "require": {"min_aal": 2, "max_auth_age_s": 60}}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
}

async fn logout_revokes_clears_the_cookie_and_is_idempotent() {
    let s = Server::start();
    let (token, _, _) = s.login("u-4").await;
    let r = s.post("/v1/sessions/logout", json!({"token": token})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["session"]["status"], "revoked");
    assert_eq!(r.body["session"]["revoked_reason"], "logout");
    let clear = r.body["clear_cookie"].as_str().unwrap();
    assert!(clear.starts_with("__Host-session=; Path=/; Secure; HttpOnly; SameSite=Lax"));
    assert!(clear.contains("Max-Age=0"));
    s.verify(&token).await.problem(401, "session_revoked");
    let again = s.post("/v1/sessions/logout", json!({"token": token})).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["session"]["revoked_reason"], "logout");
}

async fn get_patch_and_delete_by_handle() {
    let s = Server::start();
    let r = s
        .post(
            "/v1/sessions",
            json!({"user_id": "u-5", "data": {"a": 1, "nested": {"x": 1, "y": 2}}}),
        )
        .await;
    let token = r.body["token"].as_str().unwrap().to_owned();
    let handle = r.body["session"]["handle"].as_str().unwrap().to_owned();
    let got = s.get(&format!("/v1/sessions/{handle}")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("cache-control"), Some("no-store"));
    assert_eq!(got.body["session"]["handle"], handle);
    assert!(
        !got.text.contains(&token),
        "a session object never carries the token"
    );

    let p = s
        .call(
            Method::PATCH,
            &format!("/v1/sessions/{handle}"),
            Some(json!({"data": {"a": null, "b": "x", "nested": {"y": null}}})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert_eq!(
        p.body["session"]["data"],
        json!({"b": "x", "nested": {"x": 1}})
    );
    assert_eq!(
        s.verify(&token).await.body["session"]["data"],
        json!({"b": "x", "nested": {"x": 1}})
    );

    let d = s
        .call(
            Method::DELETE,
            &format!("/v1/sessions/{handle}?reason=suspicious_ip"),
            None,
        )
        .await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    assert_eq!(d.body["session"]["status"], "revoked");
    assert_eq!(d.body["session"]["revoked_reason"], "suspicious_ip");
    let again = s
        .call(Method::DELETE, &format!("/v1/sessions/{handle}"), None)
        .await;
    assert_eq!(again.status, StatusCode::OK, "idempotent");
    assert_eq!(again.body["session"]["revoked_reason"], "suspicious_ip");
    s.verify(&token).await.problem(401, "session_revoked");
    // GET answers whatever the status.
    assert_eq!(
        s.get(&format!("/v1/sessions/{handle}")).await.body["session"]["status"],
        "revoked"
    );

    let (_, h2, _) = s.login("u-5").await;
    let d2 = s
        .call(Method::DELETE, &format!("/v1/sessions/{h2}"), None)
        .await;
    assert_eq!(
        d2.body["session"]["revoked_reason"], "revoked",
        "default reason"
    );
}

async fn list_user_sessions_most_recent_first_with_pages_and_status() {
    let s = Server::start();
    let mut handles = Vec::new();
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let (t, h, _) = s.login("lister").await;
        tokens.push(t);
        handles.push(h);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    s.login("someone-else").await;
    // Use the first one last: it becomes the most recently seen.
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(s.verify(&tokens[0]).await.status, StatusCode::OK);
    s.post("/v1/sessions/logout", json!({"token": tokens[1]}))
        .await;

    let r = s.get("/v1/users/lister/sessions").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let got: Vec<&str> = r.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["handle"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        vec![&handles[0], &handles[4], &handles[3], &handles[2]]
    );
    assert_eq!(r.body["next_cursor"], json!(null));

    let all = s.get("/v1/users/lister/sessions?status=all").await;
    assert_eq!(all.body["sessions"].as_array().unwrap().len(), 5);

    let p1 = s.get("/v1/users/lister/sessions?status=all&limit=2").await;
    assert_eq!(p1.body["sessions"].as_array().unwrap().len(), 2);
    let cursor = p1.body["next_cursor"].as_str().unwrap().to_owned();
    let p2 = s
        .get(&format!(
            "/v1/users/lister/sessions?status=all&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(p2.body["sessions"].as_array().unwrap().len(), 2);
    let c2 = p2.body["next_cursor"].as_str().unwrap().to_owned();
    let p3 = s
        .get(&format!(
            "/v1/users/lister/sessions?status=all&limit=2&cursor={c2}"
        ))
        .await;
    assert_eq!(p3.body["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(p3.body["next_cursor"], json!(null));
    let mut seen: Vec<String> = [&p1, &p2, &p3]
        .iter()
        .flat_map(|p| {
            p.body["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["handle"].as_str().unwrap().to_owned())
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "pages neither repeat nor skip");

    let none = s.get("/v1/users/nobody/sessions").await;
    assert_eq!(none.body, json!({"sessions": [], "next_cursor": null}));
}

async fn force_logout_revokes_all_but_the_exception() {
    let s = Server::start();
    let (keep, keep_handle, _) = s.login("pw-change").await;
    let (a, _, _) = s.login("pw-change").await;
    let (b, _, _) = s.login("pw-change").await;
    let (other, _, _) = s.login("bystander").await;
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/users/pw-change/sessions?except={keep_handle}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!({"revoked": 2}));
    assert_eq!(s.verify(&keep).await.status, StatusCode::OK);
    let revoked = s.verify(&a).await;
    revoked.problem(401, "session_revoked");
    s.verify(&b).await.problem(401, "session_revoked");
    assert_eq!(s.verify(&other).await.status, StatusCode::OK);
    let h = s.get("/v1/users/pw-change/sessions?status=all").await;
    let reasons: Vec<_> = h.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["revoked_reason"].clone())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == json!("force_logout"))
            .count(),
        2
    );
    let all = s
        .call(Method::DELETE, "/v1/users/pw-change/sessions", None)
        .await;
    assert_eq!(all.body, json!({"revoked": 1}));
    s.verify(&keep).await.problem(401, "session_revoked");
}

async fn policy_defaults_round_trips_and_applies() {
    let s = Server::start();
    let def = s.get("/v1/tenants/acme/policy").await;
    assert_eq!(def.status, StatusCode::OK);
    assert_eq!(
        def.body,
        json!({
            "idle_timeout_s": 1800,
            "absolute_timeout_s": 43200,
            "remember_me_idle_timeout_s": 1209600,
            "remember_me_absolute_timeout_s": 2592000,
            "max_sessions_per_user": 100,
            "on_limit": "evict_oldest",
            "cookie": {"name": "__Host-session", "domain": null, "path": "/", "same_site": "Lax", "secure": true},
            "require_auth": false,
            "aal_timeouts": {
                "aal2": {"idle_timeout_s": 1800, "absolute_timeout_s": 43200},
                "aal3": {"idle_timeout_s": 900, "absolute_timeout_s": 43200}
            }
        })
    );
    // An explicit null (no limit) is kept as such.
    let mut unlimited = def.body.clone();
    unlimited["max_sessions_per_user"] = serde_json::Value::Null;
    let put = s
        .call(
            Method::PUT,
            "/v1/tenants/nolimit/policy",
            Some(unlimited.clone()),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    assert_eq!(s.get("/v1/tenants/nolimit/policy").await.body, unlimited);
    // Read-modify-write round-trips.
    let mut doc = def.body.clone();
    doc["idle_timeout_s"] = json!(600);
    doc["max_sessions_per_user"] = json!(2);
    doc["cookie"]["name"] = json!("sid");
    doc["cookie"]["domain"] = json!("example.com");
    doc["cookie"]["same_site"] = json!("Strict");
    let put = s
        .call(Method::PUT, "/v1/tenants/acme/policy", Some(doc.clone()))
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    assert_eq!(put.body, doc);
    assert_eq!(s.get("/v1/tenants/acme/policy").await.body, doc);
    assert_eq!(
        s.get("/v1/tenants/other/policy").await.body,
        def.body,
        "other tenants keep the default"
    );

    let r = s
        .post("/v1/sessions", json!({"user_id": "p", "tenant": "acme"}))
        .await;
    let set_cookie = r.body["cookie"]["set_cookie"].as_str().unwrap();
    assert!(set_cookie.starts_with("sid=sdt_"));
    assert!(
        set_cookie.ends_with("; Path=/; Domain=example.com; Secure; HttpOnly; SameSite=Strict")
    );
    let ses = &r.body["session"];
    let created = ses["created_at"].as_str().unwrap();
    let idle = ses["idle_expires_at"].as_str().unwrap();
    assert_ne!(created, idle);
}

async fn remember_me_cookie_has_max_age_to_the_absolute_expiry() {
    let s = Server::start();
    let r = s
        .post(
            "/v1/sessions",
            json!({"user_id": "rm", "remember_me": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["session"]["remember_me"], true);
    let c = r.body["cookie"]["set_cookie"].as_str().unwrap();
    let max_age: u64 = c.rsplit("Max-Age=").next().unwrap().parse().unwrap();
    assert!((2_591_990..=2_592_000).contains(&max_age), "{c}");
    let plain = s.post("/v1/sessions", json!({"user_id": "rm"})).await;
    assert!(
        !plain.body["cookie"]["set_cookie"]
            .as_str()
            .unwrap()
            .contains("Max-Age")
    );
}

async fn session_limit_evicts_least_recently_used_or_denies() {
    let s = Server::start();
    let put = s
        .call(
            Method::PUT,
            "/v1/tenants/evict/policy",
            Some(json!({"max_sessions_per_user": 2})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    let a = s
        .post("/v1/sessions", json!({"user_id": "lim", "tenant": "evict"}))
        .await;
    let b = s
        .post("/v1/sessions", json!({"user_id": "lim", "tenant": "evict"}))
        .await;
    let (ta, tb) = (
        a.body["token"].as_str().unwrap(),
        b.body["token"].as_str().unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(s.verify(ta).await.status, StatusCode::OK); // b is now least recently used
    let c = s
        .post("/v1/sessions", json!({"user_id": "lim", "tenant": "evict"}))
        .await;
    assert_eq!(c.status, StatusCode::CREATED);
    let evicted = s.verify(tb).await;
    evicted.problem(401, "session_revoked");
    let hb = b.body["session"]["handle"].as_str().unwrap();
    assert_eq!(
        s.get(&format!("/v1/sessions/{hb}")).await.body["session"]["revoked_reason"],
        "limit_evicted"
    );
    assert_eq!(s.verify(ta).await.status, StatusCode::OK);

    s.call(
        Method::PUT,
        "/v1/tenants/deny/policy",
        Some(json!({"max_sessions_per_user": 1, "on_limit": "deny"})),
    )
    .await;
    let first = s
        .post("/v1/sessions", json!({"user_id": "lim", "tenant": "deny"}))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    s.post("/v1/sessions", json!({"user_id": "lim", "tenant": "deny"}))
        .await
        .problem(409, "session_limit_reached");
    assert_eq!(
        s.verify(first.body["token"].as_str().unwrap()).await.status,
        StatusCode::OK
    );
}

async fn health_and_readiness_are_public() {
    let s = Server::start();
    let h = s.raw(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    let r = s.raw(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// The OpenAPI document: public, cacheable, and naming every endpoint of API v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_public_and_cacheable() {
    use crate::harness::{BACKEND, Backend};
    BACKEND
        .scope(Backend::Embedded, async {
            let s = Server::start();
            let r = s.raw(Method::GET, "/openapi.json").send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "application/json");
            let cache = r.headers()["cache-control"].to_str().unwrap().to_owned();
            assert!(cache.starts_with("public"), "{cache}");
            let etag = r.headers()["etag"].clone();
            let doc: serde_json::Value = r.json().await.unwrap();
            assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
            for path in [
                "/v1/sessions",
                "/v1/sessions/verify",
                "/v1/sessions/rotate",
                "/v1/sessions/reauthenticate",
                "/v1/sessions/logout",
                "/v1/sessions/{handle}",
                "/v1/users/{user_id}/sessions",
                "/v1/tenants/{tenant}/policy",
                "/healthz",
                "/readyz",
            ] {
                assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
            }
            let again = s
                .raw(Method::GET, "/openapi.json")
                .header("if-none-match", etag)
                .send()
                .await
                .unwrap();
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        })
        .await
}

async fn request_ids_are_made_or_propagated() {
    let s = Server::start();
    let r = s
        .raw(Method::GET, "/healthz")
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = s.raw(Method::GET, "/healthz").send().await.unwrap();
    assert!(!r.headers()["x-request-id"].is_empty());
}

crate::on_every_store!(
    create_answers_session_token_and_cookie,
    verify_slides_idle_expiry_and_keeps_absolute,
    rotate_issues_a_new_token_and_kills_the_old,
    reauthenticate_records_step_up_and_rotates,
    logout_revokes_clears_the_cookie_and_is_idempotent,
    get_patch_and_delete_by_handle,
    list_user_sessions_most_recent_first_with_pages_and_status,
    force_logout_revokes_all_but_the_exception,
    policy_defaults_round_trips_and_applies,
    remember_me_cookie_has_max_age_to_the_absolute_expiry,
    session_limit_evicts_least_recently_used_or_denies,
    health_and_readiness_are_public,
    request_ids_are_made_or_propagated,
);
