//! End-to-end tests of `cohort worker start --type docker` against a real Prefect 3.8.8 server
//! and the machine's real Docker Engine. No registry is reachable, so the images are built
//! here by `scripts/docker-test-images.sh` (a Debian rootfs with tini and the pinned Prefect,
//! and a static busybox), once per test binary; a missing `docker` fails the tests loudly.
//! Flow code reaches the container through a bind mount of `examples/flows` at the same path;
//! the server's loopback URL makes the worker put the container on the host's network.
//! Every assertion reads the outcome back: the run's state from the server, the events through
//! `POST /api/events/filter`, the container through `docker inspect`.

// End-to-end tests wait on real processes: wall-clock time and sleeps are the point here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use util::docker::{containers_of, docker, flow_mount, images, inspect};
use util::trials::{flow_run_label, EXECUTED, STATUS_CODE_LABEL};
use util::{unique, DeploySpec, PrefectServer, Worker};

const FINAL_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the server lets a run stay Cancelling before it cancels it and sends a worker
/// the clean-up (300 s by default).
const CANCELLING_TIMEOUT_SECONDS: u64 = 15;

/// The shared server of this binary, with a short Cancelling timeout.
fn server() -> &'static PrefectServer {
    util::server_with_cancelling_timeout(CANCELLING_TIMEOUT_SECONDS)
}

/// A docker pool created empty (the worker gives it prefect-docker's template) and a worker.
fn pool_and_worker(what: &str, keep: bool) -> (String, Worker) {
    let s = server();
    let pool = unique(&format!("dk-{what}"));
    s.create_work_pool(&pool, "docker");
    let name = unique(&format!("dk-worker-{what}"));
    let mut builder = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "docker", "--name", &name],
    );
    if keep {
        builder = builder.env("COHORT_DOCKER_KEEP_CONTAINERS", "1");
    }
    (pool, builder.spawn())
}

/// Polls until the engine has no container of the run.
fn wait_until_removed(run_id: &str, timeout: Duration) {
    util::poll(
        "the container to be removed",
        timeout,
        Duration::from_millis(250),
        || containers_of(run_id).is_empty().then_some(()),
    );
}

/// Polls until the server has the run's `infrastructure_pid`.
fn wait_for_infrastructure_pid(run_id: &str, timeout: Duration) {
    let s = server();
    util::poll(
        "infrastructure_pid to be set",
        timeout,
        Duration::from_millis(250),
        || {
            s.read_flow_run(run_id)["infrastructure_pid"]
                .as_str()
                .map(|_| ())
        },
    );
}

fn run_events(run_id: &str) -> Vec<Value> {
    let s = server();
    s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{run_id}")]},
               "event": {"prefix": ["prefect.worker.executed", "prefect.docker.container."]}}),
        4,
        Duration::from_secs(30),
    )
}

/// The `prefect.infrastructure.status-code` of the run's `executed-flow-run` event.
fn executed_status_code(events: &[Value]) -> Option<String> {
    let executed = events.iter().find(|e| e["event"] == EXECUTED)?;
    flow_run_label(executed, STATUS_CODE_LABEL)
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

#[test]
fn a_real_flow_runs_in_a_container_to_completed_with_prefect_dockers_events() {
    let (prefect_image, _) = images();
    let s = server();
    let (pool, _worker) = pool_and_worker("ok", true);
    let dep = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .tags(&["dk"])
            .job_variables(json!({"image": prefect_image, "volumes": [flow_mount()],
                                  "labels": {"team": "data"}, "env": {"EXTRA": "1"}})),
    );
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "COMPLETED", "{state}");

    let events = run_events(&run.id);
    let names = names(&events);
    for expected in [
        "prefect.docker.container.created",
        "prefect.docker.container.running",
        "prefect.docker.container.exited",
        "prefect.worker.executed-flow-run",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let executed = events
        .iter()
        .find(|e| e["event"] == "prefect.worker.executed-flow-run")
        .unwrap();
    let flow_run = executed["related"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefect.resource.role"] == "flow-run")
        .unwrap();
    let identifier = flow_run["prefect.infrastructure.identifier"]
        .as_str()
        .unwrap();
    let id = identifier
        .strip_prefix("http+docker://localhost:")
        .unwrap_or_else(|| panic!("identifier {identifier}"));
    assert_eq!(id.len(), 64, "{identifier}");
    assert_eq!(flow_run["prefect.infrastructure.status-code"], "0");
    assert_eq!(s.read_flow_run(&run.id)["infrastructure_pid"], identifier);
    let created = events
        .iter()
        .find(|e| e["event"] == "prefect.docker.container.created")
        .unwrap();
    assert_eq!(
        created["resource"]["prefect.resource.id"],
        format!("prefect.docker.container.{id}")
    );
    assert!(created["related"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["prefect.resource.role"] == "worker" && r["prefect.worker-type"] == "docker"));

    let c = inspect(id).expect("the container is kept with COHORT_DOCKER_KEEP_CONTAINERS");
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["io.prefect.flow-run-id"], run.id);
    assert_eq!(labels["io.prefect.deployment-id"], dep.id);
    assert_eq!(labels["io.prefect.version"], "3.8.8");
    assert_eq!(labels["team"], "data");
    assert_eq!(c["HostConfig"]["NetworkMode"], "host");
    assert_eq!(c["State"]["ExitCode"], 0);
    let env: Vec<&str> = c["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&format!("PREFECT__FLOW_RUN_ID={}", run.id).as_str()),
        "{env:?}"
    );
    assert!(env.contains(&"EXTRA=1"), "{env:?}");
    assert!(
        env.iter()
            .any(|e| e.starts_with("PREFECT_API_URL=http://127.0.0.1:")),
        "{env:?}"
    );
    assert!(docker(&["rm", "-f", id]).status.success());
}

#[test]
fn a_non_zero_exit_is_crashed_with_the_real_code_and_the_container_is_removed() {
    let (_, busybox) = images();
    let s = server();
    let (pool, _worker) = pool_and_worker("exit3", false);
    // `stream_output: false` is where prefect-docker reports 0 (spec §2.7); Cohort must not.
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'echo out; exit 3'", "stream_output": false
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    assert!(
        state["message"]
            .as_str()
            .unwrap()
            .contains("non-zero status code 3"),
        "{state}"
    );
    let events = run_events(&run.id);
    assert_eq!(executed_status_code(&events).as_deref(), Some("3"));
    assert!(names(&events).contains(&"prefect.docker.container.exited"));
    // Read, then removed: nothing left behind.
    wait_until_removed(&run.id, Duration::from_secs(20));
}

#[test]
fn a_missing_image_with_policy_never_is_crashed_with_the_engines_message() {
    let s = server();
    let (pool, mut worker) = pool_and_worker("never", false);
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": "cohort-test/does-not-exist:1", "image_pull_policy": "Never"
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap();
    assert!(message.contains("No such image"), "{message}");
    assert!(
        message.contains("cohort-test/does-not-exist:1"),
        "{message}"
    );
    let failed = s.wait_for_events(
        json!({"event": {"name": ["prefect.docker.container.creation-failed"]},
               "related": {"id": [format!("prefect.flow-run.{}", run.id)]}}),
        1,
        Duration::from_secs(30),
    );
    assert_eq!(failed.len(), 1);
    assert!(containers_of(&run.id).is_empty());
    // The worker goes on serving the pool.
    let (_, busybox) = images();
    let ok = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'exit 3'"
    })));
    let next = s.create_flow_run(&ok.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&next.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    assert!(worker.try_wait().is_none(), "the worker exited");
}

/// A pool created from the UI (or by `prefect work-pool create --type docker` without
/// prefect-docker installed) carries the template bundled with the server, not
/// prefect-docker's: no `container_create_kwargs`, an extra `container_wait_timeout`. It is
/// read straight from the server's worker registry and rendered all the same.
#[test]
fn a_pool_with_the_servers_bundled_template_runs_its_containers() {
    let (_, busybox) = images();
    let s = server();
    let registry = s.request(
        reqwest::Method::GET,
        "/collections/views/aggregate-worker-metadata",
        None,
    );
    let template = registry["prefect-docker"]["docker"]["default_base_job_configuration"].clone();
    // Offline (as here) the server answers from the file bundled with it, which has
    // `container_wait_timeout`; with a network, the registry's current copy.
    assert!(
        template["job_configuration"].is_object(),
        "no docker template in the server's registry: {registry}"
    );
    let pool = unique("dk-bundled");
    s.create_work_pool_with_template(&pool, "docker", template);
    let name = unique("dk-worker-bundled");
    let _worker = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "docker", "--name", &name],
    )
    .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'exit 4'", "container_wait_timeout": 5
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    assert!(
        state["message"]
            .as_str()
            .unwrap()
            .contains("non-zero status code 4"),
        "{state}"
    );
    wait_until_removed(&run.id, Duration::from_secs(20));
}

/// An image name the Engine cannot parse fails at the pull (prefect-docker's default policy
/// pulls an untagged image), before any container exists: Crashed with the Engine's reason and
/// the image named, no `creation-failed` (nothing was created), and the worker serves on.
#[test]
fn a_bad_image_name_is_crashed_with_the_engines_reason() {
    let s = server();
    let (pool, mut worker) = pool_and_worker("badname", false);
    let bad = "Cohort Test/Not A Valid Name";
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({ "image": bad })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap();
    assert!(message.contains("invalid reference format"), "{message}");
    assert!(message.contains(bad), "{message}");
    assert!(containers_of(&run.id).is_empty());
    let executed = s.read_events(json!({
        "event": {"name": ["prefect.docker.container.creation-failed", "prefect.worker.executed-flow-run"]},
        "related": {"id": [format!("prefect.flow-run.{}", run.id)]}}));
    assert!(executed.is_empty(), "{executed:?}");

    let (_, busybox) = images();
    let ok = s.deploy(
        &DeploySpec::new(&pool, "hello")
            .job_variables(json!({ "image": busybox, "command": "true" })),
    );
    let next = s.create_flow_run(&ok.id, &[], json!({}), json!({}));
    // `true` reports no state: the worker's clean exit leaves the run where the engine would
    // have, so wait for the executed event instead.
    let events = s.wait_for_events(
        json!({"event": {"name": ["prefect.worker.executed-flow-run"]},
               "related": {"id": [format!("prefect.flow-run.{}", next.id)]}}),
        1,
        FINAL_TIMEOUT,
    );
    assert_eq!(events.len(), 1);
    assert!(worker.try_wait().is_none(), "the worker exited");
}

/// A flow that fails reports Failed from inside the container, and the engine then exits 0
/// (an outcome it reported is handled: `prefect/engine.py`): the run stays Failed, never
/// Crashed, and the executed event carries the container's real code, 0.
#[test]
fn a_failed_flow_keeps_its_failed_state() {
    let (prefect_image, _) = images();
    let s = server();
    let (pool, _worker) = pool_and_worker("fail", false);
    let dep = s.deploy(&DeploySpec::new(&pool, "fail").job_variables(json!({
        "image": prefect_image, "volumes": [flow_mount()]
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "FAILED", "{state}");
    let events = run_events(&run.id);
    assert_eq!(executed_status_code(&events).as_deref(), Some("0"));
    // Still Failed once the worker has seen the exit.
    assert_eq!(s.read_flow_run(&run.id)["state"]["type"], "FAILED");
    wait_until_removed(&run.id, Duration::from_secs(20));
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

fn wait_for_state(run_id: &str, state: &str) {
    let s = server();
    util::poll(
        &format!("flow run {run_id} to be {state}"),
        FINAL_TIMEOUT,
        Duration::from_millis(500),
        || (s.read_flow_run(run_id)["state"]["type"] == state).then_some(()),
    );
}

/// The engine in the container cancels its own run, as with Prefect's Docker worker: Cancelled,
/// one `prefect.runner.cancelled-flow-run` (the engine's), the container gone.
#[test]
fn a_running_flow_is_cancelled_by_its_engine_in_the_container() {
    let (prefect_image, _) = images();
    let s = server();
    let (pool, _worker) = pool_and_worker("cancel", false);
    let dep = s.deploy(&DeploySpec::new(&pool, "sleepy").job_variables(json!({
        "image": prefect_image, "volumes": [flow_mount()]
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"seconds": 300}));
    wait_for_state(&run.id, "RUNNING");
    request_cancel(&run.id);
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CANCELLED", "{state}");
    let cancelled = s.wait_for_events(
        json!({"event": {"name": ["prefect.runner.cancelled-flow-run"]},
               "related": {"id": [format!("prefect.flow-run.{}", run.id)]}}),
        1,
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_secs(3));
    let again = s.read_events(
        json!({"event": {"name": ["prefect.runner.cancelled-flow-run"]},
        "related": {"id": [format!("prefect.flow-run.{}", run.id)]}}),
    );
    assert_eq!((cancelled.len(), again.len()), (1, 1), "{again:?}");
    wait_until_removed(&run.id, Duration::from_secs(60));
}

/// Containers outlive their worker: one SIGKILLed while its container runs is restarted with
/// the same name and `PREFECT_HOME`, re-adopts the container and reports its end with an
/// `executed-flow-run` that follows the original `submitted-flow-run`.
#[test]
fn a_restarted_worker_re_adopts_its_running_container() {
    let (_, busybox) = images();
    let s = server();
    let pool = unique("dk-readopt");
    s.create_work_pool(&pool, "docker");
    let name = unique("dk-worker-readopt");
    let home = tempfile::tempdir().expect("a PREFECT_HOME");
    let args = [
        "--pool",
        pool.as_str(),
        "--type",
        "docker",
        "--name",
        name.as_str(),
    ];
    let mut first = Worker::builder(util::WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'sleep 8; exit 4'"
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    util::poll(
        "the container to start",
        FINAL_TIMEOUT,
        Duration::from_millis(250),
        || (!containers_of(&run.id).is_empty()).then_some(()),
    );
    first.sigkill();
    let _second = Worker::builder(util::WorkerKind::Cohort, &args)
        .home(home.path())
        .spawn();
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    assert!(
        state["message"].as_str().unwrap().contains("status code 4"),
        "{state}"
    );
    let events = s.wait_for_events(
        json!({"event": {"prefix": ["prefect.worker.submitted", "prefect.worker.executed"]},
               "related": {"id": [format!("prefect.flow-run.{}", run.id)]}}),
        2,
        Duration::from_secs(30),
    );
    let submitted = events
        .iter()
        .find(|e| e["event"] == "prefect.worker.submitted-flow-run")
        .unwrap();
    let executed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "prefect.worker.executed-flow-run")
        .collect();
    assert_eq!(executed.len(), 1, "{events:?}");
    assert_eq!(executed[0]["follows"], submitted["id"]);
    wait_until_removed(&run.id, Duration::from_secs(30));
}

/// A run left Cancelling by a worker that died is cancelled by the server after its timeout,
/// which asks a worker of the pool to tear the container down (`cancelling_timeout_teardown.v1`
/// over the worker channel): another Docker worker stops it.
#[test]
fn the_servers_cleanup_after_a_cancelling_timeout_stops_the_container() {
    let (_, busybox) = images();
    let s = server();
    let pool = unique("dk-cleanup");
    s.create_work_pool(&pool, "docker");
    let (first_name, second_name) = (unique("dk-dies"), unique("dk-cleans"));
    let mut first = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "docker", "--name", &first_name],
    )
    .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'trap \"exit 0\" TERM; sleep 600 & wait'"
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let container = util::poll(
        "the container to start",
        FINAL_TIMEOUT,
        Duration::from_millis(250),
        || containers_of(&run.id).into_iter().next(),
    );
    wait_for_infrastructure_pid(&run.id, Duration::from_secs(30));
    // Nobody supervises it any more.
    first.sigkill();
    let second = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "docker", "--name", &second_name],
    )
    .spawn();
    s.force_cancelling_until_cancelled(&run.id, FINAL_TIMEOUT);
    util::poll(
        "the container to be stopped by the clean-up",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || match inspect(&container) {
            None => Some(()),
            Some(c) => (c["State"]["Running"] == false).then_some(()),
        },
    );
    assert!(
        second.stderr().contains("after its Cancelling timeout"),
        "the clean-up was not the second worker's:\n{}",
        second.stderr()
    );
    let _ = docker(&["rm", "-f", &container]);
}

/// A container killed for exceeding `mem_limit` is Crashed with 137 and says it was OOM-killed
/// (prefect-docker reports only the code, and with `stream_output` off not even that).
#[test]
fn an_oom_killed_container_is_crashed_as_oom_killed() {
    let (_, busybox) = images();
    let s = server();
    let (pool, _worker) = pool_and_worker("oom", false);
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "mem_limit": "16m", "memswap_limit": "16m",
        "command": "sh -c 'x=$(head -c 200000000 /dev/zero | tr \"\\\\0\" a); echo ${#x}'"
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    let message = state["message"].as_str().unwrap();
    assert!(message.contains("status code 137"), "{message}");
    assert!(message.contains("OOMKilled"), "{message}");
}

/// A taken container name gets `-1`, as prefect-docker retries it.
#[test]
fn a_taken_container_name_gets_a_suffix() {
    let (_, busybox) = images();
    let s = server();
    let (pool, _worker) = pool_and_worker("name", true);
    let name = unique("fixed");
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'exit 5'", "name": name
    })));
    let mut containers = Vec::new();
    for _ in 0..2 {
        let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
        s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
        containers.extend(containers_of(&run.id));
    }
    let names: Vec<String> = containers
        .iter()
        .map(|c| {
            inspect(c).expect("kept")["Name"]
                .as_str()
                .unwrap()
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    for c in &containers {
        let _ = docker(&["rm", "-f", c]);
    }
    assert_eq!(names, [name.clone(), format!("{name}-1")]);
}

/// Containers an earlier worker of the same name and pool left behind for runs it already
/// reported are removed when a worker starts; a running one, or another worker's, is not.
#[test]
fn leftover_containers_of_the_worker_are_removed_at_start() {
    let (_, busybox) = images();
    let s = server();
    let pool = unique("dk-sweep");
    let pool_id = s.create_work_pool(&pool, "docker")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = unique("dk-sweeper");
    let create = |worker: &str, command: &[&str]| {
        let run = uuid::Uuid::new_v4().to_string();
        let mut args = vec![
            "create".to_owned(),
            "--label".to_owned(),
            format!("io.prefect.worker-name={worker}"),
            "--label".to_owned(),
            format!("io.prefect.work-pool-id={pool_id}"),
            "--label".to_owned(),
            format!("io.prefect.flow-run-id={run}"),
            busybox.clone(),
        ];
        args.extend(command.iter().map(|c| (*c).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = docker(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let exited = create(&name, &["true"]);
    assert!(docker(&["start", "-a", &exited]).status.success());
    let never_started = create(&name, &["true"]);
    let running = create(&name, &["sleep", "600"]);
    assert!(docker(&["start", &running]).status.success());
    let other_workers = create("someone-else", &["true"]);

    let _worker = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "docker", "--name", &name],
    )
    .spawn();
    util::poll(
        "the leftovers to be removed",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || (inspect(&exited).is_none() && inspect(&never_started).is_none()).then_some(()),
    );
    let still = [
        inspect(&running).is_some(),
        inspect(&other_workers).is_some(),
    ];
    for c in [&running, &other_workers] {
        let _ = docker(&["rm", "-f", c]);
    }
    assert_eq!(still, [true, true]);
}

/// A proxy on a unix socket in front of the Engine's, whose connections the test can cut: the
/// Engine itself cannot be made to drop a client's connection.
struct EngineProxy {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl EngineProxy {
    fn start() -> EngineProxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        const ENGINE: &str = "/var/run/docker.sock";
        assert!(
            std::path::Path::new(ENGINE).exists(),
            "no Docker Engine socket at {ENGINE}"
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).expect("bind the proxy socket");
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::<UnixStream>::new()));
        let conns = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = UnixStream::connect(ENGINE) else {
                    continue;
                };
                let mut list = conns.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(upstream.try_clone().unwrap());
                drop(list);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        EngineProxy {
            _dir: dir,
            socket,
            open,
        }
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Cuts every connection open through the proxy.
    fn drop_connections(&self) -> usize {
        let conns: Vec<_> = self.open.lock().unwrap().drain(..).collect();
        for c in &conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        conns.len()
    }
}

/// The worker's connection to the Engine drops while a container runs: the watcher connects
/// again and still reports the container's real exit code, and the container is removed.
#[test]
fn a_dropped_engine_connection_mid_run_loses_nothing() {
    let (_, busybox) = images();
    let s = server();
    let proxy = EngineProxy::start();
    let pool = unique("dk-drop");
    s.create_work_pool(&pool, "docker");
    let name = unique("dk-worker-drop");
    let worker = Worker::builder(
        util::WorkerKind::Cohort,
        &["--pool", &pool, "--type", "docker", "--name", &name],
    )
    .env("DOCKER_HOST", &proxy.docker_host())
    .spawn();
    let dep = s.deploy(&DeploySpec::new(&pool, "hello").job_variables(json!({
        "image": busybox, "command": "sh -c 'sleep 8; exit 7'"
    })));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({}));
    wait_for_infrastructure_pid(&run.id, FINAL_TIMEOUT);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        proxy.drop_connections() > 0,
        "nothing went through the proxy"
    );
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    assert_eq!(state["type"], "CRASHED", "{state}");
    assert!(
        state["message"].as_str().unwrap().contains("status code 7"),
        "{state}"
    );
    wait_until_removed(&run.id, Duration::from_secs(30));
    assert!(
        worker.stderr().contains("; retrying"),
        "the wait was not cut:\n{}",
        worker.stderr()
    );
}

/// The container image of the repository's `Dockerfile`, built here from the local Prefect
/// image under the upstream tag it stands for (no registry), with this build's `cohort`
/// (stripped): its entrypoint is `cohort`, it runs as a non-root user, and a Cohort worker
/// in it serves a process pool whose real flow runs to Completed inside the container.
#[test]
fn the_repositorys_image_runs_a_process_pool_flow_as_non_root() {
    let s = server();
    images();
    let context = tempfile::tempdir().expect("temp dir");
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(context.path().join("cohort"))
        .arg(env!("CARGO_BIN_EXE_cohort"))
        .status()
        .expect("`strip` (binutils) must be installed");
    assert!(stripped.success(), "strip failed");
    let dockerfile = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Dockerfile");
    std::fs::copy(dockerfile, context.path().join("Dockerfile")).expect("copy the Dockerfile");
    let tag = format!("cohort-test/cohort:{}", unique("image").to_lowercase());
    let context_dir = context.path().to_string_lossy().into_owned();
    let built = std::process::Command::new("docker")
        .args([
            "build",
            "-q",
            "--build-arg",
            "COHORT_BINARY=cohort",
            "-t",
            &tag,
            &context_dir,
        ])
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let image = RemovedImage(tag.clone());
    let config = &serde_json::from_slice::<Value>(&docker(&["image", "inspect", &image.0]).stdout)
        .expect("image inspect is JSON")[0]["Config"];
    assert_eq!(config["User"], "10001:10001", "{config}");
    assert_eq!(config["Entrypoint"], json!(["cohort"]), "{config}");

    let pool = unique("dk-image");
    s.create_work_pool(&pool, "process");
    let name = unique("image-worker");
    let container = unique("cohort-image-worker");
    let started = docker(&[
        "run",
        "-d",
        "--name",
        &container,
        "--network",
        "host",
        "-e",
        &format!("PREFECT_API_URL={}", s.api_url()),
        "-e",
        "PREFECT_WORKER_QUERY_SECONDS=3",
        "-v",
        &flow_mount(),
        &image.0,
        "worker",
        "start",
        "--pool",
        &pool,
        "--type",
        "process",
        "--name",
        &name,
    ]);
    assert!(
        started.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let _container = RemovedContainer(container.clone());
    let dep = s.deploy(&DeploySpec::new(&pool, "hello"));
    let run = s.create_flow_run(&dep.id, &[], json!({}), json!({"name": "image"}));
    let state = s.wait_for_final_state(&run.id, FINAL_TIMEOUT);
    let logs = docker(&["logs", &container]);
    assert_eq!(
        state["type"],
        "COMPLETED",
        "{state}\n{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    // The worker runs as the image's user, not root.
    let uid = docker(&["exec", &container, "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "10001");
    let submitted = s.wait_for_events(
        json!({"related": {"id": [format!("prefect.flow-run.{}", run.id)]},
               "event": {"name": ["prefect.worker.submitted-flow-run"]}}),
        1,
        Duration::from_secs(60),
    );
    assert_eq!(
        submitted[0]["resource"]["prefect.resource.name"], name,
        "{submitted:#?}"
    );
}

/// A container removed when dropped.
struct RemovedContainer(String);

impl Drop for RemovedContainer {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// An image removed when dropped.
struct RemovedImage(String);

impl Drop for RemovedImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}
