//! The end-to-end demo: the auth server (in-memory store), `inventory` and
//! `order`, started in this process on free ports against a dev PKI, then
//! five steps, each printing one line. Any unexpected outcome is an error.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{ExchangeTokenRequest, LoginRequest, PasswordGrant, RefreshRequest, login_request};
use auth_server::config::{Config, Overrides};
use auth_server::server::{Listeners, Server};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

use crate::order::OrderResponse;
use service_sdk::{EnvError, ServiceEnv};

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up failed.
    #[error("setup: {0}")]
    Setup(String),
    /// A step did not behave as it should.
    #[error("step {step}: {what}")]
    Step {
        /// Step number.
        step: u8,
        /// What went wrong.
        what: String,
    },
}

impl From<EnvError> for DemoError {
    fn from(e: EnvError) -> Self {
        DemoError::Setup(e.to_string())
    }
}

fn fail(step: u8, what: impl Into<String>) -> DemoError {
    DemoError::Step { step, what: what.into() }
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Revoke response → first request refused by order's verify layer.
    pub logout_to_refused: Duration,
}

struct Http {
    addr: std::net::SocketAddr,
}

impl Http {
    /// POST /orders with a bearer token; returns (status, body).
    async fn order(&self, token: &str) -> Result<(u16, String), DemoError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = r#"{"sku":"sku-1","quantity":1}"#;
        let req = format!(
            "POST /orders HTTP/1.1\r\nHost: order\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(self.addr).await.map_err(setup)?;
        s.write_all(req.as_bytes()).await.map_err(setup)?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.map_err(setup)?;
        let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }
}

/// A dev user's name and password, from `credentials/<user>.json`.
fn user_password(dir: &std::path::Path, user: &str) -> Result<(String, String), DemoError> {
    let creds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("credentials").join(format!("{user}.json"))).map_err(setup)?,
    )
    .map_err(setup)?;
    let field = |k: &str| creds[k].as_str().unwrap_or_default().to_owned();
    Ok((field("username"), field("password")))
}

/// The raw `Login` RPC (step 5 replays a refresh token by hand).
async fn login(
    auth: &mut AuthClient<Channel>,
    dir: &std::path::Path,
    user: &str,
) -> Result<(String, String), DemoError> {
    let (username, password) = user_password(dir, user)?;
    let res = auth
        .login(LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
            audience: vec!["order".into()],
            scope: vec![],
        })
        .await
        .map_err(|s| fail(1, format!("login refused: {s}")))?
        .into_inner();
    Ok((res.access_token, res.refresh_token))
}

/// Runs the demo in `dir` (a dev directory, created when missing).
pub async fn run(dir: PathBuf) -> Result<DemoReport, DemoError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // 1. The auth server, in this process, in-memory store.
    let env = auth_server::dev::ensure(&dir).map_err(setup)?;
    let config = Config::load(&env.config_path, &Overrides::default()).map_err(setup)?;
    let issuer = config.issuer.clone();
    let server = Server::builder(config).build().await.map_err(setup)?;
    let grpc = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
    let http = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
    let auth_uri = format!("https://{}", grpc.local_addr().map_err(setup)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let auth_task = tokio::spawn(server.serve(Listeners { grpc, http }, stopped(stop_rx.clone())));

    // 2. inventory (mTLS gRPC) and order (HTTP front).
    let inventory_env = ServiceEnv::dev(&dir, "inventory", &auth_uri).with_issuer(&issuer);
    let inventory_listener = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
    let inventory_uri = format!("https://{}", inventory_listener.local_addr().map_err(setup)?);
    let inv_stop = stopped(stop_rx.clone());
    let inventory_task =
        tokio::spawn(async move { crate::inventory::serve(inventory_listener, &inventory_env, inv_stop).await });
    let order_env = ServiceEnv::dev(&dir, "order", &auth_uri).with_issuer(&issuer);
    let order_listener = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
    let order_http = Http { addr: order_listener.local_addr().map_err(setup)? };
    let order_grpc = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
    let order_grpc_uri = format!("https://{}", order_grpc.local_addr().map_err(setup)?);
    let ord_stop = stopped(stop_rx.clone());
    let order_task = tokio::spawn(async move {
        crate::order::serve(order_listener, order_grpc, &order_env, &inventory_uri, ord_stop).await
    });

    let result = steps(&dir, &auth_uri, &order_http, &order_grpc_uri).await;
    let _ = stop_tx.send(true);
    for t in [inventory_task, order_task] {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), t).await {
            tracing::warn!(error = %e, "service stopped with an error");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), auth_task).await;
    result
}

async fn steps(
    dir: &std::path::Path,
    auth_uri: &str,
    order: &Http,
    order_grpc_uri: &str,
) -> Result<DemoReport, DemoError> {
    // The user's side (a front end) talks to the auth server like any
    // client of the mesh.
    let auth_channel = ServiceEnv::dev(dir, "admin", auth_uri).auth_channel()?;
    let mut auth = AuthClient::new(auth_channel.clone());

    // 1. Log in: a session whose tokens renew themselves.
    let (username, password) = user_password(dir, "alice")?;
    let session = service_sdk::login(auth_channel, &username, &password, crate::order::AUDIENCE)
        .await
        .map_err(|e| fail(1, format!("login refused: {e}")))?;
    let token = session.access_token().await.map_err(|e| fail(1, e.to_string()))?;
    println!("[1/5] alice logged in: a session with an access token for aud=order");

    // 2. Place an order; inventory sees the user, acted for by order.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = order.order(&token).await?;
        // 503 until order's verifier has loaded keys and the revocation feed.
        if status != 503 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if status != 200 {
        return Err(fail(2, format!("POST /orders answered {status}: {body}")));
    }
    let seen: OrderResponse = serde_json::from_str(&body).map_err(|e| fail(2, format!("bad body: {e}")))?;
    if seen.inventory_saw_subject != "alice"
        || seen.inventory_saw_actors != ["svc:order"]
        || seen.inventory_saw_audience != ["inventory"]
    {
        return Err(fail(2, format!("inventory saw the wrong caller: {seen:?}")));
    }
    // The same through order's gRPC face (the SDK's one-line on-behalf-of call).
    // The user's session puts (and renews) alice's token on every call.
    let channel = ServiceEnv::dev(dir, "admin", auth_uri).channel(order_grpc_uri, crate::order::AUDIENCE)?;
    let seen = crate::shop::orders_client::OrdersClient::new(session.channel(channel))
        .place_order(crate::shop::ReserveRequest { sku: "sku-1".into(), quantity: 1 })
        .await
        .map_err(|s| fail(2, format!("gRPC PlaceOrder refused: {s}")))?
        .into_inner();
    if seen.subject != "alice" || seen.actors != ["svc:order"] || seen.audience != ["inventory"] {
        return Err(fail(2, format!("inventory saw the wrong caller over gRPC: {seen:?}")));
    }
    println!("[2/5] order placed over HTTP and gRPC; inventory saw sub=alice act=svc:order aud=inventory");

    // 3. An exchange for an audience off order's allow-list is refused.
    let creds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("credentials/order.json")).map_err(setup)?)
            .map_err(setup)?;
    let mut as_order = AuthClient::new(ServiceEnv::dev(dir, "order", auth_uri).auth_channel()?);
    let refused = as_order
        .exchange_token(ExchangeTokenRequest {
            client_id: creds["client_id"].as_str().unwrap_or_default().into(),
            client_secret: creds["client_secret"].as_str().unwrap_or_default().into(),
            subject_token: token.clone(),
            audience: "payments".into(),
            ..Default::default()
        })
        .await;
    match refused {
        Err(s) if s.code() == Code::PermissionDenied => {
            println!("[3/5] exchange for aud=payments refused: PERMISSION_DENIED ({})", s.message());
        }
        other => return Err(fail(3, format!("expected PERMISSION_DENIED, got {other:?}"))),
    }

    // 4. Log out (the session revokes itself with its refresh token, which
    // proves it is alice's); the next order is refused within milliseconds.
    session.logout().await.map_err(|e| fail(4, format!("logout refused: {e}")))?;
    let revoked_at = Instant::now();
    let delay = loop {
        let (status, _) = order.order(&token).await?;
        if status == 401 {
            break revoked_at.elapsed();
        }
        if revoked_at.elapsed() > Duration::from_secs(5) {
            return Err(fail(4, format!("still answered {status} 5 s after logout")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    println!(
        "[4/5] alice logged out; the next order was refused (401) {:.1} ms after the Revoke response",
        delay.as_secs_f64() * 1e3
    );

    // 5. Refresh, replay the old refresh token, and see the family revoked.
    let (_, first) = login(&mut auth, dir, "alice").await?;
    let second = auth
        .refresh(RefreshRequest { refresh_token: first.clone() })
        .await
        .map_err(|s| fail(5, format!("refresh refused: {s}")))?
        .into_inner()
        .refresh_token;
    match auth.refresh(RefreshRequest { refresh_token: first }).await {
        Err(s) if s.code() == Code::Unauthenticated => {}
        other => return Err(fail(5, format!("replay should be refused, got {other:?}"))),
    }
    match auth.refresh(RefreshRequest { refresh_token: second }).await {
        Err(s) if s.code() == Code::Unauthenticated => {}
        other => return Err(fail(5, format!("the family should be revoked, got {other:?}"))),
    }
    println!("[5/5] refresh rotated; replaying the old refresh token revoked the whole family");
    Ok(DemoReport { logout_to_refused: delay })
}
