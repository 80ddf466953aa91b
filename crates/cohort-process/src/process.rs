//! Flow-run processes: start one in its own process group (behind a [shim](crate::shim) that
//! outlives the worker), wait for it, re-adopt it after a restart, and stop the whole group
//! when asked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::shim::{self, ShimSpec};

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
    /// The flow's output goes to the worker's own stdout and stderr (inherited, so it keeps
    /// flowing if the worker dies); otherwise it is discarded.
    pub stream_output: bool,
    /// Run it under a [shim](crate::shim) that outlives the worker; `None` starts it directly.
    pub shim: Option<ShimSpec>,
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

/// How long a shim may take to report the flow's pid.
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an adopted (not our child) shim is checked for having exited.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// A started flow-run process in its own process group: either our child, or (behind a shim)
/// our child's child, or a run re-adopted after a restart.
#[derive(Debug)]
pub struct FlowRunProcess {
    /// The flow process: what Prefect knows as the run's `infrastructure_pid`.
    pid: u32,
    /// The process group, led by the shim (or by the flow process itself without one).
    pgid: u32,
    status: Option<PathBuf>,
    waiter: Waiter,
}

#[derive(Debug)]
enum Waiter {
    Child(Child),
    /// A shim of an earlier worker: not our child, so polled; its start time guards against
    /// a reused pid.
    Adopted {
        start_ticks: u64,
    },
    Done(i64),
}

impl FlowRunProcess {
    pub fn spawn(launch: &Launch) -> Result<Self, LaunchError> {
        let launch_error = |source| LaunchError {
            program: launch.program.clone(),
            cwd: launch.cwd.display().to_string(),
            source,
        };
        let mut cmd = match &launch.shim {
            Some(shim) => {
                // A stale record of an earlier attempt must not be mistaken for this one.
                match std::fs::remove_file(&shim.status) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(launch_error(e)),
                }
                let mut cmd = Command::new(&shim.exe);
                cmd.arg(shim::SUBCOMMAND)
                    .arg("--status")
                    .arg(&shim.status)
                    .arg("--")
                    .arg(&launch.program)
                    .args(&launch.args);
                cmd
            }
            None => {
                let mut cmd = Command::new(&launch.program);
                cmd.args(&launch.args);
                cmd
            }
        };
        cmd.current_dir(&launch.cwd)
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
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.spawn().map_err(launch_error)?;
        let leader = child.id().expect("a just-spawned child has a pid");
        Ok(Self {
            pid: leader,
            pgid: leader,
            status: launch.shim.as_ref().map(|s| s.status.clone()),
            waiter: Waiter::Child(child),
        })
    }

    /// Behind a shim: waits until the shim has started the flow process and learns its pid.
    /// Without a shim, there is nothing to wait for.
    pub async fn started(&mut self, launch: &Launch) -> Result<(), LaunchError> {
        let Some(path) = self.status.clone() else {
            return Ok(());
        };
        let launch_error = |message: String| LaunchError {
            program: launch.program.clone(),
            cwd: launch.cwd.display().to_string(),
            source: std::io::Error::other(message),
        };
        let deadline = tokio::time::Instant::now() + SHIM_START_TIMEOUT;
        let mut delay = Duration::from_millis(1);
        loop {
            if let Some(record) = shim::read_status(&path) {
                if let Some(error) = record.error {
                    let _ = self.wait().await;
                    let _ = std::fs::remove_file(&path);
                    return Err(launch_error(error));
                }
                if let Some(pid) = record.flow_pid {
                    self.pid = pid;
                    return Ok(());
                }
            }
            let exited = match &mut self.waiter {
                Waiter::Child(child) => child.try_wait().ok().flatten().map(shim::exit_code),
                _ => None,
            };
            if let Some(code) = exited {
                // Raced its own status write? One last look.
                if let Some(pid) = shim::read_status(&path).and_then(|r| r.flow_pid) {
                    self.pid = pid;
                    self.waiter = Waiter::Done(code);
                    return Ok(());
                }
                return Err(launch_error(format!(
                    "the run supervisor exited ({code}) before starting it"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                self.signal_group(Signal::SIGKILL);
                return Err(launch_error(format!(
                    "the run supervisor did not start it within {SHIM_START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Takes over a run started by an earlier worker through a shim, from its status file.
    /// `None` when there is nothing to adopt (no record of a started flow). A shim that has
    /// exited meanwhile yields a process whose [`wait`](Self::wait) returns at once.
    pub fn adopt(status: &Path) -> Option<Self> {
        let record = shim::read_status(status)?;
        let pid = record.flow_pid?;
        let waiter = match (record.exit_code, shim::start_ticks(record.shim_pid)) {
            (Some(code), _) => Waiter::Done(code),
            (None, Some(start_ticks)) => Waiter::Adopted { start_ticks },
            // Gone without a recorded outcome: SIGKILLed with its group.
            (None, None) => Waiter::Adopted { start_ticks: 0 },
        };
        Some(Self {
            pid,
            pgid: record.shim_pid,
            status: Some(status.to_path_buf()),
            waiter,
        })
    }

    /// The flow process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process group (the shim's pid behind a shim).
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Waits for the process to exit: its exit code, or the negated signal number that killed it
    /// (Python's `returncode` convention, which Prefect reports as the status code). Behind a
    /// shim, the code the shim recorded; an error when nobody could record it.
    pub async fn wait(&mut self) -> std::io::Result<i64> {
        let own = match &mut self.waiter {
            Waiter::Done(code) => Some(*code),
            Waiter::Child(child) => Some(shim::exit_code(child.wait().await?)),
            Waiter::Adopted { start_ticks } => {
                let start_ticks = *start_ticks;
                while start_ticks != 0 && shim::start_ticks(self.pgid) == Some(start_ticks) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                None
            }
        };
        let recorded = self
            .status
            .as_deref()
            .and_then(shim::read_status)
            .and_then(|r| r.exit_code);
        let code = match (recorded, own) {
            (Some(code), _) => code,
            // A shim killed with its group (SIGKILL): the flow went with it.
            (None, Some(code)) => code,
            (None, None) => {
                return Err(std::io::Error::other(
                    "its supervisor ended without recording an exit code",
                ))
            }
        };
        // The status file stays until the run's story is told (`ProcessInfrastructure::forget`,
        // after its journal entry goes): a worker killed between reading the code and sending
        // `executed-flow-run` finds the code there again when it restarts.
        self.waiter = Waiter::Done(code);
        Ok(code)
    }

    /// Sends `signal` to the whole process group. A group that is already gone is not an error.
    pub fn signal_group(&self, signal: Signal) {
        match killpg(Pid::from_raw(self.pgid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pgid = self.pgid, %signal, error = %e, "could not signal flow-run process group")
            }
        }
    }

    /// SIGTERM to the group, then SIGKILL once `grace` has passed; returns as soon as the
    /// process has exited.
    pub async fn terminate(&mut self, grace: Duration) -> std::io::Result<i64> {
        self.terminate_or(grace, std::future::pending()).await
    }

    /// [`Self::terminate`], with the grace cut short when `sooner` completes first (a second
    /// signal to a supervisor that is already stopping its runs).
    pub async fn terminate_or(
        &mut self,
        grace: Duration,
        sooner: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<i64> {
        self.signal_group(Signal::SIGTERM);
        let exited = tokio::select! {
            code = self.wait() => Some(code),
            _ = tokio::time::sleep(grace) => None,
            _ = sooner => None,
        };
        // Children that ignored SIGTERM go with the leader.
        self.signal_group(Signal::SIGKILL);
        match exited {
            Some(code) => code,
            None => self.wait().await,
        }
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
            shim: None,
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

    /// A process that ignores SIGTERM is killed as soon as `sooner` completes, not after the
    /// (here hour-long) grace.
    #[tokio::test]
    async fn terminate_or_cuts_the_grace_short() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let script = format!("trap '' TERM; touch {}; sleep 300", ready.display());
        let mut p = FlowRunProcess::spawn(&sh(&script)).unwrap();
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
        let stop = p.terminate_or(Duration::from_secs(3600), async {
            let _ = hurried.await;
        });
        tokio::pin!(stop);
        // SIGTERM alone does not end it…
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut stop)
                .await
                .is_err(),
            "the process ignoring SIGTERM exited"
        );
        // …the hurry does, with SIGKILL.
        hurry.send(()).unwrap();
        let code = tokio::time::timeout(Duration::from_secs(30), stop)
            .await
            .expect("not killed once hurried")
            .unwrap();
        assert_eq!(code, -9);
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
