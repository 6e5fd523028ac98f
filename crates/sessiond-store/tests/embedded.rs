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
