//! Pod status as a kubelet writes it: container states, the phase that follows from them
//! (for `restartPolicy: Never`), and the pod conditions. Shared by the scripted kubelet and
//! the Docker one, so both produce the same shapes.

use serde_json::{json, Map, Value};

use crate::meta;

/// The node every pod is scheduled to.
pub const NODE_NAME: &str = "cohort-kube-fake-node";
const HOST_IP: &str = "10.0.0.1";

/// A container's state, as a kubelet reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ContainerState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i64,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
    },
}

impl ContainerState {
    fn to_json(&self, container_id: Option<&str>) -> Value {
        match self {
            ContainerState::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({"waiting": w})
            }
            ContainerState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            ContainerState::Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            } => {
                let mut t = json!({"exitCode": exit_code, "reason": reason});
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                t["startedAt"] = json!(started_at);
                t["finishedAt"] = json!(finished_at);
                if let Some(id) = container_id {
                    t["containerID"] = json!(id);
                }
                json!({"terminated": t})
            }
        }
    }
}

/// The names of the pod's containers, in spec order.
pub(crate) fn container_names(pod: &Value) -> Vec<String> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `status.phase`.
pub(crate) fn phase(pod: &Value) -> &str {
    pod.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

/// Whether the pod has finished (Succeeded or Failed).
pub(crate) fn is_terminal(pod: &Value) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Whether any container is running.
pub(crate) fn any_running(pod: &Value) -> bool {
    container_statuses(pod)
        .iter()
        .any(|s| s.pointer("/state/running").is_some())
}

/// `status.containerStatuses`.
pub(crate) fn container_statuses(pod: &Value) -> Vec<Value> {
    pod.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The status of one container, if reported.
pub(crate) fn container_status<'a>(pod: &'a Value, container: &str) -> Option<&'a Value> {
    pod.pointer("/status/containerStatuses")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(container))
}

/// The labels of the one node, as a kubelet registers them; a pod whose `nodeSelector` asks
/// for anything else cannot be scheduled.
pub(crate) const NODE_LABELS: [(&str, &str); 3] = [
    ("kubernetes.io/hostname", NODE_NAME),
    ("kubernetes.io/os", "linux"),
    ("kubernetes.io/arch", "amd64"),
];

/// What the scheduler says of a pod its one node does not fit.
pub(crate) const SELECTOR_MISMATCH: &str = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.";

/// Whether the node's labels satisfy the pod's `spec.nodeSelector`.
pub(crate) fn fits_node(pod: &Value) -> bool {
    let Some(selector) = pod.pointer("/spec/nodeSelector").and_then(Value::as_object) else {
        return true;
    };
    selector.iter().all(|(key, want)| {
        NODE_LABELS
            .iter()
            .any(|(k, v)| k == key && want.as_str() == Some(v))
    })
}

/// Binds the pod to the node: `spec.nodeName` and `PodScheduled=True`.
pub(crate) fn schedule(pod: &mut Value) {
    meta::object_mut(pod, "spec").insert("nodeName".into(), json!(NODE_NAME));
    set_condition(pod, "PodScheduled", true, None, None);
    finish(pod);
}

/// `PodScheduled=False` with reason `Unschedulable`, as the scheduler reports it.
pub(crate) fn unschedulable(pod: &mut Value, message: &str) {
    set_condition(
        pod,
        "PodScheduled",
        false,
        Some("Unschedulable"),
        Some(message),
    );
    finish(pod);
}

/// Sets the state of one container (`None`: every container) and recomputes the phase and
/// conditions. `container_id` is the runtime's id (`docker://…`), when there is one.
pub(crate) fn set_container(
    pod: &mut Value,
    container: Option<&str>,
    state: &ContainerState,
    container_id: Option<&str>,
) {
    if pod.pointer("/spec/nodeName").is_none() {
        schedule(pod);
    }
    start_sandbox(pod);
    let images: Map<String, Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    Some((
                        c.get("name")?.as_str()?.to_owned(),
                        c.get("image").cloned().unwrap_or(json!("")),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut statuses = container_statuses(pod);
    for name in container_names(pod) {
        if container.is_some_and(|c| c != name) {
            continue;
        }
        let old = statuses
            .iter()
            .position(|s| s.get("name").and_then(Value::as_str) == Some(&name));
        let old_id = old
            .and_then(|i| statuses[i].get("containerID"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let id = container_id.map(str::to_owned).or(old_id);
        let running = matches!(state, ContainerState::Running { .. });
        let mut status = Map::new();
        status.insert("name".into(), json!(name));
        status.insert("state".into(), state.to_json(id.as_deref()));
        status.insert("lastState".into(), json!({}));
        status.insert("ready".into(), json!(running));
        status.insert("restartCount".into(), json!(0));
        status.insert(
            "image".into(),
            images.get(&name).cloned().unwrap_or(json!("")),
        );
        status.insert("imageID".into(), json!(""));
        if let Some(id) = &id {
            status.insert("containerID".into(), json!(id));
        }
        status.insert("started".into(), json!(running));
        match old {
            Some(i) => statuses[i] = Value::Object(status),
            None => statuses.push(Value::Object(status)),
        }
    }
    meta::object_mut(pod, "status").insert("containerStatuses".into(), Value::Array(statuses));
    recompute(pod);
    finish(pod);
}

/// Node-pressure eviction: phase Failed, reason `Evicted`, and a `DisruptionTarget`
/// condition, as the kubelet's eviction manager reports it.
pub(crate) fn evicted(pod: &mut Value, message: &str) {
    set_condition(
        pod,
        "DisruptionTarget",
        true,
        Some("TerminationByKubelet"),
        Some(message),
    );
    let status = meta::object_mut(pod, "status");
    status.insert("phase".into(), json!("Failed"));
    status.insert("reason".into(), json!("Evicted"));
    status.insert("message".into(), json!(message));
    if let Some(Value::Array(list)) = status.get_mut("containerStatuses") {
        for s in list.iter_mut() {
            s["ready"] = json!(false);
            s["started"] = json!(false);
        }
    }
    set_condition(pod, "Ready", false, Some("PodFailed"), None);
    set_condition(pod, "ContainersReady", false, Some("PodFailed"), None);
    finish(pod);
}

/// The node stopped reporting: phase Unknown.
pub(crate) fn unknown(pod: &mut Value) {
    meta::object_mut(pod, "status").insert("phase".into(), json!("Unknown"));
    set_condition(pod, "Ready", false, Some("NodeLost"), None);
    finish(pod);
}

/// The pod's sandbox exists: start time, IPs and `PodReadyToStartContainers`.
fn start_sandbox(pod: &mut Value) {
    let ip = pod_ip(meta::uid(pod));
    let status = meta::object_mut(pod, "status");
    if status.contains_key("startTime") {
        return;
    }
    status.insert("hostIP".into(), json!(HOST_IP));
    status.insert("hostIPs".into(), json!([{"ip": HOST_IP}]));
    status.insert("podIP".into(), json!(ip));
    status.insert("podIPs".into(), json!([{"ip": ip}]));
    status.insert("startTime".into(), json!(meta::now()));
    set_condition(pod, "PodReadyToStartContainers", true, None, None);
    set_condition(pod, "Initialized", true, None, None);
}

/// An address in the pod network, derived from the uid so it needs no allocator.
fn pod_ip(uid: &str) -> String {
    let hash = uid
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("10.244.{}.{}", (hash >> 8) % 254 + 1, hash % 254 + 1)
}

/// Phase and readiness from the container states.
fn recompute(pod: &mut Value) {
    if pod.pointer("/status/reason").and_then(Value::as_str) == Some("Evicted") {
        return;
    }
    let statuses = container_statuses(pod);
    let names = container_names(pod);
    let state_of = |n: &str| {
        statuses
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(n))
            .and_then(|s| s.get("state"))
    };
    let terminated: Vec<i64> = names
        .iter()
        .filter_map(|n| state_of(n)?.pointer("/terminated/exitCode")?.as_i64())
        .collect();
    let running = names
        .iter()
        .filter(|n| state_of(n).is_some_and(|s| s.get("running").is_some()))
        .count();
    let phase = if !names.is_empty() && terminated.len() == names.len() {
        if terminated.iter().all(|c| *c == 0) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if running > 0 {
        "Running"
    } else {
        "Pending"
    };
    meta::object_mut(pod, "status").insert("phase".into(), json!(phase));
    let unready: Vec<&String> = names
        .iter()
        .filter(|n| state_of(n).is_none_or(|s| s.get("running").is_none()))
        .collect();
    if matches!(phase, "Succeeded" | "Failed") {
        set_condition(pod, "Ready", false, Some("PodCompleted"), None);
        set_condition(pod, "ContainersReady", false, Some("PodCompleted"), None);
    } else if unready.is_empty() {
        set_condition(pod, "Ready", true, None, None);
        set_condition(pod, "ContainersReady", true, None, None);
    } else {
        let names: Vec<&str> = unready.iter().map(|s| s.as_str()).collect();
        let message = format!("containers with unready status: [{}]", names.join(" "));
        set_condition(
            pod,
            "Ready",
            false,
            Some("ContainersNotReady"),
            Some(&message),
        );
        set_condition(
            pod,
            "ContainersReady",
            false,
            Some("ContainersNotReady"),
            Some(&message),
        );
    }
}

/// Sets a condition; `lastTransitionTime` changes only when the status does.
fn set_condition(
    pod: &mut Value,
    kind: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let status_text = if status { "True" } else { "False" };
    let now = meta::now();
    let conditions = meta::object_mut(pod, "status")
        .entry("conditions")
        .or_insert(json!([]));
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    let list = conditions.as_array_mut().expect("an array");
    let existing = list
        .iter()
        .position(|c| c.get("type").and_then(Value::as_str) == Some(kind));
    let transition = existing
        .map(|i| &list[i])
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status_text))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or(json!(now));
    let mut c = Map::new();
    c.insert("type".into(), json!(kind));
    c.insert("status".into(), json!(status_text));
    c.insert("lastProbeTime".into(), Value::Null);
    c.insert("lastTransitionTime".into(), transition);
    if let Some(r) = reason {
        c.insert("reason".into(), json!(r));
    }
    if let Some(m) = message {
        c.insert("message".into(), json!(m));
    }
    match existing {
        Some(i) => list[i] = Value::Object(c),
        None => list.push(Value::Object(c)),
    }
}

/// Puts `status` keys and conditions in the order the kubelet writes them.
fn finish(pod: &mut Value) {
    const CONDITION_ORDER: [&str; 6] = [
        "DisruptionTarget",
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ];
    const STATUS_ORDER: [&str; 12] = [
        "phase",
        "conditions",
        "message",
        "reason",
        "hostIP",
        "hostIPs",
        "podIP",
        "podIPs",
        "startTime",
        "initContainerStatuses",
        "containerStatuses",
        "qosClass",
    ];
    let status = meta::object_mut(pod, "status");
    if let Some(Value::Array(conditions)) = status.get_mut("conditions") {
        conditions.sort_by_key(|c| {
            let t = c.get("type").and_then(Value::as_str).unwrap_or("");
            CONDITION_ORDER
                .iter()
                .position(|o| *o == t)
                .unwrap_or(CONDITION_ORDER.len())
        });
    }
    let mut ordered = Map::new();
    for k in STATUS_ORDER {
        if let Some(v) = status.remove(k) {
            ordered.insert(k.into(), v);
        }
    }
    ordered.extend(std::mem::take(status));
    *status = ordered;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"metadata": {"uid": "u"}, "spec": {"containers": [{"name": "a", "image": "i"}]}, "status": {"phase": "Pending"}})
    }

    #[test]
    fn lifecycle_phases() {
        let mut p = pod();
        set_container(
            &mut p,
            None,
            &ContainerState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            None,
        );
        assert_eq!(phase(&p), "Pending");
        assert_eq!(p["spec"]["nodeName"], NODE_NAME);
        set_container(
            &mut p,
            None,
            &ContainerState::Running {
                started_at: meta::now(),
            },
            Some("docker://x"),
        );
        assert_eq!(phase(&p), "Running");
        assert!(any_running(&p));
        set_container(
            &mut p,
            Some("a"),
            &ContainerState::Terminated {
                exit_code: 3,
                reason: "Error".into(),
                message: None,
                started_at: meta::now(),
                finished_at: meta::now(),
            },
            None,
        );
        assert_eq!(phase(&p), "Failed");
        assert_eq!(
            p["status"]["containerStatuses"][0]["state"]["terminated"]["containerID"],
            "docker://x"
        );
        let ready = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["reason"], "PodCompleted");
    }
}
