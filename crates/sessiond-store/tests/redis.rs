//! The conformance suite on Redis: the local server (`SESSIOND_TEST_REDIS` overrides the URL),
//! and a Redis Cluster (`SESSIOND_TEST_REDIS_CLUSTER`, which `scripts/test` starts and sets).
//! Each case uses a key prefix of its own, deleted afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sessiond_core::store::SessionStore;
use sessiond_store::conformance::StoreFactory;
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

#[async_trait]
impl StoreFactory for Redis {
    async fn open(&self) -> Arc<dyn SessionStore> {
        let opts = RedisOptions {
            prefix: self.prefix.clone(),
            flush_interval: Duration::from_millis(50),
            retention: Duration::from_secs(24 * 3600),
            ..RedisOptions::new(&self.url)
        };
        Arc::new(RedisStore::connect(opts).unwrap())
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
