//! Polling a condition with a deadline: the one way the suites wait for a
//! state (never a bare sleep).

use std::future::Future;
use std::time::{Duration, Instant};

/// Pause between two polls.
pub const POLL: Duration = Duration::from_millis(50);

/// Poll `probe` every [`POLL`] until it returns `Some`; past `timeout`,
/// panic with `what` and `context()` (typically the sidecar's log).
pub async fn until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; {}",
            context()
        );
        tokio::time::sleep(POLL).await;
    }
}
