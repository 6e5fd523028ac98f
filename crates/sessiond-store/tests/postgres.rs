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

/// The change and its events commit together: when the event cannot be written, the change is
/// undone too (and the other way round, nothing is recorded for a change that did not happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_event_cannot_be_written_is_undone() {
    use sessiond_store::conformance::{audit, record, t};
    let pg = Pg::new();
    let store = pg.open().await;
    let pool = sqlx::PgPool::connect(&url()).await.unwrap();
    let schema = &pg.schema;
    let exec = |sql: String| {
        let pool = pool.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    exec(format!(
        "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'events are down'; END $$"
    ))
    .await;
    let break_events = format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON {schema}.events
         FOR EACH ROW EXECUTE FUNCTION {schema}.refuse()"
    );
    let mend_events = format!("DROP TRIGGER refuse ON {schema}.events");

    exec(break_events.clone()).await;
    let (a, _) = record("zed", "default", t(0));
    assert!(store.insert(a.clone(), t(0), &audit()).await.is_err());
    assert!(
        store.find_by_handle(&a.handle).await.unwrap().is_none(),
        "no session without its session.created"
    );

    exec(mend_events.clone()).await;
    store.insert(a.clone(), t(0), &audit()).await.unwrap();
    exec(break_events).await;
    assert!(
        store
            .revoke(&a.handle, "logout", t(1), &audit())
            .await
            .is_err()
    );
    let s = store.find_by_handle(&a.handle).await.unwrap().unwrap();
    assert_eq!(
        s.record.state,
        sessiond_core::session::StoredState::Active,
        "no revocation without its session.revoked"
    );
    exec(mend_events).await;
    let events = store
        .events(&sessiond_core::store::EventQuery {
            handle: Some(a.handle.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec!["session.created"]);
}
