//! The runner webserver, enabled like Prefect's by `PREFECT_RUNNER_SERVER_ENABLE` (or
//! `--webserver`): `GET /health`, `GET /run_count`, `POST /shutdown`
//! (`prefect/runner/server.py`), plus `POST /deployment/{id}/run` to start a served
//! deployment now.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State as Extract};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use cohort_api::PrefectClient;
use cohort_supervise::LastPolled;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone)]
pub(crate) struct State {
    pub client: PrefectClient,
    pub last_polled: LastPolled,
    /// Healthy while the last poll is at most this old
    /// (`PREFECT_RUNNER_SERVER_MISSED_POLLS_TOLERANCE` × poll interval).
    pub window: Duration,
    pub running: Arc<AtomicUsize>,
    pub shutdown: CancellationToken,
    pub served: Vec<Uuid>,
}

pub(crate) async fn serve(
    addr: SocketAddr,
    state: State,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/run_count", get(run_count))
        .route("/shutdown", post(shutdown))
        .route("/deployment/{id}/run", post(run_deployment))
        .with_state(state);
    Ok(tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "runner webserver failed");
        }
    }))
}

async fn health(Extract(s): Extract<State>) -> (StatusCode, Json<Value>) {
    if s.last_polled.age() <= s.window {
        (StatusCode::OK, Json(json!({"message": "OK"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"message": "Runner is unresponsive at this time"})),
        )
    }
}

async fn run_count(Extract(s): Extract<State>) -> Json<usize> {
    Json(s.running.load(Ordering::Relaxed))
}

async fn shutdown(Extract(s): Extract<State>) -> Json<Value> {
    s.shutdown.cancel();
    Json(json!({"message": "OK"}))
}

async fn run_deployment(
    Extract(s): Extract<State>,
    Path(id): Path<Uuid>,
    body: Option<Json<Value>>,
) -> (StatusCode, Json<Value>) {
    if !s.served.contains(&id) {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"detail": format!("deployment {id} is not served by this runner")})),
        );
    }
    let body = body.map(|Json(b)| b).unwrap_or_else(|| json!({}));
    let mut create =
        json!({"parameters": body.get("parameters").cloned().unwrap_or_else(|| json!({}))});
    // A caller that repeats its own request (after a timeout) can pass a key of its own; without
    // one, the client makes one per request, repeated only by its own retries.
    if let Some(key) = body.get("idempotency_key").filter(|k| k.is_string()) {
        create["idempotency_key"] = key.clone();
    }
    match s.client.create_flow_run_from_deployment(id, &create).await {
        Ok(run) => (
            StatusCode::CREATED,
            Json(json!({"flow_run_id": run.id, "name": run.name})),
        ),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"detail": e.to_string()})),
        ),
    }
}
