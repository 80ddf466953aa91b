//! How one Job of a flow run stands, read from what the cluster shows: still on its way (and
//! why it may be stuck), or ended, with the flow container's exit code and the Kubernetes
//! cause. The Job controller's conditions decide the end, so a pod that failed while the Job
//! still has retries (`backoffLimit`) is not the end of the run.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

use crate::observe::RunView;
use crate::pod::{diagnose, to_chrono, Diagnosis};

/// The container prefect-kubernetes' template runs the flow in.
pub const FLOW_CONTAINER: &str = "prefect-job";

/// Where a Job stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Assessment {
    /// The Job is not in the view (not yet seen by the watch).
    Unseen,
    /// On its way: the newest pod's diagnosis, if any, and whether its flow container started.
    Waiting {
        diagnosis: Option<Diagnosis>,
        started: bool,
    },
    Ended(End),
}

/// How a Job ended.
#[derive(Debug, Clone, PartialEq)]
pub struct End {
    /// Prefect's status code: the flow container's exit code, or -1 when it has none.
    pub code: i64,
    pub cause: Cause,
    /// The pod the code is from.
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// `Complete`, or a container that exited with its own code.
    Exited,
    /// The kernel's OOM killer (`terminated.reason == OOMKilled`).
    OomKilled,
    /// The pod was evicted (`status.reason == Evicted`); the message says why.
    Evicted(String),
    /// `activeDeadlineSeconds` passed.
    DeadlineExceeded,
    /// The Job was deleted before it finished (by hand, or by us on a cancel).
    JobDeleted,
}

/// Where `job` of `view` stands.
pub fn assess(view: &RunView, job: &str) -> Assessment {
    let (object, deleted) = match (view.jobs.get(job), view.deleted_jobs.get(job)) {
        (Some(j), _) => (j, false),
        (None, Some(j)) => (j, true),
        (None, None) => return Assessment::Unseen,
    };
    let pods = pods_of(view, job);
    if condition(object, "Complete") {
        return Assessment::Ended(End {
            code: 0,
            cause: Cause::Exited,
            pod: pods.first().and_then(|(p, _)| p.metadata.name.clone()),
        });
    }
    let failed_reason = condition_reason(object, "Failed");
    // A Job deleted before it ended (gone, or going in the foreground) was deleted, whatever
    // its pods' codes: as Prefect's observer says, at once when the Job is gone while its
    // pod still runs (a background or orphaning delete).
    let deleting = deleted || object.metadata.deletion_timestamp.is_some();
    let pod_runs_on = pods
        .first()
        .is_some_and(|(pod, gone)| !gone && terminated(pod).is_none() && !evicted(pod));
    if deleted && failed_reason.is_none() && pod_runs_on {
        return Assessment::Ended(End {
            code: -1,
            cause: Cause::JobDeleted,
            pod: pods.first().and_then(|(p, _)| p.metadata.name.clone()),
        });
    }
    // The Job's status and its pods' come on separate watches: a Job seen failed (or gone)
    // while its newest pod still shows as pending or running is ahead of that pod's news.
    let pod_lags = pods.first().is_some_and(|(pod, deleted)| {
        !deleted
            && terminated(pod).is_none()
            && !evicted(pod)
            && matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                None | Some("Pending" | "Running")
            )
    });
    if (failed_reason.is_some() || deleted) && !pod_lags {
        // The newest pod that ended tells the code and the cause.
        let ended = pods
            .iter()
            .find(|(pod, _)| terminated(pod).is_some() || evicted(pod));
        let (code, cause, pod) = match ended {
            Some((pod, _)) => {
                let t = terminated(pod);
                let code = t.map_or(-1, |t| i64::from(t.exit_code));
                let cause = if t.and_then(|t| t.reason.as_deref()) == Some("OOMKilled") {
                    Cause::OomKilled
                } else if evicted(pod) {
                    let status = pod.status.as_ref();
                    Cause::Evicted(
                        status
                            .and_then(|s| s.message.clone())
                            .unwrap_or_else(|| "no reason given".into()),
                    )
                } else if failed_reason.as_deref() == Some("DeadlineExceeded") {
                    Cause::DeadlineExceeded
                } else if deleting && failed_reason.is_none() {
                    Cause::JobDeleted
                } else {
                    Cause::Exited
                };
                (code, cause, pod.metadata.name.clone())
            }
            None => {
                let cause = match failed_reason.as_deref() {
                    Some("DeadlineExceeded") => Cause::DeadlineExceeded,
                    Some(_) => Cause::Exited,
                    None => Cause::JobDeleted,
                };
                (-1, cause, None)
            }
        };
        return Assessment::Ended(End { code, cause, pod });
    }
    let newest = pods.first().map(|(p, _)| *p);
    Assessment::Waiting {
        diagnosis: newest.and_then(|p| p.status.as_ref()).and_then(diagnose),
        started: pods.iter().any(|(p, _)| started_pod(p)),
    }
}

/// Whether a container of one of `job`'s pods has started (so an engine runs, or ran).
pub fn started(view: &RunView, job: &str) -> bool {
    pods_of(view, job).iter().any(|(p, _)| started_pod(p))
}

/// The newest pod of `job` that did not succeed, and its flow container (or only one).
pub fn newest_unsucceeded_pod(view: &RunView, job: &str) -> Option<(String, String)> {
    let (pod, _) = pods_of(view, job)
        .into_iter()
        .find(|(p, _)| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Succeeded"))?;
    Some((pod.metadata.name.clone()?, flow_container(pod)))
}

/// The pods of `job` whose containers have started, oldest first, each with its flow
/// container (or only one).
pub fn started_pods(view: &RunView, job: &str) -> Vec<(String, String)> {
    pods_of(view, job)
        .into_iter()
        .rev()
        .filter(|(p, _)| started_pod(p))
        .filter_map(|(p, _)| Some((p.metadata.name.clone()?, flow_container(p))))
        .collect()
}

/// The name of `pod`'s flow container: `prefect-job`, or its first.
fn flow_container(pod: &Pod) -> String {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    containers
        .iter()
        .find(|c| c.name == FLOW_CONTAINER)
        .or(containers.first())
        .map_or_else(|| FLOW_CONTAINER.to_owned(), |c| c.name.clone())
}

/// The Job's pods, live and deleted, newest first.
fn pods_of<'v>(view: &'v RunView, job: &str) -> Vec<(&'v Pod, bool)> {
    let mut pods: Vec<(&Pod, bool)> = view
        .pods
        .values()
        .map(|p| (p, false))
        .chain(view.deleted_pods.values().map(|p| (p, true)))
        .filter(|(p, _)| {
            p.metadata.labels.as_ref().is_some_and(|l| {
                l.get("batch.kubernetes.io/job-name")
                    .or_else(|| l.get("job-name"))
                    == Some(&job.to_owned())
            })
        })
        .collect();
    pods.sort_by_key(|(p, _)| {
        std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(to_chrono))
    });
    pods
}

/// The Job has ended, one way or the other.
pub fn finished(job: &Job) -> bool {
    condition(job, "Complete") || condition(job, "Failed")
}

fn condition(job: &Job, kind: &str) -> bool {
    condition_reason(job, kind).is_some()
}

/// `Some(reason)` (empty when none is given) when the Job has condition `kind` true.
fn condition_reason(job: &Job, kind: &str) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == kind && c.status == "True")
        .map(|c| c.reason.clone().unwrap_or_default())
}

/// The flow container (or the only one) of `pod`, if it terminated.
fn terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let main = statuses
        .iter()
        .find(|cs| cs.name == FLOW_CONTAINER)
        .or(statuses.first())?;
    let current = main.state.as_ref().and_then(|s| s.terminated.as_ref());
    current.or_else(|| main.last_state.as_ref()?.terminated.as_ref())
}

fn evicted(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .is_some_and(|s| s.reason.as_deref() == Some("Evicted"))
}

fn started_pod(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn job(name: &str, conditions: Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    fn pod(name: &str, job: &str, created: &str, status: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-name": job}},
            "status": status,
        }))
        .unwrap()
    }

    fn exited(code: i32, reason: &str) -> Value {
        json!({"phase": "Failed", "containerStatuses": [{"name": "prefect-job", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason}}}]})
    }

    fn view(jobs: Vec<Job>, deleted: Vec<Job>, pods: Vec<Pod>) -> RunView {
        let mut v = RunView::default();
        for j in jobs {
            v.jobs.insert(j.metadata.name.clone().unwrap(), j);
        }
        for j in deleted {
            v.deleted_jobs.insert(j.metadata.name.clone().unwrap(), j);
        }
        for p in pods {
            v.pods.insert(p.metadata.name.clone().unwrap(), p);
        }
        v
    }

    #[test]
    fn a_complete_job_ended_with_zero() {
        let v = view(
            vec![job("j", json!([{"type": "Complete", "status": "True"}]))],
            vec![],
            vec![],
        );
        assert!(matches!(
            assess(&v, "j"),
            Assessment::Ended(End {
                code: 0,
                cause: Cause::Exited,
                ..
            })
        ));
    }

    #[test]
    fn a_failed_pod_with_retries_left_is_not_the_end() {
        let v = view(
            vec![job("j", json!([]))],
            vec![],
            vec![pod("j-1", "j", "2026-01-01T00:00:00Z", exited(1, "Error"))],
        );
        assert!(matches!(
            assess(&v, "j"),
            Assessment::Waiting { started: true, .. }
        ));
    }

    #[test]
    fn the_newest_pod_of_a_failed_job_gives_the_code_and_cause() {
        let failed =
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]);
        let v = view(
            vec![job("j", failed)],
            vec![],
            vec![
                pod("j-1", "j", "2026-01-01T00:00:00Z", exited(1, "Error")),
                pod("j-2", "j", "2026-01-01T00:01:00Z", exited(137, "OOMKilled")),
                pod("other", "k", "2026-01-01T00:02:00Z", exited(3, "Error")),
            ],
        );
        let Assessment::Ended(end) = assess(&v, "j") else {
            panic!()
        };
        assert_eq!(
            (end.code, end.cause, end.pod.as_deref()),
            (137, Cause::OomKilled, Some("j-2"))
        );
    }

    #[test]
    fn a_failed_job_waits_for_news_of_a_pod_still_shown_running() {
        let failed =
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]);
        let running = json!({"phase": "Running"});
        let v = view(
            vec![job("j", failed)],
            vec![],
            vec![pod("j-1", "j", "2026-01-01T00:00:00Z", running)],
        );
        assert!(matches!(assess(&v, "j"), Assessment::Waiting { .. }));
    }

    #[test]
    fn a_deleted_job_without_an_exit_was_deleted() {
        let v = view(vec![], vec![job("j", json!([]))], vec![]);
        let Assessment::Ended(end) = assess(&v, "j") else {
            panic!()
        };
        assert_eq!((end.code, end.cause), (-1, Cause::JobDeleted));
        assert_eq!(assess(&v, "nope"), Assessment::Unseen);
    }

    #[test]
    fn an_evicted_pod_keeps_its_containers_code() {
        let failed =
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]);
        let mut status = exited(0, "Completed");
        status["reason"] = json!("Evicted");
        status["message"] = json!("The node was low on resource: memory.");
        let v = view(
            vec![job("j", failed)],
            vec![],
            vec![pod("j-1", "j", "2026-01-01T00:00:00Z", status)],
        );
        let Assessment::Ended(end) = assess(&v, "j") else {
            panic!()
        };
        // A run the engine rescheduled on SIGTERM exits 0: no crash to report.
        assert_eq!(end.code, 0);
        assert_eq!(
            end.cause,
            Cause::Evicted("The node was low on resource: memory.".into())
        );
    }

    #[test]
    fn an_image_that_cannot_be_pulled_is_diagnosed_while_waiting() {
        let status = json!({"phase": "Pending", "containerStatuses": [{"name": "prefect-job", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]});
        let v = view(
            vec![job("j", json!([]))],
            vec![],
            vec![pod("j-1", "j", "2026-01-01T00:00:00Z", status)],
        );
        let Assessment::Waiting {
            diagnosis: Some(d),
            started: false,
        } = assess(&v, "j")
        else {
            panic!()
        };
        assert_eq!(d.category, "ImagePullError");
    }
}
