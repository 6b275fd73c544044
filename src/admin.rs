//! The control API (`apisix.control`, default 127.0.0.1:9090), in APISIX's shapes where APISIX
//! has the endpoint:
//!
//! * `GET /v1/healthcheck`: every upstream with active checks, its nodes and their status;
//! * `GET /v1/healthcheck/upstreams/{id}` (also `routes/{id}`, `services/{id}`,
//!   `stream_routes/{id}` for inline upstreams);
//! * `GET /v1/discovery/{type}/dump`: every watched service of a backend, its nodes and sync state;
//! * `GET /v1/upstreams`: every upstream and node, checked or not (Strait);
//! * `GET /v1/status`: configuration version and last reload result (Strait);
//! * `GET /v1/metrics`: Prometheus text (Strait).
//!
//! What it reports is read from the same node states the balancer uses.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::resources::ProbeType;
use crate::gateway::Shared;
use crate::upstream::Upstream;

/// Serves the control API until the runtime stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Not spinning on the thread that also runs health checks and discovery.
                crate::server::accept_failed("control API", &e).await;
                continue;
            }
        };
        let shared = shared.clone();
        // The wait for a request head is `client_header_timeout`, as on the HTTP ports: a client
        // that connects and sends nothing does not hold its connection.
        let head_timeout = shared.node.client_header_timeout;
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn not_found(msg: &str) -> Response<Full<Bytes>> {
    json_response(StatusCode::NOT_FOUND, &json!({ "error_msg": msg }))
}

/// Answers one control request.
pub fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error_msg": "only GET"}));
    }
    let path = req.uri().path().trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    match segs.as_slice() {
        ["v1", "healthcheck"] => {
            let state = shared.state.load();
            let mut list: Vec<&Arc<Upstream>> =
                state.upstreams.values().filter(|u| u.spec.checks.is_some()).collect();
            list.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
            json_response(StatusCode::OK, &Value::Array(list.iter().map(|u| health_json(u)).collect()))
        }
        ["v1", "healthcheck", kind, id] => {
            let key = format!("{kind}/{id}");
            match shared.upstream(&key) {
                Some(u) if u.spec.checks.is_some() => json_response(StatusCode::OK, &health_json(&u)),
                Some(_) => not_found(&format!("upstream {key} has no health checker")),
                None => not_found(&format!("no upstream {key}")),
            }
        }
        ["v1", "upstreams"] => {
            let state = shared.state.load();
            let mut list: Vec<&Arc<Upstream>> = state.upstreams.values().collect();
            list.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
            json_response(StatusCode::OK, &Value::Array(list.iter().map(|u| upstream_json(u)).collect()))
        }
        ["v1", "discovery", kind, "dump"] => {
            if !shared.hub.has(kind) {
                return not_found(&format!("discovery {kind} is not configured"));
            }
            let services: Vec<Value> = shared
                .hub
                .dump(kind)
                .into_iter()
                .map(|w| {
                    let nodes: Vec<Value> = w
                        .nodes
                        .iter()
                        .flat_map(|s| s.nodes.iter())
                        .map(|n| json!({"host": n.host, "port": n.port, "weight": n.weight, "priority": n.priority}))
                        .collect();
                    json!({
                        "service_name": w.query.service_name,
                        "args": w.query.args.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
                        "nodes": nodes,
                        "synced": w.status.synced,
                        "node_count": w.status.node_count,
                        "last_success": w.status.last_success.map(secs),
                        "last_change": w.status.last_change.map(secs),
                        "last_error": w.status.last_error.as_ref().map(|(t, e)| json!({"time": secs(*t), "error": e})),
                        "stale_since": w.status.stale_since().map(secs),
                        "errors": w.status.errors,
                    })
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "services": services }))
        }
        ["v1", "status"] => {
            let st = shared.reload.lock().map(|s| s.clone()).unwrap_or_default();
            let state = shared.state.load();
            json_response(
                StatusCode::OK,
                &json!({
                    "config_version": state.version,
                    "routes": state.router.len,
                    "upstreams": state.upstreams.len(),
                    "reloads": st.reloads,
                    "rejected_reloads": st.rejected,
                    "last_reload": st.last_success.map(secs),
                    "last_reload_error": st.last_error.as_ref().map(|(t, e)| json!({"time": secs(*t), "error": e})),
                }),
            )
        }
        ["v1", "metrics"] => {
            let mut r = Response::new(Full::new(Bytes::from(metrics(shared))));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        _ => not_found("not found"),
    }
}

fn node_json(n: &crate::upstream::node::Node) -> Value {
    let c = n.state.health.counters();
    let probe = n.state.last_probe.lock().ok().and_then(|p| p.clone());
    json!({
        "ip": n.addr.ip().to_string(),
        "port": n.addr.port(),
        "hostname": &*n.host,
        "weight": n.weight,
        "priority": n.priority,
        "status": n.state.health.status().as_str(),
        "counter": {
            "success": c.success,
            "http_failure": c.http_failure,
            "tcp_failure": c.tcp_failure,
            "timeout_failure": c.timeout_failure,
        },
        "in_flight": n.state.in_flight(),
        "requests": n.state.requests.load(Ordering::Relaxed),
        "failures": n.state.failures.load(Ordering::Relaxed),
        "last_probe": probe.map(|p| json!({"time": secs(p.at), "ok": p.ok, "detail": p.detail})),
    })
}

fn health_json(u: &Upstream) -> Value {
    let snap = u.snapshot();
    let kind = u.spec.checks.as_ref().map_or("http", |c| match c.active.kind {
        ProbeType::Http => "http",
        ProbeType::Https => "https",
        ProbeType::Tcp => "tcp",
        ProbeType::Grpc => "grpc",
    });
    json!({
        "name": format!("/apisix/{}", u.spec.key),
        "id": u.spec.id,
        "type": kind,
        "nodes": snap.nodes.iter().map(|n| node_json(n)).collect::<Vec<_>>(),
    })
}

fn upstream_json(u: &Upstream) -> Value {
    let snap = u.snapshot();
    let src = u.source_status.lock().map(|s| s.clone()).unwrap_or_default();
    json!({
        "key": u.spec.key,
        "id": u.spec.id,
        "scheme": u.spec.scheme.as_str(),
        "checks": u.spec.checks.is_some(),
        "version": snap.version,
        "resolved": snap.resolved,
        "nodes": snap.nodes.iter().map(|n| node_json(n)).collect::<Vec<_>>(),
        "all_unhealthy_picks": u.stats.all_unhealthy_picks.load(Ordering::Relaxed),
        "no_node": u.stats.no_node.load(Ordering::Relaxed),
        "source": {
            "last_success": src.last_success.map(secs),
            "last_change": src.last_change.map(secs),
            "last_error": src.last_error.as_ref().map(|(t, e)| json!({"time": secs(*t), "error": e})),
        },
    })
}

fn metrics(shared: &Shared) -> String {
    let m = &shared.metrics;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE strait_http_requests_total counter");
    let _ = writeln!(out, "strait_http_requests_total {}", m.http_requests.load(Ordering::Relaxed));
    let _ = writeln!(out, "# TYPE strait_http_no_route_total counter");
    let _ = writeln!(out, "strait_http_no_route_total {}", m.http_no_route.load(Ordering::Relaxed));
    let _ = writeln!(out, "# TYPE strait_stream_connections_total counter");
    let _ = writeln!(out, "strait_stream_connections_total {}", m.stream_connections.load(Ordering::Relaxed));
    let _ = writeln!(out, "# TYPE strait_connections_active gauge");
    let _ = writeln!(out, "strait_connections_active {}", m.connections_active.load(Ordering::Relaxed));
    let state = shared.state.load();
    let _ = writeln!(out, "# TYPE strait_config_version gauge");
    let _ = writeln!(out, "strait_config_version {}", state.version);
    let _ = writeln!(out, "# TYPE strait_upstream_node_healthy gauge");
    let _ = writeln!(out, "# TYPE strait_upstream_node_in_flight gauge");
    let _ = writeln!(out, "# TYPE strait_upstream_node_requests_total counter");
    let _ = writeln!(out, "# TYPE strait_upstream_all_unhealthy_picks_total counter");
    let mut ups: Vec<_> = state.upstreams.values().collect();
    ups.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
    for u in ups {
        let key = &u.spec.key;
        let _ = writeln!(
            out,
            "strait_upstream_all_unhealthy_picks_total{{upstream=\"{key}\"}} {}",
            u.stats.all_unhealthy_picks.load(Ordering::Relaxed)
        );
        for n in u.snapshot().nodes.iter() {
            let labels = format!("upstream=\"{key}\",node=\"{}\"", n.addr);
            let _ = writeln!(out, "strait_upstream_node_healthy{{{labels}}} {}", u8::from(n.ready()));
            let _ = writeln!(out, "strait_upstream_node_in_flight{{{labels}}} {}", n.state.in_flight());
            let _ = writeln!(
                out,
                "strait_upstream_node_requests_total{{{labels}}} {}",
                n.state.requests.load(Ordering::Relaxed)
            );
        }
    }
    for kind in ["dns", "consul", "nacos", "eureka", "kubernetes"] {
        for w in shared.hub.dump(kind) {
            let labels = format!("discovery=\"{kind}\",service=\"{}\"", w.query.service_name);
            let _ = writeln!(out, "strait_discovery_nodes{{{labels}}} {}", w.status.node_count);
            let _ = writeln!(out, "strait_discovery_synced{{{labels}}} {}", u8::from(w.status.synced));
            let _ = writeln!(
                out,
                "strait_discovery_stale{{{labels}}} {}",
                u8::from(w.status.stale_since().is_some())
            );
            let _ = writeln!(out, "strait_discovery_errors_total{{{labels}}} {}", w.status.errors);
        }
    }
    out
}
