//! [`Sentinels`]: three real Redis Sentinels (`redis-server CONF --sentinel`)
//! watching one primary, with timeouts short enough that a failover takes
//! seconds.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::redis::{RedisProcess, RedisReply, free_port, redis_server, spawn_and_ping, try_command};

/// How long a sentinel waits without an answer before it considers the
/// primary down (`down-after-milliseconds`).
pub(crate) const DOWN_AFTER_MS: u64 = 1_000;

/// `failover-timeout`: also how long a failed election waits before the
/// next try (twice this), so keep it short.
pub(crate) const FAILOVER_TIMEOUT_MS: u64 = 3_000;

/// How long [`Sentinels::start`] waits for the sentinels to find each other
/// and the replicas.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Three sentinels monitoring one primary as service [`Sentinels::SERVICE`],
/// quorum 2. Killed on drop.
///
/// ```no_run
/// use testkit::{RedisProcess, Sentinels};
/// let primary = RedisProcess::start();
/// let replica = RedisProcess::start_replica_of(&primary);
/// let sentinels = Sentinels::start(&primary, 1);
/// let url = sentinels.url(); // redis-sentinel://127.0.0.1:<p1>?sentinelServiceName=...&node=...
/// # drop((url, replica));
/// ```
pub struct Sentinels {
    nodes: Vec<Sentinel>,
}

struct Sentinel {
    port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinels").field("ports", &self.ports()).finish()
    }
}

impl Sentinels {
    /// The service (master) name the sentinels monitor.
    pub const SERVICE: &'static str = "authprimary";

    /// Starts three sentinels monitoring `primary`, and returns once each
    /// knows the other two and `replicas` replicas, so that a failover can
    /// be elected and has a replica to promote.
    pub fn start(primary: &RedisProcess, replicas: usize) -> Self {
        let binary = redis_server();
        let nodes: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(&binary, primary.port())).collect();
        let sentinels = Self { nodes };
        let deadline = Instant::now() + DISCOVERY_TIMEOUT;
        for node in &sentinels.nodes {
            loop {
                let peers = count(node.port, &["SENTINEL", "SENTINELS", Self::SERVICE]);
                let seen = count(node.port, &["SENTINEL", "REPLICAS", Self::SERVICE]);
                if peers == Some(2) && seen == Some(replicas) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinel {} sees {peers:?} sentinels and {seen:?} replicas after {DISCOVERY_TIMEOUT:?}",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        sentinels
    }

    /// The sentinels' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The URL fred reads: the first sentinel in the authority, the others
    /// as `node` parameters, and the service name.
    pub fn url(&self) -> String {
        let mut url =
            format!("redis-sentinel://127.0.0.1:{}?sentinelServiceName={}", self.nodes[0].port, Self::SERVICE);
        for node in &self.nodes[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", node.port));
        }
        url
    }

    /// The primary's port as the sentinels that answer agree on it (`None`
    /// while they disagree or none answers).
    pub fn primary_port(&self) -> Option<u16> {
        let mut ports = self.nodes.iter().filter_map(|n| {
            match try_command(n.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::SERVICE]).ok()? {
                RedisReply::Array(Some(addr)) => addr.get(1)?.text().parse::<u16>().ok(),
                _ => None,
            }
        });
        let first = ports.next()?;
        ports.all(|p| p == first).then_some(first)
    }

    /// Waits until every sentinel names `port` as the primary; returns how
    /// long that took. Panics after `timeout`.
    pub fn wait_for_primary(&self, port: u16, timeout: Duration) -> Duration {
        let start = Instant::now();
        while self.primary_port() != Some(port) {
            assert!(start.elapsed() < timeout, "the sentinels did not promote port {port} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

impl Sentinel {
    fn start(binary: &PathBuf, primary_port: u16) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir for a sentinel");
            let port = free_port();
            // Sentinel rewrites its configuration file: it must be its own.
            let conf = dir.path().join("sentinel.conf");
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/redis.log\n\
                 sentinel monitor {service} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {service} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {service} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {service} 1\n",
                dir = dir.path().display(),
                service = Sentinels::SERVICE,
            );
            std::fs::write(&conf, text).expect("write sentinel.conf");
            let mut cmd = Command::new(binary);
            cmd.arg(&conf).arg("--sentinel");
            match spawn_and_ping(cmd, port, dir.path()) {
                Ok(child) => return Self { port, _dir: dir, child },
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server --sentinel did not start: {last_error}");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The length of an array reply, if the command answers one.
fn count(port: u16, args: &[&str]) -> Option<usize> {
    match try_command(port, args).ok()? {
        RedisReply::Array(Some(items)) => Some(items.len()),
        _ => None,
    }
}
