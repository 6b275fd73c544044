//! Peak-EWMA with power-of-two choices: of two random usable nodes, the one with the lower
//! `latency_estimate * (in_flight + 1)` wins. Weights are ignored, as in APISIX. Estimates decay
//! toward zero while a node is idle, so a node that was slow once is tried again later.

use std::sync::Arc;

use super::rand_u64;
use crate::upstream::node::Node;

fn score(n: &Node) -> f64 {
    n.state.ewma_ns() * (n.state.in_flight() as f64 + 1.0)
}

#[inline]
pub fn pick<'a>(nodes: &'a [Arc<Node>], accept: &mut dyn FnMut(&Node) -> bool) -> Option<&'a Arc<Node>> {
    let len = nodes.len();
    match len {
        0 => return None,
        1 => return accept(&nodes[0]).then(|| &nodes[0]),
        _ => {}
    }
    let r = rand_u64();
    let a = (r % len as u64) as usize;
    let mut b = ((r >> 32) % (len as u64 - 1)) as usize;
    if b >= a {
        b += 1;
    }
    let (na, nb) = (&nodes[a], &nodes[b]);
    match (accept(na), accept(nb)) {
        (true, true) => Some(if score(nb) < score(na) { nb } else { na }),
        (true, false) => Some(na),
        (false, true) => Some(nb),
        // Both unusable: the best acceptable node by a scan.
        (false, false) => nodes.iter().filter(|n| accept(n)).min_by(|x, y| score(x).total_cmp(&score(y))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::balancer::testutil::nodes;
    use std::time::Duration;

    #[test]
    fn slow_node_gets_less_traffic() {
        let ns = nodes(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        ns[0].state.observe_latency(Duration::from_millis(200));
        ns[1].state.observe_latency(Duration::from_millis(2));
        let fast = (0..100).filter(|_| pick(&ns, &mut |_| true).unwrap().addr == ns[1].addr).count();
        assert_eq!(fast, 100, "with two nodes both are compared every time");
    }

    #[test]
    fn respects_accept() {
        let ns = nodes(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        for _ in 0..50 {
            let n = pick(&ns, &mut |n| n.addr == ns[2].addr).unwrap();
            assert_eq!(n.addr, ns[2].addr);
        }
        assert!(pick(&ns, &mut |_| false).is_none());
    }
}
