//! Token mode over HTTP, on every store: access tokens verified by the server and locally by
//! the SDK, refresh rotation with its grace period, theft detection, every kind of forged or
//! stale access token refused, and key rotation by `sessiond keys rotate` while nodes serve.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessiond_client::{AccessTokenVerifier, VerifyError};

use crate::harness::{Resp, Server};

const ISSUER: &str = "https://auth.e2e.example";
const AUDIENCE: &str = "e2e-api";

/// A server whose keyring reloads every second.
fn start() -> Server {
    Server::start_with(&[("SESSIOND_JWT__RELOAD_INTERVAL_S", "1")])
}

async fn token_mode(s: &Server, ttl: u64, grace: u64) {
    let r = s
        .call(
            Method::PUT,
            "/v1/tenants/default/policy",
            Some(json!({"tokens": {
                "access_token_ttl_s": ttl,
                "refresh_reuse_grace_s": grace,
                "issuer": ISSUER,
                "audience": AUDIENCE,
            }})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["tokens"]["refresh_token"], true,
        "defaults filled in"
    );
}

struct Login {
    access: String,
    refresh: String,
    handle: String,
}

async fn login(s: &Server, user: &str) -> Login {
    let r = s
        .post(
            "/v1/sessions",
            json!({"user_id": user, "access_token_claims": {"plan": "pro"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert!(r.body["access_token_expires_at"].is_string());
    Login {
        access: r.body["access_token"].as_str().unwrap().to_owned(),
        refresh: r.body["refresh_token"].as_str().unwrap().to_owned(),
        handle: r.body["session"]["handle"].as_str().unwrap().to_owned(),
    }
}

async fn verify_access(s: &Server, jwt: &str) -> Resp {
    s.post("/v1/sessions/verify", json!({"access_token": jwt}))
        .await
}

async fn refresh(s: &Server, token: &str) -> Resp {
    s.post("/v1/tokens/refresh", json!({"refresh_token": token}))
        .await
}

fn sdk(s: &Server) -> AccessTokenVerifier {
    AccessTokenVerifier::builder(
        &format!("{}/.well-known/jwks.json", s.base),
        ISSUER,
        AUDIENCE,
    )
    .min_refresh_interval(Duration::from_millis(100))
    .leeway(Duration::ZERO)
    .build()
    .unwrap()
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn kid(jwt: &str) -> String {
    jsonwebtoken::decode_header(jwt).unwrap().kid.unwrap()
}

async fn access_and_refresh_tokens_with_rotation_and_theft_detection() {
    let s = start();
    // Without token mode, create hands out neither.
    let (_, _, plain) = s.login("tm-plain").await;
    assert!(plain.get("access_token").is_none() && plain.get("refresh_token").is_none());

    token_mode(&s, 60, 1).await;
    let a = login(&s, "tm-alice").await;
    assert!(a.refresh.starts_with("sdr_"));
    let c = claims(&a.access);
    assert_eq!(c["sub"], "tm-alice");
    assert_eq!(c["sid"], a.handle.as_str());
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["aud"], AUDIENCE);
    assert_eq!(c["plan"], "pro");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 60);
    let h = jsonwebtoken::decode_header(&a.access).unwrap();
    assert_eq!(h.alg, Algorithm::EdDSA);

    // The server verifies it, with the session's state.
    let v = verify_access(&s, &a.access).await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.text);
    assert_eq!(v.body["session"]["handle"], a.handle.as_str());

    // The JWKS is public and cacheable; the SDK verifies locally with it.
    let jwks = s
        .raw(Method::GET, "/.well-known/jwks.json")
        .send()
        .await
        .unwrap();
    assert_eq!(jwks.status(), StatusCode::OK);
    assert_eq!(
        jwks.headers().get("cache-control").unwrap(),
        "public, max-age=300"
    );
    let set: Value = jwks.json().await.unwrap();
    assert_eq!(set["keys"][0]["kid"], kid(&a.access).as_str());
    assert_eq!(set["keys"][0]["kty"], "OKP");
    let local = sdk(&s).verify(&a.access).await.unwrap();
    assert_eq!(local.sid, a.handle);
    assert_eq!(local.extra["plan"], "pro");

    // Refresh: a new pair; within the grace period the spent token returns the same pair.
    let r1 = refresh(&s, &a.refresh).await;
    assert_eq!(r1.status, StatusCode::OK, "{}", r1.text);
    assert_eq!(r1.header("cache-control"), Some("no-store"));
    let new_refresh = r1.body["refresh_token"].as_str().unwrap().to_owned();
    let new_access = r1.body["access_token"].as_str().unwrap().to_owned();
    assert_ne!(new_refresh, a.refresh);
    let again = refresh(&s, &a.refresh).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.body["refresh_token"], new_refresh.as_str());
    assert_eq!(again.body["access_token"], new_access.as_str());
    assert_eq!(verify_access(&s, &new_access).await.status, StatusCode::OK);

    // Past the grace period, the spent token is theft: the session dies for both parties.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    refresh(&s, &a.refresh).await.problem(401, "token_reused");
    let got = s.get(&format!("/v1/sessions/{}", a.handle)).await;
    assert_eq!(got.body["session"]["status"], "revoked");
    assert_eq!(got.body["session"]["revoked_reason"], "theft_detected");
    refresh(&s, &new_refresh)
        .await
        .problem(401, "session_revoked");
    verify_access(&s, &new_access)
        .await
        .problem(401, "session_revoked");

    // Ended sessions answer their code; garbage is unknown.
    let b = login(&s, "tm-bob").await;
    let del = s
        .call(Method::DELETE, &format!("/v1/sessions/{}", b.handle), None)
        .await;
    assert_eq!(del.status, StatusCode::OK);
    refresh(&s, &b.refresh)
        .await
        .problem(401, "session_revoked");
    refresh(&s, "sdr_nonsense")
        .await
        .problem(401, "session_unknown");
    refresh(&s, "").await.problem(401, "session_unknown");
    s.post("/v1/tokens/refresh", json!({"refresh_token": 1}))
        .await
        .problem(400, "invalid_request");

    // Reserved claims are refused; exactly one token per verify.
    s.post(
        "/v1/sessions",
        json!({"user_id": "tm-carol", "access_token_claims": {"sub": "root"}}),
    )
    .await
    .problem(400, "invalid_request");
    s.post(
        "/v1/sessions/verify",
        json!({"token": "sdt_x", "access_token": new_access}),
    )
    .await
    .problem(400, "invalid_request");
    s.post("/v1/sessions/verify", json!({}))
        .await
        .problem(400, "invalid_request");

    // The theft is recorded.
    let mut s = s;
    assert!(s.sigterm());
    let log = s.log_text();
    assert!(
        log.lines().any(|l| l.contains("session.revoked")
            && l.contains("theft_detected")
            && l.contains(&a.handle)),
        "the theft_detected revocation is in the audit log"
    );
    assert!(log.contains("session.refreshed"));
}

fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

async fn forged_and_stale_access_tokens_are_refused() {
    let s = start();
    // Lifetimes long enough that no check below meets an expiry on a slow machine; the expiry
    // itself is checked at the end with a one-second lifetime.
    token_mode(&s, 300, 0).await;
    let a = login(&s, "tm-dave").await;
    let parts: Vec<&str> = a.access.split('.').collect();
    let the_kid = kid(&a.access);
    let verifier = sdk(&s);
    assert!(verifier.verify(&a.access).await.is_ok());

    // alg: none.
    let none = format!(
        "{}.{}.",
        b64json(&json!({"alg": "none", "typ": "JWT", "kid": the_kid})),
        parts[1]
    );
    verify_access(&s, &none).await.problem(401, "token_invalid");
    assert!(verifier.verify(&none).await.is_err());

    // HS256 signed with the public key from the JWKS (raw bytes and text).
    let set: Value = s.get("/.well-known/jwks.json").await.body;
    let x = set["keys"][0]["x"].as_str().unwrap().to_owned();
    for secret in [URL_SAFE_NO_PAD.decode(&x).unwrap(), x.clone().into_bytes()] {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(the_kid.clone());
        let forged =
            jsonwebtoken::encode(&h, &claims(&a.access), &EncodingKey::from_secret(&secret))
                .unwrap();
        verify_access(&s, &forged)
            .await
            .problem(401, "token_invalid");
        assert!(verifier.verify(&forged).await.is_err());
    }

    // Signed by a key the server does not have, under a new kid and under the real one.
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    for k in ["not-a-key-of-ours", the_kid.as_str()] {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(k.to_owned());
        let forged = jsonwebtoken::encode(
            &h,
            &claims(&a.access),
            &EncodingKey::from_ed_der(pkcs8.as_ref()),
        )
        .unwrap();
        verify_access(&s, &forged)
            .await
            .problem(401, "token_invalid");
        assert!(verifier.verify(&forged).await.is_err());
    }

    // A tampered payload under the real signature.
    let mut c = claims(&a.access);
    c["sub"] = json!("tm-mallory");
    let tampered = format!("{}.{}.{}", parts[0], b64json(&c), parts[2]);
    verify_access(&s, &tampered)
        .await
        .problem(401, "token_invalid");
    assert_eq!(
        verifier.verify(&tampered).await.unwrap_err(),
        VerifyError::Signature
    );

    // A key URL in the header.
    let jku = format!(
        "{}.{}.{}",
        b64json(
            &json!({"alg": "EdDSA", "typ": "JWT", "kid": the_kid, "jku": "https://evil.example/jwks"})
        ),
        parts[1],
        parts[2]
    );
    verify_access(&s, &jku).await.problem(401, "token_invalid");
    for junk in ["", "a.b.c", "not a token"] {
        verify_access(&s, junk).await.problem(401, "token_invalid");
    }

    // Wrong issuer, then wrong audience: the policy changed after issue.
    let put = |iss: &str, aud: &str| json!({"tokens": {"access_token_ttl_s": 300, "issuer": iss, "audience": aud}});
    let b = login(&s, "tm-erin").await;
    s.call(
        Method::PUT,
        "/v1/tenants/default/policy",
        Some(put("https://elsewhere", AUDIENCE)),
    )
    .await;
    verify_access(&s, &b.access)
        .await
        .problem(401, "token_invalid");
    s.call(
        Method::PUT,
        "/v1/tenants/default/policy",
        Some(put(ISSUER, "another-api")),
    )
    .await;
    verify_access(&s, &b.access)
        .await
        .problem(401, "token_invalid");
    s.call(
        Method::PUT,
        "/v1/tenants/default/policy",
        Some(put(ISSUER, AUDIENCE)),
    )
    .await;
    assert_eq!(verify_access(&s, &b.access).await.status, StatusCode::OK);

    // Expired after its one-second lifetime, while the session lives on.
    token_mode(&s, 1, 0).await;
    let b = login(&s, "tm-erin-2").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    verify_access(&s, &b.access)
        .await
        .problem(401, "token_expired");
    assert_eq!(
        verifier.verify(&b.access).await.unwrap_err(),
        VerifyError::Expired
    );
    let r = refresh(&s, &b.refresh).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // A valid token of a revoked session is refused at the server at once (the SDK accepts it
    // until it expires: that is what asking the server is for).
    token_mode(&s, 300, 0).await;
    let c = login(&s, "tm-fay").await;
    s.call(Method::DELETE, &format!("/v1/sessions/{}", c.handle), None)
        .await;
    verify_access(&s, &c.access)
        .await
        .problem(401, "session_revoked");
}

async fn rotated_keys_publish_first_and_old_tokens_verify_until_they_expire() {
    let s = start();
    token_mode(&s, 300, 10).await;
    let before = login(&s, "tm-gus").await;
    let old_kid = kid(&before.access);
    let verifier = sdk(&s);
    assert!(verifier.verify(&before.access).await.is_ok());

    let (ok, out) = s.cli(&[
        "keys",
        "rotate",
        "--algorithm",
        "ES256",
        "--activate-after-s",
        "2",
        "--retire-after-s",
        "300",
    ]);
    assert!(ok, "keys rotate failed: {out}");
    let new_kid = out.split_whitespace().nth(2).unwrap().to_owned();
    assert_ne!(new_kid, old_kid);

    // Within a reload interval the JWKS shows both keys, before the new one signs.
    let mut kids = Vec::new();
    for _ in 0..40 {
        let set = s.get("/.well-known/jwks.json").await.body;
        kids = set["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>();
        if kids.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        kids.contains(&old_kid) && kids.contains(&new_kid),
        "{kids:?}"
    );

    // Once it activates, new tokens carry the new key; old and new verify, at the server and
    // in the SDK (which learns the new kid by refetching once).
    let mut after = login(&s, "tm-gus").await;
    for _ in 0..40 {
        if kid(&after.access) == new_kid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = login(&s, "tm-gus").await;
    }
    assert_eq!(kid(&after.access), new_kid);
    assert_eq!(
        jsonwebtoken::decode_header(&after.access).unwrap().alg,
        Algorithm::ES256
    );
    assert_eq!(
        verify_access(&s, &before.access).await.status,
        StatusCode::OK
    );
    assert_eq!(
        verify_access(&s, &after.access).await.status,
        StatusCode::OK
    );
    assert!(verifier.verify(&before.access).await.is_ok());
    assert!(verifier.verify(&after.access).await.is_ok());

    let (ok, listing) = s.cli(&["keys", "list"]);
    assert!(ok);
    assert!(
        listing.contains(&old_kid) && listing.contains(&new_kid),
        "{listing}"
    );
    assert!(listing.contains("signing"));
}

async fn nodes_on_one_store_share_the_keyring() {
    if matches!(
        crate::harness::BACKEND.try_with(|b| *b),
        Ok(crate::harness::Backend::Embedded)
    ) {
        // One process owns an embedded store: there is no second node to share it.
        return;
    }
    let a = start();
    let b = a.start_sharing();
    token_mode(&a, 300, 10).await;
    let t = login(&a, "tm-hal").await;
    assert_eq!(verify_access(&b, &t.access).await.status, StatusCode::OK);
    let r = refresh(&b, &t.refresh).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let on_b = r.body["access_token"].as_str().unwrap();
    assert_eq!(verify_access(&a, on_b).await.status, StatusCode::OK);
    assert_eq!(
        a.get("/.well-known/jwks.json").await.body,
        b.get("/.well-known/jwks.json").await.body
    );
    // The spent token presented to the other node after the grace period is theft there too.
    let grace_over =
        json!({"tokens": {"refresh_reuse_grace_s": 0, "issuer": ISSUER, "audience": AUDIENCE}});
    a.call(Method::PUT, "/v1/tenants/default/policy", Some(grace_over))
        .await;
    refresh(&a, &t.refresh).await.problem(401, "token_reused");
    verify_access(&b, on_b)
        .await
        .problem(401, "session_revoked");
}

/// Rotate and reauthenticate answer a new pair; the old refresh token no longer refreshes and
/// old access tokens no longer verify at the server (the SDK's local check cannot know).
async fn rotate_and_reauthenticate_retire_the_old_pair() {
    let s = start();
    token_mode(&s, 60, 5).await;
    for step_up in [false, true] {
        let r = s
            .post(
                "/v1/sessions",
                json!({"user_id": "tm-rot", "access_token_claims": {"plan": "pro"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let token = r.body["token"].as_str().unwrap().to_owned();
        let old_access = r.body["access_token"].as_str().unwrap().to_owned();
        let old_refresh = r.body["refresh_token"].as_str().unwrap().to_owned();
        let rotated = if step_up {
            s.post(
                "/v1/sessions/reauthenticate",
                json!({"token": token, "auth": {"method": "webauthn", "aal": 2}}),
            )
            .await
        } else {
            s.post("/v1/sessions/rotate", json!({"token": token})).await
        };
        assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text);
        assert!(rotated.body["access_token_expires_at"].is_string());
        let new_access = rotated.body["access_token"].as_str().unwrap().to_owned();
        let new_refresh = rotated.body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(new_refresh, old_refresh);
        assert_eq!(claims(&new_access)["plan"], "pro");

        verify_access(&s, &old_access)
            .await
            .problem(401, "token_invalid");
        refresh(&s, &old_refresh)
            .await
            .problem(401, "session_unknown");
        let v = verify_access(&s, &new_access).await;
        assert_eq!(v.status, StatusCode::OK, "{}", v.text);
        assert_eq!(
            v.body["session"]["auth"]["aal"],
            if step_up { 2 } else { 1 }
        );
        let next = refresh(&s, &new_refresh).await;
        assert_eq!(next.status, StatusCode::OK, "{}", next.text);
        let next_access = next.body["access_token"].as_str().unwrap();
        assert_eq!(verify_access(&s, next_access).await.status, StatusCode::OK);
    }
}

crate::on_every_store!(
    rotate_and_reauthenticate_retire_the_old_pair,
    access_and_refresh_tokens_with_rotation_and_theft_detection,
    forged_and_stale_access_tokens_are_refused,
    rotated_keys_publish_first_and_old_tokens_verify_until_they_expire,
    nodes_on_one_store_share_the_keyring,
);
