//! Conformance (RFC 9113, RFC 7541) and robustness tests of the HTTP/2 server, run against
//! `serve` over an in-memory pipe by a small raw client written here: it frames by hand, encodes
//! requests as plain HPACK literals and decodes answers with the server's own [`Decoder`].
//!
//! Covered: requests and answers (CONTINUATION, padded DATA, trailers, the answer's headers);
//! malformed requests (stream errors) and oversized heads (431); connection errors and their
//! GOAWAY codes; flow control both ways and `send_timeout`; client resets and the rapid-reset
//! limit; graceful shutdown and the idle close; random frames, which must neither panic nor hang
//! a connection.
//!
//! Waiting is bounded by [`DEADLINE`], never by sleeps: "the server sent nothing more" is checked
//! with a PING, which the server answers only after everything sent before it was handled.

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use super::frame::{self, Reason};
use super::hpack::{Decoder, Name, Pseudo};
use super::{Error, Settings};
use crate::body::ProxyBody;
use crate::test_rng::Rng;

/// How long the client waits for anything the server should do at once.
const DEADLINE: Duration = Duration::from_secs(5);

const GET: [(&str, &str); 4] =
    [(":method", "GET"), (":scheme", "https"), (":authority", "example.com"), (":path", "/")];
const POST: [(&str, &str); 4] =
    [(":method", "POST"), (":scheme", "https"), (":authority", "example.com"), (":path", "/upload")];

fn settings() -> Settings {
    Settings::new(Duration::from_secs(60), Duration::from_secs(10))
}

/// A request head's fields, in order.
type Head<'a> = Vec<(&'a str, &'a str)>;

/// `base`, then `extra`.
fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Head<'a> {
    base.iter().chain(extra).copied().collect()
}

// ------------------------------------------------------------------ services

/// A service's answer in the making.
type Answering = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// Answers 200 `hello` at once, with the request's `x-` headers copied into the answer.
fn hello(req: Request<ProxyBody>) -> Ready<Response<ProxyBody>> {
    let mut resp = Response::new(ProxyBody::full("hello"));
    for (name, value) in req.headers() {
        if name.as_str().starts_with("x-") {
            resp.headers_mut().append(name, value.clone());
        }
    }
    ready(resp)
}

/// Reads the whole request body, then answers 200 with its length; a trailer `x-checksum` comes
/// back as the header `x-got-checksum`. A body that breaks gets a 400.
fn echo(req: Request<ProxyBody>) -> Answering {
    Box::pin(async move {
        let Ok(body) = req.into_body().collect().await else {
            return status(400);
        };
        let checksum = body.trailers().and_then(|t| t.get("x-checksum")).cloned();
        let mut resp = Response::new(ProxyBody::full(body.to_bytes().len().to_string()));
        if let Some(v) = checksum {
            resp.headers_mut().insert("x-got-checksum", v);
        }
        resp
    })
}

/// Keeps a POST (its body unread) and never answers it; answers anything else like [`hello`].
fn hold_posts(req: Request<ProxyBody>) -> Answering {
    if *req.method() != Method::POST {
        return Box::pin(hello(req));
    }
    Box::pin(async move {
        let _unread = req;
        std::future::pending::<Response<ProxyBody>>().await
    })
}

/// Answers every request with `body`, once `notify_waiters` is called on the returned gate
/// (for the requests whose answers are waiting then).
fn gated(body: Bytes) -> (Arc<Notify>, impl FnMut(Request<ProxyBody>) -> Answering + Send + 'static) {
    let gate = Arc::new(Notify::new());
    let waits = gate.clone();
    let service = move |_req: Request<ProxyBody>| -> Answering {
        let (waits, body) = (waits.clone(), body.clone());
        Box::pin(async move {
            waits.notified().await;
            Response::new(ProxyBody::full(body))
        })
    };
    (gate, service)
}

/// Sends on its channel when dropped.
struct OnDrop(mpsc::UnboundedSender<()>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A service that never answers and reports each call (first receiver) and each request future
/// it dropped (second).
fn watched_never() -> (
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedReceiver<()>,
    impl FnMut(Request<ProxyBody>) -> Answering + Send + 'static,
) {
    let (called_tx, called) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let service = move |_req: Request<ProxyBody>| -> Answering {
        let _ = called_tx.send(());
        let guard = OnDrop(dropped_tx.clone());
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<Response<ProxyBody>>().await
        })
    };
    (called, dropped, service)
}

/// Never answers.
fn never(_req: Request<ProxyBody>) -> std::future::Pending<Response<ProxyBody>> {
    std::future::pending()
}

/// Answers at once with `n` octets.
fn body_of(n: usize) -> impl FnMut(Request<ProxyBody>) -> Ready<Response<ProxyBody>> + Send + 'static {
    move |_req| ready(Response::new(ProxyBody::full(vec![b'x'; n])))
}

fn status(code: u16) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp
}

// ------------------------------------------------------------------ writing frames

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(frame::HEAD_LEN + payload.len());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    b.push(kind);
    b.push(flags);
    b.extend_from_slice(&stream.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// An HPACK string length: a 7-bit prefix integer (RFC 7541 §5.1), Huffman bit clear.
fn put_len(dst: &mut Vec<u8>, n: usize) {
    if n < 127 {
        dst.push(n as u8);
        return;
    }
    dst.push(127);
    let mut rest = n - 127;
    while rest >= 128 {
        dst.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    dst.push(rest as u8);
}

/// A header block of literal fields without indexing, with new names, not Huffman-coded: the
/// names and values go as they are, valid or not.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        put_len(&mut b, name.len());
        b.extend_from_slice(name.as_bytes());
        put_len(&mut b, value.len());
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// A header block as HEADERS and as many CONTINUATION frames as 16 KiB frames need.
fn header_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let pieces: Vec<&[u8]> = block.chunks(frame::DEFAULT_MAX_FRAME).collect();
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let (kind, mut flags) = match i {
            0 => (frame::HEADERS, if end_stream { frame::END_STREAM } else { 0 }),
            _ => (frame::CONTINUATION, 0),
        };
        if i + 1 == pieces.len() {
            flags |= frame::END_HEADERS;
        }
        out.extend(frame_bytes(kind, flags, stream, piece));
    }
    out
}

/// `len` zero octets on `stream` in full-size DATA frames, without END_STREAM.
fn data_frames(stream: u32, len: usize) -> Vec<u8> {
    let zeros = vec![0; len];
    zeros.chunks(frame::DEFAULT_MAX_FRAME).flat_map(|c| frame_bytes(frame::DATA, 0, stream, c)).collect()
}

/// A PADDED frame's payload: the pad length, `data`, then `pad` zeros.
fn padded(data: &[u8], pad: u8) -> Vec<u8> {
    let mut p = vec![pad];
    p.extend_from_slice(data);
    p.resize(p.len() + pad as usize, 0);
    p
}

fn settings_payload(settings: &[(u16, u32)]) -> Vec<u8> {
    settings.iter().flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes())).collect()
}

// ------------------------------------------------------------------ reading frames

/// A frame from the server. A header block comes as one HEADERS frame (its CONTINUATION frames
/// joined), with its fields decoded.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
    fields: Vec<(String, String)>,
}

impl Frame {
    fn is(&self, kind: u8, stream: u32) -> bool {
        self.kind == kind && self.stream == stream
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn is_ping_ack(&self, payload: &[u8]) -> bool {
        self.is(frame::PING, 0) && self.has(frame::ACK) && self.payload == payload
    }

    /// The error code of a RST_STREAM or GOAWAY frame.
    fn code(&self) -> Reason {
        let at = if self.kind == frame::GOAWAY { 4 } else { 0 };
        let b = self.payload.get(at..at + 4).unwrap_or_else(|| panic!("no error code in {self:?}"));
        Reason(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// What came on one stream.
#[derive(Debug, Default)]
struct Answer {
    /// The fields of the head, `:status` first.
    head: Vec<(String, String)>,
    data: Vec<u8>,
    trailers: Vec<(String, String)>,
    /// END_STREAM came on a DATA frame.
    ended_by_data: bool,
    reset: Option<Reason>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }
}

fn name_str(name: Name) -> String {
    match name {
        Name::Pseudo(Pseudo::Method) => ":method".into(),
        Name::Pseudo(Pseudo::Scheme) => ":scheme".into(),
        Name::Pseudo(Pseudo::Authority) => ":authority".into(),
        Name::Pseudo(Pseudo::Path) => ":path".into(),
        Name::Pseudo(Pseudo::Status) => ":status".into(),
        Name::Pseudo(Pseudo::Protocol) => ":protocol".into(),
        Name::Header(h) => h.as_str().into(),
        Name::Invalid => "<invalid>".into(),
    }
}

// ------------------------------------------------------------------ the client

/// The client end of a connection served by `serve` in its own task.
struct Client {
    io: DuplexStream,
    rbuf: BytesMut,
    decoder: Decoder,
    server: JoinHandle<Result<(), Error>>,
    /// Completes the server's `shutdown` future.
    shutdown: Option<oneshot::Sender<()>>,
    pings: u64,
    /// The server's SETTINGS, in order.
    server_settings: Vec<(u16, u32)>,
    /// The server's first WINDOW_UPDATE for the connection.
    server_window: u32,
    /// How long a read waits for the server ([`DEADLINE`] unless a test waits for timers).
    patience: Duration,
}

impl Client {
    /// Starts `serve`; nothing is sent yet.
    fn start<F, Fut>(settings: Settings, service: F) -> Client
    where
        F: FnMut(Request<ProxyBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Unpin + Send + 'static,
    {
        Client::start_in(1 << 20, settings, service)
    }

    /// [`Client::start`] over a pipe that holds `buffer` octets each way.
    fn start_in<F, Fut>(buffer: usize, settings: Settings, service: F) -> Client
    where
        F: FnMut(Request<ProxyBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Unpin + Send + 'static,
    {
        let (io, server_io) = tokio::io::duplex(buffer);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // Only an explicit shutdown counts, not the sender dropped with the client.
            let shutdown = async move {
                if shutdown_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            super::serve(server_io, &settings, service, shutdown).await
        });
        Client {
            io,
            rbuf: BytesMut::new(),
            decoder: Decoder::new(),
            server,
            shutdown: Some(shutdown_tx),
            pings: 0,
            server_settings: Vec::new(),
            server_window: 0,
            patience: DEADLINE,
        }
    }

    /// Starts `serve` and exchanges the prefaces, the client's with these settings.
    async fn connect_with<F, Fut>(settings: Settings, ours: &[(u16, u32)], service: F) -> Client
    where
        F: FnMut(Request<ProxyBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Unpin + Send + 'static,
    {
        Client::handshake(Client::start(settings, service), ours).await
    }

    /// Exchanges the prefaces, the client's with these settings.
    async fn handshake(mut c: Client, ours: &[(u16, u32)]) -> Client {
        let mut preface = frame::PREFACE.to_vec();
        preface.extend(frame_bytes(frame::SETTINGS, 0, 0, &settings_payload(ours)));
        c.send(&preface).await;
        let f = c.frame().await;
        assert!(f.is(frame::SETTINGS, 0) && !f.has(frame::ACK), "the server starts with SETTINGS: {f:?}");
        assert!(f.payload.len().is_multiple_of(6), "SETTINGS of whole settings: {f:?}");
        c.server_settings = f
            .payload
            .chunks_exact(6)
            .map(|s| (u16::from_be_bytes([s[0], s[1]]), u32::from_be_bytes([s[2], s[3], s[4], s[5]])))
            .collect();
        let f = c.frame().await;
        assert!(
            f.is(frame::WINDOW_UPDATE, 0) && f.payload.len() == 4,
            "then a WINDOW_UPDATE of the connection: {f:?}"
        );
        c.server_window = u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
        c.send_frame(frame::SETTINGS, frame::ACK, 0, &[]).await;
        let f = c.frame().await;
        assert!(
            f.is(frame::SETTINGS, 0) && f.has(frame::ACK) && f.payload.is_empty(),
            "the client's SETTINGS is acknowledged: {f:?}"
        );
        c
    }

    async fn connect<F, Fut>(settings: Settings, service: F) -> Client
    where
        F: FnMut(Request<ProxyBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<ProxyBody>> + Unpin + Send + 'static,
    {
        Client::connect_with(settings, &[], service).await
    }

    async fn send(&mut self, bytes: &[u8]) {
        timeout(DEADLINE, self.io.write_all(bytes))
            .await
            .expect("the server stopped reading")
            .expect("writing to the server");
    }

    async fn send_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.send(&frame_bytes(kind, flags, stream, payload)).await;
    }

    /// A request head in one HEADERS frame.
    async fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) {
        let flags = frame::END_HEADERS | if end_stream { frame::END_STREAM } else { 0 };
        self.send_frame(frame::HEADERS, flags, stream, &block(fields)).await;
    }

    async fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        self.send_frame(frame::DATA, if end_stream { frame::END_STREAM } else { 0 }, stream, data).await;
    }

    async fn window_update(&mut self, stream: u32, n: u32) {
        self.send_frame(frame::WINDOW_UPDATE, 0, stream, &n.to_be_bytes()).await;
    }

    async fn rst(&mut self, stream: u32, reason: Reason) {
        self.send_frame(frame::RST_STREAM, 0, stream, &reason.0.to_be_bytes()).await;
    }

    /// The next frame as it came, or `None` once the server closed the connection.
    async fn raw_frame(&mut self) -> Option<Frame> {
        let read = async {
            loop {
                if self.rbuf.len() >= frame::HEAD_LEN {
                    let len = u32::from_be_bytes([0, self.rbuf[0], self.rbuf[1], self.rbuf[2]]) as usize;
                    if self.rbuf.len() >= frame::HEAD_LEN + len {
                        let head = self.rbuf.split_to(frame::HEAD_LEN);
                        let payload = self.rbuf.split_to(len).to_vec();
                        return Some(Frame {
                            kind: head[3],
                            flags: head[4],
                            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                            payload,
                            fields: Vec::new(),
                        });
                    }
                }
                self.rbuf.reserve(64 * 1024);
                let n = self.io.read_buf(&mut self.rbuf).await.expect("reading from the server");
                if n == 0 {
                    assert!(self.rbuf.is_empty(), "the connection closed inside a frame");
                    return None;
                }
            }
        };
        timeout(self.patience, read).await.expect("nothing from the server within the deadline")
    }

    /// The next frame, a header block joined and decoded, or `None` once the server closed the
    /// connection.
    async fn try_frame(&mut self) -> Option<Frame> {
        let mut f = self.raw_frame().await?;
        if f.kind != frame::HEADERS {
            return Some(f);
        }
        let mut block = std::mem::take(&mut f.payload);
        let mut end = f.has(frame::END_HEADERS);
        while !end {
            let c = self.raw_frame().await.expect("the connection closed inside a header block");
            assert!(c.is(frame::CONTINUATION, f.stream), "a header block interrupted by {c:?}");
            block.extend_from_slice(&c.payload);
            end = c.has(frame::END_HEADERS);
        }
        f.flags |= frame::END_HEADERS;
        let mut fields = Vec::new();
        self.decoder
            .decode(&block, |name, value| {
                fields.push((name_str(name), String::from_utf8_lossy(&value).into_owned()));
            })
            .expect("the server's header block decodes");
        f.fields = fields;
        Some(f)
    }

    async fn frame(&mut self) -> Frame {
        if let Some(f) = self.try_frame().await {
            return f;
        }
        let why = self.why_closed().await;
        panic!("the connection closed ({why})");
    }

    /// What became of `serve`, for a connection that closed when it should not have.
    async fn why_closed(&mut self) -> String {
        match timeout(DEADLINE, &mut self.server).await {
            Ok(Ok(result)) => format!("serve returned {result:?}"),
            Ok(Err(e)) => format!("serve failed: {e}"),
            Err(_) => "serve is still running".to_string(),
        }
    }

    /// Reads until `stream` ends (END_STREAM or RST_STREAM). Frames on other streams and on the
    /// connection are passed over; a GOAWAY with an error fails the test.
    async fn answer(&mut self, stream: u32) -> Answer {
        let mut a = Answer::default();
        loop {
            let Some(f) = self.try_frame().await else {
                let why = self.why_closed().await;
                panic!("the connection closed before stream {stream} ended ({why}); got {a:?}");
            };
            if f.kind == frame::GOAWAY {
                assert_eq!(f.code(), Reason::NO_ERROR, "connection error while waiting for stream {stream}");
            }
            if f.stream != stream {
                continue;
            }
            let end = f.has(frame::END_STREAM) && matches!(f.kind, frame::HEADERS | frame::DATA);
            match f.kind {
                frame::HEADERS if a.head.is_empty() => a.head = f.fields,
                frame::HEADERS => a.trailers = f.fields,
                frame::DATA => {
                    a.data.extend_from_slice(&f.payload);
                    a.ended_by_data = end;
                }
                frame::RST_STREAM => {
                    a.reset = Some(f.code());
                    return a;
                }
                _ => {}
            }
            if end {
                return a;
            }
        }
    }

    /// Reads frames until `n` octets of DATA came on `stream`; returns how many came.
    async fn data_on(&mut self, stream: u32, n: usize) -> usize {
        let mut got = 0;
        while got < n {
            let f = self.frame().await;
            if f.is(frame::DATA, stream) {
                got += f.payload.len();
            }
        }
        got
    }

    /// Sends a PING and returns the frames the server wrote before acknowledging it, which
    /// it does once it has handled everything sent before the PING.
    async fn barrier(&mut self) -> Vec<Frame> {
        self.pings += 1;
        let payload = self.pings.to_be_bytes();
        self.send_frame(frame::PING, 0, 0, &payload).await;
        let mut seen = Vec::new();
        loop {
            let f = self.frame().await;
            if f.is_ping_ack(&payload) {
                return seen;
            }
            seen.push(f);
        }
    }

    /// Lets the server catch up: a PING, then whatever comes before its acknowledgement. False if
    /// the connection ended first.
    async fn sync(&mut self) -> bool {
        self.pings += 1;
        let payload = self.pings.to_be_bytes();
        let ping = frame_bytes(frame::PING, 0, 0, &payload);
        if timeout(DEADLINE, self.io.write_all(&ping)).await.map_or(true, |r| r.is_err()) {
            return false;
        }
        while let Some(f) = self.try_frame().await {
            if f.is_ping_ack(&payload) {
                return true;
            }
        }
        false
    }

    /// Reads up to the server's GOAWAY: its last stream id and code.
    async fn goaway(&mut self) -> (u32, Reason) {
        loop {
            let f = self.frame().await;
            if f.is(frame::GOAWAY, 0) {
                let p = &f.payload;
                assert!(p.len() >= 8, "GOAWAY too short: {f:?}");
                return (u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff, f.code());
            }
        }
    }

    /// Expects a connection error: a GOAWAY with `code` before the answer to a PING sent behind
    /// what was sent last, then the close, and `serve` returning that error.
    async fn expect_conn_error(mut self, code: Reason, what: &str) {
        const PING: &[u8; 8] = b"goaway??";
        // The server may stop reading at the error: the PING need not get through.
        let _ = timeout(DEADLINE, self.io.write_all(&frame_bytes(frame::PING, 0, 0, PING))).await;
        loop {
            let Some(f) = self.try_frame().await else {
                let why = self.why_closed().await;
                panic!("{what}: the connection closed without GOAWAY ({why})");
            };
            assert!(!f.is_ping_ack(PING), "{what}: no connection error, the server went on");
            if f.is(frame::GOAWAY, 0) {
                assert_eq!(f.code(), code, "{what}: GOAWAY {f:?}");
                break;
            }
        }
        let result = self.finish().await;
        assert!(
            matches!(result, Err(Error::Protocol(c, _)) if c == code),
            "{what}: serve returned {result:?}"
        );
    }

    /// Closes the client's side, reads what is left and returns what `serve` returned.
    async fn finish(mut self) -> Result<(), Error> {
        let _ = self.io.shutdown().await;
        while self.try_frame().await.is_some() {}
        match timeout(DEADLINE, self.server).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => panic!("serve failed: {e}"),
            Err(_) => panic!("serve did not return once the client closed"),
        }
    }
}

// ------------------------------------------------------------------ requests and answers

#[tokio::test]
async fn a_get_gets_the_services_answer_and_the_service_sees_the_request() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(Method, Uri, HeaderMap)>();
    let service = move |req: Request<ProxyBody>| {
        let _ = seen_tx.send((req.method().clone(), req.uri().clone(), req.headers().clone()));
        ready(Response::builder().header("x-answer", "yes").body(ProxyBody::full("hello, world")).unwrap())
    };
    let mut c = Client::connect(settings(), service).await;
    let fields = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/hello?x=1"),
        ("x-request-id", "42"),
    ];
    c.headers(1, &fields, true).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200), "{a:?}");
    assert_eq!(a.header("x-answer"), Some("yes"));
    assert_eq!(a.data, b"hello, world");
    assert!(a.ended_by_data, "END_STREAM on the last DATA frame: {a:?}");
    assert_eq!(a.reset, None);

    let (method, uri, headers) = seen.try_recv().expect("the service was called");
    assert_eq!(method, Method::GET);
    assert_eq!(uri.scheme_str(), Some("https"));
    assert_eq!(uri.authority().map(|a| a.as_str()), Some("example.com"));
    assert_eq!(uri.path_and_query().map(|p| p.as_str()), Some("/hello?x=1"));
    assert_eq!(headers.get("x-request-id").map(|v| v.as_bytes()), Some(&b"42"[..]));
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn an_answer_loses_connection_headers_and_gains_date_and_content_length() {
    let service = |_req: Request<ProxyBody>| {
        let resp = Response::builder()
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "1")
            .body(ProxyBody::full("abc"))
            .unwrap();
        ready(resp)
    };
    let mut c = Client::connect(settings(), service).await;
    c.headers(1, &GET, true).await;
    let a = c.answer(1).await;
    for gone in ["connection", "x-hop", "keep-alive"] {
        assert_eq!(a.header(gone), None, "{gone} is connection-specific (RFC 9113 §8.2.2): {a:?}");
    }
    assert_eq!(a.header("x-kept"), Some("1"));
    assert_eq!(a.header("content-length"), Some("3"));
    assert!(a.header("date").is_some(), "an answer without date gets one: {a:?}");
    assert_eq!(a.data, b"abc");
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn answer_trailers_follow_the_body_in_headers_with_end_stream() {
    let service = |_req: Request<ProxyBody>| {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = Full::new(Bytes::from_static(b"message")).with_trailers(ready(Some(Ok(trailers))));
        ready(Response::new(ProxyBody::boxed(body)))
    };
    let mut c = Client::connect(settings(), service).await;
    c.headers(1, &GET, true).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200), "{a:?}");
    assert_eq!(a.data, b"message");
    assert!(!a.ended_by_data, "END_STREAM on the trailers, not on the DATA: {a:?}");
    assert_eq!(a.trailers, [("grpc-status".to_string(), "0".to_string())]);
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_header_block_split_over_continuation_frames_is_served() {
    let mut c = Client::connect(settings(), hello).await;
    let long = "l".repeat(100);
    let b = block(&with(&GET, &[("x-long", long.as_str())]));
    let (first, rest) = b.split_at(b.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    let mut bytes = frame_bytes(frame::HEADERS, frame::END_STREAM, 1, first);
    bytes.extend(frame_bytes(frame::CONTINUATION, 0, 1, second));
    bytes.extend(frame_bytes(frame::CONTINUATION, frame::END_HEADERS, 1, third));
    c.send(&bytes).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200), "{a:?}");
    assert_eq!(a.header("x-long"), Some(long.as_str()), "the whole block was decoded");
    assert_eq!(a.data, b"hello");
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_request_body_in_padded_data_frames_and_its_trailers_reach_the_service() {
    let mut c = Client::connect(settings(), echo).await;
    c.headers(1, &with(&POST, &[("content-length", "20")]), false).await;
    c.data(1, b"hello", false).await;
    c.send_frame(frame::DATA, frame::PADDED, 1, &padded(b" big", 7)).await;
    c.send_frame(frame::DATA, frame::PADDED, 1, &padded(b" wide", 0)).await;
    c.data(1, b" world", false).await;
    c.send_frame(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1, &block(&[("x-checksum", "abc")]))
        .await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200), "{a:?}");
    assert_eq!(a.data, b"20", "the whole body, without the padding, matching its content-length");
    assert_eq!(a.header("x-got-checksum"), Some("abc"), "the trailers reached the service");

    // A larger body, END_STREAM on its last DATA frame.
    c.headers(3, &POST, false).await;
    let body = vec![7u8; 200_000];
    let pieces: Vec<&[u8]> = body.chunks(frame::DEFAULT_MAX_FRAME).collect();
    let mut bytes = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let flags = if i + 1 == pieces.len() { frame::END_STREAM } else { 0 };
        bytes.extend(frame_bytes(frame::DATA, flags, 3, piece));
    }
    c.send(&bytes).await;
    let a = c.answer(3).await;
    assert_eq!(a.data, b"200000", "{a:?}");
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn malformed_requests_are_reset_and_the_connection_goes_on() {
    let mut c = Client::connect(settings(), echo).await;
    let cases: [(&str, Head, &[u8]); 7] = [
        ("an upper-case header name", with(&GET, &[("X-Upper", "1")]), &[]),
        ("no :path", GET[..3].to_vec(), &[]),
        ("a connection header", with(&GET, &[("connection", "keep-alive")]), &[]),
        ("a pseudo-header after a regular one", vec![GET[0], GET[1], ("x-a", "1"), GET[2], GET[3]], &[]),
        ("CR LF in a value", with(&GET, &[("x-a", "1\r\nx-b: 2")]), &[]),
        ("content-length 5 and END_STREAM on HEADERS", with(&POST, &[("content-length", "5")]), &[]),
        ("content-length 5 and 3 octets of DATA", with(&POST, &[("content-length", "5")]), b"abc"),
    ];
    for (i, (what, fields, data)) in cases.iter().enumerate() {
        let id = 4 * i as u32 + 1;
        c.headers(id, fields, data.is_empty()).await;
        if !data.is_empty() {
            c.data(id, data, true).await;
        }
        let a = c.answer(id).await;
        assert_eq!(a.reset, Some(Reason::PROTOCOL_ERROR), "{what}: {a:?}");
        assert!(a.head.is_empty(), "{what}: reset without an answer: {a:?}");
        c.headers(id + 2, &GET, true).await;
        assert_eq!(c.answer(id + 2).await.status(), Some(200), "the next stream after {what}");
    }
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_header_list_over_64_kib_gets_431() {
    let mut c = Client::connect(settings(), hello).await;
    let value = "v".repeat(8000);
    let names: Vec<String> = (0..9).map(|i| format!("x-big-{i}")).collect();
    let mut fields = GET.to_vec();
    fields.extend(names.iter().map(|n| (n.as_str(), value.as_str())));
    c.send(&header_frames(1, &block(&fields), true)).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(431), "{a:?}");
    assert!(a.data.is_empty() && a.reset.is_none() && !a.ended_by_data, "a 431 head alone: {a:?}");

    // 56 KiB is fine, and the connection (its HPACK state too) goes on.
    fields.truncate(GET.len() + 7);
    c.send(&header_frames(3, &block(&fields), true)).await;
    let a = c.answer(3).await;
    assert_eq!(a.status(), Some(200));
    assert_eq!(a.header("x-big-6").map(str::len), Some(8000));
    assert!(c.finish().await.is_ok());
}

// ------------------------------------------------------------------ the connection

#[tokio::test]
async fn ping_and_settings_are_acknowledged() {
    let mut c = Client::connect(settings(), hello).await;
    assert_eq!(
        c.server_settings,
        [
            (frame::SETTINGS_MAX_CONCURRENT_STREAMS, 1024),
            (frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
            (frame::SETTINGS_MAX_HEADER_LIST_SIZE, 64 * 1024),
        ],
        "the server's preface announces its limits"
    );
    assert_eq!(c.server_window, (4 << 20) - 65_535, "a 4 MiB connection window");

    c.send_frame(frame::PING, 0, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08").await;
    let f = c.frame().await;
    assert!(f.is_ping_ack(b"\x01\x02\x03\x04\x05\x06\x07\x08"), "PING ACK with the same octets: {f:?}");

    // An acknowledgement is not answered; unknown settings are ignored but acknowledged.
    c.send_frame(frame::PING, frame::ACK, 0, b"no reply").await;
    let ours = settings_payload(&[(frame::SETTINGS_MAX_FRAME_SIZE, 32_768), (0x99, 7)]);
    c.send_frame(frame::SETTINGS, 0, 0, &ours).await;
    let f = c.frame().await;
    assert!(f.is(frame::SETTINGS, 0) && f.has(frame::ACK) && f.payload.is_empty(), "SETTINGS ACK: {f:?}");
    let seen = c.barrier().await;
    assert!(seen.is_empty(), "nothing else: {seen:?}");
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_bad_preface_ends_the_connection() {
    for (what, bytes) in [
        ("an HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec()),
        (
            "a preface not followed by SETTINGS",
            [&frame::PREFACE[..], &frame_bytes(frame::PING, 0, 0, &[0; 8])[..]].concat(),
        ),
    ] {
        let mut c = Client::start(settings(), hello);
        c.send(&bytes).await;
        while let Some(f) = c.try_frame().await {
            if f.kind == frame::GOAWAY {
                assert_eq!(f.code(), Reason::PROTOCOL_ERROR, "{what}");
            }
        }
        let result = c.finish().await;
        assert!(
            matches!(result, Err(Error::Protocol(code, _)) if code == Reason::PROTOCOL_ERROR),
            "{what}: serve returned {result:?}"
        );
    }
}

#[tokio::test]
async fn connection_errors_end_with_goaway_and_their_code() {
    use frame::{CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, PING, SETTINGS, WINDOW_UPDATE};
    let get = block(&GET);
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "a frame over 16 KiB",
            frame_bytes(HEADERS, END_HEADERS | END_STREAM, 1, &[0; frame::DEFAULT_MAX_FRAME + 1]),
            Reason::FRAME_SIZE_ERROR,
        ),
        ("DATA on stream 0", frame_bytes(DATA, 0, 0, b"x"), Reason::PROTOCOL_ERROR),
        ("DATA on an idle stream", frame_bytes(DATA, 0, 1, b"x"), Reason::PROTOCOL_ERROR),
        (
            "CONTINUATION without HEADERS",
            frame_bytes(CONTINUATION, END_HEADERS, 1, &get),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "a header block interrupted by a PING",
            [frame_bytes(HEADERS, END_STREAM, 1, &get), frame_bytes(PING, 0, 0, &[0; 8])].concat(),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "an even stream id",
            frame_bytes(HEADERS, END_HEADERS | END_STREAM, 2, &get),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "HPACK index 0",
            frame_bytes(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80]),
            Reason::COMPRESSION_ERROR,
        ),
        (
            "a truncated HPACK string",
            frame_bytes(HEADERS, END_HEADERS | END_STREAM, 1, &[0x00, 0x05, b'a']),
            Reason::COMPRESSION_ERROR,
        ),
        (
            "RST_STREAM on an idle stream",
            frame_bytes(frame::RST_STREAM, 0, 1, &Reason::CANCEL.0.to_be_bytes()),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "PUSH_PROMISE from a client",
            frame_bytes(frame::PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
            Reason::PROTOCOL_ERROR,
        ),
        ("SETTINGS on a stream", frame_bytes(SETTINGS, 0, 1, &[]), Reason::PROTOCOL_ERROR),
        (
            "SETTINGS ACK with a payload",
            frame_bytes(SETTINGS, frame::ACK, 0, &[0; 6]),
            Reason::FRAME_SIZE_ERROR,
        ),
        (
            "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
            frame_bytes(SETTINGS, 0, 0, &settings_payload(&[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31)])),
            Reason::FLOW_CONTROL_ERROR,
        ),
        ("PING of 7 octets", frame_bytes(PING, 0, 0, &[0; 7]), Reason::FRAME_SIZE_ERROR),
        (
            "WINDOW_UPDATE of 0 on the connection",
            frame_bytes(WINDOW_UPDATE, 0, 0, &[0; 4]),
            Reason::PROTOCOL_ERROR,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = Client::connect(settings(), hello).await;
        c.send(&bytes).await;
        c.expect_conn_error(code, what).await;
    }
}

#[tokio::test]
async fn data_beyond_the_connection_window_is_a_flow_control_error() {
    let mut c = Client::connect(settings(), hold_posts).await;
    for id in [1, 3, 5, 7, 9] {
        c.headers(id, &POST, false).await;
    }
    // Nobody reads these bodies: 1 MiB on each of four streams fills the 4 MiB window.
    let bytes: Vec<u8> = [1, 3, 5, 7].into_iter().flat_map(|id| data_frames(id, 1 << 20)).collect();
    c.send(&bytes).await;
    let seen = c.barrier().await;
    assert!(
        seen.iter().all(|f| f.kind != frame::RST_STREAM && f.kind != frame::GOAWAY),
        "4 MiB over four streams is within the windows: {seen:?}"
    );
    c.data(9, b"x", false).await;
    c.expect_conn_error(Reason::FLOW_CONTROL_ERROR, "one octet past the connection window").await;
}

#[tokio::test]
async fn data_beyond_a_stream_window_resets_the_stream() {
    let mut c = Client::connect(settings(), hold_posts).await;
    c.headers(1, &POST, false).await;
    c.send(&data_frames(1, 1 << 20)).await;
    let seen = c.barrier().await;
    assert!(
        seen.iter().all(|f| f.kind != frame::RST_STREAM && f.kind != frame::GOAWAY),
        "1 MiB is within the stream window: {seen:?}"
    );
    c.data(1, b"x", false).await;
    let a = c.answer(1).await;
    assert_eq!(a.reset, Some(Reason::FLOW_CONTROL_ERROR), "{a:?}");
    c.headers(3, &GET, true).await;
    assert_eq!(c.answer(3).await.status(), Some(200), "the connection goes on");
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_header_block_over_256_kib_is_enhance_your_calm() {
    let mut c = Client::connect(settings(), hello).await;
    let piece = [0; frame::DEFAULT_MAX_FRAME];
    let mut bytes = frame_bytes(frame::HEADERS, frame::END_STREAM, 1, &piece);
    for _ in 0..16 {
        bytes.extend(frame_bytes(frame::CONTINUATION, 0, 1, &piece));
    }
    c.send(&bytes).await;
    c.expect_conn_error(Reason::ENHANCE_YOUR_CALM, "a header block of 17 × 16 KiB").await;
}

/// RFC 7541 §5.1: an integer past what the decoder takes is a decoding error, which RFC 9113
/// §4.3 makes a COMPRESSION_ERROR; the decoder must not overflow on the way.
#[tokio::test]
async fn an_overlong_hpack_integer_is_a_compression_error() {
    // An indexed field whose index goes on for 12 continuation octets of zero bits.
    let mut b = vec![0xff];
    b.extend([0x80; 12]);
    b.push(0x00);
    let mut c = Client::connect(settings(), hello).await;
    c.send_frame(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1, &b).await;
    c.expect_conn_error(Reason::COMPRESSION_ERROR, "an HPACK integer of 14 octets").await;
}

/// RFC 9113 §5.1.1: a new stream's id must exceed every id the client used before; "an endpoint
/// that receives an unexpected stream identifier MUST respond with a connection error of type
/// PROTOCOL_ERROR" (h2spec http2/5.1.1/2).
#[tokio::test]
async fn a_new_stream_below_the_last_one_is_a_connection_error() {
    let mut c = Client::connect(settings(), hello).await;
    let get = block(&GET);
    let bytes = [
        frame_bytes(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 5, &get),
        frame_bytes(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 3, &get),
    ]
    .concat();
    c.send(&bytes).await;
    c.expect_conn_error(Reason::PROTOCOL_ERROR, "HEADERS opening stream 3 after stream 5").await;
}

/// RFC 9113 §8.2.1: "A field value MUST NOT start or end with an ASCII whitespace character";
/// a request with one is malformed (§8.1.1): reset with PROTOCOL_ERROR (or refused with a
/// 400), not passed on.
#[tokio::test]
async fn a_header_value_with_surrounding_whitespace_is_malformed() {
    let mut c = Client::connect(settings(), hello).await;
    for (i, value) in [" leading", "trailing ", "\ttab"].into_iter().enumerate() {
        let id = 2 * i as u32 + 1;
        c.headers(id, &with(&GET, &[("x-padded", value)]), true).await;
        let a = c.answer(id).await;
        assert!(
            a.reset == Some(Reason::PROTOCOL_ERROR) || a.status() == Some(400),
            "x-padded: {value:?} was passed on: {a:?}"
        );
    }
}

// ------------------------------------------------------------------ resets

#[tokio::test]
async fn rapidly_reset_streams_cost_the_connection() {
    let mut c = Client::connect(settings(), never).await;
    let get = block(&GET);
    let mut bytes = Vec::new();
    for id in (1..600).step_by(2) {
        bytes.extend(frame_bytes(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, id, &get));
        bytes.extend(frame_bytes(frame::RST_STREAM, 0, id, &Reason::CANCEL.0.to_be_bytes()));
    }
    c.send(&bytes).await;
    c.expect_conn_error(Reason::ENHANCE_YOUR_CALM, "300 streams opened and reset at once").await;
}

/// The ids of the hundred streams of `round`, and the bytes that open them all (GETs) and
/// that reset them all (CANCEL).
fn hundred_streams(round: u32) -> (Vec<u32>, Vec<u8>, Vec<u8>) {
    let ids: Vec<u32> = (0..100).map(|i| 1 + 2 * (round * 100 + i)).collect();
    let get = block(&GET);
    let (mut open, mut reset) = (Vec::new(), Vec::new());
    for &id in &ids {
        open.extend(frame_bytes(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, id, &get));
        reset.extend(frame_bytes(frame::RST_STREAM, 0, id, &Reason::CANCEL.0.to_be_bytes()));
    }
    (ids, open, reset)
}

/// Streams a client cancels once their answer has begun (gRPC clients closing watch streams
/// and server streams, all on one long connection) are its normal business, not a rapid-reset
/// flood: 300 of them, with none completed, leave the connection serving.
#[tokio::test]
async fn streams_cancelled_after_their_answer_began_do_not_count_as_resets() {
    let mut c = Client::connect(settings(), body_of(128 * 1024)).await;
    for round in 0..3u32 {
        let (ids, open, reset) = hundred_streams(round);
        c.send(&open).await;
        // Every head is out (HEADERS are not flow controlled; the bodies wait for windows).
        let mut heads = 0;
        while heads < ids.len() {
            let seen = c.barrier().await;
            assert!(seen.iter().all(|f| f.kind != frame::GOAWAY), "round {round}: {seen:?}");
            heads += seen.iter().filter(|f| f.kind == frame::HEADERS).count();
        }
        c.send(&reset).await;
    }
    let seen = c.barrier().await;
    assert!(seen.iter().all(|f| f.kind != frame::GOAWAY), "the connection was ended: {seen:?}");
    assert!(c.finish().await.is_ok());
}

/// Calls a client cancels before any answer once they have been open a while (deadlines
/// against a slow node; watches of a gRPC server that sends its head with its first message)
/// are not a rapid-reset flood either: 300 of them, none completed, leave the connection
/// serving.
#[tokio::test(start_paused = true)]
async fn calls_cancelled_after_a_while_without_an_answer_do_not_count_as_resets() {
    let mut c = Client::connect(settings(), never).await;
    for round in 0..3u32 {
        let (_, open, reset) = hundred_streams(round);
        c.send(&open).await;
        c.barrier().await;
        // The client's deadline (virtual time): the calls have been open longer than a flood
        // keeps them.
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send(&reset).await;
        let seen = c.barrier().await;
        assert!(seen.iter().all(|f| f.kind != frame::GOAWAY), "round {round}: {seen:?}");
    }
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_client_reset_drops_the_service_future_at_once() {
    let (mut called, mut dropped, service) = watched_never();
    let mut c = Client::connect(settings(), service).await;
    c.headers(1, &GET, true).await;
    c.barrier().await;
    assert!(called.try_recv().is_ok(), "the service was called");
    assert!(dropped.try_recv().is_err(), "the service future is alive while the stream is");

    c.rst(1, Reason::CANCEL).await;
    let seen = c.barrier().await;
    assert!(dropped.try_recv().is_ok(), "the service future was dropped when the RST_STREAM was read");
    assert!(seen.iter().all(|f| f.stream != 1), "nothing more on a reset stream: {seen:?}");
    assert!(c.finish().await.is_ok());
}

/// HTTP/2 has no half-close: a client that closes its connection cancels its requests in flight
/// (their service futures are dropped), as a reset would.
#[tokio::test]
async fn a_client_closing_its_connection_cancels_its_requests() {
    let (_called, mut dropped, service) = watched_never();
    let mut c = Client::connect(settings(), service).await;
    c.headers(1, &GET, true).await;
    c.headers(3, &GET, true).await;
    c.barrier().await;
    assert!(dropped.try_recv().is_err(), "the requests are in flight");
    let result = c.finish().await;
    assert!(result.is_ok(), "serve returned {result:?}");
    for stream in [1, 3] {
        let got = timeout(DEADLINE, dropped.recv()).await;
        assert_eq!(got, Ok(Some(())), "the request on stream {stream} was not cancelled");
    }
}

/// A Host header naming another authority than `:authority` (RFC 9113 §8.3.1: a client must not
/// send one) is dropped, so the request is routed and forwarded by one name, `:authority`'s; the
/// same name, in another case, stays. `:authority` with userinfo, and a `content-length` with a
/// sign, make a request malformed.
#[tokio::test]
async fn the_authority_wins_over_a_host_header_that_differs() {
    let service = |req: Request<ProxyBody>| {
        let mut resp = status(200);
        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        resp.headers_mut().insert("x-authority", HeaderValue::from_str(&authority).unwrap());
        if let Some(host) = req.headers().get("host") {
            resp.headers_mut().insert("x-host", host.clone());
        }
        ready(resp)
    };
    let mut c = Client::connect(settings(), service).await;
    c.headers(1, &with(&GET, &[("host", "internal.example")]), true).await;
    let a = c.answer(1).await;
    assert_eq!(a.header("x-authority"), Some("example.com"));
    assert_eq!(a.header("x-host"), None, "the differing Host header reached the service");
    c.headers(3, &with(&GET, &[("host", "Example.COM")]), true).await;
    assert_eq!(c.answer(3).await.header("x-host"), Some("Example.COM"));
    for (i, (name, value)) in
        [(":authority", "user@example.com"), ("content-length", "+0")].into_iter().enumerate()
    {
        let id = 5 + 2 * i as u32;
        let fields: Vec<(&str, &str)> = GET
            .iter()
            .map(|&(n, v)| if n == name { (n, value) } else { (n, v) })
            .chain((name == "content-length").then_some((name, value)))
            .collect();
        c.headers(id, &fields, true).await;
        assert_eq!(c.answer(id).await.reset, Some(Reason::PROTOCOL_ERROR), "{name}: {value}");
    }
}

/// DATA on a stream that ended normally (both sides) is the client's error (STREAM_CLOSED),
/// where DATA on a stream the gateway reset is ignored.
#[tokio::test]
async fn data_on_a_stream_that_ended_is_a_connection_error() {
    let mut c = Client::connect(settings(), hello).await;
    c.headers(1, &with(&GET, &[("connection", "x")]), false).await;
    assert_eq!(c.answer(1).await.reset, Some(Reason::PROTOCOL_ERROR));
    c.data(1, b"after the reset", true).await;
    assert!(c.sync().await, "DATA crossing the gateway's reset is ignored");
    c.headers(3, &GET, true).await;
    assert_eq!(c.answer(3).await.status(), Some(200));
    c.data(3, b"after the end", false).await;
    c.expect_conn_error(Reason::STREAM_CLOSED, "DATA after END_STREAM on a closed stream").await;
}

/// Padding counts against the stream's window like data, and is given back with it: an upload
/// in heavily padded frames gets WINDOW_UPDATEs for its stream, not only for the connection.
#[tokio::test]
async fn padding_is_given_back_to_the_stream_window() {
    let mut c = Client::connect(settings(), echo).await;
    c.headers(1, &POST, false).await;
    // 1 data octet and 255 of padding a frame: 257 octets of window each, 1 MiB in all.
    let frame = frame_bytes(frame::DATA, frame::PADDED, 1, &padded(b"x", 255));
    let frames = (1 << 20) / 257;
    let mut bytes = Vec::with_capacity(frames * frame.len());
    for _ in 0..frames {
        bytes.extend_from_slice(&frame);
    }
    c.send(&bytes).await;
    let seen = c.barrier().await;
    let credited: u32 = seen
        .iter()
        .filter(|f| f.is(frame::WINDOW_UPDATE, 1))
        .map(|f| u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]))
        .sum();
    assert!(credited >= 512 * 1024, "the stream's window came back: {credited} octets");
    c.data(1, b"", true).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200));
    assert_eq!(a.data, frames.to_string().as_bytes(), "every data octet reached the service");
}

/// Streams the gateway resets for its own reasons (a node's answer that breaks) do not count
/// against the client's reset allowance: the connection outlives hundreds of them.
#[tokio::test]
async fn broken_answers_do_not_cost_the_client_its_connection() {
    struct Broken;
    impl http_body::Body for Broken {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(Some(Err(std::io::Error::other("the node went away"))))
        }
    }
    let service = |req: Request<ProxyBody>| {
        if req.uri().path() == "/broken" {
            return ready(Response::new(ProxyBody::boxed(Broken)));
        }
        hello(req)
    };
    let mut c = Client::connect(settings(), service).await;
    let broken =
        [(":method", "GET"), (":scheme", "https"), (":authority", "example.com"), (":path", "/broken")];
    for i in 0..300u32 {
        let id = 1 + 2 * i;
        c.headers(id, &broken, true).await;
        assert_eq!(c.answer(id).await.reset, Some(Reason::INTERNAL_ERROR));
    }
    c.headers(601, &GET, true).await;
    assert_eq!(c.answer(601).await.status(), Some(200));
}

/// A PING that arrives while the gateway has so much to write that it stops reading is still
/// answered once the client has read the backlog, even when the backlog leaves in one write
/// (the connection must come back to reading on its own: no socket event is left to wake it).
#[tokio::test]
async fn a_ping_sent_behind_a_large_backlog_is_answered() {
    // Sixteen 60 KiB answers, released together: more than WRITE_HIGH waits after the first
    // write fills the 512 KiB pipe.
    let (release, service) = gated(Bytes::from(vec![b'x'; 60 * 1024]));
    let window = [(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0x7fff_ffff)];
    let mut c = Client::handshake(Client::start_in(512 * 1024, settings(), service), &window).await;
    c.window_update(0, 0x7fff_ffff - 65_535).await;
    for i in 0..16 {
        c.headers(1 + 2 * i, &GET, true).await;
    }
    c.barrier().await;
    release.notify_waiters();
    // The answers flow (the server wrote until the pipe was full), and the PING comes while the
    // rest waits in the gateway.
    assert!(c.frame().await.is(frame::HEADERS, 1), "the first answer's head");
    let ping = *b"backlog!";
    c.send_frame(frame::PING, 0, 0, &ping).await;
    let mut data = 0;
    loop {
        let f = c.frame().await;
        if f.kind == frame::DATA {
            data += f.payload.len();
        }
        if f.is_ping_ack(&ping) {
            break;
        }
    }
    assert!(data > 0, "the PING was answered behind the backlog");
}

/// A client that stops reading is cut off once a write has made no progress for the send
/// timeout (on plain TCP too, where a flush always succeeds at once).
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    let (mut io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let io = crate::SendTimeout::new(server_io, Duration::from_millis(300));
        super::serve(io, &settings(), body_of(4 << 20), std::future::pending()).await
    });
    let mut hello = frame::PREFACE.to_vec();
    hello.extend(frame_bytes(
        frame::SETTINGS,
        0,
        0,
        &settings_payload(&[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0x7fff_ffff)]),
    ));
    hello.extend(frame_bytes(frame::WINDOW_UPDATE, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    hello.extend(header_frames(1, &block(&GET), true));
    io.write_all(&hello).await.unwrap();
    // Nothing is read from here on.
    let result = timeout(DEADLINE, server).await.expect("the stalled connection was not cut off").unwrap();
    assert!(
        matches!(&result, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "serve returned {result:?}"
    );
    drop(io);
}

// ------------------------------------------------------------------ flow control of answers

#[tokio::test]
async fn an_answer_waits_for_the_clients_stream_window() {
    let mut c =
        Client::connect_with(settings(), &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 100)], body_of(1000)).await;
    c.headers(1, &GET, true).await;
    assert_eq!(c.data_on(1, 100).await, 100, "no more than the window");
    let seen = c.barrier().await;
    assert!(seen.iter().all(|f| !f.is(frame::DATA, 1)), "nothing past the window: {seen:?}");
    c.window_update(1, 900).await;
    let a = c.answer(1).await;
    assert_eq!(a.data.len(), 900, "the rest once the window opened: {a:?}");
    assert!(a.ended_by_data);
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn an_answer_waits_for_the_clients_connection_window() {
    let mut c =
        Client::connect_with(settings(), &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)], body_of(100_000))
            .await;
    c.headers(1, &GET, true).await;
    assert_eq!(c.data_on(1, 65_535).await, 65_535, "no more than the connection window");
    let seen = c.barrier().await;
    assert!(seen.iter().all(|f| !f.is(frame::DATA, 1)), "nothing past the window: {seen:?}");
    c.window_update(0, 100_000).await;
    let a = c.answer(1).await;
    assert_eq!(a.data.len(), 100_000 - 65_535, "the rest once the window opened");
    assert!(a.ended_by_data);
    assert!(c.finish().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_answer_whose_window_never_opens_is_cancelled_after_send_timeout() {
    let settings = Settings::new(Duration::from_secs(60), Duration::from_millis(200));
    let mut c =
        Client::connect_with(settings, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0)], body_of(1000)).await;
    let start = Instant::now();
    c.headers(1, &GET, true).await;
    let a = c.answer(1).await;
    let waited = start.elapsed();
    assert_eq!(a.status(), Some(200), "{a:?}");
    assert!(a.data.is_empty(), "nothing without a window: {a:?}");
    assert_eq!(a.reset, Some(Reason::CANCEL), "{a:?}");
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
        "reset after send_timeout, not {waited:?}"
    );
    assert!(c.finish().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_window_handed_out_a_byte_at_a_time_does_not_hold_an_answer_open() {
    let settings = Settings::new(Duration::from_secs(60), Duration::from_millis(200));
    let mut c =
        Client::connect_with(settings, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0)], body_of(100_000)).await;
    c.headers(1, &GET, true).await;
    // A byte of window every 50 ms, a quarter of `send_timeout`: each lets a byte out, none
    // is progress enough to start the stall clock again.
    let start = Instant::now();
    for _ in 0..20 {
        c.window_update(1, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = c.answer(1).await;
    assert_eq!(a.reset, Some(Reason::CANCEL), "{a:?}");
    assert!(a.data.len() < 20, "a few bytes went out before the reset: {}", a.data.len());
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(c.finish().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_window_that_opens_enough_keeps_a_slow_answer_going() {
    let settings = Settings::new(Duration::from_secs(60), Duration::from_millis(200));
    let mut c =
        Client::connect_with(settings, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0)], body_of(100_000)).await;
    c.headers(1, &GET, true).await;
    // 16 KiB every 150 ms: slower than the answer could go, but each opening is progress.
    let mut got = 0;
    while got < 100_000 {
        c.window_update(1, 16 * 1024).await;
        c.window_update(0, 16 * 1024).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        for f in c.barrier().await {
            assert!(!f.is(frame::RST_STREAM, 1), "reset while the client kept up: {f:?}");
            if f.is(frame::DATA, 1) {
                got += f.payload.len();
            }
        }
    }
    assert_eq!(got, 100_000);
    assert!(c.finish().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn streams_sharing_a_slow_connection_window_are_not_cut_while_it_moves() {
    let settings = Settings::new(Duration::from_secs(60), Duration::from_millis(200));
    let mut c =
        Client::connect_with(settings, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)], body_of(50_000))
            .await;
    for id in [1, 3, 5, 7] {
        c.headers(id, &GET, true).await;
    }
    // The connection window opens 16 KiB every 150 ms: one stream at a time gets it, the
    // others wait longer than `send_timeout`, but the connection as a whole moves.
    let mut got = std::collections::HashMap::<u32, usize>::new();
    while got.values().sum::<usize>() < 200_000 {
        c.window_update(0, 16 * 1024).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        for f in c.barrier().await {
            assert!(f.kind != frame::RST_STREAM, "a stream was cut while the connection moved: {f:?}");
            if f.kind == frame::DATA {
                *got.entry(f.stream).or_default() += f.payload.len();
            }
        }
    }
    assert!(got.values().all(|&n| n == 50_000), "{got:?}");
    assert!(c.finish().await.is_ok());
}

#[tokio::test]
async fn a_stream_past_the_announced_limit_is_refused_and_the_others_go_on() {
    let (gate, service) = gated(Bytes::from_static(b"done"));
    let mut c = Client::connect(settings(), service).await;
    let get = block(&GET);
    let mut bytes = Vec::new();
    for id in (1..=2049).step_by(2) {
        bytes.extend(frame_bytes(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, id, &get));
    }
    c.send(&bytes).await;
    // 1,024 streams are open: the 1,025th is refused (the client may retry it).
    let seen = c.barrier().await;
    let refused: Vec<&Frame> = seen.iter().filter(|f| f.is(frame::RST_STREAM, 2049)).collect();
    assert!(refused.len() == 1 && refused[0].code() == Reason::REFUSED_STREAM, "{seen:?}");
    assert!(
        seen.iter().all(|f| f.kind != frame::GOAWAY && (f.stream == 2049 || f.kind != frame::RST_STREAM))
    );
    // The open ones are answered once their answers come.
    gate.notify_waiters();
    gate.notify_one();
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200), "{a:?}");
}

#[tokio::test]
async fn a_flood_of_settings_costs_the_connection() {
    let mut c = Client::connect(settings(), hello).await;
    let mut bytes = Vec::new();
    for i in 0..70u32 {
        let window = if i % 2 == 0 { 1 << 20 } else { 1 << 16 };
        bytes.extend(frame_bytes(
            frame::SETTINGS,
            0,
            0,
            &settings_payload(&[(frame::SETTINGS_INITIAL_WINDOW_SIZE, window)]),
        ));
    }
    c.send(&bytes).await;
    c.expect_conn_error(Reason::ENHANCE_YOUR_CALM, "70 SETTINGS frames with no stream served").await;
}

#[tokio::test]
async fn heads_too_large_count_as_resets() {
    let mut c = Client::connect(settings(), hello).await;
    // Just over 64 KiB decoded each, in a few hundred octets: a literal added to the dynamic
    // table once, then referred to by index.
    let value = "v".repeat(4000);
    let mut first = GET.to_vec();
    first.push(("x-big", value.as_str()));
    c.send(&header_frames(1, &block(&first), true)).await;
    c.answer(1).await;
    let mut bytes = Vec::new();
    let mut fields = GET.to_vec();
    fields.extend(std::iter::repeat_n(("x-big", value.as_str()), 17));
    let big = block(&fields);
    for id in (3..600).step_by(2) {
        bytes.extend(header_frames(id, &big, true));
    }
    c.send(&bytes).await;
    c.expect_conn_error(Reason::ENHANCE_YOUR_CALM, "299 heads over the limit").await;
}

// ------------------------------------------------------------------ closing

#[tokio::test]
async fn shutdown_sends_goaway_and_finishes_the_streams_in_flight() {
    let (gate, service) = gated(Bytes::from_static(b"late but whole"));
    let mut c = Client::connect(settings(), service).await;
    c.headers(1, &GET, true).await;
    c.barrier().await;

    c.shutdown.take().unwrap().send(()).unwrap();
    assert_eq!(c.goaway().await, (1, Reason::NO_ERROR), "GOAWAY naming the last stream taken");
    // A stream opened past the GOAWAY is not taken.
    c.headers(3, &GET, true).await;
    let seen = c.barrier().await;
    assert!(seen.iter().all(|f| f.stream != 3), "{seen:?}");

    gate.notify_one();
    let a = c.answer(1).await;
    assert_eq!(a.status(), Some(200), "{a:?}");
    assert_eq!(a.data, b"late but whole");
    assert!(c.try_frame().await.is_none(), "the server closes once its streams are done");
    let result = c.finish().await;
    assert!(result.is_ok(), "serve returned {result:?}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_gets_goaway_and_closes() {
    let mut c = Client::connect(Settings::new(Duration::from_secs(2), Duration::from_secs(10)), hello).await;
    c.headers(1, &GET, true).await;
    assert_eq!(c.answer(1).await.status(), Some(200));
    let idle = Instant::now();
    assert_eq!(c.goaway().await, (1, Reason::NO_ERROR));
    assert!(idle.elapsed() >= Duration::from_secs(2), "GOAWAY after {:?} idle", idle.elapsed());
    assert!(c.try_frame().await.is_none(), "then the close");
    let result = c.finish().await;
    assert!(result.is_ok(), "serve returned {result:?}");
}

/// A client that has gone silent (it neither reads nor sends, as after a network failure) with a
/// stream open is dropped after a quiet keepalive interval, its PING and a quiet keepalive
/// timeout: the PING the gateway wrote itself does not count as a sign of life. One that answers
/// stays.
#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_after_an_unanswered_ping() {
    let mut c = Client::connect(settings(), never).await;
    c.headers(1, &GET, true).await;
    assert!(c.sync().await);
    let start = Instant::now();
    let result =
        timeout(Duration::from_secs(600), &mut c.server).await.expect("the silent client is still served");
    let after = start.elapsed();
    assert!(result.unwrap().is_ok());
    // 60 s that heard the client, 60 s that did not, then the PING and 20 s without an answer.
    assert!(after >= Duration::from_secs(80) && after <= Duration::from_secs(150), "dropped after {after:?}");

    let mut c = Client::connect(settings(), never).await;
    c.headers(1, &GET, true).await;
    // Time is paused: waiting for the server's PINGs costs nothing.
    c.patience = Duration::from_secs(300);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(400) {
        let f = c.frame().await;
        if f.is(frame::PING, 0) && !f.has(frame::ACK) {
            c.send_frame(frame::PING, frame::ACK, 0, &f.payload).await;
        }
    }
    assert!(!c.server.is_finished(), "a client that answers its PINGs was dropped");
}

// ------------------------------------------------------------------ random frames

/// Request heads for the random connections: valid ones of several kinds, and malformed ones.
const HEADS: &[&[(&str, &str)]] = &[
    &GET,
    &GET,
    &POST,
    &POST,
    &[(":method", "GET"), (":scheme", "https"), (":path", "/"), ("x-len", "0"), ("te", "trailers")],
    &[(":method", "GET"), (":scheme", "https"), (":path", "/big"), ("x-len", "70000")],
    &[(":method", "GET"), (":scheme", "http"), (":path", "/t"), ("x-len", "1000"), ("x-trailers", "1")],
    &[(":method", "POST"), (":scheme", "https"), (":path", "/"), ("content-length", "10")],
    &[(":method", "HEAD"), (":scheme", "https"), (":path", "/"), ("x-len", "10")],
    &[(":method", "CONNECT"), (":authority", "example.com:443")],
    &[(":method", "GET"), (":path", "/")],
    &[(":method", "GET"), (":scheme", "https"), (":path", "/"), ("Upper", "x")],
    &[(":method", "GET"), (":scheme", "https"), (":path", "/"), ("te", "gzip")],
    &[(":status", "200")],
];

/// The service of the random connections: reads the whole body, then answers with `x-len`
/// octets (5 by default), followed by trailers if the request has `x-trailers`.
fn random_service(req: Request<ProxyBody>) -> Answering {
    Box::pin(async move {
        let len = req.headers().get("x-len").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(5);
        let trailers = req.headers().contains_key("x-trailers");
        if req.into_body().collect().await.is_err() {
            return status(400);
        }
        let body = Full::new(Bytes::from(vec![b'x'; len]));
        if !trailers {
            return Response::new(ProxyBody::boxed(body));
        }
        let mut t = HeaderMap::new();
        t.insert("x-done", HeaderValue::from_static("1"));
        Response::new(ProxyBody::boxed(body.with_trailers(ready(Some(Ok(t))))))
    })
}

/// One of the streams the client opened.
fn pick(rng: &mut Rng, opened: &[u32]) -> u32 {
    opened[rng.below(opened.len() as u64) as usize]
}

/// A setting with a value the protocol allows.
fn valid_setting(rng: &mut Rng) -> (u16, u32) {
    let (id, values): (u16, &[u32]) = match rng.below(7) {
        0 => (frame::SETTINGS_HEADER_TABLE_SIZE, &[0, 100, 4096, 65_536]),
        1 => (frame::SETTINGS_ENABLE_PUSH, &[0, 1]),
        2 => (frame::SETTINGS_MAX_CONCURRENT_STREAMS, &[0, 1, 100]),
        3 => (frame::SETTINGS_INITIAL_WINDOW_SIZE, &[0, 1, 100, 65_535, 1 << 20, 0x7fff_ffff]),
        4 => (frame::SETTINGS_MAX_FRAME_SIZE, &[16_384, 32_768, (1 << 24) - 1]),
        5 => (frame::SETTINGS_MAX_HEADER_LIST_SIZE, &[0, 100, 1 << 20]),
        _ => (0x99, &[0, 1, u32::MAX]),
    };
    (id, values[rng.below(values.len() as u64) as usize])
}

/// What a client might send, frame by frame (a HEADERS frame and its CONTINUATION count as
/// one): mostly well-formed frames on the streams it opened, so that connections live long
/// enough to reach deep states; one in 64 mangled, three in 64 wholly random (type 0-10, any
/// flags, a small stream id, a short payload).
fn random_frames(rng: &mut Rng) -> Vec<Vec<u8>> {
    use frame::{CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, PADDED};
    let mut units = Vec::new();
    let mut next_id = 1;
    let mut opened = Vec::new();
    for _ in 0..1 + rng.below(48) {
        let mut unit = Vec::new();
        let action = if opened.is_empty() { 0 } else { rng.below(64) };
        let (kind, mut flags, mut stream, mut payload) = match action {
            0..=13 => {
                let id = next_id;
                next_id += 2;
                opened.push(id);
                let block = block(HEADS[rng.below(HEADS.len() as u64) as usize]);
                let mut flags = if rng.below(2) == 0 { END_STREAM } else { 0 };
                if rng.below(4) == 0 {
                    // Over HEADERS and CONTINUATION.
                    let at = rng.below(block.len() as u64 + 1) as usize;
                    unit = frame_bytes(HEADERS, flags, id, &block[..at]);
                    (CONTINUATION, END_HEADERS, id, block[at..].to_vec())
                } else {
                    flags |= END_HEADERS;
                    let mut payload = block;
                    if rng.below(4) == 0 {
                        flags |= frame::PRIORITY_FLAG;
                        payload = [&[0, 0, 0, 0, 16][..], &payload].concat();
                    }
                    if rng.below(4) == 0 {
                        flags |= PADDED;
                        payload = padded(&payload, rng.below(8) as u8);
                    }
                    (HEADERS, flags, id, payload)
                }
            }
            14..=29 => {
                let len = [0, 1, 10, 100, 1000, frame::DEFAULT_MAX_FRAME][rng.below(6) as usize];
                let mut flags = if rng.below(3) == 0 { END_STREAM } else { 0 };
                let mut payload = vec![0; len];
                if rng.below(4) == 0 && len < frame::DEFAULT_MAX_FRAME {
                    flags |= PADDED;
                    payload = padded(&payload, rng.below(8) as u8);
                }
                (DATA, flags, pick(rng, &opened), payload)
            }
            30..=33 => (HEADERS, END_HEADERS | END_STREAM, pick(rng, &opened), block(&[("x-t", "1")])),
            34..=37 => {
                (frame::RST_STREAM, 0, pick(rng, &opened), (rng.below(14) as u32).to_be_bytes().to_vec())
            }
            38..=47 => {
                let stream = if rng.below(2) == 0 { 0 } else { pick(rng, &opened) };
                let n: u32 = [1, 1000, 65_535, 1 << 20][rng.below(4) as usize];
                (frame::WINDOW_UPDATE, 0, stream, n.to_be_bytes().to_vec())
            }
            48 => (frame::SETTINGS, frame::ACK, 0, Vec::new()),
            49..=52 => {
                let settings: Vec<(u16, u32)> = (0..rng.below(4)).map(|_| valid_setting(rng)).collect();
                (frame::SETTINGS, 0, 0, settings_payload(&settings))
            }
            53..=56 => (frame::PING, if rng.below(4) == 0 { frame::ACK } else { 0 }, 0, rng.bytes(8)),
            57..=58 => (frame::PRIORITY, 0, pick(rng, &opened), rng.bytes(5)),
            59 => {
                let n = rng.below(24) as usize;
                (11 + rng.below(245) as u8, rng.next_u64() as u8, pick(rng, &opened), rng.bytes(n))
            }
            60 => (frame::GOAWAY, 0, 0, [0, 0, 0, 0, 0, 0, 0, rng.below(14) as u8].to_vec()),
            _ => {
                let n = rng.below(24) as usize;
                (rng.below(11) as u8, rng.next_u64() as u8, rng.below(6) as u32, rng.bytes(n))
            }
        };
        if rng.below(64) == 0 {
            match rng.below(3) {
                0 => flags = rng.next_u64() as u8,
                1 => stream = rng.below(6) as u32,
                _ => {
                    let n = rng.below(24) as usize;
                    payload = rng.bytes(n);
                }
            }
        }
        unit.extend(frame_bytes(kind, flags, stream, &payload));
        units.push(unit);
    }
    units
}

/// One connection fed random frames after a valid preface, some at a time, letting the server
/// catch up now and then: it must end (either way) once the client closes, without a panic.
async fn random_connection(seed: u64) {
    let mut rng = Rng::new(seed);
    let settings = Settings::new(Duration::from_secs(10), Duration::from_secs(1));
    let mut c = Client::connect(settings, random_service).await;
    let units = random_frames(&mut rng);
    let mut at = 0;
    while at < units.len() {
        let n = (1 + rng.below(6) as usize).min(units.len() - at);
        let mut bytes = units[at..at + n].concat();
        at += n;
        // Sometimes the last frame is cut short (and then a PING would not be one).
        let cut_short = at == units.len() && rng.below(8) == 0;
        if cut_short {
            let cut = 1 + rng.below(5) as usize;
            bytes.truncate(bytes.len() - cut);
        }
        if timeout(DEADLINE, c.io.write_all(&bytes)).await.map_or(true, |r| r.is_err()) {
            break;
        }
        if !cut_short && rng.below(2) == 0 && !c.sync().await {
            break;
        }
    }
    let _ = c.finish().await;
}

#[tokio::test(start_paused = true)]
async fn random_frames_never_panic_or_hang_a_connection() {
    for seed in 0..500 {
        match timeout(Duration::from_secs(60), tokio::spawn(random_connection(seed))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("seed {seed}: {e}"),
            Err(_) => panic!("seed {seed}: the connection never ended"),
        }
    }
}

/// A body whose parts come from a channel; it ends when the sender is dropped.
struct Trickle(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|part| part.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// Reads frames from the server until one ends stream 1.
async fn read_until_end_of_stream_1(client: &mut DuplexStream) {
    let mut buf = Vec::new();
    let mut at = 0;
    loop {
        while buf.len() >= at + frame::HEAD_LEN {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf.len() < at + frame::HEAD_LEN + len {
                break;
            }
            let flags = buf[at + 4];
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]);
            if stream == 1 && flags & frame::END_STREAM != 0 {
                return;
            }
            at += frame::HEAD_LEN + len;
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await.expect("reading the answer");
        assert!(n > 0, "the connection closed before the answer ended");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An idle connection holds no read buffer (16 KiB) once its last stream is answered, also when
/// the answer's body ended after the connection's last read (as a node's body does), with no
/// byte from the client since: the buffer would otherwise stay for as long as the client is
/// silent.
#[tokio::test]
async fn an_idle_connection_holds_no_read_buffer_after_its_streams() {
    let (mut client, server_io) = tokio::io::duplex(1 << 16);
    let cfg = settings();
    let (parts, body) = mpsc::unbounded_channel::<Bytes>();
    let mut body = Some(body);
    let service = move |_req: Request<ProxyBody>| -> Ready<Response<ProxyBody>> {
        let body = body.take().expect("one request");
        ready(Response::new(ProxyBody::boxed(Trickle(body))))
    };
    let mut conn = super::conn::Conn::new(server_io, &cfg, service);
    let mut stop = std::pin::pin!(std::future::pending::<()>());
    let mut hello = frame::PREFACE.to_vec();
    hello.extend(frame_bytes(frame::SETTINGS, 0, 0, &[]));
    hello.extend(frame_bytes(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1, &block(&GET)));
    client.write_all(&hello).await.unwrap();
    parts.send(Bytes::from_static(b"first part")).unwrap();
    // The server reads all of it, answers the head and the first part, and waits for the rest.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(conn.poll(cx, stop.as_mut()))).await;
    assert!(first.is_pending(), "the connection ended");
    assert!(conn.read_buffer_capacity() > 0, "read without a buffer");
    // The body ends: the server sends its end while polled, and the client reads up to it.
    drop(parts);
    let served = std::future::poll_fn(|cx| conn.poll(cx, stop.as_mut()));
    tokio::select! {
        r = served => panic!("the connection ended: {:?}", r.err()),
        r = timeout(DEADLINE, read_until_end_of_stream_1(&mut client)) => r.expect("no end of the answer in time"),
    }
    assert_eq!(conn.read_buffer_capacity(), 0, "an idle connection kept its read buffer");
}
