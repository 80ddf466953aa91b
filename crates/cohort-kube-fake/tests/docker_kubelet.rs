//! The Docker kubelet: pods run as containers on the local Docker Engine. Needs the Engine
//! and builds its test image with `scripts/docker-test-images.sh`; fails loudly without
//! either.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cohort_kube_fake::{
    DeleteOptions, Emulator, EmulatorConfig, Kind, Kubelet, PropagationPolicy, EMULATOR_LABEL,
    POD_UID_LABEL,
};
use common::{condition, name_of, within};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};
use kube::Client;
use serde_json::{json, Value};

/// The busybox test image's tag, built (once per test binary) by the repository's script.
fn busybox() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/docker-test-images.sh"
        );
        let out = Command::new("bash")
            .arg(script)
            .arg("busybox")
            .output()
            .expect("run scripts/docker-test-images.sh (is bash installed?)");
        assert!(
            out.status.success(),
            "scripts/docker-test-images.sh failed (is the Docker Engine running?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("busybox "))
            .unwrap_or_else(|| panic!("no busybox image in:\n{stdout}"))
            .trim()
            .to_owned()
    })
}

/// Container ids with a label, through the docker CLI (an independent view of the Engine).
fn containers_with(label: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .output()
        .expect("run docker (is the Docker CLI installed?)");
    assert!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn docker_emulator() -> Emulator {
    Emulator::new(EmulatorConfig::with_kubelet(Kubelet::Docker {
        network_host: false,
    }))
}

/// A Job with one container running `sh -c <script>`.
fn sh_job(prefix: &str, script: &str, image: &str) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": prefix},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": image, "command": ["sh", "-c", script]}]
            }}
        }
    })
}

/// Creates the Job and waits for its pod to satisfy `done`; the pod.
async fn run_job(
    emulator: &Emulator,
    job: Value,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (String, Value) {
    let job = emulator
        .create(Kind::Job, "default", job)
        .expect("the Job is created");
    let job_name = name_of(&job);
    let pod = within(
        what,
        emulator.wait_until(Duration::from_secs(60), |e| {
            e.pods("default")
                .into_iter()
                .find(|p| p["metadata"]["labels"]["job-name"] == job_name.as_str() && done(p))
        }),
    )
    .await
    .unwrap_or_else(|| panic!("{what}: {:#?}", emulator.pods("default")));
    (job_name, pod)
}

fn phase_is(phase: &'static str) -> impl Fn(&Value) -> bool {
    move |p: &Value| p["status"]["phase"] == phase
}

fn terminated(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]["state"]["terminated"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_container_fails_the_pod_with_its_exit_code_and_logs() {
    let emulator = docker_emulator();
    let (job, pod) = run_job(
        &emulator,
        sh_job("fail-", "echo hi; exit 3", busybox()),
        "the pod fails",
        phase_is("Failed"),
    )
    .await;
    let t = terminated(&pod);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(3), Some("Error"))
    );
    assert!(t["startedAt"].is_string() && t["finishedAt"].is_string());
    assert!(pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap()
        .starts_with("docker://"));

    let pods: Api<Pod> = Api::namespaced(Client::new(emulator.service(), "default"), "default");
    let logs = pods
        .logs(&name_of(&pod), &LogParams::default())
        .await
        .unwrap();
    assert_eq!(logs, "hi\n");
    let tail = pods
        .logs(
            &name_of(&pod),
            &LogParams {
                tail_lines: Some(1),
                timestamps: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        tail.ends_with(" hi\n") && tail.starts_with("20"),
        "{tail:?}"
    );

    let failed = within(
        "the Job fails",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Job, "default", &job)
                .filter(|j| condition(j, "Failed").is_some())
        }),
    )
    .await
    .unwrap();
    assert_eq!(failed["status"]["failed"], 1);
    emulator.shutdown().await;
    assert!(containers_with(&format!("{EMULATOR_LABEL}={}", emulator.id())).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeding_container_completes_the_job() {
    let emulator = docker_emulator();
    let (job, pod) = run_job(
        &emulator,
        sh_job("ok-", "exit 0", busybox()),
        "the pod succeeds",
        phase_is("Succeeded"),
    )
    .await;
    let t = terminated(&pod);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(0), Some("Completed"))
    );
    let complete = within(
        "the Job completes",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Job, "default", &job)
                .filter(|j| condition(j, "Complete").is_some())
        }),
    )
    .await
    .unwrap();
    assert_eq!(complete["status"]["succeeded"], 1);
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_image_pull_backoff_without_a_container() {
    let emulator = docker_emulator();
    let waiting = |reason: &'static str| {
        move |p: &Value| p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == reason
    };
    let (_, pod) = run_job(
        &emulator,
        sh_job("pull-", "true", "cohort-test/does-not-exist:1"),
        "ErrImagePull",
        waiting("ErrImagePull"),
    )
    .await;
    let message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap();
    assert!(
        message
            .contains("failed to pull and unpack image \"docker.io/cohort-test/does-not-exist:1\""),
        "{message}"
    );
    let pod = within(
        "ImagePullBackOff",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Pod, "default", &name_of(&pod))
                .filter(|p| waiting("ImagePullBackOff")(p))
        }),
    )
    .await
    .unwrap();
    assert_eq!(pod["status"]["phase"], "Pending");
    let message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.starts_with("Back-off pulling image \"cohort-test/does-not-exist:1\""),
        "{message}"
    );
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    assert!(containers_with(&format!("{POD_UID_LABEL}={uid}")).is_empty());

    // imagePullPolicy Always fails the same way, even for an image the Engine has.
    let mut always = sh_job("always-", "true", busybox());
    always["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
    run_job(
        &emulator,
        always,
        "ErrImagePull with Always",
        waiting("ErrImagePull"),
    )
    .await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limit_is_enforced_and_reported_as_oom_killed() {
    let emulator = docker_emulator();
    let mut job = sh_job(
        "oom-",
        "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived",
        busybox(),
    );
    job["spec"]["template"]["spec"]["containers"][0]["resources"] =
        json!({"limits": {"memory": "8Mi"}});
    // The Engine sets `OOMKilled` from containerd's OOM event, and once in a while (2 CI runs
    // in several hundred kills, never reproduced at will) that event is lost: the container
    // exits 137 with `OOMKilled` false, and the emulator, reporting what the Engine says,
    // gives `Error`. A second job then is a fresh kill; two lost events in a row, or an
    // emulator that never says `OOMKilled`, still fail.
    let oom = || async {
        let (_, pod) = run_job(
            &emulator,
            job.clone(),
            "the pod is OOM-killed",
            phase_is("Failed"),
        )
        .await;
        let t = terminated(&pod);
        let got = (
            t["exitCode"].as_i64(),
            t["reason"].as_str().map(str::to_owned),
        );
        (got, pod)
    };
    let (mut got, mut pod) = oom().await;
    if got == (Some(137), Some("Error".to_owned())) {
        eprintln!("the Engine did not report the OOM kill (exit 137, Error); once more");
        (got, pod) = oom().await;
    }
    assert_eq!(got, (Some(137), Some("OOMKilled".to_owned())), "{pod:#}");
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_comes_from_values_and_secrets() {
    let emulator = docker_emulator();
    emulator
        .create(
            Kind::Secret,
            "default",
            json!({"metadata": {"name": "creds"}, "stringData": {"token": "s3cret", "OTHER": "o"}}),
        )
        .unwrap();
    let mut job = sh_job("env-", "echo \"$PLAIN $TOKEN $P_OTHER $POD\"", busybox());
    job["spec"]["template"]["spec"]["containers"][0]["env"] = json!([
        {"name": "PLAIN", "value": "plain"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]);
    job["spec"]["template"]["spec"]["containers"][0]["envFrom"] =
        json!([{"secretRef": {"name": "creds"}, "prefix": "P_"}]);
    let (_, pod) = run_job(&emulator, job, "the pod succeeds", phase_is("Succeeded")).await;
    let pods: Api<Pod> = Api::namespaced(Client::new(emulator.service(), "default"), "default");
    let logs = pods
        .logs(&name_of(&pod), &LogParams::default())
        .await
        .unwrap();
    assert_eq!(logs, format!("plain s3cret o {}\n", name_of(&pod)));

    // A missing Secret is the kubelet's CreateContainerConfigError.
    let mut job = sh_job("noenv-", "true", busybox());
    job["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}]);
    let (_, pod) = run_job(&emulator, job, "CreateContainerConfigError", |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            == "CreateContainerConfigError"
    })
    .await;
    assert_eq!(
        pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
        "secret \"missing\" not found"
    );
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_stops_the_container_within_the_grace_period() {
    let emulator = docker_emulator();
    // As PID 1, busybox sh ignores SIGTERM, so only the SIGKILL after the grace ends it.
    let (job, pod) = run_job(
        &emulator,
        sh_job("sleepy-", "sleep 300", busybox()),
        "the pod runs",
        phase_is("Running"),
    )
    .await;
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    assert_eq!(containers_with(&format!("{POD_UID_LABEL}={uid}")).len(), 1);
    let held = emulator
        .delete(
            Kind::Job,
            "default",
            &job,
            &DeleteOptions {
                grace_period_seconds: Some(1),
                propagation_policy: Some(PropagationPolicy::Foreground),
                ..DeleteOptions::default()
            },
        )
        .unwrap()
        .expect("the Job waits for its pod");
    assert_eq!(held["metadata"]["finalizers"][0], "foregroundDeletion");
    let terminating = emulator.get(Kind::Pod, "default", &name_of(&pod)).unwrap();
    assert_eq!(terminating["metadata"]["deletionGracePeriodSeconds"], 1);
    within(
        "the Job and pod go",
        emulator.wait_until(common::STEP, |e| {
            (e.get(Kind::Job, "default", &job).is_none()
                && e.get(Kind::Pod, "default", &name_of(&pod)).is_none())
            .then_some(())
        }),
    )
    .await
    .expect("the Job and its pod are gone");
    within(
        "the container goes",
        emulator.wait_until(common::STEP, |_| {
            containers_with(&format!("{POD_UID_LABEL}={uid}"))
                .is_empty()
                .then_some(())
        }),
    )
    .await
    .expect("the container is removed");
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_stops_the_container_and_fails_the_pod() {
    let emulator = docker_emulator();
    let mut job = sh_job(
        "evict-",
        "trap 'exit 143' TERM; echo trapped; sleep 300 & wait",
        busybox(),
    );
    job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(5);
    let (_, pod) = run_job(&emulator, job, "the pod runs", phase_is("Running")).await;
    // Running means the container started, not that the shell has set its trap yet (a
    // SIGTERM before it would be ignored by PID 1): wait until it says so.
    let pods: Api<Pod> = Api::namespaced(Client::new(emulator.service(), "default"), "default");
    within("the trap to be set", async {
        loop {
            let logs = pods.logs(&name_of(&pod), &LogParams::default()).await;
            if logs.is_ok_and(|l| l.contains("trapped")) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    emulator
        .pod_evict(
            "default",
            &name_of(&pod),
            "The node was low on resource: memory.",
        )
        .unwrap();
    let evicted = within(
        "evicted",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Pod, "default", &name_of(&pod))
                .filter(|p| p["status"]["reason"] == "Evicted")
        }),
    )
    .await
    .unwrap();
    assert_eq!(evicted["status"]["phase"], "Failed");
    assert_eq!(
        evicted["status"]["message"],
        "The node was low on resource: memory."
    );
    assert_eq!(
        condition(&evicted, "DisruptionTarget").unwrap()["status"],
        "True"
    );
    assert_eq!(
        terminated(&evicted)["exitCode"],
        143,
        "the container honoured SIGTERM"
    );
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_leave_no_container_behind() {
    for how in ["shutdown", "drop"] {
        let emulator = docker_emulator();
        let label = format!("{EMULATOR_LABEL}={}", emulator.id());
        run_job(
            &emulator,
            sh_job("left-", "sleep 300", busybox()),
            "the pod runs",
            phase_is("Running"),
        )
        .await;
        assert_eq!(containers_with(&label).len(), 1);
        match how {
            "shutdown" => emulator.shutdown().await,
            _ => drop(emulator),
        }
        assert!(
            containers_with(&label).is_empty(),
            "{how} left containers behind"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followed_logs_stream_until_the_container_exits() {
    use http_body_util::{BodyExt, Empty};
    use tower::Service;

    let emulator = docker_emulator();
    let (_, pod) = run_job(
        &emulator,
        sh_job("follow-", "echo a; sleep 1; echo b", busybox()),
        "the pod runs",
        phase_is("Running"),
    )
    .await;
    let uri = format!(
        "/api/v1/namespaces/default/pods/{}/log?follow=true",
        name_of(&pod)
    );
    let req = http::Request::get(uri)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = emulator.service().call(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = within("the followed log ends", response.into_body().collect())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "a\nb\n");
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_dead_process_are_swept_at_start() {
    // A container as a process that died without cleaning up would have left it (no
    // process has this id: it is above Linux's largest pid).
    let out = Command::new("docker")
        .args([
            "create",
            "--label",
            &format!("{EMULATOR_LABEL}=gone"),
            "--label",
            &format!("{}=999999999", cohort_kube_fake::PID_LABEL),
            busybox(),
            "true",
        ])
        .output()
        .expect("run docker (is the Docker CLI installed?)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(containers_with(&format!("{EMULATOR_LABEL}=gone")).len(), 1);
    let emulator = docker_emulator();
    within(
        "the sweep",
        emulator.wait_until(common::STEP, |_| {
            containers_with(&format!("{EMULATOR_LABEL}=gone"))
                .is_empty()
                .then_some(())
        }),
    )
    .await
    .expect("the orphan is removed");
    emulator.shutdown().await;
}
