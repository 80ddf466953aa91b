//! The Docker kubelet: every pod runs as containers on the local Docker Engine. This loop
//! schedules new pods and starts one worker task per pod (`pod.rs`), and passes on what
//! happens to the pod afterwards (deletion, eviction, removal). On shutdown it stops the
//! workers and removes every container the emulator created.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::engine;
use super::pod::{PodCommand, PodWorker};
use super::status;
use crate::apiserver;
use crate::kind::Kind;
use crate::meta;
use crate::shared::Shared;
use crate::store::{Change, ChangeType, Delivery, Subscription};

/// What a test asks of the Docker kubelet.
#[derive(Debug)]
pub(crate) enum KubeletCommand {
    /// Node-pressure eviction of a pod: SIGTERM, grace, then the pod is Failed/Evicted.
    Evict {
        namespace: String,
        name: String,
        message: String,
    },
}

pub(crate) struct DockerKubelet {
    shared: Arc<Shared>,
    network_host: bool,
    /// The worker of each pod, by uid.
    workers: HashMap<String, mpsc::UnboundedSender<PodCommand>>,
    /// Pods whose worker was told to terminate, by uid.
    terminating: HashSet<String>,
    tasks: JoinSet<()>,
}

impl DockerKubelet {
    pub(crate) fn new(shared: Arc<Shared>, network_host: bool) -> Self {
        Self {
            shared,
            network_host,
            workers: HashMap::new(),
            terminating: HashSet::new(),
            tasks: JoinSet::new(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut sub: Subscription,
        mut commands: mpsc::UnboundedReceiver<KubeletCommand>,
    ) {
        if let Ok(docker) = self.shared.engine.get().await {
            engine::sweep_orphans(docker).await;
        }
        for pod in std::mem::take(&mut sub.snapshot) {
            self.handle_pod(&pod, ChangeType::Added);
        }
        let shutdown = self.shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(command) = commands.recv() => self.handle_command(command),
                delivery = sub.rx.recv() => match delivery {
                    Some(Delivery::Change(change)) => self.handle_change(&change),
                    Some(Delivery::Dropped) | None => break,
                },
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        self.tasks.shutdown().await;
        if let Ok(docker) = self.shared.engine.get().await {
            engine::sweep(docker, &self.shared.id).await;
        }
    }

    fn handle_command(&mut self, command: KubeletCommand) {
        match command {
            KubeletCommand::Evict {
                namespace,
                name,
                message,
            } => {
                let uid = self.shared.store.txn(|t| {
                    t.get(Kind::Pod, &namespace, &name)
                        .map(|p| meta::uid(p).to_owned())
                });
                if let Some(worker) = uid.and_then(|u| self.workers.get(&u)) {
                    let _ = worker.send(PodCommand::Evict { message });
                }
            }
        }
    }

    fn handle_change(&mut self, change: &Change) {
        if change.change == ChangeType::Deleted {
            let uid = meta::uid(&change.object);
            self.terminating.remove(uid);
            if let Some(worker) = self.workers.remove(uid) {
                let _ = worker.send(PodCommand::Gone);
            }
            return;
        }
        self.handle_pod(&change.object, change.change);
    }

    fn handle_pod(&mut self, pod: &Value, change: ChangeType) {
        let uid = meta::uid(pod).to_owned();
        let (ns, name) = (meta::namespace(pod).to_owned(), meta::name(pod).to_owned());
        if change == ChangeType::Added
            && !status::is_terminal(pod)
            && !self.workers.contains_key(&uid)
        {
            // The scheduler's part: a pod its one node does not fit stays Pending,
            // `PodScheduled=False` (Unschedulable), until it is deleted.
            let scheduled = self.shared.store.txn(|t| {
                let mut current = t.get(Kind::Pod, &ns, &name)?.clone();
                if current.pointer("/spec/nodeName").is_none() {
                    if !status::fits_node(&current) {
                        status::unschedulable(&mut current, status::SELECTOR_MISMATCH);
                        let _ = t.put(Kind::Pod, current);
                        return None;
                    }
                    status::schedule(&mut current);
                    current = t.put(Kind::Pod, current).ok()?;
                }
                Some(current)
            });
            let Some(pod) = scheduled else {
                return;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            self.workers.insert(uid.clone(), tx);
            let worker = PodWorker::new(self.shared.clone(), &pod, self.network_host, rx);
            self.tasks.spawn(worker.run(pod));
            return;
        }
        if !meta::is_terminating(pod) || self.terminating.contains(&uid) {
            return;
        }
        match self.workers.get(&uid) {
            Some(worker) => {
                self.terminating.insert(uid);
                let grace = pod
                    .pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30);
                let _ = worker.send(PodCommand::Terminate { grace });
            }
            None => {
                self.shared
                    .store
                    .txn(|t| apiserver::finish_pod_deletion(t, &ns, &name));
            }
        }
    }
}
