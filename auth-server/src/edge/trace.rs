//! Tracing per RPC, as a tower layer: tower-http's [`TraceLayer`] with gRPC
//! classification, opening one `rpc` span per request (method, peer) and
//! recording the gRPC code when the call ends, whether the code comes in
//! the response headers (a trailers-only refusal) or in the trailers (a
//! unary success, the end of a stream).
//!
//! Handlers add what only they know (the client id, the audience) to the
//! span's empty fields with [`Span::current`]. Routine outcomes are logged
//! at debug level; refusals and failures are logged where
//! [`AuthError`](crate::error::AuthError) becomes a `Status`.
//!
//! With trace export on ([`crate::telemetry`]), the span is named after the
//! RPC (`auth.v1.Auth/ExchangeToken`), is a server span, and continues the
//! W3C `traceparent` of a caller with a verified client certificate: the
//! exchange a service makes for a user's request shows in that request's
//! trace. A caller without one (no `[tls]`, or no client certificate)
//! starts a new trace. With export off no `traceparent` is read. No field ever holds a token, a secret or a header value.

use std::fmt;
use std::time::Duration;

use http::HeaderMap;
use tower_http::classify::GrpcErrorsAsFailures;
use tower_http::classify::SharedClassifier;
use tower_http::trace::{MakeSpan, OnEos, OnResponse, TraceLayer};
use tracing::Span;
use tracing::field::Empty;

use super::incoming::ConnInfo;

/// The gRPC server's tracing layer.
pub type RpcTraceLayer = TraceLayer<SharedClassifier<GrpcErrorsAsFailures>, RpcSpan, (), RpcDone, (), RpcDone, ()>;

/// The tracing layer for the gRPC server's stack; `propagate`: whether
/// spans are exported, so that each continues its caller's trace.
pub fn rpc_trace(propagate: bool) -> RpcTraceLayer {
    TraceLayer::new_for_grpc()
        .make_span_with(RpcSpan { propagate })
        .on_request(())
        .on_response(RpcDone { record: propagate })
        .on_body_chunk(())
        .on_eos(RpcDone { record: propagate })
        .on_failure(())
}

/// Opens the `rpc` span of a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcSpan {
    /// Name the span for OpenTelemetry and continue the caller's
    /// `traceparent` (trace export on).
    pub propagate: bool,
}

impl<B> MakeSpan<B> for RpcSpan {
    fn make_span(&mut self, req: &http::Request<B>) -> Span {
        // The path is the client's: shown escaped and capped, like every
        // string a client chose.
        let path = req.uri().path();
        let method = path.strip_prefix("/auth.v1.Auth/").unwrap_or(path);
        let peer = req.extensions().get::<ConnInfo>().and_then(|c| c.peer.as_deref()).map(|p| Capped(&p.id));
        let span = tracing::info_span!(
            "rpc",
            method = ?Capped(method),
            peer = ?peer,
            client_id = Empty,
            audience = Empty,
            target = Empty,
            code = Empty,
            otel.name = Empty,
            otel.kind = Empty,
        );
        if self.propagate {
            let grpc = true;
            span.record("otel.name", service_sdk::otel::span_name(req.method(), path, grpc).as_ref());
            span.record("otel.kind", "server");
            // Only a caller with a verified certificate (a service of the
            // mesh) continues its trace, as the SDK's `TraceTrust` default:
            // anyone else's `traceparent` could join another trace or force
            // sampling, so their call starts a trace of its own.
            if peer.is_some() {
                service_sdk::otel::continue_trace(&span, req.headers());
            }
        }
        span
    }
}

/// Ends a call: logs its gRPC code (debug) and, for an exported span,
/// records it on the span.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcDone {
    /// Record the code on the span (trace export on). Without export only a
    /// line logged in the span after the call's end could show the field,
    /// and the one such line (`rpc done`, debug) carries the code itself:
    /// formatting it into the span would be work no one reads.
    pub record: bool,
}

fn grpc_code(headers: &HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

fn done(span: &Span, code: tonic::Code, record: bool) {
    if record {
        span.record("code", tracing::field::debug(code));
    }
    // Successes are routine: debug, so a busy server does not spend its
    // time formatting log lines.
    tracing::debug!(parent: span, code = ?code, "rpc done");
}

impl<B> OnResponse<B> for RpcDone {
    fn on_response(self, res: &http::Response<B>, _latency: Duration, span: &Span) {
        // A trailers-only response (a refusal) carries its code here.
        if let Some(code) = grpc_code(res.headers()) {
            done(span, code, self.record);
        }
    }
}

impl OnEos for RpcDone {
    fn on_eos(self, trailers: Option<&HeaderMap>, _stream_duration: Duration, span: &Span) {
        // Without trailers the code was in the headers (or the call broke
        // off): recorded already, or unknown.
        if let Some(code) = trailers.and_then(grpc_code) {
            done(span, code, self.record);
        }
    }
}

/// A client-chosen string for logs: `Debug`-escaped and cut at 64 bytes.
#[derive(Clone, Copy)]
pub struct Capped<'a>(pub &'a str);

/// Most bytes of a [`Capped`] string shown.
const CAP: usize = 64;

impl fmt::Debug for Capped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= CAP {
            // The common case (a service's name, a SPIFFE id): printable
            // ASCII that `Debug` would leave as it is, written in one go
            // rather than escaped char by char (this runs for every RPC).
            if self.0.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\') {
                f.write_str("\"")?;
                f.write_str(self.0)?;
                return f.write_str("\"");
            }
            return fmt::Debug::fmt(self.0, f);
        }
        let mut end = CAP;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        fmt::Debug::fmt(&self.0[..end], f)?;
        f.write_str("…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_strings_are_escaped_and_cut() {
        assert_eq!(format!("{:?}", Capped("order")), "\"order\"");
        assert_eq!(format!("{:?}", Capped("a\nb")), "\"a\\nb\"");
        for plain in ["spiffe://auth.dev/order", "a b~{}", ""] {
            assert_eq!(format!("{:?}", Capped(plain)), format!("{plain:?}"), "as Debug writes it");
        }
        for odd in ["a\"b", "a\\b", "tab\there", "\u{7f}", "é"] {
            assert_eq!(format!("{:?}", Capped(odd)), format!("{odd:?}"), "escaped as Debug does");
        }
        let long = "é".repeat(100);
        let shown = format!("{:?}", Capped(&long));
        assert!(shown.ends_with('…'));
        assert_eq!(shown.chars().filter(|c| *c == 'é').count(), 32);
    }

    #[test]
    fn the_code_is_read_from_grpc_status() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_code(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("16"));
        assert_eq!(grpc_code(&h), Some(tonic::Code::Unauthenticated));
    }

    #[tokio::test]
    async fn only_a_caller_with_a_verified_certificate_continues_its_trace() {
        use tracing_subscriber::layer::SubscriberExt as _;
        const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        // A real tracer; its collector is nowhere, and nothing is sent.
        let otlp = service_sdk::otel::OtlpExport::new("http://127.0.0.1:9", "auth-server").start().unwrap();
        let subscriber = tracing_subscriber::registry().with(otlp.layer());
        let sent = |peer: Option<&str>| {
            let conn = ConnInfo {
                remote_addr: None,
                peer: peer
                    .map(|id| std::sync::Arc::new(crate::tls::PeerIdentity { id: id.into(), cert_sha256: [0; 32] })),
            };
            let req = http::Request::builder()
                .uri("/auth.v1.Auth/ExchangeToken")
                .header(service_sdk::otel::TRACEPARENT, CALLER)
                .extension(conn)
                .body(())
                .unwrap();
            let span = RpcSpan { propagate: true }.make_span(&req);
            let _entered = span.enter();
            let mut out = HeaderMap::new();
            service_sdk::otel::inject_current(&mut out);
            out[service_sdk::otel::TRACEPARENT].to_str().unwrap().to_owned()
        };
        tracing::subscriber::with_default(subscriber, || {
            let from_mesh = sent(Some("spiffe://dev.local/order"));
            assert!(from_mesh.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{from_mesh}");
            let from_anyone = sent(None);
            assert!(!from_anyone.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{from_anyone}");
        });
        otlp.shutdown().await;
    }
}
