//! Consul, Eureka and Kubernetes discovery against API-faithful fakes (`support::registries`):
//! change propagation (timed), unhealthy/critical/not-ready instances excluded, ACL tokens and
//! Basic auth, failover between registry hosts, namespace/label selection, 410 relists,
//! EndpointSlices, several clusters, several registries behind one upstream, registry outages
//! during traffic (Consul, Eureka, Kubernetes, with reconnects), host names and the node-address
//! fallback in Consul, a stream route fed by discovery, and restarting from a snapshot while the
//! registry is down.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::registries::*;
use support::*;

fn config(discovery: &str) -> String {
    format!(
        "apisix:\n  node_listen: [{{ip: 127.0.0.1, port: 0}}]\n  control: {{ip: 127.0.0.1, port: 0}}\ndiscovery:\n{discovery}"
    )
}

async fn spread(gw: &TestGateway, path: &str, n: usize) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for _ in 0..n {
        let (status, headers, _) = get(gw.http(), path).await;
        let k =
            headers.get("x-backend").map(|v| v.to_str().unwrap().to_string()).unwrap_or(format!("{status}"));
        *c.entry(k).or_default() += 1;
    }
    c
}

async fn ok(gw: &TestGateway, path: &str) -> bool {
    eventually(Duration::from_secs(15), || async { get(gw.http(), path).await.0 == StatusCode::OK }).await
}

/// Sends traffic until `until` holds (or `max` passes) and counts failed requests.
async fn traffic_until<F, Fut>(gw: &TestGateway, path: &str, max: Duration, mut until: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let mut failed = 0;
    while start.elapsed() < max {
        if get(gw.http(), path).await.0 != StatusCode::OK {
            failed += 1;
        }
        if until().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    failed
}

fn consul_config(servers: &[SocketAddr], token: &str, extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"http://{s}\"")).collect();
    config(&format!(
        "  consul:\n    servers: [{}]\n    token: {token}\n    timeout: {{connect: 300, read: 1000, wait: 5}}\n{extra}",
        list.join(", ")
    ))
}

const CONSUL_ROUTE: &str = "upstreams:\n  - id: web\n    discovery_type: consul\n    service_name: web\nroutes:\n  - uri: /*\n    upstream_id: web\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_blocking_queries_tokens_health_and_failover() {
    let (a, b, c, d) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    );
    let consul = FakeConsul::start(Some("s3cret")).await;
    consul.set(
        "web",
        vec![
            consul_instance("a", a.addr, true),
            consul_instance("b", b.addr, true),
            consul_instance("c", c.addr, false),
        ],
    );
    // The first server is dead: the watch fails over to the second.
    let gw = TestGateway::start_with(
        &consul_config(&[closed_port(), consul.addr()], "s3cret", ""),
        CONSUL_ROUTE,
        1,
    );
    assert!(ok(&gw, "/x").await);
    let counts = spread(&gw, "/x", 8).await;
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (Some(&4), Some(&4), None),
        "critical excluded: {counts:?}"
    );

    // A change is pushed through the blocking query, not at the next poll.
    let t = Instant::now();
    consul.set("web", vec![consul_instance("a", a.addr, true), consul_instance("d", d.addr, true)]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let c = spread(&gw, "/x", 4).await;
            c.contains_key("d") && !c.contains_key("b")
        })
        .await
    );
    let took = t.elapsed();
    eprintln!("Consul change reached traffic after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A wrong token never resolves: 503, and the dump says why.
    let gw2 = TestGateway::start_with(&consul_config(&[consul.addr()], "wrong", ""), CONSUL_ROUTE, 1);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let d = gw2.control_json("/v1/discovery/consul/dump").await;
            d["services"][0]["last_error"]["error"].as_str().is_some_and(|e| e.contains("403"))
        })
        .await
    );
    assert_eq!(get(gw2.http(), "/x").await.0, StatusCode::SERVICE_UNAVAILABLE);
}

/// More services than a Consul agent lets one client hold connections for: a blocking query
/// each would need 100 connections at once, and this agent (like a real one past
/// `limits.http_max_conns_per_client`, 200 by default) answers 429 past 80. Every service
/// resolves, the gateway never holds more than 64 blocking queries, two catalog-wide ones and
/// 8 fetches at once, and a change to every service reaches its route. After a reload that
/// replaces every service, the new ones get the blocking queries the old ones gave back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_more_services_than_the_agent_allows_connections() {
    const N: usize = 100;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let consul = FakeConsul::start(None).await;
    consul.limit_connections(80);
    for i in 0..N {
        consul.set(&format!("svc{i}"), vec![consul_instance(&format!("a{i}"), a.addr, true)]);
    }
    let resources = |prefix: &str| {
        let mut res = String::from("upstreams:\n");
        for i in 0..N {
            res.push_str(&format!(
                "  - id: u{i}\n    discovery_type: consul\n    service_name: {prefix}{i}\n"
            ));
        }
        res.push_str("routes:\n");
        for i in 0..N {
            res.push_str(&format!("  - uri: /s{i}/*\n    upstream_id: u{i}\n"));
        }
        res
    };
    let gw = TestGateway::start_with(&consul_config(&[consul.addr()], "", ""), &resources("svc"), 1);
    let all_from = |name: &'static str| {
        let gw = &gw;
        async move {
            for i in 0..N {
                let (status, headers, _) = get(gw.http(), &format!("/s{i}/x")).await;
                if status != StatusCode::OK || headers.get("x-backend").is_none_or(|v| v != name) {
                    return false;
                }
            }
            true
        }
    };
    assert!(eventually(Duration::from_secs(20), || all_from("a")).await, "every service resolves");
    for i in 0..N {
        consul.set(&format!("svc{i}"), vec![consul_instance(&format!("b{i}"), b.addr, true)]);
    }
    assert!(eventually(Duration::from_secs(20), || all_from("b")).await, "every change reaches traffic");
    let most = consul.most_in_flight();
    assert!(most <= 64 + 2 + 8, "{most} requests in flight at once");
    assert_eq!(consul.refused(), 0, "requests refused for the agent's connection limit");
    assert_eq!(consul.blocking_services("svc"), 64);

    // Every service replaced: the new ones resolve, and once a change comes, the 64 blocking
    // queries the old ones held go to new ones.
    for i in 0..N {
        consul.set(&format!("new{i}"), vec![consul_instance(&format!("a{i}"), a.addr, true)]);
    }
    gw.write_resources(&resources("new"));
    assert!(
        eventually(Duration::from_secs(20), || all_from("a")).await,
        "every new service resolves ({} refused, most {})",
        consul.refused(),
        consul.most_in_flight()
    );
    // The discovery dump lists the services followed now, not the replaced ones.
    let dump = gw.control_json("/v1/discovery/consul/dump").await;
    let names: Vec<&str> =
        dump["services"].as_array().unwrap().iter().filter_map(|s| s["service_name"].as_str()).collect();
    assert!(names.len() == N && names.iter().all(|n| n.starts_with("new")), "{names:?}");
    // And the replaced services' watches leave the hub without waiting for another reload.
    let hub = gw.running().shared.hub.clone();
    assert!(
        eventually(Duration::from_secs(5), || async { hub.watch_count() == N }).await,
        "{} watches",
        hub.watch_count()
    );
    consul.set("other", vec![consul_instance("o", b.addr, true)]);
    assert!(
        eventually(Duration::from_secs(20), || async { consul.blocking_services("new") == 64 }).await,
        "{} new services got a blocking query",
        consul.blocking_services("new")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_host_names_and_the_node_address_fallback() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let consul = FakeConsul::start(None).await;
    // `a` registered under a host name; `b` with no service address (the node's is used).
    let by_name = ConsulInstance { address: "localhost".into(), ..consul_instance("a", a.addr, true) };
    let by_node = ConsulInstance {
        address: String::new(),
        node_address: "127.0.0.1".into(),
        ..consul_instance("b", b.addr, true)
    };
    consul.set("web", vec![by_name, by_node]);
    let gw = TestGateway::start_with(&consul_config(&[consul.addr()], "", ""), CONSUL_ROUTE, 1);
    assert!(
        eventually(Duration::from_secs(10), || async { spread(&gw, "/x", 4).await.len() == 2 }).await,
        "both instances serve: {:?}",
        spread(&gw, "/x", 4).await
    );
}

/// Discovery feeds stream upstreams through the same path as HTTP ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_route_follows_a_discovered_service() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (one, two) = (support::servers::Echo::start().await, support::servers::Echo::start().await);
    let consul = FakeConsul::start(None).await;
    consul.set("db", vec![consul_instance("one", one.addr, true)]);
    let conf = consul_config(&[consul.addr()], "", "").replace(
        "discovery:\n",
        "  proxy_mode: http&stream\n  stream_proxy:\n    tcp: [\"127.0.0.1:0\"]\ndiscovery:\n",
    );
    let gw = TestGateway::start_with(
        &conf,
        "upstreams:\n  - id: db\n    discovery_type: consul\n    service_name: db\nstream_routes:\n  - upstream_id: db\n",
        1,
    );
    let session = |msg: &'static [u8]| {
        let addr = gw.stream(0);
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(msg).await.ok()?;
            s.shutdown().await.ok()?;
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.ok()?.ok()?;
            Some(out)
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            session(b"ping").await.as_deref() == Some(b"pingbye")
        })
        .await
    );
    let stream_nodes = || async {
        let j = gw.control_json("/v1/upstreams").await;
        let up = j.as_array().and_then(|a| a.iter().find(|u| u["id"] == "db").cloned()).unwrap_or_default();
        let mut ports: Vec<u64> = up["nodes"]
            .as_array()
            .map(|n| n.iter().filter_map(|n| n["port"].as_u64()).collect())
            .unwrap_or_default();
        ports.sort();
        ports
    };
    // Membership changes reach the stream upstream.
    consul.set("db", vec![consul_instance("two", two.addr, true)]);
    assert!(
        eventually(Duration::from_secs(5), || async { stream_nodes().await == vec![two.addr.port() as u64] })
            .await,
        "nodes: {:?}",
        stream_nodes().await
    );
    assert_eq!(session(b"pong").await.as_deref(), Some(&b"pongbye"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_outage_during_traffic_and_restart_from_a_snapshot() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut consul = FakeConsul::start(None).await;
    consul.set("web", vec![consul_instance("a", a.addr, true)]);
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("consul.dump");
    let extra = format!("    dump: {{path: {}, load_on_init: true, expire: 0}}\n", dump.display());
    let cfg = consul_config(&[consul.addr()], "\"\"", &extra);
    let mut gw = TestGateway::start_with(&cfg, CONSUL_ROUTE, 1);
    assert!(ok(&gw, "/x").await);

    // The registry goes away in the middle of traffic: zero failed requests, state visible.
    consul.stop();
    let stale = || async {
        let d = gw.control_json("/v1/discovery/consul/dump").await;
        !d["services"][0]["stale_since"].is_null()
    };
    let failed = traffic_until(&gw, "/x", Duration::from_secs(10), stale).await;
    assert_eq!(failed, 0);
    assert!(stale().await);
    let metrics = get(gw.control(), "/v1/metrics").await.2;
    assert!(
        String::from_utf8_lossy(&metrics)
            .contains("strait_discovery_stale{discovery=\"consul\",service=\"web\"} 1")
    );

    // It comes back with a change: picked up again.
    consul.restart().await;
    consul.set("web", vec![consul_instance("b", b.addr, true)]);
    assert!(
        eventually(Duration::from_secs(20), || async { spread(&gw, "/x", 2).await.get("b") == Some(&2) })
            .await
    );

    // Restart the gateway while the registry is down: it serves from the snapshot at once.
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::fs::read_to_string(&dump).is_ok_and(|t| t.contains(&b.addr.port().to_string()))
        })
        .await
    );
    consul.stop();
    gw.shutdown();
    let gw = TestGateway::start_with(&cfg, CONSUL_ROUTE, 1);
    let (status, headers, _) = get(gw.http(), "/x").await;
    assert_eq!(status, StatusCode::OK, "served from the snapshot while Consul is down");
    assert_eq!(headers["x-backend"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_status_weights_auth_and_failover() {
    let (a, b, c, d) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    );
    let mut eureka = FakeEureka::start(Some(("eu", "pw"))).await;
    let inst = |addr, status, overridden, weight| EurekaInstance { addr, status, overridden, weight };
    eureka.set(
        "WEB",
        vec![
            inst(a.addr, "UP", None, Some(1)),
            inst(b.addr, "UP", None, Some(3)),
            inst(c.addr, "UP", Some("OUT_OF_SERVICE"), None),
            inst(d.addr, "DOWN", None, None),
        ],
    );
    let gw = TestGateway::start_with(
        &config(&format!(
            "  eureka:\n    host: [\"http://eu:pw@{}\", \"http://eu:pw@{}\"]\n    prefix: /eureka/\n    fetch_interval: 1\n    timeout: {{connect: 300, read: 1000}}\n",
            closed_port(),
            eureka.addr()
        )),
        "upstreams:\n  - id: web\n    discovery_type: eureka\n    service_name: WEB\nroutes:\n  - uri: /*\n    upstream_id: web\n",
        1,
    );
    assert!(ok(&gw, "/x").await);
    let counts = spread(&gw, "/x", 8).await;
    assert_eq!(
        (counts.get("a"), counts.get("b")),
        (Some(&2), Some(&6)),
        "UP only, metadata weights 1:3: {counts:?}"
    );

    let t = Instant::now();
    eureka.set("WEB", vec![inst(d.addr, "UP", None, None)]);
    assert!(
        eventually(Duration::from_secs(10), || async { spread(&gw, "/x", 3).await.get("d") == Some(&3) })
            .await
    );
    eprintln!("Eureka change reached traffic after {:?} (fetch_interval 1 s)", t.elapsed());

    // Every Eureka host goes away in the middle of traffic: zero failed requests, state visible.
    eureka.stop();
    let stale = || async {
        let d = gw.control_json("/v1/discovery/eureka/dump").await;
        !d["services"][0]["stale_since"].is_null()
    };
    let failed = traffic_until(&gw, "/x", Duration::from_secs(10), stale).await;
    assert_eq!(failed, 0, "the last good set keeps serving");
    assert!(stale().await, "the outage is visible in the dump");
    assert_eq!(spread(&gw, "/x", 2).await.get("d"), Some(&2));
}

fn kube_config(k: &FakeKubernetes, extra: &str) -> String {
    let addr = k.addr();
    config(&format!(
        "  kubernetes:\n    service: {{schema: http, host: \"{}\", port: {}}}\n    client: {{token: {}}}\n{extra}",
        addr.ip(),
        addr.port(),
        k.token()
    ))
}

/// The API server goes away mid-traffic and comes back: nothing fails meanwhile, the outage is
/// visible, and the informer reconnects (with backoff) and follows the changes made since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_api_server_outage_and_reconnect() {
    let a = Backend::start_on("127.0.0.44:0".parse().unwrap(), "a").await;
    let port = a.addr.port();
    let _b = Backend::start_on(format!("127.0.0.45:{port}").parse().unwrap(), "b").await;
    let mut k = FakeKubernetes::start("k8s-token").await;
    k.set_endpoints("shop", "web", json!({"app": "web"}), "http", port, &["127.0.0.44"], &[]);
    let gw = TestGateway::start_with(
        &kube_config(&k, ""),
        "upstreams:\n  - id: web\n    discovery_type: kubernetes\n    service_name: shop/web:http\nroutes:\n  - uri: /*\n    upstream_id: web\n",
        1,
    );
    assert!(ok(&gw, "/x").await);
    k.stop();
    let stale = || async {
        let d = gw.control_json("/v1/discovery/kubernetes/dump").await;
        !d["services"][0]["stale_since"].is_null()
    };
    let failed = traffic_until(&gw, "/x", Duration::from_secs(10), stale).await;
    assert_eq!(failed, 0, "the last good set keeps serving");
    assert!(stale().await, "the outage is visible in the dump");

    k.restart().await;
    k.set_endpoints("shop", "web", json!({"app": "web"}), "http", port, &["127.0.0.45"], &[]);
    assert!(
        eventually(Duration::from_secs(20), || async { spread(&gw, "/x", 2).await.get("b") == Some(&2) })
            .await,
        "reconnected and followed the change"
    );
    assert!(!stale().await, "synced again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_list_watch_ready_addresses_selectors_and_410_relists() {
    let a = Backend::start_on("127.0.0.41:0".parse().unwrap(), "a").await;
    let port = a.addr.port();
    let _b = Backend::start_on(format!("127.0.0.42:{port}").parse().unwrap(), "b").await;
    let _c = Backend::start_on(format!("127.0.0.43:{port}").parse().unwrap(), "c").await;
    let k = FakeKubernetes::start("k8s-token").await;
    k.set_endpoints(
        "shop",
        "web",
        json!({"app": "web"}),
        "http",
        port,
        &["127.0.0.41", "127.0.0.42"],
        &["127.0.0.43"],
    );
    // Filtered out by the selectors: another namespace, another label.
    k.set_endpoints("other", "web", json!({"app": "web"}), "http", port, &["127.0.0.43"], &[]);
    k.set_endpoints("shop", "db", json!({"app": "db"}), "http", port, &["127.0.0.43"], &[]);
    let gw = TestGateway::start_with(
        &kube_config(&k, "    namespace_selector: {equal: shop}\n    label_selector: app=web\n"),
        "upstreams:\n  - id: web\n    discovery_type: kubernetes\n    service_name: shop/web:http\n  - id: db\n    discovery_type: kubernetes\n    service_name: shop/db:http\nroutes:\n  - uri: /web/*\n    upstream_id: web\n  - uri: /db/*\n    upstream_id: db\n",
        1,
    );
    assert!(ok(&gw, "/web/x").await);
    let counts = spread(&gw, "/web/x", 8).await;
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (Some(&4), Some(&4), None),
        "ready only: {counts:?}"
    );
    assert_eq!(
        get(gw.http(), "/db/x").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "label selector excludes db"
    );

    // A change arrives through the watch.
    let t = Instant::now();
    k.set_endpoints("shop", "web", json!({"app": "web"}), "http", port, &["127.0.0.43"], &["127.0.0.41"]);
    assert!(
        eventually(Duration::from_secs(5), || async { spread(&gw, "/web/x", 3).await.get("c") == Some(&3) })
            .await
    );
    eprintln!("Kubernetes Endpoints change reached traffic after {:?}", t.elapsed());

    // History compacted: the next watch gets 410 Gone, Strait relists and stays correct.
    let lists = k.lists.load(std::sync::atomic::Ordering::Relaxed);
    k.compact();
    k.set_endpoints("shop", "web", json!({"app": "web"}), "http", port, &["127.0.0.42"], &[]);
    assert!(
        eventually(Duration::from_secs(10), || async { spread(&gw, "/web/x", 3).await.get("b") == Some(&3) })
            .await
    );
    assert!(k.lists.load(std::sync::atomic::Ordering::Relaxed) > lists, "a 410 made Strait list again");

    // The service's Endpoints are deleted: no node, 503.
    k.delete_endpoints("shop", "web");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(gw.http(), "/web/x").await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_endpoint_slices_and_several_clusters() {
    let a = Backend::start_on("127.0.0.51:0".parse().unwrap(), "a").await;
    let port = a.addr.port();
    let _b = Backend::start_on(format!("127.0.0.52:{port}").parse().unwrap(), "b").await;
    let (k1, k2) = (FakeKubernetes::start("t1").await, FakeKubernetes::start("t2").await);
    // Two slices of one service are merged; not-ready endpoints are left out.
    k1.set_slice("ns", "web-abc", "web", "http", port, &[("127.0.0.51", true), ("127.0.0.53", false)]);
    k1.set_slice("ns", "web-def", "web", "http", port, &[("127.0.0.52", true)]);
    k2.set_slice("ns", "web-xyz", "web", "http", port, &[("127.0.0.52", true)]);
    let cluster = |id: &str, k: &FakeKubernetes| {
        format!(
            "    - id: {id}\n      service: {{schema: http, host: \"{}\", port: {}}}\n      client: {{token: {}}}\n      watch_endpoint_slices: true\n",
            k.addr().ip(),
            k.addr().port(),
            k.token()
        )
    };
    let gw = TestGateway::start_with(
        &config(&format!("  kubernetes:\n{}{}", cluster("one", &k1), cluster("two", &k2))),
        "upstreams:\n  - id: one\n    discovery_type: kubernetes\n    service_name: one/ns/web:http\n  - id: two\n    discovery_type: kubernetes\n    service_name: two/ns/web:http\nroutes:\n  - uri: /one/*\n    upstream_id: one\n  - uri: /two/*\n    upstream_id: two\n",
        1,
    );
    assert!(ok(&gw, "/one/x").await && ok(&gw, "/two/x").await);
    let counts = spread(&gw, "/one/x", 8).await;
    assert_eq!((counts.get("a"), counts.get("b")), (Some(&4), Some(&4)), "{counts:?}");
    assert_eq!(spread(&gw, "/two/x", 4).await.get("b"), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_registries_behind_one_upstream() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut consul = FakeConsul::start(None).await;
    consul.set("web", vec![consul_instance("a", a.addr, true)]);
    let eureka = FakeEureka::start(None).await;
    eureka.set("WEB", vec![EurekaInstance { addr: b.addr, status: "UP", overridden: None, weight: Some(1) }]);
    let gw = TestGateway::start_with(
        &config(&format!(
            "  consul:\n    servers: [\"http://{}\"]\n    timeout: {{connect: 300, read: 1000, wait: 5}}\n  eureka:\n    host: [\"http://{}\"]\n    fetch_interval: 1\n",
            consul.addr(),
            eureka.addr()
        )),
        "upstreams:\n  - id: web\n    discovery_sources:\n      - {discovery_type: consul, service_name: web}\n      - {discovery_type: eureka, service_name: WEB}\nroutes:\n  - uri: /*\n    upstream_id: web\n",
        1,
    );
    assert!(eventually(Duration::from_secs(15), || async { spread(&gw, "/x", 4).await.len() == 2 }).await);
    let counts = spread(&gw, "/x", 8).await;
    assert_eq!((counts.get("a"), counts.get("b")), (Some(&4), Some(&4)), "the sets are merged: {counts:?}");

    // One registry down: its last good nodes stay in the merged set; each source's state is
    // tracked separately.
    consul.stop();
    let stale = || async {
        let d = gw.control_json("/v1/discovery/consul/dump").await;
        !d["services"][0]["stale_since"].is_null()
    };
    let failed = traffic_until(&gw, "/x", Duration::from_secs(10), stale).await;
    assert_eq!(failed, 0);
    let e = gw.control_json("/v1/discovery/eureka/dump").await;
    assert!(e["services"][0]["stale_since"].is_null(), "{e}");
    assert_eq!(spread(&gw, "/x", 8).await.len(), 2);
}
