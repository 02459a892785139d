//! The transport floor: over the dev PKI's mTLS it answers ExchangeToken
//! with a token of the auth server's shape, signed by a key of its own
//! (never the dev key: tokens it signs verify nowhere else), and publishes
//! that key's JWK Set.

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{ExchangeTokenRequest, GetJwksRequest, LoginRequest};
use auth_server::keys::PublicKeys;
use examples::floor::{Floor, FloorMode, serve};
use examples::loadgen::dev_channel;
use service_sdk::{Audience, KeySet, Validator};

/// Starts a floor in `mode` on the dev directory `dir`; returns its address.
async fn start(dir: &std::path::Path, mode: FloorMode) -> String {
    let floor = Floor::with_own_key(mode).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let dir = dir.to_owned();
    tokio::spawn(async move { serve(listener, &dir, floor, std::future::pending()).await.unwrap() });
    addr
}

fn exchange(client_id: &str) -> ExchangeTokenRequest {
    ExchangeTokenRequest { client_id: client_id.into(), audience: "inventory".into(), ..Default::default() }
}

#[tokio::test]
async fn the_sign_floor_signs_a_fresh_token_of_the_exchange_shape_per_call_and_the_fixed_floor_repeats_one() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    auth_server::dev::ensure(&dir).unwrap();

    let sign = start(&dir, FloorMode::Sign).await;
    let mut client = AuthClient::new(dev_channel(&sign, &dir, "order").await.unwrap());
    let jwks = client.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let keys = KeySet::from_jwks_json(&jwks).unwrap();
    let first = client.exchange_token(exchange("order")).await.unwrap().into_inner();
    let second = client.exchange_token(exchange("order")).await.unwrap().into_inner();
    assert_ne!(first.access_token, second.access_token, "signed per call");
    assert_eq!((first.token_type.as_str(), first.expires_in), ("Bearer", 300));
    assert_eq!(first.scope, ["inventory:read", "inventory:reserve"]);
    let now = auth_server::clock::Clock::now_unix(&auth_server::clock::SystemClock);
    let validator = Validator::new("auth-service", "inventory");
    let claims = validator.validate(&first.access_token, &keys, now).unwrap();
    let again = validator.validate(&second.access_token, &keys, now).unwrap();
    assert_ne!(claims.jti, again.jti);
    assert_eq!(claims.jti.len(), 22, "128 random bits, as the auth server's");
    assert_eq!((claims.sub.as_str(), claims.client_id.as_str()), ("svc:order", "order"));
    assert_eq!(claims.aud, Audience::One("inventory".into()));
    assert_eq!(claims.role.as_deref(), Some("service"));
    assert_eq!(claims.exp - claims.iat, 300);
    // Its own key signs, not the auth server's: what it mints for anyone
    // who asks is worthless against the dev JWKS.
    let dev_key = auth_server::keys::LoadedKey::from_pem_file(
        auth_server::keys::KeyAlg::ES256,
        &dir.join("keys").join("signing.pem"),
    )
    .unwrap();
    assert!(!jwks.contains(dev_key.kid()));
    let dev_keys =
        KeySet::from_jwks_json(&PublicKeys::from_jwks(vec![dev_key.jwk().clone()]).unwrap().jwks_json).unwrap();
    assert!(validator.validate(&first.access_token, &dev_keys, now).is_err());
    // Nothing but ExchangeToken and GetJwks.
    let login = client.login(LoginRequest::default()).await.unwrap_err();
    assert_eq!(login.code(), tonic::Code::Unimplemented);

    let fixed = start(&dir, FloorMode::Fixed).await;
    let mut client = AuthClient::new(dev_channel(&fixed, &dir, "inventory").await.unwrap());
    let a = client.exchange_token(exchange("inventory")).await.unwrap().into_inner();
    let b = client.exchange_token(exchange("inventory")).await.unwrap().into_inner();
    assert_eq!(a.access_token, b.access_token, "one token for every call");
    // Each floor has a key of its own, published by its own GetJwks.
    let fixed_jwks = client.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    assert!(validator.validate(&a.access_token, &keys, now).is_err());
    let claims = validator.validate(&a.access_token, &KeySet::from_jwks_json(&fixed_jwks).unwrap(), now).unwrap();
    assert_eq!(claims.sub, "svc:order");
}

#[tokio::test]
async fn the_floor_refuses_clients_without_a_dev_certificate() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let (dir, other) = (tmp.path().join("dev"), tmp.path().join("other"));
    auth_server::dev::ensure(&dir).unwrap();
    auth_server::dev::ensure(&other).unwrap();
    let addr = start(&dir, FloorMode::Fixed).await;
    // A client certificate of another CA (trusting this server's CA).
    std::fs::copy(dir.join("ca.pem"), other.join("ca.pem")).unwrap();
    let refused = match dev_channel(&addr, &other, "order").await {
        Err(_) => true,
        Ok(ch) => AuthClient::new(ch).exchange_token(exchange("order")).await.is_err(),
    };
    assert!(refused, "a foreign client certificate was served");
}
