//! The environment and names of the processes the tests and the benchmarks start.

use std::ffi::OsString;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Removes every inherited `PREFECT_*` variable, so a developer's own profile or API URL
/// cannot leak into a process started for a test or a benchmark.
pub fn scrub_prefect_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PREFECT_") {
            cmd.env_remove(&key);
        }
    }
}

/// `PATH` with the venv's `bin` first, so the flows' `python` is the venv's.
pub fn path_with_venv_first(venv_bin: &Path) -> OsString {
    let mut paths = vec![venv_bin.to_path_buf()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).expect("PATH entries are joinable")
}

/// `program worker start` as the tests and the benchmarks start a worker (Cohort's or
/// Prefect's): nothing of the caller's Prefect settings, the server's API URL, its own
/// `PREFECT_HOME`, the venv first on `PATH` (the flows' `python`), no bytecode written next
/// to the flows, output to files, and its own process group (a terminal's Ctrl-C does not
/// reach it, and the server's watchdog can kill it). The caller adds the flags and any more
/// environment.
pub fn worker_command(
    program: &Path,
    venv_bin: &Path,
    api_url: &str,
    home: &Path,
    stdout: File,
    stderr: File,
) -> Command {
    let mut cmd = Command::new(program);
    scrub_prefect_env(&mut cmd);
    cmd.args(["worker", "start"])
        .env("PREFECT_API_URL", api_url)
        .env("PREFECT_HOME", home)
        .env("PATH", path_with_venv_first(venv_bin))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    cmd
}

/// A port free on 127.0.0.1 just now (it can be taken before it is bound: callers retry).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// `slugify` as Prefect applies it to worker names (python-slugify's defaults), for ASCII
/// names: lower-case, runs of anything but `[a-z0-9]` become one `-`, none at either end.
pub fn slugify(name: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
    }
    out
}

/// The Python of a pinned Prefect venv: `$<variable>/bin/python`, or the venv
/// `scripts/prefect-venv.sh <flavour>` makes (or finds) when the variable is unset. A venv that
/// cannot be had fails the caller loudly: the differential tests are only worth something while
/// they run against Prefect's code.
pub fn venv_python(flavour: &str, variable: &str) -> PathBuf {
    let venv = match std::env::var_os(variable) {
        Some(venv) if !venv.is_empty() => PathBuf::from(venv),
        _ => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let out = Command::new("bash")
                .arg("scripts/prefect-venv.sh")
                .arg(flavour)
                .current_dir(&repo)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run bash scripts/prefect-venv.sh {flavour}: {e}")
                });
            assert!(
                out.status.success(),
                "scripts/prefect-venv.sh {flavour} failed ({}); set {variable} to the venv:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8(out.stdout).expect("the venv path is UTF-8");
            PathBuf::from(
                stdout
                    .lines()
                    .last()
                    .expect("scripts/prefect-venv.sh printed no venv path")
                    .trim(),
            )
        }
    };
    let python = venv.join("bin").join("python");
    assert!(
        python.is_file(),
        "no Python at {} ({variable} or scripts/prefect-venv.sh {flavour})",
        python.display()
    );
    python
}

#[cfg(test)]
mod tests {
    use super::slugify;

    #[test]
    fn slugs_as_prefect_makes_them() {
        assert_eq!(slugify("Demo Worker"), "demo-worker");
        assert_eq!(slugify("  Trial Outage-4d062604 "), "trial-outage-4d062604");
        assert_eq!(slugify("a__b!!C"), "a-b-c");
    }
}
