//! `service-sdk`: what every service of the token-exchange platform embeds.
//!
//! - **Server side** ([`verify`]): validate incoming access tokens with keys
//!   pinned to one algorithm each, explicit `iss`/`aud`/`exp`/`nbf`/`iat`
//!   checks, and typed [`Claims`].
//!
//! ```
//! use service_sdk::{KeySet, Validator, VerifyError};
//! let validator = Validator::new("auth-service", "inventory");
//! let keys = KeySet::default();
//! assert_eq!(validator.validate("not.a.token", &keys, 0), Err(VerifyError::Malformed));
//! ```
//!
//! No feature flags yet.

mod claims;
mod client;
pub mod verify;

#[cfg(feature = "vault")]
pub use client::{KUBERNETES_JWT_PATH, SecretSource, VaultAuth, VaultCredentials, VaultCredentialsBuilder};
pub use client::{
    AccessToken, AuthChannel, AuthFuture, BoxError, CLIENT_ID_VAR, CLIENT_SECRET_VAR, ClientCredentials,
    ClientSecret, Clock, Credentials, CredentialsError, EnvCredentials, FileCredentials, ManualClock, MtlsFiles,
    SystemClock, TlsError, TokenError, TokenRequest, TokenSource, TokenSourceBuilder, TokenSourceStats,
};
pub use claims::{ACCESS_TOKEN_TYP, Actor, Audience, Claims, Confirmation};
pub use verify::{
    BearerToken, FeedOptions, JwksOptions, JwksSource, KeySet, PeerCertificate, RequireAuth, RequireAuthLayer,
    RevocationCheck, RevocationFeed, Validator, Verifier, VerifyError, VerifyKey,
};
