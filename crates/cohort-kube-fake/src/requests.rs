//! The log of every request the emulator served, for tests that assert on exact requests or
//! count them.

use std::sync::Mutex;

use serde_json::Value;

/// How a request reached the emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Through [`crate::EmulatorService`] (for example `kube::Client::new`).
    InProcess,
    /// Through the loopback HTTP server.
    Http,
    /// Through the loopback HTTPS server, with the service account's bearer token
    /// ([`crate::Emulator::serve_in_cluster`]).
    Https,
}

/// One request as the emulator received it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The query parameters, URL-decoded, in order.
    pub query: Vec<(String, String)>,
    /// The body, when it is JSON.
    pub body: Option<Value>,
    /// How the request arrived.
    pub from: Transport,
}

impl RecordedRequest {
    /// The first value of a query parameter.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The log itself.
#[derive(Debug, Default)]
pub(crate) struct RequestLog {
    requests: Mutex<Vec<RecordedRequest>>,
}

impl RequestLog {
    pub fn record(&self, request: RecordedRequest) {
        self.lock().push(request);
    }

    pub fn all(&self) -> Vec<RecordedRequest> {
        self.lock().clone()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedRequest>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }
}
