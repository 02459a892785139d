//! Per-connection limits shared by both ports: a connection budget
//! ([`ConnLimit`]) and read deadlines on the socket ([`Deadlines`]).
//!
//! Each port has its own [`ConnLimit`]: a connection over the budget is
//! accepted and closed at once, so it holds a file descriptor for
//! microseconds, and a flood on one port cannot use up the descriptors the
//! other port needs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// A budget of open connections on one port.
#[derive(Debug, Clone)]
pub struct ConnLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnLimit {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(max)), max }
    }

    /// A slot for one more connection, or `None` at the cap.
    pub fn try_acquire(&self) -> Option<ConnPermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok().map(ConnPermit)
    }

    /// Connections open now.
    pub fn in_use(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// One connection's slot in a [`ConnLimit`]; released when dropped.
#[derive(Debug)]
pub struct ConnPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// Read deadlines of a connection: its first bytes must arrive within
/// `first_read`, and after that it may be silent for at most `idle`. A
/// deadline that passes fails the pending read with `TimedOut`, which ends
/// the connection. Only reads count: the server's own writes (keepalive
/// PINGs) do not keep a silent client alive.
///
/// It also carries what a server wants to know of the connection (`Info`,
/// e.g. the gRPC port's [`ConnInfo`](crate::edge::ConnInfo)), handed to
/// tonic as its [`Connected`] info, so one wrapper serves both ports.
pub struct Deadlines<IO, Info = ()> {
    io: IO,
    first_read: Option<Duration>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    info: Info,
    _permit: Option<ConnPermit>,
}

impl<IO> Deadlines<IO> {
    /// Wraps `io`; the connection holds `permit` (if any) until it is
    /// dropped.
    pub fn new(io: IO, first_read: Option<Duration>, idle: Duration, permit: Option<ConnPermit>) -> Self {
        let first = first_read.unwrap_or(idle);
        Self { io, first_read, idle, deadline: Box::pin(tokio::time::sleep(first)), info: (), _permit: permit }
    }

    /// The same connection, carrying `info`.
    pub fn with_info<Info>(self, info: Info) -> Deadlines<IO, Info> {
        let Self { io, first_read, idle, deadline, info: (), _permit } = self;
        Deadlines { io, first_read, idle, deadline, info, _permit }
    }
}

impl<IO, Info> Deadlines<IO, Info> {
    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// What the connection carries.
    pub fn info(&self) -> &Info {
        &self.info
    }
}

impl<IO, Info: Clone + Send + Sync + 'static> Connected for Deadlines<IO, Info> {
    type ConnectInfo = Info;

    fn connect_info(&self) -> Info {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin, Info: Unpin> AsyncRead for Deadlines<IO, Info> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.first_read = None;
                    this.deadline.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let what = if this.first_read.is_some() { "no data after connect" } else { "idle" };
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin, Info: Unpin> AsyncWrite for Deadlines<IO, Info> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
