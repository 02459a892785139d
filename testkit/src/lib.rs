//! `testkit`: test support for the workspace's crates, kept out of the
//! production libraries (a dev-dependency only).
//!
//! - [`TestServer`]: a real auth-server over mTLS on `127.0.0.1:0` with a
//!   fresh dev environment, built with `auth_server::server::Server::builder`
//!   like the binary;
//! - [`RedisProcess`]: a real `redis-server` on a free port that a test can
//!   kill, pause and restart, alone or as a replica of another;
//! - [`RedisCluster`]: a real three-primary Redis Cluster
//!   (`--cluster-enabled yes`, joined by `redis-cli --cluster create`);
//! - [`Sentinels`]: three real Redis Sentinels watching a primary, with
//!   timeouts short enough for a failover in seconds;
//! - [`OpenBao`]: a real `bao server -dev` (Vault API);
//! - [`TcpProxy`]: a TCP forwarder a test can freeze (a silent partition)
//!   or point at another server;
//! - [`HookedStore`]: a real store behind a test's hook, to count or fail
//!   chosen store calls.
//!
//! It re-exports [`auth_server`], so other crates' tests reach the server's
//! types (keys, clock, config) through this one dev-dependency.
//!
//! ```no_run
//! # async fn run() {
//! let srv = testkit::TestServer::start().await;
//! let channel = srv.channel("order").await; // mTLS as dev client `order`
//! # drop(channel);
//! # }
//! ```
//!
//! Helpers panic with a clear message on failure: they run in tests only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bao;
mod cluster;
mod proxy;
mod redis;
mod sentinel;
mod server;
mod store;

pub use auth_server;
pub use bao::{OpenBao, ROOT_TOKEN, bao_binary};
pub use cluster::RedisCluster;
pub use proxy::TcpProxy;
pub use redis::{RedisProcess, RedisReply};
pub use sentinel::Sentinels;
pub use server::{TestServer, TestServerBuilder};
pub use store::{HookedStore, Intercept, StoreCall, StoreHook};
