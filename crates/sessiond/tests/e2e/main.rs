//! End-to-end tests: the real `sessiond` binary driven over a socket.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api;
mod connections;
mod errors;
mod events;
mod harness;
mod lifecycle;
mod metrics;
mod multinode;
mod outage;
mod process;
mod protection;
mod readme;
mod secrets;
mod tokens;

/// Instantiates each named `async fn` test once per store: `<name>::embedded`,
/// `<name>::postgres`, `<name>::redis`,
/// `<name>::redis_cluster`. The harness starts servers on the store of the running instance.
#[macro_export]
macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use $crate::harness::{Backend, BACKEND};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    BACKEND.scope(Backend::Embedded, super::$case()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    BACKEND.scope(Backend::Postgres, super::$case()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    BACKEND.scope(Backend::Redis, super::$case()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis_cluster() {
                    BACKEND.scope(Backend::RedisCluster, super::$case()).await
                }
            }
        )*
    };
}

/// Instantiates each test on the shared stores (the embedded store belongs to one process).
#[macro_export]
macro_rules! on_shared_stores {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use $crate::harness::{Backend, BACKEND};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    BACKEND.scope(Backend::Postgres, super::$case()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    BACKEND.scope(Backend::Redis, super::$case()).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis_cluster() {
                    BACKEND.scope(Backend::RedisCluster, super::$case()).await
                }
            }
        )*
    };
}
