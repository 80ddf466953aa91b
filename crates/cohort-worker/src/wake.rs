//! Event-driven pickup: Prefect's worker finds a new run only when it next polls (every 10 s
//! by default). Cohort also listens for `prefect.flow-run.Scheduled` events of its work pool
//! and wakes the poller at once. The regular poll stays as the safety net.
//!
//! The event says nothing of when the run is due (its payload has the state's type and name
//! only, `prefect/server/models/events.py: state_payload`), and the run is not read back for
//! it: the poller's coalesced poll finds it, claims it when due, or sets a timer for when it
//! comes due (see `worker.rs`). A burst of events thus costs one poll, not a read per run.
//!
//! The pool's `prefect.flow-run.Pending` events come too: a run claimed (by this worker or
//! another of the pool) needs no poll any more, and claims by others tell the poller it has
//! rivals. The pool's `prefect.worker.submitted-flow-run`, `started` and `stopped` events name
//! the workers taking part, and those leaving (see [`crate::peers`]).

use cohort_events::subscriber::{subscribe, SubscriberConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The server's event for a run entering Scheduled (`prefect/server/models/events.py`).
pub const SCHEDULED: &str = "prefect.flow-run.Scheduled";

/// The server's event for a run entering Pending: a worker's claim (`BaseWorker._propose_pending_state`).
pub const PENDING: &str = "prefect.flow-run.Pending";

/// A worker's event for a run it took up (`BaseWorker._emit_flow_run_submitted_event`); it
/// relates the run's work pool.
pub const SUBMITTED: &str = cohort_events::names::WORKER_SUBMITTED_FLOW_RUN;

/// A worker's events for starting and stopping; they relate its work pool.
pub const STARTED: &str = cohort_events::names::WORKER_STARTED;
pub const STOPPED: &str = cohort_events::names::WORKER_STOPPED;

/// What the poller learns from the pool's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A run entered Scheduled.
    Scheduled(Uuid),
    /// A run was claimed (it entered Pending), by this worker or another.
    Claimed(Uuid),
    /// A worker, by name, is active on the pool: it started, or submitted a run of it.
    Active(String),
    /// A worker, by name, stopped.
    Stopped(String),
}

/// The filter for a pool's runs entering Scheduled and Pending, and its workers' submissions,
/// starts and stops: the server relates them to `prefect.work-pool.<id>`.
pub fn filter(pool_id: Uuid) -> serde_json::Value {
    serde_json::json!({
        "event": {"name": [SCHEDULED, PENDING, SUBMITTED, STARTED, STOPPED]},
        "any_resource": {"id": [format!("prefect.work-pool.{pool_id}")]},
    })
}

/// Sends what it sees of the pool's runs entering Scheduled or Pending. Runs until `shutdown`.
pub async fn watch(feed: SubscriberConfig, wake: mpsc::Sender<Seen>, shutdown: CancellationToken) {
    let (mut subscription, task) = subscribe(feed);
    let metrics = cohort_metrics::metrics();
    loop {
        metrics.event_feed("wake", *subscription.connected.borrow());
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            Ok(()) = subscription.connected.changed() => continue,
            e = subscription.events.recv() => match e {
                Some(e) => e,
                None => break,
            },
        };
        if [SUBMITTED, STARTED, STOPPED].contains(&event.event.as_str()) {
            let Some(name) = event.resource.name() else {
                continue;
            };
            let seen = match event.event == STOPPED {
                true => Seen::Stopped(name.to_owned()),
                false => Seen::Active(name.to_owned()),
            };
            if wake.send(seen).await.is_err() {
                break;
            }
            continue;
        }
        let Some(id) = event
            .resource
            .id()
            .strip_prefix("prefect.flow-run.")
            .and_then(|id| id.parse::<Uuid>().ok())
        else {
            continue;
        };
        let seen = if event.event == SCHEDULED {
            tracing::debug!(flow_run = %id, "scheduled run seen; waking the poller");
            Seen::Scheduled(id)
        } else {
            Seen::Claimed(id)
        };
        if wake.send(seen).await.is_err() {
            break;
        }
    }
    metrics.event_feed("wake", false);
    drop(subscription);
    task.abort();
}
