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
                if let Some(r) = self.wildcard.get(&sni[sni.len() - len..]).and_then(|l| l.iter().find(ok)) {
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
