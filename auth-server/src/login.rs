//! Login: the password grant (users) and the client-credentials grant
//! (a service acting as itself).
//!
//! The decisions are [`policy::password`] and [`policy::client_credentials`],
//! pure functions; this module only checks credentials, mints and starts
//! the refresh family.

use std::sync::Arc;

use crate::core::AuthCore;
use crate::directory::random_token;
use crate::error::AuthError;
use crate::grant::{GrantKind, Issued, Secret, confirmation};
use crate::tls::PeerIdentity;

/// A Login request's grant.
#[derive(Debug)]
pub enum LoginGrant {
    /// Username and password.
    Password {
        /// Login name.
        username: String,
        /// Password (never logged: [`Secret`] redacts itself).
        password: Secret,
    },
    /// Client credentials.
    ClientCredentials {
        /// Client id.
        client_id: String,
        /// Client secret.
        secret: Secret,
    },
}

/// Runs a login: returns what was issued (an access token, and for the
/// password grant a refresh token).
pub async fn login(
    core: &AuthCore,
    grant: LoginGrant,
    audience: Vec<String>,
    scope: Vec<String>,
    peer: Option<&PeerIdentity>,
) -> Result<Issued, AuthError> {
    let current = core.policy();
    let tokens = &current.tokens;
    match grant {
        LoginGrant::Password { username, password } => {
            if username.is_empty() || password.0.is_empty() {
                return Err(AuthError::InvalidArgument("username and password are required"));
            }
            // Back-off first: a username that must wait costs no argon2 time.
            // Unknown usernames are throttled alike, so this reveals nothing.
            let attempt = core
                .login_throttle
                .begin(&username, core.clock.now_unix())
                .map_err(|_| AuthError::ResourceExhausted("too many failed logins; retry later"))?;
            let dir = Arc::clone(&current.directory);
            let checked =
                core.passwords.run(move |memory| dir.verify_password(&username, &password.0, memory).cloned()).await;
            let user = match checked {
                Ok(Some(user)) => {
                    core.login_throttle.succeeded(attempt);
                    user
                }
                Ok(None) => return Err(AuthError::Unauthenticated("invalid username or password")),
                Err(e) => {
                    core.login_throttle.not_checked(attempt);
                    return Err(e);
                }
            };
            let sid = random_token(16)?;
            let grant = policy::password(&user, tokens, audience, &scope, sid)?;
            let (sub, sid, aud, perms) =
                (grant.sub.clone(), grant.sid.clone().unwrap_or_default(), grant.aud.clone(), grant.perms.clone());
            let access = core.mint(&current, grant, core.clock.now_unix()).await?;
            let refresh = core.start_refresh_family(&current, &sub, &sid, aud, perms).await?;
            Ok(Issued { kind: GrantKind::Password, access, refresh: Some(refresh) })
        }
        LoginGrant::ClientCredentials { client_id, secret } => {
            let account = current.directory.authenticate_service(&client_id, &secret.0, peer)?;
            let mut grant = policy::client_credentials(account, tokens, audience, &scope)?;
            grant.cnf = confirmation(account.binds_tokens(), peer);
            let access = core.mint(&current, grant, core.clock.now_unix()).await?;
            Ok(Issued { kind: GrantKind::ClientCredentials, access, refresh: None })
        }
    }
}

/// The login policy, free of I/O.
pub mod policy {
    use crate::config::TokensConfig;
    use crate::directory::{Account, User};
    use crate::error::AuthError;
    use crate::grant::{Grant, PASSWORD_CLIENT_ID, narrow};

    /// What an authenticated user's token says: the requested audiences
    /// (default: every user audience) must all be user audiences, or be the
    /// auth service's own audience alone (a token to manage the user's own
    /// session); scopes narrow the user's perms; the token opens session
    /// `sid`.
    pub fn password(
        user: &User,
        tokens: &TokensConfig,
        audience: Vec<String>,
        scope: &[String],
        sid: String,
    ) -> Result<Grant, AuthError> {
        let allowed = &tokens.user_audiences;
        let aud = if audience.is_empty() { allowed.clone() } else { audience };
        if aud.is_empty() {
            return Err(AuthError::InvalidArgument("audience is required"));
        }
        let for_self = self_alone(&aud, tokens)?;
        if !for_self && aud.iter().any(|a| !allowed.contains(a)) {
            return Err(AuthError::PermissionDenied("audience not allowed for users"));
        }
        Ok(Grant {
            sub: user.username.clone(),
            aud,
            ttl: tokens.access_ttl_secs,
            sid: Some(sid),
            client_id: PASSWORD_CLIENT_ID.into(),
            role: user.role.clone(),
            perms: narrow(&user.perms, scope, None),
            act: None,
            cnf: None,
        })
    }

    /// What an authenticated service's own token says, granted per audience
    /// as ExchangeToken grants: every requested audience must be on the
    /// account's allow-list, and the token's scopes are that audience's
    /// scopes narrowed by the request. The account's own `perms` (such as
    /// the admin permission) are granted only in a token for the auth
    /// service itself. One token for several audiences carries one scope
    /// set, so every audience must grant the same set; when they differ
    /// the request is refused (ask for one token per audience, or narrow
    /// the scopes to a set they share).
    pub fn client_credentials(
        account: &Account,
        tokens: &TokensConfig,
        audience: Vec<String>,
        scope: &[String],
    ) -> Result<Grant, AuthError> {
        if audience.is_empty() {
            return Err(AuthError::InvalidArgument("audience is required"));
        }
        let for_self = self_alone(&audience, tokens)?;
        let mut granted: Option<Vec<String>> = None;
        for a in &audience {
            let Some(scopes) = account.audiences.get(a) else {
                return Err(AuthError::PermissionDenied("audience not allowed for this account"));
            };
            let mut have = scopes.clone();
            if for_self {
                have.extend(account.perms.iter().cloned());
            }
            let mut this = narrow(&have, scope, None);
            this.sort();
            match &granted {
                Some(first) if *first != this => {
                    return Err(AuthError::InvalidArgument(
                        "these audiences grant different scopes: request one token per audience",
                    ));
                }
                Some(_) => {}
                None => granted = Some(this),
            }
        }
        Ok(Grant {
            sub: format!("svc:{}", account.client_id),
            aud: audience,
            ttl: tokens.exchange_default_ttl_secs,
            sid: None,
            client_id: account.client_id.clone(),
            role: account.role.clone(),
            perms: granted.unwrap_or_default(),
            act: None,
            cnf: None,
        })
    }

    /// Whether `aud` asks for the auth service itself; it must then be
    /// alone, so that no other service ever holds a token the auth service
    /// accepts for session and revocation actions.
    fn self_alone(aud: &[String], tokens: &TokensConfig) -> Result<bool, AuthError> {
        let mentions_self = aud.contains(&tokens.self_audience);
        if mentions_self && aud.len() > 1 {
            return Err(AuthError::InvalidArgument("the auth service's audience must be requested alone"));
        }
        Ok(mentions_self)
    }

    #[cfg(test)]
    mod tests {
        use std::collections::BTreeMap;

        use super::*;

        fn strings(v: &[&str]) -> Vec<String> {
            v.iter().map(|s| s.to_string()).collect()
        }

        fn tokens() -> TokensConfig {
            TokensConfig {
                user_audiences: strings(&["order", "web"]),
                self_audience: "auth-service".into(),
                ..TokensConfig::default()
            }
        }

        fn alice() -> User {
            User {
                username: "alice".into(),
                password_hash: String::new(),
                role: Some("customer".into()),
                perms: strings(&["orders:read", "orders:create"]),
            }
        }

        fn order() -> Account {
            let mut audiences = BTreeMap::new();
            audiences.insert("inventory".to_string(), strings(&["inventory:reserve", "inventory:read"]));
            audiences.insert("billing".to_string(), strings(&["billing:charge"]));
            Account {
                client_id: "order".into(),
                secret_sha256: String::new(),
                mtls_identity: None,
                certificate_bound_tokens: None,
                role: Some("service".into()),
                perms: strings(&["inventory:read"]),
                audiences,
            }
        }

        #[test]
        fn a_user_gets_every_user_audience_by_default_and_a_session() {
            let g = password(&alice(), &tokens(), vec![], &[], "s1".into()).unwrap();
            assert_eq!(g.sub, "alice");
            assert_eq!(g.aud, strings(&["order", "web"]));
            assert_eq!(g.sid.as_deref(), Some("s1"));
            assert_eq!(g.client_id, "login");
            assert_eq!(g.ttl, tokens().access_ttl_secs);
            assert_eq!(g.perms, strings(&["orders:read", "orders:create"]));
            assert_eq!(g.act, None);
        }

        #[test]
        fn a_user_may_only_log_in_for_user_audiences_and_narrow_scopes() {
            let err = password(&alice(), &tokens(), strings(&["inventory"]), &[], "s".into()).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied(_)));
            let g = password(&alice(), &tokens(), strings(&["web"]), &strings(&["orders:read", "admin"]), "s".into())
                .unwrap();
            assert_eq!(g.perms, strings(&["orders:read"]));
            let none = TokensConfig::default();
            let err = password(&alice(), &none, vec![], &[], "s".into()).unwrap_err();
            assert!(matches!(err, AuthError::InvalidArgument("audience is required")));
        }

        #[test]
        fn a_service_acts_as_itself_within_its_allow_list() {
            let g = client_credentials(&order(), &tokens(), strings(&["inventory"]), &[]).unwrap();
            assert_eq!(g.sub, "svc:order");
            assert_eq!(g.client_id, "order");
            assert_eq!(g.sid, None);
            assert_eq!(g.ttl, tokens().exchange_default_ttl_secs);
            assert_eq!(g.perms, strings(&["inventory:read", "inventory:reserve"]));
            let g = client_credentials(&order(), &tokens(), strings(&["inventory"]), &strings(&["inventory:reserve"]))
                .unwrap();
            assert_eq!(g.perms, strings(&["inventory:reserve"]));
        }

        #[test]
        fn a_user_may_log_in_for_the_auth_service_alone() {
            let g = password(&alice(), &tokens(), strings(&["auth-service"]), &[], "s".into()).unwrap();
            assert_eq!(g.aud, strings(&["auth-service"]));
            let err = password(&alice(), &tokens(), strings(&["order", "auth-service"]), &[], "s".into()).unwrap_err();
            assert!(matches!(err, AuthError::InvalidArgument("the auth service's audience must be requested alone")));
        }

        #[test]
        fn a_service_token_for_several_audiences_needs_one_scope_set() {
            let mut account = order();
            account.audiences.insert("ledger".into(), strings(&["inventory:read"]));
            // inventory grants {read, reserve}, billing {charge}: refused.
            let err = client_credentials(&account, &tokens(), strings(&["inventory", "billing"]), &[]).unwrap_err();
            assert!(matches!(err, AuthError::InvalidArgument(_)));
            // Narrowed to a set both grant, it is one token.
            let g = client_credentials(
                &account,
                &tokens(),
                strings(&["inventory", "ledger"]),
                &strings(&["inventory:read"]),
            )
            .unwrap();
            assert_eq!(g.aud, strings(&["inventory", "ledger"]));
            assert_eq!(g.perms, strings(&["inventory:read"]));
        }

        #[test]
        fn the_account_perms_go_only_into_a_token_for_the_auth_service() {
            let mut account = order();
            account.perms = strings(&["auth:admin"]);
            account.audiences.insert("auth-service".into(), vec![]);
            let g = client_credentials(&account, &tokens(), strings(&["inventory"]), &[]).unwrap();
            assert!(!g.perms.contains(&"auth:admin".to_string()), "{:?}", g.perms);
            let g = client_credentials(&account, &tokens(), strings(&["auth-service"]), &[]).unwrap();
            assert_eq!(g.perms, strings(&["auth:admin"]));
            let err =
                client_credentials(&account, &tokens(), strings(&["auth-service", "inventory"]), &[]).unwrap_err();
            assert!(matches!(err, AuthError::InvalidArgument(_)));
        }

        #[test]
        fn a_service_is_refused_an_audience_off_its_allow_list_or_none() {
            let err = client_credentials(&order(), &tokens(), strings(&["inventory", "payroll"]), &[]).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied(_)));
            let err = client_credentials(&order(), &tokens(), vec![], &[]).unwrap_err();
            assert!(matches!(err, AuthError::InvalidArgument(_)));
        }
    }
}
