//! Refresh tokens: their format, the per-session rotation state, and the reuse rules.
//!
//! A refresh token is `sdr_`, the session handle, `.` and 256 bits from the OS CSPRNG in
//! base64url. The handle locates the session (a selector, public like every handle); the secret
//! is compared by its SHA-256 in constant time, and only hashes are stored.
//!
//! Each refresh spends the presented token and issues the next one, derived as
//! `SHA-256(domain || presented secret || salt)` with a fresh random salt kept in the state. So a
//! presenter of the *previous* token within the grace period gets the very same new token again
//! (concurrent tabs), while the store holds nothing from which a token can be computed. A spent
//! token presented after the grace period is theft: the session is revoked.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::CoreError;
use crate::time::Timestamp;
use crate::token::{SessionHandle, TOKEN_BYTES, random_bytes};

/// Prefix of every refresh token.
pub const REFRESH_PREFIX: &str = "sdr_";
/// How many spent refresh tokens a session remembers for reuse detection.
pub const SPENT_KEPT: usize = 16;
/// Largest application claims object, in bytes of JSON.
pub const MAX_CLAIMS_BYTES: usize = 4096;

const DERIVE_DOMAIN: &[u8] = b"sessiond refresh token v1\0";

/// A secret refresh token. Not `Display`, not `Serialize`, redacted in `Debug`.
pub struct RefreshToken(Zeroizing<String>);

impl RefreshToken {
    /// The token text, for the response that hands it out.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
}

/// The secret part of a refresh token.
pub type Secret = Zeroizing<[u8; TOKEN_BYTES]>;

fn format_token(handle: &SessionHandle, secret: &[u8; TOKEN_BYTES]) -> RefreshToken {
    let mut s = Zeroizing::new(String::with_capacity(80));
    s.push_str(REFRESH_PREFIX);
    s.push_str(handle.as_str());
    s.push('.');
    URL_SAFE_NO_PAD.encode_string(secret, &mut s);
    RefreshToken(s)
}

/// Splits a presented refresh token into its session handle and secret; `None` if it cannot
/// be one.
pub fn parse(presented: &str) -> Option<(SessionHandle, Secret)> {
    let rest = presented.strip_prefix(REFRESH_PREFIX)?;
    let (handle, secret) = rest.split_once('.')?;
    let handle = SessionHandle::parse(handle).ok()?;
    if secret.len() != 43 {
        return None;
    }
    let raw = Zeroizing::new(URL_SAFE_NO_PAD.decode(secret).ok()?);
    let mut out = Zeroizing::new([0u8; TOKEN_BYTES]);
    if raw.len() != TOKEN_BYTES {
        return None;
    }
    out.copy_from_slice(&raw);
    Some((handle, out))
}

fn hash(secret: &[u8; TOKEN_BYTES]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn derive(secret: &[u8; TOKEN_BYTES], salt: &[u8; 32]) -> Secret {
    let mut h = Sha256::new();
    h.update(DERIVE_DOMAIN);
    h.update(secret);
    h.update(salt);
    Zeroizing::new(h.finalize().into())
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn unb64<const N: usize>(s: &str) -> Result<[u8; N], CoreError> {
    let v = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| CoreError::Internal("damaged refresh state".into()))?;
    v.try_into()
        .map_err(|_| CoreError::Internal("damaged refresh state".into()))
}

/// The refresh state of a session, stored with it (as JSON text) and replaced atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshState {
    /// How many refreshes so far.
    pub generation: u64,
    /// SHA-256 of the current secret.
    current: String,
    /// SHA-256 of spent secrets, the most recently spent first.
    spent: Vec<String>,
    /// Salt of the last derivation (absent before the first refresh).
    #[serde(default)]
    salt: Option<String>,
    /// Time of the last refresh (ms); the session's creation before the first.
    pub at: i64,
    /// The application claims of every access token of this session.
    pub claims: Map<String, Value>,
}

/// What a presented secret is to a session's refresh state.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented {
    /// The current token: refresh.
    Current,
    /// The token spent by the last refresh, within the grace period: the pair that refresh
    /// issued is handed out again.
    RecentlySpent,
    /// A spent token, after the grace period or older than the last refresh: theft.
    Reused,
    /// Not a token of this session at all.
    Unknown,
}

impl RefreshState {
    /// The state of a new session and its first refresh token.
    pub fn issue(
        handle: &SessionHandle,
        claims: Map<String, Value>,
        now: Timestamp,
    ) -> Result<(Self, RefreshToken), CoreError> {
        let secret = Zeroizing::new(random_bytes::<TOKEN_BYTES>()?);
        let state = Self {
            generation: 0,
            current: b64(&hash(&secret)),
            spent: Vec::new(),
            salt: None,
            at: now.as_millis(),
            claims,
        };
        Ok((state, format_token(handle, &secret)))
    }

    /// Parses the stored text.
    pub fn from_text(text: &str) -> Result<Self, CoreError> {
        serde_json::from_str(text).map_err(|_| CoreError::Internal("damaged refresh state".into()))
    }

    /// The stored text.
    pub fn to_text(&self) -> Result<Arc<str>, CoreError> {
        serde_json::to_string(self)
            .map(Into::into)
            .map_err(|e| CoreError::Internal(format!("refresh state: {e}")))
    }

    /// Classifies a presented secret at `now` with a grace period of `grace_s` seconds.
    pub fn classify(&self, secret: &[u8; TOKEN_BYTES], now: Timestamp, grace_s: u64) -> Presented {
        let h = hash(secret);
        let eq = |stored: &str| {
            unb64::<32>(stored).is_ok_and(|s| bool::from(s.as_slice().ct_eq(h.as_slice())))
        };
        if eq(&self.current) {
            return Presented::Current;
        }
        match self.spent.iter().position(|s| eq(s)) {
            Some(0) if now.as_millis() < self.at + (grace_s as i64) * 1000 => {
                Presented::RecentlySpent
            }
            Some(_) => Presented::Reused,
            None => Presented::Unknown,
        }
    }

    /// The state after refreshing with the current `secret`, and the new token.
    pub fn next(
        &self,
        handle: &SessionHandle,
        secret: &[u8; TOKEN_BYTES],
        now: Timestamp,
    ) -> Result<(Self, RefreshToken), CoreError> {
        let salt: [u8; 32] = random_bytes()?;
        let new = derive(secret, &salt);
        let mut spent = Vec::with_capacity(SPENT_KEPT);
        spent.push(self.current.clone());
        spent.extend(self.spent.iter().take(SPENT_KEPT - 1).cloned());
        let state = Self {
            generation: self.generation + 1,
            current: b64(&hash(&new)),
            spent,
            salt: Some(b64(&salt)),
            at: now.as_millis(),
            claims: self.claims.clone(),
        };
        Ok((state, format_token(handle, &new)))
    }

    /// The state after the session's token was rotated (rotate, reauthenticate), and its new
    /// refresh token: a fresh random secret and no spent tokens, so that every refresh token
    /// issued before is [`Presented::Unknown`]. The claims are kept.
    pub fn rekeyed(
        &self,
        handle: &SessionHandle,
        now: Timestamp,
    ) -> Result<(Self, RefreshToken), CoreError> {
        let (mut state, token) = Self::issue(handle, self.claims.clone(), now)?;
        state.generation = self.generation + 1;
        Ok((state, token))
    }

    /// For a recently spent `secret`: the token the last refresh issued for it, if that is
    /// still the current one.
    pub fn reissue(
        &self,
        handle: &SessionHandle,
        secret: &[u8; TOKEN_BYTES],
    ) -> Result<Option<RefreshToken>, CoreError> {
        let Some(salt) = &self.salt else {
            return Ok(None);
        };
        let new = derive(secret, &unb64::<32>(salt)?);
        let current = unb64::<32>(&self.current)?;
        if bool::from(hash(&new).as_slice().ct_eq(current.as_slice())) {
            Ok(Some(format_token(handle, &new)))
        } else {
            Ok(None)
        }
    }

    /// A stable token id for the access token of this generation (so a re-issued pair is the
    /// same pair).
    pub fn jti(&self, handle: &SessionHandle) -> String {
        let mut h = Sha256::new();
        h.update(handle.as_str().as_bytes());
        h.update(self.current.as_bytes());
        b64(&h.finalize()[..16])
    }
}

/// Validates application claims for access tokens: no reserved names, at most
/// [`MAX_CLAIMS_BYTES`] of JSON.
pub fn validate_claims(claims: &Map<String, Value>) -> Result<(), CoreError> {
    if let Some(k) = claims
        .keys()
        .find(|k| sessiond_api::RESERVED_CLAIMS.contains(&k.as_str()))
    {
        return Err(CoreError::InvalidRequest(format!(
            "access_token_claims may not set the reserved claim \"{k}\""
        )));
    }
    let size = serde_json::to_string(claims)
        .map(|s| s.len())
        .unwrap_or(usize::MAX);
    if size > MAX_CLAIMS_BYTES {
        return Err(CoreError::InvalidRequest(format!(
            "access_token_claims must be at most {MAX_CLAIMS_BYTES} bytes of JSON"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(1_800_000_000_000 + ms)
    }

    #[test]
    fn tokens_round_trip_and_garbage_does_not_parse() {
        let h = SessionHandle::generate().unwrap();
        let (_, tok) = RefreshState::issue(&h, Map::new(), t(0)).unwrap();
        let (h2, _) = parse(tok.expose()).unwrap();
        assert_eq!(h2, h);
        assert!(format!("{tok:?}").contains("redacted"));
        for bad in [
            "",
            "sdr_",
            "sdt_abc",
            &format!("sdr_{}", h.as_str()),
            &format!("sdr_{}.short", h.as_str()),
            &format!("sdr_ses_bad.{}", "A".repeat(43)),
            &format!("sdr_{}.{}", h.as_str(), "!".repeat(43)),
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn refresh_spends_the_token_and_grace_reissues_the_same_one() {
        let h = SessionHandle::generate().unwrap();
        let (s0, tok0) = RefreshState::issue(&h, Map::new(), t(0)).unwrap();
        let (_, sec0) = parse(tok0.expose()).unwrap();
        assert_eq!(s0.classify(&sec0, t(0), 10), Presented::Current);

        let (s1, tok1) = s0.next(&h, &sec0, t(1000)).unwrap();
        let (_, sec1) = parse(tok1.expose()).unwrap();
        assert_ne!(tok0.expose(), tok1.expose());
        assert_eq!(s1.classify(&sec1, t(1000), 10), Presented::Current);
        // The spent token within the grace period gets the same new token again.
        assert_eq!(s1.classify(&sec0, t(10_999), 10), Presented::RecentlySpent);
        assert_eq!(
            s1.reissue(&h, &sec0).unwrap().unwrap().expose(),
            tok1.expose()
        );
        // After it, it is reuse.
        assert_eq!(s1.classify(&sec0, t(11_000), 10), Presented::Reused);
        assert_eq!(s1.classify(&sec0, t(1000), 0), Presented::Reused);

        // Two generations back is reuse at once; a stranger's secret is unknown.
        let (s2, _) = s1.next(&h, &sec1, t(2000)).unwrap();
        assert_eq!(s2.classify(&sec0, t(2000), 10), Presented::Reused);
        assert_eq!(s2.reissue(&h, &sec0).unwrap().map(|_| ()), None);
        assert_eq!(s2.classify(&[9u8; 32], t(2000), 10), Presented::Unknown);
        assert_eq!(s2.generation, 2);
        assert_ne!(s1.jti(&h), s2.jti(&h));

        // The stored text holds no secret and round-trips.
        let text = s2.to_text().unwrap();
        assert!(!text.contains(&tok1.expose()[4..]));
        assert_eq!(RefreshState::from_text(&text).unwrap(), s2);
    }

    #[test]
    fn a_rotation_makes_every_earlier_token_unknown() {
        let h = SessionHandle::generate().unwrap();
        let mut claims = Map::new();
        claims.insert("role".into(), "admin".into());
        let (s0, tok0) = RefreshState::issue(&h, claims.clone(), t(0)).unwrap();
        let (_, sec0) = parse(tok0.expose()).unwrap();
        let (s1, tok1) = s0.next(&h, &sec0, t(1000)).unwrap();
        let (_, sec1) = parse(tok1.expose()).unwrap();
        let (r, tok2) = s1.rekeyed(&h, t(1500)).unwrap();
        let (_, sec2) = parse(tok2.expose()).unwrap();
        assert_eq!(r.classify(&sec2, t(1500), 10), Presented::Current);
        // Within the grace period too: no pair to hand out again, and no theft either.
        assert_eq!(r.classify(&sec1, t(1500), 10), Presented::Unknown);
        assert_eq!(r.classify(&sec0, t(1500), 10), Presented::Unknown);
        assert_eq!(r.claims, claims);
        assert_eq!(r.generation, 2);
        assert_ne!(r.jti(&h), s1.jti(&h));
    }

    #[test]
    fn spent_list_is_bounded() {
        let h = SessionHandle::generate().unwrap();
        let (mut s, mut tok) = RefreshState::issue(&h, Map::new(), t(0)).unwrap();
        for i in 0..40 {
            let (_, sec) = parse(tok.expose()).unwrap();
            (s, tok) = s.next(&h, &sec, t(i)).unwrap();
        }
        assert_eq!(s.spent.len(), SPENT_KEPT);
    }

    #[test]
    fn reserved_and_oversized_claims_are_refused() {
        let mut c = Map::new();
        c.insert("role".into(), "admin".into());
        assert!(validate_claims(&c).is_ok());
        for k in ["sub", "exp", "sid", "tenant", "aal"] {
            let mut c = Map::new();
            c.insert(k.into(), 1.into());
            assert!(validate_claims(&c).is_err(), "{k}");
        }
        let mut c = Map::new();
        c.insert("big".into(), "x".repeat(MAX_CLAIMS_BYTES).into());
        assert!(validate_claims(&c).is_err());
    }
}
