//! Labels and annotations: the run's labels in Prefect's order with the Kubernetes additions,
//! and their slugs on the Job and its pod template (`prefect_kubernetes/worker.py:
//! _base_flow_run_labels`, `_base_flow_labels`, `_base_deployment_labels`, `_slugify_labels`,
//! `_slugify_annotations`, `_propagate_labels_to_pod`, `_propagate_annotations_to_pod`).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::ManifestError;
use crate::slug::{slugify_label_key, slugify_label_value};
use crate::Map;

/// The Prefect version a label names when the run's labels do not say (`prefect.__version__`).
const PREFECT_VERSION: &str = "3.8.8";

/// The run's labels as `BaseJobConfiguration.prepare_for_flow_run` merges them, with
/// prefect-kubernetes' overrides: the flow-run labels (version slugged) plus
/// `app.kubernetes.io/{managed-by,part-of,version}`; pool; worker; flow plus
/// `app.kubernetes.io/name` (slug of the flow name); deployment, whose slugged name then
/// overwrites `app.kubernetes.io/name` in place; the job's own labels last.
///
/// `run` holds the raw generic labels (`cohort_infra::RunSpec::labels`).
pub(crate) fn run_labels(
    run: &BTreeMap<String, String>,
    job: &[(String, String)],
) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = Vec::new();
    let version = run
        .get("prefect.io/version")
        .map_or(PREFECT_VERSION, String::as_str);
    let version = slugify_label_value(version.split('+').next().unwrap_or_default());
    for key in ["prefect.io/flow-run-id", "prefect.io/flow-run-name"] {
        put(&mut labels, key, run.get(key).cloned().unwrap_or_default());
    }
    put(&mut labels, "prefect.io/version", version.clone());
    put(
        &mut labels,
        "app.kubernetes.io/managed-by",
        "prefect".into(),
    );
    put(&mut labels, "app.kubernetes.io/part-of", "prefect".into());
    put(&mut labels, "app.kubernetes.io/version", version);
    let copy = |labels: &mut Vec<(String, String)>, keys: &[&str]| {
        for key in keys {
            if let Some(value) = run.get(*key) {
                put(labels, key, value.clone());
            }
        }
    };
    copy(
        &mut labels,
        &["prefect.io/work-pool-name", "prefect.io/work-pool-id"],
    );
    copy(&mut labels, &["prefect.io/worker-name"]);
    if run.contains_key("prefect.io/flow-id") {
        copy(&mut labels, &["prefect.io/flow-id", "prefect.io/flow-name"]);
        let name = run.get("prefect.io/flow-name").map_or("", String::as_str);
        put(
            &mut labels,
            "app.kubernetes.io/name",
            slugify_label_value(name),
        );
    }
    if run.contains_key("prefect.io/deployment-id") {
        copy(
            &mut labels,
            &[
                "prefect.io/deployment-id",
                "prefect.io/deployment-name",
                "prefect.io/deployment-updated",
            ],
        );
        let name = run
            .get("prefect.io/deployment-name")
            .map_or("", String::as_str);
        put(
            &mut labels,
            "app.kubernetes.io/name",
            slugify_label_value(name),
        );
    }
    for (key, value) in job {
        put(&mut labels, key, value.clone());
    }
    labels
}

/// A dict assignment: a new key goes last, an existing one keeps its place.
fn put(labels: &mut Vec<(String, String)>, key: &str, value: String) {
    match labels.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = value,
        None => labels.push((key.to_owned(), value)),
    }
}

/// `{**existing, **ours}` with every key and value slugged (a later key that slugs to an
/// earlier one overwrites its value in place, as a dict comprehension does).
pub(crate) fn slugged_labels(
    existing: Option<&Value>,
    ours: &[(String, String)],
    what: &str,
) -> Result<Map, ManifestError> {
    let mut merged = object(existing, what)?;
    for (key, value) in ours {
        merged.insert(key.clone(), Value::String(value.clone()));
    }
    merged
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(value) => Ok((
                slugify_label_key(&key),
                Value::String(slugify_label_value(&value)),
            )),
            _ => Err(ManifestError::manifest(format!(
                "the value of {what} `{key}` must be a string"
            ))),
        })
        .collect()
}

/// `{**existing, **ours}` with the keys slugged; annotation values are free text.
pub(crate) fn slugged_annotations(
    existing: Option<&Value>,
    ours: &[(String, String)],
) -> Result<Map, ManifestError> {
    let mut merged = object(existing, "annotation")?;
    for (key, value) in ours {
        merged.insert(key.clone(), Value::String(value.clone()));
    }
    Ok(merged
        .into_iter()
        .map(|(key, value)| (slugify_label_key(&key), value))
        .collect())
}

fn object(value: Option<&Value>, what: &str) -> Result<Map, ManifestError> {
    match value {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(_) => Err(ManifestError::manifest(format!(
            "the {what}s must be an object"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn without_a_deployment_the_app_name_is_the_flows() {
        let labels = run_labels(
            &run(&[
                ("prefect.io/flow-run-id", "id"),
                ("prefect.io/flow-run-name", "run"),
                ("prefect.io/version", "3.8.8+local"),
                ("prefect.io/flow-id", "fid"),
                ("prefect.io/flow-name", "My Flow"),
            ]),
            &[("team".into(), "a".into())],
        );
        let keys: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("prefect.io/flow-run-id", "id"),
                ("prefect.io/flow-run-name", "run"),
                ("prefect.io/version", "3.8.8"),
                ("app.kubernetes.io/managed-by", "prefect"),
                ("app.kubernetes.io/part-of", "prefect"),
                ("app.kubernetes.io/version", "3.8.8"),
                ("prefect.io/flow-id", "fid"),
                ("prefect.io/flow-name", "My Flow"),
                ("app.kubernetes.io/name", "My-Flow"),
                ("team", "a"),
            ]
        );
    }

    #[test]
    fn slugged_keys_that_collide_keep_the_first_place_and_the_last_value() {
        let existing = serde_json::json!({"a b": "1", "c": "2"});
        let merged = slugged_labels(Some(&existing), &[("a  b".into(), "3".into())], "label");
        let merged = merged.unwrap();
        assert_eq!(
            serde_json::to_string(&merged).unwrap(),
            r#"{"a-b":"3","c":"2"}"#
        );
    }
}
