//! DNS discovery against a real bind9 server: A records, SRV weights/priorities/ports, a
//! TTL-driven change reaching traffic (timed), an outage during traffic, an unknown name, and
//! host names in static nodes through `apisix.dns_resolver`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::servers::Bind;
use support::*;

fn config(dns: SocketAddr) -> String {
    format!(
        "apisix:
  node_listen: [{{ip: 127.0.0.1, port: 0}}]
  control: {{ip: 127.0.0.1, port: 0}}
  dns_resolver: [\"{dns}\"]
discovery:
  dns:
    servers: [\"{dns}\"]
    timeout: 0.5
"
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

/// Backends on 127.0.0.x that share one port.
async fn backends_on(ips: &[&str]) -> (u16, Vec<Backend>) {
    let first = Backend::start_on(format!("{}:0", ips[0]).parse().unwrap(), ips[0]).await;
    let port = first.addr.port();
    let mut v = vec![first];
    for ip in &ips[1..] {
        v.push(Backend::start_on(format!("{ip}:{port}").parse().unwrap(), ip).await);
    }
    (port, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_ttl_changes_outages_and_unknown_names() {
    let (port, _b) = backends_on(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]).await;
    let Some(mut dns) = Bind::start("web 1 IN A 127.0.0.11\nweb 1 IN A 127.0.0.12").await else { return };
    let gw = TestGateway::start_with(
        &config(dns.addr),
        &format!(
            "upstreams:
  - id: web
    discovery_type: dns
    service_name: web.svc.test:{port}
  - id: ghost
    discovery_type: dns
    service_name: nothere.svc.test:{port}
routes:
  - uri: /web/*
    upstream_id: web
  - uri: /ghost/*
    upstream_id: ghost
"
        ),
        1,
    );
    assert!(
        eventually(Duration::from_secs(5), || async { get(gw.http(), "/web/x").await.0 == StatusCode::OK })
            .await
    );
    let c = spread(&gw, "/web/x", 8).await;
    assert_eq!((c.get("127.0.0.11"), c.get("127.0.0.12")), (Some(&4), Some(&4)), "{c:?}");

    // An unknown name never resolves: 503.
    let (status, _, body) = get(gw.http(), "/ghost/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));

    // A change in DNS reaches traffic after the record TTL (1 s), measured.
    dns.update("update delete web.svc.test. A 127.0.0.12\nupdate add web.svc.test. 1 A 127.0.0.13");
    let changed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let c = spread(&gw, "/web/x", 4).await;
            c.contains_key("127.0.0.13") && !c.contains_key("127.0.0.12")
        })
        .await
    );
    eprintln!("DNS change reached traffic after {:?} (record TTL 1 s)", changed.elapsed());
    assert!(changed.elapsed() < Duration::from_secs(5));

    // Outage: the last good set keeps serving, well past the TTL; the dump shows it is stale.
    dns.stop();
    let web_dump = || async {
        let dump = gw.control_json("/v1/discovery/dns/dump").await;
        dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service_name"] == format!("web.svc.test:{port}"))
            .unwrap()
            .clone()
    };
    let down = Instant::now();
    let mut failed = 0;
    // Keep sending traffic until the outage has been seen (and a while past it).
    while down.elapsed() < Duration::from_secs(15) {
        if get(gw.http(), "/web/x").await.0 != StatusCode::OK {
            failed += 1;
        }
        if down.elapsed() > Duration::from_secs(3) && !web_dump().await["stale_since"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed, 0, "traffic must continue during a DNS outage");
    let web = web_dump().await;
    assert_eq!(web["node_count"], 2, "{web}");
    assert!(!web["last_error"].is_null() && !web["stale_since"].is_null(), "{web}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_carry_weight_priority_and_port() {
    let n1 = Backend::start_on("127.0.0.21:0".parse().unwrap(), "n1").await;
    let n2 = Backend::start_on("127.0.0.22:0".parse().unwrap(), "n2").await;
    let n3 = Backend::start_on("127.0.0.23:0".parse().unwrap(), "n3").await;
    let records = format!(
        "node1 10 IN A 127.0.0.21\nnode2 10 IN A 127.0.0.22\nnode3 10 IN A 127.0.0.23
_http._tcp.api 3 IN SRV 10 60 {} node1.svc.test.
_http._tcp.api 3 IN SRV 10 20 {} node2.svc.test.
_http._tcp.api 3 IN SRV 20 0 {} node3.svc.test.",
        n1.addr.port(),
        n2.addr.port(),
        n3.addr.port()
    );
    let Some(dns) = Bind::start(&records).await else { return };
    let gw = TestGateway::start_with(
        &config(dns.addr),
        "upstreams:\n  - id: api\n    discovery_type: dns\n    service_name: _http._tcp.api.svc.test\nroutes:\n  - uri: /*\n    upstream_id: api\n",
        1,
    );
    assert!(
        eventually(Duration::from_secs(5), || async { get(gw.http(), "/x").await.0 == StatusCode::OK }).await
    );
    let c = spread(&gw, "/x", 8).await;
    assert_eq!(
        (c.get("n1"), c.get("n2"), c.get("n3")),
        (Some(&6), Some(&2), None),
        "weights 60:20, lower SRV priority first: {c:?}"
    );
    let dump = gw.control_json("/v1/discovery/dns/dump").await;
    let nodes = dump["services"][0]["nodes"].as_array().unwrap().clone();
    let n3_node = nodes.iter().find(|n| n["host"] == "127.0.0.23").unwrap();
    assert_eq!(
        (n3_node["weight"].as_u64(), n3_node["priority"].as_i64()),
        (Some(1), Some(-20)),
        "weight 0 becomes 1"
    );
    // The higher-priority group refused: traffic falls to the SRV priority 20 node.
    drop((n1, n2));
    let c = spread(&gw, "/x", 4).await;
    assert_eq!(c.get("n3"), Some(&4), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_service_name_wins_over_srv_and_aaaa_answers_become_nodes() {
    let n4 = Backend::start_on("127.0.0.24:0".parse().unwrap(), "n4").await;
    let v6 = Backend::start_on("[::1]:0".parse().unwrap(), "v6").await;
    // The SRV record names port 1, where nothing listens; the service_name's port must win.
    let records =
        "node4 10 IN A 127.0.0.24\n_http._tcp.pin 3 IN SRV 10 1 1 node4.svc.test.\nsix 3 IN AAAA ::1";
    let Some(dns) = Bind::start(records).await else { return };
    // AAAA records are looked up only with `enable_ipv6` (as in APISIX; Strait's default is off).
    let gw = TestGateway::start_with(
        &config(dns.addr).replace("apisix:\n", "apisix:\n  enable_ipv6: true\n"),
        &format!(
            "upstreams:
  - id: pin
    discovery_type: dns
    service_name: _http._tcp.pin.svc.test:{}
  - id: six
    discovery_type: dns
    service_name: six.svc.test:{}
routes:
  - uri: /pin/*
    upstream_id: pin
  - uri: /six/*
    upstream_id: six
",
            n4.addr.port(),
            v6.addr.port()
        ),
        1,
    );
    for (path, want) in [("/pin/x", "n4"), ("/six/x", "v6")] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                let (status, headers, _) = get(gw.http(), path).await;
                status == StatusCode::OK && headers["x-backend"] == want
            })
            .await,
            "{path} reaches {want}: {}",
            gw.control_json("/v1/discovery/dns/dump").await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_in_static_nodes_use_the_global_resolver() {
    let (port, _b) = backends_on(&["127.0.0.31"]).await;
    let Some(dns) = Bind::start("app 1 IN A 127.0.0.31").await else { return };
    let gw = TestGateway::start_with(
        &config(dns.addr),
        &format!(
            "routes:\n  - uri: /*\n    upstream:\n      pass_host: node\n      nodes: {{\"app.svc.test:{port}\": 1}}\n"
        ),
        1,
    );
    assert!(
        eventually(Duration::from_secs(5), || async { get(gw.http(), "/x").await.0 == StatusCode::OK }).await
    );
    let (_, headers, body) = get(gw.http(), "/x").await;
    assert_eq!(headers["x-backend"], "127.0.0.31");
    assert_eq!(
        json(&body)["headers"]["host"],
        format!("app.svc.test:{port}"),
        "pass_host: node keeps the name"
    );
}

/// `dns_resolver_valid` overrides record TTLs for static host names: a record with a 300 s TTL
/// is still re-resolved every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_resolver_valid_overrides_the_ttl_of_static_host_names() {
    let (port, _b) = backends_on(&["127.0.0.35", "127.0.0.36"]).await;
    let Some(dns) = Bind::start("long 300 IN A 127.0.0.35").await else { return };
    let gw = TestGateway::start_with(
        &config(dns.addr).replace("  dns_resolver:", "  dns_resolver_valid: 1\n  dns_resolver:"),
        &format!("routes:\n  - uri: /*\n    upstream:\n      nodes: {{\"long.svc.test:{port}\": 1}}\n"),
        1,
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (status, headers, _) = get(gw.http(), "/x").await;
            status == StatusCode::OK && headers["x-backend"] == "127.0.0.35"
        })
        .await
    );
    dns.update("update delete long.svc.test. A 127.0.0.35\nupdate add long.svc.test. 300 A 127.0.0.36");
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(gw.http(), "/x").await.1.get("x-backend").is_some_and(|v| v == "127.0.0.36")
        })
        .await,
        "re-resolved after dns_resolver_valid (1 s), not the record's 300 s"
    );
    eprintln!("dns_resolver_valid 1 s: the change reached traffic after {:?}", t.elapsed());
}

/// `order` decides which record type answers for a name that has several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_chooses_between_srv_and_a_records() {
    let (port, _b) = backends_on(&["127.0.0.37", "127.0.0.38"]).await;
    let records = "dual 3 IN A 127.0.0.37\nnode38 3 IN A 127.0.0.38\ndual 3 IN SRV 10 1 1 node38.svc.test.";
    let Some(dns) = Bind::start(records).await else { return };
    let resources = format!(
        "upstreams:\n  - id: d\n    discovery_type: dns\n    service_name: dual.svc.test:{port}\nroutes:\n  - uri: /*\n    upstream_id: d\n"
    );
    for (order, want) in [("", "127.0.0.38"), ("    order: [A, SRV]\n", "127.0.0.37")] {
        let conf = config(dns.addr).replace("    timeout: 0.5\n", &format!("    timeout: 0.5\n{order}"));
        let gw = TestGateway::start_with(&conf, &resources, 1);
        assert!(
            eventually(Duration::from_secs(5), || async {
                get(gw.http(), "/x").await.1.get("x-backend").is_some_and(|v| v == want)
            })
            .await,
            "order {order:?} answers with {want}"
        );
    }
}
