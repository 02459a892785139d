//! `Refresh`: check sizes, run [`crate::refresh`].

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use super::wire::check_field;
use super::{reply, token_response};
use crate::core::AuthCore;
use crate::refresh::refresh;

pub(super) async fn handle(
    core: &AuthCore,
    req: Request<pb::RefreshRequest>,
) -> Result<Response<pb::TokenResponse>, Status> {
    let r = req.into_inner();
    reply(
        async {
            check_field(&r.refresh_token, "refresh_token too long")?;
            Ok(token_response(refresh(core, &r.refresh_token).await?))
        }
        .await,
    )
}
