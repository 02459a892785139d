//! `Login`: parse the grant, check sizes, run [`crate::login`].

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use super::wire::{MAX_LOGIN_AUDIENCES, check_field, check_list, check_list_of};
use super::{caller, issued, note_caller, reply};
use crate::core::AuthCore;
use crate::error::AuthError;
use crate::grant::Secret;
use crate::login::{LoginGrant, login};
use crate::observe::Rpc;
use crate::tls::PeerIdentity;

pub(super) async fn handle(
    core: &AuthCore,
    req: Request<pb::LoginRequest>,
) -> Result<Response<pb::TokenResponse>, Status> {
    let peer = PeerIdentity::of(&req);
    let peer = peer.as_deref();
    let r = req.into_inner();
    let grant = match r.grant {
        Some(pb::login_request::Grant::Password(p)) => {
            LoginGrant::Password { username: p.username, password: Secret(p.password) }
        }
        Some(pb::login_request::Grant::ClientCredentials(c)) => {
            LoginGrant::ClientCredentials { client_id: c.client_id, secret: Secret(c.client_secret) }
        }
        None => {
            let missing = Err(AuthError::InvalidArgument("a grant is required"));
            return reply(core, Rpc::Login, caller("", peer), missing);
        }
    };
    // A username is not reported: a user who typed the password into it
    // would put the password in the log.
    let client_id = match &grant {
        LoginGrant::ClientCredentials { client_id, .. } => client_id.clone(),
        LoginGrant::Password { .. } => String::new(),
    };
    note_caller(&client_id, &r.audience);
    reply(
        core,
        Rpc::Login,
        caller(&client_id, peer),
        async {
            // Counts and sizes first: an oversized request is malformed,
            // whatever the allow-lists would say.
            check_list_of(&r.audience, MAX_LOGIN_AUDIENCES, "audience: at most 16 non-empty names")?;
            check_list(&r.scope, "scope: at most 64 non-empty scopes")?;
            match &grant {
                LoginGrant::Password { username, password } => {
                    check_field(username, "username too long")?;
                    check_field(&password.0, "password too long")?;
                }
                LoginGrant::ClientCredentials { client_id, secret } => {
                    check_field(client_id, "client_id too long")?;
                    check_field(&secret.0, "client_secret too long")?;
                }
            }
            let done = login(core, grant, r.audience, r.scope, peer).await?;
            Ok(issued(core, caller("", peer), done))
        }
        .await,
    )
}
