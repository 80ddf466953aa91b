//! Flow-run processes: start one in its own process group, stream its output, wait for it, and
//! stop the whole group when asked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Everything needed to start a flow-run process.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    /// Set on top of the worker's own environment.
    pub env: BTreeMap<String, String>,
    /// Removed from the inherited environment.
    pub env_remove: Vec<String>,
    pub cwd: PathBuf,
    pub stream_output: bool,
}

/// The process could not be started at all.
#[derive(Debug, thiserror::Error)]
#[error("could not start {program:?} in {cwd}: {source}")]
pub struct LaunchError {
    pub program: String,
    pub cwd: String,
    #[source]
    pub source: std::io::Error,
}

/// A started flow-run process, leader of its own process group.
#[derive(Debug)]
pub struct FlowRunProcess {
    child: Child,
    pid: u32,
    output: Vec<tokio::task::JoinHandle<()>>,
}

impl FlowRunProcess {
    pub fn spawn(launch: &Launch) -> Result<Self, LaunchError> {
        let mut cmd = Command::new(&launch.program);
        cmd.args(&launch.args)
            .current_dir(&launch.cwd)
            .envs(&launch.env)
            .stdin(Stdio::null())
            // Its own group, so a stop reaches the flow's children too and a Ctrl-C at the
            // worker's terminal does not hit the flow directly (`start_new_session=True` in
            // `prefect/runner/_process_manager.py`).
            .process_group(0)
            .kill_on_drop(false);
        for key in &launch.env_remove {
            cmd.env_remove(key);
        }
        if launch.stream_output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let mut child = cmd.spawn().map_err(|source| LaunchError {
            program: launch.program.clone(),
            cwd: launch.cwd.display().to_string(),
            source,
        })?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let mut output = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            output.push(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut out, &mut tokio::io::stdout()).await;
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            output.push(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut err, &mut tokio::io::stderr()).await;
            }));
        }
        Ok(Self { child, pid, output })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit: its exit code, or the negated signal number that killed it
    /// (Python's `returncode` convention, which Prefect reports as the status code).
    pub async fn wait(&mut self) -> std::io::Result<i64> {
        let status = self.child.wait().await?;
        for task in self.output.drain(..) {
            // Output of grandchildren that outlive the leader must not hold the run open.
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        Ok(exit_code(status))
    }

    /// Sends `signal` to the whole process group. A group that is already gone is not an error.
    pub fn signal_group(&self, signal: Signal) {
        match killpg(Pid::from_raw(self.pid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pid = self.pid, %signal, error = %e, "could not signal flow-run process group")
            }
        }
    }

    /// SIGTERM to the group, then SIGKILL once `grace` has passed; returns as soon as the
    /// leader has exited.
    pub async fn terminate(&mut self, grace: Duration) -> std::io::Result<i64> {
        self.signal_group(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                // Children that ignored SIGTERM go with the leader.
                self.signal_group(Signal::SIGKILL);
                Ok(exit_code(status?))
            }
            Err(_) => {
                self.signal_group(Signal::SIGKILL);
                self.wait().await
            }
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as i64,
        (None, Some(signal)) => -(signal as i64),
        (None, None) => -1,
    }
}

/// The first `python`, else `python3`, on `PATH`: Prefect's worker runs the engine with its own
/// interpreter (`sys.executable`); Cohort has none, so it uses the one a user's shell would.
pub fn find_python() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in ["python", "python3"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Some(candidate);
            }
        }
    }
    None
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Launch {
        Launch {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::from([("COHORT_TEST_VAR".into(), "x".into())]),
            env_remove: vec![],
            cwd: std::env::temp_dir(),
            stream_output: false,
        }
    }

    #[tokio::test]
    async fn exit_codes_follow_python_convention() {
        let mut p = FlowRunProcess::spawn(&sh("exit 3")).unwrap();
        assert_eq!(p.wait().await.unwrap(), 3);
        let mut p = FlowRunProcess::spawn(&sh("test \"$COHORT_TEST_VAR\" = x")).unwrap();
        assert_eq!(p.wait().await.unwrap(), 0);
        let mut p = FlowRunProcess::spawn(&sh("kill -9 $$")).unwrap();
        assert_eq!(p.wait().await.unwrap(), -9);
    }

    #[tokio::test]
    async fn terminate_reaches_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let mut p = FlowRunProcess::spawn(&sh(&script)).unwrap();
        let child_pid = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(pid) = s.trim().parse::<i32>() {
                    break pid;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let code = p.terminate(Duration::from_secs(5)).await.unwrap();
        assert_eq!(code, -15);
        // The grandchild got the signal too.
        let mut gone = false;
        for _ in 0..100 {
            let stat =
                std::fs::read_to_string(format!("/proc/{child_pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for whoever adopted it to reap it.
            if stat.is_empty()
                || stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z'))
            {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "grandchild {child_pid} survived");
    }

    #[test]
    fn missing_program_is_a_launch_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut l = sh("true");
            l.program = "/nonexistent/cmd".into();
            let err = FlowRunProcess::spawn(&l).unwrap_err();
            assert!(err.to_string().contains("/nonexistent/cmd"), "{err}");
        });
    }
}
