//! Retries that must not act twice, against a real Prefect 3.8.8 server behind the fault proxy
//! answering 504 *after* forwarding: the server acted, the client only hears a gateway
//! timeout. A flow-run create through the runner's webserver makes one run, a claim (Pending)
//! answered 504 is still the worker's, a forced state is made once, and the worker's flow-run
//! log lines are not doubled.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use util::fault_proxy::FaultProxy;
use util::{examples_flows_dir, server, unique, DeploySpec, PrefectServer, Worker};

const TIMEOUT: Duration = Duration::from_secs(180);

/// `cohort flow serve …` talking to `api_url`; killed (its whole process group) on drop.
struct Runner {
    child: Child,
    output: tempfile::NamedTempFile,
    _home: tempfile::TempDir,
}

impl Runner {
    fn start(s: &PrefectServer, api_url: &str, args: &[&str], env: &[(&str, &str)]) -> Runner {
        let output = tempfile::NamedTempFile::new().unwrap();
        let home = tempfile::tempdir().unwrap();
        let path = format!(
            "{}:{}",
            s.venv_bin().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let repo = examples_flows_dir().join("../..").canonicalize().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cohort"))
            .args(args)
            .current_dir(&repo)
            .env("PREFECT_API_URL", api_url)
            .env("PREFECT_HOME", home.path())
            .env("PATH", path)
            .env("PREFECT_RUNNER_POLL_FREQUENCY", "2")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(output.reopen().unwrap())
            .stderr(output.reopen().unwrap())
            .process_group(0)
            .spawn()
            .expect("start cohort");
        Runner {
            child,
            output,
            _home: home,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.output.path()).unwrap_or_default()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // `--`: procps `kill` would read `-<pgid>` as options.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn proxy_for(s: &PrefectServer) -> FaultProxy {
    FaultProxy::start(s.api_url().trim_end_matches("/api"))
}

fn flow_runs_of_deployment(s: &PrefectServer, deployment_id: &str) -> Vec<Value> {
    s.request(
        Method::POST,
        "/flow_runs/filter",
        Some(&json!({"deployments": {"id": {"any_": [deployment_id]}}})),
    )
    .as_array()
    .cloned()
    .unwrap_or_default()
}

/// `POST /deployment/{id}/run` on the runner's webserver, whose create the proxy forwards and
/// then answers 504: the client's retry carries the same idempotency key, the server hands back
/// the run the first copy made, and the deployment has exactly one run, which completes. A
/// caller's own `idempotency_key` is honoured the same way.
#[test]
fn runner_create_answered_504_after_the_server_acted_makes_one_run() {
    let s = server();
    let proxy = proxy_for(s);
    let name = unique("idempotent-create");
    let port = util::unused_port().to_string();
    let runner = Runner::start(
        s,
        &format!("{}/api", proxy.url()),
        &[
            "flow",
            "serve",
            "examples/flows/flows.py:hello",
            "--name",
            &name,
            "--webserver",
        ],
        &[
            ("PREFECT_RUNNER_SERVER_HOST", "127.0.0.1"),
            ("PREFECT_RUNNER_SERVER_PORT", &port),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + TIMEOUT;
    while reqwest::blocking::get(format!("{base}/health")).is_err() {
        assert!(
            Instant::now() < deadline,
            "no webserver:\n{}",
            runner.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let deployment = s.request(
        Method::GET,
        &format!("/deployments/name/hello/{}", util::encode(&name)),
        None,
    );
    let deployment_id = deployment["id"].as_str().expect("deployment id").to_owned();

    proxy.fail_next_after_forwarding(1, 504, Some("/create_flow_run"));
    let response = reqwest::blocking::Client::new()
        .post(format!("{base}/deployment/{deployment_id}/run"))
        .json(&json!({"parameters": {"name": "once"}}))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 201, "{}", runner.output());
    let started: Value = response.json().unwrap();
    assert_eq!(proxy.stats().failed, 1, "the 504 was not injected");

    let runs = flow_runs_of_deployment(s, &deployment_id);
    let ids: Vec<&str> = runs.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(
        ids,
        [started["flow_run_id"].as_str().unwrap()],
        "one create, one run"
    );
    let state = s.wait_for_final_state(ids[0], TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{}", runner.output());
    assert_eq!(flow_runs_of_deployment(s, &deployment_id).len(), 1);

    // A caller repeating its own request passes its own key: the same run comes back.
    let key = unique("caller-key");
    let run_with_key = || -> Value {
        reqwest::blocking::Client::new()
            .post(format!("{base}/deployment/{deployment_id}/run"))
            .json(&json!({"parameters": {"name": "keyed"}, "idempotency_key": key}))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let first = run_with_key();
    let again = run_with_key();
    assert!(first["flow_run_id"].is_string(), "{first}");
    assert_eq!(first["flow_run_id"], again["flow_run_id"]);
    assert_eq!(flow_runs_of_deployment(s, &deployment_id).len(), 2);
}

/// A worker behind a gateway that answers 504 after the server acted, on its claim (the
/// first `set_state`) and on every `POST /logs/`: the repeated claim is REJECTed as a
/// duplicate transition and read as the accept it stands for, so the run is launched once
/// and completes; the worker's log lines are stored once each (logs are not repeated after
/// the server may have acted).
#[test]
fn worker_behind_a_gateway_504_after_acting_claims_once_and_logs_once() {
    let s = server();
    let proxy = proxy_for(s);
    let pool = unique("gateway-504");
    s.create_work_pool(&pool, "process");
    // The flow process talks to the server directly: the faults are the worker's.
    let deployment = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({"env": {"PREFECT_API_URL": s.api_url()}})),
    );
    proxy.fail_next_after_forwarding(1, 504, Some("/set_state"));
    proxy.fail_next_after_forwarding(1000, 504, Some("/api/logs/"));
    let run = s.create_flow_run(&deployment.id, &[], json!({}), json!({}));
    let name = unique("Gateway Worker");
    let worker = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "process", "--name", &name],
    )
    .api_url(&format!("{}/api", proxy.url()))
    .spawn();

    let state = s.wait_for_final_state(&run.id, TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}\n{}", worker.output());
    let states = state_history(s, &run.id);
    let pendings = states
        .iter()
        .filter(|st| st["type"] == "PENDING" && st["name"] == "Pending")
        .count();
    assert_eq!(pendings, 1, "one claim: {states:#?}");

    // The worker's own lines (`prefect.flow_runs.worker`) arrive after the run ends; a
    // repeat would follow within the client's first retry delay (about 1 s).
    let worker_lines = || -> Vec<String> {
        s.read_logs(&run.id)
            .iter()
            .filter(|l| l["name"] == "prefect.flow_runs.worker")
            .filter_map(|l| l["message"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker_lines().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no worker log lines:\n{}",
            worker.output()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(5));
    let lines = worker_lines();
    let mut unique_lines = lines.clone();
    unique_lines.sort();
    unique_lines.dedup();
    assert_eq!(
        lines.len(),
        unique_lines.len(),
        "doubled log lines: {lines:#?}"
    );
    assert!(
        proxy.stats().failed >= 2,
        "the 504s were not injected: {:?}",
        proxy.stats()
    );
}

/// The states a flow run went through, oldest first (`GET /flow_run_states/`).
fn state_history(s: &PrefectServer, run_id: &str) -> Vec<Value> {
    s.request(
        Method::GET,
        &format!("/flow_run_states/?flow_run_id={run_id}"),
        None,
    )
    .as_array()
    .cloned()
    .unwrap_or_default()
}

/// `PrefectClient::set_flow_run_state` through a gateway answering 504 after the server
/// acted, with both kinds of proposal: the orchestrated one is REJECTed on its repeat as a
/// duplicate transition and reported as accepted; the forced one (no orchestration to catch a
/// repeat) is read back instead of repeated. Each leaves exactly one state behind.
#[test]
fn state_proposals_answered_504_after_the_server_acted_are_made_once() {
    use cohort_api::models::{SetStateStatus, StateCreate, StateType};
    use cohort_api::{ClientConfig, PrefectClient};

    let s = server();
    let proxy = proxy_for(s);
    let pool = unique("gateway-state");
    s.create_work_pool(&pool, "process");
    let deployment = s.deploy(&DeploySpec::new(&pool, "hello"));
    let run = s.create_flow_run(&deployment.id, &[], json!({}), json!({}));
    let id: uuid::Uuid = run.id.parse().unwrap();
    let client = PrefectClient::new(ClientConfig {
        api_url: format!("{}/api", proxy.url()).parse().unwrap(),
        api_key: None,
        auth_string: None,
        max_retries: 5,
        request_timeout: Duration::from_secs(30),
        retry_base_delay: Duration::from_millis(200),
    })
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    proxy.fail_next_after_forwarding(1, 504, Some("/set_state"));
    let pending = StateCreate::new(StateType::Pending, "Pending");
    let claimed = runtime
        .block_on(client.set_flow_run_state(id, &pending, false))
        .unwrap();
    assert_eq!(claimed.status, SetStateStatus::Accept, "{claimed:?}");

    proxy.fail_next_after_forwarding(1, 504, Some("/set_state"));
    let cancelled = StateCreate::new(StateType::Cancelled, "Cancelled").with_message("once");
    let forced = runtime
        .block_on(client.set_flow_run_state(id, &cancelled, true))
        .unwrap();
    assert_eq!(forced.status, SetStateStatus::Accept, "{forced:?}");
    assert_eq!(proxy.stats().failed, 2, "the 504s were not injected");

    let history = state_history(s, &run.id);
    let count = |kind: &str| history.iter().filter(|st| st["type"] == kind).count();
    assert_eq!(
        (count("PENDING"), count("CANCELLED")),
        (1, 1),
        "one state per proposal: {history:#?}"
    );
}
