//! The Cohort runner: `cohort flow serve` / `cohort serve`, serving deployments from local
//! flow files the way `prefect flow serve` and `serve(*deployments)` do
//! (`prefect/runner/runner.py: Runner`), on the worker's process machinery.

#![forbid(unsafe_code)]

pub mod inspect;
mod runner;
mod webserver;

pub use inspect::{FlowInfo, InspectError, ScheduleSpec};
pub use runner::{Runner, RunnerError, RunnerOptions, ServeSpec};
