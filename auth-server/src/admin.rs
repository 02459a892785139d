//! The operator tools behind the binary's subcommands:
//!
//! - [`revoke`] (`auth-server admin revoke --jti … | --sid …`): logs in as
//!   the admin service account (client credentials from a file, over mTLS
//!   with the admin's certificate) for the auth service's own audience, then
//!   calls `Revoke` with that token; the account needs `tokens.admin_perm`.
//! - [`keys`] (`auth-server admin keys`): the `kid`s and algorithms the
//!   server publishes, from `GetJwks` over mTLS.
//! - [`Decoded`] (`auth-server decode`): a token's header and claims, and,
//!   given a JWKS ([`load_jwks`]: a file, an `http(s)://` URL, or the
//!   server's `GetJwks`), whether it verifies and why not.
//! - [`new_account`] (`auth-server new-account`): a service account's block
//!   for the accounts file, with a fresh secret, and the JSON credentials
//!   document the service reads.
//!
//! The gRPC connection is the SDK's auth channel ([`MtlsFiles::auth_channel`]):
//! the server must present the auth server's identity, not merely a
//! certificate of the mesh. Errors name the file or address that failed;
//! no secret, password or whole token ever appears in one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use service_sdk::VerifyError;
use service_sdk::{AuthServerId, ClientCredentials, Credentials as _, FileCredentials, KeySet, MtlsFiles, Validator};
use tonic::transport::Channel;

use crate::directory::{Account, Directory, generate_secret, secret_digest_hex};

/// The prefix of the admin tools' environment variables
/// (`AUTH_SERVER_ADMIN_ADDR`, `…_CA`, `…_CERT`, `…_KEY`, `…_CREDENTIALS`,
/// `…_AUDIENCE`, `…_SERVER_ID`). The server's own configuration loader skips
/// them, so they can sit in the same environment as `serve`.
pub const ENV_PREFIX: &str = "AUTH_SERVER_ADMIN_";

/// How long an admin call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why an admin tool failed. Each names the file, address or argument.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Certificate, key or CA files unusable, or a bad address.
    #[error("mTLS to {addr}: {source}")]
    Tls {
        /// The server address.
        addr: String,
        /// The cause (names the file).
        source: service_sdk::TlsError,
    },
    /// The credentials file could not be read.
    #[error("credentials: {0}")]
    Credentials(#[from] service_sdk::CredentialsError),
    /// A call to the server failed.
    #[error("{method} at {addr}: {code:?}: {message}")]
    Call {
        /// The RPC.
        method: &'static str,
        /// The server address.
        addr: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message (fixed texts from the server, or the
        /// transport's description of a connection failure).
        message: String,
    },
    /// A JWKS could not be read or parsed.
    #[error("JWKS from {from}: {problem}")]
    Jwks {
        /// The file or URL.
        from: String,
        /// What went wrong.
        problem: String,
    },
    /// A token that is not a JWS compact serialization with JSON parts.
    #[error("not a token: {0}")]
    Token(&'static str),
    /// A command-line argument is unusable.
    #[error("{0}")]
    Argument(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------
// Connection

/// Where the admin tools reach the server, and the admin's mTLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The gRPC address, `https://host:port` (a bare `host:port` gets
    /// `https://`).
    pub addr: String,
    /// The CA that signs the server's certificate.
    pub ca: PathBuf,
    /// The admin's client certificate.
    pub cert: PathBuf,
    /// The admin's client key.
    pub key: PathBuf,
    /// The auth server's SPIFFE ID; by default `spiffe://<trust domain of
    /// the admin's certificate>/auth-server`, as the SDK expects.
    pub server_id: Option<String>,
}

impl Connection {
    /// The address as a URI.
    pub fn uri(&self) -> String {
        if self.addr.contains("://") { self.addr.clone() } else { format!("https://{}", self.addr) }
    }

    fn channel(&self) -> Result<Channel, AdminError> {
        let uri = self.uri();
        let tls = |source| AdminError::Tls { addr: uri.clone(), source };
        let files = MtlsFiles::new(&self.ca, &self.cert, &self.key);
        let id = match &self.server_id {
            Some(id) => AuthServerId::new(id).map_err(tls)?,
            None => files.auth_server_id().map_err(tls)?,
        };
        files.auth_channel_as(&uri, &id).map_err(tls)
    }

    fn client(&self) -> Result<AuthClient<Channel>, AdminError> {
        Ok(AuthClient::new(self.channel()?))
    }

    fn failed(&self, method: &'static str) -> impl Fn(tonic::Status) -> AdminError + '_ {
        move |status| AdminError::Call {
            method,
            addr: self.uri(),
            code: status.code(),
            message: status_detail(&status),
        }
    }
}

/// A status message with its transport cause (a refused connection, a
/// certificate the client refused), which tonic keeps as the source.
fn status_detail(status: &tonic::Status) -> String {
    let mut out = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// `fut` bounded by [`CALL_TIMEOUT`], failing as `method` at `conn`'s address.
async fn bounded<T>(
    conn: &Connection,
    method: &'static str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, AdminError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(res) => res.map_err(conn.failed(method)),
        Err(_) => Err(conn.failed(method)(tonic::Status::deadline_exceeded(format!(
            "no answer within {} s",
            CALL_TIMEOUT.as_secs()
        )))),
    }
}

// ---------------------------------------------------------------------------
// admin keys

/// One published key, as `admin keys` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key id (RFC 7638 thumbprint).
    pub kid: String,
    /// The algorithm it is pinned to.
    pub alg: String,
    /// Key type and curve or size, e.g. `EC P-256`, `OKP Ed25519`, `RSA`.
    pub kind: String,
}

/// The keys in a JWK Set document, in document order.
pub fn key_infos(jwks_json: &str) -> Result<Vec<KeyInfo>, String> {
    let doc: serde_json::Value = serde_json::from_str(jwks_json).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc.get("keys").and_then(|k| k.as_array()).ok_or("no \"keys\" array")?;
    let text = |k: &serde_json::Value, m: &str| k.get(m).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    Ok(keys
        .iter()
        .map(|k| {
            let kty = text(k, "kty");
            let crv = text(k, "crv");
            KeyInfo {
                kid: text(k, "kid"),
                alg: text(k, "alg"),
                kind: if crv.is_empty() { kty } else { format!("{kty} {crv}") },
            }
        })
        .collect())
}

/// The published keys, from `GetJwks`.
pub async fn keys(conn: &Connection) -> Result<Vec<KeyInfo>, AdminError> {
    let mut client = conn.client()?;
    let jwks = bounded(conn, "GetJwks", client.get_jwks(pb::GetJwksRequest {})).await?.into_inner().jwks_json;
    key_infos(&jwks).map_err(|problem| AdminError::Jwks { from: conn.uri(), problem })
}

/// `admin keys` output: one line per key.
pub fn render_keys(keys: &[KeyInfo]) -> String {
    let mut out = String::new();
    for k in keys {
        out.push_str(&format!("{}  {}  {}\n", k.kid, k.alg, k.kind));
    }
    out
}

// ---------------------------------------------------------------------------
// admin revoke

/// What `admin revoke` revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One access token, by its `jti`.
    Jti(String),
    /// A login session, by its `sid`: every token of it and its refresh
    /// family.
    Sid(String),
}

/// Logs in as the admin service account with the client credentials in
/// `credentials` (a JSON or TOML document with `client_id` and
/// `client_secret`, as the SDK reads it) for `audience` (the auth service's
/// own audience, `tokens.self_audience`, by default the issuer), then
/// revokes `target` with that token. Returns what the server says it
/// revoked (`jti` or `session`).
pub async fn revoke(
    conn: &Connection,
    credentials: &Path,
    audience: &str,
    target: RevokeTarget,
) -> Result<String, AdminError> {
    let creds = FileCredentials::document(credentials).current().await?;
    let mut client = conn.client()?;
    let token = admin_token(conn, &mut client, &creds, audience).await?;
    let target = match target {
        RevokeTarget::Jti(j) => pb::revoke_request::Target::Jti(j),
        RevokeTarget::Sid(s) => pb::revoke_request::Target::Sid(s),
    };
    let mut req = tonic::Request::new(pb::RevokeRequest { target: Some(target) });
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| AdminError::Argument("the server's token is not a valid header value".into()))?;
    req.metadata_mut().insert("authorization", bearer);
    Ok(bounded(conn, "Revoke", client.revoke(req)).await?.into_inner().revoked)
}

async fn admin_token(
    conn: &Connection,
    client: &mut AuthClient<Channel>,
    creds: &ClientCredentials,
    audience: &str,
) -> Result<String, AdminError> {
    let login = pb::LoginRequest {
        grant: Some(pb::login_request::Grant::ClientCredentials(pb::ClientCredentialsGrant {
            client_id: creds.client_id.clone(),
            client_secret: creds.client_secret.expose().to_owned(),
        })),
        audience: vec![audience.to_owned()],
        scope: vec![],
    };
    Ok(bounded(conn, "Login", client.login(login)).await?.into_inner().access_token)
}

// ---------------------------------------------------------------------------
// decode

/// A token's header and claims, as JSON, and its size.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The protected header.
    pub header: serde_json::Value,
    /// The claims.
    pub claims: serde_json::Value,
}

impl Decoded {
    /// Splits and decodes a JWS compact token; checks nothing.
    pub fn parse(token: &str) -> Result<Self, AdminError> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AdminError::Token("a JWS has three parts separated by dots"));
        };
        if s.is_empty() {
            return Err(AdminError::Token("the signature part is empty"));
        }
        let json = |part: &str, what: &'static str| -> Result<serde_json::Value, AdminError> {
            let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| AdminError::Token(what))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| AdminError::Token(what))?;
            if v.is_object() { Ok(v) } else { Err(AdminError::Token(what)) }
        };
        Ok(Self {
            header: json(h, "the header is not base64url JSON")?,
            claims: json(p, "the claims are not base64url JSON")?,
        })
    }

    /// The header and claims, pretty-printed, with the times explained
    /// relative to `now` (Unix seconds).
    pub fn render(&self, now: u64) -> String {
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        let mut out = format!("header:\n{}\nclaims:\n{}\n", pretty(&self.header), pretty(&self.claims));
        for (claim, what) in [("iat", "issued"), ("nbf", "valid from"), ("exp", "expires")] {
            if let Some(t) = self.claims.get(claim).and_then(serde_json::Value::as_u64) {
                out.push_str(&format!("{claim}: {what} {}\n", relative(t, now)));
            }
        }
        out
    }

    fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(serde_json::Value::as_str)
    }
}

fn relative(t: u64, now: u64) -> String {
    let span = |s: u64| match s {
        0..120 => format!("{s} s"),
        120..7_200 => format!("{} min", s / 60),
        7_200..172_800 => format!("{} h", s / 3_600),
        _ => format!("{} days", s / 86_400),
    };
    if t > now { format!("in {} (unix {t})", span(t - now)) } else { format!("{} ago (unix {t})", span(now - t)) }
}

/// The verdict of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signature, algorithm, type, times and (when given) issuer and
    /// audience all check out.
    Valid {
        /// The key that verified it.
        kid: String,
    },
    /// Refused, with the verifier's reason.
    Invalid {
        /// Why.
        reason: VerifyError,
        /// Whether the signature checked out (the failure is then in the
        /// claims: issuer, audience, times).
        signature_ok: bool,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Valid { kid } => write!(f, "valid: signature verified with kid {kid}"),
            Self::Invalid { reason, signature_ok: true } => {
                write!(f, "invalid: {reason} (the signature itself verifies)")
            }
            Self::Invalid { reason, signature_ok: false } => write!(f, "invalid: {reason}"),
        }
    }
}

/// Checks `token` as a verifier of the SDK would against `keys` at `now`:
/// `alg` pinned per key, `typ`, forbidden headers, signature, `exp`/`nbf`/
/// `iat` (with the SDK's default leeway) and `jti`; the issuer is the one
/// given, else the token's own; the audience only when given.
pub fn check(token: &str, keys: &KeySet, issuer: Option<&str>, audience: Option<&str>, now: u64) -> Verdict {
    let decoded = Decoded::parse(token).ok();
    let issuer =
        issuer.map(str::to_owned).or_else(|| decoded.as_ref().and_then(|d| d.str_claim("iss")).map(str::to_owned));
    let validator = Validator::new(issuer.unwrap_or_default(), String::new());
    match validator.validate_for(token.trim(), keys, now, audience) {
        Ok(_) => Verdict::Valid {
            kid: decoded.as_ref().and_then(|d| d.header.get("kid")).and_then(|k| k.as_str()).unwrap_or("").to_owned(),
        },
        Err(reason) => {
            let signature_ok = matches!(
                reason,
                VerifyError::BadClaims
                    | VerifyError::WrongIssuer
                    | VerifyError::WrongAudience
                    | VerifyError::Expired
                    | VerifyError::NotYetValid
                    | VerifyError::IssuedInFuture
                    | VerifyError::MissingJti
            );
            Verdict::Invalid { reason, signature_ok }
        }
    }
}

/// A JWK Set from a file, or from an `http://` or `https://` URL (for
/// `https`, trusting only `ca` when given, else the system's roots).
pub async fn load_jwks(from: &str, ca: Option<&Path>) -> Result<KeySet, AdminError> {
    let bad = |problem: String| AdminError::Jwks { from: from.to_owned(), problem };
    let json = if from.starts_with("http://") || from.starts_with("https://") {
        let mut builder = reqwest::Client::builder().timeout(CALL_TIMEOUT).redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| bad(format!("CA {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("CA {}: not PEM certificates: {e}", ca.display())))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().map_err(|e| bad(e.to_string()))?;
        let res = client.get(from).send().await.map_err(|e| bad(error_chain(&e)))?;
        if !res.status().is_success() {
            return Err(bad(format!("HTTP {}", res.status())));
        }
        res.text().await.map_err(|e| bad(error_chain(&e)))?
    } else {
        std::fs::read_to_string(from).map_err(|e| bad(e.to_string()))?
    };
    KeySet::from_jwks_json(&json).map_err(|e| bad(e.to_string()))
}

/// `auth-server healthcheck` for an `https://` URL (the side port with
/// `[http_tls]`): `Ok` if it answers 200 within a few seconds, trusting
/// only `ca` when given; errors name the URL and say why.
pub async fn healthcheck_https(url: &str, ca: Option<&Path>) -> Result<(), String> {
    let fail = |why: String| format!("healthcheck {url}: {why}");
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| fail(format!("CA {}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| fail(format!("CA {}: not PEM certificates: {e}", ca.display())))?;
        builder = builder.tls_certs_only(certs);
    }
    let client = builder.build().map_err(|e| fail(e.to_string()))?;
    let res = client.get(url).send().await.map_err(|e| fail(error_chain(&e)))?;
    let status = res.status();
    if status == reqwest::StatusCode::OK {
        return Ok(());
    }
    // The body says why (`/readyz`), on one short line.
    let body = res.text().await.unwrap_or_default();
    let why: String = body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(300).collect();
    Err(fail(if why.is_empty() { format!("unhealthy: {status}") } else { format!("unhealthy: {status}: {why}") }))
}

/// The JWK Set the server publishes, from `GetJwks` over mTLS.
pub async fn server_jwks(conn: &Connection) -> Result<KeySet, AdminError> {
    let mut client = conn.client()?;
    let json = bounded(conn, "GetJwks", client.get_jwks(pb::GetJwksRequest {})).await?.into_inner().jwks_json;
    KeySet::from_jwks_json(&json).map_err(|e| AdminError::Jwks { from: conn.uri(), problem: e.to_string() })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------------------
// new-account

/// A new service account: what goes in the accounts file, and what the
/// service gets.
pub struct NewAccount {
    /// The client id.
    pub name: String,
    /// The `[[account]]` block for the accounts file (the secret's digest,
    /// never the secret).
    pub accounts_toml: String,
    /// The credentials document the SDK's `FileCredentials` reads:
    /// `{"client_id": …, "client_secret": …}`. Holds the secret.
    pub credentials_json: String,
}

impl fmt::Debug for NewAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewAccount").field("accounts_toml", &self.accounts_toml).finish_non_exhaustive()
    }
}

/// What [`new_account`] creates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountSpec {
    /// The client id (also the service's own audience name).
    pub name: String,
    /// Audiences it may request, each with its allowed scopes.
    pub audiences: BTreeMap<String, Vec<String>>,
    /// The identity its mTLS certificate must carry, if bound.
    pub mtls_identity: Option<String>,
    /// Its role claim.
    pub role: Option<String>,
    /// Its own permissions (at the auth service, e.g. the admin one).
    pub perms: Vec<String>,
}

/// Parses `AUD=scope,scope` (or `AUD` alone: no scopes) into `spec`.
pub fn add_audience(spec: &mut AccountSpec, arg: &str) -> Result<(), AdminError> {
    parse_audience(&mut spec.audiences, arg)
}

/// Parses `AUD=scope,scope` (or `AUD` alone: no scopes) into `audiences`;
/// an audience given twice or not made of letters, digits, `-`, `_`, `.`,
/// `:` is an error.
pub fn parse_audience(audiences: &mut BTreeMap<String, Vec<String>>, arg: &str) -> Result<(), AdminError> {
    let (aud, scopes) = arg.split_once('=').unwrap_or((arg, ""));
    let aud = aud.trim();
    if aud.is_empty() {
        return Err(AdminError::Argument(format!("--audience {arg:?}: the audience name is empty (AUD=scope,scope)")));
    }
    if !valid_name(aud) {
        return Err(AdminError::Argument(format!("--audience {aud:?}: use letters, digits, '-', '_', '.' or ':'")));
    }
    let scopes: Vec<String> = scopes.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    if audiences.insert(aud.to_owned(), scopes).is_some() {
        return Err(AdminError::Argument(format!("--audience {aud:?} given twice")));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A new account with a fresh 256-bit secret. The block is checked the way
/// the server loads the accounts file before it is returned.
pub fn new_account(spec: &AccountSpec) -> Result<NewAccount, AdminError> {
    if !valid_name(&spec.name) {
        return Err(AdminError::Argument(format!(
            "account name {:?}: use 1 to 256 letters, digits, '-', '_', '.' or ':'",
            spec.name
        )));
    }
    if spec.audiences.is_empty() {
        return Err(AdminError::Argument("give at least one --audience AUD=scope,scope".into()));
    }
    if let Some(bad) = spec.audiences.keys().find(|a| !valid_name(a)) {
        return Err(AdminError::Argument(format!("audience {bad:?}: use letters, digits, '-', '_', '.' or ':'")));
    }
    let secret = generate_secret().map_err(|e| AdminError::Argument(e.to_string()))?;
    let account = Account {
        client_id: spec.name.clone(),
        secret_sha256: secret_digest_hex(&secret),
        mtls_identity: spec.mtls_identity.clone(),
        certificate_bound_tokens: None,
        role: spec.role.clone(),
        perms: spec.perms.clone(),
        audiences: spec.audiences.clone(),
    };
    let accounts_toml = account.to_toml_block().map_err(|e| AdminError::Argument(format!("TOML: {e}")))?;
    Directory::new(vec![], vec![account]).map_err(|e| AdminError::Argument(e.to_string()))?;
    let credentials_json = serde_json::json!({ "client_id": spec.name, "client_secret": secret }).to_string();
    Ok(NewAccount { name: spec.name.clone(), accounts_toml, credentials_json })
}

impl NewAccount {
    /// What `new-account` prints: the block for the accounts file, then
    /// the credentials document (which holds the secret), or, when it was
    /// written to a file, where.
    pub fn render(&self, credentials_written_to: Option<&Path>) -> String {
        let mut out = format!(
            "# Add to the accounts file (accounts_file), then reload the server (SIGHUP) or roll it:\n{}\n",
            self.accounts_toml.trim_end()
        );
        match credentials_written_to {
            Some(path) => out.push_str(&format!(
                "\n# The service's credentials (client_id, client_secret) are in {path} (mode 0600): move them to\n\
                 # Vault or a Kubernetes Secret, where the SDK's FileCredentials reads them, then delete the file:\n\
                 #   bao kv put -mount=secret <team>/{name}/auth-client @{path}\n\
                 # The secret is shown nowhere else and cannot be recovered from the block above.\n",
                path = path.display(),
                name = self.name,
            )),
            None => out.push_str(&format!(
                "\n# The service's credentials, shown once: put them in Vault or a Kubernetes Secret (the SDK's\n\
                 # FileCredentials reads this document), never in git, e.g. saved as {name}.json:\n\
                 #   bao kv put -mount=secret <team>/{name}/auth-client @{name}.json\n\
                 # The secret cannot be recovered from the block above.\n{json}\n",
                name = self.name,
                json = self.credentials_json
            )),
        }
        out
    }
}

/// Writes `contents` to a new file at `path` with mode 0600; an existing
/// file is left alone (an error).
pub fn write_new_private(path: &Path, contents: &str) -> Result<(), AdminError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| AdminError::Io { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_printed_only_when_not_written_to_a_file() {
        let mut spec = AccountSpec { name: "billing".into(), ..AccountSpec::default() };
        add_audience(&mut spec, "inventory").unwrap();
        let made = new_account(&spec).unwrap();
        assert!(made.render(None).contains(&made.credentials_json));
        let written = made.render(Some(Path::new("billing.json")));
        assert!(!written.contains("client_secret\":"), "{written}");
        assert!(written.contains("billing.json") && written.contains("[[account]]"), "{written}");
    }

    #[test]
    fn audiences_parse_with_and_without_scopes() {
        let mut spec = AccountSpec { name: "billing".into(), ..AccountSpec::default() };
        add_audience(&mut spec, "inventory=inventory:read, inventory:reserve").unwrap();
        add_audience(&mut spec, "order").unwrap();
        assert_eq!(spec.audiences["inventory"], ["inventory:read", "inventory:reserve"]);
        assert!(spec.audiences["order"].is_empty());
        assert!(add_audience(&mut spec, "order=x").is_err(), "twice");
        assert!(add_audience(&mut spec, "=x").is_err(), "no name");
    }

    #[test]
    fn a_new_account_loads_and_its_secret_matches_the_digest() {
        let mut spec = AccountSpec { name: "billing".into(), role: Some("service".into()), ..AccountSpec::default() };
        add_audience(&mut spec, "inventory=inventory:read").unwrap();
        let made = new_account(&spec).unwrap();
        let creds: serde_json::Value = serde_json::from_str(&made.credentials_json).unwrap();
        let secret = creds["client_secret"].as_str().unwrap();
        assert_eq!(creds["client_id"], "billing");
        assert!(!made.accounts_toml.contains(secret), "the block holds the digest only");
        assert!(!format!("{made:?}").contains(secret), "Debug never shows the secret");
        #[derive(serde::Deserialize)]
        struct File {
            account: Vec<Account>,
        }
        let file: File = toml::from_str(&made.accounts_toml).unwrap();
        let dir = Directory::new(vec![], file.account).unwrap();
        assert_eq!(
            dir.authenticate_service("billing", secret, None).unwrap().audiences["inventory"],
            ["inventory:read"]
        );
        assert!(new_account(&AccountSpec { name: "bad name".into(), ..spec.clone() }).is_err());
        assert!(new_account(&AccountSpec { audiences: BTreeMap::new(), ..spec }).is_err());
    }

    #[test]
    fn decode_shows_header_and_claims_and_refuses_what_is_not_a_token() {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#);
        let c = URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","exp":1100,"iat":1000}"#);
        let d = Decoded::parse(&format!("{h}.{c}.c2ln")).unwrap();
        let shown = d.render(1_030);
        assert!(shown.contains("\"sub\": \"alice\""), "{shown}");
        assert!(shown.contains("exp: expires in 70 s (unix 1100)"), "{shown}");
        assert!(shown.contains("iat: issued 30 s ago"), "{shown}");
        assert!(!shown.contains("c2ln"), "the signature is not shown");
        assert!(matches!(Decoded::parse("a.b"), Err(AdminError::Token(_))));
        assert!(matches!(Decoded::parse(&format!("{h}.{c}.")), Err(AdminError::Token(_))));
        assert!(matches!(Decoded::parse(&format!("{h}.bm90IGpzb24.c2ln")), Err(AdminError::Token(_))));
    }

    #[test]
    fn key_infos_name_kid_alg_and_curve() {
        let infos = key_infos(
            r#"{"keys":[{"kid":"a","alg":"ES256","kty":"EC","crv":"P-256"},{"kid":"b","alg":"RS256","kty":"RSA"}]}"#,
        )
        .unwrap();
        assert_eq!(render_keys(&infos), "a  ES256  EC P-256\nb  RS256  RSA\n");
        assert!(key_infos("[]").is_err());
    }
}
