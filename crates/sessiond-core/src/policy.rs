//! Tenant session policies: validation of the policy document into a [`Policy`].

use sessiond_api::{AalLimits, CookiePolicy, PolicyDocument, SameSite, TokensPolicy};

use crate::error::CoreError;
use crate::session::AuthRecord;
use crate::time::Timestamp;

/// The longest timeout a policy may set: ten years.
pub const MAX_TIMEOUT_S: u64 = 10 * 365 * 24 * 3600;

/// The longest `Max-Age` a cookie may carry: 400 days, the limit user agents apply
/// (RFC 6265bis, section 5.5). A remember-me session's absolute timeout may not exceed it.
pub const MAX_COOKIE_AGE_S: u64 = 400 * 24 * 3600;

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
    /// Validates a policy document with every rule: what `PUT` accepts.
    pub fn new(doc: PolicyDocument) -> Result<Self, CoreError> {
        validate(&doc, true)?;
        Ok(Self { doc })
    }

    /// Validates a document read back from a store. Rules added after a document could have
    /// been stored (cookie domains, the 400-day cookie age) are not applied, so a policy stored
    /// by an earlier version keeps working; `Max-Age` is still capped when a cookie is built.
    pub fn from_stored(doc: PolicyDocument) -> Result<Self, CoreError> {
        validate(&doc, false)?;
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

    /// Whether a session may only be created with an authentication event (`auth.method`).
    pub fn require_auth(&self) -> bool {
        self.doc.require_auth
    }

    /// The reauthentication limits of assurance level `aal` (2 or 3; level 1 has none besides
    /// the session's own timeouts).
    pub fn aal_limits(&self, aal: u8) -> Option<AalLimits> {
        match aal {
            2 => Some(self.doc.aal_timeouts.aal2),
            3.. => Some(self.doc.aal_timeouts.aal3),
            _ => None,
        }
    }

    /// The assurance level a session counts as at `now`: the recorded level while its limits
    /// hold (time since the authentication within the level's absolute limit, time since the
    /// last use before `now` within its idle limit), else the highest lower level whose limits
    /// hold, down to 1. Remember-me keeps a session alive, never its assurance level.
    pub fn effective_aal(&self, auth: &AuthRecord, last_seen: Timestamp, now: Timestamp) -> u8 {
        let mut aal = auth.aal;
        while aal > 1 {
            let Some(l) = self.aal_limits(aal) else {
                break;
            };
            let holds = now < auth.authenticated_at.plus_secs(l.absolute_timeout_s)
                && now < last_seen.plus_secs(l.idle_timeout_s);
            if holds {
                break;
            }
            aal -= 1;
        }
        aal
    }
}

fn validate(doc: &PolicyDocument, strict: bool) -> Result<(), CoreError> {
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
    if strict && doc.remember_me_absolute_timeout_s > MAX_COOKIE_AGE_S {
        return bad(format!(
            "remember_me_absolute_timeout_s must not exceed {MAX_COOKIE_AGE_S} seconds \
             (400 days, the longest cookie Max-Age browsers keep)"
        ));
    }
    if doc.max_sessions_per_user == Some(0) {
        return bad("max_sessions_per_user must be at least 1, or null for no limit".into());
    }
    validate_cookie(&doc.cookie, strict)?;
    if let Some(t) = &doc.tokens {
        validate_tokens(t)?;
    }
    if let Some(t) = &doc.impossible_travel
        && !(1..=100_000).contains(&t.max_speed_kmh)
    {
        return bad("impossible_travel.max_speed_kmh must be between 1 and 100000".into());
    }
    validate_aal_timeouts(doc)
}

fn validate_aal_timeouts(doc: &PolicyDocument) -> Result<(), CoreError> {
    let bad = |m: String| Err(CoreError::InvalidPolicy(m));
    let a = &doc.aal_timeouts;
    for (level, l) in [("aal2", &a.aal2), ("aal3", &a.aal3)] {
        for (name, v) in [
            ("idle_timeout_s", l.idle_timeout_s),
            ("absolute_timeout_s", l.absolute_timeout_s),
        ] {
            if v == 0 || v > MAX_TIMEOUT_S {
                return bad(format!(
                    "aal_timeouts.{level}.{name} must be between 1 and {MAX_TIMEOUT_S} seconds"
                ));
            }
        }
        if l.idle_timeout_s > l.absolute_timeout_s {
            return bad(format!(
                "aal_timeouts.{level}.idle_timeout_s must not exceed \
                 aal_timeouts.{level}.absolute_timeout_s"
            ));
        }
    }
    if a.aal3.idle_timeout_s > a.aal2.idle_timeout_s
        || a.aal3.absolute_timeout_s > a.aal2.absolute_timeout_s
    {
        return bad("aal_timeouts.aal3 must be no looser than aal_timeouts.aal2".into());
    }
    Ok(())
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

fn validate_cookie(c: &CookiePolicy, strict: bool) -> Result<(), CoreError> {
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
        if strict {
            validate_cookie_domain(d)?;
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
    if strict && c.domain.is_some() && !c.secure {
        return bad(
            "a cookie with cookie.domain is sent to every subdomain and needs secure: true \
             (and preferably a __Secure- name)",
        );
    }
    Ok(())
}

/// The rules for a cookie's `Domain` beyond its syntax: a registrable domain or a name under
/// one, written without a leading dot, never an IP address or a public suffix (a cookie for
/// `com` or `github.io` would be sent to every site under it, and browsers drop it anyway).
fn validate_cookie_domain(d: &str) -> Result<(), CoreError> {
    let bad = |m: &str| Err(CoreError::InvalidPolicy(m.to_owned()));
    if d.starts_with('.') || d.ends_with('.') {
        return bad("cookie.domain must be written without a leading or trailing dot");
    }
    let labels: Vec<&str> = d.split('.').collect();
    if labels.len() < 2 {
        return bad("cookie.domain must have at least two labels (a single label is not a site)");
    }
    if labels.iter().any(|l| l.len() > 63) {
        return bad("cookie.domain has a label longer than 63 characters");
    }
    // A numeric last label is how an IPv4 address (or something a resolver reads as one) ends;
    // no top-level domain is numeric. IPv6 literals fail the syntax check already (':').
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("cookie.domain must be a DNS name, not an IP address");
    }
    let lower = d.to_ascii_lowercase();
    if psl::domain(lower.as_bytes()).is_none() {
        return bad(
            "cookie.domain must not be a public suffix (a name under which anyone may register sites)",
        );
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
        });
        assert!(Policy::new(d).is_ok());
        // Without a domain, a name with no prefix may go without Secure (plain-HTTP development).
        let d = doc(|d| {
            d.cookie.name = "sid".into();
            d.cookie.secure = false;
        });
        assert!(Policy::new(d).is_ok());
    }

    fn refused(d: PolicyDocument, needle: &str) {
        match Policy::new(d.clone()) {
            Err(CoreError::InvalidPolicy(m)) => {
                assert!(m.contains(needle), "{m} / {needle}");
            }
            other => panic!("{d:?} gave {other:?}"),
        }
    }

    fn domain(d: &str, secure: bool) -> PolicyDocument {
        doc(|p| {
            p.cookie.name = "__Secure-sid".into();
            p.cookie.domain = Some(d.into());
            p.cookie.secure = secure;
        })
    }

    #[test]
    fn cookie_domains_must_be_registrable_names_without_a_leading_dot() {
        for ok in [
            "example.com",
            "app.example.com",
            "EXAMPLE.COM",
            "example.co.uk",
            "corp.internal",
        ] {
            assert!(Policy::new(domain(ok, true)).is_ok(), "{ok}");
        }
        for (d, needle) in [
            (".example.com", "leading or trailing dot"),
            ("example.com.", "leading or trailing dot"),
            ("localhost", "two labels"),
            ("com", "two labels"),
            ("127.0.0.1", "IP address"),
            ("10.1.2.3", "IP address"),
            ("co.uk", "public suffix"),
            ("github.io", "public suffix"),
            ("COM.AU", "public suffix"),
        ] {
            refused(domain(d, true), needle);
            // The message names the field and never repeats the value.
            if let Err(CoreError::InvalidPolicy(m)) = Policy::new(domain(d, true)) {
                assert!(m.contains("cookie.domain") && !m.contains(d), "{m}");
            }
        }
        let long = format!("{}.example.com", "a".repeat(64));
        refused(domain(&long, true), "63");
    }

    #[test]
    fn cookies_with_a_domain_need_secure() {
        refused(
            doc(|p| {
                p.cookie.name = "sid".into();
                p.cookie.domain = Some("example.com".into());
                p.cookie.secure = false;
            }),
            "cookie.domain",
        );
        refused(domain("example.com", false), "__Secure-");
        refused(
            doc(|p| {
                p.cookie.name = "sid".into();
                p.cookie.secure = false;
                p.cookie.same_site = SameSite::None;
            }),
            "same_site None",
        );
        refused(
            doc(|p| {
                p.cookie.name = "__host-sid".into();
                p.cookie.secure = false;
            }),
            "__Host-",
        );
    }

    #[test]
    fn remember_me_cookies_live_at_most_400_days() {
        assert!(Policy::new(doc(|d| d.remember_me_absolute_timeout_s = MAX_COOKIE_AGE_S)).is_ok());
        refused(
            doc(|d| d.remember_me_absolute_timeout_s = MAX_COOKIE_AGE_S + 1),
            "remember_me_absolute_timeout_s",
        );
        refused(
            doc(|d| d.remember_me_absolute_timeout_s = 315_360_000),
            "400 days",
        );
    }

    #[test]
    fn stored_policies_from_before_the_cookie_rules_still_load() {
        let d = doc(|d| {
            d.remember_me_absolute_timeout_s = 315_360_000;
            d.cookie.name = "sid".into();
            d.cookie.domain = Some(".example.com".into());
            d.cookie.secure = false;
        });
        assert!(Policy::new(d.clone()).is_err());
        assert!(Policy::from_stored(d).is_ok());
        // The rules that always held still apply to stored documents.
        assert!(Policy::from_stored(doc(|d| d.idle_timeout_s = 0)).is_err());
    }

    #[test]
    fn aal_timeouts_are_validated() {
        use sessiond_api::AalLimits;
        let l = |idle, abs| AalLimits {
            idle_timeout_s: idle,
            absolute_timeout_s: abs,
        };
        refused(
            doc(|d| d.aal_timeouts.aal2 = l(0, 60)),
            "aal_timeouts.aal2.idle_timeout_s",
        );
        refused(
            doc(|d| d.aal_timeouts.aal3.absolute_timeout_s = MAX_TIMEOUT_S + 1),
            "aal_timeouts.aal3.absolute_timeout_s",
        );
        refused(
            doc(|d| d.aal_timeouts.aal2 = l(600, 300)),
            "aal_timeouts.aal2.idle_timeout_s must not exceed",
        );
        refused(doc(|d| d.aal_timeouts.aal3 = l(3600, 43_200)), "no looser");
        assert!(Policy::new(doc(|d| d.aal_timeouts.aal2 = l(60, 120))).is_err());
        assert!(
            Policy::new(doc(|d| {
                d.aal_timeouts.aal2 = l(60, 120);
                d.aal_timeouts.aal3 = l(30, 120);
            }))
            .is_ok()
        );
    }

    fn auth(aal: u8, at: Timestamp) -> AuthRecord {
        AuthRecord {
            method: "webauthn".into(),
            aal,
            authenticated_at: at,
        }
    }

    #[test]
    fn assurance_levels_decay_past_their_nist_limits() {
        let p = Policy::default();
        let t0 = Timestamp::from_millis(1_800_000_000_000);
        // AAL 2: 12 h since the authentication, 30 min without use.
        let a2 = auth(2, t0);
        assert_eq!(p.effective_aal(&a2, t0, t0.plus_secs(1799)), 2);
        assert_eq!(p.effective_aal(&a2, t0, t0.plus_secs(1800)), 1);
        let used = t0.plus_secs(43_000);
        assert_eq!(p.effective_aal(&a2, used, t0.plus_secs(43_199)), 2);
        assert_eq!(p.effective_aal(&a2, used, t0.plus_secs(43_200)), 1);
        // AAL 3: 15 min without use drops it to 2 (still within AAL 2's 30 min), then to 1.
        let a3 = auth(3, t0);
        assert_eq!(p.effective_aal(&a3, t0, t0.plus_secs(899)), 3);
        assert_eq!(p.effective_aal(&a3, t0, t0.plus_secs(900)), 2);
        assert_eq!(p.effective_aal(&a3, t0, t0.plus_secs(1800)), 1);
        // AAL 1 never decays (its limit is the session's own timeouts).
        assert_eq!(
            p.effective_aal(&auth(1, t0), t0, t0.plus_secs(10_000_000)),
            1
        );
    }
}
