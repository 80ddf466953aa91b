//! kubectl (a real client-go) against the loopback server: the emulator's wire format must
//! be acceptable to it. Needs `kubectl` on the PATH; fails loudly without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_kube_fake::{Emulator, EmulatorConfig, Kind, Kubelet};
use common::{name_of, within};
use serde_json::Value;
use tokio::process::Command;

const JOB_YAML: &str = "\
apiVersion: batch/v1
kind: Job
metadata:
  generateName: kubectl-job-
  labels:
    app: conformance
spec:
  backoffLimit: 0
  template:
    metadata:
      labels:
        app: conformance
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: busybox:1.36
        command: [\"sh\", \"-c\", \"echo hello\"]
";

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl and returns its stdout, failing the test on a non-zero exit.
    async fn run(&self, args: &[&str]) -> String {
        let out = within(&format!("kubectl {args:?}"), self.command(args).output())
            .await
            .unwrap_or_else(|e| {
                panic!("cannot run kubectl (is it installed and on the PATH?): {e}")
            });
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_creates_lists_reads_logs_and_deletes_in_the_foreground() {
    let emulator = Emulator::new(EmulatorConfig::with_kubelet(Kubelet::Scripted {
        auto_schedule: true,
    }));
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl {
        kubeconfig: served.write_kubeconfig(dir.path()).unwrap(),
        cache: dir.path().join("cache"),
    };
    let manifest = write(dir.path(), "job.yaml", JOB_YAML);

    // `create` (not `apply`): a Job with generateName has no name to apply to.
    let created = kubectl.run(&["create", "-f", &manifest]).await;
    let job = created
        .trim()
        .strip_prefix("job.batch/")
        .and_then(|s| s.strip_suffix(" created"))
        .unwrap_or_else(|| panic!("unexpected output: {created:?}"))
        .to_owned();
    assert!(job.starts_with("kubectl-job-"));
    let create = emulator
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(create.path, "/apis/batch/v1/namespaces/default/jobs");
    assert_eq!(create.query_param("fieldValidation"), Some("Strict"));

    let pod = within(
        "the pod",
        emulator.wait_for_pod("default", "app=conformance", common::STEP),
    )
    .await
    .expect("the Job controller makes a pod");
    let pod = name_of(&pod);
    emulator.pod_running("default", &pod).unwrap();
    emulator.set_pod_log("default", &pod, "hello\nworld\n");

    let listed: Value = serde_json::from_str(
        &kubectl
            .run(&["get", "pods", "-l", "app=conformance", "-o", "json"])
            .await,
    )
    .unwrap();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["labels"]["job-name"], job);
    assert_eq!(items[0]["status"]["phase"], "Running");
    assert!(kubectl
        .run(&["get", "pods", "-l", "app!=conformance", "-o", "name"])
        .await
        .trim()
        .is_empty());
    let jobs = kubectl.run(&["get", "jobs"]).await;
    assert!(jobs.contains(&job), "{jobs}");
    assert_eq!(kubectl.run(&["logs", &pod]).await, "hello\nworld\n");
    assert_eq!(kubectl.run(&["logs", &pod, "--tail=1"]).await, "world\n");

    // Foreground deletion waits for the pod, which is running and so terminating until
    // its container exits.
    let mut delete = kubectl
        .command(&["delete", "job", &job, "--cascade=foreground", "--wait=true"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("cannot run kubectl (is it installed and on the PATH?)");
    let terminating = within(
        "the Job is held by its pod",
        emulator.wait_until(common::STEP, |e| {
            let pod = e.get(Kind::Pod, "default", &pod)?;
            pod["metadata"]["deletionTimestamp"].as_str()?;
            e.get(Kind::Job, "default", &job)
        }),
    )
    .await
    .expect("the Job waits for its pod");
    assert_eq!(
        terminating["metadata"]["finalizers"][0],
        "foregroundDeletion"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        delete.try_wait().unwrap().is_none(),
        "kubectl waits while the pod terminates"
    );

    emulator.pod_exit("default", &pod, 0, "Completed").unwrap();
    let status = within("kubectl delete --wait", delete.wait())
        .await
        .unwrap();
    assert!(status.success());
    assert!(emulator.get(Kind::Job, "default", &job).is_none());
    assert!(emulator.get(Kind::Pod, "default", &pod).is_none());
    let delete = emulator
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE")
        .unwrap();
    assert_eq!(delete.body.unwrap()["propagationPolicy"], "Foreground");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reports_missing_things_as_the_apiserver_words_them() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl {
        kubeconfig: served.write_kubeconfig(dir.path()).unwrap(),
        cache: dir.path().join("cache"),
    };
    let out = kubectl
        .command(&["get", "job", "nope"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("jobs.batch \"nope\" not found"), "{stderr}");

    let manifest = write(dir.path(), "job.yaml", JOB_YAML);
    let out = kubectl
        .command(&["create", "-n", "nowhere", "-f", &manifest])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("namespaces \"nowhere\" not found"),
        "{stderr}"
    );
    let namespaces = kubectl.run(&["get", "namespaces", "-o", "name"]).await;
    assert!(namespaces.contains("namespace/prefect"), "{namespaces}");
}
