//! The node: what happens to pods after they are created. Either the test drives every pod
//! through its states ([`Kubelet::Scripted`]) or each pod runs as containers on the local
//! Docker Engine ([`Kubelet::Docker`]). Both write the same status shapes
//! (`status.rs`) and both finish the deletion of terminating pods.

mod docker;
pub(crate) mod engine;
mod env;
pub(crate) mod logs;
mod pod;
mod scripted;
pub(crate) mod status;

pub(crate) use docker::KubeletCommand;

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::kind::Kind;
use crate::shared::Shared;
use crate::store::Start;

/// How pods run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kubelet {
    /// Pods stay Pending, with no status beyond the phase, until the test scripts them with
    /// [`crate::Emulator::pod_running`] and friends. With `auto_schedule`, new pods are bound
    /// to the node at once (`spec.nodeName`, `PodScheduled=True`).
    ///
    /// A terminating pod whose containers are running is kept until the test makes them exit
    /// or its grace period runs out (then its containers are "killed", exit code 137).
    Scripted {
        /// Bind new pods to the node at once.
        auto_schedule: bool,
    },
    /// Every pod runs as containers on the local Docker Engine (`DOCKER_HOST` or the local
    /// socket), labelled with the emulator's id and removed when the pod is gone, on
    /// [`crate::Emulator::shutdown`], and when the emulator is dropped. An emulator held
    /// until its process exits (in a `static`) is never dropped: its containers are removed
    /// by the next Docker kubelet that starts, which sweeps containers of dead processes. Images are never
    /// pulled: an image the Engine does not have (or `imagePullPolicy: Always`) leaves the
    /// pod Pending in `ErrImagePull`, then `ImagePullBackOff`.
    Docker {
        /// Run containers in the host's network namespace, so that a server on 127.0.0.1
        /// (such as the tests' Prefect server) is reachable from them.
        network_host: bool,
    },
}

impl Default for Kubelet {
    fn default() -> Self {
        Kubelet::Scripted {
            auto_schedule: false,
        }
    }
}

/// Starts the kubelet's task.
pub(crate) fn spawn(shared: &Arc<Shared>) -> JoinHandle<()> {
    // Subscribed before the task starts so that no pod created meanwhile is missed.
    let sub = shared
        .store
        .subscribe(&[Kind::Pod], Start::Now, false)
        .expect("a feed from now always starts");
    match shared.config.kubelet {
        Kubelet::Scripted { auto_schedule } => {
            tokio::spawn(scripted::ScriptedKubelet::new(shared.clone(), auto_schedule).run(sub))
        }
        Kubelet::Docker { network_host } => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let _ = shared.kubelet_commands.set(tx);
            tokio::spawn(docker::DockerKubelet::new(shared.clone(), network_host).run(sub, rx))
        }
    }
}
