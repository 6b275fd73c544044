//! Active health checking: one probe task per node (not per worker), with jitter, at most
//! `concurrency` probes of one upstream at a time. Probe results and passive reports from real
//! traffic update the same per-node state machine ([`state`]), which is exactly what the balancer
//! reads.

pub mod probe;
pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use strait_protocols::{PassHost, Scheme, UpstreamSettings};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use super::BuildContext;
use super::node::{Node, NodeState, ProbeRecord};
use crate::config::resources::{ActiveCheck, UpstreamSpec};
use probe::{ProbeTarget, run_probe};
use state::Thresholds;

/// The probe tasks of one upstream.
pub struct HealthProbes {
    check: Option<Arc<ActiveCheck>>,
    ctx: BuildContext,
    sem: Arc<Semaphore>,
    tasks: Mutex<HashMap<SocketAddr, AbortHandle>>,
    upstream: Arc<str>,
    /// What the probes connect with when they use TLS, shared by all of them.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl HealthProbes {
    pub fn new(spec: &UpstreamSpec, ctx: &BuildContext) -> Self {
        let check = spec.checks.as_ref().map(|c| Arc::new(c.active.clone()));
        // The upstream's mTLS client certificate is presented by https / grpcs probes too.
        let client_cert = spec.tls.as_ref().and_then(|t| t.client_cert.clone());
        let tls = check.as_ref().and_then(|c| probe::probe_tls(c, spec.scheme, &ctx.roots, client_cert));
        let permits = check.as_ref().map_or(1, |c| c.concurrency.max(1) as usize);
        HealthProbes {
            check,
            ctx: ctx.clone(),
            sem: Arc::new(Semaphore::new(permits)),
            tasks: Mutex::new(HashMap::new()),
            upstream: Arc::from(spec.id.as_str()),
            tls,
        }
    }

    /// Starts probes for new addresses and stops those of removed ones.
    pub fn sync(&self, nodes: &[Arc<Node>], settings: &UpstreamSettings) {
        let Some(check) = &self.check else { return };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<SocketAddr, &Arc<Node>> = nodes.iter().map(|n| (n.addr, n)).collect();
        tasks.retain(|addr, h| {
            let keep = wanted.contains_key(addr);
            if !keep {
                h.abort();
            }
            keep
        });
        for (addr, node) in wanted {
            if tasks.contains_key(&addr) {
                continue;
            }
            let target = Arc::new(ProbeTarget::new(node, check, settings, self.tls.clone()));
            let c = check.clone();
            let probe = move || {
                let (t, c) = (target.clone(), c.clone());
                async move { run_probe(&t, &c).await }
            };
            let fut =
                probe_loop(node.state.clone(), check.clone(), probe, self.sem.clone(), self.upstream.clone());
            let handle = self.ctx.background.spawn(fut);
            tasks.insert(addr, handle.abort_handle());
        }
    }

    /// Stops every probe.
    pub fn stop(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, h) in tasks.drain() {
            h.abort();
        }
    }

    /// Whether active checks are configured.
    pub fn enabled(&self) -> bool {
        self.check.is_some()
    }
}

impl Drop for HealthProbes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Thresholds of active checks.
pub fn active_thresholds(c: &ActiveCheck) -> Thresholds {
    Thresholds {
        successes: c.healthy_successes,
        http_failures: c.http_failures,
        tcp_failures: c.tcp_failures,
        timeouts: c.timeouts,
    }
}

/// A uniformly random duration in `[0, max)`.
fn jitter(max: Duration) -> Duration {
    let nanos = max.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(super::balancer::rand_u64() % nanos)
}

/// Runs `probe` forever with the check's intervals: `healthy.interval` while the node routes,
/// `unhealthy.interval` while it does not, each +-10%, the first one within a second.
async fn probe_loop<F, Fut>(
    state: Arc<NodeState>,
    check: Arc<ActiveCheck>,
    probe: F,
    sem: Arc<Semaphore>,
    upstream: Arc<str>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = probe::ProbeResult>,
{
    let thresholds = active_thresholds(&check);
    // Spread the first probes of many nodes over the first interval.
    tokio::time::sleep(jitter(check.healthy_interval.min(Duration::from_secs(1)))).await;
    loop {
        let result = {
            let _permit = sem.acquire().await;
            probe().await
        };
        let ok = matches!(result.event, Some(state::Event::Success));
        if let Ok(mut p) = state.last_probe.lock() {
            *p = Some(ProbeRecord { at: SystemTime::now(), ok, detail: result.detail.clone() });
        }
        if let Some(ev) = result.event
            && let Some((from, to)) = state.health.report(ev, thresholds)
        {
            tracing::warn!(
                upstream = &*upstream,
                node = %state.addr,
                from = from.as_str(),
                to = to.as_str(),
                reason = %result.detail,
                "node health changed (active)"
            );
        }
        let base = if state.health.routable() { check.healthy_interval } else { check.unhealthy_interval };
        // +-10% so probes of many nodes do not line up.
        let spread = base / 5;
        tokio::time::sleep(base - spread / 2 + jitter(spread)).await;
    }
}

/// The Host a probe sends for `node`: `checks.active.host`, else `upstream_host` when
/// `pass_host: rewrite`, else the node's own host.
pub(crate) fn probe_host(node: &Node, check: &ActiveCheck, settings: &UpstreamSettings) -> String {
    if let Some(h) = &check.host {
        return h.clone();
    }
    if let PassHost::Rewrite(v) = &settings.pass_host
        && let Ok(s) = v.to_str()
    {
        return s.to_string();
    }
    let port = check.port.unwrap_or(node.port);
    let default = match settings.scheme {
        Scheme::Https | Scheme::Grpcs => 443,
        _ => 80,
    };
    let host = if node.host.contains(':') { format!("[{}]", node.host) } else { node.host.to_string() };
    if port == default { host } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::config::resources::ProbeType;
    use probe::ProbeResult;
    use state::{Event, Status};

    fn check() -> ActiveCheck {
        ActiveCheck {
            kind: ProbeType::Tcp,
            timeout: Duration::from_secs(1),
            concurrency: 1,
            host: None,
            port: None,
            http_method: http::Method::GET,
            http_path: "/".into(),
            http_req_body: String::new(),
            https_verify_certificate: true,
            req_headers: vec![],
            grpc_service: String::new(),
            healthy_interval: Duration::from_secs(10),
            healthy_statuses: vec![200],
            healthy_successes: 3,
            unhealthy_interval: Duration::from_secs(2),
            unhealthy_statuses: vec![500],
            http_failures: 2,
            tcp_failures: 2,
            timeouts: 2,
        }
    }

    /// Under paused time: probe spacing follows the node's state, and the thresholds flip it.
    #[tokio::test(start_paused = true)]
    async fn intervals_follow_the_state_and_thresholds_flip_it() {
        let state = Arc::new(NodeState::new("127.0.0.1:1".parse().unwrap()));
        let up = Arc::new(AtomicBool::new(false));
        let times = Arc::new(Mutex::new(Vec::new()));
        let start = tokio::time::Instant::now();
        let (u, t) = (up.clone(), times.clone());
        let probe = move || {
            let (u, t) = (u.clone(), t.clone());
            async move {
                t.lock().unwrap().push(start.elapsed());
                let event = if u.load(Ordering::Relaxed) { Event::Success } else { Event::TcpFailure };
                ProbeResult { event: Some(event), detail: String::new() }
            }
        };
        let task = tokio::spawn(probe_loop(
            state.clone(),
            Arc::new(check()),
            probe,
            Arc::new(Semaphore::new(1)),
            Arc::from("u"),
        ));

        let until = |n: usize| {
            let t = times.clone();
            async move {
                while t.lock().unwrap().len() < n {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        // Two refused probes, the healthy interval apart, make the node unhealthy.
        until(1).await;
        assert_eq!(state.health.status(), Status::MostlyHealthy);
        until(2).await;
        assert_eq!(state.health.status(), Status::Unhealthy);
        // From now on it answers; probes come at the unhealthy interval; three successes needed.
        up.store(true, Ordering::Relaxed);
        until(4).await;
        assert_eq!(state.health.status(), Status::MostlyUnhealthy, "two successes are not enough");
        until(5).await;
        assert_eq!(state.health.status(), Status::Healthy);
        task.abort();

        let t = times.lock().unwrap().clone();
        assert!(t[0] <= Duration::from_secs(1), "first probe within a second: {t:?}");
        let gaps: Vec<f64> = t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        assert!((9.0..=11.0).contains(&gaps[0]), "healthy spacing ~10 s: {gaps:?}");
        for g in &gaps[1..4] {
            assert!((1.8..=2.2).contains(g), "unhealthy spacing ~2 s: {gaps:?}");
        }
    }
}
