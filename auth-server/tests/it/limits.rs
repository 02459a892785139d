//! `[limits]`: connection caps, header, idle and request deadlines, stream
//! limits and a bounded shutdown, against a real server over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{GetJwksRequest, WatchRevocationsRequest};
use auth_server::config::RawConfig;
use auth_server::store::MemoryStore;
use testkit::{HookedStore, Intercept, StoreCall, TestServer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn start(f: impl FnOnce(&mut RawConfig) + Send + 'static) -> TestServer {
    TestServer::builder().configure(f).start().await
}

/// Reads until the peer closes (`Ok(bytes read)`), or `Err(())` when it is
/// still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<usize, ()> {
    let mut buf = [0u8; 1024];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(total),
            Ok(Ok(n)) => total += n,
        }
    }
}

/// One `GET path` on a fresh connection; the status code.
async fn http_get(addr: SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_slowloris_http_connection_is_closed_at_the_header_timeout() {
    let srv = start(|raw| raw.limits.http_header_timeout_ms = 300).await;
    let mut slow = TcpStream::connect(srv.http_addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n").await.unwrap();
    let started = Instant::now();
    // One more header line, well within the idle timeout but never the end
    // of the head.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = slow.write_all(b"X-Slow: 1\r\n").await;
    let closed = closed_within(&mut slow, Duration::from_secs(3)).await;
    assert!(closed.is_ok(), "a partial request head kept the connection open past the header timeout");
    assert!(started.elapsed() >= Duration::from_millis(200), "closed before the header timeout");
    // A whole request is still served.
    assert_eq!(http_get(srv.http_addr, "/healthz").await, 200);
}

#[tokio::test]
async fn a_silent_http_connection_is_closed_at_the_idle_timeout() {
    // The header timeout is long: only the idle timeout can close it.
    let srv = start(|raw| {
        raw.limits.http_header_timeout_ms = 60_000;
        raw.limits.http_idle_timeout_secs = 1;
    })
    .await;
    let mut silent = TcpStream::connect(srv.http_addr).await.unwrap();
    silent.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(4)).await.is_ok(), "an idle connection stayed open");
}

#[tokio::test]
async fn http_connections_over_the_cap_are_closed_at_once_and_grpc_keeps_serving() {
    let srv = start(|raw| {
        raw.limits.http_max_connections = 4;
        raw.limits.http_header_timeout_ms = 60_000;
        raw.limits.http_idle_timeout_secs = 60;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(srv.http_addr).await.unwrap());
    }
    // Let the server accept the four before the fifth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(srv.http_addr).await.unwrap();
    let started = Instant::now();
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let read = closed_within(&mut over, Duration::from_secs(2)).await;
    assert_eq!(read, Ok(0), "a connection over the cap was served or kept open");
    assert!(started.elapsed() < Duration::from_secs(1));

    // The gRPC port has its own budget.
    let mut c = AuthClient::new(srv.channel("order").await);
    assert!(c.get_jwks(GetJwksRequest {}).await.is_ok());

    // A freed slot serves again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(http_get(srv.http_addr, "/healthz").await, 200);
}

#[tokio::test]
async fn parallel_readyz_probes_cause_at_most_one_store_ping_per_second() {
    let pings = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&pings);
    let store = HookedStore::new(Arc::new(MemoryStore::new()), move |call| {
        if call == StoreCall::Ping {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        Intercept::Pass
    });
    let srv = TestServer::builder().store(Arc::new(store)).start().await;
    let addr = srv.http_addr;
    // Warm the cache, then three bursts of 30 probes within its second.
    assert_eq!(http_get(addr, "/readyz").await, 200);
    let before = pings.load(Ordering::SeqCst);
    let started = Instant::now();
    for _ in 0..3 {
        let probes: Vec<_> = (0..30).map(|_| tokio::spawn(http_get(addr, "/readyz"))).collect();
        for p in probes {
            assert_eq!(p.await.unwrap(), 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let during = pings.load(Ordering::SeqCst) - before;
    // The gRPC health check pings every 2 s on its own: allow one of those
    // and one readiness ping per (started) second.
    let allowed = 1 + elapsed.as_secs() as usize + 1;
    assert!(during <= allowed, "90 probes in {elapsed:?} caused {during} store pings (allowed {allowed})");
}

#[tokio::test]
async fn streams_over_max_concurrent_streams_wait_for_a_free_slot() {
    let srv = start(|raw| raw.limits.grpc_max_concurrent_streams = 2).await;
    let channel = srv.channel("inventory").await;
    let mut c = AuthClient::new(channel);
    let first = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    let _second = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    // The server advertised SETTINGS_MAX_CONCURRENT_STREAMS = 2: the h2
    // client holds a third stream back instead of opening it.
    let mut c3 = c.clone();
    let third = tokio::spawn(async move { c3.get_jwks(GetJwksRequest {}).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third stream ran beside two open ones");
    drop(first);
    let res =
        tokio::time::timeout(Duration::from_secs(3), third).await.expect("the third stream ran once a slot freed");
    assert!(res.unwrap().is_ok());
}

#[tokio::test]
async fn the_request_timeout_does_not_cut_a_watch_stream() {
    let srv = start(|raw| {
        raw.limits.grpc_request_timeout_ms = 200;
        raw.watch.heartbeat_secs = 1;
    })
    .await;
    let mut c = AuthClient::new(srv.channel("inventory").await);
    let mut stream = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    let snapshot = stream.message().await.unwrap();
    assert!(snapshot.is_some());
    // A heartbeat a second later: the stream outlived the request timeout.
    let beat = tokio::time::timeout(Duration::from_secs(3), stream.message()).await.expect("a heartbeat");
    assert!(beat.unwrap().is_some());
}

#[tokio::test]
async fn shutdown_returns_within_the_grace_period_with_a_watch_stream_open() {
    let srv = start(|raw| raw.limits.shutdown_grace_secs = 1).await;
    let mut c = AuthClient::new(srv.channel("inventory").await);
    let mut stream = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), srv.shutdown()).await.expect("the server stopped within its grace");
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
    drop(stream);
}
