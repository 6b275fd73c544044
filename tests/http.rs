//! The HTTP gateway end to end: routing, HTTP/1.1 and h2c, forwarding headers, pooling,
//! streaming, retries, timeouts, errors, WebSocket, malformed traffic.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;

fn body(b: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(b.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_http1_with_forwarding_headers_and_host() {
    let b = Backend::start("b1").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /api/*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let req = Request::get("/api/items?x=1")
        .header("host", "shop.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("connection", "x-hop2")
        .header("x-hop2", "secret too")
        .body(body(""))
        .unwrap();
    let (status, headers, body) = send(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-backend"], "b1");
    let j = json(&body);
    assert_eq!(j["uri"], "/api/items?x=1");
    let h = &j["headers"];
    assert_eq!(h["host"], "shop.example", "pass_host: pass forwards the client's Host");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["x-forwarded-port"], gw.http().port().to_string());
    assert!(h.get("x-hop").is_none(), "headers named in Connection are hop-by-hop");
    assert!(h.get("x-hop2").is_none(), "every Connection header counts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_apisix_404_json_and_grpc_clients_get_a_grpc_status() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /only\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let (status, headers, body) = get(gw.http(), "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(json(&body), serde_json::json!({"error_msg": "404 Route Not Found"}));

    let req = Request::post(format!("http://{}/pkg.Svc/Method", gw.http()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let (status, headers, _, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "12", "UNIMPLEMENTED for an unknown method");

    // An HTTP/2 upload without a route is answered (after 200 ms without more of the body), and
    // its stream ends cleanly.
    h2_uploads_go_on_after_the_answer(gw.http(), "/nope", StatusCode::NOT_FOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_the_same_port_with_hyper_and_curl() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let req = Request::get(format!("http://{}/h2?q=1", gw.http())).body(body("")).unwrap();
    let (status, _, body, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    let j = json(&body);
    assert_eq!(j["uri"], "/h2?q=1");
    assert_eq!(j["version"], "HTTP/1.1", "the node is spoken to over HTTP/1.1");

    let url = format!("http://{}/curl", gw.http());
    let (ok, out, err) = curl(&["--http2-prior-knowledge", "-w", "\n%{http_version}", &url]).await;
    assert!(ok, "{err}");
    assert!(out.ends_with("\n2"), "curl spoke HTTP/2: {out}");
    let (ok, out, _) = curl(&["--http1.1", "-w", "\n%{http_version}", &url]).await;
    assert!(ok && out.ends_with("\n1.1"), "{out}");
}

/// nghttp2's h2load, a real HTTP/2 client, multiplexes 16 streams on each of 4 connections
/// through the gateway: every GET succeeds, and so does every upload, whose bodies come back
/// whole from an echoing node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_multiplexed_gets_and_uploads_all_succeed() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let h2load = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("h2load")
            .args(&args)
            .output()
            .await
            .expect("h2load (Debian's nghttp2-client, installed by scripts/install-test-deps.sh)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = format!("http://{}/get", gw.http());
    let out = h2load(["-n", "4000", "-c", "4", "-m", "16", &url].map(String::from).to_vec()).await;
    assert!(out.contains("4000 succeeded, 0 failed, 0 errored, 0 timeout"), "{out}");
    assert!(out.contains("status codes: 4000 2xx, 0 3xx, 0 4xx, 0 5xx"), "{out}");

    // 100 KiB uploads, echoed: each body crosses the gateway both ways.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, (0..100 * 1024u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let url = format!("http://{}/echo", gw.http());
    let file = file.to_string_lossy().into_owned();
    let out = h2load(["-n", "400", "-c", "2", "-m", "8", "-d", &file, &url].map(String::from).to_vec()).await;
    assert!(out.contains("400 succeeded, 0 failed, 0 errored, 0 timeout"), "{out}");
    assert!(out.contains("status codes: 400 2xx"), "{out}");
    assert!(out.contains(&format!("({}) data", 400 * 100 * 1024)), "every body came back whole: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pool_reuses_node_connections() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!("routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n", nodes_yaml(&[b.addr])),
        1,
    );
    for _ in 0..20 {
        let (status, _, _) = get(gw.http(), "/x").await;
        assert_eq!(status, StatusCode::OK);
    }
    // Answers to h2c clients whose body came whole with the node's head leave the node
    // connection in the pool at once, too.
    for i in 0..20 {
        let req = Request::get(format!("http://{}/size/{i}", gw.http())).body(body("")).unwrap();
        let (status, headers, body, _) = send_h2(gw.http(), req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), i, "body of /size/{i}");
        assert_eq!(headers["content-length"], i.to_string());
    }
    // Small bodies from h2c clients are read whole and sent with their head over the same
    // node connection.
    for i in 0..20 {
        let data = Bytes::from(vec![b'a' + i as u8; 1000 + i]);
        let req = Request::post(format!("http://{}/echo", gw.http())).body(Full::new(data.clone())).unwrap();
        let (status, _, back, _) = send_h2(gw.http(), req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(back == data, "h2c echo {i}");
    }
    assert_eq!(b.state.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Bodies bigger than the relay reads whole are streamed to the node, over the same pooled
    // connection.
    for i in 0..20 {
        let data = Bytes::from(vec![b'a' + i as u8; 100 << 10]);
        let req = Request::post("/echo").header("host", "h").body(Full::new(data.clone())).unwrap();
        let (status, _, back) = send(gw.http(), req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(back == data, "echo {i}");
    }
    assert_eq!(b.requests(), 80);
    assert_eq!(
        b.state.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one pooled connection for 20 sequential HTTP/1.1 requests, 40 h2c ones and 20 with \
         large bodies"
    );
    // 8 clients uploading at once, 10 bodies each, to a node that reads each body whole before
    // it answers: at most one node connection per client.
    let uploads: Vec<_> = (0..8)
        .map(|c| {
            let gw = gw.http();
            tokio::spawn(async move {
                for i in 0..10 {
                    let data = Bytes::from(vec![b'u'; 100 << 10]);
                    let req = Request::post("/sink").header("host", "h").body(Full::new(data)).unwrap();
                    let (status, _, back) = send(gw, req).await;
                    assert_eq!(
                        (status, &back[..]),
                        (StatusCode::OK, &b"102400"[..]),
                        "client {c}, upload {i}"
                    );
                }
            })
        })
        .collect();
    for u in uploads {
        u.await.unwrap();
    }
    let conns = b.state.connections.load(std::sync::atomic::Ordering::Relaxed);
    assert!(conns <= 2 + 8, "{conns} node connections for 8 clients uploading 10 bodies each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    // 8 MiB echoed back byte for byte.
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post("/echo").header("host", "h").body(Full::new(Bytes::from(data.clone()))).unwrap();
    let (status, _, back) = send(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(back == data, "echoed body differs ({} bytes back)", back.len());

    // The first chunk arrives before the node finishes the body.
    let stream = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let start = Instant::now();
    let resp = sender
        .send_request(Request::get("/slow-body").header("host", "h").body(body("")).unwrap())
        .await
        .unwrap();
    slow_body_streams(resp, start).await;
}

/// `/slow-body` as it reaches the client: the first chunk before the node has sent the second
/// (within 250 ms of `start`), then the rest.
async fn slow_body_streams(resp: http::Response<hyper::body::Incoming>, start: Instant) {
    use http_body_util::BodyExt;
    let mut incoming = resp.into_body();
    let first = incoming.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first;");
    assert!(start.elapsed() < Duration::from_millis(250), "first chunk was held back: {:?}", start.elapsed());
    let rest = incoming.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second");
}

/// A hyper HTTP/2 (h2c) client connection to `addr`.
async fn h2c_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_to_another_node_on_connect_failure() {
    let dead = closed_port();
    let b = Backend::start("alive").await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    type: roundrobin\n    nodes: {}\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        nodes_yaml(&[dead, b.addr])
    ));
    for _ in 0..6 {
        let req = Request::post("/echo").header("host", "h").body(body("payload")).unwrap();
        let (status, _, body) = send(gw.http(), req).await;
        assert_eq!(status, StatusCode::OK, "a refused node is retried on the other node");
        assert_eq!(&body[..], b"payload");
    }
    assert_eq!(b.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_was_sent_is_never_sent_again() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!(
            "upstreams:\n  - id: u\n    retries: 3\n    nodes: {}\nroutes:\n  - uri: /*\n    upstream_id: u\n",
            nodes_yaml(&[a.addr, b.addr])
        ),
        1,
    );
    // `/drop` reads the body and closes without answering: POST must not be replayed.
    let mut failed = 0;
    for _ in 0..4 {
        let req = Request::post("/drop").header("host", "h").body(body("once")).unwrap();
        let (status, _, _) = send(gw.http(), req).await;
        if status == StatusCode::BAD_GATEWAY {
            failed += 1;
        }
    }
    assert_eq!(failed, 4);
    assert_eq!(a.requests() + b.requests(), 4, "each POST reached exactly one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_502_503_504() {
    let b = Backend::start("slow").await;
    let (garbage, _g) = garbage_server(b"NOT HTTP AT ALL\r\n\r\n").await;
    let dead = closed_port();
    let gw = TestGateway::start(&format!(
        "routes:
  - uri: /refused
    upstream: {{nodes: {}}}
  - uri: /garbage
    upstream: {{nodes: {}}}
  - uri: /empty
    upstream: {{nodes: {{}}}}
  - uri: /delay/*
    timeout: {{connect: 1, send: 1, read: 0.3}}
    upstream: {{nodes: {}}}
",
        nodes_yaml(&[dead]),
        nodes_yaml(&[garbage]),
        nodes_yaml(&[b.addr])
    ));
    assert_eq!(get(gw.http(), "/refused").await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(get(gw.http(), "/garbage").await.0, StatusCode::BAD_GATEWAY);
    let (status, _, body) = get(gw.http(), "/empty").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("no valid upstream node"));
    let start = Instant::now();
    assert_eq!(get(gw.http(), "/delay/2000").await.0, StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() < Duration::from_millis(1500), "read timeout of the route applies");
    assert_eq!(get(gw.http(), "/delay/10").await.0, StatusCode::OK);
}

/// APISIX's `X-APISIX-Upstream-Status`: every attempt's status (nginx's `$upstream_status`)
/// on answers whose last status is a 5xx, none on the others; and a retry that finds no node
/// left (`retries` beyond the node count) is a 502 where running out of retries keeps the last
/// attempt's 504. HTTP/1.1 clients (the relay) and HTTP/2 clients (the general path) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_header_and_retries_beyond_the_nodes() {
    let slow = [Backend::start("s0").await, Backend::start("s1").await];
    let ok = Backend::start("ok").await;
    let dead = closed_port();
    let slow_yaml = nodes_yaml(&[slow[0].addr, slow[1].addr]);
    let gw = TestGateway::start(&format!(
        "routes:
  - uri: /delay/*
    timeout: {{connect: 1, send: 1, read: 0.3}}
    upstream: {{nodes: {slow_yaml}}}
  - uri: /delay/*
    host: more
    timeout: {{connect: 1, send: 1, read: 0.3}}
    upstream: {{retries: 3, nodes: {slow_yaml}}}
  - uri: /status/*
    upstream:
      nodes:
        - {{host: 127.0.0.1, port: {}, weight: 1, priority: 1}}
        - {{host: 127.0.0.1, port: {}, weight: 1, priority: 0}}
  - uri: /status/*
    host: one
    upstream: {{nodes: {}}}
",
        dead.port(),
        ok.addr.port(),
        nodes_yaml(&[ok.addr])
    ));
    let h2 = |path: &str| {
        let req = Request::get(format!("http://localhost{path}")).body(Full::new(Bytes::new())).unwrap();
        send_h2(gw.http(), req)
    };
    let h2_more = || {
        let req = Request::get("http://more/delay/2000").body(Full::new(Bytes::new())).unwrap();
        send_h2(gw.http(), req)
    };
    let shown = |headers: &http::HeaderMap| {
        headers.get("x-apisix-upstream-status").map(|v| v.to_str().unwrap_or("?").to_string())
    };
    for http2 in [false, true] {
        let (status, headers) = if http2 {
            let (s, h, ..) = h2("/delay/2000").await;
            (s, h)
        } else {
            let (s, h, _) = get(gw.http(), "/delay/2000").await;
            (s, h)
        };
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "http2 {http2}: the retries ran out first");
        assert_eq!(shown(&headers).as_deref(), Some("504, 504"), "http2 {http2}");

        let (status, headers) = if http2 {
            let (s, h, ..) = h2_more().await;
            (s, h)
        } else {
            let (s, h, _) = get_host(gw.http(), "/delay/2000", "more").await;
            (s, h)
        };
        assert_eq!(status, StatusCode::BAD_GATEWAY, "http2 {http2}: no node left to retry");
        // nginx's mark for the retry that got no node.
        assert_eq!(shown(&headers).as_deref(), Some("504, 504 :"), "http2 {http2}");

        // The higher-priority node refuses: its 502, then the other node's own answer.
        for (path, want, header) in
            [("/status/503", 503, Some("502, 503")), ("/status/200", 200, None), ("/status/404", 404, None)]
        {
            let (status, headers) = if http2 {
                let (s, h, ..) = h2(path).await;
                (s, h)
            } else {
                let (s, h, _) = get(gw.http(), path).await;
                (s, h)
            };
            assert_eq!(status.as_u16(), want, "http2 {http2} {path}");
            assert_eq!(shown(&headers).as_deref(), header, "http2 {http2} {path}");
        }
    }
    // A first attempt's 5xx: its status alone.
    let (status, headers, _) = get_host(gw.http(), "/status/500", "one").await;
    assert_eq!((status.as_u16(), shown(&headers).as_deref()), (500, Some("500")));
    // Streamed request bodies (HTTP/1.1 chunked, HTTP/2 past the 64 KiB read whole) take the
    // relay's streaming paths: the refused connect is retried, and both statuses are shown.
    let chunked = Request::post("/status/503")
        .header("host", "h")
        .header("transfer-encoding", "chunked")
        .body(body("payload"))
        .unwrap();
    let (status, headers, _) = send(gw.http(), chunked).await;
    assert_eq!((status.as_u16(), shown(&headers).as_deref()), (503, Some("502, 503")));
    let large =
        Request::post("http://h/status/503").body(Full::new(Bytes::from(vec![b'x'; 100_000]))).unwrap();
    let (status, headers, ..) = send_h2(gw.http(), large).await;
    assert_eq!((status.as_u16(), shown(&headers).as_deref()), (503, Some("502, 503")));
    // A gateway error that never reached a node has no such header.
    let (status, headers, _) = get(gw.http(), "/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(shown(&headers), None);
    assert_eq!(slow[0].requests() + slow[1].requests(), 8, "each slow request tried both nodes once");
}

/// `apisix.show_upstream_status_in_response_header: true`: every proxied answer carries
/// `X-APISIX-Upstream-Status`, not only 5xx ones; the gateway's own answers (no route) none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_on_every_answer_when_asked() {
    let ok = Backend::start("ok").await;
    let dead = closed_port();
    let config =
        BASE_CONFIG.replace("  control:", "  show_upstream_status_in_response_header: true\n  control:");
    assert_ne!(config, BASE_CONFIG);
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "routes:\n  - uri: /status/*\n    upstream:\n      nodes:\n        - {{host: 127.0.0.1, port: {}, weight: 1, priority: 1}}\n        - {{host: 127.0.0.1, port: {}, weight: 1, priority: 0}}\n  - uri: /one/*\n    upstream: {{nodes: {}}}\n",
            dead.port(),
            ok.addr.port(),
            nodes_yaml(&[ok.addr])
        ),
        1,
    );
    let shown = |headers: &http::HeaderMap| {
        headers.get("x-apisix-upstream-status").map(|v| v.to_str().unwrap_or("?").to_string())
    };
    for http2 in [false, true] {
        for (path, want) in [("/one/x", Some("200")), ("/status/204", Some("502, 204")), ("/nowhere", None)] {
            let headers = if http2 {
                let req = Request::get(format!("http://h{path}")).body(body("")).unwrap();
                send_h2(gw.http(), req).await.1
            } else {
                get(gw.http(), path).await.1
            };
            assert_eq!(shown(&headers).as_deref(), want, "http2 {http2} {path}");
        }
    }
}

/// nginx's default `large_client_header_buffers 4 8k`, which APISIX keeps: a request line over
/// 8 KiB is a 414, a header line over 8 KiB a 400, over HTTP/1.1 (the relay and, with a head
/// the relay hands on, the general path) and HTTP/2 alike; lines just within pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_header_lines_over_8_kib_get_nginx_answers() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let status = |answer: Vec<u8>| String::from_utf8_lossy(&answer).lines().next().unwrap_or("").to_string();
    let addr = gw.http();
    let h1 = |path: String, extra: String| async move {
        let req = format!("GET {path} HTTP/1.1\r\nHost: h\r\n{extra}Connection: close\r\n\r\n");
        raw(addr, req.as_bytes(), Duration::from_secs(10)).await
    };
    // `GET /aaa... HTTP/1.1\r\n`: 8,192 bytes fit, 8,193 do not.
    let fits = format!("/{}", "a".repeat(8192 - 16));
    let over = format!("/{}", "a".repeat(8192 - 15));
    assert!(status(h1(fits.clone(), String::new()).await).starts_with("HTTP/1.1 200"));
    assert!(status(h1(over.clone(), String::new()).await).starts_with("HTTP/1.1 414"));
    // `X-Big: vvv...\r\n`: the same.
    let fits_header = format!("X-Big: {}\r\n", "v".repeat(8192 - 9));
    let over_header = format!("X-Big: {}\r\n", "v".repeat(8192 - 8));
    assert!(status(h1("/x".into(), fits_header.clone()).await).starts_with("HTTP/1.1 200"));
    let answer = h1("/x".into(), over_header.clone()).await;
    assert!(status(answer.clone()).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("Request Header Or Cookie Too Large"));
    // Long heads of lines within the limit pass, up to 32 KiB in all (nginx's four buffers);
    // past that a 431.
    let padding =
        |n: usize| (0..n).map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(7000))).collect::<String>();
    assert!(status(h1("/x".into(), padding(4)).await).starts_with("HTTP/1.1 200"));
    assert!(status(h1("/x".into(), padding(5)).await).starts_with("HTTP/1.1 431"));
    // HTTP/2.
    let h2 = |path: &str, header: Option<String>| {
        let mut req = Request::get(format!("http://h{path}"));
        if let Some(v) = header {
            req = req.header("x-big", v);
        }
        send_h2(gw.http(), req.body(Full::new(Bytes::new())).unwrap())
    };
    assert_eq!(h2(&fits, None).await.0, StatusCode::OK);
    assert_eq!(h2(&over, None).await.0, StatusCode::URI_TOO_LONG);
    assert_eq!(h2("/x", Some("v".repeat(8192 - 9))).await.0, StatusCode::OK);
    assert_eq!(h2("/x", Some("v".repeat(8192 - 8))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(b.requests(), 5, "only the requests within the limits reached the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_host_node_and_rewrite() {
    let b = Backend::start("b").await;
    let port = b.addr.port();
    let gw = TestGateway::start(&format!(
        "routes:
  - uri: /node
    upstream: {{pass_host: node, nodes: [{{host: localhost, port: {port}, weight: 1}}]}}
  - uri: /rewrite
    upstream: {{pass_host: rewrite, upstream_host: api.internal, nodes: {}}}
",
        nodes_yaml(&[b.addr])
    ));
    // `localhost` is resolved off the request path; wait until the node is known.
    assert!(
        eventually(Duration::from_secs(5), || async { get(gw.http(), "/node").await.0 == StatusCode::OK })
            .await
    );
    let (_, _, body) = get_host(gw.http(), "/node", "client.example").await;
    assert_eq!(json(&body)["headers"]["host"], format!("localhost:{port}"));
    let (_, _, body) = get_host(gw.http(), "/rewrite", "client.example").await;
    assert_eq!(json(&body)["headers"]["host"], "api.internal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_only_where_enabled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /ws\n    enable_websocket: true\n    upstream: {{nodes: {n}}}\n  - uri: /nows\n    upstream: {{nodes: {n}}}\n",
        n = nodes_yaml(&[b.addr])
    ));
    let mut s = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut got = vec![0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"ping through the tunnel");

    let out = raw(
        gw.http(),
        b"GET /nows HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.starts_with("HTTP/1.1 101"), "no upgrade without enable_websocket: {text}");
}

/// A WebSocket tunnel open when the gateway is told to stop counts as a live connection, as
/// nginx's graceful stop keeps upgraded connections: the tunnel keeps working while the gateway
/// drains, and the stop completes once it closes (within the drain timeout, 5 s in the tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_drains_an_open_websocket_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    let mut gw = TestGateway::start(&format!(
        "routes:\n  - uri: /ws\n    enable_websocket: true\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let addr = gw.http();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf[..n]));
    async fn echo(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Option<bool> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(4), s.read_exact(&mut got)).await.ok()?.ok()?;
        Some(got == msg)
    }
    assert_eq!(echo(&mut s, b"before the stop").await, Some(true));

    let stopping = tokio::task::spawn_blocking(move || gw.shutdown());
    // The stop has begun once the listener refuses new connections.
    let refused =
        eventually(Duration::from_secs(4), || async { tokio::net::TcpStream::connect(addr).await.is_err() })
            .await;
    assert!(refused, "the listener still accepts after the stop");
    assert_eq!(echo(&mut s, b"while draining").await, Some(true), "the tunnel was cut by the stop");
    assert!(!stopping.is_finished(), "the stop did not wait for the open tunnel");
    drop(s);
    let stopped = tokio::time::timeout(Duration::from_secs(4), stopping).await;
    assert!(stopped.is_ok(), "the stop did not end once the tunnel closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_and_slow_clients() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let out = raw(gw.http(), b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n", Duration::from_secs(2)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&out));

    let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let out = raw(gw.http(), big.as_bytes(), Duration::from_secs(2)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"), "{}", String::from_utf8_lossy(&out));

    // A client that never finishes its headers is cut off after client_header_timeout (2 s).
    let start = Instant::now();
    let out = raw(gw.http(), b"GET / HTTP/1.1\r\nHost: h\r\n", Duration::from_secs(6)).await;
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(5), "slow client kept for {elapsed:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");

    // The gateway still serves others.
    assert_eq!(get(gw.http(), "/fine").await.0, StatusCode::OK);
    assert_eq!(b.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_the_body_is_a_504_after_the_send_timeout() {
    // The node accepts and then reads nothing: once the socket buffers are full, every write
    // to it stalls.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = l.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /upload\n    timeout: {{connect: 1, send: 1, read: 30}}\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    // Over h2c, so the early answer comes back on the stream while the body is still unsent.
    let start = Instant::now();
    let req = Request::post(format!("http://{}/upload", gw.http()))
        .body(Full::new(Bytes::from(vec![b'x'; 64 << 20])))
        .unwrap();
    let (status, _, _, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() < Duration::from_secs(20), "the send timeout, not the 30 s read timeout");
}

/// A listener whose accept queue is full: further connection attempts get no answer at all,
/// so connecting to it times out (the listener and the queued connection stay open).
async fn blackhole() -> (SocketAddr, tokio::net::TcpListener, tokio::net::TcpStream) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let queued = tokio::net::TcpStream::connect(addr).await.unwrap();
    (addr, l, queued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_is_a_504_and_the_next_node_is_tried() {
    let (hole, _l, _q) = blackhole().await;
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:
  - uri: /alone
    timeout: {{connect: 0.3, send: 5, read: 5}}
    upstream: {{nodes: {}}}
  - uri: /pair
    timeout: {{connect: 0.3, send: 5, read: 5}}
    upstream: {{nodes: {}}}
",
        nodes_yaml(&[hole]),
        nodes_yaml(&[hole, b.addr])
    ));
    let start = Instant::now();
    assert_eq!(get(gw.http(), "/alone").await.0, StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() < Duration::from_secs(3), "the connect timeout of the route applies");
    for _ in 0..4 {
        let (status, headers, _) = get(gw.http(), "/pair").await;
        assert_eq!(status, StatusCode::OK, "a node that does not answer the connect is retried");
        assert_eq!(headers["x-backend"], "b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_route_is_not_matched() {
    let (on, off) = (Backend::start("on").await, Backend::start("off").await);
    let gw = TestGateway::start(&format!(
        "routes:
  - uri: /x
    priority: 10
    status: 0
    upstream: {{nodes: {}}}
  - uri: /x
    upstream: {{nodes: {}}}
  - uri: /only-disabled
    status: 0
    upstream: {{nodes: {}}}
",
        nodes_yaml(&[off.addr]),
        nodes_yaml(&[on.addr]),
        nodes_yaml(&[off.addr])
    ));
    let (status, headers, _) = get(gw.http(), "/x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-backend"], "on", "status: 0 takes the route out of matching");
    assert_eq!(get(gw.http(), "/only-disabled").await.0, StatusCode::NOT_FOUND);
    assert_eq!(off.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pool_requests_limits_how_long_a_node_connection_lives() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!(
            "routes:\n  - uri: /*\n    upstream:\n      keepalive_pool: {{size: 4, idle_timeout: 60, requests: 3}}\n      nodes: {}\n",
            nodes_yaml(&[b.addr])
        ),
        1,
    );
    for _ in 0..9 {
        assert_eq!(get(gw.http(), "/x").await.0, StatusCode::OK);
    }
    assert_eq!(
        b.state.connections.load(std::sync::atomic::Ordering::Relaxed),
        3,
        "9 sequential requests at 3 per connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_http2_false_serves_http1_only() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start_with(
        &BASE_CONFIG.replace("      port: 0\n", "      port: 0\n      enable_http2: false\n"),
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[b.addr])),
        1,
    );
    let url = format!("http://{}/x", gw.http());
    let (ok, out, _) = curl(&["-o", "/dev/null", "-w", "%{http_version}", &url]).await;
    assert!(ok && out == "1.1", "HTTP/1.1 is served: {out}");
    let (ok, out, _) =
        curl(&["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version}", &url]).await;
    assert!(!ok || out != "2", "h2c must not be served on this port: {out}");
}

/// A node that answers each request with the bytes scripted for its path, byte for byte, so
/// every framing a node may use can be checked; `close_after` paths close the connection after
/// answering (without saying so when the script does not).
struct ScriptedNode {
    addr: SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl ScriptedNode {
    async fn start(script: &'static [(&'static str, &'static [u8], bool)]) -> ScriptedNode {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        let Some((_, reply, close)) = script.iter().find(|(p, _, _)| *p == path) else {
                            return;
                        };
                        if s.write_all(reply).await.is_err() || *close {
                            return;
                        }
                    }
                });
            }
        });
        ScriptedNode { addr, connections, requests, _task: task }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }
}

const FRAMINGS: &[(&str, &[u8], bool)] = &[
    ("/length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Node: s\r\n\r\nhello", false),
    (
        "/chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-t: 1\r\n\r\n",
        false,
    ),
    ("/early", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
    ("/empty", b"HTTP/1.1 204 No Content\r\n\r\n", false),
    ("/head", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
    ("/until-close", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", true),
    ("/conn-lists-length", b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello", false),
    ("/hop", b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n", false),
    ("/short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", true),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_is_relayed_on_one_client_connection() {
    use http_body_util::BodyExt;
    let node = ScriptedNode::start(FRAMINGS).await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[node.addr])
    ));
    let stream = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut call = async |method: http::Method, path: &str| {
        let req = Request::builder().method(method).uri(path).header("host", "h").body(body("")).unwrap();
        sender.ready().await.expect("connection still open");
        let resp = sender.send_request(req).await.expect("response");
        let (parts, b) = resp.into_parts();
        let collected = b.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (parts.status, parts.headers, collected.to_bytes(), trailers)
    };
    let (status, headers, b, _) = call(http::Method::GET, "/length").await;
    assert_eq!((status, &b[..], headers["x-node"].as_bytes()), (StatusCode::OK, &b"hello"[..], &b"s"[..]));
    assert!(
        headers.get("date").is_some_and(|d| d.len() == 29),
        "the node sent no Date; the gateway adds one"
    );
    let (status, _, b, trailers) = call(http::Method::GET, "/chunked").await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"hello, world"[..]));
    assert_eq!(trailers.expect("trailers")["x-t"], "1", "trailers come through");
    let (status, _, b, _) = call(http::Method::GET, "/early").await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"ok"[..]), "the 103 is skipped");
    let (status, _, b, _) = call(http::Method::GET, "/empty").await;
    assert_eq!((status, b.len()), (StatusCode::NO_CONTENT, 0));
    let (status, headers, b, _) = call(http::Method::HEAD, "/head").await;
    assert_eq!(
        (status, b.len(), headers["content-length"].as_bytes()),
        (StatusCode::OK, 0, &b"5"[..]),
        "HEAD has no body"
    );
    let (status, headers, _, _) = call(http::Method::GET, "/hop").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-secret").is_none() && headers.get("keep-alive").is_none(), "{headers:?}");
    // A node listing Content-Length in Connection does not take the client's framing away.
    let (status, _, b, _) = call(http::Method::GET, "/conn-lists-length").await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"hello"[..]));
    let (_, _, b, _) = call(http::Method::GET, "/length").await;
    assert_eq!(&b[..], b"hello", "the next response on the client connection is intact");
    assert_eq!(node.connections(), 1, "one pooled node connection so far");
    // A body delimited by the node closing: relayed whole, then the client connection closes.
    let (status, _, b, _) = call(http::Method::GET, "/until-close").await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"until close"[..]));
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(closed.is_ok(), "the client connection ends after a close-delimited body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let node = ScriptedNode::start(FRAMINGS).await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[node.addr])
    ));
    let out = raw(
        gw.http(),
        b"GET /length HTTP/1.1\r\nHost: h\r\n\r\nGET /early HTTP/1.1\r\nHost: h\r\n\r\nGET /until-close HTTP/1.1\r\nHost: h\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    let hello = text.find("hello").expect("first answer");
    let ok = text.find("\r\n\r\nok").expect("second answer");
    let close = text.find("until close").expect("third answer");
    assert!(hello < ok && ok < close, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_closing_idle_connections_costs_no_failed_request() {
    // Every answer claims keep-alive, but the node closes right after it.
    static SCRIPT: &[(&str, &[u8], bool)] =
        &[("/x", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true)];
    let node = ScriptedNode::start(SCRIPT).await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node.addr])
    ));
    for i in 0..20 {
        let (status, _, b) = get(gw.http(), "/x").await;
        assert_eq!((status, &b[..]), (StatusCode::OK, &b"ok"[..]), "request {i}");
    }
    assert_eq!(node.connections(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_keeps_working_across_read_whole_and_streamed_bodies() {
    use http_body_util::BodyExt;
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let stream = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    // Bodies up to 64 KiB are read whole first, a larger one is streamed (and `/echo` answers
    // before it has all of it: the connection is reused all the same).
    let big: &'static str = Box::leak("z".repeat(100 * 1024).into_boxed_str());
    for (method, path, sent) in [
        ("GET", "/a", ""),
        ("POST", "/echo", "posted body"),
        ("PUT", "/echo", big),
        ("GET", "/b", ""),
        ("PUT", "/echo", "again"),
    ] {
        let req = Request::builder().method(method).uri(path).header("host", "h").body(body(sent)).unwrap();
        sender.ready().await.expect("connection still open");
        let resp = sender.send_request(req).await.expect("response on the same connection");
        assert_eq!(resp.status(), StatusCode::OK, "{method} {path}");
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        if !sent.is_empty() {
            assert!(&got[..] == sent.as_bytes(), "{method} {path}: {} bytes back", got.len());
        }
    }
    assert_eq!(b.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_request_bodies_are_relayed_whole_with_their_length() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    // Pipelined on one connection, the body of one request arriving with the next head. The PUT
    // names Content-Length in Connection: the node must still get the length, or it would take
    // the body for the next request. The last request closes the connection.
    let max = "Q".repeat(64 * 1024);
    let mut req = Vec::new();
    req.extend_from_slice(b"GET /size/3 HTTP/1.1\r\nHost: h\r\n\r\n");
    req.extend_from_slice(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello");
    req.extend_from_slice(
        b"PUT /echo HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: 6\r\n\r\nworld!",
    );
    req.extend_from_slice(
        format!("POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n", max.len()).as_bytes(),
    );
    req.extend_from_slice(max.as_bytes());
    req.extend_from_slice(b"GET /size/2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    let out = raw(gw.http(), &req, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 5, "{}", &text[..text.len().min(2000)]);
    let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle:?} missing"));
    assert!(at("xxx") < at("hello") && at("hello") < at("world!") && at("world!") < at("QQQ"));
    assert_eq!(text.matches('Q').count(), max.len(), "the 64 KiB body came back whole");
    assert!(text.trim_end().ends_with("xx"), "last answer last");
    assert_eq!(b.requests(), 5);
    // One node connection for all five: the relay's (the general path has a pool of its own).
    assert_eq!(b.state.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_completes_reaches_no_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    // BASE_CONFIG: client_body_timeout 2s bounds the wait for the body.
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc").await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "connection left open");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed before the timeout");
    assert_eq!(b.requests(), 0, "a request without its whole body is not sent");
}

/// A client that stays silent for `silence`, then sends the start of a head and one more byte
/// every 200 ms, never finishing it (the slow client is what is under test, so its pace is
/// real time). Returns how long after connecting the gateway closed the connection, and how
/// many requests reached the node.
async fn trickle_a_head(silence: Duration) -> (Duration, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let s = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let start = Instant::now();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(silence).await;
        if w.write_all(b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ").await.is_err() {
            return;
        }
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if w.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(9), r.read_to_end(&mut out)).await;
    let elapsed = start.elapsed();
    writer.abort();
    (elapsed, b.requests())
}

/// Each read is quick, the head never completes: cut off at the header timeout (2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_head_is_cut_off_at_the_header_timeout() {
    let (elapsed, requests) = trickle_a_head(Duration::ZERO).await;
    assert!(
        elapsed < Duration::from_secs(5),
        "a trickling client was kept for {elapsed:?} (header timeout 2 s)"
    );
    assert_eq!(requests, 0);
}

/// The first request's head is timed from the connection's accept (nginx's rule), not from its
/// first byte: a client silent for most of `client_header_timeout` (2 s here) that then trickles
/// its head is cut off about 2 s after connecting, not 2 s after it began to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_head_is_timed_from_the_accept() {
    let (elapsed, requests) = trickle_a_head(Duration::from_millis(1500)).await;
    assert!(elapsed >= Duration::from_millis(1900), "cut off after {elapsed:?}, before the timeout");
    assert!(
        elapsed < Duration::from_millis(3000),
        "kept for {elapsed:?} after connecting (header timeout 2 s)"
    );
    assert_eq!(requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_to_head_has_no_body_and_the_connection_goes_on() {
    let dead = closed_port();
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[dead])
    ));
    let out = raw(
        gw.http(),
        b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    let (first, rest) = text.split_once("\r\n\r\n").expect("a first answer");
    assert!(first.starts_with("HTTP/1.1 502"), "{text}");
    assert!(rest.starts_with("HTTP/1.1 502"), "no body after the HEAD answer, then the GET's answer: {text}");
    assert!(rest.contains("error_msg"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_get_every_node_framing_decoded() {
    let node = ScriptedNode::start(FRAMINGS).await;
    // One worker: node connections are pooled per worker.
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[node.addr])),
        1,
    );
    let h2 = |method: http::Method, path: &str| {
        Request::builder().method(method).uri(format!("http://{}{path}", gw.http())).body(body("")).unwrap()
    };
    let (status, headers, b, _) = send_h2(gw.http(), h2(http::Method::GET, "/length")).await;
    assert_eq!((status, &b[..], headers["x-node"].as_bytes()), (StatusCode::OK, &b"hello"[..], &b"s"[..]));
    // The node sent no Date: the gateway's is added (IMF-fixdate, 29 characters, in GMT).
    let date = headers.get("date").expect("a Date header").to_str().unwrap();
    assert!(date.len() == 29 && date.ends_with(" GMT"), "{date}");
    let (status, headers, b, trailers) = send_h2(gw.http(), h2(http::Method::GET, "/chunked")).await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"hello, world"[..]), "chunk framing is decoded");
    assert!(headers.get("transfer-encoding").is_none());
    assert_eq!(trailers.expect("trailers")["x-t"], "1");
    let (status, _, b, _) = send_h2(gw.http(), h2(http::Method::GET, "/early")).await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"ok"[..]));
    let (status, _, b, _) = send_h2(gw.http(), h2(http::Method::GET, "/empty")).await;
    assert_eq!((status, b.len()), (StatusCode::NO_CONTENT, 0));
    let (status, headers, _, _) = send_h2(gw.http(), h2(http::Method::GET, "/hop")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-secret").is_none() && headers.get("keep-alive").is_none(), "{headers:?}");
    assert_eq!(node.connections(), 1, "the node connection is pooled between h2 streams");
    let (status, _, b, _) = send_h2(gw.http(), h2(http::Method::GET, "/until-close")).await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"until close"[..]));
    let (status, _, b, _) = send_h2(gw.http(), h2(http::Method::GET, "/length")).await;
    assert_eq!((status, &b[..]), (StatusCode::OK, &b"hello"[..]));
    assert_eq!(node.connections(), 2, "a close-delimited body is not followed on its connection");

    // A node that breaks off mid-body: the client's stream is reset, not ended as if whole.
    let mut sender = h2c_sender(gw.http()).await;
    // (The reset may overtake the head, which h2 then never sends: an error either way.)
    if let Ok(resp) = sender.send_request(h2(http::Method::GET, "/short")).await {
        assert_eq!(resp.status(), StatusCode::OK);
        let got = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(got.is_err(), "a body cut short arrived as complete: {:?}", got.map(|c| c.to_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_refused_not_relayed() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    // A zero and a non-zero length: relayed as they are, the node would take the next request's
    // bytes as this one's body.
    let out = raw(
        gw.http(),
        b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 27\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(b.requests(), 0, "nothing reaches the node");
    // Lengths that agree (`0` and `000`) go to the node as one line (a node reading raw bytes).
    use tokio::io::AsyncWriteExt;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let node = hand_node(move |mut s| {
        let tx = tx.clone();
        async move {
            if let Some(head) = request_head_bytes(&mut s).await {
                let _ = tx.send(head);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
            }
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    let out = raw_once(
        gw.http(),
        b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 000\r\n\r\n",
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    let head = String::from_utf8(rx.recv().await.unwrap()).unwrap().to_ascii_lowercase();
    assert_eq!(head.matches("content-length").count(), 1, "{head}");
    assert!(head.contains("content-length: 0\r\n"), "{head}");
}

/// The Host a request is routed by is the Host the node gets: for an absolute-form target
/// that is the target's host, not the Host header's (RFC 9112 §3.2.2), so a request routed as
/// `public.test` cannot reach the node as `internal.test`. An HTTP/1.1 request without a Host,
/// or with two, is a 400 (RFC 9112 §3.2, as nginx answers), on the relay and on hyper's path
/// (chunked) alike; HTTP/1.0 needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_routed_is_the_host_sent_and_a_missing_or_double_host_is_a_400() {
    let (public, internal) = (Backend::start("public").await, Backend::start("internal").await);
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    host: public.test\n    upstream: {{nodes: {}}}\n  - uri: /*\n    host: internal.test\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[public.addr]),
        nodes_yaml(&[internal.addr])
    ));
    for (what, request) in [
        ("relay", &b"GET http://public.test/x HTTP/1.1\r\nHost: internal.test\r\n\r\n"[..]),
        (
            "general path",
            b"POST http://public.test/x HTTP/1.1\r\nHost: internal.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        ),
    ] {
        let out = raw_once(gw.http(), request).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("x-backend: public"), "{what}: {text}");
        let seen = public.state.last_headers.lock().unwrap().clone().unwrap();
        assert_eq!(seen["host"], "public.test", "{what}");
        assert_eq!(seen["x-forwarded-host"], "public.test", "{what}");
    }
    assert_eq!(internal.requests(), 0);

    for (what, request) in [
        ("no Host", &b"GET /x HTTP/1.1\r\n\r\n"[..]),
        ("two Hosts", b"GET /x HTTP/1.1\r\nHost: public.test\r\nHost: internal.test\r\n\r\n"),
        (
            "two Hosts, chunked",
            b"POST /x HTTP/1.1\r\nHost: public.test\r\nHost: internal.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("two Hosts, HTTP/1.0", b"GET /x HTTP/1.0\r\nHost: public.test\r\nHost: internal.test\r\n\r\n"),
    ] {
        let out = raw_once(gw.http(), request).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.0 400"), "{what}: {text}");
    }
    assert_eq!(internal.requests(), 0);
    let before = public.requests();
    let out = raw_once(gw.http(), b"GET http://public.test/x HTTP/1.1\r\n\r\n").await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
        "an absolute-form target needs no Host"
    );
    // HTTP/1.0 without a Host: no route has an empty host, so a 404, not a 400.
    let out = raw_once(gw.http(), b"GET /x HTTP/1.0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 404") || text.starts_with("HTTP/1.0 404"), "{text}");
    assert_eq!(public.requests(), before + 1);
}

/// A chunked request's trailer fields do not reach the node (nginx forwards none): a node that
/// merges trailers into the head would otherwise take a `Host` or an `X-Forwarded-For` the
/// gateway never wrote. The body itself arrives whole, ending as one without trailers does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_requests_trailers_do_not_reach_the_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let node = hand_node(move |mut s| {
        let tx = tx.clone();
        async move {
            // The request: its head, then a chunked body up to the empty line after `0`.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let body_start = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
                if let Some(b) = body_start
                    && let Some(end) = got[b..].windows(5).position(|w| w == b"0\r\n\r\n")
                    && (end == 0 || got[b + end - 2..b + end] == *b"\r\n")
                {
                    break;
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(got);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    let request = b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nHost: internal.test\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n";
    let out = raw_once(gw.http(), request).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{text}");
    assert!(!text.contains("internal.test"), "{text}");
    // A size a node might read otherwise (`1 0`: 0x10 without its space) is refused.
    let bad = b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1 0\r\nx\r\n0\r\n\r\n";
    let out = raw_once(gw.http(), bad).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&out));
    assert!(rx.try_recv().is_err(), "nothing reached the node");
}

/// Invalid trailer bytes that arrive in a later read than the body's start (the relay is
/// already streaming it to the node) end the exchange, and nothing panics: cutting the trailer
/// fields out of such a read once ran past its end, and a release build aborts on a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_trailers_in_a_later_read_end_the_exchange_without_a_panic() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let panics = count_panics();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let node = hand_node(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let mut told = false;
            // Tells once the start of the body is here, then reads until the gateway gives up.
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
                if !told && got.windows(5).any(|w| w == b"hello") {
                    told = true;
                    let _ = tx.send(());
                }
            }
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    for bad in [&b"0\r\nX: a\x01\r\n\r\n"[..], b"0\r\nX: a\r\n\n"] {
        let mut s = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        s.write_all(b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        s.write_all(bad).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic (see above)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_breaks_framing_or_drops_a_request_is_a_502_and_nothing_is_sent_twice() {
    static SCRIPT: &[(&str, &[u8], bool)] = &[
        ("/length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false),
        // A bare LF after the last chunk: a lenient client would see a second response there.
        (
            "/bare-lf",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        ("/switch", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", false),
        // Reads the request, then closes without a word.
        ("/drop", b"", true),
    ];
    let node = ScriptedNode::start(SCRIPT).await;
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[node.addr])),
        1,
    );
    let (status, _, _) = get(gw.http(), "/bare-lf").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "invalid chunk framing is refused");
    let (status, _, _) = get(gw.http(), "/switch").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "a 101 nobody asked for");
    // A POST on a pooled connection that the node drops after reading it: a 502, never resent.
    let before = node.requests.load(std::sync::atomic::Ordering::Relaxed);
    let out = raw(
        gw.http(),
        b"GET /length HTTP/1.1\r\nHost: h\r\n\r\nPOST /drop HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("hello") && text.contains("HTTP/1.1 502"), "{text}");
    assert_eq!(
        node.requests.load(std::sync::atomic::Ordering::Relaxed) - before,
        2,
        "the POST reached the node once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_split_by_an_h2_client_reach_an_http1_node_as_one_line() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let req = Request::get(format!("http://{}/c", gw.http()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(body(""))
        .unwrap();
    let (status, _, body, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["headers"]["cookie"], "a=1; b=2");
}

/// A node that answers a request before reading all of its body, and then neither reads the
/// rest nor closes, leaves the gateway a node connection still busy sending that body. It is not
/// reused: the next request goes over a fresh connection at once, instead of waiting behind the
/// stalled body until the send timeout. Checked for an HTTP/1.1 client and an h2c one (the
/// relay streams both bodies, each its own way). The HTTP/1.1 client's connection is kept: the
/// rest of its body is dropped once the node has taken none of it for the send timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_connection_still_sending_a_body_is_not_reused() {
    for h2 in [false, true] {
        a_node_connection_still_sending_a_body_is_not_reused_over(h2).await;
    }
}

async fn a_node_connection_still_sending_a_body_is_not_reused_over(h2: bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    // A node that answers the first request on each connection at once and then neither reads
    // nor closes; a gateway in front of it.
    let node_and_gateway = || async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = conns.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                seen.fetch_add(1, Ordering::Relaxed);
                if read_request_head(&mut s).await
                    && s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_ok()
                {
                    held.push(s);
                }
            }
        });
        let gw = TestGateway::start(&format!(
            "routes:\n  - uri: /*\n    timeout: {{connect: 5, send: 2, read: 10}}\n    upstream: {{retries: 0, nodes: {}}}\n",
            nodes_yaml(&[node])
        ));
        (gw, conns)
    };
    let (gw, conns) = node_and_gateway().await;
    let addr = gw.http();
    let send_any = |req: Request<Full<Bytes>>| async move {
        if h2 {
            let (status, _, body, _) = send_h2(addr, req).await;
            (status, body)
        } else {
            let (status, _, body) = send(addr, req).await;
            (status, body)
        }
    };
    let url = |path: &str| format!("http://{}{path}", gw.http());
    // 16 MiB: more than the socket buffers hold, so the gateway is still writing it to the node
    // when the answer has come back whole.
    let big = Request::post(url("/up"))
        .header("host", "h")
        .body(Full::new(Bytes::from(vec![b'x'; 16 << 20])))
        .unwrap();
    let (status, body) = send_any(big).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]), "h2: {h2}");
    // The next request with a body.
    let start = Instant::now();
    let small = Request::post(url("/again"))
        .header("host", "h")
        .body(Full::new(Bytes::from(vec![b'y'; 100 << 10])))
        .unwrap();
    let (status, body) = send_any(small).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"ok"[..]),
        "h2: {h2}: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "h2: {h2}: waited {:?} for the busy connection",
        start.elapsed()
    );
    assert_eq!(conns.load(Ordering::Relaxed), 2, "h2: {h2}: a fresh connection for the second request");
    if h2 {
        return;
    }
    // The client's own connection: once the node has taken none of the rest for the send
    // timeout, the gateway reads and drops it, and the connection carries the next request. (On
    // a gateway of its own: the one above has pooled the second connection, which its node
    // will never answer on again.)
    use tokio::io::AsyncReadExt;
    let (gw, _) = node_and_gateway().await;
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(format!("POST /up HTTP/1.1\r\nhost: h\r\ncontent-length: {}\r\n\r\n", 16 << 20).as_bytes())
        .await
        .unwrap();
    c.write_all(&vec![b'x'; 16 << 20]).await.unwrap();
    c.write_all(b"GET /next HTTP/1.1\r\nhost: h\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while got.windows(2).filter(|w| w == b"ok").count() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk)).await {
            Ok(Ok(n @ 1..)) => got.extend_from_slice(&chunk[..n]),
            other => panic!("no second answer ({other:?}): {}", String::from_utf8_lossy(&got)),
        }
    }
    let answers = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert_eq!(answers.matches("http/1.1 200").count(), 2, "{answers}");
    assert!(!answers.contains("connection: close"), "{answers}");
}

/// A node that answers a large upload at once and closes without reading it (nginx's 413, an
/// auth failure) resets the connection while the gateway is still sending the body. The client
/// gets the node's answer, not a 502, and the client connection (HTTP/1.1) or stream (HTTP/2)
/// ends cleanly after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_by_a_node_that_resets_gets_the_answer() {
    use tokio::io::AsyncWriteExt;
    let node = hand_node(|mut s| async move {
        if read_request_head(&mut s).await {
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!")
                .await;
            // Closed with the body unread and no lingering: a reset.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    for i in 0..10 {
        let req = Request::post("/up")
            .header("host", "h")
            .body(Full::new(Bytes::from(vec![b'x'; 16 << 20])))
            .unwrap();
        let (status, headers, body) = send(gw.http(), req).await;
        assert_eq!((status, &body[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too big!"[..]), "upload {i}");
        assert_eq!(headers["connection"], "close", "upload {i}");
    }
    // The same from HTTP/2 clients, whose bodies the gateway streams to the node too.
    for i in 0..10 {
        let req = Request::post(format!("http://{}/up", gw.http()))
            .body(Full::new(Bytes::from(vec![b'x'; 16 << 20])))
            .unwrap();
        let (status, _, body, _) = send_h2(gw.http(), req).await;
        assert_eq!((status, &body[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too big!"[..]), "h2 upload {i}");
    }
    // An HTTP/2 client that goes on sending after the answer (as a client sending a whole body
    // before it looks at the answer does) has the rest read: its stream is not reset, and the
    // gateway gives back window for 4 MiB after the answer, beyond both windows it granted.
    h2_uploads_go_on_after_the_answer(gw.http(), "/up", StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(get(gw.http(), "/status").await.0, StatusCode::PAYLOAD_TOO_LARGE, "the gateway serves on");
}

/// The same with a body small enough to be read whole and sent with the request head (60 KiB),
/// to a node that reads only the head, answers, and resets the connection: the client gets the
/// answer, not a 502, from HTTP/1.1 and HTTP/2 clients alike, whether the gateway's socket had
/// taken the whole write when the reset came or was still waiting to (then the write fails:
/// `h1::tests::a_head_cut_by_the_nodes_reset_leaves_its_answer_to_read` holds that case alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_and_resetting_before_taking_a_small_body_gets_its_answer_relayed() {
    use tokio::io::AsyncWriteExt;
    // The body is mostly still in the gateway's socket when the reset comes.
    let listener = narrow_listener();
    let node = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await {
                    let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!";
                    let _ = s.write_all(answer).await;
                    // Closed with the body unread and no lingering: a reset.
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
            });
        }
    });
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    let body = Bytes::from(vec![b'x'; 60 << 10]);
    for i in 0..20 {
        let req = Request::post("/up").header("host", "h").body(Full::new(body.clone())).unwrap();
        let (status, _, answer) = send(gw.http(), req).await;
        assert_eq!((status, &answer[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too big!"[..]), "upload {i}");
        let req = Request::post(format!("http://{}/up", gw.http())).body(Full::new(body.clone())).unwrap();
        let (status, _, answer, _) = send_h2(gw.http(), req).await;
        assert_eq!((status, &answer[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too big!"[..]), "h2 upload {i}");
    }
}

/// A node that answers an upload early with chunk framing that is already invalid in what came
/// with its head: the client has nothing of that answer yet, so it gets a 502 (and the rest of
/// its body is read before the connection closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_with_invalid_framing_is_a_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (node, _n) = garbage_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbad").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    let c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(b"PUT /up HTTP/1.1\r\nhost: h\r\ncontent-length: 1048576\r\n\r\n").await?;
        wr.write_all(&vec![b'z'; 1 << 20]).await?;
        wr.shutdown().await
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut answer))
        .await
        .expect("closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    writer.await.unwrap().expect("the whole body was read");
}

/// Three uploads on one HTTP/2 connection to `path`, each answered with `status` after its first
/// 64 KiB: the client then sends 4 MiB more, beyond both windows the gateway granted, which
/// needs the gateway to go on reading it; its stream is not reset, and ends as the client ends
/// it.
async fn h2_uploads_go_on_after_the_answer(addr: SocketAddr, path: &str, status: StatusCode) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    for i in 0..3 {
        let mut client = client.clone().ready().await.unwrap();
        let req = Request::post(format!("http://{addr}{path}")).body(()).unwrap();
        let (answer, mut up) = client.send_request(req, false).unwrap();
        up.send_data(Bytes::from(vec![b'x'; 64 << 10]), false).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
        assert_eq!(answer.status(), status, "{path}: upload {i}");
        let mut left = 4usize << 20;
        while left > 0 {
            up.reserve_capacity(left.min(256 << 10));
            let granted = std::future::poll_fn(|cx| up.poll_capacity(cx));
            let n = tokio::time::timeout(Duration::from_secs(10), granted)
                .await
                .unwrap_or_else(|_| panic!("{path}: upload {i}: no window with {left} bytes left"))
                .unwrap_or_else(|| panic!("{path}: upload {i}: stream closed with {left} bytes left"))
                .unwrap_or_else(|e| panic!("{path}: upload {i}: {e} with {left} bytes left"));
            up.send_data(Bytes::from(vec![b'x'; n]), false).unwrap();
            left -= n;
        }
        up.send_data(Bytes::new(), true).expect("the stream ends as the client ends it");
    }
}

/// A large body is streamed to the node as the client sends it; a client that stops sending it
/// gets a 408 after `client_body_timeout`, and the node's connection is closed (the node never
/// sees a whole request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_reaches_the_node_before_it_ends_and_a_stalled_one_is_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The node reports how many bytes it got before the gateway closed the connection.
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let node = hand_node(move |mut s| {
        let got_tx = got_tx.clone();
        async move {
            let mut total = 0;
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                total += n;
                let _ = got_tx.send(total);
            }
            let _ = got_tx.send(usize::MAX);
        }
    })
    .await;
    // The body's timeout (2 s), not the head's (20 s here), bounds the pauses in a body.
    let gw = TestGateway::start_with(
        &BASE_CONFIG.replace("client_header_timeout: 2s", "client_header_timeout: 20s"),
        &format!("routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n", nodes_yaml(&[node])),
        2,
    );
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(b"PUT /up HTTP/1.1\r\nhost: h\r\ncontent-length: 1048576\r\n\r\n").await.unwrap();
    c.write_all(&vec![b'z'; 200 << 10]).await.unwrap();
    // The node has the head and the 200 KiB sent so far while the client still holds the rest.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < 200 << 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        seen = tokio::time::timeout(left, got_rx.recv())
            .await
            .expect("the body's start reached the node")
            .unwrap();
        assert_ne!(seen, usize::MAX, "the node's connection closed early");
    }
    // Then the client goes quiet.
    let start = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await.expect("closed").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "client_body_timeout is 2 s: {:?}",
        start.elapsed()
    );
    loop {
        let n =
            tokio::time::timeout(Duration::from_secs(5), got_rx.recv()).await.expect("node closed").unwrap();
        if n == usize::MAX {
            break;
        }
        assert!(n < 1 << 20, "the node never gets a whole body");
    }
}

/// `Expect: 100-continue` (curl sends it for large uploads) is answered by the gateway before it
/// reads the body, on the relay's streamed and read-whole paths; the node does not see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let dir = tempfile::tempdir().unwrap();
    for size in [10 << 10, 3 << 20] {
        let file = dir.path().join(format!("body-{size}"));
        std::fs::write(&file, vec![b'e'; size]).unwrap();
        let data = format!("@{}", file.display());
        let url = format!("http://{}/sink", gw.http());
        // Without a 100 Continue curl would wait 30 s before sending the body, past --max-time.
        let (ok, out, err) = curl(&[
            "-v",
            "--expect100-timeout",
            "30",
            "-H",
            "Expect: 100-continue",
            "-H",
            "host: h",
            "--data-binary",
            &data,
            &url,
        ])
        .await;
        assert!(ok, "{size}: {err}");
        assert_eq!(out, size.to_string());
        assert!(err.contains("HTTP/1.1 100 Continue"), "{size}: {err}");
    }
    let seen = b.state.last_headers.lock().unwrap().clone().unwrap();
    assert!(!seen.contains_key("expect"), "{seen:?}");
}
/// `nginx_config.http.send_timeout`: a client that stops reading a large response is cut off
/// once a write to it has made no progress for that long, and the node's connection goes with it
/// (instead of both being held until the client reads again). Checked on the HTTP/1.1 relay (a
/// GET), on the general path (a POST with a body), and for an HTTP/2 stream waiting for the
/// client's flow-control window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_cut_off_after_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: u64 = 1 << 30;
    // A node that answers every request with a 1 GiB body and reports when its connection
    // breaks under it.
    let (broken_tx, mut broken) = tokio::sync::mpsc::unbounded_channel::<()>();
    let node = hand_node(move |mut s| {
        let broken = broken_tx.clone();
        async move {
            if !read_request_head(&mut s).await {
                return;
            }
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
            if s.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            let zeros = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < BODY {
                if s.write_all(&zeros).await.is_err() {
                    let _ = broken.send(());
                    return;
                }
                sent += zeros.len() as u64;
            }
        }
    })
    .await;
    let config =
        BASE_CONFIG.replace("client_header_timeout: 2s", "client_header_timeout: 2s\n    send_timeout: 1s");
    let gw = TestGateway::start_with(
        &config,
        &format!("routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n", nodes_yaml(&[node])),
        1,
    );

    let requests: [&[u8]; 2] = [
        b"GET /relay HTTP/1.1\r\nhost: h\r\n\r\n",
        b"POST /general HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello",
    ];
    for req in requests {
        let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        c.write_all(req).await.unwrap();
        // The client reads nothing until the gateway has given up on it: without the timeout
        // the node's writes would block forever instead of failing.
        let started = Instant::now();
        let cut = tokio::time::timeout(Duration::from_secs(20), broken.recv()).await;
        assert!(matches!(cut, Ok(Some(()))), "{}: node connection still held", String::from_utf8_lossy(req));
        assert!(started.elapsed() >= Duration::from_millis(900), "cut off before send_timeout");
        // What was buffered arrives, then the connection ends short of the body.
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                Ok(Ok(n @ 1..)) => got += n as u64,
                Ok(_) => break,
                Err(_) => panic!("connection to the client left open"),
            }
        }
        assert!(got < BODY, "the whole body arrived: the client was not cut off");
    }

    // HTTP/2: a client that reads none of the answer keeps the stream's window shut (it gives
    // none back). The stream is reset once its next frame has waited `send_timeout`, the node
    // connection goes with it, and the client's connection goes on serving.
    let tcp = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{}/h2", gw.http())).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let answer =
        tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer head").unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let started = Instant::now();
    let cut = tokio::time::timeout(Duration::from_secs(20), broken.recv()).await;
    assert!(matches!(cut, Ok(Some(()))), "HTTP/2: node connection still held");
    assert!(started.elapsed() >= Duration::from_millis(900), "HTTP/2: cut off before send_timeout");
    let mut body = answer.into_body();
    let reset = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("HTTP/2 stream left open")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e.reason(),
            None => panic!("HTTP/2: the answer ended instead of being reset"),
        }
    };
    assert_eq!(reset, Some(h2::Reason::CANCEL));
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{}/again", gw.http())).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let answer =
        tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no second answer").unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "the connection serves on");
}

/// A download far bigger than any buffer, from a node that always has bytes ready, to a client
/// that always reads. The client starts reading only once the node has filled every buffer on
/// the way, so the relay then finds its node socket full for many reads in a row: the case
/// where tokio's cooperative budget runs out mid-body (the unit test
/// `read_some_with_a_spent_budget_still_reads` pins that case down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_never_pauses_arrives_whole() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: u64 = 256 << 20;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = l.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else { return };
        if !read_request_head(&mut s).await {
            return;
        }
        let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
        let block = vec![b'x'; 64 << 10];
        let _ = s.write_all(reply.as_bytes()).await;
        for _ in 0..BODY / block.len() as u64 {
            if s.write_all(&block).await.is_err() {
                return;
            }
            counter.fetch_add(block.len() as u64, Ordering::Relaxed);
        }
    });
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!("routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n", nodes_yaml(&[node])),
        1,
    );
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(b"GET /big HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n").await.unwrap();
    // Every buffer between the node and the client full: the node's writes stop moving.
    // (Unchanged over five polls 20 ms apart.)
    let (mut last, mut still) = (0, 0);
    assert!(
        eventually(Duration::from_secs(20), || {
            let now = sent.load(Ordering::Relaxed);
            still = if now == last && now > 0 { still + 1 } else { 0 };
            last = now;
            let stalled = still >= 5;
            async move { stalled }
        })
        .await,
        "the node never filled the buffers"
    );
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let read_all = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(60), read_all).await;
    assert!(done.is_ok(), "download stalled after {total} bytes");
    assert!(total > BODY && total < BODY + 1024, "{total} bytes for a {BODY}-byte body");
}

/// h2c request and response bodies far beyond every flow-control window the gateway grants
/// (1 MiB per stream, 4 MiB per connection) cross it whole, which needs the request's window
/// given back as the node reads and the answer sent as the client's window opens; and an answer
/// streams to the h2 client as the node sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_bodies_beyond_every_window_stream_both_ways() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let data: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("http://{}/echo", gw.http()))
        .body(Full::new(Bytes::from(data.clone())))
        .unwrap();
    let (status, _, back, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(back == data, "echoed body differs ({} bytes back)", back.len());

    let mut sender = h2c_sender(gw.http()).await;
    let start = Instant::now();
    let url = format!("http://{}/slow-body", gw.http());
    let resp = sender.send_request(Request::get(url).body(body("")).unwrap()).await.unwrap();
    slow_body_streams(resp, start).await;
}

/// An HTTP/2 client that resets its stream (RST_STREAM CANCEL) while the node has not answered
/// yet cancels the node exchange at once, not at the node's read timeout (60 s here), and the
/// client's connection goes on serving its other streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_reset_by_the_client_cancels_the_node_exchange() {
    use tokio::io::AsyncReadExt;
    // A node that never answers and reports when the gateway hangs up on it.
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let node = hand_node(move |mut s| {
        let tx = tx.clone();
        async move {
            if !read_request_head(&mut s).await {
                return;
            }
            let _ = tx.send("request");
            let mut b = [0u8; 1024];
            while matches!(s.read(&mut b).await, Ok(1..)) {}
            let _ = tx.send("hung up");
        }
    })
    .await;
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /hang\n    upstream:\n      nodes: {}\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[node]),
        nodes_yaml(&[b.addr])
    ));
    let mut client = h2_client(gw.http()).await;
    let req = Request::get(format!("http://{}/hang", gw.http())).body(()).unwrap();
    let (answer, mut stream) = client.send_request(req, true).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert_eq!(next, Ok(Some("request")));
    stream.send_reset(h2::Reason::CANCEL);
    let next = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert_eq!(next, Ok(Some("hung up")), "the node exchange outlived the client's reset");
    drop(answer);

    let mut client = client.ready().await.expect("the connection survives a reset stream");
    let req = Request::get(format!("http://{}/after", gw.http())).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), answer).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A request in flight on an h2c connection when the gateway is told to stop is still answered:
/// the connection gets GOAWAY and closes only once its streams are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_request_in_flight_at_shutdown_is_answered() {
    let b = Backend::start("b").await;
    let mut gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let req = Request::get(format!("http://{}/delay/600", gw.http())).body(body("")).unwrap();
    let call = tokio::spawn(send_h2(gw.http(), req));
    let b_state = b.state.clone();
    let arrived = eventually(Duration::from_secs(10), || {
        let s = b_state.clone();
        async move { s.requests.load(std::sync::atomic::Ordering::Relaxed) == 1 }
    })
    .await;
    assert!(arrived, "the request never reached the node");
    // Stopping joins the workers, so it runs off the test's runtime.
    let stopped = tokio::task::spawn_blocking(move || gw.shutdown());
    let (status, _, body, _) = tokio::time::timeout(Duration::from_secs(10), call).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"b after 600ms");
    stopped.await.unwrap();
}

/// Opens an h2c connection and makes one `GET` on it, answered 200. Returns the client, which
/// keeps the connection open, and the task driving the connection, which ends with it.
async fn h2c_after_one_get(
    addr: SocketAddr,
    path: &str,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{addr}{path}")).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), answer).await.unwrap().expect("answered");
    assert_eq!(resp.status(), StatusCode::OK);
    (client, driver)
}

/// An h2c connection is served by a task of its own once the preface is read (the task that
/// told the protocol apart ends): it still counts in `strait_connections_active` while it is
/// open, through its request, and stops counting once the client closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connection_counts_as_active_until_it_closes() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let active = |n: u64| {
        let control = gw.control();
        async move {
            let metrics = get(control, "/v1/metrics").await.2;
            String::from_utf8_lossy(&metrics).contains(&format!("strait_connections_active {n}\n"))
        }
    };
    assert!(eventually(Duration::from_secs(10), || active(0)).await, "a connection counted before any");

    let (client, driver) = h2c_after_one_get(gw.http(), "/one").await;
    assert!(
        eventually(Duration::from_secs(10), || active(1)).await,
        "the open h2c connection is not counted"
    );

    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await.expect("the client connection ended");
    assert!(
        eventually(Duration::from_secs(10), || active(0)).await,
        "the closed h2c connection is still counted"
    );
}

/// `nginx_config.http.keepalive_timeout` closes an HTTP/2 connection that has had no open
/// stream for that long (GOAWAY, then the close), as nginx does; a stream that lasts longer than
/// the timeout keeps its connection open until it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_after_keepalive_timeout() {
    let b = Backend::start("b").await;
    let config = BASE_CONFIG
        .replace("client_header_timeout: 2s", "client_header_timeout: 2s\n    keepalive_timeout: 1s");
    let gw = TestGateway::start_with(
        &config,
        &format!("routes:\n  - uri: /*\n    upstream:\n      nodes: {}\n", nodes_yaml(&[b.addr])),
        1,
    );
    let tcp = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let mut client = client.ready().await.unwrap();
    // Busy for 1.5 s, longer than the idle timeout: answered, not cut off.
    let req = Request::get(format!("http://{}/delay/1500", gw.http())).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), answer).await.unwrap().expect("answered");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("the whole body");
    }
    let answered = Instant::now();
    // Then idle, with the client still holding the connection: the gateway closes it about 1 s
    // later.
    let closed = tokio::time::timeout(Duration::from_secs(10), closed).await.expect("still open").unwrap();
    let idle = closed - answered;
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?} idle, before keepalive_timeout");
    assert!(idle < Duration::from_secs(5), "closed after {idle:?} idle");
    drop(client);
}

/// A node that records each request it reads whole (its head and raw body, framing included)
/// and answers it with `ok`. The body's end is found from the head: `content-length`, or the
/// chunked body's last chunk and trailers.
async fn recording_node() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let node = hand_node(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let complete = seen.windows(4).position(|w| w == b"\r\n\r\n").is_some_and(|end| {
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    let body = &seen[end + 4..];
                    match head.lines().find_map(|l| l.strip_prefix("content-length: ")) {
                        Some(n) => body.len() >= n.trim().parse::<usize>().unwrap(),
                        None => {
                            head.contains("transfer-encoding: chunked")
                                && body.windows(5).any(|w| w == b"\r\n0\r\n")
                                && body.ends_with(b"\r\n\r\n")
                        }
                    }
                });
                if complete {
                    let _ = tx.send(std::mem::take(&mut seen));
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                    continue;
                }
                match s.read(&mut buf).await {
                    Ok(n @ 1..) => seen.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
        }
    })
    .await;
    (node, rx)
}

/// Decodes a chunked body: its data, and its trailer section.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, String) {
    let mut data = Vec::new();
    loop {
        let line = raw.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line]).unwrap(), 16).expect("chunk size");
        raw = &raw[line + 2..];
        if size == 0 {
            return (data, String::from_utf8_lossy(raw).into_owned());
        }
        data.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "chunk data ends with CRLF");
        raw = &raw[size + 2..];
    }
}

/// A large request body from an HTTP/2 client is streamed to an HTTP/1.1 node as the client
/// sends it: framed by its `content-length` when it has one, chunked (trailers included) when
/// not; and a client that stops sending it gets a 408 after `client_body_timeout` (the node never
/// has a whole request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_request_bodies_are_streamed_to_http1_nodes_with_their_framing() {
    let (node, mut seen) = recording_node().await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| b'a' + (i % 26) as u8).collect();
    let next_request = |seen: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>| {
        let got = seen.try_recv().expect("the node had the whole request");
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (String::from_utf8_lossy(&got[..end]).to_ascii_lowercase(), got[end + 4..].to_vec())
    };

    // With a length.
    let req = Request::post(format!("http://{}/sized", gw.http()))
        .body(Full::new(Bytes::from(data.clone())))
        .unwrap();
    let (status, _, answer, _) = send_h2(gw.http(), req).await;
    assert_eq!((status, &answer[..]), (StatusCode::OK, &b"ok"[..]));
    let (head, body) = next_request(&mut seen);
    assert!(head.contains(&format!("content-length: {}", data.len())), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(body == data, "{} bytes of {}", body.len(), data.len());

    // Without one, in DATA frames as they come, then trailers.
    let mut client = h2_client(gw.http()).await;
    let req = Request::post(format!("http://{}/unsized", gw.http())).body(()).unwrap();
    let (answer, mut up) = client.send_request(req, false).unwrap();
    for part in data.chunks(100 * 1024) {
        up.send_data(Bytes::copy_from_slice(part), false).unwrap();
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "42".parse().unwrap());
    // Fields that only the head may carry are not passed on as trailers.
    trailers.insert("authorization", "Bearer late".parse().unwrap());
    trailers.insert("content-type", "text/late".parse().unwrap());
    up.send_trailers(trailers).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let (head, body) = next_request(&mut seen);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let (body, trailer) = dechunk(&body);
    assert!(body == data, "{} bytes of {}", body.len(), data.len());
    assert_eq!(trailer, "x-checksum: 42\r\n\r\n");

    // A body that stops coming: a 408 once client_body_timeout (2 s) has passed.
    let mut client = client.ready().await.unwrap();
    let req = Request::post(format!("http://{}/stalled", gw.http()))
        .header("content-length", "1048576")
        .body(())
        .unwrap();
    let start = Instant::now();
    let (answer, mut up) = client.send_request(req, false).unwrap();
    up.send_data(Bytes::from(vec![b'z'; 200 << 10]), false).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(start.elapsed() >= Duration::from_millis(1500), "answered after {:?}", start.elapsed());
    assert!(seen.try_recv().is_err(), "the node never had a whole request");
}

/// A request the HTTP/1.1 relay hands to the general stack (here for its `Connection: close`)
/// has its body streamed to the node over the same node connections: chunked, with a
/// `content-length` when it has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_the_general_http1_stack_takes_are_streamed_to_the_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (node, mut seen) = recording_node().await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| b'a' + (i % 26) as u8).collect();
    for chunked in [true, false] {
        let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        let mut req = b"POST /closing HTTP/1.1\r\nhost: h\r\nconnection: close\r\n".to_vec();
        if chunked {
            req.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            for part in data.chunks(50 * 1024) {
                req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                req.extend_from_slice(part);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n\r\n");
        } else {
            req.extend_from_slice(format!("content-length: {}\r\n\r\n", data.len()).as_bytes());
            req.extend_from_slice(&data);
        }
        c.write_all(&req).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
            .await
            .expect("closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
        let got = seen.try_recv().expect("the node had the whole request");
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let body = if chunked {
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            dechunk(&got[end + 4..]).0
        } else {
            assert!(head.contains(&format!("content-length: {}", data.len())), "{head}");
            got[end + 4..].to_vec()
        };
        assert!(body == data, "chunked {chunked}: {} bytes of {}", body.len(), data.len());
    }
}

/// A node that sends a byte now and then without ever completing an answer's head does not hold
/// off a stalled client's body timeout: the client gets its 408 about `client_body_timeout`
/// (2 s) after its last byte, over HTTP/1.1 and HTTP/2 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_trickling_bytes_does_not_hold_off_the_body_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = hand_node(|mut s| async move {
        if !read_request_head(&mut s).await {
            return;
        }
        for b in b"HTTP/1.1 200 OK\r\nx-slow: ".iter().chain(std::iter::repeat(&b'z')) {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            // The node's pace (the behaviour under test), not a wait for anything.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    let gw = TestGateway::start_with(
        &BASE_CONFIG.replace("client_header_timeout: 2s", "client_header_timeout: 20s"),
        &format!(
            "routes:\n  - uri: /*\n    timeout: {{connect: 5, send: 30, read: 30}}\n    upstream: {{retries: 0, nodes: {}}}\n",
            nodes_yaml(&[node])
        ),
        1,
    );
    // HTTP/1.1.
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(b"PUT /up HTTP/1.1\r\nhost: h\r\ncontent-length: 1048576\r\n\r\n").await.unwrap();
    c.write_all(&vec![b'z'; 100 << 10]).await.unwrap();
    let start = Instant::now();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 408", "HTTP/1.1");
    assert!(start.elapsed() < Duration::from_secs(8), "HTTP/1.1: after {:?}", start.elapsed());

    // HTTP/2.
    let mut client = h2_client(gw.http()).await;
    let req = Request::put(format!("http://{}/up", gw.http()))
        .header("content-length", "1048576")
        .body(())
        .unwrap();
    let (answer, mut up) = client.send_request(req, false).unwrap();
    up.send_data(Bytes::from(vec![b'z'; 100 << 10]), false).unwrap();
    let start = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT, "HTTP/2");
    assert!(start.elapsed() < Duration::from_secs(8), "HTTP/2: after {:?}", start.elapsed());
}

/// A node that answers an upload before reading it, keeps the connection, and then reads the
/// rest (as nginx's `return 200` does) gets the rest of the body, and its connection is reused
/// for the next upload instead of a new one each time. Over HTTP/2 and HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_an_upload_early_gets_the_rest_and_keeps_its_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Waits for the node to report that it read a whole 4 MiB body.
    async fn node_read_all(bodies: &mut tokio::sync::mpsc::UnboundedReceiver<usize>, what: &str) {
        let len = tokio::time::timeout(Duration::from_secs(10), bodies.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: the node did not read the rest"));
        assert_eq!(len, Some(4 << 20), "{what}");
    }
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = conns.clone();
    // Reports each request's body length once it has read all of it.
    let (tx, mut bodies) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let node = hand_node(move |mut s| {
        seen.fetch_add(1, Ordering::Relaxed);
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match s.read(&mut chunk).await {
                        Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                buf.drain(..end + 4);
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                    return;
                }
                while buf.len() < len {
                    match s.read(&mut chunk).await {
                        Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                buf.drain(..len);
                let _ = tx.send(len);
            }
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{retries: 0, nodes: {}}}\n",
        nodes_yaml(&[node])
    ));
    // One client connection, kept open: a client that closes it once it has the answer gives
    // up the rest of its upload.
    let mut sender = h2c_sender(gw.http()).await;
    for i in 0..5 {
        use http_body_util::BodyExt;
        let req = Request::post(format!("http://{}/up", gw.http()))
            .body(Full::new(Bytes::from(vec![b'x'; 4 << 20])))
            .unwrap();
        let resp = sender.send_request(req).await.expect("an answer");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("the answer's body").to_bytes();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]), "upload {i}");
        node_read_all(&mut bodies, &format!("upload {i}")).await;
    }
    // The gateway pools a connection just after the node has read the last byte: the next
    // upload may come first and open a second one, once in a while.
    let n = conns.load(Ordering::Relaxed);
    assert!(n <= 2, "{n} node connections for 5 uploads one after another");

    // HTTP/1.1, on one client connection: the client's connection stays open too, since the
    // gateway reads the rest of each body (it used to close it, and the node's, after each).
    conns.store(0, Ordering::Relaxed);
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    for i in 0..5 {
        let head = format!("POST /up HTTP/1.1\r\nhost: h\r\ncontent-length: {}\r\n\r\n", 4 << 20);
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&vec![b'x'; 4 << 20]).await.unwrap_or_else(|e| panic!("HTTP/1.1 upload {i}: {e}"));
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"ok")) {
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk)).await {
                Ok(Ok(n @ 1..)) => got.extend_from_slice(&chunk[..n]),
                other => panic!(
                    "HTTP/1.1 upload {i}: no whole answer ({other:?}): {}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        let answer = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "HTTP/1.1 upload {i}: {answer}");
        assert!(!answer.contains("connection: close"), "HTTP/1.1 upload {i}: {answer}");
        node_read_all(&mut bodies, &format!("HTTP/1.1 upload {i}")).await;
    }
    let n = conns.load(Ordering::Relaxed);
    assert!(n <= 2, "HTTP/1.1: {n} node connections for 5 uploads one after another");
}

/// An HTTP/2 (h2c) client connection to `addr`, driven in the background, ready to send.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// A small request body from an HTTP/2 client is read whole before a node is picked: a client
/// that declares one and does not send it gets a 408 once the send timeout has passed, and no
/// request reaches a node; one sent in pieces is forwarded whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_body_that_does_not_come_is_a_408_and_reaches_no_node() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    timeout: {{connect: 1, send: 1, read: 5}}\n    upstream:\n      nodes: {}\n",
        nodes_yaml(&[b.addr])
    ));
    let mut client = h2_client(gw.http()).await;
    let req =
        Request::post(format!("http://{}/echo", gw.http())).header("content-length", "10").body(()).unwrap();
    let start = Instant::now();
    let (answer, _body_never_sent) = client.send_request(req, false).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(start.elapsed() >= Duration::from_millis(900), "answered after {:?}", start.elapsed());
    assert_eq!(b.requests(), 0);

    // Sent in two DATA frames: forwarded whole.
    let mut client = client.ready().await.unwrap();
    let req =
        Request::post(format!("http://{}/echo", gw.http())).header("content-length", "10").body(()).unwrap();
    let (answer, mut body) = client.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"hello"), false).unwrap();
    body.send_data(Bytes::from_static(b"world"), true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let mut echoed = answer.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = echoed.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"helloworld");
}

/// Chunked request bodies from HTTP/1.1 clients are streamed by the relay as they come, chunk
/// framing and all: curl's chunked upload arrives whole; the bytes after a body's last chunk are
/// the client's next request, kept for it (here they come in the same read as the body's end,
/// after the node already has the start); and framing that breaks mid-body is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies_are_streamed_and_the_next_request_follows() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    // A node that reports what it reads, and answers each request once its chunked body ended.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let node = hand_node(move |mut s| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut got = Vec::new();
            let mut answered = 0;
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut chunk).await {
                got.extend_from_slice(&chunk[..n]);
                let _ = seen_tx.send(got.clone());
                let ends = got.windows(5).filter(|w| w == b"0\r\n\r\n").count();
                let heads = got.windows(4).filter(|w| w == b"\r\n\r\n").count();
                // A GET (no body) is one head; a chunked POST is a head and a last chunk.
                let done = if got.starts_with(b"GET") { heads } else { ends };
                while answered < done {
                    answered += 1;
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /sink\n    upstream: {{nodes: {}}}\n  - uri: /raw\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr]),
        nodes_yaml(&[node])
    ));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, vec![b'c'; 1 << 20]).unwrap();
    let data = format!("@{}", file.display());
    let url = format!("http://{}/sink", gw.http());
    let (ok, out, err) =
        curl(&["-H", "Transfer-Encoding: chunked", "-H", "host: h", "--data-binary", &data, &url]).await;
    assert!(ok, "{err}");
    assert_eq!(out, (1 << 20).to_string(), "the node read the whole chunked body");
    let seen = b.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["transfer-encoding"], "chunked");

    // The body's start, then (once the node has it) its end and the next request in one write.
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(b"POST /raw HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got =
            tokio::time::timeout(left, seen_rx.recv()).await.expect("the body's start reached the node");
        if got.unwrap().ends_with(b"5\r\nhel") {
            break;
        }
    }
    c.write_all(b"lo\r\n0\r\n\r\nPOST /raw HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut answers = Vec::new();
    let mut chunk = [0u8; 1024];
    while answers.windows(2).filter(|w| w == b"ok").count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk))
            .await
            .expect("two answers")
            .unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&answers));
        answers.extend_from_slice(&chunk[..n]);
    }
    let mut got = Vec::new();
    while let Ok(g) = seen_rx.try_recv() {
        got = g;
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\r\n\r\n5\r\nhello\r\n0\r\n\r\nPOST /raw HTTP/1.1\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n2\r\nhi\r\n0\r\n\r\n"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("content-length"), "{text}");

    // Framing that breaks after the node has the body's start.
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    c.write_all(b"POST /raw HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got =
            tokio::time::timeout(left, seen_rx.recv()).await.expect("the body's start reached the node");
        if got.unwrap().ends_with(b"5\r\nhello\r\n") {
            break;
        }
    }
    c.write_all(b"zz\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await.expect("closed").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// Reads one HTTP/1.1 answer with a `content-length` from `s`: its status, or `None` if the
/// connection ended first.
async fn read_answer(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("a content-length"));
            if buf.len() >= end + 4 + len {
                let status = head.get(9..12).and_then(|c| c.parse().ok());
                buf.drain(..end + 4 + len);
                return status;
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Each keep-alive request gives the connection a new `client_header_timeout` (2 s here) for
/// the next head: a request sent after the first deadline, within the second, is served; the
/// connection then closes once it has been idle for the timeout. (The client's pace is what is
/// under test, so it waits in real time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_keep_alive_request_restarts_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    // Within the first deadline (2 s after the accept), then after it, within the second.
    for at in [1200, 2600] {
        tokio::time::sleep_until((start + Duration::from_millis(at)).into()).await;
        c.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
        assert_eq!(read_answer(&mut c, &mut buf).await, Some(200), "request sent at {at} ms");
    }
    let answered = Instant::now();
    let left = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut c, &mut buf)).await;
    assert_eq!(left, Ok(None), "the idle connection was closed, with nothing more said");
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(1800), "closed {idle:?} after the last answer, before the timeout");
    assert!(idle < Duration::from_secs(5), "kept {idle:?} after the last answer (header timeout 2 s)");
    assert_eq!(b.requests(), 2);
}

/// A stop closes at once a connection whose client has sent nothing yet, on a listener that tells
/// h2c apart and on one without HTTP/2 (where tokio takes a new socket for readable, so the
/// first wait must still watch the stop): it does not wait for the header timeout (20 s here) or
/// the drain timeout (5 s in the tests, so each connection is given 4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_connections_that_have_not_spoken_at_once() {
    use tokio::io::AsyncReadExt;
    let b = Backend::start("b").await;
    let base = BASE_CONFIG.replace("client_header_timeout: 2s", "client_header_timeout: 20s");
    let no_h2 = base.replacen("      port: 0\n", "      port: 0\n      enable_http2: false\n", 1);
    assert_ne!(base, no_h2);
    for (what, config) in [("HTTP/2 on", base.as_str()), ("HTTP/2 off", no_h2.as_str())] {
        let mut gw = TestGateway::start_with(
            config,
            &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[b.addr])),
            1,
        );
        let mut silent = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        // The gateway has the connection (it answers a request on another one meanwhile).
        assert_eq!(get(gw.http(), "/x").await.0, StatusCode::OK, "{what}");
        let start = Instant::now();
        let stopping = tokio::task::spawn_blocking(move || gw.shutdown());
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(4), silent.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{what}: the silent connection was not closed by the stop"
        );
        stopping.await.unwrap();
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "{what}: the stop took {took:?} with a silent connection open"
        );
    }
}

/// A stop also closes at once an idle h2c connection (GOAWAY, then the close) and an idle
/// keep-alive connection served by the general path (here an HTTP/1.0 client asking for
/// keep-alive, which the relay hands to hyper), rather than waiting for their idle timeouts (20 s
/// here) or the drain timeout (5 s in the tests, so each is given 4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_idle_h2c_and_general_path_connections_at_once() {
    use tokio::io::AsyncWriteExt;
    let b = Backend::start("b").await;
    let config = BASE_CONFIG
        .replace("client_header_timeout: 2s", "client_header_timeout: 20s\n    keepalive_timeout: 20s");
    let mut gw = TestGateway::start_with(
        &config,
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[b.addr])),
        1,
    );
    // An HTTP/1.0 keep-alive exchange, on the general path.
    let mut old = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let mut buf = Vec::new();
    old.write_all(b"GET /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    assert_eq!(read_answer(&mut old, &mut buf).await, Some(200));
    // An h2c connection with one exchange behind it.
    let (client, h2_closed) = h2c_after_one_get(gw.http(), "/y").await;

    let start = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || gw.shutdown());
    let left = tokio::time::timeout(Duration::from_secs(4), read_answer(&mut old, &mut buf)).await;
    assert_eq!(left, Ok(None), "the general path's idle connection was not closed by the stop");
    let ended = tokio::time::timeout(Duration::from_secs(4), h2_closed).await;
    assert!(ended.is_ok(), "the idle h2c connection was not closed by the stop");
    stopping.await.unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?} with idle connections open");
    drop(client);
}

/// A stop closes keep-alive connections that wait for their next request at once: it does not
/// wait for their header timeout (20 s here) or the drain timeout (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_idle_keep_alive_connections_at_once() {
    use tokio::io::AsyncWriteExt;
    let b = Backend::start("b").await;
    let config = BASE_CONFIG.replace("client_header_timeout: 2s", "client_header_timeout: 20s");
    let mut gw = TestGateway::start_with(
        &config,
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[b.addr])),
        2,
    );
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        let mut buf = Vec::new();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
        assert_eq!(read_answer(&mut c, &mut buf).await, Some(200));
        conns.push((c, buf));
    }
    let start = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || gw.shutdown());
    for (c, buf) in &mut conns {
        let left = tokio::time::timeout(Duration::from_secs(10), read_answer(c, buf)).await;
        assert_eq!(left, Ok(None), "an idle connection was closed by the stop");
    }
    stopping.await.unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?} with idle connections open");
}

/// A node connection from the pool has its read timeout like a new one, whether it is reused
/// at once or after the timeout's length in the pool: the node answers the first request on
/// each connection and never the next, and each of those gets its 504 after the read timeout
/// (0.5 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_node_connection_keeps_its_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    let node = hand_node(move |mut s| {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            if read_request_head(&mut s).await {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                // Reads the next request and never answers it.
                let _ = read_request_head(&mut s).await;
                let _ = read_request_head(&mut s).await;
            }
        }
    })
    .await;
    // One worker: node connections are pooled per worker.
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!(
            "routes:\n  - uri: /*\n    timeout: {{connect: 1, send: 1, read: 0.5}}\n    upstream: {{retries: 0, nodes: {}}}\n",
            nodes_yaml(&[node])
        ),
        1,
    );
    for pause in [Duration::ZERO, Duration::from_millis(800)] {
        assert_eq!(get(gw.http(), "/first").await.0, StatusCode::OK);
        tokio::time::sleep(pause).await;
        let start = Instant::now();
        assert_eq!(
            get(gw.http(), "/next").await.0,
            StatusCode::GATEWAY_TIMEOUT,
            "after {pause:?} in the pool"
        );
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(400), "a 504 after {took:?}, before the read timeout");
        assert!(took < Duration::from_secs(3), "a 504 after {took:?} (read timeout 0.5 s)");
    }
    // Each `/next` went over the pooled connection of the `/first` before it.
    assert_eq!(connections.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// The forwarding headers a node gets are the same whether the request came over HTTP/1.1
/// (the relay writes them as lines) or HTTP/2 (the general path sets them in the header map),
/// and follow APISIX 3.14+'s `apisix.trusted_addresses`: by default the client's
/// `X-Forwarded-For` gets its address added, its `X-Real-IP` is replaced (not sent twice), its
/// `X-Forwarded-Proto`, `-Host` and `-Port` are replaced by the gateway's (the port the Host
/// names) and its `Forwarded` is dropped; a trusted client's are kept; a client outside a
/// configured list also loses its `X-Forwarded-For`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_the_same_over_http1_and_http2() {
    use tokio::io::AsyncWriteExt;
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let node = hand_node(move |mut s| {
        let heads_tx = heads_tx.clone();
        async move {
            let Some(head) = request_head_bytes(&mut s).await else { return };
            let _ = heads_tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
        }
    })
    .await;
    let sent = [
        ("x-forwarded-for", "198.51.100.7"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("x-real-ip", "10.9.9.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "fwd.example"),
        ("x-forwarded-port", "8443"),
        ("forwarded", "for=198.51.100.7;proto=https"),
    ];
    // The forwarding headers of a head the node got, sorted.
    let forwarding = |head: &str| {
        let mut lines: Vec<String> = head
            .lines()
            .map(|l| l.to_ascii_lowercase())
            .filter(|l| {
                l.starts_with("x-forwarded-") || l.starts_with("x-real-ip") || l.starts_with("forwarded")
            })
            .collect();
        lines.sort();
        lines
    };
    let lines = |list: &[&str]| list.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    for (trusted, kept) in [(None, false), (Some("[127.0.0.1]"), true), (Some("[\"10.0.0.0/8\"]"), false)] {
        let config = match trusted {
            None => BASE_CONFIG.to_string(),
            Some(list) => {
                BASE_CONFIG.replace("  control:", &format!("  trusted_addresses: {list}\n  control:"))
            }
        };
        let gw = TestGateway::start_with(
            &config,
            &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[node])),
            2,
        );
        let port = gw.http().port();
        // The client is 127.0.0.1, in APISIX's default `real_ip_from`: the X-Real-IP it sends
        // names the client (nginx's realip module), whose address ends X-Forwarded-For.
        let expected = if kept {
            lines(&[
                "forwarded: for=198.51.100.7;proto=https",
                "x-forwarded-for: 198.51.100.7, 203.0.113.9, 10.9.9.9",
                "x-forwarded-host: fwd.example",
                "x-forwarded-port: 8443",
                "x-forwarded-proto: https",
                "x-real-ip: 10.9.9.9",
            ])
        } else {
            let xff = if trusted.is_some() {
                "x-forwarded-for: 10.9.9.9"
            } else {
                "x-forwarded-for: 198.51.100.7, 203.0.113.9, 10.9.9.9"
            };
            lines(&[
                xff,
                &format!("x-forwarded-host: shop.example:{port}"),
                &format!("x-forwarded-port: {port}"),
                "x-forwarded-proto: http",
                "x-real-ip: 10.9.9.9",
            ])
        };

        let mut h1 = format!("GET /a HTTP/1.1\r\nhost: shop.example:{port}\r\n");
        for (k, v) in sent {
            h1.push_str(&format!("{k}: {v}\r\n"));
        }
        h1.push_str("\r\n");
        let out = raw(gw.http(), h1.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        let got = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await.unwrap().unwrap();
        assert_eq!(forwarding(&got), expected, "{trusted:?}, over HTTP/1.1: {got}");

        let mut req = Request::get(format!("http://shop.example:{port}/a"));
        for (k, v) in sent {
            req = req.header(k, v);
        }
        let (status, ..) = send_h2(gw.http(), req.body(body("")).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let got = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await.unwrap().unwrap();
        assert_eq!(forwarding(&got), expected, "{trusted:?}, over HTTP/2: {got}");
    }
    // A trusted client's header that it sent empty, or that its Connection header names (a
    // hop-by-hop header then, dropped), is not kept: ours is sent instead.
    let gw = TestGateway::start_with(
        &BASE_CONFIG.replace("  control:", "  trusted_addresses: [127.0.0.1]\n  control:"),
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[node])),
        2,
    );
    let port = gw.http().port();
    let h1 = format!(
        "GET /a HTTP/1.1\r\nhost: shop.example:{port}\r\nconnection: keep-alive, x-forwarded-proto\r\nx-forwarded-proto: https\r\nx-forwarded-host:\r\nx-forwarded-port: 8443\r\n\r\n"
    );
    let out = raw(gw.http(), h1.as_bytes(), Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    let got = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await.unwrap().unwrap();
    let want = lines(&[
        "x-forwarded-for: 127.0.0.1",
        &format!("x-forwarded-host: shop.example:{port}"),
        "x-forwarded-port: 8443",
        "x-forwarded-proto: http",
        "x-real-ip: 127.0.0.1",
    ]);
    assert_eq!(forwarding(&got), want, "trusted client, emptied or hop-by-hop headers: {got}");
}

/// nginx's realip module as APISIX configures it: behind a trusted proxy, the client is the
/// address its header names (here the last untrusted one of `X-Forwarded-For`, recursive):
/// `remote_addrs` routes match it and the node gets it as `X-Real-IP`; a peer that is not in
/// `real_ip_from` names nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ip_from_a_trusted_proxy_is_the_client_address() {
    let b = Backend::start("b").await;
    let routes = format!(
        "routes:\n  - uri: /*\n    remote_addrs: [203.0.113.0/24]\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    );
    let realip = |from: &str| {
        let settings = format!(
            "    client_body_timeout: 2s\n    real_ip_header: X-Forwarded-For\n    real_ip_recursive: \"on\"\n    real_ip_from: [{from}, 10.0.0.0/8]\n"
        );
        let config = BASE_CONFIG.replace("    client_body_timeout: 2s\n", &settings);
        assert_ne!(config, BASE_CONFIG);
        config
    };
    let gw = TestGateway::start_with(&realip("127.0.0.1"), &routes, 1);
    let xff = |v: &'static str| {
        Request::get("/x").header("host", "h").header("x-forwarded-for", v).body(body("")).unwrap()
    };
    let (status, _, answer) = send(gw.http(), xff("198.51.100.1, 203.0.113.5, 10.0.0.7")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(json(&answer)["headers"]["x-real-ip"], "203.0.113.5");
    assert_eq!(
        json(&answer)["headers"]["x-forwarded-for"],
        "198.51.100.1, 203.0.113.5, 10.0.0.7, 203.0.113.5"
    );
    // Over HTTP/2 too.
    let req = Request::get("http://h/x").header("x-forwarded-for", "203.0.113.9").body(body("")).unwrap();
    let (status, _, answer, _) = send_h2(gw.http(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&answer)["headers"]["x-real-ip"], "203.0.113.9");
    // Named outside the route's range, or not named: 404.
    assert_eq!(send(gw.http(), xff("198.51.100.1")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(gw.http(), "/x").await.0, StatusCode::NOT_FOUND);
    drop(gw);
    // 127.0.0.1 is not trusted: its header names nobody.
    let gw = TestGateway::start_with(&realip("192.0.2.1"), &routes, 1);
    assert_eq!(send(gw.http(), xff("203.0.113.5")).await.0, StatusCode::NOT_FOUND);
}

/// `apisix.proxy_protocol.listen_http_port`: a port whose connections start with a PROXY
/// header. Its source is the client only with `real_ip_header: proxy_protocol` and a trusted
/// peer (nginx's realip module); otherwise the peer stays the client. A connection without
/// the header is closed unanswered, and the other ports take none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_port_names_the_client_when_real_ip_says_so() {
    let b = Backend::start("b").await;
    let routes = format!(
        "routes:\n  - uri: /x\n    remote_addrs: [203.0.113.0/24]\n    upstream: {{nodes: {0}}}\n  - uri: /any\n    upstream: {{nodes: {0}}}\n",
        nodes_yaml(&[b.addr])
    );
    let config = |real_ip: &str| {
        let config = BASE_CONFIG
            .replace("  control:", "  proxy_protocol:\n    listen_http_port: 0\n  control:")
            .replace("    client_body_timeout: 2s\n", &format!("    client_body_timeout: 2s\n{real_ip}"));
        assert!(config.contains("listen_http_port"));
        config
    };
    let request = |path: &str| {
        format!(
            "PROXY TCP4 203.0.113.5 192.0.2.1 40000 80\r\nGET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
    };
    let pp_port = |gw: &TestGateway| {
        let port = gw.running().addrs.http.last().expect("the PROXY protocol port").port();
        SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
    };
    let gw = TestGateway::start_with(
        &config("    real_ip_header: proxy_protocol\n    real_ip_from: [127.0.0.1]\n"),
        &routes,
        1,
    );
    let answer =
        String::from_utf8_lossy(&raw(pp_port(&gw), request("/x").as_bytes(), Duration::from_secs(10)).await)
            .into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"x-real-ip\":\"203.0.113.5\""), "{answer}");
    // No header: closed without an answer. The plain port takes none.
    let plain = b"GET /any HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
    assert!(raw(pp_port(&gw), plain, Duration::from_secs(10)).await.is_empty());
    assert!(
        String::from_utf8_lossy(&raw(gw.http(), plain, Duration::from_secs(10)).await)
            .starts_with("HTTP/1.1 200")
    );
    drop(gw);
    // APISIX's default realip (X-Real-IP from 127.0.0.1): the header's address is not the
    // client's, the peer is.
    let gw = TestGateway::start_with(&config(""), &routes, 1);
    let answer =
        String::from_utf8_lossy(&raw(pp_port(&gw), request("/x").as_bytes(), Duration::from_secs(10)).await)
            .into_owned();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = String::from_utf8_lossy(
        &raw(pp_port(&gw), request("/any").as_bytes(), Duration::from_secs(10)).await,
    )
    .into_owned();
    assert!(answer.contains("\"x-real-ip\":\"127.0.0.1\""), "{answer}");
    drop(gw);
    // `apisix.trusted_addresses` is checked against the balancer that sent the PROXY header
    // (APISIX's `realip_remote_addr`), not against the client it names.
    let trusting = config("    real_ip_header: proxy_protocol\n    real_ip_from: [127.0.0.1]\n")
        .replace("  proxy_protocol:\n", "  trusted_addresses: [127.0.0.1]\n  proxy_protocol:\n");
    assert!(trusting.contains("trusted_addresses"));
    let gw = TestGateway::start_with(&trusting, &routes, 1);
    let proto = "PROXY TCP4 203.0.113.5 192.0.2.1 40000 80\r\nGET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";
    let answer = raw(pp_port(&gw), proto.as_bytes(), Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"x-forwarded-proto\":\"https\""), "the balancer is trusted: {answer}");
    drop(gw);
    // `real_ip_header: proxy_protocol`, but the peer is not trusted: the peer is the client.
    let gw = TestGateway::start_with(
        &config("    real_ip_header: proxy_protocol\n    real_ip_from: [10.0.0.0/8]\n"),
        &routes,
        1,
    );
    let answer = raw(pp_port(&gw), request("/x").as_bytes(), Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

/// `nginx_config.event.worker_connections`: a worker with that many live connections accepts
/// no more (the kernel holds them) until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_connections_bounds_live_connections_per_worker() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    // The two connections that fill the worker must not time out while the third waits.
    let config = BASE_CONFIG
        .replace("nginx_config:\n", "nginx_config:\n  event:\n    worker_connections: 2\n")
        .replace("client_header_timeout: 2s", "client_header_timeout: 60s");
    assert!(config.contains("worker_connections") && config.contains("60s"));
    let gw = TestGateway::start_with(
        &config,
        &format!("routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[b.addr])),
        1,
    );
    // Sends a request on `s` and reads the start of its answer.
    async fn ask(s: &mut tokio::net::TcpStream) -> String {
        s.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }
    let mut first = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    assert_eq!(ask(&mut first).await, "HTTP/1.1 200");
    assert_eq!(ask(&mut second).await, "HTTP/1.1 200");
    // A third waits in the backlog: its request is not answered while the two stay open...
    let mut third = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
    let mut waiting = tokio::spawn(async move { ask(&mut third).await });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(early.is_err(), "a third connection was served past worker_connections: 2: {early:?}");
    // ... and is served once one of them closes.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("served").unwrap();
    assert_eq!(answer, "HTTP/1.1 200");
    drop(second);
}

/// A client that sends its request and then half-closes (`printf ... | nc -N`, a shell health
/// check) gets the answer, on the relay (HTTP/1.1) and on the general path (HTTP/1.0, a request
/// without `Host`, a chunked upload), and then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let requests: [&[u8]; 4] = [
        b"GET /relay HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n",
        b"GET /nohost HTTP/1.0\r\n\r\n",
        b"POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ];
    for request in requests {
        let mut s = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("the connection never closed")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        let path = String::from_utf8_lossy(request).split(' ').nth(1).unwrap_or_default().to_string();
        assert!(text.starts_with("HTTP/1.1 200 ") || text.starts_with("HTTP/1.0 200 "), "{path}: {text}");
        assert!(text.contains(&format!("\"uri\":\"{path}\"")), "{path}: {text}");
    }
}

// ------------------------------------------------------------------ mangled traffic

const MANGLED_REQUESTS: &[&[u8]] = &[
    b"GET /m HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /m HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /m HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    b"PUT /m HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /m HTTP/1.0\r\n\r\n",
    b"GET http://h/m?q=1 HTTP/1.1\r\nHost: h:80\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: keep-alive, x-a\r\nx-a: 1\r\n\r\n",
    b"GET /m HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HEAD /m HTTP/1.1\r\nHost: h\r\n\r\nGET /m HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok",
];

const MANGLED_ANSWERS: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
];

/// Mangled requests from clients and mangled answers from a node, plain or `https`, to HTTP/1.1
/// and HTTP/2 clients (lengths and chunk sizes made huge or negative, delimiters dropped or
/// doubled, heads cut short): the gateway answers or closes each connection or stream, never
/// panics (a release build aborts on a panic), never hangs on a client that has stopped
/// sending, and serves a clean request afterwards. Seeded, so a failure repeats;
/// `STRAIT_MANGLE_ROUNDS` runs more rounds than CI's 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_requests_and_answers_never_panic_or_hang_the_gateway() {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let panics = count_panics();
    /// Reads a request head, answers with what `answer` holds, and closes.
    async fn answer_with<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut s: S,
        answer: Arc<Mutex<Vec<u8>>>,
    ) {
        if read_request_head(&mut s).await {
            let bytes = answer.lock().unwrap().clone();
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
        }
    }
    // The node's next answer, set before each request, from a plain node and an `https` one
    // (for the relay's TLS reads).
    let answer = Arc::new(Mutex::new(Vec::new()));
    let next = answer.clone();
    let node = hand_node(move |s| answer_with(s, next.clone())).await;
    let ca = support::certs::Ca::new("mangle-ca");
    let next = answer.clone();
    let tls_node =
        hand_tls_node(support::certs::tls_acceptor(&ca.leaf(&["h"])), move |s| answer_with(s, next.clone()))
            .await;
    let b = Backend::start("clean").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /m*\n    timeout: {{connect: 2, send: 2, read: 2}}\n    upstream: {{retries: 0, nodes: {}}}\n  - uri: /t*\n    timeout: {{connect: 2, send: 2, read: 2}}\n    upstream: {{scheme: https, retries: 0, nodes: {}}}\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[node]),
        nodes_yaml(&[tls_node]),
        nodes_yaml(&[b.addr])
    ));
    let rounds = mangle_rounds(400);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for round in 0..rounds {
        // The request mangled, or the answer, or (one in ten) both.
        let which = rng.below(10);
        let mut request = MANGLED_REQUESTS[rng.below(MANGLED_REQUESTS.len())].to_vec();
        if rng.below(2) == 0 {
            // To the `https` node.
            for i in 0..request.len().saturating_sub(1) {
                if &request[i..i + 2] == b"/m" {
                    request[i + 1] = b't';
                }
            }
        }
        let request =
            if which.is_multiple_of(2) || which == 9 { mangle(&mut rng, &request) } else { request };
        let reply = MANGLED_ANSWERS[rng.below(MANGLED_ANSWERS.len())];
        *answer.lock().unwrap() =
            if !which.is_multiple_of(2) { mangle(&mut rng, reply) } else { reply.to_vec() };
        let mut s = tokio::net::TcpStream::connect(gw.http()).await.unwrap();
        let _ = s.write_all(&request).await;
        // The client is done: whatever the gateway makes of it, the connection must end.
        let _ = s.shutdown().await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got)).await;
        assert!(
            read.is_ok(),
            "round {round}: the connection never ended\nrequest: {:?}\nanswer: {:?}",
            String::from_utf8_lossy(&request),
            String::from_utf8_lossy(&answer.lock().unwrap())
        );
        assert_eq!(panics.load(Ordering::SeqCst), 0, "round {round}: a panic (see above)");
        // A mangled answer to an HTTP/2 client too: the relay decodes the node's framing into
        // HTTP/2 frames for it.
        if !which.is_multiple_of(2) {
            let path = if request.windows(2).any(|w| w == b"/t") { "/t" } else { "/m" };
            let h2 = async {
                let tcp = tokio::net::TcpStream::connect(gw.http()).await.ok()?;
                let (mut sender, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tcp),
                )
                .await
                .ok()?;
                tokio::spawn(conn);
                let req = Request::get(format!("http://h{path}")).body(Full::new(Bytes::new())).ok()?;
                let resp = sender.send_request(req).await.ok()?;
                Some(http_body_util::BodyExt::collect(resp.into_body()).await.is_ok())
            };
            let done = tokio::time::timeout(Duration::from_secs(15), h2).await;
            assert!(done.is_ok(), "round {round}: the HTTP/2 exchange never ended");
            assert_eq!(panics.load(Ordering::SeqCst), 0, "round {round}: a panic (see above)");
        }
    }
    let (status, headers, _) = get(gw.http(), "/clean").await;
    assert_eq!((status, &headers["x-backend"]), (StatusCode::OK, &http::HeaderValue::from_static("clean")));
}

/// Clients that send a mangled request and then neither send more nor close (a slowloris, or a
/// client that lost track of its request): the gateway ends every such connection within its
/// timeouts (here 2 s for heads, bodies and keep-alive, 2 s for the node), none is held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_mid_request_are_closed_within_the_timeouts() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    timeout: {{connect: 2, send: 2, read: 2}}\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let mut rng = Rng(0x5eed_510e_0000_0001);
    let sessions = (0..mangle_rounds(100))
        .map(|_| {
            let seed = MANGLED_REQUESTS[rng.below(MANGLED_REQUESTS.len())];
            (gw.http(), if rng.below(4) == 0 { seed.to_vec() } else { mangle(&mut rng, seed) })
        })
        .collect();
    // No more bytes, and no close: the gateway must end each.
    each_session_ends(sessions, false, Duration::from_secs(20)).await;
}

/// Routes match the path as nginx's `$uri` has it, as APISIX routes: `/static/../api/x`,
/// `//api/x` and `/api%2Fx` take the `/api/*` route, and the node gets the path as the client
/// sent it; a path that climbs above the root is a 400, and reaches no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_path_as_nginx_uri_has_it() {
    let (api, other) = (Backend::start("api").await, Backend::start("other").await);
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /api/*\n    upstream: {{nodes: {}}}\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[api.addr]),
        nodes_yaml(&[other.addr])
    ));
    for path in ["/api/x", "/static/../api/x", "//api/x", "/api%2Fx", "/%61pi/x"] {
        let out = raw_once(
            gw.http(),
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{path}: {text}");
        assert!(text.contains("x-backend: api"), "{path}: {text}");
        assert_eq!(api.state.last_uri.lock().unwrap().as_deref(), Some(path), "the node gets {path} as sent");
    }
    let before = api.requests() + other.requests();
    let out = raw_once(gw.http(), b"GET /../api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&out));
    assert_eq!(api.requests() + other.requests(), before);
}

/// A node whose answer is malformed (nginx's `invalid_header`) gets the client a 502 at once:
/// the request is not sent to another node, as nginx's default `proxy_next_upstream` (`error
/// timeout`) does not, so the request is not run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_answer_is_a_502_and_not_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bad_hits = Arc::new(AtomicUsize::new(0));
    let hits = bad_hits.clone();
    let bad = hand_node(move |mut s| {
        let hits = hits.clone();
        async move {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            hits.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 2000 Weird\r\nContent-Length: 0\r\n\r\n").await;
        }
    })
    .await;
    let good = Backend::start("good").await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    retries: 1\n    nodes: {}\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        nodes_yaml(&[bad, good.addr])
    ));
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..6 {
        match get(gw.http(), "/x").await.0 {
            StatusCode::OK => ok += 1,
            StatusCode::BAD_GATEWAY => failed += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(failed > 0, "the malformed node was picked");
    assert_eq!(bad_hits.load(Ordering::SeqCst), failed, "each 502 is one try of the bad node");
    assert_eq!(good.requests(), ok, "no request went on to the good node after the bad answer");
}

/// TRACE is refused with 405, as nginx refuses it: it would echo the request's headers
/// (cookies, credentials) back; the node never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_is_refused_with_405() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let out =
        raw_once(gw.http(), b"TRACE /x HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nConnection: close\r\n\r\n")
            .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 405"), "{}", String::from_utf8_lossy(&out));
    let req = Request::builder()
        .method("TRACE")
        .uri("/x")
        .header("host", "a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(gw.http(), req).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b.requests(), 0);
    assert_eq!(get(gw.http(), "/x").await.0, StatusCode::OK);
}

/// A small body from an HTTP/2 client, read whole before it goes to the node, is bounded by
/// `client_body_timeout` (2 s here), not by the node's `timeout.send` (0.3 s here): a client
/// that sends it in two parts half a second apart is served, not answered 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_h2_body_sent_slowly_is_bounded_by_client_body_timeout() {
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{timeout: {{connect: 1, send: 0.3, read: 5}}, nodes: {}}}\n",
        nodes_yaml(&[b.addr])
    ));
    let mut client = h2_client(gw.http()).await;
    let req =
        Request::post(format!("http://{}/slow", gw.http())).header("content-length", "10").body(()).unwrap();
    let (answer, mut up) = client.send_request(req, false).unwrap();
    up.send_data(Bytes::from_static(b"12345"), false).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    up.send_data(Bytes::from_static(b"67890"), true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("no answer").unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(b.requests(), 1);
}
