//! The process job configuration: a rendered base job template read into typed fields, with
//! the checks pydantic applies to Prefect's `ProcessJobConfiguration` (`prefect/workers/process.py`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

pub use cohort_infra::Map;

/// A rendered job configuration that does not fit the process worker's fields.
#[derive(Debug, thiserror::Error)]
#[error("invalid job configuration: `{field}` {reason}")]
pub struct JobConfigurationError {
    pub field: &'static str,
    pub reason: String,
}

/// What the process worker needs to start one flow run.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessJob {
    /// The configured command, split like a POSIX shell would; `None` runs Prefect's engine.
    pub command: Option<Vec<String>>,
    /// Rendered `env`; a `None` value unsets the variable.
    pub env: BTreeMap<String, Option<String>>,
    pub stream_output: bool,
    pub working_dir: Option<PathBuf>,
}

impl ProcessJob {
    pub fn from_config(config: &Map) -> Result<Self, JobConfigurationError> {
        let command = match config.get("command") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => {
                Some(shlex::split(s).filter(|v| !v.is_empty()).ok_or_else(|| {
                    JobConfigurationError {
                        field: "command",
                        reason: format!("cannot be split into words: {s:?}"),
                    }
                })?)
            }
            Some(other) => return Err(wrong_type("command", "a string", other)),
        };
        let env = match config.get("env") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| -> Result<_, JobConfigurationError> {
                    let v = match v {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        // Prefect stringifies every other value with Python's `str()`
                        // (`prefect/workers/base.py: BaseJobConfiguration._coerce_env`).
                        other => Some(cohort_template::python_str(other)),
                    };
                    Ok((k.clone(), v))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(wrong_type("env", "an object of strings", other)),
        };
        let stream_output = match config.get("stream_output") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "t" | "y" => true,
                "false" | "0" | "no" | "off" | "f" | "n" => false,
                _ => {
                    return Err(wrong_type(
                        "stream_output",
                        "a boolean",
                        &Value::String(s.clone()),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("stream_output", "a boolean", other)),
        };
        let working_dir = match config.get("working_dir") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(PathBuf::from(s)),
            Some(other) => return Err(wrong_type("working_dir", "a path string", other)),
        };
        Ok(Self {
            command,
            env,
            stream_output,
            working_dir,
        })
    }
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> JobConfigurationError {
    JobConfigurationError {
        field,
        reason: format!("must be {expected}, got {}", json_type(got)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn reads_rendered_default_template() {
        let job = ProcessJob::from_config(&map(json!({
            "command": "python -c 'print(1)'",
            "env": {"A": "1", "B": null, "C": 3},
            "labels": {},
            "stream_output": false,
            "working_dir": "/tmp/x"
        })))
        .unwrap();
        assert_eq!(job.command.unwrap(), vec!["python", "-c", "print(1)"]);
        assert_eq!(job.env["A"].as_deref(), Some("1"));
        assert_eq!(job.env["B"], None);
        assert_eq!(job.env["C"].as_deref(), Some("3"));
        assert!(!job.stream_output);
        assert_eq!(job.working_dir.unwrap(), PathBuf::from("/tmp/x"));
    }

    #[test]
    fn missing_keys_take_process_defaults() {
        let job = ProcessJob::from_config(&Map::new()).unwrap();
        assert_eq!(job.command, None);
        assert!(job.stream_output);
        assert!(job.env.is_empty());
    }

    #[test]
    fn wrong_shapes_are_named() {
        let err = ProcessJob::from_config(&map(json!({"env": ["A=1"]}))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job configuration: `env` must be an object of strings, got a list"
        );
        let err = ProcessJob::from_config(&map(json!({"command": "echo 'unclosed"}))).unwrap_err();
        assert!(err.to_string().contains("command"), "{err}");
        let job =
            ProcessJob::from_config(&map(json!({"env": {"A": {"x": 1}, "B": true}}))).unwrap();
        assert_eq!(job.env["A"].as_deref(), Some("{'x': 1}"));
        assert_eq!(job.env["B"].as_deref(), Some("True"));
    }
}
