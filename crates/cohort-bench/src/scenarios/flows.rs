//! Scenario 4: real flows end to end. `flow_runs` runs of `examples/flows/flows.py:hello`
//! (Prefect's engine in a Python process per run) are created at once; each is timed from
//! its `expected_start_time` to the time of its final state.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{json, Value};

use super::{one_rep, secs, server_exceptions, sleep_until, wait_for, Ctx, MIB};
use crate::procfs::{self, sample_at, Sampler};
use crate::report::{MetricDef, RepResult, ScenarioReport};
use crate::server::parse_time;
use crate::stats::percentile;
use crate::worker::{Worker, WorkerKind};

const FINAL: [&str; 4] = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"];

const METRICS: [MetricDef; 10] = [
    MetricDef::new("e2e_p50_s", "scheduled → Completed, p50", "s"),
    MetricDef::new("e2e_p95_s", "scheduled → Completed, p95", "s"),
    MetricDef::new("pickup_p50_s", "pickup latency p50", "s"),
    MetricDef::new("completed", "runs Completed", "runs"),
    MetricDef::new("cpu_per_run_s", "worker CPU per run", "s"),
    MetricDef::new(
        "tree_cpu_per_run_s",
        "process-tree CPU per run (incl. the flows)",
        "s",
    ),
    MetricDef::new("peak_worker_rss_mib", "peak RSS, worker process", "MiB"),
    MetricDef::new(
        "peak_tree_rss_mib",
        "peak RSS, process tree (incl. the flows)",
        "MiB",
    ),
    MetricDef::new("server_errors", "exceptions in the server log", "count"),
    MetricDef::new("server_cpu_s", "server CPU during the phase", "s"),
];

pub fn run(ctx: &Ctx<'_>) -> ScenarioReport {
    let plan = &ctx.plan;
    let mut report = ScenarioReport::new("flows", "4. Real flows end to end", &METRICS);
    report.params = json!({
        "what": format!(
            "{} runs of `examples/flows/flows.py:hello` created at once (scheduled now), no \
             concurrency limit: each run is `python -m prefect.engine` in its own process. \
             Latency = the final state's timestamp − `expected_start_time`. Worker CPU per \
             run: the worker process's CPU from before the runs are created to 2 s after the \
             last one ends, over the runs.",
            plan.flow_runs
        ),
        "flow_runs": plan.flow_runs,
        "entrypoint": "flows.py:hello",
    });
    for rep in 0..plan.flow_reps {
        for kind in WorkerKind::order(rep) {
            let mut r = one_rep(ctx, "flows", rep, kind, json!({}), |fx, r| {
                body(ctx, fx, kind, r)
            });
            let cpu = r.details.get("server_cpu_s").and_then(Value::as_f64);
            r.set("server_cpu_s", cpu);
            report.reps.push(r);
        }
    }
    report.summarize();
    report
}

fn body(ctx: &Ctx<'_>, fx: &super::Fixture, kind: WorkerKind, r: &mut RepResult) -> Result<()> {
    let plan = &ctx.plan;
    let server = ctx.server;
    let log_offset = server.log_len();
    let mut worker = Worker::spawn(server, &ctx.programs, kind, &fx.pool, &fx.worker_name)?;
    worker.wait_started(Duration::from_secs(120))?;
    let sampler = Sampler::start(worker.pid(), Duration::from_millis(500));
    let before = procfs::usage(worker.pid());
    let ids = server.create_flow_runs(
        &fx.deployment_id,
        plan.flow_runs,
        plan.client_threads,
        Duration::from_secs(180),
    )?;
    let n = ids.len() as u64;
    let waited = wait_for(
        "every run to reach a final state",
        Duration::from_secs_f64(120.0 + plan.flow_runs as f64 * 8.0),
        Duration::from_secs(1),
        || {
            worker.ensure_alive()?;
            Ok((server.count_flow_runs(&fx.deployment_id, &FINAL)? >= n).then_some(()))
        },
    );
    let runs = server.read_flow_runs(&fx.deployment_id)?;
    let mut e2e = Vec::new();
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut last_end: Option<DateTime<Utc>> = None;
    let mut expected: HashMap<String, DateTime<Utc>> = HashMap::new();
    for run in &runs {
        let state = run["state"]["type"].as_str().unwrap_or("NONE").to_owned();
        let start = parse_time(&run["expected_start_time"]);
        let end = parse_time(&run["state"]["timestamp"]);
        if let (Some(id), Some(s)) = (run["id"].as_str(), start) {
            expected.insert(id.to_owned(), s);
        }
        if FINAL.contains(&state.as_str()) {
            last_end = last_end.max(end);
        }
        if state == "COMPLETED" {
            if let (Some(s), Some(e)) = (start, end) {
                e2e.push(secs(s, e));
            }
        }
        *states.entry(state).or_default() += 1;
    }
    if let Some(t) = last_end {
        sleep_until(t + ChronoDuration::milliseconds(2600));
    }
    let samples = sampler.finish();
    let submitted = worker.submitted_runs()?;
    let stop = worker.stop(Duration::from_secs(20));
    r.detail("worker_stop", stop);

    r.set("e2e_p50_s", percentile(&e2e, 50.0));
    r.set("e2e_p95_s", percentile(&e2e, 95.0));
    r.set(
        "completed",
        Some(*states.get("COMPLETED").unwrap_or(&0) as f64),
    );
    let pickup: Vec<f64> = submitted
        .iter()
        .filter_map(|(id, t)| Some(secs(*expected.get(id)?, *t)))
        .collect();
    r.set("pickup_p50_s", percentile(&pickup, 50.0));
    if let (Some(a), Some(b)) = (
        before,
        last_end.and_then(|t| sample_at(&samples, t + ChronoDuration::seconds(2))),
    ) {
        r.set(
            "cpu_per_run_s",
            Some((b.worker_cpu_s - a.worker_cpu_s) / n as f64),
        );
        r.set(
            "tree_cpu_per_run_s",
            Some((b.tree_cpu_s - a.tree_cpu_s) / n as f64),
        );
    }
    let peak = |f: fn(&procfs::Usage) -> u64| samples.iter().map(|(_, u)| f(u)).max();
    r.set(
        "peak_worker_rss_mib",
        peak(|u| u.worker_rss_kib).map(|k| k as f64 / MIB),
    );
    r.set(
        "peak_tree_rss_mib",
        peak(|u| u.tree_rss_kib).map(|k| k as f64 / MIB),
    );
    r.detail("states", &states);
    let (server_errors, sample) = server_exceptions(ctx, log_offset);
    r.set("server_errors", Some(server_errors as f64));
    r.detail("server_exceptions", sample);
    r.detail("e2e_latencies_s", &e2e);
    r.detail(
        "peak_tree_procs",
        samples.iter().map(|(_, u)| u.tree_procs).max(),
    );
    waited.map(|_| ())
}
