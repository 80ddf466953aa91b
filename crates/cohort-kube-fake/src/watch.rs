//! Watches: the newline-delimited JSON event stream a `watch=true` request gets. Each watch
//! is one task that owns its stream: it sends the starting events (current objects, or the
//! history after the requested `resourceVersion`), then every change that concerns its
//! selectors, periodic BOOKMARKs, and ends at `timeoutSeconds`, on shutdown, or abruptly
//! when the emulator drops all watches.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::body::{BodyError, ResponseBody};
use crate::error::ApiError;
use crate::kind::Kind;
use crate::meta;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Change, ChangeType, Delivery, Start, Store, Subscription};

/// What a watch asks for.
#[derive(Debug, Clone)]
pub(crate) struct WatchRequest {
    pub kind: Kind,
    /// `None` for a cluster-wide watch.
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// `resourceVersion`: absent, empty or `0` start with the current objects.
    pub resource_version: Option<String>,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `timeoutSeconds`.
    pub timeout: Option<Duration>,
    /// `sendInitialEvents`: the current objects, then a BOOKMARK marking their end.
    pub send_initial_events: bool,
}

/// Starts a watch and returns its body. A `resourceVersion` older than the compacted history
/// gets a stream with one ERROR event carrying 410 Expired, as the apiserver's watch cache
/// answers.
pub(crate) fn start(
    store: &Store,
    req: WatchRequest,
    bookmark_interval: Duration,
    shutdown: CancellationToken,
) -> Result<ResponseBody, ApiError> {
    let start = match req.resource_version.as_deref() {
        _ if req.send_initial_events => Start::Now,
        None | Some("" | "0") => Start::Now,
        Some(rv) => Start::After(rv.parse().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion: Invalid value: \"{rv}\""))
        })?),
    };
    let (tx, body) = ResponseBody::channel();
    match store.subscribe(&[req.kind], start, true) {
        Err(expired) => {
            let line = event_line("ERROR", &expired.to_status());
            // The channel is new and has room for one line.
            let _ = tx.try_send(Ok(line));
        }
        Ok(sub) => {
            let watch = Watch {
                req,
                last_rv: sub.rv,
                tx,
            };
            tokio::spawn(watch.run(sub, bookmark_interval, shutdown));
        }
    }
    Ok(body)
}

struct Watch {
    req: WatchRequest,
    /// The newest `resourceVersion` this watch has seen every change of its kind up to: the
    /// one a BOOKMARK may safely carry.
    last_rv: u64,
    tx: mpsc::Sender<Result<Bytes, BodyError>>,
}

impl Watch {
    async fn run(mut self, mut sub: Subscription, interval: Duration, shutdown: CancellationToken) {
        let snapshot = std::mem::take(&mut sub.snapshot);
        for obj in snapshot.iter().filter(|o| self.in_scope(o)) {
            if !self.send("ADDED", obj).await {
                return;
            }
        }
        if self.req.send_initial_events {
            let end = self.bookmark(true);
            if !self.send("BOOKMARK", &end).await {
                return;
            }
        }
        for change in std::mem::take(&mut sub.replay) {
            if !self.handle_change(&change).await {
                return;
            }
        }
        let deadline = self.req.timeout.map(|t| Instant::now() + t);
        let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = sleep_until(deadline) => return,
                _ = ticks.tick(), if self.req.bookmarks => {
                    let bookmark = self.bookmark(false);
                    if !self.send("BOOKMARK", &bookmark).await {
                        return;
                    }
                }
                delivery = sub.rx.recv() => match delivery {
                    None => return,
                    Some(Delivery::Dropped) => {
                        let _ = self.tx.send(Err(BodyError::WatchDropped)).await;
                        return;
                    }
                    Some(Delivery::Change(change)) => {
                        if !self.handle_change(&change).await {
                            return;
                        }
                    }
                },
            }
        }
    }

    /// Sends what a change means for this watch's selectors; false when the client is gone.
    async fn handle_change(&mut self, change: &Arc<Change>) -> bool {
        self.last_rv = self.last_rv.max(change.rv);
        let now = change.change != ChangeType::Deleted && self.in_scope(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.in_scope(p));
        let event = match change.change {
            ChangeType::Added => now.then_some(("ADDED", change.object.clone())),
            ChangeType::Modified => match (before, now) {
                (true, true) => Some(("MODIFIED", change.object.clone())),
                (false, true) => Some(("ADDED", change.object.clone())),
                // An object that stops matching is gone from this watch's point of view;
                // it is sent as last seen, at the change's resourceVersion.
                (true, false) => {
                    let mut last = change.previous.clone().unwrap_or_default();
                    meta::metadata_mut(&mut last)
                        .insert("resourceVersion".into(), json!(change.rv.to_string()));
                    Some(("DELETED", last))
                }
                (false, false) => None,
            },
            ChangeType::Deleted => self
                .in_scope(&change.object)
                .then_some(("DELETED", change.object.clone())),
        };
        match event {
            Some((kind, obj)) => self.send(kind, &obj).await,
            None => true,
        }
    }

    fn in_scope(&self, obj: &Value) -> bool {
        self.req
            .namespace
            .as_deref()
            .is_none_or(|ns| meta::namespace(obj) == ns)
            && self.req.labels.matches(meta::labels(obj))
            && self.req.fields.matches(obj)
    }

    fn bookmark(&self, initial_events_end: bool) -> Value {
        let mut metadata = json!({"resourceVersion": self.last_rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({
            "kind": self.req.kind.name(),
            "apiVersion": self.req.kind.api_version(),
            "metadata": metadata,
        })
    }

    async fn send(&self, event_type: &str, obj: &Value) -> bool {
        self.tx.send(Ok(event_line(event_type, obj))).await.is_ok()
    }
}

fn event_line(event_type: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": obj}))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
