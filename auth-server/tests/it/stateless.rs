//! State that scales: nothing is written per issued token unless
//! `tokens.record_issued` asks for it, and every token stays revocable
//! without a record: by presenting it, by its session, or by an admin's
//! `jti`, deny-listed for the longest a token can live.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, LoginRequest, RefreshRequest, RevokeRequest, TokenResponse, login_request,
    revoke_request::Target,
};
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::RecordIssued;
use auth_server::store::{MemoryStore, RevocationKind, Store};
use testkit::{HookedStore, Intercept, StoreCall, TestServer};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::flows::{bearer, claims_of, client, exchange_req, login_for, login_user};

/// The store calls made since the last [`Calls::take`], by kind. The
/// health probe's pings and the snapshot reads of the replica's own deny
/// set run on their own schedule, not per RPC, and are left out.
#[derive(Default)]
struct Calls(Mutex<BTreeMap<String, usize>>);

impl Calls {
    fn take(&self) -> BTreeMap<String, usize> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A memory store that counts the calls made on it.
fn counted() -> (Arc<dyn Store>, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let seen = Arc::clone(&calls);
    let store = HookedStore::new(Arc::new(MemoryStore::new()), move |call: StoreCall| {
        if !matches!(call, StoreCall::Ping | StoreCall::RevokedSnapshot) {
            *seen.0.lock().unwrap().entry(format!("{call:?}")).or_default() += 1;
        }
        Intercept::Pass
    });
    (Arc::new(store), calls)
}

fn calls(list: &[(&str, usize)]) -> BTreeMap<String, usize> {
    list.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

async fn service_login(c: &mut AuthClient<Channel>, srv: &TestServer, account: &str, aud: &str) -> TokenResponse {
    let (client_id, client_secret) = srv.client_credentials(account);
    c.login(LoginRequest {
        grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
        audience: vec![aud.into()],
        scope: vec![],
    })
    .await
    .expect("client-credentials login")
    .into_inner()
}

async fn revoke(c: &mut AuthClient<Channel>, target: Target, caller: Option<&str>) -> Result<String, Status> {
    let req = RevokeRequest { target: Some(target) };
    let req = match caller {
        Some(token) => bearer(req, token),
        None => tonic::Request::new(req),
    };
    c.revoke(req).await.map(|r| r.into_inner().revoked)
}

/// Whether the auth server itself now refuses `token` as revoked.
async fn refused_as_revoked(srv: &TestServer, token: &str) -> bool {
    let policy = srv.core().policy();
    match srv.core().verify_presented(&policy, token, None).await {
        Err(e) => e.public_message() == "token revoked",
        Ok(_) => false,
    }
}

#[tokio::test]
async fn issuing_a_token_writes_nothing_to_the_store_by_default() {
    let (store, calls_made) = counted();
    let srv = TestServer::builder().store(store).start().await;
    let mut c = client(&srv, "order").await;
    calls_made.take();

    for _ in 0..5 {
        c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap();
    }
    assert_eq!(calls_made.take(), calls(&[]), "ExchangeToken without a subject token");
    service_login(&mut c, &srv, "order", "inventory").await;
    assert_eq!(calls_made.take(), calls(&[]), "client-credentials Login");
    let alice = login_user(&mut c, &srv, "alice").await;
    assert_eq!(calls_made.take(), calls(&[("PutRefresh", 1)]), "password Login: its refresh token only");
    let next = c.refresh(RefreshRequest { refresh_token: alice.refresh_token }).await.unwrap().into_inner();
    assert_eq!(calls_made.take(), calls(&[("RefreshRecord", 1), ("CommitRefresh", 1)]), "Refresh");
    let jti = claims_of(&mut c, &next.access_token, "order").await.jti;
    let now = SystemClock.now_unix();
    assert_eq!(srv.core().store.issued(&jti, now).await.unwrap(), None, "the refreshed token is not on record");
    calls_made.take();
    for _ in 0..5 {
        c.exchange_token(exchange_req(&srv, "order", &next.access_token, "inventory")).await.unwrap();
    }
    assert!(!calls_made.take().contains_key("RecordIssued"), "ExchangeToken with a subject token writes nothing");
}

#[tokio::test]
async fn record_issued_all_records_every_token_and_sessions_only_those_of_a_session() {
    for (setting, service_recorded) in [(RecordIssued::All, true), (RecordIssued::Sessions, false)] {
        let (store, calls_made) = counted();
        let srv =
            TestServer::builder().store(store).configure(move |raw| raw.tokens.record_issued = setting).start().await;
        let mut c = client(&srv, "order").await;
        let alice = login_user(&mut c, &srv, "alice").await;
        let service = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap().into_inner();
        let obo = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
        let next = c.refresh(RefreshRequest { refresh_token: alice.refresh_token }).await.unwrap().into_inner();
        let now = SystemClock.now_unix();
        let store = &srv.core().store;
        for (what, token, aud, recorded) in [
            ("the user's token", &alice.access_token, "order", true),
            ("a service's own token", &service.access_token, "inventory", service_recorded),
            ("a token exchanged for the user", &obo.into_inner().access_token, "inventory", true),
            ("a refreshed token", &next.access_token, "order", true),
        ] {
            let claims = claims_of(&mut c, token, aud).await;
            let record = store.issued(&claims.jti, now).await.unwrap();
            assert_eq!(record.is_some(), recorded, "{setting:?}: {what}");
            if let Some(record) = record {
                assert_eq!((record.sub, record.sid, record.exp), (claims.sub, claims.sid, claims.exp), "{what}");
            }
        }
        assert!(calls_made.take().get("RecordIssued").copied().unwrap_or(0) >= 2, "{setting:?}");
    }
}

#[tokio::test]
async fn a_token_issued_without_a_registry_is_revoked_by_presenting_it_by_its_session_and_by_an_admins_jti() {
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = TestServer::builder().clock(Arc::new(clock.clone())).start().await;
    let mut c = client(&srv, "order").await;
    let t = srv.core().policy().tokens.clone();

    // Presenting it: the token carries its own exp and sub.
    let service = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap().into_inner();
    assert!(!refused_as_revoked(&srv, &service.access_token).await);
    assert_eq!(revoke(&mut c, Target::AccessToken(service.access_token.clone()), None).await.unwrap(), "jti");
    assert!(refused_as_revoked(&srv, &service.access_token).await, "revoked by presenting it");

    // By its session: the user's token and a token exchanged for it.
    let alice = login_user(&mut c, &srv, "alice").await;
    let obo = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    let obo = obo.into_inner().access_token;
    let own = login_for(&mut c, &srv, "alice", "auth-service").await;
    let sid = claims_of(&mut c, &alice.access_token, "order").await.sid.unwrap();
    // A session other than the caller's own: an admin ends it.
    let mut ac = client(&srv, "admin").await;
    let admin = service_login(&mut ac, &srv, "admin", "auth-service").await;
    assert_eq!(revoke(&mut ac, Target::Sid(sid), Some(&admin.access_token)).await.unwrap(), "session");
    assert!(refused_as_revoked(&srv, &alice.access_token).await, "the user's token, by its sid");
    assert!(refused_as_revoked(&srv, &obo).await, "a token exchanged for the user, by its sid");
    assert!(!refused_as_revoked(&srv, &own.access_token).await, "another session lives on");
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token revoked"));

    // By an admin's jti, never recorded: denied for the longest a token
    // can live, plus the verifiers' leeway.
    let other = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap().into_inner();
    let jti = claims_of(&mut c, &other.access_token, "inventory").await.jti;
    let now = clock.now_unix();
    assert_eq!(srv.core().store.issued(&jti, now).await.unwrap(), None, "not on record");
    assert_eq!(revoke(&mut ac, Target::Jti(jti.clone()), Some(&admin.access_token)).await.unwrap(), "jti");
    assert!(refused_as_revoked(&srv, &other.access_token).await, "revoked by an admin's jti");
    let entry = srv.core().store.revoked_snapshot(now).await.unwrap();
    let entry = entry.iter().find(|r| r.kind == RevocationKind::Jti && r.id == jti).expect("the deny entry");
    let longest = t.access_ttl_secs.max(t.exchange_max_ttl_secs) + t.verifier_leeway_secs;
    assert_eq!(entry.expires_at, now + longest);
}

#[tokio::test]
async fn an_owners_revoke_by_jti_needs_the_token_itself_unless_every_token_is_recorded() {
    // The default: no registry, so nothing shows the jti is the caller's.
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let own = login_for(&mut c, &srv, "alice", "auth-service").await;
    let jti = claims_of(&mut c, &alice.access_token, "order").await.jti;
    let err = revoke(&mut c, Target::Jti(jti.clone()), Some(&own.access_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("presenting it"), "{err:?}");
    assert!(!refused_as_revoked(&srv, &alice.access_token).await);
    // Presenting the token itself works, and so does revoking one's own jti.
    assert_eq!(revoke(&mut c, Target::AccessToken(alice.access_token.clone()), None).await.unwrap(), "jti");
    assert!(refused_as_revoked(&srv, &alice.access_token).await);
    let own_jti = claims_of(&mut c, &own.access_token, "auth-service").await.jti;
    assert_eq!(revoke(&mut c, Target::Jti(own_jti), Some(&own.access_token)).await.unwrap(), "jti");

    // With every token recorded, the registry names the owner.
    let srv = TestServer::builder().configure(|raw| raw.tokens.record_issued = RecordIssued::All).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let own = login_for(&mut c, &srv, "alice", "auth-service").await;
    let bob = login_user(&mut c, &srv, "bob").await;
    let jti = claims_of(&mut c, &alice.access_token, "order").await.jti;
    assert_eq!(revoke(&mut c, Target::Jti(jti), Some(&own.access_token)).await.unwrap(), "jti");
    assert!(refused_as_revoked(&srv, &alice.access_token).await);
    let bob_jti = claims_of(&mut c, &bob.access_token, "order").await.jti;
    let err = revoke(&mut c, Target::Jti(bob_jti), Some(&own.access_token)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, "not your token"));
}
