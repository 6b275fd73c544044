//! Consul (`discovery.consul`, APISIX's `apisix/discovery/consul`).
//!
//! Each watched service is followed with a blocking query on the health endpoint,
//! `GET /v1/health/service/<name>?passing=true&index=<X-Consul-Index>&wait=<wait>s`, so a change
//! in Consul reaches traffic as soon as Consul answers, not at the next poll
//! (<https://developer.hashicorp.com/consul/api-docs/features/blocking>). With
//! `keepalive: false` the endpoint is polled every `fetch_interval` instead.
//!
//! * only instances whose checks pass are returned (`passing`); node address is
//!   `Service.Address`, or `Node.Address` when empty (a host name is resolved to its first
//!   IPv4 address); port `Service.Port`; weight from config;
//! * past `BLOCKING_MAX` watched services, the others do not get a blocking query each: Consul
//!   allows a client 200 connections at once by default (`limits.http_max_conns_per_client`,
//!   answering 429 past it), and this client makes one connection per request. Those services
//!   are fetched once, then again whenever one of two catalog-wide blocking queries says
//!   something changed (`/v1/catalog/services` for registrations, `/v1/health/state/any` for
//!   checks), as APISIX's Consul discovery does for every service; at most `FETCHES_AT_ONCE`
//!   such fetches run at a time, and a service is fetched at most once per `SHARED_GAP`. Any
//!   change in the datacenter refetches all of them (the catalog-wide answers are not read);
//!   the two catalog-wide queries run for the life of the process once started. A service
//!   that shares them takes a blocking query of its own after a fetch that finds one free (a
//!   reload dropped services that had one);
//! * servers fail over in order; the ACL token goes in `X-Consul-Token`;
//! * `skip_services` never resolve; `default_service` answers for services with no instance.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use http::Method;
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, watch};

use crate::http::{HttpClient, Url};
use crate::nacos::urlencode;
use crate::{
    Backoff, BoxFuture, Discovery, DiscoveryError, NodeSet, NodeSpec, Query, Resolution, SharedStatus,
    publish, record_error,
};

/// `discovery.consul`.
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    pub servers: Vec<Url>,
    pub token: Option<String>,
    /// Blocking queries (true) or polling every `fetch_interval`.
    pub keepalive: bool,
    pub fetch_interval: Duration,
    pub weight: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// How long Consul may hold a blocking query.
    pub wait: Duration,
    pub skip_services: Vec<String>,
    pub default_service: Option<NodeSpec>,
}

/// Services followed with a blocking query of their own; the ones past it share the
/// catalog-wide change signal (module doc). Well under Consul's default of 200 connections per
/// client, which other clients on the same address may share.
pub const BLOCKING_MAX: usize = 64;
/// Fetches of services that share the change signal, at once.
const FETCHES_AT_ONCE: usize = 8;
/// Least time between two fetches of a service that shares the change signal: in a large
/// datacenter some check changes all the time, and every change refetches every such service.
const SHARED_GAP: Duration = Duration::from_secs(1);

/// The Consul backend.
pub struct ConsulDiscovery {
    opts: ConsulOptions,
    http: HttpClient,
    /// Services that have a blocking query of their own now.
    blocking: AtomicUsize,
    /// How many changes the catalog-wide queries have seen; started with the first service
    /// that shares it.
    changes: OnceLock<watch::Sender<u64>>,
    fetches: Semaphore,
}

impl ConsulDiscovery {
    pub fn new(opts: ConsulOptions) -> Result<Self, DiscoveryError> {
        let http = HttpClient::new(opts.connect_timeout, opts.read_timeout)?;
        Ok(ConsulDiscovery {
            opts,
            http,
            blocking: AtomicUsize::new(0),
            changes: OnceLock::new(),
            fetches: Semaphore::new(FETCHES_AT_ONCE),
        })
    }

    fn nodes(&self, entries: &[Value]) -> NodeSet {
        let mut nodes: Vec<NodeSpec> = entries
            .iter()
            .filter_map(|e| {
                let svc = &e["Service"];
                let addr =
                    svc["Address"].as_str().filter(|a| !a.is_empty()).or(e["Node"]["Address"].as_str())?;
                let port = svc["Port"].as_u64().filter(|p| *p > 0 && *p <= 65535).unwrap_or(80) as u16;
                Some(NodeSpec {
                    host: addr.to_string(),
                    port: Some(port),
                    weight: self.opts.weight,
                    priority: 0,
                    metadata: svc["Meta"].as_object().cloned().unwrap_or_default(),
                })
            })
            .collect();
        nodes.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        nodes.dedup_by(|a, b| a.host == b.host && a.port == b.port);
        NodeSet { nodes }
    }

    /// One (possibly blocking) query; returns the nodes and Consul's index.
    async fn query(
        &self,
        service: &str,
        index: Option<u64>,
        server: usize,
    ) -> Result<(NodeSet, u64), DiscoveryError> {
        let path = format!("/v1/health/service/{}?passing=true", urlencode(service));
        let (body, idx) = self.get(path, index, server).await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| DiscoveryError::Invalid(e.to_string()))?;
        let entries = v.as_array().ok_or_else(|| DiscoveryError::Invalid("expected a list".into()))?;
        Ok((crate::resolve_names(self.nodes(entries), "consul").await, idx))
    }

    /// `GET path`, blocking while Consul's index is `index`; returns the body and the new index.
    async fn get(
        &self,
        mut path: String,
        index: Option<u64>,
        server: usize,
    ) -> Result<(bytes::Bytes, u64), DiscoveryError> {
        let url = &self.opts.servers[server % self.opts.servers.len()];
        let mut read = self.opts.read_timeout;
        if let Some(i) = index {
            let sep = if path.contains('?') { '&' } else { '?' };
            path.push_str(&format!("{sep}index={i}&wait={}s", self.opts.wait.as_secs().max(1)));
            // Consul adds up to wait/16 of jitter; leave room for it and the answer.
            read = self.opts.wait + self.opts.wait / 16 + self.opts.read_timeout;
        }
        let mut headers = vec![("accept", "application/json".to_string())];
        if let Some(t) = &self.opts.token {
            headers.push(("x-consul-token", t.clone()));
        }
        let resp =
            self.http.request(url, Method::GET, &path, &headers, bytes::Bytes::new(), Some(read)).await?;
        if resp.status != 200 {
            return Err(DiscoveryError::Unavailable(format!(
                "{}: HTTP {}: {}",
                url.authority(),
                resp.status,
                String::from_utf8_lossy(&resp.body).chars().take(200).collect::<String>()
            )));
        }
        let idx = resp
            .headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| DiscoveryError::Invalid("missing X-Consul-Index".into()))?;
        Ok((resp.body, idx))
    }

    /// The catalog-wide change signal, started on first use: one task per blocking query
    /// (`/v1/catalog/services`, `/v1/health/state/any`) that counts a change whenever the
    /// query's index moves. The tasks end with the backend.
    fn changes(self: &Arc<Self>) -> watch::Receiver<u64> {
        let mut started = false;
        let tx = self.changes.get_or_init(|| {
            started = true;
            watch::channel(0).0
        });
        let rx = tx.subscribe();
        if started {
            for path in ["/v1/catalog/services", "/v1/health/state/any"] {
                tokio::spawn(watch_index(Arc::downgrade(self), path));
            }
        }
        rx
    }

    /// Follows `query` with a blocking query of its own.
    async fn follow_blocking(
        &self,
        query: &Query,
        tx: &watch::Sender<Option<NodeSet>>,
        status: &SharedStatus,
    ) {
        let mut index: Option<u64> = None;
        let mut server = 0usize;
        // APISIX's retry delays: 1 s, then x4 up to 256 s.
        let mut backoff = Backoff::new(Duration::from_secs(16));
        loop {
            let result = tokio::select! {
                r = self.query(&query.service_name, index, server) => r,
                _ = tx.closed() => return,
            };
            match result {
                Ok((set, idx)) => {
                    backoff.reset();
                    publish(tx, status, self.with_default(set));
                    index = Some(next_index(index, idx));
                }
                Err(e) => {
                    record_error(status, "consul", query, &e);
                    server += 1; // fail over to the next server
                    index = None;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        }
    }

    /// Follows `query` by fetching it whenever the catalog-wide signal moves. Returns when the
    /// watch ends (false) or, after a fetch, when a blocking query is free (true: a reload
    /// dropped services that had one).
    async fn follow_shared(
        self: &Arc<Self>,
        query: &Query,
        tx: &watch::Sender<Option<NodeSet>>,
        status: &SharedStatus,
    ) -> bool {
        let mut changes = self.changes();
        let mut server = 0usize;
        let mut backoff = Backoff::new(Duration::from_secs(16));
        loop {
            // A change while the fetch runs is seen by `changed` below.
            changes.borrow_and_update();
            let started = tokio::time::Instant::now();
            let fetch = async {
                let _permit = self.fetches.acquire().await;
                self.query(&query.service_name, None, server).await
            };
            let result = tokio::select! {
                r = fetch => r,
                _ = tx.closed() => return false,
            };
            match result {
                Ok((set, _)) => {
                    backoff.reset();
                    publish(tx, status, self.with_default(set));
                    if self.blocking.load(Ordering::Relaxed) < BLOCKING_MAX {
                        return true;
                    }
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return false },
                        _ = tx.closed() => return false,
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(started + SHARED_GAP) => {}
                        _ = tx.closed() => return false,
                    }
                }
                Err(e) => {
                    record_error(status, "consul", query, &e);
                    server += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = tx.closed() => return false,
                    }
                }
            }
        }
    }

    fn with_default(&self, set: NodeSet) -> NodeSet {
        match (&self.opts.default_service, set.nodes.is_empty()) {
            (Some(d), true) => NodeSet { nodes: vec![d.clone()] },
            _ => set,
        }
    }
}

impl Discovery for ConsulDiscovery {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn resolve<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Resolution, DiscoveryError>> {
        Box::pin(async move {
            if self.opts.skip_services.iter().any(|s| s == &query.service_name) {
                return match &self.opts.default_service {
                    Some(d) => Ok(Resolution { nodes: NodeSet { nodes: vec![d.clone()] }, valid_for: None }),
                    None => Err(DiscoveryError::NotFound(query.service_name.clone())),
                };
            }
            let mut last = DiscoveryError::Unavailable("no Consul server configured".into());
            for i in 0..self.opts.servers.len() {
                match self.query(&query.service_name, None, i).await {
                    Ok((set, _)) => return Ok(Resolution { nodes: self.with_default(set), valid_for: None }),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }

    fn poll_interval(&self) -> Duration {
        self.opts.fetch_interval
    }

    fn watch(
        self: Arc<Self>,
        query: Query,
        tx: watch::Sender<Option<NodeSet>>,
        status: SharedStatus,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let skipped = self.opts.skip_services.iter().any(|s| s == &query.service_name);
            if !self.opts.keepalive || skipped {
                let me: Arc<dyn Discovery> = self.clone();
                return crate::nacos::poll_forever(me, query, tx, status).await;
            }
            loop {
                // The slot is given back when this future ends or is dropped (an aborted watch).
                let (slot, before) = Slot::take(&self.blocking);
                if before < BLOCKING_MAX {
                    return self.follow_blocking(&query, &tx, &status).await;
                }
                drop(slot);
                if !self.follow_shared(&query, &tx, &status).await {
                    return;
                }
            }
        })
    }
}

/// The index the next blocking query waits on, after one that answered `new`: reset to 0 when
/// the index went backwards, and never 0 otherwise (Consul's rules for blocking queries).
fn next_index(old: Option<u64>, new: u64) -> u64 {
    match old {
        Some(old) if new < old => 0,
        _ => new.max(1),
    }
}

/// One of the `BLOCKING_MAX` blocking queries, taken (counted) while this lives.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    /// Counts one more, and says how many there were before.
    fn take(count: &'a AtomicUsize) -> (Slot<'a>, usize) {
        let before = count.fetch_add(1, Ordering::Relaxed);
        (Slot(count), before)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a change in `me.changes` whenever the index of the blocking query `path` moves, until
/// the backend is dropped. Errors fail over to the next server after a delay.
async fn watch_index(me: Weak<ConsulDiscovery>, path: &'static str) {
    let mut index: Option<u64> = None;
    let mut server = 0usize;
    let mut backoff = Backoff::new(Duration::from_secs(16));
    loop {
        let Some(d) = me.upgrade() else { return };
        let started = tokio::time::Instant::now();
        match d.get(path.to_string(), index, server).await {
            Ok((_, idx)) => {
                backoff.reset();
                // The first answer counts too: a service fetched before it may predate it.
                if index != Some(idx)
                    && let Some(tx) = d.changes.get()
                {
                    tx.send_modify(|n| *n += 1);
                }
                index = Some(next_index(index, idx));
                // At most one round a `SHARED_GAP`, as Consul asks of blocking queries: in a
                // large datacenter some check changes all the time, and each answer of
                // `/v1/health/state/any` lists every check (megabytes). The services that
                // share this signal are fetched at most that often anyway.
                drop(d);
                tokio::time::sleep_until(started + SHARED_GAP).await;
            }
            Err(e) => {
                tracing::warn!(path, error = %e, "consul: catalog-wide watch failed");
                server += 1;
                // What changed while the query failed is not known: the next answer counts as a
                // change (its index is compared with none). Until then the services are asked
                // again now, so those Consul cannot answer report it (and retry on their own).
                index = None;
                if let Some(tx) = d.changes.get() {
                    tx.send_modify(|n| *n += 1);
                }
                drop(d);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Builds the `default_service` node.
pub fn default_service(host: &str, port: u16, metadata: Map<String, Value>) -> NodeSpec {
    let weight =
        metadata.get("weight").and_then(Value::as_u64).map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX));
    NodeSpec { host: host.to_string(), port: Some(port), weight, priority: 0, metadata }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fuzz;

    fn consul() -> ConsulDiscovery {
        ConsulDiscovery::new(ConsulOptions {
            servers: vec![],
            token: None,
            keepalive: true,
            fetch_interval: Duration::from_secs(30),
            weight: 7,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            wait: Duration::from_secs(60),
            skip_services: vec![],
            default_service: None,
        })
        .unwrap()
    }

    /// One entry of `GET /v1/health/service/<name>?passing=true`, shaped as the Consul API docs
    /// show it.
    fn entry(node_address: &str, service_address: &str, port: u64) -> Value {
        json!({
            "Node": {
                "ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": "foobar", "Address": node_address,
                "Datacenter": "dc1", "TaggedAddresses": {"lan": node_address, "wan": "198.18.0.1"},
                "Meta": {"instance_type": "t2.medium"}, "CreateIndex": 5, "ModifyIndex": 5
            },
            "Service": {
                "ID": "web-1", "Service": "web", "Tags": ["primary"], "Address": service_address,
                "TaggedAddresses": {"lan": {"address": service_address, "port": port}},
                "Meta": {"version": "1.0"}, "Port": port, "Weights": {"Passing": 10, "Warning": 1},
                "EnableTagOverride": false, "Namespace": "default", "CreateIndex": 7, "ModifyIndex": 7
            },
            "Checks": [
                {"Node": "foobar", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                 "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": ""},
                {"Node": "foobar", "CheckID": "service:web-1", "Name": "Service 'web' check",
                 "Status": "passing", "ServiceID": "web-1", "ServiceName": "web", "ServiceTags": ["primary"]}
            ]
        })
    }

    /// Valid entries and the node each must give.
    fn good() -> Vec<(Value, (&'static str, u16))> {
        vec![
            // An empty `Service.Address` is the node's address.
            (entry("10.1.10.12", "", 8000), ("10.1.10.12", 8000)),
            (entry("10.1.10.13", "10.1.20.5", 8001), ("10.1.20.5", 8001)),
            (entry("10.1.10.14", "fd00::6", 65535), ("fd00::6", 65535)),
        ]
    }

    fn pairs(set: &NodeSet) -> Vec<(&str, Option<u16>)> {
        set.nodes.iter().map(|n| (n.host.as_str(), n.port)).collect()
    }

    /// Whatever Consul answers, parsing never panics; every node has a real port, the
    /// configured weight and an address from the answer, in order and once; and every entry
    /// the mutations left as it was still gives its node.
    #[test]
    fn any_health_answer_parses_and_intact_entries_stay() {
        let d = consul();
        let good = good();
        let answer = Value::Array(good.iter().map(|(e, _)| e.clone()).collect());
        let set = d.nodes(answer.as_array().unwrap());
        assert_eq!(
            pairs(&set),
            [("10.1.10.12", Some(8000)), ("10.1.20.5", Some(8001)), ("fd00::6", Some(65535))]
        );
        assert!(set.nodes.iter().all(|n| n.weight == 7 && n.metadata["version"] == "1.0"));

        let payloads = [answer, Value::Array(vec![good[1].0.clone()])];
        fuzz::each_seed(2_000, &payloads, |_, input| {
            // As `query`: an answer that does not parse, or is not a list, is an error.
            let Some(Value::Array(entries)) = input.value() else { return };
            let set = d.nodes(&entries);
            let addresses = fuzz::strings_under(&Value::Array(entries.clone()), "Address");
            for n in &set.nodes {
                assert!(matches!(n.port, Some(p) if p > 0), "{n:?}");
                assert_eq!(n.weight, 7);
                assert!(addresses.contains(&n.host), "{n:?} is no address of the answer");
            }
            assert!(set.nodes.windows(2).all(|w| (&w[0].host, w[0].port) < (&w[1].host, w[1].port)));
            for (e, (host, port)) in &good {
                if entries.contains(e) {
                    assert!(pairs(&set).contains(&(host, Some(*port))), "{host}:{port} lost");
                }
            }
        });
    }
}
