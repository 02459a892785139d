//! What the flows share, with no dependency on any of them: the grant a new
//! access token carries, the typed result of issuing one, the refresh-token
//! digest, secrets that redact themselves, and the one scope-narrowing rule.
//!
//! This module is a leaf: it imports no flow and no port, so `login`,
//! `exchange`, `refresh` and `revoke` all depend on it and never on each
//! other.

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use service_sdk::{Actor, Claims};

use crate::tls::PeerIdentity;

/// The `client_id` claim of tokens from the password grant (and of the
/// refresh tokens it starts).
pub const PASSWORD_CLIENT_ID: &str = "login";

/// A secret string that redacts itself in `Debug`.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What a new access token says, before the server adds times and `jti`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Subject.
    pub sub: String,
    /// Audiences.
    pub aud: Vec<String>,
    /// Lifetime in seconds.
    pub ttl: u64,
    /// Login session.
    pub sid: Option<String>,
    /// Client the token is issued to.
    pub client_id: String,
    /// Role.
    pub role: Option<String>,
    /// Permissions.
    pub perms: Vec<String>,
    /// Delegation chain.
    pub act: Option<Actor>,
    /// RFC 8705 `cnf.x5t#S256`: the base64url SHA-256 thumbprint of the
    /// client certificate the token is bound to, if any.
    pub cnf: Option<String>,
}

/// The RFC 8705 binding of a service's token: the thumbprint of the
/// certificate the caller presented, when its account binds its tokens
/// (`bind`) and it presented one. Without a certificate there is nothing
/// to bind to (the gRPC port is mTLS-only, so that is a caller the edge
/// let through without one: a test harness).
pub fn confirmation(bind: bool, peer: Option<&PeerIdentity>) -> Option<String> {
    if !bind {
        return None;
    }
    peer.map(|p| thumbprint(&p.cert_sha256))
}

/// The `x5t#S256` of a certificate whose DER hashes to `cert_sha256`.
pub fn thumbprint(cert_sha256: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(cert_sha256)
}

/// A minted access token.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The compact JWS.
    pub token: String,
    /// Its claims.
    pub claims: Claims,
}

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

/// A new refresh token of `family`: `<family>.<secret>`, so that the
/// family (and with it the store's slot in a sharded Redis Cluster) is
/// known from the token alone. The family id is no secret: the server
/// stores it in the clear, and `secret` carries the token's 256 bits.
pub fn refresh_token(family: &str, secret: &str) -> String {
    format!("{family}.{secret}")
}

/// The store key of a refresh token: `<family>.<base64url SHA-256 of the
/// whole token>` for a token `<family>.<secret>` (as [`refresh_token`]
/// makes them), else the bare base64url SHA-256 (tokens issued before
/// families were named in them, and anything malformed, which no record
/// matches). A family is 1 to 64 characters of base64url; anything else
/// before a `.` is not taken for one, so a presented token cannot pick the
/// hash tag its lookup goes to.
pub fn refresh_digest(token: &str) -> String {
    let hash = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, token.as_bytes()));
    match token.split_once('.') {
        Some((family, _)) if is_family_id(family) => format!("{family}.{hash}"),
        _ => hash,
    }
}

/// The family a refresh token `<family>.<secret>` names, as
/// [`refresh_digest`] reads it; `None` for a token issued before tokens
/// named their family (or anything malformed).
pub fn refresh_token_family(token: &str) -> Option<&str> {
    token.split_once('.').map(|(family, _)| family).filter(|f| is_family_id(f))
}

/// Whether `id` may be a refresh family id: 1 to 64 base64url characters.
fn is_family_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How a token was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// Login with username and password.
    Password,
    /// Login with client credentials: a service acting as itself.
    ClientCredentials,
    /// ExchangeToken (RFC 8693).
    Exchange,
    /// Refresh-token rotation.
    Refresh,
}

impl GrantKind {
    /// A fixed name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::ClientCredentials => "client_credentials",
            Self::Exchange => "exchange",
            Self::Refresh => "refresh",
        }
    }
}

/// What a token-issuing flow decided and did: the typed result that the
/// gRPC layer maps to a response, and that audit or a batch RPC consume
/// without re-deriving anything from strings.
#[derive(Debug)]
pub struct Issued {
    /// How the token was obtained.
    pub kind: GrantKind,
    /// The access token and its claims (`sub`, `act`, `aud`, `perms`,
    /// `jti`, `exp`).
    pub access: Minted,
    /// The refresh token, for the password grant and for refresh.
    pub refresh: Option<RefreshIssued>,
}

impl Issued {
    /// The access token's claims.
    pub fn claims(&self) -> &Claims {
        &self.access.claims
    }

    /// Lifetime of the access token in seconds.
    pub fn expires_in(&self) -> u64 {
        let c = self.claims();
        c.exp.saturating_sub(c.iat)
    }
}

/// The one scope-narrowing rule of every grant: the scopes of `have` (in
/// its order, without repeats) that the client `requested` (empty = all of
/// `have`) and that stay within `bound` when there is one (the subject
/// token's perms, a refresh family's scope). A result never holds a scope
/// that is not in `have`: scopes are only ever narrowed.
pub fn narrow(have: &[String], requested: &[String], bound: Option<&[String]>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(have.len());
    for p in have {
        let wanted = requested.is_empty() || requested.contains(p);
        let within = bound.is_none_or(|b| b.contains(p));
        if wanted && within && !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_empty_request_keeps_everything_held() {
        let have = strings(&["a", "b", "c"]);
        assert_eq!(narrow(&have, &[], None), have);
    }

    #[test]
    fn narrowing_follows_the_order_of_what_is_held_and_never_adds() {
        let have = strings(&["c", "a", "b"]);
        let req = strings(&["a", "c", "z"]);
        assert_eq!(narrow(&have, &req, None), strings(&["c", "a"]));
    }

    #[test]
    fn a_bound_narrows_further_and_an_empty_bound_allows_nothing() {
        let have = strings(&["a", "b", "c"]);
        let bound = strings(&["b", "c", "z"]);
        assert_eq!(narrow(&have, &[], Some(&bound)), strings(&["b", "c"]));
        assert_eq!(narrow(&have, &strings(&["c"]), Some(&bound)), strings(&["c"]));
        assert!(narrow(&have, &[], Some(&[])).is_empty());
    }

    #[test]
    fn repeats_are_dropped() {
        let have = strings(&["a", "b", "a"]);
        assert_eq!(narrow(&have, &[], None), strings(&["a", "b"]));
    }

    #[test]
    fn secrets_and_refresh_tokens_are_redacted_in_debug() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(..)");
        assert_eq!(format!("{:?}", RefreshIssued { token: "opaque".into() }), "RefreshIssued(..)");
    }

    #[test]
    fn tokens_bind_to_the_presented_certificate_only_when_the_account_binds() {
        let peer = PeerIdentity { id: "spiffe://auth.dev/order".into(), cert_sha256: [7; 32] };
        let bound = confirmation(true, Some(&peer)).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&bound).unwrap(), [7; 32]);
        assert_eq!(bound.len(), 43, "base64url without padding");
        assert_eq!(confirmation(false, Some(&peer)), None);
        assert_eq!(confirmation(true, None), None);
    }

    #[test]
    fn refresh_digest_is_base64url_sha256() {
        let d = refresh_digest("token");
        assert_eq!(d.len(), 43);
        assert_ne!(d, refresh_digest("token2"));
        assert!(!d.contains('=') && !d.contains('+') && !d.contains('/'));
    }

    #[test]
    fn a_refresh_digest_names_the_tokens_family() {
        let token = refresh_token("Fam_1-x", "secret");
        assert_eq!(token, "Fam_1-x.secret");
        let d = refresh_digest(&token);
        let (family, hash) = d.split_once('.').unwrap();
        assert_eq!((family, hash.len()), ("Fam_1-x", 43));
        assert_ne!(refresh_digest("Fam_1-x.other"), d, "the hash covers the secret");
        // Nothing but a base64url family is taken for one: no braces (hash
        // tags) or other characters from a presented token reach the key.
        for bad in ["{x}.secret", "a}b.secret", ".secret", "no-dot", &format!("{}.s", "f".repeat(65))] {
            assert!(!refresh_digest(bad).contains('.'), "{bad}");
        }
    }
}
