//! The connection to the local Docker Engine, made on first use (the API version has to be
//! negotiated, which needs a request), and the sweep that removes every container an
//! emulator created.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use bollard::Docker;
use tokio::sync::OnceCell;

/// The label every container gets, with the emulator's id.
pub const EMULATOR_LABEL: &str = "cohort-kube-fake.emulator";
/// The label with the pod's uid.
pub const POD_UID_LABEL: &str = "cohort-kube-fake.pod-uid";
/// The label with the pod's namespace and name (`ns/name`).
pub const POD_LABEL: &str = "cohort-kube-fake.pod";
/// The label with the container's name in the pod spec.
pub const CONTAINER_LABEL: &str = "cohort-kube-fake.container";
/// The label with the id of the process that ran the emulator, so that containers left by a
/// process that died without cleaning up can be recognised.
pub const PID_LABEL: &str = "cohort-kube-fake.pid";

/// A lazily connected Docker client.
#[derive(Debug, Default)]
pub(crate) struct Engine {
    docker: OnceCell<Result<Docker, String>>,
}

impl Engine {
    /// The client, connecting (to `DOCKER_HOST` or the local socket) on first use. The error
    /// says why the Engine cannot be reached; it is not retried.
    pub async fn get(&self) -> Result<&Docker, String> {
        self.docker
            .get_or_init(connect)
            .await
            .as_ref()
            .map_err(Clone::clone)
    }
}

async fn connect() -> Result<Docker, String> {
    let unreachable = |e: bollard::errors::Error| format!("cannot reach the Docker Engine: {e}");
    let docker = Docker::connect_with_defaults().map_err(unreachable)?;
    let docker = docker.negotiate_version().await.map_err(unreachable)?;
    docker.ping().await.map_err(unreachable)?;
    Ok(docker)
}

/// Removes (forcibly) every container labelled with this emulator's id, several times over
/// a short while: a create that was in flight when the emulator stopped can still land.
pub(crate) async fn sweep(docker: &Docker, emulator_id: &str) {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{EMULATOR_LABEL}={emulator_id}")],
    )]);
    let mut quiet_rounds = 0;
    for _ in 0..20 {
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .unwrap_or_default();
        if listed.is_empty() {
            quiet_rounds += 1;
            if quiet_rounds == 2 {
                return;
            }
        } else {
            quiet_rounds = 0;
        }
        for c in listed {
            if let Some(id) = c.id {
                remove(docker, &id).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Removes the containers of emulators whose process is gone (killed, or exited without
/// dropping its emulator). Only where `/proc` shows which processes run.
pub(crate) async fn sweep_orphans(docker: &Docker) {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let filters = HashMap::from([("label".to_owned(), vec![PID_LABEL.to_owned()])]);
    let listed = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default();
    for c in listed {
        let pid = c.labels.as_ref().and_then(|l| l.get(PID_LABEL)).cloned();
        let gone = pid.is_some_and(|pid| !proc.join(pid).exists());
        if let (true, Some(id)) = (gone, c.id) {
            remove(docker, &id).await;
        }
    }
}

/// Removes one container, stopping it first if needed.
pub(crate) async fn remove(docker: &Docker, id: &str) {
    let _ = docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await;
}

/// Runs [`sweep`] on a runtime of its own and waits for it: for the emulator's `Drop`, which
/// cannot await and may run while the caller's runtime is shutting down.
pub(crate) fn sweep_blocking(emulator_id: String) {
    let worker = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if let Ok(docker) = connect().await {
                sweep(&docker, &emulator_id).await;
            }
        });
    });
    let _ = worker.join();
}
