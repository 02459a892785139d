//! The in-memory store: the embedded default for a single replica.
//!
//! One mutex guards all state, so every operation is trivially atomic.
//! Expired entries are pruned lazily as operations pass over them and in
//! bulk on snapshots.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

use super::{
    Committed, ConsumeOutcome, DenyListSize, FeedState, IssuedToken, RefreshCommit, RefreshRecord, RefreshRevoke,
    Revocation, RevocationKind, Store, StoreError,
};

#[derive(Default)]
struct State {
    issued: HashMap<String, IssuedToken>,
    /// (kind, id) -> expires_at
    denied: HashMap<(RevocationKind, String), u64>,
    refresh: HashMap<String, RefreshEntry>,
    ops: u64,
    /// Entries of `denied` by kind, kept as they change, so counting them
    /// never walks the map.
    denied_count: DenyListSize,
}

/// A stored refresh token.
struct RefreshEntry {
    record: RefreshRecord,
    /// When it was spent, and the successor stored then.
    spent: Option<(u64, String)>,
}

impl State {
    fn is_denied(&self, kind: RevocationKind, id: &str, now: u64) -> bool {
        self.denied.get(&(kind, id.to_owned())).is_some_and(|&exp| exp > now)
    }

    fn prune(&mut self, now: u64) {
        self.issued.retain(|_, t| t.exp > now);
        let count = &mut self.denied_count;
        self.denied.retain(|(kind, _), exp| {
            let keep = *exp > now;
            if !keep {
                let n = count_of(count, *kind);
                *n = n.saturating_sub(1);
            }
            keep
        });
        self.refresh.retain(|_, e| e.record.expires_at > now);
    }

    /// Denies `(kind, id)` until `until`, never shortening an entry.
    fn deny(&mut self, kind: RevocationKind, id: String, until: u64) {
        match self.denied.entry((kind, id)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let exp = e.get_mut();
                *exp = (*exp).max(until);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(until);
                *count_of(&mut self.denied_count, kind) += 1;
            }
        }
    }

    fn tick(&mut self, now: u64) {
        self.ops += 1;
        if self.ops.is_multiple_of(4096) {
            self.prune(now);
        }
    }
}

fn count_of(count: &mut DenyListSize, kind: RevocationKind) -> &mut u64 {
    match kind {
        RevocationKind::Jti => &mut count.jti,
        RevocationKind::Sid => &mut count.sid,
        RevocationKind::Family => &mut count.family,
    }
}

/// The in-memory store.
pub struct MemoryStore {
    state: Mutex<State>,
    events: broadcast::Sender<Revocation>,
    /// Always live, one epoch: every revocation is made here.
    feed: watch::Sender<FeedState>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        let (feed, _) = watch::channel(FeedState { live: true, epoch: 0 });
        Self { state: Mutex::new(State::default()), events, feed }
    }

    /// Moves the feed's state, as a shared store's subscriber does when it
    /// reconnects.
    #[cfg(test)]
    pub(crate) fn set_feed_state(&self, state: FeedState) {
        self.feed.send_replace(state);
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Corrupt("memory store lock poisoned".into()))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn record_issued(&self, jti: &str, token: &IssuedToken, now: u64) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        s.tick(now);
        s.issued.insert(jti.to_owned(), token.clone());
        Ok(())
    }

    async fn issued(&self, jti: &str, now: u64) -> Result<Option<IssuedToken>, StoreError> {
        let s = self.lock()?;
        Ok(s.issued.get(jti).filter(|t| t.exp > now).cloned())
    }

    async fn is_revoked(&self, jti: &str, sid: Option<&str>, now: u64) -> Result<bool, StoreError> {
        let s = self.lock()?;
        Ok(s.is_denied(RevocationKind::Jti, jti, now)
            || sid.is_some_and(|sid| s.is_denied(RevocationKind::Sid, sid, now)))
    }

    async fn revoke(&self, revocation: Revocation, now: u64) -> Result<(), StoreError> {
        {
            let mut s = self.lock()?;
            s.tick(now);
            s.deny(revocation.kind, revocation.id.clone(), revocation.expires_at);
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(revocation);
        Ok(())
    }

    async fn put_refresh(&self, digest: &str, record: &RefreshRecord, now: u64) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        s.tick(now);
        s.refresh.insert(digest.to_owned(), RefreshEntry { record: record.clone(), spent: None });
        Ok(())
    }

    async fn refresh_record(&self, digest: &str, now: u64) -> Result<Option<RefreshRecord>, StoreError> {
        let s = self.lock()?;
        Ok(s.refresh.get(digest).map(|e| e.record.clone()).filter(|r| r.expires_at > now))
    }

    async fn commit_refresh(&self, c: &RefreshCommit<'_>, now: u64) -> Result<ConsumeOutcome, StoreError> {
        let revoked_family;
        let reused;
        {
            let mut s = self.lock()?;
            s.tick(now);
            let Some(entry) = s.refresh.get(c.digest) else {
                return Ok(ConsumeOutcome::Invalid);
            };
            let (record, spent) = (entry.record.clone(), entry.spent.clone());
            if record.expires_at <= now
                || s.is_denied(RevocationKind::Family, &record.family, now)
                || s.is_denied(RevocationKind::Sid, &record.sid, now)
            {
                return Ok(ConsumeOutcome::Invalid);
            }
            let rotate = |s: &mut State, spent_at: u64| {
                if let Some(entry) = s.refresh.get_mut(c.digest) {
                    entry.spent = Some((spent_at, c.next_digest.to_owned()));
                }
                let next = RefreshRecord { expires_at: c.next_expires_at, ..record.clone() };
                s.refresh.insert(c.next_digest.to_owned(), RefreshEntry { record: next, spent: None });
                if let Some(exp) = c.issued_exp {
                    let issued = IssuedToken { sub: record.sub.clone(), sid: Some(record.sid.clone()), exp };
                    s.issued.insert(c.jti.to_owned(), issued);
                }
            };
            match spent {
                None => {
                    rotate(&mut s, now);
                    return Ok(ConsumeOutcome::Rotated(record));
                }
                Some((at, successor))
                    if c.reuse_grace_secs > 0
                        && now.saturating_sub(at) <= c.reuse_grace_secs
                        && s.refresh.get(&successor).is_some_and(|e| e.spent.is_none()) =>
                {
                    s.refresh.remove(&successor);
                    rotate(&mut s, at);
                    return Ok(ConsumeOutcome::Retried(record));
                }
                Some(_) => {}
            }
            // Reuse: revoke the family for as long as any member could
            // live. Every member was issued before now, so none outlives a
            // successor issued now (`next_expires_at`).
            let until = record.expires_at.max(c.next_expires_at);
            revoked_family = Revocation { kind: RevocationKind::Family, id: record.family.clone(), expires_at: until };
            s.deny(RevocationKind::Family, record.family.clone(), until);
            reused = record;
        }
        let _ = self.events.send(revoked_family);
        Ok(ConsumeOutcome::Reused(reused))
    }

    async fn undo_refresh(&self, c: &RefreshCommit<'_>, committed: Committed, now: u64) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        s.tick(now);
        // The record names a token never handed out: gone either way.
        if c.issued_exp.is_some() {
            s.issued.remove(c.jti);
        }
        // A retry's token was spent before it, and stays so.
        if committed == Committed::Retried {
            return Ok(false);
        }
        // Only while the successor is stored, unspent, and still the one
        // the presented token names.
        let successor_unused = s.refresh.get(c.next_digest).is_some_and(|e| e.spent.is_none());
        let names_it = s
            .refresh
            .get(c.digest)
            .and_then(|e| e.spent.as_ref())
            .is_some_and(|(_, successor)| successor == c.next_digest);
        if !successor_unused || !names_it {
            return Ok(false);
        }
        if let Some(entry) = s.refresh.get_mut(c.digest) {
            entry.spent = None;
        }
        s.refresh.remove(c.next_digest);
        Ok(true)
    }

    async fn revoke_refresh(
        &self,
        r: &RefreshRevoke<'_>,
        now: u64,
    ) -> Result<Option<(RefreshRecord, Revocation)>, StoreError> {
        if r.kind == RevocationKind::Jti {
            return Err(StoreError::Corrupt("a refresh token revokes its family or session, not a jti".into()));
        }
        let revocation;
        let record;
        {
            let mut s = self.lock()?;
            s.tick(now);
            let Some(found) = s.refresh.get(r.digest).map(|e| e.record.clone()).filter(|r| r.expires_at > now) else {
                return Ok(None);
            };
            revocation = r.revocation(&found);
            s.deny(revocation.kind, revocation.id.clone(), revocation.expires_at);
            record = found;
        }
        let _ = self.events.send(revocation.clone());
        Ok(Some((record, revocation)))
    }

    async fn revoked_snapshot(&self, now: u64) -> Result<Vec<Revocation>, StoreError> {
        let mut s = self.lock()?;
        s.prune(now);
        Ok(s.denied
            .iter()
            .map(|((kind, id), exp)| Revocation { kind: *kind, id: id.clone(), expires_at: *exp })
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.events.subscribe()
    }

    fn feed_state(&self) -> watch::Receiver<FeedState> {
        self.feed.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn deny_list_size(&self, _now: u64) -> Result<Option<DenyListSize>, StoreError> {
        Ok(Some(self.lock()?.denied_count))
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_passes_the_conformance_suite() {
        crate::store::conformance::run_all(&MemoryStore::new()).await.unwrap();
    }
}
