//! Reads of the deny list, in the wire's chunks, shared by whoever needs
//! one at about the same time: `WatchRevocations` streams that arrive
//! together (a reconnect storm after a restart, a resync) and the
//! replica's own deny set ([`super::Revocations`]) all take one read of
//! the store and one set of chunks ([`Snapshots`]).
//!
//! Only `jti` and `sid` revocations are in them: refresh-token families
//! matter to the store's refresh step alone, never to a token check.

use std::sync::{Arc, Weak};
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use prost::Message as _;
use prost::encoding::encoded_len_varint;
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::time::Instant;

use crate::store::{Revocation, RevocationKind, Store, StoreError};

/// Largest encoded size of one snapshot chunk (a whole `RevocationEvent`),
/// well under tonic's default 4 MiB decode limit.
const MAX_CHUNK_BYTES: usize = 1024 * 1024;

/// Readers arriving within this long of a store read share it.
const SHARE_WINDOW: Duration = Duration::from_secs(1);

/// The wire form of a revocation a verifier needs; `None` for families.
pub(crate) fn to_pb(r: &Revocation) -> Option<pb::Revocation> {
    let kind = match r.kind {
        RevocationKind::Jti => pb::RevocationKind::Jti,
        RevocationKind::Sid => pb::RevocationKind::Sid,
        RevocationKind::Family => return None,
    };
    Some(pb::Revocation { kind: kind as i32, id: r.id.clone(), expires_at: r.expires_at })
}

/// The event announcing one revocation.
pub(crate) fn revoked(r: pb::Revocation) -> pb::RevocationEvent {
    pb::RevocationEvent { event: Some(pb::revocation_event::Event::Revoked(r)) }
}

/// Splits a snapshot into chunks of at most [`MAX_CHUNK_BYTES`] encoded,
/// every one but the last marked `more`. Always at least one chunk (an
/// empty deny list is an empty, last chunk).
fn chunk_snapshot(entries: impl IntoIterator<Item = pb::Revocation>) -> Vec<pb::RevocationEvent> {
    // Room for the envelope: the event's oneof tag and length (at most
    // 1 + 5 bytes) and the `more` flag (2 bytes).
    const BUDGET: usize = MAX_CHUNK_BYTES - 16;
    let seal = |entries: Vec<pb::Revocation>, more: bool| pb::RevocationEvent {
        event: Some(pb::revocation_event::Event::Snapshot(pb::RevocationSnapshot { entries, more })),
    };
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for entry in entries {
        let len = entry.encoded_len();
        let field = 1 + encoded_len_varint(len as u64) + len;
        if size + field > BUDGET && !current.is_empty() {
            chunks.push(seal(std::mem::take(&mut current), true));
            size = 0;
        }
        size += field;
        current.push(entry);
    }
    chunks.push(seal(current, false));
    chunks
}

/// One read of the deny list, chunked, and the revocations heard since.
struct Shared {
    read_at: Instant,
    /// The feed's epoch its reader had seen before reading.
    epoch: u64,
    /// Held by the readers still using them; gone once all are done.
    chunks: Weak<[pb::RevocationEvent]>,
    /// Subscribed before the read: what happened since.
    since_rx: broadcast::Receiver<Revocation>,
    since: Vec<pb::Revocation>,
}

/// Snapshots shared between readers that arrive together.
#[derive(Default)]
pub(crate) struct Snapshots {
    current: tokio::sync::Mutex<Option<Shared>>,
}

/// A snapshot: the chunks, then revocations made since their read.
pub(crate) type Snapshot = (Arc<[pb::RevocationEvent]>, Vec<pb::Revocation>);

impl Snapshots {
    /// The snapshot of `store` for a reader that has seen its feed at
    /// `epoch` and whose event receiver was subscribed before this call:
    /// the chunks, then revocations made since they were read (a fresh read
    /// at `now` unless one of the same epoch is shared). Nothing is missed:
    /// the shared read's own receiver covers the time up to now, and a read
    /// is shared only within the epoch its reader had seen, so it was made
    /// after whatever the feed lost before that epoch.
    pub(crate) async fn get(&self, store: &dyn Store, now: u64, epoch: u64) -> Result<Snapshot, StoreError> {
        let mut current = self.current.lock().await;
        if let Some(shared) = current.as_mut()
            && shared.epoch == epoch
            && shared.read_at.elapsed() < SHARE_WINDOW
            && let Some(chunks) = shared.chunks.upgrade()
            && catch_up(shared)
        {
            return Ok((chunks, shared.since.clone()));
        }
        let since_rx = store.subscribe();
        let entries = store.revoked_snapshot(now).await?;
        let chunks: Arc<[pb::RevocationEvent]> = chunk_snapshot(entries.iter().filter_map(to_pb)).into();
        *current = Some(Shared {
            read_at: Instant::now(),
            epoch,
            chunks: Arc::downgrade(&chunks),
            since_rx,
            since: Vec::new(),
        });
        Ok((chunks, Vec::new()))
    }
}

/// Drains what the shared read's receiver heard; false when some was lost.
fn catch_up(shared: &mut Shared) -> bool {
    loop {
        match shared.since_rx.try_recv() {
            Ok(r) => shared.since.extend(to_pb(&r)),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Lagged(_) | TryRecvError::Closed) => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn jti(i: usize) -> pb::Revocation {
        pb::Revocation { kind: pb::RevocationKind::Jti as i32, id: format!("{i:022}"), expires_at: 1_700_000_000 }
    }

    fn entries(event: &pb::RevocationEvent) -> (&[pb::Revocation], bool) {
        match &event.event {
            Some(pb::revocation_event::Event::Snapshot(s)) => (&s.entries, s.more),
            other => panic!("not a snapshot: {other:?}"),
        }
    }

    #[test]
    fn snapshot_chunks_are_bounded_ordered_and_the_last_is_marked() {
        let all: Vec<_> = (0..100_000).map(jti).collect();
        let chunks = chunk_snapshot(all.clone());
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        let mut joined = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.encoded_len() <= MAX_CHUNK_BYTES, "chunk {i}: {} bytes", chunk.encoded_len());
            assert!(chunk.encoded_len() > MAX_CHUNK_BYTES / 2 || i == chunks.len() - 1, "chunks are filled");
            let (e, more) = entries(chunk);
            assert_eq!(more, i + 1 < chunks.len());
            joined.extend_from_slice(e);
        }
        assert_eq!(joined, all);
    }

    #[test]
    fn an_empty_deny_list_is_one_empty_last_chunk() {
        let chunks = chunk_snapshot(Vec::new());
        assert_eq!(chunks.len(), 1);
        assert_eq!(entries(&chunks[0]), (&[][..], false));
    }

    #[test]
    fn families_never_reach_readers() {
        let family = Revocation { kind: RevocationKind::Family, id: "f".into(), expires_at: 1 };
        assert_eq!(to_pb(&family), None);
        let sid = Revocation { kind: RevocationKind::Sid, id: "s".into(), expires_at: 1 };
        assert_eq!(to_pb(&sid).map(|r| r.kind), Some(pb::RevocationKind::Sid as i32));
    }
}
