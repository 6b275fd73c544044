//! Consistent hashing with the ring of APISIX / lua-resty-balancer (and nginx's ketama-style
//! `hash ... consistent`), so a key lands on the same node as on those gateways, and on every
//! Strait replica.
//!
//! * node id: `host:port` with `:` replaced by NUL; weights divided by their gcd (and further
//!   for a ring past 16.7 M points, see `MAX_POINTS`);
//! * 160 points per unit of weight; point `i` is `crc32(id ++ le_bytes(point[i-1]))`, starting
//!   from 0;
//! * a key maps to the first point whose hash is >= `crc32(key)`, wrapping to the first point;
//! * unusable nodes are skipped by walking clockwise (`next`), so health flips never move the
//!   keys of healthy nodes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::upstream::node::Node;

const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug)]
pub struct Ring {
    /// (hash, node index), sorted by hash, then node index for equal hashes.
    points: Vec<(u32, u32)>,
    /// What the weights were divided by (`weight_divisor`; an incremental rebuild needs the
    /// same one).
    divisor: u32,
}

/// The node id APISIX hashes: `host\0port` (IPv6 hosts bracketed, every `:` replaced).
pub fn chash_id(addr: SocketAddr) -> Vec<u8> {
    let text = match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    text.into_bytes().into_iter().map(|b| if b == b':' { 0 } else { b }).collect()
}

/// CRC-32 (IEEE, reflected) lookup tables for slicing by four: `CRC_TABLES[0]` is the usual
/// byte-at-a-time table, `CRC_TABLES[k][n]` the CRC of byte `n` followed by `k` zero bytes.
const CRC_TABLES: [[u32; 256]; 4] = {
    let mut t = [[0u32; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 4 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// `crc32(data ++ le_bytes(prev))` given `crc = crc32(data)`: one point step of the ring. The
/// four bytes go in at once (four independent table reads instead of a chain of four), since
/// each point waits for the one before it.
#[inline]
fn crc_step(crc: u32, prev: u32) -> u32 {
    let c = !crc ^ prev;
    !(CRC_TABLES[3][(c & 0xff) as usize]
        ^ CRC_TABLES[2][((c >> 8) & 0xff) as usize]
        ^ CRC_TABLES[1][((c >> 16) & 0xff) as usize]
        ^ CRC_TABLES[0][(c >> 24) as usize])
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Most points a ring is given (128 MiB of them), unless an upstream has more nodes than that
/// allows at one unit each (104,857). lua-resty-balancer gives every unit of weight 160 points
/// whatever the sum, so a weight typed with a few zeros too many would ask for gigabytes. Past
/// this, weights are divided further, each node keeping at least one unit: weights well above
/// the divisor keep their proportions, those below twice it all get one unit, and such a ring
/// no longer maps keys as APISIX's would.
const MAX_POINTS: u64 = 1 << 24;

/// What every weight is divided by: the weights' gcd, as lua-resty-balancer does, or, when that
/// gives more than `MAX_POINTS`, the smallest divisor that does not (the largest weight when
/// even one unit per node is too many).
fn weight_divisor(nodes: &[Arc<Node>]) -> u32 {
    let points = |d: u32| nodes.iter().map(|n| units(n.weight, d)).sum::<u64>() * POINTS_PER_WEIGHT as u64;
    let g = nodes.iter().map(|n| n.weight).filter(|w| *w > 0).fold(0, gcd).max(1);
    if points(g) <= MAX_POINTS {
        return g;
    }
    // `points` does not grow with the divisor: search for the smallest one that fits.
    let (mut lo, mut hi) = (g, nodes.iter().map(|n| n.weight).max().unwrap_or(1).max(g));
    if points(hi) > MAX_POINTS {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if points(mid) <= MAX_POINTS { hi = mid } else { lo = mid }
    }
    hi
}

/// Units of weight a node gets with divisor `g`: none for weight 0, else at least one.
fn units(weight: u32, g: u32) -> u64 {
    if weight == 0 { 0 } else { (weight / g).max(1) as u64 }
}

/// A node's run of points: its index, the CRC of its id, and how many points it gets.
#[derive(Clone, Copy)]
struct Chain {
    idx: u32,
    base: u32,
    len: usize,
}

impl Chain {
    fn of(node: &Node, idx: usize, g: u32) -> Chain {
        Chain {
            idx: idx as u32,
            base: crc32fast::hash(&chash_id(node.addr)),
            len: (units(node.weight, g) * POINTS_PER_WEIGHT as u64) as usize,
        }
    }
}

/// Calls `f(hash, node index)` for every point of `chains`, in no particular order. Each point
/// waits for the one before it in its chain, so four chains are stepped side by side (a lane
/// whose chain ends takes the next one) to overlap their table reads.
#[inline]
fn for_each_point(chains: &[Chain], mut f: impl FnMut(u32, u32)) {
    #[derive(Clone, Copy, Default)]
    struct Lane {
        base: u32,
        idx: u32,
        prev: u32,
        left: usize,
    }
    let mut lanes = [Lane::default(); 4];
    let mut pending = chains.iter();
    loop {
        for lane in lanes.iter_mut() {
            while lane.left == 0 {
                let Some(c) = pending.next() else { break };
                *lane = Lane { base: c.base, idx: c.idx, prev: 0, left: c.len };
            }
        }
        let steps = lanes.iter().map(|l| l.left).min().unwrap_or(0);
        if steps == 0 {
            // The chains ran out: finish what the lanes hold, one after the other.
            for lane in lanes.iter_mut() {
                for _ in 0..lane.left {
                    lane.prev = crc_step(lane.base, lane.prev);
                    f(lane.prev, lane.idx);
                }
            }
            return;
        }
        for _ in 0..steps {
            for lane in lanes.iter_mut() {
                lane.prev = crc_step(lane.base, lane.prev);
                f(lane.prev, lane.idx);
            }
        }
        for lane in lanes.iter_mut() {
            lane.left -= steps;
        }
    }
}

/// The points of `chains`, sorted by hash and, for equal hashes, by node index (the order a
/// stable sort of the points pushed node by node gives, as lua-resty-balancer builds its ring).
///
/// Scattered writes over the whole array are what costs at 10,000 nodes (3.2 M points, 25 MB):
/// each such pass took 20-25 ms on this machine, where a sequential copy takes 4 ms. So there
/// is one: the points are hashed twice, first only to count them by the top 11 bits, then each
/// is written straight into its run of that prefix (about 1,600 points per run); each run is
/// then sorted by its low 21 bits while it sits in cache. A full build went from 200 ms (points
/// pushed, then scattered by 16 bits and each bucket sorted with `sort_by_key`) to about 51 ms
/// for the whole update (`cargo bench --bench hot_path -- apply_update/chash_all`).
fn sorted_points(chains: &[Chain]) -> Vec<(u32, u32)> {
    const TOP: u32 = 11;
    let total: usize = chains.iter().map(|c| c.len).sum();
    if total < 1024 {
        let mut points = Vec::with_capacity(total);
        for_each_point(chains, |h, idx| points.push((h, idx)));
        points.sort_unstable();
        return points;
    }
    let mut starts = vec![0usize; (1 << TOP) + 1];
    for_each_point(chains, |h, _| starts[(h >> (32 - TOP)) as usize + 1] += 1);
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    // Every slot is written below; the zeros only make it a vector to index.
    let mut points = vec![(0u32, 0u32); total];
    let mut next = starts.clone();
    for_each_point(chains, |h, idx| {
        let run = (h >> (32 - TOP)) as usize;
        points[next[run]] = (h, idx);
        next[run] += 1;
    });
    let mut scratch = Vec::new();
    for w in starts.windows(2) {
        let run = &mut points[w[0]..w[1]];
        if run.len() <= 64 {
            run.sort_unstable();
        } else {
            sort_run(run, &mut scratch);
        }
    }
    points
}

/// Sorts a run whose hashes share their top 11 bits: a least-significant-digit radix sort of
/// the low 21 bits (two passes of 11 bits, through `scratch` and back; the second one's top
/// bit is the run's own and changes nothing), then each group of equal hashes by node index.
fn sort_run(run: &mut [(u32, u32)], scratch: &mut Vec<(u32, u32)>) {
    const DIGIT: u32 = 11;
    const RADIX: usize = 1 << DIGIT;
    scratch.clear();
    scratch.resize(run.len(), (0, 0));
    // Both digits are counted in one read of the run.
    let mut counts = [[0u32; RADIX]; 2];
    for p in run.iter() {
        counts[0][p.0 as usize & (RADIX - 1)] += 1;
        counts[1][(p.0 >> DIGIT) as usize & (RADIX - 1)] += 1;
    }
    let pass = |src: &[(u32, u32)], dst: &mut [(u32, u32)], shift: u32, next: &mut [u32; RADIX]| {
        let mut sum = 0;
        for n in next.iter_mut() {
            let count = *n;
            *n = sum;
            sum += count;
        }
        for p in src {
            let d = ((p.0 >> shift) as usize) & (RADIX - 1);
            dst[next[d] as usize] = *p;
            next[d] += 1;
        }
    };
    let [low, high] = &mut counts;
    pass(run, scratch, 0, low);
    pass(scratch, run, DIGIT, high);
    let mut i = 0;
    while i < run.len() {
        let mut j = i + 1;
        while j < run.len() && run[j].0 == run[i].0 {
            j += 1;
        }
        if j - i > 1 {
            run[i..j].sort_unstable();
        }
        i = j;
    }
}

impl Ring {
    pub fn new(nodes: &[Arc<Node>]) -> Self {
        let g = weight_divisor(nodes);
        let chains: Vec<Chain> = nodes.iter().enumerate().map(|(idx, n)| Chain::of(n, idx, g)).collect();
        Ring { points: sorted_points(&chains), divisor: g }
    }

    /// The ring for `nodes`, reusing `self` (built for `prev`): points of nodes that stayed (same
    /// address and weight) are kept and renumbered, only new nodes are hashed, and the two sorted
    /// runs are merged. The result is identical to `Ring::new(nodes)`; a rolling update of a
    /// large upstream then costs a sequential pass instead of a full sort.
    pub fn rebuild(&self, prev: &[Arc<Node>], nodes: &[Arc<Node>]) -> Ring {
        let g = weight_divisor(nodes);
        if g != self.divisor || prev.is_empty() {
            return Ring::new(nodes);
        }
        let index: HashMap<SocketAddr, (u32, u32)> =
            nodes.iter().enumerate().map(|(i, n)| (n.addr, (i as u32, n.weight))).collect();
        let mut kept = vec![false; nodes.len()];
        let remap: Vec<u32> = prev
            .iter()
            .map(|n| match index.get(&n.addr) {
                Some(&(i, w)) if w == n.weight && !kept[i as usize] => {
                    kept[i as usize] = true;
                    i
                }
                _ => u32::MAX,
            })
            .collect();
        let chains: Vec<Chain> = (nodes.iter().enumerate())
            .filter(|(idx, _)| !kept[*idx])
            .map(|(idx, n)| Chain::of(n, idx, g))
            .collect();
        if chains.iter().map(|c| c.len).sum::<usize>() > self.points.len() / 2 {
            // Mostly new nodes: a full build, with the chains already made.
            let mut fresh = chains.into_iter().peekable();
            let all: Vec<Chain> = (nodes.iter().enumerate())
                .map(|(idx, n)| {
                    fresh.next_if(|c| c.idx as usize == idx).unwrap_or_else(|| Chain::of(n, idx, g))
                })
                .collect();
            return Ring { points: sorted_points(&all), divisor: g };
        }
        let added = sorted_points(&chains);
        let mut points: Vec<(u32, u32)> = Vec::with_capacity(self.points.len() + added.len());
        // Where a point's hash equals the one before it (about a thousand among 3 M points):
        // such groups are ordered by node index afterwards, as a full build orders them.
        let mut ties = Vec::new();
        let mut push = |p: (u32, u32)| {
            if points.last().is_some_and(|last| last.0 == p.0) {
                ties.push(points.len());
            }
            points.push(p);
        };
        let mut next_added = 0;
        for &(h, old) in &self.points {
            let idx = remap[old as usize];
            if idx == u32::MAX {
                continue;
            }
            while let Some(&p) = added.get(next_added).filter(|p| p.0 < h) {
                push(p);
                next_added += 1;
            }
            push((h, idx));
        }
        for &p in &added[next_added..] {
            push(p);
        }
        let mut k = 0;
        while k < ties.len() {
            let (start, mut end) = (ties[k] - 1, ties[k]);
            while ties.get(k + 1) == Some(&(end + 1)) {
                k += 1;
                end += 1;
            }
            points[start..=end].sort_unstable();
            k += 1;
        }
        Ring { points, divisor: g }
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
    fn point_step_is_the_crc_of_the_id_and_the_previous_point() {
        let id = chash_id("10.0.0.7:8080".parse().unwrap());
        let base = crc32fast::hash(&id);
        let mut prev = 0u32;
        for _ in 0..1000 {
            let mut data = id.clone();
            data.extend_from_slice(&prev.to_le_bytes());
            let want = crc32fast::hash(&data);
            assert_eq!(crc_step(base, prev), want);
            prev = want;
        }
    }

    /// The ring by its definition: each node's points in node order, each the CRC of the id
    /// and the point before it, then a stable sort by hash.
    fn ring_by_definition(ns: &[Arc<Node>]) -> Vec<(u32, u32)> {
        let g = weight_divisor(ns);
        let mut points = Vec::new();
        for (idx, n) in ns.iter().enumerate() {
            let id = chash_id(n.addr);
            let mut prev = 0u32;
            for _ in 0..units(n.weight, g) * POINTS_PER_WEIGHT as u64 {
                let mut data = id.clone();
                data.extend_from_slice(&prev.to_le_bytes());
                prev = crc32fast::hash(&data);
                points.push((prev, idx as u32));
            }
        }
        points.sort_by_key(|p| p.0);
        points
    }

    #[test]
    fn ring_equals_its_definition() {
        let ns: Vec<String> = (0..601).map(|i| format!("10.1.{}.{}:80", i / 200, i % 200)).collect();
        let pairs: Vec<(&str, u32)> =
            ns.iter().enumerate().map(|(i, s)| (s.as_str(), 2 + (i as u32 % 3) * 2)).collect();
        let big = nodes(&pairs);
        assert!(Ring::new(&big).points.len() > 100_000);
        assert_eq!(Ring::new(&big).points, ring_by_definition(&big));
        // Fewer than 1,024 points take a plain sort.
        let small = nodes(&pairs[..3]);
        assert!(Ring::new(&small).points.len() < 1024);
        assert_eq!(Ring::new(&small).points, ring_by_definition(&small));
    }

    #[test]
    fn equal_hashes_are_ordered_by_node_index() {
        // A run shares its top 11 bits; equal hashes arrive out of node order.
        let mut run: Vec<(u32, u32)> =
            (0..3000u32).map(|i| (0xABC0_0000 | (i % 37).wrapping_mul(7919), 2999 - i)).collect();
        let mut want = run.clone();
        want.sort_unstable();
        sort_run(&mut run, &mut Vec::new());
        assert_eq!(run, want);
        // Nodes with the same address hash to the same points: the lower index comes first.
        let twins = nodes(&[("10.0.0.1:80", 2), ("10.0.0.2:80", 1), ("10.0.0.1:80", 2), ("10.0.0.3:80", 3)]);
        let ring = Ring::new(&twins);
        assert!(ring.points.len() >= 1024);
        assert_eq!(ring.points, ring_by_definition(&twins));
        // So does an incremental rebuild, where one twin's points are kept (renumbered) and the
        // other's are new, and the nodes come in another order.
        let reordered = nodes(&[
            ("10.0.0.3:80", 3),
            ("10.0.0.1:80", 2),
            ("10.0.0.4:80", 1),
            ("10.0.0.1:80", 2),
            ("10.0.0.2:80", 1),
        ]);
        assert_eq!(ring.rebuild(&twins, &reordered).points, ring_by_definition(&reordered));
    }

    #[test]
    fn incremental_rebuild_equals_a_full_build() {
        let specs: Vec<String> = (0..400).map(|i| format!("10.2.{}.{}:80", i / 200, i % 200)).collect();
        let all: Vec<(&str, u32)> =
            specs.iter().enumerate().map(|(i, s)| (s.as_str(), 1 + i as u32 % 3)).collect();
        let before = nodes(&all[..300]);
        let ring = Ring::new(&before);
        // Drop every seventh node, change one weight, add a hundred, and reorder.
        let mut after_spec: Vec<(&str, u32)> =
            all[..300].iter().enumerate().filter(|(i, _)| i % 7 != 0).map(|(_, p)| *p).collect();
        after_spec[5].1 += 1;
        after_spec.extend_from_slice(&all[300..]);
        after_spec.reverse();
        let after = nodes(&after_spec);
        let inc = ring.rebuild(&before, &after);
        assert_eq!(inc.points, Ring::new(&after).points);
        // A gcd change falls back to a full build with the same result.
        let doubled: Vec<(&str, u32)> = after_spec.iter().map(|(a, w)| (*a, w * 2)).collect();
        let doubled = nodes(&doubled);
        assert_eq!(inc.rebuild(&after, &doubled).points, Ring::new(&doubled).points);
        // Mostly new nodes (ten kept, three hundred new) take a full build.
        let small = nodes(&all[..100]);
        let mostly_new = nodes(&all[90..]);
        assert_eq!(Ring::new(&small).rebuild(&small, &mostly_new).points, ring_by_definition(&mostly_new));
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
    fn a_huge_weight_is_scaled_down_not_given_gigabytes() {
        // 4 G units of 160 points each would be 5 TB of points (and overflowed a u32 count).
        let ns = nodes(&[("10.0.0.1:80", u32::MAX), ("10.0.0.2:80", 1), ("10.0.0.3:80", 3_000_000)]);
        let points = |d: u32| ns.iter().map(|n| units(n.weight, d)).sum::<u64>() * POINTS_PER_WEIGHT as u64;
        let d = weight_divisor(&ns);
        // The smallest divisor that fits the cap.
        assert!(points(d) <= MAX_POINTS && points(d - 1) > MAX_POINTS, "divisor {d}: {} points", points(d));
        // Every node keeps at least a unit, and weights well above the divisor their proportions.
        let units: Vec<u64> = ns.iter().map(|n| units(n.weight, d)).collect();
        assert_eq!(units[1], 1);
        let ratio = units[0] as f64 / units[2] as f64;
        assert!((ratio - u32::MAX as f64 / 3e6).abs() < 0.02 * ratio, "{units:?}");
        // Weights that fit are only divided by their gcd.
        assert_eq!(weight_divisor(&nodes(&[("10.0.0.1:80", 500), ("10.0.0.2:80", 1500)])), 500);
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
