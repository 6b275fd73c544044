//! Node sources: where an upstream's nodes come from, feeding [`Upstream::apply`].
//!
//! * static IP nodes are applied once, at build;
//! * static host names are resolved in the background through the global resolver and
//!   re-resolved at their TTL, never on the request path;
//! * discovered nodes come from one shared watch per (backend, query) in the [`DiscoveryHub`];
//!   an upstream with several sources merges their sets by address.
//!
//! A failing source never reaches `apply`: the last good set stays.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use strait_discovery::dns::DnsDiscovery;
use strait_discovery::{Discovery, NodeSet, Query, SharedStatus, SyncStatus};
use strait_protocols::Scheme;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use super::{ResolvedNode, Upstream};
use crate::config::discovery::DumpOptions;
use crate::config::resources::{DiscoverySource, NodeSource, NodeSpec};

struct WatchEntry {
    tx: watch::Sender<Option<NodeSet>>,
    status: SharedStatus,
    task: JoinHandle<()>,
}

/// Registry backends and the shared watches on them.
pub struct DiscoveryHub {
    backends: HashMap<&'static str, Arc<dyn Discovery>>,
    watches: Mutex<HashMap<(String, Query), WatchEntry>>,
    background: tokio::runtime::Handle,
    /// Resolver for host names in static node lists.
    pub global_dns: Option<Arc<DnsDiscovery>>,
    /// Node sets loaded from snapshots on disk, served until the registry answers.
    preload: Mutex<HashMap<(String, Query), NodeSet>>,
    dumps: Vec<(String, DumpOptions)>,
    dumper: Mutex<Option<JoinHandle<()>>>,
}

/// One watch's state, for `/v1/discovery/{type}/dump`.
#[derive(Debug, Clone)]
pub struct WatchDump {
    pub kind: String,
    pub query: Query,
    pub nodes: Option<NodeSet>,
    pub status: SyncStatus,
}

impl DiscoveryHub {
    pub fn new(
        backends: Vec<Arc<dyn Discovery>>,
        global_dns: Option<Arc<DnsDiscovery>>,
        background: tokio::runtime::Handle,
        dumps: Vec<(String, DumpOptions)>,
    ) -> Arc<Self> {
        let mut preload = HashMap::new();
        for (kind, d) in dumps.iter().filter(|(_, d)| d.load_on_init) {
            match dump::load(kind, d) {
                Ok(sets) => {
                    tracing::info!(discovery = %kind, path = %d.path.display(), services = sets.len(), "loaded discovery snapshot");
                    preload.extend(sets);
                }
                Err(e) => {
                    tracing::info!(discovery = %kind, path = %d.path.display(), "no discovery snapshot loaded: {e}")
                }
            }
        }
        let hub = Arc::new(DiscoveryHub {
            backends: backends.into_iter().map(|b| (b.kind(), b)).collect(),
            watches: Mutex::new(HashMap::new()),
            background: background.clone(),
            global_dns,
            preload: Mutex::new(preload),
            dumps,
            dumper: Mutex::new(None),
        });
        if !hub.dumps.is_empty() {
            let weak = Arc::downgrade(&hub);
            let task = background.spawn(async move {
                let mut written: HashMap<String, String> = HashMap::new();
                // What each snapshot was rendered from: it is rendered again only when a
                // followed watch came, went or changed its nodes (with 1,000 services of 50
                // nodes a rendering is about 10 MB of JSON).
                let mut rendered: HashMap<String, u64> = HashMap::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let Some(hub) = weak.upgrade() else { return };
                    for (kind, d) in &hub.dumps {
                        let key = hub.dump_key(kind);
                        if rendered.get(kind) == Some(&key) {
                            continue;
                        }
                        let text = dump::render(&hub.dump(kind));
                        if written.get(kind) != Some(&text) {
                            match dump::write(&d.path, &text) {
                                Ok(()) => {
                                    written.insert(kind.clone(), text);
                                }
                                Err(e) => {
                                    tracing::warn!(discovery = %kind, error = %e, "cannot write the discovery snapshot");
                                    continue;
                                }
                            }
                        }
                        rendered.insert(kind.clone(), key);
                    }
                }
            });
            *hub.dumper.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        hub
    }

    /// Subscribes to `query` on backend `kind`, starting the watch if nobody watches it yet.
    pub fn subscribe(&self, kind: &str, query: Query) -> Option<watch::Receiver<Option<NodeSet>>> {
        let backend = self.backends.get(kind)?.clone();
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let key = (kind.to_string(), query.clone());
        if let Some(e) = w.get(&key)
            && !e.task.is_finished()
        {
            return Some(e.tx.subscribe());
        }
        // Keep the last set of a finished watch, so a restarted watch starts from it; else
        // start from a snapshot on disk, if one was loaded.
        let initial = w
            .get(&key)
            .and_then(|e| e.tx.borrow().clone())
            .or_else(|| self.preload.lock().ok().and_then(|p| p.get(&key).cloned()));
        let (tx, rx) = watch::channel(initial);
        let status = w.get(&key).map(|e| e.status.clone()).unwrap_or_default();
        let task = self.background.spawn(backend.watch(query, tx.clone(), status.clone()));
        w.insert(key, WatchEntry { tx, status, task });
        Some(rx)
    }

    /// Every watch of backend `kind` that some upstream follows. (`prune` runs at a reload
    /// before the replaced upstreams' feeds have let go of their watches: those end on their
    /// own, and their entries stay until the next prune, a tick of the resources check later,
    /// but are not shown.)
    pub fn dump(&self, kind: &str) -> Vec<WatchDump> {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<WatchDump> = w
            .iter()
            .filter(|((k, _), e)| k == kind && e.tx.receiver_count() > 0)
            .map(|((k, q), e)| WatchDump {
                kind: k.clone(),
                query: q.clone(),
                nodes: e.tx.borrow().clone(),
                status: e.status.lock().map(|s| s.clone()).unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| a.query.service_name.cmp(&b.query.service_name));
        out
    }

    /// A digest of what `dump(kind)` would show, without copying any node: which watches are
    /// followed, and how many times each changed its nodes.
    fn dump_key(&self, kind: &str) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let state = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        // A sum, so the map's order does not matter.
        w.iter().filter(|((k, _), e)| k == kind && e.tx.receiver_count() > 0).fold(0u64, |sum, (key, e)| {
            let mut h = state.build_hasher();
            key.hash(&mut h);
            e.status.lock().map(|s| s.changes).unwrap_or(0).hash(&mut h);
            e.tx.borrow().is_some().hash(&mut h);
            sum.wrapping_add(h.finish())
        })
    }

    /// Watches the hub holds, followed or not yet pruned (for tests).
    pub fn watch_count(&self) -> usize {
        self.watches.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether backend `kind` is configured.
    pub fn has(&self, kind: &str) -> bool {
        self.backends.contains_key(kind)
    }

    /// Ends watches nobody subscribes to any more.
    pub fn prune(&self) {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|_, e| {
            let live = e.tx.receiver_count() > 0;
            if !live {
                e.task.abort();
            }
            live
        });
    }
}

impl Drop for DiscoveryHub {
    fn drop(&mut self) {
        if let Ok(w) = self.watches.lock() {
            for e in w.values() {
                e.task.abort();
            }
        }
        if let Some(t) = self.dumper.lock().ok().and_then(|mut d| d.take()) {
            t.abort();
        }
    }
}

/// Snapshots of discovered nodes on disk (`dump`), so a restarted gateway serves before the
/// registry answers.
mod dump {
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde_json::{Value, json};
    use strait_discovery::{NodeSet, NodeSpec, Query};

    use super::WatchDump;
    use crate::config::discovery::DumpOptions;

    pub fn render(watches: &[WatchDump]) -> String {
        let services: Vec<Value> = watches
            .iter()
            .filter_map(|w| {
                let nodes = w.nodes.as_ref()?;
                Some(json!({
                    "service_name": w.query.service_name,
                    "args": w.query.args,
                    "scheme": w.query.scheme,
                    "nodes": nodes.nodes.iter().map(|n| json!({
                        "host": n.host, "port": n.port, "weight": n.weight, "priority": n.priority, "metadata": n.metadata,
                    })).collect::<Vec<_>>(),
                }))
            })
            .collect();
        json!({ "services": services }).to_string()
    }

    pub fn write(path: &std::path::Path, text: &str) -> std::io::Result<()> {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut v: Value = serde_json::from_str(text).unwrap_or_else(|_| json!({}));
        v["saved_at"] = json!(secs);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, v.to_string())?;
        std::fs::rename(tmp, path)
    }

    pub fn load(kind: &str, d: &DumpOptions) -> Result<HashMap<(String, Query), NodeSet>, String> {
        let text = std::fs::read_to_string(&d.path).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        if let (Some(expire), Some(saved)) = (d.expire, v["saved_at"].as_u64()) {
            let age = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|n| n.as_secs())
                .unwrap_or(0)
                .saturating_sub(saved);
            if Duration::from_secs(age) > expire {
                return Err(format!("snapshot is {age} s old (expire {} s)", expire.as_secs()));
            }
        }
        let mut out = HashMap::new();
        for s in v["services"].as_array().into_iter().flatten() {
            let (Some(name), Some(scheme)) = (s["service_name"].as_str(), s["scheme"].as_str()) else {
                continue;
            };
            let args: Vec<(String, String)> = s["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect();
            let nodes: Vec<NodeSpec> = s["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| {
                    Some(NodeSpec {
                        host: n["host"].as_str()?.to_string(),
                        port: n["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
                        weight: n["weight"].as_u64().unwrap_or(1) as u32,
                        priority: n["priority"].as_i64().unwrap_or(0) as i32,
                        metadata: n["metadata"].as_object().cloned().unwrap_or_default(),
                    })
                })
                .collect();
            let q = Query { service_name: name.to_string(), args, scheme: scheme.to_string() };
            out.insert((kind.to_string(), q), NodeSet { nodes });
        }
        Ok(out)
    }
}

/// Starts feeding `up` from its node source. Returns the feed task, if one is needed.
pub fn start(up: &Arc<Upstream>, hub: &Arc<DiscoveryHub>) -> Option<AbortHandle> {
    match &up.spec.nodes {
        NodeSource::Static(list) => {
            let all_ip = list.iter().all(|n| n.host.parse::<IpAddr>().is_ok());
            if all_ip {
                up.apply(static_nodes(list, up.spec.scheme, &HashMap::new()));
                mark_ok(up);
                None
            } else {
                let (up, hub2) = (up.clone(), hub.clone());
                Some(hub.background.spawn(resolve_static(up, hub2)).abort_handle())
            }
        }
        NodeSource::Discovery(sources) => {
            let mut rxs = Vec::new();
            for s in sources {
                let q = query_of(s, up.spec.scheme);
                match hub.subscribe(&s.kind, q) {
                    Some(rx) => rxs.push(rx),
                    None => {
                        tracing::error!(upstream = %up.spec.id, discovery = %s.kind, "discovery backend is not configured");
                    }
                }
            }
            // What the sources already hold (a running watch, a snapshot on disk) serves at once.
            let mut applied = None;
            if let Some(nodes) = merge(up, &mut rxs) {
                up.apply(nodes.clone());
                applied = Some(nodes);
            }
            let up = up.clone();
            Some(hub.background.spawn(follow(up, rxs, applied)).abort_handle())
        }
    }
}

fn query_of(s: &DiscoverySource, scheme: Scheme) -> Query {
    Query { service_name: s.service_name.clone(), args: s.args.clone(), scheme: scheme.as_str().to_string() }
}

fn mark_ok(up: &Upstream) {
    let mut s = up.source_status.lock().unwrap_or_else(|e| e.into_inner());
    s.last_success = Some(SystemTime::now());
}

/// The port a node without one gets: the scheme's default for HTTP-family schemes; stream
/// upstreams drop such nodes (APISIX).
fn fill_port(port: Option<u16>, scheme: Scheme) -> Option<u16> {
    match port {
        Some(p) => Some(p),
        None => match scheme.default_port() {
            0 => None,
            p => Some(p),
        },
    }
}

/// Static nodes with `resolved` addresses for host names.
fn static_nodes(list: &[NodeSpec], scheme: Scheme, resolved: &HashMap<String, IpAddr>) -> Vec<ResolvedNode> {
    list.iter()
        .filter_map(|n| {
            let ip = n.host.parse::<IpAddr>().ok().or_else(|| resolved.get(&n.host).copied())?;
            let port = fill_port(n.port, scheme)?;
            Some(ResolvedNode {
                addr: SocketAddr::new(ip, port),
                host: n.host.clone(),
                port,
                weight: n.weight,
                priority: n.priority,
                metadata: n.metadata.clone(),
            })
        })
        .collect()
}

/// The one address a name's node gets, as APISIX gives it one: the current one while the
/// answer still holds it, else the lowest IPv4 address (IPv6 without any), so a name whose
/// server rotates its answers (round-robin DNS) keeps its node, health and pooled connections
/// from one re-resolution to the next.
fn stable_pick(current: Option<IpAddr>, ips: &[IpAddr]) -> Option<IpAddr> {
    if let Some(c) = current.filter(|c| ips.contains(c)) {
        return Some(c);
    }
    ips.iter().filter(|i| i.is_ipv4()).min().or(ips.iter().min()).copied()
}

async fn resolve_static(up: Arc<Upstream>, hub: Arc<DiscoveryHub>) {
    let NodeSource::Static(list) = &up.spec.nodes else {
        return;
    };
    let Some(dns) = hub.global_dns.clone() else {
        tracing::error!(upstream = %up.spec.id, "no DNS resolver available for host names in nodes");
        return;
    };
    let mut names: Vec<String> =
        list.iter().filter(|n| n.host.parse::<IpAddr>().is_err()).map(|n| n.host.clone()).collect();
    names.sort();
    names.dedup();
    let mut known: HashMap<String, IpAddr> = HashMap::new();
    let mut applied: Option<Vec<ResolvedNode>> = None;
    loop {
        let mut next = Duration::from_secs(3600);
        let mut failed = false;
        for name in &names {
            match dns.lookup_host(name).await {
                Ok((ips, ttl)) => {
                    if let Some(ip) = stable_pick(known.get(name).copied(), &ips) {
                        known.insert(name.clone(), ip);
                    }
                    next = next.min(ttl);
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(upstream = %up.spec.id, host = %name, error = %e, "cannot resolve node host; keeping its last address");
                    let mut s = up.source_status.lock().unwrap_or_else(|e| e.into_inner());
                    s.last_error = Some((SystemTime::now(), format!("{name}: {e}")));
                }
            }
        }
        let nodes = static_nodes(list, up.spec.scheme, &known);
        if applied.as_ref() != Some(&nodes) {
            up.apply(nodes.clone());
            applied = Some(nodes);
        }
        if !failed {
            mark_ok(&up);
        }
        let delay = if failed { next.min(Duration::from_secs(2)) } else { next };
        tokio::time::sleep(delay.max(Duration::from_secs(1))).await;
    }
}

/// Merges what every source has now; `None` when no source ever answered.
fn merge(up: &Upstream, rxs: &mut [watch::Receiver<Option<NodeSet>>]) -> Option<Vec<ResolvedNode>> {
    let mut any = false;
    let mut nodes = Vec::new();
    for rx in rxs.iter_mut() {
        let Some(set) = rx.borrow_and_update().clone() else { continue };
        any = true;
        for n in set.nodes {
            let Ok(ip) = n.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else {
                // Consul's names are looked up by its backend; other registries must give
                // addresses. Merged only when a set changes, so this is said once a change.
                tracing::warn!(upstream = %up.spec.id, host = %n.host, "discovered node address is not an IP address; left out");
                continue;
            };
            let Some(port) = fill_port(n.port, up.spec.scheme) else { continue };
            nodes.push(ResolvedNode {
                addr: SocketAddr::new(ip, port),
                host: n.host,
                port,
                weight: n.weight,
                priority: n.priority,
                metadata: n.metadata,
            });
        }
    }
    any.then_some(nodes)
}

/// Applies the merged sets of `rxs` whenever one changes.
async fn follow(
    up: Arc<Upstream>,
    mut rxs: Vec<watch::Receiver<Option<NodeSet>>>,
    mut applied: Option<Vec<ResolvedNode>>,
) {
    if rxs.is_empty() {
        return;
    }
    loop {
        if let Some(nodes) = merge(&up, &mut rxs) {
            mark_ok(&up);
            if applied.as_ref() != Some(&nodes) {
                up.apply(nodes.clone());
                applied = Some(nodes);
            }
        }
        // Wait for any source to change.
        let (res, idx) = {
            let (res, idx, _) =
                futures_util::future::select_all(rxs.iter_mut().map(|rx| Box::pin(rx.changed()))).await;
            (res, idx)
        };
        if res.is_err() {
            // A watch ended (its backend task stopped); nothing more will come from it.
            rxs.remove(idx);
            if rxs.is_empty() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name whose answers rotate keeps its address while the answer holds it; a new one is
    /// the lowest IPv4 address, whatever the answer's order.
    #[test]
    fn a_rotating_answer_keeps_the_node_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = stable_pick(None, &[ip("10.0.0.3"), ip("10.0.0.1"), ip("fd00::1")]);
        assert_eq!(first, Some(ip("10.0.0.1")));
        assert_eq!(stable_pick(first, &[ip("10.0.0.3"), ip("10.0.0.2"), ip("10.0.0.1")]), first);
        assert_eq!(stable_pick(first, &[ip("10.0.0.3"), ip("10.0.0.2")]), Some(ip("10.0.0.2")));
        assert_eq!(stable_pick(None, &[ip("fd00::2"), ip("fd00::1")]), Some(ip("fd00::1")));
        assert_eq!(stable_pick(first, &[]), None);
    }
}
