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
use crate::observe::{Caller, Event, Rpc};
use crate::tls::PeerIdentity;

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
        let snapshots = core.revocations.snapshots();
        Self { core, watch: Arc::new(watch::Hub::new(limits, snapshots, shutdown)) }
    }

    /// WatchRevocations streams open now (for `/metrics`).
    pub fn watch_streams(&self) -> usize {
        self.watch.open_streams()
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

/// The caller of a request, for its events: the `client_id` the request
/// named (if any) and the identity of its certificate.
fn caller<'a>(client_id: &'a str, peer: Option<&'a PeerIdentity>) -> Caller<'a> {
    Caller { client_id: (!client_id.is_empty()).then_some(client_id), peer: peer.map(|p| p.id.as_str()) }
}

/// The handlers' result: a flow's error becomes its one `Status`, and a
/// refusal is reported as a denial of `rpc` by `caller`.
fn reply<T>(
    core: &AuthCore,
    rpc: Rpc,
    caller: Caller<'_>,
    result: Result<T, AuthError>,
) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| {
        crate::observe::denied(&*core.events, rpc, caller, &e);
        Status::from(e)
    })
}

/// The response for an issued token, reported first.
fn issued(core: &AuthCore, caller: Caller<'_>, issued: Issued) -> pb::TokenResponse {
    core.events.emit(&Event::Issued { issued: &issued, caller });
    token_response(issued)
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

    async fn exchange_tokens(
        &self,
        req: Request<pb::ExchangeTokensRequest>,
    ) -> Result<Response<pb::ExchangeTokensResponse>, Status> {
        exchange::handle_many(&self.core, req).await
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
