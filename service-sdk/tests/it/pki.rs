//! A test's own PKI: a CA and the certificates it issues, written into a
//! temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use service_sdk::MtlsFiles;

/// The trust domain of the test PKI's SPIFFE IDs.
const TRUST_DOMAIN: &str = "test.local";

/// A CA, and certificates it issues into a directory.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// An issued certificate and its key (PEM).
pub(crate) struct Issued {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

impl Pki {
    /// A new CA named `name`, written to `ca.pem`.
    pub(crate) fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self { dir, issuer: Issuer::new(params, key), ca_pem: cert.pem() }
    }

    /// The CA certificate (PEM).
    pub(crate) fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `name`'s certificate with URI SAN `spiffe://test.local/<name>`, DNS
    /// `localhost` and IP `127.0.0.1`, for serving and for calling.
    pub(crate) fn certificate(&self, name: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![
            SanType::URI(format!("spiffe://{TRUST_DOMAIN}/{name}").as_str().try_into().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// Issues `name`'s certificate into `<name>.pem` and `<name>-key.pem`.
    pub(crate) fn issue(&self, name: &str) {
        let issued = self.certificate(name);
        std::fs::write(self.path(&format!("{name}.pem")), issued.cert_pem).unwrap();
        std::fs::write(self.path(&format!("{name}-key.pem")), issued.key_pem).unwrap();
    }

    /// A file in the PKI's directory.
    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The mTLS files of `name` (issued before).
    pub(crate) fn files(&self, name: &str) -> MtlsFiles {
        MtlsFiles::new(self.path("ca.pem"), self.path(&format!("{name}.pem")), self.path(&format!("{name}-key.pem")))
    }
}

/// Replaces `path` atomically: write a temporary file, then rename.
pub(crate) fn replace_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
