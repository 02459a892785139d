//! `ExchangeToken` and `ExchangeTokens`: check sizes, run
//! [`crate::exchange`].

use auth_proto::auth::v1 as pb;
use tonic::{Request, Response, Status};

use super::wire::{check_field, check_list, check_list_of};
use super::{caller, issued, note_caller, reply};
use crate::core::AuthCore;
use crate::error::AuthError;
use crate::exchange::{AudienceRequest, BatchRequest, ExchangeRequest, MAX_BATCH_AUDIENCES, exchange, exchange_many};
use crate::grant::Secret;
use crate::observe::{Caller, Rpc};
use crate::ratelimit::BatchCharge;
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
            check_credentials(&r.client_id, &r.client_secret, &r.subject_token)?;
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

/// The sizes of what both exchange RPCs carry besides their audiences.
fn check_credentials(client_id: &str, secret: &str, subject_token: &str) -> Result<(), AuthError> {
    check_field(client_id, "client_id too long")?;
    check_field(secret, "client_secret too long")?;
    check_field(subject_token, "subject_token too long")
}

pub(super) async fn handle_many(
    core: &AuthCore,
    req: Request<pb::ExchangeTokensRequest>,
) -> Result<Response<pb::ExchangeTokensResponse>, Status> {
    let peer = PeerIdentity::of(&req);
    let charge = req.extensions().get::<BatchCharge>().cloned();
    let r = req.into_inner();
    let client_id = r.client_id.clone();
    let peer = peer.as_deref();
    let names: Vec<String> = r.audiences.iter().take(MAX_BATCH_AUDIENCES).map(|a| a.audience.clone()).collect();
    note_caller(&client_id, &names);
    reply(
        core,
        Rpc::ExchangeTokens,
        caller(&client_id, peer),
        async {
            // Counts and sizes first: an oversized request is malformed,
            // whatever the allow-lists would say.
            if r.audiences.len() > MAX_BATCH_AUDIENCES {
                return Err(AuthError::InvalidArgument("audiences: at most 16"));
            }
            check_list_of(&names, MAX_BATCH_AUDIENCES, "audiences: at most 16 non-empty names")?;
            check_credentials(&r.client_id, &r.client_secret, &r.subject_token)?;
            for a in &r.audiences {
                check_list(&a.scope, "scope: at most 64 non-empty scopes")?;
            }
            // The rate limit layer charged one call; each further audience
            // is one more.
            if let Some(charge) = &charge {
                charge.charge(r.audiences.len())?;
            }
            let request = BatchRequest {
                client_id: r.client_id,
                client_secret: Secret(r.client_secret),
                subject_token: r.subject_token,
                audiences: r
                    .audiences
                    .into_iter()
                    .map(|a| AudienceRequest { audience: a.audience, scope: a.scope })
                    .collect(),
                requested_ttl: u64::from(r.requested_ttl_seconds),
            };
            let outcomes = exchange_many(core, request, peer).await?;
            let who = caller(&client_id, peer);
            let issued_to = Caller { client_id: None, peer: peer.map(|p| p.id.as_str()) };
            let results = outcomes
                .into_iter()
                .map(|o| {
                    let result = match o.result {
                        Ok(done) => pb::audience_result::Result::Token(issued(core, issued_to, done)),
                        Err(e) => {
                            // Reported and logged as ExchangeToken would
                            // report this audience alone.
                            crate::observe::denied(&*core.events, Rpc::ExchangeTokens, who, &e);
                            pb::audience_result::Result::Error(audience_error(&e))
                        }
                    };
                    pb::AudienceResult { audience: o.audience, result: Some(result) }
                })
                .collect();
            Ok(pb::ExchangeTokensResponse { results })
        }
        .await,
    )
}

/// The public face of one audience's refusal: the code and fixed message
/// its own ExchangeToken call would have had.
fn audience_error(e: &AuthError) -> pb::AudienceError {
    e.log();
    pb::AudienceError { code: e.code() as u32, message: e.public_message().to_owned() }
}
