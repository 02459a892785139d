//! `Revoke`: parse the target, read the caller's bearer token (for `jti`
//! and `sid`), check sizes, run [`crate::revoke`].

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use super::wire::check_field;
use super::{caller, reply};
use crate::core::AuthCore;
use crate::error::AuthError;
use crate::observe::{Event, Rpc};
use crate::revoke::{RevokeTarget, Revoked, revoke};
use crate::tls::PeerIdentity;

pub(super) async fn handle(
    core: &AuthCore,
    req: Request<pb::RevokeRequest>,
) -> Result<Response<pb::RevokeResponse>, Status> {
    let peer = PeerIdentity::of(&req);
    let peer = peer.as_deref();
    // The SDK's parser: the one `authorization: Bearer` rule of the platform.
    let bearer = service_sdk::parse_bearer(req.metadata().as_ref()).ok().map(str::to_owned);
    let target = match req.into_inner().target {
        Some(pb::revoke_request::Target::AccessToken(t)) => RevokeTarget::AccessToken(t),
        Some(pb::revoke_request::Target::Jti(t)) => RevokeTarget::Jti(t),
        Some(pb::revoke_request::Target::RefreshToken(token)) => {
            RevokeTarget::RefreshToken { token, end_session: false }
        }
        Some(pb::revoke_request::Target::Sid(t)) => RevokeTarget::Sid(t),
        Some(pb::revoke_request::Target::SessionRefreshToken(token)) => {
            RevokeTarget::RefreshToken { token, end_session: true }
        }
        None => {
            let missing = Err(AuthError::InvalidArgument("a revocation target is required"));
            return reply(core, Rpc::Revoke, caller("", peer), missing);
        }
    };
    let kind = match &target {
        RevokeTarget::AccessToken(_) => "access_token",
        RevokeTarget::Jti(_) => "jti",
        RevokeTarget::RefreshToken { end_session: false, .. } => "refresh_token",
        RevokeTarget::RefreshToken { end_session: true, .. } => "session_refresh_token",
        RevokeTarget::Sid(_) => "sid",
    };
    tracing::Span::current().record("target", kind);
    reply(
        core,
        Rpc::Revoke,
        caller("", peer),
        async {
            // Only revoking by jti or sid needs (and reads) the caller's token.
            let bearer = match &target {
                RevokeTarget::AccessToken(t) => {
                    check_field(t, "access_token too long")?;
                    None
                }
                RevokeTarget::RefreshToken { token: t, .. } => {
                    check_field(t, "refresh_token too long")?;
                    None
                }
                RevokeTarget::Jti(t) => {
                    check_field(t, "jti too long")?;
                    bearer
                }
                RevokeTarget::Sid(t) => {
                    check_field(t, "sid too long")?;
                    bearer
                }
            };
            if let Some(token) = &bearer {
                check_field(token, "authorization too long")?;
            }
            let revoked = revoke(core, target, bearer.as_deref(), peer).await?;
            if let Revoked::Recorded { revocation, by } = &revoked {
                core.events.emit(&Event::Revoked { revocation, by, caller: caller("", peer) });
            }
            Ok(pb::RevokeResponse { revoked: revoked.label().into() })
        }
        .await,
    )
}
