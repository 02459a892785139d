//! mTLS is enforced at the handshake: no certificate, or one from another
//! CA, never reaches a handler.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use auth_proto::auth::v1::GetJwksRequest;
use auth_proto::auth::v1::auth_client::AuthClient;
use auth_server::dev::pki::Ca;
use testkit::TestServer;
use tonic::transport::{Certificate, Identity};

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
