//! Integration tests of auth-server over real mTLS.

#![allow(clippy::panic)]

use std::time::Duration;

mod admin;
mod admit;
mod authz;
mod batch;
mod cluster;
mod diag;
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
mod rotation;
mod sentinel;
mod server;
mod stateless;
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

/// Writes a new private key file as `auth-server keygen` does: readable by
/// its owner only (the server refuses a key file other users can read).
fn write_key_file(path: impl AsRef<std::path::Path>, pem: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = path.as_ref();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(pem.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
