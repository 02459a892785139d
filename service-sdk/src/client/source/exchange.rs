//! The exchange call, as a [`tower::Service`].
//!
//! The token source asks an [`ExchangeService`] for each token: a request
//! ([`ExchangeRequest`]: credentials, audience, scopes, optional subject
//! token) in, a response ([`ExchangeResponse`]: the token and its lifetime)
//! out. The default inner service is [`GrpcExchange`], the `ExchangeToken`
//! RPC over the (mTLS) channel to the auth service; timeouts, trace
//! propagation (through [`ExchangeRequest::metadata`]) and metrics attach as
//! layers with [`TokenSourceBuilder::layer`](super::TokenSourceBuilder::layer),
//! and the flows of the source never know they are there.
//!
//! Around the service sits what the source itself decides: one retry after
//! the credentials changed, the back-off of the slot, and the cached value
//! with its renewal point.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{AudienceRequest, ExchangeTokenRequest, ExchangeTokensRequest, audience_result};
use http::HeaderValue;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};

use super::error::TokenError;
use super::renew::refresh_in;
use super::slot::{AccessToken, Cached, Slot};
use super::{Config, Inner};
use crate::BoxError;
use crate::backoff::unit_random;
use crate::client::secret::ClientCredentials;

/// The exchange service a [`TokenSource`](super::TokenSource) calls, with
/// its layers: boxed, cloneable, shareable across threads.
pub type ExchangeService = BoxCloneSyncService<ExchangeRequest, ExchangeResponse, BoxError>;

/// One token exchange to perform. `Debug` shows neither the client secret
/// nor the subject token.
#[derive(Clone)]
#[non_exhaustive]
pub struct ExchangeRequest {
    /// The service's own credentials.
    pub credentials: ClientCredentials,
    /// The audience the token is for.
    pub audience: String,
    /// The scopes to ask for; empty means everything the policy allows.
    pub scopes: Vec<String>,
    /// The access token of the user this call acts for, if any.
    pub subject_token: Option<String>,
    /// The lifetime to ask for; zero takes the server's default.
    pub requested_ttl: Duration,
    /// Extra request metadata (e.g. `traceparent` from a propagation layer),
    /// sent as gRPC metadata by [`GrpcExchange`].
    pub metadata: MetadataMap,
}

impl ExchangeRequest {
    /// A request for a token for `audience` with `credentials`, this service
    /// acting as itself, with the server's default scopes and lifetime.
    pub fn new(credentials: ClientCredentials, audience: impl Into<String>) -> Self {
        Self {
            credentials,
            audience: audience.into(),
            scopes: Vec::new(),
            subject_token: None,
            requested_ttl: Duration::ZERO,
            metadata: MetadataMap::new(),
        }
    }
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("client_id", &self.credentials.client_id)
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("on_behalf_of_user", &self.subject_token.is_some())
            .field("requested_ttl", &self.requested_ttl)
            .finish_non_exhaustive()
    }
}

/// What an exchange returned. `Debug` does not print the token.
#[derive(Clone)]
#[non_exhaustive]
pub struct ExchangeResponse {
    /// The access token (compact JWS).
    pub access_token: String,
    /// Its lifetime from now, as the auth service stated it; the source
    /// measures it on its own clock, so clock skew does not matter.
    pub expires_in: Duration,
    /// The scopes granted.
    pub scope: Vec<String>,
}

impl ExchangeResponse {
    /// A response carrying `access_token`, valid for `expires_in`, with no
    /// scopes.
    pub fn new(access_token: impl Into<String>, expires_in: Duration) -> Self {
        Self { access_token: access_token.into(), expires_in, scope: Vec::new() }
    }
}

impl std::fmt::Debug for ExchangeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeResponse")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The default exchange service: the `ExchangeToken` RPC over a channel to
/// the auth service. Clones share one channel, which
/// [`set_channel`](Self::set_channel) replaces for all of them. Fails with
/// the [`tonic::Status`] of the call.
#[derive(Clone)]
pub struct GrpcExchange {
    client: Arc<ArcSwap<AuthClient<Channel>>>,
}

impl std::fmt::Debug for GrpcExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcExchange").finish_non_exhaustive()
    }
}

impl GrpcExchange {
    /// Exchanges over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { client: Arc::new(ArcSwap::from_pointee(AuthClient::new(channel))) }
    }

    /// Replaces the channel of this service and all its clones, e.g. after
    /// the client certificate was rotated.
    pub fn set_channel(&self, channel: Channel) {
        self.client.store(Arc::new(AuthClient::new(channel)));
    }
}

impl Service<ExchangeRequest> for GrpcExchange {
    type Response = ExchangeResponse;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<ExchangeResponse, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The channel buffers; each call waits for it inside `exchange_token`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ExchangeRequest) -> Self::Future {
        let mut client = AuthClient::clone(&self.client.load());
        req.metadata = traced(req.metadata);
        Box::pin(async move {
            let ExchangeRequest { credentials, audience, scopes, subject_token, requested_ttl, metadata } = req;
            let message = ExchangeTokenRequest {
                client_secret: credentials.client_secret.expose().to_owned(),
                client_id: credentials.client_id,
                subject_token: subject_token.unwrap_or_default(),
                audience,
                scope: scopes,
                requested_ttl_seconds: u32::try_from(requested_ttl.as_secs()).unwrap_or(u32::MAX),
            };
            let request = tonic::Request::from_parts(metadata, tonic::Extensions::default(), message);
            let resp = client.exchange_token(request).await?.into_inner();
            Ok(ExchangeResponse {
                access_token: resp.access_token,
                expires_in: Duration::from_secs(u64::from(resp.expires_in)),
                scope: resp.scope,
            })
        })
    }
}

/// `metadata` with the trace context of the current span (feature `otel`),
/// unless a layer set one already: the exchange joins the trace of the
/// call that needed the token.
fn traced(#[allow(unused_mut)] mut metadata: MetadataMap) -> MetadataMap {
    #[cfg(feature = "otel")]
    if !metadata.contains_key(crate::otel::TRACEPARENT) {
        let mut headers = metadata.into_headers();
        crate::otel::inject_current(&mut headers);
        metadata = MetadataMap::from_headers(headers);
    }
    metadata
}

/// Most audiences one ExchangeTokens call may carry (as the proto says).
pub(super) const MAX_BATCH: usize = 16;

/// A batch exchange (the `ExchangeTokens` RPC): the service acting as
/// itself, for several audiences, each with its scopes.
#[derive(Clone)]
pub(super) struct BatchRequest {
    pub(super) credentials: ClientCredentials,
    pub(super) audiences: Vec<(String, Vec<String>)>,
    pub(super) requested_ttl: Duration,
}

/// Per audience, in request order: the token, or the status its refusal
/// would have had as a single exchange.
pub(super) type BatchResponse = Vec<Result<ExchangeResponse, tonic::Status>>;

/// The batch exchange as a service (by default [`GrpcExchange`]'s).
pub(super) type BatchService = BoxCloneSyncService<BatchRequest, BatchResponse, BoxError>;

impl Service<BatchRequest> for GrpcExchange {
    type Response = BatchResponse;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<BatchResponse, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: BatchRequest) -> Self::Future {
        let mut client = AuthClient::clone(&self.client.load());
        let metadata = traced(MetadataMap::new());
        Box::pin(async move {
            let BatchRequest { credentials, audiences, requested_ttl } = req;
            let asked: Vec<String> = audiences.iter().map(|(a, _)| a.clone()).collect();
            let message = ExchangeTokensRequest {
                client_secret: credentials.client_secret.expose().to_owned(),
                client_id: credentials.client_id,
                subject_token: String::new(),
                audiences: audiences.into_iter().map(|(audience, scope)| AudienceRequest { audience, scope }).collect(),
                requested_ttl_seconds: u32::try_from(requested_ttl.as_secs()).unwrap_or(u32::MAX),
            };
            let request = tonic::Request::from_parts(metadata, tonic::Extensions::default(), message);
            let results = client.exchange_tokens(request).await?.into_inner().results;
            // One result per audience, in order: anything else is a broken
            // answer, and no token of it is trusted to be what it says.
            if results.len() != asked.len() || results.iter().zip(&asked).any(|(r, a)| r.audience != *a) {
                return Err(tonic::Status::internal("the auth service answered another set of audiences"));
            }
            Ok(results
                .into_iter()
                .map(|r| match r.result {
                    Some(audience_result::Result::Token(t)) => Ok(ExchangeResponse {
                        access_token: t.access_token,
                        expires_in: Duration::from_secs(u64::from(t.expires_in)),
                        scope: t.scope,
                    }),
                    Some(audience_result::Result::Error(e)) => {
                        let code = tonic::Code::from(i32::try_from(e.code).unwrap_or(i32::MAX));
                        Err(tonic::Status::new(code, e.message))
                    }
                    None => Err(tonic::Status::internal("an empty result")),
                })
                .collect())
        })
    }
}

/// Boxes `service`, with its errors as [`BoxError`].
pub(super) fn boxed<S>(service: S) -> ExchangeService
where
    S: Service<ExchangeRequest, Response = ExchangeResponse> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(Into::<BoxError>::into))
}

/// Boxes the batch exchange of `service`.
pub(super) fn boxed_batch<S>(service: S) -> BatchService
where
    S: Service<BatchRequest, Response = BatchResponse> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(Into::<BoxError>::into))
}

/// RFC 8705: the `cnf.x5t#S256` of a compact JWS, read from its payload
/// without verifying it (it came from the auth service over mTLS; the
/// source only needs to know which certificate it must travel with).
fn token_cnf(token: &str) -> Option<Box<str>> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Cnf {
        #[serde(rename = "x5t#S256")]
        x5t_s256: Box<str>,
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        cnf: Option<Cnf>,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Payload>(&json).ok()?.cnf.map(|c| c.x5t_s256)
}

/// The cached value of a response received at `now` (source clock): served
/// until `expiry_margin` (at most a tenth of its life) before it expires,
/// renewed at the point [`refresh_in`] picks with the random `unit` (the
/// tokens of one batch share it, so they fall due together again).
fn cached(resp: ExchangeResponse, now: u64, cfg: &Config, audience: &str, unit: f64) -> Result<Cached, TokenError> {
    let life = resp.expires_in.as_secs();
    let bearer = HeaderValue::try_from(format!("Bearer {}", resp.access_token))
        .map(|mut h| {
            h.set_sensitive(true);
            h
        })
        .map_err(|_| TokenError::Unavailable { audience: audience.into(), reason: "malformed token".into() })?;
    let expires_at = now.saturating_add(life);
    let margin = cfg.expiry_margin.min(life / 10);
    let renew_in = refresh_in(now, expires_at, margin, cfg.renew_point, unit);
    Ok(Cached {
        cnf: token_cnf(&resp.access_token),
        token: resp.access_token.into_boxed_str(),
        bearer,
        expires_at,
        margin,
        renew_at: now.saturating_add(renew_in.as_secs()),
        scope: resp.scope,
    })
}

impl Inner {
    /// One exchange (plus one retry after a credentials refresh); stores the
    /// result in `slot`, or moves the slot's back-off on. The caller holds
    /// the slot's flight lock.
    pub(super) async fn exchange_into(
        &self,
        slot: &Slot,
        subject: Option<&str>,
        renewal: bool,
    ) -> Result<AccessToken, TokenError> {
        let result = self.exchange_with_refresh(&slot.audience, subject, renewal).await;
        self.settle(slot, result)
    }

    /// Stores the outcome of an exchange in `slot`: the token, or the
    /// failure and the back-off it starts; wakes whoever waits for
    /// [`ready`](super::TokenSource::ready).
    fn settle(&self, slot: &Slot, result: Result<Cached, TokenError>) -> Result<AccessToken, TokenError> {
        let now_ms = self.clock.now_millis();
        let outcome = {
            let mut retry = slot.lock_retry();
            match result {
                Ok(cached) => {
                    retry.succeeded();
                    let cached = Arc::new(cached);
                    slot.current.store(Some(Arc::clone(&cached)));
                    Ok(AccessToken(cached))
                }
                Err(e) => {
                    self.stats.failed();
                    let delay = retry.failed(now_ms, e.clone());
                    let audience = &*slot.audience;
                    tracing::warn!(audience, error = %e, retry_in_ms = delay.as_millis() as u64, "token exchange failed");
                    Err(e)
                }
            }
        };
        self.settled.notify_waiters();
        outcome
    }

    /// Fetches the service's own tokens for `slots` in ExchangeTokens calls
    /// of at most [`MAX_BATCH`] audiences (one retry after the credentials
    /// changed, as for one exchange). The caller holds every slot's flight
    /// lock. Without a batch service, for a single slot, or when the auth
    /// service does not know the RPC, each slot gets its own exchange.
    pub(super) async fn exchange_batch(&self, slots: &[Arc<Slot>], renewal: bool) {
        let batch = self.batch.as_ref().filter(|_| slots.len() > 1 && !self.batch_unsupported.load(Ordering::Relaxed));
        let Some(batch) = batch else {
            for slot in slots {
                let _ = self.exchange_into(slot, None, renewal).await;
            }
            return;
        };
        for chunk in slots.chunks(MAX_BATCH) {
            self.exchange_chunk(batch, chunk, renewal).await;
        }
    }

    async fn exchange_chunk(&self, batch: &BatchService, slots: &[Arc<Slot>], renewal: bool) {
        let fail_all = |e: TokenError| {
            for slot in slots {
                let _ = self.settle(slot, Err(for_audience(&e, &slot.audience)));
            }
        };
        let creds = match self.creds.current().await {
            Ok(c) => c,
            Err(e) => {
                let e = TokenError::Credentials(e.to_string());
                slots.iter().for_each(|s| self.stats.exchange_done(&s.audience, Err(&e)));
                return fail_all(e);
            }
        };
        let mut outcome = self.batch_once(batch, &creds, slots, renewal).await;
        if let Err(BatchFailure::Refused(TokenError::CredentialsRejected { .. })) = &outcome {
            match self.creds.refresh().await {
                Ok(fresh) if fresh != creds => {
                    tracing::info!("credentials changed after a rejection; retrying the batch exchange");
                    outcome = self.batch_once(batch, &fresh, slots, renewal).await;
                }
                Ok(_) => {}
                Err(e) => return fail_all(TokenError::Credentials(e.to_string())),
            }
        }
        match outcome {
            Ok(results) => {
                for (slot, result) in slots.iter().zip(results) {
                    let _ = self.settle(slot, result);
                }
            }
            Err(BatchFailure::Refused(e)) => fail_all(e),
            Err(BatchFailure::Unsupported) => {
                tracing::info!("the auth service does not know ExchangeTokens; exchanging one audience at a time");
                self.batch_unsupported.store(true, Ordering::Relaxed);
                for slot in slots {
                    let _ = self.exchange_into(slot, None, renewal).await;
                }
            }
        }
    }

    async fn batch_once(
        &self,
        batch: &BatchService,
        creds: &ClientCredentials,
        slots: &[Arc<Slot>],
        renewal: bool,
    ) -> Result<Vec<Result<Cached, TokenError>>, BatchFailure> {
        self.stats.batch_sent();
        let audiences = slots
            .iter()
            .map(|s| {
                self.stats.exchange_sent(&s.audience, renewal);
                let scopes = self.cfg.scopes.get(&*s.audience).cloned().unwrap_or_default();
                (s.audience.to_string(), scopes)
            })
            .collect();
        let req = BatchRequest {
            credentials: creds.clone(),
            audiences,
            requested_ttl: Duration::from_secs(u64::from(self.cfg.requested_ttl)),
        };
        let results = match batch.clone().oneshot(req).await {
            Ok(results) => results,
            Err(e) => {
                if e.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == tonic::Code::Unimplemented) {
                    return Err(BatchFailure::Unsupported);
                }
                let first = slots.first().map_or("", |s| &*s.audience);
                let e = TokenError::from_exchange(first, false, e);
                slots.iter().for_each(|s| self.stats.exchange_done(&s.audience, Err(&for_audience(&e, &s.audience))));
                return Err(BatchFailure::Refused(e));
            }
        };
        // One random renewal point for the whole batch: its tokens fall due
        // together and are renewed together.
        let (now, unit) = (self.clock.now_unix(), unit_random());
        Ok(slots
            .iter()
            .zip(results)
            .map(|(slot, r)| {
                let audience = &*slot.audience;
                let result = match r {
                    Ok(resp) => cached(resp, now, &self.cfg, audience, unit),
                    Err(status) => Err(TokenError::from_exchange(audience, false, Box::new(status))),
                };
                self.stats.exchange_done(audience, result.as_ref().map(|_| ()));
                result
            })
            .collect())
    }

    async fn exchange_with_refresh(
        &self,
        audience: &str,
        subject: Option<&str>,
        renewal: bool,
    ) -> Result<Cached, TokenError> {
        // A credentials source that fails is reported like an exchange
        // that failed, though nothing was sent.
        let unreadable = |e: crate::client::credentials::CredentialsError| {
            let e = TokenError::Credentials(e.to_string());
            self.stats.exchange_done(audience, Err(&e));
            e
        };
        let creds = self.creds.current().await.map_err(unreadable)?;
        match self.exchange_once(&creds, audience, subject, renewal).await {
            Err(refused @ TokenError::CredentialsRejected { .. }) => {
                let fresh = self.creds.refresh().await.map_err(unreadable)?;
                if fresh == creds {
                    return Err(refused);
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
        self.stats.exchange_sent(audience, renewal);
        let mut req = ExchangeRequest::new(creds.clone(), audience);
        req.scopes = self.cfg.scopes.get(audience).cloned().unwrap_or_default();
        req.subject_token = subject.map(str::to_owned);
        req.requested_ttl = Duration::from_secs(u64::from(self.cfg.requested_ttl));
        let result = match self.exchange.clone().oneshot(req).await {
            Ok(resp) => cached(resp, self.clock.now_unix(), &self.cfg, audience, unit_random()),
            Err(e) => Err(TokenError::from_exchange(audience, subject.is_some(), e)),
        };
        self.stats.exchange_done(audience, result.as_ref().map(|_| ()));
        result
    }
}

/// Why a whole batch failed.
pub(super) enum BatchFailure {
    /// The auth service does not know ExchangeTokens (an older server).
    Unsupported,
    /// Refused or unreachable, for every audience alike.
    Refused(TokenError),
}

/// `e`, as the error of `audience` (a failure shared by a whole batch).
fn for_audience(e: &TokenError, audience: &str) -> TokenError {
    let audience = audience.to_owned();
    let reason = |r: &String| r.clone();
    match e {
        TokenError::Unavailable { reason: r, .. } => TokenError::Unavailable { audience, reason: reason(r) },
        TokenError::CredentialsRejected { reason: r, .. } => {
            TokenError::CredentialsRejected { audience, reason: reason(r) }
        }
        TokenError::Unauthenticated { reason: r, .. } => TokenError::Unauthenticated { audience, reason: reason(r) },
        TokenError::PermissionDenied { reason: r, .. } => TokenError::PermissionDenied { audience, reason: reason(r) },
        TokenError::InvalidRequest { reason: r, .. } => TokenError::InvalidRequest { audience, reason: reason(r) },
        other => other.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_of_a_token_is_read_from_its_payload() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let bound = format!("{}.{}.sig", b64("{}"), b64(r#"{"sub":"svc:order","cnf":{"x5t#S256":"abc"}}"#));
        assert_eq!(token_cnf(&bound).as_deref(), Some("abc"));
        let unbound = format!("{}.{}.sig", b64("{}"), b64(r#"{"sub":"svc:order"}"#));
        assert_eq!(token_cnf(&unbound), None);
        for junk in ["", "a.b", "a.%%%.c", "no dots"] {
            assert_eq!(token_cnf(junk), None, "{junk}");
        }
    }

    #[test]
    fn a_shared_failure_names_each_audience() {
        let e = TokenError::Unavailable { audience: "a".into(), reason: "Unavailable".into() };
        assert_eq!(
            for_audience(&e, "b"),
            TokenError::Unavailable { audience: "b".into(), reason: "Unavailable".into() }
        );
        let e = TokenError::CredentialsRejected { audience: "a".into(), reason: "bad secret".into() };
        assert_eq!(
            for_audience(&e, "b"),
            TokenError::CredentialsRejected { audience: "b".into(), reason: "bad secret".into() }
        );
    }

    #[test]
    fn request_and_response_debug_show_no_secret() {
        let mut req = ExchangeRequest::new(ClientCredentials::new("order", "s3cr3t-value"), "inventory");
        req.subject_token = Some("user.jwt.token".into());
        let shown = format!("{req:?}");
        assert!(shown.contains("inventory") && shown.contains("on_behalf_of_user: true"), "{shown}");
        assert!(!shown.contains("s3cr3t") && !shown.contains("user.jwt"), "{shown}");
        let resp = ExchangeResponse::new("header.claims.signature", Duration::from_secs(300));
        let shown = format!("{resp:?}");
        assert!(shown.contains("300s") && !shown.contains("claims"), "{shown}");
    }

    #[test]
    fn responses_are_cached_with_a_margin_and_a_renewal_point() {
        let cfg = Config::default();
        let c = cached(ExchangeResponse::new("t", Duration::from_secs(300)), 1_000, &cfg, "inventory", 0.5).unwrap();
        assert_eq!((c.expires_at, c.margin), (1_300, 5));
        assert_eq!(c.renew_at, 1_000 + 225, "75% of the life at the middle of the jitter");
        assert!(c.bearer.is_sensitive());
        assert_eq!(c.bearer, "Bearer t");
    }

    #[test]
    fn absurd_lifetimes_and_tokens_never_panic() {
        let cfg = Config::default();
        let c = cached(ExchangeResponse::new("t", Duration::MAX), u64::MAX - 5, &cfg, "a", 0.5).unwrap();
        assert_eq!(c.expires_at, u64::MAX);
        let err =
            cached(ExchangeResponse::new("bad\ntoken", Duration::from_secs(60)), 0, &cfg, "a", 0.5).err().unwrap();
        assert_eq!(err, TokenError::Unavailable { audience: "a".into(), reason: "malformed token".into() });
    }
}
