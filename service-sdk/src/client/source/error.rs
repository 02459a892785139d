//! Why no token could be had, and the one mapping of those reasons to gRPC
//! statuses (for handlers that call another service) and from the errors of
//! the exchange service.

use crate::BoxError;

/// Why no token could be had.
///
/// The variants say whose fault it is: the auth service's or the network's
/// ([`Unavailable`](Self::Unavailable)), this service's own credentials or
/// account ([`CredentialsRejected`](Self::CredentialsRejected),
/// [`Credentials`](Self::Credentials), [`PermissionDenied`](Self::PermissionDenied)),
/// or the user's token a call acts for ([`Unauthenticated`](Self::Unauthenticated)).
/// Where the auth service answered, `reason` holds its status code and
/// message (and a transport failure's causes, such as the names a TLS
/// handshake expected and was shown), for the service's log; the status a
/// handler returns from it ([`From<TokenError> for Status`](#impl-From<TokenError>-for-Status))
/// carries only a fixed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The auth service cannot be reached (or answered with a transient
    /// error) and no unexpired token is cached.
    #[error("auth service unavailable and no unexpired token cached for audience {audience:?} ({reason})")]
    Unavailable {
        /// The audience asked for.
        audience: String,
        /// The auth service's status code and message, or the transport
        /// failure; never a secret.
        reason: String,
    },
    /// The auth service refused this service's own credentials: no account
    /// has its client id, the secret is wrong, or the client certificate is
    /// not the account's. Its caller is not at fault.
    #[error("auth service refused this service's own credentials (audience {audience:?}): {reason}")]
    CredentialsRejected {
        /// The audience asked for.
        audience: String,
        /// The auth service's status code and message.
        reason: String,
    },
    /// The auth service refused the subject token: the token of the user
    /// this call acts for (expired, revoked, not addressed to this service).
    #[error("auth service refused the user's token for audience {audience:?}: {reason}")]
    Unauthenticated {
        /// The audience asked for.
        audience: String,
        /// The auth service's status code and message.
        reason: String,
    },
    /// The policy does not let this service ask for that audience (or act
    /// for that user there).
    #[error("auth service policy refuses audience {audience:?}: {reason}")]
    PermissionDenied {
        /// The audience asked for.
        audience: String,
        /// The auth service's status code and message.
        reason: String,
    },
    /// The request was refused as malformed (e.g. an empty audience).
    #[error("invalid token request for audience {audience:?}: {reason}")]
    InvalidRequest {
        /// The audience asked for.
        audience: String,
        /// The auth service's status code and message.
        reason: String,
    },
    /// The credentials source failed.
    #[error("service credentials unavailable: {0}")]
    Credentials(String),
}

/// The auth service's answer to an exchange whose client credentials it
/// refused; any other `UNAUTHENTICATED` answer to an exchange on behalf of
/// a user is about the user's token.
const INVALID_CLIENT_CREDENTIALS: &str = "invalid client credentials";

impl TokenError {
    /// Whether the failure is transient (auth service or credentials
    /// unreachable) rather than a refusal.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::Unavailable { .. } | TokenError::Credentials(_))
    }

    /// A short stable label of the kind of failure, for metrics:
    /// `unavailable`, `credentials_rejected`, `unauthenticated`,
    /// `permission_denied`, `invalid_request` or `credentials` (never the
    /// audience or reason text).
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Unavailable { .. } => "unavailable",
            TokenError::CredentialsRejected { .. } => "credentials_rejected",
            TokenError::Unauthenticated { .. } => "unauthenticated",
            TokenError::PermissionDenied { .. } => "permission_denied",
            TokenError::InvalidRequest { .. } => "invalid_request",
            TokenError::Credentials(_) => "credentials",
        }
    }

    /// The error of an exchange service (with its layers) for `audience`,
    /// on behalf of a user if `on_behalf_of_user`:
    ///
    /// - a [`tonic::Status`] maps by its code: `UNAUTHENTICATED` is this
    ///   service's credentials ([`CredentialsRejected`](Self::CredentialsRejected))
    ///   when it acted as itself or the auth service says `invalid client
    ///   credentials`, and the user's token otherwise; the status's code,
    ///   message and causes become the `reason`;
    /// - a [`TokenError`] is taken as is;
    /// - anything else (a timeout or load-shedding layer, a transport
    ///   failure) is transient: [`TokenError::Unavailable`] with the error's
    ///   text and causes as the reason.
    pub(super) fn from_exchange(audience: &str, on_behalf_of_user: bool, e: BoxError) -> Self {
        if let Some(status) = e.downcast_ref::<tonic::Status>() {
            return Self::from_status(audience, on_behalf_of_user, status);
        }
        match e.downcast::<TokenError>() {
            Ok(token_error) => *token_error,
            Err(other) => TokenError::Unavailable { audience: audience.into(), reason: crate::cause::chain(&*other) },
        }
    }

    fn from_status(audience: &str, on_behalf_of_user: bool, s: &tonic::Status) -> Self {
        let audience = audience.to_owned();
        let reason = crate::cause::status(s);
        match s.code() {
            tonic::Code::Unauthenticated if !on_behalf_of_user || s.message() == INVALID_CLIENT_CREDENTIALS => {
                TokenError::CredentialsRejected { audience, reason }
            }
            tonic::Code::Unauthenticated => TokenError::Unauthenticated { audience, reason },
            tonic::Code::PermissionDenied => TokenError::PermissionDenied { audience, reason },
            tonic::Code::InvalidArgument => TokenError::InvalidRequest { audience, reason },
            _ => TokenError::Unavailable { audience, reason },
        }
    }
}

/// For handlers that call another service: the one mapping of token errors
/// to statuses, with fixed messages (the detail goes to the log). A refusal
/// of this service's own credentials is `INTERNAL`: the fault is the
/// service's, not its caller's, and retrying does not help until an
/// operator fixes the account or the secret. Only a refused user token is
/// `UNAUTHENTICATED`.
impl From<TokenError> for tonic::Status {
    fn from(e: TokenError) -> Self {
        tracing::warn!(error = %e, "no token for downstream call");
        match e {
            TokenError::Unavailable { .. } | TokenError::Credentials(_) => {
                tonic::Status::unavailable("downstream token unavailable")
            }
            TokenError::CredentialsRejected { .. } => {
                tonic::Status::internal("this service's credentials were refused by the auth service")
            }
            TokenError::Unauthenticated { .. } => {
                tonic::Status::unauthenticated("user token refused for the downstream call")
            }
            TokenError::PermissionDenied { .. } => tonic::Status::permission_denied("token exchange refused"),
            TokenError::InvalidRequest { .. } => tonic::Status::internal("invalid token exchange"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn fields(audience: &str, reason: &str) -> (String, String) {
        (audience.into(), reason.into())
    }

    #[test]
    fn token_errors_map_to_fixed_statuses() {
        let s: tonic::Status = TokenError::Unavailable { audience: "x".into(), reason: "Unavailable".into() }.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "downstream token unavailable");
        let (audience, reason) = fields("x", "PermissionDenied: audience not allowed for this account");
        let s: tonic::Status = TokenError::PermissionDenied { audience, reason }.into();
        assert_eq!((s.code(), s.message()), (tonic::Code::PermissionDenied, "token exchange refused"));
    }

    #[test]
    fn a_refusal_of_the_services_own_credentials_is_internal_to_its_caller_not_unauthenticated() {
        // The service acted as itself: whatever the message, only its own
        // credentials were presented.
        let e = TokenError::from_exchange("inventory", false, Box::new(tonic::Status::unauthenticated("bad")));
        assert!(matches!(e, TokenError::CredentialsRejected { .. }), "{e:?}");
        // On behalf of a user, the auth service's message tells whose.
        let own = tonic::Status::unauthenticated("invalid client credentials");
        let e = TokenError::from_exchange("inventory", true, Box::new(own));
        assert_eq!(
            e,
            TokenError::CredentialsRejected {
                audience: "inventory".into(),
                reason: "Unauthenticated: invalid client credentials".into()
            }
        );
        assert!(!e.is_unavailable());
        assert_eq!(e.label(), "credentials_rejected");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert_eq!(status.message(), "this service's credentials were refused by the auth service");

        let users = tonic::Status::unauthenticated("token revoked");
        let e = TokenError::from_exchange("inventory", true, Box::new(users));
        assert_eq!(
            e,
            TokenError::Unauthenticated {
                audience: "inventory".into(),
                reason: "Unauthenticated: token revoked".into()
            }
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn exchange_statuses_carry_the_auth_services_code_and_message_into_the_log_line() {
        let from = |s: tonic::Status| TokenError::from_exchange("inventory", true, Box::new(s));
        let e = from(tonic::Status::permission_denied("audience not allowed for this account"));
        let (audience, reason) = fields("inventory", "PermissionDenied: audience not allowed for this account");
        assert_eq!(e, TokenError::PermissionDenied { audience, reason });
        // The log line is the error's text.
        assert!(e.to_string().contains("PermissionDenied: audience not allowed for this account"), "{e}");
        let e = from(tonic::Status::invalid_argument("audience is required"));
        assert!(matches!(e, TokenError::InvalidRequest { .. }) && e.to_string().contains("audience is required"));
        let e = from(tonic::Status::unavailable("state store unavailable"));
        let (audience, reason) = fields("inventory", "Unavailable: state store unavailable");
        assert_eq!(e, TokenError::Unavailable { audience, reason });
        // The status a handler returns still says nothing of it.
        let status = tonic::Status::from(e);
        assert_eq!(status.message(), "downstream token unavailable");
    }

    #[test]
    fn labels_are_fixed_and_never_carry_the_audience_or_reason() {
        let r = || "Unavailable: x".to_owned();
        let errors = [
            TokenError::Unavailable { audience: "inventory".into(), reason: r() },
            TokenError::CredentialsRejected { audience: "inventory".into(), reason: r() },
            TokenError::Unauthenticated { audience: "inventory".into(), reason: r() },
            TokenError::PermissionDenied { audience: "inventory".into(), reason: r() },
            TokenError::InvalidRequest { audience: "inventory".into(), reason: r() },
            TokenError::Credentials("file missing".into()),
        ];
        let labels = errors.map(|e| e.label());
        assert_eq!(
            labels,
            [
                "unavailable",
                "credentials_rejected",
                "unauthenticated",
                "permission_denied",
                "invalid_request",
                "credentials"
            ]
        );
    }

    #[test]
    fn layer_errors_are_transient_and_token_errors_pass_through() {
        let e = TokenError::from_exchange("inventory", false, "request timed out".into());
        assert_eq!(e, TokenError::Unavailable { audience: "inventory".into(), reason: "request timed out".into() });
        assert!(e.is_unavailable());
        let own = TokenError::PermissionDenied { audience: "inventory".into(), reason: "by a layer".into() };
        assert_eq!(TokenError::from_exchange("inventory", false, Box::new(own.clone())), own);
    }
}
