//! What `prefect_kubernetes/worker.py: KubernetesWorker._create_job` does to the manifest before
//! the POST: the API key and auth string as `secretKeyRef`s, and `store_env_as_secret`. The
//! Secrets themselves are the worker's to create; this module says which, with their bodies.

use base64::Engine as _;
use cohort_template::python_str;
use serde_json::{json, Value};

use crate::env::truthy;
use crate::error::ManifestError;
use crate::settings::ManifestSettings;
use crate::slug::slugify_name;
use crate::Map;

/// Prefect's warning when the auth string stays in the manifest (the missing space after
/// "manifest." is Prefect's).
pub const AUTH_STRING_IN_MANIFEST_WARNING: &str = "PREFECT_API_AUTH_STRING is set, but no secret \
    name or key is provided. The API auth string will be stored in the Kubernetes job manifest.\
    This is not recommended and may be removed in a future version. Please store the API auth \
    string in a Kubernetes secret and provide the secret name and key with the \
    `PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME` and \
    `PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY` environment variables.";

/// A Secret the worker creates before the Job.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretToCreate {
    pub purpose: SecretPurpose,
    /// The Job's namespace.
    pub namespace: String,
    /// The Secret as Prefect's client POSTs it (`apiVersion`, `data` or `stringData`, `kind`,
    /// `metadata`).
    pub body: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretPurpose {
    /// `prefect-<worker slug>-api-key` (`create_secret_for_api_key`): upserted (read, then
    /// replace its `data` or create it); the worker deletes the Secrets it made at shutdown.
    ApiKey,
    /// `<generateName>-env-<8 hex>` (`store_env_as_secret`): created; once the Job exists it is
    /// PATCHed with an `ownerReferences` entry to the Job so Kubernetes collects it; deleted if
    /// the Job cannot be created.
    Env,
}

/// The manifest changes and Secrets of `_create_job`, in its order.
pub(crate) fn apply(
    manifest: &mut Map,
    namespace: &str,
    settings: &ManifestSettings,
    worker_name: Option<&str>,
    env_secret_suffix: &str,
    secrets: &mut Vec<SecretToCreate>,
    warnings: &mut Vec<String>,
) -> Result<(), ManifestError> {
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    if let Some(name) = non_empty(&settings.api_key_secret_name) {
        if let Some(key) = non_empty(&settings.api_key_secret_key) {
            use_secret(manifest, "PREFECT_API_KEY", &name, &key)?;
        }
    } else if settings.create_secret_for_api_key {
        if let Some(api_key) = env_value(manifest, "PREFECT_API_KEY")?.filter(truthy) {
            // `_slugify_name(None)` is formatted as `None`, as Python would.
            let slug = worker_name
                .and_then(slugify_name)
                .unwrap_or_else(|| "None".to_owned());
            let name = format!("prefect-{slug}-api-key");
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(python_str(&api_key).as_bytes());
            secrets.push(SecretToCreate {
                purpose: SecretPurpose::ApiKey,
                namespace: namespace.to_owned(),
                body: json!({
                    "apiVersion": "v1",
                    "data": {"value": encoded},
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace},
                }),
            });
            use_secret(manifest, "PREFECT_API_KEY", &name, "value")?;
        }
    }

    match (
        non_empty(&settings.api_auth_string_secret_name),
        non_empty(&settings.api_auth_string_secret_key),
    ) {
        (Some(name), Some(key)) => use_secret(manifest, "PREFECT_API_AUTH_STRING", &name, &key)?,
        _ => {
            if env_value(manifest, "PREFECT_API_AUTH_STRING")?.is_some_and(|v| truthy(&v)) {
                warnings.push(AUTH_STRING_IN_MANIFEST_WARNING.to_owned());
            }
        }
    }

    if settings.store_env_as_secret {
        if let Some(secret) = store_env_as_secret(manifest, namespace, env_secret_suffix)? {
            secrets.push(secret);
        }
    }
    Ok(())
}

/// `_replace_env_variable_with_secret`: every entry named `variable` becomes a `secretKeyRef`.
fn use_secret(
    manifest: &mut Map,
    variable: &str,
    secret: &str,
    key: &str,
) -> Result<(), ManifestError> {
    let reference = json!({
        "name": variable,
        "valueFrom": {"secretKeyRef": {"name": secret, "key": key}},
    });
    for entry in env_entries(manifest)? {
        if entry.get("name") == Some(&json!(variable)) {
            *entry = reference.clone();
        }
    }
    Ok(())
}

/// `_store_env_as_secret`: the plain entries go into a Secret named after `generateName`; the
/// container keeps its `valueFrom` entries and gets an `envFrom` to the Secret after any it had.
fn store_env_as_secret(
    manifest: &mut Map,
    namespace: &str,
    suffix: &str,
) -> Result<Option<SecretToCreate>, ManifestError> {
    let mut plain = Map::new();
    let mut value_from = Vec::new();
    for entry in env_entries(manifest)?.iter() {
        if entry.get("valueFrom").is_some() {
            value_from.push(entry.clone());
        } else if let (Some(value), Some(name)) = (entry.get("value"), entry.get("name")) {
            if truthy(name) {
                plain.insert(python_str(name), value.clone());
            }
        }
    }
    if plain.is_empty() {
        return Ok(None);
    }
    let metadata = manifest.get("metadata").and_then(Value::as_object);
    let generate_name = metadata
        .and_then(|m| m.get("generateName"))
        .map_or_else(|| "prefect-job-".to_owned(), python_str);
    let name = format!("{}-env-{suffix}", generate_name.trim_end_matches('-'));
    let mut labels = Map::new();
    labels.insert("app.kubernetes.io/managed-by".into(), "prefect".into());
    let job_labels = metadata.and_then(|m| m.get("labels"));
    if let Some(run_id) = job_labels
        .and_then(|labels| labels.get("prefect.io/flow-run-id"))
        .filter(|id| truthy(id))
    {
        labels.insert("prefect.io/flow-run-id".into(), run_id.clone());
    }
    let container = first_container(manifest)?;
    container.insert("env".into(), Value::Array(value_from));
    let mut env_from = match container.get("envFrom") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(ManifestError::manifest("`envFrom` must be a list")),
    };
    env_from.push(json!({"secretRef": {"name": name}}));
    container.insert("envFrom".into(), Value::Array(env_from));
    Ok(Some(SecretToCreate {
        purpose: SecretPurpose::Env,
        namespace: namespace.to_owned(),
        body: json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"labels": labels, "name": name, "namespace": namespace},
            "stringData": plain,
        }),
    }))
}

/// `get_environment_variable_value`: the `value` of the first entry with that name.
fn env_value(manifest: &mut Map, name: &str) -> Result<Option<Value>, ManifestError> {
    Ok(env_entries(manifest)?
        .iter()
        .find(|entry| entry.get("name") == Some(&json!(name)))
        .and_then(|entry| entry.get("value").cloned()))
}

fn env_entries(manifest: &mut Map) -> Result<&mut Vec<Value>, ManifestError> {
    match first_container(manifest)?.get_mut("env") {
        Some(Value::Array(entries)) => Ok(entries),
        _ => Err(ManifestError::manifest(
            "the first container's `env` must be a list",
        )),
    }
}

/// `job_manifest["spec"]["template"]["spec"]["containers"][0]`.
pub(crate) fn first_container(manifest: &mut Map) -> Result<&mut Map, ManifestError> {
    manifest
        .get_mut("spec")
        .and_then(|v| v.get_mut("template"))
        .and_then(|v| v.get_mut("spec"))
        .and_then(|v| v.get_mut("containers"))
        .and_then(|v| v.get_mut(0))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ManifestError::manifest("the first container must be an object"))
}
