//! HTTP routing with APISIX's `radixtree_host_uri` semantics, in time independent of the number
//! of routes.
//!
//! Order: routes bound to a host (exact host, then `*.` wildcards from the longest suffix) before
//! host-less routes; within those, the exact path before prefixes (`/a/*`), longer prefixes
//! first; on the same path, higher `priority` first, then configuration order. The first
//! candidate whose methods, `remote_addrs` and `vars` all match wins.
//!
//! Lookups are hash-map probes: one per distinct prefix length present in the table (not per
//! route), so matching cost stays flat from ten to ten thousand routes.

pub mod expr;
pub mod ip;
pub mod stream;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
pub use strait_protocols::http::uri_path;

use http::request::Parts;
use http::{Method, header};
use strait_protocols::fxhash::FxHashMap;

use crate::config::resources::RouteSpec;
use crate::upstream::Upstream;
use expr::{Var, VarSource};

/// A route at runtime.
#[derive(Debug)]
pub struct Route {
    pub spec: RouteSpec,
    pub upstream: Option<Arc<Upstream>>,
    pub transcode: Option<Arc<crate::transcode::Transcoder>>,
}

/// The request facts routing and hashing read.
pub struct RequestView<'a> {
    pub parts: &'a Parts,
    /// Lower-case host without port.
    pub host: Cow<'a, str>,
    /// The path as nginx's `$uri` has it, which routes and the `uri` variable match (see
    /// [`uri_path`]); `None` for a path that climbs above the root (a 400).
    pub uri: Option<Cow<'a, str>>,
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

impl<'a> RequestView<'a> {
    pub fn new(parts: &'a Parts, client: SocketAddr, local: SocketAddr, tls: bool) -> Self {
        let raw = parts
            .uri
            .authority()
            .map(|a| a.host())
            .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        RequestView { parts, host: host_name(raw), uri: uri_path(parts.uri.path()), client, local, tls }
    }

    fn query(&self) -> Option<&'a str> {
        self.parts.uri.query()
    }
}

/// The host name routes match (and the client certificate rules check), as nginx's `$host`
/// is made from a `Host` header: lower-case, without the port and one trailing dot.
pub(crate) fn host_name(raw: &str) -> Cow<'_, str> {
    let host = strip_port(raw);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Without the port (whatever follows the first `:` outside brackets) and without one trailing
/// dot, so `api.example.com.` and `api.example.com:443` are `api.example.com`.
fn strip_port(h: &str) -> &str {
    let h = match h.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => h.split(':').next().unwrap_or(h),
    };
    h.strip_suffix('.').unwrap_or(h)
}

/// Percent-decodes a query component (`+` is a space).
fn decode_component(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The first value of query argument `name`.
pub fn query_arg<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_component(k) == name {
            return Some(decode_component(v));
        }
    }
    None
}

/// The value of cookie `name`.
pub fn cookie<'h>(parts: &'h Parts, name: &str) -> Option<&'h str> {
    for h in parts.headers.get_all(header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for c in s.split(';') {
            if let Some((k, v)) = c.trim().split_once('=')
                && k == name
            {
                return Some(v);
            }
        }
    }
    None
}

impl VarSource for RequestView<'_> {
    fn var(&self, v: &Var) -> Option<Cow<'_, str>> {
        Some(match v {
            Var::Uri => Cow::Borrowed(self.uri.as_deref().unwrap_or("/")),
            Var::RequestUri => Cow::Borrowed(self.parts.uri.path_and_query().map_or("/", |p| p.as_str())),
            Var::QueryString => Cow::Borrowed(self.query().unwrap_or("")),
            Var::Host => Cow::Borrowed(&*self.host),
            Var::RemoteAddr => Cow::Owned(self.client.ip().to_string()),
            Var::RemotePort => Cow::Owned(self.client.port().to_string()),
            Var::ServerAddr => Cow::Owned(self.local.ip().to_string()),
            Var::ServerPort => Cow::Owned(self.local.port().to_string()),
            Var::RequestMethod => Cow::Borrowed(self.parts.method.as_str()),
            Var::Scheme => Cow::Borrowed(if self.tls { "https" } else { "http" }),
            Var::Arg(name) => return query_arg(self.query()?, name),
            Var::Http(name) => {
                let mut values = self.parts.headers.get_all(name.as_str()).iter();
                let first = values.next()?.to_str().ok()?;
                match values.next() {
                    None => Cow::Borrowed(first),
                    // Several headers of one name read as one comma-joined value, as in nginx.
                    Some(second) => {
                        let mut s = format!("{first}, {}", second.to_str().ok()?);
                        for v in values {
                            s.push_str(", ");
                            s.push_str(v.to_str().ok()?);
                        }
                        Cow::Owned(s)
                    }
                }
            }
            Var::Cookie(name) => Cow::Borrowed(cookie(self.parts, name)?),
        })
    }
}

/// Routes by path: exact paths and prefixes.
#[derive(Default, Debug)]
struct UriIndex {
    exact: FxHashMap<String, Vec<Arc<Route>>>,
    prefix: FxHashMap<String, Vec<Arc<Route>>>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Vec<usize>,
}

impl UriIndex {
    fn insert(&mut self, uri: &str, route: Arc<Route>) {
        match uri.strip_suffix('*') {
            Some(p) => self.prefix.entry(p.to_string()).or_default().push(route),
            None => self.exact.entry(uri.to_string()).or_default().push(route),
        }
    }

    fn finish(&mut self) {
        let sort = |list: &mut Vec<Arc<Route>>| list.sort_by_key(|r| std::cmp::Reverse(r.spec.priority));
        self.exact.values_mut().for_each(sort);
        self.prefix.values_mut().for_each(sort);
        let mut lens: Vec<usize> = self.prefix.keys().map(String::len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        self.prefix_lens = lens;
    }

    fn find(&self, path: &str, req: &RequestView<'_>) -> Option<&Arc<Route>> {
        if let Some(list) = self.exact.get(path)
            && let Some(r) = list.iter().find(|r| filters_match(r, req))
        {
            return Some(r);
        }
        for &len in &self.prefix_lens {
            if len > path.len() || !path.is_char_boundary(len) {
                continue;
            }
            if let Some(list) = self.prefix.get(&path[..len])
                && let Some(r) = list.iter().find(|r| filters_match(r, req))
            {
                return Some(r);
            }
        }
        None
    }
}

fn filters_match(r: &Route, req: &RequestView<'_>) -> bool {
    let s = &r.spec;
    if !s.methods.is_empty() && !s.methods.contains(&req.parts.method) {
        return false;
    }
    if !s.remote_addrs.is_empty() && !s.remote_addrs.iter().any(|n| n.contains(req.client.ip())) {
        return false;
    }
    if let Some(e) = &s.vars
        && !e.eval(req)
    {
        return false;
    }
    true
}

/// The route table.
#[derive(Default, Debug)]
pub struct Router {
    exact_hosts: FxHashMap<String, UriIndex>,
    /// Keyed by the suffix after `*` (`.example.com`); `""` for `*`.
    wildcard_hosts: FxHashMap<String, UriIndex>,
    /// Distinct wildcard suffix lengths, longest first.
    wildcard_lens: Vec<usize>,
    any_host: UriIndex,
    pub len: usize,
}

impl Router {
    /// Builds the table from routes in configuration order.
    pub fn new(routes: Vec<Arc<Route>>) -> Router {
        let mut r = Router { len: routes.len(), ..Router::default() };
        for route in routes {
            for uri in &route.spec.uris {
                if route.spec.hosts.is_empty() {
                    r.any_host.insert(uri, route.clone());
                }
                for h in &route.spec.hosts {
                    match h.strip_prefix('*') {
                        Some(suffix) => {
                            r.wildcard_hosts.entry(suffix.to_string()).or_default().insert(uri, route.clone())
                        }
                        None => r.exact_hosts.entry(h.clone()).or_default().insert(uri, route.clone()),
                    }
                }
            }
        }
        r.exact_hosts.values_mut().for_each(UriIndex::finish);
        r.wildcard_hosts.values_mut().for_each(UriIndex::finish);
        r.any_host.finish();
        let mut lens: Vec<usize> = r.wildcard_hosts.keys().map(String::len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        r.wildcard_lens = lens;
        r
    }

    /// The route for a request, if any.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Arc<Route>> {
        let path = req.uri.as_deref()?;
        let host = &*req.host;
        if !host.is_empty() {
            if let Some(idx) = self.exact_hosts.get(host)
                && let Some(r) = idx.find(path, req)
            {
                return Some(r);
            }
            for &len in &self.wildcard_lens {
                // `*.example.com` needs at least one label before the suffix; `*` matches all.
                if len >= host.len() && len != 0 {
                    continue;
                }
                // `get`: a cut inside a multi-byte character is no suffix (and must not panic).
                let Some(suffix) = host.get(host.len() - len..) else { continue };
                if let Some(idx) = self.wildcard_hosts.get(suffix)
                    && let Some(r) = idx.find(path, req)
                {
                    return Some(r);
                }
            }
        } else if let Some(idx) = self.wildcard_hosts.get("")
            && let Some(r) = idx.find(path, req)
        {
            return Some(r);
        }
        self.any_host.find(path, req)
    }
}

/// Whether `m` is one of the routes' method names (for tests).
pub fn method(s: &str) -> Method {
    Method::from_bytes(s.as_bytes()).unwrap_or(Method::GET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::node::NodeConfig;
    use crate::config::resources::Resources;

    fn router(yaml: &str) -> Router {
        let node = NodeConfig::parse("c", "", |_| None).unwrap();
        let res = Resources::parse("r", &format!("{yaml}\n#END\n"), &node, |_| None).unwrap();
        Router::new(
            res.routes
                .into_iter()
                .map(|spec| Arc::new(Route { spec, upstream: None, transcode: None }))
                .collect(),
        )
    }

    fn find(r: &Router, method: &str, uri: &str, host: &str, client: &str) -> Option<String> {
        let req = http::Request::builder().method(method).uri(uri).header("host", host).body(()).unwrap();
        let (parts, ()) = req.into_parts();
        let view =
            RequestView::new(&parts, client.parse().unwrap(), "127.0.0.1:9080".parse().unwrap(), false);
        r.find(&view).map(|r| r.spec.id.clone())
    }

    const UP: &str = "upstream: {nodes: {\"127.0.0.1:1\": 1}}";

    #[test]
    fn exact_before_prefix_longest_prefix_first() {
        let r = router(&format!(
            "routes:\n  - {{id: all, uri: /*, {UP}}}\n  - {{id: api, uri: /api/*, {UP}}}\n  - {{id: exact, uri: /api/x, {UP}}}\n  - {{id: deep, uri: /api/v1/*, {UP}}}\n"
        ));
        assert_eq!(find(&r, "GET", "/api/x", "a", "1.1.1.1:1").as_deref(), Some("exact"));
        assert_eq!(find(&r, "GET", "/api/y", "a", "1.1.1.1:1").as_deref(), Some("api"));
        assert_eq!(find(&r, "GET", "/api/", "a", "1.1.1.1:1").as_deref(), Some("api"));
        assert_eq!(find(&r, "GET", "/api/v1/z?q=1", "a", "1.1.1.1:1").as_deref(), Some("deep"));
        assert_eq!(find(&r, "GET", "/other", "a", "1.1.1.1:1").as_deref(), Some("all"));
    }

    /// Routes match the path as nginx's `$uri` has it (APISIX routes on it): a path that
    /// reaches `/api/x` through `..`, doubled slashes or percent-escapes takes the routes of
    /// `/api/x`, not those of the path as written.
    #[test]
    fn routes_match_the_normalized_path_as_nginx_uri() {
        let r =
            router(&format!("routes:\n  - {{id: all, uri: /*, {UP}}}\n  - {{id: api, uri: /api/*, {UP}}}\n"));
        for path in
            ["/api/x", "/static/../api/x", "//api/x", "/api%2Fx", "/%61pi/x", "/./api/./x", "/api/x/../y"]
        {
            assert_eq!(find(&r, "GET", path, "a", "1.1.1.1:1").as_deref(), Some("api"), "{path}");
        }
        assert_eq!(find(&r, "GET", "/api/../static/x", "a", "1.1.1.1:1").as_deref(), Some("all"));
        assert_eq!(find(&r, "GET", "/../api/x", "a", "1.1.1.1:1"), None, "above the root: no route (a 400)");
        for (raw, want) in [
            ("/", Some("/")),
            ("/a/b", Some("/a/b")),
            ("/a//b/", Some("/a/b/")),
            ("/a/b/..", Some("/a/")),
            ("/a/..", Some("/")),
            ("/a/.", Some("/a/")),
            ("/.well-known/x", Some("/.well-known/x")),
            ("/a%20b%zz", Some("/a b%zz")),
            ("/..", None),
            ("/a/../..", None),
        ] {
            assert_eq!(uri_path(raw).as_deref(), want, "{raw}");
        }
        assert!(matches!(uri_path("/plain/path"), Some(Cow::Borrowed(_))), "no copy for a clean path");
    }

    #[test]
    fn host_names_are_made_as_nginx_host() {
        for (raw, want) in [
            ("api.example.com", "api.example.com"),
            ("API.Example.com.", "api.example.com"),
            ("api.example.com:443", "api.example.com"),
            ("api.example.com:x", "api.example.com"),
            ("api.example.com.:8443", "api.example.com"),
            ("[::1]:80", "::1"),
            ("", ""),
            (":", ""),
        ] {
            assert_eq!(host_name(raw), want, "{raw}");
        }
    }

    #[test]
    fn host_routes_before_hostless_and_wildcards_need_a_label() {
        let r = router(&format!(
            "routes:\n  - {{id: plain, uri: /server_port, {UP}}}\n  - {{id: host, uri: /*, hosts: [\"*.test.com\"], {UP}}}\n  - {{id: ex, uri: /*, host: API.test.com, {UP}}}\n"
        ));
        assert_eq!(find(&r, "GET", "/server_port", "x.test.com", "1.1.1.1:1").as_deref(), Some("host"));
        assert_eq!(
            find(&r, "GET", "/server_port", "a.b.TEST.com:8080", "1.1.1.1:1").as_deref(),
            Some("host")
        );
        assert_eq!(find(&r, "GET", "/server_port", "api.test.com", "1.1.1.1:1").as_deref(), Some("ex"));
        // As nginx's $host: one trailing dot and any port dropped.
        for host in ["api.test.com.", "API.test.com.:443", "api.test.com:x"] {
            assert_eq!(find(&r, "GET", "/server_port", host, "1.1.1.1:1").as_deref(), Some("ex"), "{host}");
        }
        assert_eq!(find(&r, "GET", "/server_port", "test.com", "1.1.1.1:1").as_deref(), Some("plain"));
        assert_eq!(find(&r, "GET", "/nope", "test.com", "1.1.1.1:1"), None);
    }

    #[test]
    fn priority_then_filters_fall_through() {
        let r = router(&format!(
            "routes:\n  - {{id: low, uri: /p, priority: 1, {UP}}}\n  - {{id: high, uri: /p, priority: 5, methods: [POST], {UP}}}\n  - {{id: vars, uri: /p, priority: 9, vars: [[\"arg_v\", \"==\", \"2\"]], {UP}}}\n  - {{id: net, uri: /p, priority: 7, remote_addrs: [\"10.0.0.0/8\"], {UP}}}\n"
        ));
        assert_eq!(find(&r, "POST", "/p", "h", "1.1.1.1:1").as_deref(), Some("high"));
        assert_eq!(find(&r, "GET", "/p", "h", "1.1.1.1:1").as_deref(), Some("low"));
        assert_eq!(find(&r, "GET", "/p?v=2", "h", "1.1.1.1:1").as_deref(), Some("vars"));
        assert_eq!(find(&r, "GET", "/p", "h", "10.2.3.4:1").as_deref(), Some("net"));
    }

    #[test]
    fn query_args_and_cookies() {
        assert_eq!(query_arg("a=1&b=x%20y+z", "b").as_deref(), Some("x y z"));
        assert_eq!(query_arg("a=1&b", "b").as_deref(), Some(""));
        assert_eq!(query_arg("a=1", "c"), None);
        let req = http::Request::builder().header("cookie", "a=1; sid=abc").body(()).unwrap();
        let (p, ()) = req.into_parts();
        assert_eq!(cookie(&p, "sid"), Some("abc"));
        assert_eq!(cookie(&p, "SID"), None);
    }

    #[test]
    fn many_routes_still_match() {
        let mut y = String::from("routes:\n");
        for i in 0..2000 {
            y.push_str(&format!("  - {{id: r{i}, uri: /svc{i}/*, {UP}}}\n"));
        }
        let r = router(&y);
        assert_eq!(find(&r, "GET", "/svc1999/x", "h", "1.1.1.1:1").as_deref(), Some("r1999"));
        assert_eq!(find(&r, "GET", "/svc7/", "h", "1.1.1.1:1").as_deref(), Some("r7"));
    }
}
