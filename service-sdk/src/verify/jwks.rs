//! Where verification keys come from, and the cache that holds them.
//!
//! Sources: `GetJwks` over the mTLS channel to the auth service (the
//! default), an `https://` URL, or a fixed set. There is no plaintext
//! source.
//!
//! The cache loads at start-up, retrying with backoff until the auth
//! service answers; refreshes in the background; refetches on an unknown
//! `kid` at most once per [`JwksOptions::min_refetch_interval`]; and keeps
//! the last good keys whenever a fetch fails.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use auth_proto::auth::v1::GetJwksRequest;
use auth_proto::auth::v1::auth_client::AuthClient;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::keys::{KeyFingerprint, KeySet};
use super::observe::{JwksTrigger, VerifyEvent, VerifyObserver};
use crate::backoff::Backoff;

/// The largest JWK Set document accepted over HTTP.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why fetching the JWK Set failed. Messages carry no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The JWKS URL is not a valid `https://` URL with a host.
    #[error("invalid JWKS URL")]
    InvalidUrl,
    /// The JWKS URL is not `https://`. There is no plaintext mode: whoever
    /// can rewrite a JWKS in transit can mint tokens.
    #[error("refusing {0:?}: a JWKS URL must be https:// (there is no plaintext mode)")]
    NotHttps(String),
    /// The CA certificate for an `https://` source could not be parsed.
    #[error("invalid CA certificate: {0}")]
    BadCa(String),
    /// The connection or the request failed.
    #[error("JWKS transport error: {0}")]
    Transport(String),
    /// The HTTP server answered with a non-success status.
    #[error("JWKS endpoint answered HTTP {0}")]
    HttpStatus(u16),
    /// `GetJwks` failed: the auth server answered with a gRPC error, or the
    /// channel could not reach it (a TLS refusal names the server name
    /// expected and the names its certificate presents).
    #[error("GetJwks failed: {detail}")]
    Grpc {
        /// The status code.
        code: tonic::Code,
        /// The status's code, message and causes.
        detail: String,
    },
    /// The fetch did not complete within the configured timeout.
    #[error("JWKS fetch timed out")]
    Timeout,
    /// The document is not a JWK Set, or holds no usable key.
    #[error("JWK set unusable")]
    Unusable,
}

impl JwksError {
    /// A short stable label, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            JwksError::InvalidUrl => "invalid_url",
            JwksError::NotHttps(_) => "not_https",
            JwksError::BadCa(_) => "bad_ca",
            JwksError::Transport(_) => "transport",
            JwksError::HttpStatus(_) => "http_status",
            JwksError::Grpc { .. } => "grpc",
            JwksError::Timeout => "timeout",
            JwksError::Unusable => "unusable",
        }
    }
}

/// Where the verifier fetches its keys.
#[derive(Clone, Debug)]
pub struct JwksSource(Source);

#[derive(Clone)]
enum Source {
    Grpc(Channel),
    Https(Arc<HttpsJwks>),
    Fixed(Arc<KeySet>),
    #[cfg(test)]
    Scripted(Arc<Scripted>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Grpc(_) => f.write_str("Grpc"),
            Source::Https(h) => write!(f, "Https(https://{}:{}{})", h.host, h.port, h.path),
            Source::Fixed(k) => write!(f, "Fixed({} keys)", k.len()),
            #[cfg(test)]
            Source::Scripted(_) => f.write_str("Scripted"),
        }
    }
}

struct HttpsJwks {
    host: String,
    port: u16,
    path: String,
    authority: String,
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl JwksSource {
    /// `GetJwks` over an (mTLS) tonic channel to the auth service: the
    /// default, since the channel authenticates the server.
    pub fn grpc(channel: Channel) -> Self {
        Self(Source::Grpc(channel))
    }

    /// An HTTPS JWKS URL, trusting only the CA certificates in `ca_pem` (and
    /// checking the URL's host name against the certificate). Any other
    /// scheme is refused with [`JwksError::NotHttps`]: there is no plaintext
    /// JWKS source.
    pub fn https(url: &str, ca_pem: &str) -> Result<Self, JwksError> {
        if !url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
            return Err(JwksError::NotHttps(crate::client::shown_uri(url)));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| JwksError::BadCa(e.to_string()))?;
            roots.add(cert).map_err(|e| JwksError::BadCa(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(JwksError::BadCa("no certificate in PEM".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| JwksError::BadCa(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::parse_https(url, tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// A fixed key set that never changes (tests, benchmarks, air-gapped
    /// deployments).
    pub fn fixed(keys: KeySet) -> Self {
        Self(Source::Fixed(Arc::new(keys)))
    }

    fn parse_https(url: &str, connector: tokio_rustls::TlsConnector) -> Result<Self, JwksError> {
        let uri: http::Uri = url.parse().map_err(|_| JwksError::InvalidUrl)?;
        if uri.scheme_str() != Some("https") {
            return Err(JwksError::NotHttps(crate::client::shown_uri(url)));
        }
        let host = uri.host().ok_or(JwksError::InvalidUrl)?.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(JwksError::InvalidUrl);
        }
        let port = uri.port_u16().unwrap_or(443);
        let authority = uri.authority().map(|a| a.as_str().to_owned()).ok_or(JwksError::InvalidUrl)?;
        let path = uri.path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let name = ServerName::try_from(host.clone()).map_err(|_| JwksError::InvalidUrl)?;
        Ok(Self(Source::Https(Arc::new(HttpsJwks { host, port, path, authority, connector, name }))))
    }

    /// Fetches and parses the key set once.
    pub async fn fetch(&self) -> Result<KeySet, JwksError> {
        let json = match &self.0 {
            Source::Grpc(channel) => {
                let mut client = AuthClient::new(channel.clone());
                client
                    .get_jwks(GetJwksRequest {})
                    .await
                    .map_err(|s| JwksError::Grpc { code: s.code(), detail: crate::cause::status(&s) })?
                    .into_inner()
                    .jwks_json
            }
            Source::Https(h) => h.get().await?,
            Source::Fixed(keys) => return Ok(KeySet::clone(keys)),
            #[cfg(test)]
            Source::Scripted(s) => s.next()?,
        };
        let keys = KeySet::from_jwks_json(&json).map_err(|_| JwksError::Unusable)?;
        if keys.is_empty() {
            return Err(JwksError::Unusable);
        }
        Ok(keys)
    }
}

impl HttpsJwks {
    async fn get(&self) -> Result<String, JwksError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| JwksError::Transport(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        // A refused certificate's text names the host expected and the
        // names the certificate presents.
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| JwksError::Transport(crate::cause::chain(&e)))?;
        self.request(tls).await
    }

    async fn request<IO>(&self, io: IO) -> Result<String, JwksError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let transport = |e: hyper::Error| JwksError::Transport(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(transport)?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::ACCEPT, "application/jwk-set+json, application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|_| JwksError::InvalidUrl)?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        if !resp.status().is_success() {
            conn.abort();
            return Err(JwksError::HttpStatus(resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| JwksError::Transport(e.to_string()))?
            .to_bytes();
        conn.abort();
        String::from_utf8(body.to_vec()).map_err(|_| JwksError::Unusable)
    }
}

/// Timing of the key cache.
#[derive(Clone, Debug)]
pub struct JwksOptions {
    /// How often the keys are refetched in the background (default 5 min).
    pub refresh_interval: Duration,
    /// The least time between two refetches triggered by unknown `kid`s
    /// (default 5 s): random kids cannot flood the auth service.
    pub min_refetch_interval: Duration,
    /// First retry delay after a failed fetch (default 100 ms); doubles up
    /// to [`JwksOptions::max_backoff`].
    pub initial_backoff: Duration,
    /// Longest retry delay (default 10 s).
    pub max_backoff: Duration,
    /// Time limit of one fetch (default 5 s).
    pub fetch_timeout: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(300),
            min_refetch_interval: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// The live key set: last good keys, background refresh, rate-limited
/// refetch.
pub(crate) struct JwksCache {
    source: JwksSource,
    opts: JwksOptions,
    keys: ArcSwapOption<KeySet>,
    /// When the last unknown-kid refetch started; the lock makes refetches
    /// single-flight.
    last_refetch: Mutex<Option<Instant>>,
    loaded: watch::Sender<bool>,
    observer: Arc<dyn VerifyObserver>,
    /// Dropped with the cache, which stops the background task.
    _stop: watch::Sender<()>,
}

impl JwksCache {
    /// Creates the cache and spawns its loader on the current tokio runtime.
    /// Fetches are reported to `observer`.
    pub(crate) fn start(source: JwksSource, opts: JwksOptions, observer: Arc<dyn VerifyObserver>) -> Arc<Self> {
        let (stop, stopped) = watch::channel(());
        let (loaded, _) = watch::channel(false);
        let cache = Arc::new(Self {
            source,
            opts,
            keys: ArcSwapOption::empty(),
            last_refetch: Mutex::new(None),
            loaded,
            observer,
            _stop: stop,
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&cache), stopped));
        cache
    }

    /// The current keys, if any were ever loaded.
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// Whether the current key set holds the key with this fingerprint
    /// (the hit path of the verified-token cache: no reference count taken).
    pub(crate) fn holds(&self, fingerprint: KeyFingerprint) -> bool {
        self.keys.load().as_ref().is_some_and(|keys| keys.holds(fingerprint))
    }

    /// Puts fetched keys in use.
    fn store(&self, keys: KeySet, trigger: JwksTrigger) {
        self.observer.on_event(&VerifyEvent::JwksRefreshed { keys: keys.len(), trigger });
        self.keys.store(Some(Arc::new(keys)));
        self.loaded.send_replace(true);
    }

    /// Reports a failed fetch (the last good keys stay in use).
    fn failed(&self, error: &JwksError, trigger: JwksTrigger) {
        self.observer.on_event(&VerifyEvent::JwksRefreshFailed { error, trigger });
    }

    /// Waits until keys are known.
    pub(crate) async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    async fn fetch_once(&self) -> Result<KeySet, JwksError> {
        match tokio::time::timeout(self.opts.fetch_timeout, self.source.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(JwksError::Timeout),
        }
    }

    /// Refetches because a token named `kid`, which the cache does not
    /// hold. Single-flight, and at most once per `min_refetch_interval`;
    /// returns whether `kid` is known afterwards.
    pub(crate) async fn refetch_for(&self, kid: &str) -> bool {
        let mut last = self.last_refetch.lock().await;
        if self.current().is_some_and(|k| k.get(kid).is_some()) {
            return true; // another request's refetch brought it
        }
        if last.is_some_and(|t| t.elapsed() < self.opts.min_refetch_interval) {
            return false;
        }
        *last = Some(Instant::now());
        match self.fetch_once().await {
            Ok(keys) => {
                let known = keys.get(kid).is_some();
                tracing::info!(keys = keys.len(), "JWKS refetched for an unknown kid");
                self.store(keys, JwksTrigger::UnknownKid);
                known
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refetch failed; keeping the last good keys");
                self.failed(&e, JwksTrigger::UnknownKid);
                false
            }
        }
    }
}

async fn refresh_loop(cache: std::sync::Weak<JwksCache>, mut stopped: watch::Receiver<()>) {
    let mut backoff = match cache.upgrade() {
        Some(cache) => Backoff::new(cache.opts.initial_backoff, cache.opts.max_backoff),
        None => return,
    };
    loop {
        let delay = {
            let Some(cache) = cache.upgrade() else { return };
            let trigger = if cache.current().is_some() { JwksTrigger::Scheduled } else { JwksTrigger::Initial };
            let result = tokio::select! {
                r = cache.fetch_once() => r,
                _ = stopped.changed() => return,
            };
            match result {
                Ok(keys) => {
                    tracing::debug!(keys = keys.len(), "JWKS loaded");
                    cache.store(keys, trigger);
                    backoff.reset();
                    cache.opts.refresh_interval
                }
                Err(e) => {
                    cache.failed(&e, trigger);
                    let next = backoff.next_delay();
                    if cache.current().is_some() {
                        tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good keys");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?next, "JWKS not loaded yet; retrying");
                    }
                    next
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// A test source that answers from a script and counts fetches.
#[cfg(test)]
pub(crate) struct Scripted {
    pub(crate) fetches: std::sync::atomic::AtomicUsize,
    pub(crate) answer: std::sync::Mutex<Result<String, JwksError>>,
}

#[cfg(test)]
impl Scripted {
    fn next(&self) -> Result<String, JwksError> {
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.answer.lock().map_err(|_| JwksError::Unusable)?.clone()
    }
}

#[cfg(test)]
impl JwksSource {
    pub(crate) fn scripted(s: Arc<Scripted>) -> Self {
        Self(Source::Scripted(s))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::verify::observe::Recorder;
    use crate::verify::test_keys::TestKey;

    fn scripted(answer: Result<String, JwksError>) -> Arc<Scripted> {
        Arc::new(Scripted { fetches: 0.into(), answer: std::sync::Mutex::new(answer) })
    }

    fn set_answer(s: &Scripted, answer: Result<String, JwksError>) {
        *s.answer.lock().unwrap() = answer;
    }

    /// A cache on the scripted source, reporting to a recorder.
    fn start(s: &Arc<Scripted>, opts: JwksOptions) -> (Arc<JwksCache>, Arc<Recorder>) {
        let events = Arc::new(Recorder::default());
        (JwksCache::start(JwksSource::scripted(s.clone()), opts, events.clone()), events)
    }

    #[test]
    fn urls_must_be_https_with_a_host() {
        let ca = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap().cert.pem();
        let url = "http://127.0.0.1:8080/.well-known/jwks.json";
        assert_eq!(JwksSource::https(url, &ca).unwrap_err(), JwksError::NotHttps(url.into()));
        assert_eq!(JwksSource::https("ftp://x/jwks", &ca).unwrap_err(), JwksError::NotHttps("ftp://x/jwks".into()));
        assert_eq!(JwksSource::https("/jwks", &ca).unwrap_err(), JwksError::NotHttps("/jwks".into()));
        assert_eq!(JwksSource::https("https:///jwks", &ca).unwrap_err(), JwksError::InvalidUrl);
        assert!(JwksSource::https("https://127.0.0.1:8443/.well-known/jwks.json", &ca).is_ok());
        assert!(matches!(JwksSource::https("https://x/jwks", "not pem"), Err(JwksError::BadCa(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn load_retries_with_backoff_until_keys_arrive() {
        let key = TestKey::es256();
        let s = scripted(Err(JwksError::Transport("refused".into())));
        let cache = start(&s, JwksOptions::default()).0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(cache.current().is_none());
        let failed = s.fetches.load(Ordering::SeqCst);
        assert!(failed >= 3, "retried {failed} times");
        set_answer(&s, Ok(key.jwks_json()));
        cache.wait_loaded().await;
        assert_eq!(cache.current().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_the_last_good_keys() {
        let key = TestKey::es256();
        let s = scripted(Ok(key.jwks_json()));
        let opts = JwksOptions { refresh_interval: Duration::from_secs(10), ..JwksOptions::default() };
        let cache = start(&s, opts).0;
        cache.wait_loaded().await;
        set_answer(&s, Err(JwksError::HttpStatus(503)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(s.fetches.load(Ordering::SeqCst) > 3);
        assert!(cache.current().unwrap().get(&key.kid).is_some());
        set_answer(&s, Ok("{\"keys\":[]}".into()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(cache.current().unwrap().get(&key.kid).is_some(), "an empty set is not an update");
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kid_refetch_is_rate_limited() {
        let old = TestKey::es256();
        let new = TestKey::es256();
        let s = scripted(Ok(old.jwks_json()));
        let cache = start(&s, JwksOptions::default()).0;
        cache.wait_loaded().await;
        let base = s.fetches.load(Ordering::SeqCst);
        for i in 0..50 {
            assert!(!cache.refetch_for(&format!("random-{i}")).await);
        }
        assert_eq!(s.fetches.load(Ordering::SeqCst), base + 1, "one refetch for 50 random kids");
        set_answer(&s, Ok(new.jwks_json()));
        assert!(!cache.refetch_for(&new.kid).await, "still inside the interval");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(cache.refetch_for(&new.kid).await);
        assert_eq!(s.fetches.load(Ordering::SeqCst), base + 2);
        assert!(cache.refetch_for(&new.kid).await, "known now, no fetch needed");
        assert_eq!(s.fetches.load(Ordering::SeqCst), base + 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_fetch_is_reported_with_its_trigger() {
        let (old, new) = (TestKey::es256(), TestKey::es256());
        let s = scripted(Err(JwksError::Timeout));
        let opts = JwksOptions { refresh_interval: Duration::from_secs(10), ..JwksOptions::default() };
        let (cache, events) = start(&s, opts);
        // Fetches at 0 and 100 ms fail; the one at 300 ms succeeds.
        tokio::time::sleep(Duration::from_millis(150)).await;
        set_answer(&s, Ok(old.jwks_json()));
        cache.wait_loaded().await;
        assert_eq!(
            events.take(),
            [
                "JwksRefreshFailed { error: Timeout, trigger: Initial }",
                "JwksRefreshFailed { error: Timeout, trigger: Initial }",
                "JwksRefreshed { keys: 1, trigger: Initial }",
            ]
        );
        // The scheduled refresh at 10.3 s fails; its retry is due at 10.4 s.
        set_answer(&s, Err(JwksError::HttpStatus(503)));
        tokio::time::sleep(Duration::from_millis(10_050)).await;
        assert_eq!(events.take(), ["JwksRefreshFailed { error: HttpStatus(503), trigger: Scheduled }"]);
        set_answer(&s, Ok(json_of(&[&old, &new])));
        assert!(cache.refetch_for(&new.kid).await);
        assert_eq!(events.take(), ["JwksRefreshed { keys: 2, trigger: UnknownKid }"]);
    }

    fn json_of(keys: &[&TestKey]) -> String {
        serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
    }
}
