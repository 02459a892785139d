//! The revocation subscriber's lifecycle: its own connection, subscribed to
//! the layout's channel on every (re)connection, retrying while the
//! connection lasts; messages forwarded to local subscribers; and the
//! feed's state ([`FeedState`]) for them.
//!
//! # Liveness
//!
//! A subscribed connection carries nothing while no one revokes, so
//! silence proves nothing: a partition that keeps the socket open (a
//! dropped route, a frozen proxy) looks exactly like a quiet channel. The
//! subscriber therefore sends `PING` on its own connection every
//! `redis.subscriber_ping_ms` (RESP2 allows it while subscribed), bounded
//! by the command timeout. A ping that fails or times out makes the feed
//! not live at once and forces a reconnection; so does a connection that
//! stays down (or unsubscribed) for longer than one ping interval plus the
//! timeout. A short drop that is repaired within that bound does not: the
//! feed stays live and only its epoch moves.
//!
//! # Epochs
//!
//! Pub/sub messages published while the subscriber was away, or dropped
//! when fred's message channel lagged, are lost. Instead of replaying the
//! deny list into the local broadcast (a large list overflows it), the
//! subscriber bumps the feed's epoch on every new subscription and on
//! every lag: whoever holds state built from the events (a watch stream)
//! re-reads the snapshot.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::{Builder, ClientLike, EventInterface, PubsubInterface};
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Fuse, FusedFuture as _};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::codec::parse_message;
use super::{Shared, map_error};
use crate::store::{FeedState, Revocation, StoreError};

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
    state: watch::Receiver<FeedState>,
    forwarder: JoinHandle<()>,
}

impl Subscriber {
    /// Builds the subscriber's client from `builder` and starts it: it
    /// connects and subscribes in the background, reconnecting by itself,
    /// and pings its connection every `ping_every`.
    /// `watch` sees the client before it connects (to follow its
    /// connection events).
    pub(super) fn start(
        builder: &Builder,
        shared: Arc<Shared>,
        ping_every: Duration,
        watch: impl FnOnce(&SubscriberClient),
    ) -> Result<Self, StoreError> {
        let client = builder.build_subscriber_client().map_err(map_error)?;
        watch(&client);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (subscribed_tx, subscribed) = watch::channel(false);
        let (state_tx, state) = watch::channel(FeedState { live: false, epoch: 0 });
        // Take the receivers before connecting, so the first connection
        // event is not missed.
        let forwarder = tokio::spawn(
            Forwarder {
                shared,
                client: client.clone(),
                events: events.clone(),
                subscribed: subscribed_tx,
                state: state_tx,
                ping_every,
                heard_at: Instant::now(),
            }
            .run(client.message_rx(), client.reconnect_rx()),
        );
        // It spawns its connection task; the handle is not needed.
        drop(client.connect());
        Ok(Self { client, events, subscribed, state, forwarder })
    }

    /// Resolves once subscribed (at once if already).
    pub(super) async fn subscribed(&self) {
        let mut subscribed = self.subscribed.clone();
        let _ = subscribed.wait_for(|s| *s).await;
    }

    /// Whether the subscriber is connected, subscribed and answering, so
    /// that revocations made by other replicas reach this one.
    pub(super) fn is_live(&self) -> bool {
        self.state.borrow().live && self.client.is_connected() && *self.subscribed.borrow()
    }

    /// A receiver of every revocation heard from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.events.subscribe()
    }

    /// The feed's state, as it changes.
    pub(super) fn feed_state(&self) -> watch::Receiver<FeedState> {
        self.state.clone()
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

/// The forwarding task's state.
struct Forwarder {
    shared: Arc<Shared>,
    client: SubscriberClient,
    events: broadcast::Sender<Revocation>,
    subscribed: watch::Sender<bool>,
    state: watch::Sender<FeedState>,
    ping_every: Duration,
    /// The last sign that the subscription works: subscribed, a message or
    /// a pong.
    heard_at: Instant,
}

/// A ping in flight: whether it was answered in time.
type Ping = Pin<Box<Fuse<BoxFuture<'static, bool>>>>;

impl Forwarder {
    /// How long the subscription may go unconfirmed before the feed is
    /// not live.
    fn grace(&self) -> Duration {
        self.ping_every + self.shared.timeout
    }

    /// Forwards channel messages into `events`; (re)subscribes on every
    /// connection; pings; keeps the feed state.
    async fn run(
        mut self,
        mut messages: broadcast::Receiver<fred::types::Message>,
        mut connections: broadcast::Receiver<fred::types::config::Server>,
    ) {
        use broadcast::error::RecvError;
        let channel = self.shared.layout.channel().to_owned();
        let mut tick = tokio::time::interval(self.ping_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping: Ping = Box::pin(Fuse::terminated());
        loop {
            tokio::select! {
                // A new connection first: it clears `subscribed` before a
                // pong on that connection (not subscribed yet) is seen.
                biased;
                connection = connections.recv() => match connection {
                    Ok(_) | Err(RecvError::Lagged(_)) => self.resubscribe(&channel).await,
                    Err(RecvError::Closed) => return,
                },
                message = messages.recv() => match message {
                    Ok(message) => {
                        if message.channel != channel.as_str() {
                            continue;
                        }
                        self.heard_at = Instant::now();
                        match message.value.as_string().as_deref().and_then(parse_message) {
                            Some(revocation) => {
                                let _ = self.events.send(revocation);
                            }
                            None => tracing::warn!("redis revocation channel: unreadable message ignored"),
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "redis revocation channel lagged; watchers resync");
                        self.state.send_modify(|s| s.epoch += 1);
                    }
                    Err(RecvError::Closed) => return,
                },
                answered = &mut ping => {
                    if answered {
                        self.heard_at = Instant::now();
                        if !self.state.borrow().live && *self.subscribed.borrow() {
                            self.set_live();
                        }
                    } else {
                        tracing::warn!("redis revocation subscriber: ping unanswered; reconnecting");
                        self.set_not_live();
                        self.reconnect();
                    }
                }
                _ = tick.tick(), if ping.is_terminated() => {
                    if self.client.is_connected() && *self.subscribed.borrow() {
                        let (client, timeout) = (self.client.clone(), self.shared.timeout);
                        let answered = async move {
                            matches!(
                                tokio::time::timeout(timeout, client.ping::<fred::types::Value>(None)).await,
                                Ok(Ok(_))
                            )
                        };
                        ping = Box::pin(answered.boxed().fuse());
                    } else {
                        self.check_gap();
                    }
                }
            }
        }
    }

    /// Subscribes on a new connection, retrying while it lasts. A new
    /// subscription is a new epoch: messages may have been lost since the
    /// last one.
    async fn resubscribe(&mut self, channel: &str) {
        self.subscribed.send_replace(false);
        loop {
            match self.shared.unchecked(self.client.subscribe(channel)).await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "redis revocation channel: subscribe failed"),
            }
            self.check_gap();
            if !self.client.is_connected() {
                // A new connection brings a new event.
                return;
            }
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
        self.subscribed.send_replace(true);
        self.set_live();
    }

    /// Not live once the subscription has gone unconfirmed for too long.
    fn check_gap(&self) {
        if self.heard_at.elapsed() > self.grace() {
            self.set_not_live();
        }
    }

    /// Live again, in a new epoch.
    fn set_live(&mut self) {
        self.heard_at = Instant::now();
        self.state.send_modify(|s| {
            s.live = true;
            s.epoch += 1;
        });
    }

    fn set_not_live(&self) {
        self.state.send_if_modified(|s| {
            let was = s.live;
            s.live = false;
            if was {
                tracing::warn!("redis revocation subscriber not live: revocations may not reach this replica");
            }
            was
        });
    }

    /// Drops the connection and connects anew, in the background: the
    /// reconnection's result arrives as a connection event.
    fn reconnect(&self) {
        let client = self.client.clone();
        let timeout = self.shared.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, client.force_reconnection()).await;
        });
    }
}
