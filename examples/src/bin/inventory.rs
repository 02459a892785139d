//! The inventory example service.
//!
//! Environment: see `ServiceEnv::from_env` (`AUTH_URL`, `AUTH_SERVER_ID`, `AUTH_TLS_*`,
//! `AUTH_CREDENTIALS_FILE`, else the dev layout under `AUTH_DEV_DIR`), `AUTH_ISSUER` (default `auth-service`),
//! `LISTEN` (default `127.0.0.1:50062`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt().init();
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let env = examples::env::ServiceEnv::from_env("inventory");
    let listen = var("LISTEN", "127.0.0.1:50062");
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("inventory: bind {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("inventory listening on {listen} (mTLS)");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match examples::inventory::serve(listener, &env, &var("AUTH_ISSUER", "auth-service"), shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inventory: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
