//! Where webhooks may be delivered.
//!
//! A webhook URL is chosen by whoever holds an API key, and the server POSTs to it from inside
//! the operator's network, so it must not become a way to reach internal services. Every
//! address a delivery could go to is classified ([`refused_range`]): loopback, private
//! (RFC 1918), shared (CGNAT), link-local, unique-local, unspecified, multicast, broadcast,
//! documentation, benchmarking and other special-purpose ranges are refused, and so are IPv6
//! forms that embed one of those IPv4 addresses (IPv4-mapped, IPv4-compatible, NAT64, 6to4).
//!
//! The check runs twice:
//! - when an endpoint is made (`PUT /v1/webhooks/{name}`, and the configuration's endpoints at
//!   start): a literal address is classified, a name is resolved and refused if any of its
//!   addresses is;
//! - at every connection, by the HTTP client's resolver ([`GuardedResolver`]), which hands the
//!   client only permitted addresses: a name whose DNS answer changed since the endpoint was
//!   made (rebinding) cannot reach an internal address.
//!
//! Exceptions are explicit: `webhooks.allowed_hosts` lists host names (exact) and addresses or
//! networks (CIDR) of deliberate internal receivers. `http://` stays limited to a literal
//! loopback address or `localhost`, checked by the endpoint's URL validation.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;

/// The range an address belongs to when deliveries to it are refused; `None` for a public
/// address.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn embedded_v4(bits: u128, shift: u32) -> Ipv4Addr {
    // Truncation is the point: the 32 bits at `shift`.
    Ipv4Addr::from(((bits >> shift) & 0xffff_ffff) as u32)
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let bits = u128::from(ip);
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4(v4).map(|_| "IPv4-mapped form of a refused address");
    }
    if bits >> 32 == 0 {
        // ::, ::1 and the deprecated IPv4-compatible ::a.b.c.d.
        return Some("unspecified, loopback or IPv4-compatible (::/96)");
    }
    if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        // NAT64 well-known prefix: the IPv4 address it reaches decides.
        return refused_v4(embedded_v4(bits, 0)).map(|_| "NAT64 form of a refused address");
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001 {
        return Some("local-use NAT64 (64:ff9b:1::/48)");
    }
    if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
        return Some("discard-only (100::/64)");
    }
    if s[0] == 0x2001 && s[1] < 0x0200 {
        return Some("IETF protocol assignments, Teredo, benchmarking (2001::/23)");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("documentation (2001:db8::/32)");
    }
    if s[0] & 0xfff0 == 0x3ff0 {
        return Some("documentation (3fff::/20)");
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address in bits 16..48 decides.
        return refused_v4(embedded_v4(bits, 80)).map(|_| "6to4 form of a refused address");
    }
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        x if x & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        x if x & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        x if x & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        _ => return None,
    })
}

/// The exceptions of `webhooks.allowed_hosts`: exact host names, and addresses or networks.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: BTreeSet<String>,
    nets: Vec<IpNet>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl AllowedHosts {
    /// Parses the entries: an address (`10.0.0.5`, `fd00::5`), a network (`10.1.0.0/16`), or
    /// a host name matched exactly (`hooks.internal`).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut out = Self::default();
        for e in entries {
            let e = e.trim();
            if let Ok(net) = e.parse::<IpNet>() {
                out.nets.push(net.trunc());
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                out.nets.push(IpNet::from(ip));
            } else if !e.is_empty()
                && e.len() <= 253
                && !e.contains('/')
                && e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                out.names.insert(normalize(e));
            } else {
                return Err(format!(
                    "webhooks.allowed_hosts: '{}' is neither a host name, an address nor a \
                     network (CIDR)",
                    e.escape_debug()
                ));
            }
        }
        Ok(out)
    }

    fn allows_name(&self, name: &str) -> bool {
        self.names.contains(&normalize(name))
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether a delivery may connect to `ip` for host `name`.
    pub fn permits(&self, name: Option<&str>, ip: IpAddr) -> bool {
        name.is_some_and(|n| self.allows_name(n))
            || self.allows_ip(ip)
            || refused_range(ip).is_none()
    }
}

/// Looks a host name up: its addresses.
pub type LookupFn = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver.
pub fn system_lookup() -> LookupFn {
    Arc::new(|name: String| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    })
}

const LOCALHOST: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

/// The destination rules: the exceptions and how names are looked up.
#[derive(Clone)]
pub struct Destinations {
    allowed: Arc<AllowedHosts>,
    lookup: LookupFn,
}

impl std::fmt::Debug for Destinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destinations")
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

/// The URL's host: a literal address (as the URL parser normalized it) or a name.
fn host_of(u: &reqwest::Url) -> Option<Host> {
    let h = u.host_str()?;
    let bare = h.trim_start_matches('[').trim_end_matches(']');
    Some(match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(h.to_owned()),
    })
}

/// Why a URL is refused; kept for the server log (the API answers one fixed text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl Destinations {
    /// Rules with these exceptions, looking names up with `lookup`.
    pub fn new(allowed: AllowedHosts, lookup: LookupFn) -> Self {
        Self {
            allowed: Arc::new(allowed),
            lookup,
        }
    }

    /// The checks that need no lookup: a literal address, and `localhost` over https. The
    /// URL's syntax and scheme rules are the endpoint validation's.
    pub fn check_literal(&self, url: &str) -> Result<(), Refused> {
        let u = reqwest::Url::parse(url).map_err(|_| Refused("not a URL".into()))?;
        if u.scheme() == "http" {
            // http:// is limited to loopback by the endpoint validation.
            return Ok(());
        }
        match host_of(&u) {
            Some(Host::Ip(ip)) => self.check_ip(None, ip),
            Some(Host::Name(d)) if normalize(&d) == "localhost" => {
                if self.allowed.allows_name(&d) {
                    Ok(())
                } else {
                    Err(Refused("localhost is loopback".into()))
                }
            }
            Some(Host::Name(_)) => Ok(()),
            None => Err(Refused("no host".into())),
        }
    }

    fn check_ip(&self, name: Option<&str>, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed.permits(name, ip) {
            Ok(())
        } else {
            Err(Refused(format!(
                "{ip} is {}",
                refused_range(ip).unwrap_or("refused")
            )))
        }
    }

    /// Every check of a URL, resolving a host name: refused if any address it resolves to is.
    /// A name that does not resolve now is accepted: the connection-time check still applies.
    pub async fn check(&self, url: &str) -> Result<(), Refused> {
        self.check_literal(url)?;
        let u = reqwest::Url::parse(url).map_err(|_| Refused("not a URL".into()))?;
        if u.scheme() == "http" {
            return Ok(());
        }
        let Some(Host::Name(name)) = host_of(&u) else {
            return Ok(());
        };
        if self.allowed.allows_name(&name) {
            return Ok(());
        }
        let Ok(addrs) = (self.lookup)(name.to_owned()).await else {
            return Ok(());
        };
        for ip in addrs {
            self.check_ip(Some(&name), ip)?;
        }
        Ok(())
    }

    /// The resolver of the delivery client.
    pub fn resolver(&self) -> GuardedResolver {
        GuardedResolver(self.clone())
    }
}

/// The delivery client's resolver: it answers only the permitted addresses of a name (none:
/// an error), so what the client connects to is what was checked.
#[derive(Debug, Clone)]
pub struct GuardedResolver(Destinations);

impl GuardedResolver {
    /// The permitted addresses of `name`.
    pub async fn permitted(&self, name: &str) -> Result<Vec<IpAddr>, Refused> {
        let d = &self.0;
        // `localhost` is loopback by definition (an http:// endpoint), never looked up.
        let addrs = if normalize(name) == "localhost" {
            return Ok(LOCALHOST.to_vec());
        } else {
            (d.lookup)(name.to_owned())
                .await
                .map_err(|e| Refused(format!("lookup failed: {e}")))?
        };
        let kept: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|ip| d.allowed.permits(Some(name), *ip))
            .collect();
        if kept.is_empty() {
            return Err(Refused(format!(
                "{} address(es) found, none permitted",
                addrs.len()
            )));
        }
        Ok(kept)
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            match this.permitted(&name).await {
                Ok(ips) => {
                    let addrs: reqwest::dns::Addrs =
                        Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
                    Ok(addrs)
                }
                Err(Refused(why)) => {
                    tracing::warn!(
                        target: "sessiond::webhooks",
                        host = %name,
                        reason = %why,
                        "webhook destination refused at connection"
                    );
                    Err(why.into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn every_internal_range_is_refused_and_public_addresses_are_not() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "[::ffff:169.254.169.254]",
            "[::ffff:a9fe:a9fe]",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::a9fe:a9fe",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.1.2.3",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::1",
            "fc00::1",
            "fd00::1",
            "fdff:ffff::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
        ] {
            assert!(refused_range(ip(a)).is_some(), "{a} must be refused");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.0.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(refused_range(ip(a)), None, "{a} is public");
        }
    }

    fn lookup_to(addrs: Vec<IpAddr>) -> LookupFn {
        Arc::new(move |_| {
            let a = addrs.clone();
            Box::pin(async move { Ok(a) })
        })
    }

    fn dest(allowed: &[&str], addrs: &[&str]) -> Destinations {
        let allowed: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        Destinations::new(
            AllowedHosts::parse(&allowed).unwrap(),
            lookup_to(addrs.iter().map(|a| ip(a)).collect()),
        )
    }

    #[tokio::test]
    async fn urls_are_checked_by_literal_and_by_resolved_address() {
        let public = dest(&[], &["93.184.216.34"]);
        public.check("https://hooks.example/x").await.unwrap();
        for u in [
            "https://169.254.169.254/latest",
            "https://[::ffff:169.254.169.254]/",
            "https://[::ffff:a9fe:a9fe]/",
            "https://10.0.0.1/",
            "https://100.64.0.1/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://0.0.0.0/",
            "https://127.0.0.1:5432/",
            "https://localhost/",
            "https://localhost./",
        ] {
            assert!(public.check(u).await.is_err(), "{u}");
        }
        // http:// to loopback is the URL validation's business and stays allowed.
        public.check("http://127.0.0.1:9/x").await.unwrap();
        // A name is refused if any of its addresses is.
        let mixed = dest(&[], &["93.184.216.34", "10.0.0.7"]);
        assert!(mixed.check("https://hooks.example/").await.is_err());
        let internal = dest(&[], &["192.168.0.10"]);
        assert!(internal.check("https://hooks.internal/").await.is_err());
        // Exceptions: by exact name, by network, by address.
        let by_name = dest(&["Hooks.Internal"], &["192.168.0.10"]);
        by_name.check("https://hooks.internal/").await.unwrap();
        assert!(by_name.check("https://other.internal/").await.is_err());
        let by_net = dest(&["192.168.0.0/24", "fd00::5"], &["192.168.0.10"]);
        by_net.check("https://hooks.internal/").await.unwrap();
        by_net.check("https://192.168.0.99/").await.unwrap();
        by_net.check("https://[fd00::5]/").await.unwrap();
        by_net.check("https://[::ffff:192.168.0.1]/").await.unwrap();
        assert!(by_net.check("https://[fd00::6]/").await.is_err());
        assert!(by_net.check("https://192.168.1.1/").await.is_err());
        dest(&["localhost"], &[])
            .check("https://localhost/")
            .await
            .unwrap();
        assert!(AllowedHosts::parse(&["a b".into()]).is_err());
        assert!(AllowedHosts::parse(&["10.0.0.0/33".into()]).is_err());
    }

    #[tokio::test]
    async fn the_resolver_pins_permitted_addresses_whatever_dns_answers_later() {
        // At PUT time the name resolves to a public address...
        let answer = Arc::new(parking_lot::Mutex::new(vec![ip("93.184.216.34")]));
        let a = answer.clone();
        let lookup: LookupFn = Arc::new(move |_| {
            let v = a.lock().clone();
            Box::pin(async move { Ok(v) })
        });
        let d = Destinations::new(AllowedHosts::default(), lookup);
        d.check("https://rebind.example/").await.unwrap();
        // ...and at delivery to the metadata service and loopback: nothing is handed out.
        *answer.lock() = vec![ip("169.254.169.254"), ip("::1")];
        assert!(d.resolver().permitted("rebind.example").await.is_err());
        // A mixed answer keeps only the public address.
        *answer.lock() = vec![ip("10.0.0.1"), ip("93.184.216.34")];
        assert_eq!(
            d.resolver().permitted("rebind.example").await.unwrap(),
            vec![ip("93.184.216.34")]
        );
        // localhost is never looked up.
        assert_eq!(
            d.resolver().permitted("localhost").await.unwrap(),
            LOCALHOST.to_vec()
        );
    }

    #[tokio::test]
    async fn the_delivery_client_never_connects_to_a_refused_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acc = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let client = |allowed: &[&str]| {
            reqwest::Client::builder()
                .no_proxy()
                .dns_resolver(Arc::new(dest(allowed, &["127.0.0.1"]).resolver()))
                .build()
                .unwrap()
        };
        let url = format!("http://rebind.example:{port}/");
        assert!(client(&[]).post(&url).send().await.is_err());
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        let ok = client(&["rebind.example"]).post(&url).send().await.unwrap();
        assert_eq!(ok.status().as_u16(), 204);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
