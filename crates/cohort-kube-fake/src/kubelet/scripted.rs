//! The scripted kubelet: pods change only when the test says so, except that it (optionally)
//! schedules new pods and it finishes the deletion of terminating pods, at once when nothing
//! runs and after the grace period when something does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::time::DelayQueue;

use super::status::{self, ContainerState};
use crate::apiserver;
use crate::kind::Kind;
use crate::meta;
use crate::shared::Shared;
use crate::store::{Change, ChangeType, Delivery, Subscription};

pub(crate) struct ScriptedKubelet {
    shared: Arc<Shared>,
    auto_schedule: bool,
    /// Grace periods running out: (namespace, name, uid).
    kills: DelayQueue<(String, String, String)>,
    /// Pods with a grace period running, by uid.
    killing: HashSet<String>,
}

impl ScriptedKubelet {
    pub(crate) fn new(shared: Arc<Shared>, auto_schedule: bool) -> Self {
        Self {
            shared,
            auto_schedule,
            kills: DelayQueue::new(),
            killing: HashSet::new(),
        }
    }

    pub(crate) async fn run(mut self, mut sub: Subscription) {
        for pod in std::mem::take(&mut sub.snapshot) {
            self.handle_pod(&pod, ChangeType::Added);
        }
        let shutdown = self.shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(expired) = self.kills.next(), if !self.kills.is_empty() => {
                    let (ns, name, uid) = expired.into_inner();
                    self.handle_grace_over(&ns, &name, &uid);
                }
                delivery = sub.rx.recv() => match delivery {
                    Some(Delivery::Change(change)) => self.handle_change(&change),
                    Some(Delivery::Dropped) | None => return,
                },
            }
        }
    }

    fn handle_change(&mut self, change: &Change) {
        if change.change == ChangeType::Deleted {
            self.killing.remove(meta::uid(&change.object));
            return;
        }
        self.handle_pod(&change.object, change.change);
    }

    fn handle_pod(&mut self, pod: &Value, change: ChangeType) {
        let (ns, name) = (meta::namespace(pod).to_owned(), meta::name(pod).to_owned());
        if change == ChangeType::Added
            && self.auto_schedule
            && pod.pointer("/spec/nodeName").is_none()
        {
            self.shared.store.txn(|t| {
                if let Some(mut current) = t.get(Kind::Pod, &ns, &name).cloned() {
                    status::schedule(&mut current);
                    let _ = t.put(Kind::Pod, current);
                }
            });
            return;
        }
        if !meta::is_terminating(pod) {
            return;
        }
        if status::is_terminal(pod) || !status::any_running(pod) {
            self.shared
                .store
                .txn(|t| apiserver::finish_pod_deletion(t, &ns, &name));
            return;
        }
        let uid = meta::uid(pod).to_owned();
        if self.killing.insert(uid.clone()) {
            let grace = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            self.kills
                .insert((ns, name, uid), Duration::from_secs(grace));
        }
    }

    /// The grace period is over and the containers still run: they are killed (137).
    fn handle_grace_over(&mut self, ns: &str, name: &str, uid: &str) {
        self.killing.remove(uid);
        self.shared.store.txn(|t| {
            let Some(mut pod) = t.get(Kind::Pod, ns, name).cloned() else {
                return;
            };
            if meta::uid(&pod) != uid {
                return;
            }
            let now = meta::now();
            for s in status::container_statuses(&pod) {
                let Some(started) = s
                    .pointer("/state/running/startedAt")
                    .and_then(Value::as_str)
                else {
                    continue;
                };
                let killed = ContainerState::Terminated {
                    exit_code: 137,
                    reason: "Error".into(),
                    message: None,
                    started_at: started.to_owned(),
                    finished_at: now.clone(),
                };
                let container = s
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                status::set_container(&mut pod, Some(&container), &killed, None);
            }
            let _ = t.put(Kind::Pod, pod);
            apiserver::finish_pod_deletion(t, ns, name);
        });
    }
}
