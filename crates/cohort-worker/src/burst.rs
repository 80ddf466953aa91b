//! Bursts of runs being scheduled on the pool, as its `prefect.flow-run.Scheduled` events
//! tell: a client creating many runs one after another. On SQLite every write waits for the
//! one before, and a write that waits too long is answered 503, which the client then sends
//! again: a worker's writes in the middle of a burst slow its creation. So the poll for a
//! burst waits for it to end (see `worker.rs`): on an idle pool the first run scheduled is
//! polled for after [`SETTLE`], which a burst's next run mostly comes within; and a run
//! claimed as a burst begins (its next run later than that) holds its later writes and its
//! launch until the burst is over.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A burst of runs is over when no run has been scheduled on the pool for this long. The
/// server delivers events in clumps under load, hence not much less than a second.
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// The longest a burst is waited for (a client that keeps creating runs).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(5);

/// How long an idle pool's first scheduled run waits for a second, which would make it a
/// burst, before it is polled for: a client creating runs one after another creates one
/// every 30-80 ms on a small machine. It adds to a lone run's pickup latency, which stays
/// under 200 ms with it.
pub(crate) const SETTLE: Duration = Duration::from_millis(60);

/// A run scheduled this long after a lone run (already polled for after [`SETTLE`]) is
/// lone too, not the second of a burst: a client creating runs one after another creates
/// the second well within it. Held as a burst's, it waited a quiet second for a poll and its
/// launch. A client slower than this between its first runs costs a poll per run, as lone
/// runs do, until two come within it; from then on it is a burst, whatever its pace.
pub(crate) const APART: Duration = Duration::from_millis(300);

/// The pool's runs scheduled lately; shared by the poller, which books them, and the runs'
/// tasks, which wait for a burst to be over.
#[derive(Debug, Default)]
pub(crate) struct Burst {
    seen: Mutex<Option<Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    first: Instant,
    last: Instant,
    runs: u32,
}

impl Burst {
    /// Books a run scheduled at `now`; returns whether the pool was quiet before it (no run
    /// scheduled for [`QUIET`], or a lone one more than [`APART`] before).
    pub(crate) fn scheduled(&self, now: Instant) -> bool {
        let mut seen = self.seen.lock().expect("burst lock poisoned");
        let quiet = seen.is_none_or(|s| {
            let since = now.saturating_duration_since(s.last);
            since >= QUIET || (s.runs == 1 && since >= APART)
        });
        *seen = Some(match *seen {
            Some(s) if !quiet => Seen {
                last: now,
                runs: s.runs + 1,
                ..s
            },
            _ => Seen {
                first: now,
                last: now,
                runs: 1,
            },
        });
        quiet
    }

    /// When the run scheduled last was, if any was.
    pub(crate) fn last(&self) -> Option<Instant> {
        self.seen
            .lock()
            .expect("burst lock poisoned")
            .map(|s| s.last)
    }

    /// When the burst being scheduled (more than one run less than [`QUIET`] apart) is over:
    /// `None` with none in progress at `now`.
    pub(crate) fn over_at(&self, now: Instant) -> Option<Instant> {
        let seen = (*self.seen.lock().expect("burst lock poisoned"))?;
        let at = (seen.last + QUIET).min(seen.first + MAX_WAIT);
        (seen.runs > 1 && at > now).then_some(at)
    }

    /// Whether a burst (more than one run) was scheduled, its last run less than [`QUIET`] and
    /// `window` before `now`: one in progress, or just over.
    pub(crate) fn within(&self, now: Instant, window: Duration) -> bool {
        self.seen
            .lock()
            .expect("burst lock poisoned")
            .is_some_and(|s| s.runs > 1 && now.saturating_duration_since(s.last) < QUIET + window)
    }

    /// Waits until no burst is being scheduled.
    pub(crate) async fn over(&self) {
        while let Some(at) = self.over_at(Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lone_run_is_no_burst() {
        let burst = Burst::default();
        assert!(burst.scheduled(Instant::now()));
        assert_eq!(burst.over_at(Instant::now()), None);
        tokio::time::sleep(QUIET * 2).await;
        // A run after a quiet spell starts afresh.
        assert!(burst.scheduled(Instant::now()));
        assert_eq!(burst.over_at(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_well_after_a_lone_run_is_lone_too() {
        let burst = Burst::default();
        assert!(burst.scheduled(Instant::now()));
        tokio::time::sleep(APART).await;
        assert!(burst.scheduled(Instant::now()), "a second lone run");
        assert_eq!(burst.over_at(Instant::now()), None);
        // Within it of a lone run: a burst, which a third run as late does not end.
        tokio::time::sleep(APART - Duration::from_millis(1)).await;
        assert!(!burst.scheduled(Instant::now()));
        assert!(burst.over_at(Instant::now()).is_some());
        tokio::time::sleep(APART).await;
        assert!(!burst.scheduled(Instant::now()), "a burst's third run");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_over_a_quiet_spell_after_its_last_run() {
        let burst = Burst::default();
        let start = Instant::now();
        burst.scheduled(start);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!burst.scheduled(Instant::now()));
        assert_eq!(
            burst.over_at(Instant::now()),
            Some(start + Duration::from_millis(50) + QUIET)
        );
        let waiter = tokio::spawn(async move {
            burst.over().await;
            Instant::now()
        });
        assert_eq!(
            waiter.await.unwrap(),
            start + Duration::from_millis(50) + QUIET
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_goes_on_is_waited_for_at_most_max_wait() {
        let burst = std::sync::Arc::new(Burst::default());
        let start = Instant::now();
        let feeder = {
            let burst = burst.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    burst.scheduled(Instant::now());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        burst.over().await;
        assert_eq!(Instant::now(), start + MAX_WAIT);
        feeder.abort();
    }
}
