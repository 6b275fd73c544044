//! Kubernetes (`discovery.kubernetes`, APISIX's `apisix/discovery/kubernetes`), following the
//! Kubernetes API concepts for list and watch
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>).
//!
//! One informer per cluster lists Endpoints (or EndpointSlices with `watch_endpoint_slices`),
//! then watches from the list's `resourceVersion` with bookmarks; `410 Gone` relists, a broken
//! watch reconnects with backoff from the last version seen. Only ready addresses become nodes.
//! Objects are kept by service, and a watch event wakes only the watches of the service it
//! changed: an event costs the same with ten services watched as with ten thousand, and in a
//! cluster of any size. A watch event line longer than `MAX_EVENT` breaks the watch (it is
//! retried with backoff), instead of growing a buffer without end.
//! `service_name` is `namespace/name:portName` (`id/namespace/name:portName` for several
//! clusters); an unnamed port is addressed by its number.
//!
//! Written on the crate's small HTTP client rather than `kube`: the informer is a few hundred
//! lines, while `kube` with `k8s-openapi` would add minutes to every build on two cores.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::http::{HttpClient, Url};
use crate::nacos::urlencode;
use crate::{
    Backoff, BoxFuture, Discovery, DiscoveryError, NodeSet, NodeSpec, Query, Resolution, SharedStatus,
    note_error, publish, record_error,
};

/// How the service account token is found.
#[derive(Debug, Clone)]
pub enum Token {
    None,
    Literal(String),
    /// Read on every request, so a rotated token is picked up.
    File(std::path::PathBuf),
}

/// Which namespaces are watched.
#[derive(Debug, Clone, Default)]
pub struct NamespaceSelector {
    pub equal: Option<String>,
    pub not_equal: Option<String>,
    pub matches: Vec<String>,
    pub not_matches: Vec<String>,
}

/// One cluster of `discovery.kubernetes`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `id` in the multi-cluster form.
    pub id: Option<String>,
    pub api: Url,
    pub token: Token,
    pub namespaces: NamespaceSelector,
    pub label_selector: Option<String>,
    pub default_weight: u32,
    pub endpoint_slices: bool,
}

/// Ready addresses of one object, by port name: (ip, port).
type PortMap = HashMap<String, Vec<(String, u16)>>;

/// Longest watch event line read: far above what an API server sends (etcd refuses objects
/// past 1.5 MiB by default), so only a broken or hostile server reaches it.
const MAX_EVENT: usize = 16 << 20;

#[derive(Default)]
struct State {
    /// Object key (`ns/object`) -> its service key (`ns/service`).
    owners: HashMap<String, String>,
    /// Service key -> the ready addresses of its objects, by object key.
    services: HashMap<String, HashMap<String, PortMap>>,
    /// Change signal of each watched service (service key).
    watchers: HashMap<String, watch::Sender<u64>>,
    resource_version: String,
    synced: bool,
    last_error: Option<(SystemTime, String)>,
}

impl State {
    /// Sets an object's service and ports, and signals the services that changed.
    fn put(&mut self, key: String, svc: String, ports: PortMap) {
        if let Some(old) = self.owners.insert(key.clone(), svc.clone())
            && old != svc
        {
            self.take(&old, &key);
        }
        let objects = self.services.entry(svc.clone()).or_default();
        if objects.get(&key) != Some(&ports) {
            objects.insert(key, ports);
            self.signal(&svc);
        }
    }

    /// Forgets an object, if it is known.
    fn remove(&mut self, key: &str) {
        if let Some(svc) = self.owners.remove(key) {
            self.take(&svc, key);
        }
    }

    fn take(&mut self, svc: &str, key: &str) {
        if let Some(objects) = self.services.get_mut(svc) {
            objects.remove(key);
            if objects.is_empty() {
                self.services.remove(svc);
            }
        }
        self.signal(svc);
    }

    fn signal(&self, svc: &str) {
        if let Some(tx) = self.watchers.get(svc) {
            tx.send_modify(|v| *v += 1);
        }
    }
}

/// What a watch event asks of the watch.
enum Next {
    Go,
    Relist,
}

/// A list-and-watch loop over one cluster.
struct Informer {
    opts: ClusterOptions,
    http: HttpClient,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    started: std::sync::Once,
    ns_match: Vec<regex::Regex>,
    ns_not_match: Vec<regex::Regex>,
}

/// The Kubernetes backend.
pub struct KubernetesDiscovery {
    clusters: Vec<Arc<Informer>>,
}

/// Whether an endpoint address is an IP address (an `FQDN` EndpointSlice holds names).
fn is_ip(a: &str) -> bool {
    a.parse::<std::net::IpAddr>().is_ok()
}

fn token_of(t: &Token) -> Option<String> {
    match t {
        Token::None => None,
        Token::Literal(s) => Some(s.clone()),
        Token::File(p) => std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()),
    }
}

impl Informer {
    fn resource_path(&self) -> &'static str {
        if self.opts.endpoint_slices {
            "/apis/discovery.k8s.io/v1/endpointslices"
        } else {
            "/api/v1/endpoints"
        }
    }

    fn selectors(&self) -> String {
        let mut q = String::new();
        if let Some(l) = &self.opts.label_selector {
            q.push_str(&format!("&labelSelector={}", urlencode(l)));
        }
        let ns = &self.opts.namespaces;
        if let Some(n) = &ns.equal {
            q.push_str(&format!("&fieldSelector={}", urlencode(&format!("metadata.namespace={n}"))));
        } else if let Some(n) = &ns.not_equal {
            q.push_str(&format!("&fieldSelector={}", urlencode(&format!("metadata.namespace!={n}"))));
        }
        q
    }

    fn namespace_ok(&self, ns: &str) -> bool {
        (self.ns_match.is_empty() || self.ns_match.iter().any(|r| r.is_match(ns)))
            && !self.ns_not_match.iter().any(|r| r.is_match(ns))
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("accept", "application/json".to_string())];
        if let Some(t) = token_of(&self.opts.token) {
            h.push(("authorization", format!("Bearer {t}")));
        }
        h
    }

    /// Parses one Endpoints or EndpointSlice object: (object key, service key, ports). Only IP
    /// addresses are taken (an `FQDN` slice's names are not looked up) and only ports from 1.
    fn parse(&self, obj: &Value) -> Option<(String, String, PortMap)> {
        let md = &obj["metadata"];
        let ns = md["namespace"].as_str()?;
        let name = md["name"].as_str()?;
        if !self.namespace_ok(ns) {
            return None;
        }
        let mut ports: PortMap = HashMap::new();
        if self.opts.endpoint_slices {
            let svc = md["labels"]["kubernetes.io/service-name"].as_str()?;
            let ready: Vec<String> = obj["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["conditions"]["ready"].as_bool() != Some(false))
                .flat_map(|e| {
                    e["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str().filter(|a| is_ip(a)).map(str::to_string))
                })
                .collect();
            for p in obj["ports"].as_array().into_iter().flatten() {
                let Some(port) = p["port"].as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)
                else {
                    continue;
                };
                let key = p["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| port.to_string());
                ports.entry(key).or_default().extend(ready.iter().map(|ip| (ip.clone(), port)));
            }
            return Some((format!("{ns}/{name}"), format!("{ns}/{svc}"), ports));
        }
        for subset in obj["subsets"].as_array().into_iter().flatten() {
            let ready: Vec<String> = subset["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["ip"].as_str().filter(|a| is_ip(a)).map(str::to_string))
                .collect();
            for p in subset["ports"].as_array().into_iter().flatten() {
                let Some(port) = p["port"].as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)
                else {
                    continue;
                };
                let key = p["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| port.to_string());
                ports.entry(key).or_default().extend(ready.iter().map(|ip| (ip.clone(), port)));
            }
        }
        Some((format!("{ns}/{name}"), format!("{ns}/{name}"), ports))
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn fail(&self, e: String) {
        tracing::warn!(discovery = "kubernetes", api = %self.opts.api.authority(), error = %e, "kubernetes list/watch failed; keeping the last endpoints");
        if let Ok(mut s) = self.state.lock() {
            s.last_error = Some((SystemTime::now(), e));
        }
        self.bump();
    }

    /// Lists everything (paged) and replaces the state; every watch looks again.
    async fn list(&self) -> Result<(), String> {
        let mut objects = Vec::new();
        let mut cont: Option<String> = None;
        let rv = loop {
            let mut path = format!("{}?limit=500{}", self.resource_path(), self.selectors());
            if let Some(c) = &cont {
                path.push_str(&format!("&continue={}", urlencode(c)));
            }
            let r = self
                .http
                .request(&self.opts.api, Method::GET, &path, &self.headers(), Bytes::new(), None)
                .await
                .map_err(|e| e.to_string())?;
            if r.status != 200 {
                return Err(format!(
                    "list: HTTP {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body).chars().take(200).collect::<String>()
                ));
            }
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("list: {e}"))?;
            // A list always has `items` (`[]` when empty, `null` from a server that writes an
            // empty Go slice so): JSON without it is no answer, and taking it as an empty list
            // would empty every watched service.
            let items: &[Value] = match v.get("items") {
                Some(Value::Array(a)) => a,
                Some(Value::Null) => &[],
                _ => return Err("list: no items array in the answer".into()),
            };
            for item in items {
                if let Some(object) = self.parse(item) {
                    objects.push(object);
                }
            }
            match v["metadata"]["continue"].as_str().filter(|c| !c.is_empty()) {
                Some(c) => cont = Some(c.to_string()),
                None => break v["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string(),
            }
        };
        let mut owners = HashMap::new();
        let mut services: HashMap<String, HashMap<String, PortMap>> = HashMap::new();
        for (key, svc, ports) in objects {
            owners.insert(key.clone(), svc.clone());
            services.entry(svc).or_default().insert(key, ports);
        }
        if let Ok(mut s) = self.state.lock() {
            s.owners = owners;
            s.services = services;
            s.resource_version = rv;
            s.synced = true;
            s.last_error = None;
        }
        self.bump();
        Ok(())
    }

    /// Watches from the current version until the stream ends. `Ok(true)` asks for a relist.
    async fn watch_once(&self) -> Result<bool, String> {
        let rv = self.state.lock().map(|s| s.resource_version.clone()).unwrap_or_default();
        // As client-go's reflector: the server ends each watch after 5 to 10 minutes (spread
        // so that many gateways do not reconnect together), and a watch that stays silent past
        // that is dead (a load balancer or NAT that dropped it without a reset), since
        // bookmarks are not promised at any rate.
        let timeout = 300 + crate::random_below(300);
        let path = format!(
            "{}?watch=true&allowWatchBookmarks=true&timeoutSeconds={timeout}&resourceVersion={}{}",
            self.resource_path(),
            urlencode(&rv),
            self.selectors()
        );
        let resp = self
            .http
            .send(&self.opts.api, Method::GET, &path, &self.headers(), Bytes::new(), self.http.read_timeout())
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().as_u16() == 410 {
            return Ok(true);
        }
        if !resp.status().is_success() {
            return Err(format!("watch: HTTP {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        // Where the search for the next newline resumes.
        let mut scanned = 0;
        let idle = Duration::from_secs(timeout + 60);
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => return Err("watch went silent".into()),
                Ok(None) => return Ok(false),
                Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            let mut start = 0;
            while let Some(end) = buf[scanned..].iter().position(|b| *b == b'\n').map(|p| scanned + p) {
                let line = &buf[start..end];
                start = end + 1;
                scanned = start;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if let Next::Relist = self.apply(line)? {
                    return Ok(true);
                }
            }
            buf.drain(..start);
            scanned = buf.len();
            if buf.len() > MAX_EVENT {
                return Err(format!("watch event longer than {} MiB", MAX_EVENT >> 20));
            }
        }
    }

    /// Applies one watch event (a line of the watch stream).
    fn apply(&self, line: &[u8]) -> Result<Next, String> {
        let ev: Value = serde_json::from_slice(line).map_err(|e| format!("watch event: {e}"))?;
        let obj = &ev["object"];
        let md = &obj["metadata"];
        let key = match (md["namespace"].as_str(), md["name"].as_str()) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        };
        // What the event does to the object: `Some(Some(..))` sets it, `Some(None)` forgets it.
        let change = match ev["type"].as_str() {
            // An object that no longer parses is no longer one of ours (its namespace is left
            // out, or a slice lost its service label): forget it.
            Some("ADDED") | Some("MODIFIED") => Some(self.parse(obj)),
            Some("DELETED") => Some(None),
            Some("BOOKMARK") => None,
            Some("ERROR") => {
                if obj["code"].as_u64() == Some(410) {
                    return Ok(Next::Relist);
                }
                return Err(format!("watch error: {}", obj["message"].as_str().unwrap_or("unknown")));
            }
            other => return Err(format!("unknown watch event {other:?}")),
        };
        let mut s = self.state.lock().map_err(|_| "state lock poisoned".to_string())?;
        match change {
            Some(Some((key, svc, ports))) => s.put(key, svc, ports),
            Some(None) => {
                if let Some(key) = &key {
                    s.remove(key);
                }
            }
            None => {}
        }
        if let Some(rv) = md["resourceVersion"].as_str() {
            s.resource_version = rv.to_string();
        }
        // The first good event after a failure: every watch reports the recovery.
        let recovered = s.last_error.take().is_some();
        drop(s);
        if recovered {
            self.bump();
        }
        Ok(Next::Go)
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_secs(30));
        let mut need_list = true;
        loop {
            if need_list {
                match self.list().await {
                    Ok(()) => need_list = false,
                    Err(e) => {
                        self.fail(e);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            match self.watch_once().await {
                Ok(relist) => {
                    backoff.reset();
                    need_list = relist;
                }
                Err(e) => {
                    self.fail(e);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Ready nodes of `svc` (`ns/name`) on port `port`, if the informer has listed.
    fn nodes(&self, svc: &str, port: &str) -> Option<NodeSet> {
        let s = self.state.lock().ok()?;
        if !s.synced {
            return None;
        }
        let mut nodes: Vec<NodeSpec> = (s.services.get(svc).into_iter())
            .flat_map(|objects| objects.values())
            .flat_map(|ports| ports.get(port).into_iter().flatten())
            .map(|(ip, p)| NodeSpec {
                host: ip.clone(),
                port: Some(*p),
                weight: self.opts.default_weight,
                priority: 0,
                metadata: Map::new(),
            })
            .collect();
        nodes.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        nodes.dedup_by(|a, b| a.host == b.host && a.port == b.port);
        Some(NodeSet { nodes })
    }

    /// The change signal of service `svc`, registered while the `Interest` lives.
    fn interest(self: &Arc<Self>, svc: &str) -> Interest {
        let rx = self.state.lock().ok().map(|mut s| {
            s.watchers.entry(svc.to_string()).or_insert_with(|| watch::channel(0).0).subscribe()
        });
        Interest { informer: self.clone(), svc: svc.to_string(), rx }
    }
}

/// A watch's subscription to one service's changes; the service's signal is dropped with the
/// last one.
struct Interest {
    informer: Arc<Informer>,
    svc: String,
    rx: Option<watch::Receiver<u64>>,
}

impl Interest {
    /// Waits for the next change of the service (forever without a signal).
    async fn changed(&mut self) {
        let Some(rx) = &mut self.rx else { return std::future::pending().await };
        if rx.changed().await.is_err() {
            std::future::pending().await
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        self.rx = None;
        if let Ok(mut s) = self.informer.state.lock()
            && s.watchers.get(&self.svc).is_some_and(|tx| tx.receiver_count() == 0)
        {
            s.watchers.remove(&self.svc);
        }
    }
}

impl KubernetesDiscovery {
    pub fn new(
        clusters: Vec<ClusterOptions>,
        connect: Duration,
        read: Duration,
    ) -> Result<Self, DiscoveryError> {
        let mut out = Vec::new();
        for opts in clusters {
            let compile = |list: &[String]| -> Result<Vec<regex::Regex>, DiscoveryError> {
                list.iter()
                    .map(|r| {
                        regex::Regex::new(r)
                            .map_err(|e| DiscoveryError::Config(format!("namespace_selector: {e}")))
                    })
                    .collect()
            };
            out.push(Arc::new(Informer {
                ns_match: compile(&opts.namespaces.matches)?,
                ns_not_match: compile(&opts.namespaces.not_matches)?,
                http: HttpClient::new(connect, read)?,
                state: Mutex::new(State::default()),
                version: watch::channel(0).0,
                started: std::sync::Once::new(),
                opts,
            }));
        }
        Ok(KubernetesDiscovery { clusters: out })
    }

    /// Splits `[id/]namespace/name:port` and finds the cluster.
    fn locate(&self, service_name: &str) -> Result<(Arc<Informer>, String, String), DiscoveryError> {
        let bad = || {
            DiscoveryError::Config(format!(
                "invalid service_name {service_name:?}: expected [id/]namespace/name:port"
            ))
        };
        let (path, port) = service_name.rsplit_once(':').ok_or_else(bad)?;
        let parts: Vec<&str> = path.split('/').collect();
        let multi = self.clusters.iter().any(|c| c.opts.id.is_some());
        let (cluster, ns, name) =
            match (parts.as_slice(), multi) {
                ([ns, name], false) => (self.clusters.first().cloned().ok_or_else(bad)?, *ns, *name),
                ([id, ns, name], true) => (
                    self.clusters.iter().find(|c| c.opts.id.as_deref() == Some(*id)).cloned().ok_or_else(
                        || DiscoveryError::Config(format!("no kubernetes cluster with id {id:?}")),
                    )?,
                    *ns,
                    *name,
                ),
                _ => return Err(bad()),
            };
        if ns.is_empty() || name.is_empty() || port.is_empty() {
            return Err(bad());
        }
        Ok((cluster, format!("{ns}/{name}"), port.to_string()))
    }

    fn start(cluster: &Arc<Informer>) {
        let c = cluster.clone();
        cluster.started.call_once(move || {
            tokio::spawn(c.run());
        });
    }
}

impl Discovery for KubernetesDiscovery {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn resolve<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Resolution, DiscoveryError>> {
        Box::pin(async move {
            let (cluster, svc, port) = self.locate(&query.service_name)?;
            Self::start(&cluster);
            cluster
                .nodes(&svc, &port)
                .map(|nodes| Resolution { nodes, valid_for: None })
                .ok_or_else(|| DiscoveryError::Unavailable("not listed yet".into()))
        })
    }

    fn watch(
        self: Arc<Self>,
        query: Query,
        tx: watch::Sender<Option<NodeSet>>,
        status: SharedStatus,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (cluster, svc, port) = match self.locate(&query.service_name) {
                Ok(x) => x,
                Err(e) => {
                    record_error(&status, "kubernetes", &query, &e);
                    return;
                }
            };
            // Subscribed before the first look, so no change falls between the two.
            let mut interest = cluster.interest(&svc);
            let mut changes = cluster.version.subscribe();
            Self::start(&cluster);
            let mut seen_error: Option<SystemTime> = None;
            loop {
                // While the API server fails, keep what was published and report the failure.
                let err = cluster.state.lock().ok().and_then(|s| s.last_error.clone());
                match err {
                    Some((at, e)) => {
                        if seen_error != Some(at) {
                            seen_error = Some(at);
                            // `Informer::fail` logged it, once for every service.
                            note_error(&status, &DiscoveryError::Unavailable(e));
                        }
                    }
                    None => {
                        if let Some(nodes) = cluster.nodes(&svc, &port) {
                            publish(&tx, &status, nodes);
                        }
                    }
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = interest.changed() => {}
                    _ = tx.closed() => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn informer(api: Url, endpoint_slices: bool) -> Arc<Informer> {
        informer_with(api, NamespaceSelector::default(), endpoint_slices)
    }

    fn informer_with(api: Url, namespaces: NamespaceSelector, endpoint_slices: bool) -> Arc<Informer> {
        let opts = ClusterOptions {
            id: None,
            api,
            token: Token::None,
            namespaces,
            label_selector: None,
            default_weight: 50,
            endpoint_slices,
        };
        let d = KubernetesDiscovery::new(vec![opts], Duration::from_secs(1), Duration::from_secs(5)).unwrap();
        let inf = d.clusters[0].clone();
        inf.state.lock().unwrap().synced = true;
        inf
    }

    fn endpoints(name: &str, ips: &[&str]) -> Value {
        let addresses: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        json!({"metadata": {"namespace": "ns", "name": name},
               "subsets": [{"addresses": addresses, "ports": [{"name": "http", "port": 80}]}]})
    }

    fn slice(name: &str, service: Option<&str>, ips: &[&str]) -> Value {
        let labels = match service {
            Some(s) => json!({"kubernetes.io/service-name": s}),
            None => json!({}),
        };
        json!({"metadata": {"namespace": "ns", "name": name, "labels": labels},
               "endpoints": [{"addresses": ips, "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 80}]})
    }

    fn event(kind: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap()
    }

    fn hosts(inf: &Informer, svc: &str) -> Vec<String> {
        inf.nodes(svc, "http").unwrap().nodes.into_iter().map(|n| n.host).collect()
    }

    #[tokio::test]
    async fn an_event_wakes_only_the_watches_of_the_services_it_changes() {
        let inf = informer(Url::parse("http://127.0.0.1:1").unwrap(), true);
        let mut web = inf.interest("ns/web");
        let mut api = inf.interest("ns/api");
        let changed = |i: &mut Interest| i.rx.as_mut().unwrap().has_changed().unwrap();
        let seen = |i: &mut Interest| {
            i.rx.as_mut().unwrap().borrow_and_update();
        };

        assert!(matches!(
            inf.apply(&event("ADDED", slice("web-a", Some("web"), &["10.0.0.1"]))),
            Ok(Next::Go)
        ));
        assert!(changed(&mut web) && !changed(&mut api));
        assert_eq!(hosts(&inf, "ns/web"), ["10.0.0.1"]);
        seen(&mut web);

        // A change that leaves the ready addresses as they were wakes nobody.
        inf.apply(&event("MODIFIED", slice("web-a", Some("web"), &["10.0.0.1"]))).unwrap();
        assert!(!changed(&mut web) && !changed(&mut api));

        // A slice that moves to another service wakes both.
        inf.apply(&event("MODIFIED", slice("web-a", Some("api"), &["10.0.0.1"]))).unwrap();
        assert!(changed(&mut web) && changed(&mut api));
        assert!(hosts(&inf, "ns/web").is_empty());
        assert_eq!(hosts(&inf, "ns/api"), ["10.0.0.1"]);
        seen(&mut web);
        seen(&mut api);

        // A slice that loses its service label is forgotten; so is a deleted one.
        inf.apply(&event("ADDED", slice("web-b", Some("web"), &["10.0.0.2"]))).unwrap();
        inf.apply(&event("MODIFIED", slice("web-a", None, &["10.0.0.1"]))).unwrap();
        assert!(hosts(&inf, "ns/api").is_empty());
        inf.apply(&event("DELETED", slice("web-b", Some("web"), &["10.0.0.2"]))).unwrap();
        assert!(hosts(&inf, "ns/web").is_empty());
        let s = inf.state.lock().unwrap();
        assert!(s.owners.is_empty() && s.services.is_empty());
        drop(s);

        // The last watch of a service takes its signal with it.
        drop(web);
        let again = inf.interest("ns/api");
        drop(api);
        assert_eq!(inf.state.lock().unwrap().watchers.len(), 1);
        drop(again);
        assert!(inf.state.lock().unwrap().watchers.is_empty());
    }

    /// Serves one watch request with `body` in chunks of 1, 2, 3, ... bytes, so events arrive
    /// split at every kind of place.
    async fn serve_watch(body: Vec<u8>) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
            let (mut at, mut size) = (0, 1);
            while at < body.len() {
                let piece = &body[at..(at + size).min(body.len())];
                let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                if conn.write_all(&chunk).await.is_err() || conn.flush().await.is_err() {
                    return;
                }
                at += piece.len();
                size = size % 4096 + 1;
            }
            let _ = conn.write_all(b"0\r\n\r\n").await;
        });
        Url::parse(&format!("http://{addr}")).unwrap()
    }

    #[tokio::test]
    async fn watch_events_split_anywhere_are_applied_in_order() {
        let mut body = Vec::new();
        for (kind, object) in [
            ("ADDED", endpoints("web", &["10.0.0.1"])),
            ("ADDED", endpoints("db", &["10.0.1.1"])),
            ("MODIFIED", endpoints("web", &["10.0.0.2", "10.0.0.3"])),
            ("BOOKMARK", json!({"metadata": {"resourceVersion": "7"}})),
            ("DELETED", endpoints("db", &[])),
        ] {
            body.extend(event(kind, object));
            body.extend(b"\n\n");
        }
        let inf = informer(serve_watch(body).await, false);
        assert_eq!(inf.watch_once().await.ok(), Some(false), "the stream ends cleanly");
        assert_eq!(hosts(&inf, "ns/web"), ["10.0.0.2", "10.0.0.3"]);
        assert!(hosts(&inf, "ns/db").is_empty());
        assert_eq!(inf.state.lock().unwrap().resource_version, "7");
    }

    /// A list answer without `items` is a failed list (which keeps the state it would have
    /// replaced), not an empty cluster; `"items": []` is one.
    #[tokio::test]
    async fn a_list_answer_without_items_is_a_failed_list() {
        for body in ["{}", "null", "0", r#"{"kind": "Status", "items": {}}"#] {
            let inf = informer(serve_watch(body.as_bytes().to_vec()).await, false);
            let err = inf.list().await.err().unwrap_or_default();
            assert!(err.contains("no items array"), "{body}: {err}");
        }
        for empty in [
            r#"{"kind": "EndpointsList", "metadata": {"resourceVersion": "3"}, "items": []}"#,
            r#"{"kind": "EndpointsList", "metadata": {"resourceVersion": "3"}, "items": null}"#,
        ] {
            let inf = informer(serve_watch(empty.as_bytes().to_vec()).await, false);
            assert_eq!(inf.list().await, Ok(()), "{empty}");
        }
    }

    #[tokio::test]
    async fn a_watch_event_without_end_breaks_the_watch_instead_of_growing() {
        let inf = informer(serve_watch(vec![b'x'; MAX_EVENT + 8192]).await, false);
        let err = inf.watch_once().await.err().unwrap_or_default();
        assert!(err.contains("longer than 16 MiB"), "{err}");
    }

    /// An informer that leaves out `kube-*` namespaces, as `namespace_selector.not_match` would.
    fn selective(endpoint_slices: bool) -> Arc<Informer> {
        let namespaces = NamespaceSelector { not_matches: vec!["^kube-".into()], ..Default::default() };
        informer_with(Url::parse("http://127.0.0.1:1").unwrap(), namespaces, endpoint_slices)
    }

    fn target(pod: &str) -> Value {
        json!({"kind": "Pod", "namespace": "default", "name": pod, "uid": "6a0f1c2e-6d1b-4a55-9c3e-0b6f0c1d2e3f"})
    }

    /// A ready address on a port: (port name, ip, port).
    type Ready = (&'static str, &'static str, u16);

    /// The subsets of an Endpoints object as the API server serves it, each with the ready
    /// addresses it must give.
    fn subsets() -> Vec<(Value, Vec<Ready>)> {
        vec![
            (
                json!({
                    "addresses": [
                        {"ip": "10.244.0.5", "nodeName": "node-a", "targetRef": target("web-1")},
                        {"ip": "10.244.1.7", "nodeName": "node-b", "targetRef": target("web-2")}
                    ],
                    "notReadyAddresses": [{"ip": "10.244.2.9", "nodeName": "node-c", "targetRef": target("web-3")}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                              {"name": "metrics", "port": 9090, "protocol": "TCP", "appProtocol": "http"}]
                }),
                vec![
                    ("http", "10.244.0.5", 8080),
                    ("http", "10.244.1.7", 8080),
                    ("metrics", "10.244.0.5", 9090),
                    ("metrics", "10.244.1.7", 9090),
                ],
            ),
            // An unnamed port is addressed by its number.
            (
                json!({"addresses": [{"ip": "fd00::5"}], "ports": [{"port": 53, "protocol": "UDP"}]}),
                vec![("53", "fd00::5", 53)],
            ),
        ]
    }

    fn endpoints_object(ns: &str) -> Value {
        json!({
            "kind": "Endpoints", "apiVersion": "v1",
            "metadata": {"name": "web", "namespace": ns, "uid": "0c6f2d3a-1111-4b2c-9d3e-2f4a5b6c7d8e",
                         "resourceVersion": "12345", "creationTimestamp": "2024-01-01T00:00:00Z",
                         "labels": {"app": "web"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-01-01T00:00:00Z"}},
            "subsets": subsets().into_iter().map(|(s, _)| s).collect::<Vec<_>>()
        })
    }

    /// An EndpointSlice's ports and endpoints as the API server serves them: (ports, [(endpoint,
    /// its addresses if ready)]).
    fn slice_parts() -> (Value, Vec<(Value, Vec<&'static str>)>) {
        let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "", "port": 9090, "protocol": "TCP"}]);
        let endpoints = vec![
            (
                json!({"addresses": ["10.244.0.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
                       "nodeName": "node-a", "zone": "zone-a", "targetRef": target("web-1")}),
                vec!["10.244.0.5"],
            ),
            // No `ready` condition means ready.
            (
                json!({"addresses": ["10.244.1.7"], "conditions": {}, "targetRef": target("web-2")}),
                vec!["10.244.1.7"],
            ),
            (
                json!({"addresses": ["10.244.2.9"], "conditions": {"ready": false, "serving": false, "terminating": true},
                       "targetRef": target("web-3")}),
                vec![],
            ),
        ];
        (ports, endpoints)
    }

    fn slice_object(ns: &str) -> Value {
        let (ports, endpoints) = slice_parts();
        json!({
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": "web-abc12", "namespace": ns, "resourceVersion": "12346",
                         "generateName": "web-", "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web"}],
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": endpoints.into_iter().map(|(e, _)| e).collect::<Vec<_>>(),
            "ports": ports
        })
    }

    fn list(v: &Value) -> impl Iterator<Item = &Value> {
        v.as_array().into_iter().flatten()
    }

    /// The ready (ip, port) pairs a parsed object holds, by port name.
    fn sorted(ports: &PortMap) -> Vec<(&str, &str, u16)> {
        let mut out: Vec<_> = ports
            .iter()
            .flat_map(|(name, addrs)| addrs.iter().map(move |(ip, p)| (name.as_str(), ip.as_str(), *p)))
            .collect();
        out.sort();
        out
    }

    /// Whatever object the API server sends, parsing never panics; only addresses the object
    /// gives as ready become nodes; and every subset (endpoint) the mutations left as it was,
    /// in an object still in a watched namespace, still gives its addresses.
    #[test]
    fn any_object_parses_and_only_ready_addresses_come_out() {
        let (eps, slices) = (selective(false), selective(true));
        let (key, svc, ports) = eps.parse(&endpoints_object("default")).unwrap();
        assert_eq!((key.as_str(), svc.as_str()), ("default/web", "default/web"));
        let mut want: Vec<_> = subsets().into_iter().flat_map(|(_, p)| p).collect();
        want.sort();
        assert_eq!(sorted(&ports), want);
        assert!(eps.parse(&endpoints_object("kube-system")).is_none(), "namespace left out");
        let (key, svc, ports) = slices.parse(&slice_object("default")).unwrap();
        assert_eq!((key.as_str(), svc.as_str()), ("default/web-abc12", "default/web"));
        assert_eq!(
            sorted(&ports),
            [
                ("9090", "10.244.0.5", 9090),
                ("9090", "10.244.1.7", 9090),
                ("http", "10.244.0.5", 8080),
                ("http", "10.244.1.7", 8080)
            ]
        );

        let (slice_ports, slice_endpoints) = slice_parts();
        let payloads =
            [endpoints_object("default"), slice_object("default"), endpoints_object("kube-system")];
        fuzz::each_seed(2_000, &payloads, |_, input| {
            let Some(obj) = input.value() else { return };
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or("?");
            let watched = obj["metadata"]["namespace"].is_string() && !ns.starts_with("kube-");
            if let Some((key, _, ports)) = eps.parse(&obj) {
                assert!(watched);
                assert_eq!(key, format!("{ns}/{}", obj["metadata"]["name"].as_str().unwrap_or("?")));
                let ready: Vec<&str> = list(&obj["subsets"])
                    .flat_map(|s| list(&s["addresses"]))
                    .filter_map(|a| a["ip"].as_str())
                    .collect();
                let got = sorted(&ports);
                assert!(got.iter().all(|(_, ip, _)| ready.contains(ip)), "not a ready address: {got:?}");
                assert!(got.iter().all(|(_, ip, port)| *port > 0 && is_ip(ip)), "not a node: {got:?}");
                for (subset, want) in subsets() {
                    if list(&obj["subsets"]).any(|s| *s == subset) {
                        assert!(want.iter().all(|w| got.contains(w)), "{want:?} lost");
                    }
                }
            }
            if let Some((_, svc, ports)) = slices.parse(&obj) {
                assert!(watched);
                let name = obj["metadata"]["labels"]["kubernetes.io/service-name"].as_str().unwrap_or("?");
                assert_eq!(svc, format!("{ns}/{name}"));
                let ready: Vec<&str> = list(&obj["endpoints"])
                    .filter(|e| e["conditions"]["ready"].as_bool() != Some(false))
                    .flat_map(|e| list(&e["addresses"]))
                    .filter_map(Value::as_str)
                    .collect();
                let got = sorted(&ports);
                assert!(got.iter().all(|(_, ip, _)| ready.contains(ip)), "not a ready address: {got:?}");
                assert!(got.iter().all(|(_, ip, port)| *port > 0 && is_ip(ip)), "not a node: {got:?}");
                if obj["ports"] == slice_ports {
                    for (endpoint, ips) in &slice_endpoints {
                        if list(&obj["endpoints"]).any(|e| e == endpoint) {
                            for ip in ips {
                                assert!(
                                    got.contains(&("http", ip, 8080)) && got.contains(&("9090", ip, 9090))
                                );
                            }
                        }
                    }
                }
            }
        });
    }

    /// Every object key is owned by one service, which holds it, and no service is empty.
    fn assert_consistent(s: &State) {
        for (key, svc) in &s.owners {
            assert!(
                s.services.get(svc).is_some_and(|objects| objects.contains_key(key)),
                "{key} not in {svc}"
            );
        }
        for (svc, objects) in &s.services {
            assert!(!objects.is_empty(), "{svc} kept empty");
            assert!(objects.keys().all(|key| s.owners.get(key) == Some(svc)), "{svc} holds another's object");
        }
    }

    /// Whatever line the watch stream carries, applying it never panics; the state stays
    /// consistent; an event that applies leaves the object as it now parses (or forgotten);
    /// and after all of it, a good event still gives its nodes.
    #[test]
    fn any_watch_line_applies_and_the_state_stays_consistent() {
        let informers = [selective(false), selective(true)];
        let ev = |kind: &str, object: Value| json!({"type": kind, "object": object});
        let payloads = [
            ev("ADDED", endpoints_object("default")),
            ev("MODIFIED", slice_object("default")),
            ev("MODIFIED", endpoints_object("kube-system")),
            ev("DELETED", slice_object("default")),
            ev("BOOKMARK", json!({"kind": "Endpoints", "metadata": {"resourceVersion": "12400"}})),
            ev(
                "ERROR",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                               "reason": "Expired", "message": "too old resource version: 1 (12345)"}),
            ),
        ];
        fuzz::each_seed(2_000, &payloads, |_, input| {
            let line = input.bytes();
            let event: Option<Value> = serde_json::from_slice(&line).ok();
            for inf in &informers {
                let applied = inf.apply(&line);
                let s = inf.state.lock().unwrap();
                assert_consistent(&s);
                let (Ok(Next::Go), Some(event)) = (&applied, &event) else { continue };
                let md = &event["object"]["metadata"];
                if let Some(rv) = md["resourceVersion"].as_str() {
                    assert_eq!(s.resource_version, rv);
                }
                let key =
                    md["namespace"].as_str().zip(md["name"].as_str()).map(|(ns, n)| format!("{ns}/{n}"));
                match (event["type"].as_str(), key) {
                    (Some("ADDED" | "MODIFIED"), key) => match inf.parse(&event["object"]) {
                        Some((key, svc, ports)) => assert_eq!(s.services[&svc].get(&key), Some(&ports)),
                        None => assert!(key.is_none_or(|k| !s.owners.contains_key(&k))),
                    },
                    (Some("DELETED"), Some(key)) => assert!(!s.owners.contains_key(&key)),
                    _ => {}
                }
                let services: Vec<String> = s.services.keys().cloned().collect();
                drop(s);
                for svc in services {
                    for port in ["http", "metrics", "53", "9090", ""] {
                        let _ = inf.nodes(&svc, port);
                    }
                }
            }
        });
        let [eps, slices] = informers;
        eps.apply(&serde_json::to_vec(&payloads[0]).unwrap()).unwrap();
        let hosts = |inf: &Informer, port: &str| -> Vec<(String, Option<u16>)> {
            inf.nodes("default/web", port).unwrap().nodes.into_iter().map(|n| (n.host, n.port)).collect()
        };
        assert_eq!(
            hosts(&eps, "http"),
            [("10.244.0.5".to_string(), Some(8080)), ("10.244.1.7".to_string(), Some(8080))]
        );
        assert_eq!(hosts(&eps, "53"), [("fd00::5".to_string(), Some(53))]);
        slices.apply(&serde_json::to_vec(&payloads[1]).unwrap()).unwrap();
        assert!(hosts(&slices, "http").contains(&("10.244.1.7".to_string(), Some(8080))));
    }
}
