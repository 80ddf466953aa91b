//! Waiting for the server at start-up, shared by workers and runners.

use std::time::Duration;

use crate::retry::Backoff;
use crate::{ApiError, PrefectClient};

/// Why the server will not do, however long we wait: retrying with the same settings cannot
/// help.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(
        "cannot reach the Prefect API at {url} (check PREFECT_API_URL, and that the server is up)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: ApiError,
    },
    #[error("the Prefect API at {url} refused the credentials (check PREFECT_API_KEY or PREFECT_API_AUTH_STRING)")]
    Unauthorized {
        url: String,
        #[source]
        source: ApiError,
    },
    #[error("{url} is not a Prefect API (check PREFECT_API_URL; it usually ends in /api)")]
    NotAnApi {
        url: String,
        #[source]
        source: ApiError,
    },
    #[error(transparent)]
    Api(ApiError),
}

/// The server's version, once it answers. A server that is down, restarting or busy is
/// waited for with jittered exponential backoff (1 s doubling to 30 s), as long as it takes;
/// a wrong URL (a host that does not resolve, a path that is not a Prefect API) or wrong
/// credentials fail at once. (Prefect's worker also keeps trying: "Unable to reach the
/// Prefect API while starting up; the worker will keep attempting to connect",
/// `prefect/workers/base.py`.)
pub async fn wait_for_server(client: &PrefectClient) -> Result<String, NotReady> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let url = || client.api_url().to_string();
    loop {
        match client.server_version().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && !e.is_unresolvable_host() => {
                let wait = backoff.next_delay();
                tracing::warn!(
                    error = %e,
                    "Unable to reach the Prefect API at {} while starting up; retrying in {:.1} s",
                    client.api_url(),
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            // No version endpoint there: not a Prefect API.
            Err(e) if e.is_not_found() => {
                return Err(NotReady::NotAnApi {
                    url: url(),
                    source: e,
                })
            }
            Err(e) if e.is_auth() => {
                return Err(NotReady::Unauthorized {
                    url: url(),
                    source: e,
                })
            }
            // Transient but not worth waiting for: a host that does not resolve.
            Err(e) if e.is_transient() => {
                return Err(NotReady::Unreachable {
                    url: url(),
                    source: e,
                })
            }
            Err(e) => return Err(NotReady::Api(e)),
        }
    }
}
