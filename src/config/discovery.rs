//! `discovery:` in `config.yaml`: one validated entry per registry type.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use strait_discovery::dns::{DnsOptions, RecordKind};
use strait_discovery::nacos::{NacosHost, NacosOptions};

use super::Errors;
use super::node::{parse_host_port, resolve_relative};
use super::value::{decode, index, join};

/// Validated discovery settings.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    pub dns: Option<DnsOptions>,
    pub nacos: Option<NacosOptions>,
}

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
        match kind.as_str() {
            "dns" => out.dns = parse_dns(file, v, &path, ipv6, errs),
            "nacos" => out.nacos = parse_nacos(v, &path, errs),
            "consul" | "consul_kv" | "eureka" | "kubernetes" | "tars" => {
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
            opts.timeout = Duration::from_secs_f64(t);
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
        fetch_interval: Duration::from_secs(r.fetch_interval.unwrap_or(30).max(1)),
        weight: r.weight.unwrap_or(100),
        connect_timeout: Duration::from_millis(t.connect.unwrap_or(2000).max(1)),
        read_timeout: Duration::from_millis(t.read.unwrap_or(5000).max(1)),
        access_key: ak_sk.0,
        secret_key: ak_sk.1,
        cache_dir: std::env::temp_dir().join(format!("strait-nacos-{}", std::process::id())),
    })
}

/// Options of the global resolver for hostnames in static nodes.
pub fn global_resolver(
    servers: &[SocketAddr],
    valid: Option<Duration>,
    timeout: Duration,
    ipv6: bool,
) -> DnsOptions {
    DnsOptions {
        servers: servers.to_vec(),
        resolv_conf: None,
        order: vec![RecordKind::A, RecordKind::Aaaa],
        timeout,
        ttl_override: valid,
        hosts_file: true,
        ipv6,
    }
}
