//! Protocol engines for Strait: forwarding HTTP/1.1, HTTP/2, gRPC and TCP to upstream nodes.
//!
//! This crate knows nothing about configuration files or service discovery. It declares what it
//! needs from the core in one trait, [`UpstreamPicker`], and the core implements it. Everything
//! that turns a failure into bytes on the wire for the client goes through [`respond`].
#![forbid(unsafe_code)]

pub mod body;
pub mod date;
pub mod fxhash;
pub mod grpc;
pub mod h1;
pub mod h2s;
pub mod http;
pub mod pool;
pub mod respond;
pub mod retry;
pub mod spare;
pub mod stream;
pub mod tls;

mod connect;
#[cfg(test)]
mod test_rng;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use body::ProxyBody;
pub use connect::{ConnectError, NodeStream, SendTimeout, connect_tcp, connect_tls};

/// How a request or connection towards a node ended, as far as health and latency tracking care.
///
/// Reported once per attempt through [`Peer::report`]. The core's health engine turns these into
/// passive-check counters; the EWMA balancer uses `elapsed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node answered with this HTTP status (gRPC calls report their HTTP status here and
    /// their gRPC status through [`Outcome::GrpcStatus`] when it is known).
    HttpStatus(u16),
    /// The call finished with this gRPC status (from headers or trailers).
    GrpcStatus(u16),
    /// The TCP connect or TLS handshake failed, or the connection broke before an answer.
    TcpFailure,
    /// Connect or read timed out.
    Timeout,
    /// The connection broke after the answer's head reached the client (mid-body), or the
    /// node reset a call it had taken: no retry follows.
    LateTcpFailure,
    /// A read timed out after the answer's head reached the client (mid-body).
    LateTimeout,
    /// A stream (L4) session ended cleanly.
    StreamOk,
}

impl Outcome {
    /// The outcome of a failure that came after the answer's head: no retry can follow it,
    /// which health checks without a `passive` block (counting what makes a request retry)
    /// tell apart.
    pub fn after_head(self) -> Outcome {
        match self {
            Outcome::TcpFailure => Outcome::LateTcpFailure,
            Outcome::Timeout => Outcome::LateTimeout,
            o => o,
        }
    }
}

/// Feedback channel from a forwarded request to the node it went to.
///
/// Implemented by the core's node state. Calls are cheap (atomics only) and never block.
pub trait PeerNode: Send + Sync + 'static {
    /// Records the result of one attempt, with the time from connect start to response head.
    fn report(&self, outcome: Outcome, elapsed: Duration);
    /// Whether [`PeerNode::report`] uses its `elapsed` (the balancer weighs latency): if not,
    /// callers need not read the clock for it.
    fn tracks_latency(&self) -> bool {
        true
    }
    /// Called exactly once when the attempt ends (the in-flight count drops).
    fn release(&self);
}

/// One picked upstream node for one attempt.
///
/// Dropping the `Peer` ends its in-flight count (least_conn); [`Peer::report`] feeds passive
/// health and EWMA.
pub struct Peer {
    /// Resolved socket address of the node: its identity.
    pub addr: SocketAddr,
    /// Host name of the node as configured (a domain or the IP literal), used for `pass_host: node`
    /// and as the TLS server name when no `upstream_host` is set.
    pub host: Arc<str>,
    /// Port of the node as configured.
    pub port: u16,
    node: Option<Arc<dyn PeerNode>>,
}

impl Peer {
    /// A peer that reports to `node`.
    pub fn new(addr: SocketAddr, host: Arc<str>, port: u16, node: Arc<dyn PeerNode>) -> Self {
        Peer { addr, host, port, node: Some(node) }
    }

    /// A peer without feedback (tests, health probes).
    pub fn detached(addr: SocketAddr) -> Self {
        Peer { host: addr.ip().to_string().into(), port: addr.port(), addr, node: None }
    }

    /// Records the outcome of this attempt.
    pub fn report(&self, outcome: Outcome, elapsed: Duration) {
        if let Some(node) = &self.node {
            node.report(outcome, elapsed);
        }
    }

    /// Records the outcome of this attempt, which started at `start`: the clock is read only
    /// if the node weighs latency.
    pub fn report_since(&self, outcome: Outcome, start: std::time::Instant) {
        if let Some(node) = &self.node {
            let elapsed = if node.tracks_latency() { start.elapsed() } else { Duration::ZERO };
            node.report(outcome, elapsed);
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            node.release();
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("addr", &self.addr).field("host", &self.host).finish()
    }
}

/// Nodes already tried by one request, so that a retry goes to a different node.
///
/// Holds addresses; allocates only when a retry actually happens.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    addrs: Vec<SocketAddr>,
}

impl Tried {
    /// Whether `addr` was already tried.
    #[inline]
    pub fn contains(&self, addr: &SocketAddr) -> bool {
        self.addrs.iter().any(|a| a == addr)
    }
    /// Marks `addr` as tried.
    pub fn push(&mut self, addr: SocketAddr) {
        if !self.contains(&addr) {
            self.addrs.push(addr);
        }
    }
    /// Number of distinct nodes tried.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }
    /// Whether nothing was tried yet.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// Why a pick found no node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// The upstream has no node at all (empty list, discovery never answered, all weight 0 for chash).
    NoNode,
    /// Every usable node was already tried by this request.
    AllTried,
    /// No node is ready and the upstream's policy is to fail rather than use unhealthy nodes.
    NoHealthyNode,
}

/// What the protocol engines need from the core: a synchronous, lock-free node pick.
///
/// Contract: `pick` never awaits, never takes a lock and does not allocate on the common path;
/// it returns a node not in `tried` when one exists.
pub trait UpstreamPicker: Send + Sync {
    /// Picks a node for the next attempt. `key` is the consistent-hash key (ignored by other
    /// balancers).
    fn pick(&self, key: &[u8], tried: &Tried) -> Result<Peer, PickError>;
    /// Total number of nodes, used for the default retry count (`#nodes - 1`).
    fn node_count(&self) -> usize;
    /// Forwarding settings of this upstream.
    fn settings(&self) -> &UpstreamSettings;
}

/// Protocol spoken to the upstream nodes (`upstreams[].scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
    Grpc,
    Grpcs,
    Tcp,
    Tls,
}

impl Scheme {
    /// Whether the connection to the node is TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Https | Scheme::Grpcs | Scheme::Tls)
    }
    /// Whether requests are forwarded as gRPC over HTTP/2.
    pub fn is_grpc(self) -> bool {
        matches!(self, Scheme::Grpc | Scheme::Grpcs)
    }
    /// The configuration value for this scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Grpc => "grpc",
            Scheme::Grpcs => "grpcs",
            Scheme::Tcp => "tcp",
            Scheme::Tls => "tls",
        }
    }
    /// The port assumed when a node has none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http | Scheme::Grpc => 80,
            Scheme::Https | Scheme::Grpcs => 443,
            Scheme::Tcp | Scheme::Tls => 0,
        }
    }
}

/// Which Host header (and TLS server name) the upstream request carries (`pass_host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassHost {
    /// The client's Host.
    Pass,
    /// The node's host, with `:port` unless it is the scheme's default port.
    Node,
    /// A fixed value (`upstream_host`).
    Rewrite(::http::HeaderValue),
}

/// Connect / send / read timeouts towards a node (`timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake.
    pub connect: Duration,
    /// Writing the request to the node.
    pub send: Duration,
    /// Waiting for the response head, and between two reads of the response body.
    pub read: Duration,
}

impl Default for Timeouts {
    /// nginx's defaults, which APISIX inherits: 60 s each.
    fn default() -> Self {
        let s = Duration::from_secs(60);
        Timeouts { connect: s, send: s, read: s }
    }
}

/// Keep-alive pool limits (`keepalive_pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepalivePool {
    /// Idle connections kept per node (per worker).
    pub size: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// Requests after which a connection is closed.
    pub requests: u32,
}

impl Default for KeepalivePool {
    fn default() -> Self {
        KeepalivePool { size: 320, idle_timeout: Duration::from_secs(60), requests: 1000 }
    }
}

/// Everything about forwarding to one upstream that does not depend on the node.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Display id of the upstream, for logs.
    pub id: Arc<str>,
    pub scheme: Scheme,
    pub pass_host: PassHost,
    pub timeouts: Timeouts,
    /// `retries`; `None` means "number of nodes - 1".
    pub retries: Option<u32>,
    /// `retry_timeout`; `None` means no deadline for retries.
    pub retry_timeout: Option<Duration>,
    pub keepalive: KeepalivePool,
    /// TLS towards the node for https / grpcs / tls schemes.
    pub tls: Option<Arc<tls::ClientTls>>,
}

/// Errors the gateway produces itself, before or instead of an upstream answer.
///
/// Every variant maps to exactly one HTTP status and one gRPC status in [`respond`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProxyError {
    #[error("404 Route Not Found")]
    NoRoute,
    #[error("no valid upstream node")]
    NoNode,
    #[error("all upstream nodes are unhealthy")]
    NoHealthyNode,
    #[error("failed to connect to upstream: {0}")]
    Connect(String),
    #[error("upstream timed out ({0})")]
    Timeout(&'static str),
    #[error("upstream sent an invalid response: {0}")]
    BadResponse(String),
    /// A response head that is malformed, too large or out of place (nginx's `invalid_header`):
    /// a 502 that is not tried on another node, as nginx's default `proxy_next_upstream`
    /// (`error timeout`) does not.
    #[error("upstream sent an invalid response: {0}")]
    InvalidResponse(String),
    /// The node reset the request's HTTP/2 stream with an error code other than REFUSED_STREAM
    /// (it took the call): a 502, not tried again, and for gRPC clients the status gRPC maps
    /// that reset to.
    #[error("upstream reset the stream: {1}")]
    NodeReset(grpc::Code, String),
    #[error("proxy retry timeout")]
    RetryTimeout,
    /// A retry found no node this request has not tried (`retries` at least the node count):
    /// a 502, as APISIX's balancer answers when its picker fails on a retry.
    #[error("failed to pick server: all upstream servers tried")]
    AllTried,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("request deadline exceeded")]
    DeadlineExceeded,
    #[error("gateway is shutting down")]
    ShuttingDown,
    #[error("{1}")]
    Status(u16, String),
}

impl From<PickError> for ProxyError {
    fn from(e: PickError) -> Self {
        match e {
            PickError::NoNode | PickError::AllTried => ProxyError::NoNode,
            PickError::NoHealthyNode => ProxyError::NoHealthyNode,
        }
    }
}
