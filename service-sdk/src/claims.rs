//! The typed claims of an access token, shared by the issuer and every verifier.

use serde::{Deserialize, Serialize};

/// The JOSE `typ` of every access token (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// The claims of an access token, exactly as the token contract defines them.
///
/// Unknown claims are ignored; duplicate claim names make the token invalid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer, e.g. `auth-service`.
    pub iss: String,
    /// Subject: a user id, or `svc:<name>` for a service acting as itself.
    pub sub: String,
    /// Audience: the service(s) this token is for.
    pub aud: Audience,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Unique token id (128 random bits, base64url).
    pub jti: String,
    /// Login session id, shared by every token derived from one login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The client (service account or login client) the token was issued to.
    pub client_id: String,
    /// The subject's role, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Granted permissions (scopes).
    #[serde(default)]
    pub perms: Vec<String>,
    /// RFC 8693 delegation: the chain of services acting for `sub`, the most
    /// recent first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// RFC 8705 confirmation: the token is bound to a client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

impl Claims {
    /// The subject (user id or `svc:<name>`).
    pub fn subject(&self) -> &str {
        &self.sub
    }

    /// Whether the token grants `perm`.
    pub fn has_perm(&self, perm: &str) -> bool {
        self.perms.iter().any(|p| p == perm)
    }

    /// The delegation chain, most recent actor first (empty when the subject
    /// calls for itself).
    pub fn actor_chain(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut next = self.act.as_ref();
        while let Some(a) = next {
            out.push(a.sub.as_str());
            next = a.act.as_deref();
        }
        out
    }
}

/// The `aud` claim: one audience or several.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience, serialized as a string.
    One(String),
    /// Several audiences, serialized as an array.
    Many(Vec<String>),
}

impl Audience {
    /// Whether `name` is one of the audiences.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Audience::One(a) => a == name,
            Audience::Many(v) => v.iter().any(|a| a == name),
        }
    }

    /// All audiences as a slice-like iterator.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many): (Option<&String>, &[String]) = match self {
            Audience::One(a) => (Some(a), &[]),
            Audience::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter()).map(String::as_str)
    }

    /// Builds the most compact form: a string for one audience, else an array.
    pub fn from_list(mut list: Vec<String>) -> Self {
        if list.len() == 1 { Audience::One(list.remove(0)) } else { Audience::Many(list) }
    }
}

/// One link of the RFC 8693 `act` chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The acting service, `svc:<name>`.
    pub sub: String,
    /// The actor before this one, if the chain is longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// Number of links in this chain (1 for a single actor).
    pub fn depth(&self) -> usize {
        1 + self.act.as_ref().map_or(0, |a| a.depth())
    }
}

/// RFC 8705 confirmation claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url SHA-256 thumbprint of the bound client certificate (DER).
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_accepts_string_and_array() {
        let one: Audience = serde_json::from_str("\"inventory\"").unwrap();
        assert!(one.contains("inventory"));
        let many: Audience = serde_json::from_str("[\"a\",\"inventory\"]").unwrap();
        assert!(many.contains("inventory"));
        assert!(!many.contains("order"));
        assert_eq!(many.iter().count(), 2);
    }

    #[test]
    fn actor_chain_lists_most_recent_first() {
        let act = Actor { sub: "svc:b".into(), act: Some(Box::new(Actor { sub: "svc:a".into(), act: None })) };
        assert_eq!(act.depth(), 2);
        let c = Claims {
            iss: "i".into(),
            sub: "u".into(),
            aud: Audience::One("x".into()),
            exp: 2,
            nbf: 0,
            iat: 0,
            jti: "j".into(),
            sid: None,
            client_id: "c".into(),
            role: None,
            perms: vec!["p".into()],
            act: Some(act),
            cnf: None,
        };
        assert_eq!(c.actor_chain(), vec!["svc:b", "svc:a"]);
        assert!(c.has_perm("p") && !c.has_perm("q"));
    }

    #[test]
    fn duplicate_claims_are_refused() {
        let json = r#"{"iss":"a","iss":"b","sub":"u","aud":"x","exp":1,"nbf":0,"iat":0,"jti":"j","client_id":"c"}"#;
        assert!(serde_json::from_str::<Claims>(json).is_err());
    }
}
