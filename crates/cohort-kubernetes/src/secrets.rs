//! The Secrets prefect-kubernetes creates beside a Job (`prefect_kubernetes/worker.py:
//! KubernetesWorker._create_job`): the worker's API key Secret, upserted and deleted when the
//! worker stops, and a run's env Secret (`store_env_as_secret`), owned by its Job once that
//! exists so Kubernetes collects it, and deleted if the Job cannot be created.

use std::sync::Mutex;

use cohort_kube_manifest::{SecretPurpose, SecretToCreate};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// The API key Secrets this worker made, to delete when it stops.
#[derive(Default)]
pub(crate) struct MadeSecrets {
    made: Mutex<Vec<(Client, String, String)>>,
}

impl MadeSecrets {
    fn remember(&self, client: &Client, namespace: &str, name: &str) {
        let mut made = self.made.lock().expect("secrets lock poisoned");
        if !made.iter().any(|(_, ns, n)| ns == namespace && n == name) {
            made.push((client.clone(), namespace.to_owned(), name.to_owned()));
        }
    }

    /// Deletes them (`KubernetesWorker.teardown`); a failure is logged.
    pub(crate) async fn delete_all(&self) {
        let made = std::mem::take(&mut *self.made.lock().expect("secrets lock poisoned"));
        for (client, namespace, name) in made {
            let api: Api<Secret> = Api::namespaced(client, &namespace);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(%namespace, secret = %name, "deleted the API key Secret"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(%namespace, secret = %name, error = %e, "could not delete the API key Secret")
                }
            }
        }
    }
}

fn name_of(secret: &SecretToCreate) -> String {
    secret.body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Creates `secrets` before their Job. The error is worded for the run's Crashed message.
pub(crate) async fn create(
    client: &Client,
    secrets: &[SecretToCreate],
    made: &MadeSecrets,
) -> Result<(), String> {
    for secret in secrets {
        let api: Api<Secret> = Api::namespaced(client.clone(), &secret.namespace);
        let body: Secret = serde_json::from_value(secret.body.clone())
            .map_err(|e| format!("Unable to create Kubernetes secret: {e}"))?;
        let name = name_of(secret);
        let result = match api.create(&PostParams::default(), &body).await {
            // An API key Secret of an earlier start, or an env Secret of an attempt whose
            // answer was lost: bring it up to date.
            Err(kube::Error::Api(s)) if s.code == 409 => api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&secret.body))
                .await
                .map(|_| ()),
            other => other.map(|_| ()),
        };
        result.map_err(|e| format!("Unable to create Kubernetes secret '{name}': {e}"))?;
        if secret.purpose == SecretPurpose::ApiKey {
            made.remember(client, &secret.namespace, &name);
        }
    }
    Ok(())
}

/// Makes the Job the owner of its env Secrets, so they go with it.
pub(crate) async fn own(client: &Client, secrets: &[SecretToCreate], job: &str, uid: &str) {
    for secret in secrets.iter().filter(|s| s.purpose == SecretPurpose::Env) {
        let api: Api<Secret> = Api::namespaced(client.clone(), &secret.namespace);
        let name = name_of(secret);
        let owner = json!({"metadata": {"ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": uid}
        ]}});
        if let Err(e) = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&owner))
            .await
        {
            tracing::warn!(secret = %name, error = %e, "could not make the Job the owner of its env Secret");
        }
    }
}

/// Deletes the env Secrets of a Job that could not be created.
pub(crate) async fn delete_env(client: &Client, secrets: &[SecretToCreate]) {
    for secret in secrets.iter().filter(|s| s.purpose == SecretPurpose::Env) {
        let api: Api<Secret> = Api::namespaced(client.clone(), &secret.namespace);
        let name = name_of(secret);
        if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
            tracing::warn!(secret = %name, error = %e, "could not delete the env Secret of a Job that was not created");
        }
    }
}
