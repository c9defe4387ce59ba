//! Reconnect delays: exponential backoff with full jitter.
//!
//! After the n-th consecutive failure the delay is uniform in
//! `[0, min(max, base * 2^n)]` (AWS "full jitter"), so thousands of nodes that
//! failed together do not retry together. A session that stayed Ready long
//! enough resets the sequence.

use std::time::Duration;

use rand::RngExt;

/// One node session's backoff sequence.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A sequence starting at `base` and capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The upper bound of the next delay, without drawing it.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Draw the delay before the next attempt and count one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Start over (after a session stayed Ready long enough).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_a_doubling_ceiling_and_are_capped() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let expected = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for ceiling in expected {
            assert_eq!(b.ceiling(), Duration::from_secs(ceiling));
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(ceiling), "{d:?} > {ceiling}s");
        }
        // Far past the cap: no overflow, still capped.
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
            seen.insert(b.next_delay().as_millis());
        }
        assert!(
            seen.len() > 10,
            "full jitter should spread delays: {seen:?}"
        );
    }
}
