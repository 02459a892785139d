//! The one error type of the flows, and its one mapping to `tonic::Status`.
//!
//! Every error has a public face, [`AuthError::code`] and
//! [`AuthError::public_message`] (fixed and short: what a caller sees), and
//! a log detail, its `Display` (which may name an internal cause, never a
//! secret). Only [`From<AuthError> for tonic::Status`](#impl-From<AuthError>-for-Status)
//! joins the two: it logs the detail and sends the public face. A batch
//! item can carry its own code and message from the same two methods.

use service_sdk::VerifyError;
use tonic::Code;

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
    /// A limit refuses the call for now: the password queue is full, a
    /// username is backing off after failed logins, or the caller's rate
    /// limit is spent. Retrying later may succeed.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(&'static str),
    /// The state store cannot be reached.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The replica's own deny set cannot be trusted now (its revocation
    /// feed is not live, or not yet read): a presented token cannot be
    /// checked, so it is refused. Retrying, on this replica or another,
    /// may succeed.
    #[error("revocation feed: {0}")]
    RevocationFeed(&'static str),
    /// The signer failed or cannot be reached.
    #[error("signing keys: {0}")]
    Keys(#[from] KeyError),
    /// A bug.
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl AuthError {
    /// A presented token failed validation: a fixed reason per cause.
    pub fn token_rejected(e: VerifyError) -> Self {
        Self::Unauthenticated(match e {
            VerifyError::Expired => "token expired",
            VerifyError::NotYetValid | VerifyError::IssuedInFuture => "token not yet valid",
            VerifyError::WrongIssuer => "token from another issuer",
            VerifyError::WrongAudience => "token not addressed to the caller",
            VerifyError::TooLarge => "token too large",
            VerifyError::Revoked => "token revoked",
            _ => "invalid token",
        })
    }

    /// Whether the error refuses the request (its input, credentials or
    /// policy, or a limit), as opposed to a failure of the server's own
    /// parts (store, signer, a bug).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::InvalidArgument(_)
                | Self::Unauthenticated(_)
                | Self::PermissionDenied(_)
                | Self::ResourceExhausted(_)
        )
    }

    /// The gRPC code a caller sees.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Store(_) | Self::RevocationFeed(_) | Self::Keys(KeyError::Unavailable(_)) => Code::Unavailable,
            Self::Keys(_) | Self::Internal(_) => Code::Internal,
        }
    }

    /// The fixed, short message a caller sees. Refusals name their reason;
    /// failures of the server's own parts say only which part.
    pub fn public_message(&self) -> &'static str {
        match self {
            Self::InvalidArgument(r)
            | Self::Unauthenticated(r)
            | Self::PermissionDenied(r)
            | Self::ResourceExhausted(r) => r,
            Self::Store(_) => "state store unavailable",
            Self::RevocationFeed(_) => "revocation state unavailable",
            Self::Keys(KeyError::Unavailable(_)) => "signer unavailable",
            Self::Keys(_) | Self::Internal(_) => "internal error",
        }
    }

    /// The configuration key whose setting made this refusal, and that an
    /// operator would change to allow the call: for the server's log only,
    /// never the caller's status (which must not describe the
    /// configuration). `None` for refusals no setting allows (a bad
    /// password, an expired token) and for failures.
    pub fn config_key(&self) -> Option<&'static str> {
        Some(match self {
            Self::PermissionDenied(r) => match *r {
                "audience not allowed for users" => "tokens.user_audiences",
                "audience not allowed for this account" => "accounts_file: the account's audiences",
                "delegation chain too deep" => "tokens.max_act_depth",
                "not your token" | "not your session" => "tokens.admin_perm",
                "a token for another service can revoke only itself" => "tokens.self_audience",
                r if r.starts_with("no registry of issued tokens") => "tokens.record_issued",
                _ => return None,
            },
            Self::Unauthenticated(r) => match *r {
                // An unknown client_id, a wrong secret, or a certificate
                // that is not the account's mtls_identity (the log line
                // before says which).
                "invalid client credentials" => "accounts_file",
                "user no longer exists" => "users_file",
                _ => return None,
            },
            Self::ResourceExhausted(r) => match *r {
                "rate limit exceeded" => "limits.client_rate_per_sec, limits.client_rate_burst",
                "too many failed logins; retry later" => "limits.login_backoff_after",
                "server busy: too many password checks waiting" => "limits.password_queue",
                "too many revocation watchers on this replica" => "limits.watch_max_streams",
                "too many revocation watchers for this client" => "limits.watch_max_streams_per_client",
                _ => return None,
            },
            _ => return None,
        })
    }

    /// Logs the detail at a level that fits: refusals are routine, failures
    /// of the server's own parts are not. A refusal made by a setting names
    /// its key ([`AuthError::config_key`]).
    pub(crate) fn log(&self) {
        if let Some(config_key) = self.config_key() {
            match self {
                Self::ResourceExhausted(r) => tracing::info!(reason = r, config_key, "resource exhausted"),
                Self::Unauthenticated(r) => tracing::info!(reason = r, config_key, "unauthenticated"),
                other => tracing::info!(reason = other.public_message(), config_key, "permission denied"),
            }
            return;
        }
        match self {
            Self::InvalidArgument(r) => tracing::debug!(reason = r, "invalid argument"),
            Self::Unauthenticated(r) => tracing::info!(reason = r, "unauthenticated"),
            Self::PermissionDenied(r) => tracing::info!(reason = r, "permission denied"),
            Self::ResourceExhausted(r) => tracing::info!(reason = r, "resource exhausted"),
            Self::Store(e) => tracing::warn!(error = %e, "store failure"),
            Self::RevocationFeed(r) => {
                tracing::warn!(reason = r, "presented token refused: revocation feed not current")
            }
            Self::Keys(KeyError::Unavailable(e)) => tracing::warn!(error = %e, "signer unavailable"),
            Self::Keys(e) => tracing::error!(error = %e, "signing failure"),
            Self::Internal(r) => tracing::error!(reason = r, "internal error"),
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        e.log();
        tonic::Status::new(e.code(), e.public_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_of_the_server_parts_hide_their_detail() {
        let e = AuthError::Store(StoreError::Unavailable("connection refused to 10.0.0.7:6379".into()));
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "state store unavailable");
        let status = tonic::Status::from(AuthError::Internal("password pool poisoned"));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn refusals_carry_their_fixed_reason() {
        let e = AuthError::PermissionDenied("not your token");
        assert_eq!((e.code(), e.public_message()), (Code::PermissionDenied, "not your token"));
        let status = tonic::Status::from(AuthError::InvalidArgument("audience is required"));
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "audience is required"));
    }

    /// Every key a refusal names is a key of the configuration (the part
    /// before any `:` or `,`), and the status never carries it.
    #[test]
    fn config_driven_refusals_name_a_real_config_key_only_in_the_log() {
        let config = toml::Value::try_from(crate::config::RawConfig::from_toml_str("").unwrap()).unwrap();
        for e in [
            AuthError::PermissionDenied("audience not allowed for users"),
            AuthError::PermissionDenied("audience not allowed for this account"),
            AuthError::PermissionDenied("delegation chain too deep"),
            AuthError::PermissionDenied("not your token"),
            AuthError::PermissionDenied("a token for another service can revoke only itself"),
            AuthError::PermissionDenied(
                "no registry of issued tokens: revoke another token by presenting it (access_token)",
            ),
            AuthError::Unauthenticated("invalid client credentials"),
            AuthError::Unauthenticated("user no longer exists"),
            AuthError::ResourceExhausted("rate limit exceeded"),
            AuthError::ResourceExhausted("too many failed logins; retry later"),
            AuthError::ResourceExhausted("server busy: too many password checks waiting"),
            AuthError::ResourceExhausted("too many revocation watchers on this replica"),
            AuthError::ResourceExhausted("too many revocation watchers for this client"),
        ] {
            let named = e.config_key().unwrap_or_else(|| panic!("{e} names no key"));
            for key in named.split(',').map(|k| k.split(':').next().unwrap().trim()) {
                let mut at = Some(&config);
                for part in key.split('.') {
                    at = at.and_then(|v| v.get(part));
                }
                // users_file and accounts_file have no default value.
                let known = at.is_some() || ["users_file", "accounts_file"].contains(&key);
                assert!(known, "{e}: {key} is not a config key");
            }
            let status = tonic::Status::from(e);
            assert!(!status.message().contains(named), "{}", status.message());
        }
        assert_eq!(AuthError::Unauthenticated("invalid username or password").config_key(), None);
    }

    #[test]
    fn refusals_are_told_apart_from_failures_of_the_server() {
        assert!(AuthError::PermissionDenied("x").is_refusal());
        assert!(AuthError::ResourceExhausted("x").is_refusal());
        assert!(!AuthError::Internal("x").is_refusal());
        assert!(!AuthError::Store(StoreError::Unavailable("down".into())).is_refusal());
    }

    #[test]
    fn limits_answer_resource_exhausted_with_their_reason() {
        let status = tonic::Status::from(AuthError::ResourceExhausted("rate limit exceeded"));
        assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "rate limit exceeded"));
    }

    #[test]
    fn rejected_tokens_are_unauthenticated_with_a_fixed_reason() {
        let e = AuthError::token_rejected(VerifyError::Expired);
        assert_eq!((e.code(), e.public_message()), (Code::Unauthenticated, "token expired"));
        let e = AuthError::token_rejected(VerifyError::Malformed);
        assert_eq!(e.public_message(), "invalid token");
    }
}
