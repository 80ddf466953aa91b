//! The Docker job configuration: a rendered base job template read into typed fields, with the
//! checks pydantic applies to prefect-docker's `DockerWorkerJobConfiguration`
//! (`prefect_docker/worker.py`, `prefect_docker/types.py`). Unknown keys are ignored, as pydantic
//! does: the server's bundled template carries a `container_wait_timeout` no release implements.

use std::collections::BTreeMap;

use cohort_infra::Map;
pub use cohort_template::fields::JobConfigurationError;
use cohort_template::fields::{self, boolean, opt_string};
use serde_json::Value;

/// When to pull the image (`prefect_docker/worker.py: ImagePullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    IfNotPresent,
    Always,
    /// Pull, and fall back to a local image if the pull fails.
    IfPossible,
    Never,
}

/// What the Docker worker needs to start one flow run.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerJob {
    /// Split like a POSIX shell; `None` runs `prefect flow-run execute`.
    pub command: Option<Vec<String>>,
    /// Rendered `env`; a `None` value unsets the variable.
    pub env: BTreeMap<String, Option<String>>,
    pub labels: BTreeMap<String, String>,
    pub name: Option<String>,
    pub image: Option<String>,
    pub image_pull_policy: Option<PullPolicy>,
    pub registry_credentials: Option<Map>,
    pub networks: Vec<String>,
    pub network_mode: Option<String>,
    pub auto_remove: bool,
    pub volumes: Vec<String>,
    pub stream_output: bool,
    pub mem_limit: Option<String>,
    pub memswap_limit: Option<String>,
    pub privileged: bool,
    pub container_create_kwargs: Map,
}

impl DockerJob {
    pub fn from_config(config: &Map) -> Result<Self, JobConfigurationError> {
        let command = fields::command(config)?;
        let env = fields::env(config)?;
        let labels = match config.get("labels") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(wrong_type("labels", "an object of strings", other)),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(wrong_type("labels", "an object of strings", other)),
        };
        let image_pull_policy = match opt_string(config, "image_pull_policy")?.as_deref() {
            None => None,
            Some("IfNotPresent") => Some(PullPolicy::IfNotPresent),
            Some("Always") => Some(PullPolicy::Always),
            Some("IfPossible") => Some(PullPolicy::IfPossible),
            Some("Never") => Some(PullPolicy::Never),
            Some(other) => {
                return Err(err(
                    "image_pull_policy",
                    format!(
                        "must be one of IfNotPresent, Always, IfPossible, Never; got {other:?}"
                    ),
                ))
            }
        };
        let registry_credentials = match config.get("registry_credentials") {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map.clone()),
            Some(other) => return Err(wrong_type("registry_credentials", "an object", other)),
        };
        let volumes = string_list(config, "volumes")?;
        for volume in &volumes {
            check_volume(volume)?;
        }
        let container_create_kwargs = match config.get("container_create_kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(other) => return Err(wrong_type("container_create_kwargs", "an object", other)),
        };
        Ok(Self {
            command,
            env,
            labels,
            name: opt_string(config, "name")?.filter(|n| !n.is_empty()),
            image: opt_string(config, "image")?.filter(|i| !i.is_empty()),
            image_pull_policy,
            registry_credentials,
            networks: string_list(config, "networks")?,
            network_mode: opt_string(config, "network_mode")?.filter(|m| !m.is_empty()),
            auto_remove: boolean(config, "auto_remove", false)?,
            volumes,
            stream_output: boolean(config, "stream_output", true)?,
            mem_limit: opt_string(config, "mem_limit")?.filter(|m| !m.is_empty()),
            memswap_limit: opt_string(config, "memswap_limit")?.filter(|m| !m.is_empty()),
            privileged: boolean(config, "privileged", false)?,
            container_create_kwargs,
        })
    }
}

fn string_list(config: &Map, field: &'static str) -> Result<Vec<String>, JobConfigurationError> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong_type(field, "a list of strings", other)),
            })
            .collect(),
        Some(other) => Err(wrong_type(field, "a list of strings", other)),
    }
}

/// `prefect_docker/types.py`: an anonymous `/path`, or `source:target[:ro|rw]` where the source
/// is a path (absolute or explicitly relative) or a named volume and the target is absolute.
fn check_volume(volume: &str) -> Result<(), JobConfigurationError> {
    let bad = |why: &str| err("volumes", format!("{volume:?} {why}"));
    let parts: Vec<&str> = volume.split(':').collect();
    match parts.as_slice() {
        [path] if path.starts_with('/') => Ok(()),
        [_] => Err(bad("must be an absolute container path or source:target")),
        [source, target] | [source, target, _] => {
            if let [_, _, mode] = parts.as_slice() {
                if *mode != "ro" && *mode != "rw" {
                    return Err(bad("may only have the option `ro` or `rw`"));
                }
            }
            if !target.starts_with('/') {
                return Err(bad("needs an absolute container path"));
            }
            let is_path = source.starts_with('/') || source.starts_with('.');
            let is_named = !source.is_empty()
                && source
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && source
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if is_path || is_named {
                Ok(())
            } else {
                Err(bad("needs a path or a volume name as its source"))
            }
        }
        _ => Err(bad("has too many `:`")),
    }
}

fn err(field: &'static str, reason: String) -> JobConfigurationError {
    JobConfigurationError::new(field, reason)
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> JobConfigurationError {
    JobConfigurationError::wrong_type(field, expected, got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(v: Value) -> Result<DockerJob, JobConfigurationError> {
        DockerJob::from_config(v.as_object().unwrap())
    }

    #[test]
    fn the_default_template_rendered_with_nothing_set_reads_as_prefect_defaults() {
        let j = job(json!({
            "command": null, "env": {}, "labels": {}, "name": null, "image": "img:1",
            "registry_credentials": null, "image_pull_policy": null, "networks": [],
            "network_mode": null, "auto_remove": false, "volumes": [], "stream_output": true,
            "mem_limit": null, "memswap_limit": null, "privileged": false,
            "container_create_kwargs": null
        }))
        .unwrap();
        assert_eq!(j.command, None);
        assert_eq!(j.image.as_deref(), Some("img:1"));
        assert!(j.stream_output && !j.auto_remove && !j.privileged);
        assert!(j.container_create_kwargs.is_empty());
    }

    #[test]
    fn unknown_keys_are_ignored_and_values_are_coerced() {
        let j = job(json!({
            "container_wait_timeout": 5, "command": "python -c 'print(1)'",
            "env": {"A": 1, "B": null, "C": true}, "auto_remove": "yes",
            "image_pull_policy": "Never", "volumes": ["/a:/b:ro", "named:/c", "/anon", "./rel:/d"]
        }))
        .unwrap();
        assert_eq!(
            j.command,
            Some(vec!["python".into(), "-c".into(), "print(1)".into()])
        );
        assert_eq!(j.env["A"].as_deref(), Some("1"));
        assert_eq!(j.env["B"], None);
        assert_eq!(j.env["C"].as_deref(), Some("True"));
        assert!(j.auto_remove);
        assert_eq!(j.image_pull_policy, Some(PullPolicy::Never));
    }

    #[test]
    fn bad_values_name_their_field() {
        for (config, field) in [
            (
                json!({"image_pull_policy": "Sometimes"}),
                "image_pull_policy",
            ),
            (json!({"volumes": ["/a:relative"]}), "volumes"),
            (json!({"volumes": ["/a:/b:rx"]}), "volumes"),
            (json!({"volumes": ["bad name:/b"]}), "volumes"),
            (json!({"networks": "bridge"}), "networks"),
            (json!({"privileged": "maybe"}), "privileged"),
            (json!({"labels": {"a": 1}}), "labels"),
            (
                json!({"container_create_kwargs": []}),
                "container_create_kwargs",
            ),
        ] {
            assert_eq!(job(config.clone()).unwrap_err().field, field, "{config}");
        }
    }
}
