//! The published OpenAPI document against the router it describes: every route the router
//! serves is documented with exactly the methods it serves, and every documented operation is
//! routed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sessiond_server::config::Config;
use sessiond_server::{Server, router};
use tower::ServiceExt;

const KEY: &str = "openapi-test-key-0123456789abcdef";
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

struct App {
    router: Router,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        api_key: Some(KEY.to_owned()),
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    // A webhook of the configuration, so that `/v1/webhooks/{name}` names one that exists.
    config.webhooks.endpoints.insert(
        "openapi".into(),
        sessiond_server::config::WebhookEndpointConfig {
            url: "https://example.com/hook".into(),
            events: vec!["*".into()],
            secret: Some(format!("whsec_{}", "A".repeat(32))),
            secret_file: None,
        },
    );
    let server = Server::new(config).await.unwrap();
    App {
        router: router(server.state().clone()),
        _dir: dir,
    }
}

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, bytes)
}

async fn fetch_document(app: &Router) -> Value {
    let (status, headers, body) = send(app, "GET", "/openapi.json", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    serde_json::from_slice(&body).expect("the document is JSON")
}

/// The paths passed to `.route(...)` anywhere in the server's source. Routes are only ever added
/// with `.route("literal", ...)` (unit tests, at the end of a file, excepted); other ways of
/// adding routes fail this test until it learns them.
fn routed_paths() -> BTreeSet<String> {
    let src_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(src_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests (at the end of a file) build routers of their own.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for other in [".nest(", ".nest_service(", ".route_service("] {
            assert!(
                !text.contains(other),
                "{}: routes added with `{other}` are not checked against the document",
                path.display()
            );
        }
        let mut rest = text;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let literal = rest.trim_start();
            let literal = literal
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("{}: .route( without a literal path", path.display()));
            let end = literal.find('"').unwrap();
            paths.insert(literal[..end].to_owned());
        }
    }
    assert!(paths.contains("/v1/sessions"), "no routes found: {paths:?}");
    paths
}

/// Concrete values for a templated path: names that the running server knows.
fn concrete(path: &str, handle: &str) -> String {
    path.replace("{handle}", handle)
        .replace("{user_id}", "openapi-user")
        .replace("{tenant}", "default")
        .replace("{name}", "openapi")
}

/// The methods the router serves on `uri`: every method that is not answered `405`.
async fn served_methods(app: &Router, uri: &str) -> BTreeSet<String> {
    let mut served = BTreeSet::new();
    for m in METHODS {
        let (status, _, _) = send(app, m, uri, Some(json!({})), &[]).await;
        assert_ne!(
            status,
            StatusCode::NOT_FOUND,
            "{m} {uri}: not routed at all"
        );
        if status != StatusCode::METHOD_NOT_ALLOWED {
            served.insert(m.to_owned());
        }
    }
    served
}

fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = METHODS
                .iter()
                .filter(|m| item.get(m.to_ascii_lowercase()).is_some())
                .map(|m| (*m).to_owned())
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

async fn a_session(app: &Router) -> String {
    let (status, _, body) = send(
        app,
        "POST",
        "/v1/sessions",
        Some(json!({"user_id": "openapi-user"})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["session"]["handle"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_route_is_documented_with_the_methods_it_serves() {
    let app = app().await;
    let doc = fetch_document(&app.router).await;
    let handle = a_session(&app.router).await;
    let documented = documented(&doc);
    let mut served = BTreeMap::new();
    for path in routed_paths() {
        let methods = served_methods(&app.router, &concrete(&path, &handle)).await;
        served.insert(path, methods);
    }
    assert_eq!(
        documented, served,
        "the document's paths and methods differ from what the router serves"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = app().await;
    let doc = fetch_document(&app.router).await;
    let handle = a_session(&app.router).await;
    for (path, methods) in documented(&doc) {
        // DELETE last, so that the session still exists for the others.
        let mut methods: Vec<_> = methods.into_iter().collect();
        methods.sort_by_key(|m| m == "DELETE");
        for m in methods {
            let uri = concrete(&path, &handle);
            let op = &doc["paths"][&path][m.to_ascii_lowercase()];
            let body = op.get("requestBody").map(|_| json!({}));
            let (status, _, _) = send(&app.router, &m, &uri, body, &[]).await;
            assert!(
                status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                "{m} {path}: answered {status}"
            );
            let documented_status = op["responses"]
                .as_object()
                .unwrap()
                .contains_key(status.as_str());
            assert!(documented_status, "{m} {path}: {status} is not documented");
        }
    }
}

#[tokio::test]
async fn document_describes_the_api() {
    let app = app().await;
    let doc = fetch_document(&app.router).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["info"]["title"], "sessiond");

    assert_eq!(doc["security"], json!([{"api_key": []}]));
    assert!(!doc["servers"].as_array().unwrap().is_empty());
    let scheme = &doc["components"]["securitySchemes"]["api_key"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");

    let problem = &doc["components"]["schemas"]["Problem"];
    for field in ["type", "title", "status", "detail", "code"] {
        assert!(
            problem["properties"].get(field).is_some(),
            "Problem.{field}"
        );
    }
    // Strict bodies are strict in the document too.
    for strict in [
        "CreateSessionRequest",
        "VerifyRequest",
        "TokenRequest",
        "ReauthenticateRequest",
        "PatchSessionRequest",
        "PolicyDocument",
        "CookiePolicy",
        "AuthInput",
        "ClientInput",
        "Requirements",
    ] {
        assert_eq!(
            doc["components"]["schemas"][strict]["additionalProperties"],
            json!(false),
            "{strict} must forbid unknown fields"
        );
    }

    // Documented bounds are the ones the server enforces.
    let policy = &doc["components"]["schemas"]["PolicyDocument"]["properties"];
    for timeout in [
        "idle_timeout_s",
        "absolute_timeout_s",
        "remember_me_idle_timeout_s",
    ] {
        assert_eq!(policy[timeout]["minimum"], json!(1), "{timeout}");
        assert_eq!(
            policy[timeout]["maximum"],
            json!(sessiond_core::policy::MAX_TIMEOUT_S),
            "{timeout}"
        );
    }
    let remember_me = &policy["remember_me_absolute_timeout_s"];
    assert_eq!(remember_me["minimum"], json!(1));
    assert_eq!(
        remember_me["maximum"],
        json!(sessiond_core::policy::MAX_COOKIE_AGE_S)
    );

    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            // The API key by default; public operations say so with `security: []`.
            let secured = path.starts_with("/v1/") || path == "/metrics";
            assert_eq!(
                op["security"],
                if secured {
                    json!([{"api_key": []}])
                } else {
                    json!([])
                },
                "{method} {path}: security"
            );
            assert!(
                op["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{method} {path}: a description"
            );
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    if path == "/readyz" {
                        continue;
                    }
                    let content = &response["content"]["application/problem+json"];
                    assert_eq!(
                        content["schema"]["$ref"], "#/components/schemas/Problem",
                        "{method} {path} {status}: a problem response"
                    );
                    assert!(
                        response["description"].as_str().unwrap().contains('`'),
                        "{method} {path} {status}: name the error codes"
                    );
                }
            }
            if path.starts_with("/v1/") {
                for status in ["401", "503"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
        }
    }
}

#[tokio::test]
async fn parameters_are_where_the_server_reads_them() {
    let app = app().await;
    let doc = fetch_document(&app.router).await;
    // The filters of the audit log are read from the query string.
    let params = doc["paths"]["/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let mut names: Vec<&str> = Vec::new();
    for p in params {
        let name = p["name"].as_str().unwrap();
        assert_eq!(p["in"], "query", "GET /v1/events: {name}");
        assert_ne!(p["required"], json!(true), "GET /v1/events: {name}");
        names.push(name);
    }
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "cursor", "handle", "limit", "since", "type", "until", "user_id"
        ]
    );
    // Everywhere: a path parameter names a placeholder of its path, and every placeholder is one.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let placeholders: BTreeSet<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let in_path: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(in_path, placeholders, "{method} {path}: path parameters");
        }
    }
}

#[tokio::test]
async fn document_is_public_and_cacheable() {
    let app = app().await;
    // No API key.
    let req = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let res = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let cache = res.headers()[header::CACHE_CONTROL].to_str().unwrap();
    assert!(
        cache.contains("public") && cache.contains("max-age="),
        "{cache}"
    );
    let etag = res.headers()[header::ETAG].to_str().unwrap().to_owned();

    let (status, headers, body) = send(
        &app.router,
        "GET",
        "/openapi.json",
        None,
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(headers[header::ETAG].to_str().unwrap(), etag);
    assert!(body.is_empty());

    let (status, _, _) = send(
        &app.router,
        "GET",
        "/openapi.json",
        None,
        &[("if-none-match", "\"something-else\"")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}
