//! `WatchRevocations`: a snapshot of the deny list in bounded chunks, then
//! each revocation as it happens, with heartbeats in between.
//!
//! Only `jti` and `sid` revocations reach watchers: refresh-token families
//! matter to the auth server alone. Watchers that arrive together (a
//! reconnect storm after a restart, a resync) share one read of the store
//! and one set of chunks ([`Snapshots`]).
//!
//! A stream follows the store's feed ([`FeedState`]): heartbeats flow only
//! while the feed is live, so a verifier never counts as fresh a replica
//! that cannot hear revocations made elsewhere. When the feed stops being
//! live every stream ends with `UNAVAILABLE` (and new ones are refused), so
//! verifiers fail over to another replica. When its epoch moves (messages
//! may have been lost), or a watcher falls behind the store's broadcast,
//! the stream gets a fresh snapshot in place. Shutdown ends every stream at
//! once with `UNAVAILABLE`. Every send to the client also watches the stop
//! signal and the feed ([`Watcher::send_or_stop`]), so a watcher blocked on
//! a client that stopped reading (in the middle of a large snapshot) still
//! ends at shutdown or when the feed stops being live, dropping the rest;
//! its final status never waits on the client's buffer. Open streams are
//! capped per replica and per client identity (`[limits]
//! watch_max_streams*`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use futures_util::Stream;
use prost::Message as _;
use prost::encoding::encoded_len_varint;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::config::LimitsConfig;
use crate::core::AuthCore;
use crate::edge::ConnInfo;
use crate::error::AuthError;
use crate::observe::Rpc;
use crate::store::{FeedState, Revocation, RevocationKind, StoreError};

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
    /// The feed's epoch its reader had seen before reading.
    epoch: u64,
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

/// A snapshot to send: the chunks, then revocations made since their read.
type Snapshot = (Arc<[pb::RevocationEvent]>, Vec<pb::Revocation>);

impl Snapshots {
    /// The snapshot to send a watcher that has seen the feed at `epoch` and
    /// whose event receiver was subscribed before this call: the chunks,
    /// then revocations made since they were read (a fresh read unless one
    /// of the same epoch is shared). Nothing is missed: the shared read's
    /// own receiver covers the time up to now, and a read is shared only
    /// within the epoch its reader had seen, so it was made after whatever
    /// the feed lost before that epoch.
    async fn get(&self, core: &AuthCore, epoch: u64) -> Result<Snapshot, StoreError> {
        let mut current = self.current.lock().await;
        if let Some(shared) = current.as_mut()
            && shared.epoch == epoch
            && shared.read_at.elapsed() < SHARE_WINDOW
            && let Some(chunks) = shared.chunks.upgrade()
            && catch_up(shared)
        {
            return Ok((chunks, shared.since.clone()));
        }
        let since_rx = core.store.subscribe();
        let entries = core.store.revoked_snapshot(core.clock.now_unix()).await?;
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

/// What every WatchRevocations stream of one server shares: the snapshots,
/// the stream caps and the shutdown signal.
pub(super) struct Hub {
    snapshots: Snapshots,
    caps: Arc<Caps>,
    stop: watch::Receiver<bool>,
}

impl Hub {
    /// Streams open now on this replica.
    pub(super) fn open_streams(&self) -> usize {
        self.caps.lock().total
    }

    /// Caps from `limits`; every stream ends once `stop` turns true.
    pub(super) fn new(limits: &LimitsConfig, stop: watch::Receiver<bool>) -> Self {
        Self {
            snapshots: Snapshots::default(),
            caps: Arc::new(Caps::new(limits.watch_max_streams, limits.watch_max_streams_per_client)),
            stop,
        }
    }
}

/// Resolves once `stop` turns true; never if its sender is gone first.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once the feed is not live (or its sender is gone).
async fn feed_lost(feed: &mut watch::Receiver<FeedState>) {
    let _ = feed.wait_for(|s| !s.live).await;
}

/// Open streams per replica and per client identity.
struct Caps {
    max_total: usize,
    max_per_client: usize,
    open: Mutex<OpenStreams>,
}

#[derive(Default)]
struct OpenStreams {
    total: usize,
    per_client: HashMap<String, usize>,
}

/// One open stream's place under the caps, given back when dropped (the
/// stream ended or its client went away).
struct Permit {
    caps: Arc<Caps>,
    client: String,
}

impl Caps {
    fn new(max_total: usize, max_per_client: usize) -> Self {
        Self { max_total, max_per_client, open: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenStreams> {
        // The counts stay consistent under any panic: each update is one
        // statement.
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn acquire(self: &Arc<Self>, client: String) -> Result<Permit, AuthError> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(AuthError::ResourceExhausted("too many revocation watchers on this replica"));
        }
        let mine = open.per_client.get(&client).copied().unwrap_or(0);
        if mine >= self.max_per_client {
            return Err(AuthError::ResourceExhausted("too many revocation watchers for this client"));
        }
        open.total += 1;
        open.per_client.insert(client.clone(), mine + 1);
        Ok(Permit { caps: Arc::clone(self), client })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_client.remove(&self.client);
            }
        }
    }
}

/// Whom a stream counts against: the caller's mTLS identity (read once per
/// connection by the edge), else its IP address.
fn client_key<T>(req: &Request<T>) -> String {
    let Some(info) = req.extensions().get::<ConnInfo>() else {
        return "unknown".into();
    };
    if let Some(peer) = &info.peer {
        return peer.id.clone();
    }
    info.remote_addr.map_or_else(|| "unknown".into(), |a| a.ip().to_string())
}

fn shutting_down() -> Status {
    Status::unavailable("server shutting down")
}

fn not_live() -> Status {
    Status::unavailable("this replica cannot hear revocations now; use another")
}

pub(super) async fn handle(
    core: Arc<AuthCore>,
    hub: Arc<Hub>,
    req: Request<pb::WatchRevocationsRequest>,
) -> Result<Response<EventStream>, Status> {
    let permit = hub.caps.acquire(client_key(&req)).map_err(|e| {
        let peer = crate::tls::PeerIdentity::of(&req);
        crate::observe::denied(&*core.events, Rpc::WatchRevocations, super::caller("", peer.as_deref()), &e);
        Status::from(e)
    })?;
    if *hub.stop.borrow() {
        return Err(shutting_down());
    }
    let mut feed = core.store.feed_state();
    let state = *feed.borrow_and_update();
    if !state.live {
        return Err(not_live());
    }
    // Subscribe before reading the snapshot, so nothing falls between.
    let events = core.store.subscribe();
    let (chunks, since) = hub.snapshots.get(&core, state.epoch).await.map_err(|e| Status::from(AuthError::Store(e)))?;
    let stream = channel_stream(move |tx, last| async move {
        let watcher = Watcher { core, hub, tx, last: Some(last), feed, epoch: state.epoch, events, _permit: permit };
        watcher.run((chunks, since)).await;
    });
    Ok(Response::new(Box::pin(stream)))
}

/// One stream's task.
struct Watcher {
    core: Arc<AuthCore>,
    hub: Arc<Hub>,
    tx: mpsc::Sender<Result<pb::RevocationEvent, Status>>,
    /// The stream's final status, sent after whatever `tx` holds, without
    /// waiting on the client.
    last: Option<oneshot::Sender<Status>>,
    feed: watch::Receiver<FeedState>,
    /// The epoch the last snapshot sent belongs to.
    epoch: u64,
    events: broadcast::Receiver<Revocation>,
    _permit: Permit,
}

impl Watcher {
    async fn run(mut self, first: Snapshot) {
        if !self.send_snapshot(first).await {
            return;
        }
        let mut stop = self.hub.stop.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(self.core.watch.heartbeat_secs));
        // After a blocked send, one heartbeat, not a burst of missed ones.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            let msg = tokio::select! {
                biased;
                () = stopping(&mut stop) => return self.end(shutting_down()),
                () = self.tx.closed() => return,
                changed = self.feed.changed() => {
                    let state = *self.feed.borrow_and_update();
                    if changed.is_err() || !state.live {
                        tracing::info!("revocation feed not live; ending watch stream");
                        return self.end(not_live());
                    }
                    if state.epoch != self.epoch {
                        tracing::info!(epoch = state.epoch, "revocation feed resynced; sending a fresh snapshot");
                        if !self.resync(state.epoch).await {
                            return;
                        }
                    }
                    continue;
                }
                ev = self.events.recv() => match ev {
                    Ok(r) => match to_pb(&r) {
                        Some(r) => revoked(r),
                        None => continue,
                    },
                    Err(RecvError::Lagged(missed)) => {
                        // Events were lost for this watcher alone: a fresh
                        // snapshot on the same stream.
                        tracing::warn!(missed, "revocation watcher lagged; sending a fresh snapshot");
                        if !self.resync(self.epoch).await {
                            return;
                        }
                        continue;
                    }
                    Err(RecvError::Closed) => return self.end(not_live()),
                },
                _ = tick.tick() => {
                    // Only a live feed vouches for freshness; a change
                    // waiting above ends the stream.
                    if !self.feed.borrow().live {
                        continue;
                    }
                    pb::RevocationEvent {
                        event: Some(pb::revocation_event::Event::Heartbeat(pb::Heartbeat {
                            server_time: self.core.clock.now_unix(),
                        })),
                    }
                }
            };
            if !self.send_or_stop(msg).await {
                return;
            }
        }
    }

    /// Sends `msg` unless, while waiting for room, the server stops or the
    /// feed stops being live: then the message is dropped and the stream
    /// ends with that status. False when the stream is over.
    async fn send_or_stop(&mut self, msg: pb::RevocationEvent) -> bool {
        let (mut stop, mut feed) = (self.hub.stop.clone(), self.feed.clone());
        let outcome = tokio::select! {
            biased;
            () = stopping(&mut stop) => Err(shutting_down()),
            () = feed_lost(&mut feed) => Err(not_live()),
            sent = self.tx.send(Ok(msg)) => Ok(sent.is_ok()),
        };
        match outcome {
            Ok(sent) => sent,
            Err(status) => {
                tracing::info!(
                    reason = status.message(),
                    "revocation watcher blocked on its client; ending the stream"
                );
                self.end(status);
                false
            }
        }
    }

    /// Sends a fresh snapshot of `epoch` on the open stream, read after a
    /// new subscription; false when the stream is over.
    async fn resync(&mut self, epoch: u64) -> bool {
        self.events = self.core.store.subscribe();
        self.epoch = epoch;
        match self.hub.snapshots.get(&self.core, epoch).await {
            Ok(snapshot) => self.send_snapshot(snapshot).await,
            Err(e) => {
                self.end(Status::from(AuthError::Store(e)));
                false
            }
        }
    }

    /// False when the stream is over.
    async fn send_snapshot(&mut self, (chunks, since): Snapshot) -> bool {
        for msg in chunks.iter().cloned().chain(since.into_iter().map(revoked)) {
            if !self.send_or_stop(msg).await {
                return false;
            }
        }
        true
    }

    /// Ends the stream with `status`, after what is already queued; never
    /// waits.
    fn end(&mut self, status: Status) {
        if let Some(last) = self.last.take() {
            let _ = last.send(status);
        }
    }
}

fn revoked(r: pb::Revocation) -> pb::RevocationEvent {
    pb::RevocationEvent { event: Some(pb::revocation_event::Event::Revoked(r)) }
}

/// A stream fed by a task through a small channel, then closed by the
/// status the task sends on its oneshot (if any) once it is done; the task
/// ends when the client goes away (the receiver is dropped).
fn channel_stream<F, Fut>(f: F) -> impl Stream<Item = Result<pb::RevocationEvent, Status>> + Send + 'static
where
    F: FnOnce(mpsc::Sender<Result<pb::RevocationEvent, Status>>, oneshot::Sender<Status>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures_util::StreamExt as _;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let (last_tx, last_rx) = oneshot::channel();
    tokio::spawn(f(tx, last_tx));
    let last = futures_util::stream::once(last_rx).filter_map(|r| std::future::ready(r.ok().map(Err)));
    tokio_stream::wrappers::ReceiverStream::new(rx).chain(last)
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
    fn caps_count_per_replica_and_per_client_and_permits_give_back() {
        let caps = Arc::new(Caps::new(3, 2));
        let a1 = caps.acquire("a".into()).unwrap();
        let _a2 = caps.acquire("a".into()).unwrap();
        let err = caps.acquire("a".into()).err().unwrap();
        assert!(matches!(err, AuthError::ResourceExhausted(m) if m.contains("for this client")), "{err:?}");
        let _b1 = caps.acquire("b".into()).unwrap();
        let err = caps.acquire("c".into()).err().unwrap();
        assert!(matches!(err, AuthError::ResourceExhausted(m) if m.contains("on this replica")), "{err:?}");
        drop(a1);
        let _a3 = caps.acquire("a".into()).unwrap();
        drop(_b1);
        assert!(!caps.lock().per_client.contains_key("b"), "an identity with no stream is forgotten");
    }

    #[test]
    fn families_never_reach_watchers() {
        let family = Revocation { kind: RevocationKind::Family, id: "f".into(), expires_at: 1 };
        assert_eq!(to_pb(&family), None);
        let sid = Revocation { kind: RevocationKind::Sid, id: "s".into(), expires_at: 1 };
        assert_eq!(to_pb(&sid).map(|r| r.kind), Some(pb::RevocationKind::Sid as i32));
    }
}
