//! The auth server's identity: the SDK's channels to the auth server accept
//! only a certificate carrying the auth server's SPIFFE ID, so a service
//! certificate from the same CA (one that serves mTLS to other services and
//! even names `localhost` and `127.0.0.1`) cannot pass as the auth server.
//!
//! The PKI here is the test's own, so that the impostor's certificate
//! passes every other check (chain, validity, host name): only the identity
//! can refuse it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;

use crate::pki::Pki;
use crate::stub::{self, Protected};
use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use std::time::Duration;

use service_sdk::{AuthServerId, JwksSource, MtlsFiles, TokenSource, Verifier};
use testkit::TestServer;
use testkit::auth_server::dev::DEV_AUTH_SERVER_ID;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

/// `GetJwks` answers a fixed document.
struct Jwks(String);

#[tonic::async_trait]
impl Protected for Jwks {
    async fn get_jwks(&self, _: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(pb::GetJwksResponse { jwks_json: self.0.clone() }))
    }
}

/// A key set as a (compromised) server would publish it.
fn jwks() -> String {
    use testkit::auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
    let key = LoadedKey::from_pem(KeyAlg::ES256, generate_pkcs8_pem(KeyAlg::ES256).unwrap().as_bytes()).unwrap();
    serde_json::json!({ "keys": [key.jwk()] }).to_string()
}

/// Serves `GetJwks` over mTLS on 127.0.0.1 with the certificate of `files`.
async fn serve_as(files: &MtlsFiles) -> (String, tokio::task::JoinHandle<()>) {
    let read = |f: &Path| std::fs::read(f).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert), read(&files.key)))
        .client_ca_root(Certificate::from_pem(read(&files.ca)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let router = Server::builder().tls_config(tls).unwrap().add_service(stub::server(Jwks(jwks())));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(TcpListenerStream::new(listener)).await.unwrap();
    });
    (format!("https://{addr}"), task)
}

#[tokio::test]
async fn a_service_certificate_presented_as_the_auth_server_is_refused() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = Pki::new("identity test CA");
    for name in ["auth-server", "order", "inventory"] {
        pki.issue(name);
    }
    let (impostor, impostor_task) = serve_as(&pki.files("order")).await;
    let (genuine, genuine_task) = serve_as(&pki.files("auth-server")).await;
    let inventory = pki.files("inventory");

    // inventory's channel to the auth server, as the SDK builds it: the
    // impostor's certificate chains to the CA and names 127.0.0.1, but it is
    // order's.
    let channel = inventory.auth_channel(&impostor).unwrap();
    let refused = AuthClient::new(channel.clone()).get_jwks(pb::GetJwksRequest {}).await;
    let status = refused.expect_err("a service's certificate passed as the auth server");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let why = status.message();
    assert!(why.contains("NotTheAuthServer") && why.contains("spiffe://test.local/auth-server"), "{why}");
    assert!(why.contains("spiffe://test.local/order"), "the refusal names what was presented: {why}");
    let fetched = JwksSource::grpc(channel).fetch().await;
    assert!(fetched.is_err(), "the impostor's keys were loaded: {fetched:?}");

    // The genuine auth server passes; named explicitly too, or refused when
    // another identity is expected.
    JwksSource::grpc(inventory.auth_channel(&genuine).unwrap()).fetch().await.unwrap();
    let id = AuthServerId::new("spiffe://test.local/auth-server").unwrap();
    assert_eq!(inventory.auth_server_id().unwrap(), id, "the default: the trust domain of the own certificate");
    JwksSource::grpc(inventory.auth_channel_as(&genuine, &id).unwrap()).fetch().await.unwrap();
    let other = AuthServerId::new("spiffe://test.local/ns/auth/sa/auth-server").unwrap();
    let fetched = JwksSource::grpc(inventory.auth_channel_as(&genuine, &other).unwrap()).fetch().await;
    assert!(fetched.is_err(), "accepted as {other}: {fetched:?}");
    impostor_task.abort();
    genuine_task.abort();
}

#[tokio::test]
async fn dev_services_reach_the_dev_auth_server_and_cannot_pass_as_it() {
    let srv = TestServer::start().await;
    let files = crate::client::mtls(&srv.dir, "inventory");
    assert_eq!(files.auth_server_id().unwrap().as_str(), DEV_AUTH_SERVER_ID);
    let auth = files.auth_channel(&format!("https://{}", srv.grpc_addr)).unwrap();
    // Exchanges, keys and the revocation feed all pass the identity check.
    let source = TokenSource::builder(auth.clone(), crate::client::creds(&srv, "inventory")).build();
    source.token("order").await.unwrap();
    let verifier = Verifier::builder(srv.config().issuer.clone(), "inventory").channel(auth).build().unwrap();
    tokio::time::timeout(Duration::from_secs(10), verifier.ready()).await.expect("keys and feed over the auth channel");

    // order's dev certificate, serving GetJwks, is refused.
    let (impostor, task) = serve_as(&crate::client::mtls(&srv.dir, "order")).await;
    let fetched = JwksSource::grpc(files.auth_channel(&impostor).unwrap()).fetch().await;
    assert!(fetched.is_err(), "order's certificate passed as the auth server: {fetched:?}");
    task.abort();
}
