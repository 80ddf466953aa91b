//! Discovery documents (`/version`, `/api`, `/apis`, resource lists), built from the kind
//! table so that what is advertised is exactly what is served.

use serde_json::{json, Value};

use crate::kind::Kind;

/// The Kubernetes version the emulator claims to be: the oldest that k8s-openapi's `v1_33`
/// feature covers, one minor from kubectl 1.32.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-cohort-kube-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub(crate) fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:0"}]
    })
}

fn group_doc(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

pub(crate) fn groups() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            group_doc("batch"),
            group_doc("apiextensions.k8s.io"),
            group_doc("apps"),
            group_doc("rbac.authorization.k8s.io"),
        ]
    })
}

pub(crate) fn group(group: &str) -> Value {
    let mut doc = group_doc(group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    doc
}

/// `APIResourceList` for `/api/v1` (group "") or `/apis/<group>/v1`.
pub(crate) fn resources(group: &str) -> Value {
    let mut list = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let verbs: &[&str] = if kind == Kind::CustomResourceDefinition {
            &["get", "list", "watch"]
        } else {
            &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        };
        let mut resource = json!({
            "name": kind.plural(),
            "singularName": kind.name().to_ascii_lowercase(),
            "namespaced": kind.namespaced(),
            "kind": kind.name(),
            "verbs": verbs,
        });
        if !kind.short_names().is_empty() {
            resource["shortNames"] = json!(kind.short_names());
        }
        if matches!(kind, Kind::Pod | Kind::Job) {
            resource["categories"] = json!(["all"]);
        }
        list.push(resource);
        if kind.has_status() {
            list.push(json!({
                "name": format!("{}/status", kind.plural()),
                "singularName": "",
                "namespaced": kind.namespaced(),
                "kind": kind.name(),
                "verbs": ["get", "patch", "update"],
            }));
        }
        if kind == Kind::Pod {
            list.push(json!({
                "name": "pods/log",
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        "v1".to_owned()
    } else {
        format!("{group}/v1")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": list,
    })
}
