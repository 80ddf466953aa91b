//! What an infrastructure tells the server of a run it watches: log lines, and the
//! `InfrastructurePending` state prefect-kubernetes' observer proposes while a pod is pending
//! (`prefect_kubernetes/observer.py: _replicate_pod_event`).

use std::sync::Arc;

use cohort_api::models::{StateCreate, StateType};
use cohort_api::PrefectApi;
use cohort_infra::{BoxFuture, RunReporter};
use serde_json::json;
use uuid::Uuid;

/// Reports of one run, straight to the server.
pub(crate) struct ApiReporter {
    pub api: Arc<dyn PrefectApi>,
    pub flow_run_id: Uuid,
}

impl RunReporter for ApiReporter {
    fn log(
        &self,
        logger: &'static str,
        level: u8,
        messages: Vec<String>,
    ) -> BoxFuture<'static, ()> {
        let api = self.api.clone();
        let timestamp = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let entries: Vec<_> = messages
            .into_iter()
            .map(|message| {
                json!({
                    "name": logger,
                    "level": level,
                    "message": message,
                    "timestamp": timestamp,
                    "flow_run_id": self.flow_run_id,
                    "task_run_id": null,
                })
            })
            .collect();
        Box::pin(async move {
            if entries.is_empty() {
                return;
            }
            if let Err(e) = api.create_logs(&entries).await {
                tracing::debug!(error = %e, "could not ship a flow-run log line");
            }
        })
    }

    fn propose_pending(&self, name: &'static str, message: &'static str) -> BoxFuture<'static, ()> {
        let api = self.api.clone();
        let id = self.flow_run_id;
        Box::pin(async move {
            // Read first, as Prefect's observer does: the server lets some final states go
            // back to Pending, and a final state is the flow's own.
            let run = match api.read_flow_run(id).await {
                Ok(run) => run,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the flow run");
                    return;
                }
            };
            let pending_elsewhere = run.state.as_ref().is_some_and(|s| {
                s.state_type == StateType::Pending && s.name.as_deref() != Some(name)
            });
            if !pending_elsewhere {
                return;
            }
            let state = StateCreate::new(StateType::Pending, name).with_message(message);
            if let Err(e) = api.set_flow_run_state(id, &state, false).await {
                tracing::debug!(error = %e, "could not propose {name}");
            }
        })
    }
}
