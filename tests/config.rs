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
        "apisix:\n  node_listen: 9080\n  bogus_key: 1\nnginx_config:\n  error_log: x\n",
    )
    .unwrap();
    let out = strait().args(["validate", "-c", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = cfg.display().to_string();
    assert!(err.contains(&format!("{file}: nginx_config.error_log: unsupported by Strait")), "{err}");
    assert!(err.contains("bogus_key"), "{err}");
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
