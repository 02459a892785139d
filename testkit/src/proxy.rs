//! [`TcpProxy`]: a TCP forwarder between a client and a server that a test
//! can freeze (a silent partition: sockets stay open, nothing flows), cut
//! (a loud outage: connections closed and refused) and point at another
//! server (a Service whose endpoints changed).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A TCP proxy on `127.0.0.1:<free port>`. Dropping it closes every
/// connection it forwards.
///
/// ```no_run
/// # async fn run(redis: &testkit::RedisProcess) {
/// let proxy = testkit::TcpProxy::start(redis.addr()).await;
/// let url = format!("redis://{}", proxy.addr());
/// proxy.freeze(); // connections stay open; no byte passes either way
/// proxy.resume();
/// proxy.cut(); // open connections closed, new ones closed at once
/// proxy.restore();
/// # drop(url);
/// # }
/// ```
pub struct TcpProxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    target: Arc<Mutex<SocketAddr>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("frozen", &*self.frozen.borrow())
            .field("cut", &*self.cut.borrow())
            .finish()
    }
}

impl TcpProxy {
    /// Starts forwarding connections to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (frozen, _) = watch::channel(false);
        let (cut, _) = watch::channel(false);
        let target = Arc::new(Mutex::new(target));
        let task = tokio::spawn(accept(listener, frozen.subscribe(), cut.subscribe(), Arc::clone(&target)));
        Self { addr, frozen, cut, target, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding in both directions, keeping every socket open: what
    /// each side sends waits in the proxy (or the kernel). New connections
    /// are accepted and reach the target only after [`resume`](Self::resume).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again, held bytes first.
    pub fn resume(&self) {
        self.frozen.send_replace(false);
    }

    /// Closes every connection it forwards and, until
    /// [`restore`](Self::restore), closes new ones as soon as they are
    /// accepted (the server is gone, as far as clients can tell).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards new connections again after [`cut`](Self::cut).
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Sends connections accepted from now on to `target`; open ones stay
    /// with their server.
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().expect("proxy target") = target;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Drops the connection tasks with the accept loop.
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    frozen: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
    target: Arc<Mutex<SocketAddr>>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if *cut.borrow() {
                    drop(client); // closed at once: refused, in effect
                    continue;
                }
                let to = *target.lock().expect("proxy target");
                let mut cut = cut.clone();
                let frozen = frozen.clone();
                connections.spawn(async move {
                    tokio::select! {
                        () = forward(client, to, frozen) => {}
                        // Dropping the forwarder closes both sockets.
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn forward(client: TcpStream, target: SocketAddr, mut frozen: watch::Receiver<bool>) {
    // A partition holds new connections too.
    if frozen.wait_for(|f| !*f).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(pipe(client_read, server_write, frozen.clone()), pipe(server_read, client_write, frozen));
}

/// Copies `from` to `to` while not frozen; closes `to`'s write side when
/// `from` ends.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Frozen while waiting: stop reading until resumed.
            _ = frozen.wait_for(|f| *f) => continue,
        };
        // Bytes read just before a freeze wait for the resume.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
