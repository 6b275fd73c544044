//! Test support: the gateway started in-process on 127.0.0.1:0, real HTTP backends, real
//! clients, certificates, and waiting on conditions with a deadline (never fixed sleeps).
#![allow(dead_code)]

pub mod certs;
pub mod grpc;
pub mod registries;
pub mod servers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait::{Config, Options, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A minimal config.yaml: one HTTP listener and the control API on ephemeral ports.
pub const BASE_CONFIG: &str = "apisix:
  node_listen:
    - ip: 127.0.0.1
      port: 0
  control:
    ip: 127.0.0.1
    port: 0
nginx_config:
  http:
    client_header_timeout: 2s
    client_body_timeout: 2s
deployment:
  role: data_plane
  role_data_plane:
    config_provider: yaml
";

/// A gateway running in this process.
pub struct TestGateway {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts with [`BASE_CONFIG`] and these resources (`#END` is appended).
    pub fn start(resources: &str) -> TestGateway {
        Self::start_with(BASE_CONFIG, resources, 2)
    }

    /// Starts with a full config.yaml and resources.
    pub fn start_with(config: &str, resources: &str, workers: usize) -> TestGateway {
        Self::try_start(config, resources, workers).unwrap_or_else(|e| panic!("gateway failed to start: {e}"))
    }

    pub fn try_start(config: &str, resources: &str, workers: usize) -> Result<TestGateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("config.yaml"), config).map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("apisix.yaml"), format!("{resources}\n#END\n"))
            .map_err(|e| e.to_string())?;
        let cfg = Config::load(&dir.path().join("config.yaml")).map_err(|e| e.to_string())?;
        let opts = Options {
            workers,
            drain_timeout: Duration::from_secs(5),
            reload_interval: Duration::from_millis(100),
        };
        let running = Running::start(cfg, opts).map_err(|e| e.to_string())?;
        Ok(TestGateway { running: Some(running), dir })
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }
    pub fn http(&self) -> SocketAddr {
        self.running().addrs.http[0]
    }
    pub fn tls(&self) -> SocketAddr {
        self.running().addrs.tls[0]
    }
    pub fn stream(&self, i: usize) -> SocketAddr {
        self.running().addrs.stream[i]
    }
    pub fn control(&self) -> SocketAddr {
        self.running().addrs.control.expect("control API")
    }
    pub fn resources_path(&self) -> PathBuf {
        self.dir.path().join("apisix.yaml")
    }

    /// Rewrites apisix.yaml (the reload watcher picks it up).
    pub fn write_resources(&self, resources: &str) {
        let tmp = self.dir.path().join("apisix.yaml.tmp");
        std::fs::write(&tmp, format!("{resources}\n#END\n")).expect("write");
        std::fs::rename(&tmp, self.resources_path()).expect("rename");
    }

    /// The config version currently served.
    pub fn version(&self) -> u64 {
        self.running().shared.state.load().version
    }

    /// GETs a control API path and parses the JSON.
    pub async fn control_json(&self, path: &str) -> serde_json::Value {
        let (status, _, body) = get(self.control(), path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("json")
    }

    /// Stops and drains.
    pub fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------------------------
// HTTP backends

/// Counters and switches of a backend.
#[derive(Default)]
pub struct BackendState {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    /// When non-zero, every request (health checks included) gets this status.
    pub force_status: AtomicU16,
    /// When non-zero, `/healthz` alone answers this status (other paths are unaffected).
    pub health_status: AtomicU16,
    /// Milliseconds every request waits before it is answered.
    pub delay_ms: AtomicU64,
    /// Headers of the last request.
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_uri: Mutex<Option<String>>,
}

/// A real HTTP/1.1 + h2c server on 127.0.0.1:0.
///
/// Paths: `/status/N`, `/delay/MS`, `/size/N`, `/echo` (streams the body back),
/// `/slow-body` (one chunk, 300 ms pause, another), `/drop` (reads the body, then closes the
/// connection without answering), `/ws` (WebSocket-style upgrade, then echoes bytes),
/// `/healthz`; anything else answers `{"backend": name, ...}` with the request's headers.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub state: Arc<BackendState>,
    task: JoinHandle<()>,
    /// Closes every open connection when set.
    kill: tokio::sync::watch::Sender<bool>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener, name).await
    }

    /// Starts on a specific address (to bring a node back on the same port).
    pub async fn start_on(addr: SocketAddr, name: &str) -> Backend {
        let listener = bind_retry(addr).await;
        Self::serve(listener, name).await
    }

    /// A TLS backend with `leaf`; with `client_ca` it requires a client certificate signed by it.
    /// `alpn` lists the protocols it offers (`h2` makes it an HTTP/2 server).
    pub async fn start_tls(
        name: &str,
        leaf: &certs::Leaf,
        client_ca: Option<&str>,
        alpn: &[&[u8]],
    ) -> Backend {
        use std::sync::Arc as A;
        let provider = A::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in strait_protocols::tls::parse_certs(ca).unwrap() {
                    roots.add(c).unwrap();
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(A::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder
            .with_single_cert(
                strait_protocols::tls::parse_certs(&leaf.cert).unwrap(),
                strait_protocols::tls::parse_key(&leaf.key).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(A::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::spawn(listener, name, Some(acceptor))
    }

    async fn serve(listener: TcpListener, name: &str) -> Backend {
        Self::spawn(listener, name, None)
    }

    fn spawn(listener: TcpListener, name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(BackendState::default());
        let (st, nm) = (state.clone(), name.to_string());
        let (kill, killed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, nm, tls) = (st.clone(), nm.clone(), tls.clone());
                let mut killed = killed.clone();
                tokio::spawn(async move {
                    let counter = st.clone();
                    let svc = service_fn(move |req| {
                        let (st, nm) = (st.clone(), nm.clone());
                        async move { backend_handle(req, &st, &nm).await }
                    });
                    let st = counter;
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            st.connections.fetch_add(1, Ordering::Relaxed);
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = killed.wait_for(|k| *k) => {}
                            }
                        }
                        None => {
                            st.connections.fetch_add(1, Ordering::Relaxed);
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = killed.wait_for(|k| *k) => {}
                            }
                        }
                    }
                });
            }
        });
        Backend { addr, name: name.to_string(), state, task, kill }
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Stops listening and closes open connections (new ones are refused from now on).
    pub fn stop(self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }
}

/// Binds `addr`, retrying while the old socket is still going away.
pub async fn bind_retry(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn backend_handle(
    mut req: Request<Incoming>,
    st: &BackendState,
    name: &str,
) -> Result<Response<Body>, std::io::Error> {
    st.requests.fetch_add(1, Ordering::Relaxed);
    *st.last_headers.lock().unwrap() = Some(req.headers().clone());
    *st.last_uri.lock().unwrap() = Some(req.uri().to_string());
    let forced = st.force_status.load(Ordering::Relaxed);
    if forced != 0 {
        let mut r = Response::new(full(format!("forced {forced}")));
        *r.status_mut() = StatusCode::from_u16(forced).unwrap();
        r.headers_mut().insert("x-backend", name.parse().unwrap());
        return Ok(r);
    }
    let delay = st.delay_ms.load(Ordering::Relaxed);
    if delay != 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let path = req.uri().path().to_string();
    let seg: Vec<&str> = path.split('/').collect();
    let health = st.health_status.load(Ordering::Relaxed);
    let mut resp = match seg.as_slice() {
        ["", "healthz"] if health != 0 => {
            let mut r = Response::new(full(format!("health {health}")));
            *r.status_mut() = StatusCode::from_u16(health).unwrap();
            r
        }
        ["", "healthz"] => Response::new(full("ok")),
        ["", "status", code] => {
            let mut r = Response::new(full(format!("status {code}")));
            *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            r
        }
        ["", "delay", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            Response::new(full(format!("{name} after {ms}ms")))
        }
        ["", "size", n] => Response::new(full(vec![b'x'; n.parse().unwrap_or(0)])),
        ["", "sink"] => {
            // Reads the whole body, then answers with its length (as nginx does for a body it
            // does not want).
            let n = req.into_body().collect().await.map(|c| c.to_bytes().len()).unwrap_or(0);
            Response::new(full(n.to_string()))
        }
        ["", "echo"] => {
            let body = req.into_body().map_err(std::io::Error::other).boxed();
            Response::new(body)
        }
        ["", "slow-body"] => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first;")))).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"second")))).await;
            });
            let stream = tokio_stream_from(rx);
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        ["", "drop"] => {
            let _ = req.into_body().collect().await;
            return Err(std::io::Error::other("dropping the connection on purpose"));
        }
        ["", "ws"] => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "websocket".parse().unwrap());
            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
            return Ok(r);
        }
        _ => {
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let body = serde_json::json!({
                "backend": name,
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            Response::new(full(body.to_string()))
        }
    };
    resp.headers_mut().insert("x-backend", name.parse().unwrap());
    Ok(resp)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A TCP server that answers every connection with `reply` and closes.
pub async fn garbage_server(reply: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, t)
}

/// A free port, for a server started outside this process to bind (it may be taken in between:
/// callers that start such a server retry).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A port with nothing listening on it, for a node that refuses connections.
pub fn closed_port() -> SocketAddr {
    // Bound but never listening: a connect is refused, and the port stays taken for the rest of
    // the test process (the socket is leaked on purpose). A port bound and released at once could
    // be taken by another test's listener running in parallel, which then answers instead.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(s);
    addr
}

// ------------------------------------------------------------------------------------------
// Clients

/// One HTTP/1.1 request on a fresh connection: (status, headers, body).
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    (parts.status, parts.headers, body)
}

/// GET `path` with Host `localhost`.
pub async fn get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    get_host(addr, path, "localhost").await
}

/// GET `path` with a Host header.
pub async fn get_host(addr: SocketAddr, path: &str, host: &str) -> (StatusCode, HeaderMap, Bytes) {
    let req = Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
    send(addr, req).await
}

/// One request over HTTP/2 cleartext with prior knowledge.
pub async fn send_h2(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes, Option<HeaderMap>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    (parts.status, parts.headers, collected.to_bytes(), trailers)
}

/// Body JSON of a default backend answer.
pub fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Runs curl with `args`; returns (exit ok, stdout, stderr).
pub async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl must be installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes raw bytes on a fresh connection and reads until the peer closes or `timeout`.
pub async fn raw(addr: SocketAddr, data: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    out
}

/// The health status the control API shows for the node of `upstream` on `port` (empty when
/// it has none).
pub async fn node_status(gw: &TestGateway, upstream: &str, port: u16) -> String {
    let j = gw.control_json(&format!("/v1/healthcheck/upstreams/{upstream}")).await;
    j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["port"] == port)
        .map(|n| n["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Writes raw bytes on a fresh connection, half-closes it (the gateway answers what it got and
/// closes), and reads until the gateway closes (at most 10 s).
pub async fn raw_once(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// Upstream YAML with map-form nodes.
pub fn nodes_yaml(addrs: &[SocketAddr]) -> String {
    let inner: Vec<String> = addrs.iter().map(|a| format!("\"{a}\": 1")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// A hand-written node on an ephemeral loopback port: `serve` runs on each connection it
/// accepts, in a task of its own.
pub async fn hand_node<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// [`hand_node`] over TLS: each connection is served by `serve` once `acceptor`'s handshake
/// is done (connections whose handshake fails are dropped).
pub async fn hand_tls_node<F, Fut>(acceptor: tokio_rustls::TlsAcceptor, serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

/// A listener on 127.0.0.1:0 whose connections take little at a time: a small segment size (on
/// loopback it is 64 KiB) and receive buffer, set before listening so accepted connections keep
/// them. What a peer sends beyond a few KiB stays in the peer's socket until it is read.
pub fn narrow_listener() -> TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_tcp_mss(536).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    socket.listen(16).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

// ------------------------------------------------------------------------------------------
// Randomized tests

/// Counts the panics of this test process from the first call on (each is still printed): a
/// randomized test asserts that none happened, also in the gateway's tasks, whose panics would
/// not reach it (a release build aborts on any).
pub fn count_panics() -> &'static AtomicUsize {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default_hook(info);
        }));
    });
    &PANICS
}

/// How many rounds a randomized test runs: `default` (what CI runs), or `STRAIT_MANGLE_ROUNDS`.
pub fn mangle_rounds(default: usize) -> usize {
    std::env::var("STRAIT_MANGLE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Opens a connection per `(address, bytes)`, 50 at a time, writes the bytes (then half-closes
/// when `half_close`), and asserts that the gateway ends every connection (EOF or reset) within
/// `limit`, naming the session and its bytes when one stays open.
pub async fn each_session_ends(sessions: Vec<(SocketAddr, Vec<u8>)>, half_close: bool, limit: Duration) {
    let mut running = tokio::task::JoinSet::new();
    let total = sessions.len();
    for (i, (addr, bytes)) in sessions.into_iter().enumerate() {
        running.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&bytes).await;
            if half_close {
                let _ = s.shutdown().await;
            }
            let mut got = Vec::new();
            let ended = tokio::time::timeout(limit, s.read_to_end(&mut got)).await.is_ok();
            (i, ended, bytes)
        });
        if running.len() == 50 || i + 1 == total {
            while let Some(done) = running.join_next().await {
                let (i, ended, bytes) = done.unwrap();
                assert!(
                    ended,
                    "session {i}: still open after {limit:?}: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    }
}

/// xorshift64: the same sequence for a seed, everywhere.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `seed` with one to four mutations: bytes replaced (often by a delimiter or a digit), bytes
/// inserted, a range cut out or repeated, the end cut off, a number made huge or negative, or a
/// multi-byte UTF-8 character written over bytes in place (so that binary lengths still hold:
/// text that is valid UTF-8 but not ASCII, which byte-counting code cuts wrongly).
pub fn mangle(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    const SPECIAL: &[u8] = b"\r\n: \t0123456789;-\0\xff";
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(8) {
            0 if at < v.len() => v[at] = SPECIAL[rng.below(SPECIAL.len())],
            7 => {
                let c = ["\u{e9}", "\u{20ac}", "\u{1d11e}"][rng.below(3)].as_bytes();
                if at + c.len() <= v.len() {
                    v[at..at + c.len()].copy_from_slice(c);
                } else {
                    v.splice(at..at, c.iter().copied());
                }
            }
            1 if at < v.len() => v[at] = rng.next() as u8,
            2 => {
                let b = SPECIAL[rng.below(SPECIAL.len())];
                v.insert(at, b);
            }
            3 if at < v.len() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at..end);
            }
            4 if at < v.len() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                let piece = v[at..end].to_vec();
                v.splice(at..at, piece);
            }
            5 => v.truncate(at),
            _ => {
                // A digit run (a length, a chunk size, a status, a version) made extreme.
                if let Some(start) = (at..v.len()).find(|&i| v[i].is_ascii_digit()) {
                    let end = (start..v.len()).find(|&i| !v[i].is_ascii_digit()).unwrap_or(v.len());
                    let extreme: &[u8] =
                        [&b"99999999999999999999"[..], b"18446744073709551616", b"-1", b"0"][rng.below(4)];
                    v.splice(start..end, extreme.iter().copied());
                }
            }
        }
    }
    v
}

/// For hand-written nodes: reads until the end of a request head; false if the client left.
pub async fn read_request_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    request_head_bytes(s).await.is_some()
}

/// For hand-written nodes: reads until the end of a request head and returns what was read (the
/// head, and whatever came with it); `None` if the client left first.
pub async fn request_head_bytes<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(n @ 1..) => head.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
    Some(head)
}
