//! Log volume an attacker cannot drive: repeated lines are sampled.
//!
//! Every failed Login logs a line, and so does each connection that the
//! HTTP/2 library closes for abuse (rapid reset). Left alone, a client sets
//! the rate of the server's log. [`SampledLogs`] is a `tracing` layer that
//! lets through the first [`SampledLogs::BURST`] INFO, WARN and ERROR
//! events of each call site per [`SampledLogs::INTERVAL`] and counts the
//! rest; [`SampledLogs::report`] (every interval, from
//! [`SampledLogs::spawn_reporter`]) logs one WARN per call site that had
//! lines suppressed, with how many. DEBUG and TRACE lines are not sampled:
//! whoever turns them on wants them all.
//!
//! Sampling sits at the subscriber, not in the flows' error mapping, so it
//! also covers the lines of the libraries (h2, hyper, tonic). The table is
//! keyed by call site, which the binary has a fixed number of.
//!
//! [`init`] installs the binary's subscriber: filter, sampling, the log
//! lines, and the OTLP span export of [`crate::telemetry`] when it is on.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::IsTerminal as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::config::LogFormat;
use crate::telemetry::OtelConfig;

/// The target of the "suppressed" lines (never sampled themselves).
pub const REPORT_TARGET: &str = "auth_server::logs";

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    admitted: u32,
    suppressed: u64,
}

/// Per key: the first `burst` events of each `interval` pass, the rest are
/// counted. Pure: time is passed in.
#[derive(Debug)]
pub struct Sampler<K> {
    burst: u32,
    interval: Duration,
    windows: HashMap<K, Window>,
}

impl<K: Hash + Eq + Clone> Sampler<K> {
    /// A sampler letting `burst` events per key through each `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self { burst, interval, windows: HashMap::new() }
    }

    /// Whether an event of `key` at `now` is let through.
    pub fn admit(&mut self, key: &K, now: Instant) -> bool {
        let w = self.windows.entry(key.clone()).or_insert(Window { start: now, admitted: 0, suppressed: 0 });
        if now.saturating_duration_since(w.start) >= self.interval {
            w.start = now;
            w.admitted = 0;
        }
        if w.admitted < self.burst {
            w.admitted += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// The keys that had events suppressed since the last call, with how
    /// many; their counts start again from zero. Keys quiet for a whole
    /// interval are forgotten.
    pub fn take_suppressed(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut out = Vec::new();
        let interval = self.interval;
        self.windows.retain(|k, w| {
            if w.suppressed > 0 {
                out.push((k.clone(), w.suppressed));
                w.suppressed = 0;
            }
            now.saturating_duration_since(w.start) < interval
        });
        out
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

struct Inner {
    sampler: Sampler<Identifier>,
    sites: HashMap<Identifier, &'static Metadata<'static>>,
}

/// The sampling layer; see the [module docs](self). Cheap to clone: clones
/// share one table.
#[derive(Clone)]
pub struct SampledLogs {
    inner: Arc<Mutex<Inner>>,
    interval: Duration,
}

impl std::fmt::Debug for SampledLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampledLogs").field("interval", &self.interval).finish_non_exhaustive()
    }
}

impl Default for SampledLogs {
    fn default() -> Self {
        Self::new(Self::BURST, Self::INTERVAL)
    }
}

impl SampledLogs {
    /// Lines let through per call site and interval, by default.
    pub const BURST: u32 = 20;
    /// The sampling interval, by default.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// A layer letting `burst` lines per call site through each `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner { sampler: Sampler::new(burst, interval), sites: HashMap::new() })),
            interval,
        }
    }

    /// Logs one WARN per call site whose lines were suppressed since the
    /// last report; returns how many lines were suppressed in all.
    pub fn report(&self) -> u64 {
        let suppressed: Vec<(&'static Metadata<'static>, u64)> = {
            let Ok(mut inner) = self.inner.lock() else { return 0 };
            let taken = inner.sampler.take_suppressed(Instant::now());
            let sites: Vec<_> = taken.into_iter().filter_map(|(id, n)| Some((*inner.sites.get(&id)?, n))).collect();
            // Forget the sites the sampler forgot.
            let Inner { sampler, sites: known } = &mut *inner;
            if known.len() > sampler.len() {
                known.retain(|id, _| sampler.windows.contains_key(id));
            }
            sites
        };
        let mut total = 0;
        for (meta, n) in suppressed {
            total += n;
            tracing::warn!(
                target: REPORT_TARGET,
                suppressed = n,
                level = %meta.level(),
                source = meta.target(),
                site = %format_args!("{}:{}", meta.file().unwrap_or("?"), meta.line().unwrap_or(0)),
                "repeated log lines suppressed"
            );
        }
        total
    }

    /// Reports every interval on the current tokio runtime.
    pub fn spawn_reporter(&self) -> tokio::task::JoinHandle<()> {
        let logs = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(logs.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                logs.report();
            }
        })
    }
}

impl<S: Subscriber> Layer<S> for SampledLogs {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        // More verbose than INFO (DEBUG, TRACE), or our own report: always.
        if *meta.level() > Level::INFO || meta.target() == REPORT_TARGET {
            return true;
        }
        let Ok(mut inner) = self.inner.lock() else { return true };
        let id = meta.callsite();
        inner.sites.entry(id.clone()).or_insert(meta);
        inner.sampler.admit(&id, Instant::now())
    }
}

/// What [`init`] started: the sampled-lines reporter and, when trace export
/// is on, the OTLP exporter. [`shutdown`](Self::shutdown) it at exit, so the
/// last spans are sent.
#[derive(Debug)]
pub struct Telemetry {
    otlp: Option<service_sdk::otel::OtlpTracing>,
    reporter: tokio::task::JoinHandle<()>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.otlp.is_some()
    }

    /// Sends the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        self.reporter.abort();
        if let Some(otlp) = self.otlp {
            otlp.shutdown().await;
        }
    }
}

/// Installs the process's `tracing` subscriber (within a Tokio runtime):
/// `RUST_LOG` (default `info`) filters; lines go to standard output in
/// `format`, coloured only when standard output is a terminal, with
/// repeated lines sampled ([`SampledLogs`], reported every interval); and,
/// when `otel` asks for it, spans go to an OTLP collector
/// ([`crate::telemetry`]).
pub fn init(format: LogFormat, otel: &OtelConfig) -> Result<Telemetry, service_sdk::otel::OtelError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let otlp = otel.export().map(service_sdk::otel::OtlpExport::start).transpose()?;
    let sampled = SampledLogs::default();
    let ansi = std::io::stdout().is_terminal();
    // RUST_LOG filters the lines, not the spans: the OTLP layer has its own
    // level (see `OtlpTracing::layer`).
    let registry = tracing_subscriber::registry().with(otlp.as_ref().map(|o| o.layer()));
    match format {
        LogFormat::Json => {
            registry.with(log_lines(filter, sampled.clone(), tracing_subscriber::fmt::layer().json())).init()
        }
        LogFormat::Text => {
            registry.with(log_lines(filter, sampled.clone(), tracing_subscriber::fmt::layer().with_ansi(ansi))).init()
        }
    }
    if let Some(o) = &otlp {
        tracing::info!(endpoint = o.endpoint(), "exporting spans over OTLP");
    }
    Ok(Telemetry { otlp, reporter: sampled.spawn_reporter() })
}

/// The log-line layers: sampling, then `lines`, both behind `filter`
/// (RUST_LOG), which filters nothing else of the subscriber.
fn log_lines<S, L>(
    filter: tracing_subscriber::EnvFilter,
    sampled: SampledLogs,
    lines: L,
) -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    sampled.and_then(lines).with_filter(filter)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn the_first_lines_of_each_interval_pass_and_the_rest_are_counted() {
        let t0 = Instant::now();
        let mut s = Sampler::new(3, Duration::from_secs(10));
        let passed = (0..10).filter(|_| s.admit(&"login", t0)).count();
        assert_eq!(passed, 3);
        // Another key has its own budget.
        assert!(s.admit(&"reset", t0));
        assert_eq!(s.take_suppressed(t0 + Duration::from_secs(1)), vec![("login", 7)]);
        // Counted once: the next report starts from zero.
        assert!(s.take_suppressed(t0 + Duration::from_secs(2)).is_empty());
        // A new interval has a new budget.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!((0..10).filter(|_| s.admit(&"login", t1)).count(), 3);
        assert_eq!(s.take_suppressed(t1), vec![("login", 7)]);
    }

    #[test]
    fn quiet_keys_are_forgotten() {
        let t0 = Instant::now();
        let mut s = Sampler::new(1, Duration::from_secs(10));
        for k in 0..100 {
            s.admit(&k, t0);
        }
        assert_eq!(s.len(), 100);
        assert!(s.take_suppressed(t0 + Duration::from_secs(11)).is_empty());
        assert!(s.is_empty());
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_one_line_logs_a_burst_and_one_summary() {
        let out = Captured::default();
        let writer = out.clone();
        let logs = SampledLogs::new(5, Duration::from_secs(3600));
        let subscriber = tracing_subscriber::registry().with(log_lines(
            tracing_subscriber::EnvFilter::new("debug"),
            logs.clone(),
            tracing_subscriber::fmt::layer().with_ansi(false).with_writer(move || writer.clone()),
        ));
        let suppressed = tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                tracing::info!(reason = "invalid username or password", "unauthenticated");
            }
            for _ in 0..3 {
                tracing::warn!("another line");
            }
            for _ in 0..50 {
                tracing::debug!("debug lines are not sampled");
            }
            logs.report()
        });
        assert_eq!(suppressed, 995);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count("unauthenticated"), 5, "{text}");
        assert_eq!(count("another line"), 3);
        assert_eq!(count("debug lines are not sampled"), 50);
        let summary: Vec<&str> = text.lines().filter(|l| l.contains("repeated log lines suppressed")).collect();
        assert_eq!(summary.len(), 1, "{text}");
        assert!(summary[0].contains("suppressed=995"), "{}", summary[0]);
        assert!(summary[0].contains("logs.rs"), "names the call site: {}", summary[0]);
    }

    /// Records the names of the spans it sees.
    #[derive(Clone, Default)]
    struct SpanNames(Arc<Mutex<Vec<&'static str>>>);

    impl<S: Subscriber> Layer<S> for SpanNames {
        fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _id: &tracing::span::Id, _ctx: Context<'_, S>) {
            self.0.lock().unwrap().push(attrs.metadata().name());
        }
    }

    #[test]
    fn rust_log_filters_the_lines_and_never_the_exported_spans() {
        let out = Captured::default();
        let writer = out.clone();
        let spans = SpanNames::default();
        // As `init` builds it with RUST_LOG=warn; the span layer stands for
        // the OTLP one, with the level `OtlpTracing::layer` gives it.
        let subscriber = tracing_subscriber::registry()
            .with(spans.clone().with_filter(tracing_subscriber::filter::LevelFilter::INFO))
            .with(log_lines(
                tracing_subscriber::EnvFilter::new("warn"),
                SampledLogs::new(5, Duration::from_secs(3600)),
                tracing_subscriber::fmt::layer().with_ansi(false).with_writer(move || writer.clone()),
            ));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc");
            let _entered = span.enter();
            tracing::info!("an info line");
            tracing::warn!("a warning");
            let _quiet = tracing::debug_span!("chatty").entered();
        });
        assert_eq!(*spans.0.lock().unwrap(), ["rpc"]);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("a warning"), "{text}");
        assert!(!text.contains("an info line"), "{text}");
    }
}
