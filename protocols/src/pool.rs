//! Keep-alive connections to nodes, one pool per worker thread.
//!
//! Every Strait worker runs its own single-threaded runtime, so each worker keeps its own pool in
//! a thread-local: checkout and return take no lock. Connections are keyed by node address, TLS
//! settings and SNI, so a connection is only reused with exactly the settings it was made with.
//!
//! HTTP/1 connections are exclusive: a checked-out connection comes back (via [`Pooled::release`])
//! only when the response body was read to its end. HTTP/2 connections are shared: every request
//! clones the sender of a live connection.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};

use crate::body::ProxyBody;
use crate::fxhash::FxHashMap;

/// Identity of a pooled connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    /// 0 for plain TCP, else [`crate::tls::ClientTls::pool_id`].
    pub tls: u64,
    /// Server name sent in the TLS handshake.
    pub sni: Option<Arc<str>>,
}

/// Limits applied when returning a connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: usize,
    pub idle_timeout: Duration,
    pub max_requests: u32,
}

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    uses: u32,
    since: Instant,
    idle_timeout: Duration,
    /// The pool's `size` when it came back (what [`sweep`] trims to).
    size: usize,
}

/// How long an idle HTTP/1.1 node connection beyond its pool's `size` is kept (here and in the
/// relay's pool, `crate::h1`). nginx (and so APISIX) closes such a connection as soon as it
/// comes back; Strait keeps it while it was used within this time, then closes it at the next
/// check-in for its node or the next sweep (every few seconds). The answers of many clients
/// tend to come back together and their next requests together a moment later: with 1,000
/// clients through the relay on one worker and `size: 256`, closing at once opened 54,322 node
/// connections in 5 s (the node's accepts and Strait's connects costing both cores) against
/// 1,001 with this, and the rate went from 0.89 of nginx's to 1.24 (BENCHMARKS.md, "Many
/// clients").
pub(crate) const OVERFLOW_GRACE: Duration = Duration::from_secs(1);

/// How many of the oldest entries of `list` (its front; `since` gives when each came back)
/// beyond `size` have been idle for [`OVERFLOW_GRACE`] at `now`, counting `extra` entries about
/// to join it: those to drop.
pub(crate) fn stale_overflow<T>(
    list: &[T],
    since: impl Fn(&T) -> Instant,
    size: usize,
    extra: usize,
    now: Instant,
) -> usize {
    let excess = (list.len() + extra).saturating_sub(size);
    list.iter().take(excess).take_while(|c| now.saturating_duration_since(since(c)) >= OVERFLOW_GRACE).count()
}

/// How many server names one node (address and TLS settings) may have pooled connections for,
/// per worker and kind of pool. With `pass_host: pass` a TLS node's server name is the client's
/// Host, so a client sending a new Host with every request would otherwise leave a new pool
/// behind each (idle connections piling up for `idle_timeout`). Past this, a new name's pool
/// takes the place of the node's pool used longest ago, whose idle connections are closed.
pub(crate) const NAMES_PER_NODE: usize = 64;

/// The pools each node has by server name: see [`NAMES_PER_NODE`].
#[derive(Default)]
pub(crate) struct NameCount(FxHashMap<(SocketAddr, u64), Vec<PoolKey>>);

impl NameCount {
    /// Counts a pool for `key`, which has none yet. When its node has `NAMES_PER_NODE` already,
    /// returns the one to drop in its place: the one whose newest connection came back longest
    /// ago (`last_used`; `None` for an empty pool, which goes first).
    pub(crate) fn admit(
        &mut self,
        key: &PoolKey,
        last_used: impl Fn(&PoolKey) -> Option<Instant>,
    ) -> Option<PoolKey> {
        key.sni.as_ref()?;
        let names = self.0.entry((key.addr, key.tls)).or_default();
        let evicted = if names.len() >= NAMES_PER_NODE {
            // The first of equals: the name admitted longest ago (order is kept).
            let victim = (0..names.len()).min_by_key(|&i| last_used(&names[i]))?;
            Some(names.remove(victim))
        } else {
            None
        };
        names.push(key.clone());
        evicted
    }

    /// `key`'s pool is gone.
    pub(crate) fn release(&mut self, key: &PoolKey) {
        if key.sni.is_none() {
            return;
        }
        if let Some(names) = self.0.get_mut(&(key.addr, key.tls)) {
            names.retain(|k| k != key);
            if names.is_empty() {
                self.0.remove(&(key.addr, key.tls));
            }
        }
    }
}

/// An HTTP/1 connection checked out of the pool.
pub struct Pooled {
    pub(crate) key: PoolKey,
    pub(crate) sender: http1::SendRequest<ProxyBody>,
    pub(crate) uses: u32,
    pub(crate) limits: Limits,
}

impl Pooled {
    pub(crate) fn new(key: PoolKey, sender: http1::SendRequest<ProxyBody>, limits: Limits) -> Self {
        Pooled { key, sender, uses: 0, limits }
    }

    /// Returns the connection to this worker's pool if it may be reused.
    ///
    /// Called once the response has ended, when hyper may not have marked the connection ready
    /// for the next request yet; see [`checkout_h1`] for one that never becomes ready.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// [`Pooled::release`] at `now`. The list is in check-in order (checkouts take among the
    /// newest), so the connections that stayed idle longest are at its front.
    fn release_at(self, now: Instant) {
        if self.sender.is_closed() || self.uses >= self.limits.max_requests || self.limits.size == 0 {
            return;
        }
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let p = &mut *p;
            if !p.h1.contains_key(&self.key) {
                let h1 = &p.h1;
                let last_used = |k: &PoolKey| h1.get(k).and_then(|l| l.last().map(|i| i.since));
                if let Some(old) = p.h1_names.admit(&self.key, last_used) {
                    p.h1.remove(&old);
                }
            }
            let list = p.h1.entry(self.key).or_default();
            if list.len() >= self.limits.size {
                let stale = stale_overflow(list, |i| i.since, self.limits.size, 1, now);
                list.drain(..stale);
            }
            list.push(Idle {
                sender: self.sender,
                uses: self.uses,
                since: now,
                idle_timeout: self.limits.idle_timeout,
                size: self.limits.size,
            });
        });
    }
}

#[derive(Default)]
struct Pool {
    h1: FxHashMap<PoolKey, Vec<Idle>>,
    h2: FxHashMap<PoolKey, Vec<http2::SendRequest<ProxyBody>>>,
    h1_names: NameCount,
    h2_names: NameCount,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// How many of the newest idle connections [`checkout_h1`] looks through for one that is ready.
const READY_SCAN: usize = 4;

/// Takes an idle HTTP/1 connection for `key`, newest first, dropping closed or expired ones.
///
/// One that hyper already marks ready for a request is preferred: a connection is pooled when
/// its answer ends, and hyper marks it ready a moment later, or never if it is still sending a
/// request body the node stopped reading after answering early (hyper keeps it in that state
/// until the node reads the rest or the write fails: hyper issue 4176). The caller waits only
/// briefly for one that is not ready.
pub(crate) fn checkout_h1(key: &PoolKey, limits: Limits) -> Option<Pooled> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.h1.get_mut(key)?;
        let now = Instant::now();
        while let Some(last) = list.last() {
            if last.sender.is_closed() || now.duration_since(last.since) >= limits.idle_timeout {
                list.pop();
                continue;
            }
            let newest = list.len() - 1;
            let ready = (newest.saturating_sub(READY_SCAN - 1)..=newest)
                .rev()
                .find(|&i| list[i].sender.is_ready() && !list[i].sender.is_closed())
                .unwrap_or(newest);
            let idle = list.remove(ready);
            return Some(Pooled { key: key.clone(), sender: idle.sender, uses: idle.uses, limits });
        }
        None
    })
}

/// How many HTTP/2 connections one worker opens to one node at most.
const H2_CONNS_PER_NODE: usize = 4;

/// A live shared HTTP/2 connection for `key`, if any.
pub(crate) fn checkout_h2(key: &PoolKey) -> Option<http2::SendRequest<ProxyBody>> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.h2.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        // Prefer a connection with free stream capacity; rotate so load spreads.
        let idx = list.iter().position(|s| s.is_ready()).or(if list.is_empty() { None } else { Some(0) })?;
        let s = list.remove(idx);
        list.push(s.clone());
        Some(s)
    })
}

/// Stores a new HTTP/2 connection for sharing.
pub(crate) fn store_h2(key: PoolKey, sender: http2::SendRequest<ProxyBody>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let p = &mut *p;
        if !p.h2.contains_key(&key) {
            // Shared connections keep no time of use: the name admitted first goes first.
            if let Some(old) = p.h2_names.admit(&key, |_| None) {
                p.h2.remove(&old);
            }
        }
        let list = p.h2.entry(key).or_default();
        if list.len() < H2_CONNS_PER_NODE {
            list.push(sender);
        }
    });
}

/// Drops idle connections older than their idle timeout, those beyond their pool's `size`
/// idle for [`OVERFLOW_GRACE`], and closed HTTP/2 connections. Run periodically by each worker.
pub fn sweep() {
    sweep_at(Instant::now());
}

fn sweep_at(now: Instant) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let p = &mut *p;
        let names = &mut p.h1_names;
        p.h1.retain(|key, list| {
            list.retain(|i| !i.sender.is_closed() && now.saturating_duration_since(i.since) < i.idle_timeout);
            if let Some(size) = list.last().map(|i| i.size) {
                let stale = stale_overflow(list, |i| i.since, size, 0, now);
                list.drain(..stale);
            }
            let keep = !list.is_empty();
            if !keep {
                names.release(key);
            }
            keep
        });
        let names = &mut p.h2_names;
        p.h2.retain(|key, list| {
            list.retain(|s| !s.is_closed());
            let keep = !list.is_empty();
            if !keep {
                names.release(key);
            }
            keep
        });
    });
}

/// Number of idle HTTP/1 connections in this worker's pool (for tests and the status API).
pub fn idle_h1_count() -> usize {
    POOL.with(|p| p.borrow().h1.values().map(Vec::len).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without times of use (HTTP/2's shared connections), the names admitted longest ago make
    /// room first, one after the other.
    #[test]
    fn names_without_times_of_use_leave_in_the_order_they_came() {
        let mut names = NameCount::default();
        let key = |i: usize| PoolKey {
            addr: "127.0.0.1:9".parse().unwrap(),
            tls: 1,
            sni: Some(format!("h{i}").into()),
        };
        for i in 0..NAMES_PER_NODE {
            assert_eq!(names.admit(&key(i), |_| None), None);
        }
        let evicted: Vec<PoolKey> =
            (NAMES_PER_NODE..NAMES_PER_NODE + 3).filter_map(|i| names.admit(&key(i), |_| None)).collect();
        assert_eq!(evicted, [key(0), key(1), key(2)]);
        // A key without a name is not counted.
        let plain = PoolKey { sni: None, ..key(0) };
        assert_eq!(names.admit(&plain, |_| None), None);
    }

    /// As the relay's pool (`h1`'s test): a burst of returns keeps its connections past `size`
    /// for the requests that follow; those idle for the grace leave at the next return or sweep,
    /// the longest idle first, down to `size`.
    #[tokio::test]
    async fn connections_past_the_pool_size_stay_only_while_recently_used() {
        let key = PoolKey { addr: "127.0.0.1:9".parse().unwrap(), tls: 0, sni: None };
        let limits = Limits { size: 2, idle_timeout: Duration::from_secs(60), max_requests: 100 };
        let mut peers = Vec::new();
        let mut conn = || {
            let (a, b) = tokio::io::duplex(1024);
            peers.push(b);
            async move {
                let (sender, conn) = http1::handshake(hyper_util::rt::TokioIo::new(a)).await.unwrap();
                tokio::spawn(conn);
                sender
            }
        };
        let idle = || POOL.with(|p| p.borrow().h1.get(&key).map_or(0, Vec::len));
        let t0 = Instant::now();
        let later = t0 + OVERFLOW_GRACE;
        for _ in 0..4 {
            Pooled::new(key.clone(), conn().await, limits).release_at(t0);
        }
        assert_eq!(idle(), 4, "a burst within the grace is kept whole");
        Pooled::new(key.clone(), conn().await, limits).release_at(later);
        assert_eq!(idle(), 2, "three stale ones left, down to size with the newcomer");
        for _ in 0..3 {
            Pooled::new(key.clone(), conn().await, limits).release_at(later);
        }
        assert_eq!(idle(), 4, "the stale one left behind the newcomers went with the first of them");
        sweep_at(later + OVERFLOW_GRACE);
        assert_eq!(idle(), 2, "the sweep trims what stayed idle past the grace");
        sweep_at(later + Duration::from_secs(60));
        assert_eq!(idle(), 0, "idle_timeout still applies");
    }
}
