//! Service discovery for Strait: one [`Discovery`] trait, one module per registry.
//!
//! This crate knows nothing about proxies. A backend turns a service name (plus backend-specific
//! arguments) into a [`NodeSet`]; the core reconciles node sets into its balancer.
//!
//! The contract every backend keeps, whatever the registry does:
//! * `watch` publishes only when the node set changed;
//! * an error never publishes an empty set: the backend logs it, counts it, backs off and keeps
//!   the last good set (reported through [`SyncStatus`]);
//! * a service that never resolved publishes nothing (the core answers 503).
#![forbid(unsafe_code)]

pub mod consul;
pub mod dns;
pub mod eureka;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod kubernetes;
pub mod nacos;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::watch;

/// A boxed future, so backends stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One discovered node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// An IP address literal (backends resolve names before publishing).
    pub host: String,
    /// `None` when the registry gave no port (HTTP fills the scheme's default port).
    pub port: Option<u16>,
    pub weight: u32,
    /// Higher is tried first (SRV priority 10 becomes -10).
    pub priority: i32,
    pub metadata: Map<String, Value>,
}

/// The nodes of one service at one moment, in a stable order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSet {
    pub nodes: Vec<NodeSpec>,
}

/// What to look up: the upstream's `service_name` and `discovery_args`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Query {
    pub service_name: String,
    /// `discovery_args`, as sorted `(key, value)` pairs.
    pub args: Vec<(String, String)>,
    /// The upstream scheme (`grpc` upstreams use Nacos' `gRPC_port` metadata).
    pub scheme: String,
}

impl Query {
    /// The value of a `discovery_args` key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// One answer of a backend, with how long it stays valid (DNS TTL), if the backend knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub nodes: NodeSet,
    pub valid_for: Option<Duration>,
}

/// Why a lookup failed. None of these ever empties an upstream.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    /// The registry answered that the service does not exist or has no instances.
    #[error("service {0:?} not found")]
    NotFound(String),
    /// The registry could not be reached or gave an error.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry's answer could not be understood.
    #[error("invalid registry answer: {0}")]
    Invalid(String),
    /// The backend configuration is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Sync state of one watched service, shown by the control API (`/v1/discovery/{type}/dump`).
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub last_change: Option<SystemTime>,
    /// How many times the published set changed.
    pub changes: u64,
    pub node_count: usize,
    pub errors: u64,
    /// Whether a good answer was ever received.
    pub synced: bool,
}

impl SyncStatus {
    /// Seconds since the last success, when the last attempt failed (the set is stale).
    pub fn stale_since(&self) -> Option<SystemTime> {
        match (&self.last_error, self.last_success) {
            (Some((t, _)), Some(ok)) if *t > ok => Some(ok),
            (Some((t, _)), None) => Some(*t),
            _ => None,
        }
    }
}

/// Shared, updatable sync state of one watch.
pub type SharedStatus = Arc<Mutex<SyncStatus>>;

/// Exponential backoff between failed attempts: 1 s, 2 s, 4 s, ... capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff { next: Duration::from_secs(1), max }
    }
    /// The delay before the next attempt; doubles each time.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_secs(1);
    }
}

/// A registry backend.
pub trait Discovery: Send + Sync + 'static {
    /// The `discovery_type` this backend serves (`dns`, `nacos`, ...).
    fn kind(&self) -> &'static str;

    /// One lookup.
    fn resolve<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Resolution, DiscoveryError>>;

    /// How often `watch` polls when the answer carries no validity (registries without push).
    fn poll_interval(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// Publishes the node set of `query` into `tx` until `tx` has no receivers. The default
    /// polls `resolve` (at the answer's validity, else [`Discovery::poll_interval`]); backends
    /// with blocking queries, push or watch APIs override it. Must keep the contract in the
    /// crate docs.
    fn watch(
        self: Arc<Self>,
        query: Query,
        tx: watch::Sender<Option<NodeSet>>,
        status: SharedStatus,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut backoff = Backoff::new(Duration::from_secs(60));
            loop {
                let delay = match self.resolve(&query).await {
                    Ok(res) => {
                        backoff.reset();
                        publish(&tx, &status, res.nodes);
                        res.valid_for.unwrap_or_else(|| self.poll_interval())
                    }
                    Err(e) => {
                        record_error(&status, self.kind(), &query, &e);
                        backoff.next_delay().min(self.poll_interval().max(Duration::from_secs(1)))
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay.max(Duration::from_millis(200))) => {}
                    _ = tx.closed() => return,
                }
            }
        })
    }
}

/// A number in `[0, n)` that differs between calls and processes (to spread retries and
/// reconnections of many gateways); not for anything secret.
pub(crate) fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let h = std::collections::hash_map::RandomState::new().build_hasher().finish();
    h % n.max(1)
}

/// Publishes `nodes` if they differ from what `tx` holds, and records the success.
pub fn publish(tx: &watch::Sender<Option<NodeSet>>, status: &SharedStatus, nodes: NodeSet) {
    let count = nodes.nodes.len();
    let changed = tx.send_if_modified(|cur| {
        if cur.as_ref() == Some(&nodes) {
            false
        } else {
            *cur = Some(nodes);
            true
        }
    });
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    let now = SystemTime::now();
    s.last_success = Some(now);
    s.synced = true;
    s.node_count = count;
    if changed {
        s.last_change = Some(now);
        s.changes += 1;
    }
}

/// Records a failed lookup (the last good set stays published), and logs it.
pub fn record_error(status: &SharedStatus, kind: &str, query: &Query, e: &DiscoveryError) {
    note_error(status, e);
    tracing::warn!(discovery = kind, service = %query.service_name, error = %e, "discovery lookup failed; keeping the last good nodes");
}

/// Records a failed lookup without logging it, for a failure shared by many services that is
/// logged once where it happened (a Kubernetes informer's).
pub fn note_error(status: &SharedStatus, e: &DiscoveryError) {
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    s.errors += 1;
    s.last_error = Some((SystemTime::now(), e.to_string()));
}

/// Resolves node hosts that are names (a registry may hold `db.internal` where an address is
/// expected) to one address each, the first IPv4 one, as static nodes are, through the system
/// resolver (`/etc/hosts`, then DNS). A name that does not resolve leaves its node out, with a
/// warning: publishing it would only fail at connect time.
pub async fn resolve_names(set: NodeSet, kind: &'static str) -> NodeSet {
    let is_ip = |h: &str| h.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok();
    if set.nodes.iter().all(|n| is_ip(&n.host)) {
        return set;
    }
    let mut nodes = Vec::with_capacity(set.nodes.len());
    for mut n in set.nodes {
        if is_ip(&n.host) {
            nodes.push(n);
            continue;
        }
        let target = (n.host.clone(), n.port.unwrap_or(0));
        let found = tokio::net::lookup_host(target).await.map(|a| a.collect::<Vec<std::net::SocketAddr>>());
        match found {
            Ok(addrs) => match addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) {
                Some(a) => {
                    n.host = a.ip().to_string();
                    nodes.push(n);
                }
                None => {
                    tracing::warn!(discovery = kind, host = %n.host, "node name has no address; left out")
                }
            },
            Err(e) => {
                tracing::warn!(discovery = kind, host = %n.host, error = %e, "node name does not resolve; left out")
            }
        }
    }
    nodes.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    nodes.dedup_by(|a, b| a.host == b.host && a.port == b.port);
    NodeSet { nodes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let d: Vec<_> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 1);
    }

    #[test]
    fn publish_only_on_change() {
        let (tx, mut rx) = watch::channel(None);
        let st = SharedStatus::default();
        let set = NodeSet {
            nodes: vec![NodeSpec {
                host: "10.0.0.1".into(),
                port: Some(80),
                weight: 1,
                priority: 0,
                metadata: Map::new(),
            }],
        };
        publish(&tx, &st, set.clone());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        publish(&tx, &st, set);
        assert!(!rx.has_changed().unwrap());
        assert!(st.lock().unwrap().synced);
    }
}
