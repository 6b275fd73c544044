//! Upstreams: how node updates reach the request path without locks.
//!
//! ```text
//!  node source (static list, DNS, Consul, Nacos, ...)          health probes (one task per node)
//!        |  Vec<ResolvedNode>                                          | atomic health word
//!        v                                                             v
//!  Upstream::apply  (the only writer)                           NodeState (per address)
//!    - diff by address: a surviving address keeps its Arc<NodeState>, so health, EWMA,
//!      in-flight counts and counters carry over re-discovery, weight changes and reloads
//!    - group by priority, build one Selector per group (rr cycle, chash ring, ...)
//!    - publish ONE ArcSwap<Snapshot>; tell the probes which addresses came and went
//!        |
//!        v
//!  request path: snapshot.load() -> group selectors pick(key, |n| ready && !tried)
//!        -> Peer (Arc<Node>, in_flight += 1) -> forward -> peer.report(outcome)
//!        -> passive counters (atomics) -> health word; drop(peer) -> in_flight -= 1
//! ```
//!
//! Membership changes rebuild selectors; health changes never do. An error from a node source
//! never reaches `apply`: the last good set stays (see `source`).

pub mod balancer;
pub mod health;
pub mod node;
pub mod source;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde_json::{Map, Value};
use strait_protocols::tls::{ClientTls, ClientTlsOptions};
use strait_protocols::{PassHost, Peer, PeerNode, PickError, Tried, UpstreamPicker, UpstreamSettings};

use crate::config::resources::{AllUnhealthy, Balancer, HashOn, PassHostSpec, UpstreamSpec};
use crate::route::expr::{Var, VarSource};
use balancer::Selector;
use health::HealthProbes;
use node::{Node, NodeState, PassivePolicy};

/// A node with its address resolved, as node sources deliver it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedNode {
    pub addr: SocketAddr,
    /// Host as configured or discovered (used for `pass_host: node` and probes).
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub priority: i32,
    pub metadata: Map<String, Value>,
}

struct Group {
    nodes: Vec<Arc<Node>>,
    selector: Selector,
}

/// One membership version of an upstream.
pub struct Snapshot {
    /// Every node, in source order.
    pub nodes: Vec<Arc<Node>>,
    /// Priority groups, highest priority first.
    groups: Vec<Group>,
    pub version: u64,
    /// Set once a node source has delivered (static lists: at build).
    pub resolved: bool,
}

impl Snapshot {
    fn empty() -> Self {
        Snapshot { nodes: vec![], groups: vec![], version: 0, resolved: false }
    }

    #[inline]
    fn pick(&self, key: &[u8], accept: &mut dyn FnMut(&Node) -> bool) -> Option<&Arc<Node>> {
        if self.groups.len() == 1 && self.nodes.len() == 1 {
            let n = &self.nodes[0];
            return accept(n).then_some(n);
        }
        self.groups.iter().find_map(|g| g.selector.pick(&g.nodes, key, accept))
    }
}

/// Counters shown by the status API and metrics.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Picks made while no node was healthy (APISIX's "use all nodes" rule applied).
    pub all_unhealthy_picks: AtomicU64,
    /// Requests refused because no node could be picked.
    pub no_node: AtomicU64,
}

/// Sync state of an upstream's node source(s).
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub last_change: Option<SystemTime>,
}

/// Shared things an upstream needs to build its runtime state.
#[derive(Clone)]
pub struct BuildContext {
    /// Runtime for background tasks (probes, node sources).
    pub background: tokio::runtime::Handle,
    pub roots: Arc<rustls::RootCertStore>,
}

/// An upstream at runtime: settings, the current snapshot, and its background tasks.
pub struct Upstream {
    pub spec: Arc<UpstreamSpec>,
    settings: UpstreamSettings,
    snapshot: ArcSwap<Snapshot>,
    passive: Option<Arc<PassivePolicy>>,
    all_unhealthy: AllUnhealthy,
    pub stats: UpstreamStats,
    probes: HealthProbes,
    /// Serializes writers (the source task, and reloads handing over state).
    write: Mutex<()>,
    pub source_status: Mutex<SourceStatus>,
    /// Node states handed over by a reload whose node source changed, consumed by the first
    /// `apply`.
    inherited: Mutex<HashMap<SocketAddr, Arc<NodeState>>>,
    id: Arc<str>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("key", &self.spec.key).finish()
    }
}

/// gRPC statuses that count as node failures for passive checks: RESOURCE_EXHAUSTED,
/// INTERNAL and UNAVAILABLE, the counterparts of the default unhealthy HTTP statuses
/// (429, 500, 503). DEADLINE_EXCEEDED is the client's budget, not the node's health.
pub(crate) const GRPC_FAILURES: &[u16] = &[8, 13, 14];

impl Upstream {
    /// Builds an upstream. `prev` is the upstream with the same key in the previous
    /// configuration: its node states carry over by address, and its node list too when the node
    /// source is unchanged (so a reload never empties a discovered upstream).
    pub fn new(
        spec: Arc<UpstreamSpec>,
        prev: Option<&Upstream>,
        ctx: &BuildContext,
    ) -> Result<Arc<Upstream>, String> {
        let tls = match (spec.scheme.is_tls(), &spec.tls) {
            (false, _) => None,
            (true, t) => {
                let opts = ClientTlsOptions {
                    verify: t.as_ref().is_some_and(|t| t.verify),
                    roots: ctx.roots.clone(),
                    client_cert: t.as_ref().and_then(|t| t.client_cert.clone()),
                };
                Some(Arc::new(ClientTls::new(opts).map_err(|e| format!("upstream {}: tls: {e}", spec.id))?))
            }
        };
        let pass_host = match &spec.pass_host {
            PassHostSpec::Pass => PassHost::Pass,
            PassHostSpec::Node => PassHost::Node,
            PassHostSpec::Rewrite(h) => PassHost::Rewrite(
                http::HeaderValue::from_str(h)
                    .map_err(|_| format!("upstream {}: invalid upstream_host", spec.id))?,
            ),
        };
        let id: Arc<str> = Arc::from(spec.id.as_str());
        let settings = UpstreamSettings {
            id: id.clone(),
            scheme: spec.scheme,
            pass_host,
            timeouts: spec.timeouts,
            retries: spec.retries,
            retry_timeout: spec.retry_timeout,
            keepalive: spec.keepalive,
            tls,
        };
        let passive = spec.checks.as_ref().map(|c| match &c.passive {
            Some(p) => Arc::new(PassivePolicy {
                healthy_statuses: p.healthy_statuses.clone(),
                unhealthy_statuses: p.unhealthy_statuses.clone(),
                thresholds: health::state::Thresholds {
                    successes: p.healthy_successes,
                    http_failures: p.http_failures,
                    tcp_failures: p.tcp_failures,
                    timeouts: p.timeouts,
                },
                grpc_failures: GRPC_FAILURES.to_vec(),
                failures_only: false,
            }),
            // Without `passive`, APISIX still reports each failure that makes a request retry
            // (a refused or reset connection, a timeout) to the checker, with the library's
            // passive thresholds: two such connects, or seven timeouts, eject a node.
            None => Arc::new(PassivePolicy {
                healthy_statuses: Vec::new(),
                unhealthy_statuses: Vec::new(),
                thresholds: health::state::Thresholds {
                    successes: 5,
                    http_failures: 5,
                    tcp_failures: 2,
                    timeouts: 7,
                },
                grpc_failures: Vec::new(),
                failures_only: true,
            }),
        });
        let all_unhealthy = spec.checks.as_ref().map_or(AllUnhealthy::UseAll, |c| c.all_unhealthy);
        let probes = HealthProbes::new(&spec, ctx);
        let up = Arc::new(Upstream {
            settings,
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            passive,
            all_unhealthy,
            stats: UpstreamStats::default(),
            probes,
            write: Mutex::new(()),
            source_status: Mutex::new(SourceStatus::default()),
            inherited: Mutex::new(HashMap::new()),
            id,
            spec,
        });

        if let Some(prev) = prev {
            let old = prev.snapshot.load();
            // Checks removed (as APISIX destroys the checker): no probe or report could bring a
            // node marked unhealthy back, so every node starts afresh, healthy. Fresh states, not
            // the old ones reset: the old upstream lives on while its requests and sessions do,
            // and its probes and passive reports would mark them unhealthy again.
            let states: HashMap<SocketAddr, Arc<NodeState>> =
                if up.spec.checks.is_none() && prev.spec.checks.is_some() {
                    HashMap::new()
                } else {
                    old.nodes.iter().map(|n| (n.addr, n.state.clone())).collect()
                };
            if prev.spec.nodes == up.spec.nodes && old.resolved {
                // Same source: keep serving the nodes it last delivered.
                let list = old.nodes.iter().map(|n| n.to_resolved()).collect();
                up.apply_with_states(list, &states);
                *up.source_status.lock().unwrap_or_else(|e| e.into_inner()) =
                    prev.source_status.lock().unwrap_or_else(|e| e.into_inner()).clone();
            } else {
                up.inherited.lock().unwrap_or_else(|e| e.into_inner()).clone_from(&states);
            }
        }
        Ok(up)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Replaces the node set (the single write path). Surviving addresses keep their state.
    pub fn apply(&self, nodes: Vec<ResolvedNode>) {
        let states: HashMap<SocketAddr, Arc<NodeState>> = {
            let cur = self.snapshot.load();
            let mut m: HashMap<SocketAddr, Arc<NodeState>> =
                self.inherited.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
            m.extend(cur.nodes.iter().map(|n| (n.addr, n.state.clone())));
            m
        };
        self.apply_with_states(nodes, &states);
    }

    fn apply_with_states(&self, nodes: Vec<ResolvedNode>, states: &HashMap<SocketAddr, Arc<NodeState>>) {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        // Merge duplicates by address: one identity, one health state; the larger weight wins.
        let mut order: Vec<ResolvedNode> = Vec::with_capacity(nodes.len());
        let mut pos: HashMap<SocketAddr, usize> = HashMap::with_capacity(nodes.len());
        for n in nodes {
            match pos.get(&n.addr) {
                Some(&i) => {
                    let e = &mut order[i];
                    e.weight = e.weight.max(n.weight);
                    e.priority = e.priority.max(n.priority);
                }
                None => {
                    pos.insert(n.addr, order.len());
                    order.push(n);
                }
            }
        }
        let built: Vec<Arc<Node>> = order
            .into_iter()
            .map(|r| {
                let state = states.get(&r.addr).cloned().unwrap_or_else(|| Arc::new(NodeState::new(r.addr)));
                Arc::new(Node {
                    addr: r.addr,
                    host: Arc::from(r.host.as_str()),
                    port: r.port,
                    weight: r.weight,
                    priority: r.priority,
                    metadata: r.metadata,
                    state,
                    passive: self.passive.clone(),
                    track_latency: matches!(self.spec.balancer, Balancer::Ewma),
                    upstream_id: self.id.clone(),
                })
            })
            .collect();
        let mut prios: Vec<i32> = built.iter().map(|n| n.priority).collect();
        prios.sort_unstable_by(|a, b| b.cmp(a));
        prios.dedup();
        let old = self.snapshot.load();
        let groups = prios
            .into_iter()
            .map(|p| {
                let nodes: Vec<Arc<Node>> = built.iter().filter(|n| n.priority == p).cloned().collect();
                let prev = old.groups.iter().find(|g| g.nodes.first().is_some_and(|n| n.priority == p));
                let selector = match prev {
                    Some(g) => g.selector.rebuild(&self.spec.balancer, &g.nodes, &nodes),
                    None => Selector::build(&self.spec.balancer, &nodes),
                };
                Group { nodes, selector }
            })
            .collect();
        let version = old.version + 1;
        let changed = old.nodes.len() != built.len()
            || old.nodes.iter().zip(&built).any(|(a, b)| a.to_resolved() != b.to_resolved());
        let snap = Arc::new(Snapshot { nodes: built, groups, version, resolved: true });
        self.probes.sync(&snap.nodes, &self.settings);
        self.snapshot.store(snap);
        if changed {
            self.source_status.lock().unwrap_or_else(|e| e.into_inner()).last_change =
                Some(SystemTime::now());
        }
    }

    /// Stops background work (probes). Called when a reload drops this upstream.
    pub fn stop(&self) {
        self.probes.stop();
    }

    /// Computes the consistent-hash key for a request (empty for other balancers).
    pub fn hash_key<'a>(&self, vars: &'a dyn VarSource) -> std::borrow::Cow<'a, [u8]> {
        use std::borrow::Cow;
        let Balancer::Chash { hash_on, key } = &self.spec.balancer else {
            return Cow::Borrowed(&[]);
        };
        let value: Option<Cow<'a, str>> = match hash_on {
            HashOn::Vars => chash_var(key).and_then(|v| vars.var(&v)),
            HashOn::Header => vars.var(&Var::Http(key.to_ascii_lowercase().replace('_', "-"))),
            HashOn::Cookie => vars.var(&Var::Cookie(key.clone())),
            HashOn::VarsCombinations => combine_vars(key, vars).map(Cow::Owned),
        };
        match value {
            Some(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
            Some(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
            // APISIX: a missing key falls back to remote_addr.
            None => match vars.var(&Var::RemoteAddr) {
                Some(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
                Some(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
                None => Cow::Borrowed(&[]),
            },
        }
    }

    fn to_peer(&self, n: &Arc<Node>) -> Peer {
        n.state.acquire();
        let node: Arc<dyn PeerNode> = n.clone();
        Peer::new(n.addr, n.host.clone(), n.port, node)
    }
}

impl Node {
    /// The node as a source delivered it.
    pub fn to_resolved(&self) -> ResolvedNode {
        ResolvedNode {
            addr: self.addr,
            host: self.host.to_string(),
            port: self.port,
            weight: self.weight,
            priority: self.priority,
            metadata: self.metadata.clone(),
        }
    }
}

fn chash_var(key: &str) -> Option<Var> {
    match key {
        "server_name" | "hostname" => Some(Var::Host),
        other => Var::parse(other).ok(),
    }
}

/// Resolves `$var` references in a `vars_combinations` key; `None` if none resolved.
fn combine_vars(template: &str, vars: &dyn VarSource) -> Option<String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut resolved = 0;
    let mut rest = template;
    while let Some(pos) = rest.find('$') {
        // `\$` is a literal dollar sign.
        if rest[..pos].ends_with('\\') {
            out.push_str(&rest[..pos - 1]);
            out.push('$');
            rest = &rest[pos + 1..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        // `${name}`, `${name ?? default}` or `$name` (letters, digits, `_` and `.`).
        let (name, default, used) = if let Some(inner) = after.strip_prefix('{') {
            let Some(close) = inner.find('}') else {
                out.push('$');
                rest = after;
                continue;
            };
            let body = inner[..close].trim();
            match body.split_once("??") {
                Some((n, d)) => (n.trim(), Some(d.trim()), close + 2),
                None => (body, None, close + 2),
            }
        } else {
            let len =
                after.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.').count();
            if len == 0 {
                out.push('$');
                rest = after;
                continue;
            }
            (&after[..len], None, len)
        };
        match Var::parse(name).ok().and_then(|v| vars.var(&v)) {
            Some(v) => {
                out.push_str(&v);
                resolved += 1;
            }
            None => {
                if let Some(d) = default {
                    out.push_str(d);
                    resolved += 1;
                }
            }
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    (resolved > 0).then_some(out)
}

impl UpstreamPicker for Upstream {
    fn pick(&self, key: &[u8], tried: &Tried) -> Result<Peer, PickError> {
        let snap = self.snapshot.load();
        if snap.nodes.is_empty() {
            self.stats.no_node.fetch_add(1, Ordering::Relaxed);
            return Err(PickError::NoNode);
        }
        if snap.nodes.len() == 1
            && !matches!(self.spec.balancer, Balancer::LeastConn)
            && matches!(self.all_unhealthy, AllUnhealthy::UseAll)
        {
            // APISIX's single-node fast path: the one node, whatever its health, and again on
            // each retry.
            return Ok(self.to_peer(&snap.nodes[0]));
        }
        if let Some(n) = snap.pick(key, &mut |n| n.ready() && !tried.contains(&n.addr)) {
            return Ok(self.to_peer(n));
        }
        let mut ready = snap.nodes.iter().filter(|n| n.ready());
        if let Some(first) = ready.next() {
            // A lone healthy node is used whatever its weight (a weight-0 standby once the others
            // are out), as APISIX's picker over the healthy nodes returns a single one.
            if ready.next().is_none() && !tried.contains(&first.addr) {
                return Ok(self.to_peer(first));
            }
            // Healthy nodes exist, but this request tried them all (or they carry no weight).
            return Err(if tried.is_empty() { PickError::NoNode } else { PickError::AllTried });
        }
        match self.all_unhealthy {
            AllUnhealthy::Fail => {
                self.stats.no_node.fetch_add(1, Ordering::Relaxed);
                Err(PickError::NoHealthyNode)
            }
            AllUnhealthy::UseAll => {
                let picked = snap.pick(key, &mut |n| !tried.contains(&n.addr));
                match picked {
                    Some(n) => {
                        let c = self.stats.all_unhealthy_picks.fetch_add(1, Ordering::Relaxed);
                        if c.is_multiple_of(1000) {
                            tracing::warn!(
                                upstream = &*self.id,
                                "all upstream nodes are unhealthy, using all of them"
                            );
                        }
                        Ok(self.to_peer(n))
                    }
                    None if tried.is_empty() => Err(PickError::NoNode),
                    None => Err(PickError::AllTried),
                }
            }
        }
    }

    fn node_count(&self) -> usize {
        self.snapshot.load().nodes.len()
    }

    fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query arguments `a` and `b`, nothing else.
    struct Args(&'static [(&'static str, &'static str)]);

    impl VarSource for Args {
        fn var(&self, v: &Var) -> Option<std::borrow::Cow<'_, str>> {
            match v {
                Var::Arg(name) => self.0.iter().find(|(k, _)| k == name).map(|(_, v)| (*v).into()),
                _ => None,
            }
        }
    }

    #[test]
    fn vars_combinations_take_plain_braced_and_defaulted_variables() {
        let ab = Args(&[("a", "A"), ("b", "B")]);
        assert_eq!(combine_vars("$arg_a-$arg_b", &ab).as_deref(), Some("A-B"));
        assert_eq!(combine_vars("${arg_a}${arg_b}", &ab).as_deref(), Some("AB"));
        assert_eq!(combine_vars("${ arg_a }:x", &ab).as_deref(), Some("A:x"));
        assert_eq!(combine_vars("ü$arg_a€", &ab).as_deref(), Some("üA€"), "text around variables is kept");
        let only_a = Args(&[("a", "A")]);
        assert_eq!(combine_vars("$arg_a-$arg_b", &only_a).as_deref(), Some("A-"), "a missing one is empty");
        assert_eq!(combine_vars("${arg_b ?? none}", &only_a).as_deref(), Some("none"));
        assert_eq!(combine_vars("\\$arg_a $arg_a", &only_a).as_deref(), Some("$arg_a A"));
        assert_eq!(combine_vars("$arg_x${arg_y}", &only_a), None, "nothing resolved: fall back");
        assert_eq!(combine_vars("cost: $ 5", &ab), None);
    }
}
