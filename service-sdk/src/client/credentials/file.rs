//! [`FileCredentials`]: credentials from mounted files.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Deserialize;

use super::{Credentials, CredentialsError};
use crate::client::secret::ClientCredentials;

#[derive(Debug, Clone)]
enum Layout {
    Document(PathBuf),
    Pair { id: PathBuf, secret: PathBuf },
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    unix: (u64, u64, i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            unix: (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    stamps: Vec<Stamp>,
    creds: Option<ClientCredentials>,
}

/// Credentials from mounted files, as a Vault Agent template or a Kubernetes
/// Secret volume renders them: one JSON/TOML file, or two plain files,
/// re-read when they change.
///
/// # File format
///
/// Two layouts are supported:
/// - one document, JSON (`{"client_id": "...", "client_secret": "..."}`) or
///   TOML (`client_id = "..."` / `client_secret = "..."`), chosen by the
///   `.json` / `.toml` extension (other names: JSON, then TOML);
/// - two plain files, one holding the id and one the secret (the shape of a
///   Kubernetes Secret volume with keys `client_id` and `client_secret`).
///   Surrounding whitespace, such as a trailing newline, is trimmed.
///
/// The document `auth-server dev` writes to `credentials/<name>.json` (and
/// that a Vault Agent template renders from the KV secret):
///
/// ```json
/// {"client_id": "payments", "client_secret": "…"}
/// ```
///
/// # Rotation
///
/// Every [`current`](Credentials::current) call stats the file(s) and
/// re-reads them when their length, modification or change time, or inode
/// changed; [`refresh`](Credentials::refresh) re-reads unconditionally. New
/// contents are accepted only if they parse into complete credentials, and
/// only if the files did not change while they were read; otherwise the last
/// good credentials stay in use and the next call tries again. So:
/// - an atomic replacement (write a temporary file, then `rename`; or the
///   symlink swap of a Kubernetes Secret volume) is picked up on the next
///   call;
/// - an in-place rewrite is never read half-way as a document: a truncated
///   JSON or TOML document does not parse, so the old credentials are served
///   until the writer has finished;
/// - in the two-file layout a truncated *plain* secret cannot be told from a
///   short one. Both Vault Agent and Kubernetes replace files atomically, so
///   this only concerns hand-rolled in-place writers; if it happens, the
///   auth service refuses the credentials and the token source calls
///   [`refresh`](Credentials::refresh), which reads the finished file.
#[derive(Debug)]
pub struct FileCredentials {
    layout: Layout,
    state: Mutex<State>,
}

#[derive(Deserialize)]
struct Document {
    client_id: String,
    client_secret: String,
}

impl FileCredentials {
    /// Credentials from one JSON or TOML document.
    pub fn document(path: impl Into<PathBuf>) -> Self {
        Self::with_layout(Layout::Document(path.into()))
    }

    /// Credentials from two plain files: the client id and the client secret.
    pub fn pair(id_path: impl Into<PathBuf>, secret_path: impl Into<PathBuf>) -> Self {
        Self::with_layout(Layout::Pair { id: id_path.into(), secret: secret_path.into() })
    }

    /// The files of a Kubernetes Secret volume mounted at `dir` with keys
    /// `client_id` and `client_secret`.
    pub fn secret_volume(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self::pair(dir.join("client_id"), dir.join("client_secret"))
    }

    fn with_layout(layout: Layout) -> Self {
        Self { layout, state: Mutex::new(State::default()) }
    }

    fn paths(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::Document(p) => vec![p.as_path()],
            Layout::Pair { id, secret } => vec![id.as_path(), secret.as_path()],
        }
    }

    async fn stamps(&self) -> Result<Vec<Stamp>, CredentialsError> {
        let mut out = Vec::with_capacity(2);
        for p in self.paths() {
            let meta =
                tokio::fs::metadata(p).await.map_err(|source| CredentialsError::Io { path: p.to_owned(), source })?;
            out.push(Stamp::of(&meta));
        }
        Ok(out)
    }

    fn cached(&self, stamps: Option<&[Stamp]>) -> Option<ClientCredentials> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match stamps {
            Some(s) if state.stamps != s => None,
            _ => state.creds.clone(),
        }
    }

    /// Reads and parses the files: the stamps after the read, and the
    /// credentials or why the contents are not (yet) usable.
    async fn read(&self) -> Result<(Vec<Stamp>, Result<ClientCredentials, CredentialsError>), CredentialsError> {
        let before = self.stamps().await?;
        let mut contents = Vec::with_capacity(2);
        for p in self.paths() {
            let bytes =
                tokio::fs::read(p).await.map_err(|source| CredentialsError::Io { path: p.to_owned(), source })?;
            contents.push(bytes);
        }
        let after = self.stamps().await?;
        let lens_match = before.iter().zip(&contents).all(|(s, c)| s.len == c.len() as u64);
        if before != after || !lens_match {
            let path = self.paths().first().map(|p| p.to_path_buf()).unwrap_or_default();
            return Ok((after, Err(CredentialsError::Parse { path })));
        }
        let parsed = match &self.layout {
            Layout::Document(p) => parse_document(p, &contents[0]),
            Layout::Pair { id, secret } => parse_plain(id, &contents[0]).and_then(|client_id| {
                let client_secret = parse_plain(secret, &contents[1])?;
                Ok(ClientCredentials::new(client_id, client_secret))
            }),
        };
        Ok((after, parsed))
    }

    async fn reload(&self) -> Result<ClientCredentials, CredentialsError> {
        let (stamps, parsed) = self.read().await?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match parsed {
            Ok(creds) => {
                if state.creds.as_ref() != Some(&creds) {
                    tracing::info!(client_id = %creds.client_id, "credentials file loaded");
                }
                state.stamps = stamps;
                state.creds = Some(creds.clone());
                Ok(creds)
            }
            Err(e) => {
                // Keep the stamps unchanged so that the next call tries again.
                match &state.creds {
                    Some(old) => {
                        tracing::warn!(error = %e, "credentials file incomplete; keeping the previous credentials");
                        Ok(old.clone())
                    }
                    None => Err(e),
                }
            }
        }
    }
}

fn parse_document(path: &Path, bytes: &[u8]) -> Result<ClientCredentials, CredentialsError> {
    let bad = || CredentialsError::Parse { path: path.to_owned() };
    let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    // Parse errors are dropped on purpose: their messages may quote the file.
    let doc: Document = match ext {
        "toml" => toml::from_str(text).map_err(|_| bad())?,
        "json" => serde_json::from_str(text).map_err(|_| bad())?,
        _ => serde_json::from_str(text).or_else(|_| toml::from_str(text)).map_err(|_| bad())?,
    };
    let (id, secret) = (doc.client_id.trim(), doc.client_secret.trim());
    if id.is_empty() || secret.is_empty() {
        return Err(bad());
    }
    Ok(ClientCredentials::new(id, secret))
}

fn parse_plain(path: &Path, bytes: &[u8]) -> Result<String, CredentialsError> {
    let bad = || CredentialsError::Parse { path: path.to_owned() };
    let text = std::str::from_utf8(bytes).map_err(|_| bad())?.trim();
    if text.is_empty() {
        return Err(bad());
    }
    Ok(text.to_owned())
}

#[async_trait]
impl Credentials for FileCredentials {
    async fn current(&self) -> Result<ClientCredentials, CredentialsError> {
        let stamps = self.stamps().await;
        match stamps {
            Ok(s) => match self.cached(Some(&s)) {
                Some(c) => Ok(c),
                None => self.reload().await,
            },
            // The file is gone for a moment (e.g. between unlink and rename):
            // keep serving the last good credentials.
            Err(e) => self.cached(None).ok_or(e),
        }
    }

    async fn refresh(&self) -> Result<ClientCredentials, CredentialsError> {
        match self.reload().await {
            Ok(c) => Ok(c),
            Err(e) => self.cached(None).ok_or(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_documents_parse() {
        let j = parse_document(Path::new("c.json"), br#"{"client_id":"order","client_secret":"s"}"#).unwrap();
        assert_eq!(j, ClientCredentials::new("order", "s"));
        let t = parse_document(Path::new("c.toml"), b"client_id = \"order\"\nclient_secret = \"s\"\n").unwrap();
        assert_eq!(t, ClientCredentials::new("order", "s"));
        let guess = parse_document(Path::new("creds"), b"client_id = \"order\"\nclient_secret = \"s\"\n").unwrap();
        assert_eq!(guess, ClientCredentials::new("order", "s"));
    }

    #[test]
    fn truncated_documents_never_parse() {
        let full = br#"{"client_id":"order","client_secret":"0123456789abcdef"}"#;
        for cut in 0..full.len() {
            assert!(parse_document(Path::new("c.json"), &full[..cut]).is_err(), "cut at {cut}");
        }
        let full = b"client_id = \"order\"\nclient_secret = \"0123456789abcdef\"\n";
        for cut in 0..full.len() - 1 {
            assert!(parse_document(Path::new("c.toml"), &full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn parse_errors_do_not_quote_the_file() {
        let err = parse_document(Path::new("c.toml"), b"client_secret = \"hunter2").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
