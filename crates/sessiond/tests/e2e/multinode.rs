//! Several stateless nodes on one shared store (PostgreSQL, Redis, Redis Cluster): what one
//! node does is seen by the node itself at its very next request and by every other as soon as
//! the store's change feed reaches its session cache (waited for with a bound), and a user's
//! session limit holds when creates race across nodes.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Resp, Server};

/// Three nodes on one fresh store, sharing an API key.
fn three_nodes() -> [Server; 3] {
    let Ok(nodes) = <[Server; 3]>::try_from(Server::start_cluster(3)) else {
        unreachable!("start_cluster(3) starts three nodes")
    };
    nodes
}

/// Verifies the token on `node` until it is refused with `code` (a cached copy is dropped when
/// the change feed delivers: in practice at once, here within 5 s); until then it may only be
/// the old answer, 200.
async fn refused(node: &Server, token: &str, code: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = node.verify(token).await;
        if r.status != StatusCode::OK {
            r.problem(401, code);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change did not reach {}: {}",
            node.base,
            r.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn revoke(node: &Server, handle: &str) -> Resp {
    node.call(Method::DELETE, &format!("/v1/sessions/{handle}"), None)
        .await
}

async fn changes_through_one_node_reach_every_node() {
    let [a, b, c] = three_nodes();

    // Create on A, verify on B (cached there), revoke on C: C refuses the token at once, A and
    // B as soon as the change reaches them.
    let (token, handle, _) = a.login("mn-alice").await;
    assert_eq!(b.verify(&token).await.status, StatusCode::OK);
    assert_eq!(b.verify(&token).await.status, StatusCode::OK);
    assert_eq!(revoke(&c, &handle).await.status, StatusCode::OK);
    c.verify(&token).await.problem(401, "session_revoked");
    refused(&a, &token, "session_revoked").await;
    refused(&b, &token, "session_revoked").await;

    // Rotate on B: the old token is dead on A and C, the new one works on both.
    let (old, _, _) = a.login("mn-alice").await;
    assert_eq!(c.verify(&old).await.status, StatusCode::OK);
    let rotated = b.post("/v1/sessions/rotate", json!({"token": old})).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text);
    let new = rotated.body["token"].as_str().unwrap().to_owned();
    b.verify(&old).await.problem(401, "session_unknown");
    refused(&a, &old, "session_unknown").await;
    refused(&c, &old, "session_unknown").await;
    assert_eq!(a.verify(&new).await.status, StatusCode::OK);
    assert_eq!(c.verify(&new).await.status, StatusCode::OK);

    // Log out on C: A and B refuse it.
    let out = c.post("/v1/sessions/logout", json!({"token": new})).await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text);
    c.verify(&new).await.problem(401, "session_revoked");
    refused(&a, &new, "session_revoked").await;
    refused(&b, &new, "session_revoked").await;

    // Force logout on A, sparing the session created on B: the others die everywhere.
    let (keep, keep_handle, _) = b.login("mn-bob").await;
    let (on_c, _, _) = c.login("mn-bob").await;
    let (on_a, _, _) = a.login("mn-bob").await;
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/users/mn-bob/sessions?except={keep_handle}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["revoked"], 2, "{}", r.text);
    a.verify(&on_c).await.problem(401, "session_revoked");
    refused(&b, &on_c, "session_revoked").await;
    refused(&c, &on_a, "session_revoked").await;
    for node in [&a, &b, &c] {
        assert_eq!(node.verify(&keep).await.status, StatusCode::OK);
    }

    // A policy change through one node applies on every node at the next verify.
    let (short, _, _) = a.login("mn-carol").await;
    let put = b
        .call(
            Method::PUT,
            "/v1/tenants/default/policy",
            Some(json!({"idle_timeout_s": 1, "absolute_timeout_s": 1})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    for node in [&a, &c] {
        let seen = node.get("/v1/tenants/default/policy").await;
        assert_eq!(seen.body["absolute_timeout_s"], 1, "{}", seen.text);
    }
    // Under the new one-second absolute timeout the session ends on the other nodes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = c.verify(&short).await;
        if r.status == StatusCode::UNAUTHORIZED {
            r.problem(401, "session_expired");
            break;
        }
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            std::time::Instant::now() < deadline,
            "the policy change did not reach node C"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    refused(&a, &short, "session_expired").await;
}

/// Fires `n` creates for `user` in `tenant`, spread round-robin over the nodes, all at once.
async fn race_creates(nodes: &[Server], user: &str, tenant: &str, n: usize) -> Vec<Resp> {
    let http = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let node = &nodes[i % nodes.len()];
        let req = http
            .post(format!("{}/v1/sessions", node.base))
            .bearer_auth(&node.key)
            .json(&json!({"user_id": user, "tenant": tenant}));
        tasks.spawn(async move { Resp::from(req.send().await.unwrap()).await });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

async fn active_sessions(node: &Server, user: &str, tenant: &str) -> Vec<Value> {
    let r = node
        .get(&format!("/v1/users/{user}/sessions?tenant={tenant}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["sessions"].as_array().unwrap().clone()
}

async fn a_users_limit_holds_when_creates_race_across_nodes() {
    let nodes = three_nodes();
    let put = nodes[0]
        .call(
            Method::PUT,
            "/v1/tenants/mn-deny/policy",
            Some(json!({"max_sessions_per_user": 3, "on_limit": "deny"})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    let results = race_creates(&nodes, "mn-racer", "mn-deny", 30).await;
    let created = results
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(created, 3, "exactly the limit is created");
    for r in results.iter().filter(|r| r.status != StatusCode::CREATED) {
        r.problem(409, "session_limit_reached");
    }
    for node in &nodes {
        assert_eq!(active_sessions(node, "mn-racer", "mn-deny").await.len(), 3);
    }

    let put = nodes[1]
        .call(
            Method::PUT,
            "/v1/tenants/mn-evict/policy",
            Some(json!({"max_sessions_per_user": 2, "on_limit": "evict_oldest"})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    let results = race_creates(&nodes, "mn-racer", "mn-evict", 24).await;
    for r in &results {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    for node in &nodes {
        let active = active_sessions(node, "mn-racer", "mn-evict").await;
        assert_eq!(active.len(), 2, "the limit holds after evictions");
    }
    // Every session created but the surviving two was evicted, with its reason.
    let all = nodes[2]
        .get("/v1/users/mn-racer/sessions?tenant=mn-evict&status=all")
        .await;
    let all = all.body["sessions"].as_array().unwrap();
    assert_eq!(all.len(), 24);
    let evicted = all
        .iter()
        .filter(|s| s["revoked_reason"] == "limit_evicted")
        .count();
    assert_eq!(evicted, 22);
}

crate::on_shared_stores!(
    changes_through_one_node_reach_every_node,
    a_users_limit_holds_when_creates_race_across_nodes,
);
