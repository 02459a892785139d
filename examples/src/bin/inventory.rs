//! The inventory example service (mTLS gRPC).

use clap::Parser;

/// The inventory example service: `GetStock` and `Reserve` over mTLS gRPC,
/// behind the SDK's verify layer.
#[derive(Parser)]
#[command(
    about,
    after_help = "Environment:
  AUTH_URL, AUTH_SERVER_ID, AUTH_TLS_CA, AUTH_TLS_CERT, AUTH_TLS_KEY, AUTH_CREDENTIALS_FILE
                        the auth server and this service's mTLS material and credentials
                        (unset: the dev layout under AUTH_DEV_DIR, default .auth-dev)
  AUTH_ISSUER           the tokens' issuer (default auth-service)
  LISTEN                mTLS gRPC listen address (default 127.0.0.1:50062)
  RUST_LOG              log filter (default info)
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME
                        export spans to this OTLP/gRPC collector (default: no export; name inventory)"
)]
struct Cli {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let telemetry = match examples::telemetry::init("inventory", "info") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("inventory: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = run().await;
    telemetry.shutdown().await;
    code
}

async fn run() -> std::process::ExitCode {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let env = match service_sdk::ServiceEnv::from_env("inventory") {
        Ok(env) => env,
        Err(e) => {
            eprintln!("inventory: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let listen = var("LISTEN", "127.0.0.1:50062");
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("inventory: bind {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("inventory listening on {listen} (mTLS)");
    match examples::inventory::serve(listener, &env, examples::telemetry::stop_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inventory: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
