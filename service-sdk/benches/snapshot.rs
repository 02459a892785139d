//! A new verifier facing a large deny list: time until it is ready, and the
//! memory it holds once ready.
//!
//! The parent process starts a real auth-server over mTLS (in-memory
//! store), revokes `SNAPSHOT_ENTRIES` ids (default 500,000; one in ten is a
//! refresh family, which verifiers never receive), then runs each round in a
//! fresh child process of this same binary, so that the memory measured is
//! the verifier's alone: the child opens its mTLS channel, reads its RSS,
//! builds a `Verifier`, waits until the chunked snapshot is in, and reads
//! its RSS and peak RSS again.
//!
//! Each round also runs a child against an empty deny list first, so the
//! fixed cost (TLS, HTTP/2, the verifier's own structures) is measured in
//! the same run and can be subtracted.
//!
//! With `SNAPSHOT_STORE=redis` the server keeps its state in a real
//! `redis-server` started on a free port, so the time to ready includes
//! reading the deny list out of Redis (`SNAPSHOT_REDIS_TIMEOUT_MS` sets
//! the server's `redis.command_timeout_ms`; default: the configured default).
//!
//! Run: `cargo bench -p service-sdk --bench snapshot` (`SNAPSHOT_ROUNDS`,
//! default 3). Under `cargo test` (no `--bench` argument) it runs one round
//! with 10,000 entries.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use service_sdk::{MtlsFiles, Verifier, VerifyEvent, VerifyObserver};
use testkit::auth_server::store::{Revocation, RevocationKind};
use testkit::{RedisProcess, TestServer};

const AUDIENCE: &str = "inventory";

/// Resident and peak resident memory of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The entries of the last complete snapshot, plus one (0: none yet).
#[derive(Default)]
struct Entries(AtomicUsize);

impl VerifyObserver for Entries {
    fn on_event(&self, event: &VerifyEvent<'_>) {
        if let VerifyEvent::FeedSnapshot { entries } = event {
            self.0.store(entries + 1, Ordering::Release);
        }
    }
}

/// The child: one verifier, measured. Prints one line the parent parses.
fn child(addr: &str, dir: &str, issuer: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dir = PathBuf::from(dir);
        let files = MtlsFiles::new(
            dir.join("ca.pem"),
            dir.join("clients/inventory.pem"),
            dir.join("clients/inventory-key.pem"),
        );
        let channel = files.auth_channel(&format!("https://{addr}")).unwrap();
        let (rss_before, _) = memory_kib();
        let entries = Arc::new(Entries::default());
        let started = Instant::now();
        let verifier =
            Verifier::builder(issuer, AUDIENCE).channel(channel).observer(Arc::clone(&entries)).build().unwrap();
        tokio::time::timeout(Duration::from_secs(120), verifier.ready()).await.expect("verifier never ready");
        let ready = started.elapsed();
        // The feed reports the snapshot just after it marks itself ready.
        while entries.0.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (rss_after, peak) = memory_kib();
        println!(
            "CHILD ready_ms={:.1} entries={} rss_before_kib={rss_before} rss_after_kib={rss_after} peak_kib={peak}",
            ready.as_secs_f64() * 1e3,
            entries.0.load(Ordering::Acquire) - 1,
        );
        drop(verifier);
    });
}

struct Round {
    ready_ms: f64,
    entries: usize,
    held_kib: i64,
    peak_kib: i64,
}

fn run_child(srv: &TestServer) -> Round {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("SNAPSHOT_CHILD", "1")
        .env("SNAPSHOT_ADDR", srv.grpc_addr.to_string())
        .env("SNAPSHOT_DIR", &srv.dir)
        .env("SNAPSHOT_ISSUER", &srv.config().issuer)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("CHILD "))
        .unwrap_or_else(|| panic!("child failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr)));
    let get = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in {line}"))
    };
    Round {
        ready_ms: get("ready_ms"),
        entries: get("entries") as usize,
        held_kib: get("rss_after_kib") as i64 - get("rss_before_kib") as i64,
        peak_kib: get("peak_kib") as i64 - get("rss_before_kib") as i64,
    }
}

async fn fill(srv: &TestServer, n: usize) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // 64 writers, so that a Redis store fills in seconds.
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let store = Arc::clone(&srv.core().store);
            tokio::spawn(async move {
                for i in (w..n).step_by(64) {
                    let kind = if i % 10 == 0 { RevocationKind::Family } else { RevocationKind::Jti };
                    // 22 characters, the length of a real jti.
                    let revocation = Revocation { kind, id: format!("{i:022}"), expires_at: now + 3_600 };
                    store.revoke(revocation, now).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
}

async fn server(redis: Option<&RedisProcess>) -> TestServer {
    match redis {
        Some(redis) => {
            TestServer::builder()
                .store_url(redis.url())
                // `SNAPSHOT_REDIS_TIMEOUT_MS` overrides the configured default.
                .configure(|raw| {
                    if let Some(ms) = std::env::var("SNAPSHOT_REDIS_TIMEOUT_MS").ok().and_then(|v| v.parse().ok()) {
                        raw.redis.command_timeout_ms = ms;
                    }
                })
                .start()
                .await
        }
        None => TestServer::start().await,
    }
}

fn main() {
    if std::env::var_os("SNAPSHOT_CHILD").is_some() {
        let var = |k: &str| std::env::var(k).unwrap();
        child(&var("SNAPSHOT_ADDR"), &var("SNAPSHOT_DIR"), &var("SNAPSHOT_ISSUER"));
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, default: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds) = if bench { (env("SNAPSHOT_ENTRIES", 500_000), env("SNAPSHOT_ROUNDS", 3)) } else { (10_000, 1) };

    let redis = std::env::var("SNAPSHOT_STORE").is_ok_and(|s| s == "redis");
    let (redis_empty, redis_full) =
        if redis { (Some(RedisProcess::start()), Some(RedisProcess::start())) } else { (None, None) };
    println!("store: {}", if redis { "redis" } else { "memory" });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (empty, full) = rt.block_on(async {
        let empty = server(redis_empty.as_ref()).await;
        let full = server(redis_full.as_ref()).await;
        let started = Instant::now();
        fill(&full, n).await;
        println!("revoked {n} ids in {:.1} s", started.elapsed().as_secs_f64());
        (empty, full)
    });
    let _guard = rt.enter();
    println!("round | deny list | entries sent | ready (ms) | held (KiB) | peak (KiB)");
    for round in 1..=rounds {
        // Interleaved: the empty list's fixed cost, then the full list.
        for (label, srv) in [("empty", &empty), ("full", &full)] {
            let r = run_child(srv);
            println!("{round} | {label} | {} | {:.1} | {} | {}", r.entries, r.ready_ms, r.held_kib, r.peak_kib);
            if label == "full" {
                assert_eq!(r.entries, n - n.div_ceil(10), "every jti, no family");
            }
        }
    }
    drop(_guard);
    rt.block_on(async {
        empty.shutdown().await;
        full.shutdown().await;
    });
}
