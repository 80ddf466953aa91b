//! The control listener against Prefect's own engine-side client
//! (`prefect/_internal/control_listener.py`, started by `prefect/utilities/engine: capture_sigterm`
//! exactly as `prefect/flow_engine.py` does), run from the Prefect 3.8.8 venv named by
//! `COHORT_PREFECT_VENV`. No Prefect server is needed: only the control session is exercised.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cohort_process::control::DEFAULT_ACK_TIMEOUT;
use cohort_process::{Attempt, Conclusion, ControlListener, Intent};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Importing Prefect takes a couple of seconds; leave room for a loaded machine.
const STARTUP: Duration = Duration::from_secs(60);

fn prefect_python() -> PathBuf {
    let venv = std::env::var_os("COHORT_PREFECT_VENV").unwrap_or_else(|| {
        panic!(
            "COHORT_PREFECT_VENV is not set: this test runs Prefect 3.8.8's own engine-side \
             control client; run scripts/prefect-venv.sh and export \
             COHORT_PREFECT_VENV=<the path it prints>"
        )
    });
    let python = PathBuf::from(venv).join("bin").join("python");
    assert!(
        python.is_file(),
        "COHORT_PREFECT_VENV has no bin/python: {}",
        python.display()
    );
    python
}

fn spawn_child(script: &str, attempt: &Attempt, home: &tempfile::TempDir) -> Child {
    Command::new(prefect_python())
        .arg("-c")
        .arg(script)
        .envs(attempt.env())
        // Keep Prefect away from the user's profile.
        .env("PREFECT_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start Prefect's python")
}

async fn wait_connected(attempt: &Attempt) {
    let connected = tokio::time::timeout(STARTUP, attempt.wait_connected())
        .await
        .expect("Prefect's control listener did not connect in time");
    assert!(
        connected,
        "Prefect's control listener connected and went away"
    );
}

/// What the engine does under the runner: the SIGTERM bridge is armed, the child is connected,
/// and the flow is busy. After an acknowledged cancel, SIGTERM makes `handle_engine_signals`
/// exit 0 (instead of re-raising the signal, which is what the crash path does).
const BUSY_ENGINE: &str = r#"
import time
from prefect.engine import handle_engine_signals
from prefect.utilities.engine import capture_sigterm

with handle_engine_signals():
    with capture_sigterm():
        time.sleep(120)
raise SystemExit(3)
"#;

#[tokio::test]
async fn prefect_engine_acknowledges_cancel_and_exits_zero_on_sigterm() {
    let listener = ControlListener::bind().await.unwrap();
    let attempt = listener.register();
    let home = tempfile::tempdir().unwrap();
    let mut child = spawn_child(BUSY_ENGINE, &attempt, &home);
    wait_connected(&attempt).await;

    assert!(
        attempt
            .send_intent(Intent::Cancel, DEFAULT_ACK_TIMEOUT)
            .await,
        "Prefect's engine did not acknowledge the cancel intent"
    );
    assert_eq!(
        attempt.conclusion(),
        Some(Conclusion::Acknowledged(Intent::Cancel))
    );

    // The runner's SIGTERM is still the trigger (`_cancellation_manager.py`).
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(STARTUP, child.wait())
        .await
        .expect("engine did not exit after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test]
async fn prefect_engine_without_an_intent_dies_of_sigterm() {
    use std::os::unix::process::ExitStatusExt;

    let listener = ControlListener::bind().await.unwrap();
    let attempt = listener.register();
    let home = tempfile::tempdir().unwrap();
    let mut child = spawn_child(BUSY_ENGINE, &attempt, &home);
    wait_connected(&attempt).await;

    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(STARTUP, child.wait())
        .await
        .expect("engine did not exit after SIGTERM")
        .unwrap();
    // `capture_sigterm` re-delivers the signal to the default handler: status -15, the
    // supervisor's "Process exited with status code: -15" crash path.
    assert_eq!(status.signal(), Some(15), "{status:?}");
    assert_eq!(attempt.conclusion(), None);
}

/// What the engine does when it has reported a final state: one outcome receipt, which needs
/// version-2 negotiation to have succeeded.
const REPORTING_ENGINE: &str = r#"
import uuid
from prefect._internal.attempt_control import EngineOutcomeReceipt
from prefect._internal.control_listener import report_engine_outcome
from prefect.utilities.engine import capture_sigterm

with capture_sigterm():
    acked = report_engine_outcome(
        EngineOutcomeReceipt.state_reported(
            state_id=uuid.UUID("0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11"),
            state_type="COMPLETED",
            state_name="Completed",
        )
    )
print("acked" if acked else "not acked", flush=True)
"#;

#[tokio::test]
async fn prefect_engine_receipt_is_negotiated_parsed_and_acknowledged() {
    let listener = ControlListener::bind().await.unwrap();
    let attempt = listener.register();
    let home = tempfile::tempdir().unwrap();
    let child = spawn_child(REPORTING_ENGINE, &attempt, &home);

    let output = tokio::time::timeout(STARTUP, child.wait_with_output())
        .await
        .expect("Prefect's reporting script did not finish")
        .unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "acked");
    assert_eq!(
        attempt.conclusion(),
        Some(Conclusion::Receipt(serde_json::json!({
            "disposition": "STATE_REPORTED",
            "state_id": "0b4c6a3e-7f43-4c1f-9d0a-2f7a1a0e9b11",
            "state_name": "Completed",
            "state_type": "COMPLETED",
        })))
    );
    assert!(
        !attempt
            .send_intent(Intent::Cancel, DEFAULT_ACK_TIMEOUT)
            .await,
        "a concluded attempt takes no intent"
    );
}
