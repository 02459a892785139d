//! The audit trail: one JSON object per line for each [`Event`], on
//! standard output or appended to `audit.path`.
//!
//! A dedicated stream, not the diagnostics log: it is never sampled or
//! filtered by level, and every line has an `audit` member naming the
//! event, so a log shipper can tell its lines from the diagnostics that may
//! share standard output.
//!
//! **Never in the way of a call.** The RPC hands its line to a queue
//! ([`QUEUE_LINES`] lines) and a writer thread writes it, in order, and
//! flushes whenever the queue runs empty: an RPC never waits on the disk or
//! on a reader of standard output. A sink that stalls (a full disk, a log
//! shipper that stopped reading the pipe) fills the queue; lines beyond it
//! are dropped and counted (`auth_audit_lines_dropped_total`), and once the
//! writer moves again a `lines_dropped` line says how many, so a gap in
//! the trail is never silent. At shutdown the queue is written out before
//! the process exits (at most [`FLUSH_WAIT`]).
//!
//! **Floods are summed.** `denied` events of reason `rate_limited` or
//! `overloaded`, the ones a flood makes by the thousand, are summed per
//! (`rpc`, `reason`, `client_id`, `peer`) and written once a second with
//! a `count` member: a flood costs a line per caller per second, not a line
//! per refused call. Every other event is a line of its own.
//!
//! The file is opened in append mode, created with mode 0600. Rotate it by
//! renaming and sending SIGHUP (the server reopens `audit.path`), or with
//! `copytruncate` (appends follow the truncation).
//!
//! | `audit` | members |
//! | --- | --- |
//! | `token_issued` | `grant`, `sub`, `act` (the delegation chain, outermost actor first), `aud`, `scope`, `jti`, `sid`, `client_id`, `peer`, `exp`, `alg`, `kid` |
//! | `denied` | `rpc`, `reason`, `client_id` (as the request named it, cut at 64 bytes), `peer`; `count` on a summed flood line |
//! | `revoked` | `kind` (`jti`, `session`, `family`), `id`, `by` (`possession`, `owner` or `admin`), `sub` (the asker's), `peer` |
//! | `refresh_reuse` | `family`, `sid` |
//! | `keys_loaded` | `reload`, `kids` (each `kid` and `alg`), `signing_kid` |
//! | `lines_dropped` | `count`: lines lost while the sink was stalled |
//!
//! Every line also has `ts` (RFC 3339, UTC, milliseconds). What never
//! appears: secrets, passwords, usernames of refused logins (a password
//! typed into the username field would land here), access tokens, refresh
//! tokens.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use serde_json::Value;

use super::{DenyReason, Event, Events, Rpc};
use crate::clock::SharedClock;
use crate::config::AuditConfig;
use crate::revoke::Authority;

/// Most bytes of a client-chosen string written to the trail.
const CAP: usize = 64;

/// Lines waiting for the writer at most; beyond, lines are dropped and
/// counted.
pub const QUEUE_LINES: usize = 16_384;

/// How long the writer gathers lines after a batch before it waits on the
/// queue again. While it waits, every queued line wakes it (a futex wake
/// by the RPC and a context switch); under load that ping-pong cost the
/// server more CPU than the lines themselves (a quarter of it, on one
/// core). Pausing this long after a batch lets the next lines queue
/// without waking anyone, so a busy server writes a batch per pause: the
/// trail lags at most this much more.
const BATCH_PAUSE: Duration = Duration::from_millis(2);

/// The writer writes a batch out once it holds this many bytes (and at the
/// batch's end in any case).
const BATCH_BYTES: usize = 64 * 1024;

/// How long summed flood denials are gathered before their lines are
/// written.
const FLOOD_WINDOW: Duration = Duration::from_secs(1);

/// Distinct (rpc, reason, client_id, peer) sums per window; the callers
/// beyond are summed in one line without `client_id` and `peer`.
const FLOOD_KEYS: usize = 1024;

/// The longest shutdown waits for the queue to be written.
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Counter: audit lines dropped because the sink stalled.
pub const LINES_DROPPED: &str = "auth_audit_lines_dropped_total";

/// Where audit lines go.
enum Sink {
    Stdout,
    File {
        file: File,
        path: PathBuf,
    },
    #[cfg(test)]
    Writer(Box<dyn std::io::Write + Send>),
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(bytes),
            Sink::File { file, .. } => file.write_all(bytes),
            #[cfg(test)]
            Sink::Writer(w) => w.write_all(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().flush(),
            Sink::File { .. } => Ok(()),
            #[cfg(test)]
            Sink::Writer(w) => w.flush(),
        }
    }

    /// Opens the file at its path again (after a rename by log rotation);
    /// on failure the old handle stays.
    fn reopen(&mut self) {
        if let Sink::File { file, path } = self {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
                    tracing::info!(path = %path.display(), "audit file reopened");
                }
                Err(e) => tracing::error!(error = %e, "audit file not reopened; still writing to the old one"),
            }
        }
    }
}

/// What the writer thread is asked to do.
enum Msg {
    /// A line, without its newline.
    Line(Vec<u8>),
    /// One flood denial to sum.
    Flood(FloodKey),
    /// Reopen the file.
    Reopen,
    /// Write everything queued and the current sums, then answer.
    Flush(SyncSender<()>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FloodKey {
    rpc: Rpc,
    reason: DenyReason,
    client_id: Option<String>,
    peer: Option<String>,
}

/// The audit-trail sink; see the [module docs](self).
pub struct AuditLog {
    queue: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    clock: SharedClock,
    to: String,
    headers: HeaderCache,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("to", &self.to).finish_non_exhaustive()
    }
}

/// The audit file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit.path {path}: {source}")]
pub struct AuditError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

impl AuditLog {
    /// The trail `config` asks for: `None` when disabled, else standard
    /// output or the file (opened for appending, created 0600), with its
    /// writer thread started.
    pub fn open(config: &AuditConfig, clock: SharedClock) -> Result<Option<Self>, AuditError> {
        if !config.enabled {
            return Ok(None);
        }
        let sink = match &config.path {
            None => Sink::Stdout,
            Some(path) => Sink::File { file: open_append(path)?, path: path.clone() },
        };
        Self::start(sink, clock).map(Some)
    }

    /// The trail on standard output.
    pub fn stdout(clock: SharedClock) -> Result<Self, AuditError> {
        Self::start(Sink::Stdout, clock)
    }

    fn start(sink: Sink, clock: SharedClock) -> Result<Self, AuditError> {
        let to = match &sink {
            Sink::File { path, .. } => path.display().to_string(),
            _ => "stdout".to_owned(),
        };
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            sink,
            out: Vec::with_capacity(BATCH_BYTES),
            dropped: Arc::clone(&dropped),
            clock: Arc::clone(&clock),
            floods: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|source| AuditError { path: PathBuf::from(&to), source })?;
        Ok(Self { queue, dropped, clock, to, headers: HeaderCache::default() })
    }

    /// Queues `msg`; a full queue (a stalled sink) drops and counts it.
    fn send(&self, msg: Msg) {
        match self.queue.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(LINES_DROPPED).increment(1);
            }
        }
    }

    /// Waits (at most `wait`) until everything queued so far is written.
    /// `false`: the writer did not get there in time.
    pub fn flush_within(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let mut msg = Msg::Flush(done_tx);
        loop {
            match self.queue.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }

    /// The JSON object of `event`, at `now_millis`.
    pub fn line(event: &Event<'_>, now_millis: u64) -> Value {
        Self::encode(event, now_millis).and_then(|bytes| serde_json::from_slice(&bytes)).unwrap_or(Value::Null)
    }

    /// The line of `event` at `now_millis`, as written (without the
    /// newline): `audit` and `ts` first, then the event's members in a fixed
    /// order, borrowed from the event.
    pub fn encode(event: &Event<'_>, now_millis: u64) -> Result<Vec<u8>, serde_json::Error> {
        Self::encode_with(event, now_millis, &HeaderCache::default())
    }

    /// [`AuditLog::encode`], reading JWS headers through `headers`.
    fn encode_with(event: &Event<'_>, now_millis: u64, headers: &HeaderCache) -> Result<Vec<u8>, serde_json::Error> {
        let ts = rfc3339_millis(now_millis);
        let mut out = Vec::with_capacity(512);
        match event {
            Event::Issued { issued, caller } => {
                let c = issued.claims();
                let header = headers.of(&issued.access.token);
                let mut act = Vec::new();
                let mut next = c.act.as_ref();
                while let Some(a) = next {
                    act.push(a.sub.as_str());
                    next = a.act.as_deref();
                }
                let line = IssuedLine {
                    audit: "token_issued",
                    ts: &ts,
                    grant: issued.kind.as_str(),
                    sub: &c.sub,
                    act,
                    aud: c.aud.iter().collect(),
                    scope: &c.perms,
                    jti: &c.jti,
                    sid: c.sid.as_deref(),
                    client_id: &c.client_id,
                    peer: caller.peer,
                    exp: c.exp,
                    alg: header.as_ref().and_then(|h| h.alg),
                    kid: header.as_ref().and_then(|h| h.kid.as_deref()),
                };
                serde_json::to_writer(&mut out, &line)?;
            }
            Event::Denied { rpc, reason, caller } => {
                let line = DeniedLine {
                    audit: "denied",
                    ts: &ts,
                    rpc: rpc.as_str(),
                    reason: reason.as_str(),
                    client_id: caller.client_id.map(capped),
                    peer: caller.peer,
                    count: None,
                };
                serde_json::to_writer(&mut out, &line)?;
            }
            Event::Revoked { revocation, by, caller } => {
                let (how, sub) = match by {
                    Authority::Possession { sub } => ("possession", sub),
                    Authority::Bearer { sub, admin: false } => ("owner", sub),
                    Authority::Bearer { sub, admin: true } => ("admin", sub),
                };
                let line = RevokedLine {
                    audit: "revoked",
                    ts: &ts,
                    kind: super::metrics::kind_label(revocation.kind),
                    id: &revocation.id,
                    by: how,
                    sub,
                    peer: caller.peer,
                };
                serde_json::to_writer(&mut out, &line)?;
            }
            Event::RefreshReuse { family, sid } => {
                let line = ReuseLine { audit: "refresh_reuse", ts: &ts, family, sid };
                serde_json::to_writer(&mut out, &line)?;
            }
            Event::KeysLoaded { keys, signing_kid, reload } => {
                let kids = keys.iter().map(|k| KeyEntry { kid: &k.kid, alg: k.alg }).collect();
                let line = KeysLine { audit: "keys_loaded", ts: &ts, reload: *reload, kids, signing_kid: *signing_kid };
                serde_json::to_writer(&mut out, &line)?;
            }
        }
        Ok(out)
    }
}

#[derive(Serialize)]
struct IssuedLine<'a> {
    audit: &'static str,
    ts: &'a str,
    grant: &'static str,
    sub: &'a str,
    act: Vec<&'a str>,
    aud: Vec<&'a str>,
    scope: &'a [String],
    jti: &'a str,
    sid: Option<&'a str>,
    client_id: &'a str,
    peer: Option<&'a str>,
    exp: u64,
    alg: Option<&'static str>,
    kid: Option<&'a str>,
}

#[derive(Serialize)]
struct DeniedLine<'a> {
    audit: &'static str,
    ts: &'a str,
    rpc: &'static str,
    reason: &'static str,
    client_id: Option<&'a str>,
    peer: Option<&'a str>,
    /// Summed flood denials only.
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
}

#[derive(Serialize)]
struct DroppedLine<'a> {
    audit: &'static str,
    ts: &'a str,
    count: u64,
}

#[derive(Serialize)]
struct RevokedLine<'a> {
    audit: &'static str,
    ts: &'a str,
    kind: &'static str,
    id: &'a str,
    by: &'static str,
    sub: &'a str,
    peer: Option<&'a str>,
}

#[derive(Serialize)]
struct ReuseLine<'a> {
    audit: &'static str,
    ts: &'a str,
    family: &'a str,
    sid: &'a str,
}

#[derive(Serialize)]
struct KeysLine<'a> {
    audit: &'static str,
    ts: &'a str,
    reload: bool,
    kids: Vec<KeyEntry<'a>>,
    signing_kid: Option<&'a str>,
}

#[derive(Serialize)]
struct KeyEntry<'a> {
    kid: &'a str,
    alg: &'static str,
}

/// The members of a JWS header the trail reports, borrowed from it.
#[derive(serde::Deserialize)]
struct BorrowedHeader<'a> {
    alg: &'a str,
    #[serde(default)]
    kid: Option<&'a str>,
}

/// The `alg` label and `kid` of a JWS protected header.
struct Header {
    /// The encoded header they were read from.
    encoded: Box<str>,
    alg: Option<&'static str>,
    kid: Option<Box<str>>,
}

/// The last JWS header the trail decoded. The server signs with one key at
/// a time, so its tokens share one encoded header: it is decoded once per
/// key, not once per token.
#[derive(Default)]
struct HeaderCache(ArcSwapOption<Header>);

impl HeaderCache {
    /// The `alg` and `kid` of `token`'s header (`None` without one).
    fn of(&self, token: &str) -> Option<Arc<Header>> {
        use base64::Engine as _;
        let (encoded, _) = token.split_once('.')?;
        if let Some(last) = self.0.load_full()
            && *last.encoded == *encoded
        {
            return Some(last);
        }
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).ok();
        let parsed: Option<BorrowedHeader<'_>> = decoded.as_deref().and_then(|b| serde_json::from_slice(b).ok());
        let header = Arc::new(Header {
            encoded: encoded.into(),
            alg: parsed.as_ref().map(|h| super::alg_label(h.alg)),
            kid: parsed.and_then(|h| h.kid).map(Into::into),
        });
        self.0.store(Some(Arc::clone(&header)));
        Some(header)
    }
}

impl Events for AuditLog {
    fn emit(&self, event: &Event<'_>) {
        if let Event::Denied { rpc, reason: reason @ (DenyReason::RateLimited | DenyReason::Overloaded), caller } =
            event
        {
            let key = FloodKey {
                rpc: *rpc,
                reason: *reason,
                client_id: caller.client_id.map(|c| capped(c).to_owned()),
                peer: caller.peer.map(str::to_owned),
            };
            return self.send(Msg::Flood(key));
        }
        match Self::encode_with(event, self.clock.now_millis(), &self.headers) {
            Ok(line) => self.send(Msg::Line(line)),
            Err(e) => tracing::error!(error = %e, "audit event not encoded"),
        }
    }

    fn reopen(&self) {
        self.send(Msg::Reopen);
    }

    fn flush(&self) {
        if !self.flush_within(FLUSH_WAIT) {
            tracing::warn!(to = %self.to, "audit lines still queued at shutdown were not all written");
        }
    }
}

/// The writer thread: owns the sink, writes queued lines in order, sums
/// flood denials per window. A batch's lines go out in one write (or one
/// per [`BATCH_BYTES`]), not one each: a write per line was a system call
/// per RPC.
struct Writer {
    sink: Sink,
    /// Lines of the batch not written yet.
    out: Vec<u8>,
    dropped: Arc<AtomicU64>,
    clock: SharedClock,
    floods: HashMap<FloodKey, u64>,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Msg>) {
        let mut window_end = Instant::now() + FLOOD_WINDOW;
        loop {
            let wait = window_end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    self.handle(msg);
                    // Whatever else is queued goes out in the same batch.
                    while let Ok(msg) = rx.try_recv() {
                        self.handle(msg);
                    }
                    self.finish_batch();
                    // Lines queued meanwhile wake no one (see BATCH_PAUSE).
                    std::thread::sleep(BATCH_PAUSE);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.write_sums();
                    self.finish_batch();
                    return;
                }
            }
            if Instant::now() >= window_end {
                self.write_sums();
                window_end = Instant::now() + FLOOD_WINDOW;
            }
            self.finish_batch();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => self.write_line(line),
            Msg::Flood(key) => {
                let key = if self.floods.len() >= FLOOD_KEYS && !self.floods.contains_key(&key) {
                    FloodKey { client_id: None, peer: None, ..key }
                } else {
                    key
                };
                *self.floods.entry(key).or_default() += 1;
            }
            Msg::Reopen => {
                self.finish_batch();
                self.sink.reopen();
            }
            Msg::Flush(done) => {
                self.write_sums();
                self.finish_batch();
                let _ = done.try_send(());
            }
        }
    }

    fn write_line(&mut self, line: Vec<u8>) {
        self.out.extend_from_slice(&line);
        self.out.push(b'\n');
        if self.out.len() >= BATCH_BYTES {
            self.write_out();
        }
    }

    /// Writes the lines gathered so far.
    fn write_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        if let Err(e) = self.sink.write_all(&self.out) {
            let lines = self.out.iter().filter(|b| **b == b'\n').count();
            tracing::error!(error = %e, lines, "audit lines not written");
        }
        self.out.clear();
        if self.out.capacity() > 4 * BATCH_BYTES {
            self.out.shrink_to(BATCH_BYTES);
        }
    }

    /// One `denied` line with its `count` per summed flood key.
    fn write_sums(&mut self) {
        if self.floods.is_empty() {
            return;
        }
        let ts = rfc3339_millis(self.clock.now_millis());
        for (key, count) in std::mem::take(&mut self.floods) {
            let line = DeniedLine {
                audit: "denied",
                ts: &ts,
                rpc: key.rpc.as_str(),
                reason: key.reason.as_str(),
                client_id: key.client_id.as_deref(),
                peer: key.peer.as_deref(),
                count: Some(count),
            };
            if let Ok(bytes) = serde_json::to_vec(&line) {
                self.write_line(bytes);
            }
        }
    }

    /// Reports lines dropped since the last report, and flushes.
    fn finish_batch(&mut self) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let line =
                DroppedLine { audit: "lines_dropped", ts: &rfc3339_millis(self.clock.now_millis()), count: dropped };
            if let Ok(bytes) = serde_json::to_vec(&line) {
                self.write_line(bytes);
            }
            tracing::warn!(dropped, "audit lines dropped: the audit sink stalled");
        }
        self.write_out();
        if let Err(e) = self.sink.flush() {
            tracing::error!(error = %e, "audit lines not flushed");
        }
    }
}

/// Opens `path` for appending, creating it with mode 0600. An existing file
/// keeps its mode; one readable by others is reported.
fn open_append(path: &Path) -> Result<File, AuditError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let err = |source| AuditError { path: path.to_owned(), source };
    let file = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(err)?;
    let mode = file.metadata().map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format_args!("{:o}", mode & 0o777), "audit file is readable by others");
    }
    Ok(file)
}

/// A client-chosen string, cut at [`CAP`] bytes (on a character boundary).
fn capped(s: &str) -> &str {
    if s.len() <= CAP {
        return s;
    }
    let mut end = CAP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `millis` since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_millis(millis: u64) -> String {
    let secs = millis / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, millis % 1000)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use service_sdk::{Actor, Audience, Claims};

    use serde_json::json;

    use super::*;
    use crate::grant::{GrantKind, Issued, Minted, RefreshIssued};
    use crate::observe::{Caller, DenyReason, PublishedKey, Rpc};
    use crate::store::{Revocation, RevocationKind};

    fn issued() -> Issued {
        use base64::Engine as _;
        let header =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#);
        let claims = Claims {
            iss: "auth-service".into(),
            sub: "alice".into(),
            aud: Audience::One("inventory".into()),
            exp: 1_700_000_300,
            nbf: 1_700_000_000,
            iat: 1_700_000_000,
            jti: "jti-1".into(),
            sid: Some("sid-1".into()),
            client_id: "order".into(),
            role: None,
            perms: vec!["inventory:read".into()],
            act: Some(Actor {
                sub: "svc:order".into(),
                act: Some(Box::new(Actor { sub: "svc:gw".into(), act: None })),
            }),
            cnf: None,
        };
        Issued {
            kind: GrantKind::Exchange,
            access: Minted { token: format!("{header}.SECRET-CLAIMS.SECRET-SIGNATURE"), claims },
            refresh: Some(RefreshIssued { token: "SECRET-REFRESH".into() }),
        }
    }

    #[test]
    fn an_issued_token_is_described_without_the_token() {
        let issued = issued();
        let caller = Caller { client_id: Some("order"), peer: Some("spiffe://auth.dev/order") };
        let line = AuditLog::line(&Event::Issued { issued: &issued, caller }, 1_700_000_000_123);
        let want = json!({
            "audit": "token_issued", "ts": "2023-11-14T22:13:20.123Z", "grant": "exchange", "sub": "alice",
            "act": ["svc:order", "svc:gw"], "aud": ["inventory"], "scope": ["inventory:read"], "jti": "jti-1",
            "sid": "sid-1", "client_id": "order", "peer": "spiffe://auth.dev/order", "exp": 1_700_000_300u64,
            "alg": "ES256", "kid": "k1",
        });
        assert_eq!(line, want);
        let text = String::from_utf8(AuditLog::encode(&Event::Issued { issued: &issued, caller }, 0).unwrap()).unwrap();
        assert!(text.starts_with(r#"{"audit":"token_issued","ts":"1970-01-01T00:00:00.000Z","grant":"#), "{text}");
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["jti"], "jti-1");
    }

    #[test]
    fn the_header_is_read_once_per_key_and_a_new_key_is_read_again() {
        use base64::Engine as _;
        let headers = HeaderCache::default();
        let token = |alg: &str, kid: &str| {
            let h = format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"at+jwt"}}"#);
            format!("{}.claims.sig", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h))
        };
        let caller = Caller::default();
        let mut seen = Vec::new();
        for (alg, kid) in [("ES256", "k1"), ("ES256", "k1"), ("EdDSA", "k2"), ("ES256", "k1")] {
            let mut issued = issued();
            issued.access.token = token(alg, kid);
            let line = AuditLog::encode_with(&Event::Issued { issued: &issued, caller }, 0, &headers).unwrap();
            let line: Value = serde_json::from_slice(&line).unwrap();
            seen.push(format!("{}/{}", line["alg"].as_str().unwrap(), line["kid"].as_str().unwrap()));
        }
        assert_eq!(seen, ["ES256/k1", "ES256/k1", "EdDSA/k2", "ES256/k1"]);
        let a = headers.of(&token("ES256", "k1")).unwrap();
        assert!(Arc::ptr_eq(&a, &headers.of(&token("ES256", "k1")).unwrap()), "decoded once");
        let garbage = headers.of("!!!.x.y").unwrap();
        assert_eq!((garbage.alg, garbage.kid.as_deref()), (None, None));
        assert!(headers.of("no-dots").is_none());
    }

    #[test]
    fn denials_revocations_reuse_and_keys_have_their_members() {
        let hostile = format!("evil\n{}", "x".repeat(200));
        let caller = Caller { client_id: Some(&hostile), peer: None };
        let line =
            AuditLog::line(&Event::Denied { rpc: Rpc::Login, reason: DenyReason::BadClientCredentials, caller }, 0);
        assert_eq!(line["rpc"], "Login");
        assert_eq!(line["reason"], "bad_client_credentials");
        assert_eq!(line["client_id"].as_str().unwrap().len(), CAP);
        assert_eq!(line["peer"], Value::Null);
        assert!(!line.to_string().contains('\n'), "one line, the newline escaped");

        let revocation = Revocation { kind: RevocationKind::Sid, id: "sid-9".into(), expires_at: 5 };
        let by = Authority::Bearer { sub: "svc:admin".into(), admin: true };
        let caller = Caller { client_id: None, peer: Some("spiffe://auth.dev/admin") };
        let line = AuditLog::line(&Event::Revoked { revocation: &revocation, by: &by, caller }, 0);
        assert_eq!(
            line,
            json!({"audit": "revoked", "ts": "1970-01-01T00:00:00.000Z", "kind": "session", "id": "sid-9",
                   "by": "admin", "sub": "svc:admin", "peer": "spiffe://auth.dev/admin"})
        );

        let line = AuditLog::line(&Event::RefreshReuse { family: "fam", sid: "s" }, 0);
        assert_eq!((line["family"].as_str(), line["sid"].as_str()), (Some("fam"), Some("s")));

        let keys = [PublishedKey { kid: "k1".into(), alg: "ES256" }];
        let line = AuditLog::line(&Event::KeysLoaded { keys: &keys, signing_kid: Some("k1"), reload: true }, 0);
        assert_eq!(line["kids"], json!([{"kid": "k1", "alg": "ES256"}]));
        assert_eq!(line["reload"], true);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_999), "2000-02-29T00:00:00.999Z");
        assert_eq!(rfc3339_millis(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn the_file_is_appended_and_created_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let clock: SharedClock = std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000));
        let config = AuditConfig { enabled: true, path: Some(path.clone()) };
        for round in 0..2 {
            let log = AuditLog::open(&config, clock.clone()).unwrap().unwrap();
            log.emit(&Event::RefreshReuse { family: "f", sid: &format!("s{round}") });
            assert!(log.flush_within(Duration::from_secs(5)));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let sids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["sid"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(sids, ["s0", "s1"]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(AuditLog::open(&AuditConfig { enabled: false, path: Some(path) }, clock.clone()).unwrap().is_none());
        let missing = AuditConfig { enabled: true, path: Some(dir.path().join("no/such/audit.jsonl")) };
        assert!(AuditLog::open(&missing, clock).is_err());
    }

    /// A sink that blocks every write until released, as a full pipe does.
    struct Stalled {
        open: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        out: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl std::io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cvar) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cvar.wait(open).unwrap();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &std::sync::Mutex<Vec<u8>>) -> Vec<Value> {
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn a_stalled_sink_never_blocks_a_call_and_the_gap_is_counted() {
        let open = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Sink::Writer(Box::new(Stalled { open: Arc::clone(&open), out: Arc::clone(&out) }));
        let clock: SharedClock = Arc::new(crate::clock::ManualClock::new(1_700_000_000));
        let log = Arc::new(AuditLog::start(sink, clock).unwrap());
        // More events than the queue holds, while the sink is stuck: the
        // calls that emit them must all return.
        let total = QUEUE_LINES + 5_000;
        let emitting = Arc::clone(&log);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..total {
                emitting.emit(&Event::RefreshReuse { family: "f", sid: &i.to_string() });
            }
            let _ = done_tx.send(());
        });
        assert!(done_rx.recv_timeout(Duration::from_secs(20)).is_ok(), "emitting blocked on a stalled audit sink");
        assert!(!log.flush_within(Duration::from_millis(50)), "nothing can be written while the sink is stuck");
        let (lock, cvar) = &*open;
        *lock.lock().unwrap() = true;
        cvar.notify_all();
        assert!(log.flush_within(Duration::from_secs(20)));
        let written = lines(&out);
        let reuse = written.iter().filter(|l| l["audit"] == "refresh_reuse").count();
        let dropped: u64 =
            written.iter().filter(|l| l["audit"] == "lines_dropped").map(|l| l["count"].as_u64().unwrap()).sum();
        assert!(dropped > 0, "a full queue drops lines");
        // Every event is either written or counted as dropped (the flush
        // asked for above, while stuck, may itself have found the queue full).
        assert_eq!(reuse as u64 + dropped, total as u64);
        // What was written is in order.
        let sids: Vec<u64> = written
            .iter()
            .filter(|l| l["audit"] == "refresh_reuse")
            .map(|l| l["sid"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(sids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn flood_denials_are_summed_per_caller_and_other_events_stay_lines() {
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let open = Arc::new((std::sync::Mutex::new(true), std::sync::Condvar::new()));
        let sink = Sink::Writer(Box::new(Stalled { open, out: Arc::clone(&out) }));
        let clock: SharedClock = Arc::new(crate::clock::ManualClock::new(1_700_000_000));
        let log = AuditLog::start(sink, clock).unwrap();
        let noisy = Caller { client_id: None, peer: Some("spiffe://auth.dev/noisy") };
        let other = Caller { client_id: None, peer: Some("spiffe://auth.dev/other") };
        for _ in 0..1000 {
            log.emit(&Event::Denied { rpc: Rpc::ExchangeToken, reason: DenyReason::RateLimited, caller: noisy });
        }
        log.emit(&Event::Denied { rpc: Rpc::ExchangeToken, reason: DenyReason::RateLimited, caller: other });
        log.emit(&Event::Denied { rpc: Rpc::Login, reason: DenyReason::Overloaded, caller: noisy });
        log.emit(&Event::Denied { rpc: Rpc::Login, reason: DenyReason::BadPassword, caller: noisy });
        log.emit(&Event::Denied { rpc: Rpc::Login, reason: DenyReason::BadPassword, caller: noisy });
        assert!(log.flush_within(Duration::from_secs(10)));
        let written = lines(&out);
        let lines_of = |rpc: &str, reason: &str, peer: &str| -> Vec<Value> {
            written
                .iter()
                .filter(|l| l["rpc"] == rpc && l["reason"] == reason && l["peer"] == peer)
                .map(|l| l["count"].clone())
                .collect()
        };
        // A sum per caller per second: a busy host may cut the emits into
        // two windows, never lose or double one.
        let summed = |rpc: &str, reason: &str, peer: &str| -> (usize, u64) {
            let counts = lines_of(rpc, reason, peer);
            (counts.len(), counts.iter().map(|c| c.as_u64().unwrap()).sum())
        };
        let (noisy_lines, noisy_total) = summed("ExchangeToken", "rate_limited", "spiffe://auth.dev/noisy");
        assert_eq!(noisy_total, 1000);
        assert!((1..=2).contains(&noisy_lines), "{noisy_lines} lines for one caller's flood");
        assert_eq!(summed("ExchangeToken", "rate_limited", "spiffe://auth.dev/other"), (1, 1));
        assert_eq!(summed("Login", "overloaded", "spiffe://auth.dev/noisy"), (1, 1));
        // One line each, without a count.
        assert_eq!(lines_of("Login", "bad_password", "spiffe://auth.dev/noisy"), [Value::Null, Value::Null]);
        assert_eq!(written.len(), 4 + noisy_lines, "{written:?}");
    }

    #[test]
    fn the_file_is_opened_again_after_it_was_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let clock: SharedClock = Arc::new(crate::clock::ManualClock::new(1_700_000_000));
        let log = AuditLog::open(&AuditConfig { enabled: true, path: Some(path.clone()) }, clock).unwrap().unwrap();
        log.emit(&Event::RefreshReuse { family: "f", sid: "before" });
        assert!(log.flush_within(Duration::from_secs(5)));
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.emit(&Event::RefreshReuse { family: "f", sid: "after" });
        assert!(log.flush_within(Duration::from_secs(5)));
        let sids = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["sid"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(sids(&rotated), ["before"]);
        assert_eq!(sids(&path), ["after"]);
    }
}
