//! `service-sdk`: what every service of the token-exchange platform embeds.
//!
//! - **Server side** ([`verify`]): a [`Verifier`] checks incoming access
//!   tokens (keys pinned to one algorithm each, explicit `typ`, `iss`,
//!   `aud`, `exp`, `nbf`, `iat` and `jti` checks, RFC 8705 certificate
//!   binding, pushed revocations, a verified-token cache), with keys from
//!   `GetJwks` over mTLS or an HTTP(S) JWKS URL. [`RequireAuthLayer`] puts it
//!   in front of a tonic server or an axum router and hands handlers typed
//!   [`Claims`] and the raw [`BearerToken`] in request extensions. The layer
//!   takes any [`AuthorizeRequest`] (the verifier is the default one), and
//!   the verifier reports every outcome to one [`VerifyObserver`], where
//!   metrics attach.
//!
//! ```no_run
//! # async fn demo(auth_channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
//! use service_sdk::{Claims, RequireAuthLayer, Verifier};
//! // Keys from GetJwks and revocations from WatchRevocations, both over the
//! // service's own mTLS channel to the auth service
//! // (`MtlsFiles::auth_channel`, which checks the auth server's identity).
//! let verifier = Verifier::builder("auth-service", "inventory").channel(auth_channel).build()?;
//! let layer = RequireAuthLayer::new(verifier);
//! // tonic: Server::builder().layer(layer).add_service(..)
//! // in a handler: Claims::from_request(&req)?.require_perm("inventory:read")?;
//! # let _ = layer; Ok(()) }
//! ```
//!
//! - **Client side**: a [`TokenSource`] exchanges the service's own
//!   credentials ([`EnvCredentials`], [`FileCredentials`], or
//!   `VaultCredentials` with the `vault` feature) for short-lived tokens
//!   whose `aud` is the target service, caches them per (audience, subject),
//!   renews them in the background and serves them from memory.
//!   [`AuthChannel`] attaches `authorization: Bearer …` to every call of any
//!   generated tonic client; [`MtlsFiles`] builds the mTLS channels
//!   (`https://` only). Its [`auth_channel`](MtlsFiles::auth_channel), the
//!   one to give the token source and the verifier, also demands the auth
//!   server's own identity, its SPIFFE ID ([`AuthServerId`], by default
//!   `spiffe://<trust domain>/auth-server`), so that no other service of
//!   the mesh can pass as the auth server.
//!
//! - **One environment** ([`ServiceEnv`]): the conventional variables
//!   (`AUTH_URL`, `AUTH_TLS_CA`, `AUTH_TLS_CERT`, `AUTH_TLS_KEY`,
//!   `AUTH_CREDENTIALS_FILE`, …, falling back to the dev layout under
//!   `AUTH_DEV_DIR`) give the auth channel, the verifier, the token source
//!   and the service's own mTLS server ([`MtlsFiles::server_tls_config`],
//!   which reloads rotated files, served by [`TlsIncoming`]).
//!
//! Call another service, in five lines (any generated client works the way
//! `AuthClient` does here):
//!
//! ```no_run
//! # use auth_proto::auth::v1::{auth_client::AuthClient as InventoryClient, GetJwksRequest};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use service_sdk::{AuthChannel, EnvCredentials, MtlsFiles, TokenSource};
//! let tls = MtlsFiles::new("/tls/ca.pem", "/tls/order.pem", "/tls/order-key.pem");
//! let tokens = TokenSource::builder(tls.auth_channel("https://auth:50051")?, EnvCredentials::from_env()?).build();
//! let mut inventory = InventoryClient::new(AuthChannel::new(tls.channel("https://inventory:50051", "inventory")?, tokens, "inventory"));
//! inventory.get_jwks(GetJwksRequest {}).await?;
//! # Ok(()) }
//! ```
//!
//! Inside a handler behind [`RequireAuthLayer`], calling on behalf of the
//! caller is one line: `let mut inventory =
//! InventoryClient::new(self.inventory.on_behalf_of(&request).await?);`
//! (the result has `sub` = the user and `act` = this service).
//!
//! Everything that retries (token exchanges, JWKS fetches, the revocation
//! stream) waits by one exponential [`backoff::Backoff`].
//!
//! The pure validation step is usable on its own:
//!
//! ```
//! use service_sdk::{KeySet, Validator, VerifyError};
//! let validator = Validator::new("auth-service", "inventory");
//! let keys = KeySet::default();
//! assert_eq!(validator.validate("not.a.token", &keys, 0), Err(VerifyError::Malformed));
//! ```
//!
//! # Feature flags
//!
//! - `vault` (default): `VaultCredentials`, service credentials read from
//!   a Vault KV v2 secret after an AppRole, Kubernetes or token login.
//! - `redis`: `verify::RedisRevocation`, revocation by a per-request Redis
//!   lookup instead of the pushed [`RevocationFeed`], and `redis_layout`,
//!   the auth server's Redis key layout and read script, shared with its
//!   Redis store.
//! - `metrics`: the SDK's metrics (below) through the
//!   [`metrics`](https://docs.rs/metrics/0.24) facade. Off by default; when
//!   off, nothing is recorded and nothing is compiled in.
//! - `otel`: W3C trace context end to end and OTLP span export ([`otel`]):
//!   [`AuthChannel`] and the token source's exchange call send the current
//!   span's `traceparent`; [`RequireAuthLayer`] opens a `request` span per
//!   checked request, a child of the caller's when the caller is trusted
//!   (by default: mTLS with a verified client certificate; see
//!   [`TraceTrust`]), a new trace otherwise; [`otel::OtlpExport`] exports
//!   spans to an OTLP/gRPC collector. Off by default, so services that do
//!   not trace compile no OpenTelemetry.
//!
//! # Metrics
//!
//! With the `metrics` feature the SDK records into whatever recorder the
//! service installs, e.g. `metrics-exporter-prometheus`. Install it before
//! building the [`Verifier`] and the [`TokenSource`]: their series are
//! registered then (the verify hot path only adds to handles it already
//! holds).
//!
//! ```no_run
//! # async fn demo(auth_channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
//! let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! let verifier = service_sdk::Verifier::builder("auth-service", "inventory").channel(auth_channel).build()?;
//! // Serve `prometheus.render()` on the service's /metrics.
//! # let _ = (prometheus, verifier); Ok(()) }
//! ```
//!
//! Labels come from fixed sets, or from the service's own configuration:
//! `audience` is, on a verifier's series, the verifier's own audience, and
//! on a token source's, the audience the service asks a token for (the
//! audience of an [`AuthChannel`]; at most 64 per source, any more are
//! counted as `_other`). Nothing from a request or a token is a label.
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `auth_sdk_verifications_total` | counter | `audience`, `outcome`, `reason` | every verification: `outcome` `accepted`, `refused` (the token's fault: `Unauthenticated`) or `unavailable` (no keys, stale feed: `Unavailable`); `reason` is the refusal's [`VerifyError::reason`] (absent when accepted) |
//! | `auth_sdk_verify_cache_hits_total` | counter | `audience` | verifications answered from the verified-token cache |
//! | `auth_sdk_verify_cache_misses_total` | counter | `audience` | verifications that checked a signature |
//! | `auth_sdk_jwks_refreshes_total` | counter | `audience`, `trigger`, `outcome`, `reason` | key set fetches: `trigger` `initial`, `scheduled` or `unknown_kid`; `outcome` `ok` or `failed` with the [`JwksError::reason`](verify::JwksError::reason) |
//! | `auth_sdk_revocation_feed_connected` | gauge | `audience` | 1 while the `WatchRevocations` stream is open |
//! | `auth_sdk_revocation_feed_connects_total` | counter | `audience` | streams opened (more than one: reconnects) |
//! | `auth_sdk_revocation_feed_staleness_seconds` | gauge | `audience` | seconds since the feed was last heard from (since the verifier was built, before its first snapshot), on the verifier's clock; set every second by a task of the verifier, so it is current when scraped |
//! | `auth_sdk_revocation_feed_last_heard_timestamp_seconds` | gauge | `audience` | Unix time of the last snapshot, revocation or heartbeat (`time() - ...` is the staleness, computed by Prometheus) |
//! | `auth_sdk_revocation_feed_entries` | gauge | `audience` | revoked `jti`s and `sid`s held |
//! | `auth_sdk_revocation_served_stale_total` | counter | `audience` | checks answered from the last known deny set of a stale feed ([`StalePolicy::ServeLastKnown`]) |
//! | `auth_sdk_token_exchanges_total` | counter | `audience`, `outcome` | `ExchangeToken` calls of a [`TokenSource`]: `outcome` `ok` or the [`TokenError::label`] (`credentials_rejected`: the auth service refused this service's own credentials; `credentials`: the credentials could not be read, nothing was sent) |
//! | `auth_sdk_token_renewals_total` | counter | `audience` | exchanges sent by the background renewer |
//! | `auth_sdk_token_waits_total` | counter | `audience` | token requests that found no valid cached token and waited for an exchange |
//!
//! The feed series exist only for a verifier whose revocation check has a
//! feed (not with a per-request Redis lookup). Two verifiers with the same
//! audience in one process share their series.

pub mod backoff;
mod cause;
mod claims;
mod client;
pub mod env;
mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "redis")]
pub mod redis_layout;
mod server;
pub mod verify;

pub use claims::{ACCESS_TOKEN_TYP, Actor, Audience, Claims, Confirmation};
pub use client::{
    AUTH_SERVER_NAME, AccessToken, AuthChannel, AuthFuture, AuthServerId, BoxError, CLIENT_ID_VAR, CLIENT_SECRET_VAR,
    ClientCredentials, ClientSecret, Clock, Credentials, CredentialsError, EnvCredentials, ExchangeRequest,
    ExchangeResponse, ExchangeService, FileCredentials, GrpcExchange, ManualClock, MtlsFiles, SystemClock, TlsError,
    TokenError, TokenRequest, TokenSource, TokenSourceBuilder, TokenSourceStats,
};
#[cfg(feature = "vault")]
pub use client::{KUBERNETES_JWT_PATH, SecretSource, VaultAuth, VaultCredentials, VaultCredentialsBuilder};
pub use env::{EnvError, ServiceEnv};
pub use server::TlsIncoming;
pub use verify::{
    AuthorizeRequest, BearerToken, FeedHealth, FeedOptions, FeedStats, JwksOptions, JwksSource, KeySet,
    PeerCertificate, RequireAuth, RequireAuthLayer, RevocationCheck, RevocationFeed, StalePolicy, TraceTrust,
    Validator, Verifier, VerifierStats, VerifyError, VerifyEvent, VerifyKey, VerifyObserver, parse_bearer,
};
