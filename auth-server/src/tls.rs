//! mTLS: the server's rustls configuration, loaded from its files and
//! reloaded when they change ([`ServerTls`]), and the caller's identity as
//! read from its verified client certificate ([`PeerIdentity`]).
//!
//! A [`ServerTls`] holds the rustls configuration built from one set of
//! files ([`TlsFiles`]: certificate chain, private key, client CA). Every
//! set is validated before use: the key must be the certificate's (a
//! mismatch names both files), the key file must not be readable by other
//! users (see [`crate::keys::check_key_file`]), and the client CA must
//! parse. [`ServerTls::reload`] re-reads the files and swaps a valid new
//! set in whole; a broken set keeps the running one and says why, naming
//! the file. Each new handshake takes the configuration current at that
//! moment, so open connections keep the one they started with.
//!
//! [`ServerTls::watch`] polls the files by content (a Kubernetes Secret
//! volume swaps them through a symlink, which no file watch on the path
//! sees), logs the certificate's expiry, warns ahead of it, and, when given
//! a [readiness](crate::readiness) handle, raises the condition named after
//! its section (`tls`) once it has passed. Nothing here is specific to one
//! port: the gRPC port's files are [`TlsFiles::grpc`] (`[tls]`), the HTTP
//! side port's [`crate::http::tls_files`] (`[http_tls]`, whose expiry is
//! logged but leaves readiness alone). What `/metrics` reports
//! of them (the certificate's `notAfter`, reloads applied and refused) is
//! read at scrape time from [`ServerTls::certificate`] and
//! [`ServerTls::reload_counts`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::digest;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::clock::SharedClock;
use crate::config::{ConfigError, TlsConfig};
use crate::edge::ConnInfo;
use crate::readiness::Readiness;

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

/// The files of a server TLS identity, and how to use them. Reusable by any
/// port: the gRPC port's is [`TlsFiles::grpc`], the side port's
/// [`crate::http::tls_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The config section that names the files in messages and the
    /// readiness condition (`tls`: `tls.cert`, `tls.key`, `tls.client_ca`).
    pub section: String,
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM) of the leaf certificate.
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to; with it,
    /// every client must present one. `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered, most preferred first.
    pub alpn: Vec<Vec<u8>>,
    /// Start (with a warning) when other users can read the key file
    /// (`keys.allow_readable_key_files`).
    pub allow_readable_key: bool,
}

impl TlsFiles {
    /// The gRPC port's `[tls]`: client certificates required, ALPN `h2`.
    pub fn grpc(cfg: &TlsConfig, allow_readable_key: bool) -> Self {
        Self {
            section: "tls".into(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            client_ca: Some(cfg.client_ca.clone()),
            alpn: vec![b"h2".to_vec()],
            allow_readable_key,
        }
    }

    /// The config key of one of the files (`tls.key`).
    fn name(&self, file: &str) -> String {
        format!("{}.{file}", self.section)
    }

    /// An error about `file` at `path`.
    fn error(&self, file: &str, path: &Path, problem: impl std::fmt::Display) -> ConfigError {
        ConfigError { key: self.name(file), problem: format!("{}: {problem}", path.display()) }
    }
}

/// What an operator needs to know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, as an RFC 4514 string.
    pub subject: String,
    /// The serial number, colon-separated hex.
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity (`notAfter`), Unix seconds.
    pub not_after: i64,
    /// The subject alternative names (`URI:…`, `DNS:…`), in order.
    pub names: Vec<String>,
}

impl CertInfo {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(u) => names.push(format!("URI:{u}")),
                    x509_parser::extensions::GeneralName::DNSName(d) => names.push(format!("DNS:{d}")),
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            names,
        })
    }
}

/// A Unix time as RFC 3339 UTC (`2026-12-31T23:59:59Z`).
pub fn rfc3339(unix: i64) -> String {
    // Days to civil date: H. Hinnant's algorithm (proleptic Gregorian).
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3_600, secs % 3_600 / 60, secs % 60)
}

/// The contents of one read of the files.
struct Pems {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// SHA-256 over the three files' contents (each framed by its length):
/// whether anything changed, without keeping a copy of the key.
type Digest = [u8; 32];

impl Pems {
    fn read(files: &TlsFiles) -> Result<Self, ConfigError> {
        let read = |file: &str, path: &Path| std::fs::read(path).map_err(|e| files.error(file, path, e));
        Ok(Self {
            cert: read("cert", &files.cert)?,
            key: read("key", &files.key)?,
            client_ca: files.client_ca.as_deref().map(|p| read("client_ca", p)).transpose()?,
        })
    }

    /// Reads until two reads in a row agree, so a set being replaced while
    /// read (new certificate, old key) is never taken for a broken one.
    fn read_stable(files: &TlsFiles) -> Result<(Self, Digest), ConfigError> {
        let mut last = Self::read(files)?;
        let mut last_digest = last.digest();
        for _ in 0..4 {
            let again = Self::read(files)?;
            let digest = again.digest();
            if digest == last_digest {
                return Ok((again, digest));
            }
            (last, last_digest) = (again, digest);
        }
        drop(last);
        Err(files.error("cert", &files.cert, "the TLS files kept changing while being read"))
    }

    fn digest(&self) -> Digest {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            let part = part.map_or(&[][..], Vec::as_slice);
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// One validated set, ready for handshakes.
struct Loaded {
    config: Arc<ServerConfig>,
    cert: CertInfo,
    digest: Digest,
    /// The subjects of the client CA certificates.
    client_cas: Vec<String>,
}

/// Validates one read of the files and builds its rustls configuration.
fn build(files: &TlsFiles, pems: &Pems, digest: Digest) -> Result<Loaded, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(&pems.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| files.error("cert", &files.cert, format!("not a PEM certificate chain: {e}")))?;
    let leaf = chain.first().ok_or_else(|| files.error("cert", &files.cert, "no certificate in the file"))?;
    let cert = CertInfo::from_der(leaf.as_ref()).map_err(|e| files.error("cert", &files.cert, e))?;

    match crate::keys::check_key_file(&files.name("key"), &files.key, files.allow_readable_key) {
        Ok(None) => {}
        Ok(Some(warning)) => tracing::warn!("{warning}"),
        Err(refused) => {
            let problem = refused.strip_prefix(&format!("{}: ", files.name("key"))).unwrap_or(&refused).to_owned();
            return Err(ConfigError { key: files.name("key"), problem });
        }
    }
    let key = PrivateKeyDer::from_pem_slice(&pems.key)
        .map_err(|e| files.error("key", &files.key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => files.error(
            "key",
            &files.key,
            format!(
                "does not match the certificate in {} ({}): the private key is not the one the certificate was \
                 issued for; install the key and the certificate of the same issuance",
                files.name("cert"),
                files.cert.display()
            ),
        ),
        other => files.error("key", &files.key, format!("unusable private key: {other}")),
    })?;

    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| files.error("cert", &files.cert, e))?;
    let mut client_cas = Vec::new();
    let builder = match (&files.client_ca, &pems.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| files.error("client_ca", path, format!("not a PEM certificate: {e}")))?;
                let info = CertInfo::from_der(c.as_ref()).map_err(|e| files.error("client_ca", path, e))?;
                client_cas.push(format!("{} (serial {})", info.subject, info.serial));
                roots.add(c).map_err(|e| files.error("client_ca", path, e))?;
            }
            if roots.is_empty() {
                return Err(files.error("client_ca", path, "no CA certificate in the file"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| files.error("client_ca", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // A new configuration starts with an empty session cache: no session
    // resumed from the old one (whose client was checked against the old
    // client CA) carries over.
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = files.alpn.clone();
    Ok(Loaded { config: Arc::new(config), cert, digest, client_cas })
}

/// The gRPC server's rustls configuration from the configured files: see
/// [`server_config_from_pem`] and [`ServerTls`], which also reloads them.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    Ok(ServerTls::load(TlsFiles::grpc(cfg, false))?.server_config())
}

/// The gRPC server's rustls configuration: client certificates are
/// required and must chain to `client_ca_pem` (no certificate, or one from
/// another CA, is refused at the handshake); ALPN offers `h2` only; the
/// crypto provider is aws-lc-rs. There is no plaintext mode. The key must
/// be the certificate's.
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<Arc<ServerConfig>, ConfigError> {
    let files = TlsFiles {
        section: "tls".into(),
        cert: "(PEM)".into(),
        key: "(PEM)".into(),
        client_ca: Some("(PEM)".into()),
        alpn: vec![b"h2".to_vec()],
        allow_readable_key: false,
    };
    let pems = Pems { cert: cert_pem.to_vec(), key: key_pem.to_vec(), client_ca: Some(client_ca_pem.to_vec()) };
    let digest = pems.digest();
    Ok(build(&files, &pems, digest)?.config)
}

/// What [`ServerTls::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
// Returned once per reload (seconds apart): its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum TlsReload {
    /// The files hold the running set.
    Unchanged,
    /// A new set was validated and swapped in for new handshakes.
    Swapped {
        /// The certificate before.
        previous: CertInfo,
        /// The certificate now.
        current: CertInfo,
        /// Client CAs trusted now and not before (subject and serial).
        client_cas_added: Vec<String>,
        /// Client CAs trusted before and not now.
        client_cas_removed: Vec<String>,
    },
}

/// Why [`ServerTls::reload`] kept the running set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct TlsReloadError {
    /// What is wrong, naming the file.
    pub error: ConfigError,
    /// The files are as they were at the last refusal (a poll does not log
    /// it again).
    pub repeated: bool,
}

/// How many reloads a [`ServerTls`] has applied and refused since it was
/// loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsReloadCounts {
    /// New sets swapped in.
    pub applied: u64,
    /// Changed sets refused (the running one kept), each content once: a
    /// broken set the poll finds again, or SIGHUP re-reads, is not counted
    /// again, as it is not logged again by the poll.
    pub rejected: u64,
}

/// What started a reload: it decides what is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// An operator (SIGHUP): every outcome is logged.
    Signal,
    /// The periodic check: a swap, and a broken set once per content.
    Poll,
}

/// A server TLS identity loaded from [`TlsFiles`], reloadable while
/// serving; see the [module docs](self).
pub struct ServerTls {
    files: TlsFiles,
    current: ArcSwap<Loaded>,
    /// The content (or read error) of the last set refused. The lock also
    /// makes reloads run one at a time.
    refused: Mutex<Option<Vec<u8>>>,
    /// Wakes the watcher after a swap.
    swapped: tokio::sync::Notify,
    /// Reloads applied and refused (see [`TlsReloadCounts`]).
    applied: AtomicU64,
    rejected: AtomicU64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("certificate", &self.current.load().cert)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and validates the files (at start-up: an error stops the
    /// server before it listens, naming the file).
    pub fn load(files: TlsFiles) -> Result<Self, ConfigError> {
        let (pems, digest) = Pems::read_stable(&files)?;
        let loaded = build(&files, &pems, digest)?;
        Ok(Self {
            files,
            current: ArcSwap::from_pointee(loaded),
            refused: Mutex::new(None),
            swapped: tokio::sync::Notify::new(),
            applied: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// The files this identity comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration new handshakes use now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.load().config)
    }

    /// The running leaf certificate.
    pub fn certificate(&self) -> CertInfo {
        self.current.load().cert.clone()
    }

    /// Reloads applied and refused since start.
    pub fn reload_counts(&self) -> TlsReloadCounts {
        TlsReloadCounts {
            applied: self.applied.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Re-reads the files; when their content differs from the running
    /// set, validates it and swaps it in for new handshakes. A broken set
    /// (unreadable file, key not the certificate's, key file readable by
    /// others, client CA that does not parse) keeps the running one.
    pub fn reload(&self) -> Result<TlsReload, TlsReloadError> {
        let refuse = |refused: &mut Option<Vec<u8>>, fingerprint: Vec<u8>, error: ConfigError| {
            let repeated = refused.as_ref() == Some(&fingerprint);
            if !repeated {
                self.rejected.fetch_add(1, Ordering::Relaxed);
            }
            *refused = Some(fingerprint);
            TlsReloadError { error, repeated }
        };
        let mut refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (pems, digest) = match Pems::read_stable(&self.files) {
            Ok(read) => read,
            Err(e) => return Err(refuse(&mut refused, e.to_string().into_bytes(), e)),
        };
        let previous = self.current.load_full();
        if digest == previous.digest {
            *refused = None;
            return Ok(TlsReload::Unchanged);
        }
        let loaded = build(&self.files, &pems, digest).map_err(|e| refuse(&mut refused, digest.to_vec(), e))?;
        // A replacement must be usable now: clients refuse a certificate
        // outside its validity, and the running one may still be good.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        if let Some(problem) = outside_validity(&loaded.cert, now) {
            let error = self.files.error("cert", &self.files.cert, problem);
            return Err(refuse(&mut refused, digest.to_vec(), error));
        }
        let current = loaded.cert.clone();
        let client_cas_added = loaded.client_cas.iter().filter(|c| !previous.client_cas.contains(c)).cloned().collect();
        let client_cas_removed =
            previous.client_cas.iter().filter(|c| !loaded.client_cas.contains(c)).cloned().collect();
        self.current.store(Arc::new(loaded));
        *refused = None;
        self.applied.fetch_add(1, Ordering::Relaxed);
        self.swapped.notify_one();
        Ok(TlsReload::Swapped { previous: previous.cert.clone(), current, client_cas_added, client_cas_removed })
    }

    /// [`ServerTls::reload`], logging the outcome as `trigger` calls for.
    pub fn reload_logged(&self, trigger: ReloadTrigger) -> Result<TlsReload, TlsReloadError> {
        let result = self.reload();
        let section = self.files.section.as_str();
        match &result {
            Ok(TlsReload::Swapped { previous, current, client_cas_added, client_cas_removed }) => {
                tracing::info!(
                    section,
                    serial = %current.serial,
                    subject = %current.subject,
                    not_after = %rfc3339(current.not_after),
                    previous_serial = %previous.serial,
                    "TLS files reloaded: new handshakes use the new certificate, key and client CA; open \
                     connections keep theirs"
                );
                // Who may connect, and as whom this server answers, changed:
                // worth a line of its own each.
                if !client_cas_added.is_empty() || !client_cas_removed.is_empty() {
                    tracing::warn!(
                        section,
                        added = ?client_cas_added,
                        removed = ?client_cas_removed,
                        "client CAs changed: client certificates are now checked against the new set"
                    );
                }
                if current.names != previous.names {
                    tracing::warn!(
                        section,
                        names = ?current.names,
                        previous_names = ?previous.names,
                        "the reloaded certificate names another identity than the one it replaces"
                    );
                }
            }
            Ok(TlsReload::Unchanged) if trigger == ReloadTrigger::Signal => {
                tracing::info!(section, "TLS files unchanged");
            }
            Ok(TlsReload::Unchanged) => {}
            Err(e) if trigger == ReloadTrigger::Signal || !e.repeated => tracing::error!(
                section,
                error = %e.error,
                "TLS files not reloaded: keeping the running certificate, key and client CA"
            ),
            Err(_) => {}
        }
        result
    }

    /// Checks the certificate's expiry now (logging it and, with
    /// `readiness`, setting the condition named after the section: an
    /// expired certificate makes the replica not ready), then, in a task
    /// until aborted: polls the files every `options.poll`, re-checks the
    /// expiry every [`EXPIRY_CHECK`] and after every swap. Without
    /// `readiness` an expired certificate is logged only.
    pub fn watch(
        self: &Arc<Self>,
        options: TlsWatch,
        clock: SharedClock,
        readiness: Option<Readiness>,
    ) -> tokio::task::JoinHandle<()> {
        let mut report = ExpiryReport::new(self.files.section.clone(), options.warn_before, readiness);
        report.check(&self.certificate(), unix(&clock));
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut poll = options.poll.map(|every| {
                let mut i = tokio::time::interval_at(start + every, every);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            let mut expiry = tokio::time::interval_at(start + EXPIRY_CHECK, EXPIRY_CHECK);
            expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = async {
                        match poll.as_mut() {
                            Some(i) => i.tick().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        // Small files, but a slow volume must not hold a
                        // runtime thread. The logs go where this task's go.
                        let t = Arc::clone(&tls);
                        let logs = tracing::dispatcher::get_default(Clone::clone);
                        let _ = tokio::task::spawn_blocking(move || {
                            tracing::dispatcher::with_default(&logs, || t.reload_logged(ReloadTrigger::Poll))
                        })
                        .await;
                    }
                    _ = expiry.tick() => {}
                    () = tls.swapped.notified() => {}
                }
                report.check(&tls.certificate(), unix(&clock));
            }
        })
    }
}

/// How far in the future a replacement's `notBefore` may lie (clock skew
/// between the issuer and this host).
const NOT_BEFORE_SKEW_SECS: i64 = 300;

/// Why `cert` cannot be served at `now`, if it cannot.
fn outside_validity(cert: &CertInfo, now: i64) -> Option<String> {
    if now > cert.not_after {
        return Some(format!(
            "the new certificate (serial {}) expired at {}: keeping the running one; install a renewed certificate",
            cert.serial,
            rfc3339(cert.not_after)
        ));
    }
    if cert.not_before > now + NOT_BEFORE_SKEW_SECS {
        return Some(format!(
            "the new certificate (serial {}) is not valid before {}: keeping the running one; check the issuer's \
             clock or wait",
            cert.serial,
            rfc3339(cert.not_before)
        ));
    }
    None
}

fn unix(clock: &SharedClock) -> i64 {
    i64::try_from(clock.now_unix()).unwrap_or(i64::MAX)
}

/// How often the watcher compares the certificate's `notAfter` with the
/// clock.
pub const EXPIRY_CHECK: Duration = Duration::from_secs(60);
/// How often a warning about a certificate near or past its expiry is
/// repeated while it lasts.
pub const EXPIRY_REPEAT: Duration = Duration::from_secs(3_600);

/// What [`ServerTls::watch`] does besides its first check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsWatch {
    /// How often the files are re-read; `None`: only on SIGHUP.
    pub poll: Option<Duration>,
    /// Warn while less than this is left before `notAfter` (zero: never).
    pub warn_before: Duration,
}

impl TlsWatch {
    /// `tls.reload_check_secs` and `tls.expiry_warn_days`, which apply to
    /// the side port's `[http_tls]` files too.
    pub fn from_config(cfg: &TlsConfig) -> Self {
        Self {
            poll: (cfg.reload_check_secs > 0).then(|| Duration::from_secs(cfg.reload_check_secs)),
            warn_before: Duration::from_secs(cfg.expiry_warn_days.saturating_mul(86_400)),
        }
    }
}

/// How a certificate stands against the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// More than the warning threshold left.
    Valid,
    /// Less than the warning threshold left.
    Soon,
    /// Past `notAfter`.
    Expired,
}

impl Expiry {
    /// Where `cert` stands at `now` with a warning threshold of
    /// `warn_before`.
    pub fn of(cert: &CertInfo, now: i64, warn_before: Duration) -> Self {
        let warn = i64::try_from(warn_before.as_secs()).unwrap_or(i64::MAX);
        if now > cert.not_after {
            Self::Expired
        } else if cert.not_after.saturating_sub(now) < warn {
            Self::Soon
        } else {
            Self::Valid
        }
    }
}

/// Logs a certificate's expiry (once per certificate, and hourly while it
/// is near or past) and keeps the readiness condition, if any, in step.
struct ExpiryReport {
    section: String,
    warn_before: Duration,
    readiness: Option<Readiness>,
    /// The serial and state last logged, and when.
    last: Option<(String, Expiry, i64)>,
}

impl ExpiryReport {
    fn new(section: String, warn_before: Duration, readiness: Option<Readiness>) -> Self {
        Self { section, warn_before, readiness, last: None }
    }

    fn check(&mut self, cert: &CertInfo, now: i64) -> Expiry {
        let state = Expiry::of(cert, now, self.warn_before);
        let section = self.section.as_str();
        let not_after = rfc3339(cert.not_after);
        match &self.readiness {
            Some(readiness) if state == Expiry::Expired => readiness.set_not_ready(
                section,
                format!("server certificate ({section}.cert, serial {}) expired at {not_after}", cert.serial),
            ),
            Some(readiness) => readiness.set_ready(section),
            None => {}
        }
        let repeat = i64::try_from(EXPIRY_REPEAT.as_secs()).unwrap_or(i64::MAX);
        let due = match &self.last {
            None => true,
            Some((serial, last, at)) => {
                serial != &cert.serial || *last != state || (state != Expiry::Valid && now - at >= repeat)
            }
        };
        if !due {
            return state;
        }
        self.last = Some((cert.serial.clone(), state, now));
        let days_left = (cert.not_after - now) / 86_400;
        let serial = cert.serial.as_str();
        match state {
            Expiry::Valid => tracing::info!(section, serial, not_after, days_left, "server certificate in use"),
            Expiry::Soon => tracing::warn!(
                section,
                serial,
                not_after,
                days_left,
                warn_days = self.warn_before.as_secs() / 86_400,
                "server certificate expires soon: renew it (the files are re-read when they change, or on SIGHUP)"
            ),
            Expiry::Expired if self.readiness.is_some() => tracing::error!(
                section,
                serial,
                not_after,
                "server certificate has expired: not ready (/readyz 503, gRPC health NOT_SERVING); clients refuse \
                 new connections until it is renewed"
            ),
            Expiry::Expired => tracing::error!(
                section,
                serial,
                not_after,
                "server certificate has expired: clients refuse new connections to this port until it is renewed \
                 (readiness unchanged)"
            ),
        }
        state
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn expiry_states_follow_the_threshold() {
        let cert = CertInfo {
            subject: String::new(),
            serial: "01".into(),
            not_before: 0,
            not_after: 100 * 86_400,
            names: vec![],
        };
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(Expiry::of(&cert, 0, week), Expiry::Valid);
        assert_eq!(Expiry::of(&cert, 93 * 86_400, week), Expiry::Valid);
        assert_eq!(Expiry::of(&cert, 93 * 86_400 + 1, week), Expiry::Soon);
        assert_eq!(Expiry::of(&cert, 100 * 86_400, week), Expiry::Soon);
        assert_eq!(Expiry::of(&cert, 100 * 86_400 + 1, week), Expiry::Expired);
        assert_eq!(Expiry::of(&cert, 99 * 86_400, Duration::ZERO), Expiry::Valid);
    }

    #[test]
    fn an_expired_certificate_raises_the_readiness_condition_and_a_new_one_clears_it() {
        let readiness = Readiness::new();
        let mut report = ExpiryReport::new("tls".into(), Duration::from_secs(86_400), Some(readiness.clone()));
        let old =
            CertInfo { subject: String::new(), serial: "0a".into(), not_before: 0, not_after: 1_000, names: vec![] };
        assert_eq!(report.check(&old, 500), Expiry::Soon);
        assert!(readiness.is_ready());
        assert_eq!(report.check(&old, 1_001), Expiry::Expired);
        assert_eq!(
            readiness.reasons(),
            ["tls: server certificate (tls.cert, serial 0a) expired at 1970-01-01T00:16:40Z"]
        );
        let new = CertInfo { serial: "0b".into(), not_after: 1_000_000, ..old };
        assert_eq!(report.check(&new, 1_002), Expiry::Valid);
        assert!(readiness.is_ready());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_naming_both() {
        let ca = crate::dev::pki::Ca::generate("test CA").unwrap();
        let a = ca.server_cert("auth.dev", &[]).unwrap();
        let b = ca.server_cert("auth.dev", &[]).unwrap();
        let err =
            server_config_from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes(), ca.cert_pem.as_bytes()).unwrap_err();
        assert_eq!(err.key, "tls.key");
        assert!(err.problem.contains("does not match the certificate in tls.cert"), "{err}");
        server_config_from_pem(a.cert_pem.as_bytes(), a.key_pem.as_bytes(), ca.cert_pem.as_bytes()).unwrap();
    }

    #[test]
    fn a_replacement_outside_its_validity_is_named_and_one_inside_passes() {
        let cert = CertInfo {
            subject: String::new(),
            serial: "0c".into(),
            not_before: 1_000,
            not_after: 2_000,
            names: vec!["DNS:localhost".into()],
        };
        assert_eq!(outside_validity(&cert, 1_500), None);
        assert_eq!(outside_validity(&cert, 1_000 - NOT_BEFORE_SKEW_SECS), None, "within the skew allowed");
        let early = outside_validity(&cert, 1_000 - NOT_BEFORE_SKEW_SECS - 1).unwrap();
        assert!(early.contains("not valid before 1970-01-01T00:16:40Z"), "{early}");
        let late = outside_validity(&cert, 2_001).unwrap();
        assert!(late.contains("expired at 1970-01-01T00:33:20Z"), "{late}");
    }
}
