//! Finding Prefect's own code for the differential tests: the Python of the venv with
//! prefect==3.8.8 and prefect-kubernetes==0.8.0.

use std::path::{Path, PathBuf};

pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `$COHORT_PREFECT_KUBERNETES_VENV/bin/python`, or the venv `scripts/prefect-venv.sh
/// kubernetes` makes (or finds) when the variable is unset.
pub fn kubernetes_python() -> PathBuf {
    cohort_testkit::venv_python("kubernetes", "COHORT_PREFECT_KUBERNETES_VENV")
}
