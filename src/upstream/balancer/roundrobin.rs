//! Weighted round robin with APISIX's (lua-resty-balancer's) interleaved order.
//!
//! APISIX walks the nodes in order keeping a current weight `cw` that starts at the maximum
//! weight and drops by the gcd of the weights after each pass; a node is chosen while its weight
//! is at least `cw`. Weights 3:2:1 give A A B A B C. We precompute one full cycle of that order
//! when the membership changes, so a pick is one atomic increment and an index.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::upstream::node::Node;

/// Longest cycle we precompute; larger weight sums are scaled down proportionally.
const MAX_CYCLE: u64 = 1 << 16;

#[derive(Debug)]
pub struct RoundRobin {
    /// Indices into the group's nodes, one cycle of the interleaved order.
    order: Vec<u32>,
    next: AtomicUsize,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl RoundRobin {
    pub fn new(nodes: &[Arc<Node>]) -> Self {
        let mut weights: Vec<u64> = nodes.iter().map(|n| n.weight as u64).collect();
        if weights.iter().all(|w| *w == 0) {
            // All zero: plain round robin (APISIX), and a single node is always returned.
            weights.iter_mut().for_each(|w| *w = 1);
        }
        let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        let sum: u64 = weights.iter().sum();
        if sum > MAX_CYCLE {
            let scale = sum as f64 / MAX_CYCLE as f64;
            weights
                .iter_mut()
                .for_each(|w| *w = if *w == 0 { 0 } else { ((*w as f64 / scale).round() as u64).max(1) });
        }
        let max = weights.iter().copied().max().unwrap_or(0);
        let mut order = Vec::with_capacity(weights.iter().sum::<u64>() as usize);
        let mut cw = max;
        while cw > 0 {
            for (i, w) in weights.iter().enumerate() {
                if *w >= cw {
                    order.push(i as u32);
                }
            }
            cw -= 1;
        }
        // Start at a random place, as APISIX does, so replicas do not move in lock step.
        let start = if order.is_empty() { 0 } else { (super::rand_u64() % order.len() as u64) as usize };
        RoundRobin { order, next: AtomicUsize::new(start) }
    }

    #[inline]
    pub fn pick<'a>(
        &self,
        nodes: &'a [Arc<Node>],
        accept: &mut dyn FnMut(&Node) -> bool,
    ) -> Option<&'a Arc<Node>> {
        let len = self.order.len();
        if len == 0 {
            return None;
        }
        let mut at = self.next.fetch_add(1, Ordering::Relaxed);
        for _ in 0..len {
            let n = &nodes[self.order[at % len] as usize];
            if accept(n) {
                return Some(n);
            }
            // A rejected node's slot passes to the next request's slot, not to the next node in
            // the order: its share is spread over the others by their weights (as APISIX's
            // picker, rebuilt from the healthy nodes, does), instead of all going to the node
            // after it.
            at = self.next.fetch_add(1, Ordering::Relaxed);
        }
        // Other requests took slots meanwhile: look at every slot once.
        (0..len).map(|k| &nodes[self.order[at.wrapping_add(k) % len] as usize]).find(|n| accept(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::balancer::testutil::nodes;
    use std::collections::HashMap;

    fn counts(spec: &[(&str, u32)], picks: usize) -> (Vec<String>, HashMap<String, usize>) {
        let ns = nodes(spec);
        let rr = RoundRobin::new(&ns);
        rr.next.store(0, Ordering::Relaxed);
        let mut seq = vec![];
        let mut c = HashMap::new();
        for _ in 0..picks {
            let n = rr.pick(&ns, &mut |_| true).unwrap();
            seq.push(n.addr.to_string());
            *c.entry(n.addr.to_string()).or_default() += 1;
        }
        (seq, c)
    }

    /// An unhealthy node's share goes to the others by their weights: with A:3 B:1 C:1 and A
    /// out, B and C get half each (the next node in order used to take all of A's share).
    #[test]
    fn a_rejected_node_share_is_spread_by_weight() {
        let ns = nodes(&[("10.0.0.1:80", 3), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let rr = RoundRobin::new(&ns);
        let mut c: HashMap<String, usize> = HashMap::new();
        for _ in 0..100 {
            let n =
                rr.pick(&ns, &mut |n| n.addr.port() == 80 && n.addr.ip().to_string() != "10.0.0.1").unwrap();
            *c.entry(n.addr.to_string()).or_default() += 1;
        }
        assert_eq!((c["10.0.0.2:80"], c["10.0.0.3:80"]), (50, 50), "{c:?}");
        // Two of three out: the last takes everything; all out: none.
        assert!(rr.pick(&ns, &mut |n| n.addr.ip().to_string() == "10.0.0.3").is_some());
        assert!(rr.pick(&ns, &mut |_| false).is_none());
    }

    #[test]
    fn weights_3_2_1_give_6_4_2_over_12_in_apisix_order() {
        let spec = [("10.0.0.1:80", 3), ("10.0.0.2:80", 2), ("10.0.0.3:80", 1)];
        let (seq, c) = counts(&spec, 12);
        assert_eq!(c["10.0.0.1:80"], 6);
        assert_eq!(c["10.0.0.2:80"], 4);
        assert_eq!(c["10.0.0.3:80"], 2);
        let short: Vec<_> = seq[..6].iter().map(|s| &s[7..8]).collect();
        assert_eq!(short, ["1", "1", "2", "1", "2", "3"]);
    }

    #[test]
    fn weight_zero_is_never_chosen_while_others_have_weight() {
        let (_, c) = counts(&[("10.0.0.1:80", 0), ("10.0.0.2:80", 5)], 50);
        assert_eq!(c.get("10.0.0.1:80"), None);
        let (_, c) = counts(&[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)], 10);
        assert_eq!(c["10.0.0.1:80"], 5, "all zero: plain round robin");
    }

    #[test]
    fn skips_nodes_not_accepted() {
        let ns = nodes(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let rr = RoundRobin::new(&ns);
        for _ in 0..10 {
            let n = rr.pick(&ns, &mut |n| n.addr.to_string() != "10.0.0.1:80").unwrap();
            assert_eq!(n.addr.to_string(), "10.0.0.2:80");
        }
        assert!(rr.pick(&ns, &mut |_| false).is_none());
    }

    #[test]
    fn huge_weights_are_scaled_not_exploded() {
        let ns = nodes(&[("10.0.0.1:80", 1_000_000), ("10.0.0.2:80", 3_000_000), ("10.0.0.3:80", 7)]);
        let rr = RoundRobin::new(&ns);
        assert!(rr.order.len() as u64 <= MAX_CYCLE + 3);
        let c0 = rr.order.iter().filter(|i| **i == 0).count() as f64;
        let c1 = rr.order.iter().filter(|i| **i == 1).count() as f64;
        assert!((c1 / c0 - 3.0).abs() < 0.01);
        assert!(rr.order.contains(&2));
    }
}
