//! Flow-run processes on this machine: start one in its own process group, talk to Prefect's
//! engine over the attempt control channel, and stop it the way Prefect's runner does; the
//! per-run shim that lets a flow outlive its worker; the `process` infrastructure of the
//! worker's seam ([`infra`]).
//! Shared by the worker and the runner.

#![forbid(unsafe_code)]

pub mod control;
pub use cohort_infra::exit_codes;
pub mod infra;
pub mod job;
pub mod process;
pub mod shim;

pub use control::{Attempt, Conclusion, ControlListener, Intent, SignalStatus};
pub use infra::{ProcessInfrastructure, Shims};
pub use job::ProcessJob;
pub use process::{find_python, FlowRunProcess, Launch, LaunchError};
pub use shim::{ShimSpec, ShimStatus};
