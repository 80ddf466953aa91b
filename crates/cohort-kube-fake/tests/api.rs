//! The emulated apiserver's semantics, over raw requests to the in-process service:
//! watches (selectors, resumption, bookmarks, timeouts), paging, preconditions, patches,
//! deletion policies, and the Job controller's counters, retries, deadlines and TTL.

mod common;

use std::time::Duration;

use bytes::Bytes;
use cohort_kube_fake::{Emulator, EmulatorConfig, EmulatorService, Kind};
use common::{condition, name_of, prefect_job, within};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::Service;

struct Client(EmulatorService);

impl Client {
    async fn send(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        content_type: &str,
    ) -> http::Response<cohort_kube_fake::ResponseBody> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(Full::new(bytes))
            .unwrap();
        self.0.clone().call(req).await.expect("the service answers")
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (u16, Value) {
        self.call_typed(method, uri, body, "application/json").await
    }

    async fn call_typed(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        content_type: &str,
    ) -> (u16, Value) {
        let response = self.send(method, uri, body, content_type).await;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn watch(&self, uri: &str) -> Watch {
        let response = self.send("GET", uri, None, "application/json").await;
        assert_eq!(response.status(), 200);
        Watch {
            body: response.into_body(),
            buffer: Vec::new(),
        }
    }
}

struct Watch {
    body: cohort_kube_fake::ResponseBody,
    buffer: Vec<u8>,
}

impl Watch {
    /// The next event, or None when the stream ends (Err when it ends abruptly).
    async fn next(&mut self) -> Result<Option<(String, Value)>, cohort_kube_fake::BodyError> {
        loop {
            if let Some(i) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=i).collect();
                let event: Value = serde_json::from_slice(&line).unwrap();
                return Ok(Some((
                    event["type"].as_str().unwrap().to_owned(),
                    event["object"].clone(),
                )));
            }
            match within("a watch event", self.body.frame()).await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => self.buffer.extend_from_slice(&frame.into_data().unwrap()),
            }
        }
    }

    /// The next event that is not a BOOKMARK.
    async fn next_change(&mut self) -> (String, Value) {
        loop {
            let (kind, obj) = self.next().await.unwrap().expect("an event");
            if kind != "BOOKMARK" {
                return (kind, obj);
            }
        }
    }
}

fn setup() -> (Emulator, Client) {
    let emulator = Emulator::new(EmulatorConfig {
        bookmark_interval: Duration::from_millis(200),
        ..EmulatorConfig::default()
    });
    let client = Client(emulator.service());
    (emulator, client)
}

fn secret(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels}, "stringData": {"k": "v"}})
}

const SECRETS: &str = "/api/v1/namespaces/default/secrets";

#[tokio::test]
async fn create_conflicts_and_validation_are_status_errors() {
    let (_emulator, client) = setup();
    let (code, created) = client
        .call("POST", SECRETS, Some(secret("s", json!({}))))
        .await;
    assert_eq!(code, 201);
    assert_eq!(
        created["data"]["k"], "dg==",
        "stringData is folded into data"
    );
    assert!(created.get("stringData").is_none());
    assert_eq!(created["type"], "Opaque");
    let (code, status) = client
        .call("POST", SECRETS, Some(secret("s", json!({}))))
        .await;
    assert_eq!(code, 409);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "AlreadyExists");
    assert_eq!(status["message"], "secrets \"s\" already exists");
    assert_eq!(status["details"], json!({"name": "s", "kind": "secrets"}));

    let mut job = prefect_job("bad-", "r", "img:1", &["x"]);
    job["spec"]["template"]["spec"]["containers"] = json!([]);
    let (code, status) = client
        .call("POST", "/apis/batch/v1/namespaces/default/jobs", Some(job))
        .await;
    assert_eq!(code, 422);
    assert_eq!(status["reason"], "Invalid");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.template.spec.containers"
    );

    let (code, status) = client
        .call("GET", "/apis/batch/v1/namespaces/default/jobs/nope", None)
        .await;
    assert_eq!(code, 404);
    assert_eq!(status["message"], "jobs.batch \"nope\" not found");
    assert_eq!(
        status["details"],
        json!({"name": "nope", "group": "batch", "kind": "jobs"})
    );
    let (code, _) = client
        .call("GET", "/apis/networking.k8s.io/v1/ingresses", None)
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn replace_checks_the_resource_version_and_patches_merge() {
    let (_emulator, client) = setup();
    let (_, created) = client
        .call("POST", SECRETS, Some(secret("s", json!({"a": "1"}))))
        .await;
    let mut stale = created.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, status) = client
        .call("PUT", &format!("{SECRETS}/s"), Some(stale))
        .await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));

    let mut fresh = created.clone();
    fresh["metadata"]["labels"]["b"] = json!("2");
    let (code, replaced) = client
        .call("PUT", &format!("{SECRETS}/s"), Some(fresh))
        .await;
    assert_eq!(code, 200);
    assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);
    assert!(
        replaced["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > created["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
    );

    let patch = json!({"metadata": {"labels": {"a": null, "c": "3"}}});
    let (code, patched) = client
        .call_typed(
            "PATCH",
            &format!("{SECRETS}/s"),
            Some(patch),
            "application/merge-patch+json",
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(patched["metadata"]["labels"], json!({"b": "2", "c": "3"}));
    let ops = json!([{"op": "add", "path": "/metadata/labels/d", "value": "4"}]);
    let (code, patched) = client
        .call_typed(
            "PATCH",
            &format!("{SECRETS}/s"),
            Some(ops),
            "application/json-patch+json",
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(patched["metadata"]["labels"]["d"], "4");
    let (code, _) = client
        .call_typed(
            "PATCH",
            &format!("{SECRETS}/s"),
            Some(json!({})),
            "application/apply-patch+yaml",
        )
        .await;
    assert_eq!(code, 415);
}

#[tokio::test]
async fn lists_page_with_limit_and_continue() {
    let (_emulator, client) = setup();
    for i in 0..5 {
        client
            .call(
                "POST",
                SECRETS,
                Some(secret(&format!("s{i}"), json!({"n": i.to_string()}))),
            )
            .await;
    }
    let mut names = Vec::new();
    let mut uri = format!("{SECRETS}?limit=2");
    loop {
        let (code, page) = client.call("GET", &uri, None).await;
        assert_eq!(code, 200);
        assert_eq!(page["kind"], "SecretList");
        assert!(
            page["items"][0].get("kind").is_none(),
            "list items carry no kind"
        );
        names.extend(page["items"].as_array().unwrap().iter().map(name_of));
        match page["metadata"]["continue"].as_str() {
            Some(token) => uri = format!("{SECRETS}?limit=2&continue={token}"),
            None => break,
        }
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
    let (_, selected) = client
        .call(
            "GET",
            &format!("{SECRETS}?labelSelector=n%20in%20(1,3)"),
            None,
        )
        .await;
    assert_eq!(
        selected["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(name_of)
            .collect::<Vec<_>>(),
        ["s1", "s3"]
    );
    let (_, selected) = client
        .call(
            "GET",
            &format!("{SECRETS}?fieldSelector=metadata.name%3Ds4"),
            None,
        )
        .await;
    assert_eq!(selected["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn watches_follow_selectors_resume_and_expire() {
    let (emulator, client) = setup();
    let (_, first) = client
        .call(
            "POST",
            SECRETS,
            Some(secret("a", json!({"watched": "yes"}))),
        )
        .await;
    let mut w = client
        .watch(&format!(
            "{SECRETS}?watch=true&allowWatchBookmarks=true&labelSelector=watched%3Dyes"
        ))
        .await;
    let (kind, obj) = w.next_change().await;
    assert_eq!(
        (kind.as_str(), name_of(&obj).as_str()),
        ("ADDED", "a"),
        "current objects first"
    );
    client
        .call("POST", SECRETS, Some(secret("b", json!({"watched": "no"}))))
        .await;
    let patch = |v: &str| json!({"metadata": {"labels": {"watched": v}}});
    client
        .call_typed(
            "PATCH",
            &format!("{SECRETS}/b"),
            Some(patch("yes")),
            "application/merge-patch+json",
        )
        .await;
    let (kind, obj) = w.next_change().await;
    assert_eq!(
        (kind.as_str(), name_of(&obj).as_str()),
        ("ADDED", "b"),
        "starts matching"
    );
    client
        .call_typed(
            "PATCH",
            &format!("{SECRETS}/a"),
            Some(patch("no")),
            "application/merge-patch+json",
        )
        .await;
    let (kind, obj) = w.next_change().await;
    assert_eq!(
        (kind.as_str(), name_of(&obj).as_str()),
        ("DELETED", "a"),
        "stops matching"
    );
    client.call("DELETE", &format!("{SECRETS}/b"), None).await;
    let (kind, obj) = w.next_change().await;
    assert_eq!((kind.as_str(), name_of(&obj).as_str()), ("DELETED", "b"));

    // Bookmarks carry only the kind and the resource version.
    let (kind, obj) = w.next().await.unwrap().unwrap();
    assert_eq!(kind, "BOOKMARK");
    assert_eq!(obj["kind"], "Secret");
    assert!(obj["metadata"]["resourceVersion"].as_str().is_some());
    assert!(obj["metadata"].get("name").is_none());

    // Resuming replays what happened after the version.
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap();
    // `watch=True` is how Python's client spells it.
    let mut resumed = client
        .watch(&format!("{SECRETS}?watch=True&resourceVersion={rv}"))
        .await;
    let kinds: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(resumed.next_change().await.0);
        }
        v
    };
    assert_eq!(kinds, ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]);

    emulator.compact();
    let mut expired = client
        .watch(&format!("{SECRETS}?watch=true&resourceVersion={rv}"))
        .await;
    let (kind, status) = expired.next().await.unwrap().unwrap();
    assert_eq!(kind, "ERROR");
    assert_eq!(
        (status["code"].as_i64(), status["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
    assert!(status["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("too old resource version: {rv} (")));
    assert!(
        expired.next().await.unwrap().is_none(),
        "the stream ends after the error"
    );

    // timeoutSeconds ends the stream cleanly; drop_watches ends it abruptly.
    let mut timed = client
        .watch(&format!(
            "{SECRETS}?watch=true&timeoutSeconds=1&labelSelector=nothing"
        ))
        .await;
    assert!(timed.next().await.unwrap().is_none());
    let mut dropped = client
        .watch(&format!(
            "{SECRETS}?watch=true&resourceVersion={}",
            emulator.resource_version()
        ))
        .await;
    emulator.drop_watches();
    assert!(dropped.next().await.is_err());
}

#[tokio::test]
async fn deletion_policies_for_jobs() {
    let (emulator, client) = setup();
    let jobs = "/apis/batch/v1/namespaces/default/jobs";
    let make = |prefix: &str| prefect_job(prefix, "run", "img:1", &["x"]);
    let mut names = Vec::new();
    for prefix in ["orphan-", "background-", "query-"] {
        let (_, job) = client.call("POST", jobs, Some(make(prefix))).await;
        names.push(name_of(&job));
    }
    for name in &names {
        within(
            "the pod",
            emulator.wait_for_pod("default", &format!("job-name={name}"), common::STEP),
        )
        .await
        .unwrap();
    }
    // No policy: Jobs orphan their pods, which lose their owner reference.
    let (code, status) = client
        .call("DELETE", &format!("{jobs}/{}", names[0]), None)
        .await;
    assert_eq!((code, status["status"].as_str()), (200, Some("Success")));
    let orphan = emulator
        .pods("default")
        .into_iter()
        .find(|p| p["metadata"]["labels"]["job-name"] == names[0].as_str())
        .unwrap();
    assert!(orphan["metadata"].get("ownerReferences").is_none());
    // Background in the body: the pods go too.
    client
        .call(
            "DELETE",
            &format!("{jobs}/{}", names[1]),
            Some(json!({"propagationPolicy": "Background"})),
        )
        .await;
    // Background in the query string, as Python's client sends it.
    client
        .call(
            "DELETE",
            &format!(
                "{jobs}/{}?propagationPolicy=Background&gracePeriodSeconds=0",
                names[2]
            ),
            None,
        )
        .await;
    // Foreground: the answer is the Job as marked, even when its pods went at once.
    let (_, job) = client.call("POST", jobs, Some(make("foreground-"))).await;
    let name = name_of(&job);
    within(
        "the pod",
        emulator.wait_for_pod("default", &format!("job-name={name}"), common::STEP),
    )
    .await
    .unwrap();
    let (code, marked) = client
        .call(
            "DELETE",
            &format!("{jobs}/{name}?propagationPolicy=Foreground&gracePeriodSeconds=30"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(marked["kind"], "Job");
    assert_eq!(
        marked["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let left: Vec<String> = emulator
        .pods("default")
        .iter()
        .map(|p| {
            p["metadata"]["labels"]["job-name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(left, [names[0].clone()]);
    assert!(emulator.jobs("default").is_empty());
}

#[tokio::test]
async fn failed_pods_are_replaced_until_the_backoff_limit() {
    let (emulator, client) = setup();
    let mut job = prefect_job("retry-", "run", "img:1", &["x"]);
    job["spec"]["backoffLimit"] = json!(1);
    let (_, job) = client
        .call("POST", "/apis/batch/v1/namespaces/default/jobs", Some(job))
        .await;
    let name = name_of(&job);
    let first = name_of(
        &within(
            "first pod",
            emulator.wait_for_pod("default", &format!("job-name={name}"), common::STEP),
        )
        .await
        .unwrap(),
    );
    emulator.pod_running("default", &first).unwrap();
    emulator.pod_exit("default", &first, 1, "Error").unwrap();
    let second = within(
        "a replacement",
        emulator.wait_until(common::STEP, |e| {
            e.pods("default")
                .into_iter()
                .map(|p| name_of(&p))
                .find(|n| *n != first)
        }),
    )
    .await
    .unwrap();
    let job = emulator.get(Kind::Job, "default", &name).unwrap();
    assert_eq!(job["status"]["failed"], 1);
    assert_eq!(job["status"]["active"], 1);
    assert!(condition(&job, "Failed").is_none());
    emulator.pod_exit("default", &second, 2, "Error").unwrap();
    let failed = within(
        "the Job fails",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Job, "default", &name)
                .filter(|j| condition(j, "Failed").is_some())
        }),
    )
    .await
    .unwrap();
    assert_eq!(failed["status"]["failed"], 2);
    assert_eq!(
        condition(&failed, "Failed").unwrap()["reason"],
        "BackoffLimitExceeded"
    );
    assert_eq!(
        condition(&failed, "Failed").unwrap()["message"],
        "Job has reached the specified backoff limit"
    );
    assert!(condition(&failed, "FailureTarget").is_some());
    assert!(failed["status"].get("completionTime").is_none());
    assert_eq!(emulator.pods("default").len(), 2, "no third pod");
}

#[tokio::test]
async fn active_deadline_and_ttl() {
    let (emulator, client) = setup();
    let mut job = prefect_job("deadline-", "run", "img:1", &["x"]);
    job["spec"]["activeDeadlineSeconds"] = json!(1);
    job["spec"]["ttlSecondsAfterFinished"] = json!(1);
    let (_, job) = client
        .call("POST", "/apis/batch/v1/namespaces/default/jobs", Some(job))
        .await;
    let name = name_of(&job);
    let pod = name_of(
        &within(
            "the pod",
            emulator.wait_for_pod("default", "", common::STEP),
        )
        .await
        .unwrap(),
    );
    emulator.pod_running("default", &pod).unwrap();
    let failed = within(
        "the deadline",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Job, "default", &name)
                .filter(|j| condition(j, "Failed").is_some())
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        condition(&failed, "Failed").unwrap()["reason"],
        "DeadlineExceeded"
    );
    let pod_now = emulator.get(Kind::Pod, "default", &pod).unwrap();
    assert!(
        pod_now["metadata"]["deletionTimestamp"].is_string(),
        "the running pod is being killed"
    );
    within(
        "the TTL",
        emulator.wait_until(common::STEP, |e| {
            e.get(Kind::Job, "default", &name).is_none().then_some(())
        }),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn scripted_logs_tail_follow_and_refuse_waiting_containers() {
    let (emulator, client) = setup();
    let (_, job) = client
        .call(
            "POST",
            "/apis/batch/v1/namespaces/default/jobs",
            Some(prefect_job("logs-", "run", "img:1", &["x"])),
        )
        .await;
    let pod = name_of(
        &within(
            "the pod",
            emulator.wait_for_pod(
                "default",
                &format!("job-name={}", name_of(&job)),
                common::STEP,
            ),
        )
        .await
        .unwrap(),
    );
    let log = format!("/api/v1/namespaces/default/pods/{pod}/log");
    let (code, status) = client.call("GET", &log, None).await;
    assert_eq!(code, 400);
    assert_eq!(
        status["message"],
        format!(
            "container \"prefect-job\" in pod \"{pod}\" is waiting to start: ContainerCreating"
        )
    );
    emulator.pod_running("default", &pod).unwrap();
    emulator.set_pod_log("default", &pod, "one\ntwo\n");
    let response = client
        .send("GET", &format!("{log}?tailLines=1"), None, "")
        .await;
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "two\n"
    );
    let (code, status) = client
        .call("GET", &format!("{log}?previous=true"), None)
        .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));

    let response = client
        .send(
            "GET",
            &format!("{log}?follow=true&container=prefect-job"),
            None,
            "",
        )
        .await;
    let collecting =
        tokio::spawn(async move { response.into_body().collect().await.unwrap().to_bytes() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    emulator.append_container_log("default", &pod, "prefect-job", "three\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    emulator.pod_exit("default", &pod, 0, "Completed").unwrap();
    let followed = within("the followed log ends", collecting).await.unwrap();
    assert_eq!(followed, "one\ntwo\nthree\n");
}

/// Enough Jobs to show that nothing scans the whole store per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_run_and_go() {
    let (emulator, _client) = setup();
    let n = 1000;
    for i in 0..n {
        emulator
            .create(
                Kind::Job,
                "prefect",
                prefect_job("bulk-", &format!("run-{i}"), "img:1", &["x"]),
            )
            .unwrap();
    }
    within(
        "the pods",
        emulator.wait_until(common::STEP, |e| {
            (e.pods("prefect").len() == n).then_some(())
        }),
    )
    .await
    .unwrap();
    for pod in emulator.pods("prefect") {
        emulator.pod_running("prefect", &name_of(&pod)).unwrap();
        emulator
            .pod_exit("prefect", &name_of(&pod), 0, "Completed")
            .unwrap();
    }
    within(
        "the Jobs complete",
        emulator.wait_until(common::STEP, |e| {
            e.jobs("prefect")
                .iter()
                .all(|j| condition(j, "Complete").is_some())
                .then_some(())
        }),
    )
    .await
    .unwrap();
    let foreground = cohort_kube_fake::DeleteOptions {
        propagation_policy: Some(cohort_kube_fake::PropagationPolicy::Foreground),
        ..Default::default()
    };
    for job in emulator.jobs("prefect") {
        emulator
            .delete(Kind::Job, "prefect", &name_of(&job), &foreground)
            .unwrap();
    }
    assert!(emulator.jobs("prefect").is_empty() && emulator.pods("prefect").is_empty());
}
