//! The one balancer shared by HTTP, gRPC and stream traffic.
//!
//! A [`Selector`] is built once per membership change (off the hot path) and picks with
//! arithmetic and atomics only: no await, no lock, no allocation. `accept` filters nodes (health,
//! already tried); health changes never rebuild a selector, so chash keeps its ring while nodes
//! flap.

mod chash;
mod ewma;
mod least_conn;
mod roundrobin;

use std::sync::Arc;

pub use chash::{Ring, chash_id};

use super::node::Node;
use crate::config::resources::Balancer;

/// A pick algorithm over one priority group.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(roundrobin::RoundRobin),
    Chash(chash::Ring),
    LeastConn,
    Ewma,
}

impl Selector {
    /// Builds the selector for `nodes` (one priority group).
    pub fn build(kind: &Balancer, nodes: &[Arc<Node>]) -> Selector {
        match kind {
            Balancer::RoundRobin => Selector::RoundRobin(roundrobin::RoundRobin::new(nodes)),
            Balancer::Chash { .. } => Selector::Chash(chash::Ring::new(nodes)),
            Balancer::LeastConn => Selector::LeastConn,
            Balancer::Ewma => Selector::Ewma,
        }
    }

    /// Like [`Selector::build`], reusing the selector `self` built for `prev` where that is
    /// cheaper (the chash ring of a large upstream).
    pub fn rebuild(&self, kind: &Balancer, prev: &[Arc<Node>], nodes: &[Arc<Node>]) -> Selector {
        match (self, kind) {
            (Selector::Chash(ring), Balancer::Chash { .. }) => Selector::Chash(ring.rebuild(prev, nodes)),
            _ => Selector::build(kind, nodes),
        }
    }

    /// Picks a node of `nodes` that `accept` allows. `key` is the consistent-hash key.
    #[inline]
    pub fn pick<'a>(
        &self,
        nodes: &'a [Arc<Node>],
        key: &[u8],
        accept: &mut dyn FnMut(&Node) -> bool,
    ) -> Option<&'a Arc<Node>> {
        match self {
            Selector::RoundRobin(rr) => rr.pick(nodes, accept),
            Selector::Chash(ring) => ring.pick(nodes, key, accept),
            Selector::LeastConn => least_conn::pick(nodes, accept),
            Selector::Ewma => ewma::pick(nodes, accept),
        }
    }
}

/// A cheap thread-local xorshift generator for randomized choices.
pub(crate) fn rand_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15);
            let stack = &t as *const u64 as u64;
            (t ^ stack.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::upstream::node::NodeState;

    pub fn nodes(spec: &[(&str, u32)]) -> Vec<Arc<Node>> {
        spec.iter()
            .map(|(a, w)| {
                let addr = a.parse().unwrap();
                Arc::new(Node {
                    addr,
                    host: Arc::from(addr_host(a)),
                    port: addr.port(),
                    weight: *w,
                    priority: 0,
                    metadata: Default::default(),
                    state: Arc::new(NodeState::new(addr)),
                    passive: None,
                    track_latency: true,
                    upstream_id: Arc::from("test"),
                })
            })
            .collect()
    }

    fn addr_host(a: &str) -> String {
        let addr: std::net::SocketAddr = a.parse().unwrap();
        addr.ip().to_string()
    }
}
