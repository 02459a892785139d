//! `WatchRevocations`: a snapshot of the deny list in bounded chunks, then
//! each revocation as it happens, with heartbeats in between.
//!
//! Only `jti` and `sid` revocations reach watchers: refresh-token families
//! matter to the auth server alone. Watchers that arrive together (a
//! reconnect storm after a restart, a resync) share one read of the store
//! and one set of chunks ([`Snapshots`]), with the replica's own deny set
//! ([`crate::revocations`]) when it reads at the same time.
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

use crate::config::LimitsConfig;
use crate::core::AuthCore;
use crate::edge::ConnInfo;
use crate::error::AuthError;
use crate::observe::Rpc;
use crate::revocations::{Snapshot, Snapshots, revoked, to_pb};
use crate::store::{FeedState, Revocation};

/// The stream of a watcher.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

/// Messages buffered per watcher between its task and the transport. Small:
/// a snapshot chunk is up to 1 MiB, and the store's broadcast
/// is the buffer for events.
const STREAM_BUFFER: usize = 4;

/// What every WatchRevocations stream of one server shares: the snapshots,
/// the stream caps and the shutdown signal.
pub(super) struct Hub {
    snapshots: Arc<Snapshots>,
    caps: Arc<Caps>,
    stop: watch::Receiver<bool>,
}

impl Hub {
    /// Streams open now on this replica.
    pub(super) fn open_streams(&self) -> usize {
        self.caps.lock().total
    }

    /// Caps from `limits`; snapshots read through `snapshots`; every
    /// stream ends once `stop` turns true.
    pub(super) fn new(limits: &LimitsConfig, snapshots: Arc<Snapshots>, stop: watch::Receiver<bool>) -> Self {
        Self {
            snapshots,
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
    let (chunks, since) = hub
        .snapshots
        .get(&*core.store, core.clock.now_unix(), state.epoch)
        .await
        .map_err(|e| Status::from(AuthError::Store(e)))?;
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
        match self.hub.snapshots.get(&*self.core.store, self.core.clock.now_unix(), epoch).await {
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
}
