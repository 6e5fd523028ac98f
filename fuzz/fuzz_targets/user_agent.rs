//! The device view: `device::parse_user_agent` on any text and `device::device_from` on any
//! client (IP text, IP addresses, user agents).

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sessiond_api::ClientInput;
use sessiond_core::device::{MAX_USER_AGENT, device_from, parse_user_agent};

#[derive(Debug, Arbitrary)]
enum Ip<'a> {
    Absent,
    Text(&'a str),
    V4([u8; 4]),
    V6([u8; 16]),
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    user_agent: Option<&'a str>,
    ip: Ip<'a>,
}

fn check_parsed(ua: &str) {
    let (browser, os) = parse_user_agent(ua);
    for family in [browser, os].into_iter().flatten() {
        assert!(!family.is_empty());
        assert_ne!(&*family, "UNKNOWN");
    }
}

fuzz_target!(|input: Input<'_>| {
    if let Some(ua) = input.user_agent {
        check_parsed(ua);
    }

    let (ip_text, ip_addr) = match input.ip {
        Ip::Absent => (None, None),
        Ip::Text(s) => (Some(s.to_owned()), s.parse::<IpAddr>().ok()),
        Ip::V4(b) => {
            let a = IpAddr::V4(Ipv4Addr::from(b));
            (Some(a.to_string()), Some(a))
        }
        Ip::V6(b) => {
            let a = IpAddr::V6(Ipv6Addr::from(b));
            (Some(a.to_string()), Some(a))
        }
    };
    let client = ClientInput {
        ip: ip_text.clone(),
        user_agent: input.user_agent.map(str::to_owned),
    };

    let ip_ok = ip_text.is_none() || ip_addr.is_some();
    let ua = input.user_agent.filter(|s| !s.is_empty());
    let ua_ok = ua.is_none_or(|s| s.len() <= MAX_USER_AGENT && !s.chars().any(char::is_control));

    match device_from(Some(&client)) {
        Ok(d) => {
            assert!(ip_ok && ua_ok, "accepted {client:?}");
            assert_eq!(d.ip, ip_addr);
            assert_eq!(d.user_agent.as_deref(), ua);
            let (browser, os) = ua.map(parse_user_agent).unwrap_or_default();
            assert_eq!(d.browser, browser);
            assert_eq!(d.os, os);
            // What the session object shows parses back to the same address.
            if let Some(ip) = d.ip {
                assert_eq!(ip.to_string().parse::<IpAddr>().ok(), Some(ip));
            }
        }
        Err(e) => assert!(!(ip_ok && ua_ok), "refused {client:?}: {e}"),
    }
    assert_eq!(device_from(None).expect("no client").ip, None);
});
