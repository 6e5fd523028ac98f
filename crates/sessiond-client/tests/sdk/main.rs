//! The SDK's tests, in one binary: the client against a recording server, the access token
//! verifier against a local JWKS server. None needs a sessiond server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod client;
mod support;
mod verifier;
