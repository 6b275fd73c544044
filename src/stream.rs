//! The L4 proxy: one TCP (or TLS) session from a client to a node.
//!
//! Per connection: optional PROXY protocol header (the real client address then drives
//! `remote_addr` matching and chash), then the SNI, by terminating TLS on `tls: true` listeners
//! or by peeking at the ClientHello on plain listeners that have SNI routes (passthrough: the
//! client talks TLS to the node itself), then routing, a node pick with retries on connect
//! failure, optional TLS origination and PROXY protocol towards the node, and a bidirectional
//! copy with half-close and the route's idle timeout.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use strait_protocols::retry::Retry;
use strait_protocols::stream::{
    Hello, peek_client_hello, proxy, read_proxy_header, relay_tcp, v1_header, v2_header,
};
use strait_protocols::{ConnectError, Outcome, ProxyError, Scheme, UpstreamPicker, connect_tcp, connect_tls};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::gateway::{Shared, TlsKind, accept_tls};
use crate::route::expr::{Var, VarSource};
use crate::server::ConnGuard;
use crate::upstream::Upstream;

/// Variables a stream connection offers to chash.
struct StreamVars<'a> {
    client: SocketAddr,
    local: SocketAddr,
    sni: Option<&'a str>,
}

impl VarSource for StreamVars<'_> {
    fn var(&self, v: &Var) -> Option<Cow<'_, str>> {
        Some(match v {
            Var::RemoteAddr => Cow::Owned(self.client.ip().to_string()),
            Var::RemotePort => Cow::Owned(self.client.port().to_string()),
            Var::ServerAddr => Cow::Owned(self.local.ip().to_string()),
            Var::ServerPort => Cow::Owned(self.local.port().to_string()),
            Var::Host => Cow::Borrowed(self.sni?),
            _ => return None,
        })
    }
}

/// How long a plain listener waits for a first byte before it stops expecting a ClientHello,
/// when a route without SNI could take the connection.
const SILENT_CLIENT_WAIT: Duration = Duration::from_millis(500);

/// Serves one accepted stream connection.
///
/// This future is the task of every session, idle ones too, so it is kept small: it is a function
/// returning an async block (an async fn would keep its arguments beside the locals made from
/// them), and the TLS paths, whose states are large, are boxed.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    index: usize,
    shared: Arc<Shared>,
    guard: ConnGuard,
) -> impl std::future::Future<Output = ()> {
    async move {
        // Counted as a live connection (a stop drains it) for the session's life.
        let _ = &guard;
        shared.metrics.stream_connections.fetch_add(1, Ordering::Relaxed);
        let Some(listener) = shared.node.stream.get(index).cloned() else {
            return;
        };
        let handshake_timeout = shared.node.client_header_timeout;
        let mut client = peer;
        let mut dest = local;
        if listener.proxy_protocol {
            match tokio::time::timeout(handshake_timeout, read_proxy_header(&mut stream)).await {
                // The header's addresses stand for the connection's only from a peer in
                // `nginx_config.stream.real_ip_from` (APISIX trusts nobody by default).
                Ok(Ok(h)) if shared.node.stream_real_ip_from.iter().any(|n| n.contains(peer.ip())) => {
                    client = h.source.unwrap_or(peer);
                    dest = h.destination.unwrap_or(local);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bad PROXY protocol header; closing");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no PROXY protocol header in time; closing");
                    return;
                }
            }
        }
        let state = shared.state.load_full();

        if listener.tls {
            // Boxed: the handshake's and the TLS state's room is not part of every plain session.
            return Box::pin(async move {
                let Some(config) = shared.stream_tls() else {
                    return;
                };
                let acceptor = TlsAcceptor::from(config);
                let accept = accept_tls(stream, &acceptor, &shared.state, TlsKind::Raw);
                let tls = match tokio::time::timeout(handshake_timeout, accept).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                // A client without SNI is routed as having asked for `fallback_sni` (APISIX's
                // `ssl.server_name()`); the node is still told what the client sent.
                let route_sni = sni.as_deref().or(shared.node.fallback_sni.as_deref());
                let Some(route) = state.stream_router.find(route_sni, client, local).cloned() else {
                    shared.metrics.stream_no_route.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                // The route is all the session needs: a long session does not keep the whole
                // configuration of its day alive across reloads.
                drop(state);
                let vars = StreamVars { client, local, sni: sni.as_deref() };
                session(
                    Client::Tls(Box::new(tls)),
                    &route.upstream,
                    &vars,
                    sni.as_deref(),
                    dest,
                    listener.proxy_protocol_to_upstream.then_some(listener.proxy_protocol_version),
                    route.spec.idle_timeout.or(route.upstream.spec.stream_idle),
                )
                .await;
            })
            .await;
        }

        let router = &state.stream_router;
        let sni = if router.has_sni_routes() && router.sni_applies(client, local) {
            // When a route without SNI would also take this connection, a client that stays silent
            // (a server-speaks-first protocol such as MySQL or SMTP) goes there after a short wait:
            // a TLS client sends its ClientHello right after the TCP handshake.
            let first_byte = if router.plain_applies(client, local) {
                SILENT_CLIENT_WAIT.min(handshake_timeout)
            } else {
                handshake_timeout
            };
            match peek_client_hello(&stream, first_byte, handshake_timeout).await {
                // A name whose `ssls` entry asks for client certificates is not routed by its
                // unverified ClientHello: that would reach its routes past the certificate check
                // a `tls: true` listener makes (and the ClientHello can be a decoy before plain
                // bytes). Such a connection is routed as one without SNI.
                Ok(Hello::Tls(sni)) => {
                    sni.filter(|name| !state.certs.policy(Some(name)).is_some_and(|p| p.client_auth))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no ClientHello");
                    None
                }
            }
        } else {
            None
        };
        let Some(route) = state.stream_router.find(sni.as_deref(), client, local).cloned() else {
            shared.metrics.stream_no_route.fetch_add(1, Ordering::Relaxed);
            return;
        };
        drop(state);
        let vars = StreamVars { client, local, sni: sni.as_deref() };
        session(
            Client::Plain(stream),
            &route.upstream,
            &vars,
            sni.as_deref(),
            dest,
            listener.proxy_protocol_to_upstream.then_some(listener.proxy_protocol_version),
            route.spec.idle_timeout.or(route.upstream.spec.stream_idle),
        )
        .await;
    }
}

/// The client side of a session.
enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

async fn relay<N>(client: &mut Client, node: N, idle: Option<Duration>) -> std::io::Result<(u64, u64)>
where
    N: AsyncRead + AsyncWrite + Unpin,
{
    match client {
        Client::Plain(c) => proxy(c, node, idle).await,
        Client::Tls(c) => proxy(&mut **c, node, idle).await,
    }
}

/// The node side of a session, once connected (and its TLS handshake done).
enum NodeConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to a node (retrying other nodes when the connection, the PROXY header or the TLS
/// handshake fails, as nginx's `proxy_next_upstream` does) and relays the session.
/// (A function returning an async block, as [`serve`] is.)
#[allow(clippy::manual_async_fn)]
fn session(
    mut client: Client,
    upstream: &Arc<Upstream>,
    vars: &StreamVars<'_>,
    client_sni: Option<&str>,
    dest: SocketAddr,
    send_pp: Option<u8>,
    idle: Option<Duration>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let settings = upstream.settings();
        let key = upstream.hash_key(vars).into_owned();
        let mut retry = Retry::new(&**upstream);
        let (peer, node) = loop {
            let peer = match retry.pick(&**upstream, &key) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(upstream = %settings.id, client = %vars.client, error = %e, "no node left for the stream session");
                    return;
                }
            };
            let started = Instant::now();
            match connect_node(settings, &peer, vars.client, client_sni, dest, send_pp).await {
                Ok(node) => {
                    // APISIX's stream sessions report only failures to passive checks; this only
                    // feeds the node's latency (ewma).
                    peer.report(Outcome::StreamOk, started.elapsed());
                    break (peer, node);
                }
                Err(e) => {
                    let (error, outcome) = if e.is_timeout() {
                        (ProxyError::Timeout("connect"), Outcome::Timeout)
                    } else {
                        (ProxyError::Connect(e.to_string()), Outcome::TcpFailure)
                    };
                    peer.report(outcome, started.elapsed());
                    tracing::debug!(upstream = %settings.id, node = %peer.addr, error = %e, "stream node failed");
                    if retry.failed(peer.addr, error, true).is_err() {
                        return;
                    }
                }
            }
        };
        let result = match node {
            // Boxed: the TLS state towards the node is not part of every plain session. As a
            // `NodeStream`, a node's close without `close_notify` reads as its EOF.
            NodeConn::Tls(n) => {
                Box::pin(relay(&mut client, strait_protocols::NodeStream::Tls(n), idle)).await
            }
            NodeConn::Plain(mut tcp) => match &mut client {
                // Plain TCP on both sides: socket to socket, no stream layers.
                Client::Plain(c) => relay_tcp(c, &mut tcp, idle).await,
                Client::Tls(_) => relay(&mut client, tcp, idle).await,
            },
        };
        if let Err(e) = result {
            tracing::debug!(upstream = %settings.id, node = %peer.addr, error = %e, "stream session ended");
        }
    }
}

/// Connects to one node: TCP, the PROXY protocol header, then TLS for `scheme: tls`.
async fn connect_node(
    settings: &strait_protocols::UpstreamSettings,
    peer: &strait_protocols::Peer,
    client: SocketAddr,
    client_sni: Option<&str>,
    dest: SocketAddr,
    send_pp: Option<u8>,
) -> Result<NodeConn, ConnectError> {
    let mut tcp = connect_tcp(peer.addr, settings.timeouts.connect).await?;
    let keepalive = strait_protocols::stream::session_keepalive();
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    if let Some(version) = send_pp {
        let header = if version == 2 { v2_header(client, dest) } else { v1_header(client, dest) };
        tcp.write_all(&header).await.map_err(|e| ConnectError::Io(peer.addr, e))?;
    }
    if settings.scheme != Scheme::Tls {
        return Ok(NodeConn::Plain(tcp));
    }
    let Some(tls) = settings.tls.as_ref() else {
        return Err(ConnectError::Tls(peer.addr, std::io::Error::other("no TLS settings for the upstream")));
    };
    let sni = match &settings.pass_host {
        strait_protocols::PassHost::Rewrite(h) => h.to_str().unwrap_or("localhost").to_string(),
        _ => client_sni.map(str::to_string).unwrap_or_else(|| peer.host.to_string()),
    };
    // Boxed: the handshake's state is not part of every plain session.
    let node =
        Box::pin(connect_tls(tcp, peer.addr, tls.raw.clone(), &sni, settings.timeouts.connect)).await?;
    Ok(NodeConn::Tls(Box::new(node)))
}
