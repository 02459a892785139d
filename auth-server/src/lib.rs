//! `auth-server`: the `auth.v1.Auth` token service of the platform.
//!
//! It alone holds the private signing key. Over mTLS it serves Login,
//! ExchangeToken (RFC 8693), Refresh (single-use rotation with reuse
//! detection), Revoke, GetJwks and WatchRevocations; an HTTP side port serves
//! `/.well-known/jwks.json`, `/healthz` and `/readyz`.
//!
//! The flows (`login`, `exchange`, `refresh`, `revoke`) run over three
//! ports: [`keys`] (signing and JWKS), [`store`] (memory, Redis) and the
//! account [`directory`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use auth_server::{clock::SystemClock, config::{Config, Overrides}, server};
//! let config = Config::load("auth-server.toml".as_ref(), &Overrides::default())?;
//! let keys = Arc::new(server::load_file_keys(&config.keys)?);
//! let store = server::open_store(&config).await?;
//! let grpc = tokio::net::TcpListener::bind(config.grpc_addr).await?;
//! let http = tokio::net::TcpListener::bind(config.http_addr).await?;
//! let core = server::build_core(config, keys, store, Arc::new(SystemClock))?;
//! server::serve(grpc, http, core, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Feature flags: `testing` adds [`testing`] (a `TestServer` and process
//! helpers for tests).

pub mod clock;
pub mod config;
pub mod core;
pub mod dev;
pub mod directory;
pub mod error;
pub mod exchange;
pub mod grant;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod login;
pub mod password;
pub mod refresh;
pub mod revoke;
pub mod server;
pub mod store;
pub mod tls;

#[cfg(feature = "testing")]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod testing;
