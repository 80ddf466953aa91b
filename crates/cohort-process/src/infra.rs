//! The `process` infrastructure of the worker's seam: each flow run a local process in its own
//! process group, behind a [shim](crate::shim) that outlives the worker, told of cancellations
//! over the engine's [control channel](crate::control) (`prefect/workers/process.py:
//! ProcessWorker`, `prefect/runner/_flow_run_executor.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cohort_infra::{
    BoxFuture, CancelSignal, Infrastructure, Job, Map, PrepareError, RunSpec, Started,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::control::{Attempt, ControlListener, Intent, SignalStatus};
use crate::job::ProcessJob;
use crate::process::{find_python, FlowRunProcess, Launch};
use crate::shim::ShimSpec;
use cohort_infra::exit_codes::{crashed_message, exit_info};

/// The work pool type this infrastructure serves.
pub const PROCESS: &str = "process";

/// How long the engine gets to acknowledge a cancel intent (Prefect: 1 s).
const INTENT_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Where flow runs' shims come from and record their status.
#[derive(Debug, Clone)]
pub struct Shims {
    /// The `cohort` executable (it runs the shim as a hidden command).
    pub exe: PathBuf,
    /// One status file per run: `<dir>/<flow run id>.json`.
    pub dir: PathBuf,
}

impl Shims {
    /// This executable, recording under `dir` (created if missing).
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            exe: std::env::current_exe()?,
            dir,
        })
    }

    pub fn status_path(&self, flow_run: Uuid) -> PathBuf {
        self.dir.join(format!("{flow_run}.json"))
    }

    fn spec(&self, flow_run: Uuid) -> ShimSpec {
        ShimSpec {
            exe: self.exe.clone(),
            status: self.status_path(flow_run),
        }
    }
}

/// Flow runs as local processes.
pub struct ProcessInfrastructure {
    /// `None` starts flows directly (they die with their supervisor and are not re-adopted).
    shims: Option<Shims>,
    /// `None` when it could not be opened: then a cancel is a plain SIGTERM, and the engine
    /// reports Crashed before Cancelled is forced.
    control: Option<Arc<ControlListener>>,
}

impl ProcessInfrastructure {
    /// Opens the engine control channel (a failure only costs cancellations their intent).
    pub async fn new(shims: Option<Shims>) -> Self {
        let control = match ControlListener::bind().await {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the engine control channel; cancellations will be plain SIGTERMs");
                None
            }
        };
        Self { shims, control }
    }

    /// A job for a launch its caller built (the runner knows its own command and environment).
    pub fn job(&self, launch: Launch) -> Box<dyn Job> {
        Box::new(ProcessRun {
            program: Some((launch.program, launch.args)),
            env: launch.env,
            env_remove: launch.env_remove,
            cwd: launch.cwd,
            workdir: None,
            stream_output: launch.stream_output,
            shim: launch.shim,
            control: self.control.clone(),
        })
    }
}

impl Infrastructure for ProcessInfrastructure {
    fn worker_type(&self) -> &'static str {
        PROCESS
    }

    fn default_base_job_template(&self) -> serde_json::Value {
        cohort_template::default_process_base_job_template()
    }

    /// The command and environment contract of Prefect's process worker
    /// (`prefect/workers/process.py: ProcessJobConfiguration.prepare_for_flow_run`).
    fn prepare(&self, config: &Map, spec: RunSpec) -> Result<Box<dyn Job>, PrepareError> {
        let job =
            ProcessJob::from_config(config).map_err(|e| PrepareError::Invalid(e.to_string()))?;
        let workdir = WorkDir::new(job.working_dir.clone()).map_err(|e| {
            PrepareError::Unavailable(format!("cannot create a working directory: {e}"))
        })?;
        let mut env = spec.env;
        cohort_template::fields::apply_env(&mut env, &job.env);
        Ok(Box::new(ProcessRun {
            program: job
                .command
                .map(|words| (words[0].clone(), words[1..].to_vec())),
            env,
            // A flow process must not think it is the worker's own supervisor.
            env_remove: vec!["PREFECT__WORKER_ID".into()],
            cwd: workdir.path().to_path_buf(),
            workdir: Some(workdir),
            stream_output: job.stream_output,
            shim: self.shims.as_ref().map(|s| s.spec(spec.flow_run_id)),
            control: self.control.clone(),
        }))
    }

    fn adopt<'a>(
        &'a self,
        flow_run: Uuid,
        legacy_status: Option<&'a Path>,
        _configuration: Option<&'a Map>,
    ) -> BoxFuture<'a, Option<Box<dyn Started>>> {
        Box::pin(async move {
            let status = match (legacy_status, &self.shims) {
                (Some(file), _) => file.to_path_buf(),
                (None, Some(shims)) => shims.status_path(flow_run),
                (None, None) => return None,
            };
            let process = FlowRunProcess::adopt(&status)?;
            Some(Box::new(ProcessStarted {
                process,
                attempt: None,
                _workdir: None,
            }) as Box<dyn Started>)
        })
    }

    fn forget(&self, flow_run: Uuid) {
        if let Some(shims) = &self.shims {
            let _ = std::fs::remove_file(shims.status_path(flow_run));
        }
    }
}

/// A flow-run process ready to start.
struct ProcessRun {
    /// `None` runs Prefect's engine with the `python` on `PATH`, found at launch.
    program: Option<(String, Vec<String>)>,
    env: BTreeMap<String, String>,
    env_remove: Vec<String>,
    cwd: PathBuf,
    /// Kept (and a temporary one removed) until the run ends.
    workdir: Option<WorkDir>,
    stream_output: bool,
    shim: Option<ShimSpec>,
    control: Option<Arc<ControlListener>>,
}

impl Job for ProcessRun {
    fn scratch_dir(&self) -> Option<PathBuf> {
        match &self.workdir {
            Some(WorkDir::Temporary(t)) => Some(t.path().to_path_buf()),
            _ => None,
        }
    }

    fn launch(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Started>, String>> {
        Box::pin(async move {
            let ProcessRun {
                program,
                mut env,
                env_remove,
                cwd,
                workdir,
                stream_output,
                shim,
                control,
            } = *self;
            let (program, args) = match program {
                Some(p) => p,
                None => {
                    let python = find_python().ok_or_else(|| {
                        "no `python` or `python3` on PATH to run the Prefect engine with"
                            .to_string()
                    })?;
                    (
                        python.display().to_string(),
                        vec!["-m".into(), "prefect.engine".into()],
                    )
                }
            };
            let attempt = control.as_ref().map(|c| c.register());
            if let Some(attempt) = &attempt {
                env.extend(attempt.env());
                // The supervisor owns Cancelled and the crashed/cancellation hooks when the
                // channel is up (`prefect/runner/_flow_run_executor.py`).
                env.insert(
                    "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS".into(),
                    "false".into(),
                );
            }
            let launch = Launch {
                program,
                args,
                env,
                env_remove,
                cwd,
                stream_output,
                shim,
            };
            let mut process = FlowRunProcess::spawn(&launch).map_err(|e| e.to_string())?;
            process.started(&launch).await.map_err(|e| e.to_string())?;
            Ok(Box::new(ProcessStarted {
                process,
                attempt,
                _workdir: workdir,
            }) as Box<dyn Started>)
        })
    }
}

/// A started flow-run process with, when launched by this worker, its control channel.
struct ProcessStarted {
    process: FlowRunProcess,
    /// `None` for a run re-adopted after a restart.
    attempt: Option<Attempt>,
    _workdir: Option<WorkDir>,
}

impl Started for ProcessStarted {
    fn identifier(&self) -> String {
        self.process.pid().to_string()
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(self.process.wait())
    }

    fn stop(
        &mut self,
        grace: Duration,
        hurry: CancellationToken,
    ) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(async move {
            self.process
                .terminate_or(grace, hurry.cancelled_owned())
                .await
        })
    }

    fn concluded(&self) -> bool {
        self.attempt
            .as_ref()
            .is_some_and(|a| a.conclusion().is_some())
    }

    fn signal_cancel(&self) -> BoxFuture<'_, CancelSignal> {
        Box::pin(async move {
            match &self.attempt {
                None => CancelSignal::NoChannel,
                Some(attempt) => match attempt.signal(Intent::Cancel, INTENT_ACK_TIMEOUT).await {
                    SignalStatus::AlreadyConcluded => CancelSignal::AlreadyConcluded,
                    status => CancelSignal::Sent(format!("{status:?}")),
                },
            }
        })
    }

    fn crashed_message(&self, code: i64) -> String {
        crashed_message(code)
    }

    fn crash_resolution(&self, code: i64) -> Option<String> {
        Some(exit_info(code).resolution.to_owned())
    }
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

    fn path(&self) -> &Path {
        match self {
            WorkDir::Given(p) => p,
            WorkDir::Temporary(t) => t.path(),
        }
    }
}
