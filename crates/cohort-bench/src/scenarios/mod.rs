//! The eight scenarios of the benchmark, and what they share: the plan (counts per mode),
//! the per-repetition fixture (a fresh pool and deployment, removed afterwards) and time
//! helpers.
//!
//! Every scenario runs, for each repetition, Prefect's Python worker and Cohort one after
//! the other on identical, fresh pools ([`WorkerKind::order`] alternates who goes first).

pub mod burst;
pub mod docker;
pub mod flows;
pub mod kubernetes;
pub mod scale;
pub mod server_load;
pub mod startup;

use std::collections::HashMap;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::procfs;
use crate::report::RepResult;
use crate::server::{parse_time, PrefectServer};
use crate::stats::median;
use crate::worker::{Programs, WorkerKind};

/// Counts and durations of a run (`--quick` or full).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub reps: usize,
    /// Idle RSS is read this long after the started event …
    pub idle_settle_s: f64,
    /// … as the median over this window.
    pub idle_window_s: f64,
    /// Single runs created one at a time before the burst (pickup on an idle server).
    pub idle_pickups: usize,
    pub burst_runs: usize,
    pub flow_runs: usize,
    /// Repetitions of scenario 4 (50 Python engines per worker and repetition are slow on
    /// two cores).
    pub flow_reps: usize,
    pub scale_runs: usize,
    pub scale_reps: usize,
    /// How long to hold all scale runs before reading RSS and steady CPU.
    pub scale_hold_s: f64,
    /// Give up on reaching `scale_runs` running processes after this long.
    pub scale_deadline_s: f64,
    /// Runs of each burst of scenario 6 (load on the server).
    pub server_runs: usize,
    /// Scenario 6's idle window, over which idle requests per minute are counted.
    pub server_idle_s: f64,
    /// Containers of scenario 7's burst, all running at once …
    pub docker_runs: usize,
    /// … for this long each.
    pub docker_sleep_s: u64,
    pub docker_reps: usize,
    /// Jobs of scenario 8's burst, all running at once on the emulated cluster …
    pub kubernetes_runs: usize,
    /// … until this long after the last pod is Running.
    pub kubernetes_hold_s: f64,
    pub kubernetes_reps: usize,
    /// Client threads creating runs: 1 on SQLite, where concurrent writers only wait on
    /// each other's lock (one thread creates ~30 runs/s on an idle server, four fewer);
    /// 4 on PostgreSQL.
    pub client_threads: usize,
}

impl Plan {
    pub fn quick() -> Plan {
        Plan {
            mode: "quick",
            reps: 1,
            idle_settle_s: 5.0,
            idle_window_s: 2.0,
            idle_pickups: 3,
            burst_runs: 50,
            flow_runs: 6,
            flow_reps: 1,
            scale_runs: 50,
            scale_reps: 1,
            scale_hold_s: 5.0,
            scale_deadline_s: 60.0,
            server_runs: 30,
            server_idle_s: 20.0,
            docker_runs: 10,
            docker_sleep_s: 20,
            docker_reps: 1,
            kubernetes_runs: 50,
            kubernetes_hold_s: 5.0,
            kubernetes_reps: 1,
            client_threads: 1,
        }
    }

    pub fn full() -> Plan {
        Plan {
            mode: "full",
            reps: 3,
            idle_settle_s: 10.0,
            idle_window_s: 3.0,
            idle_pickups: 6,
            burst_runs: 200,
            flow_runs: 50,
            flow_reps: 2,
            scale_runs: 1000,
            scale_reps: 1,
            scale_hold_s: 20.0,
            scale_deadline_s: 180.0,
            server_runs: 100,
            server_idle_s: 60.0,
            docker_runs: 50,
            docker_sleep_s: 60,
            docker_reps: 2,
            kubernetes_runs: 200,
            kubernetes_hold_s: 10.0,
            kubernetes_reps: 2,
            client_threads: 1,
        }
    }
}

/// What every scenario needs.
pub struct Ctx<'a> {
    pub server: &'a PrefectServer,
    pub programs: Programs,
    /// The repository (its scripts build the Docker test images).
    pub repo: PathBuf,
    /// `examples/flows` (the deployments' working directory).
    pub flows_dir: PathBuf,
    /// Prefect's default process base job template.
    pub template: Value,
    pub plan: Plan,
}

/// A fresh pool and a deployment on it, for one worker in one repetition.
pub struct Fixture {
    pub pool: String,
    pub worker_name: String,
    pub deployment_id: String,
}

/// The pool a fixture creates: its type and base job template.
#[derive(Clone, Copy)]
pub struct PoolKind<'a> {
    pub worker_type: &'static str,
    pub template: &'a Value,
}

impl Fixture {
    /// Pool `bench-<scenario>-<worker>-r<rep>-<hex>`, a deployment of `flows.py:hello` with
    /// these job variables, and the worker's name.
    pub fn create(
        ctx: &Ctx<'_>,
        scenario: &str,
        kind: WorkerKind,
        rep: usize,
        pool_kind: PoolKind<'_>,
        job_variables: Value,
    ) -> Result<Fixture> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let pool = format!("bench-{scenario}-{}-r{rep}-{}", kind.label(), &id[..6]);
        ctx.server
            .create_pool(&pool, pool_kind.worker_type, pool_kind.template)?;
        let deployment_id = ctx
            .server
            .deploy(&pool, &ctx.flows_dir, "hello", job_variables)?;
        Ok(Fixture {
            worker_name: format!("{pool}-worker"),
            pool,
            deployment_id,
        })
    }

    /// Delete the deployment's runs (a run of a custom `command` never reports a state,
    /// so it would stay Pending), the deployment and the pool. Best effort.
    pub fn remove(&self, ctx: &Ctx<'_>) -> Value {
        let ids: Vec<String> = ctx
            .server
            .read_flow_runs(&self.deployment_id)
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect();
        let failed = ctx.server.delete_flow_runs(&ids, 2);
        let _ = ctx.server.delete_deployment(&self.deployment_id);
        let _ = ctx.server.delete_pool(&self.pool);
        serde_json::json!({"runs_deleted": ids.len() - failed, "delete_failures": failed})
    }
}

/// Run `body` for one worker and repetition on a fresh fixture with a process pool, record
/// an error instead of failing, and always clean up.
pub fn one_rep(
    ctx: &Ctx<'_>,
    scenario: &str,
    rep: usize,
    kind: WorkerKind,
    job_variables: Value,
    body: impl FnOnce(&Fixture, &mut RepResult) -> Result<()>,
) -> RepResult {
    let process = PoolKind {
        worker_type: "process",
        template: &ctx.template,
    };
    one_rep_on(ctx, scenario, rep, kind, process, job_variables, body)
}

/// [`one_rep`] on a pool of another kind.
pub fn one_rep_on(
    ctx: &Ctx<'_>,
    scenario: &str,
    rep: usize,
    kind: WorkerKind,
    pool_kind: PoolKind<'_>,
    job_variables: Value,
    body: impl FnOnce(&Fixture, &mut RepResult) -> Result<()>,
) -> RepResult {
    let mut result = RepResult::new(rep, kind);
    eprintln!(
        "[bench] {scenario}: repetition {} of {}, {} worker",
        rep + 1,
        match scenario {
            "scale" => ctx.plan.scale_reps,
            "flows" => ctx.plan.flow_reps,
            "docker" => ctx.plan.docker_reps,
            "kubernetes" => ctx.plan.kubernetes_reps,
            _ => ctx.plan.reps,
        },
        kind.label()
    );
    let settled = settle_server(ctx);
    result.detail("server_settle_s", settled);
    let started = Instant::now();
    match Fixture::create(ctx, scenario, kind, rep, pool_kind, job_variables) {
        Ok(fx) => {
            let server_cpu0 = server_cpu(ctx);
            if let Err(e) = body(&fx, &mut result) {
                eprintln!("[bench]   {} worker: {e:#}", kind.label());
                result.error = Some(format!("{e:#}"));
            }
            if let (Some(a), Some(b)) = (server_cpu0, server_cpu(ctx)) {
                result.detail("server_cpu_s", b - a);
            }
            let cleanup = fx.remove(ctx);
            result.detail("cleanup", cleanup);
        }
        Err(e) => result.error = Some(format!("fixture: {e:#}")),
    }
    result.detail("wall_s", started.elapsed().as_secs_f64());
    result
}

/// Exceptions the server logged since `offset`: how many, and the distinct ones with their
/// counts. An exception is a line at column 0 naming an `…Error`/`…Exception` (the last
/// line of a traceback; each link of a chained traceback counts).
pub fn server_exceptions(ctx: &Ctx<'_>, offset: u64) -> (usize, Vec<(String, usize)>) {
    let log = ctx.server.log_since(offset);
    let mut distinct: Vec<(String, usize)> = Vec::new();
    let mut total = 0;
    for line in log.lines() {
        let head = line.split([':', ' ', '(']).next().unwrap_or_default();
        let is_exception = !line.starts_with(char::is_whitespace)
            && !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            && (head.ends_with("Error")
                || head.ends_with("Exception")
                || head.ends_with("Timeout"));
        if !is_exception {
            continue;
        }
        total += 1;
        let key: String = line.chars().take(160).collect();
        match distinct.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => distinct.push((key, 1)),
        }
    }
    distinct.sort_by_key(|d| std::cmp::Reverse(d.1));
    distinct.truncate(5);
    (total, distinct)
}

/// Wait (at most 60 s) until the server is calm — under a quarter of a CPU over a second —
/// so that a worker never starts while the server still digests the previous phase (late
/// runs, crashed runs, the event backlog). Returns how long that took.
pub fn settle_server(ctx: &Ctx<'_>) -> f64 {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let Some(a) = server_cpu(ctx) else { break };
        sleep(Duration::from_secs(1));
        let Some(b) = server_cpu(ctx) else { break };
        if b - a < 0.25 {
            break;
        }
    }
    started.elapsed().as_secs_f64()
}

/// CPU seconds of the server's whole process tree so far.
pub fn server_cpu(ctx: &Ctx<'_>) -> Option<f64> {
    procfs::usage(ctx.server.pid()?).map(|u| u.tree_cpu_s)
}

/// Seconds from `a` to `b`.
/// A worker's median RSS (MiB) at rest: sampled over `idle_window_s` once it has settled for
/// `idle_settle_s`.
pub fn idle_rss_mib(pid: i32, plan: &Plan) -> Option<f64> {
    sleep(Duration::from_secs_f64(plan.idle_settle_s));
    let idle = procfs::Sampler::start(pid, Duration::from_millis(250));
    sleep(Duration::from_secs_f64(plan.idle_window_s));
    let rss: Vec<f64> = idle
        .finish()
        .iter()
        .map(|(_, u)| u.worker_rss_kib as f64 / MIB)
        .collect();
    median(&rss)
}

pub fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// Sleep until wall-clock time `t` (no-op if past).
pub fn sleep_until(t: DateTime<Utc>) {
    let d = secs(Utc::now(), t);
    if d > 0.0 {
        sleep(Duration::from_secs_f64(d));
    }
}

/// Poll `f` every `every` until it yields `Some`; an error naming `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(every);
    }
}

pub const MIB: f64 = 1024.0;

/// Flow run id → (`expected_start_time`, state type).
pub fn expected_starts(
    ctx: &Ctx<'_>,
    deployment_id: &str,
) -> Result<HashMap<String, (DateTime<Utc>, String)>> {
    Ok(ctx
        .server
        .read_flow_runs(deployment_id)?
        .iter()
        .filter_map(|run| {
            Some((
                run["id"].as_str()?.to_owned(),
                (
                    parse_time(&run["expected_start_time"])?,
                    run["state"]["type"].as_str().unwrap_or("NONE").to_owned(),
                ),
            ))
        })
        .collect())
}
