//! Scenario 6: the load the workers put on the Prefect server, counted by a proxy between
//! them and the server ([`CountingProxy`]); the driver talks to the server directly.
//!
//! For 1 worker and for 4 workers on one pool, Prefect's worker and Cohort alternating on
//! fresh pools: the workers start (their `PREFECT_API_URL` is the proxy; the flow
//! processes inherit it, but `command: true` runs no engine, so every counted request is a
//! worker's), then the idle window counts requests with no runs; then the driver creates a
//! burst of no-op runs at once while the workers work, and the burst window, from just
//! before the first creation to a few seconds after the last submission, gives requests and
//! server CPU (the server's whole process tree, from `/proc`) per run. Double submissions
//! are runs with more than one `prefect.worker.submitted-flow-run` event, read back from
//! the server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{json, Value};

use super::{one_rep, secs, server_cpu, sleep_until, wait_for, Ctx, Fixture, PoolKind};
use crate::proxy::CountingProxy;
use crate::report::{MetricDef, RepResult, ScenarioReport};
use crate::server::parse_time;
use crate::stats::{median, percentile};
use crate::worker::{Worker, WorkerKind, EVENT_EXECUTED, EVENT_SUBMITTED};

/// Worker counts on one pool.
const WORKERS: [usize; 2] = [1, 4];

/// The burst window ends this long after the last run's `executed-flow-run`: what a worker
/// does once a run's process has exited (`true` exits at once) is part of the run's cost.
const TAIL_S: i64 = 5;

const METRICS: [MetricDef; 18] = [
    MetricDef::new(
        "requests_per_run_w1",
        "1 worker: REST requests per run",
        "req",
    )
    .ratio_at_most(0.6),
    MetricDef::new("server_cpu_per_run_w1", "1 worker: server CPU per run", "s").ratio_at_most(0.7),
    MetricDef::new(
        "worker_cpu_per_run_w1",
        "1 worker: server CPU per run, less the driver's creating it",
        "s",
    )
    .ratio_at_most(0.7),
    MetricDef::new(
        "create_s_w1",
        "1 worker: time for the driver to create the burst",
        "s",
    )
    .ratio_at_most(1.1),
    MetricDef::new(
        "idle_per_min_w1",
        "1 worker: idle REST requests per minute",
        "req",
    )
    .ratio_at_most(1.0),
    MetricDef::new("pickup_p50_w1", "1 worker: burst pickup latency p50", "s").ratio_at_most(1.0),
    MetricDef::new(
        "double_w1",
        "1 worker: runs submitted more than once",
        "runs",
    )
    .cohort_below(1.0),
    MetricDef::new("scheduled_w1", "1 worker: runs left Scheduled", "runs").cohort_below(1.0),
    MetricDef::new(
        "websockets_per_run_w1",
        "1 worker: websocket connections opened per run",
        "req",
    ),
    MetricDef::new(
        "requests_per_run_w4",
        "4 workers: REST requests per run",
        "req",
    )
    .ratio_at_most(0.5),
    MetricDef::new(
        "server_cpu_per_run_w4",
        "4 workers: server CPU per run",
        "s",
    )
    .ratio_at_most(0.7),
    MetricDef::new(
        "worker_cpu_per_run_w4",
        "4 workers: server CPU per run, less the driver's creating it",
        "s",
    )
    .ratio_at_most(0.7),
    MetricDef::new(
        "create_s_w4",
        "4 workers: time for the driver to create the burst",
        "s",
    )
    .ratio_at_most(1.1),
    MetricDef::new(
        "idle_per_min_w4",
        "4 workers: idle REST requests per minute",
        "req",
    )
    .ratio_at_most(1.0),
    MetricDef::new("pickup_p50_w4", "4 workers: burst pickup latency p50", "s").ratio_at_most(1.0),
    MetricDef::new(
        "double_w4",
        "4 workers: runs submitted more than once",
        "runs",
    )
    .cohort_below(1.0),
    MetricDef::new("scheduled_w4", "4 workers: runs left Scheduled", "runs").cohort_below(1.0),
    MetricDef::new(
        "websockets_per_run_w4",
        "4 workers: websocket connections opened per run",
        "req",
    ),
];

pub fn run(ctx: &Ctx<'_>) -> ScenarioReport {
    let plan = &ctx.plan;
    let mut report = ScenarioReport::new("server", "6. Load on the Prefect server", &METRICS);
    report.params = json!({
        "what": format!(
            "A counting proxy between the workers and the server (REST requests by method \
             and endpoint, websocket connections opened); the driver talks to the server \
             directly. 1 worker, then 4 workers on one pool, on a deployment with job \
             variable `command: true`: the workers start, {settle:.0} s later the idle \
             window counts their requests for {idle:.0} s with no runs; then the driver \
             creates {n} runs at once (by {t} client thread{ts}) while the workers run. \
             Requests and server CPU (the server's whole process tree, utime + stime from \
             `/proc`) per run: from just before the first creation to {TAIL_S} s after the \
             last run's `executed-flow-run` (the workers' whole sequence for every run), \
             over the {n} runs. Create time: how long the driver \
             took to create them (another client's latency). Submitted more than once: \
             runs with more than one `submitted-flow-run` event; left Scheduled: at the \
             end of the window. Pickup = first `submitted-flow-run` − \
             `expected_start_time`. Less the driver's creating it: before the workers \
             start, the driver creates a burst of the same size on a deployment of another \
             pool, alone, and the server CPU that took is measured (the same work whichever \
             worker follows), then those runs are deleted; it is subtracted from the same \
             repetition's burst, leaving \
             what the server spent on the workers (and on the events and state changes \
             they caused).",
            settle = plan.idle_settle_s,
            idle = plan.server_idle_s,
            n = plan.server_runs,
            t = plan.client_threads,
            ts = if plan.client_threads == 1 { "" } else { "s" },
        ),
        "command": "true",
        "runs": plan.server_runs,
        "idle_window_s": plan.server_idle_s,
        "tail_s": TAIL_S,
        "workers": WORKERS,
    });
    for rep in 0..plan.reps {
        for workers in WORKERS {
            for kind in WorkerKind::order(rep) {
                let mut r = one_rep(
                    ctx,
                    "server",
                    rep,
                    kind,
                    json!({"command": "true"}),
                    |fx, r| body(ctx, fx, kind, workers, r),
                );
                r.detail("workers", workers);
                if let Some(e) = &mut r.error {
                    *e = format!("{workers} worker(s): {e}");
                }
                report.reps.push(r);
            }
        }
    }
    report.summarize();
    for workers in WORKERS {
        report.tables.push(endpoint_table(&report, workers));
    }
    report
}

/// Creates the burst on `fx` with no worker about, and records how long that took and the
/// server CPU it cost per run (returned); the runs are deleted after.
fn create_alone(ctx: &Ctx<'_>, fx: &Fixture, r: &mut RepResult) -> Result<Option<f64>> {
    let (plan, server) = (&ctx.plan, ctx.server);
    let cpu0 = server_cpu(ctx);
    let alone_from = Instant::now();
    let alone = server.create_flow_runs(
        &fx.deployment_id,
        plan.server_runs,
        plan.client_threads,
        Duration::from_secs(300),
    )?;
    // The driver's creation time with no worker about: how noisy the machine is this
    // repetition, beside the create time measured with the workers.
    r.detail("create_alone_s", alone_from.elapsed().as_secs_f64());
    sleep(Duration::from_secs(TAIL_S as u64));
    let creation_cpu = match (cpu0, server_cpu(ctx)) {
        (Some(a), Some(b)) => Some((b - a) / alone.len() as f64),
        _ => None,
    };
    r.detail("creation_server_cpu_per_run", creation_cpu);
    let failed = server.delete_flow_runs(&alone, plan.client_threads);
    anyhow::ensure!(
        failed == 0,
        "{failed} of the {} runs created alone could not be deleted",
        alone.len()
    );
    Ok(creation_cpu)
}

fn body(
    ctx: &Ctx<'_>,
    fx: &Fixture,
    kind: WorkerKind,
    workers: usize,
    r: &mut RepResult,
) -> Result<()> {
    let plan = &ctx.plan;
    let server = ctx.server;
    let w = format!("w{workers}");
    let (proxy, api) = CountingProxy::in_front_of(server.api_url())?;

    // -- the driver alone ---------------------------------------------------------------------
    // What creating the burst costs the server with no worker about: subtracted from the
    // burst below. On a pool of its own, deleted before any worker starts: on the workers'
    // pool its runs' `Scheduled` events, within the minute the workers' event feeds replay
    // at start, would have every worker start on a burst of runs no poll finds.
    let alone_pool = Fixture::create(
        ctx,
        "server-alone",
        kind,
        r.rep,
        PoolKind {
            worker_type: "process",
            template: &ctx.template,
        },
        json!({"command": "true"}),
    )?;
    let creation_cpu = create_alone(ctx, &alone_pool, r);
    alone_pool.remove(ctx);
    let creation_cpu = creation_cpu?;

    let mut pool: Vec<Worker<'_>> = Vec::new();
    for i in 0..workers {
        let name = format!("{}-{i}", fx.worker_name);
        pool.push(Worker::spawn_with_env(
            server,
            &ctx.programs,
            kind,
            &fx.pool,
            &name,
            &[("PREFECT_API_URL", api.as_str())],
        )?);
    }
    for wk in &mut pool {
        wk.wait_started(Duration::from_secs(120))?;
    }
    sleep(Duration::from_secs_f64(plan.idle_settle_s));
    r.detail("startup_tally", proxy.snapshot());

    // -- idle ---------------------------------------------------------------------------------
    let idle0 = proxy.snapshot();
    let idle_cpu0 = server_cpu(ctx);
    sleep(Duration::from_secs_f64(plan.server_idle_s));
    let idle = proxy.snapshot().since(&idle0);
    if let (Some(a), Some(b)) = (idle_cpu0, server_cpu(ctx)) {
        r.detail("idle_server_cpu_per_s", (b - a) / plan.server_idle_s);
    }
    r.set(
        &format!("idle_per_min_{w}"),
        Some(idle.requests() as f64 * 60.0 / plan.server_idle_s),
    );
    r.detail("idle_tally", &idle);
    r.detail("idle_s", plan.server_idle_s);

    // -- burst --------------------------------------------------------------------------------
    for wk in &mut pool {
        wk.ensure_alive()?;
    }
    let burst0 = proxy.snapshot();
    let cpu0 = server_cpu(ctx);
    let created_from = Utc::now();
    let ids = server.create_flow_runs(
        &fx.deployment_id,
        plan.server_runs,
        plan.client_threads,
        Duration::from_secs(300),
    )?;
    r.set(
        &format!("create_s_{w}"),
        Some(secs(created_from, Utc::now())),
    );
    let resources: Vec<String> = pool.iter().map(Worker::resource_id).collect();
    let resources: Vec<&str> = resources.iter().map(String::as_str).collect();
    let since = pool
        .iter()
        .map(|w| w.spawned_at)
        .min()
        .unwrap_or(created_from);
    let want = ids.len() as u64;
    let waited = wait_for(
        "every burst run's submitted-flow-run event",
        Duration::from_secs_f64(120.0 + plan.server_runs as f64 * 0.5),
        Duration::from_secs(1),
        || {
            for wk in &mut pool {
                wk.ensure_alive()?;
            }
            Ok(
                (server.count_events_of(&resources, &[EVENT_SUBMITTED], since)? >= want)
                    .then_some(()),
            )
        },
    );
    let submissions = runs_with(ctx, &resources, EVENT_SUBMITTED, since)?;
    // Then every run's end (a run never submitted has none: the wait above failed already).
    let executed = waited.and_then(|()| {
        wait_for(
            "every burst run's executed-flow-run event",
            Duration::from_secs(60),
            Duration::from_secs(1),
            || {
                Ok(
                    (server.count_events_of(&resources, &[EVENT_EXECUTED], since)? >= want)
                        .then_some(()),
                )
            },
        )
    });
    let ended = runs_with(ctx, &resources, EVENT_EXECUTED, since)?;
    let last = ids
        .iter()
        .filter_map(|id| ended.get(id)?.iter().max())
        .max()
        .copied();
    sleep_until(last.unwrap_or_else(Utc::now) + ChronoDuration::seconds(TAIL_S));
    if let Some(last) = last {
        r.detail("burst_window_s", secs(created_from, last) + TAIL_S as f64);
    }
    let burst = proxy.snapshot().since(&burst0);
    let cpu1 = server_cpu(ctx);
    let scheduled = server.count_flow_runs(&fx.deployment_id, &["SCHEDULED"])?;

    let n = ids.len() as f64;
    r.set(
        &format!("requests_per_run_{w}"),
        Some(burst.requests() as f64 / n),
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.set(&format!("server_cpu_per_run_{w}"), Some((b - a) / n));
        r.set(
            &format!("worker_cpu_per_run_{w}"),
            creation_cpu.map(|c| (b - a) / n - c),
        );
        r.detail("burst_server_cpu_s", b - a);
    }
    r.set(
        &format!("websockets_per_run_{w}"),
        Some(burst.websockets() as f64 / n),
    );
    let double = ids
        .iter()
        .filter(|id| submissions.get(*id).is_some_and(|s| s.len() > 1))
        .count();
    let never = ids
        .iter()
        .filter(|id| !submissions.contains_key(*id))
        .count();
    r.set(&format!("double_{w}"), Some(double as f64));
    r.set(&format!("scheduled_{w}"), Some(scheduled as f64));
    r.detail("never_submitted", never);
    r.detail("burst_tally", &burst);
    r.detail("runs", ids.len());

    let starts: HashMap<String, DateTime<Utc>> = server
        .read_flow_runs(&fx.deployment_id)?
        .iter()
        .filter_map(|run| {
            Some((
                run["id"].as_str()?.to_owned(),
                parse_time(&run["expected_start_time"])?,
            ))
        })
        .collect();
    let lat: Vec<f64> = ids
        .iter()
        .filter_map(|id| {
            let first = submissions.get(id)?.iter().min()?;
            Some(secs(*starts.get(id)?, *first))
        })
        .collect();
    r.set(&format!("pickup_p50_{w}"), percentile(&lat, 50.0));
    r.detail("burst_latencies_s", &lat);

    let per_worker: Vec<Value> = pool
        .iter_mut()
        .map(|wk| {
            let errors = wk.error_lines();
            let stop = wk.stop(Duration::from_secs(20));
            json!({
                "name": wk.name,
                "stop": stop,
                "error_lines": errors.len(),
                "error_sample": errors.iter().take(3).collect::<Vec<_>>(),
            })
        })
        .collect();
    r.detail("workers_detail", per_worker);
    drop(pool);
    drop(proxy);
    executed
}

/// Flow-run id → the `occurred` of each of its `event` events by these workers.
fn runs_with(
    ctx: &Ctx<'_>,
    resources: &[&str],
    event: &str,
    since: DateTime<Utc>,
) -> Result<HashMap<String, Vec<DateTime<Utc>>>> {
    let mut out: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    for ev in ctx.server.read_events_of(resources, &[event], since)? {
        let Some(t) = parse_time(&ev["occurred"]) else {
            continue;
        };
        let run = ev["related"].as_array().and_then(|rel| {
            rel.iter().find_map(|r| {
                r["prefect.resource.id"]
                    .as_str()?
                    .strip_prefix("prefect.flow-run.")
                    .map(str::to_owned)
            })
        });
        if let Some(run) = run {
            out.entry(run).or_default().push(t);
        }
    }
    Ok(out)
}

/// Markdown: requests per run in the burst and per minute when idle, by endpoint, Prefect's
/// worker and Cohort side by side (medians over the repetitions; an endpoint a repetition
/// did not call counts 0 there).
fn endpoint_table(report: &ScenarioReport, workers: usize) -> String {
    let reps = |kind: WorkerKind| -> Vec<&RepResult> {
        report
            .reps
            .iter()
            .filter(|r| r.worker == kind && r.details["workers"] == json!(workers))
            .filter(|r| r.details.get("burst_tally").is_some())
            .collect()
    };
    let py = reps(WorkerKind::Python);
    let co = reps(WorkerKind::Cohort);
    let mut keys = BTreeSet::new();
    for r in py.iter().chain(&co) {
        for tally in ["burst_tally", "idle_tally"] {
            if let Some(m) = r.details[tally]["by_endpoint"].as_object() {
                keys.extend(m.keys().cloned());
            }
        }
    }
    // Median over repetitions of count × scale, where scale turns a count into per run
    // (burst) or per minute (idle).
    let med = |rs: &[&RepResult], tally: &str, key: &str| -> Option<f64> {
        let v: Vec<f64> = rs
            .iter()
            .filter_map(|r| {
                let scale = match tally {
                    "burst_tally" => 1.0 / r.details["runs"].as_f64().filter(|n| *n > 0.0)?,
                    _ => 60.0 / r.details["idle_s"].as_f64().filter(|s| *s > 0.0)?,
                };
                let count = r.details[tally]["by_endpoint"][key].as_f64().unwrap_or(0.0);
                Some(count * scale)
            })
            .collect();
        median(&v)
    };
    let mut rows: Vec<(String, [Option<f64>; 4])> = keys
        .into_iter()
        .map(|k| {
            let vals = [
                med(&py, "burst_tally", &k),
                med(&co, "burst_tally", &k),
                med(&py, "idle_tally", &k),
                med(&co, "idle_tally", &k),
            ];
            (k, vals)
        })
        .collect();
    // Cohort's heaviest first, then Prefect's.
    rows.sort_by(|a, b| {
        let key = |v: &[Option<f64>; 4]| (v[1].unwrap_or(0.0), v[0].unwrap_or(0.0));
        key(&b.1)
            .partial_cmp(&key(&a.1))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Where the requests went, {workers} worker{} (burst: per run; idle: per minute; \
         `WS`: websocket connections opened):\n",
        if workers == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "| endpoint | Python, burst | Cohort, burst | Python, idle | Cohort, idle |\n\
         | --- | ---: | ---: | ---: | ---: |"
    );
    let fmt = |v: Option<f64>| match v {
        None => "—".to_owned(),
        Some(0.0) => "0".to_owned(),
        Some(x) => format!("{x:.2}"),
    };
    let mut totals = [0.0f64; 4];
    for (k, v) in &rows {
        if !k.starts_with("WS ") {
            for (t, x) in totals.iter_mut().zip(v) {
                *t += x.unwrap_or(0.0);
            }
        }
        let _ = writeln!(
            s,
            "| `{k}` | {} | {} | {} | {} |",
            fmt(v[0]),
            fmt(v[1]),
            fmt(v[2]),
            fmt(v[3])
        );
    }
    let _ = writeln!(
        s,
        "| **REST total** | **{:.2}** | **{:.2}** | **{:.2}** | **{:.2}** |",
        totals[0], totals[1], totals[2], totals[3]
    );
    let errors = error_summary(&py, &co);
    if !errors.is_empty() {
        let _ = writeln!(
            s,
            "\nError answers (all repetitions, burst and idle): {errors}"
        );
    }
    s
}

/// `Python: GET /x 404 ×3; Cohort: …`, summed over the repetitions.
fn error_summary(py: &[&RepResult], co: &[&RepResult]) -> String {
    let sum = |rs: &[&RepResult]| -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in rs {
            for tally in ["burst_tally", "idle_tally"] {
                if let Some(e) = r.details[tally]["errors"].as_object() {
                    for (k, v) in e {
                        *m.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                    }
                }
            }
        }
        m
    };
    let mut parts = Vec::new();
    for (label, rs) in [("Python", py), ("Cohort", co)] {
        let m = sum(rs);
        if !m.is_empty() {
            let list: Vec<String> = m.iter().map(|(k, v)| format!("`{k}` ×{v}")).collect();
            parts.push(format!("{label}: {}", list.join(", ")));
        }
    }
    parts.join("; ")
}
