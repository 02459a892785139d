//! A lost reply must not log the user out: Refresh mints first and commits
//! in one store step, so a failure spends nothing; a reply lost after the
//! commit can be retried within `tokens.refresh_reuse_grace_secs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use auth_proto::auth::v1::RefreshRequest;
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::{RedisConfig, TokensConfig};
use auth_server::store::{MemoryStore, Revocation, RevocationKind, Store, StoreError};
use testkit::{HookedStore, Intercept, RedisProcess, StoreCall, StoreHook, TestServer};
use tonic::Code;

use crate::flows::{client, login_user};

/// What the next refresh commit suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Fault {
    #[default]
    None,
    /// The store fails before the commit is applied (a refused write).
    FailCommit,
    /// The commit is applied, but its reply never reaches the server (a
    /// timeout, a dropped connection).
    LoseReply,
}

/// A hook that injects one fault into the next refresh commit.
#[derive(Default)]
struct Faults {
    next: Mutex<Fault>,
}

impl Faults {
    fn arm(&self, fault: Fault) {
        *self.next.lock().unwrap() = fault;
    }
}

impl StoreHook for Faults {
    fn intercept(&self, call: StoreCall) -> Intercept {
        if call != StoreCall::CommitRefresh {
            return Intercept::Pass;
        }
        match std::mem::replace(&mut *self.next.lock().unwrap(), Fault::None) {
            Fault::None => Intercept::Pass,
            Fault::FailCommit => Intercept::Refuse(StoreError::Unavailable("injected: write refused".into())),
            Fault::LoseReply => Intercept::LoseReply(StoreError::Unavailable("injected: reply lost".into())),
        }
    }
}

/// A store whose next refresh commit suffers the armed fault.
type Faulty = HookedStore<Faults>;

fn faulty(inner: Arc<dyn Store>) -> Arc<Faulty> {
    Arc::new(HookedStore::new(inner, Faults::default()))
}

async fn redis_store(redis: &RedisProcess) -> Arc<dyn Store> {
    let config = RedisConfig { url: redis.url(), command_timeout_ms: 500, ..RedisConfig::default() };
    Arc::new(auth_server::store::RedisStore::connect(&config).await.unwrap())
}

fn refresh(token: &str) -> RefreshRequest {
    RefreshRequest { refresh_token: token.into() }
}

async fn a_failure_after_mint_spends_nothing(inner: Arc<dyn Store>) {
    let store = faulty(inner);
    let srv = TestServer::builder().store(store.clone()).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::FailCommit);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The honest retry is a plain refresh, not a reuse.
    let next = c.refresh(refresh(&alice.refresh_token)).await.expect("nothing was spent").into_inner();
    c.refresh(refresh(&next.refresh_token)).await.expect("the family is alive");
    // Now it is spent: a third presentation is a reuse.
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
}

#[tokio::test]
async fn a_store_failure_after_mint_spends_nothing_in_memory() {
    a_failure_after_mint_spends_nothing(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_store_failure_after_mint_spends_nothing_in_redis() {
    let redis = RedisProcess::start();
    a_failure_after_mint_spends_nothing(redis_store(&redis).await).await;
}

/// A server whose refresh commits go through `store`, with a reuse grace
/// window of `grace` seconds.
async fn server(store: Arc<Faulty>, grace: u64, clock: ManualClock) -> TestServer {
    TestServer::builder()
        .store(store)
        .clock(Arc::new(clock))
        .configure(move |c| c.tokens.refresh_reuse_grace_secs = grace)
        .start()
        .await
}

fn family_revoked(snapshot: &[Revocation]) -> bool {
    snapshot.iter().any(|r| r.kind == RevocationKind::Family)
}

#[tokio::test]
async fn a_lost_reply_is_retried_within_the_grace_window() {
    let redis = RedisProcess::start();
    let store = faulty(redis_store(&redis).await);
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 10, clock.clone()).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    clock.advance(5);
    let retried = c.refresh(refresh(&alice.refresh_token)).await.expect("a retry in the window").into_inner();
    assert!(!family_revoked(&srv.core().store.revoked_snapshot(clock.now_unix()).await.unwrap()));
    // The retry's pair is the live one.
    let next = c.refresh(refresh(&retried.refresh_token)).await.expect("the new pair works").into_inner();
    assert!(!next.access_token.is_empty());
}

#[tokio::test]
async fn a_retry_after_the_grace_window_revokes_the_family() {
    let redis = RedisProcess::start();
    let store = faulty(redis_store(&redis).await);
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 10, clock.clone()).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    clock.advance(11);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
    assert!(family_revoked(&srv.core().store.revoked_snapshot(clock.now_unix()).await.unwrap()));
}

#[tokio::test]
async fn without_a_grace_window_a_retry_after_a_lost_reply_revokes_the_family() {
    let store = faulty(Arc::new(MemoryStore::new()));
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 0, clock.clone()).await;
    assert_eq!(TokensConfig::default().refresh_reuse_grace_secs, 0, "off by default");
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
}
