//! The conformance suite on PostgreSQL (the local server; `SESSIOND_TEST_POSTGRES` overrides the
//! URL). Each case runs in a schema of its own, dropped afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sessiond_core::store::SessionStore;
use sessiond_store::cache::{CacheOptions, CachedStore};
use sessiond_store::conformance::{StoreFactory, coherence};
use sessiond_store::postgres::{FEED_APPLICATION_NAME, PostgresOptions, PostgresStore};

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

/// The clock of the cached nodes: the suite's start of time.
fn cache_clock() -> Arc<dyn sessiond_core::time::Clock> {
    Arc::new(sessiond_core::time::ManualClock::new(
        sessiond_store::conformance::t(0),
    ))
}

/// A node with a session cache on the schema of `pg`.
async fn cached_node(pg: &Pg) -> Arc<CachedStore> {
    let store = PostgresStore::connect(pg.options()).unwrap();
    store.migrate(Some(&pg.schema)).await.unwrap();
    let feed = store.change_feed();
    let node = Arc::new(CachedStore::with_feed(
        Arc::new(store),
        feed,
        &CacheOptions {
            heartbeat: Duration::from_millis(500),
            ..CacheOptions::default()
        },
        cache_clock(),
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

/// The conformance suite through the session cache.
mod cached {
    use super::*;

    pub(super) struct CachedPg(pub(super) Pg);

    #[async_trait]
    impl StoreFactory for CachedPg {
        async fn open(&self) -> Arc<dyn SessionStore> {
            cached_node(&self.0).await
        }
    }

    sessiond_store::conformance_suite!(CachedPg(Pg::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_nodes_see_each_others_changes() {
    let pg = Pg::new();
    let a = cached_node(&pg).await;
    let b = cached_node(&pg).await;
    coherence::changes_through_another_node_reach_the_cache(&a, &*b).await;
    // And the other way round, with B's cache warm too.
    let pg = Pg::new();
    let a = cached_node(&pg).await;
    let b = cached_node(&pg).await;
    coherence::changes_through_another_node_reach_the_cache(&b, &*a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_node_whose_listener_is_killed_serves_nothing_stale() {
    let pg = Pg::new();
    let a = cached_node(&pg).await;
    let b = PostgresStore::connect(pg.options()).unwrap();
    let pool = sqlx::PgPool::connect(&url()).await.unwrap();
    coherence::a_lost_feed_is_distrusted_at_once(&a, &b, || async {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(FEED_APPLICATION_NAME)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(killed.iter().any(|k| *k), "a feed listener was found");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_are_not_announced_but_changes_are() {
    use sessiond_store::conformance::{audit, record, t};
    let pg = Pg::new();
    let store = pg.open().await;
    let mut listener = sqlx::postgres::PgListener::connect(&url()).await.unwrap();
    let channel = format!("sdc_{}", pg.schema);
    listener.listen(&channel).await.unwrap();
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
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        n.payload(),
        rec.handle.as_str(),
        "the creation and the use say nothing; the revocation does"
    );
}

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
