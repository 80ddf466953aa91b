//! Waiting for the server at start-up, shared by workers and runners.

use std::future::Future;
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
/// waited for ([`while_starting`]); a wrong URL (a host that does not resolve, a path that
/// is not a Prefect API) or wrong credentials fail at once. (Prefect's worker also keeps
/// trying: "Unable to reach the Prefect API while starting up; the worker will keep
/// attempting to connect", `prefect/workers/base.py`.)
pub async fn wait_for_server(client: &PrefectClient) -> Result<String, NotReady> {
    let url = || client.api_url().to_string();
    match while_starting(client, "reading its version", || client.server_version()).await {
        Ok(v) => Ok(v),
        // No version endpoint there: not a Prefect API.
        Err(e) if e.is_not_found() => Err(NotReady::NotAnApi {
            url: url(),
            source: e,
        }),
        Err(e) if e.is_auth() => Err(NotReady::Unauthorized {
            url: url(),
            source: e,
        }),
        // Transient but not worth waiting for: a host that does not resolve.
        Err(e) if e.is_transient() => Err(NotReady::Unreachable {
            url: url(),
            source: e,
        }),
        Err(e) => Err(NotReady::Api(e)),
    }
}

/// Sends a start-up request (`what` names it in the log) until the server answers it. Once
/// the client's own retries are spent on a transient failure (a refused connection, a 503
/// from a SQLite server busy with other clients), it is sent again after a jittered
/// exponential backoff (1 s doubling to 30 s), as long as it takes: a worker starting beside
/// a busy server waits for it, as it waits for one that is down, instead of exiting. Any
/// other failure, and a host that does not resolve, is returned at once.
pub async fn while_starting<T, F, Fut>(
    client: &PrefectClient,
    what: &str,
    mut request: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match request().await {
            Err(e) if e.is_transient() && !e.is_unresolvable_host() => {
                let wait = backoff.next_delay();
                tracing::warn!(
                    error = %e,
                    "Unable to reach the Prefect API at {} while starting up ({what}); retrying in {:.1} s",
                    client.api_url(),
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            done => return done,
        }
    }
}
