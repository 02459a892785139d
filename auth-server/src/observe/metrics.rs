//! Prometheus metrics, through the `metrics` facade.
//!
//! The binary installs a [`PrometheusRecorder`](metrics_exporter_prometheus::PrometheusRecorder)
//! as the process's global recorder ([`install_prometheus`]) and gives its
//! handle to the server builder, which serves `GET /metrics` on the HTTP
//! side port ([`router`]). A library user embedding the server may install
//! its own recorder instead (the server's metrics then go there) or none
//! (they cost next to nothing); without a handle the server has no
//! `/metrics` route.
//!
//! Every series and its labels ([`describe`] holds the list):
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `auth_rpc_requests_total` | counter | `method`, `code` |
//! | `auth_rpc_duration_seconds` | histogram | `method`, `code` |
//! | `auth_tokens_issued_total` | counter | `grant`, `alg` |
//! | `auth_denials_total` | counter | `rpc`, `reason` |
//! | `auth_revocations_total` | counter | `kind` |
//! | `auth_refresh_reuse_detected_total` | counter | |
//! | `auth_store_operation_duration_seconds` | histogram | `op` |
//! | `auth_store_operation_errors_total` | counter | `op` |
//! | `auth_store_subscription_up` | gauge | |
//! | `auth_deny_set_current` | gauge | |
//! | `auth_password_queue_depth`, `auth_password_queue_capacity` | gauge | |
//! | `auth_watch_streams` | gauge | |
//! | `auth_deny_list_entries` | gauge | `kind` |
//! | `auth_published_keys` | gauge | `kid`, `alg` |
//! | `auth_tls_certificate_expiry_timestamp_seconds` | gauge | `port` |
//! | `auth_tls_reloads_total` | counter | `port`, `outcome` |
//! | `auth_audit_lines_dropped_total` | counter | |
//!
//! Per-event counters are registered once and kept in tables indexed by
//! their fixed labels, so counting an event allocates nothing and looks
//! nothing up by name.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use super::{DenyReason, Event, Events, PublishedKey, Rpc, alg_label, published_keys};
use crate::core::AuthCore;
use crate::grant::GrantKind;
use crate::store::{DenyListSize, RevocationKind};
use crate::tls::ServerTls;

/// Counter of finished RPCs.
pub const RPC_REQUESTS: &str = "auth_rpc_requests_total";
/// Histogram of RPC latency (request to end of response).
pub const RPC_DURATION: &str = "auth_rpc_duration_seconds";
/// Counter of issued access tokens.
pub const TOKENS_ISSUED: &str = "auth_tokens_issued_total";
/// Counter of refused calls.
pub const DENIALS: &str = "auth_denials_total";
/// Counter of revocations made durable by Revoke.
pub const REVOCATIONS: &str = "auth_revocations_total";
/// Counter of refresh-token reuse detections.
pub const REFRESH_REUSE: &str = "auth_refresh_reuse_detected_total";
/// Histogram of store operation latency.
pub const STORE_DURATION: &str = "auth_store_operation_duration_seconds";
/// Counter of failed store operations.
pub const STORE_ERRORS: &str = "auth_store_operation_errors_total";
/// Gauge: the store's revocation subscription is live (1) or not (0).
pub const STORE_SUBSCRIPTION_UP: &str = "auth_store_subscription_up";
/// Gauge: whether the replica's own deny set answers checks (1) or they
/// fail closed (0).
pub const DENY_SET_CURRENT: &str = "auth_deny_set_current";
/// Gauge: password checks waiting for a thread.
pub const PASSWORD_QUEUE_DEPTH: &str = "auth_password_queue_depth";
/// Gauge: the password queue's capacity.
pub const PASSWORD_QUEUE_CAPACITY: &str = "auth_password_queue_capacity";
/// Gauge: open WatchRevocations streams.
pub const WATCH_STREAMS: &str = "auth_watch_streams";
/// Gauge: deny-list entries by kind.
pub const DENY_LIST_ENTRIES: &str = "auth_deny_list_entries";
/// Gauge: published keys (1), and keys published earlier in this process's
/// life and since retired (0).
pub const PUBLISHED_KEYS: &str = "auth_published_keys";

/// Gauge: the `notAfter` of the certificate a port serves, Unix seconds.
pub const TLS_CERT_EXPIRY: &str = "auth_tls_certificate_expiry_timestamp_seconds";
/// Counter: TLS file reloads, by port and outcome (`applied`, `rejected`).
pub const TLS_RELOADS: &str = "auth_tls_reloads_total";

/// How long `/metrics` reuses a deny-list count before reading it again
/// (see [`Scrape::deny_list_ttl`]).
pub const DENY_LIST_TTL: Duration = Duration::from_secs(15);

/// Latency buckets (seconds) of the RPC histogram: 0.5 ms to 10 s.
pub const RPC_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Latency buckets (seconds) of the store histogram: 100 µs to 5 s.
pub const STORE_BUCKETS: [f64; 13] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Describes every metric (HELP text) to the installed recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(RPC_REQUESTS, "gRPC calls finished, by method and gRPC status code");
    describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "gRPC call latency from request to end of response, by method and gRPC status code"
    );
    describe_counter!(TOKENS_ISSUED, "Access tokens issued, by grant and signing algorithm");
    describe_counter!(DENIALS, "Calls refused, by RPC and reason");
    describe_counter!(REVOCATIONS, "Revocations made durable by Revoke, by kind (jti, session, family)");
    describe_counter!(
        super::audit::LINES_DROPPED,
        "Audit lines dropped because the audit sink stalled (its queue was full)"
    );
    describe_counter!(REFRESH_REUSE, "Spent refresh tokens presented again (each revoked its family)");
    describe_histogram!(STORE_DURATION, Unit::Seconds, "State store operation latency, by operation");
    describe_counter!(STORE_ERRORS, "State store operations that failed, by operation");
    describe_gauge!(STORE_SUBSCRIPTION_UP, "1 while the store's revocation subscription is live, else 0");
    describe_gauge!(
        DENY_SET_CURRENT,
        "1 while the replica's own deny set is current (presented tokens are checked), 0 while those checks fail \
         closed with UNAVAILABLE"
    );
    describe_gauge!(PASSWORD_QUEUE_DEPTH, "Password checks waiting for a password thread");
    describe_gauge!(PASSWORD_QUEUE_CAPACITY, "Password checks that may wait before Login is refused");
    describe_gauge!(WATCH_STREAMS, "Open WatchRevocations streams on this replica");
    describe_gauge!(DENY_LIST_ENTRIES, "Entries on the deny list, by kind (jti, session, family)");
    describe_gauge!(PUBLISHED_KEYS, "Keys in the published key set (1), or retired since start (0), by kid and alg");
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "notAfter of the server certificate each port serves now, as Unix seconds, by port (grpc, http)"
    );
    describe_counter!(
        TLS_RELOADS,
        "TLS file sets found changed, by port and outcome (applied: serving new connections; rejected: broken, the \
         running set kept)"
    );
}

/// Builds the Prometheus recorder (histogram buckets for the latency
/// metrics, no HTTP listener) and installs it as the process's global
/// recorder. Fails, without panicking, when a recorder is already
/// installed.
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(RPC_DURATION.into()), &RPC_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STORE_DURATION.into()), &STORE_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

const GRANTS: [GrantKind; 4] =
    [GrantKind::Password, GrantKind::ClientCredentials, GrantKind::Exchange, GrantKind::Refresh];
const ALGS: [&str; 5] = ["ES256", "EdDSA", "RS256", "PS256", "other"];

fn grant_index(g: GrantKind) -> usize {
    match g {
        GrantKind::Password => 0,
        GrantKind::ClientCredentials => 1,
        GrantKind::Exchange => 2,
        GrantKind::Refresh => 3,
    }
}

fn alg_index(alg: &str) -> usize {
    ALGS.iter().position(|a| *a == alg).unwrap_or(ALGS.len() - 1)
}

/// The label of a revocation kind, as Revoke's response names it.
pub fn kind_label(kind: RevocationKind) -> &'static str {
    match kind {
        RevocationKind::Jti => "jti",
        RevocationKind::Sid => "session",
        RevocationKind::Family => "family",
    }
}

fn kind_index(kind: RevocationKind) -> usize {
    match kind {
        RevocationKind::Jti => 0,
        RevocationKind::Sid => 1,
        RevocationKind::Family => 2,
    }
}

const KINDS: [RevocationKind; 3] = [RevocationKind::Jti, RevocationKind::Sid, RevocationKind::Family];

/// A table of counters, each registered on first use.
struct Lazy<const N: usize>([OnceLock<Counter>; N]);

impl<const N: usize> Lazy<N> {
    fn new() -> Self {
        Self(std::array::from_fn(|_| OnceLock::new()))
    }

    fn get(&self, i: usize, register: impl FnOnce() -> Counter) -> Option<&Counter> {
        Some(self.0.get(i)?.get_or_init(register))
    }
}

const ISSUED_CELLS: usize = GRANTS.len() * ALGS.len();
const DENIAL_CELLS: usize = Rpc::ALL.len() * DenyReason::ALL.len();

/// The metrics sink of the event port: counts issued tokens, denials,
/// revocations and reuse detections.
pub struct EventMetrics {
    issued: Lazy<ISSUED_CELLS>,
    denials: Lazy<DENIAL_CELLS>,
    revocations: Lazy<3>,
    reuse: Counter,
    /// The encoded header of the last token seen, and its `alg`: every token
    /// a key signs has the same header, so the `alg` is read once per key.
    last_header: ArcSwapOption<(Box<str>, &'static str)>,
}

impl std::fmt::Debug for EventMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventMetrics").finish_non_exhaustive()
    }
}

impl Default for EventMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EventMetrics {
    /// Registers with the recorder installed now (a no-op without one).
    pub fn new() -> Self {
        Self {
            issued: Lazy::new(),
            denials: Lazy::new(),
            revocations: Lazy::new(),
            reuse: metrics::counter!(REFRESH_REUSE),
            last_header: ArcSwapOption::empty(),
        }
    }

    /// The `alg` label of a compact JWS the server signed.
    fn alg_of(&self, token: &str) -> &'static str {
        let Some((header, _)) = token.split_once('.') else { return "other" };
        if let Some(last) = &*self.last_header.load()
            && *last.0 == *header
        {
            return last.1;
        }
        let alg = super::jws_header(token).map_or("other", |h| alg_label(&h.alg));
        self.last_header.store(Some(Arc::new((header.into(), alg))));
        alg
    }
}

impl Events for EventMetrics {
    fn emit(&self, event: &Event<'_>) {
        match event {
            Event::Issued { issued, .. } => {
                let (grant, alg) = (issued.kind, self.alg_of(&issued.access.token));
                let cell = grant_index(grant) * ALGS.len() + alg_index(alg);
                let register = || metrics::counter!(TOKENS_ISSUED, "grant" => grant.as_str(), "alg" => alg);
                if let Some(c) = self.issued.get(cell, register) {
                    c.increment(1);
                }
            }
            Event::Denied { rpc, reason, .. } => {
                let cell = rpc.index() * DenyReason::ALL.len() + reason.index();
                let register = || metrics::counter!(DENIALS, "rpc" => rpc.as_str(), "reason" => reason.as_str());
                if let Some(c) = self.denials.get(cell, register) {
                    c.increment(1);
                }
            }
            Event::Revoked { revocation, .. } => {
                let kind = revocation.kind;
                let register = || metrics::counter!(REVOCATIONS, "kind" => kind_label(kind));
                if let Some(c) = self.revocations.get(kind_index(kind), register) {
                    c.increment(1);
                }
            }
            Event::RefreshReuse { .. } => self.reuse.increment(1),
            // The published keys are read at scrape time, so a key set that
            // changes without a reload (Transit rotation) shows too.
            Event::KeysLoaded { .. } => {}
        }
    }
}

/// Open WatchRevocations streams, read at scrape time.
pub type StreamCount = Arc<dyn Fn() -> usize + Send + Sync>;

/// The port a [`ServerTls`] serves: the `port` label of the TLS metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPort {
    /// The gRPC port (`[tls]`).
    Grpc,
    /// The HTTP side port (`[http_tls]`).
    Http,
}

impl TlsPort {
    /// The label value: `grpc` or `http`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }
}

/// The TLS series of one port, set from its [`ServerTls`] at each scrape.
struct TlsSeries {
    tls: Arc<ServerTls>,
    expiry: Gauge,
    applied: Counter,
    rejected: Counter,
}

/// What `/metrics` renders: the recorder's handle, and the gauges read when
/// it is scraped (store subscription, password queue, watch streams, deny
/// list, published keys, and the TLS series of each port given with
/// [`Scrape::with_tls`]).
pub struct Scrape {
    handle: PrometheusHandle,
    core: Arc<AuthCore>,
    watch_streams: StreamCount,
    subscription_up: Gauge,
    deny_set_current: Gauge,
    queue_depth: Gauge,
    queue_capacity: Gauge,
    streams: Gauge,
    deny: [Gauge; 3],
    /// The last deny-list read and when it was taken. The lock is held
    /// across the read, so concurrent scrapes wait for one read and share it.
    deny_cache: tokio::sync::Mutex<Option<(Instant, Option<DenyListSize>)>>,
    deny_ttl: Duration,
    /// Every key published since start, so a retired one is set to 0.
    keys_seen: Mutex<BTreeSet<PublishedKey>>,
    tls: Vec<TlsSeries>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Scrape {
    /// Reads the gauges of `core` and `watch_streams` at each scrape and
    /// renders `handle`.
    pub fn new(handle: PrometheusHandle, core: Arc<AuthCore>, watch_streams: StreamCount) -> Self {
        Self {
            handle,
            core,
            watch_streams,
            subscription_up: metrics::gauge!(STORE_SUBSCRIPTION_UP),
            deny_set_current: metrics::gauge!(DENY_SET_CURRENT),
            queue_depth: metrics::gauge!(PASSWORD_QUEUE_DEPTH),
            queue_capacity: metrics::gauge!(PASSWORD_QUEUE_CAPACITY),
            streams: metrics::gauge!(WATCH_STREAMS),
            deny: KINDS.map(|k| metrics::gauge!(DENY_LIST_ENTRIES, "kind" => kind_label(k))),
            deny_cache: tokio::sync::Mutex::new(None),
            deny_ttl: DENY_LIST_TTL,
            keys_seen: Mutex::new(BTreeSet::new()),
            tls: Vec::new(),
        }
    }

    /// Also reports `tls`, the TLS identity `port` serves: its certificate's
    /// `notAfter` and its reloads by outcome, read at each scrape (so a
    /// reload, by poll or SIGHUP, shows at the next one).
    pub fn with_tls(mut self, port: TlsPort, tls: Arc<ServerTls>) -> Self {
        let port = port.as_str();
        self.tls.push(TlsSeries {
            tls,
            expiry: metrics::gauge!(TLS_CERT_EXPIRY, "port" => port),
            applied: metrics::counter!(TLS_RELOADS, "port" => port, "outcome" => "applied"),
            rejected: metrics::counter!(TLS_RELOADS, "port" => port, "outcome" => "rejected"),
        });
        self
    }

    /// Reuses a deny-list count for `ttl` (default [`DENY_LIST_TTL`]; zero
    /// reads it at every scrape).
    pub fn deny_list_ttl(mut self, ttl: Duration) -> Self {
        self.deny_ttl = ttl;
        self
    }

    /// The deny-list count: the last read while younger than the TTL, else
    /// a new one (`None` when the store cannot count or the read failed).
    /// Concurrent scrapes share one read; a failed read is reused too, so a
    /// failing store is not asked at every scrape.
    async fn deny_list_size(&self) -> Option<DenyListSize> {
        let mut last = self.deny_cache.lock().await;
        if let Some((at, size)) = *last
            && at.elapsed() < self.deny_ttl
        {
            return size;
        }
        let core = &self.core;
        let size = match core.store.deny_list_size(core.clock.now_unix()).await {
            Ok(size) => size,
            Err(e) => {
                tracing::debug!(error = %e, "deny-list size not read for /metrics");
                None
            }
        };
        *last = Some((Instant::now(), size));
        size
    }

    /// Updates the polled gauges. The deny-list count is one bounded store
    /// read, reused for the TTL (skipped, keeping the last value, when the
    /// store fails).
    pub async fn refresh(&self) {
        let core = &self.core;
        self.subscription_up.set(if core.store.feed_state().borrow().live { 1.0 } else { 0.0 });
        self.deny_set_current.set(if core.revocations.is_current() { 1.0 } else { 0.0 });
        let pool = core.passwords.stats();
        self.queue_depth.set(pool.waiting as f64);
        self.queue_capacity.set(pool.capacity as f64);
        self.streams.set((self.watch_streams)() as f64);
        for series in &self.tls {
            series.expiry.set(series.tls.certificate().not_after as f64);
            let counts = series.tls.reload_counts();
            series.applied.absolute(counts.applied);
            series.rejected.absolute(counts.rejected);
        }
        if let Some(size) = self.deny_list_size().await {
            for (gauge, n) in self.deny.iter().zip([size.jti, size.sid, size.family]) {
                gauge.set(n as f64);
            }
        }
        let now: BTreeSet<PublishedKey> = published_keys(&core.policy().keys.public_keys()).into_iter().collect();
        let mut seen = self.keys_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.extend(now.iter().cloned());
        for key in seen.iter() {
            let up = if now.contains(key) { 1.0 } else { 0.0 };
            metrics::gauge!(PUBLISHED_KEYS, "kid" => key.kid.clone(), "alg" => key.alg).set(up);
        }
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets every `every`, so they
    /// are bounded when nobody scrapes. Runs until the task is aborted.
    pub fn spawn_upkeep(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    }
}

/// The Prometheus text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`, to be merged into the side port's router.
pub fn router(scrape: Arc<Scrape>) -> Router {
    Router::new().route("/metrics", get(serve_metrics)).with_state(scrape)
}

async fn serve_metrics(State(scrape): State<Arc<Scrape>>) -> impl IntoResponse {
    scrape.refresh().await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], scrape.render())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn label_tables_cover_every_value() {
        for g in GRANTS {
            assert_eq!(GRANTS[grant_index(g)], g);
        }
        for (i, a) in ALGS.iter().enumerate() {
            assert_eq!(alg_index(a), i);
        }
        assert_eq!(alg_index("HS256"), ALGS.len() - 1);
        for k in KINDS {
            assert_eq!(KINDS[kind_index(k)], k);
        }
        assert_eq!(kind_label(RevocationKind::Sid), "session");
    }

    #[test]
    fn a_second_recorder_is_refused_without_panicking() {
        // The first install may lose to another test of this process; the
        // second always finds a recorder in place.
        let _ = install_prometheus();
        assert!(install_prometheus().is_err());
    }

    #[test]
    fn the_alg_of_a_token_is_read_once_per_header() {
        use base64::Engine as _;
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let m = EventMetrics::new();
        let es = enc(r#"{"alg":"ES256","kid":"a"}"#);
        let ed = enc(r#"{"alg":"EdDSA","kid":"b"}"#);
        assert_eq!(m.alg_of(&format!("{es}.x.y")), "ES256");
        assert_eq!(m.alg_of(&format!("{es}.z.w")), "ES256");
        assert_eq!(m.alg_of(&format!("{ed}.x.y")), "EdDSA");
        assert_eq!(m.alg_of("garbage"), "other");
    }
}
