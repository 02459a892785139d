//! Integration tests of auth-server over real mTLS.

mod authz;
mod edge;
mod enumeration;
mod expiry;
mod floods;
mod flows;
mod limits;
mod logs;
mod redis;
mod refresh;
mod server;
mod transport;
mod watch;
