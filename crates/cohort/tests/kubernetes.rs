//! End-to-end tests of `cohort worker start --type kubernetes` against a real Prefect 3.8.8
//! server and an emulated cluster: no Kubernetes control plane can run on these machines, so
//! the cluster is the Kubernetes API emulator (`cohort-kube-fake`), on loopback with a
//! kubeconfig, whose kubelet runs each pod as a real container on the local Docker Engine.
//! Real flows run in those pods (`prefect flow-run execute` in Prefect's image, built here with
//! `examples/flows` baked in) and report to the real server. Every assertion reads the outcome
//! back: states from the server, events through `POST /api/events/filter`, Jobs and pods from
//! the emulator's store.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use util::kubernetes::{cluster, flows_image, NAMESPACE};
use util::trials::{flow_run_label, EXECUTED, STATUS_CODE_LABEL};
use util::{unique, DeploySpec, Worker};

const FINAL_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the server lets a run stay Cancelling before it cancels it and sends a worker
/// the clean-up (300 s by default).
const CANCELLING_TIMEOUT_SECONDS: u64 = 15;

/// The shared server of this binary, with a short Cancelling timeout.
fn server() -> &'static util::PrefectServer {
    util::server_with_cancelling_timeout(CANCELLING_TIMEOUT_SECONDS)
}

/// A kubernetes pool created empty (the worker gives it prefect-kubernetes' template) and a
/// Cohort worker on the emulated cluster.
fn pool_and_worker(what: &str) -> (String, String, Worker) {
    let s = server();
    let pool = unique(&format!("k8s-{what}"));
    s.create_work_pool(&pool, "kubernetes");
    let name = unique(&format!("k8s-worker-{what}"));
    let worker = worker(&pool, &name, None);
    (pool, name, worker)
}

fn worker(pool: &str, name: &str, home: Option<&std::path::Path>) -> Worker {
    let mut builder = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", pool, "--type", "kubernetes", "--name", name],
    )
    .env("KUBECONFIG", &cluster().kubeconfig())
    // The namespaces to watch, as Prefect's Helm chart sets them (the pool's own default
    // namespace is `default`; these runs go to another).
    .env(
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
        NAMESPACE,
    );
    if let Some(home) = home {
        builder = builder.home(home);
    }
    builder.spawn()
}

/// The job variables of a run in the test namespace, with the flows image.
fn variables(extra: Value) -> Value {
    let mut v = json!({"image": flows_image(), "namespace": NAMESPACE});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn run_events(run_id: &str, n: usize) -> Vec<Value> {
    server().wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{run_id}")]},
               "event": {"prefix": ["prefect.worker.", "prefect.kubernetes.pod."]}}),
        n,
        Duration::from_secs(60),
    )
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

fn executed(events: &[Value]) -> &Value {
    events
        .iter()
        .find(|e| e["event"] == EXECUTED)
        .expect("an executed-flow-run event")
}

fn wait_for_state(run_id: &str, state: &str) {
    let s = server();
    util::poll(
        &format!("flow run {run_id} to be {state}"),
        FINAL_TIMEOUT,
        Duration::from_millis(500),
        || (s.read_flow_run(run_id)["state"]["type"] == state).then_some(()),
    );
}

fn state_names(run_id: &str) -> Vec<String> {
    let states = server().request(
        reqwest::Method::GET,
        &format!("/flow_run_states/?flow_run_id={run_id}"),
        None,
    );
    states
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_real_flow_runs_as_a_job_to_completed_with_prefects_events() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("ok");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(variables(
        json!({"labels": {"team": "data eng"}, "env": {"EXTRA": "1"}}),
    )));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}");

    let c = cluster();
    let jobs = c.jobs_of(&run.id);
    assert_eq!(jobs.len(), 1, "one Job per run");
    let job = &jobs[0];
    let job_name = job["metadata"]["name"].as_str().unwrap();
    // prefect-kubernetes' manifest: its labels (slugged), the env, the args.
    assert_eq!(job["metadata"]["labels"]["team"], "data-eng");
    assert_eq!(
        job["metadata"]["labels"]["prefect.io/deployment-id"],
        dep.id
    );
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["prefect", "flow-run", "execute"]));
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"EXTRA") && env.contains(&"PREFECT__FLOW_RUN_ID"),
        "{env:?}"
    );
    assert_eq!(
        s.read_flow_run(&run.id)["infrastructure_pid"],
        format!("{NAMESPACE}:{job_name}")
    );

    // The worker's events, and the observer's pod events, exactly three as Prefect's
    // integration test expects (pending, running, succeeded).
    let events = run_events(&run.id, 5);
    let mut got = names(&events);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "prefect.kubernetes.pod.pending",
            "prefect.kubernetes.pod.running",
            "prefect.kubernetes.pod.succeeded",
            "prefect.worker.executed-flow-run",
            "prefect.worker.submitted-flow-run",
        ],
        "{events:#?}"
    );
    let executed = executed(&events);
    assert_eq!(
        flow_run_label(executed, STATUS_CODE_LABEL).as_deref(),
        Some("0")
    );
    assert_eq!(
        flow_run_label(executed, "prefect.infrastructure.identifier").as_deref(),
        Some(format!("{NAMESPACE}:{job_name}").as_str())
    );
    assert!(
        executed["resource"]["prefect.resource.id"]
            .as_str()
            .unwrap()
            .starts_with("prefect.worker.kubernetes."),
        "{executed}"
    );
    // The observer's InfrastructurePending, between Submitting and Running.
    let states = state_names(&run.id);
    assert!(
        states.iter().any(|n| n == "InfrastructurePending"),
        "{states:?}"
    );
    c.clean_up(&run.id);
}

/// `stream_output` (on in prefect-kubernetes' template, ignored by its worker since 0.6.0):
/// the flow container's output is followed to the worker's stdout, and not with it off.
#[test]
fn stream_output_follows_the_flow_containers_output_to_the_workers_stdout() {
    let s = server();
    let (pool, _, worker) = pool_and_worker("stream");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(variables(json!({}))));
    let quiet = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({"stream_output": false}))),
    );
    let (streamed, silent) = (unique("streamed"), unique("silent"));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"name": streamed}));
    let quiet_run = s.create_flow_run(&quiet.id, &[], json!({}), json!({"name": silent}));
    for id in [&run.id, &quiet_run.id] {
        let state = s.wait_for_final_state(id, FINAL_TIMEOUT);
        assert_eq!(state["type"], "COMPLETED", "{state}");
    }
    util::poll(
        "the streamed run's greeting on the worker's stdout",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            worker
                .stdout()
                .contains(&format!("Hello, {streamed}!"))
                .then_some(())
        },
    );
    // Both runs' containers have ended and their logs were drained: the silent one's
    // greeting would be there by now.
    assert!(!worker.stdout().contains(&silent), "{}", worker.stdout());
    for id in [&run.id, &quiet_run.id] {
        cluster().clean_up(id);
    }
}

/// A container that dies before the engine reports anything (a bad command, an import
/// error) is Crashed with its real exit code, which prefect-kubernetes never reads (its
/// executed event always says "0"), and its last output is forwarded to the run's logs.
#[test]
fn a_container_that_dies_before_the_engine_is_crashed_with_its_code_and_output() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("dies");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "command": "python -c \"print('boom before the engine'); raise SystemExit(3)\""
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap_or_default();
    assert!(message.contains("non-zero status code 3"), "{message}");
    let events = run_events(&run.id, 5);
    assert_eq!(
        flow_run_label(executed(&events), STATUS_CODE_LABEL).as_deref(),
        Some("3")
    );
    assert!(
        names(&events).contains(&"prefect.kubernetes.pod.evicted"),
        "{events:#?}"
    );
    let c = cluster();
    let logs = c.wait_for(
        "the pod's output in the run's logs",
        Duration::from_secs(30),
        || {
            let logs = s.read_logs(&run.id);
            logs.iter()
                .any(|l| l["message"] == "boom before the engine")
                .then_some(logs)
        },
    );
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Container logs from container 'prefect-job' in pod"))),
        "{logs:#?}"
    );
    c.clean_up(&run.id);
}

/// A flow process that dies without reporting (`os._exit(3)`) is reported Crashed by
/// `prefect flow-run execute` in the pod, which then exits 0: the run keeps the engine's
/// Crashed state and message.
#[test]
fn a_flow_that_dies_is_crashed_by_the_engine_in_its_pod() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("crash");
    let dep = s.deploy(&DeploySpec::new(&pool, "crash").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap_or_default();
    assert!(message.contains("status code: 3"), "{message}");
    let events = run_events(&run.id, 5);
    assert_eq!(
        flow_run_label(executed(&events), STATUS_CODE_LABEL).as_deref(),
        Some("0")
    );
    cluster().clean_up(&run.id);
}

/// A failed flow keeps Failed: the engine reports it and exits 0, so the Job completes.
#[test]
fn a_failed_flow_keeps_its_failed_state() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("fail");
    let dep = s.deploy(&DeploySpec::new(&pool, "fail").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "FAILED", "{state}");
    let events = run_events(&run.id, 5);
    assert_eq!(
        flow_run_label(executed(&events), STATUS_CODE_LABEL).as_deref(),
        Some("0")
    );
    assert_eq!(s.read_flow_run(&run.id)["state"]["type"], "FAILED");
    cluster().clean_up(&run.id);
}

/// A container killed for its memory limit: Crashed, the message names the OOM kill, the pod
/// event carries the reason, as Prefect's observer labels it.
///
/// The container takes far more than its limit at once. A limit just below what importing
/// Prefect needs is no sure kill: the interpreter's pages are evicted and read again, and it
/// crawls for minutes (a clean-clone CI left such a run Pending for 4 minutes).
#[test]
fn a_flow_killed_for_its_memory_limit_is_crashed_as_oomkilled() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("oom");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "memory_limit": "64Mi",
            "command": "python -c \"x = b'a' * (512 * 1024 * 1024)\""
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("OOMKilled") && message.contains("137"),
        "{message}"
    );
    let events = run_events(&run.id, 5);
    let evicted = events
        .iter()
        .find(|e| e["event"] == "prefect.kubernetes.pod.evicted")
        .expect("the pod's evicted event");
    assert_eq!(evicted["resource"]["kubernetes.reason"], "OOMKilled");
    cluster().clean_up(&run.id);
}

/// An image that cannot be pulled leaves a pod Pending for ever in Prefect. Here the run is
/// Crashed once `pod_watch_timeout_seconds` has passed with the diagnosis unchanged, with the
/// diagnosis as its message, and its Job is deleted.
#[test]
fn an_image_that_cannot_be_pulled_is_crashed_with_its_diagnosis() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("pull");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "image": "cohort-test/no-such-image:1", "pod_watch_timeout_seconds": 5
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Image pull failed for container 'prefect-job'"),
        "{message}"
    );
    let c = cluster();
    c.wait_for("the Job to be deleted", Duration::from_secs(60), || {
        c.jobs_of(&run.id).is_empty().then_some(())
    });
    let pending = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": ["prefect.kubernetes.pod.pending"]}}),
        2,
        Duration::from_secs(30),
    );
    assert!(
        pending
            .iter()
            .any(|e| e["resource"]["kubernetes.diagnosis"] == "ImagePullError"),
        "{pending:#?}"
    );
    // The observer's diagnosis is in the run's logs, with its resolution.
    let logs = s.read_logs(&run.id);
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Image pull failed") && m.contains("Resolution:"))),
        "{logs:#?}"
    );
    c.clean_up(&run.id);
}

/// A pool whose base job template is prefect-kubernetes' with `change` applied to its Job
/// manifest (what a user edits in the pool's advanced settings), and a Cohort worker for it
/// with `env`.
fn pool_with_manifest(
    what: &str,
    change: impl FnOnce(&mut Value),
    env: &[(&str, &str)],
) -> (String, Worker) {
    let s = server();
    let mut template: Value = serde_json::from_str(cohort_kube_manifest::BASE_JOB_TEMPLATE)
        .expect("the bundled template is JSON");
    change(&mut template["job_configuration"]["job_manifest"]);
    let pool = unique(&format!("k8s-{what}"));
    s.create_work_pool_with_template(&pool, "kubernetes", template);
    let mut builder = Worker::builder(
        util::WorkerKind::Cohort,
        &[
            "--pool",
            &pool,
            "--type",
            "kubernetes",
            "--name",
            &unique(&format!("k8s-worker-{what}")),
        ],
    )
    .env("KUBECONFIG", &cluster().kubeconfig())
    .env(
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
        NAMESPACE,
    );
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    (pool, builder.spawn())
}

/// A pod no node fits (a `nodeSelector` the emulated cluster's one node does not match) stays
/// Pending with `PodScheduled=False`; with `COHORT_KUBERNETES_SCHEDULED_TIMEOUT_SECONDS` its run
/// is Crashed with the scheduler's reason once that has passed, and its Job deleted, where
/// prefect-kubernetes leaves it Pending for ever.
#[test]
fn an_unschedulable_pod_is_crashed_after_the_scheduled_timeout() {
    let s = server();
    let (pool, _worker) = pool_with_manifest(
        "unschedulable",
        |manifest| {
            manifest["spec"]["template"]["spec"]["nodeSelector"] = json!({"disktype": "ssd"})
        },
        &[("COHORT_KUBERNETES_SCHEDULED_TIMEOUT_SECONDS", "5")],
    );
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Pod is unschedulable")
            && message.contains("didn't match Pod's node affinity/selector"),
        "{message}"
    );
    let c = cluster();
    c.wait_for("the Job to be deleted", Duration::from_secs(60), || {
        c.jobs_of(&run.id).is_empty().then_some(())
    });
    let pending = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": ["prefect.kubernetes.pod.pending"]}}),
        1,
        Duration::from_secs(30),
    );
    assert!(
        pending.iter().any(|e| e["resource"]["kubernetes.diagnosis"]
            .as_str()
            .is_some_and(|d| d.starts_with("Unschedulable"))),
        "{pending:#?}"
    );
    c.clean_up(&run.id);
}

/// A Job past its `activeDeadlineSeconds` (set in the pool's manifest) is failed by the Job
/// controller, which stops its pod; the run is Crashed as such, and stays so: the engine's
/// SIGTERM rule must not turn a deadline into a rescheduled run that starts a new Job.
#[test]
fn a_job_past_its_active_deadline_is_crashed_as_such() {
    let s = server();
    let (pool, _worker) = pool_with_manifest(
        "deadline",
        |manifest| manifest["spec"]["activeDeadlineSeconds"] = json!(8),
        &[],
    );
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 120}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(
        state["type"],
        "CRASHED",
        "{state}\n{:?}",
        state_names(&run.id)
    );
    let message = state["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("exceeded its active deadline"),
        "{message}"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(s.read_flow_run(&run.id)["state"]["type"], "CRASHED");
    assert_eq!(cluster().jobs_of(&run.id).len(), 1, "no second Job");
    cluster().clean_up(&run.id);
}

/// Proposes Cancelling as `prefect flow-run cancel` does.
fn request_cancel(run_id: &str) {
    let r = server().request(
        reqwest::Method::POST,
        &format!("/flow_runs/{run_id}/set_state"),
        Some(&json!({"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": false})),
    );
    assert_eq!(r["status"], "ACCEPT", "cancel request: {r}");
}

/// The engine in the pod cancels its own run, as with Prefect's worker.
#[test]
fn a_running_flow_is_cancelled_by_its_engine_in_the_pod() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("cancel");
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 300}));
    wait_for_state(&run.id, "RUNNING");
    request_cancel(&run.id);
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CANCELLED", "{state}");
    cluster().clean_up(&run.id);
}

/// A run whose pod never started (its image cannot be pulled) is cancelled by the worker: its
/// Job is deleted in the foreground, and the run Cancelled.
#[test]
fn a_run_cancelled_while_its_pod_is_pending_has_its_job_deleted() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("cancel-pending");
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "image": "cohort-test/no-such-image:2", "pod_watch_timeout_seconds": 600
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let c = cluster();
    c.wait_for("the run's pod", Duration::from_secs(120), || {
        (!c.pods_of(&run.id).is_empty()).then_some(())
    });
    request_cancel(&run.id);
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CANCELLED", "{state}");
    c.wait_for("the Job to be deleted", Duration::from_secs(60), || {
        c.jobs_of(&run.id).is_empty().then_some(())
    });
}

/// A worker SIGKILLed while its Job runs, replaced by one of the same name whose disk did not
/// survive (a fresh `PREFECT_HOME`, as a rescheduled worker pod has): the new worker finds the
/// Job by its labels, follows it to its end and reports it, once, and sends the pod's events
/// from then on (the pod succeeds after the first worker is gone), as Prefect's observer does
/// across restarts.
#[test]
fn a_worker_replaced_mid_run_finds_its_job_by_label_and_reports_it() {
    let s = server();
    let (pool, name, mut first) = pool_and_worker("replaced");
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 20}));
    wait_for_state(&run.id, "RUNNING");
    first.sigkill();
    let _second = worker(&pool, &name, None);
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}");
    let executed = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": [EXECUTED]}}),
        1,
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(3));
    let again = s.read_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
                                     "event": {"name": [EXECUTED]}}),
    );
    assert_eq!((executed.len(), again.len()), (1, 1), "{again:#?}");
    assert_eq!(
        flow_run_label(&executed[0], STATUS_CODE_LABEL).as_deref(),
        Some("0")
    );
    let succeeded = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": ["prefect.kubernetes.pod.succeeded"]}}),
        1,
        Duration::from_secs(60),
    );
    assert_eq!(succeeded.len(), 1, "{succeeded:#?}");
    cluster().clean_up(&run.id);
}

/// The worker as it runs in a cluster (`deploy/kubernetes/worker.yaml`): in a container, with
/// no kubeconfig, only `KUBERNETES_SERVICE_HOST`/`_PORT` and the pod's service account
/// directory (token, cluster CA, namespace). The emulator is served as a cluster's API
/// server is seen from a pod: HTTPS with its own CA, the token required. A real flow's Job
/// is created and followed to Completed over that connection, in the service account's
/// namespace.
#[test]
fn a_worker_in_a_container_uses_the_in_cluster_service_account() {
    let s = server();
    let c = cluster();
    let token = unique("sa-token");
    let served = c
        .block_on(c.emulator.serve_in_cluster(&token))
        .expect("serve the emulator in-cluster style");
    let in_cluster = served.in_cluster().expect("served in-cluster style");
    let account = tempfile::tempdir().expect("temp dir");
    for (file, text) in [
        ("token", in_cluster.token.as_str()),
        ("ca.crt", in_cluster.ca_pem.as_str()),
        ("namespace", NAMESPACE),
    ] {
        std::fs::write(account.path().join(file), text).expect("write the service account");
    }
    let pool = unique("k8s-in-cluster");
    s.create_work_pool(&pool, "kubernetes");
    let out = tempfile::tempdir().expect("temp dir");
    let container = InClusterWorker {
        name: unique("cohort-in-cluster"),
        pool: pool.clone(),
        port: served.addr().port(),
        account: account.path().to_owned(),
        log: out.path().join("worker.log"),
    }
    .start();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(
        state["type"],
        "COMPLETED",
        "{state}\n{}",
        container.output()
    );
    assert_eq!(c.jobs_of(&run.id).len(), 1);
    let created_over_tls = c.emulator.requests().iter().any(|r| {
        r.from == cohort_kube_fake::Transport::Https
            && r.method == "POST"
            && r.path
                .starts_with(&format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs"))
    });
    assert!(created_over_tls, "{}", container.output());
    let events = run_events(&run.id, 5);
    assert!(
        names(&events).contains(&"prefect.kubernetes.pod.succeeded"),
        "{events:#?}"
    );
    c.clean_up(&run.id);
}

/// A Cohort worker in a container on the host's network, its service account mounted where a
/// pod's is; removed when dropped.
struct InClusterWorker {
    name: String,
    pool: String,
    port: u16,
    account: std::path::PathBuf,
    log: std::path::PathBuf,
}

struct RunningContainer {
    name: String,
    log: std::path::PathBuf,
    _client: std::process::Child,
}

impl InClusterWorker {
    fn start(self) -> RunningContainer {
        let log = std::fs::File::create(&self.log).expect("worker log");
        let client = std::process::Command::new("docker")
            .args(["run", "--rm", "--name", &self.name, "--network", "host"])
            .arg("-v")
            .arg(format!(
                "{}:/usr/local/bin/cohort:ro",
                env!("CARGO_BIN_EXE_cohort")
            ))
            .arg("-v")
            .arg(format!(
                "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                self.account.display()
            ))
            .args(["-e", "KUBERNETES_SERVICE_HOST=127.0.0.1"])
            .arg("-e")
            .arg(format!("KUBERNETES_SERVICE_PORT={}", self.port))
            .arg("-e")
            .arg(format!("PREFECT_API_URL={}", server().api_url()))
            .args(["-e", "PREFECT_HOME=/tmp/prefect-home"])
            .args(["-e", "PREFECT_WORKER_QUERY_SECONDS=3"])
            .args(["--entrypoint", "/usr/local/bin/cohort", flows_image()])
            .args([
                "worker",
                "start",
                "--type",
                "kubernetes",
                "--pool",
                &self.pool,
            ])
            .args(["--name", &self.name])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("worker log"))
            .stderr(log)
            .spawn()
            .expect("docker run the worker");
        RunningContainer {
            name: self.name,
            log: self.log,
            _client: client,
        }
    }
}

impl RunningContainer {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// `--limit` counts running Jobs: with a limit of one, the second run's Job is created only
/// once the first one's has ended (prefect-kubernetes frees the slot at creation).
#[test]
fn the_limit_counts_running_jobs() {
    let s = server();
    let pool = unique("k8s-limit");
    s.create_work_pool(&pool, "kubernetes");
    let name = unique("k8s-worker-limit");
    let _worker = Worker::builder(
        util::WorkerKind::Cohort,
        &[
            "--pool",
            &pool,
            "--type",
            "kubernetes",
            "--name",
            &name,
            "--limit",
            "1",
        ],
    )
    .env("KUBECONFIG", &cluster().kubeconfig())
    .env(
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
        NAMESPACE,
    )
    .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").job_variables(variables(json!({}))));
    let first = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 5}));
    let second = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 5}));
    for run in [&first, &second] {
        let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
        assert_eq!(state["type"], "COMPLETED", "{state}");
    }
    let c = cluster();
    let created = |run: &str| {
        let job = &c.jobs_of(run)[0];
        chrono::DateTime::parse_from_rfc3339(job["metadata"]["creationTimestamp"].as_str().unwrap())
            .unwrap()
    };
    let finished = |run: &str| {
        let pod = &c.pods_of(run)[0];
        let t = pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
            .as_str()
            .unwrap()
            .to_owned();
        chrono::DateTime::parse_from_rfc3339(&t).unwrap()
    };
    let (a, b) = if created(&first.id) <= created(&second.id) {
        (&first.id, &second.id)
    } else {
        (&second.id, &first.id)
    };
    assert!(
        created(b) >= finished(a),
        "the second Job was created while the first ran"
    );
    c.clean_up(&first.id);
    c.clean_up(&second.id);
}

/// A pool whose runs name a cluster with a `kubernetes-cluster-config` block: the worker's
/// own configuration points nowhere, the Job goes to the block's cluster, and the run is
/// followed there (prefect-kubernetes' observer ignores `cluster_config`).
#[test]
fn a_cluster_config_block_names_the_cluster() {
    let s = server();
    let c = cluster();
    let block = cluster_config_block();
    let pool = unique("k8s-block");
    s.create_work_pool(&pool, "kubernetes");
    let (_worker, _nowhere) = worker_without_a_cluster(&pool, &unique("k8s-worker-block"));
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "cluster_config": {"$ref": {"block_document_id": block}}
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}");
    assert_eq!(c.jobs_of(&run.id).len(), 1);
    let events = run_events(&run.id, 5);
    assert!(
        names(&events).contains(&"prefect.kubernetes.pod.succeeded"),
        "{events:#?}"
    );
    c.clean_up(&run.id);
}

/// A `KubernetesClusterConfig` block document naming the emulated cluster (its own block
/// type, as prefect-kubernetes registers one): its id.
fn cluster_config_block() -> String {
    let s = server();
    let c = cluster();
    let block_type = s.request(
        reqwest::Method::POST,
        "/block_types/",
        Some(&json!({"name": unique("Kubernetes Cluster Config"), "slug": unique("kubernetes-cluster-config")})),
    );
    let schema = s.request(
        reqwest::Method::POST,
        "/block_schemas/",
        Some(&json!({
            "block_type_id": block_type["id"],
            "capabilities": [],
            "fields": {"title": "KubernetesClusterConfig", "type": "object",
                       "properties": {"config": {"type": "object"}, "context_name": {"type": "string"}},
                       "required": ["config", "context_name"]},
        })),
    );
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
        "clusters": [{"name": "emulated", "cluster": {"server": c.url()}}],
        "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "emulated"}}],
        "users": [{"name": "emulated", "user": {}}],
    });
    let block = s.request(
        reqwest::Method::POST,
        "/block_documents/",
        Some(&json!({
            "name": unique("emulated"),
            "block_type_id": block_type["id"],
            "block_schema_id": schema["id"],
            "data": {"config": kubeconfig, "context_name": "emulated"},
        })),
    );
    block["id"].as_str().expect("a block id").to_owned()
}

/// A worker whose own cluster does not exist (its kubeconfig is missing): only a run's
/// `cluster_config` block reaches a cluster. The directory goes with the worker.
fn worker_without_a_cluster(pool: &str, name: &str) -> (Worker, tempfile::TempDir) {
    worker_without_a_cluster_at(pool, name, None)
}

/// [`worker_without_a_cluster`] with `home` as its `PREFECT_HOME`.
fn worker_without_a_cluster_at(
    pool: &str,
    name: &str,
    home: Option<&std::path::Path>,
) -> (Worker, tempfile::TempDir) {
    let nowhere = tempfile::tempdir().unwrap();
    let mut builder = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", pool, "--type", "kubernetes", "--name", name],
    )
    .env(
        "KUBECONFIG",
        &nowhere.path().join("no-such-kubeconfig").to_string_lossy(),
    );
    if let Some(home) = home {
        builder = builder.home(home);
    }
    (builder.spawn(), nowhere)
}

/// 200 Jobs supervised at once on an emulated cluster whose kubelet the test scripts (200
/// Prefect engines do not fit on the test machines, so no engine runs in these pods and the
/// runs stay Pending): every run gets exactly one Job, and when the pods end every run gets
/// its `executed-flow-run`, read back from the server, with the pod's exit code.
#[test]
fn two_hundred_jobs_are_supervised_at_once() {
    const RUNS: usize = 200;
    let s = server();
    let c = cluster();
    let (emulator, served, dir) = c.block_on(async {
        let emulator = cohort_kube_fake::Emulator::new(
            cohort_kube_fake::EmulatorConfig::with_kubelet(cohort_kube_fake::Kubelet::Scripted {
                auto_schedule: true,
            }),
        );
        let served = emulator.serve().await.unwrap();
        (emulator, served, tempfile::tempdir().unwrap())
    });
    let kubeconfig = served.write_kubeconfig(dir.path()).unwrap();
    let pool = unique("k8s-200");
    s.create_work_pool(&pool, "kubernetes");
    let name = unique("k8s-worker-200");
    let _worker = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "kubernetes", "--name", &name],
    )
    .env("KUBECONFIG", &kubeconfig.to_string_lossy())
    .env(
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
        NAMESPACE,
    )
    .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": "cohort-test/not-run:1", "namespace": NAMESPACE
    })));
    let runs: Vec<String> = (0..RUNS)
        .map(|_| s.create_flow_run(&dep.id, &[], json!({}), json!({})).id)
        .collect();

    // Every pod runs; once all 200 run at once, each exits with a code of its own.
    let running = |emulator: &cohort_kube_fake::Emulator| {
        emulator
            .pods(NAMESPACE)
            .into_iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
    };
    util::poll(
        "200 pods running",
        FINAL_TIMEOUT,
        Duration::from_millis(500),
        || {
            for pod in emulator.pods(NAMESPACE) {
                if pod["status"]["phase"] == "Pending" {
                    let _ =
                        emulator.pod_running(NAMESPACE, pod["metadata"]["name"].as_str().unwrap());
                }
            }
            (running(&emulator) == RUNS).then_some(())
        },
    );
    let jobs = emulator.jobs(NAMESPACE);
    assert_eq!(jobs.len(), RUNS, "one Job per run");
    let mut code_of = std::collections::HashMap::new();
    for (i, pod) in emulator.pods(NAMESPACE).iter().enumerate() {
        let code = (i % 3) as i32;
        let run = pod["metadata"]["labels"]["prefect.io/flow-run-id"]
            .as_str()
            .unwrap()
            .to_owned();
        code_of.insert(run, code.to_string());
        let reason = if code == 0 { "Completed" } else { "Error" };
        emulator
            .pod_exit(
                NAMESPACE,
                pod["metadata"]["name"].as_str().unwrap(),
                code,
                reason,
            )
            .unwrap();
    }
    let executed = util::poll(
        "an executed-flow-run event for every run",
        FINAL_TIMEOUT,
        Duration::from_secs(2),
        || {
            let events = s.read_events(json!({
                "event": {"name": [EXECUTED]},
                "resource": {"id": [format!("prefect.worker.kubernetes.{}", name.to_lowercase())]},
            }));
            (events.len() >= RUNS).then_some(events)
        },
    );
    assert_eq!(executed.len(), RUNS, "one executed-flow-run per run");
    for event in &executed {
        let run = event["related"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["prefect.resource.role"] == "flow-run")
            .unwrap()["prefect.resource.id"]
            .as_str()
            .unwrap()
            .trim_start_matches("prefect.flow-run.")
            .to_owned();
        assert!(runs.contains(&run));
        assert_eq!(
            flow_run_label(event, STATUS_CODE_LABEL),
            code_of.get(&run).cloned()
        );
    }
    c.block_on(emulator.shutdown());
}

/// A run left Cancelling by a worker that died is cancelled by the server after its timeout,
/// which asks a worker of the pool to tear its infrastructure down
/// (`cancelling_timeout_teardown.v1` over the worker channel): another worker deletes the Job
/// named by the run's `infrastructure_pid`.
#[test]
fn the_servers_cleanup_after_a_cancelling_timeout_deletes_the_job() {
    let (_, busybox) = util::docker::images();
    let s = server();
    let pool = unique("k8s-cleanup");
    s.create_work_pool(&pool, "kubernetes");
    let mut first = worker(&pool, &unique("k8s-dies"), None);
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "image": busybox, "command": "sh -c 'trap \"exit 0\" TERM; sleep 600 & wait'"
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let pid = infrastructure_pid(&run.id);
    // Nobody supervises it any more; a worker of another name does not take it up.
    first.sigkill();
    let second = worker(&pool, &unique("k8s-cleans"), None);
    s.force_cancelling_until_cancelled(&run.id, FINAL_TIMEOUT);
    assert_cleaned_up_by(&run.id, &second, &pid);
}

/// A worker SIGKILLed while a run's Job runs on the cluster its `cluster_config` block names,
/// restarted with the same name and `PREFECT_HOME`: the journaled run is found on that
/// cluster (the workers' own kubeconfig leads nowhere), followed to its end and reported once.
#[test]
fn a_restarted_worker_re_adopts_a_run_on_its_cluster_config_cluster() {
    let s = server();
    let block = cluster_config_block();
    let pool = unique("k8s-adopt-block");
    s.create_work_pool(&pool, "kubernetes");
    let name = unique("k8s-worker-adopt-block");
    let home = tempfile::tempdir().unwrap();
    let (mut first, _first_dir) = worker_without_a_cluster_at(&pool, &name, Some(home.path()));
    let dep = s.deploy(
        &DeploySpec::new(&pool, "sleepy").job_variables(variables(json!({
            "cluster_config": {"$ref": {"block_document_id": block}}
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 20}));
    wait_for_state(&run.id, "RUNNING");
    first.sigkill();
    let (second, _second_dir) = worker_without_a_cluster_at(&pool, &name, Some(home.path()));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}");
    let executed = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": [EXECUTED]}}),
        1,
        Duration::from_secs(60),
    );
    assert_eq!(
        flow_run_label(&executed[0], STATUS_CODE_LABEL).as_deref(),
        Some("0")
    );
    assert!(
        second.stderr().contains("re-adopted"),
        "the second worker did not re-adopt the run:\n{}",
        second.stderr()
    );
    std::thread::sleep(Duration::from_secs(3));
    let again = s.read_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
                                     "event": {"name": [EXECUTED]}}),
    );
    assert_eq!(again.len(), 1, "{again:#?}");
    cluster().clean_up(&run.id);
}

/// The server's clean-up of a run whose deployment names its cluster with a `cluster_config`
/// block reaches that cluster, as Prefect's handler does through the run's configuration:
/// the workers' own kubeconfig leads nowhere.
#[test]
fn the_servers_cleanup_reaches_the_cluster_a_cluster_config_block_names() {
    let (_, busybox) = util::docker::images();
    let s = server();
    let block = cluster_config_block();
    let pool = unique("k8s-cleanup-block");
    s.create_work_pool(&pool, "kubernetes");
    let (mut first, _first_dir) = worker_without_a_cluster(&pool, &unique("k8s-dies"));
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello").job_variables(variables(json!({
            "image": busybox, "command": "sh -c 'trap \"exit 0\" TERM; sleep 600 & wait'",
            "cluster_config": {"$ref": {"block_document_id": block}}
        }))),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let pid = infrastructure_pid(&run.id);
    first.sigkill();
    let (second, _second_dir) = worker_without_a_cluster(&pool, &unique("k8s-cleans"));
    s.force_cancelling_until_cancelled(&run.id, FINAL_TIMEOUT);
    assert_cleaned_up_by(&run.id, &second, &pid);
}

/// The run's identifier once the worker has recorded it.
fn infrastructure_pid(run_id: &str) -> String {
    let s = server();
    util::poll(
        "infrastructure_pid to be set",
        FINAL_TIMEOUT,
        Duration::from_millis(250),
        || {
            s.read_flow_run(run_id)["infrastructure_pid"]
                .as_str()
                .map(str::to_owned)
        },
    )
}

/// The run's Job is deleted by the server's clean-up, by `worker`; its pods are gone after.
fn assert_cleaned_up_by(run_id: &str, worker: &Worker, identifier: &str) {
    let c = cluster();
    c.wait_for(
        "the Job to be deleted by the clean-up",
        Duration::from_secs(120),
        || c.jobs_of(run_id).is_empty().then_some(()),
    );
    assert!(
        worker.stderr().contains("after its Cancelling timeout"),
        "the clean-up was not the second worker's ({identifier}):\n{}",
        worker.stderr()
    );
    c.clean_up(run_id);
}

/// An evicted pod of a Job with `backoff_limit` 0: the engine in it takes the SIGTERM as
/// prefect-kubernetes tells it to (`PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`),
/// reschedules its run and exits 0, so the run is not Crashed: the worker picks it up again,
/// and it completes in a second Job.
#[test]
fn an_evicted_run_is_rescheduled_and_completes_in_a_new_job() {
    let s = server();
    let (pool, _, _worker) = pool_and_worker("evicted");
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").job_variables(variables(json!({}))));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 15}));
    wait_for_state(&run.id, "RUNNING");
    let c = cluster();
    let pod = c.pods_of(&run.id)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    c.emulator
        .pod_evict(NAMESPACE, &pod, "The node was low on resource: memory.")
        .unwrap();
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}");
    assert_eq!(
        c.jobs_of(&run.id).len(),
        2,
        "a second Job for the rescheduled run"
    );
    let states = state_names(&run.id);
    assert!(states.iter().any(|n| n == "AwaitingRetry"), "{states:?}");
    assert!(!states.iter().any(|n| n == "Crashed"), "{states:?}");
    let executed = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": [EXECUTED]}}),
        2,
        Duration::from_secs(60),
    );
    let codes: Vec<_> = executed
        .iter()
        .map(|e| flow_run_label(e, STATUS_CODE_LABEL))
        .collect();
    assert_eq!(
        codes,
        [Some("0".to_owned()), Some("0".to_owned())],
        "{executed:#?}"
    );
    c.clean_up(&run.id);
}
