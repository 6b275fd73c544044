//! Nodes: the immutable attributes of one membership version ([`Node`]) and the state that lives
//! as long as the address stays in the upstream ([`NodeState`]: health, in-flight count, EWMA,
//! counters).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use strait_protocols::{Outcome, PeerNode};

use super::health::state::{Event, Health, Thresholds};

/// Time origin for the EWMA clock.
fn clock_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// EWMA decay time constant (APISIX: 10 s).
const EWMA_TAU_NS: f64 = 10e9;

/// The last active probe of a node, for the control API.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub at: SystemTime,
    pub ok: bool,
    pub detail: String,
}

/// State of one node address in one upstream; survives re-discovery, weight changes and
/// reloads. Only atomics on the request path.
#[derive(Debug)]
pub struct NodeState {
    pub addr: SocketAddr,
    pub health: Health,
    in_flight: AtomicU32,
    /// Peak-EWMA of latency in nanoseconds, as f64 bits.
    ewma: AtomicU64,
    ewma_at: AtomicU64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Written by the probe task only.
    pub last_probe: Mutex<Option<ProbeRecord>>,
}

impl NodeState {
    pub fn new(addr: SocketAddr) -> Self {
        NodeState {
            addr,
            health: Health::default(),
            in_flight: AtomicU32::new(0),
            ewma: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_probe: Mutex::new(None),
        }
    }

    /// Requests currently in flight to this node (all workers).
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn acquire(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn release(&self) {
        // Never underflow, even if a release races a state carried over from a reload.
        let _ = self.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// The latency estimate decayed to now (idle nodes drift toward 0 and get tried again).
    pub fn ewma_ns(&self) -> f64 {
        let v = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        if v == 0.0 {
            return 0.0;
        }
        let dt = clock_ns().saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
        v * (-dt / EWMA_TAU_NS).exp()
    }

    /// Folds one latency sample into the peak-EWMA.
    pub fn observe_latency(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = clock_ns();
        let last = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        // The estimate decayed to now (as `ewma_ns`), then decayed toward the sample, weighted
        // by the time since the last one; a sample above the decayed estimate is taken at once
        // (peak).
        let w = (-(now.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64) / EWMA_TAU_NS).exp();
        let cur = last * w;
        let next = if rtt > cur { rtt } else { cur * w + rtt * (1.0 - w) };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now, Ordering::Relaxed);
    }
}

/// Passive health settings of an upstream, as the request path needs them.
#[derive(Debug, Clone)]
pub struct PassivePolicy {
    pub healthy_statuses: Vec<u16>,
    pub unhealthy_statuses: Vec<u16>,
    pub thresholds: Thresholds,
    /// gRPC statuses counted as failures (RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE).
    pub grpc_failures: Vec<u16>,
    /// Only the failures that make a request try another node count (refused or reset
    /// connections, timeouts): what APISIX reports to an upstream's checker on each retry when
    /// `checks` has no `passive` block.
    pub failures_only: bool,
}

impl PassivePolicy {
    /// The health event for an outcome, if it counts.
    pub fn classify(&self, o: Outcome) -> Option<Event> {
        if self.failures_only && !matches!(o, Outcome::TcpFailure | Outcome::Timeout) {
            return None;
        }
        match o {
            Outcome::HttpStatus(s) => {
                if self.unhealthy_statuses.contains(&s) {
                    Some(Event::HttpFailure)
                } else if self.healthy_statuses.contains(&s) {
                    Some(Event::Success)
                } else {
                    None
                }
            }
            Outcome::GrpcStatus(c) => {
                if self.grpc_failures.contains(&c) {
                    Some(Event::HttpFailure)
                } else {
                    Some(Event::Success)
                }
            }
            Outcome::TcpFailure | Outcome::LateTcpFailure => Some(Event::TcpFailure),
            Outcome::Timeout | Outcome::LateTimeout => Some(Event::Timeout),
            // A connected stream session says little of the node (a client may send it
            // nothing), and APISIX's stream sessions report only failures: a success here would
            // reset the failure count of a node that fails every other connect.
            Outcome::StreamOk => None,
        }
    }
}

/// A node in one membership version of an upstream.
#[derive(Debug)]
pub struct Node {
    pub addr: SocketAddr,
    /// Host as configured or discovered (domain or IP literal).
    pub host: Arc<str>,
    pub port: u16,
    pub weight: u32,
    pub priority: i32,
    pub metadata: Map<String, Value>,
    pub state: Arc<NodeState>,
    /// Passive checks of the upstream, if configured.
    pub passive: Option<Arc<PassivePolicy>>,
    /// The upstream balances by latency (`ewma`): each answer's latency is folded into the
    /// node's estimate. Other balancers skip that work.
    pub track_latency: bool,
    /// Identity of the membership source(s), for the status API.
    pub upstream_id: Arc<str>,
}

impl Node {
    /// Whether the balancer may use this node.
    #[inline]
    pub fn ready(&self) -> bool {
        self.state.health.routable()
    }
}

impl PeerNode for Node {
    fn report(&self, outcome: Outcome, elapsed: Duration) {
        match outcome {
            Outcome::HttpStatus(_) | Outcome::GrpcStatus(_) | Outcome::StreamOk => {
                if self.track_latency {
                    self.state.observe_latency(elapsed)
                }
            }
            Outcome::TcpFailure | Outcome::Timeout | Outcome::LateTcpFailure | Outcome::LateTimeout => {
                self.state.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(p) = &self.passive
            && let Some(ev) = p.classify(outcome)
            && let Some((from, to)) = self.state.health.report(ev, p.thresholds)
        {
            tracing::warn!(
                upstream = &*self.upstream_id,
                node = %self.addr,
                from = from.as_str(),
                to = to.as_str(),
                "node health changed (passive)"
            );
        }
    }

    fn release(&self) {
        self.state.release();
    }

    fn tracks_latency(&self) -> bool {
        self.track_latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::state::{Event, Thresholds};

    #[test]
    fn grpc_statuses_count_as_passive_failures_only_when_the_node_is_at_fault() {
        let p = PassivePolicy {
            healthy_statuses: vec![200],
            unhealthy_statuses: vec![500, 503],
            thresholds: Thresholds { successes: 1, http_failures: 1, tcp_failures: 1, timeouts: 1 },
            grpc_failures: crate::upstream::GRPC_FAILURES.to_vec(),
            failures_only: false,
        };
        // UNAVAILABLE, INTERNAL and RESOURCE_EXHAUSTED are the node's fault.
        for code in [14, 13, 8] {
            assert_eq!(p.classify(Outcome::GrpcStatus(code)), Some(Event::HttpFailure), "code {code}");
        }
        // OK, NOT_FOUND and the client's own DEADLINE_EXCEEDED are answers from a working node.
        for code in [0, 5, 4] {
            assert_eq!(p.classify(Outcome::GrpcStatus(code)), Some(Event::Success), "code {code}");
        }
        assert_eq!(p.classify(Outcome::HttpStatus(503)), Some(Event::HttpFailure));
        assert_eq!(p.classify(Outcome::HttpStatus(404)), None);
        // A connected stream session is no success (APISIX's stream sessions report only
        // failures): a node failing every other connect still reaches `tcp_failures`.
        assert_eq!(p.classify(Outcome::StreamOk), None);
        assert_eq!(p.classify(Outcome::TcpFailure), Some(Event::TcpFailure));
        // Without a `passive` block only what makes a request retry counts.
        let retries_only = PassivePolicy { failures_only: true, ..p.clone() };
        assert_eq!(retries_only.classify(Outcome::TcpFailure), Some(Event::TcpFailure));
        assert_eq!(retries_only.classify(Outcome::Timeout), Some(Event::Timeout));
        assert_eq!(p.classify(Outcome::LateTimeout), Some(Event::Timeout), "a passive block counts it");
        // A failure after the answer's head began made nothing retry.
        for o in [
            Outcome::HttpStatus(503),
            Outcome::HttpStatus(200),
            Outcome::GrpcStatus(14),
            Outcome::StreamOk,
            Outcome::LateTcpFailure,
            Outcome::LateTimeout,
        ] {
            assert_eq!(retries_only.classify(o), None, "{o:?}");
        }
    }
}
