//! `GET /metrics`: behind the API key, parseable by a Prometheus text-format parser, and moving
//! as sessions are created and verified.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::Server;

/// The scraped samples.
async fn scrape(s: &Server) -> Vec<prometheus_parse::Sample> {
    let r = s.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.header("content-type")
    );
    let lines = r.text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("the metrics parse as Prometheus text")
        .samples
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref b) => b.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

async fn metrics_are_protected_parse_and_move_with_traffic() {
    let s = Server::start();
    let anonymous = s.raw(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let before = scrape(&s).await;
    let created = |m: &[prometheus_parse::Sample]| {
        value(m, "sessiond_events_total", &[("type", "session.created")])
    };
    let valid = |m: &[prometheus_parse::Sample]| {
        value(
            m,
            "sessiond_verifies_total",
            &[("token", "session"), ("outcome", "valid")],
        )
    };
    let (token, _, _) = s.login("metrics-user").await;
    s.login("metrics-user").await;
    for _ in 0..3 {
        assert_eq!(s.verify(&token).await.status, StatusCode::OK);
    }
    s.verify("sdt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await
        .problem(401, "session_unknown");
    s.post("/v1/sessions/logout", json!({"token": token})).await;

    let after = scrape(&s).await;
    assert_eq!(created(&after) - created(&before), 2.0);
    assert_eq!(valid(&after) - valid(&before), 3.0);
    assert_eq!(
        value(
            &after,
            "sessiond_verifies_total",
            &[("outcome", "session_unknown")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "sessiond_events_total",
            &[("type", "session.revoked"), ("reason", "logout")]
        ),
        1.0
    );
    // Requests by route template (never the raw path), with their status.
    assert_eq!(
        value(
            &after,
            "sessiond_http_requests_total",
            &[("route", "/v1/sessions/verify"), ("status", "200")]
        ),
        3.0
    );
    assert!(
        value(
            &after,
            "sessiond_http_request_duration_seconds_count",
            &[("route", "/v1/sessions")]
        ) >= 2.0
            || value(
                &after,
                "sessiond_http_request_duration_seconds",
                &[("route", "/v1/sessions")]
            ) >= 2.0
    );
    let get = s.get("/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAA").await;
    assert_eq!(get.status, StatusCode::NOT_FOUND);
    let later = scrape(&s).await;
    assert_eq!(
        value(
            &later,
            "sessiond_http_requests_total",
            &[("route", "/v1/sessions/:handle"), ("status", "404")]
        ),
        1.0
    );
    assert!(
        !later
            .iter()
            .any(|m| m.labels.values().any(|v| v.contains("ses_AAAA"))),
        "no raw path or handle in a label"
    );
    // The shared stores' operations are timed.
    let shared = !matches!(
        crate::harness::BACKEND.try_with(|b| *b),
        Ok(crate::harness::Backend::Embedded)
    );
    let timed = later.iter().any(|m| {
        m.metric
            .starts_with("sessiond_store_operation_duration_seconds")
    });
    assert_eq!(timed, shared);

    // The session cache of the shared stores: trusted once its feed is subscribed, then a
    // verify misses (and fills) and the next one hits.
    let trusted = async || value(&scrape(&s).await, "sessiond_cache_trusted", &[]) == 1.0;
    if shared {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !trusted().await {
            assert!(std::time::Instant::now() < deadline, "the cache is trusted");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let lookups = |m: &[prometheus_parse::Sample], outcome: &str| {
        value(m, "sessiond_cache_lookups_total", &[("outcome", outcome)])
    };
    let before = scrape(&s).await;
    let (token, _, _) = s.login("metrics-cache").await;
    for _ in 0..3 {
        assert_eq!(s.verify(&token).await.status, StatusCode::OK);
    }
    s.post("/v1/sessions/logout", json!({"token": token})).await;
    s.verify(&token).await.problem(401, "session_revoked");
    let after = scrape(&s).await;
    let moved = |outcome: &str| lookups(&after, outcome) - lookups(&before, outcome);
    if shared {
        assert_eq!(
            moved("miss"),
            2.0,
            "the first verify, and the one after the logout"
        );
        assert_eq!(moved("hit"), 2.0);
        assert_eq!(moved("bypass"), 0.0);
        assert!(
            value(&after, "sessiond_cache_invalidations_total", &[])
                > value(&before, "sessiond_cache_invalidations_total", &[])
        );
    } else {
        assert_eq!(moved("miss") + moved("hit") + moved("bypass"), 0.0);
    }
}

async fn active_sessions_are_counted_per_tenant_where_the_store_can() {
    let s = Server::start();
    for (user, tenant) in [("g1", "default"), ("g2", "default"), ("g3", "acme")] {
        let r = s
            .post("/v1/sessions", json!({"user_id": user, "tenant": tenant}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    s.call(Method::DELETE, "/v1/users/g1/sessions", None).await;
    let m = scrape(&s).await;
    let active = |tenant: &str| value(&m, "sessiond_active_sessions", &[("tenant", tenant)]);
    let counted = m.iter().any(|x| x.metric == "sessiond_active_sessions");
    match crate::harness::BACKEND.get() {
        crate::harness::Backend::Redis | crate::harness::Backend::RedisCluster => {
            assert!(!counted, "Redis cannot count without a scan")
        }
        _ => {
            assert_eq!(active("default"), 1.0);
            assert_eq!(active("acme"), 1.0);
        }
    }
}

crate::on_every_store!(
    active_sessions_are_counted_per_tenant_where_the_store_can,
    metrics_are_protected_parse_and_move_with_traffic,
);
