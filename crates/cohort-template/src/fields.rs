//! Reading a rendered job configuration into typed fields, with the checks pydantic applies to
//! Prefect's `BaseJobConfiguration` and its workers' subclasses: shared by every
//! infrastructure's job reader.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::Map;

/// A rendered job configuration that does not fit a worker's fields.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid job configuration: `{field}` {reason}")]
pub struct JobConfigurationError {
    pub field: &'static str,
    pub reason: String,
}

impl JobConfigurationError {
    pub fn new(field: &'static str, reason: String) -> Self {
        Self { field, reason }
    }

    pub fn wrong_type(field: &'static str, expected: &str, got: &Value) -> Self {
        Self::new(field, format!("must be {expected}, got {}", json_type(got)))
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `command`, split like a POSIX shell would; `None` (absent, null or blank) runs the worker's
/// default (`BaseJobConfiguration._base_flow_run_command`).
pub fn command(config: &Map) -> Result<Option<Vec<String>>, JobConfigurationError> {
    match config.get("command") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => shlex::split(s)
            .filter(|v| !v.is_empty())
            .map(Some)
            .ok_or_else(|| {
                JobConfigurationError::new("command", format!("cannot be split into words: {s:?}"))
            }),
        Some(other) => Err(JobConfigurationError::wrong_type(
            "command", "a string", other,
        )),
    }
}

/// `env`; a `None` value unsets the variable. Prefect stringifies every other value with
/// Python's `str()` (`prefect/workers/base.py: BaseJobConfiguration._coerce_env`).
pub fn env(config: &Map) -> Result<BTreeMap<String, Option<String>>, JobConfigurationError> {
    match config.get("env") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => Ok(map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(crate::python_str(other)),
                };
                (k.clone(), v)
            })
            .collect()),
        Some(other) => Err(JobConfigurationError::wrong_type(
            "env",
            "an object of strings",
            other,
        )),
    }
}

/// A job's `env` over the environment it is given: its values win, a `None` unsets.
pub fn apply_env(env: &mut BTreeMap<String, String>, job_env: &BTreeMap<String, Option<String>>) {
    for (key, value) in job_env {
        match value {
            Some(v) => {
                env.insert(key.clone(), v.clone());
            }
            None => {
                env.remove(key);
            }
        }
    }
}

/// An optional string field; absent and null are `None`.
pub fn opt_string(
    config: &Map,
    field: &'static str,
) -> Result<Option<String>, JobConfigurationError> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(JobConfigurationError::wrong_type(field, "a string", other)),
    }
}

/// A boolean as pydantic reads it, strings like `"yes"` and `"0"` included.
pub fn boolean(
    config: &Map,
    field: &'static str,
    default: bool,
) -> Result<bool, JobConfigurationError> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
            "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
            _ => Err(JobConfigurationError::wrong_type(
                field,
                "a boolean",
                &Value::String(s.clone()),
            )),
        },
        Some(other) => Err(JobConfigurationError::wrong_type(field, "a boolean", other)),
    }
}
