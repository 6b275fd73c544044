//! A small HTTP/1.1 client for registry APIs (Nacos, Consul, Eureka, Kubernetes): one request
//! per connection, connect and read timeouts, optional TLS, and streamed bodies for watches.
//! A complete answer is read up to `MAX_BODY`: a registry that sends more (a broken or hostile
//! one, at loopback speed gigabytes within the read timeout) gets an error, not all the memory.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::DiscoveryError;

/// `scheme://host:port` of a registry server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Url {
    /// Parses `http(s)://host[:port][/]`.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (scheme, rest) = s.split_once("://").ok_or("expected http(s)://host[:port]")?;
        let tls = match scheme {
            "http" => false,
            "https" => true,
            _ => return Err(format!("unsupported scheme {scheme:?}")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err("expected http(s)://host[:port] without a path".into());
        }
        let default = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("invalid port {p:?}"))?,
                None => default,
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("invalid port {p:?}"))?),
                None => (rest.to_string(), default),
            }
        };
        if host.is_empty() {
            return Err("empty host".into());
        }
        Ok(Url { tls, host, port })
    }

    /// `host:port` (IPv6 bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Largest complete answer read: a registry listing 100,000 instances sends about 15 MB.
pub const MAX_BODY: usize = 128 << 20;

/// A complete response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The client.
#[derive(Clone)]
pub struct HttpClient {
    connect_timeout: Duration,
    read_timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
    max_body: usize,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").field("connect_timeout", &self.connect_timeout).finish()
    }
}

impl HttpClient {
    /// A client that does not verify registry certificates (APISIX's default for registries).
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Result<Self, DiscoveryError> {
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| DiscoveryError::Config(format!("TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify))
                .with_no_client_auth();
        Ok(HttpClient { connect_timeout, read_timeout, tls: Arc::new(tls), max_body: MAX_BODY })
    }

    /// Sends a request and returns the response head with a streaming body. `read` bounds the
    /// wait for the head.
    pub async fn send(
        &self,
        url: &Url,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        read: Duration,
    ) -> Result<http::Response<Incoming>, DiscoveryError> {
        let unavailable = |e: String| DiscoveryError::Unavailable(format!("{}: {e}", url.authority()));
        let addr = resolve(url).await.map_err(unavailable)?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| unavailable("connect timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        // Watches and blocking queries hold a connection for minutes: a peer that vanished
        // without a reset is noticed within about a minute, not at the next timeout.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let mut req = req.body(Full::new(body)).map_err(|e| DiscoveryError::Config(e.to_string()))?;
        req.headers_mut().insert(
            header::HOST,
            HeaderValue::from_str(&url.authority()).map_err(|e| unavailable(e.to_string()))?,
        );
        let send = async {
            if url.tls {
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|e| unavailable(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                tokio::spawn(conn);
                s.send_request(req).await.map_err(|e| unavailable(e.to_string()))
            } else {
                let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                tokio::spawn(conn);
                s.send_request(req).await.map_err(|e| unavailable(e.to_string()))
            }
        };
        tokio::time::timeout(read, send).await.map_err(|_| unavailable("timed out".into()))?
    }

    /// A complete request with the client's read timeout.
    pub async fn request(
        &self,
        url: &Url,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        read: Option<Duration>,
    ) -> Result<HttpResponse, DiscoveryError> {
        let read = read.unwrap_or(self.read_timeout);
        let resp = self.send(url, method, path, headers, body, read).await?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(read, http_body_util::Limited::new(body, self.max_body).collect())
            .await
            .map_err(|_| {
                DiscoveryError::Unavailable(format!("{}: reading the body timed out", url.authority()))
            })?
            .map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => DiscoveryError::Invalid(format!(
                    "{}: answer larger than {} MiB",
                    url.authority(),
                    self.max_body >> 20
                )),
                None => DiscoveryError::Unavailable(format!("{}: {e}", url.authority())),
            })?
            .to_bytes();
        Ok(HttpResponse { status: parts.status.as_u16(), headers: parts.headers, body })
    }

    pub async fn get(&self, url: &Url, path: &str) -> Result<HttpResponse, DiscoveryError> {
        self.request(url, Method::GET, path, &[("accept", "application/json".into())], Bytes::new(), None)
            .await
    }

    pub async fn post_form(
        &self,
        url: &Url,
        path: &str,
        body: String,
    ) -> Result<HttpResponse, DiscoveryError> {
        self.request(
            url,
            Method::POST,
            path,
            &[("content-type", "application/x-www-form-urlencoded".into())],
            Bytes::from(body),
            None,
        )
        .await
    }

    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }
}

async fn resolve(url: &Url) -> Result<SocketAddr, String> {
    if let Ok(ip) = url.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, url.port));
    }
    tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{} does not resolve", url.host))
}

#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
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
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz;

    #[tokio::test]
    async fn an_answer_past_the_limit_is_an_error_not_memory() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            // Two requests: one answer within the limit, then one without end.
            for endless in [false, true] {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                if !endless {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2048\r\n\r\n").await;
                    let _ = conn.write_all(&[b'a'; 2048]).await;
                    continue;
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                let chunk = [b"10000\r\n".as_slice(), &[b'a'; 0x10000], b"\r\n"].concat();
                while conn.write_all(&chunk).await.is_ok() {}
            }
        });
        let mut client = HttpClient::new(Duration::from_secs(1), Duration::from_secs(10)).unwrap();
        client.max_body = 1 << 20;
        assert_eq!(client.get(&url, "/").await.unwrap().body.len(), 2048);
        let err = client.get(&url, "/").await.unwrap_err();
        assert!(matches!(&err, DiscoveryError::Invalid(m) if m.contains("larger than 1 MiB")), "{err}");
    }

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8500").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 8500));
        let u = Url::parse("https://consul.local/").unwrap();
        assert_eq!((u.tls, u.port), (true, 443));
        let u = Url::parse("http://[::1]:80").unwrap();
        assert_eq!(u.authority(), "[::1]:80");
        assert!(Url::parse("consul:8500").is_err());
        assert!(Url::parse("http://h:1/v1").is_err());
    }

    /// Whatever is configured as a registry address, parsing it never panics, and an address
    /// that parses prints (`authority`) as one that parses back to the same.
    #[test]
    fn any_address_parses_and_prints_back() {
        const PARTS: &[&str] = &[
            "http://",
            "https://",
            "ftp://",
            "://",
            "[",
            "]",
            ":",
            "::1",
            "fe80::1%eth0",
            "/",
            "//",
            "127.0.0.1",
            "consul.local",
            "80",
            "65535",
            "65536",
            "99999999999",
            "-1",
            "@",
            "user:pass@",
            "é",
            " ",
            "%2F",
        ];
        let make = |seed| {
            let mut rng = fuzz::Rng::new(seed);
            let scheme = if rng.below(4) == 0 { "" } else { *rng.pick(&["http://", "https://"]) };
            let rest: String = (0..rng.below(6)).map(|_| *rng.pick(PARTS)).collect();
            format!("{scheme}{rest}")
        };
        fuzz::each_case(2_000, make, |_, s| {
            let _ = crate::nacos::NacosHost::parse(s);
            let Ok(u) = Url::parse(s) else { return };
            assert!(!u.host.is_empty());
            assert_eq!(u.tls, s.starts_with("https://"));
            // Not checked for a host with a bracket left in it ("http://65535]::1" parses as
            // host "65535]:", port 1, which prints as an address that does not parse): `parse`
            // does not vet hosts; whether it should is open.
            if !u.host.contains(['[', ']']) {
                let scheme = if u.tls { "https" } else { "http" };
                assert_eq!(Url::parse(&format!("{scheme}://{}", u.authority())), Ok(u));
            }
        });
    }
}
