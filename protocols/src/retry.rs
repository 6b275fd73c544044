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
    /// `retry_timeout`'s deadline, counted from the first pick.
    deadline: Option<Instant>,
    tried: Tried,
    /// What each failed attempt was to nginx's `$upstream_status` (502, or 504 for a timeout).
    statuses: Vec<u16>,
    /// `show_upstream_status_in_response_header: true` ([`Retry::show_every_status`]).
    always: bool,
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
            deadline: None,
            tried: Tried::default(),
            statuses: Vec::new(),
            always: false,
            attempt: 0,
            last_error: None,
        }
    }

    /// `X-APISIX-Upstream-Status` on every answer that had an attempt
    /// (`show_upstream_status_in_response_header: true`), not only on 5xx ones.
    pub fn show_every_status(mut self, always: bool) -> Self {
        self.always = always;
        self
    }

    /// Whether this upstream retries at all (a request worth replaying is kept for it).
    pub fn allowed(&self) -> bool {
        self.retries > 0
    }

    /// The node for the next attempt, or the error to answer with: the balancer's when there
    /// was never one; on a retry that finds no node left, a 502 ([`ProxyError::AllTried`]), as
    /// APISIX's balancer answers when its picker fails on a retry (`retries` at least the node
    /// count, or the untried nodes went unhealthy meanwhile). The last attempt's own error is the
    /// answer only when the retries run out first ([`Retry::failed`]).
    pub fn pick<P: UpstreamPicker + ?Sized>(&mut self, picker: &P, key: &[u8]) -> Result<Peer, ProxyError> {
        if self.attempt == 0 {
            self.deadline = self.settings.retry_timeout.map(|t| Instant::now() + t);
        }
        match picker.pick(key, &self.tried) {
            Ok(peer) => {
                self.attempt += 1;
                Ok(peer)
            }
            Err(e) => Err(match self.last_error.take() {
                Some(last) => {
                    tracing::warn!(upstream = &*self.settings.id, last = %last, "failed to pick a node to retry: {e:?}");
                    ProxyError::AllTried
                }
                None => e.into(),
            }),
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
        self.statuses.push(if matches!(error, ProxyError::Timeout(_)) { 504 } else { 502 });
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

    /// APISIX's `X-APISIX-Upstream-Status` for the answer: every attempt's status as nginx's
    /// `$upstream_status` lists them (`504, 502, 500`), the failed ones' and then the status of
    /// the node's answer (`Ok`), if one came; only when the last of them is a 5xx (APISIX's
    /// default, `show_upstream_status_in_response_header: false`). `None` when no attempt
    /// failed and there is no 5xx answer, so a gateway error that never reached a node (no
    /// route, no node) has no such header, as in APISIX. A retry the balancer gave up on (no
    /// node left, `retry_timeout` passed) ends the list with ` :`, as nginx's variable shows the
    /// attempt that got no node (`504, 504 : `, whose last space no client sees: a field value
    /// has no trailing whitespace, and HTTP/2 forbids it). With [`Retry::show_every_status`],
    /// whatever the last status, as long as there was an attempt.
    pub fn upstream_status(&self, answer: Result<u16, &ProxyError>) -> Option<http::HeaderValue> {
        let last = answer.ok();
        let shown = match last.or(self.statuses.last().copied()) {
            Some(s) => self.shown().shows(s),
            None => false,
        };
        if !shown {
            return None;
        }
        let mut v = Vec::with_capacity(5 * (self.statuses.len() + 1) + 3);
        write_statuses(&mut v, &self.statuses, last);
        if matches!(answer, Err(ProxyError::AllTried | ProxyError::RetryTimeout)) {
            v.extend_from_slice(b" :");
        }
        http::HeaderValue::from_bytes(&v).ok()
    }

    /// What a node's answer to the next attempt shows of the attempts so far.
    pub fn shown(&self) -> Shown<'_> {
        Shown { prior: &self.statuses, always: self.always }
    }
}

/// What of a request's attempts an answer's `X-APISIX-Upstream-Status` shows: the statuses of
/// those that failed before it, and whether it is shown whatever the answer's status
/// (`show_upstream_status_in_response_header: true`) or only on a 5xx.
#[derive(Clone, Copy)]
pub struct Shown<'a> {
    pub prior: &'a [u16],
    pub always: bool,
}

impl Shown<'_> {
    /// Whether an answer whose (last) status is `status` carries the header.
    pub fn shows(&self, status: u16) -> bool {
        self.always || (500..600).contains(&status)
    }
}

/// The name of APISIX's header (see [`Retry::upstream_status`]).
pub const UPSTREAM_STATUS: http::HeaderName = http::HeaderName::from_static("x-apisix-upstream-status");

/// Writes `statuses` and then `last`, separated by `, ` (nginx's `$upstream_status`).
pub fn write_statuses(out: &mut Vec<u8>, statuses: &[u16], last: Option<u16>) {
    for (i, s) in statuses.iter().copied().chain(last).enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        // A status has three digits (httparse and `http` take no other).
        let s = s.min(999);
        out.extend_from_slice(&[b'0' + (s / 100) as u8, b'0' + (s / 10 % 10) as u8, b'0' + (s % 10) as u8]);
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
        // More retries than nodes: every node once, then a 502 (APISIX's balancer finds no
        // node to retry), not the last attempt's timeout.
        let mut r = Retry::new(&up);
        for _ in 0..3 {
            let p = r.pick(&up, b"").unwrap();
            r.failed(p.addr, ProxyError::Timeout("connect"), true).unwrap();
        }
        assert!(matches!(r.pick(&up, b""), Err(ProxyError::AllTried)));
        let shown = r.upstream_status(Err(&ProxyError::AllTried)).unwrap();
        assert_eq!(shown, "504, 504, 504 :", "nginx's mark for the attempt that got no node");
        assert_eq!(r.upstream_status(Ok(503)).unwrap(), "504, 504, 504, 503");
        assert_eq!(r.upstream_status(Ok(200)), None);
        let r = r.show_every_status(true);
        assert_eq!(r.upstream_status(Ok(200)).unwrap(), "504, 504, 504, 200");
        // As many retries as other nodes: the last attempt's error.
        let up = list(3, Some(2), None);
        let mut r = Retry::new(&up);
        let mut last = Ok(());
        for _ in 0..3 {
            let p = r.pick(&up, b"").unwrap();
            last = r.failed(p.addr, ProxyError::Timeout("read"), true);
        }
        assert!(matches!(last, Err(ProxyError::Timeout("read"))));
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
