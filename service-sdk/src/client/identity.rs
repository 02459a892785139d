//! The auth server's own identity, and the certificate check that demands
//! it on every connection the SDK opens to the auth server.
//!
//! Every certificate of the mesh chains to one CA, and services hold
//! server certificates too (they serve mTLS to each other). A chain and a
//! host name therefore prove only "some workload of this mesh": a
//! compromised service could answer `GetJwks` with its own keys. The auth
//! server's certificate carries its SPIFFE ID as a URI SAN (by default
//! `spiffe://<trust domain>/auth-server`), and [`MtlsFiles::auth_channel`]
//! verifies the chain and the host name with webpki as usual, then requires
//! that ID.
//!
//! [`MtlsFiles::auth_channel`]: crate::MtlsFiles::auth_channel

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;

use super::tls::TlsError;

/// The last path segment of the default auth server identity.
pub const AUTH_SERVER_NAME: &str = "auth-server";

/// The longest SPIFFE ID accepted (the SPIFFE specification's limit).
const MAX_ID_BYTES: usize = 2048;

/// The identity the auth server must prove: a SPIFFE ID that its
/// certificate carries as a URI SAN, e.g. `spiffe://auth.dev/auth-server`
/// or, with Kubernetes-style IDs, `spiffe://cluster.local/ns/auth/sa/auth-server`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthServerId(Arc<str>);

impl AuthServerId {
    /// Any SPIFFE ID: `spiffe://<trust domain>/<path>`, lower-case trust
    /// domain, no port, user, query or fragment, no empty, `.` or `..` path
    /// segment.
    pub fn new(id: &str) -> Result<Self, TlsError> {
        let bad = |why: &str| TlsError::Identity(format!("{id:?} is not a SPIFFE ID: {why}"));
        if id.len() > MAX_ID_BYTES {
            return Err(bad("too long"));
        }
        let rest = id.strip_prefix("spiffe://").ok_or_else(|| bad("it must start with spiffe://"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| bad("it names no workload path"))?;
        check_trust_domain(domain).map_err(bad)?;
        for segment in path.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("empty, . or .. path segment"));
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err(bad("path segments are letters, digits, -, . and _"));
            }
        }
        Ok(Self(Arc::from(id)))
    }

    /// The default: `spiffe://<trust_domain>/auth-server`.
    pub fn in_trust_domain(trust_domain: &str) -> Result<Self, TlsError> {
        Self::new(&format!("spiffe://{trust_domain}/{AUTH_SERVER_NAME}"))
    }

    /// The default for a service whose own certificate (PEM, leaf first)
    /// carries a SPIFFE ID: the auth server in that ID's trust domain.
    pub fn default_for(cert_pem: &[u8]) -> Result<Self, TlsError> {
        let none = || {
            TlsError::Identity(
                "the certificate carries no SPIFFE ID to take the trust domain from; name the auth server's \
                 identity explicitly"
                    .into(),
            )
        };
        let leaf = CertificateDer::pem_slice_iter(cert_pem)
            .next()
            .ok_or_else(none)?
            .map_err(|e| TlsError::Identity(format!("certificate: {e}")))?;
        let ids = uri_sans(&leaf).map_err(|e| TlsError::Identity(format!("certificate: {e}")))?;
        let domain = ids
            .iter()
            .find_map(|u| u.strip_prefix("spiffe://").and_then(|rest| rest.split('/').next()))
            .ok_or_else(none)?;
        Self::in_trust_domain(domain)
    }

    /// The ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AuthServerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AuthServerId {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn check_trust_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("empty trust domain");
    }
    if domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
        Ok(())
    } else {
        Err("the trust domain is lower-case letters, digits, -, . and _ (no port, user or upper case)")
    }
}

/// The URI SANs of a DER certificate.
fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect())
}

/// Why a server was refused as the auth server (a TLS handshake error; its
/// text reaches the caller's `Unavailable` status and the logs).
#[derive(Debug, thiserror::Error)]
#[error("the server is not the auth server {expected}: its certificate names {presented}")]
struct NotTheAuthServer {
    expected: AuthServerId,
    presented: String,
}

/// webpki's usual server check (chain to the configured CAs, validity, host
/// name), then the auth server's SPIFFE ID among the URI SANs.
#[derive(Debug)]
pub(crate) struct AuthServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    expected: AuthServerId,
}

impl AuthServerVerifier {
    /// Trusts the CA certificates in `ca_pem` and demands `expected`.
    pub(crate) fn new(ca_pem: &[u8], expected: AuthServerId) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| TlsError::Channel(format!("CA certificate: {e}")))?;
            roots.add(cert).map_err(|e| TlsError::Channel(format!("CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::Channel(format!("CA certificates: {e}")))?;
        Ok(Self { webpki, expected })
    }
}

impl ServerCertVerifier for AuthServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                if let rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    expected,
                    presented,
                }) = e
                {
                    tracing::warn!(
                        expected = expected.to_str().as_ref(),
                        presented = ?presented,
                        "auth server refused: its certificate does not name the host dialled"
                    );
                }
            })?;
        let ids = uri_sans(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if ids.iter().any(|id| id == self.expected.as_str()) {
            return Ok(verified);
        }
        let presented = if ids.is_empty() { "no URI SAN".to_owned() } else { ids.join(", ") };
        tracing::warn!(expected = %self.expected, presented = ?ids, "server refused: not the auth server");
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NotTheAuthServer {
            expected: self.expected.clone(),
            presented,
        })))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_checked() {
        for ok in ["spiffe://auth.dev/auth-server", "spiffe://cluster.local/ns/auth/sa/auth-server", "spiffe://a/b"] {
            assert_eq!(AuthServerId::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "https://auth.dev/auth-server",
            "spiffe://auth.dev",
            "spiffe://auth.dev/",
            "spiffe:///auth-server",
            "spiffe://Auth.dev/auth-server",
            "spiffe://auth.dev:443/auth-server",
            "spiffe://user@auth.dev/auth-server",
            "spiffe://auth.dev/a//b",
            "spiffe://auth.dev/a/../b",
            "spiffe://auth.dev/auth-server?x=1",
            "spiffe://auth.dev/auth-server#x",
            "",
        ] {
            let err = AuthServerId::new(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{bad}: {err}");
        }
        assert_eq!(AuthServerId::in_trust_domain("auth.dev").unwrap().as_str(), "spiffe://auth.dev/auth-server");
        assert!(AuthServerId::new(&format!("spiffe://a/{}", "x".repeat(MAX_ID_BYTES))).is_err());
    }

    fn cert_with(sans: Vec<rcgen::SanType>) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
    }

    #[test]
    fn the_default_takes_the_trust_domain_of_the_own_certificate() {
        let own = cert_with(vec![
            rcgen::SanType::DnsName("order".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/order".try_into().unwrap()),
        ]);
        let id = AuthServerId::default_for(own.as_bytes()).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/auth-server");
        let no_spiffe = cert_with(vec![rcgen::SanType::DnsName("order".try_into().unwrap())]);
        assert!(matches!(AuthServerId::default_for(no_spiffe.as_bytes()), Err(TlsError::Identity(_))));
        assert!(matches!(AuthServerId::default_for(b"not pem"), Err(TlsError::Identity(_))));
    }
}
