//! How records and events are written as Redis values and read back: the
//! registry entry, revoked-`jti` bucket entries, refresh records, channel
//! messages and the replies of the scripts. Every decoder returns
//! [`StoreError::Corrupt`] on what it cannot read, and names no key material.

use std::collections::HashMap;

use super::keys::Bucket;
use crate::store::{ConsumeOutcome, IssuedToken, RefreshRecord, Revocation, RevocationKind, StoreError};

/// The fields of a refresh record's hash that make a [`RefreshRecord`], in
/// the order [`parse_refresh`] reads them.
pub(super) const REFRESH_FIELDS: [&str; 7] = ["family", "sid", "sub", "client_id", "audience", "scope", "expires_at"];

pub(super) fn kind_code(kind: RevocationKind) -> &'static str {
    match kind {
        RevocationKind::Jti => "j",
        RevocationKind::Sid => "s",
        RevocationKind::Family => "f",
    }
}

pub(super) fn kind_from_code(code: &str) -> Option<RevocationKind> {
    match code {
        "j" => Some(RevocationKind::Jti),
        "s" => Some(RevocationKind::Sid),
        "f" => Some(RevocationKind::Family),
        _ => None,
    }
}

/// A channel message: `<kind>|<deny_until>|<id>`.
pub(super) fn encode_message(revocation: &Revocation) -> String {
    format!("{}|{}|{}", kind_code(revocation.kind), revocation.expires_at, revocation.id)
}

/// Parses a channel message `<kind>|<deny_until>|<id>`.
pub(super) fn parse_message(text: &str) -> Option<Revocation> {
    let mut parts = text.splitn(3, '|');
    let kind = kind_from_code(parts.next()?)?;
    let expires_at = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_owned();
    Some(Revocation { kind, id, expires_at })
}

/// Parses a sorted-set score or hash value holding Unix seconds. Redis may
/// print large integral scores in floating-point notation.
pub(super) fn parse_score(text: &str) -> Result<u64, StoreError> {
    if let Ok(v) = text.parse::<u64>() {
        return Ok(v);
    }
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 => Ok(v as u64),
        _ => Err(StoreError::Corrupt("unreadable expiry".into())),
    }
}

/// The registry entry's body (after the deny mark, which the scripts
/// write): `<exp>|<sid length or ->|<sid><sub>`.
pub(super) fn encode_issued(token: &IssuedToken) -> String {
    match &token.sid {
        Some(sid) => format!("{}|{}|{sid}{}", token.exp, sid.len(), token.sub),
        None => format!("{}|-|{}", token.exp, token.sub),
    }
}

/// Parses a registry value `<mark>|<exp>|<sid_len or ->|<sid><sub>`;
/// `None` for a deny mark with no issued record (`<deny_until>|`).
pub(super) fn parse_issued(value: &str) -> Result<Option<IssuedToken>, StoreError> {
    let corrupt = || StoreError::Corrupt("issued-token entry unreadable".into());
    let (_mark, rest) = value.split_once('|').ok_or_else(corrupt)?;
    if rest.is_empty() {
        return Ok(None);
    }
    let (exp, rest) = rest.split_once('|').ok_or_else(corrupt)?;
    let exp = exp.parse().map_err(|_| corrupt())?;
    let (sid_len, rest) = rest.split_once('|').ok_or_else(corrupt)?;
    let (sid, sub) = if sid_len == "-" {
        (None, rest)
    } else {
        let n: usize = sid_len.parse().map_err(|_| corrupt())?;
        if !rest.is_char_boundary(n) {
            return Err(corrupt());
        }
        let (sid, sub) = rest.split_at(n);
        (Some(sid.to_owned()), sub)
    };
    Ok(Some(IssuedToken { sub: sub.to_owned(), sid, exp }))
}

/// A revoked-`jti` bucket entry: `<seconds into the minute>|<jti>`.
pub(super) fn encode_bucket_entry(revocation: &Revocation) -> String {
    format!("{}|{}", Bucket::of(revocation.expires_at).offset, revocation.id)
}

/// Parses an entry `<seconds into the minute>|<jti>` of the revoked-`jti`
/// bucket of minute `minute`.
pub(super) fn parse_bucket_entry(minute: u64, entry: &str) -> Result<(&str, u64), StoreError> {
    let corrupt = || StoreError::Corrupt("revoked-jti bucket entry unreadable".into());
    let (offset, jti) = entry.split_once('|').ok_or_else(corrupt)?;
    let offset: u64 = offset.parse().map_err(|_| corrupt())?;
    Ok((jti, Bucket::deny_until(minute, offset)))
}

/// A list field of a refresh record (audience, scope), as JSON.
pub(super) fn encode_list(items: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|_| StoreError::Corrupt("cannot encode list".into()))
}

fn decode_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt("refresh record list unreadable".into()))
}

/// Parses the [`REFRESH_FIELDS`]:
/// `[family, sid, sub, client_id, audience, scope, expires_at]`.
pub(super) fn parse_refresh(fields: &[String]) -> Result<RefreshRecord, StoreError> {
    let [family, sid, sub, client_id, audience, scope, expires_at] = fields else {
        return Err(StoreError::Corrupt("refresh record has the wrong shape".into()));
    };
    Ok(RefreshRecord {
        family: family.clone(),
        sid: sid.clone(),
        sub: sub.clone(),
        client_id: client_id.clone(),
        audience: decode_list(audience)?,
        scope: decode_list(scope)?,
        expires_at: parse_score(expires_at)?,
    })
}

/// Reads the reply of `HMGET` of the [`REFRESH_FIELDS`]: `None` when the
/// record does not exist.
pub(super) fn parse_refresh_fields(fields: Vec<Option<String>>) -> Result<Option<RefreshRecord>, StoreError> {
    if fields.iter().all(Option::is_none) {
        return Ok(None);
    }
    let fields: Vec<String> = fields
        .into_iter()
        .map(|f| f.ok_or_else(|| StoreError::Corrupt("refresh record incomplete".into())))
        .collect::<Result<_, _>>()?;
    parse_refresh(&fields).map(Some)
}

/// Reads the commit script's reply: `rotated` or `retried` and the spent
/// record's fields, `reused`, the family's deny-until and the record's
/// fields, or `invalid`.
pub(super) fn parse_commit_reply(reply: &[String]) -> Result<ConsumeOutcome, StoreError> {
    match reply.split_first() {
        Some((outcome, record)) if outcome == "rotated" => Ok(ConsumeOutcome::Rotated(parse_refresh(record)?)),
        Some((outcome, record)) if outcome == "retried" => Ok(ConsumeOutcome::Retried(parse_refresh(record)?)),
        Some((outcome, [_until, record @ ..])) if outcome == "reused" => {
            Ok(ConsumeOutcome::Reused(parse_refresh(record)?))
        }
        Some((outcome, _)) if outcome == "invalid" => Ok(ConsumeOutcome::Invalid),
        _ => Err(StoreError::Corrupt("unexpected refresh script reply".into())),
    }
}

/// The family a reuse revoked and until when, from the commit script's
/// `reused` reply (`reused`, deny-until, then the record's fields, the
/// family id first).
pub(super) fn parse_reuse(reply: &[String]) -> Option<(u64, &str)> {
    match reply {
        [outcome, until, family, ..] if outcome == "reused" => Some((parse_score(until).ok()?, family.as_str())),
        _ => None,
    }
}

/// Reads the revoke-by-refresh-token script's reply: `revoked`, the
/// deny-until written and the record's fields, or `invalid` (`None`).
pub(super) fn parse_revoke_refresh_reply(reply: &[String]) -> Result<Option<(u64, RefreshRecord)>, StoreError> {
    match reply.split_first() {
        Some((outcome, [until, record @ ..])) if outcome == "revoked" => {
            Ok(Some((parse_score(until)?, parse_refresh(record)?)))
        }
        Some((outcome, [])) if outcome == "invalid" => Ok(None),
        _ => Err(StoreError::Corrupt("unexpected refresh revocation script reply".into())),
    }
}

/// Revocations keyed by what they name, keeping the latest deny-until.
#[derive(Debug, Default)]
pub(super) struct Snapshot(HashMap<(RevocationKind, String), u64>);

impl Snapshot {
    fn add(&mut self, kind: RevocationKind, id: &str, until: u64) {
        let entry = self.0.entry((kind, id.to_owned())).or_insert(0);
        *entry = (*entry).max(until);
    }

    /// Adds one page of a deny sorted set: `member, score` pairs.
    pub(super) fn add_scored(&mut self, kind: RevocationKind, flat: &[String]) -> Result<(), StoreError> {
        for pair in flat.chunks(2) {
            let [id, score] = pair else {
                return Err(StoreError::Corrupt("snapshot page not in pairs".into()));
            };
            self.add(kind, id, parse_score(score)?);
        }
        Ok(())
    }

    /// Adds one page of minute `minute`'s revoked-`jti` bucket, dropping
    /// entries no longer in force at `now`.
    pub(super) fn add_bucket(&mut self, minute: u64, entries: &[String], now: u64) -> Result<(), StoreError> {
        for entry in entries {
            let (jti, until) = parse_bucket_entry(minute, entry)?;
            if until > now {
                self.add(RevocationKind::Jti, jti, until);
            }
        }
        Ok(())
    }

    /// The revocations, in no particular order.
    pub(super) fn into_revocations(self) -> Vec<Revocation> {
        self.0.into_iter().map(|((kind, id), expires_at)| Revocation { kind, id, expires_at }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_entry_round_trips_any_sid_and_sub() {
        for (sid, sub) in [(Some("s|1"), "alice|x"), (None, "svc:order"), (Some(""), "")] {
            let body = match sid {
                Some(sid) => format!("0|42|{}|{sid}{sub}", sid.len()),
                None => format!("0|42|-|{sub}"),
            };
            let token = parse_issued(&body).unwrap().unwrap();
            assert_eq!(token, IssuedToken { sub: sub.into(), sid: sid.map(Into::into), exp: 42 });
            assert_eq!(format!("0|{}", encode_issued(&token)), body);
        }
    }

    #[test]
    fn deny_mark_without_record_is_not_an_issued_token() {
        assert_eq!(parse_issued("1700000000|").unwrap(), None);
    }

    #[test]
    fn channel_message_keeps_separators_in_the_id() {
        let r = parse_message("s|99|a|b").unwrap();
        assert_eq!(r, Revocation { kind: RevocationKind::Sid, id: "a|b".into(), expires_at: 99 });
        assert_eq!(parse_message(&encode_message(&r)), Some(r));
        assert!(parse_message("x|1|a").is_none());
    }

    #[test]
    fn bucket_entries_keep_separators_in_the_jti() {
        assert_eq!(parse_bucket_entry(10, "5|a|b").unwrap(), ("a|b", 605));
        assert!(parse_bucket_entry(10, "x|ab").is_err());
        let r = Revocation { kind: RevocationKind::Jti, id: "a|b".into(), expires_at: 605 };
        assert_eq!(parse_bucket_entry(Bucket::of(605).minute, &encode_bucket_entry(&r)).unwrap(), ("a|b", 605));
    }

    #[test]
    fn scores_in_float_notation_parse() {
        assert_eq!(parse_score("1.7642200000000000e+09").unwrap(), 1_764_220_000);
        assert!(parse_score("1.5").is_err());
    }

    #[test]
    fn snapshot_pages_merge_by_latest_deny_time_and_drop_expired_jtis() {
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut snapshot = Snapshot::default();
        snapshot.add_scored(RevocationKind::Sid, &strings(&["sid-1", "100"])).unwrap();
        snapshot.add_scored(RevocationKind::Sid, &strings(&["sid-1", "90"])).unwrap();
        snapshot.add_scored(RevocationKind::Family, &strings(&["fam", "1.0e+02"])).unwrap();
        snapshot.add_bucket(1, &strings(&["5|jti-1", "7|jti-1"]), 60).unwrap();
        snapshot.add_bucket(0, &strings(&["30|old"]), 60).unwrap();
        let mut got = snapshot.into_revocations();
        got.sort_by(|a, b| a.id.cmp(&b.id));
        let r = |kind, id: &str, expires_at| Revocation { kind, id: id.into(), expires_at };
        assert_eq!(
            got,
            [
                r(RevocationKind::Family, "fam", 100),
                r(RevocationKind::Jti, "jti-1", 67),
                r(RevocationKind::Sid, "sid-1", 100)
            ]
        );
        assert!(Snapshot::default().add_scored(RevocationKind::Sid, &strings(&["sid-1"])).is_err());
        assert!(Snapshot::default().add_scored(RevocationKind::Sid, &strings(&["sid-1", "soon"])).is_err());
        assert!(Snapshot::default().add_bucket(1, &strings(&["no separator"]), 0).is_err());
    }

    fn reply(head: &[&str]) -> Vec<String> {
        let fields = ["f", "s", "alice", "login", "[]", "[]", "99"];
        head.iter().chain(fields.iter()).map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn commit_replies_decode_or_are_corrupt() {
        assert!(matches!(
            parse_commit_reply(&reply(&["reused", "120"])).unwrap(),
            ConsumeOutcome::Reused(r) if (r.family.as_str(), r.sid.as_str()) == ("f", "s")
        ));
        assert_eq!(parse_reuse(&reply(&["reused", "120"])), Some((120, "f")));
        assert!(matches!(parse_commit_reply(&["reused".to_owned(), "9".to_owned()]), Err(StoreError::Corrupt(_))));
        assert_eq!(parse_commit_reply(&["invalid".to_owned()]).unwrap(), ConsumeOutcome::Invalid);
        assert!(matches!(parse_commit_reply(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(parse_commit_reply(&["rotated".to_owned()]), Err(StoreError::Corrupt(_))));
        assert!(matches!(parse_commit_reply(&["retried".to_owned()]), Err(StoreError::Corrupt(_))));
        assert!(
            matches!(parse_commit_reply(&reply(&["retried"])).unwrap(), ConsumeOutcome::Retried(r) if r.expires_at == 99)
        );
    }

    #[test]
    fn refresh_revocation_replies_decode_or_are_corrupt() {
        let (until, record) = parse_revoke_refresh_reply(&reply(&["revoked", "150"])).unwrap().unwrap();
        assert_eq!((until, record.family.as_str(), record.expires_at), (150, "f", 99));
        assert_eq!(parse_revoke_refresh_reply(&["invalid".to_owned()]).unwrap(), None);
        assert!(matches!(parse_revoke_refresh_reply(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(parse_revoke_refresh_reply(&reply(&["revoked"])), Err(StoreError::Corrupt(_))));
        assert!(matches!(parse_revoke_refresh_reply(&["revoked".to_owned()]), Err(StoreError::Corrupt(_))));
    }
}
