//! In-process fakes of the registries that cannot be installed here, each serving the payloads
//! and behaviours of its official API reference, with state the test can change.
//!
//! * [`FakeConsul`] follows the Consul HTTP API: `GET /v1/health/service/:service` with
//!   `passing`, `GET /v1/catalog/services` and `GET /v1/health/state/any`, blocking queries
//!   through `index`/`wait` and the `X-Consul-Index` header
//!   (<https://developer.hashicorp.com/consul/api-docs/health#list-service-instances-for-service>,
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#list-services>,
//!   <https://developer.hashicorp.com/consul/api-docs/health#list-checks-in-state>,
//!   <https://developer.hashicorp.com/consul/api-docs/features/blocking>), ACL tokens in
//!   `X-Consul-Token` (403 "ACL not found" otherwise), and, when asked, the agent's limit on
//!   concurrent connections from one client (`limits.http_max_conns_per_client`, 200 by
//!   default: 429 "Your IP is issuing too many concurrent connections" past it; counted here as
//!   requests in flight, since the gateway's registry client makes one connection per request).
//! * [`FakeEureka`] follows the Eureka REST operations: `GET /eureka/apps` as JSON, with
//!   XStream's habit of giving a single application or instance as an object, and Basic auth
//!   (<https://github.com/Netflix/eureka/wiki/Eureka-REST-operations>).
//! * [`FakeKubernetes`] follows the Kubernetes API concepts for list and watch: Endpoints and
//!   EndpointSlices lists with `metadata.resourceVersion`, `labelSelector` and `fieldSelector`,
//!   watches as newline-delimited events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) from a
//!   `resourceVersion`, and `410 Gone` for versions older than the retained history
//!   (<https://kubernetes.io/docs/reference/using-api/api-concepts/>).
//!
//! Every fake can be made unavailable (connections refused) and brought back on the same port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                strait::route::query_arg(&format!("x={s}"), "x").map(|c| c.into_owned()).unwrap_or_default()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// Serves `handler` on `addr` until stopped.
struct Server {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    kill: watch::Sender<bool>,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

impl Server {
    async fn start(addr: SocketAddr, handler: Handler) -> Server {
        let listener = super::bind_retry(addr).await;
        let addr = listener.local_addr().unwrap();
        let (kill, killed) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                let h = handler.clone();
                let mut killed = killed.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let h = h.clone();
                        async move { Ok::<_, Infallible>(h(req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.wait_for(|k| *k) => {}
                    }
                });
            }
        });
        Server { addr, task: Some(task), kill }
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = self.kill.send(true);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------------------------------
// Consul

/// One Consul service instance.
#[derive(Clone, Debug)]
pub struct ConsulInstance {
    pub id: String,
    pub node_address: String,
    pub address: String,
    pub port: u16,
    pub passing: bool,
}

#[derive(Default)]
struct ConsulState {
    index: u64,
    services: HashMap<String, Vec<ConsulInstance>>,
}

/// A Consul agent's health API.
pub struct FakeConsul {
    state: Arc<Mutex<ConsulState>>,
    changed: Arc<Notify>,
    token: Option<String>,
    server: Server,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    limits: Arc<ConsulLimits>,
}

/// One request in flight while this lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    /// Counts one more; returns the guard and how many are in flight with it.
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> (Self, usize) {
        let now = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (InFlight(n), now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Requests in flight, the most seen at once, those refused, and the limit (0: none).
#[derive(Default)]
struct ConsulLimits {
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
    /// Services asked for with a blocking query (`index`).
    blocking: Mutex<std::collections::HashSet<String>>,
    max_conns_per_client: std::sync::atomic::AtomicUsize,
}

impl FakeConsul {
    pub async fn start(token: Option<&str>) -> FakeConsul {
        Self::start_on("127.0.0.1:0".parse().unwrap(), token, Default::default(), Default::default()).await
    }

    async fn start_on(
        addr: SocketAddr,
        token: Option<&str>,
        state: Arc<Mutex<ConsulState>>,
        changed: Arc<Notify>,
    ) -> FakeConsul {
        if state.lock().unwrap().index == 0 {
            state.lock().unwrap().index = 1;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let limits = Arc::new(ConsulLimits::default());
        let (st, ch, tok, reqs, lim) =
            (state.clone(), changed.clone(), token.map(str::to_string), requests.clone(), limits.clone());
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let (st, ch, tok, reqs, lim) = (st.clone(), ch.clone(), tok.clone(), reqs.clone(), lim.clone());
            Box::pin(async move {
                reqs.fetch_add(1, Relaxed);
                // Counted until the answer is made or the gateway goes away (hyper then drops this
                // future), as an agent counts a connection until it closes.
                let (_in_flight, now) = InFlight::enter(&lim.in_flight);
                let cap = lim.max_conns_per_client.load(Relaxed);
                if cap > 0 && now > cap {
                    lim.refused.fetch_add(1, Relaxed);
                    full(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Your IP is issuing too many concurrent connections, please rate limit your calls\n",
                    )
                } else {
                    lim.most.fetch_max(now, Relaxed);
                    if let Some(name) = req.uri().path().strip_prefix("/v1/health/service/")
                        && query_map(req.uri().query()).contains_key("index")
                    {
                        lim.blocking.lock().unwrap().insert(name.to_string());
                    }
                    Self::answer(req, st, ch, tok).await
                }
            })
        });
        let server = Server::start(addr, handler).await;
        FakeConsul { state, changed, token: token.map(str::to_string), server, requests, limits }
    }

    async fn answer(
        req: Request<Incoming>,
        st: Arc<Mutex<ConsulState>>,
        ch: Arc<Notify>,
        tok: Option<String>,
    ) -> Response<Body> {
        let q = query_map(req.uri().query());
        if let Some(t) = &tok {
            let given = req
                .headers()
                .get("x-consul-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or(q.get("token").cloned());
            if given.as_deref() != Some(t.as_str()) {
                return full(StatusCode::FORBIDDEN, "ACL not found");
            }
        }
        let path = req.uri().path();
        let name = path.strip_prefix("/v1/health/service/").map(str::to_string);
        if name.is_none() && path != "/v1/catalog/services" && path != "/v1/health/state/any" {
            return full(StatusCode::NOT_FOUND, "");
        }
        // Blocking query: hold while the index has not moved past the client's.
        if let Some(idx) = q.get("index").and_then(|i| i.parse::<u64>().ok()) {
            let wait = q.get("wait").and_then(|w| w.trim_end_matches('s').parse::<u64>().ok()).unwrap_or(300);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            loop {
                let notified = ch.notified();
                if st.lock().unwrap().index > idx {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
        }
        let passing_only = q.contains_key("passing");
        let s = st.lock().unwrap();
        let index = s.index.to_string();
        let body = match name {
            Some(name) => Self::instances(&s, &name, passing_only),
            None if path == "/v1/catalog/services" => Value::Object(
                s.services
                    .iter()
                    .filter(|(_, list)| !list.is_empty())
                    .map(|(name, _)| (name.clone(), json!([])))
                    .collect(),
            ),
            None => Value::Array(
                s.services
                    .iter()
                    .flat_map(|(name, list)| list.iter().map(move |i| (name, i)))
                    .map(|(name, i)| {
                        json!({"Node": format!("node-{}", i.id), "CheckID": format!("service:{}", i.id),
                               "Status": if i.passing { "passing" } else { "critical" }, "ServiceName": name})
                    })
                    .collect(),
            ),
        };
        let mut r = full(StatusCode::OK, body.to_string());
        r.headers_mut().insert("x-consul-index", index.parse().unwrap());
        r
    }

    fn instances(s: &ConsulState, name: &str, passing_only: bool) -> Value {
        let list: Vec<Value> = s
            .services
            .get(name)
            .into_iter()
            .flatten()
            .filter(|i| !passing_only || i.passing)
            .map(|i| {
                json!({
                    "Node": {"Node": format!("node-{}", i.id), "Address": i.node_address, "Datacenter": "dc1"},
                    "Service": {"ID": i.id, "Service": name, "Address": i.address, "Port": i.port, "Tags": [], "Meta": {"version": "1"}, "Weights": {"Passing": 1, "Warning": 1}},
                    "Checks": [{"CheckID": format!("service:{}", i.id), "Status": if i.passing { "passing" } else { "critical" }}],
                })
            })
            .collect();
        Value::Array(list)
    }

    /// Answers 429 to requests past `n` in flight at once, as a Consul agent does past
    /// `limits.http_max_conns_per_client`.
    pub fn limit_connections(&self, n: usize) {
        self.limits.max_conns_per_client.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The most requests that were in flight at once (and allowed).
    pub fn most_in_flight(&self) -> usize {
        self.limits.most.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Services that got a blocking query, among those whose names start with `prefix`.
    pub fn blocking_services(&self, prefix: &str) -> usize {
        self.limits.blocking.lock().unwrap().iter().filter(|s| s.starts_with(prefix)).count()
    }

    /// Requests refused with 429 (`limit_connections`).
    pub fn refused(&self) -> usize {
        self.limits.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Replaces the instances of `service` (a change bumps the index and wakes blocked queries).
    pub fn set(&self, service: &str, instances: Vec<ConsulInstance>) {
        let mut s = self.state.lock().unwrap();
        s.services.insert(service.to_string(), instances);
        s.index += 1;
        drop(s);
        self.changed.notify_waiters();
    }

    /// Stops answering (connections refused).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Comes back on the same port with the same state.
    pub async fn restart(&mut self) {
        let addr = self.server.addr;
        let new = Self::start_on(addr, self.token.as_deref(), self.state.clone(), self.changed.clone()).await;
        *self = new;
    }
}

/// A passing instance at `addr`.
pub fn consul_instance(id: &str, addr: SocketAddr, passing: bool) -> ConsulInstance {
    ConsulInstance {
        id: id.into(),
        node_address: "10.255.0.1".into(),
        address: addr.ip().to_string(),
        port: addr.port(),
        passing,
    }
}

// ------------------------------------------------------------------------------------------
// Eureka

/// One Eureka instance.
#[derive(Clone, Debug)]
pub struct EurekaInstance {
    pub addr: SocketAddr,
    pub status: &'static str,
    pub overridden: Option<&'static str>,
    pub weight: Option<u32>,
}

/// A Eureka server's registry.
pub struct FakeEureka {
    apps: Arc<Mutex<HashMap<String, Vec<EurekaInstance>>>>,
    server: Server,
}

impl FakeEureka {
    pub async fn start(basic_auth: Option<(&str, &str)>) -> FakeEureka {
        let apps: Arc<Mutex<HashMap<String, Vec<EurekaInstance>>>> = Default::default();
        let a = apps.clone();
        let auth = basic_auth.map(|(u, p)| {
            format!("Basic {}", strait_discovery::nacos::base64(format!("{u}:{p}").as_bytes()))
        });
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let (a, auth) = (a.clone(), auth.clone());
            Box::pin(async move {
                if let Some(want) = &auth
                    && req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str())
                {
                    return full(StatusCode::UNAUTHORIZED, "");
                }
                if req.uri().path() != "/eureka/apps" {
                    return full(StatusCode::NOT_FOUND, "");
                }
                let apps = a.lock().unwrap();
                let mut list: Vec<Value> = apps
                    .iter()
                    .map(|(name, insts)| {
                        let insts: Vec<Value> = insts
                            .iter()
                            .map(|i| {
                                let mut v = json!({
                                    "instanceId": format!("{}:{}", i.addr.ip(), i.addr.port()),
                                    "hostName": i.addr.ip().to_string(),
                                    "app": name,
                                    "ipAddr": i.addr.ip().to_string(),
                                    "status": i.status,
                                    "port": {"$": i.addr.port(), "@enabled": "true"},
                                    "securePort": {"$": 443, "@enabled": "false"},
                                    "vipAddress": name.to_lowercase(),
                                    "metadata": {"@class": "java.util.Collections$EmptyMap"},
                                });
                                if let Some(o) = i.overridden {
                                    v["overriddenStatus"] = json!(o);
                                }
                                if let Some(w) = i.weight {
                                    v["metadata"] = json!({"weight": w.to_string()});
                                }
                                v
                            })
                            .collect();
                        // A single instance comes as an object, as real Eureka (XStream) sends it.
                        let instance = if insts.len() == 1 { insts[0].clone() } else { Value::Array(insts) };
                        json!({"name": name, "instance": instance})
                    })
                    .collect();
                list.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
                let application = if list.len() == 1 { list[0].clone() } else { Value::Array(list) };
                full(
                    StatusCode::OK,
                    json!({"applications": {"versions__delta": "1", "apps__hashcode": "UP_1_", "application": application}}).to_string(),
                )
            })
        });
        let server = Server::start("127.0.0.1:0".parse().unwrap(), handler).await;
        FakeEureka { apps, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn set(&self, app: &str, instances: Vec<EurekaInstance>) {
        self.apps.lock().unwrap().insert(app.to_string(), instances);
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}

// ------------------------------------------------------------------------------------------
// Kubernetes

#[derive(Default)]
struct KubeState {
    rv: u64,
    /// "kind/ns/name" -> object
    objects: HashMap<String, Value>,
    /// (rv, event) history, for watches from a resourceVersion.
    history: Vec<(u64, Value)>,
    /// Versions at or below this are expired: watches from them get 410 Gone.
    compacted: u64,
}

/// A Kubernetes API server's Endpoints and EndpointSlices.
pub struct FakeKubernetes {
    state: Arc<Mutex<KubeState>>,
    changed: Arc<Notify>,
    server: Server,
    token: String,
    pub lists: Arc<std::sync::atomic::AtomicUsize>,
}

fn label_matches(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once("!=") {
        Some((k, v)) => obj["metadata"]["labels"][k].as_str() != Some(v),
        None => match term.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k.trim_end_matches('=')].as_str() == Some(v),
            None => obj["metadata"]["labels"].get(term).is_some(),
        },
    })
}

fn field_matches(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
        if let Some(v) = term.strip_prefix("metadata.namespace!=") {
            ns != v
        } else if let Some(v) = term.strip_prefix("metadata.namespace=") {
            ns == v.trim_start_matches('=')
        } else {
            true
        }
    })
}

impl FakeKubernetes {
    pub async fn start(token: &str) -> FakeKubernetes {
        let state: Arc<Mutex<KubeState>> = Default::default();
        state.lock().unwrap().rv = 100;
        let changed = Arc::new(Notify::new());
        let lists = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Self::start_on("127.0.0.1:0".parse().unwrap(), token, state, changed, lists).await
    }

    /// Stops answering (connections refused; open watches end).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Comes back on the same port with the same objects and resourceVersions.
    pub async fn restart(&mut self) {
        let (addr, token) = (self.server.addr, self.token.clone());
        let new =
            Self::start_on(addr, &token, self.state.clone(), self.changed.clone(), self.lists.clone()).await;
        *self = new;
    }

    async fn start_on(
        addr: SocketAddr,
        token: &str,
        state: Arc<Mutex<KubeState>>,
        changed: Arc<Notify>,
        lists: Arc<std::sync::atomic::AtomicUsize>,
    ) -> FakeKubernetes {
        let (st, ch, tok, ls) = (state.clone(), changed.clone(), format!("Bearer {token}"), lists.clone());
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let (st, ch, tok, ls) = (st.clone(), ch.clone(), tok.clone(), ls.clone());
            Box::pin(async move {
                if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(tok.as_str()) {
                    return full(
                        StatusCode::UNAUTHORIZED,
                        json!({"kind": "Status", "code": 401}).to_string(),
                    );
                }
                let kind = match req.uri().path() {
                    "/api/v1/endpoints" => "Endpoints",
                    "/apis/discovery.k8s.io/v1/endpointslices" => "EndpointSlice",
                    _ => return full(StatusCode::NOT_FOUND, ""),
                };
                let q = query_map(req.uri().query());
                let labels = q.get("labelSelector").cloned().unwrap_or_default();
                let fields = q.get("fieldSelector").cloned().unwrap_or_default();
                let keep = move |o: &Value| {
                    o["kind"] == kind && label_matches(o, &labels) && field_matches(o, &fields)
                };
                if q.get("watch").map(String::as_str) != Some("true") {
                    ls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let s = st.lock().unwrap();
                    let items: Vec<Value> = s.objects.values().filter(|o| keep(o)).cloned().collect();
                    let list = json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
                    return full(StatusCode::OK, list.to_string());
                }
                let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                if from < st.lock().unwrap().compacted {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": format!("too old resource version: {from}")});
                    return full(StatusCode::GONE, status.to_string());
                }
                let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
                let (st2, ch2) = (st.clone(), ch.clone());
                tokio::spawn(async move {
                    let mut sent = from;
                    loop {
                        let notified = ch2.notified();
                        let (events, rv, expired) = {
                            let s = st2.lock().unwrap();
                            let ev: Vec<(u64, Value)> = s
                                .history
                                .iter()
                                .filter(|(rv, e)| *rv > sent && keep(&e["object"]))
                                .cloned()
                                .collect();
                            (ev, s.rv, sent < s.compacted)
                        };
                        if expired {
                            let err = json!({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}});
                            let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{err}\n"))))).await;
                            return;
                        }
                        for (rv, e) in events {
                            if tx.send(Ok(Frame::data(Bytes::from(format!("{e}\n"))))).await.is_err() {
                                return;
                            }
                            sent = rv;
                        }
                        if bookmarks && rv > sent {
                            let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}});
                            if tx.send(Ok(Frame::data(Bytes::from(format!("{bm}\n"))))).await.is_err() {
                                return;
                            }
                            sent = rv;
                        }
                        if tokio::time::timeout(Duration::from_secs(2), notified).await.is_err()
                            && tx.is_closed()
                        {
                            return;
                        }
                    }
                });
                let stream =
                    futures_util::stream::unfold(
                        rx,
                        |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                    );
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                r
            })
        });
        let server = Server::start(addr, handler).await;
        FakeKubernetes { state, changed, server, token: token.to_string(), lists }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn apply(&self, kind: &str, ns: &str, name: &str, obj: Option<Value>) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let key = format!("{kind}/{ns}/{name}");
        let event = match obj {
            Some(mut o) => {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                let ty = if s.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
                s.objects.insert(key, o.clone());
                json!({"type": ty, "object": o})
            }
            None => match s.objects.remove(&key) {
                Some(mut o) => {
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    json!({"type": "DELETED", "object": o})
                }
                None => return,
            },
        };
        s.history.push((rv, event));
        drop(s);
        self.changed.notify_waiters();
    }

    /// Sets the Endpoints of `ns/name`: ready and not-ready addresses on one named port.
    #[allow(clippy::too_many_arguments)]
    pub fn set_endpoints(
        &self,
        ns: &str,
        name: &str,
        labels: Value,
        port_name: &str,
        port: u16,
        ready: &[&str],
        not_ready: &[&str],
    ) {
        let addrs = |l: &[&str]| l.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>();
        let obj = json!({
            "kind": "Endpoints", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "subsets": [{"addresses": addrs(ready), "notReadyAddresses": addrs(not_ready), "ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}],
        });
        self.apply("Endpoints", ns, name, Some(obj));
    }

    pub fn delete_endpoints(&self, ns: &str, name: &str) {
        self.apply("Endpoints", ns, name, None);
    }

    /// Sets one EndpointSlice of service `svc`.
    pub fn set_slice(
        &self,
        ns: &str,
        slice: &str,
        svc: &str,
        port_name: &str,
        port: u16,
        endpoints: &[(&str, bool)],
    ) {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
            .collect();
        let obj = json!({
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": slice, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        });
        self.apply("EndpointSlice", ns, slice, Some(obj));
    }

    /// Forgets the history including the current version: open watches end with an `ERROR`
    /// event (410) and watches from any version seen so far get 410 Gone.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv + 1;
        s.history.clear();
        drop(s);
        self.changed.notify_waiters();
    }
}
