//! A stub `auth.v1.Auth` used as a protected downstream service: only
//! `GetJwks` answers (with whatever the test's [`Protected`] returns); every
//! other RPC is `Unimplemented`.

use std::pin::Pin;

use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_server::{Auth, AuthServer};
use tonic::{Request, Response, Status};

/// The one RPC a stub answers.
#[tonic::async_trait]
pub(crate) trait Protected: Send + Sync + 'static {
    async fn get_jwks(&self, req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status>;
}

/// Wraps a [`Protected`] as a full `auth.v1.Auth` server.
pub(crate) fn server<P: Protected>(p: P) -> AuthServer<Stub<P>> {
    AuthServer::new(Stub(p))
}

pub(crate) struct Stub<P>(P);

type EventStream = Pin<Box<dyn futures_util::Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<P: Protected> Auth for Stub<P> {
    async fn get_jwks(&self, req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        self.0.get_jwks(req).await
    }
    async fn login(&self, _: Request<pb::LoginRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn exchange_token(
        &self,
        _: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn exchange_tokens(
        &self,
        _: Request<pb::ExchangeTokensRequest>,
    ) -> Result<Response<pb::ExchangeTokensResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn refresh(&self, _: Request<pb::RefreshRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn revoke(&self, _: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    type WatchRevocationsStream = EventStream;
    async fn watch_revocations(
        &self,
        _: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        Err(Status::unimplemented("stub"))
    }
}
