//! Liveness of a session: SSH keepalives on a fixed interval.
//!
//! A keepalive is sent every `interval` while none is outstanding. Each tick
//! that finds the previous one still unanswered counts a miss, unless the
//! peer sent something since the last tick (a node busy sending data is
//! alive even when the answer waits behind megabytes queued on a slow link);
//! `max` misses in a row declare the session dead. A peer that goes silent
//! is therefore detected within `interval x (max + 1)` of the last thing it
//! sent, the same budget as OpenSSH's `ServerAliveInterval`/
//! `ServerAliveCountMax`, which also counts any packet as a sign of life.
//!
//! Every answered keepalive is also a round-trip measurement. A few more
//! are made soon after the session starts ([`EarlyRoundTrips`]), for what
//! is sized by the round trip (`"auto"` shared windows) before the first
//! keepalive. They never decide liveness: a peer that leaves one unanswered
//! is judged by the keepalives alone.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

/// One keepalive in flight: resolves when the peer answered, or with why
/// the session is gone.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), SessionGone>> + Send + 'static>>;

/// Why a keepalive found the session gone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionGone {
    /// The session was closed before the keepalive was sent.
    #[error("session closed")]
    Closed,
    /// The session closed while the keepalive waited for its reply.
    #[error("session closed while waiting for a keepalive reply")]
    ClosedWhileWaiting,
    /// The keepalive could not be sent.
    #[error("keepalive failed: {0}")]
    SendFailed(std::sync::Arc<russh::Error>),
}

/// Sends one keepalive and resolves when the peer answered.
pub trait Probe: Send + Sync {
    /// Send a keepalive; `Err` means the session is gone.
    fn probe(&self) -> ProbeFuture;
    /// A counter that moves whenever the peer sent something (packets
    /// received); a probe that cannot tell returns a constant.
    fn activity(&self) -> u64 {
        0
    }
}

/// Why [`run`] returned.
#[derive(Debug)]
pub enum Verdict {
    /// `max` keepalives in a row went unanswered.
    Silent {
        /// Misses counted.
        misses: u32,
    },
    /// The probe reported the session gone.
    Gone(SessionGone),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Silent { misses } => write!(f, "no keepalive reply in {misses} intervals"),
            Verdict::Gone(why) => write!(f, "{why}"),
        }
    }
}

/// Round trips measured once, soon after the session starts, one after
/// another, besides the keepalives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlyRoundTrips {
    /// When the first is sent, from the start of [`run`].
    pub after: Duration,
    /// How many.
    pub count: u32,
}

impl EarlyRoundTrips {
    /// None: round trips come from keepalives only.
    pub const NONE: EarlyRoundTrips = EarlyRoundTrips {
        after: Duration::ZERO,
        count: 0,
    };
}

/// What a round trip handed to [`run`]'s `on_rtt` was measured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundTripKind {
    /// One of the [`EarlyRoundTrips`]; `left` still to measure after it.
    Early {
        /// Early round trips still to come (0: this was the last).
        left: u32,
    },
    /// An answered keepalive.
    Keepalive,
}

/// Probe every `interval` until the peer is declared dead; `on_rtt` gets the
/// round trip of every answered keepalive and of each of the `early` ones.
/// Runs until it returns a verdict: the caller races it against its own
/// stop conditions.
pub async fn run<P: Probe>(
    probe: &P,
    interval: Duration,
    max: u32,
    early: EarlyRoundTrips,
    mut on_rtt: impl FnMut(Duration, RoundTripKind),
) -> Verdict {
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<(Instant, ProbeFuture)> = None;
    let mut misses = 0u32;
    let mut seen = probe.activity();
    let early_at = tokio::time::sleep(early.after);
    tokio::pin!(early_at);
    let mut early_left = early.count;
    let mut early_pending: Option<(Instant, ProbeFuture)> = None;
    loop {
        tokio::select! {
            () = &mut early_at, if early_left > 0 && early_pending.is_none() => {
                early_pending = Some((Instant::now(), probe.probe()));
            }
            (sent, answer) = answered(&mut early_pending) => {
                match answer {
                    Ok(()) => {
                        early_left -= 1;
                        on_rtt(sent.elapsed(), RoundTripKind::Early { left: early_left });
                        // The next one right away (the sleep has elapsed).
                    }
                    // Gone: the keepalives find out and say why.
                    Err(_) => early_left = 0,
                }
            }
            _ = ticker.tick() => {
                let now = probe.activity();
                let heard = now != seen;
                seen = now;
                if pending.is_some() {
                    if heard {
                        // Not silent: the answer is queued behind data.
                        misses = 0;
                        continue;
                    }
                    misses += 1;
                    if misses >= max {
                        return Verdict::Silent { misses };
                    }
                } else {
                    pending = Some((Instant::now(), probe.probe()));
                }
            }
            (sent, answer) = answered(&mut pending) => {
                if let Err(why) = answer {
                    return Verdict::Gone(why);
                }
                misses = 0;
                on_rtt(sent.elapsed(), RoundTripKind::Keepalive);
            }
        }
    }
}

/// The answer to the probe in `slot` (sent at the instant beside it), and
/// when it was sent; the slot is empty after. Never resolves while the slot
/// is empty.
async fn answered(slot: &mut Option<(Instant, ProbeFuture)>) -> (Instant, Result<(), SessionGone>) {
    let answer = match slot.as_mut() {
        Some((_, probe)) => probe.await,
        None => std::future::pending().await,
    };
    let sent = slot.take().map_or_else(Instant::now, |(at, _)| at);
    (sent, answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    struct Silent;
    impl Probe for Silent {
        fn probe(&self) -> ProbeFuture {
            Box::pin(std::future::pending())
        }
    }

    struct Answers {
        delay: Duration,
        sent: Arc<AtomicU32>,
    }
    impl Probe for Answers {
        fn probe(&self) -> ProbeFuture {
            self.sent.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_declared_dead_within_interval_times_max_plus_one() {
        let interval = Duration::from_secs(15);
        let start = Instant::now();
        let verdict = run(&Silent, interval, 3, EarlyRoundTrips::NONE, |_, _| {}).await;
        assert!(
            matches!(verdict, Verdict::Silent { misses: 3 }),
            "{verdict:?}"
        );
        let took = start.elapsed();
        // Virtual time: deterministic. The last answer was at `start`.
        assert!(took <= interval * 4, "{took:?}");
        assert!(took >= interval * 3, "declared dead too early: {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answering_peer_reports_rtts_and_stays_alive() {
        let sent = Arc::new(AtomicU32::new(0));
        let probe = Answers {
            delay: Duration::from_millis(40),
            sent: sent.clone(),
        };
        let mut rtts = Vec::new();
        let outcome = tokio::time::timeout(
            Duration::from_secs(95),
            run(
                &probe,
                Duration::from_secs(10),
                3,
                EarlyRoundTrips::NONE,
                |rtt, _| rtts.push(rtt),
            ),
        )
        .await;
        assert!(
            outcome.is_err(),
            "an answering peer must never be declared dead"
        );
        assert_eq!(sent.load(Ordering::SeqCst), 9, "one keepalive per interval");
        assert_eq!(rtts.len(), 9);
        assert!(
            rtts.iter().all(|r| *r == Duration::from_millis(40)),
            "{rtts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_counts_misses_but_resets_them() {
        // Answers take 1.5 intervals: one miss each time, never `max`.
        let sent = Arc::new(AtomicU32::new(0));
        let probe = Answers {
            delay: Duration::from_secs(15),
            sent,
        };
        let outcome = tokio::time::timeout(
            Duration::from_secs(200),
            run(
                &probe,
                Duration::from_secs(10),
                2,
                EarlyRoundTrips::NONE,
                |_, _| {},
            ),
        )
        .await;
        assert!(
            outcome.is_err(),
            "one miss at a time must not kill the session"
        );
    }

    /// Never answers a keepalive, but sends (its activity counter moves)
    /// for `busy_for` of the test clock, then goes silent.
    struct BusyThenSilent {
        start: Instant,
        busy_for: Duration,
    }
    impl Probe for BusyThenSilent {
        fn probe(&self) -> ProbeFuture {
            Box::pin(std::future::pending())
        }
        fn activity(&self) -> u64 {
            // Moves with (virtual) time while busy, then freezes.
            let busy = self.start.elapsed().min(self.busy_for);
            busy.as_millis() as u64
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_keeps_sending_is_alive_until_it_goes_silent() {
        let interval = Duration::from_secs(1);
        let start = Instant::now();
        let probe = BusyThenSilent {
            start,
            busy_for: Duration::from_secs(30),
        };
        let verdict = run(&probe, interval, 2, EarlyRoundTrips::NONE, |_, _| {}).await;
        assert!(
            matches!(verdict, Verdict::Silent { misses: 2 }),
            "{verdict:?}"
        );
        let took = start.elapsed();
        // Alive for all 30 s of sending (no answer ever came), then dead
        // within interval x (max + 1) of the last thing it sent.
        assert!(took >= Duration::from_secs(30) + interval * 2, "{took:?}");
        assert!(took <= Duration::from_secs(30) + interval * 3, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_gone_session_ends_at_once() {
        struct Gone;
        impl Probe for Gone {
            fn probe(&self) -> ProbeFuture {
                Box::pin(async { Err(SessionGone::Closed) })
            }
        }
        let verdict = run(
            &Gone,
            Duration::from_secs(1),
            3,
            EarlyRoundTrips::NONE,
            |_, _| {},
        )
        .await;
        assert!(
            matches!(verdict, Verdict::Gone(SessionGone::Closed)),
            "{verdict:?}"
        );
    }

    const EARLY: EarlyRoundTrips = EarlyRoundTrips {
        after: Duration::from_secs(1),
        count: 3,
    };

    #[tokio::test(start_paused = true)]
    async fn early_round_trips_are_measured_one_after_another_before_the_first_keepalive() {
        let sent = Arc::new(AtomicU32::new(0));
        let probe = Answers {
            delay: Duration::from_millis(5),
            sent: sent.clone(),
        };
        let start = Instant::now();
        let mut seen = Vec::new();
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            run(&probe, Duration::from_secs(3600), 3, EARLY, |rtt, kind| {
                seen.push((start.elapsed(), rtt, kind))
            }),
        )
        .await;
        assert!(outcome.is_err(), "an answering peer stays alive");
        let ms = Duration::from_millis;
        assert_eq!(
            seen,
            [
                (ms(1005), ms(5), RoundTripKind::Early { left: 2 }),
                (ms(1010), ms(5), RoundTripKind::Early { left: 1 }),
                (ms(1015), ms(5), RoundTripKind::Early { left: 0 }),
            ]
        );
        assert_eq!(sent.load(Ordering::SeqCst), 3, "no keepalive within 5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_silent_from_the_start_is_declared_dead_with_an_early_round_trip_unanswered() {
        // The early round trip waits forever; the keepalives still decide.
        let interval = Duration::from_secs(15);
        let start = Instant::now();
        let mut rtts = 0;
        let verdict = run(&Silent, interval, 3, EARLY, |_, _| rtts += 1).await;
        assert!(
            matches!(verdict, Verdict::Silent { misses: 3 }),
            "{verdict:?}"
        );
        assert!(start.elapsed() <= interval * 4, "{:?}", start.elapsed());
        assert_eq!(rtts, 0);
    }
}
