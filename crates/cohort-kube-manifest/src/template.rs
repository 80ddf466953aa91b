//! The two base job templates a Kubernetes work pool can have.

use serde_json::Value;

/// prefect-kubernetes 0.8.0's `KubernetesWorker.get_default_base_job_template()`, verbatim: the
/// template of a pool created by the worker or by the CLI with the package installed.
pub const BASE_JOB_TEMPLATE: &str = include_str!("base-job-template.json");

/// What a Prefect 3.8.8 server offers for type `kubernetes` to pools created from the UI (its
/// bundled collection view): older, with no `annotations` and `backoffLimit: 0` hard-coded.
pub const SERVER_BUNDLED_TEMPLATE: &str = include_str!("server-bundled-job-template.json");

/// [`BASE_JOB_TEMPLATE`] as JSON, keys in their captured order.
pub fn base_job_template() -> Value {
    serde_json::from_str(BASE_JOB_TEMPLATE).expect("the embedded template is JSON")
}

/// [`SERVER_BUNDLED_TEMPLATE`] as JSON.
pub fn server_bundled_template() -> Value {
    serde_json::from_str(SERVER_BUNDLED_TEMPLATE).expect("the embedded template is JSON")
}
