//! [`TokenSourceBuilder`]: the tunables of a token source, its exchange
//! service and the layers around it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tower::{Layer, Service};

use super::exchange::{
    BatchService, ExchangeRequest, ExchangeResponse, ExchangeService, GrpcExchange, boxed, boxed_batch,
};
use super::renew::{RenewPoint, renewer};
use super::{Inner, Stats, TokenSource};
use crate::BoxError;
use crate::backoff::Backoff;
use crate::client::clock::Clock;
use crate::client::credentials::Credentials;

/// Jitter of the exchange back-off: each delay is drawn from `[d/2, d]`.
const BACKOFF_JITTER: f64 = 0.5;

/// Tunables of a [`TokenSource`].
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) requested_ttl: u32,
    pub(super) expiry_margin: u64,
    pub(super) renew_point: RenewPoint,
    pub(super) tick: Duration,
    pub(super) idle_timeout: u64,
    /// The back-off each slot starts from.
    pub(super) backoff: Backoff,
    pub(super) max_delegated: usize,
    pub(super) scopes: HashMap<String, Vec<String>>,
    /// The audiences declared up front: fetched at start-up, kept fresh.
    pub(super) audiences: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            requested_ttl: 0,
            expiry_margin: 5,
            renew_point: RenewPoint::default(),
            tick: Duration::from_secs(1),
            idle_timeout: 3600,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)).jitter(BACKOFF_JITTER),
            max_delegated: 10_000,
            scopes: HashMap::new(),
            audiences: Vec::new(),
        }
    }
}

/// A layer, erased: wraps the exchange service.
type BoxLayer = Box<dyn FnOnce(ExchangeService) -> ExchangeService + Send>;

/// Builds a [`TokenSource`].
pub struct TokenSourceBuilder {
    exchange: ExchangeService,
    grpc: Option<GrpcExchange>,
    batch: Option<BatchService>,
    layers: Vec<BoxLayer>,
    creds: Arc<dyn Credentials>,
    clock: Arc<dyn Clock>,
    cfg: Config,
}

impl std::fmt::Debug for TokenSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSourceBuilder")
            .field("cfg", &self.cfg)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl TokenSourceBuilder {
    pub(super) fn new(
        exchange: ExchangeService,
        grpc: Option<GrpcExchange>,
        creds: Arc<dyn Credentials>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let batch = grpc.as_ref().map(|g| boxed_batch(g.clone()));
        Self { exchange, grpc, batch, layers: Vec::new(), creds, clock, cfg: Config::default() }
    }

    /// The clock (default: the system clock). Token lifetimes, renewal and
    /// retry back-off are all measured on it.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Wraps the exchange service in `layer` (a timeout, trace propagation,
    /// metrics, ...). As with `tower::ServiceBuilder`, the first layer added
    /// is the outermost. Errors of the layers count as transient
    /// ([`TokenError::Unavailable`](super::TokenError::Unavailable)) unless
    /// they are a `tonic::Status` or a `TokenError`.
    ///
    /// ```no_run
    /// # async fn f(channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
    /// use service_sdk::{EnvCredentials, ExchangeRequest, TokenSource};
    /// use tonic::metadata::MetadataValue;
    /// let propagate = tower::util::MapRequestLayer::new(|mut req: ExchangeRequest| {
    ///     req.metadata.insert("x-request-source", MetadataValue::from_static("order"));
    ///     req
    /// });
    /// let source = TokenSource::builder(channel, EnvCredentials::from_env()?).layer(propagate).build();
    /// # let _ = source; Ok(()) }
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ExchangeService> + Send + 'static,
        L::Service: Service<ExchangeRequest, Response = ExchangeResponse> + Clone + Send + Sync + 'static,
        <L::Service as Service<ExchangeRequest>>::Error: Into<BoxError>,
        <L::Service as Service<ExchangeRequest>>::Future: Send + 'static,
    {
        self.layers.push(Box::new(move |inner| boxed(layer.layer(inner))));
        self
    }

    /// Lifetime to ask for; `Duration::ZERO` (the default) takes the
    /// server's default. Whole seconds, capped by the server.
    pub fn requested_ttl(mut self, ttl: Duration) -> Self {
        self.cfg.requested_ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        self
    }

    /// Scopes to ask for when calling `audience` (default: everything the
    /// policy allows).
    pub fn scopes(mut self, audience: impl Into<String>, scopes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.cfg.scopes.insert(audience.into(), scopes.into_iter().map(Into::into).collect());
        self
    }

    /// The audiences this service will call. The source fetches their
    /// tokens in one `ExchangeTokens` call (per 16 audiences) as soon as it
    /// is built, renews those due together in one call, and
    /// [`TokenSource::ready`] waits for them. Other audiences can still be
    /// asked for; they are fetched when first asked for, one call each.
    pub fn audiences(mut self, audiences: impl IntoIterator<Item = impl Into<String>>) -> Self {
        for a in audiences {
            let a = a.into();
            if !a.is_empty() && !self.cfg.audiences.contains(&a) {
                self.cfg.audiences.push(a);
            }
        }
        self
    }

    /// The batch exchange, instead of the auth channel's (tests script it).
    #[cfg(test)]
    pub(super) fn batch_exchange(mut self, batch: BatchService) -> Self {
        self.batch = Some(batch);
        self
    }

    /// A token is no longer served this many seconds before it expires
    /// (default 5, and never more than a tenth of the token's life).
    pub fn expiry_margin_secs(mut self, secs: u64) -> Self {
        self.cfg.expiry_margin = secs;
        self
    }

    /// How often the renewer looks for tokens due for renewal (default 1 s).
    pub fn renew_check_interval(mut self, every: Duration) -> Self {
        self.cfg.tick = every.max(Duration::from_millis(1));
        self
    }

    /// Stop renewing an audience nobody asked for during this long
    /// (default one hour).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.cfg.idle_timeout = idle.as_secs();
        self
    }

    /// First retry delay after a failed exchange (default 100 ms) and the
    /// cap of the doubling delay (default 30 s); each delay is jittered
    /// down by up to half.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.cfg.backoff = Backoff::new(base, cap).jitter(BACKOFF_JITTER);
        self
    }

    /// Starts the source and its background renewer. Needs a Tokio runtime.
    pub fn build(self) -> TokenSource {
        let mut exchange = self.exchange;
        // The last layer added wraps first, so the first ends up outermost.
        for layer in self.layers.into_iter().rev() {
            exchange = layer(exchange);
        }
        let inner = Arc::new(Inner {
            exchange,
            batch: self.batch,
            batch_unsupported: std::sync::atomic::AtomicBool::new(false),
            settled: tokio::sync::Notify::new(),
            certificate: arc_swap::ArcSwapOption::empty(),
            grpc: self.grpc,
            creds: self.creds,
            clock: self.clock,
            cfg: self.cfg,
            service: RwLock::new(HashMap::new()),
            delegated: RwLock::new(HashMap::new()),
            stats: Stats::default(),
            renewer: Mutex::new(None),
        });
        let handle = tokio::spawn(renewer(Arc::downgrade(&inner), inner.cfg.tick));
        if let Ok(mut slot) = inner.renewer.lock() {
            *slot = Some(handle);
        }
        if !inner.cfg.audiences.is_empty() {
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                if let Some(inner) = weak.upgrade() {
                    inner.start_up().await;
                }
            });
        }
        TokenSource { inner }
    }
}
