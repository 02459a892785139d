//! Integration tests of the examples: the demo, the binaries as processes,
//! and one trace across the auth server, order and inventory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod binaries;
mod demo;
mod floor;
mod readme;
mod traces;

/// Upper bound on waiting for something that must happen; reaching it
/// fails the test instead of hanging it. Never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// A free port on 127.0.0.1 for a child process to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The auth-server binary of this workspace, built (once per run) by the
/// cargo that runs these tests: another package's binary is not one of
/// this package's test artifacts.
fn auth_server_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "-p", "auth-server", "--bin", "auth-server", "--message-format=json"])
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {cargo} build -p auth-server: {e}"));
        assert!(out.status.success(), "cargo build -p auth-server --bin auth-server failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "auth-server")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no auth-server executable")
    })
}

/// A command running `bin` with nothing of this process's environment but
/// `PATH`: the test decides what the child sees.
fn command(bin: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// A child process whose standard output is collected; killed on drop.
struct Proc {
    name: &'static str,
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    /// The thread copying standard output; done once the process exited
    /// and the pipe is drained.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Starts `cmd` (made by [`command`]) with standard output piped (not
    /// a terminal) and collected.
    fn spawn(name: &'static str, mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&out);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self { name, child, out, reader: Some(reader) }
    }

    /// Panics, with its output, if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited with {status}; output:\n{}", self.name, self.output());
        }
    }

    /// What the process wrote to standard output so far.
    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Sends SIGTERM and waits for the process to exit; panics if it is
    /// still running after [`PATIENCE`].
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill (procps) is needed");
        assert!(sent.success(), "kill -TERM {pid} ({})", self.name);
        self.wait()
    }

    /// Waits for the process to exit on its own; panics after [`PATIENCE`].
    fn wait(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // All it wrote is read before anyone looks at it.
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(start.elapsed() < PATIENCE, "{} did not exit; output:\n{}", self.name, self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
