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
pub mod verify;

pub use claims::{ACCESS_TOKEN_TYP, Actor, Audience, Claims, Confirmation};
pub use verify::{KeySet, Validator, VerifyError, VerifyKey};
