//! Tenant policy documents: JSON (or a structured document when the input is not one) →
//! `PolicyDocument` → `Policy::new` → timeouts and the `Set-Cookie` values built from the
//! cookie settings. Validation must refuse every value that could break out of its
//! `Set-Cookie` attribute.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sessiond_api::{
    AalLimits, AalTimeouts, BindingAction, BindingPolicy, CookiePolicy, IpBinding, OnLimit,
    PolicyDocument, SameSite, TokensPolicy, TravelPolicy, UserAgentBinding,
};
use sessiond_core::cookie::{clear_cookie, set_cookie};
use sessiond_core::policy::{MAX_COOKIE_AGE_S, MAX_TIMEOUT_S, Policy};
use sessiond_core::token::TokenFormat;

#[derive(Debug, Arbitrary)]
enum Name<'a> {
    Default,
    Host(&'a str),
    Secure(&'a str),
    Plain(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Doc<'a> {
    timeouts: [u64; 4],
    max_sessions: Option<u32>,
    deny: bool,
    name: Name<'a>,
    domain: Option<&'a str>,
    path: &'a str,
    same_site: u8,
    secure: bool,
    /// Token mode: TTL, refresh, grace, issuer, audience.
    tokens: Option<(u16, bool, u8, &'a str, &'a str)>,
    /// Binding: ip, user agent, action (each taken modulo 3).
    binding: Option<(u8, u8, u8)>,
    /// Impossible travel: speed, action.
    travel: Option<(u32, u8)>,
    require_auth: bool,
    /// AAL 2 idle and absolute, AAL 3 idle and absolute.
    aal: [u64; 4],
}

fn action(a: u8) -> BindingAction {
    match a % 3 {
        0 => BindingAction::Flag,
        1 => BindingAction::Reauthenticate,
        _ => BindingAction::Revoke,
    }
}

impl Doc<'_> {
    fn build(self) -> PolicyDocument {
        // Mostly in range, with 0 and one past the maximum reachable.
        let t = self.timeouts.map(|v| v % (MAX_TIMEOUT_S + 2));
        let a = self.aal.map(|v| v % (MAX_TIMEOUT_S + 2));
        let name = match self.name {
            Name::Default => CookiePolicy::default().name,
            Name::Host(s) => format!("__Host-{s}"),
            Name::Secure(s) => format!("__Secure-{s}"),
            Name::Plain(s) => s.to_owned(),
        };
        PolicyDocument {
            idle_timeout_s: t[0],
            absolute_timeout_s: t[1],
            remember_me_idle_timeout_s: t[2],
            remember_me_absolute_timeout_s: t[3],
            max_sessions_per_user: self.max_sessions,
            on_limit: if self.deny {
                OnLimit::Deny
            } else {
                OnLimit::EvictOldest
            },
            cookie: CookiePolicy {
                name,
                domain: self.domain.map(str::to_owned),
                path: format!("/{}", self.path),
                same_site: match self.same_site % 3 {
                    0 => SameSite::Strict,
                    1 => SameSite::Lax,
                    _ => SameSite::None,
                },
                secure: self.secure,
            },
            tokens: self
                .tokens
                .map(|(ttl, refresh, grace, iss, aud)| TokensPolicy {
                    access_token_ttl_s: u64::from(ttl),
                    refresh_token: refresh,
                    refresh_reuse_grace_s: u64::from(grace),
                    issuer: iss.to_owned(),
                    audience: aud.to_owned(),
                }),
            binding: self.binding.map(|(ip, ua, a)| BindingPolicy {
                ip: [IpBinding::Off, IpBinding::Subnet, IpBinding::Exact][usize::from(ip % 3)],
                user_agent: [
                    UserAgentBinding::Off,
                    UserAgentBinding::Family,
                    UserAgentBinding::Exact,
                ][usize::from(ua % 3)],
                action: action(a),
            }),
            impossible_travel: self.travel.map(|(speed, a)| TravelPolicy {
                max_speed_kmh: speed % 100_002,
                action: action(a),
            }),
            require_auth: self.require_auth,
            aal_timeouts: AalTimeouts {
                aal2: AalLimits {
                    idle_timeout_s: a[0],
                    absolute_timeout_s: a[1],
                },
                aal3: AalLimits {
                    idle_timeout_s: a[2],
                    absolute_timeout_s: a[3],
                },
            },
        }
    }
}

/// Checks a `Set-Cookie` value attribute by attribute: every byte printable ASCII, exactly the
/// attributes the policy asks for, each with the policy's value.
fn check_set_cookie(header: &str, c: &CookiePolicy, value: &str, max_age: Option<&str>) {
    assert!(
        header.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "Set-Cookie {header:?} holds a byte outside printable ASCII"
    );
    let mut expected = vec![format!("{}={value}", c.name), format!("Path={}", c.path)];
    if let Some(d) = &c.domain {
        expected.push(format!("Domain={d}"));
    }
    if c.secure {
        expected.push("Secure".into());
    }
    expected.push("HttpOnly".into());
    expected.push(
        match c.same_site {
            SameSite::Strict => "SameSite=Strict",
            SameSite::Lax => "SameSite=Lax",
            SameSite::None => "SameSite=None",
        }
        .into(),
    );
    if let Some(m) = max_age {
        expected.extend(m.split("; ").map(str::to_owned));
    }
    let parts: Vec<&str> = header
        .split(';')
        .map(|p| p.trim_start_matches(' '))
        .collect();
    assert_eq!(parts, expected, "Set-Cookie {header:?}");

    // The cookie's name is a token: the first '=' ends it.
    let (name, _) = parts[0].split_once('=').expect("name=value");
    assert_eq!(name, c.name);
    let lower = c.name.to_ascii_lowercase();
    if lower.starts_with("__host-") {
        assert!(c.secure && c.domain.is_none() && c.path == "/");
    }
    if lower.starts_with("__secure-") || c.same_site == SameSite::None || c.domain.is_some() {
        assert!(c.secure);
    }
    if let Some(d) = &c.domain {
        assert!(!d.starts_with('.') && d.contains('.'));
    }
}

fn check_valid(policy: &Policy, max_age: u64) {
    for remember_me in [false, true] {
        let t = policy.timeouts(remember_me);
        assert!(t.idle_s >= 1 && t.idle_s <= t.absolute_s && t.absolute_s <= MAX_TIMEOUT_S);
    }
    assert!(policy.timeouts(true).absolute_s <= MAX_COOKIE_AGE_S);
    let a = policy.document().aal_timeouts;
    for l in [a.aal2, a.aal3] {
        assert!(l.idle_timeout_s >= 1 && l.idle_timeout_s <= l.absolute_timeout_s);
        assert!(l.absolute_timeout_s <= MAX_TIMEOUT_S);
    }
    assert!(a.aal3.idle_timeout_s <= a.aal2.idle_timeout_s);
    assert!(a.aal3.absolute_timeout_s <= a.aal2.absolute_timeout_s);
    assert_ne!(policy.max_sessions_per_user(), Some(0));
    if let Some(t) = policy.tokens() {
        assert!((1..=3600).contains(&t.access_token_ttl_s));
        assert!(t.refresh_reuse_grace_s <= 60);
        for v in [&t.issuer, &t.audience] {
            assert!(!v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control));
        }
    }

    let c = policy.cookie();
    let (token, _) = TokenFormat::default().generate().expect("CSPRNG");
    let value = token.expose();
    check_set_cookie(&set_cookie(c, value, None), c, value, None);
    let max_age = max_age % (MAX_TIMEOUT_S + 1);
    check_set_cookie(
        &set_cookie(c, value, Some(max_age)),
        c,
        value,
        Some(&format!("Max-Age={}", max_age.min(MAX_COOKIE_AGE_S))),
    );
    check_set_cookie(
        &clear_cookie(c),
        c,
        "",
        Some("Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"),
    );

    // GET returns exactly the document PUT accepted, and it is still valid.
    let doc = policy.document();
    let text = serde_json::to_string(doc).expect("serializable");
    let back: PolicyDocument = serde_json::from_str(&text).expect("round trip");
    assert_eq!(&back, doc);
    assert_eq!(&Policy::new(back).expect("still valid"), policy);
}

fuzz_target!(|data: &[u8]| {
    let doc = match serde_json::from_slice::<PolicyDocument>(data) {
        Ok(doc) => doc,
        Err(_) => {
            let mut u = Unstructured::new(data);
            match Doc::arbitrary(&mut u) {
                Ok(d) => d.build(),
                Err(_) => return,
            }
        }
    };
    let max_age = data
        .iter()
        .fold(0u64, |a, &b| a.rotate_left(8) ^ u64::from(b));
    if let Ok(policy) = Policy::new(doc) {
        check_valid(&policy, max_age);
    }
});
