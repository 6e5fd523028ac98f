//! The audit log and webhooks over HTTP: every change recorded with who and from where, the
//! query API, and deliveries to a real local receiver (signed, retried, dead-lettered,
//! surviving a restart, delivered by one node of several).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessiond_core::time::Clock;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::Server;

pub(crate) fn fingerprint(key: &str) -> String {
    let d = Sha256::new()
        .chain_update(b"sessiond api key fingerprint\n")
        .chain_update(key.as_bytes())
        .finalize();
    format!("api_key:{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

async fn events(s: &Server, query: &str) -> Vec<Value> {
    let r = s.get(&format!("/v1/events{query}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["events"].as_array().unwrap().clone()
}

async fn user_events(s: &Server, user: &str) -> Vec<Value> {
    let r = s.get(&format!("/v1/users/{user}/events?limit=500")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["events"].as_array().unwrap().clone()
}

fn kinds(evs: &[Value]) -> Vec<(String, String)> {
    evs.iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

async fn every_change_is_in_the_audit_log_with_who_and_from_where() {
    let s = Server::start();
    let client = json!({"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"});
    let create = |client: Value| {
        let s = &s;
        async move {
            let r = s
                .post(
                    "/v1/sessions",
                    json!({"user_id": "audit-ann", "client": client}),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
            (
                r.body["token"].as_str().unwrap().to_owned(),
                r.body["session"]["handle"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (t1, h1) = create(client.clone()).await;
    let (_t2, _h2) = create(client.clone()).await;
    let (_t3, _h3) = create(json!({"ip": "198.51.100.1", "user_agent": "curl/8.0"})).await;
    let rotated = s.post("/v1/sessions/rotate", json!({"token": t1})).await;
    assert_eq!(rotated.status, StatusCode::OK);
    let t1 = rotated.body["token"].as_str().unwrap().to_owned();
    assert_eq!(s.verify(&t1).await.status, StatusCode::OK);
    let logout = s
        .raw(Method::POST, "/v1/sessions/logout")
        .bearer_auth(&s.key)
        .header("x-request-id", "logout-req-42")
        .json(&json!({"token": t1}))
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::OK);
    let forced = s
        .call(Method::DELETE, "/v1/users/audit-ann/sessions", None)
        .await;
    assert_eq!(forced.body["revoked"], 2);

    let evs = user_events(&s, "audit-ann").await;
    let expect = |k: &str, r: &str| (k.to_owned(), r.to_owned());
    let mut oldest_first = kinds(&evs);
    oldest_first.reverse();
    assert_eq!(
        oldest_first,
        vec![
            expect("session.created", ""),
            expect("session.created", ""),
            expect("session.created", ""),
            expect("session.rotated", ""),
            expect("session.revoked", "logout"),
            expect("session.revoked", "force_logout"),
            expect("session.revoked", "force_logout"),
        ],
        "verify records nothing; every change exactly once"
    );
    let created: Vec<&Value> = evs
        .iter()
        .rev()
        .filter(|e| e["type"] == "session.created")
        .collect();
    let new_device: Vec<&Value> = created
        .iter()
        .map(|e| &e["details"]["new_device"])
        .collect();
    assert_eq!(new_device, vec![&json!(true), &json!(false), &json!(true)]);
    assert_eq!(created[0]["ip"], "203.0.113.7");
    assert_eq!(created[0]["handle"], h1.as_str());
    let actor = fingerprint(&s.key);
    assert!(evs.iter().all(|e| e["actor"] == actor.as_str()), "{evs:?}");
    let logout_event = evs.iter().find(|e| e["reason"] == "logout").unwrap();
    assert_eq!(logout_event["request_id"], "logout-req-42");
    let text = serde_json::to_string(&evs).unwrap();
    assert!(
        !text.contains(&t1) && !text.contains(&s.key),
        "no secret in events"
    );

    // The SDK reads the same log.
    let client = sessiond_client::Client::new(&s.base, &s.key).unwrap();
    let via_sdk = client
        .list_user_events(
            "audit-ann",
            &sessiond_client::api::EventQueryParams {
                event_type: Some("session.created".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(via_sdk.events.len(), 3);
    assert!(
        via_sdk
            .events
            .iter()
            .all(|e| e.event_type == "session.created")
    );

    // Filters and pages.
    let revoked = events(&s, "?user_id=audit-ann&type=session.revoked").await;
    assert_eq!(revoked.len(), 3);
    let by_handle = events(&s, &format!("?handle={h1}")).await;
    assert_eq!(by_handle.len(), 3, "created, rotated, revoked");
    let page = s.get("/v1/users/audit-ann/events?limit=4").await;
    assert_eq!(page.body["events"].as_array().unwrap().len(), 4);
    let cursor = page.body["next_cursor"].as_str().unwrap().to_owned();
    let rest = s
        .get(&format!(
            "/v1/users/audit-ann/events?limit=4&cursor={cursor}"
        ))
        .await;
    assert_eq!(rest.body["events"].as_array().unwrap().len(), 3);
    assert!(rest.body["next_cursor"].is_null());
    s.get("/v1/events?cursor=nope")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/events?type=Session")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/events?limit=0")
        .await
        .problem(400, "invalid_request");
    s.get("/v1/events?color=red")
        .await
        .problem(400, "invalid_request");

    // A wrong API key is recorded (without the key).
    let bad = s
        .raw(Method::GET, "/v1/events")
        .bearer_auth("sk_definitely-not-the-key-0000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let failed = events(&s, "?type=auth.failed").await;
        if let Some(e) = failed.first() {
            assert_eq!(e["reason"], "invalid_api_key");
            assert_eq!(e["details"]["route"], "/v1/events");
            assert!(!serde_json::to_string(e).unwrap().contains("definitely"));
            break;
        }
        assert!(Instant::now() < deadline, "auth.failed was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request the receiver got: its headers (lowercase names) and body.
type Received = (Vec<(String, String)>, String);

/// A local webhook receiver: records every request and answers with the next status of its
/// script (then 204 for ever).
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Vec<u16>>>,
    hits: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(script: Vec<u16>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            got: Arc::default(),
            script: Arc::new(Mutex::new(script)),
            hits: Arc::default(),
        };
        let me = r.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head, body_start) = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break (String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4);
                        }
                    };
                    let headers: Vec<(String, String)> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < body_start + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body =
                        String::from_utf8_lossy(&buf[body_start..body_start + len]).into_owned();
                    let status = {
                        let mut s = me.script.lock().unwrap();
                        if s.is_empty() { 204 } else { s.remove(0) }
                    };
                    me.got.lock().unwrap().push((headers, body));
                    me.hits.fetch_add(1, Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        r
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.hits.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the receiver got {} requests, expected {n}",
                self.hits.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header"))
}

fn secret() -> (String, Vec<u8>) {
    let bytes: Vec<u8> = (0u8..32)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    (format!("whsec_{}", STANDARD.encode(&bytes)), bytes)
}

/// Checks a delivery's Standard Webhooks signature with the secret's bytes.
fn assert_signed(headers: &[(String, String)], body: &str, key: &[u8]) {
    let id = header(headers, "webhook-id");
    let ts = header(headers, "webhook-timestamp");
    let now = sessiond_core::time::SystemClock.now().as_millis() / 1000;
    let ts_n: i64 = ts.parse().unwrap();
    assert!((now - ts_n).abs() < 120, "timestamp is now");
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let expected = STANDARD.encode(hmac::sign(&key, format!("{id}.{ts}.{body}").as_bytes()));
    let sigs = header(headers, "webhook-signature");
    assert!(
        sigs.split(' ').any(|s| s == format!("v1,{expected}")),
        "signature {sigs} does not verify"
    );
}

const FAST: &[(&str, &str)] = &[
    ("SESSIOND_WEBHOOKS__POLL_INTERVAL_MS", "50"),
    ("SESSIOND_WEBHOOKS__RETRY_BASE_MS", "100"),
    ("SESSIOND_WEBHOOKS__MAX_ATTEMPTS", "3"),
];

async fn put_hook(s: &Server, name: &str, url: &str, events: Value) {
    let (secret, _) = secret();
    let r = s
        .call(
            Method::PUT,
            &format!("/v1/webhooks/{name}"),
            Some(json!({"url": url, "events": events, "secret": secret})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!r.text.contains(&secret), "the secret is never returned");
}

async fn webhooks_are_signed_retried_and_delivered_once() {
    let receiver = Receiver::start(vec![500, 503]).await;
    let s = Server::start_with(FAST);
    put_hook(&s, "audit", &receiver.url, json!(["session.revoked"])).await;
    let listed = s.get("/v1/webhooks").await;
    assert_eq!(listed.body["webhooks"][0]["name"], "audit");
    assert_eq!(listed.body["webhooks"][0]["source"], "api");
    assert!(listed.body["webhooks"][0].get("secret").is_none());
    let client = sessiond_client::Client::new(&s.base, &s.key).unwrap();
    let hook = client.get_webhook("audit").await.unwrap();
    assert_eq!(hook.events, vec!["session.revoked".to_owned()]);

    let (token, handle, _) = s.login("hook-bob").await;
    let r = s.post("/v1/sessions/logout", json!({"token": token})).await;
    assert_eq!(r.status, StatusCode::OK);

    // Fails twice, then succeeds: exactly three requests, the same delivery each time.
    receiver.wait_for(3, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let got = receiver.requests();
    assert_eq!(
        got.len(),
        3,
        "delivered once more after two failures, then never again"
    );
    let (_, key) = secret();
    let ids: Vec<&str> = got.iter().map(|(h, _)| header(h, "webhook-id")).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    let sdk = sessiond_client::webhook::WebhookVerifier::new(&secret().0).unwrap();
    for (h, body) in &got {
        assert_signed(h, body, &key);
        let now = sessiond_core::time::SystemClock.now().as_millis() / 1000;
        let event = sdk
            .verify(
                header(h, "webhook-id"),
                header(h, "webhook-timestamp"),
                header(h, "webhook-signature"),
                body.as_bytes(),
                now,
            )
            .expect("the SDK verifies the delivery");
        assert_eq!(event.handle.as_deref(), Some(handle.as_str()));
        assert!(
            sdk.verify(
                header(h, "webhook-id"),
                header(h, "webhook-timestamp"),
                header(h, "webhook-signature"),
                body.replace("logout", "revoked").as_bytes(),
                now,
            )
            .is_err(),
            "a changed body does not verify"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v["type"], "session.revoked",
            "session.created is not subscribed"
        );
        assert_eq!(v["data"]["handle"], handle.as_str());
        assert_eq!(v["data"]["reason"], "logout");
        assert!(!body.contains(&token));
    }
    let d = s.get("/v1/webhooks/audit/deliveries").await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    let d = &d.body["deliveries"][0];
    assert_eq!(d["state"], "delivered");
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["id"], ids[0]);

    // A receiver that never accepts: dead-lettered after the last attempt, visible in the API.
    let down = Receiver::start(vec![500; 100]).await;
    let r = s
        .call(
            Method::PUT,
            "/v1/webhooks/down",
            Some(json!({"url": down.url, "events": ["session.*"], "secret": secret().0})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    s.login("hook-carol").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = s.get("/v1/webhooks/down/deliveries?state=dead").await;
        assert_eq!(dead.status, StatusCode::OK, "{}", dead.text);
        if let Some(d) = dead.body["deliveries"].as_array().unwrap().first() {
            assert_eq!(d["attempts"], 3);
            assert_eq!(d["last_status"], 500);
            assert_eq!(d["event"]["type"], "session.created");
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(down.hits.load(Ordering::SeqCst), 3);

    // Validation.
    let bad = s
        .call(
            Method::PUT,
            "/v1/webhooks/x",
            Some(json!({"url": "http://example.com/", "events": ["*"], "secret": secret().0})),
        )
        .await;
    bad.problem(400, "invalid_request");
    s.call(Method::DELETE, "/v1/webhooks/nope", None)
        .await
        .problem(404, "not_found");
    let gone = s.call(Method::DELETE, "/v1/webhooks/down", None).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
}

async fn a_delivery_survives_a_restart_mid_retry() {
    let receiver = Receiver::start(vec![500; 1000]).await;
    let mut s = Server::start_with(&[
        ("SESSIOND_WEBHOOKS__POLL_INTERVAL_MS", "50"),
        ("SESSIOND_WEBHOOKS__RETRY_BASE_MS", "1500"),
    ]);
    put_hook(&s, "audit", &receiver.url, json!(["session.created"])).await;
    let (_, handle, _) = s.login("hook-dave").await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    // Killed between two attempts: the delivery is in the store, not in the process.
    s.kill9();
    receiver.script.lock().unwrap().clear();
    s.restart();
    receiver.wait_for(2, Duration::from_secs(20)).await;
    let got = receiver.requests();
    assert_eq!(
        header(&got[0].0, "webhook-id"),
        header(&got[1].0, "webhook-id")
    );
    let v: Value = serde_json::from_str(&got[1].1).unwrap();
    assert_eq!(v["data"]["handle"], handle.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = s.get("/v1/webhooks/audit/deliveries?state=delivered").await;
        if !d.body["deliveries"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn each_event_is_delivered_by_one_node() {
    let receiver = Receiver::start(vec![]).await;
    let first = Server::start_with(FAST);
    let nodes = [first.start_sharing(), first.start_sharing(), first];
    put_hook(
        &nodes[0],
        "audit",
        &receiver.url,
        json!(["session.created"]),
    )
    .await;
    // The other nodes see the endpoint at their next poll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..12 {
        nodes[i % 3].login(&format!("hook-multi-{i}")).await;
    }
    receiver.wait_for(12, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.requests();
    let mut ids: Vec<&str> = got.iter().map(|(h, _)| header(h, "webhook-id")).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(got.len(), 12, "no event twice");
    assert_eq!(ids.len(), 12);
}

/// Data changes are recorded with the change (names of the keys, never their values), on
/// every store.
async fn a_data_patch_is_recorded_with_its_keys_but_not_its_values() {
    let s = Server::start();
    let (_, handle, _) = s.login("ev-patch").await;
    let r = s
        .call(
            Method::PATCH,
            &format!("/v1/sessions/{handle}"),
            Some(json!({"data": {"role": "admin-secret-value", "cart": null}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let evs = events(&s, &format!("?type=session.data_updated&handle={handle}")).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["user_id"], "ev-patch");
    assert_eq!(evs[0]["actor"], fingerprint(&s.key));
    assert_eq!(evs[0]["details"]["keys_set"], json!(["role"]));
    assert_eq!(evs[0]["details"]["keys_removed"], json!(["cart"]));
    assert!(!evs[0].to_string().contains("admin-secret-value"));
}

async fn wait_for(s: &Server, query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let evs = events(s, query).await;
        if evs.len() >= n {
            return evs;
        }
        assert!(Instant::now() < deadline, "{query}: {evs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_changes_step_up_denials_and_request_ids_are_recorded_safely() {
    let s = Server::start();
    // Webhooks: created, replaced, deleted; never the secret or the URL.
    let secret = format!("whsec_{}", STANDARD.encode([7u8; 32]));
    for _ in 0..2 {
        let r = s
            .call(
                Method::PUT,
                "/v1/webhooks/audit-hook",
                Some(json!({"url": "https://hooks.example.com/audit-x", "events": ["security.*"], "secret": secret})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = s
        .call(Method::DELETE, "/v1/webhooks/audit-hook", None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let evs = events(&s, "?limit=100").await;
    let hooks: Vec<&str> = evs
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| t.starts_with("webhook."))
        .collect();
    assert_eq!(
        hooks,
        ["webhook.deleted", "webhook.updated", "webhook.created"],
        "newest first"
    );
    let text = serde_json::to_string(&evs).unwrap();
    assert!(
        !text.contains(&secret) && !text.contains("audit-x"),
        "{text}"
    );
    assert!(evs.iter().any(|e| e["details"]["webhook"] == "audit-hook"));

    // Step-up: a valid session that does not meet `require` is refused and recorded.
    let (token, handle, _) = s.login("ev-stepup").await;
    let r = s
        .post(
            "/v1/sessions/verify",
            json!({"token": token, "require": {"min_aal": 2}}),
        )
        .await;
    r.problem(403, "reauthentication_required");
    let evs = wait_for(&s, "?type=security.step_up_denied", 1).await;
    assert_eq!(evs[0]["handle"], handle.as_str());
    assert_eq!(evs[0]["details"]["min_aal"], 2);
    assert_eq!(evs[0]["actor"], fingerprint(&s.key));

    // X-Request-Id: a safe id is kept (response and event), anything else is replaced.
    let bad = format!("{}<script>", "a".repeat(20_000));
    for (sent, kept) in [("req-1.a:b_C", true), (bad.as_str(), false), ("", false)] {
        let r = s
            .raw(Method::GET, "/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA")
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        let echoed = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(echoed == sent, kept, "{sent:.40} -> {echoed}");
        assert!(echoed.len() <= 64 && !echoed.contains('<'));
    }
    let r = s
        .raw(Method::POST, "/v1/sessions")
        .header("x-request-id", bad.as_str())
        .send()
        .await
        .unwrap();
    let echoed = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(echoed.len() <= 64);
    // Four requests without a key: each recorded with the id it was answered under.
    let failed = wait_for(&s, "?type=auth.failed", 4).await;
    assert!(
        failed.iter().any(|e| e["request_id"] == echoed.as_str()),
        "{failed:?}"
    );
    assert!(failed.iter().any(|e| e["request_id"] == "req-1.a:b_C"));
    for e in &failed {
        let id = e["request_id"].as_str().unwrap();
        assert!(id.len() <= 64 && !id.contains('<'), "{id:.80}");
    }
    // Obs-text bytes are not echoed either.
    let r = s
        .raw(Method::GET, "/healthz")
        .header(
            "x-request-id",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe<script>").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert!(r.headers()["x-request-id"].to_str().is_ok());
}

crate::on_every_store!(
    a_data_patch_is_recorded_with_its_keys_but_not_its_values,
    every_change_is_in_the_audit_log_with_who_and_from_where,
    webhooks_are_signed_retried_and_delivered_once,
    a_delivery_survives_a_restart_mid_retry,
);

crate::on_shared_stores!(each_event_is_delivered_by_one_node);
