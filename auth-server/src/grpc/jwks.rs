//! `GetJwks`: the public keys, for verifiers on the authenticated channel.

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use crate::core::AuthCore;

pub(super) fn handle(
    core: &AuthCore,
    _req: Request<pb::GetJwksRequest>,
) -> Result<Response<pb::GetJwksResponse>, Status> {
    Ok(Response::new(pb::GetJwksResponse { jwks_json: core.policy().keys.public_keys().jwks_json.clone() }))
}
