//! Helpers shared by the emulator's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};

/// How long any single step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test with `what` when it takes longer than [`STEP`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

/// A Job the way Prefect's worker renders one (trimmed), with `generateName`.
pub fn prefect_job(generate_name: &str, flow_run_id: &str, image: &str, args: &[&str]) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "generateName": generate_name,
            "labels": {"prefect.io/flow-run-id": flow_run_id},
            "annotations": {}
        },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"prefect.io/flow-run-id": flow_run_id}},
                "spec": {
                    "completions": 1,
                    "parallelism": 1,
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "prefect-job",
                        "image": image,
                        "args": args,
                        "imagePullPolicy": "IfNotPresent",
                        "resources": {"limits": {}, "requests": {}}
                    }]
                }
            }
        }
    })
}

/// The one condition of a type on an object, if present.
pub fn condition(obj: &Value, kind: &str) -> Option<Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

/// `metadata.name`.
pub fn name_of(obj: &Value) -> String {
    obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}
