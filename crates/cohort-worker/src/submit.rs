//! One flow run, from claim to `executed-flow-run`: the submission pipeline of
//! `prefect/workers/base.py: BaseWorker._submit_run` and `_submit_run_and_capture_errors`, with
//! the process infrastructure of `prefect/workers/process.py` in place of `run()`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cohort_api::models::{Deployment, Flow, FlowRun, StateCreate, StateType, WorkPool};
use cohort_api::PrefectClient;
use cohort_events::related::{self, FlowRunObjects, Named};
use cohort_events::{names, Event, EventSink};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use cohort_template::BlockReference;

use crate::job::ProcessJob;
use cohort_process::exit_codes::{crashed_message, exit_info};
use cohort_process::{find_python, FlowRunProcess, Launch};

/// What every run of one worker shares.
pub(crate) struct RunContext {
    pub client: PrefectClient,
    pub sink: Arc<dyn EventSink>,
    pub worker_name: String,
    pub worker_type: String,
    pub resource: cohort_events::Resource,
    pub pool: Arc<RwLock<WorkPool>>,
    /// `PREFECT_*` settings set explicitly for the worker, passed on to the flow.
    pub settings_env: Vec<(String, String)>,
    /// SIGTERM → SIGKILL grace when a run must be stopped.
    pub termination_grace: Duration,
}

/// The flow-run log lines the worker writes, shipped to `POST /logs/` so they show in the
/// Prefect UI next to the flow's own, as Prefect's worker does (logger
/// `prefect.flow_runs.worker`, `prefect/workers/base.py: BaseWorker.get_flow_run_logger`).
struct RunLog {
    flow_run_id: Uuid,
    entries: Vec<serde_json::Value>,
}

impl RunLog {
    fn new(flow_run_id: Uuid) -> Self {
        Self {
            flow_run_id,
            entries: Vec::new(),
        }
    }

    fn info(&mut self, message: String) {
        tracing::info!("{message}");
        self.push(20, message);
    }

    fn error(&mut self, message: String) {
        tracing::error!("{message}");
        self.push(40, message);
    }

    fn push(&mut self, level: u8, message: String) {
        self.entries.push(json!({
            "name": "prefect.flow_runs.worker",
            "level": level,
            "message": message,
            "timestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "flow_run_id": self.flow_run_id,
            "task_run_id": null,
        }));
    }

    /// Ships what was logged so far; a failure costs log lines, never the run.
    async fn flush(&mut self, client: &PrefectClient) {
        if self.entries.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.entries);
        if let Err(e) = client.create_logs(&entries).await {
            tracing::debug!(error = %e, "could not ship flow-run logs");
        }
    }
}

/// How a submission ended, for the worker's bookkeeping and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The run is not ours (Pending rejected or aborted) or it vanished; nothing was started.
    Skipped(String),
    /// The run could not be started; it was proposed Crashed.
    FailedToSubmit(String),
    /// The process ran and exited with this status code.
    Exited(i64),
}

pub(crate) async fn submit(
    ctx: Arc<RunContext>,
    run: FlowRun,
    terminate: CancellationToken,
) -> Outcome {
    let mut log = RunLog::new(run.id);
    log.info(format!(
        "Worker '{}' submitting flow run '{}'",
        ctx.worker_name, run.id
    ));

    // 1. The deployment must still exist (`BaseWorker._submit_run`).
    let deployment = match run.deployment_id {
        None => None,
        Some(id) => match ctx.client.read_deployment(id).await {
            Ok(Some(d)) => Some(d),
            Ok(None) => {
                let message = format!("Deployment {id} no longer exists, cancelled run.");
                tracing::error!("{message}");
                let state =
                    StateCreate::new(StateType::Cancelled, "Cancelled").with_message(&message);
                if let Err(e) = ctx.client.set_flow_run_state(run.id, &state, true).await {
                    tracing::warn!(error = %e, "could not cancel the run");
                }
                return Outcome::Skipped(message);
            }
            Err(e) => return Outcome::Skipped(format!("could not read its deployment: {e}")),
        },
    };

    // 2. Claim: propose Pending; anything but an accepted Pending means another worker has it.
    match ctx
        .client
        .set_flow_run_state(
            run.id,
            &StateCreate::new(StateType::Pending, "Pending"),
            false,
        )
        .await
    {
        Ok(r)
            if r.state
                .as_ref()
                .is_some_and(|s| s.state_type == StateType::Pending)
                && r.status == cohort_api::models::SetStateStatus::Accept => {}
        Ok(r) => {
            let state = r
                .state
                .as_ref()
                .map(|s| format!("{:?}", s.state_type).to_uppercase());
            let why = format!(
                "Aborted submission of flow run '{}': Server returned a non-pending state '{}'",
                run.id,
                state.unwrap_or_else(|| "UNKNOWN".into())
            );
            tracing::info!(reason = r.reason().unwrap_or(""), "{why}");
            return Outcome::Skipped(why);
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not claim flow run; leaving it for the next poll");
            return Outcome::Skipped(format!("claim failed: {e}"));
        }
    }

    // 3. Everything the configuration and events need; a work pool copy frozen for this run.
    let pool = ctx.pool.read().expect("pool lock poisoned").clone();
    let flow = match ctx.client.read_flow(run.flow_id).await {
        Ok(f) => f,
        Err(e) => {
            return crash_before_start(
                &ctx,
                &mut log,
                &run,
                format!("Failed to submit flow run to infrastructure: {e}"),
            )
            .await;
        }
    };
    let job = match configure(&ctx.client, &pool, deployment.as_ref(), &run).await {
        Ok(job) => job,
        Err(message) => {
            return crash_before_start(
                &ctx,
                &mut log,
                &run,
                format!("Failed to submit flow run to infrastructure: {message}"),
            )
            .await;
        }
    };

    // 4. submitted-flow-run, before labels and Submitting, as Prefect emits it.
    let objects = FlowRunObjects {
        deployment: deployment.as_ref().map(|d| Named {
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
    };
    let related = related::worker_flow_run_related(&objects);
    let submitted = Event::new(
        names::WORKER_SUBMITTED_FLOW_RUN,
        ctx.resource.clone(),
        related.clone(),
    );
    ctx.sink.emit(submitted.clone());

    // 5. Labels and Submitting; neither failure stops the run (Prefect ignores them too).
    let labels = json!({
        "prefect.worker.name": ctx.worker_name,
        "prefect.worker.type": ctx.worker_type,
        "prefect.work-pool.name": pool.name,
        "prefect.work-pool.id": pool.id.to_string(),
    });
    if let Err(e) = ctx
        .client
        .update_flow_run_labels(run.id, labels.as_object().expect("object literal"))
        .await
    {
        tracing::warn!(error = %e, "could not label the flow run");
    }
    if let Err(e) = ctx
        .client
        .set_flow_run_state(
            run.id,
            &StateCreate::new(StateType::Pending, "Submitting"),
            false,
        )
        .await
    {
        tracing::warn!(error = %e, "could not propose Submitting");
    }

    // 6. Launch.
    let workdir = match WorkDir::new(job.working_dir.clone()) {
        Ok(w) => w,
        Err(e) => {
            return crash_before_start(
                &ctx,
                &mut log,
                &run,
                format!("Flow run could not start: cannot create a working directory: {e}"),
            )
            .await;
        }
    };
    let launch = match launch_spec(&ctx, &run, &flow, deployment.as_ref(), &job, workdir.path()) {
        Ok(l) => l,
        Err(message) => return crash_before_start(&ctx, &mut log, &run, message).await,
    };
    let mut process = match FlowRunProcess::spawn(&launch) {
        Ok(p) => p,
        Err(e) => {
            // `prefect/runner/_flow_run_executor.py: FlowRunExecutor.submit` words it so.
            return crash_before_start(
                &ctx,
                &mut log,
                &run,
                format!("Flow run could not start: {e}"),
            )
            .await;
        }
    };
    let pid = process.pid().to_string();
    if let Err(e) = ctx.client.set_infrastructure_pid(run.id, &pid).await {
        tracing::error!(error = %e, "An error occurred while setting the `infrastructure_pid` on flow run; it will not be cancellable");
    }
    log.info(format!(
        "Flow run '{}' submitted to infrastructure",
        run.name
    ));
    log.flush(&ctx.client).await;

    // 7. Supervise until it exits, or until the worker must stop it.
    let status = tokio::select! {
        status = process.wait() => status,
        _ = terminate.cancelled() => {
            tracing::warn!(pid = %pid, "stopping flow run: the worker is shutting down");
            process.terminate(ctx.termination_grace).await
        }
    };
    let code = match status {
        Ok(code) => code,
        Err(e) => {
            // `Lost connection to flow run infrastructure`: no state change, no executed event.
            tracing::error!(error = %e, "Lost connection to flow run '{}' infrastructure. The flow run's final state will be determined by the execution environment.", run.name);
            return Outcome::FailedToSubmit(e.to_string());
        }
    };
    drop(workdir);

    // 8. A non-zero exit of a run that did not reach a final state is a crash.
    if code != 0 {
        let message = crashed_message(code);
        log.error(message.clone());
        log.info(exit_info(code).resolution.to_owned());
        log.flush(&ctx.client).await;
        propose_crashed(&ctx.client, run.id, &message).await;
    }

    // 9. executed-flow-run, linked to submitted under the 5-minute rule.
    let related = related::with_infrastructure(related, &pid, code);
    let executed = Event::new(
        names::WORKER_EXECUTED_FLOW_RUN,
        ctx.resource.clone(),
        related,
    )
    .follow(&submitted);
    ctx.sink.emit(executed);
    Outcome::Exited(code)
}

/// Renders the pool's base job template for this run (`BaseJobConfiguration.resolve_for_flow_run`).
async fn configure(
    client: &PrefectClient,
    pool: &WorkPool,
    deployment: Option<&Deployment>,
    run: &FlowRun,
) -> Result<ProcessJob, String> {
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
        cohort_template::default_process_base_job_template()
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
    ProcessJob::from_config(&config).map_err(|e| format!("ValidationError: {e}"))
}

/// The command and environment contract of the Python process worker
/// (`prefect/workers/base.py: BaseJobConfiguration.prepare_for_flow_run`,
/// `prefect/workers/process.py: ProcessJobConfiguration.prepare_for_flow_run`).
fn launch_spec(
    ctx: &RunContext,
    run: &FlowRun,
    flow: &Flow,
    deployment: Option<&Deployment>,
    job: &ProcessJob,
    cwd: &std::path::Path,
) -> Result<Launch, String> {
    let (program, args) = match &job.command {
        Some(words) => (words[0].clone(), words[1..].to_vec()),
        None => {
            let python = find_python().ok_or_else(|| {
                "Flow run could not start: no `python` or `python3` on PATH to run the Prefect engine with".to_string()
            })?;
            (
                python.display().to_string(),
                vec!["-m".into(), "prefect.engine".into()],
            )
        }
    };
    let mut env: BTreeMap<String, String> = ctx.settings_env.iter().cloned().collect();
    env.insert("PREFECT__FLOW_RUN_ID".into(), run.id.to_string());
    env.insert("PREFECT__WORKER_NAME".into(), ctx.worker_name.clone());
    env.insert("PREFECT__FLOW_ID".into(), flow.id.to_string());
    env.insert("PREFECT__FLOW_NAME".into(), flow.name.clone());
    if let Some(d) = deployment {
        env.insert("PREFECT__DEPLOYMENT_ID".into(), d.id.to_string());
        env.insert("PREFECT__DEPLOYMENT_NAME".into(), d.name.clone());
    }
    let mut env_remove = Vec::new();
    for (key, value) in &job.env {
        match value {
            Some(v) => {
                env.insert(key.clone(), v.clone());
            }
            None => {
                env.remove(key);
            }
        }
    }
    // A flow process must not think it is the worker's own supervisor.
    env_remove.push("PREFECT__WORKER_ID".into());
    Ok(Launch {
        program,
        args,
        env,
        env_remove,
        cwd: cwd.to_path_buf(),
        stream_output: job.stream_output,
    })
}

/// The configured working directory, or a temporary one removed when the run ends
/// (`tempfile.TemporaryDirectory(suffix="prefect")` in the Python worker).
enum WorkDir {
    Given(PathBuf),
    Temporary(tempfile::TempDir),
}

impl WorkDir {
    fn new(given: Option<PathBuf>) -> std::io::Result<Self> {
        match given {
            Some(p) => Ok(WorkDir::Given(p)),
            None => Ok(WorkDir::Temporary(
                tempfile::Builder::new().suffix("prefect").tempdir()?,
            )),
        }
    }

    fn path(&self) -> &std::path::Path {
        match self {
            WorkDir::Given(p) => p,
            WorkDir::Temporary(t) => t.path(),
        }
    }
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
    log.flush(&ctx.client).await;
    propose_crashed(&ctx.client, run.id, &message).await;
    Outcome::FailedToSubmit(message)
}

/// Proposes Crashed; an ABORT (the run already reached a final state) is expected and quiet.
async fn propose_crashed(client: &PrefectClient, id: Uuid, message: &str) {
    let state = StateCreate::new(StateType::Crashed, "Crashed").with_message(message);
    match client.set_flow_run_state(id, &state, false).await {
        Ok(r) => tracing::debug!(flow_run = %id, status = ?r.status, "proposed Crashed"),
        Err(e) if e.is_not_found() => {}
        Err(e) => tracing::warn!(flow_run = %id, error = %e, "could not propose Crashed"),
    }
}
