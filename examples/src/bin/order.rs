//! The order example service (HTTP front, `POST /orders`).
//!
//! Environment: see `ServiceEnv::from_env` (`AUTH_URL`, `AUTH_SERVER_ID`, `AUTH_TLS_*`,
//! `AUTH_CREDENTIALS_FILE`, else the dev layout under `AUTH_DEV_DIR`), `AUTH_ISSUER` (default `auth-service`),
//! `INVENTORY_URL` (default `https://127.0.0.1:50062`), `LISTEN` (HTTP,
//! default `127.0.0.1:8081`), `GRPC_LISTEN` (mTLS gRPC, default
//! `127.0.0.1:50061`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt().init();
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let env = examples::env::ServiceEnv::from_env("order");
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
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let issuer = var("AUTH_ISSUER", "auth-service");
    let inventory = var("INVENTORY_URL", "https://127.0.0.1:50062");
    match examples::order::serve(listener, grpc, &env, &issuer, &inventory, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
