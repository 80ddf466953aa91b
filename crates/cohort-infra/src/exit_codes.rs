//! What an infrastructure exit code means, worded as Prefect words it so state messages match
//! (`prefect/_internal/infrastructure_exit_codes.py`).

/// Explanation and suggested resolution of an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub explanation: &'static str,
    pub resolution: &'static str,
}

/// Looks up `code` (negative for a signal, as Python reports it).
pub fn exit_info(code: i64) -> ExitInfo {
    let (explanation, resolution) = match code {
        0 => ("Process exited cleanly.", "No action needed."),
        -9 => (
            "Process exited due to a SIGKILL signal. Typically caused by the operating system terminating the process for exceeding memory limits, or by manual cancellation.",
            "Check whether the flow run exceeded its memory allocation. If running in a container, increase the memory limit. If this was intentional cancellation, no action is needed.",
        ),
        -15 => (
            "Process exited due to a SIGTERM signal. Typically caused by graceful shutdown or manual cancellation.",
            "If this was caused by cancellation, no action is needed. Otherwise, check for infrastructure scaling events or deployment rollovers.",
        ),
        1 => (
            "Process exited with a general error.",
            "Check the flow run logs for an unhandled exception or assertion error.",
        ),
        125 => (
            "Container failed to run (Docker/OCI exit code 125).",
            "Verify the container image exists, the entrypoint is correct, and the container runtime is healthy.",
        ),
        126 => (
            "Command found but not executable (permission denied).",
            "Check file permissions on the entrypoint script or binary. Ensure the file has the executable bit set.",
        ),
        127 => (
            "Command not found.",
            "Verify that the entrypoint command or script is installed in the execution environment. Check your PATH and container image contents.",
        ),
        137 => (
            "Process was killed, likely due to an out-of-memory (OOM) condition.",
            "Increase the memory allocation for the flow run infrastructure. In Kubernetes, raise the memory limit in the job template. In ECS, increase the task memory.",
        ),
        143 => (
            "Process received SIGTERM via the container runtime. This is the containerized equivalent of exit code -15.",
            "If this was caused by cancellation or a scaling event, no action is needed. Otherwise, check for pod evictions or ECS task stops.",
        ),
        247 => (
            "Process was terminated due to high memory usage.",
            "Increase the memory allocation for the flow run infrastructure. Consider profiling memory usage to find the source of consumption.",
        ),
        _ => (
            "Process exited with an unexpected status code.",
            "Check the flow run logs and infrastructure logs for more details.",
        ),
    };
    ExitInfo {
        explanation,
        resolution,
    }
}

/// The Crashed message of a flow-run process that exited non-zero without reporting a final
/// state (`prefect/runner/_flow_run_executor.py: FlowRunExecutor.submit`). The base worker's
/// later "Flow run infrastructure exited with non-zero status code" proposal is always aborted
/// by the server because the run is already Crashed, so only this one is ever seen.
pub fn crashed_message(code: i64) -> String {
    format!(
        "Process exited with status code: {code}. {}",
        exit_info(code).explanation
    )
}

/// The Crashed message of a worker whose infrastructure reports its own exit
/// (`prefect/workers/base.py: BaseWorker._submit_run_and_capture_errors`; the process worker
/// words it as its runner does, [`crashed_message`]).
pub fn infrastructure_crashed_message(code: i64) -> String {
    format!(
        "Flow run infrastructure exited with non-zero status code {code}. {}",
        exit_info(code).explanation
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_codes() {
        assert_eq!(
            crashed_message(3),
            "Process exited with status code: 3. Process exited with an unexpected status code."
        );
        assert!(crashed_message(-9).contains("SIGKILL"));
        assert_eq!(exit_info(127).explanation, "Command not found.");
    }
}
