//! Floods: the bounded password pool, back-off of failed logins per
//! username, per-client rate limits, and memory that returns after password
//! checks (measured on the real binary).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ExchangeTokenRequest, GetJwksRequest, LoginRequest, PasswordGrant, RefreshRequest, RevokeRequest, login_request,
    revoke_request,
};
use auth_server::clock::{Clock, ManualClock, SystemClock};
use testkit::TestServer;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A server on a fresh dev environment whose config file gains `limits`
/// under `[limits]`.
async fn server_with_limits(limits: &str, clock: Option<ManualClock>) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str("\n[limits]\n");
    text.push_str(limits);
    std::fs::write(&env.config_path, text).unwrap();
    let mut builder = TestServer::builder().dev_dir(dir.path());
    if let Some(clock) = clock {
        builder = builder.clock(Arc::new(clock));
    }
    let srv = builder.start().await;
    (dir, srv)
}

async fn client(srv: &TestServer, name: &str) -> AuthClient<Channel> {
    AuthClient::new(srv.channel(name).await)
}

fn password_login(username: &str, password: &str) -> LoginRequest {
    LoginRequest {
        grant: Some(login_request::Grant::Password(PasswordGrant {
            username: username.into(),
            password: password.into(),
        })),
        audience: vec![],
        scope: vec![],
    }
}

fn exchange_as(srv: &TestServer, caller: &str, audience: &str) -> ExchangeTokenRequest {
    let (client_id, client_secret) = srv.client_credentials(caller);
    ExchangeTokenRequest { client_id, client_secret, audience: audience.into(), ..Default::default() }
}

fn code_counts<T>(results: &[Result<T, tonic::Status>]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in results {
        let code = match r {
            Ok(_) => "Ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        *counts.entry(code).or_default() += 1;
    }
    counts
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_full_password_queue_answers_resource_exhausted_at_once() {
    let (_dir, srv) = server_with_limits("password_threads = 1\npassword_queue = 4\n", None).await;
    let c = client(&srv, "order").await;
    // Distinct unknown usernames, so back-off plays no part.
    let calls = (0..40).map(|i| {
        let mut c = c.clone();
        async move { c.login(password_login(&format!("nobody-{i}"), "wrong")).await }
    });
    let results = futures_util::future::join_all(calls).await;
    let counts = code_counts(&results);
    let exhausted = counts.get("ResourceExhausted").copied().unwrap_or(0);
    let checked = counts.get("Unauthenticated").copied().unwrap_or(0);
    assert_eq!(exhausted + checked, 40, "{counts:?}");
    // Four wait in the queue and are checked whatever the timing; a fifth
    // runs too when the thread took the first before the queue filled (a
    // busy machine, or the thread's lower priority, can delay that). Most
    // of the burst is refused.
    assert!(checked >= 4, "{counts:?}");
    assert!(exhausted >= 20, "{counts:?}");
    for s in results.iter().filter_map(|r| r.as_ref().err()).filter(|s| s.code() == Code::ResourceExhausted) {
        assert_eq!(s.message(), "server busy: too many password checks waiting");
    }
    let stats = srv.core().passwords.stats();
    assert_eq!(stats.refused, exhausted as u64, "{stats:?}");
    assert_eq!(stats.ran, checked as u64, "{stats:?}");
}

#[tokio::test]
async fn a_login_whose_caller_has_gone_is_never_checked() {
    let (_dir, srv) = server_with_limits("password_threads = 1\npassword_queue = 64\n", None).await;
    let c = client(&srv, "order").await;
    let calls = (0..30).map(|i| {
        let mut c = c.clone();
        async move {
            let mut req = Request::new(password_login(&format!("nobody-{i}"), "wrong"));
            req.set_timeout(Duration::from_millis(100));
            c.login(req).await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let counts = code_counts(&results);
    until("the pool has emptied its queue", || srv.core().passwords.stats().waiting == 0).await;
    let stats = srv.core().passwords.stats();
    // About 100 ms of argon2 on one thread: a few checks ran, and the rest,
    // whose callers had given up, were skipped rather than run.
    assert!(stats.skipped >= 10, "{stats:?} {counts:?}");
    assert!(stats.ran <= 20, "{stats:?} {counts:?}");
}

#[tokio::test]
async fn failed_logins_back_off_per_username_and_unknown_users_alike() {
    let clock = ManualClock::new(SystemClock.now_unix());
    let (_dir, srv) = server_with_limits("login_backoff_after = 3\n", Some(clock.clone())).await;
    let mut c = client(&srv, "order").await;
    let (alice, alice_pw) = srv.user_password("alice");
    for name in [alice.as_str(), "mallory"] {
        for _ in 0..3 {
            let err = c.login(password_login(name, "wrong")).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
        }
    }
    // The next attempt must wait, even with the right password, and an
    // unknown username looks exactly the same.
    let a = c.login(password_login(&alice, &alice_pw)).await.unwrap_err();
    let m = c.login(password_login("mallory", "wrong")).await.unwrap_err();
    assert_eq!((a.code(), a.message()), (Code::ResourceExhausted, "too many failed logins; retry later"));
    assert_eq!((m.code(), m.message()), (a.code(), a.message()));
    // Another user is not held up.
    let (bob, bob_pw) = srv.user_password("bob");
    c.login(password_login(&bob, &bob_pw)).await.unwrap();
    // The refused attempts cost no password check.
    assert_eq!(srv.core().passwords.stats().ran, 7);
    // After the back-off, alice gets in, and starts afresh.
    clock.advance(1);
    c.login(password_login(&alice, &alice_pw)).await.unwrap();
    for _ in 0..3 {
        let err = c.login(password_login(&alice, "wrong")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn exchange_refresh_and_revoke_never_wait_behind_the_password_pool() {
    let (_dir, srv) = server_with_limits("password_threads = 1\npassword_queue = 64\n", None).await;
    let mut c = client(&srv, "order").await;
    let (alice, alice_pw) = srv.user_password("alice");
    let session = c.login(password_login(&alice, &alice_pw)).await.unwrap().into_inner();

    // Saturate the pool with slow checks from another client.
    let flood = client(&srv, "inventory").await;
    let flood = tokio::spawn(futures_util::future::join_all((0..60).map(move |i| {
        let mut c = flood.clone();
        async move { c.login(password_login(&format!("nobody-{i}"), "wrong")).await }
    })));
    until("the password queue is loaded", || srv.core().passwords.stats().waiting >= 30).await;

    for _ in 0..20 {
        c.exchange_token(exchange_as(&srv, "order", "inventory")).await.unwrap();
    }
    let rotated = c.refresh(RefreshRequest { refresh_token: session.refresh_token }).await.unwrap().into_inner();
    let revoked = c
        .revoke(RevokeRequest { target: Some(revoke_request::Target::RefreshToken(rotated.refresh_token)) })
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.revoked.is_empty());
    let stats = srv.core().passwords.stats();
    assert!(stats.waiting > 0, "the flood was over before the token calls ended: {stats:?}");

    let counts = code_counts(&flood.await.unwrap());
    assert_eq!(counts.get("Unauthenticated"), Some(&60), "{counts:?}");
}

#[tokio::test]
async fn a_client_over_its_rate_limit_gets_resource_exhausted_and_others_do_not() {
    let (_dir, srv) = server_with_limits("client_rate_per_sec = 1\nclient_rate_burst = 3\n", None).await;
    let mut order = client(&srv, "order").await;
    let mut results = Vec::new();
    for _ in 0..10 {
        results.push(order.exchange_token(exchange_as(&srv, "order", "inventory")).await);
    }
    assert!(results[..3].iter().all(Result::is_ok), "{:?}", code_counts(&results));
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!refused.is_empty(), "{:?}", code_counts(&results));
    for s in &refused {
        assert_eq!((s.code(), s.message()), (Code::ResourceExhausted, "rate limit exceeded"));
    }
    // Login, Refresh and Revoke share the client's budget.
    let err = order.refresh(RefreshRequest { refresh_token: "x".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = order.login(password_login("alice", "wrong")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // GetJwks is not limited.
    for _ in 0..5 {
        order.get_jwks(GetJwksRequest {}).await.unwrap();
    }
    // Another client identity has its own budget.
    let mut inventory = client(&srv, "inventory").await;
    inventory.exchange_token(exchange_as(&srv, "inventory", "order")).await.unwrap();
    let err = inventory.refresh(RefreshRequest { refresh_token: "x".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "checked, not limited");
}

/// Resident memory of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real binary in dev mode; returns once it answers over mTLS.
async fn spawn_dev_binary(dir: &std::path::Path) -> (Child, AuthClient<Channel>) {
    let (grpc, http) = (free_port(), free_port());
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_auth-server"))
            .arg("dev")
            .arg("--dir")
            .arg(dir)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start auth-server"),
    );
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(60), "auth-server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read = |rel: &str| std::fs::read_to_string(dir.join(rel));
        let (Ok(ca), Ok(cert), Ok(key)) = (read("ca.pem"), read("clients/order.pem"), read("clients/order-key.pem"))
        else {
            continue;
        };
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .domain_name("localhost");
        let Ok(endpoint) = Channel::from_shared(format!("https://127.0.0.1:{grpc}")).unwrap().tls_config(tls) else {
            continue;
        };
        if let Ok(ch) = endpoint.connect().await {
            let mut c = AuthClient::new(ch);
            if c.get_jwks(GetJwksRequest {}).await.is_ok() {
                return (child, c);
            }
        }
    }
}

#[tokio::test]
async fn resident_memory_returns_to_idle_after_fifty_wrong_password_logins() {
    let dir = tempfile::tempdir().unwrap();
    let (child, c) = spawn_dev_binary(dir.path()).await;
    let pid = child.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = vm_rss_kib(pid);
    // 50 checks, 5 at a time so every password thread works; distinct
    // unknown usernames so back-off plays no part.
    let mut unauthenticated = 0;
    for round in 0..(50 / 5) {
        let calls = (0..5).map(|i| {
            let mut c = c.clone();
            async move { c.login(password_login(&format!("nobody-{round}-{i}"), "wrong")).await }
        });
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap_err().code(), Code::Unauthenticated);
            unauthenticated += 1;
        }
    }
    assert_eq!(unauthenticated, 50);
    let busy = vm_rss_kib(pid);
    // Idle password threads give their memory back within a second or two.
    let start = Instant::now();
    let mut after = vm_rss_kib(pid);
    while after > idle + 10 * 1024 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = vm_rss_kib(pid);
    }
    println!("auth-server RSS: idle {idle} KiB, right after 50 wrong-password logins {busy} KiB, then {after} KiB");
    assert!(after <= idle + 10 * 1024, "RSS {after} KiB vs idle {idle} KiB (busy {busy} KiB)");
}
