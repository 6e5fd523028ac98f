//! Storage backends for sessiond, and the conformance suite every backend must pass.
//!
//! - [`embedded`]: the default store, SQLite (WAL) on local disk with an in-memory index.
//! - [`cache`]: a coherent node-local session cache in front of the shared stores.
//! - [`conformance`]: the store contract as tests, written once and run against every backend.

pub mod cache;
pub mod conformance;
pub mod embedded;
pub mod postgres;
pub mod redis;
pub mod row;

pub use cache::{CacheOptions, CachedStore};
pub use embedded::{EmbeddedOptions, EmbeddedStore};
