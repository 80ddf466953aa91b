//! A rendered configuration and a run made into the Job to POST: pydantic's reading of
//! `KubernetesWorkerJobConfiguration` with its manifest check, `prepare_for_flow_run`, and the
//! secret handling of `_create_job` (`prefect_kubernetes/worker.py`).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::config::JobConfig;
use crate::env::{configure_eviction, populate_env, run_env, truthy};
use crate::error::ManifestError;
use crate::labels::{run_labels, slugged_annotations, slugged_labels};
use crate::name::{render_name, EnvLookup};
use crate::secrets::{apply as apply_secrets, first_container, SecretToCreate};
use crate::settings::ManifestSettings;
use crate::shlex;
use crate::slug::slugify_name;
use crate::Map;

/// The image of a Job whose template sets none: `prefecthq/prefect:<Prefect version>-python<the
/// worker's Python>` in Prefect (`prefect/utilities/dockerutils.py: get_prefect_image_name`);
/// Cohort has no Python of its own, so the Python of Prefect's official worker image.
pub const DEFAULT_IMAGE: &str = "prefecthq/prefect:3.8.8-python3.11";

/// Prefect's command for a flow run (`BaseJobConfiguration._base_flow_run_command`).
const FLOW_RUN_COMMAND: &str = "prefect flow-run execute";

/// What the worker knows of the run, beyond the rendered configuration.
pub struct RunInputs<'a> {
    pub flow_run_id: Uuid,
    pub flow_run_name: &'a str,
    /// The worker's explicit `PREFECT_*` settings and the `PREFECT__*` run identifiers
    /// (`cohort_infra::RunSpec::env`); the order is Prefect's, whatever the map's.
    pub env: &'a BTreeMap<String, String>,
    /// The raw generic labels (`cohort_infra::RunSpec::labels`).
    pub labels: &'a BTreeMap<String, String>,
    /// The worker's id on the server, when it has one (`PREFECT__WORKER_ID`).
    pub worker_id: Option<Uuid>,
    /// The image when the template sets none.
    pub default_image: &'a str,
    /// The last part of a `store_env_as_secret` Secret's name: 8 lowercase hex characters,
    /// random per run (Prefect's `uuid4().hex[:8]`).
    pub env_secret_suffix: String,
    /// The flow run and flow as the API returns them, for `{{ ctx.flow_run.* }}` and
    /// `{{ ctx.flow.* }}` in `name`. Without them only `id`, `name`, `flow_id` and
    /// `deployment_id` of the run, and `id` and `name` of the flow, are known.
    pub flow_run: Option<&'a Map>,
    pub flow: Option<&'a Map>,
    /// The worker's own environment, for `{{ $VAR }}` in `name`.
    pub process_env: Option<EnvLookup<'a>>,
}

impl<'a> RunInputs<'a> {
    /// Inputs with the default image, a fresh secret suffix, and no flow, flow run or
    /// environment for `name`.
    pub fn new(
        flow_run_id: Uuid,
        flow_run_name: &'a str,
        env: &'a BTreeMap<String, String>,
        labels: &'a BTreeMap<String, String>,
    ) -> Self {
        Self {
            flow_run_id,
            flow_run_name,
            env,
            labels,
            worker_id: None,
            default_image: DEFAULT_IMAGE,
            env_secret_suffix: Uuid::new_v4().simple().to_string()[..8].to_owned(),
            flow_run: None,
            flow: None,
            process_env: None,
        }
    }

    /// `{"ctx": {"flow": …, "flow_run": …}}` for the name template.
    fn name_context(&self) -> Value {
        let label = |key: &str| self.labels.get(key).map_or(Value::Null, |v| json!(v));
        let flow_run = match self.flow_run {
            Some(run) => Value::Object(run.clone()),
            None => json!({
                "id": self.flow_run_id.to_string(),
                "name": self.flow_run_name,
                "flow_id": label("prefect.io/flow-id"),
                "deployment_id": label("prefect.io/deployment-id"),
            }),
        };
        let flow = match self.flow {
            Some(flow) => Value::Object(flow.clone()),
            None => {
                json!({"id": label("prefect.io/flow-id"), "name": label("prefect.io/flow-name")})
            }
        };
        json!({"ctx": {"flow": flow, "flow_run": flow_run}})
    }
}

/// The Job for one flow run, and what else the worker needs to create it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedJob {
    /// Where to POST the Job (the `namespace` variable, which Prefect uses rather than
    /// `metadata.namespace`).
    pub namespace: String,
    /// The Job, exactly as Prefect POSTs it.
    pub manifest: Value,
    /// `{"config": …, "context_name": …}` when the pool names a cluster; otherwise the worker
    /// uses its in-cluster or default kubeconfig.
    pub cluster_config: Option<Value>,
    /// Unused by prefect-kubernetes since 0.6.0; kept for parity and warnings.
    pub stream_output: bool,
    pub pod_watch_timeout_seconds: i64,
    pub job_watch_timeout_seconds: Option<i64>,
    /// To create before the Job, in this order.
    pub secrets: Vec<SecretToCreate>,
    /// For the worker's log (Prefect logs them on the worker's logger).
    pub warnings: Vec<String>,
}

/// Makes the Job of a flow run from its rendered job configuration (the output of
/// `cohort_template::render` and the block and variable phases).
pub fn prepare(
    config: &Map,
    run: &RunInputs<'_>,
    settings: &ManifestSettings,
) -> Result<PreparedJob, ManifestError> {
    let job = JobConfig::read(config)?;
    let mut manifest = job.job_manifest.clone();
    crate::validate::validate_manifest(&mut manifest, &job.namespace)?;

    // Steps 1 to 3: env, labels, name and the SIGTERM rule.
    let mut env = run_env(&job.env, run.env, run.flow_run_id, run.worker_id)?;
    let labels = run_labels(run.labels, &job.labels);
    let name = match job.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => render_name(name, &run.name_context(), run.process_env),
        None => Value::Null,
    };
    let name = if truthy(&name) {
        name
    } else {
        Value::String(run.flow_run_name.to_owned())
    };
    let backoff_limit = manifest
        .get("spec")
        .and_then(|spec| spec.get("backoffLimit"));
    configure_eviction(&mut env, backoff_limit);

    // Step 4.
    populate_env(first_container(&mut manifest)?, env)?;

    // Step 5.
    let job_metadata = metadata(&mut manifest)?;
    let job_labels = slugged_labels(job_metadata.get("labels"), &labels, "label")?;
    job_metadata.insert("labels".into(), Value::Object(job_labels));
    let annotations = slugged_annotations(job_metadata.get("annotations"), &job.annotations)?;
    job_metadata.insert("annotations".into(), Value::Object(annotations));

    // Step 6.
    let container = first_container(&mut manifest)?;
    if !container.contains_key("image") {
        container.insert("image".into(), json!(run.default_image));
    }
    let args = match container.get("args") {
        None | Some(Value::Null) => Some(split(FLOW_RUN_COMMAND)?),
        Some(Value::String(command)) => Some(split(command)?),
        Some(Value::Array(_)) => None,
        Some(_) => return Err(ManifestError::InvalidCommand),
    };
    if let Some(args) = args {
        container.insert("args".into(), json!(args));
    }

    // Step 7.
    let job_metadata = metadata(&mut manifest)?;
    if needs_generate_name(job_metadata.get("generateName")) {
        let slug = match &name {
            Value::String(name) => slugify_name(name),
            other => return Err(ManifestError::NameNotText(python_type(other))),
        };
        let prefix = slug.unwrap_or_else(|| "prefect-job".to_owned());
        job_metadata.insert("generateName".into(), json!(format!("{prefix}-")));
    }
    let job_annotations = job_metadata.get("annotations").cloned();

    // Step 8.
    let template = manifest
        .get_mut("spec")
        .and_then(|spec| spec.get_mut("template"))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ManifestError::manifest("`spec.template` must be an object"))?;
    let mut pod_metadata = match template.get("metadata") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ManifestError::manifest(
                "`spec.template.metadata` must be an object",
            ))
        }
    };
    let pod_labels = slugged_labels(pod_metadata.get("labels"), &labels, "pod label")?;
    pod_metadata.insert("labels".into(), Value::Object(pod_labels));
    if let Some(Value::Object(job_annotations)) = job_annotations.filter(truthy) {
        let mut merged = match pod_metadata.get("annotations") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(ManifestError::manifest(
                    "the pod template's annotations must be an object",
                ))
            }
        };
        merged.extend(job_annotations);
        pod_metadata.insert("annotations".into(), Value::Object(merged));
    }
    template.insert("metadata".into(), Value::Object(pod_metadata));

    // What `_create_job` does before the POST.
    let mut secrets = Vec::new();
    let mut warnings = Vec::new();
    apply_secrets(
        &mut manifest,
        &job.namespace,
        settings,
        run.env.get("PREFECT__WORKER_NAME").map(String::as_str),
        &run.env_secret_suffix,
        &mut secrets,
        &mut warnings,
    )?;

    Ok(PreparedJob {
        namespace: job.namespace,
        manifest: Value::Object(manifest),
        cluster_config: job.cluster_config,
        stream_output: job.stream_output,
        pod_watch_timeout_seconds: job.pod_watch_timeout_seconds,
        job_watch_timeout_seconds: job.job_watch_timeout_seconds,
        secrets,
        warnings,
    })
}

fn metadata(manifest: &mut Map) -> Result<&mut Map, ManifestError> {
    manifest
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ManifestError::manifest("`metadata` must be an object"))
}

fn split(command: &str) -> Result<Vec<String>, ManifestError> {
    shlex::split(command).map_err(ManifestError::CommandSplit)
}

/// `_populate_generate_name_if_not_present`: a missing, empty or `-` `generateName`, one still
/// holding a placeholder, or `None-` (a null `name` rendered into `{{ name }}-`) is replaced.
fn needs_generate_name(current: Option<&Value>) -> bool {
    match current {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => {
            s.is_empty()
                || s == "-"
                || s == "None-"
                || !cohort_template::find_placeholders(&Value::String(s.clone())).is_empty()
        }
        Some(other) => !truthy(other) || !cohort_template::find_placeholders(other).is_empty(),
    }
}

/// Python's type name of a JSON value.
fn python_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_infra::PrepareError;

    fn run_maps() -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let env = [
            ("PREFECT_API_KEY", "pnu_k"),
            ("PREFECT_API_URL", "http://api"),
            ("PREFECT__WORKER_NAME", "w 1"),
        ];
        let labels = [
            (
                "prefect.io/flow-run-id",
                "00000000-0000-0000-0000-000000000000",
            ),
            ("prefect.io/flow-run-name", "witty-otter"),
            ("prefect.io/version", "3.8.8"),
        ];
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        (map(&env), map(&labels))
    }

    fn rendered(variables: Value) -> Map {
        let template = crate::base_job_template();
        cohort_template::render(&template, variables.as_object().unwrap(), &|_| None).unwrap()
    }

    #[test]
    fn the_default_template_gives_prefects_defaults() {
        let (env, labels) = run_maps();
        let run = RunInputs::new(Uuid::nil(), "witty-otter", &env, &labels);
        let job = prepare(&rendered(json!({})), &run, &ManifestSettings::default()).unwrap();
        let container = &job.manifest["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["args"], json!(["prefect", "flow-run", "execute"]));
        assert_eq!(container["image"], json!(DEFAULT_IMAGE));
        assert_eq!(
            job.manifest["metadata"]["generateName"],
            json!("witty-otter-")
        );
        let names: Vec<&str> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "PREFECT_API_URL",
                "PREFECT_API_KEY",
                "PREFECT__FLOW_RUN_ID",
                "PREFECT__WORKER_NAME",
                "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"
            ]
        );
        assert_eq!(run.env_secret_suffix.len(), 8);
        assert!(job.secrets.is_empty() && job.warnings.is_empty());
    }

    #[test]
    fn the_api_key_secret_is_named_after_the_worker() {
        let (env, labels) = run_maps();
        let run = RunInputs::new(Uuid::nil(), "witty-otter", &env, &labels);
        let settings = ManifestSettings {
            create_secret_for_api_key: true,
            ..ManifestSettings::default()
        };
        let job = prepare(&rendered(json!({"namespace": "ns"})), &run, &settings).unwrap();
        assert_eq!(job.secrets.len(), 1);
        assert_eq!(job.secrets[0].purpose, crate::SecretPurpose::ApiKey);
        assert_eq!(
            job.secrets[0].body["metadata"]["name"],
            json!("prefect-w-1-api-key")
        );
        assert_eq!(job.secrets[0].body["data"]["value"], json!("cG51X2s="));
        let env = &job.manifest["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(
            env[1],
            json!({"name": "PREFECT_API_KEY", "valueFrom": {"secretKeyRef": {"name": "prefect-w-1-api-key", "key": "value"}}})
        );
    }

    #[test]
    fn a_bad_manifest_is_a_validation_error_for_the_run() {
        let (env, labels) = run_maps();
        let run = RunInputs::new(Uuid::nil(), "witty-otter", &env, &labels);
        let mut config = rendered(json!({}));
        config["job_manifest"]["spec"]["template"]["spec"]
            .as_object_mut()
            .unwrap()
            .shift_remove("parallelism");
        let err = prepare(&config, &run, &ManifestSettings::default()).unwrap_err();
        assert_eq!(err.prefect_exception(), "ValidationError");
        assert_eq!(
            PrepareError::from(err).to_string(),
            "ValidationError: Job is missing required attributes at the following paths: \
             /spec/template/spec/parallelism"
        );
    }

    #[test]
    fn a_command_that_is_neither_text_nor_a_list_is_refused() {
        let (env, labels) = run_maps();
        let run = RunInputs::new(Uuid::nil(), "witty-otter", &env, &labels);
        let mut config = rendered(json!({}));
        config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["args"] = json!(5);
        let err = prepare(&config, &run, &ManifestSettings::default()).unwrap_err();
        assert_eq!(err, ManifestError::InvalidCommand);
        let config = rendered(json!({"command": "echo 'open"}));
        let err = prepare(&config, &run, &ManifestSettings::default()).unwrap_err();
        assert_eq!(err.to_string(), "No closing quotation");
    }

    #[test]
    fn a_name_that_renders_to_a_number_cannot_name_a_job() {
        let (env, labels) = run_maps();
        let flow_run = json!({"run_count": 3});
        let mut run = RunInputs::new(Uuid::nil(), "witty-otter", &env, &labels);
        run.flow_run = flow_run.as_object();
        let config = rendered(json!({"name": "{{ ctx.flow_run.run_count }}"}));
        let err = prepare(&config, &run, &ManifestSettings::default()).unwrap_err();
        assert_eq!(err, ManifestError::NameNotText("int"));
    }
}
