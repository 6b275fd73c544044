//! Eureka (`discovery.eureka`, APISIX's `apisix/discovery/eureka`), following the Eureka REST
//! operations (<https://github.com/Netflix/eureka/wiki/Eureka-REST-operations>):
//! `GET <prefix>apps` with `Accept: application/json`, fetched once per `fetch_interval` and
//! shared by every watched application.
//!
//! * `service_name` is the application name (matched case-insensitively; Eureka upper-cases);
//! * only `UP` instances; an overridden status wins unless it is `UNKNOWN`;
//! * port `port.$` when enabled, replaced by `securePort.$` when that is enabled; weight from
//!   `metadata.weight`, else the configured weight;
//! * both JSON shapes Eureka produces are read: lists, and a single application or instance
//!   given as an object; numbers and booleans as strings or JSON values;
//! * `user:pass@` hosts use Basic auth; hosts fail over;
//! * each fetched registry is indexed by application once, and every watched application reads
//!   its nodes from that index: a watch costs a lookup, not a pass over (or a copy of) the
//!   whole registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Map, Value};

use crate::http::HttpClient;
use crate::nacos::NacosHost;
use crate::{BoxFuture, Discovery, DiscoveryError, NodeSet, NodeSpec, Query, Resolution};

/// `discovery.eureka`.
#[derive(Debug, Clone)]
pub struct EurekaOptions {
    pub hosts: Vec<NacosHost>,
    /// Path prefix, e.g. `/eureka/`.
    pub prefix: String,
    pub fetch_interval: Duration,
    pub weight: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// The Eureka backend.
pub struct EurekaDiscovery {
    opts: EurekaOptions,
    http: HttpClient,
    /// The last registry fetched and when; shared by all watches.
    cache: tokio::sync::Mutex<Option<(Instant, Arc<Registry>)>>,
    next_host: Mutex<usize>,
}

/// One fetched registry: the nodes of each application, by its upper-cased name.
#[derive(Debug, Default)]
pub struct Registry {
    apps: HashMap<String, NodeSet>,
}

impl Registry {
    /// The nodes of application `app` (matched case-insensitively); none when it is not there.
    pub fn nodes(&self, app: &str) -> NodeSet {
        self.apps.get(&app.to_ascii_uppercase()).cloned().unwrap_or_default()
    }
}

/// A list that Eureka may give as one object.
fn as_list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => vec![],
        other => vec![other],
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => s == "true",
        _ => false,
    }
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl EurekaDiscovery {
    pub fn new(opts: EurekaOptions) -> Result<Self, DiscoveryError> {
        let http = HttpClient::new(opts.connect_timeout, opts.read_timeout)?;
        Ok(EurekaDiscovery { opts, http, cache: tokio::sync::Mutex::new(None), next_host: Mutex::new(0) })
    }

    async fn fetch(&self) -> Result<Arc<Registry>, DiscoveryError> {
        let mut cache = self.cache.lock().await;
        let fresh = self.opts.fetch_interval.min(Duration::from_secs(30)) / 2;
        if let Some((at, v)) = cache.as_ref()
            && at.elapsed() < fresh
        {
            return Ok(v.clone());
        }
        let n = self.opts.hosts.len().max(1);
        let start = self.next_host.lock().map(|g| *g).unwrap_or(0);
        let mut last = DiscoveryError::Unavailable("no Eureka host configured".into());
        for i in 0..self.opts.hosts.len() {
            let host = &self.opts.hosts[(start + i) % n];
            let mut headers = vec![("accept", "application/json".to_string())];
            if let Some((u, p)) = &host.user {
                headers.push((
                    "authorization",
                    format!("Basic {}", crate::nacos::base64(format!("{u}:{p}").as_bytes())),
                ));
            }
            let path = format!("{}apps", self.opts.prefix);
            match self.http.request(&host.url, Method::GET, &path, &headers, bytes::Bytes::new(), None).await
            {
                Ok(r) if r.status == 200 => {
                    let v: Value = serde_json::from_slice(&r.body)
                        .map_err(|e| DiscoveryError::Invalid(e.to_string()))?;
                    if let Ok(mut g) = self.next_host.lock() {
                        *g = (start + i) % n;
                    }
                    let registry = Arc::new(self.index(&v));
                    *cache = Some((Instant::now(), registry.clone()));
                    return Ok(registry);
                }
                Ok(r) => {
                    last = DiscoveryError::Unavailable(format!("{}: HTTP {}", host.url.authority(), r.status))
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Indexes a registry document: the nodes of every application, read in one pass.
    pub fn index(&self, registry: &Value) -> Registry {
        let mut apps: HashMap<String, Vec<NodeSpec>> = HashMap::new();
        for a in as_list(&registry["applications"]["application"]) {
            let Some(name) = a["name"].as_str() else { continue };
            let nodes = apps.entry(name.to_ascii_uppercase()).or_default();
            nodes.extend(as_list(&a["instance"]).into_iter().filter_map(|inst| self.node(inst)));
        }
        let apps = apps
            .into_iter()
            .map(|(name, mut nodes)| {
                nodes.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
                (name, NodeSet { nodes })
            })
            .collect();
        Registry { apps }
    }

    /// The node of one instance, if it is `UP` and has an enabled port.
    fn node(&self, inst: &Value) -> Option<NodeSpec> {
        let overridden = inst["overriddenStatus"].as_str().or(inst["overriddenstatus"].as_str());
        let status = match overridden {
            Some(s) if s != "UNKNOWN" => s,
            _ => inst["status"].as_str().unwrap_or("UNKNOWN"),
        };
        if status != "UP" {
            return None;
        }
        let ip = inst["ipAddr"].as_str()?;
        let mut port = None;
        if truthy(&inst["port"]["@enabled"]) {
            port = number(&inst["port"]["$"]);
        }
        if truthy(&inst["securePort"]["@enabled"]) {
            port = number(&inst["securePort"]["$"]);
        }
        let port = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)?;
        let metadata: Map<String, Value> = inst["metadata"].as_object().cloned().unwrap_or_default();
        // A weight past u32 is the largest one, not what is left of it after truncation.
        let weight = metadata
            .get("weight")
            .and_then(number)
            .map(|w| u32::try_from(w).unwrap_or(u32::MAX))
            .unwrap_or(self.opts.weight);
        Some(NodeSpec { host: ip.to_string(), port: Some(port), weight, priority: 0, metadata })
    }
}

impl Discovery for EurekaDiscovery {
    fn kind(&self) -> &'static str {
        "eureka"
    }

    fn resolve<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Resolution, DiscoveryError>> {
        Box::pin(async move {
            let registry = self.fetch().await?;
            Ok(Resolution { nodes: registry.nodes(&query.service_name), valid_for: None })
        })
    }

    fn poll_interval(&self) -> Duration {
        self.opts.fetch_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d() -> EurekaDiscovery {
        EurekaDiscovery::new(EurekaOptions {
            hosts: vec![],
            prefix: "/eureka/".into(),
            fetch_interval: Duration::from_secs(30),
            weight: 100,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn statuses_ports_weights_and_object_forms() {
        let reg = json!({"applications": {"application": {
            "name": "WEB",
            "instance": [
                {"ipAddr": "10.0.0.1", "status": "UP", "port": {"$": 8080, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"}, "metadata": {"weight": "5"}},
                {"ipAddr": "10.0.0.2", "status": "UP", "overriddenStatus": "OUT_OF_SERVICE", "port": {"$": 8080, "@enabled": "true"}},
                {"ipAddr": "10.0.0.3", "status": "DOWN", "port": {"$": 8080, "@enabled": "true"}},
                {"ipAddr": "10.0.0.4", "status": "UP", "overriddenstatus": "UNKNOWN", "port": {"$": "8081", "@enabled": true}, "securePort": {"$": "8443", "@enabled": "true"}}
            ]
        }}});
        let set = d().index(&reg).nodes("web");
        let got: Vec<_> = set.nodes.iter().map(|n| (n.host.as_str(), n.port, n.weight)).collect();
        assert_eq!(got, [("10.0.0.1", Some(8080), 5), ("10.0.0.4", Some(8443), 100)]);
        let single = json!({"applications": {"application": [{"name": "API", "instance": {"ipAddr": "10.1.1.1", "status": "UP", "port": {"$": 1, "@enabled": "true"}}}]}});
        assert_eq!(d().index(&single).nodes("API").nodes.len(), 1);
        assert!(d().index(&single).nodes("WEB").nodes.is_empty());
        // A weight past u32 saturates instead of wrapping to a small one (or 0).
        let heavy = json!({"applications": {"application": {"name": "W", "instance": {"ipAddr": "10.1.1.1", "status": "UP", "port": {"$": 1, "@enabled": "true"}, "metadata": {"weight": "4294967296"}}}}});
        assert_eq!(d().index(&heavy).nodes("w").nodes[0].weight, u32::MAX);
    }
}
