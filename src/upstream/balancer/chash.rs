//! Consistent hashing with the ring of APISIX / lua-resty-balancer (and nginx's ketama-style
//! `hash ... consistent`), so a key lands on the same node as on those gateways, and on every
//! Strait replica.
//!
//! * node id: `host:port` with `:` replaced by NUL; weights divided by their gcd;
//! * 160 points per unit of weight; point `i` is `crc32(id ++ le_bytes(point[i-1]))`, starting
//!   from 0;
//! * a key maps to the first point whose hash is >= `crc32(key)`, wrapping to the first point;
//! * unusable nodes are skipped by walking clockwise (`next`), so health flips never move the
//!   keys of healthy nodes.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::upstream::node::Node;

const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug)]
pub struct Ring {
    /// (hash, node index), sorted by hash (stable for equal hashes).
    points: Vec<(u32, u32)>,
}

/// The node id APISIX hashes: `host\0port` (IPv6 hosts bracketed, every `:` replaced).
pub fn chash_id(addr: SocketAddr) -> Vec<u8> {
    let text = match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    text.into_bytes().into_iter().map(|b| if b == b':' { 0 } else { b }).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Ring {
    pub fn new(nodes: &[Arc<Node>]) -> Self {
        let g = nodes.iter().map(|n| n.weight).filter(|w| *w > 0).fold(0, gcd).max(1);
        let total: u64 = nodes.iter().map(|n| (n.weight / g) as u64 * POINTS_PER_WEIGHT as u64).sum();
        let mut points = Vec::with_capacity(total as usize);
        for (idx, n) in nodes.iter().enumerate() {
            let num = (n.weight / g) * POINTS_PER_WEIGHT;
            let base = crc32fast::hash(&chash_id(n.addr));
            let mut prev: u32 = 0;
            for _ in 0..num {
                let mut h = crc32fast::Hasher::new_with_initial(base);
                h.update(&prev.to_le_bytes());
                prev = h.finalize();
                points.push((prev, idx as u32));
            }
        }
        points.sort_by_key(|p| p.0);
        Ring { points }
    }

    /// Index of the first point with hash >= crc32(key), wrapping to 0.
    #[inline]
    fn find(&self, key: &[u8]) -> usize {
        let h = crc32fast::hash(key);
        let i = self.points.partition_point(|p| p.0 < h);
        if i == self.points.len() { 0 } else { i }
    }

    #[inline]
    pub fn pick<'a>(
        &self,
        nodes: &'a [Arc<Node>],
        key: &[u8],
        accept: &mut dyn FnMut(&Node) -> bool,
    ) -> Option<&'a Arc<Node>> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let mut i = self.find(key);
        let mut last = u32::MAX;
        for _ in 0..n {
            let idx = self.points[i].1;
            if idx != last {
                let node = &nodes[idx as usize];
                if accept(node) {
                    return Some(node);
                }
                last = idx;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        None
    }

    /// Number of points (for tests and the status API).
    pub fn points(&self) -> usize {
        self.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::balancer::testutil::nodes;
    use std::collections::HashMap;

    #[test]
    fn ids_match_apisix() {
        assert_eq!(chash_id("127.0.0.1:1980".parse().unwrap()), b"127.0.0.1\x001980");
        assert_eq!(chash_id("[::1]:80".parse().unwrap()), b"[\x00\x001]\x0080");
    }

    /// Reference trace produced by lua-resty-balancer's own `chash.c` (the ring APISIX uses),
    /// built with the same ids and weights and looked up with `find` (first point >= crc32(key)).
    #[test]
    fn agrees_with_the_apisix_ring() {
        let ns = nodes(&[
            ("127.0.0.1:1980", 1),
            ("127.0.0.1:1981", 2),
            ("127.0.0.1:1982", 3),
            ("10.0.0.7:8080", 1),
        ]);
        let ring = Ring::new(&ns);
        assert_eq!(ring.points(), 1120);
        assert_eq!(ring.points.first().unwrap().0, 3_619_986);
        assert_eq!(ring.points.last().unwrap().0, 4_286_551_731);
        let trace: &[(&str, usize)] = &[
            ("user-1", 0),
            ("user-2", 2),
            ("user-3", 2),
            ("session-abc", 1),
            ("192.168.1.10", 3),
            ("/api/v1/items", 2),
            ("", 2),
            ("x", 2),
            ("apisix", 2),
            ("nginx", 1),
            ("k0", 2),
            ("k1", 2),
            ("k2", 0),
            ("k3", 3),
            ("k4", 2),
            ("k5", 2),
            ("k6", 3),
            ("k7", 2),
            ("k8", 2),
            ("k9", 2),
        ];
        for (key, want) in trace {
            let got = ring.pick(&ns, key.as_bytes(), &mut |_| true).unwrap();
            assert_eq!(got.addr, ns[*want].addr, "key {key:?}");
        }
    }

    #[test]
    fn weights_are_reduced_by_gcd_and_zero_gets_no_points() {
        let ns = nodes(&[("10.0.0.1:80", 100), ("10.0.0.2:80", 200), ("10.0.0.3:80", 0)]);
        assert_eq!(Ring::new(&ns).points(), 3 * 160);
        let ns = nodes(&[("10.0.0.1:80", 0)]);
        let r = Ring::new(&ns);
        assert_eq!(r.points(), 0);
        assert!(r.pick(&ns, b"k", &mut |_| true).is_none());
    }

    #[test]
    fn same_key_same_node_and_healthy_keys_never_move() {
        let ns = nodes(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let ring = Ring::new(&ns);
        let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let before: HashMap<&str, SocketAddr> = keys
            .iter()
            .map(|k| (k.as_str(), ring.pick(&ns, k.as_bytes(), &mut |_| true).unwrap().addr))
            .collect();
        let down = ns[1].addr;
        let mut moved = 0;
        for k in &keys {
            let now = ring.pick(&ns, k.as_bytes(), &mut |n| n.addr != down).unwrap().addr;
            if before[k.as_str()] == down {
                assert_ne!(now, down);
                moved += 1;
            } else {
                assert_eq!(now, before[k.as_str()], "key {k} of a healthy node moved");
            }
        }
        assert!(moved > 200 && moved < 470, "about a third of the keys were on the down node: {moved}");
    }

    #[test]
    fn removing_a_node_keeps_other_assignments() {
        let three = nodes(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let two: Vec<_> = vec![three[0].clone(), three[2].clone()];
        let (r3, r2) = (Ring::new(&three), Ring::new(&two));
        for i in 0..500 {
            let k = format!("k{i}");
            let a = r3.pick(&three, k.as_bytes(), &mut |_| true).unwrap().addr;
            let b = r2.pick(&two, k.as_bytes(), &mut |_| true).unwrap().addr;
            if a != three[1].addr {
                assert_eq!(a, b);
            }
        }
    }
}
