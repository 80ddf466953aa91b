//! The kubeconfig that points a client (kubectl, Python's client, kube-rs) at the loopback
//! server: plain HTTP with no credentials, or HTTPS with the cluster CA and the token;
//! namespace `default`.

use base64::Engine;

use crate::server::InCluster;

/// The name of the cluster, user and context in the kubeconfig.
pub const CONTEXT: &str = "cohort-kube-fake";

/// A kubeconfig for the server at `url`.
pub(crate) fn render(url: &str, in_cluster: Option<&InCluster>) -> String {
    let (ca, user) = match in_cluster {
        Some(c) => (
            format!(
                "\n    certificate-authority-data: {}",
                base64::engine::general_purpose::STANDARD.encode(&c.ca_pem)
            ),
            format!("\n    token: {}", c.token),
        ),
        None => (String::new(), " {}".to_owned()),
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {CONTEXT}
  cluster:
    server: {url}{ca}
contexts:
- name: {CONTEXT}
  context:
    cluster: {CONTEXT}
    user: {CONTEXT}
    namespace: default
current-context: {CONTEXT}
users:
- name: {CONTEXT}
  user:{user}
preferences: {{}}
"
    )
}
