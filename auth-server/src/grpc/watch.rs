//! `WatchRevocations`: a snapshot of the deny list in bounded chunks, then
//! each revocation as it happens, with heartbeats in between. A watcher
//! that falls behind is closed so it reconnects for a fresh snapshot.
//!
//! Only `jti` and `sid` revocations reach watchers: refresh-token families
//! matter to the auth server alone. Watchers that arrive together (a
//! reconnect storm after a restart) share one read of the store and one
//! set of chunks ([`Snapshots`]).

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use futures_util::Stream;
use prost::Message as _;
use prost::encoding::encoded_len_varint;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::core::AuthCore;
use crate::error::AuthError;
use crate::store::{Revocation, RevocationKind, StoreError};

/// The stream of a watcher.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

/// Largest encoded size of one snapshot chunk (a whole `RevocationEvent`),
/// well under tonic's default 4 MiB decode limit.
const MAX_CHUNK_BYTES: usize = 1024 * 1024;

/// Watchers arriving within this long of a store read share it.
const SHARE_WINDOW: Duration = Duration::from_secs(1);

/// Messages buffered per watcher between its task and the transport. Small:
/// a snapshot chunk is up to [`MAX_CHUNK_BYTES`], and the store's broadcast
/// is the buffer for events.
const STREAM_BUFFER: usize = 4;

/// The wire form of a revocation a verifier needs; `None` for families.
fn to_pb(r: &Revocation) -> Option<pb::Revocation> {
    let kind = match r.kind {
        RevocationKind::Jti => pb::RevocationKind::Jti,
        RevocationKind::Sid => pb::RevocationKind::Sid,
        RevocationKind::Family => return None,
    };
    Some(pb::Revocation { kind: kind as i32, id: r.id.clone(), expires_at: r.expires_at })
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
    /// Held by the watchers still sending them; gone once all have.
    chunks: Weak<[pb::RevocationEvent]>,
    /// Subscribed before the read: what happened since.
    since_rx: broadcast::Receiver<Revocation>,
    since: Vec<pb::Revocation>,
}

/// Snapshots shared between watchers that arrive together.
#[derive(Default)]
pub(super) struct Snapshots {
    current: tokio::sync::Mutex<Option<Shared>>,
}

impl Snapshots {
    /// The snapshot to send a watcher whose event receiver was subscribed
    /// before this call: the chunks, then revocations made since they were
    /// read (a fresh read unless one is shared). Nothing is missed: the
    /// shared read's own receiver covers the time up to now.
    async fn get(&self, core: &AuthCore) -> Result<(Arc<[pb::RevocationEvent]>, Vec<pb::Revocation>), StoreError> {
        let mut current = self.current.lock().await;
        if let Some(shared) = current.as_mut()
            && shared.read_at.elapsed() < SHARE_WINDOW
            && let Some(chunks) = shared.chunks.upgrade()
            && catch_up(shared)
        {
            return Ok((chunks, shared.since.clone()));
        }
        let since_rx = core.store.subscribe();
        let entries = core.store.revoked_snapshot(core.clock.now_unix()).await?;
        let chunks: Arc<[pb::RevocationEvent]> = chunk_snapshot(entries.iter().filter_map(to_pb)).into();
        *current =
            Some(Shared { read_at: Instant::now(), chunks: Arc::downgrade(&chunks), since_rx, since: Vec::new() });
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

pub(super) async fn handle(
    core: Arc<AuthCore>,
    snapshots: Arc<Snapshots>,
    _req: Request<pb::WatchRevocationsRequest>,
) -> Result<Response<EventStream>, Status> {
    // Subscribe before reading the snapshot, so nothing falls between.
    let mut events = core.store.subscribe();
    let (chunks, since) = snapshots.get(&core).await.map_err(|e| Status::from(AuthError::Store(e)))?;
    let heartbeat = Duration::from_secs(core.watch.heartbeat_secs);
    let stream = channel_stream(move |tx| async move {
        let snapshot = chunks.iter().cloned().chain(since.into_iter().map(revoked));
        for msg in snapshot {
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
        drop(chunks);
        let mut tick = tokio::time::interval(heartbeat);
        tick.reset();
        loop {
            let msg = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(r) => match to_pb(&r) {
                        Some(r) => revoked(r),
                        None => continue,
                    },
                    Err(RecvError::Lagged(n)) => {
                        // The client missed events: make it reconnect for a fresh snapshot.
                        tracing::warn!(missed = n, "revocation watcher lagged; closing stream");
                        let _ = tx.send(Err(Status::unavailable("revocation stream lagged; reconnect"))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => pb::RevocationEvent {
                    event: Some(pb::revocation_event::Event::Heartbeat(pb::Heartbeat { server_time: core.clock.now_unix() })),
                },
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(stream)))
}

fn revoked(r: pb::Revocation) -> pb::RevocationEvent {
    pb::RevocationEvent { event: Some(pb::revocation_event::Event::Revoked(r)) }
}

/// A stream fed by a task through a small channel; the task ends when the
/// client goes away (the receiver is dropped).
fn channel_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<pb::RevocationEvent, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::RevocationEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
    fn families_never_reach_watchers() {
        let family = Revocation { kind: RevocationKind::Family, id: "f".into(), expires_at: 1 };
        assert_eq!(to_pb(&family), None);
        let sid = Revocation { kind: RevocationKind::Sid, id: "s".into(), expires_at: 1 };
        assert_eq!(to_pb(&sid).map(|r| r.kind), Some(pb::RevocationKind::Sid as i32));
    }
}
