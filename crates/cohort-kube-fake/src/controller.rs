//! The Job controller: makes each Job's pods, counts their outcomes into the Job's status,
//! replaces failed pods until `backoffLimit` is passed, enforces `activeDeadlineSeconds`,
//! and deletes finished Jobs after `ttlSecondsAfterFinished`.
//!
//! One task owns it. It reacts to every Job and Pod change and to its own timers, and does
//! each reconciliation inside one store transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_util::time::DelayQueue;

use crate::admission::{
    CONTROLLER_UID_LABEL, JOB_NAME_LABEL, LEGACY_CONTROLLER_UID_LABEL, LEGACY_JOB_NAME_LABEL,
};
use crate::apiserver::{self, DeleteOptions};
use crate::kind::Kind;
use crate::kubelet::status;
use crate::meta;
use crate::shared::Shared;
use crate::store::{Change, ChangeType, Delivery, Subscription, Txn};

/// What the controller remembers about a Job between reconciliations.
#[derive(Default)]
struct Tracked {
    succeeded: HashSet<String>,
    failed: HashSet<String>,
    /// When the controller started the Job (for `activeDeadlineSeconds`).
    started: Option<Instant>,
    /// When the Job finished (for `ttlSecondsAfterFinished`).
    finished: Option<Instant>,
    /// A timer is pending for this Job.
    timer: bool,
}

pub(crate) struct JobController {
    shared: Arc<Shared>,
    timers: DelayQueue<(String, String)>,
    jobs: HashMap<String, Tracked>,
}

impl JobController {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            timers: DelayQueue::new(),
            jobs: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self, mut sub: Subscription) {
        for job in std::mem::take(&mut sub.snapshot) {
            if job.get("kind").and_then(Value::as_str) == Some("Job") {
                self.reconcile(meta::namespace(&job), meta::name(&job));
            }
        }
        let shutdown = self.shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let (ns, name) = expired.into_inner();
                    self.reconcile(&ns, &name);
                }
                delivery = sub.rx.recv() => match delivery {
                    Some(Delivery::Change(change)) => self.handle_change(&change),
                    Some(Delivery::Dropped) | None => return,
                },
            }
        }
    }

    fn handle_change(&mut self, change: &Change) {
        match change.kind {
            Kind::Job => {
                if change.change == ChangeType::Deleted {
                    self.jobs.remove(meta::uid(&change.object));
                } else {
                    self.reconcile(meta::namespace(&change.object), meta::name(&change.object));
                }
            }
            Kind::Pod => {
                let pod = &change.object;
                let Some((job, job_uid)) = meta::controller_of(pod, "Job") else {
                    return;
                };
                let pod_uid = meta::uid(pod).to_owned();
                let tracked = self.jobs.entry(job_uid.to_owned()).or_default();
                // Counted from the event, not the store: the pod may be gone by now.
                match (change.change, status::phase(pod)) {
                    (_, "Succeeded") => {
                        tracked.succeeded.insert(pod_uid);
                    }
                    (_, "Failed") => {
                        tracked.failed.insert(pod_uid);
                    }
                    // A pod removed before it finished counts as failed.
                    (ChangeType::Deleted, _) if !tracked.succeeded.contains(&pod_uid) => {
                        tracked.failed.insert(pod_uid);
                    }
                    _ => {}
                }
                let (ns, job) = (meta::namespace(pod).to_owned(), job.to_owned());
                self.reconcile(&ns, &job);
            }
            _ => {}
        }
    }

    fn reconcile(&mut self, namespace: &str, name: &str) {
        let shared = self.shared.clone();
        shared.store.txn(|t| self.reconcile_in(t, namespace, name));
    }

    fn reconcile_in(&mut self, t: &mut Txn<'_>, namespace: &str, name: &str) {
        let Some(job) = t.get(Kind::Job, namespace, name).cloned() else {
            return;
        };
        // A Job being deleted is left alone: its pods are the garbage collector's now.
        if meta::is_terminating(&job) {
            return;
        }
        let uid = meta::uid(&job).to_owned();
        let spec = job.get("spec").cloned().unwrap_or_default();
        let int =
            |field: &str, default: i64| spec.get(field).and_then(Value::as_i64).unwrap_or(default);
        let completions = int("completions", 1).max(1);
        let parallelism = int("parallelism", 1).max(0);
        let backoff_limit = int("backoffLimit", 6);
        let suspended = spec.get("suspend").and_then(Value::as_bool) == Some(true);

        let pods: Vec<Value> = t
            .dependents(&uid)
            .into_iter()
            .filter(|(kind, p)| {
                *kind == Kind::Pod && meta::controller_of(p, "Job").is_some_and(|(_, u)| u == uid)
            })
            .map(|(_, p)| p)
            .collect();
        let tracked = self.jobs.entry(uid.clone()).or_default();
        for pod in &pods {
            match status::phase(pod) {
                "Succeeded" => tracked.succeeded.insert(meta::uid(pod).to_owned()),
                "Failed" => tracked.failed.insert(meta::uid(pod).to_owned()),
                _ => false,
            };
        }
        let active: Vec<&Value> = pods
            .iter()
            .filter(|p| !status::is_terminal(p) && !meta::is_terminating(p))
            .collect();
        let terminating = pods
            .iter()
            .filter(|p| !status::is_terminal(p) && meta::is_terminating(p))
            .count();
        let ready = active.iter().filter(|p| is_ready(p)).count();
        let succeeded = tracked.succeeded.len() as i64;
        let failed = tracked.failed.len() as i64;

        let old_status = job.get("status").cloned().unwrap_or(json!({}));
        let mut status = old_status.as_object().cloned().unwrap_or_default();
        let finished =
            has_condition(&old_status, "Complete") || has_condition(&old_status, "Failed");
        let now = meta::now();
        let mut to_kill: Vec<String> = Vec::new();
        let mut to_create = 0;

        if !finished && !suspended {
            if !status.contains_key("startTime") {
                status.insert("startTime".into(), json!(now));
            }
            let started = *tracked.started.get_or_insert_with(Instant::now);
            let deadline = spec
                .get("activeDeadlineSeconds")
                .and_then(Value::as_u64)
                .map(|s| started + Duration::from_secs(s));
            if succeeded >= completions {
                add_condition(
                    &mut status,
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    &now,
                );
                add_condition(
                    &mut status,
                    "Complete",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    &now,
                );
                status.insert("completionTime".into(), json!(now));
                to_kill = active.iter().map(|p| meta::name(p).to_owned()).collect();
            } else if failed > backoff_limit {
                add_condition(
                    &mut status,
                    "FailureTarget",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                    &now,
                );
                add_condition(
                    &mut status,
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                    &now,
                );
                to_kill = active.iter().map(|p| meta::name(p).to_owned()).collect();
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                add_condition(
                    &mut status,
                    "FailureTarget",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                    &now,
                );
                add_condition(
                    &mut status,
                    "Failed",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                    &now,
                );
                to_kill = active.iter().map(|p| meta::name(p).to_owned()).collect();
            } else {
                let wanted = parallelism.min(completions - succeeded);
                to_create = (wanted - active.len() as i64).max(0);
                if let Some(d) = deadline {
                    if !tracked.timer {
                        tracked.timer = true;
                        self.timers
                            .insert_at((namespace.to_owned(), name.to_owned()), d);
                    }
                }
            }
        }
        let active_count = active.len() - to_kill.len();
        let mut counts = Map::new();
        if active_count > 0 {
            counts.insert("active".into(), json!(active_count));
        }
        if succeeded > 0 {
            counts.insert("succeeded".into(), json!(succeeded));
        }
        if failed > 0 {
            counts.insert("failed".into(), json!(failed));
        }
        counts.insert("terminating".into(), json!(terminating + to_kill.len()));
        counts.insert(
            "ready".into(),
            json!(ready.saturating_sub(to_kill.len().min(ready))),
        );
        counts.insert("uncountedTerminatedPods".into(), json!({}));
        for k in ["active", "succeeded", "failed"] {
            if !counts.contains_key(k) {
                status.remove(k);
            }
        }
        status.extend(counts);
        let new_status = Value::Object(order_status(status));
        if new_status != old_status {
            let mut updated = job.clone();
            updated["status"] = new_status.clone();
            let _ = t.put(Kind::Job, updated);
        }
        for pod in to_kill {
            let _ = apiserver::delete(t, Kind::Pod, namespace, &pod, &DeleteOptions::default());
        }
        for _ in 0..to_create {
            let pod = pod_for(&job);
            if let Err(e) = apiserver::create(t, Kind::Pod, namespace, pod, false) {
                tracing::warn!(job = name, error = %e, "the Job's pod template was rejected");
            }
        }
        let done = has_condition(&new_status, "Complete") || has_condition(&new_status, "Failed");
        if done {
            self.after_finish(t, &job, namespace, name);
        }
    }

    /// Starts the `ttlSecondsAfterFinished` clock, or deletes the Job when it has run out.
    fn after_finish(&mut self, t: &mut Txn<'_>, job: &Value, namespace: &str, name: &str) {
        let Some(ttl) = job
            .pointer("/spec/ttlSecondsAfterFinished")
            .and_then(Value::as_u64)
        else {
            return;
        };
        let tracked = self.jobs.entry(meta::uid(job).to_owned()).or_default();
        let finished = *tracked.finished.get_or_insert_with(Instant::now);
        let expires = finished + Duration::from_secs(ttl);
        if Instant::now() >= expires {
            let opts = DeleteOptions {
                propagation_policy: Some(apiserver::PropagationPolicy::Background),
                ..DeleteOptions::default()
            };
            let _ = apiserver::delete(t, Kind::Job, namespace, name, &opts);
        } else {
            self.timers
                .insert_at((namespace.to_owned(), name.to_owned()), expires);
        }
    }
}

/// A pod for the Job, from its template: named `<job>-<5 chars>`, with the Job's labels and
/// a controlling owner reference.
fn pod_for(job: &Value) -> Value {
    let name = meta::name(job);
    let uid = meta::uid(job);
    let template = job.pointer("/spec/template").cloned().unwrap_or_default();
    let mut metadata = template
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    metadata.remove("name");
    metadata.remove("namespace");
    metadata.insert("generateName".into(), json!(format!("{name}-")));
    let labels = metadata.entry("labels").or_insert(json!({}));
    if let Some(labels) = labels.as_object_mut() {
        labels.insert(CONTROLLER_UID_LABEL.into(), json!(uid));
        labels.insert(JOB_NAME_LABEL.into(), json!(name));
        labels.insert(LEGACY_CONTROLLER_UID_LABEL.into(), json!(uid));
        labels.insert(LEGACY_JOB_NAME_LABEL.into(), json!(name));
    }
    metadata.insert(
        "ownerReferences".into(),
        json!([{
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": name,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }]),
    );
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": Value::Object(metadata),
        "spec": template.get("spec").cloned().unwrap_or_default(),
    })
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type") == Some(&json!("Ready")) && c.get("status") == Some(&json!("True"))
            })
        })
}

fn has_condition(status: &Value, kind: &str) -> bool {
    status
        .get("conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type") == Some(&json!(kind)) && c.get("status") == Some(&json!("True"))
            })
        })
}

fn add_condition(
    status: &mut Map<String, Value>,
    kind: &str,
    reason: &str,
    message: &str,
    now: &str,
) {
    let list = status.entry("conditions").or_insert(json!([]));
    if let Some(list) = list.as_array_mut() {
        list.push(json!({
            "type": kind,
            "status": "True",
            "lastProbeTime": now,
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        }));
    }
}

/// Job status keys in the order the apiserver writes them.
fn order_status(mut status: Map<String, Value>) -> Map<String, Value> {
    const ORDER: [&str; 10] = [
        "conditions",
        "startTime",
        "completionTime",
        "active",
        "succeeded",
        "failed",
        "terminating",
        "uncountedTerminatedPods",
        "ready",
        "completedIndexes",
    ];
    let mut out = Map::new();
    for k in ORDER {
        if let Some(v) = status.remove(k) {
            out.insert(k.into(), v);
        }
    }
    out.extend(status);
    out
}
