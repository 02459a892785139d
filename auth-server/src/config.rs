//! Configuration: a TOML file, `AUTH_*` environment overrides (nested keys
//! joined by `__`, e.g. `AUTH_TLS__CERT`), then CLI flags. Validated once at
//! start-up; every error names the key and the problem. Relative paths are
//! resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::keys::KeyAlg;

/// The largest exchange TTL any configuration may allow (10 minutes).
pub const EXCHANGE_TTL_HARD_CAP_SECS: u64 = 600;

/// The whole server configuration. `Debug` redacts the password of a
/// Redis URL.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `iss` of every token.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// gRPC (mTLS) listen address.
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: SocketAddr,
    /// HTTP side port: JWKS, health, readiness.
    #[serde(default = "default_http_addr")]
    pub http_addr: SocketAddr,
    /// `memory`, or a Redis URL (`redis://`, `rediss://`).
    #[serde(default = "default_store")]
    pub store: String,
    /// Users file (password grant).
    pub users_file: PathBuf,
    /// Service accounts file.
    pub accounts_file: PathBuf,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// mTLS material.
    pub tls: TlsConfig,
    /// Signing keys.
    pub keys: KeysConfig,
    /// Token lifetimes and policy limits.
    #[serde(default)]
    pub tokens: TokensConfig,
    /// Redis settings (used when `store` is a Redis URL).
    #[serde(default)]
    pub redis: RedisConfig,
    /// WatchRevocations settings.
    #[serde(default)]
    pub watch: WatchConfig,
}

/// mTLS files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// Where signing keys come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// `file` (default) or `transit`.
    #[serde(default = "default_key_source")]
    pub source: String,
    /// The active signing key (file source).
    #[serde(default)]
    pub signing: Option<KeyFile>,
    /// Verify-only keys published ahead of a rotation (file source).
    #[serde(default)]
    pub publish: Vec<KeyFile>,
    /// Vault Transit settings (transit source).
    #[serde(default)]
    pub transit: Option<toml::Table>,
}

/// One PKCS#8 PEM key file and its algorithm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Path to the PEM file.
    pub path: PathBuf,
    /// `ES256` (default), `EdDSA`, `RS256` or `PS256`.
    #[serde(default)]
    pub alg: KeyAlg,
}

/// Token lifetimes and policy limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// Lifetime of Login access tokens.
    pub access_ttl_secs: u64,
    /// Lifetime of refresh tokens (each rotation starts a new one).
    pub refresh_ttl_secs: u64,
    /// ExchangeToken default lifetime.
    pub exchange_default_ttl_secs: u64,
    /// ExchangeToken maximum lifetime (at most 600).
    pub exchange_max_ttl_secs: u64,
    /// Deepest `act` chain an exchanged token may carry.
    pub max_act_depth: usize,
    /// Audiences a user may log in for.
    pub user_audiences: Vec<String>,
    /// The permission that allows revoking anyone's tokens.
    pub admin_perm: String,
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            access_ttl_secs: 900,
            refresh_ttl_secs: 86_400,
            exchange_default_ttl_secs: 300,
            exchange_max_ttl_secs: EXCHANGE_TTL_HARD_CAP_SECS,
            max_act_depth: 4,
            user_audiences: Vec::new(),
            admin_perm: "auth:admin".into(),
        }
    }
}

/// Redis connection settings. `Debug` redacts the URL's password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// The Redis URL (filled from `store`).
    #[serde(skip)]
    pub url: String,
    /// Key prefix, so several deployments can share one Redis.
    pub prefix: String,
    /// Connection pool size.
    pub pool_size: usize,
    /// Per-command timeout.
    pub command_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: String::new(), prefix: "auth".into(), pool_size: 4, command_timeout_ms: 2000 }
    }
}

/// WatchRevocations settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Heartbeat interval on idle streams.
    pub heartbeat_secs: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { heartbeat_secs: 5 }
    }
}

/// A Redis URL with any userinfo password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{user}:***@{host}")
        }
        None => authority.to_owned(),
    };
    match path {
        Some(p) => format!("{scheme}://{authority}/{p}"),
        None => format!("{scheme}://{authority}"),
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("issuer", &self.issuer)
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("store", &redact_url(&self.store))
            .field("users_file", &self.users_file)
            .field("accounts_file", &self.accounts_file)
            .field("log_format", &self.log_format)
            .field("tls", &self.tls)
            .field("keys", &self.keys)
            .field("tokens", &self.tokens)
            .field("redis", &self.redis)
            .field("watch", &self.watch)
            .finish()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .finish()
    }
}

fn default_issuer() -> String {
    "auth-service".into()
}
fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_http_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_store() -> String {
    "memory".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_key_source() -> String {
    "file".into()
}

/// A configuration error, naming the key and the problem.
#[derive(Debug, thiserror::Error)]
#[error("config: {key}: {problem}")]
pub struct ConfigError {
    /// The offending key (dotted path) or file.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { key: key.into(), problem: problem.into() }
    }
}

/// Command-line overrides, applied last.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    /// `--grpc-addr`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_addr: Option<SocketAddr>,
    /// `--http-addr`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<SocketAddr>,
    /// `--store`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// `--log-format`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
}

impl Config {
    /// Loads `path`, applies `AUTH_*` environment overrides and `overrides`,
    /// resolves relative paths and validates.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::new(path.display().to_string(), "config file not found"));
        }
        let figment = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("AUTH_").split("__"))
            .merge(Serialized::defaults(overrides));
        Self::from_figment(figment, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses TOML text (no environment), resolving paths against `base`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(text)), base)
    }

    fn from_figment(figment: Figment, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let key = if key.is_empty() { "config".to_owned() } else { key };
            ConfigError::new(key, e.kind.to_string())
        })?;
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.users_file);
        fix(&mut self.accounts_file);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        if let Some(k) = &mut self.keys.signing {
            fix(&mut k.path);
        }
        for k in &mut self.keys.publish {
            fix(&mut k.path);
        }
    }

    /// Checks every value; the first problem found is returned.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::new("issuer", "must not be empty"));
        }
        if self.store != "memory" {
            if !(self.store.starts_with("redis://")
                || self.store.starts_with("rediss://")
                || self.store.starts_with("redis-sentinel://")
                || self.store.starts_with("redis-cluster://"))
            {
                return Err(ConfigError::new("store", "must be \"memory\" or a redis:// or rediss:// URL"));
            }
            self.redis.url = self.store.clone();
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::new("log_format", "must be \"text\" or \"json\""));
        }
        match self.keys.source.as_str() {
            "file" => {
                if self.keys.signing.is_none() {
                    return Err(ConfigError::new("keys.signing", "required when keys.source = \"file\""));
                }
            }
            "transit" => {
                if self.keys.transit.is_none() {
                    return Err(ConfigError::new("keys.transit", "required when keys.source = \"transit\""));
                }
            }
            _ => return Err(ConfigError::new("keys.source", "must be \"file\" or \"transit\"")),
        }
        let t = &self.tokens;
        if t.access_ttl_secs == 0 || t.access_ttl_secs > 86_400 {
            return Err(ConfigError::new("tokens.access_ttl_secs", "must be between 1 and 86400"));
        }
        if t.refresh_ttl_secs < t.access_ttl_secs {
            return Err(ConfigError::new("tokens.refresh_ttl_secs", "must be at least tokens.access_ttl_secs"));
        }
        if t.exchange_max_ttl_secs == 0 || t.exchange_max_ttl_secs > EXCHANGE_TTL_HARD_CAP_SECS {
            return Err(ConfigError::new(
                "tokens.exchange_max_ttl_secs",
                format!("must be between 1 and {EXCHANGE_TTL_HARD_CAP_SECS}"),
            ));
        }
        if t.exchange_default_ttl_secs == 0 || t.exchange_default_ttl_secs > t.exchange_max_ttl_secs {
            return Err(ConfigError::new(
                "tokens.exchange_default_ttl_secs",
                "must be between 1 and tokens.exchange_max_ttl_secs",
            ));
        }
        if t.max_act_depth == 0 || t.max_act_depth > 16 {
            return Err(ConfigError::new("tokens.max_act_depth", "must be between 1 and 16"));
        }
        if t.admin_perm.is_empty() {
            return Err(ConfigError::new("tokens.admin_perm", "must not be empty"));
        }
        if self.redis.pool_size == 0 || self.redis.pool_size > 128 {
            return Err(ConfigError::new("redis.pool_size", "must be between 1 and 128"));
        }
        if self.redis.command_timeout_ms == 0 {
            return Err(ConfigError::new("redis.command_timeout_ms", "must be positive"));
        }
        if self.watch.heartbeat_secs == 0 || self.watch.heartbeat_secs > 60 {
            return Err(ConfigError::new("watch.heartbeat_secs", "must be between 1 and 60"));
        }
        for (key, path) in [
            ("users_file", &self.users_file),
            ("accounts_file", &self.accounts_file),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if !path.is_file() {
                return Err(ConfigError::new(key, format!("file not found: {}", path.display())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> String {
        for f in ["u.toml", "a.toml", "c.pem", "k.pem", "ca.pem", "s.pem"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        r#"
users_file = "u.toml"
accounts_file = "a.toml"
[tls]
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"
[keys]
signing = { path = "s.pem" }
"#
        .to_owned()
    }

    #[test]
    fn defaults_apply_and_paths_resolve_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!(cfg.issuer, "auth-service");
        assert_eq!(cfg.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(cfg.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.store, "memory");
        assert_eq!(cfg.tokens.exchange_default_ttl_secs, 300);
        assert_eq!(cfg.users_file, dir.path().join("u.toml"));
    }

    #[test]
    fn debug_redacts_the_redis_password() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()).replace("[tls]", "store = \"redis://app:hunter2@redis:6379/0\"\n[tls]");
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://app:***@redis:6379/0"), "{shown}");
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()) + "[tokens]\nexchange_max_ttl_secs = 601\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.key, "tokens.exchange_max_ttl_secs");
        let text = base(dir.path()).replace("users_file = \"u.toml\"", "users_file = \"missing.toml\"");
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().key, "users_file");
        let text = base(dir.path()).replace("[tls]", "store = \"postgres://x\"\n[tls]");
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().key, "store");
        let text = base(dir.path()).replace("[tls]", "stroe = 1\n[tls]");
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert!(err.to_string().contains("stroe"), "{err}");
    }
}
