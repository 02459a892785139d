//! Dev mode: everything a first run needs, generated once under one
//! directory and reused afterwards: a CA (its key kept as `ca-key.pem`,
//! mode 0600, so [`add_service`] can issue more certificates), the auth
//! server's certificate
//! (its identity `spiffe://auth.dev/auth-server`, reachable as
//! `localhost`/`127.0.0.1`), service certificates for `order`, `inventory`
//! and `admin` (identity `spiffe://auth.dev/<name>`, DNS name `<name>`), an
//! ES256 signing key, two users and three service accounts with random
//! secrets, and the config files that tie them together.
//!
//! [`add_service`] and [`add_user`] (`auth-server dev add-service`,
//! `auth-server dev add-user`) admit one more service or user to an existing
//! dev directory, following the same conventions; a running dev server picks
//! them up when it sees the users or accounts file change.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::directory::{Account, User, generate_secret, hash_password, secret_digest_hex};
use crate::keys::{KeyAlg, generate_pkcs8_pem};

mod admit;
pub use admit::{
    AddedService, AddedUser, SERVICE_ENV_VARS, ServiceSpec, UserSpec, add_service, add_user, parse_audience,
};

/// Trust domain of dev identities (`spiffe://auth.dev/<name>`).
pub const DEV_TRUST_DOMAIN: &str = "auth.dev";
/// The auth server's own dev identity, in its certificate's URI SAN: what
/// the SDK's auth channel demands by default (the auth server in the trust
/// domain of the service's own certificate).
pub const DEV_AUTH_SERVER_ID: &str = "spiffe://auth.dev/auth-server";
/// Client certificates dev mode creates.
pub const DEV_CLIENTS: [&str; 3] = ["order", "inventory", "admin"];

/// A dev-mode failure.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate or key generation failed.
    #[error("generating {0} failed")]
    Generate(&'static str),
    /// The directory holds no dev environment.
    #[error("{0}: no dev environment here (no auth-server.toml): run `auth-server dev --dir {0}` once first")]
    NotDevDir(PathBuf),
    /// The dev environment predates the kept CA key.
    #[error(
        "{}: no ca-key.pem: this dev directory was made before `auth-server dev` kept its CA key, so no \
         certificate can be issued from its CA; delete the directory and run `auth-server dev` again \
         (every certificate, key, account and user in it is generated anew)",
        .0.display()
    )]
    NoCaKey(PathBuf),
    /// The CA key does not belong to the CA certificate.
    #[error("{}: not the key of the CA certificate in ca.pem (or not a PEM private key)", .0.display())]
    BadCaKey(PathBuf),
    /// A name that cannot be used.
    #[error("{kind} name {name:?}: {why}")]
    BadName {
        /// `service` or `user`.
        kind: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The name is taken.
    #[error("{kind} {name:?} already exists: {what}; pick another name")]
    Exists {
        /// `service` or `user`.
        kind: &'static str,
        /// The name given.
        name: String,
        /// What holds it (a file, an account).
        what: String,
    },
    /// An argument is unusable.
    #[error("{0}")]
    Argument(String),
    /// A dev file is unusable (names the file and the key).
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Certificate generation for dev mode and tests (rcgen, ECDSA P-256).
pub mod pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };

    use super::DevError;

    /// A CA that can issue certificates.
    pub struct Ca {
        /// The CA certificate (PEM).
        pub cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl std::fmt::Debug for Ca {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Ca").finish_non_exhaustive()
        }
    }

    /// A certificate and its private key, both PEM.
    pub struct Issued {
        /// Certificate (PEM).
        pub cert_pem: String,
        /// Private key (PKCS#8 PEM).
        pub key_pem: String,
    }

    impl std::fmt::Debug for Issued {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Issued").finish_non_exhaustive()
        }
    }

    impl Ca {
        /// A new self-signed CA.
        pub fn generate(name: &str) -> Result<Self, DevError> {
            let key = KeyPair::generate().map_err(|_| DevError::Generate("CA key"))?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|_| DevError::Generate("CA"))?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).map_err(|_| DevError::Generate("CA certificate"))?;
            Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
        }

        /// The CA of `cert_pem` with its private key `key_pem` (PKCS#8 PEM),
        /// checked to be that certificate's key. `None` if either does not
        /// parse or they do not belong together.
        pub fn from_pem(cert_pem: &str, key_pem: &str) -> Option<Self> {
            let key = KeyPair::from_pem(key_pem).ok()?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
            let cert = pem.parse_x509().ok()?;
            if *cert.public_key().subject_public_key.data != *key.public_key_raw() {
                return None;
            }
            let issuer = Issuer::from_ca_cert_pem(cert_pem, key).ok()?;
            Some(Self { cert_pem: cert_pem.to_owned(), issuer })
        }

        /// The CA's private key (PKCS#8 PEM).
        pub fn key_pem(&self) -> String {
            self.issuer.key().serialize_pem()
        }

        fn issue(
            &self,
            cn: &str,
            sans: Vec<SanType>,
            usages: Vec<ExtendedKeyUsagePurpose>,
        ) -> Result<Issued, DevError> {
            let key = KeyPair::generate().map_err(|_| DevError::Generate("leaf key"))?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|_| DevError::Generate("leaf"))?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.subject_alt_names = sans;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = usages;
            let cert = params.signed_by(&key, &self.issuer).map_err(|_| DevError::Generate("leaf certificate"))?;
            Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        }

        /// The auth server's certificate: its identity, URI SAN
        /// `spiffe://<domain>/auth-server`, which the SDK's auth channel
        /// demands; DNS SANs `localhost` (plus `extra`) and IP SAN
        /// `127.0.0.1` for the host-name check; server auth only.
        pub fn server_cert(&self, domain: &str, extra: &[&str]) -> Result<Issued, DevError> {
            let uri = format!("spiffe://{domain}/{}", service_sdk::AUTH_SERVER_NAME);
            let mut sans = vec![
                SanType::URI(uri.as_str().try_into().map_err(|_| DevError::Generate("SAN"))?),
                SanType::DnsName("localhost".try_into().map_err(|_| DevError::Generate("SAN"))?),
                SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
            ];
            for name in extra {
                sans.push(SanType::DnsName((*name).try_into().map_err(|_| DevError::Generate("SAN"))?));
            }
            self.issue("auth-server", sans, vec![ExtendedKeyUsagePurpose::ServerAuth])
        }

        /// A service certificate with URI SAN `spiffe://<domain>/<name>` and
        /// DNS SAN `<name>`, good for both mTLS client auth (calling
        /// auth-server or another service) and serving (an example service's
        /// own gRPC port, which its callers check as `<name>`). It names
        /// neither `localhost` nor `127.0.0.1`, and never the auth server's
        /// identity, so it cannot pass as the auth server.
        pub fn client_cert(&self, domain: &str, name: &str) -> Result<Issued, DevError> {
            let uri = format!("spiffe://{domain}/{name}");
            let sans = vec![
                SanType::URI(uri.as_str().try_into().map_err(|_| DevError::Generate("SAN"))?),
                SanType::DnsName(name.try_into().map_err(|_| DevError::Generate("SAN"))?),
            ];
            self.issue(name, sans, vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth])
        }
    }
}

/// The generated dev environment.
#[derive(Debug, Clone)]
pub struct DevEnv {
    /// The directory everything lives in.
    pub dir: PathBuf,
    /// The config file to run with.
    pub config_path: PathBuf,
    /// Whether this run created it (false: reused).
    pub created: bool,
}

impl DevEnv {
    /// `DIR/clients/<name>.pem`
    pub fn client_cert_path(&self, name: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{name}.pem"))
    }
    /// `DIR/clients/<name>-key.pem`
    pub fn client_key_path(&self, name: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{name}-key.pem"))
    }
    /// `DIR/credentials/<name>.json`
    pub fn credentials_path(&self, name: &str) -> PathBuf {
        self.dir.join("credentials").join(format!("{name}.json"))
    }
    /// `DIR/ca.pem`
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `DIR/ca-key.pem`: the dev CA's private key (mode 0600), from which
    /// [`add_service`] issues certificates.
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }
}

/// The dev CA's private key, in the dev directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

fn write_private(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DevError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(contents).map_err(io)
}

/// Creates `path` (mode 0600); an existing file is an error, never
/// overwritten.
fn write_new_private(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DevError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Replaces `path` whole (mode 0600): a new file beside it, synced, then
/// renamed over it, and the directory synced. A reader sees the old file or
/// the new one, never a mix, and the change survives a crash once this
/// returns.
fn replace_private(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DevError::Io { path: path.to_owned(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.new-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Refuses a private key file that others than its owner can read or
/// write (the dev CA key signs certificates the server trusts).
fn check_private_mode(path: &Path) -> Result<(), DevError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode =
        std::fs::metadata(path).map_err(|source| DevError::Io { path: path.to_owned(), source })?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(DevError::Invalid {
            path: path.to_owned(),
            problem: format!(
                "mode {:04o}: others can use the dev CA key; run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            ),
        });
    }
    Ok(())
}

#[derive(Serialize)]
struct UsersFile<'a> {
    user: &'a [User],
}
#[derive(Serialize)]
struct AccountsFile<'a> {
    account: &'a [Account],
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Creates the dev environment under `dir`, or reuses it when its config
/// file already exists.
pub fn ensure(dir: &Path) -> Result<DevEnv, DevError> {
    ensure_with(dir, "127.0.0.1:50051", "127.0.0.1:8080")
}

/// Like [`ensure`], with the listen addresses written into a new config.
pub fn ensure_with(dir: &Path, grpc_addr: &str, http_addr: &str) -> Result<DevEnv, DevError> {
    let config_path = dir.join("auth-server.toml");
    if config_path.is_file() {
        return Ok(DevEnv { dir: dir.to_owned(), config_path, created: false });
    }
    let io = |source| DevError::Io { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }

    let ca = pki::Ca::generate("auth-dev CA")?;
    write_private(&dir.join("ca.pem"), ca.cert_pem.as_bytes())?;
    // Kept (0600, like every file here) so `dev add-service` can issue
    // certificates that the server and the other services trust.
    write_private(&dir.join(CA_KEY_FILE), ca.key_pem().as_bytes())?;
    let server = ca.server_cert(DEV_TRUST_DOMAIN, &["auth-server"])?;
    write_private(&dir.join("server.pem"), server.cert_pem.as_bytes())?;
    write_private(&dir.join("server-key.pem"), server.key_pem.as_bytes())?;
    for name in DEV_CLIENTS {
        let c = ca.client_cert(DEV_TRUST_DOMAIN, name)?;
        write_private(&dir.join("clients").join(format!("{name}.pem")), c.cert_pem.as_bytes())?;
        write_private(&dir.join("clients").join(format!("{name}-key.pem")), c.key_pem.as_bytes())?;
    }
    let signing = generate_pkcs8_pem(KeyAlg::ES256).map_err(|_| DevError::Generate("signing key"))?;
    write_private(&dir.join("keys").join("signing.pem"), signing.as_bytes())?;

    let mut users = Vec::new();
    for (name, perms) in
        [("alice", &["orders:create", "inventory:read", "inventory:reserve"][..]), ("bob", &["inventory:read"][..])]
    {
        let password = generate_secret().map_err(|_| DevError::Generate("password"))?;
        users.push(User {
            username: name.into(),
            password_hash: hash_password(&password).map_err(|_| DevError::Generate("password hash"))?,
            role: Some("customer".into()),
            perms: strings(perms),
        });
        let creds = serde_json::json!({ "username": name, "password": password });
        write_private(&dir.join("credentials").join(format!("{name}.json")), creds.to_string().as_bytes())?;
    }

    let mut accounts = Vec::new();
    for (name, audiences, perms) in [
        ("order", vec![("inventory", &["inventory:read", "inventory:reserve"][..])], &[][..]),
        ("inventory", vec![("order", &["order:read"][..])], &[][..]),
        ("admin", vec![("auth-service", &[][..])], &["auth:admin"][..]),
    ] {
        let secret = generate_secret().map_err(|_| DevError::Generate("client secret"))?;
        accounts.push(Account {
            client_id: name.into(),
            secret_sha256: secret_digest_hex(&secret),
            mtls_identity: Some(format!("spiffe://{DEV_TRUST_DOMAIN}/{name}")),
            certificate_bound_tokens: None,
            role: Some("service".into()),
            perms: strings(perms),
            audiences: audiences.into_iter().map(|(a, s)| (a.to_owned(), strings(s))).collect::<BTreeMap<_, _>>(),
        });
        let creds = serde_json::json!({ "client_id": name, "client_secret": secret });
        write_private(&dir.join("credentials").join(format!("{name}.json")), creds.to_string().as_bytes())?;
    }
    let toml_err = |_| DevError::Generate("TOML");
    write_private(&dir.join("users.toml"), toml::to_string(&UsersFile { user: &users }).map_err(toml_err)?.as_bytes())?;
    write_private(
        &dir.join("accounts.toml"),
        toml::to_string(&AccountsFile { account: &accounts }).map_err(toml_err)?.as_bytes(),
    )?;
    let config = format!(
        r#"# Generated by `auth-server dev`. Paths are relative to this file.
issuer = "auth-service"
grpc_addr = "{grpc_addr}"
http_addr = "{http_addr}"
store = "memory"
users_file = "users.toml"
accounts_file = "accounts.toml"

[tls]
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[keys]
source = "file"
signing = {{ path = "keys/signing.pem", alg = "ES256" }}

[tokens]
user_audiences = ["order"]
"#
    );
    write_private(&config_path, config.as_bytes())?;
    Ok(DevEnv { dir: dir.to_owned(), config_path, created: true })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use x509_parser::extensions::GeneralName;

    use super::*;

    /// The SANs of a PEM certificate as text, and whether it allows client
    /// and server auth.
    pub(crate) fn describe(pem: &str) -> (Vec<String>, bool, bool) {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            other => format!("{other:?}"),
        });
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        (sans.collect(), eku.client_auth, eku.server_auth)
    }

    #[test]
    fn only_the_auth_server_certificate_carries_its_identity_and_localhost() {
        let dir = tempfile::tempdir().unwrap();
        let env = ensure(dir.path()).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        let (sans, client, server) = describe(&read(dir.path().join("server.pem")));
        assert_eq!(sans[0], format!("URI:{DEV_AUTH_SERVER_ID}"));
        assert!(sans.contains(&"DNS:localhost".to_owned()), "{sans:?}");
        assert_eq!((client, server), (false, true));
        assert_eq!(
            service_sdk::AuthServerId::in_trust_domain(DEV_TRUST_DOMAIN).unwrap().as_str(),
            DEV_AUTH_SERVER_ID,
            "the SDK's default for dev services"
        );
        for name in DEV_CLIENTS {
            let (sans, client, server) = describe(&read(env.client_cert_path(name)));
            assert_eq!(sans, [format!("URI:spiffe://{DEV_TRUST_DOMAIN}/{name}"), format!("DNS:{name}")]);
            assert_eq!((client, server), (true, true), "services serve each other too");
        }
        use std::os::unix::fs::PermissionsExt as _;
        let key = std::fs::metadata(env.ca_key_path()).unwrap().permissions().mode();
        assert_eq!(key & 0o777, 0o600, "the dev CA key is kept, for the owner only");
        let ca = pki::Ca::from_pem(&read(env.ca_path()), &read(env.ca_key_path()));
        assert!(ca.is_some(), "the kept key is the CA's");
    }
}
