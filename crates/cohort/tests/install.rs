//! `pip install`: the wheel `pyproject.toml` describes (maturin, binary packaging) is built
//! from this checkout, installed into a fresh virtualenv, and the `cohort` it puts in that
//! venv's `bin` serves a process pool whose real flow runs to Completed against a real
//! Prefect 3.8.8 server.
//!
//! maturin comes from PyPI into a temporary venv (pinned by `constraints/maturin.txt`); it
//! builds with cargo's `dev` profile in this workspace's target directory, where the test
//! command has built everything already, so it only packages the binary.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use util::{unique, DeploySpec, Worker, WorkerKind};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `program` with `args`; panics with its output when it fails.
fn run(program: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh virtualenv at `dir` made by the machine's Python 3.
fn venv(dir: &Path) -> PathBuf {
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    run(
        Path::new(&python),
        &["-m", "venv", &dir.to_string_lossy()],
        Path::new("/"),
    );
    dir.join("bin")
}

#[test]
fn the_pip_installed_binary_runs_a_real_flow() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let root = repo_root();

    // The builder.
    let tools = venv(&scratch.path().join("tools"));
    let constraints = root.join("constraints/maturin.txt");
    run(
        &tools.join("pip"),
        &[
            "install",
            "-q",
            "-c",
            &constraints.to_string_lossy(),
            "maturin",
        ],
        &root,
    );
    let wheels = scratch.path().join("wheels");
    // The target directory the test binary was built in (`…/debug/deps/<test>`).
    let target = std::env::current_exe()
        .expect("the test binary's path")
        .ancestors()
        .nth(3)
        .expect("target/debug/deps")
        .to_path_buf();
    let built = Command::new(tools.join("maturin"))
        .args([
            "build",
            "--profile",
            "dev",
            "--compatibility",
            "linux",
            "-o",
        ])
        .arg(&wheels)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&root)
        .output()
        .expect("run maturin");
    assert!(
        built.status.success(),
        "maturin build failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let wheel = std::fs::read_dir(&wheels)
        .expect("the wheel directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("maturin wrote a wheel");

    // A fresh venv gets it from the wheel alone.
    let installed = venv(&scratch.path().join("fresh"));
    run(
        &installed.join("pip"),
        &[
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            &wheel.to_string_lossy(),
        ],
        &root,
    );
    let cohort = installed.join("cohort");
    let version = run(&cohort, &["--version"], &root);
    assert!(
        version.trim() == format!("cohort {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );

    // It serves a process pool; the flow's Python is the Prefect venv's, found on PATH.
    let s = util::server();
    let pool = unique("pip");
    s.create_work_pool(&pool, "process");
    let _worker = Worker::builder(WorkerKind::Cohort, &["--pool", &pool, "--type", "process"])
        .program(&cohort)
        .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"name": "pip"}));
    let state = s.wait_for_final_state(&run.id, Duration::from_secs(240));
    assert_eq!(state["type"], "COMPLETED", "{state}");
}
