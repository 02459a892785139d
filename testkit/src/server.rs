//! [`TestServer`]: a real auth-server over mTLS on `127.0.0.1:0` with a
//! fresh dev environment, built with [`Server::builder`] like the binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use auth_server::clock::SharedClock;
use auth_server::config::{Config, KeySource, Overrides, RawConfig};
use auth_server::core::AuthCore;
use auth_server::keys::FileKeys;
use auth_server::server::{Listeners, ReloadError, Reloaded, Reloader, Server};
use auth_server::store::Store;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A running auth-server. Dropping it stops the server.
pub struct TestServer {
    /// gRPC (mTLS) address.
    pub grpc_addr: SocketAddr,
    /// HTTP side-port address.
    pub http_addr: SocketAddr,
    /// The dev directory (certificates, credentials, config).
    pub dir: PathBuf,
    config: Config,
    core: Arc<AuthCore>,
    keys: Option<Arc<FileKeys>>,
    reloader: Reloader,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// A tweak of the raw configuration, applied before validation.
type ConfigureFn = Box<dyn FnOnce(&mut RawConfig) + Send>;

/// Options for [`TestServer`].
#[derive(Default)]
pub struct TestServerBuilder {
    store_url: Option<String>,
    store: Option<Arc<dyn Store>>,
    clock: Option<SharedClock>,
    dir: Option<PathBuf>,
    configure: Option<ConfigureFn>,
    keys_from_config: bool,
}

impl TestServerBuilder {
    /// Use a Redis store at `url` instead of the in-memory one.
    pub fn store_url(mut self, url: impl Into<String>) -> Self {
        self.store_url = Some(url.into());
        self
    }

    /// Use this store (e.g. a wrapper that counts or fails calls) instead
    /// of opening the configured one.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
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

    /// Adjust the configuration (as read from the dev config file) before
    /// it is validated. The dev config gets `[audit] enabled = false`, so
    /// that tests do not write the audit trail to the harness's output;
    /// set `raw.audit` here to test it.
    pub fn configure(mut self, f: impl FnOnce(&mut RawConfig) + Send + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// Let the server open its signing keys from the configuration (and a
    /// reload re-open them), as the binary does. By default the test holds
    /// the file keys ([`TestServer::keys`]) and rotates them itself. A
    /// Transit key source always opens from the configuration.
    pub fn keys_from_config(mut self) -> Self {
        self.keys_from_config = true;
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
        let env = auth_server::dev::ensure(&dir).expect("dev environment");
        // Tests share the harness's standard output: no audit trail on it
        // unless a test asks. Written in the file, so a reload (which
        // re-reads it) keeps it.
        let text = std::fs::read_to_string(&env.config_path).expect("dev config");
        if !text.contains("\n[audit]") {
            std::fs::write(&env.config_path, text + "\n[audit]\nenabled = false\n").expect("dev config");
        }
        let (store_url, configure) = (self.store_url, self.configure);
        let config = Config::load_with(&env.config_path, &Overrides::default(), |raw| {
            if let Some(url) = store_url {
                raw.store = url;
            }
            if let Some(f) = configure {
                f(raw);
            }
        })
        .unwrap_or_else(|e| panic!("test server configuration: {e}"));
        let keys = match &config.keys {
            KeySource::File { signing, publish } if !self.keys_from_config => {
                Some(Arc::new(FileKeys::open(signing, publish).expect("keys")))
            }
            _ => None,
        };
        let mut builder = Server::builder(config);
        if let Some(k) = &keys {
            builder = builder.keys(k.clone());
        }
        if let Some(clock) = self.clock {
            builder = builder.clock(clock);
        }
        if let Some(store) = self.store {
            builder = builder.store(store);
        }
        let server = builder.build().await.unwrap_or_else(|e| panic!("test server: {e}"));
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let grpc_addr = grpc.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("addr");
        let config = server.config().clone();
        let core = Arc::clone(server.core());
        let reloader = server.reloader();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = server.serve(Listeners { grpc, http }, shutdown).await {
                panic!("test server failed: {e}");
            }
        });
        TestServer {
            grpc_addr,
            http_addr,
            dir,
            config,
            core,
            keys,
            reloader,
            stop: Some(stop),
            task: Some(task),
            _tmp: tmp,
        }
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
        channel_to(self.grpc_addr, identity, ca).await
    }

    /// An mTLS channel as dev client `name` to `addr`: a proxy or balancer
    /// in front of this server (or of replicas sharing its dev directory).
    pub async fn channel_via(&self, addr: SocketAddr, name: &str) -> Channel {
        let (cert, key) = self.client_identity(name);
        channel_to(addr, Some(Identity::from_pem(cert, key)), Certificate::from_pem(self.ca_pem()))
            .await
            .expect("mTLS channel")
    }

    /// The configuration the server started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dev config file the server was started from.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("auth-server.toml")
    }

    /// The flow core (policy, store, clock).
    pub fn core(&self) -> &Arc<AuthCore> {
        &self.core
    }

    /// The file key set the test holds, to rotate keys at run time. Panics
    /// when the server opened its keys from the configuration
    /// ([`TestServerBuilder::keys_from_config`]).
    pub fn keys(&self) -> &Arc<FileKeys> {
        self.keys.as_ref().expect("keys opened from the configuration: rotate them with reload()")
    }

    /// Re-reads the config file and swaps the policy, as SIGHUP does.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        self.reloader.reload().await
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

/// A channel to a gRPC port at `addr` (named `localhost` in its
/// certificate) with `identity` (or none), trusting `ca`.
async fn channel_to(
    addr: SocketAddr,
    identity: Option<Identity>,
    ca: Certificate,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls)?.connect().await
}
