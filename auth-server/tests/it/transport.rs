//! mTLS is enforced at the handshake: no certificate, or one from another
//! CA, never reaches a handler. The gRPC port's connection limits (cap,
//! preface and idle deadlines) against real sockets, with a raw HTTP/2
//! client ([`RawH2`]) that never reconnects behind the test's back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::GetJwksRequest;
use auth_proto::auth::v1::auth_client::AuthClient;
use auth_server::config::RawConfig;
use auth_server::dev::pki::Ca;
use prost::Message as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::TestServer;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::Bytes;
use tonic::transport::{Certificate, Identity};
use tonic::{Code, Status};

/// An mTLS connection to the gRPC port as dev client `name`, offering h2.
pub(crate) async fn tls_connect(srv: &TestServer, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let (cert, key) = srv.client_identity(name);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(srv.ca_pem().as_bytes()).unwrap()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(srv.grpc_addr).await?;
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// A message in gRPC's length-prefixed framing (uncompressed).
pub(crate) fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// What came back for a raw call.
#[derive(Debug)]
pub(crate) struct RawReply {
    /// The HTTP status.
    pub(crate) http: http::StatusCode,
    /// The gRPC status, from the headers (trailers-only) or the trailers.
    pub(crate) grpc: Option<Status>,
    /// The response body (framed messages).
    pub(crate) body: Vec<u8>,
}

/// One HTTP/2 connection over real mTLS, driven by the `h2` crate: unlike
/// a tonic channel it never reconnects, so a cut connection shows.
pub(crate) struct RawH2 {
    send: h2::client::SendRequest<Bytes>,
    conn: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl RawH2 {
    /// Connects as dev client `name`.
    pub(crate) async fn connect(srv: &TestServer, name: &str) -> Self {
        Self::over(tls_connect(srv, name).await.expect("mTLS connection")).await
    }

    /// HTTP/2 over an mTLS connection the caller made.
    pub(crate) async fn over(tls: TlsStream<TcpStream>) -> Self {
        let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
        Self { send, conn: tokio::spawn(conn) }
    }

    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.is_finished()
    }

    /// POSTs `body` (raw, as given) to `path` with `content_type`.
    pub(crate) async fn call(&mut self, path: &str, content_type: &str, body: Vec<u8>) -> Result<RawReply, h2::Error> {
        let req = http::Request::post(format!("https://localhost{path}"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(req, false)?;
        stream.send_data(Bytes::from(body), true)?;
        let (parts, mut body) = response.await?.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?;
        let grpc =
            Status::from_header_map(&parts.headers).or_else(|| trailers.as_ref().and_then(Status::from_header_map));
        Ok(RawReply { http: parts.status, grpc, body: data })
    }

    /// A GetJwks call in proper gRPC; panics unless it answers OK.
    pub(crate) async fn get_jwks(&mut self) {
        let reply = self
            .call("/auth.v1.Auth/GetJwks", "application/grpc", grpc_frame(&GetJwksRequest {}.encode_to_vec()))
            .await
            .expect("the connection answers");
        assert_eq!(reply.http, http::StatusCode::OK);
        assert_eq!(reply.grpc.map(|s| s.code()), Some(Code::Ok), "{:?}", reply.body);
        assert!(reply.body.len() > 5, "no JWKS in the answer");
    }
}

async fn start(f: impl FnOnce(&mut RawConfig) + Send + 'static) -> TestServer {
    TestServer::builder().configure(f).start().await
}

/// Reads until the peer closes (`Ok(())`: EOF or an error), or `Err(())`
/// when it is still open after `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, within: Duration) -> Result<(), ()> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused_at_the_handshake() {
    let srv = TestServer::start().await;
    let ca = Certificate::from_pem(srv.ca_pem());
    // rustls clients connect lazily on some paths; either the connect or the
    // first call must fail, and no response may come back.
    match srv.channel_with(None, ca).await {
        Err(_) => {}
        Ok(ch) => {
            let res = AuthClient::new(ch).get_jwks(GetJwksRequest {}).await;
            assert!(res.is_err(), "a client without a certificate got an answer");
        }
    }
}

#[tokio::test]
async fn client_certificate_from_a_foreign_ca_is_refused() {
    let srv = TestServer::start().await;
    let foreign = Ca::generate("foreign CA").unwrap();
    let cert = foreign.client_cert("auth.dev", "order").unwrap();
    let id = Identity::from_pem(cert.cert_pem, cert.key_pem);
    match srv.channel_with(Some(id), Certificate::from_pem(srv.ca_pem())).await {
        Err(_) => {}
        Ok(ch) => {
            let res = AuthClient::new(ch).get_jwks(GetJwksRequest {}).await;
            assert!(res.is_err(), "a foreign client certificate got an answer");
        }
    }
}

#[tokio::test]
async fn dev_client_certificate_is_accepted() {
    let srv = TestServer::start().await;
    let mut c = AuthClient::new(srv.channel("order").await);
    assert!(c.get_jwks(GetJwksRequest {}).await.is_ok());
}

#[tokio::test]
async fn a_client_that_sends_nothing_after_the_tls_handshake_is_closed_at_the_preface_timeout() {
    let srv = start(|raw| raw.limits.grpc_preface_timeout_ms = 300).await;
    let mut silent = tls_connect(&srv, "order").await.unwrap();
    let started = Instant::now();
    // A real client, connected after it, is served: the deadline is per
    // connection and met by a client that speaks.
    let mut speaking = RawH2::connect(&srv, "inventory").await;
    speaking.get_jwks().await;

    let closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(closed.is_ok(), "a connection without an HTTP/2 preface stayed open");
    assert!(started.elapsed() >= Duration::from_millis(200), "closed before the preface timeout");
    speaking.get_jwks().await;
}

#[tokio::test]
async fn grpc_connections_over_the_cap_are_closed_at_once_and_a_freed_slot_serves_again() {
    let srv = start(|raw| {
        raw.limits.grpc_max_connections = 2;
        raw.limits.grpc_max_handshakes = 2;
    })
    .await;
    let mut first = RawH2::connect(&srv, "order").await;
    let mut second = RawH2::connect(&srv, "inventory").await;
    first.get_jwks().await;
    second.get_jwks().await;

    // The third is closed before its handshake can finish.
    let over = tokio::time::timeout(Duration::from_secs(3), tls_connect(&srv, "order")).await;
    match over.expect("a connection over the cap is closed at once, not left hanging") {
        Err(_) => {}
        // TLS 1.3 lets a client finish before the server has spoken its
        // last: then the server must still close it without serving.
        Ok(mut tls) => assert!(closed_within(&mut tls, Duration::from_secs(2)).await.is_ok()),
    }
    // The two held connections were not disturbed.
    first.get_jwks().await;
    second.get_jwks().await;
    assert!(!first.is_closed() && !second.is_closed());

    // Closing one frees its slot (once the server has seen the close).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut third = loop {
        if let Ok(tls) = tls_connect(&srv, "admin").await
            && let Ok((send, conn)) = h2::client::handshake(tls).await
        {
            break RawH2 { send, conn: tokio::spawn(conn) };
        }
        assert!(Instant::now() < deadline, "the freed slot never served a new connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    third.get_jwks().await;
    second.get_jwks().await;
}

#[tokio::test]
async fn a_quiet_healthy_connection_outlives_the_idle_timeout() {
    // PINGs every second, acked within one: a client that only acks them
    // reads as alive to the 3 s idle deadline.
    let srv = start(|raw| {
        raw.limits.grpc_keepalive_interval_secs = 1;
        raw.limits.grpc_keepalive_timeout_secs = 1;
        raw.limits.grpc_idle_timeout_secs = 3;
    })
    .await;
    let mut quiet = RawH2::connect(&srv, "order").await;
    quiet.get_jwks().await;
    // Well past the idle timeout without a request.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(!quiet.is_closed(), "the idle timeout cut a connection that answers PINGs");
    quiet.get_jwks().await;
}
