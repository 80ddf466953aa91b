//! Event-driven pickup: Prefect's worker finds a new run only when it next polls (every 10 s
//! by default). Cohort also listens for `prefect.flow-run.Scheduled` events of its work pool
//! and wakes the poller at once — or, for a run scheduled later, when it enters the prefetch
//! window. The regular poll stays as the safety net.

use std::time::Duration;

use cohort_api::PrefectClient;
use cohort_events::subscriber::{subscribe, SubscriberConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;
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

/// Sends the instant at which the poller should next run for each Scheduled run seen:
/// now for runs due within `prefetch`, else when they come due. Runs until `shutdown`.
pub async fn watch(
    client: PrefectClient,
    feed: SubscriberConfig,
    prefetch: Duration,
    wake: mpsc::Sender<Instant>,
    shutdown: CancellationToken,
) {
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
        let at = match client.read_flow_run(id).await {
            Ok(run) => {
                let due = run.next_scheduled_start_time.or(run.expected_start_time);
                let wait = due
                    .map(|t| {
                        t - chrono::Utc::now()
                            - chrono::Duration::from_std(prefetch).unwrap_or_default()
                    })
                    .and_then(|d| d.to_std().ok())
                    .unwrap_or(Duration::ZERO);
                Instant::now() + wait
            }
            // Cannot tell when: look now, the poll sorts it out.
            Err(_) => Instant::now(),
        };
        tracing::debug!(flow_run = %id, "scheduled run seen; waking the poller");
        if wake.send(at).await.is_err() {
            break;
        }
    }
    drop(subscription);
    task.abort();
}
