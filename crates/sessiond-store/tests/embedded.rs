//! The conformance suite on the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sessiond_core::store::SessionStore;
use sessiond_store::conformance::StoreFactory;
use sessiond_store::{EmbeddedOptions, EmbeddedStore};

struct Embedded(tempfile::TempDir);

impl Embedded {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
}

#[async_trait]
impl StoreFactory for Embedded {
    async fn open(&self) -> Arc<dyn SessionStore> {
        let opts = EmbeddedOptions {
            flush_interval: Duration::from_millis(50),
            ..Default::default()
        };
        Arc::new(EmbeddedStore::open(self.0.path(), opts).unwrap())
    }
}

sessiond_store::conformance_suite!(Embedded::new());

/// The change and its events commit together: when the event cannot be written, the change is
/// undone too, in memory as on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_event_cannot_be_written_is_undone() {
    use sessiond_store::conformance::{audit, record, t};
    let f = Embedded::new();
    let store = f.open().await;
    let db =
        rusqlite::Connection::open(f.0.path().join(sessiond_store::embedded::DB_FILE)).unwrap();
    let break_events = "CREATE TRIGGER refuse BEFORE INSERT ON events
                        BEGIN SELECT RAISE(ABORT, 'events are down'); END";
    let mend_events = "DROP TRIGGER refuse";
    // Reads answer `Unavailable` while the index is rebuilt after a failed commit.
    let find = |h: sessiond_core::token::SessionHandle| {
        let store = store.clone();
        async move {
            for _ in 0..100 {
                if let Ok(found) = store.find_by_handle(&h).await {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the store did not recover");
        }
    };

    db.execute_batch(break_events).unwrap();
    let (a, _) = record("zed", "default", t(0));
    assert!(store.insert(a.clone(), t(0), &audit()).await.is_err());
    assert!(
        find(a.handle.clone()).await.is_none(),
        "no session without its session.created"
    );
    db.execute_batch(mend_events).unwrap();
    store.insert(a.clone(), t(0), &audit()).await.unwrap();
    db.execute_batch(break_events).unwrap();
    assert!(
        store
            .revoke(&a.handle, "logout", t(1), &audit())
            .await
            .is_err()
    );
    assert_eq!(
        find(a.handle.clone()).await.unwrap().record.state,
        sessiond_core::session::StoredState::Active,
        "no revocation without its session.revoked"
    );
    db.execute_batch(mend_events).unwrap();
    let reopened = f.open().await;
    let events = reopened
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
