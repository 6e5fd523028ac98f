//! Brute-force and flood protection over HTTP: a network that guesses tokens is refused with
//! `429` while everyone else verifies, creation is limited per user, and a flood from thousands
//! of addresses leaves memory where it was. The counters live in each node's memory, whatever
//! the store, so these run on the embedded store.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Resp, Server};

async fn verify_from(s: &Server, token: &str, ip: &str) -> Resp {
    s.post(
        "/v1/sessions/verify",
        json!({"token": token, "client": {"ip": ip}}),
    )
    .await
}

fn unknown_token(i: usize) -> String {
    format!("sdt_{i:0>43}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_network_is_blocked_and_a_flood_leaves_memory_bounded() {
    let s = Server::start_with(&[
        ("SESSIOND_PROTECTION__VERIFY_FAILURES", "10"),
        ("SESSIOND_PROTECTION__BLOCK_S", "300"),
    ]);
    let (token, _, _) = s.login("pr-victim").await;

    // One attacker: ten unknown tokens, then its unknown tokens are refused.
    for i in 0..10 {
        verify_from(&s, &unknown_token(i), "203.0.113.66")
            .await
            .problem(401, "session_unknown");
    }
    let blocked = verify_from(&s, &unknown_token(99), "203.0.113.66").await;
    blocked.problem(429, "too_many_attempts");
    let retry: u64 = blocked.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry), "Retry-After {retry}");
    // A neighbour behind the same address (a NAT) still verifies its valid session, and so
    // does everyone else.
    assert_eq!(
        verify_from(&s, &token, "203.0.113.66").await.status,
        StatusCode::OK
    );
    assert_eq!(
        verify_from(&s, &token, "198.51.100.7").await.status,
        StatusCode::OK
    );
    // An IPv6 attacker counts per /64: two addresses of one /64 share the count.
    for i in 0..5 {
        verify_from(&s, &unknown_token(i), "2001:db8:66:1::1").await;
        verify_from(&s, &unknown_token(i), "2001:db8:66:1::2").await;
    }
    verify_from(&s, &unknown_token(98), "2001:db8:66:1::3")
        .await
        .problem(429, "too_many_attempts");
    assert_eq!(
        verify_from(&s, &token, "2001:db8:66:1::3").await.status,
        StatusCode::OK
    );
    verify_from(&s, &unknown_token(98), "2001:db8:66:2::1")
        .await
        .problem(401, "session_unknown");

    // A flood of unknown tokens from 4,000 networks, a few attempts each, 64 at a time.
    let (_, rss_before) = s.threads_and_rss();
    let http = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut unexpected = 0;
    for i in 0..12_000usize {
        let n = i % 4_000;
        let ip = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255);
        let req = http
            .post(format!("{}/v1/sessions/verify", s.base))
            .bearer_auth(&s.key)
            .json(&json!({"token": unknown_token(i), "client": {"ip": ip}}));
        tasks.spawn(async move { req.send().await.map(|r| r.status()) });
        if tasks.len() >= 64
            && let Some(done) = tasks.join_next().await
            && done.unwrap().unwrap() != StatusCode::UNAUTHORIZED
        {
            unexpected += 1;
        }
    }
    while let Some(done) = tasks.join_next().await {
        if done.unwrap().unwrap() != StatusCode::UNAUTHORIZED {
            unexpected += 1;
        }
    }
    assert_eq!(
        unexpected, 0,
        "three attempts per network stay under the limit"
    );
    let (_, rss_after) = s.threads_and_rss();
    eprintln!(
        "flood of 12,000 unknown tokens from 4,000 networks: RSS {rss_before} KiB before, \
         {rss_after} KiB after"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew by {} KiB",
        rss_after.saturating_sub(rss_before)
    );
    // The legitimate session still verifies, and the attacker's guesses are still refused.
    assert_eq!(
        verify_from(&s, &token, "198.51.100.7").await.status,
        StatusCode::OK
    );
    verify_from(&s, &unknown_token(97), "203.0.113.66")
        .await
        .problem(429, "too_many_attempts");

    // Recorded: one security.brute_force per blocked network, naming the network.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.get("/v1/events?type=security.brute_force").await;
        let evs: Vec<Value> = r.body["events"].as_array().unwrap().clone();
        let networks: Vec<&str> = evs
            .iter()
            .filter_map(|e| e["details"]["network"].as_str())
            .collect();
        if networks.contains(&"203.0.113.66") && networks.contains(&"2001:db8:66:1::/64") {
            assert_eq!(evs.len(), 2, "{evs:?}");
            assert_eq!(evs[0]["reason"], "token_guessing");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no security event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_is_limited_per_user_and_per_network() {
    let s = Server::start_with(&[
        ("SESSIOND_PROTECTION__CREATES_PER_USER", "3"),
        ("SESSIOND_PROTECTION__CREATES_PER_IP", "5"),
    ]);
    let create = |user: &str, ip: &str| {
        s.post(
            "/v1/sessions",
            json!({"user_id": user, "client": {"ip": ip}}),
        )
    };
    for _ in 0..3 {
        assert_eq!(
            create("pr-ann", "198.51.100.1").await.status,
            StatusCode::CREATED
        );
    }
    let r = create("pr-ann", "198.51.100.2").await;
    r.problem(429, "too_many_attempts");
    assert!(r.header("retry-after").is_some());
    // Another user from the first network: its sixth create in the window is refused.
    assert_eq!(
        create("pr-bob", "198.51.100.1").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        create("pr-cid", "198.51.100.1").await.status,
        StatusCode::CREATED
    );
    create("pr-dan", "198.51.100.1")
        .await
        .problem(429, "too_many_attempts");
    assert_eq!(
        create("pr-dan", "198.51.100.9").await.status,
        StatusCode::CREATED
    );
    // Off: no limit.
    let open = Server::start_with(&[
        ("SESSIOND_PROTECTION__ENABLED", "false"),
        ("SESSIOND_PROTECTION__CREATES_PER_USER", "1"),
    ]);
    for _ in 0..3 {
        let r = open
            .call(
                Method::POST,
                "/v1/sessions",
                Some(json!({"user_id": "pr-eve"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
}

/// Polls `GET /v1/events?{query}` until `done` holds for the events (written off the request
/// path, so they may arrive a moment later).
async fn wait_events(s: &Server, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.get(&format!("/v1/events?{query}")).await;
        let evs: Vec<Value> = r.body["events"].as_array().cloned().unwrap_or_default();
        if done(&evs) {
            return evs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events of {query}: {evs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_without_client_ip_is_counted_per_api_key_and_valid_tokens_still_pass() {
    let s = Server::start_with(&[
        ("SESSIOND_PROTECTION__VERIFY_FAILURES", "5"),
        ("SESSIOND_PROTECTION__BLOCK_S", "300"),
    ]);
    let (token, _, _) = s.login("pr-noip").await;
    // As in the README walkthrough: no client at all.
    for i in 0..5 {
        s.verify(&unknown_token(i))
            .await
            .problem(401, "session_unknown");
    }
    let r = s.verify(&unknown_token(5)).await;
    r.problem(429, "too_many_attempts");
    assert!(r.header("retry-after").is_some());
    // The key's own valid sessions are still answered.
    assert_eq!(s.verify(&token).await.status, StatusCode::OK);
    // A revoked token is a bad presentation too (recorded, not counted as a guess).
    let (gone, handle, _) = s.login("pr-noip").await;
    let r = s
        .call(Method::DELETE, &format!("/v1/sessions/{handle}"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    s.verify(&gone).await.problem(401, "session_revoked");

    let evs = wait_events(&s, "type=security.brute_force", |e| !e.is_empty()).await;
    assert_eq!(
        evs[0]["details"]["api_key"],
        crate::events::fingerprint(&s.key)
    );
    assert!(evs[0]["details"].get("network").is_none(), "{evs:?}");
    let evs = wait_events(&s, "type=security.invalid_token&limit=100", |e| {
        e.iter().any(|e| e["reason"] == "session_revoked")
    })
    .await;
    let unknown = evs
        .iter()
        .filter(|e| e["reason"] == "session_unknown")
        .count();
    assert_eq!(unknown, 6, "{evs:?}");
    assert!(evs.iter().any(|e| e["details"]["blocked"] == true));
    let text = serde_json::to_string(&evs).unwrap();
    assert!(!text.contains(&token) && !text.contains(&gone) && !text.contains(&unknown_token(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_without_client_ip_is_limited_per_api_key_and_recorded() {
    // Requests naming a client address count per network, the others per key, each limit its own.
    let s = Server::start_with(&[
        ("SESSIOND_PROTECTION__CREATES_PER_IP", "2"),
        ("SESSIOND_PROTECTION__CREATES_PER_KEY", "3"),
    ]);
    for i in 0..3 {
        let r = s
            .post("/v1/sessions", json!({"user_id": format!("ct-{i}")}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let r = s.post("/v1/sessions", json!({"user_id": "ct-9"})).await;
    r.problem(429, "too_many_attempts");
    let evs = wait_events(&s, "type=security.create_throttled", |e| !e.is_empty()).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["reason"], "api_key");
    assert_eq!(evs[0]["user_id"], "ct-9");
    assert_eq!(evs[0]["actor"], crate::events::fingerprint(&s.key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_are_capped_per_node_and_per_tenant() {
    let s = Server::start_with(&[
        ("SESSIOND_LIMITS__MAX_SESSIONS", "3"),
        ("SESSIOND_LIMITS__MAX_SESSIONS_PER_TENANT", "2"),
    ]);
    let create = |user: &str, tenant: &str| {
        s.post("/v1/sessions", json!({"user_id": user, "tenant": tenant}))
    };
    for u in ["cap-a1", "cap-a2"] {
        assert_eq!(create(u, "capa").await.status, StatusCode::CREATED);
    }
    create("cap-a3", "capa")
        .await
        .problem(429, "tenant_session_limit");
    assert_eq!(create("cap-b1", "capb").await.status, StatusCode::CREATED);
    create("cap-b2", "capb")
        .await
        .problem(507, "session_capacity_reached");
}

async fn put_binding(s: &Server, tenant: &str, binding: Value) {
    let r = s
        .call(
            Method::PUT,
            &format!("/v1/tenants/{tenant}/policy"),
            Some(json!({"binding": binding})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

async fn create_in(s: &Server, tenant: &str, user: &str, ip: &str, ua: &str) -> (String, String) {
    let r = s
        .post(
            "/v1/sessions",
            json!({"user_id": user, "tenant": tenant, "client": {"ip": ip, "user_agent": ua}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    (
        r.body["token"].as_str().unwrap().to_owned(),
        r.body["session"]["handle"].as_str().unwrap().to_owned(),
    )
}

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
const FIREFOX_NEWER: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
const SAFARI: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";

async fn verify_as(s: &Server, token: &str, ip: &str, ua: &str) -> Resp {
    s.post(
        "/v1/sessions/verify",
        json!({"token": token, "client": {"ip": ip, "user_agent": ua}}),
    )
    .await
}

async fn binding_flags_demands_reauthentication_or_revokes() {
    let s = Server::start();
    // Flag: the session stays valid, is marked, and the mismatch is recorded once.
    put_binding(
        &s,
        "flag",
        json!({"ip": "subnet", "user_agent": "family", "action": "flag"}),
    )
    .await;
    let (t, h) = create_in(&s, "flag", "bd-ann", "203.0.113.7", FIREFOX).await;
    // The same /24 and a newer Firefox on the same OS: no mismatch.
    let same = verify_as(&s, &t, "203.0.113.99", FIREFOX_NEWER).await;
    assert_eq!(same.status, StatusCode::OK);
    assert_eq!(same.body["session"]["flags"], json!([]));
    for _ in 0..2 {
        let moved = verify_as(&s, &t, "198.51.100.1", FIREFOX).await;
        assert_eq!(moved.status, StatusCode::OK, "{}", moved.text);
        assert_eq!(moved.body["session"]["flags"], json!(["binding_mismatch"]));
    }
    let listed = s.get("/v1/users/bd-ann/sessions").await;
    assert_eq!(
        listed.body["sessions"][0]["flags"],
        json!(["binding_mismatch"])
    );
    let evs = s
        .get(&format!(
            "/v1/events?handle={h}&type=security.binding_mismatch"
        ))
        .await;
    let evs = evs.body["events"].as_array().unwrap().clone();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["reason"], "ip");
    assert_eq!(evs[0]["ip"], "198.51.100.1");

    // Reauthenticate: 403 from the other client until the user steps up from it.
    put_binding(
        &s,
        "stepup",
        json!({"user_agent": "family", "action": "reauthenticate"}),
    )
    .await;
    let (t, _) = create_in(&s, "stepup", "bd-bob", "203.0.113.7", FIREFOX).await;
    verify_as(&s, &t, "203.0.113.7", SAFARI)
        .await
        .problem(403, "reauthentication_required");
    let stepped = s
        .post(
            "/v1/sessions/reauthenticate",
            json!({"token": t, "auth": {"method": "webauthn", "aal": 2},
                   "client": {"ip": "203.0.113.7", "user_agent": SAFARI}}),
        )
        .await;
    assert_eq!(stepped.status, StatusCode::OK, "{}", stepped.text);
    let t = stepped.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        verify_as(&s, &t, "203.0.113.7", SAFARI).await.status,
        StatusCode::OK,
        "bound to the new client"
    );

    // Revoke: the session ends (reason anomaly).
    put_binding(&s, "strict", json!({"ip": "exact", "action": "revoke"})).await;
    let (t, h) = create_in(&s, "strict", "bd-cid", "203.0.113.7", FIREFOX).await;
    verify_as(&s, &t, "203.0.113.8", FIREFOX)
        .await
        .problem(401, "session_revoked");
    let gone = s.get(&format!("/v1/sessions/{h}")).await;
    assert_eq!(gone.body["session"]["revoked_reason"], "anomaly");
    verify_as(&s, &t, "203.0.113.7", FIREFOX)
        .await
        .problem(401, "session_revoked");

    // Invalid policies are refused, naming the field.
    let bad = s
        .call(
            Method::PUT,
            "/v1/tenants/x/policy",
            Some(json!({"binding": {"ip": "nearby"}})),
        )
        .await;
    bad.problem(400, "invalid_policy");
}

async fn suspicious_sessions_are_revoked_by_filter() {
    let s = Server::start();
    put_binding(&s, "default", json!({"ip": "exact", "action": "flag"})).await;
    let (t1, h1) = create_in(&s, "default", "rf-dee", "203.0.113.7", FIREFOX).await;
    let (_, h2) = create_in(&s, "default", "rf-dee", "203.0.113.7", FIREFOX).await;
    let (_, h3) = create_in(&s, "default", "rf-dee", "203.0.113.7", FIREFOX).await;
    let (_, other) = create_in(&s, "default", "rf-eve", "203.0.113.7", FIREFOX).await;
    assert_eq!(
        verify_as(&s, &t1, "192.0.2.1", FIREFOX).await.status,
        StatusCode::OK
    );
    let revoke = |body: Value| s.post("/v1/users/rf-dee/sessions/revoke", body);
    // Flagged ones only.
    let r = revoke(json!({"flagged": true, "reason": "anomaly"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!({"revoked": 1, "handles": [h1]}));
    // By handle list: only this user's sessions, only active ones.
    let r = revoke(json!({"handles": [h2, other, h1]})).await;
    assert_eq!(r.body, json!({"revoked": 1, "handles": [h2]}));
    // By country: sessions carry no location without geolocation data, so none matches.
    let r = revoke(json!({"country": "DE"})).await;
    assert_eq!(r.body["revoked"], 0);
    // Created before a time.
    let r = revoke(json!({"created_before": "2999-01-01T00:00:00Z"})).await;
    assert_eq!(r.body, json!({"revoked": 1, "handles": [h3]}));
    revoke(json!({})).await.problem(400, "invalid_request");
    revoke(json!({"country": "germany"}))
        .await
        .problem(400, "invalid_request");
    let still = s.get(&format!("/v1/sessions/{other}")).await;
    assert_eq!(still.body["session"]["status"], "active");
}

crate::on_every_store!(
    binding_flags_demands_reauthentication_or_revokes,
    suspicious_sessions_are_revoked_by_filter,
);

/// A small city database: Berlin and Tokyo networks, far apart.
fn geo_db(dir: &std::path::Path) -> std::path::PathBuf {
    let mut w = mmdb_writer::Writer::new("GeoLite2-City");
    for (net, country, city, lat, lon) in [
        ("198.51.100.0/24", "DE", "Berlin", 52.52, 13.405),
        ("203.0.113.0/24", "JP", "Tokyo", 35.6895, 139.6917),
        ("2001:db8:de::/48", "DE", "Berlin", 52.52, 13.405),
    ] {
        let record = json!({
            "country": {"iso_code": country},
            "city": {"names": {"en": city}},
            "location": {"latitude": lat, "longitude": lon},
        });
        w.insert(net.parse::<ipnet::IpNet>().unwrap(), &record)
            .unwrap();
    }
    let path = dir.join("city.mmdb");
    std::fs::write(&path, w.to_bytes().unwrap()).unwrap();
    path
}

async fn locations_and_impossible_travel_with_a_city_database() {
    // Without a database the detector reports itself off instead of guessing.
    let plain = Server::start();
    let r = plain
        .call(
            Method::PUT,
            "/v1/tenants/default/policy",
            Some(json!({"impossible_travel": {"max_speed_kmh": 1000}})),
        )
        .await;
    r.problem(400, "invalid_policy");
    assert!(r.body["detail"].as_str().unwrap().contains("geolocation"));
    assert!(plain.log_text().contains("geolocation: off"));

    let tmp = tempfile::tempdir().unwrap();
    let db = geo_db(tmp.path());
    let s = Server::start_with(&[("SESSIOND_GEOIP_DB", db.to_str().unwrap())]);
    let r = s
        .call(
            Method::PUT,
            "/v1/tenants/default/policy",
            Some(json!({"impossible_travel": {"max_speed_kmh": 1000, "action": "flag"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (t_berlin, h_berlin) = create_in(&s, "default", "geo-ann", "198.51.100.7", FIREFOX).await;
    let (t_laptop, h_laptop) = create_in(&s, "default", "geo-ann", "198.51.100.8", SAFARI).await;
    let got = s.get(&format!("/v1/sessions/{h_berlin}")).await;
    assert_eq!(
        got.body["session"]["device"]["location"],
        json!({"country": "DE", "city": "Berlin", "latitude": 52.52, "longitude": 13.405})
    );
    // Used in Berlin, then seconds later from Tokyo: about 8,900 km in no time.
    assert_eq!(
        verify_as(&s, &t_berlin, "198.51.100.7", FIREFOX)
            .await
            .status,
        StatusCode::OK
    );
    let far = verify_as(&s, &t_laptop, "203.0.113.9", SAFARI).await;
    assert_eq!(far.status, StatusCode::OK, "{}", far.text);
    assert_eq!(far.body["session"]["flags"], json!(["impossible_travel"]));
    let evs = s
        .get("/v1/users/geo-ann/events?type=security.impossible_travel")
        .await;
    let e = &evs.body["events"][0];
    assert_eq!(e["handle"], h_laptop.as_str());
    assert_eq!(e["ip"], "203.0.113.9");
    assert!(e["details"]["km"].as_f64().unwrap() > 8000.0, "{e}");
    // Revoke what was used from Japan... by country of the session's own (create) address,
    // and the flagged one.
    let r = s
        .post(
            "/v1/users/geo-ann/sessions/revoke",
            json!({"flagged": true, "reason": "anomaly"}),
        )
        .await;
    assert_eq!(r.body, json!({"revoked": 1, "handles": [h_laptop]}));
    let r = s
        .post(
            "/v1/users/geo-ann/sessions/revoke",
            json!({"country": "DE"}),
        )
        .await;
    assert_eq!(r.body, json!({"revoked": 1, "handles": [h_berlin]}));

    // With `revoke`, the session used from the impossible place ends there.
    let r = s
        .call(
            Method::PUT,
            "/v1/tenants/strict/policy",
            Some(json!({"impossible_travel": {"max_speed_kmh": 1000, "action": "revoke"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (t1, _) = create_in(&s, "strict", "geo-bob", "198.51.100.7", FIREFOX).await;
    let (t2, h2) = create_in(&s, "strict", "geo-bob", "198.51.100.7", FIREFOX).await;
    assert_eq!(
        verify_as(&s, &t1, "198.51.100.7", FIREFOX).await.status,
        StatusCode::OK
    );
    verify_as(&s, &t2, "203.0.113.9", FIREFOX)
        .await
        .problem(401, "session_revoked");
    let gone = s.get(&format!("/v1/sessions/{h2}")).await;
    assert_eq!(gone.body["session"]["revoked_reason"], "anomaly");
    assert_eq!(
        verify_as(&s, &t1, "198.51.100.7", FIREFOX).await.status,
        StatusCode::OK,
        "the other session is untouched"
    );
}

crate::on_every_store!(locations_and_impossible_travel_with_a_city_database);
