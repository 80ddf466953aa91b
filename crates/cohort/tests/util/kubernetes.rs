//! The Kubernetes side of the end-to-end tests. No control plane can run on these machines,
//! so the cluster is the Kubernetes API emulator (`cohort-kube-fake`), served on loopback in
//! the test process with a kubeconfig for the workers, whose kubelet runs each pod as a real
//! container on the local Docker Engine (on the host's network, where the tests' Prefect
//! server listens). What that cannot prove is in the README's Kubernetes section.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cohort_kube_fake::{Emulator, EmulatorConfig, Kind, Kubelet, Served};
use serde_json::Value;

use super::docker::images;
use super::examples_flows_dir;

/// The emulated cluster of this test binary, alive as long as the process.
pub struct Cluster {
    pub emulator: Emulator,
    runtime: tokio::runtime::Runtime,
    _served: Served,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// The namespace the tests' pools send their Jobs to.
pub const NAMESPACE: &str = "prefect";

pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the emulator");
        let dir = tempfile::tempdir().expect("temp dir");
        let (emulator, served) = runtime.block_on(async {
            let emulator = Emulator::new(EmulatorConfig::with_kubelet(Kubelet::Docker {
                network_host: true,
            }));
            let served = emulator
                .serve()
                .await
                .expect("serve the emulator on loopback");
            (emulator, served)
        });
        let kubeconfig = served
            .write_kubeconfig(dir.path())
            .expect("write the kubeconfig");
        Cluster {
            emulator,
            runtime,
            _served: served,
            kubeconfig,
            _dir: dir,
        }
    })
}

impl Cluster {
    /// The emulator's address.
    pub fn url(&self) -> String {
        self._served.url()
    }

    /// `KUBECONFIG` for a worker.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig.to_string_lossy().into_owned()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The Jobs of a flow run.
    pub fn jobs_of(&self, run_id: &str) -> Vec<Value> {
        self.labelled(Kind::Job, run_id)
    }

    /// The pods of a flow run.
    pub fn pods_of(&self, run_id: &str) -> Vec<Value> {
        self.labelled(Kind::Pod, run_id)
    }

    fn labelled(&self, kind: Kind, run_id: &str) -> Vec<Value> {
        self.emulator
            .list(kind, Some(NAMESPACE))
            .into_iter()
            .filter(|o| o["metadata"]["labels"]["prefect.io/flow-run-id"] == run_id)
            .collect()
    }

    /// Polls until `check` finds something in the cluster.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Option<T>,
    ) -> T {
        super::poll(what, timeout, Duration::from_millis(200), check)
    }

    /// Deletes a run's Jobs and waits until their pods, and so their containers, are gone:
    /// the end of every test, so nothing is left on the Engine.
    pub fn clean_up(&self, run_id: &str) {
        for job in self.jobs_of(run_id) {
            let name = job["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let _ = self.emulator.delete(
                Kind::Job,
                NAMESPACE,
                &name,
                &cohort_kube_fake::DeleteOptions {
                    grace_period_seconds: Some(0),
                    propagation_policy: Some(cohort_kube_fake::PropagationPolicy::Foreground),
                    ..Default::default()
                },
            );
        }
        self.wait_for("the run's pods to be gone", Duration::from_secs(60), || {
            (self.jobs_of(run_id).is_empty() && self.pods_of(run_id).is_empty()).then_some(())
        });
    }
}

/// Prefect's image with `examples/flows` copied in at the same path, as a Kubernetes user
/// bakes flow code into an image (no volume of the machine is mounted into a pod). Built
/// once per binary from the local Prefect test image, no registry needed.
pub fn flows_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let (prefect, _) = images();
        let dir = examples_flows_dir();
        let flows = std::fs::read(dir.join("flows.py")).expect("examples/flows/flows.py");
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (prefect, &dir, &flows).hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let tag = format!("cohort-test/prefect-flows:{key}");
        let have = Command::new("docker")
            .args(["image", "inspect", &tag])
            .output()
            .expect("run docker (is the Docker CLI installed?)");
        if !have.status.success() {
            let dockerfile = format!("FROM {prefect}\nCOPY . {}/\n", dir.display());
            let mut build = Command::new("docker")
                .args(["build", "-q", "-t", &tag, "-f-", "."])
                .current_dir(&dir)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run docker build");
            use std::io::Write as _;
            build
                .stdin
                .take()
                .unwrap()
                .write_all(dockerfile.as_bytes())
                .unwrap();
            let out = build.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "docker build of {tag} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tag
    })
}
