//! Scenario 8: Kubernetes work pools. Prefect's Kubernetes worker (prefect-kubernetes 0.8.0,
//! its kopf observer a thread of the same process) and Cohort's on identical pools
//! (prefect-kubernetes' base job template), the same server, each on an emulated cluster of its
//! own (`cohort-kube-fake`, served on loopback by the driver), so that each worker's
//! Kubernetes API requests are logged apart.
//!
//! No engine runs in the pods: 200 Python engines do not fit on the benchmark machine, and the
//! workers, not the flows, are measured. The emulator's kubelet is scripted by the driver: a
//! pod is bound to the node when it is created and marked Running as soon as the driver sees
//! it (polled every 100 ms); once every run's pod is Running (every run the worker did not
//! crash before creating its Job) the driver holds them all for a while, then every container
//! exits 0 (`Completed`). The runs never leave Pending on the Prefect side (InfrastructurePending
//! once the observer sees the pod); the fixture deletes them afterwards.
//!
//! The measured window runs from just before the burst is created until the worker is calm
//! again after the pods exited (under 50 ms of CPU in a second) and every run's
//! `executed-flow-run` event is in. Prefect's worker emits that event right after creating the
//! Job, Cohort's when the Job ends; both are waited for, so both windows include the end of
//! the pods. CPU, Prefect REST requests (counted by a proxy, as in scenario 6) and Kubernetes
//! API requests (the emulator's request log) are counted over that window. Pickup is the run's
//! expected start → its Job first seen by the driver.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, sleep, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use cohort_kube_fake::{Emulator, EmulatorConfig, Kubelet, RecordedRequest, Served};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use super::{expected_starts, one_rep_on, secs, wait_for, Ctx, Fixture, PoolKind, MIB};
use crate::procfs::{self, Sampler};
use crate::proxy::CountingProxy;
use crate::report::{MetricDef, RepResult, ScenarioReport};
use crate::stats::{median, percentile};
use crate::worker::{run_occurred, Worker, WorkerKind, EVENT_EXECUTED};

/// The pod events both workers emit for the pods of this scenario.
const POD_EVENTS: [&str; 3] = [
    "prefect.kubernetes.pod.pending",
    "prefect.kubernetes.pod.running",
    "prefect.kubernetes.pod.succeeded",
];
/// Where the runs' Jobs go (an emulator namespace that exists from the start).
const NAMESPACE: &str = "prefect";
/// Never pulled: the kubelet is scripted.
const IMAGE: &str = "cohort-bench/not-run:1";
const FLOW_RUN_ID_LABEL: &str = "prefect.io/flow-run-id";
/// How often the driver's kubelet script looks at the cluster.
const SCRIPT_EVERY: Duration = Duration::from_millis(100);
/// The worker is calm again when it uses less CPU than this over [`QUIET_OVER`] …
const QUIET_CPU_S: f64 = 0.05;
const QUIET_OVER: Duration = Duration::from_secs(1);
/// … or, at the latest, this long after the pods exited and the executed events were in.
const QUIET_AT_MOST: Duration = Duration::from_secs(60);

const METRICS: [MetricDef; 20] = [
    MetricDef::new("idle_rss_mib", "worker RSS, idle", "MiB"),
    MetricDef::new(
        "peak_rss_mib",
        "worker RSS, peak with all pods running",
        "MiB",
    ),
    MetricDef::new("cpu_per_run_s", "worker CPU per run", "s"),
    MetricDef::new(
        "requests_per_run",
        "Prefect REST requests to the server per run",
        "req",
    ),
    MetricDef::new(
        "kube_requests_per_run",
        "Kubernetes API requests per Job created, all",
        "req",
    ),
    MetricDef::new(
        "kube_non_watch_per_run",
        "… of which not watches, per Job",
        "req",
    ),
    MetricDef::new("kube_post_per_run", "… POST per Job", "req"),
    MetricDef::new("kube_get_per_run", "… GET (one object) per Job", "req"),
    MetricDef::new("kube_list_per_run", "… LIST per Job", "req"),
    MetricDef::new("kube_delete_per_run", "… DELETE per Job", "req"),
    MetricDef::new("kube_other_per_run", "… PUT and PATCH per Job", "req"),
    MetricDef::new(
        "kube_watches",
        "watch requests opened during the burst",
        "count",
    ),
    MetricDef::new(
        "kube_startup_requests",
        "Kubernetes API requests from start to the burst (start-up, idle)",
        "count",
    ),
    MetricDef::new(
        "pickup_p50_s",
        "pickup latency p50 (expected start → Job created)",
        "s",
    ),
    MetricDef::new(
        "pickup_p95_s",
        "pickup latency p95 (expected start → Job created)",
        "s",
    ),
    MetricDef::new("all_jobs_s", "burst created → last Job created", "s"),
    MetricDef::new("max_running", "pods running at once", "count"),
    MetricDef::new(
        "exit_to_executed_p50_s",
        "pods exited → executed-flow-run, p50 (Cohort only: Prefect's worker emits it at \
         creation)",
        "s",
    ),
    MetricDef::new(
        "pod_events_per_run",
        "`prefect.kubernetes.pod.*` events per run (read back)",
        "req",
    ),
    MetricDef::new(
        "harmed_runs",
        "runs harmed (not exactly one Job, no executed event, or Crashed/Failed)",
        "runs",
    ),
];

pub fn run(ctx: &Ctx<'_>) -> ScenarioReport {
    let plan = &ctx.plan;
    let mut report = ScenarioReport::new("kubernetes", "8. Kubernetes work pools", &METRICS);
    let template: Value = match serde_json::from_str(cohort_kube_manifest::BASE_JOB_TEMPLATE) {
        Ok(t) => t,
        Err(e) => {
            report
                .notes
                .push(format!("not run: the base job template: {e}"));
            return report;
        }
    };
    // The emulators live on a runtime of their own: the driver is blocking code.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kube-emulator")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report
                .notes
                .push(format!("not run: a runtime for the emulator: {e}"));
            return report;
        }
    };
    report.params = json!({
        "what": format!(
            "A kubernetes pool with prefect-kubernetes 0.8.0's base job template, a deployment \
             with job variables `image` (never pulled) and `namespace: {NAMESPACE}`, {} runs \
             created at once by {} client thread{}; each worker alone on a fresh pool with the \
             default settings and on an emulated cluster of its own (`cohort-kube-fake` on \
             loopback, its kubelet scripted by the driver: each pod Running as soon as it is \
             seen, and once all {} run, held {} s, then every container exits 0). No engine \
             runs in the pods, so the runs stay Pending. Prefect's worker is `prefect worker \
             start --type kubernetes` from a venv with prefect-kubernetes 0.8.0, its observer \
             in the same process; both get `KUBECONFIG` and \
             `PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES={NAMESPACE}`.",
            plan.kubernetes_runs,
            plan.client_threads,
            if plan.client_threads == 1 { "" } else { "s" },
            plan.kubernetes_runs,
            plan.kubernetes_hold_s,
        ),
        "image": IMAGE,
        "namespace": NAMESPACE,
        "runs": plan.kubernetes_runs,
        "hold_s": plan.kubernetes_hold_s,
        "script_every_ms": SCRIPT_EVERY.as_millis(),
    });
    let pool_kind = PoolKind {
        worker_type: "kubernetes",
        template: &template,
    };
    for rep in 0..plan.kubernetes_reps {
        for kind in WorkerKind::order(rep) {
            let r = one_rep_on(
                ctx,
                "kubernetes",
                rep,
                kind,
                pool_kind,
                json!({"image": IMAGE, "namespace": NAMESPACE}),
                |fx, r| body(ctx, &runtime, fx, kind, r),
            );
            report.reps.push(r);
        }
    }
    report.summarize();
    report.tables.push(requests_table(&report));
    report.notes.push(
        "On an emulated cluster (`cohort-kube-fake`), not a real one: request counts are what \
         each worker asks of the API server, but the emulator answers from memory at once, so \
         what a real API server's latency, watch cache, admission and etcd would add (and \
         what a real kubelet's timing would change) is not shown; its kubelet is the driver, \
         so Job → pod running is not measured."
            .to_owned(),
    );
    report
}

fn body(
    ctx: &Ctx<'_>,
    runtime: &Runtime,
    fx: &Fixture,
    kind: WorkerKind,
    r: &mut RepResult,
) -> Result<()> {
    let plan = &ctx.plan;
    let server = ctx.server;
    let cluster = Cluster::start(runtime, server.scratch_dir())?;
    let (proxy, api) = CountingProxy::in_front_of(server.api_url())?;
    let kubeconfig = cluster.kubeconfig.to_string_lossy().into_owned();
    let mut worker = Worker::spawn_typed(
        server,
        &ctx.programs,
        kind,
        "kubernetes",
        &fx.pool,
        &fx.worker_name,
        &[
            ("PREFECT_API_URL", api.as_str()),
            ("KUBECONFIG", kubeconfig.as_str()),
            // Keeps kopf namespace-scoped (no cluster-wide watches); Cohort reads it too.
            (
                "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
                NAMESPACE,
            ),
        ],
    )?;
    worker.wait_started(Duration::from_secs(120))?;

    // -- idle -----------------------------------------------------------------------------
    r.set("idle_rss_mib", super::idle_rss_mib(worker.pid(), plan));

    // -- the burst --------------------------------------------------------------------------
    let startup_requests = cluster.emulator.requests();
    let startup = KubeTally::of(&startup_requests);
    r.set("kube_startup_requests", Some(startup.total() as f64));
    r.detail("kube_startup_tally", &startup);
    let sampler = Sampler::start(worker.pid(), Duration::from_millis(250));
    let before = procfs::usage(worker.pid());
    let tally0 = proxy.snapshot();
    let created_from = Utc::now();
    let hold = Duration::from_secs_f64(plan.kubernetes_hold_s);
    let all_running_within =
        Duration::from_secs(120) + Duration::from_millis(500) * plan.kubernetes_runs as u32;
    let script = PodScript::start(
        cluster.emulator.clone(),
        plan.kubernetes_runs,
        hold,
        all_running_within,
    );
    let ids = server.create_flow_runs(
        &fx.deployment_id,
        plan.kubernetes_runs,
        plan.client_threads,
        Duration::from_secs(180),
    )?;
    r.detail("created_s", secs(created_from, Utc::now()));
    let rid = worker.resource_id();
    let mut checked = Instant::now();
    let scripted = wait_for(
        "every run's pod to run and exit",
        all_running_within + hold + Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            worker.ensure_alive()?;
            // A run the worker could not submit is crashed and gets no Job.
            if checked.elapsed() >= Duration::from_secs(2) {
                checked = Instant::now();
                let lost = server.count_flow_runs(&fx.deployment_id, &["CRASHED", "FAILED"])?;
                script.set_target(ids.len().saturating_sub(lost as usize));
            }
            Ok(script.is_finished().then_some(()))
        },
    );
    let scripted = scripted.map(|()| script.finish())?;
    r.detail("script", &scripted);
    let exited = scripted
        .exited
        .context("the pods were never told to exit")?;
    // Both workers emit executed-flow-run for every run that got a Job (Prefect's right after
    // creating it, Cohort's when it ends).
    let want = jobs_per_run(&cluster.emulator).len() as u64;
    r.detail("runs_with_a_job", want);
    let executed_in = wait_for(
        "every run's executed-flow-run event",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || {
            worker.ensure_alive()?;
            Ok(
                (server.count_events(&rid, &[EVENT_EXECUTED], worker.spawned_at)? >= want)
                    .then_some(()),
            )
        },
    );
    let calm = wait_calm(worker.pid());
    r.detail("calm_after_exit_s", secs(exited, calm));
    let after = procfs::usage(worker.pid());
    let samples = sampler.finish();
    let tally = proxy.snapshot().since(&tally0);
    let burst_requests = cluster.emulator.requests();
    let burst = KubeTally::of(&burst_requests[startup_requests.len().min(burst_requests.len())..]);

    let n = ids.len() as f64;
    if let (Some(a), Some(b)) = (before, after) {
        r.set("cpu_per_run_s", Some((b.worker_cpu_s - a.worker_cpu_s) / n));
    }
    r.set(
        "peak_rss_mib",
        samples
            .iter()
            .map(|(_, u)| u.worker_rss_kib)
            .max()
            .map(|k| k as f64 / MIB),
    );
    r.set("requests_per_run", Some(tally.requests() as f64 / n));
    r.detail("tally", &tally);
    // Per Job created: a run the worker crashed before creating its Job asked nothing of the
    // cluster.
    let jobs = (want as f64).max(1.0);
    let per_run = |v: u64| Some(v as f64 / jobs);
    r.set("kube_requests_per_run", per_run(burst.total()));
    r.set(
        "kube_non_watch_per_run",
        per_run(burst.total() - burst.verb("WATCH")),
    );
    r.set("kube_post_per_run", per_run(burst.verb("POST")));
    r.set("kube_get_per_run", per_run(burst.verb("GET")));
    r.set("kube_list_per_run", per_run(burst.verb("LIST")));
    r.set("kube_delete_per_run", per_run(burst.verb("DELETE")));
    r.set(
        "kube_other_per_run",
        per_run(burst.verb("PUT") + burst.verb("PATCH")),
    );
    r.set("kube_watches", Some(burst.verb("WATCH") as f64));
    r.detail("runs", ids.len());
    r.detail("kube_tally", &burst);
    r.set("max_running", Some(scripted.max_running as f64));

    let runs = expected_starts(ctx, &fx.deployment_id)?;
    let pickup: Vec<f64> = ids
        .iter()
        .filter_map(|id| Some(secs(runs.get(id)?.0, *scripted.job_seen.get(id)?)))
        .collect();
    r.set("pickup_p50_s", percentile(&pickup, 50.0));
    r.set("pickup_p95_s", percentile(&pickup, 95.0));
    r.detail("pickup_s", &pickup);
    if let Some(last) = ids.iter().filter_map(|id| scripted.job_seen.get(id)).max() {
        r.set("all_jobs_s", Some(secs(created_from, *last)));
    }
    let executed: HashMap<String, DateTime<Utc>> = server
        .read_events(&rid, &[EVENT_EXECUTED], worker.spawned_at)?
        .iter()
        .filter_map(run_occurred)
        .collect();
    if kind == WorkerKind::Cohort {
        let after_exit: Vec<f64> = ids
            .iter()
            .filter_map(|id| Some(secs(exited, *executed.get(id)?)))
            .collect();
        r.set("exit_to_executed_p50_s", percentile(&after_exit, 50.0));
    }
    let ours: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let pod_events = server
        .read_events_by_prefix("prefect.kubernetes.pod.", &POD_EVENTS, created_from)?
        .iter()
        .filter_map(run_occurred)
        .filter(|(id, _)| ours.contains(id.as_str()))
        .count();
    r.set("pod_events_per_run", Some(pod_events as f64 / n));
    let jobs_of = jobs_per_run(&cluster.emulator);
    let harmed = ids
        .iter()
        .filter(|id| {
            jobs_of.get(*id).copied().unwrap_or(0) != 1
                || !executed.contains_key(*id)
                || runs
                    .get(*id)
                    .is_none_or(|(_, s)| matches!(s.as_str(), "CRASHED" | "FAILED"))
        })
        .count();
    r.set("harmed_runs", Some(harmed as f64));
    r.detail(
        "run_states",
        runs.values()
            .fold(BTreeMap::<&str, usize>::new(), |mut m, (_, s)| {
                *m.entry(s.as_str()).or_default() += 1;
                m
            }),
    );

    let stop = worker.stop(Duration::from_secs(30));
    r.detail("worker_stop", stop);
    let worker_errors = worker.error_lines();
    r.detail("worker_error_lines", worker_errors.len());
    r.detail(
        "worker_error_sample",
        worker_errors.iter().take(5).collect::<Vec<_>>(),
    );
    runtime.block_on(cluster.emulator.shutdown());
    executed_in
}

/// An emulated cluster with a scripted kubelet that binds new pods at once, served on
/// loopback, and a kubeconfig for it.
struct Cluster {
    emulator: Emulator,
    kubeconfig: PathBuf,
    _served: Served,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(runtime: &Runtime, scratch: &std::path::Path) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("kube-")
            .tempdir_in(scratch)?;
        let (emulator, served) = runtime.block_on(async {
            let emulator = Emulator::new(EmulatorConfig::with_kubelet(Kubelet::Scripted {
                auto_schedule: true,
            }));
            let served = emulator.serve().await?;
            Ok::<_, std::io::Error>((emulator, served))
        })?;
        let kubeconfig = served.write_kubeconfig(dir.path())?;
        Ok(Cluster {
            emulator,
            kubeconfig,
            _served: served,
            _dir: dir,
        })
    }
}

/// The flow-run id → Jobs labelled with it.
fn jobs_per_run(emulator: &Emulator) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for job in emulator.jobs(NAMESPACE) {
        if let Some(id) = job["metadata"]["labels"][FLOW_RUN_ID_LABEL].as_str() {
            *out.entry(id.to_owned()).or_default() += 1;
        }
    }
    out
}

/// What the driver's kubelet script saw and did.
#[derive(Debug, Default, Serialize)]
struct Scripted {
    /// Flow-run id → when a Job of it was first seen.
    job_seen: HashMap<String, DateTime<Utc>>,
    /// When every run's pod was Running.
    all_running: Option<DateTime<Utc>>,
    /// When the pods were made to exit (also when not all of them ran in time).
    exited: Option<DateTime<Utc>>,
    /// Pods Running just before they were made to exit.
    max_running: usize,
    /// Pods made to exit.
    pods_exited: usize,
}

/// The kubelet script on a thread of its own: every [`SCRIPT_EVERY`] it notes the Jobs it has
/// not seen yet and marks Pending pods Running; `hold` after as many pods as its target are
/// Running (or `within` after the start if they never are) it makes every Running pod exit 0,
/// and ends. The target starts at the number of runs; the driver lowers it by the runs that
/// will get no Job (crashed by the worker when it could not submit them).
struct PodScript {
    stop: Arc<AtomicBool>,
    target: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Scripted>>,
}

impl PodScript {
    fn start(emulator: Emulator, runs: usize, hold: Duration, within: Duration) -> PodScript {
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicUsize::new(runs));
        let handle = {
            let (stop, target) = (stop.clone(), target.clone());
            thread::spawn(move || script_pods(&emulator, &target, hold, within, &stop))
        };
        PodScript {
            stop,
            target,
            handle: Some(handle),
        }
    }

    /// Expect this many pods to run.
    fn set_target(&self, pods: usize) {
        self.target.store(pods, Ordering::Relaxed);
    }

    fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn finish(mut self) -> Scripted {
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for PodScript {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn script_pods(
    emulator: &Emulator,
    target: &AtomicUsize,
    hold: Duration,
    within: Duration,
    stop: &AtomicBool,
) -> Scripted {
    let started = Instant::now();
    let mut out = Scripted::default();
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut all_running_at: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let want = target.load(Ordering::Relaxed);
        if out.job_seen.len() < want {
            let now = Utc::now();
            for job in emulator.jobs(NAMESPACE) {
                if let Some(id) = job["metadata"]["labels"][FLOW_RUN_ID_LABEL].as_str() {
                    out.job_seen.entry(id.to_owned()).or_insert(now);
                }
            }
        }
        if all_running_at.is_none() {
            for pod in emulator.pods(NAMESPACE) {
                let Some(name) = pod["metadata"]["name"].as_str() else {
                    continue;
                };
                let is_running = match pod["status"]["phase"].as_str() {
                    Some("Pending") => emulator.pod_running(NAMESPACE, name).is_ok(),
                    Some("Running") => true,
                    _ => false,
                };
                if is_running {
                    running.insert(name.to_owned());
                }
            }
            if running.len() >= want {
                all_running_at = Some(Instant::now());
                out.all_running = Some(Utc::now());
            }
        }
        let due = match all_running_at {
            Some(t) => t.elapsed() >= hold,
            None => started.elapsed() >= within,
        };
        if due {
            out.max_running = emulator
                .pods(NAMESPACE)
                .iter()
                .filter(|p| p["status"]["phase"] == "Running")
                .count();
            out.exited = Some(Utc::now());
            out.pods_exited = running
                .iter()
                .filter(|name| emulator.pod_exit(NAMESPACE, name, 0, "Completed").is_ok())
                .count();
            break;
        }
        sleep(SCRIPT_EVERY);
    }
    out
}

/// Waits until the process uses less than [`QUIET_CPU_S`] over [`QUIET_OVER`] (at most
/// [`QUIET_AT_MOST`]); when it was.
fn wait_calm(pid: i32) -> DateTime<Utc> {
    let started = Instant::now();
    let mut last = procfs::process_cpu_s(pid);
    while started.elapsed() < QUIET_AT_MOST {
        sleep(QUIET_OVER);
        let now = procfs::process_cpu_s(pid);
        match (last, now) {
            (Some(a), Some(b)) if b - a < QUIET_CPU_S => break,
            (_, None) => break,
            _ => last = now,
        }
    }
    Utc::now() - ChronoDuration::from_std(QUIET_OVER).unwrap_or_default()
}

/// Kubernetes API requests by verb and endpoint: `WATCH`, `LIST` (a collection), `GET` (one
/// object, a subresource or discovery), `POST`, `PUT`, `PATCH`, `DELETE`, with object names
/// replaced (`GET /apis/batch/v1/namespaces/prefect/jobs/{name}`). Namespaces are kept: which
/// ones a worker reads is part of what it costs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
struct KubeTally {
    by_endpoint: BTreeMap<String, u64>,
}

impl KubeTally {
    fn of(requests: &[RecordedRequest]) -> KubeTally {
        let mut by_endpoint = BTreeMap::new();
        for r in requests {
            *by_endpoint.entry(endpoint(r)).or_default() += 1;
        }
        KubeTally { by_endpoint }
    }

    fn total(&self) -> u64 {
        self.by_endpoint.values().sum()
    }

    fn verb(&self, verb: &str) -> u64 {
        self.by_endpoint
            .iter()
            .filter(|(k, _)| k.split(' ').next() == Some(verb))
            .map(|(_, v)| v)
            .sum()
    }
}

/// `VERB /normalized/path` of a request.
fn endpoint(r: &RecordedRequest) -> String {
    let (path, object) = normalize(&r.path);
    let watch = r
        .query_param("watch")
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let verb = match r.method.as_str() {
        "GET" if watch => "WATCH",
        "GET" if !object => "LIST",
        m => m,
    };
    format!("{verb} {path}")
}

/// The path with object names replaced, and whether it names one object (or a subresource of
/// one, or a discovery document) rather than a collection.
fn normalize(path: &str) -> (String, bool) {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let prefix = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => 0,
    };
    if prefix == 0 || segs.len() <= prefix {
        return (format!("/{}", segs.join("/")), true);
    }
    let mut out: Vec<&str> = segs[..prefix].to_vec();
    let mut rest = &segs[prefix..];
    if rest.len() >= 3 && rest[0] == "namespaces" {
        out.extend(&rest[..2]);
        rest = &rest[2..];
    }
    out.push(rest[0]);
    let object = rest.len() >= 2;
    if object {
        out.push("{name}");
        out.extend(&rest[2..]);
    }
    (format!("/{}", out.join("/")), object)
}

/// Kubernetes API requests by endpoint, medians over each worker's repetitions: during the
/// burst (count and per run) and from start to the burst.
fn requests_table(report: &ScenarioReport) -> String {
    let medians = |kind: WorkerKind, key: &str, per_run: bool| -> BTreeMap<String, f64> {
        let reps: Vec<BTreeMap<String, f64>> = report
            .reps
            .iter()
            .filter(|r| r.worker == kind)
            .filter_map(|r| {
                let jobs = r.details["runs_with_a_job"]
                    .as_f64()
                    .unwrap_or(1.0)
                    .max(1.0);
                let map = r.details[key]["by_endpoint"].as_object()?;
                Some(
                    map.iter()
                        .filter_map(|(k, v)| {
                            let v = v.as_f64()?;
                            Some((k.clone(), if per_run { v / jobs } else { v }))
                        })
                        .collect(),
                )
            })
            .collect();
        let keys: BTreeSet<&String> = reps.iter().flat_map(|m| m.keys()).collect();
        keys.into_iter()
            .filter_map(|k| {
                let values: Vec<f64> = reps
                    .iter()
                    .map(|m| m.get(k).copied().unwrap_or(0.0))
                    .collect();
                Some((k.clone(), median(&values)?))
            })
            .collect()
    };
    let mut s = String::from(
        "Kubernetes API requests by endpoint during the burst (per Job created, and in all), \
         medians:\n\n\
         | request | Python per Job | Cohort per Job | Python | Cohort |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    let (py, co) = (
        medians(WorkerKind::Python, "kube_tally", true),
        medians(WorkerKind::Cohort, "kube_tally", true),
    );
    let (py_n, co_n) = (
        medians(WorkerKind::Python, "kube_tally", false),
        medians(WorkerKind::Cohort, "kube_tally", false),
    );
    let cell = |m: &BTreeMap<String, f64>, k: &str, digits: usize| {
        m.get(k)
            .map_or_else(|| "0".to_owned(), |v| format!("{v:.digits$}"))
    };
    for k in py.keys().chain(co.keys()).collect::<BTreeSet<_>>() {
        s.push_str(&format!(
            "| `{k}` | {} | {} | {} | {} |\n",
            cell(&py, k, 2),
            cell(&co, k, 2),
            cell(&py_n, k, 0),
            cell(&co_n, k, 0)
        ));
    }
    s.push_str(
        "\nKubernetes API requests from start to the burst (start-up and idle), medians:\n\n\
         | request | Python | Cohort |\n| --- | ---: | ---: |\n",
    );
    let (py_s, co_s) = (
        medians(WorkerKind::Python, "kube_startup_tally", false),
        medians(WorkerKind::Cohort, "kube_startup_tally", false),
    );
    for k in py_s.keys().chain(co_s.keys()).collect::<BTreeSet<_>>() {
        s.push_str(&format!(
            "| `{k}` | {} | {} |\n",
            cell(&py_s, k, 0),
            cell(&co_s, k, 0)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_kube_fake::Transport;

    fn request(method: &str, path: &str, query: &[(&str, &str)]) -> RecordedRequest {
        RecordedRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: None,
            from: Transport::Http,
        }
    }

    #[test]
    fn endpoints_by_verb_with_names_replaced() {
        let cases = [
            (
                request("POST", "/apis/batch/v1/namespaces/prefect/jobs", &[]),
                "POST /apis/batch/v1/namespaces/prefect/jobs",
            ),
            (
                request(
                    "GET",
                    "/apis/batch/v1/namespaces/prefect/jobs/hello-x1",
                    &[],
                ),
                "GET /apis/batch/v1/namespaces/prefect/jobs/{name}",
            ),
            (
                request(
                    "GET",
                    "/api/v1/namespaces/prefect/pods",
                    &[("labelSelector", "a"), ("watch", "true")],
                ),
                "WATCH /api/v1/namespaces/prefect/pods",
            ),
            (
                request(
                    "GET",
                    "/api/v1/namespaces/prefect/pods",
                    &[("watch", "True")],
                ),
                "WATCH /api/v1/namespaces/prefect/pods",
            ),
            (
                request(
                    "GET",
                    "/api/v1/namespaces/prefect/pods",
                    &[("limit", "500")],
                ),
                "LIST /api/v1/namespaces/prefect/pods",
            ),
            (
                request(
                    "GET",
                    "/api/v1/namespaces/default/pods",
                    &[("watch", "true")],
                ),
                "WATCH /api/v1/namespaces/default/pods",
            ),
            (
                request("GET", "/api/v1/namespaces/prefect/pods/p/log", &[]),
                "GET /api/v1/namespaces/prefect/pods/{name}/log",
            ),
            (
                request("GET", "/api/v1/namespaces/kube-system", &[]),
                "GET /api/v1/namespaces/{name}",
            ),
            (
                request("GET", "/api/v1/namespaces", &[]),
                "LIST /api/v1/namespaces",
            ),
            (
                request("GET", "/api/v1/pods", &[("watch", "1")]),
                "WATCH /api/v1/pods",
            ),
            (request("GET", "/version", &[]), "GET /version"),
            (request("GET", "/apis/batch/v1", &[]), "GET /apis/batch/v1"),
            (
                request(
                    "DELETE",
                    "/apis/batch/v1/namespaces/prefect/jobs/hello-x1",
                    &[],
                ),
                "DELETE /apis/batch/v1/namespaces/prefect/jobs/{name}",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(endpoint(&r), want, "{r:?}");
        }
    }

    #[test]
    fn tally_counts_by_verb() {
        let t = KubeTally::of(&[
            request("POST", "/apis/batch/v1/namespaces/prefect/jobs", &[]),
            request("POST", "/apis/batch/v1/namespaces/prefect/jobs", &[]),
            request(
                "GET",
                "/api/v1/namespaces/prefect/pods",
                &[("watch", "true")],
            ),
            request("GET", "/api/v1/namespaces/prefect/pods", &[]),
        ]);
        assert_eq!(t.total(), 4);
        assert_eq!(t.verb("POST"), 2);
        assert_eq!(t.verb("WATCH"), 1);
        assert_eq!(t.verb("LIST"), 1);
        assert_eq!(t.verb("GET"), 0);
    }

    #[test]
    fn the_script_runs_every_pod_then_ends_them_together() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let emulator = runtime.block_on(async {
            Emulator::new(EmulatorConfig::with_kubelet(Kubelet::Scripted {
                auto_schedule: true,
            }))
        });
        let script = PodScript::start(
            emulator.clone(),
            4,
            Duration::from_millis(300),
            Duration::from_secs(30),
        );
        for i in 0..3 {
            let job = json!({
                "metadata": {"name": format!("job-{i}"), "labels": {FLOW_RUN_ID_LABEL: format!("run-{i}")}},
                "spec": {"template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "prefect-job", "image": IMAGE}],
                }}},
            });
            emulator
                .create(cohort_kube_fake::Kind::Job, NAMESPACE, job)
                .unwrap();
        }
        // One run never gets a Job.
        script.set_target(3);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !script.is_finished() && Instant::now() < deadline {
            sleep(Duration::from_millis(50));
        }
        let scripted = script.finish();
        assert_eq!(scripted.job_seen.len(), 3);
        assert_eq!(scripted.max_running, 3);
        assert_eq!(scripted.pods_exited, 3);
        let (all, exited) = (scripted.all_running.unwrap(), scripted.exited.unwrap());
        assert!(exited >= all + ChronoDuration::milliseconds(300));
        let phases: Vec<Value> = emulator
            .pods(NAMESPACE)
            .iter()
            .map(|p| p["status"]["phase"].clone())
            .collect();
        assert_eq!(phases, vec![json!("Succeeded"); 3]);
        assert_eq!(jobs_per_run(&emulator).len(), 3);
        runtime.block_on(emulator.shutdown());
    }
}
