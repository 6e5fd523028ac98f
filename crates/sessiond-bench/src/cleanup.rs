//! Benchmarks on a shared store run in a namespace of their own (a PostgreSQL schema, a Redis
//! key prefix) and remove it afterwards, so they never touch other data on the server.

use anyhow::Context;
use sessiond_core::token::TokenFormat;
use sessiond_server::config::Config;

use crate::http::Store;

/// What a run leaves behind on a shared store, to remove once its server stopped.
#[derive(Debug)]
pub enum Cleanup {
    /// Nothing (the embedded store lives in a temporary directory).
    Nothing,
    /// Drop this schema.
    Schema {
        /// The PostgreSQL URL.
        url: String,
        /// The run's schema.
        schema: String,
    },
    /// Delete every key under this prefix, on every node.
    Prefix {
        /// The Redis URL.
        url: String,
        /// The run's prefix.
        prefix: String,
    },
}

/// Twelve random lowercase alphanumerics, for namespaces.
pub fn suffix() -> anyhow::Result<String> {
    let (t, _) = TokenFormat::new("")?.generate()?;
    Ok(t.expose()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase())
}

impl Cleanup {
    /// Points `config` at `store`, in a fresh namespace, and answers how to remove it.
    pub fn configure(config: &mut Config, store: &Store) -> anyhow::Result<Self> {
        Ok(match store {
            Store::Embedded => Self::Nothing,
            Store::Postgres(url) => {
                let schema = format!("sd_bench_{}", suffix()?);
                config.store = Some(url.clone());
                config.store_schema = Some(schema.clone());
                Self::Schema {
                    url: url.clone(),
                    schema,
                }
            }
            Store::Redis(url) => {
                let prefix = format!("sdbench-{}", suffix()?);
                config.store = Some(url.clone());
                config.store_prefix = prefix.clone();
                Self::Prefix {
                    url: url.clone(),
                    prefix,
                }
            }
        })
    }

    /// Removes the namespace.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Nothing => Ok(()),
            Self::Schema { url, schema } => {
                let pool = sqlx::PgPool::connect(&url)
                    .await
                    .context("cannot connect to PostgreSQL to drop the bench schema")?;
                // The schema name is ours: `sd_bench_` and lowercase alphanumerics.
                let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .context("cannot drop the bench schema")?;
                pool.close().await;
                Ok(())
            }
            Self::Prefix { url, prefix } => {
                tokio::task::spawn_blocking(move || delete_prefix(&url, &prefix))
                    .await
                    .context("the clean-up task failed")?
            }
        }
    }
}

/// Deletes every key under `prefix` on every node named by `url`, with `SCAN` (never `KEYS`).
fn delete_prefix(url: &str, prefix: &str) -> anyhow::Result<()> {
    let nodes: Vec<String> = match url
        .strip_prefix("redis+cluster://")
        .map(|n| ("redis", n))
        .or_else(|| url.strip_prefix("rediss+cluster://").map(|n| ("rediss", n)))
    {
        Some((scheme, list)) => {
            let (auth, hosts) = match list.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, list),
            };
            hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| match auth {
                    Some(a) => format!("{scheme}://{a}@{h}"),
                    None => format!("{scheme}://{h}"),
                })
                .collect()
        }
        None => vec![url.to_owned()],
    };
    for node in nodes {
        let client = redis::Client::open(node.as_str()).context("bad Redis URL")?;
        let mut c = client
            .get_connection()
            .context("cannot connect to Redis to delete the bench keys")?;
        let pattern = format!("{prefix}:*");
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
                .context("SCAN failed")?;
            for k in keys {
                // One key per DEL: on a cluster node every key may be in another slot.
                let _: () = redis::cmd("DEL")
                    .arg(k)
                    .query(&mut c)
                    .context("DEL failed")?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}
