//! What the end-to-end tests (`crates/cohort/tests/util`) and the benchmark driver
//! (`crates/cohort-bench`) share, written once:
//!
//! - [`ServerProcess`]: a real `prefect server start` on 127.0.0.1 and a free port with a
//!   temporary `PREFECT_HOME`, under a `sh` watchdog that cleans up whatever way the calling
//!   process ends, and that can stop and start the server again on the same port and database.
//! - [`Rest`]: a blocking client for it that rides 429/502/503 (SQLite's "database is
//!   locked") and dropped connections.
//! - [`worker_command`], [`scrub_prefect_env`], [`path_with_venv_first`], [`free_port`],
//!   [`slugify`]: how the processes under test are started and named.
//!
//! The callers keep their own error style: the tests panic, the driver returns errors.

// Test infrastructure waits on real processes: wall-clock time and sleeps are the point.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod env;
mod rest;
mod server;

pub use env::{
    free_port, path_with_venv_first, scrub_prefect_env, slugify, venv_python, worker_command,
};
pub use rest::{Rest, RestError, RetryPolicy};
pub use server::{ServerConfig, ServerError, ServerProcess};
