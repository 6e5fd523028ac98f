//! The conformance suite on PostgreSQL (the local server; `SESSIOND_TEST_POSTGRES` overrides the
//! URL). Each case runs in a schema of its own, dropped afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sessiond_core::store::SessionStore;
use sessiond_store::conformance::StoreFactory;
use sessiond_store::postgres::{PostgresOptions, PostgresStore};

fn url() -> String {
    std::env::var("SESSIOND_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

struct Pg {
    schema: String,
}

impl Pg {
    fn new() -> Self {
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
            schema: format!("sd_test_{}", suffix.to_ascii_lowercase()),
        }
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions {
            schema: Some(self.schema.clone()),
            flush_interval: Duration::from_millis(50),
            max_connections: 8,
            ..PostgresOptions::new(&url())
        }
    }
}

#[async_trait]
impl StoreFactory for Pg {
    async fn open(&self) -> Arc<dyn SessionStore> {
        let store = PostgresStore::connect(self.options()).unwrap();
        store.migrate(Some(&self.schema)).await.unwrap();
        Arc::new(store)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&url()).await {
                    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
            });
        })
        .join();
    }
}

sessiond_store::conformance_suite!(Pg::new());
