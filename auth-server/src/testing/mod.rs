//! Test helpers for this crate's and other crates' tests (feature
//! `testing`): a real auth-server over mTLS on `127.0.0.1:0` with a fresh dev
//! environment.

mod bao;
mod redis;

pub use bao::{OpenBao, ROOT_TOKEN, bao_binary};
pub use redis::{RedisProcess, RedisReply};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, Overrides};
use crate::core::AuthCore;
use crate::keys::FileKeys;

/// A running auth-server. Dropping it stops the server.
pub struct TestServer {
    /// gRPC (mTLS) address.
    pub grpc_addr: SocketAddr,
    /// HTTP side-port address.
    pub http_addr: SocketAddr,
    /// The dev directory (certificates, credentials, config).
    pub dir: PathBuf,
    core: Arc<AuthCore>,
    keys: Arc<FileKeys>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// A configuration tweak applied before start.
type ConfigureFn = Box<dyn FnOnce(&mut Config) + Send>;

/// Options for [`TestServer`].
#[derive(Default)]
pub struct TestServerBuilder {
    store_url: Option<String>,
    clock: Option<SharedClock>,
    dir: Option<PathBuf>,
    configure: Option<ConfigureFn>,
}

impl TestServerBuilder {
    /// Use a Redis store at `url` instead of the in-memory one.
    pub fn store_url(mut self, url: impl Into<String>) -> Self {
        self.store_url = Some(url.into());
        self
    }

    /// Use this clock.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Reuse an existing dev directory (e.g. a second replica sharing the
    /// first one's PKI, keys and accounts).
    pub fn dev_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Adjust the configuration before start.
    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// Starts the server.
    pub async fn start(self) -> TestServer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (tmp, dir) = match self.dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                let d = t.path().to_owned();
                (Some(t), d)
            }
        };
        let env = crate::dev::ensure(&dir).expect("dev environment");
        let mut config = Config::load(&env.config_path, &Overrides::default()).expect("dev config");
        if let Some(url) = self.store_url {
            config.store = url;
            config.validate().expect("store url");
        }
        if let Some(f) = self.configure {
            f(&mut config);
            config.validate().expect("configuration");
        }
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let grpc_addr = grpc.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("addr");
        let keys = Arc::new(crate::server::load_file_keys(&config.keys).expect("keys"));
        let store = crate::server::open_store(&config).await.expect("store");
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let core = crate::server::build_core(config, keys.clone(), store, clock).expect("core");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serve_core = Arc::clone(&core);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = crate::server::serve(grpc, http, serve_core, shutdown).await {
                panic!("test server failed: {e}");
            }
        });
        TestServer { grpc_addr, http_addr, dir, core, keys, stop: Some(stop), task: Some(task), _tmp: tmp }
    }
}

impl TestServer {
    /// A server with a fresh dev environment and the in-memory store.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Options.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// The dev CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.read("ca.pem")
    }

    /// A dev client's certificate and key (PEM): `order`, `inventory`, `admin`.
    pub fn client_identity(&self, name: &str) -> (String, String) {
        (self.read(&format!("clients/{name}.pem")), self.read(&format!("clients/{name}-key.pem")))
    }

    fn credentials(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.read(&format!("credentials/{name}.json"))).expect("credentials JSON")
    }

    /// A service account's client id and secret.
    pub fn client_credentials(&self, name: &str) -> (String, String) {
        let v = self.credentials(name);
        (v["client_id"].as_str().expect("client_id").into(), v["client_secret"].as_str().expect("secret").into())
    }

    /// A dev user's name and password: `alice`, `bob`.
    pub fn user_password(&self, name: &str) -> (String, String) {
        let v = self.credentials(name);
        (v["username"].as_str().expect("username").into(), v["password"].as_str().expect("password").into())
    }

    /// An mTLS channel to the gRPC port as dev client `name`.
    pub async fn channel(&self, name: &str) -> Channel {
        let (cert, key) = self.client_identity(name);
        self.channel_with(Some(Identity::from_pem(cert, key)), Certificate::from_pem(self.ca_pem()))
            .await
            .expect("mTLS channel")
    }

    /// A channel with any client identity (or none) and trust root.
    pub async fn channel_with(
        &self,
        identity: Option<Identity>,
        ca: Certificate,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        Channel::from_shared(format!("https://{}", self.grpc_addr)).expect("uri").tls_config(tls)?.connect().await
    }

    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.core.config
    }

    /// The flow core (store, keys, clock).
    pub fn core(&self) -> &Arc<AuthCore> {
        &self.core
    }

    /// The file key set, to rotate keys at run time.
    pub fn keys(&self) -> &Arc<FileKeys> {
        &self.keys
    }

    /// Stops the server and waits for it to drain.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
