//! Just enough OpenAPI v3 for kubectl: it reads `/openapi/v3` to learn whether the server
//! validates fields itself (a `fieldValidation` query parameter on PATCH of the kind). When
//! it does, kubectl skips client-side schema validation, so `kubectl create -f` works
//! without `--validate=false`. No schemas are served.

use serde_json::{json, Map, Value};

use crate::kind::Kind;

/// The group-versions, as OpenAPI v3 names them (`api/v1`, `apis/batch/v1`).
fn group_versions() -> Vec<(&'static str, String)> {
    let mut gvs: Vec<(&'static str, String)> = Vec::new();
    for kind in Kind::ALL {
        let path = match kind.group() {
            "" => "api/v1".to_owned(),
            g => format!("apis/{g}/v1"),
        };
        if !gvs.iter().any(|(_, p)| *p == path) {
            gvs.push((kind.group(), path));
        }
    }
    gvs
}

/// `/openapi/v3`: where each group-version's document is.
pub(crate) fn root() -> Value {
    let paths: Map<String, Value> = group_versions()
        .into_iter()
        .map(|(_, path)| {
            let url = format!("/openapi/v3/{path}?hash=cohort-kube-fake");
            (path, json!({"serverRelativeURL": url}))
        })
        .collect();
    json!({"paths": Value::Object(paths)})
}

/// `/openapi/v3/<group-version path>`: a PATCH operation per kind, with its
/// group-version-kind and the `fieldValidation` parameter.
pub(crate) fn group_version(path: &str) -> Option<Value> {
    let (group, _) = group_versions().into_iter().find(|(_, p)| p == path)?;
    let mut paths = Map::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let prefix = format!("/{path}");
        let object_path = if kind.namespaced() {
            format!(
                "{prefix}/namespaces/{{namespace}}/{}/{{name}}",
                kind.plural()
            )
        } else {
            format!("{prefix}/{}/{{name}}", kind.plural())
        };
        paths.insert(
            object_path,
            json!({
                "patch": {
                    "x-kubernetes-group-version-kind": {
                        "group": kind.group(),
                        "kind": kind.name(),
                        "version": "v1"
                    },
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
                    ],
                    "responses": {}
                }
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": Value::Object(paths),
        "components": {"schemas": {}}
    }))
}
