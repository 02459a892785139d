//! Integration tests of service-sdk against a real auth-server over mTLS.

mod batch;
mod client;
mod identity;
mod metrics;
mod pki;
mod server;
mod session;
mod stub;
#[cfg(feature = "vault")]
mod vault;
mod verify;
