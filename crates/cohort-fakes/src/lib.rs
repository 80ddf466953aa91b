//! In-process fakes for paused-time unit tests, a dev-dependency only:
//!
//! - [`InProcessPrefect`]: the few Prefect REST endpoints the submission pipeline, restart
//!   recovery and the executor call ([`cohort_api::PrefectApi`]), held in memory, with the
//!   orchestration rules those paths meet. The same paths run end to end against a real
//!   Prefect server in the `cohort` crate's tests; the fake is for what a real server cannot
//!   be made to do on demand (answer 503 to everything) and for running with paused time.
//! - [`ScriptedInfrastructure`] and [`scripted_job`]: an infrastructure whose runs exit, and
//!   answer a stop, when and how the test says.

#![forbid(unsafe_code)]

mod infra;
mod prefect;

pub use infra::{failing_job, scripted_job, KillAnswer, OnStop, Script, ScriptedInfrastructure};
pub use prefect::{flow_run, state, InProcessPrefect};
