//! Secrets and identifiers: the session token, its hash, the session handle, user and tenant ids.
//!
//! [`SessionToken`] cannot be printed or serialized: it has no `Display`, its `Debug` is redacted
//! and its memory is zeroized on drop. The store only ever sees a [`TokenHash`] (SHA-256), so a
//! leaked database yields no usable token. Hashes are compared in constant time.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::CoreError;

/// Bytes of CSPRNG output in a token (256 bits).
pub const TOKEN_BYTES: usize = 32;
/// Length of the base64url (unpadded) body of a token.
pub const TOKEN_BODY_LEN: usize = 43;
/// Bytes of CSPRNG output in a session handle (128 bits).
pub const HANDLE_BYTES: usize = 16;
/// Prefix of every session handle.
pub const HANDLE_PREFIX: &str = "ses_";

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], CoreError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| CoreError::Internal(format!("OS CSPRNG failed: {e}")))?;
    Ok(buf)
}

/// A secret session token. Deliberately not `Display`, not `Serialize`, redacted in `Debug`.
pub struct SessionToken(Zeroizing<String>);

impl SessionToken {
    /// The token text, for the one response that hands it out.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// SHA-256 of a session token: what the store keeps. Redacted in `Debug` as well, since a hash
/// in a log is still a lookup key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a token's text.
    pub fn of(token_text: &str) -> Self {
        Self(Sha256::digest(token_text.as_bytes()).into())
    }

    /// The hash bytes (for storage).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// From stored bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(<redacted>)")
    }
}

/// The shape of session tokens: a configurable prefix and 256 random bits in base64url.
#[derive(Debug, Clone)]
pub struct TokenFormat {
    prefix: String,
}

/// The default token prefix.
pub const DEFAULT_TOKEN_PREFIX: &str = "sdt_";

impl Default for TokenFormat {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_TOKEN_PREFIX.to_owned(),
        }
    }
}

impl TokenFormat {
    /// A format with `prefix` (at most 32 of `A-Z a-z 0-9 _ -`, may be empty).
    pub fn new(prefix: &str) -> Result<Self, CoreError> {
        let ok = prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(CoreError::InvalidRequest(
                "token prefix must be at most 32 characters of A-Z, a-z, 0-9, '_' and '-'".into(),
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A fresh token from the OS CSPRNG, and its hash.
    pub fn generate(&self) -> Result<(SessionToken, TokenHash), CoreError> {
        let bytes = Zeroizing::new(random_bytes::<TOKEN_BYTES>()?);
        let mut text = Zeroizing::new(String::with_capacity(self.prefix.len() + TOKEN_BODY_LEN));
        text.push_str(&self.prefix);
        URL_SAFE_NO_PAD.encode_string(bytes.as_slice(), &mut text);
        let hash = TokenHash::of(&text);
        Ok((SessionToken(text), hash))
    }

    /// The hash of a presented token, or `None` when it cannot be a token of this format (no
    /// store lookup is needed for it). Runs in time independent of where a well-formed token's
    /// bytes differ from any stored token.
    pub fn hash_presented(&self, presented: &str) -> Option<TokenHash> {
        let body = presented.strip_prefix(self.prefix.as_str())?;
        if body.len() != TOKEN_BODY_LEN
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return None;
        }
        Some(TokenHash::of(presented))
    }
}

/// The public id of a session: `ses_` and 128 random bits in base64url. Grants nothing.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionHandle(Arc<str>);

impl SessionHandle {
    /// A fresh handle.
    pub fn generate() -> Result<Self, CoreError> {
        let bytes = random_bytes::<HANDLE_BYTES>()?;
        let mut s = String::with_capacity(HANDLE_PREFIX.len() + 22);
        s.push_str(HANDLE_PREFIX);
        URL_SAFE_NO_PAD.encode_string(bytes, &mut s);
        Ok(Self(s.into()))
    }

    /// Parses a handle from input.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let ok = s.strip_prefix(HANDLE_PREFIX).is_some_and(|b| {
            b.len() == 22
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        });
        if ok {
            Ok(Self(s.into()))
        } else {
            Err(CoreError::NotFound)
        }
    }

    /// The handle text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An application's user id: 1 to 256 bytes of UTF-8 without control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// Validates a user id.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
            return Err(CoreError::InvalidRequest(
                "user_id must be 1 to 256 bytes of UTF-8 without control characters".into(),
            ));
        }
        Ok(Self(s.into()))
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant id: 1 to 64 of `A-Z a-z 0-9 . _ -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// The tenant used when a request names none.
    pub const DEFAULT: &'static str = "default";

    /// Validates a tenant id.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(CoreError::InvalidRequest(
                "tenant must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'".into(),
            ));
        }
        Ok(Self(s.into()))
    }

    /// The default tenant.
    pub fn default_tenant() -> Self {
        Self(Self::DEFAULT.into())
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_256_bit_base64url_and_unique() {
        let f = TokenFormat::new("sdt_").unwrap();
        let (a, ha) = f.generate().unwrap();
        let (b, hb) = f.generate().unwrap();
        assert!(a.expose().starts_with("sdt_"));
        assert_eq!(a.expose().len(), 4 + TOKEN_BODY_LEN);
        let raw = URL_SAFE_NO_PAD.decode(&a.expose()[4..]).unwrap();
        assert_eq!(raw.len(), 32);
        assert_ne!(a.expose(), b.expose());
        assert!(!ha.ct_eq(&hb));
        assert_eq!(f.hash_presented(a.expose()), Some(ha));
    }

    #[test]
    fn presented_tokens_of_the_wrong_shape_are_rejected_without_lookup() {
        let f = TokenFormat::new("sdt_").unwrap();
        let (t, _) = f.generate().unwrap();
        let body = &t.expose()[4..];
        assert!(f.hash_presented(body).is_none(), "missing prefix");
        assert!(
            f.hash_presented(&format!("xyz_{body}")).is_none(),
            "wrong prefix"
        );
        assert!(f.hash_presented(&t.expose()[..40]).is_none(), "too short");
        assert!(
            f.hash_presented(&format!("{}A", t.expose())).is_none(),
            "too long"
        );
        let bad = format!("sdt_{}", "+".repeat(TOKEN_BODY_LEN));
        assert!(f.hash_presented(&bad).is_none(), "not base64url");
        assert!(f.hash_presented("").is_none());
    }

    #[test]
    fn secrets_do_not_print() {
        let f = TokenFormat::new("sdt_").unwrap();
        let (t, h) = f.generate().unwrap();
        let shown = format!("{t:?} {h:?}");
        assert!(!shown.contains(&t.expose()[4..]));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn hash_is_sha256_of_the_token_text() {
        let h = TokenHash::of("abc");
        let hex: String = h.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(TokenFormat::new("").is_ok());
        assert!(TokenFormat::new("my-app_").is_ok());
        assert!(TokenFormat::new("bad prefix").is_err());
        assert!(TokenFormat::new(&"a".repeat(33)).is_err());
    }

    #[test]
    fn handles_parse_and_reject() {
        let h = SessionHandle::generate().unwrap();
        assert_eq!(SessionHandle::parse(h.as_str()).unwrap(), h);
        assert!(SessionHandle::parse("ses_short").is_err());
        assert!(SessionHandle::parse("abc_aaaaaaaaaaaaaaaaaaaaaa").is_err());
        assert!(SessionHandle::parse("ses_aaaaaaaaaaaaaaaaaaaaa/").is_err());
    }

    #[test]
    fn ids_are_validated() {
        assert!(UserId::parse("u-42").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse(&"x".repeat(257)).is_err());
        assert!(TenantId::parse("acme.eu-1").is_ok());
        assert!(TenantId::parse("a b").is_err());
        assert!(TenantId::parse("").is_err());
    }
}
