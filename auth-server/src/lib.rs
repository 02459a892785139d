//! `auth-server`: the `auth.v1.Auth` token service of the platform.
//!
//! It alone holds the private signing key. Over mTLS it serves Login,
//! ExchangeToken (RFC 8693), Refresh (single-use rotation with reuse
//! detection), Revoke, GetJwks and WatchRevocations; an HTTP side port
//! (plain, or TLS with `[http_tls]`) serves `/.well-known/jwks.json`, the
//! RFC 8414 metadata at `/.well-known/oauth-authorization-server`
//! ([`discovery`]), `/healthz`, `/readyz` and `/metrics`. The operator tools of the
//! binary (`admin revoke`, `admin keys`, `decode`, `new-account`) are in
//! [`admin`].
//!
//! The flows (`login`, `exchange`, `refresh`, `revoke`) run over three
//! ports: [`keys`] (signing and JWKS), [`store`] (memory, Redis) and the
//! account [`directory`].
//!
//! Dependencies run one way: [`edge`] (the mTLS incoming, reading the
//! caller's identity once per connection, and the per-RPC trace layer) →
//! [`grpc`] (a thin handler per RPC: wire checks, then a flow, then
//! protobuf) → the flows → [`core`] and the ports. No flow imports another:
//! what they share ([`grant::Grant`], [`grant::Issued`], the scope-narrowing
//! rule) is in the leaf module [`grant`], and each decides in a pure
//! `policy` function. [`error::AuthError`] becomes a `tonic::Status` in one
//! place.
//!
//! What operators watch goes through one event port, [`observe`]: handlers
//! report each token issued, refusal, revocation, refresh reuse and key
//! load to `AuthCore::events`, which feeds the audit trail and the
//! Prometheus metrics; per-RPC metrics are a layer and store latency a
//! decorator of the store port.
//!
//! One builder assembles the server, for the binary, the tests and the
//! examples alike: [`server::Server::builder`] takes a validated
//! [`config::Config`] (keys and store are opened from it unless given), and
//! [`server::Server::serve`] runs both ports on already-bound listeners.
//! The token settings, the directory and the signing keys form the
//! [`core::Policy`], which [`server::Server::reload`] swaps without a
//! restart.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use auth_server::config::{Config, Overrides};
//! use auth_server::server::{Listeners, Server};
//! let config = Config::load("auth-server.toml".as_ref(), &Overrides::default())?;
//! let listeners = Listeners::bind(&config).await?;
//! let server = Server::builder(config).build().await?;
//! let reloader = server.reloader(); // e.g. on SIGHUP: reloader.reload().await
//! server.serve(listeners, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # drop(reloader);
//! # Ok(()) }
//! ```
//!
//! The binary's logs and its OpenTelemetry span export (off unless
//! `[otel]` or `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector) are set up
//! by [`logs::init`] from [`telemetry::OtelConfig`].
//!
//! Feature flags: none. Test support (a `TestServer`, Redis and OpenBao
//! processes) lives in the separate `testkit` crate.

pub mod admin;
pub mod clock;
pub mod config;
pub mod core;
pub mod dev;
pub mod directory;
pub mod discovery;
pub mod edge;
pub mod error;
pub mod exchange;
pub mod grant;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod limits;
pub mod login;
pub mod logs;
pub mod observe;
pub mod password;
pub mod ratelimit;
pub mod readiness;
pub mod refresh;
pub mod revocations;
pub mod revoke;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod throttle;
pub mod tls;
