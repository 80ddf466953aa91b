//! Fault trials 2, 3 and 6 (`docs/reliability.md`): a worker killed and restarted, and a
//! worker that cannot journal. Real server, real flows, real SIGKILLs.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use util::trials::{
    collect_events, flow_run_label, orphans, orphans_after, serial, state_counts, Figures,
    EXECUTED, STARTED, STATUS_CODE_LABEL, STOPPED, SUBMITTED,
};
use util::{poll, server, unique, DeploySpec, Worker, WorkerKind};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const EVENTS_TIMEOUT: Duration = Duration::from_secs(90);
const EVENTS_SETTLE: Duration = Duration::from_secs(4);

/// How many times the run entered Running (`GET /flow_run_states/`): more than once means it
/// was executed twice.
fn times_running(run_id: &str) -> usize {
    let s = server();
    let states = s.request(
        reqwest::Method::GET,
        &format!("/flow_run_states/?flow_run_id={run_id}"),
        None,
    );
    states
        .as_array()
        .map_or(0, |a| a.iter().filter(|st| st["type"] == "RUNNING").count())
}

/// Trial 2: the worker is SIGKILLed while runs execute, and started again under the same name
/// and `PREFECT_HOME`. Runs still running are re-adopted and finish; runs that ended while no
/// worker was up are reported with the exit code their shim recorded (a flow that exits 3
/// without reporting is marked Crashed then). Each run has exactly one `submitted` and one
/// `executed` event, none ran twice, and no process is left behind.
#[test]
fn trial_2_worker_sigkilled_while_runs_execute_then_restarted() {
    let _serial = serial();
    let started_at = Instant::now();
    let s = server();
    let pool = unique("trial2");
    s.create_work_pool(&pool, "process");
    let long = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 25})));
    let short = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 1})));
    let crash = s.deploy(&DeploySpec::new(&pool, "crash"));
    let mut runs = Vec::new();
    for (dep, n) in [(&long, 2), (&short, 1)] {
        for _ in 0..n {
            runs.push(s.create_flow_run(&dep.id, &[], json!({}), json!({})).id);
        }
    }
    let crash_run = s.create_flow_run(&crash.id, &[], json!({}), json!({})).id;
    runs.push(crash_run.clone());

    let home = tempfile::tempdir().unwrap();
    let name = unique("Trial2 Worker");
    let args = [
        "--pool",
        pool.as_str(),
        "--name",
        name.as_str(),
        "--type",
        "process",
    ];
    let mut first = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    // Kill it as soon as every run has a flow process: the short and crashing flows are
    // still starting Python then, and end while no worker is up.
    poll(
        "every run launched",
        RUN_TIMEOUT,
        Duration::from_millis(100),
        || {
            runs.iter()
                .all(|id| !s.read_flow_run(id)["infrastructure_pid"].is_null())
                .then_some(())
        },
    );
    first.sigkill();
    let first_output = first.output();
    let alive_after_kill = orphans(&runs).len();
    // The short and crashing runs end while no worker is up.
    for id in [&runs[2], &crash_run] {
        poll(
            "the short runs to end while the worker is down",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || orphans(std::slice::from_ref(id)).is_empty().then_some(()),
        );
    }

    let mut second = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let finals: Vec<Value> = runs
        .iter()
        .map(|id| s.wait_for_final_state(id, RUN_TIMEOUT))
        .collect();
    second.sigterm();
    second.wait_timeout(Duration::from_secs(60));

    let mut expected: Vec<(&str, Option<&str>)> = vec![(STARTED, None), (STOPPED, None)];
    for id in &runs {
        expected.push((SUBMITTED, Some(id)));
        expected.push((EXECUTED, Some(id)));
    }
    let mut figures = Figures::new("trial 2");
    figures.runs = runs.len();
    // Two `started` (one per worker process) and one `stopped` (the killed one sent none):
    // count the starts apart, the tally expects one per pair.
    let mut events = collect_events(s, &name, &expected, EVENTS_TIMEOUT, EVENTS_SETTLE);
    let starts = events.of(STARTED, None).len();
    if starts == 2 {
        events.duplicate_pairs -= 1;
        events.duplicated.retain(|d| !d.starts_with(STARTED));
    }
    figures.events = events;
    figures.states = state_counts(s, &runs);
    let twice: Vec<&String> = runs.iter().filter(|id| times_running(id) > 1).collect();
    figures.orphans = orphans_after(&runs, Duration::from_secs(10));
    figures.note("flow processes alive after the kill", alive_after_kill);
    figures.note("ran twice", twice.len());
    figures.note("worker starts", starts);
    figures.wall = started_at.elapsed();
    figures.print();

    let context = format!(
        "first worker:\n{first_output}\nsecond worker:\n{}",
        second.output()
    );
    figures.assert_clean(&context);
    assert_eq!(starts, 2, "{context}");
    assert!(twice.is_empty(), "ran twice: {twice:?}\n{context}");
    assert!(
        alive_after_kill >= 2,
        "the flows died with their worker\n{context}"
    );
    for (id, state) in runs.iter().zip(&finals) {
        let executed = &figures.events.of(EXECUTED, Some(id))[0];
        let code = flow_run_label(executed, STATUS_CODE_LABEL);
        if *id == crash_run {
            assert_eq!(state["type"], "CRASHED", "{context}");
            assert_eq!(code.as_deref(), Some("3"), "{context}");
        } else {
            assert_eq!(state["type"], "COMPLETED", "run {id}: {state}\n{context}");
            assert_eq!(code.as_deref(), Some("0"), "{context}");
        }
        let submitted = &figures.events.of(SUBMITTED, Some(id))[0];
        assert_eq!(
            executed["follows"], submitted["id"],
            "executed must follow the original submitted event\n{context}"
        );
    }
}

/// Trial 3: the worker is killed after its claim (the run is Pending) and before the launch,
/// stuck retrying a busy server (the fault proxy answers 503 to the labels call, a real step
/// between the two). Restarted, it finds the claim in its journal and the run still Pending,
/// and finishes the submission: the run is launched once, with the one `submitted` event the
/// first worker journaled (re-sent under the same id, which the server keeps once).
#[test]
fn trial_3_worker_killed_between_pending_and_launch() {
    let _serial = serial();
    let started_at = Instant::now();
    let s = server();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = util::fault_proxy::FaultProxy::start(&upstream);
    let pool = unique("trial3");
    s.create_work_pool(&pool, "process");
    // Flows talk to the server directly: the fault is the worker's.
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    proxy.fail_next(1000, 503, Some("/labels"));

    let home = tempfile::tempdir().unwrap();
    let name = unique("Trial3 Worker");
    let args = [
        "--pool",
        pool.as_str(),
        "--name",
        name.as_str(),
        "--type",
        "process",
    ];
    let mut first = Worker::builder(WorkerKind::Cohort, &args)
        .api_url(&format!("{}/api", proxy.url()))
        .home(home.path())
        .spawn();
    poll(
        "the run to be claimed (Pending)",
        RUN_TIMEOUT,
        Duration::from_millis(100),
        || (s.read_flow_run(&run)["state"]["type"] == "PENDING").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    first.sigkill();
    let first_output = first.output();
    let state_after_kill = s.read_flow_run(&run)["state"].clone();
    let launched_before_restart = !s.read_flow_run(&run)["infrastructure_pid"].is_null();
    drop(proxy);

    let mut second = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let state = s.wait_for_final_state(&run, RUN_TIMEOUT);
    second.sigterm();
    second.wait_timeout(Duration::from_secs(60));

    let runs = vec![run.clone()];
    let expected = [
        (STARTED, None),
        (STOPPED, None),
        (SUBMITTED, Some(run.as_str())),
        (EXECUTED, Some(run.as_str())),
    ];
    let mut events = collect_events(s, &name, &expected, EVENTS_TIMEOUT, EVENTS_SETTLE);
    let starts = events.of(STARTED, None).len();
    if starts == 2 {
        events.duplicate_pairs -= 1;
        events.duplicated.retain(|d| !d.starts_with(STARTED));
    }
    let mut figures = Figures::new("trial 3");
    figures.runs = 1;
    figures.events = events;
    figures.states = state_counts(s, &runs);
    figures.orphans = orphans_after(&runs, Duration::from_secs(10));
    let running = times_running(&run);
    figures.note(
        "state when killed",
        state_after_kill["type"].as_str().unwrap_or("?"),
    );
    figures.note("launched before the restart", launched_before_restart);
    figures.note("times Running", running);
    figures.wall = started_at.elapsed();
    figures.print();

    let context = format!(
        "first worker:\n{first_output}\nsecond worker:\n{}",
        second.output()
    );
    figures.assert_clean(&context);
    assert_eq!(state_after_kill["type"], "PENDING", "{context}");
    assert!(
        !launched_before_restart,
        "launched before the kill\n{context}"
    );
    assert_eq!(state["type"], "COMPLETED", "{state}\n{context}");
    assert_eq!(running, 1, "{context}");
    assert!(
        second.output().contains("resuming the submission"),
        "{context}"
    );
}

/// Trial 6: storage that cannot be written. (a) An unwritable `PREFECT_HOME` (here: a path
/// under a regular file) refuses to start with a clear error, and nothing is claimed. (b) The
/// disk "fills up" under a running worker — its file-size limit (RLIMIT_FSIZE, set with
/// `prlimit`) drops to one byte, so every write to its journal fails as on a full disk —: it
/// claims nothing it cannot journal (the run stays Scheduled, no event), says so on
/// `/readyz` and `/livez`, and keeps running; restarted once space is back, it runs the run.
#[test]
fn trial_6_unwritable_or_full_prefect_home_claims_nothing() {
    let _serial = serial();
    let started_at = Instant::now();
    let s = server();
    let pool = unique("trial6");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let early = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    let name = unique("Trial6 Worker");
    let args = [
        "--pool",
        pool.as_str(),
        "--name",
        name.as_str(),
        "--type",
        "process",
    ];

    // (a) Unwritable at start.
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let bad_home = not_a_dir.path().join("home");
    let mut refused = Worker::builder(WorkerKind::Cohort, &args)
        .home(&bad_home)
        .spawn();
    let status = refused.wait_timeout(Duration::from_secs(30));
    let refused_output = refused.stderr();
    assert!(!status.success(), "{refused_output}");
    assert!(
        refused_output.contains("is PREFECT_HOME writable?"),
        "{refused_output}"
    );
    assert_eq!(s.read_flow_run(&early)["state"]["type"], "SCHEDULED");

    // (b) Full while running. Its first poll (at start) takes `early`; the run created once
    // the disk is full must stay Scheduled.
    let home = tempfile::tempdir().unwrap();
    let port = util::unused_port().to_string();
    let mut health_args = args.to_vec();
    health_args.push("--with-healthcheck");
    let mut full = Worker::builder(WorkerKind::Cohort, &health_args)
        .home(home.path())
        .env("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
        .env("PREFECT_WORKER_WEBSERVER_PORT", &port)
        .spawn();
    let probe = |path: &str| -> (u16, Value) {
        let r = reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}"));
        match r {
            Ok(r) => (r.status().as_u16(), r.json().unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    };
    poll(
        "the healthcheck to answer ready",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (probe("/readyz").0 == 200).then_some(()),
    );
    s.wait_for_final_state(&early, RUN_TIMEOUT);
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &full.pid().to_string(), "--fsize=1:unlimited"])
        .status()
        .expect("prlimit (util-linux) is needed for the disk-full trial");
    assert!(limited.success(), "prlimit failed");
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({})).id;
    // Several polls pass: each finds the run and may not claim it.
    let (ready, ready_body) = poll(
        "the worker to report it cannot journal",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let (code, body) = probe("/readyz");
            (code == 503 && body["journal_writable"] == false).then_some((code, body))
        },
    );
    std::thread::sleep(Duration::from_secs(7));
    let (live, live_body) = probe("/livez");
    let state_while_full = s.read_flow_run(&run)["state"]["type"].clone();
    let alive_while_full = full.try_wait().is_none();
    let unlimited = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &full.pid().to_string(),
            "--fsize=unlimited:unlimited",
        ])
        .status()
        .expect("prlimit");
    assert!(unlimited.success());
    let events_while_full = s.read_events(json!({
        "any_resource": {"id": [format!("prefect.flow-run.{run}")]},
        "event": {"prefix": ["prefect.worker."]},
    }));
    full.sigterm();
    full.wait_timeout(Duration::from_secs(60));
    let full_output = full.output();

    // Space is back: a restart runs the run.
    let mut after = Worker::builder(WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let state = s.wait_for_final_state(&run, RUN_TIMEOUT);
    after.sigterm();
    after.wait_timeout(Duration::from_secs(60));

    let mut figures = Figures::new("trial 6");
    let runs = vec![early.clone(), run.clone()];
    figures.runs = runs.len();
    figures.states = state_counts(s, &runs);
    figures.orphans = orphans_after(&runs, Duration::from_secs(10));
    figures.note("refused to start (unwritable)", !status.success());
    figures.note("state while full", &state_while_full);
    figures.note("worker events while full", events_while_full.len());
    figures.note("readyz while full", ready);
    figures.note("livez while full", live);
    figures.note("worker alive while full", alive_while_full);
    figures.wall = started_at.elapsed();
    figures.print();

    let context = format!(
        "while full:\n{full_output}\nafter:\n{}\nreadyz {ready_body}\nlivez {live_body}",
        after.output()
    );
    assert_eq!(state_while_full, "SCHEDULED", "{context}");
    assert!(
        events_while_full.is_empty(),
        "{events_while_full:?}\n{context}"
    );
    assert_eq!(live, 503, "{context}");
    assert!(alive_while_full, "{context}");
    assert_eq!(state["type"], "COMPLETED", "{state}\n{context}");
    assert_eq!(figures.in_state("COMPLETED"), 2, "{context}");
    assert!(figures.orphans.is_empty(), "{context}");
}
