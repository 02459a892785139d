//! End users: the caller at the edge (a front end, a CLI) logs a user in
//! once and calls services with a token that renews itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{LoginRequest, PasswordGrant, RefreshRequest, RevokeRequest, login_request, revoke_request};
use http::HeaderValue;
use tonic::transport::Channel;
use tower::Service;

use super::channel::{AuthFuture, BoxError, call_with_bearer};
use super::clock::{Clock, SystemClock};
use super::secret::ClientSecret;

/// Why a [`UserSession`] has no token to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The auth service refused the login or the refresh (a wrong
    /// password; a refresh token revoked, expired or reused): the user must
    /// log in again.
    #[error("auth service refused the session: {reason}")]
    Refused {
        /// The auth service's status code and message.
        reason: String,
    },
    /// The auth service cannot be reached (or answered with a transient
    /// error) and the access token has expired.
    #[error("auth service unavailable and the access token expired: {reason}")]
    Unavailable {
        /// The auth service's status code and message, or the transport
        /// failure.
        reason: String,
    },
    /// The session was logged out.
    #[error("the session is logged out")]
    LoggedOut,
}

impl SessionError {
    fn from_status(s: &tonic::Status) -> Self {
        let reason = crate::cause::status(s);
        match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                SessionError::Refused { reason }
            }
            _ => SessionError::Unavailable { reason },
        }
    }
}

/// The one mapping to a status for a call that needed the user's token.
impl From<SessionError> for tonic::Status {
    fn from(e: SessionError) -> Self {
        tracing::warn!(error = %e, "no user token for the call");
        match e {
            SessionError::Unavailable { .. } => tonic::Status::unavailable("user token unavailable"),
            SessionError::Refused { .. } | SessionError::LoggedOut => {
                tonic::Status::unauthenticated("user session over: log in again")
            }
        }
    }
}

/// One access token of the session.
struct Current {
    token: Box<str>,
    bearer: HeaderValue,
    /// Unix seconds, on the session's clock.
    expires_at: u64,
    /// From here on a call renews the token first.
    renew_at: u64,
}

struct Inner {
    client: AuthClient<Channel>,
    clock: Arc<dyn Clock>,
    current: ArcSwapOption<Current>,
    /// The refresh token, single use: taken under this lock, replaced by
    /// the one the refresh returns. `None` once logged out or refused.
    refresh: tokio::sync::Mutex<Option<ClientSecret>>,
    refreshes: AtomicU64,
}

/// A logged-in user's tokens, renewed on use: the helper for the caller at
/// the edge, which logs a user in and calls services on the user's behalf.
///
/// [`login`] signs the user in for an audience (a service users call
/// directly, listed in the auth server's `tokens.user_audiences`). Each
/// [`access_token`](Self::access_token) call answers from memory until 75%
/// of the token's life has passed; the first call after that sends
/// `Refresh` with the session's refresh token and keeps the new pair. The
/// auth server rotates refresh tokens and accepts each one once (a replay
/// revokes the whole session), so refreshes are single-flight: concurrent
/// callers wait for one `Refresh`. While the auth server is unreachable,
/// the unexpired access token keeps being served; an expired one never
/// is. [`channel`](Self::channel) attaches the token to every call of a
/// generated client, [`logout`](Self::logout) revokes the session.
///
/// Cheap to clone; clones share the tokens. `Debug` shows no token.
///
/// ```no_run
/// # async fn demo(auth_channel: tonic::transport::Channel, order: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
/// let session = service_sdk::login(auth_channel, "alice", "her password", "order").await?;
/// // Any generated client; the auth proto's own client stands in for `OrdersClient`.
/// let mut orders = auth_proto::auth::v1::auth_client::AuthClient::new(session.channel(order));
/// # let _ = &mut orders;
/// session.logout().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct UserSession {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UserSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let expires_at = self.inner.current.load().as_ref().map(|c| c.expires_at);
        f.debug_struct("UserSession").field("expires_at", &expires_at).finish_non_exhaustive()
    }
}

/// Logs `username` in with `password` for `audience` over `auth_channel`
/// (an mTLS channel to the auth server, e.g. [`ServiceEnv::auth_channel`](crate::ServiceEnv::auth_channel)):
/// a [`UserSession`] whose tokens renew themselves.
pub async fn login(
    auth_channel: Channel,
    username: &str,
    password: &str,
    audience: &str,
) -> Result<UserSession, SessionError> {
    UserSession::login_with_clock(auth_channel, username, password, audience, Arc::new(SystemClock)).await
}

impl UserSession {
    /// Like [`login`], timing the tokens on `clock`.
    pub async fn login_with_clock(
        auth_channel: Channel,
        username: &str,
        password: &str,
        audience: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SessionError> {
        let mut client = AuthClient::new(auth_channel);
        let request = LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant {
                username: username.to_owned(),
                password: password.to_owned(),
            })),
            audience: vec![audience.to_owned()],
            scope: Vec::new(),
        };
        let resp = client.login(request).await.map_err(|s| SessionError::from_status(&s))?.into_inner();
        let current = Current::new(resp.access_token, resp.expires_in, clock.now_unix())?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                clock,
                current: ArcSwapOption::from_pointee(current),
                refresh: tokio::sync::Mutex::new(Some(ClientSecret::new(resp.refresh_token))),
                refreshes: AtomicU64::new(0),
            }),
        })
    }

    /// The `authorization` value of a token that needs no renewal now.
    fn ready(&self) -> Option<HeaderValue> {
        let now = self.inner.clock.now_unix();
        self.inner.current.load().as_ref().filter(|c| now < c.renew_at).map(|c| c.bearer.clone())
    }

    /// A valid access token of the user, renewed first when 75% of its life
    /// has passed.
    pub async fn access_token(&self) -> Result<String, SessionError> {
        Ok(self.current().await?.token.to_string())
    }

    async fn current(&self) -> Result<Arc<Current>, SessionError> {
        let now = self.inner.clock.now_unix();
        if let Some(c) = self.inner.current.load_full().filter(|c| now < c.renew_at) {
            return Ok(c);
        }
        let mut refresh = self.inner.refresh.lock().await;
        // Another caller may have renewed while this one waited.
        let now = self.inner.clock.now_unix();
        let held = self.inner.current.load_full();
        if let Some(c) = held.as_ref().filter(|c| now < c.renew_at) {
            return Ok(Arc::clone(c));
        }
        let Some(token) = refresh.as_ref() else {
            return Err(SessionError::LoggedOut);
        };
        let request = RefreshRequest { refresh_token: token.expose().to_owned() };
        let still_valid = held.filter(|c| now < c.expires_at);
        match self.inner.client.clone().refresh(request).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let current = Arc::new(Current::new(resp.access_token, resp.expires_in, self.inner.clock.now_unix())?);
                *refresh = Some(ClientSecret::new(resp.refresh_token));
                self.inner.current.store(Some(Arc::clone(&current)));
                self.inner.refreshes.fetch_add(1, Ordering::Relaxed);
                Ok(current)
            }
            Err(status) => {
                let e = SessionError::from_status(&status);
                tracing::warn!(error = %e, "user session refresh failed");
                if matches!(e, SessionError::Refused { .. }) {
                    // The refresh token is spent or revoked: no retry can work.
                    *refresh = None;
                    self.inner.current.store(None);
                    return Err(e);
                }
                still_valid.ok_or(e)
            }
        }
    }

    /// Refreshes sent since the login.
    pub fn refreshes(&self) -> u64 {
        self.inner.refreshes.load(Ordering::Relaxed)
    }

    /// Logs out: revokes the whole session at the auth server (every token
    /// of it, at every verifier) and forgets the tokens here.
    pub async fn logout(&self) -> Result<(), SessionError> {
        let mut refresh = self.inner.refresh.lock().await;
        let Some(token) = refresh.as_ref() else {
            return Err(SessionError::LoggedOut);
        };
        let request =
            RevokeRequest { target: Some(revoke_request::Target::SessionRefreshToken(token.expose().to_owned())) };
        self.inner.client.clone().revoke(request).await.map_err(|s| SessionError::from_status(&s))?;
        *refresh = None;
        self.inner.current.store(None);
        Ok(())
    }

    /// A tower service over `inner` (a channel to a service users call)
    /// that puts the user's access token on every call, renewing it as
    /// [`access_token`](Self::access_token) does. Works with any generated
    /// client; a call with no token to give fails with the status of the
    /// [`SessionError`] without reaching the service.
    pub fn channel<S>(&self, inner: S) -> UserChannel<S> {
        UserChannel { inner, session: self.clone() }
    }
}

impl Current {
    fn new(token: String, expires_in: u32, now: u64) -> Result<Self, SessionError> {
        let mut bearer = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| SessionError::Unavailable { reason: "malformed token".into() })?;
        bearer.set_sensitive(true);
        let life = u64::from(expires_in);
        Ok(Self {
            token: token.into_boxed_str(),
            bearer,
            expires_at: now.saturating_add(life),
            renew_at: now.saturating_add(life * 3 / 4),
        })
    }
}

/// A [`UserSession`]'s channel: see [`UserSession::channel`].
#[derive(Clone, Debug)]
pub struct UserChannel<S = Channel> {
    inner: S,
    session: UserSession,
}

impl<S, B> Service<http::Request<B>> for UserChannel<S>
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
        let session = self.session.clone();
        call_with_bearer(&mut self.inner, req, self.session.ready(), move || async move {
            Ok(session.current().await?.bearer.clone())
        })
    }
}
