//! Who may log in: users (argon2id password hashes) and service accounts
//! (SHA-256 digests of server-generated 256-bit secrets, compared in
//! constant time), both loaded from TOML files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::ConfigError;
use crate::error::AuthError;
use crate::password::{MAX_M_COST_KIB, PasswordMemory};
use crate::tls::PeerIdentity;

/// A user of the password grant.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Role claim.
    #[serde(default)]
    pub role: Option<String>,
    /// Permissions the user may be granted.
    #[serde(default)]
    pub perms: Vec<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("username", &self.username).field("role", &self.role).finish_non_exhaustive()
    }
}

/// A service account.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// The client id, also the service's audience name (e.g. `order`).
    pub client_id: String,
    /// Hex SHA-256 of the client secret.
    pub secret_sha256: String,
    /// When set, the caller must present a client certificate with this
    /// identity (URI SAN, else DNS SAN); a right secret from the wrong
    /// certificate is refused. The certificate alone also authenticates the
    /// account (an empty secret), so no two accounts may share an identity.
    #[serde(default)]
    pub mtls_identity: Option<String>,
    /// RFC 8705: whether the account's tokens (client-credentials Login,
    /// ExchangeToken, ExchangeTokens, on behalf of a user too) carry
    /// `cnf.x5t#S256` of the client certificate it called with, so that
    /// they are refused when presented over any other certificate. Unset:
    /// on when `mtls_identity` is set, off otherwise.
    #[serde(default)]
    pub certificate_bound_tokens: Option<bool>,
    /// Role claim of the service's own tokens.
    #[serde(default)]
    pub role: Option<String>,
    /// Permissions of the service acting as itself at the auth service
    /// (e.g. the admin permission).
    #[serde(default)]
    pub perms: Vec<String>,
    /// Audiences it may request, each with the most scopes allowed for it.
    #[serde(default)]
    pub audiences: BTreeMap<String, Vec<String>>,
}

impl Account {
    /// This account as one `[[account]]` block of the accounts file (the
    /// secret's digest, never a secret).
    pub fn to_toml_block(&self) -> Result<String, toml::ser::Error> {
        #[derive(Serialize)]
        struct AccountsFile<'a> {
            account: &'a [Account],
        }
        toml::to_string(&AccountsFile { account: std::slice::from_ref(self) })
    }

    /// Whether this account's tokens are bound to its client certificate
    /// (`certificate_bound_tokens`, by default on for an account bound to
    /// an mTLS identity).
    pub fn binds_tokens(&self) -> bool {
        self.certificate_bound_tokens.unwrap_or(self.mtls_identity.is_some())
    }
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("client_id", &self.client_id)
            .field("mtls_identity", &self.mtls_identity)
            .field("certificate_bound_tokens", &self.binds_tokens())
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<User>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    #[serde(default)]
    account: Vec<Account>,
}

struct LoadedAccount {
    account: Account,
    digest: [u8; 32],
}

/// The contents of the users and accounts files, read together so that a
/// reload can tell whether they changed ([`DirectoryFiles::digest`]).
pub struct DirectoryFiles {
    users: String,
    accounts: String,
}

impl std::fmt::Debug for DirectoryFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryFiles").finish_non_exhaustive()
    }
}

impl DirectoryFiles {
    /// Reads both files, again until two reads in a row agree (at most a
    /// few times): a file caught while an editor rewrites it in place is
    /// not taken for the new version.
    pub fn read(users_file: &Path, accounts_file: &Path) -> Result<Self, ConfigError> {
        let read = |key: &str, p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| ConfigError { key: key.into(), problem: format!("{}: {e}", p.display()) })
        };
        let once = || -> Result<Self, ConfigError> {
            Ok(Self { users: read("users_file", users_file)?, accounts: read("accounts_file", accounts_file)? })
        };
        let mut last = once()?;
        for _ in 0..3 {
            let again = once()?;
            if again.digest() == last.digest() {
                return Ok(again);
            }
            last = again;
        }
        Ok(last)
    }

    /// SHA-256 over both contents.
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in [&self.users, &self.accounts] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Parses and checks them (CPU-heavy: the decoy password hash).
    pub fn parse(&self) -> Result<Directory, ConfigError> {
        Directory::from_toml(&self.users, &self.accounts)
    }
}

/// Users and service accounts, as loaded from their files (swapped whole
/// on reload).
pub struct Directory {
    users: HashMap<String, User>,
    accounts: HashMap<String, LoadedAccount>,
    /// A real argon2 hash that nobody's password matches, with the
    /// parameters of the costliest configured user hash, verified for
    /// unknown users so they cost the same time as a wrong password.
    decoy_hash: String,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("users", &self.users.len())
            .field("accounts", &self.accounts.len())
            .finish_non_exhaustive()
    }
}

/// The hex SHA-256 digest of a client secret, as stored in the accounts file.
pub fn secret_digest_hex(secret: &str) -> String {
    digest::digest(&digest::SHA256, secret.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new client secret: 256 random bits, base64url.
pub fn generate_secret() -> Result<String, AuthError> {
    random_token(32)
}

/// `n` random bytes, base64url (ids, secrets, refresh tokens).
pub fn random_token(n: usize) -> Result<String, AuthError> {
    let mut buf = vec![0u8; n];
    SystemRandom::new().fill(&mut buf).map_err(|_| AuthError::Internal("random generator failed"))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// An argon2id PHC hash of `password` (default parameters). Its working
/// memory is returned to the system afterwards.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    crate::password::hash(password.as_bytes(), &mut PasswordMemory::default())
}

/// A PHC hash of `password` with `hasher`'s algorithm, version and
/// parameters, in memory argon2 allocates itself (tools and tests).
pub fn hash_password_with(password: &str, hasher: &Argon2<'_>) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    SystemRandom::new().fill(&mut salt).map_err(|_| AuthError::Internal("random generator failed"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|_| AuthError::Internal("salt encoding failed"))?;
    hasher
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| AuthError::Internal("password hashing failed"))
}

/// The scheme of an argon2 PHC string: its algorithm, version and
/// parameters (the cost of verifying a password against it).
fn scheme_of(phc: &str) -> Option<(Algorithm, Version, Params)> {
    let hash = PasswordHash::new(phc).ok()?;
    let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
    let version = hash.version.map_or(Ok(Version::default()), Version::try_from).ok()?;
    let params = Params::try_from(&hash).ok()?;
    Some((algorithm, version, params))
}

/// The work one verification with `params` does: memory × passes (lanes
/// split the memory; without threads they run one after another).
fn cost_of(params: &Params) -> (u64, u32) {
    (u64::from(params.m_cost()) * u64::from(params.t_cost()), params.p_cost())
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

impl Directory {
    /// Loads and checks both files.
    pub fn load(users_file: &Path, accounts_file: &Path) -> Result<Self, ConfigError> {
        let read = |key: &str, p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| ConfigError { key: key.into(), problem: format!("{}: {e}", p.display()) })
        };
        Self::from_toml(&read("users_file", users_file)?, &read("accounts_file", accounts_file)?)
    }

    /// Parses and checks the two files' contents.
    pub fn from_toml(users: &str, accounts: &str) -> Result<Self, ConfigError> {
        let users: UsersFile = toml::from_str(users)
            .map_err(|e| ConfigError { key: "users_file".into(), problem: e.message().to_owned() })?;
        let accounts: AccountsFile = toml::from_str(accounts)
            .map_err(|e| ConfigError { key: "accounts_file".into(), problem: e.message().to_owned() })?;
        Self::new(users.user, accounts.account)
    }

    /// Builds a directory from values, checking each entry.
    pub fn new(users: Vec<User>, accounts: Vec<Account>) -> Result<Self, ConfigError> {
        let mut u = HashMap::new();
        // The decoy for unknown users costs as much as the costliest real
        // hash, so their answer is never faster than a wrong password's.
        let mut decoy = (Algorithm::Argon2id, Version::V0x13, Params::default());
        for user in users {
            let Some(scheme) = scheme_of(&user.password_hash) else {
                return Err(ConfigError {
                    key: format!("users_file: user {}", user.username),
                    problem: "password_hash is not an argon2 PHC string".into(),
                });
            };
            if scheme.2.m_cost() > MAX_M_COST_KIB {
                return Err(ConfigError {
                    key: format!("users_file: user {}", user.username),
                    problem: format!("password_hash: m above {MAX_M_COST_KIB} KiB (each password thread holds it)"),
                });
            }
            if cost_of(&scheme.2) > cost_of(&decoy.2) {
                decoy = scheme;
            }
            if u.insert(user.username.clone(), user).is_some() {
                return Err(ConfigError { key: "users_file".into(), problem: "duplicate username".into() });
            }
        }
        let mut a = HashMap::new();
        for account in accounts {
            let Some(digest) = parse_hex32(&account.secret_sha256) else {
                return Err(ConfigError {
                    key: format!("accounts_file: account {}", account.client_id),
                    problem: "secret_sha256 must be 64 hex digits".into(),
                });
            };
            let id = account.client_id.clone();
            if let Some(identity) = &account.mtls_identity
                && let Some(other) =
                    a.values().find(|o: &&LoadedAccount| o.account.mtls_identity.as_ref() == Some(identity))
            {
                // Certificate-only authentication picks the account by its
                // identity: two accounts sharing one would make the choice
                // arbitrary.
                return Err(ConfigError {
                    key: "accounts_file".into(),
                    problem: format!(
                        "accounts {:?} and {id:?} have the same mtls_identity {identity:?}",
                        other.account.client_id
                    ),
                });
            }
            if a.insert(id.clone(), LoadedAccount { account, digest }).is_some() {
                return Err(ConfigError { key: "accounts_file".into(), problem: format!("duplicate client_id {id}") });
            }
        }
        let (algorithm, version, params) = decoy;
        let decoy_hash = crate::password::hash_as(
            b"decoy password nobody has",
            algorithm,
            version,
            params,
            &mut PasswordMemory::default(),
        )
        .map_err(|e| ConfigError { key: "users_file".into(), problem: e.to_string() })?;
        Ok(Self { users: u, accounts: a, decoy_hash })
    }

    /// The user, if `password` is right. Unknown users are checked against a
    /// decoy hash so they take as long as a wrong password. CPU-heavy: call
    /// on a password thread, with its argon2 `memory`.
    pub fn verify_password(&self, username: &str, password: &str, memory: &mut PasswordMemory) -> Option<&User> {
        let user = self.users.get(username);
        let hash = user.map_or(self.decoy_hash.as_str(), |u| u.password_hash.as_str());
        if crate::password::verify(hash, password.as_bytes(), memory) { user } else { None }
    }

    /// The client ids of the service accounts, sorted.
    pub fn account_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// How many users there are.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// A service account by client id.
    pub fn account(&self, client_id: &str) -> Option<&Account> {
        self.accounts.get(client_id).map(|a| &a.account)
    }

    /// A user by name (refresh re-reads the current role and perms).
    pub fn user(&self, username: &str) -> Option<&User> {
        self.users.get(username)
    }

    /// Authenticates a service by secret and/or mTLS identity.
    ///
    /// - With a secret: `client_id` names the account, the secret's digest must
    ///   match (constant time), and a bound account also needs its identity.
    /// - Without a secret: the account bound to the peer's identity (and
    ///   matching `client_id`, when given).
    pub fn authenticate_service(
        &self,
        client_id: &str,
        secret: &str,
        peer: Option<&PeerIdentity>,
    ) -> Result<&Account, AuthError> {
        const BAD: AuthError = AuthError::Unauthenticated("invalid client credentials");
        if !secret.is_empty() {
            let presented = digest::digest(&digest::SHA256, secret.as_bytes());
            let Some(acc) = self.accounts.get(client_id) else {
                // Same work as a known account: one compare against a decoy.
                let _ = presented.as_ref().ct_eq(&[0u8; 32]);
                // The client's string: escaped and cut, as in every log line.
                tracing::info!(
                    client_id = ?crate::edge::Capped(client_id),
                    config_key = "accounts_file",
                    "no account with this client_id"
                );
                return Err(BAD);
            };
            if !bool::from(presented.as_ref().ct_eq(&acc.digest)) {
                return Err(BAD);
            }
            if let Some(bound) = &acc.account.mtls_identity
                && peer.map(|p| &p.id) != Some(bound)
            {
                // The same answer as a wrong secret: a distinct one would
                // tell whoever holds a stolen secret that it is right.
                tracing::info!(
                    client_id = ?acc.account.client_id,
                    presented = ?peer.map(|p| p.id.as_str()),
                    config_key = "accounts_file: mtls_identity",
                    "right secret from the wrong certificate"
                );
                return Err(BAD);
            }
            return Ok(&acc.account);
        }
        let Some(peer) = peer else { return Err(BAD) };
        let found = self.accounts.values().map(|a| &a.account).find(|a| {
            a.mtls_identity.as_deref() == Some(peer.id.as_str()) && (client_id.is_empty() || a.client_id == client_id)
        });
        if found.is_none() {
            tracing::info!(
                client_id = ?crate::edge::Capped(client_id),
                identity = %peer.id,
                config_key = "accounts_file: mtls_identity",
                "no account bound to the caller's certificate (and no secret given)"
            );
        }
        found.ok_or(BAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(secret: &str, bound: Option<&str>) -> Account {
        Account {
            client_id: "order".into(),
            secret_sha256: secret_digest_hex(secret),
            mtls_identity: bound.map(str::to_owned),
            certificate_bound_tokens: None,
            role: None,
            perms: vec![],
            audiences: BTreeMap::new(),
        }
    }

    fn peer(id: &str) -> PeerIdentity {
        PeerIdentity { id: id.into(), cert_sha256: [0; 32] }
    }

    #[test]
    fn service_secret_must_match() {
        let d = Directory::new(vec![], vec![account("s3cret", None)]).unwrap();
        assert!(d.authenticate_service("order", "s3cret", None).is_ok());
        assert!(d.authenticate_service("order", "wrong", None).is_err());
        assert!(d.authenticate_service("nobody", "s3cret", None).is_err());
        assert!(d.authenticate_service("order", "", None).is_err());
    }

    #[test]
    fn bound_account_needs_its_certificate() {
        let d = Directory::new(vec![], vec![account("s3cret", Some("spiffe://x/order"))]).unwrap();
        assert!(d.authenticate_service("order", "s3cret", Some(&peer("spiffe://x/order"))).is_ok());
        assert!(d.authenticate_service("order", "s3cret", Some(&peer("spiffe://x/evil"))).is_err());
        assert!(d.authenticate_service("", "", Some(&peer("spiffe://x/order"))).is_ok());
        assert!(d.authenticate_service("", "", Some(&peer("spiffe://x/evil"))).is_err());
    }

    #[test]
    fn tokens_are_certificate_bound_by_default_for_accounts_with_an_mtls_identity() {
        let mut a = account("s3cret", Some("spiffe://x/order"));
        assert!(a.binds_tokens());
        a.certificate_bound_tokens = Some(false);
        assert!(!a.binds_tokens());
        let mut b = account("s3cret", None);
        assert!(!b.binds_tokens());
        b.certificate_bound_tokens = Some(true);
        assert!(b.binds_tokens());
    }

    #[test]
    fn passwords_verify_and_unknown_users_fail() {
        let user =
            User { username: "alice".into(), password_hash: hash_password("pw").unwrap(), role: None, perms: vec![] };
        let d = Directory::new(vec![user], vec![]).unwrap();
        let mem = &mut PasswordMemory::default();
        assert!(d.verify_password("alice", "pw", mem).is_some());
        assert!(d.verify_password("alice", "nope", mem).is_none());
        assert!(d.verify_password("mallory", "pw", mem).is_none());
    }

    #[test]
    fn the_decoy_for_unknown_users_has_the_costliest_users_parameters() {
        let costly = Params::new(32 * 1024, 3, 1, None).unwrap();
        let phc = |password: &str, params: Params| {
            crate::password::hash_as(
                password.as_bytes(),
                Algorithm::Argon2id,
                Version::V0x13,
                params,
                &mut PasswordMemory::default(),
            )
            .unwrap()
        };
        let user = |name: &str, password_hash: String| User {
            username: name.into(),
            password_hash,
            role: None,
            perms: vec![],
        };
        let cheap = Params::new(8 * 1024, 1, 1, None).unwrap();
        let d =
            Directory::new(vec![user("bob", phc("b", cheap.clone())), user("alice", phc("a", costly.clone()))], vec![])
                .unwrap();
        let (algorithm, version, params) = scheme_of(&d.decoy_hash).unwrap();
        assert_eq!((algorithm, version), (Algorithm::Argon2id, Version::V0x13));
        assert_eq!((params.m_cost(), params.t_cost(), params.p_cost()), (32 * 1024, 3, 1));
        // With only cheap hashes, the decoy still costs argon2's defaults.
        let d = Directory::new(vec![user("bob", phc("b", cheap))], vec![]).unwrap();
        let params = scheme_of(&d.decoy_hash).unwrap().2;
        let default = Params::default();
        assert_eq!((params.m_cost(), params.t_cost()), (default.m_cost(), default.t_cost()));
    }

    #[test]
    fn a_hash_that_would_pin_too_much_memory_is_refused_at_load() {
        let huge = "$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let user = User { username: "big".into(), password_hash: huge.into(), role: None, perms: vec![] };
        let err = Directory::new(vec![user], vec![]).unwrap_err();
        assert_eq!(err.key, "users_file: user big");
        assert!(err.problem.contains("262144 KiB"), "{}", err.problem);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let a = account("s3cret", None);
        let shown = format!("{a:?}");
        assert!(!shown.contains(&a.secret_sha256));
    }
}
