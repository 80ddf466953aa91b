//! The `docker` infrastructure of the worker's seam: each flow run a container on a Docker
//! Engine, a drop-in for prefect-docker 0.7.4's `DockerWorker` (`prefect_docker/worker.py`) with
//! what its users miss: the container's real exit code whatever `stream_output` and
//! `auto_remove` say, OOM kills reported as such, no containers left behind, and containers
//! re-adopted by a restarted worker.
//!
//! The Engine is reached through bollard (API version negotiated at connect). Each started
//! container gets one watcher task that owns its end: it waits for the exit code
//! (`POST /containers/{id}/wait?condition=not-running`, which answers even for a container that
//! already exited), reads `OOMKilled`, emits `prefect.docker.container.exited` and removes the
//! container; the supervisor only reads the outcome, so a dropped `wait` loses nothing.

#![forbid(unsafe_code)]

pub mod create;
pub mod job;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use cohort_events::{Event, Resource};
use cohort_infra::exit_codes::{exit_info, infrastructure_crashed_message};
use cohort_infra::{
    BoxFuture, ChannelHello, EventContext, Infrastructure, Job, KillError, Map, PrepareError,
    RunSpec, Started,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::create::DEFAULT_IMAGE;
use crate::job::{DockerJob, PullPolicy};

/// The work pool type this infrastructure serves.
pub const DOCKER: &str = "docker";
/// Prefect's label holding a container's flow run (`prefect.io/flow-run-id`, turned around).
const FLOW_RUN_LABEL: &str = "io.prefect.flow-run-id";
/// How long a lost Engine connection is waited out before the container counts as lost.
const ENGINE_RETRY: Duration = Duration::from_secs(1);
const ENGINE_RETRIES: u32 = 60;
/// How often, and how far apart, a container that exited 137 without `OOMKilled` is
/// inspected again (the Engine may record the OOM kill just after the exit).
const OOM_RECHECKS: u32 = 4;
const OOM_RECHECK_EVERY: Duration = Duration::from_millis(500);

/// prefect-docker's default base job template, verbatim.
pub const BASE_JOB_TEMPLATE: &str = include_str!("base-job-template.json");

/// Why the Engine cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No Engine answers at the address (`DOCKER_HOST` or the local socket). Not retryable
    /// until the daemon runs.
    #[error("cannot reach the Docker Engine at {address}: {source}")]
    Unreachable {
        address: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// How the worker treats containers beyond what the job says.
#[derive(Debug, Clone, Default)]
pub struct DockerOptions {
    /// Keep a container once its exit code is read (prefect-docker never removes one; Cohort
    /// does unless this is set or the job asks the Engine to with `auto_remove`).
    pub keep_containers: bool,
}

/// Flow runs as containers on one Docker Engine.
pub struct DockerInfrastructure {
    docker: Docker,
    /// docker-py's `base_url`: the identifier's prefix.
    base_url: String,
    options: DockerOptions,
}

impl DockerInfrastructure {
    /// Connects to the Engine of `DOCKER_HOST` (or the local socket), negotiating the API
    /// version; an Engine that does not answer is an error naming its address.
    pub async fn connect(options: DockerOptions) -> Result<Self, DockerError> {
        let host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        let address = host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned());
        let unreachable = |source| DockerError::Unreachable {
            address: address.clone(),
            source,
        };
        let docker = Docker::connect_with_defaults().map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;
        Ok(Self {
            docker,
            base_url: base_url(host.as_deref()),
            options,
        })
    }
}

/// `infrastructure_pid`: docker-py's base URL and the full container id
/// (`DockerWorker._get_infrastructure_pid`).
fn identifier(base_url: &str, container: &str) -> String {
    format!("{base_url}:{container}")
}

/// docker-py's normalised `base_url` for a `DOCKER_HOST` (`docker/api/client.py`).
fn base_url(docker_host: Option<&str>) -> String {
    match docker_host {
        Some(h) if h.starts_with("tcp://") => {
            let scheme = if std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty()) {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", &h["tcp://".len()..])
        }
        Some(h) if h.starts_with("npipe://") => "http+docker://localnpipe".into(),
        Some(h) if h.starts_with("ssh://") => "http+docker://ssh".into(),
        _ => "http+docker://localhost".into(),
    }
}

impl Infrastructure for DockerInfrastructure {
    fn worker_type(&self) -> &'static str {
        DOCKER
    }

    fn default_base_job_template(&self) -> serde_json::Value {
        serde_json::from_str(BASE_JOB_TEMPLATE).expect("the embedded template is JSON")
    }

    /// As prefect-docker's worker (`prefect/workers/base.py: BaseWorker._worker_metadata`).
    fn channel_hello(&self) -> ChannelHello {
        ChannelHello {
            worker_metadata: Some(serde_json::json!({
                "integrations": [{"name": "prefect-docker", "version": "0.7.4"}]
            })),
            handles_cleanup: true,
        }
    }

    /// Containers of this worker and pool that ended and were never removed (a worker killed
    /// between reading an exit code and removing the container, or one whose claim was lost),
    /// found by prefect-docker's labels; a running one is never touched.
    fn sweep<'a>(
        &'a self,
        worker_name: &'a str,
        pool_id: Uuid,
        journaled: &'a [Uuid],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.options.keep_containers {
                return;
            }
            let filters = HashMap::from([
                (
                    "label".to_owned(),
                    vec![
                        format!("io.prefect.worker-name={worker_name}"),
                        format!("io.prefect.work-pool-id={pool_id}"),
                    ],
                ),
                (
                    "status".to_owned(),
                    vec!["created".to_owned(), "exited".to_owned(), "dead".to_owned()],
                ),
            ]);
            let found = match self
                .docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                }))
                .await
            {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list leftover containers");
                    return;
                }
            };
            for container in found {
                let run = container
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(FLOW_RUN_LABEL))
                    .and_then(|r| Uuid::parse_str(r).ok());
                let (Some(id), false) = (container.id, run.is_some_and(|r| journaled.contains(&r)))
                else {
                    continue;
                };
                match self
                    .docker
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: false,
                            ..Default::default()
                        }),
                    )
                    .await
                {
                    Ok(()) => {
                        tracing::info!(container = %id, "removed a leftover container of an earlier worker")
                    }
                    Err(e) => {
                        tracing::warn!(container = %id, error = %e, "cannot remove a leftover container")
                    }
                }
            }
        })
    }

    /// `docker stop` with the grace; the identifier's host part is ignored, as prefect-docker
    /// ignores it (`DockerWorker.kill_infrastructure`: `rsplit(":", 1)`). The container is left
    /// to its watcher (or to the start-up of a worker that journaled it) to remove.
    fn kill<'a>(
        &'a self,
        identifier: &'a str,
        _configuration: Option<&'a Map>,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), KillError>> {
        Box::pin(async move {
            let container = identifier.rsplit(':').next().unwrap_or(identifier);
            match self
                .docker
                .stop_container(
                    container,
                    Some(StopContainerOptions {
                        t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
                        ..Default::default()
                    }),
                )
                .await
            {
                Ok(()) => Ok(()),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Err(KillError::NotFound),
                Err(e) => Err(KillError::Unavailable(engine_message(&e))),
            }
        })
    }

    fn prepare(&self, config: &Map, spec: RunSpec) -> Result<Box<dyn Job>, PrepareError> {
        let job =
            DockerJob::from_config(config).map_err(|e| PrepareError::Invalid(e.to_string()))?;
        let api_url = job
            .env
            .get("PREFECT_API_URL")
            .cloned()
            .flatten()
            .or_else(|| spec.env.get("PREFECT_API_URL").cloned());
        let mode = create::network_mode(&job, api_url.as_deref());
        let env = create::environment(&spec.env, &job, &mode);
        let labels = create::labels(&spec.labels, &job.labels);
        let name = create::container_name(job.name.as_deref().unwrap_or(&spec.flow_run_name));
        let image = job
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let request = create::create(&job, &image, &env, &mode, labels, name)
            .map_err(PrepareError::Invalid)?;
        Ok(Box::new(ContainerRun {
            docker: self.docker.clone(),
            base_url: self.base_url.clone(),
            keep: self.options.keep_containers || job.auto_remove,
            policy: job
                .image_pull_policy
                .unwrap_or_else(|| default_policy(&image)),
            image,
            credentials: job.registry_credentials.as_ref().map(credentials),
            networks: job.networks.iter().skip(1).cloned().collect(),
            stream_output: job.stream_output,
            request,
            events: spec.events,
        }))
    }

    fn adopt<'a>(
        &'a self,
        flow_run: Uuid,
        _legacy_status: Option<&'a Path>,
        _configuration: Option<&'a Map>,
    ) -> BoxFuture<'a, Option<Box<dyn Started>>> {
        Box::pin(async move {
            let filters = HashMap::from([(
                "label".to_owned(),
                vec![format!("{FLOW_RUN_LABEL}={flow_run}")],
            )]);
            let found = self
                .docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                }))
                .await;
            let container = match found {
                Ok(list) => list.into_iter().find_map(|c| c.id)?,
                Err(e) => {
                    tracing::warn!(error = %e, %flow_run, "cannot list the containers of a journaled run");
                    return None;
                }
            };
            let inspect = self.docker.inspect_container(&container, None).await.ok()?;
            let never_started = inspect
                .state
                .as_ref()
                .and_then(|s| s.status)
                .is_some_and(|s| s == bollard::models::ContainerStateStatusEnum::CREATED);
            if never_started {
                // The earlier worker stopped between creating the container and starting it:
                // nothing will ever start it, and the networks it was to join are unknown
                // here. It goes, and the claim is resumed from the start (a new container).
                tracing::info!(%flow_run, %container, "removing a container an earlier worker created and never started");
                if let Err(e) = force_remove(&self.docker, &container).await {
                    tracing::warn!(error = %e, %flow_run, %container, "cannot remove a container never started");
                }
                return None;
            }
            let name = inspect
                .name
                .as_deref()
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            // Events of a re-adopted container follow nothing: those before the restart are
            // the earlier worker's.
            let watch = Watch {
                docker: self.docker.clone(),
                id: container.clone(),
                keep: self.options.keep_containers
                    || inspect
                        .host_config
                        .as_ref()
                        .and_then(|h| h.auto_remove)
                        .unwrap_or(false),
                events: None,
                stream_output: false,
            };
            Some(
                Box::new(watch.start(identifier(&self.base_url, &container), name))
                    as Box<dyn Started>,
            )
        })
    }
}

/// Kubernetes' rule, which prefect-docker follows: `latest` or no tag pulls always, any other
/// tag or a digest only when missing (`DockerWorker._determine_image_pull_policy`).
fn default_policy(image: &str) -> PullPolicy {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains('@') {
        return PullPolicy::IfNotPresent;
    }
    match last.split_once(':') {
        Some((_, tag)) if tag != "latest" => PullPolicy::IfNotPresent,
        _ => PullPolicy::Always,
    }
}

/// A container ready to be created.
struct ContainerRun {
    docker: Docker,
    base_url: String,
    keep: bool,
    policy: PullPolicy,
    image: String,
    /// For the pull only (prefect-docker logs in only when it pulls, since 0.7.0).
    credentials: Option<DockerCredentials>,
    /// Networks after the first, connected before start.
    networks: Vec<String>,
    stream_output: bool,
    request: create::Create,
    events: EventContext,
}

impl ContainerRun {
    /// Pulls per the policy (`DockerWorker._pull_image`); the registry's own message is kept.
    async fn pull(&self) -> Result<(), String> {
        let present = self.docker.inspect_image(&self.image).await.is_ok();
        let pull = match self.policy {
            PullPolicy::Never => false,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Always | PullPolicy::IfPossible => true,
        };
        if !pull {
            return Ok(());
        }
        let (repo, tag) = split_tag(&self.image);
        let mut stream = self.docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(repo.to_owned()),
                tag: Some(tag.unwrap_or("latest").to_owned()),
                ..Default::default()
            }),
            None,
            self.credentials.clone(),
        );
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail {
                        failure = Some(detail.message.unwrap_or_default());
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(e) if self.policy == PullPolicy::IfPossible && present => {
                tracing::warn!(image = %self.image, error = %e, "pull failed; using the local image");
                Ok(())
            }
            Some(e) => Err(format!("Docker pull failed for {}: {e}", self.image)),
        }
    }

    fn emit(&self, event: &str, id: &str, name: &str, follows: Option<&Event>) -> Event {
        container_event(&self.events, event, id, name, follows)
    }
}

/// A `DockerRegistryCredentials` block's data (`username`, `password`, `registry_url`).
fn credentials(block: &Map) -> DockerCredentials {
    let field = |k: &str| block.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    DockerCredentials {
        username: field("username"),
        password: field("password"),
        serveraddress: field("registry_url"),
        ..Default::default()
    }
}

fn split_tag(image: &str) -> (&str, Option<&str>) {
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    if let Some(at) = image[slash..].find('@') {
        return (&image[..slash + at], Some(&image[slash + at + 1..]));
    }
    match image[slash..].rfind(':') {
        Some(colon) => (&image[..slash + colon], Some(&image[slash + colon + 1..])),
        None => (image, None),
    }
}

/// A `prefect.docker.container.*` event, related as prefect-docker relates them (the run's
/// resources, then the worker in role `worker`).
fn container_event(
    events: &EventContext,
    event: &str,
    id: &str,
    name: &str,
    follows: Option<&Event>,
) -> Event {
    let resource =
        Resource::new(format!("prefect.docker.container.{id}")).with("prefect.resource.name", name);
    let mut related = events.related.clone();
    related.push(events.worker.clone().into_related("worker"));
    let mut e = Event::new(event, resource, related);
    if let Some(previous) = follows {
        e = e.follow(previous);
    }
    e
}

impl Job for ContainerRun {
    fn launch(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Started>, String>> {
        Box::pin(async move {
            self.pull().await?;
            // A taken name gets `-1`, `-2`, … (`DockerWorker._create_container`).
            let base_name = self.request.name.clone();
            let mut attempt = 0u32;
            let created = loop {
                let name = base_name.as_ref().map(|n| {
                    if attempt == 0 {
                        n.clone()
                    } else {
                        format!("{n}-{attempt}")
                    }
                });
                match self
                    .docker
                    .create_container(
                        Some(CreateContainerOptions {
                            name: name.clone(),
                            ..Default::default()
                        }),
                        self.request.body.clone(),
                    )
                    .await
                {
                    Ok(created) => break (created.id, name),
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 409,
                        message,
                    }) if name.is_some() && message.contains("already in use") => {
                        tracing::info!(
                            "Docker container '{}' already exists; retrying...",
                            name.unwrap_or_default()
                        );
                        attempt += 1;
                    }
                    Err(e) => {
                        let failed = Event::new(
                            "prefect.docker.container.creation-failed",
                            self.events.worker.clone(),
                            self.events.related.clone(),
                        );
                        self.events.sink.emit(failed).await;
                        return Err(format!(
                            "could not create the container: {}",
                            engine_message(&e)
                        ));
                    }
                }
            };
            let (id, name) = created;
            // Only a name the Engine picked has to be asked for.
            let name = match name {
                Some(name) => name,
                None => self
                    .docker
                    .inspect_container(&id, None)
                    .await
                    .ok()
                    .and_then(|i| i.name)
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
            };
            let created_event = self.emit("prefect.docker.container.created", &id, &name, None);
            self.events.sink.emit(created_event.clone()).await;
            let started = async {
                for network in &self.networks {
                    self.docker
                        .connect_network(
                            network,
                            bollard::models::NetworkConnectRequest {
                                container: id.clone(),
                                ..Default::default()
                            },
                        )
                        .await?;
                }
                self.docker.start_container(&id, None).await
            }
            .await;
            if let Err(e) = started {
                // prefect-docker leaves it in `created`; nothing will ever start it.
                let _ = force_remove(&self.docker, &id).await;
                return Err(format!(
                    "could not start the container: {}",
                    engine_message(&e)
                ));
            }
            let running = self.emit(
                "prefect.docker.container.running",
                &id,
                &name,
                Some(&created_event),
            );
            self.events.sink.emit(running.clone()).await;
            let watch = Watch {
                docker: self.docker.clone(),
                id: id.clone(),
                keep: self.keep,
                events: Some((self.events.clone(), running)),
                stream_output: self.stream_output,
            };
            Ok(Box::new(watch.start(identifier(&self.base_url, &id), name)) as Box<dyn Started>)
        })
    }
}

/// The Engine's own words for a failed call.
/// Removes a container whatever its state (`docker rm -f`).
async fn force_remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
}

/// The Engine's own words for a failed call.
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => format!("{message} (HTTP {status_code})"),
        other => other.to_string(),
    }
}

/// How a container ended, as its watcher saw it.
#[derive(Debug, Clone)]
enum Outcome {
    Exited { code: i64, oom_killed: bool },
    Lost(String),
}

/// The watcher of one started container.
struct Watch {
    docker: Docker,
    id: String,
    keep: bool,
    /// Where `exited` goes, following `running`; `None` for a re-adopted container.
    events: Option<(EventContext, Event)>,
    stream_output: bool,
}

impl Watch {
    fn start(self, identifier: String, name: String) -> ContainerStarted {
        let (tx, rx) = watch::channel(None);
        let docker = self.docker.clone();
        let id = self.id.clone();
        if self.stream_output {
            tokio::spawn(stream_logs(self.docker.clone(), self.id.clone()));
        }
        tokio::spawn(async move {
            let outcome = self.wait().await;
            if let (Outcome::Exited { .. }, Some((events, running))) = (&outcome, &self.events) {
                let exited = container_event(
                    events,
                    "prefect.docker.container.exited",
                    &self.id,
                    &name,
                    Some(running),
                );
                events.sink.emit(exited).await;
            }
            if !self.keep {
                let _ = force_remove(&self.docker, &self.id).await;
            }
            let _ = tx.send(Some(outcome));
        });
        ContainerStarted {
            docker,
            id,
            identifier,
            outcome: rx,
            oom_killed: false,
        }
    }

    /// The exit code, riding out a dropped Engine connection for a while.
    /// Whether the Engine says the container was killed for its memory limit.
    async fn oom_killed(&self) -> bool {
        self.docker
            .inspect_container(&self.id, None)
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }

    async fn wait(&self) -> Outcome {
        let mut failures = 0;
        loop {
            let mut stream = self.docker.wait_container(
                &self.id,
                Some(WaitContainerOptions {
                    condition: "not-running".into(),
                }),
            );
            let code = match stream.next().await {
                Some(Ok(r)) => Some(r.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Some(code)
                }
                Some(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                })) => {
                    return Outcome::Lost(
                        "the container was removed before its exit code was read".into(),
                    )
                }
                Some(Err(e)) => {
                    tracing::warn!(container = %self.id, error = %e, "lost the Docker Engine while waiting for a container; retrying");
                    None
                }
                None => {
                    tracing::warn!(container = %self.id, "the Docker Engine closed the wait for a container; retrying");
                    None
                }
            };
            match code {
                Some(code) => {
                    let mut oom_killed = self.oom_killed().await;
                    // The Engine records an OOM kill when containerd's `oom` event arrives,
                    // which can come after the exit (moby `daemon/monitor.go`: `EventOOM`
                    // sets `OOMKilled` on a stopped container too): a SIGKILLed container is
                    // looked at again before it is called anything else.
                    for _ in 0..OOM_RECHECKS {
                        if oom_killed || code != 137 {
                            break;
                        }
                        tokio::time::sleep(OOM_RECHECK_EVERY).await;
                        oom_killed = self.oom_killed().await;
                    }
                    return Outcome::Exited { code, oom_killed };
                }
                None => {
                    failures += 1;
                    if failures > ENGINE_RETRIES {
                        return Outcome::Lost("the Docker Engine stopped answering".into());
                    }
                    tokio::time::sleep(ENGINE_RETRY).await;
                }
            }
        }
    }
}

/// The container's output to the worker's stdout and stderr, line by line, decoded lossily.
async fn stream_logs(docker: Docker, id: String) {
    let mut logs = docker.logs(
        &id,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(Ok(chunk)) = logs.next().await {
        let (buffer, to_stderr) = match chunk {
            bollard::container::LogOutput::StdErr { message } => {
                err.extend_from_slice(&message);
                (&mut err, true)
            }
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => {
                out.extend_from_slice(&message);
                (&mut out, false)
            }
            bollard::container::LogOutput::StdIn { .. } => continue,
        };
        if let Some(end) = buffer.iter().rposition(|b| *b == b'\n') {
            let lines: Vec<u8> = buffer.drain(..=end).collect();
            write(&lines, to_stderr).await;
        }
    }
    for (rest, to_stderr) in [(out, false), (err, true)] {
        if !rest.is_empty() {
            write(&rest, to_stderr).await;
        }
    }
}

async fn write(bytes: &[u8], to_stderr: bool) {
    let text = String::from_utf8_lossy(bytes);
    let _ = if to_stderr {
        tokio::io::stderr().write_all(text.as_bytes()).await
    } else {
        tokio::io::stdout().write_all(text.as_bytes()).await
    };
}

/// A started container.
struct ContainerStarted {
    docker: Docker,
    id: String,
    identifier: String,
    outcome: watch::Receiver<Option<Outcome>>,
    oom_killed: bool,
}

impl ContainerStarted {
    async fn outcome(&mut self) -> std::io::Result<i64> {
        let outcome = self
            .outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| std::io::Error::other("the container's watcher ended"))?
            .clone()
            .expect("some");
        match outcome {
            Outcome::Exited { code, oom_killed } => {
                self.oom_killed = oom_killed;
                Ok(code)
            }
            Outcome::Lost(why) => Err(std::io::Error::other(why)),
        }
    }
}

impl Started for ContainerStarted {
    fn identifier(&self) -> String {
        self.identifier.clone()
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(self.outcome())
    }

    /// `docker stop` with the grace (SIGTERM, or the image's stop signal, then SIGKILL), or a
    /// kill at once when hurried (`DockerWorker.kill_infrastructure`).
    fn stop(
        &mut self,
        grace: Duration,
        hurry: CancellationToken,
    ) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(async move {
            let stop = self.docker.stop_container(
                &self.id,
                Some(StopContainerOptions {
                    t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
                    ..Default::default()
                }),
            );
            tokio::select! {
                r = stop => if let Err(e) = r {
                    tracing::debug!(container = %self.id, error = %e, "docker stop");
                },
                _ = hurry.cancelled() => {
                    let _ = self.docker.kill_container(&self.id, Some(KillContainerOptions { signal: "SIGKILL".into() })).await;
                }
            }
            self.outcome().await
        })
    }

    /// `prefect flow-run execute` in the container cancels its run itself (spec: prefect-docker
    /// has no cancel of a running container but the server's cleanup after a timeout).
    fn cancels_itself(&self) -> bool {
        true
    }

    fn crashed_message(&self, code: i64) -> String {
        let message = infrastructure_crashed_message(code);
        if self.oom_killed {
            format!(
                "{message} The container was killed for exceeding its memory limit (OOMKilled)."
            )
        } else {
            message
        }
    }

    fn crash_resolution(&self, code: i64) -> Option<String> {
        Some(if self.oom_killed {
            "Raise the job's `mem_limit` (and `memswap_limit`), or make the flow use less memory."
                .to_owned()
        } else {
            exit_info(code).resolution.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_use_docker_py_base_urls() {
        assert_eq!(base_url(None), "http+docker://localhost");
        assert_eq!(
            base_url(Some("unix:///run/x.sock")),
            "http+docker://localhost"
        );
        assert_eq!(base_url(Some("ssh://me@h")), "http+docker://ssh");
    }

    #[test]
    fn pull_policy_defaults_follow_the_tag() {
        assert_eq!(default_policy("busybox"), PullPolicy::Always);
        assert_eq!(default_policy("busybox:latest"), PullPolicy::Always);
        assert_eq!(default_policy("busybox:1.36"), PullPolicy::IfNotPresent);
        assert_eq!(default_policy("localhost:5000/foo"), PullPolicy::Always);
        assert_eq!(default_policy("foo@sha256:abc"), PullPolicy::IfNotPresent);
        assert_eq!(
            split_tag("localhost:5000/foo:1"),
            ("localhost:5000/foo", Some("1"))
        );
        assert_eq!(split_tag("foo@sha256:abc"), ("foo", Some("sha256:abc")));
    }

    #[test]
    fn the_default_template_is_prefect_dockers() {
        let t: serde_json::Value = serde_json::from_str(BASE_JOB_TEMPLATE).unwrap();
        assert_eq!(t["job_configuration"]["image"], "{{ image }}");
        assert!(t["variables"]["properties"]["container_create_kwargs"].is_object());
    }
}
