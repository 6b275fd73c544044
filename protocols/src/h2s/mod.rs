//! The HTTP/2 server side: client connections speaking h2 (h2c prior knowledge, or TLS with ALPN
//! `h2`), served by Strait's own HTTP/2 implementation (frames, HPACK, flow control).
//!
//! Every stream of a connection is polled by the connection's own task: no task is spawned per
//! request, and the answers of all the streams that became ready together are written with one
//! call. A connection holds no read or write buffer while it is idle.
//!
//! Per stream:
//! * a client's `RST_STREAM` drops the request (and so cancels the node exchange) at once;
//! * connection-specific headers are removed from the answer (RFC 9113 §8.2.2), an answer
//!   without `date` gets one, and a body of known length gets a `content-length` when it has
//!   none;
//! * a body is sent only as the client's flow-control windows allow, and the next part of it is
//!   taken from the node only once the last one is written: a slow reader holds at most one
//!   part in memory, and the connection stops taking more from any stream while 256 KiB wait to
//!   be written;
//! * a stream whose answer has waited for the client's window for `send_timeout` is reset
//!   (`CANCEL`), which drops the node exchange: a client that stops reading cannot hold a node
//!   connection for ever by keeping its window shut (nginx's `send_timeout` times such a wait
//!   too; stalled socket writes are the caller's to time);
//! * a body that breaks mid-way resets the stream (`INTERNAL_ERROR`);
//! * a request body is given back to the client's windows as the node reads it (1 MiB per
//!   stream, 4 MiB per connection); once the answer is complete and nobody reads the rest of the
//!   request, the stream is reset with `NO_ERROR` (RFC 9113 §8.1);
//! * a malformed request (RFC 9113 §8.1.1: a missing or repeated pseudo-header, upper-case or
//!   connection-specific fields, whitespace around a value, a `content-length` its DATA does not
//!   match, userinfo in `:authority`) is reset with `PROTOCOL_ERROR`; a head over 64 KiB (as
//!   HPACK counts it) gets a 431. A Host header that names another authority than `:authority`
//!   is dropped, so a request is routed and forwarded by one name.
//!
//! Per connection: after `keepalive_interval` in which the client sent nothing, a PING; if for
//! `keepalive_timeout` after it nothing comes from the client and the socket takes nothing
//! queued after the PING, the connection is dropped (a slow download the client still reads,
//! with the answer queued behind it, keeps it). A client that closes the connection
//! cancels its streams. A connection without an open stream for `idle_timeout` gets GOAWAY and
//! closes, and so does every connection when `shutdown` completes; either way the streams in
//! flight finish first. Protocol errors end the connection with GOAWAY and the error code
//! (RFC 9113 §5.4.1), within `send_timeout`. Abuse is bounded: a header block over 256 KiB, or
//! more streams reset or refused for the client's faults than completed ones (past 128), ends
//! the connection with `ENHANCE_YOUR_CALM`; nothing more is read while 256 KiB of answers (or of
//! PING and SETTINGS acknowledgements) wait for a client that does not read, and what was
//! written leaves the buffer as it goes; tiny DATA frames are merged as they are queued, so a
//! request body costs about its size in memory.

mod conn;
mod frame;
mod hpack;
mod recv;
#[cfg(test)]
mod tests;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::time::Duration;

use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

pub use frame::{PREFACE, Reason};
pub use recv::H2Body;

use crate::body::ProxyBody;

/// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
const MAX_CONCURRENT: usize = 1024;
/// The window the gateway grants each stream's request body (SETTINGS_INITIAL_WINDOW_SIZE).
const STREAM_WINDOW: i64 = 1 << 20;
/// The window the gateway grants a connection's request bodies together.
const CONN_WINDOW: i64 = 4 << 20;

/// HTTP/2 settings of a listener, shared by its connections.
pub struct Settings {
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    max_header_list: usize,
}

impl Settings {
    /// Strait's HTTP/2 server settings: 1,024 concurrent streams, 64 KiB of request headers, a
    /// 1 MiB stream and 4 MiB connection receive window, and a PING after 60 s answered within
    /// 20 s. A connection without an open stream for `idle_timeout` is closed; a stream that
    /// waits for the client's window for `send_timeout` is reset.
    pub fn new(idle_timeout: Duration, send_timeout: Duration) -> Self {
        Settings {
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout,
            send_timeout,
            max_header_list: 64 * 1024,
        }
    }
}

/// Why a connection ended other than by a clean close.
#[derive(Debug)]
pub enum Error {
    /// Reading from or writing to the client failed.
    Io(std::io::Error),
    /// The client broke the protocol; the connection was ended with GOAWAY and this code.
    Protocol(Reason, &'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "HTTP/2 connection: {e}"),
            Error::Protocol(reason, why) => write!(f, "HTTP/2 protocol error ({reason}): {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Serves one client connection until it closes, fails, or `shutdown` completes and the streams
/// in flight have ended. `service` answers one request; its futures may borrow from the caller.
/// The client's connection preface is read from `io` (sniffing it first is fine if `io` replays
/// it). Must be called within a tokio runtime (the connection's timer is made at once).
///
/// A function returning an async block rather than an async fn: an async fn would keep `io`
/// and `service` in its state beside the connection made from them, for the connection's life.
pub fn serve<IO, F, Fut, S>(
    io: IO,
    settings: &Settings,
    service: F,
    shutdown: S,
) -> impl Future<Output = Result<(), Error>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ProxyBody>) -> Fut,
    Fut: Future<Output = Response<ProxyBody>> + Unpin,
    S: Future<Output = ()>,
{
    let mut conn = conn::Conn::new(io, settings, service);
    async move {
        let mut shutdown = pin!(shutdown);
        poll_fn(|cx| conn.poll(cx, shutdown.as_mut())).await
    }
}
