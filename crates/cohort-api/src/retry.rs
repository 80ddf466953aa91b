//! Jittered exponential backoff, applied by callers around a component (never inside it).

use std::time::Duration;

/// Exponential backoff with full jitter between `base · 2ⁿ · (1 ± jitter)`, capped at `max`.
/// Callers `reset()` it after a healthy period, as kube-runtime's `DefaultBackoff` does.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: 0.2,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.max);
        jittered(capped, self.jitter)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `d` scaled by a random factor in `[1 - jitter, 1 + jitter]`.
pub fn jittered(d: Duration, jitter: f64) -> Duration {
    let factor = 1.0 + jitter * (2.0 * rand::random::<f64>() - 1.0);
    d.mul_f64(factor.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(
            delays[0] >= Duration::from_millis(800) && delays[0] <= Duration::from_millis(1200)
        );
        assert!(
            delays[2] >= Duration::from_millis(3200) && delays[2] <= Duration::from_millis(4800)
        );
        for d in &delays[3..] {
            assert!(*d <= Duration::from_millis(9600), "{d:?} above cap");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
