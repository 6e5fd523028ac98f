//! `AccessTokenVerifier` against a local JWKS server.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use sessiond_client::{AccessTokenVerifier, VerifyError};
use tokio::task::JoinSet;

use crate::support::*;

const NOW: i64 = 1_800_000_000;

fn verifier(server: &JwksServer, interval: Duration) -> AccessTokenVerifier {
    AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .min_refresh_interval(interval)
        .clock(|| NOW)
        .build()
        .unwrap()
}

/// The error of `token`, checking that it does not quote the token.
async fn refused(v: &AccessTokenVerifier, token: &str) -> VerifyError {
    let err = v.verify(token).await.unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        for part in token.split('.').filter(|p| p.len() > 4) {
            assert!(!text.contains(part), "error {text:?} quotes the token");
        }
    }
    err
}

#[tokio::test]
async fn valid_eddsa_and_es256_tokens_verify_with_their_claims() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let server = JwksServer::start(&[&ed, &ec]).await;
    let v = verifier(&server, Duration::from_secs(60));

    for key in [&ed, &ec] {
        let claims = v.verify(&sign(key, &claims(NOW))).await.unwrap();
        assert_eq!(claims.sub, "u-42");
        assert_eq!(claims.sid, "ses_AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(claims.aal, 2);
        assert_eq!(claims.exp, NOW + 300);
        assert_eq!(claims.extra.get("role"), Some(&json!("admin")));
        assert!(!claims.extra.contains_key("iss"));
    }
    assert_eq!(
        server.fetches(),
        1,
        "one fetch fills the cache for both keys"
    );
    assert_eq!(v.cached_key_count(), 2);

    // The hot path uses the cache only.
    let claims = v.verify_cached(&sign(&ec, &claims(NOW))).unwrap();
    assert_eq!(claims.tenant, "default");
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn alg_none_is_refused() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let payload = b64(claims(NOW).to_string());
    for alg in ["none", "None", "NONE"] {
        let header = b64(json!({"alg": alg, "typ": "JWT", "kid": "ed-1"}).to_string());
        for signature in ["", "c2lnbmF0dXJl"] {
            let token = format!("{header}.{payload}.{signature}");
            assert!(matches!(
                refused(&v, &token).await,
                VerifyError::Algorithm(_)
            ));
        }
    }
    assert_eq!(server.fetches(), 0, "a refused header costs no fetch");
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    v.refresh_keys().await.unwrap();
    let mut header = header(&ed);
    header.alg = Algorithm::HS256;
    for secret in [ed.public.as_slice(), ed.jwk.x.as_bytes()] {
        let token = sign_with(&header, &EncodingKey::from_secret(secret), &claims(NOW));
        assert!(matches!(
            refused(&v, &token).await,
            VerifyError::Algorithm(_)
        ));
        assert!(matches!(
            v.verify_cached(&token),
            Err(VerifyError::Algorithm(_))
        ));
    }
}

#[tokio::test]
async fn an_alg_other_than_the_keys_is_refused() {
    // An ES256 token whose kid names the Ed25519 key.
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let server = JwksServer::start(&[&ed, &ec]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let mut header = header(&ec);
    header.kid = Some("ed-1".into());
    let token = sign_with(&header, &ec.encoding, &claims(NOW));
    assert!(matches!(
        refused(&v, &token).await,
        VerifyError::Algorithm(_)
    ));
}

#[tokio::test]
async fn a_key_named_by_the_token_is_refused() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let mut jku = header(&ed);
    jku.jku = Some("http://attacker.invalid/jwks.json".into());
    let mut x5u = header(&ed);
    x5u.x5u = Some("http://attacker.invalid/cert.pem".into());
    let mut crit = header(&ed);
    crit.crit = Some(vec!["exp".into()]);
    let mut x5c = header(&ed);
    x5c.x5c = Some(vec!["MIIB".into()]);
    for header in [jku, x5u, crit, x5c] {
        let token = sign_with(&header, &ed.encoding, &claims(NOW));
        assert!(matches!(
            refused(&v, &token).await,
            VerifyError::Algorithm(_)
        ));
    }
    assert_eq!(server.fetches(), 0);
}

#[tokio::test]
async fn unknown_kid_is_refused_after_one_fetch() {
    let ed = ed25519("ed-1");
    let stranger = ed25519("not-published");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let token = sign(&stranger, &claims(NOW));
    assert_eq!(refused(&v, &token).await, VerifyError::UnknownKey);
    assert_eq!(server.fetches(), 1);
    assert_eq!(refused(&v, &token).await, VerifyError::UnknownKey);
    assert_eq!(server.fetches(), 1, "no second fetch within the interval");
}

#[tokio::test]
async fn missing_kid_is_malformed() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let mut header = header(&ed);
    header.kid = None;
    let token = sign_with(&header, &ed.encoding, &claims(NOW));
    assert!(matches!(
        refused(&v, &token).await,
        VerifyError::Malformed(_)
    ));
    for garbage in ["", "abc", "a.b.c", "a.b.c.d.e"] {
        assert!(matches!(
            v.verify(garbage).await,
            Err(VerifyError::Malformed(_))
        ));
    }
}

#[tokio::test]
async fn expiry_and_not_before_follow_the_clock_with_leeway() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let now = Arc::new(AtomicI64::new(NOW));
    let clock = now.clone();
    let v = AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .leeway(Duration::from_secs(5))
        .clock(move || clock.load(Ordering::SeqCst))
        .build()
        .unwrap();
    let token = sign(&ed, &claims(NOW)); // nbf = NOW, exp = NOW + 300

    v.verify(&token).await.unwrap();
    now.store(NOW + 304, Ordering::SeqCst); // past exp, within the leeway
    v.verify(&token).await.unwrap();
    now.store(NOW + 305, Ordering::SeqCst);
    assert_eq!(refused(&v, &token).await, VerifyError::Expired);
    assert_eq!(v.verify_cached(&token), Err(VerifyError::Expired));

    now.store(NOW - 5, Ordering::SeqCst); // before nbf, within the leeway
    v.verify(&token).await.unwrap();
    now.store(NOW - 6, Ordering::SeqCst);
    assert_eq!(refused(&v, &token).await, VerifyError::NotYetValid);

    // verify_at ignores the clock.
    v.verify_at(&token, NOW + 10).await.unwrap();
    assert_eq!(
        v.verify_at(&token, NOW + 3600).await,
        Err(VerifyError::Expired)
    );
}

#[tokio::test]
async fn wrong_issuer_and_audience_are_refused() {
    let ec = p256("ec-1");
    let server = JwksServer::start(&[&ec]).await;
    let v = verifier(&server, Duration::from_secs(60));

    let mut c = claims(NOW);
    c["iss"] = json!("https://evil.example.test");
    assert_eq!(refused(&v, &sign(&ec, &c)).await, VerifyError::Issuer);

    let mut c = claims(NOW);
    c["aud"] = json!("another-app");
    assert_eq!(refused(&v, &sign(&ec, &c)).await, VerifyError::Audience);

    // An audience array is not a sessiond access token.
    let mut c = claims(NOW);
    c["aud"] = json!([AUDIENCE]);
    assert!(matches!(
        refused(&v, &sign(&ec, &c)).await,
        VerifyError::Malformed(_)
    ));
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let server = JwksServer::start(&[&ed, &ec]).await;
    let v = verifier(&server, Duration::from_secs(60));
    for key in [&ed, &ec] {
        let token = sign(key, &claims(NOW));
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = claims(NOW);
        c["sub"] = json!("admin");
        let tampered = format!("{}.{}.{}", parts[0], b64(c.to_string()), parts[2]);
        assert_eq!(refused(&v, &tampered).await, VerifyError::Signature);

        // A signature from another key with the same kid.
        let other = if key.alg == Algorithm::EdDSA {
            ed25519(&key.kid)
        } else {
            p256(&key.kid)
        };
        let forged = sign(&other, &claims(NOW));
        assert_eq!(refused(&v, &forged).await, VerifyError::Signature);
    }
}

#[tokio::test]
async fn a_new_kid_triggers_exactly_one_refetch() {
    let (old, new) = (ed25519("2026-01"), p256("2026-02"));
    let server = JwksServer::start(&[&old]).await;
    let v = verifier(&server, Duration::from_millis(50));
    v.verify(&sign(&old, &claims(NOW))).await.unwrap();
    assert_eq!(server.fetches(), 1);

    server.publish(&[&old, &new]);
    tokio::time::sleep(Duration::from_millis(80)).await;
    let claims_new = v.verify(&sign(&new, &claims(NOW))).await.unwrap();
    assert_eq!(claims_new.sub, "u-42");
    assert_eq!(server.fetches(), 2);

    // Both keys are cached now.
    v.verify(&sign(&new, &claims(NOW))).await.unwrap();
    v.verify(&sign(&old, &claims(NOW))).await.unwrap();
    assert_eq!(server.fetches(), 2);

    // A key dropped from the set stops verifying once the set is fetched again.
    server.publish(&[&new]);
    assert_eq!(v.refresh_keys().await.unwrap(), 1);
    assert_eq!(server.fetches(), 3);
    assert_eq!(
        v.verify_cached(&sign(&old, &claims(NOW))),
        Err(VerifyError::UnknownKey)
    );
}

async fn burst(v: &AccessTokenVerifier, signer: &TestKey, n: usize) {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let mut header = header(signer);
        header.kid = Some(random_kid());
        let token = sign_with(&header, &signer.encoding, &claims(NOW));
        let v = v.clone();
        tasks.spawn(async move { v.verify(&token).await });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap(), Err(VerifyError::UnknownKey));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_unknown_kids_costs_at_most_one_fetch() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;

    // Warm cache: the burst comes within the interval of the last fetch.
    let v = verifier(&server, Duration::from_secs(60));
    v.verify(&sign(&ed, &claims(NOW))).await.unwrap();
    assert_eq!(server.fetches(), 1);
    burst(&v, &ed, 100).await;
    assert_eq!(server.fetches(), 1);

    // Cold cache: the concurrent callers share one fetch.
    let cold = verifier(&server, Duration::from_secs(60));
    burst(&cold, &ed, 100).await;
    assert_eq!(server.fetches(), 2);
    // ... which did fill the cache.
    cold.verify_cached(&sign(&ed, &claims(NOW))).unwrap();
}

#[tokio::test]
async fn jwks_down_fails_unknown_kids_but_cached_keys_keep_verifying() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_millis(500));
    let cached = sign(&ed, &claims(NOW));
    v.verify(&cached).await.unwrap();

    server.set_down(true);
    server.publish(&[&ed, &ec]);
    tokio::time::sleep(Duration::from_millis(550)).await;
    let unknown = sign(&ec, &claims(NOW));
    assert!(matches!(refused(&v, &unknown).await, VerifyError::Jwks(_)));
    assert_eq!(server.fetches(), 2);
    // Within the interval the failure is remembered rather than retried.
    assert!(matches!(refused(&v, &unknown).await, VerifyError::Jwks(_)));
    assert_eq!(server.fetches(), 2);
    // The cached key is untouched by the failed fetch.
    v.verify(&cached).await.unwrap();
    v.verify_cached(&cached).unwrap();
    assert!(matches!(v.refresh_keys().await, Err(VerifyError::Jwks(_))));
    v.verify(&cached).await.unwrap();

    // Back up: the next fetch after the interval finds the new key.
    server.set_down(false);
    tokio::time::sleep(Duration::from_millis(550)).await;
    v.verify(&unknown).await.unwrap();

    // Nothing listening at all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    drop(listener);
    let nowhere = AccessTokenVerifier::builder(&url, ISSUER, AUDIENCE)
        .build()
        .unwrap();
    assert!(matches!(
        refused(&nowhere, &cached).await,
        VerifyError::Jwks(_)
    ));
}

#[tokio::test]
async fn verify_cached_never_fetches() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let token = sign(&ed, &claims(NOW));
    assert_eq!(v.verify_cached(&token), Err(VerifyError::UnknownKey));
    assert_eq!(server.fetches(), 0);
    assert_eq!(v.refresh_keys().await.unwrap(), 1);
    v.verify_cached(&token).unwrap();
}

#[tokio::test]
async fn foreign_and_broken_keys_in_the_set_are_skipped() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let server = JwksServer::start(&[]).await;
    let ed_jwk = serde_json::to_value(&ed.jwk).unwrap();
    let ec_jwk = serde_json::to_value(&ec.jwk).unwrap();
    let mut enc_key = ec_jwk.clone();
    enc_key["use"] = json!("enc");
    enc_key["kid"] = json!("enc-1");
    let mut mislabelled = ed_jwk.clone();
    mislabelled["alg"] = json!("ES256");
    mislabelled["kid"] = json!("bad-1");
    server.publish_raw(json!({"keys": [
        {"kty": "RSA", "n": "sXch", "e": "AQAB", "kid": "rsa-1", "alg": "RS256", "use": "sig"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac-1"},
        enc_key,
        mislabelled,
        ed_jwk,
        ec_jwk,
        "not an object",
    ]}));
    let v = verifier(&server, Duration::from_secs(60));
    assert_eq!(v.refresh_keys().await.unwrap(), 2);
    v.verify(&sign(&ed, &claims(NOW))).await.unwrap();
    v.verify(&sign(&ec, &claims(NOW))).await.unwrap();

    // Not a key set at all: a fetch error, the cache kept.
    server.publish_raw(Value::String("nope".into()));
    assert!(matches!(v.refresh_keys().await, Err(VerifyError::Jwks(_))));
    assert_eq!(v.cached_key_count(), 2);
}

#[tokio::test]
async fn builder_checks_its_arguments() {
    assert!(
        AccessTokenVerifier::builder("not a url", ISSUER, AUDIENCE)
            .build()
            .is_err()
    );
    assert!(
        AccessTokenVerifier::builder("ftp://x/jwks", ISSUER, AUDIENCE)
            .build()
            .is_err()
    );
    assert!(
        AccessTokenVerifier::builder("https://x/jwks", "", AUDIENCE)
            .build()
            .is_err()
    );
    assert!(
        AccessTokenVerifier::builder("https://x/jwks", ISSUER, "")
            .build()
            .is_err()
    );
    assert!(
        AccessTokenVerifier::builder("https://x/jwks", ISSUER, AUDIENCE)
            .tenant("")
            .build()
            .is_err()
    );
    // A key expiry shorter than the age at which keys are refreshed.
    assert!(
        AccessTokenVerifier::builder("https://x/jwks", ISSUER, AUDIENCE)
            .max_key_age(Duration::from_secs(600))
            .key_expiry(Duration::from_secs(300))
            .build()
            .is_err()
    );
    let v = AccessTokenVerifier::builder("https://x/jwks", ISSUER, AUDIENCE)
        .build()
        .unwrap();
    assert_eq!(v.issuer(), ISSUER);
    assert_eq!(v.audience(), AUDIENCE);
    assert_eq!(v.tenant(), None);
    assert!(format!("{v:?}").contains("https://x/jwks"));
}

#[test]
fn an_http_jwks_url_must_name_a_loopback_host() {
    for url in [
        "http://x/jwks",
        "http://sessiond.internal:8080/.well-known/jwks.json",
        "http://10.0.0.1/jwks",
        "http://[::2]/jwks",
        "http://[::ffff:127.0.0.1]/jwks",
        "http://127.0.0.1.example.test/jwks",
        "http://localhost.example.test/jwks",
        "http://0.0.0.0/jwks",
    ] {
        let err = AccessTokenVerifier::builder(url, ISSUER, AUDIENCE)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{url}: {err}");
    }
    for url in [
        "https://x/jwks",
        "https://10.0.0.1/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://127.1.2.3/jwks",
        "http://localhost:8080/jwks",
        "http://LOCALHOST/jwks",
        "http://[::1]:8080/jwks",
    ] {
        AccessTokenVerifier::builder(url, ISSUER, AUDIENCE)
            .build()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[tokio::test]
async fn a_redirecting_jwks_endpoint_is_refused() {
    let ed = ed25519("ed-1");
    let keys = JwksServer::start(&[&ed]).await;
    let token = sign(&ed, &claims(NOW));
    for status in [
        StatusCode::MOVED_PERMANENTLY,
        StatusCode::FOUND,
        StatusCode::TEMPORARY_REDIRECT,
        StatusCode::PERMANENT_REDIRECT,
    ] {
        let (base, hits) = redirector(status, &keys.base).await;
        let v = AccessTokenVerifier::builder(
            &format!("{base}/.well-known/jwks.json"),
            ISSUER,
            AUDIENCE,
        )
        .clock(|| NOW)
        .build()
        .unwrap();
        match refused(&v, &token).await {
            VerifyError::Jwks(reason) => assert!(reason.contains("redirect"), "{reason}"),
            other => panic!("{status}: {other:?}"),
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(keys.fetches(), 0, "{status} was followed");
        assert_eq!(v.cached_key_count(), 0);
    }

    // A client of the application's that follows redirects: the keys it brings back from
    // elsewhere are refused all the same.
    let (base, _) = redirector(StatusCode::FOUND, &keys.base).await;
    let v =
        AccessTokenVerifier::builder(&format!("{base}/.well-known/jwks.json"), ISSUER, AUDIENCE)
            .http_client(reqwest::Client::new())
            .clock(|| NOW)
            .build()
            .unwrap();
    assert!(matches!(refused(&v, &token).await, VerifyError::Jwks(_)));
    assert_eq!(keys.fetches(), 1);
    assert_eq!(v.cached_key_count(), 0);
}

#[tokio::test]
async fn cached_keys_stop_verifying_past_the_key_expiry_while_the_jwks_is_unreachable() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .min_refresh_interval(Duration::from_millis(10))
        .max_key_age(Duration::from_millis(100))
        .key_expiry(Duration::from_millis(500))
        .clock(|| NOW)
        .build()
        .unwrap();
    let token = sign(&ed, &claims(NOW));
    v.verify(&token).await.unwrap();

    // The endpoint is blocked: the keys age past the expiry and nothing refreshes them.
    server.set_down(true);
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert!(matches!(
        refused(&v, &token).await,
        VerifyError::KeysExpired(_)
    ));
    assert!(matches!(
        v.verify_cached(&token),
        Err(VerifyError::KeysExpired(_))
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(matches!(
        refused(&v, &token).await,
        VerifyError::KeysExpired(_)
    ));
    let fetches = server.fetches();
    assert!(fetches >= 3, "expired keys are fetched again: {fetches}");

    // Back up: the next verify after the minimum interval fetches fresh keys.
    server.set_down(false);
    tokio::time::sleep(Duration::from_millis(20)).await;
    v.verify(&token).await.unwrap();
    v.verify_cached(&token).unwrap();
}

#[tokio::test]
async fn a_key_set_without_usable_keys_keeps_the_cache() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = verifier(&server, Duration::from_secs(60));
    let token = sign(&ed, &claims(NOW));
    assert_eq!(v.refresh_keys().await.unwrap(), 1);

    server.publish(&[]);
    assert!(matches!(v.refresh_keys().await, Err(VerifyError::Jwks(_))));
    assert_eq!(v.cached_key_count(), 1);
    v.verify_cached(&token).unwrap();

    server.publish_raw(json!({"keys": [
        {"kty": "RSA", "n": "sXch", "e": "AQAB", "kid": "rsa-1", "alg": "RS256", "use": "sig"}
    ]}));
    assert!(matches!(v.refresh_keys().await, Err(VerifyError::Jwks(_))));
    assert_eq!(v.cached_key_count(), 1);
    v.verify(&token).await.unwrap();

    // A cold cache and an empty set: refused as a fetch failure.
    let cold = verifier(&server, Duration::from_secs(60));
    assert!(matches!(refused(&cold, &token).await, VerifyError::Jwks(_)));
}

/// `claims` signed by `key` under a header given as JSON.
fn sign_raw(key: &TestKey, header: &Value, claims: &Value) -> String {
    let message = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, key.alg).unwrap();
    format!("{message}.{signature}")
}

#[tokio::test]
async fn typ_is_at_jwt_or_jwt() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let server = JwksServer::start(&[&ed, &ec]).await;
    let v = verifier(&server, Duration::from_secs(60));
    for key in [&ed, &ec] {
        let alg = if key.alg == Algorithm::EdDSA {
            "EdDSA"
        } else {
            "ES256"
        };
        let with_typ = |typ: Value| json!({"alg": alg, "kid": key.kid, "typ": typ});
        for typ in ["at+jwt", "application/at+jwt", "AT+JWT", "JWT"] {
            let token = sign_raw(key, &with_typ(json!(typ)), &claims(NOW));
            v.verify(&token)
                .await
                .unwrap_or_else(|e| panic!("{typ}: {e}"));
        }
        // Absent, as before explicit typing.
        let token = sign_raw(key, &json!({"alg": alg, "kid": key.kid}), &claims(NOW));
        v.verify(&token).await.unwrap();
        for typ in [
            json!("logout+jwt"),
            json!("secevent+jwt"),
            json!("JOSE"),
            json!("at+jwt "),
            json!(""),
            json!(null),
            json!(1),
            json!(["at+jwt"]),
        ] {
            let token = sign_raw(key, &with_typ(typ.clone()), &claims(NOW));
            assert!(
                matches!(refused(&v, &token).await, VerifyError::Algorithm(_)),
                "{typ}"
            );
        }
    }
}

#[tokio::test]
async fn a_verifier_for_one_tenant_refuses_another_tenants_tokens() {
    // Two tenants sharing the signing key, the issuer and the audience.
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let for_a = AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .tenant("tenant-a")
        .clock(|| NOW)
        .build()
        .unwrap();
    assert_eq!(for_a.tenant(), Some("tenant-a"));
    let any = verifier(&server, Duration::from_secs(60));
    let mut a = claims(NOW);
    a["tenant"] = json!("tenant-a");
    let mut b = claims(NOW);
    b["tenant"] = json!("tenant-b");
    let (a, b) = (sign(&ed, &a), sign(&ed, &b));

    assert_eq!(for_a.verify(&a).await.unwrap().tenant, "tenant-a");
    assert_eq!(refused(&for_a, &b).await, VerifyError::Tenant);
    assert_eq!(for_a.verify_cached(&b), Err(VerifyError::Tenant));
    // Case matters: tenant ids are case-sensitive.
    let mut upper = claims(NOW);
    upper["tenant"] = json!("TENANT-A");
    assert_eq!(
        refused(&for_a, &sign(&ed, &upper)).await,
        VerifyError::Tenant
    );
    // Without a tenant set, both verify.
    any.verify(&a).await.unwrap();
    any.verify(&b).await.unwrap();
}

#[tokio::test]
async fn lifetime_and_issued_at_are_bounded() {
    let ed = ed25519("ed-1");
    let server = JwksServer::start(&[&ed]).await;
    let v = AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .leeway(Duration::from_secs(5))
        .clock(|| NOW)
        .build()
        .unwrap();
    let with = |iat: i64, exp: i64| {
        let mut c = claims(NOW);
        c["iat"] = json!(iat);
        c["exp"] = json!(exp);
        sign(&ed, &c)
    };
    // The longest lifetime the server issues, and one second more.
    v.verify(&with(NOW, NOW + 3600)).await.unwrap();
    assert_eq!(
        refused(&v, &with(NOW, NOW + 3601)).await,
        VerifyError::Lifetime
    );
    // A forged token valid for ten years.
    let decade = 10 * 365 * 86_400;
    assert_eq!(
        refused(&v, &with(NOW, NOW + decade)).await,
        VerifyError::Lifetime
    );
    assert_eq!(
        refused(&v, &with(NOW - decade, NOW + 60)).await,
        VerifyError::Lifetime
    );
    assert_eq!(
        refused(&v, &with(i64::MIN, NOW + 60)).await,
        VerifyError::Lifetime
    );
    // Expiring before it was issued.
    assert_eq!(
        refused(&v, &with(NOW + 5, NOW + 4)).await,
        VerifyError::Lifetime
    );

    // Issued in the future: within the leeway, then beyond it.
    v.verify(&with(NOW + 5, NOW + 300)).await.unwrap();
    assert_eq!(
        refused(&v, &with(NOW + 6, NOW + 300)).await,
        VerifyError::IssuedInFuture
    );
    assert_eq!(
        refused(&v, &with(i64::MAX, i64::MAX)).await,
        VerifyError::IssuedInFuture
    );

    // A shorter maximum.
    let strict = AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .max_token_lifetime(Duration::from_secs(60))
        .clock(|| NOW)
        .build()
        .unwrap();
    strict.verify(&with(NOW, NOW + 60)).await.unwrap();
    assert_eq!(
        refused(&strict, &with(NOW, NOW + 61)).await,
        VerifyError::Lifetime
    );
}

#[tokio::test]
async fn stale_keys_are_refreshed_in_the_background() {
    let (old, new) = (ed25519("old"), ed25519("new"));
    let server = JwksServer::start(&[&old]).await;
    let v = AccessTokenVerifier::builder(&server.url, ISSUER, AUDIENCE)
        .min_refresh_interval(Duration::from_millis(10))
        .max_key_age(Duration::from_millis(300))
        .clock(|| NOW)
        .build()
        .unwrap();
    let token = sign(&old, &claims(NOW));
    v.verify(&token).await.unwrap();
    v.verify(&token).await.unwrap();
    assert_eq!(server.fetches(), 1, "fresh keys are not refetched");

    // The server withdraws the old key.
    server.publish(&[&new]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The stale key still verifies this once, and a refresh starts in the background.
    v.verify(&token).await.unwrap();
    for _ in 0..100 {
        if v.verify_cached(&token).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(v.verify_cached(&token), Err(VerifyError::UnknownKey));
    assert_eq!(server.fetches(), 2);
    v.verify_cached(&sign(&new, &claims(NOW))).unwrap();
}
