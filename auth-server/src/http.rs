//! The HTTP side port: `/.well-known/jwks.json` for non-Rust verifiers,
//! the RFC 8414 metadata at `/.well-known/oauth-authorization-server`
//! ([`crate::discovery`]), `/healthz` (the process is up) and `/readyz` (the
//! store answers and accepts writes, and no other readiness condition, such
//! as an expired certificate, is raised; a 503 says why not). `/metrics` is
//! merged in by the server when it has a Prometheus handle (see
//! [`crate::observe::metrics::router`]).
//!
//! Both documents carry `Cache-Control: public, max-age=N` with N from
//! `keys.jwks_max_age_secs` (below the key pre-publication window, checked
//! by config validation) and a strong `ETag`; a request whose
//! `If-None-Match` names the current one gets `304 Not Modified`.
//!
//! With `[http_tls]` the port speaks HTTPS only ([`serve_tls`]; client
//! certificates are required when `http_tls.client_ca` is set). Its files
//! ([`tls_files`]) are a [`ServerTls`] like the gRPC port's: checked at
//! start-up, re-read when they change and on SIGHUP, each new connection
//! taking the set current at its accept.
//!
//! [`serve`] runs it under the side port's own limits: a connection cap
//! (over it, a connection is accepted and closed at once), a deadline for
//! each request head (slowloris), an idle timeout, and a bounded drain at
//! shutdown. `/readyz` reuses its last store ping for a short while, so
//! probes cannot multiply load onto the store.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, HttpTlsConfig, LimitsConfig};
use crate::core::AuthCore;
use crate::discovery;
use crate::limits::{ConnLimit, Deadlines};
use crate::tls::{ServerTls, TlsFiles};

#[derive(Clone)]
struct HttpState {
    core: Arc<AuthCore>,
    ready: Arc<ReadyCache>,
    public_url: Arc<str>,
}

/// The last store ping of `/readyz` and when it was taken. The lock is held
/// across the ping, so concurrent probes wait for one ping and share it.
struct ReadyCache {
    ttl: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl ReadyCache {
    /// Ready, or why not (the store's error, e.g. that Redis refuses
    /// writes).
    async fn ready(&self, core: &AuthCore) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last
            && at.elapsed() < self.ttl
        {
            return result.clone();
        }
        let result = core.store.ping().await.map_err(|e| {
            tracing::warn!(error = %e, "not ready");
            e.to_string()
        });
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// The side-port router; `/readyz` reuses a store ping for `readyz_cache`;
/// the URLs it publishes start with `public_url` (see [`public_url`]).
pub fn router(core: Arc<AuthCore>, readyz_cache: Duration, public_url: &str) -> Router {
    let ready = Arc::new(ReadyCache { ttl: readyz_cache, last: tokio::sync::Mutex::new(None) });
    Router::new()
        .route(discovery::JWKS_PATH, get(jwks))
        .route(discovery::METADATA_PATH, get(metadata))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { core, ready, public_url: public_url.into() })
}

/// The side port's public base URL: `http_public_url` when configured,
/// else `http://` (`https://` with `[http_tls]`) and `bound`, the address
/// the port listens on.
pub fn public_url(config: &Config, bound: std::net::SocketAddr) -> String {
    match &config.http_public_url {
        Some(url) => url.clone(),
        None => format!("{}://{bound}", if config.http_tls.is_some() { "https" } else { "http" }),
    }
}

async fn jwks(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let policy = s.core.policy();
    let body = policy.keys.public_keys().jwks_json.clone();
    cacheable(&headers, "application/jwk-set+json", body, policy.jwks_max_age_secs)
}

async fn metadata(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let policy = s.core.policy();
    let algs = discovery::jwks_algs(&policy.keys.public_keys().jwks_json);
    let body = discovery::metadata(&s.core.issuer, &s.public_url, &algs).to_string();
    cacheable(&headers, "application/json", body, policy.jwks_max_age_secs)
}

/// `body` with `Cache-Control: public, max-age` and a strong `ETag` (a
/// digest of the body), or `304 Not Modified` when the request's
/// `If-None-Match` names that tag (or is `*`).
fn cacheable(request: &HeaderMap, content_type: &'static str, body: String, max_age_secs: u64) -> Response {
    let tag =
        format!("\"{}\"", URL_SAFE_NO_PAD.encode(&digest::digest(&digest::SHA256, body.as_bytes()).as_ref()[..16]));
    let cache = format!("public, max-age={max_age_secs}");
    let headers = |mut res: Response| {
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_str(&cache).unwrap_or(HeaderValue::from_static("no-cache")));
        if let Ok(v) = HeaderValue::from_str(&tag) {
            h.insert(header::ETAG, v);
        }
        res
    };
    if none_match(request, &tag) {
        return headers(StatusCode::NOT_MODIFIED.into_response());
    }
    headers(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Whether `If-None-Match` names `tag` or is `*` (weak comparison, as RFC
/// 9110 section 13.1.2 asks for this header).
fn none_match(request: &HeaderMap, tag: &str) -> bool {
    request.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |candidate| {
            let candidate = candidate.trim();
            candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == tag
        },
    )
}

/// 200 `ready`, or 503 with one reason per line: the store's (`store
/// unavailable: redis refuses writes: OOM ...`), then every raised
/// [`Readiness`](crate::readiness::Readiness) condition (an expired server
/// certificate, ...).
async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let mut reasons = Vec::new();
    if let Err(why) = s.ready.ready(&s.core).await {
        reasons.push(why);
    }
    reasons.extend(s.core.readiness.reasons());
    if reasons.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n"))
    }
}

/// The side port's TLS files from `[http_tls]`: client certificates
/// required (and chained to `client_ca`) only when `client_ca` is set; ALPN
/// `http/1.1`. Load them with [`ServerTls::load`]; errors name
/// `http_tls.cert`, `http_tls.key` or `http_tls.client_ca` and the file.
pub fn tls_files(cfg: &HttpTlsConfig, allow_readable_key: bool) -> TlsFiles {
    TlsFiles {
        section: "http_tls".into(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        client_ca: cfg.client_ca.clone(),
        alpn: vec![b"http/1.1".to_vec()],
        allow_readable_key,
    }
}

/// A connection's byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Serves `router` on `listener` (HTTP/1.1) under `limits` until `shutdown`
/// resolves; then stops accepting, lets requests in flight finish and
/// closes what is still open after `limits.shutdown_grace_secs`.
pub async fn serve(listener: TcpListener, router: Router, limits: &LimitsConfig, shutdown: impl Future<Output = ()>) {
    run(listener, router, limits, None, shutdown).await;
}

/// Like [`serve`], over TLS with `tls` (see [`tls_files`]; each connection
/// takes its configuration current at the accept, so a reload applies to
/// new connections): every
/// connection must complete its handshake within
/// `limits.http_header_timeout_ms` (and then send its request head within
/// that time again); plain HTTP gets no answer. The connection cap and the
/// idle timeout count from the TCP accept, handshake included.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: &LimitsConfig,
    tls: Arc<ServerTls>,
    shutdown: impl Future<Output = ()>,
) {
    run(listener, router, limits, Some(tls), shutdown).await;
}

async fn run(
    listener: TcpListener,
    router: Router,
    limits: &LimitsConfig,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let cap = ConnLimit::new(limits.http_max_connections);
    let idle = Duration::from_secs(limits.http_idle_timeout_secs);
    let head_timeout = Duration::from_millis(limits.http_header_timeout_ms);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(head_timeout);
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
        let plain = Deadlines::new(stream, None, idle, Some(permit));
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.server_config()));
        let (http1, service) = (http1.clone(), TowerToHyperService::new(router.clone()));
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let io: Box<dyn Io> = match acceptor {
                None => Box::new(plain),
                Some(acceptor) => match tokio::time::timeout(head_timeout, acceptor.accept(plain)).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "HTTPS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("HTTPS handshake timed out");
                        return;
                    }
                },
            };
            let conn = http1.serve_connection(TokioIo::new(io), service);
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
