//! The per-connection stage of the gRPC port: accept TCP (`TCP_NODELAY`,
//! keepalive), run the mTLS handshake under a timeout, and read the
//! caller's identity from its certificate once, for every request of the
//! connection.
//!
//! [`TlsIncoming`] is the stream of ready connections handed to tonic's
//! `serve_with_incoming_shutdown`; each [`TlsConn`] carries a [`ConnInfo`],
//! which tonic puts in the extensions of every request on it. Handshakes
//! run concurrently, so a slow or silent client never holds up the accept
//! loop; a failed or timed-out handshake is logged at debug level and
//! dropped. Connection caps and certificate reload attach here.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::tls::PeerIdentity;

/// How long a client may take to finish the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive probe interval of accepted connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// What every request of a connection knows about it (in its extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The identity of the client's verified certificate, read once at the
    /// handshake.
    pub peer: Option<Arc<PeerIdentity>>,
}

/// An accepted mTLS connection.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl TlsConn {
    /// What the connection's requests will see.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The stream of mTLS connections of a listener, ready for tonic.
pub struct TlsIncoming {
    inner: Pin<Box<dyn Stream<Item = io::Result<TlsConn>> + Send>>,
}

impl TlsIncoming {
    /// Accepts on `listener` and completes handshakes with `tls` within
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn new(listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> Self {
        Self::with_handshake_timeout(listener, tls, DEFAULT_HANDSHAKE_TIMEOUT)
    }

    /// As [`TlsIncoming::new`], with another handshake timeout.
    pub fn with_handshake_timeout(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        handshake_timeout: Duration,
    ) -> Self {
        // Without TCP_NODELAY, small responses wait on delayed ACKs (~40 ms).
        let tcp = TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE));
        let state = State { tcp, acceptor: TlsAcceptor::from(tls), handshake_timeout, handshakes: JoinSet::new() };
        Self { inner: Box::pin(futures_util::stream::unfold(state, State::next)) }
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
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
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
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(handshake(acceptor, stream, self.handshake_timeout));
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

/// Completes one handshake and reads the client's identity, once.
async fn handshake(acceptor: TlsAcceptor, stream: TcpStream, timeout: Duration) -> Option<TlsConn> {
    let remote_addr = stream.peer_addr().ok();
    let io = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
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
    Some(TlsConn { io, info: ConnInfo { remote_addr, peer } })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use aws_lc_rs::digest;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt as _;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

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
        assert_eq!(conn.io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
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
        let incoming = TlsIncoming::with_handshake_timeout(listener, server(&ca), Duration::from_millis(300));
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
}
