//! A lost reply must not log the user out: Refresh mints first and commits
//! in one store step, so a failure spends nothing; a reply lost after the
//! commit can be retried within `tokens.refresh_reuse_grace_secs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use auth_proto::auth::v1::RefreshRequest;
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::{RedisConfig, TokensConfig};
use auth_server::store::{
    ConsumeOutcome, IssuedToken, MemoryStore, RefreshCommit, RefreshRecord, Revocation, RevocationKind, Store,
    StoreError,
};
use testkit::{RedisProcess, TestServer};
use tokio::sync::broadcast;
use tonic::Code;

use crate::flows::{client, login_user};

/// What the next refresh commit suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The store fails before the commit is applied (a refused write).
    FailCommit,
    /// The commit is applied, but its reply never reaches the server (a
    /// timeout, a dropped connection).
    LoseReply,
}

/// A store that injects one fault into the next refresh commit.
struct Faulty {
    inner: Arc<dyn Store>,
    next: Mutex<Fault>,
}

impl Faulty {
    fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self { inner, next: Mutex::new(Fault::None) })
    }

    fn arm(&self, fault: Fault) {
        *self.next.lock().unwrap() = fault;
    }

    fn take(&self) -> Fault {
        std::mem::replace(&mut *self.next.lock().unwrap(), Fault::None)
    }
}

#[async_trait]
impl Store for Faulty {
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError> {
        self.inner.record_issued(jti, token, now).await
    }
    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError> {
        self.inner.issued(jti, now).await
    }
    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError> {
        self.inner.is_revoked(jti, sid, now).await
    }
    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError> {
        self.inner.revoke(revocation, now).await
    }
    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError> {
        self.inner.put_refresh(digest, record, now).await
    }
    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError> {
        self.inner.refresh_record(digest, now).await
    }
    async fn commit_refresh(&self, commit: &RefreshCommit<'_>, now: u64) -> Result<ConsumeOutcome, StoreError> {
        match self.take() {
            Fault::None => self.inner.commit_refresh(commit, now).await,
            Fault::FailCommit => Err(StoreError::Unavailable("injected: write refused".into())),
            Fault::LoseReply => {
                self.inner.commit_refresh(commit, now).await?;
                Err(StoreError::Unavailable("injected: reply lost".into()))
            }
        }
    }
    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        self.inner.revoked_snapshot(now).await
    }
    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.inner.subscribe()
    }
    fn feed_state(&self) -> tokio::sync::watch::Receiver<auth_server::store::FeedState> {
        self.inner.feed_state()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

async fn redis_store(redis: &RedisProcess) -> Arc<dyn Store> {
    let config = RedisConfig { url: redis.url(), command_timeout_ms: 500, ..RedisConfig::default() };
    Arc::new(auth_server::store::RedisStore::connect(&config).await.unwrap())
}

fn refresh(token: &str) -> RefreshRequest {
    RefreshRequest { refresh_token: token.into() }
}

async fn a_failure_after_mint_spends_nothing(inner: Arc<dyn Store>) {
    let store = Faulty::new(inner);
    let srv = TestServer::builder().store(store.clone()).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.arm(Fault::FailCommit);
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
    let store = Faulty::new(redis_store(&redis).await);
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 10, clock.clone()).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.arm(Fault::LoseReply);
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
    let store = Faulty::new(redis_store(&redis).await);
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 10, clock.clone()).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    clock.advance(11);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
    assert!(family_revoked(&srv.core().store.revoked_snapshot(clock.now_unix()).await.unwrap()));
}

#[tokio::test]
async fn without_a_grace_window_a_retry_after_a_lost_reply_revokes_the_family() {
    let store = Faulty::new(Arc::new(MemoryStore::new()));
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 0, clock.clone()).await;
    assert_eq!(TokensConfig::default().refresh_reuse_grace_secs, 0, "off by default");
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
}
