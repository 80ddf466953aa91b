//! `cohort worker start`: turn flags and `PREFECT_*` settings into a running worker.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cohort_api::{ClientConfig, PrefectClient, Settings};
use cohort_docker::{DockerInfrastructure, DockerOptions, DOCKER};
use cohort_events::emitter::{Emitter, EmitterConfig, EventsAuth, Outbox, OutboxError, Tuning};
use cohort_infra::Infrastructure;
use cohort_kubernetes::{KubernetesInfrastructure, KubernetesOptions, KUBERNETES};
use cohort_process::infra::PROCESS;
use cohort_process::{ProcessInfrastructure, Shims};
use cohort_supervise::{supervise_emitter, Supervisor};
use cohort_worker::{
    Journal, JournalError, LegacyState, StartError, Webserver, Worker, WorkerOptions, WorkerState,
};
use tokio_util::sync::CancellationToken;

use crate::cli::StartArgs;
use crate::Failure;

pub fn main(args: StartArgs) -> i32 {
    run_with_settings(|settings| run(args, settings))
}

/// Reads the settings, sets up logging and a runtime, runs `main` on it, and maps its
/// outcome to an exit code: the frame both `worker start` and the runner commands share.
pub(crate) fn run_with_settings<F, Fut>(main: F) -> i32
where
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let settings = match Settings::from_process_env() {
        Ok(s) => s,
        Err(e) => return report(Failure::Usage(e.into())),
    };
    init_logging(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Failure::Runtime(e.into())),
    };
    let run = async {
        // A file-size limit reached (RLIMIT_FSIZE) must fail the write (outbox, journal), not
        // kill the process: catch SIGXFSZ (25 on Linux) for its whole life. Flow processes
        // start with the default again (a caught signal is reset by exec).
        let _file_size_limit =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25));
        main(settings).await
    };
    match runtime.block_on(run) {
        Ok(()) => 0,
        Err(failure) => report(failure),
    }
}

pub(crate) fn report(failure: Failure) -> i32 {
    let err = match &failure {
        Failure::Usage(e) | Failure::Runtime(e) => e,
    };
    eprintln!("Error: {err:#}");
    failure.exit_code()
}

pub(crate) fn init_logging(settings: &Settings) {
    let debug = settings
        .bool("PREFECT_WORKER_DEBUG_MODE", false)
        .unwrap_or(false);
    let default = if debug {
        "info,cohort=debug,cohort_worker=debug,cohort_api=debug,cohort_events=debug"
    } else {
        "info"
    };
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let filter = tracing_subscriber::EnvFilter::try_from_env("COHORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Applied after `COHORT_LOG`, so no directive (`trace`, `tungstenite=trace`) gets past it.
    let no_dependency_traces = tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() != tracing::Level::TRACE || is_own_target(meta.target())
    });
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        // A log line that cannot be written (stderr on a full disk) is lost, and that is all:
        // the default reports it with `eprintln!`, which panics when stderr fails too.
        .log_internal_errors(false)
        .with_filter(filter.and(no_dependency_traces));
    tracing_subscriber::registry().with(stderr).init();
}

/// Whether a log target is Cohort's own code, the only code allowed to log at TRACE.
/// Dependencies trace what goes over the wire: tungstenite each websocket frame (the events
/// socket's `{"type":"auth","token":…}`) and each handshake's request headers
/// (`Authorization`), hyper and h2 headers and bodies. Logs get shipped to aggregators, so
/// no log level may print a credential: their TRACE is dropped whatever `COHORT_LOG` says.
fn is_own_target(target: &str) -> bool {
    target
        .split("::")
        .next()
        .is_some_and(|krate| krate == "cohort" || krate.starts_with("cohort_"))
}

/// Phase two: validated values become the worker, the emitter and the signal handling.
async fn run(args: StartArgs, settings: Settings) -> Result<(), Failure> {
    let usage = |e: anyhow::Error| Failure::Usage(e);
    let mut options = options(&args, &settings).map_err(usage)?;
    let client_config = ClientConfig::from_settings(&settings).map_err(|e| usage(e.into()))?;
    options.authorization = cohort_api::authorization(&client_config);
    let client = PrefectClient::new(client_config).map_err(|e| usage(e.into()))?;
    options.events_auth = if client.is_cloud() {
        EventsAuth::Bearer(settings.api_key().unwrap_or_default().to_owned())
    } else {
        EventsAuth::Token(options.auth_token.clone())
    };

    // Events are journaled before anything they report happens, claims before they are
    // made: no outbox or journal, no claims.
    let outbox = open_worker_outbox(&settings, &options).await?;
    options.outbox = Some(outbox.clone());
    let (state, shims) = open_worker_state(&settings, &options)?;
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone(), force.clone()));
    // Start-up waits for a server that is down; a signal meanwhile ends it cleanly.
    let worker = tokio::select! {
        started = Worker::start(client.clone(), options.clone(), SUPPORTED_TYPES) => started,
        _ = shutdown.cancelled() => return Ok(()),
    }
    .map_err(|e| match e {
        StartError::InvalidName(_) => Failure::Usage(e.into()),
        other => Failure::Runtime(other.into()),
    })?;

    let infra = infrastructure(&worker, shims).await?;

    let auth = options.events_auth.clone();
    let (emitter, emitter_task) = Emitter::spawn_durable(
        EmitterConfig {
            api_url: client.api_url().clone(),
            auth,
            user_agent: cohort_api::user_agent(),
        },
        Tuning::default(),
        outbox,
    )
    .map_err(|e| Failure::Runtime(anyhow::Error::new(e).context("cannot load the event outbox")))?;

    // Background tasks restart when they die; the health probes see them.
    let supervisor = Supervisor::default();
    let emitter_stop = CancellationToken::new();
    supervise_emitter(&supervisor, &emitter, emitter_task, emitter_stop.clone());

    let result = worker
        .run(
            Arc::new(emitter.clone()),
            state,
            infra,
            &supervisor,
            shutdown,
            force,
        )
        .await;
    // Events are the product: give the last ones (executed, stopped) time to be confirmed.
    if let Err(e) = emitter.flush(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "some events may not have reached the server");
    }
    emitter_stop.cancel();
    emitter.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), supervisor.join()).await;
    result.map_err(|e| Failure::Runtime(e.into()))
}

/// The work pool types this build runs, the first the default for a pool it creates.
const SUPPORTED_TYPES: &[&str] = &[PROCESS, DOCKER, KUBERNETES];

/// Prefect's default worker name: the worker class and a fresh uuid
/// (`prefect/workers/base.py: BaseWorker.__init__`).
fn default_worker_name(worker_type: Option<&str>) -> String {
    let class = match worker_type {
        Some(DOCKER) => "DockerWorker",
        Some(KUBERNETES) => "KubernetesWorker",
        _ => "ProcessWorker",
    };
    format!("{class} {}", uuid::Uuid::new_v4())
}

/// The infrastructure of a worker serving a pool of type `worker_type`.
async fn infrastructure(worker: &Worker, shims: Shims) -> Result<Arc<dyn Infrastructure>, Failure> {
    match worker.worker_type() {
        PROCESS => Ok(Arc::new(ProcessInfrastructure::new(Some(shims)).await)),
        DOCKER => {
            let options = DockerOptions {
                // Not a Prefect setting: Prefect's Docker worker never removes a container.
                keep_containers: std::env::var("COHORT_DOCKER_KEEP_CONTAINERS")
                    .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes")),
            };
            let docker = DockerInfrastructure::connect(options)
                .await
                .map_err(|e| Failure::Runtime(e.into()))?;
            Ok(Arc::new(docker))
        }
        KUBERNETES => Ok(Arc::new(KubernetesInfrastructure::new(
            kubernetes_options(worker).map_err(Failure::Usage)?,
        ))),
        other => Err(Failure::Runtime(anyhow::anyhow!(
            "no infrastructure for work pool type {other:?}"
        ))),
    }
}

/// Where an earlier worker's Jobs are looked for: the pool's default namespace and those
/// prefect-kubernetes' observer is told to watch
/// (`PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES`, comma-separated).
fn kubernetes_options(worker: &Worker) -> anyhow::Result<KubernetesOptions> {
    let template = worker.base_job_template();
    let default = template
        .pointer("/variables/properties/namespace/default")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let mut namespaces = vec![default.to_owned()];
    if let Ok(listed) = std::env::var("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES") {
        for ns in listed.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !namespaces.iter().any(|n| n == ns) {
                namespaces.push(ns.to_owned());
            }
        }
    }
    let manifest =
        cohort_kube_manifest::ManifestSettings::from_env(&|name| std::env::var(name).ok())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let scheduled_timeout = match std::env::var("COHORT_KUBERNETES_SCHEDULED_TIMEOUT_SECONDS") {
        Ok(v) if !v.is_empty() => Some(Duration::from_secs(v.parse().with_context(|| {
            format!("COHORT_KUBERNETES_SCHEDULED_TIMEOUT_SECONDS must be a whole number of seconds, got {v:?}")
        })?)),
        _ => None,
    };
    Ok(KubernetesOptions {
        namespaces,
        prefect_version: worker.prefect_version().to_owned(),
        manifest,
        scheduled_timeout,
    })
}

/// `$PREFECT_HOME/cohort`, where Cohort keeps what must survive a restart.
fn state_home(settings: &Settings) -> Result<PathBuf, Failure> {
    let home = settings
        .get("PREFECT_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".prefect")))
        .ok_or_else(|| Failure::Usage(anyhow::anyhow!("neither PREFECT_HOME nor HOME is set")))?;
    Ok(home.join("cohort"))
}

/// The claim journal (`$PREFECT_HOME/cohort/journal/<key>.redb`) and the shims' status
/// files (`$PREFECT_HOME/cohort/runs/<key>/`) of one worker, `<key>` naming its pool and name
/// ([`cohort_worker::state::worker_key`]): a worker restarted with the same pool and name
/// recovers the runs of the one before, and takes over the claims of its pool that a worker
/// of the same name left in the layout of earlier releases (keyed by the name alone).
fn open_worker_state(
    settings: &Settings,
    options: &WorkerOptions,
) -> Result<(WorkerState, Shims), Failure> {
    use cohort_worker::state::{legacy_worker_key, worker_key};
    let home = state_home(settings)?;
    let key = worker_key(&options.pool, &options.name);
    let path = home.join("journal").join(format!("{key}.redb"));
    let journal = Journal::open(&path).map_err(|e| match e {
        JournalError::AlreadyOpen { path } => already_running(options, &path),
        e => Failure::Runtime(
            anyhow::Error::new(e)
                .context("cannot open the claim journal (is PREFECT_HOME writable?)"),
        ),
    })?;
    let dir = home.join("runs").join(&key);
    let shims = Shims::new(dir.clone()).map_err(|e| {
        Failure::Runtime(anyhow::Error::new(e).context(format!(
            "cannot prepare the run status directory {} (is PREFECT_HOME writable?)",
            dir.display()
        )))
    })?;
    let legacy = legacy_worker_key(&options.name);
    let state = WorkerState {
        journal,
        legacy: Some(LegacyState {
            journal: home.join("journal").join(format!("{legacy}.redb")),
            runs: home.join("runs").join(legacy),
        }),
    };
    Ok((state, shims))
}

/// The event outbox of one worker (`$PREFECT_HOME/cohort/outbox/<key>.redb`, keyed as its
/// journal), with the events an earlier release's worker of the same name left unsent in
/// `outbox/worker-<name slug>.redb` moved in: whichever worker of that name opens that file
/// first sends them, whatever its pool.
async fn open_worker_outbox(
    settings: &Settings,
    options: &WorkerOptions,
) -> Result<Outbox, Failure> {
    use cohort_worker::state::{legacy_worker_key, worker_key};
    let outbox =
        open_outbox(settings, &worker_key(&options.pool, &options.name)).map_err(|failure| {
            match failure {
                Failure::Runtime(e) => match e.downcast_ref::<OutboxError>() {
                    Some(OutboxError::AlreadyOpen { path }) => already_running(options, path),
                    _ => Failure::Runtime(e),
                },
                other => other,
            }
        })?;
    let legacy = state_home(settings)?
        .join("outbox")
        .join(format!("{}.redb", legacy_worker_key(&options.name)));
    match outbox.take_over(&legacy).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(events = n, path = %legacy.display(), "sending the unsent events of an earlier release's worker of the same name")
        }
        Err(OutboxError::AlreadyOpen { .. }) => {
            tracing::info!(path = %legacy.display(), "the event outbox of an earlier release is in use by another process, which sends its events")
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over the event outbox of an earlier release; its events stay there")
        }
    }
    Ok(outbox)
}

/// A second process for one pool and worker name under one `PREFECT_HOME`: its state files
/// are locked by the first, and two processes would claim and report the same runs twice.
fn already_running(options: &WorkerOptions, path: &std::path::Path) -> Failure {
    Failure::Runtime(anyhow::anyhow!(
        "a worker named {name:?} for work pool {pool:?} is already running with this \
         PREFECT_HOME (it holds {path}). Stop it first, or give this one another --name \
         (a worker of the same name on another --pool is fine) or another PREFECT_HOME",
        name = options.name,
        pool = options.pool,
        path = path.display(),
    ))
}

/// The durable event outbox of one worker or runner, under `$PREFECT_HOME/cohort/outbox/`
/// (one file each, so several workers on one machine never share one). Events left there by
/// an earlier run of the same name are sent first.
pub(crate) fn open_outbox(settings: &Settings, name: &str) -> Result<Outbox, Failure> {
    let path = state_home(settings)?
        .join("outbox")
        .join(format!("{name}.redb"));
    Outbox::open(&path).map_err(|e| {
        Failure::Runtime(anyhow::Error::new(e).context(format!(
            "cannot open the event outbox {} (is PREFECT_HOME writable?)",
            path.display()
        )))
    })
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: stop running flows now
/// (`prefect/utilities/processutils.py: setup_signal_handlers_worker` escalates the same way).
pub(crate) async fn watch_signals(shutdown: CancellationToken, force: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        seen += 1;
        if seen == 1 {
            tracing::info!("shutting down: no new flow runs will be claimed (signal again to stop running flows now)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: stopping running flow runs now");
            force.cancel();
        }
    }
}

fn options(args: &StartArgs, settings: &Settings) -> anyhow::Result<WorkerOptions> {
    let base_job_template = match &args.base_job_template {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --base-job-template {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!("--base-job-template {} is not valid JSON", path.display())
            })?;
            anyhow::ensure!(
                value.get("job_configuration").is_some_and(|v| v.is_object())
                    && value.get("variables").is_some_and(|v| v.is_object()),
                "--base-job-template {} must be an object with `job_configuration` and `variables` objects",
                path.display()
            );
            Some(value)
        }
    };
    let with_metrics = args.with_metrics
        || std::env::var("COHORT_WORKER_METRICS_ENABLED")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    let webserver = if args.with_healthcheck || with_metrics {
        let host = settings
            .get("PREFECT_WORKER_WEBSERVER_HOST")
            .unwrap_or("0.0.0.0");
        let port = settings.u64("PREFECT_WORKER_WEBSERVER_PORT", 8080)?;
        let ip: IpAddr = match host {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            h => h.parse().with_context(|| {
                format!("PREFECT_WORKER_WEBSERVER_HOST {h:?} is not an IP address")
            })?,
        };
        let port = u16::try_from(port).context("PREFECT_WORKER_WEBSERVER_PORT is out of range")?;
        Some(Webserver {
            addr: SocketAddr::new(ip, port),
            health: args.with_healthcheck,
        })
    } else {
        None
    };
    let prefetch = match args.prefetch_seconds {
        Some(s) => Duration::from_secs(s),
        None => settings.seconds("PREFECT_WORKER_PREFETCH_SECONDS", Duration::from_secs(10))?,
    };
    let seconds = |v: f64, flag: &str| -> anyhow::Result<Duration> {
        anyhow::ensure!(
            v.is_finite() && v >= 0.0,
            "{flag} must be a number of seconds ≥ 0"
        );
        Ok(Duration::from_secs_f64(v))
    };
    Ok(WorkerOptions {
        pool: args.pool.clone(),
        name: args
            .name
            .clone()
            .unwrap_or_else(|| default_worker_name(args.worker_type.as_deref())),
        worker_type: args.worker_type.clone(),
        work_queues: args.work_queues.clone(),
        limit: args.limit,
        prefetch,
        query_interval: settings
            .seconds("PREFECT_WORKER_QUERY_SECONDS", Duration::from_secs(10))?,
        heartbeat_interval: settings
            .seconds("PREFECT_WORKER_HEARTBEAT_SECONDS", Duration::from_secs(30))?,
        run_once: args.run_once && !args.no_run_once,
        base_job_template,
        create_pool_if_not_found: !args.no_create_pool_if_not_found,
        drain_timeout: seconds(args.drain_timeout, "--drain-timeout")?,
        termination_grace: seconds(args.termination_grace, "--termination-grace")?,
        webserver,
        outbox: None,
        settings_env: settings
            .explicit()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        auth_token: settings
            .auth_string()
            .or(settings.api_key())
            .map(str::to_owned),
        authorization: None,
        events_auth: EventsAuth::Token(None),
        event_wake: !matches!(
            std::env::var("COHORT_EVENT_WAKE").as_deref(),
            Ok("0" | "false" | "off")
        ),
    })
}
