//! Jittered exponential backoff, applied by callers around a component (never inside it), and
//! the retry policy of each API request: what sending it twice would do on the server.

use std::time::Duration;

use reqwest::StatusCode;

/// Whether a failed request may be sent again, which depends on what a second copy would do
/// if the first one reached the server and acted before the answer was lost (a 504 from a
/// proxy, a timeout, a connection reset). Every request of [`crate::PrefectClient`] names its
/// policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A second copy changes nothing: reads and filters, upserts by name (`POST /flows/`,
    /// `POST /deployments/`), PATCHes that set values, worker heartbeats, a flow-run create
    /// carrying an idempotency key, a state proposal carrying a transition id. Retried on
    /// every transient failure: transport errors and 408, 429, 500, 502, 503, 504.
    Idempotent,
    /// Every copy that reaches the server acts (`POST /logs/`: the server keeps no key to
    /// tell a repeat). Retried only when the failure says the server did not act: no
    /// connection was made, 429 (turned away before being handled), or 503 (Prefect's answer
    /// to a database error whose transaction was rolled back, `prefect/server/api/server.py:
    /// custom_internal_exception_handler`). After a timeout, a reset connection or another
    /// 5xx the request is not repeated: losing it is preferred to doing it twice.
    UnlessActed,
}

impl Retry {
    /// Whether an answer with `status` may be followed by another copy of the request.
    pub fn retries_status(self, status: StatusCode) -> bool {
        match self {
            Retry::Idempotent => matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504),
            Retry::UnlessActed => matches!(status.as_u16(), 429 | 503),
        }
    }

    /// Whether a request that got no answer may be sent again. `connect` says the failure
    /// happened while connecting, so nothing was sent.
    pub fn retries_unanswered(self, connect: bool) -> bool {
        match self {
            Retry::Idempotent => true,
            Retry::UnlessActed => connect,
        }
    }
}

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
    fn requests_that_act_are_repeated_only_when_the_server_did_not_act() {
        let all = [408, 429, 500, 502, 503, 504].map(|s| StatusCode::from_u16(s).unwrap());
        for status in all {
            assert!(Retry::Idempotent.retries_status(status), "{status}");
        }
        let retried: Vec<u16> = all
            .iter()
            .filter(|s| Retry::UnlessActed.retries_status(**s))
            .map(StatusCode::as_u16)
            .collect();
        assert_eq!(retried, [429, 503]);
        for status in [400, 404, 409, 422] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(!Retry::Idempotent.retries_status(status), "{status}");
            assert!(!Retry::UnlessActed.retries_status(status), "{status}");
        }
        assert!(Retry::Idempotent.retries_unanswered(false));
        assert!(Retry::UnlessActed.retries_unanswered(true));
        assert!(!Retry::UnlessActed.retries_unanswered(false));
    }

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
