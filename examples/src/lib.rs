//! Runnable example services built on `service-sdk`, the end-to-end demo and
//! the load tool.
//!
//! - `inventory`: a tonic service behind `RequireAuthLayer`.
//! - `order`: an HTTP front that calls inventory on behalf of the user.
//! - `payments`: the service README.md "Add a service" walks through (the
//!   README shows `src/bin/payments.rs` whole; `tests/it/readme.rs` runs the
//!   section's commands as written).
//! - `demo`: the whole story in one process; `cargo run -p examples --bin demo`.
//! - `loadgen`: load for the auth service; see BENCHMARKS.md. How it paces
//!   and times a load, and writes its report, is in [`loadgen`].
//! - `floor`: a bare `auth.v1.Auth` server on the same mTLS edge that only
//!   answers or signs a token ([`floor`]), the ceiling the auth server's
//!   ExchangeToken rate is measured against (`examples/scripts/floor.sh`).
//!
//! `order` and `inventory` export their spans over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set ([`telemetry`]); with the SDK's
//! `otel` feature one trace follows a user's order through order, the auth
//! server's token exchange and inventory.

pub mod demo;
pub mod floor;
pub mod inventory;
pub mod loadgen;
pub mod order;
pub mod telemetry;

/// Why an example service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The environment is unusable (the error names the variable).
    #[error(transparent)]
    Env(#[from] service_sdk::EnvError),
    /// The verifier refused its options.
    #[error("verifier: {0}")]
    Verifier(#[from] service_sdk::verify::BuildError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Generated code of the example services' proto (`shop.v1`).
pub mod shop {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/shop.v1.rs"));
}
