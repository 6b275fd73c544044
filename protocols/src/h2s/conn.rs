//! One HTTP/2 client connection: frames in, requests to the service, answers out.
//!
//! The connection is a hand-written state machine polled by one task. Per poll it reads what
//! the socket has and handles every whole frame in it, then polls the streams that were woken
//! (their service futures, then their answer bodies), writing their frames into one buffer, and
//! writes that buffer with one call: the answers of every stream that became ready together
//! leave in one write.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, DATE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::frame::{self, Head, Reason};
use super::hpack::{Decoder, Encoder, Name, Pseudo};
use super::recv::{ConnShared, H2Body, RecvShared, SlotWaker};
use super::{CONN_WINDOW, Error, MAX_CONCURRENT, STREAM_WINDOW, Settings};
use crate::body::ProxyBody;
use crate::fxhash::FxHashMap;

/// Stop reading from the client and pause answers while this much is waiting to be written.
const WRITE_HIGH: usize = 256 * 1024;
/// Largest header block (all its HEADERS and CONTINUATION payloads) the gateway takes: past it
/// the connection ends (ENHANCE_YOUR_CALM), since the block cannot be skipped without breaking
/// the HPACK state.
const BLOCK_MAX: usize = 256 * 1024;
/// Reads per poll before the task yields to others.
const READS_PER_POLL: usize = 16;
/// Streams the client may reset (or get refused or reset for errors) before the connection ends
/// with ENHANCE_YOUR_CALM, unless as many streams completed normally (a rapid-reset flood,
/// CVE-2023-44487, costs its sender the connection).
const RESET_ALLOWANCE: u32 = 128;
/// A client's reset counts toward [`RESET_ALLOWANCE`] only for a stream younger than this: a
/// flood resets what it opens at once, while a call cancelled later (a deadline, a watch a
/// client is done with) is ordinary; a client that waits this long per stream is bounded by
/// `MAX_CONCURRENT` as any other.
const RAPID_RESET_AGE: Duration = Duration::from_millis(100);
/// What a stream waiting for the client's window must get through (or finish) to start its
/// `send_timeout` again, and what the client must grant the connection for every stream
/// waiting for the connection window to start again: a window handed out a byte at a time does
/// not hold an answer (and its node connection) open for ever.
const STALL_PROGRESS: usize = 16 * 1024;
/// SETTINGS frames a connection may send, beyond one for every 16 streams it completed: each
/// one that changes the initial window touches every open stream, so a flood of them would
/// cost the gateway a thousand times what it costs the client. Clients send one or two, and
/// gRPC's window tuning about ten over a connection's life.
const SETTINGS_ALLOWANCE: u32 = 64;

/// A connection error: GOAWAY with this reason, then the close.
#[derive(Debug)]
pub(crate) struct ConnError(pub Reason, pub &'static str);

enum Phase<Fut> {
    /// The service is working on the answer.
    Service(Fut),
    /// The head is sent; the body follows as the client's windows allow. `held` is a DATA
    /// payload taken from the body and not yet sent, `last` whether it ends the body.
    Body { body: ProxyBody, held: Option<Bytes>, last: bool },
    /// The answer is complete (or the stream was reset).
    Done,
}

struct Slot<Fut> {
    /// The stream's id; 0 while the slot is free.
    id: u32,
    phase: Phase<Fut>,
    flag: Arc<SlotWaker>,
    /// The client's window for this stream.
    send_window: i64,
    /// What the client may still send on this stream.
    recv_window: i64,
    /// The request body's queue, while the client may send more.
    recv: Option<Arc<RecvShared>>,
    /// `content-length` left of the request body, to check the client's framing against.
    expect: Option<u64>,
    remote_done: bool,
    /// A HEAD request: the answer has no body.
    head_only: bool,
    /// Waiting for the client's window since (the wait ends when `STALL_PROGRESS` bytes went
    /// out, or the answer did).
    stalled: Option<Instant>,
    /// When the client opened the stream (for [`RAPID_RESET_AGE`]).
    opened: Instant,
    /// Bytes sent since the wait began.
    stall_sent: usize,
    /// Waiting for the connection window.
    conn_blocked: bool,
    /// Listed in `Out::conn_blocked` (an entry may outlive the wait; it is checked against
    /// `conn_blocked` when the list is taken).
    in_conn_list: bool,
    /// Listed in `Out::write_blocked`.
    in_write_list: bool,
}

/// A header block being assembled from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    /// The HEADERS frame made the stream depend on itself (a stream error, RFC 9113 §5.3.1).
    self_dependent: bool,
    buf: Vec<u8>,
}

/// What an answer's frames are written with: split from the streams so both can be borrowed.
struct Out {
    wbuf: Vec<u8>,
    wpos: usize,
    encoder: Encoder,
    peer_max_frame: usize,
    /// The client's connection window.
    send_window: i64,
    /// Slots waiting for the connection window.
    conn_blocked: Vec<u32>,
    /// Connection window the client granted since the waits for it last started again: once
    /// it reaches `STALL_PROGRESS`, every stream waiting for the connection window starts its
    /// wait again (whichever of them the window then goes to, the connection moves).
    conn_granted: i64,
    /// Slots paused because too much waits to be written.
    write_blocked: Vec<u32>,
    /// A slot newly waiting for a window.
    stall_started: bool,
}

impl Out {
    fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Writes a header block as HEADERS (and CONTINUATION frames if it is larger than the
    /// client's frame size).
    fn headers(&mut self, stream: u32, end_stream: bool, encode: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; frame::HEAD_LEN]);
        encode(&mut self.encoder, &mut self.wbuf);
        let len = self.wbuf.len() - start - frame::HEAD_LEN;
        let flags = if end_stream { frame::END_STREAM } else { 0 };
        if len <= self.peer_max_frame {
            let head = frame::head_bytes(len, frame::HEADERS, flags | frame::END_HEADERS, stream);
            self.wbuf[start..start + frame::HEAD_LEN].copy_from_slice(&head);
            return;
        }
        // Rare: split the block.
        let block = self.wbuf.split_off(start + frame::HEAD_LEN);
        self.wbuf.truncate(start);
        let mut chunks = block.chunks(self.peer_max_frame).peekable();
        let mut kind = frame::HEADERS;
        let mut first_flags = flags;
        while let Some(c) = chunks.next() {
            let end_headers = if chunks.peek().is_none() { frame::END_HEADERS } else { 0 };
            frame::put_head(&mut self.wbuf, c.len(), kind, first_flags | end_headers, stream);
            self.wbuf.extend_from_slice(c);
            kind = frame::CONTINUATION;
            first_flags = 0;
        }
    }
}

/// The connection.
pub(crate) struct Conn<'a, IO, F, Fut> {
    io: IO,
    service: F,
    cfg: &'a Settings,
    shared: Arc<ConnShared>,

    rbuf: BytesMut,
    preface_left: usize,
    got_settings: bool,
    block: Option<Block>,
    decoder: Decoder,
    /// What the client may still send on the connection.
    recv_window: i64,
    read_closed: bool,

    out: Out,

    slots: Vec<Slot<Fut>>,
    /// Each slot's waker (apart from the slots, so a slot can be changed while its waker is
    /// lent to a poll).
    wakers: Vec<Waker>,
    free: Vec<u32>,
    ids: FxHashMap<u32, u32>,
    /// Slots to poll, queued by the connection itself.
    local_ready: Vec<u32>,
    scratch: Vec<u32>,
    last_id: u32,
    /// Streams the gateway reset lately: frames the client sent on them before it saw the reset
    /// are ignored (RFC 9113 §5.1), where frames on other closed streams are errors.
    reset_ids: std::collections::VecDeque<u32>,
    /// The same ids, to look up.
    reset_set: FxHashMap<u32, ()>,
    open: usize,
    peer_initial_window: i64,
    resets: u32,
    completed: u32,
    /// SETTINGS frames received (not counting ACKs).
    settings: u32,

    /// GOAWAY sent: no new streams; close once the open ones are done.
    goaway: bool,
    /// The last stream id the first GOAWAY announced; later ones repeat it.
    goaway_id: Option<u32>,
    /// The client sent GOAWAY: close once the open streams are done.
    peer_goaway: bool,
    /// The connection failed (GOAWAY with an error code sent): close at once.
    failed: Option<ConnError>,
    /// Write side shut down; reading what the client still sends until it closes.
    lingering: bool,

    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    /// The timer was moved since it was last polled (its waker must be registered again).
    timer_moved: bool,
    /// When to look at the client's liveness next: send a PING if nothing moved since the last
    /// look, or end the connection if the outstanding PING got no answer and nothing moved.
    ping_at: Instant,
    awaiting_pong: bool,
    /// Bytes came from the client since the last look: it is alive.
    heard: bool,
    /// Octets handed to the socket so far.
    written: u64,
    /// Where the outstanding PING ends in what is written: octets written past it were taken by
    /// the socket after it, which a peer that has gone does not let happen for long.
    ping_mark: u64,
    /// PINGs sent, for their payloads.
    pings: u64,
    /// A read was skipped because too much waited to be written: read again once it drains.
    read_skipped: bool,
    idle_since: Instant,
    idle_check: Instant,
    stall_check: Option<Instant>,
    linger_until: Option<Instant>,
}

impl<'a, IO, F, Fut> Conn<'a, IO, F, Fut>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ProxyBody>) -> Fut,
    Fut: Future<Output = Response<ProxyBody>> + Unpin,
{
    pub(crate) fn new(io: IO, cfg: &'a Settings, service: F) -> Self {
        let now = Instant::now();
        let ping_at = now + cfg.keepalive_interval;
        let idle_check = now + cfg.idle_timeout;
        let first = ping_at.min(idle_check);
        let mut out = Out {
            wbuf: Vec::new(),
            wpos: 0,
            encoder: Encoder::new(),
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            send_window: frame::DEFAULT_WINDOW,
            conn_blocked: Vec::new(),
            write_blocked: Vec::new(),
            stall_started: false,
            conn_granted: 0,
        };
        // The server preface: SETTINGS, and the larger connection window.
        let w = &mut out.wbuf;
        frame::put_head(w, 18, frame::SETTINGS, 0, 0);
        frame::put_setting(w, frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT as u32);
        frame::put_setting(w, frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32);
        frame::put_setting(w, frame::SETTINGS_MAX_HEADER_LIST_SIZE, cfg.max_header_list as u32);
        frame::put_window_update(w, 0, (CONN_WINDOW - frame::DEFAULT_WINDOW) as u32);
        Conn {
            io,
            service,
            cfg,
            shared: ConnShared::new(),
            rbuf: BytesMut::new(),
            preface_left: frame::PREFACE.len(),
            got_settings: false,
            block: None,
            decoder: Decoder::new(),
            recv_window: CONN_WINDOW,
            read_closed: false,
            out,
            slots: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            ids: FxHashMap::default(),
            local_ready: Vec::new(),
            scratch: Vec::new(),
            last_id: 0,
            reset_ids: std::collections::VecDeque::new(),
            reset_set: FxHashMap::default(),
            open: 0,
            peer_initial_window: frame::DEFAULT_WINDOW,
            resets: 0,
            completed: 0,
            settings: 0,
            goaway: false,
            goaway_id: None,
            peer_goaway: false,
            failed: None,
            lingering: false,
            timer: Box::pin(tokio::time::sleep_until(first)),
            timer_at: first,
            timer_moved: false,
            ping_at,
            awaiting_pong: false,
            heard: false,
            written: 0,
            ping_mark: 0,
            pings: 0,
            read_skipped: false,
            idle_since: now,
            idle_check,
            stall_check: None,
            linger_until: None,
        }
    }

    /// Drives the connection; `shutdown` completing starts a graceful close.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Result<(), Error>> {
        // Wake-ups from this poll's own work are seen by the loop below, not by a second poll.
        drop(self.shared.waker.take());
        let mut rounds = 0;
        loop {
            if !self.goaway && shutdown.as_mut().poll(cx).is_ready() {
                self.go_away(Reason::NO_ERROR);
            }
            if let Poll::Ready(r) = self.poll_timer(cx) {
                return Poll::Ready(r);
            }
            let more = match self.poll_read(cx) {
                Ok(more) => more,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if let Err(e) = self.run_ready() {
                self.fail(e);
            }
            if self.out.stall_started {
                self.arm_stall(cx);
            }
            self.credit_connection();
            match self.poll_write(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
            if let Poll::Ready(r) = self.poll_close(cx) {
                return Poll::Ready(r);
            }
            if std::mem::take(&mut self.timer_moved) && self.timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            self.shared.waker.register(cx.waker());
            let again = more
                || !self.local_ready.is_empty()
                || self.shared.has_ready()
                || self.read_skipped && self.out.pending() < WRITE_HIGH && !self.read_closed
                || self.shared.released.load(Ordering::Relaxed) as i64 >= CONN_WINDOW / 2;
            if !again {
                if self.open == 0 && self.rbuf.is_empty() {
                    // Idle: hold no read buffer while waiting. Here, after the streams' work,
                    // not when the read found nothing: a stream that ends after the last read
                    // (its answer's body done) leaves the connection idle too.
                    crate::spare::give_h2_read(std::mem::take(&mut self.rbuf));
                }
                return Poll::Pending;
            }
            rounds += 1;
            if rounds >= 32 {
                // Let other connections run; come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// The read buffer's room, for tests of what an idle connection holds.
    #[cfg(test)]
    pub(crate) fn read_buffer_capacity(&self) -> usize {
        self.rbuf.capacity()
    }

    // ------------------------------------------------------------------ timers

    /// A stream started waiting for the client's window: make sure the timer looks at it within
    /// `send_timeout`.
    fn arm_stall(&mut self, cx: &mut Context<'_>) {
        self.out.stall_started = false;
        if self.stall_check.is_some() {
            return;
        }
        let at = Instant::now() + self.cfg.send_timeout;
        self.stall_check = Some(at);
        if at < self.timer_at {
            self.arm(at);
            if self.timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let now = Instant::now();
        if let Some(until) = self.linger_until
            && until <= now
        {
            // The lingering read, or a close that could not be written, ran out of time.
            return Poll::Ready(self.result());
        }
        if self.ping_at <= now {
            // A PING goes only after an interval in which the client sent nothing. While it is
            // out, anything from the client, or the socket taking what was queued after the
            // PING (a download the client still reads, with the answer queued behind it), says
            // the client is there; neither for `keepalive_timeout` ends the connection.
            let heard = std::mem::take(&mut self.heard);
            let alive = heard || self.awaiting_pong && self.written > self.ping_mark;
            if self.awaiting_pong && !alive {
                tracing::debug!("HTTP/2 client did not answer a PING; closing");
                return Poll::Ready(self.result());
            }
            if alive || self.lingering || self.failed.is_some() {
                self.awaiting_pong = false;
                self.ping_at = now + self.cfg.keepalive_interval;
            } else {
                self.pings += 1;
                frame::put_ping(&mut self.out.wbuf, false, self.pings.to_be_bytes());
                self.ping_mark = self.written + self.out.pending() as u64;
                self.awaiting_pong = true;
                self.ping_at = now + self.cfg.keepalive_timeout;
            }
        }
        if self.idle_check <= now {
            let deadline = self.idle_since + self.cfg.idle_timeout;
            if self.open == 0 && deadline <= now && !self.goaway {
                tracing::debug!("HTTP/2 connection idle; closing");
                self.go_away(Reason::NO_ERROR);
            }
            // While streams are open the check comes back no sooner than a second from now, so
            // a `keepalive_timeout` of 0 does not spin.
            let busy = now + self.cfg.idle_timeout.max(Duration::from_secs(1));
            self.idle_check = if self.open == 0 && deadline > now { deadline } else { busy };
        }
        if let Some(at) = self.stall_check
            && at <= now
        {
            self.stall_check = None;
            self.reset_stalled(now);
        }
        let mut next = self.ping_at.min(self.idle_check);
        if let Some(at) = self.stall_check {
            next = next.min(at);
        }
        if let Some(at) = self.linger_until {
            next = next.min(at);
        }
        self.arm(next);
        // Poll once so the new deadline is registered with this task.
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => cx.waker().wake_by_ref(),
            Poll::Pending => {}
        }
        Poll::Pending
    }

    fn arm(&mut self, at: Instant) {
        self.timer_at = at;
        self.timer.as_mut().reset(at);
        self.timer_moved = true;
    }

    /// Resets the streams that waited for the client's window for `send_timeout`.
    fn reset_stalled(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        for idx in 0..self.slots.len() {
            let Some(since) = self.slots[idx].stalled else { continue };
            let deadline = since + self.cfg.send_timeout;
            if deadline <= now {
                tracing::debug!(
                    "no flow-control window from the client for send_timeout; resetting the stream"
                );
                self.reset_stream(idx as u32, Reason::CANCEL);
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        self.stall_check = next;
    }

    // ------------------------------------------------------------------ reading

    /// Reads and handles frames until the socket has no more; true if it stopped with more to
    /// read.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, Error> {
        self.read_skipped = false;
        for _ in 0..READS_PER_POLL {
            if self.read_closed || self.failed.is_some() && !self.lingering {
                return Ok(false);
            }
            if self.out.pending() >= WRITE_HIGH {
                // Back-pressure: the socket's readiness is not polled, so the loop must come
                // back here itself once the buffer drains.
                self.read_skipped = true;
                return Ok(false);
            }
            if self.rbuf.capacity() == 0 {
                // From the worker's spares: a connection that serves one stream at a time takes
                // and gives back its buffer with each of them.
                self.rbuf = crate::spare::h2_read_buf();
            } else if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 * 1024 + frame::HEAD_LEN);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                // The buffer is given back, if the connection is idle, once `poll` is done.
                Poll::Pending => return Ok(false),
                Poll::Ready(Ok(0)) => {
                    self.read_closed = true;
                    self.client_gone();
                    return Ok(false);
                }
                Poll::Ready(Ok(_)) => {
                    self.heard = true;
                    if self.lingering {
                        self.rbuf.clear();
                        continue;
                    }
                    if let Err(e) = self.handle_frames() {
                        self.fail(e);
                        return Ok(false);
                    }
                }
                Poll::Ready(Err(e)) => return Err(Error::Io(e)),
            }
        }
        Ok(true)
    }

    /// The client closed the connection (HTTP/2 has no half-close): every stream is cancelled,
    /// and with it its node exchange, as when the client resets it.
    fn client_gone(&mut self) {
        for idx in 0..self.slots.len() as u32 {
            self.close_slot(idx, Some(Reason::CANCEL));
        }
    }

    fn handle_frames(&mut self) -> Result<(), ConnError> {
        if self.preface_left > 0 {
            let have = self.rbuf.len().min(self.preface_left);
            let at = frame::PREFACE.len() - self.preface_left;
            if self.rbuf[..have] != frame::PREFACE[at..at + have] {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "invalid connection preface"));
            }
            self.rbuf.advance(have);
            self.preface_left -= have;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        let buf = std::mem::take(&mut self.rbuf);
        let mut pos = 0;
        let result = loop {
            let rest = &buf[pos..];
            if rest.len() < frame::HEAD_LEN {
                break Ok(());
            }
            let head = Head::parse(rest);
            if head.len > frame::DEFAULT_MAX_FRAME {
                break Err(ConnError(Reason::FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE"));
            }
            if rest.len() < frame::HEAD_LEN + head.len {
                break Ok(());
            }
            let payload = &rest[frame::HEAD_LEN..frame::HEAD_LEN + head.len];
            pos += frame::HEAD_LEN + head.len;
            if let Err(e) = self.frame(head, payload) {
                break Err(e);
            }
            if self.failed.is_some() {
                break Ok(());
            }
        };
        self.rbuf = buf;
        self.rbuf.advance(pos);
        result
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if !self.got_settings {
            if head.kind != frame::SETTINGS || head.flags & frame::ACK != 0 {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "the preface is not followed by SETTINGS"));
            }
            self.got_settings = true;
        }
        if let Some(b) = &self.block
            && (head.kind != frame::CONTINUATION || head.stream != b.stream)
        {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "header block interrupted"));
        }
        if head.stream.is_multiple_of(2)
            && head.stream != 0
            && matches!(head.kind, frame::DATA | frame::HEADERS | frame::RST_STREAM | frame::WINDOW_UPDATE)
        {
            // Even ids are the server's, and the gateway opens none.
            return Err(ConnError(Reason::PROTOCOL_ERROR, "frame on a stream the server never opened"));
        }
        match head.kind {
            frame::DATA => self.on_data(head, payload),
            frame::HEADERS => self.on_headers(head, payload),
            frame::CONTINUATION => self.on_continuation(head, payload),
            frame::PRIORITY => {
                if head.stream == 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                // Priorities are advisory and ignored; a broken one is a stream error, sent only
                // for an open stream (a reset of an idle one would be the gateway's error).
                if head.len != 5 {
                    self.stream_error(head.stream, Reason::FRAME_SIZE_ERROR);
                } else if frame::u32_at(payload) & 0x7fff_ffff == head.stream {
                    self.stream_error(head.stream, Reason::PROTOCOL_ERROR);
                }
                Ok(())
            }
            frame::RST_STREAM => self.on_rst(head, payload),
            frame::SETTINGS => self.on_settings(head, payload),
            frame::PUSH_PROMISE => Err(ConnError(Reason::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            frame::PING => {
                if head.stream != 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if head.len != 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "PING of the wrong size"));
                }
                if head.flags & frame::ACK != 0 {
                    if self.awaiting_pong {
                        self.awaiting_pong = false;
                        self.ping_at = Instant::now() + self.cfg.keepalive_interval;
                    }
                } else {
                    let mut p = [0u8; 8];
                    p.copy_from_slice(payload);
                    frame::put_ping(&mut self.out.wbuf, true, p);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if head.stream != 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if head.len < 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "GOAWAY too short"));
                }
                let code = Reason(frame::u32_at(&payload[4..]));
                if code != Reason::NO_ERROR {
                    tracing::debug!(reason = %code, "HTTP/2 client sent GOAWAY");
                }
                // The client is going: finish the open streams, then close.
                self.peer_goaway = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.on_window_update(head, payload),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, head: Head, p: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.flags & frame::ACK != 0 {
            if head.len != 0 {
                return Err(ConnError(Reason::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
            }
            return Ok(());
        }
        if !head.len.is_multiple_of(6) {
            return Err(ConnError(Reason::FRAME_SIZE_ERROR, "SETTINGS of the wrong size"));
        }
        self.settings += 1;
        if self.settings > SETTINGS_ALLOWANCE + self.completed / 16 {
            return Err(ConnError(Reason::ENHANCE_YOUR_CALM, "too many SETTINGS frames"));
        }
        // Only the last INITIAL_WINDOW_SIZE of a frame counts, applied once (a frame full of them
        // must not cost a pass over the streams each).
        let mut initial_window = None;
        for s in p.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = frame::u32_at(&s[2..]);
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => self.out.encoder.set_limit(v as usize),
                frame::SETTINGS_ENABLE_PUSH if v > 1 => {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1"));
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if v as i64 > frame::MAX_WINDOW {
                        return Err(ConnError(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    initial_window = Some(v as i64);
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME as u32..=(1 << 24) - 1).contains(&v) {
                        return Err(ConnError(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    self.out.peer_max_frame = v as usize;
                }
                // MAX_CONCURRENT_STREAMS limits pushes (none are sent); MAX_HEADER_LIST_SIZE is
                // advisory; unknown settings are ignored.
                _ => {}
            }
        }
        if let Some(v) = initial_window {
            let delta = v - self.peer_initial_window;
            self.peer_initial_window = v;
            for (idx, slot) in self.slots.iter_mut().enumerate() {
                if slot.id == 0 || delta == 0 {
                    continue;
                }
                slot.send_window += delta;
                if slot.send_window > frame::MAX_WINDOW {
                    return Err(ConnError(Reason::FLOW_CONTROL_ERROR, "stream window overflow"));
                }
                if delta > 0 && slot.stalled.is_some() && !slot.conn_blocked {
                    // It may send again; its wait ends once enough went out.
                    queue(&mut self.local_ready, &slot.flag, idx as u32);
                }
            }
        }
        frame::put_head(&mut self.out.wbuf, 0, frame::SETTINGS, frame::ACK, 0);
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, p: &[u8]) -> Result<(), ConnError> {
        if head.len != 4 {
            return Err(ConnError(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size"));
        }
        let inc = (frame::u32_at(p) & 0x7fff_ffff) as i64;
        if head.stream == 0 {
            if inc == 0 {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.out.send_window += inc;
            if self.out.send_window > frame::MAX_WINDOW {
                return Err(ConnError(Reason::FLOW_CONTROL_ERROR, "connection window overflow"));
            }
            self.out.conn_granted += inc;
            let progress = self.out.conn_granted >= STALL_PROGRESS as i64;
            if progress {
                self.out.conn_granted = 0;
            }
            let blocked = std::mem::take(&mut self.out.conn_blocked);
            for idx in blocked {
                let slot = &mut self.slots[idx as usize];
                slot.in_conn_list = false;
                if std::mem::take(&mut slot.conn_blocked) {
                    // It may send again. Its wait starts again when the connection made
                    // progress; else once enough of its own went out.
                    if progress {
                        slot.stalled = None;
                    }
                    queue(&mut self.local_ready, &slot.flag, idx);
                }
            }
            return Ok(());
        }
        if head.stream > self.last_id {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"));
        }
        let Some(idx) = self.ids.get(&head.stream).copied() else { return Ok(()) };
        if inc == 0 {
            self.reset_stream(idx, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let slot = &mut self.slots[idx as usize];
        slot.send_window += inc;
        if slot.send_window > frame::MAX_WINDOW {
            self.reset_stream(idx, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        if slot.stalled.is_some() && !slot.conn_blocked {
            queue(&mut self.local_ready, &slot.flag, idx);
        }
        Ok(())
    }

    fn on_rst(&mut self, head: Head, p: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if head.len != 4 {
            return Err(ConnError(Reason::FRAME_SIZE_ERROR, "RST_STREAM of the wrong size"));
        }
        if head.stream > self.last_id {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
        }
        let Some(idx) = self.ids.get(&head.stream).copied() else { return Ok(()) };
        let reason = Reason(frame::u32_at(p));
        // Only a reset of a young stream before its answer's head counts: that is the
        // rapid-reset shape (open, make the gateway start the work, cancel at once). One after
        // the head (a client cancelling a watch or a server stream it has what it needs of, as
        // gRPC clients do all day on one connection), after the whole answer, or of a call
        // open a while (a deadline; a gRPC server that sends its head with its first message)
        // is a client's normal business.
        let slot = &self.slots[idx as usize];
        if matches!(slot.phase, Phase::Service(_)) && slot.opened.elapsed() < RAPID_RESET_AGE {
            self.resets += 1;
        }
        self.close_slot(idx, Some(reason));
        self.check_resets()
    }

    fn check_resets(&self) -> Result<(), ConnError> {
        if self.resets > RESET_ALLOWANCE && self.resets > self.completed {
            return Err(ConnError(Reason::ENHANCE_YOUR_CALM, "too many reset streams"));
        }
        Ok(())
    }

    fn on_data(&mut self, head: Head, p: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if head.stream > self.last_id {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        // All of it, padding included, counts against the windows.
        let len = head.len as i64;
        if len > self.recv_window {
            return Err(ConnError(Reason::FLOW_CONTROL_ERROR, "DATA beyond the connection window"));
        }
        self.recv_window -= len;
        let data = unpad(head, p)?;
        let end = head.flags & frame::END_STREAM != 0;
        let Some(idx) = self.ids.get(&head.stream).copied() else {
            // A stream the gateway reset (or did not serve after GOAWAY): dropped, the octets
            // given back. On a stream that ended normally, DATA is the client's error.
            if !self.ignorable(head.stream) {
                return Err(ConnError(Reason::STREAM_CLOSED, "DATA on a closed stream"));
            }
            self.shared.released.fetch_add(head.len, Ordering::Relaxed);
            return Ok(());
        };
        let slot = &mut self.slots[idx as usize];
        if slot.remote_done {
            self.shared.released.fetch_add(head.len, Ordering::Relaxed);
            self.reset_stream(idx, Reason::STREAM_CLOSED);
            return Ok(());
        }
        if len > slot.recv_window {
            self.shared.released.fetch_add(head.len, Ordering::Relaxed);
            self.reset_stream(idx, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        slot.recv_window -= len;
        // Padding is never read: give it back to the connection now, and to the stream with
        // what its reader takes next.
        let padding = head.len - data.len();
        if padding > 0 {
            self.shared.released.fetch_add(padding, Ordering::Relaxed);
            if let Some(recv) = slot.recv.as_ref()
                && recv.owe(padding)
            {
                queue(&mut self.local_ready, &slot.flag, idx);
            }
        }
        if let Some(left) = slot.expect.as_mut() {
            let n = data.len() as u64;
            if n > *left || end && n != *left {
                self.shared.released.fetch_add(data.len(), Ordering::Relaxed);
                self.reset_stream(idx, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            *left -= n;
        }
        let Some(recv) = slot.recv.as_ref() else {
            self.shared.released.fetch_add(data.len(), Ordering::Relaxed);
            return Ok(());
        };
        if !recv.push(data, end) {
            // Nobody reads it any more.
            self.shared.released.fetch_add(data.len(), Ordering::Relaxed);
        }
        if end {
            slot.remote_done = true;
            slot.recv = None;
            if matches!(slot.phase, Phase::Done) {
                self.finish_slot(idx);
            }
        }
        Ok(())
    }

    fn on_headers(&mut self, head: Head, p: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let mut frag = unpad(head, p)?;
        let mut self_dependent = false;
        if head.flags & frame::PRIORITY_FLAG != 0 {
            if frag.len() < 5 {
                return Err(ConnError(Reason::FRAME_SIZE_ERROR, "HEADERS too short for its priority"));
            }
            self_dependent = frame::u32_at(frag) & 0x7fff_ffff == head.stream;
            frag = &frag[5..];
        }
        let end_stream = head.flags & frame::END_STREAM != 0;
        if head.flags & frame::END_HEADERS != 0 {
            return self.header_block(head.stream, end_stream, self_dependent, frag);
        }
        self.block = Some(Block { stream: head.stream, end_stream, self_dependent, buf: frag.to_vec() });
        Ok(())
    }

    fn on_continuation(&mut self, head: Head, p: &[u8]) -> Result<(), ConnError> {
        let Some(block) = self.block.as_mut() else {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        };
        if block.buf.len() + p.len() > BLOCK_MAX {
            return Err(ConnError(Reason::ENHANCE_YOUR_CALM, "header block too large"));
        }
        block.buf.extend_from_slice(p);
        if head.flags & frame::END_HEADERS != 0 {
            let Some(b) = self.block.take() else { return Ok(()) };
            return self.header_block(b.stream, b.end_stream, b.self_dependent, &b.buf);
        }
        Ok(())
    }

    /// A whole header block: a new request, or a request's trailers.
    fn header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: &[u8],
    ) -> Result<(), ConnError> {
        if id.is_multiple_of(2) {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "even stream id from a client"));
        }
        if let Some(idx) = self.ids.get(&id).copied() {
            if self_dependent {
                self.decoder.decode(block, |_, _| {}).map_err(compression)?;
                self.reset_stream(idx, Reason::PROTOCOL_ERROR);
                return self.check_resets();
            }
            return self.trailers(idx, end_stream, block);
        }
        if id <= self.last_id {
            // A stream closed already: decoded to keep the table in step. Trailers for a stream
            // the gateway reset may cross the reset; anything else is a stream id out of order
            // (RFC 9113 §5.1.1).
            self.decoder.decode(block, |_, _| {}).map_err(compression)?;
            if self.ignorable(id) {
                return Ok(());
            }
            return Err(ConnError(Reason::PROTOCOL_ERROR, "HEADERS on a closed or out-of-order stream"));
        }
        self.last_id = id;
        if self.goaway {
            // Past the last stream GOAWAY announced: ignored (the client may retry it).
            self.decoder.decode(block, |_, _| {}).map_err(compression)?;
            return Ok(());
        }
        let mut req = RequestHead::new(self.cfg.max_header_list);
        self.decoder.decode(block, |n, v| req.field(n, v)).map_err(compression)?;
        if self_dependent {
            self.rst(id, Reason::PROTOCOL_ERROR);
            self.resets += 1;
            return self.check_resets();
        }
        if self.open >= MAX_CONCURRENT {
            self.rst(id, Reason::REFUSED_STREAM);
            self.resets += 1;
            return self.check_resets();
        }
        let parts = match req.finish(end_stream) {
            Ok(parts) => parts,
            Err(Malformed::TooLarge) => {
                // 431, and the rest of the stream is not wanted.
                let mut h = HeaderMap::new();
                h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
                self.out.headers(id, true, |e, dst| {
                    e.encode_head(
                        http::StatusCode::from_u16(431).unwrap_or(http::StatusCode::BAD_REQUEST),
                        &h,
                        dst,
                    )
                });
                if !end_stream {
                    self.rst(id, Reason::NO_ERROR);
                }
                // The client's fault, as a malformed head is: counted with the resets.
                self.resets += 1;
                return self.check_resets();
            }
            Err(Malformed::Invalid(why)) => {
                tracing::debug!(stream = id, "malformed HTTP/2 request: {why}");
                self.rst(id, Reason::PROTOCOL_ERROR);
                self.resets += 1;
                return self.check_resets();
            }
        };
        let idx = self.alloc_slot(id);
        let slot = &mut self.slots[idx as usize];
        slot.head_only = parts.method == Method::HEAD;
        let body = if end_stream {
            slot.remote_done = true;
            ProxyBody::Empty
        } else {
            let shared = RecvShared::new(self.shared.clone(), slot.flag.clone());
            slot.recv = Some(shared.clone());
            slot.expect = parts.content_length;
            ProxyBody::H2(H2Body::new(shared, parts.content_length))
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = parts.uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = parts.headers;
        let fut = (self.service)(request);
        let slot = &mut self.slots[idx as usize];
        slot.phase = Phase::Service(fut);
        queue(&mut self.local_ready, &slot.flag, idx);
        Ok(())
    }

    fn trailers(&mut self, idx: u32, end_stream: bool, block: &[u8]) -> Result<(), ConnError> {
        let mut t = RequestHead::new(self.cfg.max_header_list);
        self.decoder.decode(block, |n, v| t.field(n, v)).map_err(compression)?;
        let slot = &mut self.slots[idx as usize];
        if slot.remote_done {
            self.reset_stream(idx, Reason::STREAM_CLOSED);
            return Ok(());
        }
        if !end_stream || t.pseudo_seen || t.malformed.is_some() || t.too_large {
            self.reset_stream(idx, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if slot.expect.is_some_and(|left| left != 0) {
            self.reset_stream(idx, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        slot.remote_done = true;
        if let Some(recv) = slot.recv.take() {
            recv.push_trailers(t.headers);
        }
        if matches!(slot.phase, Phase::Done) {
            self.finish_slot(idx);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ streams

    fn alloc_slot(&mut self, id: u32) -> u32 {
        self.open += 1;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.is_empty() {
                    // Room for one: a vector's first growth makes room for four, which a
                    // connection serving one stream at a time would keep for its life.
                    self.slots.reserve_exact(1);
                    self.wakers.reserve_exact(1);
                }
                let i = self.slots.len() as u32;
                let flag = SlotWaker::new(i, self.shared.clone());
                self.wakers.push(Waker::from(flag.clone()));
                self.slots.push(Slot {
                    id: 0,
                    phase: Phase::Done,
                    flag,
                    send_window: 0,
                    recv_window: 0,
                    recv: None,
                    expect: None,
                    remote_done: false,
                    head_only: false,
                    stalled: None,
                    opened: Instant::now(),
                    stall_sent: 0,
                    conn_blocked: false,
                    in_conn_list: false,
                    in_write_list: false,
                });
                i
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.id = id;
        slot.send_window = self.peer_initial_window;
        slot.recv_window = STREAM_WINDOW;
        slot.recv = None;
        slot.expect = None;
        slot.remote_done = false;
        slot.head_only = false;
        slot.stalled = None;
        slot.opened = Instant::now();
        slot.conn_blocked = false;
        self.ids.insert(id, idx);
        idx
    }

    /// Frees a slot whose answer is complete and whose request ended.
    fn finish_slot(&mut self, idx: u32) {
        self.completed += 1;
        self.close_slot(idx, None);
    }

    /// Frees a slot: drops what is left of its work, and fails its request body with `reason`
    /// if it had not ended.
    fn close_slot(&mut self, idx: u32, reason: Option<Reason>) {
        let slot = &mut self.slots[idx as usize];
        if slot.id == 0 {
            return;
        }
        self.ids.remove(&slot.id);
        slot.id = 0;
        slot.phase = Phase::Done;
        slot.stalled = None;
        if let Some(recv) = slot.recv.take() {
            recv.fail(reason.unwrap_or(Reason::CANCEL));
        }
        slot.conn_blocked = false;
        self.free.push(idx);
        self.open -= 1;
        if self.open == 0 {
            self.idle_since = Instant::now();
        }
    }

    /// Writes RST_STREAM and remembers the stream as reset.
    fn rst(&mut self, id: u32, reason: Reason) {
        frame::put_rst(&mut self.out.wbuf, id, reason);
        if self.reset_set.insert(id, ()).is_none() {
            if self.reset_ids.len() == MAX_CONCURRENT
                && let Some(old) = self.reset_ids.pop_front()
            {
                self.reset_set.remove(&old);
            }
            self.reset_ids.push_back(id);
        }
    }

    /// Whether frames on this closed stream are to be ignored rather than be an error: the
    /// gateway reset it lately (the client may have sent them before it saw the reset), or
    /// it came after the last stream GOAWAY announced (the client learns it was not served).
    fn ignorable(&self, id: u32) -> bool {
        self.goaway_id.is_some_and(|g| id > g) || self.reset_set.contains_key(&id)
    }

    /// A stream error on an open stream: RST_STREAM, and the slot freed.
    fn reset_stream(&mut self, idx: u32, reason: Reason) {
        let id = self.slots[idx as usize].id;
        if id == 0 {
            return;
        }
        self.rst(id, reason);
        // Only the client's faults count against its allowance, not the gateway's (a node's
        // broken answer, a stall timeout).
        if matches!(
            reason,
            Reason::PROTOCOL_ERROR
                | Reason::FLOW_CONTROL_ERROR
                | Reason::STREAM_CLOSED
                | Reason::FRAME_SIZE_ERROR
        ) {
            self.resets += 1;
        }
        self.close_slot(idx, Some(reason));
    }

    /// A stream error on a stream that may not be open: reset if it is.
    fn stream_error(&mut self, id: u32, reason: Reason) {
        if let Some(idx) = self.ids.get(&id).copied() {
            self.reset_stream(idx, reason);
        }
    }

    /// Polls the slots that were woken.
    fn run_ready(&mut self) -> Result<(), ConnError> {
        let mut batch = std::mem::take(&mut self.scratch);
        loop {
            if batch.is_empty() {
                std::mem::swap(&mut batch, &mut self.local_ready);
                if batch.is_empty() {
                    self.shared.take_ready(&mut batch);
                }
                if batch.is_empty() {
                    break;
                }
            }
            for idx in batch.drain(..) {
                self.run_slot(idx);
            }
            self.check_resets()?;
        }
        self.scratch = batch;
        Ok(())
    }

    fn run_slot(&mut self, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else { return };
        slot.flag.queued.store(false, Ordering::Release);
        if slot.id == 0 {
            return;
        }
        if self.out.pending() >= WRITE_HIGH && !matches!(slot.phase, Phase::Service(_)) {
            // Paused until the client reads: polled again when the buffer drains. Waiting for
            // the socket, not for the client's window.
            slot.stalled = None;
            if !std::mem::replace(&mut slot.in_write_list, true) {
                self.out.write_blocked.push(idx);
            }
            return;
        }
        // The request body's reader took half a window: give it back to the client.
        if let Some(recv) = &slot.recv {
            let n = recv.take_credit();
            if n > 0 && !slot.remote_done {
                slot.recv_window += n as i64;
                frame::put_window_update(&mut self.out.wbuf, slot.id, n as u32);
            }
        }
        let mut cx = Context::from_waker(&self.wakers[idx as usize]);
        let step = match &mut slot.phase {
            Phase::Service(fut) => match Pin::new(fut).poll(&mut cx) {
                Poll::Pending => Step::Wait,
                Poll::Ready(resp) => {
                    let (body, done) = start_answer(&mut self.out, slot.id, slot.head_only, resp);
                    match body {
                        Some(body) => {
                            slot.phase = Phase::Body { body, held: None, last: false };
                            if self.out.pending() >= WRITE_HIGH {
                                // The head is out; the body waits for the client to read.
                                Step::Paused
                            } else {
                                send_body(&mut self.out, slot, &mut cx)
                            }
                        }
                        None => done,
                    }
                }
            },
            Phase::Body { .. } => send_body(&mut self.out, slot, &mut cx),
            Phase::Done => Step::Done,
        };
        match step {
            Step::Wait => {}
            Step::Stalled => {
                if slot.stalled.is_none() {
                    slot.stalled = Some(Instant::now());
                    slot.stall_sent = 0;
                    self.out.stall_started = true;
                }
                if slot.conn_blocked && !std::mem::replace(&mut slot.in_conn_list, true) {
                    if self.out.conn_blocked.is_empty() {
                        // Only what the client grants from now on counts for the waits.
                        self.out.conn_granted = 0;
                    }
                    self.out.conn_blocked.push(idx);
                }
            }
            Step::Paused => {
                // Waiting for the socket, not for the client's window (the socket's own
                // timeout covers a client that stops reading).
                slot.stalled = None;
                if !std::mem::replace(&mut slot.in_write_list, true) {
                    self.out.write_blocked.push(idx);
                }
            }
            Step::Done => {
                slot.phase = Phase::Done;
                slot.stalled = None;
                if slot.remote_done {
                    self.finish_slot(idx);
                } else if slot.recv.as_ref().is_none_or(|r| r.reader_dropped()) {
                    // The answer is complete and nobody reads the rest of the request: the
                    // client may stop sending it (RFC 9113 §8.1).
                    let id = slot.id;
                    self.rst(id, Reason::NO_ERROR);
                    self.completed += 1;
                    self.close_slot(idx, Some(Reason::NO_ERROR));
                }
                // Otherwise the request body is still read (a background drain): the stream
                // stays open until the client ends it.
            }
            Step::Reset(reason) => self.reset_stream(idx, reason),
        }
    }

    // ------------------------------------------------------------------ writing

    /// Gives read request-body octets back to the client's connection window, in batches.
    fn credit_connection(&mut self) {
        if self.failed.is_some() || self.lingering {
            return;
        }
        let released = self.shared.released.load(Ordering::Relaxed);
        if released as i64 >= CONN_WINDOW / 2 {
            self.shared.released.fetch_sub(released, Ordering::Relaxed);
            self.recv_window += released as i64;
            frame::put_window_update(&mut self.out.wbuf, 0, released as u32);
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let out = &mut self.out;
        let start = out.wpos;
        while out.wpos < out.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &out.wbuf[out.wpos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => out.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(e))),
                Poll::Pending => break,
            }
        }
        self.written += (out.wpos - start) as u64;
        if out.wpos == out.wbuf.len() && out.wpos > 0 {
            out.wbuf.clear();
            out.wpos = 0;
            if self.open == 0 || out.wbuf.capacity() > 4 * WRITE_HIGH {
                out.wbuf = Vec::new();
            }
        } else if out.wpos >= WRITE_HIGH / 2 {
            // A client that reads slowly while answers keep coming never lets the buffer empty:
            // drop what was written, so the buffer holds what waits and no more.
            out.wbuf.drain(..out.wpos);
            out.wpos = 0;
        }
        if out.pending() < WRITE_HIGH / 2 && !out.write_blocked.is_empty() {
            for idx in std::mem::take(&mut out.write_blocked) {
                let slot = &mut self.slots[idx as usize];
                slot.in_write_list = false;
                queue(&mut self.local_ready, &slot.flag, idx);
            }
        }
        if self.out.pending() > 0 {
            // Waiting for the socket. (No flush now: a flush that succeeds would tell
            // `SendTimeout` that writing made progress.)
            return Poll::Pending;
        }
        // Pushes out what a TLS stream still buffers.
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(Error::Io(e))),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    // ------------------------------------------------------------------ closing

    /// Sends GOAWAY: no new streams; the connection closes once the open ones are done.
    fn go_away(&mut self, reason: Reason) {
        // Never a higher last stream id than announced before (RFC 9113 §6.8).
        let last = *self.goaway_id.get_or_insert(self.last_id);
        if !self.goaway || reason != Reason::NO_ERROR {
            frame::put_goaway(&mut self.out.wbuf, last, reason);
        }
        self.goaway = true;
    }

    /// A connection error: GOAWAY with its reason, every stream dropped, then the close.
    fn fail(&mut self, e: ConnError) {
        if self.failed.is_some() {
            return;
        }
        tracing::debug!(reason = %e.0, "HTTP/2 connection error: {}", e.1);
        self.go_away(e.0);
        for idx in 0..self.slots.len() as u32 {
            self.close_slot(idx, Some(Reason::CANCEL));
        }
        self.failed = Some(e);
        // The GOAWAY, and the lingering read after it, get `send_timeout` at most.
        let until = Instant::now() + self.cfg.send_timeout;
        self.linger_until = Some(until);
        self.arm(until);
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let done =
            self.failed.is_some() || (self.goaway || self.peer_goaway || self.read_closed) && self.open == 0;
        if !done || self.out.pending() > 0 {
            return Poll::Pending;
        }
        if !self.lingering {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(self.result()),
                Poll::Ready(Ok(())) => {}
            }
            if self.read_closed {
                return Poll::Ready(self.result());
            }
            // Read what the client still sends until it closes too (a close with unread data
            // would reset the connection and could cut off the last answers), for at most 1 s.
            self.lingering = true;
            let until = Instant::now() + Duration::from_secs(1);
            self.linger_until = Some(until);
            self.arm(until);
            if self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(self.result());
            }
            // Read now: the loop only comes back on a wake-up.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.read_closed {
            return Poll::Ready(self.result());
        }
        Poll::Pending
    }

    fn result(&mut self) -> Result<(), Error> {
        match self.failed.take() {
            Some(ConnError(reason, why)) => Err(Error::Protocol(reason, why)),
            None => Ok(()),
        }
    }
}

impl<IO, F, Fut> Drop for Conn<'_, IO, F, Fut> {
    fn drop(&mut self) {
        // Request bodies read elsewhere (a background drain) end now rather than at their
        // timeouts.
        for slot in &mut self.slots {
            if let Some(r) = slot.recv.take() {
                r.fail(Reason::CANCEL);
            }
        }
    }
}

enum Step {
    /// Waiting for the service or the body.
    Wait,
    /// Waiting for the client's window.
    Stalled,
    /// Waiting for the write buffer to drain.
    Paused,
    Done,
    Reset(Reason),
}

fn queue(local: &mut Vec<u32>, flag: &SlotWaker, idx: u32) {
    if !flag.queued.swap(true, Ordering::AcqRel) {
        local.push(idx);
    }
}

fn compression(e: super::hpack::HpackError) -> ConnError {
    ConnError(Reason::COMPRESSION_ERROR, e.0)
}

/// A frame's payload without its padding.
fn unpad(head: Head, p: &[u8]) -> Result<&[u8], ConnError> {
    if head.flags & frame::PADDED == 0 {
        return Ok(p);
    }
    let Some((&pad, rest)) = p.split_first() else {
        return Err(ConnError(Reason::FRAME_SIZE_ERROR, "padded frame without its pad length"));
    };
    if pad as usize > rest.len() {
        return Err(ConnError(Reason::PROTOCOL_ERROR, "padding longer than the frame"));
    }
    Ok(&rest[..rest.len() - pad as usize])
}

/// Writes an answer's head. Returns its body if one follows, and what the stream does next
/// otherwise.
fn start_answer(
    out: &mut Out,
    id: u32,
    head_only: bool,
    resp: Response<ProxyBody>,
) -> (Option<ProxyBody>, Step) {
    let (mut parts, body) = resp.into_parts();
    // Connection-specific headers (RFC 9113 §8.2.2: TE, and whatever `Connection` names, too).
    crate::http::strip_hop_by_hop(&mut parts.headers);
    // As hyper's server did: the node's Date, or the gateway's (RFC 9110 §6.6.1).
    if !parts.headers.contains_key(DATE) {
        parts.headers.insert(DATE, crate::date::now());
    }
    let end = head_only || body.is_end_stream();
    if !end && let Some(n) = body.size_hint().exact() {
        parts.headers.entry(CONTENT_LENGTH).or_insert_with(|| n.into());
    }
    out.headers(id, end, |e, dst| e.encode_head(parts.status, &parts.headers, dst));
    if end { (None, Step::Done) } else { (Some(body), Step::Wait) }
}

/// Sends what the body has, as the windows allow.
fn send_body<Fut>(out: &mut Out, slot: &mut Slot<Fut>, cx: &mut Context<'_>) -> Step {
    let Phase::Body { body, held, last } = &mut slot.phase else { return Step::Done };
    loop {
        if let Some(data) = held.as_mut() {
            if out.pending() >= WRITE_HIGH {
                // Enough waits for the client already (many answers may become ready at once).
                return Step::Paused;
            }
            let room = slot.send_window.min(out.send_window).min(data.len() as i64);
            if room <= 0 && !data.is_empty() {
                if slot.send_window > 0 {
                    slot.conn_blocked = true;
                }
                return Step::Stalled;
            }
            let n = room.max(0) as usize;
            if slot.stalled.is_some() {
                slot.stall_sent += n;
                if slot.stall_sent >= STALL_PROGRESS {
                    slot.stalled = None;
                }
            }
            let finishes = n == data.len() && *last;
            slot.send_window -= n as i64;
            out.send_window -= n as i64;
            // Copied into the write buffer frame by frame (at least one: an empty last frame
            // carries END_STREAM); the held bytes only move on, no `Bytes` is split.
            let mut sent = 0;
            loop {
                let take = (n - sent).min(out.peer_max_frame);
                let end = finishes && sent + take == n;
                let flags = if end { frame::END_STREAM } else { 0 };
                frame::put_head(&mut out.wbuf, take, frame::DATA, flags, slot.id);
                out.wbuf.extend_from_slice(&data[sent..sent + take]);
                sent += take;
                if sent == n {
                    break;
                }
            }
            data.advance(n);
            if data.is_empty() {
                // All it held went out: whatever it waits for next, it is not the client.
                slot.stalled = None;
                *held = None;
                if finishes {
                    return Step::Done;
                }
            }
            if out.pending() >= WRITE_HIGH {
                return Step::Paused;
            }
            continue;
        }
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Step::Wait,
            Poll::Ready(None) => {
                frame::put_head(&mut out.wbuf, 0, frame::DATA, frame::END_STREAM, slot.id);
                return Step::Done;
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body broke; resetting the stream");
                return Step::Reset(Reason::INTERNAL_ERROR);
            }
            Poll::Ready(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if data.is_empty() && !end {
                    continue;
                }
                *held = Some(data);
                *last = end;
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    out.headers(slot.id, true, |e, dst| e.encode_trailers(&trailers, dst));
                    return Step::Done;
                }
                // Some other kind of frame: not for the client.
            }
        }
    }
}

/// Why a request head cannot be served.
enum Malformed {
    Invalid(&'static str),
    TooLarge,
}

/// A request head (or trailer block) as its fields are decoded.
struct RequestHead {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    headers: HeaderMap,
    pseudo_seen: bool,
    regular_seen: bool,
    malformed: Option<&'static str>,
    size: usize,
    limit: usize,
    too_large: bool,
}

/// What a request head becomes.
struct RequestParts {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    content_length: Option<u64>,
}

impl RequestHead {
    fn new(limit: usize) -> Self {
        RequestHead {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            // Room for a typical request's headers and those the gateway adds.
            headers: HeaderMap::with_capacity(6 + crate::h1::FORWARDED_HEADERS),
            pseudo_seen: false,
            regular_seen: false,
            malformed: None,
            size: 0,
            limit,
            too_large: false,
        }
    }

    fn bad(&mut self, why: &'static str) {
        if self.malformed.is_none() {
            self.malformed = Some(why);
        }
    }

    fn field(&mut self, name: Name, value: Bytes) {
        if self.too_large || self.malformed.is_some() {
            return;
        }
        match name {
            Name::Pseudo(p) => {
                self.pseudo_seen = true;
                if self.regular_seen {
                    return self.bad("pseudo-header after a regular one");
                }
                let slot = match p {
                    Pseudo::Method => &mut self.method,
                    Pseudo::Scheme => &mut self.scheme,
                    Pseudo::Authority => &mut self.authority,
                    Pseudo::Path => &mut self.path,
                    Pseudo::Status | Pseudo::Protocol => {
                        return self.bad("pseudo-header not allowed in a request");
                    }
                };
                if slot.is_some() {
                    return self.bad("repeated pseudo-header");
                }
                self.size += value.len() + 42;
                *slot = Some(value);
            }
            Name::Header(h) => {
                self.regular_seen = true;
                self.size += h.as_str().len() + value.len() + 32;
                if self.size > self.limit {
                    self.too_large = true;
                    return;
                }
                use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
                if h == CONNECTION
                    || h == TRANSFER_ENCODING
                    || h == UPGRADE
                    || h == "keep-alive"
                    || h == "proxy-connection"
                {
                    return self.bad("connection-specific header");
                }
                if h == TE && value.as_ref() != b"trailers" {
                    return self.bad("te other than trailers");
                }
                // RFC 9113 §8.2.1: no whitespace at either end of a value.
                if value.first().is_some_and(|b| *b == b' ' || *b == b'\t')
                    || value.last().is_some_and(|b| *b == b' ' || *b == b'\t')
                {
                    return self.bad("whitespace around a header value");
                }
                match HeaderValue::from_maybe_shared(value) {
                    Ok(v) => {
                        self.headers.append(h, v);
                    }
                    Err(_) => self.bad("invalid header value"),
                }
            }
            Name::Invalid => self.bad("invalid header name"),
        }
    }

    fn finish(mut self, end_stream: bool) -> Result<RequestParts, Malformed> {
        if self.too_large || self.size > self.limit {
            return Err(Malformed::TooLarge);
        }
        if let Some(why) = self.malformed {
            return Err(Malformed::Invalid(why));
        }
        let method = self.method.ok_or(Malformed::Invalid(":method missing"))?;
        let method = Method::from_bytes(&method).map_err(|_| Malformed::Invalid("invalid :method"))?;
        let mut parts = http::uri::Parts::default();
        if let Some(a) = self.authority {
            // RFC 9113 §8.3.1: no userinfo.
            if a.contains(&b'@') {
                return Err(Malformed::Invalid("userinfo in :authority"));
            }
            // A Host header naming another authority (which a client must not send, though
            // some do when a caller sets Host by hand) would route the request by one name and
            // send it to the node by the other: `:authority` is the request's, and that Host
            // header goes.
            if self.headers.get(http::header::HOST).is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(&a)) {
                self.headers.remove(http::header::HOST);
            }
            parts.authority =
                Some(Authority::from_maybe_shared(a).map_err(|_| Malformed::Invalid("invalid :authority"))?);
        }
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() || parts.authority.is_none() {
                return Err(Malformed::Invalid("CONNECT with :scheme or :path, or without :authority"));
            }
        } else {
            let scheme = self.scheme.ok_or(Malformed::Invalid(":scheme missing"))?;
            let path = self.path.ok_or(Malformed::Invalid(":path missing"))?;
            if path.is_empty() {
                return Err(Malformed::Invalid("empty :path"));
            }
            if &path[..] == b"*" && method != Method::OPTIONS {
                return Err(Malformed::Invalid(":path * on a method other than OPTIONS"));
            }
            // A URI with a scheme needs an authority; without one, the path alone.
            if parts.authority.is_some() {
                parts.scheme =
                    Some(Scheme::try_from(&scheme[..]).map_err(|_| Malformed::Invalid("invalid :scheme"))?);
            }
            parts.path_and_query =
                Some(PathAndQuery::from_maybe_shared(path).map_err(|_| Malformed::Invalid("invalid :path"))?);
        }
        let uri = Uri::from_parts(parts).map_err(|_| Malformed::Invalid("invalid request target"))?;
        let mut content_length = None;
        let mut lengths = self.headers.get_all(CONTENT_LENGTH).iter();
        if let Some(v) = lengths.next() {
            if lengths.next().is_some() {
                return Err(Malformed::Invalid("repeated content-length"));
            }
            // Digits only (`u64::from_str` would take a leading `+`).
            let n = std::str::from_utf8(v.as_bytes())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Malformed::Invalid("invalid content-length"))?;
            if end_stream && n != 0 {
                return Err(Malformed::Invalid("content-length without a body"));
            }
            content_length = Some(n);
        }
        Ok(RequestParts { method, uri, headers: self.headers, content_length })
    }
}
