//! The [`Verifier`]: keys, validator, revocation and the verified-token
//! cache, with an injected clock.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use subtle::ConstantTimeEq as _;
use tonic::transport::Channel;

use futures_util::future::BoxFuture;

use super::cache::{TokenCache, token_digest};
use super::compact;
use super::jwks::{JwksCache, JwksOptions, JwksSource};
use super::keys::KeyFingerprint;
use super::observe::{CacheUse, Reporter, VerifierStats, VerifyEvent, VerifyObserver};
use super::revocation::{
    FeedOptions, FeedOptionsError, LookupFuture, RevocationCheck, RevocationFeed, RevocationLookup,
};
use super::{Validator, VerifyError};
use crate::claims::{Claims, Confirmation};
use crate::metrics::{FeedTicker, VerifyMetrics};
use crate::{Clock, SystemClock};

/// The default capacity of the verified-token cache.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;

/// Why a [`Verifier`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Neither a channel nor a JWKS source was given.
    #[error("no JWKS source configured")]
    NoJwksSource,
    /// Neither a channel (push feed) nor a revocation check was given.
    #[error("no revocation check configured")]
    NoRevocation,
    /// `build` was called outside a tokio runtime (background tasks need one).
    #[error("a verifier must be built inside a tokio runtime")]
    NoRuntime,
    /// The [`feed_options`](VerifierBuilder::feed_options) make no sense
    /// (see [`FeedOptions::validate`]).
    #[error("invalid feed options: {0}")]
    FeedOptions(#[from] FeedOptionsError),
    /// [`feed_options`](VerifierBuilder::feed_options) were given together
    /// with a [`revocation`](VerifierBuilder::revocation) check: they
    /// configure only the default feed, so they would be ignored. Give them
    /// to [`RevocationFeed::connect`] or [`RevocationFeed::detached`].
    #[error("feed options would be ignored: a revocation check was given; configure its feed instead")]
    FeedOptionsIgnored,
}

/// Verifies access tokens for one service: the validator's explicit
/// checks, with keys from a [`JwksSource`] kept fresh in the background, a
/// [`RevocationCheck`] (push feed by default), RFC 8705 certificate binding,
/// and a bounded cache of verified tokens. Cheap to clone.
///
/// Each verification runs one state machine, here: a synchronous part (the
/// cache, or the signature and claims against the current keys, then the
/// binding and the revocation check) that decides most requests at once,
/// and an asynchronous rest only for a key refetch on an unknown `kid` or a
/// revocation lookup that needs I/O. Its outcome is reported once, to the
/// [`VerifyObserver`] (see [`VerifierBuilder::observer`]) and to
/// [`Verifier::stats`]. As an [`AuthorizeRequest`](super::AuthorizeRequest)
/// it is the default authorizer of [`RequireAuthLayer`](super::RequireAuthLayer).
///
/// ```no_run
/// # async fn demo(channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
/// use service_sdk::Verifier;
/// // GetJwks and WatchRevocations over the service's mTLS channel.
/// let verifier = Verifier::builder("auth-service", "inventory").channel(channel).build()?;
/// verifier.ready().await;
/// let claims = verifier.verify("eyJ...", None).await?;
/// println!("{}", claims.subject());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.validator.issuer())
            .field("audience", &self.inner.validator.audience())
            .finish_non_exhaustive()
    }
}

struct Inner {
    validator: Validator,
    jwks: Arc<JwksCache>,
    revocation: Arc<dyn RevocationCheck>,
    cache: Option<Arc<TokenCache>>,
    clock: Arc<dyn Clock>,
    reporter: Arc<Reporter>,
    _evictor: Option<AbortOnDrop>,
    /// Keeps the feed's staleness gauge current (feature `metrics`).
    _feed_ticker: Option<FeedTicker>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where one verification stands after its synchronous part.
enum Step {
    /// Decided without I/O.
    Done(Result<Claims, VerifyError>),
    /// The token names a `kid` the cache does not hold: refetch, then retry.
    Refetch(String),
    /// Valid so far; the revocation lookup needs I/O.
    Lookup(Claims, LookupFuture),
}

/// Why a fresh validation did not produce claims.
enum Miss {
    Refused(VerifyError),
    Refetch(String),
}

impl From<Miss> for Step {
    fn from(m: Miss) -> Self {
        match m {
            Miss::Refused(e) => Step::Done(Err(e)),
            Miss::Refetch(kid) => Step::Refetch(kid),
        }
    }
}

/// A verification begun by [`Verifier::start`]: decided at once (the usual
/// case), or pending on a key refetch or a revocation lookup. Either way its
/// outcome has been or will be reported exactly once.
#[allow(
    clippy::large_enum_variant,
    reason = "the claims are the hot path's result; boxing them would allocate per request"
)]
pub(crate) enum Verification {
    /// Decided without I/O.
    Done(Result<Claims, VerifyError>),
    /// Needs I/O to finish.
    Pending(BoxFuture<'static, Result<Claims, VerifyError>>),
}

impl Verifier {
    /// Starts building a verifier for tokens from `issuer` meant for
    /// `audience` (this service's own name).
    pub fn builder(issuer: impl Into<String>, audience: impl Into<String>) -> VerifierBuilder {
        VerifierBuilder {
            validator: Validator::new(issuer, audience),
            channel: None,
            jwks: None,
            jwks_options: JwksOptions::default(),
            revocation: None,
            feed_options: None,
            clock: Arc::new(SystemClock),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            observer: None,
        }
    }

    /// Resolves once keys are loaded and the revocation check can answer.
    /// Until then, requests are refused with `Unavailable`.
    pub async fn ready(&self) {
        self.inner.jwks.wait_loaded().await;
        self.inner.revocation.ready().await;
    }

    /// Verifies a token; `peer_cert` is the DER of the caller's mTLS
    /// certificate, needed for certificate-bound (`cnf`) tokens.
    pub async fn verify(&self, token: &str, peer_cert: Option<&[u8]>) -> Result<Claims, VerifyError> {
        match self.start(Ok(token), peer_cert) {
            Verification::Done(result) => result,
            Verification::Pending(rest) => rest.await,
        }
    }

    /// The rules this verifier applies.
    pub fn validator(&self) -> &Validator {
        &self.inner.validator
    }

    /// Counters since the verifier was built, and the revocation feed's
    /// state now.
    pub fn stats(&self) -> VerifierStats {
        let mut stats = self.inner.reporter.stats();
        stats.feed = self.inner.revocation.feed_stats();
        stats
    }

    /// Number of tokens in the verified-token cache (approximate).
    pub fn cached_tokens(&self) -> u64 {
        self.inner.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Begins verifying what the request presented: its bearer token, or
    /// why none could be read (then it is refused as such). The outcome is
    /// reported when it is known, here or at the end of the pending part.
    pub(crate) fn start(&self, presented: Result<&str, VerifyError>, peer_cert: Option<&[u8]>) -> Verification {
        let token = match presented {
            Ok(token) => token,
            Err(e) => return Verification::Done(self.finish(Err(e), CacheUse::Bypassed)),
        };
        match self.step(token, peer_cert, true) {
            (Step::Done(result), cache) => Verification::Done(self.finish(result, cache)),
            (step, cache) => {
                let (this, token, peer) = (self.clone(), token.to_owned(), peer_cert.map(<[u8]>::to_vec));
                Verification::Pending(Box::pin(async move { this.resolve(&token, peer.as_deref(), step, cache).await }))
            }
        }
    }

    /// The synchronous part of a verification: everything but a key
    /// refetch and an I/O revocation lookup; and how the cache was used.
    fn step(&self, token: &str, peer_cert: Option<&[u8]>, may_refetch: bool) -> (Step, CacheUse) {
        let inner = &*self.inner;
        let v = &inner.validator;
        if token.len() > v.token_limit() {
            return (Step::Done(Err(VerifyError::TooLarge)), CacheUse::Bypassed);
        }
        let now = inner.clock.now_unix();
        let (claims, cache_use) = match &inner.cache {
            Some(cache) => {
                let key = token_digest(token);
                // A hit counts only while the key that checked the signature
                // is still published; otherwise the token is verified afresh,
                // as if never seen (and refused like any token of that key).
                let hit = cache.get(&key, now).and_then(|(payload, signed_by)| {
                    if inner.jwks.holds(signed_by) {
                        Some(payload)
                    } else {
                        cache.remove(&key);
                        None
                    }
                });
                match hit {
                    Some(payload) => {
                        let Some(claims) = compact::decode(&payload) else {
                            return (Step::Done(Err(VerifyError::BadClaims)), CacheUse::Hit);
                        };
                        if let Err(e) = v.check_claims(&claims, now, Some(v.audience())) {
                            return (Step::Done(Err(e)), CacheUse::Hit);
                        }
                        (claims, CacheUse::Hit)
                    }
                    None => match self.validate_fresh(token, now, may_refetch) {
                        Ok((claims, signed_by)) => {
                            if let Some(compact) = compact::encode(&claims) {
                                let until = claims.exp.saturating_add(v.leeway());
                                let sid = claims.sid.as_deref();
                                cache.insert(key, compact, &claims.jti, sid, signed_by, now, until);
                            }
                            (claims, CacheUse::Miss)
                        }
                        Err(miss) => return (miss.into(), CacheUse::Miss),
                    },
                }
            }
            None => match self.validate_fresh(token, now, may_refetch) {
                Ok((claims, _)) => (claims, CacheUse::Miss),
                Err(miss) => return (miss.into(), CacheUse::Miss),
            },
        };
        let step = if let Some(cnf) = &claims.cnf
            && let Err(e) = check_binding(cnf, peer_cert)
        {
            Step::Done(Err(e))
        } else {
            match inner.revocation.check(&claims.jti, claims.sid.as_deref(), now) {
                RevocationLookup::Ready(Ok(())) => Step::Done(Ok(claims)),
                RevocationLookup::Ready(Err(e)) => Step::Done(Err(e)),
                RevocationLookup::Pending(lookup) => Step::Lookup(claims, lookup),
            }
        };
        (step, cache_use)
    }

    /// Signature and claims, against the current keys; and the key that
    /// checked the signature.
    fn validate_fresh(&self, token: &str, now: u64, may_refetch: bool) -> Result<(Claims, KeyFingerprint), Miss> {
        let Some(keys) = self.inner.jwks.current() else {
            return Err(Miss::Refused(VerifyError::NoKeys));
        };
        let v = &self.inner.validator;
        match v.validate_keyed(token, &keys, now, Some(v.audience())) {
            Ok(verified) => Ok(verified),
            Err(VerifyError::UnknownKid) if may_refetch => match header_kid(token) {
                Some(kid) if plausible_kid(&kid) => Err(Miss::Refetch(kid)),
                _ => Err(Miss::Refused(VerifyError::UnknownKid)),
            },
            Err(e) => Err(Miss::Refused(e)),
        }
    }

    /// The pending part of a verification begun by [`Verifier::start`].
    async fn resolve(
        &self,
        token: &str,
        peer_cert: Option<&[u8]>,
        mut step: Step,
        mut cache: CacheUse,
    ) -> Result<Claims, VerifyError> {
        let result = loop {
            match step {
                Step::Done(r) => break r,
                Step::Refetch(kid) => {
                    self.inner.jwks.refetch_for(&kid).await;
                    (step, cache) = self.step(token, peer_cert, false);
                }
                Step::Lookup(claims, lookup) => break lookup.await.map(|()| claims),
            }
        };
        self.finish(result, cache)
    }

    /// The one place a verification's outcome is reported.
    fn finish(&self, result: Result<Claims, VerifyError>, cache: CacheUse) -> Result<Claims, VerifyError> {
        let outcome = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(*e),
        };
        self.inner.reporter.on_event(&VerifyEvent::Verified { result: outcome, cache });
        result
    }
}

/// RFC 8705: the token is bound to the certificate whose SHA-256
/// thumbprint it carries; the caller must have presented that certificate.
fn check_binding(cnf: &Confirmation, peer_cert: Option<&[u8]>) -> Result<(), VerifyError> {
    let der = peer_cert.ok_or(VerifyError::CnfMismatch)?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let thumbprint = URL_SAFE_NO_PAD.encode(digest.as_ref());
    if bool::from(thumbprint.as_bytes().ct_eq(cnf.x5t_s256.as_bytes())) {
        Ok(())
    } else {
        Err(VerifyError::CnfMismatch)
    }
}

/// The `kid` of a token's header, if it has one (only after the validator
/// refused the token for an unknown kid).
fn header_kid(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct KidOnly {
        kid: Option<String>,
    }
    let h64 = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(h64).ok()?;
    serde_json::from_slice::<KidOnly>(&bytes).ok()?.kid
}

/// Whether a `kid` could be one of ours (base64url thumbprints and similar
/// names). Anything else, e.g. with path or SQL characters, is refused
/// without a refetch.
fn plausible_kid(kid: &str) -> bool {
    (1..=128).contains(&kid.len()) && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Options of a [`Verifier`].
#[must_use]
pub struct VerifierBuilder {
    validator: Validator,
    channel: Option<Channel>,
    jwks: Option<JwksSource>,
    jwks_options: JwksOptions,
    revocation: Option<Arc<dyn RevocationCheck>>,
    feed_options: Option<FeedOptions>,
    clock: Arc<dyn Clock>,
    cache_capacity: u64,
    observer: Option<Box<dyn VerifyObserver>>,
}

impl std::fmt::Debug for VerifierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierBuilder").field("validator", &self.validator).finish_non_exhaustive()
    }
}

impl VerifierBuilder {
    /// The mTLS channel to the auth service: keys come from `GetJwks` and
    /// revocations from a [`RevocationFeed`] on it, unless
    /// [`jwks`](Self::jwks) or [`revocation`](Self::revocation) say
    /// otherwise. Build it with
    /// [`MtlsFiles::auth_channel`](crate::MtlsFiles::auth_channel), which
    /// accepts only `https://` and the auth server's own identity: whoever
    /// answers `GetJwks` on this channel decides which tokens pass.
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Where keys come from (default: `GetJwks` on the channel).
    pub fn jwks(mut self, source: JwksSource) -> Self {
        self.jwks = Some(source);
        self
    }

    /// Timing of the key cache.
    pub fn jwks_options(mut self, opts: JwksOptions) -> Self {
        self.jwks_options = opts;
        self
    }

    /// The revocation check (default: a [`RevocationFeed`] on the channel).
    pub fn revocation(mut self, check: impl RevocationCheck) -> Self {
        self.revocation = Some(Arc::new(check));
        self
    }

    /// Timing and stale policy of the default revocation feed, the one on
    /// the [`channel`](Self::channel) (default: stale after 30 s of
    /// silence, then fail closed; see [`StalePolicy`](super::StalePolicy)).
    /// Checked by [`build`](Self::build), which also refuses them
    /// ([`BuildError::FeedOptionsIgnored`]) next to a
    /// [`revocation`](Self::revocation) check: a feed given there carries
    /// its own options.
    pub fn feed_options(mut self, opts: FeedOptions) -> Self {
        self.feed_options = Some(opts);
        self
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Clock leeway for `exp`, `nbf` and `iat` (default 30 s, capped at 300 s).
    pub fn leeway_secs(mut self, secs: u64) -> Self {
        self.validator = self.validator.leeway_secs(secs);
        self
    }

    /// The algorithms accepted (default ES256, EdDSA, RS256, PS256); each
    /// key is still pinned to its own.
    pub fn allowed_algs(mut self, algs: impl IntoIterator<Item = Algorithm>) -> Self {
        self.validator = self.validator.allowed_algs(algs);
        self
    }

    /// Largest token accepted, in bytes (default 8 KiB).
    pub fn max_token_bytes(mut self, bytes: usize) -> Self {
        self.validator = self.validator.max_token_bytes(bytes);
        self
    }

    /// Capacity of the verified-token cache (default 100,000; 0 disables it).
    pub fn cache_capacity(mut self, tokens: u64) -> Self {
        self.cache_capacity = tokens;
        self
    }

    /// Where every outcome is reported: each verification, key refreshes,
    /// and the revocation feed's connection, snapshots and staleness (see
    /// [`VerifyEvent`]). Default: none, beyond the counters of
    /// [`Verifier::stats`]. A revocation check given with
    /// [`revocation`](Self::revocation) reports to it from [`build`](Self::build) on.
    pub fn observer(mut self, observer: impl VerifyObserver) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Builds the verifier and starts loading keys and revocations in the
    /// background on the current tokio runtime.
    pub fn build(self) -> Result<Verifier, BuildError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BuildError::NoRuntime);
        }
        if let Some(opts) = &self.feed_options {
            if self.revocation.is_some() {
                return Err(BuildError::FeedOptionsIgnored);
            }
            opts.validate()?;
        }
        let source = match (self.jwks, &self.channel) {
            (Some(s), _) => s,
            (None, Some(ch)) => JwksSource::grpc(ch.clone()),
            (None, None) => return Err(BuildError::NoJwksSource),
        };
        let metrics = VerifyMetrics::new(self.validator.audience());
        let reporter = Arc::new(Reporter::new(metrics, self.observer));
        let report_to: Arc<dyn VerifyObserver> = reporter.clone();
        let revocation: Arc<dyn RevocationCheck> = match (self.revocation, self.channel) {
            (Some(r), _) => {
                r.report_to(Arc::clone(&report_to));
                r
            }
            (None, Some(ch)) => Arc::new(RevocationFeed::connect_reporting(
                ch,
                Arc::clone(&self.clock),
                self.feed_options.unwrap_or_default(),
                Arc::clone(&report_to),
            )?),
            (None, None) => return Err(BuildError::NoRevocation),
        };
        let cache = (self.cache_capacity > 0).then(|| Arc::new(TokenCache::new(self.cache_capacity)));
        let evictor = match (&cache, revocation.subscribe()) {
            (Some(cache), Some(mut events)) => {
                let cache = Arc::clone(cache);
                Some(AbortOnDrop(tokio::spawn(async move {
                    loop {
                        match events.recv().await {
                            Ok(id) => cache.evict(id.kind, &id.id),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                // The deny set is still checked on every hit; dropping
                                // the cache only costs signature checks.
                                tracing::warn!(missed = n, "revocation events lagged; clearing the token cache");
                                cache.clear();
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        }
                    }
                })))
            }
            _ => None,
        };
        let jwks = JwksCache::start(source, self.jwks_options, report_to);
        let feed_ticker = reporter.metrics().watch_feed(&revocation, Arc::clone(&self.clock));
        Ok(Verifier {
            inner: Arc::new(Inner {
                validator: self.validator,
                jwks,
                revocation,
                cache,
                clock: self.clock,
                reporter,
                _evictor: evictor,
                _feed_ticker: feed_ticker,
            }),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;
    use crate::ManualClock;
    use crate::verify::jwks::Scripted;
    use crate::verify::observe::{FeedHealth, Recorder};
    use crate::verify::revocation::StalePolicy;
    use crate::verify::test_keys::{TestKey, claims};

    const NOW: u64 = 1_700_000_000;

    /// A verifier on scripted keys with a fresh revocation feed.
    fn scripted_verifier(s: Arc<Scripted>, clock: &ManualClock) -> Verifier {
        Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::scripted(s))
            .revocation(fresh_feed(clock))
            .clock(clock.clone())
            .build()
            .unwrap()
    }

    fn fresh_feed(clock: &ManualClock) -> RevocationFeed {
        let feed = RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions::default()).unwrap();
        feed.apply(snapshot(vec![]));
        feed
    }

    fn snapshot(entries: Vec<auth_proto::auth::v1::Revocation>) -> auth_proto::auth::v1::RevocationEvent {
        use auth_proto::auth::v1 as pb;
        pb::RevocationEvent {
            event: Some(pb::revocation_event::Event::Snapshot(pb::RevocationSnapshot { entries, more: false })),
        }
    }

    fn revoke(feed: &RevocationFeed, kind: auth_proto::auth::v1::RevocationKind, id: &str) {
        use auth_proto::auth::v1 as pb;
        feed.apply(pb::RevocationEvent {
            event: Some(pb::revocation_event::Event::Revoked(pb::Revocation {
                kind: kind as i32,
                id: id.into(),
                expires_at: NOW + 600,
            })),
        });
    }

    async fn verifier(key: &TestKey, clock: &ManualClock, feed: RevocationFeed) -> Verifier {
        let v = Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::fixed(key.key_set()))
            .revocation(feed)
            .clock(clock.clone())
            .build()
            .unwrap();
        v.ready().await;
        v
    }

    #[test]
    fn build_needs_a_runtime_and_sources() {
        let b = Verifier::builder("auth-service", "inventory").jwks(JwksSource::fixed(KeySet::default()));
        assert_eq!(b.build().unwrap_err(), BuildError::NoRuntime);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        let b = Verifier::builder("auth-service", "inventory");
        assert_eq!(b.build().unwrap_err(), BuildError::NoJwksSource);
        let b = Verifier::builder("auth-service", "inventory").jwks(JwksSource::fixed(KeySet::default()));
        assert_eq!(b.build().unwrap_err(), BuildError::NoRevocation);
    }

    use crate::verify::KeySet;

    #[tokio::test]
    async fn second_verification_is_a_cache_hit() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let v = verifier(&key, &clock, fresh_feed(&clock)).await;
        let token = key.sign(&claims(NOW, "j1"));
        let a = v.verify(&token, None).await.unwrap();
        let b = v.verify(&token, None).await.unwrap();
        assert_eq!(a, b);
        let stats = v.stats();
        assert_eq!((stats.accepted, stats.cache_misses, stats.cache_hits), (2, 1, 1));
    }

    #[tokio::test]
    async fn cache_hit_still_checks_expiry_against_the_clock() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let v = verifier(&key, &clock, fresh_feed(&clock)).await;
        let token = key.sign(&claims(NOW, "j1"));
        v.verify(&token, None).await.unwrap();
        clock.advance(300 + 30);
        // Expiry is decided before the (now stale) feed is asked.
        assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::Expired);
    }

    #[tokio::test]
    async fn revocation_refuses_cached_tokens_by_jti_and_sid() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let feed = fresh_feed(&clock);
        let v = verifier(&key, &clock, feed.clone()).await;
        let t1 = key.sign(&claims(NOW, "j1"));
        let mut c2 = claims(NOW, "j2");
        c2["sid"] = json!("s-2");
        let t2 = key.sign(&c2);
        v.verify(&t1, None).await.unwrap();
        v.verify(&t2, None).await.unwrap();
        revoke(&feed, auth_proto::auth::v1::RevocationKind::Jti, "j1");
        revoke(&feed, auth_proto::auth::v1::RevocationKind::Sid, "s-2");
        assert_eq!(v.verify(&t1, None).await.unwrap_err(), VerifyError::Revoked);
        assert_eq!(v.verify(&t2, None).await.unwrap_err(), VerifyError::Revoked);
        assert_eq!(v.stats().rejected("revoked"), 2);
    }

    #[tokio::test]
    async fn revocation_event_evicts_the_cached_entry() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let feed = fresh_feed(&clock);
        let v = verifier(&key, &clock, feed.clone()).await;
        v.verify(&key.sign(&claims(NOW, "j1")), None).await.unwrap();
        v.verify(&key.sign(&claims(NOW, "j2")), None).await.unwrap();
        assert_eq!(v.cached_tokens(), 2);
        revoke(&feed, auth_proto::auth::v1::RevocationKind::Jti, "j1");
        for _ in 0..1_000 {
            if v.cached_tokens() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(v.cached_tokens(), 1, "the revoked token's entry is gone, the other stays");
    }

    #[tokio::test]
    async fn stale_feed_fails_closed_after_signature_checks() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let feed = fresh_feed(&clock);
        let v = verifier(&key, &clock, feed.clone()).await;
        clock.advance(31);
        let token = key.sign(&claims(NOW, "j1"));
        let err = v.verify(&token, None).await.unwrap_err();
        assert_eq!(err, VerifyError::FeedStale);
        assert!(err.is_unavailable());
        assert_eq!(v.verify("a.b.c", None).await.unwrap_err(), VerifyError::Malformed, "bad tokens stay 401");
        feed.apply(snapshot(vec![]));
        v.verify(&token, None).await.unwrap();
    }

    #[tokio::test]
    async fn build_refuses_nonsense_feed_options() {
        let key = TestKey::es256();
        // The options configure the feed on the channel: the one they are
        // used for.
        let build = |opts: FeedOptions| {
            Verifier::builder("auth-service", "inventory")
                .jwks(JwksSource::fixed(key.key_set()))
                .channel(Channel::from_static("http://127.0.0.1:1").connect_lazy())
                .feed_options(opts)
                .build()
        };
        let zero = FeedOptions { stale_after: std::time::Duration::ZERO, ..FeedOptions::default() };
        assert_eq!(build(zero).unwrap_err(), BuildError::FeedOptions(FeedOptionsError::StaleAfter));
        let long = FeedOptions { stale_after: std::time::Duration::from_secs(601), ..FeedOptions::default() };
        assert_eq!(build(long).unwrap_err(), BuildError::FeedOptions(FeedOptionsError::StaleAfter));
        let forever = FeedOptions {
            on_stale: StalePolicy::ServeLastKnown { up_to: std::time::Duration::MAX },
            ..FeedOptions::default()
        };
        let err = build(forever).unwrap_err();
        assert_eq!(err, BuildError::FeedOptions(FeedOptionsError::ServeUpTo));
        assert_eq!(
            err.to_string(),
            "invalid feed options: feed on_stale ServeLastKnown up_to must be between 1 s and 3600 s"
        );
        let v = build(FeedOptions {
            on_stale: StalePolicy::ServeLastKnown { up_to: std::time::Duration::from_secs(3_600) },
            ..FeedOptions::default()
        })
        .unwrap();
        assert_eq!(v.stats().feed.unwrap().health, FeedHealth::Syncing, "the feed on the channel");
    }

    #[tokio::test]
    async fn build_refuses_feed_options_it_would_ignore() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let serve = FeedOptions {
            on_stale: StalePolicy::ServeLastKnown { up_to: std::time::Duration::from_secs(60) },
            ..FeedOptions::default()
        };
        let with_check = |opts: FeedOptions| {
            Verifier::builder("auth-service", "inventory")
                .jwks(JwksSource::fixed(key.key_set()))
                .revocation(fresh_feed(&clock))
                .feed_options(opts)
                .build()
        };
        assert_eq!(with_check(serve).unwrap_err(), BuildError::FeedOptionsIgnored);
        assert_eq!(with_check(FeedOptions::default()).unwrap_err(), BuildError::FeedOptionsIgnored);
        // A feed given as the check carries its own options, checked when it
        // is made.
        let forever = FeedOptions {
            on_stale: StalePolicy::ServeLastKnown { up_to: std::time::Duration::MAX },
            ..FeedOptions::default()
        };
        assert_eq!(
            RevocationFeed::detached(Arc::new(clock.clone()), forever).unwrap_err(),
            FeedOptionsError::ServeUpTo
        );
    }

    #[tokio::test]
    async fn serving_last_known_accepts_until_up_to_and_reports_every_stale_answer() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let opts = FeedOptions {
            on_stale: StalePolicy::ServeLastKnown { up_to: std::time::Duration::from_secs(60) },
            ..FeedOptions::default()
        };
        let feed = RevocationFeed::detached(Arc::new(clock.clone()), opts).unwrap();
        feed.apply(snapshot(vec![]));
        let events = Arc::new(Recorder::default());
        let v = Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::fixed(key.key_set()))
            .revocation(feed.clone())
            .clock(clock.clone())
            .observer(events.clone())
            .build()
            .unwrap();
        v.ready().await;
        let token = key.sign(&claims(NOW, "j1"));
        let known = key.sign(&claims(NOW, "j2"));
        v.verify(&token, None).await.unwrap();
        revoke(&feed, auth_proto::auth::v1::RevocationKind::Jti, "j2");
        assert_eq!(v.stats().feed.unwrap().health, FeedHealth::Fresh);
        events.take();

        clock.advance(31);
        v.verify(&token, None).await.unwrap();
        v.verify(&token, None).await.unwrap();
        assert_eq!(v.verify(&known, None).await.unwrap_err(), VerifyError::Revoked, "known revocations hold");
        assert_eq!(
            events.take(),
            [
                "FeedServingStale { until: 1700000090 }",
                "ServedStale",
                "Verified { result: Ok(()), cache: Hit }",
                "ServedStale",
                "Verified { result: Ok(()), cache: Hit }",
                "Verified { result: Err(Revoked), cache: Miss }",
            ]
        );
        let feed_stats = v.stats().feed.unwrap();
        assert_eq!(
            (feed_stats.health, feed_stats.served_stale, feed_stats.stale_episodes),
            (FeedHealth::ServingStale, 2, 1)
        );
        assert_eq!(feed_stats.entries, 1);

        clock.advance(60);
        assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::FeedStale);
        assert_eq!(events.take(), ["FeedStale", "Verified { result: Err(FeedStale), cache: Hit }"]);
        let stats = v.stats();
        assert_eq!(stats.feed.as_ref().unwrap().health, FeedHealth::Stale);
        assert_eq!((stats.accepted, stats.rejected("feed_stale"), stats.rejected("revoked")), (3, 1, 1));
    }

    #[tokio::test]
    async fn no_keys_means_unavailable() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let s = Arc::new(Scripted {
            fetches: AtomicUsize::new(0),
            answer: std::sync::Mutex::new(Err(super::super::JwksError::Timeout)),
        });
        let v = scripted_verifier(s, &clock);
        let err = v.verify(&key.sign(&claims(NOW, "j")), None).await.unwrap_err();
        assert_eq!(err, VerifyError::NoKeys);
        assert!(err.is_unavailable());
    }

    #[tokio::test]
    async fn unknown_kid_refetches_and_accepts_a_rotated_key() {
        let old = TestKey::es256();
        let new = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let s = Arc::new(Scripted { fetches: AtomicUsize::new(0), answer: std::sync::Mutex::new(Ok(old.jwks_json())) });
        let v = scripted_verifier(s.clone(), &clock);
        v.ready().await;
        *s.answer.lock().unwrap() = Ok(json!({ "keys": [old.jwk(), new.jwk()] }).to_string());
        v.verify(&new.sign(&claims(NOW, "j")), None).await.unwrap();
        assert_eq!(s.fetches.load(Ordering::SeqCst), 2);
    }

    /// A verifier on scripted keys refreshed every 10 ms (real time).
    fn refreshing_verifier(s: Arc<Scripted>, clock: &ManualClock) -> Verifier {
        Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::scripted(s))
            .jwks_options(JwksOptions {
                refresh_interval: std::time::Duration::from_millis(10),
                ..JwksOptions::default()
            })
            .revocation(fresh_feed(clock))
            .clock(clock.clone())
            .build()
            .unwrap()
    }

    /// Answers `json` from now on, and waits until a refresh has stored it.
    async fn publish(s: &Scripted, json: String) {
        *s.answer.lock().unwrap() = Ok(json);
        // Fetches run one after another: once the second fetch from here
        // has begun, the first one (which read `json`) has been stored.
        let base = s.fetches.load(Ordering::SeqCst);
        while s.fetches.load(Ordering::SeqCst) < base + 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn cached_token_is_refused_once_its_key_leaves_the_jwks() {
        let (old, new) = (TestKey::es256(), TestKey::es256());
        let clock = ManualClock::new(NOW);
        let both = json!({ "keys": [old.jwk(), new.jwk()] }).to_string();
        let s = Arc::new(Scripted { fetches: AtomicUsize::new(0), answer: std::sync::Mutex::new(Ok(both)) });
        let v = refreshing_verifier(s.clone(), &clock);
        v.ready().await;
        let token = old.sign(&claims(NOW, "j-old"));
        v.verify(&token, None).await.unwrap();
        v.verify(&token, None).await.unwrap();
        assert_eq!(v.stats().cache_hits, 1, "the token is cached");

        publish(&s, new.jwks_json()).await;
        assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::UnknownKid, "cached, key gone");
        assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::UnknownKid, "and stays refused");
        v.verify(&new.sign(&claims(NOW, "j-new")), None).await.unwrap();
        assert_eq!(v.cached_tokens(), 1, "only the live key's token is cached");
    }

    #[tokio::test]
    async fn cached_token_is_refused_once_its_kid_names_another_key() {
        let (old, new) = (TestKey::es256(), TestKey::es256());
        let clock = ManualClock::new(NOW);
        let s = Arc::new(Scripted { fetches: AtomicUsize::new(0), answer: std::sync::Mutex::new(Ok(old.jwks_json())) });
        let v = refreshing_verifier(s.clone(), &clock);
        v.ready().await;
        let token = old.sign(&claims(NOW, "j"));
        v.verify(&token, None).await.unwrap();
        v.verify(&token, None).await.unwrap();
        assert_eq!(v.stats().cache_hits, 1, "the token is cached");

        // Another key published under the same kid.
        let mut jwk = new.jwk();
        jwk["kid"] = json!(old.kid);
        publish(&s, json!({ "keys": [jwk] }).to_string()).await;
        assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::BadSignature);
    }

    #[tokio::test]
    async fn cache_hits_survive_a_refresh_that_keeps_the_key() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let s = Arc::new(Scripted { fetches: AtomicUsize::new(0), answer: std::sync::Mutex::new(Ok(key.jwks_json())) });
        let v = refreshing_verifier(s.clone(), &clock);
        v.ready().await;
        let token = key.sign(&claims(NOW, "j"));
        v.verify(&token, None).await.unwrap();
        publish(&s, key.jwks_json()).await;
        v.verify(&token, None).await.unwrap();
        let stats = v.stats();
        assert_eq!((stats.cache_misses, stats.cache_hits), (1, 1), "a refetched, unchanged key keeps its entries");
    }

    #[tokio::test]
    async fn implausible_kids_never_trigger_a_refetch() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let s = Arc::new(Scripted { fetches: AtomicUsize::new(0), answer: std::sync::Mutex::new(Ok(key.jwks_json())) });
        let v = scripted_verifier(s.clone(), &clock);
        v.ready().await;
        for kid in ["../../etc/passwd", "x' OR '1'='1", "a/b", ""] {
            let header = json!({ "alg": "ES256", "kid": kid, "typ": "at+jwt" });
            let token = key.sign_raw(&header, &claims(NOW, "j").to_string());
            assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::UnknownKid, "{kid}");
        }
        assert_eq!(s.fetches.load(Ordering::SeqCst), 1, "only the initial load");
    }

    #[tokio::test]
    async fn bound_token_needs_the_matching_peer_certificate() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let v = verifier(&key, &clock, fresh_feed(&clock)).await;
        let cert = b"pretend DER of the caller's certificate";
        let thumb = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert).as_ref());
        let mut c = claims(NOW, "j");
        c["cnf"] = json!({ "x5t#S256": thumb });
        let token = key.sign(&c);
        v.verify(&token, Some(cert)).await.unwrap();
        assert_eq!(v.verify(&token, Some(b"another cert")).await.unwrap_err(), VerifyError::CnfMismatch);
        assert_eq!(v.verify(&token, None).await.unwrap_err(), VerifyError::CnfMismatch);
    }

    #[tokio::test]
    async fn oversized_tokens_are_refused_before_hashing() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let v = verifier(&key, &clock, fresh_feed(&clock)).await;
        let big = "a".repeat(8 * 1024 + 1);
        assert_eq!(v.verify(&big, None).await.unwrap_err(), VerifyError::TooLarge);
        assert_eq!(v.stats().cache_misses, 0);
    }

    #[tokio::test]
    async fn observer_sees_one_event_per_verification_with_its_reason() {
        let (old, new) = (TestKey::es256(), TestKey::es256());
        let clock = ManualClock::new(NOW);
        let s = Arc::new(Scripted { fetches: AtomicUsize::new(0), answer: std::sync::Mutex::new(Ok(old.jwks_json())) });
        let feed = fresh_feed(&clock);
        let events = Arc::new(Recorder::default());
        let v = Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::scripted(s.clone()))
            .revocation(feed.clone())
            .clock(clock.clone())
            .observer(events.clone())
            .build()
            .unwrap();
        v.ready().await;
        assert_eq!(events.take(), ["JwksRefreshed { keys: 1, trigger: Initial }"]);

        let t1 = old.sign(&claims(NOW, "j1"));
        v.verify(&t1, None).await.unwrap();
        v.verify(&t1, None).await.unwrap();
        assert_eq!(v.verify(&"a".repeat(9 * 1024), None).await.unwrap_err(), VerifyError::TooLarge);
        assert_eq!(
            events.take(),
            [
                "Verified { result: Ok(()), cache: Miss }",
                "Verified { result: Ok(()), cache: Hit }",
                "Verified { result: Err(TooLarge), cache: Bypassed }",
            ]
        );

        revoke(&feed, auth_proto::auth::v1::RevocationKind::Jti, "j3");
        assert_eq!(v.verify(&old.sign(&claims(NOW, "j3")), None).await.unwrap_err(), VerifyError::Revoked);
        assert_eq!(events.take(), ["FeedHeard { at: 1700000000 }", "Verified { result: Err(Revoked), cache: Miss }"]);

        // The pending path (a refetch for a new kid) reports once, at its end.
        *s.answer.lock().unwrap() = Ok(json!({ "keys": [old.jwk(), new.jwk()] }).to_string());
        v.verify(&new.sign(&claims(NOW, "j2")), None).await.unwrap();
        assert_eq!(
            events.take(),
            ["JwksRefreshed { keys: 2, trigger: UnknownKid }", "Verified { result: Ok(()), cache: Miss }"]
        );

        // A refusal after a cache hit: the binding is checked on every request.
        let cert = b"the caller's certificate".as_slice();
        let mut bound = claims(NOW, "j5");
        let thumb = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert).as_ref());
        bound["cnf"] = json!({ "x5t#S256": thumb });
        let bound = old.sign(&bound);
        v.verify(&bound, Some(cert)).await.unwrap();
        assert_eq!(v.verify(&bound, Some(b"another")).await.unwrap_err(), VerifyError::CnfMismatch);
        assert_eq!(
            events.take(),
            ["Verified { result: Ok(()), cache: Miss }", "Verified { result: Err(CnfMismatch), cache: Hit }"]
        );

        clock.advance(31);
        assert_eq!(v.verify(&new.sign(&claims(NOW, "j4")), None).await.unwrap_err(), VerifyError::FeedStale);
        clock.advance(300);
        assert_eq!(v.verify(&t1, None).await.unwrap_err(), VerifyError::Expired);
        assert_eq!(
            events.take(),
            [
                "FeedStale",
                "Verified { result: Err(FeedStale), cache: Miss }",
                "Verified { result: Err(Expired), cache: Miss }",
            ]
        );
        let stats = v.stats();
        assert_eq!((stats.accepted, stats.cache_hits, stats.cache_misses), (4, 2, 6));
        assert_eq!(
            stats.rejected,
            [("too_large", 1), ("expired", 1), ("revoked", 1), ("cnf_mismatch", 1), ("feed_stale", 1)]
        );
    }

    /// A revocation check that always answers after I/O (as redis mode does).
    struct Remote;

    impl RevocationCheck for Remote {
        fn check(&self, jti: &str, _: Option<&str>, _: u64) -> RevocationLookup {
            let revoked = jti == "revoked";
            RevocationLookup::Pending(Box::pin(async move {
                tokio::task::yield_now().await;
                if revoked { Err(VerifyError::Revoked) } else { Ok(()) }
            }))
        }
    }

    #[tokio::test]
    async fn lookups_that_need_io_are_reported_once_when_they_finish() {
        let key = TestKey::es256();
        let clock = ManualClock::new(NOW);
        let events = Arc::new(Recorder::default());
        let v = Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::fixed(key.key_set()))
            .revocation(Remote)
            .clock(clock)
            .observer(events.clone())
            .build()
            .unwrap();
        v.ready().await;
        events.take();
        let live = key.sign(&claims(NOW, "live"));
        match v.start(Ok(&live), None) {
            Verification::Pending(rest) => {
                assert!(events.take().is_empty(), "nothing is reported before the lookup answers");
                rest.await.unwrap();
            }
            Verification::Done(r) => panic!("decided without the lookup: {r:?}"),
        }
        v.verify(&live, None).await.unwrap();
        assert_eq!(v.verify(&key.sign(&claims(NOW, "revoked")), None).await.unwrap_err(), VerifyError::Revoked);
        assert_eq!(
            events.take(),
            [
                "Verified { result: Ok(()), cache: Miss }",
                "Verified { result: Ok(()), cache: Hit }",
                "Verified { result: Err(Revoked), cache: Miss }",
            ]
        );
    }
}
