//! The per-connection stage of the gRPC port: accept TCP (`TCP_NODELAY`,
//! keepalive) under the port's connection cap, run the mTLS handshake under
//! a timeout, read the caller's identity from its certificate once, for
//! every request of the connection, and put read deadlines on the socket.
//!
//! [`TlsIncoming`] is the stream of ready connections handed to tonic's
//! `serve_with_incoming_shutdown`; each [`TlsConn`] carries a [`ConnInfo`],
//! which tonic puts in the extensions of every request on it. Handshakes
//! run concurrently, so a slow or silent client never holds up the accept
//! loop; a failed or timed-out handshake is logged at debug level and
//! dropped.
//!
//! [`ConnLimits`] bound what one connection can hold:
//! - a connection over `max_connections` (handshakes included) is accepted
//!   and closed at once, before any TLS work, so a flood on this port holds
//!   descriptors for microseconds and cannot take those of the HTTP side
//!   port;
//! - handshakes in flight have their own, smaller budget
//!   (`max_handshakes`), also closed at once when over it: unauthenticated
//!   clients (silent TCP connects) hold at most that many of the
//!   `max_connections` slots, each for at most `handshake_timeout`, and a
//!   completed handshake gives its handshake slot back, keeping its
//!   connection slot;
//! - after the handshake the client's first bytes (the HTTP/2 preface) must
//!   arrive within `preface_timeout`;
//! - after that a connection that sends nothing for `idle_timeout` is
//!   closed. The server's keepalive PINGs make every live client answer at
//!   least once per PING interval, so only a dead or stuck one is cut
//!   (config validation keeps the idle timeout above a PING round).
//!
//! Certificate reload attaches here: each handshake takes the rustls
//! configuration current at that moment from its [`HandshakeConfig`] (a
//! reloadable [`ServerTls`] for the server), so a reloaded certificate,
//! key or client CA applies to every new connection, while connections
//! already open keep the configuration they started with.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::TcpIncoming;

use crate::config::LimitsConfig;
use crate::limits::{ConnLimit, ConnPermit, Deadlines};
use crate::tls::{PeerIdentity, ServerTls};

/// TCP keepalive probe interval of accepted connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// What every request of a connection knows about it (in its extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The identity of the client's verified certificate, read once at the
    /// handshake.
    pub peer: Option<Arc<PeerIdentity>>,
}

/// An accepted mTLS connection: the TLS stream under its read deadlines,
/// holding its slot of the connection cap, with its [`ConnInfo`].
pub type TlsConn = Deadlines<tokio_rustls::server::TlsStream<TcpStream>, ConnInfo>;

/// Per-connection limits of the gRPC port; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most, handshakes included.
    pub max_connections: usize,
    /// Handshakes in flight at most (each also holds a connection slot).
    pub max_handshakes: usize,
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time for the first bytes after the handshake.
    pub preface_timeout: Duration,
    /// Longest silence of an established connection.
    pub idle_timeout: Duration,
}

impl ConnLimits {
    /// The gRPC port's limits of `[limits]`.
    pub fn from_config(limits: &LimitsConfig) -> Self {
        Self {
            max_connections: limits.grpc_max_connections,
            max_handshakes: limits.grpc_max_handshakes,
            handshake_timeout: Duration::from_millis(limits.grpc_handshake_timeout_ms),
            preface_timeout: Duration::from_millis(limits.grpc_preface_timeout_ms),
            idle_timeout: Duration::from_secs(limits.grpc_idle_timeout_secs),
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self::from_config(&LimitsConfig::default())
    }
}

/// Where each handshake's rustls configuration comes from.
#[derive(Clone)]
pub enum HandshakeConfig {
    /// The same configuration for every connection.
    Fixed(Arc<rustls::ServerConfig>),
    /// Whatever the [`ServerTls`] holds when the connection arrives.
    Reloadable(Arc<ServerTls>),
}

impl HandshakeConfig {
    /// The configuration for a connection arriving now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        match self {
            Self::Fixed(config) => Arc::clone(config),
            Self::Reloadable(tls) => tls.server_config(),
        }
    }
}

impl std::fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(_) => f.write_str("HandshakeConfig::Fixed"),
            Self::Reloadable(tls) => f.debug_tuple("HandshakeConfig::Reloadable").field(tls).finish(),
        }
    }
}

impl From<Arc<rustls::ServerConfig>> for HandshakeConfig {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        Self::Fixed(config)
    }
}

impl From<Arc<ServerTls>> for HandshakeConfig {
    fn from(tls: Arc<ServerTls>) -> Self {
        Self::Reloadable(tls)
    }
}

/// The stream of mTLS connections of a listener, ready for tonic.
pub struct TlsIncoming {
    inner: Pin<Box<dyn Stream<Item = io::Result<TlsConn>> + Send>>,
    cap: ConnLimit,
}

impl TlsIncoming {
    /// Accepts on `listener` and completes handshakes with `tls` under the
    /// default [`ConnLimits`].
    pub fn new(listener: TcpListener, tls: impl Into<HandshakeConfig>) -> Self {
        Self::with_limits(listener, tls, ConnLimits::default())
    }

    /// As [`TlsIncoming::new`], under `limits`.
    pub fn with_limits(listener: TcpListener, tls: impl Into<HandshakeConfig>, limits: ConnLimits) -> Self {
        // Without TCP_NODELAY, small responses wait on delayed ACKs (~40 ms).
        let tcp = TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE));
        let cap = ConnLimit::new(limits.max_connections);
        let state = State {
            tcp,
            tls: tls.into(),
            cap: cap.clone(),
            handshake_cap: ConnLimit::new(limits.max_handshakes),
            limits,
            handshakes: JoinSet::new(),
        };
        Self { inner: Box::pin(futures_util::stream::unfold(state, State::next)), cap }
    }

    /// Connections open now (handshakes included).
    pub fn open_connections(&self) -> usize {
        self.cap.in_use()
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct State {
    tcp: TcpIncoming,
    tls: HandshakeConfig,
    cap: ConnLimit,
    handshake_cap: ConnLimit,
    limits: ConnLimits,
    /// Handshakes in flight; dropped (aborted) with the stream.
    handshakes: JoinSet<Option<TlsConn>>,
}

impl State {
    /// The next ready connection, or an accept error for tonic to judge
    /// (it retries transient ones).
    async fn next(mut self) -> Option<(io::Result<TlsConn>, Self)> {
        loop {
            tokio::select! {
                accepted = self.tcp.next() => match accepted {
                    Some(Ok(stream)) => {
                        let Some(permit) = self.cap.try_acquire() else {
                            // Over the cap: closed at once (dropping the
                            // stream), before any TLS work.
                            tracing::debug!("gRPC connection cap reached; closing a new connection");
                            continue;
                        };
                        let Some(in_handshake) = self.handshake_cap.try_acquire() else {
                            // Too many unauthenticated clients at once:
                            // they hold no more of the connection cap.
                            tracing::debug!("gRPC handshake budget reached; closing a new connection");
                            continue;
                        };
                        let acceptor = TlsAcceptor::from(self.tls.current());
                        let limits = self.limits.clone();
                        self.handshakes.spawn(handshake(acceptor, stream, limits, permit, in_handshake));
                    }
                    Some(Err(e)) => return Some((Err(e), self)),
                    None => return None,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(conn)) = done {
                        return Some((Ok(conn), self));
                    }
                }
            }
        }
    }
}

/// Completes one handshake, reads the client's identity, once, and puts
/// the connection under its read deadlines. The handshake slot is given
/// back when this returns; the connection keeps its connection slot.
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    limits: ConnLimits,
    permit: ConnPermit,
    in_handshake: ConnPermit,
) -> Option<TlsConn> {
    let remote_addr = stream.peer_addr().ok();
    let io = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, remote = ?remote_addr, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(remote = ?remote_addr, "TLS handshake timed out");
            return None;
        }
    };
    let peer = io
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| PeerIdentity::from_der(leaf.as_ref()))
        .map(Arc::new);
    drop(in_handshake);
    let conn = Deadlines::new(io, Some(limits.preface_timeout), limits.idle_timeout, Some(permit));
    Some(conn.with_info(ConnInfo { remote_addr, peer }))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use aws_lc_rs::digest;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;
    use tonic::transport::server::Connected as _;

    use super::*;
    use crate::dev::pki::{Ca, Issued};

    fn server(ca: &Ca) -> Arc<rustls::ServerConfig> {
        let cert = ca.server_cert(crate::dev::DEV_TRUST_DOMAIN, &[]).unwrap();
        crate::tls::server_config_from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), ca.cert_pem.as_bytes())
            .unwrap()
    }

    fn client(trust: &Ca, identity: Option<&Issued>) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(trust.cert_pem.as_bytes()).unwrap()).unwrap();
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    async fn connect(addr: SocketAddr, connector: &TlsConnector) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// Drives `incoming` as a server would, handing over each connection.
    fn accept_all(mut incoming: TlsIncoming) -> tokio::sync::mpsc::UnboundedReceiver<TlsConn> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(conn) = incoming.next().await {
                if tx.send(conn.unwrap()).is_err() {
                    return;
                }
            }
        });
        rx
    }

    async fn next_conn(conns: &mut tokio::sync::mpsc::UnboundedReceiver<TlsConn>) -> TlsConn {
        tokio::time::timeout(Duration::from_secs(5), conns.recv()).await.expect("a connection").unwrap()
    }

    #[tokio::test]
    async fn the_peer_identity_is_read_once_at_the_handshake_and_shared_by_every_request() {
        let ca = Ca::generate("edge test CA").unwrap();
        let (listener, addr) = listen().await;
        let mut conns = accept_all(TlsIncoming::new(listener, server(&ca)));
        let order = ca.client_cert("auth.dev", "order").unwrap();
        let client = connect(addr, &client(&ca, Some(&order))).await.unwrap();
        let conn = next_conn(&mut conns).await;

        let info = conn.connect_info();
        let peer = info.peer.as_ref().expect("the client's identity");
        assert_eq!(peer.id, "spiffe://auth.dev/order");
        let der = CertificateDer::from_pem_slice(order.cert_pem.as_bytes()).unwrap();
        assert_eq!(peer.cert_sha256.as_slice(), digest::digest(&digest::SHA256, der.as_ref()).as_ref());
        assert_eq!(info.remote_addr, Some(client.get_ref().0.local_addr().unwrap()));
        // Each request gets a copy of the connection's info: the same parsed
        // identity, not a new parse.
        let again = conn.connect_info();
        assert!(Arc::ptr_eq(peer, again.peer.as_ref().unwrap()));
        assert_eq!(conn.get_ref().get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn clients_without_a_certificate_or_from_a_foreign_ca_never_become_connections() {
        let ca = Ca::generate("edge test CA").unwrap();
        let foreign = Ca::generate("foreign CA").unwrap();
        let (listener, addr) = listen().await;
        let mut conns = accept_all(TlsIncoming::new(listener, server(&ca)));

        // With TLS 1.3 the client may finish before the server refuses its
        // certificate: what counts is that the server yields no connection.
        let anonymous = client(&ca, None);
        let _ = connect(addr, &anonymous).await;
        let stranger = foreign.client_cert("auth.dev", "order").unwrap();
        let _ = connect(addr, &client(&ca, Some(&stranger))).await;
        let inventory = ca.client_cert("auth.dev", "inventory").unwrap();
        let good = client(&ca, Some(&inventory));
        let _kept = connect(addr, &good).await.unwrap();

        let conn = next_conn(&mut conns).await;
        assert_eq!(conn.info().peer.as_ref().unwrap().id, "spiffe://auth.dev/inventory");
        let more = tokio::time::timeout(Duration::from_millis(300), conns.recv()).await;
        assert!(more.is_err(), "a refused client became a connection");
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_at_the_handshake_timeout_and_holds_up_no_one() {
        let ca = Ca::generate("edge test CA").unwrap();
        let (listener, addr) = listen().await;
        let limits = ConnLimits { handshake_timeout: Duration::from_millis(300), ..ConnLimits::default() };
        let incoming = TlsIncoming::with_limits(listener, server(&ca), limits);
        let mut conns = accept_all(incoming);

        let mut silent = TcpStream::connect(addr).await.unwrap();
        let order = ca.client_cert("auth.dev", "order").unwrap();
        let _kept = connect(addr, &client(&ca, Some(&order))).await.unwrap();
        // The silent client does not delay the next one.
        let conn = next_conn(&mut conns).await;
        assert_eq!(conn.info().peer.as_ref().unwrap().id, "spiffe://auth.dev/order");

        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf)).await;
        match read.expect("the server closes a silent connection after the handshake timeout") {
            Ok(n) => assert_eq!(n, 0, "no data without a handshake"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }

    #[tokio::test]
    async fn reads_fail_at_the_preface_deadline_and_then_at_the_idle_deadline() {
        let ca = Ca::generate("edge test CA").unwrap();
        let (listener, addr) = listen().await;
        let limits = ConnLimits {
            preface_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(400),
            ..ConnLimits::default()
        };
        let mut conns = accept_all(TlsIncoming::with_limits(listener, server(&ca), limits));
        let order = ca.client_cert("auth.dev", "order").unwrap();
        let connector = client(&ca, Some(&order));

        let _silent = connect(addr, &connector).await.unwrap();
        let mut conn = next_conn(&mut conns).await;
        let mut buf = [0u8; 5];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!((err.kind(), err.to_string().as_str()), (io::ErrorKind::TimedOut, "no data after connect"));

        let mut speaking = connect(addr, &connector).await.unwrap();
        let mut conn = next_conn(&mut conns).await;
        speaking.write_all(b"hello").await.unwrap();
        speaking.flush().await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!((err.kind(), err.to_string().as_str()), (io::ErrorKind::TimedOut, "idle"));
    }

    #[tokio::test]
    async fn the_cap_counts_handshakes_and_connections_and_frees_slots_on_drop() {
        let ca = Ca::generate("edge test CA").unwrap();
        let (listener, addr) = listen().await;
        let limits = ConnLimits { max_connections: 1, ..ConnLimits::default() };
        let incoming = TlsIncoming::with_limits(listener, server(&ca), limits);
        let cap = incoming.cap.clone();
        let mut conns = accept_all(incoming);
        let order = ca.client_cert("auth.dev", "order").unwrap();
        let connector = client(&ca, Some(&order));

        let _first = connect(addr, &connector).await.unwrap();
        let held = next_conn(&mut conns).await;
        assert_eq!(cap.in_use(), 1);
        // Over the cap: closed before the handshake, never a connection.
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(3), over.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(cap.in_use(), 1);

        drop(held);
        assert_eq!(cap.in_use(), 0);
        let _second = connect(addr, &connector).await.unwrap();
        let conn = next_conn(&mut conns).await;
        assert_eq!(conn.info().peer.as_ref().unwrap().id, "spiffe://auth.dev/order");
    }

    /// Whether the server has closed `stream` (EOF or reset) within `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) => n == 0,
            Ok(Err(_)) => true,
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn silent_connects_hold_only_the_handshake_budget_and_verified_clients_keep_their_slots() {
        let ca = Ca::generate("edge test CA").unwrap();
        let (listener, addr) = listen().await;
        let limits = ConnLimits {
            max_connections: 8,
            max_handshakes: 2,
            handshake_timeout: Duration::from_secs(4),
            ..ConnLimits::default()
        };
        let mut conns = accept_all(TlsIncoming::with_limits(listener, server(&ca), limits));
        let order = ca.client_cert("auth.dev", "order").unwrap();
        let connector = client(&ca, Some(&order));
        let mut established = connect(addr, &connector).await.unwrap();
        let mut held = next_conn(&mut conns).await;

        // Six silent TCP connects: two fit the handshake budget, the other
        // four are closed at once, long before the handshake timeout,
        // although the connection cap has room for all of them.
        let mut silent = Vec::new();
        for _ in 0..6 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let closed =
            futures_util::future::join_all(silent.iter_mut().map(|s| closed_within(s, Duration::from_secs(2)))).await;
        assert_eq!(closed.iter().filter(|c| **c).count(), 4, "{closed:?}");

        // The established client keeps working meanwhile.
        established.write_all(b"still").await.unwrap();
        established.flush().await.unwrap();
        let mut buf = [0u8; 5];
        held.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still");

        // The two in the budget are dropped at the handshake timeout; then
        // new clients get every slot but the one held: silent clients left
        // none behind.
        for (s, closed) in silent.iter_mut().zip(closed) {
            if !closed {
                assert!(closed_within(s, Duration::from_secs(10)).await, "a silent client outlived the timeout");
            }
        }
        let mut kept = Vec::new();
        for _ in 0..7 {
            let client = connect(addr, &connector).await.unwrap();
            let conn = next_conn(&mut conns).await;
            assert_eq!(conn.info().peer.as_ref().unwrap().id, "spiffe://auth.dev/order");
            kept.push((client, conn));
        }
    }
}
