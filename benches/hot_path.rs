//! Costs of the request hot path, piece by piece: route matching (10 and 10,000 routes), node
//! picks for every balancer (10 and 1,000 nodes), applying a discovery update of 10,000 endpoints,
//! the chash key, upstream header rewriting and gRPC frame handling.
//!
//! `cargo bench --bench hot_path` measures; CI runs `cargo bench --bench hot_path -- --test`,
//! which runs each benchmark once so they keep compiling and working.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::Request;
use strait::config::node::NodeConfig;
use strait::config::resources::Resources;
use strait::route::{RequestView, Route, Router};
use strait::upstream::{BuildContext, ResolvedNode, Upstream};
use strait_protocols::http::ForwardCtx;
use strait_protocols::{Tried, UpstreamPicker};

/// The `strait` binary's allocator, so allocations cost here what they cost there (with glibc's
/// malloc, which this bench used before, a roundrobin update of 10,000 nodes took 4.4 ms, with
/// mimalloc 2.6 ms).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn resources(yaml: &str) -> Resources {
    let node = NodeConfig::parse("bench", "", |_| None).expect("node config");
    Resources::parse("bench", &format!("{yaml}\n#END\n"), &node, |_| None).expect("resources")
}

fn router(n: usize) -> Router {
    let mut y = String::from("routes:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - {{id: r{i}, uri: /svc{i}/*, upstream: {{nodes: {{\"127.0.0.1:1\": 1}}}}}}\n"
        ));
        y.push_str(&format!("  - {{id: e{i}, uri: /exact{i}, host: h{i}.example.com, upstream: {{nodes: {{\"127.0.0.1:1\": 1}}}}}}\n"));
    }
    let res = resources(&y);
    Router::new(
        res.routes
            .into_iter()
            .map(|spec| Arc::new(Route { spec, upstream: None, transcode: None }))
            .collect(),
    )
}

fn bench_routes(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    for n in [10usize, 10_000] {
        let r = router(n);
        let req = Request::get(format!("/svc{}/items/42?x=1", n - 1))
            .header("host", "api.example.com")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let client: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:9080".parse().unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let view = RequestView::new(&parts, client, local, false);
                black_box(r.find(&view).map(|r| r.spec.priority))
            })
        });
    }
    g.finish();
}

fn upstream(rt: &tokio::runtime::Runtime, kind: &str, n: usize) -> Arc<Upstream> {
    let extra = match kind {
        "chash" => "    hash_on: header\n    key: x-user\n",
        _ => "",
    };
    let res = resources(&format!(
        "upstreams:\n  - id: u\n    type: {kind}\n{extra}    nodes: {{\"127.0.0.1:1\": 1}}\n"
    ));
    let ctx = BuildContext {
        background: rt.handle().clone(),
        roots: strait_protocols::tls::root_store(None).expect("roots"),
    };
    let up = Upstream::new(res.upstreams[0].clone(), None, &ctx).expect("upstream");
    up.apply(nodes(n, 0, 10));
    up
}

/// `n` distinct endpoints; `shift` moves one in `every` of them to new addresses (a rolling
/// update with `every` 10, a whole new fleet with 1).
fn nodes(n: usize, shift: usize, every: usize) -> Vec<ResolvedNode> {
    (0..n)
        .map(|i| {
            let i = if i % every == 0 { i + shift * n } else { i };
            let addr: SocketAddr =
                format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256).parse().unwrap();
            ResolvedNode {
                addr,
                host: addr.ip().to_string(),
                port: 8080,
                weight: 1 + (i % 3) as u32,
                priority: 0,
                metadata: Default::default(),
            }
        })
        .collect()
}

/// A discovery update of 10,000 endpoints: the whole write path (merge, state carry-over,
/// balancer build, snapshot swap), for a rolling update (a tenth of them moved) and, as
/// `<kind>_all`, for a whole new fleet (every address new, as after a redeploy or at start-up).
/// Requests never wait on it: they keep reading the previous snapshot until the swap.
fn bench_apply(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("apply_update");
    g.sample_size(10);
    for (kind, every) in
        [("roundrobin", 10), ("chash", 10), ("least_conn", 10), ("ewma", 10), ("roundrobin", 1), ("chash", 1)]
    {
        let up = upstream(&rt, kind, 10_000);
        let mut round = 0usize;
        let name = if every == 1 { format!("{kind}_all") } else { kind.to_string() };
        g.bench_with_input(BenchmarkId::new(name, 10_000), &10_000, |b, &n| {
            b.iter_batched(
                || {
                    round += 1;
                    nodes(n, round % 2, every)
                },
                |set| up.apply(set),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn bench_picks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("pick");
    for kind in ["roundrobin", "chash", "least_conn", "ewma"] {
        for n in [10usize, 1000] {
            let up = upstream(&rt, kind, n);
            let tried = Tried::default();
            g.bench_with_input(BenchmarkId::new(kind, n), &n, |b, _| {
                b.iter(|| {
                    let peer = up.pick(black_box(b"user-42"), &tried).expect("node");
                    black_box(peer.addr)
                })
            });
        }
    }
    g.finish();
}

fn bench_keys_and_headers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let up = upstream(&rt, "chash", 10);
    let req = Request::get("/a?b=c")
        .header("host", "shop.example")
        .header("x-user", "alice")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .header("x-forwarded-for", "203.0.113.9")
        .body(())
        .unwrap();
    let (parts, ()) = req.into_parts();
    let client: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:9080".parse().unwrap();
    c.bench_function("chash_key_header", |b| {
        b.iter(|| {
            let view = RequestView::new(&parts, client, local, false);
            black_box(up.hash_key(&view).len())
        })
    });
    let (client_ip, local_port_value) = strait_protocols::http::connection_values(client, 9080);
    let ctx = ForwardCtx {
        client_addr: client,
        local_port: 9080,
        client_ip: &client_ip,
        local_port_value: &local_port_value,
        downstream_tls: false,
        hash_key: b"",
        timeouts: None,
        websocket: false,
        grpc: false,
        grpc_node: false,
        deadline: None,
        body_timeout: std::time::Duration::from_secs(60),
        tunnel_hold: None,
        trust: Default::default(),
        show_upstream_status: false,
    };
    c.bench_function("rewrite_request_headers", |b| {
        b.iter_batched(
            || {
                let r = Request::get("/a").body(()).unwrap();
                let (mut p, ()) = r.into_parts();
                p.headers = parts.headers.clone();
                p
            },
            |mut p| {
                let host = p.headers.get("host").cloned();
                strait_protocols::http::prepare_request_headers(
                    &mut p,
                    &ctx,
                    host.as_ref(),
                    false,
                    strait_protocols::Scheme::Http,
                );
                black_box(p.headers.len())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let msg = vec![7u8; 512];
    c.bench_function("grpc_frame_512b", |b| {
        b.iter(|| black_box(strait_protocols::grpc::frame(black_box(&msg)).len()))
    });
}

criterion_group!(benches, bench_routes, bench_picks, bench_apply, bench_keys_and_headers);
criterion_main!(benches);
