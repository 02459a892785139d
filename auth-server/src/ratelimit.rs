//! Per-client rate limits: [`ClientRateLimitLayer`], a tower layer in the
//! gRPC stack.
//!
//! Login, ExchangeToken, ExchangeTokens, Refresh and Revoke are limited per
//! client identity with a keyed GCRA ([`governor`]):
//! `limits.client_rate_per_sec` sustained, `limits.client_rate_burst` at
//! once. A refused call gets `RESOURCE_EXHAUSTED` before its body is read.
//! Other RPCs (GetJwks, WatchRevocations, health, reflection) are not
//! limited here.
//!
//! **A batch counts per token.** An ExchangeTokens call is admitted here
//! like any other (one cell, before its body is read); its handler then
//! charges one more cell per further audience through the [`BatchCharge`]
//! the layer leaves in the request's extensions, and refuses the whole
//! call when they are not there. So batching never multiplies the rate a
//! client may mint at.
//!
//! **The key is the mTLS identity** (the client certificate's URI SAN, else
//! DNS SAN), not the `client_id` of the request body. The identity is
//! authenticated by the handshake and known before anything is decoded, so
//! a refused call costs no decoding, no password check and no signature,
//! and a caller cannot step around its limit by writing other `client_id`s
//! (which would also grow the key table at will). Each service has its own
//! certificate, so the identity names the client; services that share a
//! certificate share a limit.
//!
//! **Per replica.** Each replica keeps its own table: N replicas admit N
//! times the configured rate in total.
//!
//! **Bounded.** Keys are identities the CA issued. Every 256 calls, when the
//! table holds more than `limits.client_rate_keys` entries, the entries of
//! clients that are back to a full allowance are dropped; if it is still
//! over, the table starts afresh (every client gets a full allowance once).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use tower::{Layer, Service};

use crate::config::LimitsConfig;
use crate::edge::ConnInfo;
use crate::error::AuthError;
use crate::observe::{Caller, Events, NoEvents, Rpc};

/// The RPCs limited per client.
pub const LIMITED_PATHS: [&str; 5] =
    ["/auth.v1.Auth/Login", "/auth.v1.Auth/ExchangeToken", BATCH_PATH, "/auth.v1.Auth/Refresh", "/auth.v1.Auth/Revoke"];

/// The batch RPC, whose further audiences its handler charges.
const BATCH_PATH: &str = "/auth.v1.Auth/ExchangeTokens";

/// How often (in calls) the key table's size is checked.
const SWEEP_EVERY: u64 = 256;

/// The shared limiter state.
struct Limiter {
    quota: Quota,
    max_keys: usize,
    table: ArcSwap<DefaultKeyedRateLimiter<String>>,
    calls: AtomicU64,
    refused: AtomicU64,
}

impl Limiter {
    /// Whether a call from `key` is admitted now. A key already in the
    /// table is looked up by reference: nothing is allocated per call.
    #[allow(clippy::ptr_arg, reason = "the table's key type: a `&str` would be copied into a `String` per call")]
    fn check(&self, key: &String) -> bool {
        if self.calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(SWEEP_EVERY) {
            self.sweep();
        }
        let ok = self.table.load().check_key(key).is_ok();
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Charges `n` more cells to `key` at once; `false` when they are not
    /// there (nothing is charged then). More than the burst is charged as
    /// the whole burst, so a batch larger than a tiny configured burst is
    /// not refused forever.
    #[allow(clippy::ptr_arg, reason = "the table's key type, as in `check`")]
    fn charge(&self, key: &String, n: u32) -> bool {
        let burst = self.quota.burst_size();
        let Some(n) = NonZeroU32::new(n) else { return true };
        let n = n.min(burst);
        let ok = matches!(self.table.load().check_key_n(key, n), Ok(Ok(())));
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn sweep(&self) {
        let table = self.table.load();
        if table.len() <= self.max_keys {
            return;
        }
        table.retain_recent();
        table.shrink_to_fit();
        if table.len() > self.max_keys {
            tracing::warn!(keys = table.len(), max = self.max_keys, "rate limiter key table full; starting afresh");
            self.table.store(Arc::new(RateLimiter::keyed(self.quota)));
        }
    }
}

/// Limits Login, ExchangeToken(s), Refresh and Revoke per client identity;
/// see the [module docs](self). Clones share one table.
#[derive(Clone)]
pub struct ClientRateLimitLayer {
    limiter: Arc<Limiter>,
    events: Arc<dyn Events>,
}

impl std::fmt::Debug for ClientRateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRateLimitLayer")
            .field("quota", &self.limiter.quota)
            .field("max_keys", &self.limiter.max_keys)
            .finish_non_exhaustive()
    }
}

impl ClientRateLimitLayer {
    /// `per_sec` sustained and `burst` at once per client, at most
    /// `max_keys` clients tracked (all at least one).
    pub fn new(per_sec: u32, burst: u32, max_keys: usize) -> Self {
        let per_sec = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(per_sec).allow_burst(burst);
        Self {
            limiter: Arc::new(Limiter {
                quota,
                max_keys: max_keys.max(1),
                table: ArcSwap::from_pointee(RateLimiter::keyed(quota)),
                calls: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
            events: Arc::new(NoEvents),
        }
    }

    /// Reports each refused call to `events` as a denial.
    pub fn observed(mut self, events: Arc<dyn Events>) -> Self {
        self.events = events;
        self
    }

    /// The limits of `[limits]`.
    pub fn from_config(limits: &LimitsConfig) -> Self {
        Self::new(limits.client_rate_per_sec, limits.client_rate_burst, limits.client_rate_keys)
    }

    /// Calls refused so far.
    pub fn refused(&self) -> u64 {
        self.limiter.refused.load(Ordering::Relaxed)
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.table.load().len()
    }

    /// Whether a call from `key` is admitted now (the layer's decision, for
    /// callers that already know the key).
    pub fn check(&self, key: &str) -> bool {
        self.limiter.check(&key.to_owned())
    }
}

impl<S> Layer<S> for ClientRateLimitLayer {
    type Service = ClientRateLimit<S>;

    fn layer(&self, inner: S) -> ClientRateLimit<S> {
        ClientRateLimit { inner, limiter: Arc::clone(&self.limiter), events: Arc::clone(&self.events) }
    }
}

/// The service of [`ClientRateLimitLayer`].
#[derive(Clone)]
pub struct ClientRateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
    events: Arc<dyn Events>,
}

impl<S> std::fmt::Debug for ClientRateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRateLimit").finish_non_exhaustive()
    }
}

/// What an ExchangeTokens handler finds in its request's extensions: the
/// caller's limit, to charge the audiences beyond the first.
#[derive(Clone)]
pub struct BatchCharge {
    limiter: Arc<Limiter>,
    key: String,
}

impl std::fmt::Debug for BatchCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchCharge").field("key", &self.key).finish_non_exhaustive()
    }
}

impl BatchCharge {
    /// Charges `audiences - 1` more calls (the layer charged the first);
    /// refused with `RESOURCE_EXHAUSTED` when the caller's allowance does
    /// not hold them.
    pub fn charge(&self, audiences: usize) -> Result<(), AuthError> {
        let more = u32::try_from(audiences.saturating_sub(1)).unwrap_or(u32::MAX);
        if self.limiter.charge(&self.key, more) {
            Ok(())
        } else {
            Err(AuthError::ResourceExhausted("rate limit exceeded"))
        }
    }
}

/// The client key of a request: its mTLS identity (read once per
/// connection, at the handshake), else its IP address.
pub fn client_key<B>(req: &http::Request<B>) -> Cow<'_, String> {
    let Some(info) = req.extensions().get::<ConnInfo>() else {
        return Cow::Owned("unknown".into());
    };
    if let Some(peer) = &info.peer {
        return Cow::Borrowed(&peer.id);
    }
    Cow::Owned(info.remote_addr.map_or_else(|| "unknown".into(), |a| a.ip().to_string()))
}

impl<S, B, R> Service<http::Request<B>> for ClientRateLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<http::Response<R>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if !LIMITED_PATHS.contains(&path) {
            return Either::Right(self.inner.call(req));
        }
        let batch = path == BATCH_PATH;
        let key = client_key(&req);
        let admitted = self.limiter.check(&key);
        if batch {
            let charge = BatchCharge { limiter: Arc::clone(&self.limiter), key: key.into_owned() };
            req.extensions_mut().insert(charge);
        }
        if !admitted {
            let refused = AuthError::ResourceExhausted("rate limit exceeded");
            let peer = req.extensions().get::<ConnInfo>().and_then(|c| c.peer.as_deref()).map(|p| p.id.as_str());
            crate::observe::denied(
                &*self.events,
                Rpc::from_path(req.uri().path()),
                Caller { client_id: None, peer },
                &refused,
            );
            let status = tonic::Status::from(refused);
            return Either::Left(std::future::ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_burst() {
        let l = ClientRateLimitLayer::new(1, 3, 100);
        assert_eq!((0..10).filter(|_| l.check("spiffe://auth.dev/order")).count(), 3);
        assert_eq!((0..10).filter(|_| l.check("spiffe://auth.dev/inventory")).count(), 3);
        assert_eq!(l.refused(), 14);
    }

    #[test]
    fn the_key_table_stays_bounded() {
        let l = ClientRateLimitLayer::new(1_000, 1, 64);
        for i in 0..10_000 {
            l.check(&format!("client-{i}"));
        }
        assert!(l.tracked() <= 64 + SWEEP_EVERY as usize, "{} keys", l.tracked());
    }

    #[tokio::test]
    async fn a_batch_is_charged_one_call_per_audience() {
        use tower::ServiceExt as _;
        let layer = ClientRateLimitLayer::new(1, 10, 10);
        let seen = Arc::new(std::sync::Mutex::new(None::<BatchCharge>));
        let svc = layer.layer(tower::service_fn({
            let seen = Arc::clone(&seen);
            move |req: http::Request<()>| {
                *seen.lock().unwrap() = req.extensions().get::<BatchCharge>().cloned();
                async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
            }
        }));
        let req = http::Request::builder().uri("/auth.v1.Auth/ExchangeToken").body(()).unwrap();
        svc.clone().oneshot(req).await.unwrap();
        assert!(seen.lock().unwrap().is_none(), "only the batch RPC carries a charge");
        let req = http::Request::builder().uri(BATCH_PATH).body(()).unwrap();
        svc.oneshot(req).await.unwrap();
        let charge = seen.lock().unwrap().take().expect("the batch handler finds its charge");
        // Two cells of ten are taken (one call, the batch's first
        // audience): a batch of 9 takes the other 8 ...
        assert!(charge.charge(9).is_ok());
        // ... and then nothing is left for a batch of 2.
        assert!(matches!(charge.charge(2), Err(AuthError::ResourceExhausted("rate limit exceeded"))));
        assert!(charge.charge(1).is_ok(), "a batch of one costs nothing more");
        assert_eq!(layer.refused(), 1);
    }

    #[tokio::test]
    async fn a_refused_call_is_resource_exhausted_and_other_rpcs_pass() {
        use tower::ServiceExt as _;
        let layer = ClientRateLimitLayer::new(1, 1, 10);
        let svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
        }));
        let call = |path: &str| {
            let svc = svc.clone();
            let req = http::Request::builder().uri(path).body(()).unwrap();
            async move { svc.oneshot(req).await.unwrap() }
        };
        assert_eq!(call("/auth.v1.Auth/ExchangeToken").await.into_body(), "served");
        let refused = call("/auth.v1.Auth/Login").await;
        assert_eq!(refused.headers().get("grpc-status").unwrap(), "8");
        assert_eq!(refused.headers().get("grpc-message").unwrap(), "rate%20limit%20exceeded");
        assert_eq!(refused.into_body(), "");
        assert_eq!(call("/auth.v1.Auth/GetJwks").await.into_body(), "served");
    }
}
