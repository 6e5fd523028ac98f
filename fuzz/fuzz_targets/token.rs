//! The presented-token path and the identifiers parsed from requests: token prefixes,
//! `TokenFormat::hash_presented`, session handles, user ids and tenant ids.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sessiond_core::token::{
    HANDLE_PREFIX, SessionHandle, TOKEN_BODY_LEN, TenantId, TokenFormat, TokenHash, UserId,
};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    prefix: &'a str,
    presented: &'a str,
    id: &'a str,
    /// Where to change a freshly generated token, and to what.
    flip: (u8, u8),
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// What `hash_presented` must accept: the prefix, then exactly 43 base64url characters.
fn well_formed(format: &TokenFormat, presented: &str) -> bool {
    presented
        .strip_prefix(format.prefix())
        .is_some_and(|body| body.len() == TOKEN_BODY_LEN && body.bytes().all(is_base64url))
}

fn check_presented(format: &TokenFormat, presented: &str) {
    match format.hash_presented(presented) {
        Some(h) => {
            assert!(well_formed(format, presented), "accepted {presented:?}");
            assert!(h.ct_eq(&TokenHash::of(presented)));
        }
        None => assert!(!well_formed(format, presented), "refused {presented:?}"),
    }
}

fn check_prefix(prefix: &str) -> Option<TokenFormat> {
    let valid = prefix.len() <= 32 && prefix.bytes().all(is_base64url);
    match TokenFormat::new(prefix) {
        Ok(f) => {
            assert!(valid, "prefix {prefix:?} accepted");
            assert_eq!(f.prefix(), prefix);
            Some(f)
        }
        Err(_) => {
            assert!(!valid, "prefix {prefix:?} refused");
            None
        }
    }
}

fn check_generated(format: &TokenFormat, flip: (u8, u8)) {
    let (token, hash) = format.generate().expect("CSPRNG");
    let text = token.expose();
    assert!(text.starts_with(format.prefix()));
    assert_eq!(text.len(), format.prefix().len() + TOKEN_BODY_LEN);
    let presented = format
        .hash_presented(text)
        .expect("a fresh token is well formed");
    assert!(presented.ct_eq(&hash), "a fresh token hashes to its hash");
    assert_eq!(presented, hash);

    // Any other text hashes to something else (or is refused outright).
    let mut bytes = text.as_bytes().to_vec();
    let at = usize::from(flip.0) % bytes.len();
    if bytes[at] != flip.1 {
        bytes[at] = flip.1;
        if let Ok(other) = std::str::from_utf8(&bytes) {
            check_presented(format, other);
            if let Some(h) = format.hash_presented(other) {
                assert!(!h.ct_eq(&hash), "two token texts share a hash");
            }
        }
    }
}

fn check_ids(s: &str) {
    match SessionHandle::parse(s) {
        Ok(h) => {
            assert_eq!(h.as_str(), s);
            assert_eq!(h.to_string(), s);
            assert!(s.starts_with(HANDLE_PREFIX) && s.len() == HANDLE_PREFIX.len() + 22);
            assert!(s[HANDLE_PREFIX.len()..].bytes().all(is_base64url));
            assert_eq!(SessionHandle::parse(h.as_str()).expect("round trip"), h);
        }
        Err(_) => {
            let ok = s
                .strip_prefix(HANDLE_PREFIX)
                .is_some_and(|b| b.len() == 22 && b.bytes().all(is_base64url));
            assert!(!ok, "handle {s:?} refused");
        }
    }
    match UserId::parse(s) {
        Ok(u) => {
            assert_eq!(u.as_str(), s);
            assert!(!s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control));
            assert_eq!(UserId::parse(u.as_str()).expect("round trip"), u);
        }
        Err(_) => assert!(s.is_empty() || s.len() > 256 || s.chars().any(char::is_control)),
    }
    match TenantId::parse(s) {
        Ok(t) => {
            assert_eq!(t.as_str(), s);
            assert!(!s.is_empty() && s.len() <= 64);
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            );
            assert_eq!(TenantId::parse(t.as_str()).expect("round trip"), t);
        }
        Err(_) => assert!(
            s.is_empty()
                || s.len() > 64
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        ),
    }
}

fuzz_target!(|input: Input<'_>| {
    let default = TokenFormat::default();
    check_presented(&default, input.presented);
    check_presented(
        &default,
        &format!("{}{}", default.prefix(), input.presented),
    );

    if let Some(format) = check_prefix(input.prefix) {
        check_presented(&format, input.presented);
        check_presented(&format, &format!("{}{}", input.prefix, input.presented));
        check_generated(&format, input.flip);
    }

    check_ids(input.id);
    check_ids(input.presented);
    let fresh = SessionHandle::generate().expect("CSPRNG");
    assert_eq!(
        SessionHandle::parse(fresh.as_str()).expect("fresh handle"),
        fresh
    );
});
