//! Least connections: the node with the lowest `(1 + in_flight) / weight` (APISIX's score).
//!
//! In-flight counts live in the node state, so they are process-wide and survive membership
//! changes: a newly added node (0 in flight) is preferred while the others are busy.
//!
//! Up to [`EXACT_LIMIT`] nodes the whole group is scanned (exact, like APISIX's heap). Larger
//! groups take the best of [`SAMPLES`] random nodes, so a pick stays constant-time at thousands
//! of nodes (the approach of Envoy's least-request balancer); the full scan remains the fallback
//! when no sampled node is usable.

use std::sync::Arc;

use crate::upstream::node::Node;

/// Groups up to this size are scanned exactly.
pub const EXACT_LIMIT: usize = 64;
/// Random candidates compared in larger groups.
pub const SAMPLES: usize = 8;

#[inline]
pub fn pick<'a>(nodes: &'a [Arc<Node>], accept: &mut dyn FnMut(&Node) -> bool) -> Option<&'a Arc<Node>> {
    if nodes.len() > EXACT_LIMIT {
        let mut best: Option<(&'a Arc<Node>, u64, u64)> = None;
        let mut r = super::rand_u64();
        for _ in 0..SAMPLES {
            let n = &nodes[(r % nodes.len() as u64) as usize];
            r = r.rotate_left(13) ^ 0x9e37_79b9_7f4a_7c15;
            if n.weight == 0 || !accept(n) {
                continue;
            }
            let (load, w) = (1 + n.state.in_flight() as u64, n.weight as u64);
            match best {
                Some((_, bl, bw)) if load * bw >= bl * w => {}
                _ => best = Some((n, load, w)),
            }
        }
        if let Some((n, _, _)) = best {
            return Some(n);
        }
    }
    scan(nodes, accept)
}

fn scan<'a>(nodes: &'a [Arc<Node>], accept: &mut dyn FnMut(&Node) -> bool) -> Option<&'a Arc<Node>> {
    let mut best: Option<(&'a Arc<Node>, u64, u64)> = None;
    for n in nodes {
        if n.weight == 0 || !accept(n) {
            continue;
        }
        let load = 1 + n.state.in_flight() as u64;
        let w = n.weight as u64;
        // Compare load_a / w_a < load_b / w_b without division.
        match best {
            Some((_, bl, bw)) if load * bw >= bl * w => {}
            _ => best = Some((n, load, w)),
        }
    }
    best.map(|(n, _, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::balancer::testutil::nodes;

    #[test]
    fn prefers_least_loaded_relative_to_weight() {
        let ns = nodes(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 2), ("10.0.0.3:80", 1)]);
        for _ in 0..3 {
            ns[0].state.acquire();
        }
        ns[1].state.acquire();
        ns[1].state.acquire();
        ns[2].state.acquire();
        // scores: (1+3)/1=4, (1+2)/2=1.5, (1+1)/1=2
        assert_eq!(pick(&ns, &mut |_| true).unwrap().addr, ns[1].addr);
        assert_eq!(pick(&ns, &mut |n| n.addr != ns[1].addr).unwrap().addr, ns[2].addr);
    }

    #[test]
    fn large_groups_sample_and_avoid_busy_nodes() {
        let spec: Vec<(String, u32)> =
            (0..500).map(|i| (format!("10.0.{}.{}:80", i / 256, i % 256), 1)).collect();
        let refs: Vec<(&str, u32)> = spec.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let ns = nodes(&refs);
        // Every node but the last ten is busy: picks land on idle nodes far more often than 2%.
        for n in &ns[..490] {
            for _ in 0..5 {
                n.state.acquire();
            }
        }
        let idle = (0..1000).filter(|_| pick(&ns, &mut |_| true).unwrap().state.in_flight() == 0).count();
        assert!(idle > 100, "{idle}");
        // Nothing sampled is usable: the scan still finds the one usable node.
        let only = ns[250].addr;
        assert_eq!(pick(&ns, &mut |n| n.addr == only).unwrap().addr, only);
    }

    #[test]
    fn zero_weight_is_never_chosen() {
        let ns = nodes(&[("10.0.0.1:80", 0), ("10.0.0.2:80", 1)]);
        for _ in 0..5 {
            ns[1].state.acquire();
        }
        assert_eq!(pick(&ns, &mut |_| true).unwrap().addr, ns[1].addr);
    }
}
