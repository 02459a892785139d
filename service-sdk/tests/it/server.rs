//! The service's own mTLS server: `MtlsFiles::server_tls_config` follows
//! rotated files (certificate, key and client CA), and a service built from
//! one `ServiceEnv` verifies, exchanges and serves against a real
//! auth-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use futures_util::StreamExt as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use service_sdk::{Audience, AuthChannel, Claims, RequireAuthLayer, ServiceEnv, TlsIncoming};
use testkit::TestServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};

use crate::pki::{Issued, Pki, replace_atomically};
use crate::stub::{self, Protected};

/// The interval the tests give the server to look at its files.
const CHECK: Duration = Duration::from_millis(20);

/// Serves `incoming` as an echo of one byte per connection.
fn echo(mut incoming: TlsIncoming) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            let Ok(mut conn) = conn else { continue };
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if conn.read_exact(&mut byte).await.is_ok() {
                    let _ = conn.write_all(&byte).await;
                    let _ = conn.flush().await;
                }
            });
        }
    })
}

/// Connects to `addr` trusting `ca_pem`, presenting `identity` (or nothing);
/// sends one byte and reads it back. Returns the server's certificate, or
/// why the exchange failed (a refused client certificate shows at the first
/// read under TLS 1.3).
async fn call(addr: SocketAddr, ca_pem: &str, identity: Option<&Issued>) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls =
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
    assert_eq!(&byte, b"x");
    Ok(presented)
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Polls `call` until it answers as `want` says (the server looks at its
/// files at most once per [`CHECK`]).
async fn until<F>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    want: impl Fn(&Result<CertificateDer<'static>, String>) -> bool,
) where
    F: std::future::Future<Output = Result<CertificateDer<'static>, String>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = attempt().await;
        if want(&got) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: last answer {got:?}");
        tokio::time::sleep(CHECK).await;
    }
}

#[tokio::test]
async fn server_tls_config_follows_a_rotated_certificate_key_and_client_ca() {
    let pki = Pki::new("server test CA");
    pki.issue("inventory");
    let files = pki.files("inventory");
    let first_cert = std::fs::read_to_string(&files.cert).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = echo(TlsIncoming::new(listener, files.server_tls_config_every(CHECK).unwrap()));
    let order = pki.certificate("order");

    // Client certificates are required, from the CA of the files.
    assert_eq!(call(addr, pki.ca_pem(), Some(&order)).await.unwrap(), der(&first_cert));
    assert!(call(addr, pki.ca_pem(), None).await.is_err(), "a client without a certificate was served");
    let stranger = Pki::new("another CA");
    assert!(
        call(addr, pki.ca_pem(), Some(&stranger.certificate("order"))).await.is_err(),
        "a client certificate from another CA was served"
    );

    // A rotated certificate and key: new handshakes present them.
    let second = pki.certificate("inventory");
    replace_atomically(&files.key, &second.key_pem);
    replace_atomically(&files.cert, &second.cert_pem);
    until(
        "the rotated certificate",
        || call(addr, pki.ca_pem(), Some(&order)),
        |r| r.as_ref().is_ok_and(|c| *c == der(&second.cert_pem)),
    )
    .await;

    // Half a rotation (a new certificate, the old key) does not load: the
    // running set stays, and handshakes keep succeeding.
    let third = pki.certificate("inventory");
    replace_atomically(&files.cert, &third.cert_pem);
    for _ in 0..5 {
        tokio::time::sleep(CHECK * 2).await;
        assert_eq!(call(addr, pki.ca_pem(), Some(&order)).await.unwrap(), der(&second.cert_pem));
    }
    // Its key arrives: the set loads.
    replace_atomically(&files.key, &third.key_pem);
    until(
        "the completed rotation",
        || call(addr, pki.ca_pem(), Some(&order)),
        |r| r.as_ref().is_ok_and(|c| *c == der(&third.cert_pem)),
    )
    .await;

    // A new client CA (the server's own certificate still chains to the
    // old one, which clients trust): clients of the old CA are refused,
    // clients of the new one served.
    replace_atomically(&files.ca, stranger.ca_pem());
    until("the old CA's clients refused", || call(addr, pki.ca_pem(), Some(&order)), Result::is_err).await;
    assert_eq!(call(addr, pki.ca_pem(), Some(&stranger.certificate("order"))).await.unwrap(), der(&third.cert_pem));
    server.abort();
}

#[test]
fn server_tls_config_refuses_a_key_that_is_not_the_certificates_naming_both_files() {
    let pki = Pki::new("server test CA");
    pki.issue("inventory");
    let files = pki.files("inventory");
    std::fs::write(&files.key, pki.certificate("other").key_pem).unwrap();
    let err = files.server_tls_config().unwrap_err().to_string();
    assert!(err.contains("inventory-key.pem") && err.contains("inventory.pem"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    std::fs::write(&files.ca, "not a certificate").unwrap();
    pki.issue("inventory");
    let err = files.server_tls_config().unwrap_err().to_string();
    assert!(err.contains("ca.pem"), "{err}");
}

/// `inventory`: echoes the claims it verified.
struct Echo;

#[tonic::async_trait]
impl Protected for Echo {
    async fn get_jwks(&self, req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        // tonic hands the client's verified certificate to the handlers
        // (certificate-bound tokens need it) over a `TlsIncoming` too.
        if req.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::internal("no peer certificate in the request"));
        }
        let claims = Claims::from_request(&req)?;
        Ok(Response::new(pb::GetJwksResponse { jwks_json: serde_json::to_string(claims).unwrap() }))
    }
}

#[tokio::test]
async fn a_service_built_from_one_environment_verifies_exchanges_and_serves_mtls() {
    let srv = TestServer::start().await;
    let auth_url = format!("https://{}", srv.grpc_addr);
    let issuer = srv.config().issuer.clone();

    // inventory: the verifier and the server, from its environment.
    let env = ServiceEnv::dev(&srv.dir, "inventory", &auth_url).with_issuer(&issuer);
    let verifier = env.verifier(env.auth_channel().unwrap()).build().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inventory_url = format!("https://{}", listener.local_addr().unwrap());
    let incoming = env.incoming(listener).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(RequireAuthLayer::new(verifier))
            .add_service(stub::server(Echo))
            .serve_with_incoming(incoming),
    );

    // order: the token source and the channel, from its environment.
    let order = ServiceEnv::dev(&srv.dir, "order", &auth_url).with_issuer(&issuer);
    let tokens = order.token_source(order.auth_channel().unwrap()).build();
    let channel = order.channel(&inventory_url, "inventory").unwrap();
    let mut inventory = AuthClient::new(AuthChannel::new(channel, tokens, "inventory"));
    let echoed = inventory.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let claims: Claims = serde_json::from_str(&echoed).unwrap();
    assert_eq!((claims.sub.as_str(), &claims.aud), ("svc:order", &Audience::One("inventory".into())));

    // The server demands a client certificate.
    let anonymous = tonic::transport::Channel::from_shared(inventory_url)
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(srv.ca_pem()))
                .domain_name("inventory"),
        )
        .unwrap()
        .connect_lazy();
    let status = AuthClient::new(anonymous).get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert!(format!("{status:?}").contains("CertificateRequired"), "{status:?}");
    server.abort();
}
