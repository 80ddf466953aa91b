//! The two workers under test, started identically: `prefect worker start` from the
//! Prefect venv, and `cohort worker start` (the release build), each in its own process
//! group with a fresh `PREFECT_HOME`, the same environment and the same flags.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgrp, Pid};
use serde::Serialize;
use serde_json::Value;

use crate::procfs;
use crate::server::{parse_time, PrefectServer};
use cohort_testkit::{slugify, worker_command};

/// `prefect.worker.started`, emitted once the worker polls.
pub const EVENT_STARTED: &str = "prefect.worker.started";
/// `prefect.worker.submitted-flow-run`, emitted when the worker hands a run to its process.
pub const EVENT_SUBMITTED: &str = "prefect.worker.submitted-flow-run";
/// `prefect.worker.executed-flow-run`, emitted when the worker is done with a run.
pub const EVENT_EXECUTED: &str = "prefect.worker.executed-flow-run";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerKind {
    Python,
    Cohort,
}

impl WorkerKind {
    pub fn label(self) -> &'static str {
        match self {
            WorkerKind::Python => "python",
            WorkerKind::Cohort => "cohort",
        }
    }

    /// Who goes first in repetition `rep`: alternate, so neither always meets a server
    /// warmed (or loaded) by the other.
    pub fn order(rep: usize) -> [WorkerKind; 2] {
        if rep.is_multiple_of(2) {
            [WorkerKind::Python, WorkerKind::Cohort]
        } else {
            [WorkerKind::Cohort, WorkerKind::Python]
        }
    }
}

/// Where the worker programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    pub venv: PathBuf,
    pub cohort: PathBuf,
    /// A Prefect 3.8.8 venv with prefect-docker 0.7.4 (`scripts/prefect-venv.sh docker`),
    /// for Prefect's Docker worker.
    pub docker_venv: Option<PathBuf>,
    /// A Prefect 3.8.8 venv with prefect-kubernetes 0.8.0 (`scripts/prefect-venv.sh
    /// kubernetes`), for Prefect's Kubernetes worker.
    pub kubernetes_venv: Option<PathBuf>,
    /// Where a stopped worker's stdout and stderr are copied (`--keep-logs`).
    pub keep_logs: Option<PathBuf>,
}

/// A running worker. Dropping it stops it (and everything in its tree).
pub struct Worker<'s> {
    pub kind: WorkerKind,
    pub name: String,
    /// `process`, `docker` or `kubernetes`.
    pub worker_type: &'static str,
    /// Wall-clock time just before `exec`.
    pub spawned_at: DateTime<Utc>,
    server: &'s PrefectServer,
    child: Child,
    status: Option<ExitStatus>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    keep_logs: Option<PathBuf>,
    _home: tempfile::TempDir,
}

impl<'s> Worker<'s> {
    /// `<worker> worker start --pool <pool> --type process --name <name>`.
    pub fn spawn(
        server: &'s PrefectServer,
        programs: &Programs,
        kind: WorkerKind,
        pool: &str,
        name: &str,
    ) -> Result<Worker<'s>> {
        Self::spawn_with_env(server, programs, kind, pool, name, &[])
    }

    /// [`Worker::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        server: &'s PrefectServer,
        programs: &Programs,
        kind: WorkerKind,
        pool: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<Worker<'s>> {
        Self::spawn_typed(server, programs, kind, "process", pool, name, env)
    }

    /// `<worker> worker start --pool <pool> --type <worker_type> --name <name>`; Prefect's
    /// Docker and Kubernetes workers run from the venvs that have their integration.
    pub fn spawn_typed(
        server: &'s PrefectServer,
        programs: &Programs,
        kind: WorkerKind,
        worker_type: &'static str,
        pool: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<Worker<'s>> {
        let venv = match (kind, worker_type) {
            (WorkerKind::Python, "docker") => programs.docker_venv.as_ref().context(
                "Prefect's Docker worker needs a venv with prefect-docker (--docker-venv)",
            )?,
            (WorkerKind::Python, "kubernetes") => programs.kubernetes_venv.as_ref().context(
                "Prefect's Kubernetes worker needs a venv with prefect-kubernetes \
                 (--kubernetes-venv)",
            )?,
            _ => &programs.venv,
        };
        let venv_bin = venv.join("bin");
        let home = tempfile::Builder::new()
            .prefix("worker-home-")
            .tempdir_in(server.scratch_dir())?;
        let stdout_path = home.path().join("stdout.log");
        let stderr_path = home.path().join("stderr.log");
        let program = match kind {
            WorkerKind::Python => venv_bin.join("prefect"),
            WorkerKind::Cohort => programs.cohort.clone(),
        };
        let mut cmd = worker_command(
            &program,
            &venv_bin,
            server.api_url(),
            &home.path().join("prefect"),
            File::create(&stdout_path)?,
            File::create(&stderr_path)?,
        );
        cmd.args(["--pool", pool, "--type", worker_type, "--name", name]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let spawned_at = Utc::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {} worker", kind.label()))?;
        server.register_worker_pgid(child.id() as i32, true);
        Ok(Worker {
            kind,
            name: name.to_owned(),
            worker_type,
            spawned_at,
            server,
            child,
            status: None,
            stderr_path,
            stdout_path,
            keep_logs: programs.keep_logs.clone(),
            _home: home,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `prefect.worker.<type>.<slug of the name>`, the resource of its events.
    pub fn resource_id(&self) -> String {
        format!(
            "prefect.worker.{}.{}",
            self.worker_type,
            slugify(&self.name)
        )
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                self.server.register_worker_pgid(self.pid(), false);
            }
        }
        self.status
    }

    /// Fail with the worker's output if it has exited.
    pub fn ensure_alive(&mut self) -> Result<()> {
        if let Some(s) = self.exited() {
            bail!(
                "the {} worker exited ({}); last output:\n{}",
                self.kind.label(),
                describe_status(s),
                self.output_tail(20)
            );
        }
        Ok(())
    }

    /// Wait for its `prefect.worker.started` event; returns the event's `occurred`.
    pub fn wait_started(&mut self, timeout: Duration) -> Result<DateTime<Utc>> {
        let deadline = Instant::now() + timeout;
        let rid = self.resource_id();
        loop {
            self.ensure_alive()?;
            let events = self
                .server
                .read_events(&rid, &[EVENT_STARTED], self.spawned_at)?;
            if let Some(t) = events.first().and_then(|e| parse_time(&e["occurred"])) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {EVENT_STARTED} from the {} worker after {timeout:?}; output:\n{}",
                    self.kind.label(),
                    self.output_tail(20)
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// Its `submitted-flow-run` events since it started: flow-run id → `occurred`.
    pub fn submitted_runs(&self) -> Result<Vec<(String, DateTime<Utc>)>> {
        let events =
            self.server
                .read_events(&self.resource_id(), &[EVENT_SUBMITTED], self.spawned_at)?;
        Ok(events.iter().filter_map(run_occurred).collect())
    }

    pub fn count_submitted(&self) -> Result<u64> {
        self.server
            .count_events(&self.resource_id(), &[EVENT_SUBMITTED], self.spawned_at)
    }

    /// The last `n` lines of stdout and of stderr.
    pub fn output_tail(&self, n: usize) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            tail(&self.stdout_path, n),
            tail(&self.stderr_path, n)
        )
    }

    /// Lines of its output that look like errors (tracebacks, `ERROR`, HTTP 5xx).
    pub fn error_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for path in [&self.stdout_path, &self.stderr_path] {
            for line in read_lossy(path).lines() {
                let l = line.to_ascii_lowercase();
                if l.contains("traceback")
                    || l.contains(" error ")
                    || l.contains("error:")
                    || l.contains("| error")
                    || l.contains("500 internal server error")
                    || l.contains("503 service unavailable")
                {
                    out.push(line.chars().take(300).collect());
                }
            }
        }
        out
    }

    /// Kill the process groups of the worker's descendants (flow-run processes run in
    /// groups of their own), then anything left of its tree. The worker itself is spared.
    /// Returns how many processes were signalled.
    pub fn kill_descendants(&self) -> usize {
        let own = getpgrp().as_raw();
        let worker_pgid = self.pid();
        let tree = procfs::tree(self.pid());
        let mut groups: Vec<i32> = tree
            .iter()
            .skip(1)
            .map(|p| p.pgid)
            .filter(|g| *g > 1 && *g != own && *g != worker_pgid)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        for g in &groups {
            // killpg(2), never `/usr/bin/kill -KILL -<pgid>`: procps parses a negative
            // pgid without `--` as options.
            let _ = killpg(Pid::from_raw(*g), Signal::SIGKILL);
        }
        for p in tree.iter().skip(1) {
            if p.pid > 1 {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        tree.len().saturating_sub(1)
    }

    /// SIGTERM, then SIGKILL to the whole process group after `grace`; returns how it
    /// ended.
    pub fn stop(&mut self, grace: Duration) -> String {
        if let Some(s) = self.exited() {
            return format!("had exited: {}", describe_status(s));
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                self.kill_group();
                return format!("stopped on SIGTERM: {}", describe_status(s));
            }
            sleep(Duration::from_millis(50));
        }
        self.kill_descendants();
        self.kill_group();
        let _ = self.child.wait();
        self.server.register_worker_pgid(self.pid(), false);
        format!("SIGKILLed after {grace:?}")
    }

    fn kill_group(&self) {
        let pgid = self.pid();
        if pgid > 1 && pgid != getpgrp().as_raw() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill_descendants();
            self.stop(Duration::from_secs(5));
        }
        if let Some(dir) = &self.keep_logs {
            let stem = format!(
                "{}-{}",
                self.spawned_at.format("%Y%m%dT%H%M%S%.3f"),
                self.name
            );
            for (from, stream) in [(&self.stdout_path, "stdout"), (&self.stderr_path, "stderr")] {
                let to = dir.join(format!("{stem}.{stream}.log"));
                if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::copy(from, &to))
                {
                    eprintln!("cohort-bench: cannot keep {}: {e}", to.display());
                }
            }
        }
    }
}

/// The flow run an event relates (`prefect.flow-run.<id>`), and when the event occurred.
pub fn run_occurred(event: &Value) -> Option<(String, DateTime<Utc>)> {
    let occurred = parse_time(&event["occurred"])?;
    let id = event["related"].as_array()?.iter().find_map(|r| {
        r["prefect.resource.id"]
            .as_str()?
            .strip_prefix("prefect.flow-run.")
            .map(str::to_owned)
    })?;
    Some((id, occurred))
}

pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s}"),
    }
}

fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail(path: &Path, n: usize) -> String {
    let text = read_lossy(path);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_of_bench_names() {
        assert_eq!(
            slugify("bench python burst r0 1a2b"),
            "bench-python-burst-r0-1a2b"
        );
        assert_eq!(slugify("Bench_Cohort--X"), "bench-cohort-x");
    }

    #[test]
    fn alternating_order() {
        assert_eq!(WorkerKind::order(0)[0], WorkerKind::Python);
        assert_eq!(WorkerKind::order(1)[0], WorkerKind::Cohort);
    }
}
