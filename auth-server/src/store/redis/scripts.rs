//! The store's Lua scripts, and for each one the function that builds its
//! call (KEYS from the [`KeyLayout`], ARGV from the codec). The store runs
//! only these calls, so the unit test below checks exactly the keys each
//! script is sent with: every script's KEYS share one hash slot.
//!
//! The read script (is the `jti` or the session revoked) is the SDK's
//! [`is_revoked`], which the SDK's Redis revocation mode runs as well.

use std::sync::LazyLock;

pub(super) use service_sdk::redis_layout::is_revoked;
use service_sdk::redis_layout::{DenyShard, LUA_DENY_OF, Script, ScriptCall};

use super::codec::{encode_bucket_entry, encode_issued, encode_list, encode_message, kind_code};
use super::keys::{BUCKET_SECS, Bucket, ISSUED_SLACK_SECS, KeyLayout};
use crate::store::{
    Committed, IssuedToken, RefreshCommit, RefreshRecord, RefreshRevoke, Revocation, RevocationKind, StoreError,
};

/// Shared helper: extend a key's TTL so it lives at least until `until`.
const LUA_KEEP_UNTIL: &str = r"
local function keep_until(key, until_, now)
  local want = until_ - now
  if want < 1 then want = 1 end
  if redis.call('TTL', key) < want then redis.call('EXPIRE', key, want) end
end
";

/// Shared helper: write a registry entry, keeping an earlier deny mark.
const LUA_ISSUE_FN: &str = r"
local function issue(key, now, exp, body, slack)
  local deny = deny_of(redis.call('GET', key))
  local mark = '0'
  if deny > 0 then
    if deny == exp then mark = '=' else mark = string.format('%d', deny) end
  end
  local until_ = exp + slack
  if deny > until_ then until_ = deny end
  local ttl = until_ - now
  if ttl < 1 then ttl = 1 end
  redis.call('SET', key, mark .. '|' .. body, 'EX', ttl)
end
";

/// KEYS: registry key. ARGV: now, exp, body, slack.
const LUA_ISSUE: &str = r"
issue(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
return 1
";

/// jti: KEYS registry key, bucket, bucket index; sid/family: KEYS set.
/// ARGV: now, kind, id, deny_until, channel (empty: publish nothing),
/// message, bucket, bucket_end, bucket entry.
const LUA_REVOKE: &str = r"
local now = tonumber(ARGV[1])
local until_ = tonumber(ARGV[4])
if ARGV[2] == 'j' then
  local v = redis.call('GET', KEYS[1])
  if v then
    local rest = string.match(v, '^[^|]*|(.*)$')
    if not rest then return redis.error_reply('ERR corrupt registry entry') end
    if until_ > deny_of(v) then
      local mark = ARGV[4]
      if string.match(rest, '^([^|]*)') == ARGV[4] then mark = '=' end
      redis.call('SET', KEYS[1], mark .. '|' .. rest, 'KEEPTTL')
    end
  else
    redis.call('SET', KEYS[1], ARGV[4] .. '|')
  end
  keep_until(KEYS[1], until_, now)
  redis.call('RPUSH', KEYS[2], ARGV[9])
  keep_until(KEYS[2], tonumber(ARGV[8]), now)
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[7])
  keep_until(KEYS[3], tonumber(ARGV[8]), now)
else
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  redis.call('ZADD', KEYS[1], 'GT', ARGV[4], ARGV[3])
  keep_until(KEYS[1], until_, now)
end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
";

/// KEYS: refresh key. ARGV: now, family, sid, sub, client_id, audience,
/// scope, expires_at.
const LUA_PUT_REFRESH: &str = r"
local ttl = tonumber(ARGV[8]) - tonumber(ARGV[1])
if ttl < 1 then ttl = 1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'family', ARGV[2], 'sid', ARGV[3], 'sub', ARGV[4], 'client_id', ARGV[5],
  'audience', ARGV[6], 'scope', ARGV[7], 'expires_at', ARGV[8], 'spent', '0')
redis.call('EXPIRE', KEYS[1], ttl)
return 1
";

/// KEYS: refresh key, successor key, family set, then the sid set when
/// ARGV[9] is `1` (the layout keeps it in this slot), then the registry
/// key of the new access token only when it is recorded here. ARGV: now,
/// next_expires_at, channel, reuse grace, access exp, registry slack,
/// successor digest, refresh key prefix, has sid set.
///
/// The registry entry is built here from the record read (its `sub` and
/// `sid`, in the codec's `encode_issued` form) with the access token's
/// `exp` passed in: the flow signs that token only after this script, from
/// the record it returns.
///
/// `spent` is `0` (live), `1` (spent while no grace window was set) or
/// `<spent at>|<successor digest>` (spent with a grace window), which a
/// retry within the window needs: it deletes that successor, whose key the
/// script derives from the refresh key prefix (the same slot, as the unit
/// test checks), and stores the new one.
const LUA_COMMIT: &str = r"
local now = tonumber(ARGV[1])
local nexp = tonumber(ARGV[2])
local grace = tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'family', 'sid', 'sub', 'client_id', 'audience', 'scope', 'expires_at', 'spent')
if not h[1] or not h[2] or not h[7] then return {'invalid'} end
local exp = tonumber(h[7])
if not exp or exp <= now then return {'invalid'} end
local fs = redis.call('ZSCORE', KEYS[3], h[1])
if fs and tonumber(fs) > now then return {'invalid'} end
local registry = KEYS[4]
if ARGV[9] == '1' then
  local ss = redis.call('ZSCORE', KEYS[4], h[2])
  if ss and tonumber(ss) > now then return {'invalid'} end
  registry = KEYS[5]
end
local function rotate(spent_at)
  if grace > 0 then
    redis.call('HSET', KEYS[1], 'spent', spent_at .. '|' .. ARGV[7])
  else
    redis.call('HSET', KEYS[1], 'spent', '1')
  end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'family', h[1], 'sid', h[2], 'sub', h[3], 'client_id', h[4],
    'audience', h[5], 'scope', h[6], 'expires_at', ARGV[2], 'spent', '0')
  local ttl = nexp - now
  if ttl < 1 then ttl = 1 end
  redis.call('EXPIRE', KEYS[2], ttl)
  if registry then
    local body = ARGV[5] .. '|' .. string.format('%d', string.len(h[2])) .. '|' .. h[2] .. h[3]
    issue(registry, now, tonumber(ARGV[5]), body, tonumber(ARGV[6]))
  end
end
local spent = h[8] or '0'
if spent == '0' then
  rotate(ARGV[1])
  return {'rotated', h[1], h[2], h[3], h[4], h[5], h[6], h[7]}
end
local at, prev = string.match(spent, '^(%d+)|(.+)$')
if at and grace > 0 and now - tonumber(at) <= grace then
  local prev_key = ARGV[8] .. prev
  if redis.call('HGET', prev_key, 'spent') == '0' then
    redis.call('DEL', prev_key)
    rotate(at)
    return {'retried', h[1], h[2], h[3], h[4], h[5], h[6], h[7]}
  end
end
local until_s = h[7]
if nexp > exp then until_s = ARGV[2] end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
redis.call('ZADD', KEYS[3], 'GT', until_s, h[1])
keep_until(KEYS[3], tonumber(until_s), now)
redis.call('PUBLISH', ARGV[3], 'f|' .. until_s .. '|' .. h[1])
return {'reused', until_s, h[1], h[2], h[3], h[4], h[5], h[6], h[7]}
";

/// KEYS: refresh key, successor key, then the registry key of the new
/// access token when the commit recorded it in this slot. ARGV: successor
/// digest, what the commit was (`rotated` or `retried`). Undoes a rotation
/// that spent KEYS[1] for KEYS[2]: only while that successor is stored and
/// unspent and the spent token names it (`1`, spent without a grace
/// window, names none; an unspent successor was never handed out, so it is
/// still this commit's). Replies `1` when the token is live again, `0`
/// when another commit moved on (nothing restored). A retry's token was
/// spent before the retry and stays spent, its spend time and the retry's
/// successor kept: `0`. The registry entry names a token never handed
/// out: deleted either way.
const LUA_UNDO: &str = r"
if KEYS[3] then redis.call('DEL', KEYS[3]) end
if ARGV[2] ~= 'rotated' then return 0 end
local spent = redis.call('HGET', KEYS[1], 'spent')
if not spent or spent == '0' then return 0 end
local prev = string.match(spent, '^%d+|(.+)$')
if prev and prev ~= ARGV[1] then return 0 end
if not prev and spent ~= '1' then return 0 end
if redis.call('HGET', KEYS[2], 'spent') ~= '0' then return 0 end
redis.call('HSET', KEYS[1], 'spent', '0')
redis.call('DEL', KEYS[2])
return 1
";

/// KEYS: refresh key, then the deny set to write (the family's, or the
/// sessions') when it shares the refresh key's slot; without it the script
/// only reads. ARGV: now, kind (`f` or `s`), deny-until, channel (empty:
/// publish nothing). A family's entry lives until the later of ARGV[3] and
/// the presented token's expiry, a session's until ARGV[3]
/// (`RefreshRevoke::deny_until`). Replies `revoked`, deny-until and the
/// record's fields, or `invalid` (unknown or expired: nothing written).
const LUA_REVOKE_REFRESH: &str = r"
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'family', 'sid', 'sub', 'client_id', 'audience', 'scope', 'expires_at')
if not h[1] or not h[2] or not h[7] then return {'invalid'} end
local exp = tonumber(h[7])
if not exp or exp <= now then return {'invalid'} end
local until_s = ARGV[3]
if ARGV[2] == 'f' and exp > tonumber(ARGV[3]) then until_s = h[7] end
if KEYS[2] then
  local id = h[1]
  if ARGV[2] == 's' then id = h[2] end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
  redis.call('ZADD', KEYS[2], 'GT', until_s, id)
  keep_until(KEYS[2], tonumber(until_s), now)
  if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[2] .. '|' .. until_s .. '|' .. id) end
end
return {'revoked', until_s, h[1], h[2], h[3], h[4], h[5], h[6], h[7]}
";

/// KEYS: sid set, family set, bucket index. ARGV: now, bucket key prefix,
/// bucket width. Returns triples: `s`/`f`, id, deny_until for sessions and
/// families, `b`, minute, bucket entry for `jti`s (parsed by the caller).
/// Bucket keys are derived in the script; they share the hash tag of the
/// declared keys, so they live in the same cluster slot.
// The snapshot is read in pages, one bounded command each, so that a large
// deny list never holds Redis (or meets the command timeout) in one go.
// First this script drops what has expired and names the minutes that have
// revoked-`jti` buckets; then the sorted sets are read by `LUA_SCORED_PAGE`
// and the buckets by `LUA_LIST_PAGE`.
const LUA_SNAPSHOT_PRUNE: &str = r"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local first = math.floor(now / tonumber(ARGV[2]))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%d', first))
return redis.call('ZRANGE', KEYS[3], 0, -1)
";

// One page of a deny sorted set, highest deny-until first: `member, score`
// pairs in force after ARGV[1], from offset ARGV[2], at most ARGV[3].
const LUA_SCORED_PAGE: &str = r"
return redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. ARGV[1], 'WITHSCORES', 'LIMIT', ARGV[2], ARGV[3])
";

// One page of a revoked-`jti` bucket: entries ARGV[1]..=ARGV[2].
const LUA_LIST_PAGE: &str = r"
return redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
";

// The deny list's size, for metrics, in two bounded reads that prune
// nothing: the sets of sessions and families are counted by score (entries
// in force after ARGV[1]), and the minutes that have revoked-`jti` buckets
// from the current one on are named; `LUA_BUCKET_LENGTHS` then sums those
// buckets' lengths (at most one bucket per minute of the longest token life).
const LUA_DENY_COUNTS: &str = r"
local first = math.floor(tonumber(ARGV[1]) / tonumber(ARGV[2]))
local out = {
  tostring(redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')),
  tostring(redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf')),
}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], first, '+inf')) do
  out[#out + 1] = m
end
return out
";

// The summed lengths of the lists KEYS (revoked-`jti` buckets).
const LUA_BUCKET_LENGTHS: &str = r"
local n = 0
for _, key in ipairs(KEYS) do
  n = n + redis.call('LLEN', key)
end
return n
";

static ISSUE: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_DENY_OF, LUA_ISSUE_FN, LUA_ISSUE]));
static REVOKE: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_KEEP_UNTIL, LUA_DENY_OF, LUA_REVOKE]));
static PUT_REFRESH: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_PUT_REFRESH]));
static COMMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[LUA_KEEP_UNTIL, LUA_DENY_OF, LUA_ISSUE_FN, LUA_COMMIT]));
static UNDO: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_UNDO]));
static REVOKE_REFRESH: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_KEEP_UNTIL, LUA_REVOKE_REFRESH]));
static SNAPSHOT_PRUNE: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_SNAPSHOT_PRUNE]));
static SCORED_PAGE: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_SCORED_PAGE]));
static LIST_PAGE: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_LIST_PAGE]));
static DENY_COUNTS: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_DENY_COUNTS]));
static BUCKET_LENGTHS: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_BUCKET_LENGTHS]));

/// Records an issued token, keeping any deny mark already on its `jti`.
/// Replies `1`.
pub(super) fn issue(layout: &KeyLayout, jti: &str, token: &IssuedToken, now: u64) -> ScriptCall<'static> {
    ISSUE.call(
        vec![layout.issued(jti)],
        vec![now.to_string(), token.exp.to_string(), encode_issued(token), ISSUED_SLACK_SECS.to_string()],
    )
}

/// Writes a deny entry (never shortening one), then publishes it: the
/// calls to run in order, each replying `1`. One call, except for a family
/// in the sharded layout: its deny entry in the family's slot (what the
/// refresh commit checks), then its entry in its deny shard (what
/// snapshots read), which publishes.
pub(super) fn revoke(layout: &KeyLayout, revocation: &Revocation, now: u64) -> Vec<ScriptCall<'static>> {
    let id = revocation.id.as_str();
    match revocation.kind {
        RevocationKind::Jti => {
            let shard = layout.jti_shard(id);
            let minute = Bucket::of(revocation.expires_at).minute;
            let keys = vec![layout.deny_jti(id), shard.jti_bucket(minute), shard.jti_index().to_owned()];
            vec![REVOKE.call(keys, revoke_args(layout, revocation, now, true))]
        }
        RevocationKind::Sid => vec![REVOKE.call(vec![layout.deny_sid(id)], revoke_args(layout, revocation, now, true))],
        RevocationKind::Family => {
            let guard = vec![layout.deny_family(id)];
            match layout.family_index(id) {
                None => vec![REVOKE.call(guard, revoke_args(layout, revocation, now, true))],
                Some(index) => vec![
                    REVOKE.call(guard, revoke_args(layout, revocation, now, false)),
                    REVOKE.call(vec![index], revoke_args(layout, revocation, now, true)),
                ],
            }
        }
    }
}

/// Family `id` was revoked in the family's slot (by the commit script on
/// a reuse, or by the revoke-by-refresh-token script): its entry in the
/// family's deny shard, for snapshots, when the layout keeps one apart
/// (`None` otherwise). It publishes the revocation when `publish` is set:
/// after a revocation by refresh token, whose script publishes nothing in
/// this layout, so that a published revocation is always in snapshots too
/// (the commit script publishes a reuse itself).
pub(super) fn family_index(
    layout: &KeyLayout,
    id: &str,
    until: u64,
    now: u64,
    publish: bool,
) -> Option<ScriptCall<'static>> {
    let index = layout.family_index(id)?;
    let family = Revocation { kind: RevocationKind::Family, id: id.to_owned(), expires_at: until };
    Some(REVOKE.call(vec![index], revoke_args(layout, &family, now, publish)))
}

/// ARGV of [`LUA_REVOKE`]; `publish` false leaves the channel empty.
fn revoke_args(layout: &KeyLayout, revocation: &Revocation, now: u64, publish: bool) -> Vec<String> {
    let bucket = Bucket::of(revocation.expires_at);
    vec![
        now.to_string(),
        kind_code(revocation.kind).to_owned(),
        revocation.id.clone(),
        revocation.expires_at.to_string(),
        if publish { layout.channel().to_owned() } else { String::new() },
        encode_message(revocation),
        bucket.minute.to_string(),
        bucket.end.to_string(),
        encode_bucket_entry(revocation),
    ]
}

/// Stores a new refresh token, unspent. Replies `1`.
pub(super) fn put_refresh(
    layout: &KeyLayout,
    digest: &str,
    record: &RefreshRecord,
    now: u64,
) -> Result<ScriptCall<'static>, StoreError> {
    Ok(PUT_REFRESH.call(
        vec![layout.refresh(digest)],
        vec![
            now.to_string(),
            record.family.clone(),
            record.sid.clone(),
            record.sub.clone(),
            record.client_id.clone(),
            encode_list(&record.audience)?,
            encode_list(&record.scope)?,
            record.expires_at.to_string(),
        ],
    ))
}

/// Commits a refresh rotation (see [`RefreshCommit`]): spends the token,
/// stores its successor and records the new access token (when
/// `c.issued_exp` is set and the layout keeps its registry key in the
/// refresh token's slot: see [`registry_in_commit`]), or on reuse revokes
/// and publishes the family. The reply is read by
/// [`parse_commit_reply`](super::codec::parse_commit_reply).
pub(super) fn commit(layout: &KeyLayout, c: &RefreshCommit<'_>, now: u64) -> ScriptCall<'static> {
    let guards = layout.refresh_guards(c.digest);
    let has_session = guards.session.is_some();
    let mut keys = vec![layout.refresh(c.digest), layout.refresh(c.next_digest), guards.family];
    keys.extend(guards.session);
    let issued_exp = c.issued_exp.filter(|_| registry_in_commit(layout));
    keys.extend(issued_exp.map(|_| layout.issued(c.jti)));
    COMMIT.call(
        keys,
        vec![
            now.to_string(),
            c.next_expires_at.to_string(),
            layout.channel().to_owned(),
            c.reuse_grace_secs.to_string(),
            issued_exp.unwrap_or(0).to_string(),
            ISSUED_SLACK_SECS.to_string(),
            c.next_digest.to_owned(),
            layout.refresh_prefix(c.digest),
            if has_session { "1" } else { "0" }.to_owned(),
        ],
    )
}

/// Undoes the commit `c` made (see [`LUA_UNDO`]); replies `1` when the
/// presented token is live again (only ever for a rotation). The registry
/// entry is deleted here when the commit recorded it in this slot
/// ([`registry_in_commit`]); otherwise the store deletes it apart.
pub(super) fn undo(layout: &KeyLayout, c: &RefreshCommit<'_>, committed: Committed) -> ScriptCall<'static> {
    let mut keys = vec![layout.refresh(c.digest), layout.refresh(c.next_digest)];
    keys.extend(c.issued_exp.filter(|_| registry_in_commit(layout)).map(|_| layout.issued(c.jti)));
    let what = match committed {
        Committed::Rotated => "rotated",
        Committed::Retried => "retried",
    };
    UNDO.call(keys, vec![c.next_digest.to_owned(), what.to_owned()])
}

/// Revokes by refresh token (see [`RefreshRevoke`]) in the token's slot:
/// reads its record and, when the deny set the revocation goes to lives in
/// that slot, writes the entry in the same script. That is always so in
/// the single-slot layout, where the script publishes it too; in the
/// sharded layout a family's own deny entry is, and its deny-shard entry,
/// for snapshots, is written next by [`family_index`], which publishes it
/// (so nothing is published that snapshots lack, should that write fail),
/// while a session's is not: the script only reads, and the store revokes
/// the session apart ([`revoke`]). `None` for a `jti`. Returns the call
/// and whether it writes.
pub(super) fn revoke_refresh(
    layout: &KeyLayout,
    r: &RefreshRevoke<'_>,
    now: u64,
) -> Option<(ScriptCall<'static>, bool)> {
    let guards = layout.refresh_guards(r.digest);
    let set = match r.kind {
        RevocationKind::Family => Some(guards.family),
        RevocationKind::Sid => guards.session,
        RevocationKind::Jti => return None,
    };
    let writes = set.is_some();
    let publishes = writes && !layout.is_sharded();
    let mut keys = vec![layout.refresh(r.digest)];
    keys.extend(set);
    let call = REVOKE_REFRESH.call(
        keys,
        vec![
            now.to_string(),
            kind_code(r.kind).to_owned(),
            r.until.to_string(),
            if publishes { layout.channel().to_owned() } else { String::new() },
        ],
    );
    Some((call, writes))
}

/// Whether the commit script records the new access token itself: in the
/// single-slot layout. In the sharded layout the registry key lives in the
/// `jti`'s deny shard, so the store writes it after the commit, apart
/// ([`issue`]), with the `sub` and `sid` of the record the commit returns.
pub(super) fn registry_in_commit(layout: &KeyLayout) -> bool {
    !layout.is_sharded()
}

/// Prunes one deny shard of what expired by `now`; replies with the
/// minutes that have revoked-`jti` buckets, for [`list_page`].
pub(super) fn snapshot_prune(shard: &DenyShard, now: u64) -> ScriptCall<'static> {
    SNAPSHOT_PRUNE.call(
        vec![shard.sessions().to_owned(), shard.families().to_owned(), shard.jti_index().to_owned()],
        vec![now.to_string(), BUCKET_SECS.to_string()],
    )
}

/// One page of the deny sorted set `key` (sessions or families): up to
/// `count` `member, score` pairs in force after `now`, highest score first,
/// from `offset`. Read by [`Snapshot::add_scored`](super::codec::Snapshot::add_scored).
pub(super) fn scored_page(key: &str, now: u64, offset: usize, count: usize) -> ScriptCall<'static> {
    SCORED_PAGE.call(vec![key.to_owned()], vec![now.to_string(), offset.to_string(), count.to_string()])
}

/// One page of the revoked-`jti` bucket `key`: up to `count` entries from
/// `start`. Read by [`Snapshot::add_bucket`](super::codec::Snapshot::add_bucket).
pub(super) fn list_page(key: &str, start: usize, count: usize) -> ScriptCall<'static> {
    let stop = start.saturating_add(count.max(1)) - 1;
    LIST_PAGE.call(vec![key.to_owned()], vec![start.to_string(), stop.to_string()])
}

/// Counts one deny shard's sessions and families in force after `now`, and
/// names the minutes from `now` on that have revoked-`jti` buckets: replies
/// `[sessions, families, minute...]`, read by [`bucket_lengths`] next.
pub(super) fn deny_counts(shard: &DenyShard, now: u64) -> ScriptCall<'static> {
    DENY_COUNTS.call(
        vec![shard.sessions().to_owned(), shard.families().to_owned(), shard.jti_index().to_owned()],
        vec![now.to_string(), BUCKET_SECS.to_string()],
    )
}

/// The summed lengths of `minutes`' revoked-`jti` buckets of `shard`.
pub(super) fn bucket_lengths(shard: &DenyShard, minutes: &[u64]) -> ScriptCall<'static> {
    BUCKET_LENGTHS.call(minutes.iter().map(|m| shard.jti_bucket(*m)).collect(), vec![])
}

#[cfg(test)]
mod tests {
    use service_sdk::redis_layout::common_slot;

    use super::*;

    /// Every layout the store can run with.
    fn layouts() -> Vec<KeyLayout> {
        vec![
            KeyLayout::new("auth"),
            KeyLayout::new("green"),
            KeyLayout::new("a{b}c"),
            KeyLayout::sharded("auth"),
            KeyLayout::sharded("green"),
            KeyLayout::sharded("a{b}c"),
        ]
    }

    /// Every script call the store makes, over a spread of ids, with the
    /// keys a script derives itself (the snapshot's buckets) added.
    fn calls(layout: &KeyLayout) -> Vec<(&'static str, Vec<String>)> {
        let now = 1_800_000_000;
        let mut out = Vec::new();
        for i in 0..64 {
            let (jti, sid, family, digest) =
                (format!("jti-{i}"), format!("sid-{i}"), format!("fam-{i}"), format!("fam-{i}.d{i}"));
            let token = IssuedToken { sub: "alice".into(), sid: Some(sid.clone()), exp: now + 600 };
            let record = RefreshRecord {
                family: family.clone(),
                sid: sid.clone(),
                sub: "alice".into(),
                client_id: "order".into(),
                audience: vec!["order".into()],
                scope: vec![],
                expires_at: now + 3600,
            };
            let at = |kind, id: &str| Revocation { kind, id: id.into(), expires_at: now + 60 * i };
            out.push(("issue", issue(layout, &jti, &token, now).keys().to_vec()));
            for call in is_revoked(layout, &jti, Some(&sid), now).into_iter().chain(is_revoked(layout, &jti, None, now))
            {
                out.push(("is_revoked", call.keys().to_vec()));
            }
            for (kind, id) in
                [(RevocationKind::Jti, &jti), (RevocationKind::Sid, &sid), (RevocationKind::Family, &family)]
            {
                for call in revoke(layout, &at(kind, id), now) {
                    out.push(("revoke", call.keys().to_vec()));
                }
            }
            for publish in [false, true] {
                if let Some(call) = family_index(layout, &family, now + 60, now, publish) {
                    out.push(("family_index", call.keys().to_vec()));
                }
            }
            out.push(("put_refresh", put_refresh(layout, &digest, &record, now).unwrap().keys().to_vec()));
            let (next, jti_next) = (format!("fam-{i}.n{i}"), format!("jti-n{i}"));
            let commit_call = commit(
                layout,
                &RefreshCommit {
                    digest: &digest,
                    next_digest: &next,
                    next_expires_at: now + 7200,
                    jti: &jti_next,
                    issued_exp: Some(now + 600),
                    reuse_grace_secs: 10,
                },
                now,
            );
            let unrecorded = RefreshCommit {
                digest: &digest,
                next_digest: &next,
                next_expires_at: now + 7200,
                jti: &jti_next,
                issued_exp: None,
                reuse_grace_secs: 0,
            };
            let recorded = RefreshCommit { issued_exp: Some(now + 600), ..unrecorded };
            for committed in [Committed::Rotated, Committed::Retried] {
                out.push(("undo", undo(layout, &recorded, committed).keys().to_vec()));
                out.push(("undo", undo(layout, &unrecorded, committed).keys().to_vec()));
            }
            for kind in [RevocationKind::Family, RevocationKind::Sid] {
                let r = RefreshRevoke { digest: &digest, kind, until: now + 60 };
                let (call, _) = revoke_refresh(layout, &r, now).unwrap();
                out.push(("revoke_refresh", call.keys().to_vec()));
            }
            let unrecorded = commit(layout, &unrecorded, now).keys().to_vec();
            let recorded_here = usize::from(registry_in_commit(layout));
            assert_eq!(unrecorded.len(), commit_call.keys().len() - recorded_here, "a registry key only with a record");
            out.push(("commit", unrecorded));
            // With the successor key the script derives on a retry.
            let mut keys = commit_call.keys().to_vec();
            let prev = format!("fam-{i}.p{i}");
            keys.push(format!("{}{prev}", layout.refresh_prefix(&digest)));
            assert_eq!(layout.refresh(&prev), keys[keys.len() - 1]);
            out.push(("commit", keys));
        }
        for shard in layout.deny_shards() {
            out.push(("snapshot_prune", snapshot_prune(shard, now).keys().to_vec()));
            out.push(("scored_page", scored_page(shard.sessions(), now, 0, 10).keys().to_vec()));
            out.push(("scored_page", scored_page(shard.families(), now, 0, 10).keys().to_vec()));
            out.push(("list_page", list_page(&shard.jti_bucket(now / BUCKET_SECS), 0, 10).keys().to_vec()));
            out.push(("deny_counts", deny_counts(shard, now).keys().to_vec()));
            let minutes: Vec<u64> = (0..20).map(|m| now / BUCKET_SECS + m).collect();
            out.push(("bucket_lengths", bucket_lengths(shard, &minutes).keys().to_vec()));
        }
        out
    }

    #[test]
    fn every_script_keeps_its_keys_in_one_slot() {
        for layout in layouts() {
            let calls = calls(&layout);
            assert!(calls.len() > 64 * 8);
            if layout.is_sharded() && !layout.prefix().contains('{') {
                // Sharded for real: the calls spread over many slots.
                let slots: std::collections::HashSet<u16> =
                    calls.iter().filter_map(|(_, keys)| common_slot(keys)).collect();
                assert!(slots.len() > 64, "{} slots", slots.len());
            }
            for (script, keys) in calls {
                assert!(!keys.is_empty(), "{script} is called without KEYS");
                assert!(
                    common_slot(&keys).is_some(),
                    "{script} under prefix {:?} crosses slots: {keys:?}",
                    layout.prefix()
                );
            }
        }
    }

    #[test]
    fn revoking_by_refresh_token_writes_in_the_tokens_slot_but_a_sharded_session() {
        let now = 1_800_000_000;
        for layout in layouts() {
            for (kind, writes) in [(RevocationKind::Family, true), (RevocationKind::Sid, !layout.is_sharded())] {
                let r = RefreshRevoke { digest: "fam-1.d1", kind, until: now + 60 };
                let (call, written) = revoke_refresh(&layout, &r, now).unwrap();
                assert_eq!(written, writes, "{kind:?} under {layout:?}");
                assert_eq!(call.keys().len(), 1 + usize::from(writes), "{kind:?} under {layout:?}");
                // The single-slot layout publishes where it writes; the
                // sharded one from the write that completes the revocation
                // (the family's deny-shard entry, the session's script).
                let channel = &call.args()[3];
                assert_eq!(channel.is_empty(), !writes || layout.is_sharded(), "{kind:?} under {layout:?}");
            }
            // The sharded layout's family: the deny-shard entry publishes it.
            let index = family_index(&layout, "fam-1", now + 60, now, true);
            assert_eq!(index.is_some(), layout.is_sharded(), "{layout:?}");
            if let Some(call) = index {
                assert_eq!(call.args()[4], layout.channel(), "the deny-shard entry publishes under {layout:?}");
            }
            let jti = RefreshRevoke { digest: "fam-1.d1", kind: RevocationKind::Jti, until: now };
            assert!(revoke_refresh(&layout, &jti, now).is_none());
        }
    }

    #[test]
    fn the_slot_check_catches_a_script_that_crosses_slots() {
        // Keys without a shared hash tag, as a careless layout would name
        // them, spread over slots: the check above would refuse them.
        let untagged: Vec<String> = calls(&KeyLayout::new("auth"))
            .into_iter()
            .find(|(script, _)| *script == "commit")
            .map(|(_, keys)| keys.iter().map(|k| k.replace(['{', '}'], "")).collect())
            .unwrap();
        assert_eq!(common_slot(&untagged), None, "{untagged:?}");
    }
}
