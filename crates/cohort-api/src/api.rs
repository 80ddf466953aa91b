//! [`PrefectApi`]: the REST calls that running one claimed flow run makes, as a trait, so the
//! executor's supervision, crash and cancellation paths can be unit-tested with paused time
//! against an in-process fake; [`PrefectClient`] is the real one.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;
use uuid::Uuid;

use crate::models::{FlowRun, OrchestrationResult, StateCreate};
use crate::{ApiError, PrefectClient};

/// The futures of [`PrefectApi`].
pub type ApiFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// What supervising a flow run asks of the Prefect server.
pub trait PrefectApi: Send + Sync + 'static {
    /// `GET /flow_runs/{id}`.
    fn read_flow_run(&self, id: Uuid) -> ApiFuture<'_, FlowRun>;

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
    fn read_flow_run(&self, id: Uuid) -> ApiFuture<'_, FlowRun> {
        Box::pin(PrefectClient::read_flow_run(self, id))
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
