//! Event-driven pickup: Prefect's worker finds a new run only when it next polls (every 10 s
//! by default). Cohort also listens for `prefect.flow-run.Scheduled` events of its work pool
//! and wakes the poller at once. The regular poll stays as the safety net.
//!
//! The event says nothing of when the run is due (its payload has the state's type and name
//! only, `prefect/server/models/events.py: state_payload`), and the run is not read back for
//! it: the poller's coalesced poll finds it, claims it when due, or sets a timer for when it
//! comes due (see `worker.rs`). A burst of events thus costs one poll, not a read per run.

use cohort_events::subscriber::{subscribe, SubscriberConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The server's event for a run entering Scheduled (`prefect/server/models/events.py`).
pub const SCHEDULED: &str = "prefect.flow-run.Scheduled";

/// The filter for a pool's Scheduled runs: the server relates them to `prefect.work-pool.<id>`.
pub fn filter(pool_id: Uuid) -> serde_json::Value {
    serde_json::json!({
        "event": {"name": [SCHEDULED]},
        "any_resource": {"id": [format!("prefect.work-pool.{pool_id}")]},
    })
}

/// Sends the id of each run of the pool seen entering Scheduled. Runs until `shutdown`.
pub async fn watch(feed: SubscriberConfig, wake: mpsc::Sender<Uuid>, shutdown: CancellationToken) {
    let (mut subscription, task) = subscribe(feed);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = subscription.events.recv() => match e {
                Some(e) => e,
                None => break,
            },
        };
        let Some(id) = event
            .resource
            .id()
            .strip_prefix("prefect.flow-run.")
            .and_then(|id| id.parse::<Uuid>().ok())
        else {
            continue;
        };
        tracing::debug!(flow_run = %id, "scheduled run seen; waking the poller");
        if wake.send(id).await.is_err() {
            break;
        }
    }
    drop(subscription);
    task.abort();
}
