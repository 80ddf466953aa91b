//! One observer per cluster and namespace: two label-selected watches (Jobs and Pods carrying
//! `prefect.io/flow-run-id`, selected by the API server, never a cluster-wide list) whose
//! objects are sorted into a [`RunView`] per flow run, which each run's supervisor follows.
//! It also emits the `prefect.kubernetes.pod.*` events of the runs this worker supervises.
//!
//! Watches resume from their last resourceVersion and re-list after a 410, with kube-runtime's
//! backoff between errors: a watch error is logged and waited out, and never ends a
//! supervision (Prefect's legacy worker crashed runs on its own watch errors, #7854, #16283).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use cohort_events::{Event, EventSink};
use cohort_infra::RunReporter;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event as Watched};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use crate::pod::{pod_event_and_diagnosis, Seen};
use crate::FLOW_RUN_ID_LABEL;

/// Everything the cluster shows of one flow run: its Jobs and their pods, and the last state of
/// those deleted meanwhile (a deleted pod's exit code still tells how the run ended).
#[derive(Debug, Clone, Default)]
pub struct RunView {
    pub jobs: BTreeMap<String, Job>,
    pub deleted_jobs: BTreeMap<String, Job>,
    pub pods: BTreeMap<String, Pod>,
    pub deleted_pods: BTreeMap<String, Pod>,
}

impl RunView {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.pods.is_empty()
    }
}

/// Where a supervised run's pod events and reports go.
pub struct PodEvents {
    pub sink: Arc<dyn EventSink>,
    pub reporter: Arc<dyn RunReporter>,
    pub prefect_version: String,
}

/// The observer's logger in the run's logs (`flow_run_logger(...).getChild("observer")`).
pub(crate) const OBSERVER_LOGGER: &str = "prefect.flow_runs.observer";

#[derive(Default)]
struct Registry {
    views: HashMap<Uuid, watch::Sender<RunView>>,
    /// Runs this worker supervises: their pod events are ours to emit.
    supervised: HashMap<Uuid, Supervised>,
}

impl Registry {
    /// A supervision starts afresh: a run launched again (rescheduled by its engine) is not
    /// let go with its earlier Job.
    fn supervise(&mut self, flow_run: Uuid, events: Arc<PodEvents>) {
        self.supervised.insert(
            flow_run,
            Supervised {
                events,
                last: HashMap::new(),
                diagnosed: HashMap::new(),
                pending_proposed: false,
                released: None,
            },
        );
    }

    /// Sends `run`'s event for `pod` as `seen`, when the run is supervised here, with the
    /// observer's reports (`InfrastructurePending`, diagnosis log lines) it calls for.
    fn emit_pod_event(&mut self, run: Uuid, pod: &Pod, seen: Seen) {
        let Some(supervised) = self.supervised.get_mut(&run) else {
            return;
        };
        let Some((mut event, diagnosis)) =
            pod_event_and_diagnosis(pod, seen, &supervised.events.prefect_version, Utc::now())
        else {
            return;
        };
        let uid = pod.meta().uid.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        if seen != Seen::Deleted
            && !supervised.pending_proposed
            && status.and_then(|s| s.phase.as_deref()) == Some("Pending")
        {
            supervised.pending_proposed = true;
            tokio::spawn(
                supervised
                    .events
                    .reporter
                    .propose_pending("InfrastructurePending", "Kubernetes pod is pending."),
            );
        }
        match diagnosis {
            Some(d) => {
                let key = (d.category.to_owned(), d.detail.clone());
                if supervised.diagnosed.get(&uid) != Some(&key) {
                    supervised.diagnosed.insert(uid.clone(), key);
                    tokio::spawn(supervised.events.reporter.log(
                        OBSERVER_LOGGER,
                        d.level.python_level(),
                        vec![d.log_line()],
                    ));
                }
            }
            None => {
                supervised.diagnosed.remove(&uid);
            }
        }
        if let Some(previous) = supervised.last.get(&uid) {
            if previous.id == event.id {
                return;
            }
            event = event.follow(previous);
        }
        supervised.last.insert(uid, event.clone());
        let emitted = supervised.events.sink.emit(event);
        tokio::spawn(emitted);
    }
}

struct Supervised {
    events: Arc<PodEvents>,
    /// The last event per pod uid: a change that does not change the event's id (its phase,
    /// restarts or diagnosis) is not sent again, and the next one follows it.
    last: HashMap<String, Event>,
    /// The last diagnosis logged per pod uid: a line is written when it changes.
    diagnosed: HashMap<String, (String, String)>,
    /// `InfrastructurePending` was proposed (once per run).
    pending_proposed: bool,
    /// When its supervisor let go: the news of its last pod changes may still be on the way
    /// (the Job's end and its pod's come on separate watches), so its events are still sent
    /// for a while.
    released: Option<Instant>,
}

/// How long a run's pod events are still sent after its supervisor let go.
const RELEASE_LINGER: Duration = Duration::from_secs(30);
/// How often released runs and views of runs gone from the cluster are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The watches of one namespace.
pub struct Observer {
    registry: Arc<Mutex<Registry>>,
    /// Both watches have listed once: a run missing from the views is not in the cluster.
    synced: watch::Receiver<bool>,
    _stop: DropGuard,
}

impl Observer {
    /// Starts watching `namespace` (the watches live as long as the observer).
    pub fn start(client: Client, namespace: &str) -> Self {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let stop = CancellationToken::new();
        let (synced_tx, synced) = watch::channel(false);
        let config = watcher::Config::default().labels(FLOW_RUN_ID_LABEL);
        let jobs = watcher::watcher(
            Api::<Job>::namespaced(client.clone(), namespace),
            config.clone(),
        )
        .default_backoff();
        let pods =
            watcher::watcher(Api::<Pod>::namespaced(client, namespace), config).default_backoff();
        let task = ObserverTask {
            registry: registry.clone(),
            namespace: namespace.to_owned(),
            synced: synced_tx,
            listing_jobs: HashMap::new(),
            listing_pods: HashMap::new(),
            jobs_synced: false,
            pods_synced: false,
        };
        tokio::spawn(task.run(jobs, pods, stop.clone()));
        Self {
            registry,
            synced,
            _stop: stop.drop_guard(),
        }
    }

    /// Follows `flow_run`'s view; with `events`, its pods' events are emitted from now on,
    /// until the [`Following`] is dropped.
    pub fn follow(self: &Arc<Self>, flow_run: Uuid, events: Option<Arc<PodEvents>>) -> Following {
        let view = self.subscribe(flow_run, events);
        Following {
            flow_run,
            observer: self.clone(),
            view,
        }
    }

    fn subscribe(
        &self,
        flow_run: Uuid,
        events: Option<Arc<PodEvents>>,
    ) -> watch::Receiver<RunView> {
        let mut registry = self.registry.lock().expect("registry lock poisoned");
        if let Some(events) = events {
            registry.supervise(flow_run, events);
        }
        registry
            .views
            .entry(flow_run)
            .or_insert_with(|| watch::channel(RunView::default()).0)
            .subscribe()
    }

    /// Stops emitting `flow_run`'s pod events (its story is told) once the news of its last
    /// pod changes has had time to arrive.
    fn release(&self, flow_run: Uuid) {
        let mut registry = self.registry.lock().expect("registry lock poisoned");
        if let Some(supervised) = registry.supervised.get_mut(&flow_run) {
            supervised.released.get_or_insert_with(Instant::now);
        }
    }

    /// Waits until both watches have listed once, at most `timeout`; whether they have.
    pub async fn synced(&self, timeout: std::time::Duration) -> bool {
        let mut synced = self.synced.clone();
        let listed = tokio::time::timeout(
            timeout,
            async move { synced.wait_for(|s| *s).await.is_ok() },
        )
        .await;
        listed == Ok(true)
    }
}

/// One run followed in its namespace's observer; let go when dropped.
pub struct Following {
    pub flow_run: Uuid,
    observer: Arc<Observer>,
    pub view: watch::Receiver<RunView>,
}

impl Following {
    /// The run's pod events go to `events` from now on: a re-adopted run, followed before the
    /// worker read it. Its pods as they are now are told at once, as a restarted observer's
    /// listing tells them (their ids are deterministic: what the earlier worker sent already,
    /// the server keeps once).
    pub fn report_to(&self, events: Arc<PodEvents>) {
        let mut registry = self
            .observer
            .registry
            .lock()
            .expect("registry lock poisoned");
        registry.supervise(self.flow_run, events);
        let pods: Vec<Pod> = self.view.borrow().pods.values().cloned().collect();
        for pod in &pods {
            registry.emit_pod_event(self.flow_run, pod, Seen::Listed);
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.observer.release(self.flow_run);
    }
}

/// The one owner of both watch streams.
struct ObserverTask {
    registry: Arc<Mutex<Registry>>,
    namespace: String,
    synced: watch::Sender<bool>,
    /// Objects of a re-list in progress: what is not listed again was deleted meanwhile.
    listing_jobs: HashMap<String, Job>,
    listing_pods: HashMap<String, Pod>,
    jobs_synced: bool,
    pods_synced: bool,
}

impl ObserverTask {
    async fn run(
        mut self,
        jobs: impl Stream<Item = Result<Watched<Job>, watcher::Error>> + Send,
        pods: impl Stream<Item = Result<Watched<Pod>, watcher::Error>> + Send,
        stop: CancellationToken,
    ) {
        tokio::pin!(jobs, pods);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sweep.tick() => self.sweep(),
                Some(event) = jobs.next() => match event {
                    Ok(event) => self.on_job(event),
                    Err(e) => tracing::warn!(namespace = %self.namespace, error = %e, "watching Jobs failed; retrying"),
                },
                Some(event) = pods.next() => match event {
                    Ok(event) => self.on_pod(event),
                    Err(e) => tracing::warn!(namespace = %self.namespace, error = %e, "watching pods failed; retrying"),
                },
            }
        }
    }

    fn on_job(&mut self, event: Watched<Job>) {
        match event {
            Watched::Init => self.listing_jobs.clear(),
            Watched::InitApply(job) => {
                self.listing_jobs.insert(job.name_any(), job.clone());
                self.apply_job(job);
            }
            Watched::InitDone => {
                let listed = std::mem::take(&mut self.listing_jobs);
                self.forget_unlisted(|view| {
                    let gone: Vec<String> = view
                        .jobs
                        .keys()
                        .filter(|n| !listed.contains_key(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        if let Some(job) = view.jobs.remove(&name) {
                            view.deleted_jobs.insert(name, job);
                        }
                    }
                });
                self.jobs_synced = true;
                self.mark_synced();
            }
            Watched::Apply(job) => self.apply_job(job),
            Watched::Delete(job) => {
                let Some(run) = flow_run_of(&job) else { return };
                self.update(run, |view| {
                    view.jobs.remove(&job.name_any());
                    view.deleted_jobs.insert(job.name_any(), job);
                });
            }
        }
    }

    fn apply_job(&mut self, job: Job) {
        let Some(run) = flow_run_of(&job) else { return };
        self.update(run, |view| {
            view.deleted_jobs.remove(&job.name_any());
            view.jobs.insert(job.name_any(), job);
        });
    }

    fn on_pod(&mut self, event: Watched<Pod>) {
        match event {
            Watched::Init => self.listing_pods.clear(),
            Watched::InitApply(pod) => {
                self.listing_pods.insert(pod.name_any(), pod.clone());
                self.apply_pod(pod, Seen::Listed);
            }
            Watched::InitDone => {
                let listed = std::mem::take(&mut self.listing_pods);
                self.forget_unlisted(|view| {
                    let gone: Vec<String> = view
                        .pods
                        .keys()
                        .filter(|n| !listed.contains_key(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        if let Some(pod) = view.pods.remove(&name) {
                            view.deleted_pods.insert(name, pod);
                        }
                    }
                });
                self.pods_synced = true;
                self.mark_synced();
            }
            Watched::Apply(pod) => self.apply_pod(pod, Seen::Changed),
            Watched::Delete(pod) => {
                let Some(run) = flow_run_of(&pod) else { return };
                self.registry
                    .lock()
                    .expect("registry lock poisoned")
                    .emit_pod_event(run, &pod, Seen::Deleted);
                self.update(run, |view| {
                    view.pods.remove(&pod.name_any());
                    view.deleted_pods.insert(pod.name_any(), pod);
                });
            }
        }
    }

    fn apply_pod(&mut self, pod: Pod, seen: Seen) {
        let Some(run) = flow_run_of(&pod) else { return };
        self.registry
            .lock()
            .expect("registry lock poisoned")
            .emit_pod_event(run, &pod, seen);
        self.update(run, |view| {
            view.deleted_pods.remove(&pod.name_any());
            view.pods.insert(pod.name_any(), pod);
        });
    }

    /// Drops runs released long enough ago, and the views of runs no longer in the cluster
    /// that nobody follows.
    fn sweep(&self) {
        let mut registry = self.registry.lock().expect("registry lock poisoned");
        registry
            .supervised
            .retain(|_, s| s.released.is_none_or(|at| at.elapsed() < RELEASE_LINGER));
        let Registry { views, supervised } = &mut *registry;
        views.retain(|run, view| {
            supervised.contains_key(run) || view.receiver_count() > 0 || !view.borrow().is_empty()
        });
    }

    fn mark_synced(&self) {
        if self.jobs_synced && self.pods_synced {
            self.synced.send_replace(true);
        }
    }

    fn update(&self, run: Uuid, change: impl FnOnce(&mut RunView)) {
        let mut registry = self.registry.lock().expect("registry lock poisoned");
        let view = registry
            .views
            .entry(run)
            .or_insert_with(|| watch::channel(RunView::default()).0);
        view.send_modify(change);
    }

    fn forget_unlisted(&self, mut change: impl FnMut(&mut RunView)) {
        let registry = self.registry.lock().expect("registry lock poisoned");
        for view in registry.views.values() {
            view.send_if_modified(|v| {
                let before = (v.jobs.len(), v.pods.len());
                change(v);
                before != (v.jobs.len(), v.pods.len())
            });
        }
    }
}

fn flow_run_of<K: Resource>(object: &K) -> Option<Uuid> {
    object
        .meta()
        .labels
        .as_ref()?
        .get(FLOW_RUN_ID_LABEL)?
        .parse()
        .ok()
}
