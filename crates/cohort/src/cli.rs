//! Command-line shape, mirroring `prefect worker start` (`prefect/cli/worker.py: start`).

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cohort", version, about = "A Prefect worker, in Rust.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with workers.
    Worker {
        #[command(subcommand)]
        command: WorkerCommand,
    },
    /// Work with flows.
    Flow {
        #[command(subcommand)]
        command: FlowCommand,
    },
    /// Serve several deployments in one runner, like Prefect's `serve(*deployments)`.
    Serve(ServeManyArgs),
    /// The per-run supervisor a worker starts each flow process under (internal).
    #[command(name = "__shim", hide = true)]
    Shim(ShimArgs),
}

#[derive(Debug, Args)]
pub struct ShimArgs {
    /// Where to record the flow process's pid and exit code.
    #[arg(long)]
    pub status: PathBuf,
    /// The flow process's program.
    pub program: String,
    /// Its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Serve a flow via an entrypoint, like `prefect flow serve`.
    Serve(FlowServeArgs),
}

#[derive(Debug, Args)]
pub struct FlowServeArgs {
    /// `path/to/file.py:flow_function`.
    pub entrypoint: String,
    /// The deployment's name (also the runner's name).
    #[arg(short = 'n', long)]
    pub name: String,
    #[arg(short = 'd', long)]
    pub description: Option<String>,
    #[arg(short = 'v', long)]
    pub version: Option<String>,
    /// A tag for the deployment (repeatable).
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Default parameters of the deployment, as a JSON object.
    #[arg(long)]
    pub parameters: Option<String>,
    #[command(flatten)]
    pub runner: RunnerArgs,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// A cron schedule.
    #[arg(long, conflicts_with_all = ["interval", "rrule"])]
    pub cron: Option<String>,
    /// An interval schedule, in seconds.
    #[arg(long, conflicts_with = "rrule")]
    pub interval: Option<u64>,
    /// The start date of an interval schedule.
    #[arg(long)]
    pub anchor_date: Option<String>,
    /// An RRule schedule.
    #[arg(long)]
    pub rrule: Option<String>,
    /// The schedule's timezone, e.g. `America/New_York`.
    #[arg(long)]
    pub timezone: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunnerArgs {
    /// The most runs this runner executes at once (unlimited by default, as `serve`).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Pause the schedules when the runner stops (the default).
    #[arg(long, overrides_with = "no_pause_on_shutdown")]
    pub pause_on_shutdown: bool,
    /// Leave the schedules running when the runner stops.
    #[arg(long)]
    pub no_pause_on_shutdown: bool,
    /// Serve the runner webserver (also enabled by PREFECT_RUNNER_SERVER_ENABLE).
    #[arg(long)]
    pub webserver: bool,
    /// Seconds between SIGTERM and SIGKILL when a flow-run process must be stopped.
    #[arg(long, default_value_t = 30.0)]
    pub termination_grace: f64,
}

#[derive(Debug, Args)]
pub struct ServeManyArgs {
    /// Deployments as `path/to/file.py:function[@deployment-name]` (the name defaults to the
    /// function's name).
    pub entrypoints: Vec<String>,
    /// A JSON file listing deployments: `[{"entrypoint", "name", "tags", "cron" | "interval" |
    /// "rrule", "timezone", "description", "version", "parameters"}]`.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The runner's name (default `runner-<uuid>`, as `serve()`).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub runner: RunnerArgs,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Start a worker that runs the scheduled flow runs of a work pool.
    Start(StartArgs),
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The work pool to poll.
    #[arg(short = 'p', long)]
    pub pool: String,

    /// The worker's name (default: `ProcessWorker <uuid>`, or `DockerWorker <uuid>` or `KubernetesWorker <uuid>` with `--type docker` or `--type kubernetes`, like Prefect's).
    #[arg(short = 'n', long)]
    pub name: Option<String>,

    /// Worker type; defaults to the pool's type, or `process` when creating the pool.
    #[arg(short = 't', long = "type")]
    pub worker_type: Option<String>,

    /// A work queue to poll (repeatable); all of the pool's queues when none is given.
    #[arg(short = 'q', long = "work-queue")]
    pub work_queues: Vec<String>,

    /// The most flow runs this worker runs at once.
    #[arg(short = 'l', long)]
    pub limit: Option<usize>,

    /// Claim runs scheduled up to this many seconds ahead (default: PREFECT_WORKER_PREFETCH_SECONDS, 10).
    #[arg(long)]
    pub prefetch_seconds: Option<u64>,

    /// Poll once, run what was claimed to completion, and exit.
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_run_once")]
    pub run_once: bool,
    #[arg(long, hide = true)]
    pub no_run_once: bool,

    /// Serve `GET /health`, `/livez`, `/readyz` and `/metrics` on
    /// PREFECT_WORKER_WEBSERVER_HOST:PREFECT_WORKER_WEBSERVER_PORT.
    #[arg(long, overrides_with = "no_with_healthcheck")]
    pub with_healthcheck: bool,
    #[arg(long, hide = true)]
    pub no_with_healthcheck: bool,

    /// Serve Prometheus metrics (`GET /metrics`) on the same address, without the health
    /// probes (also COHORT_WORKER_METRICS_ENABLED=true).
    #[arg(long, overrides_with = "no_with_metrics")]
    pub with_metrics: bool,
    #[arg(long, hide = true)]
    pub no_with_metrics: bool,

    /// A JSON base job template, used only when this worker creates the pool.
    #[arg(long)]
    pub base_job_template: Option<PathBuf>,

    /// Create the work pool when it does not exist (the default).
    #[arg(long, overrides_with = "no_create_pool_if_not_found")]
    pub create_pool_if_not_found: bool,
    #[arg(long)]
    pub no_create_pool_if_not_found: bool,

    /// On shutdown, wait this many seconds for running flow runs before stopping them.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,

    /// Seconds between SIGTERM and SIGKILL when a flow-run process must be stopped.
    #[arg(long, default_value_t = 30.0)]
    pub termination_grace: f64,
}
