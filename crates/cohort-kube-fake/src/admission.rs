//! What the apiserver does to an object before storing it: defaults, generated fields
//! (a Job's selector and pod template labels, a Secret's `stringData`), and the validation
//! that clients are most likely to trip over (names, labels, Job pod templates).

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, Cause};
use crate::kind::Kind;
use crate::meta;

/// The labels the Job controller puts on a Job's pods (and the apiserver on its template).
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
pub const LEGACY_JOB_NAME_LABEL: &str = "job-name";
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
pub const LEGACY_CONTROLLER_UID_LABEL: &str = "controller-uid";

/// Fills in what the apiserver fills in on create. `obj` already has its final metadata
/// (name, namespace, uid).
pub fn prepare_create(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Pod => {
            default_pod_spec(meta::object_mut(obj, "spec"));
            let qos = qos_class(obj.get("spec").unwrap_or(&Value::Null));
            // Clients cannot create a pod with a status: the apiserver resets it.
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        Kind::Job => prepare_job(obj),
        Kind::Secret => {
            fold_string_data(obj);
            obj.as_object_mut()
                .expect("an object")
                .entry("type")
                .or_insert(json!("Opaque"));
        }
        Kind::Namespace => {
            let name = meta::name(obj).to_owned();
            let labels = meta::object_mut(obj.get_mut("metadata").expect("metadata"), "labels");
            labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        Kind::Event
        | Kind::CustomResourceDefinition
        | Kind::ServiceAccount
        | Kind::Deployment
        | Kind::Role
        | Kind::RoleBinding => {}
    }
}

/// What the apiserver does on every update: a Secret's `stringData` is folded into `data`.
pub fn prepare_update(kind: Kind, obj: &mut Value) {
    if kind == Kind::Secret {
        fold_string_data(obj);
    }
}

/// Validation: names, labels, and for pods and Jobs the pod spec.
pub fn validate(kind: Kind, obj: &Value) -> Result<(), ApiError> {
    let name = meta::name(obj);
    let mut causes = Vec::new();
    if name.is_empty() {
        causes.push(required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        let max = match kind {
            // The Job's name becomes a label value on its pods.
            Kind::Job => 63,
            Kind::Namespace => 63,
            _ => 253,
        };
        if let Some(problem) = dns_name_problem(name, max, kind != Kind::Namespace) {
            causes.push(invalid("metadata.name", name, &problem));
        }
    }
    check_labels(meta::labels(obj), "metadata.labels", &mut causes);
    match kind {
        Kind::Pod => check_pod_spec(obj.get("spec"), "spec", &mut causes),
        Kind::Job => {
            let template = obj.pointer("/spec/template");
            if template.is_none() {
                causes.push(required("spec.template", "Required value"));
            }
            check_labels(
                obj.pointer("/spec/template/metadata/labels"),
                "spec.template.metadata.labels",
                &mut causes,
            );
            check_pod_spec(
                obj.pointer("/spec/template/spec"),
                "spec.template.spec",
                &mut causes,
            );
            match obj
                .pointer("/spec/template/spec/restartPolicy")
                .and_then(Value::as_str)
            {
                Some("Never" | "OnFailure") => {}
                Some(other) => causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    field: "spec.template.spec.restartPolicy".into(),
                    message: format!(
                        "Unsupported value: \"{other}\": supported values: \"OnFailure\", \"Never\""
                    ),
                }),
                None => causes.push(required(
                    "spec.template.spec.restartPolicy",
                    "Required value: valid values: \"OnFailure\", \"Never\"",
                )),
            }
        }
        Kind::Secret => {
            if let Some(data) = obj.get("data").and_then(Value::as_object) {
                for (k, v) in data {
                    let decodes = v.as_str().is_some_and(|s| {
                        base64::engine::general_purpose::STANDARD.decode(s).is_ok()
                    });
                    if !decodes {
                        causes.push(invalid(
                            &format!("data[{k}]"),
                            "<secret contents redacted>",
                            "illegal base64 data",
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(kind, name, causes))
    }
}

fn required(field: &str, message: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        field: field.into(),
        message: message.into(),
    }
}

fn invalid(field: &str, value: &str, problem: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        field: field.into(),
        message: format!("Invalid value: \"{value}\": {problem}"),
    }
}

fn check_pod_spec(spec: Option<&Value>, at: &str, causes: &mut Vec<Cause>) {
    let containers = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array);
    match containers {
        None => causes.push(required(&format!("{at}.containers"), "Required value")),
        Some(list) if list.is_empty() => {
            causes.push(required(&format!("{at}.containers"), "Required value"))
        }
        Some(list) => {
            for (i, c) in list.iter().enumerate() {
                if c.get("name")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    causes.push(required(
                        &format!("{at}.containers[{i}].name"),
                        "Required value",
                    ));
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    causes.push(required(
                        &format!("{at}.containers[{i}].image"),
                        "Required value",
                    ));
                }
            }
        }
    }
}

/// Why a name is not a DNS-1123 subdomain (or label, when dots are not allowed).
fn dns_name_problem(name: &str, max: usize, dots: bool) -> Option<String> {
    if name.len() > max {
        return Some(format!("must be no more than {max} characters"));
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.chars().all(ok_char) && alnum(name.chars().next()) && alnum(name.chars().last()) {
        return None;
    }
    Some(if dots {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into()
    } else {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into()
    })
}

/// Whether `s` is a label value (also the name part of a label key, when non-empty).
fn is_label_value(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.is_empty()
        || (s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && edge(s.chars().next())
            && edge(s.chars().last()))
}

fn check_labels(labels: Option<&Value>, at: &str, causes: &mut Vec<Cause>) {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in labels {
        let (prefix, key_name) = match k.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let prefix_ok = prefix.is_none_or(|p| dns_name_problem(p, 253, true).is_none());
        if !prefix_ok || key_name.is_empty() || !is_label_value(key_name) {
            causes.push(invalid(at, k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"));
        }
        match v.as_str() {
            Some(value) if is_label_value(value) => {}
            _ => causes.push(invalid(at, &v.as_str().map_or_else(|| v.to_string(), str::to_owned), "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")),
        }
    }
}

/// The pod spec defaults the apiserver applies (`pkg/apis/core/v1/defaults.go`), those
/// clients see in the objects they read back.
fn default_pod_spec(spec: &mut Map<String, Value>) {
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("securityContext", json!({})),
        ("schedulerName", json!("default-scheduler")),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
        ("priority", json!(0)),
    ] {
        spec.entry(k).or_insert(v);
    }
    let account = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    spec.insert("serviceAccountName".into(), json!(account));
    spec.insert("serviceAccount".into(), json!(account));
    if let Some(Value::Array(containers)) = spec.get_mut("containers") {
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            let policy = default_pull_policy(c.get("image").and_then(Value::as_str).unwrap_or(""));
            c.entry("imagePullPolicy").or_insert(json!(policy));
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            c.entry("resources").or_insert(json!({}));
        }
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise.
fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

/// The pod's QoS class from its containers' requests and limits.
fn qos_class(spec: &Value) -> &'static str {
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        if limits.is_some_and(|l| !l.is_empty()) || requests.is_some_and(|r| !r.is_empty()) {
            any = true;
        }
        for resource in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(resource));
            let request = requests.and_then(|r| r.get(resource)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Job defaults and the generated selector and template labels
/// (`pkg/registry/batch/job/strategy.go: PrepareForCreate`, `generateSelector`).
fn prepare_job(obj: &mut Value) {
    let name = meta::name(obj).to_owned();
    let uid = meta::uid(obj).to_owned();
    // Job labels default to the template's when the Job has none.
    let template_labels = obj
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .filter(|l| l.as_object().is_some_and(|m| !m.is_empty()));
    if meta::labels(obj)
        .and_then(Value::as_object)
        .is_none_or(Map::is_empty)
    {
        if let Some(labels) = template_labels {
            meta::metadata_mut(obj).insert("labels".into(), labels);
        }
    }
    let spec = meta::object_mut(obj, "spec");
    for (k, v) in [
        ("backoffLimit", json!(6)),
        ("completions", json!(1)),
        ("parallelism", json!(1)),
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
        ("podReplacementPolicy", json!("TerminatingOrFailed")),
    ] {
        spec.entry(k).or_insert(v);
    }
    spec.insert(
        "selector".into(),
        json!({"matchLabels": {CONTROLLER_UID_LABEL: uid}}),
    );
    let template = spec.entry("template").or_insert(json!({}));
    let template_meta = meta::object_mut(template, "metadata");
    let labels = template_meta.entry("labels").or_insert(json!({}));
    if let Some(labels) = labels.as_object_mut() {
        labels.insert(CONTROLLER_UID_LABEL.into(), json!(uid));
        labels.insert(JOB_NAME_LABEL.into(), json!(name));
        labels.insert(LEGACY_CONTROLLER_UID_LABEL.into(), json!(uid));
        labels.insert(LEGACY_JOB_NAME_LABEL.into(), json!(name));
    }
    let template_spec = meta::object_mut(template, "spec");
    // A Job template's restart policy is not defaulted to Always: validation wants it set.
    let had_policy = template_spec.contains_key("restartPolicy");
    default_pod_spec(template_spec);
    if !had_policy {
        template_spec.remove("restartPolicy");
    }
    obj["status"] = json!({});
}

/// Moves `stringData` into `data`, base64-encoded, as the apiserver does on every write.
fn fold_string_data(obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert(json!({}));
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            data.insert(
                k,
                json!(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_defaults() {
        assert_eq!(default_pull_policy("busybox"), "Always");
        assert_eq!(default_pull_policy("busybox:latest"), "Always");
        assert_eq!(default_pull_policy("registry:5000/busybox"), "Always");
        assert_eq!(
            default_pull_policy("cohort-test/busybox:abc"),
            "IfNotPresent"
        );
        assert_eq!(default_pull_policy("x@sha256:00"), "IfNotPresent");
    }

    #[test]
    fn labels_are_validated() {
        let mut causes = Vec::new();
        check_labels(
            Some(&json!({"ok": "fine", "prefect.io/flow-run-id": "a-b", "bad": "no spaces"})),
            "metadata.labels",
            &mut causes,
        );
        assert_eq!(causes.len(), 1);
        assert!(causes[0].message.contains("no spaces"));
    }
}
