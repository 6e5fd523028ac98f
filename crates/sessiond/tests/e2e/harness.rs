//! Runs the real `sessiond` binary on a free port and a data directory of its own.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_sessiond");

/// The store a test's servers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store in the server's data directory.
    Embedded,
    /// The local PostgreSQL (`SESSIOND_TEST_POSTGRES` overrides the URL), a schema per server.
    Postgres,
    /// The local Redis (`SESSIOND_TEST_REDIS` overrides the URL), a key prefix per server.
    Redis,
    /// A Redis Cluster (`SESSIOND_TEST_REDIS_CLUSTER`, set by `scripts/test`).
    RedisCluster,
}

tokio::task_local! {
    /// The store of the running test instance.
    pub static BACKEND: Backend;
}

pub fn postgres_url() -> String {
    std::env::var("SESSIOND_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn random_suffix() -> String {
    let k = new_key();
    k[3..]
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase()
}

pub fn redis_url() -> String {
    std::env::var("SESSIOND_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn redis_cluster_url() -> String {
    std::env::var("SESSIOND_TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
        panic!("SESSIOND_TEST_REDIS_CLUSTER is not set: run the tests with scripts/test")
    })
}

/// Deletes every key under `prefix` on every node (test clean-up only).
pub fn delete_redis_prefix(url: &str, prefix: &str) {
    let nodes: Vec<String> = match url.strip_prefix("redis+cluster://") {
        Some(list) => list.split(',').map(|n| format!("redis://{n}")).collect(),
        None => vec![url.to_owned()],
    };
    for node in nodes {
        let Ok(client) = redis::Client::open(node) else {
            continue;
        };
        let Ok(mut c) = client.get_connection() else {
            continue;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut c)
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut c);
        }
    }
}

/// What a store holds for one test: a PostgreSQL schema or a Redis key prefix, removed when
/// the last server on it is gone (every process on it has been killed by then).
#[derive(Debug, Default)]
struct StoreOwner {
    pg_schema: Option<String>,
    redis: Option<(String, String)>,
}

impl Drop for StoreOwner {
    fn drop(&mut self) {
        if let Some((url, prefix)) = self.redis.take() {
            let _ = std::thread::spawn(move || delete_redis_prefix(&url, &prefix)).join();
        }
        if let Some(schema) = self.pg_schema.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(pool) = sqlx::PgPool::connect(&postgres_url()).await {
                        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                    }
                });
            })
            .join();
        }
    }
}

/// Where a server keeps its sessions: environment for the process, and a share of the store's
/// clean-up (servers on one store, and a restarted server, hold clones).
#[derive(Debug, Clone)]
struct StoreEnv {
    env: Vec<(String, String)>,
    _owner: Arc<StoreOwner>,
}

impl StoreEnv {
    fn new() -> Self {
        match BACKEND.try_with(|b| *b).unwrap_or(Backend::Embedded) {
            Backend::Embedded => Self {
                env: Vec::new(),
                _owner: Arc::default(),
            },
            backend @ (Backend::Redis | Backend::RedisCluster) => {
                let url = if backend == Backend::Redis {
                    redis_url()
                } else {
                    redis_cluster_url()
                };
                let prefix = format!("sde2e-{}", random_suffix());
                Self {
                    env: vec![
                        ("SESSIOND_STORE".into(), url.clone()),
                        ("SESSIOND_STORE_PREFIX".into(), prefix.clone()),
                        ("SESSIOND_JWT__KEYRING_KEY".into(), keyring_key()),
                    ],
                    _owner: Arc::new(StoreOwner {
                        pg_schema: None,
                        redis: Some((url, prefix)),
                    }),
                }
            }
            Backend::Postgres => {
                let schema = format!("sd_e2e_{}", random_suffix());
                Self {
                    env: vec![
                        ("SESSIOND_STORE".into(), postgres_url()),
                        ("SESSIOND_STORE_SCHEMA".into(), schema.clone()),
                        ("SESSIOND_JWT__KEYRING_KEY".into(), keyring_key()),
                    ],
                    _owner: Arc::new(StoreOwner {
                        pg_schema: Some(schema),
                        redis: None,
                    }),
                }
            }
        }
    }
}

/// A keyring key shared by the nodes of a PostgreSQL or Redis store (the embedded store
/// generates its own in the data directory).
pub fn keyring_key() -> String {
    let (_, text) = sessiond_core::jwt::SealingKey::generate().unwrap();
    text.to_string()
}

pub fn new_key() -> String {
    let (k, _) = sessiond_core::token::TokenFormat::new("sk_")
        .unwrap()
        .generate()
        .unwrap();
    k.expose().to_owned()
}

/// A running server process.
pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub key: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    store: StoreEnv,
    _tmp: Option<tempfile::TempDir>,
    http: reqwest::Client,
}

impl Server {
    /// A fresh server on a fresh data directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh server with extra environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let store = StoreEnv::new();
        let mut s = Self::spawn(
            &dir,
            Some(&new_key()),
            &env,
            store,
            tmp.path().join("sessiond.log"),
        );
        s._tmp = Some(tmp);
        s
    }

    /// A fresh server with no API key configured: it uses the one it generates in its data dir.
    pub fn start_without_key() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Self::spawn(
            &dir,
            None,
            &[],
            StoreEnv::new(),
            tmp.path().join("sessiond.log"),
        );
        s._tmp = Some(tmp);
        s
    }

    fn spawn(
        dir: &Path,
        key: Option<&str>,
        env: &[(String, String)],
        store: StoreEnv,
        log: PathBuf,
    ) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let start_len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env_clear()
            .env("SESSIOND_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        if let Some(k) = key {
            cmd.env("SESSIOND_API_KEY", k);
        }
        for (k, v) in store.env.iter().chain(env) {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let addr = wait_for_listen(&mut child, &log, start_len);
        let key = match key {
            Some(k) => k.to_owned(),
            None => std::fs::read_to_string(dir.join("api-key"))
                .unwrap()
                .trim()
                .to_owned(),
        };
        Self {
            child: Some(child),
            base: format!("http://{addr}"),
            key,
            dir: dir.to_owned(),
            log,
            env: env.to_vec(),
            store,
            _tmp: None,
            http: reqwest::Client::new(),
        }
    }

    /// Another node on this server's store, with the same API key and environment: several
    /// stateless nodes behind one load balancer. The store is cleaned up once every server on
    /// it is dropped, whichever goes last.
    pub fn start_sharing(&self) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Self::spawn(
            &tmp.path().join("data"),
            Some(&self.key),
            &self.env,
            self.store.clone(),
            tmp.path().join("sessiond.log"),
        );
        s._tmp = Some(tmp);
        s
    }

    /// `n` nodes on one fresh store (of the running test instance), sharing an API key.
    pub fn start_cluster(n: usize) -> Vec<Self> {
        assert!(n > 0);
        let first = Self::start();
        let mut nodes = Vec::with_capacity(n);
        for _ in 1..n {
            nodes.push(first.start_sharing());
        }
        nodes.insert(0, first);
        nodes
    }

    /// A fresh server on a fresh store whose environment is `env` in place of the harness's
    /// store settings for the same keys (for example without the keyring key).
    pub fn start_replacing(env: &[(&str, Option<&str>)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut store = StoreEnv::new();
        for (k, v) in env {
            store.env.retain(|(key, _)| key != k);
            if let Some(v) = v {
                store.env.push(((*k).to_owned(), (*v).to_owned()));
            }
        }
        let mut s = Self::spawn(
            &dir,
            Some(&new_key()),
            &[],
            store,
            tmp.path().join("sessiond.log"),
        );
        s._tmp = Some(tmp);
        s
    }

    /// Everything the store holds outside the session tables, as raw text read straight from
    /// storage: the SQLite files (database and WAL), the PostgreSQL `meta` table, or every
    /// hash under the Redis prefix.
    pub async fn raw_store_text(&self) -> String {
        let env = |k: &str| {
            self.store
                .env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match (
            env("SESSIOND_STORE"),
            env("SESSIOND_STORE_SCHEMA"),
            env("SESSIOND_STORE_PREFIX"),
        ) {
            (None, _, _) => {
                let mut out = String::new();
                for entry in std::fs::read_dir(&self.dir).unwrap() {
                    let p = entry.unwrap().path();
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    if name.starts_with("sessiond.db") {
                        out.push_str(&String::from_utf8_lossy(&std::fs::read(&p).unwrap()));
                    }
                }
                out
            }
            (Some(url), Some(schema), _) => {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                let sql = format!("SELECT name || '=' || value::text FROM {schema}.meta");
                let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                rows.into_iter().map(|r| r.0 + "\n").collect()
            }
            (Some(url), None, Some(prefix)) => tokio::task::spawn_blocking(move || {
                let nodes: Vec<String> = match url.strip_prefix("redis+cluster://") {
                    Some(list) => list.split(',').map(|n| format!("redis://{n}")).collect(),
                    None => vec![url.clone()],
                };
                let mut out = String::new();
                for node in nodes {
                    let mut c = redis::Client::open(node).unwrap().get_connection().unwrap();
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{prefix}:*"))
                        .query(&mut c)
                        .unwrap();
                    for k in keys {
                        let kind: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
                        if kind == "hash" {
                            let v: Vec<String> = redis::cmd("HGETALL")
                                .arg(&k)
                                .query(&mut c)
                                .unwrap_or_default();
                            out.push_str(&format!("{k}={}\n", v.join(" ")));
                        }
                    }
                }
                out
            })
            .await
            .unwrap(),
            _ => unreachable!("a shared store has a schema or a prefix"),
        }
    }

    /// The process's thread count and resident memory (KiB), from `/proc`.
    pub fn threads_and_rss(&self) -> (u64, u64) {
        let pid = self.child.as_ref().map(Child::id).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (field("Threads:"), field("VmRSS:"))
    }

    /// Kills the process with SIGKILL (no chance to flush or clean up) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits; returns whether it exited successfully.
    pub fn sigterm(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "sessiond did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().map(Child::id).unwrap();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Starts the server again on the same data directory, key and log.
    pub fn restart(&mut self) {
        self.kill9();
        let tmp = self._tmp.take();
        // The new process's Server shares the store (and its clean-up).
        let store = self.store.clone();
        let mut s = Self::spawn(
            &self.dir.clone(),
            Some(&self.key.clone()),
            &self.env.clone(),
            store,
            self.log.clone(),
        );
        s._tmp = tmp;
        *self = s;
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        std::fs::File::open(&self.log)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    /// Sends a request with the API key; answers status, headers and JSON body (Null if none).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        Resp::from(req.send().await.unwrap()).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, None).await
    }

    /// A request built by the caller (for headers and bodies the helpers do not send).
    pub fn raw(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// Creates a session for `user` and answers (token, handle, body).
    pub async fn login(&self, user: &str) -> (String, String, Value) {
        let r = self
            .post("/v1/sessions", serde_json::json!({"user_id": user}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let token = r.body["token"].as_str().unwrap().to_owned();
        let handle = r.body["session"]["handle"].as_str().unwrap().to_owned();
        (token, handle, r.body)
    }

    /// Runs a `sessiond` command (such as `keys rotate`) on this server's store and data
    /// directory; answers its exit status and standard output.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .env_clear()
            .stderr(Stdio::inherit());
        for (k, v) in self.store.env.iter().chain(&self.env) {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    pub async fn verify(&self, token: &str) -> Resp {
        self.post("/v1/sessions/verify", serde_json::json!({"token": token}))
            .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The store's clean-up runs after this, when the last share of it is dropped.
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub async fn from(r: reqwest::Response) -> Self {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
            text,
        }
    }

    /// Asserts a problem response with this status and code.
    #[track_caller]
    pub fn problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        assert_eq!(self.body["code"], code, "{}", self.text);
        assert_eq!(self.body["status"], status);
        assert_eq!(
            self.headers.get("content-type").unwrap().to_str().unwrap(),
            "application/problem+json"
        );
        assert!(
            self.body["title"].is_string()
                && self.body["detail"].is_string()
                && self.body["type"].is_string()
        );
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn wait_for_listen(child: &mut Child, log: &Path, from: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let text = text.get(from as usize..).unwrap_or("");
        if let Some(line) = text.lines().find(|l| l.contains("sessiond listening")) {
            let addr = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            return addr.to_owned();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("sessiond exited with {status} before listening; log:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "sessiond did not start; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
