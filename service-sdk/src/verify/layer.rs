//! [`RequireAuthLayer`] and [`RequireAuth`]: the tower middleware that
//! verifies `authorization: Bearer …` on every `http::Request`, so the same
//! layer sits in a tonic server and in an axum router.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, Either, Ready, ready};
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::VerifyError;
use super::bearer::parse_bearer;
use super::verifier::{Step, Verifier};
use crate::claims::Claims;

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
/// need nothing: the layer reads tonic's own TLS connection info.)
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub CertificateDer<'static>);

/// Tower layer that refuses requests without a valid access token.
///
/// On success the request carries [`Claims`] and [`BearerToken`] in its
/// extensions. On failure a gRPC request (content type `application/grpc…`)
/// gets a trailers-only response with `UNAUTHENTICATED` (or `UNAVAILABLE`
/// when no keys are known or the revocation feed is stale); any other
/// request gets HTTP 401 with `WWW-Authenticate: Bearer
/// error="invalid_token"` (or 503). The reason is logged at debug level,
/// never with token content, and counted in [`Verifier::stats`]. The
/// `authorization` header is marked sensitive.
///
/// ```no_run
/// # async fn demo(verifier: service_sdk::Verifier) {
/// use service_sdk::RequireAuthLayer;
/// let layer = RequireAuthLayer::new(verifier).allow_unauthenticated("/grpc.health.v1.Health/");
/// // tonic:  Server::builder().layer(layer).add_service(..)
/// // axum:   Router::new().route(..).layer(layer)
/// # let _ = layer;
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RequireAuthLayer {
    verifier: Verifier,
    public: Arc<[String]>,
}

impl RequireAuthLayer {
    /// A layer verifying with `verifier`.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier, public: Arc::from(Vec::new()) }
    }

    /// Lets requests whose path starts with `prefix` through without a
    /// token (health checks, reflection).
    pub fn allow_unauthenticated(mut self, prefix: impl Into<String>) -> Self {
        let mut v = self.public.to_vec();
        v.push(prefix.into());
        self.public = Arc::from(v);
        self
    }
}

impl<S> Layer<S> for RequireAuthLayer {
    type Service = RequireAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth { inner, verifier: self.verifier.clone(), public: Arc::clone(&self.public) }
    }
}

/// The service of [`RequireAuthLayer`].
#[derive(Clone, Debug)]
pub struct RequireAuth<S> {
    inner: S,
    verifier: Verifier,
    public: Arc<[String]>,
}

/// The future of [`RequireAuth`]: the inner service's future when the token
/// was decided synchronously (the usual case), a ready refusal, or a boxed
/// future when a key refetch or a revocation lookup needs I/O.
pub type ResponseFuture<F, B, E> =
    Either<F, Either<Ready<Result<Response<B>, E>>, BoxFuture<'static, Result<Response<B>, E>>>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        for (name, value) in req.headers_mut().iter_mut() {
            if name == AUTHORIZATION {
                value.set_sensitive(true);
            }
        }
        let path = req.uri().path();
        if self.public.iter().any(|p| path.starts_with(p.as_str())) {
            return Either::Left(self.inner.call(req));
        }
        let grpc = is_grpc(req.headers());
        let (step, token, peer) = {
            let token = match parse_bearer(req.headers()) {
                Ok(t) => t,
                Err(e) => {
                    self.verifier.record(&Err::<(), _>(e.clone()));
                    return refuse_now(e, grpc);
                }
            };
            let tonic_certs =
                req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(TlsConnectInfo::peer_certs);
            let peer: Option<&[u8]> = match &tonic_certs {
                Some(certs) => certs.first().map(|c| c.as_ref()),
                None => req.extensions().get::<PeerCertificate>().map(|p| p.0.as_ref()),
            };
            let step = self.verifier.step(token, peer, true);
            let peer = match step {
                Step::Done(_) => None,
                _ => peer.map(<[u8]>::to_vec),
            };
            (step, token.to_owned(), peer)
        };
        match step {
            Step::Done(Ok(claims)) => {
                self.verifier.record(&Ok::<(), VerifyError>(()));
                let ext = req.extensions_mut();
                ext.insert(claims);
                ext.insert(BearerToken(token));
                Either::Left(self.inner.call(req))
            }
            Step::Done(Err(e)) => {
                self.verifier.record(&Err::<(), _>(e.clone()));
                refuse_now(e, grpc)
            }
            step => {
                let verifier = self.verifier.clone();
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Either::Right(Either::Right(Box::pin(async move {
                    match verifier.resolve(&token, peer.as_deref(), step).await {
                        Ok(claims) => {
                            let ext = req.extensions_mut();
                            ext.insert(claims);
                            ext.insert(BearerToken(token));
                            inner.call(req).await
                        }
                        Err(e) => Ok(refusal(&e, grpc)),
                    }
                })))
            }
        }
    }
}

fn refuse_now<F, B: Default, E>(e: VerifyError, grpc: bool) -> ResponseFuture<F, B, E> {
    Either::Right(Either::Left(ready(Ok(refusal(&e, grpc)))))
}

/// Whether the request is gRPC (any `application/grpc…` content type).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The response for a refused request.
fn refusal<B: Default>(e: &VerifyError, grpc: bool) -> Response<B> {
    tracing::debug!(reason = e.reason(), grpc, "request refused");
    if grpc {
        return tonic::Status::from(e.clone()).into_http();
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

impl Claims {
    /// `Ok` when the token grants `perm`, else `PermissionDenied`.
    pub fn require_perm(&self, perm: &str) -> Result<(), tonic::Status> {
        if self.has_perm(perm) {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(format!("missing permission {perm}")))
        }
    }

    /// The claims [`RequireAuthLayer`] put on a tonic request;
    /// `Unauthenticated` when there are none (the layer is not installed).
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

    mod service {
        use std::convert::Infallible;
        use std::sync::Arc;

        use futures_util::FutureExt as _;
        use serde_json::json;
        use tower::ServiceExt as _;

        use super::*;
        use crate::ManualClock;
        use crate::verify::test_keys::{TestKey, claims};
        use crate::verify::{FeedOptions, JwksSource, RevocationFeed};

        const NOW: u64 = 1_700_000_000;

        async fn verifier(key: &TestKey) -> Verifier {
            let clock = ManualClock::new(NOW);
            let feed = RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions::default());
            feed.apply(auth_proto::auth::v1::RevocationEvent {
                event: Some(auth_proto::auth::v1::revocation_event::Event::Snapshot(Default::default())),
            });
            let v = Verifier::builder("auth-service", "inventory")
                .jwks(JwksSource::fixed(key.key_set()))
                .revocation(feed)
                .clock(clock)
                .build()
                .unwrap();
            v.ready().await;
            v
        }

        /// Echoes the subject and whether `authorization` was marked sensitive.
        fn echo() -> impl Service<
            Request<String>,
            Response = Response<String>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<String>, Infallible>> + Send + 'static,
        > + Clone
        + Send
        + 'static {
            tower::service_fn(|req: Request<String>| async move {
                let sub = req.extensions().get::<Claims>().map(|c| c.sub.clone()).unwrap_or_default();
                let sensitive = req.headers().get(AUTHORIZATION).is_some_and(HeaderValue::is_sensitive);
                Ok::<_, Infallible>(Response::new(format!("{sub} sensitive={sensitive}")))
            })
        }

        fn request(path: &str, token: Option<&str>, peer: Option<&[u8]>) -> Request<String> {
            let mut req = Request::builder().uri(path);
            if let Some(t) = token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let mut req = req.body(String::new()).unwrap();
            if let Some(der) = peer {
                req.extensions_mut().insert(PeerCertificate(CertificateDer::from(der.to_vec())));
            }
            req
        }

        #[tokio::test]
        async fn verified_request_reaches_the_service_with_claims_and_a_sensitive_header() {
            let key = TestKey::es256();
            let svc = RequireAuthLayer::new(verifier(&key).await).layer(echo());
            let token = key.sign(&claims(NOW, "j"));
            let resp = svc.oneshot(request("/x", Some(&token), None)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.body(), "alice sensitive=true");
        }

        #[tokio::test]
        async fn peer_certificate_extension_serves_certificate_bound_tokens() {
            let key = TestKey::es256();
            let svc = RequireAuthLayer::new(verifier(&key).await).layer(echo());
            let der = b"the caller's certificate".as_slice();
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
            let mut c = claims(NOW, "j");
            c["cnf"] = json!({ "x5t#S256": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, digest.as_ref()) });
            let token = key.sign(&c);
            let ok = svc.clone().oneshot(request("/x", Some(&token), Some(der))).await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK);
            let other = svc.clone().oneshot(request("/x", Some(&token), Some(b"another"))).await.unwrap();
            assert_eq!(other.status(), StatusCode::UNAUTHORIZED);
            let none = svc.oneshot(request("/x", Some(&token), None)).await.unwrap();
            assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
        }

        #[tokio::test]
        async fn unauthenticated_prefixes_pass_without_a_token_and_nothing_else_does() {
            let key = TestKey::es256();
            let svc = RequireAuthLayer::new(verifier(&key).await).allow_unauthenticated("/health").layer(echo());
            let open = svc.clone().oneshot(request("/healthz", None, None)).await.unwrap();
            assert_eq!((open.status(), open.body().as_str()), (StatusCode::OK, " sensitive=false"));
            let closed = svc.oneshot(request("/x", None, None)).await.unwrap();
            assert_eq!(closed.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(closed.headers()[WWW_AUTHENTICATE], "Bearer");
        }

        #[tokio::test]
        async fn requests_with_known_keys_complete_on_the_first_poll() {
            let key = TestKey::es256();
            let mut svc = RequireAuthLayer::new(verifier(&key).await).layer(echo());
            let token = key.sign(&claims(NOW, "j"));
            for _ in 0..2 {
                let resp = svc.call(request("/x", Some(&token), None)).now_or_never().unwrap().unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
            }
        }
    }

    #[test]
    fn bearer_token_debug_is_redacted() {
        assert_eq!(format!("{:?}", BearerToken("secret.token.value".into())), "BearerToken(..)");
    }
}
