//! The conformance suite on Redis: the local server (`SESSIOND_TEST_REDIS` overrides the URL),
//! and a Redis Cluster (`SESSIOND_TEST_REDIS_CLUSTER`, which `scripts/test` starts and sets).
//! Each case uses a key prefix of its own, deleted afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sessiond_core::store::SessionStore;
use sessiond_store::cache::{CacheOptions, CachedStore};
use sessiond_store::conformance::{StoreFactory, coherence};
use sessiond_store::redis::{RedisOptions, RedisStore};

fn url() -> String {
    std::env::var("SESSIOND_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn cluster_url() -> String {
    std::env::var("SESSIOND_TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
        panic!(
            "SESSIOND_TEST_REDIS_CLUSTER is not set: run the tests with scripts/test, which \
             starts a local Redis Cluster"
        )
    })
}

struct Redis {
    url: String,
    prefix: String,
}

impl Redis {
    fn new() -> Self {
        Self::at(url())
    }

    fn cluster() -> Self {
        Self::at(cluster_url())
    }

    fn at(url: String) -> Self {
        let (t, _) = sessiond_core::token::TokenFormat::new("")
            .unwrap()
            .generate()
            .unwrap();
        let suffix: String = t
            .expose()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        Self {
            url,
            prefix: format!("sdtest-{suffix}"),
        }
    }
}

/// Deletes every key under `prefix`, on every node of a cluster URL. Test clean-up only: the
/// store itself never scans the keyspace.
fn delete_prefix(url: &str, prefix: &str) {
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

impl Redis {
    fn store(&self) -> RedisStore {
        let opts = RedisOptions {
            prefix: self.prefix.clone(),
            flush_interval: Duration::from_millis(50),
            retention: Duration::from_secs(24 * 3600),
            ..RedisOptions::new(&self.url)
        };
        RedisStore::connect(opts).unwrap()
    }

    /// A node with a session cache on this prefix.
    async fn cached_node(&self) -> Arc<CachedStore> {
        let store = self.store();
        let feed = store.change_feed();
        let node = Arc::new(CachedStore::with_feed(
            Arc::new(store),
            feed,
            &CacheOptions {
                heartbeat: Duration::from_millis(500),
                ..CacheOptions::default()
            },
            Arc::new(sessiond_core::time::ManualClock::new(
                sessiond_store::conformance::t(0),
            )),
            None,
        ));
        // Serving from the cache as soon as it may (the suite also passes before).
        for _ in 0..500 {
            if node.cache().is_trusted() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node
    }
}

#[async_trait]
impl StoreFactory for Redis {
    async fn open(&self) -> Arc<dyn SessionStore> {
        Arc::new(self.store())
    }
}

/// The suite through the session cache.
struct Cached(Redis);

#[async_trait]
impl StoreFactory for Cached {
    async fn open(&self) -> Arc<dyn SessionStore> {
        self.0.cached_node().await
    }
}

/// The nodes of a Redis URL (each node of a cluster URL).
fn nodes(url: &str) -> Vec<String> {
    match url.strip_prefix("redis+cluster://") {
        Some(list) => list.split(',').map(|n| format!("redis://{n}")).collect(),
        None => vec![url.to_owned()],
    }
}

/// Kills the subscribers' connections on every node.
async fn kill_subscribers(url: &str) {
    let mut killed = 0;
    for node in nodes(url) {
        let client = redis::Client::open(node).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut c)
            .await
            .unwrap();
        killed += n;
    }
    assert!(killed > 0, "a subscriber was found");
}

async fn coherent(r: Redis) {
    let a = r.cached_node().await;
    let b = r.cached_node().await;
    coherence::changes_through_another_node_reach_the_cache(&a, &*b).await;
}

async fn feed_loss(r: Redis) {
    let a = r.cached_node().await;
    let b = r.store();
    let url = r.url.clone();
    coherence::a_lost_feed_is_distrusted_at_once(&a, &b, || kill_subscribers(&url)).await;
}

/// Every change is published with it, uses are not.
async fn announced(r: Redis) {
    use futures_util::StreamExt as _;
    use sessiond_store::conformance::{audit, record, t};
    let store = r.store();
    // Any node of a cluster hears every publication.
    let mut subs = Vec::new();
    for node in nodes(&r.url) {
        let mut p = redis::Client::open(node)
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        p.subscribe(format!("{}:changes", r.prefix)).await.unwrap();
        subs.push(p);
    }
    let (rec, hash) = record("uma", "default", t(0));
    store.insert(rec.clone(), t(0), &audit()).await.unwrap();
    let found = store.find_by_token(&hash).await.unwrap().unwrap();
    let policy = store.policy(&rec.tenant).await.unwrap();
    store.touch(&found, &policy, t(5)).await.unwrap();
    store.flush().await.unwrap();
    store
        .revoke(&rec.handle, "logout", t(6), &audit())
        .await
        .unwrap();
    for p in &mut subs {
        let m = tokio::time::timeout(Duration::from_secs(5), p.on_message().next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.get_payload::<String>().unwrap(),
            rec.handle.as_str(),
            "the creation and the use say nothing; the revocation does"
        );
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        let _ = std::thread::spawn(move || delete_prefix(&url, &prefix)).join();
    }
}

mod single {
    sessiond_store::conformance_suite!(super::Redis::new());
}

mod cluster {
    sessiond_store::conformance_suite!(super::Redis::cluster());
}

mod cached_single {
    sessiond_store::conformance_suite!(super::Cached(super::Redis::new()));
}

mod cached_cluster {
    sessiond_store::conformance_suite!(super::Cached(super::Redis::cluster()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_nodes_see_each_others_changes() {
    coherent(Redis::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_nodes_see_each_others_changes_on_a_cluster() {
    coherent(Redis::cluster()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_node_whose_subscription_is_killed_serves_nothing_stale() {
    feed_loss(Redis::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_node_whose_cluster_subscription_is_killed_serves_nothing_stale() {
    feed_loss(Redis::cluster()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_published_and_uses_are_not() {
    announced(Redis::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_published_to_every_cluster_node() {
    announced(Redis::cluster()).await;
}
