//! `discovery:` in `config.yaml`: one validated entry per registry type.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use strait_discovery::dns::{DnsOptions, RecordKind};

use super::Errors;
use super::node::{parse_host_port, resolve_relative};
use super::value::{decode, index, join};

/// Validated discovery settings.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    pub dns: Option<DnsOptions>,
}

/// Parses the `discovery` map of `config.yaml`.
pub fn parse(file: &str, map: &Map<String, Value>, ipv6: bool, errs: &mut Errors) -> DiscoveryConfig {
    let mut out = DiscoveryConfig::default();
    for (kind, v) in map {
        let path = join("discovery", kind);
        match kind.as_str() {
            "dns" => out.dns = parse_dns(file, v, &path, ipv6, errs),
            "consul" | "consul_kv" | "nacos" | "eureka" | "kubernetes" | "tars" => {
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
