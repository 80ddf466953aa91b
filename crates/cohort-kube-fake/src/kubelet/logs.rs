//! Pod logs (`GET …/pods/{name}/log`): from the text a test sets in scripted mode, or from
//! the container on the Docker Engine. The checks before any text is read (which container,
//! whether it has started) are the kubelet's, with its messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::query_parameters::LogsOptions;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::Value;

use super::{status, Kubelet};
use crate::body::{BodyError, ResponseBody};
use crate::error::ApiError;
use crate::http::ApiRequest;
use crate::kind::Kind;
use crate::shared::Shared;

/// A container's log: each line with the time it was written.
type Lines = Vec<(DateTime<Utc>, String)>;

/// Log lines a test set for containers, by (namespace, pod, container).
#[derive(Debug, Default)]
pub(crate) struct ScriptedLogs {
    lines: Mutex<HashMap<(String, String, String), Lines>>,
}

impl ScriptedLogs {
    /// Replaces a container's log with `text` (`append`: adds to it).
    pub fn write(&self, namespace: &str, pod: &str, container: &str, text: &str, append: bool) {
        let now = Utc::now();
        let mut map = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let lines = map
            .entry((namespace.to_owned(), pod.to_owned(), container.to_owned()))
            .or_default();
        if !append {
            lines.clear();
        }
        lines.extend(text.split_inclusive('\n').map(|l| (now, l.to_owned())));
    }

    fn read(&self, namespace: &str, pod: &str, container: &str) -> Lines {
        let map = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(namespace.to_owned(), pod.to_owned(), container.to_owned()))
            .cloned()
            .unwrap_or_default()
    }
}

/// The query of a log request.
#[derive(Debug, Clone)]
pub(crate) struct LogQuery {
    pub container: String,
    pub tail_lines: Option<usize>,
    pub follow: bool,
    pub timestamps: bool,
}

/// Answers a log request.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    req: &ApiRequest,
    namespace: &str,
    name: &str,
) -> Result<ResponseBody, ApiError> {
    let pod = shared
        .store
        .txn(|t| t.get(Kind::Pod, namespace, name).cloned())
        .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
    let names = status::container_names(&pod);
    let container = match req.param("container") {
        Some(c) if names.iter().any(|n| n == c) => c.to_owned(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )))
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    if req.flag("previous") {
        // restartPolicy Never: no container ever has a previous instance.
        return Err(ApiError::bad_request(format!(
            "previous terminated container \"{container}\" in pod \"{name}\" not found"
        )));
    }
    let state = status::container_status(&pod, &container).and_then(|s| s.get("state"));
    let started =
        state.is_some_and(|s| s.get("running").is_some() || s.get("terminated").is_some());
    if !started {
        let reason = state
            .and_then(|s| s.pointer("/waiting/reason"))
            .and_then(Value::as_str)
            .unwrap_or("ContainerCreating");
        let reason = match reason {
            "ErrImagePull" | "ImagePullBackOff" => "trying and failing to pull image",
            other => other,
        };
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        )));
    }
    let tail_lines = req
        .param("tailLines")
        .map(|n| {
            n.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("tailLines: invalid value {n:?}")))
        })
        .transpose()?;
    let query = LogQuery {
        container,
        tail_lines,
        follow: req.flag("follow"),
        timestamps: req.flag("timestamps"),
    };
    if matches!(shared.config.kubelet, Kubelet::Docker { .. }) {
        let id = status::container_status(&pod, &query.container)
            .and_then(|s| s.get("containerID"))
            .and_then(Value::as_str)
            .and_then(|id| id.strip_prefix("docker://"))
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "container \"{}\" in pod \"{name}\" is waiting to start: ContainerCreating",
                    query.container
                ))
            })?;
        return docker(shared, id, query).await;
    }
    Ok(scripted(shared, namespace, name, query))
}

/// The container's output from the Engine (stdout and stderr interleaved, as the kubelet
/// returns them).
async fn docker(
    shared: &Arc<Shared>,
    id: String,
    query: LogQuery,
) -> Result<ResponseBody, ApiError> {
    let docker = shared
        .engine
        .get()
        .await
        .map_err(|e| ApiError::new(500, "InternalError", e, None))?
        .clone();
    let options = LogsOptions {
        follow: query.follow,
        stdout: true,
        stderr: true,
        timestamps: query.timestamps,
        tail: query
            .tail_lines
            .map_or_else(|| "all".to_owned(), |n| n.to_string()),
        ..Default::default()
    };
    let mut logs = Box::pin(docker.logs(&id, Some(options)));
    if !query.follow {
        let mut text = Vec::new();
        while let Some(chunk) = logs.next().await {
            match chunk {
                Ok(out) => text.extend_from_slice(&out.into_bytes()),
                Err(e) => {
                    return Err(ApiError::new(500, "InternalError", e.to_string(), None));
                }
            }
        }
        return Ok(ResponseBody::full(text));
    }
    let (tx, body) = ResponseBody::channel();
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                chunk = logs.next() => match chunk {
                    None => return,
                    Some(Ok(out)) => {
                        if tx.send(Ok(out.into_bytes())).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(BodyError::Logs(e.to_string()))).await;
                        return;
                    }
                },
            }
        }
    });
    Ok(body)
}

/// RFC 3339 with nanoseconds, as the kubelet prefixes lines with `timestamps=true`.
fn stamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

fn render(lines: &[(DateTime<Utc>, String)], timestamps: bool) -> String {
    lines
        .iter()
        .map(|(t, l)| {
            if timestamps {
                format!("{} {l}", stamp(*t))
            } else {
                l.clone()
            }
        })
        .collect()
}

fn scripted(shared: &Arc<Shared>, namespace: &str, name: &str, query: LogQuery) -> ResponseBody {
    let mut lines = shared.logs.read(namespace, name, &query.container);
    if let Some(n) = query.tail_lines {
        lines.drain(..lines.len().saturating_sub(n));
    }
    if !query.follow {
        return ResponseBody::full(render(&lines, query.timestamps));
    }
    let (tx, body) = ResponseBody::channel();
    let shared = shared.clone();
    let (namespace, name) = (namespace.to_owned(), name.to_owned());
    let mut sent = shared.logs.read(&namespace, &name, &query.container).len();
    tokio::spawn(async move {
        if tx
            .send(Ok(Bytes::from(render(&lines, query.timestamps))))
            .await
            .is_err()
        {
            return;
        }
        // Scripted text changes only when a test writes it, so a short poll is enough to
        // follow it until the container stops.
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let all = shared.logs.read(&namespace, &name, &query.container);
            if all.len() > sent {
                let text = render(&all[sent..], query.timestamps);
                sent = all.len();
                if tx.send(Ok(Bytes::from(text))).await.is_err() {
                    return;
                }
            }
            let running = shared.store.txn(|t| {
                t.get(Kind::Pod, &namespace, &name).is_some_and(|p| {
                    status::container_status(p, &query.container)
                        .is_some_and(|s| s.pointer("/state/running").is_some())
                })
            });
            if !running {
                return;
            }
        }
    });
    body
}
