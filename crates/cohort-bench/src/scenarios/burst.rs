//! Scenario 3: pickup on an idle server, then a burst of runs scheduled now, on a
//! deployment whose `command` job variable is `true` (a no-op process).
//!
//! Pickup latency of a run = its `submitted-flow-run` event's `occurred` − its
//! `expected_start_time`. First a few single runs are created one at a time, a few seconds
//! apart (pickup on an idle server); then `burst_runs` at once from several client threads.
//! Worker CPU per run is the worker process's CPU from just before the burst is created to
//! 2 s after the last `submitted-flow-run`, divided by the runs.
//!
//! A run of a custom command never reports a state (nothing runs Prefect's engine), so the
//! runs stay Pending; the fixture deletes them afterwards.

use std::collections::HashMap;
use std::thread::sleep;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{json, Value};

use super::{
    expected_starts, one_rep, secs, server_exceptions, sleep_until, wait_for, Ctx, Fixture,
    PoolKind,
};
use crate::procfs::{self, sample_at, Sampler};
use crate::report::{MetricDef, RepResult, ScenarioReport};
use crate::stats::percentile;
use crate::worker::{Worker, WorkerKind};

const METRICS: [MetricDef; 13] = [
    MetricDef::new(
        "idle_pickup_p50_s",
        "pickup latency on an idle server, p50",
        "s",
    )
    .cohort_below(0.2),
    MetricDef::new(
        "idle_pickup_max_s",
        "pickup latency on an idle server, max",
        "s",
    ),
    MetricDef::new(
        "idle_pickup_polling_p50_s",
        "… p50 by polling alone (Cohort with `COHORT_EVENT_WAKE=0`: before event wake-up)",
        "s",
    ),
    MetricDef::new("cpu_per_run_s", "worker CPU per run", "s").ratio_at_most(0.1),
    MetricDef::new(
        "tree_cpu_per_run_s",
        "process-tree CPU per run (incl. `true`)",
        "s",
    ),
    MetricDef::new("pickup_p50_s", "burst pickup latency p50", "s").ratio_at_most(0.1),
    MetricDef::new("pickup_p95_s", "burst pickup latency p95", "s"),
    MetricDef::new(
        "submit_all_s",
        "time to submit all (first scheduled → last submitted)",
        "s",
    ),
    MetricDef::new("submit_span_s", "first → last submitted", "s"),
    MetricDef::new("create_s", "time the driver took to create the burst", "s"),
    MetricDef::new(
        "harmed_runs",
        "runs harmed (not submitted, or Crashed/Failed)",
        "runs",
    ),
    MetricDef::new(
        "server_errors",
        "server log errors during the phase",
        "count",
    ),
    MetricDef::new("server_cpu_s", "server CPU during the phase", "s"),
];

/// Gaps between the single runs: spread over a 10 s poll interval, the same for both
/// workers.
const IDLE_GAPS_S: [f64; 8] = [1.3, 2.9, 0.7, 3.6, 2.1, 1.6, 3.1, 0.9];

pub fn run(ctx: &Ctx<'_>) -> ScenarioReport {
    let plan = &ctx.plan;
    let mut report = ScenarioReport::new("burst", "3. Burst of no-op runs", &METRICS);
    report.params = json!({
        "what": format!(
            "Deployment with job variable `command: true`. First {} single runs created a \
             few seconds apart (pickup on an idle server), then {} runs created at once \
             (scheduled now, by {} client thread{}). Pickup latency = `submitted-flow-run` \
             `occurred` − the run's `expected_start_time`. Worker CPU per run: the worker \
             process's CPU from just before the burst to 2 s after its last \
             `submitted-flow-run`, over the burst's runs. Harmed: burst runs without a \
             `submitted-flow-run`, or Crashed/Failed. Server errors: exceptions in the server \
             log during the phase (SQLite's `database is locked`, mostly).",
            plan.idle_pickups,
            plan.burst_runs,
            plan.client_threads,
            if plan.client_threads == 1 { "" } else { "s" }
        ),
        "command": "true",
        "idle_pickups": plan.idle_pickups,
        "burst_runs": plan.burst_runs,
    });
    for rep in 0..plan.reps {
        for kind in WorkerKind::order(rep) {
            let r = one_rep(
                ctx,
                "burst",
                rep,
                kind,
                json!({"command": "true"}),
                |fx, r| body(ctx, fx, kind, r),
            );
            report.reps.push(with_server_cpu(r));
        }
    }
    report.summarize();
    report
}

/// Creates the single runs a few seconds apart and returns their pickup latencies.
fn idle_pickups(ctx: &Ctx<'_>, fx: &Fixture, worker: &mut Worker<'_>) -> Result<Vec<f64>> {
    let server = ctx.server;
    let mut idle_ids = Vec::new();
    for i in 0..ctx.plan.idle_pickups {
        sleep(Duration::from_secs_f64(IDLE_GAPS_S[i % IDLE_GAPS_S.len()]));
        idle_ids.push(server.create_flow_run(&fx.deployment_id)?);
    }
    let n_idle = idle_ids.len() as u64;
    wait_for(
        "the single runs' submitted-flow-run events",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            worker.ensure_alive()?;
            Ok((worker.count_submitted()? >= n_idle).then_some(()))
        },
    )?;
    let runs = expected_starts(ctx, &fx.deployment_id)?;
    let submitted: HashMap<String, DateTime<Utc>> = worker.submitted_runs()?.into_iter().collect();
    Ok(idle_ids
        .iter()
        .filter_map(|id| Some(secs(runs.get(id)?.0, *submitted.get(id)?)))
        .collect())
}

fn with_server_cpu(mut r: RepResult) -> RepResult {
    let cpu = r.details.get("server_cpu_s").and_then(Value::as_f64);
    r.set("server_cpu_s", cpu);
    r
}

fn body(ctx: &Ctx<'_>, fx: &Fixture, kind: WorkerKind, r: &mut RepResult) -> Result<()> {
    let plan = &ctx.plan;
    let server = ctx.server;
    let log_offset = server.log_len();

    // -- before event wake-up: Cohort polling alone, as Prefect's worker does ----------------
    // On a pool of its own: a worker that stopped on the measured pool would be listed
    // online there for a while yet, and own a share of its runs.
    if kind == WorkerKind::Cohort {
        let process = PoolKind {
            worker_type: "process",
            template: &ctx.template,
        };
        let own = Fixture::create(
            ctx,
            "burst-polling",
            kind,
            r.rep,
            process,
            json!({"command": "true"}),
        )?;
        let name = format!("{} polling", own.worker_name);
        let measured = Worker::spawn_with_env(
            server,
            &ctx.programs,
            kind,
            &own.pool,
            &name,
            &[("COHORT_EVENT_WAKE", "0")],
        )
        .and_then(|mut polling| {
            polling.wait_started(Duration::from_secs(120))?;
            let lat = idle_pickups(ctx, &own, &mut polling);
            polling.stop(Duration::from_secs(20));
            lat
        });
        own.remove(ctx);
        let lat = measured?;
        r.set("idle_pickup_polling_p50_s", percentile(&lat, 50.0));
        r.detail("idle_pickup_polling_latencies_s", &lat);
    }

    let mut worker = Worker::spawn(server, &ctx.programs, kind, &fx.pool, &fx.worker_name)?;
    worker.wait_started(Duration::from_secs(120))?;

    // -- single runs on an idle server ------------------------------------------------------
    let idle_lat = idle_pickups(ctx, fx, &mut worker)?;
    let n_idle = idle_lat.len() as u64;
    r.set("idle_pickup_p50_s", percentile(&idle_lat, 50.0));
    r.set("idle_pickup_max_s", percentile(&idle_lat, 100.0));
    if kind == WorkerKind::Python {
        // Prefect's worker only polls: its "before" is its only way.
        r.set("idle_pickup_polling_p50_s", percentile(&idle_lat, 50.0));
    }
    r.detail("idle_pickup_latencies_s", &idle_lat);

    // -- the burst --------------------------------------------------------------------------
    sleep(Duration::from_secs(2));
    let sampler = Sampler::start(worker.pid(), Duration::from_millis(250));
    let before = procfs::usage(worker.pid());
    let created_from = Utc::now();
    let ids = server.create_flow_runs(
        &fx.deployment_id,
        plan.burst_runs,
        plan.client_threads,
        Duration::from_secs(180),
    )?;
    let created_in = secs(created_from, Utc::now());
    r.set("create_s", Some(created_in));
    let want = n_idle + ids.len() as u64;
    let deadline = Duration::from_secs_f64(120.0 + plan.burst_runs as f64 * 0.5);
    let waited = wait_for(
        "every burst run's submitted-flow-run event",
        deadline,
        Duration::from_secs(1),
        || {
            worker.ensure_alive()?;
            Ok((worker.count_submitted()? >= want).then_some(()))
        },
    );
    let submitted: HashMap<String, DateTime<Utc>> = worker.submitted_runs()?.into_iter().collect();
    let last = ids.iter().filter_map(|id| submitted.get(id)).max().copied();
    if let Some(last) = last {
        sleep_until(last + ChronoDuration::milliseconds(2300));
    }
    let samples = sampler.finish();
    let runs = expected_starts(ctx, &fx.deployment_id)?;
    let stop = worker.stop(Duration::from_secs(20));
    r.detail("worker_stop", stop);

    let n = ids.len() as f64;
    if let (Some(b), Some(a)) = (
        last.and_then(|t| sample_at(&samples, t + ChronoDuration::seconds(2))),
        before,
    ) {
        r.set("cpu_per_run_s", Some((b.worker_cpu_s - a.worker_cpu_s) / n));
        r.set(
            "tree_cpu_per_run_s",
            Some((b.tree_cpu_s - a.tree_cpu_s) / n),
        );
        r.detail(
            "peak_worker_rss_kib",
            samples.iter().map(|(_, u)| u.worker_rss_kib).max(),
        );
    }
    let lat: Vec<f64> = ids
        .iter()
        .filter_map(|id| Some(secs(runs.get(id)?.0, *submitted.get(id)?)))
        .collect();
    r.set("pickup_p50_s", percentile(&lat, 50.0));
    r.set("pickup_p95_s", percentile(&lat, 95.0));
    let first_expected = ids.iter().filter_map(|id| runs.get(id).map(|x| x.0)).min();
    let first_submitted = ids.iter().filter_map(|id| submitted.get(id)).min().copied();
    if let (Some(fe), Some(fs), Some(l)) = (first_expected, first_submitted, last) {
        r.set("submit_all_s", Some(secs(fe, l)));
        r.set("submit_span_s", Some(secs(fs, l)));
    }
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut harmed = 0;
    for id in &ids {
        let state = runs
            .get(id)
            .map(|x| x.1.clone())
            .unwrap_or_else(|| "MISSING".into());
        if !submitted.contains_key(id) || matches!(state.as_str(), "CRASHED" | "FAILED" | "MISSING")
        {
            harmed += 1;
        }
        *states.entry(state).or_default() += 1;
    }
    r.set("harmed_runs", Some(harmed as f64));
    r.detail("burst_states", &states);
    r.detail("burst_latencies_s", &lat);
    let (server_errors, sample) = server_exceptions(ctx, log_offset);
    r.set("server_errors", Some(server_errors as f64));
    r.detail("server_exceptions", sample);
    let worker_errors = worker.error_lines();
    r.detail("worker_error_lines", worker_errors.len());
    r.detail(
        "worker_error_sample",
        worker_errors.iter().take(5).collect::<Vec<_>>(),
    );
    waited.map(|_| ())
}
