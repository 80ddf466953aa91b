//! Injected faults (lost responses, error statuses on watches) and Secrets with owner
//! references, through kube-rs in process and over the loopback server.

mod common;

use std::collections::BTreeMap;

use cohort_kube_fake::{Emulator, EmulatorConfig, Kind};
use common::{prefect_job, within};
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config};
use serde_json::json;

async fn http_client(served: &cohort_kube_fake::Served, dir: &std::path::Path) -> Client {
    let path = served.write_kubeconfig(dir).unwrap();
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}

fn job() -> Job {
    serde_json::from_value(prefect_job("lost-", "run", "img:1", &["x"])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_still_creates_the_job() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let in_process = Client::new(emulator.service(), "default");
    let over_http = http_client(&served, dir.path()).await;
    for (i, client) in [in_process, over_http].into_iter().enumerate() {
        let jobs: Api<Job> = Api::namespaced(client, "prefect");
        emulator.lose_next_response("POST", "/namespaces/prefect/jobs");
        let err = within("the create", jobs.create(&PostParams::default(), &job()))
            .await
            .unwrap_err();
        assert!(
            !matches!(err, kube::Error::Api(_)),
            "no answer, so no API error: {err:?}"
        );
        assert_eq!(
            emulator.jobs("prefect").len(),
            i + 1,
            "the request took effect"
        );
        // The fault is used up: the next create is answered.
        let listed = jobs.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), i + 1);
    }
    let posts = emulator
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_watch_is_retried_by_the_watcher() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let served = emulator.serve().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = http_client(&served, dir.path()).await;
    emulator.fail_next("GET", "watch=true", 500, 1);
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    let jobs: Api<Job> = Api::namespaced(client, "prefect");
    let mut created = false;
    let mut errors = 0;
    loop {
        match within("the watcher", events.next()).await.unwrap() {
            Ok(watcher::Event::InitDone) if !created => {
                jobs.create(&PostParams::default(), &job()).await.unwrap();
                created = true;
            }
            Ok(watcher::Event::Apply(pod)) => {
                assert!(pod.metadata.name.unwrap().starts_with("lost-"));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                assert!(e.to_string().contains("500"), "{e}");
            }
        }
    }
    assert_eq!(errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_crud_and_collected_with_their_owner() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let client = Client::new(emulator.service(), "default");
    let jobs: Api<Job> = Api::namespaced(client.clone(), "prefect");
    let secrets: Api<Secret> = Api::namespaced(client, "prefect");

    let mut owners = Vec::new();
    for _ in 0..2 {
        let created = jobs.create(&PostParams::default(), &job()).await.unwrap();
        owners.push(created);
    }
    let mut made = Vec::new();
    for (i, owner) in owners.iter().enumerate() {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("env-{i}")),
                owner_references: Some(vec![OwnerReference {
                    api_version: "batch/v1".into(),
                    kind: "Job".into(),
                    name: owner.metadata.name.clone().unwrap(),
                    uid: owner.metadata.uid.clone().unwrap(),
                    ..OwnerReference::default()
                }]),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([("TOKEN".to_owned(), "t0".to_owned())])),
            ..Default::default()
        };
        made.push(
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        made[0].data.as_ref().unwrap()["TOKEN"],
        ByteString(b"t0".to_vec())
    );

    // Replace and patch.
    let mut replaced = made[0].clone();
    replaced.data = Some(BTreeMap::from([(
        "TOKEN".to_owned(),
        ByteString(b"t1".to_vec()),
    )]));
    let replaced = secrets
        .replace("env-0", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.data.unwrap()["TOKEN"], ByteString(b"t1".to_vec()));
    let stale = secrets
        .replace("env-0", &PostParams::default(), &made[0])
        .await
        .unwrap_err();
    assert!(matches!(stale, kube::Error::Api(s) if s.code == 409));
    let patched = secrets
        .patch(
            "env-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"EXTRA": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
    assert_eq!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    // Background deletion of an owner takes its Secret along; Orphan leaves it, unowned.
    let background = DeleteParams::background();
    jobs.delete(owners[0].metadata.name.as_ref().unwrap(), &background)
        .await
        .unwrap();
    assert!(emulator.get(Kind::Secret, "prefect", "env-0").is_none());
    jobs.delete(
        owners[1].metadata.name.as_ref().unwrap(),
        &DeleteParams::orphan(),
    )
    .await
    .unwrap();
    let orphan = secrets.get("env-1").await.unwrap();
    assert!(orphan.metadata.owner_references.is_none());
    secrets
        .delete("env-1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(secrets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
}
