//! The process: durability across SIGKILL, graceful SIGTERM, start-up refusals, configuration
//! layers, and no secret in any log line.

use std::process::Command;

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::harness::{BIN, Server, new_key};

async fn acknowledged_creates_and_revocations_survive_kill_9() {
    let mut s = Server::start();
    for round in 0..3 {
        // A burst of concurrent creates, killed right after the last 201.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (base, key) = (s.base.clone(), s.key.clone());
            tasks.push(tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(format!("{base}/v1/sessions"))
                    .bearer_auth(key)
                    .json(&json!({"user_id": format!("crash-{round}-{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
                let b: serde_json::Value = r.json().await.unwrap();
                b["token"].as_str().unwrap().to_owned()
            }));
        }
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(t.await.unwrap());
        }
        s.kill9();
        s.restart();
        for t in &tokens {
            assert_eq!(
                s.verify(t).await.status,
                StatusCode::OK,
                "round {round}: a created session was lost"
            );
        }
        // Revocations of every kind, killed right after the 200s.
        let (a, b, c) = (&tokens[0], &tokens[1], &tokens[2]);
        assert_eq!(
            s.post("/v1/sessions/logout", json!({"token": a}))
                .await
                .status,
            StatusCode::OK
        );
        let hb = s.verify(b).await.body["session"]["handle"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            s.call(Method::DELETE, &format!("/v1/sessions/{hb}"), None)
                .await
                .status,
            StatusCode::OK
        );
        let user_c = s.verify(c).await.body["session"]["user_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            s.call(
                Method::DELETE,
                &format!("/v1/users/{user_c}/sessions"),
                None
            )
            .await
            .body,
            json!({"revoked": 1})
        );
        let rotated = s
            .post("/v1/sessions/rotate", json!({"token": tokens[3]}))
            .await;
        let new_token = rotated.body["token"].as_str().unwrap().to_owned();
        s.kill9();
        s.restart();
        s.verify(a).await.problem(401, "session_revoked");
        s.verify(b).await.problem(401, "session_revoked");
        s.verify(c).await.problem(401, "session_revoked");
        s.verify(&tokens[3]).await.problem(401, "session_unknown");
        assert_eq!(
            s.verify(&new_token).await.status,
            StatusCode::OK,
            "the rotated token survives"
        );
    }
}

async fn sigterm_shuts_down_gracefully_and_keeps_last_seen() {
    let mut s = Server::start();
    let (token, _, _) = s.login("term").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let seen = s.verify(&token).await.body["session"]["last_seen_at"].clone();
    assert!(s.sigterm(), "exit status 0 after SIGTERM");
    assert!(s.log_text().contains("stopped"));
    s.restart();
    let again = s.get("/v1/users/term/sessions").await;
    assert_eq!(
        again.body["sessions"][0]["last_seen_at"], seen,
        "the final flush wrote last seen"
    );
}

pub(crate) fn run_serve(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A server that does start is stopped by the timeout below; refusals exit at once.
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return (true, String::new());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

async fn without_a_configured_key_one_is_generated_into_the_data_dir_never_open() {
    let mut s = Server::start_without_key();
    let path = s.dir.join("api-key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the generated key file is private");
    }
    assert!(s.key.starts_with("sk_") && s.key.len() == 46);
    let log = s.log_text();
    assert!(log.contains("api-key"), "the log says where the key is");
    assert!(!log.contains(&s.key), "the log never shows the key");
    let anon = s
        .raw(Method::GET, "/v1/users/x/sessions")
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.get("/v1/users/x/sessions").await.status, StatusCode::OK);
    // The same key is used again after a restart.
    let key = s.key.clone();
    s.kill9();
    s.restart();
    assert_eq!(s.key, key);
    assert_eq!(s.get("/v1/users/x/sessions").await.status, StatusCode::OK);
}

#[test]
fn serve_refuses_bad_configuration_naming_the_key() {
    let (ok, err) = run_serve(&[("SESSIOND_API_KEY", "short")], &[]);
    assert!(!ok);
    assert!(err.contains("at least 24 characters"), "{err}");

    let key = new_key();
    let (ok, err) = run_serve(
        &[("SESSIOND_API_KEY", &key), ("SESSIOND_IDLE_TIMEOUT", "5")],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("idle_timeout"), "the bad key is named: {err}");

    let (ok, err) = run_serve(
        &[
            ("SESSIOND_API_KEY", &key),
            ("SESSIOND_DEFAULT_POLICY__IDLE_TIMEOUT_S", "0"),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("default_policy") && err.contains("idle_timeout_s"),
        "{err}"
    );

    let (ok, err) = run_serve(
        &[("SESSIOND_API_KEY", &key)],
        &["--config", "/nonexistent/sessiond.toml"],
    );
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
}

/// A Kubernetes Service named `sessiond` (or `sessiond-...`) injects these into every pod of
/// its namespace; they are not settings, and a node must start with them. A real setting's typo
/// beside them still stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_service_link_variables_do_not_stop_a_node() {
    let key = new_key();
    let links = [
        ("SESSIOND_PORT", "tcp://10.0.0.1:8080"),
        ("SESSIOND_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
        ("SESSIOND_PORT_8080_TCP_PROTO", "tcp"),
        ("SESSIOND_PORT_8080_TCP_PORT", "8080"),
        ("SESSIOND_PORT_8080_TCP_ADDR", "10.0.0.1"),
        ("SESSIOND_SERVICE_HOST", "10.0.0.1"),
        ("SESSIOND_SERVICE_PORT", "8080"),
        ("SESSIOND_SERVICE_PORT_HTTP", "8080"),
        ("SESSIOND_METRICS_SERVICE_HOST", "10.0.0.2"),
        ("SESSIOND_METRICS_PORT", "tcp://10.0.0.2:9090"),
    ];
    let s = Server::start_with(&links);
    s.login("k8s-user").await;
    drop(s);

    let mut typo = links.to_vec();
    typo.push(("SESSIOND_API_KEY", key.as_str()));
    typo.push(("SESSIOND_MAX_CONECTIONS", "10"));
    let (ok, err) = run_serve(&typo, &[]);
    assert!(!ok);
    assert!(
        err.contains("max_conections"),
        "the bad key is named: {err}"
    );

    // `SESSIOND_PORT` without the shape Kubernetes gives it is a setting, and not a known one.
    let (ok, err) = run_serve(
        &[
            ("SESSIOND_API_KEY", key.as_str()),
            ("SESSIOND_PORT", "8080"),
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("port"), "{err}");
}

#[test]
fn generate_key_prints_a_fresh_strong_key() {
    let out = Command::new(BIN).arg("generate-key").output().unwrap();
    assert!(out.status.success());
    let a = String::from_utf8(out.stdout).unwrap();
    let b = String::from_utf8(
        Command::new(BIN)
            .arg("generate-key")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(a.trim().starts_with("sk_") && a.trim().len() == 46, "{a}");
    assert_ne!(a, b);
}

#[test]
fn help_explains_itself() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("serve") && text.contains("generate-key") && text.contains("session"));
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "--data-dir",
        "--config",
        "SESSIOND_API_KEY",
        "SESSIOND_LOG",
    ] {
        assert!(text.contains(needle), "serve --help mentions {needle}");
    }
}

async fn configuration_layers_file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sessiond.toml");
    let key_file = dir.path().join("keys");
    let key = new_key();
    std::fs::write(&key_file, format!("# API keys\n\n{key}\n")).unwrap();
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:1\"\ntoken_prefix = \"file_\"\napi_key_file = {:?}\n\n[default_policy]\nidle_timeout_s = 900\n",
            key_file.display().to_string()
        ),
    )
    .unwrap();
    let cfg = file.display().to_string();
    // The file's listen address is overridden by the flag; its prefix by the environment.
    let s = Server::start_with(&[("SESSIOND_CONFIG", &cfg), ("SESSIOND_TOKEN_PREFIX", "env_")]);
    // The harness passes its own key in SESSIOND_API_KEY; the file's key works as well.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/tenants/default/policy", s.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        doc["idle_timeout_s"], 900,
        "the file's default policy applies"
    );
    let (token, _, _) = s.login("layers").await;
    assert!(
        token.starts_with("env_"),
        "the environment wins over the file: {token}"
    );
}

fn sha256_forms(token: &str) -> Vec<String> {
    let d = Sha256::digest(token.as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        hex,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d),
        base64::engine::general_purpose::STANDARD.encode(d),
    ]
}

async fn no_token_hash_or_key_in_logs_or_in_bodies_that_should_not_carry_them() {
    let s = Server::start_with(&[("SESSIOND_LOG", "trace")]);
    let mut secrets = vec![s.key.clone()];
    let mut bodies = Vec::new();
    let created = s
        .post(
            "/v1/sessions",
            json!({"user_id": "audit", "client": {"ip": "198.51.100.1", "user_agent": "curl/8"}}),
        )
        .await;
    let t1 = created.body["token"].as_str().unwrap().to_owned();
    let handle = created.body["session"]["handle"]
        .as_str()
        .unwrap()
        .to_owned();
    secrets.push(t1.clone());
    bodies.push(s.verify(&t1).await.text);
    let rotated = s.post("/v1/sessions/rotate", json!({"token": t1})).await;
    let t2 = rotated.body["token"].as_str().unwrap().to_owned();
    secrets.push(t2.clone());
    let re = s
        .post(
            "/v1/sessions/reauthenticate",
            json!({"token": t2, "auth": {"aal": 2}}),
        )
        .await;
    let t3 = re.body["token"].as_str().unwrap().to_owned();
    secrets.push(t3.clone());
    bodies.push(s.verify(&t3).await.text);
    bodies.push(s.verify(&t1).await.text);
    bodies.push(s.get(&format!("/v1/sessions/{handle}")).await.text);
    bodies.push(
        s.call(
            Method::PATCH,
            &format!("/v1/sessions/{handle}"),
            Some(json!({"data": {"k": 1}})),
        )
        .await
        .text,
    );
    bodies.push(s.get("/v1/users/audit/sessions?status=all").await.text);
    bodies.push(
        s.post("/v1/sessions/logout", json!({"token": t3}))
            .await
            .text,
    );
    bodies.push(
        s.call(Method::DELETE, &format!("/v1/sessions/{handle}"), None)
            .await
            .text,
    );
    let (t4, _, _) = s.login("audit").await;
    secrets.push(t4.clone());
    bodies.push(
        s.call(Method::DELETE, "/v1/users/audit/sessions", None)
            .await
            .text,
    );
    bodies.push(
        s.post("/v1/sessions/verify", json!({"token": t4, "nope": 1}))
            .await
            .text,
    );
    // Token mode: access and refresh tokens, refreshed and verified.
    let put = s
        .call(
            Method::PUT,
            "/v1/tenants/default/policy",
            Some(json!({"tokens": {"issuer": "https://i", "audience": "a"}})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK);
    let created = s.post("/v1/sessions", json!({"user_id": "audit"})).await;
    let mut jwts = vec![created.body["access_token"].as_str().unwrap().to_owned()];
    let refresh = created.body["refresh_token"].as_str().unwrap().to_owned();
    secrets.push(refresh.clone());
    let refreshed = s
        .post("/v1/tokens/refresh", json!({"refresh_token": refresh}))
        .await;
    secrets.push(refreshed.body["refresh_token"].as_str().unwrap().to_owned());
    jwts.push(refreshed.body["access_token"].as_str().unwrap().to_owned());
    bodies.push(
        s.post("/v1/sessions/verify", json!({"access_token": jwts[1]}))
            .await
            .text,
    );
    // Wrong keys that a log might be tempted to print.
    let wrong = format!("{}-wrong", s.key);
    secrets.push(wrong.clone());
    let _ = s
        .raw(Method::GET, "/v1/users/audit/sessions")
        .bearer_auth(&wrong)
        .send()
        .await
        .unwrap();
    let mut s = s;
    assert!(s.sigterm());
    let log = s.log_text();
    assert!(
        log.contains("session.created") && log.contains("session.revoked"),
        "audit lines are logged"
    );
    assert!(log.contains(&handle), "handles may be logged");
    for jwt in &jwts {
        let signature = jwt.rsplit('.').next().unwrap();
        assert!(
            !log.contains(signature),
            "an access token appears in the log"
        );
        for b in &bodies {
            assert!(
                !b.contains(signature),
                "an access token appears in a response"
            );
        }
    }
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret appears in the log"
        );
        let body = &secret[secret.find('_').unwrap() + 1..];
        assert!(!log.contains(body), "a secret's body appears in the log");
        for form in sha256_forms(secret) {
            assert!(!log.contains(&form), "a token hash appears in the log");
        }
        for b in &bodies {
            assert!(
                !b.contains(body),
                "a secret appears in a response that must not carry it"
            );
        }
    }
}

crate::on_every_store!(
    acknowledged_creates_and_revocations_survive_kill_9,
    sigterm_shuts_down_gracefully_and_keeps_last_seen,
    without_a_configured_key_one_is_generated_into_the_data_dir_never_open,
    configuration_layers_file_then_env_then_flags,
    no_token_hash_or_key_in_logs_or_in_bodies_that_should_not_carry_them,
);
