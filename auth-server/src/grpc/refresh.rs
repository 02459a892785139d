//! `Refresh`: check sizes, run [`crate::refresh`].

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use super::wire::check_field;
use super::{caller, issued, reply};
use crate::core::AuthCore;
use crate::observe::Rpc;
use crate::refresh::refresh;
use crate::tls::PeerIdentity;

pub(super) async fn handle(
    core: &AuthCore,
    req: Request<pb::RefreshRequest>,
) -> Result<Response<pb::TokenResponse>, Status> {
    let peer = PeerIdentity::of(&req);
    let peer = peer.as_deref();
    let r = req.into_inner();
    reply(
        core,
        Rpc::Refresh,
        caller("", peer),
        async {
            check_field(&r.refresh_token, "refresh_token too long")?;
            let done = refresh(core, &r.refresh_token).await?;
            Ok(issued(core, caller("", peer), done))
        }
        .await,
    )
}
