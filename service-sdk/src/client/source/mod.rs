//! The token source: audience-scoped access tokens, cached, renewed in the
//! background and fetched at most once at a time.
//!
//! ## Behaviour
//! - **Cache.** Tokens are cached per (audience, subject): the service's own
//!   token per audience, and one per (audience, user token) for calls on
//!   behalf of a user. A cached token is served until `expiry_margin` before
//!   its expiry (measured on the injected [`Clock`] from the `expires_in` of
//!   the response, so clock skew with the auth service does not matter).
//! - **Hot path.** [`TokenSource::token`] with a cached token is a map read
//!   and an atomic load; it never awaits. [`TokenSource::cached`] is the same
//!   read, synchronous.
//! - **Background renewal.** A task started with the source renews each
//!   service token at 75% of its life, ±5% jitter, so after warm-up no call
//!   waits on an exchange. Tokens of an audience nobody asked for during
//!   `idle_timeout` are no longer renewed and are dropped. Tokens obtained on
//!   behalf of a user are not renewed (they are request-scoped); they are
//!   dropped once expired.
//! - **Single flight.** Concurrent calls that miss the cache for one key wait
//!   for one exchange.
//! - **Errors.** A failed exchange is retried with exponential backoff (from
//!   `backoff_base`, doubling, capped at `backoff_cap`, with jitter). While
//!   the auth service is down, unexpired cached tokens keep being served; a
//!   call that needs a new token during backoff fails at once with
//!   [`TokenError::Unavailable`] instead of queueing. An expired token is
//!   never served.
//! - **Rotation.** When the auth service answers `UNAUTHENTICATED`, the source
//!   asks its [`Credentials`] to [`refresh`](Credentials::refresh) and, if
//!   they changed, retries once at once.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use auth_proto::auth::v1::ExchangeTokenRequest;
use auth_proto::auth::v1::auth_client::AuthClient;
use aws_lc_rs::digest;
use http::HeaderValue;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::clock::{Clock, SystemClock};
use super::credentials::Credentials;
use super::secret::ClientCredentials;

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The auth service cannot be reached (or answered with a transient
    /// error) and no unexpired token is cached.
    #[error("auth service unavailable and no unexpired token cached for audience {audience:?} ({reason})")]
    Unavailable {
        /// The audience asked for.
        audience: String,
        /// The gRPC code or transport failure, never a secret.
        reason: String,
    },
    /// The auth service rejected the credentials or the subject token.
    #[error("auth service rejected the exchange for audience {audience:?}")]
    Unauthenticated {
        /// The audience asked for.
        audience: String,
    },
    /// The policy does not let this service ask for that audience.
    #[error("auth service policy refuses audience {audience:?}")]
    PermissionDenied {
        /// The audience asked for.
        audience: String,
    },
    /// The request was refused as malformed (e.g. an empty audience).
    #[error("invalid token request for audience {audience:?}")]
    InvalidRequest {
        /// The audience asked for.
        audience: String,
    },
    /// The credentials source failed.
    #[error("service credentials unavailable: {0}")]
    Credentials(String),
}

impl TokenError {
    /// Whether the failure is transient (auth service or credentials
    /// unreachable) rather than a refusal.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::Unavailable { .. } | TokenError::Credentials(_))
    }
}

/// For handlers that call another service: the one mapping of token errors
/// to statuses, with fixed messages.
impl From<TokenError> for tonic::Status {
    fn from(e: TokenError) -> Self {
        tracing::warn!(error = %e, "no token for downstream call");
        match e {
            TokenError::Unavailable { .. } | TokenError::Credentials(_) => {
                tonic::Status::unavailable("downstream token unavailable")
            }
            TokenError::Unauthenticated { .. } => tonic::Status::unauthenticated("token exchange refused"),
            TokenError::PermissionDenied { .. } => tonic::Status::permission_denied("token exchange refused"),
            TokenError::InvalidRequest { .. } => tonic::Status::internal("invalid token exchange"),
        }
    }
}

/// An access token from the source. Cheap to clone. `Debug` does not print
/// the token.
#[derive(Clone)]
pub struct AccessToken(Arc<Cached>);

impl AccessToken {
    /// The compact JWS.
    pub fn as_str(&self) -> &str {
        &self.0.token
    }

    /// `Bearer <token>` as a (sensitive) header value.
    pub fn bearer(&self) -> &HeaderValue {
        &self.0.bearer
    }

    /// When the token stops being served (Unix seconds, source clock).
    pub fn expires_at(&self) -> u64 {
        self.0.expires_at
    }

    /// The scopes the auth service granted.
    pub fn scope(&self) -> &[String] {
        &self.0.scope
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken").field("expires_at", &self.0.expires_at).finish_non_exhaustive()
    }
}

struct Cached {
    token: Box<str>,
    bearer: HeaderValue,
    /// Served while `now < expires_at - margin`.
    expires_at: u64,
    margin: u64,
    renew_at: u64,
    scope: Vec<String>,
}

impl Cached {
    fn valid(&self, now: u64) -> bool {
        now.saturating_add(self.margin) < self.expires_at
    }
}

/// Counters, for monitoring and for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenSourceStats {
    /// ExchangeToken calls sent to the auth service.
    pub exchanges: u64,
    /// Of those, sent by the background renewer.
    pub renewals: u64,
    /// Exchanges that failed.
    pub failures: u64,
    /// Token requests that found no valid cached token and had to wait for
    /// an exchange (their own or a concurrent one).
    pub waited: u64,
}

#[derive(Default)]
struct Stats {
    exchanges: AtomicU64,
    renewals: AtomicU64,
    failures: AtomicU64,
    waited: AtomicU64,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<TokenError>,
}

struct Slot {
    audience: Box<str>,
    current: ArcSwapOption<Cached>,
    flight: tokio::sync::Mutex<()>,
    backoff: Mutex<Backoff>,
    /// Last time (source clock) a caller asked for this slot.
    last_used: AtomicU64,
    renewing: AtomicU32,
}

impl Slot {
    fn new(audience: &str, now: u64) -> Self {
        Self {
            audience: audience.into(),
            current: ArcSwapOption::empty(),
            flight: tokio::sync::Mutex::new(()),
            backoff: Mutex::new(Backoff::default()),
            last_used: AtomicU64::new(now),
            renewing: AtomicU32::new(0),
        }
    }

    #[inline]
    fn hit(&self, now: u64) -> Option<AccessToken> {
        let guard = self.current.load();
        let cached = guard.as_ref()?;
        if !cached.valid(now) {
            return None;
        }
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
        Some(AccessToken(Arc::clone(cached)))
    }

    fn lock_backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type SubjectKey = (Box<str>, [u8; 32]);

/// Tunables of a [`TokenSource`].
#[derive(Debug, Clone)]
struct Config {
    requested_ttl: u32,
    expiry_margin: u64,
    renew_at: f64,
    jitter: f64,
    tick: Duration,
    idle_timeout: u64,
    backoff_base: Duration,
    backoff_cap: Duration,
    max_delegated: usize,
    scopes: HashMap<String, Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            requested_ttl: 0,
            expiry_margin: 5,
            renew_at: 0.75,
            jitter: 0.05,
            tick: Duration::from_secs(1),
            idle_timeout: 3600,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(30),
            max_delegated: 10_000,
            scopes: HashMap::new(),
        }
    }
}

struct Inner {
    auth: ArcSwap<AuthClient<Channel>>,
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

/// Builds a [`TokenSource`].
pub struct TokenSourceBuilder {
    channel: Channel,
    creds: Arc<dyn Credentials>,
    clock: Arc<dyn Clock>,
    cfg: Config,
}

impl std::fmt::Debug for TokenSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSourceBuilder").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl TokenSourceBuilder {
    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
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
    /// cap of the doubling delay (default 30 s).
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.cfg.backoff_base = base;
        self.cfg.backoff_cap = cap.max(base);
        self
    }

    /// Starts the source and its background renewer. Needs a Tokio runtime.
    pub fn build(self) -> TokenSource {
        let inner = Arc::new(Inner {
            auth: ArcSwap::from_pointee(AuthClient::new(self.channel)),
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
        TokenSource { inner }
    }
}

/// Audience-scoped access tokens for outgoing calls. Cheap to clone; all
/// clones share one cache and one renewer, which stops when the last clone
/// is dropped. See the [module docs](self) for the behaviour.
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
    /// A builder over an (mTLS) channel to the auth service and a credentials
    /// source.
    pub fn builder(auth_channel: Channel, credentials: impl Credentials) -> TokenSourceBuilder {
        Self::builder_shared(auth_channel, Arc::new(credentials))
    }

    /// Like [`builder`](Self::builder) with a shared credentials source.
    pub fn builder_shared(auth_channel: Channel, credentials: Arc<dyn Credentials>) -> TokenSourceBuilder {
        TokenSourceBuilder {
            channel: auth_channel,
            creds: credentials,
            clock: Arc::new(SystemClock),
            cfg: Config::default(),
        }
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
        let now = self.inner.clock.now_unix();
        let map = self.inner.service.read().unwrap_or_else(|e| e.into_inner());
        map.get(audience)?.hit(now)
    }

    /// A request for a token for `audience`, to be awaited, optionally
    /// [on behalf of](TokenRequest::on_behalf_of) a user.
    pub fn token_for<'a>(&'a self, audience: &'a str) -> TokenRequest<'a> {
        TokenRequest { source: self, audience, subject: None }
    }

    /// Counters since the source was built.
    pub fn stats(&self) -> TokenSourceStats {
        let s = &self.inner.stats;
        TokenSourceStats {
            exchanges: s.exchanges.load(Ordering::Relaxed),
            renewals: s.renewals.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            waited: s.waited.load(Ordering::Relaxed),
        }
    }

    /// Replaces the channel to the auth service, e.g. after its client
    /// certificate was rotated (see [`MtlsFiles`](crate::MtlsFiles)). Cached
    /// tokens stay valid.
    pub fn set_auth_channel(&self, channel: Channel) {
        self.inner.auth.store(Arc::new(AuthClient::new(channel)));
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
}

impl<'a> TokenRequest<'a> {
    /// Exchange `subject_token` (the verified access token of the user this
    /// call acts for) too: the result has `sub` = that user and `act` = this
    /// service.
    pub fn on_behalf_of(mut self, subject_token: &'a str) -> Self {
        self.subject = Some(subject_token);
        self
    }

    /// Fetches the token.
    pub async fn get(self) -> Result<AccessToken, TokenError> {
        let inner = &self.source.inner;
        match self.subject {
            None => self.source.token(self.audience).await,
            Some(subject) => {
                let key: SubjectKey = (self.audience.into(), subject_digest(subject));
                let now = inner.clock.now_unix();
                let hit = inner.delegated.read().unwrap_or_else(|e| e.into_inner()).get(&key).and_then(|s| s.hit(now));
                match hit {
                    Some(t) => Ok(t),
                    None => inner.miss(self.audience, Some((key, subject))).await,
                }
            }
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

fn subject_digest(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A random number in `[0, 1)`.
fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Inner {
    fn slot_for(&self, audience: &str, subject: Option<&SubjectKey>) -> Option<Arc<Slot>> {
        let now = self.clock.now_unix();
        match subject {
            None => {
                if let Some(s) = self.service.read().unwrap_or_else(|e| e.into_inner()).get(audience) {
                    return Some(Arc::clone(s));
                }
                let mut map = self.service.write().unwrap_or_else(|e| e.into_inner());
                Some(Arc::clone(map.entry(audience.into()).or_insert_with(|| Arc::new(Slot::new(audience, now)))))
            }
            Some(key) => {
                if let Some(s) = self.delegated.read().unwrap_or_else(|e| e.into_inner()).get(key) {
                    return Some(Arc::clone(s));
                }
                let mut map = self.delegated.write().unwrap_or_else(|e| e.into_inner());
                if map.len() >= self.cfg.max_delegated {
                    map.retain(|_, s| s.current.load().as_ref().is_some_and(|c| c.valid(now)));
                    if map.len() >= self.cfg.max_delegated {
                        return None;
                    }
                }
                Some(Arc::clone(map.entry(key.clone()).or_insert_with(|| Arc::new(Slot::new(audience, now)))))
            }
        }
    }

    /// The slow path: no valid cached token.
    async fn miss(&self, audience: &str, subject: Option<(SubjectKey, &str)>) -> Result<AccessToken, TokenError> {
        self.stats.waited.fetch_add(1, Ordering::Relaxed);
        let (key, subject_token) = match &subject {
            Some((k, t)) => (Some(k), Some(*t)),
            None => (None, None),
        };
        let Some(slot) = self.slot_for(audience, key) else {
            // Too many delegated tokens cached: exchange without caching.
            let fresh = Slot::new(audience, self.clock.now_unix());
            return self.exchange_into(&fresh, subject_token, false).await;
        };
        let _flight = slot.flight.lock().await;
        let now = self.clock.now_unix();
        if let Some(t) = slot.hit(now) {
            return Ok(t);
        }
        {
            let b = slot.lock_backoff();
            if let (Some(at), Some(err)) = (b.retry_at, &b.last_error)
                && Instant::now() < at
            {
                return Err(err.clone());
            }
        }
        self.exchange_into(&slot, subject_token, false).await
    }

    /// One exchange (plus one retry after a credentials refresh); stores the
    /// result in `slot`. The caller holds the slot's flight lock.
    async fn exchange_into(
        &self,
        slot: &Slot,
        subject: Option<&str>,
        renewal: bool,
    ) -> Result<AccessToken, TokenError> {
        let audience = &*slot.audience;
        let result = self.exchange_with_refresh(audience, subject, renewal).await;
        let mut b = slot.lock_backoff();
        match result {
            Ok(cached) => {
                *b = Backoff::default();
                let cached = Arc::new(cached);
                slot.current.store(Some(Arc::clone(&cached)));
                Ok(AccessToken(cached))
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                b.failures = b.failures.saturating_add(1);
                let exp = self.cfg.backoff_base.saturating_mul(1u32 << (b.failures - 1).min(20));
                let delay = exp.min(self.cfg.backoff_cap).mul_f64(0.5 + unit_random() / 2.0);
                b.retry_at = Some(Instant::now() + delay);
                b.last_error = Some(e.clone());
                tracing::warn!(audience, error = %e, retry_in_ms = delay.as_millis() as u64, "token exchange failed");
                Err(e)
            }
        }
    }

    async fn exchange_with_refresh(
        &self,
        audience: &str,
        subject: Option<&str>,
        renewal: bool,
    ) -> Result<Cached, TokenError> {
        let creds = self.creds.current().await.map_err(|e| TokenError::Credentials(e.to_string()))?;
        match self.exchange_once(&creds, audience, subject, renewal).await {
            Err(TokenError::Unauthenticated { .. }) => {
                let fresh = self.creds.refresh().await.map_err(|e| TokenError::Credentials(e.to_string()))?;
                if fresh == creds {
                    return Err(TokenError::Unauthenticated { audience: audience.into() });
                }
                tracing::info!(audience, "credentials changed after a rejection; retrying the exchange");
                self.exchange_once(&fresh, audience, subject, renewal).await
            }
            other => other,
        }
    }

    async fn exchange_once(
        &self,
        creds: &ClientCredentials,
        audience: &str,
        subject: Option<&str>,
        renewal: bool,
    ) -> Result<Cached, TokenError> {
        self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        if renewal {
            self.stats.renewals.fetch_add(1, Ordering::Relaxed);
        }
        let req = ExchangeTokenRequest {
            client_id: creds.client_id.clone(),
            client_secret: creds.client_secret.expose().to_owned(),
            subject_token: subject.unwrap_or_default().to_owned(),
            audience: audience.to_owned(),
            scope: self.cfg.scopes.get(audience).cloned().unwrap_or_default(),
            requested_ttl_seconds: self.cfg.requested_ttl,
        };
        let mut client = AuthClient::clone(&self.auth.load());
        let resp = client.exchange_token(req).await.map_err(|s| status_error(audience, &s))?.into_inner();
        let now = self.clock.now_unix();
        let life = u64::from(resp.expires_in);
        let bearer = HeaderValue::try_from(format!("Bearer {}", resp.access_token))
            .map(|mut h| {
                h.set_sensitive(true);
                h
            })
            .map_err(|_| TokenError::Unavailable { audience: audience.into(), reason: "malformed token".into() })?;
        let margin = self.cfg.expiry_margin.min(life / 10);
        let fraction = self.cfg.renew_at + self.cfg.jitter * (2.0 * unit_random() - 1.0);
        let renew_in = ((life as f64) * fraction.clamp(0.0, 1.0)) as u64;
        Ok(Cached {
            token: resp.access_token.into_boxed_str(),
            bearer,
            expires_at: now + life,
            margin,
            renew_at: now + renew_in.min(life.saturating_sub(margin + 1)),
            scope: resp.scope,
        })
    }

    /// Renews one service token in the background, unless a caller is
    /// already fetching it.
    async fn renew(&self, slot: &Slot) {
        let Ok(_flight) = slot.flight.try_lock() else { return };
        let now = self.clock.now_unix();
        let due = slot.current.load().as_ref().is_some_and(|c| now >= c.renew_at);
        if !due {
            return;
        }
        if let Ok(t) = self.exchange_into(slot, None, true).await {
            tracing::debug!(audience = %slot.audience, expires_at = t.expires_at(), "token renewed");
        }
    }
}

fn status_error(audience: &str, s: &tonic::Status) -> TokenError {
    let audience = audience.to_owned();
    match s.code() {
        tonic::Code::Unauthenticated => TokenError::Unauthenticated { audience },
        tonic::Code::PermissionDenied => TokenError::PermissionDenied { audience },
        tonic::Code::InvalidArgument => TokenError::InvalidRequest { audience },
        code => TokenError::Unavailable { audience, reason: format!("{code:?}") },
    }
}

/// The background renewer: every `tick`, renews service tokens past their
/// renewal point (whose backoff has elapsed) and drops idle and expired
/// entries.
async fn renewer(inner: Weak<Inner>, tick: Duration) {
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = inner.clock.now_unix();
        let instant = Instant::now();
        let mut due = Vec::new();
        let mut stale = Vec::new();
        {
            // A read lock: callers on the hot path are never blocked by the scan.
            let map = inner.service.read().unwrap_or_else(|e| e.into_inner());
            for (audience, s) in map.iter() {
                let used = s.last_used.load(Ordering::Relaxed);
                let idle = now.saturating_sub(used) > inner.cfg.idle_timeout;
                let current = s.current.load();
                if idle {
                    // Drop an idle slot once its token is no longer valid.
                    if !current.as_ref().is_some_and(|c| c.valid(now)) {
                        stale.push(audience.clone());
                    }
                    continue;
                }
                let ready = s.lock_backoff().retry_at.is_none_or(|at| instant >= at);
                let renew = current.as_ref().is_some_and(|c| now >= c.renew_at);
                if ready && renew && s.renewing.load(Ordering::Relaxed) == 0 {
                    due.push(Arc::clone(s));
                }
            }
        }
        if !stale.is_empty() {
            let mut map = inner.service.write().unwrap_or_else(|e| e.into_inner());
            for audience in stale {
                map.remove(&audience);
            }
        }
        let expired_delegated = {
            let map = inner.delegated.read().unwrap_or_else(|e| e.into_inner());
            map.values().any(|s| !s.current.load().as_ref().is_some_and(|c| c.valid(now)))
        };
        if expired_delegated {
            let mut map = inner.delegated.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, s| s.current.load().as_ref().is_some_and(|c| c.valid(now)) || s.flight.try_lock().is_err());
        }
        for slot in due {
            slot.renewing.fetch_add(1, Ordering::Relaxed);
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                inner.renew(&slot).await;
                slot.renewing.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn unit_random_stays_in_range() {
        for _ in 0..1000 {
            let r = unit_random();
            assert!((0.0..1.0).contains(&r));
        }
    }

    #[test]
    fn token_errors_map_to_fixed_statuses() {
        let s: tonic::Status = TokenError::Unavailable { audience: "x".into(), reason: "Unavailable".into() }.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "downstream token unavailable");
        let s: tonic::Status = TokenError::PermissionDenied { audience: "x".into() }.into();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn expired_tokens_are_not_valid() {
        let c = Cached {
            token: "t".into(),
            bearer: HeaderValue::from_static("Bearer t"),
            expires_at: 100,
            margin: 5,
            renew_at: 75,
            scope: vec![],
        };
        assert!(c.valid(94));
        assert!(!c.valid(95));
        assert!(!c.valid(200));
    }
}
