//! A Kubernetes API emulator for tests (no control plane can be installed on the test
//! machines).
//!
//! # What it models
//!
//! One in-memory store of objects (JSON, any of the kinds in [`Kind`]) served two ways: as a
//! `tower::Service` ([`Emulator::service`], for `kube::Client::new(service, "default")`) and
//! as plain HTTP/1.1 on 127.0.0.1 ([`Emulator::serve`], with a kubeconfig, for kubectl and
//! Prefect's Python worker). Both answer the same requests from the same store:
//!
//! * discovery (`/version`, `/api`, `/apis`, the resource lists of `v1`, `batch/v1` and an
//!   empty `apiextensions.k8s.io/v1`);
//! * create (with `generateName`), get, replace, merge/strategic/JSON patch, delete and
//!   the `status` subresource for Namespaces, Pods, Secrets, Events and Jobs; list with
//!   label and field selectors and `limit`/`continue` paging;
//! * watches: one global `resourceVersion`, resumption from the history, `410 Expired` for
//!   compacted versions, BOOKMARKs, `timeoutSeconds`, selectors (an object that stops
//!   matching is sent as DELETED, one that starts matching as ADDED);
//! * deletion: grace periods, finalizers, Orphan/Background/Foreground propagation, and a
//!   garbage collector following `ownerReferences`;
//! * a Job controller (pods from the template, status counters and conditions,
//!   `backoffLimit` with replacement pods, `activeDeadlineSeconds`,
//!   `ttlSecondsAfterFinished`);
//! * a kubelet: scripted by the test, or running pods as containers on the local Docker
//!   Engine;
//! * errors as `Status` bodies worded as the apiserver words them, a log of every request,
//!   and injected faults (error statuses, lost responses, dropped watches, compaction);
//! * served plain on loopback with a kubeconfig, or as a pod sees its API server (HTTPS with
//!   a certificate of a fresh cluster CA, a service account's bearer token required).
//!
//! # What it cannot prove
//!
//! It encodes one reading of Kubernetes. It does not show how a real cluster behaves: the
//! real Job controller's edge cases (pod-replacement races, backoff delays, pod failure
//! policies, finalizer-based tracking), real kubelet timing and signal paths, image pulls,
//! the scheduler, the watch cache's real bookmark and 410 timing, authentication beyond one
//! static token, RBAC, admission webhooks, server-side apply, or behaviour at scale.
//!
//! # Deliberate differences from a real cluster
//!
//! * `gracePeriodSeconds` on a Job deleted in the foreground is passed on to the Job's pods
//!   (a real garbage collector deletes them with their own grace period).
//! * Replacement pods are created at once (no exponential backoff).
//! * Strategic merge patches are applied as JSON merge patches (lists are replaced).
//! * Any field path works in a field selector; lists always read the latest state.
//! * A namespace is deleted at once, with everything in it.
//! * `compact()` moves the `resourceVersion` on by one, so that even an up-to-date watcher
//!   gets 410 and lists again.
//! * Pods run once (`restartPolicy: Never` semantics): no container restarts, no init
//!   containers, probes or volumes. The Docker kubelet reports `ImagePullBackOff` one second
//!   after `ErrImagePull` and then stays there.
//!
//! # Time
//!
//! All timers (grace periods, bookmarks, `timeoutSeconds`, `activeDeadlineSeconds`,
//! `ttlSecondsAfterFinished`) use `tokio::time`; timestamps written into objects are wall
//! clock.

#![forbid(unsafe_code)]

mod admission;
mod apiserver;
mod body;
mod controller;
mod error;
mod faults;
mod gc;
mod http;
mod kind;
mod kubeconfig;
mod kubelet;
mod meta;
pub mod quantity;
mod requests;
mod script;
pub mod selector;
mod server;
mod service;
mod shared;
mod store;
mod watch;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use apiserver::{DeleteOptions, PropagationPolicy};
pub use body::{BodyError, ResponseBody};
pub use error::ApiError;
pub use http::ResponseLost;
pub use kind::Kind;
pub use kubeconfig::CONTEXT as KUBECONFIG_CONTEXT;
pub use kubelet::engine::{CONTAINER_LABEL, EMULATOR_LABEL, PID_LABEL, POD_LABEL, POD_UID_LABEL};
pub use kubelet::Kubelet;
pub use requests::{RecordedRequest, Transport};
pub use server::{InCluster, Served};
pub use service::{BoxError, EmulatorService, ServiceError};

use faults::Fault;
use shared::Shared;
use store::Start;

/// How an emulator starts.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Namespaces that exist from the start. Default: `default`, `kube-system`, `prefect`.
    pub namespaces: Vec<String>,
    /// How long changes stay in the watch history; a watch from an older
    /// `resourceVersion` gets 410 Gone. `None` keeps everything until
    /// [`Emulator::compact`]. Default: 5 minutes, like etcd's compaction interval.
    pub compaction_window: Option<Duration>,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK. Default: 1 s.
    pub bookmark_interval: Duration,
    /// What runs pods. Default: scripted, no auto-scheduling.
    pub kubelet: Kubelet,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            namespaces: ["default", "kube-system", "prefect"]
                .map(str::to_owned)
                .to_vec(),
            compaction_window: Some(Duration::from_secs(300)),
            bookmark_interval: Duration::from_secs(1),
            kubelet: Kubelet::default(),
        }
    }
}

impl EmulatorConfig {
    /// The default configuration with another kubelet.
    pub fn with_kubelet(kubelet: Kubelet) -> Self {
        Self {
            kubelet,
            ..Self::default()
        }
    }
}

/// The owner of an emulator's tasks: when the last handle goes (every [`Emulator`],
/// [`EmulatorService`] and [`Served`]), everything stops.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        // Never leave containers behind, even when the emulator is dropped without
        // `shutdown()` (a failing test).
        if matches!(self.shared.config.kubelet, Kubelet::Docker { .. }) {
            kubelet::engine::sweep_blocking(self.shared.id.clone());
        }
    }
}

/// A Kubernetes API emulator. Cheap to clone; all clones are the same cluster.
#[derive(Clone)]
pub struct Emulator {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("id", &self.handle.shared.id)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Starts an emulator: its namespaces, the Job controller and the kubelet. Must be
    /// called inside a Tokio runtime.
    pub fn new(config: EmulatorConfig) -> Self {
        let shared = Arc::new(Shared {
            store: store::Store::new(config.compaction_window),
            requests: Default::default(),
            faults: Default::default(),
            logs: Default::default(),
            shutdown: CancellationToken::new(),
            id: meta::new_uid(),
            engine: Default::default(),
            kubelet_commands: Default::default(),
            config,
        });
        let emulator = Self {
            handle: Arc::new(Handle {
                shared: shared.clone(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        for ns in &shared.config.namespaces {
            emulator.create_namespace(ns);
        }
        let controller_feed = shared
            .store
            .subscribe(&[Kind::Job, Kind::Pod], Start::Now, false)
            .expect("a feed from now always starts");
        let controller = controller::JobController::new(shared.clone());
        let mut tasks = emulator.handle.tasks.lock().expect("not poisoned");
        tasks.push(tokio::spawn(controller.run(controller_feed)));
        tasks.push(kubelet::spawn(&shared));
        drop(tasks);
        emulator
    }

    /// This emulator's id, the value of the [`EMULATOR_LABEL`] label on its containers.
    pub fn id(&self) -> &str {
        &self.shared().id
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Serves the emulator on 127.0.0.1 (an ephemeral port) until the returned value is
    /// dropped.
    pub async fn serve(&self) -> std::io::Result<Served> {
        server::serve(self.handle.clone()).await
    }

    /// Serves the emulator on 127.0.0.1 as a cluster's API server is seen from its pods:
    /// HTTPS with a certificate of a fresh cluster CA, and `token` required of every request
    /// (401 without it). [`Served::in_cluster`] has what goes into a pod's service account
    /// directory.
    pub async fn serve_in_cluster(&self, token: &str) -> std::io::Result<Served> {
        server::serve_in_cluster(self.handle.clone(), token.to_owned()).await
    }

    /// The emulator as a `tower::Service`, e.g. for `kube::Client::new(service, "default")`.
    pub fn service(&self) -> EmulatorService {
        EmulatorService {
            handle: self.handle.clone(),
        }
    }

    /// Creates a namespace (nothing happens if it exists).
    pub fn create_namespace(&self, namespace: &str) {
        let ns = json!({"metadata": {"name": namespace}});
        let _ = self
            .shared()
            .store
            .txn(|t| apiserver::create(t, Kind::Namespace, "", ns, false));
    }

    /// Creates an object as a client would (`namespace` is ignored for cluster-scoped
    /// kinds); the stored object.
    pub fn create(&self, kind: Kind, namespace: &str, obj: Value) -> Result<Value, ApiError> {
        self.shared()
            .store
            .txn(|t| apiserver::create(t, kind, namespace, obj, false))
    }

    /// Deletes an object as a client would. `Ok(Some(_))`: the object is still there, being
    /// deleted; `Ok(None)`: it is gone.
    pub fn delete(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Option<Value>, ApiError> {
        let outcome = self
            .shared()
            .store
            .txn(|t| apiserver::delete(t, kind, namespace, name, options))?;
        Ok(match outcome {
            apiserver::Deleted::Pending(obj) => Some(obj),
            apiserver::Deleted::Removed(_) => None,
        })
    }

    /// An object (`namespace` empty for cluster-scoped kinds).
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared()
            .store
            .txn(|t| t.get(kind, namespace, name).cloned())
    }

    /// Objects of a kind, in a namespace or all (`None`), ordered by namespace and name.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.shared().store.txn(|t| t.list(kind, namespace))
    }

    /// The Jobs in a namespace.
    pub fn jobs(&self, namespace: &str) -> Vec<Value> {
        self.list(Kind::Job, Some(namespace))
    }

    /// The pods in a namespace.
    pub fn pods(&self, namespace: &str) -> Vec<Value> {
        self.list(Kind::Pod, Some(namespace))
    }

    /// The current `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.shared().store.rv()
    }

    /// Every request served so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared().requests.all()
    }

    /// Forgets the requests served so far.
    pub fn clear_requests(&self) {
        self.shared().requests.clear();
    }

    /// Answers the next `times` requests with this method whose path and query (as in
    /// `/api/v1/pods?watch=true`) contain `path_contains` with `status` and a `Status` body,
    /// without serving them.
    pub fn fail_next(&self, method: &str, path_contains: &str, status: u16, times: usize) {
        self.shared()
            .faults
            .add(method, path_contains, Fault::Fail(status), times);
    }

    /// Serves the next matching request, then throws its response away: over HTTP the
    /// connection is closed without an answer; in process the service returns
    /// [`ServiceError::ResponseLost`]. For idempotent-create tests.
    pub fn lose_next_response(&self, method: &str, path_contains: &str) {
        self.shared()
            .faults
            .add(method, path_contains, Fault::LoseResponse, 1);
    }

    /// Ends every open watch abruptly (the stream fails; over HTTP the connection closes
    /// without the final chunk).
    pub fn drop_watches(&self) {
        self.shared().store.drop_external_feeds();
    }

    /// Compacts the history: a watch from any `resourceVersion` handed out so far gets 410
    /// Gone (the version moves on by one, so even an up-to-date watcher must list again).
    pub fn compact(&self) {
        self.shared().store.compact();
    }

    /// Stops the controller, the kubelet and every watch, and (Docker kubelet) removes every
    /// container the emulator created. The store can still be read and served.
    pub async fn shutdown(&self) {
        self.shared().shutdown.cancel();
        let tasks = std::mem::take(&mut *self.handle.tasks.lock().expect("not poisoned"));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Waits until `check` returns something, re-checking after every change in the store
    /// and every 50 ms (for conditions outside the store, such as the request log); `None`
    /// when `timeout` passes first.
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Emulator) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let rv = self.resource_version();
        let mut feed = self
            .shared()
            .store
            .subscribe(&[], Start::After(rv), false)
            .ok()?;
        loop {
            if let Some(found) = check(self) {
                return Some(found);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return check(self),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                delivery = feed.rx.recv() => {
                    if delivery.is_none() {
                        return check(self);
                    }
                }
            }
        }
    }

    /// Waits for a pod in `namespace` matching a label selector (`""`: any pod).
    pub async fn wait_for_pod(
        &self,
        namespace: &str,
        label_selector: &str,
        timeout: Duration,
    ) -> Option<Value> {
        let selector = selector::LabelSelector::parse(label_selector).ok()?;
        self.wait_until(timeout, |e| {
            e.pods(namespace)
                .into_iter()
                .find(|p| selector.matches(meta::labels(p)))
        })
        .await
    }
}
