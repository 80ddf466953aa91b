//! End-to-end tests of cancellation (through the worker and through the runner) and of
//! `cohort flow serve`, against a real Prefect 3.8.8 server. Assertions read states,
//! deployments and events back from the server.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use util::{examples_flows_dir, server, unique, DeploySpec, PrefectServer, Worker};

const START_TIMEOUT: Duration = Duration::from_secs(180);
const EVENTS_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the run is Running; returns its infrastructure pid.
fn wait_running(s: &PrefectServer, run_id: &str, output: &dyn Fn() -> String) -> i32 {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let run = s.read_flow_run(run_id);
        if run["state"]["type"] == "RUNNING" {
            if let Some(pid) = run["infrastructure_pid"].as_str() {
                return pid.parse().expect("pid");
            }
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} never ran: {}\n{}",
            run["state"],
            output()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Proposes Cancelling as `prefect flow-run cancel` does; returns when it was accepted.
fn request_cancel(s: &PrefectServer, run_id: &str) -> Instant {
    let r = s.request(
        Method::POST,
        &format!("/flow_runs/{run_id}/set_state"),
        Some(&json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": false})),
    );
    assert_eq!(r["status"], "ACCEPT", "cancel request: {r}");
    Instant::now()
}

/// Whether any process of process group `pgid` is still alive (zombies count as gone).
fn group_alive(pgid: i32) -> Vec<i32> {
    let mut alive = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command: state ppid pgrp …
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.len() > 2 && rest[0] != "Z" && rest[2] == pgid.to_string() {
            alive.push(pid);
        }
    }
    alive
}

/// The process group of a live process (a worker's flow runs under a shim that leads the
/// group, so the run's `infrastructure_pid` is not the group's id).
fn pgid_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    rest[2].parse().expect("pgrp")
}

fn wait_group_gone(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !group_alive(pgid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes of the flow run's group survived: {:?}",
            group_alive(pgid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cancelled_events_of(s: &PrefectServer, run_id: &str) -> Vec<Value> {
    s.wait_for_events(
        json!({
            "event": {"name": ["prefect.runner.cancelled-flow-run"]},
            "related": {"id": [format!("prefect.flow-run.{run_id}")]},
        }),
        1,
        EVENTS_TIMEOUT,
    )
}

fn related_ids(event: &Value) -> Vec<String> {
    event["related"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["prefect.resource.id"].as_str().unwrap().to_owned())
        .collect()
}

/// A sleeping flow cancelled while Running through the worker: Cancelled within seconds of
/// the request, no process of its group survives, `prefect.runner.cancelled-flow-run` from
/// `prefect.runner.standalone` (related deployment, flow, flow-run, sorted tags), then the
/// worker's `executed-flow-run` with status code "0".
#[test]
fn worker_cancels_a_running_flow() {
    let s = server();
    let pool = unique("cancel-worker");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "sleepy")
            .tags(&["team-b"])
            .parameters(json!({"seconds": 600})),
    );
    let run = s.create_flow_run(&dep.id, &["run-extra"], json!({}), json!({}));
    let name = unique("Cancel Worker");
    let mut worker = Worker::cohort(&["--pool", &pool, "--name", &name, "--type", "process"]);
    let pid = wait_running(s, &run.id, &|| worker.output());
    let pgid = pgid_of(pid);
    let asked = request_cancel(s, &run.id);
    let state = s.wait_for_final_state(&run.id, Duration::from_secs(60));
    let took = asked.elapsed();
    assert_eq!(state["type"], "CANCELLED", "{state}\n{}", worker.output());
    assert!(
        took < Duration::from_secs(20),
        "Cancelled only after {took:?}"
    );
    wait_group_gone(pgid);

    let events = cancelled_events_of(s, &run.id);
    assert_eq!(events.len(), 1, "{}", util::summarize_events(&events));
    let e = &events[0];
    assert_eq!(
        e["resource"]["prefect.resource.id"],
        "prefect.runner.standalone"
    );
    assert_eq!(e["resource"]["prefect.resource.name"], "standalone");
    assert_eq!(e["resource"]["prefect.version"], s.version());
    assert_eq!(
        related_ids(e),
        vec![
            format!("prefect.deployment.{}", dep.id),
            format!("prefect.flow.{}", dep.flow_id),
            format!("prefect.flow-run.{}", run.id),
            "prefect.tag.run-extra".to_owned(),
            "prefect.tag.team-b".to_owned(),
        ]
    );
    let executed = s.wait_for_events(
        json!({
            "event": {"name": ["prefect.worker.executed-flow-run"]},
            "related": {"id": [format!("prefect.flow-run.{}", run.id)]},
        }),
        1,
        EVENTS_TIMEOUT,
    );
    let flow_run = executed[0]["related"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefect.resource.role"] == "flow-run")
        .unwrap()
        .clone();
    assert_eq!(
        flow_run["prefect.infrastructure.status-code"], "0",
        "{flow_run}"
    );
    worker.sigterm();
    assert!(worker.wait_timeout(Duration::from_secs(60)).success());
}

/// `cohort flow serve …` as a child process in its own group, output to a file.
struct Served {
    child: Child,
    output: tempfile::NamedTempFile,
    /// The runner's `PREFECT_HOME` (its outbox), removed with it.
    _home: tempfile::TempDir,
}

impl Served {
    fn start(s: &PrefectServer, cwd: &Path, args: &[&str]) -> Served {
        Served::start_with_env(s, cwd, args, &[])
    }

    fn start_with_env(
        s: &PrefectServer,
        cwd: &Path,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Served {
        let output = tempfile::NamedTempFile::new().unwrap();
        let venv_bin = s.venv_bin();
        let path = format!(
            "{}:{}",
            venv_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let home = tempfile::tempdir().unwrap();
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(env!("CARGO_BIN_EXE_cohort"))
            .args(args)
            .current_dir(cwd)
            .env("PREFECT_API_URL", s.api_url())
            .env("PREFECT_HOME", home.path())
            .env("PATH", path)
            .env("PREFECT_RUNNER_POLL_FREQUENCY", "2")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(output.reopen().unwrap())
            .stderr(output.reopen().unwrap())
            .process_group(0)
            .spawn()
            .expect("start cohort");
        Served {
            child,
            output,
            _home: home,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.output.path()).unwrap_or_default()
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // `--`: procps `kill` would read `-<pgid>` as options (`-106` is `-1`: every process).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn deployment_by_name(s: &PrefectServer, flow: &str, name: &str) -> Option<Value> {
    let (status, body) = s.try_request(
        Method::GET,
        &format!("/deployments/name/{flow}/{}", util::encode(name)),
        None,
    );
    status.is_success().then_some(body)
}

/// `cohort flow serve` registers the deployment like a served flow (flow name, tags,
/// parameter schema, no work pool), runs a triggered run to completion, cancels a running
/// one with the runner's own resource id, and on SIGTERM pauses its schedule and exits 0.
#[test]
fn flow_serve_runs_and_cancels_like_prefect() {
    let s = server();
    let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
    let name = unique("My Served Sleepy");
    let mut served = Served::start(
        s,
        &repo,
        &[
            "flow",
            "serve",
            "examples/flows/flows.py:sleepy",
            "--name",
            &name,
            "--tag",
            "served",
            "--tag",
            "runner-tag",
            "--interval",
            "3600",
        ],
    );
    let deadline = Instant::now() + START_TIMEOUT;
    let dep = loop {
        if let Some(d) = deployment_by_name(s, "sleepy", &name) {
            break d;
        }
        assert!(
            served.child.try_wait().unwrap().is_none(),
            "exited:\n{}",
            served.output()
        );
        assert!(
            Instant::now() < deadline,
            "never registered:\n{}",
            served.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let dep_id = dep["id"].as_str().unwrap().to_owned();
    assert_eq!(dep["tags"], json!(["served", "runner-tag"]));
    assert_eq!(dep["entrypoint"], "examples/flows/flows.py:sleepy");
    assert_eq!(dep["work_pool_name"], Value::Null);
    assert_eq!(dep["paused"], false);
    assert!(
        dep["parameter_openapi_schema"]["properties"]["seconds"].is_object(),
        "{}",
        dep["parameter_openapi_schema"]
    );
    assert_eq!(
        dep["schedules"].as_array().map(Vec::len),
        Some(1),
        "{}",
        dep["schedules"]
    );

    // A short run completes.
    let quick = s.create_flow_run(&dep_id, &[], json!({}), json!({"seconds": 1}));
    let state = s.wait_for_final_state(&quick.id, START_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{}", served.output());

    // A long one is cancelled.
    let long = s.create_flow_run(
        &dep_id,
        &["runner-extra"],
        json!({}),
        json!({"seconds": 600}),
    );
    let out = || served.output();
    let pgid = pgid_of(wait_running(s, &long.id, &out));
    let asked = request_cancel(s, &long.id);
    let state = s.wait_for_final_state(&long.id, Duration::from_secs(60));
    assert_eq!(state["type"], "CANCELLED", "{state}\n{}", served.output());
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "slow cancel: {:?}",
        asked.elapsed()
    );
    wait_group_gone(pgid);
    let events = cancelled_events_of(s, &long.id);
    assert_eq!(events.len(), 1, "{}", util::summarize_events(&events));
    let e = &events[0];
    assert_eq!(
        e["resource"]["prefect.resource.id"],
        format!("prefect.runner.{}", util::slugify(&name))
    );
    assert_eq!(e["resource"]["prefect.resource.name"], json!(name));
    let flow_id = dep["flow_id"].as_str().unwrap();
    assert_eq!(
        related_ids(e),
        vec![
            format!("prefect.deployment.{dep_id}"),
            format!("prefect.flow.{flow_id}"),
            format!("prefect.flow-run.{}", long.id),
            "prefect.tag.runner-extra".to_owned(),
            "prefect.tag.runner-tag".to_owned(),
            "prefect.tag.served".to_owned(),
        ]
    );

    served.sigterm();
    let status = served.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", served.output());
    let dep = deployment_by_name(s, "sleepy", &name).unwrap();
    assert_eq!(dep["paused"], true, "pause on shutdown");
}

/// Bad input fails before anything is registered, with a clear message and exit code 64.
#[test]
fn flow_serve_rejects_bad_input_before_registering() {
    let s = server();
    let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
    // The flow file that raises on import lives in a directory of its own, removed with it:
    // never in the repository tree.
    let scratch = tempfile::tempdir().unwrap();
    let broken = scratch.path().join("broken_flow.py");
    std::fs::write(
        &broken,
        "from prefect import flow\nraise RuntimeError('boom on import')\n\n@flow\ndef broken():\n    pass\n",
    )
    .unwrap();
    let broken_entry = format!("{}:broken", broken.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["flow", "serve", "examples/flows/missing.py:hello"],
            "missing.py",
        ),
        (
            vec!["flow", "serve", "examples/flows/flows.py:no_such_flow"],
            "no_such_flow",
        ),
        (vec!["flow", "serve", &broken_entry], "boom on import"),
        (
            vec![
                "flow",
                "serve",
                "examples/flows/flows.py:hello",
                "--cron",
                "not a cron",
            ],
            "schedule",
        ),
        (
            vec![
                "flow",
                "serve",
                "examples/flows/flows.py:hello",
                "--parameters",
                "{not json",
            ],
            "--parameters",
        ),
    ];
    for (args, expect) in cases {
        let name = unique("bad");
        let mut all = args.clone();
        all.extend(["--name", &name]);
        let mut served = Served::start(s, &repo, &all);
        let status = served.wait(Duration::from_secs(60));
        let output = served.output();
        assert_eq!(status.code(), Some(64), "{all:?}: {status}\n{output}");
        assert!(
            output.contains(expect),
            "{all:?}: expected {expect:?} in:\n{output}"
        );
        for flow in ["hello", "sleepy"] {
            assert!(
                deployment_by_name(s, flow, &name).is_none(),
                "{all:?} registered a deployment"
            );
        }
    }
}

/// `cohort serve` with several deployments in one runner and its webserver: both are
/// registered, `POST /deployment/{id}/run` starts a run that completes, `/health` and
/// `/run_count` answer, and SIGTERM cancels what still runs with "Runner is shutting down."
#[test]
fn serve_many_with_webserver_cancels_on_shutdown() {
    let s = server();
    let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
    let runner = unique("Many Runner");
    let hello_name = unique("many-hello");
    let sleepy_name = unique("many-sleepy");
    let port = util::unused_port().to_string();
    let hello_entry = format!("examples/flows/flows.py:hello@{hello_name}");
    let sleepy_entry = format!("examples/flows/flows.py:sleepy@{sleepy_name}");
    let mut served = Served::start_with_env(
        s,
        &repo,
        &[
            "serve",
            &hello_entry,
            &sleepy_entry,
            "--name",
            &runner,
            "--webserver",
        ],
        &[
            ("PREFECT_RUNNER_SERVER_HOST", "127.0.0.1"),
            ("PREFECT_RUNNER_SERVER_PORT", &port),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(r) = reqwest::blocking::get(format!("{base}/health")) {
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(r.json::<Value>().unwrap(), json!({"message": "OK"}));
            break;
        }
        assert!(
            served.child.try_wait().unwrap().is_none(),
            "exited:\n{}",
            served.output()
        );
        assert!(
            Instant::now() < deadline,
            "no webserver:\n{}",
            served.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let hello = deployment_by_name(s, "hello", &hello_name).expect("hello deployment");
    let sleepy = deployment_by_name(s, "sleepy", &sleepy_name).expect("sleepy deployment");

    let started: Value = reqwest::blocking::Client::new()
        .post(format!(
            "{base}/deployment/{}/run",
            hello["id"].as_str().unwrap()
        ))
        .json(&json!({"parameters": {"name": "webserver"}}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let run_id = started["flow_run_id"]
        .as_str()
        .expect("flow_run_id")
        .to_owned();
    let state = s.wait_for_final_state(&run_id, START_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{}", served.output());

    let long = s.create_flow_run(
        sleepy["id"].as_str().unwrap(),
        &[],
        json!({}),
        json!({"seconds": 600}),
    );
    let out = || served.output();
    let pgid = pgid_of(wait_running(s, &long.id, &out));
    let count: Value = reqwest::blocking::get(format!("{base}/run_count"))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(count, json!(1));

    served.sigterm();
    let status = served.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", served.output());
    wait_group_gone(pgid);
    let state = s.read_flow_run(&long.id)["state"].clone();
    assert_eq!(state["type"], "CANCELLED", "{state}");
    assert_eq!(state["message"], "Runner is shutting down.");
    let events = cancelled_events_of(s, &long.id);
    assert_eq!(
        events[0]["resource"]["prefect.resource.id"],
        format!("prefect.runner.{}", util::slugify(&runner))
    );
}

/// Waits until the run is Completed (read every 100 ms: the race below is a few seconds wide).
fn wait_completed(s: &PrefectServer, run_id: &str, output: &dyn Fn() -> String) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let state = s.read_flow_run(run_id)["state"].clone();
        match state["type"].as_str() {
            Some("COMPLETED") => return,
            Some("FAILED" | "CRASHED" | "CANCELLED") => {
                panic!("run {run_id} ended {state}\n{}", output())
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} never completed: {state}\n{}",
            output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The runner is stopped while a Completed run's process is still exiting (an `atexit`
/// sleep): the run stays Completed and gets no cancelled-flow-run event, while a run that
/// really was running is cancelled with "Runner is shutting down." and reported (the
/// control: its event is read back first, so the absence of the other's means something).
#[test]
fn runner_shutdown_keeps_a_run_that_completed_while_its_process_exits() {
    let s = server();
    let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
    let runner = unique("Linger Runner");
    let lingering_name = unique("lingering");
    let sleepy_name = unique("linger-sleepy");
    let lingering_entry = format!("examples/flows/flows.py:lingering@{lingering_name}");
    let sleepy_entry = format!("examples/flows/flows.py:sleepy@{sleepy_name}");
    let mut served = Served::start(
        s,
        &repo,
        &["serve", &lingering_entry, &sleepy_entry, "--name", &runner],
    );
    let deadline = Instant::now() + START_TIMEOUT;
    let (lingering, sleepy) = loop {
        if let (Some(l), Some(z)) = (
            deployment_by_name(s, "lingering", &lingering_name),
            deployment_by_name(s, "sleepy", &sleepy_name),
        ) {
            break (l, z);
        }
        assert!(
            served.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "never registered:\n{}",
            served.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let long = s.create_flow_run(
        sleepy["id"].as_str().unwrap(),
        &[],
        json!({}),
        json!({"seconds": 600}),
    );
    let out = || served.output();
    let long_pgid = pgid_of(wait_running(s, &long.id, &out));
    let quick = s.create_flow_run(
        lingering["id"].as_str().unwrap(),
        &[],
        json!({}),
        json!({"seconds": 1, "linger": 8}),
    );
    wait_completed(s, &quick.id, &out);
    let quick_pid: i32 = s.read_flow_run(&quick.id)["infrastructure_pid"]
        .as_str()
        .expect("infrastructure_pid")
        .parse()
        .unwrap();
    let quick_pgid = pgid_of(quick_pid);
    assert!(
        !group_alive(quick_pgid).is_empty(),
        "the lingering process had already exited: the race was not set up\n{}",
        served.output()
    );

    served.sigterm();
    let status = served.wait(Duration::from_secs(90));
    assert!(status.success(), "exit {status}:\n{}", served.output());
    wait_group_gone(long_pgid);
    wait_group_gone(quick_pgid);

    let long_state = s.read_flow_run(&long.id)["state"].clone();
    assert_eq!(long_state["type"], "CANCELLED", "{long_state}");
    assert_eq!(cancelled_events_of(s, &long.id).len(), 1);
    let quick_state = s.read_flow_run(&quick.id)["state"].clone();
    assert_eq!(
        quick_state["type"],
        "COMPLETED",
        "{quick_state}\n{}",
        served.output()
    );
    let wrongly = s.read_events(json!({
        "event": {"name": ["prefect.runner.cancelled-flow-run"]},
        "related": {"id": [format!("prefect.flow-run.{}", quick.id)]},
    }));
    assert!(wrongly.is_empty(), "{}", util::summarize_events(&wrongly));
}

/// The worker's drain deadline passes while a Completed run's process is still exiting:
/// the run stays Completed, its log says nothing of a crash, `executed-flow-run` is emitted
/// and no cancelled-flow-run; a run that really was running is stopped and ends Crashed.
#[test]
fn worker_drain_deadline_keeps_a_run_that_completed_while_its_process_exits() {
    let s = server();
    let pool = unique("linger-worker");
    s.create_work_pool(&pool, "process");
    let lingering = s.deploy(
        &DeploySpec::new(&pool, "lingering").parameters(json!({"seconds": 1, "linger": 20})),
    );
    let sleepy = s.deploy(&DeploySpec::new(&pool, "sleepy").parameters(json!({"seconds": 600})));
    let name = unique("Linger Worker");
    let mut worker = Worker::cohort(&[
        "--pool",
        &pool,
        "--name",
        &name,
        "--type",
        "process",
        "--drain-timeout",
        "1",
        "--termination-grace",
        "5",
    ]);
    let long = s.create_flow_run(&sleepy.id, &[], json!({}), json!({}));
    let long_pgid = pgid_of(wait_running(s, &long.id, &|| worker.output()));
    let quick = s.create_flow_run(&lingering.id, &[], json!({}), json!({}));
    wait_completed(s, &quick.id, &|| worker.output());
    let quick_pid: i32 = s.read_flow_run(&quick.id)["infrastructure_pid"]
        .as_str()
        .expect("infrastructure_pid")
        .parse()
        .unwrap();
    let quick_pgid = pgid_of(quick_pid);
    assert!(
        !group_alive(quick_pgid).is_empty(),
        "the lingering process had already exited: the race was not set up\n{}",
        worker.output()
    );

    worker.sigterm();
    let status = worker.wait_timeout(Duration::from_secs(90));
    assert!(status.success(), "exit {status}:\n{}", worker.output());
    wait_group_gone(long_pgid);
    wait_group_gone(quick_pgid);

    let long_state = s.read_flow_run(&long.id)["state"].clone();
    assert_eq!(long_state["type"], "CRASHED", "{long_state}");
    let quick_state = s.read_flow_run(&quick.id)["state"].clone();
    assert_eq!(
        quick_state["type"],
        "COMPLETED",
        "{quick_state}\n{}",
        worker.output()
    );
    let executed = s.wait_for_events(
        json!({
            "event": {"name": ["prefect.worker.executed-flow-run"]},
            "related": {"id": [format!("prefect.flow-run.{}", quick.id), format!("prefect.flow-run.{}", long.id)]},
        }),
        2,
        EVENTS_TIMEOUT,
    );
    assert_eq!(executed.len(), 2, "{}", util::summarize_events(&executed));
    let cancelled = s.read_events(json!({
        "event": {"name": ["prefect.runner.cancelled-flow-run"]},
        "related": {"id": [format!("prefect.flow-run.{}", quick.id)]},
    }));
    assert!(
        cancelled.is_empty(),
        "{}",
        util::summarize_events(&cancelled)
    );
    let crash_lines: Vec<String> = s
        .read_logs(&quick.id)
        .iter()
        .filter_map(|l| l["message"].as_str())
        .filter(|m| m.contains("supervisor shut down") || m.contains("Crashed"))
        .map(str::to_owned)
        .collect();
    assert!(crash_lines.is_empty(), "{crash_lines:?}");
    let long_logs: Vec<String> = s
        .read_logs(&long.id)
        .iter()
        .filter_map(|l| l["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        long_logs.iter().any(|m| m.contains("supervisor shut down")),
        "{long_logs:?}"
    );
}

/// A second signal hurries a runner's shutdown instead of dropping it: a flow that ignores
/// SIGTERM (with a 600 s grace) is still running after the first signal, and the second
/// kills it at once; the run still ends Cancelled with its event, the runner exits 0 and
/// no process of the flow survives.
#[test]
fn runner_second_signal_kills_its_flows_without_orphaning_them() {
    let s = server();
    let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
    let name = unique("Stubborn Runner");
    let mut served = Served::start(
        s,
        &repo,
        &[
            "flow",
            "serve",
            "examples/flows/flows.py:stubborn",
            "--name",
            &name,
            "--termination-grace",
            "600",
        ],
    );
    let deadline = Instant::now() + START_TIMEOUT;
    let dep = loop {
        if let Some(d) = deployment_by_name(s, "stubborn", &name) {
            break d;
        }
        assert!(
            served.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "never registered:\n{}",
            served.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let run = s.create_flow_run(dep["id"].as_str().unwrap(), &[], json!({}), json!({}));
    let out = || served.output();
    let pgid = pgid_of(wait_running(s, &run.id, &out));
    // Give the flow time to install its handler (it runs right after Running is reported).
    std::thread::sleep(Duration::from_secs(2));

    served.sigterm();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "the runner did not wait for its flow:\n{}",
        served.output()
    );
    assert!(
        !group_alive(pgid).is_empty(),
        "the flow did not ignore SIGTERM: the grace was never in play\n{}",
        served.output()
    );

    served.sigterm();
    let status = served.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", served.output());
    wait_group_gone(pgid);
    let state = s.read_flow_run(&run.id)["state"].clone();
    assert_eq!(state["type"], "CANCELLED", "{state}\n{}", served.output());
    assert_eq!(state["message"], "Runner is shutting down.");
    assert_eq!(cancelled_events_of(s, &run.id).len(), 1);
}

/// A runner started while the server is down waits for it, as the worker does, and serves
/// once it answers. The server is "down" behind the fault proxy, whose listening socket is
/// closed (a real refused connection) and then reopened.
#[test]
fn runner_waits_for_a_server_that_is_down_at_start() {
    let s = server();
    let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
    let upstream = s.api_url().trim_end_matches("/api").to_owned();
    let proxy = util::fault_proxy::FaultProxy::start(&upstream);
    proxy.set_down(true);
    let name = unique("Patient Runner");
    let api_url = format!("{}/api", proxy.url());
    let mut served = Served::start_with_env(
        s,
        &repo,
        &[
            "flow",
            "serve",
            "examples/flows/flows.py:hello",
            "--name",
            &name,
        ],
        &[("PREFECT_API_URL", &api_url)],
    );
    util::poll(
        "the runner to say it cannot reach the API and will retry",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || {
            served
                .output()
                .contains("Unable to reach the Prefect API")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "the runner gave up while the server was down:\n{}",
        served.output()
    );
    proxy.set_down(false);
    let deadline = Instant::now() + START_TIMEOUT;
    let dep = loop {
        if let Some(d) = deployment_by_name(s, "hello", &name) {
            break d;
        }
        assert!(
            served.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "never registered:\n{}",
            served.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let run = s.create_flow_run(dep["id"].as_str().unwrap(), &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, START_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{}", served.output());
    served.sigterm();
    let status = served.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", served.output());
}
