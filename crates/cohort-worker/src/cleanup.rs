//! The server's clean-ups over the worker channel (`cleanup_delivery.v1`): when a run stays
//! Cancelling past the server's timeout, the server marks it Cancelled and asks a worker of the
//! pool to tear its infrastructure down (`cancelling_timeout_teardown.v1`,
//! `prefect/server/services/cancellation_cleanup.py`). The worker stops what the identifier names
//! and acks, or releases with Prefect's reason (`prefect/workers/_cleanup_handlers.py:
//! CancellingTimeoutTeardownHandler`), renewing its lease while the stop takes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cohort_api::models::WorkPool;
use cohort_api::PrefectApi;
use cohort_infra::{Infrastructure, KillError};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::submit::{configure, SharedPool};

/// The capability a worker requests to be sent clean-ups.
pub const CAPABILITY: &str = "cleanup_delivery.v1";
/// The one kind of clean-up Prefect's workers handle.
pub const CANCELLING_TIMEOUT_TEARDOWN: &str = "cancelling_timeout_teardown.v1";
/// `CancellingTimeoutTeardownHandler(grace_seconds=30)`.
const GRACE: Duration = Duration::from_secs(30);
/// A lease is renewed this long before it runs out (`WorkerCleanupExecutor`'s buffer).
const RENEW_BEFORE: Duration = Duration::from_secs(5);
/// The server's lease on a delivery, assumed again after each renewal.
const LEASE: Duration = Duration::from_secs(30);

/// A frame for the channel to send: its type and payload.
pub type Reply = (&'static str, Value);

/// Handles the clean-ups of one channel connection, one at a time (`max_cleanup_concurrency`
/// is 1, as Prefect's).
pub struct Cleaner {
    client: Arc<dyn PrefectApi>,
    infra: Arc<dyn Infrastructure>,
    /// The pool, whose template renders a run's configuration.
    pool: SharedPool,
    busy: Arc<AtomicBool>,
    replies: mpsc::UnboundedSender<Reply>,
}

impl Cleaner {
    pub fn new(
        client: Arc<dyn PrefectApi>,
        infra: Arc<dyn Infrastructure>,
        pool: SharedPool,
    ) -> (Self, mpsc::UnboundedReceiver<Reply>) {
        let (replies, rx) = mpsc::unbounded_channel();
        let cleaner = Self {
            client,
            infra,
            pool,
            busy: Arc::default(),
            replies,
        };
        (cleaner, rx)
    }

    /// A `cleanup.message.v1` payload: answered at once when it cannot be handled, else in a
    /// task whose ack, release and renewals come back through the replies.
    pub fn handle(&self, payload: &Value) {
        let operation = json!({
            "message_id": payload["message_id"],
            "reservation_token": payload["reservation_token"],
        });
        if payload["kind"] != CANCELLING_TIMEOUT_TEARDOWN {
            let _ = self
                .replies
                .send(release(&operation, "unsupported_cleanup_kind"));
            return;
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            let _ = self
                .replies
                .send(release(&operation, "concurrency_limit_reached"));
            return;
        }
        let (client, infra, busy, replies) = (
            self.client.clone(),
            self.infra.clone(),
            self.busy.clone(),
            self.replies.clone(),
        );
        // Frozen now, so a snapshot applied meanwhile does not change what renders the
        // configuration (as Prefect copies its `work_pool`).
        let pool = self.pool.read().expect("pool lock poisoned").clone();
        let target = payload["target"].clone();
        let lease_ends = lease_remaining(payload["lease_expires_at"].as_str());
        tokio::spawn(async move {
            let work = teardown(client.as_ref(), infra.as_ref(), &pool, &target);
            tokio::pin!(work);
            let mut renew_at =
                tokio::time::Instant::now() + lease_ends.saturating_sub(RENEW_BEFORE);
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = tokio::time::sleep_until(renew_at) => {
                        let _ = replies.send(("cleanup.renew.v1", operation.clone()));
                        renew_at = tokio::time::Instant::now() + LEASE.saturating_sub(RENEW_BEFORE);
                    }
                }
            };
            let reply = match result {
                Ok(()) => ("cleanup.ack.v1", operation),
                Err(reason) => release(&operation, reason),
            };
            let _ = replies.send(reply);
            busy.store(false, Ordering::SeqCst);
        });
    }
}

fn release(operation: &Value, reason: &str) -> Reply {
    let mut payload = operation.clone();
    payload["reason"] = json!(reason);
    ("cleanup.release.v1", payload)
}

/// How long the delivery's lease has left (its `lease_expires_at`, or a full lease).
fn lease_remaining(expires_at: Option<&str>) -> Duration {
    expires_at
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|t| {
            (t.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .ok()
        })
        .unwrap_or(LEASE)
}

/// `CancellingTimeoutTeardownHandler.cleanup`: the release reason when it cannot be done.
async fn teardown(
    client: &dyn PrefectApi,
    infra: &dyn Infrastructure,
    pool: &WorkPool,
    target: &Value,
) -> Result<(), &'static str> {
    let Some(id) = target["flow_run_id"]
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
    else {
        return Err("invalid_payload");
    };
    let run = match client.read_flow_run(id).await {
        Ok(run) => run,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => {
            tracing::warn!(flow_run = %id, error = %e, "cannot read the flow run of a clean-up");
            return Err("handler_failed");
        }
    };
    let Some(identifier) = target["infrastructure_pid"]
        .as_str()
        .filter(|p| !p.is_empty())
    else {
        return match run.infrastructure_pid.as_deref() {
            None | Some("") => Ok(()),
            Some(_) => Err("missing_infrastructure_handle"),
        };
    };
    // How to reach the infrastructure (a Kubernetes run's `cluster_config`): the run's job
    // configuration rendered now, as Prefect's handler renders it. Where Prefect gives up
    // (`configuration_context_unavailable`: its deployment is gone), or the configuration
    // cannot be rendered, the worker's own infrastructure is tried all the same.
    let deployment = match run.deployment_id {
        Some(d) => match client.read_deployment(d).await {
            Ok(found) => found,
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                tracing::warn!(flow_run = %id, error = %e, "cannot read the deployment of a clean-up");
                return Err("handler_failed");
            }
        },
        None => None,
    };
    let configuration = match configure(infra, client, pool, deployment.as_ref(), &run).await {
        Ok(configuration) => Some(configuration),
        Err(why) => {
            tracing::warn!(flow_run = %id, %why, "cannot render the configuration of a clean-up; using the worker's own infrastructure");
            None
        }
    };
    tracing::info!(flow_run = %id, infrastructure = identifier, "stopping the infrastructure of a run the server cancelled after its Cancelling timeout");
    match infra.kill(identifier, configuration.as_ref(), GRACE).await {
        Ok(()) | Err(KillError::NotFound) => Ok(()),
        Err(KillError::Unsupported) => Err("unsupported_worker_type"),
        Err(KillError::Unavailable(why)) => {
            tracing::warn!(flow_run = %id, %why, "clean-up could not reach the infrastructure");
            Err("infrastructure_not_available")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_api::models::StateType;
    use cohort_fakes::{InProcessPrefect, KillAnswer, ScriptedInfrastructure};
    use uuid::Uuid;

    struct Setup {
        api: Arc<InProcessPrefect>,
        infra: Arc<ScriptedInfrastructure>,
        cleaner: Cleaner,
        replies: mpsc::UnboundedReceiver<Reply>,
    }

    fn setup() -> Setup {
        let api = InProcessPrefect::new();
        let infra = ScriptedInfrastructure::new();
        let pool: WorkPool = serde_json::from_value(json!({
            "id": Uuid::new_v4(), "name": "cleanup-pool", "type": "scripted",
            "base_job_template": {},
        }))
        .expect("a work pool");
        let pool = Arc::new(std::sync::RwLock::new(Arc::new(pool)));
        let (cleaner, replies) = Cleaner::new(api.clone(), infra.clone(), pool);
        Setup {
            api,
            infra,
            cleaner,
            replies,
        }
    }

    /// A delivery of the teardown of `run`'s infrastructure, `identifier`, with a lease of
    /// 30 s from now.
    fn teardown_of(run: Uuid, identifier: &str) -> Value {
        json!({
            "message_id": "m-1",
            "reservation_token": "r-1",
            "kind": CANCELLING_TIMEOUT_TEARDOWN,
            "target": {"flow_run_id": run, "infrastructure_pid": identifier},
            "lease_expires_at": (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_teardown_stops_the_infrastructure_with_the_grace_and_acks() {
        let mut s = setup();
        let run = Uuid::new_v4();
        s.api.set(run, StateType::Cancelled);
        s.infra
            .answer_kills(KillAnswer::Stopped, Duration::from_secs(2));
        s.cleaner.handle(&teardown_of(run, "scripted:abc"));
        let (kind, payload) = s.replies.recv().await.unwrap();
        assert_eq!(kind, "cleanup.ack.v1");
        assert_eq!(
            payload,
            json!({"message_id": "m-1", "reservation_token": "r-1"})
        );
        assert_eq!(
            s.infra.killed(),
            [("scripted:abc".to_owned(), Duration::from_secs(30))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_stop_renews_the_lease_before_it_runs_out() {
        let mut s = setup();
        let run = Uuid::new_v4();
        s.api.set(run, StateType::Cancelled);
        // Stopping takes past the first lease (30 s) and a renewed one.
        s.infra
            .answer_kills(KillAnswer::Stopped, Duration::from_secs(58));
        s.cleaner.handle(&teardown_of(run, "scripted:abc"));
        let kinds: Vec<&str> = [
            s.replies.recv().await.unwrap().0,
            s.replies.recv().await.unwrap().0,
            s.replies.recv().await.unwrap().0,
        ]
        .to_vec();
        assert_eq!(
            kinds,
            ["cleanup.renew.v1", "cleanup.renew.v1", "cleanup.ack.v1"]
        );
    }

    /// Handles `payload`; `ack`, or the release's reason.
    async fn reason(s: &mut Setup, payload: Value) -> String {
        s.cleaner.handle(&payload);
        let (kind, payload) = s.replies.recv().await.unwrap();
        if kind == "cleanup.ack.v1" {
            return "ack".to_owned();
        }
        assert_eq!(kind, "cleanup.release.v1");
        payload["reason"].as_str().unwrap().to_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn what_cannot_be_done_is_released_with_prefects_reasons() {
        let mut s = setup();
        let run = Uuid::new_v4();
        s.api.set(run, StateType::Cancelled);
        // The scripted infrastructure cannot kill by identifier until told otherwise.
        assert_eq!(
            reason(&mut s, teardown_of(run, "scripted:abc")).await,
            "unsupported_worker_type"
        );
        let mut other = teardown_of(run, "scripted:abc");
        other["kind"] = json!("something_else.v1");
        assert_eq!(reason(&mut s, other).await, "unsupported_cleanup_kind");
        assert_eq!(
            reason(
                &mut s,
                json!({"kind": CANCELLING_TIMEOUT_TEARDOWN, "target": {}})
            )
            .await,
            "invalid_payload"
        );
        s.infra
            .answer_kills(KillAnswer::Unavailable, Duration::ZERO);
        assert_eq!(
            reason(&mut s, teardown_of(run, "scripted:abc")).await,
            "infrastructure_not_available"
        );
        // Gone already: nothing left to do, done.
        s.infra.answer_kills(KillAnswer::NotFound, Duration::ZERO);
        assert_eq!(
            reason(&mut s, teardown_of(run, "scripted:abc")).await,
            "ack"
        );
        // A run that no longer exists: done.
        assert_eq!(
            reason(&mut s, teardown_of(Uuid::new_v4(), "scripted:abc")).await,
            "ack"
        );
        // The server cannot be asked about the run: another worker may try.
        s.api.set_unavailable(true);
        assert_eq!(
            reason(&mut s, teardown_of(run, "scripted:abc")).await,
            "handler_failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_teardown_at_a_time() {
        let mut s = setup();
        let run = Uuid::new_v4();
        s.api.set(run, StateType::Cancelled);
        s.infra
            .answer_kills(KillAnswer::Stopped, Duration::from_secs(5));
        s.cleaner.handle(&teardown_of(run, "scripted:abc"));
        s.cleaner.handle(&teardown_of(run, "scripted:def"));
        let (kind, payload) = s.replies.recv().await.unwrap();
        assert_eq!(
            (kind, payload["reason"].as_str()),
            ("cleanup.release.v1", Some("concurrency_limit_reached"))
        );
        assert_eq!(s.replies.recv().await.unwrap().0, "cleanup.ack.v1");
        assert_eq!(s.infra.killed().len(), 1);
    }
}
