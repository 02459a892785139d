//! Refresh: single-use rotation with reuse detection. Refresh tokens are
//! opaque to clients, `<family>.<secret>` (a 256-bit random secret after the
//! family id, so a sharded store finds the family's slot from the token);
//! the store keeps only their SHA-256 digest, under the family.
//!
//! Commit first, then sign: one store step spends the presented token,
//! stores its successor (a random secret chosen beforehand, in the same
//! family) and, if `tokens.record_issued` records it, the new access
//! token's `jti` (also chosen beforehand), and returns the spent token's
//! record. The flow then decides the new access token from that record
//! ([`policy::grant`]: the user still exists, scopes narrowed by the
//! directory) and signs it: one store round trip per Refresh.
//!
//! After the commit:
//! - a refusal by the policy (the user was removed) stands, and the
//!   presented token stays spent: nothing of its family is handed out
//!   again;
//! - a signing failure (a transit key unreachable, say) runs one
//!   compensating store step, [`Store::undo_refresh`](crate::store::Store::undo_refresh),
//!   which makes the presented token live again and deletes its successor
//!   and the `jti` record, so the client's retry is a plain refresh. Should
//!   the undo fail too, it is logged and the signing error returned: the
//!   retry then counts as a reuse (and revokes the family) unless it comes
//!   within `tokens.refresh_reuse_grace_secs`.
//!
//! A failure before the commit spends nothing. A reply lost after it (a
//! timeout, a dropped connection) makes the retry look like reuse;
//! `tokens.refresh_reuse_grace_secs` (default 0 = off) lets a retry within
//! that window get a new pair, which replaces the successor stored moments
//! before, instead of revoking the family. The decisions are in [`policy`],
//! pure functions; this module commits and signs.
//!
//! A token issued before tokens named their family (no `<family>.`
//! prefix) costs one more round trip: its record is read first, for the
//! family its successor is named after.

use crate::core::AuthCore;
use crate::directory::random_token;
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, RefreshIssued, refresh_digest, refresh_token, refresh_token_family};
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
    // The successor names the presented token's family.
    let family = match refresh_token_family(presented) {
        Some(family) => family.to_owned(),
        None => match core.store.refresh_record(&digest, now).await? {
            Some(record) => record.family,
            None => return Err(AuthError::Unauthenticated("invalid refresh token")),
        },
    };
    let next = refresh_token(&family, &random_token(32)?);
    let jti = random_token(16)?;
    let commit = RefreshCommit {
        digest: &digest,
        next_digest: &refresh_digest(&next),
        next_expires_at: now + t.refresh_ttl_secs,
        jti: &jti,
        issued_exp: policy::recorded(t).then_some(now + t.access_ttl_secs),
        reuse_grace_secs: t.refresh_reuse_grace_secs,
    };
    let outcome = core.store.commit_refresh(&commit, now).await?;
    if let ConsumeOutcome::Reused(record) = &outcome {
        core.events.emit(&Event::RefreshReuse { family: &record.family, sid: &record.sid });
    }
    let record = policy::committed(outcome)?;
    // Spent now: a refusal here stands (the user is gone).
    let grant = policy::grant(Some(record), |sub| current.directory.user(sub), t.access_ttl_secs)?;
    let access = match core.sign_as(&current, grant, now, jti.clone()).await {
        Ok(access) => access,
        Err(e) => {
            undo(core, &commit, now).await;
            return Err(e);
        }
    };
    Ok(Issued { kind: GrantKind::Refresh, access, refresh: Some(RefreshIssued { token: next }) })
}

/// Puts the presented token back after a signing failure (see the module
/// docs). Logs, without any token or digest, what it could not do.
async fn undo(core: &AuthCore, commit: &RefreshCommit<'_>, now: u64) {
    match core.store.undo_refresh(commit, now).await {
        Ok(true) => tracing::info!("refresh rotation undone after a signing failure: the token is live again"),
        Ok(false) => tracing::warn!(
            "refresh rotation not undone after a signing failure: another presentation of the token moved on"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "refresh rotation not undone after a signing failure: a retry counts as a reuse unless within \
             tokens.refresh_reuse_grace_secs"
        ),
    }
}

/// The refresh policy, free of I/O.
pub mod policy {
    use crate::config::TokensConfig;
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

    /// Whether the registry records the refreshed access token: it always
    /// has a session, so whenever there is a registry
    /// (`tokens.record_issued` = `sessions` or `all`).
    pub fn recorded(t: &TokensConfig) -> bool {
        t.record_issued.records(Some("the refresh token's session"))
    }

    /// Whether the commit went through: a rotation (or a retry within the
    /// grace window) goes on to sign, from the spent token's record it
    /// returns; a reuse (the family is now revoked) or a token that was
    /// invalid is refused.
    pub fn committed(outcome: ConsumeOutcome) -> Result<RefreshRecord, AuthError> {
        match outcome {
            ConsumeOutcome::Rotated(record) => Ok(record),
            ConsumeOutcome::Retried(record) => {
                tracing::info!("refresh token presented again within the reuse grace window: successor replaced");
                Ok(record)
            }
            ConsumeOutcome::Reused(_) => {
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
        fn a_refreshed_token_is_recorded_whenever_there_is_a_registry() {
            use crate::config::RecordIssued;
            let mut t = TokensConfig::default();
            for (mode, want) in [(RecordIssued::None, false), (RecordIssued::Sessions, true), (RecordIssued::All, true)]
            {
                t.record_issued = mode;
                assert_eq!(recorded(&t), want, "{mode:?}");
            }
        }

        #[test]
        fn only_a_rotation_or_a_retry_goes_on_to_sign_from_the_spent_record() {
            assert_eq!(committed(ConsumeOutcome::Rotated(record(&["a"]))).unwrap(), record(&["a"]));
            assert_eq!(committed(ConsumeOutcome::Retried(record(&["b"]))).unwrap(), record(&["b"]));
            let err = committed(ConsumeOutcome::Reused(record(&[]))).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("refresh token reused; its family is revoked")));
            let err = committed(ConsumeOutcome::Invalid).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid refresh token")));
        }
    }
}
