//! Listeners, workers and the HTTP service.
//!
//! Each worker is a thread with its own single-threaded tokio runtime and its own listening
//! sockets (`SO_REUSEPORT`, so the kernel spreads connections), its own connection pools, and no
//! shared locks on the request path. A separate background runtime runs the control API, config
//! reloads, node sources and health probes.
//!
//! SIGTERM (or [`Running::shutdown`]) drains: listeners close, idle keep-alive connections are
//! told to finish, in-flight requests and open tunnels (upgrades such as WebSocket) complete up
//! to the drain deadline, then the process exits.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Socket, Type};
use strait_protocols::SendTimeout;
use strait_protocols::http::{ForwardCtx, ForwardTrust, forward};
use strait_protocols::respond::error_response;
use strait_protocols::{ProxyBody, ProxyError, grpc};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::gateway::{Addresses, Shared, StateCerts, TlsKind, accept_tls};
use crate::route::RequestView;
use strait_protocols::tls::CertStore;

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads (default: number of cores).
    pub workers: usize,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How often `apisix.yaml` is checked for changes.
    pub reload_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            drain_timeout: Duration::from_secs(30),
            reload_interval: Duration::from_millis(500),
        }
    }
}

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, io::Error),
    #[error("{0}")]
    Setup(String),
}

/// What kind of traffic a listener takes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `proxy_protocol`: each connection starts with a PROXY protocol header.
    Http {
        http2: bool,
        proxy_protocol: bool,
    },
    Tls {
        http2: bool,
        proxy_protocol: bool,
    },
    Stream {
        index: usize,
    },
}

struct Listener {
    kind: Kind,
    socket: std::net::TcpListener,
}

/// Tracks live connections of a worker so a drain can wait for them, and tells the HTTP
/// connections when the worker stops.
pub(crate) struct ConnTracker {
    active: AtomicUsize,
    idle: Notify,
    stopping: AtomicBool,
    stop: Notify,
    /// `nginx_config.event.worker_connections`: at this many live connections the worker's
    /// accept loops wait (new connections stay in the kernel's backlog), as nginx stops
    /// accepting when its connections run out.
    limit: usize,
    /// Told when a connection ends with the worker at its limit.
    freed: Notify,
}

/// A live connection, counted until it is dropped; it also lends the connection the worker's
/// stop signal.
pub(crate) struct ConnGuard(Arc<ConnTracker>, Arc<Shared>);

impl ConnTracker {
    fn new(limit: usize) -> ConnTracker {
        ConnTracker {
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            limit,
            freed: Notify::new(),
        }
    }

    /// Completes once the worker has room for another connection (at once when it has).
    async fn room(&self) {
        loop {
            let mut freed = std::pin::pin!(self.freed.notified());
            // Listed as a waiter before the count is read: a close between the two still wakes it.
            freed.as_mut().enable();
            if self.active.load(Ordering::Relaxed) < self.limit {
                return;
            }
            freed.await;
        }
    }

    pub(crate) fn enter(self: &Arc<Self>, shared: &Arc<Shared>) -> ConnGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        shared.metrics.connections_active.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone(), shared.clone())
    }

    /// Tells every connection of the worker, and those that ask later, that it stops.
    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Completes once the worker stops. Every HTTP connection waits for it, so it is small: 96
    /// bytes, where a wait on the `watch` channel the accept loops use takes 160 and its
    /// receiver 16 more.
    async fn stopped(&self) {
        let mut notified = std::pin::pin!(self.stop.notified());
        // Listed as a waiter before the flag is read: a stop between the two still wakes it.
        notified.as_mut().enable();
        if self.is_stopping() {
            return;
        }
        notified.await;
    }
}

impl ConnGuard {
    /// Another guard for the same connection, for a task that takes it over (the count goes
    /// back down when this one is dropped).
    fn again(&self) -> ConnGuard {
        self.0.enter(&self.1)
    }
}

impl std::ops::Deref for ConnGuard {
    type Target = ConnTracker;
    fn deref(&self) -> &ConnTracker {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.1.metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
        let was = self.0.active.fetch_sub(1, Ordering::Relaxed);
        if was == 1 {
            self.0.idle.notify_waiters();
        }
        if was >= self.0.limit {
            self.0.freed.notify_waiters();
        }
    }
}

/// A running gateway.
pub struct Running {
    pub shared: Arc<Shared>,
    pub addrs: Addresses,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    background: Option<tokio::runtime::Runtime>,
}

fn bind_one(addr: SocketAddr, keepalive: bool) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Inherited by every accepted socket (on Linux), so connections need no setsockopt of
    // their own: no delay, and on L4 listeners the sessions' TCP keepalive.
    s.set_tcp_nodelay(true)?;
    if keepalive {
        s.set_tcp_keepalive(&strait_protocols::stream::session_keepalive())?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Binds `n` sockets on `addr` (the first one picks the port when it is 0).
fn bind_group(
    addr: SocketAddr,
    n: usize,
    keepalive: bool,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), StartError> {
    let first = bind_one(addr, keepalive).map_err(|e| StartError::Bind(addr, e))?;
    let actual = first.local_addr().map_err(|e| StartError::Bind(addr, e))?;
    let mut v = vec![first];
    for _ in 1..n {
        v.push(bind_one(actual, keepalive).map_err(|e| StartError::Bind(actual, e))?);
    }
    Ok((actual, v))
}

impl Running {
    /// Binds every listener and starts workers and background tasks.
    pub fn start(config: Config, opts: Options) -> Result<Running, StartError> {
        let workers = opts.workers.max(1);
        let background = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("strait-bg")
            .enable_all()
            .build()
            .map_err(|e| StartError::Setup(format!("background runtime: {e}")))?;
        let control = config.node.control;
        let shared = {
            let _g = background.enter();
            Shared::new(config, background.handle().clone()).map_err(StartError::Setup)?
        };

        // Bind everything before starting anything, so a busy port fails the start cleanly.
        let mut addrs = Addresses::default();
        let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
        let mut add = |kind: Kind, addr: SocketAddr| -> Result<SocketAddr, StartError> {
            let (actual, socks) = bind_group(addr, workers, matches!(kind, Kind::Stream { .. }))?;
            for (w, socket) in socks.into_iter().enumerate() {
                per_worker[w].push(Listener { kind, socket });
            }
            Ok(actual)
        };
        for l in &shared.node.http {
            addrs.http.push(add(Kind::Http { http2: l.http2, proxy_protocol: l.proxy_protocol }, l.addr)?);
        }
        for l in &shared.node.tls {
            addrs.tls.push(add(Kind::Tls { http2: l.http2, proxy_protocol: l.proxy_protocol }, l.addr)?);
        }
        for (i, l) in shared.node.stream.iter().enumerate() {
            addrs.stream.push(add(Kind::Stream { index: i }, l.addr)?);
        }

        if let Some(addr) = control {
            let bound = std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l));
            match bound {
                Ok(l) => {
                    addrs.control = l.local_addr().ok();
                    let shared = shared.clone();
                    background.spawn(async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => crate::admin::serve(l, shared).await,
                            Err(e) => tracing::error!(error = %e, "cannot start the control API"),
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot start the control API; continuing without it")
                }
            }
        }
        background.spawn(shared.clone().watch_resources(opts.reload_interval));

        let (shutdown, _) = watch::channel(false);
        let mut threads = Vec::new();
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let shared = shared.clone();
            let rx = shutdown.subscribe();
            let drain = opts.drain_timeout;
            let t = std::thread::Builder::new()
                .name(format!("strait-w{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start worker runtime");
                            return;
                        }
                    };
                    rt.block_on(worker(listeners, shared, rx, drain));
                })
                .map_err(|e| StartError::Setup(format!("worker thread: {e}")))?;
            threads.push(t);
        }
        tracing::info!(
            http = ?addrs.http,
            tls = ?addrs.tls,
            stream = ?addrs.stream,
            control = ?addrs.control,
            workers,
            "strait is serving"
        );
        Ok(Running { shared, addrs, shutdown, workers: threads, background: Some(background) })
    }

    /// Stops accepting, drains in-flight requests (up to the drain timeout) and stops.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        if let Some(bg) = self.background.take() {
            self.shared.state.load().upstreams.values().for_each(|u| u.stop());
            bg.shutdown_background();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn worker(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let tracker = Arc::new(ConnTracker::new(shared.node.worker_connections));
    let tls = match strait_protocols::tls::server_config(
        Arc::new(StateCerts(shared.state.clone(), shared.node.ssl_protocols)),
        &[b"h2", b"http/1.1", b"http/1.0"],
        shared.node.ssl_protocols,
        shared.http_sessions.clone(),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "TLS setup failed");
            return;
        }
    };
    let tls_h1 = match strait_protocols::tls::server_config(
        Arc::new(StateCerts(shared.state.clone(), shared.node.ssl_protocols)),
        &[b"http/1.1", b"http/1.0"],
        shared.node.ssl_protocols,
        shared.http_sessions.clone(),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "TLS setup failed");
            return;
        }
    };
    let protocols = HttpProtocols::new(
        shared.node.client_header_timeout,
        shared.node.keepalive_timeout,
        shared.node.send_timeout,
    );
    let mut accepts = Vec::new();
    for l in listeners {
        let listener = match TcpListener::from_std(l.socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot register listener");
                continue;
            }
        };
        let acceptor = match l.kind {
            Kind::Tls { http2: true, .. } => Some(TlsAcceptor::from(tls.clone())),
            Kind::Tls { http2: false, .. } => Some(TlsAcceptor::from(tls_h1.clone())),
            _ => None,
        };
        accepts.push(tokio::spawn(accept_loop(
            listener,
            l.kind,
            acceptor,
            protocols.clone(),
            shared.clone(),
            tracker.clone(),
            shutdown.clone(),
        )));
    }
    tokio::spawn(async {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            strait_protocols::pool::sweep();
            strait_protocols::h1::sweep(Duration::from_secs(60));
        }
    });
    let _ = shutdown.wait_for(|s| *s).await;
    tracker.stop();
    for a in accepts {
        let _ = a.await;
    }
    // Drain: wait for connections to finish, up to the deadline.
    let deadline = tokio::time::sleep(drain);
    tokio::pin!(deadline);
    loop {
        let idle = tracker.idle.notified();
        if tracker.active.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::select! {
            _ = idle => {}
            _ = &mut deadline => {
                tracing::warn!(open = tracker.active.load(Ordering::Relaxed), "drain deadline reached; closing remaining connections");
                break;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// After a failed accept (out of file descriptors and similar): logs it and waits a moment
/// for descriptors to be freed, instead of spinning.
pub(crate) async fn accept_failed(what: &str, e: &io::Error) {
    tracing::warn!(listener = what, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    tls: Option<TlsAcceptor>,
    protocols: Arc<HttpProtocols>,
    shared: Arc<Shared>,
    tracker: Arc<ConnTracker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    // When the worker last said it was full (at most every 10 s, per port).
    let mut full_logged: Option<std::time::Instant> = None;
    loop {
        if tracker.active.load(Ordering::Relaxed) >= tracker.limit {
            if full_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                // nginx's "worker_connections are not enough".
                tracing::warn!(
                    limit = tracker.limit,
                    "worker_connections are not enough; accepting again once connections close"
                );
                full_logged = Some(std::time::Instant::now());
            }
            tokio::select! {
                () = tracker.room() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                accept_failed("listener", &e).await;
                continue;
            }
        };
        // TCP_NODELAY is set on the listener, and Linux gives it to every accepted socket: no
        // setsockopt per connection.
        // A listener bound to one address accepts only on it: no getsockname per connection.
        let local = match local {
            Some(l) if !l.ip().is_unspecified() => l,
            _ => stream.local_addr().ok().or(local).unwrap_or(peer),
        };
        let guard = tracker.enter(&shared);
        let shared = shared.clone();
        if let Kind::Http { proxy_protocol: true, .. } | Kind::Tls { proxy_protocol: true, .. } = kind {
            // The PROXY header first (within client_header_timeout), then as on any port. Its
            // source is the client when `real_ip_header` is `proxy_protocol` and the peer is
            // trusted (nginx's realip module), else the peer stays the client.
            let (tls, protocols) = (tls.clone(), protocols.clone());
            // One client_header_timeout from the accept for the header and the first request.
            let deadline = tokio::time::Instant::now() + shared.node.client_header_timeout;
            tokio::spawn(async move {
                let mut stream = stream;
                let header = strait_protocols::stream::read_proxy_header(&mut stream);
                let read = tokio::select! {
                    r = tokio::time::timeout_at(deadline, header) => r,
                    // A stop closes a connection that has sent nothing yet, as on other ports.
                    () = guard.stopped() => return,
                };
                match read {
                    Ok(Ok(h)) => {
                        let real = shared.node.real_ip.as_ref();
                        let client = crate::route::ip::RealIp::proxy_protocol_client(real, peer, h.source);
                        dispatch(
                            stream,
                            client,
                            Some(peer.ip()),
                            local,
                            kind,
                            Some(deadline),
                            &tls,
                            &protocols,
                            shared,
                            guard,
                        );
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "bad PROXY protocol header; closing"),
                    Err(_) => tracing::debug!(%peer, "no PROXY protocol header in time; closing"),
                }
            });
            continue;
        }
        dispatch(stream, peer, None, local, kind, None, &tls, &protocols, shared, guard);
    }
}

/// Starts serving one accepted connection (a task of its own) from client `peer`. `hop`: the
/// TCP peer, when a PROXY header named another client (it is the one `trusted_addresses` is
/// checked against). `deadline`: when its first request head (and TLS handshake) must be in,
/// if already set (else `client_header_timeout` from now).
#[allow(clippy::too_many_arguments)]
fn dispatch(
    stream: TcpStream,
    peer: SocketAddr,
    hop: Option<std::net::IpAddr>,
    local: SocketAddr,
    kind: Kind,
    deadline: Option<tokio::time::Instant>,
    tls: &Option<TlsAcceptor>,
    protocols: &Arc<HttpProtocols>,
    shared: Arc<Shared>,
    guard: ConnGuard,
) {
    let trust = Trust::of(&shared.node, hop.unwrap_or(peer.ip()));
    match kind {
        Kind::Http { http2, .. } => {
            // One client_header_timeout from the accept for the first request head, however
            // long telling the protocol apart takes.
            let deadline =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + shared.node.client_header_timeout);
            // The task is the future as it is: one wrapping it would hold its arguments
            // twice, as what it captured and inside what it awaits. An h2c connection gets a
            // task of its own once its preface is read ([`serve_h1`]).
            let first = First { deadline, h2c: http2, trust };
            tokio::spawn(serve_h1(stream, first, peer, local, shared, protocols.clone(), guard));
        }
        Kind::Tls { http2, .. } => {
            let (acceptor, protocols) = (tls.clone(), protocols.clone());
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else { return };
                // The handshake and the first request head share one client_header_timeout,
                // counted from the accept.
                let deadline = deadline
                    .unwrap_or_else(|| tokio::time::Instant::now() + shared.node.client_header_timeout);
                // Boxed: the handshake's state is freed once it is done, instead of being
                // part of the task of every idle connection. So is the TLS state: the task
                // holds a pointer to it, and the general path takes that pointer.
                let state = shared.state.clone();
                let kind = if http2 { TlsKind::H2 } else { TlsKind::H1 };
                let hs = Box::pin(async move {
                    let accept = accept_tls(stream, &acceptor, &state, kind);
                    let tls = tokio::time::timeout_at(deadline, accept).await;
                    tls.map(|r| r.map(Box::new))
                })
                .await;
                match hs {
                    Ok(Ok(tls)) => {
                        if http2 && tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            // A task of its own, sized for the HTTP/2 state, as for h2c.
                            let ctx = ConnCtx::new(shared, peer, local, true, trust).with_tls(&tls);
                            tokio::spawn(serve_h2(tls, ctx, protocols, guard));
                        } else {
                            // A task of its own too, sized for the HTTP/1.1 relay: awaited
                            // here, it would sit beside what this one captured. As on plain
                            // connections, an idle connection keeps its TLS state, and the
                            // state of a request only while it is in flight.
                            let first = First { deadline, h2c: false, trust };
                            tokio::spawn(serve_h1(tls, first, peer, local, shared, protocols, guard));
                        }
                        return;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(guard);
            });
        }
        Kind::Stream { index } => {
            // The task is the future as it is, as for HTTP/1.1 above.
            tokio::spawn(crate::stream::serve(stream, peer, local, index, shared, guard));
        }
    }
}

/// Per-connection facts the HTTP service needs.
struct ConnCtx {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    /// The SNI of a TLS connection's handshake, for the client certificate rules of
    /// [`strait_protocols::tls::CertStore::request_allowed`].
    sni: Option<Box<str>>,
    /// Whether the client presented a verified certificate.
    client_verified: bool,
    /// `X-Real-IP` / `X-Forwarded-Port` values, computed once per connection.
    client_ip: http::HeaderValue,
    local_port_value: http::HeaderValue,
    trust: Trust,
}

/// What a connection's TCP peer is trusted with, judged once per connection (APISIX judges
/// `realip_remote_addr`, the peer before any realip).
#[derive(Clone, Copy)]
struct Trust {
    /// What the client's forwarding headers are worth (`apisix.trusted_addresses`).
    forward: ForwardTrust,
    /// Whether its requests may name their client (`nginx_config.http.real_ip_from`).
    names_client: bool,
}

impl Trust {
    fn of(node: &crate::config::NodeConfig, peer: std::net::IpAddr) -> Trust {
        Trust {
            forward: node.forward_trust(peer),
            names_client: node.real_ip.as_ref().is_some_and(|r| r.trusts(peer)),
        }
    }
}

impl ConnCtx {
    fn new(shared: Arc<Shared>, peer: SocketAddr, local: SocketAddr, tls: bool, trust: Trust) -> ConnCtx {
        let (client_ip, local_port_value) = strait_protocols::http::connection_values(peer, local.port());
        ConnCtx {
            shared,
            peer,
            local,
            tls,
            sni: None,
            client_verified: false,
            client_ip,
            local_port_value,
            trust,
        }
    }

    /// With what the TLS handshake said of the client. Kept whether or not some `ssls` entry
    /// asks for client certificates now: one may by a later request, after a reload.
    fn with_tls<S: ClientStream>(mut self, stream: &S) -> ConnCtx {
        self.sni = stream.sni().map(Box::from);
        self.client_verified = stream.client_verified();
        self
    }
}

/// HTTP/1.1 and HTTP/2 server settings of a worker, built once and shared by its connections.
pub(crate) struct HttpProtocols {
    h1: hyper::server::conn::http1::Builder,
    h2: strait_protocols::h2s::Settings,
}

impl HttpProtocols {
    fn new(header_timeout: Duration, idle_timeout: Duration, send_timeout: Duration) -> Arc<Self> {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(64 * 1024)
            .max_header_size(32 * 1024)
            .writev(true)
            // A client that half-closes after its request (`printf ... | nc -N`) still gets
            // the answer, as on the relay; hyper otherwise ends the connection at the EOF.
            .half_close(true)
            .keep_alive(true);
        let h2 = strait_protocols::h2s::Settings::new(idle_timeout, send_timeout);
        Arc::new(HttpProtocols { h1, h2 })
    }
}

/// Which HTTP version a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

use strait_protocols::h2s::PREFACE as H2_PREFACE;

/// Tells h2c prior knowledge from HTTP/1.1 by reading the first bytes (at most the preface;
/// without `h2c`, the first read, into a head buffer, as HTTP/1.1); they are returned, to be
/// served first. Nothing is allocated until the client sends something. `None` when the client closes.
/// The caller times it, with the timer of the first request head.
async fn sniff(stream: &mut TcpStream, h2c: bool) -> Option<(Proto, bytes::BytesMut)> {
    if !h2c {
        // HTTP/1.1 only: the first read goes straight into a head buffer, taken once there is
        // something to read.
        loop {
            std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await.ok()?;
            let mut buf = strait_protocols::spare::head_buf();
            match stream.try_read_buf(&mut buf) {
                Ok(1..) => return Some((Proto::H1, buf)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    strait_protocols::spare::give_head(buf);
                }
                _ => {
                    strait_protocols::spare::give_head(buf);
                    return None;
                }
            }
        }
    }
    // At most the preface's length: the rest of the request is read by whoever serves it.
    let mut head = [0u8; H2_PREFACE.len()];
    let mut have = 0;
    loop {
        // Readiness polled, not awaited with `readable()`: no waiter of its own in this future,
        // which is part of every connection's.
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await.ok()?;
        match stream.try_read(&mut head[have..]) {
            Ok(0) => return None,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
        if head[..have] != H2_PREFACE[..have] {
            return Some((Proto::H1, bytes::BytesMut::from(&head[..have])));
        }
        if have == H2_PREFACE.len() {
            return Some((Proto::H2, bytes::BytesMut::from(&head[..have])));
        }
        // A prefix of the preface so far: read on.
    }
}

/// Serves an HTTP/1.1 connection through hyper's server (the general path): what the relay of
/// [`serve_h1`] hands over. Boxed by the caller, so a connection that has not spoken yet costs
/// only a pointer to it.
async fn serve_http<IO>(io: IO, conn: ConnCtx, protocols: Arc<HttpProtocols>, guard: &ConnGuard)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A client that stops reading is cut off after `send_timeout` without progress.
    let io = SendTimeout::new(io, conn.shared.node.send_timeout);
    let peer = conn.peer;
    // A connection that becomes a tunnel (an upgrade) outlives this function and the guard its
    // caller holds: the tunnel takes a guard of its own from the worker's tracker, so a drain
    // waits for it too.
    let ctx = Arc::new((conn, guard.0.clone()));
    let svc = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        // hyper's HTTP/1 dispatcher keeps the allocation that holds the in-flight service
        // future for the life of the connection. The request's state (a few KiB) therefore
        // lives in a box of its own, freed when the request ends, so an idle keep-alive
        // connection does not keep it.
        let fut = Box::pin(async move {
            let (conn, tracker) = &*ctx;
            let hold = || -> Box<dyn std::any::Any + Send> { Box::new(tracker.enter(&conn.shared)) };
            let hold = strait_protocols::http::TunnelHold(&hold);
            handle(req.map(ProxyBody::Incoming), conn, Some(hold)).await
        });
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut conn = Box::pin(protocols.h1.serve_connection(TokioIo::new(io), svc).with_upgrades());
    let done = tokio::select! {
        res = conn.as_mut() => Some(res),
        _ = guard.stopped() => None,
    };
    let result = match done {
        Some(res) => res,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Serves an HTTP/2 connection (h2c with prior knowledge, or TLS with ALPN `h2`) with Strait's
/// HTTP/2 server. The caller spawns the returned future as a task of its own, and that task's
/// one allocation holds the connection's context, the wait for the stop signal and the HTTP/2
/// connection's state: no box for the server's future (an idle h2c connection cost about 440
/// bytes more with one), and not the room of the task that told the protocol apart, which is
/// sized for the HTTP/1.1 relay.
///
/// A function returning an async block rather than an async fn, as [`serve_h1`]: an async fn
/// would keep its arguments beside the values made from them for the connection's life.
fn serve_h2<IO>(
    io: IO,
    ctx: ConnCtx,
    protocols: Arc<HttpProtocols>,
    guard: ConnGuard,
) -> impl std::future::Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A client that stops reading is cut off after `send_timeout` without progress.
    let mut io = SendTimeout::new(io, ctx.shared.node.send_timeout);
    async move {
        // What this block captured is lent, not moved, to the futures made in it: a captured
        // value moved into one would be held twice (a capture's room is never reused).
        // Pinned here, and lent: the server's future then holds a pointer to it, not a copy.
        let stop = std::pin::pin!(guard.stopped());
        // A request's state (a few KiB) is boxed once, where it is made; the stream's own
        // future then moves only a pointer.
        let served = strait_protocols::h2s::serve(
            &mut io,
            &protocols.h2,
            |req| Box::pin(handle(req, &ctx, None)),
            stop,
        )
        .await;
        if let Err(e) = served {
            tracing::debug!(peer = %ctx.peer, error = %e, "client connection ended with an error");
        }
    }
}

/// Largest request head read before the general path takes over (it answers 431 past its own
/// limit).
const FAST_HEAD_MAX: usize = 32 * 1024;

/// A client connection [`serve_h1`] can serve: plain TCP, or TLS over it.
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether the client connection is TLS (`X-Forwarded-Proto`, routing).
    const TLS: bool;
    /// Ready once the client has sent something (or the stream holds bytes already received),
    /// so an idle connection can wait without a read buffer.
    fn poll_idle(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>>;
    /// The TCP connection whose first bytes can tell h2c from HTTP/1.1 (none under TLS, where
    /// ALPN does).
    fn sniffable(&mut self) -> Option<&mut TcpStream>;
    /// The SNI the client's TLS handshake asked for.
    fn sni(&self) -> Option<&str>;
    /// Whether the client presented a certificate its SNI's `client.ca` verified.
    fn client_verified(&self) -> bool;
}

/// Ends a connection the relay closes: over TLS with `close_notify`, so a client reading a body
/// delimited by the close sees it end cleanly rather than cut off (plain TCP just closes).
async fn close_client<S: ClientStream>(stream: &mut S, limit: Duration) {
    if S::TLS {
        use tokio::io::AsyncWriteExt;
        // Boxed: the futures that may end this way (every HTTP/1.1 connection's) do not carry a
        // timer's room for it.
        let _ = Box::pin(tokio::time::timeout(limit, stream.shutdown())).await;
    }
}

/// Writes `bytes` to the client and flushes (a TLS stream may hold them back otherwise).
async fn write_flushed<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(bytes).await?;
    w.flush().await
}

/// How long a closing connection keeps reading what its client still sends ([`linger`]), in
/// all and between two reads: nginx's `lingering_time` and `lingering_timeout` defaults.
const LINGER_TOTAL: Duration = Duration::from_secs(30);
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// Closes a client connection whose client may still be sending (the rest of a request body
/// that was answered early): the sending side is shut first, then what arrives is read and
/// dropped until the client closes too, goes quiet for [`LINGER_QUIET`], [`LINGER_TOTAL`] has
/// passed or the gateway stops. Closing with unread bytes would reset the connection, and the
/// client could lose the answer still on its way.
async fn linger<S: ClientStream>(stream: &mut S, limit: Duration, stop: &ConnTracker) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if tokio::time::timeout(limit, stream.shutdown()).await.is_err() {
        return;
    }
    let end = tokio::time::Instant::now() + LINGER_TOTAL;
    let mut scratch = vec![0u8; 16 * 1024];
    loop {
        let quiet = (tokio::time::Instant::now() + LINGER_QUIET).min(end);
        tokio::select! {
            r = tokio::time::timeout_at(quiet, stream.read(&mut scratch)) => match r {
                Ok(Ok(1..)) => {}
                _ => return,
            },
            _ = stop.stopped() => return,
        }
    }
}

impl ClientStream for TcpStream {
    const TLS: bool = false;
    fn poll_idle(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
    fn sniffable(&mut self) -> Option<&mut TcpStream> {
        Some(self)
    }
    fn sni(&self) -> Option<&str> {
        None
    }
    fn client_verified(&self) -> bool {
        false
    }
}

impl ClientStream for Box<tokio_rustls::server::TlsStream<TcpStream>> {
    const TLS: bool = true;
    fn poll_idle(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        let (tcp, tls) = self.get_ref();
        // rustls wants no more bytes while it holds decrypted ones (or the client's
        // close_notify): those are read at once. Otherwise the socket says when records come.
        if tls.wants_read() { tcp.poll_read_ready(cx) } else { std::task::Poll::Ready(Ok(())) }
    }
    fn sniffable(&mut self) -> Option<&mut TcpStream> {
        None
    }
    fn sni(&self) -> Option<&str> {
        self.get_ref().1.server_name()
    }
    fn client_verified(&self) -> bool {
        // rustls only completes a handshake whose certificate, if any, its verifier accepted.
        self.get_ref().1.peer_certificates().is_some()
    }
}

/// Serves an HTTP/1.1 connection (plain, or TLS without h2 negotiated): requests routed to
/// `http` and `https` upstreams go through the direct relay ([`strait_protocols::h1`]), their bodies
/// read whole (up to 64 KiB) or streamed; the first request that needs more (an upgrade, gRPC,
/// transcoding, another transfer coding, anything malformed) hands the connection, with the
/// bytes already read, to hyper for the rest of its life.
///
/// This future is a connection's task (over TLS, from the end of the handshake), so it is kept
/// small: it holds only what lasts between requests ([`H1Conn`]) and the wait for the next one.
/// The state of a request in flight (its head, route, and the exchange with the node) is boxed by
/// [`one_request`] and freed when the request is done, so a keep-alive connection waiting for its
/// next request costs about what a new one does.
///
/// A function returning an async block rather than an async fn: an async fn would keep its
/// arguments, and the locals made from them, side by side for its whole life.
///
/// On a plain listener with HTTP/2, the connection's first bytes tell h2c prior knowledge from
/// HTTP/1.1 first ([`First::h2c`]); an h2c connection gets a task of its own ([`serve_h2`]), and
/// the one running this future, sized for the HTTP/1.1 relay, ends.
fn serve_h1<S: ClientStream>(
    stream: S,
    first: First,
    peer: SocketAddr,
    local: SocketAddr,
    shared: Arc<Shared>,
    protocols: Arc<HttpProtocols>,
    guard: ConnGuard,
) -> impl std::future::Future<Output = ()> {
    // The header values are made once a plain connection's client has sent something (over TLS,
    // once the handshake is done): a connection that stays silent costs no allocation of its own.
    let empty = http::HeaderValue::from_static("");
    let trust = first.trust;
    let mut conn =
        H1Conn { stream, peer, local, shared, client_ip: empty.clone(), local_port_value: empty, trust };
    let mut buf = bytes::BytesMut::new();
    async move {
        // The waits for a request head share one timer and one wait for the stop signal, made
        // once per connection. Each request moves the timer's deadline later, which costs a
        // compare-and-swap: a timer of its own per wait would be registered with the runtime's
        // timer wheel and removed again (two lock round trips), and so would a wait of its own.
        // In a block of their own: a connection handed to the general path keeps neither.
        {
            let mut head_timer = std::pin::pin!(tokio::time::sleep_until(first.deadline));
            // A plain connection's first bytes are waited for here, with the stop watched: tokio
            // takes a new socket for readable, so the wait below would return at once and leave
            // a silent client in a read that a stop does not end.
            let mut stop = std::pin::pin!(guard.stopped());
            if let Some(tcp) = conn.stream.sniffable() {
                let sniffed = tokio::select! {
                    biased;
                    s = sniff(tcp, first.h2c) => s,
                    _ = &mut head_timer => None,
                    _ = &mut stop => None,
                };
                match sniffed {
                    // What the client sent while the protocol was being told apart comes first.
                    Some((Proto::H1, read)) => buf = read,
                    Some((Proto::H2, read)) => {
                        let H1Conn { stream, peer, local, shared, trust, .. } = conn;
                        let io = strait_protocols::h1::Prefixed::new(read.freeze(), stream);
                        let ctx = ConnCtx::new(shared, peer, local, S::TLS, trust);
                        // A guard of its own: this one is lent to the stop wait until this
                        // future ends, right after.
                        tokio::spawn(serve_h2(io, ctx, protocols, guard.again()));
                        return;
                    }
                    None => return,
                }
            }
            (conn.client_ip, conn.local_port_value) =
                strait_protocols::http::connection_values(conn.peer, conn.local.port());
            loop {
                if buf.is_empty() {
                    // Idle between requests: hold no buffer.
                    strait_protocols::spare::give_head(std::mem::take(&mut buf));
                    // The client's bytes first: a connection that has a request is served, even
                    // if its time ran out or a stop came meanwhile.
                    let ready = tokio::select! {
                        biased;
                        r = std::future::poll_fn(|cx| conn.stream.poll_idle(cx)) => Some(r.is_ok()),
                        _ = &mut head_timer => Some(false),
                        _ = &mut stop => None,
                    };
                    match ready {
                        Some(true) => {}
                        Some(false) => return,
                        None => {
                            close_client(&mut conn.stream, conn.shared.node.send_timeout).await;
                            return;
                        }
                    }
                }
                match Box::pin(one_request(&mut conn, &mut buf, head_timer.deadline(), &guard)).await {
                    Step::KeepAlive => {}
                    Step::Done => return,
                    Step::HandOff => break,
                }
                // A complete request head within client_header_timeout (idle time included; for
                // the first request, counted from the accept).
                head_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + conn.shared.node.client_header_timeout);
            }
        }
        let H1Conn { stream, peer, local, shared, trust, .. } = conn;
        let ctx = ConnCtx::new(shared, peer, local, S::TLS, trust).with_tls(&stream);
        let io = strait_protocols::h1::Prefixed::new(buf.freeze(), stream);
        // Boxed: the general path's state is not part of every relayed connection's.
        Box::pin(serve_http(io, ctx, protocols, &guard)).await;
    }
}

/// How a connection's first request is waited for.
struct First {
    /// The first request head's deadline, counted from the accept.
    deadline: tokio::time::Instant,
    /// Tell h2c prior knowledge from HTTP/1.1 first (a plain listener with HTTP/2 on).
    h2c: bool,
    /// [`ConnCtx::trust`].
    trust: Trust,
}

/// What lasts of an HTTP/1.1 client connection between two requests.
struct H1Conn<S> {
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    shared: Arc<Shared>,
    /// `X-Real-IP` / `X-Forwarded-Port` values, computed once per connection.
    client_ip: http::HeaderValue,
    local_port_value: http::HeaderValue,
    /// [`ConnCtx::trust`].
    trust: Trust,
}

/// How a connection goes on after [`one_request`].
enum Step {
    /// Waits for the next request.
    KeepAlive,
    /// Has been closed (or is to be dropped).
    Done,
    /// Goes to the general path, with the bytes read so far.
    HandOff,
}

/// Reads a request head (starting with what `buf` holds; more within `deadline`) and relays the
/// request, or says why the connection goes to the general path. A connection that ends is
/// closed here, gracefully where that matters.
async fn one_request<S: ClientStream>(
    conn: &mut H1Conn<S>,
    buf: &mut bytes::BytesMut,
    deadline: tokio::time::Instant,
    stop: &ConnTracker,
) -> Step {
    use bytes::Buf;
    use strait_protocols::h1::{ReqBody, RequestHead};
    use tokio::io::AsyncReadExt;
    let H1Conn { stream, peer, local, shared, client_ip, local_port_value, trust } = conn;
    let (peer, local) = (*peer, *local);
    let body_timeout = shared.node.client_body_timeout;
    let parsed = loop {
        if !buf.is_empty() {
            match strait_protocols::h1::parse_request(buf) {
                RequestHead::Complete(p) => break p,
                RequestHead::Partial if buf.len() < FAST_HEAD_MAX => {}
                _ => return Step::HandOff,
            }
        }
        if buf.capacity() == 0 {
            *buf = strait_protocols::spare::head_buf();
        } else if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let idle = buf.is_empty();
        let read = tokio::time::timeout_at(deadline, stream.read_buf(buf));
        // A TLS record can arrive in pieces: the wait for the rest of one is ended by a stop
        // too.
        let got = if idle && S::TLS {
            tokio::select! {
                r = read => Some(r),
                _ = stop.stopped() => None,
            }
        } else {
            Some(read.await)
        };
        match got {
            Some(Ok(Ok(1..))) => {}
            Some(_) => return Step::Done,
            None => {
                close_client(stream, shared.node.send_timeout).await;
                return Step::Done;
            }
        }
    };
    let strait_protocols::h1::ParsedRequest { parts, len } = parsed;
    let Some(body) = strait_protocols::h1::eligible(&parts) else { return Step::HandOff };
    if len > strait_protocols::http::HEAD_LINE_MAX && strait_protocols::http::head_fault(&parts).is_some() {
        // The general path answers it (414 or 400); a shorter head cannot hold a line that long.
        return Step::HandOff;
    }
    if strait_protocols::http::host_fault(&parts).is_some() || parts.method == http::Method::TRACE {
        // The general path answers it (400).
        return Step::HandOff;
    }
    if grpc::is_grpc_request(&parts.headers) {
        return Step::HandOff;
    }
    let (client, real_ip) = real_client(&shared.node, *trust, peer, &parts.headers);
    let client_ip = real_ip.as_ref().unwrap_or(client_ip);
    let (route, key) = {
        let state = shared.state.load();
        let view = RequestView::new(&parts, client, local, S::TLS);
        if view.uri.is_none() {
            // The general path answers it (400).
            return Step::HandOff;
        }
        if S::TLS && !client_cert_rules_allow(&state.certs, &view, stream.sni(), stream.client_verified()) {
            // The general path answers it (400).
            return Step::HandOff;
        }
        let Some(route) = state.router.find(&view) else { return Step::HandOff };
        let Some(up) = &route.upstream else { return Step::HandOff };
        if route.transcode.is_some()
            || !strait_protocols::h1::relays(strait_protocols::UpstreamPicker::settings(&**up))
        {
            return Step::HandOff;
        }
        let key = up.hash_key(&view).into_owned();
        (route.clone(), key)
    };
    let Some(upstream) = &route.upstream else { return Step::HandOff };
    let have = (buf.len() - len) as u64;
    let waiting = match body {
        ReqBody::Length(n) => have < n,
        ReqBody::Chunked => have == 0,
    };
    /// How the body is read.
    enum Plan {
        /// Whole (this many bytes), before a node is picked.
        Whole(u64),
        Streamed(strait_protocols::h1::StreamedBody),
    }
    let plan = match body {
        ReqBody::Length(n) if n <= strait_protocols::h1::BODY_MAX => Plan::Whole(n),
        // Starts with what came with the head; chunk framing that is invalid already goes to
        // hyper, with the bytes as they came.
        _ => match strait_protocols::h1::StreamedBody::start(body, buf, len) {
            Some(s) => Plan::Streamed(s),
            None => return Step::HandOff,
        },
    };
    if waiting && strait_protocols::h1::expects_continue(&parts) {
        // The client waits for this before it sends the body (nginx sends it when it starts
        // reading the body, too).
        let mut client = SendTimeout::new(&mut *stream, shared.node.send_timeout);
        if write_flushed(&mut client, b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return Step::Done;
        }
    }
    let ctx = ForwardCtx {
        client_addr: client,
        local_port: local.port(),
        client_ip,
        local_port_value,
        downstream_tls: S::TLS,
        hash_key: &key,
        timeouts: route.spec.timeout,
        websocket: false,
        grpc: false,
        grpc_node: false,
        deadline: None,
        body_timeout,
        // Upgrades go to the general path.
        tunnel_hold: None,
        trust: trust.forward,
        show_upstream_status: shared.node.show_upstream_status,
    };
    shared.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    let after = match plan {
        Plan::Whole(body_len) => {
            // The whole body before a node is picked; a client that pauses longer than
            // client_body_timeout loses the connection.
            let need = len + body_len as usize;
            if buf.len() < need {
                buf.reserve(need - buf.len());
                while buf.len() < need {
                    match tokio::time::timeout(body_timeout, stream.read_buf(buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Step::Done,
                        Ok(Ok(_)) => {}
                    }
                }
            }
            buf.advance(len);
            // (Splitting off nothing would still turn `buf` into a shared buffer: an allocation.)
            let body = if body_len > 0 { buf.split_to(body_len as usize) } else { bytes::BytesMut::new() };
            if buf.is_empty() {
                // The head is parsed (copied out) and the body taken: the buffer can serve
                // another connection's head while this request waits for its node.
                strait_protocols::spare::give_head(std::mem::take(buf));
            }
            let mut client = SendTimeout::new(&mut *stream, shared.node.send_timeout);
            strait_protocols::h1::forward(&mut client, parts, &body, &ctx, &**upstream).await
        }
        // Streamed as it comes, each wait for the client bounded by client_body_timeout.
        Plan::Streamed(streamed) => {
            let mut client = SendTimeout::new(&mut *stream, shared.node.send_timeout);
            Box::pin(strait_protocols::h1::forward_streamed(
                &mut client,
                parts,
                streamed,
                buf,
                &ctx,
                &**upstream,
            ))
            .await
        }
    };
    match after {
        strait_protocols::h1::After::KeepAlive if !stop.is_stopping() => Step::KeepAlive,
        strait_protocols::h1::After::Linger => {
            linger(stream, shared.node.send_timeout, stop).await;
            Step::Done
        }
        _ => {
            close_client(stream, shared.node.send_timeout).await;
            Step::Done
        }
    }
}

/// The client certificate rules of `ssls` entries ([`CertStore::request_allowed`]) for a
/// request on a TLS connection: for the host it is routed by and, when a `Host` header names
/// another (an absolute-form target, or HTTP/2's `:authority` beside a `host` header), for
/// that one too, since the node may go by it.
fn client_cert_rules_allow(certs: &CertStore, view: &RequestView, sni: Option<&str>, verified: bool) -> bool {
    if !certs.has_client_auth() {
        return true;
    }
    let path = view.parts.uri.path();
    if !certs.request_allowed(&view.host, path, sni, verified) {
        return false;
    }
    view.parts.headers.get_all(http::header::HOST).iter().all(|h| match h.to_str() {
        Ok(h) => certs.request_allowed(&crate::route::host_name(h), path, sni, verified),
        // A name that cannot be read cannot be checked.
        Err(_) => false,
    })
}

/// The client of a request from `peer`: the address a trusted proxy's header names
/// (`nginx_config.http.real_ip_*`, [`crate::route::ip::RealIp`]), with that address as a header
/// value for the node's `X-Real-IP` and `X-Forwarded-For`; else `peer` (and `None`: the
/// connection's value stands).
fn real_client(
    node: &crate::config::NodeConfig,
    trust: Trust,
    peer: SocketAddr,
    headers: &http::HeaderMap,
) -> (SocketAddr, Option<http::HeaderValue>) {
    let named = node.real_ip.as_ref().filter(|_| trust.names_client).and_then(|r| r.client(headers));
    match named {
        Some(ip) if ip != peer.ip() => {
            let value = http::HeaderValue::from_str(&ip.to_string()).ok();
            (SocketAddr::new(ip, peer.port()), value)
        }
        _ => (peer, None),
    }
}

/// One request: route, then forward (or answer an error).
/// `tunnel_hold` makes what a tunnel holds if the request becomes one (HTTP/1.1 upgrades).
async fn handle(
    req: Request<ProxyBody>,
    c: &ConnCtx,
    tunnel_hold: Option<strait_protocols::http::TunnelHold<'_>>,
) -> Response<ProxyBody> {
    let shared = &c.shared;
    shared.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    let is_grpc = grpc::is_grpc_request(req.headers());
    let (parts, body) = req.into_parts();
    if let Some(fault) = strait_protocols::http::host_fault(&parts) {
        strait_protocols::http::drain_unread(body).await;
        return error_response(&ProxyError::BadRequest(fault.to_string()), is_grpc);
    }
    if let Some(e) = strait_protocols::http::head_fault(&parts) {
        strait_protocols::http::drain_unread(body).await;
        return error_response(&e, is_grpc);
    }
    if parts.method == http::Method::TRACE {
        // nginx refuses TRACE ("client sent TRACE method"): it would echo the request's
        // headers, cookies included, back to whoever can make the client send one.
        strait_protocols::http::drain_unread(body).await;
        return error_response(&ProxyError::Status(405, "TRACE is not allowed".into()), is_grpc);
    }
    // The client a trusted proxy names (nginx's realip module), else the connection's.
    let (client, real_ip) = real_client(&shared.node, c.trust, c.peer, &parts.headers);
    let client_ip = real_ip.as_ref().unwrap_or(&c.client_ip);
    let (route, key) = {
        let state = shared.state.load();
        let view = RequestView::new(&parts, client, c.local, c.tls);
        if view.uri.is_none() {
            // A path that climbs above the root, as nginx answers it.
            drop(state);
            strait_protocols::http::drain_unread(body).await;
            let e = ProxyError::BadRequest("the path climbs above the root".into());
            return error_response(&e, is_grpc);
        }
        if c.tls && !client_cert_rules_allow(&state.certs, &view, c.sni.as_deref(), c.client_verified) {
            // APISIX: "client certificate was not present", or "client certificate verified
            // with SNI ..., but the host is ...".
            drop(state);
            strait_protocols::http::drain_unread(body).await;
            let e = ProxyError::BadRequest("a client certificate is required for this host and path".into());
            return error_response(&e, is_grpc);
        }
        match state.router.find(&view) {
            None => {
                shared.metrics.http_no_route.fetch_add(1, Ordering::Relaxed);
                drop(state);
                strait_protocols::http::drain_unread(body).await;
                return error_response(&ProxyError::NoRoute, is_grpc);
            }
            Some(r) => {
                let key = match &r.upstream {
                    Some(u) => u.hash_key(&view).into_owned(),
                    None => Vec::new(),
                };
                (r.clone(), key)
            }
        }
    };
    let deadline = if is_grpc {
        parts
            .headers
            .get("grpc-timeout")
            .and_then(grpc::parse_timeout)
            .map(|d| tokio::time::Instant::now() + d)
    } else {
        None
    };
    let Some(upstream) = &route.upstream else {
        strait_protocols::http::drain_unread(body).await;
        return error_response(&ProxyError::NoNode, is_grpc);
    };
    let ctx = ForwardCtx {
        client_addr: client,
        local_port: c.local.port(),
        client_ip,
        local_port_value: &c.local_port_value,
        downstream_tls: c.tls,
        hash_key: &key,
        timeouts: route.spec.timeout,
        websocket: route.spec.websocket,
        grpc: is_grpc,
        grpc_node: false,
        deadline,
        body_timeout: shared.node.client_body_timeout,
        tunnel_hold,
        trust: c.trust.forward,
        show_upstream_status: shared.node.show_upstream_status,
    };
    if let Some(t) = &route.transcode {
        // Boxed: its state (~6 KiB) would otherwise be part of every request's.
        return Box::pin(crate::transcode::handle(Request::from_parts(parts, body), t, upstream, &ctx)).await;
    }
    let req = Request::from_parts(parts, body);
    match deadline {
        None => forward(req, &ctx, &**upstream).await,
        Some(d) => match tokio::time::timeout_at(d, forward(req, &ctx, &**upstream)).await {
            Ok(resp) => resp,
            Err(_) => error_response(&ProxyError::DeadlineExceeded, true),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted connections get TCP_NODELAY from their listener (small answers are not held
    /// back by Nagle's algorithm), without a setsockopt of their own.
    #[tokio::test]
    async fn accepted_connections_inherit_tcp_nodelay_from_the_listener() {
        let listener =
            TcpListener::from_std(bind_one("127.0.0.1:0".parse().unwrap(), false).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted socket without TCP_NODELAY");
    }
}
