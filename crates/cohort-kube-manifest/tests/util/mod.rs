//! Finding Prefect's own code for the differential tests: the Python of the venv with
//! prefect==3.8.8 and prefect-kubernetes==0.8.0.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `$COHORT_PREFECT_KUBERNETES_VENV/bin/python`, or the venv `scripts/prefect-venv.sh
/// kubernetes` makes (or finds) when the variable is unset. Missing Python fails the test: the
/// goldens are only worth something while they are checked against Prefect.
pub fn kubernetes_python() -> PathBuf {
    let venv = match std::env::var_os("COHORT_PREFECT_KUBERNETES_VENV") {
        Some(venv) if !venv.is_empty() => PathBuf::from(venv),
        _ => {
            let repo = crate_dir().join("../..");
            let out = Command::new("bash")
                .arg("scripts/prefect-venv.sh")
                .arg("kubernetes")
                .current_dir(&repo)
                .output()
                .expect("cannot run bash scripts/prefect-venv.sh kubernetes");
            assert!(
                out.status.success(),
                "scripts/prefect-venv.sh kubernetes failed ({}); set COHORT_PREFECT_KUBERNETES_VENV \
                 to a venv with prefect==3.8.8 and prefect-kubernetes==0.8.0:\n{}",
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
        "no Python at {} (COHORT_PREFECT_KUBERNETES_VENV or scripts/prefect-venv.sh kubernetes)",
        python.display()
    );
    python
}
