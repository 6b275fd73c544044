//! The gateway: configuration -> runtime state, hot reload, and the running process (workers,
//! background runtime, control API, drain).
//!
//! All request-path state (routes, upstreams, certificates) is one [`State`] behind one
//! `ArcSwap`, so a reload swaps everything at once. Upstreams that survive a reload keep their
//! node states (health, in-flight counts), and connections in flight keep the state they
//! started with.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use strait_discovery::Discovery;
use strait_discovery::dns::DnsDiscovery;
use strait_protocols::tls::{self, CertStore, SniPolicy};
use tokio::task::AbortHandle;

use crate::config::node::NodeConfig;
use crate::config::resources::Resources;
use crate::config::{Config, ConfigErrors};
use crate::route::stream::{StreamRoute, StreamRouter};
use crate::route::{Route, Router};
use crate::upstream::source::{self, DiscoveryHub};
use crate::upstream::{BuildContext, Upstream};

/// Everything the request path reads, swapped as one.
pub struct State {
    pub router: Router,
    pub stream_router: StreamRouter,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub certs: CertStore,
    pub version: u64,
    /// The task feeding each upstream its nodes, by upstream key, where one is needed.
    feeds: HashMap<String, AbortHandle>,
}

impl State {
    fn empty() -> State {
        State {
            router: Router::default(),
            stream_router: StreamRouter::default(),
            upstreams: HashMap::new(),
            certs: CertStore::default(),
            version: 0,
            feeds: HashMap::new(),
        }
    }

    /// Stops the background work (feeds and probes) of the upstreams that `next` does not
    /// carry over.
    fn retire(&self, next: &State) {
        for (key, u) in &self.upstreams {
            if next.upstreams.get(key).is_some_and(|n| Arc::ptr_eq(n, u)) {
                continue;
            }
            if let Some(f) = self.feeds.get(key) {
                f.abort();
            }
            u.stop();
        }
    }
}

/// Result of the last reload attempt, for the status API.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub reloads: u64,
    pub rejected: u64,
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub http_requests: AtomicU64,
    pub http_no_route: AtomicU64,
    pub stream_connections: AtomicU64,
    pub stream_no_route: AtomicU64,
    pub connections_active: AtomicU64,
}

/// State shared by workers, background tasks and the control API.
pub struct Shared {
    pub state: Arc<ArcSwap<State>>,
    pub node: NodeConfig,
    pub resources_path: PathBuf,
    pub hub: Arc<DiscoveryHub>,
    pub ctx: BuildContext,
    pub reload: Mutex<ReloadStatus>,
    pub metrics: Metrics,
    /// Serializes reloads.
    reload_lock: Mutex<()>,
    /// Hash of the resources text last applied.
    applied_hash: AtomicU64,
    stream_tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
    /// The process's TLS sessions (`ssl_session_timeout`), in scopes: one for the HTTP
    /// listeners on every worker, one for the stream listeners, two per [`SniPolicy`].
    sessions: Arc<tls::SessionCache>,
    pub http_sessions: Arc<tls::SessionScope>,
    stream_sessions: Arc<tls::SessionScope>,
    /// The keys served at the last load, by SNI ([`certs_changed`]): when the one of an SNI
    /// served before changes, or the SNI goes, the listeners' sessions are not resumed any more.
    served: Mutex<HashMap<String, Arc<[Arc<CertifiedKey>]>>>,
}

/// Whether an SNI served in `before` is served with other keys, or not at all, in `after`.
/// (A new SNI changes nothing: no session was made for it.) A key that stays the same from load
/// to load is the same object ([`strait_protocols::tls::certified_key`] finds it again while a
/// configuration holds it), so comparing the objects tells an unchanged certificate from a
/// replaced one; `before` holding them keeps a replaced key's address from being reused.
fn certs_changed(
    before: &HashMap<String, Arc<[Arc<CertifiedKey>]>>,
    after: &HashMap<String, Arc<[Arc<CertifiedKey>]>>,
) -> bool {
    before.iter().any(|(sni, old)| {
        after.get(sni).is_none_or(|new| {
            old.len() != new.len() || old.iter().zip(new.iter()).any(|(a, b)| !Arc::ptr_eq(a, b))
        })
    })
}

impl Shared {
    /// Builds shared state from a loaded configuration; starts node feeds on `background`.
    pub fn new(config: Config, background: tokio::runtime::Handle) -> Result<Arc<Shared>, String> {
        let roots = strait_protocols::tls::root_store(config.node.trusted_ca_pem.as_deref())
            .map_err(|e| format!("trusted certificates: {e}"))?;
        let ctx = BuildContext { background: background.clone(), roots };
        let mut backends: Vec<Arc<dyn Discovery>> = Vec::new();
        if let Some(dns) = &config.node.discovery_config.dns {
            let d = DnsDiscovery::new(dns.clone()).map_err(|e| format!("discovery.dns: {e}"))?;
            backends.push(Arc::new(d));
        }
        let dc = &config.node.discovery_config;
        if let Some(o) = &dc.nacos {
            let d = strait_discovery::nacos::NacosDiscovery::new(o.clone())
                .map_err(|e| format!("discovery.nacos: {e}"))?;
            backends.push(Arc::new(d));
        }
        if let Some(o) = &dc.consul {
            let d = strait_discovery::consul::ConsulDiscovery::new(o.clone())
                .map_err(|e| format!("discovery.consul: {e}"))?;
            backends.push(Arc::new(d));
        }
        if let Some(o) = &dc.eureka {
            let d = strait_discovery::eureka::EurekaDiscovery::new(o.clone())
                .map_err(|e| format!("discovery.eureka: {e}"))?;
            backends.push(Arc::new(d));
        }
        if let Some(o) = &dc.kubernetes {
            let d = strait_discovery::kubernetes::KubernetesDiscovery::new(
                o.clone(),
                Duration::from_secs(2),
                Duration::from_secs(10),
            )
            .map_err(|e| format!("discovery.kubernetes: {e}"))?;
            backends.push(Arc::new(d));
        }
        let global = crate::config::discovery::global_resolver(
            &config.node.dns_resolver,
            config.node.dns_resolver_valid,
            config.node.resolver_timeout,
            config.node.resolver_ipv6,
            config.node.resolv_search,
        );
        let global_dns = match DnsDiscovery::new(global) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                tracing::warn!(error = %e, "no DNS resolver for host names in nodes");
                None
            }
        };
        let hub =
            DiscoveryHub::new(backends, global_dns, background, config.node.discovery_config.dumps.clone());
        let sessions = tls::SessionCache::new(config.node.ssl_session_timeout);
        let (http_sessions, stream_sessions) = (sessions.scope(), sessions.scope());
        let shared = Arc::new(Shared {
            state: Arc::new(ArcSwap::from_pointee(State::empty())),
            node: config.node,
            resources_path: config.resources_path,
            hub,
            ctx,
            reload: Mutex::new(ReloadStatus::default()),
            metrics: Metrics::default(),
            reload_lock: Mutex::new(()),
            applied_hash: AtomicU64::new(0),
            stream_tls: std::sync::OnceLock::new(),
            sessions,
            http_sessions,
            stream_sessions,
            served: Mutex::new(HashMap::new()),
        });
        shared.apply(&config.resources)?;
        if let Ok(text) = std::fs::read(&shared.resources_path) {
            shared.applied_hash.store(hash(&text), Ordering::Relaxed);
        }
        Ok(shared)
    }

    /// Builds a new state from `res` and swaps it in. An upstream whose definition did not
    /// change is carried over whole, as APISIX keeps an unchanged upstream's balancer and
    /// health checker: its probes keep their schedule, its TLS sessions to nodes stay
    /// resumable, its counters keep counting. A changed one is rebuilt, keeping the health of
    /// the nodes it still has.
    pub fn apply(&self, res: &Resources) -> Result<(), String> {
        let _l = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let prev = self.state.load_full();
        let mut upstreams = HashMap::new();
        let mut kept = HashMap::new();
        for spec in &res.upstreams {
            let up = match prev.upstreams.get(&spec.key) {
                Some(p) if p.spec == *spec => {
                    if let Some(f) = prev.feeds.get(&spec.key) {
                        kept.insert(spec.key.clone(), f.clone());
                    }
                    p.clone()
                }
                p => Upstream::new(spec.clone(), p.map(|u| &**u), &self.ctx)?,
            };
            upstreams.insert(spec.key.clone(), up);
        }
        let mut routes = Vec::with_capacity(res.routes.len());
        for spec in &res.routes {
            let upstream = spec.upstream.as_ref().and_then(|k| upstreams.get(k)).cloned();
            let transcode = match &spec.plugins.grpc_transcode {
                Some(conf) => Some(Arc::new(
                    crate::transcode::build(conf, &res.protos)
                        .map_err(|(p, m)| format!("route {}: grpc-transcode{p}: {m}", spec.id))?,
                )),
                None => None,
            };
            routes.push(Arc::new(Route { spec: spec.clone(), upstream, transcode }));
        }
        let mut streams = Vec::with_capacity(res.stream_routes.len());
        for spec in &res.stream_routes {
            let Some(upstream) = upstreams.get(&spec.upstream).cloned() else {
                return Err(format!("stream route {}: upstream {} missing", spec.id, spec.upstream));
            };
            streams.push(Arc::new(StreamRoute { spec: spec.clone(), upstream }));
        }
        let mut certs = CertStore::default();
        // The keys served by SNI (a later entry for an SNI replaces an earlier one, as in
        // `certs`), to compare with the last load's.
        let mut served = HashMap::new();
        for ssl in res.ssls.iter().filter(|s| !s.client) {
            // Parsed when the file was checked.
            let keys = ssl.keys.clone();
            let policy = if ssl.client_auth.is_some() || ssl.protocols.is_some() {
                let versions = ssl.protocols.unwrap_or(self.node.ssl_protocols);
                let p = SniPolicy::new(keys.clone(), versions, ssl.client_auth.clone(), &self.sessions)
                    .map_err(|e| format!("ssl {}: {e}", ssl.id))?;
                Some(Arc::new(p))
            } else {
                None
            };
            for sni in &ssl.snis {
                certs.insert_with(sni, keys.clone(), policy.clone());
                served.insert(sni.clone(), keys.clone());
            }
        }
        if let Some(f) = &self.node.fallback_sni {
            certs.set_fallback(f);
        }
        // Everything is built; now start feeding the new upstreams and swap.
        let mut feeds = kept;
        for (key, up) in &upstreams {
            if prev.upstreams.get(key).is_some_and(|p| Arc::ptr_eq(p, up)) {
                continue;
            }
            if let Some(h) = source::start(up, &self.hub) {
                feeds.insert(key.clone(), h);
            }
        }
        let state = State {
            router: Router::new(routes),
            stream_router: StreamRouter::new(streams),
            upstreams,
            certs,
            version: prev.version + 1,
            feeds,
        };
        self.state.store(Arc::new(state));
        // A replaced or removed certificate: sessions made before are not resumed (rustls
        // checks only the suite and SNI of a session it resumes). After the swap, so that a
        // session stored under the renewed scope was made with the new certificates (but for a
        // handshake that chose its certificate before the swap and ends after it). Policies'
        // scopes are new at every load anyway.
        let mut before = self.served.lock().unwrap_or_else(|e| e.into_inner());
        if certs_changed(&before, &served) {
            self.http_sessions.renew();
            self.stream_sessions.renew();
        }
        *before = served;
        drop(before);
        prev.retire(&self.state.load());
        self.hub.prune();
        Ok(())
    }

    /// Re-reads `apisix.yaml` if its content changed; a file that fails validation is rejected
    /// whole and the running configuration keeps serving. Returns whether a new state was applied.
    pub fn reload_if_changed(&self) -> bool {
        let Ok(text) = std::fs::read(&self.resources_path) else {
            return false;
        };
        let h = hash(&text);
        if h == self.applied_hash.load(Ordering::Relaxed) {
            return false;
        }
        self.applied_hash.store(h, Ordering::Relaxed);
        let started = Instant::now();
        let file = self.resources_path.display().to_string();
        // As at start-up (`read_to_string`): bytes that are not UTF-8 are an error, not
        // replaced, so a file that loads now also loads at the next start.
        let result = match std::str::from_utf8(&text) {
            Err(e) => Err(format!("{file}: not UTF-8 text: {e}")),
            Ok(text) => Resources::parse(&file, text, &self.node, |k| std::env::var(k).ok())
                .map_err(|e: ConfigErrors| e.to_string())
                .and_then(|res| self.apply(&res)),
        };
        let mut st = self.reload.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                st.reloads += 1;
                st.last_success = Some(SystemTime::now());
                let took_ms = started.elapsed().as_millis() as u64;
                tracing::info!(file = %file, version = self.state.load().version, took_ms, "configuration reloaded");
                true
            }
            Err(e) => {
                st.rejected += 1;
                st.last_error = Some((SystemTime::now(), e.clone()));
                for line in e.lines() {
                    tracing::error!("configuration rejected, previous configuration keeps serving: {line}");
                }
                false
            }
        }
    }

    /// Polls `apisix.yaml` for changes until the process ends (APISIX checks every second).
    pub async fn watch_resources(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                me.reload_if_changed();
                // A reload prunes right away, before the replaced upstreams' feeds have let go
                // of their watches: those are ended here, a tick later.
                me.hub.prune();
            })
            .await;
        }
    }

    /// TLS settings for `tls: true` stream listeners (certificates by SNI, no ALPN).
    pub fn stream_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        if let Some(c) = self.stream_tls.get() {
            return Some(c.clone());
        }
        let resolver = Arc::new(StateCerts(self.state.clone(), self.node.ssl_protocols));
        let sessions = self.stream_sessions.clone();
        match strait_protocols::tls::server_config(resolver, &[], self.node.ssl_protocols, sessions) {
            Ok(c) => Some(self.stream_tls.get_or_init(|| c).clone()),
            Err(e) => {
                tracing::error!(error = %e, "stream TLS setup failed");
                None
            }
        }
    }

    /// The upstream with `key`, for the control API.
    pub fn upstream(&self, key: &str) -> Option<Arc<Upstream>> {
        self.state.load().upstreams.get(key).cloned()
    }
}

fn hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish() | 1
}

/// TLS certificates by SNI, read from the current state at every handshake.
#[derive(Debug)]
pub struct StateCerts(pub Arc<ArcSwap<State>>, pub strait_protocols::tls::TlsVersions);

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("version", &self.version).finish()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("resources", &self.resources_path).finish()
    }
}

impl ResolvesServerCert for StateCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().certs.resolve(&hello, self.1)
    }
}

/// Which of an [`SniPolicy`]'s configurations a listener takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TlsKind {
    /// HTTP with HTTP/2 (ALPN `h2`, `http/1.1`).
    H2,
    /// HTTP/1.1 only.
    H1,
    /// L4 streams (no ALPN).
    Raw,
}

/// Accepts a TLS client with the listener's configuration (`acceptor`) or, when the `ssls`
/// entry for the SNI it asks for has settings of its own (`client`, `ssl_protocols`), with
/// that entry's [`SniPolicy`]. The ClientHello is read before a configuration is chosen, which
/// also lets a client that lists ChaCha20-Poly1305 first have it ([`tls::prefers_chacha`]);
/// every other client gets Strait's order, AES-128-GCM first.
pub(crate) async fn accept_tls<IO>(
    io: IO,
    acceptor: &tokio_rustls::TlsAcceptor,
    state: &ArcSwap<State>,
    kind: TlsKind,
) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
    let config = {
        let hello = start.client_hello();
        let state = state.load();
        let policy =
            if state.certs.has_policies() { state.certs.handshake_policy(hello.server_name()) } else { None };
        let config = match (&policy, kind) {
            (Some(p), TlsKind::H2) => &p.h2,
            (Some(p), TlsKind::H1) => &p.h1,
            (Some(p), TlsKind::Raw) => &p.raw,
            (None, _) => acceptor.config(),
        };
        if tls::prefers_chacha(hello.cipher_suites()) { tls::in_client_order(config) } else { config.clone() }
    };
    start.into_stream(config).await
}

/// Bound listener addresses of a running gateway.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    pub http: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    pub stream: Vec<SocketAddr>,
    pub control: Option<SocketAddr>,
}
