//! The type checks Prefect's pydantic model applies to the fields every job
//! configuration has (`prefect/workers/base.py: BaseJobConfiguration`), run once all
//! placeholders are resolved.

use serde_json::Value;

use crate::error::{json_type_name, TemplateError};
use crate::Map;

/// Checks the fields every worker's job configuration shares, as
/// `BaseJobConfiguration(**config)` would:
///
/// * `command`, `name`: a string or null;
/// * `env`: an object (any values: Prefect turns each non-null value into its Python
///   `str()`, see [`crate::python_str`]; null values are kept, then dropped when the
///   flow-run environment is built), or a list of objects, which only Kubernetes' model
///   takes (`prefect_kubernetes/worker.py: KubernetesWorkerJobConfiguration.env`, with
///   `valueFrom` entries): the process and Docker workers refuse a list when they read it
///   ([`crate::fields::env`]);
/// * `labels`: an object of strings.
///
/// Absent fields are fine (the model's defaults apply). Worker-specific fields
/// (`stream_output`, `working_dir`, `image`, …) are the worker's to check.
pub fn validate_base_fields(config: &Map) -> Result<(), TemplateError> {
    for field in ["command", "name"] {
        match config.get(field) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(other) => {
                return Err(TemplateError::invalid_field(
                    field,
                    format!("must be a string, not {}", json_type_name(other)),
                ))
            }
        }
    }
    match config.get("env") {
        None | Some(Value::Object(_)) => {}
        Some(Value::Array(entries)) if entries.iter().all(Value::is_object) => {}
        Some(other) => {
            return Err(TemplateError::invalid_field(
                "env",
                format!(
                    "must be an object of environment variables, not {}",
                    json_type_name(other)
                ),
            ))
        }
    }
    match config.get("labels") {
        None => {}
        Some(Value::Object(labels)) => {
            if let Some((key, value)) = labels.iter().find(|(_, value)| !value.is_string()) {
                return Err(TemplateError::invalid_field(
                    "labels",
                    format!(
                        "values must be strings, but label `{key}` is {}",
                        json_type_name(value)
                    ),
                ));
            }
        }
        Some(other) => {
            return Err(TemplateError::invalid_field(
                "labels",
                format!(
                    "must be an object of strings, not {}",
                    json_type_name(other)
                ),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(config: Value) -> Result<(), TemplateError> {
        match config {
            Value::Object(map) => validate_base_fields(&map),
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn accepts_what_prefect_accepts() {
        check(json!({})).unwrap();
        check(json!({
            "command": null, "name": "n", "labels": {"a": "b"},
            "env": {"A": {"x": 1}, "B": null, "C": true},
            "stream_output": "not checked here",
        }))
        .unwrap();
    }

    #[test]
    fn refuses_what_prefect_refuses() {
        // Each of these makes `BaseJobConfiguration(**config)` raise in Prefect 3.8.8.
        for (config, field) in [
            (json!({"env": null}), "env"),
            (json!({"env": [["A", "1"]]}), "env"),
            (json!({"env": "ab"}), "env"),
            (json!({"labels": {"a": 1}}), "labels"),
            (json!({"labels": null}), "labels"),
            (json!({"command": 5}), "command"),
            (json!({"name": 3}), "name"),
        ] {
            match check(config.clone()) {
                Err(TemplateError::InvalidJobConfiguration { field: f, .. }) => {
                    assert_eq!(f, field, "{config}")
                }
                other => panic!("{config}: {other:?}"),
            }
        }
        assert_eq!(
            check(json!({"env": ["A"]})).unwrap_err().to_string(),
            "invalid job configuration: `env` must be an object of environment variables, not a list"
        );
    }
}
