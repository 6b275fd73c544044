//! One active probe: `tcp` (connect), `http`/`https` (status line of a request), and `grpc`
//! (grpc.health.v1 `Health/Check`, h2c or h2 over TLS). Intervals, thresholds and jitter live
//! in the engine, not here.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use strait_protocols::tls::{ClientTls, ClientTlsOptions};
use strait_protocols::{Scheme, UpstreamSettings, grpc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::probe_host;
use super::state::Event;
use crate::config::resources::{ActiveCheck, ProbeType};
use crate::upstream::node::Node;

/// Where and how to probe one node.
pub struct ProbeTarget {
    addr: SocketAddr,
    host: String,
    sni: String,
    tls: Option<Arc<ClientConfig>>,
}

/// What one probe found.
pub struct ProbeResult {
    /// `None` when the answer counts neither way (an HTTP status in neither list).
    pub event: Option<Event>,
    pub detail: String,
}

impl ProbeTarget {
    /// `tls` is the upstream's probe TLS configuration ([`probe_tls`]), if its probes use TLS.
    pub fn new(
        node: &Node,
        check: &ActiveCheck,
        settings: &UpstreamSettings,
        tls: Option<Arc<ClientConfig>>,
    ) -> Self {
        let addr = SocketAddr::new(node.addr.ip(), check.port.unwrap_or(node.addr.port()));
        let host = probe_host(node, check, settings);
        let sni = host
            .strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .map(str::to_string)
            .unwrap_or_else(|| host.rsplit_once(':').map_or(host.clone(), |(h, _)| h.to_string()));
        ProbeTarget { addr, host, sni, tls }
    }
}

/// The TLS client configuration the probes of an upstream share, when they use TLS (`https`
/// probes, and `grpc` probes of `grpcs`/`https` upstreams): built once per upstream, not per
/// node. The upstream's mTLS client certificate is presented too.
pub fn probe_tls(
    check: &ActiveCheck,
    scheme: Scheme,
    roots: &Arc<rustls::RootCertStore>,
    client_cert: Option<(String, String)>,
) -> Option<Arc<ClientConfig>> {
    let use_tls = match check.kind {
        ProbeType::Https => true,
        ProbeType::Grpc => matches!(scheme, Scheme::Grpcs | Scheme::Https),
        _ => false,
    };
    if !use_tls {
        return None;
    }
    let tls = ClientTls::new(ClientTlsOptions {
        verify: check.https_verify_certificate,
        roots: roots.clone(),
        client_cert,
    })
    .ok()?;
    Some(if check.kind == ProbeType::Grpc { tls.h2 } else { tls.raw })
}

fn result(event: Option<Event>, detail: impl Into<String>) -> ProbeResult {
    ProbeResult { event, detail: detail.into() }
}

/// Runs one probe within the check's timeout.
pub async fn run_probe(t: &ProbeTarget, c: &ActiveCheck) -> ProbeResult {
    match timeout(c.timeout, probe(t, c)).await {
        Ok(r) => r,
        Err(_) => result(Some(Event::Timeout), format!("timed out after {:?}", c.timeout)),
    }
}

async fn probe(t: &ProbeTarget, c: &ActiveCheck) -> ProbeResult {
    let tcp = match TcpStream::connect(t.addr).await {
        Ok(s) => s,
        Err(e) => return result(Some(Event::TcpFailure), format!("connect: {e}")),
    };
    let _ = tcp.set_nodelay(true);
    match c.kind {
        ProbeType::Tcp => result(Some(Event::Success), "connected"),
        ProbeType::Http | ProbeType::Https => match &t.tls {
            Some(cfg) => match tls(tcp, cfg.clone(), &t.sni).await {
                Ok(s) => http_probe(s, t, c).await,
                Err(e) => result(Some(Event::TcpFailure), format!("TLS: {e}")),
            },
            None => http_probe(tcp, t, c).await,
        },
        ProbeType::Grpc => match &t.tls {
            Some(cfg) => match tls(tcp, cfg.clone(), &t.sni).await {
                Ok(s) => grpc_probe(s, t, c).await,
                Err(e) => result(Some(Event::TcpFailure), format!("TLS: {e}")),
            },
            None => grpc_probe(tcp, t, c).await,
        },
    }
}

async fn tls(
    tcp: TcpStream,
    cfg: Arc<ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = strait_protocols::tls::server_name(sni)
        .ok_or_else(|| std::io::Error::other(format!("invalid server name {sni:?}")))?;
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
}

/// Classifies an HTTP status per the check's lists.
pub fn classify_status(status: u16, c: &ActiveCheck) -> Option<Event> {
    if c.healthy_statuses.contains(&status) {
        Some(Event::Success)
    } else if c.unhealthy_statuses.contains(&status) {
        Some(Event::HttpFailure)
    } else {
        None
    }
}

async fn http_probe<S>(mut s: S, t: &ProbeTarget, c: &ActiveCheck) -> ProbeResult
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req =
        format!("{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", c.http_method, c.http_path, t.host);
    // A User-Agent in `req_headers` replaces ours, so the node sees exactly one.
    if !c.req_headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("user-agent")) {
        req.push_str("User-Agent: strait-healthcheck\r\n");
    }
    for (k, v) in &c.req_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !c.http_req_body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", c.http_req_body.len()));
    }
    req.push_str("\r\n");
    req.push_str(&c.http_req_body);
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return result(Some(Event::TcpFailure), format!("send: {e}"));
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return result(Some(Event::TcpFailure), format!("receive: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    let status = line.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(code) => result(classify_status(code, c), format!("HTTP {code}")),
        None => result(Some(Event::HttpFailure), format!("bad status line {line:?}")),
    }
}

/// `grpc.health.v1.HealthCheckRequest { service }` framed for the wire.
pub fn health_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        msg.push(0x0a);
        let mut len = service.len();
        while len >= 0x80 {
            msg.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        msg.push(len as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    grpc::frame(&msg)
}

/// Reads `HealthCheckResponse.status` from a framed response body: the first message, whole
/// and uncompressed (as its 5-byte prefix says), decoded as protobuf (other fields skipped).
pub fn health_status(body: &[u8]) -> Option<u64> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct HealthCheckResponse {
        #[prost(int32, tag = "1")]
        status: i32,
    }
    let (&compressed, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let msg = rest[4..].get(..len)?;
    if compressed != 0 {
        return None;
    }
    let r = <HealthCheckResponse as prost::Message>::decode(msg).ok()?;
    u64::try_from(r.status).ok()
}

/// Largest gRPC health answer read.
const HEALTH_BODY_MAX: usize = 4096;

async fn grpc_probe<S>(s: S, t: &ProbeTarget, c: &ActiveCheck) -> ProbeResult
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = match hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(s))
        .await
    {
        Ok(x) => x,
        Err(e) => return result(Some(Event::TcpFailure), format!("HTTP/2 handshake: {e}")),
    };
    let conn = tokio::spawn(conn);
    let scheme = if t.tls.is_some() { "https" } else { "http" };
    let req = http::Request::post(format!("{scheme}://{}/grpc.health.v1.Health/Check", t.host))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "strait-healthcheck")
        .body(Full::new(health_request(&c.grpc_service)));
    let req = match req {
        Ok(r) => r,
        Err(e) => return result(Some(Event::HttpFailure), format!("bad probe request: {e}")),
    };
    let out = async {
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let head_status = grpc::status_of(resp.headers());
        // A health answer is a few bytes: more is not one (and not for the gateway to hold).
        let collected = http_body_util::Limited::new(resp.into_body(), HEALTH_BODY_MAX)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        let trailer_status = collected.trailers().and_then(grpc::status_of);
        Ok::<_, String>((status, head_status.or(trailer_status), collected.to_bytes()))
    }
    .await;
    conn.abort();
    match out {
        Err(e) => result(Some(Event::TcpFailure), e),
        Ok((status, _, _)) if status != http::StatusCode::OK => {
            result(Some(Event::HttpFailure), format!("HTTP {status}"))
        }
        Ok((_, Some(0), body)) => match health_status(&body) {
            Some(1) => result(Some(Event::Success), "SERVING"),
            Some(s) => result(Some(Event::HttpFailure), format!("health status {s} (not SERVING)")),
            None => result(Some(Event::HttpFailure), "undecodable HealthCheckResponse"),
        },
        Ok((_, code, _)) => result(
            Some(Event::HttpFailure),
            format!("grpc-status {}", code.map_or("missing".into(), |c| c.to_string())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_messages_encode_and_decode() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&health_request("svc")[..], &[0, 0, 0, 0, 5, 0x0a, 3, b's', b'v', b'c']);
        assert_eq!(health_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(health_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(health_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(health_status(&[0, 0]), None);
        // A varint longer than ten bytes is no status (it once shifted past 64 bits: a panic).
        let long = [0, 0, 0, 0, 12, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(health_status(&long), None);
        // Fields are read as protobuf: an unknown field first, a long string holding bytes
        // that look like `status: SERVING`, and field numbers past 15 are skipped.
        let msg = |m: &[u8]| {
            let mut b = vec![0, 0, 0, 0, m.len() as u8];
            b.extend_from_slice(m);
            b
        };
        let mut s = vec![0x12, 200, 1];
        s.extend(std::iter::repeat_n(0x08, 100).chain(std::iter::repeat_n(0x01, 100)));
        s.extend_from_slice(&[0x08, 2]);
        let mut framed = vec![0, 0, 0, 0, 0];
        framed[1..5].copy_from_slice(&(s.len() as u32).to_be_bytes());
        framed.extend_from_slice(&s);
        assert_eq!(health_status(&framed), Some(2));
        assert_eq!(health_status(&msg(&[0x80, 0x01, 0x05, 0x08, 0x01])), Some(1));
        // Compressed, cut short, or a negative status: no status.
        assert_eq!(health_status(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(health_status(&[0, 0, 0, 0, 3, 0x08, 1]), None);
        assert_eq!(
            health_status(&msg(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])),
            None
        );
    }
}
