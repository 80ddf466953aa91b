//! Label keys used in event resources (`prefect/events/schemas/events.py`,
//! `prefect/workers/base.py: BaseWorker._event_resource`).

/// Mandatory, non-empty id of every resource.
pub const RESOURCE_ID: &str = "prefect.resource.id";
/// Human-readable name of a resource.
pub const RESOURCE_NAME: &str = "prefect.resource.name";
/// Mandatory, non-empty role of every related resource.
pub const RESOURCE_ROLE: &str = "prefect.resource.role";
/// Version of the emitting client.
pub const PREFECT_VERSION: &str = "prefect.version";
/// Worker type (`process`, `docker`, `kubernetes`, …) on worker resources.
pub const WORKER_TYPE: &str = "prefect.worker-type";
/// Infrastructure id (e.g. a pid) on the flow-run entry of `executed-flow-run`.
pub const INFRASTRUCTURE_IDENTIFIER: &str = "prefect.infrastructure.identifier";
/// Infrastructure exit status (a stringified integer) on the flow-run entry of
/// `executed-flow-run`.
pub const INFRASTRUCTURE_STATUS_CODE: &str = "prefect.infrastructure.status-code";
/// Cohort's own version, added after Prefect's labels so events show who sent them.
pub const COHORT_VERSION: &str = "cohort.version";

/// Role of a deployment related resource.
pub const ROLE_DEPLOYMENT: &str = "deployment";
/// Role of a flow related resource.
pub const ROLE_FLOW: &str = "flow";
/// Role of a flow-run related resource.
pub const ROLE_FLOW_RUN: &str = "flow-run";
/// Role of a tag related resource.
pub const ROLE_TAG: &str = "tag";
/// Role of a work-pool related resource.
pub const ROLE_WORK_POOL: &str = "work-pool";
/// Role of the worker itself when it appears as a related resource.
pub const ROLE_WORKER: &str = "worker";
