//! Refresh: single-use rotation with reuse detection. Refresh tokens are
//! opaque (256 random bits); the store keeps only their SHA-256 digest.
//!
//! The decision is [`policy::decide`], a pure function; this module only
//! spends the presented token in the store (one round trip) and mints.

use crate::core::AuthCore;
use crate::directory::random_token;
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, RefreshIssued, refresh_digest};

/// Spends `presented` and returns a new access token and refresh token.
/// Presenting a spent token revokes its family and is refused.
pub async fn refresh(core: &AuthCore, presented: &str) -> Result<Issued, AuthError> {
    if presented.is_empty() {
        return Err(AuthError::InvalidArgument("refresh_token is required"));
    }
    let now = core.clock.now_unix();
    let next = random_token(32)?;
    let current = core.policy();
    let t = &current.tokens;
    let outcome = core
        .store
        .consume_refresh(&refresh_digest(presented), &refresh_digest(&next), now + t.refresh_ttl_secs, now)
        .await?;
    let grant = policy::decide(outcome, |sub| current.directory.user(sub), t.access_ttl_secs)?;
    let access = core.mint(&current, grant, now).await?;
    Ok(Issued { kind: GrantKind::Refresh, access, refresh: Some(RefreshIssued { token: next }) })
}

/// The refresh policy, free of I/O.
pub mod policy {
    use crate::directory::User;
    use crate::error::AuthError;
    use crate::grant::{Grant, narrow};
    use crate::store::ConsumeOutcome;

    /// What the next access token of a family says, once the store has
    /// spent the presented token. A reused or unknown token is refused. The
    /// user's current grants bound the refresh: a removed permission or user
    /// takes effect at the next refresh, and the scope granted at login is
    /// never widened.
    pub fn decide<'a>(
        outcome: ConsumeOutcome,
        user: impl FnOnce(&str) -> Option<&'a User>,
        access_ttl: u64,
    ) -> Result<Grant, AuthError> {
        let record = match outcome {
            ConsumeOutcome::Rotated(r) => r,
            ConsumeOutcome::Reused => {
                tracing::warn!("refresh token reused: family revoked");
                return Err(AuthError::Unauthenticated("refresh token reused; its family is revoked"));
            }
            ConsumeOutcome::Invalid => return Err(AuthError::Unauthenticated("invalid refresh token")),
        };
        let Some(user) = user(&record.sub) else {
            return Err(AuthError::Unauthenticated("user no longer exists"));
        };
        Ok(Grant {
            perms: narrow(&user.perms, &[], Some(&record.scope)),
            role: user.role.clone(),
            sub: record.sub,
            aud: record.audience,
            ttl: access_ttl,
            sid: Some(record.sid),
            client_id: record.client_id,
            act: None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::store::RefreshRecord;

        fn strings(v: &[&str]) -> Vec<String> {
            v.iter().map(|s| s.to_string()).collect()
        }

        fn record(scope: &[&str]) -> RefreshRecord {
            RefreshRecord {
                family: "f1".into(),
                sid: "s1".into(),
                sub: "alice".into(),
                client_id: "login".into(),
                audience: strings(&["order"]),
                scope: strings(scope),
                expires_at: 9_999,
            }
        }

        fn alice(perms: &[&str]) -> User {
            User {
                username: "alice".into(),
                password_hash: String::new(),
                role: Some("customer".into()),
                perms: strings(perms),
            }
        }

        #[test]
        fn rotation_keeps_session_audience_and_client() {
            let user = alice(&["orders:read", "orders:create"]);
            let g = decide(ConsumeOutcome::Rotated(record(&["orders:read"])), |_| Some(&user), 900).unwrap();
            assert_eq!((g.sub.as_str(), g.sid.as_deref(), g.client_id.as_str()), ("alice", Some("s1"), "login"));
            assert_eq!(g.aud, strings(&["order"]));
            assert_eq!(g.ttl, 900);
            assert_eq!(g.role.as_deref(), Some("customer"));
        }

        #[test]
        fn refresh_never_widens_and_follows_removed_permissions() {
            let user = alice(&["orders:read", "orders:create", "orders:admin"]);
            let g = decide(ConsumeOutcome::Rotated(record(&["orders:read", "orders:create"])), |_| Some(&user), 900)
                .unwrap();
            assert_eq!(g.perms, strings(&["orders:read", "orders:create"]));
            let user = alice(&["orders:create"]);
            let g = decide(ConsumeOutcome::Rotated(record(&["orders:read", "orders:create"])), |_| Some(&user), 900)
                .unwrap();
            assert_eq!(g.perms, strings(&["orders:create"]));
            let g = decide(ConsumeOutcome::Rotated(record(&[])), |_| Some(&user), 900).unwrap();
            assert!(g.perms.is_empty());
        }

        #[test]
        fn reused_unknown_and_orphaned_tokens_are_refused() {
            let err = decide(ConsumeOutcome::Reused, |_| None, 900).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("refresh token reused; its family is revoked")));
            let err = decide(ConsumeOutcome::Invalid, |_| None, 900).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid refresh token")));
            let err = decide(ConsumeOutcome::Rotated(record(&[])), |_| None, 900).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("user no longer exists")));
        }
    }
}
