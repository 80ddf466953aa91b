//! The Docker side of the end-to-end tests: the images they run (built here, no registry is
//! reachable) and the Engine's view of a run's containers, through the `docker` CLI.

use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use super::examples_flows_dir;

/// The tags `scripts/docker-test-images.sh` printed, by image.
pub fn images() -> &'static (String, String) {
    static IMAGES: OnceLock<(String, String)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/docker-test-images.sh"
        );
        let out = Command::new("bash")
            .arg(script)
            .arg("all")
            .output()
            .expect("run scripts/docker-test-images.sh (is bash installed?)");
        assert!(
            out.status.success(),
            "scripts/docker-test-images.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tag = |what: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{what} ")))
                .unwrap_or_else(|| panic!("no {what} image in:\n{stdout}"))
                .trim()
                .to_owned()
        };
        (tag("prefect"), tag("busybox"))
    })
}

pub fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker (is the Docker CLI installed?)")
}

pub fn inspect(container: &str) -> Option<Value> {
    let out = docker(&["inspect", container]);
    out.status
        .success()
        .then(|| serde_json::from_slice::<Value>(&out.stdout).expect("inspect is JSON")[0].clone())
}

/// The containers the engine has for a run, by Prefect's label.
pub fn containers_of(run_id: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.prefect.flow-run-id={run_id}"),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `examples/flows` bind-mounted read-only at the same path, so a deployment's
/// `set_working_directory` pull step finds the flows inside the container.
pub fn flow_mount() -> String {
    let dir = examples_flows_dir().to_string_lossy().into_owned();
    format!("{dir}:{dir}:ro")
}
