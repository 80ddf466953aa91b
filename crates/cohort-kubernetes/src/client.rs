//! API clients, one per cluster a pool's runs name, made once and shared (prefect-kubernetes
//! makes a new one for every call: `prefect_kubernetes/worker.py: _get_configured_kubernetes_client`).
//!
//! Which cluster: the job's `cluster_config` block (a kubeconfig and a context) when set;
//! otherwise the in-cluster service account when the worker runs in a pod
//! (`KUBERNETES_SERVICE_HOST`), else `KUBECONFIG` or `~/.kube/config`: Prefect's order.

use std::collections::HashMap;
use std::sync::Arc;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;
use tokio::sync::Mutex;

/// A cluster as a pool's runs name it: `None` is the worker's own.
pub type ClusterKey = Option<String>;

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the cluster_config block is not a kubeconfig and a context name: {0}")]
    BadClusterConfig(String),
    #[error("could not load the Kubernetes configuration: {0}")]
    Config(String),
    #[error("could not make a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The clients made so far.
#[derive(Default, Clone)]
pub struct Clients {
    made: Arc<Mutex<HashMap<ClusterKey, Client>>>,
}

impl Clients {
    /// A client with `client` for the worker's own cluster (tests, or a caller that built one).
    pub fn with_default(client: Client) -> Self {
        Self {
            made: Arc::new(Mutex::new(HashMap::from([(None, client)]))),
        }
    }

    /// The client of `cluster_config` (the resolved block's data), made on first use.
    pub async fn get(
        &self,
        cluster_config: Option<&Value>,
    ) -> Result<(ClusterKey, Client), ClientError> {
        let key: ClusterKey = cluster_config
            .filter(|c| !c.is_null())
            .map(Value::to_string);
        let mut made = self.made.lock().await;
        if let Some(client) = made.get(&key) {
            return Ok((key, client.clone()));
        }
        let config = match cluster_config.filter(|c| !c.is_null()) {
            Some(block) => from_block(block).await?,
            None => worker_config().await?,
        };
        let client = Client::try_from(config)?;
        made.insert(key.clone(), client.clone());
        Ok((key, client))
    }
}

/// `KubernetesClusterConfig`'s data: `{"config": <kubeconfig as a dict>, "context_name": …}`.
async fn from_block(block: &Value) -> Result<Config, ClientError> {
    let config = block
        .get("config")
        .ok_or_else(|| ClientError::BadClusterConfig("no `config`".into()))?;
    let kubeconfig: Kubeconfig = serde_json::from_value(config.clone())
        .map_err(|e| ClientError::BadClusterConfig(e.to_string()))?;
    let context = block
        .get("context_name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let options = KubeConfigOptions {
        context,
        ..KubeConfigOptions::default()
    };
    Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| ClientError::Config(e.to_string()))
}

async fn worker_config() -> Result<Config, ClientError> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        if let Ok(config) = Config::incluster() {
            return Ok(config);
        }
    }
    Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .map_err(|e| ClientError::Config(e.to_string()))
}
