//! ExchangeTokens (one call, several audiences) and RFC 8705 certificate
//! binding of service tokens, over real mTLS against a TestServer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use auth_proto::auth::v1::{
    AudienceRequest, ClientCredentialsGrant, ExchangeTokenRequest, ExchangeTokensRequest, LoginRequest, RevokeRequest,
    audience_result, login_request, revoke_request,
};
use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use testkit::TestServer;
use tonic::Code;

use crate::flows::{claims_of, client, exchange_req, login_user};

fn audiences(names: &[&str]) -> Vec<AudienceRequest> {
    names.iter().map(|n| AudienceRequest { audience: (*n).into(), scope: vec![] }).collect()
}

fn batch_req(srv: &TestServer, caller: &str, subject: &str, audiences: Vec<AudienceRequest>) -> ExchangeTokensRequest {
    let (client_id, client_secret) = srv.client_credentials(caller);
    ExchangeTokensRequest {
        client_id,
        client_secret,
        subject_token: subject.into(),
        audiences,
        requested_ttl_seconds: 0,
    }
}

/// RFC 8705 `x5t#S256` of dev client `name`'s certificate.
fn thumbprint(srv: &TestServer, name: &str) -> String {
    let (cert, _) = srv.client_identity(name);
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der.as_ref()))
}

#[tokio::test]
async fn a_batch_grants_each_allowed_audience_and_refuses_the_others_alone() {
    let srv = TestServer::start().await;
    let mut user = client(&srv, "order").await;
    let alice = login_user(&mut user, &srv, "alice").await;
    let mut c = client(&srv, "order").await;
    let mut asked = audiences(&["payments", "inventory", "auth-service"]);
    asked[1].scope = vec!["inventory:read".into(), "inventory:admin".into()];
    let res = c.exchange_tokens(batch_req(&srv, "order", &alice.access_token, asked)).await.unwrap().into_inner();

    let names: Vec<&str> = res.results.iter().map(|r| r.audience.as_str()).collect();
    assert_eq!(names, ["payments", "inventory", "auth-service"], "one result per audience, in request order");
    for refused in [&res.results[0], &res.results[2]] {
        let Some(audience_result::Result::Error(e)) = &refused.result else { panic!("{refused:?} was not refused") };
        assert_eq!(e.code, Code::PermissionDenied as u32);
        assert_eq!(e.message, "audience not allowed for this account");
    }
    let Some(audience_result::Result::Token(token)) = &res.results[1].result else { panic!("inventory refused") };
    assert_eq!(token.scope, ["inventory:read"], "scopes narrowed per audience");
    assert_eq!(token.token_type, "Bearer");
    let claims = claims_of(&mut c, &token.access_token, "inventory").await;
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.act.unwrap().sub, "svc:order");
    assert_eq!(claims.perms, ["inventory:read"]);
    assert!(claims.exp <= crate::flows::claims_of(&mut c, &alice.access_token, "order").await.exp);
}

#[tokio::test]
async fn a_batch_of_more_than_sixteen_audiences_or_a_repeated_one_is_refused_whole() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let names: Vec<String> = (0..17).map(|i| format!("svc-{i}")).collect();
    let seventeen = names.iter().map(|n| AudienceRequest { audience: n.clone(), scope: vec![] }).collect();
    let err = c.exchange_tokens(batch_req(&srv, "order", "", seventeen)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "audiences: at most 16"));

    let mut sixteen: Vec<AudienceRequest> =
        names[..15].iter().map(|n| AudienceRequest { audience: n.clone(), scope: vec![] }).collect();
    sixteen.push(AudienceRequest { audience: "inventory".into(), scope: vec![] });
    let res = c.exchange_tokens(batch_req(&srv, "order", "", sixteen)).await.unwrap().into_inner();
    assert_eq!(res.results.len(), 16);
    let granted = res.results.iter().filter(|r| matches!(r.result, Some(audience_result::Result::Token(_)))).count();
    assert_eq!(granted, 1, "only inventory is on order's allow-list");

    let twice = audiences(&["inventory", "inventory"]);
    let err = c.exchange_tokens(batch_req(&srv, "order", "", twice)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "audiences: each audience at most once"));
    let err = c.exchange_tokens(batch_req(&srv, "order", "", vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.exchange_tokens(batch_req(&srv, "order", "", audiences(&["inventory", ""]))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_credentials_or_a_bad_subject_token_fail_the_whole_batch() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let mut req = batch_req(&srv, "order", "", audiences(&["inventory"]));
    req.client_secret = "wrong".into();
    let err = c.exchange_tokens(req).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "invalid client credentials"));

    let err = c.exchange_tokens(batch_req(&srv, "order", "not.a.token", audiences(&["inventory"]))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A token addressed to someone else is no subject token for order.
    let alice = login_user(&mut c, &srv, "alice").await;
    let to_inventory =
        c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap().into_inner();
    let req = batch_req(&srv, "order", &to_inventory.access_token, audiences(&["inventory"]));
    let err = c.exchange_tokens(req).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token not addressed to the caller"));
}

#[tokio::test]
async fn a_batch_counts_one_call_per_audience_against_the_rate_limit() {
    let srv = TestServer::builder()
        .configure(|raw| {
            raw.limits.client_rate_per_sec = 1;
            raw.limits.client_rate_burst = 4;
        })
        .start()
        .await;
    let mut c = client(&srv, "order").await;
    let three = batch_req(&srv, "order", "", audiences(&["inventory", "b", "c"]));
    assert!(c.exchange_tokens(three).await.is_ok(), "three of a burst of four");
    // The layer admits the call (the fourth cell); its second audience
    // finds nothing left, and the whole call is refused.
    let two = batch_req(&srv, "order", "", audiences(&["inventory", "b"]));
    let err = c.exchange_tokens(two).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::ResourceExhausted, "rate limit exceeded"));
}

#[tokio::test]
async fn service_tokens_are_bound_to_the_certificate_the_service_called_with() {
    let srv = TestServer::start().await;
    let order = thumbprint(&srv, "order");
    let mut c = client(&srv, "order").await;

    let (client_id, client_secret) = srv.client_credentials("order");
    let login = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
            audience: vec!["inventory".into()],
            scope: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let exchanged = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap().into_inner();
    let alice = login_user(&mut c, &srv, "alice").await;
    let for_alice =
        c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap().into_inner();
    let batch = c.exchange_tokens(batch_req(&srv, "order", "", audiences(&["inventory"]))).await.unwrap().into_inner();
    let Some(audience_result::Result::Token(batched)) = &batch.results[0].result else { panic!("refused") };
    for (what, token) in [
        ("client-credentials login", &login.access_token),
        ("exchange", &exchanged.access_token),
        ("exchange on behalf of alice", &for_alice.access_token),
        ("batch exchange", &batched.access_token),
    ] {
        let claims = claims_of(&mut c, token, "inventory").await;
        assert_eq!(claims.cnf.map(|c| c.x5t_s256).as_deref(), Some(order.as_str()), "{what}");
    }
    let user = claims_of(&mut c, &alice.access_token, "order").await;
    assert_eq!(user.cnf, None, "a user's token is not bound: users call over plain HTTP fronts");
}

#[tokio::test]
async fn an_account_can_turn_certificate_binding_off() {
    let srv = TestServer::start().await;
    let path = srv.config().accounts_file.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    let marker = "client_id = \"order\"\n";
    assert!(text.contains(marker), "{text}");
    std::fs::write(&path, text.replace(marker, &format!("{marker}certificate_bound_tokens = false\n"))).unwrap();
    srv.reload().await.unwrap();
    let mut c = client(&srv, "order").await;
    let exchanged = c.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap().into_inner();
    assert_eq!(claims_of(&mut c, &exchanged.access_token, "inventory").await.cnf, None);
    // The other accounts keep their default.
    let mut i = client(&srv, "inventory").await;
    let req = ExchangeTokenRequest { audience: "order".into(), ..Default::default() };
    let theirs = i.exchange_token(req).await.unwrap().into_inner();
    assert_eq!(
        claims_of(&mut i, &theirs.access_token, "order").await.cnf.unwrap().x5t_s256,
        thumbprint(&srv, "inventory")
    );
}

/// Revoke's bearer token is a presented token like any other: bound to a
/// certificate, it counts only over that certificate.
#[tokio::test]
async fn a_bound_bearer_token_revokes_only_over_its_own_certificate() {
    let srv = TestServer::start().await;
    let mut order = client(&srv, "order").await;
    let token = order.exchange_token(exchange_req(&srv, "order", "", "inventory")).await.unwrap().into_inner();
    let jti = claims_of(&mut order, &token.access_token, "inventory").await.jti;
    let revoke = |jti: &str| {
        let mut req = tonic::Request::new(RevokeRequest { target: Some(revoke_request::Target::Jti(jti.to_owned())) });
        req.metadata_mut().insert("authorization", format!("Bearer {}", token.access_token).parse().unwrap());
        req
    };
    // Replayed by inventory, which holds it but not order's key.
    let mut inventory = client(&srv, "inventory").await;
    let err = inventory.revoke(revoke(&jti)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token bound to another certificate"), "{err:?}");
    // Over order's own certificate it revokes itself.
    assert_eq!(order.revoke(revoke(&jti)).await.unwrap().into_inner().revoked, "jti");
}
