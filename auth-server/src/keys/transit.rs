//! Signing keys held in Vault (or OpenBao) Transit: the private key never
//! leaves Vault.
//!
//! [`TransitKeys`] signs through `transit/sign/<key>` (ECDSA P-256 with
//! `marshaling_algorithm = "jws"`, `hash_algorithm = "sha2-256"`, not
//! prehashed, so the signature is the JWS `R || S` form; Ed25519 keys work
//! too, as `EdDSA`). The JWK Set is built from Transit's public keys: every
//! version from `min_decryption_version` on, with `kid` = the RFC 7638
//! thumbprint.
//!
//! ## Rotation: publish before signing
//! After `transit/keys/<key>/rotate`, the new version must reach every
//! verifier's JWKS cache before any token is signed with it, or those
//! verifiers would refuse the tokens as `unknown kid`. So a version signs
//! only once it is `publish_grace_secs` old, measured from the
//! `creation_time` Transit records for it:
//!
//! - the signing version is the **newest version whose creation time is at
//!   least `publish_grace_secs` ago**; all versions (including the new one)
//!   are in the JWKS from the first refresh after the rotation;
//! - if no version is that old (a brand-new key), the oldest usable version
//!   signs;
//! - Transit's `min_encryption_version` is honoured: versions below it are
//!   never used to sign, so an operator can force a version into use at
//!   once (e.g. after a compromise) by raising it.
//!
//! Why the creation time rather than "when this replica first saw it":
//! every replica computes the same answer from the same Transit state, with
//! no coordination, and a restart does not reset the wait. Why not
//! `min_encryption_version` pinning alone: it needs an operator (or a job)
//! to raise it after the grace period, and forgetting it leaves the new key
//! unused forever. Choose `publish_grace_secs` at least `refresh_secs` (so
//! every replica publishes the version) plus the verifiers' JWKS refresh
//! interval (so every verifier fetched it).
//!
//! Each replica re-reads the key every `refresh_secs` in the background.
//! Vault login (a token, or AppRole from files or environment variables) is
//! renewed or repeated before the Vault token expires and after a `403`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use service_sdk::Claims;
use tokio::time::Instant;
use vaultrs::api::transit::requests::SignDataRequest;
use vaultrs::api::transit::responses::{ReadKeyData, ReadKeyResponse};
use vaultrs::api::transit::{HashAlgorithm, KeyType, MarshalingAlgorithm};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{KeyError, PublicKeys, SigningKeys, encoded_header, jwk_thumbprint, signing_input_with_header};
use crate::clock::{SharedClock, SystemClock};

/// `[keys.transit]`: where the Transit key lives and how to log in.
///
/// ```toml
/// [keys]
/// source = "transit"
///
/// [keys.transit]
/// address = "https://vault.internal:8200"
/// key = "auth-signing"            # an ecdsa-p256 (or ed25519) Transit key
/// # mount = "transit"
/// # publish_grace_secs = 600
/// # refresh_secs = 30
/// # ca_cert = "/etc/auth/vault-ca.pem"
///
/// [keys.transit.auth]
/// method = "approle"              # or "token"
/// role_id_file = "/vault/role_id"  # or role_id_env = "VAULT_ROLE_ID"
/// secret_id_file = "/vault/secret_id"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitConfig {
    /// Vault address, `http(s)://host:port`.
    pub address: String,
    /// Transit mount (default `transit`).
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The Transit key name.
    pub key: String,
    /// How to log in (default: a token from `VAULT_TOKEN`).
    #[serde(default)]
    pub auth: TransitAuth,
    /// A version signs only once it is this old (default 600 s), so that
    /// verifiers have fetched its public key before they meet its tokens.
    #[serde(default = "default_grace")]
    pub publish_grace_secs: u64,
    /// How often the key versions are re-read (default 30 s).
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
    /// PEM CA for an `https` address.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Timeout of each Vault request (default 5 s).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_mount() -> String {
    "transit".into()
}
fn default_grace() -> u64 {
    600
}
fn default_refresh() -> u64 {
    30
}
fn default_timeout() -> u64 {
    5
}

impl TransitConfig {
    /// Parses the `[keys.transit]` table.
    pub fn from_table(table: &toml::Table) -> Result<Self, KeyError> {
        table
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| KeyError::Config(format!("keys.transit: {}", e.message())))
    }
}

/// How [`TransitKeys`] logs in to Vault. Secrets are named by file or
/// variable, never written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum TransitAuth {
    /// A Vault token from a file or a variable (default `VAULT_TOKEN`).
    Token {
        /// File holding the token (a Vault Agent sink).
        #[serde(default)]
        token_file: Option<PathBuf>,
        /// Variable holding the token.
        #[serde(default)]
        token_env: Option<String>,
    },
    /// AppRole login.
    Approle {
        /// Auth mount (default `approle`).
        #[serde(default = "default_approle_mount")]
        mount: String,
        /// File holding the role id.
        #[serde(default)]
        role_id_file: Option<PathBuf>,
        /// Variable holding the role id.
        #[serde(default)]
        role_id_env: Option<String>,
        /// File holding the secret id.
        #[serde(default)]
        secret_id_file: Option<PathBuf>,
        /// Variable holding the secret id.
        #[serde(default)]
        secret_id_env: Option<String>,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}

impl Default for TransitAuth {
    fn default() -> Self {
        TransitAuth::Token { token_file: None, token_env: None }
    }
}

/// Reads a login secret from a file or a variable; the value never enters
/// an error message.
fn read_secret(
    what: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
    default_env: Option<&str>,
) -> Result<String, KeyError> {
    let value = if let Some(path) = file {
        std::fs::read_to_string(path).map_err(|e| KeyError::Config(format!("{what}: {}: {e}", path.display())))?
    } else {
        let var = env
            .as_deref()
            .or(default_env)
            .ok_or_else(|| KeyError::Config(format!("{what}: set a file or a variable")))?;
        std::env::var(var).map_err(|_| KeyError::Config(format!("{what}: variable {var} is not set")))?
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(KeyError::Config(format!("{what} is empty")));
    }
    Ok(value.to_owned())
}

/// One key version as published and used.
#[derive(Debug, Clone)]
struct Version {
    version: u64,
    created: u64,
    kid: String,
    /// base64url JWS protected header for this version.
    header: String,
}

/// What one read of the Transit key yields.
#[derive(Debug)]
struct View {
    alg: &'static str,
    /// Usable versions, ascending.
    versions: Vec<Version>,
    min_encryption: u64,
    public: Arc<PublicKeys>,
}

impl View {
    /// The signing version at `now` (see the module docs).
    fn signing(&self, now: u64, grace: u64) -> Option<&Version> {
        let usable = || self.versions.iter().filter(|v| v.version >= self.min_encryption);
        usable().rfind(|v| v.created.saturating_add(grace) <= now).or_else(|| usable().next())
    }
}

struct Session {
    expires_at: Option<Instant>,
    renew_at: Option<Instant>,
    renewable: bool,
}

/// Signing keys in Vault Transit (how versions are published, promoted and
/// retired is in the `keys::transit` module's source docs).
pub struct TransitKeys {
    cfg: TransitConfig,
    client: tokio::sync::RwLock<VaultClient>,
    session: Mutex<Session>,
    view: ArcSwap<View>,
    clock: SharedClock,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for TransitKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitKeys").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Drop for TransitKeys {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
    }
}

fn vault_err(e: ClientError) -> KeyError {
    match &e {
        ClientError::APIError { code, errors } if *code < 500 => {
            KeyError::Config(format!("vault status {code}: {}", errors.join("; ")))
        }
        ClientError::APIError { code, errors } => {
            KeyError::Unavailable(format!("vault status {code}: {}", errors.join("; ")))
        }
        ClientError::RestClientError { source } => KeyError::Unavailable(format!("vault: {source}")),
        other => KeyError::Unavailable(format!("vault: {other}")),
    }
}

fn is_forbidden(e: &ClientError) -> bool {
    matches!(e, ClientError::APIError { code: 403, .. })
}

impl TransitKeys {
    /// Logs in, reads the key once (so misconfiguration fails at start) and
    /// starts the background refresh. Uses the system clock.
    pub async fn open(cfg: TransitConfig) -> Result<Arc<Self>, KeyError> {
        Self::open_with_clock(cfg, Arc::new(SystemClock)).await
    }

    /// Like [`open`](Self::open) with an injected clock (for the publish
    /// grace period).
    pub async fn open_with_clock(cfg: TransitConfig, clock: SharedClock) -> Result<Arc<Self>, KeyError> {
        let scheme_ok = cfg.address.starts_with("http://") || cfg.address.starts_with("https://");
        if !scheme_ok || cfg.address.contains(char::is_whitespace) || cfg.address.len() <= "https://".len() {
            return Err(KeyError::Config(format!("keys.transit.address: bad URL {:?}", cfg.address)));
        }
        let mut settings = VaultClientSettingsBuilder::default();
        settings.address(&cfg.address).token("").timeout(Some(Duration::from_secs(cfg.timeout_secs.max(1))));
        if let Some(ca) = &cfg.ca_cert {
            settings.ca_certs(vec![ca.display().to_string()]);
        }
        let settings = settings.build().map_err(|e| KeyError::Config(format!("keys.transit: {e}")))?;
        let client = VaultClient::new(settings).map_err(vault_err)?;
        let placeholder = Arc::new(View {
            alg: "ES256",
            versions: Vec::new(),
            min_encryption: 0,
            public: Arc::new(PublicKeys::from_jwks(Vec::new())?),
        });
        let keys = Arc::new(Self {
            cfg,
            client: tokio::sync::RwLock::new(client),
            session: Mutex::new(Session { expires_at: None, renew_at: None, renewable: false }),
            view: ArcSwap::new(placeholder),
            clock,
            refresher: Mutex::new(None),
        });
        keys.login().await?;
        keys.refresh().await?;
        let handle =
            tokio::spawn(refresh_loop(Arc::downgrade(&keys), Duration::from_secs(keys.cfg.refresh_secs.max(1))));
        if let Ok(mut r) = keys.refresher.lock() {
            *r = Some(handle);
        }
        Ok(keys)
    }

    fn lock_session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn login(&self) -> Result<(), KeyError> {
        let mut client = self.client.write().await;
        let (lease, renewable) = match &self.cfg.auth {
            TransitAuth::Token { token_file, token_env } => {
                let token = read_secret("vault token", token_file, token_env, Some("VAULT_TOKEN"))?;
                set_token(&mut client, &token);
                let info = vaultrs::token::lookup_self(&*client).await.map_err(vault_err)?;
                (info.ttl, info.renewable.unwrap_or(false))
            }
            TransitAuth::Approle { mount, role_id_file, role_id_env, secret_id_file, secret_id_env } => {
                let role_id = read_secret("approle role_id", role_id_file, role_id_env, None)?;
                let secret_id = read_secret("approle secret_id", secret_id_file, secret_id_env, None)?;
                let info =
                    vaultrs::auth::approle::login(&*client, mount, &role_id, &secret_id).await.map_err(vault_err)?;
                set_token(&mut client, &info.client_token);
                (info.lease_duration, info.renewable)
            }
        };
        drop(client);
        let now = Instant::now();
        let mut s = self.lock_session();
        s.renewable = renewable;
        if lease == 0 {
            s.expires_at = None;
            s.renew_at = None;
        } else {
            s.expires_at = Some(now + Duration::from_secs(lease));
            s.renew_at = Some(now + Duration::from_secs(lease) * 2 / 3);
        }
        Ok(())
    }

    /// Renews (or replaces) the Vault token when two thirds of its lease
    /// have passed.
    async fn ensure_token(&self) -> Result<(), KeyError> {
        let (due, renewable, expired) = {
            let s = self.lock_session();
            let now = Instant::now();
            (
                s.renew_at.is_some_and(|r| now >= r),
                s.renewable,
                s.expires_at.is_some_and(|e| now + Duration::from_secs(1) >= e),
            )
        };
        if !due {
            return Ok(());
        }
        if renewable && !expired {
            let res = {
                let client = self.client.read().await;
                vaultrs::token::renew_self(&*client, None).await
            };
            if let Ok(info) = res
                && info.lease_duration > 0
            {
                let now = Instant::now();
                let granted = Duration::from_secs(info.lease_duration);
                let mut s = self.lock_session();
                s.expires_at = Some(now + granted);
                s.renew_at = Some(now + granted * 2 / 3);
                return Ok(());
            }
        }
        self.login().await
    }

    /// Re-reads the key's versions and rebuilds the JWK Set. Called in the
    /// background every `refresh_secs`; call it directly to pick up a
    /// rotation at once.
    pub async fn refresh(&self) -> Result<(), KeyError> {
        self.ensure_token().await?;
        let read = {
            let client = self.client.read().await;
            vaultrs::transit::key::read(&*client, &self.cfg.mount, &self.cfg.key).await
        };
        let info = match read {
            Err(e) if is_forbidden(&e) => {
                self.login().await?;
                let client = self.client.read().await;
                vaultrs::transit::key::read(&*client, &self.cfg.mount, &self.cfg.key).await.map_err(vault_err)?
            }
            other => other.map_err(vault_err)?,
        };
        let view = build_view(&info)?;
        let old = self.view.load();
        if old.versions.len() != view.versions.len() {
            tracing::info!(
                key = %self.cfg.key,
                versions = view.versions.len(),
                latest = view.versions.last().map_or(0, |v| v.version),
                "transit key versions published"
            );
        }
        self.view.store(Arc::new(view));
        Ok(())
    }

    /// The version that signs now, and its kid (for operators and tests).
    pub fn signing_version(&self) -> Option<(u64, String)> {
        let view = self.view.load();
        view.signing(self.clock.now_unix(), self.cfg.publish_grace_secs).map(|v| (v.version, v.kid.clone()))
    }

    async fn sign_with(&self, version: u64, input: &str) -> Result<String, ClientError> {
        let mut opts = SignDataRequest::builder();
        opts.key_version(version)
            .hash_algorithm(HashAlgorithm::Sha2_256)
            .prehashed(false)
            .marshaling_algorithm(MarshalingAlgorithm::Jws);
        let client = self.client.read().await;
        let encoded = STANDARD.encode(input.as_bytes());
        let resp =
            vaultrs::transit::data::sign(&*client, &self.cfg.mount, &self.cfg.key, &encoded, Some(&mut opts)).await?;
        Ok(resp.signature)
    }
}

fn set_token(client: &mut VaultClient, token: &str) {
    use vaultrs::client::Client as _;
    client.set_token(token);
}

/// Turns Transit's `vault:v<N>:<sig>` into a base64url JWS signature.
fn jws_signature(alg: &str, version: u64, transit_sig: &str) -> Result<String, KeyError> {
    let prefix = format!("vault:v{version}:");
    let sig = transit_sig
        .strip_prefix(&prefix)
        .ok_or_else(|| KeyError::Sign("transit signed with an unexpected key version".into()))?;
    let raw = match alg {
        // JWS marshaling returns base64url already; normalise padding.
        "ES256" => URL_SAFE_NO_PAD
            .decode(sig.trim_end_matches('='))
            .map_err(|_| KeyError::Sign("transit signature is not base64url".into()))?,
        _ => STANDARD.decode(sig).map_err(|_| KeyError::Sign("transit signature is not base64".into()))?,
    };
    // Both ES256 (R || S) and Ed25519 signatures are 64 bytes.
    if raw.len() != 64 {
        return Err(KeyError::Sign(format!("transit signature has {} bytes, expected 64", raw.len())));
    }
    Ok(URL_SAFE_NO_PAD.encode(raw))
}

/// DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo, before the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    STANDARD.decode(b64).ok()
}

/// The public JWK (without kid) of one Transit public key.
fn public_jwk(alg: &str, public_key: &str) -> Result<serde_json::Value, KeyError> {
    let bad = || KeyError::Config(format!("transit returned an unexpected {alg} public key"));
    match alg {
        "ES256" => {
            let der = pem_body(public_key).ok_or_else(bad)?;
            let point = der.strip_prefix(&P256_SPKI_PREFIX[..]).ok_or_else(bad)?;
            if point.len() != 65 || point[0] != 0x04 {
                return Err(bad());
            }
            Ok(serde_json::json!({
                "kty": "EC", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            }))
        }
        "EdDSA" => {
            let raw = if public_key.starts_with("-----BEGIN") {
                let der = pem_body(public_key).ok_or_else(bad)?;
                der.strip_prefix(&ED25519_SPKI_PREFIX[..]).ok_or_else(bad)?.to_vec()
            } else {
                STANDARD.decode(public_key.trim()).map_err(|_| bad())?
            };
            if raw.len() != 32 {
                return Err(bad());
            }
            Ok(serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(raw) }))
        }
        _ => Err(bad()),
    }
}

/// Seconds since the Unix epoch of an RFC 3339 timestamp such as
/// `2026-11-27T05:55:54.518123Z` or `...+01:00`.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec - offset).ok()
}

fn build_view(info: &ReadKeyResponse) -> Result<View, KeyError> {
    let alg = match info.key_type {
        KeyType::EcdsaP256 => "ES256",
        KeyType::Ed25519 => "EdDSA",
        _ => return Err(KeyError::Config("the transit key must be of type ecdsa-p256 or ed25519".into())),
    };
    if !info.supports_signing {
        return Err(KeyError::Config("the transit key does not support signing".into()));
    }
    let ReadKeyData::Asymmetric(keys) = &info.keys else {
        return Err(KeyError::Config("transit returned no public keys".into()));
    };
    let mut versions = Vec::with_capacity(keys.len());
    let mut jwks = Vec::with_capacity(keys.len());
    for (v, entry) in keys {
        let version: u64 = v.parse().map_err(|_| KeyError::Config(format!("bad transit key version {v:?}")))?;
        if version < info.min_decryption_version {
            continue;
        }
        let created = parse_rfc3339(&entry.creation_time)
            .ok_or_else(|| KeyError::Config(format!("bad transit creation_time for version {version}")))?;
        let mut jwk = public_jwk(alg, &entry.public_key)?;
        let kid = jwk_thumbprint(&jwk);
        jwk["kid"] = serde_json::Value::String(kid.clone());
        jwk["alg"] = serde_json::Value::String(alg.into());
        jwk["use"] = serde_json::Value::String("sig".into());
        jwks.push((version, jwk));
        versions.push(Version { version, created, header: encoded_header(alg, &kid), kid });
    }
    if versions.is_empty() {
        return Err(KeyError::Config("the transit key has no usable version".into()));
    }
    versions.sort_by_key(|v| v.version);
    jwks.sort_by_key(|(v, _)| *v);
    let public = Arc::new(PublicKeys::from_jwks(jwks.into_iter().map(|(_, j)| j).collect())?);
    Ok(View { alg, versions, min_encryption: info.min_encryption_version, public })
}

async fn refresh_loop(keys: Weak<TransitKeys>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(k) = keys.upgrade() else { return };
        if let Err(e) = k.refresh().await {
            tracing::warn!(error = %e, "transit key refresh failed; keeping the published keys");
        }
    }
}

#[async_trait]
impl SigningKeys for TransitKeys {
    async fn sign(&self, claims: &Claims) -> Result<String, KeyError> {
        self.ensure_token().await?;
        for attempt in 0..2 {
            let view = self.view.load_full();
            let v = view
                .signing(self.clock.now_unix(), self.cfg.publish_grace_secs)
                .ok_or_else(|| KeyError::Config("no transit key version may sign".into()))?;
            let input = signing_input_with_header(&v.header, claims)?;
            match self.sign_with(v.version, &input).await {
                Ok(sig) => {
                    let sig = jws_signature(view.alg, v.version, &sig)?;
                    return Ok(format!("{input}.{sig}"));
                }
                Err(e) if attempt == 0 && is_forbidden(&e) => self.login().await?,
                // The version may have been retired (min_encryption_version
                // raised): re-read the key and try once more.
                Err(ClientError::APIError { code: 400, .. }) if attempt == 0 => self.refresh().await?,
                Err(e) => return Err(vault_err(e)),
            }
        }
        Err(KeyError::Unavailable("transit signing failed after a retry".into()))
    }

    fn public_keys(&self) -> Arc<PublicKeys> {
        Arc::clone(&self.view.load().public)
    }

    fn signing_kid(&self) -> Option<String> {
        self.signing_version().map(|(_, kid)| kid)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_parse_with_fractions_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-27T05:55:54.518123456Z"), Some(1_795_758_954));
        assert_eq!(parse_rfc3339("2026-11-27T06:55:54+01:00"), Some(1_795_758_954));
        assert_eq!(parse_rfc3339("2000-02-29T12:00:00Z"), Some(951_825_600));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
    }

    fn view(created: &[u64], min_encryption: u64) -> View {
        View {
            alg: "ES256",
            versions: created
                .iter()
                .enumerate()
                .map(|(i, c)| Version {
                    version: i as u64 + 1,
                    created: *c,
                    kid: format!("k{}", i + 1),
                    header: String::new(),
                })
                .collect(),
            min_encryption,
            public: Arc::new(PublicKeys::from_jwks(Vec::new()).unwrap()),
        }
    }

    #[test]
    fn new_version_signs_only_after_the_publish_grace() {
        let v = view(&[1_000, 5_000], 0);
        assert_eq!(v.signing(5_000, 600).unwrap().version, 1);
        assert_eq!(v.signing(5_599, 600).unwrap().version, 1);
        assert_eq!(v.signing(5_600, 600).unwrap().version, 2);
    }

    #[test]
    fn brand_new_key_signs_with_its_only_version() {
        let v = view(&[5_000], 0);
        assert_eq!(v.signing(5_000, 600).unwrap().version, 1);
    }

    #[test]
    fn min_encryption_version_forces_a_version_into_use() {
        let v = view(&[1_000, 5_000], 2);
        assert_eq!(v.signing(5_000, 600).unwrap().version, 2);
    }

    #[test]
    fn p256_public_key_pem_becomes_a_jwk() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let point = kp.public_key().as_ref().to_vec();
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&point);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&der));
        let jwk = public_jwk("ES256", &pem).unwrap();
        assert_eq!(jwk["x"], URL_SAFE_NO_PAD.encode(&point[1..33]));
        assert_eq!(jwk["y"], URL_SAFE_NO_PAD.encode(&point[33..]));
        assert!(public_jwk("ES256", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
    }

    #[test]
    fn transit_signatures_must_name_the_requested_version() {
        let sig = URL_SAFE_NO_PAD.encode([7u8; 64]);
        assert_eq!(jws_signature("ES256", 2, &format!("vault:v2:{sig}")).unwrap(), sig);
        assert!(jws_signature("ES256", 3, &format!("vault:v2:{sig}")).is_err());
        let ed = STANDARD.encode([9u8; 64]);
        assert_eq!(jws_signature("EdDSA", 1, &format!("vault:v1:{ed}")).unwrap(), URL_SAFE_NO_PAD.encode([9u8; 64]));
    }

    #[test]
    fn transit_config_reads_the_keys_transit_table() {
        let table: toml::Table = toml::from_str(
            "address = \"http://127.0.0.1:8200\"\nkey = \"auth\"\n[auth]\nmethod = \"approle\"\nrole_id_env = \"R\"\nsecret_id_file = \"/s\"\n",
        )
        .unwrap();
        let cfg = TransitConfig::from_table(&table).unwrap();
        assert_eq!(cfg.mount, "transit");
        assert_eq!(cfg.publish_grace_secs, 600);
        assert!(matches!(cfg.auth, TransitAuth::Approle { ref mount, .. } if mount == "approle"));
        let bad: toml::Table = toml::from_str("address = \"x\"\nkey = \"k\"\ntypo = 1\n").unwrap();
        assert!(TransitConfig::from_table(&bad).is_err());
    }
}
