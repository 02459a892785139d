//! Time, injected. No flow reads the system clock directly, so tests can move
//! time forward. The SDK's clock is reused, so one `ManualClock` drives both
//! the issuer and a verifier in a test.

use std::sync::Arc;

pub use service_sdk::{Clock, ManualClock, SystemClock};

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;
