//! Secrets at rest and webhook destinations: data files readable by their owner only, signing
//! keys and webhook secrets sealed with the keyring key (read back from raw storage), token
//! mode refused on a shared store without one, and webhooks refused for internal addresses.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{BACKEND, BIN, Backend, Server};

fn secret() -> String {
    format!("whsec_{}", STANDARD.encode([42u8; 32]))
}

async fn put_hook(s: &Server, name: &str, url: &str) -> crate::harness::Resp {
    s.call(
        Method::PUT,
        &format!("/v1/webhooks/{name}"),
        Some(json!({"url": url, "events": ["session.*"], "secret": secret()})),
    )
    .await
}

async fn token_mode(s: &Server, tenant: &str) -> crate::harness::Resp {
    s.call(
        Method::PUT,
        &format!("/v1/tenants/{tenant}/policy"),
        Some(json!({"tokens": {"issuer": "https://issuer.e2e", "audience": "e2e"}})),
    )
    .await
}

const INTERNAL: &[&str] = &[
    "https://169.254.169.254/latest/meta-data/",
    "https://[::ffff:169.254.169.254]/",
    "https://[::ffff:a9fe:a9fe]/",
    "https://10.0.0.1/hook",
    "https://172.16.0.1/hook",
    "https://192.168.1.1/hook",
    "https://100.64.0.1/hook",
    "https://[fd00::1]/hook",
    "https://[fe80::1]/hook",
    "https://0.0.0.0/hook",
    "https://[::]/hook",
    "https://127.0.0.1:5432/",
    "https://[::1]/hook",
    "https://224.0.0.1/hook",
    "https://255.255.255.255/hook",
    "https://198.18.0.1/hook",
    "https://192.0.2.1/hook",
    // A name that resolves to loopback.
    "https://localhost/hook",
    "https://localhost./hook",
];

#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_without_echoing_the_url() {
    let s = Server::start();
    for url in INTERNAL {
        let r = put_hook(&s, "probe", url).await;
        r.problem(400, "webhook_url_refused");
        let host = reqwest::Url::parse(url)
            .unwrap()
            .host_str()
            .unwrap()
            .to_owned();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        assert!(
            !r.text.contains(bare) && !r.text.contains(url),
            "{url}: the detail must not repeat the URL: {}",
            r.text
        );
    }
    // Nothing was stored.
    assert_eq!(
        s.get("/v1/webhooks/probe").await.status,
        StatusCode::NOT_FOUND
    );
    // http:// to a literal loopback address stays allowed (local receivers).
    let ok = put_hook(&s, "local", "http://127.0.0.1:9/hook").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
}

#[tokio::test]
async fn allowed_hosts_admit_deliberate_internal_receivers_only() {
    let s = Server::start_with(&[(
        "SESSIOND_WEBHOOKS__ALLOWED_HOSTS",
        r#"["169.254.169.254", "10.0.0.0/8", "localhost"]"#,
    )]);
    for url in [
        "https://169.254.169.254/hook",
        "https://[::ffff:169.254.169.254]/hook",
        "https://10.1.2.3/hook",
        "https://localhost/hook",
    ] {
        let r = put_hook(&s, "internal", url).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text);
    }
    put_hook(&s, "other", "https://192.168.1.1/hook")
        .await
        .problem(400, "webhook_url_refused");
    put_hook(&s, "other", "https://169.254.169.253/hook")
        .await
        .problem(400, "webhook_url_refused");
}

/// Runs `serve` until it listens (then stops it: `true`) or exits (`false`, its stderr).
fn serve_outcome(env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_clear()
        .env("SESSIOND_API_KEY", crate::harness::new_key());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (true, String::new());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_configured_endpoint_to_an_internal_address_stops_the_start() {
    let secret = secret();
    let endpoint = |url: &'static str| {
        vec![
            ("SESSIOND_WEBHOOKS__ENDPOINTS__META__URL", url),
            ("SESSIOND_WEBHOOKS__ENDPOINTS__META__EVENTS", r#"["*"]"#),
            (
                "SESSIOND_WEBHOOKS__ENDPOINTS__META__SECRET",
                secret.as_str(),
            ),
        ]
    };
    let (ok, err) = serve_outcome(&endpoint("https://169.254.169.254/hook"));
    assert!(!ok, "must refuse to start");
    assert!(err.contains("webhooks.endpoints.meta"), "{err}");
    let mut allowed = endpoint("https://169.254.169.254/hook");
    allowed.push(("SESSIOND_WEBHOOKS__ALLOWED_HOSTS", r#"["169.254.169.254"]"#));
    let (ok, err) = serve_outcome(&allowed);
    assert!(ok, "{err}");
}

#[tokio::test]
async fn a_failed_delivery_records_one_text_whatever_the_cause() {
    let s = Server::start_with(&[
        ("SESSIOND_WEBHOOKS__POLL_INTERVAL_MS", "50"),
        ("SESSIOND_WEBHOOKS__RETRY_BASE_MS", "10"),
        ("SESSIOND_WEBHOOKS__MAX_ATTEMPTS", "1"),
    ]);
    // A closed port: the connection is refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = put_hook(&s, "closed", &format!("http://127.0.0.1:{port}/hook")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    s.login("delivery-user").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = s.get("/v1/webhooks/closed/deliveries?state=dead").await;
        if let Some(d) = d.body["deliveries"].as_array().unwrap().first() {
            assert_eq!(d["last_error"], "delivery failed", "{d}");
            assert!(d["last_status"].is_null());
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cause is in the server log.
    assert!(s.log_text().contains("connection failed"));
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

#[tokio::test]
async fn data_files_are_readable_by_their_owner_only() {
    // The server inherits this process's umask, which lets others read new files.
    assert_eq!(umask() & 0o044, 0, "run with a umask such as 022");
    let mut s = Server::start_without_key();
    assert_eq!(token_mode(&s, "files").await.status, StatusCode::OK);
    s.login("files-user").await;
    let check = |s: &Server| {
        assert_eq!(mode(&s.dir), 0o700, "data directory");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&s.dir).unwrap() {
            let p = entry.unwrap().path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
            seen.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
        for f in ["sessiond.db", "sessiond.db-wal", "api-key", "keyring-key"] {
            assert!(seen.iter().any(|n| n == f), "{f} in {seen:?}");
        }
    };
    check(&s);
    // Files made by an older version are tightened at start, and the log says so.
    std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["sessiond.db", "sessiond.db-wal", "sessiond.db-shm"] {
        let p = s.dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    s.restart();
    check(&s);
    let log = s.log_text();
    assert!(log.contains("tightened the data directory"), "{log}");
    assert!(log.contains("tightened a data file"), "{log}");
}

async fn secrets_are_sealed_in_the_store() {
    let mut s = Server::start();
    assert_eq!(token_mode(&s, "sealed").await.status, StatusCode::OK);
    let r = s
        .post("/v1/sessions", json!({"user_id": "u1", "tenant": "sealed"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert!(r.body["access_token"].is_string());
    let r = put_hook(&s, "audit", "http://127.0.0.1:9/hook").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(s.sigterm());
    let raw = s.raw_store_text().await;
    assert!(raw.contains("sealed:"), "the keyring is in the store");
    assert!(!raw.contains("plain:"), "no signing key is stored unsealed");
    assert!(
        !raw.contains("whsec_"),
        "no webhook secret is stored unsealed"
    );
    if BACKEND.with(|b| *b) == Backend::Embedded {
        let key = s.dir.join("keyring-key");
        assert_eq!(mode(&key), 0o600);
        assert!(
            s.log_text().contains("keyring-key"),
            "the log says where the key is"
        );
    }
    // Everything unseals after a restart.
    s.restart();
    let r = s
        .post("/v1/sessions", json!({"user_id": "u2", "tenant": "sealed"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(s.get("/v1/webhooks/audit").await.status, StatusCode::OK);
}

async fn a_shared_store_without_a_keyring_key_refuses_token_mode_and_webhook_secrets() {
    if BACKEND.with(|b| *b) == Backend::Embedded {
        // The embedded store generates its keyring key (see secrets_are_sealed_in_the_store).
        return;
    }
    let s = Server::start_replacing(&[("SESSIOND_JWT__KEYRING_KEY", None)]);
    token_mode(&s, "t")
        .await
        .problem(409, "keyring_key_required");
    put_hook(&s, "audit", "http://127.0.0.1:9/hook")
        .await
        .problem(409, "keyring_key_required");
    // Cookie mode works; nothing is published.
    let (token, _, _) = s.login("cookie-user").await;
    assert!(!token.is_empty());
    let jwks = s.get("/.well-known/jwks.json").await;
    assert_eq!(jwks.status, StatusCode::OK, "{}", jwks.text);
    assert_eq!(jwks.body["keys"], json!([]));
    assert!(!s.raw_store_text().await.contains("plain:"));

    // The explicit opt-in stores them unsealed, with a loud warning.
    let s = Server::start_replacing(&[
        ("SESSIOND_JWT__KEYRING_KEY", None),
        ("SESSIOND_JWT__ALLOW_UNSEALED_KEYS", Some("true")),
    ]);
    assert_eq!(token_mode(&s, "t").await.status, StatusCode::OK);
    assert!(s.log_text().contains("UNSEALED"));
}

/// A keyring and webhook secrets stored unsealed by an older version still load, and are
/// sealed at the next start with a keyring key.
#[tokio::test]
async fn secrets_stored_unsealed_by_an_older_version_load_and_get_sealed() {
    use sessiond_core::jwt::{Keyring, SigningAlg};
    use sessiond_core::store::SessionStore;
    use sessiond_core::time::{Clock, SystemClock};
    let mut s = Server::start();
    assert!(s.sigterm());
    // Write what an older version wrote, straight into the (stopped) server's store.
    let now = SystemClock.now();
    let keyring = Keyring::generate(SigningAlg::EdDSA, now, None).unwrap();
    let kid = Keyring::load(&keyring, None)
        .unwrap()
        .newest_kid()
        .unwrap()
        .to_owned();
    {
        let store = sessiond_store::embedded::EmbeddedStore::open(
            &s.dir,
            sessiond_store::embedded::EmbeddedOptions::default(),
        )
        .unwrap();
        let old = store.document("keyring").await.unwrap().map(|(v, _)| v);
        assert!(store.put_document("keyring", old, &keyring).await.unwrap());
        let hooks = json!({"hooks": {"legacy": {
            "url": "http://127.0.0.1:9/hook", "events": ["*"], "secret": secret()}}});
        assert!(
            store
                .put_document("webhooks", None, &hooks.to_string())
                .await
                .unwrap()
        );
        store.flush().await.unwrap();
    }
    assert!(keyring.contains("plain:"));
    s.restart();
    assert_eq!(token_mode(&s, "legacy").await.status, StatusCode::OK);
    let jwks = s.get("/.well-known/jwks.json").await;
    assert_eq!(jwks.body["keys"][0]["kid"], kid.as_str(), "the same key");
    assert_eq!(s.get("/v1/webhooks/legacy").await.status, StatusCode::OK);
    assert!(s.sigterm());
    // Read back as stored (the raw file may still hold the old page in free space).
    let store = sessiond_store::embedded::EmbeddedStore::open(
        &s.dir,
        sessiond_store::embedded::EmbeddedOptions::default(),
    )
    .unwrap();
    let (_, ring) = store.document("keyring").await.unwrap().unwrap();
    assert!(
        ring.contains("sealed:") && !ring.contains("plain:"),
        "the keyring was sealed"
    );
    let (_, hooks) = store.document("webhooks").await.unwrap().unwrap();
    assert!(
        hooks.contains("sealed:") && !hooks.contains("whsec_"),
        "the webhook secret was sealed"
    );
}

crate::on_every_store!(
    secrets_are_sealed_in_the_store,
    a_shared_store_without_a_keyring_key_refuses_token_mode_and_webhook_secrets,
);
