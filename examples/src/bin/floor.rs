//! The transport floor for ExchangeToken (see `examples::floor`).
//!
//! ```text
//! taskset -c 0 target/release/floor --dir /tmp/floor/dev --mode sign --addr 127.0.0.1:51061 &
//! taskset -c 1 target/release/loadgen --addr https://127.0.0.1:51061 --dir /tmp/floor/dev \
//!     --rpc exchange --connections 4 --concurrency 64 --duration 8
//! ```
//!
//! `examples/scripts/floor.sh` runs it interleaved with the auth server.

use std::path::PathBuf;

use clap::Parser;
use examples::floor::{Floor, FloorMode, serve};

/// A bare auth.v1.Auth server on the auth server's mTLS edge: ExchangeToken
/// answers a fixed token (`fixed`) or signs a fresh one per call (`sign`),
/// with no authentication, policy or store.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// The `auth-server dev` directory: its server certificate, client CA
    /// and ES256 signing key.
    #[arg(long, default_value = ".auth-dev")]
    dir: PathBuf,
    /// What ExchangeToken does per call.
    #[arg(long, value_enum, default_value = "sign")]
    mode: FloorMode,
    /// Serve behind the auth server's whole edge (connection limits, read
    /// deadlines, the gRPC layers, its log subscriber and metrics
    /// recorder): what that edge costs beyond the bare floor.
    #[arg(long)]
    edge: bool,
    /// The gRPC (mTLS) listen address.
    #[arg(long, default_value = "127.0.0.1:50061")]
    addr: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let floor = Floor::with_own_key(cli.mode).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&cli.addr).await.map_err(|e| format!("bind {}: {e}", cli.addr))?;
    eprintln!("floor ({:?}) listening on {} (mTLS)", cli.mode, cli.addr);
    if cli.edge {
        let _telemetry = auth_server::logs::init(auth_server::config::LogFormat::Text, &Default::default())
            .map_err(|e| e.to_string())?;
        let _metrics = auth_server::observe::metrics::install_prometheus().map_err(|e| e.to_string())?;
        return examples::floor::serve_with_edge(listener, &cli.dir, floor, examples::telemetry::stop_signal())
            .await
            .map_err(|e| e.to_string());
    }
    serve(listener, &cli.dir, floor, examples::telemetry::stop_signal()).await.map_err(|e| e.to_string())
}
