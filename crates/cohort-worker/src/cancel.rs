//! Cancelling a running flow run: who is cancellable, how a cancel request reaches its
//! supervisor (the `/api/events/out` feed, with polling while the feed is down), and how the
//! run is finished as Cancelled (`prefect/runner/_cancellation_manager.py: CancellationManager`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_api::models::{StateCreate, StateType};
use cohort_api::PrefectClient;
use cohort_events::subscriber::{subscribe, SubscriberConfig};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Server events that mean "stop this run": Prefect listens for `Cancelling` only; a run
/// forced straight to `Cancelled` while its process still runs must be stopped too.
pub const CANCEL_EVENTS: [&str; 2] = ["prefect.flow-run.Cancelling", "prefect.flow-run.Cancelled"];

/// The flow runs this process supervises, each with the token that cancels it.
#[derive(Debug, Clone, Default)]
pub struct Cancellable {
    runs: Arc<Mutex<HashMap<Uuid, CancellationToken>>>,
}

impl Cancellable {
    pub fn register(&self, id: Uuid) -> CancellationToken {
        let token = CancellationToken::new();
        self.lock().insert(id, token.clone());
        token
    }

    pub fn remove(&self, id: &Uuid) {
        self.lock().remove(id);
    }

    /// Requests cancellation of `id`; false when it is not ours.
    pub fn cancel(&self, id: &Uuid) -> bool {
        match self.lock().get(id) {
            Some(token) => {
                if !token.is_cancelled() {
                    tracing::info!(flow_run = %id, "cancellation requested");
                    token.cancel();
                }
                true
            }
            None => false,
        }
    }

    fn ids(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, CancellationToken>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watches for cancellations of `cancellable` runs until `shutdown`: the events feed while it
/// is connected, `POST /flow_runs/filter` every `poll_interval` while it is not
/// (`prefect/_internal/observers.py: FlowRunCancellingObserver`).
pub async fn watch(
    client: PrefectClient,
    feed: SubscriberConfig,
    cancellable: Cancellable,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    let (mut subscription, task) = subscribe(feed);
    let mut poll = tokio::time::interval(poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The server does not confirm a subscription, so an event published while it was being
    // set up can be missed: poll once after each (re)connection, and all along while down.
    let mut polled_since_connect = false;
    loop {
        let connected = *subscription.connected.borrow();
        if !connected {
            polled_since_connect = false;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Ok(()) = subscription.connected.changed() => {}
            event = subscription.events.recv() => match event {
                Some(event) => {
                    let id = event
                        .resource
                        .id()
                        .strip_prefix("prefect.flow-run.")
                        .and_then(|id| id.parse::<Uuid>().ok());
                    if let Some(id) = id {
                        cancellable.cancel(&id);
                    }
                }
                None => break,
            },
            _ = poll.tick(), if !connected || !polled_since_connect => {
                polled_since_connect = connected;
                let ids = cancellable.ids();
                if ids.is_empty() {
                    continue;
                }
                match client
                    .flow_runs_in_states(&ids, &[StateType::Cancelling, StateType::Cancelled])
                    .await
                {
                    Ok(runs) => runs.iter().for_each(|r| {
                        cancellable.cancel(&r.id);
                    }),
                    Err(e) => tracing::warn!(error = %e, "could not poll for cancelled flow runs"),
                }
            }
        }
    }
    drop(subscription);
    task.abort();
}

/// Makes the run durably Cancelled after its process is gone, forcing it over whatever the
/// engine wrote on its way out (a SIGTERM without an acknowledged intent makes the engine
/// write Crashed); true when it is Cancelled — then, and only then, the cancelled-flow-run
/// event is due (`CancellationManager.finalize_cancelled_state`).
pub async fn finalize_cancelled(client: &PrefectClient, id: Uuid, message: &str) -> bool {
    let current = client
        .read_flow_run(id)
        .await
        .ok()
        .and_then(|run| run.state.map(|s| s.state_type));
    if current == Some(StateType::Cancelled) {
        return true;
    }
    let state = StateCreate::new(StateType::Cancelled, "Cancelled").with_message(message);
    if let Err(e) = client.set_flow_run_state(id, &state, true).await {
        tracing::error!(flow_run = %id, error = %e, "could not mark the run Cancelled");
        match client.read_flow_run(id).await.ok().and_then(|r| r.state) {
            Some(s) if s.state_type == StateType::Cancelled => return true,
            Some(s) if s.state_type.is_final() => return false,
            _ => {}
        }
        let crashed = StateCreate::new(StateType::Crashed, "Crashed").with_message(
            "Flow run process exited after a cancellation request, but the runner could not durably persist a Cancelled terminal state.",
        );
        let _ = client.set_flow_run_state(id, &crashed, false).await;
        return false;
    }
    true
}
