//! Store latency: [`MeteredStore`], a decorator around any [`Store`] that
//! times every operation into a histogram by operation and counts the
//! failures. The stores themselves hold no metrics code.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use metrics::{Counter, Histogram};
use tokio::sync::{broadcast, watch};

use super::metrics::{STORE_DURATION, STORE_ERRORS};
use crate::store::{
    Committed, ConsumeOutcome, DenyListSize, FeedState, IssuedToken, RefreshCommit, RefreshRecord, RefreshRevoke,
    Revocation, Store, StoreError,
};

/// The timed operations, in table order (the `op` label).
const OPS: [&str; 12] = [
    "record_issued",
    "issued",
    "is_revoked",
    "revoke",
    "put_refresh",
    "refresh_record",
    "commit_refresh",
    "revoked_snapshot",
    "ping",
    "deny_list_size",
    "undo_refresh",
    "revoke_refresh",
];

#[derive(Clone, Copy)]
enum Op {
    RecordIssued,
    Issued,
    IsRevoked,
    Revoke,
    PutRefresh,
    RefreshRecord,
    CommitRefresh,
    RevokedSnapshot,
    Ping,
    DenyListSize,
    UndoRefresh,
    RevokeRefresh,
}

struct OpMetrics {
    latency: Histogram,
    errors: Counter,
}

/// A [`Store`] whose operations are timed; see the [module docs](self).
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    ops: Vec<OpMetrics>,
}

impl MeteredStore {
    /// Wraps `inner`, registering with the recorder installed now (a no-op
    /// without one).
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        let ops = OPS
            .iter()
            .map(|op| OpMetrics {
                latency: metrics::histogram!(STORE_DURATION, "op" => *op),
                errors: metrics::counter!(STORE_ERRORS, "op" => *op),
            })
            .collect();
        Arc::new(Self { inner, ops })
    }

    fn record<T>(&self, op: Op, start: Instant, result: &Result<T, StoreError>) {
        let Some(m) = self.ops.get(op as usize) else { return };
        m.latency.record(start.elapsed().as_secs_f64());
        if result.is_err() {
            m.errors.increment(1);
        }
    }
}

/// Runs `$call` on the inner store, timed as `$op`.
macro_rules! timed {
    ($self:ident, $op:expr, $call:expr) => {{
        let start = Instant::now();
        let result = $call.await;
        $self.record($op, start, &result);
        result
    }};
}

#[async_trait]
impl Store for MeteredStore {
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError> {
        timed!(self, Op::RecordIssued, self.inner.record_issued(jti, token, now))
    }

    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError> {
        timed!(self, Op::Issued, self.inner.issued(jti, now))
    }

    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError> {
        timed!(self, Op::IsRevoked, self.inner.is_revoked(jti, sid, now))
    }

    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError> {
        timed!(self, Op::Revoke, self.inner.revoke(revocation, now))
    }

    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError> {
        timed!(self, Op::PutRefresh, self.inner.put_refresh(digest, record, now))
    }

    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError> {
        timed!(self, Op::RefreshRecord, self.inner.refresh_record(digest, now))
    }

    async fn commit_refresh(&self, commit: &RefreshCommit<'_>, now: u64) -> Result<ConsumeOutcome, StoreError> {
        timed!(self, Op::CommitRefresh, self.inner.commit_refresh(commit, now))
    }

    async fn undo_refresh(
        &self,
        commit: &RefreshCommit<'_>,
        committed: Committed,
        now: u64,
    ) -> Result<bool, StoreError> {
        timed!(self, Op::UndoRefresh, self.inner.undo_refresh(commit, committed, now))
    }

    async fn revoke_refresh(
        &self,
        revoke: &RefreshRevoke<'_>,
        now: u64,
    ) -> Result<Option<(RefreshRecord, Revocation)>, StoreError> {
        timed!(self, Op::RevokeRefresh, self.inner.revoke_refresh(revoke, now))
    }

    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        timed!(self, Op::RevokedSnapshot, self.inner.revoked_snapshot(now))
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.inner.subscribe()
    }

    fn feed_state(&self) -> watch::Receiver<FeedState> {
        self.inner.feed_state()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, Op::Ping, self.inner.ping())
    }

    async fn deny_list_size(&self, now: u64) -> Result<Option<DenyListSize>, StoreError> {
        timed!(self, Op::DenyListSize, self.inner.deny_list_size(now))
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn the_op_table_follows_the_enum() {
        let ops = [
            Op::RecordIssued,
            Op::Issued,
            Op::IsRevoked,
            Op::Revoke,
            Op::PutRefresh,
            Op::RefreshRecord,
            Op::CommitRefresh,
            Op::RevokedSnapshot,
            Op::Ping,
            Op::DenyListSize,
            Op::UndoRefresh,
            Op::RevokeRefresh,
        ];
        assert_eq!(ops.len(), OPS.len());
        for (i, op) in ops.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
    }

    #[tokio::test]
    async fn a_metered_store_still_passes_the_conformance_suite() {
        let store = MeteredStore::wrap(Arc::new(MemoryStore::new()));
        crate::store::conformance::run_all(&*store).await.unwrap();
        assert_eq!(store.name(), "memory");
    }
}
