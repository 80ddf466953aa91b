//! One pod on the Docker Engine, from `ContainerCreating` to removal. The worker owns the
//! pod's containers: it checks images (never pulling: no registry is reachable), builds each
//! container from the pod spec, starts them, reports their states, stops them on deletion or
//! eviction (SIGTERM, then SIGKILL after the grace period) and removes them when the pod is
//! gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::engine::{self, CONTAINER_LABEL, EMULATOR_LABEL, PID_LABEL, POD_LABEL, POD_UID_LABEL};
use super::env;
use super::status::{self, ContainerState};
use crate::apiserver;
use crate::kind::Kind;
use crate::meta;
use crate::quantity;
use crate::shared::Shared;

/// How often, and how far apart, a container that exited 137 without `OOMKilled` is
/// inspected again.
const OOM_RECHECKS: u32 = 4;
const OOM_RECHECK_EVERY: Duration = Duration::from_millis(500);

/// What the kubelet loop tells a pod's worker.
#[derive(Debug)]
pub(crate) enum PodCommand {
    /// The pod is being deleted: stop the containers with this grace period.
    Terminate { grace: i64 },
    /// Node-pressure eviction: stop the containers, then mark the pod Evicted.
    Evict { message: String },
    /// The pod is gone from the store: remove the containers now.
    Gone,
}

/// Why a container cannot be started: the waiting reason and message the kubelet reports.
struct Stuck {
    reason: &'static str,
    message: String,
    /// The image, when the kubelet would keep retrying the pull (and back off).
    pull: Option<String>,
}

pub(crate) struct PodWorker {
    shared: Arc<Shared>,
    namespace: String,
    name: String,
    uid: String,
    network_host: bool,
    commands: mpsc::UnboundedReceiver<PodCommand>,
    /// Every container created for the pod, to remove at the end.
    created: Vec<String>,
}

impl PodWorker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        pod: &Value,
        network_host: bool,
        commands: mpsc::UnboundedReceiver<PodCommand>,
    ) -> Self {
        Self {
            shared,
            namespace: meta::namespace(pod).to_owned(),
            name: meta::name(pod).to_owned(),
            uid: meta::uid(pod).to_owned(),
            network_host,
            commands,
            created: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self, pod: Value) {
        let shared = self.shared.clone();
        let docker = match shared.engine.get().await {
            Ok(d) => d.clone(),
            Err(message) => {
                self.set(None, &waiting("RunContainerError", Some(message)), None);
                self.idle(None).await;
                return;
            }
        };
        self.set(None, &waiting("ContainerCreating", None), None);
        let containers = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut configs = Vec::new();
        for c in &containers {
            let cname = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            match self.prepare(&docker, &pod, c).await {
                Ok(config) => configs.push((cname, config)),
                Err(stuck) => {
                    self.report_stuck(&cname, stuck).await;
                    return;
                }
            }
        }
        let mut running = Vec::new();
        for (cname, config) in configs {
            if let Some(id) = self.start(&docker, &cname, config).await {
                running.push((cname, id));
            }
        }
        self.supervise(&docker, running).await;
    }

    /// The image check and the container's configuration.
    async fn prepare(
        &self,
        docker: &Docker,
        pod: &Value,
        c: &Value,
    ) -> Result<ContainerCreateBody, Stuck> {
        let image = c
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let policy = c
            .get("imagePullPolicy")
            .and_then(Value::as_str)
            .unwrap_or("IfNotPresent");
        let present = docker.inspect_image(&image).await.is_ok();
        match (policy, present) {
            ("Never", false) => {
                return Err(Stuck {
                    reason: "ErrImageNeverPull",
                    message: format!(
                        "Container image \"{image}\" is not present with pull policy of Never"
                    ),
                    pull: None,
                })
            }
            ("Never", true) => {}
            // No registry is reachable, so any pull fails.
            ("Always", _) | (_, false) => {
                return Err(Stuck {
                    reason: "ErrImagePull",
                    message: pull_error(&image),
                    pull: Some(image),
                })
            }
            _ => {}
        }
        let env = self
            .shared
            .store
            .txn(|t| env::container_env(t, pod, c))
            .map_err(|e| Stuck {
                reason: "CreateContainerConfigError",
                message: e.0,
                pull: None,
            })?;
        Ok(self.container_config(pod, c, image, env))
    }

    /// The container as Kubernetes would run it: `command` replaces the image's entrypoint,
    /// `args` its command; the memory limit (with swap equal to it, so no swapping) and CPU
    /// limit; the pod name as hostname unless it shares the host's network.
    fn container_config(
        &self,
        pod: &Value,
        c: &Value,
        image: String,
        env: Vec<(String, String)>,
    ) -> ContainerCreateBody {
        let strings = |field: &str| {
            c.get(field).and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
        };
        let command = strings("command");
        let mut args = strings("args");
        if command.is_some() && args.is_none() {
            // Kubernetes: a command without args ignores the image's CMD.
            args = Some(Vec::new());
        }
        let memory = c
            .pointer("/resources/limits/memory")
            .and_then(Value::as_str)
            .and_then(|q| quantity::parse_bytes(q).ok());
        let nano_cpus = c
            .pointer("/resources/limits/cpu")
            .and_then(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .or_else(|| v.as_f64().map(|f| f.to_string()))
            })
            .and_then(|q| quantity::parse_cores(&q).ok())
            .map(|cores| (cores * 1e9) as i64);
        let cname = c.get("name").and_then(Value::as_str).unwrap_or("");
        let labels = HashMap::from([
            (EMULATOR_LABEL.to_owned(), self.shared.id.clone()),
            (POD_UID_LABEL.to_owned(), self.uid.clone()),
            (
                POD_LABEL.to_owned(),
                format!("{}/{}", self.namespace, self.name),
            ),
            (CONTAINER_LABEL.to_owned(), cname.to_owned()),
            (PID_LABEL.to_owned(), std::process::id().to_string()),
        ]);
        ContainerCreateBody {
            image: Some(image),
            entrypoint: command,
            cmd: args,
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: c
                .get("workingDir")
                .and_then(Value::as_str)
                .map(str::to_owned),
            hostname: (!self.network_host).then(|| meta::name(pod).chars().take(63).collect()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                memory,
                memory_swap: memory,
                nano_cpus,
                network_mode: self.network_host.then(|| "host".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Creates and starts a container; its id when it runs.
    async fn start(
        &mut self,
        docker: &Docker,
        cname: &str,
        config: ContainerCreateBody,
    ) -> Option<String> {
        // The name dockershim used to give pod containers.
        let container_name = format!(
            "k8s_{cname}_{}_{}_{}_0",
            self.name, self.namespace, self.uid
        );
        let created = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(container_name),
                    ..Default::default()
                }),
                config,
            )
            .await;
        let id = match created {
            Ok(r) => r.id,
            Err(e) => {
                self.set_start_error(cname, &e.to_string());
                return None;
            }
        };
        self.created.push(id.clone());
        let runtime_id = format!("docker://{id}");
        if let Err(e) = docker.start_container(&id, None).await {
            self.set(
                Some(cname),
                &ContainerState::Terminated {
                    exit_code: 128,
                    reason: "StartError".into(),
                    message: Some(engine_message(&e)),
                    started_at: "1970-01-01T00:00:00Z".into(),
                    finished_at: meta::now(),
                },
                Some(&runtime_id),
            );
            return None;
        }
        let started_at = docker
            .inspect_container(&id, None)
            .await
            .ok()
            .and_then(|i| i.state?.started_at)
            .and_then(|t| meta::parse_timestamp(&t))
            .map_or_else(meta::now, meta::timestamp);
        self.set(
            Some(cname),
            &ContainerState::Running { started_at },
            Some(&runtime_id),
        );
        Some(id)
    }

    fn set_start_error(&self, cname: &str, message: &str) {
        self.set(
            Some(cname),
            &waiting("CreateContainerError", Some(message.to_owned())),
            None,
        );
    }

    /// Waits for the running containers to exit, stopping them on deletion or eviction, then
    /// keeps them (their logs stay readable) until the pod is gone.
    async fn supervise(&mut self, docker: &Docker, running: Vec<(String, String)>) {
        let mut exits: FuturesUnordered<_> = running
            .iter()
            .map(|(cname, id)| wait_exit(docker.clone(), cname.clone(), id.clone()))
            .collect();
        let mut stops = JoinSet::new();
        let mut evicted: Option<String> = None;
        let grace_default = self
            .shared
            .store
            .txn(|t| {
                t.get(Kind::Pod, &self.namespace, &self.name)
                    .and_then(|p| p.pointer("/spec/terminationGracePeriodSeconds")?.as_i64())
            })
            .unwrap_or(30);
        while !exits.is_empty() {
            tokio::select! {
                Some((cname, id)) = exits.next() => self.record_exit(docker, &cname, &id).await,
                Some(_) = stops.join_next(), if !stops.is_empty() => {}
                command = self.commands.recv() => match command {
                    Some(PodCommand::Terminate { grace }) => {
                        for (_, id) in &running {
                            stops.spawn(stop(docker.clone(), id.clone(), grace));
                        }
                    }
                    Some(PodCommand::Evict { message }) => {
                        evicted = Some(message);
                        for (_, id) in &running {
                            stops.spawn(stop(docker.clone(), id.clone(), grace_default));
                        }
                    }
                    Some(PodCommand::Gone) | None => {
                        self.remove_containers(docker).await;
                        return;
                    }
                },
            }
        }
        if let Some(message) = evicted {
            self.update(|p| status::evicted(p, &message));
        }
        self.idle(Some(docker)).await;
    }

    /// Reads a container's end from the Engine and reports it.
    async fn record_exit(&self, docker: &Docker, cname: &str, id: &str) {
        let inspect = || async {
            docker
                .inspect_container(id, None)
                .await
                .ok()
                .and_then(|i| i.state)
        };
        let mut state = inspect().await;
        // The Engine records an OOM kill from containerd's OOM event, which can come after
        // the exit (moby `daemon/monitor.go`): a SIGKILLed container is looked at again
        // before it is called anything else, as the kubelet's cgroup OOM check would.
        for _ in 0..OOM_RECHECKS {
            match &state {
                Some(s) if s.exit_code == Some(137) && s.oom_killed != Some(true) => {
                    tokio::time::sleep(OOM_RECHECK_EVERY).await;
                    state = inspect().await;
                }
                _ => break,
            }
        }
        let terminated = match state {
            Some(s) => {
                let exit_code = s.exit_code.unwrap_or(-1);
                let reason = if s.oom_killed == Some(true) {
                    "OOMKilled"
                } else if exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                let time = |t: Option<String>| {
                    t.and_then(|t| meta::parse_timestamp(&t))
                        .map_or_else(meta::now, meta::timestamp)
                };
                ContainerState::Terminated {
                    exit_code,
                    reason: reason.into(),
                    message: None,
                    started_at: time(s.started_at),
                    finished_at: time(s.finished_at),
                }
            }
            None => ContainerState::Terminated {
                exit_code: 137,
                reason: "ContainerStatusUnknown".into(),
                message: Some(
                    "The container could not be located when the pod was terminated".into(),
                ),
                started_at: meta::now(),
                finished_at: meta::now(),
            },
        };
        self.set(Some(cname), &terminated, None);
    }

    /// A container that cannot start: the pod stays Pending with the reason. An image pull
    /// failure turns into `ImagePullBackOff` after the first retry, as the kubelet reports it.
    async fn report_stuck(&mut self, cname: &str, stuck: Stuck) {
        self.set(
            Some(cname),
            &waiting(stuck.reason, Some(stuck.message.clone())),
            None,
        );
        if let Some(image) = stuck.pull {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let message = format!("Back-off pulling image \"{image}\": ErrImagePull: {}", stuck.message);
                    self.set(Some(cname), &waiting("ImagePullBackOff", Some(message)), None);
                }
                command = self.commands.recv() => {
                    if self.handle_idle(command).await {
                        return;
                    }
                }
            }
        }
        self.idle(None).await;
    }

    /// Nothing runs: waits for the pod's deletion, finishing it, and removes the containers
    /// once the pod is gone.
    async fn idle(&mut self, docker: Option<&Docker>) {
        loop {
            let command = self.commands.recv().await;
            if self.handle_idle(command).await {
                if let Some(docker) = docker {
                    self.remove_containers(docker).await;
                }
                return;
            }
        }
    }

    /// Handles a command while nothing runs; true once the pod is gone.
    async fn handle_idle(&mut self, command: Option<PodCommand>) -> bool {
        match command {
            Some(PodCommand::Terminate { .. }) => {
                self.shared
                    .store
                    .txn(|t| apiserver::finish_pod_deletion(t, &self.namespace, &self.name));
                false
            }
            Some(PodCommand::Evict { message }) => {
                self.update(|p| status::evicted(p, &message));
                false
            }
            Some(PodCommand::Gone) | None => {
                if !self.created.is_empty() {
                    if let Ok(docker) = self.shared.engine.get().await {
                        let docker = docker.clone();
                        self.remove_containers(&docker).await;
                    }
                }
                true
            }
        }
    }

    async fn remove_containers(&mut self, docker: &Docker) {
        for id in std::mem::take(&mut self.created) {
            engine::remove(docker, &id).await;
        }
    }

    /// Sets container states in the stored pod.
    fn set(&self, container: Option<&str>, state: &ContainerState, id: Option<&str>) {
        self.update(|p| status::set_container(p, container, state, id));
    }

    /// Applies `f` to the stored pod (if it is still this pod). A terminating pod that has
    /// just finished is removed: the kubelet's last step of a deletion.
    fn update(&self, f: impl FnOnce(&mut Value)) {
        self.shared.store.txn(|t| {
            let Some(mut pod) = t.get(Kind::Pod, &self.namespace, &self.name).cloned() else {
                return;
            };
            if meta::uid(&pod) != self.uid {
                return;
            }
            f(&mut pod);
            let Ok(stored) = t.put(Kind::Pod, pod) else {
                return;
            };
            if meta::is_terminating(&stored) && status::is_terminal(&stored) {
                apiserver::finish_pod_deletion(t, &self.namespace, &self.name);
            }
        });
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState::Waiting {
        reason: reason.into(),
        message,
    }
}

/// Waits until a container is no longer running.
async fn wait_exit(docker: Docker, cname: String, id: String) -> (String, String) {
    let mut wait = docker.wait_container(
        &id,
        Some(WaitContainerOptions {
            condition: "not-running".into(),
        }),
    );
    // Any answer (including the error bollard makes of a non-zero exit) means it stopped;
    // the exit code is read by inspecting the container.
    let _ = wait.next().await;
    (cname, id)
}

/// `docker stop -t <grace>`: SIGTERM, then SIGKILL after the grace period.
async fn stop(docker: Docker, id: String, grace: i64) {
    let _ = docker
        .stop_container(
            &id,
            Some(StopContainerOptions {
                t: Some(i32::try_from(grace).unwrap_or(i32::MAX)),
                signal: None,
            }),
        )
        .await;
}

/// The Engine's own message for a failed call.
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The message containerd gives when a pull fails because no registry can be reached.
fn pull_error(image: &str) -> String {
    let reference = normalize(image);
    let (registry, rest) = reference
        .split_once('/')
        .unwrap_or(("docker.io", &reference));
    let host = if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    };
    let (repo, tag) = match rest.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (rest, "latest"),
    };
    format!(
        "failed to pull and unpack image \"{reference}\": failed to resolve reference \"{reference}\": \
         failed to do request: Head \"https://{host}/v2/{repo}/manifests/{tag}\": dial tcp: lookup {host}: no such host"
    )
}

/// A fully qualified image reference (`busybox` → `docker.io/library/busybox:latest`).
fn normalize(image: &str) -> String {
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n.to_owned(), format!(":{t}")),
        _ if image.contains('@') => (image.to_owned(), String::new()),
        _ => (image.to_owned(), ":latest".to_owned()),
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let name = if has_registry {
        name
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{name}{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized_like_containerd() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            normalize("cohort-test/busybox:abc"),
            "docker.io/cohort-test/busybox:abc"
        );
        assert_eq!(normalize("localhost:5000/x:1"), "localhost:5000/x:1");
        assert_eq!(normalize("ghcr.io/a/b"), "ghcr.io/a/b:latest");
        assert!(pull_error("nope:1")
            .contains("Head \"https://registry-1.docker.io/v2/library/nope/manifests/1\""));
    }
}
