//! The conventional environment of a service of the platform: the
//! variables [`ServiceEnv`] reads, and their defaults.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::Channel;

use crate::client::is_https_with_host;
use crate::server::TlsIncoming;
use crate::verify::VerifierBuilder;
use crate::{AuthServerId, FileCredentials, MtlsFiles, TlsError, TokenSource, TokenSourceBuilder, Verifier};

/// `AUTH_URL`: the auth server's gRPC URI (`https://` only).
pub const AUTH_URL_VAR: &str = "AUTH_URL";
/// `AUTH_SERVER_ID`: the SPIFFE ID the auth server's certificate must carry.
pub const AUTH_SERVER_ID_VAR: &str = "AUTH_SERVER_ID";
/// `AUTH_ISSUER`: the `iss` of the platform's tokens.
pub const AUTH_ISSUER_VAR: &str = "AUTH_ISSUER";
/// `AUTH_TLS_CA`: the CA bundle (PEM) that every certificate of the mesh
/// chains to.
pub const AUTH_TLS_CA_VAR: &str = "AUTH_TLS_CA";
/// `AUTH_TLS_CERT`: this service's certificate (PEM), for calling and
/// serving.
pub const AUTH_TLS_CERT_VAR: &str = "AUTH_TLS_CERT";
/// `AUTH_TLS_KEY`: this service's private key (PEM).
pub const AUTH_TLS_KEY_VAR: &str = "AUTH_TLS_KEY";
/// `AUTH_CREDENTIALS_FILE`: this service's account credentials (JSON or
/// TOML, as [`FileCredentials`] reads them).
pub const AUTH_CREDENTIALS_FILE_VAR: &str = "AUTH_CREDENTIALS_FILE";
/// `AUTH_DEV_DIR`: the dev directory the unset file variables fall back to.
pub const AUTH_DEV_DIR_VAR: &str = "AUTH_DEV_DIR";

/// The dev directory when `AUTH_DEV_DIR` is unset.
pub const DEFAULT_DEV_DIR: &str = ".auth-dev";
/// The auth server's URI when `AUTH_URL` is unset: the dev server's gRPC
/// port.
pub const DEFAULT_AUTH_URL: &str = "https://127.0.0.1:50051";
/// The issuer when `AUTH_ISSUER` is unset: the dev server's.
pub const DEFAULT_ISSUER: &str = "auth-service";

/// Why a [`ServiceEnv`] could not be read or used. Every variant names the
/// variable to fix; none carries a file's contents or a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvError {
    /// A variable is set to something unusable.
    #[error("{var}: {problem}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// A file named by a variable (or, with the variable unset, by the dev
    /// layout) cannot be read or does not hold what it should.
    #[error("{var}{}: {problem}", if *.dev_default { " (unset, so the dev layout's file)" } else { "" })]
    File {
        /// The variable that names the file.
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// The variable is unset and the path is the dev layout's default
        /// under `AUTH_DEV_DIR`.
        dev_default: bool,
        /// The problem, naming the path.
        problem: String,
    },
    /// Building something from a well-formed environment failed (the
    /// verifier refused its options).
    #[error("{what}: {problem}")]
    Build {
        /// What was being built.
        what: &'static str,
        /// Why it failed.
        problem: String,
    },
}

/// One path, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    path: PathBuf,
    var: &'static str,
    dev_default: bool,
}

/// Where a service finds the auth server, its own mTLS material and its
/// account credentials, and who issues the tokens it verifies: the
/// conventions every service of the platform follows, in one value.
///
/// | variable | what | when unset |
/// | --- | --- | --- |
/// | `AUTH_URL` | the auth server's gRPC URI, `https://` only | `https://127.0.0.1:50051` |
/// | `AUTH_SERVER_ID` | the SPIFFE ID the auth server must prove | `spiffe://<trust domain of AUTH_TLS_CERT>/auth-server` |
/// | `AUTH_ISSUER` | the tokens' `iss` | `auth-service` |
/// | `AUTH_TLS_CA` | CA bundle (PEM) | `$AUTH_DEV_DIR/ca.pem` |
/// | `AUTH_TLS_CERT` | this service's certificate (PEM): client and server | `$AUTH_DEV_DIR/clients/<name>.pem` |
/// | `AUTH_TLS_KEY` | its private key (PEM) | `$AUTH_DEV_DIR/clients/<name>-key.pem` |
/// | `AUTH_CREDENTIALS_FILE` | account credentials ([`FileCredentials::document`]) | `$AUTH_DEV_DIR/credentials/<name>.json` |
/// | `AUTH_DEV_DIR` | the dev directory of `auth-server dev` | `.auth-dev` |
///
/// `<name>` is the service's name, which is also the audience its verifier
/// accepts. In a cluster the deploy manifests set every variable (files
/// mounted by cert-manager and rendered by Vault Agent); on a laptop none
/// need be set after `auth-server dev`. Nothing is read from the files
/// until it is used; then an error names the variable to fix, and says when
/// the path was the dev layout's because the variable was unset.
///
/// A service is the verifier, the token source and the server, all from
/// one environment:
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
/// use service_sdk::{AuthChannel, RequireAuthLayer, ServiceEnv};
/// let env = ServiceEnv::from_env("payments")?;
/// let auth = env.auth_channel()?; // mTLS, and the auth server must prove its SPIFFE ID
/// let verifier = env.verifier(auth.clone()).build()?; // accepts aud=payments from AUTH_ISSUER
/// let tokens = env.token_source(auth).build(); // exchanges with AUTH_CREDENTIALS_FILE
/// // Calls to inventory (DNS name `inventory` in its certificate), with tokens for aud=inventory.
/// let inventory = AuthChannel::new(env.channel("https://inventory:50062", "inventory")?, tokens, "inventory");
/// # let _ = inventory;
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:50063").await?;
/// tonic::transport::Server::builder()
///     .layer(RequireAuthLayer::new(verifier))
///     .add_routes(routes)
///     .serve_with_incoming(env.incoming(listener)?) // mTLS, reloads rotated files
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    name: String,
    auth_url: String,
    auth_server_id: Option<AuthServerId>,
    issuer: String,
    ca: Named,
    cert: Named,
    key: Named,
    credentials: Named,
}

impl ServiceEnv {
    /// Service `name`'s environment in the dev directory `dir`, as
    /// `auth-server dev` lays it out, talking to the auth server at
    /// `auth_url` (not checked here: [`auth_channel`](Self::auth_channel)
    /// refuses anything but `https://`).
    pub fn dev(dir: impl AsRef<Path>, name: &str, auth_url: impl Into<String>) -> Self {
        let dir = dir.as_ref();
        let dev = |var, path: PathBuf| Named { path, var, dev_default: true };
        Self {
            name: name.to_owned(),
            auth_url: auth_url.into(),
            auth_server_id: None,
            issuer: DEFAULT_ISSUER.to_owned(),
            ca: dev(AUTH_TLS_CA_VAR, dir.join("ca.pem")),
            cert: dev(AUTH_TLS_CERT_VAR, dir.join("clients").join(format!("{name}.pem"))),
            key: dev(AUTH_TLS_KEY_VAR, dir.join("clients").join(format!("{name}-key.pem"))),
            credentials: dev(AUTH_CREDENTIALS_FILE_VAR, dir.join("credentials").join(format!("{name}.json"))),
        }
    }

    /// Service `name`'s environment from the process environment (see the
    /// table above). Fails on a variable whose value is unusable: an
    /// `AUTH_URL` that is not `https://` with a host, an `AUTH_SERVER_ID`
    /// that is not a SPIFFE ID, an empty or non-UTF-8 value.
    pub fn from_env(name: &str) -> Result<Self, EnvError> {
        Self::from_lookup(name, |var| std::env::var_os(var))
    }

    /// Like [`from_env`](Self::from_env), reading each variable from
    /// `lookup` (a test's map, a config layer).
    pub fn from_lookup(name: &str, lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, EnvError> {
        let text = |var: &'static str| -> Result<Option<String>, EnvError> {
            match lookup(var) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) if s.trim().is_empty() => Err(EnvError::Invalid { var, problem: "set but empty".into() }),
                    Ok(s) => Ok(Some(s)),
                    Err(_) => Err(EnvError::Invalid { var, problem: "not valid UTF-8".into() }),
                },
            }
        };
        let path = |var: &'static str| -> Result<Option<PathBuf>, EnvError> {
            match lookup(var) {
                Some(v) if v.is_empty() => Err(EnvError::Invalid { var, problem: "set but empty".into() }),
                other => Ok(other.map(PathBuf::from)),
            }
        };
        let dir = path(AUTH_DEV_DIR_VAR)?.unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DIR));
        let auth_url = text(AUTH_URL_VAR)?.unwrap_or_else(|| DEFAULT_AUTH_URL.to_owned());
        if !is_https_with_host(&auth_url) {
            return Err(EnvError::Invalid {
                var: AUTH_URL_VAR,
                problem: format!(
                    "{:?} is not an https:// URI with a host (there is no plaintext mode)",
                    crate::client::shown_uri(&auth_url)
                ),
            });
        }
        let mut env = Self::dev(dir, name, auth_url);
        if let Some(id) = text(AUTH_SERVER_ID_VAR)? {
            let id = AuthServerId::new(&id)
                .map_err(|e| EnvError::Invalid { var: AUTH_SERVER_ID_VAR, problem: e.to_string() })?;
            env.auth_server_id = Some(id);
        }
        if let Some(issuer) = text(AUTH_ISSUER_VAR)? {
            env.issuer = issuer;
        }
        for named in [&mut env.ca, &mut env.cert, &mut env.key, &mut env.credentials] {
            if let Some(p) = path(named.var)? {
                *named = Named { path: p, var: named.var, dev_default: false };
            }
        }
        Ok(env)
    }

    /// The auth server's identity to demand instead of the default (the
    /// auth server in this service's trust domain).
    pub fn with_auth_server_id(mut self, id: AuthServerId) -> Self {
        self.auth_server_id = Some(id);
        self
    }

    /// The tokens' issuer, instead of `AUTH_ISSUER`.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    /// The service's name: the dev layout's file names and its verifier's
    /// audience.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The auth server's gRPC URI.
    pub fn auth_url(&self) -> &str {
        &self.auth_url
    }

    /// The tokens' issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The service's certificate, key and CA, for its channels and its
    /// server.
    pub fn mtls(&self) -> MtlsFiles {
        MtlsFiles::new(&self.ca.path, &self.cert.path, &self.key.path)
    }

    /// The account credentials file.
    pub fn credentials_path(&self) -> &Path {
        &self.credentials.path
    }

    /// The service's account credentials, re-read when the file changes
    /// (see [`FileCredentials`]).
    pub fn credentials(&self) -> FileCredentials {
        FileCredentials::document(&self.credentials.path)
    }

    /// The identity the auth server must prove: `AUTH_SERVER_ID`, or the
    /// auth server in the trust domain of this service's certificate.
    pub fn auth_server_id(&self) -> Result<AuthServerId, EnvError> {
        match &self.auth_server_id {
            Some(id) => Ok(id.clone()),
            None => self.mtls().auth_server_id().map_err(|e| self.tls_error(e, AUTH_SERVER_ID_VAR)),
        }
    }

    /// A lazily connecting mTLS channel to the auth server, which must
    /// prove [`auth_server_id`](Self::auth_server_id): for the verifier and
    /// the token source (one channel, cloned, serves both).
    pub fn auth_channel(&self) -> Result<Channel, EnvError> {
        let id = self.auth_server_id()?;
        self.mtls().auth_channel_as(&self.auth_url, &id).map_err(|e| self.tls_error(e, AUTH_URL_VAR))
    }

    /// A lazily connecting mTLS channel to another service at `uri`, whose
    /// certificate names `domain` (the dev PKI names each service's
    /// certificate after the service: DNS SAN `inventory`).
    pub fn channel(&self, uri: &str, domain: &str) -> Result<Channel, EnvError> {
        self.mtls().channel(uri, domain).map_err(|e| match e {
            TlsError::NotHttps { .. } => EnvError::Build { what: "service channel", problem: e.to_string() },
            e => self.tls_error(e, AUTH_TLS_CERT_VAR),
        })
    }

    /// A verifier builder for tokens addressed to this service (audience
    /// [`name`](Self::name)) by [`issuer`](Self::issuer), with keys and
    /// revocations over `auth_channel` ([`auth_channel`](Self::auth_channel)).
    pub fn verifier(&self, auth_channel: Channel) -> VerifierBuilder {
        Verifier::builder(&self.issuer, &self.name).channel(auth_channel)
    }

    /// A token source builder that exchanges this service's
    /// [`credentials`](Self::credentials) over `auth_channel`.
    pub fn token_source(&self, auth_channel: Channel) -> TokenSourceBuilder {
        TokenSource::builder(auth_channel, self.credentials())
    }

    /// The rustls configuration of this service's own mTLS server, which
    /// follows rotated files ([`MtlsFiles::server_tls_config`]).
    pub fn server_tls_config(&self) -> Result<Arc<rustls::ServerConfig>, EnvError> {
        self.mtls().server_tls_config().map_err(|e| self.tls_error(e, AUTH_TLS_CERT_VAR))
    }

    /// The mTLS connections of `listener`, for tonic's
    /// `serve_with_incoming`, with [`server_tls_config`](Self::server_tls_config).
    pub fn incoming(&self, listener: tokio::net::TcpListener) -> Result<TlsIncoming, EnvError> {
        Ok(TlsIncoming::new(listener, self.server_tls_config()?))
    }

    /// A TLS error as the variable that names the file (or `otherwise`).
    fn tls_error(&self, e: TlsError, otherwise: &'static str) -> EnvError {
        let path = match &e {
            TlsError::Io { path, .. } | TlsError::Material { path, .. } => Some(path.clone()),
            _ => None,
        };
        let named = path.and_then(|p| [&self.ca, &self.cert, &self.key].into_iter().find(|n| n.path == p));
        match named {
            Some(n) => {
                EnvError::File { var: n.var, path: n.path.clone(), dev_default: n.dev_default, problem: e.to_string() }
            }
            None => EnvError::Invalid { var: otherwise, problem: e.to_string() },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<ServiceEnv, EnvError> {
        let map: HashMap<String, OsString> = vars.iter().map(|(k, v)| ((*k).to_owned(), OsString::from(v))).collect();
        ServiceEnv::from_lookup("payments", move |k| map.get(k).cloned())
    }

    #[test]
    fn unset_variables_fall_back_to_the_dev_layout() {
        let e = env(&[]).unwrap();
        assert_eq!((e.auth_url(), e.issuer(), e.name()), (DEFAULT_AUTH_URL, DEFAULT_ISSUER, "payments"));
        let tls = e.mtls();
        assert_eq!(tls.ca, Path::new(".auth-dev/ca.pem"));
        assert_eq!(tls.cert, Path::new(".auth-dev/clients/payments.pem"));
        assert_eq!(tls.key, Path::new(".auth-dev/clients/payments-key.pem"));
        assert_eq!(e.credentials_path(), Path::new(".auth-dev/credentials/payments.json"));
        let e = env(&[("AUTH_DEV_DIR", "/srv/dev")]).unwrap();
        assert_eq!(e.mtls().cert, Path::new("/srv/dev/clients/payments.pem"));
    }

    #[test]
    fn set_variables_win() {
        let e = env(&[
            ("AUTH_URL", "https://auth.auth.svc:50051"),
            ("AUTH_SERVER_ID", "spiffe://cluster.local/ns/auth/sa/auth-server"),
            ("AUTH_ISSUER", "https://auth.example"),
            ("AUTH_TLS_CA", "/tls/ca.crt"),
            ("AUTH_TLS_CERT", "/tls/tls.crt"),
            ("AUTH_TLS_KEY", "/tls/tls.key"),
            ("AUTH_CREDENTIALS_FILE", "/vault/secrets/payments.json"),
        ])
        .unwrap();
        assert_eq!((e.auth_url(), e.issuer()), ("https://auth.auth.svc:50051", "https://auth.example"));
        assert_eq!(e.auth_server_id().unwrap().as_str(), "spiffe://cluster.local/ns/auth/sa/auth-server");
        assert_eq!(e.mtls(), MtlsFiles::new("/tls/ca.crt", "/tls/tls.crt", "/tls/tls.key"));
        assert_eq!(e.credentials_path(), Path::new("/vault/secrets/payments.json"));
    }

    #[test]
    fn unusable_values_name_their_variable() {
        let invalid = |vars: &[(&str, &str)]| match env(vars).unwrap_err() {
            EnvError::Invalid { var, problem } => (var, problem),
            other => panic!("{other:?}"),
        };
        let (var, problem) = invalid(&[("AUTH_URL", "http://auth:50051")]);
        assert_eq!(var, "AUTH_URL");
        assert!(problem.contains("https://"), "{problem}");
        let (var, _) = invalid(&[("AUTH_URL", "https://user:hunter2@")]);
        assert_eq!(var, "AUTH_URL");
        assert!(!env(&[("AUTH_URL", "http://u:hunter2@auth")]).unwrap_err().to_string().contains("hunter2"));
        assert_eq!(invalid(&[("AUTH_SERVER_ID", "auth-server")]).0, "AUTH_SERVER_ID");
        assert_eq!(invalid(&[("AUTH_TLS_CERT", "")]).0, "AUTH_TLS_CERT");
        assert_eq!(invalid(&[("AUTH_ISSUER", " ")]).0, "AUTH_ISSUER");
    }

    #[test]
    fn missing_files_name_the_variable_and_whether_it_was_unset() {
        let dir = tempfile::tempdir().unwrap();
        let e = env(&[("AUTH_DEV_DIR", dir.path().to_str().unwrap())]).unwrap();
        let err = e.auth_channel().unwrap_err();
        match &err {
            EnvError::File { var, dev_default, path, .. } => {
                assert_eq!((*var, *dev_default), ("AUTH_TLS_CERT", true));
                assert_eq!(path, &dir.path().join("clients/payments.pem"));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with("AUTH_TLS_CERT (unset, so the dev layout's file): cannot read"), "{err}");
        let e = env(&[("AUTH_TLS_CERT", "/nonexistent/tls.crt")]).unwrap();
        let err = e.server_tls_config().unwrap_err();
        assert!(matches!(&err, EnvError::File { var: "AUTH_TLS_CERT", dev_default: false, .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/tls.crt"), "{err}");
    }
}
