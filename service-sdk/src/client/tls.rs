//! mTLS channels from certificate, key and CA files.
//!
//! See [`MtlsFiles`] for how rotation on disk is followed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::identity::{AuthServerId, AuthServerVerifier};

/// Why a TLS channel could not be built. Messages name files and URIs,
/// never file contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The URI is not `https://` with a host. There is no plaintext mode:
    /// given an `http://` URI, tonic would speak cleartext HTTP/2.
    #[error("refusing {uri:?}: only https:// URIs with a host are accepted (there is no plaintext mode)")]
    NotHttps {
        /// The URI, without any `user:password@` part.
        uri: String,
    },
    /// The auth server's identity is not a SPIFFE ID, or the service's own
    /// certificate names no trust domain to derive it from.
    #[error("auth server identity: {0}")]
    Identity(String),
    /// The endpoint URI or the TLS material was refused.
    #[error("tls channel: {0}")]
    Channel(String),
    /// A file does not hold usable TLS material (no certificate, a key that
    /// does not parse or is not the certificate's, a CA that webpki
    /// refuses). The problem never quotes the file's contents.
    #[error("{path}: {problem}")]
    Material {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

/// A tonic endpoint for `uri`, which must be `https://` with a host: every
/// channel the SDK builds goes through here.
pub(crate) fn https_endpoint(uri: &str) -> Result<Endpoint, TlsError> {
    if !is_https_with_host(uri) {
        return Err(TlsError::NotHttps { uri: shown_uri(uri) });
    }
    Endpoint::from_shared(uri.to_owned()).map_err(|e| TlsError::Channel(e.to_string()))
}

/// Whether `uri` parses as `https://host…`.
pub(crate) fn is_https_with_host(uri: &str) -> bool {
    uri.parse::<http::Uri>().is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()))
}

/// `uri` as an error may show it: a `user:password@` part is cut.
pub(crate) fn shown_uri(uri: &str) -> String {
    let (scheme, rest) = match uri.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, uri),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => authority.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

/// The CA, certificate and key files of a service: its mTLS channels to the
/// auth server and to other services, and its own mTLS server
/// ([`server_tls_config`](Self::server_tls_config)).
///
/// # Rotation of the client side
///
/// tonic reads the client certificate, key and CA into its TLS connector
/// when a [`Channel`] is built; the files are not looked at again. A TLS
/// handshake happens only when a connection is opened, so an established
/// HTTP/2 connection keeps using the certificate it was opened with, and a
/// reconnect of the same channel (after a network failure) presents the
/// *old* certificate again.
///
/// To follow rotation on disk, [`MtlsFiles::watch`] polls the three files'
/// length, modification and change time and inode at a fixed interval. When
/// any changed and all three parse again, it builds a new channel and hands
/// it to a callback, e.g. [`TokenSource::set_auth_channel`] (with
/// [`MtlsFiles::watch_auth`]) or a swap of the
/// channel inside an `AuthChannel` you rebuild. New calls then go through
/// new connections with the new certificate; calls in flight finish on the
/// old channel, whose connections close when its last clone is dropped. If
/// the files are mid-rotation (a key that does not match its certificate, a
/// truncated PEM), the build fails, the old channel stays in use and the
/// next poll tries again. Rotate before the old certificate expires by at
/// least the poll interval.
///
/// The server side follows rotation by itself: see
/// [`server_tls_config`](Self::server_tls_config).
///
/// [`TokenSource::set_auth_channel`]: crate::TokenSource::set_auth_channel
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsFiles {
    /// PEM CA certificate(s) that every certificate of the mesh chains to.
    pub ca: PathBuf,
    /// PEM certificate (chain) of this service, presented as a client and
    /// as a server.
    pub cert: PathBuf,
    /// PEM private key of the certificate (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_owned(), source })
}

pub(crate) type Stamp = (u64, Option<SystemTime>, u64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (ino, ctime) = {
        use std::os::unix::fs::MetadataExt as _;
        (meta.ino(), meta.ctime_nsec().wrapping_add(meta.ctime().wrapping_mul(1_000_000_000)))
    };
    #[cfg(not(unix))]
    let (ino, ctime) = (0, 0);
    Some((meta.len(), meta.modified().ok(), ino, ctime))
}

impl MtlsFiles {
    /// The three files.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self { ca: ca.into(), cert: cert.into(), key: key.into() }
    }

    /// Reads the files into a tonic TLS config for a server named `domain`.
    pub fn tls_config(&self, domain: &str) -> Result<ClientTlsConfig, TlsError> {
        let ca = read(&self.ca)?;
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(domain))
    }

    /// A lazily connecting channel to `uri` (e.g. `https://inventory:50051`)
    /// for a server whose certificate names `domain`: another service.
    /// Only `https://` URIs are accepted ([`TlsError::NotHttps`] otherwise).
    /// The TLS material is parsed here, so bad files fail now rather than at
    /// the first call. For the auth server, use
    /// [`auth_channel`](Self::auth_channel).
    pub fn channel(&self, uri: &str, domain: &str) -> Result<Channel, TlsError> {
        self.build(uri, &Peer::Named(domain))
    }

    /// The DER of this service's own (leaf) certificate, as the cert file
    /// holds it now: what a certificate-bound token's `cnf.x5t#S256` names
    /// (see [`TokenSource::rotate_certificate`](crate::TokenSource::rotate_certificate)
    /// and [`AuthChannel::client_certificate`](crate::AuthChannel::client_certificate)).
    pub fn client_certificate_der(&self) -> Result<Vec<u8>, TlsError> {
        use rustls_pki_types::pem::PemObject as _;
        let pem = read(&self.cert)?;
        rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok)
            .map(|der| der.to_vec())
            .ok_or_else(|| TlsError::Channel(format!("{}: no PEM certificate", self.cert.display())))
    }

    /// The auth server's identity this service expects unless told
    /// otherwise: `spiffe://<trust domain>/auth-server`, in the trust domain
    /// of the SPIFFE ID of this service's own certificate.
    pub fn auth_server_id(&self) -> Result<AuthServerId, TlsError> {
        AuthServerId::default_for(&read(&self.cert)?)
    }

    /// A lazily connecting channel to the auth server at `uri` (e.g.
    /// `https://auth:50051`), for the token source and the verifier. The
    /// server's certificate must chain to the CA, name the URI's host, and
    /// carry the auth server's SPIFFE ID ([`auth_server_id`](Self::auth_server_id)),
    /// so that no other workload of the mesh can pass as the auth server. A
    /// server that fails the check fails the connection (calls get
    /// `Unavailable`). Only `https://` URIs are accepted.
    pub fn auth_channel(&self, uri: &str) -> Result<Channel, TlsError> {
        self.auth_channel_as(uri, &self.auth_server_id()?)
    }

    /// Like [`auth_channel`](Self::auth_channel), with the auth server's
    /// identity named, e.g. `spiffe://cluster.local/ns/auth/sa/auth-server`.
    pub fn auth_channel_as(&self, uri: &str, id: &AuthServerId) -> Result<Channel, TlsError> {
        self.build(uri, &Peer::AuthServer(id))
    }

    fn build(&self, uri: &str, peer: &Peer<'_>) -> Result<Channel, TlsError> {
        let endpoint = https_endpoint(uri)?;
        let endpoint = match peer {
            Peer::Named(domain) => endpoint.tls_config(self.tls_config(domain)?),
            Peer::AuthServer(id) => {
                let verifier = AuthServerVerifier::new(&read(&self.ca)?, (*id).clone())?;
                let tls = ClientTlsConfig::new().identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
                endpoint.tls_config_with_verifier(tls, Arc::new(verifier))
            }
        };
        Ok(endpoint.map_err(|e| TlsError::Channel(e.to_string()))?.connect_lazy())
    }

    /// What identifies the current version of each file (CA, certificate,
    /// key) without reading it.
    pub(crate) fn stamps(&self) -> [Option<Stamp>; 3] {
        [stamp(&self.ca), stamp(&self.cert), stamp(&self.key)]
    }

    /// Polls the files every `every` and, after a change, builds a new
    /// [`channel`](Self::channel) and passes it to `on_change` (see
    /// "Rotation of the client side" [above](Self)). Fails at once, starting nothing, when `uri` is
    /// not `https://`. The task stops when the handle is aborted or dropped
    /// with the runtime.
    pub fn watch(
        &self,
        uri: &str,
        domain: &str,
        every: Duration,
        on_change: impl Fn(Channel) + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, TlsError> {
        self.watch_peer(uri, Peer::Named(domain).owned(), every, on_change)
    }

    /// Like [`watch`](Self::watch), for the channel to the auth server
    /// identified as `id` (see [`auth_channel_as`](Self::auth_channel_as)),
    /// e.g. to call [`TokenSource::set_auth_channel`](crate::TokenSource::set_auth_channel)
    /// after a rotation.
    pub fn watch_auth(
        &self,
        uri: &str,
        id: &AuthServerId,
        every: Duration,
        on_change: impl Fn(Channel) + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, TlsError> {
        self.watch_peer(uri, OwnedPeer::AuthServer(id.clone()), every, on_change)
    }

    fn watch_peer(
        &self,
        uri: &str,
        peer: OwnedPeer,
        every: Duration,
        on_change: impl Fn(Channel) + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, TlsError> {
        https_endpoint(uri)?;
        let files = self.clone();
        let uri = uri.to_owned();
        // The files as they are now: changes from here on count.
        let mut seen = files.stamps();
        Ok(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = files.stamps();
                if now == seen {
                    continue;
                }
                match files.build(&uri, &peer.borrowed()) {
                    Ok(ch) => {
                        tracing::info!(uri = %uri, "mTLS files changed; new channel built");
                        seen = now;
                        on_change(ch);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mTLS files changed but do not load yet; keeping the old channel")
                    }
                }
            }
        }))
    }
}

/// Whom a channel must reach: a server named so in its certificate, or the
/// auth server by its identity.
enum Peer<'a> {
    Named(&'a str),
    AuthServer(&'a AuthServerId),
}

enum OwnedPeer {
    Named(String),
    AuthServer(AuthServerId),
}

impl Peer<'_> {
    fn owned(&self) -> OwnedPeer {
        match self {
            Peer::Named(domain) => OwnedPeer::Named((*domain).to_owned()),
            Peer::AuthServer(id) => OwnedPeer::AuthServer((*id).clone()),
        }
    }
}

impl OwnedPeer {
    fn borrowed(&self) -> Peer<'_> {
        match self {
            OwnedPeer::Named(domain) => Peer::Named(domain),
            OwnedPeer::AuthServer(id) => Peer::AuthServer(id),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_https_uris_with_a_host_pass() {
        for ok in ["https://auth:50051", "https://127.0.0.1:50051", "https://[::1]:50051", "HTTPS://auth"] {
            assert!(https_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in ["http://auth:50051", "grpc://auth", "auth:50051", "https://", "https:///path", "", "unix:/x"] {
            assert!(matches!(https_endpoint(bad), Err(TlsError::NotHttps { .. })), "{bad}");
        }
    }

    #[test]
    fn refusals_name_the_uri_without_its_credentials() {
        let err = https_endpoint("http://auth:50051/x").unwrap_err().to_string();
        assert!(err.contains("\"http://auth:50051/x\""), "{err}");
        let err = https_endpoint("http://svc:hunter2@auth:50051/x").unwrap_err().to_string();
        assert!(err.contains("http://…@auth:50051/x") && !err.contains("hunter2"), "{err}");
        assert_eq!(shown_uri("unix:/run/a@b"), "unix:/run/a@b");
    }
}
