//! Revoke: an access token, a `jti`, a refresh-token family or a session.
//!
//! Presenting the token itself (access or refresh) is proof of possession.
//! Revoking by `jti` or `sid` needs the caller's own access token: the jti
//! must be the caller's (same `sub`), the sid the caller's own session,
//! unless the caller holds the admin permission. Every revocation is
//! acknowledged only after the store has made it durable.

use service_sdk::VerifyError;

use crate::core::{AuthCore, check_field};
use crate::error::AuthError;
use crate::refresh::refresh_digest;
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

/// Revokes `target`. `caller_token` is the `authorization: Bearer` token of
/// the request, needed for `Jti` and `Sid`. Returns what was revoked.
pub async fn revoke(
    core: &AuthCore,
    target: RevokeTarget,
    caller_token: Option<&str>,
) -> Result<&'static str, AuthError> {
    let now = core.clock.now_unix();
    let t = &core.config.tokens;
    match target {
        RevokeTarget::AccessToken(token) => {
            check_field(&token, "access_token too long")?;
            let keys = core.keys.public_keys();
            let claims = match core.validator.validate_for(&token, &keys.keys, now, None) {
                Ok(c) => c,
                // Already dead: nothing to revoke, and saying so is harmless.
                Err(VerifyError::Expired) => return Ok("jti"),
                Err(e) => return Err(crate::core::reject(e)),
            };
            core.store
                .revoke(Revocation { kind: RevocationKind::Jti, id: claims.jti, expires_at: claims.exp }, now)
                .await?;
            Ok("jti")
        }
        RevokeTarget::RefreshToken(token) => {
            check_field(&token, "refresh_token too long")?;
            let Some(record) = core.store.refresh_record(&refresh_digest(&token), now).await? else {
                return Err(AuthError::Unauthenticated("invalid refresh token"));
            };
            // Later members of the family can live until now + refresh TTL.
            let until = record.expires_at.max(now + t.refresh_ttl_secs);
            core.store
                .revoke(Revocation { kind: RevocationKind::Family, id: record.family, expires_at: until }, now)
                .await?;
            Ok("family")
        }
        RevokeTarget::Jti(jti) => {
            check_field(&jti, "jti too long")?;
            let caller = caller(core, caller_token).await?;
            let admin = caller.has_perm(&t.admin_perm);
            let issued = core.store.issued(&jti, now).await?;
            let expires_at = match issued {
                Some(rec) if admin || rec.sub == caller.sub => rec.exp,
                // An unknown jti is either expired or not ours; only an admin
                // may deny-list it blindly, for the longest a token can live.
                None if admin => now + t.access_ttl_secs.max(t.exchange_max_ttl_secs),
                _ => return Err(AuthError::PermissionDenied("not your token")),
            };
            core.store.revoke(Revocation { kind: RevocationKind::Jti, id: jti, expires_at }, now).await?;
            Ok("jti")
        }
        RevokeTarget::Sid(sid) => {
            check_field(&sid, "sid too long")?;
            let caller = caller(core, caller_token).await?;
            if caller.sid.as_deref() != Some(sid.as_str()) && !caller.has_perm(&t.admin_perm) {
                return Err(AuthError::PermissionDenied("not your session"));
            }
            // Every token and refresh token of the session dies by then.
            let until = now + t.refresh_ttl_secs.max(t.access_ttl_secs);
            core.store.revoke(Revocation { kind: RevocationKind::Sid, id: sid, expires_at: until }, now).await?;
            Ok("session")
        }
    }
}

async fn caller(core: &AuthCore, token: Option<&str>) -> Result<service_sdk::Claims, AuthError> {
    let token = token.ok_or(AuthError::Unauthenticated("revoking by jti or sid needs the caller's bearer token"))?;
    check_field(token, "authorization too long")?;
    core.verify_presented(token, None).await
}
