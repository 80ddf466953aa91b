//! Running one claimed flow run on its infrastructure, written once for the worker and the
//! runner: the claim (Pending), Submitting, launch, `infrastructure_pid`, supervision to the
//! end, crash reports, cancellation and the flow-run log lines a supervisor writes.

#![forbid(unsafe_code)]

pub mod cancel;
pub mod execution;
#[cfg(test)]
mod tests;

pub use execution::{
    claim, propose_crashed, Executed, Executor, Gate, LogShipper, NotExecuted, RunLog, ShipLogs,
    LOG_BATCH_INTERVAL,
};
