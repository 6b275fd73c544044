//! The HTTP/2 server side: client connections speaking h2 (h2c prior knowledge, or TLS with ALPN
//! `h2`), served with the `h2` crate directly.
//!
//! Every stream of a connection runs inside the connection's own task, in a
//! [`FuturesUnordered`], rather than in a task of its own as hyper's server does. When a node's
//! answer arrives, the task that reads it is the one that writes the client's frames: no task is
//! spawned per request and no second task is woken to flush.
//!
//! Per stream, as hyper does:
//! * a client's `RST_STREAM` while the answer is pending, or while its body is sent, drops the
//!   request (and so cancels the node exchange);
//! * connection-specific headers are removed from the answer (RFC 9113 §8.2.2), an answer
//!   without `date` gets one, and a body of known length gets a `content-length` when it has
//!   none;
//! * a body is sent only as the client's flow-control window opens, so a slow reader holds at
//!   most `max_send_buffer_size` of it in memory;
//! * a stream whose next DATA frame has waited for the client's window for `send_timeout` is
//!   reset (`CANCEL`), which drops the node exchange: a client that stops reading cannot hold a
//!   node connection for ever by keeping its window shut (nginx's `send_timeout` times such a
//!   wait too; stalled socket writes are the caller's to time);
//! * a body that breaks mid-way resets the stream (`INTERNAL_ERROR`).
//!
//! Per connection: a PING every `keepalive_interval`; a client that does not answer within
//! `keepalive_timeout` is disconnected. A connection without an open stream for `idle_timeout`
//! gets GOAWAY and closes, and so does every connection when `shutdown` completes; either way the
//! streams in flight finish first.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{Ping, Reason, SendStream};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use crate::body::{H2Body, ProxyBody};

/// HTTP/2 settings of a listener, shared by its connections.
pub struct Settings {
    builder: h2::server::Builder,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
}

impl Settings {
    /// Strait's HTTP/2 server settings: 1,024 concurrent streams, 64 KiB of request headers, a
    /// 1 MiB stream and 4 MiB connection receive window, at most 400 KiB buffered per stream
    /// towards a slow client, and a PING after 60 s answered within 20 s. A connection without
    /// an open stream for `idle_timeout` is closed; a stream that waits for the client's window
    /// for `send_timeout` is reset.
    pub fn new(idle_timeout: Duration, send_timeout: Duration) -> Self {
        let mut builder = h2::server::Builder::new();
        builder
            .max_concurrent_streams(1024)
            .max_header_list_size(64 * 1024)
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_send_buffer_size(400 * 1024);
        Settings {
            builder,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout,
            send_timeout,
        }
    }
}

/// Serves one client connection until it closes, fails, or `shutdown` completes and the streams
/// in flight have ended. `service` answers one request; its futures may borrow from the caller.
pub async fn serve<IO, F, Fut, S>(
    io: IO,
    settings: &Settings,
    mut service: F,
    shutdown: S,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ProxyBody>) -> Fut,
    Fut: Future<Output = Response<ProxyBody>>,
    S: Future<Output = ()>,
{
    let mut conn = settings.builder.handshake::<_, Bytes>(io).await?;
    let mut streams = FuturesUnordered::new();
    let mut shutdown = pin!(shutdown);
    let mut closing = false;
    let mut pings = conn.ping_pong();
    let mut awaiting_pong = false;
    let mut timer = pin!(tokio::time::sleep(settings.keepalive_interval));
    // When the last stream ended; the idle timer is moved on from it only when it fires, so a
    // busy connection costs no timer update per request.
    let mut idle_since = tokio::time::Instant::now();
    let mut idle = pin!(tokio::time::sleep_until(idle_since + settings.idle_timeout));
    loop {
        tokio::select! {
            biased;
            // Streams first: what they queue is written when the connection is polled below.
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = tokio::time::Instant::now();
                }
            }
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let (parts, recv) = req.into_parts();
                    let len = content_length(&parts.headers);
                    let req = Request::from_parts(parts, ProxyBody::H2(H2Body::new(recv, len)));
                    streams.push(answer(service(req), respond, settings.send_timeout));
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            () = &mut shutdown, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut idle, if !closing => {
                let deadline = idle_since + settings.idle_timeout;
                if streams.is_empty() && deadline <= tokio::time::Instant::now() {
                    tracing::debug!("HTTP/2 connection idle; closing");
                    closing = true;
                    conn.graceful_shutdown();
                } else {
                    let busy = tokio::time::Instant::now() + settings.idle_timeout;
                    idle.as_mut().reset(if streams.is_empty() { deadline } else { busy });
                }
            }
            () = &mut timer => {
                if awaiting_pong {
                    tracing::debug!("HTTP/2 client did not answer a PING; closing");
                    return Ok(());
                }
                let sent = pings.as_mut().is_some_and(|p| p.send_ping(Ping::opaque()).is_ok());
                awaiting_pong = sent;
                let wait = if sent { settings.keepalive_timeout } else { settings.keepalive_interval };
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            _ = poll_fn(|cx| match pings.as_mut() {
                Some(p) => p.poll_pong(cx),
                None => Poll::Pending,
            }), if awaiting_pong => {
                awaiting_pong = false;
                timer.as_mut().reset(tokio::time::Instant::now() + settings.keepalive_interval);
            }
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Answers one stream: waits for the service (or the client's reset), sends the head, then the
/// body.
async fn answer<Fut>(service: Fut, mut respond: SendResponse<Bytes>, send_timeout: Duration)
where
    Fut: Future<Output = Response<ProxyBody>>,
{
    let resp = {
        let mut service = pin!(service);
        poll_fn(|cx| {
            if let Poll::Ready(r) = service.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            // Pending: a client that gave up cancels the request.
            respond.poll_reset(cx).map(|_| None)
        })
        .await
    };
    let Some(resp) = resp else { return };
    let (mut parts, body) = resp.into_parts();
    // Connection-specific headers (RFC 9113 §8.2.2: TE, and whatever `Connection` names, too).
    crate::http::strip_hop_by_hop(&mut parts.headers);
    // As hyper's server did: the node's Date, or the gateway's (RFC 9110 §6.6.1).
    if !parts.headers.contains_key(http::header::DATE) {
        parts.headers.insert(http::header::DATE, crate::date::now());
    }
    let end = body.is_end_stream();
    if !end && let Some(n) = body.size_hint().exact() {
        parts.headers.entry(CONTENT_LENGTH).or_insert_with(|| n.into());
    }
    let Ok(send) = respond.send_response(Response::from_parts(parts, ()), end) else { return };
    if !end {
        send_body(body, send, send_timeout).await;
    }
}

/// Sends a response body as DATA frames (and trailers), as the client's window allows.
///
/// The next frame is taken from the body before any window is claimed (as hyper does since its
/// issue 4003): a claim made while the body has nothing to send would hold part of the
/// connection's window that other streams may need. A frame in hand then waits for room, and
/// h2 buffers it beyond the window up to `max_send_buffer_size`. A frame that gets no room for
/// `send_timeout` resets the stream.
async fn send_body(body: ProxyBody, mut send: SendStream<Bytes>, send_timeout: Duration) {
    let mut body = pin!(body);
    // A DATA frame taken from the body and waiting for room, with its end-of-stream flag.
    let mut held: Option<(Bytes, bool)> = None;
    // Bounds a wait for room. Made on the first wait only (an answer the window never holds up,
    // as most are, costs no timer), then moved on at the start of each wait.
    let mut stall: Option<Pin<Box<Sleep>>> = None;
    let mut waiting = false;
    poll_fn(|cx| {
        loop {
            // Registered on every wait, so a reset by the client wakes this stream.
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((data, end)) = held.take() {
                while send.capacity() == 0 {
                    match send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => waiting = false,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            if !waiting {
                                waiting = true;
                                let deadline = tokio::time::Instant::now() + send_timeout;
                                match stall.as_mut() {
                                    Some(timer) => timer.as_mut().reset(deadline),
                                    None => stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                                }
                            }
                            if stall.as_mut().is_some_and(|timer| timer.as_mut().poll(cx).is_ready()) {
                                tracing::debug!("no flow-control window from the client for send_timeout; resetting the stream");
                                send.send_reset(Reason::CANCEL);
                                return Poll::Ready(());
                            }
                            held = Some((data, end));
                            return Poll::Pending;
                        }
                    }
                }
                waiting = false;
                if send.send_data(data, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let _ = send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "response body broke; resetting the stream");
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if data.is_empty() {
                        // Needs no window.
                        if send.send_data(data, end).is_err() || end {
                            return Poll::Ready(());
                        }
                    } else {
                        send.reserve_capacity(1);
                        held = Some((data, end));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        // No more DATA: give back any window still claimed.
                        send.reserve_capacity(0);
                        let _ = send.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                    // Some other kind of frame: not for the client.
                }
            }
        }
    })
    .await
}
