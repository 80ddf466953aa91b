//! Flow-run processes on this machine: start one in its own process group, talk to Prefect's
//! engine over the attempt control channel, and stop it the way Prefect's runner does.
//! Shared by the worker and the runner.

#![forbid(unsafe_code)]

pub mod control;
pub mod exit_codes;
pub mod process;

pub use control::{Attempt, Conclusion, ControlListener, Intent, SignalStatus};
pub use process::{find_python, FlowRunProcess, Launch, LaunchError};
