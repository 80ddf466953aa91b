//! End-to-end tests of `cohort worker start --type process` against a real Prefect 3.8.8
//! server (see `util`): flow runs are deployed and created by REST, a worker process runs
//! them, and every assertion reads the outcome back from the server (flow-run states,
//! labels, work pools, the run's logs, and the worker's events via `POST
//! /api/events/filter`) — never from the worker's own output, except for the start-up
//! failures whose point is the message.
//!
//! The expectations are what Prefect's own process worker does (`prefect/workers/base.py`,
//! `prefect/workers/process.py`), with two documented differences: the worker resource of
//! Cohort's events carries one extra label, `cohort.version`, and some bad-input cases
//! fail fast with a clear message where Prefect only logs (marked "Cohort-specific" below).
//! `COHORT_E2E_WORKER=python cargo test -p cohort --test worker` runs the same scenarios
//! against `prefect worker start` to check the shared expectations (the Cohort-specific
//! checks then assert what Prefect does instead; its event snapshots are the `@python`
//! files next to Cohort's).

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use util::{
    server, slugify, unique, unused_port, DeploySpec, FlowRun, PrefectServer, Worker, WorkerKind,
};

/// Python start-up of each flow-run process is several seconds on a loaded 2-core machine.
const FLOW_RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// Events are persisted asynchronously (batched flushes).
const EVENTS_TIMEOUT: Duration = Duration::from_secs(60);
/// Graceful stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

const STARTED: &str = "prefect.worker.started";
const STOPPED: &str = "prefect.worker.stopped";
const SUBMITTED: &str = "prefect.worker.submitted-flow-run";
const EXECUTED: &str = "prefect.worker.executed-flow-run";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A worker name with spaces and capitals (exercises the slug) unique to this run.
fn worker_name(what: &str) -> String {
    let id = unique("x");
    format!("E2E {what} {}", &id[2..])
}

fn worker_args<'a>(pool: &'a str, name: &'a str) -> Vec<&'a str> {
    vec!["--pool", pool, "--type", "process", "--name", name]
}

fn worker_resource_id(name: &str) -> String {
    format!("prefect.worker.process.{}", slugify(name))
}

/// The worker resource exactly as Prefect's worker sends it, plus `cohort.version` for
/// Cohort (`prefect/workers/base.py: BaseWorker._event_resource`).
fn expected_worker_resource(kind: WorkerKind, s: &PrefectServer, name: &str) -> Value {
    let mut r = json!({
        "prefect.resource.id": worker_resource_id(name),
        "prefect.resource.name": name,
        "prefect.version": s.version(),
        "prefect.worker-type": "process",
    });
    if kind == WorkerKind::Cohort {
        r["cohort.version"] = json!(env!("CARGO_PKG_VERSION"));
    }
    r
}

fn work_pool_related(pool_id: &str, pool: &str) -> Value {
    json!({
        "prefect.resource.id": format!("prefect.work-pool.{pool_id}"),
        "prefect.resource.role": "work-pool",
        "prefect.resource.name": pool,
    })
}

/// Related resources of submitted/executed events, in Prefect's order: deployment, flow,
/// flow-run, tags (sorted, raw text), work-pool (`prefect/workers/base.py:
/// BaseWorker._event_related_resources`).
fn expected_run_related(
    dep: &util::Deployment,
    run: &FlowRun,
    tags: &[&str],
    pool_id: &str,
    pool: &str,
    infrastructure: Option<(&str, &str)>,
) -> Value {
    let mut flow_run = json!({
        "prefect.resource.id": format!("prefect.flow-run.{}", run.id),
        "prefect.resource.role": "flow-run",
        "prefect.resource.name": run.name,
    });
    if let Some((identifier, status_code)) = infrastructure {
        flow_run["prefect.infrastructure.identifier"] = json!(identifier);
        flow_run["prefect.infrastructure.status-code"] = json!(status_code);
    }
    let mut tags: Vec<&str> = tags.to_vec();
    tags.sort_unstable();
    tags.dedup();
    let mut related = vec![
        json!({
            "prefect.resource.id": format!("prefect.deployment.{}", dep.id),
            "prefect.resource.role": "deployment",
            "prefect.resource.name": dep.name,
        }),
        json!({
            "prefect.resource.id": format!("prefect.flow.{}", dep.flow_id),
            "prefect.resource.role": "flow",
            "prefect.resource.name": dep.flow_name,
        }),
        flow_run,
    ];
    related.extend(tags.iter().map(|t| {
        json!({"prefect.resource.id": format!("prefect.tag.{t}"), "prefect.resource.role": "tag"})
    }));
    related.push(work_pool_related(pool_id, pool));
    Value::Array(related)
}

/// The one event named `name` among `events`.
fn only<'a>(events: &'a [Value], name: &str) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| e["event"] == name).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {name} event, got:\n{}",
        util::summarize_events(events)
    );
    found[0]
}

/// Checks shared by every worker event: payload `{}`, a UUIDv7 id, `occurred` present.
fn assert_event_basics(e: &Value) {
    assert_eq!(e["payload"], json!({}), "payload of {e}");
    let id = e["id"].as_str().unwrap_or_else(|| panic!("no id in {e}"));
    let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|err| panic!("id {id}: {err}"));
    assert_eq!(uuid.get_version_num(), 7, "event id {id} is not a UUIDv7");
    assert!(e["occurred"].is_string(), "occurred of {e}");
}

fn occurred(e: &Value) -> chrono::DateTime<chrono::Utc> {
    e["occurred"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("bad occurred in {e}"))
        .with_timezone(&chrono::Utc)
}

fn worker_events_filter(name: &str) -> Value {
    json!({
        "event": {"prefix": ["prefect.worker."]},
        "resource": {"id": [worker_resource_id(name)]},
    })
}

fn flow_run_events_filter(run_id: &str) -> Value {
    json!({
        "event": {"prefix": ["prefect.worker."]},
        "related": {"id": [format!("prefect.flow-run.{run_id}")]},
    })
}

fn pool_id(s: &PrefectServer, pool: &str) -> String {
    let p = s
        .read_work_pool(pool)
        .unwrap_or_else(|| panic!("pool {pool} not found"));
    p["id"].as_str().expect("pool id").to_owned()
}

/// The worker's `prefect.worker.started`, read back from the server, once.
fn assert_started(s: &PrefectServer, name: &str, worker: &Worker) {
    let started = s.wait_for_events(
        json!({
            "event": {"name": ["prefect.worker.started"]},
            "resource": {"id": [worker_resource_id(name)]},
        }),
        1,
        Duration::from_secs(90),
    );
    assert_eq!(started.len(), 1, "{}", worker.output());
}

/// Wait for the flow run's final state, failing early if the worker exits first.
fn wait_final(s: &PrefectServer, worker: &mut Worker, run: &FlowRun) -> Value {
    let deadline = Instant::now() + FLOW_RUN_TIMEOUT;
    loop {
        let state = s.read_flow_run(&run.id)["state"].clone();
        if matches!(
            state["type"].as_str(),
            Some("COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
        ) {
            return state;
        }
        if let Some(status) = worker.try_wait() {
            panic!(
                "worker exited ({status}) before flow run {} ({}) was final; last state: {state}",
                run.name, run.id
            );
        }
        assert!(
            Instant::now() < deadline,
            "flow run {} ({}) not final after {FLOW_RUN_TIMEOUT:?}; last state: {state}",
            run.name,
            run.id
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// SIGTERM the worker and expect a clean exit (code 0).
fn stop_gracefully(worker: &mut Worker) {
    worker.sigterm();
    let status = worker.wait_timeout(STOP_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "worker exit after SIGTERM: {status}"
    );
}

/// Replace run-specific values (ids, names, pids, times) with stable placeholders so the
/// events can be snapshotted.
struct Redactions {
    pairs: Vec<(String, String)>,
}

impl Redactions {
    fn new() -> Redactions {
        Redactions { pairs: Vec::new() }
    }

    fn add(mut self, value: &str, placeholder: &str) -> Redactions {
        self.pairs
            .push((value.to_owned(), format!("[{placeholder}]")));
        self
    }

    fn apply(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => {
                let mut out = s.clone();
                // Longest first: a name can be a prefix of another (pool vs its queue).
                let mut pairs: Vec<&(String, String)> = self.pairs.iter().collect();
                pairs.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
                for (value, placeholder) in pairs {
                    if out == *value {
                        return Value::String(placeholder.clone());
                    }
                    if value.len() >= 8 {
                        out = out.replace(value.as_str(), placeholder);
                    }
                }
                Value::String(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.apply(x)).collect()),
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, x)| (k.clone(), self.apply(x))).collect())
            }
            other => other.clone(),
        }
    }
}

fn assert_event_snapshot(name: &str, event: &Value, redactions: &Redactions) {
    let mut event = redactions.apply(event);
    if event["resource"].get("cohort.version").is_some() {
        // Asserted exactly by the caller; a version bump must not churn the snapshots.
        event["resource"]["cohort.version"] = json!("[cohort-version]");
    }
    let mut settings = insta::Settings::clone_current();
    settings.set_sort_maps(true);
    settings.set_prepend_module_to_snapshot(true);
    // Prefect's own worker (COHORT_E2E_WORKER=python) has its snapshots side by side
    // (`…@python.snap`): the two differ by the `cohort.version` label only.
    // Against another Prefect server than the pinned 3.8.8 (the newest, 3.9.1, in the test
    // command), its own snapshots: recorded against it, they differ by the version labels.
    let mut suffix = Vec::new();
    if WorkerKind::under_test() == WorkerKind::Python {
        suffix.push("python".to_owned());
    }
    let version = server().version();
    if version != "3.8.8" {
        suffix.push(format!("prefect-{version}"));
    }
    if !suffix.is_empty() {
        settings.set_snapshot_suffix(suffix.join("-"));
    }
    settings.bind(|| {
        insta::assert_json_snapshot!(name, event, {
            ".id" => "[event-id]",
            ".occurred" => "[time]",
            ".received" => "[time]",
        });
    });
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// A `hello` run with deployment and flow-run tags: Completed, worker labels on the run,
/// and the four worker events read back label for label, then a graceful SIGTERM.
#[test]
fn hello_run_completes_with_prefect_worker_events() {
    let s = server();
    let kind = WorkerKind::under_test();
    let pool = unique("e2e-hello");
    s.create_work_pool(&pool, "process");
    let pool_id = pool_id(s, &pool);
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .tags(&["team-a", "env-dev"])
            .parameters(json!({"name": "Cohort"})),
    );
    // Flow-run tags are the deployment's plus these (the server merges them).
    let run = s.create_flow_run(&dep.id, &["run-extra", "Big Tag"], json!({}), json!({}));
    let all_tags = ["team-a", "env-dev", "run-extra", "Big Tag"];
    let name = worker_name("Hello");
    let mut worker = Worker::under_test(&worker_args(&pool, &name));

    let state = wait_final(s, &mut worker, &run);
    assert_eq!(state["type"], "COMPLETED", "final state: {state}");

    // The worker PATCHes its identity onto the flow run (BaseWorker._give_worker_labels_to_flow_run).
    let flow_run = s.read_flow_run(&run.id);
    let labels = &flow_run["labels"];
    assert_eq!(
        labels["prefect.worker.name"],
        json!(name),
        "labels: {labels}"
    );
    assert_eq!(labels["prefect.worker.type"], "process", "labels: {labels}");
    assert_eq!(
        labels["prefect.work-pool.name"],
        json!(pool),
        "labels: {labels}"
    );
    assert_eq!(
        labels["prefect.work-pool.id"],
        json!(pool_id),
        "labels: {labels}"
    );
    let pid = flow_run["infrastructure_pid"]
        .as_str()
        .unwrap_or_else(|| panic!("no infrastructure_pid on {flow_run}"))
        .to_owned();
    pid.parse::<u32>()
        .unwrap_or_else(|e| panic!("infrastructure_pid {pid:?} is not a pid: {e}"));

    let events = s.wait_for_events(worker_events_filter(&name), 3, EVENTS_TIMEOUT);
    let resource = expected_worker_resource(kind, s, &name);
    let pool_related = json!([work_pool_related(&pool_id, &pool)]);

    let started = only(&events, STARTED);
    assert_event_basics(started);
    assert_eq!(started["resource"], resource);
    assert_eq!(started["related"], pool_related);
    assert_eq!(started["follows"], Value::Null);

    let submitted = only(&events, SUBMITTED);
    assert_event_basics(submitted);
    assert_eq!(submitted["resource"], resource);
    assert_eq!(
        submitted["related"],
        expected_run_related(&dep, &run, &all_tags, &pool_id, &pool, None)
    );
    assert_eq!(submitted["follows"], Value::Null);

    let executed = only(&events, EXECUTED);
    assert_event_basics(executed);
    assert_eq!(executed["resource"], resource);
    assert_eq!(
        executed["related"],
        expected_run_related(&dep, &run, &all_tags, &pool_id, &pool, Some((&pid, "0")))
    );
    assert_eq!(executed["follows"], submitted["id"]);
    assert!(occurred(started) <= occurred(submitted));
    assert!(occurred(submitted) <= occurred(executed));

    stop_gracefully(&mut worker);
    let events = s.wait_for_events(worker_events_filter(&name), 4, EVENTS_TIMEOUT);
    assert_eq!(
        events.len(),
        4,
        "worker events:\n{}",
        util::summarize_events(&events)
    );
    let stopped = only(&events, STOPPED);
    assert_event_basics(stopped);
    assert_eq!(stopped["resource"], resource);
    assert_eq!(stopped["related"], pool_related);
    assert_eq!(stopped["follows"], started["id"]);
    assert_eq!(
        events.last(),
        Some(stopped),
        "stopped is the last worker event"
    );

    let redactions = Redactions::new()
        .add(&name, "worker-name")
        .add(&slugify(&name), "worker-slug")
        .add(&pool_id, "pool-id")
        .add(&pool, "pool")
        .add(&dep.id, "deployment-id")
        .add(&dep.name, "deployment")
        .add(&dep.flow_id, "flow-id")
        .add(&run.id, "flow-run-id")
        .add(&run.name, "flow-run-name")
        .add(&pid, "pid")
        .add(started["id"].as_str().unwrap(), "started-id")
        .add(submitted["id"].as_str().unwrap(), "submitted-id");
    assert_event_snapshot("started", started, &redactions);
    assert_event_snapshot("submitted_flow_run", submitted, &redactions);
    assert_event_snapshot("executed_flow_run", executed, &redactions);
    assert_event_snapshot("stopped", stopped, &redactions);
}

/// A flow that raises ends Failed with infrastructure status "0" (the engine reports the
/// outcome and exits 0); a flow that hard-exits with 3 ends Crashed with status "3".
#[test]
fn failed_and_crashed_runs_report_state_and_exit_code() {
    let s = server();
    let kind = WorkerKind::under_test();
    let pool = unique("e2e-fail");
    s.create_work_pool(&pool, "process");
    let pool_id = pool_id(s, &pool);
    let fail_dep = s.deploy(&DeploySpec::new(&pool, "fail"));
    let crash_dep = s.deploy(&DeploySpec::new(&pool, "crash").tags(&["hard-exit"]));
    let fail_run = s.create_flow_run(&fail_dep.id, &[], json!({}), json!({}));
    let crash_run = s.create_flow_run(&crash_dep.id, &[], json!({}), json!({}));
    let name = worker_name("Fail");
    let mut worker = Worker::under_test(&worker_args(&pool, &name));

    let fail_state = wait_final(s, &mut worker, &fail_run);
    let crash_state = wait_final(s, &mut worker, &crash_run);
    assert_eq!(fail_state["type"], "FAILED", "fail: {fail_state}");
    let fail_message = fail_state["message"].as_str().unwrap_or_default();
    assert!(
        fail_message.contains("ValueError"),
        "fail message: {fail_message:?}"
    );
    assert_eq!(crash_state["type"], "CRASHED", "crash: {crash_state}");
    let crash_message = crash_state["message"].as_str().unwrap_or_default();
    assert!(
        crash_message.contains("status code") && crash_message.contains('3'),
        "crash message should name the exit status 3: {crash_message:?}"
    );

    let resource = expected_worker_resource(kind, s, &name);
    for (dep, run, tags, code) in [
        (&fail_dep, &fail_run, vec![], "0"),
        (&crash_dep, &crash_run, vec!["hard-exit"], "3"),
    ] {
        let events = s.wait_for_events(flow_run_events_filter(&run.id), 2, EVENTS_TIMEOUT);
        let submitted = only(&events, SUBMITTED);
        let executed = only(&events, EXECUTED);
        let pid = s.read_flow_run(&run.id)["infrastructure_pid"]
            .as_str()
            .unwrap_or_else(|| panic!("no infrastructure_pid on {}", run.id))
            .to_owned();
        assert_event_basics(executed);
        assert_eq!(executed["resource"], resource);
        assert_eq!(
            executed["related"],
            expected_run_related(dep, run, &tags, &pool_id, &pool, Some((&pid, code))),
            "executed event of {}",
            dep.flow_name
        );
        assert_eq!(executed["follows"], submitted["id"]);
        if code == "3" {
            let redactions = Redactions::new()
                .add(&name, "worker-name")
                .add(&slugify(&name), "worker-slug")
                .add(&pool_id, "pool-id")
                .add(&pool, "pool")
                .add(&dep.id, "deployment-id")
                .add(&dep.name, "deployment")
                .add(&dep.flow_id, "flow-id")
                .add(&run.id, "flow-run-id")
                .add(&run.name, "flow-run-name")
                .add(&pid, "pid")
                .add(submitted["id"].as_str().unwrap(), "submitted-id");
            assert_event_snapshot("executed_flow_run_crashed", executed, &redactions);
        }
    }
    stop_gracefully(&mut worker);
}

/// A worker started on a pool that does not exist creates it: type `process`, with
/// Prefect's default process base job template — or the `--base-job-template` file.
#[test]
fn worker_creates_missing_pool() {
    let s = server();
    let default_pool = unique("e2e-created");
    let custom_pool = unique("e2e-created-custom");
    let cli_pool = unique("e2e-cli");
    assert!(s.read_work_pool(&default_pool).is_none());
    assert!(s.read_work_pool(&custom_pool).is_none());

    let mut custom_template = s.process_base_job_template().clone();
    custom_template["variables"]["properties"]["env"]["default"] = json!({"FROM_TEMPLATE": "1"});
    let template_file = util::json_temp_file(&custom_template);
    let template_path = template_file
        .path()
        .to_str()
        .expect("utf-8 temp path")
        .to_owned();

    let default_name = worker_name("Creator");
    let custom_name = worker_name("Custom Creator");
    let mut default_worker = Worker::under_test(&worker_args(&default_pool, &default_name));
    let mut custom_args = worker_args(&custom_pool, &custom_name);
    custom_args.extend(["--base-job-template", template_path.as_str()]);
    let mut custom_worker = Worker::under_test(&custom_args);

    // What `prefect work-pool create --type process` makes, for comparison.
    s.run_prefect_cli(&["work-pool", "create", &cli_pool, "--type", "process"]);
    let cli_template =
        s.read_work_pool(&cli_pool).expect("CLI-created pool")["base_job_template"].clone();
    assert_eq!(&cli_template, s.process_base_job_template());

    for (pool, worker, expected) in [
        (&default_pool, &mut default_worker, &cli_template),
        (&custom_pool, &mut custom_worker, &custom_template),
    ] {
        let created = util::poll(
            &format!("work pool {pool} to be created with a template"),
            Duration::from_secs(90),
            Duration::from_millis(500),
            || {
                if let Some(status) = worker.try_wait() {
                    panic!("worker exited ({status}) before creating pool {pool}");
                }
                s.read_work_pool(pool)
                    .filter(|p| p["base_job_template"] != json!({}))
            },
        );
        assert_eq!(created["type"], "process", "pool {pool}: {created}");
        assert_eq!(&created["base_job_template"], expected, "pool {pool}");
    }

    // The started event points at the pool the worker created.
    for (pool, name) in [(&default_pool, &default_name), (&custom_pool, &custom_name)] {
        let events = s.wait_for_events(worker_events_filter(name), 1, EVENTS_TIMEOUT);
        let started = only(&events, STARTED);
        assert_eq!(
            started["related"],
            json!([work_pool_related(&pool_id(s, pool), pool)])
        );
    }
    stop_gracefully(&mut default_worker);
    stop_gracefully(&mut custom_worker);
}

/// Bad job variables crash only their own run: a `command` that does not exist, and an
/// `env` that is a list (the pool's variables schema here lets it through the server's
/// validation). A later good run on the same worker still completes.
#[test]
fn bad_job_variables_crash_only_that_run() {
    let s = server();
    let pool = unique("e2e-badvars");
    let mut template = s.process_base_job_template().clone();
    template["variables"]["properties"]["env"] = json!({"title": "Environment Variables"});
    s.create_work_pool_with_template(&pool, "process", template);
    let good_dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let bad_cmd_dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(json!({"command": "/nonexistent/cmd"})),
    );
    let bad_cmd_run = s.create_flow_run(&bad_cmd_dep.id, &[], json!({}), json!({}));
    let bad_env_run = s.create_flow_run(&good_dep.id, &[], json!({"env": ["A=1"]}), json!({}));
    let name = worker_name("Bad Vars");
    let mut worker = Worker::under_test(&worker_args(&pool, &name));

    let bad_env_state = wait_final(s, &mut worker, &bad_env_run);
    assert_eq!(
        bad_env_state["type"], "CRASHED",
        "env as a list: {bad_env_state}"
    );
    let message = bad_env_state["message"].as_str().unwrap_or_default();
    // prefect/workers/base.py: BaseWorker._submit_run_and_capture_errors
    assert!(
        message.starts_with("Failed to submit flow run to infrastructure"),
        "env as a list: {message:?}"
    );

    let bad_cmd_state = wait_final(s, &mut worker, &bad_cmd_run);
    assert_eq!(
        bad_cmd_state["type"], "CRASHED",
        "missing command: {bad_cmd_state}"
    );
    let message = bad_cmd_state["message"].as_str().unwrap_or_default();
    if worker.kind() == WorkerKind::Cohort {
        // Cohort-specific: Prefect 3.8.8 says "Flow run could not start: unhandled errors
        // in a TaskGroup (1 sub-exception)", which does not say what went wrong.
        assert!(
            message.contains("/nonexistent/cmd"),
            "missing command: the message should name it: {message:?}"
        );
    } else {
        assert_eq!(
            message,
            "Flow run could not start: unhandled errors in a TaskGroup (1 sub-exception)"
        );
    }

    let good_run = s.create_flow_run(&good_dep.id, &[], json!({}), json!({}));
    let good_state = wait_final(s, &mut worker, &good_run);
    assert_eq!(
        good_state["type"], "COMPLETED",
        "later good run: {good_state}"
    );

    // Events of the good run are persisted, so the bad runs' would be too: a run whose
    // configuration cannot be built gets no event; a run whose process never started gets
    // `submitted` but no `executed` (run() raised: prefect/workers/base.py).
    s.wait_for_events(flow_run_events_filter(&good_run.id), 2, EVENTS_TIMEOUT);
    let bad_env_events = s.read_events(flow_run_events_filter(&bad_env_run.id));
    assert!(
        bad_env_events.is_empty(),
        "env as a list:\n{}",
        util::summarize_events(&bad_env_events)
    );
    let bad_cmd_events = s.read_events(flow_run_events_filter(&bad_cmd_run.id));
    only(&bad_cmd_events, SUBMITTED);
    assert_eq!(
        bad_cmd_events.len(),
        1,
        "missing command:\n{}",
        util::summarize_events(&bad_cmd_events)
    );
    assert!(worker.try_wait().is_none(), "the worker keeps running");
    stop_gracefully(&mut worker);
}

/// The flow-run process gets the worker's env contract (`prefect/workers/base.py:
/// BaseJobConfiguration.prepare_for_flow_run`) and the job variables' `env`, merged pool
/// default < deployment < flow run. Read back from the run's logs (`print_env` logs its
/// findings), not from the worker's output.
#[test]
fn flow_run_env_contract_and_env_merge() {
    let s = server();
    let pool = unique("e2e-env");
    let mut template = s.process_base_job_template().clone();
    template["variables"]["properties"]["env"]["default"] =
        json!({"POOL_ONLY": "pool", "OVERRIDE_ME": "pool"});
    s.create_work_pool_with_template(&pool, "process", template);
    let names = [
        "PREFECT_API_URL",
        "PREFECT__FLOW_RUN_ID",
        "PREFECT__FLOW_ID",
        "PREFECT__FLOW_NAME",
        "PREFECT__DEPLOYMENT_ID",
        "PREFECT__DEPLOYMENT_NAME",
        "PREFECT__WORKER_NAME",
        "POOL_ONLY",
        "DEP_ONLY",
        "RUN_ONLY",
        "OVERRIDE_ME",
    ];
    let dep = s.deploy(
        &DeploySpec::new(&pool, "print_env")
            .job_variables(json!({"env": {"DEP_ONLY": "dep", "OVERRIDE_ME": "dep"}}))
            .parameters(json!({"names": names})),
    );
    let run = s.create_flow_run(
        &dep.id,
        &[],
        json!({"env": {"RUN_ONLY": "run", "OVERRIDE_ME": "run"}}),
        json!({}),
    );
    let name = worker_name("Env");
    let mut worker = Worker::under_test(&worker_args(&pool, &name));
    let state = wait_final(s, &mut worker, &run);
    assert_eq!(state["type"], "COMPLETED", "final state: {state}");

    // Flow-run logs are shipped in batches: poll for the summary line.
    let env: Value = util::poll(
        "the ENV-JSON log line of print_env",
        EVENTS_TIMEOUT,
        Duration::from_millis(500),
        || {
            s.read_logs(&run.id).iter().find_map(|log| {
                let message = log["message"].as_str()?;
                let json = message.strip_prefix("ENV-JSON ")?;
                Some(serde_json::from_str(json).expect("ENV-JSON is JSON"))
            })
        },
    );
    let expected = json!({
        "PREFECT_API_URL": s.api_url(),
        "PREFECT__FLOW_RUN_ID": run.id,
        "PREFECT__FLOW_ID": dep.flow_id,
        "PREFECT__FLOW_NAME": "print_env",
        "PREFECT__DEPLOYMENT_ID": dep.id,
        "PREFECT__DEPLOYMENT_NAME": dep.name,
        "PREFECT__WORKER_NAME": name,
        "POOL_ONLY": "pool",
        "DEP_ONLY": "dep",
        "RUN_ONLY": "run",
        "OVERRIDE_ME": "run",
    });
    assert_eq!(env, expected);
    stop_gracefully(&mut worker);
}

/// A server that is down at start-up (connection refused) is waited for, as Prefect's worker
/// does ("Unable to reach the Prefect API while starting up; the worker will keep attempting
/// to connect"): once it answers, the worker starts. The server is "down" behind the fault
/// proxy, whose listening socket is closed (a real refused connection) and then reopened.
#[test]
fn server_down_at_startup_is_waited_for() {
    let s = server();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = util::fault_proxy::FaultProxy::start(&upstream);
    proxy.set_down(true);
    let pool = unique("e2e-down-at-start");
    let name = worker_name("Down At Start");
    let kind = WorkerKind::under_test();
    let mut worker = Worker::builder(kind, &worker_args(&pool, &name))
        .api_url(&format!("{}/api", proxy.url()))
        .spawn();
    util::poll(
        "the worker to say it cannot reach the API and will retry",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            worker
                .stderr()
                .contains("Unable to reach the Prefect API")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        worker.try_wait().is_none(),
        "the worker gave up while the server was down:\n{}",
        worker.output()
    );
    proxy.set_down(false);
    assert_started(s, &name, &worker);
    stop_gracefully(&mut worker);
}

/// A server too busy to answer at start-up (503, which a SQLite server answers under load) is
/// waited for past the client's own retries: the pool read and the PATCH that fills the
/// pool's empty base job template are sent again until they are answered, and the worker
/// starts. A worker that gave up at that PATCH after its retries, with "cannot reach the
/// Prefect API", was seen beside a loaded server. `PREFECT_CLIENT_MAX_RETRIES=1` spends the
/// client's retries on the first two 503s of each.
#[test]
fn a_busy_server_at_startup_is_waited_for() {
    let s = server();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = util::fault_proxy::FaultProxy::start(&upstream);
    let pool = unique("e2e-busy-at-start");
    s.create_work_pool_with_template(&pool, "process", json!({}));
    proxy.fail_next(4, 503, Some(&format!("GET /api/work_pools/{pool}")));
    proxy.fail_next(4, 503, Some(&format!("PATCH /api/work_pools/{pool}")));
    let name = worker_name("Busy At Start");
    let mut worker = Worker::builder(WorkerKind::Cohort, &worker_args(&pool, &name))
        .api_url(&format!("{}/api", proxy.url()))
        .env("PREFECT_CLIENT_MAX_RETRIES", "1")
        .spawn();
    assert_started(s, &name, &worker);
    assert_eq!(proxy.stats().failed, 8, "{}", worker.output());
    for what in [
        "reading the work pool",
        "filling the pool's base job template",
    ] {
        assert!(
            worker
                .stderr()
                .contains(&format!("while starting up ({what}); retrying")),
            "no retry of {what} logged:\n{}",
            worker.output()
        );
    }
    let template = &s.read_work_pool(&pool).expect("the pool")["base_job_template"];
    assert!(
        template["job_configuration"]["command"].is_string(),
        "the empty template was not filled: {template}"
    );
    stop_gracefully(&mut worker);
}

/// Cohort-specific: a wrong URL fails fast, naming it: a host that does not resolve, or a
/// server that is not a Prefect API (404). (Prefect's worker keeps retrying those too.)
#[test]
fn wrong_api_url_fails_fast_naming_the_url() {
    let s = server();
    let not_an_api = format!("{}/not-the-api", s.api_url().trim_end_matches("/api"));
    for url in [
        "http://cohort-no-such-host.invalid/api",
        not_an_api.as_str(),
    ] {
        let pool = unique("e2e-wrong-url");
        let name = worker_name("Wrong Url");
        let started = Instant::now();
        let mut worker = Worker::builder(WorkerKind::Cohort, &worker_args(&pool, &name))
            .api_url(url)
            .spawn();
        let status = worker.wait_timeout(Duration::from_secs(30));
        let elapsed = started.elapsed();
        assert!(!status.success(), "{url}: exit status {status}");
        assert!(
            elapsed < Duration::from_secs(20),
            "{url}: took {elapsed:?} to give up"
        );
        let stderr = worker.stderr();
        assert!(
            stderr.contains(url.trim_end_matches("/api")),
            "stderr should name {url}:\n{stderr}"
        );
    }
}

/// Cohort-specific: a `--type process` worker refuses a pool of another type and leaves
/// the pool alone. (Prefect's worker logs "Worker type mismatch! This worker process
/// expects type 'process' but received 'docker' from the server. Unexpected behavior may
/// occur." and keeps running; under `COHORT_E2E_WORKER=python` that is what is checked.)
#[test]
fn pool_type_mismatch_is_refused() {
    let s = server();
    let pool = unique("e2e-docker");
    s.create_work_pool(&pool, "docker");
    let name = worker_name("Mismatch");
    let mut worker = Worker::under_test(&worker_args(&pool, &name));
    if worker.kind() == WorkerKind::Python {
        util::poll(
            "Prefect's worker to warn about the type mismatch",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                worker
                    .stderr()
                    .contains("Worker type mismatch!")
                    .then_some(())
            },
        );
        assert!(
            worker.try_wait().is_none(),
            "Prefect's worker keeps running"
        );
        stop_gracefully(&mut worker);
        return;
    }
    let status = worker.wait_timeout(Duration::from_secs(60));
    assert!(!status.success(), "exit status {status}");
    let stderr = worker.stderr();
    assert!(
        stderr.contains(&pool) && stderr.contains("docker") && stderr.contains("process"),
        "stderr should name the pool and both types:\n{stderr}"
    );
    let after = s.read_work_pool(&pool).expect("pool still exists");
    assert_eq!(after["type"], "docker");
}

// ---------------------------------------------------------------------------------------
// Cohort's own operating behaviour: slots, run-once, healthcheck, phased shutdown
// ---------------------------------------------------------------------------------------

/// `--limit 1`: a second run is claimed only once the first one's slot is free, so its
/// `submitted-flow-run` comes after the first run's `executed-flow-run`.
#[test]
fn limit_claims_only_into_free_slots() {
    let s = server();
    let pool = unique("e2e-limit");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 2})));
    let runs: Vec<FlowRun> = (0..2)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})))
        .collect();
    let name = worker_name("Limit");
    let mut args = worker_args(&pool, &name);
    args.extend(["--limit", "1"]);
    let mut worker = Worker::cohort(&args);
    for run in &runs {
        let state = wait_final(s, &mut worker, run);
        assert_eq!(state["type"], "COMPLETED", "{}: {state}", run.id);
    }
    let events = s.wait_for_events(worker_events_filter(&name), 5, EVENTS_TIMEOUT);
    let of_run =
        |name: &str, run: &FlowRun| -> Value {
            events
                .iter()
                .find(|e| {
                    e["event"] == name
                        && e["related"].as_array().unwrap().iter().any(|r| {
                            r["prefect.resource.id"] == format!("prefect.flow-run.{}", run.id)
                        })
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no {name} for {}: {}",
                        run.id,
                        util::summarize_events(&events)
                    )
                })
                .clone()
        };
    // Whichever run went first, the other was submitted only after it finished.
    let (a, b) = (&runs[0], &runs[1]);
    let (first, second) = if occurred(&of_run(SUBMITTED, a)) <= occurred(&of_run(SUBMITTED, b)) {
        (a, b)
    } else {
        (b, a)
    };
    assert!(
        occurred(&of_run(SUBMITTED, second)) >= occurred(&of_run(EXECUTED, first)),
        "the second run was claimed while the first still held the only slot:\n{}",
        util::summarize_events(&events)
    );
    stop_gracefully(&mut worker);
}

/// `--run-once`: one poll, the claimed run supervised to its end, then a clean exit with
/// `stopped` as the last event. (Prefect's worker emits `stopped` before the run is even
/// submitted and leaves the run to finish unsupervised; Cohort waits for it.)
#[test]
fn run_once_supervises_its_runs_then_exits() {
    let s = server();
    let pool = unique("e2e-once");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let name = worker_name("Once");
    let mut args = worker_args(&pool, &name);
    args.push("--run-once");
    let mut worker = Worker::cohort(&args);
    let status = worker.wait_timeout(FLOW_RUN_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit: {status}\n{}",
        worker.output()
    );
    let state = s.read_flow_run(&run.id)["state"].clone();
    assert_eq!(state["type"], "COMPLETED", "{state}");
    let events = s.wait_for_events(worker_events_filter(&name), 4, EVENTS_TIMEOUT);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [STARTED, SUBMITTED, EXECUTED, STOPPED],
        "{}",
        util::summarize_events(&events)
    );
}

/// `--with-healthcheck` serves Prefect's `GET /health` answer on the configured address.
#[test]
fn healthcheck_answers_like_prefect() {
    let s = server();
    let pool = unique("e2e-health");
    s.create_work_pool(&pool, "process");
    let port = unused_port().to_string();
    let name = worker_name("Health");
    let mut args = worker_args(&pool, &name);
    args.push("--with-healthcheck");
    let mut worker = Worker::builder(WorkerKind::Cohort, &args)
        .env("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
        .env("PREFECT_WORKER_WEBSERVER_PORT", &port)
        .spawn();
    let url = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        if let Ok(resp) = reqwest::blocking::get(&url) {
            break (resp.status().as_u16(), resp.json::<Value>().unwrap());
        }
        assert!(
            worker.try_wait().is_none(),
            "worker exited:\n{}",
            worker.output()
        );
        assert!(
            Instant::now() < deadline,
            "no healthcheck on {url}:\n{}",
            worker.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!((status, body), (200, json!({"message": "OK"})));
    stop_gracefully(&mut worker);
}

/// SIGTERM with a flow still running: the worker stops claiming, waits out
/// `--drain-timeout`, then stops the flow's whole process group; the run still gets its
/// `executed-flow-run` before `stopped`, and no process of the run survives.
#[test]
fn shutdown_drains_then_stops_running_flows() {
    let s = server();
    let pool = unique("e2e-drain");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 600})));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let name = worker_name("Drain");
    let mut args = worker_args(&pool, &name);
    args.extend(["--drain-timeout", "2", "--termination-grace", "10"]);
    let mut worker = Worker::cohort(&args);
    let deadline = Instant::now() + FLOW_RUN_TIMEOUT;
    while s.read_flow_run(&run.id)["state"]["type"] != "RUNNING" {
        assert!(
            worker.try_wait().is_none(),
            "worker exited:\n{}",
            worker.output()
        );
        assert!(
            Instant::now() < deadline,
            "run never started:\n{}",
            worker.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let pid: i32 = s.read_flow_run(&run.id)["infrastructure_pid"]
        .as_str()
        .expect("infrastructure_pid")
        .parse()
        .expect("pid");
    stop_gracefully(&mut worker);
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
    assert!(!alive, "flow-run process {pid} survived the worker");
    let state = s.wait_for_final_state(&run.id, Duration::from_secs(60));
    assert_eq!(state["type"], "CRASHED", "{state}");
    let events = s.wait_for_events(worker_events_filter(&name), 4, EVENTS_TIMEOUT);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [STARTED, SUBMITTED, EXECUTED, STOPPED],
        "{}",
        util::summarize_events(&events)
    );
    let executed = &events[2];
    let flow_run = executed["related"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefect.resource.role"] == "flow-run")
        .unwrap();
    assert_eq!(
        flow_run["prefect.infrastructure.identifier"],
        pid.to_string()
    );
    assert!(
        flow_run["prefect.infrastructure.status-code"].is_string(),
        "{flow_run}"
    );
}

/// A run created while the worker idles between polls is picked up from the server's event
/// stream (`prefect.flow-run.Scheduled` of the pool) rather than at the next poll: with a
/// 120 s poll interval (the next poll ≥ 84 s away), it still completes within a minute —
/// and, with event wake-up off, is still Scheduled 15 s after it was created.
#[test]
fn scheduled_runs_wake_the_poller() {
    let s = server();
    let pool = unique("e2e-wake");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let name = worker_name("Wake");
    let mut worker = Worker::builder(WorkerKind::Cohort, &worker_args(&pool, &name))
        .env("PREFECT_WORKER_QUERY_SECONDS", "120")
        .spawn();
    // The first poll happens right after `started`.
    s.wait_for_events(worker_events_filter(&name), 1, EVENTS_TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = s.read_flow_run(&run.id)["state"].clone();
        if state["type"] == "COMPLETED" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not picked up from the event stream; last state {state}\n{}",
            worker.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    stop_gracefully(&mut worker);

    // The control: with event wake-up off (`COHORT_EVENT_WAKE=0`), the same run waits for
    // the next poll.
    let pool = unique("e2e-nowake");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let name = worker_name("No Wake");
    let mut worker = Worker::builder(WorkerKind::Cohort, &worker_args(&pool, &name))
        .env("PREFECT_WORKER_QUERY_SECONDS", "120")
        .env("COHORT_EVENT_WAKE", "0")
        .spawn();
    s.wait_for_events(worker_events_filter(&name), 1, EVENTS_TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    std::thread::sleep(Duration::from_secs(15));
    let state = s.read_flow_run(&run.id)["state"].clone();
    assert_eq!(
        state["type"],
        "SCHEDULED",
        "picked up without the event stream?\n{}",
        worker.output()
    );
    stop_gracefully(&mut worker);
}

/// A `--base-job-template` file that is not JSON, or not a template, is a usage error (exit
/// 64) naming the file, before the worker touches the server.
#[test]
fn malformed_base_job_template_file_is_a_usage_error() {
    let s = server();
    for (content, expect) in [
        ("{not json", "is not valid JSON"),
        (
            r#"{"variables": {}}"#,
            "must be an object with `job_configuration` and `variables`",
        ),
    ] {
        let pool = unique("e2e-badtemplate");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), content).unwrap();
        let path = file.path().display().to_string();
        let mut args = worker_args(&pool, "bad-template");
        args.extend(["--base-job-template", path.as_str()]);
        let mut worker = Worker::cohort(&args);
        let status = worker.wait_timeout(Duration::from_secs(30));
        assert_eq!(
            status.code(),
            Some(64),
            "{content}: {status}\n{}",
            worker.output()
        );
        let stderr = worker.stderr();
        assert!(
            stderr.contains(expect) && stderr.contains(&path),
            "{content}: expected {expect:?} and the path in:\n{stderr}"
        );
        assert!(
            s.read_work_pool(&pool).is_none(),
            "the pool was created anyway"
        );
    }
}

/// An unwritable `$PREFECT_HOME` means no durable event outbox: the worker refuses to start
/// with a clear error, and claims nothing it could not journal.
#[test]
fn unwritable_prefect_home_fails_before_claiming() {
    let s = server();
    let pool = unique("e2e-nohome");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let home = tempfile::tempdir().unwrap();
    // A file where the outbox's directory should be: unwritable even for root.
    let blocked = home.path().join("home");
    std::fs::write(&blocked, "not a directory").unwrap();
    let mut worker = Worker::builder(WorkerKind::Cohort, &worker_args(&pool, "no-home"))
        .env("PREFECT_HOME", blocked.to_str().unwrap())
        .spawn();
    let status = worker.wait_timeout(Duration::from_secs(30));
    assert!(!status.success(), "started anyway:\n{}", worker.output());
    let stderr = worker.stderr();
    assert!(
        stderr.contains("cannot open the event outbox") && stderr.contains("PREFECT_HOME"),
        "{stderr}"
    );
    assert_eq!(s.read_flow_run(&run.id)["state"]["type"], "SCHEDULED");
}
