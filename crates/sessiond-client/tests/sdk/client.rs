//! `Client` against a local axum server that records what it receives and answers canned
//! responses.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{Value, json};
use sessiond_client::api::{
    AuthInput, CreateSessionRequest, JsonObject, PolicyDocument, VerifyRequest, codes,
};
use sessiond_client::{Client, Error, ListOptions, StatusFilter};

use crate::support::{AUDIENCE, ISSUER, claims, ed25519, redirector, sign};

const API_KEY: &str = "sk_test_very_secret_api_key";
const TOKEN: &str = "sdt_the-secret-session-token-AAAAAAAAAAAAAAAAAAAAA";

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    /// The path and query exactly as sent (percent-encoding kept).
    uri: String,
    authorization: Option<String>,
    body: Value,
}

struct Recorder {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn last(&self) -> Seen {
        self.seen.lock().last().cloned().unwrap()
    }
}

fn session() -> Value {
    json!({
        "handle": "ses_AAAAAAAAAAAAAAAAAAAAAA",
        "user_id": "u-42",
        "tenant": "default",
        "status": "active",
        "created_at": "2027-01-15T08:00:00.000Z",
        "last_seen_at": "2027-01-15T08:00:00.000Z",
        "idle_expires_at": "2027-01-15T08:30:00.000Z",
        "expires_at": "2027-01-15T20:00:00.000Z",
        "remember_me": false,
        "auth": {"method": "password", "aal": 1, "authenticated_at": "2027-01-15T08:00:00.000Z"},
        "device": {"ip": null, "user_agent": null, "browser": null, "os": null, "location": null},
        "data": {},
        "revoked_reason": null
    })
}

fn json_response(status: StatusCode, content_type: &str, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap()
}

/// The canned answer to a request.
fn answer(method: &Method, path: &str, jwks: &Value) -> Response {
    let ok = |v: Value| json_response(StatusCode::OK, "application/json", v.to_string());
    match (method.as_str(), path) {
        ("POST", "/v1/sessions/verify") => json_response(
            StatusCode::UNAUTHORIZED,
            "application/problem+json",
            json!({
                "type": "https://sessiond.dev/problems/session_expired",
                "title": "Session expired",
                "status": 401,
                "detail": "the session timed out",
                "code": "session_expired"
            })
            .to_string(),
        ),
        ("POST", "/v1/sessions") | ("POST", "/prefix/v1/sessions") => json_response(
            StatusCode::CREATED,
            "application/json",
            json!({
                "session": session(),
                "token": TOKEN,
                "cookie": {"name": "__Host-session", "value": TOKEN, "set_cookie": "x"}
            })
            .to_string(),
        ),
        // A body of the wrong shape that quotes the token.
        ("POST", "/v1/sessions/rotate") => ok(json!({"session": session(), "token": 42, "cookie": TOKEN})),
        ("POST", "/v1/sessions/logout") => {
            ok(json!({"session": session(), "clear_cookie": "__Host-session=; Max-Age=0"}))
        }
        ("POST", "/v1/tokens/refresh") => ok(json!({
            "session": session(),
            "access_token": "eyJ.e30.sig",
            "access_token_expires_at": "2027-01-15T08:05:00.000Z",
            "refresh_token": "rt_new"
        })),
        ("GET", "/.well-known/jwks.json") => ok(jwks.clone()),
        ("GET", p) if p.starts_with("/v1/users/") => {
            ok(json!({"sessions": [session()], "next_cursor": "c2"}))
        }
        ("DELETE", p) if p.starts_with("/v1/users/") => ok(json!({"revoked": 3})),
        ("GET", p) if p.starts_with("/v1/tenants/") => ok(serde_json::to_value(PolicyDocument::default()).unwrap()),
        ("PUT", p) if p.starts_with("/v1/tenants/") => ok(serde_json::to_value(PolicyDocument::default()).unwrap()),
        ("GET", "/v1/sessions/ses_gateway") => json_response(
            StatusCode::BAD_GATEWAY,
            "text/html",
            "<html>bad gateway</html>".into(),
        ),
        (_, p) if p.starts_with("/v1/sessions/") && p != "/v1/sessions/reauthenticate" => ok(json!({"session": session()})),
        _ => json_response(
            StatusCode::NOT_FOUND,
            "application/problem+json",
            json!({"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no route", "code": "not_found"}).to_string(),
        ),
    }
}

async fn recorder() -> Recorder {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let jwks = json!({"keys": [ed25519("ed-1").jwk, {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "r"}]});
    let app = {
        let seen = seen.clone();
        Router::new().fallback(move |request: Request| {
            let seen = seen.clone();
            let jwks = jwks.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = to_bytes(body, 1 << 20).await.unwrap();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                seen.lock().push(Seen {
                    method: parts.method.clone(),
                    uri: parts.uri.to_string(),
                    authorization: parts
                        .headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    body,
                });
                answer(&parts.method, parts.uri.path(), &jwks)
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Recorder {
        base: format!("http://{addr}"),
        seen,
    }
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(API_KEY), "{text} shows the API key");
    assert!(!text.contains(TOKEN), "{text} shows the token");
}

#[tokio::test]
async fn a_problem_response_is_an_api_error_with_its_code() {
    let server = recorder().await;
    let client = Client::new(&server.base, API_KEY).unwrap();
    let err = client
        .verify(&VerifyRequest {
            token: Some(TOKEN.into()),
            access_token: None,
            client: None,
            require: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(codes::SESSION_EXPIRED));
    assert_eq!(err.status(), Some(401));
    match &err {
        Error::Api { status, problem } => {
            assert_eq!(*status, 401);
            assert_eq!(problem.detail, "the session timed out");
        }
        other => panic!("not an API error: {other:?}"),
    }
    assert_no_secret(&err.to_string());
    assert_no_secret(&format!("{err:?}"));

    let seen = server.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri, "/v1/sessions/verify");
    assert_eq!(seen.body["token"], TOKEN);
    assert_eq!(seen.body.get("access_token"), None);
}

#[tokio::test]
async fn the_api_key_is_sent_to_v1_but_not_to_the_jwks() {
    let server = recorder().await;
    let client = Client::new(&server.base, API_KEY).unwrap();
    client
        .create_session(&CreateSessionRequest {
            user_id: "u-42".into(),
            auth: Some(AuthInput {
                method: Some("password".into()),
                aal: Some(1),
                authenticated_at: None,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = server.last();
    assert_eq!(
        seen.authorization.as_deref(),
        Some(&*format!("Bearer {API_KEY}"))
    );
    assert_eq!(seen.uri, "/v1/sessions");
    assert_eq!(seen.body["user_id"], "u-42");

    let set = client.jwks().await.unwrap();
    assert_eq!(set.keys.len(), 1, "the RSA entry is skipped");
    assert_eq!(set.keys[0].kid, "ed-1");
    let seen = server.last();
    assert_eq!(seen.uri, "/.well-known/jwks.json");
    assert_eq!(seen.authorization, None);
}

#[tokio::test]
async fn path_segments_and_queries_are_percent_encoded() {
    let server = recorder().await;
    let client = Client::new(&server.base, API_KEY).unwrap();
    let user = "a/b c?d#e%f&g";
    let list = client
        .list_user_sessions(
            user,
            &ListOptions {
                status: Some(StatusFilter::All),
                tenant: Some("t 1".into()),
                limit: Some(10),
                cursor: Some("c/+=".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(list.sessions.len(), 1);
    assert_eq!(list.next_cursor.as_deref(), Some("c2"));
    assert_eq!(
        server.last().uri,
        "/v1/users/a%2Fb%20c%3Fd%23e%25f&g/sessions?status=all&tenant=t+1&limit=10&cursor=c%2F%2B%3D"
    );

    client
        .list_user_sessions("u-1", &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(server.last().uri, "/v1/users/u-1/sessions");

    let revoked = client
        .force_logout("ü/1", Some("ses_keep"), None)
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 3);
    let seen = server.last();
    assert_eq!(seen.method, Method::DELETE);
    assert_eq!(seen.uri, "/v1/users/%C3%BC%2F1/sessions?except=ses_keep");

    client
        .force_logout("u-1", None, Some("acme"))
        .await
        .unwrap();
    assert_eq!(server.last().uri, "/v1/users/u-1/sessions?tenant=acme");

    for bad in ["", ".", ".."] {
        let err = client
            .list_user_sessions(bad, &ListOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err:?}");
    }
    let before = server.seen.lock().len();
    assert!(client.get_session("..").await.is_err());
    assert_eq!(server.seen.lock().len(), before, "nothing was sent");
}

#[tokio::test]
async fn every_endpoint_has_its_method_path_and_body() {
    let server = recorder().await;
    let client = Client::new(&format!("{}/", server.base), API_KEY).unwrap();

    client.get_session("ses_1").await.unwrap();
    let seen = server.last();
    assert_eq!(
        (seen.method, seen.uri.as_str()),
        (Method::GET, "/v1/sessions/ses_1")
    );

    let mut data = JsonObject::new();
    data.insert("cart".into(), json!(3));
    client.patch_session("ses_1", &data).await.unwrap();
    let seen = server.last();
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.body, json!({"data": {"cart": 3}}));

    client
        .revoke_session("ses_1", Some("anomaly"))
        .await
        .unwrap();
    let seen = server.last();
    assert_eq!(
        (seen.method, seen.uri.as_str()),
        (Method::DELETE, "/v1/sessions/ses_1?reason=anomaly")
    );
    client.revoke_session("ses_1", None).await.unwrap();
    assert_eq!(server.last().uri, "/v1/sessions/ses_1");

    let out = client.logout(TOKEN).await.unwrap();
    assert_eq!(out.clear_cookie, "__Host-session=; Max-Age=0");
    assert_eq!(server.last().body, json!({"token": TOKEN}));

    let err = client
        .reauthenticate(
            TOKEN,
            AuthInput {
                method: Some("webauthn".into()),
                aal: Some(2),
                authenticated_at: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(codes::NOT_FOUND),
        "the recorder has no such route"
    );
    let seen = server.last();
    assert_eq!(seen.uri, "/v1/sessions/reauthenticate");
    assert_eq!(seen.body["token"], TOKEN);
    assert_eq!(seen.body["auth"]["aal"], 2);

    let pair = client.refresh("rt_old").await.unwrap();
    assert_eq!(pair.refresh_token, "rt_new");
    let seen = server.last();
    assert_eq!(
        (seen.method, seen.uri.as_str()),
        (Method::POST, "/v1/tokens/refresh")
    );
    assert_eq!(seen.body, json!({"refresh_token": "rt_old"}));

    let policy = client.get_policy("acme corp").await.unwrap();
    assert_eq!(policy, PolicyDocument::default());
    assert_eq!(server.last().uri, "/v1/tenants/acme%20corp/policy");
    client.put_policy("acme", &policy).await.unwrap();
    let seen = server.last();
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.body, serde_json::to_value(&policy).unwrap());
}

#[tokio::test]
async fn errors_without_a_problem_or_with_a_bad_body_do_not_leak() {
    let server = recorder().await;
    let client = Client::new(&server.base, API_KEY).unwrap();

    let err = client.get_session("ses_gateway").await.unwrap_err();
    assert!(
        matches!(err, Error::UnexpectedStatus { status: 502 }),
        "{err:?}"
    );
    assert_eq!(err.code(), None);

    let err = client.rotate(TOKEN).await.unwrap_err();
    assert!(matches!(err, Error::Decode { status: 200, .. }), "{err:?}");
    assert_no_secret(&err.to_string());
    assert_no_secret(&format!("{err:?}"));

    // Nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let down = Client::new(&base, API_KEY).unwrap();
    let err = down.logout(TOKEN).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert_no_secret(&err.to_string());
    assert_no_secret(&format!("{err:?}"));
}

#[tokio::test]
async fn a_base_url_with_a_path_prefix_is_kept() {
    let server = recorder().await;
    let client = Client::new(&format!("{}/prefix", server.base), API_KEY).unwrap();
    client
        .create_session(&CreateSessionRequest {
            user_id: "u".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(server.last().uri, "/prefix/v1/sessions");
    assert_eq!(
        client.jwks_url().as_str(),
        format!("{}/prefix/.well-known/jwks.json", server.base)
    );
}

#[test]
fn debug_redacts_the_api_key_and_bad_arguments_are_refused() {
    let client = Client::new("http://127.0.0.1:1", API_KEY).unwrap();
    let debug = format!("{client:?}");
    assert!(debug.contains("http://127.0.0.1:1"));
    assert!(debug.contains("redacted"));
    assert_no_secret(&debug);

    for (base, key) in [
        ("not a url", API_KEY),
        ("ftp://example.com", API_KEY),
        ("mailto:a@b", API_KEY),
        ("http://127.0.0.1:1", ""),
        ("http://127.0.0.1:1", "bad\nkey"),
    ] {
        let err = Client::new(base, key).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{base} {err:?}");
        assert_no_secret(&err.to_string());
    }
}

#[tokio::test]
async fn a_verifier_from_the_client_uses_the_servers_jwks() {
    let key = ed25519("ed-1");
    let jwks = crate::support::JwksServer::start(&[&key]).await;
    let base = jwks
        .url
        .trim_end_matches("/.well-known/jwks.json")
        .to_owned();
    let client = Client::new(&base, API_KEY).unwrap();
    let verifier = client
        .access_token_verifier(ISSUER, AUDIENCE)
        .build()
        .unwrap();
    let now = 1_800_000_000;
    let token = sign(&key, &claims(now));
    let claims = verifier.verify_at(&token, now).await.unwrap();
    assert_eq!(claims.sub, "u-42");
    assert_eq!(jwks.fetches(), 1);
}

#[tokio::test]
async fn a_redirect_is_an_error_and_the_body_never_reaches_its_target() {
    let target = recorder().await;
    for status in [
        StatusCode::TEMPORARY_REDIRECT,
        StatusCode::PERMANENT_REDIRECT,
        StatusCode::FOUND,
        StatusCode::MOVED_PERMANENTLY,
        StatusCode::SEE_OTHER,
    ] {
        let (base, hits) = redirector(status, &target.base).await;
        let client = Client::new(&base, API_KEY).unwrap();
        let err = client.refresh(TOKEN).await.unwrap_err();
        assert!(
            matches!(err, Error::Redirected { status: Some(s) } if s == status.as_u16()),
            "{status}: {err:?}"
        );
        assert_eq!(err.status(), Some(status.as_u16()));
        assert_no_secret(&err.to_string());
        assert_no_secret(&format!("{err:?}"));
        let err = client.rotate(TOKEN).await.unwrap_err();
        assert!(matches!(err, Error::Redirected { .. }), "{err:?}");
        let err = client.get_session("ses_x").await.unwrap_err();
        assert!(matches!(err, Error::Redirected { .. }), "{err:?}");
        let err = client.jwks().await.unwrap_err();
        assert!(matches!(err, Error::Redirected { .. }), "{err:?}");
        let verifier = client
            .access_token_verifier(ISSUER, AUDIENCE)
            .build()
            .unwrap();
        assert!(verifier.refresh_keys().await.is_err());
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert!(
            target.seen.lock().is_empty(),
            "{status} was followed: {:?}",
            target.seen.lock()
        );
    }

    // A client of the application's that follows redirects: the answer from elsewhere is
    // refused all the same.
    let (base, _) = redirector(StatusCode::TEMPORARY_REDIRECT, &target.base).await;
    let client = Client::with_http(&base, API_KEY, reqwest::Client::new()).unwrap();
    let err = client.get_session("ses_x").await.unwrap_err();
    assert!(matches!(err, Error::Redirected { status: None }), "{err:?}");
    assert_eq!(err.status(), None);
}
