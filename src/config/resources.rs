//! `apisix.yaml`: routes, services, upstreams, stream routes, certificates and protos, validated
//! into the typed model the gateway is built from.
//!
//! Deliberate difference from APISIX: a file with any invalid item is rejected whole (APISIX logs
//! and skips the item). The running configuration keeps serving and every problem is reported.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value};
use strait_protocols::{KeepalivePool, Scheme, Timeouts};

use super::node::NodeConfig;
use super::raw::{self, Id, RawRoute, RawService, RawSsl, RawStreamRoute, RawTimeout, RawUpstream};
use super::value::{decode, index, join, kind, reject_unsupported};
use super::{ConfigErrors, Errors, parse_yaml, read_file, substitute_env};
use crate::route::expr::Expr;
use crate::route::ip::IpNet;

/// Validated resources.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub routes: Vec<RouteSpec>,
    /// Every upstream, named or inline, by key.
    pub upstreams: Vec<Arc<UpstreamSpec>>,
    pub stream_routes: Vec<StreamRouteSpec>,
    pub ssls: Vec<SslSpec>,
    pub protos: Vec<ProtoSpec>,
}

/// An HTTP route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub id: String,
    /// Exact paths, or prefixes ending in `*`.
    pub uris: Vec<String>,
    /// Lower-case host names, possibly `*.suffix`; empty for any host.
    pub hosts: Vec<String>,
    /// Allowed methods; empty for any.
    pub methods: Vec<Method>,
    pub remote_addrs: Vec<IpNet>,
    pub vars: Option<Expr>,
    pub priority: i64,
    /// Key of the upstream in [`Resources::upstreams`]; `None` for plugin-only routes.
    pub upstream: Option<String>,
    pub timeout: Option<Timeouts>,
    pub websocket: bool,
    pub plugins: Plugins,
}

/// Plugins Strait implements on routes.
#[derive(Debug, Clone, Default)]
pub struct Plugins {
    /// `grpc-transcode` configuration, validated against the protos.
    pub grpc_transcode: Option<Value>,
}

/// Where an upstream's nodes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeSource {
    Static(Vec<NodeSpec>),
    Discovery(Vec<DiscoverySource>),
}

/// One discovery query (`discovery_type`, `service_name`, `discovery_args`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoverySource {
    pub kind: String,
    pub service_name: String,
    /// `discovery_args` as canonical JSON (order-independent comparison).
    pub args: Vec<(String, String)>,
}

/// A node as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub host: String,
    pub port: Option<u16>,
    pub weight: u32,
    pub priority: i32,
    pub metadata: Map<String, Value>,
}

/// Where the consistent-hash key comes from (`hash_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashOn {
    Vars,
    Header,
    Cookie,
    VarsCombinations,
}

/// Load-balancing algorithm (`type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balancer {
    RoundRobin,
    Chash { hash_on: HashOn, key: String },
    LeastConn,
    Ewma,
}

/// `pass_host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassHostSpec {
    Pass,
    Node,
    Rewrite(String),
}

/// `tls` of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsSpec {
    pub client_cert: Option<(String, String)>,
    pub verify: bool,
}

/// An upstream, named (`upstreams`) or inline (in a route, service or stream route).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    /// Unique key: `upstreams/<id>`, `routes/<id>`, `services/<id>` or `stream_routes/<id>`.
    pub key: String,
    /// Id shown in the control API: the upstream id, or the key for inline upstreams.
    pub id: String,
    pub nodes: NodeSource,
    pub balancer: Balancer,
    pub retries: Option<u32>,
    pub retry_timeout: Option<Duration>,
    pub timeouts: Timeouts,
    /// With `timeout` given, how long a stream session through this upstream may go without a
    /// byte either way: the larger of `send` and `read`, as APISIX's `set_timeouts` makes
    /// nginx's `proxy_timeout` of them. `None`: sessions are not cut for quiet.
    pub stream_idle: Option<Duration>,
    pub scheme: Scheme,
    pub pass_host: PassHostSpec,
    pub keepalive: KeepalivePool,
    pub tls: Option<UpstreamTlsSpec>,
    pub checks: Option<HealthChecks>,
}

/// What to do when every node is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllUnhealthy {
    /// APISIX's rule: use all nodes as if healthy (counted and logged).
    UseAll,
    /// Answer 503 (gRPC: UNAVAILABLE).
    Fail,
}

/// Active probe type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeType {
    Http,
    Https,
    Tcp,
    Grpc,
}

/// `checks`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthChecks {
    pub active: ActiveCheck,
    pub passive: Option<PassiveCheck>,
    pub all_unhealthy: AllUnhealthy,
}

/// `checks.active`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveCheck {
    pub kind: ProbeType,
    pub timeout: Duration,
    pub concurrency: u32,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub http_method: Method,
    pub http_path: String,
    pub http_req_body: String,
    pub https_verify_certificate: bool,
    pub req_headers: Vec<(String, String)>,
    /// Service name for `type: grpc` (grpc.health.v1 `HealthCheckRequest.service`).
    pub grpc_service: String,
    pub healthy_interval: Duration,
    pub healthy_statuses: Vec<u16>,
    pub healthy_successes: u8,
    pub unhealthy_interval: Duration,
    pub unhealthy_statuses: Vec<u16>,
    pub http_failures: u8,
    pub tcp_failures: u8,
    pub timeouts: u8,
}

/// `checks.passive`.
#[derive(Debug, Clone, PartialEq)]
pub struct PassiveCheck {
    pub healthy_statuses: Vec<u16>,
    pub healthy_successes: u8,
    pub unhealthy_statuses: Vec<u16>,
    pub http_failures: u8,
    pub tcp_failures: u8,
    pub timeouts: u8,
}

/// A stream route.
#[derive(Debug, Clone)]
pub struct StreamRouteSpec {
    pub id: String,
    pub remote_addr: Option<IpNet>,
    pub server_addr: Option<IpNet>,
    pub server_port: Option<u16>,
    /// Lower-case SNI, exact or `*.suffix`.
    pub sni: Option<String>,
    pub upstream: String,
    pub idle_timeout: Option<Duration>,
}

/// A certificate.
#[derive(Debug, Clone)]
pub struct SslSpec {
    pub id: String,
    pub snis: Vec<String>,
    pub cert: String,
    pub key: String,
    /// `cert` and then `certs`/`keys` (more certificates for the same names), parsed when the
    /// file was checked (so a load parses each key once).
    pub keys: Arc<[Arc<rustls::sign::CertifiedKey>]>,
    /// `type: client` certificates are for mTLS to upstreams, not for listeners.
    pub client: bool,
    /// `client`: certificates its SNIs require from clients.
    pub client_auth: Option<strait_protocols::tls::ClientAuth>,
    /// `ssl_protocols`: its SNIs' TLS versions (`None`: the listener's).
    pub protocols: Option<strait_protocols::tls::TlsVersions>,
}

/// A proto resource.
#[derive(Debug, Clone)]
pub struct ProtoSpec {
    pub id: String,
    pub content: String,
}

const TOP_KEYS: &[&str] = &["routes", "services", "upstreams", "stream_routes", "ssls", "protos"];
const TOP_UNSUPPORTED: &[&str] = &[
    "global_rules",
    "consumers",
    "consumer_groups",
    "plugin_configs",
    "plugin_metadata",
    "secrets",
    "plugins",
];

/// Discovery types APISIX knows.
pub const DISCOVERY_TYPES: &[&str] = &["dns", "consul", "consul_kv", "nacos", "eureka", "kubernetes", "tars"];

impl Resources {
    /// Reads and validates `apisix.yaml` at `path`.
    pub fn load(path: &Path, node: &NodeConfig) -> Result<Resources, ConfigErrors> {
        let text = read_file(path)?;
        Self::parse(&path.display().to_string(), &text, node, |k| std::env::var(k).ok())
    }

    /// Validates resources text; `file` names it in errors.
    pub fn parse(
        file: &str,
        text: &str,
        node: &NodeConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Resources, ConfigErrors> {
        let mut errs = Errors::new(file);
        if !has_end_marker(text) {
            errs.add("", "missing valid end flag: the file must end with a `#END` line");
            return errs.into_result(Resources::default());
        }
        let text = match substitute_env(text, env) {
            Ok(t) => t,
            Err(e) => {
                errs.add("", e);
                return errs.into_result(Resources::default());
            }
        };
        let mut tree = match parse_yaml(&text) {
            Ok(t) => t,
            Err(e) => {
                errs.add("", e);
                return errs.into_result(Resources::default());
            }
        };
        reject_unsupported(&mut tree, "", TOP_UNSUPPORTED, &mut errs);
        let Value::Object(mut top) = tree else {
            errs.add("", format!("expected a map at the top level, found {}", kind(&tree)));
            return errs.into_result(Resources::default());
        };
        for k in top.keys() {
            if !TOP_KEYS.contains(&k.as_str()) {
                errs.add(k.clone(), "unknown key");
            }
        }
        // Each list is taken out of the tree, not copied: a large file is held once.
        let mut list = |name: &str, errs: &mut Errors| -> Vec<Value> {
            match top.remove(name) {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a,
                Some(other) => {
                    errs.add(name, format!("expected a list, found {}", kind(&other)));
                    vec![]
                }
            }
        };
        let mut b = Builder {
            errs,
            node,
            res: Resources::default(),
            upstream_ids: HashMap::new(),
            upstream_index: HashMap::new(),
            services: HashMap::new(),
        };
        let ssls = list("ssls", &mut b.errs);
        let ssl_map = b.ssls(ssls);
        let ups = list("upstreams", &mut b.errs);
        b.named_upstreams(ups, &ssl_map);
        let svcs = list("services", &mut b.errs);
        b.services(svcs, &ssl_map);
        let protos = list("protos", &mut b.errs);
        b.protos(protos);
        let routes = list("routes", &mut b.errs);
        b.routes(routes, &ssl_map);
        let srs = list("stream_routes", &mut b.errs);
        b.stream_routes(srs, &ssl_map);
        let Builder { errs, res, .. } = b;
        errs.into_result(res)
    }

    /// The upstream with this key.
    pub fn upstream(&self, key: &str) -> Option<&Arc<UpstreamSpec>> {
        self.upstreams.iter().find(|u| u.key == key)
    }
}

/// APISIX reads the last 10 bytes and requires `#END` followed only by white space.
pub fn has_end_marker(text: &str) -> bool {
    text.trim_end().ends_with("#END")
}

struct ServiceInfo {
    upstream: Option<String>,
    hosts: Vec<String>,
    websocket: Option<bool>,
    plugins: Plugins,
}

struct Builder<'a> {
    errs: Errors,
    node: &'a NodeConfig,
    res: Resources,
    /// upstream id -> key
    upstream_ids: HashMap<String, String>,
    /// upstream key -> index in `res.upstreams` (routes look theirs up; 10,000 inline
    /// upstreams must not make loading quadratic)
    upstream_index: HashMap<String, usize>,
    services: HashMap<String, ServiceInfo>,
}

fn item_id(id: &Option<Id>, i: usize) -> String {
    id.as_ref().map(|i| i.0.clone()).unwrap_or_else(|| format!("arr_{}", i + 1))
}

impl Builder<'_> {
    fn check_unique(&mut self, seen: &mut HashSet<String>, id: &str, path: &str) {
        if !seen.insert(id.to_string()) {
            self.errs.add(join(path, "id"), format!("duplicate id {id:?}"));
        }
    }

    fn ssls(&mut self, items: Vec<Value>) -> HashMap<String, SslSpec> {
        let mut by_id = HashMap::new();
        let mut seen = HashSet::new();
        for (i, v) in items.into_iter().enumerate() {
            let path = index("ssls", i);
            let Some(r) = decode::<RawSsl>(&v, &path, &mut self.errs) else {
                continue;
            };
            let id = item_id(&r.id, i);
            self.check_unique(&mut seen, &id, &path);
            if r.status == Some(0) {
                continue;
            }
            // `certs`/`keys`: more certificates for the same names (an RSA one beside an ECDSA
            // one, say), paired by index.
            let mut more_keys = Vec::new();
            let (certs, keys) = (r.certs.clone().unwrap_or_default(), r.keys.clone().unwrap_or_default());
            if certs.len() != keys.len() {
                self.errs.add(
                    join(&path, "keys"),
                    format!("{} certs but {} keys: each certificate needs its key", certs.len(), keys.len()),
                );
            } else {
                for (j, (c, k)) in certs.into_iter().zip(keys).enumerate() {
                    match strait_protocols::tls::certified_key(&c, &k) {
                        Ok(ck) => more_keys.push(ck),
                        Err(e) => self.errs.add(
                            index(&join(&path, "certs"), j),
                            format!("cannot use certificate and key: {e}"),
                        ),
                    }
                }
            }
            let client = match r.kind.as_deref() {
                None | Some("server") => false,
                Some("client") => true,
                Some(other) => {
                    self.errs.add(join(&path, "type"), format!("must be server or client, not {other:?}"));
                    false
                }
            };
            let (Some(cert), Some(key)) = (r.cert.clone(), r.key.clone()) else {
                self.errs.add(path.clone(), "cert and key are required");
                continue;
            };
            let first = match strait_protocols::tls::certified_key(&cert, &key) {
                Ok(ck) => ck,
                Err(e) => {
                    self.errs.add(join(&path, "cert"), format!("cannot use certificate and key: {e}"));
                    continue;
                }
            };
            let mut snis: Vec<String> = r.snis.clone().unwrap_or_default();
            if let Some(s) = &r.sni {
                snis.push(s.clone());
            }
            if snis.is_empty() && !client {
                self.errs.add(join(&path, "snis"), "required: the names this certificate serves");
            }
            for (j, s) in snis.iter().enumerate() {
                let at = index(&join(&path, "snis"), j);
                if !valid_host(s) {
                    self.errs.add(at, format!("invalid SNI {s:?}"));
                } else if s.starts_with('*') && !s.starts_with("*.") || s == "*." {
                    // Stored as a wildcard no client name could ever reach.
                    self.errs.add(at, format!("invalid SNI {s:?}: a wildcard is `*.` and a domain"));
                } else if s.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>().is_ok() {
                    self.errs
                        .add(at, format!("invalid SNI {s:?}: TLS clients send no SNI for an IP address"));
                }
            }
            if client && !more_keys.is_empty() {
                // An upstream's client certificate is one cert/key pair.
                self.errs.add(join(&path, "certs"), "only for `type: server` certificates");
            }
            let client_auth =
                r.client.as_ref().and_then(|c| self.ssl_client(c, client, &join(&path, "client")));
            let protocols =
                r.ssl_protocols.as_ref().and_then(|p| self.ssl_protocols(p, &join(&path, "ssl_protocols")));
            let spec = SslSpec {
                id: id.clone(),
                // As clients send them: lower-case, without a trailing dot.
                snis: snis.iter().map(|s| s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase()).collect(),
                cert,
                key,
                keys: std::iter::once(first).chain(more_keys).collect(),
                client,
                client_auth,
                protocols,
            };
            by_id.insert(id, spec.clone());
            self.res.ssls.push(spec);
        }
        by_id
    }

    /// `ssls[].client`: the CAs client certificates must chain to, and the chain's depth.
    fn ssl_client(
        &mut self,
        c: &raw::RawSslClient,
        for_upstreams: bool,
        path: &str,
    ) -> Option<strait_protocols::tls::ClientAuth> {
        if for_upstreams {
            self.errs.add(path, "only for `type: server` certificates (it asks clients for theirs)");
            return None;
        }
        let mut skip_uris = Vec::new();
        if let Some(list) = &c.skip_mtls_uri_regex {
            let p = join(path, "skip_mtls_uri_regex");
            if list.is_empty() {
                self.errs.add(&p, "must list at least one regular expression");
            }
            for (i, r) in list.iter().enumerate() {
                if list[..i].contains(r) {
                    self.errs.add(index(&p, i), format!("duplicate {r:?}"));
                }
                match regex::Regex::new(r) {
                    Ok(re) => skip_uris.push(re),
                    Err(e) => self.errs.add(index(&p, i), format!("invalid regular expression: {e}")),
                }
            }
        }
        let depth = match c.depth {
            None => 1,
            Some(d) if d >= 0 => usize::try_from(d).unwrap_or(usize::MAX),
            Some(_) => {
                self.errs.add(join(path, "depth"), "must be an integer >= 0");
                return None;
            }
        };
        let Some(ca) = &c.ca else {
            self.errs
                .add(join(path, "ca"), "required: the CA certificates client certificates must chain to");
            return None;
        };
        match strait_protocols::tls::client_roots(ca) {
            Ok(roots) => Some(strait_protocols::tls::ClientAuth { roots, depth, skip_uris }),
            Err(e) => {
                self.errs.add(join(path, "ca"), format!("cannot use these CA certificates: {e}"));
                None
            }
        }
    }

    /// `ssls[].ssl_protocols`: `TLSv1.1`, `TLSv1.2`, `TLSv1.3` (APISIX's enum). rustls offers
    /// no TLS 1.1, so it must come with a newer one.
    fn ssl_protocols(&mut self, list: &[String], path: &str) -> Option<strait_protocols::tls::TlsVersions> {
        match strait_protocols::tls::TlsVersions::from_names(list.iter().map(String::as_str), &["TLSv1.1"]) {
            Err((i, other)) => {
                self.errs.add(index(path, i), format!("must be TLSv1.1, TLSv1.2 or TLSv1.3, not {other:?}"));
                None
            }
            Ok((v, _)) if !v.any() => {
                self.errs.add(
                    path,
                    "unsupported by Strait: TLSv1.2 or TLSv1.3 must be among them (TLS 1.1 is not offered)",
                );
                None
            }
            Ok((v, _)) => Some(v),
        }
    }

    fn named_upstreams(&mut self, items: Vec<Value>, ssls: &HashMap<String, SslSpec>) {
        for (i, v) in items.into_iter().enumerate() {
            let path = index("upstreams", i);
            let Some(r) = decode::<RawUpstream>(&v, &path, &mut self.errs) else {
                continue;
            };
            let id = item_id(&r.id, i);
            if self.upstream_ids.contains_key(&id) {
                self.errs.add(join(&path, "id"), format!("duplicate id {id:?}"));
                continue;
            }
            let key = format!("upstreams/{id}");
            if let Some(spec) = self.upstream(&r, key.clone(), id.clone(), &path, ssls) {
                self.push_upstream(spec);
            }
            self.upstream_ids.insert(id, key);
        }
    }

    fn inline_upstream(
        &mut self,
        v: &Value,
        key: String,
        path: &str,
        ssls: &HashMap<String, SslSpec>,
    ) -> Option<String> {
        let r = decode::<RawUpstream>(v, path, &mut self.errs)?;
        let spec = self.upstream(&r, key.clone(), key.clone(), path, ssls)?;
        self.push_upstream(spec);
        Some(key)
    }

    fn push_upstream(&mut self, spec: UpstreamSpec) {
        self.upstream_index.entry(spec.key.clone()).or_insert(self.res.upstreams.len());
        self.res.upstreams.push(Arc::new(spec));
    }

    fn lookup_upstream(&self, key: &str) -> Option<&Arc<UpstreamSpec>> {
        self.upstream_index.get(key).map(|&i| &self.res.upstreams[i])
    }

    fn upstream(
        &mut self,
        r: &RawUpstream,
        key: String,
        id: String,
        path: &str,
        ssls: &HashMap<String, SslSpec>,
    ) -> Option<UpstreamSpec> {
        let before = self.errs.list.len();
        let e = &mut self.errs;

        let scheme = match r.scheme.as_deref().unwrap_or("http") {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "grpc" => Scheme::Grpc,
            "grpcs" => Scheme::Grpcs,
            "tcp" => Scheme::Tcp,
            "tls" => Scheme::Tls,
            s @ ("udp" | "kafka") => {
                e.add(join(path, "scheme"), format!("unsupported by Strait: scheme {s}"));
                Scheme::Http
            }
            other => {
                e.add(
                    join(path, "scheme"),
                    format!("must be one of http, https, grpc, grpcs, tcp, tls; not {other:?}"),
                );
                Scheme::Http
            }
        };

        let has_disc = r.discovery_type.is_some() || r.service_name.is_some();
        let count =
            [r.nodes.is_some(), has_disc, r.discovery_sources.is_some()].iter().filter(|b| **b).count();
        let nodes = if count != 1 {
            e.add(path, "exactly one of `nodes`, `service_name` + `discovery_type`, or `discovery_sources` is required");
            NodeSource::Static(vec![])
        } else if let Some(n) = &r.nodes {
            NodeSource::Static(parse_nodes(n, &join(path, "nodes"), e))
        } else if has_disc {
            let src = discovery_source(
                r.discovery_type.as_deref(),
                r.service_name.as_deref(),
                r.discovery_args.as_ref(),
                path,
                self.node,
                e,
            );
            NodeSource::Discovery(src.into_iter().collect())
        } else {
            let mut list = Vec::new();
            for (i, s) in r.discovery_sources.iter().flatten().enumerate() {
                let p = index(&join(path, "discovery_sources"), i);
                let Value::Object(m) = s else {
                    e.add(p, format!("expected a map, found {}", kind(s)));
                    continue;
                };
                for k in m.keys() {
                    if !["discovery_type", "service_name", "discovery_args"].contains(&k.as_str()) {
                        e.add(join(&p, k), "unknown key");
                    }
                }
                let args = match m.get("discovery_args") {
                    None => None,
                    Some(Value::Object(a)) => Some(a),
                    Some(other) => {
                        e.add(join(&p, "discovery_args"), format!("expected a map, found {}", kind(other)));
                        None
                    }
                };
                if let Some(src) = discovery_source(
                    m.get("discovery_type").and_then(Value::as_str),
                    m.get("service_name").and_then(Value::as_str),
                    args,
                    &p,
                    self.node,
                    e,
                ) {
                    list.push(src);
                }
            }
            if list.is_empty() {
                e.add(join(path, "discovery_sources"), "must list at least one source");
            }
            NodeSource::Discovery(list)
        };

        let balancer = match r.kind.as_deref().unwrap_or("roundrobin") {
            "roundrobin" => Balancer::RoundRobin,
            "least_conn" => Balancer::LeastConn,
            "ewma" => Balancer::Ewma,
            "chash" => {
                let hash_on = match r.hash_on.as_deref().unwrap_or("vars") {
                    "vars" => HashOn::Vars,
                    "header" => HashOn::Header,
                    "cookie" => HashOn::Cookie,
                    "vars_combinations" => HashOn::VarsCombinations,
                    "consumer" => {
                        e.add(join(path, "hash_on"), "unsupported by Strait: consumers are not implemented");
                        HashOn::Vars
                    }
                    other => {
                        e.add(
                            join(path, "hash_on"),
                            format!("must be vars, header, cookie or vars_combinations; not {other:?}"),
                        );
                        HashOn::Vars
                    }
                };
                let key = match &r.key {
                    Some(k) => k.clone(),
                    None => {
                        e.add(join(path, "key"), "missing key: required for type chash");
                        String::new()
                    }
                };
                if let Err(m) = check_chash_key(hash_on, &key) {
                    e.add(join(path, "key"), m);
                }
                Balancer::Chash { hash_on, key }
            }
            other => {
                e.add(
                    join(path, "type"),
                    format!("must be roundrobin, chash, least_conn or ewma; not {other:?}"),
                );
                Balancer::RoundRobin
            }
        };
        // APISIX's schema gives every upstream `hash_on: vars`, so upstreams exported from it
        // carry the field whatever their type: it is checked against APISIX's values and
        // otherwise ignored unless the type is chash.
        if let Some(h) = r.hash_on.as_deref()
            && !matches!(balancer, Balancer::Chash { .. })
            && !matches!(h, "vars" | "header" | "cookie" | "consumer" | "vars_combinations")
        {
            e.add(
                join(path, "hash_on"),
                format!("must be vars, header, cookie, consumer or vars_combinations; not {h:?}"),
            );
        }

        let timeouts = match &r.timeout {
            Some(t) => timeouts(t, &join(path, "timeout"), e),
            None => Timeouts::default(),
        };
        let stream_idle = r.timeout.is_some().then(|| timeouts.send.max(timeouts.read));
        let retry_timeout = match r.retry_timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => (t > 0.0).then(|| super::seconds(t)),
            Some(_) => {
                e.add(join(path, "retry_timeout"), "must be a number >= 0");
                None
            }
        };

        let pass_host = match (r.pass_host.as_deref().unwrap_or("pass"), &r.upstream_host) {
            ("pass", _) => PassHostSpec::Pass,
            ("node", _) => PassHostSpec::Node,
            ("rewrite", Some(h)) if !h.is_empty() => PassHostSpec::Rewrite(h.clone()),
            ("rewrite", _) => {
                e.add(join(path, "upstream_host"), "required (non-empty) when pass_host is rewrite");
                PassHostSpec::Pass
            }
            (other, _) => {
                e.add(join(path, "pass_host"), format!("must be pass, node or rewrite; not {other:?}"));
                PassHostSpec::Pass
            }
        };
        if let Some(h) = &r.upstream_host
            && (http::HeaderValue::from_str(h).is_err()
                || !valid_host(h) && h.parse::<std::net::SocketAddr>().is_err() && !h.contains(':'))
        {
            // What `validate` passes must load: the host becomes a header value.
            e.add(join(path, "upstream_host"), format!("invalid host {h:?}"));
        }

        let mut keepalive = KeepalivePool::default();
        if let Some(k) = &r.keepalive_pool {
            let p = join(path, "keepalive_pool");
            match k.size {
                Some(0) => e.add(join(&p, "size"), "must be at least 1"),
                Some(s) => keepalive.size = s as usize,
                None => {}
            }
            match k.idle_timeout {
                Some(t) if t.is_finite() && t >= 0.0 => keepalive.idle_timeout = super::seconds(t),
                Some(_) => e.add(join(&p, "idle_timeout"), "must be a number >= 0"),
                None => {}
            }
            match k.requests {
                Some(0) => e.add(join(&p, "requests"), "must be at least 1"),
                Some(n) => keepalive.requests = n,
                None => {}
            }
        }

        let tls = match &r.tls {
            None => None,
            Some(t) => {
                let p = join(path, "tls");
                let client_cert = match (&t.client_cert, &t.client_key, &t.client_cert_id) {
                    (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                        e.add(p.clone(), "client_cert_id excludes client_cert and client_key");
                        None
                    }
                    (Some(c), Some(k), None) => match strait_protocols::tls::certified_key(c, k) {
                        Ok(_) => Some((c.clone(), k.clone())),
                        Err(err) => {
                            e.add(join(&p, "client_cert"), format!("cannot use certificate and key: {err}"));
                            None
                        }
                    },
                    (Some(_), None, None) => {
                        e.add(join(&p, "client_key"), "required with client_cert");
                        None
                    }
                    (None, Some(_), None) => {
                        e.add(join(&p, "client_cert"), "required with client_key");
                        None
                    }
                    (None, None, Some(cid)) => match ssls.get(&cid.0) {
                        Some(s) if s.client => Some((s.cert.clone(), s.key.clone())),
                        Some(_) => {
                            e.add(
                                join(&p, "client_cert_id"),
                                format!("ssl {:?} is not of type client", cid.0),
                            );
                            None
                        }
                        None => {
                            e.add(join(&p, "client_cert_id"), format!("no ssl with id {:?}", cid.0));
                            None
                        }
                    },
                    (None, None, None) => None,
                };
                Some(UpstreamTlsSpec { client_cert, verify: t.verify.unwrap_or(false) })
            }
        };

        let checks = match &r.checks {
            None => None,
            Some(v) if self.node.disable_healthcheck => {
                let _ = v;
                None
            }
            Some(v) => parse_checks(v, &join(path, "checks"), e),
        };

        if self.errs.list.len() > before {
            return None;
        }
        Some(UpstreamSpec {
            key,
            id,
            nodes,
            balancer,
            retries: r.retries,
            retry_timeout,
            timeouts,
            stream_idle,
            scheme,
            pass_host,
            keepalive,
            tls,
            checks,
        })
    }

    fn services(&mut self, items: Vec<Value>, ssls: &HashMap<String, SslSpec>) {
        for (i, mut v) in items.into_iter().enumerate() {
            let path = index("services", i);
            reject_unsupported(&mut v, &path, raw::SERVICE_UNSUPPORTED, &mut self.errs);
            let Some(r) = decode::<RawService>(&v, &path, &mut self.errs) else {
                continue;
            };
            let id = item_id(&r.id, i);
            if self.services.contains_key(&id) {
                self.errs.add(join(&path, "id"), format!("duplicate id {id:?}"));
                continue;
            }
            let upstream = self.upstream_ref(
                r.upstream.as_ref(),
                r.upstream_id.as_ref(),
                format!("services/{id}"),
                &path,
                ssls,
            );
            let hosts = self.hosts(None, r.hosts.as_ref(), &path);
            let plugins = self.plugins(r.plugins.as_ref(), &path);
            self.services.insert(id, ServiceInfo { upstream, hosts, websocket: r.enable_websocket, plugins });
        }
    }

    fn upstream_ref(
        &mut self,
        inline: Option<&Value>,
        id: Option<&Id>,
        key: String,
        path: &str,
        ssls: &HashMap<String, SslSpec>,
    ) -> Option<String> {
        match (inline, id) {
            (Some(_), Some(_)) => {
                self.errs.add(path, "set either upstream or upstream_id, not both");
                None
            }
            (Some(v), None) => self.inline_upstream(v, key, &join(path, "upstream"), ssls),
            (None, Some(id)) => match self.upstream_ids.get(&id.0) {
                Some(k) => Some(k.clone()),
                None => {
                    self.errs.add(join(path, "upstream_id"), format!("no upstream with id {:?}", id.0));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn hosts(&mut self, host: Option<&String>, hosts: Option<&Vec<String>>, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        if host.is_some() && hosts.is_some() {
            self.errs.add(path, "set either host or hosts, not both");
        }
        // As requests' hosts are matched: lower-case, without one trailing dot (nginx's $host),
        // an IPv6 literal without its brackets (`[::1]` is matched as `::1`).
        let name = |h: &str| {
            let h = h.strip_suffix('.').unwrap_or(h);
            let h = h.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(h);
            h.to_ascii_lowercase()
        };
        if let Some(h) = host {
            if valid_host(h) {
                out.push(name(h));
            } else {
                self.errs.add(join(path, "host"), format!("invalid host {h:?}"));
            }
        }
        for (i, h) in hosts.into_iter().flatten().enumerate() {
            if valid_host(h) {
                out.push(name(h));
            } else {
                self.errs.add(index(&join(path, "hosts"), i), format!("invalid host {h:?}"));
            }
        }
        out
    }

    fn plugins(&mut self, plugins: Option<&Map<String, Value>>, path: &str) -> Plugins {
        let mut out = Plugins::default();
        for (name, conf) in plugins.into_iter().flatten() {
            match name.as_str() {
                "grpc-transcode" => out.grpc_transcode = Some(conf.clone()),
                _ => self
                    .errs
                    .add(join(&join(path, "plugins"), name), "unsupported by Strait: plugin not implemented"),
            }
        }
        out
    }

    fn protos(&mut self, items: Vec<Value>) {
        let mut seen = HashSet::new();
        for (i, v) in items.into_iter().enumerate() {
            let path = index("protos", i);
            let Some(r) = decode::<raw::RawProto>(&v, &path, &mut self.errs) else {
                continue;
            };
            let id = item_id(&r.id, i);
            self.check_unique(&mut seen, &id, &path);
            if r.content.is_empty() || r.content.len() > 1 << 20 {
                self.errs.add(join(&path, "content"), "must be 1 byte to 1 MiB");
                continue;
            }
            self.res.protos.push(ProtoSpec { id, content: r.content });
        }
    }

    fn routes(&mut self, items: Vec<Value>, ssls: &HashMap<String, SslSpec>) {
        let mut seen = HashSet::new();
        for (i, mut v) in items.into_iter().enumerate() {
            let path = index("routes", i);
            reject_unsupported(&mut v, &path, raw::ROUTE_UNSUPPORTED, &mut self.errs);
            let Some(r) = decode::<RawRoute>(&v, &path, &mut self.errs) else {
                continue;
            };
            if let Some(spec) = self.route(r, i, &path, &mut seen, ssls) {
                self.res.routes.push(spec);
            }
        }
    }

    fn route(
        &mut self,
        r: RawRoute,
        i: usize,
        path: &str,
        seen: &mut HashSet<String>,
        ssls: &HashMap<String, SslSpec>,
    ) -> Option<RouteSpec> {
        let before = self.errs.list.len();
        let id = item_id(&r.id, i);
        self.check_unique(seen, &id, path);

        let mut uris = Vec::new();
        match (&r.uri, &r.uris) {
            (Some(_), Some(_)) => self.errs.add(path, "set either uri or uris, not both"),
            (None, None) => self.errs.add(join(path, "uri"), "required (uri or uris)"),
            (Some(u), None) => uris.push((join(path, "uri"), u.clone())),
            (None, Some(list)) => {
                if list.is_empty() {
                    self.errs.add(join(path, "uris"), "must not be empty");
                }
                for (j, u) in list.iter().enumerate() {
                    uris.push((index(&join(path, "uris"), j), u.clone()));
                }
            }
        }
        for (p, u) in &uris {
            if let Err(m) = check_uri(u) {
                self.errs.add(p.clone(), m);
            }
        }

        let mut methods = Vec::new();
        for (j, m) in r.methods.iter().flatten().enumerate() {
            const ALLOWED: &[&str] =
                &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"];
            if ALLOWED.contains(&m.as_str()) {
                if let Ok(m) = Method::from_bytes(m.as_bytes()) {
                    methods.push(m);
                }
            } else {
                self.errs.add(index(&join(path, "methods"), j), format!("unknown method {m:?}"));
            }
        }

        let mut remote_addrs = Vec::new();
        if r.remote_addr.is_some() && r.remote_addrs.is_some() {
            self.errs.add(path, "set either remote_addr or remote_addrs, not both");
        }
        let addr_items: Vec<(String, &String)> = r
            .remote_addr
            .iter()
            .map(|a| (join(path, "remote_addr"), a))
            .chain(
                r.remote_addrs
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, a)| (index(&join(path, "remote_addrs"), j), a)),
            )
            .collect();
        for (p, a) in addr_items {
            match IpNet::parse(a) {
                Some(n) => remote_addrs.push(n),
                None => self.errs.add(p, format!("invalid IP or CIDR {a:?}")),
            }
        }

        let vars = match &r.vars {
            None => None,
            Some(v) => match Expr::parse(v) {
                Ok(e) => Some(e),
                Err((p, m)) => {
                    self.errs.add(
                        format!("{}{p}", join(path, "vars")),
                        format!("failed to validate the 'vars' expression: {m}"),
                    );
                    None
                }
            },
        };

        let timeout = r.timeout.as_ref().map(|t| timeouts(t, &join(path, "timeout"), &mut self.errs));
        if let Some(s) = r.status
            && s > 1
        {
            self.errs.add(join(path, "status"), "must be 0 or 1");
        }

        // Service inheritance.
        let mut upstream = self.upstream_ref(
            r.upstream.as_ref(),
            r.upstream_id.as_ref(),
            format!("routes/{id}"),
            path,
            ssls,
        );
        let mut hosts = self.hosts(r.host.as_ref(), r.hosts.as_ref(), path);
        let mut plugins = self.plugins(r.plugins.as_ref(), path);
        let mut websocket = r.enable_websocket;
        if let Some(sid) = &r.service_id {
            match self.services.get(&sid.0) {
                Some(s) => {
                    if upstream.is_none() {
                        upstream = s.upstream.clone();
                    }
                    if hosts.is_empty() {
                        hosts = s.hosts.clone();
                    }
                    if plugins.grpc_transcode.is_none() {
                        plugins.grpc_transcode = s.plugins.grpc_transcode.clone();
                    }
                    if websocket.is_none() {
                        websocket = s.websocket;
                    }
                }
                None => self.errs.add(join(path, "service_id"), format!("no service with id {:?}", sid.0)),
            }
        }
        if upstream.is_none() && self.errs.list.len() == before {
            self.errs
                .add(path, "needs an upstream: set upstream, upstream_id or a service_id with an upstream");
        }
        if let Some(key) = &upstream
            && let Some(u) = self.lookup_upstream(key)
            && matches!(u.scheme, Scheme::Tcp | Scheme::Tls)
        {
            self.errs.add(
                path,
                format!("upstream {} has scheme {} which is only for stream routes", u.id, u.scheme.as_str()),
            );
        }
        if let Some(conf) = &plugins.grpc_transcode
            && let Err((p, m)) = crate::transcode::check(conf, &self.res.protos)
        {
            self.errs.add(format!("{}{}", join(&join(path, "plugins"), "grpc-transcode"), p), m);
        }

        if self.errs.list.len() > before || r.status == Some(0) {
            return None;
        }
        Some(RouteSpec {
            id,
            uris: uris.into_iter().map(|(_, u)| u).collect(),
            hosts,
            methods,
            remote_addrs,
            vars,
            priority: r.priority.unwrap_or(0),
            upstream,
            timeout,
            websocket: websocket.unwrap_or(false),
            plugins,
        })
    }

    fn stream_routes(&mut self, items: Vec<Value>, ssls: &HashMap<String, SslSpec>) {
        let mut seen = HashSet::new();
        for (i, mut v) in items.into_iter().enumerate() {
            let path = index("stream_routes", i);
            reject_unsupported(&mut v, &path, raw::STREAM_ROUTE_UNSUPPORTED, &mut self.errs);
            let Some(r) = decode::<RawStreamRoute>(&v, &path, &mut self.errs) else {
                continue;
            };
            let before = self.errs.list.len();
            let id = item_id(&r.id, i);
            self.check_unique(&mut seen, &id, &path);
            let net = |s: &Option<String>, k: &str, errs: &mut Errors| -> Option<IpNet> {
                let s = s.as_ref()?;
                let n = IpNet::parse(s);
                if n.is_none() {
                    errs.add(join(&path, k), format!("invalid IP or CIDR {s:?}"));
                }
                n
            };
            let remote_addr = net(&r.remote_addr, "remote_addr", &mut self.errs);
            let server_addr = net(&r.server_addr, "server_addr", &mut self.errs);
            if r.server_port == Some(0) {
                self.errs.add(join(&path, "server_port"), "must be 1..65535");
            }
            if let Some(s) = &r.sni
                && !valid_host(s)
            {
                self.errs.add(join(&path, "sni"), format!("invalid SNI {s:?}"));
            }
            let idle_timeout = match r.idle_timeout {
                None => None,
                Some(t) if t.is_finite() && t > 0.0 => Some(super::seconds(t)),
                Some(_) => {
                    self.errs.add(join(&path, "idle_timeout"), "must be a positive number of seconds");
                    None
                }
            };
            let mut upstream = self.upstream_ref(
                r.upstream.as_ref(),
                r.upstream_id.as_ref(),
                format!("stream_routes/{id}"),
                &path,
                ssls,
            );
            if upstream.is_none()
                && let Some(sid) = &r.service_id
            {
                match self.services.get(&sid.0) {
                    Some(s) => upstream = s.upstream.clone(),
                    None => {
                        self.errs.add(join(&path, "service_id"), format!("no service with id {:?}", sid.0))
                    }
                }
            }
            if let Some(key) = &upstream {
                if let Some(u) = self.lookup_upstream(key) {
                    match u.scheme {
                        Scheme::Tcp | Scheme::Tls => {}
                        // APISIX rewrites a stored `http` to `tcp` in the stream subsystem; the
                        // stream proxy treats `http` as plain TCP, so one upstream (one health
                        // state) serves both kinds of routes.
                        Scheme::Http => {}
                        other => self.errs.add(
                            path.clone(),
                            format!(
                                "upstream {} has scheme {} which is not a stream scheme (tcp or tls)",
                                u.id,
                                other.as_str()
                            ),
                        ),
                    }
                }
            } else if self.errs.list.len() == before {
                self.errs.add(path.clone(), "needs an upstream: set upstream, upstream_id or service_id");
            }
            if self.errs.list.len() > before {
                continue;
            }
            let Some(upstream) = upstream else { continue };
            self.res.stream_routes.push(StreamRouteSpec {
                id,
                remote_addr,
                server_addr,
                server_port: r.server_port,
                sni: r.sni.map(|s| s.to_ascii_lowercase()),
                upstream,
                idle_timeout,
            });
        }
    }
}

fn timeouts(t: &RawTimeout, path: &str, e: &mut Errors) -> Timeouts {
    let mut out = Timeouts::default();
    for (name, v, slot) in [
        ("connect", t.connect, &mut out.connect),
        ("send", t.send, &mut out.send),
        ("read", t.read, &mut out.read),
    ] {
        if v.is_finite() && v > 0.0 {
            *slot = super::seconds(v);
        } else {
            e.add(join(path, name), "must be a number of seconds > 0");
        }
    }
    out
}

fn discovery_source(
    kind_: Option<&str>,
    service_name: Option<&str>,
    args: Option<&Map<String, Value>>,
    path: &str,
    node: &NodeConfig,
    e: &mut Errors,
) -> Option<DiscoverySource> {
    let Some(k) = kind_ else {
        e.add(join(path, "discovery_type"), "required with service_name");
        return None;
    };
    let Some(name) = service_name.filter(|s| !s.is_empty() && s.len() <= 256) else {
        e.add(join(path, "service_name"), "required with discovery_type (1 to 256 characters)");
        return None;
    };
    if !DISCOVERY_TYPES.contains(&k) {
        e.add(join(path, "discovery_type"), format!("unknown discovery type {k:?}"));
        return None;
    }
    if !node.discovery.contains_key(k) {
        e.add(
            join(path, "discovery_type"),
            format!("discovery {k:?} is not configured in config.yaml (discovery.{k})"),
        );
        return None;
    }
    let mut a: Vec<(String, String)> = args
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect();
    a.sort();
    Some(DiscoverySource { kind: k.to_string(), service_name: name.to_string(), args: a })
}

/// Parses the map or array form of `nodes`.
pub fn parse_nodes(v: &Value, path: &str, e: &mut Errors) -> Vec<NodeSpec> {
    let mut out = Vec::new();
    match v {
        Value::Object(m) => {
            for (k, w) in m {
                let p = join(path, k);
                let weight = match w.as_u64().and_then(|w| u32::try_from(w).ok()) {
                    Some(w) => w,
                    None => {
                        e.add(p, "weight must be an integer >= 0");
                        continue;
                    }
                };
                match split_host_port(k) {
                    Some((host, port)) => {
                        out.push(NodeSpec { host, port, weight, priority: 0, metadata: Map::new() })
                    }
                    None => e.add(p, format!("invalid node address {k:?}: expected host[:port]")),
                }
            }
        }
        Value::Array(items) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct RawNode {
                host: String,
                port: Option<u32>,
                weight: u32,
                priority: Option<i32>,
                metadata: Option<Map<String, Value>>,
            }
            for (i, item) in items.iter().enumerate() {
                let p = index(path, i);
                let Some(n) = decode::<RawNode>(item, &p, e) else {
                    continue;
                };
                if !valid_host(&n.host)
                    && n.host.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>().is_err()
                {
                    e.add(join(&p, "host"), format!("invalid host {:?}", n.host));
                    continue;
                }
                let port = match n.port {
                    None => None,
                    Some(p16) if (1..=65535).contains(&p16) => Some(p16 as u16),
                    Some(_) => {
                        e.add(join(&p, "port"), "must be 1..65535");
                        continue;
                    }
                };
                out.push(NodeSpec {
                    host: n.host.trim_start_matches('[').trim_end_matches(']').to_string(),
                    port,
                    weight: n.weight,
                    priority: n.priority.unwrap_or(0),
                    metadata: n.metadata.unwrap_or_default(),
                });
            }
        }
        other => e.add(
            path,
            format!("expected a map of \"host:port\": weight or a list of nodes, found {}", kind(other)),
        ),
    }
    out
}

/// Splits `host[:port]` / `[v6][:port]` as in APISIX's map-form node keys.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0)?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    let (h, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok().filter(|p| *p > 0)?)),
        None => (s, None),
    };
    if h.contains(':') || !(valid_host(h) || h.parse::<std::net::IpAddr>().is_ok()) {
        return None;
    }
    Some((h.to_string(), port))
}

/// APISIX's `host_def`: `^\*?[0-9a-zA-Z-._\[\]:]+$` (also `*` alone), without `*` elsewhere.
pub fn valid_host(h: &str) -> bool {
    if h == "*" {
        return true;
    }
    let body = h.strip_prefix('*').unwrap_or(h);
    !body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
}

fn check_uri(u: &str) -> Result<(), String> {
    if u.is_empty() || u.len() > 4096 {
        return Err("must be 1 to 4096 characters".into());
    }
    if !u.starts_with('/') && u != "*" {
        return Err(format!("must start with /: {u:?}"));
    }
    if let Some(pos) = u.find('*')
        && pos != u.len() - 1
    {
        return Err(format!("`*` is only allowed at the end (prefix match): {u:?}"));
    }
    // `/user/:id` is a literal path, as APISIX's default router (`radixtree_host_uri`, built
    // without parameter matching) has it.
    Ok(())
}

fn check_chash_key(hash_on: HashOn, key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Ok(()); // reported as missing already
    }
    match hash_on {
        HashOn::Vars => {
            const VARS: &[&str] = &[
                "uri",
                "server_name",
                "server_addr",
                "request_uri",
                "remote_port",
                "remote_addr",
                "query_string",
                "host",
                "hostname",
            ];
            let arg = key.strip_prefix("arg_").is_some_and(|a| {
                !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
            if VARS.contains(&key) || arg {
                Ok(())
            } else {
                Err(format!(
                    "invalid key {key:?} for hash_on vars: expected one of {} or arg_*",
                    VARS.join(", ")
                ))
            }
        }
        HashOn::Header | HashOn::Cookie => {
            if key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                Ok(())
            } else {
                Err(format!("invalid {key:?}: letters, digits, - and _ only"))
            }
        }
        HashOn::VarsCombinations => Ok(()),
    }
}

fn statuses(v: Option<&Vec<u16>>, default: &[u16], path: &str, e: &mut Errors) -> Vec<u16> {
    match v {
        None => default.to_vec(),
        Some(list) => {
            if list.is_empty() {
                e.add(path, "must not be empty");
            }
            for (i, s) in list.iter().enumerate() {
                if !(200..=599).contains(s) {
                    e.add(index(path, i), "must be an HTTP status 200..599");
                }
            }
            list.clone()
        }
    }
}

fn counter(v: Option<u32>, default: u8, min: u32, path: &str, e: &mut Errors) -> u8 {
    match v {
        None => default,
        Some(n) if (min..=254).contains(&n) => n as u8,
        Some(_) => {
            e.add(path, format!("must be {min}..254"));
            default
        }
    }
}

/// Parses `checks` with APISIX's defaults (`apisix/schema_def.lua`).
fn parse_checks(v: &Value, path: &str, e: &mut Errors) -> Option<HealthChecks> {
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Healthy {
        interval: Option<u32>,
        http_statuses: Option<Vec<u16>>,
        successes: Option<u32>,
    }
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Unhealthy {
        interval: Option<u32>,
        http_statuses: Option<Vec<u16>>,
        http_failures: Option<u32>,
        tcp_failures: Option<u32>,
        timeouts: Option<u32>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Active {
        #[serde(rename = "type")]
        kind: Option<String>,
        timeout: Option<f64>,
        concurrency: Option<u32>,
        host: Option<String>,
        port: Option<u16>,
        http_method: Option<String>,
        http_path: Option<String>,
        http_req_body: Option<String>,
        https_verify_certificate: Option<bool>,
        req_headers: Option<Vec<String>>,
        grpc_service: Option<String>,
        healthy: Option<Healthy>,
        unhealthy: Option<Unhealthy>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Passive {
        #[serde(rename = "type")]
        kind: Option<String>,
        healthy: Option<Healthy>,
        unhealthy: Option<Unhealthy>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Checks {
        active: Option<Active>,
        passive: Option<Passive>,
        all_unhealthy: Option<String>,
    }
    let c = decode::<Checks>(v, path, e)?;
    let Some(a) = c.active else {
        e.add(join(path, "active"), "required: passive checks alone could never bring an ejected node back");
        return None;
    };
    let ap = join(path, "active");
    let kind_ = match a.kind.as_deref().unwrap_or("http") {
        "http" => ProbeType::Http,
        "https" => ProbeType::Https,
        "tcp" => ProbeType::Tcp,
        "grpc" => ProbeType::Grpc,
        other => {
            e.add(join(&ap, "type"), format!("must be http, https, tcp or grpc; not {other:?}"));
            ProbeType::Http
        }
    };
    let mut req_headers = Vec::new();
    for (i, h) in a.req_headers.iter().flatten().enumerate() {
        match h.split_once(':') {
            Some((n, v)) if !n.trim().is_empty() => {
                req_headers.push((n.trim().to_string(), v.trim().to_string()))
            }
            _ => e.add(index(&join(&ap, "req_headers"), i), "expected \"Name: value\""),
        }
    }
    let method = match a.http_method.as_deref() {
        None => Method::GET,
        Some(m) => Method::from_bytes(m.as_bytes()).unwrap_or_else(|_| {
            e.add(join(&ap, "http_method"), format!("invalid method {m:?}"));
            Method::GET
        }),
    };
    let timeout = match a.timeout {
        None => Duration::from_secs(1),
        Some(t) if t.is_finite() && t > 0.0 => super::seconds(t),
        Some(_) => {
            e.add(join(&ap, "timeout"), "must be a positive number of seconds");
            Duration::from_secs(1)
        }
    };
    let interval = |v: Option<u32>, p: &str, e: &mut Errors| match v {
        None => Duration::from_secs(1),
        Some(0) => {
            e.add(p, "must be at least 1");
            Duration::from_secs(1)
        }
        Some(n) => Duration::from_secs(n as u64),
    };
    let h = a.healthy.unwrap_or_default();
    let u = a.unhealthy.unwrap_or_default();
    let hp = join(&ap, "healthy");
    let up = join(&ap, "unhealthy");
    let active = ActiveCheck {
        kind: kind_,
        timeout,
        concurrency: a.concurrency.unwrap_or(10),
        host: a.host,
        port: a.port,
        http_method: method,
        http_path: a.http_path.unwrap_or_else(|| "/".into()),
        http_req_body: a.http_req_body.unwrap_or_default(),
        https_verify_certificate: a.https_verify_certificate.unwrap_or(true),
        req_headers,
        grpc_service: a.grpc_service.unwrap_or_default(),
        healthy_interval: interval(h.interval, &join(&hp, "interval"), e),
        healthy_statuses: statuses(h.http_statuses.as_ref(), &[200, 302], &join(&hp, "http_statuses"), e),
        healthy_successes: counter(h.successes, 2, 1, &join(&hp, "successes"), e),
        unhealthy_interval: interval(u.interval, &join(&up, "interval"), e),
        unhealthy_statuses: statuses(
            u.http_statuses.as_ref(),
            &[429, 404, 500, 501, 502, 503, 504, 505],
            &join(&up, "http_statuses"),
            e,
        ),
        http_failures: counter(u.http_failures, 5, 1, &join(&up, "http_failures"), e),
        tcp_failures: counter(u.tcp_failures, 2, 1, &join(&up, "tcp_failures"), e),
        timeouts: counter(u.timeouts, 3, 1, &join(&up, "timeouts"), e),
    };
    let passive = c.passive.map(|p| {
        let pp = join(path, "passive");
        if let Some(k) = &p.kind
            && !["http", "https", "tcp"].contains(&k.as_str())
        {
            e.add(join(&pp, "type"), format!("must be http, https or tcp; not {k:?}"));
        }
        let h = p.healthy.unwrap_or_default();
        let u = p.unhealthy.unwrap_or_default();
        let hp = join(&pp, "healthy");
        let up = join(&pp, "unhealthy");
        if h.interval.is_some() {
            e.add(join(&hp, "interval"), "unknown key: passive checks have no interval");
        }
        if u.interval.is_some() {
            e.add(join(&up, "interval"), "unknown key: passive checks have no interval");
        }
        let default_ok: Vec<u16> = (200..=208).chain([226]).chain(300..=308).collect();
        PassiveCheck {
            healthy_statuses: statuses(h.http_statuses.as_ref(), &default_ok, &join(&hp, "http_statuses"), e),
            healthy_successes: counter(h.successes, 5, 0, &join(&hp, "successes"), e),
            unhealthy_statuses: statuses(
                u.http_statuses.as_ref(),
                &[429, 500, 503],
                &join(&up, "http_statuses"),
                e,
            ),
            http_failures: counter(u.http_failures, 5, 0, &join(&up, "http_failures"), e),
            tcp_failures: counter(u.tcp_failures, 2, 0, &join(&up, "tcp_failures"), e),
            timeouts: counter(u.timeouts, 7, 0, &join(&up, "timeouts"), e),
        }
    });
    let all_unhealthy = match c.all_unhealthy.as_deref() {
        None | Some("use_all") => AllUnhealthy::UseAll,
        Some("fail") => AllUnhealthy::Fail,
        Some(other) => {
            e.add(join(path, "all_unhealthy"), format!("must be use_all or fail; not {other:?}"));
            AllUnhealthy::UseAll
        }
    };
    Some(HealthChecks { active, passive, all_unhealthy })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeConfig {
        NodeConfig::parse("config.yaml", "discovery:\n  dns:\n    servers: [\"127.0.0.1:53\"]\n", |_| None)
            .unwrap()
    }

    fn parse(text: &str) -> Result<Resources, ConfigErrors> {
        Resources::parse("conf/apisix.yaml", text, &node(), |_| None)
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text).unwrap_err().0.iter().map(|e| format!("{}: {}", e.path, e.reason)).collect()
    }

    #[test]
    fn minimal_route_and_upstream() {
        let r = parse(
            "routes:\n  - id: r1\n    uri: /api/*\n    hosts: [\"*.Example.com\"]\n    upstream_id: u1\nupstreams:\n  - id: u1\n    nodes:\n      \"127.0.0.1:8080\": 1\n#END\n",
        )
        .unwrap();
        assert_eq!(r.routes.len(), 1);
        assert_eq!(r.routes[0].hosts, ["*.example.com"]);
        assert_eq!(r.routes[0].upstream.as_deref(), Some("upstreams/u1"));
        let u = r.upstream("upstreams/u1").unwrap();
        assert_eq!(u.timeouts, Timeouts::default());
        assert_eq!(
            u.nodes,
            NodeSource::Static(vec![NodeSpec {
                host: "127.0.0.1".into(),
                port: Some(8080),
                weight: 1,
                priority: 0,
                metadata: Map::new()
            }])
        );
    }

    #[test]
    fn ssl_client_ca_and_ssl_protocols_are_checked_with_their_paths() {
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let block =
            |pem: &str| format!("|\n{}", pem.lines().map(|l| format!("        {l}\n")).collect::<String>());
        let ssl = |extra: &str| {
            format!(
                "ssls:\n  - snis: [a.test]\n    cert: {}    key: {}{extra}#END\n",
                block(&ck.cert.pem()),
                block(&ck.signing_key.serialize_pem())
            )
        };
        let ca = format!("    client:\n      ca: {}", block(&ck.cert.pem()));
        let r = parse(&ssl(&format!("{ca}    ssl_protocols: [TLSv1.1, TLSv1.3]\n"))).unwrap();
        let spec = &r.ssls[0];
        assert_eq!(spec.client_auth.as_ref().map(|c| c.depth), Some(1));
        assert_eq!(spec.protocols, Some(strait_protocols::tls::TlsVersions { tls12: false, tls13: true }));
        let r = parse(&ssl("")).unwrap();
        assert!(r.ssls[0].client_auth.is_none() && r.ssls[0].protocols.is_none());
        // SNIs as clients send them (no trailing dot); names no client could send are errors.
        let with_snis = |snis: &str| ssl("").replace("snis: [a.test]", &format!("snis: [{snis}]"));
        assert_eq!(parse(&with_snis("\"A.test.\"")).unwrap().ssls[0].snis, ["a.test"]);
        for bad in ["\"*\"", "\"*a.test\"", "\"10.0.0.1\"", "\"[::1]\""] {
            let e = errors(&with_snis(bad));
            assert!(e.iter().any(|m| m.starts_with("ssls[0].snis[0]: invalid SNI")), "{bad}: {e:?}");
        }
        let r =
            parse(&ssl(&format!("{ca}      skip_mtls_uri_regex: [\"^/health\"]\n      depth: 3\n"))).unwrap();
        let auth = r.ssls[0].client_auth.as_ref().unwrap();
        assert_eq!((auth.depth, auth.skip_uris.len()), (3, 1));
        for (extra, path) in [
            (format!("{ca}      depth: -1\n"), "ssls[0].client.depth"),
            ("    certs: [x]\n".to_string(), "ssls[0].keys"),
            (
                format!("    certs:\n      - {}    keys:\n      - nope\n", block(&ck.cert.pem())),
                "ssls[0].certs[0]",
            ),
            (
                format!("{ca}      skip_mtls_uri_regex: [\"/open(\"]\n"),
                "ssls[0].client.skip_mtls_uri_regex[0]",
            ),
            (format!("{ca}      skip_mtls_uri_regex: []\n"), "ssls[0].client.skip_mtls_uri_regex"),
            (format!("{ca}      skip_mtls_uri_regex: [a, a]\n"), "ssls[0].client.skip_mtls_uri_regex[1]"),
            ("    client:\n      ca: not a certificate\n".to_string(), "ssls[0].client.ca"),
            ("    client:\n      depth: 2\n".to_string(), "ssls[0].client.ca"),
            ("    ssl_protocols: [TLSv1.1]\n".to_string(), "ssls[0].ssl_protocols"),
            ("    ssl_protocols: [SSLv3]\n".to_string(), "ssls[0].ssl_protocols[0]"),
        ] {
            let e = errors(&ssl(&extra));
            assert!(e.iter().any(|m| m.starts_with(&format!("{path}: "))), "{path}: {e:?}");
        }
    }

    #[test]
    fn an_upstream_host_that_cannot_be_a_header_value_is_refused() {
        let e = errors(
            "upstreams:\n  - id: u\n    pass_host: rewrite\n    upstream_host: \"b\\u00fccher.de:80\\u0001\"\n    nodes: {\"127.0.0.1:1\": 1}\n#END\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("upstreams[0].upstream_host: invalid host"), "{e:?}");
    }

    /// Upstreams exported from APISIX carry `hash_on: vars` whatever their type.
    #[test]
    fn hash_on_is_accepted_on_any_type_with_apisix_values() {
        for kind in ["roundrobin", "least_conn", "ewma"] {
            for h in ["vars", "header", "cookie", "consumer", "vars_combinations"] {
                let r = parse(&format!(
                    "upstreams:\n  - id: u\n    type: {kind}\n    hash_on: {h}\n    nodes: {{\"127.0.0.1:1\": 1}}\n#END\n"
                ));
                assert!(r.is_ok(), "{kind} with hash_on {h}: {r:?}");
            }
        }
        let e = errors("upstreams:\n  - id: u\n    hash_on: nope\n    nodes: {\"127.0.0.1:1\": 1}\n#END\n");
        assert_eq!(
            e,
            [
                "upstreams[0].hash_on: must be vars, header, cookie, consumer or vars_combinations; not \"nope\""
            ]
        );
    }

    #[test]
    fn huge_timeouts_are_capped_instead_of_panicking() {
        let r = parse(
            "upstreams:\n  - id: u\n    nodes: {\"127.0.0.1:80\": 1}\n    timeout: {connect: 1e300, send: 1e300, read: 1e300}\n    retry_timeout: 1e300\n    keepalive_pool: {idle_timeout: 1e300}\n#END\n",
        )
        .unwrap();
        let u = r.upstream("upstreams/u").unwrap();
        assert_eq!(u.timeouts.connect, Duration::from_secs(1_000_000_000));
    }

    #[test]
    fn end_marker_is_required() {
        let e = errors("routes: []\n");
        assert!(e[0].contains("#END"), "{e:?}");
        assert!(parse("routes: []\n#END   \n").is_ok());
    }

    #[test]
    fn every_bad_item_is_reported_with_its_path() {
        let e = errors(
            "routes:\n  - uri: /a\n    upstream_id: missing\n  - uri: nope\n    upstream: {nodes: {\"1.2.3.4:80\": 1}}\n  - uri: /c\n    upstream: {nodes: {\"1.2.3.4:80\": -1}, type: rr}\n    bogus: 1\n#END\n",
        );
        let joined = e.join("\n");
        assert!(joined.contains("routes[0].upstream_id: no upstream with id \"missing\""), "{joined}");
        assert!(joined.contains("routes[1].uri: must start with /"), "{joined}");
        assert!(joined.contains("routes[2]"), "{joined}");
        assert!(joined.contains("bogus"), "{joined}");
    }

    #[test]
    fn upstream_errors_carry_nested_paths() {
        let e = errors(
            "upstreams:\n  - id: u\n    nodes: {\"1.2.3.4:80\": 1}\n    timeout: {connect: 1, send: 0, read: 1}\n    type: chash\n#END\n",
        );
        let joined = e.join("\n");
        assert!(joined.contains("upstreams[0].timeout.send: must be a number of seconds > 0"), "{joined}");
        assert!(joined.contains("upstreams[0].key: missing key"), "{joined}");
        let e = errors("upstreams:\n  - id: u\n    nodes: [{host: 1.2.3.4, port: 99999, weight: 1}]\n#END\n");
        assert!(e.join("\n").contains("upstreams[0].nodes[0].port"), "{e:?}");
        let e = errors(
            "upstreams:\n  - id: u\n    nodes: {\"1.2.3.4:80\": 1}\n    service_name: x\n    discovery_type: dns\n#END\n",
        );
        assert!(e.join("\n").contains("exactly one of"), "{e:?}");
        let e = errors("upstreams:\n  - id: u\n    service_name: x\n    discovery_type: consul\n#END\n");
        assert!(e.join("\n").contains("not configured in config.yaml"), "{e:?}");
    }

    #[test]
    fn node_forms() {
        let mut e = Errors::new("f");
        let n = parse_nodes(&serde_json::json!({"[::1]:80": 2, "example.com": 1}), "nodes", &mut e);
        assert!(e.is_empty());
        assert_eq!((n[0].host.as_str(), n[0].port, n[0].weight), ("::1", Some(80), 2));
        assert_eq!((n[1].host.as_str(), n[1].port), ("example.com", None));
        assert_eq!(split_host_port("a:b:c"), None);
        assert_eq!(split_host_port("h:0"), None);
    }

    #[test]
    fn services_are_inherited() {
        let r = parse(
            "services:\n  - id: s\n    hosts: [a.test]\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\nroutes:\n  - uri: /x\n    service_id: s\n#END\n",
        )
        .unwrap();
        assert_eq!(r.routes[0].hosts, ["a.test"]);
        let dotted =
            parse("routes:\n  - {uri: /x, host: A.Test., upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n#END\n")
                .unwrap();
        assert_eq!(dotted.routes[0].hosts, ["a.test"], "matched as requests' hosts are: no trailing dot");
        let v6 = parse("routes:\n  - uri: /x\n    hosts: [\"[::1]\", \"[FD00::1]\"]\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\n#END\n").unwrap();
        assert_eq!(v6.routes[0].hosts, ["::1", "fd00::1"], "as a request's [::1] host is matched");
        assert_eq!(r.routes[0].upstream.as_deref(), Some("services/s"));
        assert_eq!(r.routes[0].id, "arr_1");
    }

    #[test]
    fn a_route_overrides_what_its_service_sets() {
        let r = parse(
            "upstreams:\n  - id: u1\n    nodes: {\"127.0.0.1:1\": 1}\n  - id: u2\n    nodes: {\"127.0.0.1:2\": 1}\nservices:\n  - id: s\n    hosts: [a.test]\n    upstream_id: u1\n    enable_websocket: true\nroutes:\n  - {id: inherits, uri: /a, service_id: s}\n  - {id: own, uri: /b, service_id: s, upstream_id: u2, hosts: [b.test], enable_websocket: false}\n#END\n",
        )
        .unwrap();
        let (a, b) = (&r.routes[0], &r.routes[1]);
        assert_eq!(a.upstream.as_deref(), Some("upstreams/u1"), "the service's upstream_id");
        assert_eq!(a.hosts, ["a.test"]);
        assert!(a.websocket, "the service's enable_websocket");
        assert_eq!(b.upstream.as_deref(), Some("upstreams/u2"));
        assert_eq!(b.hosts, ["b.test"]);
        assert!(!b.websocket, "the route's own enable_websocket wins");
    }

    #[test]
    fn checks_defaults_follow_apisix() {
        let r = parse("upstreams:\n  - id: u\n    nodes: {\"127.0.0.1:1\": 1}\n    checks:\n      active: {http_path: /h}\n      passive: {}\n#END\n").unwrap();
        let c = r.upstream("upstreams/u").unwrap().checks.clone().unwrap();
        assert_eq!(c.active.healthy_successes, 2);
        assert_eq!(c.active.http_failures, 5);
        assert_eq!(c.active.tcp_failures, 2);
        assert_eq!(c.active.timeouts, 3);
        assert_eq!(c.active.healthy_statuses, [200, 302]);
        let p = c.passive.unwrap();
        assert_eq!(p.unhealthy_statuses, [429, 500, 503]);
        assert_eq!(p.timeouts, 7);
        let e = errors(
            "upstreams:\n  - id: u\n    nodes: {\"127.0.0.1:1\": 1}\n    checks:\n      passive: {}\n#END\n",
        );
        assert!(e.join("").contains("checks.active: required"), "{e:?}");
    }

    #[test]
    fn unsupported_resources_and_plugins() {
        let e = errors(
            "consumers: []\nroutes:\n  - uri: /\n    plugins: {limit-count: {}}\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\n#END\n",
        );
        let joined = e.join("\n");
        assert!(joined.contains("consumers: unsupported"), "{joined}");
        assert!(joined.contains("routes[0].plugins.limit-count: unsupported"), "{joined}");
    }

    #[test]
    fn vars_errors_point_into_the_expression() {
        let e = errors(
            "routes:\n  - uri: /\n    vars: [[\"arg_a\", \"==\", \"1\"], [\"arg_b\", \"??\", 1]]\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\n#END\n",
        );
        assert!(e[0].starts_with("routes[0].vars[1]: failed to validate"), "{e:?}");
    }
}
