//! The order example service (HTTP front, `POST /orders`, and an mTLS gRPC
//! face).

use clap::Parser;

/// The order example service: `POST /orders` over HTTP and `PlaceOrder`
/// over mTLS gRPC, calling inventory on behalf of the user.
#[derive(Parser)]
#[command(
    about,
    after_help = "Environment:
  AUTH_URL, AUTH_SERVER_ID, AUTH_TLS_CA, AUTH_TLS_CERT, AUTH_TLS_KEY, AUTH_CREDENTIALS_FILE
                        the auth server and this service's mTLS material and credentials
                        (unset: the dev layout under AUTH_DEV_DIR, default .auth-dev)
  AUTH_ISSUER           the tokens' issuer (default auth-service)
  INVENTORY_URL         inventory's gRPC address (default https://127.0.0.1:50062)
  LISTEN                HTTP listen address (default 127.0.0.1:8081)
  GRPC_LISTEN           mTLS gRPC listen address (default 127.0.0.1:50061)
  RUST_LOG              log filter (default info)
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME
                        export spans to this OTLP/gRPC collector (default: no export; name order)"
)]
struct Cli {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let telemetry = match examples::telemetry::init("order", "info") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("order: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = run().await;
    telemetry.shutdown().await;
    code
}

async fn run() -> std::process::ExitCode {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let env = match service_sdk::ServiceEnv::from_env("order") {
        Ok(env) => env,
        Err(e) => {
            eprintln!("order: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listen = var("LISTEN", "127.0.0.1:8081");
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("order: bind {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let grpc_listen = var("GRPC_LISTEN", "127.0.0.1:50061");
    let grpc = match tokio::net::TcpListener::bind(&grpc_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("order: bind {grpc_listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("order listening on http://{listen}/orders and {grpc_listen} (gRPC, mTLS)");
    let inventory = var("INVENTORY_URL", "https://127.0.0.1:50062");
    match examples::order::serve(listener, grpc, &env, &inventory, examples::telemetry::stop_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
