//! L4 helpers: PROXY protocol v1/v2 (read and write), the SNI of a TLS ClientHello (for
//! passthrough routing without terminating TLS), and a bidirectional copy with half-close and an
//! idle timeout.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Addresses carried by a PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client; `None` for `UNKNOWN` / `LOCAL`.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

const V2_SIG: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("PROXY protocol: {msg}"))
}

/// Reads a PROXY protocol header (v1 or v2) from the start of `s`, consuming exactly the header.
pub async fn read_proxy_header(s: &mut TcpStream) -> io::Result<ProxyHeader> {
    let mut first = [0u8; 16];
    s.read_exact(&mut first[..12]).await?;
    if first[..12] == V2_SIG {
        s.read_exact(&mut first[12..16]).await?;
        let ver_cmd = first[12];
        if ver_cmd >> 4 != 2 {
            return Err(bad("unsupported version"));
        }
        let fam = first[13];
        let len = u16::from_be_bytes([first[14], first[15]]) as usize;
        if len > 4096 {
            return Err(bad("header too long"));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await?;
        return parse_v2_body(ver_cmd & 0x0f, fam, &body);
    }
    if &first[..5] != b"PROXY" {
        return Err(bad("missing header"));
    }
    // v1: text up to CRLF, at most 107 bytes.
    let mut line = first[..12].to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= 107 {
            return Err(bad("v1 line too long"));
        }
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        line.push(b[0]);
    }
    parse_v1(&line)
}

/// Parses a v1 line including its CRLF.
pub fn parse_v1(line: &[u8]) -> io::Result<ProxyHeader> {
    let text = std::str::from_utf8(line).map_err(|_| bad("v1 is not text"))?;
    let text = text.strip_suffix("\r\n").ok_or_else(|| bad("v1 without CRLF"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(ProxyHeader { source: None, destination: None }),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sp, dp] => {
            let src: IpAddr = src.parse().map_err(|_| bad("bad source address"))?;
            let dst: IpAddr = dst.parse().map_err(|_| bad("bad destination address"))?;
            if (*fam == "TCP4") != src.is_ipv4() || src.is_ipv4() != dst.is_ipv4() {
                return Err(bad("address family mismatch"));
            }
            let sp: u16 = sp.parse().map_err(|_| bad("bad source port"))?;
            let dp: u16 = dp.parse().map_err(|_| bad("bad destination port"))?;
            Ok(ProxyHeader {
                source: Some(SocketAddr::new(src, sp)),
                destination: Some(SocketAddr::new(dst, dp)),
            })
        }
        _ => Err(bad("malformed v1 line")),
    }
}

fn parse_v2_body(cmd: u8, fam: u8, body: &[u8]) -> io::Result<ProxyHeader> {
    if cmd == 0 {
        return Ok(ProxyHeader { source: None, destination: None }); // LOCAL
    }
    if cmd != 1 {
        return Err(bad("unknown command"));
    }
    match fam >> 4 {
        1 if body.len() >= 12 => {
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Ok(ProxyHeader {
                source: Some(SocketAddr::new(src.into(), sp)),
                destination: Some(SocketAddr::new(dst.into(), dp)),
            })
        }
        2 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            let mut b = [0u8; 16];
            b.copy_from_slice(&body[16..32]);
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Ok(ProxyHeader {
                source: Some(SocketAddr::new(Ipv6Addr::from(a).into(), sp)),
                destination: Some(SocketAddr::new(Ipv6Addr::from(b).into(), dp)),
            })
        }
        0 | 3 => Ok(ProxyHeader { source: None, destination: None }), // UNSPEC / UNIX
        _ => Err(bad("truncated address block")),
    }
}

/// A PROXY protocol v1 line for a connection from `src` to `dst`.
pub fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src_ip, dst_ip) = (canonical(src.ip()), canonical(dst.ip()));
    if src_ip.is_ipv4() == dst_ip.is_ipv4() {
        let fam = if src_ip.is_ipv4() { "TCP4" } else { "TCP6" };
        format!("PROXY {fam} {src_ip} {dst_ip} {} {}\r\n", src.port(), dst.port()).into_bytes()
    } else {
        b"PROXY UNKNOWN\r\n".to_vec()
    }
}

/// A PROXY protocol v2 header for a connection from `src` to `dst`.
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIG.to_vec();
    out.push(0x21); // version 2, PROXY
    match (canonical(src.ip()), canonical(dst.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// What peeking at the first bytes of a connection found.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello, with its SNI if it has one.
    Tls(Option<String>),
    /// Not TLS.
    NotTls,
    /// More bytes are needed.
    Incomplete,
}

/// TCP keepalive for the sockets of an L4 session (client and node side): a session without
/// `idle_timeout` is never cut for being idle (a database pool's connections sit idle for
/// hours), so a peer that vanished without a reset (a host lost, a NAT entry dropped) is found
/// by the kernel's probes: after 60 s of silence, every 10 s, given up after 6, about two
/// minutes. Then the session ends and frees its sockets and its node connection. Set on the L4
/// listeners, whose accepted sockets inherit it, and on each node connection.
pub fn session_keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Parses the SNI of a TLS ClientHello at the start of `buf` (one handshake record).
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    if buf[1] != 3 {
        return Hello::NotTls;
    }
    let rec_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < 5 + rec_len {
        return Hello::Incomplete;
    }
    let hs = &buf[5..5 + rec_len];
    // handshake: type(1)=1 len(3) version(2) random(32) sid(1+n) suites(2+n) comp(1+n) ext(2+n)
    let parse = || -> Option<Option<String>> {
        if *hs.first()? != 1 {
            return None;
        }
        let mut p = 4 + 2 + 32;
        let sid = *hs.get(p)? as usize;
        p += 1 + sid;
        let suites = u16::from_be_bytes([*hs.get(p)?, *hs.get(p + 1)?]) as usize;
        p += 2 + suites;
        let comp = *hs.get(p)? as usize;
        p += 1 + comp;
        if p + 2 > hs.len() {
            return Some(None); // no extensions
        }
        let ext_len = u16::from_be_bytes([hs[p], hs[p + 1]]) as usize;
        p += 2;
        let end = (p + ext_len).min(hs.len());
        while p + 4 <= end {
            let ty = u16::from_be_bytes([hs[p], hs[p + 1]]);
            let len = u16::from_be_bytes([hs[p + 2], hs[p + 3]]) as usize;
            p += 4;
            let data = hs.get(p..p + len)?;
            if ty == 0 {
                // server_name list: len(2) then entries type(1) len(2) name
                let mut q = 2;
                while q + 3 <= data.len() {
                    let nt = data[q];
                    let nl = u16::from_be_bytes([data[q + 1], data[q + 2]]) as usize;
                    let name = data.get(q + 3..q + 3 + nl)?;
                    if nt == 0 {
                        // A host name is ASCII (RFC 6066 §3; international names go as
                        // A-labels): anything else is no name that a route could match.
                        if !name.is_ascii() {
                            return Some(None);
                        }
                        return Some(std::str::from_utf8(name).ok().map(|s| s.to_ascii_lowercase()));
                    }
                    q += 3 + nl;
                }
                return Some(None);
            }
            p += len;
        }
        Some(None)
    };
    match parse() {
        Some(sni) => Hello::Tls(sni),
        None => Hello::NotTls,
    }
}

/// Peeks (without consuming) at the start of `s` until a whole ClientHello record is visible,
/// or it is clear the stream is not TLS. The first byte must arrive within `first_byte`, the
/// whole record within `timeout`.
pub async fn peek_client_hello(s: &TcpStream, first_byte: Duration, timeout: Duration) -> io::Result<Hello> {
    let mut buf = vec![0u8; 2048];
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut last = 0;
    // Between two peeks that found nothing new: doubled each time, from 2 ms up to 64 ms, so a
    // client that stalls mid-ClientHello costs about a thousand wake-ups over a minute's
    // `client_header_timeout`, not thirty thousand.
    let mut pause = Duration::from_millis(2);
    loop {
        let until = if last == 0 { deadline.min(start + first_byte) } else { deadline };
        let n = tokio::time::timeout_at(until, s.peek(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "ClientHello timed out"))??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before ClientHello"));
        }
        match parse_client_hello(&buf[..n]) {
            Hello::Incomplete => {
                if n == buf.len() {
                    if buf.len() >= 16 * 1024 + 5 {
                        return Ok(Hello::NotTls);
                    }
                    buf.resize(buf.len() * 2, 0);
                } else if n == last {
                    // Peeking does not consume, so readiness stays set: poll gently for the rest,
                    // until the deadline (peeks return at once then, so their own timeout never
                    // fires: a client that sends part of a ClientHello and stops, or half-closes,
                    // held the connection forever).
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "ClientHello timed out"));
                    }
                    tokio::time::sleep_until((now + pause).min(deadline)).await;
                    pause = (pause * 2).min(Duration::from_millis(64));
                } else {
                    pause = Duration::from_millis(2);
                }
                last = n;
            }
            other => return Ok(other),
        }
    }
}

/// Copies both directions until both are closed, propagating half-close (EOF in one direction
/// shuts down writing on the other side). With `idle`, the session ends after that long without
/// a byte read or written in either direction (nginx's `proxy_timeout`). Returns bytes
/// (client->node, node->client).
pub async fn proxy<A, B>(a: A, b: B, idle: Option<Duration>) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a, mut b) = (a, b);
    let mut up = Pipe::default();
    let mut down = Pipe::default();
    drive(idle, |cx, moved| {
        let up_done = up.poll(&mut a, &mut b, cx, moved)?.is_ready();
        let down_done = down.poll(&mut b, &mut a, cx, moved)?.is_ready();
        Poll::Ready(Ok((up_done && down_done).then_some((up.total, down.total))))
    })
    .await
}

/// Runs a session's two directions until both have ended, or until it has been quiet for
/// `idle`. `both` polls the two directions once, sets its flag when a byte was read or
/// written, and gives the byte counts once both have ended.
async fn drive<F>(idle: Option<Duration>, mut both: F) -> io::Result<(u64, u64)>
where
    F: FnMut(&mut Context<'_>, &mut bool) -> Poll<io::Result<Option<(u64, u64)>>>,
{
    let mut timer = idle.map(IdleTimer::new);
    std::future::poll_fn(|cx| {
        let mut moved = false;
        if let Some(totals) = ready!(both(cx, &mut moved))? {
            return Poll::Ready(Ok(totals));
        }
        if let Some(timer) = timer.as_mut() {
            ready!(timer.poll(moved, cx));
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
        }
        Poll::Pending
    })
    .await
}

/// Ends a quiet session: ready once `limit` has passed without a byte read or written in either
/// direction.
/// The timer is armed for `limit` after the last byte seen when it was (re)armed, and moved on
/// only when it fires, so traffic costs no timer update. Boxed: most sessions have none.
struct IdleTimer {
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    last: tokio::time::Instant,
}

impl IdleTimer {
    fn new(limit: Duration) -> Self {
        IdleTimer { limit, sleep: Box::pin(tokio::time::sleep(limit)), last: tokio::time::Instant::now() }
    }

    /// `moved`: whether a byte was read or written since the last call.
    fn poll(&mut self, moved: bool, cx: &mut Context<'_>) -> Poll<()> {
        if moved {
            self.last = tokio::time::Instant::now();
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.last.elapsed() >= self.limit {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(self.last + self.limit);
        }
        Poll::Pending
    }
}

/// Read size of a direction of [`proxy`] (a TLS record carries at most 16 KiB).
const PIPE_CHUNK: usize = 64 * 1024;

/// One direction of [`proxy`], for streams of any kind (TLS on either side). Each read goes into
/// a buffer on the stack and is written from there; only what the writer does not take at once
/// is kept, on the heap, until it is written. An idle session holds no buffer (it held two of
/// 64 KiB for its whole life, through `copy_bidirectional`). Before a wait for more to read,
/// the writer is flushed (a TLS writer may hold records back), and an EOF is passed on as a
/// shutdown of the writer (for TLS, `close_notify` first).
#[derive(Default)]
struct Pipe {
    /// What a write left over; `pending[written..]` is still to be written.
    pending: Vec<u8>,
    written: usize,
    total: u64,
    /// The reader has ended; the writer's shutdown is under way.
    closing: bool,
    done: bool,
}

impl Pipe {
    fn poll<R, W>(
        &mut self,
        from: &mut R,
        to: &mut W,
        cx: &mut Context<'_>,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                // A reader taking a large answer slowly keeps the session alive too.
                *moved = true;
            }
            if self.pending.capacity() > 0 {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.closing {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut space = [std::mem::MaybeUninit::<u8>::uninit(); PIPE_CHUNK];
            let mut read = ReadBuf::uninit(&mut space);
            match Pin::new(&mut *from).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Nothing more for now: what the writer holds goes out before the wait.
                    ready!(Pin::new(&mut *to).poll_flush(cx))?;
                    return Poll::Pending;
                }
                // A TLS peer that closes without `close_notify` (a bare TCP half-close, as
                // many clients do): its EOF, passed on as one, so the other direction still
                // delivers its answer instead of the whole session being cut.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.closing = true;
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = read.filled();
            if data.is_empty() {
                self.closing = true;
                continue;
            }
            *moved = true;
            self.total += data.len() as u64;
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *to).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => off += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.pending = data[off..].to_vec();
                        self.written = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Relay between two plain TCP sockets, with the same semantics as [`proxy`]: half-close is
/// propagated and `idle` ends a quiet session. Returns bytes (a->b, b->a).
///
/// Each direction reads straight from one socket and writes to the other, with no `AsyncRead`
/// layers in between, through a buffer that exists only while bytes are in flight (see
/// [`OneWay`]). Measured against `splice(2)` through a pipe, which this replaced: with
/// iperf3 on loopback, 256 KiB copies moved 17.5–17.8 Gbit/s where a 64 KiB pipe moved
/// 14.2–14.9 and a 256 KiB pipe 15.8–16.0 (2 interleaved rounds each). The node's receiver reads
/// compact freshly written pages instead of references to the sender's, and the bigger bursts
/// wake the processes on the other core less often, which is where a loopback stream is bound.
/// The copy costs this core more (about 70% of it against 50%), well within its headroom.
pub async fn relay_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)> {
    let mut up = OneWay::new();
    let mut down = OneWay::new();
    // Whether one direction has ended (and passed its half-close on).
    let mut ended = false;
    drive(idle, |cx, moved| {
        let up_done = up.poll(a, b, cx, &mut ended, moved)?.is_ready();
        let down_done = down.poll(b, a, cx, &mut ended, moved)?.is_ready();
        Poll::Ready(Ok((up_done && down_done).then_some((up.total, down.total))))
    })
    .await
}

/// Read size of a direction that has not yet filled a read: short exchanges (a query and its
/// reply, a request per connection).
const SHORT_CHUNK: usize = 16 * 1024;
/// Read size once a direction has filled a [`SHORT_CHUNK`] read: a bulk flow. iperf3 on
/// loopback: 64 KiB reads moved 10 Gbit/s, 128 KiB 14, 256 KiB 17.5, 512 KiB and 1 MiB no more.
const BULK_CHUNK: usize = 256 * 1024;

/// One direction of [`relay_tcp`]. The buffer is allocated (not zeroed) when the socket becomes
/// readable and dropped as soon as it has been drained and everything read has been written, so
/// an idle or quiet connection holds no buffer, and a bulk one holds at most [`BULK_CHUNK`] per
/// direction: the bytes in flight, as the kernel's own socket buffers do.
///
/// A direction is a small state polled by hand (56 bytes), not a future of its own: two `async`
/// directions, each with its own readiness waiters, and the select around them took 1,056
/// bytes of every session's task, idle ones too.
///
/// Reads go through the socket's `poll_read`, which clears its readiness when a read comes back
/// short (TCP hands over everything queued, so a short read has drained it): the next wait goes
/// straight to the reactor instead of a `recv` that fails with EAGAIN. Every readiness check and
/// read spends the task's cooperative budget, so a flow that never drains still yields to the
/// scheduler.
struct OneWay {
    /// What was read; `buf[written..]` is still to be written. No capacity while idle.
    buf: Vec<u8>,
    written: usize,
    /// The next read's size: [`SHORT_CHUNK`], then [`BULK_CHUNK`] once a read has filled it.
    size: usize,
    total: u64,
    done: bool,
}

impl OneWay {
    fn new() -> Self {
        OneWay { buf: Vec::new(), written: 0, size: SHORT_CHUNK, total: 0, done: false }
    }

    /// Moves what `from` has to `to` until one of them has to wait; ready once `from` has ended
    /// (its EOF is passed on as a half-close, unless the other direction has ended already:
    /// then both sockets are closed right after, which sends the FIN anyway).
    fn poll(
        &mut self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        cx: &mut Context<'_>,
        ended: &mut bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Written with `try_write` until the socket says it is full, not `poll_write`: that
            // takes a short write as "full" and waits for the reactor, where the reader on the
            // other core has often made room already. A build using `poll_write` moved about 6%
            // less through iperf3 than the relay before (6 interleaved rounds); this is level.
            while self.written < self.buf.len() {
                match to.try_write(&self.buf[self.written..]) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.written += n;
                        // A reader taking a large answer slowly keeps the session alive too.
                        *moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => match to.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    },
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            self.buf.clear();
            self.written = 0;
            if self.buf.capacity() == 0 {
                // Idle: wait for bytes without a buffer. (While one is held, the last read
                // filled it and the socket is still readable: the read below goes straight on.)
                match from.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.buf.capacity() < self.size {
                self.buf.reserve_exact(self.size);
            }
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut *from), cx, &mut self.buf) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Drained (the readiness is cleared), or the budget is spent (the task is woken
                // again once it has yielded).
                Poll::Pending => {
                    self.buf = Vec::new();
                    return Poll::Pending;
                }
            };
            if n == 0 {
                if !std::mem::replace(ended, true) {
                    let _ = socket2::SockRef::from(&*to).shutdown(std::net::Shutdown::Write);
                }
                self.done = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
            *moved = true;
            self.total += n as u64;
            if n == self.size && self.size < BULK_CHUNK {
                self.size = BULK_CHUNK;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Spends this task's cooperative budget, so its next tokio I/O poll is refused.
    async fn spend_budget() {
        while tokio::task::coop::has_budget_remaining() {
            tokio::task::coop::consume_budget().await;
        }
    }

    /// A relay that starts with its task's budget spent still moves the bytes (it once spun at
    /// 100% CPU instead: the socket stayed readable while every read was refused).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spent_budget_does_not_stall_the_relay() {
        let (la, lb) = (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let mut client = TcpStream::connect(la.local_addr().unwrap()).await.unwrap();
        let mut a = la.accept().await.unwrap().0;
        let mut node = TcpStream::connect(lb.local_addr().unwrap()).await.unwrap();
        let mut b = lb.accept().await.unwrap().0;
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let relay = tokio::spawn(async move {
            a.readable().await.unwrap();
            spend_budget().await;
            relay_tcp(&mut a, &mut b, None).await.unwrap()
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), node.read_to_end(&mut got))
            .await
            .expect("the relay never passed the bytes on")
            .unwrap();
        assert_eq!(got, b"ping");
        node.shutdown().await.unwrap();
        let moved =
            tokio::time::timeout(Duration::from_secs(10), relay).await.expect("relay still running").unwrap();
        assert_eq!(moved, (4, 0));
    }

    /// A session whose client takes a large answer slowly (4 KiB every 100 ms) is alive, though
    /// the relay reads nothing for longer than `idle` while it waits to write what it holds:
    /// a write counts as activity, as in nginx's `proxy_timeout`. Through both relays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_of_a_large_answer_is_not_idle() {
        use tokio::io::AsyncReadExt;
        const IDLE: Duration = Duration::from_millis(300);
        async fn slow_read(client: &mut (impl AsyncRead + Unpin)) -> usize {
            let mut got = 0;
            let mut buf = vec![0u8; 4096];
            let start = tokio::time::Instant::now();
            while start.elapsed() < Duration::from_millis(1500) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(n)) => got += n,
                }
            }
            got
        }
        // Node side: endless bytes.
        async fn flood(mut node: impl AsyncWrite + Unpin) {
            let chunk = vec![7u8; 64 * 1024];
            while node.write_all(&chunk).await.is_ok() {}
        }

        // The generic relay, over in-memory pipes: 4 KiB towards the client, 256 KiB from the
        // node (so one read of 64 KiB takes sixteen of the client's to write).
        let (mut client, a) = tokio::io::duplex(4096);
        let (b, node) = tokio::io::duplex(256 * 1024);
        tokio::spawn(flood(node));
        let relay = tokio::spawn(proxy(a, b, Some(IDLE)));
        let got = slow_read(&mut client).await;
        assert!(got >= 40_000, "the session was cut after {got} bytes");
        assert!(!relay.is_finished(), "the relay ended while the client was reading");
        relay.abort();

        // Socket to socket, with small buffers towards the client.
        let (la, lb) = (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut client = sock.connect(la.local_addr().unwrap()).await.unwrap();
        let mut a = la.accept().await.unwrap().0;
        socket2::SockRef::from(&a).set_send_buffer_size(4096).unwrap();
        let node = TcpStream::connect(lb.local_addr().unwrap()).await.unwrap();
        let mut b = lb.accept().await.unwrap().0;
        tokio::spawn(flood(node));
        let relay = tokio::spawn(async move { relay_tcp(&mut a, &mut b, Some(IDLE)).await });
        let got = slow_read(&mut client).await;
        assert!(got >= 40_000, "the session was cut after {got} bytes");
        assert!(!relay.is_finished(), "the relay ended while the client was reading");
        relay.abort();
    }

    #[test]
    fn v1_round_trip() {
        let src: SocketAddr = "192.0.2.1:5555".parse().unwrap();
        let dst: SocketAddr = "198.51.100.2:443".parse().unwrap();
        let line = v1_header(src, dst);
        assert_eq!(line, b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 443\r\n");
        let h = parse_v1(&line).unwrap();
        assert_eq!(h.source, Some(src));
        assert_eq!(h.destination, Some(dst));
        assert!(parse_v1(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n").is_err());
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap().source, None);
    }

    #[test]
    fn v2_round_trip() {
        for (s, d) in [("192.0.2.1:5555", "198.51.100.2:443"), ("[2001:db8::1]:1", "[2001:db8::2]:2")] {
            let (src, dst): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let h = v2_header(src, dst);
            assert_eq!(&h[..12], &V2_SIG);
            let len = u16::from_be_bytes([h[14], h[15]]) as usize;
            let parsed = parse_v2_body(h[12] & 0xf, h[13], &h[16..16 + len]).unwrap();
            assert_eq!(parsed.source, Some(src));
            assert_eq!(parsed.destination, Some(dst));
        }
    }

    fn hello_with_sni(name: &str) -> Vec<u8> {
        let mut ext = vec![];
        let mut sni = vec![];
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // suites
        body.extend_from_slice(&[1, 0]); // compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    /// Mangled PROXY protocol headers (v1 and v2) and ClientHellos: each is parsed or refused,
    /// never a panic (a release build aborts on one). Also through the async header reader, so
    /// the v2 length field is checked as it is read.
    #[tokio::test]
    async fn mangled_proxy_headers_and_client_hellos_never_panic() {
        use tokio::io::AsyncWriteExt;
        let src: SocketAddr = "192.0.2.1:5555".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let seeds = [
            hello_with_sni("db.example.com"),
            v1_header(src, "198.51.100.2:443".parse().unwrap()),
            v1_header(dst, dst),
            v2_header(src, "198.51.100.2:443".parse().unwrap()),
            v2_header(dst, dst),
        ];
        let mut rng = crate::test_rng::Rng::new(7);
        for _ in 0..20_000 {
            let seed = &seeds[rng.below(seeds.len() as u64) as usize];
            let m = rng.mangle(seed);
            let _ = parse_client_hello(&m);
            let _ = parse_v1(&m);
            if m.len() >= 16 {
                let _ = parse_v2_body(m[12] & 0x0f, m[13], &m[16..]);
            }
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        for _ in 0..200 {
            let seed = &seeds[1 + rng.below(seeds.len() as u64 - 1) as usize];
            let m = rng.mangle(seed);
            let mut client = TcpStream::connect(addr).await.unwrap();
            let mut server = l.accept().await.unwrap().0;
            client.write_all(&m).await.unwrap();
            // The header may be cut short: the reader gets EOF, not a wait.
            client.shutdown().await.unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(10), read_proxy_header(&mut server))
                .await
                .expect("the reader never returned");
        }
    }

    /// A client that sends part of a ClientHello and stops (here it also half-closes, so the
    /// bytes stay readable) is given up at the deadline; it once held the connection forever,
    /// peeking every 2 ms.
    #[tokio::test]
    async fn a_client_hello_that_never_completes_times_out() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let server = l.accept().await.unwrap().0;
        client.write_all(&hello_with_sni("db.example.com")[..20]).await.unwrap();
        client.shutdown().await.unwrap();
        let peeked = tokio::time::timeout(
            Duration::from_secs(10),
            peek_client_hello(&server, Duration::from_secs(1), Duration::from_millis(200)),
        )
        .await
        .expect("the peek never gave up");
        assert_eq!(peeked.map_err(|e| e.kind()), Err(io::ErrorKind::TimedOut));
    }

    /// A ClientHello whose second piece comes after the peeks found the first one wanting (a
    /// large hello over a slow link) is still read whole, at the first pause's end (2 ms; the
    /// pauses then double up to 64 ms).
    #[tokio::test(start_paused = true)]
    async fn a_client_hello_in_two_pieces_is_read_after_the_first_pause() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let server = l.accept().await.unwrap().0;
        let hello = hello_with_sni("db.example.com");
        client.write_all(&hello[..20]).await.unwrap();
        server.readable().await.unwrap();
        // This runtime runs one task at a time: once yielded to, the peek finds the first piece
        // wanting and pauses, before the second piece is written.
        let start = tokio::time::Instant::now();
        let peek = tokio::spawn(async move {
            peek_client_hello(&server, Duration::from_secs(1), Duration::from_secs(10)).await
        });
        tokio::task::yield_now().await;
        client.write_all(&hello[20..]).await.unwrap();
        let peeked = peek.await.unwrap().unwrap();
        assert_eq!(peeked, Hello::Tls(Some("db.example.com".into())));
        // (Time stands still while tasks run: what passed is the pauses.)
        assert_eq!(start.elapsed(), Duration::from_millis(2), "read after one pause");
    }

    #[test]
    fn client_hello_sni() {
        let h = hello_with_sni("DB.Example.com");
        assert_eq!(parse_client_hello(&h), Hello::Tls(Some("db.example.com".into())));
        assert_eq!(parse_client_hello(&h[..20]), Hello::Incomplete);
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"*2\r\n$4\r\nPING"), Hello::NotTls);
        // A name that is not ASCII is no host name: a ClientHello without one.
        assert_eq!(parse_client_hello(&hello_with_sni("\u{e9}a.test")), Hello::Tls(None));
    }
}
