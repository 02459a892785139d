//! ExchangeToken (RFC 8693): a service trades its credentials, and
//! optionally a user's token, for a short-lived token for one audience;
//! ExchangeTokens does the same for up to [`MAX_BATCH_AUDIENCES`] audiences
//! at once.
//!
//! Both run the same steps: `Exchanger::open` authenticates the caller,
//! verifies the subject token and decides what every token of the call
//! shares ([`policy::acting`]); `Exchanger::issue` then decides one
//! audience ([`policy::Acting::for_audience`]) and mints. The decisions are
//! pure functions; this module only authenticates, verifies and mints.

use std::sync::Arc;

use service_sdk::Claims;

use crate::core::{AuthCore, Policy};
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, Secret, confirmation};
use crate::tls::PeerIdentity;

/// Most audiences one ExchangeTokens call may ask for.
pub const MAX_BATCH_AUDIENCES: usize = 16;

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

/// One audience of an ExchangeTokens request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AudienceRequest {
    /// The target audience.
    pub audience: String,
    /// Requested scopes for it.
    pub scope: Vec<String>,
}

/// A parsed ExchangeTokens request.
#[derive(Debug, Default)]
pub struct BatchRequest {
    /// Caller's client id (may be empty with certificate-only auth).
    pub client_id: String,
    /// Caller's secret (may be empty with certificate-only auth).
    pub client_secret: Secret,
    /// The user's token, if acting for a user.
    pub subject_token: String,
    /// The audiences, each once.
    pub audiences: Vec<AudienceRequest>,
    /// Requested TTL of every token (0 = default).
    pub requested_ttl: u64,
}

/// The outcome for one audience of an ExchangeTokens call.
#[derive(Debug)]
pub struct AudienceOutcome {
    /// The audience, as requested.
    pub audience: String,
    /// What was issued, or why this audience was refused (always a
    /// refusal: failures of the server's own parts fail the whole call).
    pub result: Result<Issued, AuthError>,
}

/// Runs an exchange: returns what was issued.
pub async fn exchange(core: &AuthCore, req: ExchangeRequest, peer: Option<&PeerIdentity>) -> Result<Issued, AuthError> {
    if req.audience.is_empty() {
        return Err(AuthError::InvalidArgument("audience is required"));
    }
    let x =
        Exchanger::open(core, &req.client_id, &req.client_secret, &req.subject_token, req.requested_ttl, peer).await?;
    x.issue(core, req.audience, &req.scope).await
}

/// Runs a batch exchange: one outcome per audience, in request order. Bad
/// credentials, a bad subject token or a malformed request fail the whole
/// call; so does a failure of the store or the signer (a partial answer
/// would hide it).
pub async fn exchange_many(
    core: &AuthCore,
    req: BatchRequest,
    peer: Option<&PeerIdentity>,
) -> Result<Vec<AudienceOutcome>, AuthError> {
    policy::check_batch(&req.audiences)?;
    let x =
        Exchanger::open(core, &req.client_id, &req.client_secret, &req.subject_token, req.requested_ttl, peer).await?;
    let mut out = Vec::with_capacity(req.audiences.len());
    for AudienceRequest { audience, scope } in req.audiences {
        let result = match x.issue(core, audience.clone(), &scope).await {
            Err(e) if !e.is_refusal() => return Err(e),
            result => result,
        };
        out.push(AudienceOutcome { audience, result });
    }
    Ok(out)
}

/// An authenticated exchange call: the policy and clock reading of the
/// whole call, the caller's account, and what every token of it shares.
struct Exchanger {
    /// One policy and one clock reading for the whole request: the policy
    /// may be swapped by a reload, and a second reading of the clock could
    /// put a minted `exp` past the subject token's.
    policy: Arc<Policy>,
    now: u64,
    client_id: String,
    acting: policy::Acting,
    cnf: Option<String>,
}

impl Exchanger {
    /// Authenticates the caller and verifies the subject token, if any.
    async fn open(
        core: &AuthCore,
        client_id: &str,
        secret: &Secret,
        subject_token: &str,
        requested_ttl: u64,
        peer: Option<&PeerIdentity>,
    ) -> Result<Self, AuthError> {
        let policy = core.policy();
        let now = core.clock.now_unix();
        let account = policy.directory.authenticate_service(client_id, &secret.0, peer)?;
        let subject: Option<Claims> = if subject_token.is_empty() {
            None
        } else {
            // The user's token must be addressed to the caller: a service
            // may only act for users who called it.
            Some(core.verify_presented_at(&policy, subject_token, Some(&account.client_id), now).await?)
        };
        let t = &policy.tokens;
        let acting = policy::acting(&policy::Delegation {
            caller: &account.client_id,
            caller_role: account.role.as_deref(),
            requested_ttl,
            subject: subject.as_ref(),
            now,
            default_ttl: t.exchange_default_ttl_secs,
            max_ttl: t.exchange_max_ttl_secs,
            max_act_depth: t.max_act_depth,
        })?;
        // On behalf of a user too: the token is bound to the certificate of
        // the service that will present it.
        let cnf = confirmation(account.binds_tokens(), peer);
        let client_id = account.client_id.clone();
        Ok(Self { policy, now, client_id, acting, cnf })
    }

    /// Decides and mints the token for one audience.
    async fn issue(&self, core: &AuthCore, audience: String, scope: &[String]) -> Result<Issued, AuthError> {
        if audience.is_empty() {
            return Err(AuthError::InvalidArgument("audience is required"));
        }
        let allowed = self.policy.directory.account(&self.client_id).and_then(|a| a.audiences.get(&audience));
        let decision = self.acting.for_audience(allowed.map(Vec::as_slice), scope)?;
        let grant = decision.into_grant(audience, self.client_id.clone(), self.cnf.clone());
        let access = core.mint(&self.policy, grant, self.now).await?;
        Ok(Issued { kind: GrantKind::Exchange, access, refresh: None })
    }
}

/// The exchange policy, free of I/O.
pub mod policy {
    use std::collections::HashSet;

    use service_sdk::{Actor, Claims};

    use super::{AudienceRequest, MAX_BATCH_AUDIENCES};
    use crate::config::EXCHANGE_TTL_HARD_CAP_SECS;
    use crate::error::AuthError;
    use crate::grant::{Grant, narrow};

    /// Everything the decision for one audience depends on.
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

    /// What every token of one exchange call depends on, whatever its
    /// audience: who calls, for whom, for how long.
    #[derive(Debug)]
    pub struct Delegation<'a> {
        /// Caller's client id.
        pub caller: &'a str,
        /// Caller's own role.
        pub caller_role: Option<&'a str>,
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

    impl<'a> Input<'a> {
        /// The part of the input shared by every audience of a call.
        pub fn delegation(&self) -> Delegation<'a> {
            Delegation {
                caller: self.caller,
                caller_role: self.caller_role,
                requested_ttl: self.requested_ttl,
                subject: self.subject,
                now: self.now,
                default_ttl: self.default_ttl,
                max_ttl: self.max_ttl,
                max_act_depth: self.max_act_depth,
            }
        }
    }

    /// What the tokens of one call share: the subject, lifetime, role,
    /// session and delegation chain, decided once per call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Acting {
        /// Subject: the user, or `svc:<caller>`.
        pub sub: String,
        /// Lifetime.
        pub ttl: u64,
        /// Role: the user's, or the caller's own.
        pub role: Option<String>,
        /// Session carried over from the subject token.
        pub sid: Option<String>,
        /// Delegation chain.
        pub act: Option<Actor>,
        /// The subject token's perms, which bound every token's scopes.
        pub subject_perms: Option<Vec<String>>,
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
        /// The grant of the new token: for `audience`, issued to
        /// `client_id`, bound to the certificate of thumbprint `cnf` if any.
        pub fn into_grant(self, audience: String, client_id: String, cnf: Option<String>) -> Grant {
            Grant {
                sub: self.sub,
                aud: vec![audience],
                ttl: self.ttl,
                sid: self.sid,
                client_id,
                role: self.role,
                perms: self.perms,
                act: self.act,
                cnf,
            }
        }
    }

    /// Decides an exchange for one audience: [`acting`], then
    /// [`Acting::for_audience`].
    pub fn decide(i: &Input<'_>) -> Result<Decision, AuthError> {
        acting(&i.delegation())?.for_audience(i.allowed, i.requested_scope)
    }

    /// Decides what every token of a call shares: TTL = min(requested or
    /// default, max, 600 s, subject's remaining life); `act` nests the
    /// caller over the subject's chain, up to `max_act_depth`; a service
    /// never acts for itself.
    pub fn acting(d: &Delegation<'_>) -> Result<Acting, AuthError> {
        let requested = if d.requested_ttl == 0 { d.default_ttl } else { d.requested_ttl };
        let mut ttl = requested.min(d.max_ttl).min(EXCHANGE_TTL_HARD_CAP_SECS);
        if let Some(s) = d.subject {
            ttl = ttl.min(s.exp.saturating_sub(d.now));
        }
        if ttl == 0 {
            return Err(AuthError::Unauthenticated("subject token expired"));
        }
        let me = format!("svc:{}", d.caller);
        Ok(match d.subject {
            None => Acting {
                sub: me,
                ttl,
                role: d.caller_role.map(str::to_owned),
                sid: None,
                act: None,
                subject_perms: None,
            },
            Some(s) => {
                if s.sub == me {
                    return Err(AuthError::PermissionDenied("a service cannot act for itself"));
                }
                let act = Actor { sub: me, act: s.act.clone().map(Box::new) };
                if act.depth() > d.max_act_depth {
                    return Err(AuthError::PermissionDenied("delegation chain too deep"));
                }
                Acting {
                    sub: s.sub.clone(),
                    ttl,
                    role: s.role.clone(),
                    sid: s.sid.clone(),
                    act: Some(act),
                    subject_perms: Some(s.perms.clone()),
                }
            }
        })
    }

    impl Acting {
        /// Decides one audience: it must be on the allow-list (`allowed`
        /// are its scopes, `None` when it is not); perms are only ever
        /// narrowed (requested ∩ allowed ∩ subject's).
        pub fn for_audience(&self, allowed: Option<&[String]>, requested: &[String]) -> Result<Decision, AuthError> {
            let Some(allowed) = allowed else {
                return Err(AuthError::PermissionDenied("audience not allowed for this account"));
            };
            Ok(Decision {
                sub: self.sub.clone(),
                perms: narrow(allowed, requested, self.subject_perms.as_deref()),
                ttl: self.ttl,
                role: self.role.clone(),
                sid: self.sid.clone(),
                act: self.act.clone(),
            })
        }
    }

    /// The shape of an ExchangeTokens request: 1..=16 audiences, each
    /// named once (a repeat is a client bug, and which of two answers
    /// would count is anyone's guess).
    pub fn check_batch(audiences: &[AudienceRequest]) -> Result<(), AuthError> {
        if audiences.is_empty() {
            return Err(AuthError::InvalidArgument("audiences: at least one is required"));
        }
        if audiences.len() > MAX_BATCH_AUDIENCES {
            return Err(AuthError::InvalidArgument("audiences: at most 16"));
        }
        let mut seen = HashSet::with_capacity(audiences.len());
        if audiences.iter().any(|a| !seen.insert(a.audience.as_str())) {
            return Err(AuthError::InvalidArgument("audiences: each audience at most once"));
        }
        Ok(())
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
        fn one_delegation_serves_every_audience_of_a_batch() {
            let s = subject(&["inventory:read", "billing:charge"], 5_000, None);
            let i = input(None, &[], Some(&s));
            let acting = acting(&i.delegation()).unwrap();
            let inventory = strings(&["inventory:read", "inventory:reserve"]);
            let billing = strings(&["billing:charge"]);
            let a = acting.for_audience(Some(&inventory), &[]).unwrap();
            let b = acting.for_audience(Some(&billing), &[]).unwrap();
            assert_eq!(a.perms, strings(&["inventory:read"]));
            assert_eq!(b.perms, strings(&["billing:charge"]));
            assert_eq!((a.sub.as_str(), a.ttl, &a.act), (b.sub.as_str(), b.ttl, &b.act));
            let refused = acting.for_audience(None, &[]).unwrap_err();
            assert!(matches!(refused, AuthError::PermissionDenied("audience not allowed for this account")));
            assert_eq!(decide(&input(Some(&inventory), &[], Some(&s))).unwrap(), a);
        }

        #[test]
        fn a_batch_names_one_to_sixteen_audiences_each_once() {
            let aud = |n: &str| AudienceRequest { audience: n.into(), scope: vec![] };
            assert!(matches!(check_batch(&[]), Err(AuthError::InvalidArgument(_))));
            let sixteen: Vec<_> = (0..16).map(|i| aud(&format!("svc-{i}"))).collect();
            assert!(check_batch(&sixteen).is_ok());
            let seventeen: Vec<_> = (0..17).map(|i| aud(&format!("svc-{i}"))).collect();
            assert!(matches!(check_batch(&seventeen), Err(AuthError::InvalidArgument("audiences: at most 16"))));
            let twice = [aud("inventory"), aud("billing"), aud("inventory")];
            assert!(matches!(
                check_batch(&twice),
                Err(AuthError::InvalidArgument("audiences: each audience at most once"))
            ));
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
