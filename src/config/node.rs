//! `conf/config.yaml`: listeners, control API, TLS trust, DNS resolver, discovery backends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::raw::{RawApisix, RawNodeConfig};
use super::value::{decode, index, join, kind};
use super::{ConfigErrors, Errors, parse_yaml, read_file, substitute_env};

/// An HTTP listener (`apisix.node_listen` or `apisix.ssl.listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    /// Serve HTTP/2 as well as HTTP/1.1 (h2c by preface on plain ports, ALPN on TLS ports).
    pub http2: bool,
    /// Every connection starts with a PROXY protocol header (`apisix.proxy_protocol.
    /// listen_http_port` / `listen_https_port`).
    pub proxy_protocol: bool,
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
    /// Whether the resolver for host names in nodes asks for AAAA records: `apisix.enable_ipv6`,
    /// with APISIX's default (on) when unset.
    pub resolver_ipv6: bool,
    /// `apisix.enable_resolv_search_opt` (default on): that resolver applies resolv.conf's
    /// `search` list.
    pub resolv_search: bool,
    /// TLS versions of TLS listeners, HTTP and stream (`apisix.ssl.ssl_protocols`).
    pub ssl_protocols: strait_protocols::tls::TlsVersions,
    /// How long a TLS session can be resumed (`apisix.ssl.ssl_session_timeout`, APISIX's default
    /// `10m`; `0` keeps none).
    pub ssl_session_timeout: Duration,
    /// Worker threads (`nginx_config.worker_processes`; `None`: `auto`, one per core).
    pub workers: Option<usize>,
    /// How long a stop waits for connections to finish
    /// (`nginx_config.worker_shutdown_timeout`; `None`: Strait's default).
    pub drain_timeout: Option<Duration>,
    /// APISIX settings accepted but not applied, by YAML path ([`Foreign`]).
    pub ignored: Vec<String>,
    /// `apisix.trusted_addresses`: clients whose `X-Forwarded-*` headers are kept (`None`: not
    /// set, APISIX's compatible default; see [`strait_protocols::http::ForwardTrust`]).
    pub trusted_addresses: Option<Vec<crate::route::ip::IpNet>>,
    /// nginx's realip module (`nginx_config.http.real_ip_*`, APISIX's defaults: `X-Real-IP`
    /// from `127.0.0.1`); `None` when no peer is trusted.
    pub real_ip: Option<crate::route::ip::RealIp>,
    /// `nginx_config.stream.real_ip_from`: L4 peers whose PROXY header names the client (by
    /// default nobody, as in APISIX: the peer stays the client).
    pub stream_real_ip_from: Vec<crate::route::ip::IpNet>,
    /// `nginx_config.event.worker_connections`: live connections per worker before it stops
    /// accepting (APISIX's default, 10620).
    pub worker_connections: usize,
    /// `apisix.show_upstream_status_in_response_header`: `X-APISIX-Upstream-Status` on every
    /// proxied answer (APISIX's default, `false`: on 5xx ones only).
    pub show_upstream_status: bool,
}

impl NodeConfig {
    /// How the forwarding headers of a client at `ip` are taken.
    pub fn forward_trust(&self, ip: IpAddr) -> strait_protocols::http::ForwardTrust {
        use strait_protocols::http::ForwardTrust;
        match &self.trusted_addresses {
            None => ForwardTrust::Default,
            Some(nets) if nets.iter().any(|n| n.contains(ip)) => ForwardTrust::Trusted,
            Some(_) => ForwardTrust::Untrusted,
        }
    }
}

/// APISIX's `nginx_config.http` realip defaults: `X-Real-IP`, not recursive, from `127.0.0.1`
/// (and `unix:`, which names no TCP peer).
fn default_real_ip() -> crate::route::ip::RealIp {
    crate::route::ip::RealIp {
        header: Some(http::HeaderName::from_static("x-real-ip")),
        recursive: false,
        from: crate::route::ip::IpNet::parse("127.0.0.1").into_iter().collect(),
    }
}

/// Reads `nginx_config.http.real_ip_header`, `real_ip_recursive` and `real_ip_from` over
/// APISIX's defaults.
fn parse_real_ip(h: &super::raw::RawNginxHttp, errs: &mut Errors) -> Option<crate::route::ip::RealIp> {
    let mut real = default_real_ip();
    if let Some(v) = &h.real_ip_header {
        const PATH: &str = "nginx_config.http.real_ip_header";
        match v.as_str().map(str::trim) {
            Some(t) if t.eq_ignore_ascii_case("proxy_protocol") => real.header = None,
            Some(t) => match http::HeaderName::from_bytes(t.as_bytes()) {
                Ok(name) if !t.is_empty() => real.header = Some(name),
                _ => errs.add(PATH, format!("not a header name: {t:?}")),
            },
            None => errs.add(PATH, format!("expected a header name, found {}", shown(v))),
        }
    }
    if let Some(v) = &h.real_ip_recursive {
        match v {
            Value::Bool(b) => real.recursive = *b,
            Value::String(t) if t.trim() == "on" => real.recursive = true,
            Value::String(t) if t.trim() == "off" => real.recursive = false,
            _ => errs.add(
                "nginx_config.http.real_ip_recursive",
                format!("expected on or off, found {}", shown(v)),
            ),
        }
    }
    if let Some(v) = &h.real_ip_from {
        real.from = ip_list(v, "nginx_config.http.real_ip_from", errs);
    }
    (!real.from.is_empty()).then_some(real)
}

/// A `real_ip_from` list (one entry or several): IPs and CIDRs, `unix:` (which names no TCP
/// peer) left out.
fn ip_list(v: &Value, path: &str, errs: &mut Errors) -> Vec<crate::route::ip::IpNet> {
    let list: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => Vec::new(),
        one => vec![one],
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        match item.as_str().map(str::trim) {
            // Strait listens on no Unix socket.
            Some("unix:") => {}
            Some(t) => match crate::route::ip::IpNet::parse(t) {
                Some(n) => out.push(n),
                None => errs.add(index(path, i), format!("not an IP address or CIDR: {t:?}")),
            },
            None => {
                errs.add(index(path, i), format!("expected an IP address or CIDR, found {}", shown(item)))
            }
        }
    }
    out
}

/// What Strait does with a `config.yaml` setting of APISIX's that it does not implement.
///
/// An APISIX user's `config.yaml` (often a copy of APISIX's `config.yaml.example`) sets many
/// things that only tune nginx, OpenResty or Lua, or that ask for APISIX's default behaviour.
/// Rejecting them would make every such file fail, and ignoring them silently would hide a
/// difference; so each is accepted, those with no effect in Strait are listed by `strait
/// validate` and logged at start ([`NodeConfig::ignored`]), and a value that asks for
/// something Strait does not do is an error.
#[derive(Debug, Clone, Copy)]
enum Foreign {
    /// Any value: nginx, OpenResty or Lua tuning (log files, shared dicts, timers, plugin
    /// loading), or a feature whose use elsewhere Strait rejects (a plugin on a route).
    Any,
    /// Only these values: APISIX's default (first), which is what Strait does (so it is not
    /// listed as ignored).
    Only(&'static [&'static str]),
    /// nginx configuration text injected into nginx.conf: only blank lines and `#` comments
    /// (what APISIX's example has).
    Snippet,
}

use Foreign::{Any, Only, Snippet};

/// The settings of [`Foreign`], by YAML path. A map's own entry comes after its keys', so that
/// it is only listed when something is left in it (see [`take_foreign`]).
const FOREIGN: &[(&str, Foreign)] = &[
    ("plugins", Any),
    ("stream_plugins", Any),
    ("plugin_attr", Any),
    ("graphql", Any),
    ("ext-plugin", Any),
    ("wasm", Any),
    ("xrpc", Any),
    ("etcd", Any),
    ("deployment.admin", Any),
    ("deployment.etcd", Any),
    // Their roles are errors (`deployment.role`); these only configure them.
    ("deployment.role_traditional", Any),
    ("deployment.role_control_plane", Any),
    ("apisix.enable_admin", Any),
    ("apisix.enable_dev_mode", Any),
    ("apisix.enable_server_tokens", Any),
    ("apisix.extra_lua_path", Any),
    ("apisix.extra_lua_cpath", Any),
    ("apisix.proxy_cache", Any),
    ("apisix.delete_uri_tail_slash", Only(&["false"])),
    ("apisix.normalize_uri_like_servlet", Only(&["false"])),
    ("apisix.match_uri_encoded_slash", Any),
    ("apisix.max_post_args_readable_size", Any),
    ("apisix.router.http", Only(&["radixtree_host_uri"])),
    ("apisix.router.ssl", Only(&["radixtree_sni"])),
    ("apisix.router", Any),
    ("apisix.data_encryption", Any),
    ("apisix.lru", Any),
    ("apisix.tracing", Any),
    ("apisix.disable_sync_configuration_during_start", Any),
    ("apisix.events", Any),
    // APISIX 2.x's switch to standalone mode.
    ("apisix.config_center", Only(&["yaml"])),
    ("apisix.worker_startup_time_threshold", Any),
    ("apisix.ssl.ssl_ciphers", Any),
    ("apisix.ssl.ssl_session_tickets", Only(&["false"])),
    ("apisix.ssl.key_encrypt_salt", Any),
    ("nginx_config.user", Any),
    ("nginx_config.error_log", Any),
    ("nginx_config.error_log_level", Any),
    ("nginx_config.enable_cpu_affinity", Any),
    ("nginx_config.worker_cpu_affinity", Any),
    ("nginx_config.worker_rlimit_nofile", Any),
    ("nginx_config.max_pending_timers", Any),
    ("nginx_config.max_running_timers", Any),
    ("nginx_config.event", Any),
    ("nginx_config.meta", Any),
    ("nginx_config.stream", Any),
    ("nginx_config.envs", Any),
    ("nginx_config.main_configuration_snippet", Snippet),
    ("nginx_config.http_configuration_snippet", Snippet),
    ("nginx_config.http_server_configuration_snippet", Snippet),
    ("nginx_config.http_server_location_configuration_snippet", Snippet),
    ("nginx_config.http_admin_configuration_snippet", Snippet),
    ("nginx_config.http_end_configuration_snippet", Snippet),
    ("nginx_config.stream_configuration_snippet", Snippet),
    ("nginx_config.http.enable_access_log", Any),
    ("nginx_config.http.access_log", Any),
    ("nginx_config.http.access_log_buffer", Any),
    ("nginx_config.http.access_log_format", Any),
    ("nginx_config.http.access_log_format_escape", Any),
    ("nginx_config.http.client_max_body_size", Only(&["0"])),
    ("nginx_config.http.underscores_in_headers", Only(&["on"])),
    ("nginx_config.http.custom_lua_shared_dict", Any),
    ("nginx_config.http.lua_shared_dict", Any),
    ("nginx_config.http.proxy_ssl_server_name", Only(&["true"])),
    // Strait's defaults for an upstream's `keepalive_pool` are these.
    ("nginx_config.http.upstream.keepalive", Only(&["320"])),
    ("nginx_config.http.upstream.keepalive_requests", Only(&["1000"])),
    ("nginx_config.http.upstream.keepalive_timeout", Only(&["60s", "60"])),
    ("nginx_config.http.upstream", Any),
    ("nginx_config.http.charset", Any),
    ("nginx_config.http.variables_hash_max_size", Any),
];

/// Takes the [`FOREIGN`] settings out of `tree`: the path of each accepted [`Foreign::Any`]
/// goes to `ignored`, each setting with a value Strait cannot honour to `errs`.
fn take_foreign(tree: &mut Value, errs: &mut Errors, ignored: &mut Vec<String>) {
    for &(path, rule) in FOREIGN {
        let Some(v) = take_path(tree, path) else { continue };
        match rule {
            Any if v.as_object().is_some_and(|m| m.is_empty()) => {}
            Any => ignored.push(path.to_string()),
            Only(values) => match scalar_text(&v) {
                // Strait does what this asks for: nothing to list.
                Some(t) if values.contains(&t.as_str()) => {}
                _ => errs.add(
                    path,
                    format!(
                        "unsupported by Strait: only {} is accepted (what Strait does), found {}",
                        values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(" or "),
                        shown(&v)
                    ),
                ),
            },
            Snippet => match scalar_text(&v) {
                Some(t) if t.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) => {}
                _ => errs.add(
                    path,
                    format!(
                        "unsupported by Strait: nginx configuration cannot be applied, found {}",
                        shown(&v)
                    ),
                ),
            },
        }
    }
}

/// Removes and returns the value at a dotted `path` of maps.
fn take_path(tree: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => {
            let mut v = &mut *tree;
            for k in parent.split('.') {
                v = v.get_mut(k)?;
            }
            (v, last)
        }
        None => (tree, path),
    };
    parent.as_object_mut()?.remove(last)
}

/// A value for an error message: a scalar quoted (its first 40 characters), else its kind.
fn shown(v: &Value) -> String {
    match scalar_text(v) {
        Some(t) if t.chars().count() > 40 => format!("{:?}...", t.chars().take(40).collect::<String>()),
        Some(t) => format!("{t:?}"),
        None => kind(v).to_string(),
    }
}

/// A scalar as its YAML text (`""` for null or blank), for comparing with [`Foreign::Only`].
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some(String::new()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.trim().to_string()),
        _ => None,
    }
}

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
        let mut ignored = Vec::new();
        // Taken before the rest of `nginx_config.stream` and `.event`, which only tune nginx.
        let stream_real_ip_from = take_path(&mut tree, "nginx_config.stream.real_ip_from");
        let worker_connections = take_path(&mut tree, "nginx_config.event.worker_connections");
        take_foreign(&mut tree, &mut errs, &mut ignored);
        let Some(raw) = decode::<RawNodeConfig>(&tree, "", &mut errs) else {
            return errs.into_result(NodeConfig::defaults(file));
        };
        let mut cfg = validate(file, raw, &mut errs);
        if let Some(v) = &stream_real_ip_from {
            cfg.stream_real_ip_from = ip_list(v, "nginx_config.stream.real_ip_from", &mut errs);
        }
        if let Some(v) = &worker_connections {
            match v.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0) {
                Some(n) => cfg.worker_connections = n,
                None => errs.add(
                    "nginx_config.event.worker_connections",
                    format!("expected a positive integer, found {}", shown(v)),
                ),
            }
        }
        ignored.append(&mut cfg.ignored);
        cfg.ignored = ignored;
        errs.into_result(cfg)
    }

    fn defaults(file: &str) -> NodeConfig {
        NodeConfig {
            file: file.to_string(),
            proxy_mode: ProxyMode::Http,
            http: vec![Listen {
                addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9080)),
                http2: true,
                proxy_protocol: false,
            }],
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
            resolver_ipv6: true,
            resolv_search: true,
            ssl_protocols: Default::default(),
            ssl_session_timeout: Duration::from_secs(600),
            workers: None,
            drain_timeout: None,
            ignored: Vec::new(),
            trusted_addresses: None,
            real_ip: Some(default_real_ip()),
            stream_real_ip_from: Vec::new(),
            worker_connections: 10620,
            show_upstream_status: false,
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
    cfg.resolver_ipv6 = a.enable_ipv6.unwrap_or(true);
    cfg.resolv_search = a.enable_resolv_search_opt.unwrap_or(true);
    cfg.disable_healthcheck = a.disable_upstream_healthcheck.unwrap_or(false);
    cfg.show_upstream_status = a.show_upstream_status_in_response_header.unwrap_or(false);
    if let Some(list) = &a.trusted_addresses {
        if list.is_empty() {
            errs.add("apisix.trusted_addresses", "must list at least one address (APISIX's schema)");
        }
        let mut nets = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            match crate::route::ip::IpNet::parse(s) {
                Some(n) => nets.push(n),
                None => errs
                    .add(index("apisix.trusted_addresses", i), format!("not an IP address or CIDR: {s:?}")),
            }
        }
        cfg.trusted_addresses = Some(nets);
    }

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
        cfg.http = listen_list(v, "apisix.node_listen", cfg.enable_ipv6, 9080, errs);
    } else if cfg.enable_ipv6 {
        cfg.http.push(Listen {
            addr: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 9080)),
            http2: true,
            proxy_protocol: false,
        });
    }
    if !cfg.proxy_mode.http() {
        cfg.http.clear();
    }
    // APISIX 3.9+: one switch for every HTTP and TLS listener (its default, `true`, leaves
    // each listener's own `enable_http2`, which older versions had, in force).
    let http2 = a.enable_http2.unwrap_or(true);

    if let Some(ssl) = &a.ssl {
        let enabled = ssl.enable.unwrap_or(ssl.listen.is_some());
        if enabled && cfg.proxy_mode.http() {
            cfg.tls = match &ssl.listen {
                Some(v) => listen_list(v, "apisix.ssl.listen", cfg.enable_ipv6, 9443, errs),
                None => vec![Listen {
                    addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9443)),
                    http2: true,
                    proxy_protocol: false,
                }],
            };
        }
        if let Some(list) = &ssl.ssl_trusted_certificate {
            // `system` (APISIX's default) is the system's store, which Strait always trusts;
            // files (comma-separated, as APISIX accepts them beside `system`) add to it.
            for p in list.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "system") {
                let path = resolve_relative(file, p);
                match std::fs::read_to_string(&path) {
                    Ok(t) => match strait_protocols::tls::parse_certs(&t) {
                        Ok(_) => {
                            let pem = cfg.trusted_ca_pem.get_or_insert_with(String::new);
                            pem.push_str(&t);
                            pem.push('\n');
                        }
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
        }
        cfg.fallback_sni = ssl.fallback_sni.clone();
        if let Some(p) = &ssl.ssl_protocols {
            cfg.ssl_protocols = ssl_protocols(p, errs, &mut cfg.ignored);
        }
        if let Some(v) = &ssl.ssl_session_timeout {
            match parse_duration(v) {
                Some(d) => cfg.ssl_session_timeout = d,
                None => errs.add("apisix.ssl.ssl_session_timeout", "expected a duration like 10m"),
            }
        }
    }
    if !http2 {
        for l in cfg.http.iter_mut().chain(cfg.tls.iter_mut()) {
            l.http2 = false;
        }
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
        // APISIX's nginx template: `listen <port> default_server proxy_protocol` (and `ssl` for
        // the HTTPS one), on every IPv4 address. Which address a request comes from is then
        // `real_ip_header: proxy_protocol`'s to say ([`crate::route::ip::RealIp`]).
        let any = |port: u16| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        if let Some(port) = pp.listen_http_port.filter(|_| cfg.proxy_mode.http()) {
            cfg.http.push(Listen { addr: any(port), http2, proxy_protocol: true });
        }
        if let Some(port) = pp.listen_https_port.filter(|_| cfg.proxy_mode.http()) {
            cfg.tls.push(Listen { addr: any(port), http2, proxy_protocol: true });
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
            cfg.resolver_timeout = super::seconds(t);
        } else {
            errs.add("apisix.resolver_timeout", "must be a positive number of seconds");
        }
    }

    if let Some(n) = &raw.nginx_config {
        match &n.worker_processes {
            None => {}
            Some(w) if w.as_str() == Some("auto") => {}
            Some(w) => {
                match w.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|&n| (1..=1024).contains(&n)) {
                    Some(n) => cfg.workers = Some(n),
                    None => errs
                        .add("nginx_config.worker_processes", "must be `auto` or an integer from 1 to 1024"),
                }
            }
        }
        if let Some(v) = &n.worker_shutdown_timeout {
            match parse_duration(v) {
                Some(d) => cfg.drain_timeout = Some(d),
                None => errs.add("nginx_config.worker_shutdown_timeout", "expected a duration like 240s"),
            }
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
            cfg.real_ip = parse_real_ip(h, errs);
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

    // Two listeners on one port clash when their addresses are equal or one is a wildcard
    // (0.0.0.0, [::]): with SO_REUSEPORT both would bind, and which one a connection reaches
    // would depend on the address it was made to. The control API's port counts too, as in
    // APISIX.
    let overlap = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port()
            && a.port() != 0
            && a.is_ipv4() == b.is_ipv4()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    let mut seen: Vec<SocketAddr> = Vec::new();
    for l in cfg
        .http
        .iter()
        .map(|l| l.addr)
        .chain(cfg.tls.iter().map(|l| l.addr))
        .chain(cfg.stream.iter().map(|l| l.addr))
    {
        if let Some(other) = seen.iter().find(|o| overlap(**o, l)) {
            errs.add("apisix", format!("listeners {other} and {l} share a port"));
        } else if let Some(c) = cfg.control.filter(|c| overlap(*c, l)) {
            errs.add("apisix", format!("listener {l} conflicts with the control API at {c}"));
        }
        seen.push(l);
    }
    cfg
}

/// `apisix.ssl.ssl_protocols`, nginx's form (`TLSv1.2 TLSv1.3`). rustls has no TLS 1.1 or
/// older: those are listed as ignored when a newer version is there too, and are an error alone.
fn ssl_protocols(
    text: &str,
    errs: &mut Errors,
    ignored: &mut Vec<String>,
) -> strait_protocols::tls::TlsVersions {
    use strait_protocols::tls::TlsVersions;
    const PATH: &str = "apisix.ssl.ssl_protocols";
    match TlsVersions::from_names(text.split_whitespace(), &["SSLv2", "SSLv3", "TLSv1", "TLSv1.1"]) {
        Err((_, other)) => {
            errs.add(PATH, format!("unknown protocol {other:?} (expected TLSv1.2 or TLSv1.3)"));
            Default::default()
        }
        Ok((v, _)) if !v.any() => {
            errs.add(
                PATH,
                format!("unsupported by Strait: only TLSv1.2 and TLSv1.3 are offered, found {text:?}"),
            );
            Default::default()
        }
        Ok((v, old)) => {
            if !old.is_empty() {
                ignored.push(format!("{PATH} ({}: older than TLS 1.2, not offered)", old.join(" ")));
            }
            v
        }
    }
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
/// A listen list (`node_listen`, `ssl.listen`); `default_port` is APISIX's for a map entry
/// without `port` (9080, or 9443 for TLS).
fn listen_list(v: &Value, path: &str, ipv6: bool, default_port: u16, errs: &mut Errors) -> Vec<Listen> {
    let mut out = Vec::new();
    let items: Vec<(String, &Value)> = match v {
        Value::Array(a) => a.iter().enumerate().map(|(i, x)| (index(path, i), x)).collect(),
        other => vec![(path.to_string(), other)],
    };
    for (p, item) in items {
        match item {
            Value::Number(n) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                Some(port) => {
                    out.push(Listen {
                        addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                        http2: true,
                        proxy_protocol: false,
                    });
                    if ipv6 {
                        out.push(Listen {
                            addr: SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
                            http2: true,
                            proxy_protocol: false,
                        });
                    }
                }
                None => errs.add(p, "port must be 0..65535"),
            },
            Value::String(s) => match parse_host_port(s, 0) {
                Some(addr) if addr.port() != 0 || s.ends_with(":0") => {
                    out.push(Listen { addr, http2: true, proxy_protocol: false })
                }
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
                let port = match m.get("port") {
                    None => default_port,
                    Some(v) => match v.as_u64().and_then(|n| u16::try_from(n).ok()) {
                        Some(port) => port,
                        None => {
                            errs.add(join(&p, "port"), "must be 0..65535");
                            continue;
                        }
                    },
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
                out.push(Listen { addr: SocketAddr::new(ip, port), http2, proxy_protocol: false });
                // As for a bare port: without `ip`, `enable_ipv6` adds the IPv6 wildcard.
                if ipv6 && !m.contains_key("ip") {
                    out.push(Listen {
                        addr: SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
                        http2,
                        proxy_protocol: false,
                    });
                }
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
        return (n >= 0.0 && n.is_finite()).then(|| super::seconds(n));
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
    (n >= 0.0 && n.is_finite()).then(|| super::seconds(n * mul_ms / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigErrors> {
        NodeConfig::parse("conf/config.yaml", text, |_| None)
    }

    #[test]
    fn real_ip_settings_over_apisix_defaults() {
        let localhost: IpAddr = Ipv4Addr::LOCALHOST.into();
        // APISIX's defaults: X-Real-IP from 127.0.0.1.
        let r = parse("apisix:\n  node_listen: 9080\n").unwrap().real_ip.unwrap();
        assert_eq!(r.header.as_ref().unwrap(), "x-real-ip");
        assert!(!r.recursive && r.trusts(localhost));
        let r = parse(
            "nginx_config:\n  http:\n    real_ip_header: X-Forwarded-For\n    real_ip_recursive: \"on\"\n    real_ip_from: [10.0.0.0/8, \"unix:\"]\n",
        )
        .unwrap()
        .real_ip
        .unwrap();
        assert_eq!(r.header.as_ref().unwrap(), "x-forwarded-for");
        assert!(r.recursive && !r.trusts(localhost) && r.trusts("10.1.2.3".parse().unwrap()));
        // Nobody trusted: nothing to do.
        assert!(parse("nginx_config:\n  http:\n    real_ip_from: []\n").unwrap().real_ip.is_none());
        assert!(parse("nginx_config:\n  http:\n    real_ip_from: [\"unix:\"]\n").unwrap().real_ip.is_none());
        // The PROXY header's address, on the ports that take one.
        let pp = "nginx_config:\n  http:\n    real_ip_header: proxy_protocol\n";
        assert!(parse(pp).unwrap().real_ip.unwrap().header.is_none());
    }

    #[test]
    fn node_listen_forms() {
        let c = parse("apisix:\n  node_listen: 9080\n").unwrap();
        assert_eq!(
            c.http,
            vec![Listen { addr: "0.0.0.0:9080".parse().unwrap(), http2: true, proxy_protocol: false }]
        );
        let c = parse("apisix:\n  node_listen: [9080, 9081]\n").unwrap();
        assert_eq!(c.http.len(), 2);
        let c =
            parse("apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: 0\n      enable_http2: false\n")
                .unwrap();
        assert_eq!(
            c.http,
            vec![Listen { addr: "127.0.0.1:0".parse().unwrap(), http2: false, proxy_protocol: false }]
        );
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
    fn apisix_settings_without_effect_are_accepted_and_listed() {
        let c = parse(
            "plugins:\n  - limit-count\napisix:\n  enable_dev_mode: false\n  enable_admin: true\n  router:\n    http: radixtree_host_uri\n    ssl: radixtree_sni\n  ssl:\n    ssl_session_tickets: false\nnginx_config:\n  error_log_level: warn\n  http_configuration_snippet: |\n  http:\n    underscores_in_headers: \"on\"\n    upstream:\n      keepalive: 320\n      keepalive_timeout: 60s\n",
        )
        .unwrap();
        // Listed: what Strait does not do. Not listed: APISIX's defaults, which Strait does
        // (router, session tickets, the empty snippet, ...), and a map whose keys were all taken.
        assert_eq!(
            c.ignored,
            ["plugins", "apisix.enable_admin", "apisix.enable_dev_mode", "nginx_config.error_log_level"]
        );
        // Settings Strait applies are not listed.
        let c = parse("apisix:\n  node_listen: 9080\n").unwrap();
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
    }

    #[test]
    fn an_apisix_setting_strait_cannot_honour_is_an_error_with_its_path() {
        for (text, path) in [
            ("apisix:\n  delete_uri_tail_slash: true\n", "apisix.delete_uri_tail_slash"),
            ("apisix:\n  router:\n    http: radixtree_uri\n", "apisix.router.http"),
            ("apisix:\n  ssl:\n    ssl_session_tickets: true\n", "apisix.ssl.ssl_session_tickets"),
            (
                "nginx_config:\n  http_configuration_snippet: \"lua_shared_dict x 1m;\"\n",
                "nginx_config.http_configuration_snippet",
            ),
            (
                "nginx_config:\n  http:\n    client_max_body_size: 1m\n",
                "nginx_config.http.client_max_body_size",
            ),
            (
                "nginx_config:\n  http:\n    upstream:\n      keepalive: [1]\n",
                "nginx_config.http.upstream.keepalive",
            ),
            ("apisix:\n  ssl:\n    ssl_protocols: TLSv1.1\n", "apisix.ssl.ssl_protocols"),
            ("apisix:\n  ssl:\n    ssl_protocols: TLSv9\n", "apisix.ssl.ssl_protocols"),
            ("apisix:\n  ssl:\n    ssl_session_timeout: soon\n", "apisix.ssl.ssl_session_timeout"),
            ("nginx_config:\n  worker_shutdown_timeout: soon\n", "nginx_config.worker_shutdown_timeout"),
            ("nginx_config:\n  worker_processes: 0\n", "nginx_config.worker_processes"),
            ("nginx_config:\n  worker_processes: 100000\n", "nginx_config.worker_processes"),
            ("apisix:\n  trusted_addresses: []\n", "apisix.trusted_addresses"),
            ("apisix:\n  trusted_addresses: [\"10.0.0.0/33\"]\n", "apisix.trusted_addresses[0]"),
            ("nginx_config:\n  http:\n    real_ip_header: \"X Real\"\n", "nginx_config.http.real_ip_header"),
            ("nginx_config:\n  http:\n    real_ip_recursive: maybe\n", "nginx_config.http.real_ip_recursive"),
            (
                "nginx_config:\n  http:\n    real_ip_from: [127.0.0.1, lb.example]\n",
                "nginx_config.http.real_ip_from[1]",
            ),
            (
                "nginx_config:\n  stream:\n    real_ip_from: [10.0.0.0/40]\n",
                "nginx_config.stream.real_ip_from[0]",
            ),
            ("nginx_config:\n  event:\n    worker_connections: 0\n", "nginx_config.event.worker_connections"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.0.len(), 1, "{text}: {e}");
            assert_eq!(e.0[0].path, path, "{text}: {e}");
        }
        let e = parse("apisix:\n  delete_uri_tail_slash: true\n").unwrap_err();
        assert!(e.0[0].reason.contains("only \"false\" is accepted"), "{e}");
        let e = parse("nginx_config:\n  http:\n    upstream:\n      keepalive_timeout: 30s\n").unwrap_err();
        assert!(e.0[0].reason.contains("only \"60s\" or \"60\" is accepted"), "{e}");
    }

    #[test]
    fn listeners_sharing_a_port_or_the_control_port_are_errors() {
        for (text, want) in [
            ("apisix:\n  node_listen: [9080, {ip: 127.0.0.1, port: 9080}]\n", "share a port"),
            ("apisix:\n  node_listen: [9080, 9080]\n", "share a port"),
            ("apisix:\n  node_listen: 9090\n", "conflicts with the control API at 127.0.0.1:9090"),
            ("apisix:\n  node_listen: [{ip: 127.0.0.1, port: 9090}]\n", "conflicts with the control API"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.0.iter().any(|e| e.reason.contains(want)), "{text}: {e}");
        }
        // Different addresses on one port, the two wildcards of `enable_ipv6`, or the control
        // API off: fine.
        assert!(parse("apisix:\n  enable_ipv6: true\n  node_listen: [9080, {port: 9081}]\n").is_ok());
        assert!(
            parse("apisix:\n  node_listen: [{ip: 127.0.0.1, port: 9080}, {ip: 127.0.0.2, port: 9080}]\n")
                .is_ok()
        );
        assert!(parse("apisix:\n  enable_control: false\n  node_listen: 9090\n").is_ok());
        // A map entry without `port` takes APISIX's default, and without `ip` the IPv6
        // wildcard too when `enable_ipv6` is on.
        let c = parse("apisix:\n  enable_ipv6: true\n  node_listen: [{enable_http2: false}]\n  ssl:\n    enable: true\n    listen: [{ip: 127.0.0.1}]\n").unwrap();
        let addrs: Vec<String> = c.http.iter().chain(&c.tls).map(|l| l.addr.to_string()).collect();
        assert_eq!(addrs, ["0.0.0.0:9080", "[::]:9080", "127.0.0.1:9443"]);
        // `system` is the system trust store, not a file.
        let c = parse("apisix:\n  ssl:\n    ssl_trusted_certificate: system\n").unwrap();
        assert_eq!(c.trusted_ca_pem, None);
    }

    #[test]
    fn ssl_protocols_workers_shutdown_timeout_and_http2_are_applied() {
        use strait_protocols::tls::TlsVersions;
        let c = parse("apisix:\n  node_listen: 9080\n").unwrap();
        assert_eq!(c.ssl_protocols, TlsVersions { tls12: true, tls13: true });
        assert_eq!((c.workers, c.drain_timeout), (None, None));
        assert!(c.http[0].http2);
        let c = parse(
            "apisix:\n  enable_http2: false\n  ssl:\n    enable: true\n    listen: [9443]\n    ssl_protocols: TLSv1.1 TLSv1.3\nnginx_config:\n  worker_processes: 3\n  worker_shutdown_timeout: 240s\n",
        )
        .unwrap();
        assert_eq!(c.ssl_protocols, TlsVersions { tls12: false, tls13: true });
        assert!(
            c.ignored.iter().any(|i| i.starts_with("apisix.ssl.ssl_protocols (TLSv1.1")),
            "{:?}",
            c.ignored
        );
        assert_eq!(c.workers, Some(3));
        assert_eq!(c.drain_timeout, Some(Duration::from_secs(240)));
        assert!(!c.http[0].http2 && !c.tls[0].http2);
        let c = parse(
            "apisix:\n  ssl:\n    ssl_protocols: \"TLSv1.2\"\nnginx_config:\n  worker_processes: auto\n",
        )
        .unwrap();
        assert_eq!(c.ssl_protocols, TlsVersions { tls12: true, tls13: false });
        assert_eq!(c.workers, None);
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
    fn huge_durations_are_capped_instead_of_panicking() {
        let c = parse(
            "nginx_config:\n  worker_shutdown_timeout: 1e300\n  http:\n    keepalive_timeout: 1e306h\n    send_timeout: 1e308\n",
        )
        .unwrap();
        for d in [c.drain_timeout.unwrap(), c.keepalive_timeout, c.send_timeout] {
            assert!(
                d >= Duration::from_secs(1_000_000_000) && d < Duration::from_secs(1_000_000_001),
                "{d:?}"
            );
        }
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
