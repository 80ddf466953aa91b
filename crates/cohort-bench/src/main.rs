//! `cohort-bench`: runs Prefect's Python workers and Cohort's on identical workloads
//! against one local Prefect server, and writes `BENCHMARKS.md` and
//! `bench-results/<date>.json`. Started by `scripts/bench.sh`, which installs what it needs.
//!
//! Performance is measured here and never asserted in the test suite.

// A benchmark measures wall-clock time on real processes: std time and sleeps are the
// point here (clippy.toml bans them for the worker's own code, for paused-time tests).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

mod machine;
mod procfs;
mod proxy;
mod report;
mod scenarios;
mod server;
mod stats;
mod worker;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Parser;

use crate::machine::{command_line, Machine, RunInfo};
use crate::report::Report;
use crate::scenarios::{Ctx, Plan};
use crate::server::{Database, PrefectServer};
use crate::worker::Programs;

const ALL_SCENARIOS: [&str; 7] = [
    "idle",
    "burst",
    "flows",
    "scale",
    "server",
    "docker",
    "kubernetes",
];

/// Benchmark Prefect's Python workers against Cohort's.
#[derive(Debug, Parser)]
#[command(name = "cohort-bench")]
struct Args {
    /// Small counts, one repetition (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Repetitions (default: 1 quick, 3 full).
    #[arg(long)]
    reps: Option<usize>,
    /// Repetitions of scenario 5 (default 1: 1,000 processes per worker are slow to start
    /// and stop).
    #[arg(long)]
    scale_reps: Option<usize>,
    /// Flow runs of scenario 5 (default: 50 quick, 1,000 full), e.g. 300 for a quicker look
    /// at the per-run cost.
    #[arg(long)]
    scale_runs: Option<usize>,
    /// Runs of each burst of scenario 6 (default: 30 quick, 100 full).
    #[arg(long)]
    server_runs: Option<usize>,
    /// Scenarios to run, comma-separated: idle (1 and 2), burst, flows, scale, server,
    /// docker, kubernetes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,burst,flows,scale,server,docker,kubernetes"
    )]
    scenarios: Vec<String>,
    /// Runs of scenario 7's burst (default: 10 quick, 50 full).
    #[arg(long)]
    docker_runs: Option<usize>,
    /// Jobs of scenario 8's burst (default: 50 quick, 200 full).
    #[arg(long)]
    kubernetes_runs: Option<usize>,
    /// Run the server on PostgreSQL at this `postgresql+asyncpg://` URL (default: SQLite).
    #[arg(long)]
    database_url: Option<String>,
    /// The Prefect 3.8.8 virtualenv.
    #[arg(long, env = "COHORT_PREFECT_VENV")]
    venv: PathBuf,
    /// A Prefect 3.8.8 virtualenv with prefect-docker 0.7.4, for Prefect's Docker worker
    /// (scenario 7).
    #[arg(long, env = "COHORT_PREFECT_DOCKER_VENV")]
    docker_venv: Option<PathBuf>,
    /// A Prefect 3.8.8 virtualenv with prefect-kubernetes 0.8.0, for Prefect's Kubernetes
    /// worker (scenario 8).
    #[arg(long, env = "COHORT_PREFECT_KUBERNETES_VENV")]
    kubernetes_venv: Option<PathBuf>,
    /// Copy each worker's stdout and stderr into this directory when it is stopped (its home,
    /// where they are written, is removed): `<start time>-<worker name>.{stdout,stderr}.log`.
    /// Run with `COHORT_LOG=info,cohort_worker=debug` in the environment to see Cohort's
    /// decisions.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// The `cohort` binary (a release build).
    #[arg(long)]
    cohort: PathBuf,
    /// The repository (for `examples/flows`, `BENCHMARKS.md`, `bench-results/`).
    #[arg(long)]
    repo: PathBuf,
    /// The flags `scripts/bench.sh` was given (recorded in the report).
    #[arg(long, default_value = "")]
    flags: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("cohort-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let date = chrono::Utc::now();
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(r) = args.reps {
        plan.reps = r.max(1);
        plan.flow_reps = r.max(1);
    }
    if let Some(r) = args.scale_reps {
        plan.scale_reps = r;
    }
    if let Some(n) = args.scale_runs {
        plan.scale_runs = n.max(1);
        // On SQLite, 1,000 runs take ~300 s to all be running.
        plan.scale_deadline_s = plan.scale_deadline_s.max(0.35 * n as f64);
    }
    if let Some(n) = args.server_runs {
        plan.server_runs = n.max(1);
    }
    if let Some(n) = args.docker_runs {
        plan.docker_runs = n.max(1);
    }
    if let Some(n) = args.kubernetes_runs {
        plan.kubernetes_runs = n.max(1);
    }
    if let Some(r) = args.reps {
        plan.docker_reps = r.max(1);
        plan.kubernetes_reps = r.max(1);
    }
    for s in &args.scenarios {
        if !ALL_SCENARIOS.contains(&s.as_str()) {
            bail!(
                "unknown scenario {s:?}: expected idle, burst, flows, scale, server, docker or \
                 kubernetes"
            );
        }
    }
    if args.scenarios.iter().any(|s| s == "docker") && args.docker_venv.is_none() {
        bail!("the docker scenario needs --docker-venv (scripts/prefect-venv.sh docker)");
    }
    if args.scenarios.iter().any(|s| s == "kubernetes") && args.kubernetes_venv.is_none() {
        bail!(
            "the kubernetes scenario needs --kubernetes-venv (scripts/prefect-venv.sh kubernetes)"
        );
    }
    let repo = args.repo.canonicalize().context("--repo")?;
    let flows_dir = repo.join("examples/flows");
    if !flows_dir.join("flows.py").is_file() {
        bail!("{} has no flows.py", flows_dir.display());
    }
    if !args.cohort.is_file() {
        bail!("no cohort binary at {}", args.cohort.display());
    }
    let machine = Machine::read(&date.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    eprintln!("[bench] {} mode, {:?}", plan.mode, plan);

    let database = match &args.database_url {
        Some(url) => Database::Postgres(url.clone()),
        None => Database::Sqlite,
    };
    if matches!(database, Database::Postgres(_)) {
        plan.client_threads = 4;
    }
    let server = PrefectServer::start(&args.venv, database)?;
    let template = server::process_base_job_template(&args.venv, server.scratch_dir())?;
    let ctx = Ctx {
        server: &server,
        programs: Programs {
            venv: args.venv.clone(),
            cohort: args.cohort.clone(),
            docker_venv: args.docker_venv.clone(),
            kubernetes_venv: args.kubernetes_venv.clone(),
            keep_logs: args.keep_logs.clone(),
        },
        repo: repo.clone(),
        flows_dir,
        template,
        plan: plan.clone(),
    };

    let mut scenarios = Vec::new();
    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    if wants("idle") {
        let (idle, startup) = scenarios::startup::run(&ctx);
        scenarios.push(idle);
        scenarios.push(startup);
    }
    if wants("burst") {
        scenarios.push(scenarios::burst::run(&ctx));
    }
    if wants("flows") {
        scenarios.push(scenarios::flows::run(&ctx));
    }
    if wants("scale") && plan.scale_reps > 0 {
        scenarios.push(scenarios::scale::run(&ctx));
    }
    if wants("server") {
        scenarios.push(scenarios::server_load::run(&ctx));
    }
    if wants("docker") {
        scenarios.push(scenarios::docker::run(&ctx));
    }
    if wants("kubernetes") {
        scenarios.push(scenarios::kubernetes::run(&ctx));
    }

    let run_info = RunInfo {
        mode: plan.mode.to_owned(),
        reps: plan.reps,
        flags: args.flags.clone(),
        database: match &server.database {
            Database::Sqlite => "SQLite".to_owned(),
            Database::Postgres(_) => {
                // `psql (PostgreSQL) 15.18 (Debian …)` → `PostgreSQL 15.18`
                let v = command_line("psql", &["--version"], None);
                let version = v.split_whitespace().nth(2).unwrap_or("?");
                format!("PostgreSQL {version}")
            }
        },
        prefect_version: server.version.clone(),
        python: command_line(
            &args.venv.join("bin/python").to_string_lossy(),
            &["--version"],
            None,
        ),
        cohort_commit: command_line("git", &["describe", "--always", "--dirty"], Some(&repo)),
        rustc: command_line("rustc", &["--version"], None),
        worker_settings: "defaults for both (`PREFECT_WORKER_QUERY_SECONDS` 10, \
                          `PREFECT_WORKER_PREFETCH_SECONDS` 10, no `--limit`); \
                          `worker start --pool P --type process|docker|kubernetes --name N`"
            .to_owned(),
        duration_s: started.elapsed().as_secs_f64(),
    };
    drop(ctx);
    drop(server);
    let report = Report {
        machine,
        run: run_info,
        scenarios,
    };
    let stamp = date.format("%Y-%m-%dT%H%M%SZ");
    let json_name = format!("{stamp}-{}-{}.json", plan.mode, report_db_label(&args));
    let json_path = repo.join("bench-results").join(&json_name);
    report.write_json(&json_path)?;
    // Only a run of every scenario replaces the generated part of BENCHMARKS.md: a partial
    // run would drop the sections it did not run. Its tables are printed below instead.
    let every = ALL_SCENARIOS
        .iter()
        .all(|s| args.scenarios.iter().any(|x| x == s));
    if every {
        let md_path = repo.join("BENCHMARKS.md");
        report.write_markdown(&md_path, &json_name)?;
        eprintln!(
            "[bench] wrote {} and {}",
            md_path.display(),
            json_path.display()
        );
    } else {
        eprintln!(
            "[bench] wrote {}; BENCHMARKS.md is left alone (not every scenario ran)",
            json_path.display()
        );
    }
    println!("{}", report.markdown(&json_name));
    Ok(())
}

fn report_db_label(args: &Args) -> &'static str {
    if args.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    }
}
