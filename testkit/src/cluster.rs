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

/// Three primaries sharing the 16384 slots (with replicas if asked), each
/// node on a free port below 55535. Killed on drop.
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
        Self::start_with_replicas(0)
    }

    /// [`start`](Self::start) with `replicas` replicas per primary
    /// (`--cluster-replicas`): 3 × (1 + `replicas`) nodes, the first three
    /// the primaries.
    pub fn start_with_replicas(replicas: usize) -> Self {
        let cli = find_on_path("redis-cli")
            .unwrap_or_else(|| panic!("redis-cli not found: install it with `apt-get install -y redis-server`"));
        let args: Vec<String> = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            .into_iter()
            .chain(["--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "yes"])
            .map(str::to_owned)
            .collect();
        let count = 3 * (1 + replicas);
        let nodes: Vec<RedisProcess> = (0..count).map(|_| RedisProcess::launch(false, &args, MAX_NODE_PORT)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let output = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
        let cluster = Self { nodes };
        // Replicas report ok before they have synced: wait for their link.
        for node in &cluster.nodes {
            while is_replica(node) && !node.command(&["INFO", "replication"]).text().contains("master_link_status:up") {
                assert!(Instant::now() < deadline, "replica {} did not sync within {JOIN_TIMEOUT:?}", node.port());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// The replicas of the primary on `port` (none without
    /// [`start_with_replicas`](Self::start_with_replicas)).
    pub fn replicas_of(&self, port: u16) -> Vec<&RedisProcess> {
        let nodes = self.nodes[0].command(&["CLUSTER", "NODES"]).text();
        let id_of = |port: u16| {
            nodes
                .lines()
                .find(|l| l.split_whitespace().nth(1).is_some_and(|a| a.starts_with(&format!("127.0.0.1:{port}@"))))
                .and_then(|l| l.split_whitespace().next())
                .map(str::to_owned)
        };
        let primary = id_of(port).unwrap_or_else(|| panic!("no cluster node on port {port}"));
        self.nodes
            .iter()
            .filter(|n| {
                let line = id_of(n.port()).and_then(|id| nodes.lines().find(|l| l.starts_with(&id)).map(str::to_owned));
                line.is_some_and(|l| l.split_whitespace().nth(3) == Some(primary.as_str()))
            })
            .collect()
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

    /// The nodes: the three primaries first, then any replicas.
    pub fn nodes(&self) -> &[RedisProcess] {
        &self.nodes
    }

    /// `(port, DBSIZE)` of every node.
    pub fn dbsizes(&self) -> Vec<(u16, i64)> {
        self.nodes.iter().map(|n| (n.port(), n.command(&["DBSIZE"]).int())).collect()
    }
}

/// Whether `node` is a replica (`INFO replication` says `role:slave`).
fn is_replica(node: &RedisProcess) -> bool {
    node.command(&["INFO", "replication"]).text().contains("role:slave")
}
