//! Token mode's parsers of untrusted input: access tokens (JWT) through `Keyring::verify`,
//! refresh tokens through `refresh::parse`, and a stored refresh state through
//! `RefreshState::from_text`. Nothing may panic; a changed byte of a valid access token must
//! never verify with other claims; only the issued refresh token parses to its session.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sessiond_api::AccessClaims;
use sessiond_core::jwt::{Keyring, SigningAlg};
use sessiond_core::refresh::{self, RefreshState};
use sessiond_core::time::Timestamp;
use sessiond_core::token::SessionHandle;

/// 2026-06-01T00:00:00Z.
const NOW_MS: i64 = 1_780_272_000_000;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    presented: &'a str,
    /// Where to change the valid token, and to what.
    flip: (u16, u8),
    /// Seconds after issue at which to verify.
    after_s: u16,
    use_es256: bool,
}

struct Fixture {
    rings: [Keyring; 2],
    tokens: [String; 2],
    claims: AccessClaims,
    handle: SessionHandle,
    refresh: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = Timestamp::from_millis(NOW_MS);
        let s = NOW_MS / 1000;
        let handle = SessionHandle::generate().expect("a handle");
        let claims = AccessClaims {
            iss: "https://auth.example".into(),
            aud: "api".into(),
            sub: "u-42".into(),
            sid: handle.as_str().to_owned(),
            iat: s,
            nbf: s,
            exp: s + 300,
            auth_time: s,
            aal: 1,
            tenant: "default".into(),
            jti: "j".into(),
            rot: 0,
            extra: serde_json::Map::new(),
        };
        let ring = |alg| {
            Keyring::load(&Keyring::generate(alg, now, None).expect("doc"), None).expect("ring")
        };
        let rings = [ring(SigningAlg::EdDSA), ring(SigningAlg::ES256)];
        let tokens = [
            rings[0].sign(&claims, now).expect("sign"),
            rings[1].sign(&claims, now).expect("sign"),
        ];
        let (_, refresh) =
            RefreshState::issue(&handle, serde_json::Map::new(), now).expect("refresh");
        Fixture {
            rings,
            tokens,
            claims,
            handle,
            refresh: refresh.expose().to_owned(),
        }
    })
}

fuzz_target!(|input: Input<'_>| {
    let f = fixture();
    let i = usize::from(input.use_es256);
    let (ring, valid) = (&f.rings[i], &f.tokens[i]);
    let now = Timestamp::from_millis(NOW_MS).plus_secs(u64::from(input.after_s));

    // Arbitrary text: no panic; if it verifies, it is the valid token's claims.
    if let Ok(c) = ring.verify(input.presented, now) {
        assert_eq!(c, f.claims, "arbitrary text verified with other claims");
    }

    // One changed byte of a valid token.
    let mut bytes = valid.clone().into_bytes();
    let at = usize::from(input.flip.0) % bytes.len();
    bytes[at] = input.flip.1;
    if let Ok(changed) = String::from_utf8(bytes)
        && let Ok(c) = ring.verify(&changed, now)
    {
        // Base64 has spare bits in its last character: a change there can decode alike.
        assert_eq!(c, f.claims, "a changed token verified with other claims");
    }
    // The valid token verifies until it expires, and only with its own keyring.
    let expected_ok = now.as_millis() / 1000 < f.claims.exp;
    assert_eq!(ring.verify(valid, now).is_ok(), expected_ok);
    assert!(f.rings[1 - i].verify(valid, now).is_err());

    // Refresh tokens: arbitrary text parses only to a handle it names.
    if let Some((h, _)) = refresh::parse(input.presented) {
        assert!(input.presented.contains(h.as_str()));
    }
    let (h, _) = refresh::parse(&f.refresh).expect("the issued refresh token parses");
    assert_eq!(h, f.handle);
    let _ = RefreshState::from_text(input.presented);
});
