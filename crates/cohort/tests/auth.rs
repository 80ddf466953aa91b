//! End-to-end tests of `PREFECT_API_AUTH_STRING` against a real Prefect 3.8.8 server that
//! requires it (`PREFECT_SERVER_API_AUTH_STRING`; see `util::configure_server`): a wrong or
//! missing auth string is refused fast with a clear message, and the right one works end
//! to end — REST, the events websocket (the worker's events are read back from the
//! server), the worker channel or its REST heartbeat fallback (the worker's heartbeat is
//! read back), and the flow-run process the worker starts (the run completes).
//!
//! This is its own test binary so that its shared server is the only one that requires an
//! auth string; the harness's own REST calls authenticate, workers only when a test says so.
//! `COHORT_E2E_WORKER=python cargo test -p cohort --test auth` runs the same scenarios
//! against `prefect worker start` (the Cohort-specific checks then assert what Prefect
//! does instead).

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use util::{
    basic_authorization, configure_server, slugify, unique, DeploySpec, PrefectServer,
    ServerOptions, Worker, WorkerKind,
};

/// The auth string the shared server of this binary requires.
const AUTH_STRING: &str = "admin:s3cret";
/// Same user, wrong password.
const WRONG_AUTH_STRING: &str = "admin:not-the-s3cret";

/// Python start-up of each flow-run process is several seconds on a loaded 2-core machine.
const FLOW_RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// Events are persisted asynchronously (batched flushes).
const EVENTS_TIMEOUT: Duration = Duration::from_secs(60);
/// Graceful stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// A refused credential is final: the worker must give up at once, not retry.
const FAIL_FAST: Duration = Duration::from_secs(10);

const STARTED: &str = "prefect.worker.started";
const SUBMITTED: &str = "prefect.worker.submitted-flow-run";
const EXECUTED: &str = "prefect.worker.executed-flow-run";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The shared server of this binary, which requires [`AUTH_STRING`]. Every test goes
/// through here so that whichever runs first starts the server configured.
fn server() -> &'static PrefectServer {
    configure_server(ServerOptions {
        auth_string: Some(AUTH_STRING.to_owned()),
        ..ServerOptions::default()
    });
    let s = util::server();
    assert_eq!(s.auth_string(), Some(AUTH_STRING));
    s
}

/// A worker name with spaces and capitals (exercises the slug) unique to this run.
fn worker_name(what: &str) -> String {
    let id = unique("x");
    format!("E2E {what} {}", &id[2..])
}

fn worker_args<'a>(pool: &'a str, name: &'a str) -> Vec<&'a str> {
    vec!["--pool", pool, "--type", "process", "--name", name]
}

/// The worker under test against the shared server, with `PREFECT_API_AUTH_STRING` set to
/// `auth` (unset when `None`).
fn spawn_worker(pool: &str, name: &str, auth: Option<&str>) -> Worker {
    let mut builder = Worker::builder(WorkerKind::under_test(), &worker_args(pool, name));
    if let Some(auth) = auth {
        builder = builder.env("PREFECT_API_AUTH_STRING", auth);
    }
    builder.spawn()
}

fn worker_events_filter(name: &str) -> Value {
    json!({
        "event": {"prefix": ["prefect.worker."]},
        "resource": {"id": [format!("prefect.worker.process.{}", slugify(name))]},
    })
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

/// Whether the event names the flow run among its related resources.
fn relates_to_run(event: &Value, run_id: &str) -> bool {
    let id = format!("prefect.flow-run.{run_id}");
    event["related"]
        .as_array()
        .is_some_and(|related| related.iter().any(|r| r["prefect.resource.id"] == id))
}

/// The workers the server knows for `pool` (`POST /work_pools/{pool}/workers/filter`).
fn pool_workers(s: &PrefectServer, pool: &str) -> Vec<Value> {
    let found = s.request(
        Method::POST,
        &format!("/work_pools/{}/workers/filter", util::encode(pool)),
        Some(&json!({})),
    );
    found
        .as_array()
        .unwrap_or_else(|| panic!("workers/filter answered {found}"))
        .clone()
}

/// Wait for the flow run's final state, failing early if the worker exits first.
fn wait_final(s: &PrefectServer, worker: &mut Worker, run_id: &str) -> Value {
    let deadline = Instant::now() + FLOW_RUN_TIMEOUT;
    loop {
        let state = s.read_flow_run(run_id)["state"].clone();
        if matches!(
            state["type"].as_str(),
            Some("COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
        ) {
            return state;
        }
        if let Some(status) = worker.try_wait() {
            panic!(
                "worker exited ({status}) before flow run {run_id} was final; last state: {state}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "flow run {run_id} not final after {FLOW_RUN_TIMEOUT:?}; last state: {state}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Start a worker with `auth` against a server requiring [`AUTH_STRING`] and expect it to
/// give up at once, saying the credentials were refused and naming the setting to fix.
fn assert_refused(auth: Option<&str>) {
    let s = server();
    let pool = unique("e2e-auth-refused");
    s.create_work_pool(&pool, "process");
    let name = worker_name("Refused");
    let started = Instant::now();
    let mut worker = spawn_worker(&pool, &name, auth);

    if worker.kind() == WorkerKind::Python {
        // Prefect's worker dies on the first 401 with an httpx traceback (no advice).
        let status = worker.wait_timeout(Duration::from_secs(60));
        assert!(!status.success(), "exit status {status}");
        let stderr = worker.stderr();
        assert!(
            stderr.contains("401 Unauthorized"),
            "Prefect's worker reports the 401:\n{stderr}"
        );
        return;
    }

    let status = worker.wait_timeout(FAIL_FAST + Duration::from_secs(10));
    let elapsed = started.elapsed();
    assert!(!status.success(), "exit status {status}");
    assert!(
        elapsed < FAIL_FAST,
        "took {elapsed:?} to give up on refused credentials:\n{}",
        worker.output()
    );
    let stderr = worker.stderr();
    assert!(
        stderr.contains("refused the credentials") && stderr.contains("PREFECT_API_AUTH_STRING"),
        "stderr should say the credentials were refused and name PREFECT_API_AUTH_STRING:\n{stderr}"
    );
    assert!(
        stderr.contains(&s.api_url()),
        "stderr should name the API URL {}:\n{stderr}",
        s.api_url()
    );
    if let Some(auth) = auth {
        assert!(
            !worker.output().contains(auth),
            "the auth string must not be printed:\n{}",
            worker.output()
        );
    }
    // Refused before anything reached the server: no heartbeat, no events.
    assert_eq!(pool_workers(s, &pool), Vec::<Value>::new());
    assert_eq!(
        s.read_events(worker_events_filter(&name)),
        Vec::<Value>::new()
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// The server of this binary really requires the auth string (else the other tests prove
/// nothing): 401 `{"exception_message":"Unauthorized"}` without it or with a wrong one,
/// 200 with the right one; `GET /health` stays open.
#[test]
fn server_requires_the_auth_string() {
    let s = server();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client");
    let url = format!("{}/admin/version", s.api_url());
    let cases = [
        (None, 401),
        (Some(WRONG_AUTH_STRING), 401),
        (Some(AUTH_STRING), 200),
    ];
    for (auth, expected) in cases {
        let mut req = http.get(&url);
        if let Some(auth) = auth {
            req = req.header("Authorization", basic_authorization(auth));
        }
        let resp = req.send().expect("GET /admin/version");
        let status = resp.status().as_u16();
        let body: Value = resp.json().unwrap_or(Value::Null);
        assert_eq!(status, expected, "auth {auth:?}: {body}");
        if expected == 401 {
            assert_eq!(body, json!({"exception_message": "Unauthorized"}));
        } else {
            assert_eq!(body, json!(s.version()));
        }
    }
    let health = http
        .get(format!("{}/health", s.api_url()))
        .send()
        .expect("GET /health");
    assert!(health.status().is_success(), "health: {}", health.status());
}

/// Cohort-specific: a wrong `PREFECT_API_AUTH_STRING` makes `cohort worker start` exit
/// non-zero within seconds, saying the credentials were refused and naming the setting.
/// (Prefect's worker dies with an httpx `401 Unauthorized` traceback; under
/// `COHORT_E2E_WORKER=python` that is what is checked.)
#[test]
fn wrong_auth_string_fails_fast_with_a_clear_error() {
    assert_refused(Some(WRONG_AUTH_STRING));
}

/// Same as [`wrong_auth_string_fails_fast_with_a_clear_error`] with no auth string at all.
#[test]
fn missing_auth_string_fails_fast_with_a_clear_error() {
    assert_refused(None);
}

/// With the right auth string a `hello` run completes (the flow-run process authenticates
/// with the auth string the worker passes on), the worker's events arrive over the events
/// websocket, its heartbeat is recorded (worker channel or REST fallback), and SIGTERM
/// stops it cleanly.
#[test]
fn auth_string_works_end_to_end() {
    let s = server();
    let pool = unique("e2e-auth");
    s.create_work_pool(&pool, "process");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").parameters(json!({"name": "Auth"})));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let name = worker_name("Auth");
    let mut worker = spawn_worker(&pool, &name, Some(AUTH_STRING));

    let state = wait_final(s, &mut worker, &run.id);
    assert_eq!(state["type"], "COMPLETED", "final state: {state}");
    let flow_run = s.read_flow_run(&run.id);
    assert_eq!(
        flow_run["labels"]["prefect.worker.name"],
        json!(name),
        "labels: {}",
        flow_run["labels"]
    );

    // Only the events websocket carries these: reading them back proves it authenticated.
    let events = s.wait_for_events(worker_events_filter(&name), 3, EVENTS_TIMEOUT);
    only(&events, STARTED);
    let submitted = only(&events, SUBMITTED);
    let executed = only(&events, EXECUTED);
    assert!(relates_to_run(submitted, &run.id), "submitted: {submitted}");
    assert!(relates_to_run(executed, &run.id), "executed: {executed}");
    assert_eq!(executed["follows"], submitted["id"]);

    // The heartbeat comes through the worker channel websocket, or its REST fallback.
    let me = util::poll(
        "the worker's heartbeat to be recorded",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            pool_workers(s, &pool)
                .into_iter()
                .find(|w| w["name"] == json!(name) && w["last_heartbeat_time"].is_string())
        },
    );
    assert_eq!(me["status"], "ONLINE", "worker: {me}");

    // The flow-run process shipped its logs with the auth string too.
    let logs = util::poll(
        "the flow run's logs",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let logs = s.read_logs(&run.id);
            (!logs.is_empty()).then_some(logs)
        },
    );
    assert!(!logs.is_empty());

    worker.sigterm();
    let status = worker.wait_timeout(STOP_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "worker exit after SIGTERM: {status}"
    );
    if worker.kind() == WorkerKind::Cohort {
        let stderr = worker.stderr();
        assert!(
            !stderr.contains("credentials") && !stderr.contains("Unauthorized"),
            "no authentication trouble expected:\n{stderr}"
        );
        assert!(
            !worker.output().contains(AUTH_STRING),
            "the auth string must not be printed:\n{}",
            worker.output()
        );
    }
}

/// Every way the credential could be spelled in a log: the auth string (also the events
/// socket's `{"type":"auth","token":…}`), its password, its base64 and the whole
/// `Authorization: Basic …` value.
fn credential_spellings() -> Vec<String> {
    use base64::Engine as _;
    let password = AUTH_STRING.split_once(':').expect("user:pass").1;
    vec![
        AUTH_STRING.to_owned(),
        password.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(AUTH_STRING),
        basic_authorization(AUTH_STRING),
    ]
}

/// Fails when `output` spells the credential, or is not verbose enough for its absence to
/// mean anything (no TRACE lines).
fn assert_no_credential(what: &str, output: &str) {
    for secret in credential_spellings() {
        let at: Vec<&str> = output.lines().filter(|l| l.contains(&secret)).collect();
        assert!(
            at.is_empty(),
            "{what} printed the credential ({} lines), e.g.:\n{}",
            at.len(),
            at.iter().take(5).copied().collect::<Vec<_>>().join("\n")
        );
    }
    let traces = output.lines().filter(|l| l.contains(" TRACE ")).count();
    assert!(
        traces >= 5,
        "{what}: expected a TRACE-level log, got {traces} TRACE lines:\n{output}"
    );
}

/// Cohort-specific: at the most verbose log level — `COHORT_LOG=trace`, and a hostile
/// filter naming the dependencies that trace websocket frames and HTTP headers — a worker
/// authenticating with an auth string runs a flow to Completed (its events and worker
/// channel go over the authenticated websockets), and neither its output nor the flow's
/// (inherited) spells the credential in any form.
#[test]
fn no_log_level_prints_the_credential() {
    let s = server();
    let filters = [
        "trace",
        "trace,tungstenite=trace,tokio_tungstenite=trace,hyper=trace,hyper_util=trace,reqwest=trace,h2=trace,rustls=trace",
    ];
    let mut started = Vec::new();
    for filter in filters {
        let pool = unique("e2e-auth-trace");
        s.create_work_pool(&pool, "process");
        let dep = s.deploy(&DeploySpec::new(&pool, "hello").parameters(json!({"name": "Trace"})));
        let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
        let name = worker_name("Trace");
        let worker = Worker::builder(WorkerKind::Cohort, &worker_args(&pool, &name))
            .env("PREFECT_API_AUTH_STRING", AUTH_STRING)
            .env("COHORT_LOG", filter)
            .spawn();
        started.push((filter, run, name, worker));
    }
    for (filter, run, name, mut worker) in started {
        let state = wait_final(s, &mut worker, &run.id);
        assert_eq!(state["type"], "COMPLETED", "COHORT_LOG={filter}: {state}");
        // The websockets authenticated: the events arrived over one of them.
        let events = s.wait_for_events(worker_events_filter(&name), 3, EVENTS_TIMEOUT);
        only(&events, EXECUTED);
        worker.sigterm();
        let status = worker.wait_timeout(STOP_TIMEOUT);
        assert_eq!(status.code(), Some(0), "COHORT_LOG={filter}: exit {status}");
        let output = worker.output();
        assert!(
            output.contains("Hello, Trace!"),
            "COHORT_LOG={filter}: the flow's output is not in the worker's:\n{output}"
        );
        assert_no_credential(&format!("the worker with COHORT_LOG={filter}"), &output);
    }
}

/// The same for the runner: `cohort flow serve` at `COHORT_LOG=trace` runs a flow to
/// Completed without spelling the credential.
#[test]
fn the_runner_at_trace_does_not_print_the_credential() {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};

    let s = server();
    let name = unique("trace-served");
    let output = tempfile::NamedTempFile::new().unwrap();
    let home = tempfile::tempdir().unwrap();
    let repo = util::examples_flows_dir()
        .join("../..")
        .canonicalize()
        .unwrap();
    let path = format!(
        "{}:{}",
        s.venv_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args([
            "flow",
            "serve",
            "examples/flows/flows.py:hello",
            "--name",
            &name,
        ])
        .current_dir(&repo)
        .env("PREFECT_API_URL", s.api_url())
        .env("PREFECT_API_AUTH_STRING", AUTH_STRING)
        .env("PREFECT_HOME", home.path())
        .env("PATH", path)
        .env("PREFECT_RUNNER_POLL_FREQUENCY", "2")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env(
            "COHORT_LOG",
            "trace,tungstenite=trace,tokio_tungstenite=trace",
        )
        .stdin(Stdio::null())
        .stdout(output.reopen().unwrap())
        .stderr(output.reopen().unwrap())
        .process_group(0)
        .spawn()
        .expect("start cohort flow serve");
    let read_output = || std::fs::read_to_string(output.path()).unwrap_or_default();
    let stop = |child: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    };
    let deployment = util::poll(
        "the served deployment",
        FLOW_RUN_TIMEOUT,
        Duration::from_millis(500),
        || {
            let (status, body) = s.try_request(
                Method::GET,
                &format!("/deployments/name/hello/{}", util::encode(&name)),
                None,
            );
            status.is_success().then_some(body)
        },
    );
    let run = s.create_flow_run(
        deployment["id"].as_str().unwrap(),
        &[],
        json!({}),
        json!({"name": "Served Trace"}),
    );
    let state = s.wait_for_final_state(&run.id, FLOW_RUN_TIMEOUT);
    let out = read_output();
    stop(&mut child);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{out}");
    assert_no_credential("the runner with COHORT_LOG=trace", &read_output());
}
