//! Revocation propagation across replicas, Redis round trips per
//! ExchangeToken, and Redis memory per live token.
//!
//! Two auth-server replicas (A and B) share one `redis-server` started here
//! with AOF and `appendfsync always` (the durable setting `docs/REDIS.md`
//! recommends). A `WatchRevocations` stream is open on A; each access token
//! is revoked at B, and the time from B's Revoke response to the event on
//! A's stream is recorded. Prints p50, p99 and max.
//!
//! ```text
//! cargo bench -p auth-server --bench propagation
//! PROPAGATION_REVOCATIONS=5000 cargo bench -p auth-server --bench propagation
//! ```
//!
//! Round trips are counted with `MONITOR` (commands a client sent, not the
//! ones a Lua script ran); memory with `MEMORY USAGE`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::revocation_event::Event;
use auth_proto::auth::v1::{
    ExchangeTokenRequest, LoginRequest, PasswordGrant, RevokeRequest, WatchRevocationsRequest, login_request,
    revoke_request,
};
use base64::Engine;
use testkit::{RedisProcess, RedisReply, TestServer};
use tonic::transport::Channel;

fn main() {
    let revocations: usize = std::env::var("PROPAGATION_REVOCATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run(revocations));
}

async fn run(revocations: usize) {
    let redis = RedisProcess::start_with_aof();
    let a = TestServer::builder().store_url(redis.url()).start().await;
    let b = TestServer::builder().dev_dir(&a.dir).store_url(redis.url()).start().await;
    let mut at_a = AuthClient::new(a.channel("order").await);
    let mut at_b = AuthClient::new(b.channel("order").await);

    round_trips(&redis, &a, &mut at_a).await;
    propagation(&b, &mut at_b, &a, revocations).await;
    memory(&redis, revocations);
}

fn service_exchange(srv: &TestServer, subject_token: &str) -> ExchangeTokenRequest {
    let (client_id, client_secret) = srv.client_credentials("order");
    ExchangeTokenRequest {
        client_id,
        client_secret,
        subject_token: subject_token.into(),
        audience: "inventory".into(),
        scope: vec![],
        requested_ttl_seconds: 0,
    }
}

fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("JWS payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&json).expect("claims JSON");
    claims["jti"].as_str().expect("jti").to_owned()
}

/// Counts the commands clients send to Redis (one per round trip; the
/// scripts' own commands show as `[0 lua]` and are skipped) between two
/// markers.
struct Monitor {
    lines: BufReader<TcpStream>,
}

impl Monitor {
    fn start(redis: &RedisProcess) -> Self {
        let mut stream = TcpStream::connect(("127.0.0.1", redis.port())).expect("connect for MONITOR");
        stream.write_all(b"*1\r\n$7\r\nMONITOR\r\n").expect("MONITOR");
        let mut lines = BufReader::new(stream);
        let mut ok = String::new();
        lines.read_line(&mut ok).expect("MONITOR reply");
        assert_eq!(ok.trim_end(), "+OK");
        Self { lines }
    }

    /// Reads until a line with `marker`, counting client commands by name.
    fn until(&mut self, marker: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let mut line = String::new();
        loop {
            line.clear();
            self.lines.read_line(&mut line).expect("MONITOR line");
            if line.contains(marker) {
                return counts;
            }
            if line.contains("[0 lua]") {
                continue;
            }
            if let Some(name) = line.split('"').nth(1) {
                *counts.entry(name.to_ascii_lowercase()).or_insert(0) += 1;
            }
        }
    }
}

async fn round_trips(redis: &RedisProcess, a: &TestServer, at_a: &mut AuthClient<Channel>) {
    const EXCHANGES: usize = 200;
    let (username, password) = a.user_password("alice");
    let login = LoginRequest {
        grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
        audience: vec!["order".into()],
        scope: vec![],
    };
    let alice = at_a.login(login).await.expect("login").into_inner().access_token;

    let mut monitor = Monitor::start(redis);
    for (label, subject) in [("service acting as itself", ""), ("on behalf of a user (subject token)", &alice[..])] {
        redis.command(&["ECHO", "bench-mark-start"]);
        monitor.until("bench-mark-start");
        for _ in 0..EXCHANGES {
            at_a.exchange_token(service_exchange(a, subject)).await.expect("exchange");
        }
        redis.command(&["ECHO", "bench-mark-end"]);
        let mut counts = monitor.until("bench-mark-end");
        // The readiness probe pings on its own schedule, not per call.
        let background = counts.remove("ping").unwrap_or(0);
        let total: usize = counts.values().sum();
        let per: Vec<String> =
            counts.iter().map(|(name, n)| format!("{name} {:.2}", *n as f64 / EXCHANGES as f64)).collect();
        println!(
            "ExchangeToken, {label}: {:.2} Redis round trips per call ({}) over {EXCHANGES} calls \
             (plus {background} background readiness PINGs)",
            total as f64 / EXCHANGES as f64,
            per.join(", ")
        );
    }
}

async fn propagation(b: &TestServer, at_b: &mut AuthClient<Channel>, a: &TestServer, revocations: usize) {
    // Tokens to revoke, minted at B.
    let mut tokens = Vec::with_capacity(revocations);
    for _ in 0..revocations {
        let token = at_b.exchange_token(service_exchange(b, "")).await.expect("exchange").into_inner().access_token;
        let jti = jti_of(&token);
        tokens.push((token, jti));
    }

    // The watcher on A forwards each revoked id with its arrival time.
    let mut stream = AuthClient::new(a.channel("inventory").await)
        .watch_revocations(WatchRevocationsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("snapshot").expect("stream open");
    assert!(matches!(first.event, Some(Event::Snapshot(_))));
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            if let Some(Event::Revoked(r)) = event.event
                && arrivals_tx.send((r.id, Instant::now())).is_err()
            {
                return;
            }
        }
    });

    let mut latencies = Vec::with_capacity(revocations);
    let started = Instant::now();
    for (token, jti) in tokens {
        let target = revoke_request::Target::AccessToken(token);
        at_b.revoke(RevokeRequest { target: Some(target) }).await.expect("revoke");
        let acked = Instant::now();
        loop {
            let (id, arrived) = tokio::time::timeout(Duration::from_secs(30), arrivals.recv())
                .await
                .expect("revocation never reached replica A")
                .expect("watch stream ended");
            if id == jti {
                // The event may beat the response to the client: count 0.
                latencies.push(arrived.saturating_duration_since(acked));
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "revocation propagation (Revoke response at B -> WatchRevocations event at A), {} revocations: \
         p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({:.0} revocations/s end to end, sequential)",
        latencies.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
        latencies.len() as f64 / elapsed.as_secs_f64(),
    );
}

fn memory(redis: &RedisProcess, revoked: usize) {
    let usage = |key: &str| redis.command(&["MEMORY", "USAGE", key, "SAMPLES", "0"]).int();
    let mut registry = (0usize, 0i64);
    let mut buckets = (0usize, 0i64);
    let mut cursor = "0".to_owned();
    loop {
        let RedisReply::Array(Some(reply)) = redis.command(&["SCAN", &cursor, "MATCH", "{auth}:*", "COUNT", "1000"])
        else {
            panic!("SCAN reply");
        };
        cursor = reply[0].text();
        let RedisReply::Array(Some(keys)) = &reply[1] else { panic!("SCAN keys") };
        for key in keys {
            let key = key.text();
            if key.starts_with("{auth}:i:") {
                registry = (registry.0 + 1, registry.1 + usage(&key));
            } else if key.starts_with("{auth}:rv:jti:") {
                buckets = (buckets.0 + 1, buckets.1 + usage(&key));
            }
        }
        if cursor == "0" {
            break;
        }
    }
    let per_token = registry.1 as f64 / registry.0 as f64;
    let per_revocation = buckets.1 as f64 / revoked as f64;
    println!(
        "redis memory: {:.0} B per issued-jti entry ({} entries, {revoked} of them revoked); \
         {:.0} B per revoked-jti snapshot entry ({} bucket keys); revoked live token ~{:.0} B",
        per_token,
        registry.0,
        per_revocation,
        buckets.0,
        per_token + per_revocation
    );
}
