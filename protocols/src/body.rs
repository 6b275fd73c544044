//! The one body type Strait sends in both directions.
//!
//! An enum rather than a boxed trait object, so the common cases (an upstream body streamed
//! through, a small gateway-generated body) cost no allocation. Upstream response bodies carry
//! the per-read timeout, the node's feedback handle and the pooled connection, which goes back to
//! the pool only once the body has been read to its end.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

pub use crate::h2s::H2Body;
use crate::pool::Pooled;
use crate::{Outcome, Peer, grpc};

/// Error type of [`ProxyBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed body for the rare producers that need one (transcoding, streaming JSON).
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A request or response body flowing through Strait.
pub enum ProxyBody {
    /// No body.
    Empty,
    /// A complete body, sent as one frame.
    Full(Option<Bytes>),
    /// A body received from a client or node and forwarded as it arrives.
    Incoming(Incoming),
    /// A request body received from an HTTP/2 client served by [`crate::h2s`].
    H2(H2Body),
    /// A response body from a node, with read timeout and connection reuse.
    Upstream(Box<UpstreamBody>),
    /// Anything else.
    Boxed(BoxBody),
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> Self {
        ProxyBody::Empty
    }
    /// A body with these bytes.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() { ProxyBody::Empty } else { ProxyBody::Full(Some(b)) }
    }
    /// Wraps any body.
    pub fn boxed<B>(b: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        ProxyBody::Boxed(b.map_err(Into::into).boxed_unsync())
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::H2(b) => b.poll_frame(cx),
            ProxyBody::Upstream(b) => Pin::new(&mut **b).poll_frame(cx),
            ProxyBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Incoming(b) => b.is_end_stream(),
            ProxyBody::H2(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.inner.is_end_stream(),
            ProxyBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Incoming(b) => b.size_hint(),
            ProxyBody::H2(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.inner.size_hint(),
            ProxyBody::Boxed(b) => b.size_hint(),
        }
    }
}

/// A response body from a node.
///
/// * Each wait for the next frame is bounded by the upstream's read timeout (so a long gRPC stream
///   stays up as long as messages flow).
/// * At the end of a gRPC call the `grpc-status` of the trailers is reported to the node.
/// * When the body was read to its end the HTTP/1 connection returns to the pool; if it is
///   dropped early the connection is closed instead.
pub struct UpstreamBody {
    inner: Incoming,
    read_timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` is set for the current wait.
    armed: bool,
    /// The armed timer ends at the call's deadline (`deadline`), not at the read timeout.
    armed_for_call: bool,
    pooled: Option<Pooled>,
    peer: Option<Peer>,
    /// Set for gRPC calls whose status is still to come in the trailers.
    grpc_pending: bool,
    started: Instant,
    /// End of the call (gRPC `grpc-timeout`), if any.
    deadline: Option<tokio::time::Instant>,
    /// The client speaks gRPC: a timeout or a broken node stream ends the response with a
    /// `grpc-status` trailer instead of a reset.
    grpc_client: bool,
    ended: bool,
}

/// How an [`UpstreamBody`] should behave beyond carrying bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyPolicy {
    pub read_timeout: Duration,
    pub deadline: Option<tokio::time::Instant>,
    pub grpc_client: bool,
    pub grpc_pending: bool,
}

impl UpstreamBody {
    pub(crate) fn new(
        inner: Incoming,
        policy: BodyPolicy,
        pooled: Option<Pooled>,
        peer: Peer,
        started: Instant,
    ) -> Self {
        UpstreamBody {
            inner,
            read_timeout: policy.read_timeout,
            sleep: None,
            armed: false,
            armed_for_call: false,
            pooled,
            peer: Some(peer),
            grpc_pending: policy.grpc_pending,
            started,
            deadline: policy.deadline,
            grpc_client: policy.grpc_client,
            ended: false,
        }
    }

    /// Ends a gRPC response with a status trailer (the node stream is dropped, which cancels it).
    fn grpc_end(&mut self, code: grpc::Code, message: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended = true;
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.as_header());
        t.insert("grpc-message", grpc::encode_message(message));
        Poll::Ready(Some(Ok(Frame::trailers(t))))
    }

    fn finish(&mut self, grpc_status: Option<u16>) {
        if self.grpc_pending {
            self.grpc_pending = false;
            if let Some(peer) = &self.peer {
                let code = grpc_status.unwrap_or(grpc::Code::Unknown as u16);
                peer.report_since(Outcome::GrpcStatus(code), self.started);
            }
        }
        if let Some(p) = self.pooled.take() {
            p.release();
        }
        self.peer = None;
    }

    fn fail(&mut self, outcome: Outcome) {
        self.pooled = None;
        if let Some(peer) = self.peer.take() {
            peer.report_since(outcome, self.started);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                if let Some(t) = frame.trailers_ref() {
                    let status = grpc::status_of(t);
                    this.finish(status);
                } else if this.inner.is_end_stream() {
                    this.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail(Outcome::LateTcpFailure);
                if this.grpc_client {
                    let code = grpc::code_for_broken_stream(&e);
                    return this.grpc_end(code, &format!("upstream stream broke: {e}"));
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let mut deadline = tokio::time::Instant::now() + this.read_timeout;
                let call_deadline = this.deadline.is_some_and(|d| d <= deadline);
                if let Some(d) = this.deadline.filter(|_| call_deadline) {
                    deadline = d;
                }
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if !this.armed {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => this.sleep.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if !this.armed {
                    this.armed_for_call = call_deadline;
                }
                this.armed = true;
                ready!(sleep.as_mut().poll(cx));
                // What the timer was set for, not what a wait starting now would end at: a
                // call deadline that falls within one read timeout of the node's did not end
                // this wait.
                let call_deadline = this.armed_for_call;
                if call_deadline {
                    // The call's budget ran out; that says nothing about the node.
                    this.pooled = None;
                    this.peer = None;
                } else {
                    this.fail(Outcome::LateTimeout);
                }
                let msg = if call_deadline { "deadline exceeded" } else { "upstream read timed out" };
                if this.grpc_client {
                    // The client's deadline, or the node's read timeout (UNAVAILABLE, as for a
                    // timeout before the answer: `respond::grpc_code`).
                    let code =
                        if call_deadline { grpc::Code::DeadlineExceeded } else { grpc::Code::Unavailable };
                    return this.grpc_end(code, msg);
                }
                Poll::Ready(Some(Err(msg.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
