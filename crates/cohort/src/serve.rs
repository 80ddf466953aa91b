//! `cohort flow serve` and `cohort serve`: flags and settings into a running runner.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cohort_api::{ClientConfig, PrefectClient, Settings};
use cohort_events::emitter::{Emitter, EmitterConfig};
use cohort_events::EventsAuth;
use cohort_runner::{Runner, RunnerError, RunnerOptions, ScheduleSpec, ServeSpec};
use cohort_supervise::{supervise_emitter, Supervisor};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::cli::{FlowServeArgs, RunnerArgs, ServeManyArgs};
use crate::start::{open_outbox, report, run_with_settings, watch_signals};
use crate::Failure;

pub fn flow_serve(args: FlowServeArgs) -> i32 {
    let spec = (|| -> anyhow::Result<ServeSpec> {
        Ok(ServeSpec {
            entrypoint: args.entrypoint.clone(),
            name: args.name.clone(),
            description: args.description.clone(),
            version: args.version.clone(),
            tags: args.tags.clone(),
            schedule: ScheduleSpec {
                cron: args.schedule.cron.clone(),
                interval: args.schedule.interval,
                rrule: args.schedule.rrule.clone(),
                timezone: args.schedule.timezone.clone(),
                anchor_date: args.schedule.anchor_date.clone(),
            },
            parameters: parse_parameters(args.parameters.as_deref())?,
        })
    })();
    match spec {
        // `prefect flow serve` names the runner after the deployment.
        Ok(spec) => run(args.name.clone(), vec![spec], &args.runner),
        Err(e) => report(Failure::Usage(e)),
    }
}

pub fn serve_many(args: ServeManyArgs) -> i32 {
    let specs = (|| -> anyhow::Result<Vec<ServeSpec>> {
        let mut specs = Vec::new();
        for entry in &args.entrypoints {
            let (entrypoint, name) = match entry.rsplit_once('@') {
                Some((e, n)) => (e.to_owned(), n.to_owned()),
                None => {
                    let function = entry.rsplit_once(':').map(|(_, f)| f).with_context(|| {
                        format!("{entry:?} is not `path/to/file.py:function[@name]`")
                    })?;
                    (entry.clone(), function.to_owned())
                }
            };
            specs.push(ServeSpec {
                entrypoint,
                name,
                description: None,
                version: None,
                tags: Vec::new(),
                schedule: ScheduleSpec::default(),
                parameters: Default::default(),
            });
        }
        if let Some(file) = &args.file {
            specs.extend(read_deployments_file(file)?);
        }
        anyhow::ensure!(
            !specs.is_empty(),
            "nothing to serve: give entrypoints or --file"
        );
        Ok(specs)
    })();
    match specs {
        Ok(specs) => {
            let name = args
                .name
                .clone()
                .unwrap_or_else(|| format!("runner-{}", uuid::Uuid::new_v4()));
            run(name, specs, &args.runner)
        }
        Err(e) => report(Failure::Usage(e)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    entrypoint: String,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    rrule: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    anchor_date: Option<String>,
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
}

fn read_deployments_file(path: &Path) -> anyhow::Result<Vec<ServeSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let entries: Vec<FileEntry> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON list of deployments", path.display()))?;
    Ok(entries
        .into_iter()
        .map(|e| ServeSpec {
            entrypoint: e.entrypoint,
            name: e.name,
            description: e.description,
            version: e.version,
            tags: e.tags,
            schedule: ScheduleSpec {
                cron: e.cron,
                interval: e.interval,
                rrule: e.rrule,
                timezone: e.timezone,
                anchor_date: e.anchor_date,
            },
            parameters: e.parameters,
        })
        .collect())
}

fn parse_parameters(
    raw: Option<&str>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match raw {
        None => Ok(Default::default()),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => {
                anyhow::bail!("--parameters must be a JSON object, e.g. '{{\"name\": \"x\"}}'")
            }
            Err(e) => anyhow::bail!("--parameters is not valid JSON: {e}"),
        },
    }
}

fn run(name: String, specs: Vec<ServeSpec>, args: &RunnerArgs) -> i32 {
    run_with_settings(|settings| serve(name, specs, args, settings))
}

async fn serve(
    name: String,
    specs: Vec<ServeSpec>,
    args: &RunnerArgs,
    settings: Settings,
) -> Result<(), Failure> {
    let usage = Failure::Usage;
    let client_config = ClientConfig::from_settings(&settings).map_err(|e| usage(e.into()))?;
    let client = PrefectClient::new(client_config).map_err(|e| usage(e.into()))?;
    let events_auth = if client.is_cloud() {
        EventsAuth::Bearer(settings.api_key().unwrap_or_default().to_owned())
    } else {
        EventsAuth::Token(
            settings
                .auth_string()
                .or(settings.api_key())
                .map(str::to_owned),
        )
    };
    let webserver = if args.webserver
        || settings
            .bool("PREFECT_RUNNER_SERVER_ENABLE", false)
            .map_err(|e| usage(e.into()))?
    {
        let host = settings
            .get("PREFECT_RUNNER_SERVER_HOST")
            .unwrap_or("localhost");
        let port = settings
            .u64("PREFECT_RUNNER_SERVER_PORT", 8080)
            .map_err(|e| usage(e.into()))?;
        let ip: IpAddr = match host {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            h => h
                .parse()
                .with_context(|| format!("PREFECT_RUNNER_SERVER_HOST {h:?} is not an IP address"))
                .map_err(usage)?,
        };
        let port = u16::try_from(port)
            .context("PREFECT_RUNNER_SERVER_PORT is out of range")
            .map_err(usage)?;
        Some(SocketAddr::new(ip, port))
    } else {
        None
    };
    if !(args.termination_grace.is_finite() && args.termination_grace >= 0.0) {
        return Err(usage(anyhow::anyhow!(
            "--termination-grace must be a number of seconds ≥ 0"
        )));
    }
    let options = RunnerOptions {
        name,
        limit: args.limit,
        pause_on_shutdown: !args.no_pause_on_shutdown,
        query_interval: settings
            .seconds("PREFECT_RUNNER_POLL_FREQUENCY", Duration::from_secs(10))
            .map_err(|e| usage(e.into()))?,
        prefetch: settings
            .seconds("PREFECT_RUNNER_PREFETCH_SECONDS", Duration::from_secs(10))
            .map_err(|e| usage(e.into()))?,
        webserver,
        termination_grace: Duration::from_secs_f64(args.termination_grace),
        settings_env: settings
            .explicit()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        events_auth: events_auth.clone(),
        cwd: std::env::current_dir()
            .context("cannot read the working directory")
            .map_err(usage)?,
    };
    let outbox = open_outbox(
        &settings,
        &format!("runner-{}", cohort_events::slug::slugify(&options.name)),
    )?;
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone(), force.clone()));
    // Start-up waits for a server that is down; a signal meanwhile ends it cleanly.
    let runner = tokio::select! {
        started = Runner::start(client.clone(), options, specs) => started,
        _ = shutdown.cancelled() => return Ok(()),
    }
    .map_err(|e| match e {
        RunnerError::Inspect { .. } => Failure::Usage(e.into()),
        other => Failure::Runtime(other.into()),
    })?;
    let (emitter, emitter_task) = Emitter::spawn_durable(
        EmitterConfig {
            api_url: client.api_url().clone(),
            auth: events_auth,
            user_agent: cohort_api::user_agent(),
        },
        cohort_events::Tuning::default(),
        outbox,
    )
    .map_err(|e| Failure::Runtime(anyhow::Error::new(e).context("cannot load the event outbox")))?;
    // The emitter task restarts from its outbox if it dies.
    let supervisor = Supervisor::default();
    let emitter_stop = CancellationToken::new();
    supervise_emitter(&supervisor, &emitter, emitter_task, emitter_stop.clone());
    // A second signal hurries the shutdown (flows are killed without the rest of their
    // grace) but never drops it: every run still gets its final state and events.
    let result = runner.run(Arc::new(emitter.clone()), shutdown, force).await;
    if let Err(e) = emitter.flush(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "some events may not have reached the server");
    }
    emitter_stop.cancel();
    emitter.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), supervisor.join()).await;
    result.map_err(|e| Failure::Runtime(e.into()))
}
