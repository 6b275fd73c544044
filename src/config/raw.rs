//! Raw configuration shapes with APISIX's field names, exactly as written in YAML.
//!
//! Every struct denies unknown fields. Polymorphic fields (`nodes`, `node_listen`, `vars`, ...)
//! stay as trees here and are checked by the validation code, which knows their paths.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::{Map, Value};

/// A resource id: APISIX accepts a string or a positive integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string id or a positive integer id")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Id, E> {
                let ok = !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if ok {
                    Ok(Id(s.to_string()))
                } else {
                    Err(E::custom(format!("invalid id {s:?}: 1 to 64 characters of [a-zA-Z0-9-_.]")))
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Id, E> {
                if n == 0 {
                    return Err(E::custom("an integer id must be at least 1"));
                }
                Ok(Id(n.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Id, E> {
                if n < 1 {
                    return Err(E::custom("an integer id must be at least 1"));
                }
                Ok(Id(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// config.yaml

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNodeConfig {
    pub apisix: Option<RawApisix>,
    pub deployment: Option<RawDeployment>,
    pub discovery: Option<Map<String, Value>>,
    pub nginx_config: Option<RawNginxConfig>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawApisix {
    pub node_listen: Option<Value>,
    pub show_upstream_status_in_response_header: Option<bool>,
    pub enable_ipv6: Option<bool>,
    pub enable_http2: Option<bool>,
    pub enable_reuseport: Option<bool>,
    pub enable_control: Option<bool>,
    pub control: Option<RawControl>,
    pub ssl: Option<RawSslListen>,
    pub proxy_mode: Option<String>,
    pub stream_proxy: Option<RawStreamProxy>,
    pub dns_resolver: Option<Vec<String>>,
    pub dns_resolver_valid: Option<u64>,
    pub resolver_timeout: Option<f64>,
    pub enable_resolv_search_opt: Option<bool>,
    pub proxy_protocol: Option<RawProxyProtocol>,
    pub disable_upstream_healthcheck: Option<bool>,
    pub id: Option<String>,
    pub trusted_addresses: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    pub ip: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSslListen {
    pub enable: Option<bool>,
    pub listen: Option<Value>,
    pub ssl_trusted_certificate: Option<String>,
    pub fallback_sni: Option<String>,
    pub ssl_protocols: Option<String>,
    pub ssl_session_timeout: Option<Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStreamProxy {
    pub tcp: Option<Vec<Value>>,
    pub udp: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    pub enable_tcp_pp: Option<bool>,
    pub enable_tcp_pp_to_upstream: Option<bool>,
    pub listen_http_port: Option<u16>,
    pub listen_https_port: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub role: Option<String>,
    pub role_data_plane: Option<RawRoleDataPlane>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRoleDataPlane {
    pub config_provider: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNginxConfig {
    pub worker_processes: Option<Value>,
    pub worker_shutdown_timeout: Option<Value>,
    pub http: Option<RawNginxHttp>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNginxHttp {
    /// e.g. `60s`: how long a client may take to send its request headers.
    pub client_header_timeout: Option<Value>,
    /// e.g. `60s`: how long a client may pause while it sends a request body.
    pub client_body_timeout: Option<Value>,
    /// e.g. `60s`: how long an idle client keep-alive connection stays open.
    pub keepalive_timeout: Option<Value>,
    /// e.g. `10s`: how long a write to a client may make no progress.
    pub send_timeout: Option<Value>,
    /// nginx's realip module: the header that names the client (`X-Real-IP`)...
    pub real_ip_header: Option<Value>,
    /// ... whether trusted addresses in it are skipped (`on`/`off`)...
    pub real_ip_recursive: Option<Value>,
    /// ... and the peers whose header is believed (IPs, CIDRs, `unix:`).
    pub real_ip_from: Option<Value>,
}

// ---------------------------------------------------------------------------------------------
// apisix.yaml

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTimeout {
    pub connect: f64,
    pub send: f64,
    pub read: f64,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub labels: Option<Map<String, Value>>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub uri: Option<String>,
    pub uris: Option<Vec<String>>,
    pub host: Option<String>,
    pub hosts: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub remote_addr: Option<String>,
    pub remote_addrs: Option<Vec<String>>,
    pub vars: Option<Value>,
    pub priority: Option<i64>,
    pub upstream: Option<Value>,
    pub upstream_id: Option<Id>,
    pub service_id: Option<Id>,
    pub timeout: Option<RawTimeout>,
    pub enable_websocket: Option<bool>,
    pub status: Option<u8>,
    pub plugins: Option<Map<String, Value>>,
}

/// Route keys APISIX has that Strait does not implement.
pub const ROUTE_UNSUPPORTED: &[&str] = &["filter_func", "plugin_config_id", "script", "script_id"];

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub labels: Option<Map<String, Value>>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub upstream: Option<Value>,
    pub upstream_id: Option<Id>,
    pub hosts: Option<Vec<String>>,
    pub enable_websocket: Option<bool>,
    pub plugins: Option<Map<String, Value>>,
}

pub const SERVICE_UNSUPPORTED: &[&str] = &["script"];

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub labels: Option<Map<String, Value>>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub nodes: Option<Value>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub hash_on: Option<String>,
    pub key: Option<String>,
    pub checks: Option<Value>,
    pub retries: Option<u32>,
    pub retry_timeout: Option<f64>,
    pub timeout: Option<RawTimeout>,
    pub scheme: Option<String>,
    pub pass_host: Option<String>,
    pub upstream_host: Option<String>,
    pub keepalive_pool: Option<RawKeepalive>,
    pub tls: Option<RawUpstreamTls>,
    pub discovery_type: Option<String>,
    pub service_name: Option<String>,
    pub discovery_args: Option<Map<String, Value>>,
    /// Strait extension: several registries behind one upstream.
    pub discovery_sources: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    pub size: Option<u32>,
    pub idle_timeout: Option<f64>,
    pub requests: Option<u32>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub client_cert_id: Option<Id>,
    pub verify: Option<bool>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawSsl {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub labels: Option<Map<String, Value>>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub certs: Option<Vec<String>>,
    pub keys: Option<Vec<String>>,
    pub sni: Option<String>,
    pub snis: Option<Vec<String>>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub status: Option<u8>,
    pub client: Option<RawSslClient>,
    pub ssl_protocols: Option<Vec<String>>,
}

/// `ssls[].client`: client certificates required from clients (mTLS).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawSslClient {
    pub ca: Option<String>,
    pub depth: Option<i64>,
    pub skip_mtls_uri_regex: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawStreamRoute {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub labels: Option<Map<String, Value>>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub remote_addr: Option<String>,
    pub server_addr: Option<String>,
    pub server_port: Option<u16>,
    pub sni: Option<String>,
    pub upstream: Option<Value>,
    pub upstream_id: Option<Id>,
    pub service_id: Option<Id>,
    /// Strait extension: close a session after this many seconds without traffic in either
    /// direction (default: never).
    pub idle_timeout: Option<f64>,
}

pub const STREAM_ROUTE_UNSUPPORTED: &[&str] = &["plugins", "protocol"];

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawProto {
    pub id: Option<Id>,
    pub name: Option<String>,
    pub desc: Option<String>,
    pub labels: Option<Map<String, Value>>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub content: String,
}
