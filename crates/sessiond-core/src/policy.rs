//! Tenant session policies: validation of the policy document into a [`Policy`].

use sessiond_api::{CookiePolicy, PolicyDocument, SameSite, TokensPolicy};

use crate::error::CoreError;

/// The longest timeout a policy may set: ten years.
pub const MAX_TIMEOUT_S: u64 = 10 * 365 * 24 * 3600;

/// A validated tenant policy. Only [`Policy::new`] (and the valid default) make one, so every
/// `Policy` is valid.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    doc: PolicyDocument,
}

/// Idle and absolute timeouts, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Idle timeout.
    pub idle_s: u64,
    /// Absolute timeout.
    pub absolute_s: u64,
}

impl Policy {
    /// Validates a policy document.
    pub fn new(doc: PolicyDocument) -> Result<Self, CoreError> {
        let bad = |m: String| Err(CoreError::InvalidPolicy(m));
        for (name, v) in [
            ("idle_timeout_s", doc.idle_timeout_s),
            ("absolute_timeout_s", doc.absolute_timeout_s),
            ("remember_me_idle_timeout_s", doc.remember_me_idle_timeout_s),
            (
                "remember_me_absolute_timeout_s",
                doc.remember_me_absolute_timeout_s,
            ),
        ] {
            if v == 0 || v > MAX_TIMEOUT_S {
                return bad(format!(
                    "{name} must be between 1 and {MAX_TIMEOUT_S} seconds"
                ));
            }
        }
        if doc.idle_timeout_s > doc.absolute_timeout_s {
            return bad("idle_timeout_s must not exceed absolute_timeout_s".into());
        }
        if doc.remember_me_idle_timeout_s > doc.remember_me_absolute_timeout_s {
            return bad(
                "remember_me_idle_timeout_s must not exceed remember_me_absolute_timeout_s".into(),
            );
        }
        if doc.max_sessions_per_user == Some(0) {
            return bad("max_sessions_per_user must be at least 1, or null for no limit".into());
        }
        validate_cookie(&doc.cookie)?;
        if let Some(t) = &doc.tokens {
            validate_tokens(t)?;
        }
        if let Some(t) = &doc.impossible_travel
            && !(1..=100_000).contains(&t.max_speed_kmh)
        {
            return bad("impossible_travel.max_speed_kmh must be between 1 and 100000".into());
        }
        Ok(Self { doc })
    }

    /// The policy document (what `GET` returns and `PUT` accepts).
    pub fn document(&self) -> &PolicyDocument {
        &self.doc
    }

    /// The timeouts for a plain or remember-me session.
    pub fn timeouts(&self, remember_me: bool) -> Timeouts {
        if remember_me {
            Timeouts {
                idle_s: self.doc.remember_me_idle_timeout_s,
                absolute_s: self.doc.remember_me_absolute_timeout_s,
            }
        } else {
            Timeouts {
                idle_s: self.doc.idle_timeout_s,
                absolute_s: self.doc.absolute_timeout_s,
            }
        }
    }

    /// The per-user session limit.
    pub fn max_sessions_per_user(&self) -> Option<u32> {
        self.doc.max_sessions_per_user
    }

    /// The cookie settings.
    pub fn cookie(&self) -> &CookiePolicy {
        &self.doc.cookie
    }

    /// Token mode, when on.
    pub fn tokens(&self) -> Option<&TokensPolicy> {
        self.doc.tokens.as_ref()
    }
}

fn validate_tokens(t: &TokensPolicy) -> Result<(), CoreError> {
    let bad = |m: String| Err(CoreError::InvalidPolicy(m));
    let max = crate::jwt::MAX_ACCESS_TOKEN_TTL_S;
    if t.access_token_ttl_s == 0 || t.access_token_ttl_s > max {
        return bad(format!(
            "tokens.access_token_ttl_s must be between 1 and {max} seconds"
        ));
    }
    if t.refresh_reuse_grace_s > 60 {
        return bad("tokens.refresh_reuse_grace_s must be between 0 and 60 seconds".into());
    }
    for (name, v) in [
        ("tokens.issuer", &t.issuer),
        ("tokens.audience", &t.audience),
    ] {
        if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
            return bad(format!(
                "{name} must be 1 to 256 characters without control characters"
            ));
        }
    }
    Ok(())
}

fn is_cookie_name_char(b: u8) -> bool {
    // RFC 6265 cookie-name is an RFC 7230 token.
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn validate_cookie(c: &CookiePolicy) -> Result<(), CoreError> {
    let bad = |m: &str| Err(CoreError::InvalidPolicy(m.to_owned()));
    if c.name.is_empty() || c.name.len() > 128 || !c.name.bytes().all(is_cookie_name_char) {
        return bad("cookie.name must be 1 to 128 characters of an HTTP token");
    }
    // RFC 6265 path-value: US-ASCII without controls or ';'. Spaces are refused as well, and so
    // is anything outside ASCII: a header value with such bytes is refused by HTTP stacks.
    if !c.path.starts_with('/')
        || c.path.len() > 256
        || c.path.bytes().any(|b| !b.is_ascii_graphic() || b == b';')
    {
        return bad(
            "cookie.path must start with '/' and hold only visible ASCII characters other than ';'",
        );
    }
    if let Some(d) = &c.domain {
        let ok = !d.is_empty()
            && d.len() <= 253
            && d.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !d.starts_with('-')
            && !d.contains("..");
        if !ok {
            return bad("cookie.domain must be a DNS name");
        }
    }
    let lower = c.name.to_ascii_lowercase();
    if lower.starts_with("__host-") && (!c.secure || c.domain.is_some() || c.path != "/") {
        return bad("a __Host- cookie needs secure: true, path \"/\" and no domain");
    }
    if lower.starts_with("__secure-") && !c.secure {
        return bad("a __Secure- cookie needs secure: true");
    }
    if c.same_site == SameSite::None && !c.secure {
        return bad("same_site None needs secure: true");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(f: impl FnOnce(&mut PolicyDocument)) -> PolicyDocument {
        let mut d = PolicyDocument::default();
        f(&mut d);
        d
    }

    fn tokens(f: impl FnOnce(&mut TokensPolicy)) -> TokensPolicy {
        let mut t = TokensPolicy::new("https://auth.example", "api");
        f(&mut t);
        t
    }

    #[test]
    fn default_policy_is_valid() {
        assert!(Policy::new(PolicyDocument::default()).is_ok());
    }

    #[test]
    fn invalid_policies_are_refused_with_the_field_named() {
        let cases: Vec<(PolicyDocument, &str)> = vec![
            (doc(|d| d.idle_timeout_s = 0), "idle_timeout_s"),
            (
                doc(|d| d.absolute_timeout_s = MAX_TIMEOUT_S + 1),
                "absolute_timeout_s",
            ),
            (
                doc(|d| d.idle_timeout_s = d.absolute_timeout_s + 1),
                "idle_timeout_s must not",
            ),
            (
                doc(|d| d.remember_me_idle_timeout_s = d.remember_me_absolute_timeout_s + 1),
                "remember_me_idle",
            ),
            (
                doc(|d| d.max_sessions_per_user = Some(0)),
                "max_sessions_per_user",
            ),
            (doc(|d| d.cookie.name = "bad name".into()), "cookie.name"),
            (doc(|d| d.cookie.path = "nope".into()), "cookie.path"),
            (
                doc(|d| d.cookie.domain = Some("example.com".into())),
                "__Host-",
            ),
            (doc(|d| d.cookie.secure = false), "__Host-"),
            (
                doc(|d| {
                    d.cookie.name = "__Secure-s".into();
                    d.cookie.secure = false;
                }),
                "__Secure-",
            ),
            (
                doc(|d| {
                    d.cookie.name = "sid".into();
                    d.cookie.secure = false;
                    d.cookie.same_site = SameSite::None;
                }),
                "same_site None",
            ),
            (
                doc(|d| {
                    d.cookie.name = "sid".into();
                    d.cookie.domain = Some("bad;domain".into());
                }),
                "cookie.domain",
            ),
            (
                doc(|d| d.tokens = Some(tokens(|t| t.access_token_ttl_s = 0))),
                "access_token_ttl_s",
            ),
            (
                doc(|d| d.tokens = Some(tokens(|t| t.access_token_ttl_s = 3601))),
                "access_token_ttl_s",
            ),
            (
                doc(|d| d.tokens = Some(tokens(|t| t.refresh_reuse_grace_s = 61))),
                "refresh_reuse_grace_s",
            ),
            (
                doc(|d| d.tokens = Some(tokens(|t| t.issuer = String::new()))),
                "tokens.issuer",
            ),
            (
                doc(|d| d.tokens = Some(tokens(|t| t.audience = "a\nb".into()))),
                "tokens.audience",
            ),
        ];
        assert!(Policy::new(doc(|d| d.tokens = Some(tokens(|_| ())))).is_ok());
        for (d, needle) in cases {
            match Policy::new(d.clone()) {
                Err(CoreError::InvalidPolicy(m)) => assert!(m.contains(needle), "{m} / {needle}"),
                other => panic!("{d:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn timeouts_follow_remember_me() {
        let p = Policy::default();
        assert_eq!(
            p.timeouts(false),
            Timeouts {
                idle_s: 1800,
                absolute_s: 43_200
            }
        );
        assert_eq!(
            p.timeouts(true),
            Timeouts {
                idle_s: 1_209_600,
                absolute_s: 2_592_000
            }
        );
    }

    #[test]
    fn cookie_paths_outside_visible_ascii_are_refused() {
        // Every path here would put a byte into the Set-Cookie value that is not allowed there.
        for path in [
            "/caf\u{e9}",
            "/a\u{85}b",
            "/\u{2028}",
            "/a\u{7f}",
            "/a\tb",
            "/a b",
            "/a;b",
        ] {
            let d = doc(|d| {
                d.cookie.name = "sid".into();
                d.cookie.path = path.into();
            });
            match Policy::new(d) {
                Err(CoreError::InvalidPolicy(m)) => assert!(m.contains("cookie.path"), "{m}"),
                other => panic!("path {path:?} gave {other:?}"),
            }
        }
        let d = doc(|d| {
            d.cookie.name = "sid".into();
            d.cookie.path = "/app/~user-1_(x)%20,!".into();
        });
        assert!(Policy::new(d).is_ok());
    }

    #[test]
    fn equal_idle_and_absolute_and_non_host_cookies_are_fine() {
        let d = doc(|d| {
            d.idle_timeout_s = 60;
            d.absolute_timeout_s = 60;
            d.cookie.name = "sid".into();
            d.cookie.domain = Some("example.com".into());
            d.cookie.secure = false;
        });
        assert!(Policy::new(d).is_ok());
    }
}
