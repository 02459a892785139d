//! ExchangeToken (RFC 8693): a service trades its credentials, and
//! optionally a user's token, for a short-lived token for one audience.
//!
//! The decision is [`policy::decide`], a pure function; this module only
//! authenticates, verifies the subject token and mints.

use crate::core::AuthCore;
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, Secret};
use crate::tls::PeerIdentity;

/// A parsed ExchangeToken request.
#[derive(Debug, Default)]
pub struct ExchangeRequest {
    /// Caller's client id (may be empty with certificate-only auth).
    pub client_id: String,
    /// Caller's secret (may be empty with certificate-only auth).
    pub client_secret: Secret,
    /// The user's token, if acting for a user.
    pub subject_token: String,
    /// The one target audience.
    pub audience: String,
    /// Requested scopes.
    pub scope: Vec<String>,
    /// Requested TTL (0 = default).
    pub requested_ttl: u64,
}

/// Runs an exchange: returns what was issued.
pub async fn exchange(core: &AuthCore, req: ExchangeRequest, peer: Option<&PeerIdentity>) -> Result<Issued, AuthError> {
    if req.audience.is_empty() {
        return Err(AuthError::InvalidArgument("audience is required"));
    }
    // One policy and one clock reading for the whole request: the policy
    // may be swapped by a reload, and a second reading of the clock could
    // put the minted `exp` past the subject token's.
    let current = core.policy();
    let now = core.clock.now_unix();
    let account = current.directory.authenticate_service(&req.client_id, &req.client_secret.0, peer)?;
    let subject = if req.subject_token.is_empty() {
        None
    } else {
        // The user's token must be addressed to the caller: a service may
        // only act for users who called it.
        Some(core.verify_presented_at(&current, &req.subject_token, Some(&account.client_id), now).await?)
    };
    let t = &current.tokens;
    let decision = policy::decide(&policy::Input {
        caller: &account.client_id,
        caller_role: account.role.as_deref(),
        allowed: account.audiences.get(&req.audience).map(Vec::as_slice),
        audience: &req.audience,
        requested_scope: &req.scope,
        requested_ttl: req.requested_ttl,
        subject: subject.as_ref(),
        now,
        default_ttl: t.exchange_default_ttl_secs,
        max_ttl: t.exchange_max_ttl_secs,
        max_act_depth: t.max_act_depth,
    })?;
    let access = core.mint(&current, decision.into_grant(req.audience, account.client_id.clone()), now).await?;
    Ok(Issued { kind: GrantKind::Exchange, access, refresh: None })
}

/// The exchange policy, free of I/O.
pub mod policy {
    use service_sdk::{Actor, Claims};

    use crate::config::EXCHANGE_TTL_HARD_CAP_SECS;
    use crate::error::AuthError;
    use crate::grant::{Grant, narrow};

    /// Everything the decision depends on.
    #[derive(Debug)]
    pub struct Input<'a> {
        /// Caller's client id.
        pub caller: &'a str,
        /// Caller's own role.
        pub caller_role: Option<&'a str>,
        /// Scopes the caller may get for `audience`; `None` if the audience
        /// is not on its allow-list.
        pub allowed: Option<&'a [String]>,
        /// The target audience.
        pub audience: &'a str,
        /// Requested scopes (empty = all allowed).
        pub requested_scope: &'a [String],
        /// Requested TTL (0 = default).
        pub requested_ttl: u64,
        /// The verified subject token's claims.
        pub subject: Option<&'a Claims>,
        /// Now, Unix seconds.
        pub now: u64,
        /// Configured default TTL.
        pub default_ttl: u64,
        /// Configured maximum TTL.
        pub max_ttl: u64,
        /// Deepest `act` chain allowed.
        pub max_act_depth: usize,
    }

    /// What the new token says.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Decision {
        /// Subject: the user, or `svc:<caller>`.
        pub sub: String,
        /// Scopes: requested ∩ allowed ∩ subject's.
        pub perms: Vec<String>,
        /// Lifetime.
        pub ttl: u64,
        /// Role: the user's, or the caller's own.
        pub role: Option<String>,
        /// Session carried over from the subject token.
        pub sid: Option<String>,
        /// Delegation chain.
        pub act: Option<Actor>,
    }

    impl Decision {
        /// The grant of the new token: for `audience`, issued to `client_id`.
        pub fn into_grant(self, audience: String, client_id: String) -> Grant {
            Grant {
                sub: self.sub,
                aud: vec![audience],
                ttl: self.ttl,
                sid: self.sid,
                client_id,
                role: self.role,
                perms: self.perms,
                act: self.act,
            }
        }
    }

    /// Decides an exchange: audience on the allow-list; perms only ever
    /// narrowed; TTL = min(requested or default, max, 600 s, subject's
    /// remaining life); `act` nests the caller over the subject's chain, up
    /// to `max_act_depth`.
    pub fn decide(i: &Input<'_>) -> Result<Decision, AuthError> {
        let Some(allowed) = i.allowed else {
            return Err(AuthError::PermissionDenied("audience not allowed for this account"));
        };
        let perms = narrow(allowed, i.requested_scope, i.subject.map(|s| s.perms.as_slice()));
        let requested = if i.requested_ttl == 0 { i.default_ttl } else { i.requested_ttl };
        let mut ttl = requested.min(i.max_ttl).min(EXCHANGE_TTL_HARD_CAP_SECS);
        if let Some(s) = i.subject {
            ttl = ttl.min(s.exp.saturating_sub(i.now));
        }
        if ttl == 0 {
            return Err(AuthError::Unauthenticated("subject token expired"));
        }
        let me = format!("svc:{}", i.caller);
        Ok(match i.subject {
            None => Decision { sub: me, perms, ttl, role: i.caller_role.map(str::to_owned), sid: None, act: None },
            Some(s) => {
                if s.sub == me {
                    return Err(AuthError::PermissionDenied("a service cannot act for itself"));
                }
                let act = Actor { sub: me, act: s.act.clone().map(Box::new) };
                if act.depth() > i.max_act_depth {
                    return Err(AuthError::PermissionDenied("delegation chain too deep"));
                }
                Decision { sub: s.sub.clone(), perms, ttl, role: s.role.clone(), sid: s.sid.clone(), act: Some(act) }
            }
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use service_sdk::Audience;

        fn subject(perms: &[&str], exp: u64, act: Option<Actor>) -> Claims {
            Claims {
                iss: "auth-service".into(),
                sub: "alice".into(),
                aud: Audience::One("order".into()),
                exp,
                nbf: 0,
                iat: 0,
                jti: "j".into(),
                sid: Some("s1".into()),
                client_id: "login".into(),
                role: Some("customer".into()),
                perms: perms.iter().map(|s| s.to_string()).collect(),
                act,
                cnf: None,
            }
        }

        fn strings(v: &[&str]) -> Vec<String> {
            v.iter().map(|s| s.to_string()).collect()
        }

        fn input<'a>(allowed: Option<&'a [String]>, req: &'a [String], subject: Option<&'a Claims>) -> Input<'a> {
            Input {
                caller: "order",
                caller_role: Some("service"),
                allowed,
                audience: "inventory",
                requested_scope: req,
                requested_ttl: 0,
                subject,
                now: 1_000,
                default_ttl: 300,
                max_ttl: 600,
                max_act_depth: 2,
            }
        }

        #[test]
        fn audience_must_be_on_the_allow_list() {
            let err = decide(&input(None, &[], None)).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied(_)));
        }

        #[test]
        fn scopes_are_the_intersection_of_request_policy_and_subject() {
            let allowed = strings(&["inventory:read", "inventory:reserve", "inventory:admin"]);
            let req = strings(&["inventory:read", "inventory:admin", "orders:create"]);
            let s = subject(&["inventory:read", "inventory:reserve", "orders:create"], 5_000, None);
            let d = decide(&input(Some(&allowed), &req, Some(&s))).unwrap();
            assert_eq!(d.perms, strings(&["inventory:read"]));
            let d = decide(&input(Some(&allowed), &[], Some(&s))).unwrap();
            assert_eq!(d.perms, strings(&["inventory:read", "inventory:reserve"]));
            let d = decide(&input(Some(&allowed), &[], None)).unwrap();
            assert_eq!(d.perms, allowed);
        }

        #[test]
        fn ttl_is_capped_by_default_max_hard_cap_and_subject() {
            let allowed = strings(&["x"]);
            let mut i = input(Some(&allowed), &[], None);
            assert_eq!(decide(&i).unwrap().ttl, 300);
            i.requested_ttl = 60;
            assert_eq!(decide(&i).unwrap().ttl, 60);
            i.requested_ttl = 10_000;
            assert_eq!(decide(&i).unwrap().ttl, 600);
            i.max_ttl = 10_000;
            assert_eq!(decide(&i).unwrap().ttl, EXCHANGE_TTL_HARD_CAP_SECS);
        }

        #[test]
        fn exchange_never_outlives_subject_token() {
            let allowed = strings(&["x"]);
            let s = subject(&["x"], 1_090, None);
            let d = decide(&input(Some(&allowed), &[], Some(&s))).unwrap();
            assert_eq!(d.ttl, 90);
            let expired = subject(&["x"], 1_000, None);
            assert!(decide(&input(Some(&allowed), &[], Some(&expired))).is_err());
        }

        #[test]
        fn act_nests_the_caller_and_the_depth_is_bounded() {
            let allowed = strings(&["x"]);
            let s = subject(&["x"], 5_000, None);
            let d = decide(&input(Some(&allowed), &[], Some(&s))).unwrap();
            assert_eq!(d.sub, "alice");
            assert_eq!(d.sid.as_deref(), Some("s1"));
            assert_eq!(d.role.as_deref(), Some("customer"));
            let act = d.act.unwrap();
            assert_eq!(act.sub, "svc:order");
            assert_eq!(act.depth(), 1);

            let one = Actor { sub: "svc:gateway".into(), act: None };
            let s = subject(&["x"], 5_000, Some(one.clone()));
            let d = decide(&input(Some(&allowed), &[], Some(&s))).unwrap();
            assert_eq!(d.act.unwrap().act.as_deref(), Some(&one));

            let two = Actor { sub: "svc:b".into(), act: Some(Box::new(one)) };
            let s = subject(&["x"], 5_000, Some(two));
            let err = decide(&input(Some(&allowed), &[], Some(&s))).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied("delegation chain too deep")));
        }

        #[test]
        fn without_subject_the_service_acts_as_itself() {
            let allowed = strings(&["x"]);
            let d = decide(&input(Some(&allowed), &[], None)).unwrap();
            assert_eq!(d.sub, "svc:order");
            assert_eq!(d.act, None);
            assert_eq!(d.role.as_deref(), Some("service"));
        }
    }
}
