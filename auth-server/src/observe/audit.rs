//! The audit trail: one JSON object per line for each [`Event`], on
//! standard output or appended to `audit.path`.
//!
//! A dedicated stream, not the diagnostics log: it is never sampled or
//! filtered by level, and every line has an `audit` member naming the
//! event, so a log shipper can tell its lines from the diagnostics that may
//! share standard output. Each line is written with one `write` call and
//! flushed before the call that caused it is answered, so an acknowledged
//! token or revocation is never held in a buffer. A line that cannot be
//! written is logged (sampled, as every log line) and never fails the call.
//!
//! The file is opened in append mode, created with mode 0600; rotate it
//! with `copytruncate` (appends follow the truncation).
//!
//! | `audit` | members |
//! | --- | --- |
//! | `token_issued` | `grant`, `sub`, `act` (the delegation chain, outermost actor first), `aud`, `scope`, `jti`, `sid`, `client_id`, `peer`, `exp`, `alg`, `kid` |
//! | `denied` | `rpc`, `reason`, `client_id` (as the request named it, cut at 64 bytes), `peer` |
//! | `revoked` | `kind` (`jti`, `session`, `family`), `id`, `by` (`possession`, `owner` or `admin`), `sub` (the asker's), `peer` |
//! | `refresh_reuse` | `family`, `sid` |
//! | `keys_loaded` | `reload`, `kids` (each `kid` and `alg`), `signing_kid` |
//!
//! Every line also has `ts` (RFC 3339, UTC, milliseconds). What never
//! appears: secrets, passwords, usernames of refused logins (a password
//! typed into the username field would land here), access tokens, refresh
//! tokens.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use super::{Event, Events};
use crate::clock::SharedClock;
use crate::config::AuditConfig;
use crate::revoke::Authority;

/// Most bytes of a client-chosen string written to the trail.
const CAP: usize = 64;

/// Where audit lines go.
enum Sink {
    Stdout,
    File { file: Mutex<File>, path: PathBuf },
}

/// The audit-trail sink; see the [module docs](self).
pub struct AuditLog {
    sink: Sink,
    clock: SharedClock,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let to = match &self.sink {
            Sink::Stdout => "stdout".to_owned(),
            Sink::File { path, .. } => path.display().to_string(),
        };
        f.debug_struct("AuditLog").field("to", &to).finish_non_exhaustive()
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
    /// output or the file (opened for appending, created 0600).
    pub fn open(config: &AuditConfig, clock: SharedClock) -> Result<Option<Self>, AuditError> {
        if !config.enabled {
            return Ok(None);
        }
        let sink = match &config.path {
            None => Sink::Stdout,
            Some(path) => Sink::File { file: Mutex::new(open_append(path)?), path: path.clone() },
        };
        Ok(Some(Self { sink, clock }))
    }

    /// The trail on standard output.
    pub fn stdout(clock: SharedClock) -> Self {
        Self { sink: Sink::Stdout, clock }
    }

    fn write(&self, mut line: Vec<u8>) {
        line.push(b'\n');
        let written = match &self.sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line).and_then(|()| out.flush())
            }
            Sink::File { file, .. } => {
                let mut f = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                f.write_all(&line)
            }
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "audit event not written");
        }
    }

    /// The JSON object of `event`, at `now_millis`.
    pub fn line(event: &Event<'_>, now_millis: u64) -> Value {
        Self::encode(event, now_millis).and_then(|bytes| serde_json::from_slice(&bytes)).unwrap_or(Value::Null)
    }

    /// The line of `event` at `now_millis`, as written (without the
    /// newline): `audit` and `ts` first, then the event's members in a fixed
    /// order, borrowed from the event.
    pub fn encode(event: &Event<'_>, now_millis: u64) -> Result<Vec<u8>, serde_json::Error> {
        let ts = rfc3339_millis(now_millis);
        let mut out = Vec::with_capacity(512);
        match event {
            Event::Issued { issued, caller } => {
                let c = issued.claims();
                let decoded = jws_header_bytes(&issued.access.token);
                let header: Option<BorrowedHeader<'_>> =
                    decoded.as_deref().and_then(|b| serde_json::from_slice(b).ok());
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
                    alg: header.as_ref().map(|h| super::alg_label(h.alg)),
                    kid: header.as_ref().and_then(|h| h.kid),
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

/// The decoded protected header of a compact JWS.
fn jws_header_bytes(token: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let (header, _) = token.split_once('.')?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()
}

impl Events for AuditLog {
    fn emit(&self, event: &Event<'_>) {
        match Self::encode(event, self.clock.now_millis()) {
            Ok(line) => self.write(line),
            Err(e) => tracing::error!(error = %e, "audit event not encoded"),
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
}
