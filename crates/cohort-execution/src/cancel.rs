//! Cancelling a running flow run: who is cancellable, how a cancel request reaches its
//! supervisor (the `/api/events/out` feed, with polling while the feed is down), and how the
//! run is finished as Cancelled (`prefect/runner/_cancellation_manager.py: CancellationManager`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_api::models::{StateCreate, StateType};
use cohort_api::{PrefectApi, PrefectClient};
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
        cohort_metrics::metrics().event_feed("cancel", connected);
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
    cohort_metrics::metrics().event_feed("cancel", false);
    drop(subscription);
    task.abort();
}

/// Why a supervisor stops a flow process that is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A cancel request reached us: the run went Cancelling (or was forced Cancelled).
    CancelRequest,
    /// A runner shutting down cancels what still runs (`Runner.stop` → `cancel_all`).
    RunnerShutdown,
}

/// How a run we stopped is finished, once its process is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It already has a final state that is not ours to change: keep it, emit nothing.
    Keep(StateType),
    /// It is Cancelled already, and we stopped it because of that request: emit the event.
    Cancelled,
    /// Force Cancelled over what the engine wrote (or did not write) on its way out, then
    /// emit the event if that write is durable.
    ForceCancelled,
}

/// A final state the engine (or a user) wrote for its own reasons. Cancelled is not among
/// them: a cancel request may force a run straight to Cancelled while its process runs.
fn finished_on_its_own(state: StateType) -> bool {
    matches!(
        state,
        StateType::Completed | StateType::Failed | StateType::Crashed
    )
}

/// Decides how to finish a run stopped for `reason`, from its state read just before we
/// signalled the process (`before`) and once the process was gone (`after`; the engine can
/// no longer write then). Prefect forces Cancelled over whatever the engine wrote
/// (`CancellationManager.finalize_cancelled_state`) unless the engine's receipt reached it
/// first over the control channel; deciding from the server's state also covers a run with
/// no channel (re-adopted after a restart) and a process still exiting after its receipt.
/// Cancelled is forced only where Prefect's reason to force holds: the process was stopped
/// by us and the engine wrote Crashed (a SIGTERM without an acknowledged intent) or nothing.
pub fn finish(reason: StopReason, before: Option<StateType>, after: Option<StateType>) -> Finish {
    if let Some(state) = before.filter(|s| finished_on_its_own(*s)) {
        return Finish::Keep(state);
    }
    // Cancelled before a runner's shutdown reached it: someone else's cancellation, not ours
    // to report.
    if reason == StopReason::RunnerShutdown && before == Some(StateType::Cancelled) {
        return Finish::Keep(StateType::Cancelled);
    }
    match after {
        // Only the engine writes these, and only for an outcome it reached before our signal.
        Some(state @ (StateType::Completed | StateType::Failed)) => Finish::Keep(state),
        Some(StateType::Cancelled) => Finish::Cancelled,
        // Crashed after a non-final `before`: written by the engine as our SIGTERM reached it.
        // Unknown (the server did not answer): `before` was not final, so ours to finish.
        Some(_) | None => Finish::ForceCancelled,
    }
}

/// The run's current state type; `None` when the server cannot tell us.
pub async fn current_state(client: &dyn PrefectApi, id: Uuid) -> Option<StateType> {
    match client.read_flow_run(id).await {
        Ok(run) => run.state.map(|s| s.state_type),
        Err(e) => {
            tracing::warn!(flow_run = %id, error = %e, "could not read the flow run's state");
            None
        }
    }
}

/// Makes the run durably Cancelled after its process is gone (forced, as Prefect does:
/// [`finish`] decided it is ours to finish); true when it is Cancelled — then, and only
/// then, the cancelled-flow-run event is due (`CancellationManager.finalize_cancelled_state`).
pub async fn finalize_cancelled(client: &dyn PrefectApi, id: Uuid, message: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use StateType::*;
    use StopReason::*;

    #[test]
    fn a_state_the_engine_reached_is_kept() {
        for reason in [CancelRequest, RunnerShutdown] {
            // Finished before we signalled: the race of issue "Completed turned Cancelled".
            for state in [Completed, Failed, Crashed] {
                for after in [Some(state), Some(Cancelled), None] {
                    assert_eq!(finish(reason, Some(state), after), Finish::Keep(state));
                }
            }
            // Finished between our read and our signal.
            for state in [Completed, Failed] {
                assert_eq!(
                    finish(reason, Some(Running), Some(state)),
                    Finish::Keep(state)
                );
            }
        }
    }

    #[test]
    fn what_our_stop_caused_becomes_cancelled() {
        for reason in [CancelRequest, RunnerShutdown] {
            for before in [Some(Running), Some(Cancelling), Some(Pending), None] {
                // The engine wrote Crashed on SIGTERM, or nothing.
                for after in [Some(Crashed), Some(Running), Some(Cancelling), None] {
                    assert_eq!(finish(reason, before, after), Finish::ForceCancelled);
                }
                assert_eq!(finish(reason, before, Some(Cancelled)), Finish::Cancelled);
            }
        }
    }

    #[test]
    fn a_run_forced_cancelled_is_reported_only_when_we_acted_on_the_request() {
        assert_eq!(
            finish(CancelRequest, Some(Cancelled), Some(Cancelled)),
            Finish::Cancelled
        );
        for after in [Some(Cancelled), Some(Crashed), None] {
            assert_eq!(
                finish(RunnerShutdown, Some(Cancelled), after),
                Finish::Keep(Cancelled)
            );
        }
    }
}
