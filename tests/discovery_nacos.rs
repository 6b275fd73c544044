//! Nacos discovery against a real Nacos-compatible server (rnacos): weights, a registration and
//! a deregistration reaching traffic (timed), namespace and group separation, unhealthy and
//! disabled instances excluded, an outage during traffic, failover between Nacos hosts.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::servers::Nacos;
use support::*;

fn config(hosts: &[String]) -> String {
    let list: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "apisix:
  node_listen: [{{ip: 127.0.0.1, port: 0}}]
  control: {{ip: 127.0.0.1, port: 0}}
discovery:
  nacos:
    host: [{}]
    fetch_interval: 1
    timeout: {{connect: 500, send: 500, read: 1000}}
",
        list.join(", ")
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

fn upstream(id: &str, service: &str, args: &str) -> String {
    format!("  - id: {id}\n    discovery_type: nacos\n    service_name: {service}\n{args}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_and_registration_changes_reach_traffic_quickly() {
    let Some(nacos) = Nacos::start().await else { return };
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    nacos.register("web", "DEFAULT_GROUP", "public", a.addr, 1.0, "").await;
    nacos.register("web", "DEFAULT_GROUP", "public", b.addr, 3.0, "").await;
    let gw = TestGateway::start_with(
        &config(&[format!("http://{}", nacos.addr)]),
        &format!("upstreams:\n{}routes:\n  - uri: /*\n    upstream_id: web\n", upstream("web", "web", "")),
        1,
    );
    assert!(eventually(Duration::from_secs(15), || async { spread(&gw, "/x", 4).await.len() == 2 }).await);
    let counts = spread(&gw, "/x", 8).await;
    assert_eq!((counts.get("a"), counts.get("b")), (Some(&2), Some(&6)), "weights 1:3: {counts:?}");

    let t = Instant::now();
    nacos.register("web", "DEFAULT_GROUP", "public", c.addr, 1.0, "").await;
    assert!(
        eventually(Duration::from_secs(10), || async { spread(&gw, "/x", 10).await.contains_key("c") }).await
    );
    let add = t.elapsed();
    let t = Instant::now();
    nacos.deregister("web", "DEFAULT_GROUP", "public", b.addr).await;
    assert!(
        eventually(Duration::from_secs(10), || async { !spread(&gw, "/x", 10).await.contains_key("b") })
            .await
    );
    let remove = t.elapsed();
    eprintln!("Nacos registration reached traffic after {add:?}, deregistration after {remove:?}");
    assert!(add < Duration::from_secs(5) && remove < Duration::from_secs(5), "{add:?} {remove:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_groups_and_instance_state() {
    // rnacos probes persistent instances every second: one registered where nothing listens
    // turns unhealthy.
    let Some(nacos) = Nacos::start_probing(1).await else { return };
    let (g1, g2, dev, off) = (
        Backend::start("g1").await,
        Backend::start("g2").await,
        Backend::start("dev").await,
        Backend::start("off").await,
    );
    let sick = closed_port();
    nacos.register("svc", "DEFAULT_GROUP", "public", g1.addr, 1.0, "").await;
    nacos.register("svc", "G2", "public", g2.addr, 1.0, "").await;
    nacos.register("svc", "DEFAULT_GROUP", "dev", dev.addr, 1.0, "").await;
    nacos.register("svc", "DEFAULT_GROUP", "public", sick, 1.0, "").await;
    nacos.register("svc", "DEFAULT_GROUP", "public", off.addr, 1.0, "&enabled=false").await;
    let gw = TestGateway::start_with(
        &config(&[format!("http://{}", nacos.addr)]),
        &format!(
            "upstreams:\n{}{}{}routes:\n  - uri: /default/*\n    upstream_id: default\n  - uri: /g2/*\n    upstream_id: g2\n  - uri: /dev/*\n    upstream_id: dev\n",
            upstream("default", "svc", ""),
            upstream("g2", "svc", "    discovery_args: {group_name: G2}\n"),
            upstream("dev", "svc", "    discovery_args: {namespace_id: dev}\n"),
        ),
        1,
    );
    // Until rnacos has probed the dead instance, requests may be retried past it; wait for it
    // to leave the set.
    assert!(
        eventually(Duration::from_secs(20), || async {
            let d = gw.control_json("/v1/discovery/nacos/dump").await;
            d["services"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["nodes"].as_array().unwrap().iter().all(|n| n["port"] != sick.port()))
                && d["services"].as_array().unwrap().len() == 3
        })
        .await,
        "the unhealthy instance is excluded"
    );
    for (path, who) in [("/default/x", "g1"), ("/g2/x", "g2"), ("/dev/x", "dev")] {
        assert!(
            eventually(Duration::from_secs(15), || async { get(gw.http(), path).await.0 == StatusCode::OK })
                .await,
            "{path}"
        );
        let counts = spread(&gw, path, 6).await;
        assert_eq!(counts.get(who), Some(&6), "{path}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_serving_and_a_dead_host_fails_over() {
    let Some(mut nacos) = Nacos::start().await else { return };
    let a = Backend::start("a").await;
    nacos.register("web", "DEFAULT_GROUP", "public", a.addr, 1.0, "").await;
    let dead: SocketAddr = closed_port();
    let gw = TestGateway::start_with(
        &config(&[format!("http://{dead}"), format!("http://{}", nacos.addr)]),
        &format!("upstreams:\n{}routes:\n  - uri: /*\n    upstream_id: web\n", upstream("web", "web", "")),
        1,
    );
    assert!(
        eventually(Duration::from_secs(20), || async { get(gw.http(), "/x").await.0 == StatusCode::OK })
            .await,
        "a dead first host must fail over to the live one"
    );
    nacos.stop();
    let down = Instant::now();
    let mut failed = 0;
    let stale = || async {
        let d = gw.control_json("/v1/discovery/nacos/dump").await;
        !d["services"][0]["stale_since"].is_null()
    };
    while down.elapsed() < Duration::from_secs(20) {
        if get(gw.http(), "/x").await.0 != StatusCode::OK {
            failed += 1;
        }
        if down.elapsed() > Duration::from_secs(2) && stale().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failed, 0, "traffic continues while Nacos is down");
    assert!(stale().await, "the outage is visible in the dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grpc_api_the_v1_open_api_is_polled() {
    // gRPC on HTTP+1500, where no client looks: as far as Strait can tell, a Nacos 1.x server.
    let Some(nacos) = Nacos::start_with(0, 1500).await else { return };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    nacos.register("old", "DEFAULT_GROUP", "public", a.addr, 1.0, "").await;
    let gw = TestGateway::start_with(
        &config(&[format!("http://{}", nacos.addr)]),
        &format!("upstreams:\n{}routes:\n  - uri: /*\n    upstream_id: old\n", upstream("old", "old", "")),
        1,
    );
    assert!(
        eventually(Duration::from_secs(20), || async { get(gw.http(), "/x").await.0 == StatusCode::OK })
            .await
    );
    nacos.register("old", "DEFAULT_GROUP", "public", b.addr, 1.0, "").await;
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(10), || async { spread(&gw, "/x", 6).await.len() == 2 }).await);
    eprintln!("Nacos v1 polling (fetch_interval 1 s) picked up a change after {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacos_that_starts_after_the_gateway_is_followed_by_push() {
    // fetch_interval 30: a gateway left polling would see the second registration late.
    let Some(mut nacos) = Nacos::reserve(0, 1000) else { return };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let conf = config(&[format!("http://{}", nacos.addr)]).replace("fetch_interval: 1", "fetch_interval: 30");
    let gw = TestGateway::start_with(
        &conf,
        &format!("upstreams:\n{}routes:\n  - uri: /*\n    upstream_id: web\n", upstream("web", "web", "")),
        1,
    );
    assert_eq!(get(gw.http(), "/x").await.0, StatusCode::SERVICE_UNAVAILABLE, "never resolved: 503");
    nacos.launch().await;
    nacos.register("web", "DEFAULT_GROUP", "public", a.addr, 1.0, "").await;
    assert!(
        eventually(Duration::from_secs(30), || async { get(gw.http(), "/x").await.0 == StatusCode::OK })
            .await,
        "the registry came up: its nodes serve"
    );
    nacos.register("web", "DEFAULT_GROUP", "public", b.addr, 1.0, "").await;
    let t = Instant::now();
    // The gateway retries the gRPC API 5 s after the failed first attempt and then follows
    // pushes; stuck on v1 polling it would see `b` only at the next poll, 30 s after the first.
    assert!(
        eventually(Duration::from_secs(12), || async { spread(&gw, "/x", 6).await.len() == 2 }).await,
        "after a late start the gRPC subscription is used (pushes), not 30 s polling"
    );
    eprintln!("late-started Nacos: a registration reached traffic after {:?}", t.elapsed());
}

/// Two upstreams on one Nacos service (here an `http` and a `grpc` one: two watches, one SDK
/// subscription). A reload that drops one of them must leave the other's pushes alone: the
/// SDK's unsubscribe ends the service's subscription for every listener, so it is sent only
/// when the last watch of the service goes. With `fetch_interval: 30`, a registration seen
/// within seconds came by push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_one_of_two_watches_of_a_service_keeps_the_others_pushes() {
    let Some(nacos) = Nacos::start().await else { return };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    nacos.register("web", "DEFAULT_GROUP", "public", a.addr, 1.0, "").await;
    let conf = config(&[format!("http://{}", nacos.addr)]).replace("fetch_interval: 1", "fetch_interval: 30");
    let both = format!(
        "upstreams:\n{}{}routes:\n  - uri: /*\n    upstream_id: web\n  - uri: /g/*\n    upstream_id: g\n",
        upstream("web", "web", ""),
        upstream("g", "web", "    scheme: grpc\n")
    );
    let gw = TestGateway::start_with(&conf, &both, 1);
    let hub = gw.running().shared.hub.clone();
    assert!(
        eventually(Duration::from_secs(15), || async { get(gw.http(), "/x").await.0 == StatusCode::OK })
            .await
    );
    assert_eq!(hub.watch_count(), 2);
    let v = gw.version();
    gw.write_resources(&format!(
        "upstreams:\n{}routes:\n  - uri: /*\n    upstream_id: web\n",
        upstream("web", "web", "")
    ));
    assert!(eventually(Duration::from_secs(5), || async { gw.version() > v }).await);
    assert!(
        eventually(Duration::from_secs(5), || async { hub.watch_count() == 1 }).await,
        "the grpc watch ended"
    );
    nacos.register("web", "DEFAULT_GROUP", "public", b.addr, 1.0, "").await;
    assert!(
        eventually(Duration::from_secs(12), || async { spread(&gw, "/x", 6).await.len() == 2 }).await,
        "the remaining watch still gets pushes"
    );
}

/// A grpc upstream uses the instance's `metadata.gRPC_port` (the registered port serves HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_upstreams_use_the_grpc_port_metadata() {
    let Some(nacos) = Nacos::start().await else { return };
    let grpc = support::grpc::GrpcServer::start(None).await;
    let http_only = closed_port();
    let registered: SocketAddr = format!("127.0.0.1:{}", http_only.port()).parse().unwrap();
    let meta = format!("&metadata=%7B%22gRPC_port%22%3A%22{}%22%7D", grpc.addr.port());
    nacos.register("greeter", "DEFAULT_GROUP", "public", registered, 1.0, &meta).await;
    let gw = TestGateway::start_with(
        &config(&[format!("http://{}", nacos.addr)]),
        &format!(
            "upstreams:\n{}    scheme: grpc\nroutes:\n  - uri: /test.Greeter/*\n    upstream_id: greeter\n",
            upstream("greeter", "greeter", "")
        ),
        1,
    );
    let req = support::grpc::HelloRequest { name: "nacos".into(), ..Default::default() };
    assert!(
        eventually(Duration::from_secs(15), || async {
            support::grpc::say_hello(gw.http(), req.clone()).await.is_ok_and(|r| r.message == "Hello nacos")
        })
        .await,
        "the call reaches the gRPC port from the metadata"
    );
    assert!(grpc.calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

/// `user:pass@` in a Nacos host logs in (accessToken) on both the gRPC and the v1 API; wrong
/// credentials leave the service unresolved (503) with the error in the dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_host_log_in() {
    let Some(nacos) = Nacos::start_with_auth().await else { return };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    nacos.register("web", "DEFAULT_GROUP", "public", a.addr, 1.0, "").await;
    let resources =
        format!("upstreams:\n{}routes:\n  - uri: /*\n    upstream_id: web\n", upstream("web", "web", ""));
    // fetch_interval 30: a registration seen within seconds came through the gRPC subscription.
    let conf = |user: &str| {
        config(&[format!("http://{user}@{}", nacos.addr)]).replace("fetch_interval: 1", "fetch_interval: 30")
    };
    let gw = TestGateway::start_with(&conf("admin:admin"), &resources, 1);
    assert!(
        eventually(Duration::from_secs(15), || async { get(gw.http(), "/x").await.0 == StatusCode::OK })
            .await,
        "logged in: {}",
        gw.control_json("/v1/discovery/nacos/dump").await
    );
    nacos.register("web", "DEFAULT_GROUP", "public", b.addr, 1.0, "").await;
    assert!(
        eventually(Duration::from_secs(4), || async { spread(&gw, "/x", 6).await.len() == 2 }).await,
        "pushed through the authenticated gRPC subscription"
    );

    let bad = TestGateway::start_with(&conf("admin:wrong"), &resources, 1);
    assert!(
        eventually(Duration::from_secs(15), || async {
            let d = bad.control_json("/v1/discovery/nacos/dump").await;
            !d["services"][0]["last_error"].is_null()
        })
        .await
    );
    assert_eq!(get(bad.http(), "/x").await.0, StatusCode::SERVICE_UNAVAILABLE);
}
