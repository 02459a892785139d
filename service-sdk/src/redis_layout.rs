//! The auth server's Redis key layout and its shared read script (feature
//! `redis`).
//!
//! The auth server's Redis store writes this layout and the SDK's
//! per-request revocation mode ([`RedisRevocation`](crate::verify::RedisRevocation))
//! reads it, so both name every key through one [`KeyLayout`] and run one
//! is-revoked script ([`is_revoked`]); the two cannot drift apart.
//!
//! # Keys
//!
//! [`KeyLayout::new`] is the single-slot layout. With `P` the configured
//! prefix (default `auth`), every key starts with `{P}:`. The braces are a
//! Redis Cluster hash tag: all of one deployment's keys share one slot, so
//! every Lua script may touch any of them atomically (and a cluster gives
//! failover, not sharding).
//!
//! | method | key | type | holds | expires |
//! | --- | --- | --- | --- | --- |
//! | [`issued`](KeyLayout::issued), [`deny_jti`](KeyLayout::deny_jti) | `{P}:i:<jti>` | string | issued-`jti` registry entry and the `jti`'s deny mark: `<mark>\|<exp>\|<sid length or ->\|<sid><sub>`; `mark` is `0` (not revoked), `=` (revoked until `exp`) or the deny-until time; a revoked `jti` never recorded is just `<deny_until>\|` | `exp` + 60 s, or deny-until if later |
//! | [`DenyShard::jti_bucket`] | `{P}:rv:jti:<m>` | list | revoked `jti`s whose deny-until falls in minute `m` (Unix seconds / 60), as `<seconds into the minute>\|<jti>`; only the snapshot reads it | end of minute `m` |
//! | [`DenyShard::jti_index`] | `{P}:rv:jti:idx` | sorted set | the minutes `m` that have a bucket (score `m`) | latest bucket end |
//! | [`deny_sid`](KeyLayout::deny_sid) | `{P}:rv:sid` | sorted set | revoked sessions: `sid` scored by deny-until | latest deny-until |
//! | [`deny_family`](KeyLayout::deny_family) | `{P}:rv:family` | sorted set | revoked refresh families: family id scored by deny-until | latest deny-until |
//! | [`refresh`](KeyLayout::refresh) | `{P}:rt:<digest>` | hash | a refresh token by SHA-256 digest: `family`, `sid`, `sub`, `client_id`, `audience` and `scope` (JSON arrays), `expires_at`, `spent` (`0` live, `1` spent, or `<spent at>\|<successor digest>` when spent while a reuse grace window is set) | `expires_at` |
//! | [`marker`](KeyLayout::marker) | `{P}:layout` | string | which layout this prefix's keys follow, and its format version: [`marker_value`](KeyLayout::marker_value), `single\|1` or `sharded\|1` | never |
//!
//! Revocations are published on [`channel`](KeyLayout::channel)
//! `P:revocations` (no braces) as `<kind>|<deny_until>|<id>` with kind `j`,
//! `s` or `f`.
//!
//! # The sharded layout
//!
//! [`KeyLayout::sharded`] spreads the keys over a Redis Cluster's
//! primaries, tagging each by the unit one atomic step needs:
//!
//! | unit | hash tag | keys |
//! | --- | --- | --- |
//! | a refresh family | `{P:f:<family>}` | `…:rt:<digest>` (digests are `<family>.<sha256>`), `…:rv:family` (the family's deny entry) |
//! | a deny shard `i` of [`DENY_SHARDS`] | `{P:d<i>.<salt>}` | `…:i:<jti>` (deny mark and registry entry), `…:rv:jti:<m>`, `…:rv:jti:idx`, `…:rv:sid`, `…:rv:family` (the shard's revoked families, for snapshots) |
//!
//! A `jti` or `sid` belongs to the shard covering its own hash slot; each
//! shard's salt puts its tag in shard `i`'s range of 1024 slots, so
//! contiguous slot ranges get their share. [`KeyLayout::for_url`] picks this
//! layout for cluster URLs. The is-revoked check ([`is_revoked`]) is then
//! one call when the `jti` and the session share a shard, else two, one per
//! slot ([`run_is_revoked`] runs them concurrently).
//!
//! Both layouts keep the layout marker at `{P}:layout`, under the hash tag
//! `{P}` (one known slot, whatever the layout), so a reader finds it
//! before it knows the layout.
//!
//! # The layout marker
//!
//! The two layouts name every key differently, so a writer and a reader
//! that disagree on the layout miss each other's entries: revocations go
//! unseen. The auth server therefore records its layout in the marker key
//! when it connects (`SET NX`) and refuses to start when the marker names
//! another layout; the SDK's Redis mode reads the marker and uses the
//! layout it names ([`KeyLayout::from_marker`]).
//!
//! Callers never build a key themselves: every key, and every script's KEYS,
//! come from a `KeyLayout`. The auth server's unit test
//! `every_script_keeps_its_keys_in_one_slot` computes the hash slot
//! ([`hash_slot`]) of the KEYS of every script call under both layouts and
//! refuses one that would make a script cross slots.

use std::sync::LazyLock;

use fred::interfaces::LuaInterface;
use fred::types::FromValue;

/// The number of hash slots of a Redis Cluster.
pub const HASH_SLOTS: u16 = 16_384;

/// The Redis Cluster hash slot of `key`: CRC16/XMODEM of the key, or of its
/// hash tag (the text between the first `{` and the next `}`, when that is
/// not empty), modulo [`HASH_SLOTS`]. The same function routes the client's
/// commands.
pub fn hash_slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// The one slot shared by every key of `keys`; `None` when they span several
/// slots, or when there are none.
pub fn common_slot<S: AsRef<str>>(keys: &[S]) -> Option<u16> {
    let (first, rest) = keys.split_first()?;
    let slot = hash_slot(first.as_ref());
    rest.iter().all(|key| hash_slot(key.as_ref()) == slot).then_some(slot)
}

/// How many deny shards the sharded layout spreads the deny list over.
pub const DENY_SHARDS: usize = 16;

/// The keys of one part of the deny list: revoked sessions, revoked
/// families, and the bucketed list of revoked `jti`s that snapshots read,
/// and (in the sharded layout) the deny marks of the `jti`s it holds.
/// All of one shard's keys share a slot, so one script reads it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyShard {
    tag: String,
    sessions: String,
    families: String,
    jti_index: String,
    jti_buckets: String,
}

impl DenyShard {
    fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_owned(),
            sessions: format!("{tag}rv:sid"),
            families: format!("{tag}rv:family"),
            jti_index: format!("{tag}rv:jti:idx"),
            jti_buckets: format!("{tag}rv:jti:"),
        }
    }

    /// The sorted set of revoked sessions (`sid` scored by deny-until).
    pub fn sessions(&self) -> &str {
        &self.sessions
    }

    /// The sorted set of revoked refresh families (id scored by deny-until).
    pub fn families(&self) -> &str {
        &self.families
    }

    /// The sorted set of the minutes that have a revoked-`jti` bucket.
    pub fn jti_index(&self) -> &str {
        &self.jti_index
    }

    /// The list of revoked `jti`s whose deny-until falls in `minute` (Unix
    /// seconds / 60).
    pub fn jti_bucket(&self, minute: u64) -> String {
        format!("{}{minute}", self.jti_buckets)
    }

    /// What [`jti_bucket`](Self::jti_bucket) prepends to the minute: the
    /// snapshot script derives bucket keys from it and the index.
    pub fn jti_bucket_prefix(&self) -> &str {
        &self.jti_buckets
    }

    /// The slot of every key of this shard.
    pub fn slot(&self) -> u16 {
        hash_slot(&self.sessions)
    }
}

/// The keys a refresh commit checks before it spends a token: the deny
/// entries of its family and, when the layout keeps sessions in the same
/// slot, of its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshGuards {
    /// The sorted set that holds the family's deny entry.
    pub family: String,
    /// The sorted set that holds the session's deny entry, when it shares
    /// the refresh token's slot; otherwise the session is checked apart
    /// (in its own deny shard), after the commit.
    pub session: Option<String>,
}

/// The format version of the key layouts, recorded in the layout marker
/// ([`KeyLayout::marker_value`]): raised whenever a layout names its keys
/// differently, so that a reader of another version refuses rather than
/// reads the wrong keys.
pub const LAYOUT_FORMAT: u32 = 1;

/// A layout marker that names no layout this version knows: another
/// format version, or not a marker at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key layout marker {value:?} (this version writes and reads format {LAYOUT_FORMAT})")]
pub struct UnknownMarker {
    /// The marker's value, shortened to 64 characters.
    pub value: String,
}

/// The names of the auth server's Redis keys and channel for one
/// deployment. See the [module docs](self) for the keys and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    prefix: String,
    /// `{P}:` (the single-slot layout's tag).
    tag: String,
    /// `P:revocations`
    channel: String,
    /// One shard (single-slot) or [`DENY_SHARDS`] (sharded).
    deny: Vec<DenyShard>,
    sharded: bool,
}

impl KeyLayout {
    /// The single-slot layout for prefix `prefix` (the auth server's
    /// `redis.prefix`, default `auth`): every key under the hash tag `{P}`.
    pub fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}}}:");
        Self {
            prefix: prefix.to_owned(),
            deny: vec![DenyShard::new(&tag)],
            channel: format!("{prefix}:revocations"),
            tag,
            sharded: false,
        }
    }

    /// The sharded layout for prefix `prefix`: a refresh family's keys
    /// under the family's tag, the deny list over [`DENY_SHARDS`] shards
    /// whose salted tags fall in evenly spread slot ranges (shard `i` in
    /// slots `i * 1024 ..`), each `jti` and session in the shard of its
    /// own slot. See the [module docs](self).
    pub fn sharded(prefix: &str) -> Self {
        let width = usize::from(HASH_SLOTS) / DENY_SHARDS;
        let deny = (0..DENY_SHARDS)
            .map(|i| {
                let tag = |salt: u32| format!("{{{prefix}:d{i}.{salt}}}:");
                let salt = (0..1_000_000u32).find(|salt| usize::from(hash_slot(&tag(*salt))) / width == i).unwrap_or(0);
                DenyShard::new(&tag(salt))
            })
            .collect();
        Self {
            prefix: prefix.to_owned(),
            tag: format!("{{{prefix}}}:"),
            channel: format!("{prefix}:revocations"),
            deny,
            sharded: true,
        }
    }

    /// The layout the auth server's `redis.layout = "auto"` picks for
    /// `url`: sharded for a cluster (`redis-cluster://`,
    /// `rediss-cluster://`), single-slot otherwise.
    pub fn for_url(prefix: &str, url: &str) -> Self {
        if is_cluster_url(url) { Self::sharded(prefix) } else { Self::new(prefix) }
    }

    /// Whether this is the sharded layout.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// The layout's name, as `redis.layout` spells it: `single` or
    /// `sharded`.
    pub fn name(&self) -> &'static str {
        if self.sharded { "sharded" } else { "single" }
    }

    /// The layout marker of prefix `prefix`: `{P}:layout`, the same key in
    /// both layouts, in the slot of the hash tag `{P}`.
    pub fn marker_key(prefix: &str) -> String {
        format!("{{{prefix}}}:layout")
    }

    /// This layout's marker key ([`marker_key`](Self::marker_key)).
    pub fn marker(&self) -> String {
        Self::marker_key(&self.prefix)
    }

    /// What this layout's marker holds: `<name>|<format>`, e.g.
    /// `sharded|1` (see [`LAYOUT_FORMAT`]).
    pub fn marker_value(&self) -> String {
        format!("{}|{LAYOUT_FORMAT}", self.name())
    }

    /// The layout a marker value names, for prefix `prefix`; an
    /// [`UnknownMarker`] for any other value (another format version
    /// included).
    pub fn from_marker(prefix: &str, value: &str) -> Result<Self, UnknownMarker> {
        let unknown = || UnknownMarker { value: value.chars().take(64).collect() };
        let (name, format) = value.split_once('|').ok_or_else(unknown)?;
        if format != LAYOUT_FORMAT.to_string() {
            return Err(unknown());
        }
        match name {
            "single" => Ok(Self::new(prefix)),
            "sharded" => Ok(Self::sharded(prefix)),
            _ => Err(unknown()),
        }
    }

    /// The deployment's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pub/sub channel revocations are published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The shard that holds `id` (a `jti` or a `sid`): the one whose slot
    /// range holds `id`'s own slot.
    fn shard_of(&self, id: &str) -> &DenyShard {
        let index = usize::from(hash_slot(id)) * self.deny.len() / usize::from(HASH_SLOTS);
        &self.deny[index.min(self.deny.len() - 1)]
    }

    /// The issued-`jti` registry entry of `jti`.
    pub fn issued(&self, jti: &str) -> String {
        format!("{}i:{jti}", self.shard_of(jti).tag)
    }

    /// The key holding `jti`'s deny mark. In both layouts the mark is the
    /// first field of the registry entry, so it is [`issued`](Self::issued).
    pub fn deny_jti(&self, jti: &str) -> String {
        self.issued(jti)
    }

    /// The shard whose revoked-`jti` buckets list `jti` (the shard of its
    /// deny mark).
    pub fn jti_shard(&self, jti: &str) -> &DenyShard {
        self.shard_of(jti)
    }

    /// The sorted set that holds session `sid`'s deny entry.
    pub fn deny_sid(&self, sid: &str) -> String {
        self.shard_of(sid).sessions.clone()
    }

    /// The sorted set that holds refresh family `id`'s deny entry, as the
    /// refresh commit checks it: in the sharded layout, in the family's
    /// own slot.
    pub fn deny_family(&self, id: &str) -> String {
        if self.sharded { format!("{}rv:family", self.family_tag(id)) } else { self.deny[0].families.clone() }
    }

    /// Where a snapshot finds family `id`'s deny entry when that is not
    /// [`deny_family`](Self::deny_family) (the sharded layout): the families
    /// set of the family's deny shard.
    pub fn family_index(&self, id: &str) -> Option<String> {
        self.sharded.then(|| self.shard_of(id).families.clone())
    }

    /// `{P:f:<family>}:`
    fn family_tag(&self, family: &str) -> String {
        format!("{{{}:f:{family}}}:", self.prefix)
    }

    /// The family a refresh digest names: the part before its first `.`
    /// (digests are `<family>.<sha256>`). `None` for a digest without one.
    pub fn refresh_family(digest: &str) -> Option<&str> {
        digest.split_once('.').map(|(family, _)| family).filter(|f| !f.is_empty())
    }

    /// What [`refresh`](Self::refresh) prepends to the digest: in the
    /// sharded layout it names the digest's family, so every member of a
    /// family shares one prefix (and slot).
    pub fn refresh_prefix(&self, digest: &str) -> String {
        if self.sharded {
            format!("{}rt:", self.family_tag(Self::refresh_family(digest).unwrap_or(digest)))
        } else {
            format!("{}rt:", self.tag)
        }
    }

    /// A refresh token's record, by its digest (`<family>.<sha256>`).
    pub fn refresh(&self, digest: &str) -> String {
        self.refresh_prefix(digest) + digest
    }

    /// The deny entries a refresh commit of `digest` checks in its own
    /// slot (see [`RefreshGuards`]). They are found from the digest alone,
    /// before the family and session are read.
    pub fn refresh_guards(&self, digest: &str) -> RefreshGuards {
        if self.sharded {
            let family = Self::refresh_family(digest).unwrap_or(digest);
            RefreshGuards { family: self.deny_family(family), session: None }
        } else {
            RefreshGuards { family: self.deny[0].families.clone(), session: Some(self.deny[0].sessions.clone()) }
        }
    }

    /// Every shard of the deny list; a snapshot reads them all.
    pub fn deny_shards(&self) -> &[DenyShard] {
        &self.deny
    }
}

/// Whether `url` names a Redis Cluster (`redis-cluster://`,
/// `rediss-cluster://`, and fred's `valkey` spellings).
pub fn is_cluster_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| scheme.ends_with("-cluster"))
}

/// A Lua script with its SHA-1, run by `EVALSHA` with a fallback to `EVAL`
/// after a script-cache flush.
#[derive(Debug)]
pub struct Script {
    lua: String,
    sha: String,
}

impl Script {
    /// The script made of `parts` concatenated (helpers first).
    pub fn new(parts: &[&str]) -> Self {
        let lua = parts.concat();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, lua.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { lua, sha }
    }

    /// The Lua source.
    pub fn lua(&self) -> &str {
        &self.lua
    }

    /// The SHA-1 of the source, in hex (what `EVALSHA` takes).
    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// One call of this script with `keys` as KEYS and `args` as ARGV.
    pub fn call(&self, keys: Vec<String>, args: Vec<String>) -> ScriptCall<'_> {
        ScriptCall { script: self, keys, args }
    }
}

/// One call of a [`Script`]: the keys it touches (KEYS) and its arguments
/// (ARGV). Built by one function per script, so that the keys a script is
/// called with can be checked (see [`common_slot`]).
pub struct ScriptCall<'s> {
    script: &'s Script,
    keys: Vec<String>,
    args: Vec<String>,
}

impl ScriptCall<'_> {
    /// The script called.
    pub fn script(&self) -> &Script {
        self.script
    }

    /// KEYS, in order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// ARGV, in order.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Runs the call in one round trip: `EVALSHA`, then `EVAL` if Redis
    /// answers `NOSCRIPT`. Bounding its time is the caller's business.
    pub async fn run<R: FromValue>(self, client: &impl LuaInterface) -> Result<R, fred::error::Error> {
        let Self { script, keys, args } = self;
        match client.evalsha::<R, _, _, _>(script.sha.as_str(), keys.clone(), args.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                client.eval::<R, _, _, _>(script.lua.as_str(), keys, args).await
            }
            other => other,
        }
    }
}

/// Lua helper shared with the auth server's write scripts: the deny-until
/// time of a registry value (`0` if none).
pub const LUA_DENY_OF: &str = r"
local function deny_of(v)
  if not v then return 0 end
  local mark, exp = string.match(v, '^([^|]*)|([^|]*)')
  if mark == '=' then return tonumber(exp) or 0 end
  return tonumber(mark) or 0
end
";

/// KEYS: deny mark of the jti (the registry key), the session's deny set
/// (only with a sid in the same slot). ARGV: now, has_sid, sid.
const LUA_IS_REVOKED: &str = r"
local now = tonumber(ARGV[1])
if deny_of(redis.call('GET', KEYS[1])) > now then return 1 end
if ARGV[2] == '1' then
  local s = redis.call('ZSCORE', KEYS[2], ARGV[3])
  if s and tonumber(s) > now then return 1 end
end
return 0
";

/// KEYS: the session's deny set. ARGV: now, sid.
const LUA_SESSION_REVOKED: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[2])
if s and tonumber(s) > tonumber(ARGV[1]) then return 1 end
return 0
";

static IS_REVOKED: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_DENY_OF, LUA_IS_REVOKED]));
static SESSION_REVOKED: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_SESSION_REVOKED]));

/// The is-revoked check: whether `jti`, or the session `sid`, is denied at
/// `now` (Unix seconds). Each call replies `1` if revoked, `0` if not; the
/// answer is revoked if any call says so. One call (atomic) when the
/// session's deny set shares the `jti`'s slot (the single-slot layout),
/// else two, one per slot, which may run concurrently: each reads an entry
/// that only ever grows until it expires, so no atomicity is lost.
pub fn is_revoked(layout: &KeyLayout, jti: &str, sid: Option<&str>, now: u64) -> Vec<ScriptCall<'static>> {
    let mark = layout.deny_jti(jti);
    match sid.map(|sid| (sid, layout.deny_sid(sid))) {
        Some((sid, set)) if hash_slot(&set) == hash_slot(&mark) => {
            vec![IS_REVOKED.call(vec![mark, set], vec![now.to_string(), "1".into(), sid.to_owned()])]
        }
        Some((sid, set)) => vec![
            IS_REVOKED.call(vec![mark], vec![now.to_string(), "0".into(), String::new()]),
            session_revoked(set, sid, now),
        ],
        None => vec![IS_REVOKED.call(vec![mark], vec![now.to_string(), "0".into(), String::new()])],
    }
}

/// Whether session `sid` is denied at `now`, in `set` (its
/// [`deny_sid`](KeyLayout::deny_sid)): replies `1` or `0`.
pub fn session_revoked(set: String, sid: &str, now: u64) -> ScriptCall<'static> {
    SESSION_REVOKED.call(vec![set], vec![now.to_string(), sid.to_owned()])
}

/// Runs the calls of [`is_revoked`] concurrently on `client`: revoked if
/// any says so. Bounding its time is the caller's business.
pub async fn run_is_revoked(
    calls: Vec<ScriptCall<'static>>,
    client: &impl LuaInterface,
) -> Result<bool, fred::error::Error> {
    let replies = futures_util::future::try_join_all(calls.into_iter().map(|call| call.run::<i64>(client))).await?;
    Ok(replies.contains(&1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC16/XMODEM (polynomial 0x1021, initial value 0), bit by bit: the
    /// reference the cluster spec gives.
    fn crc16(bytes: &[u8]) -> u16 {
        let mut crc = 0u16;
        for &b in bytes {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            }
        }
        crc
    }

    fn slot_of(hashed: &str) -> u16 {
        crc16(hashed.as_bytes()) % HASH_SLOTS
    }

    #[test]
    fn hash_slot_follows_the_cluster_spec() {
        // The spec's check value: CRC16/XMODEM("123456789") = 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(hash_slot("123456789"), 0x31C3);
        // What `CLUSTER KEYSLOT` answers.
        assert_eq!(hash_slot("foo"), 12_182);
        assert_eq!(hash_slot("hello"), 866);
        // Hash tags: between the first `{` and the next `}`, if not empty;
        // otherwise the whole key.
        assert_eq!(hash_slot("{user1000}.following"), slot_of("user1000"));
        assert_eq!(hash_slot("{user1000}.followers"), slot_of("user1000"));
        assert_eq!(hash_slot("foo{}{bar}"), slot_of("foo{}{bar}"));
        assert_eq!(hash_slot("foo{{bar}}zap"), slot_of("{bar"));
        assert_eq!(hash_slot("foo{bar}{zap}"), slot_of("bar"));
        assert_eq!(hash_slot("foo{bar"), slot_of("foo{bar"));
        assert_eq!(hash_slot("foo}{"), slot_of("foo}{"));
        assert_eq!(hash_slot("{auth}:rt:abc"), slot_of("auth"));
        for i in 0..1000 {
            let key = format!("k{i}:{{t{}}}", i % 7);
            assert_eq!(hash_slot(&key), slot_of(&format!("t{}", i % 7)), "{key}");
            assert_eq!(hash_slot(&format!("k{i}")), slot_of(&format!("k{i}")));
        }
    }

    #[test]
    fn common_slot_refuses_keys_of_several_slots() {
        assert_eq!(common_slot(&["{a}:1", "{a}:2"]), Some(hash_slot("a")));
        assert_ne!(hash_slot("a:1"), hash_slot("a:2"));
        assert_eq!(common_slot(&["a:1", "a:2"]), None);
        assert_eq!(common_slot::<&str>(&[]), None);
    }

    #[test]
    fn single_slot_layout_names_todays_keys() {
        let layout = KeyLayout::new("auth");
        assert_eq!(layout.channel(), "auth:revocations");
        assert_eq!(layout.issued("j1"), "{auth}:i:j1");
        assert_eq!(layout.deny_jti("j1"), "{auth}:i:j1");
        assert_eq!(layout.deny_sid("s1"), "{auth}:rv:sid");
        assert_eq!(layout.deny_family("f1"), "{auth}:rv:family");
        assert_eq!(layout.refresh("d1"), "{auth}:rt:d1");
        let guards = layout.refresh_guards("d1");
        assert_eq!((guards.family.as_str(), guards.session.as_deref()), ("{auth}:rv:family", Some("{auth}:rv:sid")));
        let shard = layout.jti_shard("j1");
        assert_eq!((shard.jti_bucket(7), shard.jti_index()), ("{auth}:rv:jti:7".to_owned(), "{auth}:rv:jti:idx"));
        assert_eq!(layout.deny_shards(), std::slice::from_ref(shard));
    }

    #[test]
    fn the_read_script_touches_one_slot_per_call() {
        for layout in [KeyLayout::new("auth"), KeyLayout::new("green"), KeyLayout::sharded("auth")] {
            for i in 0..200 {
                let jti = format!("jti-{i}");
                for sid in [None, Some(format!("sid-{i}"))] {
                    let calls = is_revoked(&layout, &jti, sid.as_deref(), 1);
                    for call in &calls {
                        assert!(common_slot(call.keys()).is_some(), "{:?}", call.keys());
                    }
                    let read = calls.iter().flat_map(|c| c.keys().iter().cloned()).collect::<Vec<_>>();
                    let mut want = vec![layout.deny_jti(&jti)];
                    want.extend(sid.as_deref().map(|s| layout.deny_sid(s)));
                    assert_eq!(read, want, "every entry is read once");
                }
            }
            // The single-slot layout reads both in one atomic call.
            if !layout.is_sharded() {
                assert_eq!(is_revoked(&layout, "j", Some("s"), 1).len(), 1);
            }
        }
    }

    #[test]
    fn the_sharded_layout_spreads_deny_shards_over_the_slot_space() {
        let layout = KeyLayout::sharded("auth");
        assert!(layout.is_sharded());
        let shards = layout.deny_shards();
        assert_eq!(shards.len(), DENY_SHARDS);
        for (i, shard) in shards.iter().enumerate() {
            // Shard i sits in slots i*1024..(i+1)*1024: contiguous slot ranges
            // (as `redis-cli --cluster create` assigns them) get their share.
            assert_eq!(usize::from(shard.slot()) / 1024, i, "{shard:?}");
            let keys = [shard.sessions(), shard.families(), shard.jti_index(), &shard.jti_bucket(7)];
            assert_eq!(common_slot(&keys), Some(shard.slot()));
        }
        // Ids land in the shard of their own slot: spread over all shards.
        let used: std::collections::HashSet<String> = (0..2000).map(|i| layout.deny_sid(&format!("sid-{i}"))).collect();
        assert_eq!(used.len(), DENY_SHARDS);
        // A jti's deny mark sits with its buckets.
        for i in 0..100 {
            let jti = format!("jti-{i}");
            assert_eq!(hash_slot(&layout.deny_jti(&jti)), layout.jti_shard(&jti).slot());
        }
        // A family's records and its deny entry share the family's slot; its
        // snapshot entry is in a deny shard.
        let digest = "fam1.abc";
        let guards = layout.refresh_guards(digest);
        assert_eq!(guards.session, None);
        assert_eq!(
            common_slot(&[layout.refresh(digest), layout.refresh("fam1.xyz"), guards.family.clone()]),
            Some(hash_slot("{auth:f:fam1}"))
        );
        assert_eq!(guards.family, layout.deny_family("fam1"));
        assert_ne!(hash_slot(&layout.refresh("fam2.abc")), hash_slot(&layout.refresh(digest)));
        assert!(layout.family_index("fam1").is_some() && KeyLayout::new("auth").family_index("fam1").is_none());
        assert_eq!(layout.refresh(digest), format!("{}{digest}", layout.refresh_prefix("fam1.other")));
        assert_eq!(KeyLayout::refresh_family("fam1.abc"), Some("fam1"));
        assert_eq!(KeyLayout::refresh_family("nodot"), None);
        assert_eq!(layout.channel(), "auth:revocations");
    }

    #[test]
    fn the_marker_names_the_layout_in_one_known_slot() {
        for prefix in ["auth", "green", "a{b}c"] {
            for layout in [KeyLayout::new(prefix), KeyLayout::sharded(prefix)] {
                assert_eq!(layout.marker(), format!("{{{prefix}}}:layout"));
                assert_eq!(KeyLayout::from_marker(prefix, &layout.marker_value()), Ok(layout.clone()));
            }
            // Both layouts keep it in the slot of the tag `{P}`.
            assert_eq!(hash_slot(&KeyLayout::new(prefix).marker()), hash_slot(&KeyLayout::sharded(prefix).marker()));
        }
        assert_eq!(KeyLayout::new("auth").marker_value(), "single|1");
        assert_eq!(KeyLayout::sharded("auth").marker_value(), "sharded|1");
        assert_eq!(hash_slot("{auth}:layout"), hash_slot("auth"));
        for value in ["sharded|2", "single", "wide|1", "", "|1", "sharded|1|x"] {
            assert_eq!(KeyLayout::from_marker("auth", value), Err(UnknownMarker { value: value.into() }), "{value}");
        }
        let long = "x".repeat(1000);
        assert_eq!(KeyLayout::from_marker("auth", &long).unwrap_err().value.len(), 64);
    }

    #[test]
    fn cluster_urls_pick_the_sharded_layout() {
        assert!(KeyLayout::for_url("auth", "redis-cluster://a:7000?node=b:7001").is_sharded());
        assert!(KeyLayout::for_url("auth", "rediss-cluster://a:7000").is_sharded());
        assert!(!KeyLayout::for_url("auth", "redis://a:6379").is_sharded());
        assert!(!KeyLayout::for_url("auth", "redis-sentinel://s:26379?sentinelServiceName=m").is_sharded());
    }
}
