//! What a benchmark run produced, and how it is written: `bench-results/<date>.json`
//! (everything, per repetition) and the generated part of `BENCHMARKS.md` (medians,
//! ratios, targets).
//!
//! `BENCHMARKS.md` keeps whatever follows the [`END_MARKER`] line: the hand-written
//! analysis of missed targets survives a new run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::machine::{Machine, RunInfo};
use crate::stats::median;
use crate::worker::WorkerKind;

pub const END_MARKER: &str = "<!-- end of generated part: hand-written notes below are kept -->";

/// What a metric is compared with.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Reported, not judged.
    None,
    /// Cohort / Python at most `max`.
    RatioAtMost { max: f64 },
    /// Cohort's median below `max` (in the metric's unit).
    CohortBelow { max: f64 },
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct MetricDef {
    pub key: &'static str,
    pub label: &'static str,
    /// `s`, `MiB`, `runs`, `%`, `count`.
    pub unit: &'static str,
    pub target: Target,
}

impl MetricDef {
    pub const fn new(key: &'static str, label: &'static str, unit: &'static str) -> MetricDef {
        MetricDef {
            key,
            label,
            unit,
            target: Target::None,
        }
    }

    pub const fn ratio_at_most(mut self, max: f64) -> MetricDef {
        self.target = Target::RatioAtMost { max };
        self
    }

    pub const fn cohort_below(mut self, max: f64) -> MetricDef {
        self.target = Target::CohortBelow { max };
        self
    }
}

/// One worker, one repetition of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RepResult {
    pub rep: usize,
    pub worker: WorkerKind,
    /// `None` when the repetition completed; otherwise what went wrong (the worker fell
    /// over, a deadline passed). Values measured before that are kept.
    pub error: Option<String>,
    pub values: BTreeMap<String, f64>,
    /// Raw material: per-run latencies, samples, the worker's exit, etc.
    pub details: Value,
}

impl RepResult {
    pub fn new(rep: usize, worker: WorkerKind) -> RepResult {
        RepResult {
            rep,
            worker,
            error: None,
            values: BTreeMap::new(),
            details: Value::Object(Default::default()),
        }
    }

    pub fn set(&mut self, key: &str, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            self.values.insert(key.to_owned(), v);
        }
    }

    pub fn detail(&mut self, key: &str, value: impl Serialize) {
        if let Value::Object(m) = &mut self.details {
            m.insert(
                key.to_owned(),
                serde_json::to_value(value).unwrap_or(Value::Null),
            );
        }
    }
}

/// A metric's medians over the repetitions, and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub key: String,
    pub python: Option<f64>,
    pub cohort: Option<f64>,
    /// Cohort / Python.
    pub ratio: Option<f64>,
    pub python_reps: usize,
    pub cohort_reps: usize,
    pub target: Target,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub id: &'static str,
    pub title: &'static str,
    /// What was run (counts, commands, settings).
    pub params: Value,
    pub metrics: Vec<MetricDef>,
    pub reps: Vec<RepResult>,
    pub summary: Vec<Summary>,
    /// Caveats worth a line in `BENCHMARKS.md`.
    pub notes: Vec<String>,
    /// Further Markdown blocks under the metrics table (e.g. a breakdown); the data behind
    /// them is in the repetitions' details.
    #[serde(skip)]
    pub tables: Vec<String>,
}

impl ScenarioReport {
    pub fn new(id: &'static str, title: &'static str, metrics: &[MetricDef]) -> ScenarioReport {
        ScenarioReport {
            id,
            title,
            params: Value::Object(Default::default()),
            metrics: metrics.to_vec(),
            reps: Vec::new(),
            summary: Vec::new(),
            notes: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Fill [`Self::summary`] from the repetitions.
    pub fn summarize(&mut self) {
        self.summary = self
            .metrics
            .iter()
            .map(|m| {
                let of = |kind: WorkerKind| -> Vec<f64> {
                    self.reps
                        .iter()
                        .filter(|r| r.worker == kind)
                        .filter_map(|r| r.values.get(m.key).copied())
                        .collect()
                };
                let (py, co) = (of(WorkerKind::Python), of(WorkerKind::Cohort));
                let (python, cohort) = (median(&py), median(&co));
                let ratio = match (python, cohort) {
                    (Some(p), Some(c)) if p > 0.0 => Some(c / p),
                    _ => None,
                };
                let met = match m.target {
                    Target::None => None,
                    Target::RatioAtMost { max } => ratio.map(|r| r <= max),
                    Target::CohortBelow { max } => cohort.map(|c| c < max),
                };
                Summary {
                    key: m.key.to_owned(),
                    python,
                    cohort,
                    ratio,
                    python_reps: py.len(),
                    cohort_reps: co.len(),
                    target: m.target,
                    met,
                }
            })
            .collect();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub run: RunInfo,
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }

    /// Write `BENCHMARKS.md`, keeping what follows [`END_MARKER`] in the existing file.
    pub fn write_markdown(&self, path: &Path, json_name: &str) -> Result<()> {
        let kept = fs::read_to_string(path)
            .ok()
            .and_then(|old| old.split_once(END_MARKER).map(|(_, rest)| rest.to_owned()))
            .unwrap_or_else(|| "\n".to_owned());
        let mut out = self.markdown(json_name);
        out.push_str(END_MARKER);
        out.push_str(&kept);
        fs::write(path, out)?;
        Ok(())
    }

    pub fn markdown(&self, json_name: &str) -> String {
        let m = &self.machine;
        let r = &self.run;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Benchmarks: Cohort vs Prefect's Python process worker\n"
        );
        let _ = writeln!(
            s,
            "Generated by `bash scripts/bench.sh{}` (crate `cohort-bench`) on {}; raw data: \
             [`bench-results/{json_name}`](bench-results/{json_name}).\n",
            r.flags, m.date
        );
        let _ = writeln!(
            s,
            "**Mode: {}** ({} repetition{} per scenario unless its section says otherwise, \
             Python and Cohort alternating, each on fresh work pools) against one Prefect {} \
             server on **{}**, in {:.1} minutes. \
             Values are medians over the repetitions; p50/p95 are taken within a repetition, \
             then the median over repetitions is shown. Ratio = Cohort / Python.\n",
            r.mode,
            r.reps,
            if r.reps == 1 { "" } else { "s" },
            r.prefect_version,
            r.database,
            r.duration_s / 60.0
        );
        let _ = writeln!(s, "## Machine\n");
        let _ = writeln!(s, "| | |\n| --- | --- |");
        let _ = writeln!(s, "| CPUs (`nproc`) | {} |", m.nproc);
        let _ = writeln!(s, "| CPU model | {} |", m.cpu_model);
        let _ = writeln!(s, "| memory | {} |", m.memory);
        let _ = writeln!(s, "| kernel | {} |", m.kernel);
        let _ = writeln!(s, "| OS | {} |", m.os);
        let _ = writeln!(s, "| date | {} |", m.date);
        let _ = writeln!(s, "| open files limit | {} |", m.open_files_limit);
        let _ = writeln!(s, "| Cohort | `{}` ({}) |", r.cohort_commit, r.rustc);
        let _ = writeln!(s, "| Prefect | {} on {} |", r.prefect_version, r.python);
        let _ = writeln!(s, "| worker settings | {} |", r.worker_settings);
        let _ = writeln!(s);

        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(
            s,
            "| scenario | metric | Python | Cohort | ratio | target | met? |\n\
             | --- | --- | ---: | ---: | ---: | --- | --- |"
        );
        for sc in &self.scenarios {
            for (def, sum) in sc.metrics.iter().zip(&sc.summary) {
                if matches!(def.target, Target::None) {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    sc.title,
                    def.label,
                    fmt_value(sum.python, def.unit),
                    fmt_value(sum.cohort, def.unit),
                    fmt_ratio(sum.ratio),
                    fmt_target(def),
                    fmt_met(sum.met)
                );
            }
        }
        let _ = writeln!(s);

        for sc in &self.scenarios {
            let _ = writeln!(s, "## {}\n", sc.title);
            if let Some(what) = sc.params.get("what").and_then(Value::as_str) {
                let reps = sc.reps.iter().map(|r| r.rep).max().map_or(0, |m| m + 1);
                let _ = writeln!(
                    s,
                    "{what} {reps} repetition{} per worker.\n",
                    if reps == 1 { "" } else { "s" }
                );
            }
            let _ = writeln!(
                s,
                "| metric | Python | Cohort | ratio | target | met? |\n\
                 | --- | ---: | ---: | ---: | --- | --- |"
            );
            for (def, sum) in sc.metrics.iter().zip(&sc.summary) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    def.label,
                    fmt_value(sum.python, def.unit),
                    fmt_value(sum.cohort, def.unit),
                    fmt_ratio(sum.ratio),
                    fmt_target(def),
                    fmt_met(sum.met)
                );
            }
            let _ = writeln!(s);
            for t in &sc.tables {
                let _ = writeln!(s, "{}", t.trim_end());
                let _ = writeln!(s);
            }
            let failed: Vec<&RepResult> = sc.reps.iter().filter(|r| r.error.is_some()).collect();
            for f in failed {
                let first = f
                    .error
                    .as_deref()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "- repetition {}, {} worker: **{}**",
                    f.rep + 1,
                    f.worker.label(),
                    first.replace('|', "\\|")
                );
            }
            for n in &sc.notes {
                let _ = writeln!(s, "- {n}");
            }
            let _ = writeln!(s);
        }
        s
    }
}

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "—".to_owned();
    };
    match unit {
        "runs" | "count" => format!("{v:.0}"),
        "req" => format!("{v:.2}"),
        "%" => format!("{v:.1} %"),
        "MiB" if v >= 100.0 => format!("{v:.0} MiB"),
        "MiB" => format!("{v:.1} MiB"),
        "KiB" => format!("{v:.0} KiB"),
        "s" if v >= 100.0 => format!("{v:.0} s"),
        "s" if v >= 1.0 => format!("{v:.2} s"),
        "s" if v >= 0.001 => format!("{:.1} ms", v * 1000.0),
        "s" => format!("{:.0} µs", v * 1e6),
        other => format!("{v:.3} {other}"),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        None => "—".to_owned(),
        Some(r) if r >= 10.0 => format!("{r:.0}"),
        Some(r) if r >= 0.1 => format!("{r:.2}"),
        Some(r) => format!("{r:.3}"),
    }
}

fn fmt_target(def: &MetricDef) -> String {
    match def.target {
        Target::None => String::new(),
        Target::RatioAtMost { max } => format!("ratio ≤ {max}"),
        Target::CohortBelow { max } => format!("Cohort < {}", fmt_value(Some(max), def.unit)),
    }
}

fn fmt_met(m: Option<bool>) -> &'static str {
    match m {
        None => "",
        Some(true) => "yes",
        Some(false) => "**no**",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_medians_and_verdicts() {
        let defs = [
            MetricDef::new("rss", "RSS", "MiB").ratio_at_most(0.1),
            MetricDef::new("lat", "latency", "s").cohort_below(0.2),
        ];
        let mut sc = ScenarioReport::new("x", "X", &defs);
        for (rep, kind, rss, lat) in [
            (0, WorkerKind::Python, 100.0, 5.0),
            (0, WorkerKind::Cohort, 5.0, 0.1),
            (1, WorkerKind::Python, 120.0, 6.0),
            (1, WorkerKind::Cohort, 7.0, 0.5),
        ] {
            let mut r = RepResult::new(rep, kind);
            r.set("rss", Some(rss));
            r.set("lat", Some(lat));
            sc.reps.push(r);
        }
        sc.summarize();
        assert_eq!(sc.summary[0].python, Some(110.0));
        assert_eq!(sc.summary[0].cohort, Some(6.0));
        assert_eq!(sc.summary[0].met, Some(true));
        assert!((sc.summary[1].cohort.unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(sc.summary[1].met, Some(false));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_value(Some(0.0123), "s"), "12.3 ms");
        assert_eq!(fmt_value(Some(3.456), "s"), "3.46 s");
        assert_eq!(fmt_value(Some(12.34), "MiB"), "12.3 MiB");
        assert_eq!(fmt_value(None, "s"), "—");
        assert_eq!(fmt_ratio(Some(0.0123)), "0.012");
    }
}
