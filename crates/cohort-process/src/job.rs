//! The process job configuration: a rendered base job template read into typed fields, with
//! the checks pydantic applies to Prefect's `ProcessJobConfiguration` (`prefect/workers/process.py`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use cohort_template::fields;
pub use cohort_template::fields::JobConfigurationError;
use serde_json::Value;

pub use cohort_infra::Map;

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
        let working_dir = match config.get("working_dir") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(PathBuf::from(s)),
            Some(other) => {
                return Err(JobConfigurationError::wrong_type(
                    "working_dir",
                    "a path string",
                    other,
                ))
            }
        };
        Ok(Self {
            command: fields::command(config)?,
            env: fields::env(config)?,
            stream_output: fields::boolean(config, "stream_output", true)?,
            working_dir,
        })
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
