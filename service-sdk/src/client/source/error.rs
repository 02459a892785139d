//! Why no token could be had, and the one mapping of those reasons to gRPC
//! statuses (for handlers that call another service) and from the errors of
//! the exchange service.

use crate::BoxError;

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The auth service cannot be reached (or answered with a transient
    /// error) and no unexpired token is cached.
    #[error("auth service unavailable and no unexpired token cached for audience {audience:?} ({reason})")]
    Unavailable {
        /// The audience asked for.
        audience: String,
        /// The gRPC code or transport failure, never a secret.
        reason: String,
    },
    /// The auth service rejected the credentials or the subject token.
    #[error("auth service rejected the exchange for audience {audience:?}")]
    Unauthenticated {
        /// The audience asked for.
        audience: String,
    },
    /// The policy does not let this service ask for that audience.
    #[error("auth service policy refuses audience {audience:?}")]
    PermissionDenied {
        /// The audience asked for.
        audience: String,
    },
    /// The request was refused as malformed (e.g. an empty audience).
    #[error("invalid token request for audience {audience:?}")]
    InvalidRequest {
        /// The audience asked for.
        audience: String,
    },
    /// The credentials source failed.
    #[error("service credentials unavailable: {0}")]
    Credentials(String),
}

impl TokenError {
    /// Whether the failure is transient (auth service or credentials
    /// unreachable) rather than a refusal.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::Unavailable { .. } | TokenError::Credentials(_))
    }

    /// A short stable label of the kind of failure, for metrics:
    /// `unavailable`, `unauthenticated`, `permission_denied`,
    /// `invalid_request` or `credentials` (never the audience or reason
    /// text).
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Unavailable { .. } => "unavailable",
            TokenError::Unauthenticated { .. } => "unauthenticated",
            TokenError::PermissionDenied { .. } => "permission_denied",
            TokenError::InvalidRequest { .. } => "invalid_request",
            TokenError::Credentials(_) => "credentials",
        }
    }

    /// The error of an exchange service (with its layers) for `audience`:
    ///
    /// - a [`tonic::Status`] maps by its code alone (its message is never
    ///   copied);
    /// - a [`TokenError`] is taken as is;
    /// - anything else (a timeout or load-shedding layer, a transport
    ///   failure) is transient: [`TokenError::Unavailable`] with the error's
    ///   text as the reason.
    pub(super) fn from_exchange(audience: &str, e: BoxError) -> Self {
        if let Some(status) = e.downcast_ref::<tonic::Status>() {
            return Self::from_status(audience, status);
        }
        match e.downcast::<TokenError>() {
            Ok(token_error) => *token_error,
            Err(other) => TokenError::Unavailable { audience: audience.into(), reason: other.to_string() },
        }
    }

    fn from_status(audience: &str, s: &tonic::Status) -> Self {
        let audience = audience.to_owned();
        match s.code() {
            tonic::Code::Unauthenticated => TokenError::Unauthenticated { audience },
            tonic::Code::PermissionDenied => TokenError::PermissionDenied { audience },
            tonic::Code::InvalidArgument => TokenError::InvalidRequest { audience },
            code => TokenError::Unavailable { audience, reason: format!("{code:?}") },
        }
    }
}

/// For handlers that call another service: the one mapping of token errors
/// to statuses, with fixed messages.
impl From<TokenError> for tonic::Status {
    fn from(e: TokenError) -> Self {
        tracing::warn!(error = %e, "no token for downstream call");
        match e {
            TokenError::Unavailable { .. } | TokenError::Credentials(_) => {
                tonic::Status::unavailable("downstream token unavailable")
            }
            TokenError::Unauthenticated { .. } => tonic::Status::unauthenticated("token exchange refused"),
            TokenError::PermissionDenied { .. } => tonic::Status::permission_denied("token exchange refused"),
            TokenError::InvalidRequest { .. } => tonic::Status::internal("invalid token exchange"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn token_errors_map_to_fixed_statuses() {
        let s: tonic::Status = TokenError::Unavailable { audience: "x".into(), reason: "Unavailable".into() }.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "downstream token unavailable");
        let s: tonic::Status = TokenError::PermissionDenied { audience: "x".into() }.into();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn exchange_statuses_map_by_code_and_never_copy_their_message() {
        let from = |s: tonic::Status| TokenError::from_exchange("inventory", Box::new(s));
        assert_eq!(
            from(tonic::Status::unauthenticated("secret detail")),
            TokenError::Unauthenticated { audience: "inventory".into() }
        );
        assert_eq!(
            from(tonic::Status::permission_denied("x")),
            TokenError::PermissionDenied { audience: "inventory".into() }
        );
        assert_eq!(
            from(tonic::Status::invalid_argument("x")),
            TokenError::InvalidRequest { audience: "inventory".into() }
        );
        let e = from(tonic::Status::unavailable("secret detail"));
        assert_eq!(e, TokenError::Unavailable { audience: "inventory".into(), reason: "Unavailable".into() });
        assert!(!e.to_string().contains("secret detail"));
    }

    #[test]
    fn labels_are_fixed_and_never_carry_the_audience_or_reason() {
        let errors = [
            TokenError::Unavailable { audience: "inventory".into(), reason: "Unavailable".into() },
            TokenError::Unauthenticated { audience: "inventory".into() },
            TokenError::PermissionDenied { audience: "inventory".into() },
            TokenError::InvalidRequest { audience: "inventory".into() },
            TokenError::Credentials("file missing".into()),
        ];
        let labels = errors.map(|e| e.label());
        assert_eq!(labels, ["unavailable", "unauthenticated", "permission_denied", "invalid_request", "credentials"]);
    }

    #[test]
    fn layer_errors_are_transient_and_token_errors_pass_through() {
        let e = TokenError::from_exchange("inventory", "request timed out".into());
        assert_eq!(e, TokenError::Unavailable { audience: "inventory".into(), reason: "request timed out".into() });
        assert!(e.is_unavailable());
        let own = TokenError::PermissionDenied { audience: "inventory".into() };
        assert_eq!(TokenError::from_exchange("inventory", Box::new(own.clone())), own);
    }
}
