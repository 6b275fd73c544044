//! Real servers for the tests, started on free loopback ports and stopped on drop: TCP echo
//! servers (plain and TLS), a PROXY-protocol recorder, and `redis-server`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::certs::Leaf;

/// Whether binary `name` can be used; in CI (`CI=true`) a missing binary fails the test.
pub fn require_bin(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{name} is not installed (run scripts/install-test-deps.sh)");
        }
        eprintln!("skipping: {name} is not installed");
    }
    found
}

/// A TCP echo server: echoes what it reads; on EOF from the client it writes `bye` and closes
/// its side (so half-close can be observed). Counts connections.
pub struct Echo {
    pub addr: SocketAddr,
    pub connections: Arc<Mutex<usize>>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
        Self::start_inner(None).await
    }

    /// The same over TLS with `leaf`.
    pub async fn start_tls(leaf: &Leaf) -> Echo {
        Self::start_inner(Some(super::certs::tls_acceptor(leaf))).await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>) -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                *c.lock().unwrap() += 1;
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(a) => {
                            if let Ok(t) = a.accept(s).await {
                                echo(t).await;
                            }
                        }
                        None => echo(s).await,
                    }
                });
            }
        });
        Echo { addr, connections, task }
    }
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => {
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records the first line each connection sends (a PROXY protocol header), then echoes.
pub struct ProxyRecorder {
    pub addr: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl ProxyRecorder {
    pub async fn start() -> ProxyRecorder {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let ls = lines.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let ls = ls.clone();
                tokio::spawn(async move {
                    let Some(line) = read_proxy_line(&mut s).await else { return };
                    ls.lock().unwrap().push(line);
                    echo(s).await;
                });
            }
        });
        ProxyRecorder { addr, lines, task }
    }
}

/// Reads a PROXY header as the HAProxy specification (doc/proxy-protocol.txt) lays it out: a
/// v1 text line comes back as is; a v2 TCP over IPv4 header as
/// `PROXYv2 TCP4 <src> <dst> <sport> <dport>`.
async fn read_proxy_line(s: &mut TcpStream) -> Option<String> {
    const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.ok()?;
    if first[0] == b'\r' {
        let mut head = [0u8; 16];
        head[0] = first[0];
        s.read_exact(&mut head[1..]).await.ok()?;
        if &head[..12] != V2_SIG {
            return Some("bad v2 signature".into());
        }
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        if head[12] != 0x21 || head[13] != 0x11 || len < 12 {
            return Some(format!("v2 ver_cmd {:#x} family {:#x} len {len}", head[12], head[13]));
        }
        let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        return Some(format!(
            "PROXYv2 TCP4 {} {} {} {}",
            ip(&body[0..4]),
            ip(&body[4..8]),
            port(&body[8..10]),
            port(&body[10..12])
        ));
    }
    let mut line = first.to_vec();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 200 {
        s.read_exact(&mut b).await.ok()?;
        line.push(b[0]);
    }
    Some(String::from_utf8_lossy(&line).trim_end().to_string())
}

impl Drop for ProxyRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A real `redis-server` on a free port, without persistence.
pub struct Redis {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Option<Redis> {
        if !require_bin("redis-server") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let ready = super::eventually(Duration::from_secs(10), || async {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(mut s) => {
                    let _ = s.write_all(b"PING\r\n").await;
                    let mut b = [0u8; 7];
                    matches!(
                        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut b)).await,
                        Ok(Ok(_))
                    ) && &b == b"+PONG\r\n"
                }
                Err(_) => false,
            }
        })
        .await;
        assert!(ready, "redis-server did not start");
        Some(Redis { addr, child, _dir: dir })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real authoritative DNS server (bind9's `named`) for zone `svc.test` on a free loopback
/// port, changed at run time with `nsupdate`.
pub struct Bind {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Bind {
    /// Starts `named` with `records` (zone-file lines after the SOA/NS, e.g. `web 2 IN A 127.0.0.11`).
    pub async fn start(records: &str) -> Option<Bind> {
        if !require_bin("named") || !require_bin("nsupdate") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("named.conf"),
            format!(
                "options {{ directory \"{d}\"; pid-file \"{d}/named.pid\"; session-keyfile \"{d}/session.key\";
  listen-on port {port} {{ 127.0.0.1; }}; listen-on-v6 {{ none; }};
  recursion no; dnssec-validation no; notify no; }};
zone \"svc.test\" {{ type primary; file \"svc.test.zone\"; allow-update {{ 127.0.0.1; }}; }};
"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("svc.test.zone"),
            format!(
                "$TTL 5\n@ IN SOA ns.svc.test. admin.svc.test. ( 1 60 60 3600 5 )\n  IN NS ns.svc.test.\nns IN A 127.0.0.1\n{records}\n"
            ),
        )
        .unwrap();
        let mut b = Bind { addr: format!("127.0.0.1:{port}").parse().unwrap(), child: None, dir };
        b.spawn();
        let addr = b.addr;
        let ready =
            super::eventually(
                Duration::from_secs(10),
                || async move { dns_answers(addr, "ns.svc.test").await },
            )
            .await;
        assert!(ready, "named did not start");
        Some(b)
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cmd = Command::new("named");
        cmd.arg("-g").arg("-c").arg(d.join("named.conf"));
        // named drops privileges when started as root; the directory must stay writable.
        if unsafe_is_root() {
            let _ = Command::new("chown").arg("-R").arg("nobody").arg(d).status();
            cmd.args(["-u", "nobody"]);
        }
        let log = std::fs::File::create(d.join("named.log")).unwrap();
        self.child = Some(cmd.stdout(Stdio::null()).stderr(log).spawn().expect("named"));
    }

    /// Applies `nsupdate` commands (`update delete ...`, `update add ...`) to zone svc.test.
    pub fn update(&self, commands: &str) {
        let script = format!("server 127.0.0.1 {}\nzone svc.test\n{commands}\nsend\n", self.addr.port());
        let mut child = Command::new("nsupdate").stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nsupdate failed");
    }

    /// Stops the server (an outage); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether `name` gets an answer from the DNS server at `addr` (via dig).
pub async fn dns_answers(addr: SocketAddr, name: &str) -> bool {
    let out = tokio::process::Command::new("dig")
        .args([
            &format!("@{}", addr.ip()),
            "-p",
            &addr.port().to_string(),
            "+short",
            "+time=1",
            "+tries=1",
            name,
            "A",
        ])
        .output()
        .await;
    matches!(out, Ok(o) if o.status.success() && !o.stdout.is_empty())
}

impl Drop for Bind {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real Nacos-compatible server (`rnacos`): HTTP on a free port, gRPC on HTTP + 1000.
pub struct Nacos {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
    probe_secs: u32,
    grpc_offset: u16,
    /// rnacos' open API auth (user `admin`, password `admin`).
    auth: bool,
}

impl Nacos {
    /// A server that requires a login (`admin` / `admin`) on its open API and gRPC API.
    pub async fn start_with_auth() -> Option<Nacos> {
        Self::start_fresh(0, 1000, true).await
    }

    /// Reserves ports and starts the server; when it does not come up (another test's server
    /// took one of the ports after they were checked, or a slow start), once more on new ports.
    async fn start_fresh(probe_secs: u32, grpc_offset: u16, auth: bool) -> Option<Nacos> {
        let mut log = String::new();
        for _ in 0..3 {
            let mut n = Self::reserve(probe_secs, grpc_offset)?;
            n.auth = auth;
            if n.try_launch(Duration::from_secs(20)).await {
                return Some(n);
            }
            n.stop();
            log = std::fs::read_to_string(n.dir.path().join("rnacos.log")).unwrap_or_default();
        }
        panic!("rnacos did not start in 3 tries; its last log:\n{log}");
    }

    /// `&accessToken=...` for a server with auth, empty otherwise.
    async fn token_param(&self) -> String {
        if !self.auth {
            return String::new();
        }
        let out = nacos_http(self.addr, "POST", "/nacos/v1/auth/login?username=admin&password=admin")
            .await
            .expect("login");
        let v: serde_json::Value = serde_json::from_str(&out).expect("login answer");
        format!("&accessToken={}", v["accessToken"].as_str().expect("accessToken"))
    }

    pub async fn start() -> Option<Nacos> {
        Self::start_probing(0).await
    }

    /// With `probe_secs` > 0, rnacos TCP-probes persistent instances and marks those nobody
    /// listens for unhealthy.
    pub async fn start_probing(probe_secs: u32) -> Option<Nacos> {
        Self::start_with(probe_secs, 1000).await
    }

    /// `grpc_offset` other than 1000 hides the gRPC API from clients (like a Nacos 1.x server).
    pub async fn start_with(probe_secs: u32, grpc_offset: u16) -> Option<Nacos> {
        Self::start_fresh(probe_secs, grpc_offset, false).await
    }

    /// Free ports for a server that is not started yet ([`Nacos::launch`] starts it).
    pub fn reserve(probe_secs: u32, grpc_offset: u16) -> Option<Nacos> {
        if !require_bin("rnacos") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // HTTP, gRPC (+1000) and console (+2000) must all be free.
        let port = loop {
            let p = super::free_port();
            if p < 60000
                && std::net::TcpListener::bind(("127.0.0.1", p + 1000)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + grpc_offset)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 2000)).is_ok()
            {
                break p;
            }
        };
        Some(Nacos {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            child: None,
            dir,
            probe_secs,
            grpc_offset,
            auth: false,
        })
    }

    /// Starts the server and waits until it answers.
    pub async fn launch(&mut self) {
        assert!(self.try_launch(Duration::from_secs(20)).await, "rnacos did not start");
    }

    /// Starts the server and waits until it answers, gives up, or the process exits.
    async fn try_launch(&mut self, within: Duration) -> bool {
        self.spawn();
        let addr = self.addr;
        let deadline = tokio::time::Instant::now() + within;
        // The login endpoint answers with or without auth (with auth, once rnacos has created
        // its admin user).
        while tokio::time::Instant::now() < deadline {
            if nacos_http(addr, "POST", "/nacos/v1/auth/login?username=admin&password=admin").await.is_some()
            {
                return true;
            }
            if self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn spawn(&mut self) {
        let p = self.addr.port();
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("rnacos.log")).unwrap();
        let child = Command::new("rnacos")
            .current_dir(d)
            .env("RNACOS_HTTP_PORT", p.to_string())
            .env("RNACOS_GRPC_PORT", (p + self.grpc_offset).to_string())
            .env("RNACOS_HTTP_CONSOLE_PORT", (p + 2000).to_string())
            .env("RNACOS_SDK_HOST", "127.0.0.1")
            .env("RNACOS_CONSOLE_HOST", "127.0.0.1")
            .env("RNACOS_DATA_DIR", d.join("data"))
            .env("RNACOS_HTTP_WORKERS", "1")
            .env("RUST_LOG", "warn")
            .env("RNACOS_NAMING_PERPETUAL_INSTANCE_PROBE_INTERVAL_SECOND", self.probe_secs.to_string())
            .env("RNACOS_ENABLE_OPEN_API_AUTH", self.auth.to_string())
            // The readiness probe logs in every 20 ms; the default limit (100 a minute) would lock
            // the admin user out on a slow start.
            .env("RNACOS_API_LOGIN_ONE_MINUTE_LIMIT", "1000000")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("rnacos");
        self.child = Some(child);
    }

    /// Registers (or updates) a persistent instance through the v1 open API.
    pub async fn register(
        &self,
        service: &str,
        group: &str,
        namespace: &str,
        node: SocketAddr,
        weight: f64,
        extra: &str,
    ) {
        let path = format!(
            "/nacos/v1/ns/instance?serviceName={service}&groupName={group}&namespaceId={namespace}&ip={}&port={}&weight={weight}&ephemeral=false{extra}{}",
            node.ip(),
            node.port(),
            self.token_param().await
        );
        let out = nacos_http(self.addr, "POST", &path).await;
        assert_eq!(out.as_deref(), Some("ok"), "register {path}");
    }

    pub async fn deregister(&self, service: &str, group: &str, namespace: &str, node: SocketAddr) {
        let path = format!(
            "/nacos/v1/ns/instance?serviceName={service}&groupName={group}&namespaceId={namespace}&ip={}&port={}&ephemeral=false{}",
            node.ip(),
            node.port(),
            self.token_param().await
        );
        assert_eq!(nacos_http(self.addr, "DELETE", &path).await.as_deref(), Some("ok"));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nacos {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request to rnacos; the body when the status is 200.
pub async fn nacos_http(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut s, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), s.send_request(req)).await.ok()?.ok()?;
    let ok = resp.status().is_success();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    ok.then(|| String::from_utf8_lossy(&body).into_owned())
}
