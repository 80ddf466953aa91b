//! The `--with-healthcheck` web server. `GET /health` answers like Prefect's worker
//! (`prefect/workers/server.py`): OK while the last successful poll is recent, 503 otherwise.
//! Cohort adds liveness and readiness apart, for orchestrators that restart on one and route
//! on the other: `GET /livez` is OK while the poll loop turns, server reachable or not (a
//! restart would not bring the server back), and the claim journal is writable (after a
//! write error it must be reopened: a restart does that); `GET /readyz` is OK while the last
//! poll succeeded within three poll intervals and claims can be journaled.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;

/// When the poller last completed a poll, shared between the poller and the health endpoint.
#[derive(Debug, Clone)]
pub struct LastPolled {
    start: tokio::time::Instant,
    millis: Arc<AtomicU64>,
}

impl Default for LastPolled {
    fn default() -> Self {
        Self::new()
    }
}

impl LastPolled {
    /// Counts as polled now: Prefect also treats start-up as a poll.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            millis: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.millis.store(ms, Ordering::Relaxed);
    }

    pub fn age(&self) -> Duration {
        let then = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(then)
    }
}

/// What the health endpoints look at.
#[derive(Debug, Clone)]
pub struct Probes {
    /// The last successful poll.
    pub last_polled: LastPolled,
    /// The last poll attempt, successful or not.
    pub loop_turned: LastPolled,
    /// Prefect's `/health` window (30 poll intervals).
    pub window: Duration,
    /// The poll interval.
    pub interval: Duration,
    /// The claim journal, whose last write must have succeeded.
    pub journal: Journal,
}

fn answer(ok: bool, failing: serde_json::Value) -> (StatusCode, Json<serde_json::Value>) {
    if ok {
        (StatusCode::OK, Json(json!({"message": "OK"})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(failing))
    }
}

/// Binds now (so a taken port fails start-up with a clear error) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    probes: Probes,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let (health, live, ready) = (probes.clone(), probes.clone(), probes);
    let app = Router::new()
        .route(
            "/health",
            get(move || {
                let ok = health.last_polled.age() <= health.window;
                async move {
                    answer(
                        ok,
                        json!({"message": "Worker may be unresponsive at this time"}),
                    )
                }
            }),
        )
        .route(
            "/livez",
            get(move || {
                // A poll that hangs longer than the client's timeouts and retries would be a
                // stuck loop; an unreachable server is not. A journal that failed a write is
                // not usable again until it is reopened (redb's rule after an I/O error), so
                // a restart is what helps.
                let turning =
                    live.loop_turned.age() <= live.interval * 3 + Duration::from_secs(300);
                let journal = live.journal.is_healthy();
                async move {
                    answer(
                        turning && journal,
                        json!({
                            "message": "not live",
                            "poll_loop_turning": turning,
                            "journal_writable": journal,
                        }),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let polled = ready.last_polled.age() <= ready.interval * 3;
                let journal = ready.journal.is_healthy();
                async move {
                    answer(
                        polled && journal,
                        json!({
                            "message": "not ready",
                            "server_reachable": polled,
                            "journal_writable": journal,
                        }),
                    )
                }
            }),
        );
    Ok(tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "healthcheck server failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn age_tracks_touches() {
        let lp = LastPolled::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(lp.age(), Duration::from_secs(5));
        lp.touch();
        assert_eq!(lp.age(), Duration::ZERO);
    }
}
