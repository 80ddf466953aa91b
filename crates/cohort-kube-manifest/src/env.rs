//! The container's `env`: the run's environment under the job's own, the SIGTERM rule, and the
//! Kubernetes list it becomes (`prefect_kubernetes/worker.py: prepare_for_flow_run`,
//! `_configure_eviction_handling`, `_populate_env_in_manifest`; `prefect/workers/base.py:
//! BaseJobConfiguration.prepare_for_flow_run`).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::config::JobEnv;
use crate::error::ManifestError;
use crate::settings::settings_rank;
use crate::Map;

/// What `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR` tells `prefect flow-run execute` to do when
/// the pod is evicted.
pub(crate) const SIGTERM_BEHAVIOR: &str = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR";

/// The run identifiers of `BaseJobConfiguration._base_flow_run_environment` and
/// `_base_attribution_environment`, in Prefect's order, after the settings.
const RUN_KEYS: [&str; 7] = [
    "PREFECT__FLOW_RUN_ID",
    "PREFECT__WORKER_ID",
    "PREFECT__WORKER_NAME",
    "PREFECT__FLOW_ID",
    "PREFECT__FLOW_NAME",
    "PREFECT__DEPLOYMENT_ID",
    "PREFECT__DEPLOYMENT_NAME",
];

/// The environment between the base preparation and the manifest: an object while the job's
/// env had no `valueFrom` entry, else the Kubernetes list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RunEnv {
    Dict(Map),
    List(Vec<Value>),
}

/// Steps 1–3 of the preparation: the job's list env split into plain values and `valueFrom`
/// entries; the run's environment (settings in Prefect's order, then the run identifiers)
/// with the job's values on top and nulls dropped; the `valueFrom` entries put back after it.
pub(crate) fn run_env(
    job_env: &JobEnv,
    worker_env: &BTreeMap<String, String>,
    flow_run_id: Uuid,
    worker_id: Option<Uuid>,
) -> Result<RunEnv, ManifestError> {
    let (job_values, value_from): (Vec<(String, Value)>, Vec<Map>) = match job_env {
        JobEnv::Dict(entries) => (
            entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::String)))
                .collect(),
            Vec::new(),
        ),
        JobEnv::List(items) => {
            let value_from = items
                .iter()
                .filter(|item| item.contains_key("valueFrom"))
                .cloned()
                .collect();
            let mut values = Vec::new();
            for item in items {
                if let (Some(name), Some(value)) = (item.get("name"), item.get("value")) {
                    let Value::String(name) = name else {
                        return Err(ManifestError::field("env", "names must be strings"));
                    };
                    values.push((name.clone(), value.clone()));
                }
            }
            (values, value_from)
        }
    };

    let mut env = Map::new();
    let mut settings: Vec<(&String, &String)> = worker_env
        .iter()
        .filter(|(k, _)| !RUN_KEYS.contains(&k.as_str()))
        .collect();
    settings.sort_by_key(|(k, _)| (settings_rank(k), k.as_str()));
    for (k, v) in settings {
        env.insert(k.clone(), Value::String(v.clone()));
    }
    for key in RUN_KEYS {
        let value = match key {
            "PREFECT__FLOW_RUN_ID" => Some(flow_run_id.to_string()),
            "PREFECT__WORKER_ID" => worker_id
                .map(|id| id.to_string())
                .or_else(|| worker_env.get(key).cloned()),
            _ => worker_env.get(key).cloned(),
        };
        if let Some(value) = value {
            env.insert(key.to_owned(), Value::String(value));
        }
    }
    for (k, v) in job_values {
        env.insert(k, v);
    }
    env.retain(|_, v| !v.is_null());

    if value_from.is_empty() {
        return Ok(RunEnv::Dict(env));
    }
    let mut list: Vec<Value> = env
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    list.extend(value_from.into_iter().map(Value::Object));
    Ok(RunEnv::List(list))
}

/// `_configure_eviction_handling`: with `backoffLimit == 0` (Python's `==`, so `0.0` and `false`
/// too) a pod eviction reschedules the run, unless the env already says otherwise; with any
/// other limit, absent included, Kubernetes retries, so the run must relinquish: that value is
/// forced over the user's.
pub(crate) fn configure_eviction(env: &mut RunEnv, backoff_limit: Option<&Value>) {
    let reschedule = backoff_limit.is_some_and(python_equals_zero);
    match env {
        RunEnv::Dict(map) => {
            if !reschedule {
                map.insert(SIGTERM_BEHAVIOR.into(), "relinquish".into());
            } else if !map.get(SIGTERM_BEHAVIOR).is_some_and(truthy) {
                map.insert(SIGTERM_BEHAVIOR.into(), "reschedule".into());
            }
        }
        RunEnv::List(list) => {
            let named = |entry: &Value| entry.get("name") == Some(&json!(SIGTERM_BEHAVIOR));
            if !reschedule {
                list.retain(|entry| !named(entry));
                list.push(json!({"name": SIGTERM_BEHAVIOR, "value": "relinquish"}));
            } else if !list.iter().any(named) {
                list.push(json!({"name": SIGTERM_BEHAVIOR, "value": "reschedule"}));
            }
        }
    }
}

/// `_populate_env_in_manifest`: the env as a Kubernetes list in the first container. When the
/// template hard-codes a list there, its entries whose names we did not set follow ours.
pub(crate) fn populate_env(container: &mut Map, env: RunEnv) -> Result<(), ManifestError> {
    let ours: Vec<Value> = match env {
        RunEnv::Dict(map) => map
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect(),
        RunEnv::List(list) => list,
    };
    let merged = match container.get("env") {
        Some(Value::Array(template_env)) => {
            let names = ours
                .iter()
                .map(|entry| {
                    entry.get("name").cloned().ok_or_else(|| {
                        ManifestError::manifest("an env entry with `valueFrom` has no `name`")
                    })
                })
                .collect::<Result<Vec<Value>, _>>()?;
            let mut merged = ours;
            for entry in template_env {
                let Value::Object(entry) = entry else {
                    return Err(ManifestError::manifest(
                        "the template's env entries must be objects",
                    ));
                };
                let name = entry.get("name").unwrap_or(&Value::Null);
                if !names.contains(name) {
                    merged.push(Value::Object(entry.clone()));
                }
            }
            merged
        }
        _ => ours,
    };
    container.insert("env".into(), Value::Array(merged));
    Ok(())
}

fn python_equals_zero(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(b) => !b,
        _ => false,
    }
}

/// Python's truthiness of a JSON value.
pub(crate) fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(pairs: &[(&str, &str)]) -> RunEnv {
        RunEnv::Dict(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect(),
        )
    }

    #[test]
    fn settings_come_in_prefects_order_then_the_run_identifiers() {
        let worker_env: BTreeMap<String, String> = [
            ("PREFECT_API_KEY", "k"),
            ("PREFECT_API_URL", "u"),
            ("PREFECT__FLOW_NAME", "f"),
            ("PREFECT__WORKER_NAME", "w"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let env = run_env(&JobEnv::Dict(vec![]), &worker_env, Uuid::nil(), None).unwrap();
        let RunEnv::Dict(map) = env else { panic!() };
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "PREFECT_API_URL",
                "PREFECT_API_KEY",
                "PREFECT__FLOW_RUN_ID",
                "PREFECT__WORKER_NAME",
                "PREFECT__FLOW_NAME"
            ]
        );
    }

    #[test]
    fn a_zero_backoff_limit_reschedules_unless_the_user_chose() {
        let mut env = dict(&[(SIGTERM_BEHAVIOR, "cancel"), ("Z", "1")]);
        configure_eviction(&mut env, Some(&json!(0)));
        assert_eq!(env, dict(&[(SIGTERM_BEHAVIOR, "cancel"), ("Z", "1")]));
        let mut env = dict(&[(SIGTERM_BEHAVIOR, ""), ("Z", "1")]);
        configure_eviction(&mut env, Some(&json!(false)));
        assert_eq!(env, dict(&[(SIGTERM_BEHAVIOR, "reschedule"), ("Z", "1")]));
    }

    #[test]
    fn any_other_backoff_limit_forces_relinquish() {
        let mut env = RunEnv::List(vec![
            json!({"name": SIGTERM_BEHAVIOR, "valueFrom": {}}),
            json!({"name": "A", "value": "1"}),
        ]);
        configure_eviction(&mut env, None);
        assert_eq!(
            env,
            RunEnv::List(vec![
                json!({"name": "A", "value": "1"}),
                json!({"name": SIGTERM_BEHAVIOR, "value": "relinquish"}),
            ])
        );
    }

    #[test]
    fn a_hard_coded_template_list_keeps_the_names_we_did_not_set() {
        let mut container = Map::new();
        container.insert(
            "env".into(),
            json!([{"name": "A", "value": "template"}, {"name": "T", "value": "t"}]),
        );
        populate_env(&mut container, dict(&[("A", "ours")])).unwrap();
        assert_eq!(
            container["env"],
            json!([{"name": "A", "value": "ours"}, {"name": "T", "value": "t"}])
        );
    }
}
