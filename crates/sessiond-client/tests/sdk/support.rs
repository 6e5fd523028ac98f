//! Test support: signing keys made with aws-lc-rs, tokens signed with jsonwebtoken, and a local
//! JWKS server that counts its fetches and can be taken down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{Value, json};
use sessiond_client::api::Jwk;

pub const ISSUER: &str = "https://auth.example.test";
pub const AUDIENCE: &str = "test-app";

/// A signing key and its public JWK.
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
    /// The raw public key (32 bytes for Ed25519, 65 for P-256).
    pub public: Vec<u8>,
}

pub fn ed25519(kid: &str) -> TestKey {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(&public),
            y: None,
            kid: kid.to_owned(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        },
        public,
    }
}

pub fn p256(kid: &str) -> TestKey {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    assert_eq!(public.len(), 65);
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: URL_SAFE_NO_PAD.encode(&public[1..33]),
            y: Some(URL_SAFE_NO_PAD.encode(&public[33..])),
            kid: kid.to_owned(),
            alg: "ES256".into(),
            use_: "sig".into(),
        },
        public,
    }
}

/// The claims of a valid sessiond access token issued at `now`, with an application claim
/// `role: "admin"`.
pub fn claims(now: i64) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u-42",
        "sid": "ses_AAAAAAAAAAAAAAAAAAAAAA",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "auth_time": now - 60,
        "aal": 2,
        "tenant": "default",
        "jti": "jti-1",
        "role": "admin",
    })
}

/// A header `{"alg", "typ": "JWT", "kid"}` for `key`.
pub fn header(key: &TestKey) -> Header {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    header
}

pub fn sign(key: &TestKey, claims: &Value) -> String {
    jsonwebtoken::encode(&header(key), claims, &key.encoding).unwrap()
}

pub fn sign_with(header: &Header, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(header, claims, key).unwrap()
}

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A random key id.
pub fn random_kid() -> String {
    let mut bytes = [0u8; 12];
    aws_lc_rs::rand::fill(&mut bytes).unwrap();
    b64(bytes)
}

/// A server on 127.0.0.1:0 that answers every request with `status` and `Location: target`
/// (the same path appended), and counts the requests; answers its base URL.
pub async fn redirector(status: StatusCode, target: &str) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let target = target.trim_end_matches('/').to_owned();
    let app = {
        let hits = hits.clone();
        Router::new().fallback(move |uri: axum::http::Uri| {
            let hits = hits.clone();
            let location = format!("{target}{}", uri.path());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                Response::builder()
                    .status(status)
                    .header("location", location)
                    .body(axum::body::Body::empty())
                    .unwrap()
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

/// A JWKS server on 127.0.0.1:0.
pub struct JwksServer {
    pub url: String,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    fetches: Arc<AtomicUsize>,
    set: Arc<Mutex<Value>>,
    down: Arc<AtomicBool>,
}

impl JwksServer {
    /// Serves `{"keys": [jwks of keys]}`.
    pub async fn start(keys: &[&TestKey]) -> Self {
        let fetches = Arc::new(AtomicUsize::new(0));
        let set = Arc::new(Mutex::new(Value::Null));
        let down = Arc::new(AtomicBool::new(false));
        let app = {
            let (fetches, set, down) = (fetches.clone(), set.clone(), down.clone());
            Router::new().route(
                "/.well-known/jwks.json",
                get(move |headers: HeaderMap| async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    assert!(headers.get("authorization").is_none());
                    if down.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    let body = set.lock().to_string();
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(body))
                        .unwrap()
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let server = Self {
            url: format!("http://{addr}/.well-known/jwks.json"),
            base: format!("http://{addr}"),
            fetches,
            set,
            down,
        };
        server.publish(keys);
        server
    }

    /// Replaces the served set with the JWKs of `keys`.
    pub fn publish(&self, keys: &[&TestKey]) {
        let keys: Vec<&Jwk> = keys.iter().map(|k| &k.jwk).collect();
        *self.set.lock() = json!({ "keys": keys });
    }

    /// Replaces the served document as is.
    pub fn publish_raw(&self, document: Value) {
        *self.set.lock() = document;
    }

    /// How many times the JWKS was requested.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Makes the server answer `503` (or serve again).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}
