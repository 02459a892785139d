//! The one error type of the flows, and its one mapping to `tonic::Status`.

use crate::keys::KeyError;
use crate::store::StoreError;

/// Why a flow refused or failed. Every reason is a fixed string: no input,
/// token or secret ever reaches an error message.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// Credentials or a presented token are wrong.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// Authenticated, but the policy refuses.
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    /// The state store cannot be reached.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The signer failed or cannot be reached.
    #[error("signing keys: {0}")]
    Keys(#[from] KeyError),
    /// A bug.
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidArgument(r) => {
                tracing::debug!(reason = r, "invalid argument");
                tonic::Status::invalid_argument(r)
            }
            AuthError::Unauthenticated(r) => {
                tracing::info!(reason = r, "unauthenticated");
                tonic::Status::unauthenticated(r)
            }
            AuthError::PermissionDenied(r) => {
                tracing::info!(reason = r, "permission denied");
                tonic::Status::permission_denied(r)
            }
            AuthError::Store(e) => {
                tracing::warn!(error = %e, "store failure");
                tonic::Status::unavailable("state store unavailable")
            }
            AuthError::Keys(KeyError::Unavailable(e)) => {
                tracing::warn!(error = %e, "signer unavailable");
                tonic::Status::unavailable("signer unavailable")
            }
            AuthError::Keys(e) => {
                tracing::error!(error = %e, "signing failure");
                tonic::Status::internal("internal error")
            }
            AuthError::Internal(r) => {
                tracing::error!(reason = r, "internal error");
                tonic::Status::internal("internal error")
            }
        }
    }
}
