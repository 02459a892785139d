//! Login: the password grant (users) and the client-credentials grant
//! (a service acting as itself).

use std::sync::Arc;

use crate::core::{AuthCore, Grant, Minted, check_field, check_list};
use crate::directory::random_token;
use crate::error::AuthError;
use crate::refresh::{RefreshIssued, issue_refresh};
use crate::tls::PeerIdentity;

/// The `client_id` claim of tokens from the password grant.
pub const PASSWORD_CLIENT_ID: &str = "login";

/// A validated Login request.
#[derive(Debug)]
pub enum LoginGrant {
    /// Username and password.
    Password {
        /// Login name.
        username: String,
        /// Password (never logged: `LoginGrant`'s Debug is derived, so the
        /// gRPC layer never logs this value).
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

/// A secret string that redacts itself in `Debug`.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The result of a login.
#[derive(Debug)]
pub struct LoginResult {
    /// The access token.
    pub access: Minted,
    /// The refresh token (password grant only).
    pub refresh: Option<RefreshIssued>,
}

/// Runs a login.
pub async fn login(
    core: &AuthCore,
    grant: LoginGrant,
    audience: Vec<String>,
    scope: Vec<String>,
    peer: Option<&PeerIdentity>,
) -> Result<LoginResult, AuthError> {
    check_list(&audience, "audience: at most 64 non-empty names")?;
    check_list(&scope, "scope: at most 64 non-empty scopes")?;
    match grant {
        LoginGrant::Password { username, password } => {
            check_field(&username, "username too long")?;
            check_field(&password.0, "password too long")?;
            if username.is_empty() || password.0.is_empty() {
                return Err(AuthError::InvalidArgument("username and password are required"));
            }
            let dir = Arc::clone(&core.directory);
            let user = core
                .passwords
                .run(move || dir.verify_password(&username, &password.0).cloned())
                .await?
                .ok_or(AuthError::Unauthenticated("invalid username or password"))?;
            let allowed = &core.config.tokens.user_audiences;
            let aud = if audience.is_empty() { allowed.clone() } else { audience };
            if aud.is_empty() {
                return Err(AuthError::InvalidArgument("audience is required"));
            }
            if aud.iter().any(|a| !allowed.contains(a)) {
                return Err(AuthError::PermissionDenied("audience not allowed for users"));
            }
            let perms = intersect(&user.perms, &scope);
            let sid = random_token(16)?;
            let access = core
                .mint(Grant {
                    sub: user.username.clone(),
                    aud: aud.clone(),
                    ttl: core.config.tokens.access_ttl_secs,
                    sid: Some(sid.clone()),
                    client_id: PASSWORD_CLIENT_ID.into(),
                    role: user.role.clone(),
                    perms: perms.clone(),
                    act: None,
                })
                .await?;
            let refresh = issue_refresh(core, &user.username, &sid, aud, perms).await?;
            Ok(LoginResult { access, refresh: Some(refresh) })
        }
        LoginGrant::ClientCredentials { client_id, secret } => {
            check_field(&client_id, "client_id too long")?;
            check_field(&secret.0, "client_secret too long")?;
            let account = core.directory.authenticate_service(&client_id, &secret.0, peer)?;
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
            let perms = intersect(&allowed_scopes, &scope);
            let access = core
                .mint(Grant {
                    sub: format!("svc:{}", account.client_id),
                    aud: audience,
                    ttl: core.config.tokens.exchange_default_ttl_secs,
                    sid: None,
                    client_id: account.client_id.clone(),
                    role: account.role.clone(),
                    perms,
                    act: None,
                })
                .await?;
            Ok(LoginResult { access, refresh: None })
        }
    }
}

/// `have ∩ requested`, or all of `have` when nothing was requested. Order
/// follows `have`.
pub(crate) fn intersect(have: &[String], requested: &[String]) -> Vec<String> {
    if requested.is_empty() {
        return have.to_vec();
    }
    have.iter().filter(|p| requested.contains(p)).cloned().collect()
}
