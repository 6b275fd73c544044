//! The per-node health state machine, with lua-resty-healthcheck's counter model (what APISIX
//! uses), packed into one atomic word so the request path and the probes update it without locks.
//!
//! Four 8-bit counters (successes, HTTP failures, TCP failures, timeouts) plus a 2-bit state.
//! A success resets the three failure counters; any failure resets the success counter. A counter
//! reaching its threshold flips the state; below it, a report against the current state moves a
//! node to `mostly_healthy` / `mostly_unhealthy`, which route like `healthy` / `unhealthy`.
//! Reports in the direction of the full current state change nothing. A threshold of 0 disables
//! that counter.

use std::sync::atomic::{AtomicU64, Ordering};

/// Health as reported by the control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Healthy,
    MostlyHealthy,
    Unhealthy,
    MostlyUnhealthy,
}

impl Status {
    /// Whether the balancer may use the node.
    pub fn routable(self) -> bool {
        matches!(self, Status::Healthy | Status::MostlyHealthy)
    }
    /// The control API string.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::MostlyHealthy => "mostly_healthy",
            Status::Unhealthy => "unhealthy",
            Status::MostlyUnhealthy => "mostly_unhealthy",
        }
    }
    fn bits(self) -> u64 {
        match self {
            Status::Healthy => 0,
            Status::MostlyHealthy => 1,
            Status::Unhealthy => 2,
            Status::MostlyUnhealthy => 3,
        }
    }
    fn from_bits(b: u64) -> Status {
        match b & 3 {
            0 => Status::Healthy,
            1 => Status::MostlyHealthy,
            2 => Status::Unhealthy,
            _ => Status::MostlyUnhealthy,
        }
    }
}

/// One observation about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Success,
    HttpFailure,
    TcpFailure,
    Timeout,
}

/// Thresholds of one reporter (active or passive checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub successes: u8,
    pub http_failures: u8,
    pub tcp_failures: u8,
    pub timeouts: u8,
}

/// Counter values, for the control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub success: u8,
    pub http_failure: u8,
    pub tcp_failure: u8,
    pub timeout_failure: u8,
}

const SUCC: u32 = 0;
const HTTP: u32 = 8;
const TCP: u32 = 16;
const TIMEOUT: u32 = 24;
const STATE: u32 = 32;

fn get(word: u64, shift: u32) -> u8 {
    ((word >> shift) & 0xff) as u8
}

/// Pure transition function: the new word after `event` under `t`.
pub fn transition(word: u64, event: Event, t: Thresholds) -> u64 {
    let state = Status::from_bits(word >> STATE);
    let (shift, limit, healthy_report) = match event {
        Event::Success => (SUCC, t.successes, true),
        Event::HttpFailure => (HTTP, t.http_failures, false),
        Event::TcpFailure => (TCP, t.tcp_failures, false),
        Event::Timeout => (TIMEOUT, t.timeouts, false),
    };
    if limit == 0 {
        return word;
    }
    if healthy_report && state == Status::Healthy || !healthy_report && state == Status::Unhealthy {
        return word;
    }
    let count = get(word, shift).saturating_add(1);
    if count >= limit {
        let new_state = if healthy_report { Status::Healthy } else { Status::Unhealthy };
        return new_state.bits() << STATE;
    }
    // Success resets the failure counters; a failure resets the success counter.
    let counters = if healthy_report {
        (count as u64) << SUCC
    } else {
        (word & ((0xff << HTTP) | (0xff << TCP) | (0xff << TIMEOUT)) & !(0xff << shift))
            | ((count as u64) << shift)
    };
    let new_state = match (healthy_report, state) {
        (true, Status::Unhealthy) => Status::MostlyUnhealthy,
        (false, Status::Healthy) => Status::MostlyHealthy,
        (_, s) => s,
    };
    counters | (new_state.bits() << STATE)
}

/// The health of one node: one atomic word.
#[derive(Debug, Default)]
pub struct Health {
    word: AtomicU64,
}

impl Health {
    /// Applies an event; returns the (old, new) status when it changed.
    pub fn report(&self, event: Event, t: Thresholds) -> Option<(Status, Status)> {
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let next = transition(cur, event, t);
            if next == cur {
                return None;
            }
            match self.word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    let (a, b) = (Status::from_bits(cur >> STATE), Status::from_bits(next >> STATE));
                    return (a != b).then_some((a, b));
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Current status.
    #[inline]
    pub fn status(&self) -> Status {
        Status::from_bits(self.word.load(Ordering::Relaxed) >> STATE)
    }

    /// Whether the balancer may use the node.
    #[inline]
    pub fn routable(&self) -> bool {
        self.status().routable()
    }

    /// Current counters.
    pub fn counters(&self) -> Counters {
        let w = self.word.load(Ordering::Relaxed);
        Counters {
            success: get(w, SUCC),
            http_failure: get(w, HTTP),
            tcp_failure: get(w, TCP),
            timeout_failure: get(w, TIMEOUT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { successes: 2, http_failures: 3, tcp_failures: 2, timeouts: 3 };

    #[test]
    fn failures_eject_and_successes_readmit() {
        let h = Health::default();
        assert_eq!(h.status(), Status::Healthy);
        assert_eq!(h.report(Event::Success, T), None, "success while healthy is a no-op");
        assert_eq!(h.report(Event::TcpFailure, T), Some((Status::Healthy, Status::MostlyHealthy)));
        assert!(h.routable());
        assert_eq!(h.report(Event::TcpFailure, T), Some((Status::MostlyHealthy, Status::Unhealthy)));
        assert!(!h.routable());
        assert_eq!(h.counters(), Counters::default(), "counters reset on a flip");
        assert_eq!(h.report(Event::Success, T), Some((Status::Unhealthy, Status::MostlyUnhealthy)));
        assert!(!h.routable());
        assert_eq!(h.report(Event::Success, T), Some((Status::MostlyUnhealthy, Status::Healthy)));
    }

    #[test]
    fn a_success_resets_failure_counters_and_vice_versa() {
        let h = Health::default();
        h.report(Event::HttpFailure, T);
        h.report(Event::HttpFailure, T);
        assert_eq!(h.counters().http_failure, 2);
        h.report(Event::Success, T);
        assert_eq!(h.counters().http_failure, 0);
        assert_eq!(h.counters().success, 1);
        h.report(Event::HttpFailure, T);
        assert_eq!(h.counters().success, 0);
        assert_eq!(h.counters().http_failure, 1);
        // Different failure kinds count separately.
        h.report(Event::Timeout, T);
        assert_eq!(h.counters().http_failure, 1);
        assert_eq!(h.counters().timeout_failure, 1);
        assert!(h.routable());
    }

    #[test]
    fn zero_threshold_disables_a_counter() {
        let t = Thresholds { tcp_failures: 0, ..T };
        let h = Health::default();
        for _ in 0..10 {
            h.report(Event::TcpFailure, t);
        }
        assert_eq!(h.status(), Status::Healthy);
    }
}
