//! Integration tests of auth-server over real mTLS.

mod edge;
mod flows;
mod limits;
mod redis;
mod server;
mod transport;
