//! Prefect REST API: settings resolution, typed models and an HTTP client that rides out a busy server.
//!
//! Owns everything Cohort says to a Prefect server over plain HTTP. It knows nothing of workers,
//! processes or events; those live in their own crates.

#![forbid(unsafe_code)]

mod api;
mod client;
mod error;
pub mod models;
mod ready;
pub mod retry;
pub mod settings;

pub use api::{ApiFuture, PrefectApi};
pub use client::{authorization, python_datetime, user_agent, ClientConfig, PrefectClient};
pub use error::ApiError;
pub use ready::{wait_for_server, while_starting, NotReady};
pub use settings::{Settings, SettingsError};

/// The REST API version Cohort speaks; sent as `X-PREFECT-API-VERSION`
/// (`prefect/client/constants.py: SERVER_API_VERSION` in Prefect 3.8.8).
pub const API_VERSION: &str = "0.8.4";
