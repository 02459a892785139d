//! The tonic service: thin handlers that parse, call a flow, and map.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::core::{AuthCore, Minted};
use crate::error::AuthError;
use crate::exchange::{ExchangeRequest, exchange};
use crate::login::{LoginGrant, Secret, login};
use crate::refresh::{RefreshIssued, refresh};
use crate::revoke::{RevokeTarget, revoke};
use crate::store::{Revocation, RevocationKind};
use crate::tls::PeerIdentity;

/// RFC 8693 `issued_token_type` of every access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The `auth.v1.Auth` implementation.
#[derive(Clone)]
pub struct AuthService {
    core: Arc<AuthCore>,
}

impl AuthService {
    /// Wraps the core.
    pub fn new(core: Arc<AuthCore>) -> Self {
        Self { core }
    }
}

fn response(access: Minted, refresh: Option<RefreshIssued>) -> pb::TokenResponse {
    let c = &access.claims;
    pb::TokenResponse {
        expires_in: u32::try_from(c.exp.saturating_sub(c.iat)).unwrap_or(u32::MAX),
        scope: c.perms.clone(),
        access_token: access.token,
        token_type: "Bearer".into(),
        refresh_token: refresh.map(|r| r.token).unwrap_or_default(),
        issued_token_type: ACCESS_TOKEN_TYPE.into(),
    }
}

fn bearer<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let t = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_owned())
}

/// Runs `fut` in a span named after the RPC and records the outcome.
async fn traced<T>(
    span: tracing::Span,
    fut: impl std::future::Future<Output = Result<T, AuthError>>,
) -> Result<Response<T>, Status> {
    let result = fut.instrument(span.clone()).await;
    let _g = span.enter();
    match result {
        Ok(v) => {
            // Successes are routine: debug, so a busy server does not spend
            // its time formatting log lines. Failures are logged where the
            // error maps to a status.
            tracing::debug!(outcome = "ok", "rpc done");
            Ok(Response::new(v))
        }
        Err(e) => {
            let status = Status::from(e);
            tracing::debug!(outcome = ?status.code(), "rpc done");
            Err(status)
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

fn to_pb(r: &Revocation) -> pb::Revocation {
    let kind = match r.kind {
        RevocationKind::Jti => pb::RevocationKind::Jti,
        RevocationKind::Sid => pb::RevocationKind::Sid,
        RevocationKind::Family => pb::RevocationKind::Family,
    };
    pb::Revocation { kind: kind as i32, id: r.id.clone(), expires_at: r.expires_at }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        let peer = PeerIdentity::of(&req);
        let r = req.into_inner();
        let (grant, client_id) = match r.grant {
            Some(pb::login_request::Grant::Password(p)) => {
                (LoginGrant::Password { username: p.username, password: Secret(p.password) }, String::new())
            }
            Some(pb::login_request::Grant::ClientCredentials(c)) => (
                LoginGrant::ClientCredentials { client_id: c.client_id.clone(), secret: Secret(c.client_secret) },
                c.client_id,
            ),
            None => return Err(AuthError::InvalidArgument("a grant is required").into()),
        };
        let span = tracing::info_span!("rpc", method = "Login", client_id = %client_id, audience = ?r.audience, peer = ?peer.as_ref().map(|p| &p.id));
        let core = &self.core;
        traced(span, async move {
            let res = login(core, grant, r.audience, r.scope, peer.as_ref()).await?;
            Ok(response(res.access, res.refresh))
        })
        .await
    }

    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        let peer = PeerIdentity::of(&req);
        let r = req.into_inner();
        let span = tracing::info_span!("rpc", method = "ExchangeToken", client_id = %r.client_id, audience = %r.audience, peer = ?peer.as_ref().map(|p| &p.id));
        let core = &self.core;
        traced(span, async move {
            let request = ExchangeRequest {
                client_id: r.client_id,
                client_secret: Secret(r.client_secret),
                subject_token: r.subject_token,
                audience: r.audience,
                scope: r.scope,
                requested_ttl: u64::from(r.requested_ttl_seconds),
            };
            Ok(response(exchange(core, request, peer.as_ref()).await?, None))
        })
        .await
    }

    async fn refresh(&self, req: Request<pb::RefreshRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("rpc", method = "Refresh");
        let core = &self.core;
        traced(span, async move {
            let (access, next) = refresh(core, &r.refresh_token).await?;
            Ok(response(access, Some(next)))
        })
        .await
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = bearer(&req);
        let target = match req.into_inner().target {
            Some(pb::revoke_request::Target::AccessToken(t)) => RevokeTarget::AccessToken(t),
            Some(pb::revoke_request::Target::Jti(t)) => RevokeTarget::Jti(t),
            Some(pb::revoke_request::Target::RefreshToken(t)) => RevokeTarget::RefreshToken(t),
            Some(pb::revoke_request::Target::Sid(t)) => RevokeTarget::Sid(t),
            None => return Err(AuthError::InvalidArgument("a revocation target is required").into()),
        };
        let kind = match &target {
            RevokeTarget::AccessToken(_) => "access_token",
            RevokeTarget::Jti(_) => "jti",
            RevokeTarget::RefreshToken(_) => "refresh_token",
            RevokeTarget::Sid(_) => "sid",
        };
        let span = tracing::info_span!("rpc", method = "Revoke", target = kind);
        let core = &self.core;
        traced(span, async move {
            let revoked = revoke(core, target, caller.as_deref()).await?;
            Ok(pb::RevokeResponse { revoked: revoked.into() })
        })
        .await
    }

    async fn get_jwks(&self, _req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(pb::GetJwksResponse { jwks_json: self.core.keys.public_keys().jwks_json.clone() }))
    }

    type WatchRevocationsStream = EventStream;

    async fn watch_revocations(
        &self,
        _req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let core = Arc::clone(&self.core);
        // Subscribe before reading the snapshot, so nothing falls between.
        let mut events = core.store.subscribe();
        let now = core.clock.now_unix();
        let snapshot = core.store.revoked_snapshot(now).await.map_err(|e| Status::from(AuthError::Store(e)))?;
        let heartbeat = Duration::from_secs(core.config.watch.heartbeat_secs);
        let stream = async_stream(move |tx| async move {
            let first = pb::RevocationEvent {
                event: Some(pb::revocation_event::Event::Snapshot(pb::RevocationSnapshot {
                    entries: snapshot.iter().map(to_pb).collect(),
                })),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut tick = tokio::time::interval(heartbeat);
            tick.reset();
            loop {
                let msg = tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(r) => pb::revocation_event::Event::Revoked(to_pb(&r)),
                        Err(RecvError::Lagged(n)) => {
                            // The client missed events: make it reconnect for a fresh snapshot.
                            tracing::warn!(missed = n, "revocation watcher lagged; closing stream");
                            let _ = tx.send(Err(Status::unavailable("revocation stream lagged; reconnect"))).await;
                            return;
                        }
                        Err(RecvError::Closed) => return,
                    },
                    _ = tick.tick() => pb::revocation_event::Event::Heartbeat(pb::Heartbeat { server_time: core.clock.now_unix() }),
                };
                if tx.send(Ok(pb::RevocationEvent { event: Some(msg) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A stream fed by a task through a small channel; the task ends when the
/// client goes away (the receiver is dropped).
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<pb::RevocationEvent, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::RevocationEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
