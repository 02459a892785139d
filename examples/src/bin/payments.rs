//! A service built on the SDK, as README.md "Add a service" walks through it
//! (the README shows this file whole). `payments` verifies its callers'
//! tokens, requires `payments:charge`, and reserves the units at inventory
//! on the caller's behalf. `payments charge` is a caller: it logs a user in
//! and calls `Charge` with the user's token.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use examples::shop::inventory_client::InventoryClient;
use examples::shop::payments_client::PaymentsClient;
use examples::shop::payments_server::{Payments, PaymentsServer};
use examples::shop::{ChargeRequest, ChargeResponse, ReserveRequest};
use service_sdk::{AuthChannel, Claims, RequireAuthLayer, ServiceEnv};
use tonic::{Request, Response, Status};

type Error = Box<dyn std::error::Error>;

/// payments: serves Charge over mTLS gRPC, or (`charge`) calls it as a user.
#[derive(Parser)]
#[command(
    about,
    after_help = "Environment: the lines `auth-server dev add-service payments` prints (AUTH_URL, \
                  AUTH_TLS_CA, AUTH_TLS_CERT, AUTH_TLS_KEY, AUTH_CREDENTIALS_FILE); LISTEN (default \
                  127.0.0.1:50063); INVENTORY_URL (default https://127.0.0.1:50062); PAYMENTS_URL \
                  (for `charge`, default https://127.0.0.1:50063)"
)]
struct Cli {
    #[command(subcommand)]
    call: Option<Call>,
}

#[derive(Subcommand)]
enum Call {
    /// Log a user in for audience `payments` and call Charge with that token.
    Charge {
        /// The user's credentials file, {"username", "password"}.
        #[arg(long)]
        user: PathBuf,
        /// The item to charge for.
        sku: String,
    },
}

struct PaymentsService {
    /// Calls inventory with tokens exchanged at the auth server.
    inventory: AuthChannel,
}

#[tonic::async_trait]
impl Payments for PaymentsService {
    async fn charge(&self, req: Request<ChargeRequest>) -> Result<Response<ChargeResponse>, Status> {
        // RequireAuthLayer has verified the token (signature, issuer,
        // aud = payments, expiry, revocation) and put its claims here.
        let claims = Claims::from_request(&req)?;
        claims.require_perm("payments:charge")?;
        // A token for inventory with sub = the user and act = payments.
        let mut inventory = InventoryClient::new(self.inventory.on_behalf_of(&req).await?);
        let ChargeRequest { sku, quantity } = req.into_inner();
        let seen = inventory.reserve(ReserveRequest { sku, quantity }).await?.into_inner();
        Ok(Response::new(ChargeResponse { remaining: seen.remaining, subject: seen.subject, actors: seen.actors }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt().init();
    let env = ServiceEnv::from_env("payments")?;
    let var = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_owned());
    match cli.call {
        None => serve(&env, &var("LISTEN", "127.0.0.1:50063"), &var("INVENTORY_URL", "https://127.0.0.1:50062")).await,
        Some(Call::Charge { user, sku }) => {
            charge(&env, &var("PAYMENTS_URL", "https://127.0.0.1:50063"), &user, sku).await
        }
    }
}

/// The service: the verifier, the token source and the mTLS server, all
/// from the one environment.
async fn serve(env: &ServiceEnv, listen: &str, inventory_url: &str) -> Result<(), Error> {
    let auth = env.auth_channel()?;
    let verifier = env.verifier(auth.clone()).build()?;
    let tokens = env.token_source(auth).build();
    let inventory = AuthChannel::new(env.channel(inventory_url, "inventory")?, tokens, "inventory");
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("payments listening on {listen} (mTLS)");
    tonic::transport::Server::builder()
        .layer(RequireAuthLayer::new(verifier))
        .add_service(PaymentsServer::new(PaymentsService { inventory }))
        .serve_with_incoming(env.incoming(listener)?)
        .await?;
    Ok(())
}

/// A caller at the edge: the user's login for audience `payments` (the
/// SDK's session, renewing itself), then Charge with the user's token.
async fn charge(env: &ServiceEnv, url: &str, user: &Path, sku: String) -> Result<(), Error> {
    let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(user)?)?;
    let text = |k: &str| creds[k].as_str().unwrap_or_default().to_owned();
    let session = service_sdk::login(env.auth_channel()?, &text("username"), &text("password"), "payments").await?;
    let mut payments = PaymentsClient::new(session.channel(env.channel(url, "payments")?));
    let res = payments.charge(ChargeRequest { sku, quantity: 1 }).await?.into_inner();
    println!("charged: inventory saw sub={} act={:?}, {} left", res.subject, res.actors, res.remaining);
    session.logout().await?;
    Ok(())
}
