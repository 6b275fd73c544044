//! DNS: A/AAAA/SRV answers as nodes, re-resolved in the background when their TTL expires
//! (`discovery.dns`, APISIX's `apisix/discovery/dns`), and the global resolver for hostnames in
//! static node lists (`apisix.dns_resolver`).
//!
//! * `service_name` is `host` or `host:port`;
//! * record types are tried in `order` (default `last, SRV, A, AAAA, CNAME`; `last` is the type
//!   that last answered for that name);
//! * SRV answers carry weight (0 becomes 1, split over the target's addresses), priority
//!   (lower SRV priority is tried first: priority = -srv_priority) and port (a port in
//!   `service_name` wins);
//! * a static host name is looked up once for every upstream that names it: the answer is
//!   shared until its TTL ends (a failure for a second), and lookups of one name at the same
//!   moment wait for the first (a thousand routes with inline upstreams on `backend.internal`
//!   make one query per TTL, not a thousand).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use serde_json::Map;

use crate::{BoxFuture, Discovery, DiscoveryError, NodeSet, NodeSpec, Query, Resolution};

/// A DNS record type in the lookup order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Last,
    Srv,
    A,
    Aaaa,
    Cname,
}

impl RecordKind {
    /// Parses APISIX's names (`last`, `SRV`, `A`, `AAAA`, `CNAME`).
    pub fn parse(s: &str) -> Option<RecordKind> {
        Some(match s {
            "last" => RecordKind::Last,
            "SRV" => RecordKind::Srv,
            "A" => RecordKind::A,
            "AAAA" => RecordKind::Aaaa,
            "CNAME" => RecordKind::Cname,
            _ => return None,
        })
    }
}

/// Settings of a resolver.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// Name servers; empty means the system configuration (or `resolv_conf`).
    pub servers: Vec<SocketAddr>,
    /// Contents of a resolv.conf to use instead of the system one.
    pub resolv_conf: Option<String>,
    pub order: Vec<RecordKind>,
    pub timeout: Duration,
    /// Overrides every TTL (`apisix.dns_resolver_valid`).
    pub ttl_override: Option<Duration>,
    /// Consult /etc/hosts first.
    pub hosts_file: bool,
    pub ipv6: bool,
    /// Names without a trailing dot go through resolv.conf's `search` list and `ndots` (APISIX's
    /// `enable_resolv_search_opt`, on by default), so `backend` finds
    /// `backend.ns.svc.cluster.local`; off, every name is taken as fully qualified.
    pub search: bool,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            servers: vec![],
            resolv_conf: None,
            order: vec![
                RecordKind::Last,
                RecordKind::Srv,
                RecordKind::A,
                RecordKind::Aaaa,
                RecordKind::Cname,
            ],
            timeout: Duration::from_secs(2),
            ttl_override: None,
            hosts_file: false,
            ipv6: true,
            search: true,
        }
    }
}

/// Shortest and longest wait before re-resolving, whatever the TTL says.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(3600);

/// How long a failed lookup of a static host name answers for everyone who asks.
const FAILURE_SHARED: Duration = Duration::from_secs(1);

/// The last lookup of a static host name: the addresses and until when they are valid, or
/// the failure and when it happened.
struct HostAnswer {
    result: Result<(Vec<IpAddr>, Instant), DiscoveryError>,
    at: Instant,
}

/// A DNS backend.
pub struct DnsDiscovery {
    resolver: TokioResolver,
    opts: DnsOptions,
    last: Mutex<HashMap<String, RecordKind>>,
    /// `lookup_host` answers by host name; the async lock makes lookups of a name wait for the
    /// one under way.
    hosts: Mutex<HostTable>,
}

/// Answers of `lookup_host` by host name, and how many lookups it has served.
#[derive(Default)]
struct HostTable {
    slots: HashMap<String, Arc<tokio::sync::Mutex<Option<HostAnswer>>>>,
    lookups: u64,
}

/// Drops the answers nobody uses: not `keep`, not being looked up, and expired (a failure once
/// its second of sharing is over).
fn prune(table: &mut HostTable, keep: &str, now: Instant) {
    table.slots.retain(|name, slot| {
        name == keep
            || Arc::strong_count(slot) > 1
            || slot.try_lock().map_or(true, |a| {
                a.as_ref().is_some_and(|a| match &a.result {
                    Ok((_, until)) => *until > now,
                    Err(_) => now.duration_since(a.at) < FAILURE_SHARED,
                })
            })
    });
}

impl DnsDiscovery {
    /// Builds the resolver.
    pub fn new(opts: DnsOptions) -> Result<Self, DiscoveryError> {
        let (mut config, mut ropts) = if !opts.servers.is_empty() {
            let servers = opts
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
        } else if let Some(text) = &opts.resolv_conf {
            hickory_resolver::system_conf::parse_resolv_conf(text)
                .map_err(|e| DiscoveryError::Config(format!("resolv_conf: {e}")))?
        } else {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DiscoveryError::Config(format!("/etc/resolv.conf: {e}")))?
        };
        if !opts.servers.is_empty() && opts.search {
            // Servers given by name still take the search list and `ndots` of resolv.conf (the
            // system's, or `resolv_conf`), as lua-resty-dns-client reads them whatever servers
            // it is given. Without a readable one there is no search list.
            let conf = match &opts.resolv_conf {
                Some(text) => hickory_resolver::system_conf::parse_resolv_conf(text).ok(),
                None => hickory_resolver::system_conf::read_system_conf().ok(),
            };
            if let Some((c, o)) = conf {
                if let Some(d) = c.domain() {
                    config.set_domain(d.clone());
                }
                for d in c.search() {
                    config.add_search(d.clone());
                }
                ropts.ndots = o.ndots;
            }
        }
        ropts.timeout = opts.timeout;
        ropts.attempts = 2;
        // We schedule re-resolution ourselves at the TTL; a cache would hide outages and changes.
        ropts.cache_size = 0;
        ropts.use_hosts_file = if opts.hosts_file { ResolveHosts::Always } else { ResolveHosts::Never };
        let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        *builder.options_mut() = ropts;
        let resolver = builder.build().map_err(|e| DiscoveryError::Config(e.to_string()))?;
        Ok(DnsDiscovery {
            resolver,
            opts,
            last: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HostTable::default()),
        })
    }

    fn ttl(&self, valid_until: Instant) -> Duration {
        self.opts
            .ttl_override
            .unwrap_or_else(|| valid_until.saturating_duration_since(Instant::now()))
            .clamp(MIN_TTL, MAX_TTL)
    }

    /// Resolves a host name to its addresses (A first, then AAAA) and how long they are valid,
    /// for static nodes; shared between callers (module doc).
    pub async fn lookup_host(&self, host: &str) -> Result<(Vec<IpAddr>, Duration), DiscoveryError> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok((vec![ip], MAX_TTL));
        }
        let slot = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            // Names no upstream looks up any more (a reload dropped them) leave once their
            // answer has expired.
            let now = Instant::now();
            // (Looked at every 128 lookups, so a reload resolving thousands of names does not
            // scan the table for each.)
            hosts.lookups += 1;
            if hosts.lookups.is_multiple_of(128) {
                prune(&mut hosts, host, now);
            }
            hosts.slots.entry(host.to_string()).or_default().clone()
        };
        let mut answer = slot.lock().await;
        let now = Instant::now();
        match answer.as_ref().map(|a| (&a.result, a.at)) {
            Some((Ok((ips, until)), _)) if *until > now => return Ok((ips.clone(), *until - now)),
            Some((Err(e), at)) if now.duration_since(at) < FAILURE_SHARED => return Err(e.clone()),
            _ => {}
        }
        let result = self.lookup_host_now(host).await;
        let now = Instant::now();
        *answer = Some(HostAnswer { result: result.clone().map(|(ips, ttl)| (ips, now + ttl)), at: now });
        result
    }

    async fn lookup_host_now(&self, host: &str) -> Result<(Vec<IpAddr>, Duration), DiscoveryError> {
        let name = self.query_name(host);
        let mut last_err = None;
        let mut kinds = vec![RecordKind::A];
        if self.opts.ipv6 {
            kinds.push(RecordKind::Aaaa);
        }
        for kind in kinds {
            match self.ips(&name, kind).await {
                Ok(Some((ips, ttl))) => return Ok((ips, ttl)),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| DiscoveryError::NotFound(host.to_string())))
    }

    /// A or AAAA records of `name`; `Ok(None)` when there are none.
    async fn ips(
        &self,
        name: &str,
        kind: RecordKind,
    ) -> Result<Option<(Vec<IpAddr>, Duration)>, DiscoveryError> {
        let res = match kind {
            RecordKind::A => self.resolver.ipv4_lookup(name).await,
            RecordKind::Aaaa => self.resolver.ipv6_lookup(name).await,
            _ => return Ok(None),
        };
        match res {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() { Ok(None) } else { Ok(Some((ips, self.ttl(lookup.valid_until())))) }
            }
            Err(e) => classify(e).map(|()| None),
        }
    }

    async fn srv(&self, name: &str, port: Option<u16>) -> Result<Option<Resolution>, DiscoveryError> {
        let lookup = match self.resolver.srv_lookup(name).await {
            Ok(l) => l,
            Err(e) => return classify(e).map(|()| None),
        };
        let mut valid = self.ttl(lookup.valid_until());
        let mut entries = Vec::new();
        for r in lookup.answers() {
            if let RData::SRV(srv) = &r.data {
                let target = srv.target.to_ascii();
                let (ips, ttl) = match self.ips(&target, RecordKind::A).await? {
                    Some(x) => x,
                    None if !self.opts.ipv6 => continue,
                    None => match self.ips(&target, RecordKind::Aaaa).await? {
                        Some(x) => x,
                        None => continue,
                    },
                };
                valid = valid.min(ttl);
                entries.push((srv.priority, srv.weight.max(1) as u64, srv.port, ips));
            }
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let weights = split_weights(&entries.iter().map(|e| (e.1, e.3.len())).collect::<Vec<_>>());
        let mut nodes = Vec::new();
        for ((prio, _, srv_port, ips), per) in entries.into_iter().zip(weights) {
            let port = port.or((srv_port != 0).then_some(srv_port));
            for ip in ips {
                nodes.push(NodeSpec {
                    host: ip.to_string(),
                    port,
                    weight: per,
                    priority: -(prio as i32),
                    metadata: Map::new(),
                });
            }
        }
        Ok(Some(Resolution { nodes: NodeSet { nodes }, valid_for: Some(valid) }))
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weight of each address of each SRV answer `(weight, address count)`: the SRV weight
/// split over its addresses, scaled by the LCM of the address counts so the weights stay
/// integers in proportion (APISIX). When that does not fit a node weight (targets with
/// hundreds of addresses in many different counts), the proportions are kept as closely as
/// 32 bits allow instead, none below 1.
fn split_weights(entries: &[(u64, usize)]) -> Vec<u32> {
    let exact = || -> Option<Vec<u32>> {
        let lcm = entries.iter().try_fold(1u128, |l, &(_, n)| {
            let n = n.max(1) as u128;
            (l / gcd(l, n)).checked_mul(n)
        })?;
        entries
            .iter()
            .map(|&(w, n)| u32::try_from((w as u128).checked_mul(lcm)? / n.max(1) as u128).ok())
            .collect()
    };
    if let Some(w) = exact() {
        return w;
    }
    let share: Vec<f64> = entries.iter().map(|&(w, n)| w as f64 / n.max(1) as f64).collect();
    let most = share.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    let scale = u32::MAX as f64 / most;
    share.iter().map(|s| (s * scale).round().clamp(1.0, u32::MAX as f64) as u32).collect()
}

/// No records / no such name are answers (`Ok`), anything else is an outage.
fn classify(e: NetError) -> Result<(), DiscoveryError> {
    if e.is_nx_domain() || e.is_no_records_found() {
        Ok(())
    } else {
        Err(DiscoveryError::Unavailable(e.to_string()))
    }
}

impl DnsDiscovery {
    /// The name as asked: as written when the search list applies, else fully qualified.
    fn query_name(&self, host: &str) -> String {
        if self.opts.search { host.to_string() } else { fqdn(host) }
    }
}

/// Makes a name fully qualified so no search domain is appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') { name.to_string() } else { format!("{name}.") }
}

/// Splits `host[:port]`.
pub fn split_service_name(s: &str) -> Result<(String, Option<u16>), DiscoveryError> {
    let bad = || DiscoveryError::Config(format!("invalid service_name {s:?}: expected host or host:port"));
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port: u16 = p.parse().map_err(|_| bad())?;
            if h.is_empty() || port == 0 {
                return Err(bad());
            }
            Ok((h.to_string(), Some(port)))
        }
        Some(_) => Err(bad()),
        None if s.is_empty() => Err(bad()),
        None => Ok((s.to_string(), None)),
    }
}

impl Discovery for DnsDiscovery {
    fn kind(&self) -> &'static str {
        "dns"
    }

    fn resolve<'a>(&'a self, query: &'a Query) -> BoxFuture<'a, Result<Resolution, DiscoveryError>> {
        Box::pin(async move {
            let (host, port) = split_service_name(&query.service_name)?;
            if let Ok(ip) = host.parse::<IpAddr>() {
                let node =
                    NodeSpec { host: ip.to_string(), port, weight: 1, priority: 0, metadata: Map::new() };
                return Ok(Resolution { nodes: NodeSet { nodes: vec![node] }, valid_for: Some(MAX_TTL) });
            }
            let name = self.query_name(&host);
            let last = self.last.lock().ok().and_then(|m| m.get(&host).copied());
            let mut order: Vec<RecordKind> = Vec::with_capacity(self.opts.order.len());
            for k in &self.opts.order {
                match (k, last) {
                    (RecordKind::Last, Some(l)) => order.push(l),
                    (RecordKind::Last, None) => {}
                    (RecordKind::Aaaa, _) if !self.opts.ipv6 => {}
                    (k, _) => order.push(*k),
                }
            }
            order.dedup();
            let mut error = None;
            for kind in order {
                let found = match kind {
                    RecordKind::Srv => self.srv(&name, port).await,
                    RecordKind::A | RecordKind::Aaaa | RecordKind::Cname => {
                        let k = if kind == RecordKind::Cname { RecordKind::A } else { kind };
                        self.ips(&name, k).await.map(|o| {
                            o.map(|(ips, ttl)| Resolution {
                                nodes: NodeSet {
                                    nodes: ips
                                        .into_iter()
                                        .map(|ip| NodeSpec {
                                            host: ip.to_string(),
                                            port,
                                            weight: 1,
                                            priority: 0,
                                            metadata: Map::new(),
                                        })
                                        .collect(),
                                },
                                valid_for: Some(ttl),
                            })
                        })
                    }
                    RecordKind::Last => Ok(None),
                };
                match found {
                    Ok(Some(mut res)) => {
                        // In one order whatever the answer's: a server that rotates its records
                        // does not make every re-resolution a change to apply.
                        res.nodes.nodes.sort_by(|a, b| {
                            (&a.host, a.port, a.priority).cmp(&(&b.host, b.port, b.priority))
                        });
                        if let Ok(mut m) = self.last.lock() {
                            m.insert(host.clone(), kind);
                        }
                        return Ok(res);
                    }
                    Ok(None) => {}
                    Err(e) => error = Some(e),
                }
            }
            Err(error.unwrap_or_else(|| DiscoveryError::NotFound(query.service_name.clone())))
        })
    }
}

/// A shared handle to a resolver.
pub type SharedDns = Arc<DnsDiscovery>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert_eq!(split_service_name("web.svc").unwrap(), ("web.svc".into(), None));
        assert_eq!(split_service_name("web.svc:8080").unwrap(), ("web.svc".into(), Some(8080)));
        assert!(split_service_name("web.svc:x").is_err());
        assert!(split_service_name(":80").is_err());
        assert!(split_service_name("").is_err());
    }

    /// A name server on UDP that answers every A question with 127.0.0.1 (TTL 30), counting
    /// the questions.
    async fn counting_name_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let q = &buf[..n];
                // The question: labels from byte 12 to the root label, then type and class.
                let mut end = 12;
                while end < q.len() && q[end] != 0 {
                    end += 1 + q[end] as usize;
                }
                let question = &q[12..(end + 5).min(q.len())];
                let mut a = vec![q[0], q[1], 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
                a.extend_from_slice(question);
                a.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 127, 0, 0, 1]);
                let _ = sock.send_to(&a, from).await;
            }
        });
        (addr, count)
    }

    /// A name server that knows one name, `backend.svc.test.` (A 127.0.0.2), and answers
    /// NXDOMAIN for every other; it records the names asked.
    async fn one_name_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let q = &buf[..n];
                let mut labels = Vec::new();
                let mut end = 12;
                while end < q.len() && q[end] != 0 {
                    let len = q[end] as usize;
                    labels.push(
                        String::from_utf8_lossy(q.get(end + 1..end + 1 + len).unwrap_or(&[])).to_lowercase(),
                    );
                    end += 1 + len;
                }
                let name = labels.join(".");
                let qtype = q.get(end + 1..end + 3).map(|t| u16::from_be_bytes([t[0], t[1]]));
                log.lock().unwrap().push(name.clone());
                let question = &q[12..(end + 5).min(q.len())];
                let known = name == "backend.svc.test" && qtype == Some(1);
                let rcode = if name == "backend.svc.test" { 0x80 } else { 0x83 };
                let mut a = vec![q[0], q[1], 0x81, rcode, 0, 1, 0, u8::from(known), 0, 0, 0, 0];
                a.extend_from_slice(question);
                if known {
                    a.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 127, 0, 0, 2]);
                }
                let _ = sock.send_to(&a, from).await;
            }
        });
        (addr, asked)
    }

    /// A short name goes through resolv.conf's search list (as in a Kubernetes pod, where
    /// `backend` is `backend.<ns>.svc.cluster.local`), also with name servers given by address;
    /// with `search` off (`enable_resolv_search_opt: false`) it is asked as it is.
    #[tokio::test]
    async fn short_names_go_through_the_search_list() {
        let (server, asked) = one_name_server().await;
        let opts = |search: bool| DnsOptions {
            servers: vec![server],
            // The search list and ndots come from here; the servers above answer.
            resolv_conf: Some("nameserver 127.0.0.1\nsearch svc.test\noptions ndots:2\n".into()),
            ipv6: false,
            search,
            ..DnsOptions::default()
        };
        let dns = DnsDiscovery::new(opts(true)).unwrap();
        let found = dns.lookup_host("backend").await;
        let (ips, _) = found.unwrap_or_else(|e| panic!("{e:?}; asked {:?}", asked.lock().unwrap()));
        assert_eq!(ips, [IpAddr::from([127, 0, 0, 2])]);
        let q = Query { service_name: "backend:8080".into(), args: vec![], scheme: "http".into() };
        let r = dns.resolve(&q).await.unwrap();
        assert_eq!(r.nodes.nodes[0].host, "127.0.0.2");
        assert!(asked.lock().unwrap().contains(&"backend.svc.test".to_string()));

        let dns = DnsDiscovery::new(opts(false)).unwrap();
        asked.lock().unwrap().clear();
        assert!(dns.lookup_host("backend").await.is_err());
        assert!(asked.lock().unwrap().iter().all(|n| n == "backend"), "{:?}", asked.lock().unwrap());
    }

    #[tokio::test]
    async fn upstreams_that_name_one_host_share_its_lookup() {
        let (server, asked) = counting_name_server().await;
        let dns = Arc::new(
            DnsDiscovery::new(DnsOptions { servers: vec![server], ipv6: false, ..DnsOptions::default() })
                .unwrap(),
        );
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let dns = dns.clone();
            all.spawn(async move { dns.lookup_host("backend.test").await });
        }
        while let Some(r) = all.join_next().await {
            let (ips, ttl) = r.unwrap().unwrap();
            assert_eq!(ips, [IpAddr::from([127, 0, 0, 1])]);
            assert!(ttl <= Duration::from_secs(30) && ttl > Duration::from_secs(20), "{ttl:?}");
        }
        // Upstreams that look it up later within the TTL (their own schedules, a reload) get
        // the same answer with what is left of the TTL.
        for _ in 0..3 {
            assert!(dns.lookup_host("backend.test").await.unwrap().1 <= Duration::from_secs(30));
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "one question for 53 lookups");
        // Another name is asked on its own.
        dns.lookup_host("other.test").await.unwrap();
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Names nobody looks up leave the table once their answer expired (a failure after its
        // second of sharing); valid answers and fresh failures stay.
        let now = Instant::now();
        let failed = |at: Instant| {
            Arc::new(tokio::sync::Mutex::new(Some(HostAnswer {
                result: Err(DiscoveryError::Unavailable("down".into())),
                at,
            })))
        };
        let mut table = dns.hosts.lock().unwrap();
        table.slots.insert("gone.test".into(), Default::default());
        table.slots.insert("failed-now.test".into(), failed(now));
        table.slots.insert("failed-long-ago.test".into(), failed(now - Duration::from_secs(5)));
        prune(&mut table, "x.test", now);
        let mut left: Vec<&str> = table.slots.keys().map(String::as_str).collect();
        left.sort();
        assert_eq!(left, ["backend.test", "failed-now.test", "other.test"]);
    }

    #[test]
    fn srv_weights_split_over_addresses_and_never_overflow() {
        // APISIX's scaling: weights 10 over 1, 2 and 3 addresses, times the LCM 6.
        assert_eq!(split_weights(&[(10, 1), (10, 2), (10, 3)]), [60, 30, 20]);
        // Address counts whose LCM is about 1.3e16, and weights past what 32 bits hold at that
        // scale: proportions kept, the largest at u32::MAX, none 0.
        let primes = [2usize, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53];
        let entries: Vec<(u64, usize)> = primes.iter().map(|&n| (65_535, n)).collect();
        let w = split_weights(&entries);
        assert_eq!(w[0], u32::MAX);
        assert!(w.iter().all(|&x| x >= 1));
        let ratio = w[0] as f64 / w[15] as f64;
        assert!((ratio - 53.0 / 2.0).abs() < 1e-3, "{ratio}");
    }

    #[test]
    fn record_kinds() {
        assert_eq!(RecordKind::parse("SRV"), Some(RecordKind::Srv));
        assert_eq!(RecordKind::parse("srv"), None);
    }
}
