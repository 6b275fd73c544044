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
    ) -> Self {
        DiscoveryHub {
            backends: backends.into_iter().map(|b| (b.kind(), b)).collect(),
            watches: Mutex::new(HashMap::new()),
            background,
            global_dns,
        }
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
        // Keep the last set of a finished watch, so a restarted watch starts from it.
        let initial = w.get(&key).and_then(|e| e.tx.borrow().clone());
        let (tx, rx) = watch::channel(initial);
        let status = w.get(&key).map(|e| e.status.clone()).unwrap_or_default();
        let task = self.background.spawn(backend.watch(query, tx.clone(), status.clone()));
        w.insert(key, WatchEntry { tx, status, task });
        Some(rx)
    }

    /// Every watch of backend `kind`.
    pub fn dump(&self, kind: &str) -> Vec<WatchDump> {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<WatchDump> = w
            .iter()
            .filter(|((k, _), _)| k == kind)
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
            let up = up.clone();
            Some(hub.background.spawn(follow(up, rxs)).abort_handle())
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
                    // One address per name, as APISIX does; the first IPv4 one, so the node's
                    // identity stays stable across re-resolutions.
                    let pick = ips.iter().find(|i| i.is_ipv4()).or(ips.first()).copied();
                    if let Some(ip) = pick {
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

/// Applies the merged sets of `rxs` whenever one changes.
async fn follow(up: Arc<Upstream>, mut rxs: Vec<watch::Receiver<Option<NodeSet>>>) {
    if rxs.is_empty() {
        return;
    }
    let mut applied: Option<Vec<ResolvedNode>> = None;
    loop {
        // Merge whatever every source has now; a source that never answered adds nothing.
        let mut any = false;
        let mut nodes = Vec::new();
        for rx in rxs.iter_mut() {
            let set = rx.borrow_and_update().clone();
            if let Some(set) = set {
                any = true;
                for n in set.nodes {
                    let Ok(ip) = n.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
                    else {
                        continue;
                    };
                    let Some(port) = fill_port(n.port, up.spec.scheme) else {
                        continue;
                    };
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
        }
        if any {
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
