//! Who may do what at the auth service: the revocation rule, per-audience
//! service grants, certificate-bound accounts, request limits and the
//! lifetime of exchanged tokens. Each test states the attack or defect it
//! pins, over real mTLS against a TestServer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, LoginRequest, PasswordGrant, RefreshRequest, RevokeRequest, TokenResponse, login_request,
    revoke_request::Target,
};
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::{Config, Overrides, RecordIssued};
use auth_server::server::Server;
use testkit::TestServer;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::flows::{bearer, claims_of, client, exchange_req, login_for, login_user};

/// The auth service's own audience in the dev environment (the issuer).
const SELF: &str = "auth-service";

async fn revoke(c: &mut AuthClient<Channel>, target: Target, caller: Option<&str>) -> Result<String, Status> {
    let req = RevokeRequest { target: Some(target) };
    let req = match caller {
        Some(token) => bearer(req, token),
        None => tonic::Request::new(req),
    };
    c.revoke(req).await.map(|r| r.into_inner().revoked)
}

async fn service_login(
    c: &mut AuthClient<Channel>,
    srv: &TestServer,
    account: &str,
    audience: &[&str],
    scope: &[&str],
) -> Result<TokenResponse, Status> {
    let (client_id, client_secret) = srv.client_credentials(account);
    c.login(LoginRequest {
        grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
        audience: audience.iter().map(|s| s.to_string()).collect(),
        scope: scope.iter().map(|s| s.to_string()).collect(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// A dev environment whose accounts file `edit` changed before any server
/// reads it. Keep the returned directory alive as long as the server.
fn dev_env_with_accounts(edit: impl FnOnce(&mut Vec<toml::Table>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    auth_server::dev::ensure(tmp.path()).unwrap();
    let path = tmp.path().join("accounts.toml");
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut accounts: Vec<toml::Table> =
        doc["account"].as_array().unwrap().iter().map(|a| a.as_table().unwrap().clone()).collect();
    edit(&mut accounts);
    doc.insert("account".into(), toml::Value::Array(accounts.into_iter().map(toml::Value::Table).collect()));
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    tmp
}

fn account<'a>(accounts: &'a mut [toml::Table], client_id: &str) -> &'a mut toml::Table {
    accounts.iter_mut().find(|a| a["client_id"].as_str() == Some(client_id)).unwrap()
}

fn add_audience(accounts: &mut [toml::Table], client_id: &str, audience: &str, scopes: &[&str]) {
    let audiences = account(accounts, client_id).get_mut("audiences").unwrap().as_table_mut().unwrap();
    let scopes = scopes.iter().map(|s| toml::Value::String(s.to_string())).collect();
    audiences.insert(audience.into(), toml::Value::Array(scopes));
}

// ---------------------------------------------------------------------------
// Revocation: a token for another service cannot log a user out.

#[tokio::test]
async fn a_token_exchanged_for_another_service_cannot_log_the_user_out() {
    let srv = TestServer::start().await;
    let mut oc = client(&srv, "order").await;
    let alice = login_user(&mut oc, &srv, "alice").await;
    let alice_claims = claims_of(&mut oc, &alice.access_token, "order").await;
    // order exchanges alice's token for inventory, which now holds it.
    let held = oc.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    let held = held.into_inner().access_token;
    let held_claims = claims_of(&mut oc, &held, "inventory").await;
    assert_eq!(held_claims.sid, alice_claims.sid, "the exchanged token carries alice's session");

    // The attack: inventory ends alice's session with the token it holds.
    // Bound to order's certificate (RFC 8705), the token speaks for nobody
    // over inventory's.
    let mut ic = client(&srv, "inventory").await;
    let err = revoke(&mut ic, Target::Sid(alice_claims.sid.clone().unwrap()), Some(&held)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token bound to another certificate"));
    // Over the certificate it is bound to, the policy decides: a token for
    // another service ends no session and revokes no other token.
    let err = revoke(&mut oc, Target::Sid(alice_claims.sid.clone().unwrap()), Some(&held)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "a token for another service can revoke only itself");
    let err = revoke(&mut oc, Target::Jti(alice_claims.jti.clone()), Some(&held)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // alice is still logged in: her refresh and her token work.
    let next = oc.refresh(RefreshRequest { refresh_token: alice.refresh_token }).await.expect("alice still logged in");
    assert!(!next.into_inner().access_token.is_empty());
    oc.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.expect("token still live");

    // The token may revoke itself, and only that.
    assert_eq!(revoke(&mut oc, Target::Jti(held_claims.jti.clone()), Some(&held)).await.unwrap(), "jti");
    let now = SystemClock.now_unix();
    assert!(srv.core().store.is_revoked(&held_claims.jti, None, now).await.unwrap());
    assert!(!srv.core().store.is_revoked(&alice_claims.jti, alice_claims.sid.as_deref(), now).await.unwrap());
}

#[tokio::test]
async fn a_users_token_for_a_service_revokes_only_itself() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let first = login_user(&mut c, &srv, "alice").await;
    let second = login_user(&mut c, &srv, "alice").await;
    let first_claims = claims_of(&mut c, &first.access_token, "order").await;
    let second_claims = claims_of(&mut c, &second.access_token, "order").await;
    // A token addressed to order is in order's hands too.
    let err = revoke(&mut c, Target::Sid(second_claims.sid.clone().unwrap()), Some(&second.access_token)).await;
    assert_eq!(err.unwrap_err().code(), Code::PermissionDenied);
    let err = revoke(&mut c, Target::Jti(first_claims.jti.clone()), Some(&second.access_token)).await;
    assert_eq!(err.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(revoke(&mut c, Target::Jti(second_claims.jti), Some(&second.access_token)).await.unwrap(), "jti");
}

#[tokio::test]
async fn logout_by_refresh_token_ends_the_session() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let obo = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    let obo = obo.into_inner().access_token;
    let sid = claims_of(&mut c, &alice.access_token, "order").await.sid.unwrap();

    assert_eq!(
        revoke(&mut c, Target::SessionRefreshToken(alice.refresh_token.clone()), None).await.unwrap(),
        "session"
    );
    let now = SystemClock.now_unix();
    assert!(srv.core().store.is_revoked("any", Some(&sid), now).await.unwrap());
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.message(), "token revoked");
    let policy = srv.core().policy();
    let err = srv.core().verify_presented(&policy, &obo, Some("inventory")).await.unwrap_err();
    assert_eq!(err.public_message(), "token revoked", "tokens exchanged in the session die with it");
    let err = c.refresh(RefreshRequest { refresh_token: alice.refresh_token.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // An unknown refresh token proves nothing.
    let err = revoke(&mut c, Target::SessionRefreshToken("not-a-refresh-token".into()), None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_token_for_the_auth_service_manages_its_own_session_and_subject() {
    // Revoking another of one's tokens by jti alone rests on the registry.
    let srv = TestServer::builder().configure(|raw| raw.tokens.record_issued = RecordIssued::All).start().await;
    let mut c = client(&srv, "order").await;
    let for_order = login_user(&mut c, &srv, "alice").await;
    let order_jti = claims_of(&mut c, &for_order.access_token, "order").await.jti;
    let bob = login_user(&mut c, &srv, "bob").await;
    let bob_claims = claims_of(&mut c, &bob.access_token, "order").await;
    // Users may always log in for the auth service, and only for it alone.
    let own = login_for(&mut c, &srv, "alice", SELF).await;
    let own_claims = claims_of(&mut c, &own.access_token, SELF).await;
    let (username, password) = srv.user_password("alice");
    let err = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
            audience: vec!["order".into(), SELF.into()],
            scope: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // alice's other tokens: yes. bob's: no.
    assert_eq!(revoke(&mut c, Target::Jti(order_jti), Some(&own.access_token)).await.unwrap(), "jti");
    let err = revoke(&mut c, Target::Jti(bob_claims.jti), Some(&own.access_token)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, "not your token"));
    let err = revoke(&mut c, Target::Sid(bob_claims.sid.unwrap()), Some(&own.access_token)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, "not your session"));
    // Her own session: yes.
    let sid = own_claims.sid.unwrap();
    assert_eq!(revoke(&mut c, Target::Sid(sid), Some(&own.access_token)).await.unwrap(), "session");
}

#[tokio::test]
async fn the_admin_permission_works_only_in_a_token_for_the_auth_service() {
    // The admin account may also get tokens for inventory.
    let dir = dev_env_with_accounts(|accounts| add_audience(accounts, "admin", "inventory", &["inventory:read"]));
    let srv = TestServer::builder().dev_dir(dir.path()).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let sid = claims_of(&mut c, &alice.access_token, "order").await.sid.unwrap();

    let mut ac = client(&srv, "admin").await;
    let elsewhere = service_login(&mut ac, &srv, "admin", &["inventory"], &[]).await.unwrap();
    assert_eq!(elsewhere.scope, vec!["inventory:read".to_string()], "the account's perms stay at the auth service");
    let err = revoke(&mut ac, Target::Sid(sid.clone()), Some(&elsewhere.access_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let admin = service_login(&mut ac, &srv, "admin", &[SELF], &[]).await.unwrap();
    assert_eq!(admin.scope, vec!["auth:admin".to_string()]);
    assert_eq!(revoke(&mut ac, Target::Sid(sid), Some(&admin.access_token)).await.unwrap(), "session");
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.message(), "token revoked");
}

#[tokio::test]
async fn an_accounts_file_may_not_name_a_service_after_the_auth_service() {
    let dir = dev_env_with_accounts(|accounts| {
        account(accounts, "inventory").insert("client_id".into(), toml::Value::String(SELF.into()));
    });
    let config = Config::load(&dir.path().join("auth-server.toml"), &Overrides::default()).unwrap();
    let err = Server::builder(config).build().await.unwrap_err().to_string();
    assert!(err.contains("tokens.self_audience"), "{err}");
}

// ---------------------------------------------------------------------------
// Revoking a subject token's jti: only sid revocation cascades.

#[tokio::test]
async fn revoking_a_subject_tokens_jti_leaves_exchanged_tokens_and_logout_cascades() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let subject = claims_of(&mut c, &alice.access_token, "order").await;
    let obo = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    let obo = obo.into_inner().access_token;
    let obo_claims = claims_of(&mut c, &obo, "inventory").await;

    assert_eq!(revoke(&mut c, Target::AccessToken(alice.access_token.clone()), None).await.unwrap(), "jti");
    // The subject token can no longer be exchanged...
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.message(), "token revoked");
    // ...but a token exchanged from it lives on, for its short lifetime
    // (documented: a jti revocation revokes that token only).
    let policy = srv.core().policy();
    srv.core().verify_presented(&policy, &obo, Some("inventory")).await.expect("exchanged token lives on");
    assert!(obo_claims.exp <= subject.exp && obo_claims.exp - obo_claims.iat <= 600);
    // Ending the session revokes every token of it, exchanged ones too.
    assert_eq!(revoke(&mut c, Target::SessionRefreshToken(alice.refresh_token), None).await.unwrap(), "session");
    let err = srv.core().verify_presented(&policy, &obo, Some("inventory")).await.unwrap_err();
    assert_eq!(err.public_message(), "token revoked");
}

// ---------------------------------------------------------------------------
// Client-credentials Login with several audiences.

#[tokio::test]
async fn client_credentials_login_grants_per_audience() {
    let dir = dev_env_with_accounts(|accounts| {
        add_audience(accounts, "order", "billing", &["billing:charge"]);
        add_audience(accounts, "order", "ledger", &["inventory:read"]);
        account(accounts, "order").insert("perms".into(), toml::Value::Array(vec!["reports:read".into()]));
    });
    let srv = TestServer::builder().dev_dir(dir.path()).start().await;
    let mut c = client(&srv, "order").await;
    // Different scope sets for one token: refused, not merged.
    let err = service_login(&mut c, &srv, "order", &["inventory", "billing"], &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = service_login(&mut c, &srv, "order", &["inventory", "ledger"], &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Narrowed to a set both audiences grant: one token for both.
    let both = service_login(&mut c, &srv, "order", &["inventory", "ledger"], &["inventory:read"]).await.unwrap();
    assert_eq!(both.scope, vec!["inventory:read".to_string()]);
    // One audience: its own scopes only, never the account's perms.
    let one = service_login(&mut c, &srv, "order", &["billing"], &[]).await.unwrap();
    assert_eq!(one.scope, vec!["billing:charge".to_string()]);
    let claims = claims_of(&mut c, &one.access_token, "billing").await;
    assert_eq!(claims.perms, vec!["billing:charge".to_string()]);
}

// ---------------------------------------------------------------------------
// Request limits before policy.

#[tokio::test]
async fn login_with_seventeen_audiences_is_an_invalid_argument() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let (username, password) = srv.user_password("alice");
    let login = |n: usize| LoginRequest {
        grant: Some(login_request::Grant::Password(PasswordGrant {
            username: username.clone(),
            password: password.clone(),
        })),
        audience: (0..n).map(|i| format!("aud-{i}")).collect(),
        scope: vec![],
    };
    let err = c.login(login(17)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Sixteen unknown audiences pass the size check and meet the policy.
    let err = c.login(login(16)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let (client_id, client_secret) = srv.client_credentials("order");
    let err = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
            audience: (0..17).map(|i| format!("aud-{i}")).collect(),
            scope: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

// ---------------------------------------------------------------------------
// Certificate-bound accounts.

#[tokio::test]
async fn two_accounts_with_one_certificate_identity_are_refused_at_start() {
    let dir = dev_env_with_accounts(|accounts| {
        let order_identity = account(accounts, "order")["mtls_identity"].clone();
        account(accounts, "inventory").insert("mtls_identity".into(), order_identity);
    });
    let config = Config::load(&dir.path().join("auth-server.toml"), &Overrides::default()).unwrap();
    let err = Server::builder(config).build().await.unwrap_err().to_string();
    assert!(err.contains("\"order\"") && err.contains("\"inventory\""), "names both accounts: {err}");
    assert!(err.contains("mtls_identity"), "{err}");
}

#[tokio::test]
async fn a_right_secret_from_the_wrong_certificate_is_answered_like_a_wrong_secret() {
    let srv = TestServer::start().await;
    // The inventory certificate presenting order's secret, right or wrong.
    let mut c = client(&srv, "inventory").await;
    let right = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap_err();
    let mut wrong_req = exchange_req(&srv, "order", "", "inventory");
    wrong_req.client_secret = "not-the-secret".into();
    let wrong = c.exchange_token(wrong_req).await.unwrap_err();
    assert_eq!((right.code(), right.message()), (wrong.code(), wrong.message()));
    assert_eq!(right.code(), Code::Unauthenticated);
}

// ---------------------------------------------------------------------------
// Exchanged-token lifetime: one clock reading per exchange.

/// A clock that, once stepping, moves one second forward on every reading:
/// a flow that reads it twice sees two different times.
#[derive(Clone)]
struct SteppingClock {
    base: ManualClock,
    stepping: Arc<AtomicBool>,
    steps: Arc<AtomicU64>,
}

impl Clock for SteppingClock {
    fn now_unix(&self) -> u64 {
        let moved = if self.stepping.load(Ordering::SeqCst) {
            self.steps.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.steps.load(Ordering::SeqCst)
        };
        self.base.now_unix() + moved
    }
}

#[tokio::test]
async fn an_exchanged_token_never_outlives_its_subject_even_as_the_clock_moves() {
    let clock = SteppingClock {
        base: ManualClock::new(SystemClock.now_unix()),
        stepping: Arc::new(AtomicBool::new(false)),
        steps: Arc::new(AtomicU64::new(0)),
    };
    let srv = TestServer::builder().clock(Arc::new(clock.clone())).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let subject = claims_of(&mut c, &alice.access_token, "order").await;
    // 100 s of alice's token left: less than the default exchange TTL.
    clock.base.advance(900 - 100);
    clock.stepping.store(true, Ordering::SeqCst);
    let res = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    clock.stepping.store(false, Ordering::SeqCst);
    let res = res.into_inner();
    let keys = crate::flows::jwks(&mut c).await;
    let exchanged = service_sdk::Validator::new("auth-service", "inventory")
        .validate(&res.access_token, &keys, clock.now_unix())
        .unwrap();
    assert!(exchanged.exp <= subject.exp, "exchanged exp {} > subject exp {}", exchanged.exp, subject.exp);
    assert_eq!(u64::from(res.expires_in), exchanged.exp - exchanged.iat);
}

// ---------------------------------------------------------------------------
// Heartbeat versus the verifiers' stale bound.

#[tokio::test]
async fn a_heartbeat_slower_than_a_third_of_the_sdk_stale_bound_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(tmp.path()).unwrap();
    let stale = service_sdk::FeedOptions::default().stale_after.as_secs();
    let load =
        |secs: u64| Config::load_with(&env.config_path, &Overrides::default(), |raw| raw.watch.heartbeat_secs = secs);
    assert_eq!(load(stale / 3).unwrap().watch.heartbeat_secs, stale / 3);
    let err = load(stale / 3 + 1).unwrap_err();
    assert_eq!(err.keys(), ["watch.heartbeat_secs"]);
    assert!(err.to_string().contains(&format!("{} s", stale)), "names the stale bound: {err}");
}
