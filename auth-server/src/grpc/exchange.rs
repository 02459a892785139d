//! `ExchangeToken`: check sizes, run [`crate::exchange`].

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use super::wire::{check_field, check_list};
use super::{caller, issued, note_caller, reply};
use crate::core::AuthCore;
use crate::exchange::{ExchangeRequest, exchange};
use crate::grant::Secret;
use crate::observe::{Caller, Rpc};
use crate::tls::PeerIdentity;

pub(super) async fn handle(
    core: &AuthCore,
    req: Request<pb::ExchangeTokenRequest>,
) -> Result<Response<pb::TokenResponse>, Status> {
    let peer = PeerIdentity::of(&req);
    let r = req.into_inner();
    note_caller(&r.client_id, std::slice::from_ref(&r.audience));
    let client_id = r.client_id.clone();
    let peer = peer.as_deref();
    reply(
        core,
        Rpc::ExchangeToken,
        caller(&client_id, peer),
        async {
            check_field(&r.client_id, "client_id too long")?;
            check_field(&r.client_secret, "client_secret too long")?;
            check_field(&r.subject_token, "subject_token too long")?;
            check_field(&r.audience, "audience too long")?;
            check_list(&r.scope, "scope: at most 64 non-empty scopes")?;
            let request = ExchangeRequest {
                client_id: r.client_id,
                client_secret: Secret(r.client_secret),
                subject_token: r.subject_token,
                audience: r.audience,
                scope: r.scope,
                requested_ttl: u64::from(r.requested_ttl_seconds),
            };
            let done = exchange(core, request, peer).await?;
            Ok(issued(core, Caller { client_id: None, peer: peer.map(|p| p.id.as_str()) }, done))
        }
        .await,
    )
}
