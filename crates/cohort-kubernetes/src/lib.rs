//! The `kubernetes` infrastructure of the worker's seam: each flow run a Kubernetes Job, a
//! drop-in for prefect-kubernetes 0.8.0's `KubernetesWorker` (`prefect_kubernetes/worker.py`)
//! that supervises each Job to its end instead of returning at its creation.
//!
//! - The manifest is prefect-kubernetes' to the byte (`cohort-kube-manifest`).
//! - The Job is created once, however often the create is retried ([`run`]).
//! - One observer per namespace watches the Jobs and pods labelled `prefect.io/flow-run-id`
//!   (server-side selectors, namespace-scoped) and emits the observer's
//!   `prefect.kubernetes.pod.*` events ([`observe`], [`pod`]).
//! - Each run's supervisor reads its Job's end from that view: the flow container's real exit
//!   code, and a Crashed message that names the Kubernetes cause — OOMKilled, Evicted, an
//!   image that cannot be pulled, an unschedulable pod, a deadline, a deleted Job
//!   ([`outcome`]).
//! - A cancelled run's Job is deleted in the foreground with the grace; the server's
//!   `cancelling_timeout_teardown.v1` clean-up does the same by identifier
//!   (`<namespace>:<job name>`).

#![forbid(unsafe_code)]

pub mod client;
pub mod observe;
pub mod outcome;
mod output;
pub mod pod;
pub mod run;
mod secrets;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_infra::{
    BoxFuture, ChannelHello, Infrastructure, KillError, Map, PrepareError, RunSpec, Started,
};
use k8s_openapi::api::batch::v1::Job as K8sJob;
use kube::api::ListParams;
use kube::{Api, Client};
use uuid::Uuid;

use cohort_kube_manifest::{ManifestSettings, RunInputs};

use crate::client::{Clients, ClusterKey};
use crate::observe::{Observer, PodEvents};
use crate::run::{JobRun, JobStarted, Prepared, Timeouts};
use crate::secrets::MadeSecrets;

/// The work pool type this infrastructure serves.
pub const KUBERNETES: &str = "kubernetes";
/// The label every Job and pod of a flow run carries.
pub const FLOW_RUN_ID_LABEL: &str = "prefect.io/flow-run-id";

/// How long start-up waits for a namespace's Jobs to be listed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// The observers started so far, one per cluster and namespace.
#[derive(Clone, Default)]
pub(crate) struct Observers {
    started: Arc<Mutex<HashMap<ObserverKey, Arc<Observer>>>>,
}

/// A cluster and a namespace.
type ObserverKey = (ClusterKey, String);

impl Observers {
    pub(crate) fn get(
        &self,
        cluster: ClusterKey,
        client: Client,
        namespace: &str,
    ) -> Arc<Observer> {
        let mut started = self.started.lock().expect("observers lock poisoned");
        started
            .entry((cluster, namespace.to_owned()))
            .or_insert_with(|| Arc::new(Observer::start(client, namespace)))
            .clone()
    }
}

/// How the worker treats Jobs beyond what the job configuration says.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    /// Namespaces to look in for Jobs of runs an earlier worker of this name started (the
    /// pool's default namespace, and any the operator names).
    pub namespaces: Vec<String>,
    /// The Prefect version the worker reports (`prefect.version` on the pod events' worker).
    pub prefect_version: String,
    /// prefect-kubernetes' `PREFECT_INTEGRATIONS_KUBERNETES_WORKER_*` secret settings.
    pub manifest: ManifestSettings,
    /// How long a pod the scheduler cannot place may wait before its run is Crashed and its
    /// Job deleted (`COHORT_KUBERNETES_SCHEDULED_TIMEOUT_SECONDS`; none by default, as in
    /// Prefect: a cluster autoscaler may still add the node it needs).
    pub scheduled_timeout: Option<Duration>,
}

/// Flow runs as Kubernetes Jobs.
pub struct KubernetesInfrastructure {
    clients: Clients,
    observers: Observers,
    options: KubernetesOptions,
    secrets: Arc<MadeSecrets>,
}

impl KubernetesInfrastructure {
    /// Clients are made on first use, so a worker starts without a reachable cluster and each
    /// run that cannot reach one is Crashed with the reason.
    pub fn new(options: KubernetesOptions) -> Self {
        Self {
            clients: Clients::default(),
            observers: Observers::default(),
            options,
            secrets: Arc::default(),
        }
    }

    /// With `client` for the worker's own cluster.
    pub fn with_client(client: Client, options: KubernetesOptions) -> Self {
        Self {
            clients: Clients::with_default(client),
            observers: Observers::default(),
            options,
            secrets: Arc::default(),
        }
    }

    async fn delete_job(
        &self,
        cluster_config: Option<&serde_json::Value>,
        namespace: &str,
        job: &str,
        grace: Duration,
    ) -> Result<(), KillError> {
        let (_, client) = self
            .clients
            .get(cluster_config)
            .await
            .map_err(|e| KillError::Unavailable(e.to_string()))?;
        match run::delete_job(&client, namespace, job, grace).await {
            Ok(true) => {
                tracing::info!("Deleted Kubernetes job '{job}' in namespace '{namespace}'");
                Ok(())
            }
            Ok(false) => Err(KillError::NotFound),
            Err(e) => Err(KillError::Unavailable(e.to_string())),
        }
    }
}

/// The Jobs of `namespace` that `selector` selects (one LIST, its pages followed).
async fn list_jobs(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<K8sJob>, kube::Error> {
    let api: Api<K8sJob> = Api::namespaced(client.clone(), namespace);
    let mut jobs = Vec::new();
    let mut params = ListParams::default().labels(selector);
    loop {
        let page = tokio::time::timeout(SYNC_TIMEOUT, api.list(&params))
            .await
            .map_err(|_| kube::Error::Service("the list did not answer in time".into()))??;
        jobs.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(jobs),
        }
    }
}

/// `<namespace>:<job name>`; the three-part identifiers of prefect-kubernetes before 0.6.0
/// (`<cluster uid>:<namespace>:<job name>`) are accepted with the uid ignored.
pub fn parse_identifier(identifier: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = identifier.split(':').collect();
    match parts.as_slice() {
        [ns, job] | [_, ns, job] if !ns.is_empty() && !job.is_empty() => Some((ns, job)),
        _ => None,
    }
}

impl Infrastructure for KubernetesInfrastructure {
    fn worker_type(&self) -> &'static str {
        KUBERNETES
    }

    fn default_base_job_template(&self) -> serde_json::Value {
        serde_json::from_str(cohort_kube_manifest::BASE_JOB_TEMPLATE)
            .expect("the bundled template is JSON")
    }

    fn channel_hello(&self) -> ChannelHello {
        ChannelHello {
            worker_metadata: Some(serde_json::json!({
                "integrations": [{"name": "prefect-kubernetes", "version": "0.8.0"}]
            })),
            handles_cleanup: true,
        }
    }

    fn prepare(
        &self,
        config: &Map,
        spec: RunSpec,
    ) -> Result<Box<dyn cohort_infra::Job>, PrepareError> {
        let prepared = self.prepare_job(config, &spec)?;
        Ok(Box::new(JobRun {
            clients: self.clients.clone(),
            observers: self.observers.clone(),
            prepared,
            flow_run_id: spec.flow_run_id,
            secrets: self.secrets.clone(),
            events: Arc::new(PodEvents {
                sink: spec.events.sink.clone(),
                reporter: spec.reporter.clone(),
                prefect_version: self.options.prefect_version.clone(),
            }),
        }))
    }

    fn adopts_by_configuration(&self) -> bool {
        true
    }

    /// On the cluster the run's `cluster_config` names (else the worker's own), in the run's
    /// namespace and the ones the worker searches.
    fn adopt<'a>(
        &'a self,
        flow_run: Uuid,
        _legacy_status: Option<&'a Path>,
        configuration: Option<&'a Map>,
    ) -> BoxFuture<'a, Option<Box<dyn Started>>> {
        Box::pin(async move {
            let cluster_config =
                configuration.and_then(|c| cohort_kube_manifest::cluster_config(c).ok().flatten());
            let (cluster, client) = self.clients.get(cluster_config.as_ref()).await.ok()?;
            let selector = format!("{FLOW_RUN_ID_LABEL}={flow_run}");
            let mut namespaces: Vec<String> = configuration
                .and_then(|c| c.get("namespace"))
                .and_then(serde_json::Value::as_str)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .into_iter()
                .collect();
            for namespace in self.search_namespaces(&client) {
                if !namespaces.contains(&namespace) {
                    namespaces.push(namespace);
                }
            }
            for namespace in &namespaces {
                // One LIST per namespace; a namespace is watched only once a Job is found in
                // it, so searching costs no long-lived watch.
                let jobs = match list_jobs(&client, namespace, &selector).await {
                    Ok(jobs) => jobs,
                    Err(e) => {
                        tracing::warn!(%namespace, error = %e, "could not list the namespace's Jobs; its runs are not re-adopted");
                        continue;
                    }
                };
                let newest = jobs
                    .iter()
                    .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(pod::to_chrono))
                    .and_then(|j| j.metadata.name.clone());
                let Some(job) = newest else { continue };
                let observer = self
                    .observers
                    .get(cluster.clone(), client.clone(), namespace);
                // Its events go where `Started::report_to` says, once the worker read the run.
                let following = observer.follow(flow_run, None);
                return Some(Box::new(JobStarted::new(
                    client.clone(),
                    namespace.clone(),
                    job,
                    following,
                    Timeouts::default(),
                    Arc::new(cohort_infra::Silent),
                    self.options.prefect_version.clone(),
                )) as Box<dyn Started>);
            }
            None
        })
    }

    fn orphans<'a>(
        &'a self,
        worker_name: &'a str,
        pool_id: Uuid,
        journaled: &'a [Uuid],
    ) -> BoxFuture<'a, Vec<Uuid>> {
        Box::pin(async move {
            let Ok((_, client)) = self.clients.get(None).await else {
                return Vec::new();
            };
            // As the labels carry them (`prefect_kubernetes/worker.py: _slugify_label_value`),
            // selected by the API server.
            let worker = cohort_kube_manifest::slugify_label_value(worker_name);
            let selector = format!(
                "{FLOW_RUN_ID_LABEL},prefect.io/worker-name={worker},prefect.io/work-pool-id={pool_id}"
            );
            let mut found = Vec::new();
            for namespace in &self.search_namespaces(&client) {
                let jobs = match list_jobs(&client, namespace, &selector).await {
                    Ok(jobs) => jobs,
                    Err(e) => {
                        tracing::warn!(%namespace, error = %e, "could not list the namespace's Jobs; runs of an earlier worker there are not taken up");
                        continue;
                    }
                };
                for job in jobs.iter().filter(|j| !outcome::finished(j)) {
                    let run = job
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(FLOW_RUN_ID_LABEL))
                        .and_then(|id| id.parse::<Uuid>().ok());
                    if let Some(run) = run {
                        if !journaled.contains(&run) && !found.contains(&run) {
                            found.push(run);
                        }
                    }
                }
            }
            found
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.secrets.delete_all())
    }

    /// On the cluster the run's `cluster_config` names, rendered now (as
    /// `KubernetesWorker.kill_infrastructure` reaches it through the configuration), else the
    /// worker's own.
    fn kill<'a>(
        &'a self,
        identifier: &'a str,
        configuration: Option<&'a Map>,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), KillError>> {
        Box::pin(async move {
            let Some((namespace, job)) = parse_identifier(identifier) else {
                return Err(KillError::NotFound);
            };
            // A configuration that no longer names a cluster well is no reason not to try
            // the worker's own.
            let cluster_config =
                configuration.and_then(|c| cohort_kube_manifest::cluster_config(c).ok().flatten());
            self.delete_job(cluster_config.as_ref(), namespace, job, grace)
                .await
        })
    }
}

impl KubernetesInfrastructure {
    /// Where Jobs of an earlier worker are looked for: the configured namespaces, and the
    /// client's own (the kubeconfig context's, or the worker pod's namespace in a cluster).
    fn search_namespaces(&self, client: &Client) -> Vec<String> {
        let mut namespaces = self.options.namespaces.clone();
        let own = client.default_namespace().to_owned();
        if !namespaces.contains(&own) {
            namespaces.push(own);
        }
        namespaces
    }

    /// The Job of a rendered configuration, and how long it may take.
    fn prepare_job(&self, config: &Map, spec: &RunSpec) -> Result<Prepared, PrepareError> {
        let lookup = |name: &str| std::env::var(name).ok();
        let mut inputs = RunInputs::new(
            spec.flow_run_id,
            &spec.flow_run_name,
            &spec.env,
            &spec.labels,
        );
        inputs.process_env = Some(&lookup);
        let job = cohort_kube_manifest::prepare(config, &inputs, &self.options.manifest)?;
        for warning in &job.warnings {
            tracing::warn!("{warning}");
        }
        let seconds = |s: i64| (s > 0).then(|| Duration::from_secs(s.unsigned_abs()));
        Ok(Prepared {
            namespace: job.namespace,
            manifest: job.manifest,
            cluster_config: job.cluster_config,
            timeouts: Timeouts {
                scheduled: self.options.scheduled_timeout,
                // prefect-kubernetes left `pod_watch_timeout_seconds` unused in 0.6.0; before,
                // it bounded a pod's start. Here it bounds a start that is failing (an image
                // that cannot be pulled, a crash loop), not a slow one.
                started: seconds(job.pod_watch_timeout_seconds),
                finished: job.job_watch_timeout_seconds.and_then(seconds),
            },
            secrets: job.secrets,
            stream_output: job.stream_output,
        })
    }
}
