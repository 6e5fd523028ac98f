//! `auth.failed` names the address the request came from (the TCP peer).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use sessiond_server::config::Config;
use sessiond_server::{Server, router};
use tower::ServiceExt;

const KEY: &str = "audit-test-key-0123456789abcdef";

#[tokio::test]
async fn auth_failed_records_the_peer_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        api_key: Some(KEY.to_owned()),
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let server = Server::new(config).await.unwrap();
    let app = router(server.state().clone())
        .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 44], 5555))));
    let r = app
        .clone()
        .oneshot(
            Request::get("/v1/events")
                .header(header::AUTHORIZATION, "Bearer wrong")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..100 {
        let r = app
            .clone()
            .oneshot(
                Request::get("/v1/events?type=auth.failed")
                    .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let body: Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        if let Some(e) = body["events"].as_array().and_then(|a| a.first()) {
            assert_eq!(e["ip"], "192.0.2.44", "{e}");
            assert_eq!(e["reason"], "invalid_api_key");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no auth.failed recorded");
}
