//! Revoke: an access token, a `jti`, a refresh-token family or a session.
//!
//! Presenting the token itself (access or refresh) is proof of possession.
//! Revoking by `jti` or `sid` needs the caller's own access token: the jti
//! must be the caller's (same `sub`), the sid the caller's own session,
//! unless the caller holds the admin permission. Every revocation is
//! acknowledged only after the store has made it durable.
//!
//! The decisions are the pure functions of [`policy`]; this module only
//! verifies, looks up and writes.

use crate::core::{AuthCore, Policy};
use crate::error::AuthError;
use crate::grant::refresh_digest;
use crate::store::{Revocation, RevocationKind};

/// What to revoke.
#[derive(Debug)]
pub enum RevokeTarget {
    /// An access token (its jti).
    AccessToken(String),
    /// A jti.
    Jti(String),
    /// A refresh token (its family).
    RefreshToken(String),
    /// A session (logout).
    Sid(String),
}

/// What a Revoke did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The entry is durable on the deny list (and published).
    Recorded(Revocation),
    /// The presented access token had already expired: there was nothing
    /// to deny-list, and saying so is harmless.
    AlreadyExpired,
}

impl Revoked {
    /// What was revoked, as the response names it: `jti`, `family` or
    /// `session`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Recorded(Revocation { kind: RevocationKind::Jti, .. }) | Self::AlreadyExpired => "jti",
            Self::Recorded(Revocation { kind: RevocationKind::Family, .. }) => "family",
            Self::Recorded(Revocation { kind: RevocationKind::Sid, .. }) => "session",
        }
    }
}

/// Revokes `target`. `caller_token` is the `authorization: Bearer` token of
/// the request, needed for `Jti` and `Sid`. Returns what was revoked.
pub async fn revoke(core: &AuthCore, target: RevokeTarget, caller_token: Option<&str>) -> Result<Revoked, AuthError> {
    let now = core.clock.now_unix();
    let current = core.policy();
    let t = &current.tokens;
    let revocation = match target {
        RevokeTarget::AccessToken(token) => {
            let keys = current.keys.public_keys();
            let checked = core.validator.validate_for(&token, &keys.keys, now, None);
            match policy::access_token(checked)? {
                Some(r) => r,
                None => return Ok(Revoked::AlreadyExpired),
            }
        }
        RevokeTarget::RefreshToken(token) => {
            let Some(record) = core.store.refresh_record(&refresh_digest(&token), now).await? else {
                return Err(AuthError::Unauthenticated("invalid refresh token"));
            };
            policy::family(record, now, t)
        }
        RevokeTarget::Jti(jti) => {
            let caller = caller(core, &current, caller_token).await?;
            let issued = core.store.issued(&jti, now).await?;
            policy::jti(&caller, jti, issued.as_ref(), now, t)?
        }
        RevokeTarget::Sid(sid) => {
            let caller = caller(core, &current, caller_token).await?;
            policy::sid(&caller, sid, now, t)?
        }
    };
    core.store.revoke(revocation.clone(), now).await?;
    Ok(Revoked::Recorded(revocation))
}

async fn caller(core: &AuthCore, current: &Policy, token: Option<&str>) -> Result<service_sdk::Claims, AuthError> {
    let token = token.ok_or(AuthError::Unauthenticated("revoking by jti or sid needs the caller's bearer token"))?;
    core.verify_presented(current, token, None).await
}

/// Who may revoke what, and until when the entry must live: free of I/O.
pub mod policy {
    use service_sdk::{Claims, VerifyError};

    use crate::config::TokensConfig;
    use crate::error::AuthError;
    use crate::store::{IssuedToken, RefreshRecord, Revocation, RevocationKind};

    /// A presented access token, as validated: its jti until its `exp`;
    /// nothing when it has already expired; refused when it is not a valid
    /// token of this issuer.
    pub fn access_token(checked: Result<Claims, VerifyError>) -> Result<Option<Revocation>, AuthError> {
        match checked {
            Ok(c) => Ok(Some(Revocation { kind: RevocationKind::Jti, id: c.jti, expires_at: c.exp })),
            Err(VerifyError::Expired) => Ok(None),
            Err(e) => Err(AuthError::token_rejected(e)),
        }
    }

    /// A presented refresh token's family, until its last possible member
    /// expires (later members can live until now + refresh TTL).
    pub fn family(record: RefreshRecord, now: u64, t: &TokensConfig) -> Revocation {
        let until = record.expires_at.max(now + t.refresh_ttl_secs);
        Revocation { kind: RevocationKind::Family, id: record.family, expires_at: until }
    }

    /// A jti: the caller's own (as the store recorded it at issue), or
    /// anyone's for an admin. An unknown jti is either expired or not ours;
    /// only an admin may deny-list it blindly, for the longest a token can
    /// live.
    pub fn jti(
        caller: &Claims,
        jti: String,
        issued: Option<&IssuedToken>,
        now: u64,
        t: &TokensConfig,
    ) -> Result<Revocation, AuthError> {
        let admin = caller.has_perm(&t.admin_perm);
        let expires_at = match issued {
            Some(rec) if admin || rec.sub == caller.sub => rec.exp,
            None if admin => now + t.access_ttl_secs.max(t.exchange_max_ttl_secs),
            _ => return Err(AuthError::PermissionDenied("not your token")),
        };
        Ok(Revocation { kind: RevocationKind::Jti, id: jti, expires_at })
    }

    /// A session (logout): the caller's own, or anyone's for an admin,
    /// until every token and refresh token of the session has expired.
    pub fn sid(caller: &Claims, sid: String, now: u64, t: &TokensConfig) -> Result<Revocation, AuthError> {
        if caller.sid.as_deref() != Some(sid.as_str()) && !caller.has_perm(&t.admin_perm) {
            return Err(AuthError::PermissionDenied("not your session"));
        }
        let until = now + t.refresh_ttl_secs.max(t.access_ttl_secs);
        Ok(Revocation { kind: RevocationKind::Sid, id: sid, expires_at: until })
    }

    #[cfg(test)]
    mod tests {
        use service_sdk::Audience;

        use super::*;

        fn claims(sub: &str, sid: Option<&str>, perms: &[&str]) -> Claims {
            Claims {
                iss: "auth-service".into(),
                sub: sub.into(),
                aud: Audience::One("order".into()),
                exp: 2_000,
                nbf: 0,
                iat: 0,
                jti: "j-own".into(),
                sid: sid.map(Into::into),
                client_id: "login".into(),
                role: None,
                perms: perms.iter().map(|s| s.to_string()).collect(),
                act: None,
                cnf: None,
            }
        }

        fn issued(sub: &str) -> IssuedToken {
            IssuedToken { sub: sub.into(), sid: None, exp: 1_500 }
        }

        #[test]
        fn a_live_access_token_is_revoked_until_its_expiry_and_an_expired_one_is_a_no_op() {
            let r = access_token(Ok(claims("alice", None, &[]))).unwrap().unwrap();
            assert_eq!(r, Revocation { kind: RevocationKind::Jti, id: "j-own".into(), expires_at: 2_000 });
            assert_eq!(access_token(Err(VerifyError::Expired)).unwrap(), None);
            let err = access_token(Err(VerifyError::BadSignature)).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid token")));
        }

        #[test]
        fn a_family_lives_as_long_as_its_last_possible_member() {
            let t = TokensConfig::default();
            let record = RefreshRecord {
                family: "f1".into(),
                sid: "s".into(),
                sub: "alice".into(),
                client_id: "login".into(),
                audience: vec![],
                scope: vec![],
                expires_at: 10,
            };
            let r = family(record, 1_000, &t);
            assert_eq!(
                r,
                Revocation { kind: RevocationKind::Family, id: "f1".into(), expires_at: 1_000 + t.refresh_ttl_secs }
            );
        }

        #[test]
        fn a_jti_is_revocable_by_its_owner_or_an_admin_only() {
            let t = TokensConfig::default();
            let alice = claims("alice", None, &[]);
            let r = jti(&alice, "j1".into(), Some(&issued("alice")), 1_000, &t).unwrap();
            assert_eq!(r, Revocation { kind: RevocationKind::Jti, id: "j1".into(), expires_at: 1_500 });
            let err = jti(&alice, "j1".into(), Some(&issued("bob")), 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("not your token")));
            let err = jti(&alice, "j1".into(), None, 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied(_)));

            let admin = claims("svc:admin", None, &["auth:admin"]);
            assert_eq!(jti(&admin, "j1".into(), Some(&issued("bob")), 1_000, &t).unwrap().expires_at, 1_500);
            let blind = jti(&admin, "j2".into(), None, 1_000, &t).unwrap();
            assert_eq!(blind.expires_at, 1_000 + t.access_ttl_secs.max(t.exchange_max_ttl_secs));
        }

        #[test]
        fn a_session_is_revocable_by_its_owner_or_an_admin_only() {
            let t = TokensConfig::default();
            let alice = claims("alice", Some("s1"), &[]);
            let r = sid(&alice, "s1".into(), 1_000, &t).unwrap();
            assert_eq!(r.kind, RevocationKind::Sid);
            assert_eq!(r.expires_at, 1_000 + t.refresh_ttl_secs.max(t.access_ttl_secs));
            let err = sid(&alice, "s2".into(), 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("not your session")));
            let admin = claims("svc:admin", None, &["auth:admin"]);
            assert_eq!(sid(&admin, "s2".into(), 1_000, &t).unwrap().id, "s2");
        }

        #[test]
        fn the_response_names_what_was_revoked() {
            use crate::revoke::Revoked;
            let r = |kind| Revoked::Recorded(Revocation { kind, id: "x".into(), expires_at: 1 });
            assert_eq!(r(RevocationKind::Jti).label(), "jti");
            assert_eq!(r(RevocationKind::Family).label(), "family");
            assert_eq!(r(RevocationKind::Sid).label(), "session");
            assert_eq!(Revoked::AlreadyExpired.label(), "jti");
        }
    }
}
