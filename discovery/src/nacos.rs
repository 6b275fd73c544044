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
            && let Some(p) =
                metadata.get("gRPC_port").and_then(|v| v.as_str().and_then(|s| s.parse().ok()).or(v.as_i64()))
        {
            port = p;
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
                    let hosts = v["hosts"].as_array().cloned().unwrap_or_default();
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
                                h["weight"].as_f64().unwrap_or(1.0),
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
}
