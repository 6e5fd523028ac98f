//! Every error code of API v1, provoked over the wire.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::Server;

async fn missing_or_wrong_api_key_is_unauthorized_everywhere_but_health() {
    let s = Server::start();
    let routes = [
        (Method::POST, "/v1/sessions"),
        (Method::POST, "/v1/sessions/verify"),
        (Method::POST, "/v1/sessions/rotate"),
        (Method::POST, "/v1/sessions/reauthenticate"),
        (Method::POST, "/v1/sessions/logout"),
        (Method::GET, "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA"),
        (Method::PATCH, "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA"),
        (Method::DELETE, "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA"),
        (Method::GET, "/v1/users/u/sessions"),
        (Method::DELETE, "/v1/users/u/sessions"),
        (Method::GET, "/v1/tenants/t/policy"),
        (Method::PUT, "/v1/tenants/t/policy"),
    ];
    for (m, path) in routes {
        let none = crate::harness::Resp::from(
            s.raw(m.clone(), path)
                .json(&json!({"user_id": "u"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        none.problem(401, "unauthorized");
        let wrong = crate::harness::Resp::from(
            s.raw(m.clone(), path)
                .bearer_auth(format!("{}x", s.key))
                .json(&json!({}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        wrong.problem(401, "unauthorized");
        let basic = crate::harness::Resp::from(
            s.raw(m, path)
                .header("authorization", format!("Basic {}", s.key))
                .send()
                .await
                .unwrap(),
        )
        .await;
        basic.problem(401, "unauthorized");
    }
}

async fn bad_input_is_a_4xx_problem_never_a_5xx() {
    let s = Server::start();
    let bad_bodies = [
        json!({}),                                                // missing user_id
        json!({"user_id": ""}),                                   // empty user_id
        json!({"user_id": 42}),                                   // wrong type
        json!({"user_id": "u", "usr": "typo"}),                   // unknown field
        json!({"user_id": "u", "client": {"ip": "999.1.1.1"}}),   // bad IP
        json!({"user_id": "u", "client": {"ipaddr": "1.1.1.1"}}), // unknown nested field
        json!({"user_id": "u", "auth": {"aal": 4}}),              // aal out of range
        json!({"user_id": "u", "auth": {"method": "pass word"}}), // bad method
        json!({"user_id": "u", "auth": {"authenticated_at": "2999-01-01T00:00:00Z"}}), // future
        json!({"user_id": "u", "tenant": "no spaces"}),           // bad tenant
        json!({"user_id": "u", "data": [1, 2]}),                  // data not an object
        json!({"user_id": "u\u{0000}"}),                          // control character
        json!(["u"]),                                             // an array, not an object
        json!("u"),                                               // a string
    ];
    for b in bad_bodies {
        s.post("/v1/sessions", b.clone())
            .await
            .problem(400, "invalid_request");
    }
    // Malformed JSON.
    let r = crate::harness::Resp::from(
        s.raw(Method::POST, "/v1/sessions")
            .bearer_auth(&s.key)
            .header("content-type", "application/json")
            .body("{\"user_id\": ")
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.problem(400, "invalid_request");
    // Not JSON at all.
    let r = crate::harness::Resp::from(
        s.raw(Method::POST, "/v1/sessions")
            .bearer_auth(&s.key)
            .body("user_id=u")
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.problem(415, "unsupported_media_type");
    // Verify: bad require values, unknown fields.
    s.post(
        "/v1/sessions/verify",
        json!({"token": "x", "require": {"min_aal": 9}}),
    )
    .await
    .problem(400, "invalid_request");
    s.post("/v1/sessions/verify", json!({"token": "x", "extra": 1}))
        .await
        .problem(400, "invalid_request");
    s.post("/v1/sessions/verify", json!({}))
        .await
        .problem(400, "invalid_request");
    // Query strings are strict too.
    s.get("/v1/users/u/sessions?status=bogus")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/users/u/sessions?limit=0")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/users/u/sessions?limit=501")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/users/u/sessions?cursor=garbage")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/users/u/sessions?sort=asc")
        .await
        .problem(400, "invalid_request");
    s.call(Method::DELETE, "/v1/users/u/sessions?except=nope", None)
        .await
        .problem(400, "invalid_request");
    s.call(
        Method::DELETE,
        "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA?reason=Not%20Snake",
        None,
    )
    .await
    .problem(400, "invalid_request");
}

async fn submitted_values_are_not_echoed_in_errors() {
    let s = Server::start();
    let secret = "sdt_THIS_LOOKS_LIKE_A_SECRET_TOKEN_VALUE_xxxxxx";
    let r = s
        .post(
            "/v1/sessions",
            json!({"user_id": "u", "remember_me": secret}),
        )
        .await;
    r.problem(400, "invalid_request");
    assert!(!r.text.contains(secret), "{}", r.text);
    let r = s
        .post("/v1/sessions/verify", json!({"token": secret}))
        .await;
    r.problem(401, "session_unknown");
    assert!(!r.text.contains(secret));
}

async fn oversized_bodies_are_413() {
    let s = Server::start();
    let big = "x".repeat(70 * 1024);
    s.post(
        "/v1/sessions",
        json!({"user_id": "u", "data": {"blob": big}}),
    )
    .await
    .problem(413, "payload_too_large");
    // Session data has its own, smaller limit (16 KiB by default).
    let data = "y".repeat(20 * 1024);
    s.post(
        "/v1/sessions",
        json!({"user_id": "u", "data": {"blob": data}}),
    )
    .await
    .problem(413, "data_too_large");
    let (_, handle, _) = s.login("u").await;
    s.call(
        Method::PATCH,
        &format!("/v1/sessions/{handle}"),
        Some(json!({"data": {"blob": data}})),
    )
    .await
    .problem(413, "data_too_large");
}

async fn session_codes_unknown_revoked_not_active_not_found() {
    let s = Server::start();
    s.verify("sdt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await
        .problem(401, "session_unknown");
    s.verify("garbage").await.problem(401, "session_unknown");
    s.post("/v1/sessions/rotate", json!({"token": "garbage"}))
        .await
        .problem(401, "session_unknown");
    s.post("/v1/sessions/logout", json!({"token": "garbage"}))
        .await
        .problem(401, "session_unknown");
    s.post(
        "/v1/sessions/reauthenticate",
        json!({"token": "garbage", "auth": {"aal": 2}}),
    )
    .await
    .problem(401, "session_unknown");

    let (token, handle, _) = s.login("codes").await;
    s.call(Method::DELETE, &format!("/v1/sessions/{handle}"), None)
        .await;
    s.verify(&token).await.problem(401, "session_revoked");
    s.post("/v1/sessions/rotate", json!({"token": token}))
        .await
        .problem(401, "session_revoked");
    s.post(
        "/v1/sessions/reauthenticate",
        json!({"token": token, "auth": {"aal": 2}}),
    )
    .await
    .problem(401, "session_revoked");
    s.call(
        Method::PATCH,
        &format!("/v1/sessions/{handle}"),
        Some(json!({"data": {"a": 1}})),
    )
    .await
    .problem(409, "session_not_active");

    s.get("/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA")
        .await
        .problem(404, "not_found");
    s.get("/v1/sessions/not-a-handle")
        .await
        .problem(404, "not_found");
    s.call(
        Method::DELETE,
        "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA",
        None,
    )
    .await
    .problem(404, "not_found");
    s.call(
        Method::PATCH,
        "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA",
        Some(json!({"data": {}})),
    )
    .await
    .problem(404, "not_found");
    s.get("/v1/nothing-here").await.problem(404, "not_found");
    s.call(Method::PUT, "/v1/sessions/verify", Some(json!({})))
        .await
        .problem(405, "method_not_allowed");
}

async fn reauthentication_required_by_auth_age() {
    let s = Server::start();
    // An hour before the server's now: within the session's absolute timeout, older than the
    // 300 s asked below.
    let first = s.post("/v1/sessions", json!({"user_id": "clock"})).await;
    let server_now = first.body["session"]["created_at"].as_str().unwrap();
    let an_hour_ago = (chrono::DateTime::parse_from_rfc3339(server_now).unwrap()
        - chrono::Duration::hours(1))
    .to_rfc3339();
    let r = s
        .post("/v1/sessions", json!({"user_id": "old-auth", "auth": {"method": "password", "authenticated_at": an_hour_ago}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let token = r.body["token"].as_str().unwrap();
    s.post(
        "/v1/sessions/verify",
        json!({"token": token, "require": {"max_auth_age_s": 300}}),
    )
    .await
    .problem(403, "reauthentication_required");
    assert_eq!(s.verify(token).await.status, StatusCode::OK);
}

async fn invalid_policies_are_refused() {
    let s = Server::start();
    let bad = [
        json!({"idle_timeout_s": 0}),
        json!({"idle_timeout_s": 100, "absolute_timeout_s": 50}),
        json!({"max_sessions_per_user": 0}),
        json!({"on_limit": "explode"}),
        json!({"cookie": {"name": "__Host-x", "domain": "example.com"}}),
        json!({"cookie": {"name": "sid", "secure": false, "same_site": "None"}}),
        json!({"idle_timeout": 60}),
        json!({"idle_timeout_s": -1}),
    ];
    for b in bad {
        s.call(Method::PUT, "/v1/tenants/t/policy", Some(b.clone()))
            .await
            .problem(400, "invalid_policy");
    }
    // A document must be an object: serde would read a struct from an array by position.
    s.call(Method::PUT, "/v1/tenants/t/policy", Some(json!([1])))
        .await
        .problem(400, "invalid_request");
    s.call(
        Method::PUT,
        "/v1/tenants/bad%20tenant/policy",
        Some(json!({})),
    )
    .await
    .problem(400, "invalid_request");
    // Nothing was stored.
    assert_eq!(
        s.get("/v1/tenants/t/policy").await.body["idle_timeout_s"],
        1800
    );
}

async fn strict_policy_and_auth_input_name_the_field() {
    let s = Server::start();
    let ten_years_ago = "2016-01-01T00:00:00Z";
    let policies = [
        (
            json!({"remember_me_absolute_timeout_s": 315_360_000}),
            "remember_me_absolute_timeout_s",
        ),
        (
            json!({"cookie": {"name": "sid", "domain": "com"}}),
            "cookie.domain",
        ),
        (
            json!({"cookie": {"name": "sid", "domain": "co.uk"}}),
            "cookie.domain",
        ),
        (
            json!({"cookie": {"name": "sid", "domain": ".example.com"}}),
            "cookie.domain",
        ),
        (
            json!({"cookie": {"name": "sid", "domain": "192.168.1.1"}}),
            "cookie.domain",
        ),
        (
            json!({"cookie": {"name": "sid", "domain": "example.com", "secure": false}}),
            "cookie.domain",
        ),
        (
            json!({"aal_timeouts": {"aal2": {"idle_timeout_s": 0, "absolute_timeout_s": 60}}}),
            "aal_timeouts.aal2.idle_timeout_s",
        ),
    ];
    for (doc, field) in policies {
        let r = s
            .call(Method::PUT, "/v1/tenants/t/policy", Some(doc.clone()))
            .await;
        r.problem(400, "invalid_policy");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{doc}: {detail}");
        for v in ["co.uk", "example.com", "192.168.1.1"] {
            assert!(!detail.contains(v), "{doc} echoed in {detail}");
        }
    }
    // The per-assurance-level limits round-trip.
    let doc = json!({"aal_timeouts": {
        "aal2": {"idle_timeout_s": 600, "absolute_timeout_s": 3600},
        "aal3": {"idle_timeout_s": 300, "absolute_timeout_s": 3600}
    }, "require_auth": true});
    let put = s
        .call(Method::PUT, "/v1/tenants/t/policy", Some(doc.clone()))
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    let got = s.get("/v1/tenants/t/policy").await.body;
    assert_eq!(got["aal_timeouts"], doc["aal_timeouts"]);
    assert_eq!(got["require_auth"], true);

    let creates = [
        (
            json!({"user_id": "u", "auth": {"method": "webauthn", "authenticated_at": ten_years_ago}}),
            "auth.authenticated_at",
        ),
        (
            json!({"user_id": "u", "auth": {"method": "password", "aal": 3}}),
            "auth.aal",
        ),
        (json!({"user_id": "u", "tenant": "t"}), "auth.method"),
    ];
    for (body, field) in creates {
        let r = s.post("/v1/sessions", body.clone()).await;
        r.problem(400, "invalid_request");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{body}: {detail}");
        assert!(!detail.contains("2016"), "{detail}");
    }
    let ok = s
        .post(
            "/v1/sessions",
            json!({"user_id": "u", "tenant": "t", "auth": {"method": "webauthn", "aal": 2}}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
}

crate::on_every_store!(
    missing_or_wrong_api_key_is_unauthorized_everywhere_but_health,
    bad_input_is_a_4xx_problem_never_a_5xx,
    submitted_values_are_not_echoed_in_errors,
    oversized_bodies_are_413,
    session_codes_unknown_revoked_not_active_not_found,
    reauthentication_required_by_auth_age,
    invalid_policies_are_refused,
    strict_policy_and_auth_input_name_the_field,
);
