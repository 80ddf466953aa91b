//! The submission pipeline and restart recovery with paused time, against
//! `cohort_fakes::InProcessPrefect` (an in-process fake of the Prefect endpoints they call)
//! and `ScriptedInfrastructure` (runs that exit when the test says). The same paths run end to
//! end against a real Prefect server in the `cohort` crate's tests; these pin down the
//! decisions one by one, and the faults a real server cannot be made to produce on demand.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use cohort_api::models::{Flow, FlowRun, StateType, WorkPool};
use cohort_events::{names, related, Event, EventSink, RecordingSink, RelatedResource};
use cohort_execution::execution::Executor;
use cohort_fakes::{flow_run, InProcessPrefect, ScriptedInfrastructure};
use cohort_infra::Infrastructure;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::burst::Burst;
use crate::journal::{Claim, Journal};
use crate::recover::{reconcile, Recovery};
use crate::submit::{submit, Outcome, PollReads, RunContext};

pub(crate) const WORKER: &str = "paused worker";

struct Harness {
    api: Arc<InProcessPrefect>,
    infra: Arc<ScriptedInfrastructure>,
    sink: Arc<RecordingSink>,
    ctx: Arc<RunContext>,
    run: FlowRun,
    _home: tempfile::TempDir,
}

/// A worker's run context over the fakes, as `Worker::run` builds it.
pub(crate) struct Fakes {
    pub api: Arc<InProcessPrefect>,
    pub infra: Arc<ScriptedInfrastructure>,
    pub sink: Arc<RecordingSink>,
    pub ctx: Arc<RunContext>,
    /// Where the journal lives.
    pub home: tempfile::TempDir,
}

pub(crate) fn fakes(api: Arc<InProcessPrefect>) -> Fakes {
    let home = tempfile::tempdir().expect("a temporary directory");
    let infra = ScriptedInfrastructure::new();
    let sink = Arc::new(RecordingSink::new());
    let pool: WorkPool = serde_json::from_value(json!({
        "id": Uuid::new_v4(), "name": "paused-pool", "type": "scripted",
        "base_job_template": {"job_configuration": {}, "variables": {"properties": {}}},
    }))
    .expect("a work pool");
    let resource = related::worker_resource("scripted", WORKER, "3.8.8");
    let ctx = Arc::new(RunContext {
        executor: Executor {
            api: api.clone(),
            sink: sink.clone() as Arc<dyn EventSink>,
            runner_resource: related::runner_resource("standalone", "3.8.8"),
            termination_grace: Duration::from_secs(30),
            hurry: CancellationToken::new(),
            cancel_on_shutdown: None,
            logs: None,
        },
        infra: infra.clone() as Arc<dyn Infrastructure>,
        journal: Journal::open(home.path().join("journal.redb")).expect("a journal"),
        worker_name: WORKER.into(),
        worker_type: "scripted".into(),
        resource,
        pool: Arc::new(RwLock::new(Arc::new(pool))),
        settings_env: Vec::new(),
        count_final_states: false,
        burst: Burst::default(),
    });
    Fakes {
        api,
        infra,
        sink,
        ctx,
        home,
    }
}

/// A run of a flow the server knows, in `state`.
pub(crate) fn known_run(api: &InProcessPrefect, state: Option<StateType>) -> FlowRun {
    let run = flow_run(Uuid::new_v4(), state);
    api.add_run(run.clone());
    api.add_flow(
        serde_json::from_value::<Flow>(json!({"id": run.flow_id, "name": "hello"}))
            .expect("a flow"),
    );
    run
}

impl Harness {
    /// A worker's run context over the fakes, and one run in `state` whose flow the server
    /// knows.
    fn new(state: StateType) -> Harness {
        let api = InProcessPrefect::new();
        let run = known_run(&api, Some(state));
        let f = fakes(api);
        Harness {
            api: f.api,
            infra: f.infra,
            sink: f.sink,
            ctx: f.ctx,
            run,
            _home: f.home,
        }
    }

    fn submit(&self, resume: Option<Claim>) -> tokio::task::JoinHandle<Outcome> {
        let (ctx, run) = (self.ctx.clone(), self.run.clone());
        tokio::spawn(async move {
            submit(
                ctx,
                run,
                resume,
                Arc::new(PollReads::default()),
                CancellationToken::new(),
                CancellationToken::new(),
            )
            .await
        })
    }

    fn events(&self, name: &str) -> Vec<Event> {
        self.sink
            .events()
            .into_iter()
            .filter(|e| e.event == name)
            .collect()
    }

    fn journaled(&self) -> Vec<Uuid> {
        self.ctx
            .journal
            .claims()
            .expect("the journal reads")
            .iter()
            .map(|c| c.flow_run_id)
            .collect()
    }
}

fn status_code(event: &Event) -> Option<String> {
    event
        .related
        .iter()
        .find_map(|r| r.get("prefect.infrastructure.status-code"))
        .map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn a_claimed_run_is_launched_and_told_once_with_executed_following_submitted() {
    let h = Harness::new(StateType::Scheduled);
    let submission = h.submit(None);
    h.infra.script(h.run.id).await.exit(0);
    assert_eq!(submission.await.unwrap(), Outcome::Exited(0));

    let id = h.run.id;
    // Pending (the claim), then Submitting; a clean exit proposes nothing more.
    assert_eq!(
        h.api.proposals(id),
        [
            (StateType::Pending, false, true),
            (StateType::Pending, false, true)
        ]
    );
    assert_eq!(h.api.state_name(id), "Submitting");
    assert_eq!(h.infra.launches(), [id]);
    assert_eq!(h.api.pids(id), [format!("scripted:{id}")]);
    let labels = h.api.labels(id);
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0]["prefect.worker.name"], WORKER);
    assert_eq!(labels[0]["prefect.work-pool.name"], "paused-pool");

    let submitted = h.events(names::WORKER_SUBMITTED_FLOW_RUN);
    let executed = h.events(names::WORKER_EXECUTED_FLOW_RUN);
    assert_eq!((submitted.len(), executed.len()), (1, 1));
    assert_eq!(executed[0].follows, Some(submitted[0].id));
    assert_eq!(status_code(&executed[0]).as_deref(), Some("0"));
    // Told: out of the journal, and the infrastructure forgets it.
    assert!(h.journaled().is_empty());
    assert_eq!(h.infra.forgotten(), [id]);
}

/// A run claimed as a burst begins is told submitted at once, but labelled and launched only
/// once the burst's runs are all created.
#[tokio::test(start_paused = true)]
async fn a_run_claimed_as_a_burst_begins_waits_for_its_end_to_launch() {
    let h = Harness::new(StateType::Scheduled);
    let start = tokio::time::Instant::now();
    h.ctx.burst.scheduled(start);
    h.ctx.burst.scheduled(start + Duration::from_millis(100));
    let submission = h.submit(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = h.run.id;
    assert_eq!(h.events(names::WORKER_SUBMITTED_FLOW_RUN).len(), 1);
    assert!(h.api.labels(id).is_empty());
    assert!(h.infra.launches().is_empty());
    tokio::time::sleep_until(start + Duration::from_millis(100) + crate::burst::QUIET).await;
    h.infra.script(id).await.exit(0);
    assert_eq!(submission.await.unwrap(), Outcome::Exited(0));
    assert_eq!(h.api.labels(id).len(), 1);
    assert_eq!(h.infra.launches(), [id]);
}

#[tokio::test(start_paused = true)]
async fn a_run_another_worker_claimed_first_is_left_alone() {
    // The other worker's Pending is in: ours is aborted (`PreventPendingTransitions`).
    let h = Harness::new(StateType::Pending);
    let outcome = h.submit(None).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Skipped(why) if why.contains("non-pending state 'PENDING'")),
        "{outcome:?}"
    );
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Pending, false, false)]
    );
    assert!(h.infra.launches().is_empty());
    assert!(h.sink.events().is_empty(), "no event for a run not ours");
    assert!(h.journaled().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_non_zero_exit_is_crashed_and_reported_with_its_code() {
    let h = Harness::new(StateType::Scheduled);
    let submission = h.submit(None);
    h.infra.script(h.run.id).await.exit(3);
    assert_eq!(submission.await.unwrap(), Outcome::Exited(3));
    assert_eq!(h.api.state(h.run.id), StateType::Crashed);
    let executed = h.events(names::WORKER_EXECUTED_FLOW_RUN);
    assert_eq!(status_code(&executed[0]).as_deref(), Some("3"));
    assert!(h
        .api
        .log_messages()
        .contains(&"scripted run exited with 3".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_run_cancelled_right_after_its_claim_is_never_launched() {
    let h = Harness::new(StateType::Scheduled);
    // A user cancels the run the moment it is Pending.
    h.api.after_accepting("Pending", StateType::Cancelling);
    let outcome = h.submit(None).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Skipped(why) if why.contains("cancelled before execution")),
        "{outcome:?}"
    );
    assert!(h.infra.launches().is_empty());
    assert_eq!(h.api.state(h.run.id), StateType::Cancelled);
    // Submitting was refused; Cancelled was forced.
    assert_eq!(
        h.api.proposals(h.run.id),
        [
            (StateType::Pending, false, true),
            (StateType::Pending, false, false),
            (StateType::Cancelled, true, true)
        ]
    );
    assert!(h.events(names::WORKER_EXECUTED_FLOW_RUN).is_empty());
    assert!(h.journaled().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_cannot_be_claimed_from_leaves_the_run_for_the_next_poll() {
    let h = Harness::new(StateType::Scheduled);
    h.api.set_unavailable(true);
    let outcome = h.submit(None).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Skipped(why) if why.starts_with("claim failed")),
        "{outcome:?}"
    );
    assert!(h.infra.launches().is_empty());
    assert!(h.sink.events().is_empty());
    // Not claimed, so not journaled either.
    assert!(h.journaled().is_empty());
    assert_eq!(h.api.state(h.run.id), StateType::Scheduled);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_claim_sends_the_journaled_submitted_event_again() {
    // An earlier worker claimed the run and journaled its submitted event, then died before
    // the launch: the run is Pending, and nobody else will take it.
    let h = Harness::new(StateType::Pending);
    let mut claim = Claim::new(h.run.id);
    let earlier = Event::new(
        names::WORKER_SUBMITTED_FLOW_RUN,
        h.ctx.resource.clone(),
        vec![],
    );
    claim.submitted = Some(earlier.clone());
    h.ctx.journal.record(&claim).await.unwrap();

    let Recovery::Resume(claim, run) = reconcile(&h.ctx, claim).await else {
        panic!("a Pending run never launched is resumed");
    };
    assert_eq!(run.id, h.run.id);
    let submission = h.submit(Some(claim));
    h.infra.script(h.run.id).await.exit(0);
    assert_eq!(submission.await.unwrap(), Outcome::Exited(0));
    // No second claim: only Submitting is proposed.
    assert_eq!(
        h.api.proposals(h.run.id),
        [(StateType::Pending, false, true)]
    );
    let submitted = h.events(names::WORKER_SUBMITTED_FLOW_RUN);
    assert_eq!(submitted.len(), 1);
    assert_eq!(
        submitted[0].id, earlier.id,
        "the same event, which the server keeps once"
    );
    let executed = h.events(names::WORKER_EXECUTED_FLOW_RUN);
    assert_eq!(executed[0].follows, Some(earlier.id));
    assert!(h.journaled().is_empty());
}

#[tokio::test(start_paused = true)]
async fn recovery_re_adopts_what_was_started_and_forgets_what_is_over() {
    let h = Harness::new(StateType::Running);
    h.infra.adoptable(h.run.id);
    assert!(matches!(
        reconcile(&h.ctx, Claim::new(h.run.id)).await,
        Recovery::Adopt(..)
    ));

    // Never launched, and the run moved on without us.
    h.api.set(h.run.id, StateType::Cancelled);
    let Recovery::Forget(_, why) = reconcile(&h.ctx, Claim::new(h.run.id)).await else {
        panic!("a run that moved on is forgotten");
    };
    assert!(why.contains("Cancelled"), "{why}");

    h.api.delete(h.run.id);
    let Recovery::Forget(_, why) = reconcile(&h.ctx, Claim::new(h.run.id)).await else {
        panic!("a deleted run is forgotten");
    };
    assert_eq!(why, "it no longer exists");

    // The server cannot say: the claim is kept for the next start.
    h.api.set(h.run.id, StateType::Pending);
    h.api.set_unavailable(true);
    assert!(matches!(
        reconcile(&h.ctx, Claim::new(h.run.id)).await,
        Recovery::Keep(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_re_adopted_run_is_reported_with_its_code_following_the_original_submitted() {
    let h = Harness::new(StateType::Running);
    let script = h.infra.adoptable(h.run.id);
    let mut claim = Claim::new(h.run.id);
    let original = Event::new(
        names::WORKER_SUBMITTED_FLOW_RUN,
        h.ctx.resource.clone(),
        vec![RelatedResource::new(
            format!("prefect.flow-run.{}", h.run.id),
            "flow-run",
        )],
    );
    claim.submitted = Some(original.clone());
    h.ctx.journal.record(&claim).await.unwrap();
    let Recovery::Adopt(claim, started) = reconcile(&h.ctx, claim).await else {
        panic!("a started run is re-adopted");
    };
    let ctx = h.ctx.clone();
    let adopted = tokio::spawn(crate::recover::adopted(
        ctx,
        claim,
        started,
        CancellationToken::new(),
        CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_secs(60)).await;
    script.exit(0);
    assert_eq!(adopted.await.unwrap(), Outcome::Exited(0));
    assert!(h.events(names::WORKER_SUBMITTED_FLOW_RUN).is_empty());
    let executed = h.events(names::WORKER_EXECUTED_FLOW_RUN);
    assert_eq!(executed.len(), 1);
    assert_eq!(executed[0].follows, Some(original.id));
    assert_eq!(status_code(&executed[0]).as_deref(), Some("0"));
    assert!(h.journaled().is_empty());
}
