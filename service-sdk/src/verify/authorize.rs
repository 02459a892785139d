//! [`AuthorizeRequest`]: what [`RequireAuthLayer`](super::RequireAuthLayer)
//! asks before a request reaches the service, and the [`Verifier`] as its
//! default answer.

use std::future::Future;

use futures_util::future::{BoxFuture, Either, Ready, ready};
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::VerifyError;
use super::bearer::parse_bearer;
use super::verifier::{Verification, Verifier};
use crate::claims::Claims;

/// Decides whether a request may reach the service behind
/// [`RequireAuthLayer`](super::RequireAuthLayer): the shape of tower-http's
/// `AsyncAuthorizeRequest`. The future resolves to the request, to which
/// the authorizer may have added extensions (typically the caller's
/// identity), or to the response that refuses it.
///
/// Unlike tower-http's trait, the response body is a parameter rather than
/// an associated type, so one authorizer can serve tonic and axum (whose
/// bodies differ) alike. The [`Verifier`] implements it for any body with a
/// `Default` (an empty body; refusals are headers only). Closures
/// `FnMut(Request<B>) -> impl Future<Output = Result<Request<B>,
/// Response<R>>>` implement it too.
///
/// ```
/// use futures_util::future::{Ready, ready};
/// use http::{Request, Response, StatusCode};
/// use service_sdk::verify::AuthorizeRequest;
///
/// /// Lets through only requests from inside the mesh's sidecar.
/// #[derive(Clone)]
/// struct FromSidecar;
///
/// impl<B, R: Default> AuthorizeRequest<B, R> for FromSidecar {
///     type Future = Ready<Result<Request<B>, Response<R>>>;
///     fn authorize(&mut self, request: Request<B>) -> Self::Future {
///         if request.headers().contains_key("x-sidecar") {
///             return ready(Ok(request));
///         }
///         let mut refusal = Response::new(R::default());
///         *refusal.status_mut() = StatusCode::FORBIDDEN;
///         ready(Err(refusal))
///     }
/// }
/// // RequireAuthLayer::new(FromSidecar)
/// ```
pub trait AuthorizeRequest<B, R> {
    /// Resolves to the (possibly extended) request, or to the refusal.
    type Future: Future<Output = Result<Request<B>, Response<R>>>;

    /// Decides about one request.
    fn authorize(&mut self, request: Request<B>) -> Self::Future;
}

impl<B, R, F, Fut> AuthorizeRequest<B, R> for F
where
    F: FnMut(Request<B>) -> Fut,
    Fut: Future<Output = Result<Request<B>, Response<R>>>,
{
    type Future = Fut;

    fn authorize(&mut self, request: Request<B>) -> Fut {
        self(request)
    }
}

/// The future of the [`Verifier`] as an [`AuthorizeRequest`]: ready at once
/// when the token is decided without I/O (a cached or freshly checked token
/// and an in-memory revocation check), boxed when a key refetch or a
/// revocation lookup needs I/O.
pub type VerifyRequest<B, R> =
    Either<Ready<Result<Request<B>, Response<R>>>, BoxFuture<'static, Result<Request<B>, Response<R>>>>;

/// Verifies the `authorization: Bearer …` token. On success the request
/// carries [`Claims`] and [`BearerToken`] in its extensions. On failure a
/// gRPC request (content type `application/grpc…`) gets a trailers-only
/// response with `UNAUTHENTICATED` (or `UNAVAILABLE` when no keys are known
/// or the revocation check cannot answer); any other request gets HTTP 401
/// with `WWW-Authenticate: Bearer error="invalid_token"` (or 503). The
/// reason is logged at debug level, never with token content, and reported
/// once to the verifier's observer.
///
/// The caller's certificate, for certificate-bound tokens, is read from
/// tonic's TLS connection info, or else from a [`PeerCertificate`]
/// extension.
impl<B, R> AuthorizeRequest<B, R> for Verifier
where
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Future = VerifyRequest<B, R>;

    fn authorize(&mut self, request: Request<B>) -> Self::Future {
        let grpc = is_grpc(request.headers());
        let (verification, token) = {
            let presented = parse_bearer(request.headers());
            let tonic_certs =
                request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(TlsConnectInfo::peer_certs);
            let peer: Option<&[u8]> = match &tonic_certs {
                Some(certs) => certs.first().map(|c| c.as_ref()),
                None => request.extensions().get::<PeerCertificate>().map(|p| p.0.as_ref()),
            };
            let verification = self.start(presented, peer);
            let token = match (&verification, presented) {
                (Verification::Done(Err(_)), _) | (_, Err(_)) => None,
                (_, Ok(token)) => Some(BearerToken(token.to_owned())),
            };
            (verification, token)
        };
        match verification {
            Verification::Done(result) => Either::Left(ready(admit(request, token, result, grpc))),
            Verification::Pending(rest) => {
                Either::Right(Box::pin(async move { admit(request, token, rest.await, grpc) }))
            }
        }
    }
}

/// The request with the verified claims and token, or the refusal.
fn admit<B, R: Default>(
    mut request: Request<B>,
    token: Option<BearerToken>,
    result: Result<Claims, VerifyError>,
    grpc: bool,
) -> Result<Request<B>, Response<R>> {
    match result {
        Ok(claims) => {
            let ext = request.extensions_mut();
            ext.insert(claims);
            if let Some(token) = token {
                ext.insert(token);
            }
            Ok(request)
        }
        Err(e) => Err(refusal(&e, grpc)),
    }
}

/// Whether the request is gRPC (any `application/grpc…` content type).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The response for a refused request.
fn refusal<B: Default>(e: &VerifyError, grpc: bool) -> Response<B> {
    tracing::debug!(reason = e.reason(), grpc, "request refused");
    if grpc {
        return tonic::Status::from(*e).into_http();
    }
    let mut resp = Response::new(B::default());
    if e.is_unavailable() {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    } else {
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        // RFC 6750 section 3.1: no error code when no credential was sent.
        let challenge = if *e == VerifyError::Missing { "Bearer" } else { "Bearer error=\"invalid_token\"" };
        resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    }
    resp
}

/// The raw access token of a verified request, in request extensions next
/// to its [`Claims`], for on-behalf-of calls (`ExchangeToken`'s
/// `subject_token`). Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// The compact JWS.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// The caller's mTLS leaf certificate, for servers other than tonic: a TLS
/// acceptor in front of an axum or hyper service inserts it into request
/// extensions so certificate-bound tokens can be checked. (tonic servers
/// need nothing: the verifier reads tonic's own TLS connection info.)
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub CertificateDer<'static>);

impl Claims {
    /// `Ok` when the token grants `perm`, else `PermissionDenied`.
    pub fn require_perm(&self, perm: &str) -> Result<(), tonic::Status> {
        if self.has_perm(perm) {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(format!("missing permission {perm}")))
        }
    }

    /// The claims [`RequireAuthLayer`](super::RequireAuthLayer) put on a
    /// tonic request; `Unauthenticated` when there are none (the layer is
    /// not installed).
    pub fn from_request<T>(req: &tonic::Request<T>) -> Result<&Claims, tonic::Status> {
        req.extensions().get::<Claims>().ok_or_else(|| tonic::Status::unauthenticated("not authenticated"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn http_refusals_carry_the_bearer_challenge() {
        let r: Response<String> = refusal(&VerifyError::Expired, false);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer error=\"invalid_token\"");
        let r: Response<String> = refusal(&VerifyError::FeedStale, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn grpc_refusals_are_trailers_only_statuses() {
        let r: Response<String> = refusal(&VerifyError::BadSignature, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "16");
        let r: Response<String> = refusal(&VerifyError::NoKeys, true);
        assert_eq!(r.headers()["grpc-status"], "14");
    }

    #[test]
    fn require_perm_denies_missing_permissions() {
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "iss": "i", "sub": "alice", "aud": "inventory", "exp": 2, "nbf": 0, "iat": 0,
            "jti": "j", "client_id": "c", "perms": ["inventory:read"],
        }))
        .unwrap();
        assert!(claims.require_perm("inventory:read").is_ok());
        assert_eq!(claims.require_perm("inventory:reserve").unwrap_err().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn bearer_token_debug_is_redacted() {
        assert_eq!(format!("{:?}", BearerToken("secret.token.value".into())), "BearerToken(..)");
    }
}
