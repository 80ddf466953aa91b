//! Scenarios 1 and 2, from one worker launch: start-up (exec → the `prefect.worker.started`
//! event's `occurred`, and the CPU seconds spent by then) and idle RSS afterwards.
//!
//! A sampler reads the worker's tree from `/proc` every 50 ms; the CPU "to get there" is
//! the first sample at or after the event's `occurred` (the event is read back later, the
//! server persists events asynchronously, so the time the driver sees it is not used).

use std::time::Duration;

use chrono::Duration as ChronoDuration;
use serde_json::json;

use super::{one_rep, secs, sleep_until, Ctx, MIB};
use crate::procfs::{self, sample_at, Sampler};
use crate::report::{MetricDef, ScenarioReport};
use crate::stats::median;
use crate::worker::{Worker, WorkerKind};

const IDLE: [MetricDef; 8] = [
    MetricDef::new("worker_rss_mib", "idle RSS, worker process", "MiB").ratio_at_most(0.1),
    MetricDef::new("tree_rss_mib", "idle RSS, worker's process tree", "MiB").ratio_at_most(0.1),
    MetricDef::new("rss_anon_mib", "… of which anonymous (heap, stacks)", "MiB"),
    MetricDef::new(
        "rss_file_mib",
        "… of which file-backed (program, libraries)",
        "MiB",
    ),
    MetricDef::new("threads", "worker threads", "count"),
    MetricDef::new("tree_pss_mib", "idle PSS, worker's process tree", "MiB"),
    MetricDef::new("tree_procs", "processes in the tree", "count"),
    MetricDef::new("idle_cpu_pct", "CPU while idle (polling, heartbeats)", "%"),
];

const STARTUP: [MetricDef; 3] = [
    MetricDef::new("startup_s", "exec → `prefect.worker.started` occurred", "s")
        .ratio_at_most(0.05),
    MetricDef::new("startup_cpu_s", "worker CPU by then", "s"),
    MetricDef::new("startup_tree_cpu_s", "process-tree CPU by then", "s"),
];

/// Returns (idle RSS, start-up).
pub fn run(ctx: &Ctx<'_>) -> (ScenarioReport, ScenarioReport) {
    let plan = &ctx.plan;
    let mut idle = ScenarioReport::new("idle_rss", "1. Idle RSS", &IDLE);
    let mut startup = ScenarioReport::new("startup", "2. Start-up", &STARTUP);
    idle.params = json!({
        "what": format!(
            "`worker start` on a fresh pool with nothing to run; RSS (`VmRSS`) is the median \
             of 50 ms samples taken from {:.0} s to {:.0} s after the worker's \
             `prefect.worker.started` event. The tree is the worker and all its descendants \
             (RSS summed; PSS splits shared pages). Idle CPU is measured over the same \
             period, from 1 s after the started event.",
            plan.idle_settle_s,
            plan.idle_settle_s + plan.idle_window_s
        ),
        "settle_s": plan.idle_settle_s,
        "window_s": plan.idle_window_s,
    });
    startup.params = json!({
        "what": "Wall time from just before `exec` of `worker start` to the `occurred` time \
                 of its `prefect.worker.started` event (read back with POST \
                 /api/events/filter), and the CPU seconds the worker had used by then \
                 (from /proc, sampled every 50 ms). The pool exists already.",
    });
    for rep in 0..plan.reps {
        for kind in WorkerKind::order(rep) {
            let result = one_rep(ctx, "idle", rep, kind, json!({}), |fx, r| {
                let mut worker =
                    Worker::spawn(ctx.server, &ctx.programs, kind, &fx.pool, &fx.worker_name)?;
                let sampler = Sampler::start(worker.pid(), Duration::from_millis(50));
                let started = worker.wait_started(Duration::from_secs(120))?;
                let idle_from =
                    started + ChronoDuration::milliseconds((plan.idle_settle_s * 1e3) as i64);
                let idle_to =
                    idle_from + ChronoDuration::milliseconds((plan.idle_window_s * 1e3) as i64);
                sleep_until(idle_to);
                worker.ensure_alive()?;
                let pss = procfs::tree_pss_kib(worker.pid());
                let field = |k: &str| procfs::status_field(worker.pid(), k).map(|v| v as f64);
                r.set("rss_anon_mib", field("RssAnon").map(|k| k / MIB));
                r.set("rss_file_mib", field("RssFile").map(|k| k / MIB));
                r.set("threads", field("Threads"));
                let mut by_mapping = procfs::rss_by_mapping(worker.pid());
                by_mapping.truncate(8);
                r.detail("rss_by_mapping_kib", by_mapping);
                let samples = sampler.finish();
                worker.stop(Duration::from_secs(20));

                r.set("startup_s", Some(secs(worker.spawned_at, started)));
                let at_start = sample_at(&samples, started);
                r.set("startup_cpu_s", at_start.map(|u| u.worker_cpu_s));
                r.set("startup_tree_cpu_s", at_start.map(|u| u.tree_cpu_s));
                let window: Vec<_> = samples
                    .iter()
                    .filter(|(t, _)| *t >= idle_from && *t <= idle_to)
                    .map(|(_, u)| *u)
                    .collect();
                let med = |f: fn(&procfs::Usage) -> f64| {
                    median(&window.iter().map(f).collect::<Vec<_>>())
                };
                r.set("worker_rss_mib", med(|u| u.worker_rss_kib as f64 / MIB));
                r.set("tree_rss_mib", med(|u| u.tree_rss_kib as f64 / MIB));
                r.set("tree_procs", med(|u| u.tree_procs as f64));
                r.set("tree_pss_mib", Some(pss as f64 / MIB));
                let cpu_from = sample_at(&samples, started + ChronoDuration::seconds(1));
                let cpu_to = samples.last().map(|(t, u)| (*t, *u));
                if let (Some(a), Some((t_end, b))) = (cpu_from, cpu_to) {
                    let span = secs(started + ChronoDuration::seconds(1), t_end);
                    if span > 0.5 {
                        r.set(
                            "idle_cpu_pct",
                            Some(100.0 * (b.worker_cpu_s - a.worker_cpu_s) / span),
                        );
                    }
                }
                r.detail("samples", samples.len());
                Ok(())
            });
            // One launch feeds both scenarios.
            let mut for_idle = result.clone();
            for_idle
                .values
                .retain(|k, _| IDLE.iter().any(|m| m.key == k));
            let mut for_startup = result;
            for_startup
                .values
                .retain(|k, _| STARTUP.iter().any(|m| m.key == k));
            idle.reps.push(for_idle);
            startup.reps.push(for_startup);
        }
    }
    idle.summarize();
    startup.summarize();
    for kind in [WorkerKind::Python, WorkerKind::Cohort] {
        let profile = idle
            .reps
            .iter()
            .find(|r| r.worker == kind)
            .and_then(|r| r.details.get("rss_by_mapping_kib"))
            .and_then(|v| serde_json::from_value::<Vec<(String, u64)>>(v.clone()).ok());
        if let Some(profile) = profile {
            let parts: Vec<String> = profile
                .iter()
                .take(6)
                .map(|(name, kib)| format!("`{name}` {:.1}", *kib as f64 / MIB))
                .collect();
            idle.notes.push(format!(
                "Where the {} worker's idle RSS goes (MiB, first repetition, \
                 `/proc/<pid>/smaps`): {}.",
                kind.label(),
                parts.join(", ")
            ));
        }
    }
    (idle, startup)
}
