//! [`InProcessPrefect`]: an in-process fake of the flow-run endpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cohort_api::models::{
    Deployment, Flow, FlowRun, Map, OrchestrationResult, PoolWorker, ScheduledFlowRun,
    SetStateStatus, State, StateCreate, StateType,
};
use cohort_api::{ApiError, ApiFuture, PrefectApi};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// An in-process fake of the Prefect server's flow-run endpoints. Every proposal is recorded
/// with its outcome; Prefect's core policy (`prefect/server/orchestration/core_policy.py`)
/// decides it as far as these paths meet it, unless forced: a final state refuses a proposal
/// (rejected); a Cancelling run accepts only Cancelled
/// (`EnforceCancellingToCancelledTransition`, rejected); Pending is aborted from Pending,
/// Running, Cancelling and Cancelled, except a Pending run's move to a newly named Pending
/// sub-state such as Submitting (`PreventPendingTransitions`), which is how a second worker
/// racing for a run loses it.
#[derive(Default)]
pub struct InProcessPrefect {
    /// Each run, with its state type and name.
    runs: Mutex<HashMap<Uuid, (FlowRun, StateType, String)>>,
    /// `get_scheduled_flow_runs` calls.
    polls: AtomicUsize,
    /// Reads of the pool's online workers.
    worker_lists: AtomicUsize,
    /// The other workers listed online, by name.
    online: Mutex<Vec<String>>,
    deployments: Mutex<HashMap<Uuid, Deployment>>,
    flows: Mutex<HashMap<Uuid, Flow>>,
    /// Every proposal: (run, state, forced, accepted).
    proposals: Mutex<Vec<(Uuid, StateType, bool, bool)>>,
    pids: Mutex<Vec<(Uuid, String)>>,
    labels: Mutex<Vec<(Uuid, Map)>>,
    logs: Mutex<Vec<Value>>,
    /// Every call answers 503, as a server whose database is locked.
    unavailable: AtomicBool,
    /// Once a proposal of this name is accepted, another client moves the run to this state.
    after: Mutex<Option<(String, StateType)>>,
    /// Runs the next poll skips, as locked by another client's poll at that moment.
    locked: Mutex<Vec<Uuid>>,
}

impl InProcessPrefect {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A fake that knows one run (of a flow of its own), in this state.
    pub fn with_run(id: Uuid, state: StateType) -> Arc<Self> {
        let fake = Self::new();
        fake.add_run(flow_run(id, Some(state)));
        fake
    }

    /// Knows `run`, in its state (Scheduled when it has none), from now on.
    pub fn add_run(&self, run: FlowRun) {
        let state_type = run
            .state
            .as_ref()
            .map_or(StateType::Scheduled, |s| s.state_type);
        self.runs
            .lock()
            .unwrap()
            .insert(run.id, (run, state_type, format!("{state_type:?}")));
    }

    /// The run with its current state, if known.
    fn current(&self, id: Uuid) -> Option<FlowRun> {
        let runs = self.runs.lock().unwrap();
        let (run, state_type, _) = runs.get(&id)?;
        let mut run = run.clone();
        run.state = Some(state(*state_type));
        Some(run)
    }

    /// Sets a run's state, as another client would; a run it does not know gets a flow of
    /// its own.
    pub fn set(&self, id: Uuid, state: StateType) {
        let mut runs = self.runs.lock().unwrap();
        let run = runs
            .remove(&id)
            .map_or_else(|| flow_run(id, Some(state)), |r| r.0);
        runs.insert(id, (run, state, format!("{state:?}")));
    }

    /// How many times the pool was polled (`get_scheduled_flow_runs`).
    pub fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }

    /// How many times the pool's online workers were read (`workers/filter`).
    pub fn worker_lists(&self) -> usize {
        self.worker_lists.load(Ordering::SeqCst)
    }

    /// Lists these other workers online from now on.
    pub fn set_online_workers(&self, names: &[&str]) {
        *self.online.lock().unwrap() = names.iter().map(|n| (*n).to_owned()).collect();
    }

    /// Forgets a run, as `DELETE /flow_runs/{id}`.
    pub fn delete(&self, id: Uuid) {
        self.runs.lock().unwrap().remove(&id);
    }

    pub fn add_deployment(&self, deployment: Deployment) {
        self.deployments
            .lock()
            .unwrap()
            .insert(deployment.id, deployment);
    }

    pub fn add_flow(&self, flow: Flow) {
        self.flows.lock().unwrap().insert(flow.id, flow);
    }

    /// Once a proposal named `name` is accepted, the run is moved to `then`, as by another
    /// client right after (a user cancelling a run just claimed, say).
    pub fn after_accepting(&self, name: &str, then: StateType) {
        *self.after.lock().unwrap() = Some((name.to_owned(), then));
    }

    /// The next poll skips these runs, as PostgreSQL's server does the rows another worker's
    /// poll holds at that moment (`FOR UPDATE SKIP LOCKED`,
    /// `prefect/server/database/sql/postgres/get-runs-from-worker-queues.sql.jinja`).
    pub fn lock_for_next_poll(&self, ids: &[Uuid]) {
        *self.locked.lock().unwrap() = ids.to_vec();
    }

    /// Makes every call answer 503 (`true`) or work again.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// The run's state; panics for a run it does not know.
    pub fn state(&self, id: Uuid) -> StateType {
        self.runs.lock().unwrap()[&id].1
    }

    /// The run's state name (`Submitting`, say); panics for a run it does not know.
    pub fn state_name(&self, id: Uuid) -> String {
        self.runs.lock().unwrap()[&id].2.clone()
    }

    /// The proposals for a run: (state, forced, accepted).
    pub fn proposals(&self, id: Uuid) -> Vec<(StateType, bool, bool)> {
        self.proposals
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.0 == id)
            .map(|p| (p.1, p.2, p.3))
            .collect()
    }

    /// The `infrastructure_pid`s set for a run, in order.
    pub fn pids(&self, id: Uuid) -> Vec<String> {
        self.pids
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.0 == id)
            .map(|p| p.1.clone())
            .collect()
    }

    /// The labels patched onto a run, in order.
    pub fn labels(&self, id: Uuid) -> Vec<Map> {
        self.labels
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.0 == id)
            .map(|p| p.1.clone())
            .collect()
    }

    /// The messages of every log line shipped.
    pub fn log_messages(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| l["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn check(&self, method: &str, path: String) -> Result<(), ApiError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(status(method, path, StatusCode::SERVICE_UNAVAILABLE));
        }
        Ok(())
    }
}

fn status(method: &str, path: String, status: StatusCode) -> ApiError {
    ApiError::Status {
        method: method.into(),
        path,
        status,
        body: String::new(),
    }
}

/// A state of this type, named after it.
pub fn state(state_type: StateType) -> State {
    serde_json::from_value(json!({"type": state_type, "name": format!("{state_type:?}")}))
        .expect("a state")
}

/// A flow run of a fresh flow, in this state.
pub fn flow_run(id: Uuid, state_type: Option<StateType>) -> FlowRun {
    let mut run: FlowRun = serde_json::from_value(json!({
        "id": id,
        "name": "tidy-otter",
        "flow_id": Uuid::new_v4(),
    }))
    .expect("a flow run");
    run.state = state_type.map(state);
    run
}

impl PrefectApi for InProcessPrefect {
    /// The Scheduled runs due by `scheduled_before` (those without an expected start are
    /// due now), soonest first; pool and queue are not told apart.
    fn get_scheduled_flow_runs<'a>(
        &'a self,
        pool: &'a str,
        _work_queue_names: &'a [String],
        scheduled_before: DateTime<Utc>,
    ) -> ApiFuture<'a, Vec<ScheduledFlowRun>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let found = self
            .check("POST", format!("work_pools/{pool}/get_scheduled_flow_runs"))
            .map(|()| {
                let locked = std::mem::take(&mut *self.locked.lock().unwrap());
                let mut due: Vec<FlowRun> = self
                    .runs
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|(run, state_type, _)| {
                        *state_type == StateType::Scheduled
                            && !locked.contains(&run.id)
                            && run
                                .expected_start_time
                                .is_none_or(|t| t <= scheduled_before)
                    })
                    .map(|(run, _, _)| {
                        let mut run = run.clone();
                        run.state = Some(state(StateType::Scheduled));
                        run
                    })
                    .collect();
                due.sort_by_key(|r| r.expected_start_time);
                due.into_iter()
                    .map(|flow_run| ScheduledFlowRun {
                        work_pool_id: Uuid::nil(),
                        work_queue_id: Uuid::nil(),
                        flow_run,
                    })
                    .collect()
            });
        Box::pin(async move { found })
    }

    /// The workers set online; none unless set, and the worker under test owns every run.
    fn read_online_workers<'a>(&'a self, pool: &'a str) -> ApiFuture<'a, Vec<PoolWorker>> {
        self.worker_lists.fetch_add(1, Ordering::SeqCst);
        let online = self.online.lock().unwrap().clone();
        let found = self
            .check("POST", format!("work_pools/{pool}/workers/filter"))
            .map(|()| {
                online
                    .into_iter()
                    .map(|name| PoolWorker {
                        name,
                        last_heartbeat_time: None,
                        heartbeat_interval_seconds: None,
                        status: Some("ONLINE".into()),
                    })
                    .collect()
            });
        Box::pin(async move { found })
    }

    fn read_flow_run(&self, id: Uuid) -> ApiFuture<'_, FlowRun> {
        let path = format!("flow_runs/{id}");
        let found = self.check("GET", path.clone()).map(|()| self.current(id));
        Box::pin(async move { found?.ok_or_else(|| status("GET", path, StatusCode::NOT_FOUND)) })
    }

    fn read_deployment(&self, id: Uuid) -> ApiFuture<'_, Option<Deployment>> {
        let found = self
            .check("GET", format!("deployments/{id}"))
            .map(|()| self.deployments.lock().unwrap().get(&id).cloned());
        Box::pin(async move { found })
    }

    fn read_flow(&self, id: Uuid) -> ApiFuture<'_, Flow> {
        let path = format!("flows/{id}");
        let found = self
            .check("GET", path.clone())
            .map(|()| self.flows.lock().unwrap().get(&id).cloned());
        Box::pin(async move { found?.ok_or_else(|| status("GET", path, StatusCode::NOT_FOUND)) })
    }

    fn update_flow_run_labels<'a>(&'a self, id: Uuid, labels: &'a Map) -> ApiFuture<'a, ()> {
        Box::pin(async move {
            self.check("PATCH", format!("flow_runs/{id}/labels"))?;
            self.labels.lock().unwrap().push((id, labels.clone()));
            Ok(())
        })
    }

    fn read_variable<'a>(&'a self, name: &'a str) -> ApiFuture<'a, Option<Value>> {
        Box::pin(async move {
            self.check("GET", format!("variables/name/{name}"))?;
            Ok(None)
        })
    }

    fn read_block_document_data<'a>(&'a self, id: &'a str) -> ApiFuture<'a, Option<Map>> {
        Box::pin(async move {
            self.check("GET", format!("block_documents/{id}"))?;
            Ok(None)
        })
    }

    fn read_block_document_data_by_name<'a>(
        &'a self,
        block_type_slug: &'a str,
        name: &'a str,
    ) -> ApiFuture<'a, Option<Map>> {
        Box::pin(async move {
            self.check(
                "GET",
                format!("block_types/slug/{block_type_slug}/block_documents/name/{name}"),
            )?;
            Ok(None)
        })
    }

    fn set_flow_run_state<'a>(
        &'a self,
        id: Uuid,
        proposed: &'a StateCreate,
        force: bool,
    ) -> ApiFuture<'a, OrchestrationResult> {
        Box::pin(async move {
            self.check("POST", format!("flow_runs/{id}/set_state"))?;
            let mut runs = self.runs.lock().unwrap();
            let (current, current_name) = runs
                .get(&id)
                .map(|(_, t, n)| (*t, n.clone()))
                .unwrap_or((StateType::Scheduled, "Scheduled".into()));
            let proposed_type = proposed.state_type;
            let status = if force {
                SetStateStatus::Accept
            } else if current.is_final()
                || (current == StateType::Cancelling && proposed_type != StateType::Cancelled)
            {
                SetStateStatus::Reject
            } else if proposed_type == StateType::Pending
                && matches!(
                    current,
                    StateType::Pending
                        | StateType::Running
                        | StateType::Cancelling
                        | StateType::Cancelled
                )
                && !(current == StateType::Pending
                    && proposed.name != current_name
                    && proposed.name != "Pending")
            {
                SetStateStatus::Abort
            } else {
                SetStateStatus::Accept
            };
            let accepted = status == SetStateStatus::Accept;
            if accepted {
                let run = runs.remove(&id).map_or_else(|| flow_run(id, None), |r| r.0);
                let after = self.after.lock().unwrap();
                let (state_type, name) = match after.as_ref() {
                    Some((name, then)) if *name == proposed.name => (*then, format!("{then:?}")),
                    _ => (proposed_type, proposed.name.clone()),
                };
                runs.insert(id, (run, state_type, name));
            }
            self.proposals
                .lock()
                .unwrap()
                .push((id, proposed_type, force, accepted));
            Ok(OrchestrationResult {
                state: Some(state(if accepted { proposed_type } else { current })),
                status,
                details: json!({}),
            })
        })
    }

    fn set_infrastructure_pid<'a>(&'a self, id: Uuid, pid: &'a str) -> ApiFuture<'a, ()> {
        Box::pin(async move {
            self.check("PATCH", format!("flow_runs/{id}"))?;
            self.pids.lock().unwrap().push((id, pid.to_owned()));
            Ok(())
        })
    }

    fn create_logs<'a>(&'a self, logs: &'a [Value]) -> ApiFuture<'a, ()> {
        Box::pin(async move {
            self.check("POST", "logs/".into())?;
            self.logs.lock().unwrap().extend(logs.iter().cloned());
            Ok(())
        })
    }
}
