//! Refresh: single-use rotation with reuse detection. Refresh tokens are
//! opaque (256 random bits); the store keeps only their SHA-256 digest.

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::core::{AuthCore, Grant, Minted, check_field};
use crate::directory::random_token;
use crate::error::AuthError;
use crate::login::PASSWORD_CLIENT_ID;
use crate::store::{ConsumeOutcome, RefreshRecord};

/// A newly issued refresh token.
pub struct RefreshIssued {
    /// The opaque token, handed to the client once.
    pub token: String,
}

impl std::fmt::Debug for RefreshIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshIssued(..)")
    }
}

/// The store key of a refresh token: base64url SHA-256.
pub fn refresh_digest(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, token.as_bytes()))
}

/// Starts a new refresh family for a login.
pub(crate) async fn issue_refresh(
    core: &AuthCore,
    sub: &str,
    sid: &str,
    audience: Vec<String>,
    scope: Vec<String>,
) -> Result<RefreshIssued, AuthError> {
    let token = random_token(32)?;
    let now = core.clock.now_unix();
    let record = RefreshRecord {
        family: random_token(16)?,
        sid: sid.to_owned(),
        sub: sub.to_owned(),
        client_id: PASSWORD_CLIENT_ID.into(),
        audience,
        scope,
        expires_at: now + core.config.tokens.refresh_ttl_secs,
    };
    core.store.put_refresh(&refresh_digest(&token), &record, now).await?;
    Ok(RefreshIssued { token })
}

/// Spends `presented` and returns a new access token and refresh token.
/// Presenting a spent token revokes its family and is refused.
pub async fn refresh(core: &AuthCore, presented: &str) -> Result<(Minted, RefreshIssued), AuthError> {
    check_field(presented, "refresh_token too long")?;
    if presented.is_empty() {
        return Err(AuthError::InvalidArgument("refresh_token is required"));
    }
    let now = core.clock.now_unix();
    let next = random_token(32)?;
    let outcome = core
        .store
        .consume_refresh(
            &refresh_digest(presented),
            &refresh_digest(&next),
            now + core.config.tokens.refresh_ttl_secs,
            now,
        )
        .await?;
    let record = match outcome {
        ConsumeOutcome::Rotated(r) => r,
        ConsumeOutcome::Reused => {
            tracing::warn!("refresh token reused: family revoked");
            return Err(AuthError::Unauthenticated("refresh token reused; its family is revoked"));
        }
        ConsumeOutcome::Invalid => return Err(AuthError::Unauthenticated("invalid refresh token")),
    };
    // The user's current grants bound the refresh: a removed permission or
    // user takes effect at the next refresh.
    let Some(user) = core.directory.user(&record.sub) else {
        return Err(AuthError::Unauthenticated("user no longer exists"));
    };
    let perms: Vec<String> = user.perms.iter().filter(|p| record.scope.contains(p)).cloned().collect();
    let access = core
        .mint(Grant {
            sub: record.sub,
            aud: record.audience,
            ttl: core.config.tokens.access_ttl_secs,
            sid: Some(record.sid),
            client_id: record.client_id,
            role: user.role.clone(),
            perms,
            act: None,
        })
        .await?;
    Ok((access, RefreshIssued { token: next }))
}
