//! Restart recovery: the claims an earlier worker of the same pool, name and `PREFECT_HOME` left in
//! the journal are reconciled with the server and with the machine before new runs are
//! claimed. A run whose flow process was started is re-adopted and supervised to its end, or,
//! if it ended meanwhile, reported with the exit code its shim recorded; a claimed run never
//! launched is launched if it is still Pending and ours, and forgotten otherwise. Either way
//! each run gets exactly one `submitted-flow-run` and one `executed-flow-run`.

use std::sync::Arc;

use cohort_api::models::{Deployment, Flow, FlowRun, StateType};
use cohort_events::{related, RelatedResource};
use cohort_infra::{EventContext, Started};
use tokio_util::sync::CancellationToken;

use crate::journal::Claim;
use crate::report::ApiReporter;
use crate::submit::{emit_executed, flow_run_objects, forget, Outcome, RunContext};
use cohort_execution::execution::{Executed, NotExecuted, RunLog};

/// What to do with one journaled claim.
pub(crate) enum Recovery {
    /// Its infrastructure was started: supervise it (or report how it ended).
    Adopt(Claim, Box<dyn Started>),
    /// Never launched, and still Pending: finish the submission.
    Resume(Claim, Box<FlowRun>),
    /// Nothing left to do for it.
    Forget(Claim, String),
    /// The server could not be asked; keep the claim for the next start.
    Keep(String),
}

/// Decides what to do with `claim`.
pub(crate) async fn reconcile(ctx: &RunContext, claim: Claim) -> Recovery {
    let configuration = match ctx.infra.adopts_by_configuration() {
        true => configuration_now(ctx, claim.flow_run_id).await,
        false => None,
    };
    if let Some(started) = ctx
        .infra
        .adopt(
            claim.flow_run_id,
            claim.status_file.as_deref(),
            configuration.as_ref(),
        )
        .await
    {
        return Recovery::Adopt(claim, started);
    }
    match ctx.api().read_flow_run(claim.flow_run_id).await {
        Ok(run) => match run.state.as_ref().map(|s| s.state_type) {
            // Claimed by us (Pending, or Submitting, which Prefect also types Pending) and
            // never started: nobody else will take it, so finish what was begun.
            Some(StateType::Pending) => Recovery::Resume(claim, Box::new(run)),
            state => {
                let why = format!(
                    "it was never launched and its state is now {}",
                    state.map_or_else(|| "unknown".to_owned(), |s| format!("{s:?}"))
                );
                Recovery::Forget(claim, why)
            }
        },
        Err(e) if e.is_not_found() => Recovery::Forget(claim, "it no longer exists".into()),
        Err(e) => Recovery::Keep(e.to_string()),
    }
}

/// The run's job configuration rendered now (where its infrastructure is), or `None` when the
/// run, its deployment or its blocks cannot be read: the infrastructure then looks where the
/// worker's own configuration says.
async fn configuration_now(ctx: &RunContext, id: uuid::Uuid) -> Option<cohort_infra::Map> {
    let client = ctx.api();
    let run = client.read_flow_run(id).await.ok()?;
    let deployment = match run.deployment_id {
        Some(d) => client.read_deployment(d).await.ok().flatten(),
        None => None,
    };
    let pool = ctx.pool.read().expect("pool lock poisoned").clone();
    match crate::submit::configure(ctx.infra.as_ref(), client, &pool, deployment.as_ref(), &run)
        .await
    {
        Ok(configuration) => Some(configuration),
        Err(why) => {
            tracing::warn!(flow_run = %id, %why, "cannot render a journaled run's configuration; looking for it where the worker's own configuration says");
            None
        }
    }
}

/// Supervises a re-adopted run to its end and reports it, then forgets it.
pub(crate) async fn adopted(
    ctx: Arc<RunContext>,
    claim: Claim,
    started: Box<dyn Started>,
    cancel: CancellationToken,
    terminate: CancellationToken,
) -> Outcome {
    let outcome = supervise_adopted(&ctx, &claim, started, cancel, terminate).await;
    forget_claim(&ctx, &claim).await;
    outcome
}

/// Forgets a claim of an earlier worker: its journal entry, its shim's status file, and the
/// temporary working directory nobody else will remove.
pub(crate) async fn forget_claim(ctx: &RunContext, claim: &Claim) {
    if let Some(dir) = &claim.temp_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    // A claim taken over from an earlier release's layout: its status file, and that
    // release's run status directory once nothing else is in it.
    if let Some(file) = &claim.status_file {
        let _ = std::fs::remove_file(file);
        if let Some(dir) = file.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    forget(ctx, claim.flow_run_id).await;
}

async fn supervise_adopted(
    ctx: &RunContext,
    claim: &Claim,
    mut started: Box<dyn Started>,
    cancel: CancellationToken,
    terminate: CancellationToken,
) -> Outcome {
    let client = ctx.api();
    let id = claim.flow_run_id;
    let mut log = RunLog::new(id, "prefect.flow_runs.worker");
    log.info(format!(
        "Worker '{}' re-adopted flow run '{id}' ({} {}) after a restart",
        ctx.worker_name,
        ctx.infra.worker_type(),
        started.identifier()
    ));
    let (executed, run) = match client.read_flow_run(id).await {
        Ok(run) => {
            let deployment = match run.deployment_id {
                Some(d) => client.read_deployment(d).await.ok().flatten(),
                None => None,
            };
            let flow = client.read_flow(run.flow_id).await.ok();
            if let Some(related) =
                adopted_related(ctx, claim, &run, deployment.as_ref(), flow.as_ref())
            {
                started.report_to(
                    EventContext {
                        sink: ctx.executor.sink.clone(),
                        worker: ctx.resource.clone(),
                        related,
                    },
                    Arc::new(ApiReporter {
                        api: ctx.executor.api.clone(),
                        flow_run_id: id,
                    }),
                );
            }
            let executed = ctx
                .executor
                .supervise(
                    &run,
                    deployment.as_ref(),
                    flow.as_ref(),
                    started,
                    &mut log,
                    &cancel,
                    &terminate,
                )
                .await;
            (executed, Some((run, deployment, flow)))
        }
        // The run cannot be read (deleted, or the server is unreachable for longer than the
        // client's retries): it cannot be cancelled or marked, but it can still be waited for.
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the re-adopted flow run; waiting for its infrastructure");
            let pid = started.identifier();
            let executed = match started.wait().await {
                Ok(status_code) => Ok(Executed { pid, status_code }),
                Err(e) => Err(NotExecuted::Lost(e.to_string())),
            };
            (executed, None)
        }
    };
    ctx.executor.ship(&mut log).await;
    let executed = match executed {
        Ok(e) => e,
        Err(NotExecuted::CouldNotStart(m) | NotExecuted::Lost(m)) => {
            tracing::error!("Lost connection to flow run '{id}' infrastructure: {m}. The flow run's final state will be determined by the execution environment.");
            return Outcome::FailedToSubmit(m);
        }
    };
    let related = match &run {
        Some((run, deployment, flow)) => {
            adopted_related(ctx, claim, run, deployment.as_ref(), flow.as_ref())
        }
        None => claim.submitted.as_ref().map(|s| s.related.clone()),
    };
    match related {
        Some(related) => emit_executed(ctx, related, claim.submitted.as_ref(), &executed).await,
        None => {
            tracing::warn!("no executed-flow-run event for flow run '{id}': neither the journal nor the server describes it");
        }
    }
    crate::submit::count_finished(ctx, id).await;
    Outcome::Exited(executed.status_code)
}

/// What a re-adopted run's events relate to: the journaled `submitted-flow-run`'s resources,
/// or, when the journal failed to keep that event, what the server knows of the run.
fn adopted_related(
    ctx: &RunContext,
    claim: &Claim,
    run: &FlowRun,
    deployment: Option<&Deployment>,
    flow: Option<&Flow>,
) -> Option<Vec<RelatedResource>> {
    if let Some(submitted) = &claim.submitted {
        return Some(submitted.related.clone());
    }
    let pool = ctx.pool.read().expect("pool lock poisoned").clone();
    let objects = flow_run_objects(run, deployment, flow?, &pool);
    Some(related::worker_flow_run_related(&objects))
}
