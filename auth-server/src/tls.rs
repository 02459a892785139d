//! mTLS: the server's rustls configuration and the caller's identity as read
//! from its verified client certificate.

use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::digest;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, TlsConfig};
use crate::edge::ConnInfo;

/// Who is on the other end of the mTLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The first URI SAN (e.g. `spiffe://auth.dev/order`), else the first DNS
    /// SAN of the client certificate.
    pub id: String,
    /// SHA-256 of the certificate DER (RFC 8705 `x5t#S256`, raw bytes).
    pub cert_sha256: [u8; 32],
}

impl PeerIdentity {
    /// Reads the identity of a DER certificate already verified by rustls.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok().flatten()?;
        let mut dns = None;
        let mut uri = None;
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::URI(u) if uri.is_none() => uri = Some((*u).to_owned()),
                x509_parser::extensions::GeneralName::DNSName(d) if dns.is_none() => dns = Some((*d).to_owned()),
                _ => {}
            }
        }
        let id = uri.or(dns)?;
        let mut cert_sha256 = [0u8; 32];
        cert_sha256.copy_from_slice(digest::digest(&digest::SHA256, der).as_ref());
        Some(Self { id, cert_sha256 })
    }

    /// The identity of a tonic request's peer, if it presented a
    /// certificate: read once per connection by the edge's
    /// [`TlsIncoming`](crate::edge::TlsIncoming), found here in the request's
    /// extensions.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Arc<Self>> {
        req.extensions().get::<ConnInfo>()?.peer.clone()
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError { key: key.into(), problem: format!("{}: {e}", path.display()) })
}

/// The gRPC server's rustls configuration from the configured files: see
/// [`server_config_from_pem`].
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let cert = read("tls.cert", &cfg.cert)?;
    let key = read("tls.key", &cfg.key)?;
    let ca = read("tls.client_ca", &cfg.client_ca)?;
    server_config_from_pem(&cert, &key, &ca).map_err(|e| {
        let path = match e.key.as_str() {
            "tls.cert" => &cfg.cert,
            "tls.key" => &cfg.key,
            _ => &cfg.client_ca,
        };
        ConfigError { problem: format!("{}: {}", path.display(), e.problem), key: e.key }
    })
}

/// The gRPC server's rustls configuration: client certificates are
/// required and must chain to `client_ca_pem` (no certificate, or one from
/// another CA, is refused at the handshake); ALPN offers `h2` only; the
/// crypto provider is aws-lc-rs. There is no plaintext mode.
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<Arc<ServerConfig>, ConfigError> {
    let bad = |key: &str, problem: String| ConfigError { key: key.into(), problem };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls.cert", format!("not a PEM certificate chain: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("tls.key", format!("not a PEM private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca_pem) {
        let c = c.map_err(|e| bad("tls.client_ca", format!("not a PEM certificate: {e}")))?;
        roots.add(c).map_err(|e| bad("tls.client_ca", e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|e| bad("tls.client_ca", e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls.cert", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad("tls.key", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
