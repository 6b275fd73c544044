//! Kubernetes (`discovery.kubernetes`, APISIX's `apisix/discovery/kubernetes`), following the
//! Kubernetes API concepts for list and watch
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>).
//!
//! One informer per cluster lists Endpoints (or EndpointSlices with `watch_endpoint_slices`),
//! then watches from the list's `resourceVersion` with bookmarks; `410 Gone` relists, a broken
//! watch reconnects with backoff from the last version seen. Only ready addresses become nodes.
//! `service_name` is `namespace/name:portName` (`id/namespace/name:portName` for several
//! clusters); an unnamed port is addressed by its number.
//!
//! Written on the crate's small HTTP client rather than `kube`: the informer is a few hundred
//! lines, while `kube` with `k8s-openapi` would add minutes to every build on two cores.

use std::collections::{HashMap, HashSet};
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
    publish, record_error,
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

#[derive(Default)]
struct State {
    /// Object key (`ns/object`) -> (service key `ns/service`, ports).
    objects: HashMap<String, (String, PortMap)>,
    resource_version: String,
    synced: bool,
    last_error: Option<(SystemTime, String)>,
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

    /// Parses one Endpoints or EndpointSlice object: (object key, service key, ports).
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
                        .filter_map(|a| a.as_str().map(str::to_string))
                })
                .collect();
            for p in obj["ports"].as_array().into_iter().flatten() {
                let Some(port) = p["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
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
                .filter_map(|a| a["ip"].as_str().map(str::to_string))
                .collect();
            for p in subset["ports"].as_array().into_iter().flatten() {
                let Some(port) = p["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
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

    /// Lists everything (paged) and replaces the state.
    async fn list(&self) -> Result<(), String> {
        let mut objects = HashMap::new();
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
            for item in v["items"].as_array().into_iter().flatten() {
                if let Some((k, svc, ports)) = self.parse(item) {
                    objects.insert(k, (svc, ports));
                }
            }
            match v["metadata"]["continue"].as_str().filter(|c| !c.is_empty()) {
                Some(c) => cont = Some(c.to_string()),
                None => break v["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string(),
            }
        };
        if let Ok(mut s) = self.state.lock() {
            s.objects = objects;
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
        let path = format!(
            "{}?watch=true&allowWatchBookmarks=true&timeoutSeconds=1800&resourceVersion={}{}",
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
        // Bookmarks arrive about once a minute; a silent watch for much longer is dead.
        let idle = Duration::from_secs(1800 + 120);
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => return Err("watch went silent".into()),
                Ok(None) => return Ok(false),
                Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let ev: Value = serde_json::from_slice(&line).map_err(|e| format!("watch event: {e}"))?;
                let obj = &ev["object"];
                let new_rv = obj["metadata"]["resourceVersion"].as_str().map(str::to_string);
                match ev["type"].as_str() {
                    Some("ADDED") | Some("MODIFIED") => {
                        if let Some((k, svc, ports)) = self.parse(obj)
                            && let Ok(mut s) = self.state.lock()
                        {
                            s.objects.insert(k, (svc, ports));
                        }
                    }
                    Some("DELETED") => {
                        let md = &obj["metadata"];
                        if let (Some(ns), Some(name)) = (md["namespace"].as_str(), md["name"].as_str())
                            && let Ok(mut s) = self.state.lock()
                        {
                            s.objects.remove(&format!("{ns}/{name}"));
                        }
                    }
                    Some("BOOKMARK") => {}
                    Some("ERROR") => {
                        if obj["code"].as_u64() == Some(410) {
                            return Ok(true);
                        }
                        return Err(format!("watch error: {}", obj["message"].as_str().unwrap_or("unknown")));
                    }
                    other => return Err(format!("unknown watch event {other:?}")),
                }
                if let Some(rv) = new_rv
                    && let Ok(mut s) = self.state.lock()
                {
                    s.resource_version = rv;
                    s.last_error = None;
                }
                self.bump();
            }
        }
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
        let mut nodes: Vec<NodeSpec> = s
            .objects
            .values()
            .filter(|(k, _)| k == svc)
            .flat_map(|(_, ports)| ports.get(port).into_iter().flatten())
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
            Self::start(&cluster);
            let mut changes = cluster.version.subscribe();
            let mut seen_error: HashSet<SystemTime> = HashSet::new();
            loop {
                // While the API server fails, keep what was published and report the failure.
                let err = cluster.state.lock().ok().and_then(|s| s.last_error.clone());
                match err {
                    Some((at, e)) => {
                        if seen_error.insert(at) {
                            record_error(&status, "kubernetes", &query, &DiscoveryError::Unavailable(e));
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
                    _ = tx.closed() => return,
                }
            }
        })
    }
}
