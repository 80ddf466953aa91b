//! The per-run supervisor ("shim"): a tiny process between the worker and a flow-run process
//! that outlives the worker and records how the flow ended, as containerd's shim does for a
//! container. A worker that is killed and restarted finds each run's status file, re-adopts
//! the runs still alive and learns the true exit code of those that ended meanwhile.
//!
//! The worker starts `cohort __shim --status FILE -- PROGRAM ARGS…` as the leader of a new
//! process group; the shim starts the flow process in that group with the environment,
//! working directory and output it was given, writes the flow's pid to `FILE`, waits, and
//! writes the exit code. Stopping the group (SIGTERM, SIGINT, SIGHUP) reaches the flow while
//! the shim, which catches those signals, stays to record the outcome; only SIGKILL takes both.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a shim has recorded about its flow process; written atomically (temp file + rename),
/// first when the flow starts, again when it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimStatus {
    /// The shim's own pid: the process group of the run.
    pub shim_pid: u32,
    /// The flow process, once started.
    pub flow_pid: Option<u32>,
    /// Python's `returncode` convention: the exit code, or minus the signal that killed it.
    pub exit_code: Option<i64>,
    /// Why the flow process could not be started.
    pub error: Option<String>,
}

/// Where a run's status file lives, and the program that is the shim.
#[derive(Debug, Clone)]
pub struct ShimSpec {
    /// The `cohort` executable; it runs the shim as its hidden `__shim` command.
    pub exe: PathBuf,
    /// The status file of this run.
    pub status: PathBuf,
}

/// The hidden subcommand that runs [`run`].
pub const SUBCOMMAND: &str = "__shim";

/// Runs the shim: starts `program args` (environment, working directory, process group and
/// output inherited), records it in `status`, waits, records the exit code. Returns the
/// shim's own exit code: the flow's, or 128 + the signal that killed it.
pub fn run(status: &Path, program: &str, args: &[String]) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cohort shim: cannot start: {e}");
            return 125;
        }
    };
    runtime.block_on(supervise(status, program, args))
}

async fn supervise(status: &Path, program: &str, args: &[String]) -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    // Catch the group's stop signals so the shim survives them and records the outcome.
    // Caught (not ignored, not blocked) so the flow process, exec'd afterwards, starts with
    // the default dispositions and an empty mask.
    let mut caught = Vec::new();
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ] {
        match signal(kind) {
            Ok(s) => caught.push(s),
            Err(e) => eprintln!("cohort shim: cannot catch a stop signal: {e}"),
        }
    }
    let shim_pid = std::process::id();
    let mut record = ShimStatus {
        shim_pid,
        flow_pid: None,
        exit_code: None,
        error: None,
    };
    let mut child = match tokio::process::Command::new(program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            record.error = Some(format!("could not start {program:?}: {e}"));
            if let Err(e) = write_status(status, &record) {
                eprintln!("cohort shim: {e}");
            }
            // The shell's "command not found" / "not executable".
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    record.flow_pid = child.id();
    if let Err(e) = write_status(status, &record) {
        // The worker learns the pid from this file; without it the run cannot be supervised.
        eprintln!("cohort shim: {e}; stopping the flow process");
        let _ = child.kill().await;
        return 125;
    }
    let code = match child.wait().await {
        Ok(s) => exit_code(s),
        Err(e) => {
            eprintln!("cohort shim: cannot wait for the flow process: {e}");
            return 125;
        }
    };
    drop(caught);
    record.exit_code = Some(code);
    if let Err(e) = write_status(status, &record) {
        eprintln!("cohort shim: {e}");
    }
    if code < 0 {
        128 + (-code) as i32
    } else {
        code as i32
    }
}

/// Reads a status file; `None` when it is absent or not (yet) a whole record.
pub fn read_status(path: &Path) -> Option<ShimStatus> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `record` to `path` atomically: readers see the old record or the new one.
fn write_status(path: &Path, record: &ShimStatus) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", record.shim_pid));
    let json = serde_json::to_vec(record).expect("a status record serializes");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write the run status file {}: {e}", path.display())
    })
}

/// Python's `returncode` convention (Prefect reports it as the status code).
pub(crate) fn exit_code(status: std::process::ExitStatus) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as i64,
        (None, Some(signal)) => -(signal as i64),
        (None, None) => -1,
    }
}

/// When a process started, in clock ticks since boot (`/proc/<pid>/stat` field 22): with the
/// pid, it tells a re-adopted shim from an unrelated process that reused its pid. `None` when
/// the process is gone or a zombie.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state); field 22 is 19 further on.
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_of_self_and_of_nothing() {
        assert!(start_ticks(std::process::id()).is_some());
        assert_eq!(start_ticks(u32::MAX - 1), None);
    }

    #[test]
    fn the_flow_process_starts_with_default_signal_handling() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("run.json");
        let out = dir.path().join("status.txt");
        // awk itself, not a shell (a shell may reset what it inherited).
        let program = format!("/SigBlk|SigIgn/ {{ print > \"{}\" }}", out.display());
        assert_eq!(
            run(&status, "awk", &[program, "/proc/self/status".into()]),
            0
        );
        let text = std::fs::read_to_string(&out).unwrap();
        let mask = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        let (term, int, hup) = (1 << (15 - 1), 1 << (2 - 1), 1 << (1 - 1));
        for set in [mask("SigBlk:"), mask("SigIgn:")] {
            assert_eq!(set & (term | int | hup), 0, "{text}");
        }
    }

    #[test]
    fn records_pid_then_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("run.json");
        let code = run(&status, "sh", &["-c".into(), "exit 7".into()]);
        assert_eq!(code, 7);
        let record = read_status(&status).unwrap();
        assert_eq!(record.shim_pid, std::process::id());
        assert!(record.flow_pid.is_some());
        assert_eq!(record.exit_code, Some(7));
        assert_eq!(record.error, None);
    }

    #[test]
    fn a_signal_is_recorded_negated() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("run.json");
        let code = run(&status, "sh", &["-c".into(), "kill -9 $$".into()]);
        assert_eq!(code, 128 + 9);
        assert_eq!(read_status(&status).unwrap().exit_code, Some(-9));
    }

    #[test]
    fn a_missing_program_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("run.json");
        let code = run(&status, "/nonexistent/program", &[]);
        assert_eq!(code, 127);
        let record = read_status(&status).unwrap();
        assert_eq!(record.flow_pid, None);
        assert!(record
            .error
            .unwrap()
            .contains("could not start \"/nonexistent/program\""));
    }
}
