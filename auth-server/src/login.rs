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
use crate::grant::{GrantKind, Issued, Secret};
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
            let dir = Arc::clone(&current.directory);
            let user = core
                .passwords
                .run(move || dir.verify_password(&username, &password.0).cloned())
                .await?
                .ok_or(AuthError::Unauthenticated("invalid username or password"))?;
            let sid = random_token(16)?;
            let grant = policy::password(&user, tokens, audience, &scope, sid)?;
            let (sub, sid, aud, perms) =
                (grant.sub.clone(), grant.sid.clone().unwrap_or_default(), grant.aud.clone(), grant.perms.clone());
            let access = core.mint(&current, grant).await?;
            let refresh = core.start_refresh_family(&current, &sub, &sid, aud, perms).await?;
            Ok(Issued { kind: GrantKind::Password, access, refresh: Some(refresh) })
        }
        LoginGrant::ClientCredentials { client_id, secret } => {
            let account = current.directory.authenticate_service(&client_id, &secret.0, peer)?;
            let grant = policy::client_credentials(account, tokens, audience, &scope)?;
            let access = core.mint(&current, grant).await?;
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
    /// (default: every user audience) must all be user audiences; scopes
    /// narrow the user's perms; the token opens session `sid`.
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
        if aud.iter().any(|a| !allowed.contains(a)) {
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
        })
    }

    /// What an authenticated service's own token says: every requested
    /// audience must be on its allow-list; scopes narrow the union of those
    /// audiences' scopes and the account's own perms.
    pub fn client_credentials(
        account: &Account,
        tokens: &TokensConfig,
        audience: Vec<String>,
        scope: &[String],
    ) -> Result<Grant, AuthError> {
        if audience.is_empty() {
            return Err(AuthError::InvalidArgument("audience is required"));
        }
        let mut allowed_scopes: Vec<String> = Vec::new();
        for a in &audience {
            let Some(scopes) = account.audiences.get(a) else {
                return Err(AuthError::PermissionDenied("audience not allowed for this account"));
            };
            allowed_scopes.extend(scopes.iter().cloned());
        }
        allowed_scopes.extend(account.perms.iter().cloned());
        allowed_scopes.sort();
        allowed_scopes.dedup();
        Ok(Grant {
            sub: format!("svc:{}", account.client_id),
            aud: audience,
            ttl: tokens.exchange_default_ttl_secs,
            sid: None,
            client_id: account.client_id.clone(),
            role: account.role.clone(),
            perms: narrow(&allowed_scopes, scope, None),
            act: None,
        })
    }

    #[cfg(test)]
    mod tests {
        use std::collections::BTreeMap;

        use super::*;

        fn strings(v: &[&str]) -> Vec<String> {
            v.iter().map(|s| s.to_string()).collect()
        }

        fn tokens() -> TokensConfig {
            TokensConfig { user_audiences: strings(&["order", "web"]), ..TokensConfig::default() }
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
        fn a_service_is_refused_an_audience_off_its_allow_list_or_none() {
            let err = client_credentials(&order(), &tokens(), strings(&["inventory", "payroll"]), &[]).unwrap_err();
            assert!(matches!(err, AuthError::PermissionDenied(_)));
            let err = client_credentials(&order(), &tokens(), vec![], &[]).unwrap_err();
            assert!(matches!(err, AuthError::InvalidArgument(_)));
        }
    }
}
