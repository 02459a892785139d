//! [`RequireAuthLayer`] and [`RequireAuth`]: the tower middleware that asks
//! an [`AuthorizeRequest`] about every `http::Request` before it reaches the
//! service, so the same layer sits in a tonic server and in an axum router.
//! The decision is the authorizer's; the layer only routes it, the way
//! tower-http's `AsyncRequireAuthorization` does.
//!
//! With the `otel` feature, each checked request runs in a `request` span
//! (named after its route, e.g. `shop.v1.Inventory/Reserve`): the
//! authorizer's decision and the handler both happen inside it. The span
//! records the route and whether the request was refused, nothing from the
//! headers. It continues the caller's `traceparent` only from a trusted
//! caller ([`RequireAuthLayer::trust_incoming_trace`]; by default, one that
//! came over mTLS with a verified client certificate). Anyone else's
//! request starts a new trace, sampled by this service's own sampler: an
//! end user cannot join another trace or force sampling.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;

use super::authorize::AuthorizeRequest;
use super::verifier::Verifier;

/// Tower layer that lets a request through only when its authorizer
/// admits it; by default the authorizer is a [`Verifier`], which refuses
/// requests without a valid access token and hands handlers typed
/// [`Claims`](crate::Claims) and the raw [`BearerToken`](super::BearerToken)
/// (the [`Verifier`]'s `AuthorizeRequest` implementation describes its
/// refusals: gRPC statuses for gRPC requests, 401 or 503 otherwise).
/// Whatever the authorizer, the `authorization` header is marked sensitive.
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
///
/// Any [`AuthorizeRequest`] plugs in the same way, for example one that
/// verifies with the [`Verifier`] and then checks a permission:
/// `RequireAuthLayer::new(my_authorizer)`.
#[derive(Clone, Debug)]
pub struct RequireAuthLayer<A = Verifier> {
    authorizer: A,
    public: Arc<[String]>,
    trust_trace: TraceTrust,
}

/// Whose W3C trace context (`traceparent`) a [`RequireAuthLayer`] continues
/// (feature `otel`; without it no trace context is read at all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TraceTrust {
    /// Callers that came over mTLS with a client certificate the server
    /// verified (tonic's TLS connection info, or a [`PeerCertificate`]
    /// extension): the services of the mesh. Others start a new trace.
    ///
    /// [`PeerCertificate`]: super::PeerCertificate
    #[default]
    MutualTls,
    /// Every caller (only behind a proxy that strips or sets the header).
    Always,
    /// No caller: every request starts a new trace.
    Never,
}

impl<A> RequireAuthLayer<A> {
    /// A layer asking `authorizer` (a [`Verifier`], or any
    /// [`AuthorizeRequest`]).
    pub fn new(authorizer: A) -> Self {
        Self { authorizer, public: Arc::from(Vec::new()), trust_trace: TraceTrust::default() }
    }

    /// Whether a caller's `traceparent` is continued: `true`, from every
    /// caller; `false`, from none. Unset, from mTLS callers with a verified
    /// client certificate only ([`TraceTrust::MutualTls`]). An untrusted
    /// caller's context is ignored: its request starts a new trace, which
    /// this service's sampler (e.g. `otel::OtlpExport::sample_ratio`)
    /// decides on.
    pub fn trust_incoming_trace(mut self, trust: bool) -> Self {
        self.trust_trace = if trust { TraceTrust::Always } else { TraceTrust::Never };
        self
    }

    /// Whose `traceparent` is continued, as a [`TraceTrust`].
    pub fn trace_trust(mut self, trust: TraceTrust) -> Self {
        self.trust_trace = trust;
        self
    }

    /// Lets requests whose path starts with `prefix` through without asking
    /// the authorizer (health checks, reflection).
    pub fn allow_unauthenticated(mut self, prefix: impl Into<String>) -> Self {
        let mut v = self.public.to_vec();
        v.push(prefix.into());
        self.public = Arc::from(v);
        self
    }
}

impl<S, A: Clone> Layer<S> for RequireAuthLayer<A> {
    type Service = RequireAuth<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth {
            inner,
            authorizer: self.authorizer.clone(),
            public: Arc::clone(&self.public),
            trust_trace: self.trust_trace,
        }
    }
}

/// The service of [`RequireAuthLayer`].
#[derive(Clone, Debug)]
pub struct RequireAuth<S, A = Verifier> {
    inner: S,
    authorizer: A,
    public: Arc<[String]>,
    trust_trace: TraceTrust,
}

impl<S, A, ReqBody, ResBody> Service<Request<ReqBody>> for RequireAuth<S, A>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    A: AuthorizeRequest<ReqBody, ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<A::Future, S, ReqBody>;

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
            return ResponseFuture { state: State::Inner { future: self.inner.call(req) }, span: Span::none() };
        }
        #[cfg(feature = "otel")]
        let span = crate::otel::request_span(&req, self.trust_trace);
        #[cfg(not(feature = "otel"))]
        let span = {
            let _ = self.trust_trace;
            Span::none()
        };
        let authorize = span.in_scope(|| self.authorizer.authorize(req));
        // The service that was polled ready goes with the future; this one
        // keeps a fresh clone (tower's usual hand-over).
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        ResponseFuture { state: State::Authorize { authorize, service }, span }
    }
}

pin_project! {
    /// The future of [`RequireAuth`]: the authorizer's decision, then the
    /// inner service's response (or the refusal). With the [`Verifier`] both
    /// steps usually complete on the first poll.
    pub struct ResponseFuture<F, S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<F, S, B>,
        // The request's span (feature `otel`; `Span::none()` otherwise),
        // entered at every poll.
        span: Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, B>
    where
        S: Service<Request<B>>,
    {
        Authorize { #[pin] authorize: F, service: S },
        Inner { #[pin] future: S::Future },
    }
}

impl<F, S, B, R> Future for ResponseFuture<F, S, B>
where
    F: Future<Output = Result<Request<B>, Response<R>>>,
    S: Service<Request<B>, Response = Response<R>>,
{
    type Output = Result<Response<R>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut state = this.state;
        loop {
            let future = match state.as_mut().project() {
                StateProj::Authorize { authorize, service } => match ready!(authorize.poll(cx)) {
                    Ok(request) => service.call(request),
                    Err(refusal) => {
                        this.span.record("refused", true);
                        return Poll::Ready(Ok(refusal));
                    }
                },
                StateProj::Inner { future } => return future.poll(cx),
            };
            state.set(State::Inner { future });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;

    use futures_util::FutureExt as _;
    use futures_util::future::BoxFuture;
    use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
    use http::{HeaderValue, StatusCode};
    use rustls_pki_types::CertificateDer;
    use serde_json::json;
    use tower::ServiceExt as _;

    use super::*;
    use crate::ManualClock;
    use crate::claims::Claims;
    use crate::verify::observe::Recorder;
    use crate::verify::test_keys::{TestKey, claims};
    use crate::verify::{FeedOptions, JwksSource, PeerCertificate, RevocationFeed};

    const NOW: u64 = 1_700_000_000;

    async fn verifier(key: &TestKey) -> Verifier {
        observed_verifier(key, Arc::new(Recorder::default())).await
    }

    /// A verifier on `key` with a fresh feed, reporting to `events`.
    async fn observed_verifier(key: &TestKey, events: Arc<Recorder>) -> Verifier {
        let clock = ManualClock::new(NOW);
        let feed = RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions::default()).unwrap();
        feed.apply(auth_proto::auth::v1::RevocationEvent {
            event: Some(auth_proto::auth::v1::revocation_event::Event::Snapshot(Default::default())),
        });
        let v = Verifier::builder("auth-service", "inventory")
            .jwks(JwksSource::fixed(key.key_set()))
            .revocation(feed)
            .clock(clock)
            .observer(events)
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

    #[tokio::test]
    async fn each_checked_request_is_reported_once_with_its_outcome() {
        let key = TestKey::es256();
        let events = Arc::new(Recorder::default());
        let v = observed_verifier(&key, events.clone()).await;
        assert_eq!(events.take(), ["JwksRefreshed { keys: 1, trigger: Initial }"]);
        let svc = RequireAuthLayer::new(v.clone()).allow_unauthenticated("/health").layer(echo());
        let token = key.sign(&claims(NOW, "j"));
        let mut expired = claims(NOW, "j2");
        expired["exp"] = json!(NOW - 3_600);
        for (req, status) in [
            (request("/x", None, None), StatusCode::UNAUTHORIZED),
            (request("/x", Some(&token), None), StatusCode::OK),
            (request("/x", Some(&token), None), StatusCode::OK),
            (request("/x", Some(&key.sign(&expired)), None), StatusCode::UNAUTHORIZED),
            (request("/x", Some("a.b.c"), None), StatusCode::UNAUTHORIZED),
            (request("/healthz", None, None), StatusCode::OK),
        ] {
            assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), status);
        }
        assert_eq!(
            events.take(),
            [
                "Verified { result: Err(Missing), cache: Bypassed }",
                "Verified { result: Ok(()), cache: Miss }",
                "Verified { result: Ok(()), cache: Hit }",
                "Verified { result: Err(Expired), cache: Miss }",
                "Verified { result: Err(Malformed), cache: Miss }",
            ],
            "one event per checked request; none for the open path"
        );
        let stats = v.stats();
        assert_eq!((stats.accepted, stats.cache_hits, stats.cache_misses), (2, 1, 3));
        assert_eq!((stats.rejected("missing"), stats.rejected("expired"), stats.rejected("malformed")), (1, 1, 1));
    }

    /// Answers with the `traceparent` the handler would send on.
    #[cfg(feature = "otel")]
    fn trace_echo() -> impl Service<
        Request<String>,
        Response = Response<String>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<String>, Infallible>> + Send + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|_req: Request<String>| async move {
            let mut out = http::HeaderMap::new();
            crate::otel::inject_current(&mut out);
            let sent = out.get(crate::otel::TRACEPARENT).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            Ok::<_, Infallible>(Response::new(sent))
        })
    }

    #[cfg(feature = "otel")]
    #[tokio::test]
    async fn only_trusted_callers_traceparent_is_continued() {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
        use tracing_subscriber::layer::SubscriberExt as _;

        // A service sampling no new trace at all: whatever is sampled was
        // decided by a caller.
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0))))
            .build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);

        let key = TestKey::es256();
        let v = verifier(&key).await;
        let token = key.sign(&claims(NOW, "j"));
        const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
        let traced = |peer: Option<&[u8]>| {
            let mut req = request("/x", Some(&token), peer);
            req.headers_mut().insert(
                crate::otel::TRACEPARENT,
                HeaderValue::from_str(&format!("00-{CALLER_TRACE}-00f067aa0ba902b7-01")).unwrap(),
            );
            req
        };
        let sent = |resp: Response<String>| {
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body();
            assert_eq!(body.len(), 55, "a traceparent: {body:?}");
            body
        };

        // Default: a caller without a verified client certificate (an end
        // user on an HTTP front) starts a new trace, which this service's
        // sampler decides on.
        let default = RequireAuthLayer::new(v.clone()).layer(trace_echo());
        let anonymous = sent(default.clone().oneshot(traced(None)).await.unwrap());
        assert!(!anonymous.contains(CALLER_TRACE), "the caller's trace was adopted: {anonymous}");
        assert!(anonymous.ends_with("-00"), "the caller's sampled flag decided: {anonymous}");
        // An mTLS caller of the mesh continues its trace, sampled as it says.
        let mesh = sent(default.oneshot(traced(Some(b"mesh peer"))).await.unwrap());
        assert!(mesh.starts_with(&format!("00-{CALLER_TRACE}-")) && mesh.ends_with("-01"), "{mesh}");

        // Explicit settings win either way.
        let never = RequireAuthLayer::new(v.clone()).trust_incoming_trace(false).layer(trace_echo());
        let ignored = sent(never.oneshot(traced(Some(b"mesh peer"))).await.unwrap());
        assert!(!ignored.contains(CALLER_TRACE), "{ignored}");
        let always = RequireAuthLayer::new(v).trust_incoming_trace(true).layer(trace_echo());
        let followed = sent(always.oneshot(traced(None)).await.unwrap());
        assert!(followed.contains(CALLER_TRACE), "{followed}");
    }

    /// A custom authorizer: the verifier's decision, then a permission.
    /// Refuses with `PermissionDenied` (gRPC) or 403 (HTTP).
    #[derive(Clone)]
    struct RequirePerm {
        verifier: Verifier,
        perm: &'static str,
    }

    impl<B: Send + 'static, R: Default + Send + 'static> AuthorizeRequest<B, R> for RequirePerm {
        type Future = BoxFuture<'static, Result<Request<B>, Response<R>>>;

        fn authorize(&mut self, request: Request<B>) -> Self::Future {
            let grpc =
                request.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let verified = AuthorizeRequest::<B, R>::authorize(&mut self.verifier, request);
            let perm = self.perm;
            Box::pin(async move {
                let request = verified.await?;
                if request.extensions().get::<Claims>().is_some_and(|c| c.has_perm(perm)) {
                    return Ok(request);
                }
                if grpc {
                    return Err(tonic::Status::permission_denied("missing permission").into_http());
                }
                let mut forbidden = Response::new(R::default());
                *forbidden.status_mut() = StatusCode::FORBIDDEN;
                Err(forbidden)
            })
        }
    }

    fn grpc_request(token: Option<&str>) -> Request<tonic::body::Body> {
        let mut req = Request::builder().uri("/auth.v1.Auth/GetJwks").header(CONTENT_TYPE, "application/grpc");
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        req.body(tonic::body::Body::default()).unwrap()
    }

    fn grpc_status(resp: &Response<tonic::body::Body>) -> Option<&str> {
        resp.headers().get("grpc-status").map(|v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn custom_authorizer_serves_tonic_shaped_requests() {
        let key = TestKey::es256();
        let v = verifier(&key).await;
        let grpc_ok = tower::service_fn(|req: Request<tonic::body::Body>| async move {
            let mut resp = Response::new(tonic::body::Body::default());
            let sub = req.extensions().get::<Claims>().map(|c| c.sub.clone()).unwrap_or_default();
            resp.headers_mut().insert("grpc-status", HeaderValue::from_static("0"));
            resp.headers_mut().insert("x-sub", HeaderValue::from_str(&sub).unwrap());
            Ok::<_, Infallible>(resp)
        });
        let reader = RequireAuthLayer::new(RequirePerm { verifier: v.clone(), perm: "inventory:read" }).layer(grpc_ok);
        let writer = RequireAuthLayer::new(RequirePerm { verifier: v, perm: "inventory:reserve" }).layer(grpc_ok);
        let token = key.sign(&claims(NOW, "j"));

        let ok = reader.clone().oneshot(grpc_request(Some(&token))).await.unwrap();
        assert_eq!((grpc_status(&ok), ok.headers()["x-sub"].to_str().unwrap()), (Some("0"), "alice"));
        let denied = writer.oneshot(grpc_request(Some(&token))).await.unwrap();
        assert_eq!(grpc_status(&denied), Some("7"), "PermissionDenied");
        let unauthenticated = reader.oneshot(grpc_request(None)).await.unwrap();
        assert_eq!(grpc_status(&unauthenticated), Some("16"), "the verifier's refusal passes through");
    }

    #[tokio::test]
    async fn custom_authorizers_serve_axum_routers() {
        use axum::body::Body;
        use axum::routing::get;
        let key = TestKey::es256();
        let v = verifier(&key).await;
        let whoami = || get(|axum::Extension(c): axum::Extension<Claims>| async move { c.sub });
        let app = axum::Router::new()
            .route(
                "/read",
                whoami().layer(RequireAuthLayer::new(RequirePerm { verifier: v.clone(), perm: "inventory:read" })),
            )
            .route(
                "/reserve",
                whoami().layer(RequireAuthLayer::new(RequirePerm { verifier: v, perm: "inventory:reserve" })),
            );
        let request_to = |path: &str, token: Option<&str>| {
            let mut req = Request::builder().uri(path);
            if let Some(t) = token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            req.body(Body::empty()).unwrap()
        };
        let token = key.sign(&claims(NOW, "j"));
        let ok = app.clone().oneshot(request_to("/read", Some(&token))).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(axum::body::to_bytes(ok.into_body(), 64).await.unwrap(), "alice");
        assert_eq!(
            app.clone().oneshot(request_to("/reserve", Some(&token))).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
        let missing = app.clone().oneshot(request_to("/read", None)).await.unwrap();
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(missing.headers()[WWW_AUTHENTICATE], "Bearer");

        // A closure is an authorizer too.
        let api_key = |req: Request<Body>| async move {
            if req.headers().get("x-api-key").is_some_and(|k| k == "k-1") {
                return Ok(req);
            }
            let mut refusal = Response::new(Body::empty());
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refusal)
        };
        let app = axum::Router::new().route("/", get(|| async { "in" })).layer(RequireAuthLayer::new(api_key));
        let with_key = Request::builder().uri("/").header("x-api-key", "k-1").body(Body::empty()).unwrap();
        assert_eq!(app.clone().oneshot(with_key).await.unwrap().status(), StatusCode::OK);
        assert_eq!(app.oneshot(request_to("/", None)).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
}
