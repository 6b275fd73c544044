//! `conf/config.yaml`: listeners, control API, TLS trust, DNS resolver, discovery backends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::raw::{RawApisix, RawNodeConfig};
use super::value::{decode, index, join, kind, reject_unsupported};
use super::{ConfigErrors, Errors, parse_yaml, read_file, substitute_env};

/// An HTTP listener (`apisix.node_listen` or `apisix.ssl.listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    /// Serve HTTP/2 as well as HTTP/1.1 (h2c by preface on plain ports, ALPN on TLS ports).
    pub http2: bool,
}

/// A TCP stream listener (`apisix.stream_proxy.tcp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamListen {
    pub addr: SocketAddr,
    /// Terminate TLS with the `ssls` certificates.
    pub tls: bool,
    /// Expect a PROXY protocol header from the client side.
    pub proxy_protocol: bool,
    /// Send a PROXY protocol header to the node.
    pub proxy_protocol_to_upstream: bool,
    /// Which PROXY protocol version to send (1, as nginx and APISIX do, or 2).
    pub proxy_protocol_version: u8,
}

/// Which proxies run (`apisix.proxy_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Http,
    Stream,
    Both,
}

impl ProxyMode {
    pub fn http(self) -> bool {
        matches!(self, ProxyMode::Http | ProxyMode::Both)
    }
    pub fn stream(self) -> bool {
        matches!(self, ProxyMode::Stream | ProxyMode::Both)
    }
}

/// Validated node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Path of the file, for messages.
    pub file: String,
    pub proxy_mode: ProxyMode,
    pub http: Vec<Listen>,
    pub tls: Vec<Listen>,
    pub stream: Vec<StreamListen>,
    /// Control API address (`apisix.control`), `None` when disabled.
    pub control: Option<SocketAddr>,
    /// Extra trust anchors (PEM) for verifying upstream certificates.
    pub trusted_ca_pem: Option<String>,
    /// Certificate used for TLS clients that send no SNI.
    pub fallback_sni: Option<String>,
    /// Name servers for hostnames in static nodes; empty means `/etc/resolv.conf`.
    pub dns_resolver: Vec<SocketAddr>,
    /// Overrides every record TTL when set (`apisix.dns_resolver_valid`).
    pub dns_resolver_valid: Option<Duration>,
    pub resolver_timeout: Duration,
    /// How long a client may take to send request headers.
    pub client_header_timeout: Duration,
    /// How long a client may send nothing while a request body is read from it
    /// (`nginx_config.http.client_body_timeout`, nginx's: between two reads).
    pub client_body_timeout: Duration,
    /// How long an idle keep-alive client connection stays open.
    pub keepalive_timeout: Duration,
    /// How long a write to a client may make no progress before the connection is closed
    /// (`nginx_config.http.send_timeout`, nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// `discovery:` section as written (resources check which types exist).
    pub discovery: Map<String, Value>,
    /// `discovery:` section, validated.
    pub discovery_config: super::discovery::DiscoveryConfig,
    /// `apisix.disable_upstream_healthcheck`.
    pub disable_healthcheck: bool,
    /// `apisix.enable_ipv6`.
    pub enable_ipv6: bool,
}

const APISIX_UNSUPPORTED: &[&str] = &[
    "enable_dev_mode",
    "show_upstream_status_in_response_header",
    "enable_http2",
    "enable_server_tokens",
    "extra_lua_path",
    "extra_lua_cpath",
    "proxy_cache",
    "delete_uri_tail_slash",
    "normalize_uri_like_servlet",
    "router",
    "data_encryption",
    "events",
    "tracing",
    "lru",
    "disable_sync_configuration_during_start",
    "config_center",
];

const TOP_UNSUPPORTED: &[&str] =
    &["plugins", "stream_plugins", "plugin_attr", "graphql", "ext-plugin", "wasm", "xrpc", "etcd"];

const SSL_UNSUPPORTED: &[&str] =
    &["ssl_protocols", "ssl_ciphers", "ssl_session_tickets", "ssl_session_timeout", "key_encrypt_salt"];

const NGINX_HTTP_UNSUPPORTED: &[&str] = &[
    "enable_access_log",
    "access_log",
    "access_log_format",
    "access_log_format_escape",
    "client_max_body_size",
    "underscores_in_headers",
    "real_ip_header",
    "real_ip_recursive",
    "real_ip_from",
    "custom_lua_shared_dict",
    "proxy_ssl_server_name",
    "upstream",
    "charset",
    "variables_hash_max_size",
    "lua_shared_dict",
];

const NGINX_UNSUPPORTED: &[&str] = &[
    "user",
    "error_log",
    "error_log_level",
    "worker_cpu_affinity",
    "worker_rlimit_nofile",
    "worker_shutdown_timeout",
    "max_pending_timers",
    "max_running_timers",
    "event",
    "meta",
    "stream",
    "main_configuration_snippet",
    "http_configuration_snippet",
    "http_server_configuration_snippet",
    "http_server_location_configuration_snippet",
    "http_admin_configuration_snippet",
    "http_end_configuration_snippet",
    "stream_configuration_snippet",
    "envs",
];

impl NodeConfig {
    /// Reads and validates `config.yaml` at `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigErrors> {
        let text = read_file(path)?;
        Self::parse(&path.display().to_string(), &text, |k| std::env::var(k).ok())
    }

    /// Validates config text; `file` names it in errors.
    pub fn parse(
        file: &str,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<NodeConfig, ConfigErrors> {
        let mut errs = Errors::new(file);
        let text = match substitute_env(text, env) {
            Ok(t) => t,
            Err(e) => {
                errs.add("", e);
                return errs.into_result(NodeConfig::defaults(file));
            }
        };
        let mut tree = match parse_yaml(&text) {
            Ok(t) => t,
            Err(e) => {
                errs.add("", e);
                return errs.into_result(NodeConfig::defaults(file));
            }
        };
        if !tree.is_object() {
            errs.add("", format!("expected a map at the top level, found {}", kind(&tree)));
            return errs.into_result(NodeConfig::defaults(file));
        }
        reject_unsupported(&mut tree, "", TOP_UNSUPPORTED, &mut errs);
        if let Some(a) = tree.get_mut("apisix") {
            reject_unsupported(a, "apisix", APISIX_UNSUPPORTED, &mut errs);
            if let Some(s) = a.get_mut("ssl") {
                reject_unsupported(s, "apisix.ssl", SSL_UNSUPPORTED, &mut errs);
            }
        }
        if let Some(n) = tree.get_mut("nginx_config") {
            reject_unsupported(n, "nginx_config", NGINX_UNSUPPORTED, &mut errs);
            if let Some(h) = n.get_mut("http") {
                reject_unsupported(h, "nginx_config.http", NGINX_HTTP_UNSUPPORTED, &mut errs);
            }
        }
        let Some(raw) = decode::<RawNodeConfig>(&tree, "", &mut errs) else {
            return errs.into_result(NodeConfig::defaults(file));
        };
        let cfg = validate(file, raw, &mut errs);
        errs.into_result(cfg)
    }

    fn defaults(file: &str) -> NodeConfig {
        NodeConfig {
            file: file.to_string(),
            proxy_mode: ProxyMode::Http,
            http: vec![Listen { addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9080)), http2: true }],
            tls: vec![],
            stream: vec![],
            control: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9090))),
            trusted_ca_pem: None,
            fallback_sni: None,
            dns_resolver: vec![],
            dns_resolver_valid: None,
            resolver_timeout: Duration::from_secs(5),
            client_header_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            // APISIX's config-default.yaml.
            send_timeout: Duration::from_secs(10),
            discovery: Map::new(),
            discovery_config: Default::default(),
            disable_healthcheck: false,
            enable_ipv6: false,
        }
    }
}

fn validate(file: &str, raw: RawNodeConfig, errs: &mut Errors) -> NodeConfig {
    let mut cfg = NodeConfig::defaults(file);
    let a: RawApisix = raw.apisix.unwrap_or_default();

    if let Some(d) = &raw.deployment {
        match d.role.as_deref() {
            None | Some("data_plane") => {}
            Some("traditional") | Some("control_plane") => errs.add(
                "deployment.role",
                "unsupported by Strait: only `data_plane` with `config_provider: yaml` (standalone) is implemented",
            ),
            Some(other) => errs.add("deployment.role", format!("unknown role {other:?}")),
        }
        if let Some(p) = d.role_data_plane.as_ref().and_then(|r| r.config_provider.as_deref()) {
            match p {
                "yaml" => {}
                "json" | "etcd" => errs.add(
                    "deployment.role_data_plane.config_provider",
                    format!("unsupported by Strait: {p:?} (only yaml)"),
                ),
                other => errs.add(
                    "deployment.role_data_plane.config_provider",
                    format!("unknown config provider {other:?}"),
                ),
            }
        }
    }

    cfg.enable_ipv6 = a.enable_ipv6.unwrap_or(false);
    if a.enable_admin == Some(true) {
        errs.add(
            "apisix.enable_admin",
            "unsupported by Strait: there is no Admin API; resources come from apisix.yaml",
        );
    }
    cfg.disable_healthcheck = a.disable_upstream_healthcheck.unwrap_or(false);

    cfg.proxy_mode = match a.proxy_mode.as_deref() {
        None if a.stream_proxy.is_some() => ProxyMode::Both,
        None | Some("http") => ProxyMode::Http,
        Some("stream") => ProxyMode::Stream,
        Some("http&stream") => ProxyMode::Both,
        Some(other) => {
            errs.add("apisix.proxy_mode", format!("must be http, stream or http&stream, not {other:?}"));
            ProxyMode::Http
        }
    };

    if let Some(v) = &a.node_listen {
        cfg.http = listen_list(v, "apisix.node_listen", cfg.enable_ipv6, errs);
    } else if cfg.enable_ipv6 {
        cfg.http.push(Listen { addr: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 9080)), http2: true });
    }
    if !cfg.proxy_mode.http() {
        cfg.http.clear();
    }

    if let Some(ssl) = &a.ssl {
        let enabled = ssl.enable.unwrap_or(ssl.listen.is_some());
        if enabled && cfg.proxy_mode.http() {
            cfg.tls = match &ssl.listen {
                Some(v) => listen_list(v, "apisix.ssl.listen", cfg.enable_ipv6, errs),
                None => vec![Listen { addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9443)), http2: true }],
            };
        }
        if let Some(p) = &ssl.ssl_trusted_certificate {
            let path = resolve_relative(file, p);
            match std::fs::read_to_string(&path) {
                Ok(t) => match strait_protocols::tls::parse_certs(&t) {
                    Ok(_) => cfg.trusted_ca_pem = Some(t),
                    Err(e) => {
                        errs.add("apisix.ssl.ssl_trusted_certificate", format!("{}: {e}", path.display()))
                    }
                },
                Err(e) => errs.add(
                    "apisix.ssl.ssl_trusted_certificate",
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
        }
        cfg.fallback_sni = ssl.fallback_sni.clone();
    }

    if a.enable_control == Some(false) {
        cfg.control = None;
    } else if let Some(c) = &a.control {
        let ip = match c.ip.as_deref() {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(s) => match s.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    errs.add("apisix.control.ip", format!("not an IP address: {s:?}"));
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                }
            },
        };
        cfg.control = Some(SocketAddr::new(ip, c.port.unwrap_or(9090)));
    }

    if let Some(sp) = &a.stream_proxy {
        if sp.udp.as_ref().is_some_and(|u| !u.is_empty()) {
            errs.add("apisix.stream_proxy.udp", "unsupported by Strait: UDP proxying is not implemented");
        }
        let pp_default = a.proxy_protocol.as_ref().and_then(|p| p.enable_tcp_pp).unwrap_or(false);
        let pp_up_default =
            a.proxy_protocol.as_ref().and_then(|p| p.enable_tcp_pp_to_upstream).unwrap_or(false);
        if cfg.proxy_mode.stream() {
            for (i, item) in sp.tcp.iter().flatten().enumerate() {
                let path = index("apisix.stream_proxy.tcp", i);
                if let Some(l) = stream_listen(item, &path, pp_default, pp_up_default, errs) {
                    cfg.stream.push(l);
                }
            }
        }
    }
    if let Some(pp) = &a.proxy_protocol {
        if pp.listen_http_port.is_some() {
            errs.add("apisix.proxy_protocol.listen_http_port", "unsupported by Strait");
        }
        if pp.listen_https_port.is_some() {
            errs.add("apisix.proxy_protocol.listen_https_port", "unsupported by Strait");
        }
    }

    if let Some(list) = &a.dns_resolver {
        for (i, s) in list.iter().enumerate() {
            match parse_host_port(s, 53) {
                Some(addr) => cfg.dns_resolver.push(addr),
                None => errs.add(
                    index("apisix.dns_resolver", i),
                    format!("not an IP address with optional port: {s:?}"),
                ),
            }
        }
    }
    cfg.dns_resolver_valid = a.dns_resolver_valid.map(Duration::from_secs);
    if let Some(t) = a.resolver_timeout {
        if t > 0.0 && t.is_finite() {
            cfg.resolver_timeout = Duration::from_secs_f64(t);
        } else {
            errs.add("apisix.resolver_timeout", "must be a positive number of seconds");
        }
    }

    if let Some(n) = &raw.nginx_config {
        if let Some(w) = &n.worker_processes
            && !(w.as_str() == Some("auto") || w.as_u64().is_some_and(|n| n > 0))
        {
            errs.add("nginx_config.worker_processes", "must be `auto` or a positive integer");
        }
        if let Some(h) = &n.http {
            if let Some(v) = &h.client_header_timeout {
                match parse_duration(v) {
                    Some(d) => cfg.client_header_timeout = d,
                    None => {
                        errs.add("nginx_config.http.client_header_timeout", "expected a duration like 60s")
                    }
                }
            }
            if let Some(v) = &h.keepalive_timeout {
                match parse_duration(v) {
                    Some(d) => cfg.keepalive_timeout = d,
                    None => errs.add("nginx_config.http.keepalive_timeout", "expected a duration like 60s"),
                }
            }
            if let Some(v) = &h.send_timeout {
                match parse_duration(v) {
                    Some(d) if !d.is_zero() => cfg.send_timeout = d,
                    _ => errs.add("nginx_config.http.send_timeout", "expected a positive duration like 10s"),
                }
            }
            if let Some(v) = &h.client_body_timeout {
                match parse_duration(v) {
                    Some(d) if !d.is_zero() => cfg.client_body_timeout = d,
                    _ => errs.add(
                        "nginx_config.http.client_body_timeout",
                        "expected a positive duration like 60s",
                    ),
                }
            }
        }
    }

    cfg.discovery = raw.discovery.unwrap_or_default();
    cfg.discovery_config = super::discovery::parse(file, &cfg.discovery, cfg.enable_ipv6, errs);

    let mut seen = std::collections::HashSet::new();
    for l in cfg
        .http
        .iter()
        .map(|l| l.addr)
        .chain(cfg.tls.iter().map(|l| l.addr))
        .chain(cfg.stream.iter().map(|l| l.addr))
    {
        if l.port() != 0 && !seen.insert(l) {
            errs.add("apisix", format!("address {l} is used by two listeners"));
        }
    }
    cfg
}

/// Resolves `p` relative to the directory of the config file.
pub fn resolve_relative(file: &str, p: &str) -> std::path::PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    Path::new(file).parent().map(|d| d.join(path)).unwrap_or_else(|| path.to_path_buf())
}

/// `9080`, `[9080, 9081]`, `["127.0.0.1:9080"]` or `[{ip, port, enable_http2}]`.
fn listen_list(v: &Value, path: &str, ipv6: bool, errs: &mut Errors) -> Vec<Listen> {
    let mut out = Vec::new();
    let items: Vec<(String, &Value)> = match v {
        Value::Array(a) => a.iter().enumerate().map(|(i, x)| (index(path, i), x)).collect(),
        other => vec![(path.to_string(), other)],
    };
    for (p, item) in items {
        match item {
            Value::Number(n) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                Some(port) => {
                    out.push(Listen { addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), http2: true });
                    if ipv6 {
                        out.push(Listen {
                            addr: SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
                            http2: true,
                        });
                    }
                }
                None => errs.add(p, "port must be 0..65535"),
            },
            Value::String(s) => match parse_host_port(s, 0) {
                Some(addr) if addr.port() != 0 || s.ends_with(":0") => out.push(Listen { addr, http2: true }),
                _ => errs.add(p, format!("expected ip:port, found {s:?}")),
            },
            Value::Object(m) => {
                for k in m.keys() {
                    if !["ip", "port", "enable_http2", "enable_http3"].contains(&k.as_str()) {
                        errs.add(join(&p, k), "unknown key");
                    }
                }
                if m.get("enable_http3").and_then(Value::as_bool) == Some(true) {
                    errs.add(join(&p, "enable_http3"), "unsupported by Strait: HTTP/3 is not implemented");
                }
                let ip = match m.get("ip") {
                    None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    Some(Value::String(s)) => match s.trim_matches(|c| c == '[' || c == ']').parse() {
                        Ok(ip) => ip,
                        Err(_) => {
                            errs.add(join(&p, "ip"), format!("not an IP address: {s:?}"));
                            continue;
                        }
                    },
                    Some(other) => {
                        errs.add(join(&p, "ip"), format!("expected a string, found {}", kind(other)));
                        continue;
                    }
                };
                let port = match m.get("port").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok()) {
                    Some(port) => port,
                    None => {
                        errs.add(join(&p, "port"), "required, 0..65535");
                        continue;
                    }
                };
                let http2 = match m.get("enable_http2") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        errs.add(
                            join(&p, "enable_http2"),
                            format!("expected a boolean, found {}", kind(other)),
                        );
                        true
                    }
                };
                out.push(Listen { addr: SocketAddr::new(ip, port), http2 });
            }
            other => errs.add(p, format!("expected a port, ip:port or a map, found {}", kind(other))),
        }
    }
    out
}

fn stream_listen(
    v: &Value,
    path: &str,
    pp_default: bool,
    pp_up_default: bool,
    errs: &mut Errors,
) -> Option<StreamListen> {
    let addr_of = |v: &Value, p: &str, errs: &mut Errors| -> Option<SocketAddr> {
        match v {
            Value::Number(n) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                Some(port) => Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
                None => {
                    errs.add(p, "port must be 0..65535");
                    None
                }
            },
            Value::String(s) if s.contains('-') && !s.contains(':') => {
                errs.add(p, "unsupported by Strait: port ranges");
                None
            }
            Value::String(s) => match s.parse::<u16>() {
                Ok(port) => Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
                Err(_) => match parse_host_port(s, 0) {
                    Some(a) => Some(a),
                    None => {
                        errs.add(p, format!("expected a port or ip:port, found {s:?}"));
                        None
                    }
                },
            },
            other => {
                errs.add(p, format!("expected a port or ip:port, found {}", kind(other)));
                None
            }
        }
    };
    match v {
        Value::Object(m) => {
            for k in m.keys() {
                if !["addr", "tls", "proxy_protocol", "proxy_protocol_to_upstream", "proxy_protocol_version"]
                    .contains(&k.as_str())
                {
                    errs.add(join(path, k), "unknown key");
                }
            }
            let Some(a) = m.get("addr") else {
                errs.add(join(path, "addr"), "required");
                return None;
            };
            let addr = addr_of(a, &join(path, "addr"), errs)?;
            let flag = |k: &str, d: bool, errs: &mut Errors| match m.get(k) {
                None => d,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    errs.add(join(path, k), format!("expected a boolean, found {}", kind(other)));
                    d
                }
            };
            let version = match m.get("proxy_protocol_version") {
                None => 1,
                Some(v) => match v.as_u64() {
                    Some(n @ (1 | 2)) => n as u8,
                    _ => {
                        errs.add(join(path, "proxy_protocol_version"), "expected 1 or 2");
                        1
                    }
                },
            };
            Some(StreamListen {
                addr,
                tls: flag("tls", false, errs),
                proxy_protocol: flag("proxy_protocol", pp_default, errs),
                proxy_protocol_to_upstream: flag("proxy_protocol_to_upstream", pp_up_default, errs),
                proxy_protocol_version: version,
            })
        }
        other => addr_of(other, path, errs).map(|addr| StreamListen {
            addr,
            tls: false,
            proxy_protocol: pp_default,
            proxy_protocol_to_upstream: pp_up_default,
            proxy_protocol_version: 1,
        }),
    }
}

/// Parses `ip`, `ip:port`, `[v6]` or `[v6]:port`.
pub fn parse_host_port(s: &str, default_port: u16) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, default_port))
}

/// nginx durations: a number of seconds, or `500ms`, `60s`, `5m`, `1h`.
pub fn parse_duration(v: &Value) -> Option<Duration> {
    if let Some(n) = v.as_f64() {
        return (n >= 0.0 && n.is_finite()).then(|| Duration::from_secs_f64(n));
    }
    let s = v.as_str()?.trim();
    let (num, mul_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (s, 1000.0)
    };
    let n: f64 = num.trim().parse().ok()?;
    (n >= 0.0 && n.is_finite()).then(|| Duration::from_secs_f64(n * mul_ms / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigErrors> {
        NodeConfig::parse("conf/config.yaml", text, |_| None)
    }

    #[test]
    fn node_listen_forms() {
        let c = parse("apisix:\n  node_listen: 9080\n").unwrap();
        assert_eq!(c.http, vec![Listen { addr: "0.0.0.0:9080".parse().unwrap(), http2: true }]);
        let c = parse("apisix:\n  node_listen: [9080, 9081]\n").unwrap();
        assert_eq!(c.http.len(), 2);
        let c =
            parse("apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: 0\n      enable_http2: false\n")
                .unwrap();
        assert_eq!(c.http, vec![Listen { addr: "127.0.0.1:0".parse().unwrap(), http2: false }]);
    }

    #[test]
    fn errors_name_file_path_and_reason() {
        let e = parse("apisix:\n  node_listen: [{ip: nope, port: 1}]\n  bogus: 1\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("conf/config.yaml: apisix"), "{text}");
        assert!(text.contains("bogus"), "{text}");
        let e = parse("apisix:\n  node_listen: [{ip: nope, port: 1}]\n").unwrap_err();
        assert_eq!(e.0[0].path, "apisix.node_listen[0].ip");
    }

    #[test]
    fn client_body_timeout_defaults_to_apisix_and_must_be_positive() {
        let c = parse("apisix:\n  node_listen: 9080\n").unwrap();
        assert_eq!(c.client_body_timeout, Duration::from_secs(60));
        let c = parse("nginx_config:\n  http:\n    client_body_timeout: 2s\n").unwrap();
        assert_eq!(c.client_body_timeout, Duration::from_secs(2));
        for bad in ["0s", "later"] {
            let e = parse(&format!("nginx_config:\n  http:\n    client_body_timeout: {bad}\n")).unwrap_err();
            assert_eq!(e.0[0].path, "nginx_config.http.client_body_timeout", "{bad}");
        }
    }

    #[test]
    fn send_timeout_defaults_to_apisix_and_must_be_positive() {
        assert_eq!(parse("apisix:\n  node_listen: 9080\n").unwrap().send_timeout, Duration::from_secs(10));
        let c = parse("nginx_config:\n  http:\n    send_timeout: 1500ms\n").unwrap();
        assert_eq!(c.send_timeout, Duration::from_millis(1500));
        for bad in ["0s", "soon"] {
            let e = parse(&format!("nginx_config:\n  http:\n    send_timeout: {bad}\n")).unwrap_err();
            assert_eq!(e.0[0].path, "nginx_config.http.send_timeout", "{bad}");
        }
    }

    #[test]
    fn apisix_keys_not_implemented_say_unsupported() {
        let e = parse("apisix:\n  enable_dev_mode: false\nplugins:\n  - limit-count\n").unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| (e.path.as_str(), e.reason.as_str())).collect();
        assert!(paths.contains(&("plugins", "unsupported by Strait")), "{paths:?}");
        assert!(paths.contains(&("apisix.enable_dev_mode", "unsupported by Strait")), "{paths:?}");
    }

    #[test]
    fn stream_proxy_forms_and_mode() {
        let c = parse(
            "apisix:\n  proxy_mode: http&stream\n  stream_proxy:\n    tcp:\n      - 9100\n      - \"127.0.0.1:9101\"\n      - {addr: 9102, tls: true, proxy_protocol: true}\n",
        )
        .unwrap();
        assert_eq!(c.stream.len(), 3);
        assert!(c.stream[2].tls && c.stream[2].proxy_protocol);
        assert_eq!(c.stream[1].addr, "127.0.0.1:9101".parse().unwrap());
        let c = parse("apisix:\n  proxy_mode: stream\n  stream_proxy: {tcp: [9100]}\n").unwrap();
        assert!(c.http.is_empty());
    }

    #[test]
    fn control_defaults_and_overrides() {
        let c = parse("").unwrap();
        assert_eq!(c.control, Some("127.0.0.1:9090".parse().unwrap()));
        let c = parse("apisix:\n  enable_control: false\n").unwrap();
        assert_eq!(c.control, None);
        let c = parse("apisix:\n  control: {ip: 127.0.0.1, port: 0}\n").unwrap();
        assert_eq!(c.control, Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&Value::from("500ms")), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration(&Value::from("60s")), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration(&Value::from("2m")), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration(&Value::from(3)), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration(&Value::from("x")), None);
    }
}
