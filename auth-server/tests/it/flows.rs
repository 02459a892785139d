//! Every flow over real mTLS against a TestServer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, ExchangeTokenRequest, GetJwksRequest, LoginRequest, PasswordGrant, RefreshRequest,
    RevokeRequest, TokenResponse, login_request, revoke_request,
};
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::RecordIssued;
use service_sdk::{Claims, KeySet, Validator};
use testkit::TestServer;
use tonic::transport::Channel;
use tonic::{Code, Request};

pub(crate) async fn client(srv: &TestServer, name: &str) -> AuthClient<Channel> {
    AuthClient::new(srv.channel(name).await)
}

pub(crate) async fn login_user(c: &mut AuthClient<Channel>, srv: &TestServer, user: &str) -> TokenResponse {
    login_for(c, srv, user, "order").await
}

/// A password login for one audience (`auth-service`: a token for the auth
/// service itself, which may end its session).
pub(crate) async fn login_for(
    c: &mut AuthClient<Channel>,
    srv: &TestServer,
    user: &str,
    audience: &str,
) -> TokenResponse {
    let (username, password) = srv.user_password(user);
    c.login(LoginRequest {
        grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
        audience: vec![audience.into()],
        scope: vec![],
    })
    .await
    .expect("login")
    .into_inner()
}

pub(crate) fn exchange_req(srv: &TestServer, caller: &str, subject: &str, audience: &str) -> ExchangeTokenRequest {
    let (client_id, client_secret) = srv.client_credentials(caller);
    ExchangeTokenRequest {
        client_id,
        client_secret,
        subject_token: subject.into(),
        audience: audience.into(),
        scope: vec![],
        requested_ttl_seconds: 0,
    }
}

pub(crate) async fn jwks(c: &mut AuthClient<Channel>) -> KeySet {
    let json = c.get_jwks(GetJwksRequest {}).await.expect("jwks").into_inner().jwks_json;
    KeySet::from_jwks_json(&json).expect("parse jwks")
}

pub(crate) async fn claims_of(c: &mut AuthClient<Channel>, token: &str, audience: &str) -> Claims {
    let keys = jwks(c).await;
    Validator::new("auth-service", audience).validate(token, &keys, SystemClock.now_unix()).expect("valid token")
}

pub(crate) fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn password_login_issues_access_and_refresh_tokens() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let res = login_user(&mut c, &srv, "alice").await;
    assert_eq!(res.token_type, "Bearer");
    assert_eq!(res.expires_in, 900);
    assert!(res.refresh_token.len() >= 43, "refresh token carries >= 256 bits");
    let claims = claims_of(&mut c, &res.access_token, "order").await;
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.role.as_deref(), Some("customer"));
    assert!(claims.has_perm("orders:create"));
    assert!(claims.sid.is_some());
    assert_eq!(claims.jti.len(), 22, "128-bit jti, base64url");
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_refused_alike() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    for (username, password) in [("alice", "wrong"), ("mallory", "wrong")] {
        let err = c
            .login(LoginRequest {
                grant: Some(login_request::Grant::Password(PasswordGrant {
                    username: username.into(),
                    password: password.into(),
                })),
                audience: vec![],
                scope: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "invalid username or password");
    }
}

#[tokio::test]
async fn client_credentials_login_acts_as_the_service() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let (client_id, client_secret) = srv.client_credentials("order");
    let res = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
            })),
            audience: vec!["inventory".into()],
            scope: vec!["inventory:read".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(res.refresh_token.is_empty());
    let claims = claims_of(&mut c, &res.access_token, "inventory").await;
    assert_eq!(claims.sub, "svc:order");
    assert_eq!(claims.perms, vec!["inventory:read".to_string()]);
    let err = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
            audience: vec!["payments".into()],
            scope: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn exchange_for_allowed_audience_down_scopes_and_records_actor() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    // bob may only read inventory: the exchange never grants him reserve.
    let bob = login_user(&mut c, &srv, "bob").await;
    let res = c.exchange_token(exchange_req(&srv, "order", &bob.access_token, "inventory")).await.unwrap().into_inner();
    assert_eq!(res.issued_token_type, "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!(res.expires_in, 300);
    let claims = claims_of(&mut c, &res.access_token, "inventory").await;
    assert_eq!(claims.sub, "bob");
    assert_eq!(claims.aud, service_sdk::Audience::One("inventory".into()));
    assert_eq!(claims.perms, vec!["inventory:read".to_string()]);
    assert_eq!(claims.actor_chain(), vec!["svc:order"]);
    assert_eq!(claims.client_id, "order");

    // alice asks for reserve only: she gets reserve only.
    let alice = login_user(&mut c, &srv, "alice").await;
    let mut req = exchange_req(&srv, "order", &alice.access_token, "inventory");
    req.scope = vec!["inventory:reserve".into(), "admin:everything".into()];
    let res = c.exchange_token(req).await.unwrap().into_inner();
    assert_eq!(res.scope, vec!["inventory:reserve".to_string()]);
}

#[tokio::test]
async fn exchange_for_an_audience_off_the_allow_list_is_refused() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let err = c.exchange_token(exchange_req(&srv, "order", "", "payments")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn exchange_ttl_is_capped() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let mut req = exchange_req(&srv, "order", "", "inventory");
    req.requested_ttl_seconds = 60;
    assert_eq!(c.exchange_token(req.clone()).await.unwrap().into_inner().expires_in, 60);
    req.requested_ttl_seconds = 100_000;
    assert_eq!(c.exchange_token(req).await.unwrap().into_inner().expires_in, 600);
}

#[tokio::test]
async fn exchange_never_outlives_subject_token() {
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = TestServer::builder().clock(Arc::new(clock.clone())).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    clock.advance(900 - 100);
    let res = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    assert_eq!(res.into_inner().expires_in, 100);
}

#[tokio::test]
async fn expired_subject_token_is_refused() {
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = TestServer::builder().clock(Arc::new(clock.clone())).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    clock.advance(900 + 31);
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "token expired");
}

#[tokio::test]
async fn revoked_subject_token_is_refused() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let target = revoke_request::Target::AccessToken(alice.access_token.clone());
    c.revoke(RevokeRequest { target: Some(target) }).await.unwrap();
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "token revoked");
}

#[tokio::test]
async fn subject_token_from_a_foreign_issuer_is_refused() {
    let srv = TestServer::start().await;
    // Same keys, other issuer name: the signature verifies, the issuer does not.
    let other = TestServer::builder().dev_dir(&srv.dir).configure(|c| c.issuer = "evil-issuer".into()).start().await;
    let mut oc = client(&other, "order").await;
    let foreign = login_user(&mut oc, &other, "alice").await;
    let mut c = client(&srv, "order").await;
    let err = c.exchange_token(exchange_req(&srv, "order", &foreign.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "token from another issuer");
}

#[tokio::test]
async fn subject_token_must_be_addressed_to_the_caller() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let to_inventory =
        c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap().into_inner();
    // order holds a token addressed to inventory; it may not exchange it again.
    let mut ic = client(&srv, "order").await;
    let err =
        ic.exchange_token(exchange_req(&srv, "order", &to_inventory.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn act_chain_nests_and_the_depth_limit_holds() {
    let srv = TestServer::start().await;
    let mut oc = client(&srv, "order").await;
    let alice = login_user(&mut oc, &srv, "alice").await;
    let hop1 = oc.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    let hop1 = hop1.into_inner().access_token;
    let mut ic = client(&srv, "inventory").await;
    let hop2 = ic.exchange_token(exchange_req(&srv, "inventory", &hop1, "order")).await.unwrap().into_inner();
    let claims = claims_of(&mut ic, &hop2.access_token, "order").await;
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.actor_chain(), vec!["svc:inventory", "svc:order"]);
    assert!(claims.perms.is_empty(), "alice has no order:read, so nothing is granted");

    let shallow = TestServer::builder().dev_dir(&srv.dir).configure(|c| c.tokens.max_act_depth = 1).start().await;
    let mut oc = client(&shallow, "order").await;
    let alice = login_user(&mut oc, &shallow, "alice").await;
    let hop1 = oc.exchange_token(exchange_req(&shallow, "order", &alice.access_token, "inventory")).await.unwrap();
    let mut ic = client(&shallow, "inventory").await;
    let err = ic
        .exchange_token(exchange_req(&shallow, "inventory", &hop1.into_inner().access_token, "order"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "delegation chain too deep");
}

#[tokio::test]
async fn bound_account_refuses_its_secret_from_the_wrong_certificate() {
    let srv = TestServer::start().await;
    // The inventory certificate presenting order's (correct) secret.
    let mut c = client(&srv, "inventory").await;
    let err = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "invalid client credentials", "the same answer as a wrong secret");
    // The certificate alone authenticates its own account.
    let mut c = client(&srv, "order").await;
    let req = ExchangeTokenRequest { audience: "inventory".into(), ..Default::default() };
    assert!(c.exchange_token(req).await.is_ok());
}

#[tokio::test]
async fn refresh_rotates_and_the_old_token_is_spent() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let first = login_user(&mut c, &srv, "alice").await;
    let second = c.refresh(RefreshRequest { refresh_token: first.refresh_token.clone() }).await.unwrap().into_inner();
    assert_ne!(second.refresh_token, first.refresh_token);
    let old = claims_of(&mut c, &first.access_token, "order").await;
    let new = claims_of(&mut c, &second.access_token, "order").await;
    assert_eq!(new.sub, "alice");
    assert_eq!(new.sid, old.sid, "refresh stays in the login session");
    assert_ne!(new.jti, old.jti);
    let third = c.refresh(RefreshRequest { refresh_token: second.refresh_token.clone() }).await;
    assert!(third.is_ok());
}

#[tokio::test]
async fn refresh_token_reuse_revokes_family() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let first = login_user(&mut c, &srv, "alice").await;
    let second = c.refresh(RefreshRequest { refresh_token: first.refresh_token.clone() }).await.unwrap().into_inner();
    let reuse = c.refresh(RefreshRequest { refresh_token: first.refresh_token.clone() }).await.unwrap_err();
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert_eq!(reuse.message(), "refresh token reused; its family is revoked");
    // The legitimate successor is dead too.
    let err = c.refresh(RefreshRequest { refresh_token: second.refresh_token }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn revoking_an_own_token_by_jti_and_session_logout() {
    // An owner's Revoke{jti} of another of its tokens rests on the registry
    // (without one it must present the token: `stateless::`).
    let srv = TestServer::builder().configure(|raw| raw.tokens.record_issued = RecordIssued::All).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let claims = claims_of(&mut c, &alice.access_token, "order").await;
    // A token for the auth service itself may act on alice's other tokens.
    let second = login_for(&mut c, &srv, "alice", "auth-service").await;
    // Revoke the first token by jti, proving ownership with the second.
    let r = c
        .revoke(bearer(
            RevokeRequest { target: Some(revoke_request::Target::Jti(claims.jti.clone())) },
            &second.access_token,
        ))
        .await
        .unwrap();
    assert_eq!(r.into_inner().revoked, "jti");
    assert!(srv.core().store.is_revoked(&claims.jti, None, SystemClock.now_unix()).await.unwrap());

    // Logout: the session id of the second login, with its own token.
    let sid = claims_of(&mut c, &second.access_token, "auth-service").await.sid.unwrap();
    let r = c
        .revoke(bearer(RevokeRequest { target: Some(revoke_request::Target::Sid(sid)) }, &second.access_token))
        .await
        .unwrap();
    assert_eq!(r.into_inner().revoked, "session");
    let err = c.refresh(RefreshRequest { refresh_token: second.refresh_token }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "logout stops the session's refresh token");
    let err =
        c.revoke(bearer(RevokeRequest { target: Some(revoke_request::Target::Jti(claims.jti)) }, &second.access_token));
    assert_eq!(err.await.unwrap_err().message(), "token revoked", "the session's tokens are revoked");
}

#[tokio::test]
async fn revoking_someone_elses_token_needs_admin() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let bob = login_user(&mut c, &srv, "bob").await;
    let alice_claims = claims_of(&mut c, &alice.access_token, "order").await;
    for target in [
        revoke_request::Target::Jti(alice_claims.jti.clone()),
        revoke_request::Target::Sid(alice_claims.sid.clone().unwrap()),
    ] {
        let err = c.revoke(bearer(RevokeRequest { target: Some(target) }, &bob.access_token)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    // No bearer at all.
    let err = c.revoke(RevokeRequest { target: Some(revoke_request::Target::Jti(alice_claims.jti.clone())) }).await;
    assert_eq!(err.unwrap_err().code(), Code::Unauthenticated);

    // The admin service account may.
    let (client_id, client_secret) = srv.client_credentials("admin");
    let mut ac = client(&srv, "admin").await;
    let admin = ac
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
            audience: vec!["auth-service".into()],
            scope: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let target = revoke_request::Target::Sid(alice_claims.sid.clone().unwrap());
    ac.revoke(bearer(RevokeRequest { target: Some(target) }, &admin.access_token)).await.unwrap();
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!(err.message(), "token revoked");
}

#[tokio::test]
async fn revoking_a_refresh_token_revokes_its_family() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let target = revoke_request::Target::RefreshToken(alice.refresh_token.clone());
    assert_eq!(c.revoke(RevokeRequest { target: Some(target) }).await.unwrap().into_inner().revoked, "family");
    let err = c.refresh(RefreshRequest { refresh_token: alice.refresh_token }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn every_issued_token_verifies_against_the_jwks_and_every_key_has_alg() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let json = c.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        assert_eq!(k["alg"], "ES256");
        assert_eq!(k["use"], "sig");
        assert!(k["kid"].as_str().is_some_and(|s| s.len() == 43));
        assert!(k.get("d").is_none(), "no private part is ever published");
    }
    // HTTP side port serves the same document.
    let http = http_get(srv.http_addr, "/.well-known/jwks.json").await;
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
    assert!(http.ends_with(&json), "HTTP JWKS equals GetJwks");
    let alice = login_user(&mut c, &srv, "alice").await;
    let ex = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    claims_of(&mut c, &alice.access_token, "order").await;
    claims_of(&mut c, &ex.into_inner().access_token, "inventory").await;
}

#[tokio::test]
async fn health_and_readiness_answer_on_the_side_port() {
    let srv = TestServer::start().await;
    assert!(http_get(srv.http_addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(srv.http_addr, "/readyz").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_the_server_survives() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let err = c.login(LoginRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.exchange_token(ExchangeTokenRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.revoke(RevokeRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.refresh(RefreshRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let huge = "A".repeat(9_000);
    let err = c.exchange_token(exchange_req(&srv, "order", &huge, "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.refresh(RefreshRequest { refresh_token: huge.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let too_big = "A".repeat(100_000);
    let err = c.refresh(RefreshRequest { refresh_token: too_big }).await.unwrap_err();
    assert!(matches!(err.code(), Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange), "{err:?}");
    for nonsense in ["", "..", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", "\u{0}\u{1}", "not a token at all"] {
        if nonsense.is_empty() {
            continue;
        }
        let err = c.exchange_token(exchange_req(&srv, "order", nonsense, "inventory")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{nonsense:?}");
        let target = revoke_request::Target::AccessToken(nonsense.into());
        let err = c.revoke(RevokeRequest { target: Some(target) }).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{nonsense:?}");
        let err = c.refresh(RefreshRequest { refresh_token: nonsense.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{nonsense:?}");
    }
    // Still serving.
    login_user(&mut c, &srv, "alice").await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn watch_revocations_sends_snapshot_then_events_then_heartbeats() {
    use auth_proto::auth::v1::{RevocationKind, WatchRevocationsRequest, revocation_event::Event};
    let srv = TestServer::builder().configure(|c| c.watch.heartbeat_secs = 1).start().await;
    let mut c = client(&srv, "order").await;
    let before = login_user(&mut c, &srv, "alice").await;
    let before_jti = claims_of(&mut c, &before.access_token, "order").await.jti;
    let target = revoke_request::Target::AccessToken(before.access_token.clone());
    c.revoke(RevokeRequest { target: Some(target) }).await.unwrap();

    let mut stream = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap().event.unwrap();
    let Event::Snapshot(snap) = first else { panic!("first message must be the snapshot: {first:?}") };
    assert!(snap.entries.iter().any(|e| e.id == before_jti && e.kind == RevocationKind::Jti as i32));

    let after = login_user(&mut c, &srv, "alice").await;
    let sid = claims_of(&mut c, &after.access_token, "order").await.sid.unwrap();
    let logout = RevokeRequest { target: Some(revoke_request::Target::SessionRefreshToken(after.refresh_token)) };
    assert_eq!(c.revoke(logout).await.unwrap().into_inner().revoked, "session");
    let mut saw_event = false;
    let mut saw_heartbeat = false;
    while !(saw_event && saw_heartbeat) {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            Event::Revoked(r) => {
                assert_eq!(r.id, sid);
                assert_eq!(r.kind, RevocationKind::Sid as i32);
                assert!(r.expires_at > SystemClock.now_unix());
                saw_event = true;
            }
            Event::Heartbeat(h) => {
                assert!(h.server_time > 0);
                saw_heartbeat = true;
            }
            Event::Snapshot(_) => panic!("only one snapshot per stream"),
        }
    }
}
