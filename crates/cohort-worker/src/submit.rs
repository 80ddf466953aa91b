//! One flow run, from claim to `executed-flow-run`: the submission pipeline of
//! `prefect/workers/base.py: BaseWorker._submit_run` and `_submit_run_and_capture_errors`, with
//! the run's [infrastructure](cohort_infra::Infrastructure) in place of `run()`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use cohort_api::models::{Deployment, Flow, FlowRun, StateCreate, StateType, WorkPool};
use cohort_api::{ApiError, PrefectApi};
use cohort_events::related::{self, FlowRunObjects, Named};
use cohort_events::{names, Event};
use cohort_infra::{EventContext, Infrastructure, Map, PrepareError, RunSpec};
use cohort_template::BlockReference;
use serde_json::json;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::burst::Burst;
use crate::journal::{Claim, Journal};
use cohort_execution::execution::{
    claim, propose_crashed, Executed, Executor, Gate, NotExecuted, RunLog,
};

/// The work pool as last read from the server, replaced whole on every update; each run takes
/// a snapshot (an `Arc`, not a copy: a pool with its job template is a dozen KiB).
pub(crate) type SharedPool = Arc<RwLock<Arc<WorkPool>>>;

/// What every run of one worker shares.
pub(crate) struct RunContext {
    /// Its `api` is the server, for the whole pipeline.
    pub executor: Executor,
    /// Where runs run.
    pub infra: Arc<dyn Infrastructure>,
    pub journal: Journal,
    pub worker_name: String,
    pub worker_type: String,
    pub resource: cohort_events::Resource,
    pub pool: SharedPool,
    /// `PREFECT_*` settings set explicitly for the worker, passed on to the flow.
    pub settings_env: Vec<(String, String)>,
    /// `/metrics` is served: each run's state is read once when its supervision ends, for
    /// `cohort_flow_runs_finished_total` (one request per run, only then).
    pub count_final_states: bool,
    /// The runs being scheduled on the pool, as its events tell.
    pub burst: Burst,
}

impl RunContext {
    /// The Prefect server.
    pub fn api(&self) -> &dyn PrefectApi {
        self.executor.api.as_ref()
    }
}

/// The deployments and flows read for the runs one poll found: each is read once for all of
/// them, where Prefect's worker reads both for every run (the deployment twice:
/// `BaseWorker._submit_run`, then `BaseJobConfiguration.resolve_for_flow_run`). A read is
/// never older than the poll that found the run, so a change saved to a deployment (its job
/// variables, say) applies to every run a later poll finds: every run created after it.
#[derive(Default)]
pub(crate) struct PollReads {
    deployments: Reads<Option<Arc<Deployment>>>,
    flows: Reads<Arc<Flow>>,
}

/// One read per id, shared by every run that asks for it.
type Reads<T> = Mutex<HashMap<Uuid, Arc<OnceCell<T>>>>;

impl PollReads {
    /// The deployment, `None` when it no longer exists. A failed read is not kept: the next
    /// run of the poll tries again.
    async fn deployment(
        &self,
        client: &dyn PrefectApi,
        id: Uuid,
    ) -> Result<Option<Arc<Deployment>>, ApiError> {
        let cell = self
            .deployments
            .lock()
            .expect("poll reads lock poisoned")
            .entry(id)
            .or_default()
            .clone();
        cell.get_or_try_init(|| async { Ok(client.read_deployment(id).await?.map(Arc::new)) })
            .await
            .cloned()
    }

    async fn flow(&self, client: &dyn PrefectApi, id: Uuid) -> Result<Arc<Flow>, ApiError> {
        let cell = self
            .flows
            .lock()
            .expect("poll reads lock poisoned")
            .entry(id)
            .or_default()
            .clone();
        cell.get_or_try_init(|| async { Ok(Arc::new(client.read_flow(id).await?)) })
            .await
            .cloned()
    }
}

/// How a submission ended, for the worker's bookkeeping and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The run is not ours (Pending rejected or aborted), vanished, or was cancelled before
    /// launch; nothing was started.
    Skipped(String),
    /// The run could not be started (it was proposed Crashed), or was lost track of.
    FailedToSubmit(String),
    /// The process ran and ended with this status code.
    Exited(i64),
    /// The claim could not be journaled, so the run was left for another worker or poll.
    NotJournaled(String),
}

/// Submits `run`, or resumes the submission of `resume`, a claim journaled by an earlier
/// worker whose run was never launched; the journal entry and the shim's status file go
/// when the story is told.
pub(crate) async fn submit(
    ctx: Arc<RunContext>,
    run: FlowRun,
    resume: Option<Claim>,
    reads: Arc<PollReads>,
    cancel: CancellationToken,
    terminate: CancellationToken,
) -> Outcome {
    let id = run.id;
    let outcome = submit_journaled(&ctx, run, resume, &reads, cancel, terminate).await;
    if !matches!(outcome, Outcome::NotJournaled(_)) {
        forget(&ctx, id).await;
    }
    outcome
}

/// Drops a told run from the journal, then what its infrastructure kept of it.
pub(crate) async fn forget(ctx: &RunContext, id: uuid::Uuid) {
    if let Err(e) = ctx.journal.remove(id).await {
        tracing::warn!(error = %e, "could not remove the flow run from the claim journal");
    }
    ctx.infra.forget(id);
}

async fn submit_journaled(
    ctx: &RunContext,
    run: FlowRun,
    resume: Option<Claim>,
    reads: &PollReads,
    cancel: CancellationToken,
    terminate: CancellationToken,
) -> Outcome {
    let client = ctx.api();
    let mut log = RunLog::new(run.id, "prefect.flow_runs.worker");
    log.info(format!(
        "Worker '{}' {} flow run '{}'",
        ctx.worker_name,
        if resume.is_some() {
            "resuming the submission of"
        } else {
            "submitting"
        },
        run.id
    ));

    // 1. Claim first: journal it, then propose Pending; anything but an accepted Pending means
    // another worker has it, and nothing else is read for it (Prefect reads the deployment
    // before the claim, so every worker racing for a run reads it). A claim that cannot be journaled is not made: a crash would
    // leave the run Pending with nobody to finish it.
    let mut journaled = match resume {
        Some(claim) => claim,
        None => {
            let claimed = Claim::new(run.id);
            if let Err(e) = ctx.journal.record(&claimed).await {
                ctx.journal.refused_claim();
                let message = format!("not claiming flow run '{}': {e}", run.id);
                tracing::error!(error = ?e, "{message}");
                return Outcome::NotJournaled(message);
            }
            if let Err(why) = claim(client, &run).await {
                return Outcome::Skipped(why);
            }
            claimed
        }
    };

    // 2. The deployment must still exist (`BaseWorker._submit_run`: a run whose deployment is
    // gone is cancelled).
    let deployment = match run.deployment_id {
        None => None,
        Some(id) => match reads.deployment(client, id).await {
            Ok(Some(d)) => Some(d),
            Ok(None) => {
                let message = format!("Deployment {id} no longer exists, cancelled run.");
                tracing::error!("{message}");
                let state =
                    StateCreate::new(StateType::Cancelled, "Cancelled").with_message(&message);
                if let Err(e) = client.set_flow_run_state(run.id, &state, true).await {
                    tracing::warn!(error = %e, "could not cancel the run");
                }
                return Outcome::Skipped(message);
            }
            Err(e) => {
                let message = format!("Failed to submit flow run to infrastructure: {e}");
                return crash_before_start(ctx, &mut log, &run, message).await;
            }
        },
    };

    // 3. Everything the configuration and events need; a work pool copy frozen for this run.
    let pool = ctx.pool.read().expect("pool lock poisoned").clone();
    let flow = match reads.flow(client, run.flow_id).await {
        Ok(f) => f,
        Err(e) => {
            let message = format!("Failed to submit flow run to infrastructure: {e}");
            return crash_before_start(ctx, &mut log, &run, message).await;
        }
    };
    let deployment = deployment.as_deref();
    let config = match configure(ctx.infra.as_ref(), client, &pool, deployment, &run).await {
        Ok(config) => config,
        Err(message) => {
            let message = format!("Failed to submit flow run to infrastructure: {message}");
            return crash_before_start(ctx, &mut log, &run, message).await;
        }
    };

    // 4. submitted-flow-run, before labels and Submitting, as Prefect emits it; journaled
    // first, so a resumed submission sends the same event (the server keeps one per id).
    let submitted = journaled
        .submitted
        .get_or_insert_with(|| {
            let objects = flow_run_objects(&run, deployment, &flow, &pool);
            Event::new(
                names::WORKER_SUBMITTED_FLOW_RUN,
                ctx.resource.clone(),
                related::worker_flow_run_related(&objects),
            )
        })
        .clone();
    let spec = RunSpec {
        flow_run_id: run.id,
        flow_run_name: run.name.clone(),
        env: run_env(ctx, &run, &flow, deployment),
        labels: run_labels(ctx, &run, &flow, deployment, &pool),
        events: EventContext {
            sink: ctx.executor.sink.clone(),
            worker: ctx.resource.clone(),
            related: submitted.related.clone(),
        },
        reporter: Arc::new(crate::report::ApiReporter {
            api: ctx.executor.api.clone(),
            flow_run_id: run.id,
        }),
    };
    let job = match ctx.infra.prepare(&config, spec) {
        Ok(job) => job,
        Err(e @ PrepareError::Invalid(_)) => {
            let message = format!("Failed to submit flow run to infrastructure: {e}");
            return crash_before_start(ctx, &mut log, &run, message).await;
        }
        Err(e @ PrepareError::Unavailable(_)) => {
            return crash_before_start(ctx, &mut log, &run, e.to_string()).await;
        }
    };

    // What the job leaves on this machine (a temporary working directory) is journaled, so a
    // worker that re-adopts the run after a crash can remove it.
    if let Some(stale) = journaled.temp_dir.take() {
        let _ = std::fs::remove_dir_all(stale);
    }
    journaled.temp_dir = job.scratch_dir();
    if let Err(e) = ctx.journal.record(&journaled).await {
        tracing::error!(error = %e, "could not journal the submitted-flow-run event");
    }
    drop(journaled);
    ctx.executor.sink.emit(submitted.clone()).await;
    let pickup = run
        .expected_start_time
        .and_then(|expected| (chrono::Utc::now() - expected).to_std().ok());
    cohort_metrics::metrics().run_submitted(&ctx.worker_type, pickup);

    // 5. A run claimed as a burst of runs begins (at once, the pool being idle) waits for the
    // client to be done creating them: its writes and its flow's would slow the creation (on
    // SQLite every write waits for the one before), and the burst's other runs wait for its
    // end anyway. Bounded by `burst::MAX_WAIT`.
    ctx.burst.over().await;

    // 6. Labels (a failure does not stop the run; Prefect ignores it too), then Submitting.
    let labels = json!({
        "prefect.worker.name": ctx.worker_name,
        "prefect.worker.type": ctx.worker_type,
        "prefect.work-pool.name": pool.name,
        "prefect.work-pool.id": pool.id.to_string(),
    });
    if let Err(e) = client
        .update_flow_run_labels(run.id, labels.as_object().expect("object literal"))
        .await
    {
        tracing::warn!(error = %e, "could not label the flow run");
    }
    if ctx.executor.propose_submitting(&run, &cancel).await == Gate::Cancelled {
        return Outcome::Skipped("cancelled before execution started".into());
    }

    // 7. Launch and supervise.
    // What only the launch needed goes before the long wait: a task per running flow.
    drop(pool);
    let executed = ctx
        .executor
        .execute(
            &run,
            deployment,
            Some(&flow),
            job,
            &mut log,
            &cancel,
            &terminate,
        )
        .await;
    let executed = match executed {
        Ok(e) => e,
        // Could not start (already Crashed), or lost track of: no executed event, as Prefect.
        Err(NotExecuted::CouldNotStart(m) | NotExecuted::Lost(m)) => {
            count_finished(ctx, run.id).await;
            return Outcome::FailedToSubmit(m);
        }
    };

    // 8. executed-flow-run, linked to submitted.
    emit_executed(ctx, submitted.related.clone(), Some(&submitted), &executed).await;
    count_finished(ctx, run.id).await;
    Outcome::Exited(executed.status_code)
}

/// Counts a run whose supervision ended, by its state now (when metrics are served).
pub(crate) async fn count_finished(ctx: &RunContext, id: Uuid) {
    if !ctx.count_final_states {
        return;
    }
    let state = cohort_execution::cancel::current_state(ctx.api(), id).await;
    let state = state.map_or_else(|| "unknown".to_owned(), |s| format!("{s:?}").to_lowercase());
    cohort_metrics::metrics().run_finished(&ctx.worker_type, &state);
}

/// `executed-flow-run`: the run's related resources (those of its `submitted` event) plus the
/// infrastructure's identifier and status code, following `submitted`, when known, under
/// Prefect's 5-minute rule.
pub(crate) async fn emit_executed(
    ctx: &RunContext,
    related: Vec<cohort_events::RelatedResource>,
    submitted: Option<&Event>,
    executed: &Executed,
) {
    let related = related::with_infrastructure(related, &executed.pid, executed.status_code);
    let mut event = Event::new(
        names::WORKER_EXECUTED_FLOW_RUN,
        ctx.resource.clone(),
        related,
    );
    if let Some(submitted) = submitted {
        event = event.follow(submitted);
    }
    ctx.executor.sink.emit(event).await;
}

/// The objects a flow run's worker events relate to.
pub(crate) fn flow_run_objects(
    run: &FlowRun,
    deployment: Option<&Deployment>,
    flow: &Flow,
    pool: &WorkPool,
) -> FlowRunObjects {
    FlowRunObjects {
        deployment: deployment.map(|d| Named {
            id: d.id,
            name: d.name.clone(),
        }),
        flow: Some(Named {
            id: flow.id,
            name: flow.name.clone(),
        }),
        flow_run: Named {
            id: run.id,
            name: run.name.clone(),
        },
        tags: deployment
            .iter()
            .flat_map(|d| d.tags.iter())
            .chain(flow.tags.iter())
            .chain(run.tags.iter())
            .cloned()
            .collect(),
        work_pool: Some(Named {
            id: pool.id,
            name: pool.name.clone(),
        }),
    }
}

/// Renders the pool's base job template for this run (`BaseJobConfiguration.resolve_for_flow_run`);
/// the infrastructure reads the result into its own job.
/// The run's job configuration: the pool's base job template (or the infrastructure's own,
/// for an empty one) rendered with the deployment's and the run's job variables, its blocks
/// and Prefect variables resolved (`BaseJobConfiguration.from_template_and_values`).
pub(crate) async fn configure(
    infra: &dyn Infrastructure,
    client: &dyn PrefectApi,
    pool: &WorkPool,
    deployment: Option<&Deployment>,
    run: &FlowRun,
) -> Result<Map, String> {
    let empty = serde_json::Map::new();
    let deployment_vars = deployment
        .and_then(|d| d.job_variables.as_ref())
        .unwrap_or(&empty);
    let run_vars = run.job_variables.as_ref().unwrap_or(&empty);
    let values = cohort_template::merge_job_variables(deployment_vars, run_vars);
    let template = if pool
        .base_job_template
        .as_object()
        .is_some_and(|o| !o.is_empty())
    {
        pool.base_job_template.clone()
    } else {
        infra.default_base_job_template()
    };
    let mut config = cohort_template::render(&template, &values, &|name| std::env::var(name).ok())
        .map_err(|e| format!("TemplateError: {e}"))?;
    // Blocks before variables: a block's data may hold variable placeholders.
    let references = cohort_template::block_references(&config);
    if !references.is_empty() {
        let mut documents = std::collections::HashMap::new();
        for reference in references {
            let data = match &reference {
                BlockReference::Id(id) => client.read_block_document_data(id).await,
                BlockReference::Name {
                    block_type_slug,
                    block_document_name,
                } => {
                    client
                        .read_block_document_data_by_name(block_type_slug, block_document_name)
                        .await
                }
            }
            .map_err(|e| format!("could not read {reference}: {e}"))?;
            if let Some(data) = data {
                documents.insert(reference, data);
            }
        }
        cohort_template::resolve_blocks(&mut config, &documents)
            .map_err(|e| format!("TemplateError: {e}"))?;
    }
    let names = cohort_template::variable_references(&config);
    if !names.is_empty() {
        let mut found = std::collections::HashMap::new();
        for name in names {
            match client.read_variable(&name).await {
                Ok(Some(v)) => {
                    found.insert(name, v);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("could not read Prefect variable {name:?}: {e}")),
            }
        }
        cohort_template::resolve_variables(&mut config, &found);
    }
    cohort_template::validate_base_fields(&config).map_err(|e| format!("ValidationError: {e}"))?;
    Ok(config)
}

/// The labels every infrastructure gives a run before its job's own `labels`
/// (`prefect/workers/base.py: BaseJobConfiguration._base_flow_run_labels`,
/// `_base_work_pool_labels`, `_base_worker_name_label`, `_base_flow_labels`,
/// `_base_deployment_labels`).
fn run_labels(
    ctx: &RunContext,
    run: &FlowRun,
    flow: &Flow,
    deployment: Option<&Deployment>,
    pool: &WorkPool,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("prefect.io/flow-run-id".to_owned(), run.id.to_string()),
        ("prefect.io/flow-run-name".to_owned(), run.name.clone()),
        (
            "prefect.io/version".to_owned(),
            ctx.resource
                .get("prefect.version")
                .unwrap_or_default()
                .to_owned(),
        ),
        ("prefect.io/work-pool-name".to_owned(), pool.name.clone()),
        ("prefect.io/work-pool-id".to_owned(), pool.id.to_string()),
        ("prefect.io/worker-name".to_owned(), ctx.worker_name.clone()),
        ("prefect.io/flow-id".to_owned(), flow.id.to_string()),
        ("prefect.io/flow-name".to_owned(), flow.name.clone()),
    ]);
    if let Some(d) = deployment {
        labels.insert("prefect.io/deployment-id".into(), d.id.to_string());
        labels.insert("prefect.io/deployment-name".into(), d.name.clone());
        if let Some(updated) = d.updated {
            labels.insert(
                "prefect.io/deployment-updated".into(),
                python_isoformat(updated),
            );
        }
    }
    labels
}

/// Python's `datetime.isoformat()` of an aware UTC time (microseconds only when non-zero).
fn python_isoformat(t: chrono::DateTime<chrono::Utc>) -> String {
    if t.timestamp_subsec_micros() == 0 {
        t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}

/// The environment every infrastructure gives a flow run before its job's own `env`
/// (`prefect/workers/base.py: BaseJobConfiguration.prepare_for_flow_run`): the worker's
/// explicit `PREFECT_*` settings and the run's identifiers.
fn run_env(
    ctx: &RunContext,
    run: &FlowRun,
    flow: &Flow,
    deployment: Option<&Deployment>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = ctx.settings_env.iter().cloned().collect();
    env.insert("PREFECT__FLOW_RUN_ID".into(), run.id.to_string());
    env.insert("PREFECT__WORKER_NAME".into(), ctx.worker_name.clone());
    env.insert("PREFECT__FLOW_ID".into(), flow.id.to_string());
    env.insert("PREFECT__FLOW_NAME".into(), flow.name.clone());
    if let Some(d) = deployment {
        env.insert("PREFECT__DEPLOYMENT_ID".into(), d.id.to_string());
        env.insert("PREFECT__DEPLOYMENT_NAME".into(), d.name.clone());
    }
    env
}

async fn crash_before_start(
    ctx: &RunContext,
    log: &mut RunLog,
    run: &FlowRun,
    message: String,
) -> Outcome {
    log.error(format!(
        "Failed to submit flow run '{}' to infrastructure: {message}",
        run.name
    ));
    ctx.executor.ship(log).await;
    propose_crashed(ctx.api(), run.id, &message).await;
    Outcome::FailedToSubmit(message)
}
