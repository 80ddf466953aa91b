//! Cohort's `prefect.kubernetes.pod.*` events against prefect-kubernetes 0.8.0's own observer:
//! a matrix of pod states (phases, waiting and terminated reasons, restarts, init containers,
//! scheduling conditions, evictions, each seen added, changed and deleted) goes through
//! Prefect's `_replicate_pod_event` (`goldens/pod_events.py`, in the venv of
//! `scripts/prefect-venv.sh kubernetes`) and through [`pod_event`]; the events must agree on
//! name, id, resource, related resources, payload and, where the pod dates it, occurred.

use std::io::Write as _;
use std::process::{Command, Stdio};

use chrono::{DateTime, Utc};
use cohort_kubernetes::pod::{pod_event, Seen};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

fn labels() -> Value {
    json!({"prefect.io/flow-run-id": "33333333-3333-4333-8333-333333333333", "prefect.io/flow-run-name": "witty-otter",
      "prefect.io/deployment-id": "22222222-2222-4222-8222-222222222222", "prefect.io/deployment-name": "my-dep",
      "prefect.io/flow-id": "11111111-1111-4111-8111-111111111111", "prefect.io/flow-name": "My-Flow_Name",
      "prefect.io/work-pool-id": "44444444-4444-4444-8444-444444444444", "prefect.io/work-pool-name": "k8s-pool",
      "prefect.io/worker-name": "My-K8s-Worker", "job-name": "witty-otter-abcde"})
}

fn container(name: &str, restarts: i32, state: Value) -> Value {
    json!({"name": name, "restartCount": restarts, "state": state, "image": "i", "imageID": "", "ready": false})
}

/// Pod statuses worth comparing.
fn statuses() -> Vec<Value> {
    let waiting =
        |reason: &str, message: &str| json!({"waiting": {"reason": reason, "message": message}});
    let terminated = |code: i32, reason: &str, finished: &str| json!({"terminated": {"exitCode": code, "reason": reason, "finishedAt": finished}});
    let unschedulable = |message: &str| json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]);
    let mut all = vec![
        json!({"phase": "Pending"}),
        json!({"phase": "Pending", "containerStatuses": [container("prefect-job", 0, waiting("ContainerCreating", ""))]}),
        json!({"phase": "Pending", "containerStatuses": [container("prefect-job", 0, waiting("ErrImagePull", "rpc error: not found"))]}),
        json!({"phase": "Pending", "containerStatuses": [container("prefect-job", 0, waiting("ImagePullBackOff", ""))]}),
        json!({"phase": "Running", "containerStatuses": [container("prefect-job", 4, waiting("CrashLoopBackOff", "back-off 40s restarting failed container"))]}),
        json!({"phase": "Pending", "initContainerStatuses": [container("init", 0, waiting("ImagePullBackOff", "init image"))]}),
        json!({"phase": "Running", "startTime": "2026-10-20T10:00:01Z",
               "containerStatuses": [container("prefect-job", 0, json!({"running": {"startedAt": "2026-10-20T10:00:05Z"}})),
                                     container("sidecar", 1, json!({"running": {"startedAt": "2026-10-20T10:00:09Z"}}))]}),
        json!({"phase": "Running", "startTime": "2026-10-20T10:00:01Z"}),
        json!({"phase": "Succeeded", "containerStatuses": [container("prefect-job", 0, terminated(0, "Completed", "2026-10-20T10:01:00Z"))]}),
        json!({"phase": "Failed", "containerStatuses": [container("prefect-job", 0, terminated(1, "Error", "2026-10-20T10:01:00Z"))]}),
        json!({"phase": "Failed", "containerStatuses": [container("prefect-job", 2, terminated(137, "OOMKilled", "2026-10-20T10:02:00Z"))]}),
        json!({"phase": "Failed", "initContainerStatuses": [container("init", 0, terminated(137, "OOMKilled", "2026-10-20T10:03:00Z"))],
               "containerStatuses": [container("prefect-job", 0, terminated(143, "Error", "2026-10-20T10:01:00Z"))]}),
        json!({"phase": "Failed", "containerStatuses": [container("prefect-job", 0, terminated(143, "Evicted", "2026-10-20T10:01:00Z"))]}),
        json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.", "containerStatuses": []}),
        json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: ephemeral-storage.",
               "containerStatuses": [container("prefect-job", 0, terminated(0, "Completed", "2026-10-20T10:04:00Z"))]}),
        json!({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline"}),
        json!({"phase": "Unknown"}),
    ];
    for message in [
        "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.",
        "0/1 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }.",
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.",
        "0/2 nodes are available: 2 node(s) didn't match pod topology spread constraints.",
        "",
    ] {
        all.push(json!({"phase": "Pending", "conditions": unschedulable(message)}));
    }
    all
}

fn python_events(cases: &Value) -> Vec<Value> {
    let python = cohort_testkit::venv_python("kubernetes", "COHORT_PREFECT_KUBERNETES_VENV");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/goldens/pod_events.py");
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(python)
        .arg(script)
        .env("PREFECT_HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run Prefect's observer");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "goldens/pod_events.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the observer's events as JSON")
}

#[test]
fn pod_events_are_prefects_observers() {
    let mut cases = Vec::new();
    for (i, status) in statuses().into_iter().enumerate() {
        for (kind, seen) in [
            ("ADDED", Seen::Listed),
            ("MODIFIED", Seen::Changed),
            ("DELETED", Seen::Deleted),
        ] {
            let pod = json!({
                "metadata": {"name": format!("witty-otter-abcde-{i}"), "namespace": "prefect",
                             "uid": format!("pod-uid-{i}"), "creationTimestamp": "2026-10-20T10:00:00Z",
                             "labels": labels()},
                "status": status,
            });
            cases.push((json!({"type": kind, "pod": pod}), seen));
        }
    }
    let input = Value::Array(cases.iter().map(|(c, _)| c.clone()).collect());
    let prefect = python_events(&input);
    assert_eq!(prefect.len(), cases.len());
    let now = Utc::now();
    let mut mismatches = Vec::new();
    for ((case, seen), want) in cases.iter().zip(&prefect) {
        let pod: Pod = serde_json::from_value(case["pod"].clone()).unwrap();
        let got = pod_event(&pod, *seen, "3.8.8", now);
        let want = want.as_array().unwrap().first();
        let (got, want) = match (got, want) {
            (Some(g), Some(w)) => (
                serde_json::from_str::<Value>(&g.to_wire_json().unwrap()).unwrap(),
                w,
            ),
            (None, None) => continue,
            (g, w) => {
                mismatches.push(format!("{case}: cohort {g:?}, prefect {w:?}"));
                continue;
            }
        };
        for field in ["event", "id", "resource", "related", "payload"] {
            if got[field] != want[field] {
                mismatches.push(format!(
                    "{} {}: {field}: cohort {} prefect {}",
                    case["type"], case["pod"]["status"], got[field], want[field]
                ));
            }
        }
        // Prefect stamps phases with no date of their own when it handles them.
        let occurred =
            |v: &Value| DateTime::parse_from_rfc3339(v["occurred"].as_str().unwrap()).unwrap();
        let stamped_now = (occurred(&got).to_utc() - now).num_seconds().abs() < 5;
        if !stamped_now && occurred(&got) != occurred(want) {
            mismatches.push(format!(
                "{} {}: occurred",
                case["type"], case["pod"]["status"]
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
