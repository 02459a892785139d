//! The edge: what stands between the network and the handlers.
//!
//! - [`incoming`]: the per-connection stage. TCP accept (`TCP_NODELAY`,
//!   keepalive) under the port's connection cap, the mTLS handshake under a
//!   timeout, the caller's [`PeerIdentity`](crate::tls::PeerIdentity) read
//!   once from its certificate into [`ConnInfo`], which every request of
//!   the connection finds in its extensions, and preface and idle read
//!   deadlines ([`ConnLimits`]). Certificate reload attaches here.
//! - [`content_type`]: a tower layer refusing requests that are not gRPC
//!   (HTTP 415, as the gRPC over HTTP/2 spec asks).
//! - [`framing`]: a tower layer ending a request body whose gRPC framing is
//!   broken (cut inside a frame, or no message at all) with
//!   `INVALID_ARGUMENT`, as the codec answers a message that does not decode.
//! - [`trace`]: the per-RPC stage, a tower layer in the gRPC server's stack
//!   giving every RPC a span with its method and gRPC code. Metrics, load
//!   shedding and rate limits are layers beside it.

pub mod content_type;
pub mod framing;
pub mod incoming;
pub mod trace;

pub use content_type::GrpcContentTypeLayer;
pub use framing::GrpcFramingLayer;
pub use incoming::{ConnInfo, ConnLimits, HandshakeConfig, TlsConn, TlsIncoming};
pub use trace::{Capped, RpcTraceLayer, rpc_trace};
