//! The Prefect server under the benchmarks, and the REST calls the driver makes to it.
//!
//! Started as the test harness starts it, by the shared test kit (`cohort-testkit`): `prefect
//! server start` on 127.0.0.1 and a free port with a temporary `PREFECT_HOME`, under a small
//! `sh` watchdog that holds the read end of a pipe only this process writes to. When the
//! driver exits, however it exits, the watchdog sees EOF and kills the worker process groups
//! still registered with it, then the server, then removes the directory. The database is
//! SQLite in that directory unless a `postgresql+asyncpg://` URL is given.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use chrono::{DateTime, Utc};
use cohort_testkit::{Rest, RetryPolicy, ServerConfig, ServerProcess};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const START_TIMEOUT: Duration = Duration::from_secs(180);
/// One HTTP request; a server wedged by a worker's load (SQLite) answers nothing at all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A request and its retries give up after this long, so a phase always ends.
const RETRY_BUDGET: Duration = Duration::from_secs(90);

/// Which database the server runs on.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite,
    /// `postgresql+asyncpg://…`
    Postgres(String),
}

impl Database {
    pub fn label(&self) -> &'static str {
        match self {
            Database::Sqlite => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }
}

/// A running Prefect server and a retrying REST client for it.
pub struct PrefectServer {
    process: ServerProcess,
    rest: Rest,
    pub version: String,
    pub database: Database,
    worker_pgids: Mutex<Vec<u32>>,
}

impl PrefectServer {
    pub fn start(venv: &Path, database: Database) -> Result<PrefectServer> {
        let mut env = Vec::new();
        if let Database::Postgres(url) = &database {
            env.push((
                "PREFECT_API_DATABASE_CONNECTION_URL".to_owned(),
                url.clone(),
            ));
        }
        let started = Instant::now();
        let process = ServerProcess::start(&ServerConfig {
            venv: venv.to_path_buf(),
            dir_prefix: "cohort-bench-server-".into(),
            env,
            start_timeout: START_TIMEOUT,
        })?;
        eprintln!(
            "[bench] Prefect server ({}) up at {} after {:.1?}",
            database.label(),
            process.api_url(),
            started.elapsed()
        );
        // Short, capped backoff: SQLite answers 503 while another writer holds the lock,
        // which lasts milliseconds; a long backoff would only slow the driver down.
        let policy = RetryPolicy {
            first: Duration::from_millis(25),
            cap: Duration::from_secs(1),
            budget: RETRY_BUDGET,
        };
        let rest = Rest::new(process.api_url(), HeaderMap::new(), REQUEST_TIMEOUT, policy);
        let mut server = PrefectServer {
            process,
            rest,
            version: String::new(),
            database,
            worker_pgids: Mutex::new(Vec::new()),
        };
        let version = server.request(Method::GET, "/admin/version", None)?;
        server.version = version.as_str().unwrap_or("?").to_owned();
        Ok(server)
    }

    /// `http://127.0.0.1:<port>/api`
    pub fn api_url(&self) -> &str {
        self.process.api_url()
    }

    /// Scratch space removed by the watchdog with the server.
    pub fn scratch_dir(&self) -> &Path {
        self.process.dir()
    }

    /// PID of `prefect server start` (the root of the server's process tree).
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// Length of the server log so far (to read what a phase added with [`Self::log_since`]).
    pub fn log_len(&self) -> u64 {
        self.process.log_len()
    }

    pub fn log_since(&self, offset: u64) -> String {
        self.process.log_since(offset)
    }

    /// Tell the watchdog about a worker's process group (or that it is gone).
    pub fn register_worker_pgid(&self, pgid: i32, live: bool) {
        let Ok(pgid) = u32::try_from(pgid) else {
            return;
        };
        let mut set = self.worker_pgids.lock().unwrap_or_else(|e| e.into_inner());
        if live {
            set.push(pgid);
        } else {
            set.retain(|p| *p != pgid);
        }
        self.process.watch_workers(set.iter().copied());
    }

    // -- HTTP -------------------------------------------------------------------------------

    /// One request, retrying connection errors, timeouts and 429/502/503 (SQLite's
    /// "database is locked") with backoff for up to [`RETRY_BUDGET`]. Returns the final
    /// status and JSON body.
    pub fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        Ok(self.rest.try_request(method, path, body)?)
    }

    /// Like [`Self::try_request`], and any non-2xx answer is an error.
    pub fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, value) = self.try_request(method.clone(), path, body)?;
        if !status.is_success() {
            bail!("{method} {path} answered {status}: {value}");
        }
        Ok(value)
    }

    // -- pools, deployments, runs ---------------------------------------------------------

    /// Create a pool of this type with this base job template (what `prefect work-pool
    /// create --type <type>` does with the type's default template).
    pub fn create_pool(&self, name: &str, pool_type: &str, template: &Value) -> Result<()> {
        self.request(
            Method::POST,
            "/work_pools/",
            Some(&json!({"name": name, "type": pool_type, "base_job_template": template})),
        )?;
        Ok(())
    }

    pub fn delete_pool(&self, name: &str) -> Result<()> {
        self.try_request(
            Method::DELETE,
            &format!("/work_pools/{}", encode(name)),
            None,
        )?;
        Ok(())
    }

    /// Register a deployment of `flows.py:<function>` in `flows_dir` by REST, with a
    /// `set_working_directory` pull step (what `prefect deploy` amounts to). Returns its id.
    pub fn deploy(
        &self,
        pool: &str,
        flows_dir: &Path,
        function: &str,
        job_variables: Value,
    ) -> Result<String> {
        let dir = flows_dir.to_string_lossy().into_owned();
        let flow = self.request(Method::POST, "/flows/", Some(&json!({"name": function})))?;
        let flow_id = flow["id"].as_str().context("flow id")?.to_owned();
        let dep = self.request(
            Method::POST,
            "/deployments/",
            Some(&json!({
                "name": format!("{pool}-{function}"),
                "flow_id": flow_id,
                "entrypoint": format!("flows.py:{function}"),
                "path": dir,
                "work_pool_name": pool,
                "pull_steps": [
                    {"prefect.deployments.steps.set_working_directory": {"directory": dir}}
                ],
                "job_variables": job_variables,
                "parameters": {},
                "enforce_parameter_schema": false,
            })),
        )?;
        Ok(dep["id"].as_str().context("deployment id")?.to_owned())
    }

    pub fn delete_deployment(&self, id: &str) -> Result<()> {
        self.try_request(Method::DELETE, &format!("/deployments/{id}"), None)?;
        Ok(())
    }

    /// `POST /deployments/{id}/create_flow_run`: one run, Scheduled for now. Returns its id.
    pub fn create_flow_run(&self, deployment_id: &str) -> Result<String> {
        let run = self.request(
            Method::POST,
            &format!("/deployments/{deployment_id}/create_flow_run"),
            Some(&json!({})),
        )?;
        Ok(run["id"].as_str().context("flow run id")?.to_owned())
    }

    /// Create `n` runs on `threads` client threads; returns their ids. Fails if they are
    /// not all created within `within` (a server wedged by a worker's load).
    pub fn create_flow_runs(
        &self,
        deployment_id: &str,
        n: usize,
        threads: usize,
        within: Duration,
    ) -> Result<Vec<String>> {
        let per = n.div_ceil(threads.max(1));
        let deadline = Instant::now() + within;
        let results: Vec<Result<Vec<String>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads.max(1))
                .map(|t| {
                    let count = per.min(n.saturating_sub(t * per));
                    s.spawn(move || {
                        let mut ids = Vec::with_capacity(count);
                        for _ in 0..count {
                            if Instant::now() > deadline {
                                bail!("the server took over {within:?} to create {n} flow runs");
                            }
                            ids.push(self.create_flow_run(deployment_id)?);
                        }
                        Ok(ids)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("creator thread panicked")))
                })
                .collect()
        });
        let mut ids = Vec::with_capacity(n);
        for r in results {
            ids.extend(r?);
        }
        Ok(ids)
    }

    /// Every flow run of a deployment (`POST /flow_runs/filter`, paged).
    pub fn read_flow_runs(&self, deployment_id: &str) -> Result<Vec<Value>> {
        let mut runs = Vec::new();
        loop {
            let page = self.request(
                Method::POST,
                "/flow_runs/filter",
                Some(&json!({
                    "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                    "sort": "EXPECTED_START_TIME_ASC",
                    "offset": runs.len(),
                    "limit": 200,
                })),
            )?;
            let page = page.as_array().cloned().unwrap_or_default();
            let done = page.len() < 200;
            runs.extend(page);
            if done {
                return Ok(runs);
            }
        }
    }

    /// `POST /flow_runs/count` of a deployment's runs in the given state types.
    pub fn count_flow_runs(&self, deployment_id: &str, state_types: &[&str]) -> Result<u64> {
        let v = self.request(
            Method::POST,
            "/flow_runs/count",
            Some(&json!({
                "flow_runs": {
                    "deployment_id": {"any_": [deployment_id]},
                    "state": {"type": {"any_": state_types}},
                },
            })),
        )?;
        v.as_u64().context("count is a number")
    }

    /// Delete flow runs on `threads` client threads (runs of a custom `command` never
    /// report a state and would stay Pending forever). Returns how many failed.
    pub fn delete_flow_runs(&self, ids: &[String], threads: usize) -> usize {
        let chunk = ids.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .filter(|id| {
                                !matches!(
                                    self.try_request(Method::DELETE, &format!("/flow_runs/{id}"), None),
                                    Ok((s, _)) if s.is_success() || s == StatusCode::NOT_FOUND
                                )
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        })
    }

    // -- events -------------------------------------------------------------------------

    /// Events of one resource with the given names, oldest first, occurred since `since`
    /// (`POST /events/filter`, following `next_page`). Events reach the database
    /// asynchronously: a fresh event may not be there yet.
    pub fn read_events(
        &self,
        resource_id: &str,
        names: &[&str],
        since: DateTime<Utc>,
    ) -> Result<Vec<Value>> {
        self.read_events_of(&[resource_id], names, since)
    }

    /// [`Self::read_events`] of any of several resources.
    pub fn read_events_of(
        &self,
        resource_ids: &[&str],
        names: &[&str],
        since: DateTime<Utc>,
    ) -> Result<Vec<Value>> {
        Ok(self
            .rest
            .read_events(&events_filter(resource_ids, names, since))?)
    }

    /// Events with these names whose resource id starts with `prefix` (a container's
    /// `prefect.docker.container.<id>`), oldest first, occurred since `since`.
    pub fn read_events_by_prefix(
        &self,
        prefix: &str,
        names: &[&str],
        since: DateTime<Utc>,
    ) -> Result<Vec<Value>> {
        let mut filter = events_filter(&[], names, since);
        filter["resource"] = json!({"id_prefix": [prefix]});
        Ok(self.rest.read_events(&filter)?)
    }

    /// How many such events the server has persisted (the first page's `total`).
    pub fn count_events(
        &self,
        resource_id: &str,
        names: &[&str],
        since: DateTime<Utc>,
    ) -> Result<u64> {
        self.count_events_of(&[resource_id], names, since)
    }

    /// [`Self::count_events`] of any of several resources.
    pub fn count_events_of(
        &self,
        resource_ids: &[&str],
        names: &[&str],
        since: DateTime<Utc>,
    ) -> Result<u64> {
        let page = self.request(
            Method::POST,
            "/events/filter",
            Some(&json!({"filter": events_filter(resource_ids, names, since), "limit": 1})),
        )?;
        page["total"].as_u64().context("events page without total")
    }
}

fn events_filter(resource_ids: &[&str], names: &[&str], since: DateTime<Utc>) -> Value {
    json!({
        "resource": {"id": resource_ids},
        "event": {"name": names},
        "occurred": {
            "since": (since - chrono::Duration::seconds(60)).to_rfc3339(),
            "until": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
        },
        "order": "ASC",
    })
}

/// Prefect's default base job template for `process` pools, straight from the venv.
pub fn process_base_job_template(venv: &Path, home: &Path) -> Result<Value> {
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import json; from prefect.workers.process import ProcessWorker; \
             print(json.dumps(ProcessWorker.get_default_base_job_template()))",
        ])
        .env("PREFECT_HOME", home)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .context("run the venv's python")?;
    if !out.status.success() {
        bail!(
            "ProcessWorker.get_default_base_job_template() failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Percent-encode a path segment.
fn encode(segment: &str) -> String {
    use std::fmt::Write as _;
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

/// Parse an RFC 3339 time as Prefect writes it.
pub fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
