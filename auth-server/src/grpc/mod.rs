//! The tonic service: thin handlers that parse and check the wire request,
//! call a flow, and map its typed result to protobuf. One module per RPC.

mod exchange;
mod jwks;
mod login;
mod refresh;
mod revoke;
mod watch;
pub mod wire;

use std::sync::Arc;

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::core::AuthCore;
use crate::error::AuthError;
use crate::grant::Issued;

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

/// The response for an issued token.
fn token_response(issued: Issued) -> pb::TokenResponse {
    pb::TokenResponse {
        expires_in: u32::try_from(issued.expires_in()).unwrap_or(u32::MAX),
        scope: issued.access.claims.perms,
        access_token: issued.access.token,
        token_type: "Bearer".into(),
        refresh_token: issued.refresh.map(|r| r.token).unwrap_or_default(),
        issued_token_type: ACCESS_TOKEN_TYPE.into(),
    }
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

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        login::handle(&self.core, req).await
    }

    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        exchange::handle(&self.core, req).await
    }

    async fn refresh(&self, req: Request<pb::RefreshRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        refresh::handle(&self.core, req).await
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        revoke::handle(&self.core, req).await
    }

    async fn get_jwks(&self, req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        jwks::handle(&self.core, req)
    }

    type WatchRevocationsStream = watch::EventStream;

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        watch::handle(Arc::clone(&self.core), req).await
    }
}
