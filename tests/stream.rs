//! The L4 proxy with real clients and servers: TCP echo with half-close and a 32 MiB transfer,
//! redis-cli and redis-benchmark against a real redis-server, TLS termination by SNI, SNI
//! passthrough, TLS origination, PROXY protocol in and out, health checks, idle timeouts.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::certs::{Ca, Leaf, client_tls, client_tls_with_cert, yaml_block};
use support::servers::{Echo, ProxyRecorder, Redis, require_bin};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

fn stream_config(listeners: &str) -> String {
    format!(
        "apisix:
  proxy_mode: http&stream
  node_listen:
    - ip: 127.0.0.1
      port: 0
  stream_proxy:
    tcp:
{listeners}
  control:
    ip: 127.0.0.1
    port: 0
nginx_config:
  http:
    client_header_timeout: 2s
"
    )
}

const PLAIN: &str = "      - \"127.0.0.1:0\"\n";

/// Sends `msg`, half-closes, and reads everything back.
async fn round_trip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("no EOF").unwrap();
    out
}

/// Sends `msg` and expects the gateway to close (EOF or reset) without sending anything.
async fn closed_without_data(addr: SocketAddr, msg: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(msg).await;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => out.is_empty(),
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Err(_) => false,
    }
}

/// Connects with TLS and SNI `name`; returns the stream and whether the server presented `leaf`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
    name: &str,
    leaf: &Leaf,
) -> (tokio_rustls::client::TlsStream<TcpStream>, bool) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let sn = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let s = client_tls(ca).connect(sn, tcp).await.expect("TLS handshake");
    let presented = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let want = strait_protocols::tls::parse_certs(&leaf.cert).unwrap()[0].clone();
    (s, presented == want)
}

/// Sends `len` bytes through `s` to an [`Echo`] node, then ends the sending side, and checks that
/// every byte comes back in order, followed by the node's `bye` to the EOF.
async fn echoes_byte_for_byte<S>(s: S, len: u32)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (mut r, mut w) = tokio::io::split(s);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(data.len() + 3);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len() + 3);
    assert!(back[..data.len()] == data[..], "bytes differ");
    assert_eq!(&back[data.len()..], b"bye");
}

/// Writes `ping` on `s` and checks that it comes back (through an [`Echo`] node).
async fn pings<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
}

/// A gateway with one TLS-terminating listener whose `ssls` entry serves `leaf` for `db.test`,
/// and one stream route to `echo`.
fn tls_route(leaf: &Leaf, echo: &Echo, workers: usize) -> TestGateway {
    TestGateway::start_with(
        &stream_config("      - addr: \"127.0.0.1:0\"\n        tls: true\n"),
        &format!(
            "ssls:\n  - snis: [db.test]\n    cert: {}    key: {}stream_routes:\n  - upstream: {{nodes: {}}}\n",
            yaml_block(&leaf.cert, 6),
            yaml_block(&leaf.key, 6),
            nodes_yaml(&[echo.addr])
        ),
        workers,
    )
}

/// A gateway with one plain TCP listener and one stream route to `nodes`.
fn one_tcp_route(nodes: &[SocketAddr], workers: usize) -> TestGateway {
    TestGateway::start_with(
        &stream_config(PLAIN),
        &format!("stream_routes:\n  - id: s\n    upstream: {{scheme: tcp, nodes: {}}}\n", nodes_yaml(nodes)),
        workers,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_with_half_close_and_32_mib_byte_for_byte() {
    let echo = Echo::start().await;
    let gw = one_tcp_route(&[echo.addr], 2);
    // Half-close: the client's EOF reaches the node, whose answer still comes back.
    assert_eq!(round_trip(gw.stream(0), b"hello").await, b"hellobye");
    echoes_byte_for_byte(TcpStream::connect(gw.stream(0)).await.unwrap(), 32 << 20).await;
}

/// The other order: the node speaks first and half-closes, the client keeps sending. The
/// client must see the greeting then EOF, and the node must still get every byte the client
/// sends afterwards, then its EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_half_close_reaches_the_client_and_the_client_can_still_send() {
    let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = node.accept().await.unwrap();
        s.write_all(b"greeting").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let gw = one_tcp_route(&[node_addr], 1);
    let mut c = TcpStream::connect(gw.stream(0)).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(greeting, b"greeting");
    let late = vec![7u8; 300 * 1024];
    c.write_all(&late).await.unwrap();
    c.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    assert_eq!(got.len(), late.len());
    assert!(got == late, "bytes differ");
}

/// A bulk transfer from a sender that never pauses to a receiver that always reads: the relay
/// must keep going when tokio's cooperative budget runs out (it once spun at 100% CPU there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_never_pauses_arrives_whole() {
    const TOTAL: u64 = 1 << 30;
    let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    let sink = tokio::spawn(async move {
        let (mut s, _) = node.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n as u64,
            }
        }
    });
    let gw = one_tcp_route(&[node_addr], 1);
    let mut c = TcpStream::connect(gw.stream(0)).await.unwrap();
    let block = vec![b'x'; 1 << 20];
    let send = async {
        for _ in 0..TOTAL / block.len() as u64 {
            c.write_all(&block).await.unwrap();
        }
        c.shutdown().await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(60), send).await.expect("the relay stopped taking bytes");
    let got =
        tokio::time::timeout(Duration::from_secs(60), sink).await.expect("the node got no EOF").unwrap();
    assert_eq!(got, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_the_proxy_with_redis_cli_and_redis_benchmark() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    if !require_bin("redis-cli") || !require_bin("redis-benchmark") {
        return;
    }
    let gw = TestGateway::start_with(
        &stream_config(PLAIN),
        &format!("stream_routes:\n  - id: redis\n    upstream: {{nodes: {}}}\n", nodes_yaml(&[redis.addr])),
        2,
    );
    let port = gw.stream(0).port().to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "strait", "through-the-proxy"]), "OK");
    assert_eq!(cli(&["GET", "strait"]), "through-the-proxy");
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "-n", "2000", "-c", "8", "-t", "set,get"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
}

/// A terminated TLS session carries a bulk transfer byte for byte both ways, and the client's
/// close (`close_notify`, then FIN) reaches the node as an EOF whose answer still comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_relays_8_mib_byte_for_byte_with_half_close() {
    let ca = Ca::new("stream-ca");
    let leaf = ca.leaf(&["db.test"]);
    let echo = Echo::start().await;
    let gw = tls_route(&leaf, &echo, 2);
    let (s, _) = tls_connect(gw.stream(0), &ca, "db.test", &leaf).await;
    echoes_byte_for_byte(s, 8 << 20).await;
}

/// A TLS client that sends its request and then half-closes its TCP connection without
/// `close_notify` (a bare `shutdown(SHUT_WR)`) still gets the node's whole answer: its EOF is
/// passed on as a half-close, not taken as an error that ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_half_closing_without_close_notify_gets_the_whole_answer() {
    let ca = Ca::new("stream-ca");
    let leaf = ca.leaf(&["db.test"]);
    let echo = Echo::start().await;
    let gw = tls_route(&leaf, &echo, 1);
    let (mut s, _) = tls_connect(gw.stream(0), &ca, "db.test", &leaf).await;
    s.write_all(b"request").await.unwrap();
    s.flush().await.unwrap();
    s.get_mut().0.shutdown().await.unwrap();
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await.expect("no EOF");
    assert!(read.is_ok(), "{read:?}");
    assert_eq!(back, b"requestbye", "the echo and the node's answer to the EOF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_with_client_ca_relays_only_for_client_certificates() {
    let ca = Ca::new("stream-ca");
    let client_ca = Ca::new("client-ca");
    let leaf = ca.leaf(&["db.test"]);
    let echo = Echo::start().await;
    let gw = TestGateway::start_with(
        &stream_config("      - addr: \"127.0.0.1:0\"\n        tls: true\n"),
        &format!(
            // skip_mtls_uri_regex is for HTTP paths: L4 sessions always need the certificate.
            "ssls:\n  - snis: [db.test]\n    cert: {}    key: {}    client:\n      skip_mtls_uri_regex: [\".\"]\n      ca: {}stream_routes:\n  - upstream: {{nodes: {}}}\n",
            yaml_block(&leaf.cert, 6),
            yaml_block(&leaf.key, 6),
            yaml_block(&client_ca.pem, 8),
            nodes_yaml(&[echo.addr])
        ),
        1,
    );
    let sn = rustls::pki_types::ServerName::try_from("db.test").unwrap();
    // With a certificate from the client CA: relayed.
    let tcp = TcpStream::connect(gw.stream(0)).await.unwrap();
    let connector = client_tls_with_cert(&ca, &client_ca.leaf(&["client"]));
    let mut s = connector.connect(sn.clone(), tcp).await.expect("TLS handshake with a client certificate");
    pings(&mut s).await;
    // Without one: the gateway ends the handshake (with TLS 1.3 the client learns it at its
    // first read) and the node never sees the session.
    let tcp = TcpStream::connect(gw.stream(0)).await.unwrap();
    let relayed = match client_tls(&ca).connect(sn, tcp).await {
        Err(_) => false,
        Ok(mut s) => {
            let _ = s.write_all(b"ping").await;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.is_ok()
        }
    };
    assert!(!relayed, "relayed without a client certificate");
    assert_eq!(*echo.connections.lock().unwrap(), 1);
}

/// A name whose `ssls` entry asks for client certificates is not routed by an (unverified)
/// ClientHello on a plain listener: a client could otherwise reach its route past the
/// certificate check of the TLS listener, with a decoy ClientHello before plain bytes. On the
/// TLS listener, with a certificate, the route serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_name_is_not_routed_by_its_client_hello_on_a_plain_listener() {
    let ca = Ca::new("stream-ca");
    let client_ca = Ca::new("client-ca");
    let leaf = ca.leaf(&["db.test"]);
    let echo = Echo::start().await;
    // A plain listener and a TLS one; an `ssls` entry for `sni` that asks for client
    // certificates, and a stream route for the same name.
    let gateway = |sni: &str, leaf: &Leaf| {
        TestGateway::start_with(
            &stream_config("      - \"127.0.0.1:0\"\n      - addr: \"127.0.0.1:0\"\n        tls: true\n"),
            &format!(
                "ssls:\n  - snis: [\"{sni}\"]\n    cert: {}    key: {}    client:\n      ca: {}stream_routes:\n  - sni: \"{sni}\"\n    upstream: {{nodes: {}}}\n",
                yaml_block(&leaf.cert, 6),
                yaml_block(&leaf.key, 6),
                yaml_block(&client_ca.pem, 8),
                nodes_yaml(&[echo.addr])
            ),
            1,
        )
    };
    let decoy = |name: &str| [support::certs::client_hello(name), b"FLUSHALL\r\n".to_vec()].concat();
    let gw = gateway("db.test", &leaf);
    assert!(closed_without_data(gw.stream(0), &decoy("db.test")).await, "a decoy ClientHello was routed");
    assert_eq!(*echo.connections.lock().unwrap(), 0);
    // A wildcard entry's rules cover every depth a wildcard route takes: no certificate serves
    // `a.b.db.test`, but the `*.db.test` route would take it.
    let deep = gateway("*.db.test", &ca.leaf(&["*.db.test"]));
    for name in ["x.db.test", "a.b.db.test"] {
        assert!(
            closed_without_data(deep.stream(0), &decoy(name)).await,
            "{name}: a decoy ClientHello was routed"
        );
    }
    assert_eq!(*echo.connections.lock().unwrap(), 0);
    let sn = rustls::pki_types::ServerName::try_from("db.test").unwrap();
    let tcp = TcpStream::connect(gw.stream(1)).await.unwrap();
    let connector = client_tls_with_cert(&ca, &client_ca.leaf(&["client"]));
    let mut s = connector.connect(sn, tcp).await.expect("TLS handshake with a client certificate");
    pings(&mut s).await;
    assert_eq!(*echo.connections.lock().unwrap(), 1);
}

/// A TLS client that sends no SNI is routed as having asked for `apisix.ssl.fallback_sni`, as
/// APISIX's `ssl.server_name()` has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_sni_is_routed_by_fallback_sni() {
    let ca = Ca::new("stream-ca");
    let leaf = ca.leaf(&["db.test", "127.0.0.1"]);
    let (echo_db, echo_other) = (Echo::start().await, Echo::start().await);
    let config = stream_config("      - addr: \"127.0.0.1:0\"\n        tls: true\n")
        .replace("  stream_proxy:", "  ssl:\n    fallback_sni: db.test\n  stream_proxy:");
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "ssls:\n  - snis: [db.test]\n    cert: {}    key: {}stream_routes:\n  - sni: db.test\n    upstream: {{nodes: {}}}\n  - upstream: {{nodes: {}}}\n",
            yaml_block(&leaf.cert, 6),
            yaml_block(&leaf.key, 6),
            nodes_yaml(&[echo_db.addr]),
            nodes_yaml(&[echo_other.addr])
        ),
        1,
    );
    // An IP address as the server name: rustls sends no SNI.
    let sn = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(gw.stream(0)).await.unwrap();
    let mut s = client_tls(&ca).connect(sn, tcp).await.expect("TLS handshake without SNI");
    pings(&mut s).await;
    assert_eq!(*echo_db.connections.lock().unwrap(), 1, "routed by fallback_sni");
    assert_eq!(*echo_other.connections.lock().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_routes_by_sni_with_wildcards() {
    let ca = Ca::new("stream-ca");
    let (db, wild) = (ca.leaf(&["db.test"]), ca.leaf(&["*.cache.test"]));
    let (echo_db, echo_cache, echo_other) = (Echo::start().await, Echo::start().await, Echo::start().await);
    let gw = TestGateway::start_with(
        &stream_config("      - addr: \"127.0.0.1:0\"\n        tls: true\n"),
        &format!(
            "ssls:\n  - snis: [db.test]\n    cert: {}    key: {}  - snis: [\"*.cache.test\"]\n    cert: {}    key: {}stream_routes:
  - sni: db.test
    upstream: {{nodes: {}}}
  - sni: \"*.cache.test\"
    upstream: {{nodes: {}}}
  - upstream: {{nodes: {}}}
",
            yaml_block(&db.cert, 6),
            yaml_block(&db.key, 6),
            yaml_block(&wild.cert, 6),
            yaml_block(&wild.key, 6),
            nodes_yaml(&[echo_db.addr]),
            nodes_yaml(&[echo_cache.addr]),
            nodes_yaml(&[echo_other.addr])
        ),
        2,
    );
    for (name, leaf, echo) in [("db.test", &db, &echo_db), ("a.cache.test", &wild, &echo_cache)] {
        let (mut s, presented) = tls_connect(gw.stream(0), &ca, name, leaf).await;
        assert!(presented, "{name}: wrong certificate");
        pings(&mut s).await;
        assert_eq!(*echo.connections.lock().unwrap(), 1, "{name} routed to its node");
    }
    assert_eq!(*echo_other.connections.lock().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_passthrough_on_a_plain_listener_the_client_sees_the_node_certificate() {
    let ca = Ca::new("passthrough-ca");
    let leaf = ca.leaf(&["secure.test"]);
    let tls_echo = Echo::start_tls(&leaf).await;
    let plain_echo = Echo::start().await;
    let gw = TestGateway::start_with(
        &stream_config(PLAIN),
        &format!(
            "stream_routes:\n  - sni: secure.test\n    upstream: {{nodes: {}}}\n  - upstream: {{nodes: {}}}\n",
            nodes_yaml(&[tls_echo.addr]),
            nodes_yaml(&[plain_echo.addr])
        ),
        2,
    );
    // The TLS session is end to end with the node: its certificate, its echo.
    let (mut s, presented) = tls_connect(gw.stream(0), &ca, "secure.test", &leaf).await;
    assert!(presented, "the client must see the node's own certificate");
    s.write_all(b"over tls").await.unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"over tls");
    // Plain TCP on the same port goes to the route without SNI.
    assert_eq!(round_trip(gw.stream(0), b"plain").await, b"plainbye");
    assert_eq!(*plain_echo.connections.lock().unwrap(), 1);
    assert_eq!(*tls_echo.connections.lock().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_to_a_tls_node() {
    let ca = Ca::new("origination-ca");
    let leaf = ca.leaf(&["node.internal"]);
    let tls_echo = Echo::start_tls(&leaf).await;
    let gw = TestGateway::start_with(
        &stream_config(PLAIN),
        &format!(
            "stream_routes:\n  - upstream:\n      scheme: tls\n      pass_host: rewrite\n      upstream_host: node.internal\n      nodes: {}\n",
            nodes_yaml(&[tls_echo.addr])
        ),
        2,
    );
    assert_eq!(round_trip(gw.stream(0), b"clear to tls").await, b"clear to tlsbye");
    assert_eq!(*tls_echo.connections.lock().unwrap(), 1);
}

/// A node that takes the TCP connection but fails the TLS handshake (here: it answers in plain
/// text and closes) is a failed connect, as in nginx's `proxy_next_upstream`: the session goes
/// on to the next node instead of ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tls_handshake_to_a_node_retries_the_next_node() {
    let ca = Ca::new("origination-ca");
    let leaf = ca.leaf(&["node.internal"]);
    let tls_echo = Echo::start_tls(&leaf).await;
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let not_tls = plain.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let gw = TestGateway::start_with(
        &stream_config(PLAIN),
        &format!(
            "stream_routes:\n  - upstream:\n      scheme: tls\n      pass_host: rewrite\n      upstream_host: node.internal\n      nodes: {}\n",
            nodes_yaml(&[not_tls, tls_echo.addr])
        ),
        2,
    );
    for i in 0..6 {
        assert_eq!(round_trip(gw.stream(0), b"retried").await, b"retriedbye", "session {i}");
    }
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) > 0, "the failing node was tried");
    assert_eq!(*tls_echo.connections.lock().unwrap(), 6);
}

/// A TLS node that sends its greeting and closes without `close_notify` (as many servers do)
/// ends the session as a clean close would: the TLS client gets the greeting and then the
/// gateway's own `close_notify`, not a cut-off session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_node_closing_without_close_notify_ends_the_session_cleanly() {
    let ca = Ca::new("origination-ca");
    let (leaf, edge) = (ca.leaf(&["node.internal"]), ca.leaf(&["db.test"]));
    let node = hand_tls_node(support::certs::tls_acceptor(&leaf), |mut tls| async move {
        if tls.write_all(b"greeting").await.is_ok() && tls.flush().await.is_ok() {
            // Dropped without `shutdown`: FIN with no close_notify before it.
            drop(tls);
        }
    })
    .await;
    let gw = TestGateway::start_with(
        &stream_config("      - addr: \"127.0.0.1:0\"\n        tls: true\n"),
        &format!(
            "ssls:\n  - snis: [db.test]\n    cert: {}    key: {}stream_routes:\n  - upstream:\n      scheme: tls\n      pass_host: rewrite\n      upstream_host: node.internal\n      nodes: {}\n",
            yaml_block(&edge.cert, 6),
            yaml_block(&edge.key, 6),
            nodes_yaml(&[node])
        ),
        1,
    );
    for i in 0..3 {
        let (mut s, _) = tls_connect(gw.stream(0), &ca, "db.test", &edge).await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(matches!(read, Ok(Ok(8))), "session {i}: {read:?} after {:?}", String::from_utf8_lossy(&out));
        assert_eq!(out, b"greeting");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_in_drives_remote_addr_matching_and_out_reaches_the_node() {
    let (trusted, recorder) = (Echo::start().await, ProxyRecorder::start().await);
    let listeners = "      - addr: \"127.0.0.1:0\"\n        proxy_protocol: true\n      - addr: \"127.0.0.1:0\"\n        proxy_protocol_to_upstream: true\n      - addr: \"127.0.0.1:0\"\n        proxy_protocol_to_upstream: true\n        proxy_protocol_version: 2\n";
    let routes = format!(
        "stream_routes:\n  - remote_addr: 192.0.2.0/24\n    upstream: {{nodes: {}}}\n  - remote_addr: 127.0.0.1\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[trusted.addr]),
        nodes_yaml(&[recorder.addr])
    );
    // Without `nginx_config.stream.real_ip_from` (APISIX trusts nobody by default) the header
    // is read and its addresses left alone: the peer, 127.0.0.1, is the client.
    let by_peer = Echo::start().await;
    let peer_routes = format!(
        "stream_routes:\n  - remote_addr: 127.0.0.1\n    upstream: {{nodes: {}}}\n",
        nodes_yaml(&[by_peer.addr])
    );
    let gw = TestGateway::start_with(&stream_config(listeners), &peer_routes, 1);
    let mut msg = format!("PROXY TCP4 192.0.2.7 127.0.0.1 5555 {}\r\n", gw.stream(0).port()).into_bytes();
    msg.extend_from_slice(b"data");
    assert_eq!(round_trip(gw.stream(0), &msg).await, b"databye", "routed by the peer's address");
    assert_eq!(*by_peer.connections.lock().unwrap(), 1);
    drop(gw);
    let trusting =
        stream_config(listeners).replace("  http:\n", "  stream:\n    real_ip_from: [127.0.0.1]\n  http:\n");
    assert!(trusting.contains("real_ip_from"));
    let gw = TestGateway::start_with(&trusting, &routes, 2);
    let pp_port = gw.stream(0).port();
    // v1 header claiming 192.0.2.7: routed by that address.
    let mut msg = format!("PROXY TCP4 192.0.2.7 127.0.0.1 5555 {pp_port}\r\n").into_bytes();
    msg.extend_from_slice(b"data");
    assert_eq!(round_trip(gw.stream(0), &msg).await, b"databye");
    // v2 header.
    let mut v2 = strait_protocols::stream::v2_header("192.0.2.9:4444".parse().unwrap(), gw.stream(0));
    v2.extend_from_slice(b"v2!");
    assert_eq!(round_trip(gw.stream(0), &v2).await, b"v2!bye");
    assert_eq!(*trusted.connections.lock().unwrap(), 2);
    // An address no route accepts: closed without reaching a node.
    let mut other = format!("PROXY TCP4 198.51.100.1 127.0.0.1 5555 {pp_port}\r\n").into_bytes();
    other.extend_from_slice(b"x");
    assert!(closed_without_data(gw.stream(0), &other).await);
    // A listener without proxy_protocol sends one to the node.
    let mut s = TcpStream::connect(gw.stream(1)).await.unwrap();
    let client_port = s.local_addr().unwrap().port();
    s.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hi");
    let lines = recorder.lines.lock().unwrap().clone();
    assert_eq!(lines, [format!("PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {}", gw.stream(1).port())]);
    // `proxy_protocol_version: 2` sends the binary v2 header instead.
    let mut s = TcpStream::connect(gw.stream(2)).await.unwrap();
    let client_port = s.local_addr().unwrap().port();
    s.write_all(b"v2").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"v2");
    let lines = recorder.lines.lock().unwrap().clone();
    assert_eq!(lines[1], format!("PROXYv2 TCP4 127.0.0.1 127.0.0.1 {client_port} {}", gw.stream(2).port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_skipped_by_checks_and_connect_retries() {
    let echo = Echo::start().await;
    let dead = closed_port();
    let gw = TestGateway::start_with(
        &stream_config(PLAIN),
        &format!(
            "upstreams:\n  - id: db\n    retries: 0\n    nodes: {}\n    checks:\n      active:\n        type: tcp\n        healthy: {{interval: 1, successes: 1}}\n        unhealthy: {{interval: 1, tcp_failures: 1}}\nstream_routes:\n  - upstream_id: db\n",
            nodes_yaml(&[dead, echo.addr])
        ),
        2,
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            let j = gw.control_json("/v1/healthcheck/upstreams/db").await;
            j["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["port"] == dead.port() && n["status"] == "unhealthy")
        })
        .await
    );
    // retries: 0, so a pick of the dead node would fail the session.
    for i in 0..10 {
        assert_eq!(round_trip(gw.stream(0), b"x").await, b"xbye", "session {i}");
    }
}

/// A gateway with two plain stream listeners whose resources name the first one's port: made
/// with `resources(1)`, then reloaded with the port the listener got (ephemeral ports are only
/// known once bound).
async fn two_listeners_naming_the_first(resources: impl Fn(u16) -> String) -> TestGateway {
    let gw = TestGateway::start_with(
        &stream_config("      - \"127.0.0.1:0\"\n      - \"127.0.0.1:0\"\n"),
        &resources(1),
        2,
    );
    let v = gw.version();
    gw.write_resources(&resources(gw.stream(0).port()));
    assert!(eventually(Duration::from_secs(3), || async { gw.version() > v }).await);
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_is_per_route_and_off_by_default() {
    let echo = Echo::start().await;
    // The short route is bound to the first listener's port.
    let gw = two_listeners_naming_the_first(|short| {
        format!(
            "stream_routes:\n  - server_port: {short}\n    idle_timeout: 0.3\n    upstream: {{nodes: {n}}}\n  - upstream: {{nodes: {n}}}\n",
            n = nodes_yaml(&[echo.addr])
        )
    })
    .await;
    let mut s = TcpStream::connect(gw.stream(0)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle session was closed");

    // Traffic holds the idle timeout off: a session that keeps exchanging bytes lives for three
    // times its 0.3 s, and is cut only once it goes quiet.
    let mut s = TcpStream::connect(gw.stream(0)).await.unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        s.write_all(b"t").await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut b)).await;
        assert!(matches!(echoed, Ok(Ok(_))), "a busy session was cut after {:?}", start.elapsed());
    }
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the session was not closed once quiet");

    // Without idle_timeout a quiet session stays open.
    let mut s = TcpStream::connect(gw.stream(1)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(800), s.read(&mut b)).await;
    assert!(quiet.is_err(), "a session without idle_timeout must not be cut");
    s.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
}

/// An upstream's `timeout` bounds the quiet of its stream sessions by the larger of `send` and
/// `read`, as APISIX's `set_timeouts` sets nginx's `proxy_timeout`; a route's `idle_timeout`
/// (Strait's) takes precedence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_ends_quiet_stream_sessions_after_max_of_send_and_read() {
    let echo = Echo::start().await;
    let gw = two_listeners_naming_the_first(|first| {
        format!(
            "upstreams:\n  - id: db\n    timeout: {{connect: 1, send: 0.2, read: 0.5}}\n    nodes: {n}\nstream_routes:\n  - server_port: {first}\n    upstream_id: db\n  - idle_timeout: 30\n    upstream_id: db\n",
            n = nodes_yaml(&[echo.addr])
        )
    })
    .await;
    let mut b = [0u8; 1];
    let mut s = TcpStream::connect(gw.stream(0)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    let quiet_since = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the quiet session was not closed");
    assert!(quiet_since.elapsed() >= Duration::from_millis(450), "cut by send (0.2 s), not read (0.5 s)");
    // The route's idle_timeout wins: still open after the upstream's 0.5 s.
    let mut s = TcpStream::connect(gw.stream(1)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(1000), s.read(&mut b)).await;
    assert!(quiet.is_err(), "the route's idle_timeout must take precedence");
}

/// Whether the kernel runs a keepalive timer on the TCP socket `local` -> `remote` (of any
/// process: the gateway runs in this one), from /proc/net/tcp; `None` if there is no such
/// socket.
fn keepalive_timer(local: SocketAddr, remote: SocketAddr) -> Option<bool> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!("{:08X}:{:04X}", u32::from_le_bytes(a.ip().octets()), a.port()),
        SocketAddr::V6(_) => String::new(),
    };
    let (l, r) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 5 && f[1] == l && f[2] == r).then(|| f[5].starts_with("02:"))
    })
}

/// A quiet session without `idle_timeout` is kept, and both of its sockets have TCP keepalive
/// on, so a peer that vanished without a reset ends the session within minutes instead of
/// holding two sockets and a node connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_tcp_keepalive_on_both_sides() {
    let echo = Echo::start().await;
    let gw = TestGateway::start_with(
        &stream_config("      - \"127.0.0.1:0\"\n"),
        &format!("stream_routes:\n  - upstream: {{nodes: {}}}\n", nodes_yaml(&[echo.addr])),
        1,
    );
    let mut s = TcpStream::connect(gw.stream(0)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    // The gateway's side of the client's connection. (A moment after a write the kernel may
    // still run its retransmission timer instead: looked at until the keepalive one shows.)
    let client = s.local_addr().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { keepalive_timer(gw.stream(0), client) == Some(true) })
            .await,
        "client side: {:?}",
        keepalive_timer(gw.stream(0), client)
    );
    // The gateway's connection to the node: the echo's only peer.
    let node_port = format!(":{:04X}", echo.addr.port());
    let to_node = || -> Vec<String> {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .filter(|l| l.split_whitespace().nth(2).is_some_and(|r| r.ends_with(&node_port)))
            // Established ones only: an earlier test's connection to a server that had this
            // port may linger in TIME_WAIT.
            .filter(|l| l.split_whitespace().nth(3) == Some("01"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(to_node().len(), 1, "{:?}", to_node());
    let keepalive = || to_node()[0].split_whitespace().nth(5).is_some_and(|t| t.starts_with("02:"));
    assert!(eventually(Duration::from_secs(5), || async { keepalive() }).await, "node side: {:?}", to_node());
}

/// A server that speaks first, as MySQL and SMTP do: a banner on accept, then an echo.
async fn banner_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    banner_server_with(b"220 ready\r\n").await
}

async fn banner_server_with(banner: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(banner).await;
                let mut b = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut b).await {
                    if s.write_all(&b[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Connects and waits for the banner, well within the 30 s header timeout configured below.
async fn banner_arrives(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 11];
    matches!(tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await, Ok(Ok(_)) if &b == b"220 ready\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_protocols_are_not_held_for_a_client_hello() {
    let ca = Ca::new("banner-ca");
    let leaf = ca.leaf(&["secure.test"]);
    let tls_echo = Echo::start_tls(&leaf).await;
    let (banner, _task) = banner_server().await;
    let gw = TestGateway::start_with(
        &stream_config("      - \"127.0.0.1:0\"\n      - \"127.0.0.2:0\"\n")
            .replace("client_header_timeout: 2s", "client_header_timeout: 30s"),
        &format!(
            "stream_routes:\n  - sni: secure.test\n    server_addr: 127.0.0.1\n    upstream: {{nodes: {}}}\n  - upstream: {{nodes: {}}}\n",
            nodes_yaml(&[tls_echo.addr]),
            nodes_yaml(&[banner])
        ),
        2,
    );
    // No SNI route covers 127.0.0.2: nothing to wait for.
    assert!(banner_arrives(gw.stream(1)).await, "the banner must not wait for a ClientHello");
    // On 127.0.0.1 an SNI route could apply: a silent client goes to the plain route after a
    // short wait, not after the header timeout...
    assert!(banner_arrives(gw.stream(0)).await, "a silent client must reach the plain route");
    // ...and TLS clients there still reach the SNI route's node.
    let (_s, presented) = tls_connect(gw.stream(0), &ca, "secure.test", &leaf).await;
    assert!(presented, "passthrough by SNI on the shared port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chash_on_remote_addr_keeps_each_client_address_on_one_node() {
    let mut nodes = Vec::new();
    let mut tasks = Vec::new();
    for banner in [b"node-a\n", b"node-b\n", b"node-c\n"] {
        let (addr, task) = banner_server_with(banner).await;
        nodes.push(addr);
        tasks.push(task);
    }
    let gw = TestGateway::start_with(
        &stream_config(PLAIN),
        &format!(
            "stream_routes:\n  - upstream: {{type: chash, hash_on: vars, key: remote_addr, nodes: {}}}\n",
            nodes_yaml(&nodes)
        ),
        2,
    );
    // Clients from 24 loopback addresses, three connections each.
    let mut seen = std::collections::HashSet::new();
    for i in 10..34u8 {
        let source: SocketAddr = format!("127.0.0.{i}:0").parse().unwrap();
        let mut names = std::collections::HashSet::new();
        for _ in 0..3 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(source).unwrap();
            let mut s = sock.connect(gw.stream(0)).await.unwrap();
            let mut b = [0u8; 7];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await.unwrap().unwrap();
            names.insert(b);
        }
        assert_eq!(names.len(), 1, "client 127.0.0.{i} must stay on one node");
        seen.extend(names);
    }
    assert!(seen.len() >= 2, "24 client addresses must spread over the nodes, got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_verifies_the_node_certificate_when_asked() {
    let ca = Ca::new("origination-verify-ca");
    let leaf = ca.leaf(&["node.internal"]);
    let tls_echo = Echo::start_tls(&leaf).await;
    let (_dir, config) =
        support::certs::trusting(&stream_config("      - \"127.0.0.1:0\"\n      - \"127.0.0.2:0\"\n"), &ca);
    let route = |server: &str, name: &str| {
        format!(
            "  - server_addr: {server}\n    upstream:\n      scheme: tls\n      tls: {{verify: true}}\n      pass_host: rewrite\n      upstream_host: {name}\n      nodes: {}\n",
            nodes_yaml(&[tls_echo.addr])
        )
    };
    let gw = TestGateway::start_with(
        &config,
        &format!(
            "stream_routes:\n{}{}",
            route("127.0.0.1", "node.internal"),
            route("127.0.0.2", "wrong.internal")
        ),
        2,
    );
    // The name the certificate carries, signed by the trusted CA: relayed.
    assert_eq!(round_trip(gw.stream(0), b"verified").await, b"verifiedbye");
    // Any other name fails verification: the client is closed without data.
    assert!(closed_without_data(gw.stream(1), b"x").await, "a certificate for another name is refused");
}

/// A ClientHello whose SNI is not ASCII, on a listener with a wildcard SNI route: the name
/// matches no SNI route (the session goes to the route without one), and the gateway does not
/// fall over. A suffix cut inside its first character once panicked, and a release build
/// aborts on a panic: one packet took the whole gateway down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_with_a_name_that_is_not_ascii_is_no_name() {
    use std::sync::atomic::Ordering;
    let panics = count_panics();
    let (sni_echo, other_echo) = (Echo::start().await, Echo::start().await);
    let gw = TestGateway::start_with(
        &stream_config("      - \"127.0.0.1:0\"\n"),
        &format!(
            "stream_routes:\n  - sni: \"*.example.com\"\n    upstream: {{nodes: {}}}\n  - upstream: {{nodes: {}}}\n",
            nodes_yaml(&[sni_echo.addr]),
            nodes_yaml(&[other_echo.addr])
        ),
        1,
    );
    // "zz" + "example.com", then "zz" made the two bytes of U+00E9: 13 bytes, and the wildcard's
    // 12-byte suffix would start inside the first character.
    let mut hello = support::certs::client_hello("zzexample.com");
    let at = hello.windows(13).position(|w| w == b"zzexample.com").unwrap();
    hello[at..at + 2].copy_from_slice("\u{e9}".as_bytes());
    let mut s = tokio::net::TcpStream::connect(gw.stream(0)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert!(back.ends_with(b"bye"), "relayed");
    assert_eq!((*sni_echo.connections.lock().unwrap(), *other_echo.connections.lock().unwrap()), (0, 1));
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic (see above)");
    assert_eq!(round_trip(gw.stream(0), b"after").await, b"afterbye");
}

/// Mangled ClientHellos on a listener that routes by SNI without terminating TLS, and mangled
/// PROXY protocol headers (v1 and v2) on one that expects them: each connection is relayed or
/// closed, ends once the client stops sending, and nothing panics (a release build aborts on a
/// panic). `STRAIT_MANGLE_ROUNDS` runs more than CI's 300 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_client_hellos_and_proxy_headers_end_each_session_and_never_panic() {
    use std::sync::atomic::Ordering;
    let panics = count_panics();
    let (sni_echo, other_echo) = (Echo::start().await, Echo::start().await);
    let gw = TestGateway::start_with(
        // A short wait for a ClientHello that never completes (a mangled one often does not).
        &stream_config(
            "      - \"127.0.0.1:0\"\n      - addr: \"127.0.0.1:0\"\n        proxy_protocol: true\n",
        )
        .replace("client_header_timeout: 2s", "client_header_timeout: 300ms"),
        &format!(
            "stream_routes:\n  - sni: db.test\n    upstream: {{nodes: {}}}\n  - sni: \"*.test\"\n    upstream: {{nodes: {}}}\n  - upstream: {{nodes: {}}}\n",
            nodes_yaml(&[sni_echo.addr]),
            nodes_yaml(&[sni_echo.addr]),
            nodes_yaml(&[other_echo.addr])
        ),
        1,
    );
    let hello = support::certs::client_hello("db.test");
    let (src, dst): (SocketAddr, SocketAddr) = ("192.0.2.7:5555".parse().unwrap(), gw.stream(1));
    let mut v1 = strait_protocols::stream::v1_header(src, dst);
    v1.extend_from_slice(b"ping");
    let mut v2 = strait_protocols::stream::v2_header(src, dst);
    v2.extend_from_slice(b"ping");
    let mut rng = Rng(0x5eed_5733_0000_0001);
    let sessions = (0..mangle_rounds(300))
        .map(|_| {
            let (listener, seed) = match rng.below(3) {
                0 => (0, &hello),
                1 => (1, &v1),
                _ => (1, &v2),
            };
            (gw.stream(listener), mangle(&mut rng, seed))
        })
        .collect();
    // The client half-closes: whatever the gateway makes of the bytes, the session must end.
    each_session_ends(sessions, true, Duration::from_secs(15)).await;
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic (see above)");
    // A clean session afterwards, on each listener.
    assert_eq!(round_trip(gw.stream(0), b"plain").await, b"plainbye");
    assert_eq!(round_trip(gw.stream(1), &v1).await, b"pingbye");
}
