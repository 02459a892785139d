//! Configuration: a TOML file, `AUTH_SERVER_*` environment overrides
//! ([`EnvOverrides`]: nested keys joined by `__`, e.g.
//! `AUTH_SERVER_TLS__CERT`), then CLI flags.
//!
//! The prefix is the server's own: the SDK's variables (`AUTH_URL`,
//! `AUTH_TLS_*`, `AUTH_CREDENTIALS_FILE`, ...) are not read, and neither are
//! `AUTH_SERVER_CONFIG` (the config file's path, for `serve`) and the SDK's
//! `AUTH_SERVER_ID`. An error caused by a variable names the variable.
//!
//! What figment reads is a [`RawConfig`]: plain serde data, unknown keys
//! refused. [`Config::from_raw`] turns it into a [`Config`], checking every
//! value and collecting every problem into one [`ConfigErrors`] (each naming
//! its key). Relative paths, including those of `[keys.transit]`, resolve
//! against the config file's directory.
//!
//! A [`Config`] has two parts:
//! - settings that need a restart ([`Config::RESTART_KEYS`]): the listen
//!   addresses, `issuer`, `[tls]` (its paths and settings: the files
//!   themselves are re-read when they change, see [`crate::tls::ServerTls`]),
//!   the store, the log format, `watch`, `limits`, `otel` (trace export;
//!   the standard `OTEL_*` variables fill what the file leaves unset);
//! - the reloadable policy: `tokens`, the users and accounts files and the
//!   signing keys (`keys`). `Server::reload` re-reads the file and swaps the
//!   policy built from them (see [`crate::core::Policy`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use service_sdk::FeedOptions;
use service_sdk::verify::MAX_LEEWAY_SECS;

use crate::keys::{KeyAlg, TransitAuth, TransitConfig};
pub use crate::telemetry::OtelConfig;

/// The largest exchange TTL any configuration may allow (10 minutes).
pub const EXCHANGE_TTL_HARD_CAP_SECS: u64 = 600;
/// The longest refresh-reuse grace window a configuration may set.
pub const MAX_REFRESH_REUSE_GRACE_SECS: u64 = 300;

/// The longest `watch.heartbeat_secs`: a third of the SDK's default stale
/// bound, so an idle stream is heard from at least three times before a
/// verifier with default options gives up on it.
pub fn max_heartbeat_secs() -> u64 {
    FeedOptions::default().stale_after.as_secs() / 3
}

// ---------------------------------------------------------------------------
// The raw form: what the file, the environment and the flags say.

/// The configuration as read, before validation. Field names are the TOML
/// keys. `Debug` redacts the password of a Redis URL.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The `iss` of every token.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// gRPC (mTLS) listen address.
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: String,
    /// HTTP side port: JWKS, health, readiness.
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// The side port's public base URL (e.g. `https://auth.example.com`),
    /// used for the absolute URLs it publishes (`jwks_uri` in the discovery
    /// document). Default: `http://` (`https://` with `[http_tls]`) and the
    /// address the side port is bound to.
    #[serde(default)]
    pub http_public_url: Option<String>,
    /// Serve the side port over TLS.
    #[serde(default)]
    pub http_tls: Option<HttpTlsConfig>,
    /// `memory`, or a Redis URL (`redis://`, `rediss://`,
    /// `redis-sentinel://`, `redis-cluster://`).
    #[serde(default = "default_store")]
    pub store: String,
    /// Users file (password grant).
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// Service accounts file.
    #[serde(default)]
    pub accounts_file: Option<PathBuf>,
    /// How often, in seconds, the users and accounts files are checked for
    /// changed contents (0: only on SIGHUP).
    #[serde(default = "default_reload_check_secs")]
    pub reload_check_secs: u64,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// mTLS material.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Signing keys.
    #[serde(default)]
    pub keys: RawKeysConfig,
    /// Token lifetimes and policy limits.
    #[serde(default)]
    pub tokens: TokensConfig,
    /// Redis settings (used when `store` is a Redis URL).
    #[serde(default)]
    pub redis: RedisConfig,
    /// WatchRevocations settings.
    #[serde(default)]
    pub watch: WatchConfig,
    /// Limits of both ports (connections, streams, time) and against floods
    /// (the password pool, login back-off, per-client rate limits).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// OpenTelemetry trace export (off unless an endpoint is set here or in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[serde(default)]
    pub otel: OtelConfig,
}

/// The audit trail (`[audit]`; restart): one JSON line per token issued,
/// call refused, revocation, refresh reuse and key set loaded. See
/// docs/OPERATIONS.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write the audit trail at all.
    pub enabled: bool,
    /// Append to this file (created with mode 0600; relative to the config
    /// file's directory) instead of standard output.
    pub path: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { enabled: true, path: None }
    }
}

/// `[keys]` as read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeysConfig {
    /// `file` (default) or `transit`.
    #[serde(default)]
    pub source: Option<String>,
    /// The active signing key (file source).
    #[serde(default)]
    pub signing: Option<KeyFile>,
    /// Verify-only keys published ahead of a rotation (file source).
    #[serde(default)]
    pub publish: Vec<KeyFile>,
    /// `[keys.transit]` (transit source), parsed by validation.
    #[serde(default)]
    pub transit: Option<toml::Table>,
    /// `Cache-Control: max-age` of the HTTP JWKS and discovery document
    /// (default 60). Must stay below the pre-publication window, so that
    /// an HTTP cache holds a new key before it signs.
    #[serde(default)]
    pub jwks_max_age_secs: Option<u64>,
    /// File keys: how long a key is published (under `keys.publish`) before
    /// it becomes `keys.signing`, the wait at step 2 of the rotation
    /// (default: the SDK's JWKS refresh interval, 300 s). With Transit the
    /// window is `keys.transit.publish_grace_secs - refresh_secs`.
    #[serde(default)]
    pub prepublish_secs: Option<u64>,
    /// Start even when other users can read or write a private key file
    /// (`keys.signing`, `keys.publish`, `tls.key`, `http_tls.key`), with a warning instead
    /// of a refusal. See docs/OPERATIONS.md, "Key file modes".
    #[serde(default)]
    pub allow_readable_key_files: bool,
}

/// Default of `keys.jwks_max_age_secs`.
pub const DEFAULT_JWKS_MAX_AGE_SECS: u64 = 60;

/// Default of `keys.prepublish_secs`: the JWKS refresh interval of the
/// SDK's verifiers, the least a pre-published key must wait.
pub fn default_prepublish_secs() -> u64 {
    service_sdk::JwksOptions::default().refresh_interval.as_secs()
}

/// TLS of the HTTP side port (`[http_tls]`): its certificate and key, and
/// optionally a CA that client certificates must chain to. The files are
/// checked and reloaded like `[tls]`'s, on `tls.reload_check_secs`, and
/// their expiry is warned about after `tls.expiry_warn_days`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate chained to this CA
    /// bundle (PEM); otherwise any client may connect, as over plain HTTP.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// mTLS files, re-read when they change (see `reload_check_secs`) and on
/// SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// How often (seconds) the three files (and `[http_tls]`'s) are read and
    /// compared with the running set (by content, so a Kubernetes Secret volume's symlink
    /// swap counts); a changed set is validated and swapped in for new
    /// handshakes. 0: only on SIGHUP.
    #[serde(default = "default_tls_reload_check_secs")]
    pub reload_check_secs: u64,
    /// A warning is logged while the server certificate has fewer than this
    /// many days left (at start-up, after each reload, then hourly). 0: no
    /// early warning; an expired certificate is still reported.
    #[serde(default = "default_tls_expiry_warn_days")]
    pub expiry_warn_days: u64,
}

/// Default of `tls.reload_check_secs`.
pub const DEFAULT_TLS_RELOAD_CHECK_SECS: u64 = 10;
/// Default of `tls.expiry_warn_days`: below cert-manager's usual renewal
/// window (10 days before expiry for the deploy's 30-day certificates), so
/// the warning means renewal has failed for days.
pub const DEFAULT_TLS_EXPIRY_WARN_DAYS: u64 = 7;

fn default_tls_reload_check_secs() -> u64 {
    DEFAULT_TLS_RELOAD_CHECK_SECS
}
fn default_tls_expiry_warn_days() -> u64 {
    DEFAULT_TLS_EXPIRY_WARN_DAYS
}

/// One PKCS#8 PEM key file and its algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Path to the PEM file.
    pub path: PathBuf,
    /// `ES256` (default), `EdDSA`, `RS256` or `PS256`.
    #[serde(default)]
    pub alg: KeyAlg,
}

/// Token lifetimes and policy limits (`[tokens]`; reloadable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The audience that addresses the auth service itself (empty: the
    /// `issuer`). Only a token for this audience alone, without `act`, may
    /// end a session or revoke another token of its subject (or, with
    /// `admin_perm`, anyone's). Users may always log in for it, alone;
    /// services need it on their allow-list.
    pub self_audience: String,
    /// How long after a refresh token was spent a retry with it still gets
    /// a new pair instead of revoking the family (0 = off, the default). A
    /// retry in the window replaces the successor issued moments before,
    /// which stops working; a reuse after the window revokes the family.
    pub refresh_reuse_grace_secs: u64,
    /// The largest clock leeway any verifier applies to `exp` (the SDK's
    /// default is 30 s, its maximum 300 s). A revoked token stays on the
    /// deny list this long past its `exp`, since verifiers accept it until
    /// then.
    pub verifier_leeway_secs: u64,
    /// Which issued access tokens the store records (`none`, the default;
    /// `sessions`; `all`). Revocation needs no record (see
    /// [`RecordIssued`]); a registry serves audit or listing, and lets an
    /// owner revoke another of its tokens by `jti` alone.
    pub record_issued: RecordIssued,
}

/// `tokens.record_issued`: which issued access tokens the store records in
/// its registry of `jti`s. Every record is one store write per token and
/// one entry per live token.
///
/// No token needs a record to be revocable: a user's tokens end with their
/// session (`sid`); any token is revoked by presenting it (it carries its
/// own `exp` and `sub`); an admin's `Revoke{jti}` deny-lists the `jti` for
/// the longest a token can live. What a record adds is that an owner may
/// revoke another of its tokens by `jti` without presenting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordIssued {
    /// Record nothing (the default): issuing a token touches no store.
    #[default]
    None,
    /// Record the tokens of login sessions (those with a `sid`: the
    /// password grant, refresh, and exchanges for a user).
    Sessions,
    /// Record every token.
    All,
}

impl RecordIssued {
    /// Whether a token of session `sid` (if any) is recorded.
    pub fn records(self, sid: Option<&str>) -> bool {
        match self {
            Self::None => false,
            Self::Sessions => sid.is_some(),
            Self::All => true,
        }
    }

    /// Whether there is a registry to look a `jti` up in.
    pub fn is_on(self) -> bool {
        self != Self::None
    }
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
            self_audience: String::new(),
            refresh_reuse_grace_secs: 0,
            verifier_leeway_secs: service_sdk::verify::DEFAULT_LEEWAY_SECS,
            record_issued: RecordIssued::None,
        }
    }
}

/// Redis connection settings. `Debug` redacts the URL's password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// The Redis URL (filled from `store`).
    #[serde(skip)]
    pub url: String,
    /// Key prefix, so several deployments can share one Redis.
    pub prefix: String,
    /// Connection pool size.
    pub pool_size: usize,
    /// Connections of their own for durable writes (those followed by
    /// `WAIT`, with `min_replicas_acked` > 0), so that no read queues
    /// behind a `WAIT`; 0 (the default) is half of `pool_size`, rounded
    /// up. Unused without `min_replicas_acked`.
    pub durable_pool_size: usize,
    /// Per-command timeout.
    pub command_timeout_ms: u64,
    /// How often the revocation subscriber pings its connection (each ping
    /// bounded by `command_timeout_ms`), so a silent partition makes the
    /// replica's watch streams end instead of looking fresh.
    pub subscriber_ping_ms: u64,
    /// How many replicas must have a write (`WAIT`) before a revocation,
    /// refresh rotation or other write is acknowledged; 0 (the default, for
    /// a lone Redis) acknowledges once the primary has it.
    pub min_replicas_acked: u32,
    /// How long a write waits for `min_replicas_acked` replicas (the `WAIT`
    /// timeout); below `command_timeout_ms`.
    pub replica_ack_timeout_ms: u64,
    /// The key layout (see `docs/REDIS.md`): `auto` (the default) is
    /// `sharded` for a `redis-cluster://` URL, `single` otherwise.
    pub layout: RedisLayout,
}

/// `redis.layout`: how the store's keys are hash-tagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisLayout {
    /// `sharded` for a cluster URL, `single` otherwise.
    #[default]
    Auto,
    /// Every key under one hash tag: one slot, every script atomic over
    /// all of them (a lone Redis, Sentinel, or a cluster for failover only).
    Single,
    /// Keys tagged by their natural unit (a refresh family, a deny shard),
    /// spread over a cluster's primaries.
    Sharded,
}

impl RedisConfig {
    /// How many connections durable writes get (`durable_pool_size`, or
    /// half of `pool_size`, rounded up); 0 without `min_replicas_acked`.
    pub fn durable_connections(&self) -> usize {
        match (self.min_replicas_acked, self.durable_pool_size) {
            (0, _) => 0,
            (_, 0) => self.pool_size.max(1).div_ceil(2),
            (_, n) => n,
        }
    }

    /// The key layout the store (and the SDK's Redis mode) use.
    pub fn key_layout(&self) -> service_sdk::redis_layout::KeyLayout {
        use service_sdk::redis_layout::KeyLayout;
        match self.layout {
            RedisLayout::Auto => KeyLayout::for_url(&self.prefix, &self.url),
            RedisLayout::Single => KeyLayout::new(&self.prefix),
            RedisLayout::Sharded => KeyLayout::sharded(&self.prefix),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: "auth".into(),
            pool_size: 4,
            durable_pool_size: 0,
            command_timeout_ms: 2000,
            subscriber_ping_ms: DEFAULT_SUBSCRIBER_PING_MS,
            min_replicas_acked: 0,
            replica_ack_timeout_ms: 500,
            layout: RedisLayout::Auto,
        }
    }
}

/// The largest `redis.min_replicas_acked`: more replicas than any
/// deployment runs is a typo that would refuse every write.
pub const MAX_REPLICAS_ACKED: u32 = 16;

/// Default of `redis.subscriber_ping_ms`.
pub const DEFAULT_SUBSCRIBER_PING_MS: u64 = 1_000;

/// The longest a silent Redis partition may go unnoticed by the revocation
/// subscriber: `redis.subscriber_ping_ms + redis.command_timeout_ms` (the
/// last confirmation may be a whole ping interval old, and the next ping
/// waits out a command timeout). Well under the SDK's default 30 s stale
/// bound, so a partitioned replica stops heartbeating before its verifiers
/// would have noticed on their own.
pub const MAX_PARTITION_DETECTION_MS: u64 = 10_000;

/// WatchRevocations settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Limits (`[limits]`; restart): connections, streams and time of both ports,
/// and the limits against floods. Each port has its own connection budget,
/// so one port's clients can never use up the file descriptors the other
/// needs. Every limit applies per replica: N replicas admit N times as much
/// in total. See docs/OPERATIONS.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// HTTP side port: time to receive a whole request head, counted from
    /// when the server starts waiting for it (so it also closes idle
    /// keep-alive connections).
    pub http_header_timeout_ms: u64,
    /// HTTP side port: a connection that sends nothing for this long is
    /// closed.
    pub http_idle_timeout_secs: u64,
    /// HTTP side port: open connections at most; more are accepted and
    /// closed at once.
    pub http_max_connections: usize,
    /// How long `/readyz` reuses its last store ping.
    pub readyz_cache_ms: u64,
    /// gRPC port: concurrent HTTP/2 streams per connection.
    pub grpc_max_concurrent_streams: u32,
    /// gRPC port: deadline of a unary call (not of the WatchRevocations
    /// stream once open); a shorter `grpc-timeout` from the client wins.
    pub grpc_request_timeout_ms: u64,
    /// gRPC port: streams the server may reset for protocol errors on one
    /// connection before it sends GOAWAY.
    pub grpc_max_local_error_reset_streams: usize,
    /// How long shutdown waits for open calls and streams before closing
    /// them.
    pub shutdown_grace_secs: u64,
    /// Threads that check passwords (argon2id, 19 MiB each while busy);
    /// 0 means one per core, at most four.
    pub password_threads: usize,
    /// Password checks that may wait for a thread; when full, Login answers
    /// `RESOURCE_EXHAUSTED` at once.
    pub password_queue: usize,
    /// Scheduling niceness of the password threads (0-19; Linux), so that a
    /// password flood, which keeps every password thread busy, cannot take
    /// the CPU that token calls need. 0 runs them like every other thread.
    pub password_nice: u8,
    /// Failed logins of one username allowed before it must back off.
    pub login_backoff_after: u32,
    /// Seconds without an attempt after which a username's failed logins
    /// are forgotten.
    pub login_backoff_window_secs: u64,
    /// The longest back-off (it doubles from 1 s with each further failure).
    pub login_backoff_max_secs: u64,
    /// Usernames tracked for back-off at most (the oldest are forgotten).
    pub login_backoff_entries: usize,
    /// Sustained Login, ExchangeToken, Refresh and Revoke calls per second
    /// allowed to one client identity (its mTLS certificate).
    pub client_rate_per_sec: u32,
    /// Calls one client identity may make at once above the sustained rate.
    pub client_rate_burst: u32,
    /// Client identities tracked by the rate limiter at most.
    pub client_rate_keys: usize,

    // gRPC port connections (the edge's `TlsIncoming`).
    /// gRPC port: open connections at most (handshakes included); more are
    /// accepted and closed at once. With `http_max_connections` it must
    /// stay under the process's file descriptor limit, with room for the
    /// store's connections.
    pub grpc_max_connections: usize,
    /// gRPC port: TLS handshakes in flight at most, a budget inside
    /// `grpc_max_connections` (a handshake also holds a connection slot,
    /// and keeps only that one once complete); more are accepted and closed
    /// at once, so unauthenticated clients (silent TCP connects) hold at
    /// most this many connection slots.
    pub grpc_max_handshakes: usize,
    /// gRPC port: time a client has to complete the TLS handshake.
    pub grpc_handshake_timeout_ms: u64,
    /// gRPC port: after the TLS handshake, time for the client's first
    /// bytes (the HTTP/2 preface).
    pub grpc_preface_timeout_ms: u64,
    /// gRPC port: a connection that sends nothing for this long is closed.
    /// Keepalive PING acks count, so it must exceed
    /// `grpc_keepalive_interval_secs + grpc_keepalive_timeout_secs`.
    pub grpc_idle_timeout_secs: u64,
    /// gRPC port: interval of the server's HTTP/2 keepalive PINGs.
    pub grpc_keepalive_interval_secs: u64,
    /// gRPC port: a PING not acknowledged within this time ends the
    /// connection.
    pub grpc_keepalive_timeout_secs: u64,
    /// Open WatchRevocations streams per replica at most; over it a new one
    /// gets `RESOURCE_EXHAUSTED` at once.
    pub watch_max_streams: usize,
    /// Open WatchRevocations streams per client identity (its mTLS
    /// certificate; the pods of one service usually share one) at most.
    pub watch_max_streams_per_client: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            http_header_timeout_ms: 5_000,
            http_idle_timeout_secs: 30,
            http_max_connections: 64,
            readyz_cache_ms: 1_000,
            grpc_max_concurrent_streams: 256,
            grpc_request_timeout_ms: 30_000,
            grpc_max_local_error_reset_streams: 1_024,
            shutdown_grace_secs: 10,
            password_threads: 0,
            password_queue: 64,
            password_nice: 10,
            login_backoff_after: 5,
            login_backoff_window_secs: 900,
            login_backoff_max_secs: 300,
            login_backoff_entries: 10_000,
            client_rate_per_sec: 10_000,
            client_rate_burst: 20_000,
            client_rate_keys: 10_000,

            // 768 + the side port's 64 leave ~190 descriptors of the common
            // 1024 soft limit for listeners, the store and the runtime.
            grpc_max_connections: 768,
            grpc_max_handshakes: 128,
            grpc_handshake_timeout_ms: 4_000,
            grpc_preface_timeout_ms: 10_000,
            grpc_idle_timeout_secs: 300,
            grpc_keepalive_interval_secs: 30,
            grpc_keepalive_timeout_secs: 20,
            watch_max_streams: 4_096,
            watch_max_streams_per_client: 256,
        }
    }
}

impl LimitsConfig {
    fn validate(&self, v: &mut Validation<'_>) {
        let mut range = |key: &str, value: u64, min: u64, max: u64| v.range(&format!("limits.{key}"), value, min, max);
        range("http_header_timeout_ms", self.http_header_timeout_ms, 100, 600_000);
        range("http_idle_timeout_secs", self.http_idle_timeout_secs, 1, 3_600);
        range("http_max_connections", self.http_max_connections as u64, 1, 100_000);
        range("readyz_cache_ms", self.readyz_cache_ms, 0, 60_000);
        range("grpc_max_concurrent_streams", u64::from(self.grpc_max_concurrent_streams), 1, 65_536);
        range("grpc_request_timeout_ms", self.grpc_request_timeout_ms, 100, 3_600_000);
        range("grpc_max_local_error_reset_streams", self.grpc_max_local_error_reset_streams as u64, 1, 1_000_000);
        range("shutdown_grace_secs", self.shutdown_grace_secs, 1, 600);
        range("password_threads", self.password_threads as u64, 0, 64);
        range("password_queue", self.password_queue as u64, 1, 100_000);
        range("password_nice", u64::from(self.password_nice), 0, 19);
        range("login_backoff_after", u64::from(self.login_backoff_after), 1, 1_000);
        range("login_backoff_window_secs", self.login_backoff_window_secs, 1, 86_400);
        range("login_backoff_max_secs", self.login_backoff_max_secs, 1, 86_400);
        range("login_backoff_entries", self.login_backoff_entries as u64, 1, 10_000_000);
        range("client_rate_per_sec", u64::from(self.client_rate_per_sec), 1, 10_000_000);
        range("client_rate_burst", u64::from(self.client_rate_burst), 1, 10_000_000);
        range("client_rate_keys", self.client_rate_keys as u64, 1, 10_000_000);

        range("grpc_max_connections", self.grpc_max_connections as u64, 1, 1_000_000);
        range("grpc_max_handshakes", self.grpc_max_handshakes as u64, 1, 1_000_000);
        range("grpc_handshake_timeout_ms", self.grpc_handshake_timeout_ms, 100, 60_000);
        range("grpc_preface_timeout_ms", self.grpc_preface_timeout_ms, 100, 600_000);
        range("grpc_idle_timeout_secs", self.grpc_idle_timeout_secs, 1, 86_400);
        range("grpc_keepalive_interval_secs", self.grpc_keepalive_interval_secs, 1, 3_600);
        range("grpc_keepalive_timeout_secs", self.grpc_keepalive_timeout_secs, 1, 600);
        range("watch_max_streams", self.watch_max_streams as u64, 1, 1_000_000);
        range("watch_max_streams_per_client", self.watch_max_streams_per_client as u64, 1, 1_000_000);
        // A healthy client is silent at most one PING interval plus the
        // time to ack it: the idle timeout must never be shorter.
        let quiet = self.grpc_keepalive_interval_secs.saturating_add(self.grpc_keepalive_timeout_secs);
        if self.grpc_idle_timeout_secs <= quiet {
            v.err(
                "limits.grpc_idle_timeout_secs",
                format!(
                    "must exceed grpc_keepalive_interval_secs + grpc_keepalive_timeout_secs ({quiet}): a healthy \
                     client may send nothing but its PING acks"
                ),
            );
        }
        if self.watch_max_streams_per_client > self.watch_max_streams {
            v.err("limits.watch_max_streams_per_client", "must be at most limits.watch_max_streams");
        }
        if self.grpc_max_handshakes > self.grpc_max_connections {
            v.err("limits.grpc_max_handshakes", "must be at most limits.grpc_max_connections");
        }
    }
}

fn default_issuer() -> String {
    "auth-service".into()
}
fn default_grpc_addr() -> String {
    "127.0.0.1:50051".into()
}
fn default_http_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_store() -> String {
    "memory".into()
}
fn default_reload_check_secs() -> u64 {
    10
}

fn default_log_format() -> String {
    "text".into()
}

// ---------------------------------------------------------------------------
// The validated form.

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In process (one replica).
    Memory,
    /// Redis, shared by every replica.
    Redis(RedisConfig),
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where signing keys come from (`[keys]`; reloadable).
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// PKCS#8 PEM files.
    File {
        /// The active signing key.
        signing: KeyFile,
        /// Verify-only keys published ahead of a rotation.
        publish: Vec<KeyFile>,
    },
    /// Vault (OpenBao) Transit: the private key never leaves Vault.
    Transit(TransitConfig),
}

/// Where a [`Config`] was read from, so a reload can read it again.
#[derive(Debug, Clone)]
struct ConfigSource {
    path: PathBuf,
    env: EnvOverrides,
    overrides: Overrides,
}

/// The validated server configuration. `Debug` redacts the password of a
/// Redis URL. See the [module docs](self) for which part reloads.
#[derive(Clone)]
pub struct Config {
    /// The `iss` of every token (restart).
    pub issuer: String,
    /// gRPC (mTLS) listen address (restart).
    pub grpc_addr: SocketAddr,
    /// HTTP side-port listen address (restart).
    pub http_addr: SocketAddr,
    /// The side port's public base URL, without a trailing `/` (restart);
    /// `None`: derived from the address the port is bound to.
    pub http_public_url: Option<String>,
    /// TLS of the side port, if any (restart).
    pub http_tls: Option<HttpTlsConfig>,
    /// The state store (restart).
    pub store: StoreConfig,
    /// Log format (restart).
    pub log_format: LogFormat,
    /// mTLS files (restart).
    pub tls: TlsConfig,
    /// WatchRevocations settings (restart).
    pub watch: WatchConfig,
    /// Limits of both ports and against floods (restart).
    pub limits: LimitsConfig,
    /// The audit trail (restart); `path` is resolved.
    pub audit: AuditConfig,
    /// OpenTelemetry trace export, with the standard `OTEL_*` variables
    /// applied (restart).
    pub otel: OtelConfig,
    /// Users file (reloadable).
    pub users_file: PathBuf,
    /// Service accounts file (reloadable).
    pub accounts_file: PathBuf,
    /// How often the users and accounts files are checked for changed
    /// contents, in seconds; 0: only on SIGHUP (restart).
    pub reload_check_secs: u64,
    /// Signing keys (reloadable).
    pub keys: KeySource,
    /// `keys.jwks_max_age_secs`: how long HTTP clients may cache the JWKS
    /// (reloadable, with the keys).
    pub jwks_max_age_secs: u64,
    /// `keys.allow_readable_key_files`: start with key files other users
    /// can read (a warning, not a refusal). Read with the key files: at
    /// start-up for `tls.key`, and on each reload for the signing keys.
    pub allow_readable_key_files: bool,
    /// Token lifetimes and limits (reloadable).
    pub tokens: TokensConfig,
    source: Option<ConfigSource>,
}

/// A configuration error, naming the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {key}: {problem}")]
pub struct ConfigError {
    /// The offending key (dotted path), file, or environment variable.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { key: key.into(), problem: problem.into() }
    }
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// The problems, in the order found.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// The offending keys, in the order found.
    pub fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.key.as_str()).collect()
    }

    /// The problem reported for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&ConfigError> {
        self.0.iter().find(|e| e.key == key)
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "config: {} problems", many.len())?;
                for e in many {
                    write!(f, "\n  {}: {}", e.key, e.problem)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
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

/// A Redis URL with any userinfo password replaced by `***`, and the value
/// of any query parameter named like a password (`sentinelPassword`).
///
/// Written for malformed URLs too: everything before the last `@` is taken
/// for userinfo (a password holding an unescaped `/` or `?` stays hidden),
/// and only a user name before a `:` is kept.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:***@{host}"),
            _ => format!("***@{host}"),
        },
        None => rest.to_owned(),
    };
    let Some((before, query)) = rest.split_once('?') else { return format!("{scheme}://{rest}") };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.to_ascii_lowercase().contains("password") => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{scheme}://{before}?{}", query.join("&"))
}

impl std::fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConfig")
            .field("issuer", &self.issuer)
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("http_public_url", &self.http_public_url)
            .field("http_tls", &self.http_tls)
            .field("store", &redact_url(&self.store))
            .field("users_file", &self.users_file)
            .field("accounts_file", &self.accounts_file)
            .field("reload_check_secs", &self.reload_check_secs)
            .field("log_format", &self.log_format)
            .field("tls", &self.tls)
            .field("keys.source", &self.keys.source)
            .field("keys.signing", &self.keys.signing)
            .field("keys.publish", &self.keys.publish)
            .field("keys.jwks_max_age_secs", &self.keys.jwks_max_age_secs)
            .field("keys.prepublish_secs", &self.keys.prepublish_secs)
            .field("keys.allow_readable_key_files", &self.keys.allow_readable_key_files)
            // The raw table is shown by its keys only.
            .field("keys.transit", &self.keys.transit.as_ref().map(|t| t.keys().collect::<Vec<_>>()))
            .field("tokens", &self.tokens)
            .field("redis", &self.redis)
            .field("watch", &self.watch)
            .field("limits", &self.limits)
            .field("audit", &self.audit)
            .field("otel", &self.otel)
            .finish()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("issuer", &self.issuer)
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("http_public_url", &self.http_public_url)
            .field("http_tls", &self.http_tls)
            .field("store", &self.store)
            .field("log_format", &self.log_format)
            .field("tls", &self.tls)
            .field("watch", &self.watch)
            .field("limits", &self.limits)
            .field("audit", &self.audit)
            .field("otel", &self.otel)
            .field("users_file", &self.users_file)
            .field("accounts_file", &self.accounts_file)
            .field("reload_check_secs", &self.reload_check_secs)
            .field("keys", &self.keys)
            .field("jwks_max_age_secs", &self.jwks_max_age_secs)
            .field("allow_readable_key_files", &self.allow_readable_key_files)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("durable_pool_size", &self.durable_pool_size)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("subscriber_ping_ms", &self.subscriber_ping_ms)
            .field("min_replicas_acked", &self.min_replicas_acked)
            .field("replica_ack_timeout_ms", &self.replica_ack_timeout_ms)
            .field("layout", &self.layout)
            .finish()
    }
}

/// The prefix of the server's environment overrides.
pub const ENV_PREFIX: &str = "AUTH_SERVER_";
/// What joins nested keys in a variable name (`AUTH_SERVER_LIMITS__PASSWORD_QUEUE`).
pub const ENV_SEPARATOR: &str = "__";
/// The variable `serve` reads the config file's path from (`--config`).
pub const CONFIG_PATH_VAR: &str = "AUTH_SERVER_CONFIG";
/// Variables under [`ENV_PREFIX`] that are not config keys: the config
/// file's path, and the SDK's `AUTH_SERVER_ID` (the auth server's identity,
/// which a shell or pod running services next to the server may export).
/// The admin tools' variables ([`crate::admin::ENV_PREFIX`], `AUTH_SERVER_ADMIN_*`)
/// are not config keys either.
pub const ENV_NOT_KEYS: [&str; 2] = [CONFIG_PATH_VAR, "AUTH_SERVER_ID"];

/// Whether `name` is a variable under [`ENV_PREFIX`] that is not a config
/// key: one of [`ENV_NOT_KEYS`] or an admin tool's.
fn is_not_a_key(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ENV_NOT_KEYS.contains(&upper.as_str()) || upper.starts_with(crate::admin::ENV_PREFIX)
}

/// One `AUTH_SERVER_*` variable.
#[derive(Clone)]
struct EnvVar {
    /// The variable's name, as set.
    name: String,
    /// The dotted config key it sets (lower case).
    key: String,
    value: String,
}

/// The server's environment overrides: every `AUTH_SERVER_*` variable
/// (prefix matched in any case) except [`ENV_NOT_KEYS`], each setting the
/// key its name spells (`AUTH_SERVER_TOKENS__ACCESS_TTL_SECS=600` sets
/// `tokens.access_ttl_secs`). Values are read as TOML-like literals
/// (numbers, booleans, arrays), else as strings. `Debug` shows the names
/// only: a value may hold a password.
#[derive(Clone, Default)]
pub struct EnvOverrides {
    vars: Vec<EnvVar>,
}

impl std::fmt::Debug for EnvOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.vars.iter().map(|v| &v.name)).finish()
    }
}

impl EnvOverrides {
    /// The overrides in this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))),
        )
    }

    /// The overrides among `vars` (name, value); other names are ignored.
    pub fn from_vars<N: Into<String>, V: Into<String>>(vars: impl IntoIterator<Item = (N, V)>) -> Self {
        let mut vars: Vec<EnvVar> = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let name: String = name.into();
                let rest = name.get(ENV_PREFIX.len()..)?;
                if !name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX) || is_not_a_key(&name) {
                    return None;
                }
                let key = rest.split(ENV_SEPARATOR).map(str::to_ascii_lowercase).collect::<Vec<_>>().join(".");
                Some(EnvVar { name, key, value: value.into() })
            })
            .collect();
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        Self { vars }
    }

    /// Whether no override is set.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The variables' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|v| v.name.as_str())
    }

    /// The variable that sets `key` exactly.
    fn setting(&self, key: &str) -> Option<&str> {
        self.vars.iter().find(|v| v.key == key).map(|v| v.name.as_str())
    }

    /// The variable an extraction error at `key` comes from: one that sets
    /// `key`, a key under it, or a table above it.
    fn behind(&self, key: &str) -> Option<&str> {
        let under = |outer: &str, inner: &str| inner.strip_prefix(outer).is_some_and(|r| r.starts_with('.'));
        self.vars.iter().find(|v| v.key == key || under(key, &v.key) || under(&v.key, key)).map(|v| v.name.as_str())
    }

    /// Variables whose name spells no key (an empty part, as in
    /// `AUTH_SERVER_LIMITS____X`), as errors naming them.
    fn malformed(&self) -> Vec<ConfigError> {
        self.vars
            .iter()
            .filter(|v| v.key.split('.').any(str::is_empty))
            .map(|v| {
                ConfigError::new(&v.name, format!("names no config key (nested keys are joined by {ENV_SEPARATOR:?})"))
            })
            .collect()
    }
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{ENV_PREFIX}` environment variables"))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for v in self.vars.iter().filter(|v| !v.key.split('.').any(str::is_empty)) {
            let value: Value = v.value.parse().unwrap_or_else(|never| match never {});
            insert(&mut dict, &v.key.split('.').collect::<Vec<_>>(), value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Sets `parts` (a key path) in `dict` to `value`, making the tables on the
/// way; a value in the way is replaced (the later variable wins).
fn insert(dict: &mut Dict, parts: &[&str], value: Value) {
    match parts {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry((*first).to_owned()).or_insert_with(|| Dict::new().into());
            if !matches!(entry, Value::Dict(..)) {
                *entry = Dict::new().into();
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

impl RawConfig {
    /// Reads `path`, then the `AUTH_SERVER_*` environment overrides, then
    /// `overrides`. Only the syntax and the types are checked here.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigErrors> {
        Self::load_from(path, &EnvOverrides::from_env(), overrides)
    }

    /// Reads `path`, then `env`, then `overrides`. An error caused by a
    /// variable names the variable.
    pub fn load_from(path: &Path, env: &EnvOverrides, overrides: &Overrides) -> Result<Self, ConfigErrors> {
        if path.is_dir() {
            return Err(ConfigError::new(
                path.display().to_string(),
                "is a directory; --config takes the TOML file (e.g. auth-server.toml)",
            )
            .into());
        }
        if !path.is_file() {
            return Err(ConfigError::new(path.display().to_string(), "config file not found").into());
        }
        let malformed = env.malformed();
        if !malformed.is_empty() {
            return Err(ConfigErrors(malformed));
        }
        let figment = Figment::new().merge(Toml::file(path)).merge(env).merge(Serialized::defaults(overrides));
        let mut raw = Self::extract(figment, env)?;
        // The standard OpenTelemetry variables fill what `[otel]` leaves unset.
        raw.otel = raw.otel.with_env(|k| std::env::var(k).ok());
        Ok(raw)
    }

    /// Parses TOML text (no environment).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigErrors> {
        Self::extract(Figment::new().merge(Toml::string(text)), &EnvOverrides::default())
    }

    fn extract(figment: Figment, env: &EnvOverrides) -> Result<Self, ConfigErrors> {
        figment.extract().map_err(|errors| {
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|e| {
                        let mut path = e.path.clone();
                        if let figment::error::Kind::UnknownField(field, _) = &e.kind
                            && path.last() != Some(field)
                        {
                            path.push(field.clone());
                        }
                        let key = path.join(".");
                        let key = match env.behind(&key) {
                            Some(var) => var.to_owned(),
                            None if key.is_empty() => "config".to_owned(),
                            None => key,
                        };
                        ConfigError::new(key, e.kind.to_string())
                    })
                    .collect(),
            )
        })
    }
}

impl Config {
    /// The keys whose change needs a restart (a reload keeps their old
    /// values and warns).
    pub const RESTART_KEYS: [&'static str; 13] = [
        "issuer",
        "grpc_addr",
        "http_addr",
        "http_public_url",
        "http_tls",
        "store",
        "log_format",
        "tls",
        "watch",
        "limits",
        "audit",
        "otel",
        "reload_check_secs",
    ];

    /// Loads `path`, applies the `AUTH_SERVER_*` environment overrides
    /// ([`EnvOverrides::from_env`]) and `overrides`, resolves relative paths
    /// against the file's directory and validates. The result remembers
    /// where it came from, for [`Config::reread`].
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigErrors> {
        Self::load_with(path, overrides, |_| {})
    }

    /// Parses TOML text (no environment), resolving paths against `base`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self, ConfigErrors> {
        Self::from_raw(RawConfig::from_toml_str(text)?, base)
    }

    /// Like [`Config::load`] with the raw form adjusted by `adjust` before
    /// validation (tests, tools).
    pub fn load_with(
        path: &Path,
        overrides: &Overrides,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Self, ConfigErrors> {
        Self::load_with_env(path, &EnvOverrides::from_env(), overrides, adjust)
    }

    /// Like [`Config::load_with`], with these environment overrides instead
    /// of the process's. A value a variable set that fails validation is
    /// reported with the variable's name.
    pub fn load_with_env(
        path: &Path,
        env: &EnvOverrides,
        overrides: &Overrides,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Self, ConfigErrors> {
        let mut raw = RawConfig::load_from(path, env, overrides)?;
        adjust(&mut raw);
        let mut config = Self::from_raw(raw, path.parent().unwrap_or(Path::new("."))).map_err(|mut errors| {
            for e in &mut errors.0 {
                if let Some(var) = env.setting(&e.key) {
                    e.problem = format!("{} (set by {var})", e.problem);
                }
            }
            errors
        })?;
        config.source = Some(ConfigSource { path: path.to_owned(), env: env.clone(), overrides: overrides.clone() });
        Ok(config)
    }

    /// The file this configuration was loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.source.as_ref().map(|s| s.path.as_path())
    }

    /// Reads the same file again, with the environment overrides and flags
    /// it was first loaded with.
    pub fn reread(&self) -> Result<Self, ConfigErrors> {
        let source = self
            .source
            .as_ref()
            .ok_or_else(|| ConfigError::new("config", "not loaded from a file: nothing to re-read"))?;
        Self::load_with_env(&source.path, &source.env, &source.overrides, |_| {})
    }

    /// The Redis settings, when the store is Redis.
    pub fn redis(&self) -> Option<&RedisConfig> {
        match &self.store {
            StoreConfig::Redis(r) => Some(r),
            StoreConfig::Memory => None,
        }
    }

    /// The restart-only keys whose value differs in `other`.
    pub fn restart_changes(&self, other: &Config) -> Vec<&'static str> {
        let [issuer, grpc, http, http_url, http_tls, store, log, tls, watch, limits, audit, otel, poll] =
            Self::RESTART_KEYS;
        let mut changed = Vec::new();
        let mut check = |differs: bool, key| {
            if differs {
                changed.push(key);
            }
        };
        check(self.issuer != other.issuer, issuer);
        check(self.grpc_addr != other.grpc_addr, grpc);
        check(self.http_addr != other.http_addr, http);
        check(self.http_public_url != other.http_public_url, http_url);
        check(self.http_tls != other.http_tls, http_tls);
        check(self.store != other.store, store);
        check(self.log_format != other.log_format, log);
        check(self.tls != other.tls, tls);
        check(self.watch != other.watch, watch);
        check(self.limits != other.limits, limits);
        check(self.audit != other.audit, audit);
        check(self.otel != other.otel, otel);
        check(self.reload_check_secs != other.reload_check_secs, poll);
        changed
    }

    /// Validates `raw`, resolving relative paths against `base`. Every
    /// problem is reported, each naming its key.
    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Self, ConfigErrors> {
        let mut v = Validation { base, errors: Vec::new() };

        if raw.issuer.trim().is_empty() {
            v.err("issuer", "must not be empty");
        }
        let grpc_addr = v.addr("grpc_addr", &raw.grpc_addr);
        let http_addr = v.addr("http_addr", &raw.http_addr);
        let store = if raw.store == "memory" {
            Some(StoreConfig::Memory)
        } else if ["redis://", "rediss://", "redis-sentinel://", "redis-cluster://"]
            .iter()
            .any(|s| raw.store.starts_with(s))
        {
            // What the store will parse at start-up, parsed now: a URL fred
            // cannot read is a configuration error, not an outage.
            match fred::prelude::Config::from_url(&raw.store) {
                Ok(_) => Some(StoreConfig::Redis(RedisConfig { url: raw.store.clone(), ..raw.redis.clone() })),
                Err(e) => {
                    v.err(
                        "store",
                        format!(
                            "not a valid Redis URL {}: {}",
                            redact_url(&raw.store),
                            e.details().trim_end_matches('.')
                        ),
                    );
                    None
                }
            }
        } else {
            v.err("store", "must be \"memory\" or a redis:// or rediss:// URL");
            None
        };
        let log_format = match raw.log_format.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => {
                v.err("log_format", "must be \"text\" or \"json\"");
                None
            }
        };
        let users_file = v.file("users_file", raw.users_file.as_deref());
        let accounts_file = v.file("accounts_file", raw.accounts_file.as_deref());
        v.range("reload_check_secs", raw.reload_check_secs, 0, 3_600);
        let tls = match &raw.tls {
            Some(t) => {
                v.range("tls.reload_check_secs", t.reload_check_secs, 0, 3_600);
                v.range("tls.expiry_warn_days", t.expiry_warn_days, 0, 365);
                let cert = v.file("tls.cert", Some(&t.cert));
                let key = v.file("tls.key", Some(&t.key));
                let client_ca = v.file("tls.client_ca", Some(&t.client_ca));
                match (cert, key, client_ca) {
                    (Some(cert), Some(key), Some(client_ca)) => Some(TlsConfig { cert, key, client_ca, ..t.clone() }),
                    _ => None,
                }
            }
            None => {
                v.err("tls", "required");
                None
            }
        };
        let keys = v.key_source(&raw.keys);
        let jwks_max_age_secs = v.jwks_max_age(&raw.keys, keys.as_ref());
        let http_public_url = raw.http_public_url.as_deref().and_then(|u| v.public_url("http_public_url", u));
        let http_tls = raw.http_tls.as_ref().and_then(|t| {
            let cert = v.file("http_tls.cert", Some(&t.cert));
            let key = v.file("http_tls.key", Some(&t.key));
            let client_ca = t.client_ca.as_ref().map(|ca| v.file("http_tls.client_ca", Some(ca)));
            match (cert, key, client_ca) {
                (Some(cert), Some(key), None) => Some(HttpTlsConfig { cert, key, client_ca: None }),
                (Some(cert), Some(key), Some(Some(ca))) => Some(HttpTlsConfig { cert, key, client_ca: Some(ca) }),
                _ => None,
            }
        });

        let t = &raw.tokens;
        if t.access_ttl_secs == 0 || t.access_ttl_secs > 86_400 {
            v.err("tokens.access_ttl_secs", "must be between 1 and 86400");
        }
        if t.refresh_ttl_secs < t.access_ttl_secs {
            v.err("tokens.refresh_ttl_secs", "must be at least tokens.access_ttl_secs");
        }
        if t.exchange_max_ttl_secs == 0 || t.exchange_max_ttl_secs > EXCHANGE_TTL_HARD_CAP_SECS {
            v.err("tokens.exchange_max_ttl_secs", format!("must be between 1 and {EXCHANGE_TTL_HARD_CAP_SECS}"));
        }
        if t.exchange_default_ttl_secs == 0 || t.exchange_default_ttl_secs > t.exchange_max_ttl_secs {
            v.err("tokens.exchange_default_ttl_secs", "must be between 1 and tokens.exchange_max_ttl_secs");
        }
        if t.max_act_depth == 0 || t.max_act_depth > 16 {
            v.err("tokens.max_act_depth", "must be between 1 and 16");
        }
        if t.admin_perm.is_empty() {
            v.err("tokens.admin_perm", "must not be empty");
        }
        let self_audience = if t.self_audience.is_empty() { raw.issuer.clone() } else { t.self_audience.clone() };
        if t.user_audiences.contains(&self_audience) {
            v.err(
                "tokens.user_audiences",
                format!("must not hold the auth service's own audience {self_audience:?} (users may always log in for it alone)"),
            );
        }
        if t.refresh_reuse_grace_secs > MAX_REFRESH_REUSE_GRACE_SECS {
            v.err("tokens.refresh_reuse_grace_secs", format!("must be at most {MAX_REFRESH_REUSE_GRACE_SECS}"));
        }
        if t.verifier_leeway_secs > MAX_LEEWAY_SECS {
            v.err(
                "tokens.verifier_leeway_secs",
                format!("must be at most {MAX_LEEWAY_SECS} (the SDK's largest leeway)"),
            );
        }
        if raw.redis.pool_size == 0 || raw.redis.pool_size > 128 {
            v.err("redis.pool_size", "must be between 1 and 128");
        }
        if raw.redis.durable_pool_size > 128 {
            v.err("redis.durable_pool_size", "must be between 0 (half of redis.pool_size) and 128");
        }
        if raw.redis.command_timeout_ms == 0 {
            v.err("redis.command_timeout_ms", "must be positive");
        }
        if raw.redis.min_replicas_acked > MAX_REPLICAS_ACKED {
            v.err("redis.min_replicas_acked", format!("must be at most {MAX_REPLICAS_ACKED}"));
        }
        if raw.redis.min_replicas_acked > 0
            && (raw.redis.replica_ack_timeout_ms == 0
                || raw.redis.replica_ack_timeout_ms >= raw.redis.command_timeout_ms)
        {
            v.err(
                "redis.replica_ack_timeout_ms",
                format!(
                    "must be positive and below redis.command_timeout_ms ({}): a write waits this long for its \
                     replicas within the command's own time",
                    raw.redis.command_timeout_ms
                ),
            );
        }
        let ping = raw.redis.subscriber_ping_ms;
        if v.range("redis.subscriber_ping_ms", ping, 100, MAX_PARTITION_DETECTION_MS - 1_000)
            && raw.redis.command_timeout_ms > 0
        {
            let detection = ping.saturating_add(raw.redis.command_timeout_ms);
            if detection > MAX_PARTITION_DETECTION_MS {
                v.err(
                    "redis.subscriber_ping_ms",
                    format!(
                        "redis.subscriber_ping_ms + redis.command_timeout_ms ({detection}) must be at most \
                         {MAX_PARTITION_DETECTION_MS}: a silent Redis partition goes unnoticed that long, and a \
                         verifier must stop hearing heartbeats well within its stale bound"
                    ),
                );
            }
        }
        let max_heartbeat = max_heartbeat_secs();
        if raw.watch.heartbeat_secs == 0 || raw.watch.heartbeat_secs > max_heartbeat {
            v.err(
                "watch.heartbeat_secs",
                format!(
                    "must be between 1 and {max_heartbeat}: at most a third of the {} s after which a verifier \
                     with the SDK's default feed options counts an idle stream as stale",
                    FeedOptions::default().stale_after.as_secs()
                ),
            );
        }
        raw.limits.validate(&mut v);
        let audit = AuditConfig {
            enabled: raw.audit.enabled,
            path: raw.audit.path.as_deref().map(|p| v.output_file("audit.path", p)),
        };
        for (key, problem) in raw.otel.problems() {
            v.err(key, problem);
        }

        match (grpc_addr, http_addr, store, log_format, users_file, accounts_file, tls, keys) {
            (
                Some(grpc_addr),
                Some(http_addr),
                Some(store),
                Some(log_format),
                Some(users_file),
                Some(accounts_file),
                Some(tls),
                Some(keys),
            ) if v.errors.is_empty() => Ok(Self {
                issuer: raw.issuer,
                grpc_addr,
                http_addr,
                http_public_url,
                http_tls,
                store,
                log_format,
                tls,
                watch: raw.watch,
                limits: raw.limits,
                audit,
                otel: raw.otel,
                users_file,
                accounts_file,
                reload_check_secs: raw.reload_check_secs,
                keys,
                jwks_max_age_secs,
                allow_readable_key_files: raw.keys.allow_readable_key_files,
                tokens: TokensConfig { self_audience, ..raw.tokens },
                source: None,
            }),
            _ => Err(ConfigErrors(v.errors)),
        }
    }
}

/// Collects problems while checking a [`RawConfig`].
struct Validation<'a> {
    base: &'a Path,
    errors: Vec<ConfigError>,
}

impl Validation<'_> {
    fn err(&mut self, key: &str, problem: impl Into<String>) {
        self.errors.push(ConfigError::new(key, problem));
    }

    /// Whether `min <= value <= max`; an error for `key` otherwise.
    fn range(&mut self, key: &str, value: u64, min: u64, max: u64) -> bool {
        let ok = (min..=max).contains(&value);
        if !ok {
            self.err(key, format!("must be between {min} and {max}"));
        }
        ok
    }

    fn addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        let parsed = text.parse::<SocketAddr>().ok();
        if parsed.is_none() {
            self.err(key, format!("not a socket address (host:port): {text:?}"));
        }
        parsed
    }

    /// A file the server writes, resolved against the config directory:
    /// its directory must exist.
    fn output_file(&mut self, key: &str, path: &Path) -> PathBuf {
        let path = if path.is_relative() { self.base.join(path) } else { path.to_owned() };
        if path.file_name().is_none() {
            self.err(key, format!("not a file name: {}", path.display()));
        } else if path.is_dir() {
            self.err(key, format!("a directory, not a file: {}", path.display()));
        } else if !path.parent().is_none_or(|d| d.as_os_str().is_empty() || d.is_dir()) {
            self.err(key, format!("directory not found: {}", path.display()));
        }
        path
    }

    /// An absolute `http(s)://host[:port][/path]` base URL, returned
    /// without a trailing `/`.
    fn public_url(&mut self, key: &str, url: &str) -> Option<String> {
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        let host = rest.map(|r| r.split('/').next().unwrap_or(""));
        let ok = matches!(host, Some(h) if !h.is_empty() && !h.contains('@'))
            && !url.contains(|c: char| c.is_whitespace() || c == '?' || c == '#');
        if !ok {
            self.err(key, format!("not an absolute http(s) URL without query or fragment: {url:?}"));
            return None;
        }
        Some(url.trim_end_matches('/').to_owned())
    }

    /// `keys.jwks_max_age_secs`, checked against the pre-publication
    /// window of the key source (when it is valid).
    fn jwks_max_age(&mut self, raw: &RawKeysConfig, keys: Option<&KeySource>) -> u64 {
        let max_age = raw.jwks_max_age_secs.unwrap_or(DEFAULT_JWKS_MAX_AGE_SECS);
        let window = match keys {
            Some(KeySource::File { .. }) => {
                let prepublish = raw.prepublish_secs.unwrap_or_else(default_prepublish_secs);
                if !self.range("keys.prepublish_secs", prepublish, 1, 7 * 86_400) {
                    return max_age;
                }
                Some((prepublish, "keys.prepublish_secs"))
            }
            Some(KeySource::Transit(t)) => {
                if raw.prepublish_secs.is_some() {
                    self.err(
                        "keys.prepublish_secs",
                        "only used when keys.source = \"file\"; with Transit the window is \
                         keys.transit.publish_grace_secs - keys.transit.refresh_secs",
                    );
                }
                Some((
                    t.publish_grace_secs.saturating_sub(t.refresh_secs),
                    "keys.transit.publish_grace_secs - keys.transit.refresh_secs",
                ))
            }
            None => None,
        };
        if let Some((window, from)) = window
            && max_age >= window
        {
            self.err(
                "keys.jwks_max_age_secs",
                format!(
                    "must be below the pre-publication window ({window} s, {from}): an HTTP cache that fetched \
                     the JWKS just before a key was published must fetch it again before that key signs"
                ),
            );
        }
        max_age
    }

    /// A required file, resolved against the config directory.
    fn file(&mut self, key: &str, path: Option<&Path>) -> Option<PathBuf> {
        let Some(path) = path else {
            self.err(key, "required");
            return None;
        };
        let path = if path.is_relative() { self.base.join(path) } else { path.to_owned() };
        if !path.is_file() {
            self.err(key, format!("file not found: {}", path.display()));
            return None;
        }
        Some(path)
    }

    fn key_file(&mut self, key: &str, k: &KeyFile) -> Option<KeyFile> {
        self.file(key, Some(&k.path)).map(|path| KeyFile { path, alg: k.alg })
    }

    /// `[keys]`.
    fn key_source(&mut self, raw: &RawKeysConfig) -> Option<KeySource> {
        match raw.source.as_deref().unwrap_or("file") {
            "file" => {
                if raw.transit.is_some() {
                    self.err("keys.transit", "set, but keys.source is \"file\"");
                }
                let signing = match &raw.signing {
                    Some(k) => self.key_file("keys.signing.path", k),
                    None => {
                        self.err("keys.signing", "required when keys.source = \"file\"");
                        None
                    }
                };
                let publish: Vec<Option<KeyFile>> = raw
                    .publish
                    .iter()
                    .enumerate()
                    .map(|(i, k)| self.key_file(&format!("keys.publish[{i}].path"), k))
                    .collect();
                let publish: Option<Vec<KeyFile>> = publish.into_iter().collect();
                Some(KeySource::File { signing: signing?, publish: publish? })
            }
            "transit" => {
                if raw.signing.is_some() {
                    self.err("keys.signing", "set, but keys.source is \"transit\"");
                }
                if !raw.publish.is_empty() {
                    self.err("keys.publish", "only used when keys.source = \"file\"");
                }
                let Some(table) = &raw.transit else {
                    self.err("keys.transit", "required when keys.source = \"transit\"");
                    return None;
                };
                match transit_config(table, self.base) {
                    Ok(cfg) => Some(KeySource::Transit(cfg)),
                    Err(mut e) => {
                        self.errors.append(&mut e);
                        None
                    }
                }
            }
            _ => {
                self.err("keys.source", "must be \"file\" or \"transit\"");
                None
            }
        }
    }
}

/// Parses `[keys.transit]` and resolves its paths against `base`.
fn transit_config(table: &toml::Table, base: &Path) -> Result<TransitConfig, Vec<ConfigError>> {
    let mut cfg: TransitConfig = table
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| vec![ConfigError::new("keys.transit", e.message().to_owned())])?;
    let mut errors = Vec::new();
    let scheme_ok = cfg.address.starts_with("http://") || cfg.address.starts_with("https://");
    if !scheme_ok || cfg.address.contains(char::is_whitespace) || cfg.address.len() <= "https://".len() {
        errors.push(ConfigError::new("keys.transit.address", format!("not an http(s) URL: {:?}", cfg.address)));
    }
    if cfg.key.is_empty() {
        errors.push(ConfigError::new("keys.transit.key", "must not be empty"));
    }
    let resolve = |p: &mut Option<PathBuf>| {
        if let Some(p) = p.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
    };
    resolve(&mut cfg.ca_cert);
    match &mut cfg.auth {
        TransitAuth::Token { token_file, .. } => resolve(token_file),
        TransitAuth::Approle { role_id_file, secret_id_file, .. } => {
            resolve(role_id_file);
            resolve(secret_id_file);
        }
    }
    if let Some(ca) = cfg.ca_cert.as_ref().filter(|p| !p.is_file()) {
        errors.push(ConfigError::new("keys.transit.ca_cert", format!("file not found: {}", ca.display())));
    }
    if errors.is_empty() { Ok(cfg) } else { Err(errors) }
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

    fn transit_base(dir: &Path, transit: &str) -> String {
        base(dir).replace("signing = { path = \"s.pem\" }", &format!("source = \"transit\"\n[keys.transit]\n{transit}"))
    }

    #[test]
    fn defaults_apply_and_paths_resolve_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!(cfg.issuer, "auth-service");
        assert_eq!(cfg.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(cfg.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.store, StoreConfig::Memory);
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.tokens.exchange_default_ttl_secs, 300);
        assert_eq!(cfg.limits, LimitsConfig::default());
        assert_eq!(cfg.limits.password_queue, 64);
        assert_eq!(cfg.users_file, dir.path().join("u.toml"));
        assert_eq!(
            cfg.keys,
            KeySource::File {
                signing: KeyFile { path: dir.path().join("s.pem"), alg: KeyAlg::ES256 },
                publish: vec![]
            }
        );
    }

    #[test]
    fn record_issued_is_off_by_default_and_takes_sessions_or_all() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!(cfg.tokens.record_issued, RecordIssued::None);
        for (value, want) in
            [("none", RecordIssued::None), ("sessions", RecordIssued::Sessions), ("all", RecordIssued::All)]
        {
            let text = base(dir.path()) + &format!("[tokens]\nrecord_issued = \"{value}\"\n");
            assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap().tokens.record_issued, want);
        }
        let text = base(dir.path()) + "[tokens]\nrecord_issued = \"some\"\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert!(err.to_string().contains("record_issued"), "{err}");
        // Which tokens each setting records.
        assert!(!RecordIssued::None.records(Some("s")));
        assert!(RecordIssued::Sessions.records(Some("s")) && !RecordIssued::Sessions.records(None));
        assert!(RecordIssued::All.records(None));
    }

    #[test]
    fn debug_redacts_the_redis_password() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()).replace("[tls]", "store = \"redis://app:hunter2@redis:6379/0\"\n[tls]");
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://app:***@redis:6379/0"), "{shown}");
        let raw = format!("{:?}", RawConfig::from_toml_str(&text).unwrap());
        assert!(!raw.contains("hunter2"), "{raw}");
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(redact_url("redis://:hunter2@redis:6379"), "redis://:***@redis:6379");
        // Malformed: a password with an unescaped '/', or with no user.
        assert_eq!(redact_url("redis://app:hun/ter2@redis:6379"), "redis://app:***@redis:6379");
        assert_eq!(redact_url("redis://:hun/ter2@redis:x"), "redis://:***@redis:x");
        assert_eq!(redact_url("redis://hunter2@redis"), "redis://***@redis");
        assert_eq!(
            redact_url("redis-sentinel://s:26379/0?sentinelServiceName=m&sentinelPassword=hunter2"),
            "redis-sentinel://s:26379/0?sentinelServiceName=m&sentinelPassword=***"
        );
    }

    #[test]
    fn debug_never_shows_a_transit_token() {
        let dir = tempfile::tempdir().unwrap();
        // A token written into the table (a mistake: tokens belong in a file
        // or a variable) is refused, and never echoed.
        let text = transit_base(dir.path(), "address = \"http://v:8200\"\nkey = \"k\"\ntoken = \"s.hunter2\"\n");
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let raw = format!("{:?}", RawConfig::from_toml_str(&text).unwrap());
        assert!(!raw.contains("hunter2"), "{raw}");
    }

    /// Writes `text` as a config file in `dir` and loads it with `vars`.
    fn load_env(dir: &Path, text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let path = dir.join("auth-server.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(&path, &EnvOverrides::from_vars(vars.iter().copied()), &Overrides::default(), |_| {})
    }

    #[test]
    fn only_auth_server_variables_override_and_the_sdk_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
        let cfg = load_env(
            dir.path(),
            &text,
            &[
                ("AUTH_URL", "https://auth:50051"),
                ("AUTH_TLS_CA", "/ca.pem"),
                ("AUTH_CREDENTIALS_FILE", "/c.json"),
                ("AUTH_SERVER_ID", "spiffe://x/auth-server"),
                ("AUTH_SERVER_CONFIG", "/etc/auth/auth-server.toml"),
                ("AUTH_STORE", "redis://old-prefix:6379"),
                ("AUTH_SERVER_STORE", "redis://redis:6379"),
                ("AUTH_SERVER_LIMITS__PASSWORD_QUEUE", "8"),
                ("auth_server_tokens__access_ttl_secs", "600"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.redis().map(|r| r.url.as_str()), Some("redis://redis:6379"));
        assert_eq!(cfg.limits.password_queue, 8);
        assert_eq!(cfg.tokens.access_ttl_secs, 600);
        // A reload reads the same variables.
        assert_eq!(cfg.reread().unwrap().limits.password_queue, 8);
    }

    #[test]
    fn an_error_from_a_variable_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()) + "[limits]\npassword_queue = 4\n";
        let err = load_env(dir.path(), &text, &[("AUTH_SERVER_LIMITS__FOO", "1")]).unwrap_err();
        assert_eq!(err.keys(), ["AUTH_SERVER_LIMITS__FOO"]);
        assert!(err.to_string().starts_with("config: AUTH_SERVER_LIMITS__FOO: unknown field"), "{err}");
        let err = load_env(dir.path(), &text, &[("AUTH_SERVER_NOPE__DEEP", "1")]).unwrap_err();
        assert_eq!(err.keys(), ["AUTH_SERVER_NOPE__DEEP"], "{err}");
        let err = load_env(dir.path(), &text, &[("AUTH_SERVER_LIMITS__PASSWORD_QUEUE", "lots")]).unwrap_err();
        assert_eq!(err.keys(), ["AUTH_SERVER_LIMITS__PASSWORD_QUEUE"], "{err}");
        let err = load_env(dir.path(), &text, &[("AUTH_SERVER_LIMITS____X", "1")]).unwrap_err();
        assert_eq!(err.keys(), ["AUTH_SERVER_LIMITS____X"], "{err}");
        // Validation keeps the key and adds the variable.
        let err = load_env(dir.path(), &text, &[("AUTH_SERVER_LIMITS__PASSWORD_QUEUE", "0")]).unwrap_err();
        assert_eq!(err.keys(), ["limits.password_queue"]);
        assert!(err.to_string().contains("(set by AUTH_SERVER_LIMITS__PASSWORD_QUEUE)"), "{err}");
        // The file's own mistakes still name the key.
        let err = load_env(dir.path(), &(text + "stroe = 1\n"), &[]).unwrap_err();
        assert_eq!(err.keys(), ["limits.stroe"], "{err}");
        // Debug shows the names, never the values.
        let env = EnvOverrides::from_vars([("AUTH_SERVER_STORE", "redis://:hunter2@r:6379")]);
        assert_eq!(format!("{env:?}"), "[\"AUTH_SERVER_STORE\"]");
    }

    #[test]
    fn a_directory_given_as_the_config_file_is_named_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load(dir.path(), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err = Config::load(&dir.path().join("missing.toml"), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("config file not found"), "{err}");
    }

    #[test]
    fn a_malformed_redis_url_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        for url in ["redis://:hunter2@redis:port", "redis://:hunter2@redis:6379/x", "redis-cluster://:hunter2@"] {
            let text = base(dir.path()).replace("[tls]", &format!("store = \"{url}\"\n[tls]"));
            let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
            assert_eq!(err.keys(), ["store"], "{url}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()) + "[tokens]\nexchange_max_ttl_secs = 601\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["tokens.exchange_max_ttl_secs"]);
        let text = base(dir.path()).replace("users_file = \"u.toml\"", "users_file = \"missing.toml\"");
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().keys(), ["users_file"]);
        let text = base(dir.path()).replace("[tls]", "store = \"postgres://x\"\n[tls]");
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().keys(), ["store"]);
        let text = base(dir.path()).replace("[tls]", "stroe = 1\n[tls]");
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert!(err.to_string().contains("stroe"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path())
            .replace("users_file = \"u.toml\"", "users_file = \"missing.toml\"\nlog_format = \"xml\"")
            .replace("[tls]", "store = \"postgres://x\"\ngrpc_addr = \"nowhere\"\n[tls]")
            + "[tokens]\nexchange_max_ttl_secs = 601\nmax_act_depth = 0\n[watch]\nheartbeat_secs = 0\n"
            + "[limits]\npassword_queue = 0\nclient_rate_per_sec = 0\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        let mut keys = err.keys();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "grpc_addr",
                "limits.client_rate_per_sec",
                "limits.password_queue",
                "log_format",
                "store",
                "tokens.exchange_max_ttl_secs",
                "tokens.max_act_depth",
                "users_file",
                "watch.heartbeat_secs",
            ]
        );
        let shown = err.to_string();
        assert!(shown.contains("tokens.exchange_max_ttl_secs: must be between 1 and 600"), "{shown}");
        assert!(shown.contains("users_file: file not found"), "{shown}");
    }

    #[test]
    fn watch_caps_and_the_subscriber_ping_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()) + "[limits]\nwatch_max_streams = 10\nwatch_max_streams_per_client = 11\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["limits.watch_max_streams_per_client"]);
        assert!(err.to_string().contains("must be at most limits.watch_max_streams"), "{err}");
        let text = base(dir.path()) + "[limits]\nwatch_max_streams = 0\nwatch_max_streams_per_client = 0\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        let mut keys = err.keys();
        keys.sort_unstable();
        assert_eq!(keys, ["limits.watch_max_streams", "limits.watch_max_streams_per_client"]);
        let text = base(dir.path()) + "[redis]\nsubscriber_ping_ms = 0\n";
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().keys(), ["redis.subscriber_ping_ms"]);
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!((cfg.limits.watch_max_streams, cfg.limits.watch_max_streams_per_client), (4_096, 256));
    }

    #[test]
    fn transit_paths_resolve_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vault-ca.pem"), "").unwrap();
        let text = transit_base(
            dir.path(),
            "address = \"https://vault:8200\"\nkey = \"auth-signing\"\nca_cert = \"vault-ca.pem\"\n\
             [keys.transit.auth]\nmethod = \"approle\"\nrole_id_file = \"bao/role_id\"\nsecret_id_file = \"/abs/secret_id\"\n",
        );
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        let KeySource::Transit(t) = &cfg.keys else { panic!("transit expected: {:?}", cfg.keys) };
        assert_eq!(t.ca_cert.as_deref(), Some(dir.path().join("vault-ca.pem").as_path()));
        let TransitAuth::Approle { role_id_file, secret_id_file, .. } = &t.auth else { panic!("{:?}", t.auth) };
        assert_eq!(role_id_file.as_deref(), Some(dir.path().join("bao/role_id").as_path()));
        assert_eq!(secret_id_file.as_deref(), Some(Path::new("/abs/secret_id")));

        let text = transit_base(
            dir.path(),
            "address = \"http://vault:8200\"\nkey = \"k\"\n[keys.transit.auth]\nmethod = \"token\"\ntoken_file = \"t\"\n",
        );
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        let KeySource::Transit(t) = &cfg.keys else { panic!("transit expected") };
        assert_eq!(t.auth, TransitAuth::Token { token_file: Some(dir.path().join("t")), token_env: None });
    }

    #[test]
    fn a_bad_transit_table_fails_at_config_load() {
        let dir = tempfile::tempdir().unwrap();
        // An unknown key (token_file belongs in [keys.transit.auth]).
        let text = transit_base(dir.path(), "address = \"http://v:8200\"\nkey = \"k\"\ntoken_file = \"t\"\n");
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["keys.transit"]);
        assert!(err.to_string().contains("token_file"), "{err}");
        // A missing key.
        let text = transit_base(dir.path(), "address = \"http://v:8200\"\n");
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
        // A bad address and a missing CA file, reported together.
        let text = transit_base(dir.path(), "address = \"vault:8200\"\nkey = \"k\"\nca_cert = \"nope.pem\"\n");
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["keys.transit.address", "keys.transit.ca_cert"]);
        // No table at all.
        let text = base(dir.path()).replace("signing = { path = \"s.pem\" }", "source = \"transit\"");
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().keys(), ["keys.transit"]);
    }

    #[test]
    fn the_deploy_configs_are_valid_apart_from_their_files() {
        // Their paths point into containers; everything else must validate.
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let configs = [
            "config/auth-server.toml",
            "config/auth-server.ha.toml",
            "compose/auth-server.toml",
            "k8s/base/auth-server/config/auth-server.toml",
            "k8s/overlays/production/auth-server.toml",
        ];
        for rel in configs {
            let text = std::fs::read_to_string(deploy.join(rel)).unwrap();
            let raw = RawConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
            if let Err(e) = Config::from_raw(raw, &deploy) {
                let other: Vec<_> = e.errors().iter().filter(|e| !e.problem.starts_with("file not found")).collect();
                assert!(other.is_empty(), "{rel}: {other:?}");
            }
        }
    }

    #[test]
    fn restart_changes_name_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        let text = base(dir.path()).replace("[tls]", "issuer = \"other\"\nhttp_addr = \"127.0.0.1:1\"\n[tls]")
            + "[tokens]\naccess_ttl_secs = 60\n[limits]\npassword_queue = 8\n";
        let b = Config::from_toml_str(&text, dir.path()).unwrap();
        assert_eq!(a.restart_changes(&b), ["issuer", "http_addr", "limits"]);
        assert!(a.restart_changes(&a).is_empty());
    }

    #[test]
    fn the_audit_trail_defaults_to_stdout_and_its_file_resolves_against_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!(cfg.audit, AuditConfig { enabled: true, path: None });
        let text = base(dir.path()) + "[audit]\npath = \"audit.jsonl\"\n";
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        assert_eq!(cfg.audit.path, Some(dir.path().join("audit.jsonl")));
        let off = Config::from_toml_str(&(base(dir.path()) + "[audit]\nenabled = false\n"), dir.path()).unwrap();
        assert!(!off.audit.enabled);
        for bad in ["no/such/dir/audit.jsonl", "."] {
            let text = base(dir.path()) + &format!("[audit]\npath = \"{bad}\"\n");
            let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
            assert_eq!(err.keys(), ["audit.path"], "{bad}: {err}");
        }
        let err = Config::from_toml_str(&(base(dir.path()) + "[audit]\nfile = \"x\"\n"), dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["audit.file"], "{err}");
        let changed = Config::from_toml_str(&text_with_audit(dir.path()), dir.path()).unwrap();
        assert_eq!(cfg.restart_changes(&changed), ["audit"]);
    }

    fn text_with_audit(dir: &Path) -> String {
        base(dir) + "[audit]\npath = \"other.jsonl\"\n"
    }

    #[test]
    fn the_grpc_idle_timeout_must_outlast_a_keepalive_round() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path())
            + "[limits]\ngrpc_keepalive_interval_secs = 30\ngrpc_keepalive_timeout_secs = 20\n\
               grpc_idle_timeout_secs = 50\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["limits.grpc_idle_timeout_secs"]);
        let ok = text.replace("grpc_idle_timeout_secs = 50", "grpc_idle_timeout_secs = 51");
        let cfg = Config::from_toml_str(&ok, dir.path()).unwrap();
        assert_eq!(cfg.limits.grpc_idle_timeout_secs, 51);
        let defaults = LimitsConfig::default();
        assert!(
            defaults.grpc_idle_timeout_secs
                > defaults.grpc_keepalive_interval_secs + defaults.grpc_keepalive_timeout_secs
        );
    }

    #[test]
    fn durable_writes_get_half_the_pool_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let redis = |extra: &str| {
            let text = format!("store = \"redis://r:6379\"\n{}[redis]\n{extra}", base(dir.path()));
            Config::from_toml_str(&text, dir.path()).map(|c| c.redis().unwrap().durable_connections())
        };
        assert_eq!(redis("").unwrap(), 0, "no durable writes without min_replicas_acked");
        assert_eq!(redis("min_replicas_acked = 1\n").unwrap(), 2);
        assert_eq!(redis("min_replicas_acked = 1\npool_size = 1\n").unwrap(), 1);
        assert_eq!(redis("min_replicas_acked = 1\npool_size = 7\n").unwrap(), 4);
        assert_eq!(redis("min_replicas_acked = 1\ndurable_pool_size = 6\n").unwrap(), 6);
        assert_eq!(redis("durable_pool_size = 129\n").unwrap_err().keys(), ["redis.durable_pool_size"]);
    }

    #[test]
    fn replica_acks_wait_less_than_a_command_may_take() {
        let dir = tempfile::tempdir().unwrap();
        let base = |dir: &Path| format!("store = \"redis://r:6379\"\n{}", base(dir));
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        let redis = cfg.redis().unwrap();
        assert_eq!((redis.min_replicas_acked, redis.replica_ack_timeout_ms), (0, 500));
        let text = base(dir.path()) + "[redis]\nmin_replicas_acked = 1\nreplica_ack_timeout_ms = 2000\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["redis.replica_ack_timeout_ms"], "{err}");
        let text = base(dir.path()) + "[redis]\nmin_replicas_acked = 1\nreplica_ack_timeout_ms = 0\n";
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().keys(), ["redis.replica_ack_timeout_ms"]);
        let text = base(dir.path()) + "[redis]\nmin_replicas_acked = 17\n";
        assert_eq!(Config::from_toml_str(&text, dir.path()).unwrap_err().keys(), ["redis.min_replicas_acked"]);
        let text = base(dir.path()) + "[redis]\nmin_replicas_acked = 2\nreplica_ack_timeout_ms = 1999\n";
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        let redis = cfg.redis().unwrap();
        assert_eq!((redis.min_replicas_acked, redis.replica_ack_timeout_ms), (2, 1999));
    }

    #[test]
    fn the_key_layout_follows_the_url_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let layout = |store: &str, extra: &str| {
            let text = format!("store = \"{store}\"\n{}{extra}", base(dir.path()));
            Config::from_toml_str(&text, dir.path()).unwrap().redis().unwrap().key_layout().is_sharded()
        };
        assert!(!layout("redis://r:6379", ""));
        assert!(layout("redis-cluster://r:7000", ""));
        assert!(!layout("redis-cluster://r:7000", "[redis]\nlayout = \"single\"\n"));
        assert!(layout("redis://r:6379", "[redis]\nlayout = \"sharded\"\n"));
        let text = format!("store = \"redis://r:6379\"\n{}[redis]\nlayout = \"wide\"\n", base(dir.path()));
        assert!(Config::from_toml_str(&text, dir.path()).is_err());
    }

    #[test]
    fn partition_detection_time_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()) + "[redis]\nsubscriber_ping_ms = 8000\ncommand_timeout_ms = 2001\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["redis.subscriber_ping_ms"]);
        let message = err.to_string();
        assert!(message.contains("redis.command_timeout_ms") && message.contains("10000"), "{message}");
        let ok = text.replace("command_timeout_ms = 2001", "command_timeout_ms = 2000");
        Config::from_toml_str(&ok, dir.path()).unwrap();
        // A long command timeout alone breaks the bound.
        let text = base(dir.path()) + "[redis]\ncommand_timeout_ms = 600000\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["redis.subscriber_ping_ms"]);
        let text = base(dir.path()) + "[redis]\nsubscriber_ping_ms = 60000\ncommand_timeout_ms = 100\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["redis.subscriber_ping_ms"]);
        let defaults = RedisConfig::default();
        assert!(defaults.subscriber_ping_ms + defaults.command_timeout_ms <= MAX_PARTITION_DETECTION_MS);
    }

    #[test]
    fn the_jwks_max_age_stays_below_the_prepublication_window() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!(cfg.jwks_max_age_secs, DEFAULT_JWKS_MAX_AGE_SECS);
        assert!(DEFAULT_JWKS_MAX_AGE_SECS < default_prepublish_secs());
        let keys = |extra: &str| base(dir.path()).replace("[keys]\n", &format!("[keys]\n{extra}\n"));
        let err = Config::from_toml_str(&keys("jwks_max_age_secs = 300"), dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["keys.jwks_max_age_secs"]);
        assert!(err.to_string().contains("300 s, keys.prepublish_secs"), "{err}");
        let cfg = Config::from_toml_str(&keys("jwks_max_age_secs = 300\nprepublish_secs = 900"), dir.path()).unwrap();
        assert_eq!(cfg.jwks_max_age_secs, 300);
        let err = Config::from_toml_str(&keys("jwks_max_age_secs = 10\nprepublish_secs = 10"), dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["keys.jwks_max_age_secs"]);

        // Transit: the window is the publish grace less the refresh interval.
        let transit = |extra: &str| {
            transit_base(dir.path(), "address = \"http://v:8200\"\nkey = \"k\"\npublish_grace_secs = 100\n")
                .replace("source = \"transit\"", &format!("source = \"transit\"\n{extra}"))
        };
        assert_eq!(Config::from_toml_str(&transit(""), dir.path()).unwrap().jwks_max_age_secs, 60);
        let err = Config::from_toml_str(&transit("jwks_max_age_secs = 70"), dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["keys.jwks_max_age_secs"]);
        assert!(err.to_string().contains("70 s, keys.transit.publish_grace_secs"), "{err}");
        let err = Config::from_toml_str(&transit("prepublish_secs = 600"), dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["keys.prepublish_secs"]);
    }

    #[test]
    fn the_public_url_and_side_port_tls_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let with = |top: &str| base(dir.path()).replace("[tls]", &format!("{top}\n[tls]"));
        let cfg = Config::from_toml_str(&with("http_public_url = \"https://auth.example.com/\""), dir.path()).unwrap();
        assert_eq!(cfg.http_public_url.as_deref(), Some("https://auth.example.com"));
        for bad in ["auth.example.com", "https://", "https://a/b?c=d", "ftp://a"] {
            let err = Config::from_toml_str(&with(&format!("http_public_url = {bad:?}")), dir.path()).unwrap_err();
            assert_eq!(err.keys(), ["http_public_url"], "{bad}");
        }
        let text = base(dir.path()) + "[http_tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let cfg = Config::from_toml_str(&text, dir.path()).unwrap();
        let tls = cfg.http_tls.unwrap();
        assert_eq!((tls.cert, tls.client_ca), (dir.path().join("c.pem"), None));
        let text = base(dir.path()) + "[http_tls]\ncert = \"nope.pem\"\nkey = \"k.pem\"\nclient_ca = \"gone.pem\"\n";
        assert_eq!(
            Config::from_toml_str(&text, dir.path()).unwrap_err().keys(),
            ["http_tls.cert", "http_tls.client_ca"]
        );
    }

    #[test]
    fn the_admin_tools_variables_are_not_configuration() {
        let key = crate::admin::ENV_PREFIX.to_owned() + "ADDR";
        let env = EnvOverrides::from_vars([
            (key.as_str(), "https://auth:50051"),
            (&key.to_ascii_lowercase(), "https://auth:50051"),
            ("AUTH_SERVER_TOKENS__ADMIN_PERM", "ops:admin"),
        ]);
        assert_eq!(env.names().collect::<Vec<_>>(), ["AUTH_SERVER_TOKENS__ADMIN_PERM"]);
    }

    #[test]
    fn the_handshake_budget_is_bounded_and_within_the_connection_cap() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path()) + "[limits]\ngrpc_max_connections = 10\ngrpc_max_handshakes = 11\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        assert_eq!(err.keys(), ["limits.grpc_max_handshakes"]);
        let text = base(dir.path()) + "[limits]\ngrpc_max_handshakes = 0\ngrpc_handshake_timeout_ms = 60001\n";
        let err = Config::from_toml_str(&text, dir.path()).unwrap_err();
        let mut keys = err.keys();
        keys.sort_unstable();
        assert_eq!(keys, ["limits.grpc_handshake_timeout_ms", "limits.grpc_max_handshakes"]);
        let cfg = Config::from_toml_str(&base(dir.path()), dir.path()).unwrap();
        assert_eq!((cfg.limits.grpc_max_handshakes, cfg.limits.grpc_handshake_timeout_ms), (128, 4_000));
    }
}
