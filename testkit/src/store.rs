//! [`HookedStore`]: a real store behind a test's hook, so a test can count
//! or fail chosen [`Store`] calls while every other call goes through
//! unchanged.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use testkit::auth_server::store::MemoryStore;
//! use testkit::{HookedStore, Intercept, StoreCall};
//!
//! let pings = Arc::new(AtomicUsize::new(0));
//! let counted = Arc::clone(&pings);
//! let store = HookedStore::new(Arc::new(MemoryStore::new()), move |call| {
//!     if call == StoreCall::Ping {
//!         counted.fetch_add(1, Ordering::SeqCst);
//!     }
//!     Intercept::Pass
//! });
//! # drop(store);
//! ```

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use auth_server::store::{
    Committed, ConsumeOutcome, DenyListSize, FeedState, IssuedToken, RefreshCommit, RefreshRecord, RefreshRevoke,
    Revocation, Store, StoreError,
};
use tokio::sync::{broadcast, watch};

/// A [`Store`] call that does I/O, as a hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreCall {
    /// [`Store::record_issued`].
    RecordIssued,
    /// [`Store::issued`].
    Issued,
    /// [`Store::is_revoked`].
    IsRevoked,
    /// [`Store::revoke`].
    Revoke,
    /// [`Store::put_refresh`].
    PutRefresh,
    /// [`Store::refresh_record`].
    RefreshRecord,
    /// [`Store::commit_refresh`].
    CommitRefresh,
    /// [`Store::undo_refresh`].
    UndoRefresh,
    /// [`Store::revoke_refresh`].
    RevokeRefresh,
    /// [`Store::revoked_snapshot`].
    RevokedSnapshot,
    /// [`Store::ping`].
    Ping,
    /// [`Store::deny_list_size`].
    DenyListSize,
}

/// What a hook does to one call.
#[derive(Debug)]
pub enum Intercept {
    /// The call goes to the inner store and its answer is returned.
    Pass,
    /// The inner store is not asked; the call fails with this error (a
    /// refused write, an unreachable store).
    Refuse(StoreError),
    /// The call goes to the inner store, but its answer is replaced by
    /// this error (the write happened, its reply was lost).
    LoseReply(StoreError),
}

/// Decides, call by call, what a [`HookedStore`] does. Closures
/// `Fn(StoreCall) -> Intercept` are hooks.
pub trait StoreHook: Send + Sync + 'static {
    /// Called before each I/O call reaches the inner store.
    fn intercept(&self, call: StoreCall) -> Intercept;

    /// Called once the inner store has answered a call the hook let
    /// through ([`Intercept::Pass`] or [`Intercept::LoseReply`]), whatever
    /// it answered: a test can await a call made by a task it does not
    /// hold.
    fn answered(&self, call: StoreCall) {
        let _ = call;
    }
}

impl<F: Fn(StoreCall) -> Intercept + Send + Sync + 'static> StoreHook for F {
    fn intercept(&self, call: StoreCall) -> Intercept {
        self(call)
    }
}

/// A store that asks its hook about every I/O call and otherwise hands the
/// call to the inner store. `subscribe`, `feed_state` and `name` go
/// straight through.
pub struct HookedStore<H> {
    inner: Arc<dyn Store>,
    hook: H,
}

impl<H: StoreHook> HookedStore<H> {
    /// `inner`, with `hook` deciding about each call.
    pub fn new(inner: Arc<dyn Store>, hook: H) -> Self {
        Self { inner, hook }
    }

    /// The hook (e.g. to arm the next fault).
    pub fn hook(&self) -> &H {
        &self.hook
    }

    async fn run<T>(
        &self,
        call: StoreCall,
        inner: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        match self.hook.intercept(call) {
            Intercept::Pass => {
                let answer = inner.await;
                self.hook.answered(call);
                answer
            }
            Intercept::Refuse(e) => Err(e),
            Intercept::LoseReply(e) => {
                let answer = inner.await;
                self.hook.answered(call);
                answer?;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl<H: StoreHook> Store for HookedStore<H> {
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError> {
        self.run(StoreCall::RecordIssued, self.inner.record_issued(jti, token, now)).await
    }
    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError> {
        self.run(StoreCall::Issued, self.inner.issued(jti, now)).await
    }
    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError> {
        self.run(StoreCall::IsRevoked, self.inner.is_revoked(jti, sid, now)).await
    }
    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError> {
        self.run(StoreCall::Revoke, self.inner.revoke(revocation, now)).await
    }
    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError> {
        self.run(StoreCall::PutRefresh, self.inner.put_refresh(digest, record, now)).await
    }
    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError> {
        self.run(StoreCall::RefreshRecord, self.inner.refresh_record(digest, now)).await
    }
    async fn commit_refresh(&self, commit: &RefreshCommit<'_>, now: u64) -> Result<ConsumeOutcome, StoreError> {
        self.run(StoreCall::CommitRefresh, self.inner.commit_refresh(commit, now)).await
    }
    async fn undo_refresh(
        &self,
        commit: &RefreshCommit<'_>,
        committed: Committed,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.run(StoreCall::UndoRefresh, self.inner.undo_refresh(commit, committed, now)).await
    }
    async fn revoke_refresh(
        &self,
        revoke: &RefreshRevoke<'_>,
        now: u64,
    ) -> Result<Option<(RefreshRecord, Revocation)>, StoreError> {
        self.run(StoreCall::RevokeRefresh, self.inner.revoke_refresh(revoke, now)).await
    }
    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        self.run(StoreCall::RevokedSnapshot, self.inner.revoked_snapshot(now)).await
    }
    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.inner.subscribe()
    }
    fn feed_state(&self) -> watch::Receiver<FeedState> {
        self.inner.feed_state()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(StoreCall::Ping, self.inner.ping()).await
    }
    async fn deny_list_size(&self, now: u64) -> Result<Option<DenyListSize>, StoreError> {
        self.run(StoreCall::DenyListSize, self.inner.deny_list_size(now)).await
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
