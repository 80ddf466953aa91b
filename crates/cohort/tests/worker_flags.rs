//! End-to-end tests of the worker's less travelled paths against a real Prefect 3.8.8 server
//! (see `util`), each through the `cohort` binary: `--work-queue`, `--prefetch-seconds`, the
//! REST heartbeat when the worker channel is refused, the second signal that stops running
//! flows at once, and a cancel that lands between Pending and Submitting.
//!
//! Everything is read back from the server (flow-run states, logs, the work pool's workers,
//! events via `POST /api/events/filter`). The fault proxy (`util/fault_proxy.rs`) stands
//! between worker and server only where a real server cannot be made to do it on demand: a
//! server without the worker-channel endpoint, and a request held in flight at one chosen
//! moment.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use util::fault_proxy::FaultProxy;
use util::trials::{flow_run_of, orphans_after};
use util::{encode, server, slugify, unique, DeploySpec, FlowRun, PrefectServer, Worker};

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

fn worker_name(what: &str) -> String {
    let id = unique("x");
    format!("E2E {what} {}", &id[2..])
}

fn worker_args<'a>(pool: &'a str, name: &'a str) -> Vec<&'a str> {
    vec!["--pool", pool, "--type", "process", "--name", name]
}

fn worker_events_filter(name: &str) -> Value {
    json!({
        "event": {"prefix": ["prefect.worker."]},
        "resource": {"id": [format!("prefect.worker.process.{}", slugify(name))]},
    })
}

/// Waits for the worker's `started` event: from then on its poller and event feeds run.
fn wait_started(s: &PrefectServer, name: &str) {
    s.wait_for_events(worker_events_filter(name), 1, EVENTS_TIMEOUT);
}

/// `POST /deployments/{id}/create_flow_run` with `extra` fields (`state`,
/// `work_queue_name`, …) merged into the body.
fn create_run(s: &PrefectServer, deployment_id: &str, extra: Value) -> FlowRun {
    let mut body = json!({"parameters": {}, "job_variables": {}, "tags": []});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let run = s.request(
        Method::POST,
        &format!("/deployments/{deployment_id}/create_flow_run"),
        Some(&body),
    );
    FlowRun {
        id: run["id"].as_str().expect("run id").to_owned(),
        name: run["name"].as_str().expect("run name").to_owned(),
    }
}

fn state_of(s: &PrefectServer, run: &FlowRun) -> Value {
    s.read_flow_run(&run.id)["state"].clone()
}

/// Wait for the flow run's final state, failing early if `worker` exits first.
fn wait_final(s: &PrefectServer, worker: &mut Worker, run: &FlowRun) -> Value {
    let deadline = Instant::now() + FLOW_RUN_TIMEOUT;
    loop {
        let state = state_of(s, run);
        if matches!(
            state["type"].as_str(),
            Some("COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
        ) {
            return state;
        }
        if let Some(status) = worker.try_wait() {
            panic!(
                "worker exited ({status}) before flow run {} was final; last state: {state}",
                run.id
            );
        }
        assert!(
            Instant::now() < deadline,
            "flow run {} not final after {FLOW_RUN_TIMEOUT:?}; last state: {state}",
            run.id
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn stop_gracefully(worker: &mut Worker) {
    worker.sigterm();
    let status = worker.wait_timeout(STOP_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "worker exit after SIGTERM: {status}"
    );
}

fn occurred(e: &Value) -> chrono::DateTime<chrono::Utc> {
    e["occurred"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("bad occurred in {e}"))
        .with_timezone(&chrono::Utc)
}

/// The worker's `submitted-flow-run` events, by flow run.
fn submitted_runs(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == SUBMITTED)
        .filter_map(flow_run_of)
        .collect()
}

fn event_names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?"))
        .collect()
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// True while `pid` exists and is not a zombie.
fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The upstream URL for a fault proxy in front of the shared server (no `/api`).
fn upstream(s: &PrefectServer) -> String {
    s.api_url().trim_end_matches("/api").to_owned()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// `--work-queue`: a pool with queues `default`, `q1`, `q2`, `q3` and one run in each.
/// Worker A (`--work-queue q1`) polls only every 120 s, so it can find runs only through the
/// pool's `Scheduled` events, which it also receives for the other queues' runs; worker B
/// (`--work-queue q2 --work-queue q3`, repeated) polls every 2 s. A completes only q1's run,
/// B only q2's and q3's; the `default` run is still Scheduled after both have polled (B
/// many times) and no worker emitted a `submitted-flow-run` for it.
#[test]
fn work_queue_flag_claims_only_the_named_queues() {
    let s = server();
    let pool = unique("e2e-queues");
    s.create_work_pool(&pool, "process");
    for q in ["q1", "q2", "q3"] {
        s.request(
            Method::POST,
            &format!("/work_pools/{}/queues/", encode(&pool)),
            Some(&json!({"name": q})),
        );
    }
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));

    let name_a = worker_name("Queue A");
    let mut args_a = worker_args(&pool, &name_a);
    args_a.extend(["--work-queue", "q1"]);
    let mut worker_a = Worker::builder(util::WorkerKind::Cohort, &args_a)
        .env("PREFECT_WORKER_QUERY_SECONDS", "120")
        .spawn();
    let name_b = worker_name("Queue B");
    let mut args_b = worker_args(&pool, &name_b);
    args_b.extend(["--work-queue", "q2", "-q", "q3"]);
    let mut worker_b = Worker::builder(util::WorkerKind::Cohort, &args_b)
        .env("PREFECT_WORKER_QUERY_SECONDS", "2")
        .spawn();
    wait_started(s, &name_a);
    wait_started(s, &name_b);

    // Created after both workers listen, so each run's Scheduled event reaches both.
    let created = Instant::now();
    let runs: Vec<(&str, FlowRun)> = ["default", "q1", "q2", "q3"]
        .into_iter()
        .map(|q| (q, create_run(s, &dep.id, json!({"work_queue_name": q}))))
        .collect();
    for (q, run) in &runs {
        assert_eq!(
            s.read_flow_run(&run.id)["work_queue_name"],
            *q,
            "run {} is not in queue {q}",
            run.id
        );
    }
    let [(_, in_default), (_, in_q1), (_, in_q2), (_, in_q3)] = &runs[..] else {
        unreachable!()
    };
    let state = wait_final(s, &mut worker_a, in_q1);
    assert_eq!(state["type"], "COMPLETED", "q1 run: {state}");
    for run in [in_q2, in_q3] {
        let state = wait_final(s, &mut worker_b, run);
        assert_eq!(state["type"], "COMPLETED", "{}: {state}", run.id);
    }
    // B polls every 2 s (±30 %): by now it has polled many times; give it a few more.
    std::thread::sleep(Duration::from_secs(8));
    assert!(created.elapsed() > Duration::from_secs(10));
    let state = state_of(s, in_default);
    assert_eq!(
        state["type"], "SCHEDULED",
        "the default queue's run was claimed: {state}"
    );
    stop_gracefully(&mut worker_a);
    stop_gracefully(&mut worker_b);

    let events_a = s.wait_for_events(worker_events_filter(&name_a), 4, EVENTS_TIMEOUT);
    let events_b = s.wait_for_events(worker_events_filter(&name_b), 6, EVENTS_TIMEOUT);
    assert_eq!(
        submitted_runs(&events_a),
        std::slice::from_ref(&in_q1.id),
        "worker A (q1):\n{}",
        util::summarize_events(&events_a)
    );
    let b: BTreeSet<String> = submitted_runs(&events_b).into_iter().collect();
    assert_eq!(
        b,
        BTreeSet::from([in_q2.id.clone(), in_q3.id.clone()]),
        "worker B (q2, q3):\n{}",
        util::summarize_events(&events_b)
    );
    assert_eq!(
        submitted_runs(&events_b).len(),
        2,
        "worker B submitted a run twice:\n{}",
        util::summarize_events(&events_b)
    );
    // Nobody, not even a worker of another test, submitted the default queue's run.
    let about_default = s.read_events(json!({
        "event": {"prefix": ["prefect.worker."]},
        "related": {"id": [format!("prefect.flow-run.{}", in_default.id)]},
    }));
    assert!(
        about_default.is_empty(),
        "worker events for the default queue's run:\n{}",
        util::summarize_events(&about_default)
    );
}

/// `--prefetch-seconds`: two pools, each with a run scheduled 40 s ahead. The worker with
/// `--prefetch-seconds 30` claims its run about 30 s early (its `submitted-flow-run` occurs
/// no earlier than scheduled − 30 s, and it is Pending well before scheduled − 10 s); the one
/// with `--prefetch-seconds 0` leaves its run Scheduled until then, and claims it at its
/// scheduled time. Both runs complete.
#[test]
fn prefetch_seconds_claims_runs_that_early_and_no_earlier() {
    let s = server();
    let lead = chrono::Duration::seconds(40);
    let setup = |prefetch: &'static str| {
        let pool = unique(&format!("e2e-prefetch{prefetch}"));
        s.create_work_pool(&pool, "process");
        let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
        let name = worker_name(&format!("Prefetch {prefetch}"));
        let mut args = worker_args(&pool, &name);
        args.extend(["--prefetch-seconds", prefetch]);
        let worker = Worker::builder(util::WorkerKind::Cohort, &args)
            .env("PREFECT_WORKER_QUERY_SECONDS", "2")
            .spawn();
        (dep, name, worker)
    };
    let (dep_early, name_early, mut early) = setup("30");
    let (dep_late, name_late, mut late) = setup("0");
    wait_started(s, &name_early);
    wait_started(s, &name_late);

    let scheduled = chrono::Utc::now() + lead;
    let scheduled_state = json!({
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": rfc3339(scheduled)}},
    });
    let run_early = create_run(s, &dep_early.id, scheduled_state.clone());
    let run_late = create_run(s, &dep_late.id, scheduled_state);
    for run in [&run_early, &run_late] {
        let state = state_of(s, run);
        assert_eq!(state["type"], "SCHEDULED", "{state}");
    }

    // Until scheduled − 10 s, the prefetch-0 run stays Scheduled while both workers poll
    // every 2 s; by then the prefetch-30 run has long been claimed.
    let checkpoint = scheduled - chrono::Duration::seconds(10);
    while chrono::Utc::now() < checkpoint {
        let state = state_of(s, &run_late);
        assert!(
            chrono::Utc::now() >= checkpoint || state["type"] == "SCHEDULED",
            "claimed before its scheduled time with --prefetch-seconds 0: {state}"
        );
        assert!(
            early.try_wait().is_none(),
            "worker exited:\n{}",
            early.output()
        );
        assert!(
            late.try_wait().is_none(),
            "worker exited:\n{}",
            late.output()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let state = state_of(s, &run_early);
    assert_ne!(
        state["type"], "SCHEDULED",
        "not claimed 10 s before its scheduled time with --prefetch-seconds 30"
    );

    for (worker, run) in [(&mut early, &run_early), (&mut late, &run_late)] {
        let state = wait_final(s, worker, run);
        assert_eq!(state["type"], "COMPLETED", "{}: {state}", run.id);
    }
    stop_gracefully(&mut early);
    stop_gracefully(&mut late);

    let submitted_at = |name: &str| {
        let events = s.wait_for_events(worker_events_filter(name), 4, EVENTS_TIMEOUT);
        let submitted: Vec<&Value> = events.iter().filter(|e| e["event"] == SUBMITTED).collect();
        assert_eq!(submitted.len(), 1, "{}", util::summarize_events(&events));
        occurred(submitted[0])
    };
    // The poll asks for runs scheduled before now + prefetch: never earlier than that. (The
    // second of slack covers the server's rounding of timestamps; both clocks are this
    // machine's.)
    let slack = chrono::Duration::seconds(1);
    let early_at = submitted_at(&name_early);
    assert!(
        early_at >= scheduled - chrono::Duration::seconds(30) - slack,
        "claimed at {early_at}, more than 30 s before {scheduled}"
    );
    assert!(
        early_at < checkpoint,
        "claimed at {early_at}, not well before {scheduled}"
    );
    let late_at = submitted_at(&name_late);
    assert!(
        late_at >= scheduled - slack,
        "claimed at {late_at}, before its scheduled time {scheduled}"
    );
}

/// The worker channel refused: the fault proxy answers the channel's websocket upgrade
/// (`/work_pools/{pool}/workers/connect`) with 404, as a server without that endpoint does
/// (a real 3.8.8 server cannot be told to refuse it). The worker heartbeats over REST
/// instead: the server's record of it (`POST /work_pools/{pool}/workers/filter`) shows
/// `last_heartbeat_time` advancing heartbeat after heartbeat (every 2 s here), with the
/// interval the worker announced; and a flow still completes.
#[test]
fn worker_heartbeats_over_rest_when_the_worker_channel_is_refused() {
    let s = server();
    let proxy = FaultProxy::start(&upstream(s));
    proxy.refuse_websockets("/workers/connect", 404);
    let pool = unique("e2e-restbeat");
    s.create_work_pool(&pool, "process");
    // The flow talks to the server directly: only the worker is behind the proxy.
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    let name = worker_name("Rest Heartbeat");
    let mut worker = Worker::builder(util::WorkerKind::Cohort, &worker_args(&pool, &name))
        .api_url(&format!("{}/api", proxy.url()))
        .env("PREFECT_WORKER_HEARTBEAT_SECONDS", "2")
        .spawn();
    wait_started(s, &name);

    let heartbeat = || -> Option<(String, Value)> {
        let workers = s.request(
            Method::POST,
            &format!("/work_pools/{}/workers/filter", encode(&pool)),
            Some(&json!({})),
        );
        let me = workers
            .as_array()?
            .iter()
            .find(|w| w["name"] == name.as_str())?
            .clone();
        Some((
            me["last_heartbeat_time"].as_str()?.to_owned(),
            me["heartbeat_interval_seconds"].clone(),
        ))
    };
    // Four distinct heartbeat times: at least three heartbeats after the first one.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "heartbeats seen by the server: {seen:?}; proxy {:?}\n{}",
            proxy.stats(),
            worker.output()
        );
        assert!(
            worker.try_wait().is_none(),
            "worker exited:\n{}",
            worker.output()
        );
        if let Some((time, interval)) = heartbeat() {
            assert_eq!(interval, 2, "heartbeat interval the server recorded");
            seen.insert(time);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let stats = proxy.stats();
    assert!(
        stats.refused_websockets >= 1,
        "the worker never tried the channel: {stats:?}"
    );

    let run = create_run(s, &dep.id, json!({}));
    let state = wait_final(s, &mut worker, &run);
    assert_eq!(state["type"], "COMPLETED", "{state}");
    stop_gracefully(&mut worker);
    // Channel problems degrade quietly: a terminal refusal is not retried in a loop.
    assert!(
        proxy.stats().refused_websockets <= 2,
        "the refused channel was retried: {:?}",
        proxy.stats()
    );
}

/// A second SIGTERM stops running flows now: with `--drain-timeout 600` the first SIGTERM
/// leaves the 300 s flow running (the worker waits), the second stops it at once. The run
/// ends Crashed (the flow was stopped because its supervisor shut down, `docs/compat.md`),
/// the worker exits 0 well before any drain deadline, the flow's process is gone, and
/// `executed-flow-run` and `stopped` are stored.
#[test]
fn second_signal_stops_running_flows_at_once() {
    let s = server();
    let pool = unique("e2e-force");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 300})));
    let run = create_run(s, &dep.id, json!({}));
    let name = worker_name("Force");
    let mut args = worker_args(&pool, &name);
    args.extend(["--drain-timeout", "600", "--termination-grace", "10"]);
    let mut worker = Worker::cohort(&args);
    let deadline = Instant::now() + FLOW_RUN_TIMEOUT;
    while state_of(s, &run)["type"] != "RUNNING" {
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

    worker.sigterm();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        worker.try_wait().is_none(),
        "the worker did not wait for its flow after the first SIGTERM:\n{}",
        worker.output()
    );
    assert!(pid_alive(pid), "the flow was stopped by the first SIGTERM");
    assert_eq!(state_of(s, &run)["type"], "RUNNING");

    worker.sigterm();
    // Far below the 600 s drain deadline: only the second signal can end it this soon.
    let status = worker.wait_timeout(Duration::from_secs(90));
    assert_eq!(status.code(), Some(0), "worker exit: {status}");
    assert!(
        !pid_alive(pid),
        "flow-run process {pid} survived the worker"
    );
    let left = orphans_after(std::slice::from_ref(&run.id), Duration::from_secs(10));
    assert!(left.is_empty(), "orphans: {left:?}");
    let state = s.wait_for_final_state(&run.id, Duration::from_secs(60));
    assert_eq!(state["type"], "CRASHED", "{state}");

    let events = s.wait_for_events(worker_events_filter(&name), 4, EVENTS_TIMEOUT);
    assert_eq!(
        event_names(&events),
        [STARTED, SUBMITTED, EXECUTED, STOPPED],
        "{}",
        util::summarize_events(&events)
    );
    let flow_run = events[2]["related"]
        .as_array()
        .expect("related")
        .iter()
        .find(|r| r["prefect.resource.role"] == "flow-run")
        .expect("flow-run related")
        .clone();
    assert_eq!(
        flow_run["prefect.infrastructure.identifier"],
        pid.to_string()
    );
}

/// A cancel that arrives between Pending and Submitting, made deterministic: the fault proxy
/// holds the worker's Submitting proposal while the test sets the run Cancelling on the
/// server, then lets it through. The server aborts the Submitting proposal (the run is
/// Cancelling); the worker forces Cancelled with "Flow run was cancelled before execution
/// started." and launches nothing: no `infrastructure_pid`, no flow output or flow logs.
/// Events: `submitted-flow-run` (emitted before Submitting, as Prefect does) and no
/// `executed-flow-run`, since nothing executed (`docs/compat.md`).
#[test]
fn cancel_between_pending_and_submitting_launches_nothing() {
    let s = server();
    let proxy = FaultProxy::start(&upstream(s));
    proxy.hold_next("/set_state", "Submitting");
    let pool = unique("e2e-early-cancel");
    s.create_work_pool(&pool, "process");
    let greeting = unique("never-printed");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .parameters(json!({"name": greeting}))
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    let name = worker_name("Early Cancel");
    let mut worker = Worker::builder(util::WorkerKind::Cohort, &worker_args(&pool, &name))
        .api_url(&format!("{}/api", proxy.url()))
        .env("PREFECT_WORKER_QUERY_SECONDS", "2")
        .spawn();
    let run = create_run(s, &dep.id, json!({}));

    assert!(
        proxy.wait_until_held(FLOW_RUN_TIMEOUT),
        "the worker never proposed Submitting:\n{}",
        worker.output()
    );
    let state = state_of(s, &run);
    assert_eq!(
        (state["type"].as_str(), state["name"].as_str()),
        (Some("PENDING"), Some("Pending")),
        "{state}"
    );
    s.request(
        Method::POST,
        &format!("/flow_runs/{}/set_state", run.id),
        Some(&json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true})),
    );
    proxy.release_held();

    let state = wait_final(s, &mut worker, &run);
    assert_eq!(state["type"], "CANCELLED", "{state}");
    assert_eq!(
        state["message"], "Flow run was cancelled before execution started.",
        "{state}"
    );
    // Let a (wrongly) launched flow show itself before looking for it.
    std::thread::sleep(Duration::from_secs(5));
    stop_gracefully(&mut worker);
    let flow_run = s.read_flow_run(&run.id);
    assert!(
        flow_run["infrastructure_pid"].is_null(),
        "a process was launched: {flow_run}"
    );
    assert_eq!(flow_run["state"]["type"], "CANCELLED");
    assert!(
        !worker.output().contains(&greeting),
        "the flow ran:\n{}",
        worker.output()
    );
    let logs = s.read_logs(&run.id);
    let foreign: Vec<&Value> = logs
        .iter()
        .filter(|l| l["name"] != "prefect.flow_runs.worker")
        .collect();
    assert!(foreign.is_empty(), "the flow logged: {foreign:?}");
    assert!(
        !logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("submitted to infrastructure"))),
        "{logs:?}"
    );

    let events = s.wait_for_events(worker_events_filter(&name), 3, EVENTS_TIMEOUT);
    assert_eq!(
        event_names(&events),
        [STARTED, SUBMITTED, STOPPED],
        "{}",
        util::summarize_events(&events)
    );
    assert_eq!(flow_run_of(&events[1]).as_deref(), Some(run.id.as_str()));
    assert_eq!(proxy.stats().held, 1);
}
