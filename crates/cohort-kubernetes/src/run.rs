//! One flow run's Job: created once however often the request is retried, then supervised to
//! its end from the namespace's observer, with the flow container's real exit code.

use std::sync::Arc;
use std::time::Duration;

use cohort_infra::exit_codes::infrastructure_crashed_message;
use cohort_infra::{BoxFuture, EventContext, Job, RunReporter, Started};
use k8s_openapi::api::batch::v1::Job as K8sJob;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DeleteParams, DynamicObject, PostParams, PropagationPolicy};
use kube::{Api, Client};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use cohort_kube_manifest::SecretToCreate;

use crate::client::Clients;
use crate::observe::{Following, PodEvents, OBSERVER_LOGGER};
use crate::outcome::{assess, Assessment, Cause, End};
use crate::pod::Diagnosis;
use crate::secrets::MadeSecrets;
use crate::{Observers, FLOW_RUN_ID_LABEL};

/// How long a run may be stuck on its way before it is given up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// A pod the scheduler cannot place (`Unschedulable`) for this long.
    pub scheduled: Option<Duration>,
    /// A pod whose flow container cannot start (its image cannot be pulled, it crash-loops)
    /// for this long.
    pub started: Option<Duration>,
    /// A Job not finished this long after its creation.
    pub finished: Option<Duration>,
}

/// A Job ready to be created.
pub struct Prepared {
    /// Where it is created (the `namespace` variable, which Prefect POSTs to).
    pub namespace: String,
    pub manifest: Value,
    pub cluster_config: Option<Value>,
    pub timeouts: Timeouts,
    /// Secrets to create first (`store_env_as_secret`, the API key).
    pub secrets: Vec<SecretToCreate>,
    /// Follow the flow container's output to the worker's stdout.
    pub stream_output: bool,
}

/// The Job of one flow run, to launch.
pub(crate) struct JobRun {
    pub clients: Clients,
    pub observers: Observers,
    pub prepared: Prepared,
    pub flow_run_id: Uuid,
    pub events: Arc<PodEvents>,
    pub secrets: Arc<MadeSecrets>,
}

/// Prefect retries the create three times, 1 s plus up to 3 s apart
/// (`PREFECT_INTEGRATIONS_KUBERNETES_WORKER_CREATE_JOB_RETRY_*`).
const CREATE_ATTEMPTS: u32 = 3;
const CREATE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Kubernetes' alphabet for generated name suffixes (no vowels, no look-alikes).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

impl Job for JobRun {
    fn launch(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Started>, String>> {
        Box::pin(async move {
            let Prepared {
                namespace,
                mut manifest,
                cluster_config,
                timeouts,
                secrets,
                stream_output,
            } = self.prepared;
            let (cluster, client) = self
                .clients
                .get(cluster_config.as_ref())
                .await
                .map_err(|e| format!("Unable to create Kubernetes job: {e}"))?;
            // The watch starts before the Job exists, so nothing of it is missed.
            let observer = self.observers.get(cluster, client.clone(), &namespace);
            let following = observer.follow(self.flow_run_id, Some(self.events.clone()));
            crate::secrets::create(&client, &secrets, &self.secrets).await?;
            let (name, uid) =
                match create(&client, &namespace, &mut manifest, self.flow_run_id).await {
                    Ok(created) => created,
                    Err(e) => {
                        crate::secrets::delete_env(&client, &secrets).await;
                        return Err(e);
                    }
                };
            crate::secrets::own(&client, &secrets, &name, &uid).await;
            tracing::info!(job = %name, %namespace, "Kubernetes job created");
            let released = CancellationToken::new();
            if stream_output {
                tokio::spawn(crate::output::follow(
                    client.clone(),
                    namespace.clone(),
                    name.clone(),
                    following.view.clone(),
                    released.clone(),
                ));
            }
            let mut started = JobStarted::new(
                client,
                namespace,
                name,
                following,
                timeouts,
                self.events.reporter.clone(),
                self.events.prefect_version.clone(),
            );
            started.output_released = Some(released.drop_guard());
            Ok(Box::new(started) as Box<dyn Started>)
        })
    }
}

/// Creates the Job and returns its name. A retried create never makes a second Job: the name
/// is fixed before the first attempt (the template's `generateName` plus a suffix drawn from
/// the flow run's id), so a create whose answer was lost meets its own Job (409) and takes it.
async fn create(
    client: &Client,
    namespace: &str,
    manifest: &mut Value,
    flow_run: Uuid,
) -> Result<(String, String), String> {
    let api: Api<K8sJob> = Api::namespaced(client.clone(), namespace);
    let metadata = manifest
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or("Unable to create Kubernetes job: the manifest has no metadata")?;
    let fixed_name = match metadata.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => {
            let prefix = metadata
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or("prefect-job-")
                .to_owned();
            let name = format!("{prefix}{}", suffix(flow_run));
            metadata.remove("generateName");
            metadata.insert("name".into(), Value::String(name.clone()));
            name
        }
    };
    // The manifest goes as rendered (no field unknown to this client's types is dropped).
    let resource = ApiResource::erase::<K8sJob>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let job: DynamicObject = serde_json::from_value(manifest.clone())
        .map_err(|e| format!("Unable to create Kubernetes job: the manifest is not a Job: {e}"))?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match raw.create(&PostParams::default(), &job).await {
            Ok(created) => return Ok(created_job(created.metadata, &fixed_name)),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Ours, from an attempt whose answer was lost: take it. Another run's Job by
                // that name (an earlier attempt of this run, finished) gets a new name.
                match api.get_opt(&fixed_name).await {
                    Ok(Some(existing)) if is_live_job_of(&existing, flow_run) => {
                        tracing::info!(job = %fixed_name, "the Job was already created; taking it");
                        return Ok(created_job(existing.metadata, &fixed_name));
                    }
                    Ok(_) => {
                        let mut renamed = job.clone();
                        renamed.metadata.name = None;
                        renamed.metadata.generate_name = Some(format!("{fixed_name}-"));
                        return raw
                            .create(&PostParams::default(), &renamed)
                            .await
                            .map(|j| created_job(j.metadata, &fixed_name))
                            .map_err(|e| create_error(&e, namespace));
                    }
                    Err(e) if attempt < CREATE_ATTEMPTS => {
                        tracing::warn!(error = %e, "could not read the Job; retrying");
                    }
                    Err(e) => return Err(create_error(&e, namespace)),
                }
            }
            Err(e) if attempt < CREATE_ATTEMPTS && retryable(&e) => {
                tracing::warn!(error = %e, attempt, "creating the Kubernetes job failed; retrying");
            }
            Err(e) => return Err(create_error(&e, namespace)),
        }
        let jitter = Duration::from_millis(rand::random_range(0..3000));
        tokio::time::sleep(CREATE_RETRY_DELAY + jitter).await;
    }
}

/// A created Job's name and uid.
fn created_job(metadata: ObjectMeta, fallback: &str) -> (String, String) {
    (
        metadata.name.unwrap_or_else(|| fallback.to_owned()),
        metadata.uid.unwrap_or_default(),
    )
}

/// Five characters of Kubernetes' suffix alphabet, drawn from the flow run's id.
fn suffix(flow_run: Uuid) -> String {
    let mut n = flow_run.as_u128();
    (0..5)
        .map(|_| {
            let c = SUFFIX_ALPHABET[(n % SUFFIX_ALPHABET.len() as u128) as usize];
            n /= SUFFIX_ALPHABET.len() as u128;
            c as char
        })
        .collect()
}

fn is_live_job_of(job: &K8sJob, flow_run: Uuid) -> bool {
    let ours = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(FLOW_RUN_ID_LABEL))
        .is_some_and(|id| *id == flow_run.to_string());
    ours && !crate::outcome::finished(job) && job.metadata.deletion_timestamp.is_none()
}

/// Deletes a Job in the foreground with `grace` for its pods, as prefect-kubernetes'
/// `kill_infrastructure` does: the Job is kept, with a finalizer, until its pods are gone.
/// `Ok(false)` when there was no such Job.
pub(crate) async fn delete_job(
    client: &Client,
    namespace: &str,
    job: &str,
    grace: Duration,
) -> Result<bool, kube::Error> {
    let api: Api<K8sJob> = Api::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(grace.as_secs().try_into().unwrap_or(u32::MAX)),
        propagation_policy: Some(PropagationPolicy::Foreground),
        ..DeleteParams::default()
    };
    match api.delete(job, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Worth another attempt: the server or the connection failed, or asked us to slow down. A
/// refusal (403, 404, 422) will not change; Prefect retries those too, to no end.
fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

/// Prefect's wording, with its hints (`KubernetesWorker._create_job`).
fn create_error(e: &kube::Error, namespace: &str) -> String {
    let kube::Error::Api(status) = e else {
        return format!("Unable to create Kubernetes job: {e}");
    };
    let message = &status.message;
    let lower = message.to_lowercase();
    let hint = if lower.contains("quota") || lower.contains("exceeded") {
        Some("Check the resource quotas for the namespace and ensure sufficient resources are available.".to_owned())
    } else if status.code == 403 || lower.contains("forbidden") {
        Some(
            "Check that your service account has the required RBAC permissions for this operation."
                .to_owned(),
        )
    } else if status.code == 404 && message.contains(namespace) {
        Some(format!(
            "Verify that the namespace '{namespace}' exists in the cluster."
        ))
    } else {
        None
    };
    let reason = if status.reason.is_empty() {
        status.code.to_string()
    } else {
        status.reason.clone()
    };
    match hint {
        Some(hint) => format!("Unable to create Kubernetes job: {reason}: {message}. Hint: {hint}"),
        None => format!("Unable to create Kubernetes job: {reason}: {message}"),
    }
}

/// A created Job, followed to its end.
pub(crate) struct JobStarted {
    client: Client,
    namespace: String,
    job: String,
    following: Following,
    timeouts: Timeouts,
    reporter: Arc<dyn RunReporter>,
    /// The Prefect version the pod events report, for a re-adopted run's.
    prefect_version: String,
    created: Instant,
    /// Since when the pod has been stuck, and on what.
    blocked: Option<(Instant, Diagnosis)>,
    end: Option<End>,
    /// Why the Job was given up, when it was.
    gave_up: Option<String>,
    /// Tells the `stream_output` follower, when dropped, to wait for no further pod.
    output_released: Option<tokio_util::sync::DropGuard>,
}

impl JobStarted {
    pub(crate) fn new(
        client: Client,
        namespace: String,
        job: String,
        following: Following,
        timeouts: Timeouts,
        reporter: Arc<dyn RunReporter>,
        prefect_version: String,
    ) -> Self {
        Self {
            client,
            namespace,
            job,
            following,
            timeouts,
            reporter,
            prefect_version,
            created: Instant::now(),
            blocked: None,
            end: None,
            gave_up: None,
            output_released: None,
        }
    }

    /// The deadline of the first timeout that applies now, and what it is about.
    fn deadline(&self) -> Option<(Instant, String)> {
        let mut deadlines = Vec::new();
        if let Some(finished) = self.timeouts.finished {
            deadlines.push((
                self.created + finished,
                format!(
                    "Kubernetes job '{}' did not finish within {} s (job_watch_timeout_seconds); it was deleted.",
                    self.job,
                    finished.as_secs()
                ),
            ));
        }
        if let Some((since, diagnosis)) = &self.blocked {
            let (timeout, what) = if diagnosis.is_unschedulable() {
                (self.timeouts.scheduled, "was not scheduled")
            } else {
                (self.timeouts.started, "did not start")
            };
            if let Some(timeout) = timeout {
                deadlines.push((
                    *since + timeout,
                    format!(
                        "{}: {} The pod of Kubernetes job '{}' {what} within {} s, so the job was deleted.",
                        diagnosis.summary,
                        diagnosis.detail,
                        self.job,
                        timeout.as_secs()
                    ),
                ));
            }
        }
        deadlines.into_iter().min_by_key(|(at, _)| *at)
    }

    async fn delete(&self, grace: Duration) -> Result<(), kube::Error> {
        delete_job(&self.client, &self.namespace, &self.job, grace)
            .await
            .map(|_| ())
    }

    /// Waits for the Job's end as the view shows it.
    async fn ended(&mut self) -> std::io::Result<End> {
        loop {
            if let Assessment::Ended(end) =
                assess(&self.following.view.borrow_and_update(), &self.job)
            {
                return Ok(end);
            }
            if self.following.view.changed().await.is_err() {
                return Err(std::io::Error::other("the namespace's observer stopped"));
            }
        }
    }
}

impl Started for JobStarted {
    fn identifier(&self) -> String {
        format!("{}:{}", self.namespace, self.job)
    }

    fn stopped_by_infrastructure(&self) -> bool {
        self.end
            .as_ref()
            .is_some_and(|end| end.cause == Cause::DeadlineExceeded)
    }

    fn report_to(&mut self, events: EventContext, reporter: Arc<dyn RunReporter>) {
        self.reporter = reporter.clone();
        self.following.report_to(Arc::new(PodEvents {
            sink: events.sink,
            reporter,
            prefect_version: self.prefect_version.clone(),
        }));
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(async move {
            if let Some(end) = &self.end {
                return Ok(end.code);
            }
            loop {
                let assessment = assess(&self.following.view.borrow_and_update(), &self.job);
                match assessment {
                    Assessment::Ended(end) => {
                        let code = end.code;
                        self.end = Some(end);
                        return Ok(code);
                    }
                    Assessment::Waiting {
                        diagnosis: Some(d),
                        started: false,
                    } if d.blocks_start() => {
                        if self
                            .blocked
                            .as_ref()
                            .is_none_or(|(_, b)| b.category != d.category)
                        {
                            self.blocked = Some((Instant::now(), d));
                        }
                    }
                    Assessment::Waiting { .. } | Assessment::Unseen => self.blocked = None,
                }
                let deadline = self.deadline();
                let at = deadline.as_ref().map(|(at, _)| *at);
                tokio::select! {
                    changed = self.following.view.changed() => {
                        if changed.is_err() {
                            return Err(std::io::Error::other("the namespace's observer stopped"));
                        }
                    }
                    _ = sleep_until(at) => {
                        let (_, why) = deadline.expect("a deadline was set");
                        tracing::warn!(job = %self.job, "{why}");
                        if let Err(e) = self.delete(Duration::ZERO).await {
                            tracing::warn!(job = %self.job, error = %e, "could not delete the Kubernetes job");
                        }
                        self.gave_up = Some(why);
                        self.end = Some(End { code: -1, cause: Cause::JobDeleted, pod: None });
                        return Ok(-1);
                    }
                }
            }
        })
    }

    fn stop(
        &mut self,
        grace: Duration,
        hurry: CancellationToken,
    ) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(async move {
            if let Some(end) = &self.end {
                return Ok(end.code);
            }
            // Foreground: the Job is kept, with a finalizer, until its pods are gone, so the
            // end we read is the pod's.
            self.delete(grace).await.map_err(std::io::Error::other)?;
            let limit = grace + Duration::from_secs(60);
            let end = tokio::select! {
                end = self.ended() => end?,
                _ = hurry.cancelled() => {
                    self.delete(Duration::ZERO).await.map_err(std::io::Error::other)?;
                    tokio::time::timeout(Duration::from_secs(60), self.ended())
                        .await
                        .map_err(|_| std::io::Error::other("the Kubernetes job did not go away"))??
                }
                _ = tokio::time::sleep(limit) => {
                    return Err(std::io::Error::other("the Kubernetes job did not go away"));
                }
            };
            let code = end.code;
            self.end = Some(end);
            Ok(code)
        })
    }

    fn cancels_itself(&self) -> bool {
        // `prefect flow-run execute` in the pod watches for its own cancellation, once its
        // container has started; a pod still pending has no engine to wait for.
        crate::outcome::started(&self.following.view.borrow(), &self.job)
    }

    fn launch_log(&self) -> Vec<String> {
        // `KubernetesWorker._create_job`'s lines.
        vec![
            "Creating Kubernetes job...".to_owned(),
            format!(
                "Kubernetes job '{}' created in namespace '{}'",
                self.job, self.namespace
            ),
        ]
    }

    fn crashed(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some((pod, container, lines)) = self.crashed_pod_logs().await else {
                return;
            };
            let mut messages = vec![format!(
                "Container logs from container '{container}' in pod '{pod}':"
            )];
            messages.extend(lines);
            self.reporter.log(OBSERVER_LOGGER, 40, messages).await;
        })
    }

    fn crashed_message(&self, code: i64) -> String {
        if let Some(why) = &self.gave_up {
            return why.clone();
        }
        let pod = self
            .end
            .as_ref()
            .and_then(|e| e.pod.clone())
            .unwrap_or_else(|| "?".into());
        match self.end.as_ref().map(|e| &e.cause) {
            Some(Cause::OomKilled) => format!(
                "Flow run infrastructure exited with non-zero status code {code}: container '{}' of Kubernetes pod '{pod}' was killed due to out-of-memory (OOMKilled).",
                crate::outcome::FLOW_CONTAINER
            ),
            Some(Cause::Evicted(why)) => format!(
                "Kubernetes pod '{pod}' was evicted ({why}); its container exited with status code {code}."
            ),
            Some(Cause::DeadlineExceeded) => format!(
                "Kubernetes job '{}' exceeded its active deadline (activeDeadlineSeconds); its pod was stopped with status code {code}.",
                self.job
            ),
            Some(Cause::JobDeleted) if code == -1 => "Kubernetes job was deleted".to_owned(),
            Some(Cause::JobDeleted) => format!(
                "Kubernetes job was deleted; its pod's container exited with status code {code}."
            ),
            _ => infrastructure_crashed_message(code),
        }
    }
}

/// How much of a crashed pod's output is forwarded to the run's log
/// (`PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_FORWARD_CRASHED_RUN_LOGS_TAIL_LINES`).
const CRASH_LOG_TAIL_LINES: i64 = 500;

impl JobStarted {
    /// The last output of the Job's newest pod that did not succeed: the flow container's (or
    /// the only one's), from its previous instance if it restarted, else its current one
    /// (`prefect_kubernetes/observer.py: _fetch_crashed_pod_logs`).
    async fn crashed_pod_logs(&self) -> Option<(String, String, Vec<String>)> {
        let pod = {
            let view = self.following.view.borrow();
            crate::outcome::newest_unsucceeded_pod(&view, &self.job)?
        };
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let container = pod.1;
        for previous in [true, false] {
            let params = kube::api::LogParams {
                container: Some(container.clone()),
                previous,
                tail_lines: Some(CRASH_LOG_TAIL_LINES),
                ..kube::api::LogParams::default()
            };
            if let Ok(text) = api.logs(&pod.0, &params).await {
                let lines: Vec<String> = text.lines().map(str::to_owned).collect();
                if !lines.is_empty() {
                    return Some((pod.0, container, lines));
                }
            }
        }
        None
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
