//! The Job manifest of a flow run on a Kubernetes work pool, exactly as prefect-kubernetes 0.8.0
//! builds it (`prefect_kubernetes/worker.py: KubernetesWorkerJobConfiguration`).
//!
//! Pure: no IO, no clock, no process environment (randomness and lookups come in through
//! [`RunInputs`] and [`ManifestSettings::from_env`]).
//!
//! [`prepare`] takes a rendered job configuration (a base job template such as
//! [`BASE_JOB_TEMPLATE`] rendered with the run's job variables) and does, in Prefect's order:
//! 1. pydantic's reading of the configuration and the manifest check against Prefect's base Job
//!    ([`ManifestError::MissingAttributes`], [`ManifestError::IncompatibleValues`]);
//! 2. `prepare_for_flow_run`: the env (the run's environment under the job's own, `valueFrom`
//!    entries kept, the SIGTERM rule tied to `backoffLimit`, a hard-coded template list
//!    merged), labels and annotations with their slugs, the image and `args`, `generateName`,
//!    the pod template's labels and annotations;
//! 3. the part of `KubernetesWorker._create_job` before the POST: API key and auth string
//!    `secretKeyRef`s and `store_env_as_secret`, as [`SecretToCreate`]s for the worker.
//!
//! Prefect's slugs are public: [`slugify_name`], [`slugify_label_key`], [`slugify_label_value`].

#![forbid(unsafe_code)]

mod config;
mod entities;
mod env;
mod error;
mod labels;
mod name;
mod prepare;
mod secrets;
mod settings;
mod shlex;
mod slug;
mod template;
mod transliterate;
mod validate;

pub use config::cluster_config;
pub use error::ManifestError;
pub use name::EnvLookup;
pub use prepare::{prepare, PreparedJob, RunInputs, DEFAULT_IMAGE};
pub use secrets::{SecretPurpose, SecretToCreate, AUTH_STRING_IN_MANIFEST_WARNING};
pub use settings::{ManifestSettings, SettingsError};
pub use slug::{slugify_label_key, slugify_label_value, slugify_name};
pub use template::{
    base_job_template, server_bundled_template, BASE_JOB_TEMPLATE, SERVER_BUNDLED_TEMPLATE,
};

/// A JSON object in insertion order, like a Python dict (`cohort_infra::Map`).
pub use cohort_infra::Map;
