//! `cargo run -p examples --bin demo [-- --dir DIR]`: the whole story
//! against a dev PKI; exits non-zero when any step misbehaves.

use std::path::PathBuf;

use clap::Parser;

/// The end-to-end demo: the auth server, inventory and order in this
/// process against a dev PKI, then five steps (login, an order on behalf of
/// the user, a refused exchange, logout, refresh-token reuse). Exits
/// non-zero when any step misbehaves.
#[derive(Parser)]
#[command(about, after_help = "Environment:\n  RUST_LOG    log filter (default warn)")]
struct Cli {
    /// The dev directory (created when missing).
    #[arg(long, default_value = ".auth-dev")]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let telemetry = match examples::telemetry::init("demo", "warn") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("demo: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match examples::demo::run(cli.dir).await {
        Ok(_) => {
            println!("demo: every step behaved as it should");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
