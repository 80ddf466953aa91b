//! The slices of Prefect's REST schemas Cohort reads and writes (`prefect/client/schemas`).
//! Unknown fields are ignored so newer servers keep working.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub type Map = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StateType {
    Scheduled,
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Crashed,
    Paused,
    Cancelling,
}

impl StateType {
    /// Terminal states (`prefect/client/schemas/objects.py: TERMINAL_STATES`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StateType::Completed | StateType::Failed | StateType::Cancelled | StateType::Crashed
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub id: Option<Uuid>,
    #[serde(rename = "type")]
    pub state_type: StateType,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
    /// Read for its `transition_id` only; not written back.
    #[serde(default, skip_serializing)]
    pub state_details: StateDetails,
}

impl State {
    /// The `transition_id` of the proposal that made this state, when it had one.
    pub fn transition_id(&self) -> Option<Uuid> {
        self.state_details.transition_id
    }
}

/// The part of a state's `state_details` Cohort reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StateDetails {
    #[serde(default)]
    pub transition_id: Option<Uuid>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FlowRun {
    pub id: Uuid,
    pub name: String,
    pub flow_id: Uuid,
    #[serde(default)]
    pub deployment_id: Option<Uuid>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub job_variables: Option<Map>,
    #[serde(default)]
    pub state: Option<State>,
    #[serde(default)]
    pub work_queue_name: Option<String>,
    /// The work pool whose worker may run it (`FlowRunResponse.work_pool_id`).
    #[serde(default)]
    pub work_pool_id: Option<Uuid>,
    #[serde(default)]
    pub work_pool_name: Option<String>,
    #[serde(default)]
    pub next_scheduled_start_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expected_start_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub infrastructure_pid: Option<String>,
    #[serde(default)]
    pub start_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Deployment {
    pub id: Uuid,
    pub name: String,
    pub flow_id: Uuid,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub job_variables: Option<Map>,
    #[serde(default)]
    pub updated: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Flow {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkPool {
    pub id: Uuid,
    pub name: String,
    #[serde(rename = "type")]
    pub pool_type: String,
    #[serde(default)]
    pub base_job_template: serde_json::Value,
    #[serde(default)]
    pub is_paused: bool,
}

/// One entry of `POST /work_pools/{pool}/workers/filter`.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolWorker {
    pub name: String,
    #[serde(default)]
    pub last_heartbeat_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub heartbeat_interval_seconds: Option<u64>,
    /// `ONLINE` or `OFFLINE`.
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkQueue {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub is_paused: bool,
}

/// One entry of `POST /work_pools/{pool}/get_scheduled_flow_runs`.
#[derive(Debug, Clone, Deserialize)]
pub struct ScheduledFlowRun {
    pub work_pool_id: Uuid,
    pub work_queue_id: Uuid,
    pub flow_run: FlowRun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SetStateStatus {
    Accept,
    Reject,
    Abort,
    Wait,
}

/// Answer to a state proposal (`prefect/server/schemas/responses.py: OrchestrationResult`).
#[derive(Debug, Clone, Deserialize)]
pub struct OrchestrationResult {
    #[serde(default)]
    pub state: Option<State>,
    pub status: SetStateStatus,
    #[serde(default)]
    pub details: serde_json::Value,
}

impl OrchestrationResult {
    /// Seconds the server asks the client to wait before proposing again (WAIT).
    pub fn delay_seconds(&self) -> Option<f64> {
        self.details.get("delay_seconds").and_then(|d| d.as_f64())
    }

    /// A REJECT that hands back the very transition proposed (the same `transition_id`)
    /// means an earlier copy of the proposal was accepted and only its answer was lost
    /// (`prefect/server/orchestration/core_policy.py: PreventDuplicateTransitions`): it is
    /// the ACCEPT of that copy.
    pub(crate) fn acknowledging(mut self, transition_id: Uuid) -> Self {
        let own = self
            .state
            .as_ref()
            .is_some_and(|s| s.transition_id() == Some(transition_id));
        if self.status == SetStateStatus::Reject && own {
            self.status = SetStateStatus::Accept;
        }
        self
    }

    /// The ACCEPT of a proposal whose `state` a read-back found in place.
    pub(crate) fn accepted(state: State) -> Self {
        Self {
            state: Some(state),
            status: SetStateStatus::Accept,
            details: serde_json::json!({}),
        }
    }

    /// The server's reason, for ABORT/REJECT.
    pub fn reason(&self) -> Option<&str> {
        self.details.get("reason").and_then(|r| r.as_str())
    }
}

/// A state to propose. Serialized with the full `state_details` shape Prefect's client sends
/// (`prefect/client/orchestration/_flow_runs/client.py: set_flow_run_state`), including a fresh
/// `transition_id`, which the server uses to drop duplicate transitions.
#[derive(Debug, Clone)]
pub struct StateCreate {
    pub state_type: StateType,
    pub name: String,
    pub message: Option<String>,
}

impl StateCreate {
    pub fn new(state_type: StateType, name: &str) -> Self {
        Self {
            state_type,
            name: name.to_owned(),
            message: None,
        }
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The body's `state`; every copy of one proposal carries the same `transition_id`.
    pub(crate) fn to_json(&self, flow_run_id: Uuid, transition_id: Uuid) -> serde_json::Value {
        serde_json::json!({
            "type": self.state_type,
            "name": self.name,
            "message": self.message,
            "state_details": {
                "flow_run_id": flow_run_id,
                "task_run_id": null,
                "child_flow_run_id": null,
                "scheduled_time": null,
                "cache_key": null,
                "cache_expiration": null,
                "deferred": null,
                "untrackable_result": false,
                "pause_timeout": null,
                "pause_reschedule": false,
                "pause_key": null,
                "run_input_keyset": null,
                "refresh_cache": null,
                "retriable": null,
                "transition_id": transition_id,
                "task_parameters_id": null,
                "traceparent": null,
                "deployment_concurrency_lease_id": null,
            },
            "data": null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_flow_run_with_extra_fields() {
        let run: FlowRun = serde_json::from_value(serde_json::json!({
            "id": "0b4f3c5e-0000-4000-8000-000000000001",
            "name": "crimson-fox",
            "flow_id": "0b4f3c5e-0000-4000-8000-000000000002",
            "deployment_id": null,
            "tags": ["a"],
            "state": {"type": "SCHEDULED", "name": "Scheduled", "id": "0b4f3c5e-0000-4000-8000-000000000003",
                      "timestamp": "2026-11-23T19:27:38.293365Z", "state_details": {}},
            "something_new": 1
        }))
        .unwrap();
        assert_eq!(run.state.unwrap().state_type, StateType::Scheduled);
        assert!(run.job_variables.is_none());
    }

    fn answer(status: &str, transition_id: Uuid) -> OrchestrationResult {
        serde_json::from_value(serde_json::json!({
            "status": status,
            "state": {"type": "PENDING", "name": "Pending",
                      "state_details": {"transition_id": transition_id}},
            "details": {"reason": "This run has already made this state transition."},
        }))
        .unwrap()
    }

    #[test]
    fn a_reject_of_the_same_transition_is_the_lost_accept() {
        let ours = Uuid::new_v4();
        let theirs = Uuid::new_v4();
        assert_eq!(
            answer("REJECT", ours).acknowledging(ours).status,
            SetStateStatus::Accept
        );
        assert_eq!(
            answer("REJECT", theirs).acknowledging(ours).status,
            SetStateStatus::Reject
        );
        assert_eq!(
            answer("ABORT", ours).acknowledging(ours).status,
            SetStateStatus::Abort
        );
    }

    #[test]
    fn state_create_has_prefect_shape() {
        let id = Uuid::new_v4();
        let transition = Uuid::new_v4();
        let v = StateCreate::new(StateType::Pending, "Submitting").to_json(id, transition);
        assert_eq!(v["type"], "PENDING");
        assert_eq!(v["name"], "Submitting");
        assert_eq!(v["state_details"]["flow_run_id"], id.to_string());
        assert_eq!(v["state_details"]["transition_id"], transition.to_string());
    }
}
