//! Request bodies of HTTP/2 clients, and the wake-ups between a connection and its streams.
//!
//! A connection's streams are polled by the connection's own task. Each stream slot has one
//! [`SlotWaker`] for its life on the connection: waking it queues the slot and wakes the task,
//! which then polls only the queued slots. A request body is a queue the connection fills with
//! the client's DATA frames and its reader ([`H2Body`]) empties; what the reader takes is given
//! back to the client's flow-control windows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use http_body::{Frame, SizeHint};

use super::frame::Reason;
use crate::body::BoxError;

/// What a connection shares with the wakers of its streams and with its request bodies.
pub(crate) struct ConnShared {
    /// Slots woken since the connection last looked.
    ready: Mutex<Vec<u32>>,
    /// The connection's task, while it waits.
    pub(crate) waker: AtomicWaker,
    /// Request body octets read (or let go unread) since the connection last gave them back to
    /// the client's connection window.
    pub(crate) released: AtomicUsize,
}

impl ConnShared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ConnShared {
            ready: Mutex::new(Vec::new()),
            waker: AtomicWaker::new(),
            released: AtomicUsize::new(0),
        })
    }

    /// Swaps the queue of woken slots with `into` (which must be empty).
    pub(crate) fn take_ready(&self, into: &mut Vec<u32>) {
        let mut q = lock(&self.ready);
        std::mem::swap(&mut *q, into);
    }

    pub(crate) fn has_ready(&self) -> bool {
        !lock(&self.ready).is_empty()
    }

    /// Octets taken (or dropped) by a request body's reader. The connection is woken only when
    /// they are worth a WINDOW_UPDATE: a reader in another task does not wake it per chunk.
    fn release(&self, n: usize) {
        const AT: usize = super::CONN_WINDOW as usize / 2;
        let before = self.released.fetch_add(n, Ordering::Relaxed);
        if before < AT && before + n >= AT {
            self.waker.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves nothing half-done that matters.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The waker of one stream slot.
pub(crate) struct SlotWaker {
    idx: u32,
    /// Set while the slot is queued, so a burst of wake-ups queues it once.
    pub(crate) queued: AtomicBool,
    conn: Arc<ConnShared>,
}

impl SlotWaker {
    pub(crate) fn new(idx: u32, conn: Arc<ConnShared>) -> Arc<Self> {
        Arc::new(SlotWaker { idx, queued: AtomicBool::new(false), conn })
    }
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.conn.ready).push(self.idx);
        }
        self.conn.waker.wake();
    }
}

/// One request body's queue, shared by the connection (writer) and the body (reader).
pub(crate) struct RecvShared {
    inner: Mutex<RecvInner>,
    conn: Arc<ConnShared>,
    /// The stream's slot, woken when the stream window should be given back or the reader let
    /// go.
    slot: Arc<SlotWaker>,
}

#[derive(Default)]
struct RecvInner {
    chunks: VecDeque<Bytes>,
    /// Small payloads, merged after `chunks` (a client sending tiny DATA frames costs a byte of
    /// memory per byte of window, not a chunk each).
    tail: BytesMut,
    trailers: Option<HeaderMap>,
    /// The client ended the stream.
    end: bool,
    /// The stream was reset or the connection is gone before the end.
    error: Option<Reason>,
    reader: Option<Waker>,
    /// Octets taken by the reader and not yet given back to the stream's window.
    taken: usize,
    /// The reader let go: what comes next is dropped.
    dropped: bool,
}

/// Give back a stream's window once this much of it was read.
const STREAM_CREDIT_AT: usize = super::STREAM_WINDOW as usize / 2;

/// Payloads smaller than this are merged into the queue's tail.
const SMALL: usize = 4096;

impl RecvShared {
    pub(crate) fn new(conn: Arc<ConnShared>, slot: Arc<SlotWaker>) -> Arc<Self> {
        Arc::new(RecvShared { inner: Mutex::new(RecvInner::default()), conn, slot })
    }

    /// Queues a DATA payload. Returns false when the reader is gone (the caller gives the
    /// octets back to the connection window itself).
    pub(crate) fn push(&self, data: &[u8], end: bool) -> bool {
        let mut g = lock(&self.inner);
        if g.dropped {
            g.end |= end;
            return false;
        }
        if data.len() < SMALL {
            g.tail.extend_from_slice(data);
        } else {
            if !g.tail.is_empty() {
                let t = g.tail.split().freeze();
                g.chunks.push_back(t);
            }
            g.chunks.push_back(Bytes::copy_from_slice(data));
        }
        g.end |= end;
        if let Some(w) = g.reader.take() {
            drop(g);
            w.wake();
        }
        true
    }

    pub(crate) fn push_trailers(&self, t: HeaderMap) {
        let mut g = lock(&self.inner);
        g.trailers = Some(t);
        g.end = true;
        if let Some(w) = g.reader.take() {
            drop(g);
            w.wake();
        }
    }

    /// Ends the body with an error (reset, or the connection gone), unless it ended already.
    pub(crate) fn fail(&self, reason: Reason) {
        let mut g = lock(&self.inner);
        if g.end || g.error.is_some() {
            return;
        }
        g.error = Some(reason);
        if let Some(w) = g.reader.take() {
            drop(g);
            w.wake();
        }
    }

    /// Counts `n` octets of the stream's window (padding) as read; true when the stream's
    /// window is then worth a WINDOW_UPDATE.
    pub(crate) fn owe(&self, n: usize) -> bool {
        let mut g = lock(&self.inner);
        g.taken += n;
        g.taken >= STREAM_CREDIT_AT
    }

    /// Octets read since the last call, once they are worth a WINDOW_UPDATE.
    pub(crate) fn take_credit(&self) -> usize {
        let mut g = lock(&self.inner);
        if g.taken >= STREAM_CREDIT_AT { std::mem::take(&mut g.taken) } else { 0 }
    }

    pub(crate) fn reader_dropped(&self) -> bool {
        lock(&self.inner).dropped
    }
}

/// A request body from an HTTP/2 client: DATA frames, then the trailers if any. The bytes of
/// each frame are given back to the client's flow-control windows as the frame is taken, so the
/// client sends on as fast as the node reads.
pub struct H2Body {
    shared: Arc<RecvShared>,
    /// `content-length` of the request still to come, if it had one.
    len: Option<u64>,
}

impl H2Body {
    pub(crate) fn new(shared: Arc<RecvShared>, content_length: Option<u64>) -> Self {
        H2Body { shared, len: content_length }
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut g = lock(&self.shared.inner);
        let next = match g.chunks.pop_front() {
            Some(c) => Some(c),
            None if !g.tail.is_empty() => Some(g.tail.split().freeze()),
            None => None,
        };
        if let Some(data) = next {
            let n = data.len();
            g.taken += n;
            let credit = g.taken >= STREAM_CREDIT_AT && !g.end;
            drop(g);
            self.shared.conn.release(n);
            if credit {
                self.shared.slot.wake_by_ref();
            }
            if let Some(left) = self.len.as_mut() {
                *left = left.saturating_sub(n as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if g.end {
            return Poll::Ready(g.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        if let Some(reason) = g.error {
            return Poll::Ready(Some(Err(format!("HTTP/2 request stream ended early ({reason})").into())));
        }
        match &g.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => g.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        let g = lock(&self.shared.inner);
        g.end && g.chunks.is_empty() && g.tail.is_empty() && g.trailers.is_none()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        let mut g = lock(&self.shared.inner);
        g.dropped = true;
        g.reader = None;
        let unread: usize = g.chunks.drain(..).map(|c| c.len()).sum::<usize>() + g.tail.len();
        g.tail = BytesMut::new();
        drop(g);
        // Unread octets will never be taken: give them back to the connection now; the slot
        // decides what becomes of the stream.
        self.shared.conn.release(unread);
        self.shared.slot.wake_by_ref();
    }
}
