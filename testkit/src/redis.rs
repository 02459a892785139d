//! A real `redis-server` for tests, on a free port with its own data
//! directory, that a test can kill (SIGKILL) and restart on the same data.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for a started server to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `redis-server` child process. Killed on drop.
///
/// ```no_run
/// use testkit::RedisProcess;
/// let redis = RedisProcess::start();
/// let url = redis.url(); // redis://127.0.0.1:<port>
/// ```
pub struct RedisProcess {
    binary: PathBuf,
    port: u16,
    aof: bool,
    /// Extra arguments (`--replicaof`, `--cluster-enabled`).
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl std::fmt::Debug for RedisProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProcess").field("port", &self.port).field("aof", &self.aof).finish_non_exhaustive()
    }
}

/// A reply of the minimal RESP client in [`RedisProcess::command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisReply {
    /// `+OK`, `+PONG`, …
    Status(String),
    /// `-ERR …`
    Error(String),
    /// `:42`
    Int(i64),
    /// A bulk string (`$`), `None` for nil.
    Bulk(Option<String>),
    /// An array (`*`), `None` for a nil array.
    Array(Option<Vec<RedisReply>>),
}

impl RedisReply {
    /// The integer of an `Int` reply; panics otherwise.
    pub fn int(&self) -> i64 {
        match self {
            RedisReply::Int(i) => *i,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// The text of a status or bulk reply; panics otherwise.
    pub fn text(&self) -> String {
        match self {
            RedisReply::Status(s) | RedisReply::Bulk(Some(s)) => s.clone(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }
}

impl RedisProcess {
    /// Starts a `redis-server` without persistence on a free port.
    ///
    /// Panics if `redis-server` is not on `PATH`, naming the install command.
    pub fn start() -> Self {
        Self::launch(false, &[], u16::MAX)
    }

    /// Starts a `redis-server` with AOF on, `appendfsync always`: every
    /// acknowledged write survives a SIGKILL.
    pub fn start_with_aof() -> Self {
        Self::launch(true, &[], u16::MAX)
    }

    /// Starts a `redis-server` that replicates `primary` (`--replicaof`),
    /// without persistence, and returns once it has completed its first
    /// sync (`master_link_status:up`).
    pub fn start_replica_of(primary: &RedisProcess) -> Self {
        let args = ["--replicaof".to_owned(), "127.0.0.1".to_owned(), primary.port.to_string()];
        let replica = Self::launch(false, &args, u16::MAX);
        let deadline = Instant::now() + START_TIMEOUT;
        while !replica.command(&["INFO", "replication"]).text().contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync with its primary within {START_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        replica
    }

    /// Starts a `redis-server` with `extra` arguments on a free port below
    /// `max_port` (a cluster node's bus listens on port + 10000).
    pub(crate) fn launch(aof: bool, extra: &[String], max_port: u16) -> Self {
        let binary = redis_server();
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut last_error = String::from("no free port");
        // Another process may take the free port before Redis binds it: retry.
        for _ in 0..20 {
            let port = free_port();
            if port >= max_port {
                continue;
            }
            match spawn_server(&binary, port, aof, extra, dir.path()) {
                Ok(child) => return Self { binary, port, aof, extra: extra.to_vec(), dir, child: Some(child) },
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>` (e.g. for a [`TcpProxy`](crate::TcpProxy) in front).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The data directory (AOF files live here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (no shutdown, no final fsync) and waits
    /// for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory (after
    /// [`kill`](Self::kill); kills a running one first). Returns once it
    /// answers `PING`, i.e. after it has loaded its AOF.
    pub fn restart(&mut self) {
        self.kill();
        match spawn_server(&self.binary, self.port, self.aof, &self.extra, self.dir.path()) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("redis-server did not restart: {e}"),
        }
    }

    /// Stops the server with SIGSTOP: it keeps its sockets and answers
    /// nothing (a replica that no longer acknowledges its primary's
    /// writes) until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Resumes a server stopped by [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status =
            Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Runs one command over a fresh connection and returns the reply.
    /// Panics if the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> RedisReply {
        try_command(self.port, args).unwrap_or_else(|e| panic!("redis command {:?} failed: {e}", args.first()))
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The installed `redis-server`; panics naming the install command.
pub(crate) fn redis_server() -> PathBuf {
    find_on_path("redis-server")
        .unwrap_or_else(|| panic!("redis-server not found: install it with `apt-get install -y redis-server`"))
}

/// Spawns `redis-server` on `port` over `dir` and waits for `PING`.
fn spawn_server(binary: &Path, port: u16, aof: bool, extra: &[String], dir: &Path) -> Result<Child, String> {
    let mut cmd = Command::new(binary);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"));
    if aof {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    cmd.args(extra);
    spawn_and_ping(cmd, port, dir)
}

/// Spawns `cmd` (a `redis-server` on `port` logging into `dir`) and waits
/// until it answers `PING`.
pub(crate) fn spawn_and_ping(mut cmd: Command, port: u16, dir: &Path) -> Result<Child, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited with {status}: {}", log_tail(dir)));
        }
        if try_command(port, &["PING"]) == Ok(RedisReply::Status("PONG".into())) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no PONG within {START_TIMEOUT:?}: {}", log_tail(dir)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// A port that was free a moment ago: bind `127.0.0.1:0`, read, drop.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

pub(crate) fn try_command(port: u16, args: &[&str]) -> Result<RedisReply, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    (&stream).write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    read_reply(&mut BufReader::new(&stream))
}

fn read_reply(reader: &mut impl BufRead) -> Result<RedisReply, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (tag, rest) = line.split_at_checked(1).ok_or("connection closed")?;
    let number = || rest.parse::<i64>().map_err(|e| e.to_string());
    match tag {
        "+" => Ok(RedisReply::Status(rest.to_owned())),
        "-" => Ok(RedisReply::Error(rest.to_owned())),
        ":" => Ok(RedisReply::Int(number()?)),
        "$" => {
            let n = number()?;
            if n < 0 {
                return Ok(RedisReply::Bulk(None));
            }
            let mut buf = vec![0; n as usize + 2];
            reader.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n as usize);
            Ok(RedisReply::Bulk(Some(String::from_utf8_lossy(&buf).into_owned())))
        }
        "*" => {
            let n = number()?;
            if n < 0 {
                return Ok(RedisReply::Array(None));
            }
            (0..n).map(|_| read_reply(reader)).collect::<Result<Vec<_>, _>>().map(|v| RedisReply::Array(Some(v)))
        }
        other => Err(format!("unexpected RESP type {other:?}")),
    }
}
