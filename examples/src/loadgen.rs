//! The parts of the `loadgen` binary that decide what its figures mean: how
//! a paced load is scheduled and timed ([`Pacer`]), and how its report is
//! written ([`Report`]).
//!
//! # Pacing
//!
//! With `--rate R`, each of the `C` workers sends on its own fixed schedule
//! of absolute ticks, one every `C / R` seconds from a common start: tick
//! `n` is due at `start + n × interval`, whatever happened before. A worker
//! still busy when a tick comes due sends it as soon as it is free, and
//! that request's latency is counted from the tick, its intended send time,
//! not from when it was sent (the correction for coordinated omission, as
//! in wrk2). A stall therefore shows up in full: every request that should
//! have gone out during it carries the wait in its latency, and the
//! requests left unsent when the run ends lower the achieved rate. Without
//! the correction a stalled worker would fire its backlog at once afterwards
//! and report only the fast replies. Sends that leave more than one interval
//! after their tick are counted as late (with the largest lag), so the
//! report says when the pace was not held.
//!
//! Without `--rate` each worker sends its next request when the previous
//! one answers (a closed loop), and latency is counted from the send.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// One worker's schedule of absolute ticks.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    interval: Duration,
    next: u32,
}

/// The next request of a paced worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// When it was due: latency is counted from here.
    pub due: Instant,
    /// How long to wait before sending it (zero when it is already due).
    pub wait: Duration,
    /// How late it is, when more than one interval overdue (the worker was
    /// busy past the next tick: the pace was not held).
    pub late: Option<Duration>,
}

impl Pacer {
    /// Ticks every `interval` from `start` (the first one at `start`).
    pub fn new(start: Instant, interval: Duration) -> Self {
        Self { start, interval, next: 0 }
    }

    /// The next tick, for a worker free at `now`. Ticks are never skipped
    /// and never moved: one due during a stall is sent after it, and its
    /// latency includes the stall.
    pub fn next(&mut self, now: Instant) -> Tick {
        let due = self.start + self.interval.saturating_mul(self.next);
        self.next = self.next.saturating_add(1);
        let lag = now.saturating_duration_since(due);
        Tick { due, wait: due.saturating_duration_since(now), late: (lag > self.interval).then_some(lag) }
    }

    /// Ticks due at or before `until`: the requests the schedule asked for
    /// up to then, whether sent or not.
    pub fn due_by(&self, until: Instant) -> u64 {
        match until.checked_duration_since(self.start) {
            None => 0,
            Some(_) if self.interval.is_zero() => 1,
            Some(span) => u64::try_from(span.as_nanos() / self.interval.as_nanos()).unwrap_or(u64::MAX - 1) + 1,
        }
    }
}

/// An mTLS channel to `addr` as the dev client `client` of the
/// `auth-server dev` directory `dir` (`ca.pem`, `clients/<client>.pem` and
/// its key), checking the server as `localhost`.
pub async fn dev_channel(addr: &str, dir: &Path, client: &str) -> Result<Channel, String> {
    let read = |path: PathBuf| std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()));
    let ca = read(dir.join("ca.pem"))?;
    let cert = read(dir.join("clients").join(format!("{client}.pem")))?;
    let key = read(dir.join("clients").join(format!("{client}-key.pem")))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    Channel::from_shared(addr.to_owned())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect {addr}: {e}"))
}

/// Why the report stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Standard output was closed (`loadgen ... | head`): stop quietly.
    #[error("standard output closed")]
    Closed,
    /// Any other write error.
    #[error("writing the report: {0}")]
    Io(std::io::Error),
}

/// Writes report lines to a stream (standard output), turning a closed
/// pipe into [`ReportError::Closed`] instead of the panic of `println!`.
#[derive(Debug)]
pub struct Report<W> {
    out: W,
}

impl<W: Write> Report<W> {
    /// A report written to `out`.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Writes one line (and flushes it, so a reader sees each figure as it
    /// comes).
    pub fn line(&mut self, line: std::fmt::Arguments<'_>) -> Result<(), ReportError> {
        let written = self.out.write_fmt(line).and_then(|()| self.out.write_all(b"\n")).and_then(|()| self.out.flush());
        written.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => ReportError::Closed,
            _ => ReportError::Io(e),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_stall_shows_in_the_latency_of_every_tick_due_during_it() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, 10 * MS);
        // On time: each send waits for its tick.
        assert_eq!(pacer.next(start), Tick { due: start, wait: Duration::ZERO, late: None });
        let t = pacer.next(start + 2 * MS);
        assert_eq!((t.due, t.wait, t.late), (start + 10 * MS, 8 * MS, None));
        // The worker is stuck for 100 ms in the request sent at 10 ms.
        let free = start + 110 * MS;
        let (mut now, mut latencies, mut late) = (free, Vec::new(), Vec::new());
        loop {
            let t = pacer.next(now);
            if t.due > free {
                break;
            }
            assert_eq!(t.wait, Duration::ZERO, "an overdue tick is sent at once");
            late.extend(t.late);
            // Answered in 1 ms; the latency counts from the tick.
            now += MS;
            latencies.push(now - t.due);
        }
        // Ticks at 20, 30, ..., 110 ms were all due during the stall: none
        // is skipped or moved, and each carries its wait.
        assert_eq!(latencies.len(), 10);
        assert_eq!(latencies[0], 91 * MS);
        assert!(latencies.windows(2).all(|w| w[0] > w[1]), "{latencies:?}");
        // Late: sent more than one interval after the tick (20 to 100 ms).
        assert_eq!(late.len(), 9);
        assert_eq!(late.iter().max(), Some(&(90 * MS)));
        // Caught up: the next tick waits again.
        assert!(pacer.next(now).wait > Duration::ZERO);
    }

    #[test]
    fn unsent_ticks_are_counted_against_the_rate() {
        let start = Instant::now();
        let pacer = Pacer::new(start, 10 * MS);
        assert_eq!(pacer.due_by(start), 1);
        assert_eq!(pacer.due_by(start + 95 * MS), 10);
        assert_eq!(pacer.due_by(start + 100 * MS), 11);
        assert_eq!(Pacer::new(start + MS, 10 * MS).due_by(start), 0);
    }

    #[test]
    fn a_closed_pipe_ends_the_report_quietly() {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut report = Report::new(writer);
        drop(reader);
        // Rust ignores SIGPIPE, so the write fails with EPIPE, which
        // println! would turn into a panic.
        assert!(matches!(report.line(format_args!("ok: {}", 1)), Err(ReportError::Closed)));
        assert!(matches!(report.line(format_args!("again")), Err(ReportError::Closed)));
    }

    #[test]
    fn lines_reach_an_open_pipe() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let mut report = Report::new(writer);
        report.line(format_args!("p99 {:.2} ms", 1.5)).unwrap();
        drop(report);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
        assert_eq!(text, "p99 1.50 ms\n");
    }
}
