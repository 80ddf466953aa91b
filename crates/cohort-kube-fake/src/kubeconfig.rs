//! The kubeconfig that points a client (kubectl, Python's client, kube-rs) at the loopback
//! server: plain HTTP, no credentials, namespace `default`.

/// The name of the cluster, user and context in the kubeconfig.
pub const CONTEXT: &str = "cohort-kube-fake";

/// A kubeconfig for the server at `url`.
pub(crate) fn render(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {CONTEXT}
  cluster:
    server: {url}
contexts:
- name: {CONTEXT}
  context:
    cluster: {CONTEXT}
    user: {CONTEXT}
    namespace: default
current-context: {CONTEXT}
users:
- name: {CONTEXT}
  user: {{}}
preferences: {{}}
"
    )
}
