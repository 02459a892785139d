//! Revoke: an access token, a `jti`, a refresh-token family or a session.
//!
//! The rule (see docs/SECURITY.md):
//! - Presenting the token itself is proof of possession: an access token
//!   revokes its own `jti`, a refresh token its family, and a refresh token
//!   given as `session_refresh_token` its whole login session (logout,
//!   RFC 7009 style).
//! - A bearer token addressed to another service, or one that carries
//!   `act` (a service acting for the user), can revoke at most itself: such
//!   tokens are in other services' hands, and must not let them log the
//!   user out or revoke the user's other tokens.
//! - Ending a session by `sid`, or revoking another token by `jti`, needs a
//!   bearer token addressed to the auth service alone
//!   (`tokens.self_audience`) without `act`: for the caller's own session
//!   and the caller's own tokens (same `sub`), or anyone's when it also
//!   carries `tokens.admin_perm`.
//! - Tokens are not recorded at issue unless `tokens.record_issued` says
//!   so, and none needs a record to be revoked: a user's tokens end with
//!   their session, any token by presenting it (it carries its own `exp`
//!   and `sub`), and an admin's `jti` is deny-listed for the longest a
//!   token can live. Only an owner's `Revoke{jti}` of another of its
//!   tokens, which must show the token is the caller's, needs the
//!   registry; without a record of that `jti` the owner must present the
//!   token itself.
//!
//! Every revocation is acknowledged only after the store has made it
//! durable, and is kept until the revoked tokens' `exp` plus
//! `tokens.verifier_leeway_secs`, since verifiers accept a token until then.
//!
//! The decisions are the pure functions of [`policy`]; this module only
//! verifies, looks up and writes.

use crate::core::{AuthCore, Policy};
use crate::error::AuthError;
use crate::grant::refresh_digest;
use crate::store::{RefreshRevoke, Revocation, RevocationKind};
use crate::tls::PeerIdentity;

/// What to revoke.
#[derive(Debug)]
pub enum RevokeTarget {
    /// An access token (its jti).
    AccessToken(String),
    /// A jti.
    Jti(String),
    /// A refresh token: its family, or with `end_session` its session.
    RefreshToken {
        /// The refresh token (proof of possession).
        token: String,
        /// End the whole login session the token belongs to (logout).
        end_session: bool,
    },
    /// A session (logout).
    Sid(String),
}

/// On whose authority a revocation was made (for the audit trail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// The revoked token itself was presented (an access token, or a
    /// refresh token for its family or session): `sub` is its subject.
    Possession {
        /// The presented token's subject.
        sub: String,
    },
    /// The caller's bearer token (revoking by `jti` or `sid`).
    Bearer {
        /// The bearer token's subject.
        sub: String,
        /// Whether it carries the admin permission.
        admin: bool,
    },
}

/// What a Revoke did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The entry is durable on the deny list (and published).
    Recorded {
        /// What was revoked.
        revocation: Revocation,
        /// On whose authority.
        by: Authority,
    },
    /// The presented access token had already expired: there was nothing
    /// to deny-list, and saying so is harmless.
    AlreadyExpired,
}

impl Revoked {
    /// What was revoked, as the response names it: `jti`, `family` or
    /// `session`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Recorded { revocation: Revocation { kind: RevocationKind::Jti, .. }, .. } | Self::AlreadyExpired => {
                "jti"
            }
            Self::Recorded { revocation: Revocation { kind: RevocationKind::Family, .. }, .. } => "family",
            Self::Recorded { revocation: Revocation { kind: RevocationKind::Sid, .. }, .. } => "session",
        }
    }
}

/// Revokes `target`. `caller_token` is the `authorization: Bearer` token of
/// the request, needed for `Jti` and `Sid`; a certificate-bound one
/// (`cnf`) counts only from `peer`, the certificate it is bound to.
/// Returns what was revoked.
pub async fn revoke(
    core: &AuthCore,
    target: RevokeTarget,
    caller_token: Option<&str>,
    peer: Option<&PeerIdentity>,
) -> Result<Revoked, AuthError> {
    let now = core.clock.now_unix();
    let current = core.policy();
    let t = &current.tokens;
    let (revocation, by) = match target {
        RevokeTarget::AccessToken(token) => {
            let keys = current.keys.public_keys();
            // Judge expiry with the verifiers' leeway: a token they still
            // accept must still be deny-listed.
            let validator = core.validator.clone().leeway_secs(t.verifier_leeway_secs);
            let checked = validator.validate_for(&token, &keys.keys, now, None);
            let sub = checked.as_ref().map(|c| c.sub.clone()).unwrap_or_default();
            match policy::access_token(checked, t)? {
                Some(r) => (r, Authority::Possession { sub }),
                None => return Ok(Revoked::AlreadyExpired),
            }
        }
        RevokeTarget::RefreshToken { token, end_session } => {
            // Read and revoked in one store step: the store applies the
            // policy's deny-until to the record it reads.
            let digest = refresh_digest(&token);
            let (kind, until) = policy::by_refresh_token(end_session, now, t);
            let request = RefreshRevoke { digest: &digest, kind, until };
            let Some((record, revocation)) = core.store.revoke_refresh(&request, now).await? else {
                return Err(AuthError::Unauthenticated("invalid refresh token"));
            };
            let by = Authority::Possession { sub: record.sub };
            // Durable and published by the store already.
            core.revocations.insert(&revocation);
            return Ok(Revoked::Recorded { revocation, by });
        }
        RevokeTarget::Jti(jti) => {
            let caller = caller(core, &current, caller_token, peer).await?;
            // The registry is asked only when there is one, and only about
            // another token than the caller's own.
            let issued = if jti == caller.jti || !t.record_issued.is_on() {
                None
            } else {
                Some(core.store.issued(&jti, now).await?)
            };
            let registered = match &issued {
                None => policy::Registered::NoRegistry,
                Some(Some(record)) => policy::Registered::Found(record),
                Some(None) => policy::Registered::NotFound,
            };
            (policy::jti(&caller, jti, registered, now, t)?, bearer(&caller, t))
        }
        RevokeTarget::Sid(sid) => {
            let caller = caller(core, &current, caller_token, peer).await?;
            (policy::sid(&caller, sid, now, t)?, bearer(&caller, t))
        }
    };
    core.store.revoke(revocation.clone(), now).await?;
    // Durable now: refused on this replica from the next request on,
    // before the store's event comes back.
    core.revocations.insert(&revocation);
    Ok(Revoked::Recorded { revocation, by })
}

fn bearer(caller: &service_sdk::Claims, t: &crate::config::TokensConfig) -> Authority {
    Authority::Bearer { sub: caller.sub.clone(), admin: policy::is_admin(caller, t) }
}

async fn caller(
    core: &AuthCore,
    current: &Policy,
    token: Option<&str>,
    peer: Option<&PeerIdentity>,
) -> Result<service_sdk::Claims, AuthError> {
    let token = token.ok_or(AuthError::Unauthenticated("revoking by jti or sid needs the caller's bearer token"))?;
    // Any audience verifies here; what the token may revoke depends on its
    // audience, and the policy decides that.
    let claims = core.verify_presented(current, token, None).await?;
    // RFC 8705: a bound token speaks only over its own certificate, here as
    // at every verifier.
    if let Some(cnf) = &claims.cnf {
        let presented = peer.map(|p| crate::grant::thumbprint(&p.cert_sha256));
        if presented.as_deref() != Some(cnf.x5t_s256.as_str()) {
            return Err(AuthError::Unauthenticated("token bound to another certificate"));
        }
    }
    Ok(claims)
}

/// Who may revoke what, and until when the entry must live: free of I/O.
pub mod policy {
    use service_sdk::{Claims, VerifyError};

    use crate::config::TokensConfig;
    use crate::error::AuthError;
    use crate::store::{IssuedToken, RefreshRecord, Revocation, RevocationKind};

    /// Until when a deny entry for tokens that expire at `exp` must live:
    /// verifiers accept a token until `exp` plus their leeway.
    pub fn deny_until(exp: u64, t: &TokensConfig) -> u64 {
        exp.saturating_add(t.verifier_leeway_secs)
    }

    /// Whether `caller` is a token for the auth service itself: addressed to
    /// `tokens.self_audience` alone and carrying no `act`. Only such a token
    /// may act on its subject's session and other tokens; any other token
    /// is in some service's hands and can revoke at most itself.
    pub fn speaks_for_its_subject(caller: &Claims, t: &TokensConfig) -> bool {
        let mut aud = caller.aud.iter();
        caller.act.is_none() && aud.next() == Some(t.self_audience.as_str()) && aud.next().is_none()
    }

    /// Whether `caller` may revoke anyone's tokens: the admin permission in
    /// a token for the auth service itself.
    pub fn is_admin(caller: &Claims, t: &TokensConfig) -> bool {
        speaks_for_its_subject(caller, t) && caller.has_perm(&t.admin_perm)
    }

    /// A presented access token, as validated (with the verifiers' leeway):
    /// its jti until its `exp` plus that leeway; nothing when it has expired
    /// even for the verifiers; refused when it is not a valid token of this
    /// issuer.
    pub fn access_token(
        checked: Result<Claims, VerifyError>,
        t: &TokensConfig,
    ) -> Result<Option<Revocation>, AuthError> {
        match checked {
            Ok(c) => Ok(Some(Revocation { kind: RevocationKind::Jti, id: c.jti, expires_at: deny_until(c.exp, t) })),
            Err(VerifyError::Expired) => Ok(None),
            Err(e) => Err(AuthError::token_rejected(e)),
        }
    }

    /// A presented refresh token's family, until its last possible member
    /// expires (later members can live until now + refresh TTL).
    pub fn family(record: RefreshRecord, now: u64, t: &TokensConfig) -> Revocation {
        let until = record.expires_at.max(family_floor(now, t));
        Revocation { kind: RevocationKind::Family, id: record.family, expires_at: until }
    }

    /// The session of a presented refresh token (logout by proof of
    /// possession), for as long as [`sid`] would keep it.
    pub fn session_of(record: RefreshRecord, now: u64, t: &TokensConfig) -> Revocation {
        session(record.sid, now, t)
    }

    /// What a Revoke by refresh token asks the store for, before the
    /// token's record is read: the kind, and the deny-until that
    /// [`RefreshRevoke::deny_until`](crate::store::RefreshRevoke::deny_until)
    /// completes with the record (a family lives at least as long as the
    /// presented token). The result is [`family`] or [`session_of`] of the
    /// record, to the second.
    pub fn by_refresh_token(end_session: bool, now: u64, t: &TokensConfig) -> (RevocationKind, u64) {
        if end_session {
            (RevocationKind::Sid, session_until(now, t))
        } else {
            (RevocationKind::Family, family_floor(now, t))
        }
    }

    /// The least a family revocation lasts: a successor issued now lives
    /// until now + refresh TTL.
    fn family_floor(now: u64, t: &TokensConfig) -> u64 {
        now + t.refresh_ttl_secs
    }

    /// What the registry of issued tokens says of a `jti` to revoke.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Registered<'a> {
        /// There is no registry (`tokens.record_issued = "none"`), or it
        /// was not asked (the caller revokes itself).
        NoRegistry,
        /// Recorded at issue: its owner and expiry.
        Found(&'a IssuedToken),
        /// Not on record: expired, not this issuer's, or issued unrecorded
        /// (`record_issued = "sessions"` records only session tokens).
        NotFound,
    }

    /// The longest any access token of this policy can live: the larger of
    /// the Login and the ExchangeToken lifetimes (a refreshed token lives
    /// as long as a Login's, a client-credentials token at most the
    /// exchange maximum).
    pub fn longest_token_life(t: &TokensConfig) -> u64 {
        t.access_ttl_secs.max(t.exchange_max_ttl_secs)
    }

    /// A jti. A token may always revoke itself. Another jti needs a token
    /// for the auth service ([`speaks_for_its_subject`]): the caller's own
    /// (the same `sub`, as the registry recorded it at issue), or anyone's
    /// for an admin. An admin's jti that is not on record (no registry, or
    /// an unknown jti: expired or not ours) is deny-listed blindly, for the
    /// longest a token can live. An owner without a record of the jti
    /// cannot show the token is theirs and must present the token itself.
    pub fn jti(
        caller: &Claims,
        jti: String,
        registered: Registered<'_>,
        now: u64,
        t: &TokensConfig,
    ) -> Result<Revocation, AuthError> {
        if jti == caller.jti {
            return Ok(Revocation { kind: RevocationKind::Jti, id: jti, expires_at: deny_until(caller.exp, t) });
        }
        if !speaks_for_its_subject(caller, t) {
            return Err(AuthError::PermissionDenied("a token for another service can revoke only itself"));
        }
        let admin = is_admin(caller, t);
        let exp = match registered {
            Registered::Found(rec) if admin || rec.sub == caller.sub => rec.exp,
            Registered::Found(_) => return Err(AuthError::PermissionDenied("not your token")),
            _ if admin => now.saturating_add(longest_token_life(t)),
            Registered::NotFound => return Err(AuthError::PermissionDenied("not your token")),
            Registered::NoRegistry => {
                return Err(AuthError::PermissionDenied(
                    "no registry of issued tokens: revoke another token by presenting it (access_token)",
                ));
            }
        };
        Ok(Revocation { kind: RevocationKind::Jti, id: jti, expires_at: deny_until(exp, t) })
    }

    /// A session (logout) by `sid`: needs a token for the auth service
    /// ([`speaks_for_its_subject`]) of that session, or an admin's. Kept
    /// until every token and refresh token of the session has expired.
    pub fn sid(caller: &Claims, sid: String, now: u64, t: &TokensConfig) -> Result<Revocation, AuthError> {
        if !speaks_for_its_subject(caller, t) {
            return Err(AuthError::PermissionDenied("a token for another service can revoke only itself"));
        }
        if caller.sid.as_deref() != Some(sid.as_str()) && !is_admin(caller, t) {
            return Err(AuthError::PermissionDenied("not your session"));
        }
        Ok(session(sid, now, t))
    }

    fn session(sid: String, now: u64, t: &TokensConfig) -> Revocation {
        Revocation { kind: RevocationKind::Sid, id: sid, expires_at: session_until(now, t) }
    }

    /// Until when a session's entry lives: every token and refresh token of
    /// it has expired by then.
    fn session_until(now: u64, t: &TokensConfig) -> u64 {
        deny_until(now + t.refresh_ttl_secs.max(t.access_ttl_secs), t)
    }

    #[cfg(test)]
    mod tests {
        use service_sdk::{Actor, Audience};

        use super::Registered::{Found, NoRegistry, NotFound};
        use super::*;

        const SELF: &str = "auth-service";

        fn tokens() -> TokensConfig {
            TokensConfig { self_audience: SELF.into(), ..TokensConfig::default() }
        }

        fn claims(sub: &str, aud: &str, sid: Option<&str>, perms: &[&str]) -> Claims {
            Claims {
                iss: "auth-service".into(),
                sub: sub.into(),
                aud: Audience::One(aud.into()),
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
        fn a_live_access_token_is_revoked_until_its_expiry_plus_the_leeway() {
            let t = tokens();
            let r = access_token(Ok(claims("alice", "order", None, &[])), &t).unwrap().unwrap();
            let until = 2_000 + t.verifier_leeway_secs;
            assert_eq!(r, Revocation { kind: RevocationKind::Jti, id: "j-own".into(), expires_at: until });
            assert_eq!(access_token(Err(VerifyError::Expired), &t).unwrap(), None);
            let err = access_token(Err(VerifyError::BadSignature), &t).unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated("invalid token")));
        }

        #[test]
        fn a_family_lives_as_long_as_its_last_possible_member() {
            let t = tokens();
            let record = RefreshRecord {
                family: "f1".into(),
                sid: "s".into(),
                sub: "alice".into(),
                client_id: "login".into(),
                audience: vec![],
                scope: vec![],
                expires_at: 10,
            };
            let r = family(record.clone(), 1_000, &t);
            assert_eq!(
                r,
                Revocation { kind: RevocationKind::Family, id: "f1".into(), expires_at: 1_000 + t.refresh_ttl_secs }
            );
            let r = session_of(record, 1_000, &t);
            assert_eq!((r.kind, r.id.as_str()), (RevocationKind::Sid, "s"));
        }

        #[test]
        fn the_store_completes_a_refresh_token_revocation_exactly_as_the_policy_computes_it() {
            use crate::store::RefreshRevoke;
            let mut t = tokens();
            for (refresh_ttl, access_ttl, leeway) in [(86_400, 900, 30), (600, 900, 0), (60, 30, 300)] {
                (t.refresh_ttl_secs, t.access_ttl_secs, t.verifier_leeway_secs) = (refresh_ttl, access_ttl, leeway);
                // Records expiring before, at and after the family's floor
                // (a refresh TTL shortened by a reload).
                for expires_at in [1_001, 1_000 + refresh_ttl, 1_000 + refresh_ttl + 1, 1_000_000] {
                    let record = RefreshRecord {
                        family: "f1".into(),
                        sid: "s1".into(),
                        sub: "alice".into(),
                        client_id: "login".into(),
                        audience: vec![],
                        scope: vec![],
                        expires_at,
                    };
                    for (end_session, want) in
                        [(false, family(record.clone(), 1_000, &t)), (true, session_of(record.clone(), 1_000, &t))]
                    {
                        let (kind, until) = by_refresh_token(end_session, 1_000, &t);
                        let asked = RefreshRevoke { digest: "d", kind, until };
                        assert_eq!(asked.revocation(&record), want, "end_session {end_session}, expiry {expires_at}");
                    }
                }
            }
        }

        #[test]
        fn only_a_token_for_the_auth_service_alone_without_act_speaks_for_its_subject() {
            let t = tokens();
            assert!(speaks_for_its_subject(&claims("alice", SELF, Some("s1"), &[]), &t));
            assert!(!speaks_for_its_subject(&claims("alice", "order", Some("s1"), &[]), &t));
            let mut both = claims("alice", SELF, Some("s1"), &[]);
            both.aud = Audience::Many(vec![SELF.into(), "order".into()]);
            assert!(!speaks_for_its_subject(&both, &t));
            let mut acted = claims("alice", SELF, Some("s1"), &[]);
            acted.act = Some(Actor { sub: "svc:order".into(), act: None });
            assert!(!speaks_for_its_subject(&acted, &t));
            assert!(!is_admin(&claims("svc:admin", "inventory", None, &["auth:admin"]), &t));
            assert!(is_admin(&claims("svc:admin", SELF, None, &["auth:admin"]), &t));
        }

        #[test]
        fn a_token_for_another_service_revokes_only_itself() {
            let t = tokens();
            let held_by_inventory = claims("alice", "inventory", Some("s1"), &[]);
            let r = jti(&held_by_inventory, "j-own".into(), NoRegistry, 1_000, &t).unwrap();
            assert_eq!(r.expires_at, 2_000 + t.verifier_leeway_secs);
            let err = jti(&held_by_inventory, "j1".into(), Found(&issued("alice")), 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("a token for another service can revoke only itself")));
            let err = sid(&held_by_inventory, "s1".into(), 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied(_)));
            // Even with the admin permission.
            let admin_elsewhere = claims("svc:admin", "inventory", None, &["auth:admin"]);
            assert!(jti(&admin_elsewhere, "j1".into(), Found(&issued("bob")), 1_000, &t).is_err());
            assert!(jti(&admin_elsewhere, "j1".into(), NoRegistry, 1_000, &t).is_err());
            assert!(sid(&admin_elsewhere, "s2".into(), 1_000, &t).is_err());
        }

        #[test]
        fn a_jti_is_revocable_by_its_owner_or_an_admin_only() {
            let t = tokens();
            let alice = claims("alice", SELF, None, &[]);
            let r = jti(&alice, "j1".into(), Found(&issued("alice")), 1_000, &t).unwrap();
            let until = 1_500 + t.verifier_leeway_secs;
            assert_eq!(r, Revocation { kind: RevocationKind::Jti, id: "j1".into(), expires_at: until });
            let err = jti(&alice, "j1".into(), Found(&issued("bob")), 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("not your token")));
            let err = jti(&alice, "j1".into(), NotFound, 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("not your token")));

            let admin = claims("svc:admin", SELF, None, &["auth:admin"]);
            assert_eq!(jti(&admin, "j1".into(), Found(&issued("bob")), 1_000, &t).unwrap().expires_at, until);
            let blind = jti(&admin, "j2".into(), NotFound, 1_000, &t).unwrap();
            let longest = 1_000 + t.access_ttl_secs.max(t.exchange_max_ttl_secs) + t.verifier_leeway_secs;
            assert_eq!(blind.expires_at, longest);
        }

        #[test]
        fn without_a_registry_an_owner_must_present_the_token_and_an_admin_denies_for_the_longest_life() {
            let mut t = tokens();
            let alice = claims("alice", SELF, None, &[]);
            let err = jti(&alice, "j1".into(), NoRegistry, 1_000, &t).unwrap_err();
            assert!(
                matches!(err, AuthError::PermissionDenied(m) if m.contains("presenting it")),
                "an owner cannot show an unrecorded token is theirs: {err:?}"
            );
            // Its own jti needs no registry.
            assert_eq!(jti(&alice, "j-own".into(), NoRegistry, 1_000, &t).unwrap().expires_at, 2_000 + 30);

            let admin = claims("svc:admin", SELF, None, &["auth:admin"]);
            for (access, exchange_max, leeway) in [(900, 600, 30), (300, 600, 0), (600, 600, 300)] {
                (t.access_ttl_secs, t.exchange_max_ttl_secs, t.verifier_leeway_secs) = (access, exchange_max, leeway);
                let r = jti(&admin, "j2".into(), NoRegistry, 1_000, &t).unwrap();
                assert_eq!(longest_token_life(&t), access.max(exchange_max));
                assert_eq!(
                    r,
                    Revocation {
                        kind: RevocationKind::Jti,
                        id: "j2".into(),
                        expires_at: 1_000 + access.max(exchange_max) + leeway
                    }
                );
            }
        }

        #[test]
        fn a_session_is_revocable_by_its_owner_or_an_admin_only() {
            let t = tokens();
            let alice = claims("alice", SELF, Some("s1"), &[]);
            let r = sid(&alice, "s1".into(), 1_000, &t).unwrap();
            assert_eq!(r.kind, RevocationKind::Sid);
            let until = 1_000 + t.refresh_ttl_secs.max(t.access_ttl_secs) + t.verifier_leeway_secs;
            assert_eq!(r.expires_at, until);
            let err = sid(&alice, "s2".into(), 1_000, &t).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("not your session")));
            let admin = claims("svc:admin", SELF, None, &["auth:admin"]);
            assert_eq!(sid(&admin, "s2".into(), 1_000, &t).unwrap().id, "s2");
        }

        #[test]
        fn the_response_names_what_was_revoked() {
            use crate::revoke::{Authority, Revoked};
            let by = Authority::Possession { sub: "alice".into() };
            let r = |kind| Revoked::Recorded {
                revocation: Revocation { kind, id: "x".into(), expires_at: 1 },
                by: by.clone(),
            };
            assert_eq!(r(RevocationKind::Jti).label(), "jti");
            assert_eq!(r(RevocationKind::Family).label(), "family");
            assert_eq!(r(RevocationKind::Sid).label(), "session");
            assert_eq!(Revoked::AlreadyExpired.label(), "jti");
        }
    }
}
