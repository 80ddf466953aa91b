//! `deploy/kubernetes/worker.yaml`, the manifests that run the worker in a cluster: every
//! document is a known kind whose every field Kubernetes' own types know (a misspelt field
//! would be dropped on the way through k8s-openapi's types), the Role grants no more than
//! what the worker does, and `kubectl apply --dry-run=client` accepts them (against the
//! Kubernetes emulator, for the discovery kubectl needs).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const MANIFESTS: &str = include_str!("../../../deploy/kubernetes/worker.yaml");

/// Through the typed model and back: nothing lost, nothing added.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).expect("a valid object of its kind");
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, doc,
        "fields unknown to Kubernetes' types, or wrongly typed"
    );
    typed
}

#[test]
fn the_worker_manifests_are_well_formed_kubernetes_objects() {
    let docs: Vec<Value> = serde_saphyr::from_multiple(MANIFESTS).expect("YAML");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "Role", "RoleBinding", "Deployment"]
    );
    let _: ServiceAccount = round_trip(&docs[0]);
    let role: Role = round_trip(&docs[1]);
    let binding: RoleBinding = round_trip(&docs[2]);
    let deployment: Deployment = round_trip(&docs[3]);

    // Least rights: Jobs to create, follow and delete; pods to follow; a crashed pod's output.
    let rules: Vec<(String, String, Vec<String>)> = role
        .rules
        .unwrap()
        .into_iter()
        .flat_map(|r| {
            let groups = r.api_groups.unwrap_or_default();
            let verbs = r.verbs.clone();
            r.resources
                .unwrap_or_default()
                .into_iter()
                .map(move |res| (groups.join(","), res, verbs.clone()))
        })
        .collect();
    let expected = |g: &str, r: &str, v: &[&str]| {
        (
            g.to_owned(),
            r.to_owned(),
            v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        rules,
        vec![
            expected(
                "batch",
                "jobs",
                &["create", "get", "list", "watch", "delete"]
            ),
            expected("", "pods", &["get", "list", "watch"]),
            expected("", "pods/log", &["get"]),
        ]
    );
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());

    let spec = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("cohort-worker"));
    let container = &spec.containers[0];
    let args = container.args.clone().unwrap();
    assert_eq!(&args[..2], ["worker", "start"]);
    assert!(args.windows(2).any(|w| w == ["--type", "kubernetes"]));
    // Non-root, as the image runs.
    assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_accepts_the_worker_manifests_in_a_client_dry_run() {
    use cohort_kube_fake::{Emulator, EmulatorConfig, Kind};
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.expect("serve the emulator");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = served.write_kubeconfig(dir.path()).unwrap();
    let manifests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes/worker.yaml"
    );
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "--dry-run=client", "-f", manifests])
        .output()
        .await
        .expect("run kubectl (is it installed and on PATH?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl refused the manifests:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for created in [
        "serviceaccount/cohort-worker created (dry run)",
        "role.rbac.authorization.k8s.io/cohort-worker created (dry run)",
        "rolebinding.rbac.authorization.k8s.io/cohort-worker created (dry run)",
        "deployment.apps/cohort-worker created (dry run)",
    ] {
        assert!(stdout.contains(created), "{stdout}");
    }
    // A dry run writes nothing.
    assert!(emulator.list(Kind::Deployment, Some("prefect")).is_empty());
}
