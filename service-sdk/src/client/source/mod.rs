//! The token source: audience-scoped access tokens, cached, renewed in the
//! background and fetched at most once at a time (the behaviour is
//! documented on [`TokenSource`]).
//!
//! ## Layout
//! - `slot`: the cache entries, their validity and retry state;
//! - `exchange`: the exchange as a [`tower::Service`] ([`ExchangeService`],
//!   by default [`GrpcExchange`]); timeouts, trace propagation and metrics
//!   attach as [layers](TokenSourceBuilder::layer);
//! - `renew`: the renewal point (`refresh_in`, a pure function) and the
//!   background renewer;
//! - `builder`: the tunables; `error`: [`TokenError`].

mod builder;
mod error;
mod exchange;
mod renew;
mod slot;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwapOption;
use base64::Engine as _;

use tonic::transport::Channel;
use tower::Service;

use builder::Config;
pub use builder::TokenSourceBuilder;
pub use error::TokenError;
use exchange::BatchService;
pub use exchange::{ExchangeRequest, ExchangeResponse, ExchangeService, GrpcExchange};
pub use slot::AccessToken;
use slot::{Slot, SubjectKey, subject_digest};

use super::clock::{Clock, SystemClock};
use super::credentials::Credentials;
use crate::BoxError;
use crate::metrics::SourceMetrics;

/// Counters, for monitoring and for benchmarks (with the `metrics` feature
/// the same events are recorded as `auth_sdk_token_*` metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenSourceStats {
    /// Tokens asked of the auth service: one per ExchangeToken call, one
    /// per audience of an ExchangeTokens call.
    pub exchanges: u64,
    /// Of the calls, ExchangeTokens (batch) calls.
    pub batches: u64,
    /// Of those, sent by the background renewer.
    pub renewals: u64,
    /// Exchanges that failed.
    pub failures: u64,
    /// Token requests that found no valid cached token and had to wait for
    /// an exchange (their own or a concurrent one).
    pub waited: u64,
}

/// The source's counters, and its metrics (feature `metrics`; nothing
/// otherwise): the one place the flows report what they did.
#[derive(Default)]
struct Stats {
    exchanges: AtomicU64,
    batches: AtomicU64,
    renewals: AtomicU64,
    failures: AtomicU64,
    waited: AtomicU64,
    metrics: SourceMetrics,
}

impl Stats {
    /// An exchange for `audience` is sent (by the renewer, if `renewal`).
    fn exchange_sent(&self, audience: &str, renewal: bool) {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        if renewal {
            self.renewals.fetch_add(1, Ordering::Relaxed);
            self.metrics.renewing(audience);
        }
    }

    /// An ExchangeTokens call is sent (each audience also counts as an
    /// exchange sent).
    fn batch_sent(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// An exchange sent for `audience` came back with `result`.
    fn exchange_done(&self, audience: &str, result: Result<(), &TokenError>) {
        self.metrics.exchanged(audience, result);
    }

    /// No token could be had for `audience` (after any retry).
    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A request for `audience` found no valid cached token.
    fn waited(&self, audience: &str) {
        self.waited.fetch_add(1, Ordering::Relaxed);
        self.metrics.waited(audience);
    }
}

struct Inner {
    /// The exchange service with its layers.
    exchange: ExchangeService,
    /// The batch exchange (`ExchangeTokens`), when the source talks to the
    /// auth service over its own channel.
    batch: Option<BatchService>,
    /// The auth service answered `UNIMPLEMENTED` to a batch.
    batch_unsupported: AtomicBool,
    /// Woken whenever an exchange settles (for `ready`).
    settled: tokio::sync::Notify,
    /// The thumbprint (`x5t#S256`) of the client certificate the source now
    /// calls with, once told ([`TokenSource::rotate_certificate`]).
    certificate: ArcSwapOption<String>,
    /// The default inner service, kept to replace its channel.
    grpc: Option<GrpcExchange>,
    creds: Arc<dyn Credentials>,
    clock: Arc<dyn Clock>,
    cfg: Config,
    service: RwLock<HashMap<Box<str>, Arc<Slot>>>,
    delegated: RwLock<HashMap<SubjectKey, Arc<Slot>>>,
    stats: Stats,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.renewer.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
    }
}

/// Audience-scoped access tokens for outgoing calls. Cheap to clone; all
/// clones share one cache and one renewer, which stops when the last clone
/// is dropped.
///
/// # Behaviour
///
/// - **Cache.** Tokens are cached per (audience, subject): the service's own
///   token per audience, and one per (audience, user token) for calls on
///   behalf of a user. A cached token is served until `expiry_margin` before
///   its expiry (measured on the injected [`Clock`] from the `expires_in` of
///   the response, so clock skew with the auth service does not matter).
/// - **Hot path.** [`TokenSource::token`] with a cached token is a map read
///   and an atomic load; it never awaits. [`TokenSource::cached`] is the same
///   read, synchronous.
/// - **Background renewal.** A task started with the source renews each
///   service token at 75% of its life, ±5% jitter, so after warm-up no call
///   waits on an exchange. Tokens of an audience nobody asked for during
///   `idle_timeout` are no longer renewed and are dropped. Tokens obtained on
///   behalf of a user are not renewed (they are request-scoped); they are
///   dropped once expired.
/// - **Single flight.** Concurrent calls that miss the cache for one key wait
///   for one exchange.
/// - **Errors.** A failed exchange is retried with exponential
///   [back-off](crate::backoff::Backoff) (from `backoff_base`, doubling,
///   capped at `backoff_cap`, with jitter), timed on the same clock. While
///   the auth service is down, unexpired cached tokens keep being served; a
///   call that needs a new token during backoff fails at once with
///   [`TokenError::Unavailable`] instead of queueing. An expired token is
///   never served.
/// - **Rotation.** When the auth service refuses the service's own
///   credentials ([`TokenError::CredentialsRejected`]), the source asks its
///   [`Credentials`] to [`refresh`](Credentials::refresh) (a file or Vault
///   source re-reads it) and, if they changed, retries once at once: a
///   rotated secret is picked up without a restart.
/// - **Batches.** The audiences a service will call can be declared
///   ([`TokenSourceBuilder::audiences`]): the source fetches them all in one
///   `ExchangeTokens` call when it starts, and [`TokenSource::ready`] waits
///   for them. The tokens of one batch share their renewal point, and the
///   renewer renews the tokens due together (and those due soon after) in
///   one call of at most 16 audiences. An audience asked for later, a token
///   on behalf of a user, and a source over another exchange service
///   ([`TokenSource::builder_with_exchange`]) use single `ExchangeToken`
///   calls; so does a source whose auth service does not know the batch RPC.
///   Layers added with [`TokenSourceBuilder::layer`] wrap single exchanges
///   only.
/// - **Certificate binding (RFC 8705).** A token bound to a client
///   certificate (`cnf.x5t#S256`) is only served for calls over that
///   certificate. [`TokenSource::rotate_certificate`] tells the source its
///   certificate changed: tokens bound to the old one are no longer served
///   (except to an [`AuthChannel`](crate::AuthChannel) still pinned to the old
///   certificate, until [`TokenSource::retire_previous_certificate`]), and
///   new ones are fetched over the new channel.
///
/// ```no_run
/// # async fn f(channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
/// use service_sdk::{EnvCredentials, TokenSource};
/// let source = TokenSource::builder(channel, EnvCredentials::from_env()?).build();
/// let token = source.token("inventory").await?;
/// # let _ = token; Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A builder over an (mTLS) channel to the auth service (build it with
    /// [`MtlsFiles::auth_channel`](crate::MtlsFiles::auth_channel), which
    /// checks the auth server's identity) and a credentials
    /// source.
    pub fn builder(auth_channel: Channel, credentials: impl Credentials) -> TokenSourceBuilder {
        Self::builder_shared(auth_channel, Arc::new(credentials))
    }

    /// Like [`builder`](Self::builder) with a shared credentials source.
    pub fn builder_shared(auth_channel: Channel, credentials: Arc<dyn Credentials>) -> TokenSourceBuilder {
        let grpc = GrpcExchange::new(auth_channel);
        TokenSourceBuilder::new(exchange::boxed(grpc.clone()), Some(grpc), credentials, Arc::new(SystemClock))
    }

    /// A builder over any exchange service instead of the `ExchangeToken`
    /// RPC (e.g. one that reaches the auth service some other way, or a
    /// scripted one in tests). [`set_auth_channel`](Self::set_auth_channel)
    /// has no effect on such a source.
    pub fn builder_with_exchange<S>(exchange: S, credentials: impl Credentials) -> TokenSourceBuilder
    where
        S: Service<ExchangeRequest, Response = ExchangeResponse> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        TokenSourceBuilder::new(exchange::boxed(exchange), None, Arc::new(credentials), Arc::new(SystemClock))
    }

    /// A valid token for `audience`, this service acting as itself. A cache
    /// read when one is cached; otherwise one exchange shared by all
    /// concurrent callers.
    pub async fn token(&self, audience: &str) -> Result<AccessToken, TokenError> {
        if let Some(t) = self.cached(audience) {
            return Ok(t);
        }
        self.inner.miss(audience, None).await
    }

    /// The cached token for `audience`, if one is valid now. Never waits.
    #[inline]
    pub fn cached(&self, audience: &str) -> Option<AccessToken> {
        self.cached_for(audience, None)
    }

    /// The cached token for `audience` that may go out over a connection
    /// with the client certificate of thumbprint `certificate` (`None`: the
    /// source's current one).
    #[inline]
    pub(crate) fn cached_for(&self, audience: &str, certificate: Option<&str>) -> Option<AccessToken> {
        let now = self.inner.clock.now_unix();
        let current = self.inner.certificate.load();
        let certificate = certificate.or(current.as_deref().map(String::as_str));
        let map = self.inner.service.read().unwrap_or_else(|e| e.into_inner());
        map.get(audience)?.hit(now, certificate)
    }

    /// Waits until every audience declared with
    /// [`TokenSourceBuilder::audiences`] has a token, e.g. before the
    /// service starts serving. Fails with the refusal of an audience the
    /// auth service refused (not allowed, bad credentials); while it is
    /// only unreachable, keeps waiting (the source retries with back-off),
    /// so bound the wait with a timeout. With no audience declared it
    /// returns at once.
    pub async fn ready(&self) -> Result<(), TokenError> {
        loop {
            let settled = self.inner.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if let Some(outcome) = self.inner.readiness() {
                return outcome;
            }
            settled.await;
        }
    }

    /// The client certificate this source calls the auth service with
    /// changed (`auth_channel` presents it; `client_cert_der` is its DER):
    /// the exchange goes over the new channel, tokens bound to another
    /// certificate are no longer served (only to an
    /// [`AuthChannel`](crate::AuthChannel) pinned to the certificate they are
    /// bound to, until [`retire_previous_certificate`](Self::retire_previous_certificate)),
    /// and new tokens for every audience the source holds are fetched (in
    /// batches) before this returns. Calls that need a token meanwhile wait
    /// for it.
    ///
    /// For zero failed calls across a rotation: call this, then switch the
    /// outgoing channels to the new certificate (each pinned with
    /// [`AuthChannel::client_certificate`](crate::AuthChannel::client_certificate)),
    /// then retire the previous certificate.
    pub async fn rotate_certificate(&self, auth_channel: Channel, client_cert_der: &[u8]) {
        let inner = &self.inner;
        let thumb = thumbprint(client_cert_der);
        self.set_auth_channel(auth_channel);
        let old = inner.certificate.swap(Some(Arc::new(thumb.clone())));
        if old.as_deref() == Some(&thumb) {
            return;
        }
        let now = inner.clock.now_unix();
        let slots: Vec<Arc<Slot>> = inner.service.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut guards = Vec::with_capacity(slots.len());
        for slot in &slots {
            guards.push(slot.flight.lock().await);
        }
        let mut stale = Vec::new();
        for slot in &slots {
            let current = slot.current.load_full();
            if current.as_ref().is_some_and(|c| !c.usable_with(Some(&thumb))) {
                slot.previous.store(current);
                slot.current.store(None);
                stale.push(Arc::clone(slot));
            } else if !slot.holds_valid(now) && inner.cfg.audiences.iter().any(|a| **a == *slot.audience) {
                stale.push(Arc::clone(slot));
            }
        }
        inner.delegated.write().unwrap_or_else(|e| e.into_inner()).retain(|_, s| {
            s.current.load().as_ref().is_none_or(|c| c.usable_with(Some(&thumb))) || s.flight.try_lock().is_err()
        });
        tracing::info!(tokens = stale.len(), "client certificate rotated; fetching tokens bound to the new one");
        inner.exchange_batch(&stale, true).await;
        drop(guards);
    }

    /// Drops the tokens a [`rotate_certificate`](Self::rotate_certificate)
    /// replaced: no channel is on the previous certificate any more.
    pub fn retire_previous_certificate(&self) {
        for slot in self.inner.service.read().unwrap_or_else(|e| e.into_inner()).values() {
            slot.previous.store(None);
        }
    }

    /// A request for a token for `audience`, to be awaited, optionally
    /// [on behalf of](TokenRequest::on_behalf_of) a user.
    pub fn token_for<'a>(&'a self, audience: &'a str) -> TokenRequest<'a> {
        TokenRequest { source: self, audience, subject: None, certificate: None }
    }

    /// Counters since the source was built.
    pub fn stats(&self) -> TokenSourceStats {
        let s = &self.inner.stats;
        TokenSourceStats {
            exchanges: s.exchanges.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            renewals: s.renewals.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            waited: s.waited.load(Ordering::Relaxed),
        }
    }

    /// Replaces the channel to the auth service, e.g. after its client
    /// certificate was rotated (see [`MtlsFiles`](crate::MtlsFiles)). Cached
    /// tokens stay valid. Layers around the exchange stay in place.
    pub fn set_auth_channel(&self, channel: Channel) {
        if let Some(grpc) = &self.inner.grpc {
            grpc.set_channel(channel);
        }
    }

    /// The clock this source reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }
}

/// A token request built by [`TokenSource::token_for`]; `.await` it.
#[derive(Debug)]
#[must_use = "a token request does nothing until awaited"]
pub struct TokenRequest<'a> {
    source: &'a TokenSource,
    audience: &'a str,
    subject: Option<&'a str>,
    certificate: Option<&'a str>,
}

impl<'a> TokenRequest<'a> {
    /// Exchange `subject_token` (the verified access token of the user this
    /// call acts for) too: the result has `sub` = that user and `act` = this
    /// service.
    pub fn on_behalf_of(mut self, subject_token: &'a str) -> Self {
        self.subject = Some(subject_token);
        self
    }

    /// A token that may go out over a connection with the client
    /// certificate of thumbprint `certificate` (an [`AuthChannel`](crate::AuthChannel)
    /// pinned to its certificate).
    pub(crate) fn over_certificate(mut self, certificate: Option<&'a str>) -> Self {
        self.certificate = certificate;
        self
    }

    /// Fetches the token.
    pub async fn get(self) -> Result<AccessToken, TokenError> {
        let inner = &self.source.inner;
        let current = inner.certificate.load();
        let certificate = self.certificate.or(current.as_deref().map(String::as_str));
        let token = match self.subject {
            None => match self.source.cached_for(self.audience, certificate) {
                Some(t) => return Ok(t),
                None => inner.miss(self.audience, None).await?,
            },
            Some(subject) => {
                let key: SubjectKey = (self.audience.into(), subject_digest(subject));
                let now = inner.clock.now_unix();
                let hit = {
                    let delegated = inner.delegated.read().unwrap_or_else(|e| e.into_inner());
                    delegated.get(&key).and_then(|s| s.hit(now, certificate))
                };
                match hit {
                    Some(t) => return Ok(t),
                    None => inner.miss(self.audience, Some((key, subject))).await?,
                }
            }
        };
        // The source now calls with another certificate than the channel
        // this token is for: it would be refused there.
        if token.0.usable_with(certificate) {
            Ok(token)
        } else {
            Err(TokenError::Unavailable {
                audience: self.audience.to_owned(),
                reason: "the client certificate rotated: this channel's certificate is no longer the token source's"
                    .into(),
            })
        }
    }
}

impl<'a> IntoFuture for TokenRequest<'a> {
    type Output = Result<AccessToken, TokenError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.get())
    }
}

impl Inner {
    /// The slow path: no valid cached token.
    async fn miss(&self, audience: &str, subject: Option<(SubjectKey, &str)>) -> Result<AccessToken, TokenError> {
        self.stats.waited(audience);
        let (key, subject_token) = match &subject {
            Some((k, t)) => (Some(k), Some(*t)),
            None => (None, None),
        };
        let Some(slot) = self.slot_for(audience, key) else {
            // Too many delegated tokens cached: exchange without caching.
            let fresh = Slot::new(audience, self.clock.now_unix(), &self.cfg.backoff);
            return self.exchange_into(&fresh, subject_token, false).await;
        };
        let _flight = slot.flight.lock().await;
        let now = self.clock.now_unix();
        let current = self.certificate.load();
        if let Some(t) = slot.hit(now, current.as_deref().map(String::as_str)) {
            return Ok(t);
        }
        if let Some(err) = slot.lock_retry().pending(self.clock.now_millis()) {
            return Err(err.clone());
        }
        self.exchange_into(&slot, subject_token, false).await
    }
}

impl Inner {
    /// Whether every declared audience has a token (`Ok`), one was refused
    /// (`Err`), or some are still pending (`None`).
    fn readiness(&self) -> Option<Result<(), TokenError>> {
        let now = self.clock.now_unix();
        let map = self.service.read().unwrap_or_else(|e| e.into_inner());
        let mut pending = false;
        for audience in &self.cfg.audiences {
            let Some(slot) = map.get(audience.as_str()) else {
                pending = true;
                continue;
            };
            if slot.holds_valid(now) {
                continue;
            }
            match slot.lock_retry().last_error() {
                Some(e) if !e.is_unavailable() => return Some(Err(e.clone())),
                _ => pending = true,
            }
        }
        (!pending).then_some(Ok(()))
    }

    /// Fetches the declared audiences at start-up, in batches.
    async fn start_up(&self) {
        let now = self.clock.now_unix();
        let slots: Vec<Arc<Slot>> = self.cfg.audiences.iter().filter_map(|a| self.slot_for(a, None)).collect();
        let mut guards = Vec::with_capacity(slots.len());
        for slot in &slots {
            guards.push(slot.flight.lock().await);
        }
        // A caller may have fetched one meanwhile.
        let missing: Vec<Arc<Slot>> = slots.iter().filter(|s| !s.holds_valid(now)).cloned().collect();
        self.exchange_batch(&missing, false).await;
        drop(guards);
    }
}

/// RFC 8705 `x5t#S256`: base64url SHA-256 of a certificate's DER.
pub(crate) fn thumbprint(der: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The source's own logic over a scripted exchange service and a manual
    //! clock (the real auth service is exercised in `tests/it/client.rs`).

    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::{ClientCredentials, ManualClock};

    const NOW: u64 = 1_700_000_000;

    /// An exchange service that fails with `UNAVAILABLE` while `down` is set
    /// and otherwise issues a numbered token valid for `life`; counts calls.
    #[derive(Clone)]
    struct Scripted {
        down: Arc<AtomicBool>,
        calls: Arc<AtomicU64>,
        life: Duration,
        seen: Arc<Mutex<Vec<ExchangeRequest>>>,
    }

    impl Scripted {
        fn new(life: Duration) -> Self {
            Self { down: Arc::default(), calls: Arc::default(), life, seen: Arc::default() }
        }

        fn service(
            &self,
        ) -> impl Service<
            ExchangeRequest,
            Response = ExchangeResponse,
            Error = tonic::Status,
            Future = impl Future<Output = Result<ExchangeResponse, tonic::Status>> + Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static {
            let this = self.clone();
            tower::service_fn(move |req: ExchangeRequest| {
                let this = this.clone();
                async move {
                    let n = this.calls.fetch_add(1, Ordering::SeqCst);
                    this.seen.lock().unwrap().push(req);
                    if this.down.load(Ordering::SeqCst) {
                        return Err(tonic::Status::unavailable("down"));
                    }
                    Ok(ExchangeResponse::new(format!("token-{n}"), this.life))
                }
            })
        }
    }

    fn creds() -> ClientCredentials {
        ClientCredentials::new("order", "secret")
    }

    #[tokio::test]
    async fn back_off_is_timed_on_the_injected_clock() {
        let clock = ManualClock::new(NOW);
        let script = Scripted::new(Duration::from_secs(300));
        script.down.store(true, Ordering::SeqCst);
        let source = TokenSource::builder_with_exchange(script.service(), creds())
            .clock(Arc::new(clock.clone()))
            .backoff(Duration::from_secs(2), Duration::from_secs(60))
            .build();

        let err = source.token("inventory").await.unwrap_err();
        assert_eq!(err, TokenError::Unavailable { audience: "inventory".into(), reason: "Unavailable: down".into() });
        script.down.store(false, Ordering::SeqCst);
        // Real time passes, the source clock does not: still backing off
        // (the first delay is in [1 s, 2 s]), with the last error, at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(source.token("inventory").await.unwrap_err(), err);
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);

        clock.advance_millis(999);
        assert_eq!(source.token("inventory").await.unwrap_err(), err, "the delay is at least half the base");
        clock.advance_millis(1_001);
        let token = source.token("inventory").await.unwrap();
        assert_eq!(token.as_str(), "token-1");
        assert_eq!(token.expires_at(), NOW + 2 + 300);
        let stats = source.stats();
        assert_eq!((stats.exchanges, stats.failures), (2, 1), "{stats:?}");
    }

    #[tokio::test]
    async fn renewal_follows_the_injected_clock() {
        let clock = ManualClock::new(NOW);
        let script = Scripted::new(Duration::from_secs(100));
        let source = TokenSource::builder_with_exchange(script.service(), creds())
            .clock(Arc::new(clock.clone()))
            .renew_check_interval(Duration::from_millis(5))
            .build();
        let first = source.token("inventory").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(source.stats().renewals, 0, "not due before 70% of the life");

        clock.advance(81);
        for _ in 0..2_000 {
            if source.cached("inventory").is_some_and(|t| t.as_str() != first.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = source.cached("inventory").unwrap();
        assert_eq!(second.as_str(), "token-1");
        assert_eq!(second.expires_at(), NOW + 81 + 100);
        assert_eq!(source.stats().renewals, 1);
        assert_eq!(source.stats().waited, 1);
    }

    #[tokio::test]
    async fn layers_wrap_the_exchange_first_added_outermost() {
        let script = Scripted::new(Duration::from_secs(300));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mark = |name: &'static str| {
            let order = Arc::clone(&order);
            tower::util::MapRequestLayer::new(move |mut req: ExchangeRequest| {
                order.lock().unwrap().push(name);
                req.metadata.insert("x-layer", tonic::metadata::MetadataValue::from_static(name));
                req
            })
        };
        let source = TokenSource::builder_with_exchange(script.service(), creds())
            .scopes("inventory", ["inventory:read"])
            .requested_ttl(Duration::from_secs(120))
            .layer(mark("outer"))
            .layer(mark("inner"))
            .build();
        source.token("inventory").await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["outer", "inner"]);
        let seen = script.seen.lock().unwrap();
        let req = &seen[0];
        assert_eq!(req.metadata.get("x-layer").unwrap(), "inner", "the inner layer ran last");
        assert_eq!((req.audience.as_str(), req.scopes.as_slice()), ("inventory", &["inventory:read".to_owned()][..]));
        assert_eq!(req.requested_ttl, Duration::from_secs(120));
        assert_eq!(req.credentials, creds());
        assert!(req.subject_token.is_none());
    }

    #[tokio::test]
    async fn a_failing_layer_makes_the_token_unavailable() {
        let script = Scripted::new(Duration::from_secs(300));
        let refuse = tower::layer::layer_fn(|_inner: ExchangeService| {
            tower::service_fn(|_req: ExchangeRequest| async {
                Err::<ExchangeResponse, BoxError>("request timed out".into())
            })
        });
        let source = TokenSource::builder_with_exchange(script.service(), creds()).layer(refuse).build();
        let err = source.token("inventory").await.unwrap_err();
        assert_eq!(err, TokenError::Unavailable { audience: "inventory".into(), reason: "request timed out".into() });
        assert_eq!(script.calls.load(Ordering::SeqCst), 0, "the layer answered before the exchange");
        assert_eq!(source.stats().failures, 1);
    }

    /// A scripted ExchangeTokens: refuses `payments`, issues the others a
    /// token valid for `life`; records each batch's audiences.
    fn scripted_batch(life: Duration, seen: Arc<Mutex<Vec<Vec<String>>>>) -> BatchService {
        exchange::boxed_batch(tower::service_fn(move |req: exchange::BatchRequest| {
            let seen = Arc::clone(&seen);
            async move {
                let names: Vec<String> = req.audiences.iter().map(|(a, _)| a.clone()).collect();
                let n = seen.lock().unwrap().len();
                seen.lock().unwrap().push(names.clone());
                Ok::<_, tonic::Status>(
                    names
                        .iter()
                        .map(|a| match a.as_str() {
                            "payments" => {
                                Err(tonic::Status::permission_denied("audience not allowed for this account"))
                            }
                            _ => Ok(ExchangeResponse::new(format!("{a}-{n}"), life)),
                        })
                        .collect(),
                )
            }
        }))
    }

    #[tokio::test]
    async fn declared_audiences_come_in_one_batch_and_ready_reports_a_refusal() {
        let clock = ManualClock::new(NOW);
        let script = Scripted::new(Duration::from_secs(300));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let source = TokenSource::builder_with_exchange(script.service(), creds())
            .clock(Arc::new(clock.clone()))
            .batch_exchange(scripted_batch(Duration::from_secs(300), Arc::clone(&seen)))
            .audiences(["inventory", "billing", "payments", "inventory"])
            .build();
        let err = source.ready().await.unwrap_err();
        assert!(matches!(&err, TokenError::PermissionDenied { audience, .. } if audience == "payments"), "{err:?}");
        assert_eq!(*seen.lock().unwrap(), [["inventory", "billing", "payments"]], "one call, each audience once");
        assert_eq!(source.cached("inventory").unwrap().as_str(), "inventory-0");
        assert_eq!(source.cached("billing").unwrap().as_str(), "billing-0");
        let stats = source.stats();
        assert_eq!((stats.batches, stats.exchanges, stats.failures), (1, 3, 1), "{stats:?}");
        // An audience asked for later: one single exchange.
        assert_eq!(source.token("orders").await.unwrap().as_str(), "token-0");
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn tokens_fetched_together_are_renewed_together_in_one_batch() {
        let clock = ManualClock::new(NOW);
        let script = Scripted::new(Duration::from_secs(300));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let source = TokenSource::builder_with_exchange(script.service(), creds())
            .clock(Arc::new(clock.clone()))
            .batch_exchange(scripted_batch(Duration::from_secs(100), Arc::clone(&seen)))
            .renew_check_interval(Duration::from_millis(5))
            .audiences(["inventory", "billing"])
            .build();
        source.ready().await.unwrap();
        let first = source.cached("inventory").unwrap();
        // The batch shares one renewal point within 70..80 s of a 100 s life.
        assert_eq!(first.0.renew_at, source.cached("billing").unwrap().0.renew_at);
        clock.advance(81);
        for _ in 0..2_000 {
            if seen.lock().unwrap().len() == 2 && source.cached("billing").is_some_and(|t| t.as_str() == "billing-1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The renewal's order is the cache's; the set is what counts.
        let mut batches = seen.lock().unwrap().clone();
        batches.iter_mut().for_each(|b| b.sort());
        assert_eq!(batches, [["billing", "inventory"], ["billing", "inventory"]]);
        assert_eq!(source.cached("inventory").unwrap().as_str(), "inventory-1");
        assert_eq!(source.stats().renewals, 2);
        assert_eq!(script.calls.load(Ordering::SeqCst), 0, "no single exchange");
    }

    #[tokio::test]
    async fn on_behalf_of_requests_carry_the_subject_token() {
        let script = Scripted::new(Duration::from_secs(300));
        let source = TokenSource::builder_with_exchange(script.service(), creds()).build();
        let token = source.token_for("inventory").on_behalf_of("user.jwt").await.unwrap();
        let again = source.token_for("inventory").on_behalf_of("user.jwt").await.unwrap();
        assert_eq!(token.as_str(), again.as_str());
        let seen = script.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].subject_token.as_deref(), Some("user.jwt"));
    }
}
