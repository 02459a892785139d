//! The layout marker (`{P}:layout`, see
//! [`KeyLayout::marker`](service_sdk::redis_layout::KeyLayout::marker)):
//! which key layout this prefix's entries follow.
//!
//! The store claims it when it connects. It reads the marker; another
//! value is [`StoreError::LayoutMismatch`]: the store refuses to start,
//! since a replica reading and writing other keys than its peers (or than
//! the SDK's Redis mode reads) would split the state and miss revocations.
//! An absent marker is written by one script, which sets it to this
//! store's layout if it is still absent and answers what it holds.
//!
//! **Data of the other layout without a marker** (written before markers
//! existed, e.g. by replicas configured otherwise): before it writes the
//! marker, the claim looks for the other layout's deny-list keys (its
//! revoked sessions, revoked families and revoked-`jti` index, which exist
//! while any of its revocations is in force) and refuses with
//! [`StoreError::UnmarkedLayout`] when one exists, leaving the marker
//! absent. Those of the other layout's keys in the marker's slot (the
//! single-slot layout's, for a sharded claim) are checked inside the
//! claim script, atomically; the sharded layout's deny shards, in other
//! slots, are checked just before it. Not seen: the other layout's refresh
//! tokens and issued-`jti` registry entries, which no key lists (their
//! loss logs users out; it passes no revoked token).
//!
//! **Durability** (`redis.min_replicas_acked` > 0): the claim that writes
//! the marker goes through the durable write path (the script, then
//! `WAIT`), and until one claim has been acknowledged by enough replicas,
//! every readiness check claims again that way (writing the marker again,
//! so that its `WAIT` covers it), and fails with [`StoreError::NotDurable`]
//! meanwhile: a replica does not report ready on a marker that a failover
//! could lose, letting a replica of another layout claim it. A marker found
//! absent again (lost with a flush or a failover) voids the acknowledgement:
//! readiness claims durably again until a claim is acknowledged. Store calls
//! go on once the marker names this layout on the primary: each durable
//! write waits for its own replicas anyway.
//!
//! Every store call waits for the claim (until it has succeeded once), so
//! a store that started while Redis was down checks the marker before its
//! first read or write; and every readiness check reads it again (one
//! `GET`), which restores a marker lost with a failover or a flush and
//! makes a replica whose marker was replaced by another layout not ready.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;

use fred::prelude::{FromValue as _, KeysInterface as _};
use service_sdk::redis_layout::{Script, ScriptCall};

use super::keys::KeyLayout;
use super::{Shared, map_error};
use crate::store::StoreError;

/// KEYS: the marker, then keys of the other layout in the marker's slot.
/// ARGV: this layout's marker value. Replies `{'marker', <value>}` with
/// the marker's value when it names another layout; else, when it is
/// absent and one of the other layout's keys exists, `{'data', <key>}`;
/// else sets it (again, if it named this layout already: a `WAIT` behind
/// the script then covers it) and replies `{'marker', ARGV[1]}`.
const LUA_CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return {'marker', v} end
if not v then
  for i = 2, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then return {'data', KEYS[i]} end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return {'marker', ARGV[1]}
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_CLAIM]));

/// The other layout than `layout`, for the same prefix.
fn other(layout: &KeyLayout) -> KeyLayout {
    if layout.is_sharded() { KeyLayout::new(layout.prefix()) } else { KeyLayout::sharded(layout.prefix()) }
}

/// The other layout's deny-list keys, grouped by slot: each group is one
/// deny shard's revoked sessions, revoked families and revoked-`jti`
/// index. Those keys exist while any revocation of that layout is in force.
fn other_layout_keys(layout: &KeyLayout) -> Vec<Vec<String>> {
    other(layout)
        .deny_shards()
        .iter()
        .map(|shard| vec![shard.sessions().to_owned(), shard.families().to_owned(), shard.jti_index().to_owned()])
        .collect()
}

/// The claim of `layout`'s marker: the marker, and the other layout's keys
/// that share its slot (checked by the script).
pub(super) fn claim(layout: &KeyLayout) -> ScriptCall<'static> {
    let slot = service_sdk::redis_layout::hash_slot(&layout.marker());
    let mut keys = vec![layout.marker()];
    keys.extend(
        other_layout_keys(layout).into_iter().flatten().filter(|key| service_sdk::redis_layout::hash_slot(key) == slot),
    );
    CLAIM.call(keys, vec![layout.marker_value()])
}

/// What the claim script found.
enum Claimed {
    /// The marker's value.
    Marker(String),
    /// The marker is absent and this key of the other layout exists.
    Data(String),
}

fn parse_claim(reply: fred::prelude::Value) -> Result<Claimed, StoreError> {
    let reply: Vec<String> = Vec::from_value(reply).map_err(map_error)?;
    match <[String; 2]>::try_from(reply) {
        Ok([kind, value]) if kind == "marker" => Ok(Claimed::Marker(value)),
        Ok([kind, key]) if kind == "data" => Ok(Claimed::Data(key)),
        _ => Err(StoreError::Corrupt("layout marker claim reply unreadable".into())),
    }
}

impl Shared {
    /// Claims the marker for this store's layout (see the module docs):
    /// `Ok` once it names it (remembered for
    /// [`layout_claimed`](Self::layout_claimed)),
    /// [`StoreError::LayoutMismatch`] if it names another,
    /// [`StoreError::UnmarkedLayout`] if it is absent and the other
    /// layout's keys exist, [`StoreError::NotDurable`] if it names this
    /// layout on the primary but too few replicas acknowledged it.
    pub(super) async fn claim_layout(&self) -> Result<(), StoreError> {
        let durable = self.durability.replicas > 0;
        let confirm = durable && !self.marker_durable.load(Ordering::Acquire);
        let found: Option<String> = self.unchecked(self.pool.get(self.layout.marker())).await?;
        match found {
            Some(value) if value != self.layout.marker_value() => return Err(self.mismatch(value)),
            Some(_) if !confirm => {
                self.claimed.store(true, Ordering::Release);
                return Ok(());
            }
            Some(_) => {}
            None => {
                // Lost (a flush, a failover): whatever was acknowledged
                // before no longer holds; readiness waits for a new claim's.
                self.marker_durable.store(false, Ordering::Release);
                self.no_other_layout_elsewhere().await?;
            }
        }
        let call = claim(&self.layout);
        let (reply, acked) = if durable {
            self.write_durably(&call).await?
        } else {
            (self.unchecked(call.run::<fred::prelude::Value>(&self.pool)).await?, None)
        };
        match parse_claim(reply)? {
            Claimed::Marker(value) if value == self.layout.marker_value() => {
                self.claimed.store(true, Ordering::Release);
                if let Some(acked) = acked {
                    self.marker_durable.store(false, Ordering::Release);
                    return Err(StoreError::NotDurable { acked, wanted: self.durability.replicas });
                }
                self.marker_durable.store(true, Ordering::Release);
                Ok(())
            }
            Claimed::Marker(value) => Err(self.mismatch(value)),
            Claimed::Data(key) => Err(self.unmarked(key)),
        }
    }

    /// Before writing an absent marker: the other layout's keys outside
    /// the marker's slot (the claim script checks those within it).
    async fn no_other_layout_elsewhere(&self) -> Result<(), StoreError> {
        let slot = service_sdk::redis_layout::hash_slot(&self.layout.marker());
        let groups: Vec<Vec<String>> = other_layout_keys(&self.layout)
            .into_iter()
            .filter(|keys| keys.iter().all(|key| service_sdk::redis_layout::hash_slot(key) != slot))
            .collect();
        let counts =
            futures_util::future::try_join_all(groups.iter().map(|keys| self.pool.exists::<i64, _>(keys.clone())));
        let counts = self.unchecked(counts).await?;
        let Some((keys, _)) = groups.iter().zip(counts).find(|(_, count)| *count > 0) else {
            return Ok(());
        };
        // Name the key found (one more round trip, only on a refusal).
        for key in keys {
            let exists: i64 = self.unchecked(self.pool.exists(key.as_str())).await?;
            if exists > 0 {
                return Err(self.unmarked(key.clone()));
            }
        }
        Err(self.unmarked(keys.join(" or ")))
    }

    fn mismatch(&self, found: String) -> StoreError {
        self.claimed.store(false, Ordering::Release);
        StoreError::LayoutMismatch {
            configured: self.layout.name(),
            found: found.chars().take(64).collect(),
            marker: self.layout.marker(),
        }
    }

    fn unmarked(&self, key: String) -> StoreError {
        self.claimed.store(false, Ordering::Release);
        StoreError::UnmarkedLayout {
            configured: self.layout.name(),
            found: other(&self.layout).name(),
            key,
            marker: self.layout.marker(),
        }
    }

    /// Before any other command: the marker, claimed once.
    pub(super) async fn layout_claimed(&self) -> Result<(), StoreError> {
        if self.claimed.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.claim_layout().await {
            // Named on the primary: calls go on (each durable write waits
            // for its own replicas); readiness waits for the marker's.
            Err(StoreError::NotDurable { .. }) if self.claimed.load(Ordering::Acquire) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use service_sdk::redis_layout::{common_slot, hash_slot};

    use super::*;

    #[test]
    fn the_claim_checks_the_other_layouts_keys_of_its_slot_and_the_rest_are_each_in_one_slot() {
        for prefix in ["auth", "green"] {
            let single = KeyLayout::new(prefix);
            let sharded = KeyLayout::sharded(prefix);
            // A sharded claim sees the single-slot layout's deny list in
            // the marker's slot, in the script.
            let call = claim(&sharded);
            let deny = &single.deny_shards()[0];
            assert_eq!(
                call.keys(),
                [sharded.marker(), deny.sessions().into(), deny.families().into(), deny.jti_index().into()]
            );
            assert_eq!(common_slot(call.keys()), Some(hash_slot(&sharded.marker())));
            // A single-slot claim: the sharded deny shards are all elsewhere,
            // one slot per group.
            assert_eq!(claim(&single).keys(), [single.marker()]);
            let groups = other_layout_keys(&single);
            assert_eq!(groups.len(), sharded.deny_shards().len());
            for keys in &groups {
                let slot = common_slot(keys).unwrap();
                assert_ne!(slot, hash_slot(&single.marker()));
            }
            assert_eq!(other(&single), sharded);
            assert_eq!(other(&sharded), single);
        }
    }
}
