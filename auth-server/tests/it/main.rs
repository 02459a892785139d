//! Integration tests of auth-server over real mTLS.

#![allow(clippy::panic)]

use std::time::Duration;

mod admin;
mod authz;
mod edge;
mod enumeration;
mod expiry;
mod floods;
mod flows;
mod limits;
mod logs;
mod observe;
mod ops;
mod redis;
mod refresh;
mod server;
mod tls;
mod transport;
mod watch;

/// Upper bound on waiting for something that must happen (reconnects,
/// resyncs); reaching it fails the test instead of hanging it. Never a
/// performance assertion.
const PATIENCE: Duration = Duration::from_secs(30);

/// `f`'s output; panics naming `what` if it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f).await.unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}
