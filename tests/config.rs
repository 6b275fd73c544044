//! Configuration end to end: the bundled files, `strait validate`, errors with their YAML paths,
//! hot reload (good and bad files), and the SIGTERM drain of the real binary.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

fn strait() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait"))
}

#[test]
fn every_bundled_config_file_is_valid() {
    let out = strait().args(["validate", "-c", "conf/config.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("conf/apisix.yaml: ok"), "{text}");
    // Every YAML file under conf/ is parsed by a test.
    for entry in std::fs::read_dir("conf").unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") && p.file_name() != Some("apisix.yaml".as_ref()) {
            strait::Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}

#[test]
fn validate_reports_every_problem_as_file_path_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), "apisix:\n  node_listen: [{ip: 127.0.0.1, port: 0}]\n")
        .unwrap();
    std::fs::write(
        dir.path().join("apisix.yaml"),
        "routes:\n  - uri: /a\n    upstream_id: nope\n  - uri: /b\n    upstream:\n      nodes: {\"127.0.0.1:80\": 1}\n      timeout: {connect: 1, send: 1, read: -1}\n#END\n",
    )
    .unwrap();
    let cfg = dir.path().join("config.yaml");
    let out = strait().args(["validate", "-c", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let file = dir.path().join("apisix.yaml").display().to_string();
    assert!(err.contains(&format!("{file}: routes[0].upstream_id: no upstream with id \"nope\"")), "{err}");
    assert!(
        err.contains(&format!("{file}: routes[1].upstream.timeout.read: must be a number of seconds > 0")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");

    // config.yaml problems name config.yaml.
    std::fs::write(
        dir.path().join("config.yaml"),
        "apisix:\n  node_listen: 9080\n  bogus_key: 1\nnginx_config:\n  http_configuration_snippet: \"lua_shared_dict x 1m;\"\n",
    )
    .unwrap();
    let out = strait().args(["validate", "-c", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = cfg.display().to_string();
    assert!(
        err.contains(&format!("{file}: nginx_config.http_configuration_snippet: unsupported by Strait")),
        "{err}"
    );
    assert!(err.contains("bogus_key"), "{err}");
}

/// The settings of APISIX's `conf/config.yaml.example` (APISIX 3.x, at their default values),
/// as a user who copied it for a standalone data plane would have them.
const APISIX_EXAMPLE_CONFIG: &str = r#"
apisix:
  node_listen:
    - ip: 127.0.0.1
      port: 0
  enable_admin: true
  enable_dev_mode: false
  enable_reuseport: true
  show_upstream_status_in_response_header: false
  enable_ipv6: false
  enable_http2: true
  enable_server_tokens: true
  extra_lua_path: ""
  extra_lua_cpath: ""
  proxy_cache:
    cache_ttl: 10s
    zones:
      - name: disk_cache_one
        memory_size: 50m
        disk_size: 1G
        disk_path: /tmp/disk_cache_one
        cache_levels: "1:2"
  delete_uri_tail_slash: false
  normalize_uri_like_servlet: false
  match_uri_encoded_slash: false
  max_post_args_readable_size: 64
  router:
    http: radixtree_host_uri
    ssl: radixtree_sni
  proxy_mode: http
  resolver_timeout: 5
  enable_resolv_search_opt: true
  ssl:
    enable: true
    listen:
      - ip: 127.0.0.1
        port: 0
        enable_http3: false
    ssl_protocols: TLSv1.2 TLSv1.3
    ssl_ciphers: ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384
    ssl_session_tickets: false
  enable_control: true
  control:
    ip: 127.0.0.1
    port: 0
  disable_sync_configuration_during_start: false
  worker_startup_time_threshold: 60
  data_encryption:
    enable_encrypt_fields: true
    keyring:
      - qeddd145sfvddff3
  lru:
    secret:
      ttl: 300
      count: 512
  tracing: false
nginx_config:
  error_log: logs/error.log
  error_log_level: warn
  worker_processes: auto
  enable_cpu_affinity: false
  worker_rlimit_nofile: 20480
  worker_shutdown_timeout: 240s
  max_pending_timers: 16384
  max_running_timers: 4096
  event:
    worker_connections: 10620
  meta:
    lua_shared_dict:
      prometheus-metrics: 15m
  stream:
    enable_access_log: false
    access_log: logs/access_stream.log
    lua_shared_dict:
      lrucache-lock-stream: 10m
  main_configuration_snippet: |
    # Add custom Nginx main configuration to nginx.conf.
  http_configuration_snippet: |
  http_server_configuration_snippet: |
  http_server_location_configuration_snippet: |
  http_admin_configuration_snippet: |
  http_end_configuration_snippet: |
  stream_configuration_snippet: |
  http:
    enable_access_log: true
    access_log: logs/access.log
    access_log_buffer: 16384
    access_log_format: '$remote_addr - $remote_user [$time_local] $http_host "$request" $status'
    access_log_format_escape: default
    keepalive_timeout: 60s
    client_header_timeout: 60s
    client_body_timeout: 60s
    client_max_body_size: 0
    send_timeout: 10s
    underscores_in_headers: "on"
    real_ip_header: X-Real-IP
    real_ip_recursive: "off"
    real_ip_from:
      - 127.0.0.1
      - "unix:"
    proxy_ssl_server_name: true
    upstream:
      keepalive: 320
      keepalive_requests: 1000
      keepalive_timeout: 60s
    charset: utf-8
    variables_hash_max_size: 2048
    lua_shared_dict:
      internal-status: 10m
plugins:
  - real-ip
  - grpc-transcode
stream_plugins:
  - ip-restriction
plugin_attr:
  prometheus:
    export_uri: /apisix/prometheus/metrics
graphql:
  max_size: 1048576
deployment:
  role: data_plane
  role_data_plane:
    config_provider: yaml
  admin:
    admin_key:
      - name: admin
        key: edd1c9f034335f136f87ad84b625c8f1
        role: admin
"#;

#[test]
fn a_config_copied_from_apisix_example_is_accepted_and_its_unapplied_settings_listed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, APISIX_EXAMPLE_CONFIG).unwrap();
    std::fs::write(dir.path().join("apisix.yaml"), "routes: []\n#END\n").unwrap();
    let out = strait().args(["validate", "-c", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "one note line: {err}");
    let note = format!("{}: note: accepted, not applied: ", cfg.display());
    assert!(err.starts_with(&note), "{err}");
    for path in [
        "plugins",
        "apisix.enable_server_tokens",
        "nginx_config.error_log_level",
        "nginx_config.http.charset",
    ] {
        assert!(err.contains(path), "{path} missing from {err}");
    }
    // What Strait applies, or does anyway (APISIX's defaults), is not in the list.
    for path in [
        "ssl_protocols",
        "worker_shutdown_timeout",
        "worker_processes",
        "client_header_timeout",
        "real_ip",
        "delete_uri_tail_slash",
        "snippet",
        "upstream.keepalive",
    ] {
        assert!(!err.contains(path), "{path} listed in {err}");
    }

    // The same settings with one that asks for what Strait does not do: an error naming it.
    let text = APISIX_EXAMPLE_CONFIG.replace("delete_uri_tail_slash: false", "delete_uri_tail_slash: true");
    std::fs::write(&cfg, text).unwrap();
    let out = strait().args(["validate", "-c", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{}: apisix.delete_uri_tail_slash: unsupported by Strait", cfg.display())),
        "{err}"
    );
}

#[test]
fn cli_help_version_and_bad_arguments() {
    let out = strait().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("strait "));
    let out = strait().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("strait run"));
    let out = strait().args(["run", "--workers", "zero"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = strait().args(["validate", "-c", "/nonexistent/config.yaml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.yaml: cannot read file"));
}

#[test]
fn env_substitution_in_both_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), "apisix:\n  node_listen: ${{STRAIT_T_PORT:=9080}}\n")
        .unwrap();
    std::fs::write(
        dir.path().join("apisix.yaml"),
        "routes:\n  - uri: ${{STRAIT_T_URI:=/x}}\n    upstream: {nodes: {\"${{STRAIT_T_NODE}}\": 1}}\n#END\n",
    )
    .unwrap();
    let cfg = dir.path().join("config.yaml");
    let out = strait().args(["validate", "-c", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("STRAIT_T_NODE is not set"));
    let out = strait()
        .args(["validate", "-c", cfg.to_str().unwrap()])
        .env("STRAIT_T_NODE", "127.0.0.1:8080")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_changes_and_rejects_broken_files_whole() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /v1\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[a.addr])
    ));
    assert_eq!(get(gw.http(), "/v1").await.0, StatusCode::OK);
    assert_eq!(get(gw.http(), "/v2").await.0, StatusCode::NOT_FOUND);

    let started = Instant::now();
    gw.write_resources(&format!(
        "routes:\n  - uri: /v1\n    upstream: {{nodes: {a}}}\n  - uri: /v2\n    upstream: {{nodes: {b}}}\n",
        a = nodes_yaml(&[a.addr]),
        b = nodes_yaml(&[b.addr])
    ));
    assert!(
        eventually(Duration::from_secs(3), || async { get(gw.http(), "/v2").await.0 == StatusCode::OK })
            .await
    );
    assert!(started.elapsed() < Duration::from_millis(1500), "reload took {:?}", started.elapsed());

    // A file with one bad item is rejected whole: /v3 does not appear, /v1 and /v2 keep serving.
    let version = gw.version();
    gw.write_resources(&format!(
        "routes:\n  - uri: /v1\n    upstream: {{nodes: {a}}}\n  - uri: /v3\n    upstream: {{nodes: {a}}}\n  - uri: broken\n    upstream: {{nodes: {a}}}\n",
        a = nodes_yaml(&[a.addr])
    ));
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.control_json("/v1/status").await["rejected_reloads"].as_u64() == Some(1)
        })
        .await
    );
    let status = gw.control_json("/v1/status").await;
    let err = status["last_reload_error"]["error"].as_str().unwrap().to_string();
    assert!(err.contains("routes[2].uri: must start with /"), "{err}");
    assert_eq!(gw.version(), version);
    assert_eq!(get(gw.http(), "/v2").await.0, StatusCode::OK);
    assert_eq!(get(gw.http(), "/v3").await.0, StatusCode::NOT_FOUND);

    // A missing #END is rejected too (APISIX: "missing valid end flag").
    std::fs::write(gw.resources_path(), "routes: []\n").unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.control_json("/v1/status").await["rejected_reloads"].as_u64() == Some(2)
        })
        .await
    );
    assert_eq!(get(gw.http(), "/v1").await.0, StatusCode::OK);

    // Bytes that are not UTF-8 are rejected as at start-up, not replaced and applied.
    let mut bad = format!(
        "routes:\n  - uri: /v4\n    desc: \"x\"\n    upstream: {{nodes: {}}}\n#END\n",
        nodes_yaml(&[a.addr])
    )
    .into_bytes();
    let at = bad.iter().position(|b| *b == b'x').unwrap();
    bad[at] = 0xff;
    std::fs::write(gw.resources_path(), bad).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.control_json("/v1/status").await["rejected_reloads"].as_u64() == Some(3)
        })
        .await
    );
    let status = gw.control_json("/v1/status").await;
    assert!(status["last_reload_error"]["error"].as_str().unwrap().contains("not UTF-8"), "{status}");
    assert_eq!(get(gw.http(), "/v4").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(gw.http(), "/v1").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_does_not_fail_in_flight_requests() {
    let a = Backend::start("a").await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /delay/*\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[a.addr])
    ));
    let addr = gw.http();
    let slow = tokio::spawn(async move { get(addr, "/delay/800").await.0 });
    // Wait until the request reached the node, then reload.
    assert!(eventually(Duration::from_secs(3), || async { a.requests() == 1 }).await);
    gw.write_resources(&format!(
        "routes:\n  - uri: /delay/*\n    upstream: {{nodes: {}}}\n  - uri: /new\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[a.addr]),
        nodes_yaml(&[a.addr])
    ));
    assert!(
        eventually(Duration::from_secs(3), || async { get(gw.http(), "/new").await.0 == StatusCode::OK })
            .await
    );
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("apisix:\n  node_listen: [{{ip: 127.0.0.1, port: {port}}}]\n  enable_control: false\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("apisix.yaml"),
        format!("routes:\n  - uri: /delay/*\n    upstream: {{nodes: {}}}\n#END\n", nodes_yaml(&[a.addr])),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["run", "-c", dir.path().join("config.yaml").to_str().unwrap(), "--workers", "1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { tokio::net::TcpStream::connect(addr).await.is_ok() })
            .await,
        "gateway did not start"
    );
    let slow = tokio::spawn(async move { get(addr, "/delay/700").await });
    assert!(eventually(Duration::from_secs(3), || async { a.requests() == 1 }).await);
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK, "in-flight request finished during the drain");
    assert!(String::from_utf8_lossy(&body).contains("after 700ms"));
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed after exit");
}

// ------------------------------------------------------------------ mangled resources

/// A value to put in place of another: edge numbers, odd strings, other types.
fn odd_value(rng: &mut Rng, old: &serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    // Most often something of the same kind, so the change gets past the type checks.
    if rng.below(2) == 0 {
        match old {
            serde_json::Value::Number(_) => {
                return [
                    json!(0),
                    json!(-1),
                    json!(1e300),
                    json!(-0.5),
                    json!(4294967296u64),
                    json!(u64::MAX),
                    json!(65536),
                ][rng.below(7)]
                .clone();
            }
            serde_json::Value::String(s) => {
                let mut s = s.clone();
                match rng.below(5) {
                    0 => s.clear(),
                    1 => s.push(['*', '/', ':', '[', '\0', '~', '%', '.'][rng.below(8)]),
                    2 => {
                        let cut = rng.below(s.len() + 1);
                        s = s.chars().take(cut).collect();
                    }
                    3 => s = s.repeat(300),
                    _ => s.insert(0, ['*', '/', '~', ' ', '['][rng.below(5)]),
                }
                return json!(s);
            }
            _ => {}
        }
    }
    [
        json!(0),
        json!(-1),
        json!(1e300),
        json!(""),
        json!("*"),
        json!("/"),
        json!("[::1]:0"),
        json!("127.0.0.1:99999"),
        json!("0.0.0.0/33"),
        json!("~*["),
        json!(true),
        serde_json::Value::Null,
        json!([]),
        json!({}),
        json!(["GET", "BREW"]),
        json!({"127.0.0.1:1": 0}),
        json!([["arg_x", "~~", "("]]),
        json!([{"host": "", "port": 0, "weight": -1}]),
    ][rng.below(18)]
    .clone()
}

/// Changes one place in `v`: a value replaced, a key dropped or added, a list item dropped or
/// repeated.
fn mutate(rng: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    let descend = rng.below(10) < 7;
    match v {
        Value::Object(m) if !m.is_empty() && descend => {
            let key = m.keys().nth(rng.below(m.len())).cloned().unwrap_or_default();
            match rng.below(14) {
                0 => {
                    m.remove(&key);
                }
                1 => {
                    let value = odd_value(rng, &Value::Null);
                    m.insert(["id", "type", "nodes", "uri", "weight", "x"][rng.below(6)].to_string(), value);
                }
                _ => {
                    if let Some(child) = m.get_mut(&key) {
                        mutate(rng, child);
                    }
                }
            }
        }
        Value::Array(a) if !a.is_empty() && descend => {
            let i = rng.below(a.len());
            match rng.below(14) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let copy = a[i].clone();
                    a.push(copy);
                }
                _ => mutate(rng, &mut a[i]),
            }
        }
        other => *other = odd_value(rng, other),
    }
}

/// `seed` with one change most of the time (so more of the files get past validation), two or
/// three otherwise.
fn mangled_copy(rng: &mut Rng, seed: &serde_json::Value) -> serde_json::Value {
    let mut tree = seed.clone();
    for _ in 0..if rng.below(5) == 0 { 2 + rng.below(2) } else { 1 } {
        mutate(rng, &mut tree);
    }
    tree
}

/// The gateway state for `node` and `resources`, as a start builds it.
fn build_state(
    node: strait::config::node::NodeConfig,
    resources: strait::config::resources::Resources,
) -> Result<std::sync::Arc<strait::gateway::Shared>, String> {
    let config = strait::Config {
        node,
        resources,
        config_path: "config.yaml".into(),
        resources_path: "apisix.yaml".into(),
    };
    strait::gateway::Shared::new(config, tokio::runtime::Handle::current())
}

/// A refusal that gives a reason, each error naming `file`.
fn assert_named_errors(errors: &strait::config::ConfigErrors, file: &str, round: usize) {
    assert!(!errors.0.is_empty(), "round {round}: refused without a reason");
    for e in &errors.0 {
        assert_eq!(e.file, file, "round {round}: {e}");
        assert!(!e.reason.is_empty(), "round {round}: {e}");
    }
}

/// Resources mangled at random from one that uses most of the schema (chash and health checks,
/// https and grpc upstreams, services, route `vars`, hosts and priorities, grpc-transcode with
/// its proto, stream routes by SNI and address, an `ssls` entry with a client CA): each file
/// is refused with errors that name the file, or applied to a running gateway state, and
/// neither panics (a release build aborts on a panic, so a bad file would take the gateway
/// down instead of being refused). Seeded, so a failure repeats; `STRAIT_MANGLE_ROUNDS` runs
/// more than CI's 300 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_resources_are_refused_or_applied_never_a_panic() {
    use serde_json::json;
    use strait::config::node::NodeConfig;
    use strait::config::resources::Resources;
    use support::certs::Ca;
    let ca = Ca::new("mangle-ca");
    let leaf = ca.leaf(&["a.example"]);
    let proto = "syntax = \"proto3\"; package helloworld; service Greeter { rpc SayHello (HelloRequest) returns (HelloReply) {} } message HelloRequest { string name = 1; } message HelloReply { string message = 1; }";
    let seed = json!({
        "upstreams": [
            {"id": "u1", "type": "chash", "hash_on": "header", "key": "x-user",
             "nodes": {"127.0.0.1:1": 1, "127.0.0.1:2": 2},
             "timeout": {"connect": 1, "send": 1, "read": 1}, "retries": 1, "retry_timeout": 5,
             "keepalive_pool": {"size": 8, "idle_timeout": 5, "requests": 100},
             "pass_host": "rewrite", "upstream_host": "h.example",
             "checks": {"active": {"type": "http", "http_path": "/hz", "healthy": {"interval": 1, "successes": 1},
                                   "unhealthy": {"interval": 1, "http_failures": 2}},
                        "passive": {"unhealthy": {"http_statuses": [502], "http_failures": 3}}}},
            {"id": "u2", "type": "least_conn", "scheme": "https", "tls": {"verify": false},
             "nodes": [{"host": "localhost", "port": 8443, "weight": 1, "priority": 1},
                       {"host": "127.0.0.1", "port": 8444, "weight": 1, "priority": 0}]},
            {"id": "u3", "type": "ewma", "scheme": "grpc", "nodes": {"127.0.0.1:50051": 1}},
            {"id": "u4", "type": "roundrobin", "service_name": "svc.example", "discovery_type": "dns"}
        ],
        "services": [{"id": "s1", "upstream_id": "u1", "hosts": ["a.example"]}],
        "routes": [
            {"id": "r1", "uri": "/a/*", "methods": ["GET", "POST"], "hosts": ["*.example.com"], "priority": 2,
             "vars": [["arg_x", "==", "1"], ["http_x_y", "~~", "^v[0-9]+$"]], "upstream_id": "u1"},
            {"id": "r2", "uris": ["/b", "/c/*"], "service_id": "s1"},
            {"id": "r3", "uri": "/g/*", "upstream_id": "u3",
             "plugins": {"grpc-transcode": {"proto_id": "p1", "service": "helloworld.Greeter", "method": "SayHello"}}},
            {"id": "r4", "uri": "/x", "remote_addrs": ["127.0.0.0/8"], "upstream_id": "u2"},
            {"id": "r5", "uri": "/d", "upstream_id": "u4"}
        ],
        "protos": [{"id": "p1", "content": proto}],
        "stream_routes": [
            {"id": "sr1", "server_port": 9100, "remote_addr": "127.0.0.1", "upstream_id": "u1"},
            {"id": "sr2", "sni": "db.example", "upstream": {"scheme": "tls", "nodes": {"127.0.0.1:5432": 1}}}
        ],
        "ssls": [{"id": "c1", "snis": ["a.example"], "cert": leaf.cert, "key": leaf.key, "client": {"ca": ca.pem, "depth": 1}}]
    });
    let node = NodeConfig::parse(
        "config.yaml",
        "apisix:\n  proxy_mode: http&stream\ndiscovery:\n  dns:\n    servers: [\"127.0.0.1:53\"]\n",
        |_| None,
    )
    .expect("the node config");
    let text = |tree: &serde_json::Value| format!("{}\n#END\n", serde_json::to_string_pretty(tree).unwrap());
    let resources = Resources::parse("apisix.yaml", &text(&seed), &node, |_| None)
        .unwrap_or_else(|e| panic!("the seed must be valid: {e}"));
    let shared = build_state(node.clone(), resources).expect("the seed's state");
    let rounds = mangle_rounds(300);
    let mut rng = Rng(0x5eed_c0f1_9000_0001);
    let (mut refused, mut applied) = (0, 0);
    for round in 0..rounds {
        let text = text(&mangled_copy(&mut rng, &seed));
        match Resources::parse("apisix.yaml", &text, &node, |_| None) {
            Ok(res) => {
                applied += 1;
                // As a reload applies it, and as a start builds it.
                let _ = shared.apply(&res);
                if round.is_multiple_of(10) {
                    let _ = build_state(node.clone(), res);
                }
            }
            Err(errors) => {
                refused += 1;
                assert_named_errors(&errors, "apisix.yaml", round);
            }
        }
    }
    // Both outcomes were reached (about one file in ten is applied), so the mutations test more
    // than the parser's first checks.
    assert!(refused > rounds / 2 && applied > rounds / 20, "refused {refused}, applied {applied}");
}

/// The same for `config.yaml` (listeners, TLS and stream settings, every discovery backend,
/// nginx_config timeouts): each mangled file is refused with errors naming the file, or its
/// state is built, and neither panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_node_configs_are_refused_or_built_never_a_panic() {
    use serde_json::json;
    use strait::config::node::NodeConfig;
    let seed = json!({
        "apisix": {
            "node_listen": [{"ip": "127.0.0.1", "port": 0, "enable_http2": true}],
            "ssl": {"enable": true, "listen": [{"port": 0}], "ssl_protocols": "TLSv1.2 TLSv1.3", "fallback_sni": "a.example"},
            "proxy_mode": "http&stream",
            "stream_proxy": {"tcp": [{"addr": "127.0.0.1:0", "tls": true}, "127.0.0.1:0"]},
            "enable_control": true,
            "control": {"ip": "127.0.0.1", "port": 0},
            "trusted_addresses": ["127.0.0.0/8"]
        },
        "nginx_config": {"http": {"client_header_timeout": "60s", "client_body_timeout": "60s", "send_timeout": "10s"}},
        "discovery": {
            "dns": {"servers": ["127.0.0.1:53"]},
            "consul": {"servers": ["http://127.0.0.1:1"], "timeout": {"connect": 300, "read": 1000, "wait": 5}},
            "nacos": {"host": ["http://127.0.0.1:1"], "prefix": "/nacos/v1/"},
            "eureka": {"host": ["http://127.0.0.1:1"], "prefix": "/eureka/", "fetch_interval": 1},
            "kubernetes": {"service": {"schema": "http", "host": "127.0.0.1", "port": 1}, "client": {"token": "t"}}
        },
        "deployment": {"role": "data_plane", "role_data_plane": {"config_provider": "yaml"}}
    });
    let text = |tree: &serde_json::Value| serde_json::to_string_pretty(tree).unwrap();
    NodeConfig::parse("config.yaml", &text(&seed), |_| None)
        .unwrap_or_else(|e| panic!("the seed must be valid: {e}"));
    let rounds = mangle_rounds(300);
    let mut rng = Rng(0x5eed_c0f1_9000_0002);
    let (mut refused, mut built) = (0, 0);
    for round in 0..rounds {
        match NodeConfig::parse("config.yaml", &text(&mangled_copy(&mut rng, &seed)), |_| None) {
            Ok(node) => {
                built += 1;
                if round.is_multiple_of(5) {
                    let _ = build_state(node, Default::default());
                }
            }
            Err(errors) => {
                refused += 1;
                assert_named_errors(&errors, "config.yaml", round);
            }
        }
    }
    assert!(refused > rounds / 20 && built > rounds / 20, "refused {refused}, built {built}");
}

/// The control API closes a connection that sends no request within `client_header_timeout`
/// (2 s here), as the HTTP ports do, and serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_api_client_is_closed() {
    use tokio::io::AsyncReadExt;
    let gw = TestGateway::start("routes: []\n");
    let mut silent = tokio::net::TcpStream::connect(gw.control()).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open after 15 s");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    assert!(gw.control_json("/v1/status").await["config_version"].as_u64().is_some_and(|v| v >= 1));
}
