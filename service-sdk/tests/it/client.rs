//! Client side: credentials, token source, AuthChannel, against a real
//! auth-server over mTLS.
//!
//! Downstream services are stub `auth.v1.Auth` servers (the only proto at
//! hand) served over mTLS behind [`RequireAuthLayer`]: `inventory` echoes the
//! claims it verified from `GetJwks`; `order` answers `GetJwks` by calling
//! `inventory` on behalf of its own caller.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::pki::replace_atomically;
use crate::stub::{self, Protected};
use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use serde_json::json;
use service_sdk::verify::JwksError;
use service_sdk::{
    Audience, AuthChannel, Claims, ClientCredentials, Clock, ExchangeRequest, FileCredentials, JwksSource, KeySet,
    MtlsFiles, RequireAuthLayer, TlsError, TokenError, TokenSource, Validator, Verifier,
};
use testkit::TestServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// One manual clock read by the auth server and by the SDK.
#[derive(Clone)]
pub(crate) struct TestClock(pub(crate) testkit::auth_server::clock::ManualClock);

impl TestClock {
    pub(crate) fn at_now() -> Self {
        Self(testkit::auth_server::clock::ManualClock::new(now()))
    }
    pub(crate) fn advance(&self, secs: u64) {
        self.0.advance(secs);
    }
    pub(crate) fn server(&self) -> testkit::auth_server::clock::SharedClock {
        Arc::new(self.0.clone())
    }
    pub(crate) fn sdk(&self) -> Arc<dyn Clock> {
        Arc::new(self.clone())
    }
}

impl Clock for TestClock {
    fn now_unix(&self) -> u64 {
        self.0.now_unix()
    }
}

/// Waits (bounded) until `cond` holds; panics naming `what` otherwise.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The mTLS files of dev client `name`.
pub(crate) fn mtls(dir: &Path, name: &str) -> MtlsFiles {
    MtlsFiles::new(
        dir.join("ca.pem"),
        dir.join(format!("clients/{name}.pem")),
        dir.join(format!("clients/{name}-key.pem")),
    )
}

/// An mTLS channel as dev client `name` to a server on `addr`.
pub(crate) fn channel_to(dir: &Path, name: &str, addr: SocketAddr) -> Channel {
    mtls(dir, name).channel(&format!("https://{addr}"), "localhost").unwrap()
}

pub(crate) fn creds(srv: &TestServer, name: &str) -> ClientCredentials {
    let (id, secret) = srv.client_credentials(name);
    ClientCredentials::new(id, secret)
}

/// A token source for dev account `name` with a fast renewer.
fn source(srv: &TestServer, name: &str, clock: &TestClock) -> TokenSource {
    TokenSource::builder(channel_to(&srv.dir, name, srv.grpc_addr), creds(srv, name))
        .clock(clock.sdk())
        .renew_check_interval(Duration::from_millis(10))
        .build()
}

/// Verifies `token` as `audience` against the JWKS of the server at `addr`
/// (dev environment in `dir`), fetched with `GetJwks`.
pub(crate) async fn verify_with(
    dir: &Path,
    addr: SocketAddr,
    issuer: &str,
    token: &str,
    audience: &str,
    at: u64,
) -> Claims {
    let mut auth = AuthClient::new(channel_to(dir, "order", addr));
    let jwks = auth.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let keys = KeySet::from_jwks_json(&jwks).unwrap();
    Validator::new(issuer, audience).validate(token, &keys, at).unwrap()
}

/// Verifies `token` as `audience` against the test server's JWKS.
pub(crate) async fn verify(srv: &TestServer, token: &str, audience: &str, at: u64) -> Claims {
    verify_with(&srv.dir, srv.grpc_addr, &srv.config().issuer, token, audience, at).await
}

async fn login_alice(srv: &TestServer) -> String {
    let (username, password) = srv.user_password("alice");
    let mut auth = AuthClient::new(channel_to(&srv.dir, "order", srv.grpc_addr));
    let req = pb::LoginRequest {
        grant: Some(pb::login_request::Grant::Password(pb::PasswordGrant { username, password })),
        audience: vec!["order".into()],
        scope: vec![],
    };
    auth.login(req).await.unwrap().into_inner().access_token
}

// ---------------------------------------------------------------------------
// Credentials files

fn write_json(path: &Path, id: &str, secret: &str) {
    std::fs::write(path, json!({ "client_id": id, "client_secret": secret }).to_string()).unwrap();
}

#[tokio::test]
async fn file_credentials_follow_an_atomic_rename() {
    let srv = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.json");
    let (id, secret) = srv.client_credentials("order");
    write_json(&path, &id, "stale-secret-from-before-rotation");
    let source = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), FileCredentials::document(&path))
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();

    let err = source.token("inventory").await.unwrap_err();
    assert_eq!(
        err,
        TokenError::CredentialsRejected {
            audience: "inventory".into(),
            reason: "Unauthenticated: invalid client credentials".into(),
        }
    );

    replace_atomically(&path, &json!({ "client_id": id, "client_secret": secret }).to_string());
    let token = source.token("inventory").await.unwrap();
    let claims = verify(&srv, token.as_str(), "inventory", now()).await;
    assert_eq!(claims.sub, "svc:order");
}

#[tokio::test]
async fn file_credentials_never_read_a_half_written_in_place_rewrite() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.json");
    write_json(&path, "order", "old-secret");
    let creds = FileCredentials::document(&path);
    let first = service_sdk::Credentials::current(&creds).await.unwrap();
    assert_eq!(first, ClientCredentials::new("order", "old-secret"));

    let new = json!({ "client_id": "order", "client_secret": "new-secret-0123456789" }).to_string();
    let (head, tail) = new.split_at(new.len() / 2);
    // In place: same inode, truncated, then written in two steps.
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    for _ in 0..3 {
        let during = service_sdk::Credentials::current(&creds).await.unwrap();
        assert_eq!(during, first, "a half-written file must not replace the credentials");
        assert_eq!(service_sdk::Credentials::refresh(&creds).await.unwrap(), first);
    }
    f.write_all(tail.as_bytes()).unwrap();
    f.flush().unwrap();
    drop(f);
    let after = service_sdk::Credentials::current(&creds).await.unwrap();
    assert_eq!(after, ClientCredentials::new("order", "new-secret-0123456789"));
}

#[tokio::test]
async fn secret_volume_pair_is_reread_after_a_symlink_swap() {
    // The layout of a Kubernetes Secret volume: files are symlinks through
    // `..data`, which is swapped atomically on update.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write_version = |name: &str, secret: &str| {
        let v = root.join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("client_id"), "order\n").unwrap();
        std::fs::write(v.join("client_secret"), format!("{secret}\n")).unwrap();
    };
    write_version("..v1", "first");
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/client_id", root.join("client_id")).unwrap();
    std::os::unix::fs::symlink("..data/client_secret", root.join("client_secret")).unwrap();
    let creds = FileCredentials::secret_volume(root);
    let got = service_sdk::Credentials::current(&creds).await.unwrap();
    assert_eq!(got, ClientCredentials::new("order", "first"));

    write_version("..v2", "second");
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    let got = service_sdk::Credentials::current(&creds).await.unwrap();
    assert_eq!(got, ClientCredentials::new("order", "second"));
}

// ---------------------------------------------------------------------------
// Token source

#[tokio::test]
async fn concurrent_first_calls_share_one_exchange() {
    let srv = TestServer::start().await;
    let clock = TestClock::at_now();
    let source = source(&srv, "order", &clock);
    let calls = (0..100).map(|_| {
        let s = source.clone();
        tokio::spawn(async move { s.token("inventory").await.unwrap().as_str().to_owned() })
    });
    let tokens: Vec<String> = futures_util::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();
    assert!(tokens.iter().all(|t| t == &tokens[0]), "every caller got the one exchanged token");
    let stats = source.stats();
    assert_eq!(stats.exchanges, 1, "{stats:?}");
    assert!(stats.waited <= 100, "{stats:?}");
}

#[tokio::test]
async fn tokens_are_renewed_in_the_background_before_expiry() {
    let clock = TestClock::at_now();
    let srv = TestServer::builder().clock(clock.server()).start().await;
    let source = source(&srv, "order", &clock);
    let first = source.token("inventory").await.unwrap();
    let life = first.expires_at() - clock.now_unix();
    assert!(life >= 60, "server default lifetime is minutes, got {life}s");

    // 85% of the life: past the renewal point (75% ± 5%), well before expiry.
    clock.advance(life * 85 / 100);
    eventually("a background renewal", || source.stats().renewals >= 1).await;
    eventually("the renewed token in the cache", || {
        source.cached("inventory").is_some_and(|t| t.as_str() != first.as_str())
    })
    .await;
    let second = source.token("inventory").await.unwrap();
    assert!(second.expires_at() > first.expires_at());
    assert_eq!(source.stats().waited, 1, "only the very first call waited on an exchange");
    let claims = verify(&srv, second.as_str(), "inventory", clock.now_unix()).await;
    assert_eq!(claims.aud, Audience::One("inventory".into()));
}

#[tokio::test]
async fn cached_token_is_served_while_auth_is_down() {
    let clock = TestClock::at_now();
    let srv = TestServer::builder().clock(clock.server()).start().await;
    let source = source(&srv, "order", &clock);
    let token = source.token("inventory").await.unwrap();
    let life = token.expires_at() - clock.now_unix();
    srv.shutdown().await;

    clock.advance(life * 85 / 100);
    eventually("a failed renewal attempt", || source.stats().failures >= 1).await;
    for _ in 0..10 {
        let served = source.token("inventory").await.unwrap();
        assert_eq!(served.as_str(), token.as_str());
    }
    assert_eq!(source.stats().waited, 1);
}

#[tokio::test]
async fn expired_token_is_never_served_while_auth_is_down() {
    let clock = TestClock::at_now();
    let srv = TestServer::builder().clock(clock.server()).start().await;
    let source = source(&srv, "order", &clock);
    let token = source.token("inventory").await.unwrap();
    srv.shutdown().await;

    clock.advance(token.expires_at() - clock.now_unix());
    assert!(source.cached("inventory").is_none());
    let err = source.token("inventory").await.unwrap_err();
    assert!(matches!(err, TokenError::Unavailable { ref audience, .. } if audience == "inventory"), "{err:?}");
    assert!(err.is_unavailable());
    let msg = err.to_string();
    assert!(msg.contains("unavailable") && msg.contains("no unexpired token"), "{msg}");
    let status = Status::from(err);
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn on_behalf_of_token_names_the_user_as_subject_and_the_service_as_actor() {
    let srv = TestServer::start().await;
    let clock = TestClock::at_now();
    let source = source(&srv, "order", &clock);
    let user_token = login_alice(&srv).await;
    let user = verify(&srv, &user_token, "order", now()).await;

    let token = source.token_for("inventory").on_behalf_of(&user_token).await.unwrap();
    let claims = verify(&srv, token.as_str(), "inventory", now()).await;
    assert_eq!(claims.sub, user.sub);
    assert_eq!(claims.aud, Audience::One("inventory".into()));
    assert_eq!(claims.actor_chain(), vec!["svc:order"]);
    assert!(claims.exp <= user.exp, "never outlives the user's token");

    let again = source.token_for("inventory").on_behalf_of(&user_token).await.unwrap();
    assert_eq!(again.as_str(), token.as_str(), "cached per (audience, user token)");
    let own = source.token("inventory").await.unwrap();
    assert_ne!(own.as_str(), token.as_str(), "the service's own token is a separate entry");
    assert_eq!(source.stats().exchanges, 2);
}

#[tokio::test]
async fn audience_outside_the_policy_is_permission_denied() {
    let srv = TestServer::start().await;
    let source = source(&srv, "order", &TestClock::at_now());
    let err = source.token("admin").await.unwrap_err();
    let reason = "PermissionDenied: audience not allowed for this account".into();
    assert_eq!(err, TokenError::PermissionDenied { audience: "admin".into(), reason });
}

#[tokio::test]
async fn exchange_back_off_is_timed_on_the_source_clock() {
    let clock = TestClock::at_now();
    let srv = TestServer::builder().clock(clock.server()).start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.json");
    let (id, secret) = srv.client_credentials("order");
    write_json(&path, &id, "stale-secret-from-before-rotation");
    let source = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), FileCredentials::document(&path))
        .clock(clock.sdk())
        .backoff(Duration::from_secs(4), Duration::from_secs(60))
        .build();

    let refused = TokenError::CredentialsRejected {
        audience: "inventory".into(),
        reason: "Unauthenticated: invalid client credentials".into(),
    };
    assert_eq!(source.token("inventory").await.unwrap_err(), refused);
    replace_atomically(&path, &json!({ "client_id": id, "client_secret": secret }).to_string());
    // The first delay is 2 to 4 s of the source clock, which stands still:
    // the call fails at once with the last error, without an exchange.
    let exchanges = source.stats().exchanges;
    assert_eq!(source.token("inventory").await.unwrap_err(), refused);
    assert_eq!(source.stats().exchanges, exchanges, "no exchange while backing off");

    clock.advance(4);
    let token = source.token("inventory").await.unwrap();
    assert_eq!(verify(&srv, token.as_str(), "inventory", clock.now_unix()).await.sub, "svc:order");
}

#[tokio::test]
async fn exchange_layers_see_every_call_to_the_auth_service() {
    let srv = TestServer::start().await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = {
        let seen = Arc::clone(&seen);
        tower::util::MapRequestLayer::new(move |mut req: ExchangeRequest| {
            seen.lock().unwrap().push((req.audience.clone(), req.subject_token.is_some()));
            req.metadata.insert("x-request-id", tonic::metadata::MetadataValue::from_static("exchange-1"));
            req
        })
    };
    let source =
        TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), creds(&srv, "order")).layer(record).build();
    let user_token = login_alice(&srv).await;

    let own = source.token("inventory").await.unwrap();
    let delegated = source.token_for("inventory").on_behalf_of(&user_token).await.unwrap();
    source.token("inventory").await.unwrap();
    assert_eq!(verify(&srv, own.as_str(), "inventory", now()).await.sub, "svc:order");
    assert_eq!(verify(&srv, delegated.as_str(), "inventory", now()).await.actor_chain(), vec!["svc:order"]);
    assert_eq!(*seen.lock().unwrap(), [("inventory".to_owned(), false), ("inventory".to_owned(), true)]);
    assert_eq!(source.stats().exchanges, 2);
}

// ---------------------------------------------------------------------------
// mTLS files

#[tokio::test]
async fn channels_refuse_every_scheme_but_https_naming_the_uri() {
    let dev = tempfile::tempdir().unwrap();
    testkit::auth_server::dev::ensure(dev.path()).unwrap();
    let files = mtls(dev.path(), "order");
    // A listener that would see tonic's cleartext HTTP/2 if it were allowed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for uri in [
        format!("http://{addr}"),
        format!("HTTP://{addr}"),
        format!("grpc://{addr}"),
        format!("{addr}"),
        "unix:/run/auth.sock".to_owned(),
        "https://".to_owned(),
    ] {
        let err = files.channel(&uri, "localhost").map(|_| ()).unwrap_err();
        assert!(matches!(err, TlsError::NotHttps { .. }), "{uri}: {err:?}");
        assert!(err.to_string().contains(&format!("{uri:?}")), "{uri}: {err}");
        let err = files.watch(&uri, "localhost", Duration::from_millis(10), |_| {}).map(|_| ()).unwrap_err();
        assert!(matches!(err, TlsError::NotHttps { .. }), "{uri}: {err:?}");
    }
    let plain = format!("http://{addr}/.well-known/jwks.json");
    let err = JwksSource::https(&plain, &std::fs::read_to_string(dev.path().join("ca.pem")).unwrap()).unwrap_err();
    assert_eq!(err, JwksError::NotHttps(plain.clone()));
    assert!(err.to_string().contains(&plain), "{err}");
    // Nothing was sent anywhere.
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "a connection was opened");
}

#[tokio::test]
async fn mtls_watch_builds_a_new_channel_after_rotation_on_disk() {
    let srv = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(srv.dir.join("ca.pem"), &ca).unwrap();
    // Start with an identity from a foreign CA: the auth server refuses it.
    let foreign = rcgen::generate_simple_self_signed(vec!["order".to_owned()]).unwrap();
    std::fs::write(&cert, foreign.cert.pem()).unwrap();
    std::fs::write(&key, foreign.signing_key.serialize_pem()).unwrap();
    let files = MtlsFiles::new(&ca, &cert, &key);
    let uri = format!("https://{}", srv.grpc_addr);
    let source = TokenSource::builder(files.channel(&uri, "localhost").unwrap(), creds(&srv, "order"))
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();
    let err = source.token("inventory").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = files
        .watch(&uri, "localhost", Duration::from_millis(10), move |ch| {
            let _ = tx.send(ch);
        })
        .unwrap();
    // Rotate to order's real identity, each file replaced by rename.
    for (from, to) in [("clients/order-key.pem", &key), ("clients/order.pem", &cert)] {
        let tmp = dir.path().join("next.tmp");
        std::fs::copy(srv.dir.join(from), &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    // The watcher may have fired between the two renames too: keep taking
    // the newest channel until one carries the new identity.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let channel = tokio::time::timeout_at(deadline.into(), rx.recv()).await.unwrap().unwrap();
        source.set_auth_channel(channel);
        if let Ok(token) = source.token("inventory").await {
            assert_eq!(verify(&srv, token.as_str(), "inventory", now()).await.sub, "svc:order");
            break;
        }
    }
    watcher.abort();
}

// ---------------------------------------------------------------------------
// AuthChannel to downstream services behind the verify layer

/// A downstream service.
pub(crate) enum Stub {
    /// `inventory`: echoes the verified claims of each `GetJwks` call.
    Inventory,
    /// `order`: answers `GetJwks` by calling inventory on behalf of its
    /// caller.
    Order { inventory: AuthChannel },
}

#[tonic::async_trait]
impl Protected for Stub {
    async fn get_jwks(&self, req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        match self {
            Stub::Inventory => {
                let claims = Claims::from_request(&req)?;
                Ok(Response::new(pb::GetJwksResponse { jwks_json: serde_json::to_string(claims).unwrap() }))
            }
            Stub::Order { inventory } => {
                // The one line: call inventory on behalf of this request's caller.
                let mut inventory = AuthClient::new(inventory.on_behalf_of(&req).await?);
                inventory.get_jwks(pb::GetJwksRequest {}).await
            }
        }
    }
}

/// Serves `svc` over mTLS (dev server certificate) behind a verifier for
/// `audience`.
pub(crate) async fn serve_behind_verifier<S>(
    srv: &TestServer,
    audience: &str,
    svc: S,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    S: Protected,
{
    let read = |p: &str| std::fs::read_to_string(srv.dir.join(p)).unwrap();
    let verifier = Verifier::builder(srv.config().issuer.clone(), audience)
        .channel(channel_to(&srv.dir, audience, srv.grpc_addr))
        .build()
        .unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("server.pem"), read("server-key.pem")))
        .client_ca_root(Certificate::from_pem(srv.ca_pem()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .layer(RequireAuthLayer::new(verifier))
        .add_service(stub::server(svc));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(TcpListenerStream::new(listener)).await.unwrap();
    });
    (addr, task)
}

pub(crate) fn echoed(resp: pb::GetJwksResponse) -> Claims {
    serde_json::from_str(&resp.jwks_json).unwrap()
}

#[tokio::test]
async fn auth_channel_calls_are_accepted_downstream_with_aud_exactly_the_target() {
    let srv = TestServer::start().await;
    let (inventory_addr, task) = serve_behind_verifier(&srv, "inventory", Stub::Inventory).await;
    let source = source(&srv, "order", &TestClock::at_now());
    let channel = AuthChannel::new(channel_to(&srv.dir, "order", inventory_addr), source.clone(), "inventory");
    let mut inventory = AuthClient::new(channel);

    for _ in 0..3 {
        let claims = echoed(inventory.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner());
        assert_eq!(claims.aud, Audience::One("inventory".into()));
        assert_eq!(claims.sub, "svc:order");
    }
    let stats = source.stats();
    assert_eq!((stats.exchanges, stats.waited), (1, 1), "{stats:?}");
    task.abort();
}

#[tokio::test]
async fn auth_channel_without_a_token_fails_with_the_exchange_status() {
    let srv = TestServer::start().await;
    let (admin_addr, task) = serve_behind_verifier(&srv, "admin", Stub::Inventory).await;
    let source = source(&srv, "order", &TestClock::at_now());
    let mut admin = AuthClient::new(AuthChannel::new(channel_to(&srv.dir, "order", admin_addr), source, "admin"));
    let status = admin.get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    task.abort();
}

#[tokio::test]
async fn handler_calls_downstream_on_behalf_of_its_caller_in_one_line() {
    let srv = TestServer::start().await;
    let (inventory_addr, inv_task) = serve_behind_verifier(&srv, "inventory", Stub::Inventory).await;
    let source = source(&srv, "order", &TestClock::at_now());
    let to_inventory = AuthChannel::new(channel_to(&srv.dir, "order", inventory_addr), source.clone(), "inventory");
    let (order_addr, order_task) = serve_behind_verifier(&srv, "order", Stub::Order { inventory: to_inventory }).await;

    let user_token = login_alice(&srv).await;
    let user = verify(&srv, &user_token, "order", now()).await;
    // The user's own client calls order with the user's token.
    let mut order = AuthClient::new(channel_to(&srv.dir, "admin", order_addr));
    let mut req = Request::new(pb::GetJwksRequest {});
    req.metadata_mut().insert("authorization", format!("Bearer {user_token}").parse().unwrap());
    let claims = echoed(order.get_jwks(req).await.unwrap().into_inner());
    assert_eq!(claims.sub, user.sub, "inventory sees the user as subject");
    assert_eq!(claims.actor_chain(), vec!["svc:order"], "and order as the actor");
    assert_eq!(claims.aud, Audience::One("inventory".into()));

    // Without a user token the order service refuses before calling out.
    let status = order.get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    inv_task.abort();
    order_task.abort();
}

/// What the user's client gets from order, calling inventory on the user's
/// behalf, when order's token source reaches the auth server as dev client
/// `channel_as` with `credentials`; and the error order's source logged.
async fn order_on_behalf_of_alice(
    srv: &TestServer,
    channel_as: &str,
    credentials: ClientCredentials,
) -> (Status, TokenError) {
    let (inventory_addr, inv_task) = serve_behind_verifier(srv, "inventory", Stub::Inventory).await;
    let source = TokenSource::builder(channel_to(&srv.dir, channel_as, srv.grpc_addr), credentials)
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();
    let to_inventory = AuthChannel::new(channel_to(&srv.dir, "order", inventory_addr), source.clone(), "inventory");
    let (order_addr, order_task) = serve_behind_verifier(srv, "order", Stub::Order { inventory: to_inventory }).await;
    let user_token = login_alice(srv).await;
    let mut req = Request::new(pb::GetJwksRequest {});
    req.metadata_mut().insert("authorization", format!("Bearer {user_token}").parse().unwrap());
    let status = AuthClient::new(channel_to(&srv.dir, "admin", order_addr)).get_jwks(req).await.unwrap_err();
    // The error the source logs (its `Display` is the log line's `error`).
    let logged = source.token_for("inventory").on_behalf_of(&user_token).await.unwrap_err();
    inv_task.abort();
    order_task.abort();
    (status, logged)
}

#[tokio::test]
async fn a_service_whose_own_credentials_are_refused_fails_its_caller_with_internal_not_unauthenticated() {
    let srv = TestServer::start().await;
    let (id, secret) = srv.client_credentials("order");
    for (case, channel_as, credentials) in [
        ("wrong secret", "order", ClientCredentials::new(id.clone(), "not-the-secret")),
        ("no such account", "order", ClientCredentials::new("payments", secret.clone())),
        ("another service's certificate", "inventory", ClientCredentials::new(id.clone(), secret.clone())),
    ] {
        let (status, logged) = order_on_behalf_of_alice(&srv, channel_as, credentials).await;
        // The user's token is fine: the user is not told otherwise.
        assert_eq!(status.code(), Code::Internal, "{case}: {status:?}");
        assert_eq!(status.message(), "this service's credentials were refused by the auth service", "{case}");
        // The service's log says whose fault, with the auth server's answer.
        assert!(matches!(logged, TokenError::CredentialsRejected { .. }), "{case}: {logged:?}");
        let line = logged.to_string();
        assert!(
            line.contains("own credentials") && line.contains("Unauthenticated: invalid client credentials"),
            "{case}: {line}"
        );
    }
    // With its own credentials right, order's call goes through.
    let (id, secret) = srv.client_credentials("order");
    let (inventory_addr, inv_task) = serve_behind_verifier(&srv, "inventory", Stub::Inventory).await;
    let source =
        TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), ClientCredentials::new(id, secret)).build();
    let mut inventory =
        AuthClient::new(AuthChannel::new(channel_to(&srv.dir, "order", inventory_addr), source, "inventory"));
    inventory.get_jwks(pb::GetJwksRequest {}).await.unwrap();
    inv_task.abort();
}

#[tokio::test]
async fn a_refused_user_token_stays_unauthenticated_with_the_servers_reason() {
    let srv = TestServer::start().await;
    let source = source(&srv, "order", &TestClock::at_now());
    // A token addressed to order, tampered with: the auth server refuses it
    // as the subject, and order's own credentials are fine.
    let user_token = login_alice(&srv).await;
    let (head, _) = user_token.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", "A".repeat(86));
    let err = source.token_for("inventory").on_behalf_of(&forged).await.unwrap_err();
    assert!(matches!(err, TokenError::Unauthenticated { .. }), "{err:?}");
    assert!(
        err.to_string().contains("user's token") && err.to_string().contains("Unauthenticated: invalid token"),
        "{err}"
    );
    assert_eq!(Status::from(err).code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_tls_name_mismatch_is_logged_with_the_expected_and_the_presented_names() {
    let srv = TestServer::start().await;
    // The dev auth server's certificate names localhost and 127.0.0.1, not
    // "auth".
    let wrong = mtls(&srv.dir, "inventory").channel(&format!("https://{}", srv.grpc_addr), "auth").unwrap();
    let err = JwksSource::grpc(wrong.clone()).fetch().await.unwrap_err();
    assert!(matches!(err, JwksError::Grpc { code: Code::Unavailable, .. }), "{err:?}");
    // The verifier's log line is this text.
    let line = err.to_string();
    assert!(line.contains("not valid for name \"auth\""), "the expected name: {line}");
    assert!(line.contains("localhost") && line.contains("127.0.0.1"), "the presented names: {line}");
    // The token source's too.
    let source = TokenSource::builder(wrong, creds(&srv, "inventory")).build();
    let line = source.token("order").await.unwrap_err().to_string();
    assert!(line.contains("not valid for name \"auth\"") && line.contains("localhost"), "{line}");
}
