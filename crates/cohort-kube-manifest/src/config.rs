//! A rendered configuration read the way pydantic reads it into
//! `prefect_kubernetes/worker.py: KubernetesWorkerJobConfiguration`: fields checked in the
//! model's order (the first bad one is reported), coerced where pydantic's lax mode coerces,
//! unknown keys ignored.

use cohort_template::python_str;
use serde_json::Value;

use crate::error::ManifestError;
use crate::Map;

/// The job's own environment, before the run's is laid under it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JobEnv {
    /// An object: values are Python's `str()` of what was given, `None` for null
    /// (`KubernetesWorkerJobConfiguration._coerce_env`).
    Dict(Vec<(String, Option<String>)>),
    /// A Kubernetes-style list of objects (`{name, value}` or `{name, valueFrom}`), kept as is.
    List(Vec<Map>),
}

#[derive(Debug, Clone)]
pub(crate) struct JobConfig {
    pub env: JobEnv,
    pub labels: Vec<(String, String)>,
    pub name: Option<String>,
    pub annotations: Vec<(String, String)>,
    pub namespace: String,
    pub job_manifest: Map,
    pub cluster_config: Option<Value>,
    pub job_watch_timeout_seconds: Option<i64>,
    pub pod_watch_timeout_seconds: i64,
    pub stream_output: bool,
}

impl JobConfig {
    pub(crate) fn read(config: &Map) -> Result<Self, ManifestError> {
        // `command` only matters to pydantic here: the Job's command is the manifest's `args`.
        opt_string(config, "command")?;
        Ok(Self {
            env: env(config)?,
            labels: string_map(config, "labels")?,
            name: opt_string(config, "name")?,
            annotations: string_map(config, "annotations")?,
            namespace: match config.get("namespace") {
                None => "default".to_owned(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(ManifestError::field("namespace", "must be a string")),
            },
            job_manifest: match config.get("job_manifest") {
                Some(Value::Object(manifest)) => manifest.clone(),
                None => return Err(ManifestError::field("job_manifest", "is required")),
                Some(_) => return Err(ManifestError::field("job_manifest", "must be an object")),
            },
            cluster_config: cluster_config(config)?,
            job_watch_timeout_seconds: match config.get("job_watch_timeout_seconds") {
                None | Some(Value::Null) => None,
                Some(v) => Some(integer("job_watch_timeout_seconds", v)?),
            },
            pod_watch_timeout_seconds: match config.get("pod_watch_timeout_seconds") {
                None => 60,
                Some(v) => integer("pod_watch_timeout_seconds", v)?,
            },
            stream_output: match config.get("stream_output") {
                None => true,
                Some(v) => boolean("stream_output", v)?,
            },
        })
    }
}

fn env(config: &Map) -> Result<JobEnv, ManifestError> {
    match config.get("env") {
        None => Ok(JobEnv::Dict(Vec::new())),
        Some(Value::Object(map)) => Ok(JobEnv::Dict(
            map.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Null => None,
                        other => Some(python_str(other)),
                    };
                    (k.clone(), v)
                })
                .collect(),
        )),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Object(entry) => Ok(entry.clone()),
                _ => Err(ManifestError::field("env", "list items must be objects")),
            })
            .collect::<Result<_, _>>()
            .map(JobEnv::List),
        Some(_) => Err(ManifestError::field(
            "env",
            "must be an object or a list of objects",
        )),
    }
}

fn opt_string(config: &Map, field: &'static str) -> Result<Option<String>, ManifestError> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ManifestError::field(field, "must be a string")),
    }
}

fn string_map(config: &Map, field: &'static str) -> Result<Vec<(String, String)>, ManifestError> {
    match config.get(field) {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(ManifestError::field(
                    field,
                    format!("values must be strings, but `{k}` is not"),
                )),
            })
            .collect(),
        Some(_) => Err(ManifestError::field(field, "must be an object of strings")),
    }
}

/// `Optional[KubernetesClusterConfig]`: the block's two fields, `config` and `context_name`.
pub fn cluster_config(config: &Map) -> Result<Option<Value>, ManifestError> {
    match config.get("cluster_config") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(block)) => match (block.get("config"), block.get("context_name")) {
            (Some(Value::Object(kubeconfig)), Some(Value::String(context))) => {
                let mut out = Map::new();
                out.insert("config".into(), Value::Object(kubeconfig.clone()));
                out.insert("context_name".into(), Value::String(context.clone()));
                Ok(Some(Value::Object(out)))
            }
            _ => Err(ManifestError::field(
                "cluster_config",
                "must have an object `config` and a string `context_name`",
            )),
        },
        Some(_) => Err(ManifestError::field("cluster_config", "must be an object")),
    }
}

/// pydantic's lax `int`: integers, integral floats, booleans and integer strings.
fn integer(field: &'static str, value: &Value) -> Result<i64, ManifestError> {
    let parsed = match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::Bool(b) => Some(i64::from(*b)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| ManifestError::field(field, "must be an integer"))
}

/// pydantic's lax `bool`.
fn boolean(field: &'static str, value: &Value) -> Result<bool, ManifestError> {
    let parsed = match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    };
    parsed.ok_or_else(|| ManifestError::field(field, "must be a boolean"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: Value) -> Result<JobConfig, ManifestError> {
        JobConfig::read(v.as_object().unwrap())
    }

    #[test]
    fn defaults_apply_to_absent_fields() {
        let c = read(json!({"job_manifest": {}})).unwrap();
        assert_eq!(c.namespace, "default");
        assert_eq!(c.pod_watch_timeout_seconds, 60);
        assert!(c.stream_output);
        assert_eq!(c.env, JobEnv::Dict(vec![]));
        assert_eq!(c.job_watch_timeout_seconds, None);
    }

    #[test]
    fn env_values_become_python_strings() {
        let c = read(json!({"job_manifest": {}, "env": {"A": 1, "B": true, "C": null, "D": [1]}}))
            .unwrap();
        assert_eq!(
            c.env,
            JobEnv::Dict(vec![
                ("A".into(), Some("1".into())),
                ("B".into(), Some("True".into())),
                ("C".into(), None),
                ("D".into(), Some("[1]".into())),
            ])
        );
    }

    #[test]
    fn the_first_bad_field_in_model_order_is_reported() {
        let err =
            read(json!({"namespace": 5, "labels": {"a": 1}, "job_manifest": {}})).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::InvalidField {
                field: "labels",
                ..
            }
        ));
        let err = read(json!({})).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::InvalidField {
                field: "job_manifest",
                ..
            }
        ));
    }

    #[test]
    fn numbers_and_booleans_are_coerced_like_pydantic() {
        let c = read(json!({
            "job_manifest": {}, "pod_watch_timeout_seconds": "30",
            "job_watch_timeout_seconds": 10.0, "stream_output": "off"
        }))
        .unwrap();
        assert_eq!(c.pod_watch_timeout_seconds, 30);
        assert_eq!(c.job_watch_timeout_seconds, Some(10));
        assert!(!c.stream_output);
    }
}
