//! Builders for the exact resources and related-resource lists of worker and runner events
//! (`prefect/workers/base.py: BaseWorker._event_resource`, `_event_related_resources`,
//! `BaseJobConfiguration._related_resources`; `prefect/events/related.py`;
//! `prefect/runner/_event_emitter.py: EventEmitter.emit_flow_run_cancelled`).

use std::collections::BTreeSet;

use uuid::Uuid;

use crate::event::{RelatedResource, Resource};
use crate::labels;
use crate::slug::slugify;

/// An API object that appears in events by id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The object's id.
    pub id: Uuid,
    /// The object's name.
    pub name: String,
}

/// The objects a worker's flow-run events mention (`BaseJobConfiguration._related_objects`
/// plus the worker's work pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRunObjects {
    /// The run's deployment, if it has one.
    pub deployment: Option<Named>,
    /// The run's flow.
    pub flow: Option<Named>,
    /// The run itself.
    pub flow_run: Named,
    /// Tags of the deployment, flow and flow run, in any order, repeats allowed.
    pub tags: Vec<String>,
    /// The worker's work pool, if known.
    pub work_pool: Option<Named>,
}

/// The worker resource: `prefect.worker.{type}.{slugify(name)}`, the raw name, the Prefect
/// version, the worker type, then `cohort.version`.
pub fn worker_resource(worker_type: &str, worker_name: &str, prefect_version: &str) -> Resource {
    Resource::new(format!(
        "prefect.worker.{worker_type}.{}",
        slugify(worker_name)
    ))
    .with(labels::RESOURCE_NAME, worker_name)
    .with(labels::PREFECT_VERSION, prefect_version)
    .with(labels::WORKER_TYPE, worker_type)
    .with(labels::COHORT_VERSION, env!("CARGO_PKG_VERSION"))
}

/// The runner resource: `prefect.runner.{slugify(name)}`, the raw name, the Prefect version,
/// then `cohort.version`. Prefect's process worker uses the name `standalone`.
pub fn runner_resource(runner_name: &str, prefect_version: &str) -> Resource {
    Resource::new(format!("prefect.runner.{}", slugify(runner_name)))
        .with(labels::RESOURCE_NAME, runner_name)
        .with(labels::PREFECT_VERSION, prefect_version)
        .with(labels::COHORT_VERSION, env!("CARGO_PKG_VERSION"))
}

/// `prefect.{kind}.{id}` with role and name, in that order
/// (`prefect/events/related.py: object_as_related_resource`).
fn object(kind: &str, role: &str, object: &Named) -> RelatedResource {
    RelatedResource::new(format!("prefect.{kind}.{}", object.id), role)
        .with(labels::RESOURCE_NAME, object.name.as_str())
}

/// The work-pool entry (id, role, name; no `prefect.work-pool.type`, unlike server events).
pub fn work_pool(pool: &Named) -> RelatedResource {
    object("work-pool", labels::ROLE_WORK_POOL, pool)
}

/// One entry per distinct tag, sorted as Python's `sorted(set(tags))` sorts: by code point,
/// which is Rust's byte order on UTF-8. Tag ids are the raw tag text, not slugged, and tag
/// entries have no name (`prefect/events/related.py: tags_as_related_resources`).
fn tags<I>(tags: I) -> impl Iterator<Item = RelatedResource>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let unique: BTreeSet<String> = tags.into_iter().map(|t| t.as_ref().to_owned()).collect();
    unique
        .into_iter()
        .map(|tag| RelatedResource::new(format!("prefect.tag.{tag}"), labels::ROLE_TAG))
}

/// Related resources of `submitted-flow-run` / `executed-flow-run`: deployment, flow,
/// flow-run (each when present), the sorted unique tags, then the work pool.
pub fn worker_flow_run_related(objects: &FlowRunObjects) -> Vec<RelatedResource> {
    let mut related = Vec::new();
    if let Some(deployment) = &objects.deployment {
        related.push(object("deployment", labels::ROLE_DEPLOYMENT, deployment));
    }
    if let Some(flow) = &objects.flow {
        related.push(object("flow", labels::ROLE_FLOW, flow));
    }
    related.push(object("flow-run", labels::ROLE_FLOW_RUN, &objects.flow_run));
    related.extend(tags(&objects.tags));
    if let Some(pool) = &objects.work_pool {
        related.push(work_pool(pool));
    }
    related
}

/// Adds `prefect.infrastructure.identifier` and `prefect.infrastructure.status-code` to the
/// flow-run entry, as `executed-flow-run` carries them
/// (`BaseWorker._emit_flow_run_executed_event`).
pub fn with_infrastructure(
    mut related: Vec<RelatedResource>,
    identifier: &str,
    status_code: i64,
) -> Vec<RelatedResource> {
    for resource in related
        .iter_mut()
        .filter(|r| r.role() == labels::ROLE_FLOW_RUN)
    {
        resource.insert(labels::INFRASTRUCTURE_IDENTIFIER, identifier);
        resource.insert(labels::INFRASTRUCTURE_STATUS_CODE, status_code.to_string());
    }
    related
}

/// Appends extra labels to the deployment entry, e.g. Prefect's
/// `prefect.deployment.version-id`, `…version-type`, `…version` when the deployment has
/// version info (`DeploymentResponse.as_related_resource`).
pub fn with_deployment_labels<I, K, V>(
    mut related: Vec<RelatedResource>,
    extra: I,
) -> Vec<RelatedResource>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    if let Some(deployment) = related
        .iter_mut()
        .find(|r| r.role() == labels::ROLE_DEPLOYMENT)
    {
        for (label, value) in extra {
            deployment.insert(label, value);
        }
    }
    related
}

/// Related resources of `prefect.runner.cancelled-flow-run`: deployment and flow (the flow
/// only when the deployment is known, because Prefect looks the flow up through it), the
/// flow run, then the sorted unique tags (callers pass deployment ∪ flow-run tags; Prefect
/// does not include flow tags here). No work pool.
pub fn runner_cancelled_related<I>(
    deployment: Option<&Named>,
    flow: Option<&Named>,
    flow_run: &Named,
    tag_list: I,
) -> Vec<RelatedResource>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut related = Vec::new();
    if let Some(deployment) = deployment {
        related.push(object("deployment", labels::ROLE_DEPLOYMENT, deployment));
        if let Some(flow) = flow {
            related.push(object("flow", labels::ROLE_FLOW, flow));
        }
    }
    related.push(object("flow-run", labels::ROLE_FLOW_RUN, flow_run));
    related.extend(tags(tag_list));
    related
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::event::Event;
    use crate::names;

    fn named(id: u128, name: &str) -> Named {
        Named {
            id: Uuid::from_u128(id),
            name: name.to_owned(),
        }
    }

    fn ids_and_roles(related: &[RelatedResource]) -> Vec<(String, String)> {
        related
            .iter()
            .map(|r| (r.id().to_owned(), r.role().to_owned()))
            .collect()
    }

    fn labels(resource: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
        resource.into_iter().collect()
    }

    fn owned<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
        pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    /// `test_events_workers_instrumentation.py`: deployment tagged `test`, run tagged
    /// `flow-run-one`.
    fn conformance_objects() -> FlowRunObjects {
        FlowRunObjects {
            deployment: Some(named(1, "test-deployment")),
            flow: Some(named(2, "test-flow")),
            flow_run: named(3, "happy-run"),
            tags: vec!["test".into(), "flow-run-one".into(), "test".into()],
            work_pool: Some(named(4, "test-pool")),
        }
    }

    #[test]
    fn worker_resource_has_prefects_labels_in_order_then_cohorts() {
        let resource = worker_resource("process", "test-worker", "3.8.8");
        assert_eq!(
            owned(resource.iter()),
            labels([
                (
                    "prefect.resource.id".into(),
                    "prefect.worker.process.test-worker".into()
                ),
                ("prefect.resource.name".into(), "test-worker".into()),
                ("prefect.version".into(), "3.8.8".into()),
                ("prefect.worker-type".into(), "process".into()),
                ("cohort.version".into(), env!("CARGO_PKG_VERSION").into()),
            ])
        );
        assert_eq!(
            worker_resource("process", "My Worker 1", "3.8.8").id(),
            "prefect.worker.process.my-worker-1"
        );
    }

    #[test]
    fn submitted_related_is_deployment_flow_flow_run_tags_work_pool() {
        let related = worker_flow_run_related(&conformance_objects());
        let uuid = |n: u128| Uuid::from_u128(n).to_string();
        assert_eq!(
            ids_and_roles(&related),
            [
                (
                    format!("prefect.deployment.{}", uuid(1)),
                    "deployment".to_owned()
                ),
                (format!("prefect.flow.{}", uuid(2)), "flow".to_owned()),
                (
                    format!("prefect.flow-run.{}", uuid(3)),
                    "flow-run".to_owned()
                ),
                ("prefect.tag.flow-run-one".to_owned(), "tag".to_owned()),
                ("prefect.tag.test".to_owned(), "tag".to_owned()),
                (
                    format!("prefect.work-pool.{}", uuid(4)),
                    "work-pool".to_owned()
                ),
            ]
        );
        // Objects carry id, role, name in that order; tags only id and role.
        let keys = |r: &RelatedResource| r.iter().map(|(k, _)| k.to_owned()).collect::<Vec<_>>();
        assert_eq!(
            keys(&related[0]),
            [
                "prefect.resource.id",
                "prefect.resource.role",
                "prefect.resource.name"
            ]
        );
        assert_eq!(related[0].name(), Some("test-deployment"));
        assert_eq!(related[2].name(), Some("happy-run"));
        assert_eq!(
            keys(&related[3]),
            ["prefect.resource.id", "prefect.resource.role"]
        );
        assert_eq!(related[5].name(), Some("test-pool"));
    }

    #[test]
    fn executed_adds_infrastructure_labels_to_the_flow_run_and_follows_submitted() {
        let resource = worker_resource("process", "test-worker", "3.8.8");
        let related = worker_flow_run_related(&conformance_objects());
        let submitted = Event::new(
            names::WORKER_SUBMITTED_FLOW_RUN,
            resource.clone(),
            related.clone(),
        );
        let executed = Event::new(
            names::WORKER_EXECUTED_FLOW_RUN,
            resource,
            with_infrastructure(related.clone(), "process123", 1),
        )
        .follow(&submitted);

        assert_eq!(executed.follows, Some(submitted.id));
        assert_eq!(ids_and_roles(&executed.related), ids_and_roles(&related));
        let flow_run = &executed.related[2];
        assert_eq!(
            flow_run.get("prefect.infrastructure.status-code"),
            Some("1")
        );
        assert_eq!(
            flow_run.get("prefect.infrastructure.identifier"),
            Some("process123")
        );
        let keys: Vec<&str> = flow_run.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "prefect.resource.id",
                "prefect.resource.role",
                "prefect.resource.name",
                "prefect.infrastructure.identifier",
                "prefect.infrastructure.status-code",
            ]
        );
        for (i, other) in executed.related.iter().enumerate().filter(|(i, _)| *i != 2) {
            assert_eq!(other, &related[i], "only the flow-run entry changes");
        }
        let negative = with_infrastructure(related, "4242", -15);
        assert_eq!(
            negative[2].get("prefect.infrastructure.status-code"),
            Some("-15")
        );
    }

    #[test]
    fn optional_objects_are_left_out() {
        let objects = FlowRunObjects {
            deployment: None,
            flow: Some(named(2, "f")),
            flow_run: named(3, "r"),
            tags: vec![],
            work_pool: None,
        };
        let roles: Vec<String> = ids_and_roles(&worker_flow_run_related(&objects))
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(roles, ["flow", "flow-run"]);
    }

    #[test]
    fn tags_sort_by_code_point_unique_and_unslugged() {
        let objects = FlowRunObjects {
            tags: ["z", "é", "Big Tag", "a", "run-extra", "Z", "a"]
                .map(String::from)
                .to_vec(),
            work_pool: None,
            ..conformance_objects()
        };
        let tags: Vec<String> = worker_flow_run_related(&objects)
            .iter()
            .filter(|r| r.role() == "tag")
            .map(|r| r.id().to_owned())
            .collect();
        // Python: sorted({"z", "é", "Big Tag", "a", "run-extra", "Z"})
        assert_eq!(
            tags,
            [
                "prefect.tag.Big Tag",
                "prefect.tag.Z",
                "prefect.tag.a",
                "prefect.tag.run-extra",
                "prefect.tag.z",
                "prefect.tag.é"
            ]
        );
    }

    #[test]
    fn worker_lifecycle_events_relate_only_the_work_pool() {
        let resource = worker_resource("process", "test-worker", "3.8.8");
        let pool = named(4, "test-pool");
        let started = Event::new(
            names::WORKER_STARTED,
            resource.clone(),
            vec![work_pool(&pool)],
        );
        let stopped =
            Event::new(names::WORKER_STOPPED, resource, vec![work_pool(&pool)]).follow(&started);
        assert_eq!(stopped.follows, Some(started.id));
        assert_eq!(
            owned(started.related[0].iter()),
            labels([
                (
                    "prefect.resource.id".into(),
                    format!("prefect.work-pool.{}", pool.id)
                ),
                ("prefect.resource.role".into(), "work-pool".into()),
                ("prefect.resource.name".into(), "test-pool".into()),
            ])
        );
        assert_eq!(started.related.len(), 1);
    }

    #[test]
    fn worker_as_related_appends_the_role_last() {
        let worker =
            worker_resource("docker", "w", "3.8.8").into_related(crate::labels::ROLE_WORKER);
        let keys: Vec<&str> = worker.iter().map(|(k, _)| k).collect();
        assert_eq!(keys.last(), Some(&"prefect.resource.role"));
        assert_eq!(worker.role(), "worker");
    }

    #[test]
    fn deployment_version_labels_go_on_the_deployment_entry() {
        let related = with_deployment_labels(
            worker_flow_run_related(&conformance_objects()),
            [
                ("prefect.deployment.version-id", "v-id"),
                ("prefect.deployment.version-type", "vcs:git"),
                ("prefect.deployment.version", "abc"),
            ],
        );
        assert_eq!(related[0].len(), 6);
        assert_eq!(related[0].get("prefect.deployment.version"), Some("abc"));
        assert_eq!(related[1].len(), 3);
    }

    #[test]
    fn runner_event_matches_test_runner_emits_cancelled_event() {
        let resource = runner_resource("My Test Runner", "3.8.8");
        assert_eq!(resource.id(), "prefect.runner.my-test-runner");
        assert_eq!(resource.name(), Some("My Test Runner"));
        let keys: Vec<&str> = resource.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "prefect.resource.id",
                "prefect.resource.name",
                "prefect.version",
                "cohort.version"
            ]
        );

        let (deployment, flow, run) = (named(1, "dep"), named(2, "flow"), named(3, "run"));
        let related = runner_cancelled_related(
            Some(&deployment),
            Some(&flow),
            &run,
            ["test", "flow-run-one"],
        );
        let roles: Vec<(String, String)> = ids_and_roles(&related);
        assert_eq!(roles.len(), 5);
        assert_eq!(roles[0].1, "deployment");
        assert_eq!(roles[1].1, "flow");
        assert_eq!(roles[2].1, "flow-run");
        assert_eq!(roles[3].0, "prefect.tag.flow-run-one");
        assert_eq!(roles[4].0, "prefect.tag.test");
        assert!(related.iter().all(|r| r.role() != "work-pool"));
    }

    #[test]
    fn runner_related_without_a_deployment_has_no_flow() {
        let (flow, run) = (named(2, "flow"), named(3, "run"));
        let related = runner_cancelled_related(None, Some(&flow), &run, ["z", "a", "m", "a"]);
        assert_eq!(
            ids_and_roles(&related),
            [
                (
                    format!("prefect.flow-run.{}", run.id),
                    "flow-run".to_owned()
                ),
                ("prefect.tag.a".to_owned(), "tag".to_owned()),
                ("prefect.tag.m".to_owned(), "tag".to_owned()),
                ("prefect.tag.z".to_owned(), "tag".to_owned()),
            ]
        );
        let deployment = named(1, "dep");
        let without_flow =
            runner_cancelled_related(Some(&deployment), None, &run, Vec::<String>::new());
        let roles: Vec<&str> = without_flow.iter().map(RelatedResource::role).collect();
        assert_eq!(roles, ["deployment", "flow-run"]);
    }

    // --- The five event types, snapshotted and compared with Prefect's own captures. ---

    fn fixed_time(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn snapshot_objects() -> FlowRunObjects {
        FlowRunObjects {
            deployment: Some(Named {
                id: uuid("ecc66581-2389-473c-965d-8f3a27bcd09b"),
                name: "hello-dep".into(),
            }),
            flow: Some(Named {
                id: uuid("548271a9-5352-4141-b478-e1ac5a2faf15"),
                name: "hello".into(),
            }),
            flow_run: Named {
                id: uuid("d54b4bdb-bde6-4b92-8a67-2fe7113a172b"),
                name: "precious-jerboa".into(),
            },
            tags: ["team-a", "env-dev", "team-a", "env-dev"]
                .map(String::from)
                .to_vec(),
            work_pool: Some(pool()),
        }
    }

    fn pool() -> Named {
        Named {
            id: uuid("eaa67803-560e-47af-985d-6f88366fcd7d"),
            name: "demo-pool".into(),
        }
    }

    fn uuid(text: &str) -> Uuid {
        Uuid::from_str(text).unwrap()
    }

    /// Five events as the worker and runner build them, predecessors with fixed ids so
    /// `follows` is stable.
    fn five_events() -> [Event; 5] {
        let worker = worker_resource("process", "My Worker 1", "3.8.8");
        let t0 = fixed_time("2026-11-23T19:33:59.037077Z");
        let started = Event::new(
            names::WORKER_STARTED,
            worker.clone(),
            vec![work_pool(&pool())],
        )
        .with_occurred(t0)
        .with_id(Uuid::from_u128(1));
        let related = worker_flow_run_related(&snapshot_objects());
        let submitted = Event::new(
            names::WORKER_SUBMITTED_FLOW_RUN,
            worker.clone(),
            related.clone(),
        )
        .with_occurred(t0 + chrono::TimeDelta::seconds(9))
        .with_id(Uuid::from_u128(2));
        let executed = Event::new(
            names::WORKER_EXECUTED_FLOW_RUN,
            worker.clone(),
            with_infrastructure(related, "14094", 0),
        )
        .with_occurred(t0 + chrono::TimeDelta::seconds(18))
        .follow(&submitted);
        let stopped = Event::new(names::WORKER_STOPPED, worker, vec![work_pool(&pool())])
            .with_occurred(t0 + chrono::TimeDelta::seconds(38))
            .follow(&started);
        let objects = snapshot_objects();
        let cancelled = Event::new(
            names::RUNNER_CANCELLED_FLOW_RUN,
            runner_resource("standalone", "3.8.8"),
            runner_cancelled_related(
                objects.deployment.as_ref(),
                objects.flow.as_ref(),
                &objects.flow_run,
                ["team-a", "env-dev"],
            ),
        );
        [started, submitted, executed, stopped, cancelled]
    }

    #[test]
    fn event_type_snapshots() {
        for event in five_events() {
            insta::with_settings!({ snapshot_suffix => event.event.clone() }, {
                insta::assert_json_snapshot!(event, {
                    ".id" => "[id]",
                    ".occurred" => "[occurred]",
                    ".resource[\"cohort.version\"]" => "[cohort version]",
                });
            });
        }
    }

    /// Prefect's own frames from `shared/captures/partA-ws-emitted-events.json`, as the
    /// compact JSON `Event.model_dump_json()` sent on the socket.
    fn captured_frames() -> Vec<(String, serde_json::Value)> {
        let text = include_str!("../testdata/partA-ws-emitted-events.json");
        let entries: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        entries
            .into_iter()
            .map(|entry| entry["event"].clone())
            .filter(|event| {
                event["event"].as_str().is_some_and(|n| {
                    n.starts_with("prefect.worker.") || n.starts_with("prefect.runner.")
                })
            })
            .map(|event| (serde_json::to_string(&event).unwrap(), event))
            .collect()
    }

    fn parse_named(related: &serde_json::Value, kind: &str) -> Option<Named> {
        let prefix = format!("prefect.{kind}.");
        related.as_array().unwrap().iter().find_map(|r| {
            let id = r["prefect.resource.id"].as_str()?.strip_prefix(&prefix)?;
            Some(Named {
                id: uuid(id),
                name: r["prefect.resource.name"].as_str()?.to_owned(),
            })
        })
    }

    /// Rebuilds each captured Prefect event with our builders from the ids and names in it,
    /// then requires the same bytes, once ids, times and our `cohort.version` label are
    /// copied over.
    #[test]
    fn builders_reproduce_prefects_captured_events_byte_for_byte() {
        let frames = captured_frames();
        assert_eq!(frames.len(), 14, "every worker/runner event of the capture");
        for (wire, captured) in frames {
            let name = captured["event"].as_str().unwrap();
            let resource = &captured["resource"];
            let resource_name = resource["prefect.resource.name"].as_str().unwrap();
            let related_json = &captured["related"];
            let tags: Vec<String> = related_json
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| {
                    r["prefect.resource.id"]
                        .as_str()?
                        .strip_prefix("prefect.tag.")
                        .map(str::to_owned)
                })
                .rev() // order must not matter
                .collect();
            let flow_run = parse_named(related_json, "flow-run");
            let (our_resource, related) = match name {
                names::WORKER_STARTED | names::WORKER_STOPPED => (
                    worker_resource("process", resource_name, "3.8.8"),
                    vec![work_pool(&parse_named(related_json, "work-pool").unwrap())],
                ),
                names::WORKER_SUBMITTED_FLOW_RUN | names::WORKER_EXECUTED_FLOW_RUN => {
                    let objects = FlowRunObjects {
                        deployment: parse_named(related_json, "deployment"),
                        flow: parse_named(related_json, "flow"),
                        flow_run: flow_run.unwrap(),
                        tags: tags.iter().chain(&tags).cloned().collect(),
                        work_pool: parse_named(related_json, "work-pool"),
                    };
                    let mut related = worker_flow_run_related(&objects);
                    if name == names::WORKER_EXECUTED_FLOW_RUN {
                        let flow_run = related_json
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|r| r["prefect.resource.role"] == "flow-run")
                            .unwrap();
                        let identifier = flow_run["prefect.infrastructure.identifier"]
                            .as_str()
                            .unwrap();
                        let code = flow_run["prefect.infrastructure.status-code"]
                            .as_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        related = with_infrastructure(related, identifier, code);
                    }
                    (worker_resource("process", resource_name, "3.8.8"), related)
                }
                names::RUNNER_CANCELLED_FLOW_RUN => (
                    runner_resource(resource_name, "3.8.8"),
                    runner_cancelled_related(
                        parse_named(related_json, "deployment").as_ref(),
                        parse_named(related_json, "flow").as_ref(),
                        &flow_run.unwrap(),
                        &tags,
                    ),
                ),
                other => panic!("unexpected event {other}"),
            };
            assert_eq!(
                our_resource.get("cohort.version"),
                Some(env!("CARGO_PKG_VERSION"))
            );
            let without_ours: Resource = our_resource
                .iter()
                .filter(|(k, _)| *k != "cohort.version")
                .collect();
            let mut ours = Event::new(name, without_ours, related)
                .with_occurred(fixed_time(captured["occurred"].as_str().unwrap()))
                .with_id(uuid(captured["id"].as_str().unwrap()));
            ours.follows = captured["follows"].as_str().map(uuid);
            assert_eq!(ours.to_wire_json().unwrap(), wire, "{name}");
            // And Prefect's frame parses into the same event.
            assert_eq!(serde_json::from_str::<Event>(&wire).unwrap(), ours);
        }
    }
}
