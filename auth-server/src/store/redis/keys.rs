//! Where the store's entries live. The key names come from the
//! [`KeyLayout`] shared with the SDK's Redis revocation mode (its docs hold
//! the table of keys); this module adds the time arithmetic of the entries.

pub(super) use service_sdk::redis_layout::KeyLayout;

/// How much longer than its token a registry entry lives.
pub(super) const ISSUED_SLACK_SECS: u64 = 60;

/// Width of a revoked-`jti` bucket.
pub(super) const BUCKET_SECS: u64 = 60;

/// The key the readiness probe writes (`{P}:ready`, a short-lived string):
/// a write that Redis refuses (`OOM`, `READONLY`, `MISCONF`) makes the store
/// not ready.
pub(super) fn ready_probe(layout: &KeyLayout) -> String {
    format!("{{{}}}:ready", layout.prefix())
}

/// The revoked-`jti` bucket a deny-until time falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bucket {
    /// The bucket's minute (Unix seconds / [`BUCKET_SECS`]).
    pub(super) minute: u64,
    /// When the bucket may be forgotten: the end of its minute.
    pub(super) end: u64,
    /// Seconds from the start of the minute to the deny-until time.
    pub(super) offset: u64,
}

impl Bucket {
    /// The bucket of `deny_until`.
    pub(super) fn of(deny_until: u64) -> Self {
        let minute = deny_until / BUCKET_SECS;
        Self { minute, end: minute.saturating_add(1).saturating_mul(BUCKET_SECS), offset: deny_until % BUCKET_SECS }
    }

    /// The deny-until time of an entry `offset` seconds into `minute`.
    pub(super) fn deny_until(minute: u64, offset: u64) -> u64 {
        minute.saturating_mul(BUCKET_SECS).saturating_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deny_time_round_trips_through_its_bucket() {
        for t in [0, 59, 60, 1_800_000_599, 1_800_000_600] {
            let b = Bucket::of(t);
            assert!(b.end > t && b.end - BUCKET_SECS <= t);
            assert_eq!(Bucket::deny_until(b.minute, b.offset), t);
        }
    }
}
