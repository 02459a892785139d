//! The HTTP side port: `/.well-known/jwks.json` for non-Rust verifiers,
//! `/healthz` (the process is up) and `/readyz` (the store answers).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::core::AuthCore;

/// The side-port router.
pub fn router(core: Arc<AuthCore>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(core)
}

async fn jwks(State(core): State<Arc<AuthCore>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/jwk-set+json"), (header::CACHE_CONTROL, "public, max-age=60")],
        core.policy().keys.public_keys().jwks_json.clone(),
    )
}

async fn readyz(State(core): State<Arc<AuthCore>>) -> impl IntoResponse {
    match core.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}
