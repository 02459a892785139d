//! Integration tests of auth-server over real mTLS.

mod flows;
mod redis;
mod server;
mod transport;
