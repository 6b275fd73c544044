//! gRPC end to end against real tonic servers: all four call types, trailers and status details
//! passed through, per-call balancing, deadlines, gateway-made errors as gRPC statuses (tonic and
//! curl), grpcs, grpc.health.v1 checks, and grpc-transcode (query, form, JSON, nested/repeated/
//! enum/int64, descriptor sets with imports, status mapping, deadlines, server streaming).

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::certs::Ca;
use support::grpc::{self as g, GrpcServer, HelloReply, HelloRequest};
use support::*;
use tonic::Code;

fn grpc_route(nodes: &str, extra: &str) -> String {
    format!(
        "routes:\n  - uri: /test.Greeter/*\n{extra}    upstream:\n      scheme: grpc\n      nodes: {nodes}\n"
    )
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_pass_through_with_authority_and_error_details() {
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&grpc_route(&nodes_yaml(&[s.addr]), ""));
    let rep =
        g::say_hello(gw.http(), HelloRequest { name: "world".into(), big: i64::MAX, ..Default::default() })
            .await
            .unwrap();
    assert_eq!(rep.message, "Hello world");
    assert_eq!(rep.big, i64::MAX);
    assert_eq!(rep.authority, gw.http().to_string(), "pass_host: pass keeps the client's :authority");

    // A failure with google.rpc.Status details reaches the client unchanged.
    let err = g::say_hello(gw.http(), HelloRequest { code: 9, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "failure 9");
    let detail = g::error_detail(&err).expect("grpc-status-details-bin passed through");
    assert_eq!(detail.retry_after, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_calls_of_every_kind_and_read_timeout_between_messages() {
    let s = GrpcServer::start(None).await;
    // read timeout 0.5 s; the stream below lasts 5 x 300 ms.
    let gw = TestGateway::start(&grpc_route(
        &nodes_yaml(&[s.addr]),
        "    timeout: {connect: 1, send: 1, read: 0.5}\n",
    ));
    let mut c = g::client(gw.http()).await;
    c.ready().await.unwrap();
    let req = HelloRequest { name: "s".into(), count: 5, delay_ms: 300, ..Default::default() };
    let mut stream = c
        .server_streaming(
            tonic::Request::new(req),
            g::path("StreamHellos"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = vec![];
    while let Some(m) = stream.message().await.unwrap() {
        let m: HelloReply = m;
        got.push(m.index);
    }
    assert_eq!(got, [0, 1, 2, 3, 4], "a stream stays up while messages flow");

    c.ready().await.unwrap();
    let outbound = tokio_stream_iter(vec![hello("a"), hello("b"), hello("c")]);
    let rep: HelloReply = c
        .client_streaming(
            tonic::Request::new(outbound),
            g::path("CollectHellos"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rep.message, "a,b,c");

    c.ready().await.unwrap();
    let outbound = tokio_stream_iter(vec![hello("x"), hello("y")]);
    let mut replies = c
        .streaming(tonic::Request::new(outbound), g::path("Chat"), tonic_prost::ProstCodec::default())
        .await
        .unwrap()
        .into_inner();
    let mut got = vec![];
    while let Some(m) = replies.message().await.unwrap() {
        let m: HelloReply = m;
        got.push(m.message);
    }
    assert_eq!(got, ["echo x", "echo y"]);

    // A node that stays quiet past the read timeout, with no client deadline: UNAVAILABLE (as
    // APISIX's 504 reaches a gRPC client), before the answer and between messages alike.
    c.ready().await.unwrap();
    let slow = HelloRequest { delay_ms: 2000, ..hello("slow") };
    let err = c
        .unary::<_, HelloReply, _>(
            tonic::Request::new(slow),
            g::path("SayHello"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("the node is slower than the read timeout");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let slow_stream = HelloRequest { name: "s".into(), count: 3, delay_ms: 1500, ..Default::default() };
    let err = stream_error(&mut c, tonic::Request::new(slow_stream.clone())).await;
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    // A client deadline that falls within one read timeout after the node's (0.5 s, then 0.8 s):
    // the node's timeout ended the wait, so still UNAVAILABLE, not DEADLINE_EXCEEDED.
    let mut req = tonic::Request::new(slow_stream);
    req.set_timeout(Duration::from_millis(800));
    let err = stream_error(&mut c, req).await;
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// The status a `StreamHellos` call ends with, whether it fails at once or after some messages;
/// a stream that ends cleanly fails the test.
async fn stream_error(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    req: tonic::Request<HelloRequest>,
) -> tonic::Status {
    c.ready().await.unwrap();
    let call = c.server_streaming::<_, HelloReply, _>(
        req,
        g::path("StreamHellos"),
        tonic_prost::ProstCodec::default(),
    );
    let mut stream = match call.await {
        Ok(r) => r.into_inner(),
        Err(e) => return e,
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without the timeout"),
            Err(e) => return e,
        }
    }
}

fn tokio_stream_iter(
    v: Vec<HelloRequest>,
) -> impl futures_util::Stream<Item = HelloRequest> + Send + 'static {
    futures_util::stream::iter(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_balanced_per_call_over_one_client_connection() {
    let (a, b) = (GrpcServer::start(None).await, GrpcServer::start(None).await);
    let gw = TestGateway::start_with(BASE_CONFIG, &grpc_route(&nodes_yaml(&[a.addr, b.addr]), ""), 1);
    let mut c = g::client(gw.http()).await;
    for i in 0..10 {
        c.ready().await.unwrap();
        let _: HelloReply = c
            .unary(
                tonic::Request::new(hello(&format!("n{i}"))),
                g::path("SayHello"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!((a.calls(), b.calls()), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_honoured_with_deadline_exceeded() {
    use prost::Message;
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&grpc_route(&nodes_yaml(&[s.addr]), ""));
    // A raw HTTP/2 client, so only the gateway enforces the deadline.
    let msg = HelloRequest { delay_ms: 3000, ..hello("slow") }.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{}/test.Greeter/SayHello", gw.http()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Full::new(Bytes::from(framed)))
        .unwrap();
    let started = Instant::now();
    let (status, headers, _, trailers) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    let code = headers.get("grpc-status").or(trailers.as_ref().and_then(|t| t.get("grpc-status")));
    assert_eq!(code.map(|c| c.to_str().unwrap()), Some("4"), "DEADLINE_EXCEEDED");
    assert!(started.elapsed() < Duration::from_millis(2000), "{:?}", started.elapsed());

    // Mid-stream: the messages sent before the deadline arrive, then a DEADLINE_EXCEEDED trailer.
    let msg = HelloRequest { count: 20, delay_ms: 100, ..hello("stream") }.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{}/test.Greeter/StreamHellos", gw.http()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "450m")
        .body(Full::new(Bytes::from(framed)))
        .unwrap();
    let (status, _, body, trailers) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "4");
    assert!(!body.is_empty() && body.len() < 20 * 10, "some messages, not all: {} bytes", body.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_grpc_statuses_not_bare_http() {
    let dead = closed_port();
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /test.Greeter/*\n    upstream: {{scheme: grpc, nodes: {}}}\n  - uri: /empty.Svc/*\n    upstream: {{scheme: grpc, nodes: {{}}}}\n",
        nodes_yaml(&[dead])
    ));
    let err = g::say_hello(gw.http(), hello("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "connect failure: {err:?}");

    let frame = [0u8, 0, 0, 0, 0];
    for (path, code) in [("/test.Greeter/SayHello", "14"), ("/empty.Svc/M", "14"), ("/nope.Svc/M", "12")] {
        let url = format!("http://{}{path}", gw.http());
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("frame.bin");
        std::fs::write(&body, frame).unwrap();
        let (ok, _, err) = curl(&[
            "--http2-prior-knowledge",
            "-v",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            &format!("@{}", body.display()),
            &url,
        ])
        .await;
        assert!(ok, "{err}");
        assert!(err.contains("< HTTP/2 200"), "{path}: {err}");
        assert!(err.contains(&format!("< grpc-status: {code}")), "{path}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_upstream_with_rewritten_authority() {
    let ca = Ca::new("grpcs-ca");
    let leaf = ca.leaf(&["greeter.internal"]);
    let s = GrpcServer::start(Some(&leaf)).await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /test.Greeter/*\n    upstream:\n      scheme: grpcs\n      pass_host: rewrite\n      upstream_host: greeter.internal\n      nodes: {}\n",
        nodes_yaml(&[s.addr])
    ));
    let rep = g::say_hello(gw.http(), hello("tls")).await.unwrap();
    assert_eq!(rep.message, "Hello tls");
    assert_eq!(rep.authority, "greeter.internal");
}

/// grpcs with `tls.verify` (against `ssl_trusted_certificate`) and a client certificate for a
/// node that requires one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_upstream_with_verification_and_client_certificate() {
    use support::certs::yaml_block;
    let ca = Ca::new("grpcs-mtls-ca");
    let (server, client) = (ca.leaf(&["greeter.internal"]), ca.leaf(&["strait-client"]));
    let s = GrpcServer::start_with(Some(&server), Some(&ca.pem)).await;
    let (_dir, config) = support::certs::trusting(BASE_CONFIG, &ca);
    let route = |uri: &str, host: &str, cert: bool| {
        let tls = if cert {
            format!(
                "      tls:\n        verify: true\n        client_cert: {}        client_key: {}",
                yaml_block(&client.cert, 10),
                yaml_block(&client.key, 10)
            )
        } else {
            String::new()
        };
        format!(
            "  - uri: {uri}\n    upstream:\n      scheme: grpcs\n      pass_host: rewrite\n      upstream_host: {host}\n{tls}      nodes: {}\n",
            nodes_yaml(&[s.addr])
        )
    };
    // Two routes to the same node: with and without a client certificate.
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "routes:\n{}{}",
            route("/test.Greeter/*", "greeter.internal", true),
            route("/nocert/*", "greeter.internal", false),
        ),
        1,
    );
    let rep = g::say_hello(gw.http(), hello("mtls")).await.unwrap();
    assert_eq!(rep.message, "Hello mtls");
    assert_eq!(rep.authority, "greeter.internal");

    // Without a client certificate the node refuses the handshake: a gRPC UNAVAILABLE.
    let (ok, _, err) = curl(&[
        "--http2-prior-knowledge",
        "-v",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        "",
        &format!("http://{}/nocert/M", gw.http()),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("< grpc-status: 14"), "{err}");

    // A wrong name fails verification the same way.
    gw.write_resources(&format!("routes:\n{}", route("/test.Greeter/*", "other.internal", true)));
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            g::say_hello(gw.http(), hello("x")).await.is_err_and(|e| e.code() == Code::Unavailable)
        })
        .await,
        "verification checks the node name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_v1_checks_take_a_not_serving_node_out() {
    let (a, b) = (GrpcServer::start(None).await, GrpcServer::start(None).await);
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: g\n    scheme: grpc\n    nodes: {}\n    checks:\n      active:\n        type: grpc\n        healthy: {{interval: 1, successes: 1}}\n        unhealthy: {{interval: 1, http_failures: 1}}\nroutes:\n  - uri: /test.Greeter/*\n    upstream_id: g\n",
        nodes_yaml(&[a.addr, b.addr])
    ));
    let status = |port: u16| {
        let gw = &gw;
        async move {
            let j = gw.control_json("/v1/healthcheck/upstreams/g").await;
            assert_eq!(j["type"], "grpc");
            j["nodes"].as_array().unwrap().iter().find(|n| n["port"] == port).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    b.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    assert!(
        eventually(Duration::from_secs(10), || async { status(b.addr.port()).await == "unhealthy" }).await
    );
    assert_eq!(status(a.addr.port()).await, "healthy");
    let before = b.calls();
    for _ in 0..6 {
        g::say_hello(gw.http(), hello("x")).await.unwrap();
    }
    assert_eq!(b.calls(), before, "a NOT_SERVING node gets no calls");
    b.health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    assert!(eventually(Duration::from_secs(10), || async { status(b.addr.port()).await == "healthy" }).await);
}

// ------------------------------------------------------------------------------------------
// grpc-transcode

fn transcode_resources(server: std::net::SocketAddr, proto_content: &str, extra: &str) -> String {
    let content = proto_content.lines().map(|l| format!("      {l}\n")).collect::<String>();
    format!(
        "protos:
  - id: greeter
    content: |
{content}upstreams:
  - id: g
    scheme: grpc
    nodes: {n}
routes:
  - uri: /hello
    upstream_id: g
    plugins:
      grpc-transcode:
        proto_id: greeter
        service: test.Greeter
        method: SayHello
{extra}  - uri: /hellos
    upstream_id: g
    plugins:
      grpc-transcode:
        proto_id: greeter
        service: test.Greeter
        method: StreamHellos
  - uri: /slow
    upstream_id: g
    plugins:
      grpc-transcode:
        proto_id: greeter
        service: test.Greeter
        method: SayHello
        deadline: 200
",
        n = nodes_yaml(&[server])
    )
}

async fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = http::Request::post(path)
        .header("host", "h")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send(addr, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_query_form_and_json_with_every_field_kind() {
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&transcode_resources(s.addr, g::PROTO, ""));

    let (status, headers, body) =
        get(gw.http(), "/hello?name=world&big=9007199254740993&kind=LARGE&tags=a&tags=b&inner.note=n").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/json");
    let j = json(&body);
    assert_eq!(j["message"], "Hello world");
    assert_eq!(j["big"].as_u64(), Some(9_007_199_254_740_993), "int64 as a number, exactly");
    assert_eq!(j["kind"], "LARGE");
    assert_eq!(j["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(j["inner"]["note"], "n");
    assert_eq!(j["empty"], serde_json::json!([]), "empty repeated fields are []");

    let form = http::Request::post("/hello")
        .header("host", "h")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(b"name=form&kind=1")))
        .unwrap();
    let (status, _, body) = send(gw.http(), form).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["message"], "Hello form");
    assert_eq!(json(&body)["kind"], "SMALL", "enum by number in, by name out");

    let (status, _, body) = post_json(
        gw.http(),
        "/hello",
        r#"{"name": "json", "big": "-42", "kind": 2, "inner": {"note": "deep", "values": [1, 2, 3]}, "scores": {"x": 5}, "unknown": 1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let j = json(&body);
    assert_eq!(j["big"], -42);
    assert_eq!(j["kind"], "LARGE");
    assert_eq!(j["inner"]["values"], serde_json::json!([1, 2, 3]));
    assert_eq!(j["scores"]["x"], 5);

    // PUT and PATCH carry JSON bodies too.
    for method in [http::Method::PUT, http::Method::PATCH] {
        let req = http::Request::builder()
            .method(method.clone())
            .uri("/hello")
            .header("host", "h")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"name": "verb"}"#)))
            .unwrap();
        let (status, _, body) = send(gw.http(), req).await;
        assert_eq!(status, StatusCode::OK, "{method}: {}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["message"], "Hello verb", "{method}");
    }

    let (status, _, _) = post_json(gw.http(), "/hello", r#"{"name": 5}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a type error in the input is a 400");
    let (status, _, _) = get(gw.http(), "/hello?big=notanumber").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// The gRPC node gets the client's host as `X-Forwarded-Host` whether the client spoke HTTP/1.1
/// (a Host header) or HTTP/2 (the request's authority, which the gRPC request used to lose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_sends_the_same_forwarding_headers_over_http1_and_http2() {
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&transcode_resources(s.addr, g::PROTO, ""));
    let port = gw.http().port();
    let want = format!("x-forwarded-host=shop.example:{port} x-forwarded-proto=http x-forwarded-port={port}");

    let (status, _, body) =
        get_host(gw.http(), "/hello?name=forwarded", &format!("shop.example:{port}")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["message"], want.as_str(), "over HTTP/1.1");

    let req = http::Request::get(format!("http://shop.example:{port}/hello?name=forwarded"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["message"], want.as_str(), "over HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_status_mapping_details_and_deadline() {
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&transcode_resources(
        s.addr,
        g::PROTO,
        "        show_status_in_body: true\n        status_detail_type: test.ErrorDetail\n",
    ));
    for (code, http) in [(5, 404), (14, 503), (3, 400), (16, 401), (7, 403)] {
        let (status, headers, body) = get(gw.http(), &format!("/hello?code={code}")).await;
        assert_eq!(status.as_u16(), http, "grpc {code}");
        assert_eq!(headers["grpc-status"], code.to_string());
        let j = json(&body);
        assert_eq!(j["error"]["code"], code);
        assert_eq!(j["error"]["message"], format!("failure {code}"));
        assert_eq!(j["error"]["details"][0]["retry_after"], 7);
        assert_eq!(j["error"]["details"][0]["reason"], "because the test said so");
    }
    let started = Instant::now();
    let (status, _, _) = get(gw.http(), "/slow?delay_ms=2000").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_millis(1500));
}

/// The plugin's `deadline` runs to the end of the answer, not only to its head: a node that
/// answers its head in time and its message too late gets the client a 504 (a unary method) or
/// a final DEADLINE_EXCEEDED line (a streaming one), not a 502 or UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_deadline_runs_to_the_end_of_the_answer() {
    let s = GrpcServer::start(None).await;
    // The same service, with `StreamHellos` declared unary: its head and first message come at
    // once, the rest of the answer `delay_ms` later.
    let unary = g::PROTO.replace(
        "returns (stream HelloReply);\n  rpc CollectHellos",
        "returns (HelloReply);\n  rpc CollectHellos",
    );
    assert_ne!(unary, g::PROTO);
    let indent = |p: &str| p.lines().map(|l| format!("      {l}\n")).collect::<String>();
    let resources = format!(
        "protos:
  - id: streaming
    content: |
{streaming}  - id: unary
    content: |
{unary}upstreams:
  - id: g
    scheme: grpc
    nodes: {n}
routes:
  - uri: /unary
    upstream_id: g
    plugins:
      grpc-transcode:
        proto_id: unary
        service: test.Greeter
        method: StreamHellos
        deadline: 300
  - uri: /streaming
    upstream_id: g
    plugins:
      grpc-transcode:
        proto_id: streaming
        service: test.Greeter
        method: StreamHellos
        deadline: 300
",
        streaming = indent(g::PROTO),
        unary = indent(&unary),
        n = nodes_yaml(&[s.addr])
    );
    let gw = TestGateway::start(&resources);
    let started = Instant::now();
    let (status, _, body) = get(gw.http(), "/unary?name=u&count=2&delay_ms=3000").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < Duration::from_millis(2500));

    let started = Instant::now();
    let (status, _, body) = get(gw.http(), "/streaming?name=s&count=2&delay_ms=3000").await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(2500));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&body).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["message"], "Hello s");
    assert_eq!(lines[1]["error"]["code"], 4);
    assert_eq!(lines[1]["error"]["http_status"], 504);
    // Within the deadline both answer whole.
    let (status, _, body) = get(gw.http(), "/streaming?name=s&count=2&delay_ms=10").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body).lines().count(), 2);
}

/// A transcoded call's gRPC status counts for the node's passive health as a gRPC client's
/// does: a node that fails every call with UNAVAILABLE (an HTTP 200 with `grpc-status: 14`) is
/// taken out after `http_failures` of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcoded_calls_count_for_passive_health_by_their_grpc_status() {
    let s = GrpcServer::start(None).await;
    let resources = transcode_resources(s.addr, g::PROTO, "").replace(
        "    scheme: grpc\n",
        "    scheme: grpc
    checks:
      active:
        type: tcp
        healthy: {interval: 60, successes: 1}
        unhealthy: {interval: 60, tcp_failures: 1}
      passive:
        unhealthy: {http_failures: 3}
",
    );
    let gw = TestGateway::start(&resources);
    assert_eq!(node_status(&gw, "g", s.addr.port()).await, "healthy");
    for i in 0..3 {
        let (status, _, _) = get(gw.http(), "/hello?code=14").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "call {i}");
    }
    assert_eq!(node_status(&gw, "g", s.addr.port()).await, "unhealthy");
}

/// A query or form key nested far deeper than any message needs (`inner.child.child...`, a
/// message type that holds itself) is a 400, not a stack overflow that takes the gateway
/// down; keys up to 32 parts deep are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_refuses_keys_nested_past_32_parts() {
    let s = GrpcServer::start(None).await;
    // `child` is a field the node does not know: it skips it.
    let proto = g::PROTO.replace(
        "message Inner {\n  string note = 1;",
        "message Inner {\n  string note = 1;\n  Inner child = 3;",
    );
    assert_ne!(proto, g::PROTO);
    let gw = TestGateway::start(&transcode_resources(s.addr, &proto, ""));
    let key = |depth: usize| format!("inner.{}note=n", "child.".repeat(depth));
    let (status, _, body) = get(gw.http(), &format!("/hello?name=ok&{}", key(30))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["message"], "Hello ok");
    // (Within nginx's 8 KiB request line: a longer one is a 414.)
    let (status, _, body) = get(gw.http(), &format!("/hello?name=deep&{}", key(1_000))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("more than 32 nested fields"));
    let form = http::Request::post("/hello")
        .header("host", "h")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(key(500_000))))
        .unwrap();
    let (status, _, _) = send(gw.http(), form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = get(gw.http(), "/hello?name=after").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_server_streaming_as_ndjson_and_sse_with_mid_stream_errors() {
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&transcode_resources(s.addr, g::PROTO, ""));
    let (status, headers, body) = get(gw.http(), "/hellos?name=s&count=3").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&body).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["index"], 2);

    let req = http::Request::get("/hellos?name=s&count=2&code=13")
        .header("host", "h")
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = send(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    let text = String::from_utf8_lossy(&body).to_string();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events[0].starts_with("data: {"));
    let last: serde_json::Value = serde_json::from_str(events[2].trim_start_matches("data: ")).unwrap();
    assert_eq!(last["error"]["code"], 13);
    assert_eq!(last["error"]["message"], "failure 13");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_with_a_descriptor_set_that_has_imports() {
    // Two files: the messages in common.proto, imported by greeter.proto.
    let header = "syntax = \"proto3\";\npackage test;\n";
    let (service_at, kind_at) =
        (g::PROTO.find("service Greeter").unwrap(), g::PROTO.find("enum Kind").unwrap());
    let common_src = format!("{header}{}", &g::PROTO[kind_at..]);
    let greeter_src = format!("{header}import \"common.proto\";\n{}", &g::PROTO[service_at..kind_at]);
    struct Files(Vec<(String, String)>);
    impl protox::file::FileResolver for Files {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match self.0.iter().find(|(n, _)| n == name) {
                Some((n, s)) => protox::file::File::from_source(n, s),
                None => Err(protox::Error::file_not_found(name)),
            }
        }
    }
    let mut compiler = protox::Compiler::with_file_resolver(Files(vec![
        ("common.proto".into(), common_src),
        ("greeter.proto".into(), greeter_src),
    ]));
    compiler.include_imports(true);
    compiler.open_file("greeter.proto").unwrap();
    let set = base64::engine::general_purpose::STANDARD.encode(compiler.encode_file_descriptor_set());

    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&transcode_resources(s.addr, &set, ""));
    let (status, _, body) = get(gw.http(), "/hello?name=set&kind=SMALL").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["message"], "Hello set");
    assert_eq!(json(&body)["kind"], "SMALL");
}

/// gRPC clients reach gRPC routes over TLS on the `ssl.listen` ports, negotiating h2 by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_alpn_h2_on_the_tls_port() {
    use support::certs::yaml_block;
    let ca = Ca::new("test-ca");
    let leaf = ca.leaf(&["grpc.example.com"]);
    let s = GrpcServer::start(None).await;
    let conf = BASE_CONFIG.replace(
        "  control:",
        "  ssl:\n    enable: true\n    listen:\n      - ip: 127.0.0.1\n        port: 0\n  control:",
    );
    let gw = TestGateway::start_with(
        &conf,
        &format!(
            "ssls:\n  - snis: [grpc.example.com]\n    cert: {}    key: {}{}",
            yaml_block(&leaf.cert, 6),
            yaml_block(&leaf.key, 6),
            grpc_route(&nodes_yaml(&[s.addr]), "")
        ),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    // One length-prefixed HelloRequest { name: "tls" }.
    let body = dir.path().join("frame.bin");
    std::fs::write(&body, [0u8, 0, 0, 0, 5, 0x0a, 3, b't', b'l', b's']).unwrap();
    let port = gw.tls().port();
    let (ok, out, err) = curl(&[
        "--http2",
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &format!("grpc.example.com:{port}:127.0.0.1"),
        "-v",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("https://grpc.example.com:{port}/test.Greeter/SayHello"),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("ALPN: server accepted h2"), "{err}");
    assert!(err.contains("< HTTP/2 200"), "{err}");
    assert!(err.contains("< grpc-status: 0"), "the trailers reach the client: {err}");
    assert!(out.contains("Hello tls"), "{out:?}");
}

/// grpc-transcode with mangled JSON bodies, forms and query strings (numbers out of range,
/// wrong types, broken escapes, deep nesting): each gets an answer (a 400 for what cannot be
/// a request message) and nothing panics; the route serves a clean request afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_with_mangled_requests_answers_each_and_never_panics() {
    use std::sync::atomic::Ordering;
    let panics = count_panics();
    let s = GrpcServer::start(None).await;
    let gw = TestGateway::start(&transcode_resources(s.addr, g::PROTO, ""));
    let deep = format!("{}1{}", "{\"inner\":".repeat(200), "}".repeat(200));
    let bodies: [&[u8]; 5] = [
        br#"{"name": "json", "big": "-42", "kind": 2, "inner": {"note": "deep", "values": [1, 2, 3]}, "scores": {"x": 5}, "tags": ["a"]}"#,
        br#"{"name": "\u00e9\ud83d\ude00", "count": 2147483647, "big": 9223372036854775807, "kind": "LARGE"}"#,
        b"name=form&kind=1&tags=a&tags=b&inner.note=n",
        b"name=x&big=9007199254740993&inner.values=1&inner.values=2",
        deep.as_bytes(),
    ];
    let mut rng = Rng(0x5eed_7c0d_e000_0001);
    let rounds = mangle_rounds(300);
    for round in 0..rounds {
        let pick = rng.below(bodies.len());
        let body = mangle(&mut rng, bodies[pick]);
        let (path, content_type) = match pick {
            2 | 3 if rng.below(2) == 0 => {
                // As a query string instead of a form.
                let query: String =
                    body.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '%' }).collect();
                (format!("/hello?{query}"), None)
            }
            2 | 3 => ("/hello".to_string(), Some("application/x-www-form-urlencoded")),
            _ => ("/hello".to_string(), Some("application/json")),
        };
        let Ok(uri) = path.parse::<http::Uri>() else { continue };
        let mut req = http::Request::post(uri).header("host", "h");
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let (status, _, answer) =
            send(gw.http(), req.body(Full::new(Bytes::from(body.clone()))).unwrap()).await;
        assert!(
            status.is_success() || status.is_client_error() || status.is_server_error(),
            "round {round}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        assert_eq!(
            panics.load(Ordering::SeqCst),
            0,
            "round {round}: a panic (see above) for {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _, body) = post_json(gw.http(), "/hello", r#"{"name": "clean"}"#).await;
    assert_eq!((status, json(&body)["message"].as_str()), (StatusCode::OK, Some("Hello clean")));
}

/// A gRPC node whose answers are mangled (message frames cut, lengths made huge, stray bytes;
/// `grpc-status` and `grpc-message` trailers garbled or missing): gRPC clients get a status,
/// grpc-transcode clients an HTTP answer, each call ends, and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_node_with_mangled_answers_gets_each_call_a_status_and_never_a_panic() {
    use prost::Message;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    let panics = count_panics();
    // The node's next answer: its body bytes, and its trailers as (name, value) pairs.
    type Answer = (Vec<u8>, Vec<(String, Vec<u8>)>);
    let next: Arc<Mutex<Answer>> = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = listener.local_addr().unwrap();
    let answers = next.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answers = answers.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let (body, trailers) = answers.lock().unwrap().clone();
                    async move {
                        let mut map = http::HeaderMap::new();
                        for (name, value) in trailers {
                            if let (Ok(n), Ok(v)) = (
                                http::HeaderName::from_bytes(name.as_bytes()),
                                http::HeaderValue::from_bytes(&value),
                            ) {
                                map.append(n, v);
                            }
                        }
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(body))),
                            Ok(hyper::body::Frame::trailers(map)),
                        ];
                        let mut resp = http::Response::new(http_body_util::StreamBody::new(
                            futures_util::stream::iter(frames),
                        ));
                        resp.headers_mut()
                            .insert("content-type", http::HeaderValue::from_static("application/grpc"));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .http2_only();
                let _ = b.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
            });
        }
    });
    let gw = TestGateway::start(
        &transcode_resources(node, g::PROTO, "")
            .replace("routes:\n", "routes:\n  - uri: /test.Greeter/*\n    upstream_id: g\n"),
    );
    let reply = HelloReply { message: "Hello mangled".into(), ..Default::default() }.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(reply.len() as u32).to_be_bytes());
    frame.extend_from_slice(&reply);
    let rounds = mangle_rounds(200);
    let mut rng = Rng(0x5eed_96c0_0000_0001);
    // gRPC calls failed / answered, transcoded calls failed / answered 200.
    let mut outcomes = [0usize; 4];
    for round in 0..rounds {
        let body = if rng.below(3) == 0 { frame.clone() } else { mangle(&mut rng, &frame) };
        let status = [&b"0"[..], b"13", b"14"][rng.below(3)];
        let status = if rng.below(3) == 0 { mangle(&mut rng, status) } else { status.to_vec() };
        let mut trailers = vec![("grpc-status".to_string(), status)];
        if rng.below(2) == 0 {
            trailers.push(("grpc-message".into(), mangle(&mut rng, b"bad%20thing")));
        }
        if rng.below(6) == 0 {
            trailers.clear();
        }
        *next.lock().unwrap() = (body, trailers);
        let call = tokio::time::timeout(
            Duration::from_secs(15),
            g::say_hello(gw.http(), HelloRequest { name: "x".into(), ..Default::default() }),
        )
        .await;
        let Ok(call) = call else { panic!("round {round}: the gRPC call never ended") };
        outcomes[usize::from(call.is_ok())] += 1;
        let transcoded = tokio::time::timeout(
            Duration::from_secs(15),
            post_json(gw.http(), "/hello", "{\"name\": \"x\"}"),
        )
        .await;
        let Ok((status, ..)) = transcoded else { panic!("round {round}: the transcoded call never ended") };
        outcomes[2 + usize::from(status == StatusCode::OK)] += 1;
        assert_eq!(panics.load(Ordering::SeqCst), 0, "round {round}: a panic (see above)");
    }
    assert!(outcomes.iter().all(|n| *n > 0), "both outcomes for both clients: {outcomes:?}");
}

/// A gRPC node that resets a call's stream after its head (its handler failed) gets the client
/// the status gRPC's HTTP/2 transport maps that reset to (INTERNAL_ERROR: INTERNAL), not
/// UNAVAILABLE, which clients retry as if the node had never seen the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resetting_a_call_after_its_head_gives_the_mapped_status() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let _ = req;
                    let head = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    if let Ok(mut send) = respond.send_response(head, false) {
                        let _ = send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), false);
                        send.send_reset(h2::Reason::INTERNAL_ERROR);
                    }
                }
            });
        }
    });
    let gw = TestGateway::start(&grpc_route(&nodes_yaml(&[node]), ""));
    let e = g::say_hello(gw.http(), hello("x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
}
