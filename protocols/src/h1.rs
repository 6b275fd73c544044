//! The HTTP/1.1 relay for the common case: a request from an HTTP/1.1 client (plain or TLS)
//! without a body or with one framed by `Content-Length` (up to [`BODY_MAX`] read whole first,
//! larger ones streamed: [`forward_streamed`]) or by chunked transfer coding (streamed),
//! forwarded to an `http` node (or an `https` one, over TLS), its response relayed byte for
//! byte.
//!
//! The general path (hyper's server and client, [`crate::http::forward`]) costs two tasks, a
//! channel and a full decode and re-encode per request. This one runs the whole exchange in the
//! client connection's task: the request (head and body in one write) goes straight to a pooled
//! node socket, the response head is parsed with httparse and rewritten once, and the body bytes
//! (content-length, chunked or until close) are copied as they are, chunk framing included.
//! Everything it does not handle is decided before anything is sent, and goes to the general
//! path: see [`eligible`]. The general path uses the same node connections for its requests to
//! `http` and `https` nodes: without a body or with a small one of known length (`attempt`), or with
//! any other body, streamed (`attempt_streamed`). There the response head becomes a
//! `Response` and the body is decoded as the client reads it.
//!
//! The semantics are the general path's: the same header rewriting
//! ([`crate::http::prepare_request_headers`]), `pass_host`, timeouts (`connect`, `send` per
//! write, `read` for the head and between body reads), retries and `retry_timeout`, passive
//! health reports, keep-alive pool limits, and the same error answers.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connect::NodeStream;
use crate::pool::PoolKey;

use crate::body::ProxyBody;
use crate::fxhash::FxHashMap;
use crate::http::{ForwardCtx, ForwardTrust, idempotent, upstream_host};
use crate::respond::error_response;
use crate::retry::{Retry, Shown};
use crate::{
    KeepalivePool, Outcome, Peer, ProxyError, Scheme, UpstreamPicker, UpstreamSettings, connect_tcp,
};

/// Most headers a node's response head may carry.
const MAX_HEADERS: usize = 128;
/// Largest node response head.
const MAX_HEAD: usize = 64 * 1024;
/// Node read buffer, per request in flight (see [`crate::spare`]).
const BODY_CHUNK: usize = crate::spare::NODE_BUF;
/// Answers up to this size that came whole with their head are copied out of the node read
/// buffer for the general path, which then goes back to the worker's spares.
const SMALL_ANSWER: usize = 4096;
/// Buffer for a request body streamed from the client to the node.
const STREAM_CHUNK: usize = 64 * 1024;

/// Largest request body the relay reads whole before it picks a node (as nginx does with
/// `proxy_request_buffering`), so that a failed connect can be retried elsewhere with the same
/// body. Larger bodies are streamed to the node as they come ([`forward_streamed`]).
pub const BODY_MAX: u64 = 64 * 1024;

/// How a request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqBody {
    /// `Content-Length` (0 without a body).
    Length(u64),
    /// `Transfer-Encoding: chunked`: always streamed.
    Chunked,
}

/// Whether a parsed client request can take this path, and how its body is framed: HTTP/1.1,
/// one `Content-Length` (or none) or `Transfer-Encoding: chunked` alone, no upgrade, no `Expect`
/// other than `100-continue`, and a keep-alive connection. (The route decides the rest: a plain
/// `http` upstream, no transcoding.)
pub fn eligible(parts: &Parts) -> Option<ReqBody> {
    if parts.version != http::Version::HTTP_11 || parts.method == Method::CONNECT {
        return None;
    }
    let h = &parts.headers;
    if h.contains_key(header::UPGRADE) {
        return None;
    }
    let mut expect = h.get_all(header::EXPECT).iter();
    if let Some(e) = expect.next()
        && (!e.as_bytes().eq_ignore_ascii_case(b"100-continue") || expect.next().is_some())
    {
        return None;
    }
    if h.get_all(header::CONNECTION).iter().any(|c| has_token(c.as_bytes(), b"close")) {
        return None;
    }
    // Chunked alone, said once: a Content-Length beside it, or another coding, is for hyper to
    // refuse (request smuggling, RFC 9112 section 6.3).
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(v) = te.next() {
        let chunked = v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked");
        if !chunked || te.next().is_some() || h.contains_key(header::CONTENT_LENGTH) {
            return None;
        }
        return Some(ReqBody::Chunked);
    }
    // Every Content-Length must be plain digits and say the same: with two different ones the
    // node might read a body other than the one the relay sends, and the connection's next
    // request with it (request smuggling). hyper answers the rest (400 for conflicting lengths).
    let mut len = None;
    for cl in h.get_all(header::CONTENT_LENGTH) {
        let v = cl.as_bytes();
        if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if len.is_some_and(|l| l != n) {
            return None;
        }
        len = Some(n);
    }
    Some(ReqBody::Length(len.unwrap_or(0)))
}

/// A request body the relay streams: the part already read, and how to find the rest.
pub struct StreamedBody {
    prefix: BytesMut,
    /// Bytes still to come for a `Content-Length` body; for a chunked one, 1 until its end was
    /// seen, then 0.
    left: u64,
    chunks: Option<ChunkedState>,
}

impl StreamedBody {
    /// Drops the request head (`head` bytes) from the start of `buf` and takes what follows of
    /// the body, nothing past its end (a pipelined request stays there). `None`, with `buf` left
    /// as it was, when chunk framing is already invalid.
    pub fn start(body: ReqBody, buf: &mut BytesMut, head: usize) -> Option<StreamedBody> {
        match body {
            ReqBody::Length(n) => {
                buf.advance(head);
                let prefix = buf.split_to(buf.len().min(n as usize));
                Some(StreamedBody { left: n - prefix.len() as u64, prefix, chunks: None })
            }
            ReqBody::Chunked => {
                let mut chunks = ChunkedState::default();
                // A body whose framing is invalid goes to hyper as it came (`feed_request` cuts
                // nothing out of one that failed).
                let (used, kept, done) = chunks.feed_request(&mut buf[head..]);
                if chunks.failed {
                    return None;
                }
                buf.advance(head);
                let mut prefix = buf.split_to(used);
                prefix.truncate(kept);
                Some(StreamedBody { prefix, left: u64::from(!done), chunks: Some(chunks) })
            }
        }
    }
}

/// Whether the client asked for `100 Continue` before it sends its body.
pub fn expects_continue(parts: &Parts) -> bool {
    parts.headers.contains_key(header::EXPECT)
}

/// Whether a comma-separated header value lists `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// What the client connection does after a relayed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    KeepAlive,
    /// Close: the response was delimited by the node closing, or writing to the client failed.
    Close,
    /// Close, but first let the client finish sending: the rest of its request body was never
    /// read (the node answered before it came). Closing a socket with unread bytes resets the
    /// connection, and the client could lose the answer with it.
    Linger,
}

/// Forwards one request (already checked with [`eligible`]), with its whole `body`, and writes
/// the response, or the gateway's error answer, to `client`.
pub async fn forward<C: AsyncWrite + Unpin, P: UpstreamPicker + ?Sized>(
    client: &mut C,
    mut parts: Parts,
    body: &[u8],
    ctx: &ForwardCtx<'_>,
    picker: &P,
) -> After {
    let settings = picker.settings();
    let timeouts = ctx.timeouts.unwrap_or(settings.timeouts);
    let fwd = prepare_head(&mut parts, ctx);
    if !body.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
        // Said once, by the relay: a client's `Connection: content-length` must not leave the
        // node without the body's length, and a client's `0` and `000` go as one `0`.
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let head_only = parts.method == Method::HEAD;
    let resend_ok = idempotent(&parts.method);

    let mut retry = Retry::new(picker).show_every_status(ctx.show_upstream_status);
    loop {
        let peer = match retry.pick(picker, ctx.hash_key) {
            Ok(p) => p,
            Err(e) => return answer_error(client, &e, head_only, retry.upstream_status(Err(&e))).await,
        };
        let host = upstream_host(&settings.pass_host, fwd.client_host.as_ref(), &peer, settings.scheme);
        let mut head = request_head(&parts, &host, Some(&fwd));
        head.extend_from_slice(body);
        let addr = peer.addr;
        let Some(target) = Target::of(settings, addr, &host) else {
            let e = ProxyError::Connect("scheme not relayed".into());
            return answer_error(client, &e, head_only, None).await;
        };
        // The relay lets go of the peer (least_conn's in-flight count) once the node's answer is
        // all read, before the last bytes go to the client.
        let mut slot = Some(peer);
        match exchange(
            client,
            &head,
            &mut slot,
            &target,
            settings.keepalive,
            timeouts,
            head_only,
            resend_ok,
            retry.shown(),
        )
        .await
        {
            Ok(after) => return after,
            Err(Failure::Client) => return After::Close,
            Err(Failure::Node { error, outcome, elapsed, sent }) => {
                if let Some(peer) = slot.take() {
                    peer.report(outcome, elapsed);
                }
                if let Err(answer) = retry.failed(addr, error, !sent || resend_ok) {
                    return answer_error(client, &answer, head_only, retry.upstream_status(Err(&answer)))
                        .await;
                }
            }
        }
    }
}

/// Forwards one request whose body is streamed (too large to read whole first, or chunked):
/// the head and the part of the body already read go to the node, then the rest is copied from
/// `client` as the node takes it, each wait for the client bounded by `body_timeout`. Bytes the
/// client sent past a chunked body's end are added to `rest`. An answer that comes before the
/// body is all sent is relayed at once, while the body goes on. After it, the rest of the body
/// goes to a node that keeps its connection (which is then pooled), and is read and dropped
/// otherwise; the client's connection stays open, unless the node said it closes (then a client
/// whose body was not all read loses its connection, after a lingering read). Only a failed
/// connect is retried: the body is not kept.
pub async fn forward_streamed<C, P>(
    client: &mut C,
    mut parts: Parts,
    body: StreamedBody,
    rest: &mut BytesMut,
    ctx: &ForwardCtx<'_>,
    picker: &P,
) -> After
where
    C: AsyncRead + AsyncWrite + Unpin,
    P: UpstreamPicker + ?Sized,
{
    let settings = picker.settings();
    let timeouts = ctx.timeouts.unwrap_or(settings.timeouts);
    let fwd = prepare_head(&mut parts, ctx);
    let StreamedBody { prefix, mut left, chunks } = body;
    if chunks.is_some() {
        parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    } else {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(prefix.len() as u64 + left));
    }
    let head_only = parts.method == Method::HEAD;
    let mut retry = Retry::new(picker).show_every_status(ctx.show_upstream_status);
    loop {
        let peer = match retry.pick(picker, ctx.hash_key) {
            Ok(p) => p,
            Err(e) => {
                let status = retry.upstream_status(Err(&e));
                return answer_error(client, &e, head_only, status).await.unless_unread(left);
            }
        };
        let host = upstream_host(&settings.pass_host, fwd.client_host.as_ref(), &peer, settings.scheme);
        let mut head = request_head(&parts, &host, Some(&fwd));
        head.extend_from_slice(&prefix);
        let addr = peer.addr;
        let Some(target) = Target::of(settings, addr, &host) else {
            let e = ProxyError::Connect("scheme not relayed".into());
            return answer_error(client, &e, head_only, None).await.unless_unread(left);
        };
        let mut slot = Some(peer);
        let body_timeout = ctx.body_timeout;
        let attempt =
            StreamedAttempt { body_timeout, target, keepalive: settings.keepalive, timeouts, head_only };
        let mut pump = BodyPump::new(left, chunks.clone());
        let ran = attempt.run(client, &head, &mut pump, &mut slot, retry.shown()).await;
        left = pump.left;
        rest.extend_from_slice(&pump.excess);
        match ran {
            Ok(after) => return after,
            Err(Failure::Client) => return After::Close,
            Err(Failure::Node { error, outcome, elapsed, sent }) => {
                if let Some(peer) = slot.take() {
                    peer.report(outcome, elapsed);
                }
                if let Err(answer) = retry.failed(addr, error, !sent) {
                    let status = retry.upstream_status(Err(&answer));
                    return answer_error(client, &answer, head_only, status).await.unless_unread(left);
                }
            }
        }
    }
}

impl After {
    /// `self`, unless `left` bytes of the request body are still unread: then the connection
    /// must close after the answer.
    fn unless_unread(self, left: u64) -> After {
        if left > 0 && self == After::KeepAlive { After::Linger } else { self }
    }
}

/// The settings of one attempt of [`forward_streamed`].
struct StreamedAttempt {
    body_timeout: Duration,
    target: Target,
    keepalive: KeepalivePool,
    timeouts: crate::Timeouts,
    head_only: bool,
}

impl StreamedAttempt {
    /// Sends `head` (with the start of the body), then the rest of the body from `client`
    /// (`left` counts down as it is read), then relays the answer. An answer that starts before
    /// the body is all sent is relayed at once while the body goes on; see [`forward_streamed`]
    /// for the rest of the body.
    async fn run<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut C,
        head: &[u8],
        body: &mut BodyPump,
        peer: &mut Option<Peer>,
        shown: Shown<'_>,
    ) -> Result<After, Failure> {
        let start = Instant::now();
        // A body is never sent twice, so a pooled connection is checked with a syscall too.
        let pooled = checkout(&self.target.key, self.keepalive, true, start);
        let (mut node, uses, ..) = open_and_send(head, pooled, &self.target, self.timeouts, start).await?;
        let mut early = BytesMut::new();
        let whole = match self.pump(client, &mut node, body, &mut early).await {
            Ok(whole) => whole,
            Err(PumpError::Client) => return Err(Failure::Client),
            // The connection closes after these, with a lingering read: a client that sends
            // again must not reset the answer away.
            Err(PumpError::ClientTimeout) => {
                let e = ProxyError::Status(408, "request body timed out".into());
                return Ok(answer_error(client, &e, self.head_only, None).await.unless_unread(1));
            }
            Err(PumpError::BadBody) => {
                let e = ProxyError::BadRequest("invalid chunked request body".into());
                return Ok(answer_error(client, &e, self.head_only, None).await.unless_unread(1));
            }
            Err(PumpError::Node(error, outcome)) => return Err(node_failure(error, outcome, start, true)),
        };
        let got = read_head(
            node,
            uses,
            early,
            read_deadline(self.timeouts.read),
            self.head_only,
            HeadFor::Bytes,
            start,
        )
        .await?;
        if whole {
            let read = self.timeouts.read;
            return relay_response(client, got, peer, &self.target.key, self.keepalive, read, start, shown)
                .await;
        }
        // The node answered first. The answer goes to the client as it comes, and the body to
        // the node for as long as the answer lasts (a node may answer as it reads, an echo). A
        // node that says it will close wants no more of the body: the client is told that its
        // connection closes too.
        let Received { mut node, uses, buf, head: parsed } = got;
        if let Some(p) = peer.as_ref() {
            p.report_since(Outcome::HttpStatus(parsed.status), start);
        }
        let client_close = !parsed.keepalive || parsed.framing == Framing::UntilClose;
        let mut out = parsed.head;
        end_head(&mut out, client_close, shown, parsed.status);
        let relay =
            Duplex { framing: parsed.framing, read_timeout: self.timeouts.read, keep_body: !client_close };
        let clean = match relay.run(client, &mut node, body, out, buf, peer).await {
            Ok(clean) => clean,
            Err(broken) => return Err(broken.failure(peer.as_ref(), start)),
        };
        let mut reuse = clean && !client_close && !body.dropped;
        if !client_close && !body.done() {
            // The answer is whole and the client may send its next request here once its body
            // has come. The rest goes to the node if it keeps its connection (then pooled, not
            // closed), or is read and dropped.
            if !reuse {
                body.drop_rest();
            }
            match self.send_rest(client, &mut node, body).await {
                Ok(whole) => reuse &= whole,
                Err(_) => return Ok(After::Close),
            }
        }
        if reuse && body.done() {
            checkin(&self.target.key, node, uses + 1, self.keepalive);
        }
        // A client whose body was not all read (the node said it closes) cannot send its next
        // request here: the connection closes, whatever the answer said.
        Ok(match (body.left, client_close) {
            (1.., _) => After::Linger,
            (0, true) => After::Close,
            (0, false) => After::KeepAlive,
        })
    }

    /// The rest of a body whose answer has ended: copied from `client` to `node` as the node
    /// takes it, each wait for the client bounded by the body timeout and each write by the
    /// send timeout, or read and dropped once [`BodyPump::drop_rest`] was called. A node that
    /// fails or takes nothing for the send timeout is given up and the rest dropped:
    /// `Ok(false)`, its connection is not reused. `Ok(true)`: the node has the whole body.
    async fn send_rest<C: AsyncRead + Unpin>(
        &self,
        client: &mut C,
        node: &mut Node,
        body: &mut BodyPump,
    ) -> Result<bool, PumpError> {
        let mut last = tokio::time::Instant::now();
        loop {
            if body.done() {
                return Ok(!body.dropped);
            }
            let writing = body.writing();
            let limit = if writing { self.timeouts.send } else { self.body_timeout };
            let step = std::future::poll_fn(|cx| body.poll_step(cx, client, node));
            match tokio::time::timeout_at(last + limit, step).await {
                Err(_) if writing => body.drop_rest(),
                Err(_) => return Err(PumpError::ClientTimeout),
                Ok(step) => match body.apply(step) {
                    Ok(()) => {}
                    Err(PumpError::Node(..)) => body.drop_rest(),
                    Err(e) => return Err(e),
                },
            }
            last = tokio::time::Instant::now();
        }
    }

    /// Copies the body from `client` to `node` until it is all sent (`Ok(true)`) or the node
    /// starts answering (`Ok(false)`: a complete answer head, or the node stopped sending, is in
    /// `early`). 1xx interim answers are dropped and the body goes on.
    async fn pump<C: AsyncRead + Unpin>(
        &self,
        client: &mut C,
        node: &mut Node,
        body: &mut BodyPump,
        early: &mut BytesMut,
    ) -> Result<bool, PumpError> {
        enum Step {
            NodeReadable,
            Body(PumpStep),
        }
        // The timeouts count from the body's last progress: bytes from the node that are not
        // yet an answer do not restart them.
        let mut last = tokio::time::Instant::now();
        loop {
            if body.done() {
                return Ok(true);
            }
            let writing = body.writing();
            let limit = if writing { self.timeouts.send } else { self.body_timeout };
            let step = std::future::poll_fn(|cx| {
                // An answer (or a close) from the node comes first.
                if node.poll_readable(cx).is_ready() {
                    return Poll::Ready(Step::NodeReadable);
                }
                body.poll_step(cx, client, node).map(Step::Body)
            });
            match tokio::time::timeout_at(last + limit, step).await {
                Err(_) if writing => {
                    return Err(PumpError::Node(ProxyError::Timeout("send"), Outcome::Timeout));
                }
                Err(_) => return Err(PumpError::ClientTimeout),
                Ok(Step::Body(step)) => match body.apply(step) {
                    Ok(()) => last = tokio::time::Instant::now(),
                    // A node that answers and closes without reading the rest resets the
                    // connection, and the write fails: its answer may be waiting all the same.
                    Err(PumpError::Node(e, outcome)) => {
                        return match node_said(node, early, self.head_only, true) {
                            Ok(true) => Ok(false),
                            _ => Err(PumpError::Node(e, outcome)),
                        };
                    }
                    Err(e) => return Err(e),
                },
                Ok(Step::NodeReadable) => {
                    if node_said(node, early, self.head_only, false)? {
                        return Ok(false);
                    }
                }
            }
        }
    }
}

/// Reads what the node sent while its request body was still going out, and drops 1xx
/// interim answers from it: whether an answer's head is complete (or the node stopped
/// sending after part of one). A node that closed the connection without a word is a
/// failure. After a failed write (`reset`), the kernel is asked even if the reactor has not
/// yet said that the socket is readable.
fn node_said(node: &mut Node, early: &mut BytesMut, head_only: bool, reset: bool) -> Result<bool, PumpError> {
    if early.capacity() - early.len() < 4096 {
        early.reserve(4096);
    }
    let polled = if reset {
        // Asked of the kernel, whatever the reactor knows, until the head is complete or
        // nothing more is there: data that came before a reset is still read before the
        // reset's error.
        let mut chunk = [0u8; 4096];
        loop {
            match node.read_from_kernel(&mut chunk) {
                Ok(n @ 1..) => {
                    early.extend_from_slice(&chunk[..n]);
                    if answer_head(early, head_only) {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Poll::Pending,
                other => break Poll::Ready(other),
            }
        }
    } else {
        node.read_now(early)
    };
    match polled {
        // Nothing after all (the readiness is cleared now), or more of what came.
        Poll::Pending | Poll::Ready(Ok(1..)) => {}
        Poll::Ready(Ok(0)) if early.is_empty() => {
            let e =
                ProxyError::BadResponse("node closed the connection before the request body was sent".into());
            return Err(PumpError::Node(e, Outcome::TcpFailure));
        }
        Poll::Ready(Err(e)) if early.is_empty() => {
            return Err(PumpError::Node(ProxyError::Connect(e.to_string()), Outcome::TcpFailure));
        }
        // The node stopped sending after part of a head: the head reader says what is wrong.
        Poll::Ready(_) => return Ok(true),
    }
    Ok(answer_head(early, head_only))
}

/// Drops complete 1xx interim heads (not 101) from the start of `buf`; whether a final answer's
/// head (or something that is not one, for the head reader to refuse) is there in full.
fn answer_head(buf: &mut BytesMut, head_only: bool) -> bool {
    loop {
        match parse_response(buf, head_only, HeadFor::Map) {
            Ok(Some(p)) if (100..200).contains(&p.status) && p.status != 101 => buf.advance(p.len),
            Ok(None) => return buf.len() >= MAX_HEAD,
            _ => return true,
        }
    }
}

/// A request body on its way from the client to the node, through one buffer.
struct BodyPump {
    chunk: Vec<u8>,
    /// The part of `chunk` read from the client and not yet written to the node.
    from: usize,
    to: usize,
    /// Bytes of the body the client has yet to send (for a chunked body: 1 until its end).
    left: u64,
    /// The framing of a chunked body, followed to find its end.
    chunks: Option<ChunkedState>,
    /// What the client sent after a chunked body's end: the start of its next request.
    excess: BytesMut,
    /// Part of the body was dropped instead of sent: the node connection is not reused.
    dropped: bool,
    /// What was written is still in the node's TLS session, to be flushed.
    flush: bool,
}

/// One read from the client, or one write to the node.
enum PumpStep {
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
}

impl BodyPump {
    fn new(left: u64, chunks: Option<ChunkedState>) -> BodyPump {
        let size = match chunks {
            Some(_) if left > 0 => STREAM_CHUNK,
            _ => left.min(STREAM_CHUNK as u64) as usize,
        };
        BodyPump {
            chunk: vec![0; size],
            from: 0,
            to: 0,
            left,
            chunks,
            excess: BytesMut::new(),
            dropped: false,
            flush: false,
        }
    }

    /// The whole body reached the node.
    fn done(&self) -> bool {
        self.from == self.to && !self.flush && self.left == 0
    }

    /// Bytes are waiting for the node (rather than for the client).
    fn writing(&self) -> bool {
        self.from < self.to || self.flush
    }

    /// The node gets no more of the body: what is waiting for it is dropped, and so is the rest
    /// as it is read ([`BodyPump::apply`]).
    fn drop_rest(&mut self) {
        self.from = self.to;
        self.flush = false;
        self.dropped = true;
    }

    fn poll_step<C: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        node: &mut Node,
    ) -> Poll<PumpStep> {
        if self.from < self.to {
            let wrote = std::pin::Pin::new(&mut node.stream).poll_write(cx, &self.chunk[self.from..self.to]);
            self.flush = node.unflushed();
            wrote.map(PumpStep::Wrote)
        } else if self.flush {
            std::pin::Pin::new(&mut node.stream).poll_flush(cx).map(PumpStep::Flushed)
        } else {
            let want = match self.chunks {
                Some(_) => self.chunk.len(),
                None => self.left.min(self.chunk.len() as u64) as usize,
            };
            let mut rb = tokio::io::ReadBuf::new(&mut self.chunk[..want]);
            std::pin::Pin::new(client)
                .poll_read(cx, &mut rb)
                .map(|r| PumpStep::Read(r.map(|()| rb.filled().len())))
        }
    }

    fn apply(&mut self, step: PumpStep) -> Result<(), PumpError> {
        match step {
            PumpStep::Read(Ok(0) | Err(_)) => return Err(PumpError::Client),
            PumpStep::Read(Ok(n)) => match &mut self.chunks {
                Some(chunks) => {
                    let (used, kept, done) = chunks.feed_request(&mut self.chunk[..n]);
                    if chunks.failed {
                        return Err(PumpError::BadBody);
                    }
                    (self.from, self.to) = (0, kept);
                    if done {
                        self.left = 0;
                        self.excess.extend_from_slice(&self.chunk[used..n]);
                    }
                }
                None => {
                    (self.from, self.to) = (0, n);
                    self.left -= n as u64;
                }
            },
            PumpStep::Wrote(Ok(0)) => {
                let e = ProxyError::Connect("the node takes no more bytes".into());
                return Err(PumpError::Node(e, Outcome::TcpFailure));
            }
            PumpStep::Wrote(Ok(n)) => self.from += n,
            PumpStep::Wrote(Err(e)) | PumpStep::Flushed(Err(e)) => {
                return Err(PumpError::Node(ProxyError::Connect(e.to_string()), Outcome::TcpFailure));
            }
            PumpStep::Flushed(Ok(())) => self.flush = false,
        }
        if self.dropped {
            self.from = self.to;
            self.flush = false;
        }
        Ok(())
    }
}

/// Why the copy of a request body stopped.
enum PumpError {
    /// The client closed its connection or failed.
    Client,
    /// The client sent nothing for the body timeout.
    ClientTimeout,
    /// The client's chunk framing is invalid.
    BadBody,
    Node(ProxyError, Outcome),
}

/// The relay of an answer that began while its request body was still on the way: both go on
/// at once in this task, until the answer has ended. Nothing waits for one direction while the
/// other could move, so a node that echoes the body as it reads it, and a client that sends the
/// whole body before it reads, are both served.
struct Duplex {
    framing: Framing,
    read_timeout: Duration,
    /// The node keeps its connection: once its answer has ended, the body still goes to it
    /// (rather than being dropped) for as long as it takes it.
    keep_body: bool,
}

impl Duplex {
    /// Writes `head` and relays the answer (`buf` holds what followed its head) while the body
    /// goes on. `Ok(true)` when the answer ended exactly where its framing said; the body may
    /// still be unfinished (`body` says). A body the node no longer takes (it failed a write) is
    /// left, and the answer goes on. No progress either way for `read_timeout` is a timeout.
    async fn run<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut C,
        node: &mut Node,
        body: &mut BodyPump,
        head: Vec<u8>,
        mut buf: BytesMut,
        peer: &mut Option<Peer>,
    ) -> Result<bool, Broken> {
        let framing = self.framing;
        let mut answer = AnswerEnd::new(framing);
        // Invalid framing in what came with the head: the client has nothing yet, and gets the
        // gateway's answer instead.
        let (n, mut ended) = answer.take(&buf).ok_or(Broken::BeforeHead)?;
        let mut take = |buf: &BytesMut| answer.take(buf).ok_or(Broken::Node(Outcome::TcpFailure));
        let mut out = BytesMut::from(&head[..]);
        out.extend_from_slice(&buf[..n]);
        buf.advance(n);
        let mut clean = ended && buf.is_empty();
        if ended {
            *peer = None;
        }
        let mut flush = false;
        let mut body_open = !body.done();
        let mut timer = Box::pin(tokio::time::sleep(self.read_timeout));
        std::future::poll_fn(|cx| {
            loop {
                let mut moved = false;
                // The answer first: to the client, then more of it from the node.
                if !out.is_empty() {
                    match std::pin::Pin::new(&mut *client).poll_write(cx, &out) {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(Broken::Client)),
                        Poll::Ready(Ok(n)) => {
                            out.advance(n);
                            flush = out.is_empty();
                            moved = true;
                        }
                        Poll::Pending => {}
                    }
                }
                if out.is_empty() && flush {
                    match std::pin::Pin::new(&mut *client).poll_flush(cx) {
                        Poll::Ready(Ok(())) => flush = false,
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(Broken::Client)),
                        Poll::Pending => {}
                    }
                }
                if out.is_empty() && !flush && ended {
                    return Poll::Ready(Ok(clean));
                }
                if out.is_empty() && !ended {
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(STREAM_CHUNK);
                    }
                    match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut node.stream), cx, &mut buf) {
                        Poll::Ready(Ok(0)) if framing == Framing::UntilClose => {
                            (ended, clean) = (true, false);
                            moved = true;
                        }
                        Poll::Ready(Ok(0) | Err(_)) => {
                            return Poll::Ready(Err(Broken::Node(Outcome::TcpFailure)));
                        }
                        Poll::Ready(Ok(_)) => {
                            let (n, done) = take(&buf)?;
                            out = buf.split_to(n);
                            if done {
                                (ended, clean) = (true, buf.is_empty());
                                *peer = None;
                            }
                            moved = true;
                        }
                        Poll::Pending => {}
                    }
                }
                // Then the body, for as long as the node takes it. Once the node's answer is all
                // read, the rest of the body is read and dropped instead, unless the node keeps
                // its connection (and then once it stops taking it, below): a client that reads
                // only after it has sent everything still gets the rest of the answer.
                if body_open && !body.done() {
                    if ended && !(self.keep_body && clean) {
                        body.drop_rest();
                    }
                    if !body.done()
                        && let Poll::Ready(step) = body.poll_step(cx, client, node)
                    {
                        match body.apply(step) {
                            Ok(()) => moved = true,
                            // A client that stops sending (a half-close) may still read.
                            Err(_) => body_open = false,
                        }
                    }
                }
                if moved {
                    timer.as_mut().reset(tokio::time::Instant::now() + self.read_timeout);
                    continue;
                }
                if timer.as_mut().poll(cx).is_ready() {
                    if ended && body.writing() {
                        // The answer is whole but waits for a client that sends before it
                        // reads, and the node takes no more of the body: the rest is dropped.
                        body.drop_rest();
                        timer.as_mut().reset(tokio::time::Instant::now() + self.read_timeout);
                        continue;
                    }
                    // Nothing moved: the node did not answer on, unless the wait was for the
                    // client's body (an echo waits for it), which is not the node's fault.
                    let client_stalled = body_open && !body.done() && !body.writing();
                    let fault = if client_stalled { Broken::Client } else { Broken::Node(Outcome::Timeout) };
                    return Poll::Ready(Err(fault));
                }
                return Poll::Pending;
            }
        })
        .await
    }
}

/// Rewrites a client's request head for the node (hop-by-hop headers dropped, the client's
/// `X-Forwarded-For` and `X-Real-IP` taken out to be written anew) and takes its `Host` out;
/// returns the forwarding headers to write, with the client's host (for `pass_host` too).
fn prepare_head<'a>(parts: &mut Parts, ctx: &ForwardCtx<'a>) -> Forwarding<'a> {
    // The Host line is written apart from the map (`request_head`): the client's leaves it. An
    // absolute-form target's host wins over the Host header, as it does for routing (RFC 9112
    // §3.2.2: a proxy sends the target's host, not the Host it received).
    let header_host = parts.headers.remove(header::HOST);
    let client_host = crate::http::target_host(&parts.uri).or(header_host);
    let h = &mut parts.headers;
    let mut seen = crate::http::scan_forwarding(h);
    if seen.hop {
        crate::http::rewrite_hop_by_hop(h, false, Scheme::Http);
        // `Connection` may have named a forwarding header: what is left counts.
        seen = crate::http::scan_forwarding(h);
    }
    if seen.xff.is_some() {
        h.remove(&crate::http::X_FORWARDED_FOR);
    }
    if seen.real_ip {
        h.remove(&crate::http::X_REAL_IP);
    }
    // A trusted client's own X-Forwarded-Proto/-Host/-Port and Forwarded stay (when not
    // empty); the client's others are replaced by ours (`ForwardTrust`).
    let kept = seen.kept(ctx.trust);
    let dropped = seen.sent & !kept;
    if dropped != 0 {
        use crate::http::{FHOST, FORWARDED, PORT, PROTO};
        for (bit, name) in [
            (PROTO, &crate::http::X_FORWARDED_PROTO),
            (FHOST, &crate::http::X_FORWARDED_HOST),
            (PORT, &crate::http::X_FORWARDED_PORT),
            (FORWARDED, &header::FORWARDED),
        ] {
            if dropped & bit != 0 {
                h.remove(name);
            }
        }
    }
    let host_port = client_host.as_ref().and_then(|h| crate::http::host_port_at(h.as_bytes()));
    Forwarding {
        xff_prev: seen.xff.filter(|v| !v.is_empty() && ctx.trust != ForwardTrust::Untrusted),
        ip: ctx.client_ip,
        proto: (kept & crate::http::PROTO == 0).then_some(if ctx.downstream_tls { "https" } else { "http" }),
        client_host,
        write_host: kept & crate::http::FHOST == 0,
        port: (kept & crate::http::PORT == 0).then_some(ctx.local_port_value),
        host_port,
    }
}

/// The forwarding headers of a relayed request, as [`crate::http::prepare_request_headers`]
/// sets them for the general path (the client's `X-Forwarded-For` with its address added;
/// `X-Real-IP`; `X-Forwarded-Proto`, `-Host` and `-Port` unless a trusted client sent them),
/// written
/// as lines after the client's headers rather than added to the header map: five map
/// insertions (hashing, probing, growing) cost about 1,000 instructions per request.
struct Forwarding<'a> {
    xff_prev: Option<HeaderValue>,
    ip: &'a HeaderValue,
    proto: Option<&'static str>,
    /// The client's `Host` (or its request target's authority).
    client_host: Option<HeaderValue>,
    /// `X-Forwarded-Host` is the client's host: the client sent none.
    write_host: bool,
    /// The listener's port, when `X-Forwarded-Port` is written: the client's host's port goes
    /// first.
    port: Option<&'a HeaderValue>,
    /// Where the port in `client_host` starts, if it names one ([`crate::http::host_port_at`]).
    host_port: Option<usize>,
}

impl Forwarding<'_> {
    fn port(&self) -> Option<&[u8]> {
        let local = self.port?;
        Some(match (&self.client_host, self.host_port) {
            (Some(h), Some(i)) => &h.as_bytes()[i..],
            _ => local.as_bytes(),
        })
    }

    fn forwarded_host(&self) -> Option<&HeaderValue> {
        self.client_host.as_ref().filter(|_| self.write_host)
    }

    /// Bytes [`Forwarding::write`] adds, at most.
    fn len(&self) -> usize {
        let mut n = 60 + self.xff_prev.as_ref().map_or(0, |v| v.len() + 2) + 2 * self.ip.len();
        n += self.proto.map_or(0, |p| 21 + p.len());
        n += self.forwarded_host().map_or(0, |h| 20 + h.len());
        n += self.port().map_or(0, |p| 20 + p.len());
        n
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = &self.xff_prev {
            out.extend_from_slice(prev.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(self.ip.as_bytes());
        out.extend_from_slice(b"\r\nx-real-ip: ");
        out.extend_from_slice(self.ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(proto) = self.proto {
            out.extend_from_slice(b"x-forwarded-proto: ");
            out.extend_from_slice(proto.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(host) = self.forwarded_host() {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(port) = self.port() {
            out.extend_from_slice(b"x-forwarded-port: ");
            out.extend_from_slice(port);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Why an attempt ended without a relayed response.
pub(crate) enum Failure {
    /// The node failed before any byte of its response reached the client.
    Node {
        error: ProxyError,
        outcome: Outcome,
        elapsed: Duration,
        /// The request may have reached the node.
        sent: bool,
    },
    /// The client went away, or the response broke after its head was relayed: nothing more
    /// can be said on this connection.
    Client,
}

/// The request head for the node: `parts` (already rewritten), the Host line `host`, and the
/// relay's forwarding headers, if `fwd`.
fn request_head(parts: &Parts, host: &HeaderValue, fwd: Option<&Forwarding<'_>>) -> Vec<u8> {
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut size = parts.method.as_str().len() + pq.len() + host.len() + 32 + fwd.map_or(0, |f| f.len());
    for (k, v) in &parts.headers {
        size += k.as_str().len() + v.len() + 4;
    }
    // The Host line is `host`; a Host in the headers (the client's) is not sent twice.
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut cookies = 0;
    for (k, v) in &parts.headers {
        if k == header::HOST {
            continue;
        }
        if k == header::COOKIE {
            cookies += 1;
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // HTTP/2 clients may split cookies over several fields; HTTP/1.1 wants one line, joined
    // with "; " (RFC 9113 section 8.2.3).
    if cookies > 0 {
        out.extend_from_slice(b"cookie: ");
        for (i, v) in parts.headers.get_all(header::COOKIE).iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    if let Some(fwd) = fwd {
        fwd.write(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// One attempt on one node: send the head, read the response head, relay it and its body.
#[allow(clippy::too_many_arguments)]
async fn exchange<C: AsyncWrite + Unpin>(
    client: &mut C,
    head: &[u8],
    peer: &mut Option<Peer>,
    target: &Target,
    keepalive: KeepalivePool,
    timeouts: crate::Timeouts,
    head_only: bool,
    resend_ok: bool,
    shown: Shown<'_>,
) -> Result<After, Failure> {
    // Read from tokio's clock (the same read outside tests): the answer head's deadline may be
    // counted from it, and must be on the clock of tokio's timers, paused in some tests.
    let start = tokio::time::Instant::now().into_std();
    let got =
        send_and_read_head(head, target, keepalive, timeouts, head_only, resend_ok, HeadFor::Bytes, start)
            .await?;
    relay_response(client, got, peer, &target.key, keepalive, timeouts.read, start, shown).await
}

/// Relays the response whose head is in `got` (and its body) to the client.
#[allow(clippy::too_many_arguments)]
async fn relay_response<C: AsyncWrite + Unpin>(
    client: &mut C,
    got: Received,
    peer: &mut Option<Peer>,
    key: &PoolKey,
    keepalive: KeepalivePool,
    read_timeout: Duration,
    start: Instant,
    shown: Shown<'_>,
) -> Result<After, Failure> {
    let Received { mut node, uses, mut buf, head: parsed } = got;
    if let Some(p) = peer.as_ref() {
        p.report_since(Outcome::HttpStatus(parsed.status), start);
    }

    // From here on the client has (part of) this response: failures close the connection.
    let framing = parsed.framing;
    let client_close = framing == Framing::UntilClose;
    let mut out_head = parsed.head;
    end_head(&mut out_head, client_close, shown, parsed.status);
    let relayed = relay_body(client, &mut node, &mut buf, &out_head, framing, read_timeout, peer).await;
    crate::spare::give_node(buf);
    match relayed {
        Ok(clean) => {
            if clean && parsed.keepalive && framing != Framing::UntilClose {
                checkin(key, node, uses + 1, keepalive);
            }
            Ok(if client_close { After::Close } else { After::KeepAlive })
        }
        Err(broken) => Err(broken.failure(peer.as_ref(), start)),
    }
}

/// Adds what the gateway says in a relayed answer's head (which ends with its blank line):
/// `connection: close` when the client's connection closes after it, and APISIX's
/// `X-APISIX-Upstream-Status` ([`Shown`]).
fn end_head(head: &mut Vec<u8>, close: bool, shown: Shown<'_>, status: u16) {
    let show = shown.shows(status);
    if !close && !show {
        return;
    }
    head.truncate(head.len() - 2);
    if show {
        // The gateway's replaces any the node sent, as APISIX sets it.
        drop_line(head, b"x-apisix-upstream-status:");
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    if show {
        head.extend_from_slice(b"X-APISIX-Upstream-Status: ");
        crate::retry::write_statuses(head, shown.prior, Some(status));
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// Removes from `head` (a status line and header lines, each ending with CRLF) the header lines
/// that start with `prefix` (a lower-case name and its colon), in any case.
fn drop_line(head: &mut Vec<u8>, prefix: &[u8]) {
    let mut at = match head.windows(2).position(|w| w == b"\r\n") {
        Some(i) => i + 2,
        None => return,
    };
    while at < head.len() {
        let end = head[at..].windows(2).position(|w| w == b"\r\n").map_or(head.len(), |i| at + i + 2);
        if head[at..end].len() >= prefix.len() && head[at..at + prefix.len()].eq_ignore_ascii_case(prefix) {
            head.drain(at..end);
        } else {
            at = end;
        }
    }
}

/// A node connection with a complete response head read from it.
struct Received {
    node: Node,
    uses: u32,
    /// What followed the head.
    buf: BytesMut,
    head: ParsedHead,
}

/// Takes a pooled connection (or opens one), sends `head`, and reads the response head (1xx
/// interim responses are skipped).
#[allow(clippy::too_many_arguments)]
async fn send_and_read_head(
    head: &[u8],
    target: &Target,
    keepalive: KeepalivePool,
    timeouts: crate::Timeouts,
    head_only: bool,
    resend_ok: bool,
    mode: HeadFor,
    start: Instant,
) -> Result<Received, Failure> {
    // A request that may not be sent twice gets a connection checked with a syscall: the
    // reactor may not have seen a close that just arrived, and no retry would cover it.
    let mut pooled = checkout(&target.key, keepalive, !resend_ok, start);
    let (node, uses, buf, deadline) = loop {
        let (mut node, uses, reused, at_once) =
            open_and_send(head, pooled.take(), target, timeouts, start).await?;
        let mut buf = BytesMut::new();
        // The first read and the rest of the head share one deadline, from now: from the
        // attempt's start when it waited for nothing since (no clock read).
        let deadline = if at_once {
            tokio::time::Instant::from_std(start) + timeouts.read
        } else {
            read_deadline(timeouts.read)
        };
        match read_some_until(&mut node, &mut buf, deadline).await {
            // The node closed a pooled connection: it most likely never saw the request, but a
            // request that must not run twice is not sent again.
            Ok(0) | Err(ReadError::Io(_)) if reused && resend_ok => continue,
            Ok(0) => {
                let e = ProxyError::BadResponse("node closed the connection without answering".into());
                return Err(node_failure(e, Outcome::TcpFailure, start, true));
            }
            Ok(_) => break (node, uses, buf, deadline),
            Err(ReadError::Io(e)) => {
                let e = ProxyError::Connect(e.to_string());
                return Err(node_failure(e, Outcome::TcpFailure, start, true));
            }
            Err(ReadError::Timeout) => {
                return Err(node_failure(ProxyError::Timeout("read"), Outcome::Timeout, start, true));
            }
        }
    };
    read_head(node, uses, buf, deadline, head_only, mode, start).await
}

/// When a wait for the node that starts now must end.
fn read_deadline(read_timeout: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + read_timeout
}

fn node_failure(error: ProxyError, outcome: Outcome, start: Instant, sent: bool) -> Failure {
    Failure::Node { error, outcome, elapsed: start.elapsed(), sent }
}

/// Writes `head` to `pooled`, or to a fresh connection to `target`. A pooled connection the node
/// closed while idle fails at once; one fresh connection to the same node is tried before that
/// counts as the node failing. Also says whether the connection was a pooled one, and whether
/// it took the head at once (the attempt waited for nothing since `start`).
async fn open_and_send(
    head: &[u8],
    mut pooled: Option<Checked>,
    target: &Target,
    timeouts: crate::Timeouts,
    start: Instant,
) -> Result<(Node, u32, bool, bool), Failure> {
    loop {
        let (mut node, uses, reused) = match pooled.take() {
            Some(c) => (c.stream, c.uses, true),
            None => match target.connect(timeouts.connect).await {
                Ok(node) => (node, 0, false),
                Err(e) => {
                    let (err, outcome) = if e.is_timeout() {
                        (ProxyError::Timeout("connect"), Outcome::Timeout)
                    } else {
                        (ProxyError::Connect(e.to_string()), Outcome::TcpFailure)
                    };
                    return Err(node_failure(err, outcome, start, false));
                }
            },
        };
        match send_head(&mut node, head, timeouts.send).await {
            HeadSent::AtOnce => return Ok((node, uses, reused, reused)),
            HeadSent::Waited => return Ok((node, uses, reused, false)),
            HeadSent::Failed(_) | HeadSent::Cut if reused => continue,
            // The answer may be waiting all the same: it is read as any answer is (no answer
            // is a failure then), and the connection is not pooled.
            HeadSent::Cut => {
                node.cut = true;
                return Ok((node, uses, reused, false));
            }
            HeadSent::Failed(e) => {
                let e = ProxyError::Connect(e.to_string());
                return Err(node_failure(e, Outcome::TcpFailure, start, true));
            }
            HeadSent::TimedOut => {
                return Err(node_failure(ProxyError::Timeout("send"), Outcome::Timeout, start, true));
            }
        }
    }
}

/// How a request head went to the node.
#[derive(Debug)]
enum HeadSent {
    /// In one write the socket took at once (plain TCP).
    AtOnce,
    /// After a wait for room, or through a TLS session.
    Waited,
    /// The node reset the connection (or had closed it) before it took it all: a node that
    /// answers at the head (a 413 for a body it will not take) and closes with the rest unread
    /// does so, when the head and body are more than the socket takes at once.
    Cut,
    Failed(io::Error),
    TimedOut,
}

/// Writes `head` (with the start of the body, or all of it) to `node` within `send_timeout`.
async fn send_head(node: &mut Node, head: &[u8], send_timeout: Duration) -> HeadSent {
    let sent = match &mut node.stream {
        // Most heads go in one write the socket takes at once: no timer for those.
        NodeStream::Plain(tcp) => match tcp.try_write(head) {
            Ok(n) if n == head.len() => return HeadSent::AtOnce,
            Ok(n) => tokio::time::timeout(send_timeout, tcp.write_all(&head[n..])).await,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Ok(Err(e)),
            Err(_) => tokio::time::timeout(send_timeout, tcp.write_all(head)).await,
        },
        // Through the session, which must pass all of it on before the wait for the answer.
        NodeStream::Tls(tls) => {
            let write = async {
                tls.write_all(head).await?;
                tls.flush().await
            };
            tokio::time::timeout(send_timeout, write).await
        }
    };
    match sent {
        Ok(Ok(())) => HeadSent::Waited,
        Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
            HeadSent::Cut
        }
        Ok(Err(e)) => HeadSent::Failed(e),
        Err(_) => HeadSent::TimedOut,
    }
}

/// Reads the response head from `node` (what came already is in `buf`), skipping 1xx interim
/// responses; the whole head must come by `head_deadline`.
async fn read_head(
    mut node: Node,
    uses: u32,
    mut buf: BytesMut,
    head_deadline: tokio::time::Instant,
    head_only: bool,
    mode: HeadFor,
    start: Instant,
) -> Result<Received, Failure> {
    let node_fail = |error: ProxyError, outcome: Outcome| node_failure(error, outcome, start, true);
    let mut interim = 0;
    loop {
        match parse_response(&buf, head_only, mode) {
            Ok(Some(parsed)) => {
                buf.advance(parsed.len);
                if parsed.status == 101 {
                    // No upgrade was asked for.
                    let e = ProxyError::InvalidResponse("unexpected 101 Switching Protocols".into());
                    return Err(node_fail(e, Outcome::TcpFailure));
                }
                if (100..200).contains(&parsed.status) {
                    interim += 1;
                    if interim > 8 {
                        let e = ProxyError::InvalidResponse("too many interim responses".into());
                        return Err(node_fail(e, Outcome::TcpFailure));
                    }
                    continue;
                }
                return Ok(Received { node, uses, buf, head: parsed });
            }
            Ok(None) if buf.len() < MAX_HEAD => {
                let was_empty = buf.is_empty();
                match read_some_until(&mut node, &mut buf, head_deadline).await {
                    Ok(0) => {
                        let e = ProxyError::BadResponse(if was_empty {
                            "node closed the connection without answering".into()
                        } else {
                            "node closed the connection mid-head".into()
                        });
                        return Err(node_fail(e, Outcome::TcpFailure));
                    }
                    Ok(_) => {}
                    Err(ReadError::Io(e)) => {
                        return Err(node_fail(ProxyError::Connect(e.to_string()), Outcome::TcpFailure));
                    }
                    Err(ReadError::Timeout) => {
                        return Err(node_fail(ProxyError::Timeout("read"), Outcome::Timeout));
                    }
                }
            }
            Ok(None) => {
                let e = ProxyError::InvalidResponse("response head too large".into());
                return Err(node_fail(e, Outcome::TcpFailure));
            }
            Err(msg) => return Err(node_fail(ProxyError::InvalidResponse(msg), Outcome::TcpFailure)),
        }
    }
}

enum ReadError {
    Io(io::Error),
    Timeout,
}

/// Waits (up to `limit`) until the node has something, then reads it. The buffer is grown only
/// once data is there, so a request waiting on a slow node holds no read buffer.
async fn read_some(node: &mut Node, buf: &mut BytesMut, limit: Duration) -> Result<usize, ReadError> {
    read_some_until(node, buf, read_deadline(limit)).await
}

/// [`read_some`] with a deadline.
async fn read_some_until(
    node: &mut Node,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<usize, ReadError> {
    let mut armed = false;
    loop {
        // The node's bytes first: the timer is set only for a wait, once per call.
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = node.poll_readable(cx) {
                return Poll::Ready(r.map_err(ReadError::Io));
            }
            let elapsed = if armed {
                node.poll_timer(cx)
            } else {
                armed = true;
                std::future::Future::poll(node.timer_at(deadline), cx)
            };
            elapsed.map(|()| Err(ReadError::Timeout))
        });
        ready.await?;
        if buf.capacity() == 0 {
            *buf = crate::spare::node_buf();
        } else if buf.capacity() - buf.len() < 4096 {
            buf.reserve(BODY_CHUNK);
        }
        // Through `poll_read`, not `try_read_buf`: a read that leaves part of the buffer empty
        // drained the socket, and tokio then clears its readiness. The idle connection's
        // liveness check (`still_open`) can then answer from the reactor instead of probing
        // with a read that fails with EAGAIN: one syscall less per relayed request.
        let polled = node.read_now(buf);
        match polled {
            Poll::Ready(Ok(n)) => return Ok(n),
            Poll::Ready(Err(e)) => return Err(ReadError::Io(e)),
            // Spurious readiness (cleared now: wait for the next event), or this task's
            // cooperative budget is spent and the read was refused before it was tried. Spend
            // a unit here: when none is left that yields to the scheduler, which refills it,
            // instead of spinning.
            Poll::Pending => tokio::task::coop::consume_budget().await,
        }
    }
}

struct ParsedHead {
    status: u16,
    /// Bytes of the node's head.
    len: usize,
    /// The head as an HTTP/1.1 client gets it ([`HeadFor::Bytes`]).
    head: Vec<u8>,
    /// The headers for the general path ([`HeadFor::Map`]).
    map: http::HeaderMap,
    framing: Framing,
    keepalive: bool,
}

/// Parses a response head at the start of `buf`: `Ok(None)` while incomplete.
fn parse_response(buf: &[u8], head_only: bool, mode: HeadFor) -> Result<Option<ParsedHead>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let minor = resp.version.unwrap_or(0);
    let reason = resp.reason.unwrap_or("");

    // Framing (RFC 9112 section 6.3) and the headers that only concern this hop.
    let mut chunked = false;
    let mut te = false;
    let mut length: Option<u64> = None;
    let mut keepalive = minor == 1;
    let mut connection_named: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| "invalid content-length".to_string())?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting content-length".into());
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, b"close") {
                keepalive = false;
            } else if has_token(h.value, b"keep-alive") && minor == 0 {
                keepalive = true;
            }
            connection_named.extend(h.value.split(|&b| b == b',').map(|t| t.trim_ascii()));
        }
    }
    let bodiless = head_only || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::None
    } else if te {
        if chunked { Framing::Chunked } else { Framing::UntilClose }
    } else if let Some(n) = length {
        if n == 0 { Framing::None } else { Framing::Length(n) }
    } else {
        Framing::UntilClose
    };
    // A body delimited by the close, or framing a node should not have sent (Transfer-Encoding
    // with a Content-Length, or on HTTP/1.0): the connection is not reused (RFC 9112 6.1, 6.3).
    if framing == Framing::UntilClose || (te && (length.is_some() || minor == 0)) {
        keepalive = false;
    }

    let status_code = StatusCode::from_u16(status).map_err(|_| "invalid status".to_string())?;
    let mut head = Vec::new();
    // For the general path: room for the node's headers and the two an HTTP/2 answer may add
    // (`date`, `content-length`), so the map is allocated once and not grown.
    let mut map = match mode {
        HeadFor::Map => http::HeaderMap::with_capacity(resp.headers.len() + 2),
        HeadFor::Bytes => http::HeaderMap::new(),
    };
    if mode == HeadFor::Bytes {
        head.reserve(len + 32);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status_code.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(reason.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let mut dated = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        dated |= name.eq_ignore_ascii_case(b"date");
        // The framing headers are decided below, whatever the node's Connection lists: dropping
        // them would leave the client with a body it cannot delimit.
        let framing_name =
            name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding");
        let hop = [&b"connection"[..], b"keep-alive", b"proxy-connection", b"upgrade", b"te", b"expect"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
            || (!framing_name && connection_named.iter().any(|n| name.eq_ignore_ascii_case(n)));
        // Relayed as bytes, a chunked body keeps its Transfer-Encoding; decoded (for the general
        // path, which frames the body itself) it loses it, and a Content-Length next to a
        // Transfer-Encoding always goes.
        let te_header = name.eq_ignore_ascii_case(b"transfer-encoding");
        let stale_length = te && name.eq_ignore_ascii_case(b"content-length");
        let keep_te = mode == HeadFor::Bytes && framing == Framing::Chunked;
        if hop || stale_length || (te_header && !keep_te) {
            continue;
        }
        match mode {
            HeadFor::Bytes => {
                head.extend_from_slice(name);
                head.extend_from_slice(b": ");
                head.extend_from_slice(h.value);
                head.extend_from_slice(b"\r\n");
            }
            HeadFor::Map => {
                let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(h.value)) else {
                    return Err(format!("invalid header {:?}", h.name));
                };
                map.append(n, v);
            }
        }
    }
    if mode == HeadFor::Bytes {
        // A node that sent no Date gets the gateway's (RFC 9110 §6.6.1), as hyper's server adds
        // one; the general path's servers add theirs.
        if !dated {
            head.extend_from_slice(b"date: ");
            head.extend_from_slice(crate::date::now().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
    }
    Ok(Some(ParsedHead { status, len, head, map, framing, keepalive }))
}

/// What a parsed response head is rewritten into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadFor {
    /// Bytes for an HTTP/1.1 client, framing headers kept.
    Bytes,
    /// A header map for the general path, framing headers dropped.
    Map,
}

/// Writes the head and relays the body. `Ok(true)` when the body ended exactly where its framing
/// said (the node connection can be reused), `Ok(false)` when the node sent more than that;
/// `Err` when the client or the node failed midway.
async fn relay_body<C: AsyncWrite + Unpin>(
    client: &mut C,
    node: &mut Node,
    buf: &mut BytesMut,
    head: &[u8],
    framing: Framing,
    read_timeout: Duration,
    peer: &mut Option<Peer>,
) -> Result<bool, Broken> {
    let mut answer = AnswerEnd::new(framing);
    let (n, mut finished) = answer.take(buf).ok_or(Broken::BeforeHead)?;
    if finished {
        *peer = None;
    }
    write_two(client, head, &buf[..n]).await.map_err(|_| Broken::Client)?;
    buf.advance(n);
    if finished {
        return Ok(buf.is_empty());
    }
    // The rest of the body, as it arrives (no buffer is held while waiting for it).
    loop {
        crate::spare::give_node(std::mem::take(buf));
        let n = match read_some(node, buf, read_timeout).await {
            Ok(n) => n,
            Err(ReadError::Timeout) => return Err(Broken::Node(Outcome::Timeout)),
            Err(ReadError::Io(_)) => return Err(Broken::Node(Outcome::TcpFailure)),
        };
        if n == 0 {
            return if framing == Framing::UntilClose {
                Ok(false)
            } else {
                Err(Broken::Node(Outcome::TcpFailure))
            };
        }
        let (n, done) = answer.take(buf).ok_or(Broken::Node(Outcome::TcpFailure))?;
        if done {
            *peer = None;
        }
        write_two(client, &[], &buf[..n]).await.map_err(|_| Broken::Client)?;
        buf.advance(n);
        finished = done;
        if finished {
            return Ok(buf.is_empty());
        }
    }
}

/// Where a relayed answer's body ends, followed across reads.
struct AnswerEnd {
    framing: Framing,
    /// Bytes left, for [`Framing::Length`].
    left: u64,
    chunks: ChunkedState,
}

impl AnswerEnd {
    fn new(framing: Framing) -> AnswerEnd {
        let left = if let Framing::Length(n) = framing { n } else { 0 };
        AnswerEnd { framing, left, chunks: ChunkedState::default() }
    }

    /// How much of `buf` (read next from the node) belongs to the answer, and whether the answer
    /// ends there; `None` when its chunk framing is invalid.
    fn take(&mut self, buf: &[u8]) -> Option<(usize, bool)> {
        let (n, done) = match self.framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let n = (buf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                (n, self.left == 0)
            }
            Framing::Chunked => self.chunks.feed(buf),
            Framing::UntilClose => (buf.len(), false),
        };
        (!self.chunks.failed).then_some((n, done))
    }
}

/// Why a relayed response stopped short.
enum Broken {
    /// The node's framing was invalid before anything reached the client.
    BeforeHead,
    /// The node failed mid-body (reported to passive health).
    Node(Outcome),
    /// The client went away.
    Client,
}

impl Broken {
    /// What a relay that broke means for the attempt: framing invalid before the client had
    /// anything is the node's failure (a 502 can still be answered); a node that failed
    /// mid-body is reported to passive health; either way after the head, the client
    /// connection can say nothing more.
    fn failure(self, peer: Option<&Peer>, start: Instant) -> Failure {
        match self {
            Broken::BeforeHead => {
                let e = ProxyError::BadResponse("invalid chunked body".into());
                node_failure(e, Outcome::TcpFailure, start, true)
            }
            Broken::Node(outcome) => {
                if let Some(p) = peer {
                    p.report_since(outcome.after_head(), start);
                }
                Failure::Client
            }
            Broken::Client => Failure::Client,
        }
    }
}

/// Writes `a` then `b` with as few syscalls as the socket allows, and flushes: a TLS stream may
/// accept bytes into its own buffer without sending them, and the relay may next wait for the
/// node or the client (for plain TCP the flush does nothing).
async fn write_two<C: AsyncWrite + Unpin>(s: &mut C, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        let bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
        let n = s.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    s.write_all(b).await?;
    s.flush().await
}

/// Finds where a chunked body ends, across reads (RFC 9112 section 7.1).
#[derive(Debug, Default, Clone)]
struct ChunkedState {
    step: Step,
    /// Bytes left in the current chunk's data.
    data: u64,
    size_digits: u8,
    failed: bool,
    /// Length of the current trailer line.
    line: usize,
    /// The trailer section, when decoding ([`ChunkedState::decode`]).
    trailer: Vec<u8>,
    /// Bytes of the current chunk extension, and of the trailer section so far (both bounded).
    ext: usize,
    trailer_len: usize,
    /// The bytes of trailer fields in the last [`ChunkedState::feed`] (a range of its input),
    /// which a request body leaves out ([`ChunkedState::feed_request`]).
    fields: Option<(usize, usize)>,
}

/// Longest chunk extension, and longest trailer section (as long as a head), taken in a chunked
/// body, from a client or a node.
const CHUNK_EXT_MAX: usize = 4096;
const TRAILERS_MAX: usize = MAX_HEAD;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Step {
    #[default]
    Size,
    /// Whitespace after the size: only a `;` (an extension) or the line's end may follow.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    Done,
    /// Trailers handed out ([`ChunkedState::decode`]).
    Ended,
}

impl ChunkedState {
    /// Decodes from the start of `buf`: the next piece of chunk data, the trailers, the end, or
    /// a need for more bytes. Framing bytes are consumed from `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Next {
        loop {
            if self.step == Step::Data && self.data > 0 {
                if buf.is_empty() {
                    return Next::More;
                }
                let n = (buf.len() as u64).min(self.data) as usize;
                self.data -= n as u64;
                if self.data == 0 {
                    self.step = Step::DataCr;
                }
                return Next::Frame(http_body::Frame::data(buf.split_to(n).freeze()));
            }
            // Up to the next data byte, or the end.
            let mut i = 0;
            while i < buf.len() && !(self.step == Step::Data && self.data > 0) {
                if matches!(self.step, Step::Done | Step::Ended) {
                    break;
                }
                let before = self.step;
                let (used, _) = self.feed(&buf[i..i + 1]);
                if self.failed {
                    return Next::Error("invalid chunked body from the node".into());
                }
                if matches!(before, Step::Trailer | Step::TrailerLf) {
                    if self.trailer.len() >= MAX_HEAD {
                        return Next::Error("chunked trailers too large".into());
                    }
                    self.trailer.push(buf[i]);
                }
                i += used.max(1);
            }
            buf.advance(i);
            if self.step == Step::Done {
                return match parse_trailers(&self.trailer) {
                    Some(map) => {
                        self.trailer.clear();
                        self.step = Step::Ended;
                        Next::Frame(http_body::Frame::trailers(map))
                    }
                    None => Next::End,
                };
            }
            if self.step == Step::Ended {
                return Next::End;
            }
            if !(self.step == Step::Data && self.data > 0) {
                return Next::More;
            }
        }
    }

    /// [`ChunkedState::feed`] for a request body on its way to a node, in place: the trailer
    /// fields are cut out of `buf` (the body still ends with the empty line after its last
    /// chunk), as nginx forwards no request trailers, so a node that would merge them into the
    /// head (a `Host`, an `X-Forwarded-For`) gets none. Returns the bytes taken, how many of
    /// them (from the start of `buf`) are to be sent, and whether the body ended.
    fn feed_request(&mut self, buf: &mut [u8]) -> (usize, usize, bool) {
        let (used, done) = self.feed(buf);
        match self.fields.take() {
            // (A failed body is not sent on: nothing to cut.)
            Some((from, to)) if !self.failed && from <= to && to <= used => {
                buf.copy_within(to..used, from);
                (used, used - (to - from), done)
            }
            _ => (used, used, done),
        }
    }

    /// Consumes `buf`: how many bytes belong to the body, and whether it ended there.
    fn feed(&mut self, buf: &[u8]) -> (usize, bool) {
        self.fields = None;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            // Part of a trailer field line (not the CR or LF of the empty line that ends the
            // body); recorded once the byte is taken.
            let mut field = false;
            if matches!(self.step, Step::Trailer | Step::TrailerLf) {
                self.trailer_len += 1;
                if self.trailer_len > TRAILERS_MAX {
                    self.failed = true;
                    return (i, false);
                }
                field = self.line > 0 || (self.step == Step::Trailer && b != b'\r');
            }
            match self.step {
                Step::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size_digits += 1;
                        if self.size_digits > 15 {
                            self.failed = true;
                            return (i, false);
                        }
                        self.data = self.data * 16 + d;
                    }
                    b';' if self.size_digits > 0 => {
                        self.ext = 0;
                        self.step = Step::Ext;
                    }
                    b' ' | b'\t' if self.size_digits > 0 => self.step = Step::SizeWs,
                    b'\r' if self.size_digits > 0 => self.step = Step::SizeLf,
                    _ => {
                        self.failed = true;
                        return (i, false);
                    }
                },
                // `5 ;ext` and `5 ` are whitespace before an extension or the line's end (RFC
                // 9112's BWS); `1 0` is no size a node would read as we do.
                Step::SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => {
                        self.ext = 0;
                        self.step = Step::Ext;
                    }
                    b'\r' => self.step = Step::SizeLf,
                    _ => {
                        self.failed = true;
                        return (i, false);
                    }
                },
                Step::Ext => {
                    self.ext += 1;
                    if b == b'\r' {
                        self.step = Step::SizeLf;
                    } else if !field_byte(b) || self.ext > CHUNK_EXT_MAX {
                        // A bare LF (or any control byte) could end the line for a lenient client
                        // and not for us: the two would disagree on where the response ends.
                        self.failed = true;
                        return (i, false);
                    }
                }
                Step::SizeLf => {
                    if b != b'\n' {
                        self.failed = true;
                        return (i, false);
                    }
                    self.size_digits = 0;
                    self.step = if self.data == 0 { Step::Trailer } else { Step::Data };
                    self.line = 0;
                    self.trailer_len = 0;
                }
                Step::Data => {
                    let n = ((buf.len() - i) as u64).min(self.data) as usize;
                    self.data -= n as u64;
                    i += n;
                    if self.data == 0 {
                        self.step = Step::DataCr;
                    }
                    continue;
                }
                Step::DataCr => {
                    if b != b'\r' {
                        self.failed = true;
                        return (i, false);
                    }
                    self.step = Step::DataLf;
                }
                Step::DataLf => {
                    if b != b'\n' {
                        self.failed = true;
                        return (i, false);
                    }
                    self.step = Step::Size;
                }
                Step::Trailer => {
                    if b == b'\r' {
                        self.step = Step::TrailerLf;
                    } else if field_byte(b) {
                        self.line += 1;
                    } else {
                        self.failed = true;
                        return (i, false);
                    }
                }
                Step::TrailerLf => {
                    if b != b'\n' {
                        self.failed = true;
                        return (i, false);
                    }
                    if self.line == 0 {
                        self.step = Step::Done;
                        return (i + 1, true);
                    }
                    self.line = 0;
                    self.step = Step::Trailer;
                }
                Step::Done | Step::Ended => return (i, true),
            }
            if field {
                let (from, _) = self.fields.unwrap_or((i, i));
                self.fields = Some((from, i + 1));
            }
            i += 1;
        }
        (i, matches!(self.step, Step::Done | Step::Ended))
    }
}

/// Whether `b` may appear inside a chunk extension or a trailer line: visible characters, space,
/// tab and obs-text; never a control byte such as a bare LF.
fn field_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// The trailer fields of a chunked body (the bytes after the last chunk, up to the empty line),
/// if there are any.
fn parse_trailers(raw: &[u8]) -> Option<http::HeaderMap> {
    let mut text = raw.to_vec();
    while text.starts_with(b"\r\n") {
        text.drain(..2);
    }
    if text.is_empty() {
        return None;
    }
    if !text.ends_with(b"\r\n\r\n") {
        text.extend_from_slice(b"\r\n");
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(&text, &mut headers) else {
        return None;
    };
    let mut map = http::HeaderMap::new();
    for h in fields {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value))
        {
            map.append(n, v);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// What a body decoder has next.
enum Next {
    Frame(http_body::Frame<bytes::Bytes>),
    End,
    More,
    Error(crate::body::BoxError),
}

/// One attempt of the general path (an HTTP/2 client) for a request without a body or with a
/// small one read whole (`parts` then carries its `content-length`), to an `http` or `https` node,
/// over this module's pooled connections: the response head becomes a `Response` whose body is
/// decoded from the node as the client reads it. `Err` gives the peer back with why the node
/// failed.
pub(crate) async fn attempt(
    parts: &Parts,
    body: &[u8],
    host: &HeaderValue,
    target: &Target,
    peer: Peer,
    keepalive: KeepalivePool,
    timeouts: crate::Timeouts,
) -> Result<http::Response<ProxyBody>, (Failure, Peer)> {
    // Read from tokio's clock (the same read outside tests): the answer head's deadline may be
    // counted from it, and must be on the clock of tokio's timers, paused in some tests.
    let start = tokio::time::Instant::now().into_std();
    let head_only = parts.method == Method::HEAD;
    let mut head = request_head(parts, host, None);
    head.extend_from_slice(body);
    let resend_ok = idempotent(&parts.method);
    let sent =
        send_and_read_head(&head, target, keepalive, timeouts, head_only, resend_ok, HeadFor::Map, start);
    match sent.await {
        Ok(got) => Ok(into_response(got, target, peer, keepalive, timeouts, start, Sent::Whole)),
        Err(f) => Err((f, peer)),
    }
}

/// How much of the request body reached the node when its answer's head came.
enum Sent {
    Whole,
    /// The node answered first; the rest goes on while the answer is read.
    Going(Box<Upload>),
    /// The node stopped taking it: its connection is not reused, and the rest is discarded.
    Cut(Box<Upload>),
}

/// The response whose head is in `got`, its body decoded from the node as the client reads it.
fn into_response(
    got: Received,
    target: &Target,
    peer: Peer,
    keepalive: KeepalivePool,
    timeouts: crate::Timeouts,
    start: Instant,
    sent: Sent,
) -> http::Response<ProxyBody> {
    let Received { node, uses, buf, head: parsed } = got;
    peer.report_since(Outcome::HttpStatus(parsed.status), start);
    let mut resp = http::Response::new(ProxyBody::Empty);
    *resp.status_mut() = StatusCode::from_u16(parsed.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = parsed.map;
    let (upload, reusable) = match sent {
        Sent::Whole => (None, parsed.keepalive),
        Sent::Going(up) => (Some(up), parsed.keepalive),
        Sent::Cut(up) => {
            (*up).discard();
            (None, false)
        }
    };
    // The answer came whole with its head (the usual small one): the exchange with the node is
    // over, so its connection goes back to the pool now (if it had the whole request) and the
    // body is one frame.
    let whole_answer = match parsed.framing {
        Framing::None => true,
        Framing::Length(n) => buf.len() as u64 == n,
        _ => false,
    };
    if whole_answer {
        let keep = reusable && (parsed.framing != Framing::None || buf.is_empty());
        match upload {
            None if keep => checkin(&target.key, node, uses + 1, keepalive),
            None => {}
            Some(up) if keep => (*up).finish_then_pool(node, target.key.clone(), uses, keepalive),
            Some(up) => (*up).discard(),
        }
        if parsed.framing != Framing::None && !buf.is_empty() {
            // A small answer is copied out, and the read buffer goes back to this worker's
            // spares; a large one is handed on as it is.
            let body = if buf.len() <= SMALL_ANSWER {
                let body = bytes::Bytes::copy_from_slice(&buf);
                crate::spare::give_node(buf);
                body
            } else {
                buf.freeze()
            };
            *resp.body_mut() = ProxyBody::full(body);
        } else {
            crate::spare::give_node(buf);
        }
        return resp;
    }
    let body = RawBody {
        key: target.key.clone(),
        node: Some(node),
        buf,
        framing: parsed.framing,
        left: match parsed.framing {
            Framing::Length(n) => n,
            _ => 0,
        },
        chunks: ChunkedState::default(),
        read_timeout: timeouts.read,
        waiting: false,
        peer: Some(peer),
        uses,
        keepalive,
        reusable,
        upload,
    };
    *resp.body_mut() = ProxyBody::Boxed(http_body_util::BodyExt::boxed_unsync(body));
    resp
}

/// One attempt of the general path for a request whose body is streamed to an `http` or `https`
/// node (from an HTTP/2 client, over 64 KiB or of unknown length; or from a connection hyper's
/// server took): the head, then the body framed as `parts` says (`content-length`, or chunked
/// with the client's trailers) as the client sends it. Until the node's answer begins, the
/// client may pause for `body_timeout` (a 408 after that) and a write to the node may wait for
/// the send timeout (a 504), both counted from the body's last progress. An answer that comes
/// before the body is all sent is returned at once and the body goes on while the client reads
/// it, until the answer ends; from then on the read timeout bounds the exchange, as for any
/// answer: no progress either way for that long ends it. A node that answered and then stopped
/// taking the body (a reset) still has its answer relayed.
///
/// `Err` gives the peer back, and the body when none of it was taken (the connect failed), so
/// that another node can be tried. A client that stalls or breaks its body gets a 408 or 400.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn attempt_streamed(
    parts: &Parts,
    body: ProxyBody,
    host: &HeaderValue,
    target: &Target,
    peer: Peer,
    keepalive: KeepalivePool,
    timeouts: crate::Timeouts,
    body_timeout: Duration,
) -> Result<http::Response<ProxyBody>, (Failure, Peer, Option<ProxyBody>)> {
    let start = Instant::now();
    let head_only = parts.method == Method::HEAD;
    let head = request_head(parts, host, None);
    let chunked = !parts.headers.contains_key(header::CONTENT_LENGTH);
    let mut upload = Box::new(Upload::new(body, chunked, timeouts.send, body_timeout));
    // The node failed: the client's answer is the gateway's, after some of the rest of its body
    // is read (`Upload::give_up`).
    let fail = |error, outcome| node_failure(error, outcome, start, true);
    // A body is never sent twice, so a pooled connection is checked with a syscall too.
    let mut pooled = checkout(&target.key, keepalive, true, start);
    let (node, uses, early, sent) = 'connection: loop {
        let (mut node, uses, reused, _) =
            match open_and_send(&head, pooled.take(), target, timeouts, start).await {
                Ok(opened) => opened,
                Err(f @ Failure::Node { sent: false, .. }) => return Err((f, peer, Some(upload.body))),
                Err(f) => {
                    (*upload).give_up().await;
                    return Err((f, peer, None));
                }
            };
        let mut early = BytesMut::new();
        let mut last = tokio::time::Instant::now();
        let sent = loop {
            if upload.done() {
                break Sent::Whole;
            }
            let writing = upload.writing();
            let limit = if writing { timeouts.send } else { body_timeout };
            let step = std::future::poll_fn(|cx| {
                // An answer (or a close) from the node comes first.
                if node.poll_readable(cx).is_ready() {
                    return Poll::Ready(None);
                }
                upload.poll_step(cx, &mut node).map(Some)
            });
            match tokio::time::timeout_at(last + limit, step).await {
                Err(_) if writing => {
                    let f = fail(ProxyError::Timeout("send"), Outcome::Timeout);
                    (*upload).give_up().await;
                    return Err((f, peer, None));
                }
                Err(_) => {
                    drop(node);
                    (*upload).discard();
                    let e = ProxyError::Status(408, "request body timed out".into());
                    return Ok(error_response(&e, false));
                }
                Ok(Some(Ok(()))) => last = tokio::time::Instant::now(),
                Ok(Some(Err(UploadError::Client(e)))) => {
                    drop(node);
                    return Ok(error_response(&ProxyError::BadRequest(format!("request body: {e}")), false));
                }
                // A node that answers and closes without reading the rest resets the connection,
                // and the write fails: its answer may be waiting all the same.
                Ok(Some(Err(UploadError::Node(e)))) => {
                    match node_said(&mut node, &mut early, head_only, true) {
                        Ok(true) => break Sent::Cut(upload),
                        _ => {
                            let error = ProxyError::Connect(e.to_string());
                            let f = fail(error, Outcome::TcpFailure);
                            (*upload).give_up().await;
                            return Err((f, peer, None));
                        }
                    }
                }
                Ok(None) => match node_said(&mut node, &mut early, head_only, false) {
                    Ok(true) => break Sent::Going(upload),
                    Ok(false) => {}
                    // A pooled connection the node closed just as it was taken, before any of
                    // the body was: a fresh one to the same node, once.
                    Err(_) if reused && !upload.started => continue 'connection,
                    Err(e) => {
                        let (error, outcome) = match e {
                            PumpError::Node(error, outcome) => (error, outcome),
                            _ => (ProxyError::BadResponse("node failed".into()), Outcome::TcpFailure),
                        };
                        let f = fail(error, outcome);
                        (*upload).give_up().await;
                        return Err((f, peer, None));
                    }
                },
            }
        };
        break (node, uses, early, sent);
    };
    match read_head(node, uses, early, read_deadline(timeouts.read), head_only, HeadFor::Map, start).await {
        Ok(got) => Ok(into_response(got, target, peer, keepalive, timeouts, start, sent)),
        Err(f) => {
            if let Sent::Going(up) | Sent::Cut(up) = sent {
                (*up).give_up().await;
            }
            Err((f, peer, None))
        }
    }
}

/// A request body of the general path on its way to an HTTP/1.1 node, framed as it goes: one
/// frame of the client's at a time, taken only once the one before is written (the client's
/// HTTP/2 window is given back as frames are taken, so it sends as fast as the node reads).
pub(crate) struct Upload {
    body: ProxyBody,
    chunked: bool,
    /// Framed bytes not yet written: a chunk's size line, its data and its CRLF at most.
    out: std::collections::VecDeque<bytes::Bytes>,
    /// All of the body, and its framing's end, is in `out` or written.
    ended: bool,
    /// Something was taken from the body: it cannot be sent again.
    started: bool,
    /// What was written is still in the node's TLS session, to be flushed.
    flush: bool,
    /// Longest wait for a write to the node, and for the client's next part of the body.
    send_timeout: Duration,
    body_timeout: Duration,
}

/// Whether a client's trailer field may go on to the node: not one that frames, routes,
/// authenticates or describes the message (RFC 9110 §6.5.1), nor one the gateway writes for the
/// node (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`), which a node that merges trailers into the
/// headers would take for the request's own.
fn trailer_allowed(name: &HeaderName) -> bool {
    let n = name.as_str();
    if n.starts_with("x-forwarded-") || n == "x-real-ip" || n == "forwarded" {
        return false;
    }
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::COOKIE
            | header::EXPECT
            | header::HOST
            | header::MAX_FORWARDS
            | header::PROXY_AUTHORIZATION
            | header::RANGE
            | header::SET_COOKIE
            | header::TE
            | header::TRAILER
            | header::TRANSFER_ENCODING
    )
}

/// Why an [`Upload`] stopped.
enum UploadError {
    /// The client's body broke (a reset stream, a length that does not add up).
    Client(crate::body::BoxError),
    /// The node takes no more of it.
    Node(io::Error),
}

impl Upload {
    fn new(body: ProxyBody, chunked: bool, send_timeout: Duration, body_timeout: Duration) -> Upload {
        Upload {
            body,
            chunked,
            out: std::collections::VecDeque::with_capacity(3),
            ended: false,
            started: false,
            flush: false,
            send_timeout,
            body_timeout,
        }
    }

    /// Sends the rest of the body to a node whose answer has ended and that keeps the
    /// connection, in a task of its own, then pools the connection. A node that answers before
    /// it has the whole body must still read the rest to read its next request, so the
    /// connection is worth keeping (nginx answering `return 200` to an upload does this). If the
    /// node sends anything meanwhile, or the client or the node stalls (the body and send
    /// timeouts), the connection is closed and the rest of the body discarded.
    fn finish_then_pool(mut self, mut node: Node, key: PoolKey, uses: u32, keepalive: KeepalivePool) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            let mut last = tokio::time::Instant::now();
            while !self.done() {
                let limit = if self.writing() { self.send_timeout } else { self.body_timeout };
                let step = std::future::poll_fn(|cx| {
                    while node.poll_readable(cx).is_ready() {
                        match node.read_now(&mut BytesMut::with_capacity(1)) {
                            // Nothing after all: the readiness is cleared, and the next poll
                            // waits for the node again.
                            Poll::Pending => {}
                            // A close, an error, or bytes no request asked for.
                            Poll::Ready(_) => return Poll::Ready(false),
                        }
                    }
                    self.poll_step(cx, &mut node).map(|r| r.is_ok())
                });
                match tokio::time::timeout_at(last + limit, step).await {
                    Ok(true) => last = tokio::time::Instant::now(),
                    _ => {
                        self.discard();
                        return;
                    }
                }
            }
            checkin(&key, node, uses + 1, keepalive);
        });
    }

    /// The whole body reached the node.
    fn done(&self) -> bool {
        self.ended && self.out.is_empty() && !self.flush
    }

    /// Lets go of a body the node will not get the rest of: see
    /// [`crate::http::drain_in_background`].
    fn discard(self) {
        crate::http::drain_in_background(self.body);
    }

    /// Lets go of a body before the gateway answers a failure itself: some of it is read first,
    /// as for any request the gateway answers ([`crate::http::drain_unread`]).
    async fn give_up(self) {
        crate::http::drain_unread(self.body).await;
    }

    /// Bytes are waiting for the node (rather than for the client).
    fn writing(&self) -> bool {
        !self.out.is_empty() || self.flush
    }

    /// One step: a write to the node, or a frame taken from the client's body.
    fn poll_step(&mut self, cx: &mut Context<'_>, node: &mut Node) -> Poll<Result<(), UploadError>> {
        if !self.out.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); 3];
            let mut count = 0;
            for (slot, b) in slices.iter_mut().zip(&self.out) {
                *slot = io::IoSlice::new(b);
                count += 1;
            }
            let written = std::pin::Pin::new(&mut node.stream).poll_write_vectored(cx, &slices[..count]);
            self.flush = node.unflushed();
            let mut n = match std::task::ready!(written) {
                Ok(0) => return Poll::Ready(Err(UploadError::Node(io::ErrorKind::WriteZero.into()))),
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(UploadError::Node(e))),
            };
            while n > 0 {
                let Some(front) = self.out.front_mut() else { break };
                let take = n.min(front.len());
                front.advance(take);
                n -= take;
                if front.is_empty() {
                    self.out.pop_front();
                }
            }
            return Poll::Ready(Ok(()));
        }
        if self.flush {
            let flushed = std::task::ready!(std::pin::Pin::new(&mut node.stream).poll_flush(cx));
            self.flush = false;
            return Poll::Ready(flushed.map_err(UploadError::Node));
        }
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        let polled = std::task::ready!(http_body::Body::poll_frame(std::pin::Pin::new(&mut self.body), cx));
        self.started = true;
        let frame = match polled {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Err(UploadError::Client(e))),
            None => {
                if self.chunked {
                    self.out.push_back(bytes::Bytes::from_static(b"0\r\n\r\n"));
                }
                self.ended = true;
                return Poll::Ready(Ok(()));
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if self.chunked {
                    self.out.push_back(format!("{:x}\r\n", data.len()).into());
                    self.out.push_back(data);
                    self.out.push_back(bytes::Bytes::from_static(b"\r\n"));
                } else {
                    self.out.push_back(data);
                }
            }
            Err(frame) => {
                // Trailers go on with a chunked body; a body of known length has no room for
                // them (they are dropped, as an HTTP/1.1 client's would be).
                if let Ok(trailers) = frame.into_trailers() {
                    if self.chunked {
                        let mut end = b"0\r\n".to_vec();
                        for (k, v) in trailers.iter().filter(|(k, _)| trailer_allowed(k)) {
                            end.extend_from_slice(k.as_str().as_bytes());
                            end.extend_from_slice(b": ");
                            end.extend_from_slice(v.as_bytes());
                            end.extend_from_slice(b"\r\n");
                        }
                        end.extend_from_slice(b"\r\n");
                        self.out.push_back(end.into());
                    }
                    self.ended = true;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A node's response body for the general path, decoded as it is read; the node connection goes
/// back to the pool when the body ended exactly where its framing said.
struct RawBody {
    key: PoolKey,
    /// `None` once the body ended or failed.
    node: Option<Node>,
    buf: BytesMut,
    framing: Framing,
    /// Bytes left, for [`Framing::Length`].
    left: u64,
    chunks: ChunkedState,
    read_timeout: Duration,
    /// The node's read timer runs for the current wait.
    waiting: bool,
    /// Held until the body ends (least_conn counts it in flight).
    peer: Option<Peer>,
    uses: u32,
    keepalive: KeepalivePool,
    reusable: bool,
    /// The rest of a request body the node answered before it had all of it: sent on while
    /// the answer is read, until the answer ends.
    upload: Option<Box<Upload>>,
}

impl RawBody {
    fn next(&mut self) -> Next {
        match self.framing {
            Framing::None => Next::End,
            Framing::Length(_) => {
                if self.left == 0 {
                    return Next::End;
                }
                if self.buf.is_empty() {
                    return Next::More;
                }
                let n = (self.buf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                Next::Frame(http_body::Frame::data(self.buf.split_to(n).freeze()))
            }
            Framing::Chunked => self.chunks.decode(&mut self.buf),
            Framing::UntilClose => {
                if self.buf.is_empty() {
                    Next::More
                } else {
                    Next::Frame(http_body::Frame::data(self.buf.split().freeze()))
                }
            }
        }
    }

    /// Sends the rest of the request body while the node takes it and the client sends it.
    /// Progress counts as the node being alive (a node may wait for the body before it answers
    /// on). A body that breaks, or that the node stops taking, is left: the answer goes on, and
    /// the connection is not reused.
    fn send_on(&mut self, cx: &mut Context<'_>) {
        let (Some(up), Some(node)) = (self.upload.as_mut(), self.node.as_mut()) else { return };
        let mut cut = false;
        while !up.done() {
            match up.poll_step(cx, node) {
                Poll::Ready(Ok(())) => self.waiting = false,
                Poll::Ready(Err(_)) => {
                    cut = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if cut {
            // What the client still sends is read and dropped, not reset.
            if let Some(up) = self.upload.take() {
                (*up).discard();
            }
            self.reusable = false;
        } else if up.done() {
            self.upload = None;
        }
    }

    /// The body ended: the connection is reused if nothing follows it.
    fn finish(&mut self) {
        // A request body the node has not all had yet goes on to it if it keeps the connection,
        // which is pooled after that; else the rest is discarded.
        let keep = self.reusable && self.buf.is_empty() && self.framing != Framing::UntilClose;
        let sent_whole = match self.upload.take() {
            None => true,
            Some(up) => {
                match self.node.take() {
                    Some(node) if keep => {
                        (*up).finish_then_pool(node, self.key.clone(), self.uses, self.keepalive)
                    }
                    _ => (*up).discard(),
                }
                false
            }
        };
        if let Some(node) = self.node.take()
            && sent_whole
            && self.reusable
            && self.buf.is_empty()
            && self.framing != Framing::UntilClose
        {
            checkin(&self.key, node, self.uses + 1, self.keepalive);
        }
        self.peer = None;
    }

    fn fail(
        &mut self,
        e: crate::body::BoxError,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>>> {
        self.node = None;
        self.peer = None;
        self.upload = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl http_body::Body for RawBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future;
        let this = self.get_mut();
        loop {
            if this.node.is_none() {
                return Poll::Ready(None);
            }
            this.send_on(cx);
            match this.next() {
                Next::Frame(f) => {
                    // The last data frame, or the trailers: the connection is free now, and the
                    // server in front learns the body ended without another poll.
                    let last = match this.framing {
                        Framing::Length(_) => this.left == 0,
                        Framing::Chunked => f.is_trailers(),
                        _ => false,
                    };
                    if last {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Next::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Next::Error(e) => return this.fail(e),
                Next::More => {}
            }
            let Some(node) = this.node.as_mut() else { return Poll::Ready(None) };
            // Nothing buffered: wait for the node without holding a read buffer.
            let ready = if this.buf.is_empty() { node.poll_readable(cx) } else { Poll::Ready(Ok(())) };
            let polled = match ready {
                Poll::Ready(Ok(())) => {
                    if this.buf.capacity() == 0 {
                        this.buf = crate::spare::node_buf();
                    } else if this.buf.capacity() - this.buf.len() < 4096 {
                        this.buf.reserve(BODY_CHUNK);
                    }
                    tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut node.stream), cx, &mut this.buf)
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    crate::spare::give_node(std::mem::take(&mut this.buf));
                    Poll::Pending
                }
            };
            match polled {
                Poll::Ready(Ok(0)) => {
                    if this.framing == Framing::UntilClose {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    return this.fail("node closed the connection mid-body".into());
                }
                Poll::Ready(Ok(_)) => this.waiting = false,
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Pending => {
                    let elapsed = if this.waiting {
                        node.poll_timer(cx)
                    } else {
                        this.waiting = true;
                        node.timer_at(tokio::time::Instant::now() + this.read_timeout).poll(cx)
                    };
                    if elapsed.is_ready() {
                        // With a body still to send that the client does not send, the wait
                        // may be the node's for the body: said so, not blamed on the node.
                        let stalled = this.upload.as_ref().is_some_and(|up| !up.writing());
                        return this.fail(if stalled {
                            "no progress either way for the read timeout, with the request body still coming"
                                .into()
                        } else {
                            "upstream timed out (read)".into()
                        });
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.node.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(_) => http_body::SizeHint::with_exact(self.left),
            _ => http_body::SizeHint::default(),
        }
    }
}

/// Writes a gateway error answer (its head only, for a HEAD request); the connection stays open
/// for the next request.
/// Writes the gateway's answer for `err`, with `upstream_status` as APISIX's
/// `X-APISIX-Upstream-Status` when attempts failed before it ([`Retry::upstream_status`]).
async fn answer_error<C: AsyncWrite + Unpin>(
    client: &mut C,
    err: &ProxyError,
    head_only: bool,
    upstream_status: Option<HeaderValue>,
) -> After {
    let mut resp = error_response(err, false);
    if let Some(v) = upstream_status {
        resp.headers_mut().insert(crate::retry::UPSTREAM_STATUS, v);
    }
    let (parts, body) = resp.into_parts();
    let body = match body {
        ProxyBody::Full(Some(b)) => b,
        _ => bytes::Bytes::new(),
    };
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (k, v) in &parts.headers {
        if k == header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(k.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(crate::date::now().as_bytes());
    head.extend_from_slice(format!("\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes());
    let body = if head_only { &[][..] } else { &body[..] };
    match write_two(client, &head, body).await {
        Ok(()) => After::KeepAlive,
        Err(_) => After::Close,
    }
}

// ------------------------------------------------------------------------------------------
// Node connections, per worker thread (each worker runs a single-threaded runtime, so there is
// nothing to lock).

/// A connection to a node, with the timer of its reads. The timer lives as long as the
/// connection, from request to request: moving its deadline later costs a compare-and-swap,
/// where a timer per wait is registered with the runtime's timer wheel and removed again (a
/// lock round trip each). It is made at the first wait that needs it.
///
/// The timer keeps the waker of the last task that waited on it until its deadline passes, also
/// while the connection sits in the pool: at most one task's allocation per pooled connection,
/// for at most the read timeout.
struct Node {
    stream: NodeStream,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The request's head could not all be written (the node reset the connection): its
    /// answer is still read, but the connection is not pooled.
    cut: bool,
}

impl Node {
    fn new(stream: NodeStream) -> Node {
        Node { stream, timer: None, cut: false }
    }

    /// The TCP connection (under TLS, for an https node).
    fn tcp(&self) -> &TcpStream {
        match &self.stream {
            NodeStream::Plain(s) => s,
            NodeStream::Tls(t) => t.get_ref().0,
        }
    }

    /// Ready when a read would not wait: the socket is readable, or (TLS) decrypted bytes or
    /// the node's `close_notify` are already held. The reactor answers for the socket, without
    /// a syscall.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            NodeStream::Plain(s) => s.poll_read_ready(cx),
            NodeStream::Tls(t) => {
                let (tcp, tls) = t.get_mut();
                match tls.process_new_packets() {
                    Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {
                        tcp.poll_read_ready(cx)
                    }
                    // Something to read, or an error the read reports.
                    _ => Poll::Ready(Ok(())),
                }
            }
        }
    }

    /// Whether bytes written were taken into a TLS session's buffer without reaching the socket
    /// yet: they go out with a flush.
    fn unflushed(&self) -> bool {
        match &self.stream {
            NodeStream::Plain(_) => false,
            NodeStream::Tls(t) => t.get_ref().1.wants_write(),
        }
    }

    /// Reads from the kernel whatever the reactor knows (for a TLS node, records passed through
    /// its session): decrypted bytes, `Ok(0)` at the end, `WouldBlock` when nothing is there.
    fn read_from_kernel(&mut self, chunk: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            NodeStream::Plain(tcp) => io::Read::read(&mut &*socket2::SockRef::from(&*tcp), chunk),
            NodeStream::Tls(t) => {
                let (tcp, tls) = t.get_mut();
                loop {
                    match io::Read::read(&mut tls.reader(), chunk) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // A close without `close_notify` is an end, as `NodeStream` reads it.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        done => return done,
                    }
                    // Nothing decrypted: more records from the socket (`WouldBlock` if none).
                    let sock = socket2::SockRef::from(&*tcp);
                    let got = tls.read_tls(&mut &*sock)?;
                    tls.process_new_packets().map_err(io::Error::other)?;
                    if got == 0 {
                        // The stream ended, with or without `close_notify`.
                        return match io::Read::read(&mut tls.reader(), chunk) {
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof
                                ) =>
                            {
                                Ok(0)
                            }
                            other => other,
                        };
                    }
                }
            }
        }
    }

    /// Reads what is there without waiting (a waker that does nothing: the next wait registers
    /// the task's own).
    fn read_now(&mut self, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.stream), &mut cx, buf)
    }

    /// The read timer, due at `deadline`.
    fn timer_at(&mut self, deadline: tokio::time::Instant) -> std::pin::Pin<&mut tokio::time::Sleep> {
        let fresh = self.timer.is_none();
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !fresh {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut()
    }

    /// Polls the read timer as it was last set.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future;
        match &mut self.timer {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Where a relayed request goes: a node's address, and for an https node the TLS settings and
/// server name its connections are made with (they key the pool too, so a connection is only
/// reused with the settings it was made with).
#[derive(Clone)]
pub(crate) struct Target {
    key: PoolKey,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// The target for `addr` of an upstream with `settings`, `host` being the request's `Host`
    /// for the node (its name is the TLS server name); `None` for schemes the relay does not
    /// speak.
    pub(crate) fn of(settings: &UpstreamSettings, addr: SocketAddr, host: &HeaderValue) -> Option<Target> {
        match (settings.scheme, settings.tls.as_deref()) {
            (Scheme::Http, _) => Some(Target { key: PoolKey { addr, tls: 0, sni: None }, tls: None }),
            (Scheme::Https, Some(t)) => Some(Target {
                key: PoolKey { addr, tls: t.pool_id, sni: crate::http::sni_of(host) },
                tls: Some(t.http1.clone()),
            }),
            _ => None,
        }
    }

    /// Opens a connection: TCP, then the TLS handshake for an https node, each within the
    /// connect timeout.
    async fn connect(&self, timeout: Duration) -> Result<Node, crate::ConnectError> {
        let tcp = connect_tcp(self.key.addr, timeout).await?;
        let Some(config) = &self.tls else { return Ok(Node::new(NodeStream::Plain(tcp))) };
        let sni = self.key.sni.as_deref().unwrap_or("localhost");
        let tls = crate::connect_tls(tcp, self.key.addr, config.clone(), sni, timeout).await?;
        Ok(Node::new(NodeStream::Tls(Box::new(tls))))
    }
}

/// Whether requests to nodes of an upstream with `settings` can be relayed: plain `http`
/// nodes, and `https` ones (over TLS, ALPN `http/1.1`).
pub fn relays(settings: &UpstreamSettings) -> bool {
    match settings.scheme {
        Scheme::Http => true,
        Scheme::Https => settings.tls.is_some(),
        _ => false,
    }
}

struct Idle {
    stream: Node,
    uses: u32,
    since: Instant,
    /// The pool's `size` when it came back (what [`sweep`] trims to).
    size: usize,
}

/// How many of the oldest connections of `list` (its front) beyond `size` have been idle for
/// [`OVERFLOW_GRACE`] at `now`, counting `extra` connections about to join it.
fn stale_overflow(list: &[Idle], size: usize, extra: usize, now: Instant) -> usize {
    crate::pool::stale_overflow(list, |c| c.since, size, extra, now)
}

/// A connection taken from the pool.
struct Checked {
    stream: Node,
    uses: u32,
}

thread_local! {
    // Keyed by node addresses (and TLS settings), which come from configuration and discovery:
    // no need for SipHash's flooding resistance.
    static IDLE: RefCell<IdlePool> = RefCell::new(IdlePool::default());
}

/// This worker's idle node connections, by pool key.
#[derive(Default)]
struct IdlePool {
    lists: FxHashMap<PoolKey, Vec<Idle>>,
    names: crate::pool::NameCount,
}

/// Takes an idle connection for `key` that is still open and has been idle for less than the
/// pool's `idle_timeout` at `now` (the attempt's start: no clock read of its own).
fn checkout(key: &PoolKey, limits: KeepalivePool, ask_kernel: bool, now: Instant) -> Option<Checked> {
    IDLE.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.lists.get_mut(key)?;
        while let Some(mut c) = list.pop() {
            if now.saturating_duration_since(c.since) >= limits.idle_timeout
                || !still_open(&mut c.stream)
                || (ask_kernel && !kernel_says_open(c.stream.tcp()))
            {
                continue;
            }
            return Some(Checked { stream: c.stream, uses: c.uses });
        }
        None
    })
}

/// Whether an idle node connection is still usable: nothing to read (no EOF, no stray bytes;
/// over TLS no record either, not even a `close_notify`). The reactor's readiness answers
/// without a syscall unless something did arrive.
fn still_open(node: &mut Node) -> bool {
    if let NodeStream::Tls(t) = &mut node.stream {
        // Decrypted bytes or a `close_notify` already held, or a broken session.
        let (_, tls) = t.get_mut();
        if !tls.process_new_packets().is_ok_and(|s| s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed())
        {
            return false;
        }
    }
    if !tokio::task::coop::has_budget_remaining() {
        // The reactor would not answer (its poll counts against the budget): ask the kernel.
        return kernel_says_open(node.tcp());
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match &node.stream {
        NodeStream::Plain(s) => match s.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        },
        // Records still in the socket cannot be read here without the session: any is a close
        // or stray bytes (the session's own messages come before the first answer, which was
        // read whole before the connection was pooled), unless the readiness was stale.
        NodeStream::Tls(t) => match t.get_ref().0.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => kernel_says_open(node.tcp()),
        },
    }
}

/// [`still_open`] without the reactor's view: a `MSG_PEEK` read that must find nothing.
fn kernel_says_open(s: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(s).peek(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn checkin(key: &PoolKey, stream: Node, uses: u32, limits: KeepalivePool) {
    checkin_at(key, stream, uses, limits, Instant::now());
}

/// [`checkin`] at `now`. The list is in check-in order (checkouts take the newest), so the
/// connections that stayed idle longest are at its front.
fn checkin_at(key: &PoolKey, stream: Node, uses: u32, limits: KeepalivePool, now: Instant) {
    if uses >= limits.requests || limits.size == 0 || stream.cut || stream.unflushed() {
        return;
    }
    IDLE.with(|p| {
        let mut p = p.borrow_mut();
        let p = &mut *p;
        let list = match p.lists.get_mut(key) {
            Some(list) => list,
            None => {
                let lists = &p.lists;
                let last_used = |k: &PoolKey| lists.get(k).and_then(|l| l.last().map(|c| c.since));
                if let Some(old) = p.names.admit(key, last_used) {
                    p.lists.remove(&old);
                }
                p.lists.entry(key.clone()).or_default()
            }
        };
        if list.len() >= limits.size {
            let stale = stale_overflow(list, limits.size, 1, now);
            list.drain(..stale);
        }
        list.push(Idle { stream, uses, since: now, size: limits.size });
    });
}

/// Drops this worker's idle node connections older than `max_idle`, the connections their
/// nodes closed, and those beyond their pool's `size` idle for [`crate::pool::OVERFLOW_GRACE`].
pub fn sweep(max_idle: Duration) {
    sweep_at(max_idle, Instant::now());
}

fn sweep_at(max_idle: Duration, now: Instant) {
    IDLE.with(|p| {
        let mut p = p.borrow_mut();
        let p = &mut *p;
        let names = &mut p.names;
        p.lists.retain(|key, list| {
            list.retain_mut(|c| {
                now.saturating_duration_since(c.since) < max_idle && still_open(&mut c.stream)
            });
            if let Some(size) = list.last().map(|c| c.size) {
                let stale = stale_overflow(list, size, 0, now);
                list.drain(..stale);
            }
            let keep = !list.is_empty();
            if !keep {
                names.release(key);
            }
            keep
        });
    });
}

/// A client connection handed to the general path with the bytes this path already read.
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: bytes::Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A client request head parsed from the start of a buffer.
pub struct ParsedRequest {
    pub parts: Parts,
    /// Bytes of the head.
    pub len: usize,
}

/// What the start of a client's buffer holds. (Returned once per request and unpacked at once:
/// boxing the parts would cost an allocation for nothing.)
#[allow(clippy::large_enum_variant)]
pub enum RequestHead {
    Complete(ParsedRequest),
    /// More bytes are needed.
    Partial,
    /// Malformed or beyond this path's limits: the general path answers it.
    Unsupported,
}

/// Parses a request head at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> RequestHead {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return RequestHead::Partial,
        Err(_) => return RequestHead::Unsupported,
    };
    match build_parts(&req) {
        Some(parts) => RequestHead::Complete(ParsedRequest { parts, len }),
        None => RequestHead::Unsupported,
    }
}

/// Headers the general path adds to a request's map: X-Forwarded-For, -Proto, -Host, -Port and
/// X-Real-IP (the HTTP/2 server sizes its request maps for them). The relay writes them apart
/// instead ([`Forwarding`]).
pub(crate) const FORWARDED_HEADERS: usize = 5;

fn build_parts(req: &httparse::Request<'_, '_>) -> Option<Parts> {
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = http::Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(req.path?.as_bytes())).ok()?;
    let version = match req.version {
        Some(1) => http::Version::HTTP_11,
        _ => http::Version::HTTP_10,
    };
    // Room for the one header the relay may add to the map (`content-length`): the forwarding
    // headers are written apart ([`Forwarding`]).
    let mut map = http::HeaderMap::with_capacity(req.headers.len() + 1);
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    let mut r = http::Request::new(());
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.version_mut() = version;
    *r.headers_mut() = map;
    Some(r.into_parts().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `read_some` with its task's budget spent still reads (it once spun at 100% CPU: the
    /// socket stayed readable while every read was refused).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_some_with_a_spent_budget_still_reads() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let node = l.accept().await.unwrap().0;
        peer.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let reader = tokio::spawn(async move {
            node.readable().await.unwrap();
            while tokio::task::coop::has_budget_remaining() {
                tokio::task::coop::consume_budget().await;
            }
            // Also the liveness check, which must not take a refused poll for "nothing here".
            let mut node = Node::new(NodeStream::Plain(node));
            let open = still_open(&mut node);
            let mut buf = BytesMut::new();
            let n = read_some(&mut node, &mut buf, Duration::from_secs(5)).await.ok();
            (open, n)
        });
        let (open, n) = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("read_some never returned")
            .unwrap();
        assert!(!open, "a connection with unread bytes is not reusable");
        assert_eq!(n, Some(17));
    }

    /// A node that answers at the head and resets the connection before taking the rest (a 413
    /// for a body it will not take): the write of the head and body fails, yet the head counts
    /// as cut, not as a failure, and the answer that came before the reset is read. Such a
    /// connection is never pooled.
    #[tokio::test]
    async fn a_head_cut_by_the_nodes_reset_leaves_its_answer_to_read() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let gateway = TcpStream::connect(addr).await.unwrap();
        let mut node = l.accept().await.unwrap().0;
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
        node.write_all(answer).await.unwrap();
        // Closed without lingering, with nothing read: a reset.
        socket2::SockRef::from(&node).set_linger(Some(Duration::ZERO)).unwrap();
        drop(node);
        // Until the reset has arrived (the socket reports its read side closed).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = gateway.ready(tokio::io::Interest::READABLE).await.unwrap();
            if ready.is_read_closed() || ready.is_error() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the reset never arrived");
            tokio::task::yield_now().await;
        }
        let mut node = Node::new(NodeStream::Plain(gateway));
        let sent = send_head(&mut node, &vec![b'x'; 64 << 10], Duration::from_secs(5)).await;
        assert!(matches!(sent, HeadSent::Cut), "{sent:?}");
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let n = read_some_until(&mut node, &mut buf, deadline).await.ok();
        assert_eq!((n, &buf[..]), (Some(answer.len()), &answer[..]));
        // A cut connection is not pooled.
        node.cut = true;
        let key = PoolKey { addr, tls: 0, sni: None };
        let limits = KeepalivePool { size: 8, idle_timeout: Duration::from_secs(60), requests: 100 };
        checkin(&key, node, 1, limits);
        assert!(IDLE.with(|p| p.borrow().lists.get(&key).is_none_or(|l| l.is_empty())));
    }

    /// A node reached under many server names (a TLS node with `pass_host: pass`, each client
    /// sending another Host) keeps pools for `NAMES_PER_NODE` of them: a new name's pool takes
    /// the place of the one used longest ago, so names in use keep theirs and a flood of new
    /// names leaves no more than the bound behind.
    #[tokio::test]
    async fn a_node_keeps_pools_for_its_most_recently_used_server_names() {
        use crate::pool::NAMES_PER_NODE;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = KeepalivePool { size: 8, idle_timeout: Duration::from_secs(60), requests: 100 };
        let key = |i: usize| PoolKey { addr, tls: 7, sni: Some(format!("h{i}.test").into()) };
        let mut peers = Vec::new();
        let mut conn = async || {
            let c = TcpStream::connect(addr).await.unwrap();
            peers.push(l.accept().await.unwrap().0);
            Node::new(NodeStream::Plain(c))
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for i in 0..NAMES_PER_NODE {
            checkin_at(&key(i), conn().await, 1, limits, at(i as u64));
        }
        // Name 0 is used again: now name 1's pool is the one used longest ago.
        checkin_at(&key(0), conn().await, 1, limits, at(1000));
        for i in NAMES_PER_NODE..NAMES_PER_NODE + 3 {
            checkin_at(&key(i), conn().await, 1, limits, at(2000 + i as u64));
        }
        let pooled = |i: usize| IDLE.with(|p| p.borrow().lists.get(&key(i)).map_or(0, |l| l.len()));
        assert_eq!(pooled(0), 2, "a name in use keeps its pool");
        assert_eq!((pooled(1), pooled(2), pooled(3)), (0, 0, 0), "the three used longest ago made room");
        assert!((4..NAMES_PER_NODE + 3).all(|i| pooled(i) == 1));
        let pools = IDLE.with(|p| p.borrow().lists.keys().filter(|k| k.addr == addr).count());
        assert_eq!(pools, NAMES_PER_NODE);
    }

    /// A burst of answers keeps its node connections past the pool's `size` for the requests
    /// that follow; those still idle after `OVERFLOW_GRACE` leave at the next check-in or
    /// sweep, the longest idle first, down to `size`.
    #[tokio::test]
    async fn connections_past_the_pool_size_stay_only_while_recently_used() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (mut conns, mut peers) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            conns.push(TcpStream::connect(addr).await.unwrap());
            peers.push(l.accept().await.unwrap().0);
        }
        let limits = KeepalivePool { size: 2, idle_timeout: Duration::from_secs(60), requests: 100 };
        let key = PoolKey { addr, tls: 0, sni: None };
        let node = |c| Node::new(NodeStream::Plain(c));
        let idle = || IDLE.with(|p| p.borrow().lists.get(&key).map_or(0, |l| l.len()));
        let t0 = Instant::now();
        let later = t0 + crate::pool::OVERFLOW_GRACE;
        for c in conns.drain(..4) {
            checkin_at(&key, node(c), 1, limits, t0);
        }
        assert_eq!(idle(), 4, "a burst within the grace is kept whole");
        checkin_at(&key, node(conns.pop().unwrap()), 1, limits, later);
        assert_eq!(idle(), 2, "three stale ones left, down to size with the newcomer");
        // The newest comes out first: the one checked in last.
        let fresh = IDLE.with(|p| p.borrow().lists.get(&key).and_then(|l| l.last().map(|c| c.since)));
        assert_eq!(fresh, Some(later));
        for c in conns.drain(..) {
            checkin_at(&key, node(c), 1, limits, later);
        }
        assert_eq!(idle(), 5, "the stale one left behind the newcomers went with the first of them");
        sweep_at(Duration::from_secs(60), later + crate::pool::OVERFLOW_GRACE);
        assert_eq!(idle(), 2, "the sweep trims what stayed idle past the grace");
        sweep_at(Duration::from_secs(60), later + Duration::from_secs(60));
        assert_eq!(idle(), 0, "idle_timeout still applies");
        drop(peers);
    }

    /// A TLS connection to a node that reads nothing until `go` is sent, then reads everything
    /// and reports how many bytes came; both sockets have small buffers, so a write can leave
    /// bytes in the gateway's TLS session.
    async fn tls_node_that_waits() -> (Node, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<usize>)
    {
        use tokio::io::AsyncReadExt;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["node.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                crate::tls::parse_certs(&cert_pem).unwrap(),
                crate::tls::parse_key(&key_pem).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listening = tokio::net::TcpSocket::new_v4().unwrap();
        listening.set_recv_buffer_size(4096).unwrap();
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let mut tls = acceptor.accept(listener.accept().await.unwrap().0).await.unwrap();
            let _ = wait.await;
            let mut got = Vec::new();
            let _ = tls.read_to_end(&mut got).await;
            got.len()
        });
        let opts = crate::tls::ClientTlsOptions {
            verify: false,
            roots: Arc::new(rustls::RootCertStore::empty()),
            client_cert: None,
        };
        let client = crate::tls::ClientTls::new(opts).unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let tls = crate::connect_tls(tcp, addr, client.http1.clone(), "node.test", Duration::from_secs(5))
            .await
            .unwrap();
        (Node::new(NodeStream::Tls(Box::new(tls))), go, reader)
    }

    /// Over TLS a write that finds the socket full leaves bytes in the session: both body
    /// copiers (an HTTP/1.1 client's, an HTTP/2 client's) count them as still to send until a
    /// flush has passed them on, and the node gets the whole body.
    #[tokio::test]
    async fn bodies_to_tls_nodes_are_not_done_until_flushed() {
        const LEN: usize = 60 * 1024;
        let body = vec![5u8; LEN];
        let patience = Duration::from_millis(300);

        let (mut node, go, reader) = tls_node_that_waits().await;
        let mut pump = BodyPump::new(LEN as u64, None);
        let mut client = &body[..];
        let mut drive = async |pump: &mut BodyPump, node: &mut Node| {
            while !pump.done() {
                let step = std::future::poll_fn(|cx| pump.poll_step(cx, &mut client, node)).await;
                assert!(pump.apply(step).is_ok());
            }
        };
        let early = tokio::time::timeout(patience, drive(&mut pump, &mut node)).await;
        assert!(early.is_err(), "the pump said done while the node had read nothing");
        go.send(()).unwrap();
        drive(&mut pump, &mut node).await;
        let node = end_session(node).await;
        assert_eq!(reader.await.unwrap(), LEN);
        drop(node);

        let (mut node, go, reader) = tls_node_that_waits().await;
        let mut up = Upload::new(ProxyBody::full(body.clone()), false, patience, patience);
        let drive = async |up: &mut Upload, node: &mut Node| {
            while !up.done() {
                assert!(std::future::poll_fn(|cx| up.poll_step(cx, node)).await.is_ok());
            }
        };
        let early = tokio::time::timeout(patience, drive(&mut up, &mut node)).await;
        assert!(early.is_err(), "the upload said done while the node had read nothing");
        go.send(()).unwrap();
        drive(&mut up, &mut node).await;
        let node = end_session(node).await;
        assert_eq!(reader.await.unwrap(), LEN);
        drop(node);
    }

    /// Ends the session with `close_notify` and a FIN, and keeps the socket open (until the
    /// caller drops it, once the node has read to the end): closing it with the node's unread
    /// session tickets still queued would be a reset, which can cost the node the last bytes it
    /// had not read yet (the test then blamed the copiers, under load).
    async fn end_session(mut node: Node) -> Node {
        use tokio::io::AsyncWriteExt;
        let _ = node.stream.shutdown().await;
        node
    }

    fn head(extra: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method("POST").uri("/x");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn eligible_takes_one_plain_content_length_or_chunked_alone() {
        let len = |n| Some(ReqBody::Length(n));
        assert_eq!(eligible(&head(&[])), len(0));
        assert_eq!(eligible(&head(&[("content-length", "5")])), len(5));
        assert_eq!(eligible(&head(&[("content-length", "5"), ("content-length", "5")])), len(5));
        assert_eq!(eligible(&head(&[("content-length", "65536")])), len(BODY_MAX));
        assert_eq!(eligible(&head(&[("content-length", "10737418240")])), len(10 << 30));
        assert_eq!(eligible(&head(&[("content-length", "5"), ("expect", "100-Continue")])), len(5));
        assert_eq!(eligible(&head(&[("transfer-encoding", "Chunked")])), Some(ReqBody::Chunked));
        for refused in [
            &[("content-length", "0"), ("content-length", "5")][..],
            &[("content-length", "+5")],
            &[("content-length", "5,5")],
            &[("content-length", "0x5")],
            &[("content-length", "99999999999999999999")],
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "gzip, chunked")],
            &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "identity")],
            &[("content-length", "5"), ("expect", "something-else")],
            &[("content-length", "5"), ("expect", "100-continue"), ("expect", "100-continue")],
            &[("connection", "keep-alive, close")],
            &[("upgrade", "websocket")],
        ] {
            assert_eq!(eligible(&head(refused)), None, "{refused:?}");
        }
    }

    #[test]
    fn a_streamed_body_takes_nothing_past_its_end() {
        let mut buf = BytesMut::from(&b"HEAD5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n"[..]);
        let body = StreamedBody::start(ReqBody::Chunked, &mut buf, 4).unwrap();
        assert_eq!(&body.prefix[..], b"5\r\nhello\r\n0\r\n\r\n");
        assert_eq!((body.left, &buf[..]), (0, &b"GET / HTTP/1.1\r\n"[..]));
        let mut buf = BytesMut::from(&b"HEAD5\r\nhel"[..]);
        let body = StreamedBody::start(ReqBody::Chunked, &mut buf, 4).unwrap();
        assert_eq!((&body.prefix[..], body.left, buf.len()), (&b"5\r\nhel"[..], 1, 0));
        let mut buf = BytesMut::from(&b"HEADzz\r\n"[..]);
        assert!(StreamedBody::start(ReqBody::Chunked, &mut buf, 4).is_none());
        assert_eq!(&buf[..], b"HEADzz\r\n", "left as it came, for hyper");
        let mut buf = BytesMut::from(&b"HEADabcdef"[..]);
        let body = StreamedBody::start(ReqBody::Length(100_000), &mut buf, 4).unwrap();
        assert_eq!((&body.prefix[..], body.left), (&b"abcdef"[..], 100_000 - 6));
    }

    #[test]
    fn chunked_end_is_found_across_reads() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut st = ChunkedState::default();
            let (a, done_a) = st.feed(&body[..split]);
            assert!(done_a || a == split, "an unfinished body takes every byte");
            let end = if done_a {
                a
            } else {
                let (b, done_b) = st.feed(&body[split..]);
                assert!(done_b, "split at {split}");
                split + b
            };
            assert_eq!(&body[end..], b"NEXT", "split at {split}");
            assert!(!st.failed);
        }
        let mut st = ChunkedState::default();
        st.feed(b"zz\r\n");
        assert!(st.failed, "a size must be hex");
    }

    #[test]
    fn chunk_sizes_extensions_and_trailers_are_read_strictly() {
        let fails = |body: &[u8]| {
            let mut st = ChunkedState::default();
            st.feed(body);
            st.failed
        };
        // Whitespace after a size may only lead to an extension or the line's end.
        assert!(!fails(b"5 \r\nhello\r\n0\r\n\r\n"));
        assert!(!fails(b"5\t ;a=b\r\nhello\r\n0\r\n\r\n"));
        assert!(fails(b"1 0\r\n"), "a node that drops inner spaces would read 0x10");
        assert!(fails(b"5 junk\r\n"));
        // Extensions and trailers are bounded.
        let ext = [&b"5;"[..], &vec![b'e'; CHUNK_EXT_MAX + 1], b"\r\n"].concat();
        assert!(fails(&ext));
        let trailers = [&b"0\r\n"[..], &b"x-t: 1\r\n".repeat(TRAILERS_MAX / 8 + 1), b"\r\n"].concat();
        assert!(fails(&trailers));
    }

    /// Invalid trailers arriving in a later read than the field's start fail the body without
    /// cutting anything (the cut once ran past what the read had taken: a panic).
    #[test]
    fn invalid_trailers_in_a_later_read_fail_cleanly() {
        for bad in [&b"X: a\x01\r\n\r\n"[..], b"\n", b"X: a\r\x02", b"X: a\n\r\n"] {
            let mut st = ChunkedState::default();
            let mut first = b"5\r\nhello\r\n0\r\n".to_vec();
            let (used, kept, done) = st.feed_request(&mut first);
            assert_eq!((used, kept, done), (first.len(), first.len(), false));
            for split in 0..bad.len() {
                let mut st2 = st.clone();
                let mut a = bad[..split].to_vec();
                let (u, k, _) = st2.feed_request(&mut a);
                assert!(k <= u && u <= a.len());
                if st2.failed {
                    continue;
                }
                let mut b = bad[split..].to_vec();
                let (u, k, done) = st2.feed_request(&mut b);
                assert!(k <= u && u <= b.len() && !done);
                assert!(st2.failed, "{bad:?} split at {split}");
            }
        }
    }

    /// A request body loses its trailer fields on the way to the node, wherever the reads split
    /// it, and ends as a body without trailers does; what follows it stays for the next request.
    #[test]
    fn request_trailers_are_cut_out_across_reads() {
        let body = b"5\r\nhello\r\n0\r\nHost: internal\r\nX-Forwarded-For: 127.0.0.1\r\n\r\nNEXT";
        for split in 0..=body.len() {
            for split2 in split..=body.len() {
                let mut st = ChunkedState::default();
                let mut sent = Vec::new();
                let mut at = 0;
                for end in [split, split2, body.len()] {
                    if at >= end || matches!(st.step, Step::Done) {
                        continue;
                    }
                    let mut piece = body[at..end].to_vec();
                    let (used, kept, _) = st.feed_request(&mut piece);
                    assert!(!st.failed);
                    sent.extend_from_slice(&piece[..kept]);
                    at += used;
                }
                assert_eq!(sent, b"5\r\nhello\r\n0\r\n\r\n", "split at {split}, {split2}");
                assert_eq!(&body[at..], b"NEXT", "split at {split}, {split2}");
            }
        }
    }

    /// Decodes `body` fed in two pieces split at every position: (data, trailers, bytes left).
    fn decode_split(body: &[u8], split: usize) -> (Vec<u8>, Option<http::HeaderMap>, Vec<u8>) {
        let mut st = ChunkedState::default();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut buf = BytesMut::from(&body[..split]);
        let mut fed_rest = false;
        loop {
            match st.decode(&mut buf) {
                Next::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Next::End => {
                    if !fed_rest {
                        buf.extend_from_slice(&body[split..]);
                    }
                    return (data, trailers, buf.to_vec());
                }
                Next::More if !fed_rest => {
                    buf.extend_from_slice(&body[split..]);
                    fed_rest = true;
                }
                Next::More => panic!("incomplete at split {split}"),
                Next::Error(e) => panic!("split {split}: {e}"),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_across_reads_with_and_without_trailers() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\nNEXT";
        for split in 0..=body.len() {
            let (data, trailers, rest) = decode_split(body, split);
            assert_eq!(data, b"hello, world", "split {split}");
            let t = trailers.expect("trailers");
            assert_eq!((&t["x-t"], &t["x-u"]), (&"1".parse::<HeaderValue>().unwrap(), &"2".parse().unwrap()));
            assert_eq!(rest, b"NEXT", "bytes after the body stay for the caller (split {split})");
        }
        let body = b"3\r\nabc\r\n0\r\n\r\n";
        for split in 0..=body.len() {
            let (data, trailers, rest) = decode_split(body, split);
            assert_eq!((&data[..], trailers.is_none(), rest.len()), (&b"abc"[..], true, 0), "split {split}");
        }
        let mut st = ChunkedState::default();
        assert!(matches!(st.decode(&mut BytesMut::from(&b"3\r\nabcX\r\n"[..])), Next::Frame(_)));
    }

    #[test]
    fn the_gateways_upstream_status_replaces_the_nodes() {
        let node_head =
            b"HTTP/1.1 503 Service Unavailable\r\nx-apisix-upstream-status: 200\r\ndate: d\r\n\r\n";
        let mut head = node_head.to_vec();
        end_head(&mut head, false, Shown { prior: &[502], always: false }, 503);
        assert_eq!(
            String::from_utf8_lossy(&head),
            "HTTP/1.1 503 Service Unavailable\r\ndate: d\r\nX-APISIX-Upstream-Status: 502, 503\r\n\r\n"
        );
        // Not shown (a 2xx, APISIX's default): the node's own header goes on as it is.
        let ok_head = b"HTTP/1.1 200 OK\r\nX-APISIX-Upstream-Status: x\r\n\r\n";
        let mut head = ok_head.to_vec();
        end_head(&mut head, false, Shown { prior: &[], always: false }, 200);
        assert_eq!(head, ok_head);
        let mut head = ok_head.to_vec();
        end_head(&mut head, true, Shown { prior: &[], always: true }, 200);
        assert_eq!(
            String::from_utf8_lossy(&head),
            "HTTP/1.1 200 OK\r\nconnection: close\r\nX-APISIX-Upstream-Status: 200\r\n\r\n"
        );
    }

    #[test]
    fn response_framing_and_hop_headers() {
        let p = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: t=5\r\n\r\nhello", false, HeadFor::Bytes)
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Framing::Length(5));
        assert!(p.keepalive);
        // The node sent no Date: the gateway's is added.
        let head = String::from_utf8_lossy(&p.head);
        let date = head.strip_prefix("HTTP/1.1 200 OK\r\nContent-Length: 5\r\ndate: ").expect(&head);
        assert!(date.len() == 29 + 4 && date.ends_with(" GMT\r\n\r\n"), "{head}");
        let p = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: d\r\nContent-Length: 9\r\n\r\n",
            false,
            HeadFor::Bytes,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.framing, Framing::Chunked, "Transfer-Encoding wins over Content-Length");
        assert_eq!(
            String::from_utf8_lossy(&p.head),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: d\r\n\r\n",
            "the node's Date is kept"
        );
        let p = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false, HeadFor::Bytes).unwrap().unwrap();
        assert_eq!((p.framing, p.keepalive), (Framing::UntilClose, false));
        let p =
            parse_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", false, HeadFor::Bytes)
                .unwrap()
                .unwrap();
        assert_eq!(p.framing, Framing::None);
        let p = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true, HeadFor::Bytes)
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Framing::None, "HEAD");
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                HeadFor::Bytes
            )
            .is_err()
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false, HeadFor::Bytes).is_err()
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nConte", false, HeadFor::Bytes).unwrap().is_none());
    }
}
