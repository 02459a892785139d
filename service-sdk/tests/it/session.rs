//! End users: `login` and a `UserSession` that refreshes itself (with the
//! auth server's refresh-token rotation), against a real auth-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use service_sdk::{Audience, Clock as _, SessionError, UserSession};
use testkit::TestServer;
use tonic::Code;

use crate::client::{Stub, TestClock, channel_to, echoed, serve_behind_verifier, verify};

async fn alice(srv: &TestServer, clock: &TestClock) -> UserSession {
    let (username, password) = srv.user_password("alice");
    UserSession::login_with_clock(
        channel_to(&srv.dir, "admin", srv.grpc_addr),
        &username,
        &password,
        "order",
        clock.sdk(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_user_session_refreshes_itself_rotating_its_refresh_token() {
    let clock = TestClock::at_now();
    let srv = TestServer::builder().clock(clock.server()).start().await;
    let session = alice(&srv, &clock).await;
    let first = session.access_token().await.unwrap();
    assert_eq!(session.access_token().await.unwrap(), first, "served from memory");
    let life = verify(&srv, &first, "order", clock.now_unix()).await.exp - clock.now_unix();

    // Past 75% of its life, three times over: each renewal spends the
    // refresh token the last one returned (a reused one would revoke the
    // session, and the next refresh would be refused).
    let mut last = first.clone();
    for round in 1..=3 {
        clock.advance(life * 3 / 4 + 1);
        let next = session.access_token().await.unwrap();
        assert_ne!(next, last, "round {round}: renewed");
        let claims = verify(&srv, &next, "order", clock.now_unix()).await;
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.aud, Audience::One("order".into()));
        assert_eq!(session.refreshes(), round);
        last = next;
    }
}

#[tokio::test]
async fn concurrent_callers_share_one_refresh() {
    let clock = TestClock::at_now();
    let srv = TestServer::builder().clock(clock.server()).start().await;
    let session = alice(&srv, &clock).await;
    let first = session.access_token().await.unwrap();
    let life = verify(&srv, &first, "order", clock.now_unix()).await.exp - clock.now_unix();
    clock.advance(life * 3 / 4 + 1);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            tokio::spawn({
                let session = session.clone();
                async move { session.access_token().await }
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0] && *t != first), "one new token for all");
    assert_eq!(session.refreshes(), 1);
}

#[tokio::test]
async fn a_session_channel_calls_a_service_as_the_user_and_logout_ends_it() {
    // The server and the verifier on the system clock; only the session's
    // clock moves, to make its token due.
    let srv = TestServer::start().await;
    let clock = TestClock::at_now();
    let (order_addr, task) = serve_behind_verifier(&srv, "order", Stub::Inventory).await;
    let session = alice(&srv, &clock).await;
    let mut order = AuthClient::new(session.channel(channel_to(&srv.dir, "admin", order_addr)));
    let claims = echoed(order.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner());
    assert_eq!((claims.sub.as_str(), &claims.aud), ("alice", &Audience::One("order".into())));

    // Renewed on the way, when due.
    let life = claims.exp - clock.now_unix();
    clock.advance(life * 3 / 4 + 1);
    let claims = echoed(order.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner());
    assert_eq!(claims.sub, "alice");
    assert_eq!(session.refreshes(), 1);

    let token = session.access_token().await.unwrap();
    session.logout().await.unwrap();
    assert_eq!(session.access_token().await.unwrap_err(), SessionError::LoggedOut);
    let status = order.get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // The session is revoked at the auth server: its last access token too.
    let mut raw = AuthClient::new(channel_to(&srv.dir, "admin", order_addr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut req = tonic::Request::new(pb::GetJwksRequest {});
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        match raw.get_jwks(req).await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            other => assert!(std::time::Instant::now() < deadline, "still accepted after logout: {other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    task.abort();
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let srv = TestServer::start().await;
    let channel = channel_to(&srv.dir, "admin", srv.grpc_addr);
    let err = service_sdk::login(channel, "alice", "not her password", "order").await.unwrap_err();
    assert!(matches!(&err, SessionError::Refused { reason } if reason.contains("Unauthenticated")), "{err:?}");
    assert!(!format!("{err:?}").contains("not her password"));
}

#[tokio::test]
async fn while_the_auth_server_is_out_of_reach_the_unexpired_token_is_served_and_an_expired_one_never() {
    // The server on the system clock, reached through a proxy the test
    // cuts; only the session's clock moves.
    let srv = TestServer::start().await;
    let proxy = testkit::TcpProxy::start(srv.grpc_addr).await;
    let clock = TestClock::at_now();
    let (username, password) = srv.user_password("alice");
    let channel = channel_to(&srv.dir, "admin", proxy.addr());
    let session = UserSession::login_with_clock(channel, &username, &password, "order", clock.sdk()).await.unwrap();
    let first = session.access_token().await.unwrap();
    let life = verify(&srv, &first, "order", clock.now_unix()).await.exp - clock.now_unix();

    proxy.cut();
    clock.advance(life * 3 / 4 + 1);
    assert_eq!(session.access_token().await.unwrap(), first, "due for renewal, unreachable: still valid, served");
    clock.advance(life);
    let err = session.access_token().await.unwrap_err();
    assert!(matches!(err, SessionError::Unavailable { .. }), "an expired token is never served: {err:?}");
    assert_eq!(tonic::Status::from(err).code(), Code::Unavailable);

    // Back in reach: the refresh token was not spent, the session goes on.
    proxy.restore();
    let renewed = session.access_token().await.unwrap();
    assert_ne!(renewed, first);
    assert_eq!(session.refreshes(), 1);
}
