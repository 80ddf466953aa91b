//! Scenario 5: `scale_runs` flow runs running at once, each a `sleep 3600` process (job
//! variable `command`), and what the worker costs while it supervises them.
//!
//! The runs are created at once; the driver counts the worker's live `sleep` descendants
//! every second until all run (or the deadline passes, or the worker falls over), holds
//! them for `scale_hold_s`, then reads the worker process's RSS (alone: the tree is
//! dominated by the `sleep` children) and its CPU. Afterwards every child's process group
//! is killed with `killpg(2)` before the worker is stopped.

use std::collections::HashMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::Utc;
use serde_json::{json, Value};

use super::{one_rep, secs, server_exceptions, Ctx, MIB};
use crate::procfs;
use crate::report::{MetricDef, RepResult, ScenarioReport};
use crate::worker::{Worker, WorkerKind};

const METRICS: [MetricDef; 12] = [
    MetricDef::new("running", "flow processes running at once", "runs"),
    MetricDef::new("worker_rss_mib", "RSS, worker process, all running", "MiB").cohort_below(50.0),
    MetricDef::new("worker_hwm_mib", "peak RSS (VmHWM), worker process", "MiB"),
    MetricDef::new(
        "rss_per_run_kib",
        "worker RSS per running run (slope)",
        "KiB",
    ),
    MetricDef::new(
        "tree_rss_mib",
        "RSS, process tree (sum; mostly `sleep`)",
        "MiB",
    ),
    MetricDef::new("tree_pss_mib", "PSS, process tree", "MiB"),
    MetricDef::new("time_to_all_s", "worker started → all running", "s"),
    MetricDef::new("cpu_per_run_s", "worker CPU per run launched", "s"),
    MetricDef::new("steady_cpu_pct", "worker CPU while supervising", "%"),
    MetricDef::new("worker_threads", "worker threads, all running", "count"),
    MetricDef::new("server_errors", "exceptions in the server log", "count"),
    MetricDef::new("server_cpu_s", "server CPU during the phase", "s"),
];

pub fn run(ctx: &Ctx<'_>) -> ScenarioReport {
    let plan = &ctx.plan;
    let mut report = ScenarioReport::new(
        "scale",
        "5. Scale: concurrently running flow processes",
        &METRICS,
    );
    report.params = json!({
        "what": format!(
            "{} runs of a deployment with job variable `command: sleep 3600`, created \
             before the worker starts (scheduled now); the worker may launch them all (no \
             limit; Prefect's server hands out at most 200 per poll). Measured once all are \
             running (or at the {:.0} s deadline, from the worker's started event) and held \
             {:.0} s: the worker process's RSS alone — \
             the tree's RSS is dominated by the {} `sleep` children and is shown only for \
             completeness — and its CPU (launch CPU per run; steady CPU over the hold).",
            plan.scale_runs, plan.scale_deadline_s, plan.scale_hold_s, plan.scale_runs
        ),
        "command": "sleep 3600",
        "scale_runs": plan.scale_runs,
        "hold_s": plan.scale_hold_s,
        "deadline_s": plan.scale_deadline_s,
    });
    if plan.scale_runs < 1000 {
        report.notes.push(format!(
            "Only {} runs in this mode: the 50 MB target is meant for 1,000 (the full run).",
            plan.scale_runs
        ));
    }
    for rep in 0..plan.scale_reps {
        for kind in WorkerKind::order(rep) {
            let mut r = one_rep(
                ctx,
                "scale",
                rep,
                kind,
                json!({"command": "sleep 3600"}),
                |fx, r| body(ctx, fx, kind, r),
            );
            let cpu = r.details.get("server_cpu_s").and_then(Value::as_f64);
            r.set("server_cpu_s", cpu);
            report.reps.push(r);
        }
    }
    report.summarize();
    for r in &report.reps {
        if let Some(profile) = r
            .details
            .get("rss_by_mapping_kib")
            .and_then(|v| serde_json::from_value::<Vec<(String, u64)>>(v.clone()).ok())
        {
            let parts: Vec<String> = profile
                .iter()
                .take(5)
                .map(|(name, kib)| format!("`{name}` {:.1}", *kib as f64 / MIB))
                .collect();
            report.notes.push(format!(
                "Where the {} worker's RSS goes with all runs running (MiB, repetition {}): {}.",
                r.worker.label(),
                r.rep + 1,
                parts.join(", ")
            ));
        }
    }
    report
}

fn body(ctx: &Ctx<'_>, fx: &super::Fixture, kind: WorkerKind, r: &mut RepResult) -> Result<()> {
    let server = ctx.server;
    let plan = &ctx.plan;
    // The runs exist before the worker starts: on SQLite, creating them while a worker
    // submits makes both wait on the database lock, and the creation rate would be
    // measured instead of the worker.
    let created_from = Utc::now();
    let ids = server.create_flow_runs(
        &fx.deployment_id,
        plan.scale_runs,
        plan.client_threads,
        Duration::from_secs(300),
    )?;
    r.detail("create_s", secs(created_from, Utc::now()));
    let log_offset = server.log_len();
    let mut worker = Worker::spawn(server, &ctx.programs, kind, &fx.pool, &fx.worker_name)?;
    let started = worker.wait_started(Duration::from_secs(120))?;
    let pid = worker.pid();
    let before = procfs::usage(pid);
    let result = launch_and_hold(ctx, ids.len(), &mut worker, r, before, started);
    // Where the runs were when the measurement ended.
    if let Ok(runs) = server.read_flow_runs(&fx.deployment_id) {
        let mut states: HashMap<String, usize> = HashMap::new();
        for run in &runs {
            let key = format!(
                "{}/{}",
                run["state"]["type"].as_str().unwrap_or("NONE"),
                run["state"]["name"].as_str().unwrap_or("")
            );
            *states.entry(key).or_default() += 1;
        }
        r.detail("states", states);
    }
    let (server_errors, sample) = server_exceptions(ctx, log_offset);
    r.set("server_errors", Some(server_errors as f64));
    r.detail("server_exceptions", sample);
    let worker_errors = worker.error_lines();
    r.detail("worker_error_lines", worker_errors.len());
    r.detail(
        "worker_error_sample",
        worker_errors.iter().take(5).collect::<Vec<_>>(),
    );

    // Clean up whatever happened: the children's groups first (the worker reaps them),
    // then the worker.
    let killed = worker.kill_descendants();
    let wait_from = Instant::now();
    while procfs::tree(pid).len() > 1 && wait_from.elapsed() < Duration::from_secs(15) {
        worker.kill_descendants();
        sleep(Duration::from_millis(200));
    }
    r.detail("children_killed", killed);
    let stop = worker.stop(Duration::from_secs(10));
    r.detail("worker_stop", stop);
    r.detail("submitted_events", worker.count_submitted().ok());
    result
}

/// From the worker's start (`t0`, its started event): wait for `n` running children,
/// hold, measure.
fn launch_and_hold(
    ctx: &Ctx<'_>,
    n: usize,
    worker: &mut Worker<'_>,
    r: &mut RepResult,
    before: Option<procfs::Usage>,
    t0: chrono::DateTime<Utc>,
) -> Result<()> {
    let plan = &ctx.plan;
    let pid = worker.pid();
    let deadline = Instant::now() + Duration::from_secs_f64(plan.scale_deadline_s);
    // (seconds since start, running children, worker RSS in KiB)
    let mut timeline: Vec<(f64, usize, u64)> = Vec::new();
    let mut max_running = 0;
    let mut at_all = None;
    let mut fell_over = None;
    loop {
        if let Some(status) = worker.exited() {
            fell_over = Some(format!(
                "the {} worker exited ({}) with {max_running} runs running; last output:\n{}",
                kind_label(worker),
                crate::worker::describe_status(status),
                worker.output_tail(15)
            ));
            break;
        }
        let running = procfs::count_descendants_running(pid, "sleep");
        max_running = max_running.max(running);
        let t = secs(t0, Utc::now());
        if timeline.last().map(|(_, n, _)| *n) != Some(running) {
            let rss = procfs::rss_kib(pid).map_or(0, |r| r.0);
            timeline.push((t, running, rss));
        }
        if running >= n {
            at_all = Some(t);
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_secs(1));
    }
    r.set("running", Some(max_running as f64));
    r.set("time_to_all_s", at_all);
    r.detail("running_timeline", &timeline);
    r.set("rss_per_run_kib", rss_slope_kib(&timeline));
    if let Some(msg) = fell_over {
        bail!(msg);
    }
    let launched = procfs::usage(pid);
    let hold_from = Instant::now();
    sleep(Duration::from_secs_f64(plan.scale_hold_s));
    let held = procfs::usage(pid);
    worker.ensure_alive()?;
    let running = procfs::count_descendants_running(pid, "sleep");
    r.detail("running_after_hold", running);
    if let (Some(a), Some(b), Some(c)) = (before, launched, held) {
        r.set(
            "cpu_per_run_s",
            Some((b.worker_cpu_s - a.worker_cpu_s) / (max_running.max(1)) as f64),
        );
        r.set(
            "steady_cpu_pct",
            Some(100.0 * (c.worker_cpu_s - b.worker_cpu_s) / hold_from.elapsed().as_secs_f64()),
        );
        r.set("worker_rss_mib", Some(c.worker_rss_kib as f64 / MIB));
        r.set("worker_hwm_mib", Some(c.worker_hwm_kib as f64 / MIB));
        r.set("tree_rss_mib", Some(c.tree_rss_kib as f64 / MIB));
        r.detail("tree_procs", c.tree_procs);
    }
    r.set("tree_pss_mib", Some(procfs::tree_pss_kib(pid) as f64 / MIB));
    let mut by_mapping = procfs::rss_by_mapping(pid);
    by_mapping.truncate(8);
    r.detail("rss_by_mapping_kib", by_mapping);
    for key in ["RssAnon", "RssFile"] {
        r.detail(key, procfs::status_field(pid, key));
    }
    r.set(
        "worker_threads",
        procfs::status_field(pid, "Threads").map(|n| n as f64),
    );
    if at_all.is_none() {
        bail!(
            "only {max_running} of {n} runs were running after {:.0} s",
            plan.scale_deadline_s
        );
    }
    Ok(())
}

fn kind_label(worker: &Worker<'_>) -> &'static str {
    worker.kind.label()
}

/// Least-squares slope of worker RSS over running children, in KiB per run: what each
/// supervised run costs the worker. `None` with fewer than two distinct counts.
fn rss_slope_kib(timeline: &[(f64, usize, u64)]) -> Option<f64> {
    let points: Vec<(f64, f64)> = timeline
        .iter()
        .filter(|(_, _, rss)| *rss > 0)
        .map(|(_, n, rss)| (*n as f64, *rss as f64))
        .collect();
    let k = points.len() as f64;
    if k < 2.0 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / k;
    let my = points.iter().map(|p| p.1).sum::<f64>() / k;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_rss_over_runs() {
        let t = [(0.0, 0, 1000), (1.0, 10, 1500), (2.0, 20, 2000)];
        assert!((rss_slope_kib(&t).unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(rss_slope_kib(&t[..1]), None);
    }
}
