//! Admitting one more service or user to a dev directory
//! (`auth-server dev add-service`, `auth-server dev add-user`), with the
//! conventions `auth-server dev` itself follows:
//!
//! - a service's certificate comes from the dev CA (`ca.pem`, its key kept in
//!   `ca-key.pem`): URI SAN `spiffe://auth.dev/<name>` (its identity, which
//!   its account is bound to), DNS SAN `<name>` (the TLS name its callers
//!   check), usable for both client and server auth;
//! - its account goes at the end of the accounts file, bound to that
//!   identity, with the digest of a fresh 256-bit secret; the secret goes
//!   to `credentials/<name>.json` (`{"client_id", "client_secret"}`);
//! - a user gets an argon2id hash in the users file and its password in
//!   `credentials/<name>.json` (`{"username", "password"}`).
//!
//! Every file is written with mode 0600. The users and accounts files are
//! replaced whole (a new file renamed over the old, after fsync), so a
//! running server that polls them never reads half a file, and each new
//! version is checked the way the server loads it before it replaces the
//! old one. Nothing is written when a check fails; the file the server
//! reads is written last, so a failure midway leaves no account without its
//! credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{CA_KEY_FILE, DEV_TRUST_DOMAIN, DevError, pki};
use crate::config::Config;
use crate::directory::{Account, Directory, User, generate_secret, hash_password, secret_digest_hex};

/// What `dev add-service` creates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The service's name: its client id, audience, identity path and TLS
    /// name.
    pub name: String,
    /// Audiences it may call, each with the scopes it may ask for there.
    pub audiences: BTreeMap<String, Vec<String>>,
    /// Its own permissions at the auth service (rarely needed).
    pub perms: Vec<String>,
    /// The role claim of its own tokens.
    pub role: String,
    /// Whether users may log in for it (adds it to `tokens.user_audiences`
    /// in the dev config): a service that users call directly.
    pub for_users: bool,
    /// Existing accounts that may call it, each with the scopes they may
    /// ask for (adds `<name> = [scopes]` to their `audiences`).
    pub callers: BTreeMap<String, Vec<String>>,
}

/// What `dev add-user` creates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSpec {
    /// The login name.
    pub name: String,
    /// Its role claim.
    pub role: String,
    /// The permissions it may be granted.
    pub perms: Vec<String>,
}

/// A service admitted by [`add_service`]: where its files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedService {
    /// Its name.
    pub name: String,
    /// Its identity (URI SAN), which its account is bound to.
    pub identity: String,
    /// The dev directory (absolute).
    pub dir: PathBuf,
    /// The auth server's gRPC URL, from the dev config.
    pub auth_url: String,
    /// The dev CA (trust anchor for the auth server and other services).
    pub ca: PathBuf,
    /// Its certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Its credentials document.
    pub credentials: PathBuf,
    /// The accounts file it was added to.
    pub accounts_file: PathBuf,
    /// Its audiences and scopes.
    pub audiences: BTreeMap<String, Vec<String>>,
    /// `tokens.user_audiences` after the change, when users may log in for it.
    pub user_audiences: Option<Vec<String>>,
    /// The accounts that may now call it, with their scopes.
    pub callers: BTreeMap<String, Vec<String>>,
}

/// A user admitted by [`add_user`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedUser {
    /// The login name.
    pub name: String,
    /// Its permissions.
    pub perms: Vec<String>,
    /// The users file it was added to.
    pub users_file: PathBuf,
    /// Its credentials document (`{"username", "password"}`).
    pub credentials: PathBuf,
    /// The audiences users may log in for (`tokens.user_audiences`).
    pub user_audiences: Vec<String>,
}

/// The dev directory's config, as `add-*` needs it.
struct DevDir {
    dir: PathBuf,
    config_path: PathBuf,
    config: Config,
}

impl DevDir {
    fn open(dir: &Path) -> Result<Self, DevError> {
        let dir = std::path::absolute(dir).map_err(|source| DevError::Io { path: dir.to_owned(), source })?;
        let config_path = dir.join("auth-server.toml");
        if !config_path.is_file() {
            return Err(DevError::NotDevDir(dir));
        }
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| DevError::Io { path: config_path.clone(), source })?;
        let config = Config::from_toml_str(&text, &dir)
            .map_err(|e| DevError::Invalid { path: config_path.clone(), problem: e.to_string() })?;
        Ok(Self { dir, config_path, config })
    }

    fn credentials(&self, name: &str) -> PathBuf {
        self.dir.join("credentials").join(format!("{name}.json"))
    }

    /// Refuses `name` if its credentials file exists (users and services
    /// share `credentials/`).
    fn refuse_taken_credentials(&self, kind: &'static str, name: &str) -> Result<(), DevError> {
        let path = self.credentials(name);
        if path.exists() {
            return Err(DevError::Exists {
                kind,
                name: name.to_owned(),
                what: format!("{} exists (a service or user of that name)", path.display()),
            });
        }
        Ok(())
    }

    /// The users and accounts files' texts, and the directory they make;
    /// `kind` and `name` are refused if either already holds the name.
    fn current(&self, kind: &'static str, name: &str) -> Result<(String, String), DevError> {
        let (users_file, accounts_file) = (&self.config.users_file, &self.config.accounts_file);
        let users = self.read(users_file)?;
        let accounts = self.read(accounts_file)?;
        let (file, held) = match Directory::from_toml(&users, &accounts) {
            Ok(d) if kind == "user" => (users_file, d.user(name).is_some()),
            Ok(d) => (accounts_file, d.account(name).is_some()),
            Err(e) => return Err(DevError::Invalid { path: accounts_file.clone(), problem: e.to_string() }),
        };
        if held {
            return Err(DevError::Exists {
                kind,
                name: name.to_owned(),
                what: format!("{} already has {kind} {name:?}", file.display()),
            });
        }
        self.refuse_taken_credentials(kind, name)?;
        Ok((users, accounts))
    }

    fn read(&self, path: &Path) -> Result<String, DevError> {
        std::fs::read_to_string(path).map_err(|source| DevError::Io { path: path.to_owned(), source })
    }

    /// Checks the users and accounts files as the server would load them
    /// (and the auth service's own audience, which no account may take).
    fn check(&self, users: &str, accounts: &str, changed: &Path) -> Result<(), DevError> {
        let invalid = |problem: String| DevError::Invalid { path: changed.to_owned(), problem };
        let dir = Directory::from_toml(users, accounts).map_err(|e| invalid(e.to_string()))?;
        let own = self.config.tokens.self_audience.as_str();
        if dir.account(own).is_some() {
            return Err(invalid(format!(
                "client_id {own:?} is the auth service's own audience (tokens.self_audience)"
            )));
        }
        Ok(())
    }

    fn auth_url(&self) -> String {
        let addr: SocketAddr = self.config.grpc_addr;
        let ip = if addr.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { addr.ip() };
        format!("https://{}", SocketAddr::new(ip, addr.port()))
    }
}

/// `1..=63` lowercase letters, digits and `-`, starting with a letter and
/// not ending with `-`: usable as a DNS label, a SPIFFE path segment, a
/// file name and a client id.
fn check_service_name(name: &str, dev: &DevDir) -> Result<(), DevError> {
    let bad = |why: String| DevError::BadName { kind: "service", name: name.to_owned(), why };
    let label = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_lowercase()
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !label {
        return Err(bad(
            "use 1 to 63 lowercase letters, digits and '-', starting with a letter and not ending with '-' \
             (it becomes a DNS name, a SPIFFE ID and a file name)"
                .into(),
        ));
    }
    if name == service_sdk::AUTH_SERVER_NAME {
        return Err(bad("that is the auth server's own identity (spiffe://<domain>/auth-server)".into()));
    }
    if name == "localhost" {
        // The service's certificate carries its name as a DNS name, from the
        // CA that also signs the auth server's: `localhost` would let it
        // answer as the auth server to a client that checks names only.
        return Err(bad("that is a name the auth server's certificate carries (DNS:localhost)".into()));
    }
    if name == crate::grant::PASSWORD_CLIENT_ID {
        return Err(bad("that is the client_id of user tokens".into()));
    }
    if name == dev.config.tokens.self_audience {
        return Err(
            bad("that is the auth service's own audience (tokens.self_audience, by default the issuer)".into()),
        );
    }
    Ok(())
}

/// 1 to 64 letters, digits, `.`, `_`, `-` or `@`, starting with a letter or
/// digit (no `:`, which service subjects use: `svc:<name>`).
fn check_user_name(name: &str) -> Result<(), DevError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(DevError::BadName {
            kind: "user",
            name: name.to_owned(),
            why: "use 1 to 64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit".into(),
        })
    }
}

/// Parses `AUD=scope,scope` (or `AUD` alone: no scopes) into `audiences`,
/// as `new-account --audience` does.
pub fn parse_audience(audiences: &mut BTreeMap<String, Vec<String>>, arg: &str) -> Result<(), DevError> {
    crate::admin::parse_audience(audiences, arg).map_err(|e| DevError::Argument(e.to_string()))
}

/// Admits service `spec.name` to the dev environment in `dir`: issues its
/// certificate from the dev CA, writes its credentials, adds `name` to
/// `tokens.user_audiences` when `spec.for_users`, and appends its account
/// (bound to its identity) to the accounts file. Refuses a name that is
/// taken or unusable, and a dev directory without the CA key.
pub fn add_service(dir: &Path, spec: &ServiceSpec) -> Result<AddedService, DevError> {
    let dev = DevDir::open(dir)?;
    let name = spec.name.as_str();
    check_service_name(name, &dev)?;
    let accounts_file = dev.config.accounts_file.clone();
    let (users_text, accounts_text) = dev.current("service", name)?;
    let cert_path = dev.dir.join("clients").join(format!("{name}.pem"));
    let key_path = dev.dir.join("clients").join(format!("{name}-key.pem"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(DevError::Exists {
                kind: "service",
                name: name.to_owned(),
                what: format!("{} exists", p.display()),
            });
        }
    }

    let ca_key_path = dev.dir.join(CA_KEY_FILE);
    if !ca_key_path.exists() {
        return Err(DevError::NoCaKey(dev.dir.clone()));
    }
    super::check_private_mode(&ca_key_path)?;
    let ca_path = dev.dir.join("ca.pem");
    let ca = pki::Ca::from_pem(&dev.read(&ca_path)?, &dev.read(&ca_key_path)?)
        .ok_or_else(|| DevError::BadCaKey(ca_key_path.clone()))?;

    // The new accounts file, checked before anything is written.
    let identity = format!("spiffe://{DEV_TRUST_DOMAIN}/{name}");
    let secret = generate_secret().map_err(|_| DevError::Generate("client secret"))?;
    let account = Account {
        client_id: name.to_owned(),
        secret_sha256: secret_digest_hex(&secret),
        mtls_identity: Some(identity.clone()),
        certificate_bound_tokens: None,
        role: Some(spec.role.clone()),
        perms: spec.perms.clone(),
        audiences: spec.audiences.clone(),
    };
    let block = account.to_toml_block().map_err(|_| DevError::Generate("TOML"))?;
    let with_callers = allow_callers(&accounts_text, name, &spec.callers, &accounts_file)?;
    let new_accounts =
        format!("{}\n# Added by `auth-server dev add-service {name}`.\n{block}", with_callers.trim_end());
    dev.check(&users_text, &new_accounts, &accounts_file)?;
    let new_config = if spec.for_users { Some(with_user_audience(&dev, name)?) } else { None };

    let issued = ca.client_cert(DEV_TRUST_DOMAIN, name)?;
    super::write_new_private(&cert_path, issued.cert_pem.as_bytes())?;
    super::write_new_private(&key_path, issued.key_pem.as_bytes())?;
    let creds = serde_json::json!({ "client_id": name, "client_secret": secret });
    let credentials = dev.credentials(name);
    super::write_new_private(&credentials, format!("{creds}\n").as_bytes())?;
    let user_audiences = match new_config {
        Some((text, audiences)) => {
            super::replace_private(&dev.config_path, text.as_bytes())?;
            Some(audiences)
        }
        None => None,
    };
    // Last: the file the server reads.
    super::replace_private(&accounts_file, new_accounts.as_bytes())?;
    Ok(AddedService {
        name: name.to_owned(),
        identity,
        auth_url: dev.auth_url(),
        ca: ca_path,
        cert: cert_path,
        key: key_path,
        credentials,
        accounts_file,
        audiences: spec.audiences.clone(),
        user_audiences,
        callers: spec.callers.clone(),
        dir: dev.dir,
    })
}

/// `accounts` (the file's text, comments and layout kept) with `name =
/// [scopes]` added to the `audiences` of each account in `callers`. An
/// unknown caller is an error, and so is one that already lists `name`.
fn allow_callers(
    accounts: &str,
    name: &str,
    callers: &BTreeMap<String, Vec<String>>,
    path: &Path,
) -> Result<String, DevError> {
    if callers.is_empty() {
        return Ok(accounts.to_owned());
    }
    let invalid = |problem: String| DevError::Invalid { path: path.to_owned(), problem };
    let mut doc: toml_edit::DocumentMut =
        accounts.parse().map_err(|e: toml_edit::TomlError| invalid(e.message().to_owned()))?;
    let list = doc
        .get_mut("account")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| invalid("no [[account]] entries".into()))?;
    for (caller, scopes) in callers {
        let account = list
            .iter_mut()
            .find(|t| t.get("client_id").and_then(toml_edit::Item::as_str) == Some(caller.as_str()))
            .ok_or_else(|| {
                DevError::Argument(format!("--caller {caller}: no account {caller:?} in {}", path.display()))
            })?;
        let audiences = account
            .entry("audiences")
            .or_insert_with(toml_edit::table)
            .as_table_like_mut()
            .ok_or_else(|| invalid(format!("account {caller:?}: audiences is not a table")))?;
        if audiences.contains_key(name) {
            return Err(DevError::Argument(format!("--caller {caller}: it already lists audience {name:?}")));
        }
        let scopes: toml_edit::Array = scopes.iter().map(String::as_str).collect();
        audiences.insert(name, toml_edit::value(scopes));
    }
    Ok(doc.to_string())
}

/// The dev config with `name` added to `tokens.user_audiences` (comments
/// and layout kept), checked, and the new list.
fn with_user_audience(dev: &DevDir, name: &str) -> Result<(String, Vec<String>), DevError> {
    let invalid = |problem: String| DevError::Invalid { path: dev.config_path.clone(), problem };
    let mut doc: toml_edit::DocumentMut =
        dev.read(&dev.config_path)?.parse().map_err(|e: toml_edit::TomlError| invalid(e.message().to_owned()))?;
    let tokens = doc
        .entry("tokens")
        .or_insert_with(toml_edit::table)
        .as_table_like_mut()
        .ok_or_else(|| invalid("tokens: not a table".into()))?;
    let list = tokens
        .entry("user_audiences")
        .or_insert(toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| invalid("tokens.user_audiences: not an array".into()))?;
    if !list.iter().any(|v| v.as_str() == Some(name)) {
        list.push(name);
    }
    let audiences: Vec<String> = list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    let text = doc.to_string();
    Config::from_toml_str(&text, &dev.dir).map_err(|e| invalid(e.to_string()))?;
    Ok((text, audiences))
}

/// Admits user `spec.name` to the dev environment in `dir`: a random
/// password, its argon2id hash appended to the users file, the password in
/// `credentials/<name>.json`. Refuses a name that is taken or unusable.
pub fn add_user(dir: &Path, spec: &UserSpec) -> Result<AddedUser, DevError> {
    let dev = DevDir::open(dir)?;
    let name = spec.name.as_str();
    check_user_name(name)?;
    let users_file = dev.config.users_file.clone();
    let (users_text, accounts_text) = dev.current("user", name)?;

    let password = generate_secret().map_err(|_| DevError::Generate("password"))?;
    let user = User {
        username: name.to_owned(),
        password_hash: hash_password(&password).map_err(|_| DevError::Generate("password hash"))?,
        role: Some(spec.role.clone()),
        perms: spec.perms.clone(),
    };
    #[derive(Serialize)]
    struct UsersFile<'a> {
        user: &'a [User],
    }
    let block =
        toml::to_string(&UsersFile { user: std::slice::from_ref(&user) }).map_err(|_| DevError::Generate("TOML"))?;
    let new_users = format!("{}\n# Added by `auth-server dev add-user {name}`.\n{block}", users_text.trim_end());
    dev.check(&new_users, &accounts_text, &users_file)?;

    let credentials = dev.credentials(name);
    let creds = serde_json::json!({ "username": name, "password": password });
    super::write_new_private(&credentials, format!("{creds}\n").as_bytes())?;
    super::replace_private(&users_file, new_users.as_bytes())?;
    Ok(AddedUser {
        name: name.to_owned(),
        perms: spec.perms.clone(),
        users_file,
        credentials,
        user_audiences: dev.config.tokens.user_audiences.clone(),
    })
}

/// The environment variables a service built on the SDK reads, in the
/// order [`AddedService::env`] lists them.
pub const SERVICE_ENV_VARS: [&str; 5] =
    ["AUTH_URL", "AUTH_TLS_CA", "AUTH_TLS_CERT", "AUTH_TLS_KEY", "AUTH_CREDENTIALS_FILE"];

impl AddedService {
    /// What the service's environment must hold: the SDK's variables, each
    /// with its value (absolute paths).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let [url, ca, cert, key, creds] = SERVICE_ENV_VARS;
        let path = |p: &Path| p.display().to_string();
        vec![
            (url, self.auth_url.clone()),
            (ca, path(&self.ca)),
            (cert, path(&self.cert)),
            (key, path(&self.key)),
            (creds, path(&self.credentials)),
        ]
    }

    /// What `dev add-service` prints: what was made, then the `export`
    /// lines for the service's environment (a shell can `eval` those lines).
    pub fn render(&self) -> String {
        let d = self.dir.display();
        let mut out = format!(
            "Added service {name} to {d}:\n\
             \x20 certificate {cert} (issued by the dev CA, {d}/{CA_KEY_FILE}):\n\
             \x20   identity {id} (URI SAN), TLS name {name} (DNS SAN), client and server auth\n\
             \x20 key         {key}\n\
             \x20 credentials {creds} (client_id, client_secret; the SDK's FileCredentials format)\n\
             \x20 account     client_id {name:?} in {accounts}, bound to {id}\n",
            name = self.name,
            cert = self.cert.display(),
            id = self.identity,
            key = self.key.display(),
            creds = self.credentials.display(),
            accounts = self.accounts_file.display(),
        );
        if self.audiences.is_empty() {
            out.push_str("              may call no other service (add --audience AUD=scope,scope to allow one)\n");
        }
        for (aud, scopes) in &self.audiences {
            out.push_str(&format!("              may call {aud} with scopes [{}]\n", scopes.join(", ")));
        }
        for (caller, scopes) in &self.callers {
            out.push_str(&format!(
                "              may be called by {caller} with scopes [{}] (added to its audiences)\n",
                scopes.join(", ")
            ));
        }
        match &self.user_audiences {
            Some(list) => out.push_str(&format!(
                "  users       may log in for audience {} (tokens.user_audiences = [{}])\n",
                self.name,
                list.join(", ")
            )),
            None => out.push_str(&format!(
                "  users       cannot log in for {} (add --for-users, or add it to tokens.user_audiences)\n",
                self.name
            )),
        }
        out.push_str(&format!(
            "A running `auth-server dev` picks the account up when it next checks the accounts file \
             (reload_check_secs), or at once on SIGHUP.{}\n\
             To let another service call {name}, add `{name} = [\"<scope>\", …]` to that account's \
             audiences in {accounts} (or give --caller SERVICE=scope,scope to add-service).\n\n\
             Set in the service's environment (the SDK's ServiceEnv reads these):\n",
            if self.user_audiences.is_some() { " tokens.user_audiences changed: send SIGHUP." } else { "" },
            name = self.name,
            accounts = self.accounts_file.display(),
        ));
        for (k, v) in self.env() {
            out.push_str(&format!("export {k}={}\n", shell_quote(&v)));
        }
        out.push_str(&format!(
            "Callers of {name} connect over mTLS trusting {ca} and check the TLS name {name}.\n",
            name = self.name,
            ca = self.ca.display()
        ));
        out
    }
}

impl AddedUser {
    /// What `dev add-user` prints.
    pub fn render(&self) -> String {
        let mut out = format!(
            "Added user {name} to {users} with perms [{perms}]\n\
             \x20 password in {creds} (username, password; mode 0600)\n\
             A running `auth-server dev` picks the user up when it next checks the users file \
             (reload_check_secs), or at once on SIGHUP.\n",
            name = self.name,
            users = self.users_file.display(),
            perms = self.perms.join(", "),
            creds = self.credentials.display(),
        );
        out.push_str(&format!(
            "Users may log in for the audiences [{}] (tokens.user_audiences; `dev add-service NAME --for-users` adds one).\n",
            self.user_audiences.join(", ")
        ));
        out
    }
}

/// `s` as one shell word: as is when it is plain, else single-quoted.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:+=@,".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn spec(name: &str) -> ServiceSpec {
        let mut audiences = BTreeMap::new();
        parse_audience(&mut audiences, "inventory=inventory:read").unwrap();
        ServiceSpec { name: name.into(), audiences, role: "service".into(), ..ServiceSpec::default() }
    }

    #[test]
    fn a_service_gets_a_certificate_from_the_kept_ca_an_account_and_credentials() {
        let tmp = tempfile::tempdir().unwrap();
        let env = super::super::ensure(tmp.path()).unwrap();
        let added = add_service(tmp.path(), &ServiceSpec { for_users: true, ..spec("payments") }).unwrap();
        // The certificate chains to the dev CA and follows the conventions.
        let cert = std::fs::read_to_string(&added.cert).unwrap();
        let (sans, client, server) = super::super::tests::describe(&cert);
        assert_eq!(sans, ["URI:spiffe://auth.dev/payments", "DNS:payments"]);
        assert_eq!((client, server), (true, true));
        let ca_pem = std::fs::read_to_string(env.ca_path()).unwrap();
        let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
        let ca = ca.parse_x509().unwrap();
        let (_, leaf) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
        leaf.parse_x509().unwrap().verify_signature(Some(ca.public_key())).unwrap();
        // The account loads, bound to the identity, with the secret written.
        let cfg = Config::load(&env.config_path, &Default::default()).unwrap();
        assert_eq!(cfg.tokens.user_audiences, ["order", "payments"]);
        let dir = Directory::load(&cfg.users_file, &cfg.accounts_file).unwrap();
        let creds: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&added.credentials).unwrap()).unwrap();
        let secret = creds["client_secret"].as_str().unwrap();
        let peer = crate::tls::PeerIdentity { id: "spiffe://auth.dev/payments".into(), cert_sha256: [0; 32] };
        let acc = dir.authenticate_service("payments", secret, Some(&peer)).unwrap();
        assert_eq!(acc.audiences["inventory"], ["inventory:read"]);
        assert!(dir.account("order").is_some(), "the others stay");
        for p in [&added.cert, &added.key, &added.credentials, &cfg.accounts_file] {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
        }
        let shown = added.render();
        assert!(shown.contains(&format!("export AUTH_CREDENTIALS_FILE={}", added.credentials.display())), "{shown}");
        assert!(!shown.contains(secret), "the secret stays in its file");
    }

    #[test]
    fn taken_and_bad_names_and_old_dev_dirs_are_refused_without_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let env = super::super::ensure(tmp.path()).unwrap();
        let accounts = std::fs::read(tmp.path().join("accounts.toml")).unwrap();
        for (name, expect) in [
            ("order", "already exists"),
            ("alice", "credentials"),
            ("auth-server", "auth server's own identity"),
            ("localhost", "DNS:localhost"),
            ("auth-service", "tokens.self_audience"),
            ("Pay ments", "lowercase"),
            ("../x", "lowercase"),
        ] {
            let err = add_service(tmp.path(), &spec(name)).unwrap_err().to_string();
            assert!(err.contains(expect), "{name}: {err}");
        }
        let err = add_user(tmp.path(), &UserSpec { name: "bob".into(), ..UserSpec::default() }).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(add_user(tmp.path(), &UserSpec { name: "svc:x".into(), ..UserSpec::default() }).is_err());
        assert_eq!(std::fs::read(tmp.path().join("accounts.toml")).unwrap(), accounts, "nothing written");

        std::fs::remove_file(env.ca_key_path()).unwrap();
        let err = add_service(tmp.path(), &spec("payments")).unwrap_err();
        assert!(matches!(err, DevError::NoCaKey(_)), "{err}");
        assert!(err.to_string().contains("delete the directory"), "{err}");
        assert!(!env.client_cert_path("payments").exists());

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(add_service(empty.path(), &spec("payments")), Err(DevError::NotDevDir(_))));
    }

    #[test]
    fn callers_get_the_new_audience_with_the_file_kept_and_unknown_callers_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let env = super::super::ensure(tmp.path()).unwrap();
        let accounts = tmp.path().join("accounts.toml");
        let text = std::fs::read_to_string(&accounts).unwrap();
        std::fs::write(&accounts, format!("# kept\n{text}")).unwrap();
        let mut callers = BTreeMap::new();
        parse_audience(&mut callers, "nobody=payments:charge").unwrap();
        let err = add_service(tmp.path(), &ServiceSpec { callers, ..spec("payments") }).unwrap_err();
        assert!(err.to_string().contains("no account \"nobody\""), "{err}");
        assert!(!env.client_cert_path("payments").exists(), "nothing written");

        let mut callers = BTreeMap::new();
        parse_audience(&mut callers, "order=payments:charge").unwrap();
        let added = add_service(tmp.path(), &ServiceSpec { callers, ..spec("payments") }).unwrap();
        assert!(added.render().contains("may be called by order with scopes [payments:charge]"));
        let written = std::fs::read_to_string(&accounts).unwrap();
        assert!(written.starts_with("# kept\n"), "{written}");
        let cfg = Config::load(&env.config_path, &Default::default()).unwrap();
        let dir = Directory::load(&cfg.users_file, &cfg.accounts_file).unwrap();
        let order = dir.account("order").unwrap();
        assert_eq!(order.audiences["payments"], ["payments:charge"]);
        assert_eq!(order.audiences["inventory"], ["inventory:read", "inventory:reserve"], "its others stay");
    }

    #[test]
    fn a_ca_key_that_is_not_the_cas_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let env = super::super::ensure(tmp.path()).unwrap();
        let other = pki::Ca::generate("other").unwrap();
        super::super::replace_private(&env.ca_key_path(), other.key_pem().as_bytes()).unwrap();
        assert!(matches!(add_service(tmp.path(), &spec("payments")), Err(DevError::BadCaKey(_))));
    }

    #[test]
    fn a_user_is_appended_with_a_hash_and_its_password_in_credentials() {
        let tmp = tempfile::tempdir().unwrap();
        let env = super::super::ensure(tmp.path()).unwrap();
        let added = add_user(
            tmp.path(),
            &UserSpec { name: "carol".into(), role: "customer".into(), perms: vec!["payments:charge".into()] },
        )
        .unwrap();
        let creds: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&added.credentials).unwrap()).unwrap();
        let cfg = Config::load(&env.config_path, &Default::default()).unwrap();
        let dir = Directory::load(&cfg.users_file, &cfg.accounts_file).unwrap();
        let mem = &mut crate::password::PasswordMemory::default();
        let user = dir.verify_password("carol", creds["password"].as_str().unwrap(), mem).unwrap();
        assert_eq!(user.perms, ["payments:charge"]);
        assert!(dir.user("alice").is_some());
        assert!(!added.render().contains(creds["password"].as_str().unwrap()));
    }
}
