//! The revocation subscriber's lifecycle: its own connection, subscribed to
//! the layout's channel on every (re)connection, retrying while the
//! connection lasts; messages forwarded to local subscribers; after a
//! reconnect or a lag, the whole snapshot replayed, since pub/sub messages
//! sent meanwhile are lost. It is live while connected and subscribed.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{Builder, ClientLike, EventInterface, PubsubInterface};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::codec::parse_message;
use super::{Shared, map_error};
use crate::store::{Revocation, StoreError};

/// Capacity of the revocation broadcast (and of fred's message channel).
pub(super) const EVENT_CAPACITY: usize = 4096;

/// Pause between subscribe attempts on one connection.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(100);

/// The subscription and the task forwarding it. Dropping it stops the task
/// and closes the connection.
pub(super) struct Subscriber {
    client: SubscriberClient,
    events: broadcast::Sender<Revocation>,
    /// Whether the client is subscribed on its current connection.
    subscribed: watch::Receiver<bool>,
    forwarder: JoinHandle<()>,
}

impl Subscriber {
    /// Builds the subscriber's client from `builder` and starts it: it
    /// connects and subscribes in the background, reconnecting by itself.
    pub(super) fn start(builder: &Builder, shared: Arc<Shared>) -> Result<Self, StoreError> {
        let client = builder.build_subscriber_client().map_err(map_error)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (subscribed_tx, subscribed) = watch::channel(false);
        // Take the receivers before connecting, so the first connection
        // event is not missed.
        let forwarder = tokio::spawn(forward(
            shared,
            client.clone(),
            client.message_rx(),
            client.reconnect_rx(),
            events.clone(),
            subscribed_tx,
        ));
        // It spawns its connection task; the handle is not needed.
        drop(client.connect());
        Ok(Self { client, events, subscribed, forwarder })
    }

    /// Resolves once subscribed (at once if already).
    pub(super) async fn subscribed(&self) {
        let mut subscribed = self.subscribed.clone();
        let _ = subscribed.wait_for(|s| *s).await;
    }

    /// Whether the subscriber is connected and subscribed, so that
    /// revocations made by other replicas reach this one.
    pub(super) fn is_live(&self) -> bool {
        self.client.is_connected() && *self.subscribed.borrow()
    }

    /// A receiver of every revocation heard from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.events.subscribe()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.forwarder.abort();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            handle.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

/// Forwards channel messages into `events`; (re)subscribes on every
/// connection, and after a reconnect re-publishes the snapshot locally.
async fn forward(
    shared: Arc<Shared>,
    subscriber: SubscriberClient,
    mut messages: broadcast::Receiver<fred::types::Message>,
    mut connections: broadcast::Receiver<fred::types::config::Server>,
    events: broadcast::Sender<Revocation>,
    subscribed: watch::Sender<bool>,
) {
    use broadcast::error::RecvError;
    let channel = shared.layout.channel().to_owned();
    let mut connected_before = false;
    loop {
        tokio::select! {
            connection = connections.recv() => match connection {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    subscribed.send_replace(false);
                    // Retry while this connection lasts; a new one brings a
                    // new event.
                    loop {
                        match shared.bounded(subscriber.subscribe(channel.as_str())).await {
                            Ok(()) => break,
                            Err(e) => tracing::warn!(error = %e, "redis revocation channel: subscribe failed"),
                        }
                        if !subscriber.is_connected() {
                            break;
                        }
                        tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
                    }
                    if !subscriber.is_connected() {
                        continue;
                    }
                    subscribed.send_replace(true);
                    if connected_before {
                        replay(&shared, &events).await;
                    }
                    connected_before = true;
                }
                Err(RecvError::Closed) => return,
            },
            message = messages.recv() => match message {
                Ok(message) => {
                    if message.channel != channel.as_str() {
                        continue;
                    }
                    match message.value.as_string().as_deref().and_then(parse_message) {
                        Some(revocation) => {
                            let _ = events.send(revocation);
                        }
                        None => tracing::warn!("redis revocation channel: unreadable message ignored"),
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "redis revocation channel lagged; replaying the snapshot");
                    replay(&shared, &events).await;
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Re-sends every stored revocation to local subscribers (after messages
/// may have been lost). `now = 0`: the store has no clock of its own, and a
/// stale entry is harmless to a deny set.
async fn replay(shared: &Shared, events: &broadcast::Sender<Revocation>) {
    match shared.snapshot(0).await {
        Ok(all) => {
            for revocation in all {
                let _ = events.send(revocation);
            }
        }
        Err(e) => tracing::warn!(error = %e, "redis revocation replay failed"),
    }
}
