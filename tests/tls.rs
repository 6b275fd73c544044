//! TLS: listeners with certificates chosen by SNI (exact and wildcard) and ALPN, and https
//! upstreams with verification and an mTLS client certificate.

mod support;

use http::StatusCode;
use support::certs::{Ca, yaml_block};
use support::*;

fn tls_config() -> String {
    BASE_CONFIG.replace(
        "  control:",
        "  ssl:\n    enable: true\n    listen:\n      - ip: 127.0.0.1\n        port: 0\n  control:",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_by_sni_with_wildcards_and_alpn() {
    let ca = Ca::new("test-ca");
    let api = ca.leaf(&["api.example.com"]);
    let wild = ca.leaf(&["*.example.com"]);
    let b = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let gw = TestGateway::start_with(
        &tls_config(),
        &format!(
            "ssls:\n  - id: api\n    snis: [api.example.com]\n    cert: {}    key: {}  - id: wild\n    snis: [\"*.example.com\"]\n    cert: {}    key: {}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            yaml_block(&api.cert, 6),
            yaml_block(&api.key, 6),
            yaml_block(&wild.cert, 6),
            yaml_block(&wild.key, 6),
            nodes_yaml(&[b.addr])
        ),
        2,
    );
    let port = gw.tls().port();
    for (host, http2, expect_cn) in [
        ("api.example.com", true, "api.example.com"),
        ("www.example.com", true, "*.example.com"),
        ("deep.sub.example.com", false, "*.example.com"),
    ] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/x");
        let proto = if http2 { "--http2" } else { "--http1.1" };
        // X.509 wildcards cover one label; APISIX's SNI wildcard matches any depth, so the
        // certificate is chosen but curl cannot verify it for a deeper name.
        let insecure = if host.matches('.').count() > 2 { "-k" } else { "-f" };
        let (ok, out, err) = curl(&[
            insecure,
            "--cacert",
            ca_file.to_str().unwrap(),
            "--resolve",
            &resolve,
            proto,
            "-v",
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ])
        .await;
        assert!(ok, "{host}: {err}");
        let want = if http2 { "\n2 200" } else { "\n1.1 200" };
        assert!(out.ends_with(want), "{host}: {out}");
        assert!(err.contains(&format!("CN={expect_cn}")), "{host} got the wrong certificate: {err}");
        let j = json(&bytes::Bytes::from(out.rsplit_once('\n').unwrap().0.to_string()));
        assert_eq!(j["headers"]["x-forwarded-proto"], "https");
    }
    // No certificate for this name (and no fallback_sni): the handshake fails.
    let resolve = format!("other.org:{port}:127.0.0.1");
    let (ok, _, _) = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &resolve,
        &format!("https://other.org:{port}/"),
    ])
    .await;
    assert!(!ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_verification_and_client_certificate() {
    let ca = Ca::new("upstream-ca");
    let server = ca.leaf(&["backend.internal"]);
    let client = ca.leaf(&["strait-client"]);
    let b = Backend::start_tls("secure", &server, Some(&ca.pem), &[b"http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let config = BASE_CONFIG.replace(
        "  control:",
        &format!("  ssl:\n    ssl_trusted_certificate: {}\n  control:", dir.path().join("ca.pem").display()),
    );
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "routes:
  - uri: /mtls
    upstream:
      scheme: https
      pass_host: rewrite
      upstream_host: backend.internal
      tls:
        verify: true
        client_cert: {}        client_key: {}      nodes: {n}
  - uri: /nocert
    upstream:
      scheme: https
      pass_host: rewrite
      upstream_host: backend.internal
      nodes: {n}
  - uri: /wrongname
    upstream:
      scheme: https
      pass_host: rewrite
      upstream_host: other.internal
      tls:
        verify: true
        client_cert: {}        client_key: {}      nodes: {n}
",
            yaml_block(&client.cert, 10),
            yaml_block(&client.key, 10),
            yaml_block(&client.cert, 10),
            yaml_block(&client.key, 10),
            n = nodes_yaml(&[b.addr])
        ),
        1,
    );
    let (status, headers, _) = get(gw.http(), "/mtls").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-backend"], "secure");
    assert_eq!(
        get(gw.http(), "/nocert").await.0,
        StatusCode::BAD_GATEWAY,
        "the node requires a client certificate"
    );
    assert_eq!(get(gw.http(), "/wrongname").await.0, StatusCode::BAD_GATEWAY, "verification checks the name");
}
