//! Resource requests: list, watch and create on collections; get, replace, patch and delete
//! on objects and their `status` subresource.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::{error, json, json_stream, ApiRequest};
use crate::apiserver::{self, DeleteOptions, Deleted, PatchType, PropagationPolicy};
use crate::body::ResponseBody;
use crate::error::{success_status, ApiError};
use crate::kind::Kind;
use crate::meta;
use crate::selector::{FieldSelector, LabelSelector};
use crate::shared::Shared;
use crate::watch::{self, WatchRequest};

type Answer = Result<Response<ResponseBody>, ApiError>;

/// `GET` (list or watch) and `POST` on a collection.
pub(super) fn collection(
    shared: &Arc<Shared>,
    req: &ApiRequest,
    kind: Kind,
    namespace: Option<&str>,
) -> Answer {
    match req.method {
        Method::GET if req.flag("watch") => {
            let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or_default())
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or_default())
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let timeout = match req.param("timeoutSeconds") {
                None => None,
                Some(t) => Some(Duration::from_secs(t.parse().map_err(|_| {
                    ApiError::bad_request(format!("timeoutSeconds: invalid value {t:?}"))
                })?)),
            };
            let body = watch::start(
                &shared.store,
                WatchRequest {
                    kind,
                    namespace: namespace.map(str::to_owned),
                    labels,
                    fields,
                    resource_version: req.param("resourceVersion").map(str::to_owned),
                    bookmarks: req.flag("allowWatchBookmarks"),
                    timeout,
                    send_initial_events: req.flag("sendInitialEvents"),
                },
                shared.config.bookmark_interval,
                shared.shutdown.clone(),
            )?;
            Ok(json_stream(body))
        }
        Method::GET => list(shared, req, kind, namespace),
        Method::POST => {
            let Some(ns) = namespace.or((!kind.namespaced()).then_some("")) else {
                return Err(ApiError::method_not_supported(kind, "create"));
            };
            let body = req
                .json()?
                .ok_or_else(|| ApiError::bad_request("the request has no body"))?;
            let dry_run = req.param("dryRun") == Some("All");
            let created = shared
                .store
                .txn(|t| apiserver::create(t, kind, ns, body, dry_run))?;
            Ok(json(StatusCode::CREATED, &created))
        }
        _ => Err(ApiError::method_not_supported(kind, req.method.as_str())),
    }
}

/// A `continue` token: where the next page starts, and at which list `resourceVersion`.
fn continue_token(rv: u64, after: &(String, String)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"rv": rv, "namespace": after.0, "name": after.1}).to_string())
}

fn parse_continue(token: &str) -> Result<(String, String), ApiError> {
    let bad = || {
        ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion")
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let field = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_owned);
    match (field("namespace"), field("name")) {
        (Some(namespace), Some(name)) => Ok((namespace, name)),
        _ => Err(bad()),
    }
}

fn list(shared: &Arc<Shared>, req: &ApiRequest, kind: Kind, namespace: Option<&str>) -> Answer {
    let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = match req.param("limit") {
        None | Some("" | "0") => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("limit: invalid value {l:?}")))?,
        ),
    };
    let after = req
        .param("continue")
        .filter(|c| !c.is_empty())
        .map(parse_continue)
        .transpose()?;
    let (rv, mut items) = shared.store.txn(|t| {
        let items: Vec<Value> = t
            .iter(kind, namespace)
            .filter(|o| labels.matches(meta::labels(o)) && fields.matches(o))
            .filter(|o| after.as_ref().is_none_or(|a| position_key(o) > *a))
            .cloned()
            .collect();
        (t.rv(), items)
    });
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(rv.to_string()));
    if let Some(limit) = limit.filter(|l| items.len() > *l) {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().map(position_key).unwrap_or_default();
        metadata.insert("continue".into(), json!(continue_token(rv, &last)));
        metadata.insert("remainingItemCount".into(), json!(remaining));
    }
    // Items in a list carry no `kind` or `apiVersion`, as the apiserver sends them.
    for item in &mut items {
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
    }
    Ok(json(
        StatusCode::OK,
        &json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": Value::Object(metadata),
            "items": items,
        }),
    ))
}

/// The order of objects in a list: namespace, then name.
fn position_key(obj: &Value) -> (String, String) {
    (meta::namespace(obj).to_owned(), meta::name(obj).to_owned())
}

/// `GET`, `PUT`, `PATCH` and `DELETE` on an object (or its status).
pub(super) fn object(
    shared: &Arc<Shared>,
    req: &ApiRequest,
    kind: Kind,
    namespace: &str,
    name: &str,
    status_only: bool,
) -> Answer {
    match req.method {
        Method::GET => {
            let obj = shared
                .store
                .txn(|t| t.get(kind, namespace, name).cloned())
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json(StatusCode::OK, &obj))
        }
        Method::PUT => {
            let body = req
                .json()?
                .ok_or_else(|| ApiError::bad_request("the request has no body"))?;
            let updated = shared
                .store
                .txn(|t| apiserver::replace(t, kind, namespace, name, body, status_only))?;
            Ok(json(StatusCode::OK, &updated))
        }
        Method::PATCH => {
            let patch_type = match req.content_type.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    PatchType::Merge
                }
                "application/json-patch+json" => PatchType::Json,
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let body = req
                .json()?
                .ok_or_else(|| ApiError::bad_request("the request has no body"))?;
            let patched = shared.store.txn(|t| {
                apiserver::patch(t, kind, namespace, name, patch_type, &body, status_only)
            })?;
            Ok(json(StatusCode::OK, &patched))
        }
        Method::DELETE if !status_only => {
            let opts = delete_options(req)?;
            let outcome = shared
                .store
                .txn(|t| apiserver::delete(t, kind, namespace, name, &opts))?;
            let foreground = opts.propagation_policy == Some(PropagationPolicy::Foreground);
            let doc = match outcome {
                Deleted::Pending(obj) => obj,
                // Pods and namespaces answer with the object. So does a foreground deletion
                // (the real garbage collector finishes it later; here it may already have):
                // the object as marked, with `deletionTimestamp` and the finalizer.
                Deleted::Removed(obj)
                    if foreground || matches!(kind, Kind::Pod | Kind::Namespace) =>
                {
                    obj
                }
                Deleted::Removed(obj) => success_status(kind, name, meta::uid(&obj)),
            };
            Ok(json(StatusCode::OK, &doc))
        }
        _ => Ok(error(&ApiError::method_not_supported(
            kind,
            req.method.as_str(),
        ))),
    }
}

/// `DeleteOptions` from the body (kube-rs, kubectl) and the query string (Python's client);
/// a field in the body wins.
fn delete_options(req: &ApiRequest) -> Result<DeleteOptions, ApiError> {
    let body = req.json()?.unwrap_or(Value::Null);
    let policy_text = body
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| req.param("propagationPolicy").map(str::to_owned));
    let mut propagation_policy = match policy_text.as_deref() {
        None | Some("") => None,
        Some(p) => Some(PropagationPolicy::parse(p).ok_or_else(|| {
            ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: \"{p}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            ))
        })?),
    };
    let orphan = body
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or_else(|| req.param("orphanDependents").map(|v| v == "true"));
    if propagation_policy.is_none() {
        propagation_policy = orphan.map(|o| {
            if o {
                PropagationPolicy::Orphan
            } else {
                PropagationPolicy::Background
            }
        });
    }
    let grace_period_seconds = match body.get("gracePeriodSeconds").and_then(Value::as_i64) {
        Some(g) => Some(g),
        None => req
            .param("gracePeriodSeconds")
            .map(|g| {
                g.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("gracePeriodSeconds: invalid value {g:?}"))
                })
            })
            .transpose()?,
    };
    let precondition = |field: &str| {
        body.pointer(&format!("/preconditions/{field}"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(DeleteOptions {
        grace_period_seconds,
        propagation_policy,
        precondition_uid: precondition("uid"),
        precondition_resource_version: precondition("resourceVersion"),
    })
}
