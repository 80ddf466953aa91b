//! The seam between the worker's pipeline (poll → claim → submit → supervise → events), written
//! once, and the infrastructure a flow run runs on: a local process (`cohort-process`), a Docker
//! container (`cohort-docker`). Prefect draws the same line between `BaseWorker` and each
//! worker's `run()` / `kill_infrastructure()` (`prefect/workers/base.py`).
//!
//! An infrastructure turns a rendered job configuration into a [`Job`] ([`Infrastructure::prepare`]),
//! a job into something [`Started`] ([`Job::launch`]), and finds what an earlier worker of the
//! same name started ([`Infrastructure::adopt`]). Everything else — states, events, the journal,
//! cancellation, crash reports — stays in the worker.

#![forbid(unsafe_code)]

pub mod exit_codes;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cohort_events::{EventSink, RelatedResource, Resource};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The futures of the seam's object-safe traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A rendered job configuration (`BaseJobConfiguration` after `resolve_for_flow_run`).
pub type Map = serde_json::Map<String, serde_json::Value>;

/// One kind of infrastructure: the pool type it serves and how runs are started on it.
pub trait Infrastructure: Send + Sync + 'static {
    /// `process` | `docker`: the work pool type served, and the worker's `prefect.worker-type`.
    fn worker_type(&self) -> &'static str;

    /// The base job template of a pool created by this worker, or found with an empty one
    /// (`BaseWorker.get_default_base_job_template`).
    fn default_base_job_template(&self) -> serde_json::Value;

    /// What the worker channel's hello says of the infrastructure (`worker_metadata`).
    fn channel_hello(&self) -> ChannelHello {
        ChannelHello::default()
    }

    /// Reads a rendered configuration into a job ready to launch (pydantic's validation of the
    /// worker's `JobConfiguration` plus its `prepare_for_flow_run`). An error is the run's
    /// Crashed message.
    fn prepare(&self, config: &Map, spec: RunSpec) -> Result<Box<dyn Job>, PrepareError>;

    /// What an earlier worker of this name and `PREFECT_HOME` started for `flow_run`, found
    /// again after a restart: still running, or ended meanwhile with its status code.
    /// `legacy_status` is where an older release recorded it, if the journal says so;
    /// `configuration` is the run's job configuration rendered now, for an infrastructure that
    /// [needs it](Infrastructure::adopts_by_configuration) to know where to look.
    fn adopt<'a>(
        &'a self,
        flow_run: Uuid,
        legacy_status: Option<&'a Path>,
        configuration: Option<&'a Map>,
    ) -> BoxFuture<'a, Option<Box<dyn Started>>>;

    /// Whether [`Infrastructure::adopt`] needs the run's configuration (a Kubernetes run's
    /// `cluster_config` and namespace): the worker then renders it first, at the cost of
    /// reading the run and its deployment.
    fn adopts_by_configuration(&self) -> bool {
        false
    }

    /// Runs an earlier worker of this name and pool started that are still running on the
    /// infrastructure and that it can find by itself (by label), beyond the `journaled` ones:
    /// a worker whose disk did not survive it (a rescheduled pod) takes them up again.
    fn orphans<'a>(
        &'a self,
        _worker_name: &'a str,
        _pool_id: Uuid,
        _journaled: &'a [Uuid],
    ) -> BoxFuture<'a, Vec<Uuid>> {
        Box::pin(async { Vec::new() })
    }

    /// The worker stops (after its runs are told): what the infrastructure made for the
    /// worker as a whole goes (prefect-kubernetes' API key Secret, `KubernetesWorker.teardown`).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Drops what the infrastructure kept on this machine about a run whose story is told.
    fn forget(&self, _flow_run: Uuid) {}

    /// At start-up, after recovery: removes what earlier workers of this name and pool left
    /// behind for runs whose story is told (none of `journaled`), and that no longer runs.
    fn sweep<'a>(
        &'a self,
        _worker_name: &'a str,
        _pool_id: Uuid,
        _journaled: &'a [Uuid],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Stops the infrastructure an identifier names, gracefully then forcibly after `grace`
    /// (`BaseWorker.kill_infrastructure`): the server's clean-up of a run stuck in Cancelling.
    /// `configuration` is the run's job configuration rendered now, when it could be: it says
    /// how to reach the infrastructure (a Kubernetes run's `cluster_config`), not what was
    /// submitted.
    fn kill<'a>(
        &'a self,
        _identifier: &'a str,
        _configuration: Option<&'a Map>,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<(), KillError>> {
        Box::pin(async { Err(KillError::Unsupported) })
    }
}

/// Why [`Infrastructure::kill`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    /// Nothing by that identifier exists (any more): the clean-up is done.
    #[error("no infrastructure by that identifier")]
    NotFound,
    /// This infrastructure cannot be killed by identifier.
    #[error("this worker type cannot stop infrastructure by identifier")]
    Unsupported,
    /// It could not be reached now; worth another delivery.
    #[error("the infrastructure is not available: {0}")]
    Unavailable(String),
}

/// A worker-channel hello's infrastructure-specific part.
#[derive(Debug, Clone, Default)]
pub struct ChannelHello {
    pub worker_metadata: Option<serde_json::Value>,
    /// The worker handles the server's `cancelling_timeout_teardown.v1` clean-ups with
    /// [`Infrastructure::kill`] (Prefect asks for them for worker classes that implement
    /// `kill_infrastructure`: `prefect/workers/_cleanup_handlers.py`).
    pub handles_cleanup: bool,
}

/// What every infrastructure is given for one run beyond its job configuration.
pub struct RunSpec {
    pub flow_run_id: Uuid,
    pub flow_run_name: String,
    /// The environment of Prefect's `BaseJobConfiguration.prepare_for_flow_run`: the worker's
    /// explicit `PREFECT_*` settings and the `PREFECT__*` run identifiers. The job's own `env`
    /// goes on top of it (a `null` value unsets).
    pub env: BTreeMap<String, String>,
    /// The labels Prefect gives the run's infrastructure before the job's own `labels`
    /// (`prefect/workers/base.py: BaseJobConfiguration.prepare_for_flow_run`):
    /// `prefect.io/flow-run-id`, `…/flow-run-name`, `…/version`, the pool, worker, flow and
    /// deployment.
    pub labels: BTreeMap<String, String>,
    /// Where infrastructure events go, and what they relate to.
    pub events: EventContext,
    /// What the infrastructure may tell the server of the run beyond events.
    pub reporter: Arc<dyn RunReporter>,
}

/// What an infrastructure that watches its runs from outside (prefect-kubernetes' observer)
/// tells the server of them: lines in the run's log, and that the run waits on its
/// infrastructure.
pub trait RunReporter: Send + Sync + 'static {
    /// Writes `messages` to the run's log as logger `logger` at Python level `level`, in one
    /// request.
    fn log(&self, logger: &'static str, level: u8, messages: Vec<String>)
        -> BoxFuture<'static, ()>;

    /// Proposes `Pending` named `name` with `message`, only while the run is still Pending
    /// under another name: a run that is running, final, paused or cancelling keeps its state.
    fn propose_pending(&self, name: &'static str, message: &'static str) -> BoxFuture<'static, ()>;
}

/// A reporter that tells nothing: for runs whose reports have nowhere to go.
pub struct Silent;

impl RunReporter for Silent {
    fn log(
        &self,
        _logger: &'static str,
        _level: u8,
        _messages: Vec<String>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn propose_pending(
        &self,
        _name: &'static str,
        _message: &'static str,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The run's worker and related resources, for events an infrastructure emits itself
/// (prefect-docker's `prefect.docker.container.*`).
#[derive(Clone)]
pub struct EventContext {
    pub sink: Arc<dyn EventSink>,
    /// The worker (`prefect.worker.<type>.<slug>`).
    pub worker: Resource,
    /// The run's related resources, as on its `submitted-flow-run` event.
    pub related: Vec<RelatedResource>,
}

/// A configuration the infrastructure cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A field has the wrong type or value; the message names it.
    #[error("ValidationError: {0}")]
    Invalid(String),
    /// The machine cannot provide what the run needs (a working directory, say).
    #[error("Flow run could not start: {0}")]
    Unavailable(String),
}

/// A run ready to launch.
pub trait Job: Send {
    /// A directory to journal before launch, so a worker restarted after a crash can remove it
    /// (the process worker's temporary working directory).
    fn scratch_dir(&self) -> Option<PathBuf> {
        None
    }

    /// Starts the run; returns once it has an identifier. The error is worded for the run's
    /// Crashed message ("Flow run could not start: …").
    fn launch(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Started>, String>>;
}

/// A started run, owned by its supervisor until it ends.
pub trait Started: Send {
    /// `infrastructure_pid` and `prefect.infrastructure.identifier`: a pid, or
    /// `<docker host>:<container id>`.
    fn identifier(&self) -> String;

    /// Ends with Prefect's status code (the exit code, negative for a signal). Cancel-safe: a
    /// supervisor drops it in a `select!`. `Err` means the run was lost track of.
    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<i64>>;

    /// Stops it gracefully, forcibly after `grace` or as soon as `hurry` is cancelled; returns
    /// its status code.
    fn stop(
        &mut self,
        grace: Duration,
        hurry: CancellationToken,
    ) -> BoxFuture<'_, std::io::Result<i64>>;

    /// Lines for the run's log about how it was started (prefect-kubernetes' `Creating
    /// Kubernetes job...`), shipped with the supervisor's own.
    fn launch_log(&self) -> Vec<String> {
        Vec::new()
    }

    /// Where a re-adopted run's own reports go from now on: it was found again before the
    /// worker had read the run, so [`Infrastructure::adopt`] had nowhere to send its events
    /// (prefect-kubernetes' observer keeps replicating a pod's events across worker restarts).
    fn report_to(&mut self, _events: EventContext, _reporter: Arc<dyn RunReporter>) {}

    /// The engine reported the run's outcome over a control channel (its state is its own).
    fn concluded(&self) -> bool {
        false
    }

    /// The engine inside watches for its own cancellation and ends the run itself, writing
    /// Cancelled and its `prefect.runner.cancelled-flow-run` (a container's
    /// `prefect flow-run execute`): a cancel gives it the grace before stopping anything.
    fn cancels_itself(&self) -> bool {
        false
    }

    /// Tells the engine it is being cancelled, over a control channel, when there is one.
    fn signal_cancel(&self) -> BoxFuture<'_, CancelSignal> {
        Box::pin(async { CancelSignal::NoChannel })
    }

    /// The infrastructure stopped the run on its own account (a Kubernetes Job past its
    /// `activeDeadlineSeconds`): whatever its status code, a run without a final state is
    /// Crashed — even one its engine rescheduled on the stop signal, which would otherwise
    /// start again and be stopped again, for ever.
    fn stopped_by_infrastructure(&self) -> bool {
        false
    }

    /// The Crashed message for a non-zero status code.
    fn crashed_message(&self, code: i64) -> String;

    /// What a user can do about such a crash, logged after it.
    fn crash_resolution(&self, _code: i64) -> Option<String> {
        None
    }

    /// The run was Crashed on this infrastructure's account (the server took the proposal):
    /// what the infrastructure can still tell of the crash, such as a pod's last output,
    /// goes to the run's log.
    fn crashed(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// How a cancel intent reached the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelSignal {
    /// The engine had already reported a final state: nothing to cancel.
    AlreadyConcluded,
    /// Sent (acknowledged or not; the detail is for the log).
    Sent(String),
    /// No control channel: the stop is a plain signal.
    NoChannel,
}
