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

use crate::config::LimitsConfig;
use crate::core::AuthCore;
use crate::edge::Capped;
use crate::error::AuthError;
use crate::grant::Issued;

/// RFC 8693 `issued_token_type` of every access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The `auth.v1.Auth` implementation.
#[derive(Clone)]
pub struct AuthService {
    core: Arc<AuthCore>,
    watch: Arc<watch::Hub>,
}

impl AuthService {
    /// Wraps the core, with the default limits; its watch streams end only
    /// with their clients.
    pub fn new(core: Arc<AuthCore>) -> Self {
        Self::serving(core, &LimitsConfig::default(), tokio::sync::watch::channel(false).1)
    }

    /// Wraps the core, capping watch streams by `limits`; every watch
    /// stream ends with `UNAVAILABLE` once `shutdown` turns true.
    pub fn serving(core: Arc<AuthCore>, limits: &LimitsConfig, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { core, watch: Arc::new(watch::Hub::new(limits, shutdown)) }
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

/// Adds what only the handler knows to the RPC's span, opened by the edge's
/// trace layer (a no-op without it). Client-chosen strings are capped.
fn note_caller(client_id: &str, audience: &[String]) {
    let span = tracing::Span::current();
    if !client_id.is_empty() {
        span.record("client_id", tracing::field::debug(Capped(client_id)));
    }
    if !audience.is_empty() {
        let shown: Vec<Capped<'_>> = audience.iter().take(8).map(|a| Capped(a)).collect();
        span.record("audience", tracing::field::debug(shown));
    }
}

/// The handlers' result: a flow's error becomes its one `Status`.
fn reply<T>(result: Result<T, AuthError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
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
        watch::handle(Arc::clone(&self.core), Arc::clone(&self.watch), req).await
    }
}
