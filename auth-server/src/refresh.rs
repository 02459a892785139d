//! Refresh: single-use rotation with reuse detection. Refresh tokens are
//! opaque to clients, `<family>.<secret>` (a 256-bit random secret after the
//! family id, so a sharded store finds the family's slot from the token);
//! the store keeps only their SHA-256 digest, under the family.
//!
//! Mint first, then commit: the flow reads the presented token's record,
//! decides and signs the new access token, and only then spends the token,
//! stores its successor and (if `tokens.record_issued` records it) records
//! the new access token in one atomic store step. A failure before that step spends nothing, so the client's
//! retry is a plain refresh. A reply lost after it (a timeout, a dropped
//! connection) makes the retry look like reuse; `tokens.refresh_reuse_grace_secs`
//! (default 0 = off) lets a retry within that window get a new pair, which
//! replaces the successor stored moments before, instead of revoking the
//! family. The decisions are in [`policy`], pure functions; this module
//! reads, signs and commits (two store round trips, as before).

use crate::core::AuthCore;
use crate::directory::random_token;
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, RefreshIssued, refresh_digest, refresh_token};
use crate::observe::Event;
use crate::store::{ConsumeOutcome, RefreshCommit};

/// Spends `presented` and returns a new access token and refresh token.
/// Presenting a spent token revokes its family and is refused (unless it
/// is a retry within the reuse grace window).
pub async fn refresh(core: &AuthCore, presented: &str) -> Result<Issued, AuthError> {
    if presented.is_empty() {
        return Err(AuthError::InvalidArgument("refresh_token is required"));
    }
    let now = core.clock.now_unix();
    let current = core.policy();
    let t = &current.tokens;
    let digest = refresh_digest(presented);
    let record = core.store.refresh_record(&digest, now).await?;
    // Named in the audit trail should this turn out to be a reuse.
    let family = record.as_ref().map(|r| (r.family.clone(), r.sid.clone()));
    let grant = policy::grant(record, |sub| current.directory.user(sub), t.access_ttl_secs)?;
    let access = core.sign(&current, grant, now).await?;
    // The successor names the same family (the grant exists, so the record
    // was read).
    let family_id = family.as_ref().map(|(f, _)| f.as_str()).unwrap_or_default();
    let next = refresh_token(family_id, &random_token(32)?);
    let recorded = current.recorded(&access.claims);
    let commit = RefreshCommit {
        digest: &digest,
        next_digest: &refresh_digest(&next),
        next_expires_at: now + t.refresh_ttl_secs,
        jti: &access.claims.jti,
        issued: recorded.as_ref(),
        reuse_grace_secs: t.refresh_reuse_grace_secs,
    };
    let outcome = core.store.commit_refresh(&commit, now).await?;
    if let (ConsumeOutcome::Reused, Some((family, sid))) = (&outcome, &family) {
        core.events.emit(&Event::RefreshReuse { family, sid });
    }
    policy::committed(outcome)?;
    Ok(Issued { kind: GrantKind::Refresh, access, refresh: Some(RefreshIssued { token: next }) })
}

/// The refresh policy, free of I/O.
pub mod policy {
    use crate::directory::User;
    use crate::error::AuthError;
    use crate::grant::{Grant, narrow};
    use crate::store::{ConsumeOutcome, RefreshRecord};

    /// What the next access token of a family says. An unknown or expired
    /// token is refused. The user's current grants bound the refresh: a
    /// removed permission or user takes effect at the next refresh, and the
    /// scope granted at login is never widened.
    pub fn grant<'a>(
        record: Option<RefreshRecord>,
        user: impl FnOnce(&str) -> Option<&'a User>,
        access_ttl: u64,
    ) -> Result<Grant, AuthError> {
        let Some(record) = record else {
            return Err(AuthError::Unauthenticated("invalid refresh token"));
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
            cnf: None,
        })
    }

    /// Whether the commit went through: a rotation (or a retry within the
    /// grace window) issues the minted pair; a reuse (the family is now
    /// revoked) or a token that went invalid meanwhile is refused, and the
    /// minted pair is dropped unseen.
    pub fn committed(outcome: ConsumeOutcome) -> Result<(), AuthError> {
        match outcome {
            ConsumeOutcome::Rotated(_) => Ok(()),
            ConsumeOutcome::Retried(_) => {
                tracing::info!("refresh token presented again within the reuse grace window: successor replaced");
                Ok(())
            }
            ConsumeOutcome::Reused => {
                tracing::warn!("refresh token reused: family revoked");
                Err(AuthError::Unauthenticated("refresh token reused; its family is revoked"))
            }
            ConsumeOutcome::Invalid => Err(AuthError::Unauthenticated("invalid refresh token")),
        }
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
            let g = grant(Some(record(&["orders:read"])), |_| Some(&user), 900).unwrap();
            assert_eq!((g.sub.as_str(), g.sid.as_deref(), g.client_id.as_str()), ("alice", Some("s1"), "login"));
            assert_eq!(g.aud, strings(&["order"]));
            assert_eq!(g.ttl, 900);
            assert_eq!(g.role.as_deref(), Some("customer"));
        }

        #[test]
        fn refresh_never_widens_and_follows_removed_permissions() {
            let user = alice(&["orders:read", "orders:create", "orders:admin"]);
            let g = grant(Some(record(&["orders:read", "orders:create"])), |_| Some(&user), 900).unwrap();
            assert_eq!(g.perms, strings(&["orders:read", "orders:create"]));
            let user = alice(&["orders:create"]);
            let g = grant(Some(record(&["orders:read", "orders:create"])), |_| Some(&user), 900).unwrap();
            assert_eq!(g.perms, strings(&["orders:create"]));
            let g = grant(Some(record(&[])), |_| Some(&user), 900).unwrap();
            assert!(g.perms.is_empty());
        }

        #[test]
        fn unknown_and_orphaned_tokens_are_refused() {
            let err = grant(None, |_| None, 900).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid refresh token")));
            let err = grant(Some(record(&[])), |_| None, 900).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("user no longer exists")));
        }

        #[test]
        fn only_a_rotation_or_a_retry_issues_the_minted_pair() {
            assert!(committed(ConsumeOutcome::Rotated(record(&[]))).is_ok());
            assert!(committed(ConsumeOutcome::Retried(record(&[]))).is_ok());
            let err = committed(ConsumeOutcome::Reused).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("refresh token reused; its family is revoked")));
            let err = committed(ConsumeOutcome::Invalid).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid refresh token")));
        }
    }
}
