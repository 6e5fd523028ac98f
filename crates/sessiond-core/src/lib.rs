//! The sessiond domain, with no I/O of its own.
//!
//! - [`token`]: secret tokens, their hashes, handles, user and tenant ids;
//! - [`time`]: timestamps and the [`time::Clock`] port;
//! - [`policy`]: validated tenant policies;
//! - [`session`]: the session record and the lifecycle rules (expiry, step-up, limits, data);
//! - [`store`]: the [`store::SessionStore`] port every backend implements;
//! - [`events`]: events, the [`events::Audit`] context and the [`events::EventSink`] port;
//! - [`guard`]: brute-force and creation limits in bounded memory;
//! - [`geo`]: the geolocation port and impossible-travel detection;
//! - [`jwt`], [`keys`], [`refresh`]: token mode: signed access tokens, the shared keyring, and
//!   rotating refresh tokens with reuse detection;
//! - [`service`]: [`service::SessionService`], the operations of the API over those ports.

pub mod capacity;
pub mod cookie;
pub mod device;
pub mod error;
pub mod events;
pub mod geo;
pub mod guard;
pub mod jwt;
pub mod keys;
pub mod policy;
pub mod refresh;
pub mod service;
pub mod session;
pub mod store;
pub mod time;
pub mod token;
pub mod wire;

pub use error::CoreError;

/// The wire types, re-exported so that crates below the server need not depend on them directly.
pub use sessiond_api as api;
