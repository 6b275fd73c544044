//! `discovery:` in `config.yaml`: one validated entry per registry type.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use strait_discovery::consul::ConsulOptions;
use strait_discovery::dns::{DnsOptions, RecordKind};
use strait_discovery::eureka::EurekaOptions;
use strait_discovery::kubernetes::{ClusterOptions, NamespaceSelector, Token};
use strait_discovery::nacos::{NacosHost, NacosOptions};

use super::Errors;
use super::node::{parse_host_port, resolve_relative};
use super::value::{decode, index, join};

/// Validated discovery settings.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    pub dns: Option<DnsOptions>,
    pub nacos: Option<NacosOptions>,
    pub consul: Option<ConsulOptions>,
    pub eureka: Option<EurekaOptions>,
    pub kubernetes: Option<Vec<ClusterOptions>>,
    /// Snapshots on disk (`dump`), by backend type.
    pub dumps: Vec<(String, DumpOptions)>,
}

/// `dump: {path, load_on_init, expire}` (Consul's in APISIX; available to every backend here).
#[derive(Debug, Clone, PartialEq)]
pub struct DumpOptions {
    pub path: std::path::PathBuf,
    pub load_on_init: bool,
    /// A snapshot older than this is not loaded; `None` never expires.
    pub expire: Option<Duration>,
}

fn parse_dump(file: &str, v: &mut Value, path: &str, errs: &mut Errors) -> Option<DumpOptions> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        path: String,
        load_on_init: Option<bool>,
        expire: Option<u64>,
    }
    let raw = v.as_object_mut()?.remove("dump")?;
    let r: Raw = decode(&raw, &join(path, "dump"), errs)?;
    Some(DumpOptions {
        path: resolve_relative(file, &r.path),
        load_on_init: r.load_on_init.unwrap_or(true),
        expire: r.expire.filter(|e| *e > 0).map(Duration::from_secs),
    })
}

/// Whole seconds from configuration (at least one), capped as [`super::seconds`] caps them: a
/// huge value (`fetch_interval: 1e19`) would overflow a timer's deadline and panic.
fn whole_secs(v: u64) -> Duration {
    super::seconds(v.max(1) as f64)
}

/// Milliseconds from configuration (at least one), capped likewise.
fn millis(v: u64) -> Duration {
    super::seconds(v.max(1) as f64 / 1000.0)
}

/// Longest `wait` of a Consul blocking query: Consul caps it at 10 minutes itself.
const CONSUL_WAIT_MAX: u64 = 600;

/// `timeout: {connect, send, read}` in milliseconds, as registries take it in APISIX.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMsTimeout {
    connect: Option<u64>,
    send: Option<u64>,
    read: Option<u64>,
    wait: Option<u64>,
}

/// Parses the `discovery` map of `config.yaml`.
pub fn parse(file: &str, map: &Map<String, Value>, ipv6: bool, errs: &mut Errors) -> DiscoveryConfig {
    let mut out = DiscoveryConfig::default();
    for (kind, v) in map {
        let path = join("discovery", kind);
        let mut v = v.clone();
        if let Some(d) = parse_dump(file, &mut v, &path, errs) {
            out.dumps.push((kind.clone(), d));
        }
        let v = &v;
        match kind.as_str() {
            "dns" => out.dns = parse_dns(file, v, &path, ipv6, errs),
            "nacos" => out.nacos = parse_nacos(v, &path, errs),
            "consul" => out.consul = parse_consul(v, &path, errs),
            "eureka" => out.eureka = parse_eureka(v, &path, errs),
            "kubernetes" => out.kubernetes = parse_kubernetes(v, &path, errs),
            "consul_kv" | "tars" => {
                errs.add(path, "unsupported by Strait: this discovery backend is not implemented yet")
            }
            other => errs.add(path, format!("unknown discovery type {other:?}")),
        }
    }
    out
}

fn parse_dns(file: &str, v: &Value, path: &str, ipv6: bool, errs: &mut Errors) -> Option<DnsOptions> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        servers: Option<Vec<String>>,
        resolv_conf: Option<String>,
        order: Option<Vec<String>>,
        timeout: Option<f64>,
    }
    let r: Raw = decode(v, path, errs)?;
    let mut opts = DnsOptions { ipv6, ..DnsOptions::default() };
    match (&r.servers, &r.resolv_conf) {
        (Some(_), Some(_)) | (None, None) => {
            errs.add(path, "set exactly one of servers or resolv_conf");
            return None;
        }
        (Some(list), None) => {
            if list.is_empty() {
                errs.add(join(path, "servers"), "must list at least one server");
            }
            for (i, s) in list.iter().enumerate() {
                match parse_host_port(s, 53) {
                    Some(a) => opts.servers.push(a),
                    None => {
                        errs.add(index(&join(path, "servers"), i), format!("expected ip[:port], found {s:?}"))
                    }
                }
            }
        }
        (None, Some(p)) => {
            let full = resolve_relative(file, p);
            match std::fs::read_to_string(&full) {
                Ok(t) => opts.resolv_conf = Some(t),
                Err(e) => errs.add(join(path, "resolv_conf"), format!("cannot read {}: {e}", full.display())),
            }
        }
    }
    if let Some(order) = &r.order {
        let mut kinds = Vec::new();
        for (i, s) in order.iter().enumerate() {
            match RecordKind::parse(s) {
                Some(k) if !kinds.contains(&k) => kinds.push(k),
                Some(_) => errs.add(index(&join(path, "order"), i), format!("duplicate {s:?}")),
                None => errs.add(
                    index(&join(path, "order"), i),
                    format!("must be one of last, SRV, A, AAAA, CNAME; not {s:?}"),
                ),
            }
        }
        if kinds.is_empty() {
            errs.add(join(path, "order"), "must not be empty");
        }
        opts.order = kinds;
    }
    if let Some(t) = r.timeout {
        if t > 0.0 && t.is_finite() {
            opts.timeout = super::seconds(t);
        } else {
            errs.add(join(path, "timeout"), "must be a positive number of seconds");
        }
    }
    Some(opts)
}

fn parse_nacos(v: &Value, path: &str, errs: &mut Errors) -> Option<NacosOptions> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        host: Vec<String>,
        prefix: Option<String>,
        fetch_interval: Option<u64>,
        weight: Option<u32>,
        timeout: Option<RawMsTimeout>,
        access_key: Option<String>,
        secret_key: Option<String>,
    }
    let r: Raw = decode(v, path, errs)?;
    let mut hosts = Vec::new();
    if r.host.is_empty() {
        errs.add(join(path, "host"), "must list at least one host");
    }
    for (i, h) in r.host.iter().enumerate() {
        match NacosHost::parse(h) {
            Ok(h) => hosts.push(h),
            Err(e) => errs.add(index(&join(path, "host"), i), e),
        }
    }
    let prefix = r.prefix.unwrap_or_else(|| "/nacos/v1/".into());
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        errs.add(join(path, "prefix"), "must start and end with /");
    }
    let t = r.timeout.unwrap_or_default();
    if t.wait.is_some() {
        errs.add(join(&join(path, "timeout"), "wait"), "unknown key");
    }
    let ak_sk = match (r.access_key.filter(|s| !s.is_empty()), r.secret_key.filter(|s| !s.is_empty())) {
        (Some(a), Some(s)) => (Some(a), Some(s)),
        (None, None) => (None, None),
        _ => {
            errs.add(path, "access_key and secret_key go together");
            (None, None)
        }
    };
    let _ = t.send;
    Some(NacosOptions {
        hosts,
        prefix,
        fetch_interval: whole_secs(r.fetch_interval.unwrap_or(30)),
        weight: r.weight.unwrap_or(100),
        connect_timeout: millis(t.connect.unwrap_or(2000)),
        read_timeout: millis(t.read.unwrap_or(5000)),
        access_key: ak_sk.0,
        secret_key: ak_sk.1,
        cache_dir: std::env::temp_dir().join(format!("strait-nacos-{}", std::process::id())),
    })
}

fn parse_consul(v: &Value, path: &str, errs: &mut Errors) -> Option<ConsulOptions> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawDefault {
        host: String,
        port: u16,
        metadata: Option<Map<String, Value>>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        servers: Vec<String>,
        token: Option<String>,
        fetch_interval: Option<u64>,
        keepalive: Option<bool>,
        weight: Option<u32>,
        timeout: Option<RawMsTimeout>,
        sort_type: Option<String>,
        skip_services: Option<Vec<String>>,
        default_service: Option<RawDefault>,
        shared_size: Option<String>,
    }
    let r: Raw = decode(v, path, errs)?;
    let mut servers = Vec::new();
    if r.servers.is_empty() {
        errs.add(join(path, "servers"), "must list at least one server");
    }
    for (i, s) in r.servers.iter().enumerate() {
        match strait_discovery::http::Url::parse(s) {
            Ok(u) => servers.push(u),
            Err(e) => errs.add(index(&join(path, "servers"), i), format!("{s:?}: {e}")),
        }
    }
    if let Some(t) = &r.sort_type
        && !["origin", "host_sort", "port_sort", "combine_sort"].contains(&t.as_str())
    {
        errs.add(
            join(path, "sort_type"),
            format!("must be origin, host_sort, port_sort or combine_sort; not {t:?}"),
        );
    }
    let _ = r.shared_size;
    let t = r.timeout.unwrap_or_default();
    let default_service = r.default_service.and_then(|d| match d.host.parse::<std::net::IpAddr>() {
        Ok(_) => {
            Some(strait_discovery::consul::default_service(&d.host, d.port, d.metadata.unwrap_or_default()))
        }
        Err(_) => {
            errs.add(join(&join(path, "default_service"), "host"), "must be an IP address");
            None
        }
    });
    Some(ConsulOptions {
        servers,
        token: r.token.filter(|t| !t.is_empty()),
        keepalive: r.keepalive.unwrap_or(true),
        fetch_interval: whole_secs(r.fetch_interval.unwrap_or(3)),
        weight: r.weight.unwrap_or(1).max(1),
        connect_timeout: millis(t.connect.unwrap_or(2000)),
        read_timeout: millis(t.read.unwrap_or(2000)),
        wait: whole_secs(t.wait.unwrap_or(60).min(CONSUL_WAIT_MAX)),
        skip_services: r.skip_services.unwrap_or_default(),
        default_service,
    })
}

fn parse_eureka(v: &Value, path: &str, errs: &mut Errors) -> Option<EurekaOptions> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        host: Vec<String>,
        prefix: Option<String>,
        fetch_interval: Option<u64>,
        weight: Option<u32>,
        timeout: Option<RawMsTimeout>,
    }
    let r: Raw = decode(v, path, errs)?;
    let mut hosts = Vec::new();
    if r.host.is_empty() {
        errs.add(join(path, "host"), "must list at least one host");
    }
    for (i, h) in r.host.iter().enumerate() {
        match NacosHost::parse(h) {
            Ok(h) => hosts.push(h),
            Err(e) => errs.add(index(&join(path, "host"), i), e),
        }
    }
    let prefix = r.prefix.unwrap_or_else(|| "/eureka/".into());
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        errs.add(join(path, "prefix"), "must start and end with /");
    }
    let t = r.timeout.unwrap_or_default();
    Some(EurekaOptions {
        hosts,
        prefix,
        fetch_interval: whole_secs(r.fetch_interval.unwrap_or(30)),
        weight: r.weight.unwrap_or(100),
        connect_timeout: millis(t.connect.unwrap_or(2000)),
        read_timeout: millis(t.read.unwrap_or(5000)),
    })
}

fn parse_kubernetes(v: &Value, path: &str, errs: &mut Errors) -> Option<Vec<ClusterOptions>> {
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RawService {
        schema: Option<String>,
        host: Option<String>,
        port: Option<Value>,
        ssl_verify: Option<bool>,
    }
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RawClient {
        token: Option<String>,
        token_file: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RawNs {
        equal: Option<String>,
        not_equal: Option<String>,
        #[serde(rename = "match")]
        matches: Option<Vec<String>>,
        not_match: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        id: Option<String>,
        service: Option<RawService>,
        client: Option<RawClient>,
        namespace_selector: Option<RawNs>,
        label_selector: Option<String>,
        default_weight: Option<u32>,
        watch_endpoint_slices: Option<bool>,
        shared_size: Option<String>,
    }
    let items: Vec<(String, &Value, bool)> = match v {
        Value::Array(a) => a.iter().enumerate().map(|(i, x)| (index(path, i), x, true)).collect(),
        other => vec![(path.to_string(), other, false)],
    };
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (p, item, multi) in items {
        let Some(r) = decode::<Raw>(item, &p, errs) else { continue };
        let _ = r.shared_size;
        let id = match (&r.id, multi) {
            (Some(id), true) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    errs.add(join(&p, "id"), "must match ^[a-z0-9]{1,64}$");
                }
                if !ids.insert(id.clone()) {
                    errs.add(join(&p, "id"), format!("duplicate id {id:?}"));
                }
                Some(id.clone())
            }
            (None, true) => {
                errs.add(join(&p, "id"), "required when several clusters are listed");
                None
            }
            (Some(_), false) => {
                errs.add(join(&p, "id"), "only in the list form (several clusters)");
                None
            }
            (None, false) => None,
        };
        let svc = r.service.unwrap_or_default();
        let schema = svc.schema.unwrap_or_else(|| "https".into());
        let host = svc.host.or_else(|| std::env::var("KUBERNETES_SERVICE_HOST").ok());
        let port = match svc.port {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s,
            None => std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_default(),
            Some(_) => String::new(),
        };
        if svc.ssl_verify == Some(true) {
            errs.add(
                join(&join(&p, "service"), "ssl_verify"),
                "unsupported by Strait: API server certificates are not verified",
            );
        }
        let Some(host) = host.filter(|h| !h.is_empty()) else {
            errs.add(join(&join(&p, "service"), "host"), "required (or KUBERNETES_SERVICE_HOST)");
            continue;
        };
        let api = match strait_discovery::http::Url::parse(&format!("{schema}://{host}:{port}")) {
            Ok(u) => u,
            Err(e) => {
                errs.add(join(&p, "service"), format!("invalid API address: {e}"));
                continue;
            }
        };
        let client = r.client.unwrap_or_default();
        let token = match (client.token, client.token_file) {
            (Some(t), None) => Token::Literal(t),
            (None, Some(f)) => Token::File(f.into()),
            (None, None) => Token::File("/var/run/secrets/kubernetes.io/serviceaccount/token".into()),
            (Some(_), Some(_)) => {
                errs.add(join(&p, "client"), "set either token or token_file");
                Token::None
            }
        };
        let ns = r.namespace_selector.unwrap_or_default();
        let namespaces = NamespaceSelector {
            equal: ns.equal,
            not_equal: ns.not_equal,
            matches: ns.matches.unwrap_or_default(),
            not_matches: ns.not_match.unwrap_or_default(),
        };
        for (i, re) in namespaces.matches.iter().chain(&namespaces.not_matches).enumerate() {
            if regex::Regex::new(re).is_err() {
                errs.add(index(&join(&p, "namespace_selector"), i), format!("invalid regex {re:?}"));
            }
        }
        out.push(ClusterOptions {
            id,
            api,
            token,
            namespaces,
            label_selector: r.label_selector,
            default_weight: r.default_weight.unwrap_or(50),
            endpoint_slices: r.watch_endpoint_slices.unwrap_or(false),
        });
    }
    Some(out)
}

/// Options of the global resolver for hostnames in static nodes.
pub fn global_resolver(
    servers: &[SocketAddr],
    valid: Option<Duration>,
    timeout: Duration,
    ipv6: bool,
    search: bool,
) -> DnsOptions {
    DnsOptions {
        servers: servers.to_vec(),
        resolv_conf: None,
        order: vec![RecordKind::A, RecordKind::Aaaa],
        timeout,
        ttl_override: valid,
        hosts_file: true,
        ipv6,
        search,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::node::NodeConfig;

    /// Values past any timer's reach are taken as the longest one, not panics later (a
    /// Consul `wait` past Consul's own 10 minutes as 10 minutes).
    #[test]
    fn huge_intervals_and_timeouts_are_capped() {
        let huge = "18446744073709551615";
        let yaml = format!(
            "discovery:\n  consul:\n    servers: [\"http://127.0.0.1:8500\"]\n    fetch_interval: {huge}\n    timeout: {{connect: {huge}, read: {huge}, wait: {huge}}}\n  nacos:\n    host: [\"http://127.0.0.1:8848\"]\n    fetch_interval: {huge}\n  eureka:\n    host: [\"http://127.0.0.1:8761\"]\n    fetch_interval: {huge}\n    timeout: {{connect: {huge}, read: {huge}}}\n"
        );
        let node = NodeConfig::parse("config.yaml", &yaml, |_| None).unwrap();
        let d = &node.discovery_config;
        let consul = d.consul.as_ref().unwrap();
        assert_eq!(consul.wait, Duration::from_secs(600));
        let longest = crate::config::seconds(f64::MAX);
        assert_eq!(consul.fetch_interval, longest);
        assert_eq!(consul.read_timeout, longest);
        // What the blocking query's read timeout adds up to, and a timer at it, hold.
        let read = consul.wait + consul.wait / 16 + consul.read_timeout;
        assert!(std::time::Instant::now().checked_add(read).is_some());
        assert_eq!(d.nacos.as_ref().unwrap().fetch_interval, longest);
        assert_eq!(d.eureka.as_ref().unwrap().connect_timeout, longest);
        assert!(std::time::Instant::now().checked_add(longest * 2).is_some());
    }
}
