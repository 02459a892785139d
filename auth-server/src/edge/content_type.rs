//! Refuses requests that are not gRPC, as a tower layer in the gRPC
//! server's stack: before it, tonic served any content-type (a
//! `text/plain` POST got a gRPC answer).
//!
//! gRPC over HTTP/2 (grpc/grpc `doc/PROTOCOL-HTTP2.md`, Requests): "If
//! Content-Type does not begin with "application/grpc", gRPC servers SHOULD
//! respond with HTTP status of 415 (Unsupported Media Type). This will
//! prevent other HTTP/2 clients from interpreting a gRPC error response,
//! which uses status 200 (OK), as successful." Served here:
//! `application/grpc` alone, with a `+subtype` (`application/grpc+proto`)
//! or with parameters; everything else, a missing content-type and gRPC-Web
//! included, gets 415 with an empty body before any service sees it.

use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures_util::future::Either;
use tower::{Layer, Service};

/// The layer; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcContentTypeLayer;

impl<S> Layer<S> for GrpcContentTypeLayer {
    type Service = GrpcContentType<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcContentType { inner }
    }
}

/// The service of [`GrpcContentTypeLayer`].
#[derive(Debug, Clone)]
pub struct GrpcContentType<S> {
    inner: S,
}

/// Whether `value` is a content-type the gRPC port serves.
fn is_grpc(value: Option<&http::HeaderValue>) -> bool {
    let Some(value) = value else { return false };
    let value = value.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

impl<S, B> Service<http::Request<B>> for GrpcContentType<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_grpc(req.headers().get(http::header::CONTENT_TYPE)) {
            return Either::Left(self.inner.call(req));
        }
        let mut res = http::Response::new(tonic::body::Body::empty());
        *res.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Either::Right(ready(Ok(res)))
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn only_grpc_content_types_pass() {
        let ok = ["application/grpc", "application/grpc+proto", "Application/GRPC+proto", "application/grpc; x=1"];
        for v in ok {
            assert!(is_grpc(Some(&HeaderValue::from_static(v))), "{v}");
        }
        let refused = ["text/plain", "application/grpc-web", "application/grpcx", "application/json", "", "grpc"];
        for v in refused {
            assert!(!is_grpc(Some(&HeaderValue::from_static(v))), "{v}");
        }
        assert!(!is_grpc(None));
    }
}
