//! What Cohort's workers cost the Prefect server, against a real Prefect 3.8.8 server (see
//! `util`), through the `cohort` binary: four workers racing on one pool over a burst of runs
//! claim each run exactly once, the runs owned by a worker that is listed online but never
//! claims are claimed all the same, and the deployment a worker reads for a run is never older
//! than the run (a job-variable change applies to runs created after it).
//!
//! Each worker talks to the server through its own fault proxy (`util/fault_proxy.rs`), which
//! injects nothing here: it only counts the requests by endpoint, printed per test (run with
//! `--nocapture` to see them). Outcomes are read back from the server: flow-run states, and
//! `prefect.worker.submitted-flow-run` events via `POST /api/events/filter`.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use util::fault_proxy::FaultProxy;
use util::{server, slugify, unique, DeploySpec, FlowRun, PrefectServer, Worker, WorkerKind};

/// Python start-up of each flow-run process is several seconds on a loaded 2-core machine.
const FLOW_RUN_TIMEOUT: Duration = Duration::from_secs(420);
/// Events are persisted asynchronously (batched flushes).
const EVENTS_TIMEOUT: Duration = Duration::from_secs(90);
/// Graceful stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

const SUBMITTED: &str = "prefect.worker.submitted-flow-run";

/// One test at a time: each measures what its workers cost the server, and the four-worker
/// burst of real flows keeps a SQLite server busy enough to answer the others' writes 503
/// for a minute.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}
const EXECUTED: &str = "prefect.worker.executed-flow-run";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn worker_name(what: &str) -> String {
    let id = unique("x");
    format!("E2E {what} {}", &id[2..])
}

fn worker_resource_id(name: &str) -> String {
    format!("prefect.worker.process.{}", slugify(name))
}

/// The upstream URL for a fault proxy in front of the shared server (no `/api`).
fn upstream(s: &PrefectServer) -> String {
    s.api_url().trim_end_matches("/api").to_owned()
}

/// A Cohort worker on `pool`, talking to the server through its own counting proxy.
struct Counted {
    name: String,
    proxy: FaultProxy,
    worker: Worker,
}

fn start_counted(s: &PrefectServer, pool: &str, what: &str) -> Counted {
    let name = worker_name(what);
    let proxy = FaultProxy::start(&upstream(s));
    let worker = Worker::builder(
        WorkerKind::Cohort,
        &["--pool", pool, "--type", "process", "--name", &name],
    )
    .api_url(&format!("{}/api", proxy.url()))
    // Prefect's default poll interval: the safety-net poll, not the event wake-up, is
    // what this leaves to time.
    .env("PREFECT_WORKER_QUERY_SECONDS", "10")
    .spawn();
    Counted {
        name,
        proxy,
        worker,
    }
}

/// Waits for the worker's `started` event: from then on its poller and event feeds run.
fn wait_started(s: &PrefectServer, name: &str) {
    s.wait_for_events(
        json!({
            "event": {"name": ["prefect.worker.started"]},
            "resource": {"id": [worker_resource_id(name)]},
        }),
        1,
        EVENTS_TIMEOUT,
    );
}

fn stop_gracefully(worker: &mut Worker) {
    worker.sigterm();
    let status = worker.wait_timeout(STOP_TIMEOUT);
    assert!(
        status.success(),
        "worker exit {status:?}\n{}",
        worker.output()
    );
}

/// The flow runs of `deployment_id` in `states` (state type names), up to 200.
fn runs_in_states(s: &PrefectServer, deployment_id: &str, states: &[&str]) -> Vec<Value> {
    let found = s.request(
        Method::POST,
        "/flow_runs/filter",
        Some(&json!({
            "flow_runs": {"state": {"type": {"any_": states}}},
            "deployments": {"id": {"any_": [deployment_id]}},
            "limit": 200,
        })),
    );
    found.as_array().cloned().unwrap_or_default()
}

/// Each worker's requests by endpoint, then the sum per run, as a table on stderr.
fn print_requests(title: &str, workers: &[&Counted], runs: usize) {
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        for (endpoint, n) in w.proxy.endpoint_counts() {
            *total.entry(endpoint).or_default() += n;
        }
    }
    let all: u64 = total.values().sum();
    let mut table = format!(
        "{title}: {} worker(s), {runs} runs, {all} REST requests, {:.2} per run\n",
        workers.len(),
        all as f64 / runs as f64
    );
    for (endpoint, n) in &total {
        table.push_str(&format!(
            "  {n:>6}  {:>6.2}/run  {endpoint}\n",
            *n as f64 / runs as f64
        ));
    }
    eprintln!("{table}");
}

/// Every run of `runs` was submitted exactly once, by the worker named `by` (its
/// `submitted-flow-run` events read back from the server), and none is left Scheduled.
fn assert_each_submitted_once_by(
    s: &PrefectServer,
    deployment_id: &str,
    runs: &[FlowRun],
    by: &str,
) {
    let filter = json!({
        "event": {"name": [SUBMITTED]},
        "related": {"id": [format!("prefect.deployment.{deployment_id}")]},
    });
    let events = s.wait_for_events(filter, runs.len(), FLOW_RUN_TIMEOUT);
    let mut per_run: HashMap<String, usize> = HashMap::new();
    for e in &events {
        assert_eq!(e["resource"]["prefect.resource.id"], worker_resource_id(by));
        for r in e["related"].as_array().into_iter().flatten() {
            if let Some(id) = r["prefect.resource.id"].as_str() {
                if let Some(run) = id.strip_prefix("prefect.flow-run.") {
                    *per_run.entry(run.to_owned()).or_default() += 1;
                }
            }
        }
    }
    for run in runs {
        assert_eq!(per_run.get(&run.id).copied(), Some(1), "run {}", run.id);
    }
    assert!(runs_in_states(s, deployment_id, &["SCHEDULED"]).is_empty());
}

/// Twelve runs of `deployment_id` created at once; each submitted exactly once by `w` (see
/// [`assert_each_submitted_once_by`]), which is then stopped. Returns them and its output.
fn twelve_runs_submitted_once_by(
    s: &PrefectServer,
    deployment_id: &str,
    w: &mut Counted,
) -> (Vec<FlowRun>, String) {
    let runs: Vec<FlowRun> = (0..12)
        .map(|_| s.create_flow_run(deployment_id, &[], json!({}), json!({})))
        .collect();
    assert_each_submitted_once_by(s, deployment_id, &runs, &w.name);
    stop_gracefully(&mut w.worker);
    (runs, w.worker.output())
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Four Cohort workers on one pool and a burst of 40 runs of `hello` created at once: every
/// run ends Completed, none is left Scheduled, and each was submitted exactly once: the
/// server holds exactly one `prefect.worker.submitted-flow-run` per run (over all four
/// workers). No worker read a run
/// back per `Scheduled` event it was woken by (`GET /flow_runs/{id}`).
#[test]
fn four_workers_submit_each_run_of_a_burst_exactly_once() {
    let _one = one_at_a_time();
    let s = server();
    let pool = unique("load-herd");
    s.create_work_pool(&pool, "process");
    // The flows talk to the server directly, so the proxies count only the workers.
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    let mut workers: Vec<Counted> = (0..4)
        .map(|i| start_counted(s, &pool, &format!("Herd {i}")))
        .collect();
    for w in &workers {
        wait_started(s, &w.name);
    }

    let runs: Vec<FlowRun> = (0..40)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})))
        .collect();
    let deadline = Instant::now() + FLOW_RUN_TIMEOUT;
    loop {
        let done = runs_in_states(s, &dep.id, &["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]);
        if done.len() == runs.len() {
            break;
        }
        for w in &mut workers {
            assert!(
                w.worker.try_wait().is_none(),
                "worker {} exited:\n{}",
                w.name,
                w.worker.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} runs final after {FLOW_RUN_TIMEOUT:?}",
            done.len(),
            runs.len()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let counted: Vec<&Counted> = workers.iter().collect();
    print_requests("burst of 40 `hello` runs", &counted, runs.len());

    for run in &runs {
        let state = s.read_flow_run(&run.id)["state"].clone();
        assert_eq!(state["type"], "COMPLETED", "{}: {state}", run.id);
    }
    assert!(runs_in_states(s, &dep.id, &["SCHEDULED"]).is_empty());

    // Exactly one submitted-flow-run per run, over the four workers.
    let names: HashMap<String, &str> = workers
        .iter()
        .map(|w| (worker_resource_id(&w.name), w.name.as_str()))
        .collect();
    let filter = json!({
        "event": {"name": [SUBMITTED]},
        "related": {"id": [format!("prefect.deployment.{}", dep.id)]},
    });
    let events = s.wait_for_events(filter.clone(), runs.len(), EVENTS_TIMEOUT);
    // Late duplicates would be persisted after the first ones: look once more.
    std::thread::sleep(Duration::from_secs(3));
    let events = s.read_events(filter).into_iter().chain(events).fold(
        HashMap::<String, Value>::new(),
        |mut by_id, e| {
            by_id.insert(e["id"].as_str().unwrap_or_default().to_owned(), e);
            by_id
        },
    );
    let mut submitted: HashMap<String, Vec<String>> = HashMap::new();
    for e in events.values() {
        let run = e["related"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["prefect.resource.role"] == "flow-run")
            .and_then(|r| r["prefect.resource.id"].as_str())
            .and_then(|id| id.strip_prefix("prefect.flow-run."))
            .expect("submitted-flow-run relates its flow run")
            .to_owned();
        let by = e["resource"]["prefect.resource.id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        submitted.entry(run).or_default().push(by);
    }
    let mut per_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for run in &runs {
        let by = submitted.get(&run.id).cloned().unwrap_or_default();
        assert_eq!(by.len(), 1, "run {} submitted by {by:?}", run.id);
        let name = names
            .get(&by[0])
            .expect("submitted by one of the four workers");
        *per_worker.entry(name).or_default() += 1;
    }
    eprintln!("runs per worker: {per_worker:?}");

    for w in &counted {
        let counts = w.proxy.endpoint_counts();
        let reads = counts
            .get("GET /api/flow_runs/{id}")
            .copied()
            .unwrap_or_default();
        assert_eq!(reads, 0, "{}: {counts:?}", w.name);
    }
    for w in &mut workers {
        stop_gracefully(&mut w.worker);
    }
}

/// A job-variable change saved to a deployment applies to every run created after it, even
/// right after the worker read that deployment for other runs: runs claimed before the change
/// run the old `command` (exit 3), runs created right after it the new one (exit 5), each
/// read back as the
/// `prefect.infrastructure.status-code` of its `executed-flow-run` event.
#[test]
fn deployment_change_applies_to_runs_created_after_it() {
    let _one = one_at_a_time();
    let s = server();
    let pool = unique("load-fresh");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(json!({"command": "sh -c 'exit 3'"})),
    );
    let mut w = start_counted(s, &pool, "Fresh");
    wait_started(s, &w.name);

    let before: Vec<FlowRun> = (0..5)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})))
        .collect();
    // Claimed (and their deployment read) before the change.
    let submitted = json!({
        "event": {"name": [SUBMITTED]},
        "related": {"id": [format!("prefect.deployment.{}", dep.id)]},
    });
    s.wait_for_events(submitted, before.len(), FLOW_RUN_TIMEOUT);
    s.request(
        Method::PATCH,
        &format!("/deployments/{}", dep.id),
        Some(&json!({"job_variables": {"command": "sh -c 'exit 5'"}})),
    );
    let after: Vec<FlowRun> = (0..5)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})))
        .collect();

    let filter = json!({
        "event": {"name": [EXECUTED]},
        "related": {"id": [format!("prefect.deployment.{}", dep.id)]},
    });
    let events = s.wait_for_events(filter, before.len() + after.len(), FLOW_RUN_TIMEOUT);
    let status_of = |run: &FlowRun| -> String {
        let event = events
            .iter()
            .find(|e| {
                e["related"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["prefect.resource.id"] == format!("prefect.flow-run.{}", run.id))
            })
            .unwrap_or_else(|| panic!("no {EXECUTED} for {}", run.id));
        event["related"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|r| r["prefect.infrastructure.status-code"].as_str())
            .unwrap_or_else(|| panic!("no status code in {event}"))
            .to_owned()
    };
    for run in &before {
        assert_eq!(
            status_of(run),
            "3",
            "run {} created before the change",
            run.id
        );
    }
    for run in &after {
        assert_eq!(
            status_of(run),
            "5",
            "run {} created after the change",
            run.id
        );
    }
    print_requests(
        "deployment change mid-burst",
        &[&w],
        before.len() + after.len(),
    );
    stop_gracefully(&mut w.worker);
}

/// A worker the server lists online but that never claims (here a name that only heartbeats,
/// as a stopped worker looks until the server marks it offline) owns a share of the runs: the
/// Cohort worker claims that share too, once its owner has let it pass.
#[test]
fn runs_owned_by_a_worker_that_never_claims_are_claimed_all_the_same() {
    let _one = one_at_a_time();
    let s = server();
    let pool = unique("load-ghost");
    s.create_work_pool(&pool, "process");
    let ghost = worker_name("Ghost");
    s.request(
        Method::POST,
        &format!("/work_pools/{pool}/workers/heartbeat"),
        Some(&json!({"name": ghost, "heartbeat_interval_seconds": 30})),
    );
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({"command": "true"})));
    let mut w = start_counted(s, &pool, "Survivor");
    wait_started(s, &w.name);

    let (runs, output) = twelve_runs_submitted_once_by(s, &dep.id, &mut w);
    // The ghost owned some of the 12 runs (all 12 going to one of two names has odds 2^-11):
    // the worker took them over rather than claiming everything at once.
    let taken_over = output
        .matches("claiming a run its owner has let pass")
        .count();
    assert!(
        taken_over > 0 && taken_over < runs.len(),
        "runs taken over from the ghost: {taken_over}\n{output}"
    );
    print_requests("a listed worker that never claims", &[&w], runs.len());
}

/// A worker that stopped (its `prefect.worker.stopped` event sent) is still listed online by
/// the server for up to three heartbeat intervals, but owns no run from then on: the worker
/// left on the pool claims every run at once instead of waiting for the stopped one to let
/// its share pass.
#[test]
fn runs_of_a_worker_that_stopped_are_claimed_without_waiting_for_it() {
    let _one = one_at_a_time();
    let s = server();
    let pool = unique("load-stopped");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({"command": "true"})));
    let mut gone = start_counted(s, &pool, "Gone");
    let mut w = start_counted(s, &pool, "Survivor");
    wait_started(s, &gone.name);
    wait_started(s, &w.name);
    stop_gracefully(&mut gone.worker);
    s.wait_for_events(
        json!({
            "event": {"name": ["prefect.worker.stopped"]},
            "resource": {"id": [worker_resource_id(&gone.name)]},
        }),
        1,
        EVENTS_TIMEOUT,
    );
    let listed = s.request(
        Method::POST,
        &format!("/work_pools/{pool}/workers/filter"),
        Some(&json!({"workers": {"status": {"any_": ["ONLINE"]}}})),
    );
    let listed: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert!(
        listed.contains(&gone.name.as_str()),
        "the stopped worker is still listed online: {listed:?}"
    );
    // The event is persisted once the server has handled it; its stream to subscribers runs
    // beside that.
    std::thread::sleep(Duration::from_secs(1));

    let (runs, output) = twelve_runs_submitted_once_by(s, &dep.id, &mut w);
    // The stopped worker would have owned about half of the 12 runs (none has odds 2^-12).
    assert!(
        !output.contains("claiming a run its owner has let pass"),
        "runs were left waiting for the stopped worker:\n{output}"
    );
    print_requests("a worker that stopped", &[&w], runs.len());
}
