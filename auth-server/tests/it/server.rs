//! The server as assembled by `Server::builder`: policy reload from the
//! config file, and extra layers in the gRPC stack.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{ClientCredentialsGrant, GetJwksRequest, LoginRequest, PasswordGrant, login_request};
use auth_server::clock::{Clock, SystemClock};
use auth_server::config::{Config, Overrides};
use auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
use auth_server::server::{Listeners, ReloadError, Server};
use service_sdk::{KeySet, Validator};
use testkit::TestServer;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn client(srv: &TestServer) -> AuthClient<Channel> {
    AuthClient::new(srv.channel("order").await)
}

/// A client-credentials token for `order` → `inventory`.
async fn service_token(c: &mut AuthClient<Channel>, srv: &TestServer) -> String {
    let (client_id, client_secret) = srv.client_credentials("order");
    c.login(LoginRequest {
        grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
        audience: vec!["inventory".into()],
        scope: vec![],
    })
    .await
    .expect("login")
    .into_inner()
    .access_token
}

async fn password_login(c: &mut AuthClient<Channel>, srv: &TestServer, user: &str) -> Result<u32, tonic::Status> {
    let (username, password) = srv.user_password(user);
    let res = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
            audience: vec!["order".into()],
            scope: vec![],
        })
        .await?;
    Ok(res.into_inner().expires_in)
}

async fn jwks(c: &mut AuthClient<Channel>) -> KeySet {
    let json = c.get_jwks(GetJwksRequest {}).await.expect("jwks").into_inner().jwks_json;
    KeySet::from_jwks_json(&json).expect("parse jwks")
}

fn sorted_kids(keys: &KeySet) -> Vec<String> {
    let mut kids: Vec<String> = keys.kids().map(str::to_owned).collect();
    kids.sort_unstable();
    kids
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).expect("header").kid.expect("kid")
}

fn edit_config(srv: &TestServer, edit: impl FnOnce(String) -> String) {
    let path = srv.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

#[tokio::test]
async fn reload_with_a_broken_file_keeps_serving_with_the_old_policy() {
    let srv = TestServer::builder().keys_from_config().start().await;
    let mut c = client(&srv).await;
    let kids_before = sorted_kids(&jwks(&mut c).await);
    let before = srv.core().policy();

    // An invalid value, and a missing signing key file: both reported.
    edit_config(&srv, |t| {
        t.replace("user_audiences = [\"order\"]", "user_audiences = [\"order\"]\nmax_act_depth = 0")
            .replace("keys/signing.pem", "keys/missing.pem")
    });
    let err = srv.reload().await.unwrap_err();
    let ReloadError::Config(errors) = &err else { panic!("expected a config error, got {err:?}") };
    assert_eq!(errors.keys(), ["keys.signing.path", "tokens.max_act_depth"], "{err}");
    assert!(Arc::ptr_eq(&before, &srv.core().policy()), "the old policy stays");

    // Not TOML at all.
    edit_config(&srv, |t| t + "\n[[[ not toml\n");
    assert!(matches!(srv.reload().await, Err(ReloadError::Config(_))));
    assert!(Arc::ptr_eq(&before, &srv.core().policy()), "the old policy stays");

    // The server still answers, with the old keys and settings.
    let token = service_token(&mut c, &srv).await;
    let keys = jwks(&mut c).await;
    assert_eq!(sorted_kids(&keys), kids_before);
    let claims = Validator::new("auth-service", "inventory").validate(&token, &keys, SystemClock.now_unix()).unwrap();
    assert_eq!(claims.sub, "svc:order");
    assert_eq!(srv.core().policy().tokens.max_act_depth, 4);
}

#[tokio::test]
async fn reload_with_a_new_signing_key_changes_jwks_and_the_signing_kid_without_restart() {
    let srv = TestServer::builder().keys_from_config().start().await;
    let mut c = client(&srv).await;
    let old_token = service_token(&mut c, &srv).await;
    let old_kid = kid_of(&old_token);
    assert_eq!(sorted_kids(&jwks(&mut c).await), std::slice::from_ref(&old_kid));

    // Rotation: a new active key at a new path, the old one published.
    let pem = generate_pkcs8_pem(KeyAlg::EdDSA).unwrap();
    let new_kid = LoadedKey::from_pem(KeyAlg::EdDSA, pem.as_bytes()).unwrap().kid().to_owned();
    crate::write_key_file(srv.dir.join("keys/next.pem"), &pem);
    edit_config(&srv, |t| {
        t.replace(
            "signing = { path = \"keys/signing.pem\", alg = \"ES256\" }",
            "signing = { path = \"keys/next.pem\", alg = \"EdDSA\" }\n\
             publish = [{ path = \"keys/signing.pem\", alg = \"ES256\" }]",
        )
    });
    let reloaded = srv.reload().await.unwrap();
    assert_eq!(reloaded.old_kids, std::slice::from_ref(&old_kid));
    let mut both = vec![old_kid.clone(), new_kid.clone()];
    both.sort_unstable();
    assert_eq!(reloaded.new_kids, both);
    assert_eq!(reloaded.signing_kid.as_deref(), Some(new_kid.as_str()));
    assert!(reloaded.needs_restart.is_empty());

    // Same connection, no restart: the JWKS has both keys, new tokens carry
    // the new kid, and tokens of the old key still verify.
    let keys = jwks(&mut c).await;
    assert_eq!(sorted_kids(&keys), both);
    let new_token = service_token(&mut c, &srv).await;
    assert_eq!(kid_of(&new_token), new_kid);
    let validator = Validator::new("auth-service", "inventory");
    for t in [&old_token, &new_token] {
        validator.validate(t, &keys, SystemClock.now_unix()).unwrap();
    }
    let http = reqwest_jwks(srv.http_addr).await;
    assert_eq!(sorted_kids(&KeySet::from_jwks_json(&http).unwrap()), both, "the HTTP JWKS follows too");
}

#[tokio::test]
async fn reload_applies_token_settings_and_the_directory_and_leaves_restart_only_keys() {
    let srv = TestServer::builder().keys_from_config().start().await;
    let mut c = client(&srv).await;
    assert_eq!(password_login(&mut c, &srv, "bob").await.unwrap(), 900);

    // New access TTL, bob removed from the users file, and a new issuer
    // (restart-only).
    edit_config(&srv, |t| {
        t.replace("user_audiences = [\"order\"]", "user_audiences = [\"order\"]\naccess_ttl_secs = 600")
            .replace("issuer = \"auth-service\"", "issuer = \"renamed\"")
    });
    let users = srv.dir.join("users.toml");
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&users).unwrap()).unwrap();
    let list = doc.get_mut("user").and_then(toml::Value::as_array_mut).unwrap();
    list.retain(|u| u.get("username").and_then(toml::Value::as_str) != Some("bob"));
    std::fs::write(&users, toml::to_string(&doc).unwrap()).unwrap();

    let reloaded = srv.reload().await.unwrap();
    assert_eq!(reloaded.needs_restart, ["issuer"]);
    assert_eq!(password_login(&mut c, &srv, "alice").await.unwrap(), 600);
    assert_eq!(password_login(&mut c, &srv, "bob").await.unwrap_err().code(), Code::Unauthenticated);
    let token = service_token(&mut c, &srv).await;
    let claims =
        Validator::new("auth-service", "inventory").validate(&token, &jwks(&mut c).await, SystemClock.now_unix());
    assert!(claims.is_ok(), "the issuer keeps its running value until a restart: {claims:?}");
}

#[tokio::test]
async fn a_reload_keeps_keys_given_to_the_builder() {
    // TestServer hands its own FileKeys to the builder by default.
    let srv = TestServer::start().await;
    let before = srv.core().policy();
    edit_config(&srv, |t| t.replace("keys/signing.pem", "keys/gone.pem"));
    // The key section is still validated, so a missing file is refused.
    assert!(srv.reload().await.is_err());
    edit_config(&srv, |t| t.replace("keys/gone.pem", "keys/signing.pem"));
    let reloaded = srv.reload().await.unwrap();
    assert!(Arc::ptr_eq(&before.keys, &srv.core().policy().keys), "the given keys stay");
    assert_eq!(reloaded.old_kids, reloaded.new_kids);
}

#[tokio::test]
async fn layers_added_to_the_builder_see_every_rpc() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    let config = Config::load(&env.config_path, &Overrides::default()).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (count, log) = (Arc::clone(&seen), Arc::clone(&paths));
    let server = Server::builder(config)
        .layer(tower::ServiceBuilder::new().map_request(move |req: http::Request<tonic::body::Body>| {
            count.fetch_add(1, Ordering::SeqCst);
            req
        }))
        .layer(tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
            log.lock().unwrap().push(req.uri().path().to_owned());
            req
        }))
        .build()
        .await
        .unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(Listeners { grpc, http }, async move {
        let _ = stopped.await;
    }));

    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(env.ca_path())))
        .identity(Identity::from_pem(read(env.client_cert_path("order")), read(env.client_key_path("order"))))
        .domain_name("localhost");
    let channel =
        Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut c = AuthClient::new(channel);
    jwks(&mut c).await;
    let refused = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant {
                username: "alice".into(),
                password: "wrong".into(),
            })),
            audience: vec!["order".into()],
            scope: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "responses pass back through the layers unchanged");

    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(*paths.lock().unwrap(), ["/auth.v1.Auth/GetJwks", "/auth.v1.Auth/Login"]);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// `GET /.well-known/jwks.json` on the HTTP side port.
async fn reqwest_jwks(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
