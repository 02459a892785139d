//! The layout marker (`{P}:layout`, see
//! [`KeyLayout::marker`](service_sdk::redis_layout::KeyLayout::marker)):
//! which key layout this prefix's entries follow.
//!
//! The store claims it when it connects: one script sets it to its own
//! layout if it is absent (`SET NX`) and answers what it holds. Another
//! value is [`StoreError::LayoutMismatch`]: the store refuses to start,
//! since a replica reading and writing other keys than its peers (or than
//! the SDK's Redis mode reads) would split the state and miss revocations.
//! Every store call waits for the claim (one round trip, until it has
//! succeeded once), so a store that started while Redis was down checks the
//! marker before its first read or write; and every readiness check claims
//! it again, which restores a marker lost with a failover or a flush and
//! makes a replica whose marker was replaced by another layout not ready.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;

use service_sdk::redis_layout::{Script, ScriptCall};

use super::Shared;
use super::keys::KeyLayout;
use crate::store::StoreError;

/// KEYS: the marker. ARGV: this layout's marker value. Sets the marker if
/// absent; replies what it holds.
const LUA_CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(&[LUA_CLAIM]));

/// The claim of `layout`'s marker.
pub(super) fn claim(layout: &KeyLayout) -> ScriptCall<'static> {
    CLAIM.call(vec![layout.marker()], vec![layout.marker_value()])
}

impl Shared {
    /// Claims the marker for this store's layout: `Ok` once it names it
    /// (remembered for [`layout_claimed`](Self::layout_claimed)),
    /// [`StoreError::LayoutMismatch`] if it names another.
    pub(super) async fn claim_layout(&self) -> Result<(), StoreError> {
        let found: String = self.unchecked(claim(&self.layout).run(&self.pool)).await?;
        if found == self.layout.marker_value() {
            self.claimed.store(true, Ordering::Release);
            return Ok(());
        }
        self.claimed.store(false, Ordering::Release);
        Err(StoreError::LayoutMismatch {
            configured: self.layout.name(),
            found: found.chars().take(64).collect(),
            marker: self.layout.marker(),
        })
    }

    /// Before any other command: the marker, claimed once.
    pub(super) async fn layout_claimed(&self) -> Result<(), StoreError> {
        if self.claimed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.claim_layout().await
    }
}
