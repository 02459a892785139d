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
//!   compensating store step, [`Store::undo_refresh`],
//!   before the error is answered. A rotation is undone: the presented
//!   token is live again, its successor and the `jti` record deleted, so
//!   the client's retry is a plain refresh. A retry within the grace
//!   window (the token was spent before it) keeps the token spent from its
//!   first spend and the retry's successor stored, so another retry within
//!   that window still gets a pair, and no later one does. Should the undo
//!   fail too, it is logged and the signing error returned: the retry then
//!   counts as a reuse (and revokes the family) unless it comes within
//!   `tokens.refresh_reuse_grace_secs`.
//!
//! Cancellation: the commit, the signing and the undo run in a task of
//! their own, which the caller awaits. A caller that goes away (the
//! client's deadline passes, it disconnects, the server's request timeout
//! fires: the handler's future is dropped) before the commit spends
//! nothing: the task sees it and does not commit. Once committed, the task
//! is not interrupted by the caller: it still undoes after a signing
//! failure, and a caller gone while it signs has the task drop the signing
//! (a transit call can take seconds) and undo at once. So a client that
//! retries at once finds the token live (a plain refresh, not a reuse)
//! unless its retry reaches the store within the one round trip of the
//! commit or the undo still in flight; such a retry counts as a reuse
//! unless within `tokens.refresh_reuse_grace_secs`. A task that panics
//! after the commit undoes it too, from a guard it owns. A pair taken by
//! the caller whose reply is then lost on the way (a broken connection)
//! is the lost reply below.
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

use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::Instrument;

use crate::core::{AuthCore, Policy, sign_as};
use crate::directory::random_token;
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, RefreshIssued, refresh_digest, refresh_token, refresh_token_family};
use crate::observe::{Event, Events};
use crate::store::{Committed, ConsumeOutcome, RefreshCommit, RefreshRecord, Store, StoreError};

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
    let rotation = Rotation {
        next_digest: refresh_digest(&next),
        next_expires_at: now + t.refresh_ttl_secs,
        jti: random_token(16)?,
        issued_exp: policy::recorded(t).then_some(now + t.access_ttl_secs),
        reuse_grace_secs: t.refresh_reuse_grace_secs,
        digest,
        next,
        now,
        store: Arc::clone(&core.store),
        events: Arc::clone(&core.events),
        issuer: core.issuer.clone(),
        policy: current,
    };
    // From the commit on, in a task the caller's cancellation cannot
    // interrupt (see the module docs).
    let (reply, answer) = oneshot::channel();
    tokio::spawn(rotation.run(reply).instrument(tracing::Span::current()));
    answer.await.map_err(|_| AuthError::Internal("refresh ended without an answer"))?
}

/// One refresh from its commit on, owned by the task that runs it.
struct Rotation {
    digest: String,
    next: String,
    next_digest: String,
    next_expires_at: u64,
    jti: String,
    issued_exp: Option<u64>,
    reuse_grace_secs: u64,
    now: u64,
    store: Arc<dyn Store>,
    events: Arc<dyn Events>,
    issuer: String,
    policy: Arc<Policy>,
}

/// Why a commit is undone.
#[derive(Debug, Clone, Copy)]
enum UndoReason {
    /// Signing the new access token failed.
    SigningFailed,
    /// The caller went away (cancelled) before it took the new pair.
    CallerGone,
    /// The task ended without handing out an answer (it panicked).
    Abandoned,
}

impl UndoReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::SigningFailed => "signing failed",
            Self::CallerGone => "the caller went away before the new pair was handed out",
            Self::Abandoned => "the refresh ended without an answer (it panicked)",
        }
    }
}

impl Rotation {
    fn commit(&self) -> RefreshCommit<'_> {
        RefreshCommit {
            digest: &self.digest,
            next_digest: &self.next_digest,
            next_expires_at: self.next_expires_at,
            jti: &self.jti,
            issued_exp: self.issued_exp,
            reuse_grace_secs: self.reuse_grace_secs,
        }
    }

    /// Commits, signs, and answers on `reply`; undoes the commit when
    /// signing fails (before answering), when the caller goes away while it
    /// signs or before it takes the answer, and when the task panics.
    async fn run(self, mut reply: oneshot::Sender<Result<Issued, AuthError>>) {
        // A caller gone before the commit: nothing is spent.
        if reply.is_closed() {
            return;
        }
        let this = Arc::new(self);
        let (record, committed) = match this.commit_refresh().await {
            Ok(committed) => committed,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        // From here on, a panic (or any other early end) undoes the commit.
        let mut guard = UndoGuard { rotation: Some(Arc::clone(&this)), committed };
        // Spent now: a refusal here stands (the user is gone).
        let t = &this.policy.tokens;
        let grant = match policy::grant(Some(record), |sub| this.policy.directory.user(sub), t.access_ttl_secs) {
            Ok(grant) => grant,
            Err(e) => {
                guard.disarm();
                let _ = reply.send(Err(e));
                return;
            }
        };
        let sign = sign_as(&this.issuer, &this.policy, grant, this.now, this.jti.clone());
        let signed = tokio::select! {
            // The caller went away while signing: undo at once rather than
            // after the signing (a transit call can take seconds), so that
            // its retry finds the token live. Dropping the signing is
            // harmless: nothing of it is handed out.
            () = reply.closed() => {
                guard.disarm();
                this.undo(committed, UndoReason::CallerGone).await;
                return;
            }
            signed = sign => signed,
        };
        match signed {
            Ok(access) => {
                guard.disarm();
                let refresh = Some(RefreshIssued { token: this.next.clone() });
                if reply.send(Ok(Issued { kind: GrantKind::Refresh, access, refresh })).is_err() {
                    this.undo(committed, UndoReason::CallerGone).await;
                }
            }
            Err(e) => {
                // Undone before the error is answered: the client's retry
                // finds the token as the undo left it.
                guard.disarm();
                this.undo(committed, UndoReason::SigningFailed).await;
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The commit: the spent token's record and what was committed, or the
    /// refusal (a reuse, an invalid token).
    async fn commit_refresh(&self) -> Result<(RefreshRecord, Committed), AuthError> {
        let outcome = self.store.commit_refresh(&self.commit(), self.now).await?;
        if let ConsumeOutcome::Reused(record) = &outcome {
            self.events.emit(&Event::RefreshReuse { family: &record.family, sid: &record.sid });
        }
        policy::committed(outcome)
    }

    /// Undoes the commit (see the module docs). Logs, without any token or
    /// digest, what it did and could not do.
    async fn undo(&self, committed: Committed, why: UndoReason) {
        let reason = why.as_str();
        match (committed, self.store.undo_refresh(&self.commit(), committed, self.now).await) {
            (Committed::Rotated, Ok(true)) => tracing::info!(
                reason,
                "refresh rotation undone: the presented token is restored (its family or session may have been \
                 revoked meanwhile)"
            ),
            (Committed::Rotated, Ok(false)) => {
                tracing::warn!(reason, "refresh rotation not undone: another presentation of the token moved on")
            }
            (Committed::Retried, Ok(_)) => tracing::info!(
                reason,
                "refresh retry undone: the token stays spent since its first presentation; a retry within \
                 tokens.refresh_reuse_grace_secs of that still gets a new pair"
            ),
            (_, Err(e @ StoreError::NotDurable { .. })) => tracing::warn!(
                error = %e,
                reason,
                "refresh undo applied, not confirmed on replicas: should the primary be lost now, a retry counts \
                 as a reuse unless within tokens.refresh_reuse_grace_secs"
            ),
            (_, Err(e)) => tracing::error!(
                error = %e,
                reason,
                "refresh undo failed: a retry counts as a reuse unless within tokens.refresh_reuse_grace_secs"
            ),
        }
    }
}

/// Undoes a commit when dropped armed: the task that owns it ended
/// (panicked) without handing out an answer and without undoing. Disarmed
/// once the answer is handed out or the commit undone or left to stand.
struct UndoGuard {
    rotation: Option<Arc<Rotation>>,
    committed: Committed,
}

impl UndoGuard {
    fn disarm(&mut self) {
        self.rotation = None;
    }
}

impl Drop for UndoGuard {
    fn drop(&mut self) {
        let Some(rotation) = self.rotation.take() else {
            return;
        };
        // Dropped while the task unwinds, within its runtime; a runtime
        // shutting down (no handle) has no retry to serve.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let committed = self.committed;
            runtime.spawn(
                async move { rotation.undo(committed, UndoReason::Abandoned).await }
                    .instrument(tracing::Span::current()),
            );
        }
    }
}

/// The refresh policy, free of I/O.
pub mod policy {
    use crate::config::TokensConfig;
    use crate::directory::User;
    use crate::error::AuthError;
    use crate::grant::{Grant, narrow};
    use crate::store::{Committed, ConsumeOutcome, RefreshRecord};

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
    /// returns (with what was committed, should it be undone); a reuse
    /// (the family is now revoked) or a token that was invalid is refused.
    pub fn committed(outcome: ConsumeOutcome) -> Result<(RefreshRecord, Committed), AuthError> {
        match outcome {
            ConsumeOutcome::Rotated(record) => Ok((record, Committed::Rotated)),
            ConsumeOutcome::Retried(record) => {
                tracing::info!("refresh token presented again within the reuse grace window: successor replaced");
                Ok((record, Committed::Retried))
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
            let rotated = committed(ConsumeOutcome::Rotated(record(&["a"]))).unwrap();
            assert_eq!(rotated, (record(&["a"]), Committed::Rotated));
            let retried = committed(ConsumeOutcome::Retried(record(&["b"]))).unwrap();
            assert_eq!(retried, (record(&["b"]), Committed::Retried));
            let err = committed(ConsumeOutcome::Reused(record(&[]))).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("refresh token reused; its family is revoked")));
            let err = committed(ConsumeOutcome::Invalid).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid refresh token")));
        }
    }
}
