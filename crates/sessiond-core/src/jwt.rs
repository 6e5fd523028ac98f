//! Signed access tokens: the keyring of signing keys, signing, and strict verification.
//!
//! A [`Keyring`] holds Ed25519 (`EdDSA`, the default) or P-256 (`ES256`) keys. Its document is
//! kept in the store so that every node signs and verifies with the same keys; private keys in it
//! are sealed with AES-256-GCM when a [`SealingKey`] is configured. A key is published in the JWKS
//! from its creation, used for signing from its activation (so that verifiers can learn it first),
//! and published and accepted until its retirement, which rotation sets to the longest access-token
//! lifetime after its successor takes over.
//!
//! Verification is strict (RFC 8725): only `EdDSA` and `ES256`, the header's `alg` must be the
//! key's own, a `kid` of this keyring is required, and tokens that name keys by URL or embed them
//! (`jku`, `x5u`, `jwk`, `x5c`) or carry `crit` are refused. Time checks use the caller's clock.

use std::collections::HashMap;
use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sessiond_api::{AccessClaims, Jwk, JwkSet};
use zeroize::Zeroizing;

use crate::error::CoreError;
use crate::time::Timestamp;

/// The longest access-token lifetime a policy may set, in seconds.
pub const MAX_ACCESS_TOKEN_TTL_S: u64 = 3600;
/// Allowed clock difference between nodes when checking `nbf` and `iat`, in seconds.
pub const NBF_LEEWAY_S: i64 = 30;
/// The header `typ` of access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// Whether a header `typ` is one this server issues: `at+jwt` (or its media type
/// `application/at+jwt`), and `JWT` for tokens signed before access tokens were typed (they
/// live at most [`MAX_ACCESS_TOKEN_TTL_S`]). Media types compare without regard to case.
fn accepted_typ(typ: Option<&str>) -> bool {
    typ.is_some_and(|t| {
        ["at+jwt", "application/at+jwt", "JWT"]
            .iter()
            .any(|a| t.eq_ignore_ascii_case(a))
    })
}

/// A signature algorithm of the keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SigningAlg {
    /// Ed25519 (RFC 8037). The default.
    #[default]
    EdDSA,
    /// ECDSA with P-256 and SHA-256.
    ES256,
}

impl SigningAlg {
    fn jose(self) -> Algorithm {
        match self {
            Self::EdDSA => Algorithm::EdDSA,
            Self::ES256 => Algorithm::ES256,
        }
    }

    /// The JOSE name: `EdDSA` or `ES256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
        }
    }

    /// Parses `EdDSA` or `ES256`.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        match s {
            "EdDSA" => Ok(Self::EdDSA),
            "ES256" => Ok(Self::ES256),
            _ => Err(CoreError::InvalidRequest(
                "the signing algorithm must be EdDSA or ES256".into(),
            )),
        }
    }
}

/// The key that seals private keys in the stored keyring: 32 bytes for AES-256-GCM.
pub struct SealingKey(LessSafeKey);

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    /// A key from its base64 (standard or URL-safe) text, which must decode to 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, CoreError> {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        let t = text.trim();
        let raw = [&URL_SAFE_NO_PAD, &URL_SAFE, &STANDARD]
            .iter()
            .find_map(|e| e.decode(t).ok())
            .map(Zeroizing::new)
            .ok_or_else(|| CoreError::InvalidRequest("the keyring key is not base64".into()))?;
        if raw.len() != 32 {
            return Err(CoreError::InvalidRequest(
                "the keyring key must be 32 bytes (44 characters of base64)".into(),
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, &raw)
            .map_err(|_| CoreError::Internal("cannot use the keyring key".into()))?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// A fresh key: 32 random bytes, and their base64url text.
    pub fn generate() -> Result<(Self, Zeroizing<String>), CoreError> {
        let raw: Zeroizing<[u8; 32]> = Zeroizing::new(crate::token::random_bytes()?);
        let text = Zeroizing::new(URL_SAFE_NO_PAD.encode(raw.as_slice()));
        Ok((Self::from_base64(&text)?, text))
    }

    /// Seals `plain` (AES-256-GCM, a random nonce, `aad` authenticated): base64url of nonce,
    /// ciphertext and tag.
    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, CoreError> {
        let nonce_bytes: [u8; NONCE_LEN] = crate::token::random_bytes()?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| CoreError::Internal("cannot seal a secret".into()))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens what [`SealingKey::seal`] sealed with the same `aad`.
    pub fn open(&self, aad: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, CoreError> {
        let kid = aad;
        let bad = || {
            CoreError::Internal(format!(
                "cannot unseal {kid}: wrong keyring key or damaged data (is jwt.keyring_key the key it was sealed with?)"
            ))
        };
        let raw = URL_SAFE_NO_PAD.decode(sealed).map_err(|_| bad())?;
        if raw.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut buf = Zeroizing::new(body.to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut buf)
            .map_err(|_| bad())?
            .to_vec();
        Ok(Zeroizing::new(plain))
    }
}

/// One key as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StoredKey {
    kid: String,
    alg: SigningAlg,
    created_at: i64,
    activate_at: i64,
    #[serde(default)]
    retire_at: Option<i64>,
    /// The raw public key, base64url: 32 bytes (Ed25519) or 65 (uncompressed P-256 point).
    public: String,
    /// `plain:` or `sealed:` and the base64url PKCS#8 document (sealed: nonce, ciphertext, tag).
    private: String,
}

/// The stored keyring document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
struct KeyringDoc {
    keys: Vec<StoredKey>,
}

struct LoadedKey {
    kid: String,
    alg: SigningAlg,
    activate_at: Timestamp,
    retire_at: Option<Timestamp>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Jwk,
}

impl LoadedKey {
    fn published_at(&self, now: Timestamp) -> bool {
        self.retire_at.is_none_or(|r| now < r)
    }
}

/// The signing keys, loaded and ready.
pub struct Keyring {
    keys: Vec<LoadedKey>,
    by_kid: HashMap<String, usize>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "kids",
                &self.keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// How a keyring document changes on rotation.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// The new key's algorithm.
    pub alg: SigningAlg,
    /// Seconds until the new key signs (it is published at once).
    pub activate_after_s: u64,
    /// Seconds the old keys stay published after the new one takes over: at least the longest
    /// access-token lifetime.
    pub retire_after_s: u64,
}

fn internal(what: &str) -> CoreError {
    CoreError::Internal(what.to_owned())
}

fn new_key(
    alg: SigningAlg,
    now: Timestamp,
    activate_at: Timestamp,
    sealing: Option<&SealingKey>,
) -> Result<StoredKey, CoreError> {
    let rng = SystemRandom::new();
    let (pkcs8, public) = match alg {
        SigningAlg::EdDSA => {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| internal("cannot generate an Ed25519 key"))?;
            let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
                .map_err(|_| internal("cannot read a generated Ed25519 key"))?;
            (
                Zeroizing::new(doc.as_ref().to_vec()),
                pair.public_key().as_ref().to_vec(),
            )
        }
        SigningAlg::ES256 => {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| internal("cannot generate a P-256 key"))?;
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref())
                .map_err(|_| internal("cannot read a generated P-256 key"))?;
            (
                Zeroizing::new(doc.as_ref().to_vec()),
                pair.public_key().as_ref().to_vec(),
            )
        }
    };
    let kid_bytes: [u8; 12] = crate::token::random_bytes()?;
    let kid = URL_SAFE_NO_PAD.encode(kid_bytes);
    let private = match sealing {
        Some(k) => format!("sealed:{}", k.seal(&kid, &pkcs8)?),
        None => format!("plain:{}", URL_SAFE_NO_PAD.encode(pkcs8.as_slice())),
    };
    Ok(StoredKey {
        kid,
        alg,
        created_at: now.as_millis(),
        activate_at: activate_at.as_millis(),
        retire_at: None,
        public: URL_SAFE_NO_PAD.encode(public),
        private,
    })
}

fn load_key(k: &StoredKey, sealing: Option<&SealingKey>) -> Result<LoadedKey, CoreError> {
    let pkcs8 = if let Some(sealed) = k.private.strip_prefix("sealed:") {
        let s = sealing.ok_or_else(|| {
            CoreError::Internal(
                "the stored keyring is sealed; configure the keyring key (jwt.keyring_key)".into(),
            )
        })?;
        s.open(&k.kid, sealed)?
    } else if let Some(plain) = k.private.strip_prefix("plain:") {
        Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(plain)
                .map_err(|_| internal("damaged keyring: a private key is not base64url"))?,
        )
    } else {
        return Err(internal("damaged keyring: unknown private key form"));
    };
    let public = URL_SAFE_NO_PAD
        .decode(&k.public)
        .map_err(|_| internal("damaged keyring: a public key is not base64url"))?;
    let (encoding, decoding, jwk) = match k.alg {
        SigningAlg::EdDSA => {
            let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
                .map_err(|_| internal("damaged keyring: bad Ed25519 key"))?;
            if pair.public_key().as_ref() != public.as_slice() {
                return Err(internal("damaged keyring: public and private keys differ"));
            }
            let jwk = Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: k.public.clone(),
                y: None,
                kid: k.kid.clone(),
                alg: "EdDSA".into(),
                use_: "sig".into(),
            };
            (
                EncodingKey::from_ed_der(&pkcs8),
                DecodingKey::from_ed_der(&public),
                jwk,
            )
        }
        SigningAlg::ES256 => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
                .map_err(|_| internal("damaged keyring: bad P-256 key"))?;
            if pair.public_key().as_ref() != public.as_slice() || public.len() != 65 {
                return Err(internal("damaged keyring: public and private keys differ"));
            }
            let jwk = Jwk {
                kty: "EC".into(),
                crv: "P-256".into(),
                x: URL_SAFE_NO_PAD.encode(&public[1..33]),
                y: Some(URL_SAFE_NO_PAD.encode(&public[33..65])),
                kid: k.kid.clone(),
                alg: "ES256".into(),
                use_: "sig".into(),
            };
            (
                EncodingKey::from_ec_der(&pkcs8),
                DecodingKey::from_ec_der(&public),
                jwk,
            )
        }
    };
    Ok(LoadedKey {
        kid: k.kid.clone(),
        alg: k.alg,
        activate_at: Timestamp::from_millis(k.activate_at),
        retire_at: k.retire_at.map(Timestamp::from_millis),
        encoding,
        decoding,
        jwk,
    })
}

fn parse_doc(text: &str) -> Result<KeyringDoc, CoreError> {
    serde_json::from_str(text).map_err(|e| CoreError::Internal(format!("damaged keyring: {e}")))
}

fn write_doc(doc: &KeyringDoc) -> Result<String, CoreError> {
    serde_json::to_string(doc).map_err(|e| CoreError::Internal(format!("keyring: {e}")))
}

const UNKNOWN_KEY: &str = "the access token is signed with an unknown key";

/// Why an access token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Expired.
    Expired,
    /// Signed under a key id this keyring does not have (a caller may reload and retry).
    UnknownKey,
    /// Anything else, with a reason for humans (never the token).
    Invalid(&'static str),
}

impl Rejection {
    /// The core error for it.
    pub fn into_error(self) -> CoreError {
        match self {
            Self::Expired => CoreError::TokenExpired,
            Self::UnknownKey => CoreError::TokenInvalid(UNKNOWN_KEY.to_owned()),
            Self::Invalid(why) => CoreError::TokenInvalid(why.to_owned()),
        }
    }
}

impl Keyring {
    /// A new keyring document with one key of `alg`, active at once.
    pub fn generate(
        alg: SigningAlg,
        now: Timestamp,
        sealing: Option<&SealingKey>,
    ) -> Result<String, CoreError> {
        write_doc(&KeyringDoc {
            keys: vec![new_key(alg, now, now, sealing)?],
        })
    }

    /// The document after a rotation: a new key published now and signing from
    /// `now + activate_after_s`; every older key retires `retire_after_s` after that (or earlier,
    /// if it was already due to). Keys retired before `now` are dropped.
    pub fn rotate(
        doc_text: &str,
        r: Rotation,
        now: Timestamp,
        sealing: Option<&SealingKey>,
    ) -> Result<String, CoreError> {
        let mut doc = parse_doc(doc_text)?;
        let activate_at = now.plus_secs(r.activate_after_s);
        let retire_at = activate_at.plus_secs(r.retire_after_s).as_millis();
        doc.keys
            .retain(|k| k.retire_at.is_none_or(|t| t > now.as_millis()));
        for k in &mut doc.keys {
            k.retire_at = Some(k.retire_at.map_or(retire_at, |t| t.min(retire_at)));
        }
        doc.keys.push(new_key(r.alg, now, activate_at, sealing)?);
        write_doc(&doc)
    }

    /// Whether the document holds a private key stored unsealed.
    pub fn has_unsealed(doc_text: &str) -> Result<bool, CoreError> {
        Ok(parse_doc(doc_text)?
            .keys
            .iter()
            .any(|k| k.private.starts_with("plain:")))
    }

    /// The document with every unsealed private key sealed with `sealing`, or `None` if there
    /// was none.
    pub fn seal_unsealed(
        doc_text: &str,
        sealing: &SealingKey,
    ) -> Result<Option<String>, CoreError> {
        let mut doc = parse_doc(doc_text)?;
        let mut changed = false;
        for k in &mut doc.keys {
            if let Some(plain) = k.private.strip_prefix("plain:") {
                let pkcs8 =
                    Zeroizing::new(URL_SAFE_NO_PAD.decode(plain).map_err(|_| {
                        internal("damaged keyring: a private key is not base64url")
                    })?);
                k.private = format!("sealed:{}", sealing.seal(&k.kid, &pkcs8)?);
                changed = true;
            }
        }
        if changed {
            write_doc(&doc).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Loads a keyring document, unsealing its private keys.
    pub fn load(doc_text: &str, sealing: Option<&SealingKey>) -> Result<Self, CoreError> {
        let doc = parse_doc(doc_text)?;
        if doc.keys.is_empty() {
            return Err(internal("damaged keyring: no keys"));
        }
        let keys = doc
            .keys
            .iter()
            .map(|k| load_key(k, sealing))
            .collect::<Result<Vec<_>, _>>()?;
        let by_kid = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.kid.clone(), i))
            .collect();
        Ok(Self { keys, by_kid })
    }

    /// The id of the key added last.
    pub fn newest_kid(&self) -> Option<&str> {
        self.keys.last().map(|k| k.kid.as_str())
    }

    /// Every key: id, algorithm, activation and retirement, for operators.
    pub fn describe(&self) -> Vec<(String, SigningAlg, Timestamp, Option<Timestamp>)> {
        self.keys
            .iter()
            .map(|k| (k.kid.clone(), k.alg, k.activate_at, k.retire_at))
            .collect()
    }

    /// Whether `kid` is a key of this keyring (published or not).
    pub fn knows(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The key that signs at `now`: of the published keys already active, the latest activated.
    fn signing_key(&self, now: Timestamp) -> Option<&LoadedKey> {
        self.keys
            .iter()
            .filter(|k| k.activate_at <= now && k.published_at(now))
            .max_by_key(|k| k.activate_at)
            .or_else(|| {
                // Only keys not yet active are published (a rotation with a long delay over an
                // expired keyring): sign with the earliest to activate rather than fail.
                self.keys
                    .iter()
                    .filter(|k| k.published_at(now))
                    .min_by_key(|k| k.activate_at)
            })
    }

    /// The kid that signs at `now`.
    pub fn signing_kid(&self, now: Timestamp) -> Option<&str> {
        self.signing_key(now).map(|k| k.kid.as_str())
    }

    /// The public keys to publish at `now`: every key not retired, including keys that do not
    /// sign yet.
    pub fn jwks(&self, now: Timestamp) -> JwkSet {
        JwkSet {
            keys: self
                .keys
                .iter()
                .filter(|k| k.published_at(now))
                .map(|k| k.jwk.clone())
                .collect(),
        }
    }

    /// Signs claims with the signing key at `now`.
    pub fn sign(&self, claims: &AccessClaims, now: Timestamp) -> Result<String, CoreError> {
        let key = self
            .signing_key(now)
            .ok_or_else(|| internal("the keyring has no key that may sign"))?;
        let mut header = Header::new(key.alg.jose());
        header.typ = Some(ACCESS_TOKEN_TYP.to_owned());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| CoreError::Internal(format!("cannot sign an access token: {e}")))
    }

    /// The kid named by a token's header, if the token has a header that names one.
    pub fn kid_of(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid)
    }

    /// Verifies a token's header, signature and times at `now`. Issuer and audience are the
    /// caller's to check (they depend on the tenant).
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<AccessClaims, Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Rejection::Invalid("the access token is malformed"))?;
        if !matches!(header.alg, Algorithm::EdDSA | Algorithm::ES256) {
            return Err(Rejection::Invalid(
                "the access token's algorithm is not accepted",
            ));
        }
        if !accepted_typ(header.typ.as_deref()) {
            return Err(Rejection::Invalid(
                "the access token's type (typ) is not at+jwt",
            ));
        }
        if header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some()
            || header.crit.is_some()
        {
            return Err(Rejection::Invalid(
                "the access token's header names or embeds keys, which is not accepted",
            ));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or(Rejection::Invalid("the access token has no key id"))?;
        let key = self
            .by_kid
            .get(kid)
            .map(|&i| &self.keys[i])
            .ok_or(Rejection::UnknownKey)?;
        if !key.published_at(now) {
            // Retired: as unknown to a verifier, but no reload will bring it back.
            return Err(Rejection::Invalid(UNKNOWN_KEY));
        }
        if key.alg.jose() != header.alg {
            return Err(Rejection::Invalid(
                "the access token's algorithm is not its key's",
            ));
        }
        let mut v = Validation::new(key.alg.jose());
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        v.leeway = 0;
        let data =
            jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &v).map_err(|_| {
                Rejection::Invalid("the access token's signature or claims are invalid")
            })?;
        let c = data.claims;
        let now_s = now.as_millis().div_euclid(1000);
        if now_s >= c.exp {
            return Err(Rejection::Expired);
        }
        if c.nbf > now_s + NBF_LEEWAY_S {
            return Err(Rejection::Invalid("the access token is not valid yet"));
        }
        // A token this server signed lives at most the longest lifetime a policy allows and was
        // not issued in the future: anything else was minted elsewhere with a stolen key.
        if c.iat > now_s + NBF_LEEWAY_S {
            return Err(Rejection::Invalid(
                "the access token is issued in the future",
            ));
        }
        if c.exp.saturating_sub(c.iat) > MAX_ACCESS_TOKEN_TTL_S as i64 {
            return Err(Rejection::Invalid(
                "the access token's lifetime exceeds the longest allowed",
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn claims(now: Timestamp, ttl: i64) -> AccessClaims {
        let s = now.as_millis() / 1000;
        let mut extra = Map::new();
        extra.insert("role".into(), json!("admin"));
        AccessClaims {
            iss: "https://issuer.example".into(),
            aud: "api".into(),
            sub: "u-1".into(),
            sid: "ses_AAAAAAAAAAAAAAAAAAAAAA".into(),
            iat: s,
            nbf: s,
            exp: s + ttl,
            auth_time: s,
            aal: 1,
            tenant: "default".into(),
            jti: "j".into(),
            rot: 0,
            extra,
        }
    }

    fn t0() -> Timestamp {
        Timestamp::from_millis(1_800_000_000_000)
    }

    fn ring(alg: SigningAlg) -> (String, Keyring) {
        let doc = Keyring::generate(alg, t0(), None).unwrap();
        let k = Keyring::load(&doc, None).unwrap();
        (doc, k)
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn both_algorithms_sign_and_verify_with_claims_intact() {
        for alg in [SigningAlg::EdDSA, SigningAlg::ES256] {
            let (_, k) = ring(alg);
            let c = claims(t0(), 300);
            let t = k.sign(&c, t0()).unwrap();
            let h = jsonwebtoken::decode_header(&t).unwrap();
            assert_eq!(h.alg, alg.jose());
            assert_eq!(h.kid.as_deref(), k.signing_kid(t0()));
            assert_eq!(k.verify(&t, t0()).unwrap(), c);
            assert_eq!(k.jwks(t0()).keys.len(), 1);
            assert_eq!(k.jwks(t0()).keys[0].alg, alg.as_str());
        }
    }

    #[test]
    fn expiry_and_not_before_follow_the_given_clock() {
        let (_, k) = ring(SigningAlg::EdDSA);
        let t = k.sign(&claims(t0(), 300), t0()).unwrap();
        assert!(k.verify(&t, t0().plus_secs(299)).is_ok());
        assert_eq!(k.verify(&t, t0().plus_secs(300)), Err(Rejection::Expired));
        // Not before ten minutes from now (the lifetime from iat stays within the longest).
        let mut early = claims(t0(), 300);
        early.nbf += 600;
        early.exp += 600;
        let t = k.sign(&early, t0()).unwrap();
        assert_eq!(
            k.verify(&t, t0()),
            Err(Rejection::Invalid("the access token is not valid yet"))
        );
        assert!(k.verify(&t, t0().plus_secs(600)).is_ok());
    }

    #[test]
    fn alg_none_hmac_confusion_unknown_kid_tampering_and_key_urls_are_refused() {
        let (_, k) = ring(SigningAlg::EdDSA);
        let good = k.sign(&claims(t0(), 300), t0()).unwrap();
        let kid = k.signing_kid(t0()).unwrap().to_owned();
        let parts: Vec<&str> = good.split('.').collect();
        let payload = parts[1];

        // alg: none, with and without a signature.
        let none = b64(&json!({"alg": "none", "typ": "JWT", "kid": kid}));
        for t in [
            format!("{none}.{payload}."),
            format!("{none}.{payload}.{}", parts[2]),
        ] {
            assert!(
                matches!(k.verify(&t, t0()), Err(Rejection::Invalid(_))),
                "{t}"
            );
        }

        // HS256 with the public key as the HMAC secret (the classic key confusion).
        let jwk = &k.jwks(t0()).keys[0];
        for secret in [
            jwk.x.as_bytes().to_vec(),
            URL_SAFE_NO_PAD.decode(&jwk.x).unwrap(),
        ] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(kid.clone());
            let forged =
                jsonwebtoken::encode(&h, &claims(t0(), 300), &EncodingKey::from_secret(&secret))
                    .unwrap();
            assert!(matches!(
                k.verify(&forged, t0()),
                Err(Rejection::Invalid(_))
            ));
        }

        // A key this keyring does not have.
        let (_, other) = ring(SigningAlg::EdDSA);
        let foreign = other.sign(&claims(t0(), 300), t0()).unwrap();
        assert_eq!(k.verify(&foreign, t0()), Err(Rejection::UnknownKey));
        // ... nor under this keyring's kid.
        let (_, other2) = ring(SigningAlg::EdDSA);
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.clone());
        let other_key = &other2.keys[0].encoding;
        let t = jsonwebtoken::encode(&h, &claims(t0(), 300), other_key).unwrap();
        assert!(matches!(k.verify(&t, t0()), Err(Rejection::Invalid(_))));

        // Tampered payload under the original signature.
        let mut c = claims(t0(), 300);
        c.sub = "u-2".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_value(&c).unwrap()),
            parts[2]
        );
        assert!(matches!(
            k.verify(&tampered, t0()),
            Err(Rejection::Invalid(_))
        ));

        // No kid; a jku or embedded jwk header.
        for extra in [
            json!({"alg": "EdDSA", "typ": "JWT"}),
            json!({"alg": "EdDSA", "typ": "JWT", "kid": kid, "jku": "https://evil.example/jwks"}),
            json!({"alg": "EdDSA", "typ": "JWT", "kid": kid, "x5u": "https://evil.example/x"}),
        ] {
            let t = format!("{}.{payload}.{}", b64(&extra), parts[2]);
            assert!(matches!(k.verify(&t, t0()), Err(Rejection::Invalid(_))));
        }
        for junk in ["", "a.b", "a.b.c", "...", "x.y.z.w"] {
            assert!(matches!(k.verify(junk, t0()), Err(Rejection::Invalid(_))));
        }
    }

    fn sign_with_header(k: &Keyring, h: serde_json::Value, c: &AccessClaims) -> String {
        let key = &k.keys[0];
        let head = b64(&h);
        let body = b64(&serde_json::to_value(c).unwrap());
        let input = format!("{head}.{body}");
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key.encoding, key.alg.jose()).unwrap();
        format!("{input}.{sig}")
    }

    #[test]
    fn tokens_are_typed_at_jwt_and_other_types_are_refused() {
        let (_, k) = ring(SigningAlg::EdDSA);
        let c = claims(t0(), 300);
        let t = k.sign(&c, t0()).unwrap();
        let h = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(h.typ.as_deref(), Some("at+jwt"));
        let kid = k.signing_kid(t0()).unwrap().to_owned();
        // Tokens from before typing (typ JWT) and the media-type spelling are accepted.
        for typ in ["JWT", "at+jwt", "application/at+jwt", "AT+JWT"] {
            let t = sign_with_header(&k, json!({"alg": "EdDSA", "typ": typ, "kid": kid}), &c);
            assert_eq!(k.verify(&t, t0()), Ok(c.clone()), "{typ}");
        }
        // Other types (an ID token, a logout token, a refresh token) and no type are refused.
        for h in [
            json!({"alg": "EdDSA", "typ": "id_token+jwt", "kid": kid}),
            json!({"alg": "EdDSA", "typ": "logout+jwt", "kid": kid}),
            json!({"alg": "EdDSA", "typ": "rt+jwt", "kid": kid}),
            json!({"alg": "EdDSA", "kid": kid}),
        ] {
            let t = sign_with_header(&k, h.clone(), &c);
            assert_eq!(
                k.verify(&t, t0()),
                Err(Rejection::Invalid(
                    "the access token's type (typ) is not at+jwt"
                )),
                "{h}"
            );
        }
    }

    #[test]
    fn long_lived_or_future_tokens_minted_with_the_key_are_refused() {
        let (_, k) = ring(SigningAlg::EdDSA);
        // The longest lifetime a policy allows is fine.
        let t = k.sign(&claims(t0(), 3600), t0()).unwrap();
        assert!(k.verify(&t, t0()).is_ok());
        // A ten-year token, as someone holding the private key could mint.
        for ttl in [3601, 10 * 365 * 24 * 3600] {
            let t = k.sign(&claims(t0(), ttl), t0()).unwrap();
            assert_eq!(
                k.verify(&t, t0()),
                Err(Rejection::Invalid(
                    "the access token's lifetime exceeds the longest allowed"
                ))
            );
        }
        // Issued in the future, beyond the leeway between clocks.
        let mut c = claims(t0(), 300);
        c.iat += 3600;
        c.nbf = claims(t0(), 300).nbf;
        let t = k.sign(&c, t0()).unwrap();
        assert_eq!(
            k.verify(&t, t0()),
            Err(Rejection::Invalid(
                "the access token is issued in the future"
            ))
        );
        let mut c = claims(t0(), 300);
        c.iat += NBF_LEEWAY_S;
        let t = k.sign(&c, t0()).unwrap();
        assert!(k.verify(&t, t0()).is_ok());
    }

    #[test]
    fn rotation_publishes_first_signs_later_and_retires_the_old_key() {
        let (doc, k1) = ring(SigningAlg::EdDSA);
        let old_kid = k1.signing_kid(t0()).unwrap().to_owned();
        let before = k1.sign(&claims(t0(), 300), t0()).unwrap();
        let r = Rotation {
            alg: SigningAlg::ES256,
            activate_after_s: 20,
            retire_after_s: 300,
        };
        let doc2 = Keyring::rotate(&doc, r, t0(), None).unwrap();
        let k2 = Keyring::load(&doc2, None).unwrap();
        // Published at once, both keys.
        assert_eq!(k2.jwks(t0()).keys.len(), 2);
        // The old key still signs until the new one activates.
        assert_eq!(k2.signing_kid(t0().plus_secs(19)), Some(old_kid.as_str()));
        let new_kid = k2.signing_kid(t0().plus_secs(20)).unwrap().to_owned();
        assert_ne!(new_kid, old_kid);
        // Tokens signed before the rotation verify until the old key retires.
        assert!(k2.verify(&before, t0().plus_secs(100)).is_ok());
        let at = t0().plus_secs(20 + 300);
        assert_eq!(k2.jwks(at).keys.len(), 1);
        assert_eq!(k2.jwks(at).keys[0].kid, new_kid);
        // A later rotation drops the retired key from the document.
        let doc3 = Keyring::rotate(&doc2, r, at, None).unwrap();
        let k3 = Keyring::load(&doc3, None).unwrap();
        assert!(!k3.knows(&old_kid));
        assert!(k3.knows(&new_kid));
    }

    #[test]
    fn sealed_keyrings_need_their_key_and_keep_no_plain_private_key() {
        let seal = SealingKey::from_base64(&URL_SAFE_NO_PAD.encode([7u8; 32])).unwrap();
        let doc = Keyring::generate(SigningAlg::EdDSA, t0(), Some(&seal)).unwrap();
        assert!(doc.contains("sealed:") && !doc.contains("plain:"));
        assert!(Keyring::load(&doc, Some(&seal)).is_ok());
        assert!(Keyring::load(&doc, None).is_err());
        let wrong = SealingKey::from_base64(&URL_SAFE_NO_PAD.encode([8u8; 32])).unwrap();
        assert!(Keyring::load(&doc, Some(&wrong)).is_err());
        assert!(SealingKey::from_base64("c2hvcnQ").is_err());
        assert!(SealingKey::from_base64("!!!").is_err());
    }
}
