//! Registration, the poll → claim → execute loop over the served deployments, and the
//! shutdown that pauses schedules and cancels what still runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cohort_api::models::{Deployment, FlowRun};
use cohort_api::retry::jittered;
use cohort_api::{while_starting, ApiError, NotReady, PrefectClient};
use cohort_events::related;
use cohort_events::subscriber::SubscriberConfig;
use cohort_events::{EventSink, EventsAuth};
use cohort_execution::cancel::{self, Cancellable};
use cohort_execution::execution::{claim, propose_crashed, Executor, Gate, NotExecuted, RunLog};
use cohort_process::ProcessInfrastructure;
use cohort_process::{find_python, Launch};
use cohort_supervise::LastPolled;
use cohort_supervise::{Role, Supervisor};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::inspect::{inspect, InspectError, ScheduleSpec};

/// One deployment to serve: `prefect flow serve ENTRYPOINT --name …`.
#[derive(Debug, Clone)]
pub struct ServeSpec {
    /// `path/to/file.py:function`, relative to the runner's working directory.
    pub entrypoint: String,
    /// The deployment's name.
    pub name: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub tags: Vec<String>,
    pub schedule: ScheduleSpec,
    pub parameters: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// The runner's name: the resource of its cancelled-flow-run events.
    pub name: String,
    /// At most this many runs at once; `None` is unlimited (`serve()`'s default).
    pub limit: Option<usize>,
    pub pause_on_shutdown: bool,
    pub query_interval: Duration,
    pub prefetch: Duration,
    pub webserver: Option<SocketAddr>,
    pub termination_grace: Duration,
    /// `PREFECT_*` settings passed on to flow-run processes.
    pub settings_env: Vec<(String, String)>,
    pub events_auth: EventsAuth,
    /// The deployments' `path` and the flow processes' working directory.
    pub cwd: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The entrypoint or schedule is wrong; nothing was registered.
    #[error("cannot serve {entrypoint:?}")]
    Inspect {
        entrypoint: String,
        #[source]
        source: InspectError,
    },
    /// The server will not do (a wrong URL or credentials); one that is down is waited for.
    #[error(transparent)]
    Server(#[from] NotReady),
    #[error("cannot register deployment {name:?}")]
    Register {
        name: String,
        #[source]
        source: ApiError,
    },
    #[error("cannot serve the runner webserver on {addr}")]
    Webserver {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A registered deployment this runner serves.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub id: Uuid,
    pub name: String,
    pub flow_name: String,
    pub entrypoint: String,
}

/// A runner with its deployments registered, ready to [`Runner::run`].
pub struct Runner {
    client: PrefectClient,
    options: RunnerOptions,
    served: Vec<Served>,
    prefect_version: String,
}

impl Runner {
    /// Loads every flow first (a bad entrypoint, flow file or schedule fails before anything
    /// is registered), then registers each flow and deployment.
    pub async fn start(
        client: PrefectClient,
        options: RunnerOptions,
        specs: Vec<ServeSpec>,
    ) -> Result<Self, RunnerError> {
        let mut infos = Vec::new();
        for spec in &specs {
            let info = inspect(&spec.entrypoint, &spec.schedule, &options.cwd)
                .await
                .map_err(|source| RunnerError::Inspect {
                    entrypoint: spec.entrypoint.clone(),
                    source,
                })?;
            infos.push(info);
        }
        // A server that is down is waited for, as the worker does.
        let prefect_version = cohort_api::wait_for_server(&client).await?;
        let mut served = Vec::new();
        for (spec, info) in specs.iter().zip(infos) {
            let register = |source| RunnerError::Register {
                name: spec.name.clone(),
                source,
            };
            // Both are upserts by name, sent again while the server is busy.
            let flow_id = while_starting(&client, "registering the flow", || {
                client.create_flow(&info.flow_name)
            })
            .await
            .map_err(register)?;
            // The shape `RunnerDeployment.aapply` sends (`prefect/deployments/runner.py`):
            // no work pool (the runner itself executes), the entrypoint relative to `path`.
            let body = json!({
                "name": spec.name,
                "flow_id": flow_id,
                "work_queue_name": null,
                "work_pool_name": null,
                "version": spec.version,
                "paused": false,
                "schedules": info.schedules,
                "concurrency_limit": null,
                "parameters": spec.parameters,
                "description": spec.description.clone().or(info.description.clone()),
                "tags": spec.tags,
                "path": options.cwd.display().to_string(),
                "entrypoint": spec.entrypoint,
                "storage_document_id": null,
                "infrastructure_document_id": null,
                "parameter_openapi_schema": info.parameter_openapi_schema,
                "enforce_parameter_schema": true,
                "job_variables": {},
            });
            let id = while_starting(&client, "registering the deployment", || {
                client.create_deployment(&body)
            })
            .await
            .map_err(register)?;
            tracing::info!(
                "Your flow '{}' is being served and polling for scheduled runs! To trigger a run: prefect deployment run '{}/{}'",
                info.flow_name, info.flow_name, spec.name
            );
            served.push(Served {
                id,
                name: spec.name.clone(),
                flow_name: info.flow_name,
                entrypoint: spec.entrypoint.clone(),
            });
        }
        Ok(Self {
            client,
            options,
            served,
            prefect_version,
        })
    }

    pub fn deployment_ids(&self) -> Vec<Uuid> {
        self.served.iter().map(|s| s.id).collect()
    }

    /// Serves until `shutdown` (or a `POST /shutdown`), then: stop claiming, pause the
    /// schedules (`--pause-on-shutdown`), cancel what still runs with "Runner is shutting
    /// down." (`Runner.stop` → `cancel_all`: SIGTERM, SIGKILL after the grace), and return
    /// once every run is finished. `hurry` (a second signal) cuts the grace short: the
    /// processes are killed at once, and still get their final state and events.
    pub async fn run(
        self,
        sink: Arc<dyn EventSink>,
        shutdown: CancellationToken,
        hurry: CancellationToken,
    ) -> Result<(), RunnerError> {
        let background = CancellationToken::new();
        let last_polled = LastPolled::new();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let web = match self.options.webserver {
            Some(addr) => Some(
                crate::webserver::serve(
                    addr,
                    crate::webserver::State {
                        client: self.client.clone(),
                        last_polled: last_polled.clone(),
                        window: self.options.query_interval * 2,
                        running: running.clone(),
                        shutdown: shutdown.clone(),
                        served: self.deployment_ids(),
                    },
                    background.clone(),
                )
                .await
                .map_err(|source| RunnerError::Webserver { addr, source })?,
            ),
            None => None,
        };
        // A runner cancels its runs when it stops, and does not re-adopt: no shims.
        let infra = Arc::new(ProcessInfrastructure::new(None).await);
        let executor = Arc::new(Executor {
            api: Arc::new(self.client.clone()),
            sink,
            runner_resource: related::runner_resource(&self.options.name, &self.prefect_version),
            termination_grace: self.options.termination_grace,
            hurry,
            cancel_on_shutdown: Some("Runner is shutting down."),
            logs: None,
        });
        let cancellable = Cancellable::default();
        // Restarted if it dies (cohort_supervise), until `background` stops it.
        let cancel_watch = {
            let feed = SubscriberConfig {
                api_url: self.client.api_url().clone(),
                auth: self.options.events_auth.clone(),
                user_agent: cohort_api::user_agent(),
                filter: json!({"event": {"name": cancel::CANCEL_EVENTS}}),
            };
            let (client, watched, interval, stop) = (
                self.client.clone(),
                cancellable.clone(),
                self.options.query_interval,
                background.clone(),
            );
            let tasks = Supervisor::default();
            tasks.spawn(
                "cancel-watcher",
                Role::Ready,
                background.clone(),
                move || {
                    cancel::watch(
                        client.clone(),
                        feed.clone(),
                        watched.clone(),
                        interval,
                        stop.clone(),
                    )
                },
            );
            tokio::spawn(async move { tasks.join().await })
        };

        let slots = self.options.limit.map(|n| Arc::new(Semaphore::new(n)));
        let terminate = CancellationToken::new();
        let mut runs: JoinSet<()> = JoinSet::new();
        let mut task_runs: HashMap<tokio::task::Id, Uuid> = HashMap::new();
        let mut next_poll = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(joined) = runs.join_next_with_id(), if !runs.is_empty() => {
                    let task = match &joined { Ok((t, ())) => *t, Err(e) => e.id() };
                    if let Some(id) = task_runs.remove(&task) {
                        cancellable.remove(&id);
                    }
                    if let Err(e) = joined {
                        tracing::error!(error = %e, "flow run supervisor failed");
                    }
                    running.store(runs.len(), std::sync::atomic::Ordering::Relaxed);
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    next_poll = tokio::time::Instant::now() + jittered(self.options.query_interval, 0.3);
                    let before = chrono::Utc::now()
                        + chrono::Duration::seconds(self.options.prefetch.as_secs() as i64);
                    let ids = self.deployment_ids();
                    let scheduled = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = self.client.get_scheduled_flow_runs_for_deployments(&ids, before) => r,
                    };
                    let mut scheduled = match scheduled {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "failed to poll for scheduled flow runs");
                            continue;
                        }
                    };
                    last_polled.touch();
                    // Soonest first, runs without a time last (`ScheduledRunPoller`).
                    scheduled.sort_by_key(|r| (r.next_scheduled_start_time.is_none(), r.next_scheduled_start_time));
                    for run in scheduled {
                        if task_runs.values().any(|id| *id == run.id) {
                            continue;
                        }
                        let permit = match &slots {
                            None => None,
                            Some(sem) => match sem.clone().try_acquire_owned() {
                                Ok(p) => Some(p),
                                Err(_) => break,
                            },
                        };
                        let id = run.id;
                        let served = self
                            .served
                            .iter()
                            .find(|s| Some(s.id) == run.deployment_id)
                            .cloned();
                        let Some(served) = served else { continue };
                        let cancel = cancellable.register(id);
                        let ctx = RunCtx {
                            client: self.client.clone(),
                            executor: executor.clone(),
                            infra: infra.clone(),
                            options: self.options.clone(),
                            served,
                        };
                        let terminate = terminate.child_token();
                        let handle = runs.spawn(
                            async move {
                                let _slot = permit;
                                ctx.execute(run, cancel, terminate).await;
                            }
                            .instrument(tracing::info_span!("flow_run", id = %id)),
                        );
                        task_runs.insert(handle.id(), id);
                    }
                    running.store(runs.len(), std::sync::atomic::Ordering::Relaxed);
                }
            }
        }

        tracing::info!("runner shutting down: no new flow runs will be claimed");
        if self.options.pause_on_shutdown {
            for served in &self.served {
                if let Err(e) = self
                    .client
                    .update_deployment(served.id, &json!({"paused": true}))
                    .await
                {
                    tracing::warn!(deployment = %served.name, error = %e, "could not pause the deployment's schedule");
                }
            }
        }
        terminate.cancel();
        while runs.join_next().await.is_some() {}
        background.cancel();
        let _ = cancel_watch.await;
        if let Some(web) = web {
            let _ = web.await;
        }
        Ok(())
    }
}

/// What one run of the runner needs.
struct RunCtx {
    client: PrefectClient,
    executor: Arc<Executor>,
    infra: Arc<ProcessInfrastructure>,
    options: RunnerOptions,
    served: Served,
}

impl RunCtx {
    async fn execute(self, run: FlowRun, cancel: CancellationToken, terminate: CancellationToken) {
        let client = &self.client;
        let mut log = RunLog::new(run.id, "prefect.flow_runs.runner");
        if claim(client, &run).await.is_err() {
            return;
        }
        if self.executor.propose_submitting(&run, &cancel).await == Gate::Cancelled {
            return;
        }
        log.info(format!(
            "Runner '{}' submitting flow run '{}'",
            self.options.name, run.id
        ));
        let deployment: Option<Deployment> =
            client.read_deployment(self.served.id).await.ok().flatten();
        let flow = client.read_flow(run.flow_id).await.ok();
        let Some(python) = find_python() else {
            let message = "Flow run could not start: no `python` or `python3` on PATH to run the Prefect engine with";
            log.error(message.to_owned());
            log.flush(client).await;
            propose_crashed(client, run.id, message).await;
            return;
        };
        let storage = match tempfile::Builder::new().prefix("cohort-runner-").tempdir() {
            Ok(d) => d,
            Err(e) => {
                let message =
                    format!("Flow run could not start: cannot create a temporary directory: {e}");
                propose_crashed(client, run.id, &message).await;
                return;
            }
        };
        // The environment `Runner._run_process` gives an entrypoint deployment's engine.
        let mut env: std::collections::BTreeMap<String, String> =
            self.options.settings_env.iter().cloned().collect();
        env.insert("PREFECT__FLOW_RUN_ID".into(), run.id.to_string());
        env.insert("PREFECT__DEPLOYMENT_NAME".into(), self.served.name.clone());
        env.insert(
            "PREFECT__FLOW_ENTRYPOINT".into(),
            self.served.entrypoint.clone(),
        );
        env.insert(
            "PREFECT__STORAGE_BASE_PATH".into(),
            storage.path().display().to_string(),
        );
        let launch = Launch {
            program: python.display().to_string(),
            args: vec!["-m".into(), "prefect.engine".into()],
            env,
            env_remove: vec![],
            cwd: self.options.cwd.clone(),
            stream_output: true,
            shim: None,
        };
        match self
            .executor
            .execute(
                &run,
                deployment.as_ref(),
                flow.as_ref(),
                self.infra.job(launch),
                &mut log,
                &cancel,
                &terminate,
            )
            .await
        {
            Ok(executed) => {
                tracing::info!(status_code = executed.status_code, flow = %self.served.flow_name, "flow run process ended")
            }
            Err(NotExecuted::CouldNotStart(m) | NotExecuted::Lost(m)) => tracing::warn!("{m}"),
        }
        drop(storage);
    }
}
