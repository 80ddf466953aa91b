//! Jittered exponential reconnection delays (the shape of `kube-runtime`'s `DefaultBackoff`):
//! doubling from a base up to a cap, each delay drawn from its upper half so that many workers
//! restarted together do not reconnect in lockstep.

use std::time::Duration;

/// Reconnection delays; [`Backoff::reset`] after a healthy connection.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next attempt, advancing the sequence.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = delay_for(self.attempt, self.base, self.cap, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// The longest delay, for failures that retrying soon cannot fix (a rejected token).
    pub(crate) fn longest(&self) -> Duration {
        delay_for(u32::MAX, self.base, self.cap, fastrand::f64())
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `min(cap, base * 2^attempt)`, then "equal jitter": half of it fixed, the other half scaled
/// by `jitter` in `[0, 1)`. Never more than `cap`.
pub(crate) fn delay_for(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(31));
    let ceiling = base.saturating_mul(factor).min(cap);
    ceiling / 2 + (ceiling / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn doubles_from_the_base_and_stops_at_the_cap() {
        let ceilings: Vec<Duration> = (0..10).map(|a| delay_for(a, BASE, CAP, 1.0)).collect();
        let secs: Vec<f64> = ceilings.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(
            secs,
            [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
        );
        assert_eq!(delay_for(u32::MAX, BASE, CAP, 1.0), CAP);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        assert_eq!(delay_for(3, BASE, CAP, 0.0), Duration::from_secs(2));
        assert_eq!(delay_for(3, BASE, CAP, 0.5), Duration::from_secs(3));
        let mut backoff = Backoff::new(BASE, CAP);
        for attempt in 0..40 {
            let ceiling = delay_for(attempt, BASE, CAP, 1.0);
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "attempt {attempt}: {delay:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= BASE);
        assert!(backoff.longest() >= CAP / 2);
    }
}
