//! Integration tests of service-sdk against a real auth-server over mTLS.

mod client;
mod vault;
mod verify;
