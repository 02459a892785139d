//! Start-up: build the parts from configuration and serve both ports.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::clock::SharedClock;
use crate::config::{Config, ConfigError, KeysConfig};
use crate::core::AuthCore;
use crate::directory::Directory;
use crate::grpc::AuthService;
use crate::keys::{FileKeys, KeyError, LoadedKey, SigningKeys};
use crate::store::{MemoryStore, Store, StoreError};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Unusable keys.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener or the transport failed.
    #[error("transport: {0}")]
    Transport(String),
}

/// Loads file keys as configured.
pub fn load_file_keys(cfg: &KeysConfig) -> Result<FileKeys, KeyError> {
    let (active, publish) = read_file_keys(cfg)?;
    FileKeys::new(active, publish)
}

/// Re-reads the configured key files into `keys` (rotation without restart,
/// e.g. on SIGHUP).
pub fn reload_file_keys(keys: &FileKeys, cfg: &KeysConfig) -> Result<(), KeyError> {
    let (active, publish) = read_file_keys(cfg)?;
    keys.replace(active, publish)
}

fn read_file_keys(cfg: &KeysConfig) -> Result<(LoadedKey, Vec<LoadedKey>), KeyError> {
    let signing = cfg.signing.as_ref().ok_or_else(|| KeyError::Config("keys.signing is required".into()))?;
    let active = LoadedKey::from_pem_file(signing.alg, &signing.path)?;
    let publish =
        cfg.publish.iter().map(|k| LoadedKey::from_pem_file(k.alg, &k.path)).collect::<Result<Vec<_>, _>>()?;
    Ok((active, publish))
}

/// Opens the configured store: in-memory, or Redis.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    if config.store == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    crate::store::open_redis(&config.redis).await
}

/// Opens Vault Transit signing keys as configured.
pub async fn open_transit_keys(config: &Config) -> Result<Arc<dyn SigningKeys>, KeyError> {
    let table = config.keys.transit.as_ref().ok_or_else(|| KeyError::Config("keys.transit is required".into()))?;
    let keys: Arc<dyn SigningKeys> =
        crate::keys::TransitKeys::open(crate::keys::TransitConfig::from_table(table)?).await?;
    Ok(keys)
}

/// Builds the flow core from configuration with the given keys and store.
pub fn build_core(
    config: Config,
    keys: Arc<dyn SigningKeys>,
    store: Arc<dyn Store>,
    clock: SharedClock,
) -> Result<Arc<AuthCore>, StartError> {
    let directory = Arc::new(Directory::load(&config.users_file, &config.accounts_file)?);
    Ok(Arc::new(AuthCore::new(config, directory, keys, store, clock)))
}

/// Serves gRPC (mTLS) on `grpc` and the HTTP side port on `http` until
/// `shutdown` resolves, then drains both.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    core: Arc<AuthCore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let tls = crate::tls::server_tls(&core.config.tls)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<auth_proto::auth::v1::auth_server::AuthServer<AuthService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(auth_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Transport(e.to_string()))?;

    // Readiness follows the store: NOT_SERVING while it does not answer.
    let store = Arc::clone(&core.store);
    let health_task = tokio::spawn(async move {
        let mut ready = true;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let ok = store.ping().await.is_ok();
            if ok != ready {
                ready = ok;
                if ok {
                    tracing::info!("store reachable again: serving");
                    health_reporter.set_serving::<auth_proto::auth::v1::auth_server::AuthServer<AuthService>>().await;
                } else {
                    tracing::warn!("store unreachable: not serving");
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
    tracing::info!(%grpc_addr, %http_addr, store = core.store.name(), issuer = %core.config.issuer, "auth-server listening");

    let http_server =
        axum::serve(http, crate::http::router(Arc::clone(&core))).with_graceful_shutdown(wait(stop_rx.clone()));
    let grpc_server = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| StartError::Transport(e.to_string()))?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            auth_proto::auth::v1::auth_server::AuthServer::new(AuthService::new(core))
                .max_decoding_message_size(64 * 1024),
        )
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait on delayed ACKs (~40 ms).
            tonic::transport::server::TcpIncoming::from(grpc)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            wait(stop_rx),
        );
    let (g, h) = tokio::join!(grpc_server, async { http_server.await });
    health_task.abort();
    g.map_err(|e| StartError::Transport(e.to_string()))?;
    h.map_err(|e| StartError::Transport(e.to_string()))?;
    tracing::info!("auth-server stopped");
    Ok(())
}
