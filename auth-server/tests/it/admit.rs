//! Admitting and removing services and users on a running server: the
//! users and accounts files reload when their contents change (no
//! SIGHUP, no restart), a broken file keeps the running set, and refusals a
//! setting made name that setting in the log, never in the status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{ClientCredentialsGrant, LoginRequest, PasswordGrant, login_request};
use auth_server::dev::{ServiceSpec, UserSpec, add_service, add_user, parse_audience};
use testkit::TestServer;
use tonic::Code;
use tonic::transport::Channel;

use crate::diag::{capture, lines_with};
use crate::flows::{exchange_req, login_for};
use crate::within;

/// A server whose users and accounts files are checked every second.
async fn polling_server() -> TestServer {
    TestServer::builder().configure(|raw| raw.reload_check_secs = 1).start().await
}

async fn client_login(c: &mut AuthClient<Channel>, srv: &TestServer, name: &str, aud: &str) -> Result<(), Code> {
    let (client_id, client_secret) = srv.client_credentials(name);
    c.login(LoginRequest {
        grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
        audience: vec![aud.into()],
        scope: vec![],
    })
    .await
    .map(drop)
    .map_err(|s| s.code())
}

/// Replaces the accounts file whole, as `dev add-service`, a ConfigMap or
/// an editor's save-by-rename does.
fn write_accounts(srv: &TestServer, text: &str) {
    let path = srv.dir.join("accounts.toml");
    let tmp = srv.dir.join(".accounts.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// `accounts.toml` without the account `name`.
fn without_account(text: &str, name: &str) -> String {
    let mut doc: toml::Table = toml::from_str(text).unwrap();
    let list = doc.get_mut("account").and_then(toml::Value::as_array_mut).unwrap();
    list.retain(|a| a.get("client_id").and_then(toml::Value::as_str) != Some(name));
    toml::to_string(&doc).unwrap()
}

#[tokio::test]
async fn a_removed_account_is_refused_at_its_next_login_and_exchange_without_a_restart() {
    let srv = polling_server().await;
    let mut c = AuthClient::new(srv.channel("order").await);
    let alice = login_for(&mut c, &srv, "alice", "order").await;
    assert_eq!(client_login(&mut c, &srv, "order", "inventory").await, Ok(()));
    c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();

    let accounts = std::fs::read_to_string(srv.dir.join("accounts.toml")).unwrap();
    write_accounts(&srv, &without_account(&accounts, "order"));
    within("order's login refused after its account was removed", async {
        while client_login(&mut c, &srv, "order", "inventory").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(client_login(&mut c, &srv, "order", "inventory").await, Err(Code::Unauthenticated));
    let exchange = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await;
    assert_eq!(exchange.unwrap_err().code(), Code::Unauthenticated, "its exchange is refused too");
    let mut inventory = AuthClient::new(srv.channel("inventory").await);
    assert_eq!(client_login(&mut inventory, &srv, "inventory", "order").await, Ok(()), "the others stay");
}

#[tokio::test(flavor = "current_thread")]
async fn a_broken_accounts_file_keeps_the_running_set_and_says_why_once_then_add_service_is_picked_up() {
    let srv = polling_server().await;
    let (logs, _guard) = capture();
    let mut c = AuthClient::new(srv.channel("order").await);
    let good = std::fs::read_to_string(srv.dir.join("accounts.toml")).unwrap();

    // order twice (same client_id, same identity): TOML, but not a valid
    // accounts file.
    let order = good.split("[[account]]").find(|b| b.contains("client_id = \"order\"")).unwrap();
    write_accounts(&srv, &format!("{good}\n[[account]]{order}"));
    let why = within("the refusal in the log", async {
        loop {
            let lines = lines_with(&logs, &["users and accounts not reloaded", "config: accounts_file:", "\"order\""]);
            if !lines.is_empty() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Three more checks find the same broken file: still one line.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    assert_eq!(lines_with(&logs, &["users and accounts not reloaded"]).len(), 1, "{why:?}");
    assert_eq!(client_login(&mut c, &srv, "order", "inventory").await, Ok(()), "the running set stays");

    // Fixed, then a new service admitted the way a developer would.
    write_accounts(&srv, &good);
    let mut spec = ServiceSpec { name: "payments".into(), role: "service".into(), ..ServiceSpec::default() };
    parse_audience(&mut spec.audiences, "inventory=inventory:read").unwrap();
    add_service(&srv.dir, &spec).unwrap();
    let mut payments = AuthClient::new(srv.channel("payments").await);
    within("the new account's first login", async {
        while client_login(&mut payments, &srv, "payments", "inventory").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let reloaded = lines_with(&logs, &["users and accounts reloaded", "added=[\"payments\"]"]);
    assert_eq!(reloaded.len(), 1, "{}", logs.text());
    assert_eq!(client_login(&mut payments, &srv, "payments", "order").await, Err(Code::PermissionDenied));
}

#[tokio::test(flavor = "current_thread")]
async fn an_added_user_logs_in_and_a_refused_audience_names_tokens_user_audiences_only_in_the_log() {
    let srv = polling_server().await;
    let (logs, _guard) = capture();
    let mut c = AuthClient::new(srv.channel("order").await);
    let perms = vec!["orders:create".to_owned()];
    add_user(&srv.dir, &UserSpec { name: "carol".into(), role: "customer".into(), perms }).unwrap();
    let (username, password) = srv.user_password("carol");
    let login = |audience: &'static str| {
        let mut c = c.clone();
        let grant =
            login_request::Grant::Password(PasswordGrant { username: username.clone(), password: password.clone() });
        async move { c.login(LoginRequest { grant: Some(grant), audience: vec![audience.into()], scope: vec![] }).await }
    };
    within("carol's first login", async {
        while login("order").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let refused = login("inventory").await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, "audience not allowed for users"));
    let lines = lines_with(&logs, &["audience not allowed for users", "config_key=\"tokens.user_audiences\""]);
    assert_eq!(lines.len(), 1, "{}", logs.text());

    // An account's allow-list, likewise.
    let refused = client_login(&mut c, &srv, "order", "payments").await;
    assert_eq!(refused, Err(Code::PermissionDenied));
    let lines = lines_with(&logs, &["audience not allowed for this account", "accounts_file: the account's audiences"]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
}
