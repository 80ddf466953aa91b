//! The server's clean-ups over the worker channel (`cleanup_delivery.v1`): when a run stays
//! Cancelling past the server's timeout, the server marks it Cancelled and asks a worker of the
//! pool to tear its infrastructure down (`cancelling_timeout_teardown.v1`,
//! `prefect/server/services/cancellation_cleanup.py`). The worker stops what the identifier names
//! and acks, or releases with Prefect's reason (`prefect/workers/_cleanup_handlers.py:
//! CancellingTimeoutTeardownHandler`), renewing its lease while the stop takes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cohort_api::PrefectClient;
use cohort_infra::{Infrastructure, KillError};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The capability a worker requests to be sent clean-ups.
pub const CAPABILITY: &str = "cleanup_delivery.v1";
/// The one kind of clean-up Prefect's workers handle.
pub const CANCELLING_TIMEOUT_TEARDOWN: &str = "cancelling_timeout_teardown.v1";
/// `CancellingTimeoutTeardownHandler(grace_seconds=30)`.
const GRACE: Duration = Duration::from_secs(30);
/// A lease is renewed this long before it runs out (`WorkerCleanupExecutor`'s buffer).
const RENEW_BEFORE: Duration = Duration::from_secs(5);
/// The server's lease on a delivery, assumed again after each renewal.
const LEASE: Duration = Duration::from_secs(30);

/// A frame for the channel to send: its type and payload.
pub type Reply = (&'static str, Value);

/// Handles the clean-ups of one channel connection, one at a time (`max_cleanup_concurrency`
/// is 1, as Prefect's).
pub struct Cleaner {
    client: PrefectClient,
    infra: Arc<dyn Infrastructure>,
    busy: Arc<AtomicBool>,
    replies: mpsc::UnboundedSender<Reply>,
}

impl Cleaner {
    pub fn new(
        client: PrefectClient,
        infra: Arc<dyn Infrastructure>,
    ) -> (Self, mpsc::UnboundedReceiver<Reply>) {
        let (replies, rx) = mpsc::unbounded_channel();
        let cleaner = Self {
            client,
            infra,
            busy: Arc::default(),
            replies,
        };
        (cleaner, rx)
    }

    /// A `cleanup.message.v1` payload: answered at once when it cannot be handled, else in a
    /// task whose ack, release and renewals come back through the replies.
    pub fn handle(&self, payload: &Value) {
        let operation = json!({
            "message_id": payload["message_id"],
            "reservation_token": payload["reservation_token"],
        });
        if payload["kind"] != CANCELLING_TIMEOUT_TEARDOWN {
            let _ = self
                .replies
                .send(release(&operation, "unsupported_cleanup_kind"));
            return;
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            let _ = self
                .replies
                .send(release(&operation, "concurrency_limit_reached"));
            return;
        }
        let (client, infra, busy, replies) = (
            self.client.clone(),
            self.infra.clone(),
            self.busy.clone(),
            self.replies.clone(),
        );
        let target = payload["target"].clone();
        let lease_ends = lease_remaining(payload["lease_expires_at"].as_str());
        tokio::spawn(async move {
            let work = teardown(&client, infra.as_ref(), &target);
            tokio::pin!(work);
            let mut renew_at =
                tokio::time::Instant::now() + lease_ends.saturating_sub(RENEW_BEFORE);
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = tokio::time::sleep_until(renew_at) => {
                        let _ = replies.send(("cleanup.renew.v1", operation.clone()));
                        renew_at = tokio::time::Instant::now() + LEASE.saturating_sub(RENEW_BEFORE);
                    }
                }
            };
            let reply = match result {
                Ok(()) => ("cleanup.ack.v1", operation),
                Err(reason) => release(&operation, reason),
            };
            let _ = replies.send(reply);
            busy.store(false, Ordering::SeqCst);
        });
    }
}

fn release(operation: &Value, reason: &str) -> Reply {
    let mut payload = operation.clone();
    payload["reason"] = json!(reason);
    ("cleanup.release.v1", payload)
}

/// How long the delivery's lease has left (its `lease_expires_at`, or a full lease).
fn lease_remaining(expires_at: Option<&str>) -> Duration {
    expires_at
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|t| {
            (t.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .ok()
        })
        .unwrap_or(LEASE)
}

/// `CancellingTimeoutTeardownHandler.cleanup`: the release reason when it cannot be done.
async fn teardown(
    client: &PrefectClient,
    infra: &dyn Infrastructure,
    target: &Value,
) -> Result<(), &'static str> {
    let Some(id) = target["flow_run_id"]
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
    else {
        return Err("invalid_payload");
    };
    let run = match client.read_flow_run(id).await {
        Ok(run) => run,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => {
            tracing::warn!(flow_run = %id, error = %e, "cannot read the flow run of a clean-up");
            return Err("handler_failed");
        }
    };
    let Some(identifier) = target["infrastructure_pid"]
        .as_str()
        .filter(|p| !p.is_empty())
    else {
        return match run.infrastructure_pid.as_deref() {
            None | Some("") => Ok(()),
            Some(_) => Err("missing_infrastructure_handle"),
        };
    };
    tracing::info!(flow_run = %id, infrastructure = identifier, "stopping the infrastructure of a run the server cancelled after its Cancelling timeout");
    match infra.kill(identifier, GRACE).await {
        Ok(()) | Err(KillError::NotFound) => Ok(()),
        Err(KillError::Unsupported) => Err("unsupported_worker_type"),
        Err(KillError::Unavailable(why)) => {
            tracing::warn!(flow_run = %id, %why, "clean-up could not reach the infrastructure");
            Err("infrastructure_not_available")
        }
    }
}
