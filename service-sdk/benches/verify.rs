//! Verify-side benchmarks: a [`Verifier`] on a cache hit, on a miss next to
//! a bare `jsonwebtoken::decode` of the same tokens, and the whole
//! [`RequireAuthLayer`] around a no-op tower service.
//!
//! Run: `cargo bench -p service-sdk --bench verify`. The `_recorded` rows
//! are the same with the SDK's metrics recorded into a Prometheus recorder.
//!
//! Tokens are ES256 (the platform default), shaped like the auth server's
//! on-behalf-of tokens. The verifier uses a fixed key set and a revocation
//! feed applied by hand, so no network is involved: the figures are the
//! per-request CPU cost.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use auth_proto::auth::v1 as pb;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use http::{HeaderValue, Request, Response};
use serde_json::json;
use service_sdk::{Claims, FeedOptions, JwksSource, KeySet, ManualClock, RequireAuthLayer, RevocationFeed, Verifier};
use tower::{Layer as _, Service as _};

const KID: &str = "bench-key";

struct Signer {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    seq: AtomicU64,
    now: u64,
}

impl Signer {
    fn new(now: u64) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        Self { pair, rng, seq: AtomicU64::new(0), now }
    }

    fn jwks_json(&self) -> String {
        let point = self.pair.public_key().as_ref();
        json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": KID, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    /// A fresh token (new jti) shaped like an on-behalf-of token.
    fn token(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let claims = json!({
            "iss": "auth-service", "sub": "alice", "aud": "inventory",
            "exp": self.now + 300, "nbf": self.now, "iat": self.now,
            "jti": format!("{n:022}"), "sid": "Zm9vYmFyYmF6cXV4cXV1eA",
            "client_id": "order", "role": "customer",
            "perms": ["inventory:read", "inventory:reserve"],
            "act": { "sub": "svc:order" },
        });
        let header = json!({ "alg": "ES256", "kid": KID, "typ": "at+jwt" });
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = self.pair.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn fresh_feed(clock: &ManualClock) -> RevocationFeed {
    let feed = RevocationFeed::detached(Arc::new(clock.clone()), FeedOptions::default()).unwrap();
    feed.apply(pb::RevocationEvent {
        event: Some(pb::revocation_event::Event::Snapshot(pb::RevocationSnapshot { entries: vec![], more: false })),
    });
    feed
}

fn verifier(rt: &tokio::runtime::Runtime, signer: &Signer, clock: &ManualClock, cache: u64) -> Verifier {
    let _guard = rt.enter();
    let keys = KeySet::from_jwks_json(&signer.jwks_json()).unwrap();
    let v = Verifier::builder("auth-service", "inventory")
        .jwks(JwksSource::fixed(keys))
        .revocation(fresh_feed(clock))
        .clock(clock.clone())
        .cache_capacity(cache)
        .build()
        .unwrap();
    rt.block_on(v.ready());
    v
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let clock = ManualClock::new(now);
    let signer = Signer::new(now);
    let v = verifier(&rt, &signer, &clock, 100_000);

    let mut g = c.benchmark_group("verify");
    let token = signer.token();
    v.verify(&token, None).now_or_never().unwrap().unwrap();
    g.bench_function("cache_hit", |b| {
        b.iter(|| black_box(v.verify(black_box(&token), None).now_or_never().unwrap().unwrap()))
    });
    // The same verifier's twin recording into a Prometheus recorder
    // (feature `metrics`, which the dev-dependencies turn on): the cost of
    // the metrics on the hot path. The plain `cache_hit` above has no
    // recorder, so its handles do nothing.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let recorded = metrics::with_local_recorder(&prometheus, || verifier(&rt, &signer, &clock, 100_000));
    recorded.verify(&token, None).now_or_never().unwrap().unwrap();
    g.bench_function("cache_hit_recorded", |b| {
        b.iter(|| black_box(recorded.verify(black_box(&token), None).now_or_never().unwrap().unwrap()))
    });
    g.bench_function("miss", |b| {
        b.iter_batched(
            || signer.token(),
            |t| black_box(v.verify(&t, None).now_or_never().unwrap().unwrap()),
            BatchSize::SmallInput,
        )
    });
    let uncached = verifier(&rt, &signer, &clock, 0);
    g.bench_function("miss_cache_disabled", |b| {
        b.iter_batched(
            || signer.token(),
            |t| black_box(uncached.verify(&t, None).now_or_never().unwrap().unwrap()),
            BatchSize::SmallInput,
        )
    });
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&signer.jwks_json()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&["auth-service"]);
    validation.set_audience(&["inventory"]);
    g.bench_function("jsonwebtoken_decode", |b| {
        b.iter_batched(
            || signer.token(),
            |t| black_box(jsonwebtoken::decode::<Claims>(&t, &key, &validation).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The whole layer around a no-op service, on a cache hit.
    let mut g = c.benchmark_group("layer");
    let noop = tower::service_fn(|_req: Request<tonic::body::Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(tonic::body::Body::default())))
    });
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    let request = || {
        let mut req = Request::new(tonic::body::Body::default());
        *req.uri_mut() = http::Uri::from_static("/shop.v1.Inventory/GetStock");
        req.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        req.headers_mut().insert(http::header::AUTHORIZATION, bearer.clone());
        req
    };
    let mut bare = noop;
    g.bench_function("noop_service_alone", |b| {
        b.iter(|| black_box(bare.call(request()).now_or_never().unwrap().unwrap()))
    });
    let mut recorded_layer = RequireAuthLayer::new(recorded.clone()).layer(noop);
    g.bench_function("require_auth_cache_hit_recorded", |b| {
        b.iter(|| black_box(recorded_layer.call(request()).now_or_never().unwrap().unwrap()))
    });
    let mut layered = RequireAuthLayer::new(v.clone()).layer(noop);
    g.bench_function("require_auth_cache_hit", |b| {
        b.iter(|| {
            let resp = layered.call(request()).now_or_never().unwrap().unwrap();
            debug_assert!(resp.headers().get("grpc-status").is_none());
            black_box(resp)
        })
    });
    let bad = HeaderValue::from_static("Bearer not.a.token");
    g.bench_function("require_auth_refusal", |b| {
        b.iter(|| {
            let mut req = request();
            req.headers_mut().insert(http::header::AUTHORIZATION, bad.clone());
            black_box(layered.call(req).now_or_never().unwrap().unwrap())
        })
    });
    g.finish();
    let stats = v.stats();
    println!(
        "verifier counters: accepted {}, cache hits {}, misses {}, refused {:?}",
        stats.accepted, stats.cache_hits, stats.cache_misses, stats.rejected
    );
}

/// Resident set size of this process, in bytes (Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Memory of a verifier holding 100,000 cached tokens and 100,000 revoked
/// jtis (printed, not timed).
fn memory(_c: &mut Criterion) {
    const N: u64 = 100_000;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let clock = ManualClock::new(now);
    let signer = Signer::new(now);
    let tokens: Vec<String> = (0..N).map(|_| signer.token()).collect();
    let before = rss_bytes().unwrap_or(0);
    let _guard = rt.enter();
    let feed = fresh_feed(&clock);
    let v = Verifier::builder("auth-service", "inventory")
        .jwks(JwksSource::fixed(KeySet::from_jwks_json(&signer.jwks_json()).unwrap()))
        .revocation(feed.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    rt.block_on(v.ready());
    for t in &tokens {
        v.verify(t, None).now_or_never().unwrap().unwrap();
    }
    let cached = rss_bytes().unwrap_or(0);
    let entries = (0..N)
        .map(|i| pb::Revocation {
            kind: pb::RevocationKind::Jti as i32,
            id: URL_SAFE_NO_PAD.encode((i as u128 + (1 << 100)).to_be_bytes()),
            expires_at: now + 600,
        })
        .collect();
    feed.apply(pb::RevocationEvent {
        event: Some(pb::revocation_event::Event::Snapshot(pb::RevocationSnapshot { entries, more: false })),
    });
    let after = rss_bytes().unwrap_or(0);
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "verifier memory: {} cached tokens -> +{:.1} MB RSS; {} revoked jtis -> +{:.1} MB; total +{:.1} MB",
        v.cached_tokens(),
        mb(cached.saturating_sub(before)),
        feed.revoked_count(),
        mb(after.saturating_sub(cached)),
        mb(after.saturating_sub(before))
    );
}

criterion_group!(verify, benches, memory);
criterion_main!(verify);
