//! kube-rs 5 (the client Cohort's worker uses) against the emulator, in process and over
//! the loopback server with a kubeconfig.

mod common;

use std::time::Duration;

use cohort_kube_fake::{Emulator, EmulatorConfig, Kind};
use common::{condition, name_of, prefect_job, within};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use serde_json::Value;

const RUN_ID: &str = "33333333-3333-4333-8333-333333333333";

fn in_process(emulator: &Emulator) -> Client {
    Client::new(emulator.service(), "default")
}

async fn over_http(served: &cohort_kube_fake::Served, dir: &std::path::Path) -> Client {
    let path = served.write_kubeconfig(dir).expect("write the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a config from the kubeconfig");
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).expect("a client")
}

/// Create a Job with generateName, see its pod through a label-selected watcher, script it
/// to success, see the Job complete, delete it in the foreground and see both gone.
async fn job_lifecycle(emulator: &Emulator, client: Client) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "prefect");
    let manifest: Job = serde_json::from_value(prefect_job(
        "witty-otter-",
        RUN_ID,
        "prefecthq/prefect:3.8.8-python3.11",
        &["prefect", "flow-run", "execute"],
    ))
    .unwrap();
    let created = within("create", jobs.create(&PostParams::default(), &manifest))
        .await
        .expect("the Job is created");
    let job_name = created.metadata.name.clone().unwrap();
    assert!(job_name.starts_with("witty-otter-") && job_name.len() == "witty-otter-".len() + 5);
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.resource_version.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.spec.as_ref().unwrap().backoff_limit, Some(0));

    let pods: Api<Pod> = Api::all(client.clone());
    let mut applied = watcher(
        pods,
        watcher::Config::default().labels("prefect.io/flow-run-id"),
    )
    .applied_objects()
    .boxed();
    let pod = within("the pod appears", applied.try_next())
        .await
        .expect("the watcher works")
        .expect("a pod");
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["batch.kubernetes.io/job-name"], job_name);
    assert_eq!(labels["job-name"], job_name);
    assert_eq!(
        labels["controller-uid"],
        created.metadata.uid.clone().unwrap()
    );
    assert_eq!(labels["prefect.io/flow-run-id"], RUN_ID);
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("Job", Some(true)));
    let pod_name = pod.metadata.name.clone().unwrap();
    assert!(pod_name.starts_with(&format!("{job_name}-")));
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );

    emulator.pod_running("prefect", &pod_name).unwrap();
    let p = until_phase(&mut applied, "Running").await;
    let cs = &p
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert!(cs
        .state
        .as_ref()
        .unwrap()
        .running
        .as_ref()
        .unwrap()
        .started_at
        .is_some());
    emulator
        .pod_exit("prefect", &pod_name, 0, "Completed")
        .unwrap();
    let p = until_phase(&mut applied, "Succeeded").await;
    let cs = &p
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    let t = cs.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));

    let done = within(
        "the Job completes",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Job, "prefect", &job_name)
                .filter(|j| condition(j, "Complete").is_some())
        }),
    )
    .await
    .expect("the Job completes");
    assert!(condition(&done, "SuccessCriteriaMet").is_some());
    let job = jobs.get(&job_name).await.unwrap();
    let status = job.status.unwrap();
    assert_eq!(status.succeeded, Some(1));
    assert!(status.completion_time.is_some() && status.start_time.is_some());
    let complete = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Complete")
        .unwrap();
    assert_eq!(complete.status, "True");

    let dp = DeleteParams {
        grace_period_seconds: Some(30),
        ..DeleteParams::foreground()
    };
    within("delete", jobs.delete(&job_name, &dp))
        .await
        .expect("the Job is deleted");
    within(
        "the Job and its pod go",
        emulator.wait_until(common::STEP, |e| {
            (e.get(Kind::Job, "prefect", &job_name).is_none()
                && e.get(Kind::Pod, "prefect", &pod_name).is_none())
            .then_some(())
        }),
    )
    .await
    .expect("the Job and its pod are gone");
    let err = jobs.get(&job_name).await.unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lifecycle_in_process() {
    let emulator = Emulator::new(EmulatorConfig::default());
    job_lifecycle(&emulator, in_process(&emulator)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lifecycle_over_http_with_a_kubeconfig() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = over_http(&served, dir.path()).await;
    job_lifecycle(&emulator, client).await;
    let requests = emulator.requests();
    assert!(requests
        .iter()
        .all(|r| r.from == cohort_kube_fake::Transport::Http));
    let delete = requests.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(
        delete.body.as_ref().unwrap()["propagationPolicy"],
        "Foreground"
    );
}

/// Served as a pod sees its API server: the whole lifecycle over HTTPS with the cluster CA and
/// the token; without the token the answer is 401 `Unauthorized`, and a client that does
/// not trust the cluster CA does not get through the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lifecycle_over_https_with_a_service_account_token() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve_in_cluster("sa-token-1").await.unwrap();
    assert!(
        served.url().starts_with("https://127.0.0.1:"),
        "{}",
        served.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let client = over_http(&served, dir.path()).await;
    job_lifecycle(&emulator, client).await;
    assert!(emulator
        .requests()
        .iter()
        .all(|r| r.from == cohort_kube_fake::Transport::Https));

    let anonymous = served
        .kubeconfig()
        .replace("token: sa-token-1", "token: another");
    let kubeconfig = Kubeconfig::from_yaml(&anonymous).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(Client::try_from(config).unwrap(), "prefect");
    match jobs.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
        }
        other => panic!("a wrong token must be refused: {other:?}"),
    }

    let other_ca = emulator.serve_in_cluster("sa-token-1").await.unwrap();
    let untrusted = served.kubeconfig().replace(&served.url(), &other_ca.url());
    let kubeconfig = Kubeconfig::from_yaml(&untrusted).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(Client::try_from(config).unwrap(), "prefect");
    let refused = jobs.list(&ListParams::default()).await;
    assert!(
        matches!(refused, Err(ref e) if !matches!(e, kube::Error::Api(_))),
        "a server certificate of another CA must fail the handshake: {refused:?}"
    );
}

/// After compaction and dropped watches, the watcher's resumed watch gets 410 and it lists
/// again (Init, InitApply, InitDone), then carries on with new events.
async fn relist_after_compaction(emulator: &Emulator, client: Client) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "prefect");
    let manifest: Job =
        serde_json::from_value(prefect_job("relist-", RUN_ID, "busybox:1", &["true"])).unwrap();
    jobs.create(&PostParams::default(), &manifest)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(
        pods,
        watcher::Config::default().labels("prefect.io/flow-run-id"),
    )
    .boxed();
    let mut seen_init_apply = 0;
    loop {
        match within("initial list", events.next()).await.unwrap() {
            Ok(watcher::Event::Init) => {}
            Ok(watcher::Event::InitApply(_)) => seen_init_apply += 1,
            Ok(watcher::Event::InitDone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen_init_apply, 1);
    // The watcher opens its watch only when polled: poll until the watch request arrives.
    let watching = |e: &Emulator| {
        e.requests()
            .iter()
            .any(|r| r.query_param("watch") == Some("true"))
    };
    for _ in 0..100 {
        if watching(emulator) {
            break;
        }
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(100), events.next()).await
        {
            panic!("unexpected {event:?}");
        }
    }
    assert!(watching(emulator), "the watcher never watched");

    emulator.compact();
    emulator.drop_watches();
    let mut errors = 0;
    loop {
        match within("re-list", events.next()).await.unwrap() {
            Err(_) => errors += 1,
            Ok(watcher::Event::Init) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        errors >= 1,
        "the dropped watch and the 410 surface as errors"
    );
    let mut relisted = 0;
    loop {
        match within("re-list", events.next()).await.unwrap() {
            Ok(watcher::Event::InitApply(_)) => relisted += 1,
            Ok(watcher::Event::InitDone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(relisted, 1);
    let expired = emulator
        .requests()
        .iter()
        .filter(|r| r.query_param("watch") == Some("true"))
        .count();
    assert!(expired >= 2, "the watcher watched again before re-listing");

    // And it carries on: a second Job's pod arrives as an Apply.
    let manifest: Job =
        serde_json::from_value(prefect_job("after-", RUN_ID, "busybox:1", &["true"])).unwrap();
    let second = jobs
        .create(&PostParams::default(), &manifest)
        .await
        .unwrap();
    let second = second.metadata.name.unwrap();
    loop {
        match within("a new pod after the re-list", events.next())
            .await
            .unwrap()
        {
            Ok(watcher::Event::Apply(p)) => {
                if p.labels()["job-name"] == second {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

use kube::ResourceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_in_process() {
    let emulator = Emulator::new(EmulatorConfig::default());
    relist_after_compaction(&emulator, in_process(&emulator)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_over_http() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = over_http(&served, dir.path()).await;
    relist_after_compaction(&emulator, client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_503_surfaces_as_an_error_and_then_clears() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let client = in_process(&emulator);
    let jobs: Api<Job> = Api::namespaced(client, "prefect");
    emulator.fail_next("GET", "/apis/batch/v1/namespaces/prefect/jobs", 503, 1);
    match jobs.list(&ListParams::default()).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"))
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(jobs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_namespace_is_404_like_the_apiserver() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for client in [in_process(&emulator), over_http(&served, dir.path()).await] {
        let jobs: Api<Job> = Api::namespaced(client, "nowhere");
        let manifest: Job =
            serde_json::from_value(prefect_job("x-", RUN_ID, "busybox:1", &["true"])).unwrap();
        match jobs
            .create(&PostParams::default(), &manifest)
            .await
            .unwrap_err()
        {
            kube::Error::Api(s) => {
                assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
                assert_eq!(s.message, "namespaces \"nowhere\" not found");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }
    let last: Value = emulator.requests().last().unwrap().body.clone().unwrap();
    assert_eq!(name_of(&last), "");
}

/// The watched pod's next version in `phase`.
async fn until_phase(
    applied: &mut (impl futures_util::Stream<Item = Result<Pod, watcher::Error>> + Unpin),
    phase: &str,
) -> Pod {
    loop {
        let p = within(phase, applied.try_next()).await.unwrap().unwrap();
        if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase) {
            return p;
        }
    }
}
