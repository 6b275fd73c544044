//! The shared balancer and health engine through the gateway: distributions, node ejection and
//! re-admission by active and passive checks, state kept across reloads, the all-unhealthy
//! policy, grpc.health.v1 probes, and what the control API reports.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
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

async fn node_status(gw: &TestGateway, upstream: &str, port: u16) -> String {
    let j = gw.control_json(&format!("/v1/healthcheck/upstreams/{upstream}")).await;
    j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["port"] == port)
        .map(|n| n["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
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
