//! The node: what happens to pods after they are created. Either the test drives every pod
//! through its states ([`Kubelet::Scripted`]) or each pod runs as containers on the local
//! Docker Engine ([`Kubelet::Docker`]). Both write the same status shapes
//! (`status.rs`) and both finish the deletion of terminating pods.

pub(crate) mod logs;
mod scripted;
pub(crate) mod status;

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
    }
}
