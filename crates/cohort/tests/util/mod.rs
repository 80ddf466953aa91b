//! Black-box test harness: one real Prefect server per test binary, a retrying REST
//! client for it, and worker processes (Cohort's or Prefect's own) with captured output.
//!
//! Blocking style on purpose (plain `#[test]` fns, `reqwest::blocking`): the tests drive
//! real processes and wait on wall-clock time, so there is nothing to gain from async.
//!
//! The server is started on first use by [`server()`] and is shared by every test of the
//! binary; tests isolate themselves with unique pool/deployment/worker names
//! ([`unique`]). A Rust static is never dropped, so the server is started under a small
//! `sh` watchdog that holds the read end of a pipe whose write end only this process has:
//! when the test binary exits, for whatever reason, the watchdog sees EOF and kills the
//! server's process group (and the process groups of workers still registered).
//!
//! A test binary that needs a differently configured server (e.g. one requiring an auth
//! string) calls [`configure_server`] before its first [`server()`], with the same
//! [`ServerOptions`] in every test of the binary.
//!
//! A test binary whose tests never overlap (the fault trials) may stop its server and start
//! it again on the same port and database ([`PrefectServer::stop`], [`PrefectServer::start`]).

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(dead_code, clippy::disallowed_methods, clippy::disallowed_types)]

/// The Docker test images and the Engine's view of a run's containers.
pub mod docker;
/// Fault-injecting HTTP/websocket proxy to put between a worker and the server.
pub mod fault_proxy;
/// Prefect's Kubernetes worker as the oracle for Cohort's, on emulated clusters.
pub mod kube_oracle;
/// The emulated Kubernetes cluster and the image the Kubernetes tests' pods run.
pub mod kubernetes;
/// Figures and checks shared by the fault trials (`tests/fault_trials.rs`).
pub mod trials;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::Duration;

use base64::Engine as _;
use cohort_testkit::{
    path_with_venv_first, scrub_prefect_env, worker_command, Rest, RetryPolicy, ServerConfig,
    ServerProcess,
};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Environment variable naming the Prefect 3.8.8 virtualenv (set by `scripts/test.sh`).
pub const VENV_ENV: &str = "COHORT_PREFECT_VENV";

/// Selects the worker implementation [`Worker::under_test`] starts: `cohort` (default) or
/// `python` (Prefect's own `prefect worker start`, to check the expectations against the
/// real thing).
pub const WORKER_UNDER_TEST_ENV: &str = "COHORT_E2E_WORKER";

const SERVER_START_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Names and time
// ---------------------------------------------------------------------------------------

/// A name unique to this test run: `<prefix>-<8 hex chars>`.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..8])
}

pub use cohort_testkit::slugify;

/// RFC 3339 UTC timestamp `offset` away from now (negative = past).
pub fn rfc3339_from_now(offset: chrono::Duration) -> String {
    (chrono::Utc::now() + offset).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Poll `f` every `every` until it returns `Some`, or panic after `timeout` with `what`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(every);
    }
}

// ---------------------------------------------------------------------------------------
// The Prefect venv
// ---------------------------------------------------------------------------------------

/// The Prefect 3.8.8 virtualenv from `$COHORT_PREFECT_VENV`; panics with instructions when
/// it is not usable (never skip: a test without its tools must fail loudly).
pub fn venv() -> PathBuf {
    let hint = "run scripts/test.sh, or scripts/prefect-venv.sh and export \
                COHORT_PREFECT_VENV=<the path it prints>";
    let dir = match std::env::var_os(VENV_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => panic!("{VENV_ENV} is not set: these tests need Prefect 3.8.8; {hint}"),
    };
    let prefect = dir.join("bin").join("prefect");
    assert!(
        prefect.is_file(),
        "{VENV_ENV}={} has no bin/prefect: {hint}",
        dir.display()
    );
    dir
}

/// Directory of the example flows (`examples/flows` at the repository root).
pub fn examples_flows_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/flows")
        .canonicalize()
        .expect("examples/flows not found next to crates/");
    assert!(
        dir.join("flows.py").is_file(),
        "{} has no flows.py",
        dir.display()
    );
    dir
}

// ---------------------------------------------------------------------------------------
// The shared server
// ---------------------------------------------------------------------------------------

/// The Prefect server shared by all tests of this binary, started on first use (with the
/// [`ServerOptions`] given to [`configure_server`], default ones otherwise).
pub fn server() -> &'static PrefectServer {
    match SERVER.get_or_init(PrefectServer::launch) {
        Ok(s) => s,
        Err(e) => panic!("the shared Prefect server is not available: {e}"),
    }
}

static SERVER: OnceLock<Result<PrefectServer, String>> = OnceLock::new();

/// How the shared server of a test binary is started; see [`configure_server`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// `PREFECT_SERVER_API_AUTH_STRING` (`user:password`): the server then answers 401
    /// `{"exception_message":"Unauthorized"}` to every request but `GET /health` that lacks
    /// `Authorization: Basic base64(<auth string>)`. The harness's own REST calls and
    /// `prefect` CLI commands send it; workers get none unless the test passes
    /// `PREFECT_API_AUTH_STRING` itself ([`WorkerBuilder::env`]).
    pub auth_string: Option<String>,
    /// More environment for `prefect server start`, applied last (so it can override the
    /// harness's defaults).
    pub env: Vec<(String, String)>,
}

static SERVER_OPTIONS: OnceLock<ServerOptions> = OnceLock::new();

/// Set how [`server()`] starts the shared server of this test binary. Call it before the
/// first [`server()`] — in practice at the top of every test of the binary, with the same
/// options each time (tests run in any order, on parallel threads). Panics if the server
/// was already started with, or configured for, other options.
pub fn configure_server(options: ServerOptions) {
    let chosen = SERVER_OPTIONS.get_or_init(|| options.clone());
    assert!(
        *chosen == options,
        "configure_server({options:?}): the shared server was already started or configured \
         with {chosen:?}; every test of a binary must pass the same options, before server()"
    );
}

/// The shared server, with the server's Cancelling clean-up due after `seconds` (300 s by
/// default) and looked for every 5 s: for binaries whose tests wait for the clean-up the
/// server sends a worker (`cancelling_timeout_teardown.v1`).
pub fn server_with_cancelling_timeout(seconds: u64) -> &'static PrefectServer {
    configure_server(ServerOptions {
        auth_string: None,
        env: vec![
            (
                "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_CANCELLING_TIMEOUT_SECONDS".into(),
                seconds.to_string(),
            ),
            (
                "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS".into(),
                "5".into(),
            ),
        ],
    });
    server()
}

/// `Basic base64(<auth string>)`, the `Authorization` value Prefect's client sends for
/// `PREFECT_API_AUTH_STRING` (`prefect/client/base.py`).
pub fn basic_authorization(auth_string: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(auth_string)
    )
}

/// Where per-test temporary files go: inside the server's directory once it runs (the
/// watchdog removes that even if this process is SIGKILLed), else the system temp dir.
fn scratch_dir() -> PathBuf {
    match SERVER.get() {
        Some(Ok(s)) => s.process.dir().to_path_buf(),
        _ => std::env::temp_dir(),
    }
}

/// Process groups of live workers, killed by the server watchdog if the test binary dies
/// before their `Drop` runs.
static WORKER_PGIDS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
fn register_worker_pgid(pgid: u32, live: bool) {
    let mut set = WORKER_PGIDS.lock().unwrap_or_else(|e| e.into_inner());
    if live {
        set.insert(pgid);
    } else {
        set.remove(&pgid);
    }
    write_watchdog_file(&set);
}

fn write_watchdog_file(pgids: &BTreeSet<u32>) {
    if let Some(Ok(s)) = SERVER.get() {
        s.process.watch_workers(pgids.iter().copied());
    }
}

/// A running Prefect server (SQLite, 127.0.0.1, temporary `PREFECT_HOME`): the test kit's
/// [`ServerProcess`] and [`Rest`] client, with the harness's panicking helpers on top.
pub struct PrefectServer {
    process: ServerProcess,
    rest: Rest,
    auth_string: Option<String>,
    venv: PathBuf,
    version: String,
    process_template: OnceLock<Value>,
}

impl PrefectServer {
    fn launch() -> Result<PrefectServer, String> {
        let venv = venv();
        // Freezes the options: a later configure_server with others panics.
        let options = SERVER_OPTIONS.get_or_init(ServerOptions::default);
        let mut env = Vec::new();
        if let Some(auth) = &options.auth_string {
            // The server's own clients (if any) authenticate like every other client.
            env.push(("PREFECT_SERVER_API_AUTH_STRING".to_owned(), auth.clone()));
            env.push(("PREFECT_API_AUTH_STRING".to_owned(), auth.clone()));
        }
        env.extend(options.env.iter().cloned());
        let process = ServerProcess::start(&ServerConfig {
            venv: venv.clone(),
            dir_prefix: "cohort-prefect-server-".into(),
            env,
            start_timeout: SERVER_START_TIMEOUT,
        })
        .map_err(|e| e.to_string())?;
        eprintln!("[harness] Prefect server up at {}", process.api_url());
        let mut headers = HeaderMap::new();
        if let Some(auth) = &options.auth_string {
            let mut value = HeaderValue::from_str(&basic_authorization(auth))
                .map_err(|e| format!("auth string unusable in a header: {e}"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        // About 4 min of 503s: a SQLite server under a burst of real flows answers writes
        // "database is locked" for a minute at times, and for over 90 s while 200 Kubernetes
        // jobs of another test report their states to it.
        let policy = RetryPolicy {
            first: Duration::from_millis(200),
            cap: Duration::from_secs(4),
            budget: Duration::from_secs(240),
        };
        let rest = Rest::new(process.api_url(), headers, Duration::from_secs(60), policy);
        let mut server = PrefectServer {
            process,
            rest,
            auth_string: options.auth_string.clone(),
            venv,
            version: String::new(),
            process_template: OnceLock::new(),
        };
        // Workers started before the server (own API URL) are watched too.
        server.process.watch_workers(
            WORKER_PGIDS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied(),
        );
        let version = server.request(Method::GET, "/admin/version", None);
        server.version = version
            .as_str()
            .ok_or_else(|| format!("unexpected /admin/version answer: {version}"))?
            .to_owned();
        Ok(server)
    }

    /// `http://127.0.0.1:<port>/api`
    pub fn api_url(&self) -> String {
        self.process.api_url().to_owned()
    }

    /// The auth string the server requires ([`ServerOptions::auth_string`]), if any.
    pub fn auth_string(&self) -> Option<&str> {
        self.auth_string.as_deref()
    }

    /// The server's Prefect version (`GET /api/admin/version`), e.g. `3.8.8`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `$COHORT_PREFECT_VENV/bin`
    pub fn venv_bin(&self) -> PathBuf {
        self.venv.join("bin")
    }

    /// The venv's Python interpreter.
    pub fn python(&self) -> PathBuf {
        self.venv_bin().join("python")
    }

    /// The server's log so far (`prefect server start` stdout and stderr).
    pub fn log(&self) -> String {
        self.process.log()
    }

    // -- stopping and starting again ------------------------------------------------------

    /// Stop the server gracefully, as an operator would: SIGTERM to `prefect server start`
    /// (uvicorn closes its sockets and runs the app's shutdown, which stops the services —
    /// the event persister flushes what it holds), then wait for the process to exit
    /// (SIGKILL after `grace`). The port stays unbound until [`Self::start`], which starts it
    /// again on the same port with the same `PREFECT_HOME` and database. Returns how long
    /// the stop took.
    ///
    /// Only for test binaries whose tests never run while the server is down (serialize
    /// them): every other call of the harness fails during the outage.
    pub fn stop(&self, grace: Duration) -> Duration {
        let took = self
            .process
            .stop(grace)
            .unwrap_or_else(|e| panic!("PrefectServer::stop: {e}"));
        eprintln!("[harness] Prefect server stopped in {took:.1?}");
        took
    }

    /// Start the server again after [`Self::stop`] (same port, `PREFECT_HOME` and database)
    /// and wait until `GET /health` answers; returns how long that took. Panics, showing
    /// the server log, if it exits or is not healthy within 180 s.
    pub fn start(&self) -> Duration {
        let took = self
            .process
            .restart()
            .unwrap_or_else(|e| panic!("PrefectServer::start: {e}"));
        eprintln!("[harness] Prefect server up again after {took:.1?}");
        took
    }

    /// True between [`Self::stop`] and [`Self::start`].
    pub fn is_stopped(&self) -> bool {
        self.process.is_stopped()
    }

    /// A `prefect …` CLI command against this server, with a fresh `PREFECT_HOME`
    /// (kept alive by the returned guard) and the server's auth string, if any, as
    /// `PREFECT_API_AUTH_STRING`.
    pub fn prefect_cli(&self, args: &[&str]) -> (Command, tempfile::TempDir) {
        let home = tempfile::Builder::new()
            .prefix("cohort-prefect-cli-")
            .tempdir_in(scratch_dir())
            .expect("temp dir");
        let mut cmd = Command::new(self.venv_bin().join("prefect"));
        scrub_prefect_env(&mut cmd);
        cmd.args(args)
            .env("PREFECT_API_URL", self.api_url())
            .env("PREFECT_HOME", home.path())
            .env("PATH", path_with_venv_first(&self.venv_bin()))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null());
        if let Some(auth) = &self.auth_string {
            cmd.env("PREFECT_API_AUTH_STRING", auth);
        }
        (cmd, home)
    }

    /// Run a `prefect …` CLI command against this server; panics unless it succeeds.
    pub fn run_prefect_cli(&self, args: &[&str]) -> Output {
        let (mut cmd, _home) = self.prefect_cli(args);
        let out = cmd.output().expect("run prefect CLI");
        assert!(
            out.status.success(),
            "prefect {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    // -- HTTP ---------------------------------------------------------------------------

    /// Send one request, retrying connection errors and 429/502/503 with backoff (the
    /// SQLite server answers 503 "database is locked" under load). Returns the final
    /// status and JSON body (`Value::Null` when empty or not JSON). Sends the server's
    /// auth string, if any, as `Authorization: Basic …`.
    pub fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        self.rest
            .try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Self::try_request`] but panics on any non-2xx answer.
    pub fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let (status, value) = self.try_request(method.clone(), path, body);
        assert!(
            status.is_success(),
            "{method} {path} answered {status}: {value}\nrequest body: {}",
            body.map(Value::to_string).unwrap_or_default()
        );
        value
    }

    // -- work pools ---------------------------------------------------------------------

    /// Create a work pool the way `prefect work-pool create --type <type>` does: for
    /// `process` with Prefect's default process base job template, otherwise empty.
    pub fn create_work_pool(&self, name: &str, pool_type: &str) -> Value {
        let template = if pool_type == "process" {
            self.process_base_job_template().clone()
        } else {
            json!({})
        };
        self.create_work_pool_with_template(name, pool_type, template)
    }

    pub fn create_work_pool_with_template(
        &self,
        name: &str,
        pool_type: &str,
        template: Value,
    ) -> Value {
        self.request(
            Method::POST,
            "/work_pools/",
            Some(&json!({"name": name, "type": pool_type, "base_job_template": template})),
        )
    }

    /// `GET /work_pools/{name}`; `None` on 404.
    pub fn read_work_pool(&self, name: &str) -> Option<Value> {
        let (status, value) =
            self.try_request(Method::GET, &format!("/work_pools/{}", encode(name)), None);
        match status {
            StatusCode::NOT_FOUND => None,
            s if s.is_success() => Some(value),
            s => panic!("GET /work_pools/{name} answered {s}: {value}"),
        }
    }

    /// Prefect's default base job template for `process` pools, straight from the venv
    /// (`ProcessWorker.get_default_base_job_template()`), computed once.
    pub fn process_base_job_template(&self) -> &Value {
        self.process_template.get_or_init(|| {
            let out = Command::new(self.python())
                .args([
                    "-c",
                    "import json; from prefect.workers.process import ProcessWorker; \
                     print(json.dumps(ProcessWorker.get_default_base_job_template()))",
                ])
                .env("PREFECT_HOME", self.process.dir().join("home"))
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .stdin(Stdio::null())
                .output()
                .expect("run the venv's python");
            assert!(
                out.status.success(),
                "ProcessWorker.get_default_base_job_template() failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("template is JSON")
        })
    }

    // -- deployments and flow runs -----------------------------------------------------

    /// Register a deployment of one of the example flows by REST (what `prefect deploy`
    /// amounts to): `POST /flows/` then `POST /deployments/` with a
    /// `set_working_directory` pull step to `examples/flows`.
    pub fn deploy(&self, spec: &DeploySpec) -> Deployment {
        let function = if spec.function.is_empty() {
            "hello"
        } else {
            &spec.function
        };
        let flow_name = if spec.flow_name.is_empty() {
            function
        } else {
            &spec.flow_name
        };
        let name = if spec.deployment_name.is_empty() {
            unique(function)
        } else {
            spec.deployment_name.clone()
        };
        let dir = examples_flows_dir().to_string_lossy().into_owned();
        let flow = self.request(Method::POST, "/flows/", Some(&json!({"name": flow_name})));
        let flow_id = str_field(&flow, "id");
        let body = json!({
            "name": name,
            "flow_id": flow_id,
            "entrypoint": format!("flows.py:{function}"),
            "path": dir,
            "work_pool_name": spec.pool,
            "pull_steps": [
                {"prefect.deployments.steps.set_working_directory": {"directory": dir}}
            ],
            "tags": spec.tags,
            "job_variables": or_empty_object(&spec.job_variables),
            "parameters": or_empty_object(&spec.parameters),
            "enforce_parameter_schema": false,
        });
        let dep = self.request(Method::POST, "/deployments/", Some(&body));
        Deployment {
            id: str_field(&dep, "id"),
            flow_id,
            name,
            flow_name: flow_name.to_owned(),
        }
    }

    /// `POST /deployments/{id}/create_flow_run` (Scheduled for now).
    pub fn create_flow_run(
        &self,
        deployment_id: &str,
        tags: &[&str],
        job_variables: Value,
        parameters: Value,
    ) -> FlowRun {
        let run = self.request(
            Method::POST,
            &format!("/deployments/{deployment_id}/create_flow_run"),
            Some(&json!({
                "tags": tags,
                "job_variables": or_empty_object(&job_variables),
                "parameters": or_empty_object(&parameters),
            })),
        );
        FlowRun {
            id: str_field(&run, "id"),
            name: str_field(&run, "name"),
        }
    }

    /// `GET /flow_runs/{id}`
    pub fn read_flow_run(&self, id: &str) -> Value {
        self.request(Method::GET, &format!("/flow_runs/{id}"), None)
    }

    /// Forces `id` into Cancelling, as an operator does for a run nobody supervises, and
    /// waits until the server's Cancelling timeout has made it Cancelled (its clean-up then
    /// goes to a worker of the pool).
    pub fn force_cancelling_until_cancelled(&self, id: &str, timeout: Duration) {
        let r = self.request(
            Method::POST,
            &format!("/flow_runs/{id}/set_state"),
            Some(&json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": true})),
        );
        assert_eq!(r["status"], "ACCEPT", "{r}");
        let state = self.wait_for_final_state(id, timeout);
        assert_eq!(state["type"], "CANCELLED", "{state}");
    }

    /// Poll the flow run until its state is final (COMPLETED, FAILED, CRASHED,
    /// CANCELLED); returns the state object. Panics after `timeout`.
    pub fn wait_for_final_state(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.read_flow_run(id);
            let state = run["state"].clone();
            if matches!(
                state["type"].as_str(),
                Some("COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED")
            ) {
                return state;
            }
            if Instant::now() >= deadline {
                panic!("flow run {id} not final after {timeout:?}; last state: {state}");
            }
            sleep(Duration::from_millis(500));
        }
    }

    /// The flow run's logs (`POST /logs/filter`), oldest first.
    pub fn read_logs(&self, flow_run_id: &str) -> Vec<Value> {
        let mut logs = Vec::new();
        loop {
            let page = self.request(
                Method::POST,
                "/logs/filter",
                Some(&json!({
                    "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                    "sort": "TIMESTAMP_ASC",
                    "offset": logs.len(),
                    "limit": 200,
                })),
            );
            let page = page.as_array().cloned().unwrap_or_default();
            let done = page.len() < 200;
            logs.extend(page);
            if done {
                return logs;
            }
        }
    }

    // -- events -------------------------------------------------------------------------

    /// Read events back with `POST /events/filter`, oldest first, following `next_page`.
    ///
    /// `filter` is an `EventFilter` object (e.g. `{"event": {"prefix": [...]}}`); unless
    /// it has its own, `occurred` spans one day back to one hour ahead (the server's
    /// default `until` is "now", which hides events stamped by a clock slightly ahead),
    /// and `order` is `ASC`.
    pub fn read_events(&self, filter: Value) -> Vec<Value> {
        let mut filter = match filter {
            Value::Object(m) => m,
            Value::Null => serde_json::Map::new(),
            other => panic!("event filter must be an object, got {other}"),
        };
        filter.entry("occurred").or_insert_with(|| {
            json!({
                "since": rfc3339_from_now(chrono::Duration::days(-1)),
                "until": rfc3339_from_now(chrono::Duration::hours(1)),
            })
        });
        filter.entry("order").or_insert_with(|| json!("ASC"));
        self.rest
            .read_events(&Value::Object(filter))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Poll [`Self::read_events`] until at least `n` events match (persistence is
    /// asynchronous); returns them all. Panics after `timeout` showing what was found.
    pub fn wait_for_events(&self, filter: Value, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.read_events(filter.clone());
            if events.len() >= n {
                return events;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected at least {n} events for filter {filter} within {timeout:?}, found {}:\n{}",
                    events.len(),
                    summarize_events(&events)
                );
            }
            sleep(Duration::from_millis(500));
        }
    }
}

/// One line per event: name, resource id, follows.
pub fn summarize_events(events: &[Value]) -> String {
    let mut out = String::new();
    for e in events {
        let _ = writeln!(
            out,
            "  {} {} {} resource={} follows={}",
            e["occurred"].as_str().unwrap_or("?"),
            e["id"].as_str().unwrap_or("?"),
            e["event"].as_str().unwrap_or("?"),
            e["resource"]["prefect.resource.id"].as_str().unwrap_or("?"),
            e["follows"]
        );
    }
    out
}

/// A port on 127.0.0.1 that nothing listens on (for "API unreachable" scenarios).
pub fn unused_port() -> u16 {
    cohort_testkit::free_port()
}

/// Percent-encode a path segment (pool names may contain spaces).
pub fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn str_field(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{key}` in {v}"))
        .to_owned()
}

fn or_empty_object(v: &Value) -> Value {
    if v.is_null() {
        json!({})
    } else {
        v.clone()
    }
}

/// What to deploy: one of the functions of `examples/flows/flows.py`.
#[derive(Debug, Clone, Default)]
pub struct DeploySpec {
    pub pool: String,
    /// Flow name registered with `POST /flows/`; defaults to `function` (the example
    /// flows are named after their functions).
    pub flow_name: String,
    /// Function in `flows.py` (`hello`, `fail`, `crash`, `sleepy`, `print_env`);
    /// defaults to `hello`.
    pub function: String,
    /// Defaults to `unique(function)`.
    pub deployment_name: String,
    pub tags: Vec<String>,
    /// Deployment `job_variables` (`Value::Null` = `{}`).
    pub job_variables: Value,
    /// Deployment `parameters` (`Value::Null` = `{}`).
    pub parameters: Value,
}

impl DeploySpec {
    pub fn new(pool: &str, function: &str) -> DeploySpec {
        DeploySpec {
            pool: pool.to_owned(),
            function: function.to_owned(),
            ..DeploySpec::default()
        }
    }

    pub fn tags(mut self, tags: &[&str]) -> DeploySpec {
        self.tags = tags.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    pub fn job_variables(mut self, v: Value) -> DeploySpec {
        self.job_variables = v;
        self
    }

    pub fn parameters(mut self, v: Value) -> DeploySpec {
        self.parameters = v;
        self
    }
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub id: String,
    pub flow_id: String,
    pub name: String,
    pub flow_name: String,
}

#[derive(Debug, Clone)]
pub struct FlowRun {
    pub id: String,
    pub name: String,
}

// ---------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// `cohort worker start …` (this crate's binary).
    Cohort,
    /// `prefect worker start …` from the Prefect venv.
    Python,
}

impl WorkerKind {
    /// The worker the end-to-end tests exercise: `$COHORT_E2E_WORKER` (`cohort`, the
    /// default, or `python`).
    pub fn under_test() -> WorkerKind {
        match std::env::var(WORKER_UNDER_TEST_ENV).as_deref() {
            Err(_) | Ok("") | Ok("cohort") => WorkerKind::Cohort,
            Ok("python") => WorkerKind::Python,
            Ok(other) => panic!("{WORKER_UNDER_TEST_ENV}={other}: expected `cohort` or `python`"),
        }
    }
}

/// How to start a worker; [`WorkerBuilder::spawn`] starts it.
pub struct WorkerBuilder {
    kind: WorkerKind,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    api_url: Option<String>,
    home: Option<PathBuf>,
    venv: Option<PathBuf>,
    program: Option<PathBuf>,
}

impl WorkerBuilder {
    /// Run this `cohort` (an installed one) instead of this build's.
    pub fn program(mut self, program: &Path) -> Self {
        self.program = Some(program.to_path_buf());
        self
    }

    /// Take `prefect` (for a [`WorkerKind::Python`] worker) and the front of `PATH` from this
    /// virtualenv instead of [`venv()`]'s, e.g. one with an integration installed. The
    /// shared server always runs from [`venv()`].
    pub fn venv(mut self, venv: &Path) -> Self {
        self.venv = Some(venv.to_path_buf());
        self
    }

    /// Use this `PREFECT_HOME` (default: a fresh temporary one): a worker restarted with
    /// the same name and home recovers the runs of the one before.
    pub fn home(mut self, home: &Path) -> Self {
        self.home = Some(home.to_path_buf());
        self
    }

    /// Override `PREFECT_API_URL` (default: the shared server's; when overridden the
    /// shared server is not started for this worker). Workers get no
    /// `PREFECT_API_AUTH_STRING` from the harness, even when the shared server requires
    /// one: pass it with [`Self::env`].
    pub fn api_url(mut self, url: &str) -> Self {
        self.api_url = Some(url.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn spawn(self) -> Worker {
        let venv = self.venv.clone().unwrap_or_else(venv);
        let venv_bin = venv.join("bin");
        let api_url = match self.api_url {
            Some(u) => u,
            None => server().api_url(),
        };
        let home = tempfile::Builder::new()
            .prefix("cohort-worker-home-")
            .tempdir_in(scratch_dir())
            .expect("temp dir");
        let out_dir = tempfile::Builder::new()
            .prefix("cohort-worker-out-")
            .tempdir_in(scratch_dir())
            .expect("temp dir");
        let stdout_path = out_dir.path().join("stdout.log");
        let stderr_path = out_dir.path().join("stderr.log");

        let program = match self.kind {
            WorkerKind::Cohort => self
                .program
                .clone()
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cohort"))),
            WorkerKind::Python => venv_bin.join("prefect"),
        };
        let mut cmd = worker_command(
            &program,
            &venv_bin,
            &api_url,
            self.home.as_deref().unwrap_or(home.path()),
            File::create(&stdout_path).expect("stdout log"),
            File::create(&stderr_path).expect("stderr log"),
        );
        cmd.args(&self.args)
            // Poll every 3 s rather than 10 s: scenarios that submit a second run to a
            // running worker finish sooner.
            .env("PREFECT_WORKER_QUERY_SECONDS", "3")
            .env("RUST_BACKTRACE", "1");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let description = format!("{:?} {}", self.kind, self.args.join(" "));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start worker {description}: {e}"));
        register_worker_pgid(child.id(), true);
        Worker {
            child,
            kind: self.kind,
            description,
            stdout_path,
            stderr_path,
            status: None,
            _home: home,
            _out_dir: out_dir,
        }
    }
}

/// A worker process. Output goes to files (see [`Worker::output`]) that are printed when
/// the test panics; dropping it stops the process (SIGTERM, then SIGKILL after 5 s).
pub struct Worker {
    child: Child,
    kind: WorkerKind,
    description: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
    _home: tempfile::TempDir,
    _out_dir: tempfile::TempDir,
}

impl Worker {
    pub fn builder(kind: WorkerKind, args: &[&str]) -> WorkerBuilder {
        WorkerBuilder {
            kind,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: Vec::new(),
            api_url: None,
            home: None,
            venv: None,
            program: None,
        }
    }

    /// `cohort worker start <args>` against the shared server.
    pub fn cohort(args: &[&str]) -> Worker {
        Worker::builder(WorkerKind::Cohort, args).spawn()
    }

    /// `prefect worker start <args>` (Prefect's Python worker) against the shared server.
    pub fn python(args: &[&str]) -> Worker {
        Worker::builder(WorkerKind::Python, args).spawn()
    }

    /// The worker selected by `$COHORT_E2E_WORKER` (default: Cohort).
    pub fn under_test(args: &[&str]) -> Worker {
        Worker::builder(WorkerKind::under_test(), args).spawn()
    }

    pub fn kind(&self) -> WorkerKind {
        self.kind
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn sigint(&self) {
        self.signal("INT");
    }

    /// SIGKILL, as a crash or the OOM killer would: no shutdown at all. The worker alone,
    /// not its process group (its flow runs live in groups of their own anyway).
    pub fn sigkill(&mut self) {
        self.signal("KILL");
        let _ = self.wait_timeout(Duration::from_secs(10));
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.child.id());
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                register_worker_pgid(self.child.id(), false);
            }
        }
        self.status
    }

    /// Wait for the process to exit; panics (showing its output) after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "worker {} still running after {timeout:?}; output:\n{}",
                    self.description,
                    self.output()
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// stdout then stderr.
    pub fn output(&self) -> String {
        format!(
            "----- stdout -----\n{}----- stderr -----\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    fn stop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        // Whole group: nothing the worker started in its own group outlives the test.
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.wait();
        register_worker_pgid(self.child.id(), false);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let status = match self.status {
                Some(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(sig)) => format!("signal {sig}"),
                    _ => format!("{s}"),
                },
                None => "unknown".to_owned(),
            };
            eprintln!(
                "===== worker {} (pid {}, {status}) =====\n{}===== end of worker output =====",
                self.description,
                self.child.id(),
                self.output()
            );
        }
    }
}

fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Write `value` as JSON to a new temporary file (e.g. for `--base-job-template`).
pub fn json_temp_file(value: &Value) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .prefix("cohort-test-")
        .suffix(".json")
        .tempfile_in(scratch_dir())
        .expect("temp file");
    f.write_all(value.to_string().as_bytes())
        .expect("write temp file");
    f.flush().expect("flush temp file");
    f
}
