//! The sessiond SDK for applications.
//!
//! - [`Client`]: a typed async client for the sessiond HTTP API v1, one method per endpoint,
//!   speaking the wire types of [`sessiond_api`] (re-exported as [`api`]). Errors are
//!   [`Error`]; a problem response is [`Error::Api`], whose [`Error::code`] is the stable code to
//!   branch on.
//! - [`AccessTokenVerifier`]: verifies the access tokens (JWT) of token mode locally, with the
//!   keys of the server's JWKS, cached and refetched when an unknown key id appears (at most once
//!   per minimum interval, whatever the number of callers); cached keys that cannot be refreshed
//!   within the key expiry stop verifying.
//!
//! - [`webhook::WebhookVerifier`]: checks the Standard Webhooks signature and timestamp of the
//!   webhooks sessiond delivers, and answers the event.
//!
//! Neither ever puts the API key or a token into an error or into `Debug` output.
//!
//! This crate depends on `sessiond-api` only, never on the server.
//!
//! # Example
//!
//! ```no_run
//! use sessiond_client::api::{AuthInput, CreateSessionRequest, VerifyRequest, codes};
//! use sessiond_client::{Client, Error};
//!
//! # async fn run() -> Result<(), Error> {
//! let client = Client::new("http://127.0.0.1:8080", "the-api-key")?;
//!
//! // After the application has checked the user's password:
//! let created = client
//!     .create_session(&CreateSessionRequest {
//!         user_id: "u-42".into(),
//!         auth: Some(AuthInput { method: Some("password".into()), ..Default::default() }),
//!         ..Default::default()
//!     })
//!     .await?;
//! // Send `created.cookie.set_cookie` as a `Set-Cookie` header.
//!
//! // On every request, with the token from the cookie:
//! let request = VerifyRequest {
//!     token: Some(created.token.clone()),
//!     access_token: None,
//!     client: None,
//!     require: None,
//! };
//! match client.verify(&request).await {
//!     Ok(verified) => println!("hello {}", verified.session.user_id),
//!     Err(e) if e.code() == Some(codes::SESSION_EXPIRED) => println!("please log in again"),
//!     Err(e) => return Err(e),
//! }
//!
//! // In token mode, verify access tokens locally instead:
//! let verifier = client
//!     .access_token_verifier("https://auth.example.com", "my-app")
//!     .build()?;
//! if let Some(access_token) = &created.access_token {
//!     match verifier.verify(access_token).await {
//!         Ok(claims) => println!("user {} in session {}", claims.sub, claims.sid),
//!         Err(e) => println!("refused: {e}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod jwks;
mod verifier;
pub mod webhook;

/// The wire types of the API (the `sessiond-api` crate).
pub use sessiond_api as api;

pub use client::{Client, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, ListOptions, StatusFilter};
pub use error::Error;
pub use verifier::{
    AccessTokenVerifier, Clock, DEFAULT_FETCH_TIMEOUT, DEFAULT_KEY_EXPIRY, DEFAULT_LEEWAY,
    DEFAULT_MAX_KEY_AGE, DEFAULT_MAX_TOKEN_LIFETIME, DEFAULT_MIN_REFRESH_INTERVAL, MAX_JWKS_LEN,
    MAX_TOKEN_LEN, VerifierBuilder, VerifyError,
};
