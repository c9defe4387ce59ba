//! Rate limit for the front door's refusal log lines.
//!
//! A refused request costs its client nothing, so an unauthenticated local
//! client could otherwise write log lines as fast as it can connect. Each
//! refusal reason (`denied`, `no_route`, `400`, ...) gets
//! [`RefusalLog::PER_WINDOW`] lines per [`RefusalLog::WINDOW`]; further
//! refusals of that reason in the window are not logged, and the first line
//! logged after the window says how many were left out. The metrics count
//! every refusal regardless.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Whether to log one refusal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Log it; `suppressed` refusals of this reason were left out since the
    /// last line logged (log a summary with it when non-zero).
    Log {
        /// How many were not logged before this one.
        suppressed: u64,
    },
    /// Do not log it (counted for the next summary).
    Suppress,
}

/// Per-reason log budget, shared by every connection of a listener set.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    buckets: Mutex<HashMap<&'static str, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// The window the budget applies to.
    pub(crate) const WINDOW: Duration = Duration::from_secs(10);
    /// Lines per reason per window.
    pub(crate) const PER_WINDOW: u32 = 20;

    /// Decide for one refusal of `reason` (a static label, so the map stays
    /// bounded by the number of labels).
    pub(crate) fn admit(&self, reason: &'static str) -> Admit {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(reason).or_insert(Bucket {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(bucket.window_start) >= Self::WINDOW {
            bucket.window_start = now;
            bucket.logged = 0;
        }
        if bucket.logged < Self::PER_WINDOW {
            bucket.logged += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut bucket.suppressed),
            }
        } else {
            bucket.suppressed += 1;
            Admit::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_cut_per_reason_and_summarised_in_the_next_window() {
        let log = RefusalLog::default();
        for _ in 0..RefusalLog::PER_WINDOW {
            assert_eq!(log.admit("denied"), Admit::Log { suppressed: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(log.admit("denied"), Admit::Suppress);
        }
        // Another reason has its own budget.
        assert_eq!(log.admit("400"), Admit::Log { suppressed: 0 });
        tokio::time::advance(RefusalLog::WINDOW - Duration::from_millis(1)).await;
        assert_eq!(log.admit("denied"), Admit::Suppress);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(log.admit("denied"), Admit::Log { suppressed: 1001 });
        assert_eq!(log.admit("denied"), Admit::Log { suppressed: 0 });
    }
}
