//! The edge: what stands between the network and the handlers.
//!
//! - [`incoming`]: the per-connection stage. TCP accept (`TCP_NODELAY`,
//!   keepalive), the mTLS handshake under a timeout, and the caller's
//!   [`PeerIdentity`](crate::tls::PeerIdentity) read once from its
//!   certificate into [`ConnInfo`], which every request of the connection
//!   finds in its extensions. Connection caps and certificate reload attach
//!   here.
//! - [`trace`]: the per-RPC stage, a tower layer in the gRPC server's stack
//!   giving every RPC a span with its method and gRPC code. Metrics, load
//!   shedding and rate limits are layers beside it.

pub mod incoming;
pub mod trace;

pub use incoming::{ConnInfo, DEFAULT_HANDSHAKE_TIMEOUT, TlsConn, TlsIncoming};
pub use trace::{Capped, RpcTraceLayer, rpc_trace};
