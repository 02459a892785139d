//! One way to build and serve: [`Server::builder`] takes a validated
//! [`Config`], opens what it was not given (signing keys, store), loads the
//! first [`Policy`] and builds the [`AuthCore`]; [`Server::serve`] runs the
//! gRPC (mTLS) and HTTP ports on already-bound [`Listeners`] until shutdown.
//! [`Server::reload`] (or a [`Reloader`] handle, e.g. for SIGHUP) re-reads the
//! config file and swaps the policy, and re-reads the TLS files
//! ([`ServerTls`], which also polls them while serving).
//!
//! Extra tower layers for the gRPC stack (metrics, load shedding) go in with
//! [`ServerBuilder::layer`]; the first one added is the outermost, as with
//! [`tower::ServiceBuilder`]. The per-client rate limit of `[limits]`
//! ([`ClientRateLimitLayer`]) always sits inside them, next to the services.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tonic::codegen::Bytes;
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt as _};

use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ConfigError, ConfigErrors, KeySource, LimitsConfig, StoreConfig};
use crate::core::{AuthCore, Policy, PolicyError};
use crate::directory::DirectoryFiles;
use crate::grpc::AuthService;
use crate::keys::{KeyError, SigningKeys};
use crate::observe::audit::{AuditError, AuditLog};
use crate::observe::metrics::{EventMetrics, Scrape, TlsPort};
use crate::observe::rpc::RpcMetricsLayer;
use crate::observe::store::MeteredStore;
use crate::observe::{Event, Fanout, published_keys};
use crate::ratelimit::ClientRateLimitLayer;
use crate::revocations::Revocations;
use crate::store::{MemoryStore, Store, StoreError};
use crate::tls::{ReloadTrigger, ServerTls, TlsFiles, TlsWatch};

/// A boxed error, as tower and tonic use it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request as the gRPC layer stack sees it.
pub type GrpcRequest = http::Request<tonic::body::Body>;
/// A response as the gRPC layer stack sees it.
pub type GrpcResponse = http::Response<tonic::body::Body>;
/// The gRPC service (all routes) that added layers wrap.
pub type GrpcService = BoxCloneService<GrpcRequest, GrpcResponse, BoxError>;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// Unusable keys.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// Unusable users or accounts.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit file could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The replica's deny set refused its feed options.
    #[error("revocation feed: {0}")]
    Revocations(#[from] service_sdk::verify::FeedOptionsError),
    /// A listener or the transport failed.
    #[error("transport: {0}")]
    Transport(String),
}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e.into())
    }
}

/// How long [`ServerBuilder::build`] waits for the replica's deny set to
/// read its first snapshot before serving anyway.
pub const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// The two already-bound listeners [`Server::serve`] runs on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC (mTLS) port.
    pub grpc: TcpListener,
    /// The HTTP side port.
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses `config` names.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|e| StartError::Transport(format!("bind {addr}: {e}")))
        };
        Ok(Self { grpc: bind(config.grpc_addr).await?, http: bind(config.http_addr).await? })
    }
}

/// The gRPC layer stack, type-erased once at build time.
#[derive(Clone)]
struct GrpcStack(Arc<dyn Fn(GrpcService) -> GrpcService + Send + Sync>);

impl<S> Layer<S> for GrpcStack
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Service = GrpcService;

    fn layer(&self, inner: S) -> GrpcService {
        (self.0)(BoxCloneService::new(inner.map_err(|never| match never {})))
    }
}

/// Options for a [`Server`]; see [`Server::builder`].
pub struct ServerBuilder<L = Identity> {
    config: Config,
    keys: Option<Arc<dyn SigningKeys>>,
    store: Option<Arc<dyn Store>>,
    clock: Option<SharedClock>,
    metrics: Option<PrometheusHandle>,
    layers: ServiceBuilder<L>,
}

impl<L> ServerBuilder<L> {
    /// Serves `GET /metrics` on the side port, rendered from `handle`: the
    /// Prometheus recorder installed as the global recorder (see
    /// [`install_prometheus`](crate::observe::metrics::install_prometheus)),
    /// before this server is built. Without it there is no `/metrics`
    /// route; the server still reports its metrics to whatever recorder is
    /// installed.
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Signs with these keys instead of opening `config.keys`. A reload then
    /// keeps them (their owner rotates them).
    pub fn keys(mut self, keys: Arc<dyn SigningKeys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Uses this store instead of opening `config.store`.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses this clock (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Adds a tower layer around the gRPC services (every RPC passes
    /// through it). Layers added first are outermost. The layer may change
    /// the response body type; errors it returns end the HTTP/2 stream.
    pub fn layer<N>(self, layer: N) -> ServerBuilder<Stack<N, L>> {
        ServerBuilder {
            config: self.config,
            keys: self.keys,
            store: self.store,
            clock: self.clock,
            metrics: self.metrics,
            layers: self.layers.layer(layer),
        }
    }

    /// Reads and checks the TLS files (a key that is not the
    /// certificate's fails here, before anything listens), opens what was
    /// not given (keys from `config.keys`, the store from `config.store`),
    /// reads the users and accounts files, and builds the server.
    pub async fn build<ResBody>(self) -> Result<Server, StartError>
    where
        L: Layer<GrpcService> + Send + Sync + 'static,
        L::Service: Service<GrpcRequest, Response = http::Response<ResBody>> + Clone + Send + 'static,
        <L::Service as Service<GrpcRequest>>::Future: Send + 'static,
        <L::Service as Service<GrpcRequest>>::Error: Into<BoxError>,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let tls = Arc::new(ServerTls::load(TlsFiles::grpc(&self.config.tls, self.config.allow_readable_key_files))?);
        let http_tls = match &self.config.http_tls {
            Some(t) => {
                Some(Arc::new(ServerTls::load(crate::http::tls_files(t, self.config.allow_readable_key_files))?))
            }
            None => None,
        };
        let fixed_keys = self.keys.is_some();
        let keys = match self.keys {
            Some(k) => k,
            None => {
                crate::keys::open(&self.config.keys, Arc::clone(&clock), self.config.allow_readable_key_files).await?
            }
        };
        let store = match self.store {
            Some(s) => s,
            None => open_store(&self.config.store).await?,
        };
        // Timed at the port: no store holds metrics code.
        let store = MeteredStore::wrap(store);
        let files =
            DirectoryFiles::read(&self.config.users_file, &self.config.accounts_file).map_err(PolicyError::from)?;
        let policy = Policy::build(&self.config, keys, &files)?;
        crate::observe::metrics::describe();
        let mut events = Fanout::new().with(Arc::new(EventMetrics::new()));
        if let Some(audit) = AuditLog::open(&self.config.audit, Arc::clone(&clock))? {
            events = events.with(Arc::new(audit));
        }
        let revocations = Revocations::start(Arc::clone(&store), &clock)?;
        let core = AuthCore::new(&self.config, policy, store, revocations.clone(), Arc::clone(&clock));
        let core = Arc::new(core.with_events(Arc::new(events)));
        keys_loaded(&core, false);
        // Presented tokens are checked against the local deny set: give
        // its first read a moment, and serve without it rather than not at
        // all (those checks fail closed until it is in).
        if !revocations.synced(FIRST_SNAPSHOT_WAIT).await {
            tracing::warn!(
                wait_secs = FIRST_SNAPSHOT_WAIT.as_secs(),
                "the deny list is not read yet: serving, but tokens presented to this replica (subject tokens, \
                 Revoke callers) are refused with UNAVAILABLE until it is"
            );
        }
        let layers = self.layers.into_inner();
        let stack = GrpcStack(Arc::new(move |inner: GrpcService| {
            BoxCloneService::new(
                layers.layer(inner).map_response(|res| res.map(tonic::body::Body::new)).map_err(Into::into),
            )
        }));
        let reloader = Reloader {
            inner: Arc::new(ReloadState {
                core: Arc::clone(&core),
                started: self.config.clone(),
                fixed_keys,
                clock,
                keys_source: tokio::sync::Mutex::new(self.config.keys.clone()),
                tls: Arc::clone(&tls),
                http_tls: http_tls.clone(),
                directory: std::sync::Mutex::new(DirectoryState {
                    users_file: self.config.users_file.clone(),
                    accounts_file: self.config.accounts_file.clone(),
                    digest: files.digest(),
                    refused: None,
                }),
            }),
        };
        Ok(Server { config: self.config, core, stack, tls, http_tls, reloader, metrics: self.metrics })
    }
}

/// Reports the current policy's published keys.
fn keys_loaded(core: &AuthCore, reload: bool) {
    let policy = core.policy();
    let keys = published_keys(&policy.keys.public_keys());
    let signing_kid = policy.keys.signing_kid();
    core.events.emit(&Event::KeysLoaded { keys: &keys, signing_kid: signing_kid.as_deref(), reload });
}

/// A built auth-server, ready to [`serve`](Server::serve).
pub struct Server {
    config: Config,
    core: Arc<AuthCore>,
    stack: GrpcStack,
    tls: Arc<ServerTls>,
    http_tls: Option<Arc<ServerTls>>,
    reloader: Reloader,
    metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Server {
    /// Starts building a server from a validated configuration.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use auth_server::config::{Config, Overrides};
    /// use auth_server::server::{Listeners, Server};
    /// let config = Config::load("auth-server.toml".as_ref(), &Overrides::default())?;
    /// let listeners = Listeners::bind(&config).await?;
    /// let server = Server::builder(config)
    ///     // e.g. metrics, load shedding:
    ///     .layer(tower::ServiceBuilder::new().map_request(|req: http::Request<_>| req))
    ///     .build()
    ///     .await?;
    /// server.serve(listeners, async { let _ = tokio::signal::ctrl_c().await; }).await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder { config, keys: None, store: None, clock: None, metrics: None, layers: ServiceBuilder::new() }
    }

    /// The configuration the server started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The flow core (policy, store, clock).
    pub fn core(&self) -> &Arc<AuthCore> {
        &self.core
    }

    /// The gRPC port's TLS identity (reloadable).
    pub fn tls(&self) -> &Arc<ServerTls> {
        &self.tls
    }

    /// The HTTP side port's TLS identity (reloadable), with `[http_tls]`.
    pub fn http_tls(&self) -> Option<&Arc<ServerTls>> {
        self.http_tls.as_ref()
    }

    /// A handle that reloads the policy and the TLS files, usable after
    /// `serve` took the server (SIGHUP, file watches).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Re-reads the config file and swaps the policy; see [`Reloader::reload`].
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        self.reloader.reload().await
    }

    /// Serves gRPC (mTLS) on `listeners.grpc` and the HTTP side port on
    /// `listeners.http` until `shutdown` resolves, then drains both.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let Server { config, core, stack, tls, http_tls, reloader, metrics } = self;
        let Listeners { grpc, http } = listeners;
        // Logs the certificate's expiry, raises the `tls` readiness
        // condition once it has passed, and reloads changed files.
        let tls_watch =
            tls.watch(TlsWatch::from_config(&config.tls), Arc::clone(&core.clock), Some(core.readiness.clone()));
        // The users and accounts files reload when their contents change.
        let directory_watch = reloader.watch_directory(config.reload_check_secs);
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        if core.readiness.is_ready() {
            health_reporter.set_serving::<auth_proto::auth::v1::auth_server::AuthServer<AuthService>>().await;
        } else {
            health_reporter.set_not_serving::<auth_proto::auth::v1::auth_server::AuthServer<AuthService>>().await;
        }
        // Reflection in both versions: grpc.reflection.v1, and v1alpha,
        // the only one grpcurl before 1.9 and Python's grpcio-reflection
        // speak. Each lists auth.v1.Auth and grpc.health.v1.Health.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(auth_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| StartError::Transport(e.to_string()))?;
        let reflection = reflection().build_v1().map_err(|e| StartError::Transport(e.to_string()))?;

        // Readiness, as /readyz reports it: NOT_SERVING while the store
        // does not answer or refuses writes, or a readiness condition (an
        // expired certificate) is raised. Checked every 2 s, and at once when
        // a condition changes.
        let store = Arc::clone(&core.store);
        let readiness = core.readiness.clone();
        let health_task = tokio::spawn(async move {
            let mut changes = readiness.subscribe();
            let mut serving = readiness.is_ready();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    Ok(()) = changes.changed() => {}
                }
                let mut reasons = Vec::new();
                if let Err(e) = store.ping().await {
                    reasons.push(e.to_string());
                }
                reasons.extend(readiness.reasons());
                let ok = reasons.is_empty();
                if ok != serving {
                    serving = ok;
                    if ok {
                        tracing::info!("ready again: serving");
                        health_reporter
                            .set_serving::<auth_proto::auth::v1::auth_server::AuthServer<AuthService>>()
                            .await;
                    } else {
                        tracing::warn!(?reasons, "not ready: not serving");
                        health_reporter
                            .set_not_serving::<auth_proto::auth::v1::auth_server::AuthServer<AuthService>>()
                            .await;
                    }
                }
            }
        });

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };

        let grpc_addr = grpc.local_addr().map_err(|e| StartError::Transport(e.to_string()))?;
        let http_addr = http.local_addr().map_err(|e| StartError::Transport(e.to_string()))?;
        let policy = core.policy();
        tracing::info!(
            %grpc_addr,
            %http_addr,
            store = core.store.name(),
            issuer = %core.issuer,
            signing_kid = %policy.keys.signing_kid().as_deref().unwrap_or("unknown"),
            published_kids = ?policy.published_kids(),
            "auth-server listening"
        );
        drop(policy);

        let limits = config.limits.clone();
        let grace = Duration::from_secs(limits.shutdown_grace_secs);
        // Watch streams end as shutdown begins, so verifiers move to another
        // replica at once instead of waiting out the grace.
        let auth_service = AuthService::serving(Arc::clone(&core), &config.limits, stop_rx.clone());
        let public_url = crate::http::public_url(&config, http_addr);
        if config.http_public_url.is_none() && http_addr.ip().is_unspecified() {
            tracing::warn!(
                %public_url,
                "http_public_url is not set and the side port listens on every address: the discovery \
                 document's jwks_uri names an address clients cannot use; set http_public_url"
            );
        }
        let mut http_router =
            crate::http::router(Arc::clone(&core), Duration::from_millis(limits.readyz_cache_ms), &public_url);
        let mut upkeep = None;
        if let Some(handle) = metrics {
            let service = auth_service.clone();
            // The TLS series (certificate expiry, reloads) of each port.
            let mut scrape = Scrape::new(handle, Arc::clone(&core), Arc::new(move || service.watch_streams()))
                .with_tls(TlsPort::Grpc, Arc::clone(&tls));
            if let Some(t) = &http_tls {
                scrape = scrape.with_tls(TlsPort::Http, Arc::clone(t));
            }
            let scrape = Arc::new(scrape);
            upkeep = Some(scrape.spawn_upkeep(Duration::from_secs(5)));
            http_router = http_router.merge(crate::observe::metrics::router(scrape));
        }
        // The side port's TLS files reload like the gRPC port's, with the
        // same poll and expiry warning. No readiness condition: an expired
        // side-port certificate is logged (and shows in /metrics), but does
        // not take the replica's gRPC service out of rotation.
        let http_tls_watch =
            http_tls.as_ref().map(|t| t.watch(TlsWatch::from_config(&config.tls), Arc::clone(&core.clock), None));
        let http_stop = wait(stop_rx.clone());
        let http_server = async {
            match http_tls {
                Some(tls) => crate::http::serve_tls(http, http_router, &limits, tls, http_stop).await,
                None => crate::http::serve(http, http_router, &limits, http_stop).await,
            }
        };
        let grpc_server = grpc_transport(&limits)
            // Outermost: every RPC's span and code, whatever the layers
            // inside decide.
            .layer(crate::edge::rpc_trace(config.otel.enabled()))
            // Not gRPC (content-type): HTTP 415 before any service.
            .layer(crate::edge::GrpcContentTypeLayer)
            // Every gRPC call's count and latency by method and code,
            // malformed and refused ones included.
            .layer(RpcMetricsLayer::new())
            .layer(crate::edge::GrpcFramingLayer)
            .layer(stack)
            // Inside the added layers, so they see refused calls too.
            .layer(ClientRateLimitLayer::from_config(&config.limits).observed(Arc::clone(&core.events)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                auth_proto::auth::v1::auth_server::AuthServer::new(auth_service).max_decoding_message_size(64 * 1024),
            )
            .serve_with_incoming_shutdown(
                // mTLS per connection, with the TLS files current at the
                // handshake: the caller's identity is read once, at the
                // handshake; connection cap, preface and idle deadlines.
                crate::edge::TlsIncoming::with_limits(grpc, tls, crate::edge::ConnLimits::from_config(&limits)),
                wait(stop_rx.clone()),
            );
        // Shutdown drains open calls and streams for at most the grace
        // period, then drops what is left.
        let grpc_server = async move {
            tokio::pin!(grpc_server);
            tokio::select! {
                res = &mut grpc_server => return res,
                () = wait(stop_rx) => {}
            }
            match tokio::time::timeout(grace, grpc_server).await {
                Ok(res) => res,
                Err(_) => {
                    tracing::info!(
                        grace_secs = grace.as_secs(),
                        "gRPC connections still open after the grace period; closing them"
                    );
                    Ok(())
                }
            }
        };
        let (g, ()) = tokio::join!(grpc_server, http_server);
        health_task.abort();
        if let Some(task) = upkeep {
            task.abort();
        }
        tls_watch.abort();
        if let Some(w) = directory_watch {
            w.abort();
        }
        if let Some(w) = http_tls_watch {
            w.abort();
        }
        // The audit lines of the last calls are written before the process
        // exits.
        let events = Arc::clone(&core.events);
        let _ = tokio::task::spawn_blocking(move || events.flush()).await;
        g.map_err(|e| StartError::Transport(e.to_string()))?;
        tracing::info!("auth-server stopped");
        Ok(())
    }
}

/// The gRPC port's HTTP/2 transport under `limits`, before any layer or
/// service: keepalive PINGs, the stream caps and the request timeout. The
/// server and the transport-floor bench (`examples`' `floor`) both start
/// from it, so the floor measures the same transport.
pub fn grpc_transport(limits: &LimitsConfig) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // Every live client acks a PING per interval: the edge's idle read
        // deadline (longer, by validation) only cuts dead ones.
        .http2_keepalive_interval(Some(Duration::from_secs(limits.grpc_keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(limits.grpc_keepalive_timeout_secs)))
        .max_concurrent_streams(limits.grpc_max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(limits.grpc_max_local_error_reset_streams))
        .timeout(Duration::from_millis(limits.grpc_request_timeout_ms))
}

/// Opens the configured store: in-memory, or Redis.
async fn open_store(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match config {
        StoreConfig::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreConfig::Redis(redis) => crate::store::open_redis(redis).await,
    }
}

/// Why a reload kept the old policy.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// The keys could not be opened.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The users or accounts file is unusable.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Published `kid`s before, sorted.
    pub old_kids: Vec<String>,
    /// Published `kid`s after, sorted.
    pub new_kids: Vec<String>,
    /// The `kid` that signs from now on, when known.
    pub signing_kid: Option<String>,
    /// Restart-only keys that changed in the file; their old values stay in
    /// force until a restart.
    pub needs_restart: Vec<&'static str>,
}

struct ReloadState {
    core: Arc<AuthCore>,
    started: Config,
    fixed_keys: bool,
    clock: SharedClock,
    /// The key source of the current policy; the lock also makes reloads
    /// run one at a time.
    keys_source: tokio::sync::Mutex<KeySource>,
    /// The gRPC port's TLS files, re-read with each reload.
    tls: Arc<ServerTls>,
    /// The side port's, if it serves TLS, likewise.
    http_tls: Option<Arc<ServerTls>>,
    /// The users and accounts files in force.
    directory: std::sync::Mutex<DirectoryState>,
}

/// Which users and accounts files the running policy came from, and what
/// they held.
struct DirectoryState {
    users_file: std::path::PathBuf,
    accounts_file: std::path::PathBuf,
    /// [`DirectoryFiles::digest`] of the contents in force.
    digest: [u8; 32],
    /// The digest of contents refused last, logged once.
    refused: Option<[u8; 32]>,
}

/// What a check of the users and accounts files did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryReload {
    /// Their contents are the ones in force.
    Unchanged,
    /// New contents are in force.
    Applied {
        /// Service accounts added, by client id.
        added: Vec<String>,
        /// Service accounts removed, by client id.
        removed: Vec<String>,
        /// How many users there are now.
        users: usize,
    },
}

/// Logs the service accounts a new directory adds and removes; returns them.
fn log_directory_change(
    old: &crate::directory::Directory,
    new: &crate::directory::Directory,
) -> (Vec<String>, Vec<String>) {
    let (before, after) = (old.account_ids(), new.account_ids());
    let added: Vec<String> = after.iter().filter(|a| !before.contains(a)).map(|a| (*a).to_owned()).collect();
    let removed: Vec<String> = before.iter().filter(|a| !after.contains(a)).map(|a| (*a).to_owned()).collect();
    if !added.is_empty() || !removed.is_empty() || old.user_count() != new.user_count() {
        tracing::info!(
            ?added,
            ?removed,
            accounts = after.len(),
            users = new.user_count(),
            "users and accounts reloaded"
        );
    }
    (added, removed)
}

/// Reloads a running server's [`Policy`]. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<ReloadState>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").field("config", &self.inner.started.path()).finish_non_exhaustive()
    }
}

impl Reloader {
    /// Re-reads the config file the server started from and validates all
    /// of it; re-reads the users and accounts files and opens the `[keys]`
    /// (key files at possibly new paths; an unchanged Transit key is kept),
    /// then swaps the new policy in at once. On any error the old policy
    /// stays and the error is logged and returned. Restart-only settings
    /// that changed are logged as warnings and keep their running values.
    ///
    /// The TLS files are re-read too, on their own: a broken set keeps the
    /// running one and is logged ([`ServerTls::reload_logged`]), whatever
    /// becomes of the policy, and the other way round.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        // File reads: off the runtime's threads, as the poll does. The logs
        // go where this task's go.
        let tls = Arc::clone(&self.inner.tls);
        let http_tls = self.inner.http_tls.clone();
        let logs = tracing::dispatcher::get_default(Clone::clone);
        let _ = tokio::task::spawn_blocking(move || {
            tracing::dispatcher::with_default(&logs, || {
                let _ = tls.reload_logged(ReloadTrigger::Signal);
                if let Some(http_tls) = &http_tls {
                    let _ = http_tls.reload_logged(ReloadTrigger::Signal);
                }
            });
        })
        .await;
        // Log rotation: the audit file is opened again at its path.
        self.inner.core.events.reopen();
        let result = self.try_reload().await;
        match &result {
            Ok(r) => {
                for key in &r.needs_restart {
                    tracing::warn!(key, "changed in the config file; takes effect at the next restart");
                }
                tracing::info!(
                    old_kids = ?r.old_kids,
                    new_kids = ?r.new_kids,
                    signing_kid = %r.signing_kid.as_deref().unwrap_or("unknown"),
                    "policy reloaded"
                );
            }
            Err(e) => tracing::error!(error = %e, "reload failed; keeping the current policy"),
        }
        result
    }

    /// Re-reads the users and accounts files the running policy came from
    /// and, when their contents changed, swaps in a policy with the new
    /// users and accounts (the rest of the policy stays). New contents are
    /// checked as at start-up first: a broken file keeps the running users
    /// and accounts, and is logged (once per broken version) with the key
    /// and the problem. Runs one at a time with [`Reloader::reload`].
    pub async fn reload_directory(&self) -> Result<DirectoryReload, ReloadError> {
        let s = &self.inner;
        let _one_at_a_time = s.keys_source.lock().await;
        let (users_file, accounts_file, digest, refused) = match s.directory.lock() {
            Ok(d) => (d.users_file.clone(), d.accounts_file.clone(), d.digest, d.refused),
            Err(_) => return Ok(DirectoryReload::Unchanged),
        };
        let refuse = |marker: [u8; 32], e: PolicyError| {
            if refused != Some(marker) {
                tracing::error!(error = %e, "users and accounts not reloaded: keeping the running ones");
            }
            if let Ok(mut d) = s.directory.lock() {
                d.refused = Some(marker);
            }
            ReloadError::Policy(e)
        };
        // Two small files, read as the TLS files are.
        let files = match DirectoryFiles::read(&users_file, &accounts_file) {
            Ok(files) => files,
            // Unreadable: logged once per distinct error (its contents are
            // unknown).
            Err(e) => {
                let marker = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, e.to_string().as_bytes());
                let mut key = [0u8; 32];
                key.copy_from_slice(marker.as_ref());
                return Err(refuse(key, PolicyError::Directory(e)));
            }
        };
        let new = files.digest();
        if new == digest {
            return Ok(DirectoryReload::Unchanged);
        }
        let old = s.core.policy();
        // Parsing hashes a decoy password (argon2): off the async threads.
        let built = tokio::task::spawn_blocking(move || old.with_directory(&files).map(|p| (p, old))).await;
        let (policy, old) = match built {
            Ok(built) => built.map_err(|e| refuse(new, e))?,
            Err(_) => {
                return Err(ReloadError::Policy(PolicyError::Directory(crate::config::ConfigError {
                    key: "users_file".into(),
                    problem: "the task checking the users and accounts files failed".into(),
                })));
            }
        };
        let (added, removed) = log_directory_change(&old.directory, &policy.directory);
        let users = policy.directory.user_count();
        s.core.swap_policy(policy);
        if let Ok(mut d) = s.directory.lock() {
            d.digest = new;
            d.refused = None;
        }
        Ok(DirectoryReload::Applied { added, removed, users })
    }

    /// Checks the users and accounts files every `every_secs` seconds
    /// ([`Reloader::reload_directory`]); `None` when 0 (SIGHUP only).
    pub fn watch_directory(&self, every_secs: u64) -> Option<tokio::task::JoinHandle<()>> {
        if every_secs == 0 {
            return None;
        }
        let reloader = self.clone();
        let every = Duration::from_secs(every_secs);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Logged by reload_directory itself.
                let _ = reloader.reload_directory().await;
            }
        }))
    }

    async fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let s = &self.inner;
        let mut source = s.keys_source.lock().await;
        let config = s.started.reread()?;
        let old = s.core.policy();
        let keys = if s.fixed_keys || (config.keys == *source && matches!(config.keys, KeySource::Transit(_))) {
            Arc::clone(&old.keys)
        } else {
            crate::keys::open(&config.keys, Arc::clone(&s.clock), config.allow_readable_key_files).await?
        };
        let files = DirectoryFiles::read(&config.users_file, &config.accounts_file).map_err(PolicyError::from)?;
        let policy = Policy::build(&config, keys, &files)?;
        let before = (published_keys(&old.keys.public_keys()), old.keys.signing_kid());
        let after = (published_keys(&policy.keys.public_keys()), policy.keys.signing_kid());
        let reloaded = Reloaded {
            old_kids: old.published_kids(),
            new_kids: policy.published_kids(),
            signing_kid: policy.keys.signing_kid(),
            needs_restart: s.started.restart_changes(&config),
        };
        log_directory_change(&old.directory, &policy.directory);
        s.core.swap_policy(policy);
        if let Ok(mut d) = s.directory.lock() {
            *d = DirectoryState {
                users_file: config.users_file.clone(),
                accounts_file: config.accounts_file.clone(),
                digest: files.digest(),
                refused: None,
            };
        }
        *source = config.keys;
        // Only a changed key set is news for the audit trail.
        if before != after {
            keys_loaded(&s.core, true);
        }
        Ok(reloaded)
    }
}
