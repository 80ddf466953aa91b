//! The `kubernetes` infrastructure against the Kubernetes API emulator (`cohort-kube-fake`,
//! in process, scripted kubelet): no cluster can be run on the test machines. Each test
//! renders prefect-kubernetes' template, prepares and launches a run as the worker does, and
//! drives its pod through the states a cluster would; the end-to-end tests with a real Prefect
//! server and pods as Docker containers are in `crates/cohort/tests/kubernetes.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_events::{Event, RecordingSink, Resource};
use cohort_infra::{
    BoxFuture, EventContext, Infrastructure, KillError, RunReporter, RunSpec, Started,
};
use cohort_kube_fake::{Emulator, EmulatorConfig, Kind, Kubelet};
use cohort_kube_manifest::ManifestSettings;
use cohort_kubernetes::{KubernetesInfrastructure, KubernetesOptions};
use serde_json::{json, Value};
use uuid::Uuid;

const NS: &str = "prefect";
const WAIT: Duration = Duration::from_secs(20);
const POOL_ID: &str = "44444444-4444-4444-8444-444444444444";

/// What the infrastructure told the server, kept.
#[derive(Default)]
struct Reports {
    logs: Mutex<Vec<(u8, String)>>,
    pending: Mutex<Vec<&'static str>>,
}

struct Reporter(Arc<Reports>);

impl RunReporter for Reporter {
    fn log(
        &self,
        _logger: &'static str,
        level: u8,
        messages: Vec<String>,
    ) -> BoxFuture<'static, ()> {
        let mut logs = self.0.logs.lock().unwrap();
        logs.extend(messages.into_iter().map(|m| (level, m)));
        Box::pin(async {})
    }

    fn propose_pending(
        &self,
        name: &'static str,
        _message: &'static str,
    ) -> BoxFuture<'static, ()> {
        self.0.pending.lock().unwrap().push(name);
        Box::pin(async {})
    }
}

struct Cluster {
    emulator: Emulator,
    infra: KubernetesInfrastructure,
    sink: Arc<RecordingSink>,
    reports: Arc<Reports>,
    /// The pool's base job template (prefect-kubernetes' unless a test changes it).
    template: Value,
}

fn cluster() -> Cluster {
    cluster_with(ManifestSettings::default())
}

fn cluster_with(settings: ManifestSettings) -> Cluster {
    cluster_with_options(KubernetesOptions {
        manifest: settings,
        ..KubernetesOptions::default()
    })
}

fn cluster_with_options(options: KubernetesOptions) -> Cluster {
    let emulator = Emulator::new(EmulatorConfig::with_kubelet(Kubelet::Scripted {
        auto_schedule: true,
    }));
    let infra = infrastructure_with_options(&emulator, options);
    Cluster {
        emulator,
        infra,
        sink: Arc::new(RecordingSink::default()),
        reports: Arc::new(Reports::default()),
        template: serde_json::from_str(cohort_kube_manifest::BASE_JOB_TEMPLATE).unwrap(),
    }
}

/// Another worker (fresh clients and observers) on the same cluster.
fn infrastructure(emulator: &Emulator) -> KubernetesInfrastructure {
    infrastructure_with_options(emulator, KubernetesOptions::default())
}

fn infrastructure_with_options(
    emulator: &Emulator,
    options: KubernetesOptions,
) -> KubernetesInfrastructure {
    let client = kube::Client::new(emulator.service(), "default");
    KubernetesInfrastructure::with_client(
        client,
        KubernetesOptions {
            namespaces: vec![NS.into()],
            prefect_version: "3.8.8".into(),
            ..options
        },
    )
}

impl Cluster {
    /// prefect-kubernetes' template rendered with `variables` and prepared for a new run.
    fn prepare(&self, variables: Value) -> (Uuid, Box<dyn cohort_infra::Job>) {
        self.prepare_with_env(variables, &[])
    }

    fn prepare_with_env(
        &self,
        variables: Value,
        worker_env: &[(&str, &str)],
    ) -> (Uuid, Box<dyn cohort_infra::Job>) {
        let id = Uuid::new_v4();
        let template = &self.template;
        let mut values = json!({"namespace": NS, "image": "prefecthq/prefect:3.8.8-python3.11"});
        for (k, v) in variables.as_object().unwrap() {
            values[k] = v.clone();
        }
        let config =
            cohort_template::render(template, values.as_object().unwrap(), &|_| None).unwrap();
        let labels = BTreeMap::from([
            ("prefect.io/flow-run-id".to_owned(), id.to_string()),
            (
                "prefect.io/flow-run-name".to_owned(),
                "witty-otter".to_owned(),
            ),
            ("prefect.io/version".to_owned(), "3.8.8".to_owned()),
            (
                "prefect.io/work-pool-name".to_owned(),
                "k8s-pool".to_owned(),
            ),
            ("prefect.io/work-pool-id".to_owned(), POOL_ID.to_owned()),
            (
                "prefect.io/worker-name".to_owned(),
                "My K8s Worker".to_owned(),
            ),
            ("prefect.io/flow-id".to_owned(), Uuid::new_v4().to_string()),
            ("prefect.io/flow-name".to_owned(), "hello".to_owned()),
        ]);
        let spec = RunSpec {
            flow_run_id: id,
            flow_run_name: "witty-otter".into(),
            env: [("PREFECT__FLOW_RUN_ID".to_owned(), id.to_string())]
                .into_iter()
                .chain(
                    worker_env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                )
                .collect(),
            labels,
            events: EventContext {
                sink: self.sink.clone(),
                worker: Resource::new("prefect.worker.kubernetes.my-k8s-worker"),
                related: Vec::new(),
            },
            reporter: Arc::new(Reporter(self.reports.clone())),
        };
        (id, self.infra.prepare(&config, spec).unwrap())
    }

    async fn launch(&self, variables: Value) -> (Uuid, Box<dyn Started>, String) {
        let (id, job) = self.prepare(variables);
        let started = job.launch().await.expect("the Job is created");
        let pod = self.pod_of(id).await;
        (id, started, pod)
    }

    async fn pod_of(&self, id: Uuid) -> String {
        let pod = self
            .emulator
            .wait_for_pod(NS, &format!("prefect.io/flow-run-id={id}"), WAIT)
            .await
            .expect("the Job controller made a pod");
        pod["metadata"]["name"].as_str().unwrap().to_owned()
    }

    fn jobs_of(&self, id: Uuid) -> Vec<Value> {
        self.emulator
            .jobs(NS)
            .into_iter()
            .filter(|j| j["metadata"]["labels"]["prefect.io/flow-run-id"] == id.to_string())
            .collect()
    }

    fn pod_events(&self) -> Vec<Event> {
        self.sink
            .events()
            .into_iter()
            .filter(|e| e.event.starts_with("prefect.kubernetes.pod."))
            .collect()
    }

    async fn wait_for_events(&self, names: &[&str]) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let events = self.pod_events();
            let got: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
            if got == names || tokio::time::Instant::now() > deadline {
                assert_eq!(got, names);
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn wait(started: &mut Box<dyn Started>) -> i64 {
    tokio::time::timeout(WAIT, started.wait())
        .await
        .expect("the run ended in time")
        .expect("the run was followed to its end")
}

#[tokio::test]
async fn a_completed_job_ends_with_zero_and_prefects_pod_events() {
    let c = cluster();
    let (id, mut started, pod) = c.launch(json!({})).await;
    let job = &c.jobs_of(id)[0];
    let name = job["metadata"]["name"].as_str().unwrap();
    assert_eq!(started.identifier(), format!("{NS}:{name}"));
    // The name is the template's generateName and a suffix of Kubernetes' alphabet.
    assert!(
        name.starts_with("witty-otter-") && name.len() == "witty-otter-".len() + 5,
        "{name}"
    );

    c.emulator.pod_running(NS, &pod).unwrap();
    c.emulator.pod_exit(NS, &pod, 0, "Completed").unwrap();
    assert_eq!(wait(&mut started).await, 0);

    let events = c
        .wait_for_events(&[
            "prefect.kubernetes.pod.pending",
            "prefect.kubernetes.pod.running",
            "prefect.kubernetes.pod.succeeded",
        ])
        .await;
    let flow_run = &events[0].related[0];
    assert_eq!(flow_run.id(), format!("prefect.flow-run.{id}"));
    assert_eq!(events[1].follows, Some(events[0].id));
    assert_eq!(events[2].resource.get("kubernetes.namespace"), Some(NS));
    assert_eq!(
        *c.reports.pending.lock().unwrap(),
        vec!["InfrastructurePending"]
    );
}

#[tokio::test]
async fn a_failed_job_ends_with_the_flow_containers_code_and_names_an_oom_kill() {
    let c = cluster();
    let (_, mut started, pod) = c.launch(json!({})).await;
    c.emulator.pod_running(NS, &pod).unwrap();
    c.emulator.pod_exit(NS, &pod, 137, "OOMKilled").unwrap();
    assert_eq!(wait(&mut started).await, 137);
    let message = started.crashed_message(137);
    assert!(
        message.contains("OOMKilled") && message.contains(&pod),
        "{message}"
    );
    let events = c
        .wait_for_events(&[
            "prefect.kubernetes.pod.pending",
            "prefect.kubernetes.pod.running",
            "prefect.kubernetes.pod.evicted",
        ])
        .await;
    assert_eq!(
        events[2].resource.get("kubernetes.reason"),
        Some("OOMKilled")
    );
    assert_eq!(
        events[2].resource.get("kubernetes.diagnosis"),
        Some("OOMKilled")
    );
    // The diagnosis is in the run's log, as the observer writes it.
    let logs = c.reports.logs.lock().unwrap().clone();
    assert!(
        logs.iter()
            .any(|(level, m)| *level == 40 && m.contains("out-of-memory")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn a_pod_that_fails_while_the_job_has_retries_left_is_not_the_end() {
    let c = cluster();
    let (id, mut started, first) = c.launch(json!({"backoff_limit": 1})).await;
    c.emulator.pod_running(NS, &first).unwrap();
    c.emulator.pod_exit(NS, &first, 1, "Error").unwrap();
    // The Job controller makes a second pod; the run goes on in it.
    let second = c
        .emulator
        .wait_until(WAIT, |e| {
            e.pods(NS).into_iter().find_map(|p| {
                let name = p["metadata"]["name"].as_str()?.to_owned();
                (p["metadata"]["labels"]["prefect.io/flow-run-id"] == id.to_string()
                    && name != first)
                    .then_some(name)
            })
        })
        .await
        .expect("a replacement pod");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), started.wait())
            .await
            .is_err()
    );
    c.emulator.pod_running(NS, &second).unwrap();
    c.emulator.pod_exit(NS, &second, 0, "Completed").unwrap();
    assert_eq!(wait(&mut started).await, 0);
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_crashes_the_run_after_the_start_timeout() {
    let c = cluster();
    let (id, mut started, pod) = c.launch(json!({"pod_watch_timeout_seconds": 1})).await;
    c.emulator
        .pod_image_pull_backoff(NS, &pod, "Back-off pulling image \"nope:1\"")
        .unwrap();
    assert_eq!(wait(&mut started).await, -1);
    let message = started.crashed_message(-1);
    assert!(
        message.starts_with("Image pull failed for container 'prefect-job'")
            && message.contains("within 1 s"),
        "{message}"
    );
    // Given up: the Job is deleted, not left to pile up.
    let gone = c
        .emulator
        .wait_until(WAIT, |_| c.jobs_of(id).is_empty().then_some(()))
        .await;
    assert!(gone.is_some(), "the Job was deleted");
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_makes_one_job() {
    let c = cluster();
    c.emulator.lose_next_response("POST", "/jobs");
    let (id, started, _) = c.launch(json!({})).await;
    assert_eq!(c.jobs_of(id).len(), 1);
    let posts = c
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .count();
    assert_eq!(posts, 2, "the create was retried");
    assert!(started.identifier().starts_with("prefect:witty-otter-"));
}

#[tokio::test]
async fn a_job_deleted_by_hand_crashes_the_run_with_prefects_message() {
    let c = cluster();
    let (id, mut started, _) = c.launch(json!({})).await;
    let name = c.jobs_of(id)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    c.emulator
        .delete(
            Kind::Job,
            NS,
            &name,
            &cohort_kube_fake::DeleteOptions {
                propagation_policy: Some(cohort_kube_fake::PropagationPolicy::Background),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(wait(&mut started).await, -1);
    assert_eq!(started.crashed_message(-1), "Kubernetes job was deleted");
}

#[tokio::test]
async fn a_stopped_run_has_its_job_deleted_in_the_foreground() {
    let c = cluster();
    let (id, mut started, pod) = c.launch(json!({})).await;
    c.emulator.pod_running(NS, &pod).unwrap();
    let code = tokio::time::timeout(
        WAIT,
        started.stop(
            Duration::from_secs(1),
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("stopped in time")
    .expect("stopped");
    // The scripted kubelet kills a container still running when the grace runs out.
    assert_eq!(code, 137);
    assert!(c.jobs_of(id).is_empty());
    let delete = c
        .emulator
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE" && r.path.contains("/jobs/"))
        .expect("a DELETE");
    let body = delete.body.expect("kube sends DeleteOptions as a body");
    assert_eq!(body["propagationPolicy"], "Foreground");
    assert_eq!(body["gracePeriodSeconds"], 1);
}

#[tokio::test]
async fn kill_deletes_a_job_by_identifier_and_says_when_there_is_none() {
    let c = cluster();
    let (id, started, _) = c.launch(json!({})).await;
    c.infra
        .kill(&started.identifier(), None, Duration::from_secs(0))
        .await
        .expect("deleted");
    let gone = c
        .emulator
        .wait_until(WAIT, |_| c.jobs_of(id).is_empty().then_some(()))
        .await;
    assert!(gone.is_some());
    assert!(matches!(
        c.infra
            .kill("prefect:no-such-job", None, Duration::ZERO)
            .await,
        Err(KillError::NotFound)
    ));
    // prefect-kubernetes before 0.6.0 wrote `<cluster uid>:<namespace>:<job>`.
    assert!(matches!(
        c.infra
            .kill("uid:prefect:no-such-job", None, Duration::ZERO)
            .await,
        Err(KillError::NotFound)
    ));
}

#[tokio::test]
async fn watches_that_drop_or_expire_do_not_end_the_supervision() {
    let c = cluster();
    let (_, mut started, pod) = c.launch(json!({})).await;
    c.emulator.pod_running(NS, &pod).unwrap();
    c.emulator.drop_watches();
    c.emulator.compact();
    c.emulator.pod_exit(NS, &pod, 3, "Error").unwrap();
    assert_eq!(wait(&mut started).await, 3);
}

#[tokio::test]
async fn a_missing_namespace_is_refused_with_prefects_hint() {
    let c = cluster();
    let (_, job) = c.prepare(json!({"namespace": "nowhere"}));
    let Err(e) = job.launch().await else {
        panic!("launched into a missing namespace")
    };
    assert!(
        e.starts_with("Unable to create Kubernetes job: NotFound:")
            && e.ends_with("Hint: Verify that the namespace 'nowhere' exists in the cluster."),
        "{e}"
    );
}

#[tokio::test]
async fn a_restarted_worker_finds_its_running_jobs_by_label_and_follows_them() {
    let c = cluster();
    let (id, started, pod) = c.launch(json!({})).await;
    let identifier = started.identifier();
    drop(started);
    let pool = Uuid::parse_str(POOL_ID).unwrap();

    let after = infrastructure(&c.emulator);
    assert_eq!(after.orphans("My K8s Worker", pool, &[]).await, vec![id]);
    assert!(after.orphans("My K8s Worker", pool, &[id]).await.is_empty());
    assert!(after.orphans("another worker", pool, &[]).await.is_empty());
    let mut adopted = after.adopt(id, None, None).await.expect("re-adopted");
    assert_eq!(adopted.identifier(), identifier);
    c.emulator.pod_running(NS, &pod).unwrap();
    c.emulator.pod_exit(NS, &pod, 0, "Completed").unwrap();
    assert_eq!(wait(&mut adopted).await, 0);
    // A Job that ended is no orphan.
    assert!(after.orphans("My K8s Worker", pool, &[]).await.is_empty());
}

#[tokio::test]
async fn env_secrets_are_owned_by_their_job_and_the_api_key_secret_goes_with_the_worker() {
    let c = cluster_with(ManifestSettings {
        store_env_as_secret: true,
        create_secret_for_api_key: true,
        ..ManifestSettings::default()
    });
    let worker_env = [
        ("PREFECT_API_KEY", "pnu_not_a_real_key"),
        ("PREFECT__WORKER_NAME", "My K8s Worker"),
    ];
    let (id, job) = c.prepare_with_env(json!({"env": {"EXTRA": "1"}}), &worker_env);
    let _started = job.launch().await.expect("launched");
    let job = &c.jobs_of(id)[0];
    let (job_name, job_uid) = (
        job["metadata"]["name"].as_str().unwrap(),
        job["metadata"]["uid"].as_str().unwrap(),
    );
    let secrets = c.emulator.list(Kind::Secret, Some(NS));
    let env_secret = secrets
        .iter()
        .find(|s| {
            s["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("witty-otter-env-")
        })
        .expect("the env Secret");
    assert_eq!(env_secret["metadata"]["ownerReferences"][0]["uid"], job_uid);
    assert_eq!(
        env_secret["metadata"]["ownerReferences"][0]["name"],
        job_name
    );
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        env_secret["metadata"]["name"]
    );
    let api_key = "prefect-my-k8s-worker-api-key";
    assert!(
        c.emulator.get(Kind::Secret, NS, api_key).is_some(),
        "{secrets:#?}"
    );

    // The API key Secret goes when the worker stops; the env Secret with its Job.
    c.infra.shutdown().await;
    assert!(c.emulator.get(Kind::Secret, NS, api_key).is_none());
    c.infra
        .kill(&format!("{NS}:{job_name}"), None, Duration::ZERO)
        .await
        .unwrap();
    let env_name = env_secret["metadata"]["name"].as_str().unwrap().to_owned();
    let collected = c
        .emulator
        .wait_until(WAIT, |e| {
            e.get(Kind::Secret, NS, &env_name).is_none().then_some(())
        })
        .await;
    assert!(
        collected.is_some(),
        "the env Secret was collected with its Job"
    );
}

#[tokio::test]
async fn the_env_secret_of_a_job_that_could_not_be_created_is_deleted() {
    let c = cluster_with(ManifestSettings {
        store_env_as_secret: true,
        ..ManifestSettings::default()
    });
    c.emulator.fail_next("POST", "/jobs", 403, 1);
    let (_, job) = c.prepare(json!({"env": {"EXTRA": "1"}}));
    let Err(e) = job.launch().await else {
        panic!("created despite a 403")
    };
    assert!(
        e.contains("Hint: Check that your service account has the required RBAC permissions"),
        "{e}"
    );
    assert!(c.emulator.list(Kind::Secret, Some(NS)).is_empty());
}

/// The Job POSTs a create made, in order.
fn job_posts(c: &Cluster) -> usize {
    c.emulator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .count()
}

#[tokio::test]
async fn refusals_are_not_retried_and_say_what_was_refused() {
    for (code, expect) in [
        (401, "Unable to create Kubernetes job: "),
        (
            403,
            "Hint: Check that your service account has the required RBAC permissions for this operation.",
        ),
        (422, "Unable to create Kubernetes job: "),
    ] {
        let c = cluster();
        c.emulator.fail_next("POST", "/jobs", code, 3);
        let (_, job) = c.prepare(json!({}));
        let Err(e) = job.launch().await else { panic!("{code}: created") };
        assert!(e.contains(expect), "{code}: {e}");
        assert_eq!(job_posts(&c), 1, "{code} was retried");
    }
}

#[tokio::test]
async fn overload_and_server_errors_are_retried_three_times_in_all() {
    // Two failures, then the create goes through.
    for code in [429, 500, 503] {
        let c = cluster();
        c.emulator.fail_next("POST", "/jobs", code, 2);
        let (id, job) = c.prepare(json!({}));
        job.launch().await.unwrap_or_else(|e| panic!("{code}: {e}"));
        assert_eq!((job_posts(&c), c.jobs_of(id).len()), (3, 1), "{code}");
    }
    // Three failures: the run cannot start, with the server's words.
    let c = cluster();
    c.emulator.fail_next("POST", "/jobs", 503, 3);
    let (_, job) = c.prepare(json!({}));
    let Err(e) = job.launch().await else {
        panic!("created")
    };
    assert!(e.starts_with("Unable to create Kubernetes job: "), "{e}");
    assert_eq!(job_posts(&c), 3);
}

#[tokio::test]
async fn the_job_is_posted_to_the_namespace_variable_as_rendered() {
    let c = cluster();
    let (_, started, _) = c.launch(json!({"cpu_request": "250m"})).await;
    let post = c
        .emulator
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/jobs"))
        .unwrap();
    assert_eq!(post.path, format!("/apis/batch/v1/namespaces/{NS}/jobs"));
    let body = post.body.unwrap();
    // The name is fixed before the POST; everything else is the rendered manifest.
    let name = body["metadata"]["name"].as_str().unwrap();
    assert_eq!(started.identifier(), format!("{NS}:{name}"));
    assert!(body["metadata"].get("generateName").is_none());
    let container = &body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["resources"]["requests"]["cpu"], "250m");
    assert_eq!(container["resources"]["limits"], json!({}));
    assert_eq!(body["spec"]["backoffLimit"], 0);
}

#[tokio::test]
async fn an_unschedulable_pod_crashes_its_run_after_the_scheduled_timeout() {
    let c = cluster_with_options(KubernetesOptions {
        scheduled_timeout: Some(Duration::from_secs(1)),
        ..KubernetesOptions::default()
    });
    let (id, mut started, pod) = c.launch(json!({})).await;
    c.emulator
        .pod_unschedulable(NS, &pod, "0/3 nodes are available: 3 Insufficient memory.")
        .unwrap();
    assert_eq!(wait(&mut started).await, -1);
    let message = started.crashed_message(-1);
    assert!(
        message.starts_with("Pod is unschedulable: Kubernetes cannot find a suitable node")
            && message.contains("was not scheduled within 1 s"),
        "{message}"
    );
    let events = c.pod_events();
    assert_eq!(
        events[events.len() - 1]
            .resource
            .get("kubernetes.diagnosis"),
        Some("Unschedulable.InsufficientResources")
    );
    let gone = c
        .emulator
        .wait_until(WAIT, |_| c.jobs_of(id).is_empty().then_some(()))
        .await;
    assert!(gone.is_some(), "the Job was deleted");
}

#[tokio::test]
async fn an_unschedulable_pod_waits_when_no_scheduled_timeout_is_set() {
    let c = cluster();
    let (_, mut started, pod) = c.launch(json!({"pod_watch_timeout_seconds": 1})).await;
    c.emulator
        .pod_unschedulable(NS, &pod, "0/3 nodes are available: 3 Insufficient memory.")
        .unwrap();
    // As in Prefect: a node may yet come (an autoscaler).
    assert!(tokio::time::timeout(Duration::from_secs(3), started.wait())
        .await
        .is_err());
}

#[tokio::test]
async fn a_job_past_its_active_deadline_is_crashed_as_such() {
    let mut c = cluster();
    let spec = &mut c.template["job_configuration"]["job_manifest"]["spec"];
    spec["activeDeadlineSeconds"] = json!(1);
    spec["template"]["spec"]["terminationGracePeriodSeconds"] = json!(1);
    let (_, mut started, pod) = c.launch(json!({})).await;
    c.emulator.pod_running(NS, &pod).unwrap();
    let code = wait(&mut started).await;
    let message = started.crashed_message(code);
    assert!(
        message.contains("exceeded its active deadline"),
        "{code}: {message}"
    );
}
