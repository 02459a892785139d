//! The HTTP side port: `/.well-known/jwks.json` for non-Rust verifiers,
//! `/healthz` (the process is up) and `/readyz` (the store answers).
//! `/metrics` is merged in by the server when it has a Prometheus handle
//! (see [`crate::observe::metrics::router`]).
//!
//! [`serve`] runs it under the side port's own limits: a connection cap
//! (over it, a connection is accepted and closed at once), a deadline for
//! each request head (slowloris), an idle timeout, and a bounded drain at
//! shutdown. `/readyz` reuses its last store ping for a short while, so
//! probes cannot multiply load onto the store.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::LimitsConfig;
use crate::core::AuthCore;
use crate::limits::{ConnLimit, Deadlines};

#[derive(Clone)]
struct HttpState {
    core: Arc<AuthCore>,
    ready: Arc<ReadyCache>,
}

/// The last store ping of `/readyz` and when it was taken. The lock is held
/// across the ping, so concurrent probes wait for one ping and share it.
struct ReadyCache {
    ttl: Duration,
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl ReadyCache {
    async fn ready(&self, core: &AuthCore) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < self.ttl
        {
            return ok;
        }
        let ok = match core.store.ping().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "not ready");
                false
            }
        };
        *last = Some((Instant::now(), ok));
        ok
    }
}

/// The side-port router; `/readyz` reuses a store ping for `readyz_cache`.
pub fn router(core: Arc<AuthCore>, readyz_cache: Duration) -> Router {
    let ready = Arc::new(ReadyCache { ttl: readyz_cache, last: tokio::sync::Mutex::new(None) });
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { core, ready })
}

async fn jwks(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/jwk-set+json"), (header::CACHE_CONTROL, "public, max-age=60")],
        s.core.policy().keys.public_keys().jwks_json.clone(),
    )
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.ready(&s.core).await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    }
}

/// Serves `router` on `listener` (HTTP/1.1) under `limits` until `shutdown`
/// resolves; then stops accepting, lets requests in flight finish and
/// closes what is still open after `limits.shutdown_grace_secs`.
pub async fn serve(listener: TcpListener, router: Router, limits: &LimitsConfig, shutdown: impl Future<Output = ()>) {
    let cap = ConnLimit::new(limits.http_max_connections);
    let idle = Duration::from_secs(limits.http_idle_timeout_secs);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.http_header_timeout_ms));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or the peer left: back off briefly
                // rather than spin.
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.try_acquire() else {
            // Over the cap: closed at once (dropping the stream).
            tracing::debug!("HTTP connection cap reached; closing a new connection");
            continue;
        };
        let io = TokioIo::new(Deadlines::new(stream, None, idle, Some(permit)));
        let conn = http1.serve_connection(io, TowerToHyperService::new(router.clone()));
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "HTTP connection ended");
                    }
                    return;
                }
                _ = stop.wait_for(|v| *v) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(limits.shutdown_grace_secs);
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await.is_err() {
        tracing::debug!(open = conns.len(), "HTTP connections still open after the grace period; closing them");
        conns.abort_all();
    }
}
