//! Deny entries outlive their tokens by the verifiers' clock leeway: a
//! verifier accepts a token until `exp` + leeway, so a revocation must hold
//! that long, in both stores and in the snapshot a new verifier loads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use auth_proto::auth::v1::RevokeRequest;
use auth_proto::auth::v1::revoke_request::Target;
use auth_server::clock::{Clock, ManualClock, SystemClock};
use service_sdk::{Verifier, VerifyError};
use testkit::{RedisProcess, TestServer};

use crate::flows::{claims_of, client, login_user};

async fn revoked_token_stays_denied_through_the_verifier_leeway(srv: TestServer, clock: ManualClock) {
    let leeway = srv.config().tokens.verifier_leeway_secs;
    assert_eq!(leeway, service_sdk::verify::DEFAULT_LEEWAY_SECS, "defaults to the SDK's leeway");
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let claims = claims_of(&mut c, &alice.access_token, "order").await;
    c.revoke(RevokeRequest { target: Some(Target::AccessToken(alice.access_token.clone())) }).await.unwrap();

    // Past exp, inside the leeway: verifiers still accept the token, so it
    // must still be denied.
    clock.set(claims.exp + leeway / 3);
    let now = clock.now_unix();
    assert!(srv.core().store.is_revoked(&claims.jti, None, now).await.unwrap(), "the store forgot it at exp");
    let snapshot = srv.core().store.revoked_snapshot(now).await.unwrap();
    assert!(snapshot.iter().any(|r| r.id == claims.jti), "the snapshot dropped it at exp");
    // A verifier that connects now, with the default leeway, refuses it.
    let verifier = Verifier::builder(srv.config().issuer.clone(), "order")
        .channel(srv.channel("inventory").await)
        .clock(clock.clone())
        .build()
        .unwrap();
    verifier.ready().await;
    let err = verifier.verify(&alice.access_token, None).await.unwrap_err();
    assert!(matches!(err, VerifyError::Revoked), "{err:?}");

    // Past exp + leeway the token is dead anyway, and the entry may go.
    clock.set(claims.exp + leeway);
    let err = verifier.verify(&alice.access_token, None).await.unwrap_err();
    assert!(matches!(err, VerifyError::Expired | VerifyError::Revoked), "{err:?}");
    let now = clock.now_unix();
    assert!(srv.core().store.revoked_snapshot(now).await.unwrap().iter().all(|r| r.id != claims.jti));
}

#[tokio::test]
async fn a_revoked_token_stays_denied_through_the_verifier_leeway_in_memory() {
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = TestServer::builder().clock(Arc::new(clock.clone())).start().await;
    revoked_token_stays_denied_through_the_verifier_leeway(srv, clock).await;
}

#[tokio::test]
async fn a_revoked_token_stays_denied_through_the_verifier_leeway_in_redis() {
    let redis = RedisProcess::start();
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = TestServer::builder().store_url(redis.url()).clock(Arc::new(clock.clone())).start().await;
    revoked_token_stays_denied_through_the_verifier_leeway(srv, clock).await;
}

#[tokio::test]
async fn a_revocation_arriving_inside_the_leeway_is_still_recorded() {
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = TestServer::builder().clock(Arc::new(clock.clone())).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let claims = claims_of(&mut c, &alice.access_token, "order").await;
    let leeway = srv.config().tokens.verifier_leeway_secs;
    // Expired by the server's clock, still accepted by verifiers.
    clock.set(claims.exp + leeway - 1);
    let r = c.revoke(RevokeRequest { target: Some(Target::AccessToken(alice.access_token.clone())) }).await.unwrap();
    assert_eq!(r.into_inner().revoked, "jti");
    assert!(srv.core().store.is_revoked(&claims.jti, None, clock.now_unix()).await.unwrap());
}
