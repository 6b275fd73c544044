//! IP addresses and CIDR blocks for `remote_addr(s)` and `server_addr` matching, and the
//! client address nginx's realip module takes from a trusted proxy's header ([`RealIp`]).

use std::net::{IpAddr, SocketAddr};

/// An IP network (`10.0.0.0/8`, `::1/128`) or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `ip` or `ip/prefix`.
    pub fn parse(s: &str) -> Option<IpNet> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                let p: u8 = p.parse().ok()?;
                if p > max {
                    return None;
                }
                p
            }
            None => max,
        };
        Some(IpNet { addr, prefix })
    }

    /// Whether `ip` is inside this network. IPv4-mapped IPv6 client addresses match IPv4 nets.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                (u32::from(net) & mask) == (u32::from(a) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                (u128::from(net) & mask) == (u128::from(a) & mask)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching_v4_v6_and_mapped() {
        let n = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = IpNet::parse("fe80::/10").unwrap();
        assert!(v6.contains("fe80::1".parse().unwrap()));
        assert!(!v6.contains("::1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("1.2.3.4/33").is_none());
        assert!(IpNet::parse("nope").is_none());
    }
}

/// nginx's realip module as APISIX configures it (`nginx_config.http.real_ip_header`,
/// `real_ip_recursive`, `real_ip_from`; APISIX's defaults: `X-Real-IP`, off, `127.0.0.1` and
/// `unix:`): a request from an address in `from` is taken to come from the address its header
/// names. That address is the request's `remote_addr` (routes' `remote_addrs`, `vars`, chash)
/// and what the node gets as `X-Real-IP` and at the end of `X-Forwarded-For`.
#[derive(Debug, Clone)]
pub struct RealIp {
    /// `None`: `proxy_protocol`, the address of the PROXY header of a port that takes one
    /// ([`RealIp::proxy_protocol_client`]).
    pub header: Option<http::HeaderName>,
    pub recursive: bool,
    pub from: Vec<IpNet>,
}

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

impl RealIp {
    /// Whether a connection from `peer` may name its client (so the header is looked at).
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.from.iter().any(|n| n.contains(peer))
    }

    /// The client address the header of a request from a trusted peer names, as nginx's
    /// `ngx_http_get_forwarded_addr` finds it: the last address of the list (`X-Forwarded-For`'s
    /// lines taken as one list, another header's first line); with `recursive`, the last one
    /// that is not itself in `from`, or the first of the list when all are. `None` (the
    /// connection's address stays) when the header is missing or its last entry is not an
    /// address. A port with the address is ignored.
    pub fn client(&self, headers: &http::HeaderMap) -> Option<IpAddr> {
        let header = self.header.as_ref()?;
        let lines = headers.get_all(header);
        if *header == X_FORWARDED_FOR {
            self.scan(lines.iter().rev())
        } else {
            self.scan(lines.iter().next().into_iter())
        }
    }

    /// The client of a connection from `peer` whose PROXY header named `source`: `source` when
    /// `real_ip_header` is `proxy_protocol` and `peer` is trusted, else `peer` (nginx keeps the
    /// header's address apart, in `$proxy_protocol_addr`, otherwise).
    pub fn proxy_protocol_client(
        real: Option<&RealIp>,
        peer: SocketAddr,
        source: Option<SocketAddr>,
    ) -> SocketAddr {
        match (real, source) {
            (Some(r), Some(s)) if r.header.is_none() && r.trusts(peer.ip()) => s,
            _ => peer,
        }
    }

    /// [`RealIp::client`] over `lines`, the last first.
    fn scan<'h>(&self, lines: impl Iterator<Item = &'h http::HeaderValue>) -> Option<IpAddr> {
        let mut found: Option<IpAddr> = None;
        for line in lines {
            let mut items =
                line.as_bytes().rsplit(|&b| b == b',' || b == b' ').filter(|i| !i.is_empty()).peekable();
            // A line without an address ends the search, as nginx's parse of it fails.
            if items.peek().is_none() {
                return found;
            }
            for item in items {
                let Some(ip) = parse_addr(item) else { return found };
                found = Some(ip);
                if !self.recursive || !self.trusts(ip) {
                    return found;
                }
            }
        }
        found
    }
}

/// An address as nginx's `ngx_parse_addr_port` takes one: `1.2.3.4`, `1.2.3.4:80`, `::1`,
/// `[::1]` or `[::1]:80`.
fn parse_addr(item: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(item).ok()?;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

#[cfg(test)]
mod real_ip_tests {
    use super::*;

    fn real(header: &'static str, recursive: bool, from: &[&str]) -> RealIp {
        RealIp {
            header: Some(http::HeaderName::from_static(header)),
            recursive,
            from: from.iter().map(|f| IpNet::parse(f).unwrap()).collect(),
        }
    }

    fn headers(name: &'static str, lines: &[&'static str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for l in lines {
            h.append(name, http::HeaderValue::from_static(l));
        }
        h
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_proxy_header_names_the_client_only_for_proxy_protocol_from_a_trusted_peer() {
        let lb: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let source: SocketAddr = "203.0.113.7:5555".parse().unwrap();
        let mut pp = real("x-real-ip", false, &["10.0.0.0/8"]);
        pp.header = None;
        assert_eq!(RealIp::proxy_protocol_client(Some(&pp), lb, Some(source)), source);
        // No address in the header (LOCAL, UNKNOWN), an untrusted peer, another header, or no
        // realip at all: the peer.
        assert_eq!(RealIp::proxy_protocol_client(Some(&pp), lb, None), lb);
        let outside: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        assert_eq!(RealIp::proxy_protocol_client(Some(&pp), outside, Some(source)), outside);
        let by_header = real("x-real-ip", false, &["10.0.0.0/8"]);
        assert_eq!(RealIp::proxy_protocol_client(Some(&by_header), lb, Some(source)), lb);
        assert_eq!(RealIp::proxy_protocol_client(None, lb, Some(source)), lb);
        // And such a realip names nobody by a header.
        assert_eq!(pp.client(&headers("x-real-ip", &["198.51.100.1"])), None);
    }

    #[test]
    fn nginx_realip_rules() {
        let r = real("x-real-ip", false, &["127.0.0.1"]);
        assert!(r.trusts("127.0.0.1".parse().unwrap()) && !r.trusts("10.0.0.1".parse().unwrap()));
        assert_eq!(r.client(&headers("x-real-ip", &["203.0.113.7"])), ip("203.0.113.7"));
        assert_eq!(r.client(&headers("x-real-ip", &["203.0.113.7:4711"])), ip("203.0.113.7"));
        assert_eq!(r.client(&headers("x-real-ip", &["[2001:db8::1]:80"])), ip("2001:db8::1"));
        assert_eq!(r.client(&headers("x-real-ip", &["2001:db8::1"])), ip("2001:db8::1"));
        // Not an address, or no header: the connection's address stays.
        assert_eq!(r.client(&headers("x-real-ip", &["unknown"])), None);
        assert_eq!(r.client(&http::HeaderMap::new()), None);
        // Another header than X-Forwarded-For: its first line, last entry.
        assert_eq!(r.client(&headers("x-real-ip", &["1.1.1.1, 2.2.2.2", "3.3.3.3"])), ip("2.2.2.2"));

        let xff = real("x-forwarded-for", false, &["10.0.0.0/8"]);
        // Lines are one list; the last entry wins without recursion.
        assert_eq!(
            xff.client(&headers("x-forwarded-for", &["1.1.1.1, 10.0.0.2", "10.0.0.3"])),
            ip("10.0.0.3")
        );
        let rec = real("x-forwarded-for", true, &["10.0.0.0/8"]);
        assert_eq!(
            rec.client(&headers("x-forwarded-for", &["1.1.1.1, 10.0.0.2", "10.0.0.3"])),
            ip("1.1.1.1")
        );
        // Every entry trusted: the first of the list.
        assert_eq!(rec.client(&headers("x-forwarded-for", &["10.1.1.1,10.0.0.2"])), ip("10.1.1.1"));
        // A bad entry behind trusted ones: the last trusted one found.
        assert_eq!(rec.client(&headers("x-forwarded-for", &["junk, 10.0.0.2"])), ip("10.0.0.2"));
        assert_eq!(rec.client(&headers("x-forwarded-for", &["1.1.1.1, junk"])), None);
        // An empty last line: nothing (nginx looks at no earlier line for it).
        assert_eq!(xff.client(&headers("x-forwarded-for", &["1.1.1.1", " , "])), None);
        assert_eq!(rec.client(&headers("x-forwarded-for", &["1.1.1.1", ""])), None);
        assert_eq!(rec.client(&headers("x-forwarded-for", &["1.1.1.1", "10.0.0.2", ","])), None);
        assert_eq!(rec.client(&headers("x-forwarded-for", &["", "10.0.0.2"])), ip("10.0.0.2"));
    }
}
