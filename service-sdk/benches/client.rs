//! Client-side benchmarks against a real auth-server over mTLS:
//!
//! - `token/cached` and `token/async_hit`: the hot path of
//!   `TokenSource::cached` and `TokenSource::token` with a warm cache
//!   (target ≤ 1 µs);
//! - `auth_channel/bare` vs `auth_channel/with_token`: one call through a
//!   no-op inner service, without and with `AuthChannel` in front; the
//!   difference is the per-call overhead of attaching the token;
//! - a load run (printed, not criterion): tasks call `token()` in a loop for
//!   `CLIENT_LOAD_SECS` (default 60, at most 60) with 10-second tokens, so
//!   the background renewer works throughout; it prints how many calls
//!   waited on an exchange after warm-up (target 0). Under `cargo test`
//!   (no `--bench` argument) it runs for one second.
//!
//! - with `--bench` only, a Transit signing run (printed): `TransitKeys::sign`
//!   against a real OpenBao dev server (`bao` on `PATH`), one caller and 16
//!   concurrent callers, 5 s each.
//!
//! Run: `cargo bench -p service-sdk --bench client`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::time::{Duration, Instant};

use criterion::{Criterion, black_box};
use futures_util::FutureExt as _;
use service_sdk::{AuthChannel, ClientCredentials, MtlsFiles, TokenSource};
use testkit::TestServer;
use tower::Service as _;

fn source_for(srv: &TestServer, ttl: Duration) -> TokenSource {
    let files = MtlsFiles::new(
        srv.dir.join("ca.pem"),
        srv.dir.join("clients/order.pem"),
        srv.dir.join("clients/order-key.pem"),
    );
    let (id, secret) = srv.client_credentials("order");
    TokenSource::builder(
        files.channel(&format!("https://{}", srv.grpc_addr), "localhost").unwrap(),
        ClientCredentials::new(id, secret),
    )
    .requested_ttl(ttl)
    .renew_check_interval(Duration::from_millis(100))
    .build()
}

fn hot_path(c: &mut Criterion, rt: &tokio::runtime::Runtime, source: &TokenSource) {
    rt.block_on(source.token("inventory")).unwrap();
    let mut g = c.benchmark_group("token");
    g.bench_function("cached", |b| b.iter(|| black_box(source.cached(black_box("inventory")))));
    g.bench_function("async_hit", |b| {
        b.iter(|| black_box(source.token(black_box("inventory")).now_or_never().unwrap().unwrap()))
    });
    g.finish();
}

/// A request shaped like one from a generated tonic client, which has set
/// its gRPC headers before the channel sees it.
fn grpc_request() -> http::Request<()> {
    let mut req = http::Request::new(());
    req.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    req.headers_mut().insert("te", http::HeaderValue::from_static("trailers"));
    req
}

fn channel_overhead(c: &mut Criterion, source: &TokenSource) {
    let inner = tower::service_fn(|req: http::Request<()>| async move {
        Ok::<_, Infallible>(http::Response::new(req.headers().len()))
    });
    let mut bare = inner;
    let mut authed = AuthChannel::new(inner, source.clone(), "inventory");
    let mut g = c.benchmark_group("auth_channel");
    g.bench_function("bare", |b| {
        b.iter(|| {
            let req = grpc_request();
            black_box(bare.call(req).now_or_never().unwrap().unwrap())
        })
    });
    g.bench_function("with_token", |b| {
        b.iter(|| {
            let req = grpc_request();
            black_box(authed.call(req).now_or_never().unwrap().unwrap())
        })
    });
    g.finish();
    let resp = authed.call(grpc_request()).now_or_never().unwrap().unwrap();
    assert_eq!(*resp.body(), 3, "the authorization header was attached");
}

fn load_run(rt: &tokio::runtime::Runtime, srv: &TestServer) {
    // `cargo test --all-targets` runs this binary without `--bench`: then a
    // one-second smoke run.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let secs: u64 = match bench_mode {
        true => std::env::var("CLIENT_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60).min(60),
        false => 1,
    };
    let ttl = Duration::from_secs(10);
    let source = rt.block_on(async { source_for(srv, ttl) });
    rt.block_on(async {
        // Warm-up: the first call exchanges.
        source.token("inventory").await.unwrap();
        let warm = source.stats();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move {
                    // Every call is counted; every 64th is timed.
                    let (mut n, mut timed) = (0u64, Vec::new());
                    while Instant::now() < deadline {
                        if n.is_multiple_of(64) {
                            let t = Instant::now();
                            black_box(source.token("inventory").await.unwrap());
                            timed.push(t.elapsed().as_nanos() as u64);
                        } else {
                            black_box(source.token("inventory").await.unwrap());
                        }
                        n += 1;
                        if n.is_multiple_of(256) {
                            tokio::task::yield_now().await;
                        }
                    }
                    (n, timed)
                })
            })
            .collect();
        let (mut calls, mut timed) = (0u64, Vec::new());
        for t in tasks {
            let (n, t) = t.await.unwrap();
            calls += n;
            timed.extend(t);
        }
        timed.sort_unstable();
        let pct = |p: f64| timed[((timed.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        let end = source.stats();
        println!(
            "client load run: {secs} s, 4 tasks, {ttl:?} tokens: {calls} token() calls, {} waited on an exchange \
             after warm-up, {} background renewals, {} failed exchanges; token() latency (every 64th call) \
             p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.1} µs",
            end.waited - warm.waited,
            end.renewals - warm.renewals,
            end.failures - warm.failures,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            pct(1.0),
        );
    });
}

fn transit_run(rt: &tokio::runtime::Runtime) {
    use testkit::auth_server::keys::{SigningKeys as _, TransitConfig, TransitKeys};
    use testkit::{OpenBao, ROOT_TOKEN};
    rt.block_on(async {
        let bao = OpenBao::start().await;
        bao.enable_transit().await;
        bao.create_transit_key("bench", "ecdsa-p256").await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, ROOT_TOKEN).unwrap();
        let table: toml::Table = toml::from_str(&format!(
            "address = {:?}\nkey = \"bench\"\n[auth]\nmethod = \"token\"\ntoken_file = {:?}\n",
            bao.address(),
            token_file.display().to_string()
        ))
        .unwrap();
        let keys = TransitKeys::open(TransitConfig::from_table(&table).unwrap()).await.unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = service_sdk::Claims {
            iss: "auth-service".into(),
            sub: "svc:order".into(),
            aud: service_sdk::Audience::One("inventory".into()),
            exp: now + 300,
            nbf: now,
            iat: now,
            jti: "bench".into(),
            sid: None,
            client_id: "order".into(),
            role: None,
            perms: vec!["inventory:read".into()],
            act: None,
            cnf: None,
        };
        for callers in [1usize, 16] {
            let deadline = Instant::now() + Duration::from_secs(5);
            let tasks: Vec<_> = (0..callers)
                .map(|_| {
                    let (keys, claims) = (keys.clone(), claims.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            black_box(keys.sign(&claims).await.unwrap());
                            lat.push(t.elapsed().as_micros() as u64);
                        }
                        lat
                    })
                })
                .collect();
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.unwrap());
            }
            lat.sort_unstable();
            let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
            println!(
                "transit signing, {callers} caller(s), 5 s: {:.0} tokens/s, latency p50 {:.2} ms, p99 {:.2} ms",
                lat.len() as f64 / 5.0,
                pct(0.5),
                pct(0.99),
            );
        }
    });
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let srv = rt.block_on(TestServer::start());
    let source = rt.block_on(async { source_for(&srv, Duration::ZERO) });
    let mut c = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let _guard = rt.enter();
        hot_path(&mut c, &rt, &source);
        channel_overhead(&mut c, &source);
    }
    load_run(&rt, &srv);
    if std::env::args().any(|a| a == "--bench") {
        transit_run(&rt);
    }
    c.final_summary();
    drop(source);
    rt.block_on(srv.shutdown());
}
