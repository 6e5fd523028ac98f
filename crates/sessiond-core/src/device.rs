//! The device view: client IP and user agent, parsed into browser and OS families.

use std::net::IpAddr;
use std::sync::Arc;

use sessiond_api::ClientInput;

use crate::error::CoreError;
use sha2::{Digest, Sha256};

use crate::session::{DeviceRecord, SessionRecord};

/// Longest user agent accepted.
pub const MAX_USER_AGENT: usize = 1024;

/// Validates the client given by the application and parses its user agent.
pub fn device_from(client: Option<&ClientInput>) -> Result<DeviceRecord, CoreError> {
    let Some(c) = client else {
        return Ok(DeviceRecord::default());
    };
    let ip = match c.ip.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<IpAddr>().map_err(|_| {
            CoreError::InvalidRequest("client.ip must be an IPv4 or IPv6 address".into())
        })?),
    };
    let (user_agent, browser, os) = match c.user_agent.as_deref() {
        None | Some("") => (None, None, None),
        Some(ua) => {
            if ua.len() > MAX_USER_AGENT || ua.chars().any(char::is_control) {
                return Err(CoreError::InvalidRequest(format!(
                    "client.user_agent must be at most {MAX_USER_AGENT} bytes without control characters"
                )));
            }
            let (b, o) = parse_user_agent(ua);
            (Some(Arc::from(ua)), b, o)
        }
    };
    Ok(DeviceRecord {
        ip,
        user_agent,
        browser,
        os,
    })
}

/// Browser and OS family of a user agent; `None` where it is not recognised.
pub fn parse_user_agent(ua: &str) -> (Option<Arc<str>>, Option<Arc<str>>) {
    let known =
        |s: &str| (!s.is_empty() && s != woothee::woothee::VALUE_UNKNOWN).then(|| Arc::from(s));
    match woothee::parser::Parser::new().parse(ua) {
        Some(r) => (known(r.name), known(r.os)),
        None => (None, None),
    }
}

/// Whether the presented client differs from the session's device under the binding policy:
/// `Some("ip")` or `Some("user_agent")`. A side the request does not name is not compared.
pub fn binding_mismatch(
    b: &sessiond_api::BindingPolicy,
    bound: &DeviceRecord,
    presented: &DeviceRecord,
) -> Option<&'static str> {
    use sessiond_api::{IpBinding, UserAgentBinding};
    let ip_differs = match (b.ip, bound.ip, presented.ip) {
        (IpBinding::Off, _, _) | (_, _, None) => false,
        (_, None, Some(_)) => true,
        (IpBinding::Exact, Some(a), Some(p)) => a != p,
        (IpBinding::Subnet, Some(a), Some(p)) => subnet(a) != subnet(p),
    };
    if ip_differs {
        return Some("ip");
    }
    let ua_differs = match (b.user_agent, &presented.user_agent) {
        (UserAgentBinding::Off, _) | (_, None) => false,
        (UserAgentBinding::Exact, Some(p)) => bound.user_agent.as_ref() != Some(p),
        (UserAgentBinding::Family, Some(_)) => {
            (bound.browser.as_ref(), bound.os.as_ref())
                != (presented.browser.as_ref(), presented.os.as_ref())
        }
    };
    ua_differs.then_some("user_agent")
}

/// The /24 of an IPv4 address, the /64 of an IPv6 address.
fn subnet(ip: IpAddr) -> (u8, u128) {
    match ip {
        IpAddr::V4(v4) => (4, u128::from(v4.to_bits() >> 8)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (4, u128::from(v4.to_bits() >> 8)),
            None => (6, v6.to_bits() >> 64),
        },
    }
}

/// A stable, non-secret id of the device a session was created on: a digest of its browser
/// family, OS family and network (the /24 of an IPv4 address, the /48 of an IPv6 address), so
/// that a new browser version or a new address in the same network is the same device. `None`
/// when the session names no client at all.
pub fn device_id(rec: &SessionRecord) -> Option<String> {
    let d = &rec.device;
    if d.ip.is_none() && d.browser.is_none() && d.os.is_none() {
        return None;
    }
    let net = match d.ip {
        None => String::new(),
        Some(IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
        },
    };
    let text = format!(
        "sessiond device v1\n{}\n{}\n{net}",
        d.browser.as_deref().unwrap_or(""),
        d.os.as_deref().unwrap_or("")
    );
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::from("dev_");
    for b in &digest[..12] {
        out.push_str(&format!("{b:02x}"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_compares_what_the_policy_names() {
        use sessiond_api::{BindingPolicy, IpBinding, UserAgentBinding};
        let dev = |ip: &str, ua: &str| {
            device_from(Some(&ClientInput {
                ip: Some(ip.into()),
                user_agent: Some(ua.into()),
            }))
            .unwrap()
        };
        let ff = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
        let ff2 = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
        let chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36";
        let bound = dev("203.0.113.7", ff);
        let p = |ip, user_agent| BindingPolicy {
            ip,
            user_agent,
            ..Default::default()
        };
        let subnet = p(IpBinding::Subnet, UserAgentBinding::Family);
        assert_eq!(
            binding_mismatch(&subnet, &bound, &dev("203.0.113.200", ff2)),
            None
        );
        assert_eq!(
            binding_mismatch(&subnet, &bound, &dev("203.0.114.7", ff)),
            Some("ip")
        );
        assert_eq!(
            binding_mismatch(&subnet, &bound, &dev("203.0.113.7", chrome)),
            Some("user_agent")
        );
        let exact = p(IpBinding::Exact, UserAgentBinding::Exact);
        assert_eq!(
            binding_mismatch(&exact, &bound, &dev("203.0.113.8", ff)),
            Some("ip")
        );
        assert_eq!(
            binding_mismatch(&exact, &bound, &dev("203.0.113.7", ff2)),
            Some("user_agent")
        );
        // A request that names no client is not compared; off compares nothing.
        assert_eq!(
            binding_mismatch(&exact, &bound, &DeviceRecord::default()),
            None
        );
        let off = p(IpBinding::Off, UserAgentBinding::Off);
        assert_eq!(
            binding_mismatch(&off, &bound, &dev("192.0.2.1", chrome)),
            None
        );
        // IPv6 subnets are /64s.
        let v6 = dev("2001:db8:1:2::1", ff);
        assert_eq!(
            binding_mismatch(&subnet, &v6, &dev("2001:db8:1:2::ffff", ff)),
            None
        );
        assert_eq!(
            binding_mismatch(&subnet, &v6, &dev("2001:db8:1:3::1", ff)),
            Some("ip")
        );
    }

    #[test]
    fn parses_common_user_agents() {
        let ff = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
        let (b, o) = parse_user_agent(ff);
        assert_eq!(b.as_deref(), Some("Firefox"));
        assert_eq!(o.as_deref(), Some("Linux"));
        let safari = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1";
        let (b, o) = parse_user_agent(safari);
        assert_eq!(b.as_deref(), Some("Safari"));
        assert_eq!(o.as_deref(), Some("iPhone"));
        assert_eq!(parse_user_agent("curl-ish/1").0, None);
    }

    #[test]
    fn validates_ip_and_user_agent() {
        let ok = ClientInput {
            ip: Some("2001:db8::1".into()),
            user_agent: None,
        };
        assert!(device_from(Some(&ok)).unwrap().ip.is_some());
        let bad_ip = ClientInput {
            ip: Some("300.1.1.1".into()),
            user_agent: None,
        };
        assert!(device_from(Some(&bad_ip)).is_err());
        let long = ClientInput {
            ip: None,
            user_agent: Some("a".repeat(MAX_USER_AGENT + 1)),
        };
        assert!(device_from(Some(&long)).is_err());
        let ctl = ClientInput {
            ip: None,
            user_agent: Some("a\nb".into()),
        };
        assert!(device_from(Some(&ctl)).is_err());
    }
}
