//! Per-RPC metrics as a tower layer in the gRPC stack: a count and a
//! latency histogram of every call, by method ([`Rpc`], a fixed set) and
//! gRPC status code.
//!
//! The code is read where gRPC puts it: in the response headers of a
//! trailers-only answer (a refusal before any message), else in the
//! trailers that end the body. The latency runs from the request to that
//! point, so a unary call counts its whole response and a
//! WatchRevocations stream its whole life. A response body dropped before
//! its end (the client cancelled, the connection broke) counts as
//! `CANCELLED`.
//!
//! Series are registered on first use and kept in a table indexed by
//! method and code, so a call costs two clock readings and two atomic
//! updates, and allocates nothing for its labels.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderMap;
use http_body::Frame;
use metrics::{Counter, Histogram};
use tonic::Code;
use tonic::codegen::Bytes;
use tower::{Layer, Service};

use super::Rpc;
use super::metrics::{RPC_DURATION, RPC_REQUESTS};

/// Every gRPC status code, in numeric order.
const CODES: usize = 17;

/// The label of a gRPC status code: its canonical name.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn code_index(code: Code) -> usize {
    (code as usize).min(CODES - 1)
}

/// The series of one method and code.
struct Series {
    calls: Counter,
    latency: Histogram,
}

/// The table of series, each registered on first use.
struct Table {
    cells: Vec<OnceLock<Series>>,
}

impl Table {
    fn new() -> Self {
        Self { cells: (0..Rpc::ALL.len() * CODES).map(|_| OnceLock::new()).collect() }
    }

    fn record(&self, rpc: Rpc, code: Code, start: Instant) {
        let Some(cell) = self.cells.get(rpc.index() * CODES + code_index(code)) else { return };
        let series = cell.get_or_init(|| {
            let (method, code) = (rpc.as_str(), code_label(code));
            Series {
                calls: metrics::counter!(RPC_REQUESTS, "method" => method, "code" => code),
                latency: metrics::histogram!(RPC_DURATION, "method" => method, "code" => code),
            }
        });
        series.calls.increment(1);
        series.latency.record(start.elapsed().as_secs_f64());
    }
}

/// The layer; see the [module docs](self). Clones share one table.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    table: Arc<Table>,
}

impl std::fmt::Debug for RpcMetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetricsLayer").finish_non_exhaustive()
    }
}

impl Default for RpcMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RpcMetricsLayer {
    /// Records into the recorder installed now (a no-op without one).
    pub fn new() -> Self {
        Self { table: Arc::new(Table::new()) }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner, table: Arc::clone(&self.table) }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S> std::fmt::Debug for RpcMetrics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics").finish_non_exhaustive()
    }
}

fn grpc_code(headers: &HeaderMap) -> Option<Code> {
    headers.get("grpc-status").map(|v| Code::from_bytes(v.as_bytes()))
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call =
            Call { rpc: Rpc::from_path(req.uri().path()), start: Instant::now(), table: Arc::clone(&self.table) };
        ResponseFuture { inner: self.inner.call(req), call: Some(call) }
    }
}

/// One call being measured.
struct Call {
    rpc: Rpc,
    start: Instant,
    table: Arc<Table>,
}

impl Call {
    fn done(self, code: Code) {
        self.table.record(self.rpc, code, self.start);
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcMetrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(call) = this.call.take() else { return Poll::Ready(result) };
        Poll::Ready(match result {
            Ok(res) => {
                if let Some(code) = grpc_code(res.headers()) {
                    // Trailers-only: the call is over.
                    call.done(code);
                    Ok(res)
                } else {
                    Ok(res.map(|body| tonic::body::Body::new(MeteredBody { inner: body, call: Some(call) })))
                }
            }
            Err(e) => {
                call.done(Code::Unknown);
                Err(e)
            }
        })
    }
}

/// A response body that records its call when its trailers pass.
struct MeteredBody {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|t| grpc_code(t).unwrap_or(Code::Unknown)),
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            Poll::Ready(None) => Some(Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = self.call.take()
        {
            call.done(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.done(Code::Cancelled);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_cell_and_canonical_name() {
        let codes = (0..CODES as i32).map(Code::from_i32).collect::<Vec<_>>();
        for (i, code) in codes.iter().enumerate() {
            assert_eq!(code_index(*code), i);
        }
        assert_eq!(code_label(Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(code_label(Code::Ok), "OK");
        let mut h = HeaderMap::new();
        assert_eq!(grpc_code(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        assert_eq!(grpc_code(&h), Some(Code::ResourceExhausted));
    }
}
