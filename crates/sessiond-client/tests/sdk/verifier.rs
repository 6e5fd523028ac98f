//! `AccessTokenVerifier` against a local JWKS server.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

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
        AccessTokenVerifier::builder("http://x/jwks", "", AUDIENCE)
            .build()
            .is_err()
    );
    assert!(
        AccessTokenVerifier::builder("http://x/jwks", ISSUER, "")
            .build()
            .is_err()
    );
    let v = AccessTokenVerifier::builder("http://x/jwks", ISSUER, AUDIENCE)
        .build()
        .unwrap();
    assert_eq!(v.issuer(), ISSUER);
    assert_eq!(v.audience(), AUDIENCE);
    assert!(format!("{v:?}").contains("http://x/jwks"));
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
