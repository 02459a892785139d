//! `cargo run -p examples --bin demo [-- --dir DIR]`: the whole story
//! against a dev PKI; exits non-zero when any step misbehaves.

use std::path::PathBuf;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let dir = match (args.next().as_deref(), args.next()) {
        (Some("--dir"), Some(d)) => PathBuf::from(d),
        (None, _) => PathBuf::from(".auth-dev"),
        _ => {
            eprintln!("usage: demo [--dir DIR]");
            return std::process::ExitCode::FAILURE;
        }
    };
    match examples::demo::run(dir).await {
        Ok(_) => {
            println!("demo: every step behaved as it should");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
