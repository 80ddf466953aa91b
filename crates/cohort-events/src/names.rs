//! Event names the worker and runner emit (`prefect/workers/base.py`,
//! `prefect/runner/_event_emitter.py`), and the server's that they subscribe to.

/// A worker started polling (`BaseWorker._emit_worker_started_event`).
pub const WORKER_STARTED: &str = "prefect.worker.started";
/// A worker shut down (`BaseWorker._emit_worker_stopped_event`).
pub const WORKER_STOPPED: &str = "prefect.worker.stopped";
/// A worker handed a flow run to infrastructure (`BaseWorker._emit_flow_run_submitted_event`).
pub const WORKER_SUBMITTED_FLOW_RUN: &str = "prefect.worker.submitted-flow-run";
/// The infrastructure of a flow run exited (`BaseWorker._emit_flow_run_executed_event`).
pub const WORKER_EXECUTED_FLOW_RUN: &str = "prefect.worker.executed-flow-run";
/// A runner killed a cancelled flow run and recorded Cancelled
/// (`EventEmitter.emit_flow_run_cancelled`).
pub const RUNNER_CANCELLED_FLOW_RUN: &str = "prefect.runner.cancelled-flow-run";

/// The server moved a flow run to Cancelling; workers and runners subscribe to it
/// (`prefect/server/models/events.py: flow_run_state_change_event`,
/// `prefect/workers/base.py: BaseWorker._setup_cancellation_observer`).
pub const FLOW_RUN_CANCELLING: &str = "prefect.flow-run.Cancelling";
