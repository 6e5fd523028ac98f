//! Connections: caps per peer and in total, header-read and idle timeouts, the header buffer,
//! protocols, the `Authorization` scheme, TLS and its reloads, the health listener.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::Server;

/// The first line of a request whose head never ends.
const HALF_OPEN: &[u8] = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n";

/// Generous bound for anything the server should do promptly (not a latency assertion).
const PATIENCE: Duration = Duration::from_secs(30);

fn addr_of(s: &Server) -> SocketAddr {
    s.base
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

/// A connection from `from` (a loopback address) to `to`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    sock.connect(to).await.unwrap()
}

/// A connection that has sent part of a request head and nothing more.
async fn half_open(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, to).await;
    s.write_all(HALF_OPEN).await.unwrap();
    s
}

/// Whether the server closes `s` (end of stream or reset) before `PATIENCE` runs out.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A client that waits long enough for anything but a server that does not answer.
fn patient_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

async fn healthz(client: &reqwest::Client, addr: SocketAddr) -> Result<StatusCode, String> {
    client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .map(|r| r.status())
        .map_err(|e| e.to_string())
}

/// Creates and verifies a session with `client`, which must succeed.
async fn create_and_verify(s: &Server, client: &reqwest::Client, user: &str) {
    let created = client
        .post(format!("{}/v1/sessions", s.base))
        .bearer_auth(&s.key)
        .json(&json!({"user_id": user}))
        .send()
        .await
        .expect("create failed");
    assert_eq!(created.status(), StatusCode::CREATED);
    let body: serde_json::Value = created.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    let verified = client
        .post(format!("{}/v1/sessions/verify", s.base))
        .bearer_auth(&s.key)
        .json(&json!({"token": token}))
        .send()
        .await
        .expect("verify failed");
    assert_eq!(verified.status(), StatusCode::OK);
}

/// The value of a metric line starting with `prefix` (0 if absent).
async fn metric(s: &Server, prefix: &str) -> f64 {
    let text = s
        .raw(reqwest::Method::GET, "/metrics")
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holding_half_open_connections_does_not_stop_the_others() {
    let s = Server::start_with(&[
        ("SESSIOND_MAX_CONNECTIONS_PER_PEER", "16"),
        ("SESSIOND_HEADER_READ_TIMEOUT_MS", "600000"),
    ]);
    let addr = addr_of(&s);
    // 127.0.0.2 holds its whole share, and tries for more.
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(half_open([127, 0, 0, 2], addr).await);
    }
    let mut beyond = Vec::new();
    for _ in 0..16 {
        beyond.push(half_open([127, 0, 0, 2], addr).await);
    }
    // Those beyond the cap are closed at once rather than queued.
    for c in &mut beyond {
        assert!(
            closed_by_server(c).await,
            "a connection past the cap was kept"
        );
    }
    // Everyone else is served.
    let client = patient_client();
    for i in 0..5 {
        create_and_verify(&s, &client, &format!("u-{i}")).await;
        assert_eq!(healthz(&client, addr).await, Ok(StatusCode::OK));
    }
    assert!(
        metric(&s, "sessiond_connections_shed_total{reason=\"per_peer\"}").await >= 16.0,
        "sheds not counted"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_global_cap_new_connections_are_closed_not_queued() {
    let s = Server::start_with(&[
        ("SESSIOND_MAX_CONNECTIONS", "8"),
        ("SESSIOND_MAX_CONNECTIONS_PER_PEER", "4"),
        ("SESSIOND_HEADER_READ_TIMEOUT_MS", "600000"),
    ]);
    let addr = addr_of(&s);
    let mut held = Vec::new();
    for from in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        for _ in 0..4 {
            held.push(half_open(from, addr).await);
        }
    }
    let mut late = half_open([127, 0, 0, 4], addr).await;
    assert!(closed_by_server(&mut late).await, "queued at the cap");
    // Once the holders go, the server serves again.
    drop(held);
    let client = patient_client();
    let deadline = Instant::now() + PATIENCE;
    while healthz(&client, addr).await != Ok(StatusCode::OK) {
        assert!(
            Instant::now() < deadline,
            "not serving after the holders left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(
            &s,
            "sessiond_connections_shed_total{reason=\"max_connections\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_closed_after_the_header_timeout() {
    let s = Server::start_with(&[("SESSIOND_HEADER_READ_TIMEOUT_MS", "300")]);
    let addr = addr_of(&s);
    let mut partial = half_open([127, 0, 0, 1], addr).await;
    assert!(
        closed_by_server(&mut partial).await,
        "partial head kept open"
    );
    let mut silent = connect_from([127, 0, 0, 1], addr).await;
    assert!(
        closed_by_server(&mut silent).await,
        "silent connection kept open"
    );
    assert!(
        metric(
            &s,
            "sessiond_connections_timeouts_total{timeout=\"header\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // The header timeout is long: only the idle timeout can close the connection.
    let s = Server::start_with(&[
        ("SESSIOND_HEADER_READ_TIMEOUT_MS", "600000"),
        ("SESSIOND_IDLE_TIMEOUT_MS", "300"),
    ]);
    let mut c = connect_from([127, 0, 0, 1], addr_of(&s)).await;
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(closed_by_server(&mut c).await, "idle connection kept open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kib_header_gets_431() {
    let s = Server::start();
    let mut c = connect_from([127, 0, 0, 1], addr_of(&s)).await;
    let mut req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let (mut r, mut w) = c.split();
    let (_, answer) = tokio::join!(w.write_all(&req), async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, r.read_to_end(&mut out)).await;
        out
    });
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
}

/// Answers the status of `GET /healthz` over cleartext HTTP/2 with prior knowledge, if any.
async fn h2c_healthz(addr: SocketAddr) -> Option<u16> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("http://{addr}/healthz"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.ok()?;
        Some(res.status().as_u16())
    };
    tokio::time::timeout(PATIENCE, attempt).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http2_with_prior_knowledge_is_off_unless_configured() {
    let off = Server::start();
    assert_eq!(h2c_healthz(addr_of(&off)).await, None);
    // HTTP/1.1 still works.
    assert_eq!(
        healthz(&patient_client(), addr_of(&off)).await,
        Ok(StatusCode::OK)
    );
    let on = Server::start_with(&[("SESSIOND_HTTP2_CLEARTEXT", "true")]);
    assert_eq!(h2c_healthz(addr_of(&on)).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = Server::start();
    for scheme in ["Bearer", "bearer", "BEARER", "BeArEr"] {
        let r = s
            .raw(reqwest::Method::GET, "/v1/webhooks")
            .header("authorization", format!("{scheme} {}", s.key))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    let r = s
        .raw(reqwest::Method::GET, "/v1/webhooks")
        .header("authorization", format!("Basic {}", s.key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_answers_while_the_api_listener_is_full() {
    let s = Server::start_with(&[
        ("SESSIOND_HEALTH_LISTEN", "127.0.0.1:0"),
        ("SESSIOND_MAX_CONNECTIONS", "4"),
        ("SESSIOND_HEADER_READ_TIMEOUT_MS", "600000"),
    ]);
    let log = s.log_text();
    let health: SocketAddr = log
        .lines()
        .find(|l| l.contains("health checks listening"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .expect("no health listener in the log")
        .parse()
        .unwrap();
    let api = addr_of(&s);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(half_open([127, 0, 0, 2], api).await);
    }
    // The API listener is full: a new connection to it is closed...
    let mut late = half_open([127, 0, 0, 1], api).await;
    assert!(closed_by_server(&mut late).await);
    // ...while the health listener answers (and serves nothing else).
    let client = patient_client();
    for _ in 0..3 {
        assert_eq!(healthz(&client, health).await, Ok(StatusCode::OK));
    }
    let readyz = client
        .get(format!("http://{health}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), StatusCode::OK);
    let api_route = client
        .get(format!("http://{health}/v1/webhooks"))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(api_route.status(), StatusCode::NOT_FOUND);
    drop(held);
}

// ---- TLS ----

/// A self-signed certificate for `127.0.0.1` and `localhost`: (certificate PEM, key PEM, DER).
fn self_signed() -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    // Written beside and renamed, so a reload never reads half a file.
    std::fs::write(dir.join("key.tmp"), key).unwrap();
    std::fs::write(dir.join("cert.tmp"), cert).unwrap();
    std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
}

fn tls_client_config(roots: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection with its HTTP/1.1 sender; answers the certificate the server presented.
async fn tls_connection(
    addr: SocketAddr,
    roots: &[&[u8]],
) -> (
    Vec<u8>,
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(roots));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (presented, send)
}

async fn get_on(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> u16 {
    send.ready().await.unwrap();
    let req = hyper::Request::get("/healthz")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    status
}

/// A server on TLS with the first of two certificates; answers both DERs and the directory.
fn tls_server(extra: &[(&str, &str)]) -> (Server, tempfile::TempDir, (String, String, Vec<u8>)) {
    let dir = tempfile::tempdir().unwrap();
    let first = self_signed();
    write_pair(dir.path(), &first.0, &first.1);
    let cert = dir.path().join("cert.pem").display().to_string();
    let key = dir.path().join("key.pem").display().to_string();
    let mut env = vec![
        ("SESSIOND_TLS__CERT_FILE", cert.as_str()),
        ("SESSIOND_TLS__KEY_FILE", key.as_str()),
    ];
    env.extend_from_slice(extra);
    (Server::start_with(&env), dir, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_api_to_a_client_trusting_the_certificate() {
    let (s, _dir, (cert_pem, _, _)) = tls_server(&[]);
    let addr = addr_of(&s);
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let created = client
        .post(format!("https://localhost:{}/v1/sessions", addr.port()))
        .bearer_auth(&s.key)
        .json(&json!({"user_id": "u-tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    // Plain HTTP on the TLS port gets no answer.
    let plain = patient_client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_tls_1_1_client() {
    let (s, _dir, _) = tls_server(&[]);
    let mut c = TcpStream::connect(addr_of(&s)).await.unwrap();
    // A TLS 1.1 ClientHello: two RSA cipher suites, no extensions.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x02,
    ];
    hello.extend([7u8; 32]);
    hello.extend([0x00, 0x00, 0x04, 0x00, 0x2f, 0x00, 0x35, 0x01, 0x00]);
    c.write_all(&hello).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, c.read_to_end(&mut answer)).await;
    // An alert (content type 21), never a ServerHello (22).
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");
}

/// Replaces the certificate, triggers a reload with `trigger`, and checks that new connections
/// get the new certificate while an open keep-alive connection keeps working.
async fn reload_case(extra: &[(&str, &str)], sighup: bool) {
    let (s, dir, first) = tls_server(extra);
    let addr = addr_of(&s);
    let second = self_signed();
    let roots: [&[u8]; 2] = [&first.2, &second.2];
    let (presented, mut old) = tls_connection(addr, &roots).await;
    assert_eq!(presented, first.2);
    assert_eq!(get_on(&mut old).await, 200);

    // A bad file first: the current certificate stays.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    if sighup {
        s.signal("HUP");
    }
    let deadline = Instant::now() + PATIENCE;
    while !s.log_text().contains("TLS certificate reload failed") {
        assert!(Instant::now() < deadline, "the bad file was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tls_connection(addr, &roots).await.0, first.2);

    write_pair(dir.path(), &second.0, &second.1);
    if sighup {
        s.signal("HUP");
    }
    loop {
        let (presented, _) = tls_connection(addr, &roots).await;
        if presented == second.2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection opened before the reload still works.
    assert_eq!(get_on(&mut old).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_reloads_the_certificate_on_sighup() {
    // Files are polled only hourly: the signal does the reload.
    reload_case(&[("SESSIOND_TLS__RELOAD_INTERVAL_S", "3600")], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_reloads_the_certificate_when_the_files_change() {
    reload_case(&[("SESSIOND_TLS__RELOAD_INTERVAL_S", "1")], false).await;
}

#[test]
fn tls_with_a_missing_file_refuses_to_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem").display().to_string();
    let key = crate::harness::new_key();
    let (ok, out) = crate::process::run_serve(
        &[
            ("SESSIOND_API_KEY", key.as_str()),
            ("SESSIOND_TLS__CERT_FILE", missing.as_str()),
            ("SESSIOND_TLS__KEY_FILE", missing.as_str()),
        ],
        &[],
    );
    assert!(!ok);
    assert!(out.contains("tls.cert_file"), "{out}");
}
