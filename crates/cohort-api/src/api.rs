//! [`PrefectApi`]: the REST calls that submitting, running and recovering one claimed flow
//! run make, as a trait, so the submission pipeline, restart recovery and the executor's
//! supervision, crash and cancellation paths can be unit-tested with paused time against an
//! in-process fake (crate `cohort-fakes`); [`PrefectClient`] is the real one.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;
use uuid::Uuid;

use chrono::{DateTime, Utc};

use crate::models::{
    Deployment, Flow, FlowRun, Map, OrchestrationResult, PoolWorker, ScheduledFlowRun, StateCreate,
};
use crate::{ApiError, PrefectClient};

/// The futures of [`PrefectApi`].
pub type ApiFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// What polling for, submitting and supervising flow runs asks of the Prefect server.
pub trait PrefectApi: Send + Sync + 'static {
    /// `POST /work_pools/{pool}/get_scheduled_flow_runs`; a missing pool reads as no runs.
    fn get_scheduled_flow_runs<'a>(
        &'a self,
        pool: &'a str,
        work_queue_names: &'a [String],
        scheduled_before: DateTime<Utc>,
    ) -> ApiFuture<'a, Vec<ScheduledFlowRun>>;

    /// `POST /work_pools/{pool}/workers/filter`: the pool's workers the server sees online.
    fn read_online_workers<'a>(&'a self, pool: &'a str) -> ApiFuture<'a, Vec<PoolWorker>>;

    /// `GET /flow_runs/{id}`.
    fn read_flow_run(&self, id: Uuid) -> ApiFuture<'_, FlowRun>;

    /// `GET /deployments/{id}`; `None` when it no longer exists.
    fn read_deployment(&self, id: Uuid) -> ApiFuture<'_, Option<Deployment>>;

    /// `GET /flows/{id}`.
    fn read_flow(&self, id: Uuid) -> ApiFuture<'_, Flow>;

    /// `PATCH /flow_runs/{id}/labels`.
    fn update_flow_run_labels<'a>(&'a self, id: Uuid, labels: &'a Map) -> ApiFuture<'a, ()>;

    /// `GET /variables/name/{name}`; `None` when unset.
    fn read_variable<'a>(&'a self, name: &'a str) -> ApiFuture<'a, Option<Value>>;

    /// A block document's `data` by id; `None` when there is none.
    fn read_block_document_data<'a>(&'a self, id: &'a str) -> ApiFuture<'a, Option<Map>>;

    /// A block document's `data` by type slug and name; `None` when there is none.
    fn read_block_document_data_by_name<'a>(
        &'a self,
        block_type_slug: &'a str,
        name: &'a str,
    ) -> ApiFuture<'a, Option<Map>>;

    /// `POST /flow_runs/{id}/set_state`; see [`PrefectClient::set_flow_run_state`].
    fn set_flow_run_state<'a>(
        &'a self,
        id: Uuid,
        state: &'a StateCreate,
        force: bool,
    ) -> ApiFuture<'a, OrchestrationResult>;

    /// `PATCH /flow_runs/{id}` with the run's `infrastructure_pid`.
    fn set_infrastructure_pid<'a>(&'a self, id: Uuid, pid: &'a str) -> ApiFuture<'a, ()>;

    /// `POST /logs/`.
    fn create_logs<'a>(&'a self, logs: &'a [Value]) -> ApiFuture<'a, ()>;
}

impl PrefectApi for PrefectClient {
    fn get_scheduled_flow_runs<'a>(
        &'a self,
        pool: &'a str,
        work_queue_names: &'a [String],
        scheduled_before: DateTime<Utc>,
    ) -> ApiFuture<'a, Vec<ScheduledFlowRun>> {
        Box::pin(PrefectClient::get_scheduled_flow_runs(
            self,
            pool,
            work_queue_names,
            scheduled_before,
        ))
    }

    fn read_online_workers<'a>(&'a self, pool: &'a str) -> ApiFuture<'a, Vec<PoolWorker>> {
        Box::pin(PrefectClient::read_online_workers(self, pool))
    }

    fn read_flow_run(&self, id: Uuid) -> ApiFuture<'_, FlowRun> {
        Box::pin(PrefectClient::read_flow_run(self, id))
    }

    fn read_deployment(&self, id: Uuid) -> ApiFuture<'_, Option<Deployment>> {
        Box::pin(PrefectClient::read_deployment(self, id))
    }

    fn read_flow(&self, id: Uuid) -> ApiFuture<'_, Flow> {
        Box::pin(PrefectClient::read_flow(self, id))
    }

    fn update_flow_run_labels<'a>(&'a self, id: Uuid, labels: &'a Map) -> ApiFuture<'a, ()> {
        Box::pin(PrefectClient::update_flow_run_labels(self, id, labels))
    }

    fn read_variable<'a>(&'a self, name: &'a str) -> ApiFuture<'a, Option<Value>> {
        Box::pin(PrefectClient::read_variable(self, name))
    }

    fn read_block_document_data<'a>(&'a self, id: &'a str) -> ApiFuture<'a, Option<Map>> {
        Box::pin(PrefectClient::read_block_document_data(self, id))
    }

    fn read_block_document_data_by_name<'a>(
        &'a self,
        block_type_slug: &'a str,
        name: &'a str,
    ) -> ApiFuture<'a, Option<Map>> {
        Box::pin(PrefectClient::read_block_document_data_by_name(
            self,
            block_type_slug,
            name,
        ))
    }

    fn set_flow_run_state<'a>(
        &'a self,
        id: Uuid,
        state: &'a StateCreate,
        force: bool,
    ) -> ApiFuture<'a, OrchestrationResult> {
        Box::pin(PrefectClient::set_flow_run_state(self, id, state, force))
    }

    fn set_infrastructure_pid<'a>(&'a self, id: Uuid, pid: &'a str) -> ApiFuture<'a, ()> {
        Box::pin(PrefectClient::set_infrastructure_pid(self, id, pid))
    }

    fn create_logs<'a>(&'a self, logs: &'a [Value]) -> ApiFuture<'a, ()> {
        Box::pin(PrefectClient::create_logs(self, logs))
    }
}
