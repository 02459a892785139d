//! State that scales: nothing is written per issued token unless
//! `tokens.record_issued` asks for it, and every token stays revocable
//! without a record: by presenting it, by its session, or by an admin's
//! `jti`, deny-listed for the longest a token can live. Tokens presented to
//! the auth server are checked against its own push-fed deny set, so
//! ExchangeToken makes no store call at all, and fails closed while that
//! set cannot be trusted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, LoginRequest, RefreshRequest, RevokeRequest, TokenResponse, login_request,
    revoke_request::Target,
};
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::{RecordIssued, RedisConfig};
use auth_server::store::{MemoryStore, RedisStore, RevocationKind, Store};
use testkit::{HookedStore, Intercept, RedisProcess, RedisReply, StoreCall, TcpProxy, TestServer};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::flows::{bearer, claims_of, client, exchange_req, login_for, login_user};
use crate::watch::replica;

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
    assert_eq!(calls_made.take(), calls(&[("CommitRefresh", 1)]), "Refresh: one store step");
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

// ---------------------------------------------------------------------------
// Presented tokens are checked against the replica's own deny set.

#[tokio::test]
async fn store_calls_per_rpc_none_for_exchange_with_or_without_a_subject_token() {
    let (store, calls_made) = counted();
    let srv = TestServer::builder().store(store).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    calls_made.take();

    for _ in 0..5 {
        c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap();
    }
    assert_eq!(calls_made.take(), calls(&[]), "ExchangeToken without a subject token");
    for _ in 0..5 {
        c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    }
    assert_eq!(calls_made.take(), calls(&[]), "ExchangeToken with a subject token");

    // Revoke by sid checks the caller's token locally too: its one write.
    let mut ac = client(&srv, "admin").await;
    let admin = service_login(&mut ac, &srv, "admin", "auth-service").await;
    let sid = claims_of(&mut c, &alice.access_token, "order").await.sid.unwrap();
    calls_made.take();
    assert_eq!(revoke(&mut ac, Target::Sid(sid), Some(&admin.access_token)).await.unwrap(), "session");
    assert_eq!(calls_made.take(), calls(&[("Revoke", 1)]), "Revoke by sid");
    // And the revocation made here is refused at once, from memory.
    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token revoked"));
    assert_eq!(calls_made.take(), calls(&[]), "a refused subject token is no store call either");
}

/// A Redis store with a short command timeout, its calls counted.
async fn counted_redis(url: String) -> (Arc<dyn Store>, Arc<Calls>) {
    let config = RedisConfig { url, command_timeout_ms: 500, ..RedisConfig::default() };
    let redis: Arc<dyn Store> = Arc::new(RedisStore::connect(&config).await.unwrap());
    let calls = Arc::new(Calls::default());
    let seen = Arc::clone(&calls);
    let store = HookedStore::new(redis, move |call: StoreCall| {
        if !matches!(call, StoreCall::Ping | StoreCall::RevokedSnapshot | StoreCall::DenyListSize) {
            *seen.0.lock().unwrap().entry(format!("{call:?}")).or_default() += 1;
        }
        Intercept::Pass
    });
    (Arc::new(store), calls)
}

/// Refresh and Revoke by refresh token (its family, or its session: logout)
/// each make exactly one store call, whatever the registry setting; the
/// refreshed token's registry entry, built by the store from the spent
/// token's record, matches the token.
async fn one_store_call_per_refresh_and_revoke_by_refresh_token(store: Arc<dyn Store>, calls_made: Arc<Calls>) {
    for setting in [RecordIssued::None, RecordIssued::Sessions] {
        let srv = TestServer::builder()
            .store(Arc::clone(&store))
            .configure(move |raw| raw.tokens.record_issued = setting)
            .start()
            .await;
        let mut c = client(&srv, "order").await;
        let alice = login_user(&mut c, &srv, "alice").await;
        calls_made.take();

        let next = c.refresh(RefreshRequest { refresh_token: alice.refresh_token.clone() }).await.unwrap().into_inner();
        assert_eq!(calls_made.take(), calls(&[("CommitRefresh", 1)]), "{setting:?}: Refresh");
        let claims = claims_of(&mut c, &next.access_token, "order").await;
        let record = srv.core().store.issued(&claims.jti, SystemClock.now_unix()).await.unwrap();
        match setting {
            RecordIssued::None => assert_eq!(record, None, "nothing recorded without a registry"),
            _ => {
                let record = record.expect("the refreshed token is recorded");
                assert_eq!((record.sub, record.sid, record.exp), (claims.sub, claims.sid, claims.exp));
            }
        }
        calls_made.take();

        let target = Target::RefreshToken(next.refresh_token.clone());
        assert_eq!(revoke(&mut c, target, None).await.unwrap(), "family", "{setting:?}");
        assert_eq!(calls_made.take(), calls(&[("RevokeRefresh", 1)]), "{setting:?}: Revoke{{refresh_token}}");
        let err = c.refresh(RefreshRequest { refresh_token: next.refresh_token }).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "invalid refresh token"));

        let bob = login_user(&mut c, &srv, "bob").await;
        calls_made.take();
        let target = Target::SessionRefreshToken(bob.refresh_token.clone());
        assert_eq!(revoke(&mut c, target, None).await.unwrap(), "session", "{setting:?}");
        assert_eq!(calls_made.take(), calls(&[("RevokeRefresh", 1)]), "{setting:?}: logout");
        assert!(refused_as_revoked(&srv, &bob.access_token).await, "the session's access token is refused at once");
        let err = c.refresh(RefreshRequest { refresh_token: bob.refresh_token }).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "invalid refresh token"));

        calls_made.take();
        let unknown = Target::RefreshToken("no-such.token".into());
        let err = revoke(&mut c, unknown, None).await.unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "invalid refresh token"));
        assert_eq!(calls_made.take(), calls(&[("RevokeRefresh", 1)]), "an unknown refresh token");
        srv.shutdown().await;
    }
}

#[tokio::test]
async fn store_calls_per_rpc_one_for_refresh_and_for_revoke_by_refresh_token_in_memory() {
    let (store, calls_made) = counted();
    one_store_call_per_refresh_and_revoke_by_refresh_token(store, calls_made).await;
}

#[tokio::test]
async fn store_calls_per_rpc_one_for_refresh_and_for_revoke_by_refresh_token_in_redis() {
    let redis = RedisProcess::start();
    let (store, calls_made) = counted_redis(redis.url()).await;
    one_store_call_per_refresh_and_revoke_by_refresh_token(store, calls_made).await;
}

/// Exchanges `subject` at `srv` until `done` holds for the outcome.
async fn exchange_until(
    srv: &TestServer,
    subject: &str,
    what: &str,
    done: impl Fn(&Result<TokenResponse, Status>) -> bool,
) -> Result<TokenResponse, Status> {
    let mut c = client(srv, "order").await;
    crate::within(what, async {
        loop {
            let outcome =
                c.exchange_token(exchange_req(srv, "order", subject, "inventory")).await.map(|r| r.into_inner());
            if done(&outcome) {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn is_revoked(outcome: &Result<TokenResponse, Status>) -> bool {
    matches!(outcome, Err(s) if (s.code(), s.message()) == (Code::Unauthenticated, "token revoked"))
}

#[tokio::test]
async fn a_subject_token_revoked_elsewhere_is_refused_from_the_replicas_own_deny_set() {
    let redis = RedisProcess::start();
    let (store, calls_made) = counted_redis(redis.url()).await;
    let a = TestServer::builder().store(store).start().await;
    let b = replica(redis.url(), Some(&a.dir)).await;
    let mut at_b = client(&b, "order").await;
    let alice = login_user(&mut at_b, &b, "alice").await;
    let bob = login_user(&mut at_b, &b, "bob").await;
    assert!(a.core().revocations.synced(Duration::ZERO).await, "the builder waited for the first snapshot");
    let mut at_a = client(&a, "order").await;
    at_a.exchange_token(exchange_req(&a, "order", &alice.access_token, "inventory")).await.unwrap();
    calls_made.take();

    // Revoked at B: A hears of it over Redis pub/sub, and refuses it from
    // memory, never asking Redis.
    assert_eq!(revoke(&mut at_b, Target::AccessToken(alice.access_token.clone()), None).await.unwrap(), "jti");
    exchange_until(&a, &alice.access_token, "A to refuse the token revoked at B", is_revoked).await.unwrap_err();
    at_a.exchange_token(exchange_req(&a, "order", &bob.access_token, "inventory")).await.unwrap();
    assert_eq!(calls_made.take(), calls(&[]), "A made no store call for its exchanges");

    // A session ended at B, by an admin: bob's token for order (which A
    // has just accepted, and whose own jti was never revoked) is refused
    // at A as revoked, by its session.
    let sid = claims_of(&mut at_b, &bob.access_token, "order").await.sid.unwrap();
    let mut admin_at_b = client(&b, "admin").await;
    let admin = service_login(&mut admin_at_b, &b, "admin", "auth-service").await;
    assert_eq!(revoke(&mut admin_at_b, Target::Sid(sid), Some(&admin.access_token)).await.unwrap(), "session");
    exchange_until(&a, &bob.access_token, "A to refuse a token of the session ended at B", is_revoked)
        .await
        .unwrap_err();
    assert_eq!(calls_made.take(), calls(&[]));
    assert_eq!(a.core().revocations.stats().entries, 2, "alice's jti and bob's sid");
}

/// The keys in Redis, but the readiness probe's (a short-lived key that
/// comes and goes on its own schedule).
fn keys(redis: &RedisProcess) -> BTreeSet<String> {
    let RedisReply::Array(Some(keys)) = redis.command(&["KEYS", "*"]) else { panic!("KEYS reply") };
    keys.iter().map(RedisReply::text).filter(|k| !k.ends_with(":ready")).collect()
}

#[tokio::test]
async fn exchanges_leave_the_redis_keys_as_they_were() {
    let redis = RedisProcess::start();
    let srv = replica(redis.url(), None).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let before = keys(&redis);
    assert!(!before.is_empty(), "the login's refresh token is in Redis");
    for _ in 0..100 {
        c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap();
        c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
    }
    assert_eq!(keys(&redis), before, "200 exchanges wrote no key");
}

#[tokio::test]
async fn exchange_with_a_subject_token_fails_closed_while_the_feed_is_cut_and_catches_up_after() {
    let redis = RedisProcess::start();
    let link = TcpProxy::start(redis.addr()).await;
    let a = replica(format!("redis://{}", link.addr()), None).await;
    let b = replica(redis.url(), Some(&a.dir)).await;
    let mut at_b = client(&b, "order").await;
    let alice = login_user(&mut at_b, &b, "alice").await;
    let bob = login_user(&mut at_b, &b, "bob").await;
    let mut at_a = client(&a, "order").await;
    at_a.exchange_token(exchange_req(&a, "order", &alice.access_token, "inventory")).await.unwrap();

    // A silent partition between A and Redis: once A's subscriber notices
    // (a ping unanswered), presented tokens are refused UNAVAILABLE.
    link.freeze();
    let cut = exchange_until(&a, &bob.access_token, "A to fail closed", |o| o.is_err()).await.unwrap_err();
    assert_eq!((cut.code(), cut.message()), (Code::Unavailable, "revocation state unavailable"));
    assert!(!a.core().revocations.is_current());
    // Revoked at B while A cannot hear it.
    assert_eq!(revoke(&mut at_b, Target::AccessToken(alice.access_token.clone()), None).await.unwrap(), "jti");
    for token in [&alice.access_token, &bob.access_token] {
        let err = at_a.exchange_token(exchange_req(&a, "order", token, "inventory")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "never accepted during the cut: {err:?}");
    }
    // A service acting as itself needs no deny set: unaffected.
    at_a.exchange_token(exchange_req(&a, "order", "", "inventory")).await.unwrap();

    // Healed: A resubscribes and re-reads the deny list, so the
    // revocation it missed is refused, and a live token passes again.
    link.resume();
    exchange_until(&a, &bob.access_token, "A to accept a live subject token again", |o| {
        assert!(o.as_ref().is_ok() || o.as_ref().is_err_and(|s| s.code() == Code::Unavailable), "{o:?}");
        o.is_ok()
    })
    .await
    .unwrap();
    let err = at_a.exchange_token(exchange_req(&a, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token revoked"), "caught up");
}
