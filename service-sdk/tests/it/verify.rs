//! Verify side: RequireAuthLayer, JWKS cache, revocation feed, against a
//! real auth-server over mTLS.
//!
//! The protected service is a stub `auth.v1.Auth` whose `GetJwks` echoes the
//! verified claims, served over mTLS behind [`RequireAuthLayer`], with the
//! audience `inventory`. Forged tokens are signed with the auth server's
//! own key (read from its dev directory) unless the attack needs another
//! key, so every refusal below is the verifier's doing, not a bad signature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::stub::{self, Protected};
use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use aws_lc_rs::rand::SystemRandom;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use service_sdk::verify::JwksError;
use service_sdk::{
    AuthorizeRequest, BearerToken, Claims, FeedHealth, FeedOptions, JwksOptions, JwksSource, ManualClock,
    RequireAuthLayer, StalePolicy, Verifier, VerifyError, VerifyEvent, VerifyObserver,
};
use testkit::auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
use testkit::{TcpProxy, TestServer};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

const AUDIENCE: &str = "inventory";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ---------------------------------------------------------------------------
// The protected service

/// The protected stub: `GetJwks` answers with what the layer put into the
/// request extensions.
struct Probe;

#[tonic::async_trait]
impl Protected for Probe {
    async fn get_jwks(&self, req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        let claims = Claims::from_request(&req)?;
        let token = req.extensions().get::<BearerToken>().map(|t| t.as_str().len()).unwrap_or(0);
        let echo =
            json!({ "sub": claims.subject(), "jti": claims.jti, "token_len": token, "act": claims.actor_chain() });
        Ok(Response::new(pb::GetJwksResponse { jwks_json: echo.to_string() }))
    }
}

/// A running auth-server, a verifier fed by it, and the protected service.
struct Env {
    srv: TestServer,
    verifier: Verifier,
    service_addr: SocketAddr,
    signer: LoadedKey,
    issuer: String,
    service_task: tokio::task::JoinHandle<()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.service_task.abort();
    }
}

fn tls_to(srv: &TestServer, client: &str) -> ClientTlsConfig {
    let (cert, key) = srv.client_identity(client);
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(srv.ca_pem()))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost")
}

/// A lazily connecting mTLS channel (as dev client `order`) to `addr`.
fn lazy_channel(srv: &TestServer, addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls_to(srv, "order")).unwrap().connect_lazy()
}

/// Serves the probe behind the layer (asking `authorizer`, usually a
/// [`Verifier`]) on 127.0.0.1:0 over mTLS with the dev server certificate.
async fn serve_probe<A>(srv: &TestServer, authorizer: A) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    A: AuthorizeRequest<tonic::body::Body, tonic::body::Body> + Clone + Send + 'static,
    A::Future: Send + 'static,
{
    let read = |p: &str| std::fs::read_to_string(srv.dir.join(p)).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("server.pem"), read("server-key.pem")))
        .client_ca_root(Certificate::from_pem(srv.ca_pem()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .layer(RequireAuthLayer::new(authorizer))
        .add_service(stub::server(Probe));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(TcpListenerStream::new(listener)).await.unwrap();
    });
    (addr, task)
}

impl Env {
    async fn start() -> Self {
        let srv = TestServer::start().await;
        let channel = srv.channel("inventory").await;
        let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE).channel(channel).build().unwrap();
        Self::with_verifier(srv, verifier).await
    }

    async fn with_verifier(srv: TestServer, verifier: Verifier) -> Self {
        let issuer = srv.config().issuer.clone();
        let signer = LoadedKey::from_pem_file(KeyAlg::ES256, &srv.dir.join("keys/signing.pem")).unwrap();
        let (service_addr, service_task) = serve_probe(&srv, verifier.clone()).await;
        Self { srv, verifier, service_addr, signer, issuer, service_task }
    }

    /// A client of the protected service, presenting `client`'s certificate.
    async fn client(&self, client: &str) -> AuthClient<Channel> {
        let ch = Channel::from_shared(format!("https://{}", self.service_addr))
            .unwrap()
            .tls_config(tls_to(&self.srv, client))
            .unwrap()
            .connect()
            .await
            .unwrap();
        AuthClient::new(ch)
    }

    /// Calls the protected service with `token`; the echoed claims.
    async fn call(&self, client: &mut AuthClient<Channel>, token: &str) -> Result<Value, Status> {
        let mut req = Request::new(pb::GetJwksRequest {});
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let resp = client.get_jwks(req).await?;
        Ok(serde_json::from_str(&resp.into_inner().jwks_json).unwrap())
    }

    /// `order` as itself, for `inventory` (client-credentials grant).
    async fn service_token(&self) -> String {
        let (id, secret) = self.srv.client_credentials("order");
        let mut auth = AuthClient::new(self.srv.channel("order").await);
        let req = pb::LoginRequest {
            grant: Some(pb::login_request::Grant::ClientCredentials(pb::ClientCredentialsGrant {
                client_id: id,
                client_secret: secret,
            })),
            audience: vec![AUDIENCE.into()],
            scope: vec![],
        };
        auth.login(req).await.unwrap().into_inner().access_token
    }

    /// alice logs in (audience `order`); returns her token and refresh token.
    async fn alice_login(&self) -> (String, String) {
        let (user, password) = self.srv.user_password("alice");
        let mut auth = AuthClient::new(self.srv.channel("order").await);
        let req = pb::LoginRequest {
            grant: Some(pb::login_request::Grant::Password(pb::PasswordGrant { username: user, password })),
            audience: vec!["order".into()],
            scope: vec![],
        };
        let resp = auth.login(req).await.unwrap().into_inner();
        (resp.access_token, resp.refresh_token)
    }

    /// `order` exchanges alice's token for one addressed to `inventory`.
    async fn on_behalf_of(&self, subject_token: &str) -> String {
        let (id, secret) = self.srv.client_credentials("order");
        let mut auth = AuthClient::new(self.srv.channel("order").await);
        let req = pb::ExchangeTokenRequest {
            client_id: id,
            client_secret: secret,
            subject_token: subject_token.into(),
            audience: AUDIENCE.into(),
            scope: vec![],
            requested_ttl_seconds: 0,
        };
        auth.exchange_token(req).await.unwrap().into_inner().access_token
    }

    async fn revoke(&self, target: pb::revoke_request::Target, caller: Option<&str>) {
        let mut auth = AuthClient::new(self.srv.channel("order").await);
        let mut req = Request::new(pb::RevokeRequest { target: Some(target) });
        if let Some(t) = caller {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        auth.revoke(req).await.unwrap();
    }

    /// Claims that would be accepted now.
    fn claims(&self) -> Value {
        let now = now();
        json!({
            "iss": self.issuer, "sub": "alice", "aud": AUDIENCE,
            "exp": now + 300, "nbf": now, "iat": now, "jti": random_id(), "sid": random_id(),
            "client_id": "order", "perms": ["inventory:read"],
        })
    }

    fn header(&self) -> Value {
        json!({ "alg": "ES256", "kid": self.signer.kid(), "typ": "at+jwt" })
    }

    /// Signs any header and payload with the auth server's own key.
    fn forge(&self, header: &Value, payload: &str) -> String {
        let input = format!("{}.{}", b64(header.to_string()), b64(payload));
        let sig = self.signer.sign_raw(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", b64(sig))
    }

    fn forge_claims(&self, claims: &Value) -> String {
        self.forge(&self.header(), &claims.to_string())
    }

    /// The SHA-256 thumbprint (RFC 8705) of a dev client's certificate.
    fn thumbprint(&self, client: &str) -> String {
        let (pem, _) = self.srv.client_identity(client);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref()))
    }
}

fn b64(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b64(b)
}

/// The `sid` claim of a token (read without verification; test input only).
fn sid_of(token: &str) -> String {
    let payload = URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap();
    serde_json::from_slice::<Value>(&payload).unwrap()["sid"].as_str().unwrap().to_owned()
}

fn assert_refused(result: Result<Value, Status>, code: Code, why: VerifyError, case: &str) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), code, "{case}: {status:?}");
    assert_eq!(status.message(), why.to_string(), "{case}");
}

// ---------------------------------------------------------------------------
// Accepted

#[tokio::test]
async fn valid_tokens_pass_with_claims_and_raw_token_in_extensions() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;

    let token = env.service_token().await;
    let echo = env.call(&mut client, &token).await.unwrap();
    assert_eq!(echo["sub"], "svc:order");
    assert_eq!(echo["token_len"], token.len());

    let (alice, _) = env.alice_login().await;
    let obo = env.on_behalf_of(&alice).await;
    let echo = env.call(&mut client, &obo).await.unwrap();
    assert_eq!(echo["sub"], "alice");
    assert_eq!(echo["act"], json!(["svc:order"]));

    let stats = env.verifier.stats();
    assert_eq!(stats.accepted, 2);
    env.call(&mut client, &token).await.unwrap();
    assert!(env.verifier.stats().cache_hits >= 1, "the second call is a cache hit");
}

#[tokio::test]
async fn audience_given_as_an_array_is_accepted() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let mut c = env.claims();
    c["aud"] = json!(["order", AUDIENCE]);
    let echo = env.call(&mut client, &env.forge_claims(&c)).await.unwrap();
    assert_eq!(echo["sub"], "alice");
}

#[tokio::test]
async fn token_bound_to_the_callers_certificate_is_accepted() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let mut c = env.claims();
    c["cnf"] = json!({ "x5t#S256": env.thumbprint("order") });
    env.call(&mut client, &env.forge_claims(&c)).await.unwrap();
}

#[tokio::test]
async fn token_signed_by_a_freshly_rotated_key_is_accepted() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    env.call(&mut client, &env.service_token().await).await.unwrap();

    let old = LoadedKey::from_pem_file(KeyAlg::ES256, &env.srv.dir.join("keys/signing.pem")).unwrap();
    let new = LoadedKey::from_pem(KeyAlg::ES256, generate_pkcs8_pem(KeyAlg::ES256).unwrap().as_bytes()).unwrap();
    let new_kid = new.kid().to_owned();
    env.srv.keys().replace(new, vec![old]).unwrap();

    let token = env.service_token().await;
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["kid"], new_kid.as_str());
    let echo = env.call(&mut client, &token).await.unwrap();
    assert_eq!(echo["sub"], "svc:order");
}

#[tokio::test]
async fn key_rotation_under_load_fails_no_verification() {
    let env = Arc::new(Env::start().await);
    env.verifier.ready().await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (env, done, ok, failed) = (env.clone(), done.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut client = env.client("order").await;
            while !done.load(Ordering::SeqCst) {
                let token = env.service_token().await;
                match env.call(&mut client, &token).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(s) => {
                        eprintln!("verification failed under rotation: {s:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let wait_for = |n: usize| {
        let ok = ok.clone();
        async move {
            while ok.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(50).await;
    // Add a key (published, not yet signing), then switch signing to it.
    let old = LoadedKey::from_pem_file(KeyAlg::ES256, &env.srv.dir.join("keys/signing.pem")).unwrap();
    let pem = generate_pkcs8_pem(KeyAlg::ES256).unwrap();
    let new = LoadedKey::from_pem(KeyAlg::ES256, pem.as_bytes()).unwrap();
    env.srv.keys().replace(old, vec![new]).unwrap();
    let base = ok.load(Ordering::SeqCst);
    wait_for(base + 50).await;
    let old = LoadedKey::from_pem_file(KeyAlg::ES256, &env.srv.dir.join("keys/signing.pem")).unwrap();
    let new = LoadedKey::from_pem(KeyAlg::ES256, pem.as_bytes()).unwrap();
    env.srv.keys().replace(new, vec![old]).unwrap();
    let base = ok.load(Ordering::SeqCst);
    wait_for(base + 100).await;
    done.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    println!(
        "key rotation under load: {} verified, {} failed",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn cached_token_is_refused_once_its_key_leaves_the_jwks() {
    let srv = TestServer::start().await;
    let events = Events::default();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .channel(srv.channel("inventory").await)
        .jwks_options(JwksOptions { refresh_interval: Duration::from_millis(50), ..JwksOptions::default() })
        .observer(events.clone())
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    env.call(&mut client, &token).await.unwrap();
    assert_eq!(env.verifier.stats().cache_hits, 1, "the token is cached");

    // The compromise drill: sign with a new key and drop the old one from
    // the JWKS. Two refreshes later the verifier surely holds the new set.
    let new = LoadedKey::from_pem(KeyAlg::ES256, generate_pkcs8_pem(KeyAlg::ES256).unwrap().as_bytes()).unwrap();
    env.srv.keys().replace(new, vec![]).unwrap();
    let seen = events.count("JwksRefreshed");
    events.wait_for("JwksRefreshed", seen + 2).await;
    assert_refused(
        env.call(&mut client, &token).await,
        Code::Unauthenticated,
        VerifyError::UnknownKid,
        "cached, key gone",
    );
    env.call(&mut client, &env.service_token().await).await.unwrap();
}

// ---------------------------------------------------------------------------
// Refused: the attack corpus

#[tokio::test]
async fn attack_corpus_is_refused_with_unauthenticated() {
    use VerifyError::*;
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let valid = env.service_token().await;
    let (_, refresh_token) = env.alice_login().await;
    let claims = env.claims();
    let payload = claims.to_string();
    let kid = env.signer.kid().to_owned();
    let with = |k: &str, v: Value| {
        let mut c = env.claims();
        c[k] = v;
        env.forge_claims(&c)
    };
    let without = |k: &str| {
        let mut c = env.claims();
        c.as_object_mut().unwrap().remove(k);
        env.forge_claims(&c)
    };
    let header_with = |k: &str, v: Value| {
        let mut h = env.header();
        h[k] = v;
        env.forge(&h, &payload)
    };
    let now = now();

    // alg none: without and with a (meaningless) signature.
    let none = json!({ "alg": "none", "kid": kid, "typ": "at+jwt" });
    let none_unsigned = format!("{}.{}.", b64(none.to_string()), b64(&payload));
    let none_signed = format!("{}.{}.{}", b64(none.to_string()), b64(&payload), b64("sig"));

    // HS256 keyed with the published public key.
    let jwks = pb::GetJwksRequest {};
    let public = AuthClient::new(env.srv.channel("order").await).get_jwks(jwks).await.unwrap().into_inner().jwks_json;
    let hs_header = json!({ "alg": "HS256", "kid": kid, "typ": "at+jwt" });
    let hs_input = format!("{}.{}", b64(hs_header.to_string()), b64(&payload));
    let hs_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, public.as_bytes());
    let hs256 = format!("{hs_input}.{}", b64(aws_lc_rs::hmac::sign(&hs_key, hs_input.as_bytes())));

    // RS256 header on the EC key, really RSA-signed.
    let rsa = aws_lc_rs::signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let rs_header = json!({ "alg": "RS256", "kid": kid, "typ": "at+jwt" });
    let rs_input = format!("{}.{}", b64(rs_header.to_string()), b64(&payload));
    let mut rs_sig = vec![0u8; rsa.public_modulus_len()];
    rsa.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &SystemRandom::new(), rs_input.as_bytes(), &mut rs_sig).unwrap();
    let rs256 = format!("{rs_input}.{}", b64(rs_sig));

    // Another key, under our kid and under its own.
    let other = LoadedKey::from_pem(KeyAlg::ES256, generate_pkcs8_pem(KeyAlg::ES256).unwrap().as_bytes()).unwrap();
    let other_input = format!("{}.{}", b64(env.header().to_string()), b64(&payload));
    let other_sig = other.sign_raw(&SystemRandom::new(), other_input.as_bytes()).unwrap();
    let foreign_signature = format!("{other_input}.{}", b64(other_sig));
    let own_kid = other.sign_claims(&SystemRandom::new(), &serde_json::from_value(claims.clone()).unwrap()).unwrap();

    // One flipped bit in a real token's payload.
    let parts: Vec<&str> = valid.split('.').collect();
    let mut body = URL_SAFE_NO_PAD.decode(parts[1]).unwrap();
    let at = body.iter().position(|b| *b == b'o').unwrap(); // in "svc:order"
    body[at] ^= 0x01;
    let flipped = format!("{}.{}.{}", parts[0], b64(body), parts[2]);

    let mut pad = env.claims();
    pad["pad"] = json!("x".repeat(9 * 1024));

    let dup = format!(
        r#"{{"iss":"{}","sub":"alice","sub":"admin","aud":"{AUDIENCE}","exp":{},"nbf":{now},"iat":{now},"jti":"j","client_id":"order"}}"#,
        env.issuer,
        now + 300
    );

    let corpus: Vec<(&str, String, VerifyError)> = vec![
        ("alg none, unsigned", none_unsigned, Malformed),
        ("alg none, signed", none_signed, ForbiddenAlg),
        ("HS256 with the public key as secret", hs256, ForbiddenAlg),
        ("RS256 header on an EC key", rs256, AlgMismatch),
        ("unknown kid", own_kid, UnknownKid),
        ("kid with path characters", header_with("kid", json!("../../keys/signing.pem")), UnknownKid),
        ("kid with SQL characters", header_with("kid", json!("x' OR '1'='1' --")), UnknownKid),
        (
            "no kid",
            {
                let mut h = env.header();
                h.as_object_mut().unwrap().remove("kid");
                env.forge(&h, &payload)
            },
            UnknownKid,
        ),
        ("jku header", header_with("jku", json!("https://evil.example/jwks.json")), ForbiddenHeader),
        ("x5u header", header_with("x5u", json!("https://evil.example/cert.pem")), ForbiddenHeader),
        ("x5c header", header_with("x5c", json!(["MIIB"])), ForbiddenHeader),
        ("jwk header", header_with("jwk", json!({ "kty": "EC" })), ForbiddenHeader),
        ("crit header", header_with("crit", json!(["exp"])), ForbiddenHeader),
        ("typ JWT", header_with("typ", json!("JWT")), WrongType),
        (
            "no typ",
            {
                let mut h = env.header();
                h.as_object_mut().unwrap().remove("typ");
                env.forge(&h, &payload)
            },
            WrongType,
        ),
        ("refresh token as access token", refresh_token, Malformed),
        ("signature stripped", format!("{}.{}.", parts[0], parts[1]), Malformed),
        ("signature part missing", format!("{}.{}", parts[0], parts[1]), Malformed),
        ("signature from another key", foreign_signature, BadSignature),
        ("one flipped bit in the payload", flipped, BadSignature),
        ("expired", with("exp", json!(now - 3600)), Expired),
        ("not yet valid", with("nbf", json!(now + 3600)), NotYetValid),
        ("iat in the future", with("iat", json!(now + 3600)), IssuedInFuture),
        ("wrong issuer", with("iss", json!("evil-issuer")), WrongIssuer),
        ("wrong audience", with("aud", json!("order")), WrongAudience),
        ("audience as an empty array", with("aud", json!([])), WrongAudience),
        ("missing jti", without("jti"), BadClaims),
        ("empty jti", with("jti", json!("")), MissingJti),
        ("missing exp", without("exp"), BadClaims),
        ("over the size limit", env.forge_claims(&pad), TooLarge),
        ("garbage base64", "!!!.@@@.###".into(), Malformed),
        ("two dots only", "..".into(), Malformed),
        ("payload an array", env.forge(&env.header(), "[1,2,3]"), BadClaims),
        ("payload a string", env.forge(&env.header(), "\"alice\""), BadClaims),
        ("duplicate claim names", env.forge(&env.header(), &dup), BadClaims),
        ("cnf of another certificate", with("cnf", json!({ "x5t#S256": env.thumbprint("inventory") })), CnfMismatch),
    ];
    for (case, token, why) in corpus {
        assert_refused(env.call(&mut client, &token).await, Code::Unauthenticated, why, case);
    }
    // And the untouched token still passes: every refusal was the attack's.
    env.call(&mut client, &valid).await.unwrap();
}

#[tokio::test]
async fn missing_or_non_bearer_credentials_are_unauthenticated() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let status = client.get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut req = Request::new(pb::GetJwksRequest {});
    req.metadata_mut().insert("authorization", "Basic b3JkZXI6c2VjcmV0".parse().unwrap());
    assert_eq!(client.get_jwks(req).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(env.verifier.stats().rejected("missing"), 2);
}

#[tokio::test]
async fn revoked_jti_and_revoked_sid_are_refused() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;

    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    env.revoke(pb::revoke_request::Target::AccessToken(token.clone()), None).await;
    wait_refused(&env, &mut client, &token).await;
    assert_refused(env.call(&mut client, &token).await, Code::Unauthenticated, VerifyError::Revoked, "revoked jti");

    let (alice, refresh) = env.alice_login().await;
    let obo = env.on_behalf_of(&alice).await;
    env.call(&mut client, &obo).await.unwrap();
    assert_eq!(sid_of(&obo), sid_of(&alice), "the exchanged token carries alice's session");
    // Logout by the session's refresh token: revokes alice's sid.
    env.revoke(pb::revoke_request::Target::SessionRefreshToken(refresh), None).await;
    wait_refused(&env, &mut client, &obo).await;
    assert_refused(env.call(&mut client, &obo).await, Code::Unauthenticated, VerifyError::Revoked, "revoked sid");
}

/// Polls until the layer accepts `token` again (after the feed comes back);
/// fails the test if that takes longer than 30 s.
async fn wait_accepted(env: &Env, client: &mut AuthClient<Channel>, token: &str) {
    let polled = tokio::time::timeout(Duration::from_secs(30), async {
        while env.call(client, token).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if polled.await.is_err() {
        panic!("the token is still refused 30 s after the feed came back: {:?}", env.call(client, token).await.err());
    }
}

/// Polls until the layer refuses `token`; returns how long that took.
async fn wait_refused(env: &Env, client: &mut AuthClient<Channel>, token: &str) -> Duration {
    let start = Instant::now();
    while env.call(client, token).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn revocation_push_reaches_the_layer_quickly() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let mut samples = Vec::new();
    for _ in 0..20 {
        let token = env.service_token().await;
        env.call(&mut client, &token).await.unwrap();
        env.revoke(pb::revoke_request::Target::AccessToken(token.clone()), None).await;
        samples.push(wait_refused(&env, &mut client, &token).await);
    }
    samples.sort();
    println!(
        "revocation push, Revoke response -> refused by the layer ({} samples): p50 {:?}, max {:?}",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
}

// ---------------------------------------------------------------------------
// Availability: keys and feed

#[tokio::test]
async fn requests_are_unavailable_until_keys_load_then_accepted() {
    let srv = TestServer::start().await;
    let proxy = TcpProxy::start(srv.grpc_addr).await;
    proxy.cut();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .channel(lazy_channel(&srv, proxy.addr()))
        .feed_options(FeedOptions { max_backoff: Duration::from_millis(200), ..FeedOptions::default() })
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    let mut client = env.client("order").await;
    let token = env.service_token().await;
    assert_refused(env.call(&mut client, &token).await, Code::Unavailable, VerifyError::NoKeys, "no keys yet");
    proxy.restore();
    env.verifier.ready().await;
    env.call(&mut client, &token).await.unwrap();
}

#[tokio::test]
async fn stale_feed_fails_closed_and_recovers_when_the_feed_returns() {
    let srv = TestServer::start().await;
    let proxy = TcpProxy::start(srv.grpc_addr).await;
    let clock = ManualClock::new(now());
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .channel(lazy_channel(&srv, proxy.addr()))
        .clock(clock.clone())
        .feed_options(FeedOptions { max_backoff: Duration::from_millis(200), ..FeedOptions::default() })
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();

    proxy.cut();
    // A revocation the verifier cannot hear about while cut off.
    let revoked = env.service_token().await;
    env.call(&mut client, &revoked).await.unwrap();
    env.revoke(pb::revoke_request::Target::AccessToken(revoked.clone()), None).await;
    clock.advance(31);
    assert_refused(env.call(&mut client, &token).await, Code::Unavailable, VerifyError::FeedStale, "stale feed");

    proxy.restore();
    wait_accepted(&env, &mut client, &token).await;
    // The reconnect snapshot carried the revocation missed while away.
    assert_refused(
        env.call(&mut client, &revoked).await,
        Code::Unauthenticated,
        VerifyError::Revoked,
        "missed revocation",
    );
}

#[tokio::test]
async fn serving_last_known_keeps_traffic_through_a_silence_refusing_known_revocations() {
    let srv = TestServer::start().await;
    let proxy = TcpProxy::start(srv.grpc_addr).await;
    let clock = ManualClock::new(now());
    let events = Events::default();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .channel(lazy_channel(&srv, proxy.addr()))
        .clock(clock.clone())
        .feed_options(FeedOptions {
            on_stale: StalePolicy::ServeLastKnown { up_to: Duration::from_secs(60) },
            max_backoff: Duration::from_millis(200),
            ..FeedOptions::default()
        })
        .observer(events.clone())
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    let known = env.service_token().await;
    env.call(&mut client, &known).await.unwrap();
    env.revoke(pb::revoke_request::Target::AccessToken(known.clone()), None).await;
    wait_refused(&env, &mut client, &known).await;
    let feed = |env: &Env| env.verifier.stats().feed.unwrap();
    assert_eq!((feed(&env).health, feed(&env).entries, feed(&env).reconnects), (FeedHealth::Fresh, 1, 0));

    proxy.cut();
    events.wait_for("FeedDisconnected", 1).await;
    // A revocation the verifier cannot hear about while cut off.
    let unseen = env.service_token().await;
    env.revoke(pb::revoke_request::Target::AccessToken(unseen.clone()), None).await;
    clock.advance(31);
    env.call(&mut client, &token).await.unwrap();
    env.call(&mut client, &unseen).await.expect("the price of serving stale: unseen revocations pass");
    assert_refused(env.call(&mut client, &known).await, Code::Unauthenticated, VerifyError::Revoked, "known");
    let stale = feed(&env);
    assert_eq!((stale.health, stale.served_stale, stale.stale_episodes), (FeedHealth::ServingStale, 2, 1));
    assert_eq!((events.count("FeedServingStale"), events.count("ServedStale")), (1, 2));

    clock.advance(60);
    assert_refused(env.call(&mut client, &token).await, Code::Unavailable, VerifyError::FeedStale, "past up_to");
    assert_eq!(feed(&env).health, FeedHealth::Stale);
    assert_eq!(events.count("FeedStale"), 1);

    proxy.restore();
    wait_accepted(&env, &mut client, &token).await;
    // The reconnect snapshot carried the revocation missed while away.
    assert_refused(env.call(&mut client, &unseen).await, Code::Unauthenticated, VerifyError::Revoked, "unseen");
    let back = feed(&env);
    assert_eq!((back.health, back.entries, back.stale_episodes, back.served_stale), (FeedHealth::Fresh, 2, 1, 2));
    assert!(back.reconnects >= 1, "{back:?}");
}

/// Serves `body` as the answer to every HTTP/1.1 request, over TLS with the
/// dev server certificate (SAN `localhost`).
async fn serve_https_once_per_connection(srv: &TestServer, body: String) -> (u16, tokio::task::JoinHandle<()>) {
    use rustls_pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let read = |p: &str| std::fs::read(srv.dir.join(p)).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("server.pem")).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(&read("server-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/jwk-set+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(body.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn keys_load_from_an_https_jwks_url_trusting_only_the_configured_ca() {
    let srv = TestServer::start().await;
    let jwks = AuthClient::new(srv.channel("order").await)
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks_json;
    let (port, https) = serve_https_once_per_connection(&srv, jwks).await;
    let url = format!("https://localhost:{port}/.well-known/jwks.json");

    // Trusting another CA, the fetch fails at the TLS handshake.
    let other_ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let distrusting = JwksSource::https(&url, &other_ca).unwrap().fetch().await;
    assert!(matches!(distrusting, Err(JwksError::Transport(_))), "{distrusting:?}");
    assert!(JwksSource::https(&url, &srv.ca_pem()).unwrap().fetch().await.is_ok());

    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .jwks(JwksSource::https(&url, &srv.ca_pem()).unwrap())
        .channel(srv.channel("inventory").await)
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;
    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    https.abort();
}

// ---------------------------------------------------------------------------
// Pluggable authorization and the observer

/// A custom authorizer: the verifier's decision, then `inventory:admin`.
#[derive(Clone)]
struct AdminOnly(Verifier);

impl AuthorizeRequest<tonic::body::Body, tonic::body::Body> for AdminOnly {
    type Future = futures_util::future::BoxFuture<
        'static,
        Result<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>>,
    >;

    fn authorize(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let verified = self.0.authorize(request);
        Box::pin(async move {
            let request = verified.await?;
            match request.extensions().get::<Claims>() {
                Some(claims) if claims.has_perm("inventory:admin") => Ok(request),
                _ => Err(Status::permission_denied("needs inventory:admin").into_http()),
            }
        })
    }
}

#[tokio::test]
async fn custom_authorizer_around_the_verifier_guards_a_tonic_server() {
    let env = Env::start().await;
    env.verifier.ready().await;
    let (addr, task) = serve_probe(&env.srv, AdminOnly(env.verifier.clone())).await;
    let ch = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls_to(&env.srv, "order"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AuthClient::new(ch);

    let mut admin = env.claims();
    admin["perms"] = json!(["inventory:admin"]);
    let echo = env.call(&mut client, &env.forge_claims(&admin)).await.unwrap();
    assert_eq!(echo["sub"], "alice");
    let denied = env.call(&mut client, &env.forge_claims(&env.claims())).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let missing = client.get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "the verifier's own refusal passes through");
    let stats = env.verifier.stats();
    assert_eq!((stats.accepted, stats.rejected("missing")), (2, 1));
    task.abort();
}

/// Keeps every event's `Debug` text.
#[derive(Clone, Default)]
struct Events(Arc<std::sync::Mutex<Vec<String>>>);

impl VerifyObserver for Events {
    fn on_event(&self, event: &VerifyEvent<'_>) {
        self.0.lock().unwrap().push(format!("{event:?}"));
    }
}

impl Events {
    fn count(&self, prefix: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|e| e.starts_with(prefix)).count()
    }

    async fn wait_for(&self, prefix: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count(prefix) < n {
            assert!(Instant::now() < deadline, "no {n} x {prefix} in {:?}", self.0.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn observer_sees_keys_the_feed_coming_and_going_and_each_verification() {
    let srv = TestServer::start().await;
    let proxy = TcpProxy::start(srv.grpc_addr).await;
    let events = Events::default();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .channel(lazy_channel(&srv, proxy.addr()))
        .feed_options(FeedOptions { max_backoff: Duration::from_millis(200), ..FeedOptions::default() })
        .observer(events.clone())
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    events.wait_for("FeedSnapshot", 1).await;
    assert_eq!(events.count("JwksRefreshed { keys: 1, trigger: Initial }"), 1);
    assert_eq!((events.count("FeedConnected"), events.count("FeedSnapshot")), (1, 1));

    let mut client = env.client("order").await;
    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    env.call(&mut client, &token).await.unwrap();
    client.get_jwks(pb::GetJwksRequest {}).await.unwrap_err();
    assert_eq!(events.count("Verified { result: Ok(()), cache: Miss }"), 1);
    assert_eq!(events.count("Verified { result: Ok(()), cache: Hit }"), 1);
    assert_eq!(events.count("Verified { result: Err(Missing), cache: Bypassed }"), 1);
    assert_eq!(events.count("Verified"), 3, "one event per request");

    proxy.cut();
    events.wait_for("FeedDisconnected", 1).await;
    proxy.restore();
    events.wait_for("FeedConnected", 2).await;
    events.wait_for("FeedSnapshot", 2).await;
}

// ---------------------------------------------------------------------------
// axum

async fn http_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, Option<String>, String) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header(http::header::HOST, "localhost");
    if let Some(a) = auth {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let resp = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp.headers().get(http::header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, challenge, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn axum_route_is_protected_with_a_bearer_challenge() {
    use axum::routing::get;
    let env = Env::start().await;
    env.verifier.ready().await;
    let app = axum::Router::new()
        .route("/whoami", get(|axum::Extension(claims): axum::Extension<Claims>| async move { claims.sub }))
        .route("/healthz", get(|| async { "ok" }))
        .layer(RequireAuthLayer::new(env.verifier.clone()).allow_unauthenticated("/healthz"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let alice = env.forge_claims(&env.claims());
    assert_eq!(http_get(addr, "/whoami", Some(&format!("Bearer {alice}"))).await, (200, None, "alice".into()));
    // Order's own token is bound to its certificate (RFC 8705): over plain
    // HTTP, with no certificate, it is refused.
    let bound = env.service_token().await;
    let (status, challenge, _) = http_get(addr, "/whoami", Some(&format!("Bearer {bound}"))).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer error=\"invalid_token\"")));
    let (status, challenge, _) = http_get(addr, "/whoami", None).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer")));
    let (status, challenge, _) = http_get(addr, "/whoami", Some("Bearer not.a.token")).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer error=\"invalid_token\"")));
    let mut c = env.claims();
    c["exp"] = json!(now() - 3600);
    let (status, challenge, _) = http_get(addr, "/whoami", Some(&format!("Bearer {}", env.forge_claims(&c)))).await;
    assert_eq!((status, challenge.as_deref()), (401, Some("Bearer error=\"invalid_token\"")));
    assert_eq!(http_get(addr, "/healthz", None).await.0, 200);
    server.abort();
}

// ---------------------------------------------------------------------------
// redis mode

#[tokio::test]
async fn redis_mode_refuses_revoked_tokens_and_fails_closed_without_redis() {
    use service_sdk::verify::RedisRevocation;
    use testkit::RedisProcess;
    let mut redis = RedisProcess::start();
    let srv = TestServer::builder().store_url(redis.url()).start().await;
    let prefix = srv.config().redis().unwrap().prefix.clone();
    let check = RedisRevocation::connect(&redis.url(), &prefix, Duration::from_millis(500)).unwrap();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .jwks(JwksSource::grpc(srv.channel("inventory").await))
        .revocation(check)
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;

    // By jti.
    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    env.revoke(pb::revoke_request::Target::AccessToken(token.clone()), None).await;
    assert_refused(env.call(&mut client, &token).await, Code::Unauthenticated, VerifyError::Revoked, "jti");

    // By sid (a cached token: the lookup runs on every request).
    let (alice, refresh) = env.alice_login().await;
    let obo = env.on_behalf_of(&alice).await;
    env.call(&mut client, &obo).await.unwrap();
    assert_eq!(sid_of(&obo), sid_of(&alice), "the exchanged token carries alice's session");
    // Logout by the session's refresh token: revokes alice's sid.
    env.revoke(pb::revoke_request::Target::SessionRefreshToken(refresh), None).await;
    assert_refused(env.call(&mut client, &obo).await, Code::Unauthenticated, VerifyError::Revoked, "sid");

    // Redis gone: fail closed.
    let live = env.service_token().await;
    env.call(&mut client, &live).await.unwrap();
    redis.kill();
    assert_refused(
        env.call(&mut client, &live).await,
        Code::Unavailable,
        VerifyError::RevocationUnavailable,
        "redis down",
    );
}

/// A server with an explicit `redis.layout` the URL does not suggest
/// (`sharded` on a plain `redis://` URL): the SDK's Redis mode reads the
/// layout the server recorded in the layout marker, so it finds the deny
/// entries where the server wrote them. Inferring the layout from the URL
/// read other keys, and passed revoked tokens.
#[tokio::test]
async fn redis_mode_reads_the_servers_recorded_layout_not_the_one_the_url_suggests() {
    use service_sdk::redis_layout::KeyLayout;
    use service_sdk::verify::RedisRevocation;
    use testkit::RedisProcess;
    use testkit::auth_server::config::RedisLayout;
    let redis = RedisProcess::start();
    let srv = TestServer::builder()
        .store_url(redis.url())
        .configure(|raw| raw.redis.layout = RedisLayout::Sharded)
        .start()
        .await;
    let prefix = srv.config().redis().unwrap().prefix.clone();
    assert!(!KeyLayout::for_url(&prefix, &redis.url()).is_sharded(), "the URL suggests the single-slot layout");
    assert_eq!(redis.command(&["GET", &KeyLayout::marker_key(&prefix)]).text(), "sharded|1");
    let check = RedisRevocation::connect(&redis.url(), &prefix, Duration::from_millis(500)).unwrap();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .jwks(JwksSource::grpc(srv.channel("inventory").await))
        .revocation(check)
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    env.verifier.ready().await;
    let mut client = env.client("order").await;

    let token = env.service_token().await;
    env.call(&mut client, &token).await.unwrap();
    env.revoke(pb::revoke_request::Target::AccessToken(token.clone()), None).await;
    assert_refused(env.call(&mut client, &token).await, Code::Unauthenticated, VerifyError::Revoked, "jti");

    let (alice, refresh) = env.alice_login().await;
    let obo = env.on_behalf_of(&alice).await;
    env.call(&mut client, &obo).await.unwrap();
    env.revoke(pb::revoke_request::Target::SessionRefreshToken(refresh), None).await;
    assert_refused(env.call(&mut client, &obo).await, Code::Unauthenticated, VerifyError::Revoked, "sid");
}

/// Without a layout marker (no auth server has connected to this Redis
/// with this prefix yet) the SDK's Redis mode fails closed; with one, it
/// answers in the layout the marker names; one that names another layout
/// than asked for, or an unknown format, fails closed.
#[tokio::test]
async fn redis_mode_fails_closed_without_a_layout_marker_or_with_another_one() {
    use service_sdk::redis_layout::KeyLayout;
    use service_sdk::verify::{RedisRevocation, RevocationCheck, RevocationLookup};
    use testkit::RedisProcess;
    let redis = RedisProcess::start();
    let timeout = Duration::from_millis(500);
    let lookup = |check: &RedisRevocation| match check.check("jti-1", Some("sid-1"), 1) {
        RevocationLookup::Pending(f) => f,
        RevocationLookup::Ready(_) => panic!("redis mode looks up"),
    };
    let check = RedisRevocation::connect(&redis.url(), "auth", timeout).unwrap();
    assert!(matches!(lookup(&check).await, Err(VerifyError::RevocationUnavailable)), "no marker yet");

    // A marker of another format version: still refused.
    redis.command(&["SET", "{auth}:layout", "sharded|2"]);
    assert!(matches!(lookup(&check).await, Err(VerifyError::RevocationUnavailable)), "unknown format");

    redis.command(&["SET", "{auth}:layout", "sharded|1"]);
    check.ready().await;
    assert!(lookup(&check).await.is_ok(), "the marker names a layout");
    // A session revoked where the sharded layout keeps it is found.
    let sessions = KeyLayout::sharded("auth").deny_sid("sid-1");
    redis.command(&["ZADD", &sessions, "100", "sid-1"]);
    assert!(matches!(lookup(&check).await, Err(VerifyError::Revoked)));

    // Built for the single-slot layout, facing a sharded one: refused.
    let single = RedisRevocation::connect_with_layout(&redis.url(), KeyLayout::new("auth"), timeout).unwrap();
    assert!(matches!(lookup(&single).await, Err(VerifyError::RevocationUnavailable)), "another layout");
    let sharded = RedisRevocation::connect_with_layout(&redis.url(), KeyLayout::sharded("auth"), timeout).unwrap();
    assert!(matches!(lookup(&sharded).await, Err(VerifyError::Revoked)));
}

/// The marker is read again while the check runs: a Redis flushed (or
/// replaced) under a running verifier, whose auth servers come back with
/// the other layout, is noticed within `MARKER_RECHECK_SECS` and fails
/// closed, rather than reading the old layout's keys and passing tokens
/// revoked in the new one. A marker gone (a flush, before the auth servers
/// write it back) is tolerated for `MARKER_ABSENT_GRACE_SECS`, then fails
/// closed until it is back.
#[tokio::test]
async fn redis_mode_rereads_the_layout_marker_and_fails_closed_when_it_changes_or_stays_gone() {
    use service_sdk::redis_layout::KeyLayout;
    use service_sdk::verify::{RedisRevocation, RevocationCheck, RevocationLookup};
    use testkit::RedisProcess;
    const RECHECK: u64 = RedisRevocation::MARKER_RECHECK_SECS;
    const GRACE: u64 = RedisRevocation::MARKER_ABSENT_GRACE_SECS;
    let redis = RedisProcess::start();
    let lookup = |check: &RedisRevocation, sid: &str, now: u64| match check.check("jti-1", Some(sid), now) {
        RevocationLookup::Pending(f) => f,
        RevocationLookup::Ready(_) => panic!("redis mode looks up"),
    };
    // Verification time, far from the deny entries' expiry.
    let t0 = 1_000_000;
    let until = "9999999999";
    let (single, sharded) = (KeyLayout::new("auth"), KeyLayout::sharded("auth"));
    redis.command(&["SET", "{auth}:layout", "single|1"]);
    redis.command(&["ZADD", &single.deny_sid("sid-old"), until, "sid-old"]);
    let check = RedisRevocation::connect(&redis.url(), "auth", Duration::from_millis(500)).unwrap();
    let pinned =
        RedisRevocation::connect_with_layout(&redis.url(), single.clone(), Duration::from_millis(500)).unwrap();
    for check in [&check, &pinned] {
        assert!(matches!(lookup(check, "sid-old", t0).await, Err(VerifyError::Revoked)), "reads the single layout");
        assert!(lookup(check, "sid-new", t0).await.is_ok());
    }

    // Redis flushed, the auth servers back with the sharded layout, and a
    // session revoked there.
    redis.command(&["FLUSHALL"]);
    redis.command(&["SET", "{auth}:layout", "sharded|1"]);
    redis.command(&["ZADD", &sharded.deny_sid("sid-new"), until, "sid-new"]);
    for (name, check) in [("connect", &check), ("connect_with_layout", &pinned)] {
        // Within the recheck bound the marker read stands.
        assert!(lookup(check, "sid-new", t0 + RECHECK - 1).await.is_ok(), "{name}");
        // Past it, the marker is read again: another layout refuses, at
        // every lookup, rather than reading the old layout's keys.
        for now in [t0 + RECHECK, t0 + RECHECK + 1, t0 + 10 * RECHECK] {
            assert!(
                matches!(lookup(check, "sid-new", now).await, Err(VerifyError::RevocationUnavailable)),
                "{name}: the marker names another layout at {now}"
            );
        }
    }

    // The marker names the single layout again: answers again.
    redis.command(&["SET", "{auth}:layout", "single|1"]);
    let t1 = t0 + 20 * RECHECK;
    for check in [&check, &pinned] {
        assert!(lookup(check, "sid-new", t1).await.is_ok());
        redis.command(&["ZADD", &single.deny_sid("sid-again"), until, "sid-again"]);
        assert!(matches!(lookup(check, "sid-again", t1).await, Err(VerifyError::Revoked)));
    }

    // The marker gone: the layout it last named is read for the grace,
    // then every lookup refuses until the marker is back.
    redis.command(&["DEL", "{auth}:layout"]);
    for check in [&check, &pinned] {
        assert!(matches!(lookup(check, "sid-again", t1 + RECHECK).await, Err(VerifyError::Revoked)));
        assert!(lookup(check, "sid-other", t1 + GRACE - 1).await.is_ok(), "within the grace");
        assert!(
            matches!(lookup(check, "sid-other", t1 + GRACE).await, Err(VerifyError::RevocationUnavailable)),
            "past the grace"
        );
    }
    redis.command(&["SET", "{auth}:layout", "single|1"]);
    for check in [&check, &pinned] {
        assert!(lookup(check, "sid-other", t1 + GRACE + 1).await.is_ok(), "the marker is back");
        check.ready().await;
    }
}

// ---------------------------------------------------------------------------
// A large deny list

/// Live revocations in the store before the verifier connects: far more
/// than one 4 MiB message can carry, so the snapshot must come in chunks.
const LARGE_DENY_LIST: usize = 500_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_verifier_facing_500k_revocations_is_ready_and_correct() {
    use testkit::auth_server::store::{Revocation, RevocationKind};
    let srv = TestServer::start().await;
    let store = Arc::clone(&srv.core().store);
    let now = now();
    for i in 0..LARGE_DENY_LIST {
        // 22 characters, the length of a real jti; families too, which a
        // verifier never needs.
        let kind = if i % 10 == 0 { RevocationKind::Family } else { RevocationKind::Jti };
        let revocation = Revocation { kind, id: format!("{i:022}"), expires_at: now + 3_600 };
        store.revoke(revocation, now).await.unwrap();
    }
    let (id, secret) = srv.client_credentials("order");
    let mut auth = AuthClient::new(srv.channel("order").await);
    let login = || pb::LoginRequest {
        grant: Some(pb::login_request::Grant::ClientCredentials(pb::ClientCredentialsGrant {
            client_id: id.clone(),
            client_secret: secret.clone(),
        })),
        audience: vec![AUDIENCE.into()],
        scope: vec![],
    };
    let revoked = auth.login(login()).await.unwrap().into_inner().access_token;
    let target = pb::revoke_request::Target::AccessToken(revoked.clone());
    auth.revoke(pb::RevokeRequest { target: Some(target) }).await.unwrap();
    let live = auth.login(login()).await.unwrap().into_inner().access_token;

    let events = Events::default();
    let started = Instant::now();
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUDIENCE)
        .channel(srv.channel("inventory").await)
        .observer(events.clone())
        .build()
        .unwrap();
    let env = Env::with_verifier(srv, verifier).await;
    tokio::time::timeout(Duration::from_secs(60), env.verifier.ready())
        .await
        .expect("the verifier never became ready: the snapshot did not arrive");
    println!("{LARGE_DENY_LIST} revocations: verifier ready in {:?}", started.elapsed());

    let mut client = env.client("order").await;
    assert_refused(env.call(&mut client, &revoked).await, Code::Unauthenticated, VerifyError::Revoked, "revoked jti");
    env.call(&mut client, &live).await.unwrap();
    // One complete snapshot: every jti of the list and the revoked token,
    // and none of the families.
    let jtis = LARGE_DENY_LIST - LARGE_DENY_LIST / 10 + 1;
    assert_eq!(events.count("FeedSnapshot"), 1);
    assert_eq!(events.count(&format!("FeedSnapshot {{ entries: {jtis} }}")), 1);
}
