//! Typed errors of the API client, classified for retry decisions.

use reqwest::StatusCode;

/// An error talking to the Prefect API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request never got an HTTP answer (refused, reset, timed out, DNS).
    /// Retryable once the server has been reached at least once.
    #[error("{method} {url} got no answer")]
    Transport {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with a non-success status. Retryable for 408, 429, 500, 502, 503, 504.
    #[error("{method} {path} failed with {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: StatusCode,
        body: String,
    },
    /// The server answered 2xx with a body Cohort could not read. Not retryable.
    #[error("unexpected response to {path}: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The configured API URL cannot be used. Not retryable.
    #[error("invalid Prefect API URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
}

impl ApiError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// 401/403: a wrong key or auth string; retrying will not help.
    pub fn is_auth(&self) -> bool {
        matches!(
            self.status(),
            Some(StatusCode::UNAUTHORIZED) | Some(StatusCode::FORBIDDEN)
        )
    }

    /// A transport failure because the host name does not resolve: a wrong URL rather than a
    /// server that is down. (reqwest reports it as a connect error; the resolver's message
    /// is the only tell.)
    pub fn is_unresolvable_host(&self) -> bool {
        let ApiError::Transport { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&dyn std::error::Error> = Some(source);
        while let Some(e) = cause {
            let text = e.to_string();
            if text.contains("dns error") || text.contains("failed to lookup address") {
                return true;
            }
            cause = e.source();
        }
        false
    }

    /// Whether the same request may succeed later: transport failures and busy-server statuses.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Transport { .. } => true,
            ApiError::Status { status, .. } => is_transient_status(*status),
            ApiError::Decode { .. } | ApiError::InvalidUrl { .. } => false,
        }
    }
}

/// Statuses a busy or restarting server answers. Prefect's client retries 408, 429, 502 and 503
/// (`prefect/client/base.py: PrefectHttpxAsyncClient.send`); Cohort adds 500 and 504 because a
/// SQLite-backed server under load answers those too. Whether a request is actually repeated
/// also depends on what a repeat would do: [`crate::retry::Retry`].
pub(crate) fn is_transient_status(status: StatusCode) -> bool {
    crate::retry::Retry::Idempotent.retries_status(status)
}
