//! The verified-token cache: tokens whose header and signature were already
//! checked, keyed by the SHA-256 digest of the token (the token itself is
//! never stored), holding the verified claims in their compact encoding
//! (see `compact`) until the token expires. A revocation evicts the entry.
//!
//! A hit skips only the signature, and only while the key that checked it
//! is still published: each entry keeps that key's fingerprint, and the
//! verifier compares it with the current key set on every hit (a key
//! removed from the JWKS, or replaced under its `kid`, sends its tokens
//! back through full verification, which refuses them). The claim checks
//! (times, issuer, audience), the certificate binding and the revocation
//! check still run on every request.
//!
//! Why not `moka` holding parsed `Claims`: per entry that is about 500 bytes
//! of cache bookkeeping plus about 700 bytes of parsed claims (a dozen small
//! allocations), 119 MB for 100,000 tokens against a 64 MB budget that also
//! covers the deny set. Here an entry is the 32-byte digest, the compact
//! claims (about 200 bytes, one allocation) and four integers, in sharded
//! hash maps. Decoding the compact form on a hit costs about what cloning
//! parsed claims into the request did.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, RwLock};

use aws_lc_rs::digest;

use super::RevokedKind;
use super::keys::KeyFingerprint;

/// Number of independently locked shards.
const SHARDS: usize = 32;

/// The cache key: SHA-256 of the compact token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenDigest([u8; 32]);

impl Hash for TokenDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly random: its first eight bytes are the hash.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Passes a digest's own bits through as the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Digests a token.
pub(crate) fn token_digest(token: &str) -> TokenDigest {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    TokenDigest(out)
}

/// A 64-bit tag of a `jti` or `sid`, to find entries to evict without
/// parsing their payloads (a collision only evicts an extra entry).
fn id_tag(id: &str) -> u64 {
    // Fixed keys: tags must agree between insertion and eviction.
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id)
}

struct Entry {
    /// The verified claims, compactly encoded.
    payload: Arc<[u8]>,
    /// `exp` plus leeway: after this the entry is useless.
    until: u64,
    jti: u64,
    /// `0` when the token has no `sid`.
    sid: u64,
    /// The key that checked the signature.
    key: KeyFingerprint,
}

type Shard = HashMap<TokenDigest, Entry, BuildHasherDefault<DigestHasher>>;

/// A bounded map from token digest to verified payload.
pub(crate) struct TokenCache {
    shards: Box<[RwLock<Shard>]>,
    per_shard: usize,
}

impl TokenCache {
    /// A cache of about `capacity` tokens: each shard holds a 32nd of it
    /// plus a tenth for the uneven spread of digests, so the total stays
    /// under 1.1 × `capacity`.
    pub(crate) fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        let per_shard = capacity.div_ceil(SHARDS);
        let shards = (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect();
        Self { shards, per_shard: per_shard.saturating_add(per_shard / 10).max(1) }
    }

    fn shard(&self, key: &TokenDigest) -> &RwLock<Shard> {
        &self.shards[usize::from(key.0[31]) % SHARDS]
    }

    /// The compact claims of a token, if cached and not past `now`, and the
    /// fingerprint of the key that checked its signature.
    pub(crate) fn get(&self, key: &TokenDigest, now: u64) -> Option<(Arc<[u8]>, KeyFingerprint)> {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        shard.get(key).filter(|e| e.until > now).map(|e| (Arc::clone(&e.payload), e.key))
    }

    /// Keeps the compact claims `payload`, whose signature the key
    /// `signed_by` checked, until `until` (the token's `exp` plus leeway).
    #[allow(clippy::too_many_arguments, reason = "one entry's fields, each named at the call site")]
    pub(crate) fn insert(
        &self,
        key: TokenDigest,
        payload: Vec<u8>,
        jti: &str,
        sid: Option<&str>,
        signed_by: KeyFingerprint,
        now: u64,
        until: u64,
    ) {
        if until <= now {
            return;
        }
        let entry =
            Entry { payload: Arc::from(payload), until, jti: id_tag(jti), sid: sid.map_or(0, id_tag), key: signed_by };
        let mut shard = self.shard(&key).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.until > now);
            if shard.len() >= self.per_shard {
                // Still full of live tokens: drop an arbitrary eighth.
                let drop_n = (self.per_shard / 8).max(1);
                let victims: Vec<TokenDigest> = shard.keys().take(drop_n).copied().collect();
                for v in victims {
                    shard.remove(&v);
                }
            }
        }
        shard.insert(key, entry);
    }

    /// Forgets one token.
    pub(crate) fn remove(&self, key: &TokenDigest) {
        self.shard(key).write().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Evicts every entry of a revoked `jti` or `sid`.
    pub(crate) fn evict(&self, kind: RevokedKind, id: &str) {
        let tag = id_tag(id);
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            match kind {
                RevokedKind::Jti => shard.retain(|_, e| e.jti != tag),
                RevokedKind::Sid => shard.retain(|_, e| e.sid != tag),
            }
        }
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            shard.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Number of entries (expired ones included until swept).
    pub(crate) fn len(&self) -> u64 {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len() as u64).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn put(cache: &TokenCache, token: &str, jti: &str, sid: &str, until: u64) {
        cache.insert(
            token_digest(token),
            token.as_bytes().to_vec(),
            jti,
            Some(sid),
            KeyFingerprint::TEST,
            1_000,
            until,
        );
    }

    #[test]
    fn digests_differ_per_token() {
        assert!(token_digest("a.b.c") != token_digest("a.b.d"));
        assert!(token_digest("a.b.c") == token_digest("a.b.c"));
    }

    #[test]
    fn hit_returns_the_payload_until_expiry() {
        let cache = TokenCache::new(100);
        put(&cache, "t", "j", "s", 2_000);
        assert_eq!(cache.get(&token_digest("t"), 1_999).unwrap(), (Arc::from(&b"t"[..]), KeyFingerprint::TEST));
        assert!(cache.get(&token_digest("t"), 2_000).is_none());
        assert!(cache.get(&token_digest("u"), 1_000).is_none());
    }

    #[test]
    fn revocation_evicts_by_jti_and_by_sid() {
        let cache = TokenCache::new(100);
        put(&cache, "t1", "j1", "s1", 2_000);
        put(&cache, "t2", "j2", "s2", 2_000);
        put(&cache, "t3", "j3", "s2", 2_000);
        put(&cache, "t4", "j4", "s4", 2_000);
        assert_eq!(cache.len(), 4);
        cache.evict(RevokedKind::Jti, "j1");
        cache.evict(RevokedKind::Sid, "s2");
        assert!(cache.get(&token_digest("t1"), 1_000).is_none());
        assert!(cache.get(&token_digest("t2"), 1_000).is_none());
        assert!(cache.get(&token_digest("t3"), 1_000).is_none());
        assert!(cache.get(&token_digest("t4"), 1_000).is_some());
    }

    #[test]
    fn expired_tokens_are_not_cached() {
        let cache = TokenCache::new(100);
        put(&cache, "t", "j", "s", 1_000);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn capacity_bounds_the_cache_and_expired_entries_go_first() {
        let cache = TokenCache::new(64);
        for i in 0..1_000 {
            put(&cache, &format!("t{i}"), &format!("j{i}"), "s", 2_000);
        }
        assert!(cache.len() <= 64 + 64 / 10 + SHARDS as u64, "{}", cache.len());
        let cache = TokenCache::new(SHARDS as u64);
        put(&cache, "old", "j0", "s", 1_001);
        // Fill every shard once more at a later time: expired entries make room.
        for i in 0..10_000 {
            cache.insert(token_digest(&format!("n{i}")), vec![], "j", None, KeyFingerprint::TEST, 1_500, 2_000);
        }
        assert!(cache.get(&token_digest("old"), 1_000).is_none());
    }
}
