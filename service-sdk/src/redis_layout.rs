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
//!
//! Revocations are published on [`channel`](KeyLayout::channel)
//! `P:revocations` (no braces) as `<kind>|<deny_until>|<id>` with kind `j`,
//! `s` or `f`.
//!
//! # Other layouts
//!
//! Callers never build a key themselves: every key, and every script's KEYS,
//! come from a `KeyLayout`. A sharded layout (keys tagged by their natural
//! unit, such as a session or a refresh family, and deny entries spread
//! over slots) is another value of this type: the auth server's unit test
//! `every_script_keeps_its_keys_in_one_slot` computes the hash slot
//! ([`hash_slot`]) of the KEYS of every script call under each layout and
//! refuses a layout that would make a script cross slots. The snapshot
//! already reads every [`DenyShard`] of a layout; this one has a single
//! shard.

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

/// The keys of one part of the deny list: revoked sessions, revoked
/// families, and the bucketed list of revoked `jti`s that snapshots read.
/// All of one shard's keys share a slot, so one script reads it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyShard {
    sessions: String,
    families: String,
    jti_index: String,
    jti_buckets: String,
}

impl DenyShard {
    fn new(tag: &str) -> Self {
        Self {
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
}

/// The names of the auth server's Redis keys and channel for one
/// deployment. See the [module docs](self) for the keys and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    prefix: String,
    /// `{P}:`
    tag: String,
    /// `P:revocations`
    channel: String,
    deny: DenyShard,
}

impl KeyLayout {
    /// The single-slot layout for prefix `prefix` (the auth server's
    /// `redis.prefix`, default `auth`): every key under the hash tag `{P}`.
    pub fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}}}:");
        Self { prefix: prefix.to_owned(), deny: DenyShard::new(&tag), channel: format!("{prefix}:revocations"), tag }
    }

    /// The deployment's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pub/sub channel revocations are published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The issued-`jti` registry entry of `jti`.
    pub fn issued(&self, jti: &str) -> String {
        format!("{}i:{jti}", self.tag)
    }

    /// The key holding `jti`'s deny mark. In this layout the mark is the
    /// first field of the registry entry, so it is [`issued`](Self::issued).
    pub fn deny_jti(&self, jti: &str) -> String {
        self.issued(jti)
    }

    /// The shard whose revoked-`jti` buckets list `jti`.
    pub fn jti_shard(&self, _jti: &str) -> &DenyShard {
        &self.deny
    }

    /// The sorted set that holds session `sid`'s deny entry.
    pub fn deny_sid(&self, _sid: &str) -> String {
        self.deny.sessions.clone()
    }

    /// The sorted set that holds refresh family `id`'s deny entry.
    pub fn deny_family(&self, _id: &str) -> String {
        self.deny.families.clone()
    }

    /// A refresh token's record, by the SHA-256 digest of the token.
    pub fn refresh(&self, digest: &str) -> String {
        format!("{}rt:{digest}", self.tag)
    }

    /// The sorted sets holding the deny entries of the family and of the
    /// session of refresh token `digest`, in that order. Spending a refresh
    /// token checks them in the same script that reads its record, before
    /// the family and session are known: a layout derives them from the
    /// digest, in the slot of [`refresh`](Self::refresh).
    pub fn refresh_guards(&self, _digest: &str) -> [String; 2] {
        [self.deny.families.clone(), self.deny.sessions.clone()]
    }

    /// Every shard of the deny list; a snapshot reads them all.
    pub fn deny_shards(&self) -> &[DenyShard] {
        std::slice::from_ref(&self.deny)
    }
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
/// (only with a sid). ARGV: now, has_sid, sid.
const LUA_IS_REVOKED: &str = r"
local now = tonumber(ARGV[1])
if deny_of(redis.call('GET', KEYS[1])) > now then return 1 end
if ARGV[2] == '1' then
  local s = redis.call('ZSCORE', KEYS[2], ARGV[3])
  if s and tonumber(s) > now then return 1 end
end
return 0
";

static IS_REVOKED: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_DENY_OF, LUA_IS_REVOKED]));

/// The is-revoked check, atomically: whether `jti`, or the session `sid`,
/// is denied at `now` (Unix seconds). It replies `1` if revoked, `0` if not.
pub fn is_revoked(layout: &KeyLayout, jti: &str, sid: Option<&str>, now: u64) -> ScriptCall<'static> {
    let mut keys = vec![layout.deny_jti(jti)];
    keys.extend(sid.map(|sid| layout.deny_sid(sid)));
    let args = vec![now.to_string(), if sid.is_some() { "1" } else { "0" }.to_owned(), sid.unwrap_or("").to_owned()];
    IS_REVOKED.call(keys, args)
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
        assert_eq!(layout.refresh_guards("d1"), ["{auth}:rv:family".to_owned(), "{auth}:rv:sid".to_owned()]);
        let shard = layout.jti_shard("j1");
        assert_eq!((shard.jti_bucket(7), shard.jti_index()), ("{auth}:rv:jti:7".to_owned(), "{auth}:rv:jti:idx"));
        assert_eq!(layout.deny_shards(), std::slice::from_ref(shard));
    }

    #[test]
    fn the_read_script_touches_one_slot() {
        for layout in [KeyLayout::new("auth"), KeyLayout::new("green")] {
            for sid in [None, Some("sid-1")] {
                let call = is_revoked(&layout, "jti-1", sid, 1);
                assert_eq!(call.keys().len(), 1 + usize::from(sid.is_some()));
                assert!(common_slot(call.keys()).is_some(), "{:?}", call.keys());
            }
        }
    }
}
