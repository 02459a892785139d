//! [`VaultCredentials`]: credentials read from Vault (or OpenBao) KV v2
//! with `vaultrs`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::RwLock;
use tokio::time::Instant;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{Credentials, CredentialsError};
use crate::client::secret::{ClientCredentials, ClientSecret};

/// The path where Kubernetes mounts a pod's service-account token.
pub const KUBERNETES_JWT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Where one secret input of a Vault login comes from. Files and variables
/// are read at every login, so a rotated `secret_id` is picked up.
#[derive(Clone, Debug)]
pub enum SecretSource {
    /// A value held in memory.
    Value(ClientSecret),
    /// An environment variable.
    Env(String),
    /// A file (surrounding whitespace trimmed).
    File(PathBuf),
}

impl SecretSource {
    async fn read(&self) -> Result<ClientSecret, CredentialsError> {
        let v = match self {
            SecretSource::Value(v) => return Ok(v.clone()),
            SecretSource::Env(name) => std::env::var(name).map_err(|_| CredentialsError::MissingVar(name.clone()))?,
            SecretSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|source| CredentialsError::Io { path: path.clone(), source })?,
        };
        let v = v.trim();
        if v.is_empty() {
            return Err(match self {
                SecretSource::Env(name) => CredentialsError::MissingVar(name.clone()),
                SecretSource::File(path) => CredentialsError::Parse { path: path.clone() },
                SecretSource::Value(_) => CredentialsError::Vault("empty login secret".into()),
            });
        }
        Ok(ClientSecret::new(v))
    }
}

/// How the source logs in to Vault.
#[derive(Clone, Debug)]
pub enum VaultAuth {
    /// A Vault token, used as is (renewed if renewable).
    Token(SecretSource),
    /// AppRole login.
    AppRole {
        /// The auth mount, usually `approle`.
        mount: String,
        /// The role id.
        role_id: SecretSource,
        /// The secret id.
        secret_id: SecretSource,
    },
    /// Kubernetes auth with the pod's service-account JWT.
    Kubernetes {
        /// The auth mount, usually `kubernetes`.
        mount: String,
        /// The Vault role bound to the service account.
        role: String,
        /// The JWT file, usually [`KUBERNETES_JWT_PATH`].
        jwt_path: PathBuf,
    },
}

impl VaultAuth {
    /// AppRole login on the `approle` mount.
    pub fn approle(role_id: SecretSource, secret_id: SecretSource) -> Self {
        VaultAuth::AppRole { mount: "approle".into(), role_id, secret_id }
    }

    /// Kubernetes login on the `kubernetes` mount with the pod's standard
    /// service-account token.
    pub fn kubernetes(role: impl Into<String>) -> Self {
        VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            role: role.into(),
            jwt_path: PathBuf::from(KUBERNETES_JWT_PATH),
        }
    }
}

/// Builds a [`VaultCredentials`].
#[derive(Debug, Clone)]
pub struct VaultCredentialsBuilder {
    address: String,
    auth: VaultAuth,
    kv_mount: String,
    kv_path: String,
    client_id: Option<String>,
    ca_cert: Option<PathBuf>,
    reread_interval: Option<Duration>,
    timeout: Duration,
}

impl VaultCredentialsBuilder {
    /// The KV v2 mount (default `secret`).
    pub fn kv_mount(mut self, mount: impl Into<String>) -> Self {
        self.kv_mount = mount.into();
        self
    }

    /// A fixed client id, for secrets that hold only `client_secret`. A
    /// `client_id` field in the secret takes precedence.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// A PEM CA file for an `https` Vault address.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// Also re-read the secret when it is older than this (default: only
    /// when the auth service rejects it).
    pub fn reread_interval(mut self, every: Duration) -> Self {
        self.reread_interval = Some(every);
        self
    }

    /// Timeout of each Vault request (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Logs in, reads the secret once (so misconfiguration fails here) and
    /// starts the token keeper. Needs a Tokio runtime.
    pub async fn build(self) -> Result<VaultCredentials, CredentialsError> {
        let mut settings = VaultClientSettingsBuilder::default();
        url_check(&self.address)?;
        settings.address(&self.address).token("").timeout(Some(self.timeout));
        if let Some(ca) = &self.ca_cert {
            settings.ca_certs(vec![ca.display().to_string()]);
        }
        let settings = settings.build().map_err(|e| CredentialsError::Vault(format!("settings: {e}")))?;
        let client = VaultClient::new(settings).map_err(vault_err)?;
        let inner = Arc::new(Inner {
            client: RwLock::new(client),
            session: Mutex::new(Session::default()),
            cache: Mutex::new(None),
            cfg: self,
        });
        inner.login().await?;
        inner.read_secret().await?;
        let keeper = tokio::spawn(keep_token_alive(Arc::downgrade(&inner)));
        Ok(VaultCredentials { inner, keeper })
    }
}

fn url_check(address: &str) -> Result<(), CredentialsError> {
    // The vaultrs setter panics on a bad URL; refuse it first.
    let scheme_ok = address.starts_with("http://") || address.starts_with("https://");
    if scheme_ok && address.len() > "https://".len() && !address.contains(char::is_whitespace) {
        return Ok(());
    }
    Err(CredentialsError::Vault(format!("bad vault address {address:?}")))
}

/// Service credentials read from a Vault (or OpenBao) KV v2 secret holding
/// `client_id` and `client_secret` (feature `vault`).
///
/// The source logs in with AppRole, Kubernetes auth or a plain token, reads
/// one KV v2 secret holding `client_id` and `client_secret`, and keeps its
/// Vault token alive: a background task renews it at two thirds of its lease
/// and logs in again when renewal is refused or the token reaches its
/// maximum TTL. Before every read the token's expiry is checked too, so a
/// read never goes out with an expired token, and a `403` answer causes one
/// fresh login and one retry.
///
/// The secret is re-read when the token source reports that the auth service
/// rejected it (rotation), and, if configured, every
/// [`reread_interval`](VaultCredentialsBuilder::reread_interval).
///
/// ```no_run
/// # async fn f() -> Result<(), service_sdk::CredentialsError> {
/// use service_sdk::{SecretSource, VaultAuth, VaultCredentials};
/// let creds = VaultCredentials::builder(
///     "https://vault:8200",
///     VaultAuth::approle(
///         SecretSource::File("/vault/role_id".into()),
///         SecretSource::File("/vault/secret_id".into()),
///     ),
///     "services/order",
/// )
/// .build()
/// .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct VaultCredentials {
    inner: Arc<Inner>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for VaultCredentials {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl VaultCredentials {
    /// A builder for the secret at `kv_path` (in the `secret` KV v2 mount)
    /// of the Vault at `address`, logging in with `auth`.
    pub fn builder(address: impl Into<String>, auth: VaultAuth, kv_path: impl Into<String>) -> VaultCredentialsBuilder {
        VaultCredentialsBuilder {
            address: address.into(),
            auth,
            kv_mount: "secret".into(),
            kv_path: kv_path.into(),
            client_id: None,
            ca_cert: None,
            reread_interval: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// How many times the source has logged in to Vault (for monitoring).
    pub fn logins(&self) -> u64 {
        self.inner.session.lock().map(|s| s.logins).unwrap_or(0)
    }

    /// How many times the Vault token was renewed (for monitoring).
    pub fn renewals(&self) -> u64 {
        self.inner.session.lock().map(|s| s.renewals).unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct Session {
    /// When the current Vault token expires; `None` for a token without TTL.
    expires_at: Option<Instant>,
    /// When the keeper should act next.
    renew_at: Option<Instant>,
    renewable: bool,
    /// Lease granted at the last login, to notice a renewal capped by max TTL.
    lease: Duration,
    logins: u64,
    renewals: u64,
}

struct Inner {
    client: RwLock<VaultClient>,
    session: Mutex<Session>,
    cache: Mutex<Option<(ClientCredentials, Instant)>>,
    cfg: VaultCredentialsBuilder,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultCredentials").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Margin before a Vault token's expiry at which it is no longer used.
const TOKEN_MARGIN: Duration = Duration::from_secs(2);

fn vault_err(e: ClientError) -> CredentialsError {
    CredentialsError::Vault(match &e {
        ClientError::APIError { code, errors } => format!("status {code}: {}", errors.join("; ")),
        ClientError::RestClientError { source } => format!("{e}: {source}"),
        _ => e.to_string(),
    })
}

fn is_forbidden(e: &ClientError) -> bool {
    matches!(e, ClientError::APIError { code: 403, .. })
}

impl Inner {
    fn lock_session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs in (or adopts the configured token) and schedules renewal.
    async fn login(&self) -> Result<(), CredentialsError> {
        let mut client = self.client.write().await;
        let (lease, renewable) = match &self.cfg.auth {
            VaultAuth::Token(src) => {
                let token = src.read().await?;
                client.settings.token = token.expose().to_owned();
                client.middle.token = token.expose().to_owned();
                let info = vaultrs::token::lookup_self(&*client).await.map_err(vault_err)?;
                (info.ttl, info.renewable.unwrap_or(false))
            }
            VaultAuth::AppRole { mount, role_id, secret_id } => {
                let (r, s) = (role_id.read().await?, secret_id.read().await?);
                let info =
                    vaultrs::auth::approle::login(&*client, mount, r.expose(), s.expose()).await.map_err(vault_err)?;
                set_token(&mut client, &info.client_token);
                (info.lease_duration, info.renewable)
            }
            VaultAuth::Kubernetes { mount, role, jwt_path } => {
                let jwt = SecretSource::File(jwt_path.clone()).read().await?;
                let info =
                    vaultrs::auth::kubernetes::login(&*client, mount, role, jwt.expose()).await.map_err(vault_err)?;
                set_token(&mut client, &info.client_token);
                (info.lease_duration, info.renewable)
            }
        };
        drop(client);
        let now = Instant::now();
        let mut s = self.lock_session();
        s.logins += 1;
        s.renewable = renewable;
        s.lease = Duration::from_secs(lease);
        if lease == 0 {
            s.expires_at = None;
            s.renew_at = None;
        } else {
            s.expires_at = Some(now + s.lease);
            s.renew_at = Some(now + s.lease * 2 / 3);
        }
        tracing::debug!(lease_secs = lease, renewable, "logged in to vault");
        Ok(())
    }

    /// Renews the token; logs in again when renewal is refused or capped.
    async fn renew_or_login(&self) -> Result<(), CredentialsError> {
        let (renewable, lease) = {
            let s = self.lock_session();
            (s.renewable, s.lease)
        };
        if renewable {
            let client = self.client.read().await;
            let res = vaultrs::token::renew_self(&*client, None).await;
            drop(client);
            match res {
                Ok(info) if info.lease_duration > 0 => {
                    let granted = Duration::from_secs(info.lease_duration);
                    let now = Instant::now();
                    let mut s = self.lock_session();
                    s.renewals += 1;
                    s.expires_at = Some(now + granted);
                    // A renewal shorter than the login lease means the token is
                    // reaching its max TTL: log in again at two thirds of what
                    // is left rather than renewing again.
                    s.renew_at = Some(now + granted * 2 / 3);
                    s.renewable = granted >= lease / 2;
                    tracing::debug!(lease_secs = info.lease_duration, "vault token renewed");
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => tracing::info!(error = %vault_err(e), "vault token renewal refused; logging in again"),
            }
        }
        // For a configured token, "login" re-reads its source (a Vault Agent
        // sink may have written a new one).
        self.login().await
    }

    /// Makes sure the token is good for at least [`TOKEN_MARGIN`].
    async fn ensure_token(&self) -> Result<(), CredentialsError> {
        let stale = self.lock_session().expires_at.is_some_and(|e| e <= Instant::now() + TOKEN_MARGIN);
        if stale { self.login().await } else { Ok(()) }
    }

    async fn kv_read(&self) -> Result<serde_json::Map<String, serde_json::Value>, ClientError> {
        let client = self.client.read().await;
        vaultrs::kv2::read(&*client, &self.cfg.kv_mount, &self.cfg.kv_path).await
    }

    async fn read_secret(&self) -> Result<ClientCredentials, CredentialsError> {
        self.ensure_token().await?;
        let data = match self.kv_read().await {
            Err(e) if is_forbidden(&e) => {
                // The token may have been revoked behind our back.
                self.login().await?;
                self.kv_read().await.map_err(vault_err)?
            }
            other => other.map_err(vault_err)?,
        };
        let field = |k: &str| data.get(k).and_then(|v| v.as_str()).map(str::trim).filter(|v| !v.is_empty());
        let client_id = field("client_id")
            .map(str::to_owned)
            .or_else(|| self.cfg.client_id.clone())
            .ok_or_else(|| CredentialsError::Vault(format!("{} has no client_id", self.cfg.kv_path)))?;
        let secret = field("client_secret")
            .ok_or_else(|| CredentialsError::Vault(format!("{} has no client_secret", self.cfg.kv_path)))?;
        let creds = ClientCredentials::new(client_id, secret);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_some_and(|(old, _)| old != &creds) {
            tracing::info!(client_id = %creds.client_id, "service credentials rotated in vault");
        }
        *cache = Some((creds.clone(), Instant::now()));
        Ok(creds)
    }
}

fn set_token(client: &mut VaultClient, token: &str) {
    use vaultrs::client::Client as _;
    client.set_token(token);
}

/// Renews the Vault token ahead of expiry for as long as the source lives.
async fn keep_token_alive(inner: Weak<Inner>) {
    let mut failures = 0u32;
    loop {
        let Some(due) = inner.upgrade().map(|i| i.lock_session().renew_at) else { return };
        match due {
            Some(at) => tokio::time::sleep_until(at).await,
            // A token without TTL: check again later in case a login changes that.
            None => tokio::time::sleep(Duration::from_secs(60)).await,
        }
        let Some(i) = inner.upgrade() else { return };
        if due.is_none() && i.lock_session().renew_at.is_none() {
            continue;
        }
        match i.renew_or_login().await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait =
                    Duration::from_millis(500u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(60));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "vault login failed");
                let mut s = i.lock_session();
                s.renew_at = Some(Instant::now() + wait);
            }
        }
    }
}

#[async_trait]
impl Credentials for VaultCredentials {
    async fn current(&self) -> Result<ClientCredentials, CredentialsError> {
        let cached = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (cached, self.inner.cfg.reread_interval) {
            (Some((c, at)), Some(every)) if at.elapsed() < every => Ok(c),
            (Some((c, _)), None) => Ok(c),
            _ => self.inner.read_secret().await,
        }
    }

    async fn refresh(&self) -> Result<ClientCredentials, CredentialsError> {
        self.inner.read_secret().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_vault_addresses_are_refused_without_panicking() {
        assert!(url_check("vault:8200").is_err());
        assert!(url_check("http://").is_err());
        assert!(url_check("http://127.0.0.1:8200").is_ok());
    }

    #[tokio::test]
    async fn secret_sources_trim_and_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret_id");
        std::fs::write(&p, "abc\n").unwrap();
        assert_eq!(SecretSource::File(p).read().await.unwrap().expose(), "abc");
        let err = SecretSource::Env("SDK_TEST_SURELY_UNSET_VAR".into()).read().await.unwrap_err();
        assert!(err.to_string().contains("SDK_TEST_SURELY_UNSET_VAR"));
    }
}
