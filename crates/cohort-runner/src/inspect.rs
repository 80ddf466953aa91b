//! What a served deployment needs from its flow (name, description, parameter schema) and
//! its schedule, read with Prefect's own loaders in the Python on `PATH` — the flow code is
//! Python, and only Prefect knows how Prefect imports it.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

/// The schedule flags of `prefect flow serve`.
#[derive(Debug, Clone, Default)]
pub struct ScheduleSpec {
    pub cron: Option<String>,
    pub interval: Option<u64>,
    pub rrule: Option<String>,
    pub timezone: Option<String>,
    pub anchor_date: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FlowInfo {
    pub flow_name: String,
    pub description: Option<String>,
    pub parameter_openapi_schema: Value,
    /// `DeploymentScheduleCreate` JSON, ready for `POST /deployments/`.
    pub schedules: Vec<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no `python` or `python3` on PATH to load the flow with")]
    NoPython,
    #[error("could not run {python}: {source}")]
    Spawn {
        python: String,
        #[source]
        source: std::io::Error,
    },
    /// The entrypoint, the flow file or the schedule is wrong; the message is Prefect's.
    #[error("{0}")]
    Invalid(String),
    #[error("unexpected output from the flow loader: {0}")]
    Output(String),
}

const SCRIPT: &str = include_str!("inspect_flow.py");

/// Loads the flow at `entrypoint` (`path/to/file.py:function`, relative to `cwd`) and
/// validates the schedule, without registering anything.
pub async fn inspect(
    entrypoint: &str,
    schedule: &ScheduleSpec,
    cwd: &Path,
) -> Result<FlowInfo, InspectError> {
    let python = cohort_process::find_python().ok_or(InspectError::NoPython)?;
    let spec = json!({
        "entrypoint": entrypoint,
        "cron": schedule.cron,
        "interval": schedule.interval,
        "rrule": schedule.rrule,
        "timezone": schedule.timezone,
        "anchor_date": schedule.anchor_date,
    });
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(spec.to_string())
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| InspectError::Spawn {
            python: python.display().to_string(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The script's own message is its last line; a traceback above it is noise here.
        let message = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("the flow loader failed")
            .to_owned();
        return Err(InspectError::Invalid(message));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        InspectError::Output(format!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
    })
}
