//! A container's environment as the kubelet builds it: `envFrom` Secrets, then `env` entries
//! (`value`, `valueFrom.secretKeyRef`, `valueFrom.fieldRef`), later entries winning. A
//! missing Secret or key is the kubelet's `CreateContainerConfigError`.

use base64::Engine as _;
use serde_json::Value;

use crate::kind::Kind;
use crate::meta;
use crate::store::Txn;

/// Why a container's configuration cannot be built: the message of a
/// `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConfigError(pub String);

/// `NAME=value` pairs for the container, in order.
pub(crate) fn container_env(
    t: &Txn<'_>,
    pod: &Value,
    container: &Value,
) -> Result<Vec<(String, String)>, ConfigError> {
    let namespace = meta::namespace(pod);
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    for source in container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let prefix = source.get("prefix").and_then(Value::as_str).unwrap_or("");
        if let Some(secret_ref) = source.get("secretRef") {
            let name = secret_ref.get("name").and_then(Value::as_str).unwrap_or("");
            let optional = secret_ref.get("optional").and_then(Value::as_bool) == Some(true);
            match t.get(Kind::Secret, namespace, name) {
                Some(secret) => {
                    for (k, v) in secret_data(secret) {
                        set(format!("{prefix}{k}"), v);
                    }
                }
                None if optional => {}
                None => return Err(ConfigError(format!("secret \"{name}\" not found"))),
            }
        } else if let Some(cm) = source.get("configMapRef") {
            let name = cm.get("name").and_then(Value::as_str).unwrap_or("");
            if cm.get("optional").and_then(Value::as_bool) != Some(true) {
                return Err(ConfigError(format!("configmap \"{name}\" not found")));
            }
        }
    }
    for entry in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = entry.get("name").and_then(Value::as_str) else {
            continue;
        };
        if let Some(source) = entry.get("valueFrom") {
            if let Some(key_ref) = source.get("secretKeyRef") {
                let secret_name = key_ref.get("name").and_then(Value::as_str).unwrap_or("");
                let key = key_ref.get("key").and_then(Value::as_str).unwrap_or("");
                let optional = key_ref.get("optional").and_then(Value::as_bool) == Some(true);
                let Some(secret) = t.get(Kind::Secret, namespace, secret_name) else {
                    if optional {
                        continue;
                    }
                    return Err(ConfigError(format!("secret \"{secret_name}\" not found")));
                };
                match secret_data(secret).into_iter().find(|(k, _)| k == key) {
                    Some((_, v)) => set(name.to_owned(), v),
                    None if optional => {}
                    None => {
                        return Err(ConfigError(format!(
                            "couldn't find key {key} in Secret {namespace}/{secret_name}"
                        )))
                    }
                }
            } else if let Some(field) = source
                .pointer("/fieldRef/fieldPath")
                .and_then(Value::as_str)
            {
                set(name.to_owned(), field_value(pod, field));
            } else if let Some(cm) = source.get("configMapKeyRef") {
                if cm.get("optional").and_then(Value::as_bool) != Some(true) {
                    let cm_name = cm.get("name").and_then(Value::as_str).unwrap_or("");
                    return Err(ConfigError(format!("configmap \"{cm_name}\" not found")));
                }
            }
        } else {
            let value = entry.get("value").and_then(Value::as_str).unwrap_or("");
            set(name.to_owned(), value.to_owned());
        }
    }
    Ok(env)
}

/// A Secret's `data`, decoded.
fn secret_data(secret: &Value) -> Vec<(String, String)> {
    secret
        .get("data")
        .and_then(Value::as_object)
        .map(|data| {
            data.iter()
                .filter_map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str()?)
                        .ok()?;
                    Some((k.clone(), String::from_utf8_lossy(&bytes).into_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The downward API fields a `fieldRef` can name.
fn field_value(pod: &Value, path: &str) -> String {
    let text = |p: &str| {
        pod.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if let Some(key) = path
        .strip_prefix("metadata.labels['")
        .and_then(|k| k.strip_suffix("']"))
    {
        return meta::labels(pod)
            .and_then(|l| l.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
    }
    if let Some(key) = path
        .strip_prefix("metadata.annotations['")
        .and_then(|k| k.strip_suffix("']"))
    {
        return pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
    }
    match path {
        "metadata.name" => text("/metadata/name"),
        "metadata.namespace" => text("/metadata/namespace"),
        "metadata.uid" => text("/metadata/uid"),
        "spec.nodeName" => text("/spec/nodeName"),
        "spec.serviceAccountName" => text("/spec/serviceAccountName"),
        "status.podIP" => text("/status/podIP"),
        "status.hostIP" => text("/status/hostIP"),
        _ => String::new(),
    }
}
