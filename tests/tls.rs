//! TLS: listeners with certificates chosen by SNI (exact and wildcard) and ALPN, and https
//! upstreams with verification and an mTLS client certificate.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::certs::{Ca, Leaf, client_tls, tls_acceptor, yaml_block};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn tls_config() -> String {
    BASE_CONFIG.replace(
        "  control:",
        "  ssl:\n    enable: true\n    listen:\n      - ip: 127.0.0.1\n        port: 0\n  control:",
    )
}

/// One `ssls` entry (YAML) serving `leaf`'s certificate for `snis`.
fn ssl_entry(id: &str, snis: &str, leaf: &Leaf) -> String {
    format!(
        "  - id: {id}\n    snis: [{snis}]\n    cert: {}    key: {}",
        yaml_block(&leaf.cert, 6),
        yaml_block(&leaf.key, 6)
    )
}

/// `ca`'s certificate in a file, for clients; the file lives as long as the directory.
fn ca_file(ca: &Ca) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &ca.pem).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_protocols_limits_the_tls_versions_offered() {
    let ca = Ca::new("test-ca");
    let api = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    let (_dir, ca_file) = ca_file(&ca);
    for (protocols, works, refused) in
        [("TLSv1.3", "--tlsv1.3", "--tls-max 1.2"), ("TLSv1.2", "--tls-max 1.2", "--tlsv1.3")]
    {
        let config =
            tls_config().replace("  control:", &format!("    ssl_protocols: {protocols}\n  control:"));
        let gw = TestGateway::start_with(
            &config,
            &format!(
                "ssls:\n{}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
                ssl_entry("api", "api.example.com", &api),
                nodes_yaml(&[b.addr])
            ),
            1,
        );
        let port = gw.tls().port();
        let resolve = format!("api.example.com:{port}:127.0.0.1");
        let url = format!("https://api.example.com:{port}/x");
        for (flags, ok_expected) in [(works, true), (refused, false)] {
            let mut args = vec!["-sS", "-f", "--cacert", &ca_file, "--resolve", &resolve];
            args.extend(flags.split(' '));
            args.push(&url);
            let (ok, _out, err) = curl(&args).await;
            assert_eq!(ok, ok_expected, "ssl_protocols {protocols}, curl {flags}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssl_with_client_ca_requires_client_certificates_and_another_sni_does_not() {
    let ca = Ca::new("test-ca");
    let client_ca = Ca::new("client-ca");
    let other_ca = Ca::new("other-ca");
    let (api, open, v13, mixed) = (
        ca.leaf(&["api.example.com"]),
        ca.leaf(&["open.example.com"]),
        ca.leaf(&["v13.example.com"]),
        ca.leaf(&["mixed.example.com"]),
    );
    let b = Backend::start("b").await;
    let (dir, ca_file) = ca_file(&ca);
    let mut files = Vec::new();
    for (name, leaf) in [("good", client_ca.leaf(&["client"])), ("bad", other_ca.leaf(&["client"]))] {
        let (c, k) = (dir.path().join(format!("{name}.pem")), dir.path().join(format!("{name}.key")));
        std::fs::write(&c, &leaf.cert).unwrap();
        std::fs::write(&k, &leaf.key).unwrap();
        files.push((c.to_str().unwrap().to_string(), k.to_str().unwrap().to_string()));
    }
    let gw = TestGateway::start_with(
        // A client without SNI counts as asking for api.example.com.
        &tls_config().replace("    listen:", "    fallback_sni: api.example.com\n    listen:"),
        &format!(
            "ssls:\n{}    client:\n      ca: {}{}{}    ssl_protocols: [TLSv1.3]\n{}    client:\n      skip_mtls_uri_regex: [\"^/public/\"]\n      ca: {}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            ssl_entry("api", "api.example.com", &api),
            yaml_block(&client_ca.pem, 8),
            ssl_entry("open", "open.example.com", &open),
            ssl_entry("v13", "v13.example.com", &v13),
            ssl_entry("mixed", "mixed.example.com", &mixed),
            yaml_block(&client_ca.pem, 8),
            nodes_yaml(&[b.addr])
        ),
        1,
    );
    let port = gw.tls().port();
    let get_path = |host: &'static str, path: &'static str, extra: Vec<String>| {
        let ca_file = ca_file.clone();
        async move {
            let resolve = format!("{host}:{port}:127.0.0.1");
            let url = format!("https://{host}:{port}{path}");
            let mut args: Vec<String> = ["-sS", "-f", "--cacert", &ca_file, "--resolve", &resolve]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(extra);
            args.push(url);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&args).await
        }
    };
    let get = |host: &'static str, extra: Vec<String>| get_path(host, "/x", extra);
    let cert =
        |i: usize| vec!["--cert".to_string(), files[i].0.clone(), "--key".to_string(), files[i].1.clone()];
    // A certificate from the SNI's client CA: served, over HTTP/2 and HTTP/1.1.
    for proto in ["--http2", "--http1.1"] {
        let mut extra = cert(0);
        extra.push(proto.to_string());
        let (ok, out, err) = get("api.example.com", extra).await;
        assert!(ok && out.contains("b"), "{proto} with a good client certificate: {err}");
    }
    // None, or one from another CA: refused at the handshake.
    let (ok, _, err) = get("api.example.com", vec![]).await;
    assert!(!ok, "no client certificate was accepted: {err}");
    let (ok, _, err) = get("api.example.com", cert(1)).await;
    assert!(!ok, "a certificate from another CA was accepted: {err}");
    // A request for that host over a connection for another name, whose handshake asked for
    // no certificate: 400, as in APISIX.
    for proto in ["--http1.1", "--http2"] {
        let extra = vec![
            "-H".into(),
            "Host: api.example.com".into(),
            proto.into(),
            "-w".into(),
            "%{http_code}".into(),
        ];
        let (_, out, err) = get("open.example.com", extra).await;
        assert!(out.ends_with("400"), "{proto}: Host api.example.com over SNI open.example.com: {out} {err}");
    }
    // Another SNI on the same port asks for none and keeps the listener's TLS versions.
    let (ok, _, err) = get("open.example.com", vec!["--tls-max".into(), "1.2".into()]).await;
    assert!(ok, "an SNI without client.ca: {err}");
    // An SNI with skip_mtls_uri_regex: the handshake asks for a certificate without requiring
    // one; a request without one is served for a matching path only, else 400.
    for proto in ["--http1.1", "--http2"] {
        let code = |extra: Vec<String>| {
            let mut e = extra;
            e.extend([proto.to_string(), "-w".into(), "%{http_code}".into()]);
            e
        };
        let (_, out, err) = get_path("mixed.example.com", "/public/a", code(vec![])).await;
        assert!(out.ends_with("200"), "{proto} /public/a without a certificate: {out} {err}");
        let (_, out, err) = get_path("mixed.example.com", "/x", code(vec![])).await;
        assert!(out.ends_with("400"), "{proto} /x without a certificate: {out} {err}");
        let (_, out, err) = get_path("mixed.example.com", "/x", code(cert(0))).await;
        assert!(out.ends_with("200"), "{proto} /x with a certificate: {out} {err}");
    }
    // The status of a request to `host` and `path` without -f, after the `extra` arguments.
    let status = |host: &str, path: &str, extra: Vec<String>| {
        let (ca_file, resolve) = (ca_file.clone(), format!("{host}:{port}:127.0.0.1"));
        let url = format!("https://{host}:{port}{path}");
        async move {
            let mut args = vec!["-sS", "--cacert", &ca_file, "--resolve", &resolve];
            args.extend(extra.iter().map(String::as_str));
            args.extend(["-w", "%{http_code}", &url]);
            let (_, out, err) = curl(&args).await;
            (out, err)
        }
    };
    // The host is checked whether it comes in the request target or in Host: over a connection
    // for open.example.com, a request whose Host is api.example.com gets 400 even when its
    // target names open.example.com.
    let target = format!("https://open.example.com:{port}/x");
    let extra = ["--http1.1", "-H", "Host: api.example.com", "--request-target", &target];
    let (out, err) = status("open.example.com", "/x", extra.map(String::from).to_vec()).await;
    assert!(out.ends_with("400"), "absolute-form target for open, Host api: {out} {err}");
    // A Host that nginx's $host makes api.example.com of: its trailing dot, its port.
    for host in ["api.example.com.", "API.example.com.:443"] {
        let extra = vec!["--http1.1".into(), "-H".into(), format!("Host: {host}")];
        let (out, err) = status("open.example.com", "/x", extra).await;
        assert!(out.ends_with("400"), "Host {host} over SNI open: {out} {err}");
    }
    // skip_mtls_uri_regex sees the path as nginx's $uri: dot segments and escapes do not get a
    // request for /x past it.
    for path in ["/public/../x", "/public/%2e%2e/x", "/public/%2E%2E/x", "/x/..%2Fpublic/a"] {
        let (out, err) = status("mixed.example.com", path, vec!["--path-as-is".into()]).await;
        assert!(out.ends_with("400"), "{path} without a certificate: {out} {err}");
    }
    // No SNI: the fallback (api.example.com) asks for the certificate, and with one its host is
    // served.
    let url = format!("https://127.0.0.1:{port}/x");
    let mut args = vec!["-sS", "-f", "-k", "-H", "Host: api.example.com", &url];
    let (ok, _, err) = curl(&args).await;
    assert!(!ok, "no SNI and no certificate was served: {err}");
    args.extend(["--cert", &files[0].0, "--key", &files[0].1]);
    let (ok, out, err) = curl(&args).await;
    assert!(ok && out.contains("b"), "no SNI, with a certificate, Host api.example.com: {err}");
    // An SNI with its own ssl_protocols.
    let (ok, _, err) = get("v13.example.com", vec!["--tlsv1.3".into()]).await;
    assert!(ok, "TLS 1.3 to an SNI with ssl_protocols [TLSv1.3]: {err}");
    let (ok, _, _) = get("v13.example.com", vec!["--tls-max".into(), "1.2".into()]).await;
    assert!(!ok, "TLS 1.2 was accepted by an SNI with ssl_protocols [TLSv1.3]");
}

/// One HTTP/1.1 request on an open connection; its status, once the whole answer is read.
async fn request_status<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, host: &str) -> u16 {
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the answer's head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
    let mut rest = vec![0; (head_end + len).saturating_sub(buf.len())];
    s.read_exact(&mut rest).await.expect("the rest of the answer's body");
    head[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_before_client_ca_was_configured_gets_400_after_the_reload() {
    let ca = Ca::new("test-ca");
    let client_ca = Ca::new("client-ca");
    let api = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    let resources = |client: &str| {
        format!(
            "ssls:\n{}{client}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            ssl_entry("api", "api.example.com", &api),
            nodes_yaml(&[b.addr])
        )
    };
    let gw = TestGateway::start_with(&tls_config(), &resources(""), 1);
    let tcp = tokio::net::TcpStream::connect(gw.tls()).await.unwrap();
    let sn = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut s = client_tls(&ca).connect(sn, tcp).await.expect("handshake without a client certificate");
    assert_eq!(request_status(&mut s, "api.example.com").await, 200);
    let v = gw.version();
    gw.write_resources(&resources(&format!("    client:\n      ca: {}", yaml_block(&client_ca.pem, 8))));
    assert!(eventually(Duration::from_secs(5), || async { gw.version() > v }).await, "reload applied");
    // The same connection, whose handshake asked for no certificate, no longer reaches the host.
    assert_eq!(request_status(&mut s, "api.example.com").await, 400);
}

/// A test client's verifier: accepts any server certificate (checking the handshake's
/// signature) and offers only `schemes`, so the server must pick a certificate that signs
/// with one of them.
#[derive(Debug)]
struct OnlySchemes(Vec<rustls::SignatureScheme>, std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for OnlySchemes {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.1.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.1.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssl_with_certs_and_keys_serves_each_client_a_certificate_it_can_verify() {
    use rustls::SignatureScheme as S;
    let ca = Ca::new("test-ca");
    let (ecdsa, ed25519, rsa) = (
        ca.leaf(&["api.example.com"]),
        ca.leaf_ed25519(&["api.example.com"]),
        ca.leaf_rsa(&["api.example.com"]),
    );
    let b = Backend::start("b").await;
    let entry = |extra: &str| {
        format!(
            "{}    certs:\n      - {}      - {}    keys:\n      - {}      - {}{extra}",
            ssl_entry("api", "api.example.com", &ecdsa),
            yaml_block(&ed25519.cert, 8),
            yaml_block(&rsa.cert, 8),
            yaml_block(&ed25519.key, 8),
            yaml_block(&rsa.key, 8)
        )
    };
    // With the listener's settings, and with settings of its own (an SniPolicy).
    for extra in ["", "    ssl_protocols: [TLSv1.2]\n"] {
        let gw = TestGateway::start_with(
            &tls_config(),
            &format!(
                "ssls:\n{}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
                entry(extra),
                nodes_yaml(&[b.addr])
            ),
            1,
        );
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        // A client whose only TLS 1.2 cipher suite is an RSA one, beside the TLS 1.3 ones, and
        // that lists ECDSA signature schemes too (as OpenSSL's `--ciphers ECDHE-RSA-...` does):
        // whichever version is spoken (the SNI may allow TLS 1.2 only, the client may speak only
        // TLS 1.2 while listing TLS 1.3 suites), the RSA certificate is the one that fits.
        let mut rsa_only = rustls::crypto::ring::default_provider();
        rsa_only.cipher_suites.retain(|s| match s {
            rustls::SupportedCipherSuite::Tls13(_) => true,
            _ => s.suite() == rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        });
        let rsa_only = std::sync::Arc::new(rsa_only);
        let all = provider.signature_verification_algorithms.supported_schemes();
        for (schemes, client, want, versions) in [
            (vec![S::ED25519], &provider, &ed25519, rustls::DEFAULT_VERSIONS),
            (vec![S::ECDSA_NISTP256_SHA256], &provider, &ecdsa, rustls::DEFAULT_VERSIONS),
            (all.clone(), &provider, &ecdsa, rustls::DEFAULT_VERSIONS),
            (all.clone(), &rsa_only, &rsa, rustls::DEFAULT_VERSIONS),
            (all.clone(), &rsa_only, &rsa, &[&rustls::version::TLS12]),
        ] {
            let cfg = rustls::ClientConfig::builder_with_provider(client.clone())
                .with_protocol_versions(versions)
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(OnlySchemes(
                    schemes.clone(),
                    provider.clone(),
                )))
                .with_no_client_auth();
            let mut s = connect_api(gw.tls(), &tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)))
                .await
                .unwrap_or_else(|e| panic!("{extra:?} {schemes:?}: {e}"));
            let got = s.get_ref().1.peer_certificates().unwrap()[0].clone();
            let want_der = strait_protocols::tls::parse_certs(&want.cert).unwrap()[0].clone();
            assert_eq!(got, want_der, "{extra:?} {schemes:?}: wrong certificate");
            assert_eq!(request_status(&mut s, "api.example.com").await, 200);
        }
    }
}

/// Strait chooses the cipher suite in its own order, AES-128-GCM first (cheaper than AES-256-GCM
/// and its SHA-384 key schedule, for both sides), even for a client that lists AES-256-GCM
/// first as OpenSSL and ring do; a client that lists ChaCha20-Poly1305 first (one without AES
/// instructions) gets ChaCha20. The same with the listener's configuration and with an SNI's
/// own (`ssl_protocols`), over TLS 1.3 and TLS 1.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suite_is_aes_128_gcm_unless_the_client_prefers_chacha20() {
    use rustls::CipherSuite as C;
    let ca = Ca::new("test-ca");
    let api = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    // A client provider whose suites come in the order given (suites not listed are left out).
    let ordered = |order: &[C]| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.retain(|s| order.contains(&s.suite()));
        p.cipher_suites.sort_by_key(|s| order.iter().position(|o| *o == s.suite()));
        std::sync::Arc::new(p)
    };
    let aes256_first = ordered(&[
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS13_CHACHA20_POLY1305_SHA256,
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ]);
    let chacha_first = ordered(&[
        C::TLS13_CHACHA20_POLY1305_SHA256,
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ]);
    let no_aes128 = ordered(&[C::TLS13_CHACHA20_POLY1305_SHA256, C::TLS13_AES_256_GCM_SHA384]);
    for extra in ["", "    ssl_protocols: [TLSv1.2, TLSv1.3]\n"] {
        let gw = TestGateway::start_with(
            &tls_config(),
            &format!(
                "ssls:\n{}{extra}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
                ssl_entry("api", "api.example.com", &api),
                nodes_yaml(&[b.addr])
            ),
            1,
        );
        let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
        for (client, versions, want) in [
            (&aes256_first, rustls::DEFAULT_VERSIONS, C::TLS13_AES_128_GCM_SHA256),
            (&aes256_first, tls12, C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            (&chacha_first, rustls::DEFAULT_VERSIONS, C::TLS13_CHACHA20_POLY1305_SHA256),
            (&chacha_first, tls12, C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
            (&no_aes128, rustls::DEFAULT_VERSIONS, C::TLS13_CHACHA20_POLY1305_SHA256),
        ] {
            let cfg = rustls::ClientConfig::builder_with_provider(client.clone())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(ca.roots())
                .with_no_client_auth();
            let mut s = connect_api(gw.tls(), &tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)))
                .await
                .unwrap_or_else(|e| panic!("{extra:?} {want:?}: {e}"));
            let got = s.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
            assert_eq!(got, Some(want), "{extra:?}: the client's suites {:?}", client.cipher_suites);
            assert_eq!(request_status(&mut s, "api.example.com").await, 200);
        }
    }
}

/// A TLS client trusting `ca`, speaking `versions`, keeping the sessions it is given (or not).
fn session_client(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
    resume: bool,
) -> tokio_rustls::TlsConnector {
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(ca.roots())
    .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// A TLS connection to `addr` for `api.example.com`.
async fn connect_api(
    addr: std::net::SocketAddr,
    c: &tokio_rustls::TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let sn = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    c.connect(sn, tcp).await
}

/// One request to `api.example.com` on a new connection (which also reads the session
/// tickets); how its handshake went, or `None` when the handshake or the request failed.
async fn visit(gw: std::net::SocketAddr, c: &tokio_rustls::TlsConnector) -> Option<rustls::HandshakeKind> {
    let mut s = connect_api(gw, c).await.ok()?;
    let req = b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n";
    s.write_all(req).await.ok()?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await.ok()?;
    answer.starts_with(b"HTTP/1.1 200").then(|| s.get_ref().1.handshake_kind()).flatten()
}

/// A client resumes its TLS session whichever worker its next connection reaches, after 300
/// other clients made sessions of their own (more than rustls's 256 per configuration), and
/// not at all with `ssl_session_timeout: 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_on_every_worker_and_after_many_other_clients() {
    use rustls::HandshakeKind::{Full, Resumed};
    let ca = Ca::new("test-ca");
    let api = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    let resources = format!(
        "ssls:\n{}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
        ssl_entry("api", "api.example.com", &api),
        nodes_yaml(&[b.addr])
    );
    let gw = TestGateway::start_with(&tls_config(), &resources, 2);
    let returning = session_client(&ca, rustls::DEFAULT_VERSIONS, true);
    assert_eq!(visit(gw.tls(), &returning).await, Some(Full));
    let others = session_client(&ca, rustls::DEFAULT_VERSIONS, false);
    for _ in 0..300 {
        assert_eq!(visit(gw.tls(), &others).await, Some(Full));
    }
    // Each connection lands on either worker's listening socket; every one resumes.
    for i in 0..8 {
        assert_eq!(visit(gw.tls(), &returning).await, Some(Resumed), "connection {i}");
    }
    // TLS 1.2 sessions (looked up, not taken) too.
    let tls12 = session_client(&ca, &[&rustls::version::TLS12], true);
    assert_eq!(visit(gw.tls(), &tls12).await, Some(Full));
    for _ in 0..2 {
        assert_eq!(visit(gw.tls(), &tls12).await, Some(Resumed));
    }

    let config = tls_config().replace("    enable: true\n", "    enable: true\n    ssl_session_timeout: 0\n");
    let gw = TestGateway::start_with(&config, &resources, 1);
    let returning = session_client(&ca, rustls::DEFAULT_VERSIONS, true);
    for _ in 0..2 {
        assert_eq!(visit(gw.tls(), &returning).await, Some(Full));
    }
}

/// A session is resumed only under the settings that made it: a reload that changes nothing
/// about the certificates served, or only adds one, keeps sessions; one that replaces the
/// certificate, or gives the SNI settings of its own, does not; a client holding a ticket from
/// before `client.ca` was set cannot skip the client certificate by resuming; an HTTP session
/// is not resumed on an L4 TLS listener (nor the other way). An SNI with settings of its own
/// resumes its own sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_follow_the_certificates_and_settings_that_made_them() {
    use rustls::HandshakeKind::{Full, Resumed};
    let ca = Ca::new("test-ca");
    let client_ca = Ca::new("client-ca");
    let (api, api2, other) =
        (ca.leaf(&["api.example.com"]), ca.leaf(&["api.example.com"]), ca.leaf(&["other.example.com"]));
    let b = Backend::start("b").await;
    // The L4 TLS listener relays to the same HTTP node, so `visit` works on both.
    let resources = |leaf: &Leaf, extra: &str, uri: &str| {
        format!(
            "ssls:\n{}{extra}routes:\n  - uri: {uri}\n    upstream: {{nodes: {n}}}\nstream_routes:\n  - upstream: {{nodes: {n}}}\n",
            ssl_entry("api", "api.example.com", leaf),
            n = nodes_yaml(&[b.addr])
        )
    };
    let config = tls_config().replace(
        "  control:",
        "  proxy_mode: http&stream\n  stream_proxy:\n    tcp:\n      - addr: \"127.0.0.1:0\"\n        tls: true\n  control:",
    );
    let gw = TestGateway::start_with(&config, &resources(&api, "", "/*"), 1);
    let gw = &gw;
    let reload = |text: String| async move {
        let v = gw.version();
        gw.write_resources(&text);
        assert!(
            eventually(Duration::from_secs(5), || async move { gw.version() > v }).await,
            "reload applied"
        );
    };
    let c = session_client(&ca, rustls::DEFAULT_VERSIONS, true);
    assert_eq!(visit(gw.tls(), &c).await, Some(Full));
    assert_eq!(visit(gw.tls(), &c).await, Some(Resumed));
    // The HTTP listener's session is not the L4 listener's, and back.
    assert_eq!(visit(gw.stream(0), &c).await, Some(Full));
    assert_eq!(visit(gw.stream(0), &c).await, Some(Resumed));
    assert_eq!(visit(gw.tls(), &c).await, Some(Full));
    // A reload that leaves the certificates alone, or adds one for another name, keeps them.
    reload(resources(&api, "", "/x")).await;
    assert_eq!(visit(gw.tls(), &c).await, Some(Resumed));
    reload(resources(&api, &ssl_entry("other", "other.example.com", &other), "/x")).await;
    assert_eq!(visit(gw.tls(), &c).await, Some(Resumed));
    // A new certificate for the SNI: no session made with the old one is resumed.
    reload(resources(&api2, "", "/x")).await;
    assert_eq!(visit(gw.tls(), &c).await, Some(Full));
    assert_eq!(visit(gw.tls(), &c).await, Some(Resumed));
    // Settings of its own: its own sessions, which it resumes.
    let own = "    ssl_protocols: [TLSv1.2, TLSv1.3]\n";
    reload(resources(&api2, own, "/x")).await;
    assert_eq!(visit(gw.tls(), &c).await, Some(Full));
    assert_eq!(visit(gw.tls(), &c).await, Some(Resumed));
    // Client certificates required now: the ticket the client holds does not let it skip the
    // certificate. The handshake asks for one (no resumption) and ends with an alert, not with
    // an answer (which a resumed session would get: a 400).
    let mtls = format!("    client:\n      ca: {}", yaml_block(&client_ca.pem, 8));
    reload(resources(&api2, &mtls, "/x")).await;
    if let Ok(mut s) = connect_api(gw.tls(), &c).await {
        assert_ne!(
            s.get_ref().1.handshake_kind(),
            Some(Resumed),
            "resumed past a required client certificate"
        );
        let _ = s.write_all(b"GET /x HTTP/1.1\r\nHost: api.example.com\r\n\r\n").await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        assert!(matches!(read, Ok(Err(_))), "no alert but {:?}", String::from_utf8_lossy(&answer));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_by_sni_with_wildcards_and_alpn() {
    let ca = Ca::new("test-ca");
    let api = ca.leaf(&["api.example.com"]);
    let wild = ca.leaf(&["*.example.com"]);
    let b = Backend::start("b").await;
    let (_dir, ca_file) = ca_file(&ca);
    let gw = TestGateway::start_with(
        &tls_config(),
        &format!(
            "ssls:\n{}{}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            ssl_entry("api", "api.example.com", &api),
            ssl_entry("wild", "\"*.example.com\"", &wild),
            nodes_yaml(&[b.addr])
        ),
        2,
    );
    let port = gw.tls().port();
    for (host, http2, expect_cn) in [
        ("api.example.com", true, "api.example.com"),
        ("www.example.com", true, "*.example.com"),
        ("www.example.com", false, "*.example.com"),
    ] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/x");
        let proto = if http2 { "--http2" } else { "--http1.1" };
        let (ok, out, err) = curl(&[
            "-f",
            "--cacert",
            &ca_file,
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
    // No certificate for this name (and no fallback_sni): the handshake fails. A wildcard
    // covers one label, as APISIX's SNI router (and the certificate) have it: a deeper name has
    // none either. A client offering only ALPN `http/1.0` is served (nginx offers it too).
    for host in ["other.org", "deep.sub.example.com"] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let (ok, _, err) = curl(&["-k", "--resolve", &resolve, &format!("https://{host}:{port}/")]).await;
        assert!(!ok, "{host}: {err}");
    }
    let resolve = format!("api.example.com:{port}:127.0.0.1");
    let (ok, out, err) = curl(&[
        "-f",
        "--cacert",
        &ca_file,
        "--resolve",
        &resolve,
        "--http1.0",
        "-w",
        "\n%{http_version} %{http_code}",
        &format!("https://api.example.com:{port}/x"),
    ])
    .await;
    assert!(ok && out.ends_with(" 200"), "{out} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_verification_and_client_certificate() {
    let ca = Ca::new("upstream-ca");
    let server = ca.leaf(&["backend.internal"]);
    let client = ca.leaf(&["strait-client"]);
    let b = Backend::start_tls("secure", &server, Some(&ca.pem), &[b"http/1.1"]).await;
    let (_dir, config) = support::certs::trusting(BASE_CONFIG, &ca);
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

/// `https` probes speak TLS to the node, verify its certificate against the trusted CAs for
/// `checks.active.host`, present the upstream's client certificate, and read the status: the
/// node whose `/healthz` answers 503 goes out, the other stays. A probe that failed its
/// handshake would take both out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_probes_verify_the_node_and_present_the_client_certificate() {
    let ca = Ca::new("upstream-ca");
    let server = ca.leaf(&["backend.internal"]);
    let client = ca.leaf(&["strait-client"]);
    let good = Backend::start_tls("good", &server, Some(&ca.pem), &[b"http/1.1"]).await;
    let sick = Backend::start_tls("sick", &server, Some(&ca.pem), &[b"http/1.1"]).await;
    sick.state.health_status.store(503, std::sync::atomic::Ordering::Relaxed);
    let (_dir, config) = support::certs::trusting(BASE_CONFIG, &ca);
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "upstreams:
  - id: u
    scheme: https
    pass_host: rewrite
    upstream_host: backend.internal
    tls:
      verify: true
      client_cert: {}      client_key: {}    nodes: {n}
    checks:
      active:
        type: https
        host: backend.internal
        http_path: /healthz
        healthy: {{interval: 1, successes: 1}}
        unhealthy: {{interval: 1, http_failures: 1, tcp_failures: 1}}
routes:
  - uri: /*
    upstream_id: u
",
            yaml_block(&client.cert, 8),
            yaml_block(&client.key, 8),
            n = nodes_yaml(&[good.addr, sick.addr])
        ),
        1,
    );
    let statuses = || async {
        (node_status(&gw, "u", good.addr.port()).await, node_status(&gw, "u", sick.addr.port()).await)
    };
    let want = ("healthy".to_string(), "unhealthy".to_string());
    assert!(
        eventually(Duration::from_secs(10), || async { statuses().await == want }).await,
        "{:?}",
        statuses().await
    );
    for _ in 0..4 {
        let (status, headers, _) = get(gw.http(), "/x").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "good");
    }
}

/// HTTP/1.1 over TLS takes the same direct relay as plain HTTP/1.1: several requests on one
/// kept-alive TLS connection (one without a body, one with a small body), and an answer whose
/// body ends with the node's close arrives whole, the TLS session closed cleanly (close_notify:
/// a client would otherwise have to treat the body as cut off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_is_relayed_with_keepalive_and_a_clean_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new("test-ca");
    let leaf = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    // A node whose answer has no length: its body ends where the node closes.
    let closing = hand_node(|mut s| async move {
        if !read_request_head(&mut s).await {
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end").await;
    })
    .await;
    let (_dir, ca_path) = ca_file(&ca);
    let ca_path = ca_path.as_str();
    let gw = TestGateway::start_with(
        &tls_config(),
        &format!(
            "ssls:\n{}routes:\n  - uri: /closing\n    upstream: {{nodes: {}}}\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            ssl_entry("api", "api.example.com", &leaf),
            nodes_yaml(&[closing]),
            nodes_yaml(&[b.addr])
        ),
        1,
    );
    let port = gw.tls().port();
    let resolve = format!("api.example.com:{port}:127.0.0.1");
    let base = format!("https://api.example.com:{port}");
    // Two GETs and a POST on one connection (curl reuses it for the URLs of one call).
    let (ok, out, err) = curl(&[
        "-f",
        "-v",
        "--http1.1",
        "--cacert",
        ca_path,
        "--resolve",
        &resolve,
        &format!("{base}/one"),
        &format!("{base}/two"),
        "--next",
        "--http1.1",
        "--cacert",
        ca_path,
        "--resolve",
        &resolve,
        "-d",
        "small body",
        &format!("{base}/three"),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(err.matches("Re-using existing connection").count(), 2, "one TLS connection: {err}");
    let answers: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(&out).into_iter().map(|v| v.unwrap()).collect();
    assert_eq!(answers.len(), 3, "{out}");
    for (a, (method, uri)) in answers.iter().zip([("GET", "/one"), ("GET", "/two"), ("POST", "/three")]) {
        assert_eq!((a["method"].as_str(), a["uri"].as_str()), (Some(method), Some(uri)));
        assert_eq!(a["headers"]["x-forwarded-proto"], "https");
    }
    assert_eq!(b.requests(), 3);

    // rustls reports a close without close_notify as an error (UnexpectedEof).
    let tcp = tokio::net::TcpStream::connect(gw.tls()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut tls = client_tls(&ca).connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(b"GET /closing HTTP/1.1\r\nhost: api.example.com\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_))),
        "the body delimited by the close must end cleanly: {read:?} after {text}"
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\nuntil the end"), "{text}");

    // An idle kept-alive TLS connection is closed (with close_notify) when the gateway stops,
    // not held until the drain deadline.
    let tcp = tokio::net::TcpStream::connect(gw.tls()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut tls = client_tls(&ca).connect(name, tcp).await.expect("TLS handshake");
    // 128 requests of 64 bytes in one write (pipelined): all are answered, in order, including
    // those still held by the TLS layer when the relay's own buffer (4 KiB) runs empty.
    let pipeline: Vec<u8> = (0..128)
        .flat_map(|i| {
            format!("GET /p{i:03} HTTP/1.1\r\nhost: api.example.com\r\nx: {:014}\r\n\r\n", 0).into_bytes()
        })
        .collect();
    assert_eq!(pipeline.len(), 128 * 64);
    tls.write_all(&pipeline).await.unwrap();
    let mut answers = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while !String::from_utf8_lossy(&answers).contains("\"uri\":\"/p127\"") {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut chunk)).await;
        let n = read.expect("answers stopped coming").unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&answers));
        answers.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answers);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 128);
    assert!(text.find("/p063").unwrap() < text.find("/p064").unwrap());
    let mut gw = gw;
    let start = std::time::Instant::now();
    let stopped = tokio::task::spawn_blocking(move || gw.shutdown());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    assert!(start.elapsed() < std::time::Duration::from_secs(3), "closed after {:?}", start.elapsed());
    stopped.await.unwrap();
}

/// Requests to `https` nodes take the HTTP/1.1 relay over pooled TLS connections (ALPN
/// `http/1.1`, even from a node that prefers `h2`): one node connection serves a series of
/// requests, from HTTP/1.1 and HTTP/2 clients, with and without bodies, streamed ones too
/// (echoed by the node as it reads them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_nodes_are_relayed_over_pooled_tls_connections() {
    use bytes::Bytes;
    use http_body_util::Full;
    let ca = Ca::new("upstream-ca");
    let server = ca.leaf(&["backend.internal"]);
    let b = Backend::start_tls("secure", &server, None, &[b"h2", b"http/1.1"]).await;
    // One worker: node connections are pooled per worker.
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!(
            "routes:
  - uri: /*
    upstream:
      scheme: https
      pass_host: rewrite
      upstream_host: backend.internal
      nodes: {}
",
            nodes_yaml(&[b.addr])
        ),
        1,
    );
    for i in 0..5 {
        let (status, headers, body) = get(gw.http(), &format!("/get/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "secure");
        assert_eq!(json(&body)["headers"]["host"], "backend.internal");
        assert_eq!(json(&body)["version"], "HTTP/1.1", "ALPN http/1.1, though the node prefers h2");
    }
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let post = |uri: &str| http::Request::post(uri).body(Full::new(Bytes::from(big.clone()))).unwrap();
    let mut h1 = post("/echo");
    h1.headers_mut().insert("host", http::HeaderValue::from_static("localhost"));
    let (status, _, body) = send(gw.http(), h1).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == big[..], "HTTP/1.1 upload: {} of {} bytes came back", body.len(), big.len());
    let (status, _, body, _) = send_h2(gw.http(), post("http://localhost/echo")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == big[..], "HTTP/2 upload: {} of {} bytes came back", body.len(), big.len());
    let small =
        http::Request::post("http://localhost/echo").body(Full::new(Bytes::from_static(b"small"))).unwrap();
    let (status, _, body, _) = send_h2(gw.http(), small).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"small"[..]));
    assert_eq!(b.requests(), 8);
    assert_eq!(
        b.state.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "every request went over the one pooled TLS connection"
    );
}

/// A TLS node that closes a kept-alive connection after its answer (`close_notify`, then
/// FIN, as a node's keep-alive timeout does) costs the next request nothing: it goes over a
/// fresh connection instead of failing on the closed one, also when it is a `POST` (which is
/// not sent twice, so the pooled connection must be found closed before it is used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_node_closing_an_idle_connection_is_not_a_failure() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ca = Ca::new("upstream-ca");
    let leaf = ca.leaf(&["backend.internal"]);
    let acceptor = tls_acceptor(&leaf);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, d) = (conns.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, d) = (acceptor.clone(), d.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Some(got) = request_head_bytes(&mut tls).await else { return };
                // The rest of the request's body, when it has one (a POST's 4 bytes).
                let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else { return };
                let length = if got.to_ascii_lowercase().windows(17).any(|w| w == b"content-length: 4") {
                    4
                } else {
                    0
                };
                let mut rest = vec![0u8; length - (got.len() - end).min(length)];
                if tls.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let body = format!("connection {n}");
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                let _ = tls.write_all(answer.as_bytes()).await;
                // Idle now: the node's keep-alive ends at once.
                let _ = tls.shutdown().await;
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    // One worker, whose pool holds the connection the node closes.
    let gw = TestGateway::start_with(
        BASE_CONFIG,
        &format!(
            "routes:\n  - uri: /*\n    upstream:\n      scheme: https\n      nodes: {}\n",
            nodes_yaml(&[addr])
        ),
        1,
    );
    for i in 0..4 {
        let (status, _, body) = if i % 2 == 0 {
            get(gw.http(), "/").await
        } else {
            let post = http::Request::post("/")
                .header("host", "localhost")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"data")))
                .unwrap();
            send(gw.http(), post).await
        };
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(&body[..], format!("connection {i}").as_bytes());
        assert!(eventually(Duration::from_secs(5), || async { closed.load(Ordering::SeqCst) > i }).await);
    }
    assert_eq!(conns.load(Ordering::SeqCst), 4);
}

/// A TLS server on 127.0.0.1:0 with `leaf` that reads each request's body slowly (256 KiB
/// every 5 ms, through a small receive buffer), then answers with the length it read.
async fn slow_reading_tls_node(leaf: &Leaf) -> std::net::SocketAddr {
    let acceptor = tls_acceptor(leaf);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // Set before listening, so accepted connections keep it (and the kernel does not grow it).
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let Some(have) = request_head_bytes(&mut tls).await else { return };
                    let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") else { return };
                    let head = String::from_utf8_lossy(&have[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let mut got = have.len() - end - 4;
                    while got < length {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let want = buf.len().min(length - got);
                        match tls.read(&mut buf[..want]).await {
                            Ok(n @ 1..) => got += n,
                            _ => return,
                        }
                    }
                    let body = got.to_string();
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if tls.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A body sent to an `https` node that reads slowly reaches it whole, from HTTP/1.1 and
/// HTTP/2 clients: the gateway's writes wait for the node, and what its TLS session took while
/// the socket was full still goes out after the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_a_slow_https_node_arrive_whole() {
    use bytes::Bytes;
    use http_body_util::Full;
    let ca = Ca::new("upstream-ca");
    let node = slow_reading_tls_node(&ca.leaf(&["backend.internal"])).await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    timeout: {{connect: 5, send: 5, read: 5}}\n    upstream:\n      scheme: https\n      nodes: {}\n",
        nodes_yaml(&[node])
    ));
    let big = Bytes::from(vec![7u8; 8 << 20]);
    let mut h1 = http::Request::post("/upload").body(Full::new(big.clone())).unwrap();
    h1.headers_mut().insert("host", http::HeaderValue::from_static("localhost"));
    let (status, _, body) = send(gw.http(), h1).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, big.len().to_string().as_bytes()), "HTTP/1.1");
    let h2 = http::Request::post("http://localhost/upload").body(Full::new(big.clone())).unwrap();
    let (status, _, body, _) = send_h2(gw.http(), h2).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, big.len().to_string().as_bytes()), "HTTP/2");
}

/// An `https` node that answers an upload at once and resets the connection with the body
/// unread (a 413, an auth failure): the client gets the node's answer, not a 502, from HTTP/1.1
/// and HTTP/2 clients alike, for a body streamed to the node and for one sent with the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_node_answering_an_upload_early_and_resetting_is_relayed() {
    use bytes::Bytes;
    use http_body_util::Full;
    let ca = Ca::new("upstream-ca");
    let leaf = ca.leaf(&["backend.internal"]);
    let acceptor = tls_acceptor(&leaf);
    // A body is mostly still in the gateway's socket when the reset comes.
    let listener = narrow_listener();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            // Without Nagle's delay: an answer held back behind the unacknowledged session
            // tickets would be discarded by the reset.
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                if !read_request_head(&mut tls).await {
                    return;
                }
                let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!";
                if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                // Closed with the body unread, no close_notify and no lingering: a reset.
                let _ = socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO));
            });
        }
    });
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{scheme: https, retries: 0, nodes: {}}}\n",
        nodes_yaml(&[addr])
    ));
    // Streamed (8 MiB), and read whole then sent with the head (60 KiB).
    for (i, size) in [8 << 20, 60 << 10].into_iter().cycle().take(10).enumerate() {
        let body = Bytes::from(vec![b'x'; size]);
        let req = http::Request::post("/up").header("host", "h").body(Full::new(body.clone())).unwrap();
        let (status, _, answer) = send(gw.http(), req).await;
        assert_eq!((status, &answer[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too big!"[..]), "upload {i}");
        let req =
            http::Request::post(format!("http://{}/up", gw.http())).body(Full::new(body.clone())).unwrap();
        let (status, _, answer, _) = send_h2(gw.http(), req).await;
        assert_eq!((status, &answer[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too big!"[..]), "h2 upload {i}");
    }
}

/// An `https` node whose answer has no length and that closes without `close_notify` (as many
/// servers do): the body it sent is relayed whole and ends cleanly, as nginx (and so APISIX)
/// relays it. An answer with a length cut off the same way is still an error for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_node_closing_without_close_notify_ends_a_body_delimited_by_its_close() {
    use tokio::io::AsyncWriteExt;
    let ca = Ca::new("upstream-ca");
    let addr = hand_tls_node(tls_acceptor(&ca.leaf(&["backend.internal"])), |mut tls| async move {
        let Some(head) = request_head_bytes(&mut tls).await else { return };
        let answer: &[u8] = if head.starts_with(b"GET /cut") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"
        };
        if tls.write_all(answer).await.is_ok() && tls.flush().await.is_ok() {
            // Dropped without `shutdown`: FIN with no close_notify before it.
            drop(tls);
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        "routes:\n  - uri: /*\n    upstream: {{scheme: https, retries: 0, nodes: {}}}\n",
        nodes_yaml(&[addr])
    ));
    for _ in 0..3 {
        let (status, _, body) = get(gw.http(), "/open").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"until the end"[..]), "HTTP/1.1");
        let req = http::Request::get(format!("http://{}/open", gw.http()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (status, _, body, _) = send_h2(gw.http(), req).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"until the end"[..]), "HTTP/2");
    }
    // A body with a length that ends early is cut off, not passed on as whole.
    let (ok, out, _) =
        curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}/cut", gw.http())]).await;
    assert!(!ok, "curl must see the body cut off");
    assert_eq!(out, "200");
}

/// Mangled ClientHellos (and parts of one) on the HTTPS listener, from clients that then
/// neither send more nor close: each connection is ended within the handshake's time
/// (`client_header_timeout`, 2 s here), none is held open, and the listener serves a clean
/// client afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_client_hellos_on_the_https_listener_are_closed_within_the_timeout() {
    let panics = count_panics();
    let ca = Ca::new("test-ca");
    let leaf = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    let gw = TestGateway::start_with(
        &tls_config(),
        &format!(
            "ssls:\n{}routes:\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            ssl_entry("api", "api.example.com", &leaf),
            nodes_yaml(&[b.addr])
        ),
        1,
    );
    let hello = support::certs::client_hello("api.example.com");
    let mut rng = Rng(0x5eed_71c5_0000_0001);
    let sessions = (0..mangle_rounds(100)).map(|_| (gw.tls(), mangle(&mut rng, &hello))).collect();
    // No more bytes, and no close: the handshake's timeout must end each.
    each_session_ends(sessions, false, Duration::from_secs(20)).await;
    assert_eq!(panics.load(std::sync::atomic::Ordering::SeqCst), 0, "a panic (see above)");
    let (ok, _, err) = curl(&[
        "-f",
        "--cacert",
        ca_file(&ca).1.as_str(),
        "--resolve",
        &format!("api.example.com:{}:127.0.0.1", gw.tls().port()),
        &format!("https://api.example.com:{}/x", gw.tls().port()),
    ])
    .await;
    assert!(ok, "{err}");
}

/// A wildcard entry's client-certificate rules cover every depth its routes match: a route for
/// `*.secure.test` cannot be reached without a client certificate by a connection made for
/// another name with `Host: a.b.secure.test` (no certificate serves that deeper name, but the
/// route takes it). APISIX looks the host's entry up one label deep and would let it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_entry_client_ca_covers_hosts_of_any_depth() {
    let ca = Ca::new("test-ca");
    let client_ca = Ca::new("client-ca");
    let (secure, open) = (ca.leaf(&["*.secure.test"]), ca.leaf(&["open.test"]));
    let (b_secure, b_open) = (Backend::start("secure").await, Backend::start("open").await);
    let (_dir, ca_file) = ca_file(&ca);
    let gw = TestGateway::start_with(
        &tls_config(),
        &format!(
            "ssls:\n{}    client:\n      ca: {}{}routes:\n  - uri: /*\n    hosts: [\"*.secure.test\"]\n    upstream: {{nodes: {}}}\n  - uri: /*\n    upstream: {{nodes: {}}}\n",
            ssl_entry("secure", "\"*.secure.test\"", &secure),
            yaml_block(&client_ca.pem, 8),
            ssl_entry("open", "open.test", &open),
            nodes_yaml(&[b_secure.addr]),
            nodes_yaml(&[b_open.addr])
        ),
        1,
    );
    let port = gw.tls().port();
    let resolve = format!("open.test:{port}:127.0.0.1");
    for host in ["x.secure.test", "a.b.secure.test"] {
        let (_, out, err) = curl(&[
            "-sS",
            "--cacert",
            &ca_file,
            "--resolve",
            &resolve,
            "-H",
            &format!("Host: {host}"),
            "-w",
            "\n%{http_code}",
            &format!("https://open.test:{port}/x"),
        ])
        .await;
        assert!(out.ends_with("\n400"), "{host} through open.test: {out} {err}");
    }
    assert_eq!(b_secure.requests(), 0);
    // The open name itself is served.
    let (ok, out, err) = curl(&[
        "-sS",
        "-f",
        "--cacert",
        &ca_file,
        "--resolve",
        &resolve,
        &format!("https://open.test:{port}/x"),
    ])
    .await;
    assert!(ok && out.contains("open"), "{out} {err}");
}

/// `apisix.proxy_protocol.listen_https_port`: the PROXY header comes before the TLS handshake,
/// and with `real_ip_header: proxy_protocol` its source is the client (`remote_addrs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_https_port_reads_the_header_before_the_handshake() {
    let ca = Ca::new("test-ca");
    let leaf = ca.leaf(&["api.example.com"]);
    let b = Backend::start("b").await;
    let config = tls_config()
        .replace("  control:", "  proxy_protocol:\n    listen_https_port: 0\n  control:")
        .replace(
            "    client_body_timeout: 2s\n",
            "    client_body_timeout: 2s\n    real_ip_header: proxy_protocol\n    real_ip_from: [127.0.0.1]\n",
        );
    assert!(config.contains("listen_https_port") && config.contains("real_ip_header"));
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "ssls:\n{}routes:\n  - uri: /x\n    remote_addrs: [203.0.113.0/24]\n    upstream: {{nodes: {}}}\n",
            ssl_entry("api", "api.example.com", &leaf),
            nodes_yaml(&[b.addr])
        ),
        1,
    );
    let port = gw.running().addrs.tls.last().expect("the PROXY protocol port").port();
    let connect = |source: &'static str| {
        let connector = client_tls(&ca);
        async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(format!("PROXY TCP4 {source} 192.0.2.1 40000 443\r\n").as_bytes()).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
            connector.connect(name, tcp).await.expect("TLS after the PROXY header")
        }
    };
    assert_eq!(request_status(&mut connect("203.0.113.5").await, "api.example.com").await, 200);
    assert_eq!(request_status(&mut connect("198.51.100.5").await, "api.example.com").await, 404);
}
