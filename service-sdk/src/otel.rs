//! OpenTelemetry (feature `otel`): W3C trace context across services, and
//! span export over OTLP/gRPC.
//!
//! **Propagation.** With the feature on, [`AuthChannel`](crate::AuthChannel)
//! and the token source's `ExchangeToken` call send the current span's
//! context as a `traceparent` (and `tracestate`) header, and
//! [`RequireAuthLayer`](crate::RequireAuthLayer) opens one `request` span per
//! checked request, a child of the caller's `traceparent` when there is one
//! and the caller is trusted ([`TraceTrust`]; by default, a caller that came
//! over mTLS with a verified client certificate). So one trace follows a
//! user's call from service to service and through the auth server's
//! exchange, while a user's own call into an HTTP front starts a new trace:
//! no end user can join another trace or decide its sampling. The spans carry the route and nothing from
//! the request's headers or body: never a token, a secret or an
//! `authorization` header. Without an OpenTelemetry layer in the process's
//! `tracing` subscriber, no context is valid and nothing is sent.
//!
//! **Export.** [`OtlpExport`] starts a batch span exporter to an OTLP/gRPC
//! collector on the platform's own tonic, and [`OtlpTracing::layer`] is the
//! `tracing` layer that feeds it. Export runs on a background thread: a
//! collector that is down or slow costs dropped spans (and a warning from
//! the exporter), never a failed or slowed request.
//!
//! ```no_run
//! # async fn run() -> Result<(), service_sdk::otel::OtelError> {
//! use tracing_subscriber::layer::SubscriberExt as _;
//! use tracing_subscriber::util::SubscriberInitExt as _;
//! // OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 OTEL_SERVICE_NAME=inventory
//! let otlp = service_sdk::otel::OtlpExport::from_env("inventory").map(|e| e.start()).transpose()?;
//! use tracing_subscriber::Layer as _;
//! tracing_subscriber::registry()
//!     // Spans at INFO and above, whatever RUST_LOG says of log lines.
//!     .with(otlp.as_ref().map(|o| o.layer()))
//!     // RUST_LOG filters the lines only: a filter on the whole registry
//!     // would end span export at RUST_LOG=warn.
//!     .with(tracing_subscriber::fmt::layer().with_filter(tracing_subscriber::EnvFilter::from_default_env()))
//!     .init();
//! // ... serve ...
//! if let Some(otlp) = otlp {
//!     otlp.shutdown().await; // exports what is still buffered
//! }
//! # Ok(()) }
//! ```

use std::borrow::Cow;

use http::HeaderMap;
use http::header::HeaderValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt as _};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{Filtered, LevelFilter};
use tracing_subscriber::registry::LookupSpan;

use crate::TraceTrust;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// The standard variable naming the collector (`http://host:4317`).
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard variable naming the collector for traces alone (wins over
/// [`ENDPOINT_VAR`]).
pub const TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The standard variable naming this service in its spans.
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
/// The standard variable turning the SDK off (`true`).
pub const SDK_DISABLED_VAR: &str = "OTEL_SDK_DISABLED";

// ---------------------------------------------------------------------------
// Propagation

/// Reads trace context headers from an `http::HeaderMap`.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes trace context headers into an `http::HeaderMap`.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the W3C trace context (`traceparent`,
/// `tracestate`) in `headers`, if they carry a valid one. Costs one header
/// lookup when they carry none. Call it before the span is first entered;
/// without an OpenTelemetry layer it does nothing.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    if !headers.contains_key(TRACEPARENT) {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed, or the span
        // is disabled or already started: then there is nothing to join.
        let _ = span.set_parent(parent);
    }
}

/// Writes the trace context of the current span into `headers` (a
/// `traceparent`, and `tracestate` when it is not empty). Leaves `headers`
/// alone when the current span has no valid OpenTelemetry context.
pub fn inject_current(headers: &mut HeaderMap) {
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Most bytes of a client-chosen path used in a span name.
const NAME_CAP: usize = 96;

/// The name of a server span for a request: `shop.v1.Inventory/Reserve`
/// for gRPC, `POST /orders` otherwise. The path is the client's: any byte
/// outside `[A-Za-z0-9._/-]`, or a path longer than 96 bytes, gives the
/// plain name `request`.
pub fn span_name(method: &http::Method, path: &str, grpc: bool) -> Cow<'static, str> {
    let safe = path.len() <= NAME_CAP
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    match (safe, grpc) {
        (false, _) => Cow::Borrowed("request"),
        (true, true) => Cow::Owned(path.trim_start_matches('/').to_owned()),
        (true, false) => Cow::Owned(format!("{method} {path}")),
    }
}

/// Whether `req` came over mTLS with a client certificate the server
/// verified: tonic's TLS connection info names one, or a TLS acceptor in
/// front of an axum or hyper service put a
/// [`PeerCertificate`](crate::PeerCertificate) into its extensions.
pub fn from_verified_peer<B>(req: &http::Request<B>) -> bool {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let tonic = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|certs| !certs.is_empty());
    tonic || req.extensions().get::<crate::PeerCertificate>().is_some()
}

/// The `request` span [`RequireAuthLayer`](crate::RequireAuthLayer) opens
/// for a checked request: named after the route; a child of the caller's
/// trace context when `trust` admits the caller, else the start of a new
/// trace (the caller's `traceparent` is ignored, sampled flag and all).
pub(crate) fn request_span<B>(req: &http::Request<B>, trust: TraceTrust) -> Span {
    let grpc =
        req.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let name = span_name(req.method(), req.uri().path(), grpc);
    let span = tracing::info_span!("request", otel.name = %name, otel.kind = "server", refused = tracing::field::Empty);
    let trusted = match trust {
        TraceTrust::Always => true,
        TraceTrust::Never => false,
        TraceTrust::MutualTls => from_verified_peer(req),
    };
    if trusted {
        continue_trace(&span, req.headers());
    }
    span
}

// ---------------------------------------------------------------------------
// Export

/// Why the exporter did not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The exporter could not be built (e.g. a malformed endpoint).
    #[error("OTLP exporter: {0}")]
    Build(String),
    /// Flushing or stopping the exporter failed.
    #[error("OTLP shutdown: {0}")]
    Shutdown(String),
}

/// Settings of an OTLP/gRPC span export: the collector's endpoint, this
/// service's name, and optionally the share of new traces to sample. Only
/// `http://` endpoints: a collector (or agent) on the same host or pod,
/// which carries the spans on.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpExport {
    endpoint: String,
    service_name: String,
    sample_ratio: Option<f64>,
}

impl OtlpExport {
    /// An export to `endpoint` (`http://host:4317`) naming this service
    /// `service_name`.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self { endpoint: endpoint.into(), service_name: service_name.into(), sample_ratio: None }
    }

    /// From the standard variables: [`TRACES_ENDPOINT_VAR`] or
    /// [`ENDPOINT_VAR`], and [`SERVICE_NAME_VAR`] (else `default_service`).
    /// `None`, export off, when no endpoint is set or [`SDK_DISABLED_VAR`]
    /// is `true`. The batch settings (`OTEL_BSP_SCHEDULE_DELAY`, ...) and
    /// the sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) are
    /// read by the OpenTelemetry SDK itself.
    pub fn from_env(default_service: &str) -> Option<Self> {
        Self::from_vars(default_service, |k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `var`.
    pub fn from_vars(default_service: &str, var: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let set = |k: &str| var(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if set(SDK_DISABLED_VAR).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        let endpoint = set(TRACES_ENDPOINT_VAR).or_else(|| set(ENDPOINT_VAR))?;
        Some(Self::new(endpoint, set(SERVICE_NAME_VAR).unwrap_or_else(|| default_service.to_owned())))
    }

    /// Samples this share (0.0 to 1.0) of new traces; a trace continued
    /// from a trusted caller (see [`TraceTrust`]) follows the caller's
    /// decision, and an untrusted caller's request is a new trace. Unset: the SDK's
    /// default (`OTEL_TRACES_SAMPLER`, else every trace).
    pub fn sample_ratio(mut self, ratio: f64) -> Self {
        self.sample_ratio = Some(ratio.clamp(0.0, 1.0));
        self
    }

    /// The collector's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// This service's name in its spans.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// Starts the exporter (within a Tokio runtime): spans are batched and
    /// sent from a background thread. The collector is connected lazily, so
    /// one that is not up yet is no error.
    pub fn start(self) -> Result<OtlpTracing, OtelError> {
        if !self.endpoint.starts_with("http://") {
            return Err(OtelError::Build(format!(
                "endpoint {:?}: only http:// (a collector or agent beside the service) is supported",
                self.endpoint
            )));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.endpoint.clone())
            .build()
            .map_err(|e| OtelError::Build(e.to_string()))?;
        let mut builder = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(self.service_name.clone()).build());
        if let Some(ratio) = self.sample_ratio {
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))));
        }
        let provider = builder.build();
        let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
        Ok(OtlpTracing { provider, tracer, endpoint: self.endpoint })
    }
}

/// A running OTLP export: [`layer`](Self::layer) feeds it from `tracing`;
/// [`shutdown`](Self::shutdown) exports what is buffered and stops it.
pub struct OtlpTracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    endpoint: String,
}

impl std::fmt::Debug for OtlpTracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpTracing").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl OtlpTracing {
    /// The `tracing` layer whose spans are exported: spans at INFO and
    /// above, whatever filters the process's log lines. Put a log filter
    /// (`RUST_LOG`, an `EnvFilter`) on the log layer with
    /// [`Layer::with_filter`](tracing_subscriber::Layer::with_filter), not on
    /// the whole subscriber: there `RUST_LOG=warn` would end span export too.
    pub fn layer<S>(&self) -> Filtered<OpenTelemetryLayer<S, SdkTracer>, LevelFilter, S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            // The span's own fields say what it is; thread names and ids
            // add nothing to a trace.
            .with_threads(false)
            .with_filter(LevelFilter::INFO)
    }

    /// The collector's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Exports the spans still buffered and stops the exporter; waits at
    /// most the exporter's timeout. Errors are logged: a collector that is
    /// gone must not fail a shutdown.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The batch thread sends over a tonic channel driven by this
        // runtime: wait for it off the runtime's threads.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "OTLP export: spans lost at shutdown"),
            Err(e) => tracing::warn!(error = %e, "OTLP export: shutdown did not finish"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn span_names_show_safe_routes_only() {
        let post = http::Method::POST;
        assert_eq!(span_name(&post, "/shop.v1.Inventory/Reserve", true), "shop.v1.Inventory/Reserve");
        assert_eq!(span_name(&post, "/orders", false), "POST /orders");
        assert_eq!(span_name(&post, "/orders?token=x", false), "request");
        assert_eq!(span_name(&post, "/a%20b", false), "request");
        assert_eq!(span_name(&post, &format!("/{}", "a".repeat(200)), false), "request");
    }

    #[test]
    fn export_settings_come_from_the_standard_variables() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            move |k: &str| map.get(k).cloned()
        };
        assert_eq!(OtlpExport::from_vars("order", vars(&[])), None);
        assert_eq!(OtlpExport::from_vars("order", vars(&[(ENDPOINT_VAR, " ")])), None);
        let on = OtlpExport::from_vars("order", vars(&[(ENDPOINT_VAR, "http://c:4317")])).unwrap();
        assert_eq!((on.endpoint(), on.service_name()), ("http://c:4317", "order"));
        let named = OtlpExport::from_vars(
            "order",
            vars(&[(ENDPOINT_VAR, "http://c:4317"), (TRACES_ENDPOINT_VAR, "http://t:4317"), (SERVICE_NAME_VAR, "o")]),
        )
        .unwrap();
        assert_eq!((named.endpoint(), named.service_name()), ("http://t:4317", "o"));
        let off = vars(&[(ENDPOINT_VAR, "http://c:4317"), (SDK_DISABLED_VAR, "TRUE")]);
        assert_eq!(OtlpExport::from_vars("order", off), None);
    }

    #[tokio::test]
    async fn only_plain_http_endpoints_start() {
        let err = OtlpExport::new("https://collector:4317", "order").start().unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
        let ok = OtlpExport::new("http://127.0.0.1:9", "order").start().unwrap();
        ok.shutdown().await;
    }

    /// A tracer that records nothing but gives spans real contexts.
    fn provider() -> SdkTracerProvider {
        SdkTracerProvider::builder().build()
    }

    #[test]
    fn a_span_continues_the_callers_trace_and_passes_it_on() {
        let provider = provider();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut incoming = HeaderMap::new();
            incoming.insert(
                TRACEPARENT,
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            let req = http::Request::builder()
                .uri("/shop.v1.Inventory/Reserve")
                .header(TRACEPARENT, incoming[TRACEPARENT].clone())
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .extension(crate::PeerCertificate(rustls_pki_types::CertificateDer::from(b"mesh".to_vec())))
                .body(())
                .unwrap();
            let span = request_span(&req, TraceTrust::MutualTls);
            let _entered = span.enter();
            let mut outgoing = HeaderMap::new();
            inject_current(&mut outgoing);
            let sent = outgoing[TRACEPARENT].to_str().unwrap();
            // Same trace, a new span of ours, still sampled.
            assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{sent}");
            assert!(!sent.contains("00f067aa0ba902b7"), "{sent}");
            assert!(sent.ends_with("-01"), "{sent}");
        });
    }

    #[test]
    fn nothing_is_sent_without_a_trace() {
        // No OpenTelemetry layer: no context, no header.
        let span = tracing::info_span!("plain");
        let _entered = span.enter();
        let mut outgoing = HeaderMap::new();
        inject_current(&mut outgoing);
        assert!(outgoing.is_empty());
        // A malformed traceparent starts a new trace instead.
        let provider = provider();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut incoming = HeaderMap::new();
            incoming.insert(TRACEPARENT, HeaderValue::from_static("00-zz-00f067aa0ba902b7-01"));
            let span = tracing::info_span!("request");
            continue_trace(&span, &incoming);
            let _entered = span.enter();
            inject_current(&mut outgoing);
            let sent = outgoing[TRACEPARENT].to_str().unwrap();
            assert_eq!(sent.len(), 55, "{sent}");
            assert!(!sent.contains("zz"), "{sent}");
        });
    }
}
