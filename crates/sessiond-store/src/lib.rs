//! Storage backends for sessiond, and the conformance suite every backend must pass.
//!
//! - [`embedded`]: the default store, SQLite (WAL) on local disk with an in-memory index.
//! - [`conformance`]: the store contract as tests, written once and run against every backend.

pub mod conformance;
pub mod embedded;
pub mod postgres;
pub mod redis;
pub mod row;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
