//! mTLS: the server's rustls configuration and the caller's identity as read
//! from its verified client certificate.

use std::path::Path;

use aws_lc_rs::digest;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::{ConfigError, TlsConfig};

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

    /// The identity of a tonic request's peer, if it presented a certificate.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Self> {
        let certs = req.peer_certs()?;
        Self::from_der(certs.first()?.as_ref())
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError { key: key.into(), problem: format!("{}: {e}", path.display()) })
}

/// The gRPC server's TLS config: client certificates are required and must
/// chain to `client_ca`. There is no plaintext mode.
pub fn server_tls(cfg: &TlsConfig) -> Result<ServerTlsConfig, ConfigError> {
    let cert = read("tls.cert", &cfg.cert)?;
    let key = read("tls.key", &cfg.key)?;
    let ca = read("tls.client_ca", &cfg.client_ca)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false)
        .timeout(std::time::Duration::from_secs(10)))
}
