//! What operators' tools expect of a running server: gRPC reflection in
//! both versions (grpcurl before 1.9 and Python's grpcio-reflection speak
//! only v1alpha), RFC 8414 discovery and the HTTP JWKS with its cache
//! headers on the side port, and the side port over TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use auth_proto::auth::v1::GetJwksRequest;
use auth_proto::auth::v1::auth_client::AuthClient;
use auth_server::config::HttpTlsConfig;
use auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
use prost::Message as _;
use service_sdk::KeySet;
use testkit::TestServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::within;

/// What a reflection server answered: the services it lists, and the
/// names of the file descriptor that defines `auth.v1.Auth` and of its
/// services and their methods.
#[derive(Debug, PartialEq, Eq)]
struct Reflected {
    services: Vec<String>,
    file: String,
    methods: Vec<String>,
}

/// `ListServices`, then `FileContainingSymbol("auth.v1.Auth")`, over one
/// `grpc.reflection.v1alpha` stream.
async fn reflect_v1alpha(channel: Channel) -> Result<Reflected, tonic::Status> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};

    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(auth_proto::SERVICE_NAME.into()),
    ]
    .map(|r| ServerReflectionRequest { host: String::new(), message_request: Some(r) });
    let mut answers =
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
    let mut next = async || -> Result<MessageResponse, tonic::Status> {
        let ServerReflectionResponse { message_response, .. } =
            answers.message().await?.ok_or_else(|| tonic::Status::internal("stream ended early"))?;
        message_response.ok_or_else(|| tonic::Status::internal("empty answer"))
    };
    let MessageResponse::ListServicesResponse(list) = next().await? else { panic!("not a service list") };
    let MessageResponse::FileDescriptorResponse(files) = next().await? else { panic!("not a file descriptor") };
    Ok(reflected(list.service.into_iter().map(|s| s.name).collect(), &files.file_descriptor_proto))
}

/// The same over `grpc.reflection.v1`.
async fn reflect_v1(channel: Channel) -> Result<Reflected, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(auth_proto::SERVICE_NAME.into()),
    ]
    .map(|r| ServerReflectionRequest { host: String::new(), message_request: Some(r) });
    let mut answers =
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
    let mut next = async || -> Result<MessageResponse, tonic::Status> {
        let ServerReflectionResponse { message_response, .. } =
            answers.message().await?.ok_or_else(|| tonic::Status::internal("stream ended early"))?;
        message_response.ok_or_else(|| tonic::Status::internal("empty answer"))
    };
    let MessageResponse::ListServicesResponse(list) = next().await? else { panic!("not a service list") };
    let MessageResponse::FileDescriptorResponse(files) = next().await? else { panic!("not a file descriptor") };
    Ok(reflected(list.service.into_iter().map(|s| s.name).collect(), &files.file_descriptor_proto))
}

fn reflected(mut services: Vec<String>, files: &[Vec<u8>]) -> Reflected {
    services.sort_unstable();
    let protos: Vec<prost_types::FileDescriptorProto> =
        files.iter().map(|f| prost_types::FileDescriptorProto::decode(f.as_slice()).unwrap()).collect();
    let auth = protos.iter().find(|p| p.package() == "auth.v1").expect("the auth.v1 file among the answer");
    let mut methods: Vec<String> = auth
        .service
        .iter()
        .flat_map(|s| s.method.iter().map(move |m| format!("{}.{}/{}", auth.package(), s.name(), m.name())))
        .collect();
    methods.sort_unstable();
    Reflected { services, file: auth.name().to_owned(), methods }
}

fn expected(reflection_service: &str) -> Reflected {
    let mut services =
        vec![auth_proto::SERVICE_NAME.to_owned(), "grpc.health.v1.Health".to_owned(), reflection_service.to_owned()];
    services.sort_unstable();
    let methods = ["ExchangeToken", "ExchangeTokens", "GetJwks", "Login", "Refresh", "Revoke", "WatchRevocations"]
        .map(|m| format!("auth.v1.Auth/{m}"))
        .to_vec();
    Reflected { services, file: "auth/v1/auth.proto".into(), methods }
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_auth_service_and_serves_its_descriptor() {
    let srv = TestServer::start().await;
    let got = within("v1alpha reflection", reflect_v1alpha(srv.channel("admin").await)).await;
    assert_eq!(got.unwrap(), expected("grpc.reflection.v1alpha.ServerReflection"));
}

#[tokio::test]
async fn reflection_v1_lists_the_auth_service_and_serves_its_descriptor() {
    let srv = TestServer::start().await;
    let got = within("v1 reflection", reflect_v1(srv.channel("admin").await)).await;
    assert_eq!(got.unwrap(), expected("grpc.reflection.v1.ServerReflection"));
}

// ---------------------------------------------------------------------------
// The side port: discovery, JWKS cache headers, TLS.

/// A client trusting the dev CA only (and presenting `identity`, if any).
fn https_client(srv: &TestServer, identity: Option<&str>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(srv.ca_pem().as_bytes()).unwrap();
    let mut builder = reqwest::Client::builder().tls_certs_only([ca]).timeout(Duration::from_secs(10));
    if let Some(name) = identity {
        let (cert, key) = srv.client_identity(name);
        builder = builder.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

async fn get(client: &reqwest::Client, url: &str) -> reqwest::Response {
    within(url, client.get(url).send()).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn grpc_kids(srv: &TestServer) -> Vec<String> {
    let json =
        AuthClient::new(srv.channel("order").await).get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    kids(&json)
}

fn kids(jwks: &str) -> Vec<String> {
    let mut kids: Vec<String> = KeySet::from_jwks_json(jwks).unwrap().kids().map(str::to_owned).collect();
    kids.sort_unstable();
    kids
}

/// The side port configured with the dev server certificate.
fn side_port_tls(client_ca: bool) -> HttpTlsConfig {
    HttpTlsConfig {
        cert: "server.pem".into(),
        key: "server-key.pem".into(),
        client_ca: client_ca.then(|| "ca.pem".into()),
    }
}

#[tokio::test]
async fn discovery_names_the_issuer_the_grants_and_a_jwks_uri_that_serves_the_keys() {
    let srv = TestServer::start().await;
    let client = reqwest::Client::new();
    let res = get(&client, &format!("http://{}/.well-known/oauth-authorization-server", srv.http_addr)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let doc: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(doc["issuer"], srv.config().issuer);
    assert_eq!(
        doc["grant_types_supported"],
        serde_json::json!([
            "password",
            "client_credentials",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:token-exchange"
        ])
    );
    assert_eq!(doc["access_token_signing_alg_values_supported"], serde_json::json!(["ES256"]));
    assert_eq!(doc["grpc_methods"]["token_exchange"], "/auth.v1.Auth/ExchangeToken");
    assert!(doc.get("token_endpoint").is_none(), "there is no HTTP token endpoint");
    // Derived from the bound address, absolute, and it serves the keys
    // GetJwks serves.
    let jwks_uri = doc["jwks_uri"].as_str().unwrap();
    assert_eq!(jwks_uri, format!("http://{}/.well-known/jwks.json", srv.http_addr));
    let jwks = get(&client, jwks_uri).await.text().await.unwrap();
    assert_eq!(kids(&jwks), grpc_kids(&srv).await);
}

#[tokio::test]
async fn discovery_uses_the_configured_public_url() {
    let srv = TestServer::builder()
        .configure(|raw| raw.http_public_url = Some("https://auth.example.com/keys/".into()))
        .start()
        .await;
    let url = format!("http://{}/.well-known/oauth-authorization-server", srv.http_addr);
    let doc: serde_json::Value = get(&reqwest::Client::new(), &url).await.json_text().await;
    assert_eq!(doc["jwks_uri"], "https://auth.example.com/keys/.well-known/jwks.json");
}

#[tokio::test]
async fn jwks_cache_lifetime_comes_from_config_and_an_etag_answers_304_until_the_keys_change() {
    let srv = TestServer::builder()
        .configure(|raw| {
            raw.keys.jwks_max_age_secs = Some(45);
            raw.keys.prepublish_secs = Some(600);
        })
        .start()
        .await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/.well-known/jwks.json", srv.http_addr);
    let first = get(&client, &url).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["cache-control"], "public, max-age=45");
    assert_eq!(first.headers()["content-type"], "application/jwk-set+json");
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let again = within("304", client.get(&url).header("if-none-match", &etag).send()).await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], etag.as_str());
    assert_eq!(again.headers()["cache-control"], "public, max-age=45");
    assert!(again.bytes().await.unwrap().is_empty());
    let other = within("200", client.get(&url).header("if-none-match", "\"other\"").send()).await.unwrap();
    assert_eq!(other.status(), 200);

    // A pre-published key changes the document: the old tag gets it whole.
    let next = LoadedKey::from_pem(KeyAlg::EdDSA, generate_pkcs8_pem(KeyAlg::EdDSA).unwrap().as_bytes()).unwrap();
    let active = LoadedKey::from_pem_file(KeyAlg::ES256, &srv.dir.join("keys/signing.pem")).unwrap();
    let next_kid = next.kid().to_owned();
    srv.keys().replace(active, vec![next]).unwrap();
    let changed = within("200", client.get(&url).header("if-none-match", &etag).send()).await.unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"], etag.as_str());
    assert!(kids(&changed.text().await.unwrap()).contains(&next_kid));
}

#[tokio::test]
async fn the_side_port_serves_https_with_the_configured_certificate_and_refuses_plain_http() {
    let srv = TestServer::builder().configure(|raw| raw.http_tls = Some(side_port_tls(false))).start().await;
    let client = https_client(&srv, None);
    let port = srv.http_addr.port();
    let res = get(&client, &format!("https://localhost:{port}/.well-known/jwks.json")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(kids(&res.text().await.unwrap()), grpc_kids(&srv).await);

    // The discovery document points at the HTTPS JWKS.
    let url = format!("https://localhost:{port}/.well-known/oauth-authorization-server");
    let doc: serde_json::Value = get(&client, &url).await.json_text().await;
    let jwks_uri = doc["jwks_uri"].as_str().unwrap();
    assert_eq!(jwks_uri, format!("https://{}/.well-known/jwks.json", srv.http_addr));
    assert_eq!(get(&client, jwks_uri).await.status(), 200);

    // Plain HTTP gets no HTTP answer.
    let mut plain = TcpStream::connect(srv.http_addr).await.unwrap();
    plain.write_all(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the plain connection to close", plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered: {:?}", String::from_utf8_lossy(&answer));
    let refused =
        within("plain GET", reqwest::Client::new().get(format!("http://{}/healthz", srv.http_addr)).send()).await;
    assert!(refused.is_err(), "plain HTTP was answered: {refused:?}");

    // A client that does not trust the dev CA is refused.
    let stranger = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(
            auth_server::dev::pki::Ca::generate("other").unwrap().cert_pem.as_bytes(),
        )
        .unwrap()])
        .build()
        .unwrap();
    assert!(within("untrusted", stranger.get(format!("https://localhost:{port}/healthz")).send()).await.is_err());
}

#[tokio::test]
async fn with_a_client_ca_the_https_side_port_requires_a_client_certificate() {
    let srv = TestServer::builder().configure(|raw| raw.http_tls = Some(side_port_tls(true))).start().await;
    let url = format!("https://localhost:{}/.well-known/jwks.json", srv.http_addr.port());
    let anonymous = within("anonymous", https_client(&srv, None).get(&url).send()).await;
    assert!(anonymous.is_err(), "served without a client certificate: {anonymous:?}");
    assert_eq!(get(&https_client(&srv, Some("inventory")), &url).await.status(), 200);
}

#[tokio::test]
async fn the_https_side_port_closes_a_client_that_never_starts_the_handshake_at_the_header_timeout() {
    let srv = TestServer::builder()
        .configure(|raw| {
            raw.http_tls = Some(side_port_tls(false));
            raw.limits.http_header_timeout_ms = 400;
            raw.limits.http_idle_timeout_secs = 60;
        })
        .start()
        .await;
    let mut silent = TcpStream::connect(srv.http_addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = within("the silent connection to close", silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(300), "closed before the header timeout");
}

#[tokio::test]
async fn the_https_side_port_closes_connections_over_the_cap_before_any_tls() {
    // Header and idle timeouts far beyond the test's patience: only the cap
    // can close the connection over it.
    let srv = TestServer::builder()
        .configure(|raw| {
            raw.http_tls = Some(side_port_tls(false));
            raw.limits.http_max_connections = 2;
            raw.limits.http_header_timeout_ms = 120_000;
            raw.limits.http_idle_timeout_secs = 120;
        })
        .start()
        .await;
    let held = [TcpStream::connect(srv.http_addr).await.unwrap(), TcpStream::connect(srv.http_addr).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = TcpStream::connect(srv.http_addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = within("the connection over the cap to close", over.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Once the held ones are closed, HTTPS is served again.
    drop(held);
    let client = https_client(&srv, None);
    let url = format!("https://localhost:{}/healthz", srv.http_addr.port());
    within("a slot to free", async {
        loop {
            if let Ok(res) = client.get(&url).send().await
                && res.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The DER of the first certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// The certificate the HTTPS side port presents to a new connection.
async fn served_certificate(srv: &TestServer, ca_pem: &str) -> Vec<u8> {
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .tls_info(true)
        .build()
        .unwrap();
    let res = get(&client, &format!("https://localhost:{}/healthz", srv.http_addr.port())).await;
    assert_eq!(res.status(), 200);
    res.extensions().get::<reqwest::tls::TlsInfo>().unwrap().peer_certificate().unwrap().to_vec()
}

#[tokio::test]
async fn the_https_side_port_takes_a_renewed_certificate_on_reload_and_keeps_it_over_a_broken_one() {
    use auth_server::dev::pki::Ca;
    // The side port has its own CA and certificate, apart from the gRPC
    // port's.
    let dir = tempfile::tempdir().unwrap();
    auth_server::dev::ensure(dir.path()).unwrap();
    let side_ca = Ca::generate("side port CA").unwrap();
    let first = side_ca.server_cert("auth.dev", &[]).unwrap();
    std::fs::write(dir.path().join("http.pem"), &first.cert_pem).unwrap();
    crate::write_key_file(dir.path().join("http-key.pem"), &first.key_pem);
    let srv = TestServer::builder()
        .dev_dir(dir.path())
        .configure(|raw| {
            raw.http_tls = Some(HttpTlsConfig { cert: "http.pem".into(), key: "http-key.pem".into(), client_ca: None });
            // Only the reload (SIGHUP) re-reads the files here.
            if let Some(tls) = raw.tls.as_mut() {
                tls.reload_check_secs = 0;
            }
        })
        .start()
        .await;
    assert_eq!(served_certificate(&srv, &side_ca.cert_pem).await, der(&first.cert_pem));

    // Renewed in place (a new key renamed over the old, as a Secret volume
    // swaps its files), then SIGHUP.
    let renewed = side_ca.server_cert("auth.dev", &[]).unwrap();
    std::fs::write(dir.path().join("http.pem"), &renewed.cert_pem).unwrap();
    crate::write_key_file(dir.path().join("http-key.next.pem"), &renewed.key_pem);
    std::fs::rename(dir.path().join("http-key.next.pem"), dir.path().join("http-key.pem")).unwrap();
    srv.reload().await.unwrap();
    assert_eq!(served_certificate(&srv, &side_ca.cert_pem).await, der(&renewed.cert_pem));

    // A certificate without its key is refused: the running pair stays.
    std::fs::write(dir.path().join("http.pem"), &first.cert_pem).unwrap();
    srv.reload().await.unwrap();
    assert_eq!(served_certificate(&srv, &side_ca.cert_pem).await, der(&renewed.cert_pem));
}

/// A response body as JSON.
trait JsonText {
    async fn json_text(self) -> serde_json::Value;
}

impl JsonText for reqwest::Response {
    async fn json_text(self) -> serde_json::Value {
        serde_json::from_str(&self.text().await.unwrap()).unwrap()
    }
}
