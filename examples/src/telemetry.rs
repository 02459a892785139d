//! Logs and traces of the example binaries: one call sets up `tracing`
//! (lines on standard output, coloured only on a terminal; `RUST_LOG`
//! filters) and, when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable
//! is set, span export over OTLP/gRPC named by `OTEL_SERVICE_NAME` (default:
//! the binary's service name). The SDK's `otel` feature carries the trace
//! from service to service.

use std::io::IsTerminal as _;

use service_sdk::otel::{OtelError, OtlpExport, OtlpTracing};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// What [`init`] started; [`shutdown`](Self::shutdown) it at exit so the
/// last spans are sent.
#[derive(Debug)]
pub struct Telemetry {
    otlp: Option<OtlpTracing>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.otlp.is_some()
    }

    /// Sends the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(otlp) = self.otlp {
            otlp.shutdown().await;
        }
    }
}

/// Installs the subscriber of the binary `service` (within a Tokio
/// runtime); `default_filter` applies when `RUST_LOG` is unset.
pub fn init(service: &str, default_filter: &str) -> Result<Telemetry, OtelError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let otlp = OtlpExport::from_env(service).map(OtlpExport::start).transpose()?;
    // RUST_LOG filters the lines only; spans are exported at INFO and above.
    tracing_subscriber::registry()
        .with(otlp.as_ref().map(|o| o.layer()))
        .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()).with_filter(filter))
        .init();
    if let Some(o) = &otlp {
        tracing::info!(endpoint = o.endpoint(), "exporting spans over OTLP");
    }
    Ok(Telemetry { otlp })
}

/// Resolves at SIGINT (Ctrl-C) or SIGTERM (a container stop).
pub async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
