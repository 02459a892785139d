//! The `auth.v1` wire contract of the token-exchange platform.
//!
//! The `.proto` file lives in `proto/auth/v1/auth.proto`; this crate compiles it
//! with protox (no `protoc` needed) and exposes the generated tonic/prost types
//! plus the encoded file descriptor set for gRPC reflection.
//!
//! ```
//! use auth_proto::auth::v1::{LoginRequest, login_request::Grant, PasswordGrant};
//! let req = LoginRequest {
//!     grant: Some(Grant::Password(PasswordGrant {
//!         username: "alice".into(),
//!         password: "correct horse".into(),
//!     })),
//!     audience: vec!["order".into()],
//!     scope: vec![],
//! };
//! assert!(req.grant.is_some());
//! ```
//!
//! No feature flags.

/// Generated code, grouped by proto package.
pub mod auth {
    /// Package `auth.v1`.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/auth.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/client/auth.v1.rs"));
    }
}

pub mod codec;

/// The encoded `FileDescriptorSet` of `auth/v1/auth.proto`, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/auth_descriptor.bin"));

/// Full gRPC service name, as used by `grpc.health.v1`.
pub const SERVICE_NAME: &str = "auth.v1.Auth";
