//! L4 routing with APISIX's `ip_port` semantics: for connections that carry an SNI, routes with
//! that exact SNI, then `*.` wildcard SNIs (longest suffix first); then the routes without SNI in
//! configuration order. `server_addr`, `server_port` and `remote_addr` filter every candidate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::resources::StreamRouteSpec;
use crate::upstream::Upstream;

/// A stream route at runtime.
#[derive(Debug)]
pub struct StreamRoute {
    pub spec: StreamRouteSpec,
    pub upstream: Arc<Upstream>,
}

/// The stream route table.
#[derive(Debug, Default)]
pub struct StreamRouter {
    exact: HashMap<String, Vec<Arc<StreamRoute>>>,
    wildcard: HashMap<String, Vec<Arc<StreamRoute>>>,
    wildcard_lens: Vec<usize>,
    plain: Vec<Arc<StreamRoute>>,
}

impl StreamRouter {
    pub fn new(routes: Vec<Arc<StreamRoute>>) -> Self {
        let mut r = StreamRouter::default();
        for route in routes {
            match route.spec.sni.as_deref() {
                None => r.plain.push(route),
                Some(s) => match s.strip_prefix('*') {
                    Some(suffix) => r.wildcard.entry(suffix.to_string()).or_default().push(route),
                    None => r.exact.entry(s.to_string()).or_default().push(route),
                },
            }
        }
        let mut lens: Vec<usize> = r.wildcard.keys().map(String::len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        r.wildcard_lens = lens;
        r
    }

    /// Whether some route matches on SNI (plain listeners then peek at ClientHellos).
    pub fn has_sni_routes(&self) -> bool {
        !self.exact.is_empty() || !self.wildcard.is_empty()
    }

    /// Whether an SNI route could take this connection: only then is a ClientHello worth
    /// waiting for. A server-speaks-first protocol (MySQL, SMTP) on a listener that no SNI
    /// route covers is relayed at once.
    pub fn sni_applies(&self, client: SocketAddr, local: SocketAddr) -> bool {
        let ok = accepts(client, local);
        self.exact.values().chain(self.wildcard.values()).flatten().any(|r| ok(&r))
    }

    /// Whether a route without SNI would take this connection.
    pub fn plain_applies(&self, client: SocketAddr, local: SocketAddr) -> bool {
        self.plain.iter().any(|r| accepts(client, local)(&r))
    }

    /// The route for a connection.
    pub fn find(
        &self,
        sni: Option<&str>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<&Arc<StreamRoute>> {
        let ok = accepts(client, local);
        if let Some(sni) = sni {
            let lower;
            let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = sni.to_ascii_lowercase();
                &lower
            } else {
                sni
            };
            if let Some(r) = self.exact.get(sni).and_then(|l| l.iter().find(ok)) {
                return Some(r);
            }
            for &len in &self.wildcard_lens {
                if len >= sni.len() && len != 0 {
                    continue;
                }
                // `get`: a cut inside a multi-byte character is no suffix (and must not panic).
                let Some(suffix) = sni.get(sni.len() - len..) else { continue };
                if let Some(r) = self.wildcard.get(suffix).and_then(|l| l.iter().find(ok)) {
                    return Some(r);
                }
            }
        }
        self.plain.iter().find(ok)
    }
}

/// The `server_addr`, `server_port` and `remote_addr` filter of every route.
fn accepts(client: SocketAddr, local: SocketAddr) -> impl Fn(&&Arc<StreamRoute>) -> bool + Copy {
    move |r| {
        let s = &r.spec;
        s.server_port.is_none_or(|p| p == local.port())
            && s.server_addr.is_none_or(|n| n.contains(local.ip()))
            && s.remote_addr.is_none_or(|n| n.contains(client.ip()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::node::NodeConfig;
    use crate::config::resources::Resources;
    use crate::upstream::BuildContext;

    /// A router over `routes` (YAML list items), all sharing one upstream.
    fn router(routes: &str) -> StreamRouter {
        let node = NodeConfig::parse("c", "", |_| None).unwrap();
        let yaml = format!(
            "upstreams:\n  - {{id: u, nodes: {{\"127.0.0.1:1\": 1}}}}\nstream_routes:\n{routes}#END\n"
        );
        let res = Resources::parse("r", &yaml, &node, |_| None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ctx = BuildContext {
            background: rt.handle().clone(),
            roots: strait_protocols::tls::root_store(None).unwrap(),
        };
        let up = Upstream::new(res.upstreams[0].clone(), None, &ctx).unwrap();
        StreamRouter::new(
            res.stream_routes
                .into_iter()
                .map(|spec| Arc::new(StreamRoute { spec, upstream: up.clone() }))
                .collect(),
        )
    }

    fn id(r: &StreamRouter, sni: Option<&str>, client: &str, local: &str) -> Option<String> {
        r.find(sni, client.parse().unwrap(), local.parse().unwrap()).map(|r| r.spec.id.clone())
    }

    const C: &str = "10.0.0.1:5000";
    const L: &str = "127.0.0.1:9100";

    #[test]
    fn exact_sni_then_longest_wildcard_then_plain() {
        let r = router(
            "  - {id: plain, upstream_id: u}\n  - {id: wide, sni: \"*.test\", upstream_id: u}\n  - {id: narrow, sni: \"*.a.test\", upstream_id: u}\n  - {id: exact, sni: x.a.test, upstream_id: u}\n",
        );
        assert_eq!(id(&r, Some("x.a.test"), C, L).as_deref(), Some("exact"));
        assert_eq!(id(&r, Some("X.A.Test"), C, L).as_deref(), Some("exact"), "SNI is case-insensitive");
        assert_eq!(id(&r, Some("y.a.test"), C, L).as_deref(), Some("narrow"));
        assert_eq!(id(&r, Some("b.test"), C, L).as_deref(), Some("wide"));
        assert_eq!(id(&r, Some("test"), C, L).as_deref(), Some("plain"), "a wildcard needs a label");
        assert_eq!(id(&r, Some("other.example"), C, L).as_deref(), Some("plain"));
        assert_eq!(id(&r, None, C, L).as_deref(), Some("plain"));
        // A suffix that would start inside a multi-byte character matches nothing, and does not
        // panic (the L4 peek passes only ASCII names, this holds whatever it passes).
        assert_eq!(id(&r, Some("\u{e9}a.test"), C, L).as_deref(), Some("wide"));
        assert_eq!(id(&r, Some("\u{e9}test"), C, L).as_deref(), Some("plain"));
    }

    #[test]
    fn filters_apply_to_sni_routes_and_decide_whether_to_wait_for_a_hello() {
        let r = router(
            "  - {id: tls, sni: db.test, server_port: 9443, upstream_id: u}\n  - {id: lan, remote_addr: 10.0.0.0/8, server_addr: 127.0.0.1, upstream_id: u}\n",
        );
        assert_eq!(id(&r, Some("db.test"), C, "127.0.0.1:9443").as_deref(), Some("tls"));
        // The SNI route's port filter excludes 9100: the plain route takes the connection.
        assert_eq!(id(&r, Some("db.test"), C, L).as_deref(), Some("lan"));
        assert_eq!(id(&r, None, "192.168.1.1:5000", L), None, "remote_addr filters plain routes");
        assert_eq!(id(&r, None, C, "127.0.0.2:9100"), None, "server_addr filters plain routes");

        assert!(r.sni_applies(C.parse().unwrap(), "127.0.0.1:9443".parse().unwrap()));
        assert!(!r.sni_applies(C.parse().unwrap(), L.parse().unwrap()), "no SNI route on 9100");
        assert!(r.plain_applies(C.parse().unwrap(), L.parse().unwrap()));
        assert!(!r.plain_applies("192.168.1.1:5000".parse().unwrap(), L.parse().unwrap()));
    }
}
