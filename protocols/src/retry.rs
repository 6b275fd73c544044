//! Retry bookkeeping shared by every forwarding loop: the HTTP/1.1 relay ([`crate::h1`]), the
//! general HTTP path ([`crate::http`]) and L4 stream sessions.
//!
//! APISIX's semantics (`apisix/balancer.lua`): `retries` defaults to one attempt per other node;
//! `retry_timeout` is a deadline counted from the first pick and checked before each retry; a
//! retry goes to a node this request has not tried. Whether a failed request may be sent again
//! (it did not reach the node, or it can be replayed) is the caller's to say.

use std::net::SocketAddr;
use std::time::Instant;

use crate::{Peer, ProxyError, Tried, UpstreamPicker, UpstreamSettings};

/// One request's attempts at an upstream.
pub struct Retry<'a> {
    settings: &'a UpstreamSettings,
    /// Retries allowed after the first attempt.
    retries: u32,
    deadline: Option<Instant>,
    tried: Tried,
    attempt: u32,
    /// What the last failed attempt ran into: the answer once no node is left to try.
    last_error: Option<ProxyError>,
}

impl<'a> Retry<'a> {
    pub fn new<P: UpstreamPicker + ?Sized>(picker: &'a P) -> Self {
        let settings = picker.settings();
        Retry {
            settings,
            retries: settings.retries.unwrap_or(picker.node_count().saturating_sub(1) as u32),
            deadline: settings.retry_timeout.map(|t| Instant::now() + t),
            tried: Tried::default(),
            attempt: 0,
            last_error: None,
        }
    }

    /// Whether this upstream retries at all (a request worth replaying is kept for it).
    pub fn allowed(&self) -> bool {
        self.retries > 0
    }

    /// The node for the next attempt, or the error to answer with: the last attempt's once
    /// every node was tried, the balancer's when there was never one.
    pub fn pick<P: UpstreamPicker + ?Sized>(&mut self, picker: &P, key: &[u8]) -> Result<Peer, ProxyError> {
        match picker.pick(key, &self.tried) {
            Ok(peer) => {
                self.attempt += 1;
                Ok(peer)
            }
            Err(e) => Err(self.last_error.take().unwrap_or_else(|| e.into())),
        }
    }

    /// Records that the attempt at `addr` failed with `error` (its outcome is the caller's to
    /// report to the node, which may already be released). `Ok` means try again; `Err` carries
    /// the answer: `error` itself when the retries are used up or the request cannot be sent
    /// again, "proxy retry timeout" once `retry_timeout` has passed.
    pub fn failed(
        &mut self,
        addr: SocketAddr,
        error: ProxyError,
        can_resend: bool,
    ) -> Result<(), ProxyError> {
        tracing::warn!(
            upstream = &*self.settings.id,
            node = %addr,
            attempt = self.attempt,
            error = %error,
            "upstream attempt failed"
        );
        self.tried.push(addr);
        if self.attempt > self.retries
            || !can_resend
            || matches!(error, ProxyError::InvalidResponse(_) | ProxyError::NodeReset(..))
        {
            return Err(error);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(ProxyError::RetryTimeout);
        }
        self.last_error = Some(error);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::{KeepalivePool, PassHost, PickError, Scheme, Timeouts};

    /// Hands out its nodes in order, skipping the tried ones.
    struct List {
        nodes: Vec<SocketAddr>,
        settings: UpstreamSettings,
    }

    impl UpstreamPicker for List {
        fn pick(&self, _key: &[u8], tried: &Tried) -> Result<Peer, PickError> {
            if self.nodes.is_empty() {
                return Err(PickError::NoNode);
            }
            let addr = self.nodes.iter().find(|a| !tried.contains(a)).ok_or(PickError::AllTried)?;
            Ok(Peer::detached(*addr))
        }
        fn node_count(&self) -> usize {
            self.nodes.len()
        }
        fn settings(&self) -> &UpstreamSettings {
            &self.settings
        }
    }

    fn list(n: u16, retries: Option<u32>, retry_timeout: Option<Duration>) -> List {
        let second = Duration::from_secs(1);
        let settings = UpstreamSettings {
            id: Arc::from("up"),
            scheme: Scheme::Http,
            pass_host: PassHost::Pass,
            timeouts: Timeouts { connect: second, send: second, read: second },
            retries,
            retry_timeout,
            keepalive: KeepalivePool::default(),
            tls: None,
        };
        List { nodes: (1..=n).map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect(), settings }
    }

    #[test]
    fn default_is_one_attempt_per_node_then_the_last_error() {
        let up = list(3, None, None);
        let mut r = Retry::new(&up);
        let mut seen = Vec::new();
        loop {
            let peer = r.pick(&up, b"").unwrap();
            seen.push(peer.addr);
            let error = ProxyError::Connect(format!("refused by {}", peer.addr));
            if let Err(e) = r.failed(peer.addr, error, true) {
                assert_eq!(e.to_string(), ProxyError::Connect("refused by 127.0.0.1:3".into()).to_string());
                break;
            }
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn explicit_retries_and_resend_rules() {
        // retries: 0 stops at the first failure.
        let up = list(3, Some(0), None);
        let mut r = Retry::new(&up);
        let p = r.pick(&up, b"").unwrap();
        assert!(r.failed(p.addr, ProxyError::Timeout("read"), true).is_err());
        // A request that cannot be sent again is not retried.
        let up = list(3, Some(5), None);
        let mut r = Retry::new(&up);
        let p = r.pick(&up, b"").unwrap();
        assert!(r.failed(p.addr, ProxyError::Timeout("read"), false).is_err());
        // More retries than nodes: every node once, then the last attempt's error.
        let mut r = Retry::new(&up);
        for _ in 0..3 {
            let p = r.pick(&up, b"").unwrap();
            r.failed(p.addr, ProxyError::Timeout("connect"), true).unwrap();
        }
        assert!(matches!(r.pick(&up, b""), Err(ProxyError::Timeout("connect"))));
    }

    #[test]
    fn retry_timeout_and_empty_upstream() {
        let up = list(3, None, Some(Duration::ZERO));
        let mut r = Retry::new(&up);
        let p = r.pick(&up, b"").unwrap();
        assert!(matches!(r.failed(p.addr, ProxyError::Timeout("read"), true), Err(ProxyError::RetryTimeout)));
        let up = list(0, None, None);
        assert!(matches!(Retry::new(&up).pick(&up, b""), Err(ProxyError::NoNode)));
    }
}
