//! [`AuthChannel`]: the bearer token of a [`TokenSource`] on every call of
//! a tonic client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, MapErr, TryFutureExt as _};
use http::HeaderValue;
use http::header::AUTHORIZATION;
use tonic::transport::Channel;
use tower::Service;

use super::source::{AccessToken, TokenError, TokenSource};

/// The error type of [`AuthChannel`]: tonic turns a boxed `Status` inside it
/// back into that status.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future of [`AuthChannel`]: the inner future directly when a token was
/// cached, a boxed one when the call had to wait for a token.
pub type AuthFuture<F, R> = Either<
    MapErr<F, fn(<F as futures_util::TryFuture>::Error) -> BoxError>,
    Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>,
>;

/// A tower service that attaches a bearer token for one audience to every
/// request. Cheap to clone.
///
/// It works with any generated client:
/// `InventoryClient::new(AuthChannel::new(channel, source, "inventory"))`.
/// Per call it reads the [`TokenSource`] cache synchronously and inserts a
/// pre-built header value; only when no valid token is cached (before
/// warm-up, or after the auth service was down long enough for the token to
/// expire) does the call wait for an exchange. If no token can be had, the
/// call fails with the `Status` of the [`TokenError`](crate::TokenError)
/// (`UNAVAILABLE`, `PERMISSION_DENIED`, ...), without reaching the target.
///
/// With the `otel` feature it also sends the current span's trace context
/// (`traceparent`), so the target's spans join the caller's trace.
#[derive(Clone)]
pub struct AuthChannel<S = Channel> {
    inner: S,
    source: TokenSource,
    audience: Arc<str>,
    /// A token fixed for this channel (a call on behalf of a user).
    fixed: Option<AccessToken>,
    /// The thumbprint of the client certificate `inner` connects with,
    /// when pinned: only tokens usable over it are sent.
    certificate: Option<Arc<str>>,
}

impl<S> std::fmt::Debug for AuthChannel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthChannel")
            .field("audience", &self.audience)
            .field("on_behalf_of_user", &self.fixed.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> AuthChannel<S> {
    /// Calls through `inner` with tokens for `audience` from `source`.
    pub fn new(inner: S, source: TokenSource, audience: impl Into<Arc<str>>) -> Self {
        Self { inner, source, audience: audience.into(), fixed: None, certificate: None }
    }

    /// Pins the channel to the client certificate `inner` connects with
    /// (its DER): only tokens usable over that certificate are sent
    /// (RFC 8705: an unbound token, or one bound to it). Across a rotation
    /// ([`TokenSource::rotate_certificate`]) a pinned channel keeps getting
    /// the tokens of its own certificate, so no call carries a token its
    /// connection cannot use; an unpinned one follows the source's current
    /// certificate.
    pub fn client_certificate(mut self, der: &[u8]) -> Self {
        self.certificate = Some(super::source::thumbprint(der).into());
        self
    }

    /// The audience the tokens are for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The token source.
    pub fn source(&self) -> &TokenSource {
        &self.source
    }
}

impl<S: Clone> AuthChannel<S> {
    /// A channel for calls on behalf of the caller of the current handler:
    /// exchanges the caller's verified access token (which the verify layer
    /// left in the request extensions) for a token for this channel's
    /// audience, and sends that token on every call. The one line a handler
    /// needs:
    ///
    /// ```text
    /// let mut inventory = InventoryClient::new(self.inventory.on_behalf_of(&request).await?);
    /// ```
    ///
    /// The token is the [`BearerToken`](crate::verify::BearerToken) that
    /// [`RequireAuthLayer`](crate::verify::RequireAuthLayer) inserts. Fails
    /// with `UNAUTHENTICATED` when the request carries no verified token
    /// (the handler is not behind the verify layer), or with the
    /// status of the exchange failure. The returned channel is meant for the
    /// handler's duration: its token is not renewed.
    pub async fn on_behalf_of<T>(&self, request: &tonic::Request<T>) -> Result<Self, tonic::Status> {
        let token = caller_token(request.extensions())
            .ok_or_else(|| tonic::Status::unauthenticated("no verified caller token"))?;
        Ok(self.on_behalf_of_token(token).await?)
    }

    /// Like [`on_behalf_of`](Self::on_behalf_of) with the user's access
    /// token passed explicitly (e.g. from an HTTP handler).
    pub async fn on_behalf_of_token(&self, user_token: &str) -> Result<Self, TokenError> {
        let token = self
            .source
            .token_for(&self.audience)
            .on_behalf_of(user_token)
            .over_certificate(self.certificate.as_deref())
            .await?;
        Ok(Self {
            inner: self.inner.clone(),
            source: self.source.clone(),
            audience: self.audience.clone(),
            fixed: Some(token),
            certificate: self.certificate.clone(),
        })
    }
}

/// The verified access token of the current request's caller, as the
/// verify layer leaves it in the request extensions.
fn caller_token(ext: &tonic::Extensions) -> Option<&str> {
    ext.get::<crate::verify::BearerToken>().map(crate::verify::BearerToken::as_str)
}

fn into_box<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

/// One call through `inner` with `authorization: <bearer>`: at once when a
/// bearer value is `ready`, otherwise after `fetch` yields one (or fails
/// the call with its status). Shared by [`AuthChannel`] and
/// [`UserChannel`](crate::UserChannel). The trace context goes along as
/// `traceparent` (feature `otel`).
pub(super) fn call_with_bearer<S, B, F>(
    inner: &mut S,
    mut req: http::Request<B>,
    ready: Option<HeaderValue>,
    fetch: impl FnOnce() -> F,
) -> AuthFuture<S::Future, S::Response>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    F: Future<Output = Result<HeaderValue, tonic::Status>> + Send + 'static,
{
    #[cfg(feature = "otel")]
    crate::otel::inject_current(req.headers_mut());
    if let Some(bearer) = ready {
        req.headers_mut().insert(AUTHORIZATION, bearer);
        return Either::Left(inner.call(req).map_err(into_box::<S::Error> as fn(_) -> _));
    }
    // Slow path: keep the service that was made ready, leave a clone.
    let clone = inner.clone();
    let mut inner = std::mem::replace(inner, clone);
    let bearer = fetch();
    Either::Right(Box::pin(async move {
        let bearer = bearer.await.map_err(|status| Box::new(status) as BoxError)?;
        req.headers_mut().insert(AUTHORIZATION, bearer);
        inner.call(req).await.map_err(Into::into)
    }))
}

impl<S, B> Service<http::Request<B>> for AuthChannel<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = AuthFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ready = match &self.fixed {
            Some(t) => Some(t.bearer().clone()),
            None => self.source.cached_for(&self.audience, self.certificate.as_deref()).map(|t| t.bearer().clone()),
        };
        let (source, audience, certificate) = (self.source.clone(), self.audience.clone(), self.certificate.clone());
        call_with_bearer(&mut self.inner, req, ready, move || async move {
            let token = source
                .token_for(&audience)
                .over_certificate(certificate.as_deref())
                .await
                .map_err(tonic::Status::from)?;
            Ok(token.bearer().clone())
        })
    }
}
