//! Nacos (`discovery.nacos`, APISIX's `apisix/discovery/nacos`).
//!
//! Changes are pushed: each watched service is subscribed over the Nacos 2.x gRPC protocol (the
//! `nacos-sdk` client), so a registration change reaches traffic in about a second. Against a
//! Nacos 1.x server (no gRPC port) a watch falls back to polling the v1 open API
//! (`GET <prefix>ns/instance/list`) every `fetch_interval`, as APISIX does.
//!
//! * `service_name` is the Nacos service; `discovery_args.namespace_id` / `group_name` default
//!   to `public` / `DEFAULT_GROUP`;
//! * only healthy and enabled instances become nodes; Nacos' float weights are scaled by 100
//!   (1.0 -> 100, 0.5 -> 50) so their ratios survive; grpc/grpcs upstreams use
//!   `metadata.gRPC_port` when present;
//! * `host` entries may carry `user:pass@` (login for an `accessToken`); several hosts fail over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingService, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use crate::http::{HttpClient, Url};
use crate::{
    Backoff, BoxFuture, Discovery, DiscoveryError, NodeSet, NodeSpec, Query, Resolution, SharedStatus,
    publish, record_error,
};

/// One configured Nacos server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NacosHost {
    pub url: Url,
    pub user: Option<(String, String)>,
}

/// `discovery.nacos`.
#[derive(Debug, Clone)]
pub struct NacosOptions {
    pub hosts: Vec<NacosHost>,
    /// Path prefix of the v1 open API (default `/nacos/v1/`).
    pub prefix: String,
    pub fetch_interval: Duration,
    /// Weight for instances without one.
    pub weight: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Where the SDK keeps its naming cache.
    pub cache_dir: std::path::PathBuf,
}

impl NacosHost {
    /// Parses `http(s)://[user:pass@]host[:port]`.
    pub fn parse(s: &str) -> Result<NacosHost, String> {
        let (scheme, rest) =
            s.split_once("://").ok_or_else(|| format!("{s:?}: expected http(s)://host[:port]"))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("{s:?}: scheme must be http or https"));
        }
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((cred, hp)) => {
                let (u, p) =
                    cred.split_once(':').ok_or_else(|| format!("{s:?}: credentials must be user:pass"))?;
                (Some((u.to_string(), p.to_string())), hp)
            }
            None => (None, rest),
        };
        if hostport.is_empty() || hostport.contains('/') {
            return Err(format!("{s:?}: expected http(s)://[user:pass@]host[:port] without a path"));
        }
        let url = Url::parse(&format!("{scheme}://{hostport}")).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(NacosHost { url, user })
    }
}

/// The Nacos backend.
pub struct NacosDiscovery {
    opts: NacosOptions,
    http: HttpClient,
    /// One SDK client per namespace, created on first use.
    clients: tokio::sync::Mutex<HashMap<String, ClientSlot>>,
    tokens: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// One SDK subscription per (namespace, group, service), shared by its watches (entries
    /// stay: one per service ever watched).
    subs: Mutex<HashMap<SubKey, Arc<ServiceSub>>>,
}

/// (namespace, group, service).
type SubKey = (String, String, String);

/// The SDK subscription of one service, shared by every watch of it. The SDK's unsubscribe
/// ends a service's subscription for all its listeners (and removes only the listener it is
/// given), so each service has one listener, which hands every push to each watch, and is
/// unsubscribed when its last watch ends.
struct ServiceSub {
    fan: Arc<FanOut>,
    /// `fan`, as the SDK holds it (subscribe and unsubscribe must name the same listener).
    listener: Arc<dyn NamingEventListener>,
    /// Whether the SDK holds the subscription. Held across subscribing and unsubscribing, so
    /// the two never cross (a reload that drops a service and adds it back at once).
    subscribed: tokio::sync::Mutex<bool>,
}

impl ServiceSub {
    fn new() -> ServiceSub {
        let fan = Arc::new(FanOut::default());
        let listener: Arc<dyn NamingEventListener> = fan.clone();
        ServiceSub { fan, listener, subscribed: tokio::sync::Mutex::new(false) }
    }

    /// Subscribes, unless the subscription is already there.
    async fn ensure(&self, client: &NamingService, key: &SubKey) -> Result<(), String> {
        let mut subscribed = self.subscribed.lock().await;
        if !*subscribed {
            let (_, group, service) = key.clone();
            client
                .subscribe(service, Some(group), vec![], self.listener.clone())
                .await
                .map_err(|e| e.to_string())?;
            *subscribed = true;
        }
        Ok(())
    }
}

/// The listener of a service: every push goes to each watch's channel.
#[derive(Default)]
struct FanOut {
    watches: Mutex<Vec<(u64, mpsc::UnboundedSender<Arc<NamingChangeEvent>>)>>,
}

impl NamingEventListener for FanOut {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        let watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        for (_, tx) in watches.iter() {
            let _ = tx.send(event.clone());
        }
    }
}

/// A watch's place among its service's listeners. When the last watch of the service leaves,
/// also when it is aborted (a reload that dropped the service) rather than returning, the
/// subscription is ended: otherwise the SDK would keep it, and subscribe it again after every
/// reconnection, for the life of the process.
struct Member {
    sub: Arc<ServiceSub>,
    id: u64,
    key: SubKey,
    client: NamingService,
}

impl Member {
    fn join(
        sub: &Arc<ServiceSub>,
        tx: mpsc::UnboundedSender<Arc<NamingChangeEvent>>,
        key: SubKey,
        client: NamingService,
    ) -> Member {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sub.fan.watches.lock().unwrap_or_else(|e| e.into_inner()).push((id, tx));
        Member { sub: sub.clone(), id, key, client }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let last = {
            let mut watches = self.sub.fan.watches.lock().unwrap_or_else(|e| e.into_inner());
            watches.retain(|(id, _)| *id != self.id);
            watches.is_empty()
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if !last {
            return;
        }
        let (sub, key, client) = (self.sub.clone(), self.key.clone(), self.client.clone());
        rt.spawn(async move {
            let mut subscribed = sub.subscribed.lock().await;
            // Not if a watch of the service came back meanwhile.
            if !*subscribed || !sub.fan.watches.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                return;
            }
            let (_, group, service) = key;
            match client.unsubscribe(service.clone(), Some(group), vec![], sub.listener.clone()).await {
                Ok(()) => *subscribed = false,
                Err(e) => tracing::warn!(discovery = "nacos", %service, error = %e, "unsubscribing failed"),
            }
        });
    }
}

/// The gRPC client of a namespace, or when to try building it again.
enum ClientSlot {
    Ready(NamingService),
    /// No gRPC API answered (a Nacos 1.x server, or a server that was down): poll the v1 API and
    /// try again at `retry_at`, waiting twice as long after each failure (5 s up to 5 min).
    Failed {
        retry_at: std::time::Instant,
        wait: Duration,
    },
}

const GRPC_RETRY_FIRST: Duration = Duration::from_secs(5);
const GRPC_RETRY_MAX: Duration = Duration::from_secs(300);

fn weight_of(w: f64, default: u32) -> u32 {
    if !w.is_finite() || w < 0.0 {
        return default;
    }
    (w * 100.0).round().min(u32::MAX as f64) as u32
}

impl NacosDiscovery {
    pub fn new(opts: NacosOptions) -> Result<Self, DiscoveryError> {
        let http = HttpClient::new(opts.connect_timeout, opts.read_timeout)?;
        Ok(NacosDiscovery {
            opts,
            http,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
        })
    }

    fn group(q: &Query) -> String {
        q.arg("group_name").filter(|g| !g.is_empty()).unwrap_or("DEFAULT_GROUP").to_string()
    }

    fn namespace(q: &Query) -> String {
        q.arg("namespace_id").filter(|n| !n.is_empty()).unwrap_or("public").to_string()
    }

    fn node(
        &self,
        ip: &str,
        port: i64,
        weight: f64,
        metadata: &Map<String, Value>,
        scheme: &str,
    ) -> Option<NodeSpec> {
        let mut port = port;
        if (scheme == "grpc" || scheme == "grpcs")
            && let Some(v) = metadata.get("gRPC_port")
        {
            // A `gRPC_port` that is no port leaves the instance out, as one out of range does:
            // its HTTP port would not answer gRPC.
            port = v.as_str().and_then(|s| s.parse().ok()).or(v.as_i64())?;
        }
        let port = u16::try_from(port).ok().filter(|p| *p > 0)?;
        Some(NodeSpec {
            host: ip.to_string(),
            port: Some(port),
            weight: weight_of(weight, self.opts.weight),
            priority: 0,
            metadata: metadata.clone(),
        })
    }

    fn nodes_of(&self, list: &[ServiceInstance], scheme: &str) -> NodeSet {
        let mut nodes: Vec<NodeSpec> = list
            .iter()
            .filter(|i| i.healthy && i.enabled)
            .filter_map(|i| {
                let md: Map<String, Value> =
                    i.metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
                self.node(&i.ip, i.port as i64, i.weight, &md, scheme)
            })
            .collect();
        nodes.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        NodeSet { nodes }
    }

    /// The SDK client for `namespace`, or, when no gRPC API answered (Nacos 1.x, or a server
    /// that is not up yet), the time until the next attempt.
    async fn client(&self, namespace: &str) -> Result<NamingService, Duration> {
        let mut clients = self.clients.lock().await;
        let mut wait = GRPC_RETRY_FIRST;
        match clients.get(namespace) {
            Some(ClientSlot::Ready(c)) => return Ok(c.clone()),
            Some(ClientSlot::Failed { retry_at, wait: w }) => {
                let now = std::time::Instant::now();
                if now < *retry_at {
                    return Err(*retry_at - now);
                }
                wait = (*w * 2).min(GRPC_RETRY_MAX);
            }
            None => {}
        }
        // Each server's gRPC port is its HTTP port + 1000 (the SDK's and Nacos' default).
        let servers: Vec<String> = self.opts.hosts.iter().map(|h| h.url.authority()).collect();
        let props = ClientProps::new()
            .server_addr(servers.join(","))
            .namespace(if namespace == "public" { "" } else { namespace })
            .app_name("strait")
            .naming_push_empty_protection(false)
            .cache_dir(self.opts.cache_dir.join(if namespace.is_empty() { "public" } else { namespace }))
            .env_first(false);
        let mut builder =
            NamingServiceBuilder::new(match self.opts.hosts.iter().find_map(|h| h.user.clone()) {
                Some((u, p)) => props.auth_username(u).auth_password(p),
                None => props,
            });
        if self.opts.hosts.iter().any(|h| h.user.is_some()) {
            builder = builder.enable_auth_plugin_http();
        }
        let timeout = self.opts.connect_timeout + self.opts.read_timeout;
        let error = match tokio::time::timeout(timeout * 2, builder.build()).await {
            Ok(Ok(c)) => {
                clients.insert(namespace.to_string(), ClientSlot::Ready(c.clone()));
                return Ok(c);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connection timed out".to_string(),
        };
        tracing::warn!(
            discovery = "nacos",
            %error,
            retry_in = ?wait,
            "no Nacos 2.x gRPC API; polling the v1 open API meanwhile"
        );
        clients.insert(
            namespace.to_string(),
            ClientSlot::Failed { retry_at: std::time::Instant::now() + wait, wait },
        );
        Err(wait)
    }

    /// `accessToken` for a host with credentials (cached for a while).
    async fn token(&self, host: &NacosHost) -> Result<Option<String>, DiscoveryError> {
        let Some((user, pass)) = &host.user else { return Ok(None) };
        let key = host.url.authority();
        if let Some((t, at)) = self.tokens.lock().ok().and_then(|m| m.get(&key).cloned())
            && at.elapsed() < Duration::from_secs(300)
        {
            return Ok(Some(t));
        }
        let path = format!("{}auth/login", self.opts.prefix);
        let body = format!("username={}&password={}", urlencode(user), urlencode(pass));
        let resp = self.http.post_form(&host.url, &path, body).await?;
        let v: Value =
            serde_json::from_slice(&resp.body).map_err(|e| DiscoveryError::Invalid(format!("login: {e}")))?;
        let t = v["accessToken"]
            .as_str()
            .ok_or_else(|| DiscoveryError::Invalid("login: no accessToken".into()))?;
        if let Ok(mut m) = self.tokens.lock() {
            m.insert(key, (t.to_string(), std::time::Instant::now()));
        }
        Ok(Some(t.to_string()))
    }

    /// One v1 open API query, failing over between hosts.
    async fn poll_v1(&self, q: &Query) -> Result<NodeSet, DiscoveryError> {
        let (ns, group) = (Self::namespace(q), Self::group(q));
        let mut last = DiscoveryError::Unavailable("no Nacos host configured".into());
        let start = (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
            as usize)
            % self.opts.hosts.len().max(1);
        for i in 0..self.opts.hosts.len() {
            let host = &self.opts.hosts[(start + i) % self.opts.hosts.len()];
            let mut path = format!(
                "{}ns/instance/list?healthyOnly=true&serviceName={}&groupName={}&namespaceId={}",
                self.opts.prefix,
                urlencode(&q.service_name),
                urlencode(&group),
                urlencode(&ns)
            );
            match self.token(host).await {
                Ok(Some(t)) => path.push_str(&format!("&accessToken={}", urlencode(&t))),
                Ok(None) => {}
                Err(e) => {
                    last = e;
                    continue;
                }
            }
            if let (Some(ak), Some(sk)) = (&self.opts.access_key, &self.opts.secret_key) {
                let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                let data = format!("{ms}@@{group}@@{}", q.service_name);
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, sk.as_bytes());
                let sig = base64(ring::hmac::sign(&key, data.as_bytes()).as_ref());
                path.push_str(&format!(
                    "&ak={}&data={}&signature={}",
                    urlencode(ak),
                    urlencode(&data),
                    urlencode(&sig)
                ));
            }
            match self.http.get(&host.url, &path).await {
                Ok(resp) if resp.status == 200 => {
                    let v: Value = serde_json::from_slice(&resp.body)
                        .map_err(|e| DiscoveryError::Invalid(format!("instance list: {e}")))?;
                    // An answer without a `hosts` list is no instance list (an empty service
                    // answers `"hosts": []`): a failed poll, which keeps the last nodes.
                    let Some(hosts) = v["hosts"].as_array() else {
                        return Err(DiscoveryError::Invalid("instance list without a hosts array".into()));
                    };
                    let mut nodes: Vec<NodeSpec> = hosts
                        .iter()
                        .filter(|h| {
                            h["healthy"].as_bool().unwrap_or(true) && h["enabled"].as_bool().unwrap_or(true)
                        })
                        .filter_map(|h| {
                            let md = h["metadata"].as_object().cloned().unwrap_or_default();
                            self.node(
                                h["ip"].as_str()?,
                                h["port"].as_i64()?,
                                // Not a number: the configured default weight, as for a
                                // pushed instance without one.
                                h["weight"].as_f64().unwrap_or(f64::NAN),
                                &md,
                                &q.scheme,
                            )
                        })
                        .collect();
                    nodes.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
                    return Ok(NodeSet { nodes });
                }
                Ok(resp) => {
                    last = DiscoveryError::Unavailable(format!(
                        "{}: HTTP {}: {}",
                        host.url.authority(),
                        resp.status,
                        String::from_utf8_lossy(&resp.body).chars().take(200).collect::<String>()
                    ))
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Standard base64 with padding.
pub fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encodes a query component.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Discovery for NacosDiscovery {
    fn kind(&self) -> &'static str {
        "nacos"
    }

    fn resolve<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Resolution, DiscoveryError>> {
        Box::pin(async move { Ok(Resolution { nodes: self.poll_v1(query).await?, valid_for: None }) })
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
            let ns = Self::namespace(&query);
            let group = Self::group(&query);
            // Without a gRPC API (Nacos 1.x, or a server that was down at start) poll like
            // APISIX, and switch to push as soon as the gRPC API answers.
            let client = loop {
                match self.client(&ns).await {
                    Ok(c) => break c,
                    Err(wait) => {
                        let me: Arc<dyn Discovery> = self.clone();
                        tokio::select! {
                            _ = poll_forever(me, query.clone(), tx.clone(), status.clone()) => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            };
            let key = (ns.clone(), group.clone(), query.service_name.clone());
            let sub = {
                let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
                subs.entry(key.clone()).or_insert_with(|| Arc::new(ServiceSub::new())).clone()
            };
            let (etx, mut erx) = mpsc::unbounded_channel();
            let _member = Member::join(&sub, etx, key.clone(), client.clone());
            let mut backoff = Backoff::new(Duration::from_secs(30));
            // Subscribe (retrying while the server is away), then follow pushes. A periodic
            // query reconciles and makes an outage visible in the sync status.
            loop {
                match sub.ensure(&client, &key).await {
                    Ok(()) => break,
                    Err(e) => {
                        record_error(&status, "nacos", &query, &DiscoveryError::Unavailable(e));
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                            _ = tx.closed() => return,
                        }
                    }
                }
            }
            // Pushes carry the changes; this check only reconciles and shows an outage, so it
            // runs at `fetch_interval` (APISIX's poll): each is a query to the server, and a
            // gateway may watch thousands of services.
            let check_every = self.opts.fetch_interval.max(Duration::from_secs(1));
            let mut tick = tokio::time::interval(check_every);
            loop {
                tokio::select! {
                    ev = erx.recv() => {
                        let Some(ev) = ev else { return };
                        if let Some(list) = &ev.instances {
                            publish(&tx, &status, self.nodes_of(list, &query.scheme));
                        }
                    }
                    _ = tick.tick() => {
                        let q = client.select_instances(query.service_name.clone(), Some(group.clone()), vec![], false, true);
                        match tokio::time::timeout(self.opts.read_timeout + self.opts.connect_timeout, q).await {
                            Ok(Ok(list)) => publish(&tx, &status, self.nodes_of(&list, &query.scheme)),
                            Ok(Err(e)) => record_error(&status, "nacos", &query, &DiscoveryError::Unavailable(e.to_string())),
                            Err(_) => record_error(&status, "nacos", &query, &DiscoveryError::Unavailable("query timed out".into())),
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        })
    }
}

/// The default polling watch, usable by backends that override `watch` but need to fall back.
pub async fn poll_forever(
    d: Arc<dyn Discovery>,
    query: Query,
    tx: watch::Sender<Option<NodeSet>>,
    status: SharedStatus,
) {
    let mut backoff = Backoff::new(Duration::from_secs(60));
    loop {
        let delay = match d.resolve(&query).await {
            Ok(res) => {
                backoff.reset();
                publish(&tx, &status, res.nodes);
                res.valid_for.unwrap_or_else(|| d.poll_interval())
            }
            Err(e) => {
                record_error(&status, d.kind(), &query, &e);
                backoff.next_delay().min(d.poll_interval().max(Duration::from_secs(1)))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay.max(Duration::from_millis(200))) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz;
    use serde_json::json;

    #[test]
    fn every_watch_of_a_service_gets_each_push() {
        let sub = ServiceSub::new();
        let (a, mut ra) = mpsc::unbounded_channel();
        let (b, mut rb) = mpsc::unbounded_channel();
        sub.fan.watches.lock().unwrap().extend([(1, a), (2, b)]);
        let ev = Arc::new(NamingChangeEvent {
            service_name: "web".into(),
            group_name: "DEFAULT_GROUP".into(),
            clusters: String::new(),
            instances: None,
        });
        sub.listener.event(ev);
        assert!(ra.try_recv().is_ok() && rb.try_recv().is_ok());
        sub.fan.watches.lock().unwrap().retain(|(id, _)| *id != 1);
        sub.listener.event(Arc::new(NamingChangeEvent {
            service_name: "web".into(),
            group_name: "DEFAULT_GROUP".into(),
            clusters: String::new(),
            instances: None,
        }));
        assert!(ra.try_recv().is_err() && rb.try_recv().is_ok(), "a watch that left gets no more");
    }

    #[test]
    fn hosts_parse_with_credentials() {
        let h = NacosHost::parse("http://nacos:secret@127.0.0.1:8848").unwrap();
        assert_eq!(h.user, Some(("nacos".into(), "secret".into())));
        assert_eq!(h.url.authority(), "127.0.0.1:8848");
        assert!(NacosHost::parse("ftp://x").is_err());
        assert!(NacosHost::parse("http://x:1/path").is_err());
    }

    #[test]
    fn weights_scale_and_base64_matches() {
        assert_eq!(weight_of(1.0, 100), 100);
        assert_eq!(weight_of(0.5, 100), 50);
        assert_eq!(weight_of(f64::NAN, 7), 7);
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }

    fn nacos(hosts: Vec<NacosHost>) -> NacosDiscovery {
        NacosDiscovery::new(NacosOptions {
            hosts,
            prefix: "/nacos/v1/".into(),
            fetch_interval: Duration::from_secs(30),
            weight: 7,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            access_key: None,
            secret_key: None,
            cache_dir: std::env::temp_dir().join("strait-nacos-tests"),
        })
        .unwrap()
    }

    /// A node as (host, port, weight).
    type Want = (&'static str, u16, u32);

    /// One instance as the SDK hands it over (a push, or `select_instances`).
    fn sdk_instance(
        ip: &str,
        port: i32,
        weight: f64,
        up: (bool, bool),
        metadata: &[(&str, &str)],
    ) -> ServiceInstance {
        ServiceInstance {
            instance_id: Some(format!("{ip}#{port}#DEFAULT#DEFAULT_GROUP@@web")),
            ip: ip.into(),
            port,
            weight,
            healthy: up.0,
            enabled: up.1,
            ephemeral: true,
            cluster_name: Some("DEFAULT".into()),
            service_name: Some("DEFAULT_GROUP@@web".into()),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// The instances of service `web` and the node each must give to an http and to a grpc
    /// upstream.
    fn sdk_instances() -> Vec<(ServiceInstance, Option<Want>, Option<Want>)> {
        let sc = ("preserved.register.source", "SPRING_CLOUD");
        vec![
            (
                sdk_instance("10.0.0.1", 8080, 1.0, (true, true), &[sc, ("gRPC_port", "9090")]),
                Some(("10.0.0.1", 8080, 100)),
                Some(("10.0.0.1", 9090, 100)),
            ),
            (
                sdk_instance("10.0.0.2", 8080, 0.5, (true, true), &[sc]),
                Some(("10.0.0.2", 8080, 50)),
                Some(("10.0.0.2", 8080, 50)),
            ),
            (sdk_instance("10.0.0.3", 8080, 1.0, (false, true), &[sc]), None, None),
            (sdk_instance("10.0.0.4", 8080, 1.0, (true, false), &[]), None, None),
            (
                sdk_instance("fd00::5", 8081, 3.25, (true, true), &[]),
                Some(("fd00::5", 8081, 325)),
                Some(("fd00::5", 8081, 325)),
            ),
            (
                sdk_instance("10.0.0.6", 65535, 100.0, (true, true), &[("gRPC_port", "50051")]),
                Some(("10.0.0.6", 65535, 10000)),
                Some(("10.0.0.6", 50051, 10000)),
            ),
        ]
    }

    /// An instance as JSON, as the SDK (de)serializes it; the metadata in key order, so that a
    /// seed always makes the same input (a `HashMap` iterates in a different order each run).
    fn sdk_json(i: &ServiceInstance) -> Value {
        let metadata: std::collections::BTreeMap<&String, &String> = i.metadata.iter().collect();
        json!({
            "instanceId": i.instance_id, "ip": i.ip, "port": i.port, "weight": i.weight,
            "healthy": i.healthy, "enabled": i.enabled, "ephemeral": i.ephemeral,
            "clusterName": i.cluster_name, "serviceName": i.service_name, "metadata": metadata
        })
    }

    fn triples(set: &NodeSet) -> Vec<(&str, u16, u32)> {
        set.nodes.iter().map(|n| (n.host.as_str(), n.port.unwrap_or(0), n.weight)).collect()
    }

    fn is_grpc(scheme: &str) -> bool {
        scheme == "grpc" || scheme == "grpcs"
    }

    /// The weight of a Nacos weight: scaled by 100, saturating; the configured one (7) for one
    /// that is not a finite, non-negative number.
    fn scaled(w: f64) -> u32 {
        if w.is_finite() && w >= 0.0 { (w * 100.0).round().min(u32::MAX as f64) as u32 } else { 7 }
    }

    /// Whether `n` is the node of an instance at `ip` with this `port` (or, for a grpc upstream,
    /// the gRPC port in `grpc_port`) and `weight` (`None`: not checked).
    ///
    /// A `grpc_port` given but not as a whole number is `Err`: such an instance gives no node
    /// for a grpc upstream, as one out of range does.
    fn gives(
        n: &NodeSpec,
        ip: &str,
        port: Option<i64>,
        grpc_port: Option<Result<i64, ()>>,
        weight: Option<f64>,
        scheme: &str,
    ) -> bool {
        let port = match (is_grpc(scheme), grpc_port) {
            (true, Some(Ok(p))) => Some(p),
            (true, Some(Err(()))) => return false,
            _ => port,
        };
        let port = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
        n.host == ip && port.is_some() && n.port == port && weight.is_none_or(|w| n.weight == scaled(w))
    }

    /// Whatever instances the SDK hands over (decoded from any JSON, or with any field set to
    /// an edge value), converting them never panics; every node is a healthy, enabled
    /// instance's, on a real port (its gRPC port for grpc upstreams), with its weight scaled;
    /// and every instance left as it was still gives its node.
    #[test]
    fn any_pushed_instance_list_converts_and_intact_instances_stay() {
        let d = nacos(vec![]);
        let good = sdk_instances();
        let list: Vec<ServiceInstance> = good.iter().map(|(i, _, _)| i.clone()).collect();
        let want = |grpc: bool| -> Vec<Want> {
            let mut w: Vec<Want> = good.iter().filter_map(|g| if grpc { g.2 } else { g.1 }).collect();
            w.sort();
            w
        };
        assert_eq!(triples(&d.nodes_of(&list, "http")), want(false));
        assert_eq!(triples(&d.nodes_of(&list, "grpc")), want(true));
        assert_eq!(d.nodes_of(&list, "http").nodes[0].metadata["gRPC_port"], "9090");

        let payloads =
            [Value::Array(list.iter().map(sdk_json).collect()), Value::Array(vec![sdk_json(&list[0])])];
        let decoded: Vec<ServiceInstance> = serde_json::from_value(payloads[0].clone()).unwrap();
        assert!(decoded.iter().zip(&list).all(|(a, b)| a.is_same_instance(b)));
        let make = |seed: u64| -> (Vec<ServiceInstance>, &'static str) {
            let mut rng = fuzz::Rng::new(seed);
            let scheme = *rng.pick(&["http", "https", "grpc", "grpcs"]);
            if seed.is_multiple_of(2) {
                // Mutated JSON, as the SDK would decode it: the entries that still decode.
                let list = match fuzz::input(seed, &payloads).value() {
                    Some(Value::Array(a)) => {
                        a.into_iter().filter_map(|x| serde_json::from_value(x).ok()).collect()
                    }
                    Some(x) => serde_json::from_value(x).ok().into_iter().collect(),
                    None => vec![],
                };
                return (list, scheme);
            }
            let mut list = list.clone();
            for _ in 0..1 + rng.below(4) {
                if list.is_empty() {
                    break;
                }
                let at = rng.below(list.len());
                let i = &mut list[at];
                match rng.below(10) {
                    0 | 1 => i.port = *rng.pick(&[i32::MIN, -1, 0, 1, 65535, 65536, i32::MAX]),
                    2 | 3 => {
                        i.weight = *rng.pick(&[
                            f64::NAN,
                            f64::INFINITY,
                            f64::NEG_INFINITY,
                            -1.0,
                            -0.0,
                            0.0,
                            f64::MIN_POSITIVE,
                            0.005,
                            42_949_672.95,
                            1e308,
                            f64::MAX,
                        ])
                    }
                    4 => {
                        i.metadata.insert("gRPC_port".into(), fuzz::odd_string(&mut rng));
                    }
                    5 => {
                        i.metadata.remove("gRPC_port");
                    }
                    6 => i.enabled = false,
                    7 => i.healthy = false,
                    8 => i.ip = fuzz::odd_string(&mut rng),
                    _ => {
                        let i = list.remove(at);
                        if rng.below(2) == 0 {
                            list.insert(rng.below(list.len() + 1), i.clone());
                            list.push(i);
                        }
                    }
                }
            }
            (list, scheme)
        };
        fuzz::each_case(2_000, make, |_, (list, scheme)| {
            let set = d.nodes_of(list, scheme);
            assert!(set.nodes.len() <= list.len());
            for n in &set.nodes {
                assert!(matches!(n.port, Some(p) if p > 0), "{n:?}");
                let from = list
                    .iter()
                    .filter(|i| i.healthy && i.enabled)
                    .filter(|i| {
                        n.metadata.len() == i.metadata.len()
                            && i.metadata
                                .iter()
                                .all(|(k, v)| n.metadata.get(k) == Some(&Value::String(v.clone())))
                    })
                    .find(|i| {
                        let grpc_port = i.metadata.get("gRPC_port").map(|p| p.parse().map_err(|_| ()));
                        gives(n, &i.ip, Some(i.port.into()), grpc_port, Some(i.weight), scheme)
                    });
                assert!(from.is_some(), "{n:?} is no healthy, enabled instance's");
            }
            assert!(set.nodes.windows(2).all(|w| (&w[0].host, w[0].port) <= (&w[1].host, w[1].port)));
            for (g, http, grpc) in &good {
                let want = if is_grpc(scheme) { grpc } else { http };
                if let Some(want) = want
                    && list.iter().any(|i| i.is_same_instance(g))
                {
                    assert!(triples(&set).contains(want), "{want:?} lost");
                }
            }
        });
    }

    /// A Nacos 1.x server that answers every request with what `body` holds at the time.
    async fn v1_server(body: Arc<Mutex<Vec<u8>>>) -> NacosHost {
        let (url, _) = fuzz::answering_server(move || {
            let body = body.lock().unwrap().clone();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json;charset=UTF-8\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            [head.as_bytes(), &body].concat()
        })
        .await;
        NacosHost::parse(&url).unwrap()
    }

    /// One entry of `hosts` in a v1 `ns/instance/list` answer, as Nacos 1.x serves it.
    fn v1_host(i: &ServiceInstance) -> Value {
        let mut h = sdk_json(i);
        let more = json!({"instanceHeartBeatInterval": 5000, "instanceHeartBeatTimeOut": 15000,
                          "ipDeleteTimeout": 30000, "instanceIdGenerator": "simple"});
        h.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
        h
    }

    fn v1_answer(hosts: Vec<Value>) -> Value {
        json!({
            "name": "DEFAULT_GROUP@@web", "groupName": "DEFAULT_GROUP", "clusters": "",
            "cacheMillis": 10000, "hosts": hosts, "lastRefTime": 1_733_580_000_000_u64,
            "checksum": "", "allIPs": false, "reachProtectionThreshold": false, "valid": true
        })
    }

    /// Whatever a Nacos 1.x server answers to `ns/instance/list`, polling never panics; an
    /// answer that is no JSON is an error; every node is an entry's that is not marked
    /// unhealthy or disabled, on a real port (its gRPC port for grpc upstreams), at an `ip` of
    /// the answer; and every entry left as it was still gives its node.
    #[test]
    fn any_v1_instance_list_parses_and_intact_hosts_stay() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let body = Arc::new(Mutex::new(Vec::new()));
        let d = nacos(vec![rt.block_on(v1_server(body.clone()))]);
        let poll = |bytes: Vec<u8>, scheme: &str| {
            *body.lock().unwrap() = bytes;
            let q = Query { service_name: "web".into(), args: vec![], scheme: scheme.into() };
            rt.block_on(d.poll_v1(&q))
        };
        let good: Vec<(Value, Option<Want>, Option<Want>)> =
            sdk_instances().into_iter().map(|(i, http, grpc)| (v1_host(&i), http, grpc)).collect();
        let answer = v1_answer(good.iter().map(|g| g.0.clone()).collect());
        let bytes = serde_json::to_vec(&answer).unwrap();
        for grpc in [false, true] {
            let mut want: Vec<Want> = good.iter().filter_map(|g| if grpc { g.2 } else { g.1 }).collect();
            want.sort();
            let set = poll(bytes.clone(), if grpc { "grpc" } else { "http" }).unwrap();
            assert_eq!(triples(&set), want);
        }

        let payloads = [answer, v1_answer(vec![good[0].0.clone()])];
        fuzz::each_seed(1_000, &payloads, |seed, input| {
            let scheme = ["http", "grpc", "https", "grpcs"][seed as usize % 4];
            let got = poll(input.bytes(), scheme);
            let Some(doc) = input.value() else {
                assert!(matches!(got, Err(DiscoveryError::Invalid(_))), "{got:?}");
                return;
            };
            // JSON without a `hosts` list is no answer: the poll fails (the last nodes stay).
            if !doc["hosts"].is_array() {
                assert!(matches!(got, Err(DiscoveryError::Invalid(_))), "{got:?}");
                return;
            }
            let set = got.unwrap();
            let ips = fuzz::strings_under(&doc, "ip");
            let hosts: Vec<&Value> = doc["hosts"].as_array().into_iter().flatten().collect();
            assert!(set.nodes.len() <= hosts.len());
            for n in &set.nodes {
                assert!(matches!(n.port, Some(p) if p > 0), "{n:?}");
                assert!(ips.contains(&n.host), "{n:?} is no ip of the answer");
                let from = hosts
                    .iter()
                    .filter(|h| h["healthy"] != false && h["enabled"] != false)
                    .filter(|h| n.metadata == h["metadata"].as_object().cloned().unwrap_or_default())
                    .find(|h| {
                        let grpc_port = h["metadata"].get("gRPC_port").map(|p| match p {
                            Value::String(s) => s.parse().map_err(|_| ()),
                            p => p.as_i64().ok_or(()),
                        });
                        let Some(ip) = h["ip"].as_str() else { return false };
                        // A weight that is no number gets the configured one (7).
                        let weight = h["weight"].as_f64().unwrap_or(f64::NAN);
                        gives(n, ip, h["port"].as_i64(), grpc_port, Some(weight), scheme)
                    });
                assert!(from.is_some(), "{n:?} is no healthy, enabled entry's");
            }
            assert!(set.nodes.windows(2).all(|w| (&w[0].host, w[0].port) <= (&w[1].host, w[1].port)));
            for (g, http, grpc) in &good {
                let want = if is_grpc(scheme) { grpc } else { http };
                if let Some(want) = want
                    && hosts.contains(&g)
                {
                    assert!(triples(&set).contains(want), "{want:?} lost");
                }
            }
        });
    }
}
