//! Scripting the cluster from a test: moving pods through the states a scheduler and a
//! kubelet would report, and setting the text their logs return. Meant for the scripted
//! kubelet: with the Docker kubelet only eviction and deletion go through the kubelet; the
//! other calls would race with the real containers' states.

use serde_json::Value;

use crate::apiserver::DeleteOptions;
use crate::error::ApiError;
use crate::kind::Kind;
use crate::kubelet::status::{self, ContainerState};
use crate::kubelet::KubeletCommand;
use crate::meta;
use crate::Emulator;

impl Emulator {
    /// Applies `f` to a pod's stored state and stores the result.
    fn script_pod(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        self.handle.shared.store.txn(|t| {
            let mut pod = t
                .get(Kind::Pod, namespace, name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
            f(&mut pod);
            t.put(Kind::Pod, pod)
        })
    }

    fn set_containers(
        &self,
        namespace: &str,
        name: &str,
        state: ContainerState,
    ) -> Result<Value, ApiError> {
        self.script_pod(namespace, name, |pod| {
            status::set_container(pod, None, &state, None)
        })
    }

    /// Binds the pod to the node (`spec.nodeName`, `PodScheduled=True`).
    pub fn pod_scheduled(&self, namespace: &str, pod: &str) -> Result<Value, ApiError> {
        self.script_pod(namespace, pod, status::schedule)
    }

    /// The scheduler cannot place the pod: `PodScheduled=False`, reason `Unschedulable`.
    pub fn pod_unschedulable(
        &self,
        namespace: &str,
        pod: &str,
        message: &str,
    ) -> Result<Value, ApiError> {
        self.script_pod(namespace, pod, |p| status::unschedulable(p, message))
    }

    /// Scheduled, every container waiting with `ContainerCreating`.
    pub fn pod_container_creating(&self, namespace: &str, pod: &str) -> Result<Value, ApiError> {
        self.set_containers(
            namespace,
            pod,
            ContainerState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
        )
    }

    /// Every container waiting with `ErrImagePull` and this message.
    pub fn pod_err_image_pull(
        &self,
        namespace: &str,
        pod: &str,
        message: &str,
    ) -> Result<Value, ApiError> {
        self.set_containers(
            namespace,
            pod,
            ContainerState::Waiting {
                reason: "ErrImagePull".into(),
                message: Some(message.into()),
            },
        )
    }

    /// Every container waiting with `ImagePullBackOff` and this message.
    pub fn pod_image_pull_backoff(
        &self,
        namespace: &str,
        pod: &str,
        message: &str,
    ) -> Result<Value, ApiError> {
        self.set_containers(
            namespace,
            pod,
            ContainerState::Waiting {
                reason: "ImagePullBackOff".into(),
                message: Some(message.into()),
            },
        )
    }

    /// Every container running since now: phase Running, `Ready=True`.
    pub fn pod_running(&self, namespace: &str, pod: &str) -> Result<Value, ApiError> {
        self.set_containers(
            namespace,
            pod,
            ContainerState::Running {
                started_at: meta::now(),
            },
        )
    }

    /// Every container exits with `code` and `reason` (`Completed`, `Error`, `OOMKilled`,
    /// `DeadlineExceeded`, …): phase Succeeded when the code is 0, else Failed.
    pub fn pod_exit(
        &self,
        namespace: &str,
        pod: &str,
        code: i32,
        reason: &str,
    ) -> Result<Value, ApiError> {
        self.script_pod(namespace, pod, |p| {
            let now = meta::now();
            for container in status::container_names(p) {
                let started_at = status::container_status(p, &container)
                    .and_then(|s| s.pointer("/state/running/startedAt"))
                    .and_then(Value::as_str)
                    .map_or_else(|| now.clone(), str::to_owned);
                let state = ContainerState::Terminated {
                    exit_code: i64::from(code),
                    reason: reason.into(),
                    message: None,
                    started_at,
                    finished_at: now.clone(),
                };
                status::set_container(p, Some(&container), &state, None);
            }
        })
    }

    /// Node-pressure eviction: phase Failed, `status.reason` `Evicted`, this message, and a
    /// `DisruptionTarget` condition. Scripted: at once, container states are left as they
    /// were. Docker: the containers get SIGTERM (then SIGKILL after the pod's grace period)
    /// and the pod is marked once they have stopped; this returns the pod as it is now.
    pub fn pod_evict(&self, namespace: &str, pod: &str, message: &str) -> Result<Value, ApiError> {
        if let Some(kubelet) = self.shared().kubelet_commands.get() {
            let current = self
                .get(Kind::Pod, namespace, pod)
                .ok_or_else(|| ApiError::not_found(Kind::Pod, pod))?;
            let _ = kubelet.send(KubeletCommand::Evict {
                namespace: namespace.to_owned(),
                name: pod.to_owned(),
                message: message.to_owned(),
            });
            return Ok(current);
        }
        self.script_pod(namespace, pod, |p| status::evicted(p, message))
    }

    /// The node stopped reporting: phase Unknown.
    pub fn pod_unknown(&self, namespace: &str, pod: &str) -> Result<Value, ApiError> {
        self.script_pod(namespace, pod, status::unknown)
    }

    /// Deletes a pod as a client would, with this grace period (default: the pod's
    /// `terminationGracePeriodSeconds`). `Ok(Some(_))`: the pod is terminating.
    pub fn delete_pod(
        &self,
        namespace: &str,
        pod: &str,
        grace_period_seconds: Option<i64>,
    ) -> Result<Option<Value>, ApiError> {
        self.delete(
            Kind::Pod,
            namespace,
            pod,
            &DeleteOptions {
                grace_period_seconds,
                ..DeleteOptions::default()
            },
        )
    }

    /// Sets the log text of every container of a pod (scripted kubelet).
    pub fn set_pod_log(&self, namespace: &str, pod: &str, text: &str) {
        let containers = self
            .get(Kind::Pod, namespace, pod)
            .map(|p| status::container_names(&p))
            .unwrap_or_default();
        for c in containers {
            self.handle
                .shared
                .logs
                .write(namespace, pod, &c, text, false);
        }
    }

    /// Sets the log text of one container (scripted kubelet).
    pub fn set_container_log(&self, namespace: &str, pod: &str, container: &str, text: &str) {
        self.handle
            .shared
            .logs
            .write(namespace, pod, container, text, false);
    }

    /// Appends to the log of one container (scripted kubelet); followers get the new text.
    pub fn append_container_log(&self, namespace: &str, pod: &str, container: &str, text: &str) {
        self.handle
            .shared
            .logs
            .write(namespace, pod, container, text, true);
    }
}
