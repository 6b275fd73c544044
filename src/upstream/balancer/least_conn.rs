//! Least connections: the node with the lowest `(1 + in_flight) / weight` (APISIX's score).
//!
//! In-flight counts live in the node state, so they are process-wide and survive membership
//! changes: a newly added node (0 in flight) is preferred while the others are busy.

use std::sync::Arc;

use crate::upstream::node::Node;

#[inline]
pub fn pick<'a>(nodes: &'a [Arc<Node>], accept: &mut dyn FnMut(&Node) -> bool) -> Option<&'a Arc<Node>> {
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
    fn zero_weight_is_never_chosen() {
        let ns = nodes(&[("10.0.0.1:80", 0), ("10.0.0.2:80", 1)]);
        for _ in 0..5 {
            ns[1].state.acquire();
        }
        assert_eq!(pick(&ns, &mut |_| true).unwrap().addr, ns[1].addr);
    }
}
