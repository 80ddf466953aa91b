//! The Cohort worker: polls a Prefect work pool, claims scheduled flow runs, runs each on its
//! [infrastructure](cohort_infra::Infrastructure), supervises it to the end and reports it with
//! Prefect's worker events.

#![forbid(unsafe_code)]

mod burst;
mod channel;
mod cleanup;
pub mod health;
pub mod journal;
mod peers;
mod recover;
mod report;
pub mod state;
mod submit;
#[cfg(test)]
mod tests;
mod wake;
mod worker;

pub use journal::{Journal, JournalError};
pub use state::LegacyState;
pub use worker::{StartError, Webserver, Worker, WorkerOptions, WorkerState};
