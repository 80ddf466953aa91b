//! Running one claimed flow run on its infrastructure, shared by the worker and the runner:
//! Submitting, launch, `infrastructure_pid`, supervision to the end, crash detection, and
//! cancellation (`prefect/runner/_flow_run_executor.py: FlowRunExecutor`,
//! `prefect/runner/_cancellation_manager.py: CancellationManager`).

use std::sync::Arc;
use std::time::Duration;

use cohort_api::models::{Deployment, Flow, FlowRun, SetStateStatus, StateCreate, StateType};
use cohort_api::{PrefectApi, PrefectClient};
use cohort_events::related::{self, Named};
use cohort_events::{names, Event, EventSink, Resource};
use cohort_infra::{CancelSignal, Job, Started};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cancel::{current_state, finalize_cancelled, finish, Finish, StopReason};

/// What every execution of one worker or runner shares.
pub struct Executor {
    /// The server, as far as running a claimed flow run needs it.
    pub api: Arc<dyn PrefectApi>,
    pub sink: Arc<dyn EventSink>,
    /// Resource of `prefect.runner.cancelled-flow-run`: `prefect.runner.standalone` for a
    /// worker, `prefect.runner.<slug>` for a runner.
    pub runner_resource: Resource,
    /// SIGTERM → SIGKILL grace when a run must be stopped.
    pub termination_grace: Duration,
    /// Cancelled to cut the grace short: processes being stopped get SIGKILL now (a second
    /// signal to a runner that is already cancelling its runs). States and events are still
    /// written as for any stop.
    pub hurry: CancellationToken,
    /// What stopping a run at shutdown means: `None` for a worker (stop it, Crashed unless
    /// the engine reported an outcome); a message for a runner, which cancels its runs with
    /// it, as Prefect's `Runner.stop` does (`cancel_all(state_msg="Runner is shutting down.")`).
    pub cancel_on_shutdown: Option<&'static str>,
    /// Where supervisors' flow-run log lines go: batched over runs, or (`None`) one
    /// `POST /logs/` per flush.
    pub logs: Option<LogShipper>,
}

/// Whether a claimed run may be launched.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// Cancelled before it started; nothing was launched.
    Cancelled,
}

/// A run whose process ran to its end (or was stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed {
    pub pid: String,
    /// Prefect's status code: 0 when the engine reported its outcome or acknowledged a
    /// cancel over the control channel, else the exit code (negative for a signal).
    pub status_code: i64,
}

/// Why a run produced no [`Executed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotExecuted {
    /// It never started; the run was proposed Crashed with this message.
    CouldNotStart(String),
    /// It started but the worker lost track of it; its state is left to the engine.
    Lost(String),
}

impl Executor {
    /// Ships what `log` holds, through the shipper when there is one.
    pub async fn ship(&self, log: &mut RunLog) {
        match &self.logs {
            Some(shipper) => log.flush(shipper).await,
            // `RunLog::flush` takes a `ShipLogs`, whose unboxed future is not `Send` for a
            // trait object; the one call is made here.
            None => {
                let entries = std::mem::take(&mut log.entries);
                if entries.is_empty() {
                    return;
                }
                if let Err(e) = self.api.create_logs(&entries).await {
                    tracing::debug!(error = %e, "could not ship flow-run logs");
                }
            }
        }
    }

    /// Proposes `Submitting` and checks for a cancellation that arrived before launch
    /// (`FlowRunExecutor.submit`: Cancelling ⇒ force Cancelled, Cancelled ⇒ skip).
    pub async fn propose_submitting(&self, run: &FlowRun, cancel: &CancellationToken) -> Gate {
        let submitting = StateCreate::new(StateType::Pending, "Submitting");
        let mut current = match self
            .api
            .set_flow_run_state(run.id, &submitting, false)
            .await
        {
            Ok(r) => r.state.map(|s| s.state_type),
            Err(e) => {
                tracing::warn!(error = %e, "could not propose Submitting");
                None
            }
        };
        if cancel.is_cancelled() {
            current = self
                .api
                .read_flow_run(run.id)
                .await
                .ok()
                .and_then(|r| r.state.map(|s| s.state_type));
        }
        match current {
            Some(StateType::Cancelling) => {
                let state = StateCreate::new(StateType::Cancelled, "Cancelled")
                    .with_message("Flow run was cancelled before execution started.");
                if let Err(e) = self.api.set_flow_run_state(run.id, &state, true).await {
                    tracing::warn!(error = %e, "could not mark the run Cancelled");
                }
                tracing::info!("flow run was cancelled before execution started");
                Gate::Cancelled
            }
            Some(StateType::Cancelled) => Gate::Cancelled,
            _ => Gate::Go,
        }
    }

    /// Launches `job`, records its identifier as the run's `infrastructure_pid`, and supervises
    /// it until it exits, is cancelled (`cancel`), or must stop because its supervisor is
    /// shutting down (`terminate`).
    #[allow(clippy::too_many_arguments)]
    pub async fn execute(
        &self,
        run: &FlowRun,
        deployment: Option<&Deployment>,
        flow: Option<&Flow>,
        job: Box<dyn Job>,
        log: &mut RunLog,
        cancel: &CancellationToken,
        terminate: &CancellationToken,
    ) -> Result<Executed, NotExecuted> {
        let started = match job.launch().await {
            Ok(started) => started,
            Err(e) => {
                // `FlowRunExecutor.submit` words it so.
                let message = format!("Flow run could not start: {e}");
                log.error(format!(
                    "Failed to submit flow run '{}' to infrastructure: {message}",
                    run.name
                ));
                self.ship(log).await;
                propose_crashed(self.api.as_ref(), run.id, &message).await;
                return Err(NotExecuted::CouldNotStart(message));
            }
        };
        for line in started.launch_log() {
            log.info(line);
        }
        let pid = started.identifier();
        if let Err(e) = self.api.set_infrastructure_pid(run.id, &pid).await {
            tracing::error!(error = %e, "could not set the `infrastructure_pid` of the flow run; it will not be cancellable by other tools");
        }
        log.info(format!(
            "Flow run '{}' submitted to infrastructure",
            run.name
        ));
        self.ship(log).await;
        self.supervise(run, deployment, flow, started, log, cancel, terminate)
            .await
    }

    /// Supervises a started run until it exits, is cancelled (`cancel`), or must stop because
    /// its supervisor is shutting down (`terminate`). A run re-adopted after a restart has no
    /// control channel.
    #[allow(clippy::too_many_arguments)]
    pub async fn supervise(
        &self,
        run: &FlowRun,
        deployment: Option<&Deployment>,
        flow: Option<&Flow>,
        mut started: Box<dyn Started>,
        log: &mut RunLog,
        cancel: &CancellationToken,
        terminate: &CancellationToken,
    ) -> Result<Executed, NotExecuted> {
        let pid = started.identifier();
        enum Ending {
            Exited(std::io::Result<i64>),
            Cancel,
            Terminate,
        }
        let ending = tokio::select! {
            status = started.wait() => Ending::Exited(status),
            _ = cancel.cancelled() => Ending::Cancel,
            _ = terminate.cancelled() => Ending::Terminate,
        };
        // A cancel request, or a runner's shutdown, which cancels what still runs.
        let stop = match &ending {
            Ending::Cancel => Some((
                StopReason::CancelRequest,
                "Flow run was cancelled successfully.",
            )),
            Ending::Terminate => self
                .cancel_on_shutdown
                .map(|message| (StopReason::RunnerShutdown, message)),
            Ending::Exited(_) => None,
        };
        if let Some((reason, message)) = stop {
            let code = self
                .stop_cancelled(run, started.as_mut(), deployment, flow, reason, message)
                .await;
            let status_code = if started.concluded() { 0 } else { code };
            return Ok(Executed { pid, status_code });
        }
        let code = match ending {
            Ending::Exited(Ok(code)) => code,
            Ending::Exited(Err(e)) => {
                tracing::error!(error = %e, "Lost connection to flow run '{}' infrastructure. The flow run's final state will be determined by the execution environment.", run.name);
                return Err(NotExecuted::Lost(e.to_string()));
            }
            // Cancel was handled above; what is left is a worker's shutdown (drain deadline
            // or a second signal).
            Ending::Cancel | Ending::Terminate => {
                tracing::warn!(pid = %pid, "stopping flow run: shutting down");
                // A run that reached its final state before we stopped it (its process
                // still exiting) keeps it, and its log says nothing of a crash.
                let finished = started.concluded()
                    || current_state(self.api.as_ref(), run.id)
                        .await
                        .is_some_and(StateType::is_final);
                let code = self
                    .stop_process(started.as_mut())
                    .await
                    .map_err(|e| NotExecuted::Lost(e.to_string()))?;
                if !finished {
                    let message = started.crashed_message(code);
                    log.error(format!(
                        "{message} The flow run was stopped because its supervisor shut down."
                    ));
                    self.ship(log).await;
                    propose_crashed(self.api.as_ref(), run.id, &message).await;
                }
                code
            }
        };
        if started.concluded() {
            return Ok(Executed {
                pid,
                status_code: 0,
            });
        }
        if code != 0 || started.stopped_by_infrastructure() {
            // A non-zero exit without a reported outcome is a crash.
            let message = started.crashed_message(code);
            log.error(message.clone());
            if let Some(resolution) = started.crash_resolution(code) {
                log.info(resolution);
            }
            self.ship(log).await;
            if propose_crashed(self.api.as_ref(), run.id, &message).await {
                started.crashed().await;
            }
        }
        Ok(Executed {
            pid,
            status_code: code,
        })
    }

    /// The cancel sequence: intent over the control channel, a graceful stop (SIGTERM to the
    /// process group), a forced one after the grace period; then, as [`finish`] decides, Cancelled made durable and,
    /// only then, the `prefect.runner.cancelled-flow-run` event. A run that reached a final
    /// state of its own before we stopped it keeps it, with no event. Returns the run's
    /// status code.
    async fn stop_cancelled(
        &self,
        run: &FlowRun,
        started: &mut dyn Started,
        deployment: Option<&Deployment>,
        flow: Option<&Flow>,
        reason: StopReason,
        message: &str,
    ) -> i64 {
        tracing::info!(?reason, "cancelling flow run");
        let before = current_state(self.api.as_ref(), run.id).await;
        if let Some(state) = before.filter(|s| *s != StateType::Cancelled && s.is_final()) {
            tracing::info!(
                ?state,
                "the flow run had already finished; its state is kept and its process let exit"
            );
            return self.let_exit(started).await;
        }
        // An engine that cancels its run itself (and reports it) gets the grace to do so; we
        // only step in for one that is stuck.
        let ended_itself = if started.cancels_itself() {
            match tokio::time::timeout(self.termination_grace, started.wait()).await {
                Ok(Ok(code)) => Some(code),
                _ => {
                    tracing::warn!(grace = ?self.termination_grace, "the flow run did not end within the grace after its cancellation; stopping it");
                    None
                }
            }
        } else {
            None
        };
        let code = match ended_itself {
            Some(code) => code,
            None => {
                match started.signal_cancel().await {
                    CancelSignal::AlreadyConcluded => {
                        // The engine already reported a final state: nothing to cancel, no
                        // event (`CancellationManager.cancel`).
                        tracing::info!("the flow run concluded before the cancellation reached it");
                        return self.let_exit(started).await;
                    }
                    CancelSignal::Sent(status) => tracing::debug!(%status, "cancel intent sent"),
                    CancelSignal::NoChannel => {}
                }
                // Returns as soon as the process is gone: Cancelled is reported without waiting
                // out the grace period.
                match self.stop_process(started).await {
                    Ok(code) => code,
                    Err(e) => {
                        tracing::error!(error = %e, "could not stop the flow run's infrastructure");
                        -1
                    }
                }
            }
        };
        let after = current_state(self.api.as_ref(), run.id).await;
        let cancelled = match finish(reason, before, after) {
            Finish::Keep(state) => {
                tracing::info!(
                    ?state,
                    "the flow run finished on its own; its state is kept"
                );
                false
            }
            // An engine that ended itself reported its own cancellation.
            Finish::Cancelled => ended_itself.is_none(),
            Finish::ForceCancelled => finalize_cancelled(self.api.as_ref(), run.id, message).await,
        };
        if cancelled {
            self.emit_cancelled(run, deployment, flow).await;
        }
        code
    }

    /// A run that already reached its final state is ending on its own: it gets the grace
    /// period to do so, then is stopped (its state is final: the server refuses the Crashed a
    /// stopped engine might propose).
    async fn let_exit(&self, started: &mut dyn Started) -> i64 {
        if let Ok(Ok(code)) = tokio::time::timeout(self.termination_grace, started.wait()).await {
            return code;
        }
        match self.stop_process(started).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(error = %e, "could not stop the flow run's infrastructure");
                -1
            }
        }
    }

    /// A graceful stop, forced after the grace (or at once when hurried).
    async fn stop_process(&self, started: &mut dyn Started) -> std::io::Result<i64> {
        started
            .stop(self.termination_grace, self.hurry.clone())
            .await
    }

    async fn emit_cancelled(
        &self,
        run: &FlowRun,
        deployment: Option<&Deployment>,
        flow: Option<&Flow>,
    ) {
        let deployment_named = deployment.map(|d| Named {
            id: d.id,
            name: d.name.clone(),
        });
        let flow_named = flow.map(|f| Named {
            id: f.id,
            name: f.name.clone(),
        });
        let tags: Vec<&String> = deployment
            .iter()
            .flat_map(|d| d.tags.iter())
            .chain(run.tags.iter())
            .collect();
        let related = related::runner_cancelled_related(
            deployment_named.as_ref(),
            flow_named.as_ref(),
            &Named {
                id: run.id,
                name: run.name.clone(),
            },
            tags,
        );
        self.sink
            .emit(Event::new(
                names::RUNNER_CANCELLED_FLOW_RUN,
                self.runner_resource.clone(),
                related,
            ))
            .await;
    }
}

/// Claims a scheduled run: proposes Pending, and only an accepted Pending makes it ours
/// (`BaseWorker._propose_pending_state`; the runner's poller does the same).
pub async fn claim(client: &dyn PrefectApi, run: &FlowRun) -> Result<(), String> {
    let pending = StateCreate::new(StateType::Pending, "Pending");
    match client.set_flow_run_state(run.id, &pending, false).await {
        Ok(r)
            if r.status == SetStateStatus::Accept
                && r.state
                    .as_ref()
                    .is_some_and(|s| s.state_type == StateType::Pending) =>
        {
            Ok(())
        }
        Ok(r) => {
            let state = r
                .state
                .as_ref()
                .map(|s| format!("{:?}", s.state_type).to_uppercase())
                .unwrap_or_else(|| "UNKNOWN".into());
            let why = format!(
                "Aborted submission of flow run '{}': Server returned a non-pending state '{state}'",
                run.id
            );
            tracing::info!(reason = r.reason().unwrap_or(""), "{why}");
            Err(why)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not claim flow run; leaving it for the next poll");
            Err(format!("claim failed: {e}"))
        }
    }
}

/// Proposes Crashed; an ABORT (the run already reached a final state) is expected and quiet.
pub async fn propose_crashed(client: &dyn PrefectApi, id: Uuid, message: &str) -> bool {
    let state = StateCreate::new(StateType::Crashed, "Crashed").with_message(message);
    match client.set_flow_run_state(id, &state, false).await {
        Ok(r) => {
            tracing::debug!(status = ?r.status, "proposed Crashed");
            r.status == SetStateStatus::Accept
        }
        Err(e) if e.is_not_found() => false,
        Err(e) => {
            tracing::warn!(error = %e, "could not propose Crashed");
            false
        }
    }
}

/// The flow-run log lines a supervisor writes, shipped to `POST /logs/` so they show in the
/// Prefect UI next to the flow's own, as Prefect's worker does (logger
/// `prefect.flow_runs.worker`, `prefect/workers/base.py: BaseWorker.get_flow_run_logger`).
pub struct RunLog {
    flow_run_id: Uuid,
    logger: &'static str,
    entries: Vec<serde_json::Value>,
}

impl RunLog {
    pub fn new(flow_run_id: Uuid, logger: &'static str) -> Self {
        Self {
            flow_run_id,
            logger,
            entries: Vec::new(),
        }
    }

    pub fn info(&mut self, message: String) {
        tracing::info!("{message}");
        self.push(20, message);
    }

    pub fn error(&mut self, message: String) {
        tracing::error!("{message}");
        self.push(40, message);
    }

    fn push(&mut self, level: u8, message: String) {
        self.entries.push(json!({
            "name": self.logger,
            "level": level,
            "message": message,
            "timestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "flow_run_id": self.flow_run_id,
            "task_run_id": null,
        }));
    }

    /// Ships what was logged so far; a failure costs log lines, never the run.
    pub async fn flush(&mut self, to: &impl ShipLogs) {
        if self.entries.is_empty() {
            return;
        }
        to.ship(std::mem::take(&mut self.entries)).await;
    }
}

/// Where flow-run log lines go.
pub trait ShipLogs {
    fn ship(&self, entries: Vec<serde_json::Value>) -> impl std::future::Future<Output = ()>;
}

/// Straight to the server, one `POST /logs/` per call.
impl ShipLogs for PrefectClient {
    async fn ship(&self, entries: Vec<serde_json::Value>) {
        if let Err(e) = self.create_logs(&entries).await {
            tracing::debug!(error = %e, "could not ship flow-run logs");
        }
    }
}

/// How long log lines wait for others to share their `POST /logs/`: the default of Prefect's
/// `PREFECT_LOGGING_TO_API_BATCH_INTERVAL` (`prefect/settings/models/logging.py`).
pub const LOG_BATCH_INTERVAL: Duration = Duration::from_secs(2);
/// A batch is sent at once when it reaches this many lines.
const LOG_BATCH_MAX: usize = 200;

/// Ships the flow-run log lines of all of a worker's runs in batches: one `POST /logs/` for the
/// lines of every run logged within [`LOG_BATCH_INTERVAL`] (at most [`LOG_BATCH_MAX`] lines),
/// where one per run's flush would go otherwise. Prefect's own `APILogHandler` batches the
/// same way (`prefect/logging/handlers.py`, every `PREFECT_LOGGING_TO_API_BATCH_INTERVAL`).
/// Lines still queued when the process dies are lost, as they are in Prefect.
#[derive(Clone)]
pub struct LogShipper {
    queue: tokio::sync::mpsc::UnboundedSender<Vec<serde_json::Value>>,
}

impl LogShipper {
    /// The shipper and its task, which sends what is queued and ends once every
    /// `LogShipper` clone is dropped, or when `close` is cancelled.
    pub fn start(
        client: PrefectClient,
        close: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<serde_json::Value>>();
        let task = tokio::spawn(async move {
            loop {
                let mut batch = tokio::select! {
                    first = rx.recv() => match first {
                        Some(b) => b,
                        None => return,
                    },
                    _ = close.cancelled() => Vec::new(),
                };
                let closing = close.is_cancelled()
                    || tokio::time::timeout(LOG_BATCH_INTERVAL, close.cancelled())
                        .await
                        .is_ok();
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                for chunk in batch.chunks(LOG_BATCH_MAX) {
                    client.ship(chunk.to_vec()).await;
                }
                if closing {
                    return;
                }
            }
        });
        (Self { queue }, task)
    }
}

impl ShipLogs for LogShipper {
    async fn ship(&self, entries: Vec<serde_json::Value>) {
        if let Err(tokio::sync::mpsc::error::SendError(entries)) = self.queue.send(entries) {
            tracing::debug!(
                lines = entries.len(),
                "the log shipper has stopped; flow-run log lines dropped"
            );
        }
    }
}
