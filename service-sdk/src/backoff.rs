//! One exponential back-off for everything in the SDK that retries (token
//! exchanges, JWKS fetches, the revocation stream).
//!
//! [`Backoff`] is a small value, not a timer: after each failure ask it for
//! the next delay, after a success [`reset`](Backoff::reset) it. The delay
//! starts at `base`, doubles with each consecutive failure and is capped at
//! `cap`; with [jitter](Backoff::jitter) a random part of it is taken off, so
//! many clients that failed together do not retry together.
//!
//! The computation is pure: [`Backoff::next_delay_with`] takes the random
//! number, so tests pin exact delays; [`Backoff::next_delay`] draws it from
//! the system random generator.
//!
//! ```
//! use std::time::Duration;
//! use service_sdk::backoff::Backoff;
//!
//! let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! assert_eq!(b.next_delay_with(0.0), Duration::from_millis(100));
//! assert_eq!(b.next_delay_with(0.0), Duration::from_millis(200));
//! b.reset();
//! assert_eq!(b.next_delay_with(0.0), Duration::from_millis(100));
//!
//! // Equal jitter: each delay falls in [d/2, d].
//! let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(0.5);
//! assert_eq!(b.next_delay_with(0.0), Duration::from_millis(50));
//! ```

use std::time::Duration;

/// Largest doubling exponent: `base * 2^31` exceeds any sensible cap.
const MAX_EXPONENT: u32 = 31;

/// Exponential back-off: from `base`, doubling per consecutive failure,
/// capped at `cap`, with optional jitter; [`reset`](Self::reset) on success.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: f64,
    failures: u32,
}

impl Backoff {
    /// A back-off whose first delay is `base` and whose delays never exceed
    /// `cap` (raised to `base` if lower). No jitter.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap: cap.max(base), jitter: 0.0, failures: 0 }
    }

    /// Takes up to this fraction of each delay off at random: a delay `d`
    /// becomes a value in `[d * (1 - fraction), d]`. `0.5` is "equal
    /// jitter". Clamped to `[0, 1]`; a non-finite fraction means none.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = unit_interval(fraction);
        self
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Consecutive failures since the last [`reset`](Self::reset).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and returns how long to wait before the next
    /// attempt, jittered with the system random generator.
    pub fn next_delay(&mut self) -> Duration {
        let unit = if self.jitter > 0.0 { unit_random() } else { 1.0 };
        self.next_delay_with(unit)
    }

    /// Records a failure and returns how long to wait before the next
    /// attempt, with `unit` (in `[0, 1]`, clamped) as the random number:
    /// `0` takes the whole jitter off, `1` none of it.
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exponent = (self.failures - 1).min(MAX_EXPONENT);
        let ceiling = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        let factor = 1.0 - self.jitter + self.jitter * unit_interval(unit);
        scale(ceiling, factor)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `d * factor` for a factor in `[0, 1]` (clamped), in integer arithmetic:
/// unlike `Duration::mul_f64` it cannot overflow, even for `Duration::MAX`.
fn scale(d: Duration, factor: f64) -> Duration {
    const ONE: f64 = (1u64 << 32) as f64;
    let q = (unit_interval(factor) * ONE).round() as u128;
    // `as_nanos` < 2^94 and `q` <= 2^32: the product fits in a u128, and the
    // result is at most `d`, so its seconds fit in a u64.
    let nanos = (d.as_nanos() * q) >> 32;
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

/// `x` clamped to `[0, 1]`; `0` when not finite.
fn unit_interval(x: f64) -> f64 {
    if x.is_finite() { x.clamp(0.0, 1.0) } else { 0.0 }
}

/// A random number in `[0, 1)` from the system random generator (`0.5` in
/// the unlikely event that it fails).
pub(crate) fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_start_at_base_and_double() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(60));
        let got: Vec<_> = (0..5).map(|_| b.next_delay_with(0.3)).collect();
        assert_eq!(got, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS]);
        assert_eq!(b.failures(), 5);
    }

    #[test]
    fn delays_are_capped() {
        let mut b = Backoff::new(100 * MS, 350 * MS);
        let got: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [100 * MS, 200 * MS, 350 * MS, 350 * MS, 350 * MS]);
    }

    #[test]
    fn cap_below_base_is_raised_to_base() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.cap(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }

    #[test]
    fn reset_returns_to_the_first_delay() {
        let mut b = Backoff::new(10 * MS, Duration::from_secs(1));
        for _ in 0..4 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(), 10 * MS);
    }

    #[test]
    fn jitter_bounds_are_exact_at_the_ends_of_the_random_range() {
        let b = Backoff::new(100 * MS, Duration::from_secs(1)).jitter(0.5);
        assert_eq!(b.clone().next_delay_with(0.0), 50 * MS);
        assert_eq!(b.clone().next_delay_with(1.0), 100 * MS);
        assert_eq!(b.clone().next_delay_with(0.5), 75 * MS);
        // Out-of-range and non-finite random numbers are clamped, never panic.
        assert_eq!(b.clone().next_delay_with(-3.0), 50 * MS);
        assert_eq!(b.clone().next_delay_with(7.0), 100 * MS);
        assert_eq!(b.clone().next_delay_with(f64::NAN), 50 * MS);
    }

    #[test]
    fn jittered_delays_stay_within_their_bounds() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(1)).jitter(0.5);
        for ceiling in [100, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            assert!(d >= ceiling * MS / 2 && d <= ceiling * MS, "{d:?} outside [{}ms/2, {ceiling}ms]", ceiling);
        }
    }

    #[test]
    fn jitter_fraction_is_clamped() {
        let full = Backoff::new(100 * MS, Duration::from_secs(1)).jitter(5.0);
        assert_eq!(full.clone().next_delay_with(0.0), Duration::ZERO);
        let none = Backoff::new(100 * MS, Duration::from_secs(1)).jitter(f64::INFINITY);
        assert_eq!(none.clone().next_delay_with(0.0), 100 * MS);
        let negative = Backoff::new(100 * MS, Duration::from_secs(1)).jitter(-1.0);
        assert_eq!(negative.clone().next_delay_with(0.0), 100 * MS);
    }

    #[test]
    fn zero_base_retries_at_once() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO).jitter(0.5);
        for _ in 0..40 {
            assert_eq!(b.next_delay(), Duration::ZERO);
        }
    }

    #[test]
    fn many_failures_saturate_without_panicking() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        b.failures = u32::MAX - 1;
        let d = b.next_delay_with(1.0);
        assert_eq!(d, Duration::from_secs(1u64 << MAX_EXPONENT));
        assert_eq!(b.next_delay_with(1.0), d);
        assert_eq!(b.failures(), u32::MAX);
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX).jitter(0.5);
        assert!(huge.next_delay() <= Duration::MAX);
        assert!(huge.next_delay() <= Duration::MAX);
    }

    #[test]
    fn unit_random_stays_in_range() {
        for _ in 0..1000 {
            let r = unit_random();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
