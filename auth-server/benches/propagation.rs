//! Redis round trips per RPC, Redis memory per live session and per
//! revoked token (and none per service token), and revocation propagation
//! across replicas.
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
//! ones a Lua script ran); memory with `MEMORY USAGE` over every key and
//! `used_memory`, before and after each step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::revocation_event::Event;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, ExchangeTokenRequest, LoginRequest, PasswordGrant, RefreshRequest, RevokeRequest,
    WatchRevocationsRequest, login_request, revoke_request,
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
    memory(&redis, &a, &mut at_a).await;
    propagation(&b, &mut at_b, &a, revocations).await;
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
            // Lua's own commands, and the background ones: PINGs (the
            // subscriber's, the readiness check's), the readiness probe
            // key and the readiness check's claim of the layout marker.
            if line.contains("[0 lua]") || line.contains("\"PING\"") || line.contains("\"ping\"") {
                continue;
            }
            if line.contains(":ready\"") || line.contains(":layout\"") {
                continue;
            }
            if let Some(name) = line.split('"').nth(1) {
                *counts.entry(name.to_ascii_lowercase()).or_insert(0) += 1;
            }
        }
    }
}

/// One RPC whose Redis round trips are counted, and the calls that make it.
enum Rpc {
    Exchange,
    ExchangeForUser(String),
    LoginClientCredentials,
    LoginPassword,
    /// A chain of refresh tokens: each call spends the last one.
    Refresh(String),
    RevokeAccessToken(Vec<String>),
    /// An admin's client and bearer token, and the jtis it revokes.
    RevokeJti(Admin, Vec<String>),
    /// An admin's client and bearer token, and the sessions it ends.
    RevokeSid(Admin, Vec<String>),
    RevokeRefreshToken(Vec<String>),
    Logout(Vec<String>),
}

impl Rpc {
    fn label(&self) -> &'static str {
        match self {
            Rpc::Exchange => "ExchangeToken, service acting as itself",
            Rpc::ExchangeForUser(_) => "ExchangeToken with a subject token",
            Rpc::LoginClientCredentials => "Login, client credentials",
            Rpc::LoginPassword => "Login, password",
            Rpc::Refresh(_) => "Refresh",
            Rpc::RevokeAccessToken(_) => "Revoke{access_token}",
            Rpc::RevokeJti(..) => "Revoke{jti} (admin, no registry)",
            Rpc::RevokeSid(..) => "Revoke{sid} (admin)",
            Rpc::RevokeRefreshToken(_) => "Revoke{refresh_token} (its family)",
            Rpc::Logout(_) => "Revoke{session_refresh_token} (logout)",
        }
    }

    /// Makes call number `i`.
    async fn call(&mut self, i: usize, a: &TestServer, at_a: &mut AuthClient<Channel>) {
        let revoke = |target| RevokeRequest { target: Some(target) };
        let by = |token: &str, target| {
            let mut req = tonic::Request::new(RevokeRequest { target: Some(target) });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
            req
        };
        match self {
            Rpc::Exchange => drop(at_a.exchange_token(service_exchange(a, "")).await.expect("exchange")),
            Rpc::ExchangeForUser(t) => drop(at_a.exchange_token(service_exchange(a, t)).await.expect("exchange")),
            Rpc::LoginClientCredentials => {
                drop(at_a.login(client_login(a, "order", "inventory")).await.expect("login"))
            }
            Rpc::LoginPassword => drop(at_a.login(password_login(a, "alice")).await.expect("login")),
            Rpc::Refresh(t) => {
                let next = at_a.refresh(RefreshRequest { refresh_token: t.clone() }).await.expect("refresh");
                *t = next.into_inner().refresh_token;
            }
            Rpc::RevokeAccessToken(t) => {
                drop(at_a.revoke(revoke(revoke_request::Target::AccessToken(t[i].clone()))).await.expect("revoke"))
            }
            Rpc::RevokeJti(admin, jtis) => {
                let req = by(&admin.token, revoke_request::Target::Jti(jtis[i].clone()));
                drop(admin.client.revoke(req).await.expect("revoke"))
            }
            Rpc::RevokeSid(admin, sids) => {
                let req = by(&admin.token, revoke_request::Target::Sid(sids[i].clone()));
                drop(admin.client.revoke(req).await.expect("revoke"))
            }
            Rpc::RevokeRefreshToken(t) => {
                let target = revoke_request::Target::RefreshToken(t[i].clone());
                drop(at_a.revoke(revoke(target)).await.expect("revoke"))
            }
            Rpc::Logout(t) => {
                let target = revoke_request::Target::SessionRefreshToken(t[i].clone());
                drop(at_a.revoke(revoke(target)).await.expect("revoke"))
            }
        }
    }
}

fn password_login(srv: &TestServer, user: &str) -> LoginRequest {
    let (username, password) = srv.user_password(user);
    LoginRequest {
        grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
        audience: vec!["order".into()],
        scope: vec![],
    }
}

fn client_login(srv: &TestServer, account: &str, audience: &str) -> LoginRequest {
    let (client_id, client_secret) = srv.client_credentials(account);
    LoginRequest {
        grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
        audience: vec![audience.into()],
        scope: vec![],
    }
}

fn sid_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("JWS payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&json).expect("claims JSON");
    claims["sid"].as_str().expect("sid").to_owned()
}

/// Redis round trips per call of each RPC at replica A, counted with
/// `MONITOR`: every command a client sent between two markers, but the
/// background ones (the subscriber's and the readiness check's `PING`s,
/// the readiness probe key).
async fn round_trips(redis: &RedisProcess, a: &TestServer, at_a: &mut AuthClient<Channel>) {
    const FAST: usize = 200;
    const SLOW: usize = 20;
    let mut logins = Vec::new();
    for _ in 0..3 * SLOW + 2 {
        logins.push(at_a.login(password_login(a, "alice")).await.expect("login").into_inner());
    }
    let mut minted = Vec::new();
    for _ in 0..2 * SLOW {
        minted.push(at_a.exchange_token(service_exchange(a, "")).await.expect("exchange").into_inner().access_token);
    }
    let mut logins = logins.into_iter();
    let mut take = |n: usize| logins.by_ref().take(n).collect::<Vec<_>>();
    let subject = take(1).remove(0).access_token;
    let chain = take(1).remove(0).refresh_token;
    let sids = take(SLOW).iter().map(|t| sid_of(&t.access_token)).collect();
    let families = take(SLOW).into_iter().map(|t| t.refresh_token).collect();
    let sessions = take(SLOW).into_iter().map(|t| t.refresh_token).collect();
    let (to_revoke, by_jti) = minted.split_at(SLOW);
    let cases = [
        (Rpc::Exchange, FAST),
        (Rpc::ExchangeForUser(subject), FAST),
        (Rpc::LoginClientCredentials, FAST),
        (Rpc::LoginPassword, SLOW),
        (Rpc::Refresh(chain), SLOW),
        (Rpc::RevokeAccessToken(to_revoke.to_vec()), SLOW),
        (Rpc::RevokeJti(Admin::login(a).await, by_jti.iter().map(|t| jti_of(t)).collect()), SLOW),
        (Rpc::RevokeSid(Admin::login(a).await, sids), SLOW),
        (Rpc::RevokeRefreshToken(families), SLOW),
        (Rpc::Logout(sessions), SLOW),
    ];

    let mut monitor = Monitor::start(redis);
    println!("Redis round trips per RPC at one replica (client commands seen by MONITOR, Lua's own excluded):");
    println!("| RPC | round trips per call | commands per call | calls |");
    println!("| --- | ---: | --- | ---: |");
    for (mut rpc, calls) in cases {
        redis.command(&["ECHO", "bench-mark-start"]);
        monitor.until("bench-mark-start");
        for i in 0..calls {
            rpc.call(i, a, at_a).await;
        }
        redis.command(&["ECHO", "bench-mark-end"]);
        let counts = monitor.until("bench-mark-end");
        let total: usize = counts.values().sum();
        let per: Vec<String> =
            counts.iter().map(|(name, n)| format!("{name} {:.2}", *n as f64 / calls as f64)).collect();
        let per = if per.is_empty() { "none".to_owned() } else { per.join(", ") };
        println!("| {} | {:.2} | {per} | {calls} |", rpc.label(), total as f64 / calls as f64);
    }
}

/// The dev `admin` account: its own mTLS channel, and a token for the auth
/// service (client credentials) that may revoke anyone's tokens.
struct Admin {
    client: AuthClient<Channel>,
    token: String,
}

impl Admin {
    async fn login(a: &TestServer) -> Self {
        let mut client = AuthClient::new(a.channel("admin").await);
        let token = client.login(client_login(a, "admin", "auth-service")).await.expect("admin login");
        Self { client, token: token.into_inner().access_token }
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

/// Every key's `MEMORY USAGE`, and Redis's `used_memory`.
struct RedisMemory {
    keys: BTreeMap<String, i64>,
    used: i64,
}

impl RedisMemory {
    fn read(redis: &RedisProcess) -> Self {
        let mut keys = BTreeMap::new();
        let mut cursor = "0".to_owned();
        loop {
            let RedisReply::Array(Some(reply)) = redis.command(&["SCAN", &cursor, "COUNT", "1000"]) else {
                panic!("SCAN reply");
            };
            cursor = reply[0].text();
            let RedisReply::Array(Some(found)) = &reply[1] else { panic!("SCAN keys") };
            for key in found {
                let key = key.text();
                // The readiness probe's key comes and goes on its own.
                if key.ends_with(":ready") {
                    continue;
                }
                if let RedisReply::Int(n) = redis.command(&["MEMORY", "USAGE", &key, "SAMPLES", "0"]) {
                    keys.insert(key, n);
                }
            }
            if cursor == "0" {
                break;
            }
        }
        let info = redis.command(&["INFO", "memory"]).text();
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO memory");
        Self { keys, used }
    }

    /// What `after` holds beyond `self`: new keys, `MEMORY USAGE` grown,
    /// and `used_memory` grown.
    fn growth(&self, after: &Self) -> (usize, i64, i64) {
        let new = after.keys.keys().filter(|k| !self.keys.contains_key(*k)).count();
        let usage: i64 = after.keys.values().sum::<i64>() - self.keys.values().sum::<i64>();
        (new, usage, after.used - self.used)
    }
}

/// Redis memory per live session and per revoked token, and what
/// service-token exchanges cost (nothing): `MEMORY USAGE` summed over
/// every key, and `used_memory`, before and after each step.
async fn memory(redis: &RedisProcess, a: &TestServer, at_a: &mut AuthClient<Channel>) {
    const EXCHANGES: usize = 5_000;
    const SESSIONS: usize = 300;
    const REVOKED: usize = 2_000;
    let report = |what: &str, n: usize, before: &RedisMemory, after: &RedisMemory| {
        let (new, usage, used) = before.growth(after);
        println!(
            "| {what} | {n} | {new} | {usage} B ({:.1} B each) | {used} B ({:.1} B each) |",
            usage as f64 / n as f64,
            used as f64 / n as f64
        );
    };
    println!("Redis memory (MEMORY USAGE summed over every key; used_memory from INFO):");
    println!("| step | count | new keys | MEMORY USAGE growth | used_memory growth |");
    println!("| --- | ---: | ---: | ---: | ---: |");

    let before = RedisMemory::read(redis);
    for _ in 0..EXCHANGES {
        at_a.exchange_token(service_exchange(a, "")).await.expect("exchange");
    }
    report("service-token exchanges", EXCHANGES, &before, &RedisMemory::read(redis));

    let before = RedisMemory::read(redis);
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        sessions.push(at_a.login(password_login(a, "alice")).await.expect("login").into_inner());
    }
    let after_login = RedisMemory::read(redis);
    report("live sessions (password Login)", SESSIONS, &before, &after_login);
    for s in &sessions {
        at_a.refresh(RefreshRequest { refresh_token: s.refresh_token.clone() }).await.expect("refresh");
    }
    report("one Refresh per session (the spent token stays)", SESSIONS, &after_login, &RedisMemory::read(redis));

    let mut tokens = Vec::with_capacity(REVOKED);
    for _ in 0..REVOKED {
        tokens.push(at_a.exchange_token(service_exchange(a, "")).await.expect("exchange").into_inner().access_token);
    }
    let before = RedisMemory::read(redis);
    for token in tokens {
        let target = revoke_request::Target::AccessToken(token);
        at_a.revoke(RevokeRequest { target: Some(target) }).await.expect("revoke");
    }
    report("revoked access tokens (by jti)", REVOKED, &before, &RedisMemory::read(redis));
    let mut admin = Admin::login(a).await;
    let before = RedisMemory::read(redis);
    for s in &sessions {
        let sid = sid_of(&s.access_token);
        let mut req = tonic::Request::new(RevokeRequest { target: Some(revoke_request::Target::Sid(sid)) });
        req.metadata_mut().insert("authorization", format!("Bearer {}", admin.token).parse().expect("header"));
        admin.client.revoke(req).await.expect("revoke sid");
    }
    report("ended sessions (by sid)", SESSIONS, &before, &RedisMemory::read(redis));
}
