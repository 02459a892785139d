//! The service's own mTLS server: a rustls configuration built from the
//! same [`MtlsFiles`] as its channels, which follows rotated files, and
//! [`TlsIncoming`], the stream of accepted connections to hand to tonic.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt as _};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::TcpIncoming;

use crate::client::{Stamp, read_file};
use crate::{MtlsFiles, TlsError};

/// How often, at most, [`MtlsFiles::server_tls_config`] looks at the files.
const SERVER_TLS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a client may take to complete the TLS handshake on a
/// [`TlsIncoming`].
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in flight at most on one [`TlsIncoming`]; a connection over
/// it is closed at once, before any TLS work.
const MAX_HANDSHAKES: usize = 1024;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn material(path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError::Material { path: path.to_owned(), problem: problem.to_string() }
}

/// One consistent read of the three files.
struct Loaded {
    certified: Arc<CertifiedKey>,
    clients: Arc<dyn ClientCertVerifier>,
}

impl Loaded {
    fn read(files: &MtlsFiles, provider: &Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(&read_file(&files.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| material(&files.cert, format!("certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(material(&files.cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_slice(&read_file(&files.key)?)
            .map_err(|e| material(&files.key, format!("private key PEM: {e}")))?;
        let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            material(&files.key, format!("not the private key of the certificate in {}: {e}", files.cert.display()))
        })?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read_file(&files.ca)?) {
            let cert = cert.map_err(|e| material(&files.ca, format!("CA PEM: {e}")))?;
            roots.add(cert).map_err(|e| material(&files.ca, format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(material(&files.ca, "no CA certificate in the file"));
        }
        let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .build()
            .map_err(|e| material(&files.ca, format!("client CA: {e}")))?;
        Ok(Self { certified: Arc::new(certified), clients })
    }
}

/// When the files were last looked at, and what they were.
struct Check {
    next_at: Instant,
    /// The stamps of the set in use.
    loaded: [Option<Stamp>; 3],
    /// The stamps of a set that failed to load: not retried until the
    /// files change again.
    failed: Option<[Option<Stamp>; 3]>,
}

/// The certificate, key and client CA a server's handshakes use, re-read
/// when the files change.
struct Reloading {
    files: MtlsFiles,
    every: Duration,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
    check: Mutex<Check>,
}

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("files", &self.files).field("every", &self.every).finish_non_exhaustive()
    }
}

impl Reloading {
    fn new(files: &MtlsFiles, every: Duration) -> Result<Self, TlsError> {
        let provider = provider();
        let loaded = files.stamps();
        let current = Loaded::read(files, &provider)?;
        Ok(Self {
            files: files.clone(),
            every,
            provider,
            current: ArcSwap::from_pointee(current),
            check: Mutex::new(Check { next_at: Instant::now() + every, loaded, failed: None }),
        })
    }

    /// At most once per interval: when the files changed, read them and
    /// swap the new set in whole; a set that does not load (a key that is
    /// not the certificate's, a truncated PEM) keeps the running one. A
    /// handshake that finds another one checking goes on with the current
    /// set.
    fn maybe_reload(&self) {
        let Ok(mut check) = self.check.try_lock() else {
            return;
        };
        let now = Instant::now();
        if now < check.next_at {
            return;
        }
        check.next_at = now + self.every;
        let stamps = self.files.stamps();
        if stamps == check.loaded || check.failed == Some(stamps) {
            return;
        }
        match Loaded::read(&self.files, &self.provider) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                check.loaded = stamps;
                check.failed = None;
                tracing::info!(cert = %self.files.cert.display(), "server mTLS files changed; new handshakes use them");
            }
            Err(e) => {
                check.failed = Some(stamps);
                tracing::warn!(error = %e, "server mTLS files changed but do not load; keeping the running set");
            }
        }
    }
}

/// The server certificate of the current set.
#[derive(Debug)]
struct ReloadingCert(Arc<Reloading>);

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // The first step of every handshake: the client check that follows
        // uses the same, possibly just reloaded, set.
        self.0.maybe_reload();
        Some(Arc::clone(&self.0.current.load().certified))
    }
}

/// Client certificates checked by webpki against the CA of the current set.
#[derive(Debug)]
struct ReloadingClients(Arc<Reloading>);

impl ClientCertVerifier for ReloadingClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the CA may change under a borrowed slice.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.current.load().clients.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current.load().clients.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current.load().clients.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current.load().clients.supported_verify_schemes()
    }
}

impl MtlsFiles {
    /// The rustls configuration of this service's own mTLS server: it
    /// presents [`cert`](Self::cert) with [`key`](Self::key), requires a
    /// client certificate that chains to [`ca`](Self::ca), and offers ALPN
    /// `h2` (gRPC). Serve it with [`TlsIncoming`].
    ///
    /// It follows rotation on disk: at most once a second, a handshake looks at the three files'
    /// length, times and inode, and when any changed, reads and checks them
    /// and swaps the new set (certificate, key and client CA together) in
    /// for every handshake after it. Connections already open keep the
    /// certificate they were opened with. A set that does not load (a key
    /// that is not the certificate's, a truncated PEM, while a rotation is
    /// half-written) keeps the running one, logs why, and is tried again
    /// once the files change again. A Kubernetes Secret volume's symlink
    /// swap counts as a change.
    ///
    /// The files are checked now: one that is missing or unusable fails
    /// here, naming it ([`TlsError::Io`], [`TlsError::Material`]). The
    /// configuration uses the aws-lc-rs provider explicitly, whatever
    /// provider the process installed.
    pub fn server_tls_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_tls_config_every(SERVER_TLS_CHECK_INTERVAL)
    }

    /// Like [`server_tls_config`](Self::server_tls_config), looking at the
    /// files at most once per `every`.
    pub fn server_tls_config_every(&self, every: Duration) -> Result<Arc<ServerConfig>, TlsError> {
        let reloading = Arc::new(Reloading::new(self, every)?);
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&reloading.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| material(&self.cert, e))?
            .with_client_cert_verifier(Arc::new(ReloadingClients(Arc::clone(&reloading))))
            .with_cert_resolver(Arc::new(ReloadingCert(reloading)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The connections of a listener, after their TLS handshake: the stream to
/// give tonic's `serve_with_incoming` or `serve_with_incoming_shutdown`.
///
/// Handshakes run concurrently, so a slow or silent client never holds up
/// the accept loop; one that fails or takes longer than
/// 10 seconds is logged at debug level and dropped. At most 1024 run at
/// once; a connection over that is closed before
/// any TLS work. Accepted sockets get `TCP_NODELAY`. tonic puts the client's
/// verified certificate into each request's extensions, where
/// [`RequireAuthLayer`](crate::RequireAuthLayer) finds it (certificate-bound
/// tokens, trusted trace context).
///
/// ```no_run
/// # async fn serve(router: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
/// use service_sdk::{MtlsFiles, TlsIncoming};
/// let tls = MtlsFiles::new(".auth-dev/ca.pem", ".auth-dev/clients/inventory.pem", ".auth-dev/clients/inventory-key.pem");
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50062").await?;
/// tonic::transport::Server::builder()
///     .add_routes(router)
///     .serve_with_incoming(TlsIncoming::new(listener, tls.server_tls_config()?))
///     .await?;
/// # Ok(()) }
/// ```
pub struct TlsIncoming {
    inner: Pin<Box<dyn Stream<Item = io::Result<tokio_rustls::server::TlsStream<TcpStream>>> + Send>>,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIncoming").finish_non_exhaustive()
    }
}

impl TlsIncoming {
    /// Accepts on `listener` and completes each handshake with `config`
    /// (e.g. [`MtlsFiles::server_tls_config`]).
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Self {
        let state = Accepting {
            tcp: TcpIncoming::from(listener).with_nodelay(Some(true)),
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        };
        Self { inner: Box::pin(futures_util::stream::unfold(state, Accepting::next)) }
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<tokio_rustls::server::TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Accepting {
    tcp: TcpIncoming,
    acceptor: TlsAcceptor,
    /// Handshakes in flight; aborted when the stream is dropped.
    handshakes: JoinSet<Option<tokio_rustls::server::TlsStream<TcpStream>>>,
}

impl Accepting {
    /// The next connection whose handshake completed, or an accept error
    /// for tonic to judge (it goes on after one).
    async fn next(mut self) -> Option<(io::Result<tokio_rustls::server::TlsStream<TcpStream>>, Self)> {
        loop {
            tokio::select! {
                accepted = self.tcp.next() => match accepted {
                    Some(Ok(stream)) => {
                        if self.handshakes.len() >= MAX_HANDSHAKES {
                            tracing::debug!("too many TLS handshakes in flight; closing a new connection");
                            continue;
                        }
                        self.handshakes.spawn(handshake(self.acceptor.clone(), stream));
                    }
                    Some(Err(e)) => return Some((Err(e), self)),
                    None => return None,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(conn)) = done {
                        return Some((Ok(conn), self));
                    }
                }
            }
        }
    }
}

async fn handshake(acceptor: TlsAcceptor, stream: TcpStream) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let remote = stream.peer_addr().ok();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, ?remote, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?remote, "TLS handshake timed out");
            None
        }
    }
}
