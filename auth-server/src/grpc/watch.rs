//! `WatchRevocations`: a snapshot of the deny list, then each revocation as
//! it happens, with heartbeats in between. A watcher that falls behind is
//! closed so it reconnects for a fresh snapshot.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::core::AuthCore;
use crate::error::AuthError;
use crate::store::{Revocation, RevocationKind};

/// The stream of a watcher.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

fn to_pb(r: &Revocation) -> pb::Revocation {
    let kind = match r.kind {
        RevocationKind::Jti => pb::RevocationKind::Jti,
        RevocationKind::Sid => pb::RevocationKind::Sid,
        RevocationKind::Family => pb::RevocationKind::Family,
    };
    pb::Revocation { kind: kind as i32, id: r.id.clone(), expires_at: r.expires_at }
}

pub(super) async fn handle(
    core: Arc<AuthCore>,
    _req: Request<pb::WatchRevocationsRequest>,
) -> Result<Response<EventStream>, Status> {
    // Subscribe before reading the snapshot, so nothing falls between.
    let mut events = core.store.subscribe();
    let now = core.clock.now_unix();
    let snapshot = core.store.revoked_snapshot(now).await.map_err(|e| Status::from(AuthError::Store(e)))?;
    let heartbeat = Duration::from_secs(core.watch.heartbeat_secs);
    let stream = channel_stream(move |tx| async move {
        let first = pb::RevocationEvent {
            event: Some(pb::revocation_event::Event::Snapshot(pb::RevocationSnapshot {
                entries: snapshot.iter().map(to_pb).collect(),
            })),
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(heartbeat);
        tick.reset();
        loop {
            let msg = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(r) => pb::revocation_event::Event::Revoked(to_pb(&r)),
                    Err(RecvError::Lagged(n)) => {
                        // The client missed events: make it reconnect for a fresh snapshot.
                        tracing::warn!(missed = n, "revocation watcher lagged; closing stream");
                        let _ = tx.send(Err(Status::unavailable("revocation stream lagged; reconnect"))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => pb::revocation_event::Event::Heartbeat(pb::Heartbeat { server_time: core.clock.now_unix() }),
            };
            if tx.send(Ok(pb::RevocationEvent { event: Some(msg) })).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(stream)))
}

/// A stream fed by a task through a small channel; the task ends when the
/// client goes away (the receiver is dropped).
fn channel_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<pb::RevocationEvent, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::RevocationEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
