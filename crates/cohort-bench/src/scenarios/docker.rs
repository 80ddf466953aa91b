//! Scenario 7: Docker work pools. Prefect's Docker worker (prefect-docker 0.7.4) and Cohort's
//! on identical pools (prefect-docker's base job template), the same server, the same local
//! image: a burst of runs whose containers (`sleep`, in the static busybox image the tests
//! build) all run at once.
//!
//! Submitted → running latency of a run = its `prefect.docker.container.running` event's
//! `occurred` − its `submitted-flow-run` event's (both workers emit both). The worker's CPU
//! per run is its process CPU from just before the burst to 2 s after its last
//! `executed-flow-run`, over the runs; the Engine's (dockerd + containerd) over the same
//! window shows what each client asks of the Engine. REST requests are counted by a proxy
//! between the worker and the server, as in scenario 6. Containers left behind are counted
//! once the worker has stopped; the fixture then removes them.
//!
//! `sleep` never reports a state (nothing runs Prefect's engine), so the runs stay Pending
//! or Running; the fixture deletes them afterwards.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{json, Value};

use super::{
    expected_starts, one_rep_on, secs, sleep_until, wait_for, Ctx, Fixture, PoolKind, MIB,
};
use crate::procfs::{self, sample_at, Sampler};
use crate::proxy::CountingProxy;
use crate::report::{MetricDef, RepResult, ScenarioReport};
use crate::stats::percentile;
use crate::worker::{run_occurred, Worker, WorkerKind, EVENT_EXECUTED};

const EVENT_RUNNING: &str = "prefect.docker.container.running";

const METRICS: [MetricDef; 12] = [
    MetricDef::new("idle_rss_mib", "worker RSS, idle", "MiB").ratio_at_most(0.25),
    MetricDef::new(
        "peak_rss_mib",
        "worker RSS, peak with all containers running",
        "MiB",
    )
    .ratio_at_most(0.25),
    MetricDef::new("cpu_per_run_s", "worker CPU per run", "s").ratio_at_most(0.25),
    MetricDef::new(
        "engine_cpu_per_run_s",
        "Engine CPU per run (dockerd + containerd)",
        "s",
    ),
    MetricDef::new(
        "requests_per_run",
        "REST requests to the server per run",
        "count",
    ),
    MetricDef::new(
        "pickup_p50_s",
        "pickup latency p50 (expected start → submitted)",
        "s",
    ),
    MetricDef::new(
        "submitted_to_running_p50_s",
        "submitted → container running, p50",
        "s",
    )
    .ratio_at_most(1.0),
    MetricDef::new(
        "submitted_to_running_p95_s",
        "submitted → container running, p95",
        "s",
    ),
    MetricDef::new(
        "all_running_s",
        "burst created → last container running",
        "s",
    ),
    MetricDef::new(
        "max_concurrent",
        "containers running at once, max seen",
        "count",
    ),
    MetricDef::new(
        "containers_left",
        "containers left behind after the runs",
        "count",
    ),
    MetricDef::new(
        "harmed_runs",
        "runs harmed (never running, Crashed/Failed, or no executed event)",
        "runs",
    ),
];

pub fn run(ctx: &Ctx<'_>) -> ScenarioReport {
    let plan = &ctx.plan;
    let mut report = ScenarioReport::new("docker", "7. Docker work pools", &METRICS);
    let image = match busybox_image(&ctx.repo) {
        Ok(image) => image,
        Err(e) => {
            report.notes.push(format!("not run: {e:#}"));
            return report;
        }
    };
    let template: Value = match serde_json::from_str(cohort_docker::BASE_JOB_TEMPLATE) {
        Ok(t) => t,
        Err(e) => {
            report
                .notes
                .push(format!("not run: the base job template: {e}"));
            return report;
        }
    };
    let command = format!("sleep {}", plan.docker_sleep_s);
    report.params = json!({
        "what": format!(
            "A docker pool with prefect-docker 0.7.4's base job template, a deployment with \
             job variables `image` (a static busybox built locally) and `command: {command}`, \
             {} runs created at once by {} client thread{}; each worker alone on a fresh pool \
             with the default settings. Prefect's worker is `prefect worker start --type \
             docker` from a venv with prefect-docker 0.7.4.",
            plan.docker_runs,
            plan.client_threads,
            if plan.client_threads == 1 { "" } else { "s" }
        ),
        "image": image,
        "command": command,
        "runs": plan.docker_runs,
    });
    let pool_kind = PoolKind {
        worker_type: "docker",
        template: &template,
    };
    for rep in 0..plan.docker_reps {
        for kind in WorkerKind::order(rep) {
            let r = one_rep_on(
                ctx,
                "docker",
                rep,
                kind,
                pool_kind,
                json!({"image": image, "command": command}),
                |fx, r| {
                    let result = body(ctx, fx, kind, r);
                    // Whatever happened, nothing of this repetition stays on the Engine.
                    r.detail("containers_removed", remove_containers(&fx.deployment_id));
                    result
                },
            );
            report.reps.push(r);
        }
    }
    report.summarize();
    report
}

fn body(ctx: &Ctx<'_>, fx: &Fixture, kind: WorkerKind, r: &mut RepResult) -> Result<()> {
    let plan = &ctx.plan;
    let server = ctx.server;
    let (proxy, api) = CountingProxy::in_front_of(server.api_url())?;
    let mut worker = Worker::spawn_typed(
        server,
        &ctx.programs,
        kind,
        "docker",
        &fx.pool,
        &fx.worker_name,
        &[("PREFECT_API_URL", api.as_str())],
    )?;
    worker.wait_started(Duration::from_secs(120))?;

    // -- idle -----------------------------------------------------------------------------
    r.set("idle_rss_mib", super::idle_rss_mib(worker.pid(), plan));

    // -- the burst --------------------------------------------------------------------------
    let sampler = Sampler::start(worker.pid(), Duration::from_millis(250));
    let before = procfs::usage(worker.pid());
    let engine0 = engine_cpu_s();
    let tally0 = proxy.snapshot();
    let created_from = Utc::now();
    let ids = server.create_flow_runs(
        &fx.deployment_id,
        plan.docker_runs,
        plan.client_threads,
        Duration::from_secs(180),
    )?;
    let rid = worker.resource_id();
    let want = ids.len() as u64;
    let mut max_concurrent = 0;
    let waited = wait_for(
        "every run's executed-flow-run event",
        Duration::from_secs(180 + plan.docker_sleep_s + 2 * plan.docker_runs as u64),
        Duration::from_secs(1),
        || {
            worker.ensure_alive()?;
            max_concurrent = max_concurrent.max(running_containers(&fx.deployment_id));
            Ok(
                (server.count_events(&rid, &[EVENT_EXECUTED], worker.spawned_at)? >= want)
                    .then_some(()),
            )
        },
    );
    let executed = run_times(&server.read_events(&rid, &[EVENT_EXECUTED], worker.spawned_at)?);
    let last = ids.iter().filter_map(|id| executed.get(id)).max().copied();
    if let Some(last) = last {
        sleep_until(last + ChronoDuration::milliseconds(2300));
    }
    let samples = sampler.finish();
    let engine1 = engine_cpu_s();
    let tally = proxy.snapshot().since(&tally0);
    let n = ids.len() as f64;
    r.set("max_concurrent", Some(max_concurrent as f64));
    r.set("requests_per_run", Some(tally.requests() as f64 / n));
    r.detail("tally", &tally);
    if let (Some(b), Some(a)) = (
        last.and_then(|t| sample_at(&samples, t + ChronoDuration::seconds(2))),
        before,
    ) {
        r.set("cpu_per_run_s", Some((b.worker_cpu_s - a.worker_cpu_s) / n));
    }
    if let (Some(a), Some(b)) = (engine0, engine1) {
        r.set("engine_cpu_per_run_s", Some((b - a) / n));
    }
    r.set(
        "peak_rss_mib",
        samples
            .iter()
            .map(|(_, u)| u.worker_rss_kib)
            .max()
            .map(|k| k as f64 / MIB),
    );

    let submitted: HashMap<String, DateTime<Utc>> = worker.submitted_runs()?.into_iter().collect();
    let running = run_times(&server.read_events_by_prefix(
        "prefect.docker.container.",
        &[EVENT_RUNNING],
        created_from,
    )?);
    let runs = expected_starts(ctx, &fx.deployment_id)?;
    let pickup: Vec<f64> = ids
        .iter()
        .filter_map(|id| Some(secs(runs.get(id)?.0, *submitted.get(id)?)))
        .collect();
    let to_running: Vec<f64> = ids
        .iter()
        .filter_map(|id| Some(secs(*submitted.get(id)?, *running.get(id)?)))
        .collect();
    r.set("pickup_p50_s", percentile(&pickup, 50.0));
    r.set("submitted_to_running_p50_s", percentile(&to_running, 50.0));
    r.set("submitted_to_running_p95_s", percentile(&to_running, 95.0));
    r.detail("submitted_to_running_s", &to_running);
    if let Some(last_running) = ids.iter().filter_map(|id| running.get(id)).max() {
        r.set("all_running_s", Some(secs(created_from, *last_running)));
    }
    let harmed = ids
        .iter()
        .filter(|id| {
            !running.contains_key(*id)
                || !executed.contains_key(*id)
                || runs
                    .get(*id)
                    .is_none_or(|(_, s)| matches!(s.as_str(), "CRASHED" | "FAILED"))
        })
        .count();
    r.set("harmed_runs", Some(harmed as f64));

    let stop = worker.stop(Duration::from_secs(30));
    r.detail("worker_stop", stop);
    // What the worker leaves on the Engine once its runs are over and it is gone.
    sleep(Duration::from_secs(3));
    r.set(
        "containers_left",
        Some(containers(&fx.deployment_id, false).len() as f64),
    );
    let worker_errors = worker.error_lines();
    r.detail("worker_error_lines", worker_errors.len());
    r.detail(
        "worker_error_sample",
        worker_errors.iter().take(5).collect::<Vec<_>>(),
    );
    waited.map(|_| ())
}

/// The busybox image `scripts/docker-test-images.sh` builds (or already has).
fn busybox_image(repo: &Path) -> Result<String> {
    let out = Command::new("bash")
        .arg(repo.join("scripts/docker-test-images.sh"))
        .arg("busybox")
        .output()
        .context("run scripts/docker-test-images.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/docker-test-images.sh failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("busybox "))
        .map(|t| t.trim().to_owned())
        .context("scripts/docker-test-images.sh printed no busybox image")
}

fn docker(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The containers of a deployment's runs (Prefect's label), running ones only or all.
fn containers(deployment_id: &str, running: bool) -> Vec<String> {
    let label = format!("label=io.prefect.deployment-id={deployment_id}");
    let mut args = vec!["ps", "-q", "--filter", label.as_str()];
    if running {
        args.extend(["--filter", "status=running"]);
    } else {
        args.push("-a");
    }
    docker(&args)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn running_containers(deployment_id: &str) -> usize {
    containers(deployment_id, true).len()
}

fn remove_containers(deployment_id: &str) -> usize {
    let ids = containers(deployment_id, false);
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        docker(&args);
    }
    ids.len()
}

/// CPU seconds so far of the Engine's daemons (dockerd and containerd).
fn engine_cpu_s() -> Option<f64> {
    let ticks: u64 = procfs::all()
        .iter()
        .filter(|p| {
            let cmd = procfs::cmdline(p.pid);
            let program = cmd.split_whitespace().next().unwrap_or_default();
            let name = program.rsplit('/').next().unwrap_or_default();
            name == "dockerd" || name == "containerd"
        })
        .map(|p| p.cpu_ticks + p.child_cpu_ticks)
        .sum();
    (ticks > 0).then(|| ticks as f64 / procfs::clock_ticks())
}

/// Flow-run id → `occurred`, from events that relate a `prefect.flow-run.<id>`.
fn run_times(events: &[Value]) -> HashMap<String, DateTime<Utc>> {
    events.iter().filter_map(run_occurred).collect()
}
