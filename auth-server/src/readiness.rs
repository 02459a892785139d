//! Readiness beyond the store: conditions that take a replica out of
//! rotation while it keeps running (its server certificate has expired,
//! say). Each part of the server that can make the replica unready holds a
//! [`Readiness`] handle and raises or clears its own condition by name;
//! `/readyz` and the gRPC health service both answer from the store ping
//! combined with these conditions, so they never disagree.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// The replica's not-ready conditions, by name (`tls`, ...). Cheap to
/// clone; every clone sees the same conditions.
#[derive(Clone)]
pub struct Readiness {
    conditions: Arc<watch::Sender<BTreeMap<String, String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("reasons", &self.reasons()).finish()
    }
}

impl Readiness {
    /// No conditions: ready (as far as this part of readiness goes).
    pub fn new() -> Self {
        Self { conditions: Arc::new(watch::Sender::new(BTreeMap::new())) }
    }

    /// Raises (or updates) condition `name` with `reason`: the replica is
    /// not ready until it is cleared.
    pub fn set_not_ready(&self, name: &str, reason: impl Into<String>) {
        let reason = reason.into();
        self.conditions.send_if_modified(|c| {
            if c.get(name) == Some(&reason) {
                return false;
            }
            c.insert(name.to_owned(), reason);
            true
        });
    }

    /// Clears condition `name`.
    pub fn set_ready(&self, name: &str) {
        self.conditions.send_if_modified(|c| c.remove(name).is_some());
    }

    /// Whether no condition is raised.
    pub fn is_ready(&self) -> bool {
        self.conditions.borrow().is_empty()
    }

    /// The raised conditions as `name: reason`, sorted by name.
    pub fn reasons(&self) -> Vec<String> {
        self.conditions.borrow().iter().map(|(name, reason)| format!("{name}: {reason}")).collect()
    }

    /// A receiver that wakes on every change of the conditions.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.conditions.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conditions_combine_and_each_is_cleared_by_name() {
        let readiness = Readiness::new();
        let mut changes = readiness.subscribe();
        assert!(readiness.is_ready());
        readiness.set_not_ready("tls", "server certificate expired");
        readiness.set_not_ready("other", "broken");
        assert_eq!(readiness.reasons(), ["other: broken", "tls: server certificate expired"]);
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        // The same reason again is no change.
        readiness.set_not_ready("tls", "server certificate expired");
        assert!(!changes.has_changed().unwrap());
        readiness.set_ready("tls");
        assert!(!readiness.is_ready(), "another condition still holds");
        readiness.set_ready("other");
        assert!(readiness.is_ready() && readiness.reasons().is_empty());
        assert!(changes.has_changed().unwrap());
    }
}
