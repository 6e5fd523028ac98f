//! `Set-Cookie` header values for the session cookie and for deleting it.

use std::fmt::Write;

use sessiond_api::{CookiePolicy, SameSite};

fn attributes(out: &mut String, c: &CookiePolicy) {
    let _ = write!(out, "; Path={}", c.path);
    if let Some(d) = &c.domain {
        let _ = write!(out, "; Domain={d}");
    }
    if c.secure {
        out.push_str("; Secure");
    }
    out.push_str("; HttpOnly");
    out.push_str(match c.same_site {
        SameSite::Strict => "; SameSite=Strict",
        SameSite::Lax => "; SameSite=Lax",
        SameSite::None => "; SameSite=None",
    });
}

/// The `Set-Cookie` value carrying `value`. `max_age_s` is `None` for a browser-session cookie
/// and the seconds left to the absolute expiry for a remember-me session, capped at 400 days
/// (user agents cap it there anyway; a policy stored before that rule may ask for more).
pub fn set_cookie(c: &CookiePolicy, value: &str, max_age_s: Option<u64>) -> String {
    let mut out = String::with_capacity(c.name.len() + value.len() + 96);
    out.push_str(&c.name);
    out.push('=');
    out.push_str(value);
    attributes(&mut out, c);
    if let Some(s) = max_age_s {
        let _ = write!(out, "; Max-Age={}", s.min(crate::policy::MAX_COOKIE_AGE_S));
    }
    out
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie(c: &CookiePolicy) -> String {
    let mut out = format!("{}=", c.name);
    attributes(&mut out, c);
    out.push_str("; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cookie_is_host_only_secure_httponly_lax_without_max_age() {
        let c = CookiePolicy::default();
        assert_eq!(
            set_cookie(&c, "sdt_x", None),
            "__Host-session=sdt_x; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn remember_me_cookie_has_max_age_and_domain_when_configured() {
        let c = CookiePolicy {
            name: "sid".into(),
            domain: Some("example.com".into()),
            path: "/app".into(),
            same_site: SameSite::Strict,
            secure: true,
        };
        assert_eq!(
            set_cookie(&c, "v", Some(60)),
            "sid=v; Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=Strict; Max-Age=60"
        );
    }

    #[test]
    fn max_age_is_capped_at_400_days() {
        let c = CookiePolicy::default();
        assert!(set_cookie(&c, "v", Some(315_360_000)).ends_with("; Max-Age=34560000"));
        assert!(set_cookie(&c, "v", Some(34_559_999)).ends_with("; Max-Age=34559999"));
    }

    #[test]
    fn clear_cookie_expires_it() {
        let c = CookiePolicy::default();
        let v = clear_cookie(&c);
        assert!(v.starts_with("__Host-session=; Path=/; Secure; HttpOnly; SameSite=Lax"));
        assert!(v.contains("Max-Age=0"));
    }
}
