//! The differential Kubernetes tests' side of the harness (`tests/kubernetes_oracle.rs`):
//! Prefect's own Kubernetes worker (prefect-kubernetes 0.8.0 and its kopf observer, from its
//! own venv) and Cohort's, each on its own pool of the shared server, both on one emulated
//! cluster; and what it takes to compare them: masks for what legitimately differs between
//! two runs (ids, names, times), a JSON diff, and prefect-kubernetes' pod event id formula.
//!
//! Two clusters per binary, each served on its own loopback port: one whose kubelet runs pods
//! on the local Docker Engine (real flows), and one the tests script (`pod_running`,
//! `pod_exit`, …) with pods bound to the node at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cohort_kube_fake::{
    DeleteOptions, Emulator, EmulatorConfig, Kind, Kubelet, PropagationPolicy, RecordedRequest,
    Served, EMULATOR_LABEL, POD_UID_LABEL,
};
use serde_json::{json, Map, Value};

/// Environment variable naming the Prefect 3.8.8 + prefect-kubernetes 0.8.0 virtualenv
/// (`scripts/prefect-venv.sh kubernetes`; set by `scripts/test.sh`).
pub const KUBERNETES_VENV_ENV: &str = "COHORT_PREFECT_KUBERNETES_VENV";

/// The namespace the tests' runs go to.
pub const NAMESPACE: &str = "prefect";

/// The virtualenv of Prefect's Kubernetes worker (`$COHORT_PREFECT_KUBERNETES_VENV`, else the
/// one `scripts/prefect-venv.sh kubernetes` makes); the oracle is never skipped: a venv that
/// cannot be had fails the test.
pub fn kubernetes_venv() -> PathBuf {
    let python = cohort_testkit::venv_python("kubernetes", KUBERNETES_VENV_ENV);
    python
        .parent()
        .and_then(std::path::Path::parent)
        .expect("<venv>/bin/python")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------
// The emulated clusters
// ---------------------------------------------------------------------------------------

/// An emulated cluster served on loopback, alive as long as the test process.
pub struct Cluster {
    pub emulator: Emulator,
    _served: Served,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the emulators")
    })
}

/// The cluster whose kubelet runs each pod as a container on the local Docker Engine, on the
/// host's network (where the shared server listens).
pub fn docker_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start(Kubelet::Docker { network_host: true }))
}

/// The cluster whose pods the tests move through their states; they are bound to the node
/// as they are created.
pub fn scripted_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Cluster::start(Kubelet::Scripted {
            auto_schedule: true,
        })
    })
}

impl Cluster {
    fn start(kubelet: Kubelet) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let (emulator, served) = runtime().block_on(async {
            let emulator = Emulator::new(EmulatorConfig::with_kubelet(kubelet));
            let served = emulator
                .serve()
                .await
                .expect("serve the emulator on loopback");
            (emulator, served)
        });
        let kubeconfig = served
            .write_kubeconfig(dir.path())
            .expect("write the kubeconfig");
        Cluster {
            emulator,
            _served: served,
            kubeconfig,
            _dir: dir,
        }
    }

    /// `KUBECONFIG` for a worker.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig.to_string_lossy().into_owned()
    }

    /// The Jobs of a flow run.
    pub fn jobs_of(&self, run_id: &str) -> Vec<Value> {
        self.labelled(Kind::Job, run_id)
    }

    /// The pods of a flow run.
    pub fn pods_of(&self, run_id: &str) -> Vec<Value> {
        self.labelled(Kind::Pod, run_id)
    }

    fn labelled(&self, kind: Kind, run_id: &str) -> Vec<Value> {
        self.emulator
            .list(kind, Some(NAMESPACE))
            .into_iter()
            .filter(|o| o["metadata"]["labels"]["prefect.io/flow-run-id"] == run_id)
            .collect()
    }

    /// The name of the run's only pod, once it exists.
    pub fn wait_for_pod(&self, run_id: &str, timeout: Duration) -> String {
        super::poll(
            &format!("a pod of flow run {run_id}"),
            timeout,
            Duration::from_millis(200),
            || {
                let pods = self.pods_of(run_id);
                pods.first()
                    .and_then(|p| p["metadata"]["name"].as_str())
                    .map(str::to_owned)
            },
        )
    }

    /// The name of the run's only Job, once it exists.
    pub fn wait_for_job(&self, run_id: &str, timeout: Duration) -> String {
        super::poll(
            &format!("the Job of flow run {run_id}"),
            timeout,
            Duration::from_millis(200),
            || {
                let jobs = self.jobs_of(run_id);
                jobs.first()
                    .and_then(|j| j["metadata"]["name"].as_str())
                    .map(str::to_owned)
            },
        )
    }

    /// The requests that created the run's Jobs (`POST …/jobs` whose manifest carries the
    /// run's id).
    pub fn job_posts(&self, run_id: &str) -> Vec<RecordedRequest> {
        self.emulator
            .requests()
            .into_iter()
            .filter(|r| {
                r.method == "POST"
                    && r.path == format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
                    && r.body.as_ref().is_some_and(|b| {
                        b["metadata"]["labels"]["prefect.io/flow-run-id"] == run_id
                    })
            })
            .collect()
    }

    /// The requests that deleted the Job `job`.
    pub fn job_deletes(&self, job: &str) -> Vec<RecordedRequest> {
        self.emulator
            .requests()
            .into_iter()
            .filter(|r| {
                r.method == "DELETE"
                    && r.path == format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}")
            })
            .collect()
    }

    /// Deletes a Job as `kubectl delete job` does (in the background).
    pub fn delete_job_by_hand(&self, job: &str) {
        self.emulator
            .delete(
                Kind::Job,
                NAMESPACE,
                job,
                &DeleteOptions {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("delete Job {job}: {e}"));
    }

    /// Deletes the runs' Jobs at once and waits until their pods, and so any containers, are
    /// gone.
    pub fn clean_up(&self, run_ids: &[String]) {
        for run_id in run_ids {
            for job in self.jobs_of(run_id) {
                let name = job["metadata"]["name"].as_str().unwrap_or_default();
                let _ = self.emulator.delete(
                    Kind::Job,
                    NAMESPACE,
                    name,
                    &DeleteOptions {
                        grace_period_seconds: Some(0),
                        propagation_policy: Some(PropagationPolicy::Foreground),
                        ..Default::default()
                    },
                );
            }
            // Pods a hand-deleted Job left to the garbage collector, or that lost their Job.
            for pod in self.pods_of(run_id) {
                let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                let _ = self.emulator.delete_pod(NAMESPACE, name, Some(0));
            }
        }
        super::poll(
            "the runs' Jobs and pods to be gone",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                run_ids
                    .iter()
                    .all(|r| self.jobs_of(r).is_empty() && self.pods_of(r).is_empty())
                    .then_some(())
            },
        );
        // The API forgets a pod deleted with no grace at once; its kubelet removes the
        // containers after. The emulator lives in a `static`, never dropped, so a container
        // still there when the last test ends outlives the test binary.
        super::poll(
            "the containers of gone pods to be removed",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || self.orphan_containers().is_empty().then_some(()),
        );
    }

    /// This emulator's containers whose pod the API no longer lists (by pod uid).
    fn orphan_containers(&self) -> Vec<String> {
        // Containers first: a pod created after them is then listed too.
        let out = super::docker::docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label={EMULATOR_LABEL}={}", self.emulator.id()),
            "--format",
            &format!("{{{{.Label \"{POD_UID_LABEL}\"}}}}"),
        ]);
        assert!(out.status.success(), "docker ps: {out:?}");
        let pods: BTreeSet<String> = self
            .emulator
            .list(Kind::Pod, None)
            .iter()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .collect();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|uid| !pods.contains(*uid))
            .map(str::to_owned)
            .collect()
    }
}

/// The runs of one test, whose Jobs and pods are deleted when it ends, whatever the outcome
/// (no container outlives a test).
pub struct CleanUp {
    cluster: &'static Cluster,
    runs: Mutex<Vec<String>>,
}

impl CleanUp {
    pub fn new(cluster: &'static Cluster) -> CleanUp {
        CleanUp {
            cluster,
            runs: Mutex::new(Vec::new()),
        }
    }

    pub fn add(&self, run_id: &str) {
        self.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(run_id.to_owned());
    }
}

impl Drop for CleanUp {
    fn drop(&mut self) {
        let runs = std::mem::take(&mut *self.runs.lock().unwrap_or_else(|e| e.into_inner()));
        if std::thread::panicking() {
            // Not a second panic while unwinding: report, and let the emulator's own sweep
            // take what is left.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.cluster.clean_up(&runs);
            }));
            if outcome.is_err() {
                eprintln!("[oracle] cleaning up the runs {runs:?} failed");
            }
        } else {
            self.cluster.clean_up(&runs);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------------------

/// Replacements of values that legitimately differ between two runs (ids, names) by
/// placeholders, applied to every string of a JSON value, longest value first (a Job's name
/// contains its run's name).
#[derive(Debug, Clone, Default)]
pub struct Masks {
    pairs: BTreeMap<String, String>,
}

impl Masks {
    /// Replace `value` by `<placeholder>` (empty values are ignored).
    pub fn add(&mut self, value: &str, placeholder: &str) -> &mut Self {
        if !value.is_empty() {
            self.pairs
                .insert(value.to_owned(), format!("<{placeholder}>"));
        }
        self
    }

    pub fn apply_str(&self, s: &str) -> String {
        let mut pairs: Vec<(&String, &String)> = self.pairs.iter().collect();
        pairs.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        let mut out = s.to_owned();
        for (value, placeholder) in pairs {
            out = out.replace(value.as_str(), placeholder);
        }
        out
    }

    /// `v` with every string (object keys included) masked.
    pub fn apply(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.apply_str(s)),
            Value::Array(items) => Value::Array(items.iter().map(|x| self.apply(x)).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, x)| (self.apply_str(k), self.apply(x)))
                    .collect::<Map<String, Value>>(),
            ),
            other => other.clone(),
        }
    }
}

/// Where `a` and `b` differ, one line per JSON path (`/a/b/0`).
pub fn json_diff(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into("", a, b, &mut out);
    out
}

fn diff_into(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff_into(&p, u, v, out),
                    (Some(u), None) => out.push(format!("{p}: only left: {u}")),
                    (None, Some(v)) => out.push(format!("{p}: only right: {v}")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff_into(&format!("{path}/{i}"), u, v, out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} != {b}")),
    }
}

/// prefect-kubernetes' pod event id (`prefect_kubernetes/observer.py:
/// _replicate_pod_event`): `uuid5(NAMESPACE_URL, json.dumps({...}, sort_keys=True))` over the
/// pod's uid, its phase (before `Failed` is renamed `evicted`), the sum of its containers'
/// restarts and the diagnosis category, with Python's default separators.
pub fn pod_event_id(uid: &str, phase: &str, restart_count: u64, diagnosis: Option<&str>) -> String {
    let diagnosis = diagnosis.map_or_else(|| "null".to_owned(), |d| json!(d).to_string());
    let text = format!(
        "{{\"diagnosis\": {diagnosis}, \"phase\": {}, \"restart_count\": {restart_count}, \"uid\": {}}}",
        json!(phase),
        json!(uid)
    );
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, text.as_bytes()).to_string()
}

/// The Kubernetes pod phase a `prefect.kubernetes.pod.*` event name stands for.
pub fn pod_event_phase(event: &str) -> &'static str {
    match event.rsplit('.').next().unwrap_or_default() {
        "pending" => "Pending",
        "running" => "Running",
        "succeeded" => "Succeeded",
        "failed" | "evicted" => "Failed",
        "unknown" => "Unknown",
        other => panic!("not a pod event: {other}"),
    }
}

/// The options a Job DELETE asked for, wherever the client put them: Prefect's Python client
/// sends query parameters, kube-rs a `DeleteOptions` body.
pub fn effective_delete_options(request: &RecordedRequest) -> Value {
    let mut options = Map::new();
    if let Some(Value::Object(body)) = &request.body {
        for (k, v) in body {
            if k != "kind" && k != "apiVersion" {
                options.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in &request.query {
        let value = match k.as_str() {
            "gracePeriodSeconds" => json!(v.parse::<i64>().unwrap_or(-1)),
            "orphanDependents" => json!(v == "true" || v == "True"),
            _ => json!(v),
        };
        options.insert(k.clone(), value);
    }
    Value::Object(options)
}
