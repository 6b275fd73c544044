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
//! * `user:pass@` hosts use Basic auth; hosts fail over (also past one that answers something
//!   that is not JSON);
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
    /// The last fetch and when, shared by all watches: the registry, or why there is none (so
    /// that while Eureka is away one failed fetch answers every watch, instead of each trying
    /// every host in turn).
    cache: tokio::sync::Mutex<Option<(Instant, Fetched)>>,
    next_host: Mutex<usize>,
}

/// What one fetch of the registry gave.
type Fetched = Result<Arc<Registry>, DiscoveryError>;

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

    async fn fetch(&self) -> Fetched {
        let mut cache = self.cache.lock().await;
        let fresh = self.opts.fetch_interval.min(Duration::from_secs(30)) / 2;
        if let Some((at, r)) = cache.as_ref()
            && at.elapsed() < fresh
        {
            return r.clone();
        }
        let r = self.fetch_from_hosts().await;
        *cache = Some((Instant::now(), r.clone()));
        r
    }

    /// Asks the hosts in turn, from the last one that answered.
    async fn fetch_from_hosts(&self) -> Fetched {
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
                Ok(r) if r.status == 200 => match serde_json::from_slice::<Value>(&r.body) {
                    // JSON that is no registry (`null`, a number) is a failed fetch, not an
                    // empty registry: it must not empty every watched service.
                    Ok(v) if !v["applications"].is_object() => {
                        last = DiscoveryError::Invalid(format!(
                            "{}: not a registry (no applications object)",
                            host.url.authority()
                        ))
                    }
                    Ok(v) => {
                        if let Ok(mut g) = self.next_host.lock() {
                            *g = (start + i) % n;
                        }
                        return Ok(Arc::new(self.index(&v)));
                    }
                    Err(e) => last = DiscoveryError::Invalid(format!("{}: {e}", host.url.authority())),
                },
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
    use crate::fuzz;
    use serde_json::json;

    fn d() -> EurekaDiscovery {
        with_hosts(vec![])
    }

    fn with_hosts(hosts: Vec<NacosHost>) -> EurekaDiscovery {
        EurekaDiscovery::new(EurekaOptions {
            hosts,
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

    /// A host that answers every request with `status` and `body`, counting the requests.
    async fn host(status: u16, body: &'static str) -> (NacosHost, Arc<std::sync::atomic::AtomicUsize>) {
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        let (url, count) = fuzz::answering_server(move || answer.clone().into_bytes()).await;
        (NacosHost::parse(&url).unwrap(), count)
    }

    fn query(app: &str) -> Query {
        Query { service_name: app.into(), args: vec![], scheme: "http".into() }
    }

    #[tokio::test]
    async fn a_host_that_answers_no_json_fails_over_to_the_next() {
        let (broken, _) = host(200, "<html>maintenance</html>").await;
        let (good, _) = host(200, r#"{"applications": {"application": {"name": "WEB", "instance": {"ipAddr": "10.0.0.9", "status": "UP", "port": {"$": 80, "@enabled": "true"}}}}}"#).await;
        let r = with_hosts(vec![broken, good]).resolve(&query("web")).await.unwrap();
        assert_eq!(r.nodes.nodes.len(), 1);
    }

    /// JSON that is no registry (`null`, a number, `applications` not an object) is a failed
    /// fetch, which keeps the last nodes, not an empty registry, which would empty every
    /// watched service; an empty registry still resolves to no nodes.
    #[tokio::test]
    async fn json_that_is_no_registry_is_a_failed_fetch() {
        for body in ["null", "0", r#""ADDED""#, r#"{"applications": "1"}"#, "{}"] {
            let (h, _) = host(200, body).await;
            let r = with_hosts(vec![h]).resolve(&query("web")).await;
            assert!(matches!(r, Err(DiscoveryError::Invalid(_))), "{body}: {r:?}");
        }
        let (h, _) = host(200, r#"{"applications": {"versions__delta": "1", "application": []}}"#).await;
        assert!(with_hosts(vec![h]).resolve(&query("web")).await.unwrap().nodes.nodes.is_empty());
    }

    #[tokio::test]
    async fn one_failed_fetch_answers_every_watch_until_the_next_is_due() {
        let (down, asked) = host(503, "").await;
        let d = Arc::new(with_hosts(vec![down]));
        let mut all = tokio::task::JoinSet::new();
        for i in 0..50 {
            let d = d.clone();
            all.spawn(async move { d.resolve(&query(&format!("app{i}"))).await });
        }
        while let Some(r) = all.join_next().await {
            assert!(matches!(r.unwrap(), Err(DiscoveryError::Unavailable(m)) if m.contains("HTTP 503")));
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "one fetch for fifty watches");
    }

    /// One instance of `GET /eureka/apps` as Eureka serves it (`Accept: application/json`), with
    /// the keys of `changes` set (a null removes the key).
    fn instance(app: &str, ip: &str, status: &str, overridden: &str, changes: Value) -> Value {
        let mut inst = json!({
            "instanceId": format!("{ip}:{}:8080", app.to_ascii_lowercase()),
            "hostName": ip, "app": app, "ipAddr": ip, "status": status, "overriddenStatus": overridden,
            "port": {"$": 8080, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"},
            "countryId": 1,
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90,
                          "registrationTimestamp": 1_733_580_000_000_u64, "lastRenewalTimestamp": 1_733_580_030_000_u64,
                          "evictionTimestamp": 0, "serviceUpTimestamp": 1_733_580_000_500_u64},
            "metadata": {"@class": "java.util.Collections$EmptyMap"},
            "homePageUrl": format!("http://{ip}:8080/"), "statusPageUrl": format!("http://{ip}:8080/actuator/info"),
            "healthCheckUrl": format!("http://{ip}:8080/actuator/health"),
            "vipAddress": app.to_ascii_lowercase(), "secureVipAddress": app.to_ascii_lowercase(),
            "isCoordinatingDiscoveryServer": "false", "lastUpdatedTimestamp": "1733580000500",
            "lastDirtyTimestamp": "1733579999000", "actionType": "ADDED"
        });
        for (k, v) in changes.as_object().into_iter().flatten() {
            match v {
                Value::Null => inst.as_object_mut().unwrap().remove(k),
                v => inst.as_object_mut().unwrap().insert(k.clone(), v.clone()),
            };
        }
        inst
    }

    /// A node as (host, port, weight).
    type Want = (&'static str, u16, u32);

    /// The instances of application WEB and the node each must give.
    fn web_instances() -> Vec<(Value, Option<Want>)> {
        vec![
            (
                instance(
                    "WEB",
                    "10.0.0.1",
                    "UP",
                    "UNKNOWN",
                    json!({"metadata": {"management.port": "8080", "weight": "5"}}),
                ),
                Some(("10.0.0.1", 8080, 5)),
            ),
            // An enabled secure port wins.
            (
                instance(
                    "WEB",
                    "10.0.0.2",
                    "UP",
                    "UNKNOWN",
                    json!({"securePort": {"$": 8443, "@enabled": "true"}}),
                ),
                Some(("10.0.0.2", 8443, 100)),
            ),
            (instance("WEB", "10.0.0.3", "UP", "OUT_OF_SERVICE", json!({})), None),
            (instance("WEB", "10.0.0.4", "DOWN", "UNKNOWN", json!({})), None),
            // An overridden status other than UNKNOWN wins; numbers and booleans as strings or not.
            (
                instance(
                    "WEB",
                    "10.0.0.5",
                    "STARTING",
                    "UP",
                    json!({"port": {"$": "8081", "@enabled": true}, "metadata": {"weight": 20}}),
                ),
                Some(("10.0.0.5", 8081, 20)),
            ),
            // The lower-case key older servers send.
            (
                instance(
                    "WEB",
                    "fd00::6",
                    "UP",
                    "",
                    json!({"overriddenStatus": null, "overriddenstatus": "UNKNOWN", "port": {"$": 9000, "@enabled": "true"}}),
                ),
                Some(("fd00::6", 9000, 100)),
            ),
            // No enabled port.
            (
                instance(
                    "WEB",
                    "10.0.0.7",
                    "UP",
                    "UNKNOWN",
                    json!({"port": {"$": 8080, "@enabled": "false"}}),
                ),
                None,
            ),
        ]
    }

    fn api_instance() -> (Value, Option<Want>) {
        (
            instance("API", "10.1.0.1", "UP", "UNKNOWN", json!({"port": {"$": 80, "@enabled": "true"}})),
            Some(("10.1.0.1", 80, 100)),
        )
    }

    /// The entries of a list Eureka may give as one object.
    fn entries(v: &Value) -> Vec<&Value> {
        match v {
            Value::Array(a) => a.iter().collect(),
            Value::Object(_) => vec![v],
            _ => vec![],
        }
    }

    /// Whether an instance is UP: its overridden status unless that is UNKNOWN, else its status.
    fn is_up(inst: &Value) -> bool {
        match inst["overriddenStatus"].as_str().or(inst["overriddenstatus"].as_str()) {
            Some(s) if s != "UNKNOWN" => s == "UP",
            _ => inst["status"] == "UP",
        }
    }

    /// The ports an instance gives (`port.$`, `securePort.$`), as numbers or numeric strings.
    fn ports_of(inst: &Value) -> Vec<u64> {
        [&inst["port"]["$"], &inst["securePort"]["$"]]
            .into_iter()
            .filter_map(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
            .collect()
    }

    fn triples(set: &NodeSet) -> Vec<(&str, u16, u32)> {
        set.nodes.iter().map(|n| (n.host.as_str(), n.port.unwrap_or(0), n.weight)).collect()
    }

    /// Whatever registry Eureka answers, indexing it never panics; every node is an UP instance
    /// of its application (matched in any case), on a real port of that instance, at an
    /// address of the answer; and every instance the mutations left as it was, in an
    /// application still named, still gives its node.
    #[test]
    fn any_registry_indexes_and_intact_instances_stay() {
        let d = d();
        let web = web_instances();
        let api = api_instance();
        let registry = json!({"applications": {
            "versions__delta": "1", "apps__hashcode": "DOWN_1_OUT_OF_SERVICE_1_STARTING_1_UP_5_",
            "application": [
                {"name": "WEB", "instance": web.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>()},
                {"name": "API", "instance": [api.0.clone()]}
            ]
        }});
        // One application with one instance, each given as an object.
        let single = json!({"applications": {
            "versions__delta": "1", "apps__hashcode": "UP_1_",
            "application": {"name": "API", "instance": api.0.clone()}
        }});
        let reg = d.index(&registry);
        assert_eq!(
            triples(&reg.nodes("web")),
            [("10.0.0.1", 8080, 5), ("10.0.0.2", 8443, 100), ("10.0.0.5", 8081, 20), ("fd00::6", 9000, 100)]
        );
        assert_eq!(triples(&reg.nodes("Api")), [("10.1.0.1", 80, 100)]);
        assert_eq!(reg.apps.len(), 2);
        assert_eq!(triples(&d.index(&single).nodes("api")), [("10.1.0.1", 80, 100)]);

        let good: Vec<(Value, Option<Want>)> = web.into_iter().chain([api]).collect();
        let payloads = [registry, single];
        fuzz::each_seed(2_000, &payloads, |_, input| {
            // As `fetch_from_hosts`: an answer that does not parse is an error.
            let Some(doc) = input.value() else { return };
            let reg = d.index(&doc);
            let addresses = fuzz::strings_under(&doc, "ipAddr");
            let apps: Vec<(&str, &Value)> = entries(&doc["applications"]["application"])
                .into_iter()
                .filter_map(|a| Some((a["name"].as_str()?, a)))
                .collect();
            let instances_of = |key: &str| -> Vec<&Value> {
                apps.iter()
                    .filter(|(name, _)| name.to_ascii_uppercase() == key)
                    .flat_map(|(_, a)| entries(&a["instance"]))
                    .collect()
            };
            for (key, set) in &reg.apps {
                let instances = instances_of(key);
                assert!(
                    apps.iter().any(|(name, _)| name.to_ascii_uppercase() == *key),
                    "{key} is no application of the answer"
                );
                for n in &set.nodes {
                    let port = n.port.unwrap_or(0);
                    assert!(port > 0, "{n:?}");
                    assert!(addresses.contains(&n.host), "{n:?} is no address of the answer");
                    assert!(
                        instances.iter().any(|i| i["ipAddr"] == n.host.as_str()
                            && is_up(i)
                            && ports_of(i).contains(&u64::from(port))),
                        "{n:?} is no UP instance of {key} on that port"
                    );
                }
                assert!(set.nodes.windows(2).all(|w| (&w[0].host, w[0].port) <= (&w[1].host, w[1].port)));
            }
            for (name, a) in &apps {
                let set = reg.nodes(name);
                let mixed: String = name
                    .chars()
                    .enumerate()
                    .map(|(i, c)| if i % 2 == 0 { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() })
                    .collect();
                for other in [name.to_ascii_lowercase(), name.to_ascii_uppercase(), mixed] {
                    assert_eq!(reg.nodes(&other), set, "{name:?} asked as {other:?}");
                }
                for inst in entries(&a["instance"]) {
                    if let Some((_, Some(want))) = good.iter().find(|(g, _)| g == inst) {
                        assert!(triples(&set).contains(want), "{want:?} of {name:?} lost");
                    }
                }
            }
        });
    }
}
