//! `stream_output`: the flow container's output of each of a Job's pods, followed to the
//! worker's stdout as the process and Docker workers stream theirs. prefect-kubernetes 0.8.0
//! accepts the variable and ignores it (`KubernetesWorkerJobConfiguration.stream_output`);
//! its releases before 0.6.0 followed the pod's log the same way.

use std::collections::HashSet;

use futures_util::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::{Api, Client};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::observe::RunView;
use crate::outcome::{self, Assessment};

/// Follows the output of `job`'s pods, one after the other as each starts (a Job's retry makes
/// a new pod), until the Job has ended and the last one's log is drained. A supervisor that
/// lets go (`released`) does not cut a log short, but no further pod is waited for.
pub(crate) async fn follow(
    client: Client,
    namespace: String,
    job: String,
    mut view: watch::Receiver<RunView>,
    released: CancellationToken,
) {
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let mut followed = HashSet::new();
    loop {
        let next = {
            let view = view.borrow_and_update();
            match outcome::started_pods(&view, &job)
                .into_iter()
                .find(|(pod, _)| !followed.contains(pod))
            {
                Some(pod) => Some(pod),
                None if matches!(outcome::assess(&view, &job), Assessment::Ended(_)) => return,
                None => None,
            }
        };
        match next {
            Some((pod, container)) => {
                follow_pod(&api, &pod, &container).await;
                followed.insert(pod);
            }
            None => {
                tokio::select! {
                    changed = view.changed() => if changed.is_err() { return },
                    () = released.cancelled() => return,
                }
            }
        }
    }
}

/// Copies one container's log to stdout, line by line, until the API server ends it (the
/// container stopped, or the pod is gone).
async fn follow_pod(api: &Api<Pod>, pod: &str, container: &str) {
    let params = LogParams {
        container: Some(container.to_owned()),
        follow: true,
        ..LogParams::default()
    };
    let stream = match api.log_stream(pod, &params).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(%pod, error = %e, "cannot follow the flow container's output");
            return;
        }
    };
    let mut lines = stream.lines();
    let mut stdout = tokio::io::stdout();
    loop {
        match lines.try_next().await {
            Ok(Some(mut line)) => {
                line.push('\n');
                if stdout.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%pod, error = %e, "the flow container's output stream ended");
                return;
            }
        }
    }
}
