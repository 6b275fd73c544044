//! A real gRPC server for the tests (tonic's server machinery, hand-routed without codegen), its
//! proto, and a tonic client.
//!
//! `test.Greeter`: `SayHello` (unary; `delay_ms` delays, `code` fails with that status and a
//! `test.ErrorDetail` in `grpc-status-details-bin`), `StreamHellos` (server streaming: `count`
//! replies `delay_ms` apart, then `code`), `CollectHellos` (client streaming), `Chat` (bidi), and
//! `grpc.health.v1.Health` from tonic-health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Code, Request, Response, Status, Streaming};
use tower::ServiceExt;

use super::certs::Leaf;

/// The proto the server implements, for `protos` resources.
pub const PROTO: &str = r#"syntax = "proto3";
package test;

service Greeter {
  rpc SayHello (HelloRequest) returns (HelloReply);
  rpc StreamHellos (HelloRequest) returns (stream HelloReply);
  rpc CollectHellos (stream HelloRequest) returns (HelloReply);
  rpc Chat (stream HelloRequest) returns (stream HelloReply);
}

enum Kind {
  KIND_UNSPECIFIED = 0;
  SMALL = 1;
  LARGE = 2;
}

message Inner {
  string note = 1;
  repeated int32 values = 2;
}

message HelloRequest {
  string name = 1;
  int32 count = 2;
  int64 big = 3;
  Kind kind = 4;
  repeated string tags = 5;
  Inner inner = 6;
  map<string, int32> scores = 7;
  int32 delay_ms = 8;
  int32 code = 9;
}

message HelloReply {
  string message = 1;
  int64 big = 2;
  Kind kind = 3;
  repeated string tags = 4;
  Inner inner = 5;
  map<string, int32> scores = 6;
  repeated string empty = 7;
  int32 index = 8;
  string authority = 9;
}

message ErrorDetail {
  string reason = 1;
  int32 retry_after = 2;
}
"#;

#[derive(Clone, PartialEq, Message)]
pub struct Inner {
    #[prost(string, tag = "1")]
    pub note: String,
    #[prost(int32, repeated, tag = "2")]
    pub values: Vec<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int32, tag = "2")]
    pub count: i32,
    #[prost(int64, tag = "3")]
    pub big: i64,
    #[prost(int32, tag = "4")]
    pub kind: i32,
    #[prost(string, repeated, tag = "5")]
    pub tags: Vec<String>,
    #[prost(message, optional, tag = "6")]
    pub inner: Option<Inner>,
    #[prost(map = "string, int32", tag = "7")]
    pub scores: std::collections::HashMap<String, i32>,
    #[prost(int32, tag = "8")]
    pub delay_ms: i32,
    #[prost(int32, tag = "9")]
    pub code: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(int64, tag = "2")]
    pub big: i64,
    #[prost(int32, tag = "3")]
    pub kind: i32,
    #[prost(string, repeated, tag = "4")]
    pub tags: Vec<String>,
    #[prost(message, optional, tag = "5")]
    pub inner: Option<Inner>,
    #[prost(map = "string, int32", tag = "6")]
    pub scores: std::collections::HashMap<String, i32>,
    #[prost(string, repeated, tag = "7")]
    pub empty: Vec<String>,
    #[prost(int32, tag = "8")]
    pub index: i32,
    #[prost(string, tag = "9")]
    pub authority: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ErrorDetail {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(int32, tag = "2")]
    pub retry_after: i32,
}

#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

fn failure(code: i32) -> Status {
    let detail = ErrorDetail { reason: "because the test said so".into(), retry_after: 7 };
    let status = RpcStatus {
        code,
        message: format!("failure {code}"),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/test.ErrorDetail".into(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(Code::from_i32(code), format!("failure {code}"), Bytes::from(status.encode_to_vec()))
}

fn reply(req: &HelloRequest, authority: &str) -> HelloReply {
    HelloReply {
        message: format!("Hello {}", req.name),
        big: req.big,
        kind: req.kind,
        tags: req.tags.clone(),
        inner: req.inner.clone(),
        scores: req.scores.clone(),
        empty: vec![],
        index: 0,
        authority: authority.to_string(),
    }
}

/// A running gRPC server.
pub struct GrpcServer {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    pub health: tonic_health::server::HealthReporter,
    task: JoinHandle<()>,
}

type Codec = tonic_prost::ProstCodec<HelloReply, HelloRequest>;

impl GrpcServer {
    /// Starts on 127.0.0.1:0 (h2c), or over TLS (ALPN h2) with `tls`.
    pub async fn start(tls: Option<&Leaf>) -> GrpcServer {
        Self::start_with(tls, None).await
    }

    /// With `client_ca`, TLS clients must present a certificate signed by it (mTLS).
    pub async fn start_with(tls: Option<&Leaf>, client_ca: Option<&str>) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.map(|leaf| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap();
            let builder = match client_ca {
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in strait_protocols::tls::parse_certs(ca).unwrap() {
                        roots.add(c).unwrap();
                    }
                    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .unwrap();
                    builder.with_client_cert_verifier(v)
                }
                None => builder.with_no_client_auth(),
            };
            let mut cfg = builder
                .with_single_cert(
                    strait_protocols::tls::parse_certs(&leaf.cert).unwrap(),
                    strait_protocols::tls::parse_key(&leaf.key).unwrap(),
                )
                .unwrap();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (c, hs, acceptor) = (c.clone(), health_svc.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let (c, hs) = (c.clone(), hs.clone());
                        async move { Ok::<_, std::convert::Infallible>(route(req, &c, hs).await) }
                    });
                    let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http2_only();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = b.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        GrpcServer { addr, calls, health, task }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn route<H>(
    req: http::Request<Incoming>,
    calls: &AtomicUsize,
    health: H,
) -> http::Response<tonic::body::Body>
where
    H: tower::Service<http::Request<Incoming>, Response = http::Response<tonic::body::Body>> + Send,
    H::Error: std::fmt::Debug,
    H::Future: Send,
{
    let path = req.uri().path().to_string();
    let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
    // A call named "forwarded" is answered with the forwarding headers the server got.
    let forwarded = ["x-forwarded-host", "x-forwarded-proto", "x-forwarded-port"]
        .map(|h| format!("{h}={}", req.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or("-")))
        .join(" ");
    if path.starts_with("/grpc.health.v1.Health/") {
        return health.oneshot(req).await.expect("health service");
    }
    calls.fetch_add(1, Ordering::Relaxed);
    let mut grpc = tonic::server::Grpc::new(Codec::default());
    match path.as_str() {
        "/test.Greeter/SayHello" => {
            let svc = tower::service_fn(move |r: Request<HelloRequest>| {
                let authority = authority.clone();
                let forwarded = forwarded.clone();
                async move {
                    let req = r.into_inner();
                    if req.name == "forwarded" {
                        return Ok(Response::new(HelloReply {
                            message: forwarded,
                            ..reply(&req, &authority)
                        }));
                    }
                    if req.delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(req.delay_ms as u64)).await;
                    }
                    if req.code != 0 {
                        return Err(failure(req.code));
                    }
                    Ok(Response::new(reply(&req, &authority)))
                }
            });
            grpc.unary(svc, req).await
        }
        "/test.Greeter/StreamHellos" => {
            let svc = tower::service_fn(|r: Request<HelloRequest>| async move {
                let req = r.into_inner();
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<HelloReply, Status>>(4);
                tokio::spawn(async move {
                    for i in 0..req.count {
                        if i > 0 && req.delay_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(req.delay_ms as u64)).await;
                        }
                        let mut rep = reply(&req, "");
                        rep.index = i;
                        if tx.send(Ok(rep)).await.is_err() {
                            return;
                        }
                    }
                    if req.code != 0 {
                        let _ = tx.send(Err(failure(req.code))).await;
                    }
                });
                Ok::<_, Status>(Response::new(receiver_stream(rx)))
            });
            grpc.server_streaming(svc, req).await
        }
        "/test.Greeter/CollectHellos" => {
            let svc = tower::service_fn(|r: Request<Streaming<HelloRequest>>| async move {
                let mut s = r.into_inner();
                let mut names = vec![];
                while let Some(m) = s.message().await? {
                    names.push(m.name);
                }
                Ok::<_, Status>(Response::new(HelloReply { message: names.join(","), ..Default::default() }))
            });
            grpc.client_streaming(svc, req).await
        }
        "/test.Greeter/Chat" => {
            let svc = tower::service_fn(|r: Request<Streaming<HelloRequest>>| async move {
                let mut s = r.into_inner();
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<HelloReply, Status>>(4);
                tokio::spawn(async move {
                    while let Ok(Some(m)) = s.message().await {
                        let rep = HelloReply { message: format!("echo {}", m.name), ..Default::default() };
                        if tx.send(Ok(rep)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok::<_, Status>(Response::new(receiver_stream(rx)))
            });
            grpc.streaming(svc, req).await
        }
        _ => Status::unimplemented(format!("no method {path}")).into_http(),
    }
}

type ReplyStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<HelloReply, Status>> + Send>>;

fn receiver_stream(mut rx: tokio::sync::mpsc::Receiver<Result<HelloReply, Status>>) -> ReplyStream {
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// A tonic client to `addr` over h2c.
pub async fn client(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let ch =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(ch)
}

pub fn path(method: &str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_maybe_shared(format!("/test.Greeter/{method}")).unwrap()
}

/// One unary SayHello through `addr`.
pub async fn say_hello(addr: SocketAddr, req: HelloRequest) -> Result<HelloReply, Status> {
    let mut c = client(addr).await;
    c.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    c.unary(Request::new(req), path("SayHello"), tonic_prost::ProstCodec::default())
        .await
        .map(|r| r.into_inner())
}

/// Decodes the `test.ErrorDetail` carried by a status, if any.
pub fn error_detail(status: &Status) -> Option<ErrorDetail> {
    let s = RpcStatus::decode(status.details()).ok()?;
    ErrorDetail::decode(s.details.first()?.value.as_slice()).ok()
}
