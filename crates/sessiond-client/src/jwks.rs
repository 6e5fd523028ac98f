//! Reading a JWKS: the lenient set parser, and the conversion of one JWK into a verification key.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::value::RawValue;
use sessiond_api::{Jwk, JwkSet};

/// Parses `{"keys": [...]}`, skipping every entry that is not a sessiond JWK (an RSA key, a key
/// without `kid`, ...) instead of failing the whole set.
pub(crate) fn parse_lenient(body: &[u8]) -> Result<JwkSet, serde_json::Error> {
    #[derive(Deserialize)]
    struct RawSet<'a> {
        #[serde(borrow)]
        keys: Vec<&'a RawValue>,
    }
    let raw: RawSet<'_> = serde_json::from_slice(body)?;
    let keys = raw
        .keys
        .iter()
        .filter_map(|k| serde_json::from_str::<Jwk>(k.get()).ok())
        .collect();
    Ok(JwkSet { keys })
}

/// A public key ready to verify signatures, with the one algorithm it may be used with.
pub(crate) struct Key {
    pub(crate) alg: Algorithm,
    pub(crate) decoding: DecodingKey,
}

/// The verification key of `jwk`, or `None` when it is not a well-formed Ed25519/EdDSA or
/// P-256/ES256 signature key whose `kty`, `crv` and `alg` agree.
pub(crate) fn key_from_jwk(jwk: &Jwk) -> Option<Key> {
    if jwk.use_ != "sig" || jwk.kid.is_empty() {
        return None;
    }
    match (jwk.kty.as_str(), jwk.crv.as_str(), jwk.alg.as_str()) {
        ("OKP", "Ed25519", "EdDSA") => {
            if jwk.y.is_some() || decoded_len(&jwk.x)? != 32 {
                return None;
            }
            Some(Key {
                alg: Algorithm::EdDSA,
                decoding: DecodingKey::from_ed_components(&jwk.x).ok()?,
            })
        }
        ("EC", "P-256", "ES256") => {
            let y = jwk.y.as_deref()?;
            if decoded_len(&jwk.x)? != 32 || decoded_len(y)? != 32 {
                return None;
            }
            Some(Key {
                alg: Algorithm::ES256,
                decoding: DecodingKey::from_ec_components(&jwk.x, y).ok()?,
            })
        }
        _ => None,
    }
}

/// The usable keys of `set` by `kid`. Of two keys with the same `kid`, the first one wins.
pub(crate) fn key_map(set: &JwkSet) -> HashMap<String, Arc<Key>> {
    let mut map = HashMap::with_capacity(set.keys.len());
    for jwk in &set.keys {
        if map.contains_key(&jwk.kid) {
            continue;
        }
        if let Some(key) = key_from_jwk(jwk) {
            map.insert(jwk.kid.clone(), Arc::new(key));
        }
    }
    map
}

fn decoded_len(b64: &str) -> Option<usize> {
    URL_SAFE_NO_PAD.decode(b64).ok().map(|v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(kty: &str, crv: &str, alg: &str, x: &str, y: Option<&str>) -> Jwk {
        Jwk {
            kty: kty.into(),
            crv: crv.into(),
            x: x.into(),
            y: y.map(Into::into),
            kid: "k".into(),
            alg: alg.into(),
            use_: "sig".into(),
        }
    }

    const X32: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn lenient_parse_skips_foreign_keys() {
        let body = format!(
            r#"{{"keys":[{{"kty":"RSA","n":"abc","e":"AQAB","kid":"r"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{X32}","kid":"e","alg":"EdDSA","use":"sig"}}]}}"#
        );
        let set = parse_lenient(body.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid, "e");
        assert!(parse_lenient(b"{}").is_err());
        assert!(parse_lenient(b"not json").is_err());
    }

    #[test]
    fn keys_must_agree_on_type_curve_and_alg() {
        assert!(key_from_jwk(&jwk("OKP", "Ed25519", "EdDSA", X32, None)).is_some());
        assert!(key_from_jwk(&jwk("OKP", "Ed25519", "ES256", X32, None)).is_none());
        assert!(key_from_jwk(&jwk("OKP", "Ed448", "EdDSA", X32, None)).is_none());
        assert!(key_from_jwk(&jwk("OKP", "Ed25519", "EdDSA", "AAAA", None)).is_none());
        assert!(key_from_jwk(&jwk("EC", "P-256", "ES256", X32, None)).is_none());
        assert!(key_from_jwk(&jwk("EC", "P-256", "ES256", X32, Some(X32))).is_some());
        assert!(key_from_jwk(&jwk("EC", "P-256", "EdDSA", X32, Some(X32))).is_none());
        assert!(key_from_jwk(&jwk("EC", "P-384", "ES384", X32, Some(X32))).is_none());
        let mut enc = jwk("OKP", "Ed25519", "EdDSA", X32, None);
        enc.use_ = "enc".into();
        assert!(key_from_jwk(&enc).is_none());
    }
}
