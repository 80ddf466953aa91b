//! The `--with-healthcheck` web server: `GET /health` answers like Prefect's worker
//! (`prefect/workers/server.py`): OK while the last poll is recent, 503 otherwise.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

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

/// Binds now (so a taken port fails start-up with a clear error) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    last_polled: LastPolled,
    window: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new().route(
        "/health",
        get(move || {
            let last_polled = last_polled.clone();
            async move {
                if last_polled.age() <= window {
                    (StatusCode::OK, Json(json!({"message": "OK"})))
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"message": "Worker may be unresponsive at this time"})),
                    )
                }
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
