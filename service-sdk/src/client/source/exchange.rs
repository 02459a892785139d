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
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use auth_proto::auth::v1::ExchangeTokenRequest;
use auth_proto::auth::v1::auth_client::AuthClient;
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

    fn call(&mut self, #[allow(unused_mut)] mut req: ExchangeRequest) -> Self::Future {
        let mut client = AuthClient::clone(&self.client.load());
        // The exchange joins the trace of the call that needed the token
        // (feature `otel`), unless a layer set a trace context already.
        #[cfg(feature = "otel")]
        if !req.metadata.contains_key(crate::otel::TRACEPARENT) {
            let mut headers = std::mem::take(&mut req.metadata).into_headers();
            crate::otel::inject_current(&mut headers);
            req.metadata = MetadataMap::from_headers(headers);
        }
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

/// Boxes `service`, with its errors as [`BoxError`].
pub(super) fn boxed<S>(service: S) -> ExchangeService
where
    S: Service<ExchangeRequest, Response = ExchangeResponse> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service.map_err(Into::<BoxError>::into))
}

/// The cached value of a response received at `now` (source clock): served
/// until `expiry_margin` (at most a tenth of its life) before it expires,
/// renewed at the point [`refresh_in`] picks.
fn cached(resp: ExchangeResponse, now: u64, cfg: &Config, audience: &str) -> Result<Cached, TokenError> {
    let life = resp.expires_in.as_secs();
    let bearer = HeaderValue::try_from(format!("Bearer {}", resp.access_token))
        .map(|mut h| {
            h.set_sensitive(true);
            h
        })
        .map_err(|_| TokenError::Unavailable { audience: audience.into(), reason: "malformed token".into() })?;
    let expires_at = now.saturating_add(life);
    let margin = cfg.expiry_margin.min(life / 10);
    let renew_in = refresh_in(now, expires_at, margin, cfg.renew_point, unit_random());
    Ok(Cached {
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
        let audience = &*slot.audience;
        let result = self.exchange_with_refresh(audience, subject, renewal).await;
        let now_ms = self.clock.now_millis();
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
            Ok(resp) => cached(resp, self.clock.now_unix(), &self.cfg, audience),
            Err(e) => Err(TokenError::from_exchange(audience, subject.is_some(), e)),
        };
        self.stats.exchange_done(audience, result.as_ref().map(|_| ()));
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
        let c = cached(ExchangeResponse::new("t", Duration::from_secs(300)), 1_000, &cfg, "inventory").unwrap();
        assert_eq!((c.expires_at, c.margin), (1_300, 5));
        assert!((1_000 + 210..=1_000 + 240).contains(&c.renew_at), "{}", c.renew_at);
        assert!(c.bearer.is_sensitive());
        assert_eq!(c.bearer, "Bearer t");
    }

    #[test]
    fn absurd_lifetimes_and_tokens_never_panic() {
        let cfg = Config::default();
        let c = cached(ExchangeResponse::new("t", Duration::MAX), u64::MAX - 5, &cfg, "a").unwrap();
        assert_eq!(c.expires_at, u64::MAX);
        let err = cached(ExchangeResponse::new("bad\ntoken", Duration::from_secs(60)), 0, &cfg, "a").err().unwrap();
        assert_eq!(err, TokenError::Unavailable { audience: "a".into(), reason: "malformed token".into() });
    }
}
