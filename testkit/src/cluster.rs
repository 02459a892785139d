//! [`RedisCluster`]: a real Redis Cluster of three primaries, started from
//! the installed `redis-server` (`--cluster-enabled yes`) and joined by
//! `redis-cli --cluster create`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis::{RedisProcess, find_on_path};

/// How long [`RedisCluster::start`] waits for every node to report
/// `cluster_state:ok`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster bus listens on the node's port + 10000, so nodes take ports
/// below this.
const MAX_NODE_PORT: u16 = 55_535;

/// Three primaries (no replicas) sharing the 16384 slots, each on a free
/// port below 55535. Killed on drop.
///
/// ```no_run
/// let cluster = testkit::RedisCluster::start();
/// let url = cluster.url(); // redis-cluster://127.0.0.1:<p1>?node=127.0.0.1:<p2>&node=...
/// for (port, keys) in cluster.dbsizes() {
///     println!("{port}: {keys} keys");
/// }
/// # drop(url);
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisProcess>,
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes and joins them with `redis-cli
    /// --cluster create --cluster-replicas 0 --cluster-yes`; returns once
    /// every node reports `cluster_state:ok`. Panics naming the install
    /// command if `redis-server` or `redis-cli` is missing.
    pub fn start() -> Self {
        let cli = find_on_path("redis-cli")
            .unwrap_or_else(|| panic!("redis-cli not found: install it with `apt-get install -y redis-server`"));
        let args: Vec<String> = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            .into_iter()
            .chain(["--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "yes"])
            .map(str::to_owned)
            .collect();
        let nodes: Vec<RedisProcess> = (0..3).map(|_| RedisProcess::launch(false, &args, MAX_NODE_PORT)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let output = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + JOIN_TIMEOUT;
        for node in &nodes {
            while !node.command(&["CLUSTER", "INFO"]).text().contains("cluster_state:ok") {
                assert!(
                    Instant::now() < deadline,
                    "node {} not in a healthy cluster after {JOIN_TIMEOUT:?}",
                    node.port()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// `redis-cluster://` with the first node in the authority and the
    /// others as `node` parameters (fred's form).
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port());
        for (i, node) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port()));
        }
        url
    }

    /// The nodes (all primaries).
    pub fn nodes(&self) -> &[RedisProcess] {
        &self.nodes
    }

    /// `(port, DBSIZE)` of every node.
    pub fn dbsizes(&self) -> Vec<(u16, i64)> {
        self.nodes.iter().map(|n| (n.port(), n.command(&["DBSIZE"]).int())).collect()
    }
}
