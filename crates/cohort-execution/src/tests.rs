//! The executor's supervision, crash and cancellation paths with paused time, against
//! `cohort_fakes::InProcessPrefect` (an in-process fake of the flow-run endpoints) and scripted
//! runs (whose exit and whose answer to a stop the test decides). The same paths run end to
//! end against a real Prefect server in the `cohort` crate's tests.

use std::sync::Arc;
use std::time::Duration;

use cohort_api::models::{FlowRun, StateType};
use cohort_events::{names, EventSink, RecordingSink, Resource};
use cohort_fakes::{failing_job, flow_run, scripted_job, InProcessPrefect, OnStop, Script};
use cohort_infra::Job;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::execution::{Executed, Executor, Gate, NotExecuted, RunLog};

fn scripted(on_stop: OnStop) -> (Box<dyn Job>, Script) {
    scripted_job(on_stop, false)
}

/// A run whose engine cancels it itself, as a container's does.
fn self_cancelling(on_stop: OnStop) -> (Box<dyn Job>, Script) {
    scripted_job(on_stop, true)
}

const GRACE: Duration = Duration::from_secs(30);

fn executor(api: Arc<InProcessPrefect>, sink: Arc<RecordingSink>) -> Executor {
    Executor {
        api,
        sink: sink as Arc<dyn EventSink>,
        runner_resource: Resource::new("prefect.runner.standalone"),
        termination_grace: GRACE,
        hurry: CancellationToken::new(),
        cancel_on_shutdown: None,
        logs: None,
    }
}

struct Harness {
    api: Arc<InProcessPrefect>,
    sink: Arc<RecordingSink>,
    run: FlowRun,
    cancel: CancellationToken,
    terminate: CancellationToken,
}

impl Harness {
    fn new(state: StateType) -> Self {
        let id = Uuid::new_v4();
        Self {
            api: InProcessPrefect::with_run(id, state),
            sink: Arc::new(RecordingSink::new()),
            run: flow_run(id, Some(state)),
            cancel: CancellationToken::new(),
            terminate: CancellationToken::new(),
        }
    }

    /// Executes `job` in a task; the test drives it through its script and tokens.
    fn execute(&self, job: Box<dyn Job>) -> tokio::task::JoinHandle<Result<Executed, NotExecuted>> {
        let executor = executor(self.api.clone(), self.sink.clone());
        let (run, cancel, terminate) = (
            self.run.clone(),
            self.cancel.clone(),
            self.terminate.clone(),
        );
        tokio::spawn(async move {
            let mut log = RunLog::new(run.id, "prefect.flow_runs.worker");
            executor
                .execute(&run, None, None, job, &mut log, &cancel, &terminate)
                .await
        })
    }

    /// What the Submitting gate says of the run.
    async fn gate(&self) -> Gate {
        executor(self.api.clone(), self.sink.clone())
            .propose_submitting(&self.run, &self.cancel)
            .await
    }

    fn cancelled_events(&self) -> usize {
        self.sink
            .events()
            .iter()
            .filter(|e| e.event == names::RUNNER_CANCELLED_FLOW_RUN)
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn a_non_zero_exit_with_no_outcome_reported_is_proposed_crashed() {
    let h = Harness::new(StateType::Running);
    let (job, script) = scripted(OnStop::Exit(-15));
    let execution = h.execute(job);
    tokio::time::sleep(Duration::from_secs(5)).await;
    script.exit.send_replace(Some(3));
    let executed = execution.await.unwrap().unwrap();

    assert_eq!(executed.status_code, 3);
    assert_eq!(executed.pid, "scripted:1");
    assert_eq!(h.api.pids(h.run.id), ["scripted:1"]);
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Crashed, false, true)]
    );
    let logs = h.api.log_messages();
    assert!(
        logs.contains(&"scripted run exited with 3".to_owned()),
        "{logs:?}"
    );
    assert!(logs.contains(&"scripted resolution".to_owned()), "{logs:?}");
    assert_eq!(h.cancelled_events(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_clean_exit_proposes_nothing() {
    let h = Harness::new(StateType::Running);
    let (job, script) = scripted(OnStop::Exit(-15));
    let execution = h.execute(job);
    h.api.set(h.run.id, StateType::Completed);
    script.exit.send_replace(Some(0));
    let executed = execution.await.unwrap().unwrap();
    assert_eq!(executed.status_code, 0);
    assert!(h.api.proposals(h.run.id).is_empty());
    assert_eq!(h.api.state(h.run.id), StateType::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_run_that_cannot_launch_is_crashed_with_the_reason() {
    let h = Harness::new(StateType::Pending);
    let job = failing_job("no such image");
    let outcome = h.execute(job).await.unwrap();
    assert_eq!(
        outcome,
        Err(NotExecuted::CouldNotStart(
            "Flow run could not start: no such image".into()
        ))
    );
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Crashed, false, true)]
    );
    assert!(h.api.pids(h.run.id).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cancel_stops_the_run_forces_cancelled_and_then_emits_the_event() {
    let h = Harness::new(StateType::Running);
    let (job, script) = scripted(OnStop::Exit(-15));
    let execution = h.execute(job);
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.api.set(h.run.id, StateType::Cancelling);
    h.cancel.cancel();
    let executed = execution.await.unwrap().unwrap();

    assert_eq!(executed.status_code, -15);
    assert_eq!(*script.stops.lock().unwrap(), [GRACE]);
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Cancelled, true, true)]
    );
    assert_eq!(h.api.state(h.run.id), StateType::Cancelled);
    assert_eq!(h.cancelled_events(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_that_ignores_the_stop_is_forced_after_the_grace() {
    let h = Harness::new(StateType::Running);
    let (job, _script) = scripted(OnStop::Ignore);
    let execution = h.execute(job);
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.api.set(h.run.id, StateType::Cancelling);
    let cancelled_at = tokio::time::Instant::now();
    h.cancel.cancel();
    let executed = execution.await.unwrap().unwrap();
    assert_eq!(executed.status_code, -9);
    assert!(
        cancelled_at.elapsed() >= GRACE,
        "{:?}",
        cancelled_at.elapsed()
    );
    assert_eq!(h.api.state(h.run.id), StateType::Cancelled);
    assert_eq!(h.cancelled_events(), 1);
}

/// A final state is sacred: a run that completed before the cancel reached it keeps Completed,
/// and no `cancelled-flow-run` is emitted for a cancellation that did not happen.
#[tokio::test(start_paused = true)]
async fn a_run_that_completed_before_the_cancel_keeps_its_state_and_gets_no_event() {
    let h = Harness::new(StateType::Running);
    let (job, script) = scripted(OnStop::Exit(-15));
    let execution = h.execute(job);
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.api.set(h.run.id, StateType::Completed);
    h.cancel.cancel();
    // It exits on its own within the grace.
    tokio::time::sleep(Duration::from_secs(2)).await;
    script.exit.send_replace(Some(0));
    let executed = execution.await.unwrap().unwrap();

    assert_eq!(executed.status_code, 0);
    assert!(script.stops.lock().unwrap().is_empty());
    assert!(
        h.api.proposals(h.run.id).is_empty(),
        "{:?}",
        h.api.proposals(h.run.id)
    );
    assert_eq!(h.api.state(h.run.id), StateType::Completed);
    assert_eq!(h.cancelled_events(), 0);
}

/// A worker's shutdown stops what still runs: Crashed, unless the run already has its final
/// state, which it keeps.
#[tokio::test(start_paused = true)]
async fn a_shutdown_crashes_a_running_run_but_keeps_a_final_state() {
    for (before, expected) in [
        (StateType::Running, StateType::Crashed),
        (StateType::Failed, StateType::Failed),
    ] {
        let h = Harness::new(StateType::Running);
        let (job, script) = scripted(OnStop::Exit(-15));
        let execution = h.execute(job);
        tokio::time::sleep(Duration::from_secs(1)).await;
        h.api.set(h.run.id, before);
        h.terminate.cancel();
        let executed = execution.await.unwrap().unwrap();
        assert_eq!(executed.status_code, -15);
        assert_eq!(*script.stops.lock().unwrap(), [GRACE]);
        assert_eq!(h.api.state(h.run.id), expected, "from {before:?}");
        assert!(
            h.api
                .proposals(h.run.id)
                .iter()
                .all(|(_, forced, _)| !forced),
            "{:?}",
            h.api.proposals(h.run.id)
        );
        assert_eq!(h.cancelled_events(), 0);
    }
}

/// A container's engine cancels its run itself and reports it: the supervisor stops nothing,
/// proposes nothing and emits no second `cancelled-flow-run`.
#[tokio::test(start_paused = true)]
async fn a_run_that_cancels_itself_is_left_to_do_so() {
    let h = Harness::new(StateType::Running);
    let (job, script) = self_cancelling(OnStop::Exit(-15));
    let execution = h.execute(job);
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.api.set(h.run.id, StateType::Cancelling);
    h.cancel.cancel();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.api.set(h.run.id, StateType::Cancelled);
    script.exit.send_replace(Some(0));
    let executed = execution.await.unwrap().unwrap();
    assert_eq!(executed.status_code, 0);
    assert!(script.stops.lock().unwrap().is_empty());
    assert!(
        h.api.proposals(h.run.id).is_empty(),
        "{:?}",
        h.api.proposals(h.run.id)
    );
    assert_eq!(h.cancelled_events(), 0);
}

/// One whose engine does not end it within the grace is stopped, and then it is ours to
/// report.
#[tokio::test(start_paused = true)]
async fn a_run_that_should_cancel_itself_but_hangs_is_stopped_after_the_grace() {
    let h = Harness::new(StateType::Running);
    let (job, script) = self_cancelling(OnStop::Exit(137));
    let execution = h.execute(job);
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.api.set(h.run.id, StateType::Cancelling);
    let cancelled_at = tokio::time::Instant::now();
    h.cancel.cancel();
    let executed = execution.await.unwrap().unwrap();
    assert!(cancelled_at.elapsed() >= GRACE);
    assert_eq!(executed.status_code, 137);
    assert_eq!(*script.stops.lock().unwrap(), [GRACE]);
    assert_eq!(h.api.state(h.run.id), StateType::Cancelled);
    assert_eq!(h.cancelled_events(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_cancelling_before_launch_is_held_back_and_forced_cancelled() {
    let h = Harness::new(StateType::Cancelling);
    let gate = h.gate().await;
    assert_eq!(gate, Gate::Cancelled);
    assert_eq!(
        h.api.proposals(h.run.id),
        [
            (StateType::Pending, false, false),
            (StateType::Cancelled, true, true)
        ]
    );
    assert_eq!(h.api.state(h.run.id), StateType::Cancelled);
    // Cancelled before it ran: the cancellation is the state, not a runner's event.
    assert_eq!(h.cancelled_events(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_run_already_cancelled_is_skipped_without_another_proposal() {
    let h = Harness::new(StateType::Cancelled);
    let gate = h.gate().await;
    assert_eq!(gate, Gate::Cancelled);
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Pending, false, false)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_pending_run_is_let_through_to_launch() {
    let h = Harness::new(StateType::Pending);
    let gate = h.gate().await;
    assert_eq!(gate, Gate::Go);
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Pending, false, true)]
    );
}
