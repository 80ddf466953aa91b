//! What a pod's status says, in Prefect's words: the diagnosis of a pod that needs a user's
//! attention (`prefect_kubernetes/diagnostics.py`), and the `prefect.kubernetes.pod.*` event
//! prefect-kubernetes' observer emits for each pod change (`prefect_kubernetes/observer.py:
//! _replicate_pod_event`), with the same deterministic id, so a Python observer watching the
//! same cluster dedupes against ours at the server.

use chrono::{DateTime, Utc};
use cohort_events::{slug::slugify, Event, RelatedResource, Resource};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use uuid::Uuid;

/// How loud a diagnosis is in the run's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
}

impl Level {
    /// The Python logging level of the flow-run log line.
    pub fn python_level(self) -> u8 {
        match self {
            Level::Error => 40,
            Level::Warning => 30,
        }
    }
}

/// A pod failure a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub level: Level,
    /// The stable `kubernetes.diagnosis` label value (`DiagnosisCategory`).
    pub category: &'static str,
    pub summary: String,
    pub detail: String,
    pub resolution: &'static str,
}

impl Diagnosis {
    /// The observer's flow-run log line for it.
    pub fn log_line(&self) -> String {
        format!(
            "{}: {} Resolution: {}",
            self.summary, self.detail, self.resolution
        )
    }

    /// Unschedulable and image-pull failures do not fix themselves in the usual case: the
    /// supervisor's timeouts apply to them.
    pub fn blocks_start(&self) -> bool {
        self.category == IMAGE_PULL_ERROR
            || self.category == CRASH_LOOP_BACKOFF
            || self.category.starts_with(UNSCHEDULABLE)
    }

    pub fn is_unschedulable(&self) -> bool {
        self.category.starts_with(UNSCHEDULABLE)
    }
}

pub const IMAGE_PULL_ERROR: &str = "ImagePullError";
pub const CRASH_LOOP_BACKOFF: &str = "CrashLoopBackOff";
pub const OOM_KILLED: &str = "OOMKilled";
pub const EVICTED: &str = "Evicted";
pub const UNSCHEDULABLE: &str = "Unschedulable";

const UNSCHEDULABLE_DETAIL_PREFIX: &str =
    "Kubernetes cannot find a suitable node to run this pod. ";
const EVICTION_RESOLUTION: &str = "Check node conditions for resource pressure. Consider increasing resource requests so the pod is scheduled on a node with sufficient capacity, or add tolerations for eviction taints.";

/// The first known failure in a pod's status: waiting containers, then terminated ones, then
/// scheduling, then pod-level eviction (`diagnose_k8s_pod`'s order).
pub fn diagnose(status: &PodStatus) -> Option<Diagnosis> {
    waiting(status)
        .or_else(|| terminated(status))
        .or_else(|| unschedulable(status))
        .or_else(|| evicted(status))
}

/// Init containers first, as Kubernetes runs them.
fn container_statuses(status: &PodStatus) -> impl Iterator<Item = &ContainerStatus> {
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
}

fn waiting(status: &PodStatus) -> Option<Diagnosis> {
    container_statuses(status).find_map(|cs| {
        let waiting = cs.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref().unwrap_or_default();
        let message = waiting.message.as_deref().unwrap_or_default();
        match reason {
            "ImagePullBackOff" | "ErrImagePull" => Some(Diagnosis {
                level: Level::Error,
                category: IMAGE_PULL_ERROR,
                summary: format!("Image pull failed for container '{}'", cs.name),
                detail: format!("Kubernetes cannot pull the container image. Reason: {reason}. {message}")
                    .trim()
                    .to_owned(),
                resolution: "Verify the image name and tag are correct. Ensure the image exists in the registry and that image pull secrets are configured if the registry is private.",
            }),
            "CrashLoopBackOff" => Some(Diagnosis {
                level: Level::Error,
                category: CRASH_LOOP_BACKOFF,
                summary: format!("Container '{}' is crash-looping", cs.name),
                detail: format!("The container repeatedly crashes after starting. {message}")
                    .trim()
                    .to_owned(),
                resolution: "Check the container logs for the root cause (e.g. unhandled exceptions, missing config). Verify the entrypoint command, environment variables, and any mounted volumes.",
            }),
            _ => None,
        }
    })
}

fn terminated(status: &PodStatus) -> Option<Diagnosis> {
    container_statuses(status).find_map(|cs| {
        let terminated = cs.state.as_ref()?.terminated.as_ref()?;
        match terminated.reason.as_deref()? {
            "OOMKilled" => Some(Diagnosis {
                level: Level::Error,
                category: OOM_KILLED,
                summary: format!(
                    "Container '{}' was killed due to out-of-memory (OOMKilled)",
                    cs.name
                ),
                detail: "The container exceeded its memory limit and was terminated by the kernel OOM killer.".into(),
                resolution: "Increase the container's memory limit in the job manifest, or reduce the memory footprint of the workload. Check for memory leaks if usage grows unboundedly.",
            }),
            "Evicted" => Some(Diagnosis {
                level: Level::Warning,
                category: EVICTED,
                summary: format!("Container '{}' was evicted", cs.name),
                detail: "The pod was evicted, likely due to node resource pressure (disk, memory, or PID exhaustion).".into(),
                resolution: EVICTION_RESOLUTION,
            }),
            _ => None,
        }
    })
}

fn unschedulable(status: &PodStatus) -> Option<Diagnosis> {
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"))?;
    let message = condition.message.as_deref().unwrap_or_default();
    // The cause is only in the scheduler's words; affinity is matched explicitly, not on a
    // generic "didn't match", which topology-spread messages share (`_categorize_unschedulable`).
    let text = message.to_lowercase();
    let category = if text.contains("taint") {
        "Unschedulable.Taint"
    } else if text.contains("affinity") || text.contains("node selector") {
        "Unschedulable.NodeAffinity"
    } else if text.contains("insufficient") {
        "Unschedulable.InsufficientResources"
    } else {
        UNSCHEDULABLE
    };
    Some(Diagnosis {
        level: Level::Warning,
        category,
        summary: "Pod is unschedulable".into(),
        detail: format!("{UNSCHEDULABLE_DETAIL_PREFIX}{message}").trim().to_owned(),
        resolution: "Check that the cluster has nodes with sufficient resources, matching node selectors, and tolerations. Consider scaling up the cluster or adjusting the pod's resource requests.",
    })
}

fn evicted(status: &PodStatus) -> Option<Diagnosis> {
    (status.reason.as_deref() == Some("Evicted")).then(|| Diagnosis {
        level: Level::Warning,
        category: EVICTED,
        summary: "Pod was evicted".into(),
        detail: format!(
            "The pod was evicted from its node. {}",
            status.message.as_deref().unwrap_or_default()
        )
        .trim()
        .to_owned(),
        resolution: EVICTION_RESOLUTION,
    })
}

/// How a pod change was observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// In the listing a watch starts with (kopf's event type `None`).
    Listed,
    /// Added or changed while watched.
    Changed,
    /// Deleted.
    Deleted,
}

/// The `prefect.kubernetes.pod.*` event for a pod as `seen`, or `None` for a pod with no uid
/// or phase yet. `now` stands in for the occurred time of phases with no timestamp of their
/// own (Unknown, a pod-level eviction).
pub fn pod_event(
    pod: &Pod,
    seen: Seen,
    prefect_version: &str,
    now: DateTime<Utc>,
) -> Option<Event> {
    pod_event_and_diagnosis(pod, seen, prefect_version, now).map(|(event, _)| event)
}

/// [`pod_event`], with the pod's diagnosis it was labelled with.
pub fn pod_event_and_diagnosis(
    pod: &Pod,
    seen: Seen,
    prefect_version: &str,
    now: DateTime<Utc>,
) -> Option<(Event, Option<Diagnosis>)> {
    let meta = &pod.metadata;
    let uid = meta.uid.as_deref()?;
    let status = pod.status.as_ref()?;
    let phase = status.phase.as_deref()?;
    let diagnosis = diagnose(status);
    let id = event_id(
        uid,
        phase,
        restart_count(status),
        diagnosis.as_ref().map(|d| d.category),
    );

    let mut resource = Resource::new(format!("prefect.kubernetes.pod.{uid}"))
        .with(
            "prefect.resource.name",
            meta.name.clone().unwrap_or_default(),
        )
        .with(
            "kubernetes.namespace",
            meta.namespace.clone().unwrap_or_default(),
        );
    if let Some(d) = &diagnosis {
        resource.insert("kubernetes.diagnosis", d.category);
    }
    // A Failed pod seen changing with a terminated container is reported as `evicted`,
    // whatever the reason, a plain exit 1 (`Error`) included.
    let mut name = phase.to_lowercase();
    if seen == Seen::Changed && phase == "Failed" {
        let reason = status
            .container_statuses
            .iter()
            .flatten()
            .find_map(|cs| cs.state.as_ref()?.terminated.as_ref()?.reason.clone());
        if let Some(reason) = reason {
            name = "evicted".into();
            resource.insert("kubernetes.reason", reason);
        }
    }
    let occurred = occurred(&name, status, meta.creation_timestamp.as_ref()).unwrap_or(now);
    let labels = meta.labels.clone().unwrap_or_default();
    let event = Event::new(
        format!("prefect.kubernetes.pod.{name}"),
        resource,
        related_from_labels(&labels, prefect_version),
    )
    .with_id(id)
    .with_occurred(occurred);
    Some((event, diagnosis))
}

/// `uuid5(NAMESPACE_URL, json.dumps({...}, sort_keys=True))` over the pod's uid, its phase
/// (before the rename to `evicted`), its containers' restarts and its diagnosis.
pub fn event_id(uid: &str, phase: &str, restart_count: i64, diagnosis: Option<&str>) -> Uuid {
    // Python's `json.dumps` with its default separators; serde_json escapes as
    // `ensure_ascii` would only for ASCII, which uids, phases and categories are.
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let diagnosis = diagnosis.map_or_else(|| "null".to_owned(), q);
    let text = format!(
        "{{\"diagnosis\": {diagnosis}, \"phase\": {}, \"restart_count\": {restart_count}, \"uid\": {}}}",
        q(phase),
        q(uid)
    );
    Uuid::new_v5(&Uuid::NAMESPACE_URL, text.as_bytes())
}

fn restart_count(status: &PodStatus) -> i64 {
    status
        .container_statuses
        .iter()
        .flatten()
        .map(|cs| i64::from(cs.restart_count))
        .sum()
}

/// When the phase began, as far as the pod says (`_pod_phase_occurred`).
fn occurred(name: &str, status: &PodStatus, created: Option<&Time>) -> Option<DateTime<Utc>> {
    match name {
        "pending" => created.map(to_chrono),
        "running" => status
            .container_statuses
            .iter()
            .flatten()
            .filter_map(|cs| cs.state.as_ref()?.running.as_ref()?.started_at.as_ref())
            .map(to_chrono)
            .max()
            .or_else(|| status.start_time.as_ref().map(to_chrono)),
        "succeeded" | "failed" | "evicted" => container_statuses(status)
            .filter_map(|cs| cs.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
            .map(to_chrono)
            .max(),
        _ => None,
    }
}

pub(crate) fn to_chrono(t: &Time) -> DateTime<Utc> {
    let ts = t.0;
    DateTime::from_timestamp(ts.as_second(), ts.subsec_nanosecond().max(0) as u32)
        .unwrap_or_default()
}

/// The run's resources as the pod's labels name them (so names are the slugified label
/// values), then the worker (`_related_resources_from_labels`).
fn related_from_labels(
    labels: &std::collections::BTreeMap<String, String>,
    prefect_version: &str,
) -> Vec<RelatedResource> {
    let mut related = Vec::new();
    for (kind, id_label, name_label) in [
        (
            "flow-run",
            "prefect.io/flow-run-id",
            "prefect.io/flow-run-name",
        ),
        (
            "deployment",
            "prefect.io/deployment-id",
            "prefect.io/deployment-name",
        ),
        ("flow", "prefect.io/flow-id", "prefect.io/flow-name"),
        (
            "work-pool",
            "prefect.io/work-pool-id",
            "prefect.io/work-pool-name",
        ),
    ] {
        if let Some(id) = labels.get(id_label).filter(|id| !id.is_empty()) {
            let mut r = RelatedResource::new(format!("prefect.{kind}.{id}"), kind);
            if let Some(name) = labels.get(name_label) {
                r.insert("prefect.resource.name", name.clone());
            }
            related.push(r);
        }
    }
    if let Some(worker) = labels
        .get("prefect.io/worker-name")
        .filter(|w| !w.is_empty())
    {
        related.push(
            RelatedResource::new(
                format!("prefect.worker.kubernetes.{}", slugify(worker)),
                "worker",
            )
            .with("prefect.resource.name", worker.clone())
            .with("prefect.worker-type", "kubernetes")
            .with("prefect.version", prefect_version),
        );
    }
    related
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// prefect-kubernetes 0.8.0's observer fed the same pod states
    /// (`tests/goldens/observer-pod-events.json`, recorded from its `_replicate_pod_event`).
    #[test]
    fn pod_events_match_prefects_observer() {
        let golden: Value =
            serde_json::from_str(include_str!("../tests/goldens/observer-pod-events.json"))
                .unwrap();
        let labels = json!({"prefect.io/flow-run-id": "33333333-3333-4333-8333-333333333333", "prefect.io/flow-run-name": "witty-otter",
          "prefect.io/deployment-id": "22222222-2222-4222-8222-222222222222", "prefect.io/deployment-name": "my-dep",
          "prefect.io/flow-id": "11111111-1111-4111-8111-111111111111", "prefect.io/flow-name": "My-Flow_Name",
          "prefect.io/work-pool-id": "44444444-4444-4444-8444-444444444444", "prefect.io/work-pool-name": "k8s-pool",
          "prefect.io/worker-name": "My-K8s-Worker", "job-name": "witty-otter-abcde"});
        let cs = |state: Value| json!([{"name": "prefect-job", "restartCount": 0, "state": state, "image": "i", "imageID": "", "ready": false}]);
        let cases: Vec<(&str, Seen, Value)> = vec![
            ("pending_added", Seen::Changed, json!({"phase": "Pending"})),
            (
                "pending_imagepull",
                Seen::Changed,
                json!({"phase": "Pending", "containerStatuses": cs(json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}))}),
            ),
            (
                "pending_unschedulable",
                Seen::Changed,
                json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."}]}),
            ),
            (
                "running",
                Seen::Changed,
                json!({"phase": "Running", "startTime": "2026-10-20T10:00:01Z", "containerStatuses": cs(json!({"running": {"startedAt": "2026-10-20T10:00:05Z"}}))}),
            ),
            (
                "succeeded",
                Seen::Changed,
                json!({"phase": "Succeeded", "containerStatuses": cs(json!({"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": "2026-10-20T10:01:00Z"}}))}),
            ),
            (
                "failed_exit1",
                Seen::Changed,
                json!({"phase": "Failed", "containerStatuses": cs(json!({"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-10-20T10:01:00Z"}}))}),
            ),
            (
                "failed_oom",
                Seen::Changed,
                json!({"phase": "Failed", "containerStatuses": cs(json!({"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-10-20T10:01:00Z"}}))}),
            ),
            (
                "failed_evicted_podlevel",
                Seen::Changed,
                json!({"phase": "Failed", "containerStatuses": [], "reason": "Evicted", "message": "The node was low on resource: memory."}),
            ),
            (
                "failed_deleted",
                Seen::Deleted,
                json!({"phase": "Failed", "containerStatuses": cs(json!({"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-10-20T10:01:00Z"}}))}),
            ),
            ("unknown", Seen::Changed, json!({"phase": "Unknown"})),
        ];
        let now = DateTime::parse_from_rfc3339("2026-12-03T07:33:08Z")
            .unwrap()
            .to_utc();
        for (name, seen, status) in cases {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "witty-otter-abcde-xyz12", "namespace": "prefect", "uid": "pod-uid-1",
                             "creationTimestamp": "2026-10-20T10:00:00Z", "labels": labels},
                "status": status,
            }))
            .unwrap();
            let event = pod_event(&pod, seen, "3.8.8", now).expect(name);
            let want = &golden[name][0];
            let got: Value = serde_json::from_str(&event.to_wire_json().unwrap()).unwrap();
            for field in ["event", "id", "resource", "related", "payload"] {
                assert_eq!(got[field], want[field], "{name}: {field}");
            }
            // Phases with a timestamp of their own keep it; the rest are stamped when seen.
            if !matches!(name, "failed_evicted_podlevel" | "unknown") {
                let occurred = |v: &Value| {
                    DateTime::parse_from_rfc3339(v["occurred"].as_str().unwrap()).unwrap()
                };
                assert_eq!(occurred(&got), occurred(want), "{name}: occurred");
            }
        }
    }

    #[test]
    fn unschedulable_categories_follow_the_schedulers_words() {
        let status = |message: &str| -> PodStatus {
            serde_json::from_value(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]})).unwrap()
        };
        let category = |m: &str| diagnose(&status(m)).unwrap().category;
        assert_eq!(
            category("0/1 nodes are available: 1 node(s) had untolerated taint {a: b}."),
            "Unschedulable.Taint"
        );
        assert_eq!(
            category(
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            ),
            "Unschedulable.NodeAffinity"
        );
        assert_eq!(
            category("0/1 nodes are available: 1 Insufficient cpu."),
            "Unschedulable.InsufficientResources"
        );
        assert_eq!(
            category(
                "0/1 nodes are available: 1 node(s) didn't match pod topology spread constraints."
            ),
            "Unschedulable"
        );
    }
}
