//! The shared balancer and health engine through the gateway: distributions, node ejection and
//! re-admission by active and passive checks, state kept across reloads, the all-unhealthy
//! policy, grpc.health.v1 probes, and what the control API reports.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use support::*;

async fn hit(gw: &TestGateway, path: &str, n: usize) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for _ in 0..n {
        let (status, headers, _) = get(gw.http(), path).await;
        let who = match headers.get("x-backend") {
            Some(v) => v.to_str().unwrap().to_string(),
            None => format!("status {status}"),
        };
        *c.entry(who).or_default() += 1;
    }
    c
}

async fn hit_with_header(gw: &TestGateway, key: &str) -> String {
    let req =
        Request::get("/x").header("host", "h").header("x-user", key).body(Full::new(Bytes::new())).unwrap();
    let (_, headers, _) = send(gw.http(), req).await;
    headers["x-backend"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundrobin_weights_split_exactly_and_weight_zero_gets_nothing() {
    let (a, b, c, z) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("z").await,
    );
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    nodes:\n      \"{}\": 3\n      \"{}\": 2\n      \"{}\": 1\n      \"{}\": 0\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        a.addr, b.addr, c.addr, z.addr
    ));
    let counts = hit(&gw, "/x", 12).await;
    assert_eq!(counts.get("a"), Some(&6), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&4), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("z"), None, "{counts:?}");
}

/// A weight-0 node is a standby: it gets nothing while a weighted node is healthy, and all the
/// traffic once it is the only healthy node (APISIX's picker over the healthy nodes returns a
/// lone node whatever its weight), instead of a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_zero_standby_serves_once_it_is_the_only_healthy_node() {
    let (a, z) = (Backend::start("a").await, Backend::start("z").await);
    let gw = TestGateway::start(&format!(
        "upstreams:
  - id: u
    nodes:
      \"{}\": 1
      \"{}\": 0
    checks:
      active:
        http_path: /healthz
        healthy: {{interval: 30, successes: 3}}
        unhealthy: {{interval: 1, http_failures: 1}}
routes:
  - uri: /*
    upstream_id: u
",
        a.addr, z.addr
    ));
    assert_eq!(hit(&gw, "/x", 4).await.get("a"), Some(&4));
    a.state.health_status.store(503, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_status(&gw, "u", a.addr.port()).await == "unhealthy"
        })
        .await
    );
    let counts = hit(&gw, "/x", 4).await;
    assert_eq!(counts.get("z"), Some(&4), "{counts:?}");
}

/// APISIX's single-node fast path: an upstream of one node with `retries` tries that node
/// again (it is the only one), instead of giving up after the first failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_upstream_retries_its_one_node() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        // Takes each connection and closes it without an answer.
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    retries: 2\n    nodes: {}\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        nodes_yaml(&[node])
    ));
    let (status, _, _) = get(gw.http(), "/x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3, "one try and two retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chash_on_a_header_is_sticky_and_healthy_keys_never_move() {
    let backends = [Backend::start("n0").await, Backend::start("n1").await, Backend::start("n2").await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    type: chash\n    hash_on: header\n    key: X-User\n    nodes: {}\n    checks:\n      active:\n        type: tcp\n        healthy: {{interval: 1, successes: 1}}\n        unhealthy: {{interval: 1, tcp_failures: 1}}\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        nodes_yaml(&addrs)
    ));
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for k in &keys {
        let who = hit_with_header(&gw, k).await;
        assert_eq!(hit_with_header(&gw, k).await, who, "the same key lands on the same node");
        before.insert(k.clone(), who);
    }
    let used: std::collections::HashSet<_> = before.values().collect();
    assert_eq!(used.len(), 3, "keys spread over all nodes");

    // Take n1 down; once the checker sees it, only n1's keys move.
    let [b0, b1, b2] = backends;
    let down = b1.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_status(&gw, "u", down.port()).await == "unhealthy"
        })
        .await
    );
    for k in &keys {
        let now = hit_with_header(&gw, k).await;
        if before[k] == "n1" {
            assert_ne!(now, "n1");
        } else {
            assert_eq!(now, before[k], "key {k} of a healthy node moved");
        }
    }
    drop((b0, b2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_prefers_the_idle_node() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    type: least_conn\n    nodes: {}\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        nodes_yaml(&[a.addr, b.addr])
    ));
    // Three slow requests are spread 2/1 or 1/2; then every quick request goes to the node with
    // fewer in flight.
    let addr = gw.http();
    let slow: Vec<_> = (0..3).map(|_| tokio::spawn(async move { get(addr, "/delay/1500").await })).collect();
    assert!(eventually(Duration::from_secs(3), || async { a.requests() + b.requests() == 3 }).await);
    let busier = if a.requests() > b.requests() { "a" } else { "b" };
    let counts = hit(&gw, "/quick", 6).await;
    assert_eq!(counts.get(busier), None, "least_conn sent quick requests to the busier node: {counts:?}");
    for s in slow {
        assert_eq!(s.await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_groups_fall_back_to_the_lower_group() {
    let (hi, lo) = (Backend::start("hi").await, Backend::start("lo").await);
    let dead = closed_port();
    let gw = TestGateway::start(&format!(
        "upstreams:
  - id: u
    nodes:
      - {{host: 127.0.0.1, port: {}, weight: 1, priority: 10}}
      - {{host: 127.0.0.1, port: {}, weight: 1, priority: 10}}
      - {{host: 127.0.0.1, port: {}, weight: 1, priority: -1}}
routes:
  - uri: /*
    upstream_id: u
",
        hi.addr.port(),
        dead.port(),
        lo.addr.port()
    ));
    let counts = hit(&gw, "/x", 10).await;
    assert_eq!(counts.get("hi"), Some(&10), "the higher group serves while it has a usable node: {counts:?}");
    let addr = hi.stop();
    let counts = hit(&gw, "/x", 6).await;
    assert_eq!(
        counts.get("lo"),
        Some(&6),
        "with the high group refused, retries reach the low group: {counts:?}"
    );
    let _ = addr;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failing_nodes_leave_rotation_and_rejoin() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let gw = TestGateway::start(&format!(
        "upstreams:
  - id: u
    retries: 0
    nodes: {}
    checks:
      active:
        http_path: /healthz
        healthy: {{interval: 1, successes: 1}}
        unhealthy: {{interval: 1, http_failures: 2, tcp_failures: 1}}
routes:
  - uri: /*
    upstream_id: u
",
        nodes_yaml(&[a.addr, b.addr, c.addr])
    ));
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.control_json("/v1/healthcheck").await[0]["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["status"] == "healthy")
        })
        .await
    );

    // b starts answering 500 everywhere; c is refused.
    b.state.force_status.store(500, std::sync::atomic::Ordering::Relaxed);
    let c_addr = c.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_status(&gw, "u", b.addr.port()).await == "unhealthy"
                && node_status(&gw, "u", c_addr.port()).await == "unhealthy"
        })
        .await
    );
    let counts = hit(&gw, "/x", 12).await;
    assert_eq!(counts.get("a"), Some(&12), "only the healthy node gets traffic: {counts:?}");

    // The control API explains why.
    let j = gw.control_json("/v1/healthcheck/upstreams/u").await;
    let node = j["nodes"].as_array().unwrap().iter().find(|n| n["port"] == c_addr.port()).unwrap().clone();
    assert_eq!(node["last_probe"]["ok"], false);
    assert!(node["last_probe"]["detail"].as_str().unwrap().contains("connect"), "{node}");

    // Both recover.
    b.state.force_status.store(0, std::sync::atomic::Ordering::Relaxed);
    let _c = Backend::start_on(c_addr, "c").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_status(&gw, "u", b.addr.port()).await == "healthy"
                && node_status(&gw, "u", c_addr.port()).await == "healthy"
        })
        .await
    );
    let counts = hit(&gw, "/x", 12).await;
    assert_eq!(counts.len(), 3, "all three nodes are back in rotation: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_checks_eject_a_node_failing_real_traffic() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = TestGateway::start(&format!(
        "upstreams:
  - id: u
    nodes: {}
    checks:
      active:
        type: tcp
        healthy: {{interval: 60, successes: 1}}
        unhealthy: {{interval: 60, tcp_failures: 1}}
      passive:
        unhealthy: {{http_statuses: [500], http_failures: 3}}
routes:
  - uri: /*
    upstream_id: u
",
        nodes_yaml(&[a.addr, b.addr])
    ));
    // Let the (slow) active checker take its first look, so only passive reports move b below.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let j = gw.control_json("/v1/healthcheck/upstreams/u").await;
            j["nodes"].as_array().unwrap().iter().all(|n| !n["last_probe"].is_null())
        })
        .await
    );
    b.state.force_status.store(500, std::sync::atomic::Ordering::Relaxed);
    let mut saw_500 = 0;
    for _ in 0..20 {
        if get(gw.http(), "/x").await.0 == StatusCode::INTERNAL_SERVER_ERROR {
            saw_500 += 1;
        }
    }
    assert_eq!(saw_500, 3, "b served exactly three failures before it was ejected");
    assert_eq!(node_status(&gw, "u", b.addr.port()).await, "unhealthy");
    assert_eq!(hit(&gw, "/x", 6).await.get("a"), Some(&6));
}

/// With active checks and no `passive` block, a node whose connections are refused is still
/// taken out by the requests that had to retry away from it (two, APISIX's `tcp_failures`
/// default for such reports), well before the next probe (60 s away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_away_from_a_node_report_it_without_a_passive_block() {
    let a = Backend::start("a").await;
    let dead = closed_port();
    let gw = TestGateway::start(&format!(
        "upstreams:
  - id: u
    nodes: {}
    checks:
      active:
        type: tcp
        healthy: {{interval: 60, successes: 1}}
        unhealthy: {{interval: 60, tcp_failures: 3}}
routes:
  - uri: /*
    upstream_id: u
",
        nodes_yaml(&[a.addr, dead])
    ));
    assert_eq!(node_status(&gw, "u", dead.port()).await, "healthy");
    // Every request is answered by a (the dead node's tries are retried there).
    assert_eq!(hit(&gw, "/x", 8).await.get("a"), Some(&8));
    assert_eq!(node_status(&gw, "u", dead.port()).await, "unhealthy");
}

/// A reload that removes `checks` brings every node back (as APISIX destroys the checker): no
/// probe could ever readmit a node left unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_checks_brings_ejected_nodes_back() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let resources = |checks: &str| {
        format!(
            "upstreams:
  - id: u
    nodes: {}
{checks}routes:
  - uri: /*
    upstream_id: u
",
            nodes_yaml(&[a.addr, b.addr])
        )
    };
    let gw = TestGateway::start(&resources(
        "    checks:
      active:
        http_path: /healthz
        healthy: {interval: 30, successes: 3}
        unhealthy: {interval: 1, http_failures: 1}
",
    ));
    b.state.health_status.store(503, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_status(&gw, "u", b.addr.port()).await == "unhealthy"
        })
        .await
    );
    assert_eq!(hit(&gw, "/x", 4).await.get("a"), Some(&4));
    let v = gw.version();
    gw.write_resources(&resources(""));
    assert!(eventually(Duration::from_secs(5), || async { gw.version() > v }).await);
    let counts = hit(&gw, "/x", 6).await;
    assert_eq!(counts.get("b"), Some(&3), "b is back in rotation: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_survives_a_reload_that_changes_the_node_list() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let upstream = |nodes: &[std::net::SocketAddr]| {
        format!(
            "upstreams:
  - id: u
    nodes: {}
    checks:
      active:
        http_path: /healthz
        healthy: {{interval: 30, successes: 3}}
        unhealthy: {{interval: 1, http_failures: 1}}
routes:
  - uri: /*
    upstream_id: u
",
            nodes_yaml(nodes)
        )
    };
    let gw = TestGateway::start(&upstream(&[a.addr, b.addr]));
    b.state.force_status.store(503, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_status(&gw, "u", b.addr.port()).await == "unhealthy"
        })
        .await
    );
    // b keeps failing; a reload that reset health would show it healthy again at once.
    let v = gw.version();
    gw.write_resources(&upstream(&[c.addr, b.addr, a.addr]));
    assert!(eventually(Duration::from_secs(3), || async { gw.version() > v }).await);
    assert_eq!(node_status(&gw, "u", b.addr.port()).await, "unhealthy", "a reload must not reset health");
    let counts = hit(&gw, "/x", 12).await;
    assert_eq!(counts.get("b"), None, "{counts:?}");
    assert_eq!(counts.len(), 2, "a and the new node c share the traffic: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_carries_an_unchanged_upstream_over_whole() {
    let a = Backend::start("a").await;
    // `kept` has no nodes: every request is refused and counted in `no_node`.
    let resources = |extra_route: &str| {
        format!(
            "upstreams:
  - id: kept
    nodes: []
  - id: web
    nodes: {}
    checks:
      active:
        http_path: /healthz
        healthy: {{interval: 30, successes: 1}}
        unhealthy: {{interval: 30, http_failures: 1}}
routes:
  - uri: /kept/*
    upstream_id: kept
  - uri: /web/*
    upstream_id: web
{extra_route}",
            nodes_yaml(&[a.addr])
        )
    };
    async fn refused(gw: &TestGateway) -> u64 {
        let ups = gw.control_json("/v1/upstreams").await;
        ups.as_array().unwrap().iter().find(|u| u["id"] == "kept").unwrap()["no_node"].as_u64().unwrap()
    }
    let gw = TestGateway::start(&resources(""));
    for _ in 0..2 {
        assert_eq!(get(gw.http(), "/kept/x").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(refused(&gw).await, 2);
    // The first probe of `web`'s node (within a second of the start), then none for 30 s.
    assert!(
        eventually(Duration::from_secs(5), || async { a.state.requests.load(Ordering::Relaxed) >= 1 }).await
    );
    let probes = a.state.requests.load(Ordering::Relaxed);

    // Reloads that only add routes leave both upstreams as they are: the counters go on, and
    // no probe starts over (a rebuilt upstream probes its nodes within a second).
    for i in 0..3 {
        let v = gw.version();
        gw.write_resources(&resources(&format!("  - uri: /other{i}/*\n    upstream_id: kept\n")));
        assert!(eventually(Duration::from_secs(3), || async { gw.version() > v }).await);
    }
    assert_eq!(refused(&gw).await, 2, "the refusals counted before the reloads are still there");
    assert_eq!(get(gw.http(), "/kept/x").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused(&gw).await, 3);
    assert_eq!(get(gw.http(), "/web/x").await.0, StatusCode::OK);
    assert_eq!(a.state.requests.load(Ordering::Relaxed), probes + 1, "no probe since the start, one request");

    // A changed upstream is rebuilt: its counters start again.
    let v = gw.version();
    gw.write_resources(&resources("").replace("nodes: []", "nodes: []\n    retries: 1"));
    assert!(eventually(Duration::from_secs(3), || async { gw.version() > v }).await);
    assert_eq!(refused(&gw).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_uses_all_nodes_by_default_or_fails_when_asked() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.state.force_status.store(503, std::sync::atomic::Ordering::Relaxed);
    b.state.force_status.store(503, std::sync::atomic::Ordering::Relaxed);
    let checks = |policy: &str| {
        format!(
            "    checks:\n      {policy}active:\n        http_path: /healthz\n        healthy: {{interval: 1, successes: 1}}\n        unhealthy: {{interval: 1, http_failures: 1}}\n"
        )
    };
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: open\n    nodes: {n}\n{}  - id: closed\n    nodes: {n}\n{}routes:\n  - uri: /open/*\n    upstream_id: open\n  - uri: /closed/*\n    upstream_id: closed\n",
        checks(""),
        checks("all_unhealthy: fail\n      "),
        n = nodes_yaml(&[a.addr, b.addr])
    ));
    assert!(
        eventually(Duration::from_secs(10), || async {
            let j = gw.control_json("/v1/healthcheck").await;
            j.as_array()
                .unwrap()
                .iter()
                .all(|u| u["nodes"].as_array().unwrap().iter().all(|n| n["status"] == "unhealthy"))
        })
        .await
    );
    // APISIX's rule: every node unhealthy -> use them all (the nodes answer 503 themselves).
    let (status, headers, _) = get(gw.http(), "/open/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("x-backend"), "the request reached a node");
    let ups = gw.control_json("/v1/upstreams").await;
    let open = ups.as_array().unwrap().iter().find(|u| u["id"] == "open").unwrap();
    assert!(open["all_unhealthy_picks"].as_u64().unwrap() >= 1);
    // The explicit policy answers 503 itself, without touching a node.
    let (status, headers, body) = get(gw.http(), "/closed/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!headers.contains_key("x-backend"));
    assert!(String::from_utf8_lossy(&body).contains("unhealthy"), "{}", String::from_utf8_lossy(&body));
}

// ------------------------------------------------------------------------------------------
// chash keys (APISIX `fetch_chash_hash_key`): the value of the variable, header or cookie is
// hashed as a string; a missing key falls back to `remote_addr`. Where a key must land is
// computed with APISIX's ring ([`apisix_pick`]), independently of the gateway.

/// The client address of the default test client.
const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The node that answered one GET sent from source address `src` (any 127.0.0.0/8 address),
/// with extra request headers. Panics if no node answered (chash always reaches a node here).
async fn served_by(gw: &TestGateway, src: Ipv4Addr, uri: &str, headers: &[(&str, &str)]) -> String {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((src, 0))).expect("bind the client source address");
    let stream = sock.connect(gw.http()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(uri).header("host", "h");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp =
        sender.send_request(req.body(Full::new(Bytes::new())).expect("request")).await.expect("response");
    match resp.headers().get("x-backend") {
        Some(v) => v.to_str().expect("x-backend").to_string(),
        None => panic!("{uri} from {src}: no node answered (status {})", resp.status()),
    }
}

/// One chash upstream entry (for the `upstreams:` list).
fn chash_upstream(id: &str, hash_on: &str, key: &str, nodes: &[SocketAddr]) -> String {
    format!(
        "  - id: {id}\n    type: chash\n    hash_on: {hash_on}\n    key: \"{key}\"\n    nodes: {}\n",
        nodes_yaml(nodes)
    )
}

/// Resources with these chash upstreams; each is routed at `/<id>/*`.
fn chash_resources(upstreams: &[(&str, &str, &str)], nodes: &[SocketAddr]) -> String {
    let mut s = String::from("upstreams:\n");
    for (id, hash_on, key) in upstreams {
        s.push_str(&chash_upstream(id, hash_on, key, nodes));
    }
    s.push_str("routes:\n");
    for (id, _, _) in upstreams {
        s.push_str(&format!("  - id: r-{id}\n    uri: /{id}/*\n    upstream_id: {id}\n"));
    }
    s
}

async fn three_backends() -> ([Backend; 3], Vec<SocketAddr>) {
    let b = [Backend::start("n0").await, Backend::start("n1").await, Backend::start("n2").await];
    let addrs = b.iter().map(|b| b.addr).collect();
    (b, addrs)
}

/// The node APISIX's chash (lua-resty-chash, equal weights) picks for `key`, computed here
/// independently of the gateway: node id `ip\0port`; 160 points per node, point i being
/// `crc32(id ++ le_bytes(point i-1))` from 0; the key goes to the first point whose hash is
/// >= `crc32(key)`, wrapping to the first point. Names follow [`three_backends`].
fn apisix_pick(nodes: &[SocketAddr], key: &str) -> String {
    let mut points = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let id = format!("{}\0{}", n.ip(), n.port());
        let mut prev = 0u32;
        for _ in 0..160 {
            let mut h = crc32fast::Hasher::new();
            h.update(id.as_bytes());
            h.update(&prev.to_le_bytes());
            prev = h.finalize();
            points.push((prev, i));
        }
    }
    points.sort_unstable();
    let k = crc32fast::hash(key.as_bytes());
    let i = points.iter().find(|p| p.0 >= k).unwrap_or(&points[0]).1;
    format!("n{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chash_on_a_query_argument_is_sticky_and_spreads() {
    let (_b, nodes) = three_backends().await;
    let gw = TestGateway::start(&chash_resources(&[("arg", "vars", "arg_user")], &nodes));
    let mut used = HashSet::new();
    for i in 0..60 {
        let key = format!("user-{i}");
        let first = served_by(&gw, LOCAL, &format!("/arg/x?user={key}"), &[]).await;
        for n in 0..4 {
            // Other arguments, their order and the client address do not matter.
            let (src, uri) = match n {
                0 => (LOCAL, format!("/arg/x?user={key}")),
                1 => (Ipv4Addr::new(127, 0, 0, 2), format!("/arg/x?user={key}")),
                2 => (LOCAL, format!("/arg/x?a=1&user={key}&b=2")),
                _ => (Ipv4Addr::new(127, 0, 0, 3), format!("/arg/other/path?user={key}&z=9")),
            };
            assert_eq!(
                served_by(&gw, src, &uri, &[]).await,
                first,
                "{uri} from {src} moved off key {key}'s node"
            );
        }
        // The hashed value is the argument's value, as for any other key source.
        assert_eq!(apisix_pick(&nodes, &key), first, "arg_user={key} hashed something else than {key:?}");
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "60 users spread over all three nodes: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chash_on_remote_addr_and_the_fallback_for_missing_keys() {
    let (_b, nodes) = three_backends().await;
    let gw = TestGateway::start(&chash_resources(
        &[
            ("raddr", "vars", "remote_addr"),
            ("arg", "vars", "arg_user"),
            ("ck", "cookie", "sid"),
            ("hv", "header", "X-Session"),
            ("combo", "vars_combinations", "$arg_a-$arg_b"),
        ],
        &nodes,
    ));
    let mut used = HashSet::new();
    for last in 2..42u8 {
        let src = Ipv4Addr::new(127, 0, 0, last);
        let node = served_by(&gw, src, "/raddr/x", &[]).await;
        for _ in 0..3 {
            assert_eq!(served_by(&gw, src, "/raddr/y?q=1", &[]).await, node, "client {src} moved");
        }
        assert_eq!(
            apisix_pick(&nodes, &src.to_string()),
            node,
            "remote_addr must hash the client address {src} as a string"
        );
        // APISIX: a key that is missing falls back to remote_addr, for every hash_on.
        for (uri, headers) in [
            ("/arg/x", &[][..]),
            ("/arg/x?other=1", &[][..]),
            ("/ck/x", &[][..]),
            ("/ck/x", &[("cookie", "other=1; sid2=x")][..]),
            ("/hv/x", &[("x-user", "not-this-one")][..]),
            ("/combo/x", &[][..]),
            ("/combo/x?c=1", &[][..]),
        ] {
            assert_eq!(
                served_by(&gw, src, uri, headers).await,
                node,
                "{uri} {headers:?} from {src} without its key must use remote_addr"
            );
        }
        used.insert(node);
    }
    assert_eq!(used.len(), 3, "40 client addresses spread over all three nodes: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chash_on_a_cookie_is_sticky_spreads_and_names_are_case_sensitive() {
    let (_b, nodes) = three_backends().await;
    let gw = TestGateway::start(&chash_resources(&[("ck", "cookie", "sid")], &nodes));
    let mut used = HashSet::new();
    for i in 0..60 {
        let key = format!("sess{i}");
        let first = served_by(&gw, LOCAL, "/ck/x", &[("cookie", &format!("sid={key}"))]).await;
        for cookie in
            [format!("sid={key}"), format!("theme=dark; sid={key}; lang=en"), format!("xsid=nope; sid={key}")]
        {
            for src in [LOCAL, Ipv4Addr::new(127, 0, 0, 9)] {
                assert_eq!(
                    served_by(&gw, src, "/ck/x", &[("cookie", &cookie)]).await,
                    first,
                    "cookie {cookie:?} from {src} moved off sid {key}'s node"
                );
            }
        }
        assert_eq!(apisix_pick(&nodes, &key), first, "cookie sid={key} hashed something else than {key:?}");
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "60 sessions spread over all three nodes: {used:?}");

    // Cookie names are case-sensitive: `SID` is not `sid`, so the key is missing and every
    // such request from one client lands on the client address's node.
    let local_node = apisix_pick(&nodes, "127.0.0.1");
    for i in 0..20 {
        assert_eq!(
            served_by(&gw, LOCAL, "/ck/x", &[("cookie", &format!("SID=sess{i}"))]).await,
            local_node,
            "cookie SID=sess{i} must not count as sid"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chash_on_vars_combinations_hashes_the_resolved_template() {
    let (_b, nodes) = three_backends().await;
    let gw = TestGateway::start(&chash_resources(&[("combo", "vars_combinations", "$arg_a-$arg_b")], &nodes));
    let mut used = HashSet::new();
    for i in 0..40 {
        let (a, b) = (format!("a{i}"), format!("b{}", i * 7));
        let first = served_by(&gw, LOCAL, &format!("/combo/x?a={a}&b={b}"), &[]).await;
        for (src, uri) in [
            (LOCAL, format!("/combo/x?b={b}&a={a}")),
            (Ipv4Addr::new(127, 0, 0, 5), format!("/combo/y?a={a}&z=1&b={b}")),
        ] {
            assert_eq!(served_by(&gw, src, &uri, &[]).await, first, "{uri} from {src} moved");
        }
        // The key is the template with each `$var` replaced: "a<i>-b<j>".
        assert_eq!(
            apisix_pick(&nodes, &format!("{a}-{b}")),
            first,
            "a={a}&b={b} must hash the string \"{a}-{b}\""
        );
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "40 combinations spread over all three nodes: {used:?}");

    // Both variables matter: fixing one and varying the other still spreads.
    let mut by_b = HashSet::new();
    let mut by_a = HashSet::new();
    for i in 0..30 {
        by_b.insert(served_by(&gw, LOCAL, &format!("/combo/x?a=fixed&b=v{i}"), &[]).await);
        by_a.insert(served_by(&gw, LOCAL, &format!("/combo/x?a=v{i}&b=fixed"), &[]).await);
    }
    assert!(by_b.len() > 1, "varying only arg b never changed the node: {by_b:?}");
    assert!(by_a.len() > 1, "varying only arg a never changed the node: {by_a:?}");

    // One variable resolved: the other one becomes "" (APISIX resolve_var), not a fallback.
    for i in 0..10 {
        let a = format!("only{i}");
        assert_eq!(
            served_by(&gw, LOCAL, &format!("/combo/x?a={a}"), &[]).await,
            apisix_pick(&nodes, &format!("{a}-")),
            "a={a} without b must hash \"{a}-\""
        );
        assert_eq!(
            served_by(&gw, LOCAL, &format!("/combo/x?b={a}"), &[]).await,
            apisix_pick(&nodes, &format!("-{a}")),
            "b={a} without a must hash \"-{a}\""
        );
    }
}

/// APISIX resolves `vars_combinations` keys with `core.utils.resolve_var`, whose pattern
/// `(?<!\\)\$(\{\s*([^}]+?)\s*\}|([\w\.]+))` also takes the braced form `${var}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chash_on_vars_combinations_accepts_braced_variables() {
    let (_b, nodes) = three_backends().await;
    let gw =
        TestGateway::start(&chash_resources(&[("combo", "vars_combinations", "${arg_a}${arg_b}")], &nodes));
    let mut used = HashSet::new();
    for i in 0..30 {
        let node = served_by(&gw, LOCAL, &format!("/combo/x?a=k{i}&b=x"), &[]).await;
        assert_eq!(
            node,
            apisix_pick(&nodes, &format!("k{i}x")),
            "${{arg_a}}${{arg_b}} with a=k{i}, b=x must hash \"k{i}x\""
        );
        used.insert(node);
    }
    assert!(used.len() > 1, "every key landed on one node (braces not resolved?): {used:?}");
}

// ------------------------------------------------------------------------------------------
// Priority groups with active health checks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_empty_a_priority_group_and_traffic_falls_through_and_back() {
    let (hi1, hi2, lo) =
        (Backend::start("hi1").await, Backend::start("hi2").await, Backend::start("lo").await);
    let gw = TestGateway::start(&format!(
        "upstreams:
  - id: u
    nodes:
      - {{host: 127.0.0.1, port: {}, weight: 1, priority: 10}}
      - {{host: 127.0.0.1, port: {}, weight: 1, priority: 10}}
      - {{host: 127.0.0.1, port: {}, weight: 1, priority: 0}}
    checks:
      active:
        http_path: /healthz
        healthy: {{interval: 1, successes: 1}}
        unhealthy: {{interval: 1, http_failures: 1}}
routes:
  - uri: /*
    upstream_id: u
",
        hi1.addr.port(),
        hi2.addr.port(),
        lo.addr.port()
    ));
    let gw_ref = &gw;
    let status = move |b: &Backend| {
        let port = b.addr.port();
        async move { node_status(gw_ref, "u", port).await }
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(&hi1).await == "healthy"
                && status(&hi2).await == "healthy"
                && status(&lo).await == "healthy"
        })
        .await,
        "all nodes start healthy"
    );
    let counts = hit(&gw, "/x", 10).await;
    assert_eq!(
        (counts.get("hi1"), counts.get("hi2"), counts.get("lo")),
        (Some(&5), Some(&5), None),
        "{counts:?}"
    );

    // hi1 still accepts connections and serves real traffic, only its health path fails.
    hi1.state.health_status.store(500, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async { status(&hi1).await == "unhealthy" }).await,
        "the active checker never marked hi1 unhealthy"
    );
    let counts = hit(&gw, "/x", 10).await;
    assert_eq!(counts.get("hi2"), Some(&10), "the group's healthy node takes everything: {counts:?}");

    // Both high nodes unhealthy: the group disappears and the low group serves.
    hi2.state.health_status.store(500, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async { status(&hi2).await == "unhealthy" }).await,
        "the active checker never marked hi2 unhealthy"
    );
    assert_eq!(status(&lo).await, "healthy");
    let counts = hit(&gw, "/x", 10).await;
    assert_eq!(counts.get("lo"), Some(&10), "an ejected group falls through to the lower one: {counts:?}");

    // hi1 recovers: traffic returns to the higher group at once.
    hi1.state.health_status.store(0, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || async { status(&hi1).await == "healthy" }).await,
        "the active checker never re-admitted hi1"
    );
    let counts = hit(&gw, "/x", 10).await;
    assert_eq!(counts.get("hi1"), Some(&10), "traffic returns to the recovered higher group: {counts:?}");
}

// ------------------------------------------------------------------------------------------
// Active probe options.

const PROBE_CHECKS: &str = "    checks:
      active:
        http_path: /probe/deep
        host: probe.example
        req_headers: [\"X-Probe-Token: s3cret\", \"X-Probe-Extra: 1\"]
        healthy: {interval: 1, successes: 1}
        unhealthy: {interval: 1, http_failures: 1}
";

fn probed_upstream(nodes: &[SocketAddr], checks: &str) -> String {
    format!(
        "upstreams:\n  - id: u\n    nodes: {}\n{checks}routes:\n  - uri: /*\n    upstream_id: u\n",
        nodes_yaml(nodes)
    )
}

fn last_probe(b: &Backend) -> (Option<String>, http::HeaderMap) {
    let uri = b.state.last_uri.lock().expect("lock").clone();
    let headers = b.state.last_headers.lock().expect("lock").clone().unwrap_or_default();
    (uri, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_probes_use_path_host_and_headers_and_stop_for_removed_nodes() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = TestGateway::start(&probed_upstream(&[a.addr, b.addr], PROBE_CHECKS));
    // No client traffic in this test: everything the nodes see is a probe.
    assert!(
        eventually(Duration::from_secs(5), || async { a.requests() >= 1 && b.requests() >= 1 }).await,
        "both nodes are probed"
    );
    for node in [&a, &b] {
        let (uri, headers) = last_probe(node);
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(uri.as_deref(), Some("/probe/deep"), "{}: http_path", node.name);
        assert_eq!(
            h("host").as_deref(),
            Some("probe.example"),
            "{}: checks.active.host is the Host",
            node.name
        );
        assert_eq!(h("x-probe-token").as_deref(), Some("s3cret"), "{}: req_headers", node.name);
        assert_eq!(h("x-probe-extra").as_deref(), Some("1"), "{}: req_headers", node.name);
    }
    // b is probed over and over while it is a node.
    let b0 = b.requests();
    assert!(
        eventually(Duration::from_secs(6), || async { b.requests() >= b0 + 2 }).await,
        "b probed repeatedly"
    );

    // Remove b by a reload.
    let v = gw.version();
    gw.write_resources(&probed_upstream(&[a.addr], PROBE_CHECKS));
    assert!(eventually(Duration::from_secs(5), || async { gw.version() > v }).await, "reload applied");
    // A probe of b already under way may still land; once a has been probed twice more (a
    // full interval later) none may.
    let a0 = a.requests();
    assert!(
        eventually(Duration::from_secs(5), || async { a.requests() >= a0 + 2 }).await,
        "a is still probed"
    );
    let (a1, b1) = (a.requests(), b.requests());
    // a's probes are the clock: three more intervals.
    assert!(
        eventually(Duration::from_secs(8), || async { a.requests() >= a1 + 3 }).await,
        "the surviving node a keeps being probed after the reload"
    );
    assert_eq!(b.requests(), b1, "the removed node b is still probed");
    let j = gw.control_json("/v1/healthcheck/upstreams/u").await;
    let ports: Vec<_> = j["nodes"].as_array().expect("nodes").iter().map(|n| n["port"].clone()).collect();
    assert_eq!(ports, vec![serde_json::json!(a.addr.port())], "{j}");
}

/// lua-resty-healthcheck sends `GET <path> HTTP/1.0`, the `req_headers`, then `Host` — no
/// header of its own besides Host, so a `User-Agent` in `req_headers` is the only one the
/// node sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_probe_req_headers_user_agent_is_the_only_one() {
    let a = Backend::start("a").await;
    let checks = "    checks:\n      active:\n        http_path: /probe\n        req_headers: [\"User-Agent: lb-probe/1\"]\n        healthy: {interval: 1, successes: 1}\n        unhealthy: {interval: 1, http_failures: 1}\n";
    let _gw = TestGateway::start(&probed_upstream(&[a.addr], checks));
    assert!(eventually(Duration::from_secs(5), || async { a.requests() >= 1 }).await, "a is probed");
    let (uri, headers) = last_probe(&a);
    assert_eq!(uri.as_deref(), Some("/probe"));
    let agents: Vec<_> =
        headers.get_all("user-agent").iter().map(|v| v.to_str().unwrap_or("?").to_string()).collect();
    assert_eq!(agents, vec!["lb-probe/1".to_string()], "the configured User-Agent must be the only one");
}

// ------------------------------------------------------------------------------------------
// ewma

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ewma_sends_clearly_less_to_a_slow_node_whatever_its_weight() {
    let (f1, f2, slow) =
        (Backend::start("f1").await, Backend::start("f2").await, Backend::start("slow").await);
    slow.state.delay_ms.store(150, Ordering::Relaxed);
    // Weights are ignored by ewma: the slow node's weight 10 must not attract traffic.
    let gw = TestGateway::start(&format!(
        "upstreams:\n  - id: u\n    type: ewma\n    nodes:\n      \"{}\": 1\n      \"{}\": 1\n      \"{}\": 10\nroutes:\n  - uri: /*\n    upstream_id: u\n",
        f1.addr, f2.addr, slow.addr
    ));
    let n = 60;
    let counts = hit(&gw, "/x", n).await;
    let (c1, c2, cs) = (
        counts.get("f1").copied().unwrap_or(0),
        counts.get("f2").copied().unwrap_or(0),
        counts.get("slow").copied().unwrap_or(0),
    );
    assert_eq!(c1 + c2 + cs, n, "every request reached a node: {counts:?}");
    assert!(cs <= n / 6, "the slow node got {cs} of {n}: {counts:?}");
    assert!(c1 > cs && c2 > cs, "each fast node got more than the slow one: {counts:?}");
}
