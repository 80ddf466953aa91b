//! Injected faults: requests answered with an error status instead of being served, and
//! requests served whose response is then lost.

use std::sync::Mutex;

/// What to do to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer with this status code and a `Status` body; the request has no effect.
    Fail(u16),
    /// Serve the request, then close the connection without a response.
    LoseResponse,
}

#[derive(Debug)]
struct Rule {
    method: String,
    target_contains: String,
    fault: Fault,
    remaining: usize,
}

/// The pending faults, consumed in the order they were added.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    rules: Mutex<Vec<Rule>>,
}

impl Faults {
    /// Applies `fault` to the next `times` requests with this method whose path and query
    /// (`/api/v1/pods?watch=true`) contain `target_contains`.
    pub fn add(&self, method: &str, target_contains: &str, fault: Fault, times: usize) {
        if times == 0 {
            return;
        }
        self.lock().push(Rule {
            method: method.to_ascii_uppercase(),
            target_contains: target_contains.to_owned(),
            fault,
            remaining: times,
        });
    }

    /// The fault for this request, if one is pending; consumes one use of it.
    pub fn take(&self, method: &str, target: &str) -> Option<Fault> {
        let mut rules = self.lock();
        let i = rules
            .iter()
            .position(|r| r.method == method && target.contains(&r.target_contains))?;
        let fault = rules[i].fault;
        rules[i].remaining -= 1;
        if rules[i].remaining == 0 {
            rules.remove(i);
        }
        Some(fault)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_used_up() {
        let f = Faults::default();
        f.add("post", "/jobs", Fault::Fail(503), 2);
        assert_eq!(f.take("GET", "/apis/batch/v1/namespaces/x/jobs"), None);
        assert_eq!(
            f.take("POST", "/apis/batch/v1/namespaces/x/jobs"),
            Some(Fault::Fail(503))
        );
        assert_eq!(
            f.take("POST", "/apis/batch/v1/namespaces/x/jobs"),
            Some(Fault::Fail(503))
        );
        assert_eq!(f.take("POST", "/apis/batch/v1/namespaces/x/jobs"), None);
    }
}
