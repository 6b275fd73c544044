//! HTTP forwarding: one client request to one node, with retries to other nodes.
//!
//! Retries follow nginx's `proxy_next_upstream error timeout` (what APISIX inherits): a connect
//! error or timeout moves to a node not tried yet, never a node already tried, within `retries`
//! and `retry_timeout`. A request whose body was already sent is never sent again; an idempotent
//! request without a body is.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::{BodyPolicy, ProxyBody, UpstreamBody};
use crate::connect::{ConnectError, NodeStream, SendTimeout, connect_tcp, connect_tls};
use crate::pool::{self, Limits, PoolKey, Pooled};
use crate::respond::error_response;
use crate::retry::Retry;
use crate::{Outcome, PassHost, Peer, ProxyError, Scheme, Timeouts, UpstreamPicker, UpstreamSettings, grpc};

/// Per-request facts the forwarder needs besides the request itself.
#[derive(Debug, Clone)]
pub struct ForwardCtx<'a> {
    /// The client's address (after PROXY protocol, if any).
    pub client_addr: SocketAddr,
    /// The local port the request arrived on (`X-Forwarded-Port`).
    pub local_port: u16,
    /// The client's IP as a header value (`X-Real-IP`, `X-Forwarded-For`), made once per
    /// connection.
    pub client_ip: &'a HeaderValue,
    /// `local_port` as a header value.
    pub local_port_value: &'a HeaderValue,
    /// Whether the client connection is TLS (`X-Forwarded-Proto`).
    pub downstream_tls: bool,
    /// Consistent-hash key, computed by the core from the upstream's `hash_on` / `key`.
    pub hash_key: &'a [u8],
    /// Route-level `timeout`, overriding the upstream's.
    pub timeouts: Option<Timeouts>,
    /// Route has `enable_websocket`.
    pub websocket: bool,
    /// The client speaks gRPC: errors are answered with gRPC statuses.
    pub grpc: bool,
    /// The call to the node is gRPC although the client does not speak it (grpc-transcode):
    /// the node's `grpc-status` counts for its passive health as when the client speaks gRPC.
    pub grpc_node: bool,
    /// Absolute deadline of the call (gRPC `grpc-timeout`), if any.
    pub deadline: Option<tokio::time::Instant>,
    /// Longest wait for the next part of a request body that is streamed to a node
    /// (`client_body_timeout`).
    pub body_timeout: Duration,
    /// Called when the client's connection becomes a tunnel (an upgrade such as WebSocket): the
    /// tunnel holds what it returns until it closes (the gateway counts the tunnel as a live
    /// connection, so a drain waits for it). `None`: nothing is held.
    pub tunnel_hold: Option<TunnelHold<'a>>,
    /// What the client's own forwarding headers are worth (`apisix.trusted_addresses`).
    pub trust: ForwardTrust,
    /// `apisix.show_upstream_status_in_response_header`: `X-APISIX-Upstream-Status` on every
    /// answer that had an attempt, not only on 5xx ones.
    pub show_upstream_status: bool,
}

/// How a client's own `X-Forwarded-*` and `Forwarded` headers are taken, as APISIX 3.14+ does
/// with `apisix.trusted_addresses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardTrust {
    /// No `trusted_addresses`: the gateway's `X-Forwarded-Proto`, `-Host` and `-Port` replace
    /// the client's, its `Forwarded` is dropped, and its `X-Forwarded-For` is kept with the
    /// client's address added (APISIX's compatible default).
    #[default]
    Default,
    /// The client is in `trusted_addresses`: what it sent is kept (the gateway's values only
    /// fill in what it did not send) and its `X-Forwarded-For` gets its address added.
    Trusted,
    /// `trusted_addresses` is set and the client is not in it: as [`ForwardTrust::Default`],
    /// and its `X-Forwarded-For` is dropped too, so the node sees only the client's address.
    Untrusted,
}

/// What [`ForwardCtx::tunnel_hold`] calls.
#[derive(Clone, Copy)]
pub struct TunnelHold<'a>(pub &'a (dyn Fn() -> Box<dyn std::any::Any + Send> + Sync));

impl std::fmt::Debug for TunnelHold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelHold")
    }
}

/// Headers that describe one hop and are never forwarded.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::EXPECT,
];

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// The port a client's `Host` names (`example.com:8443`, `[::1]:8443`), for `X-Forwarded-Port`
/// as APISIX sets it: that port, or the listener's when the host has none.
pub(crate) fn host_port(host: &HeaderValue) -> Option<&[u8]> {
    host_port_at(host.as_bytes()).map(|i| &host.as_bytes()[i..])
}

/// Where the port of a `Host` value starts: after a `:` followed by one to five digits that
/// end it (read from the end, so only the port's bytes are looked at).
pub(crate) fn host_port_at(b: &[u8]) -> Option<usize> {
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let start = b.len() - digits;
    ((1..=5).contains(&digits) && start >= 2 && b[start - 1] == b':').then_some(start)
}

pub(crate) static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names is cheaper than seven removals.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Every Connection header counts, not only the first.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Whether this HTTP/1.1 request asks for a WebSocket upgrade.
pub fn is_websocket_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && parts
            .headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// The request as it goes to nodes: rewritten once, adjusted per attempt only where the node
/// matters (Host for `pass_host: node`, URI form for HTTP/2).
struct Outgoing {
    parts: Parts,
    body: ProxyBody,
    /// Host the client asked for (`pass_host: pass`).
    client_host: Option<HeaderValue>,
    /// A copy to re-send after a failure that consumed the request (idempotent, no body).
    replay: Option<Parts>,
}

/// A request path as nginx's `$uri` has it, which APISIX routes on: percent-escapes decoded
/// (`%2F` too, as `match_uri_encoded_slash: false` has it), `.` and `..` segments resolved and
/// repeated slashes merged, so `/static/../api/x`, `//api/x` and `/api%2Fx` all reach the
/// routes of `/api/x` (and `skip_mtls_uri_regex` is matched against it). `None` when `..` would climb above the root (nginx answers 400). A
/// path with none of `%`, `//` or `/.` is returned as it is, without a copy.
pub fn uri_path(raw: &str) -> Option<Cow<'_, str>> {
    let b = raw.as_bytes();
    let plain = !b
        .iter()
        .enumerate()
        .any(|(i, &c)| c == b'%' || c == b'/' && matches!(b.get(i + 1), Some(b'/') | Some(b'.')));
    if plain {
        return Some(Cow::Borrowed(raw));
    }
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) =
                (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c)))
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        decoded.push(b[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded);
    let segments: Vec<&str> = text.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for seg in &segments {
        match *seg {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            s => out.push(s),
        }
    }
    let trailing = matches!(segments.last(), Some(&"") | Some(&".") | Some(&"..")) && !out.is_empty();
    let mut path = String::with_capacity(text.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || trailing {
        path.push('/');
    }
    Some(Cow::Owned(path))
}

/// Forwards `req` to a node of `picker`'s upstream and returns the response for the client.
pub async fn forward<P: UpstreamPicker + ?Sized>(
    req: Request<ProxyBody>,
    ctx: &ForwardCtx<'_>,
    picker: &P,
) -> Response<ProxyBody> {
    let mut retry = Retry::new(picker).show_every_status(ctx.show_upstream_status);
    let (mut resp, shown) = match forward_inner(req, ctx, picker, &mut retry).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            if status < 500 && !ctx.show_upstream_status {
                return resp;
            }
            let shown = retry.upstream_status(Ok(status));
            (resp, shown)
        }
        Err((e, unread)) => {
            drain_unread(unread).await;
            (error_response(&e, ctx.grpc), retry.upstream_status(Err(&e)))
        }
    };
    if let Some(v) = shown {
        resp.headers_mut().insert(crate::retry::UPSTREAM_STATUS, v);
    }
    resp
}

/// Reads and drops what is left of a request body the gateway answers itself, as nginx discards
/// it: up to 64 KiB, for at most 200 ms, before the answer. Answering while the client is still
/// sending makes HTTP/2 reset the request stream right after the answer (RST_STREAM NO_ERROR,
/// RFC 9113 §8.1), which some clients (curl 7.x) report as a stream error instead of reading the
/// answer, and curl 7.x may also wait forever for an answer that came before its upload ended;
/// with a small body read first, the stream simply closes. What an HTTP/2 client still sends
/// after that is read in a task of its own (`drain_in_background`) instead of being reset.
pub async fn drain_unread(mut body: ProxyBody) {
    use http_body_util::BodyExt;
    if body.is_end_stream() {
        return;
    }
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = BodyExt::frame(&mut body).await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > 64 * 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
    drain_in_background(body);
}

/// Lets go of an HTTP/2 client's request body that nobody will read: what the client still sends
/// of it is read and dropped in a task of its own, until its end (each wait up to 5 s, 30 s in
/// all, nginx's lingering limits), so that the client's stream ends as it expects. Dropping it
/// at once would reset the stream with `NO_ERROR` once the answer is out (see `drain_unread`).
/// Other bodies are dropped.
pub(crate) fn drain_in_background(body: ProxyBody) {
    if !matches!(body, ProxyBody::H2(_)) || body.is_end_stream() {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        use http_body_util::BodyExt;
        let mut body = std::pin::pin!(body);
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let quiet = tokio::time::Instant::now() + Duration::from_secs(5);
            match tokio::time::timeout_at(until.min(quiet), body.frame()).await {
                Ok(Some(Ok(_))) => {}
                _ => return,
            }
        }
    });
}

/// A failure, with the request body when it was never sent (for [`drain_unread`]).
type Failure = (ProxyError, ProxyBody);

/// Why an HTTP/1.x request's Host is refused (400), as nginx refuses it: an HTTP/1.1 request
/// with neither a Host header nor an absolute-form target, or one with several Host headers
/// (RFC 9112 §3.2: a server MUST answer such a request 400).
pub fn host_fault(parts: &http::request::Parts) -> Option<&'static str> {
    if parts.version > http::Version::HTTP_11 {
        return None;
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Some("several Host headers"),
        (None, None) if parts.version == http::Version::HTTP_11 && parts.uri.authority().is_none() => {
            Some("an HTTP/1.1 request without a Host header")
        }
        _ => None,
    }
}

/// nginx's `large_client_header_buffers` size (`4 8k` by default, which APISIX keeps): the
/// longest request line and the longest header line, each with its line end, nginx takes.
pub const HEAD_LINE_MAX: usize = 8 * 1024;

/// Why a request's head is refused for its size, as nginx refuses it by default: a request line
/// (method, target, `HTTP/1.1`) longer than [`HEAD_LINE_MAX`] gets a 414, a header line
/// (`name: value`) longer than that a 400 ("Request Header Or Cookie Too Large"). For HTTP/2
/// requests the same lengths are counted as HTTP/1.1 would write them. Nodes commonly cap
/// lines at 8 KiB too, so a longer one would have failed there less clearly.
pub fn head_fault(parts: &http::request::Parts) -> Option<ProxyError> {
    let uri = &parts.uri;
    let path = uri.path_and_query().map_or(1, |p| p.as_str().len());
    // An HTTP/1.1 absolute-form target counts whole; HTTP/2's `:scheme` and `:authority` are
    // apart from its `:path`, which HTTP/1.1 would send in origin form.
    let target = match uri.authority() {
        Some(a) if parts.version < Version::HTTP_2 => {
            path + a.as_str().len() + uri.scheme_str().map_or(0, str::len) + 3
        }
        _ => path,
    };
    // `METHOD SP target SP HTTP/1.1 CRLF`
    if parts.method.as_str().len() + target + 12 > HEAD_LINE_MAX {
        return Some(ProxyError::Status(414, "Request-URI Too Large".into()));
    }
    // `name: value CRLF`
    if parts.headers.iter().any(|(n, v)| n.as_str().len() + v.len() + 4 > HEAD_LINE_MAX) {
        return Some(ProxyError::Status(400, "Request Header Or Cookie Too Large".into()));
    }
    None
}

/// The host (and port) of a request target that names one (absolute form, or HTTP/2's
/// `:authority`), without any `user@`: what the client's Host is to be.
pub(crate) fn target_host(uri: &http::Uri) -> Option<HeaderValue> {
    let a = uri.authority()?.as_str();
    let host = a.rsplit_once('@').map_or(a, |(_, h)| h);
    HeaderValue::from_str(host).ok().filter(|_| !host.is_empty())
}

async fn forward_inner<'p, P: UpstreamPicker + ?Sized>(
    req: Request<ProxyBody>,
    ctx: &ForwardCtx<'_>,
    picker: &'p P,
    retry: &mut Retry<'p>,
) -> Result<Response<ProxyBody>, Failure> {
    let settings = picker.settings();
    let timeouts = ctx.timeouts.unwrap_or(settings.timeouts);
    let (mut parts, body) = req.into_parts();

    let upgrade = if ctx.websocket && is_websocket_upgrade(&parts) {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    // An absolute-form target's (or HTTP/2 `:authority`'s) host wins over the Host header, as
    // it does for routing (RFC 9112 §3.2.2).
    let client_host = target_host(&parts.uri).or_else(|| parts.headers.get(header::HOST).cloned());
    prepare_request_headers(&mut parts, ctx, client_host.as_ref(), upgrade.is_some(), settings.scheme);

    let body_empty = body.is_end_stream();
    let mut body = if body_empty { ProxyBody::Empty } else { body };

    // A small body of known length from an HTTP/2 client, for an `http` or `https` node, is
    // read whole first and goes with its head over the relay's node connections, as an HTTP/1.1
    // client's does (and as nginx buffers request bodies); a retry sends it again from memory.
    let mut buffered: Option<bytes::Bytes> = None;
    if crate::h1::relays(settings)
        && upgrade.is_none()
        && !ctx.grpc
        && matches!(body, ProxyBody::H2(_))
        && body.size_hint().exact().is_some_and(|n| n <= crate::h1::BODY_MAX)
    {
        let whole = std::mem::replace(&mut body, ProxyBody::Empty);
        // The client's pace is `client_body_timeout`'s to bound (nginx's), not the node's
        // `timeout.send`: a few seconds' send timeout failed slow uploads of a few KiB.
        let bytes =
            match tokio::time::timeout(ctx.body_timeout, http_body_util::BodyExt::collect(whole)).await {
                Ok(Ok(c)) => c.to_bytes(),
                Ok(Err(e)) => {
                    return Err((ProxyError::BadRequest(format!("request body: {e}")), ProxyBody::Empty));
                }
                Err(_) => {
                    return Err((ProxyError::Status(408, "request body timed out".into()), ProxyBody::Empty));
                }
            };
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        buffered = Some(bytes);
    }
    // Any other body for an `http` or `https` node is streamed over the same connections,
    // framed by its length when it has one and chunked when not.
    let streamed = crate::h1::relays(settings)
        && upgrade.is_none()
        && !ctx.grpc
        && buffered.is_none()
        && !matches!(body, ProxyBody::Empty);
    if streamed {
        match body.size_hint().exact() {
            Some(n) => {
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            None => {
                parts.headers.remove(header::CONTENT_LENGTH);
                parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
        }
    }

    let replay = (retry.allowed() && body_empty && idempotent(&parts.method) && upgrade.is_none())
        .then(|| clone_parts(&parts));
    let mut out = Outgoing { parts, body, client_host, replay };

    loop {
        let peer = match retry.pick(picker, ctx.hash_key) {
            Ok(p) => p,
            Err(e) => return Err((e, out.body)),
        };
        // A request without a body (or with a small one read whole) for an `http` or `https`
        // node goes over the direct HTTP/1.1 relay's connections (no hyper client task per node
        // connection).
        let direct = crate::h1::relays(settings)
            && upgrade.is_none()
            && !ctx.grpc
            && matches!(out.body, ProxyBody::Empty);
        let relayed = (streamed || direct)
            .then(|| {
                let host =
                    upstream_host(&settings.pass_host, out.client_host.as_ref(), &peer, settings.scheme);
                crate::h1::Target::of(settings, peer.addr, &host).map(|t| (host, t))
            })
            .flatten();
        let (fail, peer) = if let (true, Some((host, target))) = (streamed, &relayed) {
            let body = std::mem::replace(&mut out.body, ProxyBody::Empty);
            let keepalive = settings.keepalive;
            let sent = crate::h1::attempt_streamed(
                &out.parts,
                body,
                host,
                target,
                peer,
                keepalive,
                timeouts,
                ctx.body_timeout,
            );
            // Boxed, as below: its state would otherwise be part of every request's.
            match Box::pin(sent).await {
                Ok(resp) => return Ok(resp),
                Err((crate::h1::Failure::Node { error, outcome, elapsed, .. }, p, body)) => {
                    let request_intact = body.is_some();
                    out.body = body.unwrap_or(ProxyBody::Empty);
                    (AttemptError { error, outcome, elapsed, request_intact }, p)
                }
                Err((crate::h1::Failure::Client, p, _)) => {
                    let error = ProxyError::Connect("relay failed".into());
                    let outcome = Outcome::TcpFailure;
                    (AttemptError { error, outcome, elapsed: Duration::ZERO, request_intact: false }, p)
                }
            }
        } else if let Some((host, target)) = &relayed {
            let body = buffered.as_deref().unwrap_or_default();
            match crate::h1::attempt(&out.parts, body, host, target, peer, settings.keepalive, timeouts).await
            {
                Ok(resp) => return Ok(resp),
                Err((crate::h1::Failure::Node { error, outcome, elapsed, sent }, p)) => {
                    (AttemptError { error, outcome, elapsed, request_intact: !sent }, p)
                }
                Err((crate::h1::Failure::Client, p)) => {
                    let error = ProxyError::Connect("relay failed".into());
                    (
                        AttemptError {
                            error,
                            outcome: Outcome::TcpFailure,
                            elapsed: Duration::ZERO,
                            request_intact: false,
                        },
                        p,
                    )
                }
            }
        } else {
            // Boxed: hyper's client state (~2.6 KiB) would otherwise be part of every request's,
            // and be copied each time one starts.
            match Box::pin(attempt_once(&mut out, &peer, ctx, settings, timeouts, upgrade.is_some())).await {
                Ok(resp) => return Ok(finish_response(resp, peer, ctx, upgrade, timeouts)),
                Err(fail) => (fail, peer),
            }
        };
        peer.report(fail.outcome, fail.elapsed);
        let addr = peer.addr;
        drop(peer);
        let can_resend = fail.request_intact || out.replay.is_some();
        if let Err(answer) = retry.failed(addr, fail.error, can_resend) {
            return Err((answer, out.body));
        }
        if ctx.deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err((ProxyError::DeadlineExceeded, out.body));
        }
        if !fail.request_intact
            && let Some(p) = out.replay.take()
        {
            out.replay = Some(clone_parts(&p));
            out.parts = p;
            out.body = ProxyBody::Empty;
        }
    }
}

/// What a client sent of the headers the gateway rewrites, found in one pass.
#[derive(Default)]
pub(crate) struct Seen {
    /// A hop-by-hop header (or one `Connection` may name).
    pub hop: bool,
    /// The client's `X-Forwarded-For` (several lines joined with `, `, as nginx's
    /// `$proxy_add_x_forwarded_for` does).
    pub xff: Option<HeaderValue>,
    pub real_ip: bool,
    /// Which of [`PROTO`], [`FHOST`], [`PORT`] and [`FORWARDED`] the client sent at all...
    pub sent: u8,
    /// ... and which it sent with a value (APISIX treats an empty one as not sent).
    pub valued: u8,
}

/// `X-Forwarded-Proto`, in [`Seen::sent`] and [`Seen::valued`].
pub(crate) const PROTO: u8 = 1;
/// `X-Forwarded-Host`.
pub(crate) const FHOST: u8 = 2;
/// `X-Forwarded-Port`.
pub(crate) const PORT: u8 = 4;
/// `Forwarded` (RFC 7239).
pub(crate) const FORWARDED: u8 = 8;

impl Seen {
    /// Which of the client's own forwarding headers go on to the node: a trusted client's,
    /// when not empty. Ours replace the others.
    pub(crate) fn kept(&self, trust: ForwardTrust) -> u8 {
        if trust == ForwardTrust::Trusted { self.valued } else { 0 }
    }
}

/// One pass over what the client sent, instead of a lookup per header of interest.
pub(crate) fn scan_forwarding(h: &http::HeaderMap) -> Seen {
    let mut seen = Seen::default();
    for (name, value) in h.iter() {
        let bit = if HOP_BY_HOP.contains(name) {
            seen.hop = true;
            continue;
        } else if name == X_FORWARDED_FOR {
            seen.xff = Some(match seen.xff.take() {
                None => value.clone(),
                Some(prev) => join_values(&prev, value),
            });
            continue;
        } else if name == X_REAL_IP {
            seen.real_ip = true;
            continue;
        } else if name == X_FORWARDED_PROTO {
            PROTO
        } else if name == X_FORWARDED_HOST {
            FHOST
        } else if name == X_FORWARDED_PORT {
            PORT
        } else if name == header::FORWARDED {
            FORWARDED
        } else {
            continue;
        };
        seen.sent |= bit;
        if !value.is_empty() {
            seen.valued |= bit;
        }
    }
    seen
}

/// `a, b`, or the one that is not empty: several `X-Forwarded-For` lines, or the client's
/// `X-Forwarded-For` and its address.
fn join_values(a: &HeaderValue, b: &HeaderValue) -> HeaderValue {
    if a.is_empty() {
        return b.clone();
    }
    if b.is_empty() {
        return a.clone();
    }
    let mut v = Vec::with_capacity(a.len() + 2 + b.len());
    v.extend_from_slice(a.as_bytes());
    v.extend_from_slice(b", ");
    v.extend_from_slice(b.as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).unwrap_or_else(|_| b.clone())
}

/// Drops the hop-by-hop headers, keeping what must go on: `TE: trailers`, and the upgrade of
/// a websocket route.
pub(crate) fn rewrite_hop_by_hop(h: &mut http::HeaderMap, websocket: bool, scheme: Scheme) {
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    let ws = if websocket { h.get(header::UPGRADE).cloned() } else { None };
    strip_hop_by_hop(h);
    if let Some(up) = ws {
        h.insert(header::UPGRADE, up);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers && !scheme.is_grpc() {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Rewrites the client's headers for the upstream once per request (public for benchmarks).
pub fn prepare_request_headers(
    parts: &mut Parts,
    ctx: &ForwardCtx<'_>,
    client_host: Option<&HeaderValue>,
    websocket: bool,
    scheme: Scheme,
) {
    let h = &mut parts.headers;
    let mut seen = scan_forwarding(h);
    if seen.hop {
        rewrite_hop_by_hop(h, websocket, scheme);
        // `Connection` may have named a forwarding header: what is left counts.
        seen = scan_forwarding(h);
    }
    let kept = seen.kept(ctx.trust);
    if seen.sent & !kept & FORWARDED != 0 {
        h.remove(header::FORWARDED);
    }
    let xff = if ctx.trust == ForwardTrust::Untrusted { None } else { seen.xff };
    if scheme.is_grpc() {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // Host is set (HTTP/1.1) or removed (HTTP/2) per attempt, once the node is known.

    let ip_value = ctx.client_ip.clone();
    let xff = match xff {
        Some(prev) => join_values(&prev, &ip_value),
        None => ip_value.clone(),
    };
    h.insert(&X_FORWARDED_FOR, xff);
    h.insert(&X_REAL_IP, ip_value);
    // Ours, unless a trusted client sent its own (insert: the client's others go).
    if kept & PROTO == 0 {
        let proto = if ctx.downstream_tls { "https" } else { "http" };
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if kept & FHOST == 0 {
        match client_host {
            Some(host) => h.insert(&X_FORWARDED_HOST, host.clone()),
            None => h.remove(&X_FORWARDED_HOST),
        };
    }
    if kept & PORT == 0 {
        let value = client_host
            .and_then(host_port)
            .and_then(|p| HeaderValue::from_bytes(p).ok())
            .unwrap_or_else(|| ctx.local_port_value.clone());
        h.insert(&X_FORWARDED_PORT, value);
    }
}

/// Header values that only depend on the connection, computed once per connection.
pub fn connection_values(client: SocketAddr, local_port: u16) -> (HeaderValue, HeaderValue) {
    let ip = HeaderValue::from_str(&client.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
    (ip, HeaderValue::from(local_port))
}

fn clone_parts(p: &Parts) -> Parts {
    let mut b = Request::builder().method(p.method.clone()).uri(p.uri.clone()).version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    let (parts, ()) = b.body(()).map(|r| r.into_parts()).unwrap_or_else(|_| Request::new(()).into_parts());
    parts
}

/// The Host value sent to `peer`, per `pass_host`.
pub(crate) fn upstream_host(
    pass: &PassHost,
    client_host: Option<&HeaderValue>,
    peer: &Peer,
    scheme: Scheme,
) -> HeaderValue {
    match pass {
        PassHost::Pass => client_host.cloned().unwrap_or_else(|| node_host(peer, scheme)),
        PassHost::Node => node_host(peer, scheme),
        PassHost::Rewrite(v) => v.clone(),
    }
}

fn node_host(peer: &Peer, scheme: Scheme) -> HeaderValue {
    let host = &*peer.host;
    let bracket = host.contains(':') && !host.starts_with('[');
    let text = match (peer.port == scheme.default_port(), bracket) {
        (true, false) => host.to_string(),
        (true, true) => format!("[{host}]"),
        (false, false) => format!("{host}:{}", peer.port),
        (false, true) => format!("[{host}]:{}", peer.port),
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("localhost"))
}

/// The TLS server name for `host` (a Host header value): without port and brackets.
pub(crate) fn sni_of(host: &HeaderValue) -> Option<Arc<str>> {
    let s = host.to_str().ok()?;
    let name = if let Some(rest) = s.strip_prefix('[') {
        rest.split(']').next()?
    } else {
        s.rsplit_once(':')
            .map(|(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { s })
            .unwrap_or(s)
    };
    // Names are case-insensitive: one pool for `Example.com` and `example.com`.
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(Arc::from(name.to_ascii_lowercase()));
    }
    Some(Arc::from(name))
}

struct AttemptError {
    error: ProxyError,
    outcome: Outcome,
    elapsed: Duration,
    /// The request was not consumed and can go to another node as it is.
    request_intact: bool,
}

enum Sender {
    H1(Pooled),
    H2(http2::SendRequest<ProxyBody>),
}

/// How long a request waits for a pooled HTTP/1 connection to become ready before it opens a
/// fresh one (normally it is ready at once, or within a turn of the connection's task).
const POOLED_READY_WAIT: Duration = Duration::from_millis(50);

async fn attempt_once(
    out: &mut Outgoing,
    peer: &Peer,
    ctx: &ForwardCtx<'_>,
    settings: &UpstreamSettings,
    timeouts: Timeouts,
    websocket: bool,
) -> Result<(Response<Incoming>, Option<Pooled>, Instant), AttemptError> {
    let start = Instant::now();
    let scheme = settings.scheme;
    let tls = settings.tls.as_deref();
    let keepalive = settings.keepalive;
    let host = upstream_host(&settings.pass_host, out.client_host.as_ref(), peer, scheme);
    let sni = if scheme.is_tls() { sni_of(&host) } else { None };
    let key = PoolKey { addr: peer.addr, tls: tls.map_or(0, |t| t.pool_id), sni };
    let limits = Limits {
        size: keepalive.size,
        idle_timeout: keepalive.idle_timeout,
        max_requests: keepalive.requests,
    };

    let fail = |error: ProxyError, outcome: Outcome, intact: bool| AttemptError {
        error,
        outcome,
        elapsed: start.elapsed(),
        request_intact: intact,
    };

    let read_timeout = match ctx.deadline {
        Some(d) => timeouts.read.min(d.saturating_duration_since(tokio::time::Instant::now())),
        None => timeouts.read,
    };
    let deadline_bound = ctx.deadline.is_some() && read_timeout < timeouts.read;

    // A kept-alive connection can turn out closed only once it is used: the node closed it
    // while it sat in the pool, or right after its last answer (a node that answers before
    // reading a request body, then closes, is common). When such a connection fails before
    // the request left, the request goes once over a fresh connection to the same node; that
    // is not the node failing, and needs no retry budget (hyper's legacy client does the same).
    let mut reuse = true;
    loop {
        let (sender, reused) =
            get_sender(&key, scheme, tls, timeouts, limits, websocket, reuse).await.map_err(|e| {
                let outcome = if e.is_timeout() { Outcome::Timeout } else { Outcome::TcpFailure };
                let err = if e.is_timeout() {
                    ProxyError::Timeout("connect")
                } else {
                    ProxyError::Connect(e.to_string())
                };
                fail(err, outcome, true)
            })?;
        let stale = |e: ProxyError, outcome: Outcome| {
            if reused { None } else { Some(fail(e, outcome, true)) }
        };

        // Build the request for this node.
        let mut parts = std::mem::replace(&mut out.parts, Request::new(()).into_parts().0);
        let body = std::mem::replace(&mut out.body, ProxyBody::Empty);
        let is_h2 = matches!(sender, Sender::H2(_));
        if is_h2 {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let uri_scheme = if scheme.is_tls() { "https" } else { "http" };
            let authority = host.to_str().unwrap_or("localhost");
            parts.uri = Uri::builder()
                .scheme(uri_scheme)
                .authority(authority)
                .path_and_query(pq)
                .build()
                .unwrap_or_else(|_| Uri::from_static("/"));
        } else {
            parts.version = Version::HTTP_11;
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                let pq =
                    parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
                parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
            }
            parts.headers.insert(header::HOST, host.clone());
        }
        let req = Request::from_parts(parts, body);

        let restore = |out: &mut Outgoing, req: Request<ProxyBody>| {
            let (p, b) = req.into_parts();
            out.parts = p;
            out.body = b;
        };

        let (sent, pooled) = match sender {
            Sender::H1(mut pooled) => {
                // A pooled connection that does not become ready at once is still busy with its
                // last exchange (see `pool::checkout_h1`): a fresh one is opened instead.
                let ready = if reused {
                    tokio::time::timeout(POOLED_READY_WAIT, pooled.sender.ready()).await
                } else {
                    Ok(pooled.sender.ready().await)
                };
                let failed = match ready {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("pooled connection still busy".to_string()),
                };
                if let Some(e) = failed {
                    restore(out, req);
                    match stale(ProxyError::Connect(e), Outcome::TcpFailure) {
                        Some(f) => return Err(f),
                        None => {
                            reuse = false;
                            continue;
                        }
                    }
                }
                pooled.uses += 1;
                let fut = pooled.sender.try_send_request(req);
                (tokio::time::timeout(read_timeout, fut).await, Some(pooled))
            }
            Sender::H2(mut sender) => {
                let ready = tokio::time::timeout(timeouts.send, sender.ready()).await;
                if !matches!(ready, Ok(Ok(()))) {
                    restore(out, req);
                    // A shared connection that timed out getting ready is busy, not stale.
                    let err = ProxyError::Connect("HTTP/2 connection not ready".into());
                    if ready.is_err() || !reused {
                        return Err(fail(err, Outcome::TcpFailure, true));
                    }
                    reuse = false;
                    continue;
                }
                let fut = sender.try_send_request(req);
                (tokio::time::timeout(read_timeout, fut).await, None)
            }
        };
        match sent {
            Ok(Ok(resp)) => return Ok((resp, pooled, start)),
            Ok(Err(mut e)) => {
                let Some(r) = e.take_message() else {
                    let (err, outcome) = classify_send_error(&e.into_error());
                    return Err(fail(err, outcome, false));
                };
                restore(out, r);
                let (err, outcome) = classify_send_error(&e.into_error());
                match stale(err, outcome) {
                    Some(f) => return Err(f),
                    None => reuse = false,
                }
            }
            Err(_) => {
                let err =
                    if deadline_bound { ProxyError::DeadlineExceeded } else { ProxyError::Timeout("read") };
                return Err(fail(err, Outcome::Timeout, false));
            }
        }
    }
}

/// Maps a hyper client error to the gateway error the client sees, and the node's outcome.
fn classify_send_error(e: &hyper::Error) -> (ProxyError, Outcome) {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        (ProxyError::InvalidResponse(e.to_string()), Outcome::TcpFailure)
    } else if is_send_timeout(e) {
        (ProxyError::Timeout("send"), Outcome::Timeout)
    } else {
        match grpc::code_for_broken_stream(e) {
            // Refused, or the connection went: the node did not take the request.
            grpc::Code::Unavailable => (ProxyError::Connect(e.to_string()), Outcome::TcpFailure),
            // No retry follows: as a failure after the head, for health checks.
            code => (ProxyError::NodeReset(code, e.to_string()), Outcome::LateTcpFailure),
        }
    }
}

/// Whether a write to the node stalled past `timeout.send` ([`SendTimeout`]).
fn is_send_timeout(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        source = s.source();
    }
    false
}

/// Finds or opens a connection to the node for this key.
async fn get_sender(
    key: &PoolKey,
    scheme: Scheme,
    tls: Option<&crate::tls::ClientTls>,
    timeouts: Timeouts,
    limits: Limits,
    websocket: bool,
    reuse: bool,
) -> Result<(Sender, bool), ConnectError> {
    let h2_capable = !websocket && matches!(scheme, Scheme::Grpc | Scheme::Grpcs | Scheme::Https);
    if reuse
        && h2_capable
        && let Some(s) = pool::checkout_h2(key)
    {
        return Ok((Sender::H2(s), true));
    }
    if reuse
        && !matches!(scheme, Scheme::Grpc | Scheme::Grpcs)
        && let Some(p) = pool::checkout_h1(key, limits)
    {
        return Ok((Sender::H1(p), true));
    }
    let tcp = connect_tcp(key.addr, timeouts.connect).await?;
    let stream = match (scheme.is_tls(), tls) {
        (true, Some(t)) => {
            let cfg = match scheme {
                Scheme::Grpcs => t.h2.clone(),
                _ if websocket => t.raw.clone(),
                _ => t.auto.clone(),
            };
            let sni = key.sni.as_deref().unwrap_or("localhost");
            NodeStream::Tls(Box::new(connect_tls(tcp, key.addr, cfg, sni, timeouts.connect).await?))
        }
        _ => NodeStream::Plain(tcp),
    };
    let use_h2 = scheme.is_grpc() || stream.alpn() == Some(b"h2");
    let io = TokioIo::new(SendTimeout::new(stream, timeouts.send));
    if use_h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Io(key.addr, std::io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        pool::store_h2(key.clone(), sender.clone());
        Ok((Sender::H2(sender), false))
    } else {
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(256 * 1024)
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Io(key.addr, std::io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok((Sender::H1(Pooled::new(key.clone(), sender, limits)), false))
    }
}

/// Turns a node's response into the client's response: reports the outcome, strips hop-by-hop
/// headers, and wraps the body so the connection is reused once the body is done.
fn finish_response(
    (resp, pooled, start): (Response<Incoming>, Option<Pooled>, Instant),
    peer: Peer,
    ctx: &ForwardCtx<'_>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    timeouts: Timeouts,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();

    if parts.status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_up) = upgrade
    {
        peer.report_since(Outcome::HttpStatus(101), start);
        let node_up = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
        let held = ctx.tunnel_hold.map(|hold| (hold.0)());
        tokio::spawn(async move {
            let _peer = peer; // in flight until the tunnel closes
            let _held = held;
            if let (Ok(c), Ok(n)) = (client_up.await, node_up.await) {
                let mut c = TokioIo::new(c);
                let mut n = TokioIo::new(n);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut n).await;
            }
        });
        parts.version = Version::HTTP_11;
        return Response::from_parts(parts, ProxyBody::Empty);
    }

    let grpc_call = ctx.grpc || ctx.grpc_node;
    let grpc_status = if grpc_call { grpc::status_of(&parts.headers) } else { None };
    let grpc_pending = grpc_call && grpc_status.is_none() && parts.status == StatusCode::OK;
    match grpc_status {
        Some(code) => peer.report_since(Outcome::GrpcStatus(code), start),
        None if !grpc_pending => peer.report_since(Outcome::HttpStatus(parts.status.as_u16()), start),
        None => {}
    }

    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;

    let body = if body.is_end_stream() && !grpc_pending {
        // Nothing more to read: the connection can serve the next request right away.
        if let Some(p) = pooled {
            p.release();
        }
        ProxyBody::Empty
    } else {
        let policy = BodyPolicy {
            read_timeout: timeouts.read,
            deadline: ctx.deadline,
            grpc_client: ctx.grpc,
            grpc_pending,
        };
        ProxyBody::Upstream(Box::new(UpstreamBody::new(body, policy, pooled, peer, start)))
    };
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_a_host_names() {
        for (host, want) in [
            ("example.com:8443", Some("8443")),
            ("[::1]:80", Some("80")),
            ("example.com", None),
            ("[::1]", None),
            ("example.com:", None),
            ("example.com:123456", None),
            (":80", None),
            ("a:80", Some("80")),
        ] {
            let v = HeaderValue::from_static(host);
            assert_eq!(host_port(&v), want.map(str::as_bytes), "{host}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn sni_drops_port_and_brackets() {
        assert_eq!(&*sni_of(&HeaderValue::from_static("api.test:8443")).unwrap(), "api.test");
        assert_eq!(&*sni_of(&HeaderValue::from_static("api.test")).unwrap(), "api.test");
        assert_eq!(&*sni_of(&HeaderValue::from_static("[::1]:443")).unwrap(), "::1");
    }

    #[test]
    fn node_host_omits_default_port() {
        let p = Peer::detached("127.0.0.1:80".parse().unwrap());
        assert_eq!(node_host(&p, Scheme::Http), "127.0.0.1");
        let p = Peer::detached("127.0.0.1:8080".parse().unwrap());
        assert_eq!(node_host(&p, Scheme::Http), "127.0.0.1:8080");
        let p = Peer::detached("[::1]:443".parse().unwrap());
        assert_eq!(node_host(&p, Scheme::Https), "[::1]");
    }
}
